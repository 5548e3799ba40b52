//! Shared test helpers: a real PostgreSQL per test, the real mock API over
//! HTTP, the real binary, and waiting on conditions with deadlines.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cobi_sync::mock_api::{MockOptions, MockServer};
use cobi_sync::pgtemp::PgTemp;

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cobi-sync")
}

/// The API key every test uses.
pub const API_KEY: &str = "test-key-5f2c9a";

/// A PostgreSQL cluster with a fresh database.
pub struct Db {
    pub pg: PgTemp,
    pub name: String,
}

impl Db {
    pub async fn start() -> Db {
        let pg = PgTemp::start().await.expect("start PostgreSQL");
        let name = pg.create_database(None).await.expect("create database");
        Db { pg, name }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        self.pg.connect(&self.name).await.expect("connect")
    }

    pub fn url(&self) -> String {
        self.pg.url(&self.name)
    }

    /// The README's least-privilege role (`cobi_sync`): `LOGIN`, plus
    /// `REPLICATION` when `replication`, `USAGE` on the schemas of `tables`
    /// and `SELECT` on `tables` — nothing else (no superuser, no
    /// `pg_read_all_stats`, no ownership). Returns its URL. In replication
    /// mode the owner creates the publication: see [`Db::publication`].
    pub async fn least_privilege_url(&self, replication: bool, tables: &[&str]) -> String {
        let mut sql = format!(
            "CREATE ROLE cobi_sync LOGIN{};",
            if replication { " REPLICATION" } else { "" }
        );
        let mut schemas = std::collections::BTreeSet::new();
        for t in tables {
            schemas.insert(match t.rsplit_once('.') {
                Some((s, _)) => s.to_string(),
                None => "public".to_string(),
            });
        }
        for s in &schemas {
            sql.push_str(&format!("GRANT USAGE ON SCHEMA {s} TO cobi_sync;"));
        }
        sql.push_str(&format!(
            "GRANT SELECT ON {} TO cobi_sync;",
            tables.join(", ")
        ));
        self.exec(&sql).await;
        self.url().replacen(
            &format!("postgres://{}@", cobi_sync::pgtemp::SUPERUSER),
            "postgres://cobi_sync@",
            1,
        )
    }

    /// Creates publication `name` for `tables` as the owner would (the
    /// statement `check` prints): a least-privilege role cannot.
    pub async fn publication(&self, name: &str, tables: &[&str]) {
        self.exec(&format!(
            "CREATE PUBLICATION {name} FOR TABLE {} WITH (publish_via_partition_root = true);",
            tables.join(", ")
        ))
        .await;
    }

    pub async fn exec(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
}

/// Starts the mock API on a free port.
pub async fn mock() -> MockServer {
    mock_with(0.0, 0.0, 0.0, Duration::ZERO).await
}

/// Starts the mock API in `--opaque-errors` mode: 207/400 answers say how
/// many records failed, never which (like the real API may).
pub async fn mock_opaque() -> MockServer {
    MockServer::start(MockOptions {
        opaque_errors: true,
        ..MockOptions::local(API_KEY)
    })
    .await
    .expect("start mock api")
}

/// Starts the mock API in `--opaque-errors` mode with faults.
pub async fn mock_opaque_with(
    fail: f64,
    throttle: f64,
    drop: f64,
    latency: Duration,
) -> MockServer {
    MockServer::start(MockOptions {
        fail_rate: fail,
        throttle_rate: throttle,
        drop_rate: drop,
        latency,
        seed: 7,
        opaque_errors: true,
        ..MockOptions::local(API_KEY)
    })
    .await
    .expect("start mock api")
}

/// Starts the mock API with faults.
pub async fn mock_with(fail: f64, throttle: f64, drop: f64, latency: Duration) -> MockServer {
    MockServer::start(MockOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        api_key: API_KEY.into(),
        fail_rate: fail,
        throttle_rate: throttle,
        drop_rate: drop,
        latency,
        seed: 7,
        opaque_errors: false,
    })
    .await
    .expect("start mock api")
}

/// A temporary directory for config, state and logs.
pub struct Workdir {
    pub dir: tempfile::TempDir,
}

impl Workdir {
    pub fn new() -> Workdir {
        Workdir {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `cobi-sync.toml` with the given body, after a header with the
    /// database, API, state dir and fast settings.
    pub fn config(&self, db_url: &str, api: &str, mode: &str, body: &str) -> PathBuf {
        let key_file = self.path("api-key");
        if !key_file.exists() {
            std::fs::write(&key_file, API_KEY).unwrap();
            set_mode(&key_file, 0o600);
        }
        let text = format!(
            r#"
[source]
url = "{db_url}"
mode = "{mode}"

[source.replication]
slot = "cobi_test"
publication = "cobi_test"

[source.poll]
schedule = "* * * * * *"
lookback = "5s"
page_size = 500

[api]
base_url = "{api}"
api_key_file = "{key}"
initial_backoff = "50ms"
max_backoff = "1s"
timeout = "5s"

[batch]
linger = "100ms"

[state]
dir = "{state}"

[http]
listen = ""

[log]
format = "text"
level = "info"

{body}
"#,
            key = key_file.display(),
            state = self.path("state").display(),
        );
        let path = self.path("cobi-sync.toml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The real daemon in a child process; its stderr goes to a log file.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(config: &Path, log: &Path) -> Daemon {
        Self::start_cmd(config, log, &["run"], &[])
    }

    pub fn start_cmd(config: &Path, log: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        // COBI_TEST_WRAP="valgrind --tool=massif …" runs the daemon under a
        // profiler (investigations only).
        let wrap = std::env::var("COBI_TEST_WRAP").unwrap_or_default();
        let mut words = wrap.split_whitespace();
        let mut cmd = match words.next() {
            Some(w) => {
                let mut c = Command::new(w);
                c.args(words).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        cmd.arg("--config")
            .arg(config)
            .args(args)
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Daemon {
            child: cmd.spawn().expect("spawn cobi-sync"),
            log: log.to_path_buf(),
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit status (deadline 20 s). Waits
    /// asynchronously, so that an in-process mock API keeps answering the
    /// requests the daemon finishes while it shuts down.
    pub async fn term(&mut self) -> std::process::ExitStatus {
        self.term_timed().await.0
    }

    /// [`Daemon::term`], also returning how long the exit took.
    pub async fn term_timed(&mut self) -> (std::process::ExitStatus, Duration) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let asked = Instant::now();
        let deadline = asked + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return (s, asked.elapsed());
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!(
                    "daemon did not stop within 20 s of SIGTERM\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the daemon with its HTTP endpoint on a free port of
    /// 127.0.0.1 (log level `level`); returns it and the port once
    /// `/healthz` answers. When the port was taken meanwhile (the daemon
    /// exits naming `http.listen`), tries another.
    pub async fn start_with_http(config: &Path, log: &Path, level: &str) -> (Daemon, u16) {
        let original = std::fs::read_to_string(config).unwrap();
        for _ in 0..5 {
            let port = free_port();
            std::fs::write(config, &original).unwrap();
            with_http(config, port, level);
            let mut d = Daemon::start(config, log);
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if !d.is_running() {
                    let text = d.log_text();
                    if text.contains("http.listen") && text.contains(&port.to_string()) {
                        break; // taken meanwhile: another port
                    }
                    panic!("the daemon exited at start\n{text}");
                }
                if reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
                    .await
                    .is_ok()
                {
                    return (d, port);
                }
                if Instant::now() > deadline {
                    panic!("no /healthz on port {port} after 60 s\n{}", d.log_text());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("could not start the daemon's HTTP endpoint on 5 ports in a row")
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `f` returns true, polling every 100 ms, or panics with
/// `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Records that part or all of the current test could not run here: prints
/// `SKIPPED: <test>: <why>` on the real stderr (not captured, so it shows
/// in every run) and appends the line to the file named by
/// `COBI_TEST_SKIPS` when set. `.ci/run` sets it and fails when any test
/// skipped: CI (root, every tool installed) runs everything. The caller
/// returns (or leaves out the part) right after.
pub fn skip(why: &str) {
    use std::io::Write as _;
    let test = std::thread::current()
        .name()
        .unwrap_or("(unnamed test)")
        .to_string();
    let line = format!("SKIPPED: {test}: {why}");
    let _ = writeln!(std::io::stderr().lock(), "{line}");
    if let Some(path) = std::env::var_os("COBI_TEST_SKIPS") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("COBI_TEST_SKIPS={path:?}: {e}"));
        writeln!(f, "{line}").unwrap();
    }
}

/// Runs the binary to completion; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run cobi-sync");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `cobi-sync dlq list --json` for this config: through the running
/// daemon's endpoint when it has one, else from the state dir.
pub fn dead_letters(config: &Path) -> Vec<serde_json::Value> {
    let (code, out, err) = run_cli(
        &[
            "dlq",
            "list",
            "--json",
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "dlq list: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("dlq list --json: {e}: {out}"))
}

/// Lines of a log file containing `needle`.
pub fn log_lines(path: &Path, needle: &str) -> Vec<String> {
    let Ok(f) = std::fs::File::open(path) else {
        return vec![];
    };
    BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter(|l| l.contains(needle))
        .collect()
}

/// A TCP port free on 127.0.0.1 right now, and not handed out before by
/// this process. Ports come from below the kernel's ephemeral range
/// (32768+), where port-0 binds and outgoing connections of every test
/// (and of other processes on the machine) take theirs, starting at an
/// offset derived from the process id, so concurrent test processes
/// rarely meet. A process that binds it later can still lose a race with
/// another program: [`Daemon::start_with_http`] retries on "address in
/// use".
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() * 97) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free TCP port on 127.0.0.1 between {LOW} and {}",
        LOW + SPAN
    )
}

/// Turns on the config's HTTP endpoint on `port`, with log level `level`.
pub fn with_http(cfg: &std::path::Path, port: u16, level: &str) {
    let text = std::fs::read_to_string(cfg)
        .unwrap()
        .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""))
        .replace("level = \"info\"", &format!("level = \"{level}\""));
    std::fs::write(cfg, text).unwrap();
}
