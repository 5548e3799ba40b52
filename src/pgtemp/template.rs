//! Cluster directories: the temporary base, the `initdb` template kept per server
//! build, copies of it, and sweeping what dead processes left behind.

use super::*;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub(super) fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}-{:08x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}

/// Every ancestor of `dir` is searchable by other users.
pub(super) fn world_searchable(dir: &Path) -> bool {
    let Ok(dir) = fs::canonicalize(dir) else {
        return false;
    };
    dir.ancestors().all(|a| {
        fs::metadata(a)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    })
}

/// `/dev/shm` is a writable tmpfs with at least 1 GiB free.
#[cfg(target_os = "linux")]
pub(super) fn shm_usable() -> bool {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    let path = c"/dev/shm";
    // SAFETY: statfs/access only read the NUL-terminated path and fill `st`.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::statfs(path.as_ptr(), &mut st) != 0 {
            return false;
        }
        let free = (st.f_bavail as u64).saturating_mul(st.f_bsize as u64);
        st.f_type as u64 == TMPFS_MAGIC
            && free >= 1 << 30
            && libc::access(path.as_ptr(), libc::W_OK | libc::X_OK) == 0
    }
}

#[cfg(not(target_os = "linux"))]
pub(super) fn shm_usable() -> bool {
    false
}

/// The directory the clusters and the template live in: `$COBI_SYNC_PGTEMP_DIR`;
/// else `/dev/shm` when `TMPDIR` is unset and it is a roomy tmpfs (file creation on a
/// disk file system makes copying the ~1000-file template several times slower);
/// else [`std::env::temp_dir`], or `/tmp` if that is unusable (too long for a socket
/// path, or not searchable by the `postgres` user when running as root).
pub(super) fn temp_base(owner: Option<Owner>) -> PathBuf {
    if let Some(dir) = std::env::var_os(DIR_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if std::env::var_os("TMPDIR").is_none() && shm_usable() {
        return PathBuf::from("/dev/shm");
    }
    let base = std::env::temp_dir();
    let too_long = base.as_os_str().len() > MAX_SOCKET_DIR_LEN - 40;
    if too_long || (owner.is_some() && !world_searchable(&base)) {
        PathBuf::from("/tmp")
    } else {
        base
    }
}

/// Creates `path` (which must not exist) with mode 0700, owned by `owner`.
pub(super) fn create_private_dir(path: &Path, owner: Option<Owner>) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o700).create(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
    chown_to(path, owner)
}

pub(super) fn write_owned(path: &Path, contents: &str, owner: Option<Owner>) -> io::Result<()> {
    fs::write(path, contents)?;
    chown_to(path, owner)
}

/// Best-effort recursive removal that tolerates files vanishing or appearing.
pub(super) fn remove_tree(path: &Path) {
    for _ in 0..5 {
        match fs::remove_dir_all(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::debug!(path = %path.display(), error = %e, "pgtemp: retrying removal");
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => return,
        }
    }
}

/// Moves `path` out of the way atomically, then deletes it.
pub(super) fn discard(path: &Path) {
    let Some(parent) = path.parent() else { return };
    let trash = parent.join(format!("{DIR_PREFIX}stale-{}", unique_suffix()));
    match fs::rename(path, &trash) {
        Ok(()) => remove_tree(&trash),
        Err(_) => remove_tree(path),
    }
}

/// Removes, once per process, directories left behind by processes that are gone
/// (killed tests): `cobi-sync-pgtemp-<pid>-…`, `…-staging-<pid>-…`, `…-stale-<pid>-…`.
pub(super) fn sweep_stale(base: &Path) {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(|| {
        let me = std::process::id();
        for entry in fs::read_dir(base).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
                continue;
            };
            let rest = rest
                .strip_prefix("staging-")
                .or_else(|| rest.strip_prefix("stale-"))
                .unwrap_or(rest);
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue; // templates, foreign names
            };
            if pid == me || pid_alive(pid as i32) {
                continue;
            }
            let path = entry.path();
            let postmaster = fs::read_to_string(path.join("data").join("postmaster.pid"))
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
            if postmaster.is_some_and(pid_alive) {
                continue;
            }
            tracing::debug!(path = %path.display(), "pgtemp: removing leftover directory");
            remove_tree(&path);
        }
    });
}

/// What a template data directory holds; a copy must match it exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(super) struct Manifest {
    files: u64,
    bytes: u64,
}

impl Manifest {
    fn render(&self) -> String {
        format!("files={}\nbytes={}\n", self.files, self.bytes)
    }

    fn parse(s: &str) -> Option<Manifest> {
        let mut m = Manifest::default();
        let (mut files, mut bytes) = (false, false);
        for line in s.lines() {
            match line.split_once('=') {
                Some(("files", v)) => (m.files, files) = (v.parse().ok()?, true),
                Some(("bytes", v)) => (m.bytes, bytes) = (v.parse().ok()?, true),
                _ => {}
            }
        }
        (files && bytes).then_some(m)
    }

    fn read(template: &Path) -> Option<Manifest> {
        let m = Manifest::parse(&fs::read_to_string(template.join(MARKER)).ok()?)?;
        template
            .join("data")
            .join("PG_VERSION")
            .is_file()
            .then_some(m)
    }
}

/// Copies the directory tree `src` to `dst` (which must not exist), keeping modes,
/// with everything owned by `owner`.
pub(super) fn copy_tree(src: &Path, dst: &Path, owner: Option<Owner>) -> io::Result<Manifest> {
    let mut manifest = Manifest::default();
    copy_tree_into(src, dst, owner, &mut manifest)?;
    Ok(manifest)
}

pub(super) fn copy_tree_into(
    src: &Path,
    dst: &Path,
    owner: Option<Owner>,
    m: &mut Manifest,
) -> io::Result<()> {
    let mode = fs::symlink_metadata(src)?.mode() & 0o7777;
    fs::DirBuilder::new().mode(mode).create(dst)?;
    fs::set_permissions(dst, fs::Permissions::from_mode(mode))?;
    chown_to(dst, owner)?;
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree_into(&from, &to, owner, m)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
            chown_to(&to, owner)?;
            m.files += 1;
        } else {
            m.bytes += fs::copy(&from, &to)?;
            chown_to(&to, owner)?;
            m.files += 1;
        }
    }
    Ok(())
}

pub(super) fn scan_tree(dir: &Path, m: &mut Manifest) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            scan_tree(&entry.path(), m)?;
        } else {
            m.files += 1;
            if !kind.is_symlink() {
                m.bytes += entry.metadata()?.len();
            }
        }
    }
    Ok(())
}

/// FNV-1a: stable across Rust releases, unlike `DefaultHasher`.
pub(super) fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.iter().chain(std::iter::once(&0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Identifies a template: layout, binaries (path, size, mtime) and owner.
pub(super) fn template_key(bindir: &Path, owner: Option<Owner>) -> String {
    let postgres = fs::canonicalize(bindir.join("postgres")).unwrap_or(bindir.join("postgres"));
    let stamp = fs::metadata(&postgres)
        .map(|m| format!("{}:{}:{}", m.len(), m.mtime(), m.mtime_nsec()))
        .unwrap_or_default();
    let uid = owner.map_or_else(current_euid, |o| o.uid);
    let h = fnv1a(&[
        TEMPLATE_LAYOUT.as_bytes(),
        postgres.as_os_str().as_encoded_bytes(),
        stamp.as_bytes(),
        uid.to_string().as_bytes(),
    ]);
    format!("{h:016x}")
}

pub(super) fn current_euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Templates known good in this process: (template dir, manifest). The mutex also
/// makes concurrent first starts in one process run `initdb` only once.
pub(super) static TEMPLATES: Mutex<Vec<(PathBuf, Manifest)>> = Mutex::new(Vec::new());

/// Returns a complete template for these binaries, building it if needed.
pub(super) fn template(
    bindir: &Path,
    owner: Option<Owner>,
    base: &Path,
) -> Result<(PathBuf, Manifest), PgTempError> {
    let dir = base.join(format!(
        "{DIR_PREFIX}template-{}",
        template_key(bindir, owner)
    ));
    let mut known = TEMPLATES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&(_, m)) = known.iter().find(|(d, _)| *d == dir) {
        if dir.join(MARKER).is_file() {
            return Ok((dir, m));
        }
        known.retain(|(d, _)| *d != dir);
    }
    let manifest = match Manifest::read(&dir) {
        Some(m) => m,
        None => build_template(bindir, owner, base, &dir)?,
    };
    known.push((dir.clone(), manifest));
    Ok((dir, manifest))
}

/// Forgets a template whose copy did not match its manifest and deletes it.
pub(super) fn invalidate_template(dir: &Path) {
    TEMPLATES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|(d, _)| d != dir);
    discard(dir);
}

pub(super) fn build_template(
    bindir: &Path,
    owner: Option<Owner>,
    base: &Path,
    dir: &Path,
) -> Result<Manifest, PgTempError> {
    let started = Instant::now();
    let staging = base.join(format!("{DIR_PREFIX}staging-{}", unique_suffix()));
    create_private_dir(&staging, owner)
        .map_err(io_err(format!("creating {}", staging.display())))?;
    let built = (|| {
        let data = staging.join("data");
        run_initdb(bindir, &data, &staging, owner)?;
        write_owned(&data.join("pg_hba.conf"), PG_HBA, owner)
            .map_err(io_err("writing pg_hba.conf"))?;
        let mut manifest = Manifest::default();
        scan_tree(&data, &mut manifest).map_err(io_err("scanning the template"))?;
        // Written last: its presence means the template is complete.
        write_owned(&staging.join(MARKER), &manifest.render(), owner)
            .map_err(io_err("writing the template marker"))?;
        Ok(manifest)
    })();
    let manifest = match built {
        Ok(m) => m,
        Err(e) => {
            remove_tree(&staging);
            return Err(e);
        }
    };
    if fs::rename(&staging, dir).is_err() {
        if let Some(theirs) = Manifest::read(dir) {
            // Another process published one first: use it.
            remove_tree(&staging);
            return Ok(theirs);
        }
        // Something incomplete is in the way (a template damaged by a tmp cleaner).
        discard(dir);
        if let Err(e) = fs::rename(&staging, dir) {
            remove_tree(&staging);
            return Err(io_err(format!("publishing the template {}", dir.display()))(e));
        }
    }
    tracing::debug!(template = %dir.display(), elapsed = ?started.elapsed(), "pgtemp: initdb template built");
    Ok(manifest)
}

pub(super) fn run_initdb(
    bindir: &Path,
    data: &Path,
    cwd: &Path,
    owner: Option<Owner>,
) -> Result<(), PgTempError> {
    let mut cmd = Command::new(bindir.join("initdb"));
    cmd.arg("-D")
        .arg(data)
        .args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    prepare_command(&mut cmd, owner, cwd);
    let out = spawn_supervised(cmd)
        .and_then(Child::wait_with_output)
        .map_err(io_err(format!(
            "running {}",
            bindir.join("initdb").display()
        )))?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stdout));
        return Err(PgTempError::InitDb {
            status: out.status.to_string(),
            stderr: text.trim().to_owned(),
        });
    }
    Ok(())
}

/// Escapes a value for a single-quoted `postgresql.conf` string.
pub(super) fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// Removes a directory on drop unless [`keep`](DirGuard::keep) was called: a cluster
/// directory prepared on a blocking thread for a `start` future that was cancelled
/// meanwhile is dropped with the task's output, and so removed.
pub(crate) struct DirGuard(Option<PathBuf>);

impl DirGuard {
    /// Guards `dir`: it is removed when the guard drops.
    pub(crate) fn new(dir: PathBuf) -> DirGuard {
        DirGuard(Some(dir))
    }

    /// The guarded directory.
    pub(crate) fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }

    pub(crate) fn keep(mut self) -> PathBuf {
        self.0.take().unwrap_or_default()
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            remove_tree(&dir);
        }
    }
}

/// Creates the cluster directory from the template. Returns the guarded root.
pub(super) fn prepare_cluster(
    bindir: &Path,
    owner: Option<Owner>,
    extra_conf: &[String],
) -> Result<DirGuard, PgTempError> {
    let base = temp_base(owner);
    sweep_stale(&base);
    let mut root = base.join(format!("{DIR_PREFIX}{}", unique_suffix()));
    let mut tries = 0;
    while let Err(e) = create_private_dir(&root, owner) {
        tries += 1;
        if e.kind() != io::ErrorKind::AlreadyExists || tries > 5 {
            return Err(io_err(format!("creating {}", root.display()))(e));
        }
        root = base.join(format!("{DIR_PREFIX}{}", unique_suffix()));
    }
    let data = root.join("data");
    let filled = (|| {
        for attempt in 0.. {
            let (tpl, expected) = template(bindir, owner, &base)?;
            let copied = copy_tree(&tpl.join("data"), &data, owner);
            match copied {
                Ok(m) if m == expected => break,
                Ok(_) | Err(_) if attempt == 0 => {
                    tracing::debug!(template = %tpl.display(), "pgtemp: template damaged, rebuilding");
                    invalidate_template(&tpl);
                    remove_tree(&data);
                }
                Ok(m) => {
                    return Err(io_err("copying the template")(io::Error::other(format!(
                        "copy has {m:?}, template marker says {expected:?}"
                    ))))
                }
                Err(e) => return Err(io_err(format!("copying {}", tpl.display()))(e)),
            }
        }
        let mut conf = format!(
            "\n# ---- cobi-sync pgtemp ----\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = {}\n\
             wal_level = logical\n\
             max_replication_slots = 20\n\
             max_wal_senders = 20\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             shared_buffers = 128MB\n\
             max_connections = 100\n\
             logging_collector = off\n\
             log_destination = 'stderr'\n\
             lc_messages = 'C'\n\
             dynamic_shared_memory_type = mmap\n",
            conf_quote(&root.to_string_lossy())
        );
        if !extra_conf.is_empty() {
            conf.push_str("# ---- extra ----\n");
            for line in extra_conf {
                conf.push_str(line);
                conf.push('\n');
            }
        }
        OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .map_err(io_err("writing postgresql.conf"))
    })();
    let guard = DirGuard(Some(root));
    filled.map(|()| guard)
}

/// A port that was free a moment ago on 127.0.0.1.
pub(super) fn free_port() -> Result<u16, PgTempError> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io_err("finding a free TCP port on 127.0.0.1"))
}

pub(super) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub(super) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PgTempError> + Send + 'static,
) -> Result<T, PgTempError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io_err("pgtemp background task")(io::Error::other(e.to_string())))?
}

/// How one attempt to run the postmaster ended badly.
pub(super) enum LaunchError {
    /// The TCP port was taken: worth another try, on another port if allowed.
    PortInUse(PgTempError),
    Fatal(PgTempError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trips() {
        let m = Manifest {
            files: 12,
            bytes: 3456,
        };
        assert_eq!(Manifest::parse(&m.render()), Some(m));
        assert_eq!(Manifest::parse("files=1\n"), None);
    }
}
