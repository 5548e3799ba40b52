//! One generation of the running pipeline: an API client, the sink, the
//! source and the start-up API probe, built from one version of the
//! settings. The state store, metrics, health flags and the HTTP endpoint
//! outlive generations.
//!
//! A SIGHUP that changes batch or request settings or the mappings
//! ([`crate::ops::reload`]) replaces the generation ([`Generation::replace`]):
//! the source stops reading, the sink delivers and commits what it holds —
//! the same drain as on SIGTERM, with the same grace period — and a new
//! generation starts from the durable progress. What the old one had not
//! committed when its grace ran out is read again by the new one. Each
//! generation in replication mode has its own `resync` channel, handed to
//! the endpoint with its sink ([`Live`]).

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{reach_api, stop_within, DaemonError, Pipeline, GRACE, MIN_DRAIN};
use crate::config::{Mode, Settings};
use crate::ops::health::Health;
use crate::ops::heartbeat;
use crate::ops::live::{Live, Running};
use crate::ops::metrics::Metrics;
use crate::sink::client::ApiClient;
use crate::source::poll::PollSource;
use crate::source::replication::{self, ResyncRequest};
use crate::source::SourceError;
use crate::state::StateStore;

/// A running pipeline.
pub struct Generation {
    /// The settings it was built with.
    pub settings: Arc<Settings>,
    /// Its API client.
    pub client: Arc<ApiClient>,
    /// The source task.
    pub source_task: JoinHandle<Result<(), SourceError>>,
    /// The sink task.
    pub sink_task: JoinHandle<()>,
    pipeline: Pipeline,
    read_stop: CancellationToken,
    probe_task: JoinHandle<()>,
    resync: Option<mpsc::Sender<ResyncRequest>>,
}

impl Generation {
    /// Starts sink, source and API probe with `settings` (the source and
    /// sink as watched tasks, see [`heartbeat`]).
    pub fn start(
        settings: Arc<Settings>,
        store: Arc<dyn StateStore>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<Generation, DaemonError> {
        let mut pipeline = Pipeline::start_with(&settings, store.clone(), metrics, health)?;
        let sink_task = pipeline.sink_task.take().expect("the sink runs");
        let read_stop = CancellationToken::new();
        // A channel per generation: a `resync` reaches the source that
        // runs now, never one that stopped.
        let (resync_tx, resync_rx) = match settings.source.mode {
            Mode::Replication => {
                let (tx, rx) = replication::resync_channel();
                (Some(tx), Some(rx))
            }
            Mode::Poll => (None, None),
        };
        let source_task = {
            let settings = (*settings).clone();
            let sink = pipeline.sink.clone();
            let health = pipeline.health.clone();
            let metrics = pipeline.metrics.clone();
            let stop = read_stop.clone();
            heartbeat::spawn("source", async move {
                match settings.source.mode {
                    Mode::Poll => {
                        PollSource::new(settings, store, sink, health, stop)
                            .run()
                            .await
                    }
                    Mode::Replication => {
                        replication::run_with_resync(
                            settings, store, sink, health, metrics, resync_rx, stop,
                        )
                        .await
                    }
                }
            })
        };
        let probe_task = tokio::spawn(reach_api(
            pipeline.client.clone(),
            pipeline.health.clone(),
            (settings.api.initial_backoff, settings.api.max_backoff),
            read_stop.clone(),
        ));
        Ok(Generation {
            client: pipeline.client.clone(),
            settings,
            source_task,
            sink_task,
            pipeline,
            read_stop,
            probe_task,
            resync: resync_tx,
        })
    }

    /// Handles to its sink and source (for the HTTP endpoint).
    pub fn running(&self) -> Running {
        Running {
            sink: self.pipeline.sink.clone(),
            resync: self.resync.clone(),
        }
    }

    /// Stops reading: the source is asked to stop and waited for until
    /// `deadline` (then aborted), the probe ends. Skips a source task that
    /// already ended (`source_ended`: its handle was consumed).
    pub async fn stop_reading(&mut self, deadline: tokio::time::Instant, source_ended: bool) {
        self.read_stop.cancel();
        self.probe_task.abort();
        if !source_ended && !self.source_task.is_finished() {
            stop_within(&mut self.source_task, deadline, "source").await;
        }
    }

    /// Lets the sink deliver and commit what it holds (every other handle
    /// to it must be gone), abandoning in-flight work at `deadline` (but
    /// giving it at least [`MIN_DRAIN`]). Skips a sink task that already
    /// ended (`sink_ended`).
    pub async fn drain(self, deadline: tokio::time::Instant, sink_ended: bool) {
        let Generation {
            mut pipeline,
            sink_task,
            ..
        } = self;
        if !sink_ended {
            pipeline.sink_task = Some(sink_task);
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        pipeline.drain(left.max(MIN_DRAIN)).await;
    }

    /// Replaces this generation with one running `next` (SIGHUP): drains
    /// this one as shutdown does, then starts the new one from the durable
    /// progress and hands it to the endpoint (`live`). If the new one
    /// cannot start, the old settings run again.
    pub async fn replace(
        mut self,
        next: Settings,
        store: &Arc<dyn StateStore>,
        live: &Live,
    ) -> Result<Generation, DaemonError> {
        info!(
            "SIGHUP: restarting the pipeline with the new settings: the source stops reading, the \
             sink delivers and commits what it holds, then both start again from the durable \
             progress"
        );
        let started = std::time::Instant::now();
        live.pause();
        let deadline = tokio::time::Instant::now() + GRACE;
        self.stop_reading(deadline, false).await;
        let (metrics, health) = (self.pipeline.metrics.clone(), self.pipeline.health.clone());
        let old = self.settings.clone();
        self.drain(deadline, false).await;
        let next = Arc::new(next);
        let new = match Generation::start(
            next.clone(),
            store.clone(),
            metrics.clone(),
            health.clone(),
        ) {
            Ok(g) => g,
            Err(e) => {
                error!(error = %e, "SIGHUP: the pipeline cannot start with the new settings; the previous ones run again");
                Generation::start(old, store.clone(), metrics, health)?
            }
        };
        live.set(new.settings.clone(), new.running());
        info!(
            ms = started.elapsed().as_millis() as u64,
            mappings = new.settings.mappings.len(),
            max_records = new.settings.batch.max_records,
            max_bytes = new.settings.batch.max_bytes,
            linger = ?new.settings.batch.linger,
            concurrency = new.settings.api.concurrency,
            requests_per_minute = new.settings.api.requests_per_minute,
            timeout = ?new.settings.api.timeout,
            "SIGHUP: pipeline restarted with the new settings"
        );
        if new.settings.mappings.is_empty() {
            warn!("no mappings are configured: nothing is read");
        }
        Ok(new)
    }
}
