//! End-to-end benchmark: cobi-sync against the reference paths, side by side.
//!
//! `cargo bench --bench e2e` (release). Given only the PostgreSQL server
//! binaries (found like `cobi-sync demo` finds them, or
//! `COBI_SYNC_PG_BINDIR`), it starts a throwaway cluster, generates a
//! 10-column `purchase` table and a small `merchant` table, and measures:
//!
//! | path | what |
//! | --- | --- |
//! | COPY binary / text → /dev/null | the read ceiling (tokio-postgres `copy_out`, in process, median of 3) |
//! | mock-api ingest | the in-process mock taking 5000-record bodies from 2 tasks |
//! | cobi-sync snapshot | `cobi-sync snapshot` (poll mode, release binary) → `cobi-sync mock-api` in its own process; wall time, peak RSS (`VmHWM` every 10 ms) |
//! | cobi-sync run, poll mode, first read | `cobi-sync run` in poll mode from an empty state on the same table (no index on its cursor `modified_at`), until the mock holds every row; daemon CPU per row |
//! | Python peer snapshot | `support/peer_snapshot.py` (psycopg2 server-side cursor → JSON → POST 5000) → the same kind of mock |
//! | pg_recvlogical | drains a pgoutput slot over N inserted rows to /dev/null (`--endpos`; median of 3 slots over the same changes) |
//! | cobi-sync replication drain | `cobi-sync run` (stopped while the N rows are inserted) started on the filled slot, until the mock holds N |
//! | Python peer CDC | `support/peer_cdc.py` (psycopg2 logical replication, pgoutput parsed in Python) draining the same changes |
//! | latency | the daemon streaming (`linger = "100ms"`) to an in-harness receiver that timestamps each record; 1 000 single-row commits/s with `synchronous_commit = on` |
//! | idle | the daemon's CPU time over an idle period after the latency phase |
//!
//! Then the partner-shaped dataset ([`support::partner`]): shops → branches
//! (integer keys) → offers, customers (UUID keys) → transactions (UUID
//! keys), ~1 M records, REPLICA IDENTITY FULL, default mapping options,
//! replication mode: COPY binary of the 5 tables, the initial sync (median
//! of `COBI_BENCH_RUNS`), a streaming burst in 10 000-row transactions
//! against `pg_recvlogical` and the commit rate, latency at 1 000
//! single-row commits/s and at 5 000 rows/s in 10-row transactions,
//! re-syncs of the unchanged dataset, and a 5 M-record sync for the RSS and
//! state points. Every daemon row reports rows/s, its ratio to the
//! reference, daemon CPU µs per record (`/proc/PID/stat`), peak RSS and
//! state dir bytes per tracked record.
//!
//! Environment:
//! - `COBI_BENCH_ROWS` (default 1 000 000; 100 000 with `COBI_BENCH_QUICK=1`)
//! - `COBI_BENCH_BIG_ROWS` (default 5 000 000, 0 with `COBI_BENCH_QUICK=1`;
//!   `0` skips the second RSS point)
//! - `COBI_BENCH_QUICK=1`: smoke run (100 000 rows, 5 s latency and idle phases)
//! - `COBI_BENCH_LATENCY_SECS`, `COBI_BENCH_IDLE_SECS`, `COBI_BENCH_RATE` (rows/s, default 1000)
//! - `COBI_BENCH_PYTHON=0`: skip the Python peers
//! - `COBI_BENCH_BIN`: use this cobi-sync binary instead of building `target/release/cobi-sync`
//! - `COBI_BENCH_LOG_LEVEL`: the daemon's log level (default `warn`)
//! - `COBI_BENCH_RUNS` (default 3, 1 with `COBI_BENCH_QUICK=1`): runs of the
//!   1M-row cobi-sync and Python snapshots and of the partner initial sync;
//!   the median run is reported
//! - `COBI_BENCH_DATASETS` (default `integer,partner`): which datasets run
//! - `COBI_BENCH_PERF_DIR`: profile the daemon during each partner sync and
//!   the burst with `perf record -e cpu-clock --call-graph dwarf` into
//!   `<dir>/<phase>.perf` (read with `perf report -i`);
//!   `COBI_BENCH_PERF_EVENT` records another event (`page-faults`: where
//!   the daemon first touches its resident memory)
//! - `COBI_BENCH_PARTNER_ROWS` (default 1 010 000; 101 000 quick),
//!   `COBI_BENCH_PARTNER_BIG_ROWS` (default 5 000 000; 0 quick skips it),
//!   `COBI_BENCH_BURST` (default 300 000; 30 000 quick), `COBI_BENCH_BURST_TX`
//!   (rows per transaction, default 10 000), `COBI_BENCH_RESYNCS` (default 3;
//!   1 quick)
//!
//! Prints one table and writes it as Markdown to `target/bench-e2e.md`.
//! Logs and configs of the run are kept in `target/bench-e2e/`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio_postgres::Client;

use cobi_sync::mock_api::{MockOptions, MockServer, MockStats};
use cobi_sync::pgtemp::PgTemp;
use support::proc::{log_tail, Proc};
use support::purchase::MAPPINGS;
use support::receiver::Receiver;
use support::report::{median, percentile, Report, Row, Target};

const API_KEY: &str = "bench-key-3c1f";
const NAMESPACE: &str = "9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d";
const MERCHANTS: u64 = 1000;
const PUBLICATION: &str = "cobi_bench";

// ---------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Opts {
    quick: bool,
    rows: u64,
    big_rows: u64,
    latency_secs: u64,
    idle_secs: u64,
    rate: u64,
    python: bool,
    log_level: String,
    runs: usize,
    /// Which datasets run: the integer-key `purchase` table, the partner shape.
    integer: bool,
    partner: bool,
    partner_rows: u64,
    partner_big_rows: u64,
    burst: u64,
    burst_tx: u64,
    resyncs: usize,
}

fn env_u64(name: &str) -> Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) => {
            let clean: String = v.chars().filter(|c| *c != '_' && *c != ' ').collect();
            clean
                .parse()
                .map(Some)
                .map_err(|_| anyhow!("{name}={v:?}: expected a whole number"))
        }
        Err(_) => Ok(None),
    }
}

impl Opts {
    fn from_env() -> Result<Opts> {
        let quick = std::env::var("COBI_BENCH_QUICK").is_ok_and(|v| v != "0" && !v.is_empty());
        let rows = env_u64("COBI_BENCH_ROWS")?.unwrap_or(if quick { 100_000 } else { 1_000_000 });
        let datasets: Vec<String> = std::env::var("COBI_BENCH_DATASETS")
            .unwrap_or_else(|_| "integer,partner".into())
            .split(',')
            .map(|d| d.trim().to_string())
            .collect();
        if let Some(bad) = datasets
            .iter()
            .find(|d| !["integer", "partner"].contains(&d.as_str()))
        {
            bail!("COBI_BENCH_DATASETS: unknown dataset {bad:?} (write integer, partner or both)");
        }
        if rows < 10 {
            bail!("COBI_BENCH_ROWS must be at least 10");
        }
        Ok(Opts {
            quick,
            rows,
            big_rows: env_u64("COBI_BENCH_BIG_ROWS")?.unwrap_or(if quick { 0 } else { 5_000_000 }),
            latency_secs: env_u64("COBI_BENCH_LATENCY_SECS")?.unwrap_or(if quick { 5 } else { 20 }),
            idle_secs: env_u64("COBI_BENCH_IDLE_SECS")?.unwrap_or(if quick { 5 } else { 20 }),
            rate: env_u64("COBI_BENCH_RATE")?.unwrap_or(1000).max(1),
            python: std::env::var("COBI_BENCH_PYTHON").map_or(true, |v| v != "0"),
            log_level: std::env::var("COBI_BENCH_LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
            runs: env_u64("COBI_BENCH_RUNS")?
                .unwrap_or(if quick { 1 } else { 3 })
                .max(1) as usize,
            integer: datasets.iter().any(|d| d == "integer"),
            partner: datasets.iter().any(|d| d == "partner"),
            partner_rows: env_u64("COBI_BENCH_PARTNER_ROWS")?
                .unwrap_or(if quick { 101_000 } else { 1_010_000 })
                .max(100),
            partner_big_rows: env_u64("COBI_BENCH_PARTNER_BIG_ROWS")?.unwrap_or(if quick {
                0
            } else {
                5_000_000
            }),
            burst: env_u64("COBI_BENCH_BURST")?
                .unwrap_or(if quick { 30_000 } else { 300_000 })
                .max(1),
            burst_tx: env_u64("COBI_BENCH_BURST_TX")?.unwrap_or(10_000).max(1),
            resyncs: env_u64("COBI_BENCH_RESYNCS")?.unwrap_or(if quick { 1 } else { 3 }) as usize,
        })
    }
}

// ---------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------

fn main() {
    // `cargo bench` passes `--bench`; a filter argument that is not ours means
    // another bench was selected by name, so there is nothing to do.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("e2e: bench");
        return;
    }
    let opts = match Opts::from_env() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("e2e bench: {e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // Children are spawned from this (main) thread's top-level future, so
    // their PR_SET_PDEATHSIG fires only when the harness itself ends.
    let code = rt.block_on(async {
        match run(opts).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("\ne2e bench failed: {e:#}");
                1
            }
        }
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
}

// ---------------------------------------------------------------------------------
// The environment of a run
// ---------------------------------------------------------------------------------

/// What a daemon config differs in.
#[derive(Clone, Copy)]
struct Cfg<'a> {
    name: &'a str,
    db: &'a str,
    api: &'a str,
    mode: &'a str,
    snapshot: &'a str,
    slot: &'a str,
    linger: &'a str,
    publication: &'a str,
    mappings: &'a str,
}

struct Env {
    opts: Opts,
    bin: PathBuf,
    target_dir: PathBuf,
    work: PathBuf,
    pg: PgTemp,
    key_file: PathBuf,
    python: Result<PathBuf, String>,
}

impl Env {
    fn path(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    /// Writes `<name>.toml` for the integer-key `purchase` mappings (with a
    /// fresh state dir `<name>-state/`).
    #[allow(clippy::too_many_arguments)]
    fn config(
        &self,
        name: &str,
        db: &str,
        api: &str,
        mode: &str,
        snapshot: &str,
        slot: &str,
        linger: &str,
    ) -> Result<PathBuf> {
        self.config_of(&Cfg {
            name,
            db,
            api,
            mode,
            snapshot,
            slot,
            linger,
            publication: PUBLICATION,
            mappings: MAPPINGS,
        })
    }

    /// Writes `<name>.toml` (with a fresh state dir `<name>-state/`).
    fn config_of(&self, c: &Cfg) -> Result<PathBuf> {
        let Cfg {
            name,
            db,
            api,
            mode,
            snapshot,
            slot,
            linger,
            publication,
            mappings,
        } = *c;
        let state = self.path(&format!("{name}-state"));
        let _ = std::fs::remove_dir_all(&state);
        let text = format!(
            r#"# cobi-sync e2e benchmark: {name}
[source]
url = "{url}"
mode = "{mode}"

[source.replication]
slot = "{slot}"
publication = "{publication}"
snapshot = "{snapshot}"

[api]
base_url = "{api}"
api_key_file = "{key}"
initial_backoff = "50ms"
max_backoff = "2s"

[batch]
linger = "{linger}"

[state]
dir = "{state}"

[http]
listen = ""

[log]
format = "text"
level = "{level}"

{mappings}
"#,
            url = self.pg.url(db),
            key = self.key_file.display(),
            state = state.display(),
            level = self.opts.log_level,
        );
        let path = self.path(&format!("{name}.toml"));
        std::fs::write(&path, text)?;
        Ok(path)
    }

    fn daemon_cmd(&self, config: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config").arg(config).args(args);
        cmd.env_remove("RUST_LOG");
        cmd
    }

    async fn client(&self, db: &str) -> Result<Client> {
        Ok(self.pg.connect(db).await?)
    }
}

const SCHEMA: &str = "
CREATE TABLE merchant (id int PRIMARY KEY, trade_name text NOT NULL, country text NOT NULL,
    modified_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE purchase (id bigserial PRIMARY KEY, shop_ref int NOT NULL, member_ref int, promo_ref int,
    outlet_ref int, country text NOT NULL, channel text, saved numeric(12,2) NOT NULL,
    total numeric(12,2) NOT NULL, modified_at timestamptz NOT NULL DEFAULT now());
";

const COLUMNS: &str =
    "id, shop_ref, member_ref, promo_ref, outlet_ref, country, channel, saved, total, modified_at";

fn merchants_sql() -> String {
    format!(
        "INSERT INTO merchant (id, trade_name, country, modified_at)
         SELECT g, 'Shop ' || g, (ARRAY['gb','us','ca','fr'])[1 + g % 4],
                timestamptz '2023-06-01 00:00:00+00' + g * interval '1 minute'
         FROM generate_series(1, {MERCHANTS}) g"
    )
}

/// Rows `from..=to` of the generated purchase table (ids come from the sequence).
fn purchases_sql(from: u64, to: u64) -> String {
    format!(
        "INSERT INTO purchase (shop_ref, member_ref, promo_ref, outlet_ref, country, channel, saved, total, modified_at)
         SELECT 1 + g % {MERCHANTS}, 1 + g % 50000,
                CASE WHEN g % 3 = 0 THEN NULL ELSE 1 + g % 500 END, 1 + g % 2000,
                (ARRAY['gb','us','ca','fr'])[1 + g % 4],
                CASE WHEN g % 2 = 0 THEN 'online' ELSE 'in-store' END,
                (g % 1000) / 100.0, 1 + (g % 100000) / 100.0,
                timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second'
         FROM generate_series({from}, {to}) g"
    )
}

/// Creates database `db` with the schema, the merchants and `rows` purchases.
async fn make_database(env: &Env, db: &str, rows: u64) -> Result<()> {
    let t = Instant::now();
    env.pg.create_database(Some(db)).await?;
    let c = env.client(db).await?;
    c.batch_execute(SCHEMA)
        .await
        .context("creating the schema")?;
    c.batch_execute(&merchants_sql()).await?;
    let step = 1_000_000;
    let mut from = 1;
    while from <= rows {
        let to = (from + step - 1).min(rows);
        c.batch_execute(&purchases_sql(from, to))
            .await
            .context("generating purchases")?;
        from = to + 1;
    }
    for t in ["merchant", "purchase"] {
        c.batch_execute(&format!("VACUUM ANALYZE {t}")).await?;
    }
    let size: i64 = c
        .query_one("SELECT pg_total_relation_size('purchase')", &[])
        .await?
        .get(0);
    eprintln!(
        "  database {db}: {MERCHANTS} merchants, {rows} purchases ({} MiB) in {:.1}s",
        size / (1 << 20),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------
// The mock API in its own process
// ---------------------------------------------------------------------------------

struct MockProc {
    /// The process (killed when the mock is dropped).
    proc: Proc,
    url: String,
    http: reqwest::Client,
}

impl MockProc {
    fn start(env: &Env, name: &str) -> Result<MockProc> {
        let mut cmd = Command::new(&env.bin);
        cmd.args(["mock-api", "--listen", "127.0.0.1:0", "--api-key", API_KEY])
            .env_remove("RUST_LOG")
            .env_remove("COBI_API_KEY");
        let log = env.path(&format!("{name}.log"));
        let (mut proc, stdout) = Proc::spawn_piped(name, cmd, &log)?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut lines = std::io::BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            // Keep draining so the mock never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(Some(Ok(l))) => l,
            _ => {
                let _ = proc.try_reap();
                bail!(
                    "mock-api did not announce its address within 15 s; log:\n{}",
                    proc.log_tail(20)
                )
            }
        };
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .ok_or_else(|| anyhow!("unexpected first line from mock-api: {line:?}"))?
            .to_owned();
        Ok(MockProc {
            proc,
            url,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        })
    }

    async fn stats(&self) -> Result<MockStats> {
        let r = self
            .http
            .get(format!("{}/_mock/stats", self.url))
            .send()
            .await
            .context("GET /_mock/stats")?;
        Ok(r.json().await?)
    }

    async fn accepted(&self, ty: &str) -> Result<u64> {
        Ok(self
            .stats()
            .await?
            .records_accepted
            .get(ty)
            .copied()
            .unwrap_or(0))
    }

    /// Waits until the mock has accepted at least `n` records of `ty`,
    /// polling every 20 ms, while `alive` holds. Returns when it happened.
    async fn wait_accepted(
        &self,
        ty: &str,
        n: u64,
        timeout: Duration,
        watched: &mut Proc,
    ) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        let mut last = 0;
        loop {
            let got = self.accepted(ty).await?;
            if got >= n {
                return Ok(Instant::now());
            }
            if got != last {
                last = got;
            }
            if !watched.is_running() {
                let how = watched.try_reap().map(|e| e.describe()).unwrap_or_default();
                bail!(
                    "{} exited ({how}) with {last} of {n} {ty} accepted; log tail:\n{}",
                    watched.name,
                    watched.log_tail(30)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?}: the mock accepted {last} of {n} {ty}; {} log tail:\n{}",
                    watched.name,
                    watched.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// ---------------------------------------------------------------------------------
// The binary under test
// ---------------------------------------------------------------------------------

/// `target/<profile>/cobi-sync`, built (or checked) now.
fn ensure_binary(target_dir: &Path, release_dir: &Path) -> Result<PathBuf> {
    if let Ok(p) = std::env::var("COBI_BENCH_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("COBI_BENCH_BIN={} is not a file", p.display());
        }
        return Ok(p);
    }
    let bin = release_dir.join("cobi-sync");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("  building the release binary: {cargo} build --release --bin cobi-sync");
    let mut cmd = Command::new(&cargo);
    // Drop what `cargo bench` sets for the running bench (CARGO_PKG_*,
    // CARGO_MANIFEST_*, LD_LIBRARY_PATH…): rustc records the environment
    // crates read, and a changed value makes the inner and outer builds
    // rebuild each other's dependencies.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || k.starts_with("CARGO_BIN_")
            || [
                "CARGO",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
                "LD_LIBRARY_PATH",
            ]
            .contains(&k.as_ref())
        {
            cmd.env_remove(k.as_ref());
        }
    }
    let mut child = cmd
        .args([
            "build",
            "--release",
            "--bin",
            "cobi-sync",
            "--manifest-path",
        ])
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", target_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cargo}"))?;
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(40 * 60);
    let mut tail: Vec<String> = Vec::new();
    let mut locked = false;
    let status = loop {
        while let Ok(line) = rx.try_recv() {
            locked |= line.contains("Blocking waiting for file lock");
            tail.push(line);
        }
        if locked {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("  (cargo is locked by the outer build; checking the existing binary)");
            break None;
        }
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("building cobi-sync took more than 40 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if let Some(status) = status {
        if !status.success() {
            while let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
                tail.push(line);
            }
            bail!(
                "cargo build --release --bin cobi-sync failed ({status}):\n{}",
                tail[tail.len().saturating_sub(30)..].join("\n")
            );
        }
    }
    if !bin.is_file() {
        bail!(
            "{} does not exist: run `cargo build --release` first (or set COBI_BENCH_BIN)",
            bin.display()
        );
    }
    // Stale-binary guard: newer sources than the binary mean it was not rebuilt.
    let bin_time = std::fs::metadata(&bin)?.modified()?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    if let Some(newer) = newest_file(&src).filter(|(t, _)| *t > bin_time) {
        bail!(
            "{} is older than {}: run `cargo build --release` first (or set COBI_BENCH_BIN)",
            bin.display(),
            newer.1.display()
        );
    }
    Ok(bin)
}

fn newest_file(dir: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let cand = if p.is_dir() {
            newest_file(&p)
        } else {
            e.metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .map(|t| (t, p))
        };
        if let Some(c) = cand {
            if best.as_ref().is_none_or(|b| c.0 > b.0) {
                best = Some(c);
            }
        }
    }
    best
}

// ---------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------

async fn run(opts: Opts) -> Result<()> {
    let exe = std::env::current_exe()?;
    // target/release/deps/e2e-HASH → target/release → target
    let release_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected bench executable path {}", exe.display()))?
        .to_path_buf();
    let target_dir = release_dir
        .parent()
        .ok_or_else(|| anyhow!("unexpected bench executable path {}", exe.display()))?
        .to_path_buf();
    eprintln!("cobi-sync e2e benchmark: {opts:?}");
    let bin = ensure_binary(&target_dir, &release_dir)?;
    let work = target_dir.join("bench-e2e");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let key_file = work.join("api-key");
    std::fs::write(&key_file, API_KEY)?;
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;

    let python = if opts.python {
        support::python::ensure_venv(&target_dir)
    } else {
        Err("skipped (COBI_BENCH_PYTHON=0)".into())
    };
    if let Err(e) = &python {
        eprintln!("  Python peers will be skipped: {e}");
    }

    eprintln!("  starting PostgreSQL");
    let pg = PgTemp::start_with(&[
        "shared_buffers = '256MB'",
        "max_wal_size = '4GB'",
        "checkpoint_timeout = '30min'",
        "autovacuum = off",
        "work_mem = '16MB'",
    ])
    .await
    .context("starting the throwaway PostgreSQL cluster")?;
    let version: String = pg
        .connect("postgres")
        .await?
        .query_one("SHOW server_version", &[])
        .await?
        .get(0);
    let env = Env {
        opts: opts.clone(),
        bin,
        target_dir,
        work,
        pg,
        key_file,
        python,
    };

    let mut rows = Vec::new();
    let mut extra = vec![format!(
        "PostgreSQL {version}, {} CPUs, {}; integer dataset: rows = purchase rows ({MERCHANTS} shops are sent too and not counted); partner dataset: every record of the 5 types; logs in {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        if env.opts.quick { "QUICK mode" } else { "full mode" },
        env.work.display()
    )];
    let mut targets = Vec::new();
    let mut add = |o: support::partner::Outcome| {
        rows.extend(o.rows);
        extra.extend(o.extra);
        targets.extend(o.targets);
    };
    if opts.integer {
        add(integer_dataset(&env).await?);
    }
    if opts.partner {
        add(support::partner::run(&env).await);
    }
    let report = Report {
        title: format!(
            "cobi-sync e2e benchmark: integer keys {}, partner shape {}",
            if opts.integer {
                format!("{} rows", opts.rows)
            } else {
                "skipped".into()
            },
            if opts.partner {
                format!("~{} records", opts.partner_rows)
            } else {
                "skipped".into()
            },
        ),
        rows,
        extra,
        targets,
    };
    print!("{}", report.text());
    let md = env.target_dir.join("bench-e2e.md");
    std::fs::write(&md, report.markdown())?;
    println!("\n(Markdown: {})", md.display());
    Ok(())
}

/// The integer-key `purchase` dataset: every phase of the first benchmark.
async fn integer_dataset(env: &Env) -> Result<support::partner::Outcome> {
    let opts = env.opts.clone();
    let n = opts.rows;
    let mut extra: Vec<String> = Vec::new();

    eprintln!("[1/8] generating data");
    make_database(env, "bench", n).await?;

    eprintln!("[2/8] reference: COPY to /dev/null");
    let copy_bin = phase_copy(env, "bench", n, true).await.unwrap_or_else(|e| {
        Row::failed("COPY binary → /dev/null (read ceiling)", format!("{e:#}"))
    });
    let copy_txt = phase_copy(env, "bench", n, false)
        .await
        .unwrap_or_else(|e| Row::failed("COPY text → /dev/null", format!("{e:#}")));

    let copy_psql = phase_copy_psql(env, "bench", n).await.unwrap_or_else(|e| {
        Row::failed("COPY binary via psql \\copy → /dev/null", format!("{e:#}"))
    });

    eprintln!("[3/8] mock-api ingest (in process)");
    let mock_row = phase_mock_ingest(n, None).await.unwrap_or_else(|e| {
        Row::failed("mock-api ingest (in process, 2 clients)", format!("{e:#}"))
    });
    let mock_proc_row = async {
        let m = MockProc::start(env, "ingest-mock")?;
        phase_mock_ingest(n, Some(&m)).await
    }
    .await
    .unwrap_or_else(|e| {
        Row::failed(
            "mock-api ingest (mock-api process, 2 clients)",
            format!("{e:#}"),
        )
    });

    eprintln!("[4/8] cobi-sync snapshot of {n} rows");
    let snap = median_run(opts.runs, || phase_snapshot(env, "bench", n, "snap"))
        .await
        .unwrap_or_else(|e| Row::failed("cobi-sync snapshot → mock-api", format!("{e:#}")));

    eprintln!("[4b/8] cobi-sync run in poll mode, first read of {n} rows");
    let mut poll_first = phase_poll_first_read(env, "bench", n)
        .await
        .unwrap_or_else(|e| Row::failed(POLL_FIRST_READ, format!("{e:#}")));
    if let (Some(a), Some(b)) = (poll_first.rate(), snap.rate()) {
        poll_first.ratios.push((a / b, "cobi-sync snapshot".into()));
    }

    eprintln!("[5/8] Python peer snapshot");
    let py_snap = median_run(opts.runs, || phase_python_snapshot(env, "bench", n))
        .await
        .unwrap_or_else(|e| Row::failed("Python peer snapshot → mock-api", format!("{e:#}")));

    let big = if opts.big_rows > 0 {
        eprintln!("[6/8] cobi-sync snapshot of {} rows (RSS)", opts.big_rows);
        let r = async {
            make_database(env, "big", opts.big_rows).await?;
            let r = phase_snapshot(env, "big", opts.big_rows, "snap-big").await;
            let c = env.client("postgres").await?;
            c.batch_execute("DROP DATABASE big").await?;
            r
        }
        .await
        .unwrap_or_else(|e| Row::failed("cobi-sync snapshot (big) → mock-api", format!("{e:#}")));
        Some(r)
    } else {
        eprintln!("[6/8] big snapshot skipped (COBI_BENCH_BIG_ROWS=0)");
        None
    };

    eprintln!("[7/8] replication: pg_recvlogical, cobi-sync drain, Python peer");
    let repl = phase_replication(env, n).await;
    let (recv_row, drain_row, py_cdc_row) = match repl {
        Ok(r) => r,
        Err(e) => (
            Row::failed(
                "pg_recvlogical → /dev/null (decode ceiling)",
                format!("{e:#}"),
            ),
            Row::failed("cobi-sync replication drain → mock-api", format!("{e:#}")),
            Row::failed("Python peer CDC → mock-api", "replication phase failed"),
        ),
    };

    eprintln!("[8/8] latency at {} rows/s, then idle", opts.rate);
    let lat = phase_latency(env).await;

    // ---- ratios
    let mut snap = snap;
    if let (Some(a), Some(b)) = (snap.rate(), copy_bin.rate()) {
        snap.ratios.push((a / b, "COPY binary".into()));
    }
    if let (Some(a), Some(b)) = (snap.rate(), py_snap.rate()) {
        snap.ratios.push((a / b, "Python peer".into()));
    }
    let mut copy_txt = copy_txt;
    if let (Some(a), Some(b)) = (copy_txt.rate(), copy_bin.rate()) {
        copy_txt.ratios.push((a / b, "COPY binary".into()));
    }
    let mut py_snap = py_snap;
    if let (Some(a), Some(b)) = (py_snap.rate(), copy_bin.rate()) {
        py_snap.ratios.push((a / b, "COPY binary".into()));
    }
    let mut big = big;
    if let Some(b) = big.as_mut() {
        if let (Some(a), Some(c)) = (b.rate(), copy_bin.rate()) {
            b.ratios.push((a / c, "COPY binary".into()));
        }
    }
    let mut drain_row = drain_row;
    if let (Some(a), Some(b)) = (drain_row.rate(), recv_row.rate()) {
        drain_row.ratios.push((a / b, "pg_recvlogical".into()));
    }
    if let (Some(a), Some(b)) = (drain_row.rate(), py_cdc_row.rate()) {
        drain_row.ratios.push((a / b, "Python peer".into()));
    }
    let mut py_cdc_row = py_cdc_row;
    if let (Some(a), Some(b)) = (py_cdc_row.rate(), recv_row.rate()) {
        py_cdc_row.ratios.push((a / b, "pg_recvlogical".into()));
    }
    let best_daemon = [
        snap.rate(),
        big.as_ref().and_then(Row::rate),
        drain_row.rate(),
    ]
    .into_iter()
    .flatten()
    .fold(0.0f64, f64::max);
    let mut mock_row = mock_row;
    if let Some(a) = mock_row.rate() {
        if best_daemon > 0.0 {
            mock_row
                .ratios
                .push((a / best_daemon, "daemon's best".into()));
        }
    }

    let mut mock_proc_row = mock_proc_row;
    if let Some(a) = mock_proc_row.rate() {
        if best_daemon > 0.0 {
            mock_proc_row
                .ratios
                .push((a / best_daemon, "daemon's best".into()));
        }
    }
    // ---- targets
    let mut targets = Vec::new();
    let ratio_target =
        |what: &str, a: Option<f64>, b: Option<f64>, min: f64, bname: &str| match (a, b) {
            (Some(a), Some(b)) => Target {
                what: what.into(),
                measured: format!("{:.0} vs {bname} {:.0} rows/s = {:.2}×", a, b, a / b),
                met: Some(a / b >= min),
            },
            _ => Target {
                what: what.into(),
                measured: "not measured".into(),
                met: None,
            },
        };
    targets.push(ratio_target(
        "snapshot ≥ 0.6 × COPY binary",
        snap.rate(),
        copy_bin.rate(),
        0.6,
        "COPY binary",
    ));
    targets.push(ratio_target(
        "snapshot ≥ 5 × Python peer",
        snap.rate(),
        py_snap.rate(),
        5.0,
        "Python peer",
    ));
    targets.push(ratio_target(
        "replication drain ≥ 0.8 × pg_recvlogical",
        drain_row.rate(),
        recv_row.rate(),
        0.8,
        "pg_recvlogical",
    ));
    match &lat {
        Ok(l) => {
            extra.push(format!(
                "Latency commit → received ({} rows, one per transaction, target {} rows/s, achieved {:.0} rows/s, linger 100ms): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms{}",
                l.count, opts.rate, l.achieved_rate, l.p50, l.p90, l.p99, l.max,
                if l.missing > 0 { format!("; {} NEVER RECEIVED", l.missing) } else { String::new() }
            ));
            extra.push(format!(
                "Commit round trip in the inserting sessions (synchronous_commit = on): p50 {:.2} ms, p99 {:.2} ms; inserts started late by > 5 ms: {}",
                l.commit_p50, l.commit_p99, l.late
            ));
            extra.push(format!(
                "Idle daemon: {:.3} CPU s over {} s = {:.2} % of one core; streaming daemon peak RSS {:.1} MiB",
                l.idle_cpu, opts.idle_secs, l.idle_pct, l.rss_mib
            ));
            if !l.notes.is_empty() {
                extra.push(format!("Latency phase notes: {}", l.notes));
            }
            targets.push(Target {
                what: "latency p99 ≤ 150 ms".into(),
                measured: format!("{:.1} ms", l.p99),
                met: Some(l.p99 <= 150.0 && l.missing == 0),
            });
            targets.push(Target {
                what: "latency p50 ≤ 75 ms".into(),
                measured: format!("{:.1} ms", l.p50),
                met: Some(l.p50 <= 75.0 && l.missing == 0),
            });
            targets.push(Target {
                what: "idle daemon < 1 % of a core".into(),
                measured: format!("{:.2} %", l.idle_pct),
                met: Some(l.idle_pct < 1.0),
            });
        }
        Err(e) => {
            extra.push(format!("Latency / idle phase FAILED: {e:#}"));
            for w in [
                "latency p99 ≤ 150 ms",
                "latency p50 ≤ 75 ms",
                "idle daemon < 1 % of a core",
            ] {
                targets.push(Target {
                    what: w.into(),
                    measured: "phase failed".into(),
                    met: None,
                });
            }
        }
    }
    for (label, r) in [("snapshot", Some(&snap)), ("big snapshot", big.as_ref())] {
        match r {
            Some(r) => targets.push(Target {
                what: format!(
                    "peak RSS ≤ 100 MiB, {label} of {} rows",
                    r.rows.map(|x| x.to_string()).unwrap_or("?".into())
                ),
                measured: r
                    .rss_mib
                    .map(|m| format!("{m:.1} MiB"))
                    .unwrap_or_else(|| "not measured".into()),
                met: r.rss_mib.map(|m| m <= 100.0),
            }),
            None => targets.push(Target {
                what: format!("peak RSS ≤ 100 MiB, {label}"),
                measured: "skipped (COBI_BENCH_BIG_ROWS=0)".into(),
                met: None,
            }),
        }
    }
    if let (Some(s), Some(b)) = (snap.rss_mib, big.as_ref().and_then(|b| b.rss_mib)) {
        targets.push(Target {
            what: "peak RSS flat between the two snapshots (≤ +20 %)".into(),
            measured: format!("{s:.1} → {b:.1} MiB"),
            met: Some(b <= s * 1.2),
        });
    }
    for (r, how) in [
        (&mock_row, "in process"),
        (&mock_proc_row, "mock-api process"),
    ] {
        let what = format!("mock-api ingest ({how}) ≥ 3 × the daemon's best");
        targets.push(match r.rate() {
            Some(m) if best_daemon > 0.0 => Target {
                what,
                measured: format!(
                    "{m:.0} vs {best_daemon:.0} rows/s = {:.2}×",
                    m / best_daemon
                ),
                met: Some(m / best_daemon >= 3.0),
            },
            _ => Target {
                what,
                measured: "not measured".into(),
                met: None,
            },
        });
    }

    let mut copy_psql = copy_psql;
    if let (Some(a), Some(b)) = (copy_psql.rate(), copy_bin.rate()) {
        copy_psql.ratios.push((a / b, "COPY binary".into()));
    }
    let mut all = vec![
        copy_bin,
        copy_txt,
        copy_psql,
        mock_row,
        mock_proc_row,
        snap,
        poll_first,
    ];
    all.extend(big);
    all.extend([py_snap, recv_row, drain_row, py_cdc_row]);
    Ok(support::partner::Outcome {
        rows: all,
        extra,
        targets,
    })
}

// ---------------------------------------------------------------------------------
// Phases
// ---------------------------------------------------------------------------------

async fn phase_copy(env: &Env, db: &str, n: u64, binary: bool) -> Result<Row> {
    let c = env.client(db).await?;
    let format = if binary { "(FORMAT binary)" } else { "" };
    let sql = format!("COPY (SELECT {COLUMNS} FROM purchase) TO STDOUT {format}");
    let mut secs = Vec::new();
    let mut bytes = 0;
    for _ in 0..3 {
        let t = Instant::now();
        let stream = tokio::time::timeout(Duration::from_secs(60), c.copy_out(sql.as_str()))
            .await
            .context("COPY did not start within 60 s")??;
        futures_util::pin_mut!(stream);
        let mut b = 0u64;
        let deadline = Instant::now() + Duration::from_secs(600);
        while let Some(chunk) = tokio::time::timeout_at(deadline.into(), stream.next())
            .await
            .context("COPY took more than 10 minutes")?
        {
            b += chunk?.len() as u64;
        }
        secs.push(t.elapsed().as_secs_f64());
        bytes = b;
    }
    let all = secs
        .iter()
        .map(|s| format!("{s:.2}"))
        .collect::<Vec<_>>()
        .join("/");
    let label = if binary {
        "COPY binary → /dev/null (read ceiling)"
    } else {
        "COPY text → /dev/null"
    };
    Ok(Row::measured(label, n, median(&mut secs)).note(format!(
        "median of 3 ({all} s), {} MiB, tokio-postgres copy_out in process",
        bytes >> 20
    )))
}

/// The same binary COPY through `psql`'s `\copy` to /dev/null (median of 3),
/// for comparison with ceilings measured that way.
async fn phase_copy_psql(env: &Env, db: &str, n: u64) -> Result<Row> {
    let psql = env.pg.bindir().join("psql");
    let mut secs = Vec::new();
    for _ in 0..3 {
        let mut cmd = Command::new(&psql);
        cmd.args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            db,
        ])
        .arg("-p")
        .arg(env.pg.port().to_string())
        .arg("-c")
        .arg(format!(
            "\\copy (SELECT {COLUMNS} FROM purchase) TO '/dev/null' WITH (FORMAT binary)"
        ));
        let log = env.path("psql.log");
        let mut p = Proc::spawn("psql \\copy", cmd, &log)?;
        let e = p.wait(Duration::from_secs(600)).await?;
        if !e.success() {
            bail!("psql ended with {}: {}", e.describe(), log_tail(&log, 5));
        }
        secs.push(e.wall.as_secs_f64());
    }
    let all = secs
        .iter()
        .map(|s| format!("{s:.2}"))
        .collect::<Vec<_>>()
        .join("/");
    Ok(Row::measured(
        "COPY binary via psql \\copy → /dev/null",
        n,
        median(&mut secs),
    )
    .note(format!("median of 3 ({all} s), psql process wall time")))
}

fn uuid5(ty: &str, v: u64) -> uuid::Uuid {
    let ns = uuid::Uuid::parse_str(NAMESPACE).expect("namespace");
    uuid::Uuid::new_v5(&ns, format!("{ty}:{v}").as_bytes())
}

fn shops_body() -> Bytes {
    let recs: Vec<String> = (1..=MERCHANTS)
        .map(|i| {
            format!(
                r#"{{"shop_id":"{}","name":"Shop {i}","region":"GB","updated":"2023-06-01T00:00:00Z"}}"#,
                uuid5("shops", i)
            )
        })
        .collect();
    Bytes::from(format!(r#"{{"records":[{}]}}"#, recs.join(",")))
}

fn transactions_body(first_id: u64, count: u64) -> Bytes {
    let recs: Vec<String> = (first_id..first_id + count)
        .map(|g| {
            let offer = if g % 3 == 0 {
                "null".to_string()
            } else {
                format!("\"{}\"", uuid5("offers", 1 + g % 500))
            };
            format!(
                r#"{{"transaction_id":"{}","student_id":"{}","shop_id":"{}","offer_id":{offer},"branch_id":"{}","region":"GB","source":"online","savings":{}.{:02},"amount":{}.{:02},"updated":"2024-01-01T00:00:00Z"}}"#,
                uuid5("transactions", g),
                uuid5("customers", 1 + g % 50000),
                uuid5("shops", 1 + g % MERCHANTS),
                uuid5("branches", 1 + g % 2000),
                (g % 1000) / 100,
                (g % 1000) % 100,
                1 + (g % 100000) / 100,
                (g % 100000) % 100,
            )
        })
        .collect();
    Bytes::from(format!(r#"{{"records":[{}]}}"#, recs.join(",")))
}

/// Posts ~`n` transactions in 5000-record bodies from 2 tasks to the
/// in-process mock (`external` = None) or to a `mock-api` process.
async fn phase_mock_ingest(n: u64, external: Option<&MockProc>) -> Result<Row> {
    const BATCH: u64 = 5000;
    let inproc = match external {
        None => Some(MockServer::start(MockOptions::local(API_KEY)).await?),
        Some(_) => None,
    };
    let http = reqwest::Client::new();
    let url = match (&inproc, external) {
        (Some(m), _) => m.base_url(),
        (None, Some(m)) => m.url.clone(),
        (None, None) => unreachable!(),
    };
    let post = move |ty: &'static str, body: Bytes| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let r = http
                .post(format!("{url}/v1/data/{ty}"))
                .bearer_auth(API_KEY)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            let status = r.status();
            if status != 200 {
                bail!(
                    "mock answered {status}: {}",
                    r.text().await.unwrap_or_default()
                );
            }
            r.bytes().await?;
            Ok::<(), anyhow::Error>(())
        }
    };
    post("shops", shops_body()).await?;
    let requests = n.div_ceil(BATCH) as usize;
    // Distinct bodies (at most 100 = 500 000 distinct keys); later requests re-send them.
    let nbodies = requests.min(100);
    let bodies: Arc<Vec<Bytes>> = Arc::new(
        (0..nbodies)
            .map(|b| transactions_body(1 + b as u64 * BATCH, BATCH))
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (bodies, next) = (bodies.clone(), next.clone());
        let post = post.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= requests {
                    return Ok::<(), anyhow::Error>(());
                }
                post("transactions", bodies[k % bodies.len()].clone()).await?;
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(600), task)
            .await
            .context("mock ingest took more than 10 minutes")???;
    }
    let secs = t.elapsed().as_secs_f64();
    let accepted = match (&inproc, external) {
        (Some(m), _) => m
            .stats()
            .records_accepted
            .get("transactions")
            .copied()
            .unwrap_or(0),
        (None, Some(m)) => m.accepted("transactions").await?,
        (None, None) => unreachable!(),
    };
    let records = requests as u64 * BATCH;
    if accepted != records {
        bail!("mock accepted {accepted} of {records} records");
    }
    let label = match &inproc {
        Some(m) => {
            let _ = m;
            "mock-api ingest (in process, 2 clients)"
        }
        None => "mock-api ingest (mock-api process, 2 clients)",
    };
    if let Some(m) = inproc {
        m.stop().await;
    }
    Ok(Row::measured(label, records, secs).note(format!(
        "5000-record bodies, {} distinct keys, re-sends upsert",
        nbodies as u64 * BATCH
    )))
}

/// Runs a measured phase `runs` times and reports the median run, with
/// every run's time and the highest peak RSS of the runs.
async fn median_run<F, Fut>(runs: usize, mut phase: F) -> Result<Row>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Row>>,
{
    let mut rows = Vec::with_capacity(runs);
    for _ in 0..runs {
        let row = phase().await?;
        let skipped = row.secs.is_none();
        rows.push(row);
        if skipped {
            break;
        }
    }
    if runs == 1 || rows.iter().any(|r| r.secs.is_none()) {
        // One run, or skipped: nothing to take a median of.
        return Ok(rows.remove(0));
    }
    let times: Vec<String> = rows
        .iter()
        .map(|r| format!("{:.2}", r.secs.unwrap_or(f64::NAN)))
        .collect();
    let peak = rows
        .iter()
        .filter_map(|r| r.rss_mib)
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    rows.sort_by(|a, b| {
        let key = |r: &Row| r.secs.unwrap_or(f64::INFINITY);
        key(a).total_cmp(&key(b))
    });
    let mut row = rows.swap_remove(runs / 2);
    row.rss_mib = peak;
    row.add_note(format!(
        "median of {runs} ({} s); peak RSS: highest of the runs",
        times.join("/")
    ));
    Ok(row)
}

async fn phase_snapshot(env: &Env, db: &str, n: u64, name: &str) -> Result<Row> {
    let mock = MockProc::start(env, &format!("{name}-mock"))?;
    let cfg = env.config(name, db, &mock.url, "poll", "initial", "cobi_unused", "1s")?;
    let log = env.path(&format!("{name}.log"));
    let label = if name == "snap" {
        "cobi-sync snapshot → mock-api".to_string()
    } else {
        "cobi-sync snapshot (RSS point 2) → mock-api".to_string()
    };
    let mut p = Proc::spawn(
        "cobi-sync snapshot",
        env.daemon_cmd(&cfg, &["snapshot"]),
        &log,
    )?;
    let timeout = Duration::from_secs(300 + n / 2_000);
    let exit = p.wait(timeout).await?;
    if !exit.success() {
        bail!(
            "`{} --config {} snapshot` ended with {}; log tail:\n{}",
            env.bin.display(),
            cfg.display(),
            exit.describe(),
            p.log_tail(30)
        );
    }
    let stats = mock.stats().await?;
    let tx = stats
        .records_accepted
        .get("transactions")
        .copied()
        .unwrap_or(0);
    let shops = stats.records_accepted.get("shops").copied().unwrap_or(0);
    let rejected: u64 = stats.records_rejected.values().sum();
    let mut row = Row::measured(&label, n, exit.wall.as_secs_f64());
    row.rss_mib = Some(p.peak_rss_mib());
    row.cpu_us = Some(exit.cpu_secs * 1e6 / n as f64);
    row.state_bpr =
        Some(support::partner::dir_bytes(&env.path(&format!("{name}-state"))) as f64 / n as f64);
    row.add_note(format!(
        "{:.1} CPU s (mock-api: {:.1})",
        exit.cpu_secs,
        mock.proc.cpu_secs_now().unwrap_or(f64::NAN)
    ));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if let Some(l) = text.lines().find(|l| l.contains("snapshot complete")) {
        row.add_note(format!("it says: {}", l.trim()));
    }
    if tx != n || shops != MERCHANTS || rejected > 0 {
        row.add_note(format!(
            "MISMATCH: mock accepted {tx} transactions (want {n}), {shops} shops (want {MERCHANTS}), rejected {rejected}"
        ));
    }
    let errors = text.lines().filter(|l| l.contains("ERROR")).count();
    if errors > 0 {
        row.add_note(format!("{errors} ERROR log lines (see {})", log.display()));
    }
    drop(mock);
    Ok(row)
}

const POLL_FIRST_READ: &str = "cobi-sync run, poll mode, first read → mock-api";

/// `cobi-sync run` in poll mode from an empty state on the same table as
/// the snapshot (its cursor has no index): see `support::poll_first_read`.
async fn phase_poll_first_read(env: &Env, db: &str, n: u64) -> Result<Row> {
    let mock = MockProc::start(env, "poll-first-mock")?;
    let cfg = env.config(
        "poll-first",
        db,
        &mock.url,
        "poll",
        "initial",
        "cobi_unused",
        "1s",
    )?;
    let text = std::fs::read_to_string(&cfg)?.replace(
        "[api]",
        "[source.poll]\nschedule = \"0 0 0 1 1 *\"\n\n[api]",
    );
    std::fs::write(&cfg, text)?;
    let log = env.path("poll-first.log");
    support::poll_first_read::measure(
        POLL_FIRST_READ,
        env.daemon_cmd(&cfg, &["run"]),
        &log,
        n,
        Duration::from_secs(300 + n / 2_000),
        || mock.accepted("transactions"),
    )
    .await
}

async fn phase_python_snapshot(env: &Env, db: &str, n: u64) -> Result<Row> {
    let label = "Python peer snapshot → mock-api";
    let py = match &env.python {
        Ok(p) => p.clone(),
        Err(e) => return Ok(Row::new(label).note(format!("skipped: {e}"))),
    };
    let mock = MockProc::start(env, "py-snap-mock")?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/support/peer_snapshot.py");
    let mut cmd = Command::new(py);
    cmd.arg(&script)
        .arg(env.pg.url(db))
        .arg(&mock.url)
        .arg(API_KEY);
    let log = env.path("py-snap.log");
    let mut p = Proc::spawn("peer_snapshot.py", cmd, &log)?;
    let exit = p.wait(Duration::from_secs(600 + n / 500)).await?;
    if !exit.success() {
        bail!(
            "peer_snapshot.py ended with {}:\n{}",
            exit.describe(),
            log_tail(&log, 20)
        );
    }
    let tx = mock.accepted("transactions").await?;
    let mut row = Row::measured(label, n, exit.wall.as_secs_f64());
    row.rss_mib = Some(p.peak_rss_mib());
    row.add_note(format!(
        "{:.1} CPU s (mock-api: {:.1})",
        exit.cpu_secs,
        mock.proc.cpu_secs_now().unwrap_or(f64::NAN)
    ));
    if tx != n {
        row.add_note(format!("MISMATCH: mock accepted {tx} of {n}"));
    }
    Ok(row)
}

async fn slot_exists(c: &Client, slot: &str, active: bool) -> Result<bool> {
    let sql = if active {
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND active"
    } else {
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1"
    };
    let n: i64 = c.query_one(sql, &[&slot]).await?.get(0);
    Ok(n > 0)
}

async fn wait_slot(
    c: &Client,
    slot: &str,
    active: bool,
    p: &mut Proc,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if slot_exists(c, slot, active).await? {
            return Ok(());
        }
        if !p.is_running() {
            bail!(
                "{} exited before slot {slot} was {}; log tail:\n{}",
                p.name,
                if active { "active" } else { "created" },
                p.log_tail(30)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "slot {slot} not {} after {timeout:?}",
                if active { "active" } else { "created" }
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn phase_replication(env: &Env, n: u64) -> Result<(Row, Row, Row)> {
    let db = "repl";
    make_database(env, db, 0).await?;
    let c = env.client(db).await?;
    let mock = MockProc::start(env, "repl-mock")?;
    let cfg = env.config(
        "repl",
        db,
        &mock.url,
        "replication",
        "initial",
        "cobi_bench",
        "1s",
    )?;
    let log = env.path("repl.log");

    // 1. First start: publication, slot, and the shops through the initial snapshot.
    let mut d = Proc::spawn(
        "cobi-sync run (setup)",
        env.daemon_cmd(&cfg, &["run"]),
        &log,
    )?;
    mock.wait_accepted("shops", MERCHANTS, Duration::from_secs(120), &mut d)
        .await?;
    wait_slot(&c, "cobi_bench", false, &mut d, Duration::from_secs(30)).await?;
    let e = d.term(Duration::from_secs(20)).await;
    if !e.success() {
        bail!(
            "the daemon did not stop cleanly on SIGTERM ({}); log:\n{}",
            e.describe(),
            log_tail(&log, 20)
        );
    }

    // 2. Reference slots at the same position, then the changes.
    let refs = ["bench_ref_1", "bench_ref_2", "bench_ref_3"];
    for s in refs.iter().chain(["bench_py"].iter()) {
        c.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[s],
        )
        .await
        .with_context(|| format!("creating slot {s}"))?;
    }
    let t = Instant::now();
    let txs = 10u64.min(n);
    let per = n.div_ceil(txs);
    let mut from = 1;
    while from <= n {
        let to = (from + per - 1).min(n);
        c.batch_execute(&purchases_sql(from, to)).await?;
        from = to + 1;
    }
    let endpos: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let wal: i64 = c
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = 'bench_ref_1'",
            &[],
        )
        .await?
        .get(0);
    eprintln!(
        "  inserted {n} rows in {txs} transactions in {:.1}s; {} MiB of WAL to decode, endpos {endpos}",
        t.elapsed().as_secs_f64(),
        wal >> 20
    );

    // 3. The daemon drains its slot.
    let before = mock.accepted("transactions").await?;
    let mock_cpu0 = mock.proc.cpu_secs_now().unwrap_or(f64::NAN);
    if before != 0 {
        bail!("the mock already holds {before} transactions before the drain");
    }
    let mut d = Proc::spawn(
        "cobi-sync run (drain)",
        env.daemon_cmd(&cfg, &["run"]),
        &log,
    )?;
    let timeout = Duration::from_secs(300 + n / 2_000);
    let done = mock
        .wait_accepted("transactions", n, timeout, &mut d)
        .await?;
    let secs = (done - d.started).as_secs_f64();
    d.sample_now();
    let cpu = d.cpu_secs_now().unwrap_or(f64::NAN);
    let e = d.term(Duration::from_secs(20)).await;
    let mut drain = Row::measured("cobi-sync replication drain → mock-api", n, secs);
    drain.rss_mib = Some(d.peak_rss_mib());
    drain.cpu_us = Some(cpu * 1e6 / n as f64);
    drain.state_bpr = Some(support::partner::dir_bytes(&env.path("repl-state")) as f64 / n as f64);
    drain.add_note(format!(
        "{cpu:.1} CPU s (mock-api: {:.1}); from process start to the mock holding all {n}; {} WAL MiB",
        mock.proc.cpu_secs_now().unwrap_or(f64::NAN) - mock_cpu0,
        wal >> 20
    ));
    if !e.success() {
        drain.add_note(format!("stopped with {} on SIGTERM", e.describe()));
    }
    let stats = mock.stats().await?;
    let rejected: u64 = stats.records_rejected.values().sum();
    if rejected > 0 {
        drain.add_note(format!("{rejected} records rejected by the mock"));
    }
    let errors = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("ERROR"))
        .count();
    if errors > 0 {
        drain.add_note(format!("{errors} ERROR log lines (see {})", log.display()));
    }
    c.execute("SELECT pg_drop_replication_slot('cobi_bench')", &[])
        .await
        .ok();

    // 4. pg_recvlogical over the same changes, three slots.
    let recv = env.pg.bindir().join("pg_recvlogical");
    let mut times = Vec::new();
    let mut recv_row = None;
    for s in refs {
        let mut cmd = Command::new(&recv);
        cmd.args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            db,
            "--no-loop",
            "--start",
        ])
        .arg("-p")
        .arg(env.pg.port().to_string())
        .arg("--slot")
        .arg(s)
        .arg("--endpos")
        .arg(&endpos)
        .args(["-o", "proto_version=1", "-o"])
        .arg(format!("publication_names={PUBLICATION}"))
        .args(["-f", "/dev/null"]);
        let rlog = env.path("pg_recvlogical.log");
        let mut p = Proc::spawn("pg_recvlogical", cmd, &rlog)?;
        match p.wait(Duration::from_secs(300 + n / 2_000)).await {
            Ok(e) if e.success() => times.push(e.wall.as_secs_f64()),
            Ok(e) => {
                recv_row = Some(Row::failed(
                    "pg_recvlogical → /dev/null (decode ceiling)",
                    format!("{}: {}", e.describe(), log_tail(&rlog, 5)),
                ));
                break;
            }
            Err(e) => {
                recv_row = Some(Row::failed(
                    "pg_recvlogical → /dev/null (decode ceiling)",
                    format!("{e:#}"),
                ));
                break;
            }
        }
        c.execute("SELECT pg_drop_replication_slot($1)", &[&s])
            .await
            .ok();
    }
    let recv_row = recv_row.unwrap_or_else(|| {
        let all = times
            .iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join("/");
        Row::measured(
            "pg_recvlogical → /dev/null (decode ceiling)",
            n,
            median(&mut times),
        )
        .note(format!("median of 3 slots ({all} s), --endpos {endpos}"))
    });

    // 5. The Python peer drains its own slot over the same changes.
    let py_label = "Python peer CDC → mock-api";
    let py_row = match &env.python {
        Err(e) => Row::new(py_label).note(format!("skipped: {e}")),
        Ok(py) => {
            let r = async {
                let before = mock.accepted("transactions").await?;
                let script =
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/support/peer_cdc.py");
                let mut cmd = Command::new(py);
                cmd.arg(&script)
                    .arg(env.pg.url(db))
                    .arg("bench_py")
                    .arg(PUBLICATION)
                    .arg(&mock.url)
                    .arg(API_KEY)
                    .arg(n.to_string());
                let plog = env.path("py-cdc.log");
                let mut p = Proc::spawn("peer_cdc.py", cmd, &plog)?;
                let e = p.wait(Duration::from_secs(600 + n / 500)).await?;
                if !e.success() {
                    bail!(
                        "peer_cdc.py ended with {}:\n{}",
                        e.describe(),
                        log_tail(&plog, 20)
                    );
                }
                let after = mock.accepted("transactions").await?;
                let mut row = Row::measured(py_label, n, e.wall.as_secs_f64());
                row.rss_mib = Some(p.peak_rss_mib());
                row.add_note(format!("{:.1} CPU s", e.cpu_secs));
                if after - before != n {
                    row.add_note(format!("MISMATCH: mock accepted {} of {n}", after - before));
                }
                Ok::<Row, anyhow::Error>(row)
            }
            .await;
            r.unwrap_or_else(|e| Row::failed(py_label, format!("{e:#}")))
        }
    };
    c.execute("SELECT pg_drop_replication_slot('bench_py')", &[])
        .await
        .ok();
    Ok((recv_row, drain, py_row))
}

struct Latency {
    count: usize,
    missing: usize,
    achieved_rate: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    commit_p50: f64,
    commit_p99: f64,
    late: usize,
    idle_cpu: f64,
    idle_pct: f64,
    rss_mib: f64,
    notes: String,
}

/// A latency run: the daemon streams from a fresh slot (`snapshot =
/// "never"`, `linger = "100ms"`) to the in-harness receiver while two
/// sessions commit `per_tx`-row transactions at `rate` rows/s.
struct LatencySpec<'a> {
    /// Config name, database, slot, publication and mappings (`api`,
    /// `mode`, `snapshot` and `linger` are set here).
    cfg: Cfg<'a>,
    rate: u64,
    per_tx: u64,
    /// `INSERT … SELECT … FROM generate_series(1, $1::int) g RETURNING …`,
    /// `$2::int` an offset for varied references; returns one row per
    /// inserted row.
    insert: &'a str,
    /// The receiver's `transaction_id` of a returned row.
    key_of: fn(&tokio_postgres::Row) -> String,
    /// Measure the idle daemon afterwards.
    idle: bool,
}

/// The integer-key latency run (and the idle daemon).
async fn phase_latency(env: &Env) -> Result<Latency> {
    latency_run(
        env,
        &LatencySpec {
            cfg: Cfg {
                name: "latency",
                db: "repl",
                api: "",
                mode: "replication",
                snapshot: "never",
                slot: "cobi_lat",
                linger: "100ms",
                publication: PUBLICATION,
                mappings: MAPPINGS,
            },
            rate: env.opts.rate,
            per_tx: 1,
            insert: "INSERT INTO purchase (shop_ref, member_ref, promo_ref, outlet_ref, country, channel, saved, total, modified_at)
                     SELECT 1 + (g + $2) % 1000, 1 + (g + $2) % 50000, 1 + (g + $2) % 500, 1 + (g + $2) % 2000,
                            'gb', 'online', 1.50, 12.34, clock_timestamp()
                     FROM generate_series(1, $1::int) g RETURNING id",
            key_of: |r| uuid5("transactions", r.get::<_, i64>(0) as u64).to_string(),
            idle: true,
        },
    )
    .await
}

async fn latency_run(env: &Env, spec: &LatencySpec<'_>) -> Result<Latency> {
    let db = spec.cfg.db;
    let o = &env.opts;
    let receiver = Receiver::start().await?;
    let api = receiver.base_url();
    let cfg = env.config_of(&Cfg {
        api: &api,
        mode: "replication",
        snapshot: "never",
        linger: "100ms",
        ..spec.cfg
    })?;
    let log = env.path(&format!("{}.log", spec.cfg.name));
    let c = env.client(db).await?;
    let mut d = Proc::spawn(
        "cobi-sync run (latency)",
        env.daemon_cmd(&cfg, &["run"]),
        &log,
    )?;
    wait_slot(&c, spec.cfg.slot, true, &mut d, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Inserting sessions: `per_tx` rows per transaction, synchronous_commit on.
    const SESSIONS: usize = 2;
    let txs = (o.latency_secs * spec.rate / spec.per_tx) as usize;
    let interval = Duration::from_secs_f64(spec.per_tx as f64 / spec.rate as f64);
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for s in 0..SESSIONS {
        let client = env.client(db).await?;
        client.batch_execute("SET synchronous_commit = on").await?;
        let (insert, key_of, per_tx) = (spec.insert.to_owned(), spec.key_of, spec.per_tx as i32);
        tasks.push(tokio::spawn(async move {
            let stmt = client.prepare(&insert).await?;
            let mut out = Vec::new();
            let mut i = s;
            while i < txs {
                let due = start + interval * i as u32;
                tokio::time::sleep_until(due).await;
                let began = tokio::time::Instant::now();
                let rows = client
                    .query(&stmt, &[&per_tx, &(i as i32 * per_tx)])
                    .await?;
                let committed = Instant::now();
                for row in &rows {
                    out.push((key_of(row), committed, began - due, began.elapsed()));
                }
                i += SESSIONS;
            }
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut commits = Vec::with_capacity(txs * spec.per_tx as usize);
    for t in tasks {
        let deadline = Duration::from_secs(o.latency_secs * 3 + 30);
        commits.extend(
            tokio::time::timeout(deadline, t)
                .await
                .context("the inserting sessions fell far behind")???,
        );
    }
    let first = commits.iter().map(|c| c.1).min().expect("rows");
    let last = commits.iter().map(|c| c.1).max().expect("rows");
    let achieved_rate = commits.len() as f64 / (last - first).as_secs_f64().max(1e-3);
    let late = commits
        .iter()
        .filter(|c| c.2 > Duration::from_millis(5))
        .count();
    let mut commit_ms: Vec<f64> = commits.iter().map(|c| c.3.as_secs_f64() * 1e3).collect();
    commit_ms.sort_by(f64::total_cmp);

    // Wait for every row to arrive (at most 30 s after the last commit).
    let ids: Vec<(String, Instant)> = commits.into_iter().map(|(k, t, _, _)| (k, t)).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = {
            let a = receiver.arrivals.lock();
            ids.iter().filter(|(k, _)| a.first.contains_key(k)).count()
        };
        if got == ids.len() || Instant::now() > deadline || !d.is_running() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut lat, missing, requests, resent) = {
        let a = receiver.arrivals.lock();
        let mut lat = Vec::with_capacity(ids.len());
        let mut missing = 0;
        for (k, t) in &ids {
            match a.first.get(k) {
                Some(r) => lat.push(r.saturating_duration_since(*t).as_secs_f64() * 1e3),
                None => missing += 1,
            }
        }
        (lat, missing, a.requests, a.resent)
    };
    lat.sort_by(f64::total_cmp);
    let mut notes = format!("{requests} requests received, {resent} records re-sent");
    if !d.is_running() {
        let how = d.try_reap().map(|e| e.describe()).unwrap_or_default();
        bail!(
            "the daemon exited during the latency phase ({how}); log tail:\n{}",
            d.log_tail(30)
        );
    }

    // Idle.
    let (mut idle_cpu, mut idle_pct) = (f64::NAN, f64::NAN);
    if spec.idle {
        let cpu0 = d
            .cpu_secs_now()
            .ok_or_else(|| anyhow!("cannot read /proc/PID/stat"))?;
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(o.idle_secs)).await;
        let cpu1 = d
            .cpu_secs_now()
            .ok_or_else(|| anyhow!("the daemon vanished while idle"))?;
        idle_cpu = cpu1 - cpu0;
        idle_pct = 100.0 * idle_cpu / t0.elapsed().as_secs_f64();
    }
    d.sample_now();
    let e = d.term(Duration::from_secs(20)).await;
    if !e.success() {
        notes.push_str(&format!(
            "; daemon stopped with {} on SIGTERM",
            e.describe()
        ));
    }
    let errors = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("ERROR"))
        .count();
    if errors > 0 {
        notes.push_str(&format!(
            "; {errors} ERROR log lines (see {})",
            log.display()
        ));
    }
    c.execute("SELECT pg_drop_replication_slot($1)", &[&spec.cfg.slot])
        .await
        .ok();
    Ok(Latency {
        count: ids.len(),
        missing,
        achieved_rate,
        p50: percentile(&lat, 50.0),
        p90: percentile(&lat, 90.0),
        p99: percentile(&lat, 99.0),
        max: lat.last().copied().unwrap_or(f64::NAN),
        commit_p50: percentile(&commit_ms, 50.0),
        commit_p99: percentile(&commit_ms, 99.0),
        late,
        idle_cpu,
        idle_pct,
        rss_mib: d.peak_rss_mib(),
        notes,
    })
}
