//! Finding the PostgreSQL server binaries ([`super::PgTemp::find_bindir`]).

use super::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub(super) fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

pub(super) fn has_server_binaries(dir: &Path) -> bool {
    is_executable(&dir.join("initdb")) && is_executable(&dir.join("postgres"))
}

/// Sort key of a `/usr/lib/postgresql/<version>` directory name (`15`, `9.6`).
pub(super) fn version_key(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|p| p.parse().ok()).collect()
}

impl PgTemp {
    /// Finds the directory holding the PostgreSQL server binaries (`initdb` and
    /// `postgres`), in this order: `$COBI_SYNC_PG_BINDIR` (an error if it is set but
    /// lacks them), the directory of `initdb` on `PATH` (symlinks resolved), the output
    /// of `pg_config --bindir`, and the highest `/usr/lib/postgresql/*/bin`.
    pub fn find_bindir() -> Result<PathBuf, PgTempError> {
        let mut searched: Vec<String> = Vec::new();

        if let Some(dir) = std::env::var_os(BINDIR_ENV).filter(|v| !v.is_empty()) {
            let dir = PathBuf::from(dir);
            if has_server_binaries(&dir) {
                return Ok(dir);
            }
            return Err(PgTempError::NoBinaries {
                searched: format!("${BINDIR_ENV}={} (no initdb/postgres there)", dir.display()),
            });
        }
        searched.push(format!("${BINDIR_ENV} (unset)"));

        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                let initdb = dir.join("initdb");
                if !is_executable(&initdb) {
                    continue;
                }
                if let Some(real) = fs::canonicalize(&initdb)
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                {
                    if has_server_binaries(&real) {
                        return Ok(real);
                    }
                }
                if has_server_binaries(&dir) {
                    return Ok(dir);
                }
            }
        }
        searched.push("`initdb` on PATH".to_owned());

        match Command::new("pg_config")
            .arg("--bindir")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {
                let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if has_server_binaries(&dir) {
                    return Ok(dir);
                }
                searched.push(format!("`pg_config --bindir` ({})", dir.display()));
            }
            _ => searched.push("`pg_config --bindir` (no pg_config)".to_owned()),
        }

        let root = Path::new("/usr/lib/postgresql");
        let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let key = version_key(e.file_name().to_str()?)?;
                let bin = e.path().join("bin");
                has_server_binaries(&bin).then_some((key, bin))
            })
            .collect();
        versions.sort();
        if let Some((_, bin)) = versions.pop() {
            return Ok(bin);
        }
        searched.push("/usr/lib/postgresql/*/bin".to_owned());

        Err(PgTempError::NoBinaries {
            searched: searched.join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_dirs_sort_numerically() {
        let mut v = [version_key("9.6"), version_key("15"), version_key("10")];
        v.sort();
        assert_eq!(v.last().unwrap(), &Some(vec![15]));
        assert_eq!(version_key("15beta"), None);
    }
}
