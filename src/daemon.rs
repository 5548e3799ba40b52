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
//!
//! SIGHUP re-reads the configuration ([`crate::ops::reload`]); settings the
//! running pipeline was built with are applied by replacing it in-process
//! ([`generation`]). The systemd watchdog is fed while the source and sink
//! tasks move or wait on something healthy ([`crate::ops::watchdog`]).

pub mod generation;

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::secret::secret_file_permissions;
use crate::config::Settings;
use crate::ops::health::Health;
use crate::ops::http::{self, AppState};
use crate::ops::live::Live;
use crate::ops::metrics::Metrics;
use crate::ops::{heartbeat, systemd, token};
use crate::sink::client::ApiClient;
use crate::sink::{self, SinkConfig, SinkHandle};
use crate::source::SourceError;
use crate::state::{SledStore, StateStore};
use generation::Generation;

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
        Pipeline::start_with(settings, store, metrics, health)
    }

    /// Starts the sink on `store`, reporting to existing `metrics` and
    /// `health` (a pipeline restarted by SIGHUP).
    pub fn start_with(
        settings: &Settings,
        store: Arc<dyn StateStore>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<Pipeline, DaemonError> {
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
    let registry = heartbeat::Registry::new();
    heartbeat::within(
        registry.clone(),
        run_watched(settings, config_path, registry),
    )
    .await
}

async fn run_watched(
    settings: Settings,
    config_path: Option<std::path::PathBuf>,
    registry: Arc<heartbeat::Registry>,
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
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(&metrics));
    let mut current = settings.clone();
    let settings = Arc::new(settings);
    let mut gen = Generation::start(
        settings.clone(),
        store.clone(),
        metrics.clone(),
        health.clone(),
    )?;
    let live = Live::new(settings.clone(), Some(gen.running()));
    let http_stop = CancellationToken::new();
    let http_task = match settings.http.listen {
        Some(addr) => Some(
            serve_endpoint(
                addr,
                &settings,
                AppState {
                    live: live.clone(),
                    store: store.clone(),
                    health: health.clone(),
                    metrics: metrics.clone(),
                    token: None,
                },
                http_stop.clone(),
            )
            .await?,
        ),
        None => None,
    };

    systemd::ready(&format!("{} mode: starting", settings.source.mode.as_str()));
    let watchdog = systemd::watchdog_interval().map(|interval| {
        let mode = settings.source.mode;
        let health = health.clone();
        let mut pings = 0u64;
        tokio::spawn(crate::ops::watchdog::run(registry, interval, move || {
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
        }))
    });
    let mut signals = Signals::install()?;
    let ended = loop {
        match supervise(&mut gen.source_task, &mut gen.sink_task, &mut signals).await {
            Event::Hangup => {
                let asked = crate::ops::reload::on_sighup(
                    config_path.as_deref(),
                    &mut current,
                    &gen.client,
                );
                let Some(rebuild) = asked else { continue };
                let Some(next) = crate::ops::reload::settle(rebuild, &current).await else {
                    continue;
                };
                gen = gen.replace(next, &store, &live).await?;
                // What runs now (the new settings, or the old ones when the
                // new pipeline could not start); what was applied in place
                // (log level, key source, retry delays) stays as it is.
                current = crate::ops::reload::rebuilt(
                    &current,
                    &gen.settings,
                    &crate::ops::reload::REBUILD_KEYS,
                );
            }
            Event::Ended(ended) => break ended,
        }
    };
    let source_ended = matches!(ended, Ended::Source(_));
    let sink_ended = matches!(ended, Ended::Sink(_));
    let outcome = outcome_of(ended);
    match &outcome {
        Ok(()) => {}
        Err(DaemonError::Config(m)) => {
            error!(error = %m, "the configuration does not match the database")
        }
        Err(DaemonError::Runtime(m)) => error!(error = %m, "stopping: a task of the daemon ended"),
    }
    systemd::stopping();
    if let Some(w) = watchdog {
        w.abort();
    }
    // One deadline for the source and the endpoint: a source blocked on a
    // full sink (the API is down) and a `dlq replay` waiting for verdicts
    // would otherwise hold shutdown forever. Abandoned work was never
    // confirmed, so it is read again after restart.
    let deadline = tokio::time::Instant::now() + GRACE;
    gen.stop_reading(deadline, source_ended).await;
    http_stop.cancel();
    if let Some(mut t) = http_task {
        stop_within(&mut t, deadline, "http endpoint").await;
    }
    live.pause();
    gen.drain(deadline, sink_ended).await;
    info!("cobi-sync stopped");
    outcome
}

/// Starts the HTTP endpoint on `addr` (with a fresh endpoint token in the
/// state dir). A port in use is exit 1 naming `http.listen`.
async fn serve_endpoint(
    addr: std::net::SocketAddr,
    settings: &Settings,
    mut state: AppState,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, DaemonError> {
    let token = token::create(&settings.state.dir).map_err(|e| {
        DaemonError::Runtime(format!(
            "state.dir: cannot write the endpoint token {}: {e}",
            token::path(&settings.state.dir).display()
        ))
    })?;
    state.token = Some(token.into());
    let task = http::serve(addr, state, stop).await.map_err(|e| {
        // Exit 1, not 2: the port may be free after a restart.
        DaemonError::Runtime(format!(
            "http.listen: cannot listen on {addr}: {e} (another process uses it? set \
             http.listen to a free port, or \"\" to disable)"
        ))
    })?;
    info!(%addr, "http endpoint listening (/healthz /readyz /metrics /status)");
    Ok(task)
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

/// The daemon's main loop: waits until a stop is requested, the source or
/// sink task ends, or a SIGHUP arrives, whichever comes first.
pub async fn supervise(
    source: &mut tokio::task::JoinHandle<Result<(), SourceError>>,
    sink: &mut tokio::task::JoinHandle<()>,
    signals: &mut Signals,
) -> Event {
    tokio::select! {
        _ = signals.term.recv() => Event::Ended(Ended::Signal("SIGTERM")),
        _ = signals.int.recv() => Event::Ended(Ended::Signal("SIGINT")),
        _ = signals.hup.recv() => Event::Hangup,
        r = &mut *source => Event::Ended(Ended::Source(r)),
        r = &mut *sink => Event::Ended(Ended::Sink(r)),
    }
}

/// What woke the main loop.
#[derive(Debug)]
pub enum Event {
    /// SIGHUP: re-read the configuration, keep running.
    Hangup,
    /// The daemon stops.
    Ended(Ended),
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
    task: &mut tokio::task::JoinHandle<T>,
    deadline: tokio::time::Instant,
    what: &str,
) {
    if tokio::time::timeout_at(deadline, &mut *task).await.is_err() {
        warn!(
            task = what,
            "did not stop within the shutdown grace period; abandoning it \
             (what it had not delivered is read again after restart)"
        );
        task.abort();
        let _ = (&mut *task).await;
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

    /// A sink task that dies while the source runs on ends the loop as a
    /// failure.
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
        // The SIGHUP another test raises reaches this one too: skip it.
        let ended = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Event::Ended(e) = supervise(&mut source, &mut sink, &mut signals).await {
                    break e;
                }
            }
        })
        .await
        .expect("the loop must end when the sink dies");
        assert!(matches!(ended, Ended::Sink(Err(_))), "{ended:?}");
        assert_eq!(outcome_of(ended).unwrap_err().exit_code(), 1);
        source.abort();
    }

    /// SIGHUP wakes the loop without ending it.
    #[tokio::test]
    async fn sighup_wakes_the_loop_without_ending_it() {
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
        let mut hangups = 0;
        let ended = loop {
            match supervise(&mut source, &mut sink, &mut signals).await {
                Event::Hangup => hangups += 1,
                Event::Ended(e) => break e,
            }
        };
        assert_eq!(hangups, 1);
        assert!(matches!(ended, Ended::Source(Ok(Ok(())))), "{ended:?}");
        sink.abort();
    }
}
