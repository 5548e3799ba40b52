//! The replication session: the I/O loop around the watermark state
//! machine. It connects, sets up, opens the stream at the durable position,
//! feeds stream events and read results to [`Watermarks`], and carries out
//! its verdicts (send to the sink, read a chunk, emit a watermark). It
//! reconnects on transient failures with growing backoff, applies the
//! `on_slot_lost` policy, and takes `resync` requests.

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
use crate::sink::{SinkHandle, SinkItem};
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
use super::stream::{self, ReplicationStream, StreamEvent};
use super::watermark::{Change, Phase, Read, Verdict, Watermarks};
use super::{ResyncRequest, CHUNK_ROWS, HEARTBEAT_PREFIX, WATERMARK_PREFIX};

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

/// Replication mode.
pub struct Replicator {
    env: Env,
    opts: Options,
    ctx: MapContext,
    tables: Vec<SourceTable>,
    state: Vec<TableState>,
    relations: Relations,
    machine: Watermarks<SinkItem>,
    checkpoint: ReplicationCheckpoint,
    in_tx: Option<u32>,
    outbox: Vec<SinkItem>,
    wait: ReadWait,
    ids: (u64, u64),
    copied: u64,
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
        let ctx = MapContext::from_settings(&env.settings);
        Replicator {
            env,
            opts,
            ctx,
            tables: Vec::new(),
            state: Vec::new(),
            relations: Relations::default(),
            machine: Watermarks::new(Vec::new()),
            checkpoint: ReplicationCheckpoint::default(),
            in_tx: None,
            outbox: Vec::new(),
            wait: ReadWait::default(),
            // A random nonce: a watermark of an earlier process (even one
            // with the same pid, as PID 1 in a container) never matches.
            ids: (rand::random(), 0),
            copied: 0,
            lag_alarm: false,
            resync,
        }
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
                return Ok(self.copied);
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
                        return Ok(self.copied);
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
                        return Ok(self.copied);
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
                        return Ok(self.copied);
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
                Ok(End::Stopped) | Ok(End::Copied) => return Ok(self.copied),
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
                        _ = self.env.stop.cancelled() => return Ok(self.copied),
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
                        return Ok(self.copied);
                    }
                }
                Err(e) => self.after_error(&client, e).await?,
            }
        }
    }

    /// A fatal error ends the run; a lost slot is recovered or ends it,
    /// as `on_slot_lost` says.
    async fn after_error(&mut self, client: &Client, e: SessionError) -> Result<(), SourceError> {
        match e {
            SessionError::Fatal(e) => Err(e),
            SessionError::Transient(_) => Ok(()),
            SessionError::SlotLost(why) => self.slot_lost(client, &why).await,
        }
    }

    /// Applies `on_slot_lost` (see [`setup::slot_loss`]).
    async fn slot_lost(&mut self, client: &Client, why: &str) -> Result<(), SourceError> {
        let slot = self.slot().to_string();
        let rs = &self.env.settings.source.replication;
        if rs.on_slot_lost == OnSlotLost::Fail && !self.opts.recreate_slot {
            return Err(SourceError::Fatal(format!(
                "replication slot {slot}: {why}. Run `cobi-sync snapshot` to re-create the slot \
                 and re-sync every table (deleted rows are soft-deleted, unchanged records are not \
                 re-sent), then start the daemon again; or set source.replication.on_slot_lost = \
                 \"resnapshot\" to let the daemon do it by itself"
            )));
        }
        warn!(slot = %slot, reason = %why, "replication slot lost: re-creating it and re-copying every table (deleted rows are soft-deleted, unchanged records are not re-sent)");
        tokio::select! {
            r = self.env.sink.barrier() => r.map_err(|_| SourceError::Fatal(SINK_STOPPED.into()))?,
            _ = self.env.stop.cancelled() => return Ok(()),
        }
        setup::drop_slot(client, &slot).await?;
        setup::ensure_publication(client, &rs.publication, &self.tables).await?;
        let lsn = setup::create_slot(client, &slot, rs.failover).await?;
        let mut cp = self.durable_checkpoint()?;
        cp.lsn = lsn;
        for t in &self.tables {
            cp.tables
                .insert(t.mapping.id.to_string(), TableSnapshot::NotStarted);
        }
        replace_checkpoint(&self.env.store, cp)
    }

    fn durable_checkpoint(&self) -> Result<ReplicationCheckpoint, SourceError> {
        Ok(replication_checkpoint(self.env.store.as_ref())
            .map_err(|e| SourceError::Fatal(e.to_string()))?
            .unwrap_or_default())
    }

    /// The slot must still be there and hold what was not delivered.
    async fn check_slot(&self, client: &Client) -> Result<(), SessionError> {
        // Only a lost connection fails this after setup: retry.
        let status = setup::slot_status(client, self.slot())
            .await
            .map_err(|e| SessionError::Transient(e.to_string()))?;
        let known = self.durable_checkpoint()?.lsn;
        match setup::slot_loss(&status, known) {
            Some(why) => Err(SessionError::SlotLost(why)),
            None if status == SlotStatus::Missing => {
                Err(SessionError::SlotLost("the slot does not exist".into()))
            }
            None => Ok(()),
        }
    }

    async fn setup(&mut self, client: &Client) -> Result<(), SourceError> {
        setup::check_server(client).await?;
        let mut ordered: Vec<_> = self.env.settings.mappings.clone();
        ordered.sort_by_key(|m| (m.ty, m.index));
        let mut errors = Vec::new();
        let mut tables = Vec::new();
        for m in &ordered {
            match SourceTable::resolve(client, m, self.ctx).await {
                Ok(t) => tables.push(t),
                Err(SetupError::Config(e)) => errors.push(e),
                Err(SetupError::Db(e)) => {
                    return Err(SourceError::Fatal(pg::explain(&e, self.url())))
                }
            }
        }
        if !errors.is_empty() {
            return Err(SourceError::Config(errors.join("\n")));
        }
        setup::check_tables(client, &tables).await?;
        let rs = &self.env.settings.source.replication;
        setup::ensure_publication(client, &rs.publication, &tables).await?;
        self.relations = Relations::new(&tables);
        self.state = tables.iter().map(|_| TableState::default()).collect();
        self.tables = tables;
        let status = setup::slot_status(client, &rs.slot).await?;
        let known = self.durable_checkpoint()?.lsn;
        if let Some(why) = setup::slot_loss(&status, known) {
            return self.slot_lost(client, &why).await;
        }
        if status == SlotStatus::Missing {
            // A new slot: whatever position was stored belongs to an old one.
            let lsn = setup::create_slot(client, &rs.slot, rs.failover).await?;
            let mut cp = self.durable_checkpoint()?;
            cp.lsn = lsn;
            replace_checkpoint(&self.env.store, cp)?;
        } else {
            setup::terminate_ours(client, &rs.slot).await?;
        }
        Ok(())
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
        self.wait.done();
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
            if self.in_tx.is_none() {
                if let Some(end) = self.between_transactions(client).await? {
                    return Ok(end);
                }
            }
            let retry = self.wait.retry_at;
            tokio::select! {
                ev = stream.recv() => match ev {
                    Ok(Some(ev)) => self.on_event(client, ev).await?,
                    Ok(None) => return Err(SessionError::Transient("the replication stream ended".into())),
                    Err(e) => return Err(SessionError::Transient(e.message)),
                },
                changed = durable.changed() => {
                    if changed.is_err() {
                        return Err(SessionError::fatal(SINK_STOPPED));
                    }
                    if let Some(r) = &durable.borrow_and_update().replication {
                        stream.confirm(r.lsn);
                    }
                },
                _ = heartbeat.tick() => {
                    self.heartbeat(client).await?;
                    self.check_lag(client).await?;
                },
                Some(req) = next_request(&mut self.resync) => self.on_resync(client, req).await?,
                _ = sleep_until(retry) => {},
                _ = self.env.stop.cancelled() => return Ok(End::Stopped),
            }
        }
    }

    /// Reads between transactions: re-reads first (they hold the position),
    /// then the next chunk; the end of a `snapshot` command.
    async fn between_transactions(
        &mut self,
        client: &mut Client,
    ) -> Result<Option<End>, SessionError> {
        if !self.wait.due() {
            return Ok(None);
        }
        if !self.machine.requests().is_empty() {
            self.reread(client).await?;
            return Ok(None);
        }
        if let Some(i) = self.machine.next_chunk() {
            self.read_chunk(client, i).await?;
            return Ok(None);
        }
        if self.opts.until_copied
            && self.machine.copied()
            && self.machine.confirmable(u64::MAX) == u64::MAX
        {
            self.mark().await?;
            tokio::select! {
                r = self.env.sink.barrier() => r.map_err(|_| SessionError::fatal(SINK_STOPPED))?,
                _ = self.env.stop.cancelled() => {}
            }
            return Ok(Some(End::Copied));
        }
        Ok(None)
    }

    /// A read was refused because a decoded transaction is not visible yet.
    fn refused(&mut self, reread: bool) -> Result<(), SessionError> {
        let waited = self.wait.refused();
        let hint = "a transaction cobi-sync has decoded is still invisible to new snapshots; \
                    if synchronous_standby_names names cobi-sync's connection (application_name \
                    cobi-sync, or '*'), commits wait for cobi-sync: list your standbys by name \
                    instead";
        if reread && waited > REREAD_PATIENCE {
            return Err(SessionError::fatal(format!(
                "re-reading rows whose large values the stream left out: waited {}s; {hint}",
                waited.as_secs()
            )));
        }
        if waited > Duration::from_secs(10) && !self.wait.warned {
            self.wait.warned = true;
            warn!(waited_secs = waited.as_secs(), "{hint}");
        }
        Ok(())
    }

    fn next_id(&mut self) -> String {
        self.ids.1 += 1;
        format!("{:016x}:{}", self.ids.0, self.ids.1)
    }

    /// Reads the next chunk of table `i` and emits its watermark.
    async fn read_chunk(&mut self, client: &mut Client, i: usize) -> Result<(), SessionError> {
        // A definition changed without a change to the table in the stream
        // (no Relation message yet): rebuild the reads first.
        let sig = reads::table_signature(client, self.url(), &self.tables[i]).await?;
        if self.state[i].signature.as_ref().is_some_and(|s| *s != sig) {
            self.refresh_table(client, i).await?;
        }
        self.state[i].signature = Some(sig);
        if let Some(why) = &self.state[i].broken {
            return Err(SessionError::fatal(format!(
                "{} cannot be copied: {why}. The table changed while cobi-sync was copying it: fix \
                 the mapping (or the table), run `cobi-sync check`, then start cobi-sync again (the \
                 copy continues where it stopped)",
                self.tables[i].mapping.label()
            )));
        }
        if *self.machine.phase(i) == Phase::NotStarted && !self.state[i].reconciled {
            self.reconcile(client, i).await?;
            self.state[i].reconciled = true;
        }
        if self.state[i].progress.is_none() {
            let t = &self.tables[i];
            let estimate = reads::estimate_rows(client, t).await;
            info!(mapping = %t.mapping.label(), estimate, "copying table");
            self.state[i].progress = Some(
                Progress::new(&t.mapping.label(), estimate)
                    .on_board(self.env.metrics.snapshot.clone()),
            );
        }
        let url = self.url().clone();
        let t = &self.tables[i];
        let after = match &self.checkpoint.tables[&*t.mapping.id] {
            TableSnapshot::InProgress(p) => Some(p.clone()),
            _ => None,
        };
        let machine = &self.machine;
        let read = reads::chunk(client, &url, t, after.as_ref(), CHUNK_ROWS, |s| {
            machine.may_read(s)
        })
        .await?;
        let Some((snapshot, rows)) = read else {
            return self.refused(false);
        };
        self.wait.done();
        let t = &self.tables[i];
        let progress = (rows.len() >= CHUNK_ROWS)
            .then(|| {
                rows.last()
                    .map(|r| TableSnapshot::InProgress(t.position_of(r)))
            })
            .flatten();
        let lower = match self.machine.phase(i) {
            Phase::Copying(k) => Some(k.clone()),
            _ => None,
        };
        let force = self.opts.force.contains(&t.mapping.id);
        let items = rows
            .into_iter()
            .map(|row| {
                let key = t.compiled.key_values(&row);
                let sk = t.compiled.source_key(&row);
                let item = upsert_of(t, &row, sk.clone(), force);
                (key, sk, item)
            })
            .collect();
        let id = self.next_id();
        reads::emit_watermark(client, &url, &id).await?;
        self.machine
            .begin(Read::chunk(i, id, snapshot, lower, items, progress));
        Ok(())
    }

    /// Before a table's copy starts over: soft-deletes the keys the state
    /// store holds that the table no longer has.
    async fn reconcile(&mut self, client: &mut Client, i: usize) -> Result<(), SessionError> {
        let t = &self.tables[i];
        if t.mapping.on_delete != OnDelete::Soft {
            return Ok(());
        }
        let url = self.url().clone();
        let absent = reads::absent_keys(client, &url, &self.env.store, t).await?;
        if absent.is_empty() {
            return Ok(());
        }
        info!(mapping = %t.mapping.label(), deleted = absent.len(),
            "rows the state store knows are gone from the table; sending soft deletes");
        let (ty, id) = (t.mapping.ty, t.mapping.id.clone());
        for sk in absent {
            self.push(SinkItem::Delete {
                key: StateKey {
                    ty,
                    mapping: id.clone(),
                    source_key: sk,
                },
                basis: None,
            })
            .await?;
        }
        Ok(())
    }

    /// Re-reads the rows whose large values the stream left out.
    async fn reread(&mut self, client: &mut Client) -> Result<(), SessionError> {
        let url = self.url().clone();
        let mut by_table: BTreeMap<usize, (Vec<Vec<Value>>, HashSet<String>)> = BTreeMap::new();
        for r in self.machine.requests().iter().take(REREAD_BATCH * 8) {
            let e = by_table.entry(r.table).or_default();
            e.0.push(r.key.clone());
            e.1.insert(r.source_key.clone());
        }
        let groups: Vec<(&SourceTable, Vec<Vec<Value>>)> = by_table
            .iter()
            .map(|(&i, (keys, _))| (&self.tables[i], keys.clone()))
            .collect();
        let machine = &self.machine;
        let read = reads::rows_by_keys(client, &url, &groups, |s| machine.may_read(s)).await?;
        let Some((snapshot, found)) = read else {
            return self.refused(true);
        };
        self.wait.done();
        let id = self.next_id();
        let mut reads_ = Vec::new();
        for ((&i, (_, keys)), rows) in by_table.iter().zip(found) {
            let t = &self.tables[i];
            let rows = rows
                .into_iter()
                .map(|row| {
                    let sk = t.compiled.source_key(&row);
                    (sk.clone(), upsert_of(t, &row, sk, false))
                })
                .collect();
            reads_.push(Read::keys(
                i,
                id.clone(),
                snapshot.clone(),
                keys.clone(),
                rows,
            ));
        }
        reads::emit_watermark(client, &url, &id).await?;
        self.machine.begin_requests(reads_);
        Ok(())
    }

    async fn heartbeat(&self, client: &Client) -> Result<(), SessionError> {
        client
            .execute(
                "SELECT pg_logical_emit_message(false, $1, '')",
                &[&HEARTBEAT_PREFIX],
            )
            .await
            .map_err(|e| db_error(&e, self.url(), "emitting a heartbeat"))?;
        Ok(())
    }

    async fn check_lag(&mut self, client: &Client) -> Result<(), SessionError> {
        let slot = self.slot().to_string();
        let row = client
            .query_opt(
                "SELECT COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::int8, \
                        COALESCE(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| db_error(&e, self.url(), "reading the slot's lag"))?;
        let Some(row) = row else {
            return Err(SessionError::SlotLost(
                "the slot disappeared while streaming (dropped by someone?)".into(),
            ));
        };
        let lag: i64 = row.get(0);
        let status: String = row.get(1);
        if status == "lost" {
            return Err(SessionError::SlotLost(
                "the server invalidated the slot while streaming (WAL removed, see \
                 max_slot_wal_keep_size)"
                    .into(),
            ));
        }
        let lag = lag.max(0) as u64;
        let max = self.env.settings.source.replication.max_slot_lag;
        self.env.metrics.slot_lag_bytes.set(lag as i64);
        self.env.health.set_slot_lag(lag, max);
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
            self.copied += n;
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
                    .on_relation(client, &url, rel, &self.tables, self.ctx)
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

    /// The table's definition changed: reads follow the catalog as it is
    /// now. A mapping that no longer applies stops the copy of that table
    /// (with the fix) when it is still being copied; streamed changes
    /// become dead letters meanwhile.
    async fn refresh_table(&mut self, client: &Client, i: usize) -> Result<(), SessionError> {
        let mapping = self.tables[i].mapping.clone();
        match SourceTable::resolve(client, &mapping, self.ctx).await {
            Ok(t) => {
                self.tables[i] = t;
                self.state[i].broken = None;
            }
            Err(SetupError::Config(why)) => {
                if self.state[i].broken.is_none() {
                    error!(mapping = %mapping.label(), error = %why,
                        "the table no longer matches the mapping: its changes become dead letters \
                         until the mapping (or the table) is fixed");
                }
                self.state[i].broken = Some(why);
            }
            Err(SetupError::Db(e)) => {
                return Err(db_error(
                    &e,
                    self.url(),
                    "reading a changed table's definition",
                ))
            }
        }
        Ok(())
    }

    async fn on_change(
        &mut self,
        relation: u32,
        old: Option<Tuple>,
        old_is_key_only: bool,
        new: Option<Tuple>,
    ) -> Result<(), SessionError> {
        let Some(rs) = self.relations.get(relation) else {
            return Err(SessionError::Transient(format!(
                "change for unknown relation {relation}"
            )));
        };
        if rs.mappings.is_empty() {
            return Ok(());
        }
        let (names, types) = (rs.names.clone(), rs.types.clone());
        let (new_vals, new_problems) = match &new {
            Some(t) => {
                let (v, p) = decode_tuple(&types, t, &names);
                (Some(v), p)
            }
            None => (None, Vec::new()),
        };
        let old_vals = old.as_ref().map(|t| decode_tuple(&types, t, &names).0);
        for mi in 0..rs.mappings.len() {
            let change = RowChange {
                mapping: mi,
                new: new_vals.as_deref(),
                new_problems: &new_problems,
                old: old_vals.as_deref(),
                old_full: !old_is_key_only,
            };
            self.on_row_change(relation, change).await?;
        }
        Ok(())
    }

    /// One change for one mapping of its relation.
    async fn on_row_change(&mut self, relation: u32, c: RowChange<'_>) -> Result<(), SessionError> {
        let rm = &self.relations.get(relation).expect("known").mappings[c.mapping];
        let (table, key_pos, used, compiled) = (
            rm.table,
            rm.key.clone(),
            rm.used.clone(),
            rm.compiled.clone(),
        );
        let t = &self.tables[table];
        let (ty, mapping, on_delete) = (t.mapping.ty, t.mapping.id.clone(), t.mapping.on_delete);
        let state_key = |sk: String| StateKey {
            ty,
            mapping: mapping.clone(),
            source_key: sk,
        };
        let key_of = |vals: &[Option<Value>]| -> Option<Vec<Value>> {
            key_pos
                .iter()
                .map(|&p| vals.get(p).cloned().flatten())
                .collect()
        };
        let xid = self.in_tx;
        match (c.new, c.old) {
            (None, Some(old)) => {
                if on_delete == OnDelete::Ignore {
                    return Ok(());
                }
                let Some(key) = key_of(old) else {
                    return Ok(());
                };
                let sk = source_key(key.iter());
                let verdict = self.machine.on_change(Change {
                    table,
                    key: &key,
                    source_key: &sk,
                    xid,
                    delete: true,
                });
                let basis = match (verdict, &*compiled) {
                    (Verdict::Deliver, Ok(m)) if c.old_full => {
                        let row: Vec<Value> = old
                            .iter()
                            .map(|v| v.clone().unwrap_or(Value::Null))
                            .collect();
                        let mapped = m.map_row(&row);
                        mapped.problems.is_empty().then_some(mapped.record)
                    }
                    _ => None,
                };
                if verdict != Verdict::Skip {
                    self.push(SinkItem::Delete {
                        key: state_key(sk),
                        basis,
                    })
                    .await?;
                }
            }
            (Some(new), old) => {
                let Some(key) = key_of(new) else {
                    return Ok(());
                };
                // A key change deletes the old key.
                if let Some(old_key) = old.and_then(key_of) {
                    if super::watermark::cmp_keys(&old_key, &key).is_ne()
                        && on_delete == OnDelete::Soft
                    {
                        let sk = source_key(old_key.iter());
                        let verdict = self.machine.on_change(Change {
                            table,
                            key: &old_key,
                            source_key: &sk,
                            xid,
                            delete: true,
                        });
                        if verdict != Verdict::Skip {
                            self.push(SinkItem::Delete {
                                key: state_key(sk),
                                basis: None,
                            })
                            .await?;
                        }
                    }
                }
                let sk = source_key(key.iter());
                let this = Change {
                    table,
                    key: &key,
                    source_key: &sk,
                    xid,
                    delete: false,
                };
                if self.machine.on_change(this) == Verdict::Skip {
                    return Ok(());
                }
                let compiled = match &*compiled {
                    Ok(m) => m,
                    Err(e) => {
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
                        return Ok(());
                    }
                };
                // Unchanged TOAST values the mapping reads: from the old
                // full row, else the row is re-read (watermarked).
                let mut row: Vec<Value> = Vec::with_capacity(new.len());
                let mut missing = false;
                for (p, v) in new.iter().enumerate() {
                    match v {
                        Some(v) => row.push(v.clone()),
                        None => match old.and_then(|o| o.get(p).cloned().flatten()) {
                            Some(v) if c.old_full => row.push(v),
                            _ => {
                                missing |= used.contains(&p);
                                row.push(Value::Null);
                            }
                        },
                    }
                }
                if missing {
                    let confirmed = self.machine.confirmable(self.checkpoint.lsn);
                    self.machine.request(this, confirmed);
                    return Ok(());
                }
                let mut m = compiled.map_row(&row);
                m.problems.extend(c.new_problems.iter().cloned());
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
        Ok(())
    }

    async fn on_truncate(
        &mut self,
        client: &mut Client,
        relations: Vec<u32>,
    ) -> Result<(), SessionError> {
        for r in relations {
            let Some(rs) = self.relations.get(r) else {
                continue;
            };
            let (name, partition) = (rs.name.clone(), rs.partition);
            let tables: Vec<usize> = rs.mappings.iter().map(|m| m.table).collect();
            for i in tables {
                self.machine.on_truncate(i, self.in_tx);
                let t = &self.tables[i];
                self.env
                    .metrics
                    .truncates
                    .get_or_create(&TypeLabel {
                        r#type: schema().ty(t.mapping.ty).name.clone(),
                    })
                    .inc();
                match t.mapping.on_truncate {
                    OnTruncate::Error => {
                        error!(table = %name, mapping = %t.mapping.label(),
                            "TRUNCATE on a mapped table: nothing was sent (on_truncate = \"error\"), so \
                             Cobi still holds the truncated records. Set on_truncate = \"soft_delete\" \
                             to mark them deleted, or re-copy with `cobi-sync resync --type {}`",
                            schema().ty(t.mapping.ty).name);
                    }
                    OnTruncate::SoftDelete => {
                        self.truncate_soft_delete(client, i, &name, partition)
                            .await?
                    }
                }
            }
        }
        Ok(())
    }

    /// Soft-deletes what a TRUNCATE removed: after everything sent before
    /// it is durable (so the state store knows every key), every accepted
    /// key of the table — or, for one partition of it, every accepted key
    /// the table no longer has.
    async fn truncate_soft_delete(
        &mut self,
        client: &mut Client,
        i: usize,
        name: &str,
        partition: bool,
    ) -> Result<(), SessionError> {
        self.drain().await?;
        let t = &self.tables[i];
        let keys: Vec<String> = if partition {
            let url = self.url().clone();
            reads::absent_keys(client, &url, &self.env.store, t).await?
        } else {
            let store = self.env.store.clone();
            let (ty, id) = (t.mapping.ty, t.mapping.id.clone());
            tokio::task::spawn_blocking(move || store.keys_of(ty, &id))
                .await
                .map_err(|e| SessionError::fatal(format!("reading the state store: {e}")))?
                .map_err(|e| SessionError::fatal(e.to_string()))?
                .into_iter()
                .filter(|(_, st)| st.status == KeyStatus::Accepted)
                .map(|(k, _)| k)
                .collect()
        };
        warn!(table = %name, records = keys.len(), "TRUNCATE on a mapped table: sending soft deletes for every record it held");
        let t = &self.tables[i];
        let (ty, id) = (t.mapping.ty, t.mapping.id.clone());
        for sk in keys {
            self.push(SinkItem::Delete {
                key: StateKey {
                    ty,
                    mapping: id.clone(),
                    source_key: sk,
                },
                basis: None,
            })
            .await?;
        }
        Ok(())
    }

    /// `resync`: re-copies the tables of the requested types while the
    /// stream goes on, with delete reconciliation; records are sent even if
    /// unchanged.
    async fn on_resync(&mut self, client: &Client, req: ResyncRequest) -> Result<(), SessionError> {
        let chosen: Vec<usize> = (0..self.tables.len())
            .filter(|&i| req.types.contains(&self.tables[i].mapping.ty))
            .collect();
        if chosen.is_empty() {
            let _ = req.reply.send(Err(format!(
                "no mapping has the type(s) {}",
                req.types
                    .iter()
                    .map(|t| schema().ty(*t).name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
            return Ok(());
        }
        let labels: Vec<String> = chosen
            .iter()
            .map(|&i| self.tables[i].mapping.label())
            .collect();
        // Progress shows from now on (`status` right after the request).
        for &i in &chosen {
            let t = &self.tables[i];
            let estimate = reads::estimate_rows(client, t).await;
            self.state[i].progress = Some(
                Progress::new(&t.mapping.label(), estimate)
                    .on_board(self.env.metrics.snapshot.clone()),
            );
        }
        let _ = req.reply.send(Ok(labels.clone()));
        info!(mappings = %labels.join(", "), "resync requested: re-copying while streaming");
        // Nothing of the old copy in flight: the checkpoint can go back.
        self.drain().await?;
        for &i in &chosen {
            let id = self.tables[i].mapping.id.clone();
            self.machine.restart(i);
            self.checkpoint
                .tables
                .insert(id.to_string(), TableSnapshot::NotStarted);
            self.opts.force.insert(id);
            self.state[i].reconciled = false;
        }
        let mut cp = self.checkpoint.clone();
        cp.lsn = self.machine.confirmable(cp.lsn);
        replace_checkpoint(&self.env.store, cp)?;
        let reference = reads::current_snapshot(client, self.url()).await?;
        self.machine.set_reference(reference);
        Ok(())
    }
}

/// One decoded change, for one mapping of its relation.
struct RowChange<'a> {
    mapping: usize,
    new: Option<&'a [Option<Value>]>,
    new_problems: &'a [Problem],
    old: Option<&'a [Option<Value>]>,
    /// `old` is the full old row (REPLICA IDENTITY FULL), not the key.
    old_full: bool,
}

/// What the daemon says when the sink task is gone.
const SINK_STOPPED: &str = "the sink stopped (its task ended): nothing more can be delivered; \
     cobi-sync must restart";

/// An upsert of a row read from `t`.
fn upsert_of(t: &SourceTable, row: &[Value], sk: String, force: bool) -> SinkItem {
    let mapped = t.compiled.map_row(row);
    SinkItem::upsert(
        StateKey {
            ty: t.mapping.ty,
            mapping: t.mapping.id.clone(),
            source_key: sk,
        },
        &mapped.record,
        mapped.problems,
        force,
    )
}

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
