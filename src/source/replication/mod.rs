//! Replication mode: logical replication (pgoutput, protocol 1) with a
//! consistent, resumable initial snapshot.
//!
//! # The stream
//! [`setup`] checks the server and tables, creates the publication (before
//! the slot) and the slot. [`stream`] opens the replication connection at
//! the durable position. Each transaction's changes are decoded
//! ([`pgoutput`]), mapped and sent to the sink as they arrive (a large
//! transaction never sits in memory); its commit becomes a progress mark
//! carrying the commit's end LSN. The sink publishes what is durable and
//! only that is confirmed to PostgreSQL. Keepalives and heartbeat messages
//! (`pg_logical_emit_message`, every 10 s) advance the position when no
//! mapped table changes, so a quiet source never pins WAL.
//!
//! # The snapshot (watermarks with exact visibility)
//! Tables are copied in upload order, in key-ordered chunks, *while* the
//! stream runs (the approach of Netflix's DBLog, made exact with
//! transaction ids). For each chunk:
//!
//! 1. in a `REPEATABLE READ` transaction, read `pg_current_snapshot()` and
//!    the next chunk of rows after the last key;
//! 2. emit a watermark with `pg_logical_emit_message` in a transaction of
//!    its own, which commits after every transaction the chunk's snapshot
//!    can see, so it arrives in the stream after all of them;
//! 3. until the watermark arrives in the stream, a change to a key in the
//!    chunk's range is delivered (and the key dropped from the chunk) if its
//!    transaction is *invisible* to the chunk's snapshot, and skipped if
//!    visible (the chunk already holds it);
//! 4. at the watermark, the remaining chunk rows are delivered, and the
//!    table's progress (last key) moves with the stream position in one
//!    checkpoint.
//!
//! Changes to keys not yet copied are skipped (a later chunk reads them);
//! their transaction ids are remembered, and a chunk is only accepted once
//! its snapshot sees every skipped transaction (this closes the window in
//! which a commit is decoded before it becomes visible, e.g. while waiting
//! for a synchronous standby). Changes to keys already copied are delivered.
//! Because tables are copied parents first and chunk rows are delivered at
//! their watermark position, a child row never reaches the sink before the
//! parent it references. An interrupted snapshot resumes at the last
//! durable chunk; the stream restarts at the matching position.

pub mod pgoutput;
pub mod setup;
pub mod stream;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_postgres::{Client, IsolationLevel};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{OnDelete, OnTruncate, Settings, SnapshotMode};
use crate::mapping::decode::text::decode_text;
use crate::mapping::engine::{source_key, Column, CompiledMapping, MapContext};
use crate::mapping::value::{oid, PgType, Value};
use crate::model::record::Record;
use crate::model::schema::TypeId;
use crate::model::validate::Problem;
use crate::ops::health::Health;
use crate::ops::metrics::{Metrics, TypeLabel};
use crate::sink::{SinkHandle, SinkItem};
use crate::source::pg;
use crate::source::reader::{cursor_value, RowStream, SetupError, SourceTable};
use crate::source::{backoff_sleep, SourceError};
use crate::state::{
    replication_checkpoint, Checkpoint, CursorValue, KeyStatus, Position, ReplicationCheckpoint,
    StateKey, StateStore, TableSnapshot, Write,
};
use pgoutput::{Message, Relation, Tuple, TupleValue};
use stream::{ReplicationStream, StreamEvent};

/// Prefix of snapshot watermark messages.
pub const WATERMARK_PREFIX: &str = "cobi-sync-watermark";
/// Prefix of heartbeat messages.
pub const HEARTBEAT_PREFIX: &str = "cobi-sync-heartbeat";
/// Rows per snapshot chunk.
pub const CHUNK_ROWS: usize = 10_000;
/// Items handed to the sink at once.
const SEND_BATCH: usize = 1_000;
/// How often a heartbeat is emitted and the slot lag checked.
const HEARTBEAT: Duration = Duration::from_secs(10);

/// Runs replication mode until `stop`.
pub async fn run(
    settings: Settings,
    store: Arc<dyn StateStore>,
    sink: SinkHandle,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> Result<(), SourceError> {
    let mut r = Replicator::new(settings, store, sink, health, metrics, stop);
    r.run(false).await.map(|_| ())
}

/// The `snapshot` command in replication mode: marks the mappings of
/// `types` (all when empty) as not copied — re-creating the slot if it was
/// dropped or lost — and runs the stream until every table is copied and
/// delivered. Returns the rows copied.
pub async fn snapshot_command(
    settings: Settings,
    store: Arc<dyn StateStore>,
    sink: SinkHandle,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    types: &[TypeId],
    stop: CancellationToken,
) -> Result<u64, SourceError> {
    let mut cp = replication_checkpoint(store.as_ref())
        .map_err(|e| SourceError::Fatal(e.to_string()))?
        .unwrap_or_default();
    for m in &settings.mappings {
        if types.is_empty() || types.contains(&m.ty) {
            cp.tables
                .insert(m.id.to_string(), TableSnapshot::NotStarted);
        }
    }
    // Going back to "not copied" is the one deliberate backwards move:
    // replace the checkpoint rather than advance it.
    store
        .remove_checkpoint("replication")
        .map_err(|e| SourceError::Fatal(e.to_string()))?;
    store
        .apply(&[Write::Checkpoint(Checkpoint::Replication(cp))])
        .and_then(|_| store.flush())
        .map_err(|e| SourceError::Fatal(e.to_string()))?;
    let mut r = Replicator::new(settings, store, sink, health, metrics, stop);
    r.recreate_slot = true;
    r.run(true).await
}

/// A PostgreSQL snapshot (`pg_current_snapshot()`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct PgSnapshot {
    xmin: u64,
    xmax: u64,
    xip: HashSet<u64>,
}

impl PgSnapshot {
    fn parse(s: &str) -> Option<PgSnapshot> {
        let mut it = s.splitn(3, ':');
        let xmin = it.next()?.parse().ok()?;
        let xmax = it.next()?.parse().ok()?;
        let xip = it
            .next()
            .unwrap_or("")
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().ok())
            .collect::<Option<HashSet<u64>>>()?;
        Some(PgSnapshot { xmin, xmax, xip })
    }

    /// Whether a committed transaction is visible to this snapshot.
    fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.xip.contains(&xid))
    }

    /// A 32-bit xid from the stream, widened with this snapshot's epoch.
    fn widen(&self, xid: u32) -> u64 {
        let epoch = self.xmax >> 32;
        let full = (epoch << 32) | xid as u64;
        if full > self.xmax + (1 << 31) && epoch > 0 {
            full - (1 << 32)
        } else {
            full
        }
    }
}

/// A chunk read but not yet delivered.
struct PendingChunk {
    table: usize,
    id: String,
    lower: Option<Vec<Value>>,
    upper: Option<Vec<Value>>,
    upper_position: Option<Position>,
    snapshot: PgSnapshot,
    rows: Vec<Option<Vec<Value>>>,
    index: HashMap<String, usize>,
}

impl PendingChunk {
    fn in_range(&self, key: &[Value]) -> bool {
        let above_lower = self.lower.as_ref().is_none_or(|l| cmp_keys(key, l).is_gt());
        let below_upper = self.upper.as_ref().is_none_or(|u| cmp_keys(key, u).is_le());
        above_lower && below_upper
    }
}

fn cmp_keys(a: &[Value], b: &[Value]) -> std::cmp::Ordering {
    for (x, y) in a.iter().zip(b) {
        let o = x.key_cmp(y);
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    a.len().cmp(&b.len())
}

/// A mapping of a relation in the stream.
struct RelMapping {
    table: usize,
    compiled: Arc<Result<CompiledMapping, String>>,
    /// Relation positions of the mapping's key columns.
    key: Arc<[usize]>,
    /// Relation positions the mapping reads.
    used: Arc<[usize]>,
}

/// A relation as the stream describes it, shared (cheap to hold per
/// change).
struct RelState {
    rel: Relation,
    names: Arc<[String]>,
    types: Arc<[PgType]>,
    mappings: Vec<RelMapping>,
}

enum SessionEnd {
    Stopped,
    SnapshotDone,
}

struct Replicator {
    settings: Settings,
    store: Arc<dyn StateStore>,
    sink: SinkHandle,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    ctx: MapContext,
    tables: Vec<SourceTable>,
    by_name: HashMap<(String, String), Vec<usize>>,
    relations: HashMap<u32, RelState>,
    types: HashMap<u32, PgType>,
    checkpoint: ReplicationCheckpoint,
    last_keys: Vec<Option<Vec<Value>>>,
    pending: Option<PendingChunk>,
    skipped: BTreeSet<u64>,
    /// The newest snapshot read: its epoch widens 32-bit xids.
    reference: Option<PgSnapshot>,
    in_tx: Option<u32>,
    items: Vec<SinkItem>,
    chunk_seq: u64,
    copied: u64,
    recreate_slot: bool,
    lag_alarm: bool,
    snapshot_log: Instant,
}

fn fatal_db(
    url: &crate::config::pgurl::PgUrl,
) -> impl Fn(tokio_postgres::Error) -> SessionError + '_ {
    move |e| SessionError::Transient(pg::explain(&e, url))
}

enum SessionError {
    Transient(String),
    Fatal(SourceError),
}

impl From<SourceError> for SessionError {
    fn from(e: SourceError) -> Self {
        SessionError::Fatal(e)
    }
}

impl Replicator {
    fn new(
        settings: Settings,
        store: Arc<dyn StateStore>,
        sink: SinkHandle,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> Self {
        let ctx = MapContext::from_settings(&settings);
        Replicator {
            settings,
            store,
            sink,
            health,
            metrics,
            stop,
            ctx,
            tables: Vec::new(),
            by_name: HashMap::new(),
            relations: HashMap::new(),
            types: HashMap::new(),
            checkpoint: ReplicationCheckpoint::default(),
            last_keys: Vec::new(),
            pending: None,
            skipped: BTreeSet::new(),
            reference: None,
            in_tx: None,
            items: Vec::new(),
            chunk_seq: 0,
            copied: 0,
            recreate_slot: false,
            lag_alarm: false,
            snapshot_log: Instant::now(),
        }
    }

    /// Connects, sets up, streams; reconnects on failures. With
    /// `until_snapshot_done`, returns once every table is copied and
    /// delivered.
    async fn run(&mut self, until_snapshot_done: bool) -> Result<u64, SourceError> {
        let mut attempt = 0u32;
        let mut set_up = false;
        loop {
            if self.stop.is_cancelled() {
                return Ok(self.copied);
            }
            let mut client = match pg::connect(&self.settings.source).await {
                Ok(c) => c,
                Err(e) => {
                    self.health.set_source(false, Some(e.message.clone()));
                    if !e.transient && !set_up {
                        return Err(SourceError::Fatal(e.message));
                    }
                    warn!(error = %e.message, "cannot connect to the source database; retrying");
                    if !backoff_sleep(&self.stop, &mut attempt).await {
                        return Ok(self.copied);
                    }
                    continue;
                }
            };
            if !set_up {
                self.setup(&client).await?;
                set_up = true;
            }
            self.load_checkpoint()?;
            let start = self.checkpoint.lsn;
            let stream = match stream::open(&self.settings.source, start, start).await {
                Ok(s) => s,
                Err(e) if e.fatal => return Err(SourceError::Fatal(e.message)),
                Err(e) => {
                    if e.slot_in_use {
                        let _ =
                            setup::terminate_ours(&client, &self.settings.source.replication.slot)
                                .await;
                    }
                    self.health.set_source(false, Some(e.message.clone()));
                    warn!(error = %e.message, "cannot start replication; retrying");
                    if !backoff_sleep(&self.stop, &mut attempt).await {
                        return Ok(self.copied);
                    }
                    continue;
                }
            };
            if attempt > 0 {
                info!("replication reconnected");
            }
            attempt = 0;
            self.health.set_source(true, None);
            info!(
                slot = %self.settings.source.replication.slot,
                from = %crate::ops::status::format_lsn(start),
                "streaming changes"
            );
            let result = self.session(&mut client, stream, until_snapshot_done).await;
            match result {
                Ok(SessionEnd::Stopped) => return Ok(self.copied),
                Ok(SessionEnd::SnapshotDone) => return Ok(self.copied),
                Err(SessionError::Fatal(e)) => return Err(e),
                Err(SessionError::Transient(msg)) => {
                    self.health.set_source(false, Some(msg.clone()));
                    warn!(error = %msg, "replication interrupted; reconnecting from the last confirmed position");
                    // Let the sink finish what it holds so the durable
                    // position covers everything sent; the stream then
                    // resumes from there (duplicates are skipped by
                    // fingerprint).
                    tokio::select! {
                        _ = self.sink.barrier() => {}
                        _ = self.stop.cancelled() => return Ok(self.copied),
                    }
                    if !backoff_sleep(&self.stop, &mut attempt).await {
                        return Ok(self.copied);
                    }
                }
            }
        }
    }

    async fn setup(&mut self, client: &Client) -> Result<(), SourceError> {
        setup::check_server(client).await?;
        let mut ordered: Vec<_> = self.settings.mappings.clone();
        ordered.sort_by_key(|m| (m.ty, m.index));
        let mut errors = Vec::new();
        let mut tables = Vec::new();
        for m in &ordered {
            match SourceTable::resolve(client, m, self.ctx).await {
                Ok(t) => tables.push(t),
                Err(SetupError::Config(e)) => errors.push(e),
                Err(SetupError::Db(e)) => {
                    return Err(SourceError::Fatal(pg::explain(
                        &e,
                        &self.settings.source.url,
                    )))
                }
            }
        }
        if !errors.is_empty() {
            return Err(SourceError::Config(errors.join("\n")));
        }
        setup::check_tables(client, &tables).await?;
        let rs = &self.settings.source.replication;
        setup::ensure_publication(client, &rs.publication, &tables).await?;
        let known = replication_checkpoint(self.store.as_ref())
            .map_err(|e| SourceError::Fatal(e.to_string()))?
            .map_or(0, |c| c.lsn);
        let slot = setup::ensure_slot(client, &rs.slot, known, self.recreate_slot).await?;
        if let setup::SlotState::Created(lsn) = slot {
            // A new slot: whatever position was stored belongs to an old one.
            let mut cp = replication_checkpoint(self.store.as_ref())
                .map_err(|e| SourceError::Fatal(e.to_string()))?
                .unwrap_or_default();
            cp.lsn = lsn;
            self.store
                .remove_checkpoint("replication")
                .map_err(|e| SourceError::Fatal(e.to_string()))?;
            self.store
                .apply(&[Write::Checkpoint(Checkpoint::Replication(cp))])
                .and_then(|_| self.store.flush())
                .map_err(|e| SourceError::Fatal(e.to_string()))?;
        }
        for (i, t) in tables.iter().enumerate() {
            if let Some(info) = &t.table {
                self.by_name
                    .entry((info.schema.clone(), info.name.clone()))
                    .or_default()
                    .push(i);
            }
        }
        self.tables = tables;
        Ok(())
    }

    /// Reloads the durable checkpoint and resets per-session state.
    fn load_checkpoint(&mut self) -> Result<(), SourceError> {
        let mut cp = replication_checkpoint(self.store.as_ref())
            .map_err(|e| SourceError::Fatal(e.to_string()))?
            .unwrap_or_default();
        let initial = self.settings.source.replication.snapshot == SnapshotMode::Initial;
        let mut tables = BTreeMap::new();
        self.last_keys = Vec::with_capacity(self.tables.len());
        for t in &self.tables {
            let st = cp.tables.remove(&*t.mapping.id).unwrap_or(if initial {
                TableSnapshot::NotStarted
            } else {
                TableSnapshot::Done
            });
            self.last_keys.push(match &st {
                TableSnapshot::InProgress(p) => Some(position_values(t, p)),
                _ => None,
            });
            tables.insert(t.mapping.id.to_string(), st);
        }
        cp.tables = tables;
        self.checkpoint = cp;
        self.pending = None;
        self.skipped.clear();
        self.in_tx = None;
        self.items.clear();
        self.relations.clear();
        Ok(())
    }

    fn table_state(&self, i: usize) -> &TableSnapshot {
        &self.checkpoint.tables[&*self.tables[i].mapping.id]
    }

    fn snapshot_remaining(&self) -> Option<usize> {
        (0..self.tables.len()).find(|&i| *self.table_state(i) != TableSnapshot::Done)
    }

    async fn session<S: ReplicationStream>(
        &mut self,
        client: &mut Client,
        mut stream: S,
        until_snapshot_done: bool,
    ) -> Result<SessionEnd, SessionError> {
        let mut durable = self.sink.durable();
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let url = self.settings.source.url.clone();
        let snap_text: String = match client
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await
        {
            Ok(r) => r.get(0),
            Err(e) => {
                stream.close().await;
                return Err(fatal_db(&url)(e));
            }
        };
        self.reference = PgSnapshot::parse(&snap_text);
        let result = loop {
            crate::ops::heartbeat::tick();
            if self.in_tx.is_none() && self.pending.is_none() {
                match self.snapshot_remaining() {
                    Some(i) => {
                        if let Err(e) = self.read_chunk(client, i).await {
                            break Err(e);
                        }
                    }
                    None if until_snapshot_done => {
                        if let Err(e) = self.mark().await {
                            break Err(e);
                        }
                        tokio::select! {
                            _ = self.sink.barrier() => {}
                            _ = self.stop.cancelled() => {}
                        }
                        break Ok(SessionEnd::SnapshotDone);
                    }
                    None => {}
                }
            }
            tokio::select! {
                ev = stream.recv() => match ev {
                    Ok(Some(ev)) => {
                        if let Err(e) = self.on_event(client, ev).await {
                            break Err(e);
                        }
                    }
                    Ok(None) => break Err(SessionError::Transient("the replication stream ended".into())),
                    Err(e) => break Err(SessionError::Transient(e.message)),
                },
                changed = durable.changed() => {
                    if changed.is_err() {
                        break Ok(SessionEnd::Stopped);
                    }
                    if let Some(r) = &durable.borrow_and_update().replication {
                        stream.confirm(r.lsn);
                    }
                },
                _ = heartbeat.tick() => {
                    if let Err(e) = self.heartbeat(client).await.map_err(fatal_db(&url)) {
                        break Err(e);
                    }
                    if let Err(e) = self.check_lag(client).await {
                        break Err(e);
                    }
                },
                _ = self.stop.cancelled() => break Ok(SessionEnd::Stopped),
            }
        };
        stream.close().await;
        result
    }

    async fn heartbeat(&self, client: &Client) -> Result<(), tokio_postgres::Error> {
        client
            .execute(
                "SELECT pg_logical_emit_message(false, $1, '')",
                &[&HEARTBEAT_PREFIX],
            )
            .await?;
        Ok(())
    }

    async fn check_lag(&mut self, client: &Client) -> Result<(), SessionError> {
        let slot = &self.settings.source.replication.slot;
        let row = client
            .query_opt(
                "SELECT COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::int8, \
                        COALESCE(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
                &[slot],
            )
            .await
            .map_err(fatal_db(&self.settings.source.url))?;
        let Some(row) = row else {
            return Err(SessionError::Fatal(SourceError::Fatal(format!(
                "replication slot {slot} disappeared while streaming (dropped by someone?): run \
                 `cobi-sync snapshot` to re-create it and re-sync"
            ))));
        };
        let lag: i64 = row.get(0);
        let status: String = row.get(1);
        if status == "lost" {
            return Err(SessionError::Fatal(SourceError::Fatal(format!(
                "replication slot {slot} was invalidated by the server (WAL removed, see \
                 max_slot_wal_keep_size); run `cobi-sync snapshot` to re-create it and re-sync"
            ))));
        }
        let lag = lag.max(0) as u64;
        let max = self.settings.source.replication.max_slot_lag;
        self.metrics.slot_lag_bytes.set(lag as i64);
        self.health.set_slot_lag(lag, max);
        if lag > max && !self.lag_alarm {
            self.lag_alarm = true;
            error!(lag_bytes = lag, max_slot_lag = max, slot = %slot,
                "replication slot lag is above max_slot_lag: PostgreSQL is keeping WAL for cobi-sync. \
                 Check that the Cobi API accepts records (status, dlq) and that the daemon keeps up");
        } else if lag <= max && self.lag_alarm {
            self.lag_alarm = false;
            info!(
                lag_bytes = lag,
                "replication slot lag back under max_slot_lag"
            );
        }
        Ok(())
    }

    async fn flush_items(&mut self) -> Result<(), SessionError> {
        if self.items.is_empty() {
            return Ok(());
        }
        let items = std::mem::take(&mut self.items);
        self.sink
            .send(items)
            .await
            .map_err(|_| SessionError::Fatal(SourceError::Fatal("the sink stopped".into())))
    }

    async fn push(&mut self, item: SinkItem) -> Result<(), SessionError> {
        self.items.push(item);
        if self.items.len() >= SEND_BATCH {
            self.flush_items().await?;
        }
        Ok(())
    }

    /// Sends a progress mark for the current position.
    async fn mark(&mut self) -> Result<(), SessionError> {
        self.push(SinkItem::Mark(Checkpoint::Replication(
            self.checkpoint.clone(),
        )))
        .await?;
        self.flush_items().await
    }

    async fn on_event(&mut self, client: &mut Client, ev: StreamEvent) -> Result<(), SessionError> {
        match ev {
            StreamEvent::Begin { xid, .. } => self.in_tx = Some(xid),
            StreamEvent::Commit { end_lsn } => {
                self.in_tx = None;
                self.checkpoint.lsn = self.checkpoint.lsn.max(end_lsn);
                self.mark().await?;
            }
            StreamEvent::KeepAlive { wal_end } => {
                if self.in_tx.is_none() && wal_end > self.checkpoint.lsn {
                    self.checkpoint.lsn = wal_end;
                    self.mark().await?;
                }
            }
            StreamEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                if prefix == WATERMARK_PREFIX
                    && self
                        .pending
                        .as_ref()
                        .is_some_and(|p| p.id.as_bytes() == content.as_ref())
                {
                    self.emit_chunk(lsn).await?;
                } else if !transactional && self.in_tx.is_none() && lsn > self.checkpoint.lsn {
                    self.checkpoint.lsn = lsn;
                    self.mark().await?;
                }
            }
            StreamEvent::Data(data) => self.on_data(client, data).await?,
        }
        Ok(())
    }

    async fn on_data(&mut self, client: &mut Client, data: Bytes) -> Result<(), SessionError> {
        let msg = match pgoutput::decode(&data) {
            Ok(m) => m,
            Err(e) => {
                return Err(SessionError::Transient(format!(
                    "cannot decode a pgoutput message: {e}"
                )));
            }
        };
        match msg {
            Message::Relation(rel) => self.on_relation(client, rel).await?,
            Message::Begin { xid, .. } => self.in_tx = Some(xid),
            Message::Commit { end_lsn, .. } => {
                self.in_tx = None;
                self.checkpoint.lsn = self.checkpoint.lsn.max(end_lsn);
                self.mark().await?;
            }
            Message::Insert { relation, new } => {
                self.on_change(client, relation, None, false, Some(new))
                    .await?
            }
            Message::Update {
                relation,
                old,
                old_is_key_only,
                new,
            } => {
                self.on_change(client, relation, old, old_is_key_only, Some(new))
                    .await?
            }
            Message::Delete {
                relation,
                old,
                old_is_key_only,
            } => {
                self.on_change(client, relation, Some(old), old_is_key_only, None)
                    .await?
            }
            Message::Truncate { relations, .. } => self.on_truncate(relations).await?,
            Message::Type { .. } | Message::Origin { .. } | Message::LogicalMessage { .. } => {}
        }
        Ok(())
    }

    /// Resolves type OIDs that are not built in (domains, enums, arrays of
    /// them) through the catalog.
    async fn resolve_types(&mut self, client: &Client, oids: &[u32]) -> Result<(), SessionError> {
        let unknown: Vec<u32> = oids
            .iter()
            .copied()
            .filter(|o| {
                !self.types.contains_key(o) && !oid::is_native(*o) && oid::array_elem(*o).is_none()
            })
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let rows = client
            .query(
                "SELECT t.oid, COALESCE(NULLIF(t.typbasetype, 0), t.oid), \
                        format_type(COALESCE(NULLIF(t.typbasetype, 0), t.oid), NULL), \
                        bt.typelem, bt.typcategory::text \
                 FROM pg_type t JOIN pg_type bt ON bt.oid = COALESCE(NULLIF(t.typbasetype, 0), t.oid) \
                 WHERE t.oid = ANY($1)",
                &[&unknown],
            )
            .await
            .map_err(fatal_db(&self.settings.source.url))?;
        for r in rows {
            let o: u32 = r.get(0);
            let base: u32 = r.get(1);
            let elem: u32 = r.get(3);
            let cat: String = r.get(4);
            self.types.insert(
                o,
                PgType {
                    oid: base,
                    name: r.get(2),
                    elem: (cat == "A" && elem != 0).then_some(elem),
                },
            );
        }
        Ok(())
    }

    fn pg_type(&self, o: u32) -> PgType {
        self.types.get(&o).cloned().unwrap_or(PgType {
            oid: o,
            name: String::new(),
            elem: oid::array_elem(o),
        })
    }

    async fn on_relation(&mut self, client: &Client, rel: Relation) -> Result<(), SessionError> {
        let oids: Vec<u32> = rel.columns.iter().map(|c| c.type_oid).collect();
        self.resolve_types(client, &oids).await?;
        let types: Vec<PgType> = oids.iter().map(|o| self.pg_type(*o)).collect();
        let columns: Vec<Column> = rel
            .columns
            .iter()
            .zip(&types)
            .map(|(c, t)| Column {
                name: c.name.clone(),
                ty: t.clone(),
            })
            .collect();
        let mut mappings = Vec::new();
        for &i in self
            .by_name
            .get(&(rel.namespace.clone(), rel.name.clone()))
            .into_iter()
            .flatten()
        {
            let t = &self.tables[i];
            let keys = t.key_names();
            let compiled = CompiledMapping::compile(&t.mapping, &keys, &columns, self.ctx)
                .map_err(|errs| errs.join("; "));
            if let Err(e) = &compiled {
                error!(mapping = %t.mapping.label(), error = %e,
                    "the table changed and the mapping no longer applies; its changes become dead \
                     letters until the mapping is fixed (then run `cobi-sync snapshot --type {}`)",
                    crate::model::schema::schema().ty(t.mapping.ty).name);
            }
            let pos = |n: &str| columns.iter().position(|c| c.name == n);
            let key: Vec<usize> = keys.iter().filter_map(|k| pos(k)).collect();
            let used = match &compiled {
                Ok(c) => c.used_positions(),
                Err(_) => Vec::new(),
            };
            mappings.push(RelMapping {
                table: i,
                compiled: Arc::new(compiled),
                key: key.into(),
                used: used.into(),
            });
        }
        debug!(relation = %format!("{}.{}", rel.namespace, rel.name), mappings = mappings.len(), "relation");
        self.relations.insert(
            rel.oid,
            RelState {
                names: columns.iter().map(|c| c.name.clone()).collect(),
                rel,
                types: types.into(),
                mappings,
            },
        );
        Ok(())
    }

    /// Decodes a tuple; `None` entries are unchanged TOAST values.
    fn decode_tuple(
        types: &[PgType],
        tuple: &Tuple,
        names: &[String],
    ) -> (Vec<Option<Value>>, Vec<Problem>) {
        let mut problems = Vec::new();
        let values = tuple
            .0
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                TupleValue::Null => Some(Value::Null),
                TupleValue::UnchangedToast => None,
                TupleValue::Text(b) | TupleValue::Binary(b) => match types.get(i) {
                    Some(t) => match decode_text(t, b) {
                        Ok(v) => Some(v),
                        Err(e) => {
                            problems.push(Problem {
                                field: names.get(i).cloned().unwrap_or_default(),
                                reason: e.to_string(),
                            });
                            Some(Value::Null)
                        }
                    },
                    None => Some(Value::Null),
                },
            })
            .collect();
        (values, problems)
    }

    /// Whether a change to `key` of table `i` in transaction `xid` is
    /// delivered now (see the module docs).
    fn snapshot_allows(&mut self, i: usize, key: &[Value], xid: Option<u32>) -> bool {
        match self.table_state(i) {
            TableSnapshot::Done => return true,
            TableSnapshot::InProgress(_) | TableSnapshot::NotStarted => {}
        }
        if let Some(p) = &mut self.pending {
            if p.table == i && p.in_range(key) {
                let visible = xid.is_some_and(|x| p.snapshot.sees(p.snapshot.widen(x)));
                if visible {
                    return false;
                }
                let sk = source_key(key.iter());
                if let Some(&idx) = p.index.get(&sk) {
                    p.rows[idx] = None;
                }
                return true;
            }
        }
        if let Some(last) = &self.last_keys[i] {
            if cmp_keys(key, last).is_le() {
                return true;
            }
        }
        if let Some(x) = xid {
            let full = self.reference.as_ref().map_or(x as u64, |s| s.widen(x));
            self.skipped.insert(full);
        }
        false
    }

    async fn on_change(
        &mut self,
        client: &mut Client,
        relation: u32,
        old: Option<Tuple>,
        old_is_key_only: bool,
        new: Option<Tuple>,
    ) -> Result<(), SessionError> {
        let Some(rs) = self.relations.get(&relation) else {
            return Err(SessionError::Transient(format!(
                "change for unknown relation {relation}"
            )));
        };
        if rs.mappings.is_empty() {
            return Ok(());
        }
        let names = rs.names.clone();
        let types = rs.types.clone();
        let (new_vals, new_problems) = match &new {
            Some(t) => {
                let (v, p) = Self::decode_tuple(&types, t, &names);
                (Some(v), p)
            }
            None => (None, Vec::new()),
        };
        let (old_vals, _) = match &old {
            Some(t) => {
                let (v, p) = Self::decode_tuple(&types, t, &names);
                (Some(v), p)
            }
            None => (None, Vec::new()),
        };
        let n_maps = rs.mappings.len();
        let xid = self.in_tx;
        for mi in 0..n_maps {
            let rs = &self.relations[&relation];
            let rm = &rs.mappings[mi];
            let table = rm.table;
            let key_pos = rm.key.clone();
            let used = rm.used.clone();
            let compiled = rm.compiled.clone();
            let t = &self.tables[table];
            let ty = t.mapping.ty;
            let mapping_id = t.mapping.id.clone();
            let on_delete = t.mapping.on_delete;
            let state_key = |sk: String| StateKey {
                ty,
                mapping: mapping_id.clone(),
                source_key: sk,
            };
            let key_of = |vals: &[Option<Value>]| -> Option<Vec<Value>> {
                key_pos
                    .iter()
                    .map(|&p| vals.get(p).cloned().flatten())
                    .collect()
            };
            match (&new_vals, &old_vals) {
                // DELETE
                (None, Some(old_v)) => {
                    if on_delete == OnDelete::Ignore {
                        continue;
                    }
                    let Some(key) = key_of(old_v) else { continue };
                    if !self.snapshot_allows(table, &key, xid) {
                        continue;
                    }
                    let basis = if !old_is_key_only {
                        match &*compiled {
                            Ok(c) => {
                                let row: Vec<Value> = old_v
                                    .iter()
                                    .map(|v| v.clone().unwrap_or(Value::Null))
                                    .collect();
                                let m = c.map_row(&row);
                                m.problems.is_empty().then_some(m.record)
                            }
                            Err(_) => None,
                        }
                    } else {
                        None
                    };
                    let sk = source_key(key.iter());
                    self.push(SinkItem::Delete {
                        key: state_key(sk),
                        basis,
                    })
                    .await?;
                }
                // INSERT / UPDATE
                (Some(new_v), old_v) => {
                    let Some(key) = key_of(new_v) else { continue };
                    // A key change deletes the old key.
                    if let Some(old_v) = old_v {
                        if let Some(old_key) = key_of(old_v) {
                            if cmp_keys(&old_key, &key).is_ne()
                                && on_delete == OnDelete::Soft
                                && self.snapshot_allows(table, &old_key, xid)
                            {
                                let sk = source_key(old_key.iter());
                                self.push(SinkItem::Delete {
                                    key: state_key(sk),
                                    basis: None,
                                })
                                .await?;
                            }
                        }
                    }
                    if !self.snapshot_allows(table, &key, xid) {
                        continue;
                    }
                    let compiled = match &*compiled {
                        Ok(c) => c,
                        Err(e) => {
                            let sk = source_key(key.iter());
                            self.push(SinkItem::upsert(
                                state_key(sk),
                                &Record::new(ty),
                                vec![Problem {
                                    field: "(mapping)".into(),
                                    reason: e.clone(),
                                }],
                                false,
                            ))
                            .await?;
                            continue;
                        }
                    };
                    // Unchanged TOAST values the mapping reads: from the old
                    // full row, else the current row read by key.
                    let mut row: Vec<Value> = Vec::with_capacity(new_v.len());
                    let mut missing = false;
                    for (p, v) in new_v.iter().enumerate() {
                        match v {
                            Some(v) => row.push(v.clone()),
                            None => {
                                let from_old =
                                    old_v.as_ref().and_then(|o| o.get(p).cloned().flatten());
                                match from_old {
                                    Some(v) if !old_is_key_only => row.push(v),
                                    _ => {
                                        if used.contains(&p) {
                                            missing = true;
                                        }
                                        row.push(Value::Null);
                                    }
                                }
                            }
                        }
                    }
                    let sk = source_key(key.iter());
                    if missing {
                        let t = &self.tables[table];
                        let kv: Vec<CursorValue> = t
                            .key
                            .iter()
                            .zip(&key)
                            .map(|(&i, v)| cursor_value(&t.select[i].ty, v))
                            .collect();
                        let sql = t.row_by_key_sql(&kv);
                        let mut rows = RowStream::start(&*client, &sql, t.types())
                            .await
                            .map_err(fatal_db(&self.settings.source.url))?;
                        let fetched = rows
                            .next_batch(2)
                            .await
                            .map_err(|e| SessionError::Transient(e.to_string()))?;
                        let t = &self.tables[table];
                        match fetched.into_iter().next() {
                            Some(current) => {
                                let m = t.compiled.map_row(&current);
                                self.push(SinkItem::upsert(
                                    state_key(sk),
                                    &m.record,
                                    m.problems,
                                    false,
                                ))
                                .await?;
                            }
                            None => {
                                // Deleted since: its DELETE follows in the stream.
                            }
                        }
                        continue;
                    }
                    let mut m = compiled.map_row(&row);
                    m.problems.extend(new_problems.iter().cloned());
                    self.push(SinkItem::upsert(
                        state_key(sk),
                        &m.record,
                        m.problems,
                        false,
                    ))
                    .await?;
                }
                (None, None) => {}
            }
        }
        Ok(())
    }

    async fn on_truncate(&mut self, relations: Vec<u32>) -> Result<(), SessionError> {
        for r in relations {
            let Some(rs) = self.relations.get(&r) else {
                continue;
            };
            let name = format!("{}.{}", rs.rel.namespace, rs.rel.name);
            let tables: Vec<usize> = rs.mappings.iter().map(|m| m.table).collect();
            for i in tables {
                let t = &self.tables[i];
                self.metrics
                    .truncates
                    .get_or_create(&TypeLabel {
                        r#type: crate::model::schema::schema().ty(t.mapping.ty).name.clone(),
                    })
                    .inc();
                match t.mapping.on_truncate {
                    OnTruncate::Error => {
                        error!(table = %name, mapping = %t.mapping.label(),
                            "TRUNCATE on a mapped table: nothing was sent (on_truncate = \"error\"), so \
                             Cobi still holds the truncated records. Set on_truncate = \"soft_delete\" \
                             to mark them deleted, or re-sync with `cobi-sync snapshot`");
                    }
                    OnTruncate::SoftDelete => {
                        let store = self.store.clone();
                        let (ty, id) = (t.mapping.ty, t.mapping.id.clone());
                        let keys = tokio::task::spawn_blocking(move || store.keys_of(ty, &id))
                            .await
                            .map_err(|e| SessionError::Transient(e.to_string()))?
                            .map_err(|e| SessionError::Transient(e.to_string()))?;
                        let n = keys.len();
                        warn!(table = %name, records = n, "TRUNCATE on a mapped table: sending soft deletes for every record sent before");
                        for (sk, st) in keys {
                            if st.status == KeyStatus::Accepted {
                                let key = StateKey {
                                    ty,
                                    mapping: self.tables[i].mapping.id.clone(),
                                    source_key: sk,
                                };
                                self.push(SinkItem::Delete { key, basis: None }).await?;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads the next chunk of table `i` and emits its watermark.
    async fn read_chunk(&mut self, client: &mut Client, i: usize) -> Result<(), SessionError> {
        let url = self.settings.source.url.clone();
        let t = &self.tables[i];
        let lower_pos: Option<Position> = match self.table_state(i) {
            TableSnapshot::InProgress(p) => Some(p.clone()),
            _ => None,
        };
        if lower_pos.is_none() && self.copied == 0 && self.snapshot_log.elapsed() > Duration::ZERO {
            info!(mapping = %t.mapping.label(), "initial snapshot: copying table");
        }
        let sql = t.key_chunk_sql(
            lower_pos.as_ref().map(|p| p.key.as_slice()),
            Some(CHUNK_ROWS),
        );
        let types = t.types();
        let mut attempt = 0u32;
        let (snapshot, rows) = loop {
            let tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(fatal_db(&url))?;
            let snap_text: String = tx
                .query_one("SELECT pg_current_snapshot()::text", &[])
                .await
                .map_err(fatal_db(&url))?
                .get(0);
            let snapshot = PgSnapshot::parse(&snap_text).ok_or_else(|| {
                SessionError::Transient(format!("unexpected snapshot `{snap_text}`"))
            })?;
            // Every skipped change must be visible to this chunk's snapshot.
            if self.skipped.iter().any(|&x| !snapshot.sees(x)) {
                tx.rollback().await.map_err(fatal_db(&url))?;
                attempt += 1;
                if attempt % 100 == 0 {
                    warn!("waiting for decoded transactions to become visible before copying the next chunk");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            let mut stream = RowStream::start(&tx, &sql, types.clone())
                .await
                .map_err(fatal_db(&url))?;
            let mut rows = Vec::new();
            loop {
                let b = stream
                    .next_batch(CHUNK_ROWS)
                    .await
                    .map_err(|e| SessionError::Transient(e.to_string()))?;
                if b.is_empty() {
                    break;
                }
                rows.extend(b);
            }
            tx.commit().await.map_err(fatal_db(&url))?;
            break (snapshot, rows);
        };
        self.skipped = self.skipped.split_off(&snapshot.xmin);
        self.reference = Some(snapshot.clone());
        let t = &self.tables[i];
        let full = rows.len() >= CHUNK_ROWS;
        let upper_position = rows.last().map(|r| t.position_of(r));
        let upper = if full {
            rows.last().map(|r| t.compiled.key_values(r))
        } else {
            None
        };
        let lower = lower_pos.as_ref().map(|p| position_values(t, p));
        let mut index = HashMap::with_capacity(rows.len());
        for (n, r) in rows.iter().enumerate() {
            index.insert(t.compiled.source_key(r), n);
        }
        self.chunk_seq += 1;
        let id = format!("{}:{}:{}", std::process::id(), t.mapping.id, self.chunk_seq);
        // Transactional, committed with a local WAL flush: the walsender
        // only sends flushed WAL, and an unflushed message would wait for
        // the WAL writer (up to wal_writer_delay) before the chunk moves on.
        let tx = client.transaction().await.map_err(fatal_db(&url))?;
        tx.batch_execute("SET LOCAL synchronous_commit = local")
            .await
            .map_err(fatal_db(&url))?;
        tx.execute(
            "SELECT pg_logical_emit_message(true, $1, $2::text)",
            &[&WATERMARK_PREFIX, &id],
        )
        .await
        .map_err(fatal_db(&url))?;
        tx.commit().await.map_err(fatal_db(&url))?;
        self.pending = Some(PendingChunk {
            table: i,
            id,
            lower,
            upper,
            upper_position: if full { upper_position } else { None },
            snapshot,
            rows: rows.into_iter().map(Some).collect(),
            index,
        });
        Ok(())
    }

    /// The watermark arrived: deliver the chunk and move the table's
    /// progress with the stream position.
    async fn emit_chunk(&mut self, lsn: u64) -> Result<(), SessionError> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let i = p.table;
        let mut n = 0u64;
        let rows: Vec<Vec<Value>> = p.rows.into_iter().flatten().collect();
        for chunk in rows.chunks(SEND_BATCH) {
            let t = &self.tables[i];
            let items = crate::source::mapped_items(t, chunk.to_vec());
            n += items.len() as u64;
            self.items.extend(items);
            self.flush_items().await?;
        }
        self.copied += n;
        let t = &self.tables[i];
        let id = t.mapping.id.to_string();
        let label = t.mapping.label();
        let state = match p.upper_position {
            Some(pos) => {
                self.last_keys[i] = p.upper.clone();
                TableSnapshot::InProgress(pos)
            }
            None => {
                self.last_keys[i] = None;
                info!(mapping = %label, "snapshot of the table complete");
                TableSnapshot::Done
            }
        };
        self.checkpoint.tables.insert(id, state);
        if self.in_tx.is_none() {
            self.checkpoint.lsn = self.checkpoint.lsn.max(lsn);
        }
        if self.snapshot_log.elapsed() >= Duration::from_secs(10) {
            self.snapshot_log = Instant::now();
            info!(rows_copied = self.copied, "snapshot progress");
        }
        self.mark().await
    }
}

/// The key values of a stored position, typed like the table's rows.
fn position_values(t: &SourceTable, p: &Position) -> Vec<Value> {
    t.key
        .iter()
        .zip(&p.key)
        .map(|(&i, cv)| match &cv.text {
            None => Value::Null,
            Some(text) => decode_text(&t.select[i].ty, text.as_bytes())
                .unwrap_or(Value::Text(text.as_str().into())),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_visibility() {
        let s = PgSnapshot::parse("100:105:101,103").unwrap();
        assert!(s.sees(99));
        assert!(
            s.sees(100),
            "100 < xmax and not in progress: committed before"
        );
        assert!(!s.sees(101));
        assert!(s.sees(102));
        assert!(!s.sees(103));
        assert!(!s.sees(105), "xmax and above started after the snapshot");
        assert_eq!(PgSnapshot::parse("5:5:").unwrap().xip.len(), 0);
        assert!(PgSnapshot::parse("x:y:").is_none());
    }

    #[test]
    fn xids_widen_across_epochs() {
        let s =
            PgSnapshot::parse(&format!("{}:{}:", (3u64 << 32) + 10, (3u64 << 32) + 20)).unwrap();
        assert_eq!(s.widen(15), (3 << 32) + 15);
        // A 32-bit xid just before the wrap belongs to the previous epoch.
        assert_eq!(s.widen(u32::MAX - 5), (2u64 << 32) + (u32::MAX as u64 - 5));
    }

    #[test]
    fn key_ranges() {
        let chunk = |lower: Option<i64>, upper: Option<i64>| PendingChunk {
            table: 0,
            id: String::new(),
            lower: lower.map(|l| vec![Value::Int(l)]),
            upper: upper.map(|u| vec![Value::Int(u)]),
            upper_position: None,
            snapshot: PgSnapshot::parse("1:1:").unwrap(),
            rows: vec![],
            index: HashMap::new(),
        };
        let c = chunk(Some(10), Some(20));
        assert!(!c.in_range(&[Value::Int(10)]), "lower bound is exclusive");
        assert!(c.in_range(&[Value::Int(11)]));
        assert!(c.in_range(&[Value::Int(20)]), "upper bound is inclusive");
        assert!(!c.in_range(&[Value::Int(21)]));
        let last = chunk(Some(10), None);
        assert!(last.in_range(&[Value::Int(1_000_000)]));
        let first = chunk(None, Some(5));
        assert!(first.in_range(&[Value::Int(-3)]));
    }
}
