//! The relations of the stream: what each `Relation` message says about a
//! table, the mappings that read it, and the decoding of its tuples.
//!
//! A Relation message arrives before a table's first change in a session
//! and again after every change of its definition (ADD/DROP COLUMN, ALTER
//! TYPE, RENAME). Each one recompiles the table's mappings against the
//! columns it lists, so decoding always follows the stream's own idea of
//! the table. A mapping that no longer applies (a mapped column dropped, a
//! type it cannot convert) turns the table's changes into dead letters
//! with the reason until it is fixed.
//!
//! Changes to a partition arrive under the partition's own name when the
//! publication does not publish through the root (`FOR ALL TABLES`
//! without `publish_via_partition_root`): a partition of a mapped
//! partitioned table — one attached while streaming too — is mapped like
//! its root.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::Client;
use tracing::{debug, error, info};

use crate::config::pgurl::PgUrl;
use crate::mapping::decode::text::decode_text;
use crate::mapping::engine::{Column, CompiledMapping, MapContext};
use crate::mapping::value::{oid, PgType, Value};
use crate::model::validate::Problem;
use crate::source::reader::SourceTable;

use super::errors::{db_error, SessionError};
use super::pgoutput::{Relation, Tuple, TupleValue};

/// A mapping of a relation in the stream.
pub struct RelMapping {
    /// The mapping's table (index into the session's tables).
    pub table: usize,
    /// The mapping compiled against the relation's columns.
    pub compiled: Arc<Result<CompiledMapping, String>>,
    /// Relation positions of the mapping's key columns.
    pub key: Arc<[usize]>,
    /// Relation positions the mapping reads.
    pub used: Arc<[usize]>,
}

/// A relation as the stream describes it.
pub struct RelState {
    /// `schema.name`, for messages.
    pub name: String,
    /// Column names.
    pub names: Arc<[String]>,
    /// Column types.
    pub types: Arc<[PgType]>,
    /// The mappings reading it (none: changes are ignored).
    pub mappings: Vec<RelMapping>,
    /// A partition of a mapped table (changes published under its own name).
    pub partition: bool,
}

/// Every relation seen in this session.
#[derive(Default)]
pub struct Relations {
    rels: HashMap<u32, RelState>,
    types: HashMap<u32, PgType>,
    /// Mapped tables by `(schema, name)`.
    by_name: HashMap<(String, String), Vec<usize>>,
}

impl Relations {
    /// Relations of `tables` (their catalog names).
    pub fn new(tables: &[SourceTable]) -> Relations {
        let mut by_name: HashMap<(String, String), Vec<usize>> = HashMap::new();
        for (i, t) in tables.iter().enumerate() {
            if let Some(info) = &t.table {
                by_name
                    .entry((info.schema.clone(), info.name.clone()))
                    .or_default()
                    .push(i);
            }
        }
        Relations {
            rels: HashMap::new(),
            types: HashMap::new(),
            by_name,
        }
    }

    /// Forgets the relations (a new session gets them again).
    pub fn clear(&mut self) {
        self.rels.clear();
    }

    /// A relation by OID.
    pub fn get(&self, oid: u32) -> Option<&RelState> {
        self.rels.get(&oid)
    }

    /// Takes in a Relation message; returns the tables whose definition it
    /// describes (to be re-read from the catalog).
    pub async fn on_relation(
        &mut self,
        client: &Client,
        url: &PgUrl,
        rel: Relation,
        tables: &[SourceTable],
        ctx: MapContext,
    ) -> Result<Vec<usize>, SessionError> {
        let oids: Vec<u32> = rel.columns.iter().map(|c| c.type_oid).collect();
        self.resolve_types(client, url, &oids).await?;
        let types: Vec<PgType> = oids.iter().map(|o| self.pg_type(*o)).collect();
        let columns: Vec<Column> = rel
            .columns
            .iter()
            .zip(&types)
            .map(|(c, t)| Column {
                name: c.name.clone(),
                ty: t.clone(),
            })
            .collect();
        let name = format!("{}.{}", rel.namespace, rel.name);
        let mut partition = false;
        let mut mapped = self
            .by_name
            .get(&(rel.namespace.clone(), rel.name.clone()))
            .cloned()
            .unwrap_or_default();
        if mapped.is_empty() {
            if let Some(root) = partition_root(client, url, rel.oid).await? {
                if let Some(m) = self.by_name.get(&root) {
                    info!(partition = %name, root = %format!("{}.{}", root.0, root.1),
                        "changes of a partition arrive under its own name; mapping them like its partitioned table");
                    mapped = m.clone();
                    partition = true;
                }
            }
        }
        let mut mappings = Vec::new();
        for &i in &mapped {
            let t = &tables[i];
            let keys = t.key_names();
            let compiled = CompiledMapping::compile(&t.mapping, &keys, &columns, ctx)
                .map_err(|errs| errs.join("; "));
            if let Err(e) = &compiled {
                error!(mapping = %t.mapping.label(), table = %name, error = %e,
                    "the table changed and the mapping no longer applies; its changes become dead \
                     letters until the mapping is fixed (then run `cobi-sync resync --type {}`)",
                    crate::model::schema::schema().ty(t.mapping.ty).name);
            }
            let pos = |n: &str| columns.iter().position(|c| c.name == n);
            let key: Vec<usize> = keys.iter().filter_map(|k| pos(k)).collect();
            let used = match &compiled {
                Ok(c) => c.used_positions(),
                Err(_) => Vec::new(),
            };
            mappings.push(RelMapping {
                table: i,
                compiled: Arc::new(compiled),
                key: key.into(),
                used: used.into(),
            });
        }
        debug!(relation = %name, mappings = mappings.len(), "relation");
        self.rels.insert(
            rel.oid,
            RelState {
                name,
                names: columns.iter().map(|c| c.name.clone()).collect(),
                types: types.into(),
                mappings,
                partition,
            },
        );
        Ok(mapped)
    }

    /// Resolves type OIDs that are not built in (domains, enums, arrays of
    /// them) through the catalog.
    async fn resolve_types(
        &mut self,
        client: &Client,
        url: &PgUrl,
        oids: &[u32],
    ) -> Result<(), SessionError> {
        let unknown: Vec<u32> = oids
            .iter()
            .copied()
            .filter(|o| {
                !self.types.contains_key(o) && !oid::is_native(*o) && oid::array_elem(*o).is_none()
            })
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let rows = client
            .query(
                "SELECT t.oid, COALESCE(NULLIF(t.typbasetype, 0), t.oid), \
                        format_type(COALESCE(NULLIF(t.typbasetype, 0), t.oid), NULL), \
                        bt.typelem, bt.typcategory::text \
                 FROM pg_type t JOIN pg_type bt ON bt.oid = COALESCE(NULLIF(t.typbasetype, 0), t.oid) \
                 WHERE t.oid = ANY($1)",
                &[&unknown],
            )
            .await
            .map_err(|e| db_error(&e, url, "reading column types"))?;
        for r in rows {
            let o: u32 = r.get(0);
            let base: u32 = r.get(1);
            let elem: u32 = r.get(3);
            let cat: String = r.get(4);
            self.types.insert(
                o,
                PgType {
                    oid: base,
                    name: r.get(2),
                    elem: (cat == "A" && elem != 0).then_some(elem),
                },
            );
        }
        Ok(())
    }

    fn pg_type(&self, o: u32) -> PgType {
        self.types.get(&o).cloned().unwrap_or(PgType {
            oid: o,
            name: String::new(),
            elem: oid::array_elem(o),
        })
    }
}

/// The `(schema, name)` of the partitioned table at the top of `rel`'s
/// partition tree, when `rel` is a partition.
async fn partition_root(
    client: &Client,
    url: &PgUrl,
    rel: u32,
) -> Result<Option<(String, String)>, SessionError> {
    let row = client
        .query_opt(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = pg_partition_root($1::oid::regclass) AND c.oid <> $1::oid",
            &[&rel],
        )
        .await
        .map_err(|e| db_error(&e, url, "looking up a partition's root"))?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// Decodes a tuple; `None` entries are unchanged TOAST values. A value that
/// cannot be decoded is NULL with a problem (its row becomes a dead letter).
pub fn decode_tuple(
    types: &[PgType],
    tuple: &Tuple,
    names: &[String],
) -> (Vec<Option<Value>>, Vec<Problem>) {
    let mut problems = Vec::new();
    let values = tuple
        .0
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            TupleValue::Null => Some(Value::Null),
            TupleValue::UnchangedToast => None,
            TupleValue::Text(b) | TupleValue::Binary(b) => match types.get(i) {
                Some(t) => match decode_text(t, b) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        problems.push(Problem {
                            field: names.get(i).cloned().unwrap_or_default(),
                            reason: e.to_string(),
                        });
                        Some(Value::Null)
                    }
                },
                None => Some(Value::Null),
            },
        })
        .collect();
    (values, problems)
}
