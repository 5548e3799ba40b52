//! The replication session: the I/O loop around the watermark state
//! machine. It connects, sets up, opens the stream at the durable position,
//! feeds stream events and read results to [`Watermarks`], and carries out
//! its verdicts (send to the sink, read a chunk, emit a watermark). It
//! reconnects on transient failures with growing backoff, applies the
//! `on_slot_lost` policy, and takes `resync` requests. Each turn of the
//! stream loop ticks the task's heartbeat, and its wait for the next event
//! counts as healthy ([`crate::ops::heartbeat`]): the periodic heartbeat
//! statement runs outside that wait, so a database that stops answering
//! still stops the systemd watchdog.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{OnDelete, OnSlotLost, OnTruncate, Settings, SnapshotMode};
use crate::mapping::decode::text::decode_text;
use crate::mapping::engine::{source_key, MapContext};
use crate::mapping::value::Value;
use crate::model::record::Record;
use crate::model::schema::schema;
use crate::model::validate::Problem;
use crate::ops::health::Health;
use crate::ops::metrics::{Metrics, TypeLabel};
use crate::sink::{Resend, SinkHandle, SinkItem};
use crate::source::pg;
use crate::source::progress::Progress;
use crate::source::reader::{SetupError, SourceTable};
use crate::source::{backoff_sleep, SourceError};
use crate::state::{
    replication_checkpoint, Checkpoint, KeyStatus, Position, ReplicationCheckpoint, StateKey,
    StateStore, TableSnapshot, Write,
};

use super::errors::{db_error, SessionError};
use super::pgoutput::{self, Message, Tuple};
use super::reads;
use super::relations::{decode_tuple, Relations};
use super::setup::{self, SlotStatus};
use super::stream::{self, ReplicationStream, StreamError, StreamEvent};
use super::watermark::{Change, Phase, Read, Verdict, Watermarks};
use super::{ResyncRequest, CHUNK_ROWS, HEARTBEAT_PREFIX, WATERMARK_PREFIX};

mod changes;
mod copy;
mod slot;

/// Items handed to the sink at once.
const SEND_BATCH: usize = 1_000;
/// How often a heartbeat is emitted and the slot checked.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// Most rows re-read in one query.
const REREAD_BATCH: usize = 1_000;
/// How long re-reads may wait for their transactions to become visible.
const REREAD_PATIENCE: Duration = Duration::from_secs(60);

/// What the session works with.
pub struct Env {
    /// Settings.
    pub settings: Settings,
    /// The state store (read; written only through the sink, except when
    /// a copy starts over).
    pub store: Arc<dyn StateStore>,
    /// The sink.
    pub sink: SinkHandle,
    /// Health flags.
    pub health: Arc<Health>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Stops the session.
    pub stop: CancellationToken,
}

/// How the session runs.
#[derive(Default)]
pub struct Options {
    /// Return once every table is copied and delivered (`snapshot`).
    pub until_copied: bool,
    /// Re-create a lost or dropped slot whatever `on_slot_lost` says
    /// (`snapshot`).
    pub recreate_slot: bool,
    /// Mappings whose copied records are sent even if unchanged
    /// (`snapshot --force`, `resync`).
    pub force: HashSet<Arc<str>>,
}

/// How a session ended without an error.
enum End {
    Stopped,
    Copied,
}

/// Per-table state of this process.
#[derive(Default)]
struct TableState {
    /// The catalog no longer matches the mapping: why.
    broken: Option<String>,
    /// Keys the table no longer has were soft-deleted before its copy.
    reconciled: bool,
    /// Progress of its copy.
    progress: Option<Progress>,
    /// Its columns when last read ([`reads::table_signature`]).
    signature: Option<String>,
}

/// Waiting for decoded transactions to become visible before a read.
#[derive(Default)]
struct ReadWait {
    retry_at: Option<Instant>,
    since: Option<Instant>,
    warned: bool,
}

impl ReadWait {
    fn due(&self) -> bool {
        self.retry_at.is_none_or(|t| Instant::now() >= t)
    }

    fn refused(&mut self) -> Duration {
        let since = *self.since.get_or_insert_with(Instant::now);
        let waited = since.elapsed();
        let delay = Duration::from_millis(20)
            .max(waited / 4)
            .min(Duration::from_secs(1));
        self.retry_at = Some(Instant::now() + delay);
        waited
    }

    fn done(&mut self) {
        *self = ReadWait::default();
    }
}

/// The copy's bookkeeping.
struct CopyState {
    /// Waiting for a read to be allowed.
    wait: ReadWait,
    /// Watermark ids: a random nonce (a watermark of an earlier process,
    /// even one with the same pid, as PID 1 in a container, never
    /// matches) and a sequence number.
    ids: (u64, u64),
    /// Rows copied.
    rows: u64,
}

/// Replication mode.
pub struct Replicator {
    env: Env,
    opts: Options,
    tables: Vec<SourceTable>,
    state: Vec<TableState>,
    relations: Relations,
    machine: Watermarks<SinkItem>,
    checkpoint: ReplicationCheckpoint,
    in_tx: Option<u32>,
    outbox: Vec<SinkItem>,
    copy: CopyState,
    lag_alarm: bool,
    resync: Option<mpsc::Receiver<ResyncRequest>>,
}

impl Replicator {
    /// A replicator; `resync` takes re-copy requests while it runs.
    pub fn new(
        env: Env,
        opts: Options,
        resync: Option<mpsc::Receiver<ResyncRequest>>,
    ) -> Replicator {
        Replicator {
            env,
            opts,
            tables: Vec::new(),
            state: Vec::new(),
            relations: Relations::default(),
            machine: Watermarks::new(Vec::new()),
            checkpoint: ReplicationCheckpoint::default(),
            in_tx: None,
            outbox: Vec::new(),
            copy: CopyState {
                wait: ReadWait::default(),
                ids: (rand::random(), 0),
                rows: 0,
            },
            lag_alarm: false,
            resync,
        }
    }

    fn ctx(&self) -> MapContext {
        MapContext::from_settings(&self.env.settings)
    }

    fn url(&self) -> &crate::config::pgurl::PgUrl {
        &self.env.settings.source.url
    }

    fn slot(&self) -> &str {
        &self.env.settings.source.replication.slot
    }

    /// Connects, sets up, streams; reconnects on failures. Returns the rows
    /// copied.
    pub async fn run(&mut self) -> Result<u64, SourceError> {
        let mut attempt = 0u32;
        let mut set_up = false;
        loop {
            if self.env.stop.is_cancelled() {
                return Ok(self.copy.rows);
            }
            let mut client = match pg::connect(&self.env.settings.source).await {
                Ok(c) => c,
                Err(e) => {
                    self.env.health.set_source(false, Some(e.message.clone()));
                    if !e.transient && !set_up {
                        return Err(SourceError::Fatal(e.message));
                    }
                    warn!(error = %e.message, "cannot connect to the source database; retrying");
                    if !backoff_sleep(&self.env.stop, &mut attempt).await {
                        return Ok(self.copy.rows);
                    }
                    continue;
                }
            };
            if !set_up {
                self.setup(&client).await?;
                set_up = true;
            } else if let Err(e) = self.check_slot(&client).await {
                if let SessionError::Transient(msg) = &e {
                    warn!(error = %msg, "cannot read the replication slot's state; retrying");
                    if !backoff_sleep(&self.env.stop, &mut attempt).await {
                        return Ok(self.copy.rows);
                    }
                }
                self.after_error(&client, e).await?;
                continue;
            }
            self.load_checkpoint()?;
            let durable_before = self.checkpoint.lsn;
            let start = self.checkpoint.lsn;
            let stream = match stream::open(&self.env.settings.source, start, start).await {
                Ok(s) => s,
                Err(e) if e.fatal => return Err(SourceError::Fatal(e.message)),
                Err(e) => {
                    if e.slot_in_use {
                        let _ = setup::terminate_ours(&client, self.slot()).await;
                    }
                    // The slot may be gone: that is not worth retrying.
                    if let Err(lost @ SessionError::SlotLost(_)) = self.check_slot(&client).await {
                        self.after_error(&client, lost).await?;
                        continue;
                    }
                    self.env.health.set_source(false, Some(e.message.clone()));
                    warn!(error = %e.message, "cannot start replication; retrying");
                    if !backoff_sleep(&self.env.stop, &mut attempt).await {
                        return Ok(self.copy.rows);
                    }
                    continue;
                }
            };
            if attempt > 0 {
                info!("replication reconnected");
            }
            self.env.health.set_source(true, None);
            info!(
                slot = %self.slot(),
                from = %crate::ops::status::format_lsn(start),
                "streaming changes"
            );
            match self.session(&mut client, stream).await {
                Ok(End::Stopped) | Ok(End::Copied) => return Ok(self.copy.rows),
                Err(SessionError::Transient(msg)) => {
                    self.env.health.set_source(false, Some(msg.clone()));
                    warn!(error = %msg, attempt, "replication interrupted; reconnecting from the last confirmed position");
                    // Let the sink finish what it holds so the durable
                    // position covers everything sent; the stream then
                    // resumes from there (duplicates are skipped by
                    // fingerprint).
                    tokio::select! {
                        r = self.env.sink.barrier() => if r.is_err() {
                            return Err(SourceError::Fatal(SINK_STOPPED.into()));
                        },
                        _ = self.env.stop.cancelled() => return Ok(self.copy.rows),
                    }
                    // The backoff grows while failures repeat without
                    // progress; a session that moved the position starts
                    // over at the shortest delay.
                    let durable = self
                        .env
                        .sink
                        .durable()
                        .borrow()
                        .replication
                        .as_ref()
                        .map_or(0, |c| c.lsn);
                    if durable > durable_before {
                        attempt = 0;
                    }
                    if !backoff_sleep(&self.env.stop, &mut attempt).await {
                        return Ok(self.copy.rows);
                    }
                }
                Err(e) => self.after_error(&client, e).await?,
            }
        }
    }

    /// Reloads the durable checkpoint and resets per-session state.
    fn load_checkpoint(&mut self) -> Result<(), SourceError> {
        let mut cp = self.durable_checkpoint()?;
        let initial = self.env.settings.source.replication.snapshot == SnapshotMode::Initial;
        let mut tables = BTreeMap::new();
        let mut phases = Vec::with_capacity(self.tables.len());
        for t in &self.tables {
            let st = cp.tables.remove(&*t.mapping.id).unwrap_or(if initial {
                TableSnapshot::NotStarted
            } else {
                TableSnapshot::Done
            });
            phases.push(match &st {
                TableSnapshot::NotStarted => Phase::NotStarted,
                TableSnapshot::InProgress(p) => Phase::Copying(position_values(t, p)),
                TableSnapshot::Done => Phase::Done,
            });
            tables.insert(t.mapping.id.to_string(), st);
        }
        cp.tables = tables;
        self.checkpoint = cp;
        self.machine.reset(phases);
        for s in &mut self.state {
            s.reconciled = false;
        }
        self.in_tx = None;
        self.outbox.clear();
        self.relations.clear();
        self.copy.wait.done();
        Ok(())
    }

    async fn session<S: ReplicationStream>(
        &mut self,
        client: &mut Client,
        mut stream: S,
    ) -> Result<End, SessionError> {
        let result = self.stream_loop(client, &mut stream).await;
        stream.close().await;
        result
    }

    async fn stream_loop<S: ReplicationStream>(
        &mut self,
        client: &mut Client,
        stream: &mut S,
    ) -> Result<End, SessionError> {
        let mut durable = self.env.sink.durable();
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let reference = reads::current_snapshot(client, self.url()).await?;
        self.machine.set_reference(reference);
        loop {
            crate::ops::heartbeat::tick();
            if self.in_tx.is_none() {
                if let Some(end) = self.between_transactions(client).await? {
                    return Ok(end);
                }
            }
            let retry = self.copy.wait.retry_at;
            // A healthy wait for the watchdog: the heartbeat below runs a
            // statement at least every `HEARTBEAT`, outside this wait, so a
            // database that stops answering still shows as a stuck source.
            let wake = {
                let _idle = crate::ops::heartbeat::Idle::enter();
                tokio::select! {
                    ev = stream.recv() => Wake::Stream(ev),
                    changed = durable.changed() => Wake::Durable(changed.is_ok()),
                    _ = heartbeat.tick() => Wake::Heartbeat,
                    Some(req) = next_request(&mut self.resync) => Wake::Resync(req),
                    _ = sleep_until(retry) => Wake::Retry,
                    _ = self.env.stop.cancelled() => Wake::Stop,
                }
            };
            match wake {
                Wake::Stream(Ok(Some(ev))) => self.on_event(client, ev).await?,
                Wake::Stream(Ok(None)) => {
                    return Err(SessionError::Transient(
                        "the replication stream ended".into(),
                    ))
                }
                Wake::Stream(Err(e)) => return Err(SessionError::Transient(e.message)),
                Wake::Durable(false) => return Err(SessionError::fatal(SINK_STOPPED)),
                Wake::Durable(true) => {
                    if let Some(r) = &durable.borrow_and_update().replication {
                        stream.confirm(r.lsn);
                    }
                }
                Wake::Heartbeat => {
                    self.heartbeat(client).await?;
                    self.check_lag(client).await?;
                }
                Wake::Resync(req) => self.on_resync(client, req).await?,
                Wake::Retry => {}
                Wake::Stop => return Ok(End::Stopped),
            }
        }
    }

    async fn flush_items(&mut self) -> Result<(), SessionError> {
        if self.outbox.is_empty() {
            return Ok(());
        }
        let items = std::mem::take(&mut self.outbox);
        self.env
            .sink
            .send(items)
            .await
            .map_err(|_| SessionError::fatal(SINK_STOPPED))
    }

    async fn push(&mut self, item: SinkItem) -> Result<(), SessionError> {
        self.outbox.push(item);
        if self.outbox.len() >= SEND_BATCH {
            self.flush_items().await?;
        }
        Ok(())
    }

    /// Sends a progress mark for the current position (held back while
    /// re-reads are outstanding).
    async fn mark(&mut self) -> Result<(), SessionError> {
        let mut cp = self.checkpoint.clone();
        cp.lsn = self.machine.confirmable(cp.lsn);
        self.push(SinkItem::Mark(Checkpoint::Replication(cp)))
            .await?;
        self.flush_items().await
    }

    /// Everything pushed so far is durable (so the state store knows it).
    async fn drain(&mut self) -> Result<(), SessionError> {
        self.flush_items().await?;
        tokio::select! {
            r = self.env.sink.barrier() => r.map_err(|_| SessionError::fatal(SINK_STOPPED)),
            _ = self.env.stop.cancelled() => Err(SessionError::Transient("stopping".into())),
        }
    }

    async fn on_event(&mut self, client: &mut Client, ev: StreamEvent) -> Result<(), SessionError> {
        match ev {
            StreamEvent::Begin { xid, .. } => self.in_tx = Some(xid),
            StreamEvent::Commit { end_lsn } => self.on_commit(end_lsn).await?,
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
                if prefix == WATERMARK_PREFIX {
                    self.on_watermark(&String::from_utf8_lossy(&content))
                        .await?;
                } else if !transactional && self.in_tx.is_none() && lsn > self.checkpoint.lsn {
                    self.checkpoint.lsn = lsn;
                    self.mark().await?;
                }
            }
            StreamEvent::Data(data) => self.on_data(client, data).await?,
        }
        Ok(())
    }

    async fn on_commit(&mut self, end_lsn: u64) -> Result<(), SessionError> {
        self.in_tx = None;
        self.checkpoint.lsn = self.checkpoint.lsn.max(end_lsn);
        self.mark().await
    }

    /// A watermark arrived: deliver the reads it ends.
    async fn on_watermark(&mut self, id: &str) -> Result<(), SessionError> {
        let emits = self.machine.on_watermark(id);
        if emits.is_empty() {
            return Ok(());
        }
        for e in emits {
            let n = e.rows.len() as u64;
            for item in e.rows {
                self.push(item).await?;
            }
            let Some((phase, progress)) = e.end else {
                continue;
            };
            self.copy.rows += n;
            let t = &self.tables[e.table];
            self.checkpoint
                .tables
                .insert(t.mapping.id.to_string(), progress);
            let label = t.mapping.label();
            let state = &mut self.state[e.table];
            if let Some(p) = &mut state.progress {
                p.add(n);
            }
            if phase == Phase::Done {
                if let Some(p) = state.progress.take() {
                    p.finish();
                }
                info!(mapping = %label, "snapshot of the table complete");
            }
        }
        self.mark().await
    }

    async fn on_data(&mut self, client: &mut Client, data: Bytes) -> Result<(), SessionError> {
        let msg = pgoutput::decode(&data).map_err(|e| {
            SessionError::fatal(format!(
                "cannot decode a pgoutput message ({e}); please report this with the server version"
            ))
        })?;
        match msg {
            Message::Relation(rel) => {
                let url = self.url().clone();
                let affected = self
                    .relations
                    .on_relation(client, &url, rel, &self.tables, self.ctx())
                    .await?;
                for i in affected {
                    self.refresh_table(client, i).await?;
                }
            }
            Message::Begin { xid, .. } => self.in_tx = Some(xid),
            Message::Commit { end_lsn, .. } => self.on_commit(end_lsn).await?,
            Message::Insert { relation, new } => {
                self.on_change(relation, None, false, Some(new)).await?
            }
            Message::Update {
                relation,
                old,
                old_is_key_only,
                new,
            } => {
                self.on_change(relation, old, old_is_key_only, Some(new))
                    .await?
            }
            Message::Delete {
                relation,
                old,
                old_is_key_only,
            } => {
                self.on_change(relation, Some(old), old_is_key_only, None)
                    .await?
            }
            Message::Truncate { relations, .. } => self.on_truncate(client, relations).await?,
            Message::Type { .. } | Message::Origin { .. } | Message::LogicalMessage { .. } => {}
        }
        Ok(())
    }
}

/// What the daemon says when the sink task is gone.
const SINK_STOPPED: &str = "the sink stopped (its task ended): nothing more can be delivered; \
     cobi-sync must restart";

/// Replaces the replication checkpoint (the one deliberate move backwards:
/// tables going back to "not copied"). Only when nothing is in flight.
pub fn replace_checkpoint(
    store: &Arc<dyn StateStore>,
    cp: ReplicationCheckpoint,
) -> Result<(), SourceError> {
    store
        .remove_checkpoint("replication")
        .and_then(|_| store.apply(&[Write::Checkpoint(Checkpoint::Replication(cp))]))
        .and_then(|_| store.flush())
        .map_err(|e| SourceError::Fatal(e.to_string()))
}

/// The key values of a stored position, typed like the table's rows.
pub fn position_values(t: &SourceTable, p: &Position) -> Vec<Value> {
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

/// What woke the stream loop.
enum Wake {
    Stream(Result<Option<StreamEvent>, StreamError>),
    /// The sink's durable position moved (`false`: the sink stopped).
    Durable(bool),
    Heartbeat,
    Resync(ResyncRequest),
    Retry,
    Stop,
}

async fn next_request(rx: &mut Option<mpsc::Receiver<ResyncRequest>>) -> Option<ResyncRequest> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
