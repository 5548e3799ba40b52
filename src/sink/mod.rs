//! The sink: records in, API verdicts and durable progress out.
//!
//! Sources push [`SinkItem`]s through a bounded channel ([`SinkHandle`]).
//! The sink task gathers them into an [`epoch::Epoch`] (newest version per
//! key) and seals it when `batch.linger` has passed since its first item,
//! when a type holds `max_records × concurrency` keys (or the bytes of that
//! many full requests), or when a source asks ([`SinkItem::Flush`],
//! barriers). One epoch is sent at a time, while the next one fills:
//!
//! 1. types level by level in the schema's dependency order, so a child is
//!    never sent before the parents committed before it or with it;
//! 2. per type: resolve soft deletes, drop records identical to what was
//!    last accepted (fingerprints), dead-letter records that fail local
//!    validation, cut batches by `max_records`/`max_bytes`, send them
//!    concurrently (split on 207/400 to isolate rejected records);
//! 3. one state-store write of every verdict together with the epoch's
//!    progress marks, then a flush, then the marks are published to the
//!    sources (who confirm them to PostgreSQL).
//!
//! When the next epoch is full while one is in flight, the sink stops
//! reading its channel: sources block, and PostgreSQL holds the WAL. If the
//! state store cannot be written, the epoch is retried until it can, so
//! progress stops being confirmed and nothing is lost.

pub mod client;
pub mod deliver;
pub mod epoch;
pub mod policy;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, trace, warn};

use crate::model::record::{Json, Record};
use crate::model::schema::{schema, TypeId};
use crate::model::validate::{describe, validate, Problem};
use crate::ops::health::Health;
use crate::ops::metrics::Metrics;
use crate::state::{
    Checkpoint, DeadLetter, ImagePolicy, KeyState, KeyStatus, ReplicationCheckpoint, StateError,
    StateKey, StateStore, TypeStats, Write,
};
use client::ApiClient;
use deliver::{deliver_batch, deliver_single, Outgoing, Verdict};
use epoch::{Entry, Epoch, Op};

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
        /// Send even if unchanged (dead-letter replay).
        force: bool,
    },
    /// The source row was deleted: send a soft delete.
    Delete {
        /// Its key.
        key: StateKey,
        /// The record built from the old row image, if it had every column.
        basis: Option<Record>,
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
    pub fn upsert(key: StateKey, record: &Record, problems: Vec<Problem>, force: bool) -> SinkItem {
        SinkItem::Upsert {
            key,
            record: Outbound::new(record, problems),
            force,
        }
    }
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
        self.tx.send(items).await.map_err(|_| SinkClosed)
    }

    /// Waits until everything sent before is durable.
    pub async fn barrier(&self) -> Result<(), SinkClosed> {
        let (tx, rx) = oneshot::channel();
        self.send(vec![SinkItem::Barrier(tx)]).await?;
        rx.await.map_err(|_| SinkClosed)
    }

    /// Which mappings keep delete images (sources report each table's
    /// replica identity here).
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

/// Shared by the sink task and the epoch being sent.
struct Shared {
    client: Arc<ApiClient>,
    store: Arc<dyn StateStore>,
    cfg: SinkConfig,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    stats: Mutex<BTreeMap<TypeId, TypeStats>>,
    stop: CancellationToken,
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
    let stats = store.stats().unwrap_or_default();
    let images = cfg.images.clone();
    let shared = Arc::new(Shared {
        client,
        store,
        cfg,
        metrics,
        health,
        stats: Mutex::new(stats),
        stop,
    });
    let task = tokio::spawn(run(shared, rx, dtx));
    (
        SinkHandle {
            tx,
            durable: drx,
            images,
        },
        task,
    )
}

async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Vec<SinkItem>>,
    durable: watch::Sender<Durable>,
) {
    let cfg = &shared.cfg;
    // An epoch holds at most one round of concurrent requests, and at most
    // EPOCH_RECORDS keys of a type / EPOCH_BYTES in all: two epochs (one
    // filling, one in flight) bound the sink's memory whatever the size of
    // a transaction or table.
    let full_records = (cfg.max_records * cfg.concurrency).min(EPOCH_RECORDS);
    let full_bytes = (cfg.max_bytes * cfg.concurrency).min(EPOCH_BYTES);
    let mut open = Epoch::new();
    // One epoch is being delivered (HTTP) while the one before it may still
    // be committing to the state store; commits happen in order. The epoch
    // being delivered reads key states through an overlay of the writes not
    // yet committed, so it sees what the previous epoch decided.
    let mut sending: Option<tokio::task::JoinHandle<Option<Delivered>>> = None;
    let mut committing: Option<tokio::task::JoinHandle<Option<Epoch>>> = None;
    let mut waiting: Option<Delivered> = None;
    let mut overlay: Arc<Overlay> = Arc::new(Overlay::default());
    let mut input_closed = false;
    let mut epochs: u64 = 0;
    loop {
        if committing.is_none() {
            if let Some((epoch, writes)) = waiting.take() {
                committing = Some(tokio::spawn(commit_epoch(shared.clone(), epoch, writes)));
            }
        }
        let due = !open.is_empty()
            && (open.flush
                || input_closed
                || open.is_full(full_records, full_bytes)
                || open.started.is_some_and(|s| s.elapsed() >= cfg.linger));
        if due && sending.is_none() && waiting.is_none() {
            let epoch = std::mem::replace(&mut open, Epoch::new());
            sending = Some(tokio::spawn(send_epoch(
                shared.clone(),
                epoch,
                overlay.clone(),
            )));
            continue;
        }
        if input_closed
            && open.is_empty()
            && sending.is_none()
            && waiting.is_none()
            && committing.is_none()
        {
            break;
        }
        let accepting = !input_closed && !open.is_full(full_records, full_bytes);
        let linger_at = open
            .started
            .map(|s| tokio::time::Instant::from_std(s + cfg.linger));
        let idle = sending.is_none() && waiting.is_none();
        tokio::select! {
            items = rx.recv(), if accepting => match items {
                Some(items) => {
                    for item in items {
                        intake(&shared, &mut open, item);
                    }
                }
                None => input_closed = true,
            },
            _ = sleep_until(linger_at), if linger_at.is_some() && idle => {}
            sent = join(&mut sending), if sending.is_some() => {
                sending = None;
                match sent {
                    Some((epoch, writes)) => {
                        overlay = Arc::new(Overlay::of(&writes));
                        waiting = Some((epoch, writes));
                    }
                    None => {
                        debug!("sink stopping with an unconfirmed epoch; it will be re-read after restart");
                        return;
                    }
                }
            }
            done = join(&mut committing), if committing.is_some() => {
                committing = None;
                match done {
                    Some(epoch) => {
                        epochs += 1;
                        let replication = epoch.marks.iter().rev().find_map(|m| match m {
                            Checkpoint::Replication(r) => Some(r.clone()),
                            _ => None,
                        });
                        durable.send_modify(|d| {
                            d.epochs = epochs;
                            if replication.is_some() {
                                d.replication = replication;
                            }
                        });
                        for b in epoch.barriers {
                            let _ = b.send(());
                        }
                    }
                    None => {
                        debug!("sink stopping with an uncommitted epoch; it will be re-read after restart");
                        return;
                    }
                }
            }
            _ = shared.stop.cancelled(), if sending.is_none() && committing.is_none() => return,
        }
    }
    debug!(epochs, "sink drained");
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn join<T>(h: &mut Option<tokio::task::JoinHandle<Option<T>>>) -> Option<T> {
    match h {
        Some(h) => match h.await {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "epoch task failed");
                None
            }
        },
        None => std::future::pending().await,
    }
}

fn intake(shared: &Shared, open: &mut Epoch, item: SinkItem) {
    match item {
        SinkItem::Upsert { key, record, force } => {
            shared
                .metrics
                .records_read
                .get_or_create(&Metrics::ty(key.ty))
                .inc();
            bump_read(shared, key.ty);
            open.add(key, Op::Upsert { record }, force);
        }
        SinkItem::Delete { key, basis } => {
            shared
                .metrics
                .records_read
                .get_or_create(&Metrics::ty(key.ty))
                .inc();
            bump_read(shared, key.ty);
            open.add(key, Op::Delete { basis }, false);
        }
        SinkItem::Mark(c) => open.mark(c),
        SinkItem::Flush => open.flush = true,
        SinkItem::Barrier(tx) => open.barrier(tx),
    }
}

fn bump_read(shared: &Shared, ty: TypeId) {
    shared
        .stats
        .lock()
        .expect("lock")
        .entry(ty)
        .or_default()
        .read += 1;
}

/// A record ready to go, with what is needed to record its verdict.
struct Prepared {
    key: StateKey,
    json: Bytes,
    image: Option<Bytes>,
    fingerprint: u64,
    cobi_key: Option<String>,
    prior: Option<KeyState>,
}

/// Sends one epoch and commits its verdicts and marks. `None` if abandoned.
/// An epoch whose records have their verdicts, and the writes recording
/// them (not committed yet).
type Delivered = (Epoch, Arc<Vec<Write>>);

/// Key states written by an epoch that is not committed yet (`None`: the
/// key was removed).
#[derive(Default)]
struct Overlay(rustc_hash::FxHashMap<StateKey, Option<KeyState>>);

impl Overlay {
    fn of(writes: &[Write]) -> Overlay {
        let mut m = rustc_hash::FxHashMap::with_capacity_and_hasher(
            writes.len(),
            rustc_hash::FxBuildHasher,
        );
        for w in writes {
            match w {
                Write::Key(k, s) => {
                    m.insert(k.clone(), Some(s.clone()));
                }
                Write::RemoveKey(k) => {
                    m.insert(k.clone(), None);
                }
                _ => {}
            }
        }
        Overlay(m)
    }
}

/// Delivers one epoch (levels in order) and returns its writes; the
/// commit is [`commit_epoch`]'s. `None` if abandoned.
async fn send_epoch(
    shared: Arc<Shared>,
    mut epoch: Epoch,
    overlay: Arc<Overlay>,
) -> Option<Delivered> {
    let started = Instant::now();
    let mut writes: Vec<Write> = Vec::new();
    let records = epoch.len();
    let s = schema();
    for level in 0..=s.max_level {
        let types: Vec<TypeId> = (0..s.types.len() as TypeId)
            .filter(|&t| s.ty(t).level == level && epoch.len_of(t) > 0)
            .collect();
        let mut level_futures = FuturesUnordered::new();
        for ty in types {
            let entries = epoch.take_type(ty);
            level_futures.push(send_type(shared.clone(), ty, entries, overlay.clone()));
        }
        while let Some(result) = level_futures.next().await {
            writes.extend(result?);
        }
    }
    if records > 0 {
        debug!(
            records,
            ms = started.elapsed().as_millis() as u64,
            "epoch delivered"
        );
    }
    Some((epoch, Arc::new(writes)))
}

/// Commits an epoch's writes with its progress marks and counters, then
/// the epoch is durable. `None` on shutdown.
async fn commit_epoch(shared: Arc<Shared>, epoch: Epoch, writes: Arc<Vec<Write>>) -> Option<Epoch> {
    let started = Instant::now();
    let mut all = Vec::with_capacity(epoch.marks.len() + 16);
    for m in &epoch.marks {
        all.push(Write::Checkpoint(m.clone()));
    }
    {
        let stats = shared.stats.lock().expect("lock");
        for (t, st) in stats.iter() {
            all.push(Write::Stats(*t, st.clone()));
        }
    }
    commit(&shared, writes, all).await?;
    debug!(
        writes = epoch.len(),
        marks = epoch.marks.len(),
        ms = started.elapsed().as_millis() as u64,
        "epoch committed"
    );
    Some(epoch)
}

/// Writes and flushes, retrying until the store takes it (disk full,
/// read-only…). `None` on shutdown.
async fn commit(shared: &Arc<Shared>, writes: Arc<Vec<Write>>, last: Vec<Write>) -> Option<()> {
    let last = Arc::new(last);
    let mut attempt = 0u32;
    loop {
        let store = shared.store.clone();
        let w = writes.clone();
        let l = last.clone();
        let retry = attempt > 0;
        let result: Result<(), StateError> = tokio::task::spawn_blocking(move || {
            if retry {
                // A failed store (disk full, read-only) must be reopened
                // before it accepts writes again; this epoch's writes are
                // then applied again in full.
                store.recover()?;
            }
            store.apply(w.as_ref())?;
            store.apply(l.as_ref())?;
            store.flush()
        })
        .await
        .unwrap_or_else(|e| {
            Err(StateError {
                op: "write",
                detail: e.to_string(),
            })
        });
        match result {
            Ok(()) => {
                if !shared.health.set_state(true, None) {
                    info!("state store writable again; confirming progress");
                }
                return Some(());
            }
            Err(e) => {
                if shared.health.set_state(false, Some(e.to_string())) {
                    error!(error = %e, "cannot write the state store; progress is not confirmed \
                        until it can (free disk space or fix permissions on state.dir)");
                }
                let delay = policy::backoff(
                    attempt,
                    Duration::from_millis(200),
                    Duration::from_secs(10),
                    rand::random(),
                );
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.stop.cancelled() => return None,
                }
            }
        }
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Resolves, sends and judges one type's entries. Returns the writes.
async fn send_type(
    shared: Arc<Shared>,
    ty: TypeId,
    entries: Vec<Entry>,
    overlay: Arc<Overlay>,
) -> Option<Vec<Write>> {
    let keep = shared.cfg.images.clone();
    // Read what the store knows of each key, retrying while it fails.
    let mut entries = entries;
    let mut attempt = 0u32;
    let priors = loop {
        let store = shared.store.clone();
        let overlay = overlay.clone();
        let retry = attempt > 0;
        let (back, result) = tokio::task::spawn_blocking(move || {
            if retry {
                if let Err(e) = store.recover() {
                    return (entries, Err(e));
                }
            }
            // The overlay first; the rest in one call (neighbouring keys
            // share the store's pages).
            let mut missing: Vec<&StateKey> = Vec::new();
            let from_overlay: Vec<Option<Option<KeyState>>> = entries
                .iter()
                .map(|e| {
                    let s = overlay.0.get(&e.key).cloned();
                    if s.is_none() {
                        missing.push(&e.key);
                    }
                    s
                })
                .collect();
            let r = store.get_keys(&missing).map(|stored| {
                let mut stored = stored.into_iter();
                from_overlay
                    .into_iter()
                    .map(|s| s.unwrap_or_else(|| stored.next().flatten()))
                    .collect::<Vec<_>>()
            });
            (entries, r)
        })
        .await
        .expect("state reads do not panic");
        entries = back;
        match result {
            Ok(p) => break p,
            Err(e) => {
                if shared.health.set_state(false, Some(e.to_string())) {
                    error!(error = %e, "cannot read the state store; delivery waits until it can");
                }
                let delay = policy::backoff(
                    attempt,
                    Duration::from_millis(200),
                    Duration::from_secs(10),
                    rand::random(),
                );
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.stop.cancelled() => return None,
                }
            }
        }
    };
    let store = shared.store.clone();
    let keep2 = keep.clone();
    let (prepared, mut writes, unchanged, dead_local) =
        tokio::task::spawn_blocking(move || resolve(store.as_ref(), ty, entries, priors, &keep2))
            .await
            .expect("resolve does not panic");
    let label = Metrics::ty(ty);
    if unchanged > 0 {
        shared
            .metrics
            .records_unchanged
            .get_or_create(&label)
            .inc_by(unchanged as u64);
    }
    if dead_local > 0 {
        shared
            .metrics
            .records_dead_lettered
            .get_or_create(&label)
            .inc_by(dead_local as u64);
        warn!(type = %schema().ty(ty).name, count = dead_local,
            "records failed local validation and were dead-lettered; see `cobi-sync dlq list`");
    }
    if prepared.is_empty() {
        return Some(writes);
    }
    let t = schema().ty(ty);
    let outgoing: Vec<Outgoing> = prepared
        .iter()
        .enumerate()
        .map(|(i, p)| Outgoing {
            index: i,
            json: p.json.clone(),
            cobi_key: p.cobi_key.clone(),
        })
        .collect();
    let mut verdicts: Vec<Option<Verdict>> = vec![None; prepared.len()];
    let started = Instant::now();
    let mut requests = 0usize;
    if t.batch {
        let batches = cut_batches(outgoing, shared.cfg.max_records, shared.cfg.max_bytes);
        let mut running: FuturesUnordered<_> = batches
            .into_iter()
            .map(|b| {
                let client = shared.client.clone();
                async move { deliver_batch(&client, ty, b).await }
            })
            .collect();
        while let Some((results, n)) = running.next().await {
            requests += n;
            for (i, v) in results {
                verdicts[i] = v;
            }
        }
    } else {
        let client = shared.client.clone();
        let mut running = futures_util::stream::iter(outgoing.into_iter().map(|o| {
            let client = client.clone();
            async move { (o.index, deliver_single(&client, ty, &o).await) }
        }))
        .buffer_unordered(shared.cfg.concurrency);
        while let Some((i, v)) = running.next().await {
            requests += 1;
            verdicts[i] = v;
        }
    }
    shared
        .metrics
        .batch_latency
        .get_or_create(&label)
        .observe(started.elapsed().as_secs_f64());
    if verdicts.iter().any(|v| v.is_none()) {
        return None;
    }
    let now = now_rfc3339();
    let mut sent = 0u64;
    let mut dead = 0u64;
    for (p, v) in prepared.into_iter().zip(verdicts) {
        match v.expect("checked") {
            Verdict::Accepted => {
                sent += 1;
                let delete_image = keep.keeps(&p.key.mapping).then_some(p.image).flatten();
                if p.prior
                    .as_ref()
                    .is_some_and(|s| s.status == KeyStatus::DeadLettered)
                {
                    writes.push(Write::RemoveDeadLetter(p.key.clone()));
                }
                writes.push(Write::Key(
                    p.key,
                    KeyState {
                        status: KeyStatus::Accepted,
                        fingerprint: p.fingerprint,
                        delete_image,
                    },
                ));
            }
            Verdict::Rejected(reason) => {
                dead += 1;
                trace!(type = %t.name, source_key = %p.key.source_key, %reason, "record rejected by the api");
                writes.extend(dead_letter_writes(
                    shared.store.as_ref(),
                    &p.key,
                    p.cobi_key,
                    &p.json,
                    p.fingerprint,
                    p.prior,
                    reason,
                    &now,
                ));
            }
        }
    }
    if sent > 0 {
        shared
            .metrics
            .records_sent
            .get_or_create(&label)
            .inc_by(sent);
        shared
            .metrics
            .last_success
            .get_or_create(&label)
            .set(chrono::Utc::now().timestamp_micros() as f64 / 1e6);
        let mut stats = shared.stats.lock().expect("lock");
        let st = stats.entry(ty).or_default();
        st.sent += sent;
        st.last_success = Some(now.clone());
    }
    if dead > 0 {
        shared
            .metrics
            .records_dead_lettered
            .get_or_create(&label)
            .inc_by(dead);
        warn!(type = %t.name, count = dead, "records rejected by the cobi api were dead-lettered; see `cobi-sync dlq list`");
    }
    debug!(type = %t.name, sent, dead, requests, ms = started.elapsed().as_millis() as u64, "type delivered");
    Some(writes)
}

/// Per entry: resolve deletes, skip unchanged, dead-letter invalid.
fn resolve(
    store: &dyn StateStore,
    ty: TypeId,
    entries: Vec<Entry>,
    priors: Vec<Option<KeyState>>,
    keep: &ImagePolicy,
) -> (Vec<Prepared>, Vec<Write>, usize, usize) {
    let t = schema().ty(ty);
    let now = now_rfc3339();
    let mut prepared = Vec::with_capacity(entries.len());
    let mut writes = Vec::new();
    let mut unchanged = 0;
    let mut dead = 0;
    for (entry, prior) in entries.into_iter().zip(priors) {
        let out = match entry.op {
            Op::Upsert { record } => record,
            Op::Delete { basis } => {
                let Some(is_deleted) = t.field("is_deleted") else {
                    continue; // interactions have no soft delete
                };
                let from_store = || {
                    prior
                        .as_ref()
                        .and_then(|p| p.delete_image.as_ref())
                        .and_then(|i| crate::state::image::decode(ty, i).ok())
                };
                match basis.or_else(from_store) {
                    Some(mut r) => {
                        r.set(is_deleted, Json::Bool(true));
                        Outbound::new(&r, Vec::new())
                    }
                    None => {
                        // Never accepted: nothing to delete at Cobi. A dead
                        // letter for it is moot now.
                        if prior
                            .as_ref()
                            .is_some_and(|p| p.status == KeyStatus::DeadLettered)
                        {
                            writes.push(Write::RemoveDeadLetter(entry.key.clone()));
                            writes.push(Write::RemoveKey(entry.key.clone()));
                        } else if prior.is_some() && !keep.keeps(&entry.key.mapping) {
                            debug!(type = %t.name, "delete of a record whose content was not kept; not sent");
                        }
                        continue;
                    }
                }
            }
        };
        if !entry.force
            && prior
                .as_ref()
                .is_some_and(|p| p.fingerprint == out.fingerprint)
        {
            unchanged += 1;
            continue;
        }
        if !out.problems.is_empty() {
            dead += 1;
            writes.extend(dead_letter_writes(
                store,
                &entry.key,
                out.cobi_key,
                &out.json,
                out.fingerprint,
                prior,
                describe(&out.problems),
                &now,
            ));
            continue;
        }
        prepared.push(Prepared {
            key: entry.key,
            json: out.json,
            image: out.image,
            fingerprint: out.fingerprint,
            cobi_key: out.cobi_key,
            prior,
        });
    }
    (prepared, writes, unchanged, dead)
}

#[allow(clippy::too_many_arguments)]
fn dead_letter_writes(
    store: &dyn StateStore,
    key: &StateKey,
    cobi_key: Option<String>,
    json: &[u8],
    fingerprint: u64,
    prior: Option<KeyState>,
    reason: String,
    now: &str,
) -> Vec<Write> {
    let existing = store.dead_letter(key).ok().flatten();
    let dl = DeadLetter {
        ty: schema().ty(key.ty).name.clone(),
        mapping: key.mapping.to_string(),
        cobi_key,
        source_key: key.source_key.clone(),
        record: String::from_utf8_lossy(json).into_owned(),
        reason,
        attempts: existing.as_ref().map_or(1, |d| d.attempts + 1),
        first_at: existing.map_or_else(|| now.to_string(), |d| d.first_at),
        last_at: now.to_string(),
    };
    vec![
        Write::DeadLetter(key.clone(), Box::new(dl)),
        Write::Key(
            key.clone(),
            KeyState {
                status: KeyStatus::DeadLettered,
                fingerprint,
                // Keep what Cobi last accepted, for a later soft delete.
                delete_image: prior.and_then(|p| p.delete_image),
            },
        ),
    ]
}

/// Cuts records into request-sized batches (records and body bytes).
fn cut_batches(records: Vec<Outgoing>, max_records: usize, max_bytes: usize) -> Vec<Vec<Outgoing>> {
    let mut out = Vec::new();
    let mut cur: Vec<Outgoing> = Vec::new();
    let mut bytes = 14usize;
    for r in records {
        let size = r.json.len() + 1;
        if !cur.is_empty() && (cur.len() >= max_records || bytes + size > max_bytes) {
            out.push(std::mem::take(&mut cur));
            bytes = 14;
        }
        bytes += size;
        cur.push(r);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_count_and_bytes() {
        let rec = |i: usize, len: usize| Outgoing {
            index: i,
            json: Bytes::from(vec![b'x'; len]),
            cobi_key: None,
        };
        let b = cut_batches((0..10).map(|i| rec(i, 10)).collect(), 4, 1 << 20);
        assert_eq!(b.iter().map(|b| b.len()).collect::<Vec<_>>(), [4, 4, 2]);
        // 14 bytes of envelope + 11 per record: 3 records fit in 50 bytes.
        let b = cut_batches((0..7).map(|i| rec(i, 10)).collect(), 100, 50);
        assert_eq!(b.iter().map(|b| b.len()).collect::<Vec<_>>(), [3, 3, 1]);
        // A record larger than max_bytes still goes, alone.
        let b = cut_batches(vec![rec(0, 100), rec(1, 1)], 100, 50);
        assert_eq!(b.iter().map(|b| b.len()).collect::<Vec<_>>(), [1, 1]);
    }
}
