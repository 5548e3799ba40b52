//! `cobi-sync check`: proves the configuration, the database, the role's
//! privileges, every mapped table and column, replica identity, the
//! publication and slot, and the API key — one line per check, each
//! problem with how to fix it. Exit 0 only when nothing failed.
//!
//! It changes nothing: the publication and slot are only inspected (the
//! daemon creates them at start when it can), and the API key is proven
//! with `POST /v1/data/shops {"records": []}`: only the API's own envelope
//! answer (its 400 for an empty batch) means reachable and accepted;
//! 401/403 is a rejected key; a redirect (never followed), 404, 405, 5xx or
//! an HTML page is a problem line ([`probe_verdict`]).

use std::path::Path;
use std::sync::Arc;

use tokio_postgres::Client;

use crate::config::pgurl::PgUrl;
use crate::config::{self, quote_ident, Mode, OnDelete, Settings};
use crate::mapping::engine::MapContext;
use crate::model::schema::schema;
use crate::ops::health::Health;
use crate::ops::metrics::Metrics;
use crate::sink::client::{ApiClient, ProbeAnswer};
use crate::source::pg;
use crate::source::reader::{SetupError, SourceTable};
use crate::source::replication::setup;

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Passed.
    Ok(String),
    /// Passed, with something worth knowing.
    Warn(String),
    /// Failed; the second part says how to fix it.
    Fail(String, String),
}

/// One printed line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// What was checked.
    pub name: String,
    /// The verdict.
    pub verdict: Verdict,
}

impl Line {
    fn ok(name: impl Into<String>, detail: impl Into<String>) -> Line {
        Line {
            name: name.into(),
            verdict: Verdict::Ok(detail.into()),
        }
    }
    fn warn(name: impl Into<String>, detail: impl Into<String>) -> Line {
        Line {
            name: name.into(),
            verdict: Verdict::Warn(detail.into()),
        }
    }
    fn fail(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Line {
        Line {
            name: name.into(),
            verdict: Verdict::Fail(detail.into(), fix.into()),
        }
    }

    /// The line as printed.
    pub fn render(&self) -> String {
        match &self.verdict {
            Verdict::Ok(d) => format!("ok      {:<28} {d}", self.name),
            Verdict::Warn(d) => format!("warn    {:<28} {d}", self.name),
            Verdict::Fail(d, fix) => format!(
                "PROBLEM {:<28} {d}\n        {:<28} fix: {fix}",
                self.name, ""
            ),
        }
    }
}

/// A catalog query that failed: a problem, with PostgreSQL's explanation
/// (never turned into "no" or "none", which would pass or fail the check
/// for the wrong reason).
fn query_failed(name: impl Into<String>, e: &tokio_postgres::Error, url: &PgUrl) -> Line {
    Line::fail(
        name,
        pg::explain(e, url),
        "see the message: the connection dropped, or the role may not read the catalog",
    )
}

/// `cobi-sync check`.
pub async fn run(path: &Path) -> Result<(), u8> {
    let settings = match config::load(path) {
        Ok(s) => s,
        Err(e) => {
            println!(
                "{}",
                Line::fail(
                    "configuration",
                    format!("{} is invalid", path.display()),
                    "see the errors below"
                )
                .render()
            );
            eprint!("{e}");
            return Err(2);
        }
    };
    let lines = check(&settings, &path.display().to_string()).await;
    let mut failed = 0;
    for l in &lines {
        println!("{}", l.render());
        if matches!(l.verdict, Verdict::Fail(..)) {
            failed += 1;
        }
    }
    if failed == 0 {
        println!("all checks passed");
        Ok(())
    } else {
        println!(
            "{failed} problem{} found",
            if failed == 1 { "" } else { "s" }
        );
        Err(1)
    }
}

/// Runs every check for valid settings.
pub async fn check(settings: &Settings, origin: &str) -> Vec<Line> {
    let mut out = vec![Line::ok(
        "configuration",
        format!(
            "{origin}: {} mode, {} mapping{}",
            settings.source.mode.as_str(),
            settings.mappings.len(),
            if settings.mappings.len() == 1 {
                ""
            } else {
                "s"
            }
        ),
    )];
    for (path, warning) in config::secret::secret_file_permissions(settings) {
        out.push(match warning {
            Some(w) => Line::fail(
                "secret file permissions",
                w,
                format!("chmod 600 {}", path.display()),
            ),
            None => Line::ok(
                "secret file permissions",
                format!("{} is private", path.display()),
            ),
        });
    }
    for w in &settings.source.url.warnings {
        out.push(Line::warn("configuration", w.clone()));
    }
    out.push(tls_line(&settings.source.url));
    if !crate::daemon::has_state(&settings.state.dir) {
        out.push(Line::ok(
            "state dir",
            crate::daemon::no_state_message(settings),
        ));
    }
    database_checks(settings, &mut out).await;
    out.push(api_check(settings).await);
    out
}

/// The database connection's TLS: `disable`, `allow` and `prefer` to a
/// host on the network are a warning (nothing verified: readable and
/// impersonable on the path), with `verify-full` recommended.
pub fn tls_line(url: &PgUrl) -> Line {
    let name = "database TLS";
    let mode = url.sslmode.as_str();
    if url.is_local() {
        Line::ok(
            name,
            format!("sslmode={mode} to a local server ({})", url.host),
        )
    } else if url.sslmode.is_unprotected() {
        Line::warn(
            name,
            format!(
                "sslmode={mode} to {}: the connection may be unencrypted, and the server is not \
                 verified; add ?sslmode=verify-full to source.url (sslrootcert=/path/ca.pem for a \
                 private CA)",
                url.host
            ),
        )
    } else {
        Line::ok(name, format!("sslmode={mode}"))
    }
}

/// `max_slot_wal_keep_size` (PostgreSQL 13+): `-1` lets a stopped or
/// removed cobi-sync's slot keep WAL until the disk fills.
pub fn wal_keep_line(value: &str) -> Line {
    let name = "max_slot_wal_keep_size";
    if value.trim() == "-1" {
        Line::warn(
            name,
            "is -1 (unlimited): a stopped or removed cobi-sync's slot keeps WAL until the disk \
             fills; set a bound, e.g. ALTER SYSTEM SET max_slot_wal_keep_size = '50GB'; SELECT \
             pg_reload_conf(); (past it the slot is invalidated and cobi-sync re-syncs), and run \
             `cobi-sync teardown` before removing cobi-sync",
        )
    } else {
        Line::ok(name, format!("{value}: WAL kept for slots is bounded"))
    }
}

/// The statements that replace a superuser connection (README's
/// least-privilege role), for the mapped tables.
fn least_privilege_sql(settings: &Settings, replication: bool) -> String {
    let tables: Vec<String> = settings.mappings.iter().map(|m| m.source.sql()).collect();
    let mut schemas: Vec<String> = settings
        .mappings
        .iter()
        .filter_map(|m| m.source.sql().split_once('.').map(|(s, _)| s.to_string()))
        .collect();
    schemas.sort();
    schemas.dedup();
    let mut sql = format!(
        "CREATE ROLE cobi_sync LOGIN{} PASSWORD '…';",
        if replication { " REPLICATION" } else { "" }
    );
    for s in &schemas {
        sql.push_str(&format!(" GRANT USAGE ON SCHEMA {s} TO cobi_sync;"));
    }
    if !tables.is_empty() {
        sql.push_str(&format!(
            " GRANT SELECT ON {} TO cobi_sync;",
            tables.join(", ")
        ));
    }
    sql.push_str(" then use cobi_sync in source.url");
    sql
}

async fn database_checks(settings: &Settings, out: &mut Vec<Line>) {
    let url = &settings.source.url;
    let client = match pg::connect(&settings.source).await {
        Ok(c) => {
            out.push(Line::ok(
                "database reachable",
                format!("connected to {url}"),
            ));
            c
        }
        Err(e) => {
            out.push(Line::fail(
                "database reachable",
                e.message.clone(),
                "fix source.url / the password / TLS settings, or ask the DBA (the message says which)",
            ));
            return;
        }
    };
    let replication = settings.source.mode == Mode::Replication;
    // Server version.
    match pg::server_version(&client).await {
        Ok(v) => {
            let min = if replication {
                setup::MIN_VERSION
            } else {
                130_000
            };
            if v >= min {
                out.push(Line::ok(
                    "server version",
                    format!("PostgreSQL {}.{}", v / 10000, v % 10000),
                ));
            } else {
                out.push(Line::fail(
                    "server version",
                    format!(
                        "PostgreSQL {} is too old for {} mode",
                        v / 10000,
                        settings.source.mode.as_str()
                    ),
                    if replication {
                        "upgrade to PostgreSQL 14 or newer, or use source.mode = \"poll\""
                    } else {
                        "upgrade to PostgreSQL 13 or newer"
                    },
                ));
            }
        }
        Err(e) => out.push(query_failed("server version", &e, url)),
    }
    // wal_level.
    if replication {
        match client.query_one("SHOW wal_level", &[]).await {
            Ok(r) => {
                let level: String = r.get(0);
                if level == "logical" {
                    out.push(Line::ok("wal_level", "logical"));
                } else {
                    out.push(Line::fail(
                        "wal_level",
                        format!("is `{level}`; logical replication needs `logical`"),
                        "set wal_level = logical in postgresql.conf and restart PostgreSQL, or use source.mode = \"poll\"",
                    ));
                }
            }
            Err(e) => out.push(query_failed("wal_level", &e, url)),
        }
        match client.query_one("SHOW max_slot_wal_keep_size", &[]).await {
            Ok(r) => out.push(wal_keep_line(&r.get::<_, String>(0))),
            Err(e) => out.push(query_failed("max_slot_wal_keep_size", &e, url)),
        }
    }
    // Role attributes.
    let role = client
        .query_one(
            "SELECT current_user::text, rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await;
    match role {
        Ok(r) => {
            let (user, repl, sup): (String, bool, bool) = (r.get(0), r.get(1), r.get(2));
            if sup {
                out.push(Line::fail(
                    "least privilege",
                    format!("connected as superuser {user}, which cobi-sync does not need"),
                    least_privilege_sql(settings, replication),
                ));
            } else if replication && !repl {
                out.push(Line::fail(
                    "privileges",
                    format!("role {user} lacks the REPLICATION attribute"),
                    format!("ALTER ROLE {} REPLICATION;", quote_ident(&user)),
                ));
            } else {
                out.push(Line::ok(
                    "privileges",
                    format!(
                        "role {user}{}",
                        if replication { " has REPLICATION" } else { "" }
                    ),
                ));
            }
        }
        Err(e) => out.push(query_failed("privileges", &e, url)),
    }
    // Tables, columns, types, SELECT, replica identity.
    let ctx = MapContext::from_settings(settings);
    let mut tables = Vec::new();
    for m in &settings.mappings {
        let name = format!("{} {}", m.label(), m.source.sql());
        match SourceTable::resolve(&client, m, ctx).await {
            Ok(t) => {
                let mut problems = Vec::new();
                if let Some(info) = &t.table {
                    let can = client
                        .query_one(
                            "SELECT has_table_privilege($1::oid, 'SELECT')",
                            &[&info.oid],
                        )
                        .await
                        .map(|r| r.get::<_, bool>(0));
                    match can {
                        Ok(true) => {}
                        Ok(false) => problems.push((
                            "the role cannot SELECT from it".to_string(),
                            format!(
                                "GRANT SELECT ON {} TO {};",
                                m.source.sql(),
                                quote_ident(&url.user)
                            ),
                        )),
                        Err(e) => problems.push((
                            format!(
                                "cannot check the SELECT privilege: {}",
                                pg::explain(&e, url)
                            ),
                            "see the message; then run `cobi-sync check` again".to_string(),
                        )),
                    }
                }
                if problems.is_empty() {
                    out.push(Line::ok(
                        name,
                        format!(
                            "{} columns mapped, key ({})",
                            t.select.len(),
                            t.key_names().join(", ")
                        ),
                    ));
                } else {
                    for (d, f) in problems {
                        out.push(Line::fail(name.clone(), d, f));
                    }
                }
                tables.push(t);
            }
            Err(SetupError::Config(msg)) => {
                out.push(Line::fail(
                    name,
                    msg.replace('\n', "; "),
                    "fix the mapping (table/column names, key, transforms) or the table",
                ));
            }
            Err(SetupError::Db(e)) => out.push(Line::fail(
                name,
                pg::explain(&e, url),
                "check the connection",
            )),
        }
    }
    timezone_check(settings, &client, out).await;
    if !replication {
        crate::source::poll::checks::poll_checks(settings, &client, &tables, out).await;
        return;
    }
    // Replica identity vs deletes.
    for t in &tables {
        let Some(info) = &t.table else { continue };
        let name = format!("replica identity {}", t.mapping.source.sql());
        let one = std::slice::from_ref(t);
        match setup::check_tables(&client, one).await {
            Ok(()) => {
                let mut detail = match (info.replica_identity, t.mapping.on_delete) {
                    ('f', _) => "FULL: deletes carry the whole row".to_string(),
                    (_, OnDelete::Soft) => {
                        "deletes carry the key; soft deletes use the last-sent record".to_string()
                    }
                    _ => "deletes ignored (on_delete = \"ignore\")".to_string(),
                };
                if info.replica_identity != 'f' {
                    let toastable = toastable_columns(&client, info.oid, &t.mapping.columns())
                        .await
                        .unwrap_or_default();
                    if let Some(note) = toast_note(&toastable, &t.mapping.source.sql()) {
                        detail.push_str("; ");
                        detail.push_str(&note);
                    }
                }
                out.push(Line::ok(name, detail))
            }
            Err(e) => out.push(Line::fail(
                name,
                e.to_string().replace('\n', "; "),
                "see the message",
            )),
        }
    }
    publication_check(settings, &client, &tables, out).await;
    slot_check(settings, &client, out).await;
}

/// The mapped columns among `columns` whose values PostgreSQL may store
/// out of line (TOAST: any storage but `plain`).
async fn toastable_columns(
    client: &Client,
    table: u32,
    columns: &[String],
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::oid AND attnum > 0 \
             AND NOT attisdropped AND attstorage <> 'p' AND attname = ANY($2) ORDER BY attnum",
            &[&table, &columns],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// What `check` says about a table without REPLICA IDENTITY FULL whose
/// mapped columns can be TOASTed (pure): an update that leaves such a value
/// unchanged does not send it, so the row is re-read (held back behind its
/// parents); FULL sends it in the old row instead.
fn toast_note(toastable: &[String], table: &str) -> Option<String> {
    if toastable.is_empty() {
        return None;
    }
    Some(format!(
        "mapped columns {} can be stored out of line (TOAST): an update that leaves them \
         unchanged does not send them and cobi-sync re-reads the row; to have them sent \
         instead: ALTER TABLE {table} REPLICA IDENTITY FULL",
        toastable.join(", ")
    ))
}

/// `timestamp without time zone` values are read in `source.timezone`;
/// writers' sessions stamp them in the server's `TimeZone` unless they set
/// their own. A difference shifts every such value.
async fn timezone_check(settings: &Settings, client: &Client, out: &mut Vec<Line>) {
    let ours = settings.source.timezone.name();
    // Zones with different names can be the same rules (UTC, Etc/UTC).
    let same_rules = |server: String| async move {
        server == ours
            || client
                .query_one(
                    "SELECT bool_and((t AT TIME ZONE $1) = (t AT TIME ZONE $2)) FROM \
                     generate_series(now() - interval '3 years', now() + interval '3 years', \
                     interval '1 hour') t",
                    &[&server, &ours],
                )
                .await
                .is_ok_and(|r| r.get::<_, Option<bool>>(0) == Some(true))
    };
    match pg::server_timezone(&settings.source).await {
        Ok(server) if same_rules(server.clone()).await => out.push(Line::ok(
            "time zone",
            format!(
                "source.timezone ({ours}) keeps the same time as the server's TimeZone ({server})"
            ),
        )),
        Ok(server) => out.push(Line::warn(
            "time zone",
            format!(
                "source.timezone is {ours} but the server's TimeZone is {server}: `timestamp` \
                 values written with now() in the server's zone are read as {ours}; set \
                 source.timezone = \"{server}\" unless your applications write {ours} wall clock"
            ),
        )),
        Err(e) => out.push(Line::warn(
            "time zone",
            format!("could not read the server's TimeZone: {}", e.message),
        )),
    }
}

/// A check line (for [`crate::source::poll::checks`]).
pub fn line_ok(name: impl Into<String>, detail: impl Into<String>) -> Line {
    Line::ok(name, detail)
}

/// A warning line (for [`crate::source::poll::checks`]).
pub fn line_warn(name: impl Into<String>, detail: impl Into<String>) -> Line {
    Line::warn(name, detail)
}

async fn publication_check(
    settings: &Settings,
    client: &Client,
    tables: &[SourceTable],
    out: &mut Vec<Line>,
) {
    let publication = &settings.source.replication.publication;
    let url = &settings.source.url;
    let row = client
        .query_opt(
            "SELECT puballtables FROM pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await;
    let name = format!("publication {publication}");
    match row {
        Err(e) => out.push(query_failed(name, &e, url)),
        Ok(None) => {
            // Can this role create it? It must own every table.
            let mut not_owned = Vec::new();
            for t in tables {
                if let Some(info) = &t.table {
                    let owns = client
                        .query_one(
                            "SELECT pg_has_role(c.relowner, 'USAGE') FROM pg_class c WHERE c.oid = $1",
                            &[&info.oid],
                        )
                        .await
                        .map(|r| r.get::<_, bool>(0));
                    match owns {
                        Ok(true) => {}
                        Ok(false) => not_owned.push(t.mapping.source.sql()),
                        Err(e) => {
                            out.push(query_failed(name, &e, url));
                            return;
                        }
                    }
                }
            }
            if not_owned.is_empty() {
                out.push(Line::ok(name, "missing; the daemon creates it at start"));
            } else {
                out.push(Line::fail(
                    name,
                    format!(
                        "missing, and this role cannot create it (it does not own {})",
                        not_owned.join(", ")
                    ),
                    format!(
                        "ask the table owner to run: {}",
                        setup::create_publication_sql(publication, tables)
                    ),
                ));
            }
        }
        Ok(Some(r)) => {
            let all: bool = r.get(0);
            if all {
                out.push(Line::ok(name, "FOR ALL TABLES"));
                return;
            }
            let listed: Vec<(String, String)> = match client
                .query(
                    "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
                    &[publication],
                )
                .await
            {
                Ok(rows) => rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
                Err(e) => {
                    out.push(query_failed(name, &e, url));
                    return;
                }
            };
            let missing: Vec<String> = tables
                .iter()
                .filter_map(|t| t.table.as_ref())
                .filter(|i| {
                    !listed.contains(&(i.schema.clone(), i.name.clone())) && i.relkind != 'p'
                })
                .map(|i| format!("{}.{}", i.schema, i.name))
                .collect();
            if missing.is_empty() {
                out.push(Line::ok(
                    name,
                    format!("lists every mapped table ({})", listed.len()),
                ));
            } else {
                out.push(Line::warn(
                    name,
                    format!(
                        "does not list {}; the daemon adds them at start (needs table ownership)",
                        missing.join(", ")
                    ),
                ));
            }
        }
    }
}

async fn slot_check(settings: &Settings, client: &Client, out: &mut Vec<Line>) {
    let slot = &settings.source.replication.slot;
    let name = format!("replication slot {slot}");
    // What cobi-sync confirmed before (the store is locked while the daemon
    // runs: then the daemon itself watches the slot).
    // A missing state dir is not created here.
    let known = crate::daemon::open_existing_store(settings)
        .ok()
        .flatten()
        .and_then(|s| {
            crate::state::replication_checkpoint(s.as_ref())
                .ok()
                .flatten()
        })
        .map_or(0, |c| c.lsn);
    let row = client
        .query_opt(
            "SELECT s.plugin::text, s.database::text, s.active, COALESCE(s.wal_status, 'reserved'), \
                    COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn), 0)::int8, \
                    current_database()::text, s.active_pid, a.application_name::text \
             FROM pg_replication_slots s LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid \
             WHERE s.slot_name = $1",
            &[slot],
        )
        .await;
    match row {
        Err(e) => out.push(query_failed(name, &e, &settings.source.url)),
        Ok(None) if known > 0 => out.push(Line::fail(
            name,
            format!(
                "missing, but cobi-sync had confirmed changes up to {}: changes since may have been missed",
                crate::ops::status::format_lsn(known)
            ),
            "run `cobi-sync snapshot` to re-create the slot and re-sync (unchanged records are not re-sent)",
        )),
        Ok(None) => out.push(Line::ok(name, "missing; the daemon creates it at start")),
        Ok(Some(r)) => out.push(slot_verdict(
            slot,
            &SlotRow {
                plugin: r.get(0),
                database: r.get(1),
                active: r.get(2),
                status: r.get(3),
                lag: r.get(4),
                current_database: r.get(5),
                active_pid: r.get(6),
                consumer: r.get(7),
            },
            settings.source.replication.max_slot_lag,
        )),
    }
}

/// What `pg_replication_slots` says about the configured slot.
#[derive(Debug, Clone)]
struct SlotRow {
    plugin: Option<String>,
    /// The database a logical slot belongs to.
    database: Option<String>,
    /// A walsender streams from it now.
    active: bool,
    /// `wal_status` (`lost`: invalidated).
    status: String,
    /// Bytes between the server's WAL position and the slot's confirmed one.
    lag: i64,
    /// The database `source.url` connects to.
    current_database: String,
    /// The walsender streaming from it, and its `application_name`.
    active_pid: Option<i32>,
    consumer: Option<String>,
}

/// The verdict on an existing slot.
fn slot_verdict(slot: &str, r: &SlotRow, max_slot_lag: u64) -> Line {
    let name = format!("replication slot {slot}");
    if r.plugin.as_deref() != Some("pgoutput") {
        return Line::fail(
            name,
            format!(
                "exists with plugin {}",
                r.plugin.as_deref().unwrap_or("(none: a physical slot)")
            ),
            "choose another source.replication.slot, or drop that slot",
        );
    }
    if let Some(db) = r.database.as_deref().filter(|db| *db != r.current_database) {
        return Line::fail(
            name,
            format!(
                "belongs to database {db}, not {} (slot names are shared by the whole server; \
                 a logical slot streams one database)",
                r.current_database
            ),
            format!(
                "choose another source.replication.slot, or, if nothing in {db} uses it, drop it \
                 there: SELECT pg_drop_replication_slot({});",
                pg::quote_literal(slot)
            ),
        );
    }
    if r.status == "lost" {
        return Line::fail(
            name,
            "invalidated by the server (WAL it needed was removed)",
            "run `cobi-sync snapshot` to re-create it and re-sync",
        );
    }
    if r.active {
        let who = match (r.active_pid, r.consumer.as_deref()) {
            (Some(pid), Some(app)) if !app.is_empty() => {
                format!("pid {pid}, application_name {app}")
            }
            (Some(pid), _) => format!("pid {pid}"),
            (None, _) => "another connection".into(),
        };
        return Line::warn(
            name,
            format!(
                "in use now ({who}), lag {} bytes: fine if that is this cobi-sync's running \
                 daemon; any other consumer takes changes away from cobi-sync — give it its own slot",
                r.lag
            ),
        );
    }
    if r.lag as u64 > max_slot_lag {
        Line::warn(
            name,
            format!("lag {} bytes is above max_slot_lag ({max_slot_lag})", r.lag),
        )
    } else {
        Line::ok(name, format!("exists, lag {} bytes", r.lag))
    }
}

async fn api_check(settings: &Settings) -> Line {
    let name = "cobi api key";
    if let Err(e) = settings.api.key.load() {
        let fix = match &e {
            config::secret::SecretError::NoKey { .. } => {
                "put the key where the message says".into()
            }
            config::secret::SecretError::File { error, .. }
                if error.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                "run check as root (sudo cobi-sync check), or make the file readable by this user"
                    .into()
            }
            _ => format!("fix the key in {}", settings.api.key.describe()),
        };
        return Line::fail(name, e.to_string(), fix);
    }
    let client = match ApiClient::new(
        &settings.api,
        Arc::new(Health::default()),
        Arc::new(Metrics::new()),
        tokio_util::sync::CancellationToken::new(),
    ) {
        Ok(c) => c,
        Err(e) => return Line::fail(name, e, "check the [api] settings"),
    };
    let shops = schema().type_id("shops").expect("shops exists");
    match client.probe(shops).await {
        Ok(answer) => probe_verdict(
            &settings.api.base_url,
            &settings.api.key.describe(),
            &answer,
        ),
        Err(e) => Line::fail(
            name,
            format!("cannot reach {}: {e}", settings.api.base_url),
            "check api.base_url, DNS, proxies (HTTPS_PROXY / NO_PROXY), api.ca_file and firewalls",
        ),
    }
}

/// Whether `body` is the Cobi API's own answer to a batch: a JSON object
/// with a `batches` array (SPEC.md §1's response envelope).
fn is_api_envelope(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("batches").map(serde_json::Value::is_array))
        .unwrap_or(false)
}

/// The verdict on the API's answer to an empty batch. Only the API's own
/// envelope (its 400 refusing an empty batch, or a 200/207 envelope) proves
/// "reachable, key accepted"; 401/403 is a rejected key; a redirect, a
/// 404/405, a 5xx, or any answer without the envelope (an HTML page from a
/// proxy or a login portal) is a problem naming what came back.
pub fn probe_verdict(base_url: &str, key_source: &str, a: &ProbeAnswer) -> Line {
    let name = "cobi api key";
    let status = a.status;
    let ct = a.content_type.as_deref().unwrap_or("no content type");
    match status {
        401 | 403 => Line::fail(
            name,
            format!("{base_url} rejected the key from {key_source} (HTTP {status})"),
            "put the key Cobi gave you in that place (support@hellocobi.com issues keys)",
        ),
        300..=399 => Line::fail(
            name,
            format!(
                "{base_url} answered a redirect (HTTP {status} to {}); cobi-sync never follows \
                 redirects",
                a.location.as_deref().unwrap_or("no Location")
            ),
            "set api.base_url to the API's own address (https://api.hellocobi.com), not a \
             proxy or portal in front of it",
        ),
        200 | 207 | 400 if is_api_envelope(&a.body) => Line::ok(
            name,
            format!("{base_url} reachable, key accepted (HTTP {status} to an empty batch)"),
        ),
        500..=599 => Line::fail(
            name,
            format!("{base_url} answered HTTP {status} (server error) to an empty batch"),
            "the API or a proxy in front of it is failing: try again later, check api.base_url",
        ),
        _ => Line::fail(
            name,
            format!(
                "{base_url} answered HTTP {status} ({ct}) without the Cobi API's JSON envelope: \
                 this is not the Cobi Data API"
            ),
            "check api.base_url (https://api.hellocobi.com) and any proxy or captive portal \
             in between",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toast_note_names_the_columns_and_the_fix() {
        let t = "\"public\".\"merchant\"";
        assert_eq!(toast_note(&[], t), None);
        let note = toast_note(&["trade_name".into(), "notes".into()], t).unwrap();
        assert!(note.contains("mapped columns trade_name, notes"), "{note}");
        assert!(
            note.contains("ALTER TABLE \"public\".\"merchant\" REPLICA IDENTITY FULL"),
            "{note}"
        );
    }

    #[test]
    fn tls_warns_for_unprotected_modes_to_network_hosts() {
        let cases = [
            ("postgres://u@db.internal/x?sslmode=disable", "warn"),
            ("postgres://u@db.internal/x?sslmode=allow", "warn"),
            ("postgres://u@db.internal/x", "warn"),
            ("postgres://u@10.1.2.3/x?sslmode=prefer", "warn"),
            ("postgres://u@db.internal/x?sslmode=require", "ok"),
            ("postgres://u@db.internal/x?sslmode=verify-full", "ok"),
            ("postgres://u@localhost/x?sslmode=disable", "ok"),
            ("postgres://u@127.0.0.1/x", "ok"),
            ("postgres://u@[::1]/x", "ok"),
            ("postgres://u@/x?host=/run/postgresql", "ok"),
        ];
        for (url, want) in cases {
            let l = tls_line(&PgUrl::parse(url).unwrap());
            let got = match &l.verdict {
                Verdict::Ok(_) => "ok",
                Verdict::Warn(d) => {
                    assert!(d.contains("verify-full"), "{d}");
                    "warn"
                }
                Verdict::Fail(..) => "fail",
            };
            assert_eq!(got, want, "{url}: {l:?}");
        }
        let allow = PgUrl::parse("postgres://u@db/x?sslmode=allow").unwrap();
        assert!(
            allow
                .warnings
                .iter()
                .any(|w| w.contains("sslmode=allow is handled as prefer")),
            "{:?}",
            allow.warnings
        );
    }

    #[test]
    fn unbounded_wal_for_slots_is_a_warning() {
        assert!(
            matches!(wal_keep_line("-1").verdict, Verdict::Warn(ref d) if d.contains("max_slot_wal_keep_size = '50GB'") && d.contains("teardown"))
        );
        assert!(matches!(wal_keep_line("50GB").verdict, Verdict::Ok(_)));
    }

    #[test]
    fn only_the_api_envelope_proves_the_key() {
        let envelope = r#"{"request_id":"r","type":"shops","batches":[{"batch":0,"status":400,"data":{"status":"error","error":"records must not be empty"}}]}"#;
        let answer = |status: u16, ct: &str, location: Option<&str>, body: &str| ProbeAnswer {
            status,
            content_type: Some(ct.into()),
            location: location.map(str::to_string),
            body: bytes::Bytes::from(body.to_string()),
        };
        let json = "application/json";
        let html = "text/html";
        // (answer, passes, a word the detail must hold)
        let cases = [
            (
                answer(400, json, None, envelope),
                true,
                "HTTP 400 to an empty batch",
            ),
            (answer(200, json, None, envelope), true, "key accepted"),
            (
                answer(401, json, None, r#"{"error":"Unauthorized"}"#),
                false,
                "rejected the key",
            ),
            (answer(403, json, None, "{}"), false, "rejected the key"),
            (
                answer(404, json, None, r#"{"error":"Not Found"}"#),
                false,
                "HTTP 404",
            ),
            (
                answer(405, "text/plain", None, "Method Not Allowed"),
                false,
                "HTTP 405",
            ),
            (
                answer(502, html, None, "<html>Bad Gateway</html>"),
                false,
                "HTTP 502",
            ),
            (answer(500, json, None, envelope), false, "server error"),
            (
                answer(301, html, Some("https://login.example/"), ""),
                false,
                "https://login.example/",
            ),
            (answer(307, html, None, ""), false, "redirect"),
            (
                answer(200, html, None, "<html>Sign in</html>"),
                false,
                "text/html",
            ),
            (
                answer(400, json, None, r#"{"error":"bad"}"#),
                false,
                "envelope",
            ),
        ];
        for (a, passes, word) in cases {
            let l = probe_verdict("https://api.example", "file /etc/cobi-sync/api-key", &a);
            let detail = match &l.verdict {
                Verdict::Ok(d) => {
                    assert!(passes, "HTTP {} must be a problem, got ok: {d}", a.status);
                    d.clone()
                }
                Verdict::Fail(d, fix) => {
                    assert!(!passes, "HTTP {} must pass: {d}", a.status);
                    assert!(!fix.is_empty());
                    d.clone()
                }
                Verdict::Warn(d) => panic!("no warnings here: {d}"),
            };
            assert!(detail.contains(word), "HTTP {}: {detail}", a.status);
        }
    }

    fn row() -> SlotRow {
        SlotRow {
            plugin: Some("pgoutput".into()),
            database: Some("shop".into()),
            active: false,
            status: "reserved".into(),
            lag: 100,
            current_database: "shop".into(),
            active_pid: None,
            consumer: None,
        }
    }

    #[test]
    fn an_idle_slot_of_this_database_is_ok() {
        let l = slot_verdict("cobi_sync", &row(), 1000);
        assert_eq!(l.name, "replication slot cobi_sync");
        assert_eq!(l.verdict, Verdict::Ok("exists, lag 100 bytes".into()));
        let l = slot_verdict("cobi_sync", &row(), 10);
        assert!(matches!(l.verdict, Verdict::Warn(ref d) if d.contains("above max_slot_lag")));
    }

    #[test]
    fn a_slot_of_another_database_fails_with_the_fix() {
        let r = SlotRow {
            database: Some("billing".into()),
            ..row()
        };
        match slot_verdict("cobi_sync", &r, 1000).verdict {
            Verdict::Fail(detail, fix) => {
                assert!(
                    detail.contains("belongs to database billing, not shop"),
                    "{detail}"
                );
                assert!(
                    fix.contains("choose another source.replication.slot"),
                    "{fix}"
                );
                assert!(
                    fix.contains("pg_drop_replication_slot('cobi_sync')"),
                    "{fix}"
                );
            }
            v => panic!("want a failure, got {v:?}"),
        }
    }

    #[test]
    fn an_active_slot_is_a_warning_naming_the_consumer() {
        let r = SlotRow {
            active: true,
            active_pid: Some(4242),
            consumer: Some("debezium".into()),
            ..row()
        };
        match slot_verdict("cobi_sync", &r, 1000).verdict {
            Verdict::Warn(d) => {
                assert!(
                    d.contains("in use now (pid 4242, application_name debezium)"),
                    "{d}"
                );
                assert!(d.contains("own slot"), "{d}");
            }
            v => panic!("want a warning, got {v:?}"),
        }
        // Wrong plugin and lost slots still fail first.
        let r = SlotRow {
            active: true,
            status: "lost".into(),
            ..row()
        };
        assert!(matches!(
            slot_verdict("s", &r, 1000).verdict,
            Verdict::Fail(ref d, _) if d.contains("invalidated")
        ));
        let r = SlotRow {
            plugin: None,
            database: None,
            ..row()
        };
        assert!(matches!(
            slot_verdict("s", &r, 1000).verdict,
            Verdict::Fail(ref d, _) if d.contains("physical slot")
        ));
    }
}
