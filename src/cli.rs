//! The command line (DESIGN.md §2): parsing with clap and dispatch.
//!
//! Exit codes: 0 ok, 1 runtime failure, 2 bad configuration or usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tracing::{error, info};

use crate::config::{self, Mode, Settings};
use crate::daemon::{self, DaemonError, Pipeline};
use crate::model::schema::{schema, TypeId};
use crate::ops::{dlq, logging, status};
use crate::state::{MemoryStore, StateStore};

/// cobi-sync: keeps the Cobi platform in sync with your PostgreSQL database.
#[derive(Debug, Parser)]
#[command(name = "cobi-sync", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "COBI_SYNC_CONFIG", default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: snapshot once, then stream (or poll) changes forever.
    Run,
    /// Check the configuration, database, privileges, tables and API key.
    Check,
    /// Validate the configuration file only; contacts nothing.
    ///
    /// Exit 0, or 2 listing every problem. The systemd unit's ExecStartPre:
    /// unlike `check`, a briefly unreachable database cannot block start-up.
    Validate,
    /// One-off full upload of the mapped tables (or the named types and
    /// what they depend on).
    Snapshot {
        /// Only these Cobi types (plus the types they depend on).
        #[arg(long = "type", value_name = "TYPE")]
        types: Vec<String>,
        /// Re-send records even if identical to what was last accepted.
        #[arg(long)]
        force: bool,
    },
    /// Re-copy the named types while the daemon keeps streaming, soft-
    /// deleting rows the tables no longer have; progress in `status`.
    ///
    /// Without a running daemon: `snapshot --force --type T…`.
    Resync {
        /// The Cobi types to re-copy.
        #[arg(long = "type", value_name = "TYPE", required = true)]
        types: Vec<String>,
    },
    /// Drop this configuration's replication slot and publication (before
    /// removing cobi-sync, so it pins no WAL). Refuses while the daemon runs.
    Teardown {
        /// Do not ask for confirmation (scripts).
        #[arg(long)]
        yes: bool,
    },
    /// State of the running daemon, or of the state dir when it is stopped.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Inspect, re-send or drop dead-lettered records.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// A strict local stand-in for the Cobi Data API (trials, demos, tests).
    MockApi(MockApiArgs),
    /// The zero-setup tour: throwaway PostgreSQL + mock API + a live sync.
    Demo,
}

/// `dlq` subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// List dead letters, with a count per type and reason.
    List {
        /// Only this type.
        #[arg(long = "type", value_name = "TYPE")]
        ty: Option<String>,
        /// JSON array (with the records).
        #[arg(long)]
        json: bool,
        /// Show at most this many rows (the summary counts them all).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// Re-send dead letters in dependency order.
    Replay {
        /// Only this type.
        #[arg(long = "type", value_name = "TYPE")]
        ty: Option<String>,
        /// The report is JSON (it always is; accepted for scripts).
        #[arg(long)]
        json: bool,
        /// Give up waiting for the running daemon's answer after this long
        /// (the replay itself goes on there).
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Drop dead letters. Without --type, asks for confirmation on a
    /// terminal; scripts pass --yes.
    Purge {
        /// Only this type.
        #[arg(long = "type", value_name = "TYPE")]
        ty: Option<String>,
        /// The report is JSON (it always is; accepted for scripts).
        #[arg(long)]
        json: bool,
        /// Purge every type without asking.
        #[arg(long)]
        yes: bool,
    },
}

/// `mock-api` options.
#[derive(Debug, Args, Clone)]
pub struct MockApiArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Bearer key clients must send.
    // `hide_env_values`: `--help` names the variable, never the key in it.
    #[arg(long, env = "COBI_API_KEY", hide_env_values = true)]
    pub api_key: String,
    /// Share of requests answered 500.
    #[arg(long, default_value_t = 0.0, value_parser = crate::mock_api::parse_rate)]
    pub fail_rate: f64,
    /// Share of requests answered 429 with Retry-After.
    #[arg(long, default_value_t = 0.0, value_parser = crate::mock_api::parse_rate)]
    pub throttle_rate: f64,
    /// Share of requests whose connection is closed without an answer.
    #[arg(long, default_value_t = 0.0, value_parser = crate::mock_api::parse_rate)]
    pub drop_rate: f64,
    /// Added latency per request (e.g. 20ms).
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub latency: Duration,
    /// Seed of the fault injection.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// 207/400 answers say how many records failed, not which (like the
    /// real API, whose error text has no documented shape).
    #[arg(long)]
    pub opaque_errors: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    config::parse_duration(s)
}

/// Parses arguments and runs. The returned code is the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(dispatch(cli));
    rt.shutdown_timeout(Duration::from_secs(1));
    ExitCode::from(code)
}

fn load(path: &std::path::Path) -> Result<Settings, u8> {
    config::load(path).map_err(|e| {
        eprint!("{e}");
        2
    })
}

/// `cobi-sync validate`: the configuration alone, nothing is contacted.
fn cmd_validate(path: &std::path::Path) -> Result<(), u8> {
    let settings = load(path)?;
    for w in &settings.source.url.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "configuration {} is valid ({} mode, {} mappings)",
        path.display(),
        settings.source.mode.as_str(),
        settings.mappings.len()
    );
    Ok(())
}

fn resolve_type(name: &str) -> Result<TypeId, u8> {
    schema().type_id(name).ok_or_else(|| {
        eprintln!(
            "--type {name}: unknown Cobi type; types are: {}",
            schema().type_names().join(", ")
        );
        2
    })
}

async fn dispatch(cli: Cli) -> u8 {
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => cmd_run(&cli.config).await,
        Command::Check => crate::check::run(&cli.config).await,
        Command::Validate => cmd_validate(&cli.config),
        Command::Snapshot { types, force } => cmd_snapshot(&cli.config, &types, force).await,
        Command::Resync { types } => cmd_resync(&cli.config, &types).await,
        Command::Teardown { yes } => crate::ops::teardown::run(&cli.config, yes).await,
        Command::Status { json } => cmd_status(&cli.config, json).await,
        Command::Dlq { action } => cmd_dlq(&cli.config, action).await,
        Command::MockApi(args) => cmd_mock_api(args).await,
        Command::Demo => crate::demo::run().await,
    };
    match result {
        Ok(()) => 0,
        Err(code) => code,
    }
}

async fn cmd_run(path: &std::path::Path) -> Result<(), u8> {
    let settings = load(path)?;
    logging::init(&settings.log);
    daemon::run_from(settings, Some(path.to_path_buf()))
        .await
        .map_err(|e| {
            // Through the log (journald priority, JSON), not bare stderr.
            error!("cobi-sync stopped: {e}");
            e.exit_code()
        })
}

/// Exit 1 before anything is sent when no API key can be found: a command
/// run from a shell must say so, not retry forever.
fn require_key(settings: &Settings) -> Result<(), u8> {
    match settings.api.key.load() {
        Ok(_) => Ok(()),
        Err(e) => {
            eprintln!("cobi-sync: {e}");
            Err(1)
        }
    }
}

async fn cmd_snapshot(path: &std::path::Path, types: &[String], force: bool) -> Result<(), u8> {
    let settings = load(path)?;
    logging::init(&settings.log);
    require_key(&settings)?;
    let mut ids = Vec::new();
    for t in types {
        let id = resolve_type(t)?;
        for a in schema().with_ancestors(id) {
            if !ids.contains(&a) {
                ids.push(a);
            }
        }
    }
    let store = daemon::open_store(&settings).map_err(|e| fail(&e))?;
    daemon::check_secret_permissions(&settings);
    let pipeline = Pipeline::start(&settings, store.clone()).map_err(|e| fail(&e))?;
    let stop = tokio_util::sync::CancellationToken::new();
    let stop2 = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop2.cancel();
    });
    let started = std::time::Instant::now();
    let result = match settings.source.mode {
        Mode::Poll => {
            crate::source::snapshot::run(
                &settings,
                store.clone(),
                &pipeline.sink,
                &ids,
                force,
                &stop,
            )
            .await
        }
        Mode::Replication => {
            crate::source::replication::snapshot_command(
                settings.clone(),
                store.clone(),
                pipeline.sink.clone(),
                pipeline.health.clone(),
                pipeline.metrics.clone(),
                &ids,
                force,
                stop.clone(),
            )
            .await
        }
    };
    let interrupted = stop.is_cancelled();
    pipeline.drain(daemon::GRACE).await;
    match result {
        Ok(rows) => {
            let secs = started.elapsed().as_secs_f64();
            if interrupted {
                println!("snapshot interrupted after {rows} rows; run it again to continue where it stopped");
                Err(1)
            } else {
                println!(
                    "snapshot complete: {rows} rows in {secs:.1}s ({:.0} rows/s)",
                    rows as f64 / secs.max(1e-3)
                );
                let dead = store
                    .dead_letter_counts()
                    .map(|m| m.values().sum::<u64>())
                    .unwrap_or(0);
                if dead > 0 {
                    println!("{dead} dead letters: see `cobi-sync dlq list`");
                }
                Ok(())
            }
        }
        Err(e) => Err(fail(&DaemonError::from(e))),
    }
}

/// `cobi-sync resync`: through the running daemon's endpoint, else as
/// `snapshot --force`.
async fn cmd_resync(path: &std::path::Path, types: &[String]) -> Result<(), u8> {
    let settings = load(path)?;
    for t in types {
        resolve_type(t)?;
    }
    let Some((_, base)) = daemon_url(&settings).await else {
        eprintln!("no running daemon answers; re-copying as `snapshot --force`");
        return cmd_snapshot(path, types, true).await;
    };
    let auth = bearer(&settings)?;
    let url = format!("{base}/resync?types={}", types.join(","));
    let resp = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| {
            eprintln!("cannot build an HTTP client: {e}");
            1
        })?
        .post(&url)
        .header(reqwest::header::AUTHORIZATION, auth)
        .timeout(Duration::from_secs(40))
        .send()
        .await
        .map_err(|e| {
            eprintln!("resync through {base} failed: {e}");
            1
        })?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        eprintln!("resync: HTTP {status}: {}", text.trim_end());
        return Err(1);
    }
    println!("{text}");
    eprintln!("the daemon re-copies while streaming; follow it with `cobi-sync status`");
    Ok(())
}

fn fail(e: &DaemonError) -> u8 {
    error!("{e}");
    eprintln!("cobi-sync: {e}");
    e.exit_code()
}

/// How long `status` waits for the running daemon's answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);

/// The running daemon's endpoint, if cobi-sync answers there (its
/// `/healthz` names it: another exporter on the port is not taken for the
/// daemon), and a client for it whose requests time out after
/// [`STATUS_TIMEOUT`].
async fn daemon_url(settings: &Settings) -> Option<(reqwest::Client, String)> {
    let addr = settings.http.listen?;
    let base = format!("http://{addr}");
    let client = reqwest::Client::builder()
        .timeout(STATUS_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .ok()?;
    let resp = client.get(format!("{base}/healthz")).send().await.ok()?;
    let status = resp.status();
    match resp.json::<crate::ops::http::Identity>().await {
        Ok(id) if id.service == crate::ops::http::SERVICE => Some((client, base)),
        _ => {
            eprintln!(
                "warning: http.listen {addr} answers (HTTP {status}) but not as cobi-sync \
                 (another service uses that port?); reading the state dir instead"
            );
            None
        }
    }
}

/// The `Authorization` value for the daemon's protected endpoints.
fn bearer(settings: &Settings) -> Result<String, u8> {
    crate::ops::token::read(&settings.state.dir)
        .map(|t| format!("Bearer {t}"))
        .map_err(|e| {
            eprintln!("cobi-sync: {e}");
            1
        })
}

async fn cmd_status(path: &std::path::Path, json: bool) -> Result<(), u8> {
    let settings = load(path)?;
    let report = if let Some((client, base)) = daemon_url(&settings).await {
        let r = client
            .get(format!("{base}/status"))
            .send()
            .await
            .map_err(|e| {
                eprintln!("cannot read {base}/status: {e}");
                1
            })?;
        r.json::<status::StatusReport>().await.map_err(|e| {
            eprintln!("unexpected answer from {base}/status: {e}");
            1
        })?
    } else {
        let store = daemon::open_existing_store(&settings).map_err(|e| {
            eprintln!("{e}");
            1
        })?;
        let store = store.unwrap_or_else(|| {
            // Nothing to read: report the empty state, create nothing.
            if !json {
                println!("{}", daemon::no_state_message(&settings));
            }
            Arc::new(MemoryStore::new()) as Arc<dyn StateStore>
        });
        status::build(&settings, store.as_ref(), None).map_err(|e| {
            eprintln!("{e}");
            1
        })?
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("serialisable")
        );
    } else {
        print!("{}", status::render(&report));
    }
    Ok(())
}

/// Asks before purging every type: on a terminal, a typed `yes`; elsewhere
/// (scripts) only `--yes` allows it.
fn confirm_purge_all(settings: &Settings) -> Result<(), u8> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        eprintln!(
            "dlq purge without --type drops every dead letter; pass --yes to do it from a script"
        );
        return Err(2);
    }
    print!(
        "Drop every dead letter of {} (they hold records the API rejected)? Type yes: ",
        settings.state.dir.display()
    );
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    if answer.trim() == "yes" {
        Ok(())
    } else {
        eprintln!("nothing purged");
        Err(1)
    }
}

async fn cmd_dlq(path: &std::path::Path, action: DlqAction) -> Result<(), u8> {
    let settings = load(path)?;
    let ty_name = match &action {
        DlqAction::List { ty, .. } | DlqAction::Replay { ty, .. } | DlqAction::Purge { ty, .. } => {
            ty.clone()
        }
    };
    let ty = ty_name.as_deref().map(resolve_type).transpose()?;
    // Purging every type asks first (when there is anything to purge).
    let must_confirm = matches!(
        &action,
        DlqAction::Purge {
            ty: None,
            yes: false,
            ..
        }
    );
    let query = ty_name.map(|t| format!("?type={t}")).unwrap_or_default();
    if let Some((_, base)) = daemon_url(&settings).await {
        let auth = bearer(&settings)?;
        if must_confirm {
            confirm_purge_all(&settings)?;
        }
        let timeout = match &action {
            DlqAction::Replay { timeout, .. } => *timeout,
            _ => Duration::from_secs(60),
        };
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| {
                eprintln!("cannot build an HTTP client: {e}");
                1
            })?;
        let (req, what) = match &action {
            DlqAction::List { .. } => (client.get(format!("{base}/dlq{query}")), "list"),
            DlqAction::Replay { .. } => {
                (client.post(format!("{base}/dlq/replay{query}")), "replay")
            }
            DlqAction::Purge { .. } => (client.post(format!("{base}/dlq/purge{query}")), "purge"),
        };
        let resp = req
            .header(reqwest::header::AUTHORIZATION, auth)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    eprintln!(
                        "dlq {what}: no answer from {base} within {}; the daemon goes on with \
                         it — see `cobi-sync dlq list` and the logs",
                        humantime::format_duration(timeout)
                    );
                } else {
                    eprintln!("dlq {what} through {base} failed: {e}");
                }
                1
            })?;
        if !resp.status().is_success() {
            eprintln!(
                "dlq {what}: HTTP {}: {}",
                resp.status(),
                resp.text().await.unwrap_or_default().trim_end()
            );
            return Err(1);
        }
        match action {
            DlqAction::List { json, limit, .. } => {
                let rows: Vec<dlq::DeadLetterRow> = resp.json().await.map_err(|e| {
                    eprintln!("unexpected answer: {e}");
                    1
                })?;
                print_rows(&rows, json, limit);
            }
            DlqAction::Replay { .. } => {
                let text = resp.text().await.unwrap_or_default();
                println!("{text}");
                let note = serde_json::from_str::<dlq::ReplayReport>(&text)
                    .ok()
                    .and_then(|r| r.skipped_note());
                if let Some(note) = note {
                    eprintln!("{note}");
                }
            }
            DlqAction::Purge { .. } => println!("{}", resp.text().await.unwrap_or_default()),
        }
        return Ok(());
    }
    // The daemon is stopped: work on the state dir directly.
    let Some(store) = daemon::open_existing_store(&settings).map_err(|e| fail(&e))? else {
        eprintln!("{}", daemon::no_state_message(&settings));
        match action {
            DlqAction::List { json, .. } => print_rows(&[], json, None),
            DlqAction::Purge { .. } => println!("{{\"purged\":0}}"),
            DlqAction::Replay { .. } => {
                println!("{{\"replayed\":0,\"skipped\":0,\"still_dead\":0}}")
            }
        }
        return Ok(());
    };
    if must_confirm {
        confirm_purge_all(&settings)?;
    }
    match action {
        DlqAction::List { json, limit, .. } => {
            let rows = dlq::list(store.as_ref(), ty).map_err(|e| {
                eprintln!("{e}");
                1
            })?;
            print_rows(&rows, json, limit);
        }
        DlqAction::Purge { .. } => {
            let n = dlq::purge(store.as_ref(), ty).map_err(|e| {
                eprintln!("{e}");
                1
            })?;
            println!("{{\"purged\":{n}}}");
        }
        DlqAction::Replay { .. } => {
            logging::init(&settings.log);
            if store
                .dead_letters(ty)
                .map(|v| v.is_empty())
                .unwrap_or(false)
            {
                println!("{{\"replayed\":0,\"skipped\":0,\"still_dead\":0}}");
                return Ok(());
            }
            require_key(&settings)?;
            let pipeline = Pipeline::start(&settings, store.clone()).map_err(|e| fail(&e))?;
            let report = dlq::replay(store.clone(), &pipeline.sink, ty)
                .await
                .map_err(|e| {
                    eprintln!("dlq replay: {e}");
                    1
                });
            pipeline.drain(daemon::GRACE).await;
            let report = report?;
            let (n, skipped) = (report.replayed, report.skipped);
            let left = store.dead_letters(ty).map(|v| v.len()).unwrap_or(0);
            info!(replayed = n, skipped, still_dead = left, "dlq replay done");
            println!("{{\"replayed\":{n},\"skipped\":{skipped},\"still_dead\":{left}}}");
            if let Some(note) = report.skipped_note() {
                eprintln!("{note}");
            }
        }
    }
    Ok(())
}

/// Prints dead letters: JSON, or the per-type-and-reason summary and the
/// table (at most `limit` rows; the summary counts all).
fn print_rows(rows: &[dlq::DeadLetterRow], json: bool, limit: Option<usize>) {
    let shown = &rows[..limit.unwrap_or(usize::MAX).min(rows.len())];
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(shown).expect("serialisable")
        );
    } else {
        print!("{}", dlq::summary(rows));
        print!("{}", dlq::render(shown));
        if shown.len() < rows.len() {
            println!(
                "({} of {} dead letters shown; --limit N shows more)",
                shown.len(),
                rows.len()
            );
        }
    }
}

async fn cmd_mock_api(args: MockApiArgs) -> Result<(), u8> {
    logging::init_default();
    let opts = crate::mock_api::MockOptions {
        listen: args.listen,
        api_key: args.api_key,
        fail_rate: args.fail_rate,
        throttle_rate: args.throttle_rate,
        drop_rate: args.drop_rate,
        latency: args.latency,
        seed: args.seed,
        opaque_errors: args.opaque_errors,
    };
    crate::mock_api::serve_until_signal(opts)
        .await
        .map_err(|e| {
            eprintln!("mock-api: {e}");
            1
        })
}
