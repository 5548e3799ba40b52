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

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
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

mod bindir;
mod supervise;
mod template;

use supervise::*;
pub(crate) use template::DirGuard;
use template::*;

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
