//! Secrets (the API key, the database password) and where they are read from.
//!
//! A [`Secret`] prints as `***` in `Debug` and `Display`, so a secret can
//! sit inside any settings struct that gets logged. Key files are re-read by
//! path on every load, so a file replaced by rename is picked up.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A value that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where the API key comes from, in order of precedence
/// (DESIGN.md §6): `api_key_file`, the systemd credential `cobi-api-key`,
/// the environment variable named by `api_key_env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySource {
    /// `api.api_key_file`.
    pub file: Option<PathBuf>,
    /// `api.api_key_env`.
    pub env: String,
}

/// The systemd credential name of the API key.
pub const CREDENTIAL_NAME: &str = "cobi-api-key";

/// Why a secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read.
    #[error("cannot read {what} from {path}: {error}")]
    File {
        /// What the file holds.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The file or variable is empty.
    #[error("{what} from {source_desc} is empty")]
    Empty {
        /// What was expected.
        what: &'static str,
        /// Where it was looked for.
        source_desc: String,
    },
    /// Nothing provides the API key.
    #[error(
        "no API key: set api.api_key_file, provide the systemd credential `cobi-api-key` \
         (LoadCredential=cobi-api-key:/etc/cobi-sync/api-key), or export {env}"
    )]
    NoKey {
        /// The variable that was tried.
        env: String,
    },
}

impl KeySource {
    /// Reads the key now. Whitespace around it is trimmed.
    pub fn load(&self) -> Result<Secret, SecretError> {
        if let Some(path) = &self.file {
            return read_secret_file(path, "the API key");
        }
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let path = Path::new(&dir).join(CREDENTIAL_NAME);
            if path.exists() {
                return read_secret_file(&path, "the API key");
            }
        }
        match std::env::var(&self.env) {
            Ok(v) if !v.trim().is_empty() => Ok(Secret::new(v.trim())),
            Ok(_) => Err(SecretError::Empty {
                what: "the API key",
                source_desc: format!("environment variable {}", self.env),
            }),
            Err(_) => Err(SecretError::NoKey {
                env: self.env.clone(),
            }),
        }
    }

    /// Where the key is read from, for messages (never the key).
    pub fn describe(&self) -> String {
        if let Some(p) = &self.file {
            return format!("file {}", p.display());
        }
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let path = Path::new(&dir).join(CREDENTIAL_NAME);
            if path.exists() {
                return format!("systemd credential {CREDENTIAL_NAME}");
            }
        }
        format!("environment variable {}", self.env)
    }
}

/// Reads a secret file, trimming surrounding whitespace.
pub fn read_secret_file(path: &Path, what: &'static str) -> Result<Secret, SecretError> {
    let text = std::fs::read_to_string(path).map_err(|error| SecretError::File {
        what,
        path: path.to_path_buf(),
        error,
    })?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(SecretError::Empty {
            what,
            source_desc: format!("file {}", path.display()),
        });
    }
    Ok(Secret::new(trimmed))
}

/// A warning when a secret file can be read by group or others, naming the
/// file and the fix; `None` when it is private (or cannot be inspected).
pub fn permission_warning(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        Some(format!(
            "secret file {} is readable by other users (mode {:o}); fix: chmod 600 {}",
            path.display(),
            mode & 0o777,
            path.display()
        ))
    } else {
        None
    }
}

/// How readable each secret file the settings name is (the API key file,
/// the database password file): every such file that exists, with a
/// [`permission_warning`] when group or others can read it. The one place
/// that decides which files hold secrets: `run` and `snapshot` warn at
/// start, `check` reports each.
pub fn secret_file_permissions(settings: &super::Settings) -> Vec<(&Path, Option<String>)> {
    [
        settings.api.key.file.as_deref(),
        settings.source.password_file.as_deref(),
    ]
    .into_iter()
    .flatten()
    .filter(|path| path.exists())
    .map(|path| (path, permission_warning(path)))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn key_file_is_trimmed_reread_and_permissions_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-key");
        std::fs::write(&path, "  first-key\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let src = KeySource {
            file: Some(path.clone()),
            env: "COBI_TEST_UNUSED".into(),
        };
        assert_eq!(src.load().unwrap().expose(), "first-key");
        assert_eq!(permission_warning(&path), None);
        // Replaced by rename: the new content is read.
        let tmp = dir.path().join("api-key.new");
        std::fs::write(&tmp, "second-key").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(src.load().unwrap().expose(), "second-key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let w = permission_warning(&path).unwrap();
        assert!(w.contains("chmod 600") && w.contains("api-key"), "{w}");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(src.load(), Err(SecretError::Empty { .. })));
    }

    #[test]
    fn missing_env_key_explains_all_sources() {
        let src = KeySource {
            file: None,
            env: "COBI_TEST_SURELY_UNSET_VAR".into(),
        };
        let err = src.load().unwrap_err().to_string();
        assert!(err.contains("api_key_file") && err.contains("COBI_TEST_SURELY_UNSET_VAR"));
    }
}
