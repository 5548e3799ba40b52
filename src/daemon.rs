//! Wiring: the state store, the API client, the sink, a source, the HTTP
//! endpoint, signals and systemd, for `run` (and the pieces `snapshot` and
//! `dlq replay` reuse when the daemon is stopped).
//!
//! Shutdown (SIGTERM/SIGINT): sources stop reading; the HTTP endpoint
//! closes; the sink sends what it holds and commits. A source or endpoint
//! still busy [`GRACE`] after the signal (blocked on a sink that cannot
//! deliver, a `dlq replay` waiting for verdicts) is aborted, and the sink
//! then gets what is left of `GRACE` (at least 2 s); after that, in-flight
//! requests are abandoned — their records were never confirmed, so they
//! are read again after restart — and the process exits 0.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::secret::secret_file_permissions;
use crate::config::{Mode, Settings};
use crate::ops::health::Health;
use crate::ops::http::{self, AppState};
use crate::ops::metrics::Metrics;
use crate::ops::{systemd, token};
use crate::sink::client::ApiClient;
use crate::sink::{self, SinkConfig, SinkHandle};
use crate::source::poll::PollSource;
use crate::source::{replication, SourceError};
use crate::state::{SledStore, StateStore};

/// How long shutdown waits for in-flight deliveries.
pub const GRACE: Duration = Duration::from_secs(8);

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration does not match the database (exit code 2).
    #[error("{0}")]
    Config(String),
    /// Anything else (exit code 1).
    #[error("{0}")]
    Runtime(String),
}

impl DaemonError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Config(_) => 2,
            DaemonError::Runtime(_) => 1,
        }
    }
}

impl From<SourceError> for DaemonError {
    /// A mapping that does not match the database is a configuration error
    /// (exit 2); anything else a runtime failure (exit 1).
    fn from(e: SourceError) -> Self {
        match e {
            SourceError::Config(m) => DaemonError::Config(m),
            SourceError::Fatal(m) => DaemonError::Runtime(m),
        }
    }
}

/// Store, metrics, health, API client and sink, running.
pub struct Pipeline {
    /// The state store.
    pub store: Arc<dyn StateStore>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Health flags.
    pub health: Arc<Health>,
    /// The API client.
    pub client: Arc<ApiClient>,
    /// Where sources send records.
    pub sink: SinkHandle,
    /// `None` once the daemon saw it end.
    sink_task: Option<tokio::task::JoinHandle<()>>,
    hard_stop: CancellationToken,
}

impl Pipeline {
    /// Starts the sink on `store`.
    pub fn start(settings: &Settings, store: Arc<dyn StateStore>) -> Result<Pipeline, DaemonError> {
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::new(&metrics));
        let hard_stop = CancellationToken::new();
        let client = Arc::new(
            ApiClient::new(
                &settings.api,
                health.clone(),
                metrics.clone(),
                hard_stop.clone(),
            )
            .map_err(DaemonError::Config)?,
        );
        let cfg = SinkConfig {
            max_records: settings.batch.max_records,
            max_bytes: settings.batch.max_bytes,
            linger: settings.batch.linger,
            concurrency: settings.api.concurrency,
            images: Arc::new(crate::state::ImagePolicy::new(settings)),
        };
        let (sink, sink_task) = sink::spawn(
            cfg,
            client.clone(),
            store.clone(),
            metrics.clone(),
            health.clone(),
            hard_stop.clone(),
        );
        Ok(Pipeline {
            store,
            metrics,
            health,
            client,
            sink,
            sink_task: Some(sink_task),
            hard_stop,
        })
    }

    /// Lets the sink deliver what it holds (every other [`SinkHandle`] must
    /// be dropped), abandoning in-flight work after `grace`.
    pub async fn drain(self, grace: Duration) {
        let Pipeline {
            sink,
            sink_task,
            hard_stop,
            ..
        } = self;
        drop(sink);
        let Some(mut sink_task) = sink_task else {
            return;
        };
        tokio::select! {
            _ = &mut sink_task => {}
            _ = tokio::time::sleep(grace) => {
                warn!("shutdown grace period over; abandoning in-flight deliveries (they will be re-read after restart)");
                hard_stop.cancel();
                let _ = sink_task.await;
            }
        }
    }
}

/// Opens the sled store in `state.dir`.
pub fn open_store(settings: &Settings) -> Result<Arc<dyn StateStore>, DaemonError> {
    SledStore::open(&settings.state.dir)
        .map(|s| Arc::new(s) as Arc<dyn StateStore>)
        .map_err(|e| DaemonError::Runtime(format!("state.dir: {e}")))
}

/// Opens the sled store in `state.dir` if the daemon has created one there;
/// `None` when the directory is missing or empty. For the commands that
/// only read or tidy state (`status`, `check`, `dlq`): they must not create
/// a state dir, which would then belong to whoever ran them.
pub fn open_existing_store(
    settings: &Settings,
) -> Result<Option<Arc<dyn StateStore>>, DaemonError> {
    if !has_state(&settings.state.dir) {
        return Ok(None);
    }
    open_store(settings).map(Some)
}

/// Whether `dir` exists and holds anything (the daemon has run).
pub fn has_state(dir: &std::path::Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_some(),
        // Unreadable (permissions): let opening it say why.
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    }
}

/// What `status`, `check` and `dlq` say when [`open_existing_store`] found
/// nothing.
pub fn no_state_message(settings: &Settings) -> String {
    format!(
        "no state yet in {} (the daemon has not run)",
        settings.state.dir.display()
    )
}

/// Warns about secret files others can read.
pub fn check_secret_permissions(settings: &Settings) {
    for (_, warning) in secret_file_permissions(settings) {
        if let Some(w) = warning {
            warn!("{w}");
        }
    }
}

/// `cobi-sync run` without a configuration file to re-read on SIGHUP.
pub async fn run(settings: Settings) -> Result<(), DaemonError> {
    run_from(settings, None).await
}

/// `cobi-sync run`: `config_path` is re-read on SIGHUP (see
/// [`crate::ops::reload`]).
pub async fn run_from(
    settings: Settings,
    config_path: Option<std::path::PathBuf>,
) -> Result<(), DaemonError> {
    info!(
        version = env!("CARGO_PKG_VERSION"),
        mode = settings.source.mode.as_str(),
        mappings = settings.mappings.len(),
        source = %settings.source.url,
        api = %settings.api.base_url,
        state_dir = %settings.state.dir.display(),
        "cobi-sync starting"
    );
    for w in &settings.source.url.warnings {
        warn!("{w}");
    }
    check_secret_permissions(&settings);
    let store = open_store(&settings)?;
    let mut pipeline = Pipeline::start(&settings, store.clone())?;
    let read_stop = CancellationToken::new();
    let http_stop = CancellationToken::new();
    let mut current = settings.clone();
    let settings = Arc::new(settings);
    let (resync_tx, resync_rx) = replication::resync_channel();
    let http_task = match settings.http.listen {
        Some(addr) => {
            let token = token::create(&settings.state.dir).map_err(|e| {
                DaemonError::Runtime(format!(
                    "state.dir: cannot write the endpoint token {}: {e}",
                    token::path(&settings.state.dir).display()
                ))
            })?;
            let state = AppState {
                settings: settings.clone(),
                store: store.clone(),
                health: pipeline.health.clone(),
                metrics: pipeline.metrics.clone(),
                sink: pipeline.sink.clone(),
                resync: (settings.source.mode == Mode::Replication).then(|| resync_tx.clone()),
                token: Some(token.into()),
            };
            let task = http::serve(addr, state, http_stop.clone())
                .await
                .map_err(|e| {
                    // Exit 1, not 2: the port may be free after a restart.
                    DaemonError::Runtime(format!(
                        "http.listen: cannot listen on {addr}: {e} (another process uses it? set \
                     http.listen to a free port, or \"\" to disable)"
                    ))
                })?;
            info!(%addr, "http endpoint listening (/healthz /readyz /metrics /status)");
            Some(task)
        }
        None => None,
    };

    let mut source_task = {
        let settings = (*settings).clone();
        let sink = pipeline.sink.clone();
        let store = store.clone();
        let health = pipeline.health.clone();
        let metrics = pipeline.metrics.clone();
        let stop = read_stop.clone();
        tokio::spawn(async move {
            match settings.source.mode {
                Mode::Poll => {
                    PollSource::new(settings, store, sink, health, stop)
                        .run()
                        .await
                }
                Mode::Replication => {
                    replication::run_with_resync(
                        settings,
                        store,
                        sink,
                        health,
                        metrics,
                        Some(resync_rx),
                        stop,
                    )
                    .await
                }
            }
        })
    };
    let mut sink_task = pipeline.sink_task.take().expect("the sink runs");
    let probe_task = tokio::spawn(reach_api(
        pipeline.client.clone(),
        pipeline.health.clone(),
        (settings.api.initial_backoff, settings.api.max_backoff),
        read_stop.clone(),
    ));

    systemd::ready(&format!("{} mode: starting", settings.source.mode.as_str()));
    let mode = settings.source.mode;
    let mut signals = Signals::install()?;
    let mut pings = 0u64;
    let health = pipeline.health.clone();
    let client = pipeline.client.clone();
    let ended = supervise(
        &mut source_task,
        &mut sink_task,
        &mut signals,
        || crate::ops::reload::on_sighup(config_path.as_deref(), &mut current, &client),
        systemd::watchdog_interval().map(|iv| iv / 2),
        || {
            systemd::ping();
            pings += 1;
            if pings % 20 == 1 {
                let r = health.report();
                systemd::status(&format!(
                    "{} mode: {}",
                    mode.as_str(),
                    if r.ready {
                        "ready".to_string()
                    } else {
                        r.reasons.join("; ")
                    }
                ));
            }
        },
    )
    .await;
    let sink_ended = matches!(ended, Ended::Sink(_));
    let outcome = outcome_of(ended);
    match &outcome {
        Ok(()) => {}
        Err(DaemonError::Config(m)) => {
            error!(error = %m, "the configuration does not match the database")
        }
        Err(DaemonError::Runtime(m)) => error!(error = %m, "stopping: a task of the daemon ended"),
    }
    if !sink_ended {
        pipeline.sink_task = Some(sink_task);
    }
    systemd::stopping();
    // One deadline for the source and the endpoint: a source blocked on a
    // full sink (the API is down) and a `dlq replay` waiting for verdicts
    // would otherwise hold shutdown forever. Abandoned work was never
    // confirmed, so it is read again after restart.
    let deadline = tokio::time::Instant::now() + GRACE;
    read_stop.cancel();
    if !source_task.is_finished() {
        stop_within(source_task, deadline, "source").await;
    }
    probe_task.abort();
    http_stop.cancel();
    if let Some(t) = http_task {
        stop_within(t, deadline, "http endpoint").await;
    }
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    pipeline.drain(left.max(MIN_DRAIN)).await;
    info!("cobi-sync stopped");
    outcome
}

/// The signals the daemon handles.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers (from now on SIGHUP no longer kills the process).
    pub fn install() -> Result<Signals, DaemonError> {
        let one = |k| signal(k).map_err(|e| DaemonError::Runtime(format!("signal handler: {e}")));
        Ok(Signals {
            term: one(SignalKind::terminate())?,
            int: one(SignalKind::interrupt())?,
            hup: one(SignalKind::hangup())?,
        })
    }
}

/// The daemon's main loop: waits until a stop is requested or the source
/// or sink task ends, whichever comes first; re-reads the configuration on
/// each SIGHUP (`on_hup`); and calls `on_tick` every `tick` (the systemd
/// watchdog ping) — from this loop only, so the pings stop when a task
/// has ended.
pub async fn supervise(
    source: &mut tokio::task::JoinHandle<Result<(), SourceError>>,
    sink: &mut tokio::task::JoinHandle<()>,
    signals: &mut Signals,
    mut on_hup: impl FnMut(),
    tick: Option<Duration>,
    mut on_tick: impl FnMut(),
) -> Ended {
    let mut ticker = tick.map(tokio::time::interval);
    loop {
        tokio::select! {
            _ = signals.term.recv() => return Ended::Signal("SIGTERM"),
            _ = signals.int.recv() => return Ended::Signal("SIGINT"),
            _ = signals.hup.recv() => on_hup(),
            r = &mut *source => return Ended::Source(r),
            r = &mut *sink => return Ended::Sink(r),
            _ = async { ticker.as_mut().expect("guarded").tick().await }, if ticker.is_some() => on_tick(),
        }
    }
}

/// Why the daemon's main loop ended.
#[derive(Debug)]
pub enum Ended {
    /// A stop was requested.
    Signal(&'static str),
    /// The source task ended.
    Source(Result<Result<(), SourceError>, tokio::task::JoinError>),
    /// The sink task ended.
    Sink(Result<(), tokio::task::JoinError>),
}

/// The exit rule (DESIGN.md §2): only a requested stop is a success; any
/// internal task that ends by itself — the sink, or the source in either
/// mode, even without an error — is a failure (exit 1, so systemd
/// restarts the daemon), except a mapping that does not match the database
/// (exit 2: a restart cannot fix it).
pub fn outcome_of(ended: Ended) -> Result<(), DaemonError> {
    match ended {
        Ended::Signal(name) => {
            info!("{name} received; shutting down");
            Ok(())
        }
        Ended::Source(Ok(Ok(()))) => Err(DaemonError::Runtime(
            "the source stopped by itself (its sink is gone, or it lost its stop signal); \
             exiting 1 so that systemd restarts cobi-sync"
                .into(),
        )),
        Ended::Source(Ok(Err(e))) => Err(DaemonError::from(e)),
        Ended::Source(Err(e)) => Err(DaemonError::Runtime(format!("the source task failed: {e}"))),
        Ended::Sink(Ok(())) => Err(DaemonError::Runtime(
            "the sink stopped by itself; exiting 1 so that systemd restarts cobi-sync \
             (undelivered records are read again)"
                .into(),
        )),
        Ended::Sink(Err(e)) => Err(DaemonError::Runtime(format!(
            "the sink task failed: {e}; exiting 1 so that systemd restarts cobi-sync \
             (undelivered records are read again)"
        ))),
    }
}

/// Proves the API once at start (the empty batch `check` sends), so that
/// `/readyz` turns ready on a quiet source too and a wrong `api.base_url`
/// or key shows at start: until the API answers with its envelope (or a
/// delivery succeeds first), the API is "not reached yet", and each failed
/// probe sets the API's last error. Retries with growing backoff; logs a
/// WARN at the first failure and every 10th.
async fn reach_api(
    client: Arc<ApiClient>,
    health: Arc<crate::ops::health::Health>,
    (initial, max): (Duration, Duration),
    stop: CancellationToken,
) {
    let shops = crate::model::schema::schema()
        .type_id("shops")
        .expect("shops exists");
    let mut delay = initial;
    for attempt in 0u64.. {
        if health.report().api_ready {
            return;
        }
        let problem = match client.probe(shops).await {
            Ok(answer) => {
                match crate::check::probe_verdict("the Cobi API", "the key source", &answer).verdict
                {
                    crate::check::Verdict::Ok(_) => {
                        health.set_api(true, None);
                        info!("cobi api reachable, key accepted");
                        return;
                    }
                    crate::check::Verdict::Fail(d, fix) => format!("{d}; fix: {fix}"),
                    crate::check::Verdict::Warn(d) => d,
                }
            }
            Err(e) => e,
        };
        if attempt % 10 == 0 {
            warn!(error = %problem, "cobi api not reached yet; retrying");
        }
        health.set_api(false, Some(problem));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
        delay = (delay * 2).min(max);
    }
}

/// The least time the sink gets to deliver what it holds at shutdown, even
/// when the source used up [`GRACE`]: shutdown ends within `GRACE +
/// MIN_DRAIN` (10 s, DESIGN.md §6).
const MIN_DRAIN: Duration = Duration::from_secs(2);

/// Waits for a task that was asked to stop; aborts it at `deadline`.
async fn stop_within<T>(
    mut task: tokio::task::JoinHandle<T>,
    deadline: tokio::time::Instant,
    what: &str,
) {
    if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
        warn!(
            task = what,
            "did not stop within the shutdown grace period; abandoning it \
             (what it had not delivered is read again after restart)"
        );
        task.abort();
        let _ = task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The outcome when a real task ends the way `f` makes it end.
    async fn ended_by<T: Send + 'static>(
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        tokio::spawn(f).await
    }

    #[tokio::test]
    async fn only_a_requested_stop_exits_0() {
        // A sink task that panics (killed), and one that returns by itself.
        let panicked = ended_by(async { panic!("sink bug") }).await;
        let returned = ended_by(async {}).await;
        // A source that returns Ok without being asked (poll mode does when
        // its sink is gone), one that fails, one that panics.
        let quiet_source = ended_by(async { Ok::<(), SourceError>(()) }).await;
        let failing = ended_by(async { Err(SourceError::Fatal("slot lost".into())) }).await;
        let config = ended_by(async { Err(SourceError::Config("no column".into())) }).await;
        let source_panic = ended_by(async {
            panic!("source bug");
            #[allow(unreachable_code)]
            Ok::<(), SourceError>(())
        })
        .await;
        let cases: Vec<(Ended, Option<u8>, &str)> = vec![
            (Ended::Signal("SIGTERM"), None, ""),
            (Ended::Signal("SIGINT"), None, ""),
            (Ended::Sink(panicked), Some(1), "sink task failed"),
            (Ended::Sink(returned), Some(1), "sink stopped by itself"),
            (
                Ended::Source(quiet_source),
                Some(1),
                "source stopped by itself",
            ),
            (Ended::Source(failing), Some(1), "slot lost"),
            (Ended::Source(config), Some(2), "no column"),
            (Ended::Source(source_panic), Some(1), "source task failed"),
        ];
        for (ended, code, word) in cases {
            let what = format!("{ended:?}");
            match outcome_of(ended) {
                Ok(()) => assert_eq!(code, None, "{what} must not exit 0"),
                Err(e) => {
                    assert_eq!(Some(e.exit_code()), code, "{what}: {e}");
                    assert!(e.to_string().contains(word), "{what}: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod supervise_tests {
    use super::*;

    /// A sink task that dies while the source runs on ends the loop (and
    /// the watchdog pings with it) as a failure.
    #[tokio::test]
    async fn a_dead_sink_ends_the_daemon_with_exit_1() {
        let mut signals = Signals::install().unwrap();
        let mut source = tokio::spawn(async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<(), SourceError>(())
        });
        let mut sink = tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            panic!("killed");
        });
        let mut pings = 0;
        let ended = tokio::time::timeout(
            Duration::from_secs(20),
            supervise(
                &mut source,
                &mut sink,
                &mut signals,
                || {},
                Some(Duration::from_millis(10)),
                || pings += 1,
            ),
        )
        .await
        .expect("the loop must end when the sink dies");
        assert!(matches!(ended, Ended::Sink(Err(_))), "{ended:?}");
        assert!(pings >= 1, "the watchdog was fed while both ran");
        assert_eq!(outcome_of(ended).unwrap_err().exit_code(), 1);
        source.abort();
    }

    /// SIGHUP calls the reload and never ends the loop.
    #[tokio::test]
    async fn sighup_reloads_and_keeps_running() {
        let mut signals = Signals::install().unwrap();
        let mut source = tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Ok::<(), SourceError>(())
        });
        let mut sink = tokio::spawn(async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            unsafe { libc::raise(libc::SIGHUP) };
        });
        let mut reloads = 0;
        let ended = supervise(
            &mut source,
            &mut sink,
            &mut signals,
            || reloads += 1,
            None,
            || {},
        )
        .await;
        assert_eq!(reloads, 1);
        assert!(matches!(ended, Ended::Source(Ok(Ok(())))), "{ended:?}");
        sink.abort();
    }
}
