//! Replication setup: the server and role can replicate, every mapped table
//! can be published and read, the publication lists exactly the mapped
//! tables, the slot exists (created *after* the publication) and is ours.
//!
//! Every failure says what to run or change.

use tokio_postgres::Client;
use tracing::{info, warn};

use crate::config::{quote_ident, OnDelete};
use crate::ops::status::format_lsn;
use crate::source::pg::{self, quote_literal, APPLICATION_NAME};
use crate::source::reader::SourceTable;
use crate::source::SourceError;

/// Lowest server version for replication mode (pgoutput `messages`,
/// which the replication crate always requests, came in PostgreSQL 14).
pub const MIN_VERSION: i32 = 140_000;

/// Checks `wal_level`, the server version, and the role's REPLICATION
/// attribute.
pub async fn check_server(client: &Client) -> Result<(), SourceError> {
    let version = pg::server_version(client).await.map_err(db)?;
    if version < MIN_VERSION {
        return Err(SourceError::Fatal(format!(
            "PostgreSQL {} is too old for replication mode (needs 14 or newer); upgrade, or set \
             source.mode = \"poll\"",
            version / 10000
        )));
    }
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(db)?
        .get(0);
    if wal_level != "logical" {
        return Err(SourceError::Fatal(format!(
            "wal_level is `{wal_level}`; logical replication needs wal_level = logical in \
             postgresql.conf (then restart PostgreSQL), or set source.mode = \"poll\""
        )));
    }
    let row = client
        .query_one(
            "SELECT rolreplication, rolsuper, current_user::text FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(db)?;
    let (repl, sup, user): (bool, bool, String) = (row.get(0), row.get(1), row.get(2));
    if !repl && !sup {
        return Err(SourceError::Fatal(format!(
            "role {user} lacks the REPLICATION attribute; run: ALTER ROLE {} REPLICATION;",
            quote_ident(&user)
        )));
    }
    Ok(())
}

fn db(e: tokio_postgres::Error) -> SourceError {
    SourceError::Fatal(format!(
        "setup query failed: {}",
        e.as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_string())
    ))
}

/// Per-table checks: SELECT privilege, a table (not a view), replica
/// identity good enough for the mapping's deletes.
pub async fn check_tables(client: &Client, tables: &[SourceTable]) -> Result<(), SourceError> {
    let mut problems = Vec::new();
    for t in tables {
        let Some(info) = &t.table else {
            problems.push(format!(
                "{}: replication mode needs a table, not a query",
                t.mapping.label()
            ));
            continue;
        };
        let name = format!("{}.{}", quote_ident(&info.schema), quote_ident(&info.name));
        let can: bool = client
            .query_one(
                "SELECT has_table_privilege($1::oid, 'SELECT')",
                &[&info.oid],
            )
            .await
            .map_err(db)?
            .get(0);
        if !can {
            problems.push(format!(
                "{}: no SELECT privilege on {name}; run: GRANT SELECT ON {name} TO <cobi-sync role>;",
                t.mapping.label()
            ));
        }
        if !matches!(info.relkind, 'r' | 'p') {
            problems.push(format!(
                "{}: {name} is not a table (views and foreign tables cannot be replicated); map its \
                 underlying table or use poll mode",
                t.mapping.label()
            ));
            continue;
        }
        let keys = t.key_names();
        match info.replica_identity {
            'n' => problems.push(format!(
                "{}: {name} has REPLICA IDENTITY NOTHING, so updates and deletes are not \
                 replicated; run: ALTER TABLE {name} REPLICA IDENTITY DEFAULT; (or FULL)",
                t.mapping.label()
            )),
            'f' => {}
            _ => {
                if info.identity_columns.is_empty() {
                    problems.push(format!(
                        "{}: {name} has no primary key or replica identity index, so PostgreSQL \
                         rejects its updates and deletes under a publication; add a primary key, \
                         or run: ALTER TABLE {name} REPLICA IDENTITY FULL;",
                        t.mapping.label()
                    ));
                } else if t.mapping.on_delete == OnDelete::Soft
                    && !keys.iter().all(|k| info.identity_columns.contains(k))
                {
                    problems.push(format!(
                        "{}: the key ({}) is not part of {name}'s replica identity ({}), so a \
                         DELETE does not say which record to mark deleted; run: ALTER TABLE {name} \
                         REPLICA IDENTITY FULL; or set key to the primary key",
                        t.mapping.label(),
                        keys.join(", "),
                        info.identity_columns.join(", ")
                    ));
                }
            }
        }
        if info.is_partition {
            warn!(table = %name, "a partition is mapped; changes are published through the partitioned root only if you map the root table");
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(SourceError::Config(problems.join("\n")))
    }
}

/// The `CREATE PUBLICATION` statement for the mapped tables.
pub fn create_publication_sql(publication: &str, tables: &[SourceTable]) -> String {
    let mut names: Vec<String> = tables
        .iter()
        .filter_map(|t| t.table.as_ref())
        .map(|i| format!("{}.{}", quote_ident(&i.schema), quote_ident(&i.name)))
        .collect();
    names.sort();
    names.dedup();
    format!(
        "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true);",
        quote_ident(publication),
        names.join(", ")
    )
}

/// Creates the publication, or adds/removes tables so it lists exactly the
/// mapped tables.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    tables: &[SourceTable],
) -> Result<(), SourceError> {
    let row = client
        .query_opt(
            "SELECT puballtables, pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(db)?;
    let wanted: Vec<(String, String)> = {
        let mut v: Vec<(String, String)> = tables
            .iter()
            .filter_map(|t| t.table.as_ref())
            .map(|i| (i.schema.clone(), i.name.clone()))
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let needs_root = tables
        .iter()
        .filter_map(|t| t.table.as_ref())
        .any(|i| i.relkind == 'p');
    let ownership_hint = |e: &tokio_postgres::Error, sql: &str| {
        let msg = e
            .as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_string());
        SourceError::Fatal(format!(
            "cannot set up publication {publication}: {msg}. Changing a publication needs \
             ownership of the tables; ask the database owner to run:\n  {sql}"
        ))
    };
    match row {
        None => {
            let sql = create_publication_sql(publication, tables);
            client
                .batch_execute(&sql)
                .await
                .map_err(|e| ownership_hint(&e, &sql))?;
            info!(publication, tables = wanted.len(), "publication created");
        }
        Some(r) => {
            let all: bool = r.get(0);
            let via_root: bool = r.get(1);
            if all {
                return Ok(());
            }
            if needs_root && !via_root {
                let sql = format!(
                    "ALTER PUBLICATION {} SET (publish_via_partition_root = true);",
                    quote_ident(publication)
                );
                client
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| ownership_hint(&e, &sql))?;
            }
            // pg_publication_rel lists the tables named in the publication.
            let current: Vec<(String, String)> = client
                .query(
                    "SELECT n.nspname::text, c.relname::text FROM pg_publication_rel pr \
                     JOIN pg_publication p ON p.oid = pr.prpubid \
                     JOIN pg_class c ON c.oid = pr.prrelid \
                     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE p.pubname = $1",
                    &[&publication],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            for (s, n) in &wanted {
                if !current.contains(&(s.clone(), n.clone())) {
                    let sql = format!(
                        "ALTER PUBLICATION {} ADD TABLE {}.{};",
                        quote_ident(publication),
                        quote_ident(s),
                        quote_ident(n)
                    );
                    client
                        .batch_execute(&sql)
                        .await
                        .map_err(|e| ownership_hint(&e, &sql))?;
                    info!(publication, table = %format!("{s}.{n}"), "table added to the publication");
                }
            }
            for (s, n) in &current {
                if !wanted.contains(&(s.clone(), n.clone())) {
                    let sql = format!(
                        "ALTER PUBLICATION {} DROP TABLE {}.{};",
                        quote_ident(publication),
                        quote_ident(s),
                        quote_ident(n)
                    );
                    client
                        .batch_execute(&sql)
                        .await
                        .map_err(|e| ownership_hint(&e, &sql))?;
                    info!(publication, table = %format!("{s}.{n}"), "table no longer mapped; removed from the publication");
                }
            }
        }
    }
    Ok(())
}

/// Parses `X/Y` into an LSN.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// What `pg_replication_slots` says about the configured slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotStatus {
    /// There is no such slot.
    Missing,
    /// The server invalidated it (`wal_status = 'lost'`, or
    /// `conflicting`/`invalidation_reason` on newer servers).
    Lost,
    /// It exists, confirmed up to this LSN.
    Usable(u64),
}

/// Reads the slot's status, failing when the name belongs to a slot that is
/// not a pgoutput logical slot of this database.
pub async fn slot_status(client: &Client, slot: &str) -> Result<SlotStatus, SourceError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, slot_type::text, database::text, \
                    COALESCE(wal_status, 'reserved'), confirmed_flush_lsn::text, \
                    current_database()::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(db)?;
    let Some(r) = row else {
        return Ok(SlotStatus::Missing);
    };
    let plugin: Option<String> = r.get(0);
    let slot_type: String = r.get(1);
    let database: Option<String> = r.get(2);
    let wal_status: String = r.get(3);
    let current_db: String = r.get(5);
    if slot_type != "logical"
        || plugin.as_deref() != Some("pgoutput")
        || database.as_deref() != Some(current_db.as_str())
    {
        return Err(SourceError::Fatal(format!(
            "replication slot {slot} exists but is not a pgoutput logical slot of database \
             {current_db}; choose another source.replication.slot or drop it: SELECT \
             pg_drop_replication_slot({});",
            quote_literal(slot)
        )));
    }
    if wal_status == "lost" {
        return Ok(SlotStatus::Lost);
    }
    let lsn: Option<String> = r.get(4);
    Ok(SlotStatus::Usable(
        lsn.as_deref().and_then(parse_lsn).unwrap_or(0),
    ))
}

/// Whether the slot lost changes cobi-sync has not delivered, and why:
/// `known` is the position cobi-sync made durable (0: none yet).
pub fn slot_loss(status: &SlotStatus, known: u64) -> Option<String> {
    match status {
        SlotStatus::Missing if known > 0 => Some(format!(
            "the slot does not exist (it was dropped), and changes since {} (the last \
             position cobi-sync delivered) may have been missed",
            format_lsn(known)
        )),
        SlotStatus::Missing => None,
        SlotStatus::Lost => Some(
            "the server invalidated the slot (WAL it needed was removed, see \
             max_slot_wal_keep_size): changes were missed"
                .into(),
        ),
        SlotStatus::Usable(confirmed) if known > 0 && known < *confirmed => Some(format!(
            "the slot is confirmed up to {} but the state directory only up to {}: the state \
             directory is older than the slot (restored from a backup, or another daemon \
             shares the slot), so the changes in between were never delivered",
            format_lsn(*confirmed),
            format_lsn(known)
        )),
        SlotStatus::Usable(_) => None,
    }
}

/// Creates the slot (with `failover` on PostgreSQL 17+ when asked) and
/// returns its starting LSN.
pub async fn create_slot(client: &Client, slot: &str, failover: bool) -> Result<u64, SourceError> {
    let version = pg::server_version(client).await.map_err(db)?;
    let sql = if failover && version >= 170_000 {
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        if failover {
            warn!(slot, "source.replication.failover needs PostgreSQL 17 or newer; creating the slot without it");
        }
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')"
    };
    let r = client.query_one(sql, &[&slot]).await.map_err(|e| {
        SourceError::Fatal(format!(
            "cannot create replication slot {slot}: {} (is max_replication_slots reached? \
             does the role have REPLICATION?)",
            e.as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_string())
        ))
    })?;
    let lsn: String = r.get(0);
    info!(slot, lsn = %lsn, failover = failover && version >= 170_000, "replication slot created");
    Ok(parse_lsn(&lsn).unwrap_or(0))
}

/// Drops the slot if it exists (terminating a stale walsender of ours).
pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), SourceError> {
    terminate_ours(client, slot).await?;
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(db)?;
    Ok(())
}

/// Terminates a walsender of ours (same application name) still holding
/// the slot, e.g. after a crash, and waits for the slot to be released.
pub async fn terminate_ours(client: &Client, slot: &str) -> Result<(), SourceError> {
    for _ in 0..50 {
        let row = client
            .query_opt(
                "SELECT s.active_pid, a.application_name::text FROM pg_replication_slots s \
                 LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(db)?;
        let Some(row) = row else { return Ok(()) };
        let pid: Option<i32> = row.get(0);
        let app: Option<String> = row.get(1);
        let Some(pid) = pid else { return Ok(()) };
        if app.as_deref() != Some(APPLICATION_NAME) {
            return Err(SourceError::Fatal(format!(
                "replication slot {slot} is in use by another process (pid {pid}, application \
                 {}); is a second cobi-sync running with the same slot? Give each daemon its own \
                 source.replication.slot",
                app.unwrap_or_default()
            )));
        }
        warn!(
            pid,
            slot, "terminating a stale walsender of ours that still holds the slot"
        );
        let _ = client
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(SourceError::Fatal(format!(
        "replication slot {slot} stays in use; try again later"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text() {
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B3748));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(parse_lsn("nope"), None);
        assert_eq!(crate::ops::status::format_lsn(0x1_0016_B374), "1/16B374");
    }
}
