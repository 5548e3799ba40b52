//! Replication mode: logical replication (pgoutput, protocol 1) with a
//! consistent, resumable snapshot.
//!
//! # The stream
//! [`setup`] checks the server and tables, creates the publication (before
//! the slot) and the slot. [`stream`] opens the replication connection at
//! the durable position. Each transaction's changes are decoded
//! ([`pgoutput`], [`relations`]), mapped and sent to the sink as they
//! arrive (a large transaction never sits in memory); its commit becomes a
//! progress mark carrying the commit's end LSN. The sink publishes what is
//! durable and only that is confirmed to PostgreSQL. Keepalives and
//! heartbeat messages (`pg_logical_emit_message`, every 10 s) advance the
//! position when no mapped table changes, so a quiet source never pins WAL.
//!
//! # The snapshot (watermarks with exact visibility)
//! Tables are copied in upload order, in key-ordered chunks, *while* the
//! stream runs (the approach of Netflix's DBLog, made exact with
//! transaction ids): see [`watermark`], the pure state machine that decides
//! what every change and every chunk does, and [`session`], the loop that
//! carries its decisions out. Because tables are copied parents first and
//! chunk rows are delivered at their watermark position, a child row never
//! reaches the sink before the parent it references. An interrupted
//! snapshot resumes at the last durable chunk; the stream restarts at the
//! matching position.
//!
//! A copy that starts over (`snapshot`, `resync`, a lost slot) first
//! soft-deletes the keys the state store holds that the table no longer
//! has; deletes streamed meanwhile always reach keys the API holds.
//!
//! # Failures
//! Database errors are classified by SQLSTATE ([`errors`]): lost
//! connections and shutdowns retry with growing backoff; missing
//! privileges, dropped columns and cancelled queries stop the daemon with
//! the fix. A dropped or invalidated slot, or a state directory behind the
//! slot, follows `source.replication.on_slot_lost`.

pub mod errors;
pub mod pgoutput;
pub mod reads;
pub mod relations;
pub mod session;
pub mod setup;
pub mod stream;
pub mod watermark;

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::model::schema::TypeId;
use crate::ops::health::Health;
use crate::ops::metrics::Metrics;
use crate::sink::SinkHandle;
use crate::source::SourceError;
use crate::state::{replication_checkpoint, StateStore, TableSnapshot};
use session::{replace_checkpoint, Env, Options, Replicator};

/// Prefix of snapshot watermark messages.
pub const WATERMARK_PREFIX: &str = "cobi-sync-watermark";
/// Prefix of heartbeat messages.
pub const HEARTBEAT_PREFIX: &str = "cobi-sync-heartbeat";
/// Rows per snapshot chunk.
pub const CHUNK_ROWS: usize = 10_000;

/// A `resync` request: re-copy the mappings of these types while
/// streaming. The reply lists the mappings, or says why not.
#[derive(Debug)]
pub struct ResyncRequest {
    /// Cobi types.
    pub types: Vec<TypeId>,
    /// Mapping labels re-copied, or the reason nothing is.
    pub reply: oneshot::Sender<Result<Vec<String>, String>>,
}

/// The channel that carries `resync` requests to the running source.
pub fn resync_channel() -> (mpsc::Sender<ResyncRequest>, mpsc::Receiver<ResyncRequest>) {
    mpsc::channel(4)
}

/// Runs replication mode until `stop`.
pub async fn run(
    settings: Settings,
    store: Arc<dyn StateStore>,
    sink: SinkHandle,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> Result<(), SourceError> {
    run_with_resync(settings, store, sink, health, metrics, None, stop).await
}

/// Runs replication mode until `stop`, taking `resync` requests.
pub async fn run_with_resync(
    settings: Settings,
    store: Arc<dyn StateStore>,
    sink: SinkHandle,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    resync: Option<mpsc::Receiver<ResyncRequest>>,
    stop: CancellationToken,
) -> Result<(), SourceError> {
    let env = Env {
        settings,
        store,
        sink,
        health,
        metrics,
        stop,
    };
    Replicator::new(env, Options::default(), resync)
        .run()
        .await
        .map(|_| ())
}

/// The `snapshot` command in replication mode: marks the mappings of
/// `types` (all when empty) as not copied — re-creating the slot if it was
/// dropped or lost, and then re-copying every mapping — and runs the
/// stream until every table is copied and delivered. Keys the state store
/// holds that a table no longer has are soft-deleted first. With `force`,
/// copied records are sent even if unchanged. Returns the rows copied.
#[allow(clippy::too_many_arguments)]
pub async fn snapshot_command(
    settings: Settings,
    store: Arc<dyn StateStore>,
    sink: SinkHandle,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    types: &[TypeId],
    force: bool,
    stop: CancellationToken,
) -> Result<u64, SourceError> {
    let mut cp = replication_checkpoint(store.as_ref())
        .map_err(|e| SourceError::Fatal(e.to_string()))?
        .unwrap_or_default();
    let mut forced = HashSet::new();
    for m in &settings.mappings {
        if types.is_empty() || types.contains(&m.ty) {
            cp.tables
                .insert(m.id.to_string(), TableSnapshot::NotStarted);
            if force {
                forced.insert(m.id.clone());
            }
        }
    }
    replace_checkpoint(&store, cp)?;
    let env = Env {
        settings,
        store,
        sink,
        health,
        metrics,
        stop,
    };
    let opts = Options {
        until_copied: true,
        recreate_slot: true,
        force: forced,
    };
    Replicator::new(env, opts, None).run().await
}
