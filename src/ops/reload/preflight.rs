//! Before a SIGHUP restarts the pipeline with added or changed mappings,
//! they are checked against the database the way the source checks them
//! at its start — so that a mapping that does not fit is reported and
//! left out while the daemon keeps running, instead of stopping the new
//! source (and the daemon) on it:
//!
//! - every mapping resolves: its table (or query) exists and is readable
//!   by the role, its columns exist and convert to their fields;
//! - replication mode: each table can be replicated (a table, a replica
//!   identity good enough for its deletes, SELECT granted), and the
//!   publication includes it — or the role may add it, which the source
//!   then does. A least-privilege role cannot change a publication the
//!   owner created: the check then names the statement for the owner to
//!   run (`ALTER PUBLICATION … ADD TABLE …`), after which a reload applies
//!   the mapping;
//! - replication mode, removed mappings: the source drops a table no
//!   longer mapped from the publication, which a least-privilege role
//!   cannot do; the check names `ALTER PUBLICATION … DROP TABLE …` for the
//!   owner instead of letting the new source stop the daemon.
//!
//! Read-only, bounded by [`TIMEOUT`]: a database that does not answer
//! leaves the mappings as they are.

use std::time::Duration;

use tokio_postgres::Client;

use crate::config::{quote_ident, MappingSettings, Mode, Settings};
use crate::mapping::engine::MapContext;
use crate::source::pg::{self, TableInfo};
use crate::source::reader::{SetupError, SourceTable};
use crate::source::replication::setup;
use crate::source::SourceError;

/// The longest the check may take.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Checks `mappings` (the added and changed ones) and `removed` for
/// `settings`' source; returns every problem found, each saying what to do.
pub async fn check(
    settings: &Settings,
    mappings: &[MappingSettings],
    removed: &[MappingSettings],
) -> Result<(), Vec<String>> {
    if mappings.is_empty() && removed.is_empty() {
        return Ok(());
    }
    match tokio::time::timeout(TIMEOUT, check_now(settings, mappings, removed)).await {
        Ok(r) => r,
        Err(_) => Err(vec![format!(
            "the source database did not answer the checks of the new mappings within {} s; \
             reload again once it answers",
            TIMEOUT.as_secs()
        )]),
    }
}

async fn check_now(
    settings: &Settings,
    mappings: &[MappingSettings],
    removed: &[MappingSettings],
) -> Result<(), Vec<String>> {
    let client = pg::connect(&settings.source).await.map_err(|e| {
        vec![format!(
            "cannot connect to the source database to check the new mappings: {}; reload again \
             once it answers",
            e.message
        )]
    })?;
    let ctx = MapContext::from_settings(settings);
    let mut problems = Vec::new();
    let mut tables = Vec::new();
    for m in mappings {
        match SourceTable::resolve(&client, m, ctx).await {
            Ok(t) => tables.push(t),
            Err(SetupError::Config(e)) => problems.push(e),
            Err(SetupError::Db(e)) => {
                problems.push(format!(
                    "{}: {}",
                    m.label(),
                    pg::explain(&e, &settings.source.url)
                ));
            }
        }
    }
    if settings.source.mode == Mode::Replication {
        if let Err(e) = setup::check_tables(&client, &tables).await {
            problems.push(match e {
                SourceError::Config(m) | SourceError::Fatal(m) => m,
            });
        }
        let publication = &settings.source.replication.publication;
        for t in &tables {
            if let Some(info) = &t.table {
                match publication_gap(&client, publication, info).await {
                    Ok(None) => {}
                    Ok(Some(gap)) => problems.push(format!(
                        "{}: {}",
                        t.mapping.label(),
                        gap.explain(publication, info, &settings.source.url.user)
                    )),
                    Err(e) => problems.push(format!(
                        "{}: reading publication {publication}: {}",
                        t.mapping.label(),
                        pg::explain(&e, &settings.source.url)
                    )),
                }
            }
        }
        for m in removed {
            let source = format!("{:?}", m.source);
            let still_mapped = settings
                .mappings
                .iter()
                .any(|n| format!("{:?}", n.source) == source);
            // A table that no longer resolves is not the publication's
            // problem (a dropped table leaves it).
            let Ok(t) = SourceTable::resolve(&client, m, ctx).await else {
                continue;
            };
            let Some(info) = &t.table else { continue };
            match removal_blocked(&client, publication, info, still_mapped).await {
                Ok(false) => {}
                Ok(true) => problems.push(format!(
                    "{} (removed): table {}.{} stays in publication {} and role {} cannot drop                      it (that takes owning both the publication and the table); ask the                      database owner to run: ALTER PUBLICATION {} DROP TABLE {}.{}; then reload                      again (systemctl reload cobi-sync)",
                    m.label(),
                    quote_ident(&info.schema),
                    quote_ident(&info.name),
                    quote_ident(publication),
                    settings.source.url.user,
                    quote_ident(publication),
                    quote_ident(&info.schema),
                    quote_ident(&info.name),
                )),
                Err(e) => problems.push(format!(
                    "{} (removed): reading publication {publication}: {}",
                    m.label(),
                    pg::explain(&e, &settings.source.url)
                )),
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Why a table is not (and will not be) published to the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gap {
    /// The publication does not exist and the role cannot create it for
    /// this table (it does not own it).
    NoPublication,
    /// The publication exists without the table, and the role cannot add
    /// it (it owns not both the publication and the table).
    NotPublished,
}

impl Gap {
    /// The problem and the statement that fixes it.
    pub fn explain(self, publication: &str, table: &TableInfo, role: &str) -> String {
        let name = format!(
            "{}.{}",
            quote_ident(&table.schema),
            quote_ident(&table.name)
        );
        let publication = quote_ident(publication);
        match self {
            Gap::NoPublication => format!(
                "publication {publication} does not exist and role {role} cannot create it \
                 with {name} (only the table's owner can); ask the database owner to run: \
                 CREATE PUBLICATION {publication} FOR TABLE {name} WITH \
                 (publish_via_partition_root = true); then reload again"
            ),
            Gap::NotPublished => format!(
                "table {name} is not in publication {publication}, so its changes would never \
                 arrive, and role {role} cannot add it (that takes owning both the publication \
                 and the table); ask the database owner to run: ALTER PUBLICATION {publication} \
                 ADD TABLE {name}; then reload again (systemctl reload cobi-sync)"
            ),
        }
    }
}

/// The gap rule: `published` — the publication streams the table;
/// `exists` — the publication exists; `owns_publication` / `owns_table` —
/// the role (or a role it belongs to) owns them.
pub fn gap(published: bool, exists: bool, owns_publication: bool, owns_table: bool) -> Option<Gap> {
    match (published, exists) {
        (true, _) => None,
        (false, false) if owns_table => None,
        (false, false) => Some(Gap::NoPublication),
        (false, true) if owns_publication && owns_table => None,
        (false, true) => Some(Gap::NotPublished),
    }
}

/// The removal rule: the source would drop a table from the publication
/// when the publication names it (`named`, not `FOR ALL TABLES`) and no
/// remaining mapping reads it; it can only when the role owns both.
pub fn cannot_unpublish(
    named: bool,
    still_mapped: bool,
    owns_publication: bool,
    owns_table: bool,
) -> bool {
    named && !still_mapped && !(owns_publication && owns_table)
}

async fn removal_blocked(
    client: &Client,
    publication: &str,
    table: &TableInfo,
    still_mapped: bool,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication_rel pr \
                            JOIN pg_publication p ON p.oid = pr.prpubid \
                            WHERE p.pubname = $1 AND pr.prrelid = $2), \
                    COALESCE((SELECT pg_has_role(pubowner, 'USAGE') FROM pg_publication \
                              WHERE pubname = $1), false), \
                    (SELECT pg_has_role(relowner, 'USAGE') FROM pg_class WHERE oid = $2)",
            &[&publication, &table.oid],
        )
        .await?;
    Ok(cannot_unpublish(
        row.get(0),
        still_mapped,
        row.get(1),
        row.get::<_, Option<bool>>(2).unwrap_or(false),
    ))
}

/// Whether `publication` streams `table` (`pg_publication_tables` also
/// covers `FOR ALL TABLES` and `FOR TABLES IN SCHEMA`), or the source can
/// make it do so.
async fn publication_gap(
    client: &Client,
    publication: &str,
    table: &TableInfo,
) -> Result<Option<Gap>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication_tables \
                            WHERE pubname = $1 AND schemaname = $2 AND tablename = $3), \
                    EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1), \
                    COALESCE((SELECT pg_has_role(pubowner, 'USAGE') FROM pg_publication \
                              WHERE pubname = $1), false), \
                    (SELECT pg_has_role(relowner, 'USAGE') FROM pg_class WHERE oid = $4)",
            &[&publication, &table.schema, &table.name, &table.oid],
        )
        .await?;
    Ok(gap(
        row.get(0),
        row.get(1),
        row.get(2),
        row.get::<_, Option<bool>>(3).unwrap_or(false),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_a_table_is_missing_from_the_publication() {
        // (published, exists, owns publication, owns table) → gap
        let cases = [
            ((true, true, false, false), None),
            ((false, true, true, true), None),
            ((false, true, false, true), Some(Gap::NotPublished)),
            ((false, true, true, false), Some(Gap::NotPublished)),
            ((false, true, false, false), Some(Gap::NotPublished)),
            ((false, false, false, true), None),
            ((false, false, false, false), Some(Gap::NoPublication)),
        ];
        for ((p, e, op, ot), want) in cases {
            assert_eq!(gap(p, e, op, ot), want, "{p} {e} {op} {ot}");
        }
    }

    #[test]
    fn when_a_removed_mapping_cannot_leave_the_publication() {
        // (named, still mapped, owns publication, owns table) → blocked
        let cases = [
            ((false, false, false, false), false),
            ((true, true, false, false), false),
            ((true, false, true, true), false),
            ((true, false, true, false), true),
            ((true, false, false, true), true),
            ((true, false, false, false), true),
        ];
        for ((n, s, op, ot), want) in cases {
            assert_eq!(cannot_unpublish(n, s, op, ot), want, "{n} {s} {op} {ot}");
        }
    }

    #[test]
    fn the_fix_names_the_statement_for_the_owner() {
        let t = TableInfo {
            schema: "public".into(),
            name: "branch".into(),
            oid: 1,
            relkind: 'r',
            is_partition: false,
            columns: vec![],
            primary_key: vec![],
            replica_identity: 'd',
            identity_columns: vec![],
        };
        let m = Gap::NotPublished.explain("cobi_sync", &t, "cobi_sync");
        assert!(
            m.contains(r#"ALTER PUBLICATION "cobi_sync" ADD TABLE "public"."branch";"#),
            "{m}"
        );
        let m = Gap::NoPublication.explain("cobi_sync", &t, "cobi_sync");
        assert!(m.contains(r#"CREATE PUBLICATION "cobi_sync" FOR TABLE "public"."branch""#));
    }
}
