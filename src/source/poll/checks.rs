//! `cobi-sync check` lines for poll mode: whether the late-commit guard can
//! see the writers (not on a standby), how many rows have a NULL cursor,
//! and whether a tick's page query can use an index on `(cursor, key)` —
//! if not, the `CREATE INDEX` to run and how long one page takes now.
//!
//! Every query runs with a short `statement_timeout` so `check` stays
//! quick on big tables.

use tokio_postgres::Client;

use crate::check::{line_ok, line_warn, Line};
use crate::config::{quote_ident, Settings};
use crate::source::reader::SourceTable;

/// Longest one measuring query may run.
const MEASURE_TIMEOUT_MS: u32 = 10_000;

/// The poll-mode lines for `tables`.
pub async fn poll_checks(
    settings: &Settings,
    client: &Client,
    tables: &[SourceTable],
    out: &mut Vec<Line>,
) {
    match client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map(|r| r.get::<_, bool>(0))
    {
        Ok(true) => out.push(line_warn(
            "late-commit guard",
            "the source is a standby: its lock table does not show the primary's open \
             transactions, so rows committed late are caught only within source.poll.lookback; \
             poll the primary, or set lookback above your longest transaction",
        )),
        Ok(false) => out.push(line_ok(
            "late-commit guard",
            "open transactions are visible (pg_locks): rows committed late are re-read",
        )),
        Err(e) => out.push(line_warn(
            "late-commit guard",
            format!("cannot tell whether the source is a standby: {e}"),
        )),
    }
    if let Err(e) = client
        .batch_execute(&format!("SET statement_timeout = {MEASURE_TIMEOUT_MS}"))
        .await
    {
        out.push(line_warn(
            "poll cursors",
            format!("cannot set a timeout: {e}"),
        ));
        return;
    }
    for t in tables {
        if t.cursor.is_some() {
            null_cursor_line(client, t, out).await;
            index_line(settings, client, t, out).await;
            if !t.time_cursor() {
                sequence_line(client, t, out).await;
            }
        }
    }
    let _ = client.batch_execute("RESET statement_timeout").await;
}

/// An integer cursor is safe when a sequence hands its values out in
/// order: with `CACHE` above 1 each session takes a block, and a session
/// can commit a value below ones other sessions committed before it
/// started, which no observation bounds.
async fn sequence_line(client: &Client, t: &SourceTable, out: &mut Vec<Line>) {
    let (Some(info), Some(c)) = (&t.table, t.cursor) else {
        return;
    };
    let name = format!("cursor sequence {}", t.mapping.label());
    let table = format!("{}.{}", quote_ident(&info.schema), quote_ident(&info.name));
    let row = client
        .query_opt(
            "SELECT seq::text, s.seqcache FROM (SELECT pg_get_serial_sequence($1, $2)::regclass AS seq) q \
             JOIN pg_sequence s ON s.seqrelid = q.seq",
            &[&table, &t.select[c].name],
        )
        .await;
    match row {
        Ok(Some(r)) => {
            let (seq, cache): (String, i64) = (r.get(0), r.get(1));
            if cache > 1 {
                out.push(line_warn(
                    name,
                    format!(
                        "sequence {seq} hands out values in blocks of {cache} per session (CACHE \
                         {cache}), so a late commit can carry a value below rows already read; \
                         run ALTER SEQUENCE {seq} CACHE 1; or use a timestamp cursor"
                    ),
                ));
            } else {
                out.push(line_ok(
                    name,
                    format!("fed by sequence {seq} (CACHE 1): late commits are re-read"),
                ));
            }
        }
        Ok(None) => out.push(line_warn(
            name,
            format!(
                "`{}` is not fed by a sequence of its own: late commits are re-read only if \
                 every value written is above the values visible when its transaction began \
                 (integer cursors have no lookback); a timestamp cursor stamped by now() is safer",
                t.select[c].name
            ),
        )),
        Err(e) => out.push(line_warn(name, format!("cannot inspect it: {e}"))),
    }
}

async fn null_cursor_line(client: &Client, t: &SourceTable, out: &mut Vec<Line>) {
    let c = t.cursor.expect("cursor");
    let col = &t.select[c];
    let nullable = match &t.table {
        Some(info) => info.column(&col.name).is_none_or(|m| !m.not_null),
        None => true,
    };
    if !nullable {
        return;
    }
    let name = format!("NULL cursors {}", t.mapping.label());
    let sql = format!(
        "SELECT count(*) FROM {} WHERE {} IS NULL",
        t.from_sql,
        quote_ident(&col.name)
    );
    match client.query_one(&sql, &[]).await {
        Ok(r) => {
            let n: i64 = r.get(0);
            let reconcile = if t.mapping.reconcile.is_some() {
                "and at every `reconcile`"
            } else {
                "(set `reconcile` to re-read them on a schedule)"
            };
            if n == 0 {
                out.push(line_ok(
                    name,
                    format!(
                        "no row has a NULL `{}` (rows that get one are read only by full reads {reconcile})",
                        col.name
                    ),
                ));
            } else {
                out.push(line_warn(
                    name,
                    format!(
                        "{n} row(s) have a NULL `{}`: the cursor walk cannot see them; they are \
                         read by the first read {reconcile}",
                        col.name
                    ),
                ));
            }
        }
        Err(e) => out.push(line_warn(name, format!("cannot count them: {e}"))),
    }
}

async fn index_line(settings: &Settings, client: &Client, t: &SourceTable, out: &mut Vec<Line>) {
    let c = t.cursor.expect("cursor");
    let name = format!("cursor index {}", t.mapping.label());
    // A steady-state page: from the lookback window of now (time cursors)
    // or the greatest value (numbers).
    let from = if t.time_cursor() {
        let micros = chrono::Utc::now().timestamp_micros()
            - settings.source.poll.lookback.as_micros() as i64;
        t.bound_sql(
            &super::guard::Bound::Instant(micros),
            settings.source.timezone.name(),
        )
    } else {
        Some(format!(
            "(SELECT max({}) FROM {})",
            t.select[c].order, t.from_sql
        ))
    };
    let page = settings.source.poll.page_size as usize;
    let query = t.poll_page_query(None, from.as_deref(), page);
    let plan = match client
        .query_one(&format!("EXPLAIN (ANALYZE, FORMAT JSON) {query}"), &[])
        .await
    {
        Ok(r) => r.get::<_, serde_json::Value>(0),
        Err(e) => {
            let timed_out = e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED);
            out.push(line_warn(
                name,
                if timed_out {
                    format!(
                        "one page of a tick takes over {} s: {}",
                        MEASURE_TIMEOUT_MS / 1000,
                        create_index_hint(t)
                    )
                } else {
                    format!("cannot measure a page: {e}")
                },
            ));
            return;
        }
    };
    let ms = plan[0]["Execution Time"].as_f64().unwrap_or(0.0);
    let text = plan.to_string();
    let indexed = text.contains("\"Index Scan\"")
        || text.contains("\"Index Only Scan\"")
        || text.contains("\"Bitmap Index Scan\"");
    if indexed {
        out.push(line_ok(
            name,
            format!("a page uses an index ({ms:.1} ms now)"),
        ));
    } else {
        let rows = plan[0]["Plan"]["Plans"]
            .as_array()
            .and_then(|p| p.first())
            .and_then(|p| p["Actual Rows"].as_f64());
        out.push(line_warn(
            name,
            format!(
                "no index on (cursor, key): every page of every tick reads and sorts the whole \
                 table ({ms:.0} ms per page now{}); {}",
                rows.map(|r| format!(", {r:.0} rows matched"))
                    .unwrap_or_default(),
                create_index_hint(t)
            ),
        ));
    }
}

fn create_index_hint(t: &SourceTable) -> String {
    match &t.table {
        Some(info) => {
            let c = t.cursor.expect("cursor");
            let mut cols = vec![quote_ident(&t.select[c].name)];
            cols.extend(t.key_names().iter().map(|k| quote_ident(k)));
            format!(
                "run CREATE INDEX CONCURRENTLY ON {}.{} ({});",
                quote_ident(&info.schema),
                quote_ident(&info.name),
                cols.join(", ")
            )
        }
        None => "index the cursor and key columns of the query's tables".into(),
    }
}
