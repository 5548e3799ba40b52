//! The `snapshot` command in poll mode: a one-off full read of the mapped
//! tables (or the named types and what they depend on), in upload order,
//! from one `REPEATABLE READ` transaction so parents and children are seen
//! together.
//!
//! Rows are streamed in key order, 10 000 per chunk; after each chunk a
//! [`Checkpoint::Snapshot`] mark records the last key, so an interrupted
//! snapshot continues where it stopped (its remaining tables are then read
//! from a newer transaction). Records identical to what was last accepted
//! are not re-sent unless `force` is set. Memory stays flat: rows go to the
//! sink as they arrive and the sink's channel blocks when it is full.
//!
//! Before a table is read from its start, the keys the state store holds
//! that the table no longer has are soft-deleted (`on_delete = "soft"`),
//! read in the same transaction. `force` also re-reads tables an
//! interrupted run had finished.
//!
//! In replication mode the snapshot runs inside the replication stream
//! instead ([`crate::source::replication`]), so it stays consistent with
//! the slot.

use std::sync::Arc;

use tokio_postgres::IsolationLevel;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::{OnDelete, Settings};
use crate::mapping::engine::MapContext;
use crate::model::schema::TypeId;
use crate::sink::{SinkHandle, SinkItem};
use crate::source::pg;
use crate::source::progress::Progress;
use crate::source::reader::{ReadError, RowStream, SetupError, SourceTable};
use crate::source::reconcile::{self, ReconcileError};
use crate::source::{mapped_items, SourceError};
use crate::state::{Checkpoint, CursorValue, StateKey, StateStore, TableSnapshot};

/// Rows per chunk.
pub const CHUNK_ROWS: usize = 10_000;

/// Reads every row of the mappings of `types` (all mappings when empty)
/// into the sink. Returns the rows read.
pub async fn run(
    settings: &Settings,
    store: Arc<dyn StateStore>,
    sink: &SinkHandle,
    types: &[TypeId],
    force: bool,
    stop: &CancellationToken,
) -> Result<u64, SourceError> {
    let mut client = pg::connect(&settings.source)
        .await
        .map_err(|e| SourceError::Fatal(e.message))?;
    let ctx = MapContext::from_settings(settings);
    let mut selected: Vec<_> = settings
        .mappings
        .iter()
        .filter(|m| types.is_empty() || types.contains(&m.ty))
        .collect();
    selected.sort_by_key(|m| (m.ty, m.index));
    let mut tables = Vec::new();
    let mut errors = Vec::new();
    for m in selected {
        match SourceTable::resolve(&client, m, ctx).await {
            Ok(t) => tables.push(t),
            Err(SetupError::Config(e)) => errors.push(e),
            Err(SetupError::Db(e)) => {
                return Err(SourceError::Fatal(pg::explain(&e, &settings.source.url)))
            }
        }
    }
    if !errors.is_empty() {
        return Err(SourceError::Config(errors.join("\n")));
    }
    let db_err =
        |e: tokio_postgres::Error| SourceError::Fatal(pg::explain(&e, &settings.source.url));
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(db_err)?;
    let mut total = 0u64;
    for t in &tables {
        let id = t.mapping.id.to_string();
        let progress_state = match store.checkpoint(&format!("snapshot/{id}")) {
            Ok(Some(Checkpoint::Snapshot { progress, .. })) => progress,
            _ => None,
        };
        // `--force` re-reads tables an interrupted run already read.
        let progress_state = progress_state.filter(|_| !force);
        let mut after: Option<Vec<CursorValue>> = match &progress_state {
            Some(TableSnapshot::Done) => {
                info!(mapping = %t.mapping.label(), "already snapshotted (resumed run); skipping");
                continue;
            }
            Some(TableSnapshot::InProgress(p)) => {
                info!(mapping = %t.mapping.label(), "resuming an interrupted snapshot");
                Some(p.key.clone())
            }
            _ => None,
        };
        if after.is_none() && t.mapping.on_delete == OnDelete::Soft {
            // Before the table is read: the keys it no longer has.
            let absent = reconcile::absent_keys(&tx, &store, t)
                .await
                .map_err(|e| match e {
                    ReconcileError::Read(ReadError::Db(e)) => db_err(e),
                    other => SourceError::Fatal(format!("{}: {other}", t.mapping.label())),
                })?;
            if !absent.is_empty() {
                info!(mapping = %t.mapping.label(), deleted = absent.len(),
                    "rows the state store knows are gone from the table; sending soft deletes");
                let items = absent
                    .into_iter()
                    .map(|sk| SinkItem::Delete {
                        key: StateKey {
                            ty: t.mapping.ty,
                            mapping: t.mapping.id.clone(),
                            source_key: sk,
                        },
                        basis: None,
                    })
                    .collect();
                sink.send(items)
                    .await
                    .map_err(|_| SourceError::Fatal("sink stopped".into()))?;
            }
        }
        let estimate = match &t.table {
            Some(info) => tx
                .query_one(
                    "SELECT GREATEST(reltuples, 0)::int8 FROM pg_class WHERE oid = $1",
                    &[&info.oid],
                )
                .await
                .ok()
                .map(|r| r.get::<_, i64>(0) as u64)
                .filter(|&n| n > 0),
            None => None,
        };
        let mut progress = Progress::new(&t.mapping.label(), estimate);
        loop {
            if stop.is_cancelled() {
                return Ok(total);
            }
            let sql = t.key_chunk_sql(after.as_deref(), Some(CHUNK_ROWS));
            let mut rows = RowStream::start(&tx, &sql, t.types())
                .await
                .map_err(db_err)?;
            let mut n = 0usize;
            loop {
                let batch = rows.next_batch(1000).await.map_err(|e| match e {
                    ReadError::Db(e) => db_err(e),
                    ReadError::Decode(m) => SourceError::Fatal(m),
                })?;
                if batch.is_empty() {
                    break;
                }
                n += batch.len();
                let last = batch.last().map(|r| t.position_of(r));
                let mut items = mapped_items(t, batch);
                if force {
                    for it in &mut items {
                        if let SinkItem::Upsert { force, .. } = it {
                            *force = true;
                        }
                    }
                }
                if let Some(pos) = last {
                    after = Some(pos.key.clone());
                    items.push(SinkItem::Mark(Checkpoint::Snapshot {
                        mapping: id.clone(),
                        progress: Some(TableSnapshot::InProgress(pos)),
                    }));
                }
                sink.send(items)
                    .await
                    .map_err(|_| SourceError::Fatal("sink stopped".into()))?;
            }
            progress.add(n as u64);
            total += n as u64;
            if n < CHUNK_ROWS {
                break;
            }
        }
        progress.finish();
        sink.send(vec![SinkItem::Mark(Checkpoint::Snapshot {
            mapping: id,
            progress: Some(TableSnapshot::Done),
        })])
        .await
        .map_err(|_| SourceError::Fatal("sink stopped".into()))?;
    }
    tx.commit().await.map_err(db_err)?;
    // Everything durable: forget the progress so the next snapshot starts over.
    sink.barrier()
        .await
        .map_err(|_| SourceError::Fatal("sink stopped".into()))?;
    let clear: Vec<SinkItem> = tables
        .iter()
        .map(|t| {
            SinkItem::Mark(Checkpoint::Snapshot {
                mapping: t.mapping.id.to_string(),
                progress: None,
            })
        })
        .collect();
    sink.send(clear)
        .await
        .map_err(|_| SourceError::Fatal("sink stopped".into()))?;
    sink.barrier()
        .await
        .map_err(|_| SourceError::Fatal("sink stopped".into()))?;
    Ok(total)
}
