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
use crate::ops::systemd;
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
    sink_task: tokio::task::JoinHandle<()>,
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
            .map_err(|e| DaemonError::Runtime(format!("cannot build the HTTP client: {e}")))?,
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
            sink_task,
            hard_stop,
        })
    }

    /// Lets the sink deliver what it holds (every other [`SinkHandle`] must
    /// be dropped), abandoning in-flight work after `grace`.
    pub async fn drain(self, grace: Duration) {
        let Pipeline {
            sink,
            mut sink_task,
            hard_stop,
            ..
        } = self;
        drop(sink);
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

/// `cobi-sync run`.
pub async fn run(settings: Settings) -> Result<(), DaemonError> {
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
    let pipeline = Pipeline::start(&settings, store.clone())?;
    let read_stop = CancellationToken::new();
    let http_stop = CancellationToken::new();
    let settings = Arc::new(settings);
    let http_task = match settings.http.listen {
        Some(addr) => {
            let state = AppState {
                settings: settings.clone(),
                store: store.clone(),
                health: pipeline.health.clone(),
                metrics: pipeline.metrics.clone(),
                sink: pipeline.sink.clone(),
            };
            let task = http::serve(addr, state, http_stop.clone()).await.map_err(|e| {
                DaemonError::Config(format!(
                    "http.listen: cannot listen on {addr}: {e} (another process uses it? set http.listen to a free port, or \"\" to disable)"
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
                    replication::run(settings, store, sink, health, metrics, stop).await
                }
            }
        })
    };

    systemd::ready(&format!("{} mode: starting", settings.source.mode.as_str()));
    let watchdog = systemd::watchdog_interval().map(|iv| {
        let health = pipeline.health.clone();
        let mode = settings.source.mode;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(iv / 2);
            let mut n = 0u64;
            loop {
                tick.tick().await;
                systemd::ping();
                n += 1;
                if n % 20 == 1 {
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
            }
        })
    });

    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| DaemonError::Runtime(e.to_string()))?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|e| DaemonError::Runtime(e.to_string()))?;
    let mut outcome = Ok(());
    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM received; shutting down"),
        _ = sigint.recv() => info!("SIGINT received; shutting down"),
        r = &mut source_task => {
            outcome = match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => {
                    let e = DaemonError::from(e);
                    match &e {
                        DaemonError::Runtime(m) => error!(error = %m, "source stopped"),
                        DaemonError::Config(m) => {
                            error!(error = %m, "the configuration does not match the database")
                        }
                    }
                    Err(e)
                }
                Err(e) => Err(DaemonError::Runtime(format!("source task failed: {e}"))),
            };
        }
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
    http_stop.cancel();
    if let Some(t) = http_task {
        stop_within(t, deadline, "http endpoint").await;
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    pipeline.drain(left.max(MIN_DRAIN)).await;
    info!("cobi-sync stopped");
    outcome
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
