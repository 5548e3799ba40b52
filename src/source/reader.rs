//! Reading a mapping's rows: `COPY (SELECT …) TO STDOUT (FORMAT binary)`,
//! streamed and decoded into [`Value`]s without loading a table.
//!
//! [`SourceTable::resolve`] looks the mapping's table (or query) up, picks
//! its key, builds the select list (types without a native binary decoder
//! are cast to text) and compiles the mapping against it. It then builds
//! the two kinds of ordered reads every mode uses: key-ordered chunks
//! ([`SourceTable::key_chunk_sql`], snapshots and cursor-less polls) and
//! `(cursor, key)`-ordered pages ([`SourceTable::poll_page_sql`]). Positions
//! are inlined as typed literals from PostgreSQL's own text forms, so they
//! round-trip exactly; text keys are ordered with `COLLATE "C"` so the
//! order matches byte comparison in Rust.

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio_postgres::{Client, CopyOutStream, Transaction};

use crate::config::{quote_ident, MappingSettings, MappingSource};
use crate::mapping::decode::binary::{CopyBinaryReader, LenientRow};
use crate::mapping::engine::{Column, CompiledMapping, MapContext};
use crate::mapping::value::{oid, PgType, Value};
use crate::source::pg::{self, quote_literal, TableInfo};
use crate::source::poll::guard::Bound;
use crate::state::{CursorValue, Position};

/// Why a mapping cannot read its source.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A problem an operator must fix (missing table, column, key…).
    #[error("{0}")]
    Config(String),
    /// The database failed.
    #[error("{0}")]
    Db(#[from] tokio_postgres::Error),
}

/// One selected column.
#[derive(Debug, Clone)]
pub struct SelectCol {
    /// Column name.
    pub name: String,
    /// SQL expression in the select list.
    pub expr: String,
    /// SQL expression to order and compare by (the column itself, or
    /// `expr` when that is a cast).
    pub order: String,
    /// Type of the selected value (after any cast to text).
    pub ty: PgType,
    /// The column's own type name (for typed literals).
    pub source_type: String,
}

/// A mapping bound to its source.
#[derive(Debug, Clone)]
pub struct SourceTable {
    /// The mapping.
    pub mapping: MappingSettings,
    /// Catalog info (tables only).
    pub table: Option<TableInfo>,
    /// `FROM` clause.
    pub from_sql: String,
    /// Selected columns, in row order.
    pub select: Vec<SelectCol>,
    /// Key columns (positions in `select`).
    pub key: Vec<usize>,
    /// Cursor column (position in `select`).
    pub cursor: Option<usize>,
    /// The mapping compiled against `select`.
    pub compiled: CompiledMapping,
}

fn is_text_like(o: u32) -> bool {
    matches!(
        o,
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::CHAR
    )
}

impl SourceTable {
    /// Resolves the mapping against the database.
    pub async fn resolve(
        client: &Client,
        mapping: &MappingSettings,
        ctx: MapContext,
    ) -> Result<SourceTable, SetupError> {
        let label = mapping.label();
        let (table, columns, from_sql, default_key) = match &mapping.source {
            MappingSource::Table { schema, name } => {
                let info = pg::table_info(client, schema, name).await?.ok_or_else(|| {
                    SetupError::Config(format!(
                        "{label}: table {schema}.{name} does not exist or is not visible to the \
                         connecting role; fix `table` or grant USAGE on the schema and SELECT on the table"
                    ))
                })?;
                let cols = info.columns.clone();
                let pk = info.primary_key.clone();
                (Some(info), cols, mapping.source.sql(), pk)
            }
            MappingSource::Query(q) => {
                let cols = pg::query_columns(client, q).await.map_err(|e| {
                    SetupError::Config(format!(
                        "{label}: the query does not run: {}",
                        e.as_db_error()
                            .map_or_else(|| e.to_string(), |d| d.message().to_string())
                    ))
                })?;
                (None, cols, format!("({q}) AS q"), Vec::new())
            }
        };
        let key_names = mapping.key.clone().unwrap_or(default_key);
        let sql_ascii = client
            .query_one("SHOW server_encoding", &[])
            .await?
            .get::<_, String>(0)
            == "SQL_ASCII";
        if key_names.is_empty() {
            return Err(SetupError::Config(format!(
                "{label}: the table has no primary key; set `key = [\"col\", …]` to columns that \
                 identify a row"
            )));
        }
        let mut wanted: Vec<String> = key_names.clone();
        if let Some(c) = &mapping.cursor {
            if !wanted.contains(c) {
                wanted.push(c.clone());
            }
        }
        for c in mapping.columns() {
            if !wanted.contains(&c) {
                wanted.push(c);
            }
        }
        let available = || {
            columns
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut select = Vec::with_capacity(wanted.len());
        for name in &wanted {
            let Some(meta) = columns.iter().find(|c| &c.name == name) else {
                let what = if key_names.contains(name) {
                    "key column"
                } else if mapping.cursor.as_deref() == Some(name.as_str()) {
                    "cursor column"
                } else {
                    "column"
                };
                return Err(SetupError::Config(format!(
                    "{label}: {what} `{name}` does not exist in {} (columns: {})",
                    mapping.source.sql(),
                    available()
                )));
            };
            let q = quote_ident(name);
            let native = |o: u32| oid::is_native(o);
            let (expr, ty) = match meta.ty.elem {
                Some(e) if native(e) => (q.clone(), meta.ty.clone()),
                Some(_) => (
                    format!("{q}::text[]"),
                    PgType {
                        oid: oid::TEXT_ARRAY,
                        name: "text[]".into(),
                        elem: Some(oid::TEXT),
                    },
                ),
                None if native(meta.ty.oid) => (q.clone(), meta.ty.clone()),
                None => (
                    format!("{q}::text"),
                    PgType {
                        oid: oid::TEXT,
                        name: "text".into(),
                        elem: None,
                    },
                ),
            };
            // In an `SQL_ASCII` database the server refuses to convert a
            // text value that is not valid UTF-8, failing the whole read;
            // its raw bytes are read instead, so such a value fails only
            // its own row (which becomes a dead letter).
            let order = expr.clone();
            let expr = if sql_ascii && meta.ty.elem.is_none() && is_text_like(meta.ty.oid) {
                format!("convert_to({q}, 'SQL_ASCII')")
            } else {
                expr
            };
            select.push(SelectCol {
                name: name.clone(),
                order,
                expr,
                ty,
                source_type: meta.ty.name.clone(),
            });
        }
        let pos = |n: &str| select.iter().position(|c| c.name == n).expect("selected");
        let key: Vec<usize> = key_names.iter().map(|k| pos(k)).collect();
        let cursor = mapping.cursor.as_deref().map(pos);
        if let Some(c) = cursor {
            let o = select[c].ty.oid;
            if !matches!(
                o,
                oid::TIMESTAMPTZ
                    | oid::TIMESTAMP
                    | oid::DATE
                    | oid::INT2
                    | oid::INT4
                    | oid::INT8
                    | oid::NUMERIC
            ) {
                return Err(SetupError::Config(format!(
                    "{label}: cursor column `{}` is {}; it must be a timestamp, timestamptz, date \
                     or integer column that grows on every insert and update",
                    select[c].name, select[c].source_type
                )));
            }
        }
        let layout: Vec<Column> = select
            .iter()
            .map(|c| Column {
                name: c.name.clone(),
                ty: c.ty.clone(),
            })
            .collect();
        let compiled =
            CompiledMapping::compile(mapping, &key_names, &layout, ctx).map_err(|errs| {
                SetupError::Config(
                    errs.iter()
                        .map(|e| format!("{label}: {e}"))
                        .collect::<Vec<_>>()
                        .join("\n"),
                )
            })?;
        Ok(SourceTable {
            mapping: mapping.clone(),
            table,
            from_sql,
            select,
            key,
            cursor,
            compiled,
        })
    }

    /// Key column names.
    pub fn key_names(&self) -> Vec<String> {
        self.key
            .iter()
            .map(|&i| self.select[i].name.clone())
            .collect()
    }

    fn select_list(&self) -> String {
        self.select
            .iter()
            .map(|c| c.expr.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `"col"` (with `COLLATE "C"` for text) for ordering and comparing.
    fn order_expr(&self, i: usize) -> String {
        let c = &self.select[i];
        if is_text_like(c.ty.oid) {
            format!("({}) COLLATE \"C\"", c.order)
        } else {
            c.order.clone()
        }
    }

    /// A typed literal for a position value of column `i`.
    fn literal(&self, i: usize, v: &CursorValue) -> String {
        match &v.text {
            None => "NULL".into(),
            Some(t) => {
                let c = &self.select[i];
                if is_text_like(c.ty.oid) {
                    format!("{} COLLATE \"C\"", quote_literal(t))
                } else {
                    format!("{}::{}", quote_literal(t), c.source_type)
                }
            }
        }
    }

    fn copy(&self, query: String) -> String {
        format!("COPY ({query}) TO STDOUT (FORMAT binary)")
    }

    /// The next chunk in key order after `after` (everything from the start
    /// when `None`).
    pub fn key_chunk_sql(&self, after: Option<&[CursorValue]>, limit: Option<usize>) -> String {
        let keys: Vec<String> = self.key.iter().map(|&i| self.order_expr(i)).collect();
        let mut q = format!("SELECT {} FROM {}", self.select_list(), self.from_sql);
        if let Some(after) = after {
            let lits: Vec<String> = self
                .key
                .iter()
                .zip(after)
                .map(|(&i, v)| self.literal(i, v))
                .collect();
            q.push_str(&format!(
                " WHERE ({}) > ({})",
                keys.join(", "),
                lits.join(", ")
            ));
        }
        q.push_str(&format!(" ORDER BY {}", keys.join(", ")));
        if let Some(l) = limit {
            q.push_str(&format!(" LIMIT {l}"));
        }
        self.copy(q)
    }

    /// The row with these key values (TOAST fills).
    pub fn row_by_key_sql(&self, key: &[CursorValue]) -> String {
        let keys: Vec<String> = self.key.iter().map(|&i| self.order_expr(i)).collect();
        let lits: Vec<String> = self
            .key
            .iter()
            .zip(key)
            .map(|(&i, v)| self.literal(i, v))
            .collect();
        self.copy(format!(
            "SELECT {} FROM {} WHERE ({}) = ({})",
            self.select_list(),
            self.from_sql,
            keys.join(", "),
            lits.join(", ")
        ))
    }

    /// The rows with any of these key values (re-reads of rows whose large
    /// values the stream left out).
    pub fn rows_by_keys_sql(&self, keys: &[Vec<CursorValue>]) -> String {
        let cols: Vec<String> = self.key.iter().map(|&i| self.order_expr(i)).collect();
        let tuples: Vec<String> = keys
            .iter()
            .map(|key| {
                let lits: Vec<String> = self
                    .key
                    .iter()
                    .zip(key)
                    .map(|(&i, v)| self.literal(i, v))
                    .collect();
                format!("({})", lits.join(", "))
            })
            .collect();
        self.copy(format!(
            "SELECT {} FROM {} WHERE ({}) IN ({})",
            self.select_list(),
            self.from_sql,
            cols.join(", "),
            tuples.join(", ")
        ))
    }

    /// Only the key columns, in key order (reconciliation).
    pub fn keys_sql(&self) -> String {
        let cols: Vec<String> = self
            .key
            .iter()
            .map(|&i| self.select[i].expr.clone())
            .collect();
        format!(
            "COPY (SELECT {} FROM {}) TO STDOUT (FORMAT binary)",
            cols.join(", "),
            self.from_sql
        )
    }

    /// Types of [`SourceTable::keys_sql`]'s columns.
    pub fn key_types(&self) -> Vec<PgType> {
        self.key
            .iter()
            .map(|&i| self.select[i].ty.clone())
            .collect()
    }

    /// The next page in `(cursor, key)` order, rows with a NULL cursor
    /// left out (they have no place in the order; a NULL position would
    /// stop the walk). `after` is the last position read; `from` (the
    /// lower bound of a tick, [`SourceTable::walk_from_sql`]) replaces it
    /// for the first page of a tick.
    pub fn poll_page_sql(
        &self,
        after: Option<&Position>,
        from: Option<&str>,
        limit: usize,
    ) -> String {
        self.copy(self.poll_page_query(after, from, limit))
    }

    /// The `SELECT` of [`SourceTable::poll_page_sql`] (for `EXPLAIN`).
    pub fn poll_page_query(
        &self,
        after: Option<&Position>,
        from: Option<&str>,
        limit: usize,
    ) -> String {
        let c = self.cursor.expect("poll pages need a cursor");
        let cursor = self.order_expr(c);
        let mut order = vec![cursor.clone()];
        order.extend(self.key.iter().map(|&i| self.order_expr(i)));
        let mut conds = vec![format!("{cursor} IS NOT NULL")];
        if let Some(from) = from {
            conds.push(format!("{cursor} >= {from}"));
        } else if let Some(p) =
            after.filter(|p| p.cursor.as_ref().is_some_and(|v| v.text.is_some()))
        {
            let mut lits = vec![p
                .cursor
                .as_ref()
                .map_or("NULL".into(), |v| self.literal(c, v))];
            lits.extend(
                self.key
                    .iter()
                    .zip(&p.key)
                    .map(|(&i, v)| self.literal(i, v)),
            );
            conds.push(format!("({}) > ({})", order.join(", "), lits.join(", ")));
        }
        format!(
            "SELECT {} FROM {} WHERE {} ORDER BY {} LIMIT {limit}",
            self.select_list(),
            self.from_sql,
            conds.join(" AND "),
            order.join(", ")
        )
    }

    /// Whether the cursor is a time (timestamp, timestamptz, date) rather
    /// than a number.
    pub fn time_cursor(&self) -> bool {
        self.cursor.is_some_and(|c| {
            matches!(
                self.select[c].ty.oid,
                oid::TIMESTAMPTZ | oid::TIMESTAMP | oid::DATE
            )
        })
    }

    /// The lookback start for a cursor position: the cursor minus
    /// `lookback` (time cursors) or the cursor itself (numbers), as an SQL
    /// expression; `None` without a position.
    pub fn lookback_from(
        &self,
        after: Option<&Position>,
        lookback: std::time::Duration,
    ) -> Option<String> {
        let c = self.cursor?;
        let v = after?.cursor.as_ref()?;
        v.text.as_ref()?;
        let lit = self.literal(c, v);
        match self.select[c].ty.oid {
            oid::TIMESTAMPTZ | oid::TIMESTAMP => Some(format!(
                "({lit} - interval '{} microseconds')",
                lookback.as_micros()
            )),
            oid::DATE => Some(format!("({lit} - {})", lookback.as_secs().div_ceil(86_400))),
            _ => Some(lit),
        }
    }

    /// A guard bound as an SQL expression of the cursor's type; `None` when
    /// it bounds nothing (read from the first row). Instants become
    /// `timestamp`/`date` values in `timezone` so that the repeated autumn
    /// hour is inside the window: the smaller of the wall clock at the
    /// instant and three hours later minus three hours (a fall-back within
    /// those hours makes the latter an hour earlier).
    pub fn bound_sql(&self, b: &Bound, timezone: &str) -> Option<String> {
        let c = self.cursor?;
        let col = &self.select[c];
        match b {
            Bound::Start | Bound::Value(None) => None,
            Bound::Value(Some(t)) => Some(format!("{}::{}", quote_literal(t), col.source_type)),
            Bound::Instant(micros) => {
                let at = crate::mapping::time::format_rfc3339(*micros)?;
                let ts = format!("{}::timestamptz", quote_literal(&at));
                let tz = quote_literal(timezone);
                let wall = format!(
                    "LEAST({ts} AT TIME ZONE {tz}, ({ts} + interval '3 hours') AT TIME ZONE {tz} - interval '3 hours')"
                );
                match col.ty.oid {
                    oid::TIMESTAMPTZ => Some(ts),
                    oid::TIMESTAMP => Some(wall),
                    oid::DATE => Some(format!("({wall})::date")),
                    _ => None,
                }
            }
        }
    }

    /// Where a tick's walk starts: the smallest of the position's lookback
    /// start and the guard's bounds (`None`: from the first row).
    pub fn walk_from_sql(
        &self,
        position: Option<&Position>,
        lookback: std::time::Duration,
        bounds: &[Bound],
        timezone: &str,
    ) -> Option<String> {
        let mut parts = vec![self.lookback_from(position, lookback)?];
        for b in bounds {
            parts.push(self.bound_sql(b, timezone)?);
        }
        Some(if parts.len() == 1 {
            parts.remove(0)
        } else {
            format!("LEAST({})", parts.join(", "))
        })
    }

    /// The greatest `(cursor, key)` with a non-NULL cursor (one row, or
    /// none).
    pub fn max_position_sql(&self) -> String {
        let c = self.cursor.expect("needs a cursor");
        let cursor = self.order_expr(c);
        let mut order = vec![format!("{cursor} DESC")];
        order.extend(
            self.key
                .iter()
                .map(|&i| format!("{} DESC", self.order_expr(i))),
        );
        self.copy(format!(
            "SELECT {} FROM {} WHERE {cursor} IS NOT NULL ORDER BY {} LIMIT 1",
            self.select_list(),
            self.from_sql,
            order.join(", ")
        ))
    }

    /// `max(cursor)` as text, a scalar subquery (integer cursors' guard
    /// bound).
    pub fn max_cursor_expr(&self) -> String {
        let c = self.cursor.expect("needs a cursor");
        format!(
            "(SELECT max({})::text FROM {})",
            self.select[c].order, self.from_sql
        )
    }

    /// Rows whose cursor is NULL (read in full at reconcile time).
    pub fn null_cursor_sql(&self) -> String {
        let c = self.cursor.expect("needs a cursor");
        self.copy(format!(
            "SELECT {} FROM {} WHERE {} IS NULL",
            self.select_list(),
            self.from_sql,
            self.select[c].order
        ))
    }

    /// The position of a row (for cursors and chunk progress).
    pub fn position_of(&self, row: &[Value]) -> Position {
        Position {
            cursor: self
                .cursor
                .map(|c| cursor_value(&self.select[c].ty, &row[c])),
            key: self
                .key
                .iter()
                .map(|&i| cursor_value(&self.select[i].ty, &row[i]))
                .collect(),
        }
    }

    /// Column types of the selected rows.
    pub fn types(&self) -> Vec<PgType> {
        self.select.iter().map(|c| c.ty.clone()).collect()
    }
}

/// A value as PostgreSQL text input, for positions.
pub fn cursor_value(ty: &PgType, v: &Value) -> CursorValue {
    let text = match v {
        Value::Null => None,
        Value::Date(i32::MAX) | Value::Timestamp(i64::MAX) | Value::TimestampTz(i64::MAX) => {
            Some("infinity".into())
        }
        Value::Date(i32::MIN) | Value::Timestamp(i64::MIN) | Value::TimestampTz(i64::MIN) => {
            Some("-infinity".into())
        }
        other => other.to_text(),
    };
    CursorValue { oid: ty.oid, text }
}

/// Something that can run `COPY … TO STDOUT` (a client or a transaction).
pub trait CopyOut {
    /// Starts the copy.
    fn copy_out_stream(
        &self,
        sql: &str,
    ) -> impl std::future::Future<Output = Result<CopyOutStream, tokio_postgres::Error>> + Send;
}

impl CopyOut for Client {
    fn copy_out_stream(
        &self,
        sql: &str,
    ) -> impl std::future::Future<Output = Result<CopyOutStream, tokio_postgres::Error>> + Send
    {
        self.copy_out(sql)
    }
}

impl CopyOut for Transaction<'_> {
    fn copy_out_stream(
        &self,
        sql: &str,
    ) -> impl std::future::Future<Output = Result<CopyOutStream, tokio_postgres::Error>> + Send
    {
        self.copy_out(sql)
    }
}

/// Streams decoded rows of a `COPY … (FORMAT binary)`.
pub struct RowStream {
    inner: std::pin::Pin<Box<CopyOutStream>>,
    reader: CopyBinaryReader,
    done: bool,
}

impl RowStream {
    /// Starts the copy on `client` (a client or a transaction).
    pub async fn start<C: CopyOut>(
        client: &C,
        sql: &str,
        types: Vec<PgType>,
    ) -> Result<RowStream, tokio_postgres::Error> {
        let stream = client.copy_out_stream(sql).await?;
        Ok(RowStream {
            inner: Box::pin(stream),
            reader: CopyBinaryReader::new(types),
            done: false,
        })
    }

    /// Up to `max` rows, each with the values that could not be decoded
    /// (NULL in the row, by column index): one bad value fails its row,
    /// not the read. An empty vector at the end.
    pub async fn next_rows_lenient(&mut self, max: usize) -> Result<Vec<LenientRow>, ReadError> {
        let mut out = Vec::with_capacity(max.min(4096));
        while out.len() < max {
            match self.reader.next_row_lenient() {
                Ok(Some(row)) => {
                    out.push(row);
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Err(ReadError::Decode(e.to_string())),
            }
            if self.done || self.reader.finished() {
                break;
            }
            match next_chunk(&mut self.inner).await {
                Some(Ok(chunk)) => self.reader.push(chunk),
                Some(Err(e)) => return Err(ReadError::Db(e)),
                None => self.done = true,
            }
        }
        Ok(out)
    }

    /// Up to `max` rows; an empty vector at the end. A value that cannot
    /// be decoded fails the batch.
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<Vec<Value>>, ReadError> {
        self.next_rows_lenient(max)
            .await?
            .into_iter()
            .map(|(row, errors)| match errors.into_iter().next() {
                None => Ok(row),
                Some((_, e)) => Err(ReadError::Decode(e.to_string())),
            })
            .collect()
    }
}

impl RowStream {
    /// Up to `max` rows in stream order, and the rows among them that
    /// failed to decode (their index and the decoder's reason, which names
    /// the type and column, never the value). A failed value is NULL in
    /// its row; the stream goes on with the next row. Empty at the end.
    pub async fn next_batch_lenient(
        &mut self,
        max: usize,
    ) -> Result<(Vec<Vec<Value>>, Vec<(usize, String)>), ReadError> {
        let mut out = Vec::with_capacity(max.min(4096));
        let mut bad = Vec::new();
        while out.len() < max {
            match self.reader.next_row() {
                Ok(Some(row)) => {
                    out.push(row);
                    continue;
                }
                Ok(None) => {}
                Err(e) => match self.reader.take_bad_row() {
                    Some(values) => {
                        bad.push((out.len(), e.to_string()));
                        out.push(values);
                        continue;
                    }
                    // The stream itself is broken: nothing more to read.
                    None => return Err(ReadError::Decode(e.to_string())),
                },
            }
            if self.done || self.reader.finished() {
                break;
            }
            match next_chunk(&mut self.inner).await {
                Some(Ok(chunk)) => self.reader.push(chunk),
                Some(Err(e)) => return Err(ReadError::Db(e)),
                None => self.done = true,
            }
        }
        Ok((out, bad))
    }
}

async fn next_chunk<S: Stream<Item = Result<Bytes, tokio_postgres::Error>> + ?Sized>(
    s: &mut std::pin::Pin<Box<S>>,
) -> Option<Result<Bytes, tokio_postgres::Error>> {
    s.as_mut().next().await
}

/// A failure while reading rows.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The database failed.
    #[error("{0}")]
    Db(#[from] tokio_postgres::Error),
    /// A value could not be decoded.
    #[error("{0}")]
    Decode(String),
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::pgtemp::PgTemp;

    /// A `timestamp` cursor written in America/New_York wall-clock time
    /// goes back an hour at the autumn fall-back. For every tick around
    /// the transition, every row stamped (with the writer's `now()`) after
    /// the previous observation's clock reading must lie inside the tick's
    /// window ([`SourceTable::bound_sql`]), as a real PostgreSQL compares
    /// them; the old window (last position minus `lookback`) misses the
    /// repeated hour.
    #[tokio::test]
    async fn a_timestamp_cursor_window_covers_the_repeated_autumn_hour() {
        let pg = PgTemp::start().await.expect("start PostgreSQL");
        let db = pg.create_database(None).await.expect("create database");
        let client = pg.connect(&db).await.expect("connect");
        client
            .batch_execute(
                "CREATE TABLE merchant (id int PRIMARY KEY, trade_name text NOT NULL, \
                   country text NOT NULL, modified_at timestamp NOT NULL);",
            )
            .await
            .unwrap();
        let settings = crate::config::load_str(
            &format!(
                "[source]\nurl = \"{}\"\nmode = \"poll\"\ntimezone = \"America/New_York\"\n\
                 [api]\nbase_url = \"http://127.0.0.1:1\"\n\
                 [[mapping]]\ntype = \"shops\"\ntable = \"public.merchant\"\n\
                 cursor = \"modified_at\"\n[mapping.fields]\n\
                 shop_id = {{ column = \"id\", transform = \"uuid5\" }}\n\
                 name = \"trade_name\"\nregion = {{ column = \"country\", transform = \"upper\" }}\n",
                pg.url(&db)
            ),
            "t.toml",
        )
        .unwrap();
        let ctx = MapContext::from_settings(&settings);
        let t = SourceTable::resolve(&client, &settings.mappings[0], ctx)
            .await
            .unwrap();
        let lookback = Duration::from_secs(2);
        // Fall-back: 2024-11-03 06:00:00Z is 02:00 EDT → 01:00 EST.
        let transition = 1_730_613_600i64 * 1_000_000;
        let sec = 1_000_000i64;
        let mut misses_of_the_old_window = 0;
        for clock in (-4000..4000).step_by(250).map(|s| transition + s * sec) {
            let bound = Bound::Instant(clock - (lookback.as_micros() as i64) - sec);
            let from = t.bound_sql(&bound, "America/New_York").unwrap();
            // Rows whose transaction started after the observation, stamped
            // with New York wall clock, and the newest row read before it.
            for stamp in (0..120).step_by(7).map(|s| clock + s * sec) {
                let at = |m: i64| format!("to_timestamp({m}::float8 / 1e6)");
                let row = client
                    .query_one(
                        &format!(
                            "SELECT ({stamp} AT TIME ZONE 'America/New_York') >= {from}, \
                                    ({stamp} AT TIME ZONE 'America/New_York') >= \
                                    ({prev} AT TIME ZONE 'America/New_York') - interval '2 seconds'",
                            stamp = at(stamp),
                            prev = at(clock - sec),
                        ),
                        &[],
                    )
                    .await
                    .unwrap();
                let (inside, old_inside): (bool, bool) = (row.get(0), row.get(1));
                assert!(
                    inside,
                    "clock {clock}, stamp {stamp}: outside the window {from}"
                );
                if !old_inside {
                    misses_of_the_old_window += 1;
                }
            }
        }
        assert!(
            misses_of_the_old_window > 0,
            "the old window should miss the repeated hour"
        );
    }
}
