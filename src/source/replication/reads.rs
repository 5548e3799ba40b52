//! The reads of the watermark snapshot, against the regular (SQL)
//! connection: a chunk of a table or rows re-read by key, each in one
//! `REPEATABLE READ` transaction whose snapshot the state machine must
//! accept first ([`super::watermark::Watermarks::may_read`]); the watermark
//! message that follows a read; and the keys the state store knows that a
//! table no longer has (reconciliation before a re-copy).
//!
//! Nothing here decides anything: the reads return what they found.

use std::sync::Arc;

use tokio_postgres::{Client, IsolationLevel};

use crate::config::pgurl::PgUrl;
use crate::mapping::decode::binary::LenientRow;
use crate::mapping::value::Value;
use crate::source::reader::{cursor_value, ReadError, RowStream, SourceTable};
use crate::source::reconcile::{self, ReconcileError};
use crate::state::{CursorValue, Position, StateStore};

use super::errors::{db_error, SessionError};
use super::watermark::PgSnapshot;
use super::WATERMARK_PREFIX;

fn read_error(e: ReadError, url: &PgUrl, what: &str) -> SessionError {
    match e {
        ReadError::Db(e) => db_error(&e, url, what),
        ReadError::Decode(m) => SessionError::fatal(format!(
            "{what}: a value cannot be decoded ({m}); please report this with the column's type"
        )),
    }
}

/// The current snapshot, outside any transaction.
pub async fn current_snapshot(client: &Client, url: &PgUrl) -> Result<PgSnapshot, SessionError> {
    let text: String = client
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await
        .map_err(|e| db_error(&e, url, "reading the current snapshot"))?
        .get(0);
    PgSnapshot::parse(&text)
        .ok_or_else(|| SessionError::Transient(format!("unexpected snapshot `{text}`")))
}

/// Runs `read` in a read-only `REPEATABLE READ` transaction if `may_read`
/// accepts its snapshot; `None` when it does not (yet).
async fn in_snapshot<T>(
    client: &mut Client,
    url: &PgUrl,
    may_read: impl Fn(&PgSnapshot) -> bool,
    what: &str,
    read: impl AsyncFnOnce(&tokio_postgres::Transaction<'_>) -> Result<T, SessionError>,
) -> Result<Option<(PgSnapshot, T)>, SessionError> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(|e| db_error(&e, url, what))?;
    let text: String = tx
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await
        .map_err(|e| db_error(&e, url, what))?
        .get(0);
    let snapshot = PgSnapshot::parse(&text)
        .ok_or_else(|| SessionError::Transient(format!("unexpected snapshot `{text}`")))?;
    if !may_read(&snapshot) {
        tx.rollback().await.map_err(|e| db_error(&e, url, what))?;
        return Ok(None);
    }
    let out = read(&tx).await?;
    tx.commit().await.map_err(|e| db_error(&e, url, what))?;
    Ok(Some((snapshot, out)))
}

async fn all_rows(
    tx: &tokio_postgres::Transaction<'_>,
    t: &SourceTable,
    sql: &str,
    url: &PgUrl,
    what: &str,
) -> Result<Vec<LenientRow>, SessionError> {
    let mut stream = RowStream::start(tx, sql, t.types())
        .await
        .map_err(|e| db_error(&e, url, what))?;
    let mut rows = Vec::new();
    loop {
        let b = stream
            .next_rows_lenient(4096)
            .await
            .map_err(|e| read_error(e, url, what))?;
        if b.is_empty() {
            return Ok(rows);
        }
        rows.extend(b);
    }
}

/// The next chunk of `t` after `after` (from the start when `None`): at
/// most `limit` rows in key order, each with the values that could not be
/// decoded (its record becomes a dead letter; the rest of the chunk flows).
pub async fn chunk(
    client: &mut Client,
    url: &PgUrl,
    t: &SourceTable,
    after: Option<&Position>,
    limit: usize,
    may_read: impl Fn(&PgSnapshot) -> bool,
) -> Result<Option<(PgSnapshot, Vec<LenientRow>)>, SessionError> {
    let sql = t.key_chunk_sql(after.map(|p| p.key.as_slice()), Some(limit));
    let what = format!("copying {}", t.mapping.label());
    in_snapshot(client, url, may_read, &what, async |tx| {
        all_rows(tx, t, &sql, url, &what).await
    })
    .await
}

/// The rows of `t` with these keys.
pub async fn rows_by_keys(
    client: &mut Client,
    url: &PgUrl,
    groups: &[(&SourceTable, Vec<Vec<Value>>)],
    may_read: impl Fn(&PgSnapshot) -> bool,
) -> Result<Option<(PgSnapshot, Vec<Vec<LenientRow>>)>, SessionError> {
    let what = "re-reading rows whose large values the stream left out";
    in_snapshot(client, url, may_read, what, async |tx| {
        let mut out = Vec::with_capacity(groups.len());
        for (t, keys) in groups {
            let keys: Vec<Vec<CursorValue>> = keys
                .iter()
                .map(|k| {
                    t.key
                        .iter()
                        .zip(k)
                        .map(|(&i, v)| cursor_value(&t.select[i].ty, v))
                        .collect()
                })
                .collect();
            out.push(all_rows(tx, t, &t.rows_by_keys_sql(&keys), url, what).await?);
        }
        Ok(out)
    })
    .await
}

/// Emits watermark `id`: a transactional message committed with a local
/// WAL flush (the walsender only sends flushed WAL, and an unflushed
/// message would wait for the WAL writer), so it arrives after every
/// transaction the read's snapshot sees.
pub async fn emit_watermark(
    client: &mut Client,
    url: &PgUrl,
    id: &str,
) -> Result<(), SessionError> {
    let what = "emitting a snapshot watermark";
    let tx = client
        .transaction()
        .await
        .map_err(|e| db_error(&e, url, what))?;
    tx.batch_execute("SET LOCAL synchronous_commit = local")
        .await
        .map_err(|e| db_error(&e, url, what))?;
    tx.execute(
        "SELECT pg_logical_emit_message(true, $1, $2::text)",
        &[&WATERMARK_PREFIX, &id],
    )
    .await
    .map_err(|e| db_error(&e, url, what))?;
    tx.commit().await.map_err(|e| db_error(&e, url, what))
}

/// The columns of `t` and their types as the catalog has them now: a
/// change means the table's definition changed (and its reads must be
/// rebuilt).
pub async fn table_signature(
    client: &Client,
    url: &PgUrl,
    t: &SourceTable,
) -> Result<String, SessionError> {
    let Some(info) = &t.table else {
        return Ok(String::new());
    };
    let row = client
        .query_one(
            "SELECT COALESCE(string_agg(attname || ':' || atttypid || ':' || atttypmod, ',' \
                     ORDER BY attnum), '') \
             FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
            &[&info.oid],
        )
        .await
        .map_err(|e| db_error(&e, url, "reading a table's definition"))?;
    Ok(row.get(0))
}

/// The planner's row estimate of `t` (`reltuples`; partitions summed),
/// for progress.
pub async fn estimate_rows(client: &Client, t: &SourceTable) -> Option<u64> {
    let info = t.table.as_ref()?;
    client
        .query_one(
            "SELECT COALESCE(SUM(GREATEST(c.reltuples, 0)), 0)::int8 FROM pg_class c \
             WHERE c.oid = $1 OR c.oid IN (SELECT relid FROM pg_partition_tree($1::oid::regclass) \
                                            WHERE isleaf)",
            &[&info.oid],
        )
        .await
        .ok()
        .map(|r| r.get::<_, i64>(0) as u64)
        .filter(|&n| n > 0)
}

/// The keys the state store holds as accepted for `t`'s mapping that the
/// table no longer has (read in one snapshot), for soft deletes.
pub async fn absent_keys(
    client: &mut Client,
    url: &PgUrl,
    store: &Arc<dyn StateStore>,
    t: &SourceTable,
) -> Result<Vec<String>, SessionError> {
    let what = format!("reconciling {}", t.mapping.label());
    let read = in_snapshot(
        client,
        url,
        |_| true,
        &what,
        async |tx| {
            reconcile::absent_keys(tx, store, t)
                .await
                .map_err(|e| match e {
                    ReconcileError::Read(e) => read_error(e, url, &what),
                    ReconcileError::State(m) => SessionError::fatal(format!("{what}: {m}")),
                })
        },
    )
    .await?;
    Ok(read.map(|(_, keys)| keys).unwrap_or_default())
}
