//! Poll mode: read what changed on a cron schedule.
//!
//! Each tick is one `REPEATABLE READ` transaction across every mapping
//! (DESIGN.md §4.2), mappings in upload order. Just before it, two short
//! statements 50 ms apart observe the open transactions and the server
//! clock for the late-commit guard ([`guard`]). A mapping with a cursor reads rows in
//! `(cursor, key)` order, in pages of `page_size`, from the smallest of its
//! persisted position minus `lookback` and the guard's bounds (transactions
//! that were open and have ended since, or started since the last
//! observation); fingerprints make the re-read free. Rows with a NULL
//! cursor have no place in that order: they are read by full reads and at
//! every `reconcile`. After each page a [`Checkpoint::PollCursor`] mark
//! follows the records, and after a mapping's read its guard state
//! ([`Checkpoint::PollGuard`]); each becomes durable only when the records
//! before it are delivered. A mapping without a cursor is read in full, by
//! key.
//!
//! A mapping's first read (no position yet, a position that no longer
//! matches the configuration, or a transaction of unknown age that ended)
//! reads the whole table once, in key order, with one binary `COPY` in the
//! tick's snapshot — no sort per page — and continues from that snapshot's
//! greatest `(cursor, key)`.
//!
//! A tick holds its snapshot only while the sink accepts records: blocked
//! longer than `api.max_backoff` (an API outage), it releases the
//! transaction so the partner's vacuum is not held back, waits until the
//! sink has delivered what it holds, and starts over from the progress
//! made. A row that cannot be decoded becomes a dead letter; the rest
//! flows. Errors retrying cannot fix back off exponentially.
//!
//! `reconcile` schedules find keys the state store knows but the source no
//! longer has, and soft-delete them.

pub mod checks;
pub mod guard;

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::{Client, IsolationLevel, Transaction};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{quote_ident, Settings};
use crate::mapping::engine::{source_key, MapContext};
use crate::mapping::value::Value;
use crate::model::validate::Problem;
use crate::ops::health::Health;
use crate::sink::{Resend, SinkHandle, SinkItem};
use crate::source::pg;
use crate::source::reader::{RowStream, SetupError, SourceTable};
use crate::source::{backoff_sleep, mapped_items, progress::Progress, SourceError};
use crate::state::{poll_cursor, poll_guard, Checkpoint, Position, StateKey, StateStore};
use guard::{Bound, GuardState, Observation};

/// Longest the source waits, before a mapping's first read, for
/// transactions already open to end (their rows are then part of the
/// read; one still open afterwards makes the mapping be read in full again
/// when it ends).
const FIRST_READ_WAIT: Duration = Duration::from_secs(10);

/// Time between the two looks of an observation.
const OBSERVATION_GAP: Duration = Duration::from_millis(50);

/// Margin under a clock reading for a transaction's `now()`, which is
/// taken a moment before its lock becomes visible.
const CLOCK_MARGIN: Duration = Duration::from_secs(1);

struct PollMapping {
    table: SourceTable,
    position: Option<Position>,
    /// The guard state of the last completed read (`None`: no cursor).
    guard: Option<GuardState>,
    next_reconcile: Option<DateTime<Utc>>,
}

/// The poll-mode source.
pub struct PollSource {
    settings: Settings,
    store: std::sync::Arc<dyn StateStore>,
    sink: SinkHandle,
    health: std::sync::Arc<Health>,
    stop: CancellationToken,
    ctx: MapContext,
}

impl PollSource {
    /// A poll source feeding `sink`.
    pub fn new(
        settings: Settings,
        store: std::sync::Arc<dyn StateStore>,
        sink: SinkHandle,
        health: std::sync::Arc<Health>,
        stop: CancellationToken,
    ) -> Self {
        let ctx = MapContext::from_settings(&settings);
        PollSource {
            settings,
            store,
            sink,
            health,
            stop,
            ctx,
        }
    }

    /// How long a tick may wait on a full sink before it releases its
    /// snapshot.
    fn hold_limit(&self) -> Duration {
        self.settings
            .api
            .max_backoff
            .clamp(Duration::from_secs(1), Duration::from_secs(300))
    }

    /// Runs until `stop`. Returns an error only for problems an operator
    /// must fix (a missing table, a bad mapping); connection losses and
    /// failing ticks are retried forever, with growing backoff.
    pub async fn run(self) -> Result<(), SourceError> {
        let mut attempt = 0u32;
        let mut failing = false;
        let mut mappings: Option<Vec<PollMapping>> = None;
        let mut first = true;
        let mut next_tick: Option<DateTime<Utc>> = None;
        loop {
            if self.stop.is_cancelled() {
                return Ok(());
            }
            let mut client = match pg::connect(&self.settings.source).await {
                Ok(c) => {
                    if failing {
                        info!("source database reconnected");
                    }
                    self.health.set_source(true, None);
                    c
                }
                Err(e) => {
                    failing = true;
                    self.health.set_source(false, Some(e.message.clone()));
                    if !e.transient && first {
                        return Err(SourceError::Fatal(e.message));
                    }
                    warn!(error = %e.message, "cannot connect to the source database; retrying");
                    if !backoff_sleep(&self.stop, &mut attempt).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            if mappings.is_none() {
                match self.resolve(&client).await {
                    Ok(m) => mappings = Some(m),
                    Err(SetupError::Config(msg)) => return Err(SourceError::Config(msg)),
                    Err(SetupError::Db(e)) => {
                        failing = true;
                        warn!(error = %e, "reading the catalog failed; retrying");
                        if !backoff_sleep(&self.stop, &mut attempt).await {
                            return Ok(());
                        }
                        continue;
                    }
                }
            }
            let ms = mappings.as_mut().expect("resolved");
            // Tick loop on this connection.
            loop {
                crate::ops::heartbeat::tick();
                if !first {
                    let at = next_tick.unwrap_or_else(|| self.next_after(Utc::now()));
                    let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                    tokio::select! {
                        _ = crate::ops::heartbeat::idle(tokio::time::sleep(wait)) => {}
                        _ = self.stop.cancelled() => return Ok(()),
                    }
                    next_tick = None;
                }
                let started = Utc::now();
                match self.tick(&mut client, ms, first).await {
                    Ok(rows) => {
                        if first && rows > 0 {
                            info!(rows, "initial poll complete");
                        }
                        for m in &self.settings.mappings {
                            self.health.polled(&m.id, started.into());
                        }
                        if failing {
                            info!("polling works again");
                            self.health.set_source(true, None);
                        }
                        failing = false;
                        attempt = 0;
                        first = false;
                        next_tick = Some(self.next_after(started.max(Utc::now())));
                    }
                    Err(TickError::Stopped) => return Ok(()),
                    Err(TickError::Sink) => return Ok(()),
                    Err(TickError::Released) => {
                        warn!(
                            held_for = ?self.hold_limit(),
                            "the API is not taking records; released the poll snapshot so the \
                             database is not held back, resuming once the records read so far \
                             are delivered"
                        );
                        tokio::select! {
                            r = self.sink.barrier() => if r.is_err() { return Ok(()) },
                            _ = self.stop.cancelled() => return Ok(()),
                        }
                        info!("deliveries resumed; polling again");
                        next_tick = Some(Utc::now());
                        continue;
                    }
                    Err(TickError::Db(e)) => {
                        failing = true;
                        let msg = self.explain(&e);
                        self.health.set_source(false, Some(msg.clone()));
                        error!(error = %msg, "poll failed; retrying with backoff");
                        break;
                    }
                    Err(TickError::Decode(msg)) => {
                        failing = true;
                        error!(error = %msg, "the source's answer could not be read; retrying with backoff");
                        break;
                    }
                }
            }
            if !backoff_sleep(&self.stop, &mut attempt).await {
                return Ok(());
            }
        }
    }

    /// A database error, with the grant to run when a privilege is missing.
    fn explain(&self, e: &tokio_postgres::Error) -> String {
        let msg = pg::explain(e, &self.settings.source.url);
        if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
            let tables: Vec<String> = self
                .settings
                .mappings
                .iter()
                .filter_map(|m| match &m.source {
                    crate::config::MappingSource::Table { .. } => Some(m.source.sql()),
                    crate::config::MappingSource::Query(_) => None,
                })
                .collect();
            format!(
                "{msg}; grant it with: GRANT SELECT ON {} TO {};",
                tables.join(", "),
                quote_ident(&self.settings.source.url.user)
            )
        } else {
            msg
        }
    }

    fn next_after(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        let tz = self.settings.source.poll.schedule_timezone;
        self.settings
            .source
            .poll
            .schedule
            .after(&t.with_timezone(&tz))
            .next()
            .map_or(t + chrono::Duration::days(365), |n| n.with_timezone(&Utc))
    }

    fn next_reconcile(&self, m: &crate::config::MappingSettings) -> Option<DateTime<Utc>> {
        let tz = self.settings.source.poll.schedule_timezone;
        m.reconcile
            .as_ref()
            .and_then(|s| s.upcoming(tz).next())
            .map(|t| t.with_timezone(&Utc))
    }

    async fn resolve(&self, client: &Client) -> Result<Vec<PollMapping>, SetupError> {
        let mut ordered: Vec<_> = self.settings.mappings.iter().collect();
        ordered.sort_by_key(|m| (m.ty, m.index));
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for m in ordered {
            match SourceTable::resolve(client, m, self.ctx).await {
                Ok(table) => {
                    let state = |e: crate::state::StateError| SetupError::Config(e.to_string());
                    let mut position = poll_cursor(self.store.as_ref(), &m.id).map_err(state)?;
                    let saved_guard = poll_guard(self.store.as_ref(), &m.id)
                        .map_err(state)?
                        .and_then(|v| serde_json::from_value::<GuardState>(v).ok());
                    let guard = match table.cursor {
                        None => {
                            info!(mapping = %m.label(), "no cursor column: the whole table is re-read every tick (unchanged rows are not re-sent)");
                            None
                        }
                        Some(c) => {
                            let cursor = table.select[c].name.clone();
                            let key = table.key_names();
                            if let Some(why) =
                                position_mismatch(&table, position.as_ref(), saved_guard.as_ref())
                            {
                                warn!(mapping = %m.label(), reason = %why, "the saved poll position does not match the configuration; starting this mapping over (unchanged rows are not re-sent)");
                                for name in
                                    [format!("poll/{}", m.id), format!("pollguard/{}", m.id)]
                                {
                                    self.store.remove_checkpoint(&name).map_err(state)?;
                                }
                                position = None;
                                Some(GuardState::unknown(&cursor, &key))
                            } else {
                                if position.is_some() && saved_guard.is_none() {
                                    info!(mapping = %m.label(), "no late-commit guard state saved yet: this mapping is read in full once");
                                }
                                Some(
                                    saved_guard
                                        .unwrap_or_else(|| GuardState::unknown(&cursor, &key)),
                                )
                            }
                        }
                    };
                    let next_reconcile = self.next_reconcile(m);
                    out.push(PollMapping {
                        table,
                        position,
                        guard,
                        next_reconcile,
                    });
                }
                Err(SetupError::Config(msg)) => errors.push(msg),
                Err(e @ SetupError::Db(_)) => return Err(e),
            }
        }
        if !errors.is_empty() {
            return Err(SetupError::Config(errors.join("\n")));
        }
        Ok(out)
    }

    /// Observes the open transactions, the clock and the integer cursors'
    /// maxima, outside any snapshot of ours: one observation per cursor
    /// mapping (`None` for mappings without a cursor).
    async fn observe(
        &self,
        client: &Client,
        mappings: &[PollMapping],
    ) -> Result<Vec<Option<Observation>>, TickError> {
        let mut cols = vec![
            "to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
                .to_string(),
            OPEN_TRANSACTIONS.to_string(),
        ];
        for pm in mappings {
            if pm.table.cursor.is_some() && !pm.table.time_cursor() {
                cols.push(pm.table.max_cursor_expr());
            }
        }
        let row = client
            .query_one(&format!("SELECT {}", cols.join(", ")), &[])
            .await?;
        let clock: String = row.get(0);
        let clock = crate::mapping::time::parse_pg_timestamptz(&clock)
            .ok_or_else(|| TickError::Decode(format!("unexpected clock reading `{clock}`")))?;
        let open: BTreeSet<String> = row.get::<_, Vec<String>>(1).into_iter().collect();
        let skew = (self.settings.source.poll.lookback + CLOCK_MARGIN).as_micros() as i64;
        let mut next_col = 2;
        Ok(mappings
            .iter()
            .map(|pm| {
                pm.table.cursor?;
                let bound = if pm.table.time_cursor() {
                    Bound::Instant(clock.saturating_sub(skew))
                } else {
                    let v: Option<String> = row.get(next_col);
                    next_col += 1;
                    Bound::Value(v)
                };
                Some(Observation {
                    open_before: open.clone(),
                    bound_before: bound.clone(),
                    open: open.clone(),
                    bound,
                })
            })
            .collect())
    }

    /// Two observations [`OBSERVATION_GAP`] apart, as one (see
    /// [`guard`]).
    async fn observe_twice(
        &self,
        client: &Client,
        mappings: &[PollMapping],
    ) -> Result<Vec<Option<Observation>>, TickError> {
        let first = self.observe(client, mappings).await?;
        tokio::select! {
            _ = tokio::time::sleep(OBSERVATION_GAP) => {}
            _ = self.stop.cancelled() => return Err(TickError::Stopped),
        }
        let second = self.observe(client, mappings).await?;
        Ok(first
            .into_iter()
            .zip(second)
            .map(|(a, b)| match (a, b) {
                (Some(a), Some(b)) => Some(Observation {
                    open_before: a.open,
                    bound_before: a.bound,
                    ..b
                }),
                _ => None,
            })
            .collect())
    }

    /// Before a mapping's first read: lets transactions already open end
    /// (up to [`FIRST_READ_WAIT`]) and starts the guard from what was open.
    async fn prepare_first_reads(
        &self,
        client: &Client,
        mappings: &mut [PollMapping],
    ) -> Result<(), TickError> {
        let unknown = |pm: &PollMapping| {
            pm.guard
                .as_ref()
                .is_some_and(|g| g.next == Bound::Start && g.open.is_empty())
        };
        if !mappings.iter().any(unknown) {
            return Ok(());
        }
        let before = self.observe(client, mappings).await?;
        let open_before = before
            .iter()
            .flatten()
            .next()
            .map(|o| o.open.clone())
            .unwrap_or_default();
        let deadline = tokio::time::Instant::now() + FIRST_READ_WAIT;
        let mut still: BTreeSet<String> = open_before.clone();
        while !still.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = self.stop.cancelled() => return Err(TickError::Stopped),
            }
            let now: Vec<String> = client
                .query_one(&format!("SELECT {OPEN_TRANSACTIONS}"), &[])
                .await?
                .get(0);
            let now: BTreeSet<String> = now.into_iter().collect();
            still = still.intersection(&now).cloned().collect();
        }
        if !still.is_empty() {
            warn!(
                transactions = still.len(),
                "transactions open since before the first read are still open; when they end, \
                 the mappings being read for the first time are read in full once more"
            );
        }
        for (pm, obs) in mappings.iter_mut().zip(before) {
            if unknown(pm) {
                if let (Some(g), Some(obs)) = (&pm.guard, obs) {
                    pm.guard = Some(guard::first_read_state(&g.cursor, &g.key, &obs));
                }
            }
        }
        Ok(())
    }

    /// Hands items to the sink, giving up (and releasing the snapshot)
    /// when it stays full longer than the hold limit.
    async fn send(&self, items: Vec<SinkItem>) -> Result<(), TickError> {
        tokio::select! {
            r = tokio::time::timeout(self.hold_limit(), self.sink.send(items)) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(TickError::Sink),
                Err(_) => Err(TickError::Released),
            },
            _ = self.stop.cancelled() => Err(TickError::Stopped),
        }
    }

    /// One poll across every mapping. Returns rows read.
    async fn tick(
        &self,
        client: &mut Client,
        mappings: &mut [PollMapping],
        first: bool,
    ) -> Result<u64, TickError> {
        self.prepare_first_reads(client, mappings).await?;
        let observed = self.observe_twice(client, mappings).await?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let mut total = 0u64;
        for (pm, obs) in mappings.iter_mut().zip(observed) {
            if self.stop.is_cancelled() {
                return Err(TickError::Stopped);
            }
            let label = pm.table.mapping.label();
            let read = match (&pm.guard, obs) {
                (Some(g), Some(obs)) => {
                    let plan = guard::plan(g, &obs);
                    let n = if plan.full || pm.position.is_none() {
                        if pm.position.is_some() {
                            warn!(mapping = %label, "a transaction open since before cobi-sync could see it has ended; reading this mapping in full to catch rows it wrote with old cursor values");
                        }
                        self.full_read(&tx, pm).await?
                    } else {
                        if plan.ended > 0 {
                            debug!(mapping = %label, ended = plan.ended, "re-reading from where transactions that ended could have written");
                        }
                        self.walk(&tx, pm, &guard::simplify(&plan.from), first)
                            .await?
                    };
                    let id = pm.table.mapping.id.to_string();
                    self.send(vec![SinkItem::Mark(Checkpoint::PollGuard {
                        mapping: id,
                        guard: serde_json::to_value(&plan.next).expect("guard state serialises"),
                    })])
                    .await?;
                    pm.guard = Some(plan.next);
                    n
                }
                _ => self.read_all_by_key(&tx, pm, first).await?,
            };
            if let Some(at) = pm.next_reconcile {
                if Utc::now() >= at {
                    self.reconcile(&tx, pm).await?;
                    pm.next_reconcile = self.next_reconcile(&pm.table.mapping);
                }
            }
            if read > 0 {
                debug!(mapping = %label, rows = read, "polled");
            }
            total += read;
        }
        tx.commit().await?;
        self.send(vec![SinkItem::Flush]).await?;
        Ok(total)
    }

    /// Streams the rows of `sql` to the sink; returns the rows read and the
    /// position of the last one with a cursor.
    async fn stream(
        &self,
        tx: &Transaction<'_>,
        t: &SourceTable,
        sql: &str,
        progress: &mut Option<Progress>,
        resend: Resend,
    ) -> Result<(u64, Option<Position>), TickError> {
        let mut rows = RowStream::start(tx, sql, t.types()).await?;
        let mut n = 0u64;
        let mut last = None;
        loop {
            let (batch, bad) = rows.next_batch_lenient(1000).await?;
            if batch.is_empty() {
                break;
            }
            n += batch.len() as u64;
            if let Some(pos) = batch
                .last()
                .map(|r| t.position_of(r))
                .filter(|p| p.cursor.as_ref().is_some_and(|c| c.text.is_some()))
            {
                last = Some(pos);
            }
            if let Some(p) = progress {
                p.add(batch.len() as u64);
            }
            self.send(items_of(t, batch, bad, resend)).await?;
        }
        Ok((n, last))
    }

    /// The walk: pages in `(cursor, key)` order from the smallest of the
    /// position's lookback start and the guard's bounds.
    async fn walk(
        &self,
        tx: &Transaction<'_>,
        pm: &mut PollMapping,
        bounds: &[Bound],
        first: bool,
    ) -> Result<u64, TickError> {
        let t = &pm.table;
        let page = self.settings.source.poll.page_size as usize;
        let tz = self.settings.source.timezone.name();
        let mut progress = first.then(|| Progress::new(&t.mapping.label(), None));
        let mut from = t.walk_from_sql(
            pm.position.as_ref(),
            self.settings.source.poll.lookback,
            bounds,
            tz,
        );
        // No lower bound at all (a bound said "every row"): from the first
        // row, not from the position.
        let mut after = from.as_ref().and(pm.position.clone());
        // Rows re-read inside the lookback and the guard's windows count as
        // changes: a dead letter among them is sent again while the window
        // lasts (its parent may have arrived since), which is bounded — the
        // window moves on with the position.
        let mut read = 0u64;
        loop {
            let sql = t.poll_page_sql(after.as_ref(), from.as_deref(), page);
            let (n, last) = self
                .stream(tx, t, &sql, &mut progress, Resend::Changed)
                .await?;
            read += n;
            if let Some(pos) = last {
                self.advance(pm.table.mapping.id.to_string(), &mut pm.position, &pos)
                    .await?;
                after = Some(pos);
            }
            from = None;
            if (n as usize) < page || self.stop.is_cancelled() {
                break;
            }
        }
        if let Some(p) = progress {
            p.finish();
        }
        Ok(read)
    }

    /// Moves the position forward to `pos` (never back) with a mark.
    async fn advance(
        &self,
        mapping: String,
        position: &mut Option<Position>,
        pos: &Position,
    ) -> Result<(), TickError> {
        let newer = position
            .as_ref()
            .is_none_or(|old| pos.cmp_values(old).is_gt());
        if newer {
            *position = Some(pos.clone());
            self.send(vec![SinkItem::Mark(Checkpoint::PollCursor {
                mapping,
                position: pos.clone(),
            })])
            .await?;
        }
        Ok(())
    }

    /// A full read in key order, one `COPY`, then the position moves to
    /// this snapshot's greatest `(cursor, key)`.
    async fn full_read(
        &self,
        tx: &Transaction<'_>,
        pm: &mut PollMapping,
    ) -> Result<u64, TickError> {
        let t = &pm.table;
        let mut progress = Some(Progress::new(&t.mapping.label(), None));
        let (n, _) = self
            .stream(
                tx,
                t,
                &t.key_chunk_sql(None, None),
                &mut progress,
                Resend::Changed,
            )
            .await?;
        if let Some(p) = progress {
            p.finish();
        }
        let mut rows = RowStream::start(tx, &t.max_position_sql(), t.types()).await?;
        let (top, _) = rows.next_batch_lenient(1).await?;
        if let Some(pos) = top.first().map(|r| t.position_of(r)) {
            if pos.cursor.as_ref().is_some_and(|c| c.text.is_some()) {
                let id = t.mapping.id.to_string();
                self.advance(id, &mut pm.position, &pos).await?;
            }
        }
        Ok(n)
    }

    /// A mapping without a cursor: every row, in key chunks.
    async fn read_all_by_key(
        &self,
        tx: &Transaction<'_>,
        pm: &mut PollMapping,
        first: bool,
    ) -> Result<u64, TickError> {
        let t = &pm.table;
        let page = self.settings.source.poll.page_size as usize;
        let mut progress = first.then(|| Progress::new(&t.mapping.label(), None));
        let mut after: Option<Vec<crate::state::CursorValue>> = None;
        let mut read = 0u64;
        loop {
            let sql = t.key_chunk_sql(after.as_deref(), Some(page));
            let mut rows = RowStream::start(tx, &sql, t.types()).await?;
            let mut n = 0usize;
            loop {
                let (batch, bad) = rows.next_batch_lenient(1000).await?;
                if batch.is_empty() {
                    break;
                }
                n += batch.len();
                after = batch.last().map(|r| t.position_of(r).key);
                // No cursor: every tick reads every row again, and nothing
                // tells a change from a re-read.
                self.send(items_of(t, batch, bad, Resend::Reread)).await?;
            }
            read += n as u64;
            if let Some(p) = &mut progress {
                p.add(n as u64);
            }
            if n < page || self.stop.is_cancelled() {
                break;
            }
        }
        if let Some(p) = progress {
            p.finish();
        }
        Ok(read)
    }

    /// Soft-deletes keys the state store knows but the source lacks, and
    /// re-reads the rows whose cursor is NULL (the walk cannot see them).
    async fn reconcile(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        pm: &PollMapping,
    ) -> Result<(), TickError> {
        let t = &pm.table;
        if t.cursor.is_some() {
            let (n, _) = self
                .stream(tx, t, &t.null_cursor_sql(), &mut None, Resend::Reread)
                .await?;
            if n > 0 {
                debug!(mapping = %t.mapping.label(), rows = n, "re-read rows with a NULL cursor");
            }
        }
        let mut present: HashSet<u64> = HashSet::new();
        let mut rows = RowStream::start(tx, &t.keys_sql(), t.key_types()).await?;
        loop {
            let batch = rows.next_batch(10_000).await.map_err(TickError::from)?;
            if batch.is_empty() {
                break;
            }
            for r in batch {
                present.insert(xxhash_rust::xxh3::xxh3_64(source_key(r.iter()).as_bytes()));
            }
        }
        let (ty, id) = (t.mapping.ty, t.mapping.id.clone());
        let mut known = crate::state::stream_keys(self.store.clone(), ty, id);
        let mut items = Vec::new();
        while let Some(chunk) = known.recv().await {
            let chunk = chunk.map_err(|e| TickError::Decode(e.to_string()))?;
            for (sk, status) in chunk {
                if status == crate::state::KeyStatus::Accepted
                    && !present.contains(&xxhash_rust::xxh3::xxh3_64(sk.as_bytes()))
                {
                    items.push(SinkItem::Delete {
                        key: StateKey {
                            ty,
                            mapping: t.mapping.id.clone(),
                            source_key: sk,
                        },
                        basis: None,
                    });
                }
            }
        }
        if !items.is_empty() {
            info!(mapping = %t.mapping.label(), deleted = items.len(), "reconcile found rows deleted at the source; sending soft deletes");
            self.send(items).await?;
        }
        Ok(())
    }
}

/// The open transactions of this database other than ours, as an SQL
/// array: virtual transaction ids from `pg_locks` (visible to every role,
/// including transactions that have not written yet) and prepared
/// transactions.
const OPEN_TRANSACTIONS: &str = "ARRAY(\
    SELECT l.virtualxid::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
    WHERE l.locktype = 'virtualxid' AND l.granted AND l.virtualxid = l.virtualtransaction \
      AND l.pid <> pg_backend_pid() \
      AND a.datid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
    UNION ALL \
    SELECT 'prepared:' || p.transaction::text FROM pg_prepared_xacts p \
    WHERE p.database = current_database())";

/// Why a saved position cannot be used with this mapping's configuration.
fn position_mismatch(
    t: &SourceTable,
    position: Option<&Position>,
    guard: Option<&GuardState>,
) -> Option<String> {
    let c = t.cursor?;
    let cursor = &t.select[c];
    let key = t.key_names();
    if let Some(g) = guard {
        if !g.matches(&cursor.name, &key) {
            return Some(format!(
                "saved for cursor `{}` and key ({}), configured: cursor `{}` and key ({})",
                g.cursor,
                g.key.join(", "),
                cursor.name,
                key.join(", ")
            ));
        }
    }
    let p = position?;
    match &p.cursor {
        None => return Some("the saved position has no cursor value".into()),
        Some(v) if v.text.is_none() => {
            return Some("the saved position is a NULL cursor value".into())
        }
        Some(v) if v.oid != cursor.ty.oid => {
            return Some(format!(
                "the saved cursor value is of type OID {}, cursor `{}` is {}",
                v.oid, cursor.name, cursor.source_type
            ))
        }
        Some(_) => {}
    }
    let oids: Vec<u32> = t.key.iter().map(|&i| t.select[i].ty.oid).collect();
    let saved: Vec<u32> = p.key.iter().map(|v| v.oid).collect();
    if oids != saved {
        return Some(format!(
            "the saved key has {} column(s) of type OIDs {saved:?}, the key ({}) has {} of {oids:?}",
            saved.len(),
            key.join(", "),
            oids.len()
        ));
    }
    None
}

/// Rows to sink items; rows that failed to decode become dead letters
/// naming why (the rest of the record as far as it mapped). `resend`:
/// [`Resend::Reread`] for reads that repeat every tick without evidence of
/// a change (a table without a cursor, NULL-cursor rows) — an unchanged
/// dead letter among them is not sent again each time (DESIGN.md §4.5).
fn items_of(
    t: &SourceTable,
    rows: Vec<Vec<Value>>,
    bad: Vec<(usize, String)>,
    resend: Resend,
) -> Vec<SinkItem> {
    let reasons: std::collections::HashMap<usize, String> = bad.into_iter().collect();
    let mut items = if reasons.is_empty() {
        mapped_items(t, rows)
    } else {
        rows.into_iter()
            .enumerate()
            .map(|(i, row)| {
                let mapped = t.compiled.map_row(&row);
                let mut problems = mapped.problems;
                if let Some(r) = reasons.get(&i) {
                    warn!(mapping = %t.mapping.label(), reason = %r, "a source row could not be decoded; it is kept as a dead letter (see `cobi-sync dlq list`) and read again when it changes");
                    problems.insert(
                        0,
                        Problem {
                            field: "source row".into(),
                            reason: format!(
                                "could not be decoded ({r}); fix the value (or the database \
                                 encoding) and the row is read again when it changes"
                            ),
                        },
                    );
                }
                SinkItem::upsert(
                    StateKey {
                        ty: t.mapping.ty,
                        mapping: t.mapping.id.clone(),
                        source_key: t.compiled.source_key(&row),
                    },
                    &mapped.record,
                    problems,
                    Resend::Changed,
                )
            })
            .collect()
    };
    if resend != Resend::Changed {
        for item in &mut items {
            if let SinkItem::Upsert { resend: r, .. } = item {
                *r = resend;
            }
        }
    }
    items
}

#[derive(Debug)]
enum TickError {
    Stopped,
    Sink,
    /// The sink stayed full longer than the hold limit.
    Released,
    Db(tokio_postgres::Error),
    Decode(String),
}

impl From<tokio_postgres::Error> for TickError {
    fn from(e: tokio_postgres::Error) -> Self {
        TickError::Db(e)
    }
}

impl From<crate::source::reader::ReadError> for TickError {
    fn from(e: crate::source::reader::ReadError) -> Self {
        match e {
            crate::source::reader::ReadError::Db(e) => TickError::Db(e),
            crate::source::reader::ReadError::Decode(m) => TickError::Decode(m),
        }
    }
}

/// Quoted `schema.table` of a mapping, for messages.
pub fn describe_source(t: &SourceTable) -> String {
    match &t.table {
        Some(info) => format!("{}.{}", quote_ident(&info.schema), quote_ident(&info.name)),
        None => "query".into(),
    }
}
