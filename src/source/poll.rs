//! Poll mode: read what changed on a cron schedule.
//!
//! Each tick is one `REPEATABLE READ` transaction across every mapping
//! (DESIGN.md §4.2), mappings in upload order. A mapping with a cursor
//! reads rows in `(cursor, key)` order, in pages of `page_size`, from its
//! persisted position minus `lookback` (rows that committed late are
//! caught; fingerprints make the re-read free) up to a safe horizon:
//! `now() − 1 s`, and never past the start of the oldest writing
//! transaction the role can see (its rows may still appear with an older
//! cursor value). A mapping without a cursor is read in full, by key.
//! After each page a [`Checkpoint::PollCursor`] mark follows the records;
//! it becomes durable only when they are delivered.
//!
//! The first tick runs at start-up: with no cursor yet it reads every row —
//! the initial snapshot — and later ticks follow the schedule.
//! `reconcile` schedules find keys the state store knows but the source no
//! longer has, and soft-delete them.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::{Client, IsolationLevel};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{quote_ident, Settings};
use crate::mapping::engine::{source_key, MapContext};
use crate::ops::health::Health;
use crate::sink::{SinkHandle, SinkItem};
use crate::source::pg;
use crate::source::reader::{RowStream, SetupError, SourceTable};
use crate::source::{backoff_sleep, mapped_items, progress::Progress, SourceError};
use crate::state::{poll_cursor, Checkpoint, Position, StateKey, StateStore};

struct PollMapping {
    table: SourceTable,
    position: Option<Position>,
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

    /// Runs until `stop`. Returns an error only for problems an operator
    /// must fix (a missing table, a bad mapping); connection losses are
    /// retried forever.
    pub async fn run(self) -> Result<(), SourceError> {
        let mut attempt = 0u32;
        let mut mappings: Option<Vec<PollMapping>> = None;
        let mut first = true;
        let mut next_tick: Option<DateTime<Utc>> = None;
        loop {
            if self.stop.is_cancelled() {
                return Ok(());
            }
            let mut client = match pg::connect(&self.settings.source).await {
                Ok(c) => {
                    if attempt > 0 {
                        info!("source database reconnected");
                    }
                    attempt = 0;
                    self.health.set_source(true, None);
                    c
                }
                Err(e) => {
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
                if !first {
                    let at = next_tick.unwrap_or_else(|| self.next_after(Utc::now()));
                    let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
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
                        first = false;
                        next_tick = Some(self.next_after(started.max(Utc::now())));
                    }
                    Err(TickError::Stopped) => return Ok(()),
                    Err(TickError::Sink) => return Ok(()),
                    Err(TickError::Db(e)) => {
                        let msg = pg::explain(&e, &self.settings.source.url);
                        self.health.set_source(false, Some(msg.clone()));
                        error!(error = %msg, "poll failed; reconnecting");
                        break;
                    }
                    Err(TickError::Decode(msg)) => {
                        error!(error = %msg, "a row could not be decoded; the poll will be retried");
                        break;
                    }
                }
            }
            if !backoff_sleep(&self.stop, &mut attempt).await {
                return Ok(());
            }
        }
    }

    fn next_after(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        self.settings
            .source
            .poll
            .schedule
            .after(&t)
            .next()
            .unwrap_or(t + chrono::Duration::days(365))
    }

    async fn resolve(&self, client: &Client) -> Result<Vec<PollMapping>, SetupError> {
        let mut ordered: Vec<_> = self.settings.mappings.iter().collect();
        ordered.sort_by_key(|m| (m.ty, m.index));
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for m in ordered {
            match SourceTable::resolve(client, m, self.ctx).await {
                Ok(table) => {
                    let position = poll_cursor(self.store.as_ref(), &m.id)
                        .map_err(|e| SetupError::Config(e.to_string()))?;
                    if table.cursor.is_none() {
                        info!(mapping = %m.label(), "no cursor column: the whole table is re-read every tick (unchanged rows are not re-sent)");
                    }
                    let next_reconcile = m.reconcile.as_ref().and_then(|s| s.upcoming(Utc).next());
                    out.push(PollMapping {
                        table,
                        position,
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

    /// One poll across every mapping. Returns rows read.
    async fn tick(
        &self,
        client: &mut Client,
        mappings: &mut [PollMapping],
        first: bool,
    ) -> Result<u64, TickError> {
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let row = tx
            .query_one(
                "SELECT to_char(LEAST(now() - interval '1 second', \
                   COALESCE((SELECT min(xact_start) FROM pg_stat_activity \
                             WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() \
                               AND datname = current_database()), now())) AT TIME ZONE 'UTC', \
                   'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
                &[],
            )
            .await?;
        let safe: String = row.get(0);
        let tz = self.settings.source.timezone.name();
        let page = self.settings.source.poll.page_size as usize;
        let lookback = self.settings.source.poll.lookback;
        let mut total = 0u64;
        for pm in mappings.iter_mut() {
            if self.stop.is_cancelled() {
                return Err(TickError::Stopped);
            }
            let t = &pm.table;
            let label = t.mapping.label();
            let mut progress = first.then(|| Progress::new(&label, None));
            let mut read = 0u64;
            if t.cursor.is_some() {
                let horizon = t.horizon(&safe, tz);
                let mut lookback_from = t.lookback_from(pm.position.as_ref(), lookback);
                let mut after = pm.position.clone();
                loop {
                    let sql = t.poll_page_sql(
                        after.as_ref(),
                        lookback_from.as_deref(),
                        horizon.as_deref(),
                        page,
                    );
                    let mut rows = RowStream::start(&tx, &sql, t.types()).await?;
                    let mut n = 0usize;
                    let mut last = None;
                    loop {
                        let batch = rows.next_batch(1000).await.map_err(TickError::from)?;
                        if batch.is_empty() {
                            break;
                        }
                        n += batch.len();
                        last = batch.last().map(|r| t.position_of(r));
                        let items = mapped_items(t, batch);
                        self.sink.send(items).await.map_err(|_| TickError::Sink)?;
                    }
                    read += n as u64;
                    if let Some(p) = &mut progress {
                        p.add(n as u64);
                    }
                    if let Some(pos) = last {
                        let newer = pm
                            .position
                            .as_ref()
                            .is_none_or(|old| pos.cmp_values(old).is_gt());
                        if newer {
                            pm.position = Some(pos.clone());
                            self.sink
                                .send(vec![SinkItem::Mark(Checkpoint::PollCursor {
                                    mapping: t.mapping.id.to_string(),
                                    position: pos.clone(),
                                })])
                                .await
                                .map_err(|_| TickError::Sink)?;
                        }
                        after = Some(pos);
                    }
                    lookback_from = None;
                    if n < page || self.stop.is_cancelled() {
                        break;
                    }
                }
            } else {
                let mut after: Option<Vec<crate::state::CursorValue>> = None;
                loop {
                    let sql = t.key_chunk_sql(after.as_deref(), Some(page));
                    let mut rows = RowStream::start(&tx, &sql, t.types()).await?;
                    let mut n = 0usize;
                    loop {
                        let batch = rows.next_batch(1000).await.map_err(TickError::from)?;
                        if batch.is_empty() {
                            break;
                        }
                        n += batch.len();
                        after = batch.last().map(|r| t.position_of(r).key);
                        self.sink
                            .send(mapped_items(t, batch))
                            .await
                            .map_err(|_| TickError::Sink)?;
                    }
                    read += n as u64;
                    if let Some(p) = &mut progress {
                        p.add(n as u64);
                    }
                    if n < page || self.stop.is_cancelled() {
                        break;
                    }
                }
            }
            if let Some(p) = progress {
                p.finish();
            }
            if let Some(at) = pm.next_reconcile {
                if Utc::now() >= at {
                    self.reconcile(&tx, pm).await?;
                    pm.next_reconcile = pm
                        .table
                        .mapping
                        .reconcile
                        .as_ref()
                        .and_then(|s| s.upcoming(Utc).next());
                }
            }
            if read > 0 {
                debug!(mapping = %label, rows = read, "polled");
            }
            total += read;
        }
        tx.commit().await?;
        self.sink
            .send(vec![SinkItem::Flush])
            .await
            .map_err(|_| TickError::Sink)?;
        Ok(total)
    }

    /// Soft-deletes keys the state store knows but the source lacks.
    async fn reconcile(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        pm: &PollMapping,
    ) -> Result<(), TickError> {
        let t = &pm.table;
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
            self.sink.send(items).await.map_err(|_| TickError::Sink)?;
        }
        Ok(())
    }
}

#[derive(Debug)]
enum TickError {
    Stopped,
    Sink,
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
