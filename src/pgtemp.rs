//! Throwaway PostgreSQL clusters, for the integration tests and for `cobi-sync demo`.
//!
//! # Contract
//!
//! * [`PgTemp::start`] creates a private cluster in a fresh directory
//!   `cobi-sync-pgtemp-<pid>-<n>-<random>/` under the temporary directory, starts a
//!   `postgres` server for it on a free TCP port of `127.0.0.1` and returns once the
//!   server accepts connections (at most 30 s). The server is configured for logical
//!   replication (`wal_level = logical`, 20 slots, 20 WAL senders) and for speed rather
//!   than durability (`fsync`, `synchronous_commit` and `full_page_writes` off).
//!   Superuser `postgres`, `trust` authentication for local and `127.0.0.1`/`::1`
//!   connections (including replication), no password, no TLS.
//! * The temporary directory is `$COBI_SYNC_PGTEMP_DIR` if set; else `/dev/shm` if
//!   `TMPDIR` is unset and `/dev/shm` is a tmpfs with at least 1 GiB free (creating
//!   files is slow on some disk file systems: a cached start takes ~0.2 s there against
//!   ~1 s on ext4 in a VM); else [`std::env::temp_dir`]. In the `/dev/shm` case the
//!   clusters live in RAM, so a test that writes gigabytes should set `COBI_SYNC_PGTEMP_DIR` or `TMPDIR`.
//! * The server binaries are found by [`PgTemp::find_bindir`]. Nothing is installed and
//!   no system cluster is touched.
//! * When the calling process runs as root, the cluster is owned by, and every server
//!   process runs as, the `postgres` OS user (`initdb` refuses to run as root). That
//!   user must be able to reach the temporary directory; if `$TMPDIR` is not
//!   world-searchable (or too long for a Unix socket path), `/tmp` is used instead.
//! * `initdb` runs at most once per server build: its result is kept as a template
//!   (`cobi-sync-pgtemp-template-<key>/` in the same temporary directory, keyed by the
//!   binaries and the owner) and each new cluster is a copy of it. The template is
//!   published by an atomic `rename` after a `COMPLETE` marker with its file count has
//!   been written, so concurrent processes never see half of one; a template whose copy
//!   does not match its marker is discarded and rebuilt.
//! * The server is a direct child of this process (no `pg_ctl`, no daemonizing), in its
//!   own process group, and it is started with `PR_SET_PDEATHSIG = SIGKILL` from a
//!   spawner thread that lives as long as the process: if the process dies without
//!   running destructors (SIGKILL, `abort`, `std::process::exit`, a `static` cluster),
//!   the kernel kills the postmaster, whose backends then exit on their own. Only the
//!   directory is left behind in that case; it is removed by the next process that
//!   starts a cluster (directories whose owning process is gone are swept once per
//!   process).
//! * Dropping a [`PgTemp`] (also while unwinding from a panic) shuts the server down in
//!   immediate mode (SIGQUIT, then SIGKILL to its process group after 5 s), reaps it
//!   and removes the directory. `Drop` never panics; it blocks the current thread for
//!   the few milliseconds the shutdown takes.
//! * Dynamic shared memory uses `mmap` files in the data directory, so even a killed
//!   server leaves nothing behind in `/dev/shm` outside its directory.
//! * The server writes its log to `postgres.log` in the data directory; nothing is
//!   printed on this process's stdout or stderr ([`tracing`] `debug` events only).
//! * All `async` functions need a Tokio runtime (either flavour).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

/// Environment variable naming the directory that holds `initdb` and `postgres`;
/// it takes precedence over every other way of finding them.
pub const BINDIR_ENV: &str = "COBI_SYNC_PG_BINDIR";

/// Environment variable naming the directory to create clusters (and the `initdb`
/// template) in, overriding the default choice (see the module documentation). When
/// running as root it must be searchable by the `postgres` user.
pub const DIR_ENV: &str = "COBI_SYNC_PGTEMP_DIR";

/// Name of the superuser of every cluster.
pub const SUPERUSER: &str = "postgres";

const DIR_PREFIX: &str = "cobi-sync-pgtemp-";
/// Bumped whenever the template layout or the `initdb` options change.
const TEMPLATE_LAYOUT: &str = "layout-1";
const MARKER: &str = "COMPLETE";
const LOG_FILE: &str = "postgres.log";
const START_DEADLINE: Duration = Duration::from_secs(30);
const FAST_STOP_DEADLINE: Duration = Duration::from_secs(20);
const IMMEDIATE_STOP_DEADLINE: Duration = Duration::from_secs(5);
const PORT_ATTEMPTS: usize = 5;
/// Longest socket directory that leaves room for `/.s.PGSQL.65535.lock` in `sun_path`.
const MAX_SOCKET_DIR_LEN: usize = 80;

const PG_HBA: &str = "\
# cobi-sync pgtemp: throwaway cluster, trust everything local
local   all          all                 trust
host    all          all  127.0.0.1/32   trust
host    all          all  ::1/128        trust
local   replication  all                 trust
host    replication  all  127.0.0.1/32   trust
host    replication  all  ::1/128        trust
";

/// Errors of [`PgTemp`].
#[derive(Debug, thiserror::Error)]
pub enum PgTempError {
    /// No PostgreSQL server binaries were found.
    #[error(
        "PostgreSQL server binaries (initdb, postgres) not found; searched: {searched}. \
         Install them (Debian/Ubuntu: `apt-get install postgresql`) or set \
         COBI_SYNC_PG_BINDIR to the directory that holds `initdb` and `postgres` \
         (for example /usr/lib/postgresql/15/bin)"
    )]
    NoBinaries {
        /// What was looked at, in order.
        searched: String,
    },
    /// Running as root, but there is no `postgres` OS user to own the cluster.
    #[error(
        "running as root, but there is no `postgres` OS user to run the server as \
         (initdb refuses to run as root); install the Debian package `postgresql`, \
         which creates it, or run as an unprivileged user"
    )]
    NoPostgresUser,
    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `initdb` failed.
    #[error("initdb failed ({status}): {stderr}")]
    InitDb {
        /// Its exit status.
        status: String,
        /// What it printed on stdout and stderr.
        stderr: String,
    },
    /// The server did not start or did not accept connections in time.
    #[error("PostgreSQL server did not start: {reason}\n--- server log (tail) ---\n{log_tail}")]
    Start {
        /// Why it is considered failed.
        reason: String,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// Connecting to the server or running SQL failed. The message includes the
    /// server's error (tokio-postgres alone would only say "db error").
    #[error("{context}: {}", sql_detail(.source))]
    Sql {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: tokio_postgres::Error,
    },
}

fn sql_detail(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> PgTempError {
    let context = context.into();
    move |source| PgTempError::Io { context, source }
}

/// `true` when this process runs with effective user id 0.
pub fn is_root() -> bool {
    current_euid() == 0
}

/// The OS user that owns a cluster and runs its processes, when it is not us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Owner {
    uid: u32,
    gid: u32,
}

/// `None` when not root (everything runs as ourselves), else the `postgres` user.
fn server_owner() -> Result<Option<Owner>, PgTempError> {
    if !is_root() {
        return Ok(None);
    }
    let name = std::ffi::CString::new(SUPERUSER).expect("no NUL in a constant");
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain old data; getpwnam_r fills it and points into `buf`,
    // which outlives every use of the result below.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            return Err(PgTempError::NoPostgresUser);
        }
        Ok(Some(Owner {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        }))
    }
}

fn chown_to(path: &Path, owner: Option<Owner>) -> io::Result<()> {
    match owner {
        Some(o) => std::os::unix::fs::lchown(path, Some(o.uid), Some(o.gid)),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------
// Finding the binaries
// ---------------------------------------------------------------------------------

fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn has_server_binaries(dir: &Path) -> bool {
    is_executable(&dir.join("initdb")) && is_executable(&dir.join("postgres"))
}

/// Sort key of a `/usr/lib/postgresql/<version>` directory name (`15`, `9.6`).
fn version_key(name: &str) -> Option<Vec<u32>> {
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

// ---------------------------------------------------------------------------------
// Spawning children that die with us
// ---------------------------------------------------------------------------------

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from a thread that never exits. `PR_SET_PDEATHSIG` fires when the
/// *thread* that forked the child exits, not the process, so forking from a Tokio
/// worker or a test thread would kill the server when that thread ends.
fn spawn_supervised(mut cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("pgtemp-spawner".to_owned())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .ok()
            .map(|_| tx)
    });
    let Some(spawner) = spawner else {
        return cmd.spawn();
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    if let Err(mpsc::SendError((mut cmd, _))) = spawner.send((cmd, reply_tx)) {
        return cmd.spawn();
    }
    reply_rx
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("pgtemp spawner thread is gone")))
}

/// Runs as `owner`, with a clean PostgreSQL environment, and dies with this process.
fn prepare_command(cmd: &mut Command, owner: Option<Owner>, cwd: &Path) {
    if let Some(o) = owner {
        cmd.uid(o.uid).gid(o.gid);
    }
    for var in [
        "PGDATA",
        "PGPORT",
        "PGHOST",
        "PGUSER",
        "PGDATABASE",
        "PGOPTIONS",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("LC_ALL", "C").current_dir(cwd).stdin(Stdio::null());
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure only makes async-signal-safe system calls and does not
        // allocate. std runs it after setgid/setuid, so the death signal is not reset
        // by the credential change.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before the death signal was armed.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
}

fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    if rc != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    // A zombie (dead, not yet reaped by whoever inherited it) counts as gone.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next()),
            Some('Z' | 'X')
        ),
        Err(_) => true,
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: plain kill(2); the child has not been reaped, so the pid is still ours.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// SIGKILL to the whole process group of the (unreaped) postmaster.
fn kill_group(child: &mut Child) {
    // SAFETY: the postmaster leads its own process group (process_group(0)) and has
    // not been reaped, so the group id cannot have been reused.
    unsafe {
        libc::killpg(child.id() as libc::pid_t, libc::SIGKILL);
    }
    let _ = child.kill();
}

/// Blocking: SIGQUIT, wait up to 5 s, SIGKILL the process group, reap.
fn shutdown_immediately(mut child: Child) {
    signal(child.id(), libc::SIGQUIT);
    let deadline = Instant::now() + IMMEDIATE_STOP_DEADLINE;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => break,
        }
    }
    kill_group(&mut child);
    let _ = child.wait();
}

// ---------------------------------------------------------------------------------
// Directories, template, copies
// ---------------------------------------------------------------------------------

fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}-{:08x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}

/// Every ancestor of `dir` is searchable by other users.
fn world_searchable(dir: &Path) -> bool {
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
fn shm_usable() -> bool {
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
fn shm_usable() -> bool {
    false
}

/// The directory the clusters and the template live in: `$COBI_SYNC_PGTEMP_DIR`;
/// else `/dev/shm` when `TMPDIR` is unset and it is a roomy tmpfs (file creation on a
/// disk file system makes copying the ~1000-file template several times slower);
/// else [`std::env::temp_dir`], or `/tmp` if that is unusable (too long for a socket
/// path, or not searchable by the `postgres` user when running as root).
fn temp_base(owner: Option<Owner>) -> PathBuf {
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
fn create_private_dir(path: &Path, owner: Option<Owner>) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o700).create(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
    chown_to(path, owner)
}

fn write_owned(path: &Path, contents: &str, owner: Option<Owner>) -> io::Result<()> {
    fs::write(path, contents)?;
    chown_to(path, owner)
}

/// Best-effort recursive removal that tolerates files vanishing or appearing.
fn remove_tree(path: &Path) {
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
fn discard(path: &Path) {
    let Some(parent) = path.parent() else { return };
    let trash = parent.join(format!("{DIR_PREFIX}stale-{}", unique_suffix()));
    match fs::rename(path, &trash) {
        Ok(()) => remove_tree(&trash),
        Err(_) => remove_tree(path),
    }
}

/// Removes, once per process, directories left behind by processes that are gone
/// (killed tests): `cobi-sync-pgtemp-<pid>-…`, `…-staging-<pid>-…`, `…-stale-<pid>-…`.
fn sweep_stale(base: &Path) {
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
struct Manifest {
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
fn copy_tree(src: &Path, dst: &Path, owner: Option<Owner>) -> io::Result<Manifest> {
    let mut manifest = Manifest::default();
    copy_tree_into(src, dst, owner, &mut manifest)?;
    Ok(manifest)
}

fn copy_tree_into(
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

fn scan_tree(dir: &Path, m: &mut Manifest) -> io::Result<()> {
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
fn fnv1a(parts: &[&[u8]]) -> u64 {
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
fn template_key(bindir: &Path, owner: Option<Owner>) -> String {
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

fn current_euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Templates known good in this process: (template dir, manifest). The mutex also
/// makes concurrent first starts in one process run `initdb` only once.
static TEMPLATES: Mutex<Vec<(PathBuf, Manifest)>> = Mutex::new(Vec::new());

/// Returns a complete template for these binaries, building it if needed.
fn template(
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
fn invalidate_template(dir: &Path) {
    TEMPLATES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|(d, _)| d != dir);
    discard(dir);
}

fn build_template(
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

fn run_initdb(
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
fn conf_quote(s: &str) -> String {
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

    fn keep(mut self) -> PathBuf {
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
fn prepare_cluster(
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
fn free_port() -> Result<u16, PgTempError> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io_err("finding a free TCP port on 127.0.0.1"))
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn percent_encode(s: &str) -> String {
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

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PgTempError> + Send + 'static,
) -> Result<T, PgTempError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io_err("pgtemp background task")(io::Error::other(e.to_string())))?
}

/// How one attempt to run the postmaster ended badly.
enum LaunchError {
    /// The TCP port was taken: worth another try, on another port if allowed.
    PortInUse(PgTempError),
    Fatal(PgTempError),
}

// ---------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------

/// A running (or [stopped](PgTemp::stop)) throwaway PostgreSQL cluster; see the
/// [module documentation](self) for the contract. Dropping it kills the server and
/// deletes its files.
#[derive(Debug)]
pub struct PgTemp {
    /// Private directory: holds `data/` and the Unix socket.
    root: PathBuf,
    data_dir: PathBuf,
    bindir: PathBuf,
    port: u16,
    owner: Option<Owner>,
    /// The postmaster, while running.
    child: Option<Child>,
}

impl PgTemp {
    /// Creates a cluster (a copy of the cached `initdb` template; the first cluster of
    /// a server build runs `initdb`), then starts it on a free port of 127.0.0.1 with
    /// `wal_level=logical`, 20 replication slots and WAL senders, durability off,
    /// `shared_buffers=128MB`, `max_connections=100`, its Unix socket in its private
    /// directory and its log in `postgres.log` in the data directory. Returns once it
    /// accepts connections (deadline 30 s). Up to 5 ports are tried if one turns out
    /// to be taken.
    pub async fn start() -> Result<PgTemp, PgTempError> {
        Self::start_with(&[]).await
    }

    /// Like [`start`](PgTemp::start), with `extra_conf` lines appended to
    /// `postgresql.conf` after the settings above (so they override them). The port is
    /// given on the command line and cannot be overridden this way.
    pub async fn start_with(extra_conf: &[&str]) -> Result<PgTemp, PgTempError> {
        Self::start_inner(extra_conf, free_port).await
    }

    async fn start_inner(
        extra_conf: &[&str],
        mut next_port: impl FnMut() -> Result<u16, PgTempError>,
    ) -> Result<PgTemp, PgTempError> {
        let started = Instant::now();
        let bindir = Self::find_bindir()?;
        let owner = server_owner()?;
        let extra: Vec<String> = extra_conf.iter().map(|s| (*s).to_owned()).collect();
        let b = bindir.clone();
        let root = blocking(move || prepare_cluster(&b, owner, &extra))
            .await?
            .keep();
        let data_dir = root.join("data");
        tracing::debug!(elapsed = ?started.elapsed(), "pgtemp: cluster directory ready");
        // From here on, Drop cleans up whatever happens.
        let mut pg = PgTemp {
            root,
            data_dir,
            bindir,
            port: 0,
            owner,
            child: None,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            pg.port = next_port()?;
            match pg.launch().await {
                Ok(()) => break,
                Err(LaunchError::PortInUse(e)) if attempt >= PORT_ATTEMPTS => return Err(e),
                Err(LaunchError::PortInUse(_)) => {
                    tracing::debug!(port = pg.port, "pgtemp: port taken, trying another");
                }
                Err(LaunchError::Fatal(e)) => return Err(e),
            }
        }
        tracing::debug!(port = pg.port, dir = %pg.root.display(), elapsed = ?started.elapsed(), "pgtemp: cluster started");
        Ok(pg)
    }

    /// Starts the postmaster on `self.port` and waits until it accepts connections.
    async fn launch(&mut self) -> Result<(), LaunchError> {
        let fatal = LaunchError::Fatal;
        let log_path = self.log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| fatal(io_err(format!("opening {}", log_path.display()))(e)))?;
        let _ = chown_to(&log_path, self.owner);
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log_err = log
            .try_clone()
            .map_err(|e| fatal(io_err("duplicating the log file handle")(e)))?;

        let mut cmd = Command::new(self.bindir.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        prepare_command(&mut cmd, self.owner, &self.root);
        let child = spawn_supervised(cmd).map_err(|e| {
            fatal(io_err(format!(
                "starting {}",
                self.bindir.join("postgres").display()
            ))(e))
        })?;
        self.child = Some(child);

        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let exited = match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Ok(None)) => None,
                Some(Err(e)) => Some(format!("cannot wait for it: {e}")),
                None => Some("gone".to_owned()),
            };
            if let Some(status) = exited {
                self.child = None;
                let this_run = self.log_since(log_start);
                let err = PgTempError::Start {
                    reason: format!("postgres exited ({status}) on port {}", self.port),
                    log_tail: self.log_tail(30),
                };
                return Err(
                    if this_run.contains("Address already in use")
                        || this_run.contains("could not create any TCP/IP sockets")
                    {
                        LaunchError::PortInUse(err)
                    } else {
                        LaunchError::Fatal(err)
                    },
                );
            }
            // Through our own socket directory, so a foreign server that holds the
            // same TCP port cannot be mistaken for ours. The postmaster creates its
            // Unix socket after binding TCP, so this also proves the TCP port is ours.
            let ready = tokio_postgres::Config::new()
                .host_path(&self.root)
                .port(self.port)
                .user(SUPERUSER)
                .dbname("postgres")
                .connect_timeout(Duration::from_secs(2))
                .connect(NoTls)
                .await
                .is_ok();
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                if let Some(child) = self.child.take() {
                    shutdown_immediately(child);
                }
                return Err(fatal(PgTempError::Start {
                    reason: format!(
                        "not accepting connections on port {} after {} s",
                        self.port,
                        START_DEADLINE.as_secs()
                    ),
                    log_tail: self.log_tail(30),
                }));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The TCP port on 127.0.0.1 (stays the same across [`stop`](PgTemp::stop) and
    /// [`start_again`](PgTemp::start_again)).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// libpq URL for `db` as superuser `postgres`:
    /// `postgres://postgres@127.0.0.1:PORT/DB` (the name percent-encoded).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@127.0.0.1:{}/{}",
            self.port,
            percent_encode(db)
        )
    }

    /// The data directory (`PGDATA`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory of the server binaries in use (for `pg_recvlogical`, `psql`, …).
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// The directory holding the server's Unix socket (usable as `host=`).
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// `true` while the server process runs (between start and [`stop`](PgTemp::stop)).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// Process id of the postmaster, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Creates a database named `name`, or a fresh unique name when `None`, and returns
    /// the name.
    pub async fn create_database(&self, name: Option<&str>) -> Result<String, PgTempError> {
        let name = match name {
            Some(n) => n.to_owned(),
            None => format!("pgtemp_{}", unique_suffix().replace('-', "_")),
        };
        let client = self.connect("postgres").await?;
        client
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))
            .await
            .map_err(|source| PgTempError::Sql {
                context: format!("creating database {name}"),
                source,
            })?;
        Ok(name)
    }

    /// Connects to `db` over TCP as superuser `postgres`, driving the connection on a
    /// spawned Tokio task (it ends when the client is dropped). For test setup SQL.
    pub async fn connect(&self, db: &str) -> Result<tokio_postgres::Client, PgTempError> {
        let (client, connection) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user(SUPERUSER)
            .dbname(db)
            .connect_timeout(Duration::from_secs(10))
            .connect(NoTls)
            .await
            .map_err(|source| PgTempError::Sql {
                context: format!("connecting to {}", self.url(db)),
                source,
            })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "pgtemp: connection ended with an error");
            }
        });
        Ok(client)
    }

    /// Stops the server with a fast shutdown (SIGINT: open sessions are disconnected),
    /// keeping the data directory. Falls back to an immediate shutdown after 20 s and
    /// to SIGKILL after 5 more. A no-op when it is not running.
    pub async fn stop(&mut self) -> Result<(), PgTempError> {
        // The child stays in `self` while waiting, so a cancelled `stop` leaves it to
        // `Drop` instead of orphaning it.
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        for (sig, wait) in [
            (libc::SIGINT, FAST_STOP_DEADLINE),
            (libc::SIGQUIT, IMMEDIATE_STOP_DEADLINE),
        ] {
            signal(pid, sig);
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                if !self.is_running() {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tracing::debug!(signal = sig, "pgtemp: postgres did not stop in time");
        }
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        kill_group(&mut child);
        blocking(move || child.wait().map(drop).map_err(io_err("reaping postgres"))).await
    }

    /// Starts the server again after [`stop`](PgTemp::stop), on the same port and with
    /// the same data. A no-op when it is running. Retries for a few seconds if the
    /// port is momentarily taken.
    pub async fn start_again(&mut self) -> Result<(), PgTempError> {
        if self.is_running() {
            return Ok(());
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.launch().await {
                Ok(()) => return Ok(()),
                Err(LaunchError::PortInUse(e)) if attempt >= PORT_ATTEMPTS => return Err(e),
                Err(LaunchError::PortInUse(_)) => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                Err(LaunchError::Fatal(e)) => return Err(e),
            }
        }
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.join(LOG_FILE)
    }

    fn log_since(&self, offset: u64) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(self.log_path()) {
            let _ = f.seek(SeekFrom::Start(offset));
            let _ = f.take(1 << 20).read_to_string(&mut text);
        }
        text
    }

    /// The last `lines` lines of the server log (empty if there is none yet).
    pub fn log_tail(&self, lines: usize) -> String {
        const WINDOW: u64 = 64 * 1024;
        let Ok(mut f) = File::open(self.log_path()) else {
            return String::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(WINDOW)));
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for PgTemp {
    /// Immediate shutdown (SIGQUIT, SIGKILL to the process group after 5 s), then
    /// removal of the cluster directory. Never panics.
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            shutdown_immediately(child);
        }
        remove_tree(&self.root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_and_urls() {
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(conf_quote("/tmp/it's"), "'/tmp/it''s'");
        assert_eq!(percent_encode("db_1-x"), "db_1-x");
        assert_eq!(percent_encode("a b/é"), "a%20b%2F%C3%A9");
    }

    #[test]
    fn version_dirs_sort_numerically() {
        let mut v = [version_key("9.6"), version_key("15"), version_key("10")];
        v.sort();
        assert_eq!(v.last().unwrap(), &Some(vec![15]));
        assert_eq!(version_key("15beta"), None);
    }

    #[test]
    fn manifest_round_trips() {
        let m = Manifest {
            files: 12,
            bytes: 3456,
        };
        assert_eq!(Manifest::parse(&m.render()), Some(m));
        assert_eq!(Manifest::parse("files=1\n"), None);
    }

    /// A taken port makes the start move on to another one.
    #[tokio::test]
    async fn retries_when_the_port_is_taken() {
        let busy = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let busy_port = busy.local_addr().unwrap().port();
        let mut ports = vec![busy_port];
        let pg = PgTemp::start_inner(&[], move || match ports.pop() {
            Some(p) => Ok(p),
            None => free_port(),
        })
        .await
        .unwrap();
        assert_ne!(pg.port(), busy_port);
        pg.connect("postgres").await.unwrap();
    }
}
