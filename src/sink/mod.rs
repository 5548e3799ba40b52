//! The sink: records in, API verdicts and durable progress out.
//!
//! Sources push [`SinkItem`]s through a bounded channel ([`SinkHandle`]).
//! The sink task ([`task`]) gathers them into an [`epoch::Epoch`] (newest
//! version per key) and seals it when `batch.linger` has passed since its
//! first item, when a type holds `max_records × concurrency` keys (or the
//! bytes of that many full requests), or when a source asks
//! ([`SinkItem::Flush`], barriers). One epoch is sent at a time, while the
//! next one fills:
//!
//! 1. types level by level in the schema's dependency order, so a child is
//!    never sent before the parents committed before it or with it;
//! 2. per type ([`per_type`]): each key's change is decided ([`decide`]:
//!    send, skip as unchanged, dead-letter locally, build or forget a soft
//!    delete, drop a stale replay), batches are cut by
//!    `max_records`/`max_bytes` and sent concurrently ([`deliver`]); each
//!    answer is classified ([`policy`]) and a rejected batch is split until
//!    every rejected record is alone ([`isolate`], guided by the
//!    pre-screen, [`screen`]); the verdicts become state writes
//!    ([`verdicts`]);
//! 3. one state-store write of every verdict together with the epoch's
//!    progress marks, then a flush, then the marks are published to the
//!    sources (who confirm them to PostgreSQL).
//!
//! When the next epoch is full while one is in flight, the sink stops
//! reading its channel: sources block, and PostgreSQL holds the WAL. If the
//! state store cannot be written, the epoch is retried until it can, so
//! progress stops being confirmed and nothing is lost.

pub mod client;
pub mod decide;
pub mod deliver;
pub mod epoch;
pub mod isolate;
pub mod overlay;
mod per_type;
pub mod policy;
pub mod screen;
mod task;
pub mod verdicts;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::model::record::Record;
use crate::model::validate::{validate, Problem};
use crate::ops::health::Health;
use crate::ops::metrics::Metrics;
use crate::state::{Checkpoint, ImagePolicy, ReplicationCheckpoint, StateKey, StateStore};
use client::ApiClient;
pub use decide::Resend;

/// Most keys of one type in an epoch.
pub const EPOCH_RECORDS: usize = 10_000;
/// Most (approximate) bytes of records in an epoch.
pub const EPOCH_BYTES: usize = 16 << 20;

/// A record made ready on the source's task: validated, serialised once,
/// fingerprinted. The sink only compares and sends bytes.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The JSON the API receives.
    pub json: Bytes,
    /// xxh3 of `json`.
    pub fingerprint: u64,
    /// The record's Cobi key, if it has one.
    pub cobi_key: Option<String>,
    /// Mapping and validation problems (non-empty: a dead letter).
    pub problems: Vec<Problem>,
    /// Hashes of the parents its validated references name
    /// ([`screen::parent_refs`]).
    pub parents: Box<[u64]>,
    /// What the state store keeps for a later soft delete, if the mapping
    /// keeps one ([`crate::state::image`]).
    pub image: Option<Bytes>,
}

impl Outbound {
    /// Validates and serialises `record`; `problems` are the mapping's.
    pub fn new(record: &Record, mut problems: Vec<Problem>) -> Outbound {
        problems.extend(validate(record));
        let json = record.to_json();
        Outbound {
            fingerprint: xxhash_rust::xxh3::xxh3_64(&json),
            json: Bytes::from(json),
            cobi_key: record.cobi_key(),
            problems,
            parents: screen::parent_refs(record),
            image: crate::state::image::encode(record),
        }
    }
}

/// What a source hands the sink.
#[derive(Debug)]
pub enum SinkItem {
    /// A new version of a record.
    Upsert {
        /// Its key.
        key: StateKey,
        /// The record, ready to send.
        record: Outbound,
        /// How an identical prior verdict is treated (a change, a re-read,
        /// `snapshot --force`).
        resend: Resend,
    },
    /// The source row was deleted: send a soft delete.
    Delete {
        /// Its key.
        key: StateKey,
        /// The record built from the old row image, if it had every column.
        basis: Option<Record>,
    },
    /// `dlq replay`: re-send a dead letter — only if, when its epoch is
    /// sent, the key is still dead-lettered with this letter's content. It
    /// never replaces a change from the source.
    Replay {
        /// Its key.
        key: StateKey,
        /// The letter's record, ready to send.
        record: Outbound,
        /// xxh3 of the letter's record as stored (the key state's
        /// fingerprint while the letter stands).
        letter: u64,
    },
    /// Progress: durable once everything before it is.
    Mark(Checkpoint),
    /// Seal the current epoch now.
    Flush,
    /// Wake the sender once everything before it is durable.
    Barrier(oneshot::Sender<()>),
}

impl SinkItem {
    /// An upsert of a mapped record (validated and serialised now, on the
    /// caller's task).
    pub fn upsert(
        key: StateKey,
        record: &Record,
        problems: Vec<Problem>,
        resend: Resend,
    ) -> SinkItem {
        SinkItem::Upsert {
            key,
            record: Outbound::new(record, problems),
            resend,
        }
    }

    /// An upsert of a record given as JSON text (an object of Cobi field
    /// names), parsed for `key.ty` with every number kept exactly as
    /// written. For callers that know the JSON they want sent (tests, tools)
    /// and do not build [`Record`]s; an unknown field or a value of the
    /// wrong kind is an error naming it.
    pub fn upsert_json(key: StateKey, json: &[u8]) -> Result<SinkItem, String> {
        let record = Record::from_json(key.ty, json)?;
        Ok(SinkItem::upsert(key, &record, vec![], Resend::Changed))
    }
}

/// The id of the Cobi type called `name` (as in the URL, or an alias such
/// as `interactions`); `None` for a name the API does not have.
pub fn type_id(name: &str) -> Option<crate::state::TypeId> {
    crate::model::schema::schema().type_id(name)
}

/// The sink task has stopped.
#[derive(Debug, thiserror::Error)]
#[error("the sink has stopped")]
pub struct SinkClosed;

/// What has been made durable.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Durable {
    /// Epochs committed so far.
    pub epochs: u64,
    /// The latest replication checkpoint committed.
    pub replication: Option<ReplicationCheckpoint>,
}

/// How sources talk to the sink.
#[derive(Clone)]
pub struct SinkHandle {
    tx: mpsc::Sender<Vec<SinkItem>>,
    durable: watch::Receiver<Durable>,
    images: Arc<ImagePolicy>,
}

impl SinkHandle {
    /// Sends items (blocks while the sink is saturated).
    pub async fn send(&self, items: Vec<SinkItem>) -> Result<(), SinkClosed> {
        if items.is_empty() {
            return Ok(());
        }
        // Waiting on the (watched) sink is a healthy wait for the source.
        crate::ops::heartbeat::idle(self.tx.send(items))
            .await
            .map_err(|_| SinkClosed)
    }

    /// Waits until everything sent before is durable.
    pub async fn barrier(&self) -> Result<(), SinkClosed> {
        let (tx, rx) = oneshot::channel();
        self.send(vec![SinkItem::Barrier(tx)]).await?;
        crate::ops::heartbeat::idle(rx)
            .await
            .map_err(|_| SinkClosed)
    }

    /// Which mappings keep delete images.
    pub fn images(&self) -> &ImagePolicy {
        &self.images
    }

    /// Durable progress, for confirming positions to PostgreSQL.
    pub fn durable(&self) -> watch::Receiver<Durable> {
        self.durable.clone()
    }
}

/// Sink tuning, from `[batch]`/`[api]` and the mappings.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Records per request.
    pub max_records: usize,
    /// Bytes per request body.
    pub max_bytes: usize,
    /// Longest a record waits.
    pub linger: Duration,
    /// Requests in flight.
    pub concurrency: usize,
    /// Which mappings keep delete images (the source reports replica
    /// identities to it).
    pub images: Arc<ImagePolicy>,
}

/// Starts the sink task. `stop` abandons in-flight work (records stay
/// unconfirmed); closing every [`SinkHandle`] drains and ends it.
pub fn spawn(
    cfg: SinkConfig,
    client: Arc<ApiClient>,
    store: Arc<dyn StateStore>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    stop: CancellationToken,
) -> (SinkHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(4);
    let (dtx, drx) = watch::channel(Durable {
        epochs: 0,
        replication: crate::state::replication_checkpoint(store.as_ref())
            .ok()
            .flatten(),
    });
    let images = cfg.images.clone();
    let shared = task::Shared::new(cfg, client, store, metrics, health, stop);
    let task = crate::ops::heartbeat::spawn("sink", task::run(shared, rx, dtx));
    (
        SinkHandle {
            tx,
            durable: drx,
            images,
        },
        task,
    )
}
