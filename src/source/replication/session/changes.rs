//! The change side of the session: each decoded row change goes through
//! the state machine's verdict before it reaches the sink; TRUNCATE and
//! table definition changes.

use super::*;
use crate::source::replication::watermark::cmp_keys;

impl Replicator {
    /// The table's definition changed: reads follow the catalog as it is
    /// now. A mapping that no longer applies stops the copy of that table
    /// (with the fix) when it is still being copied; streamed changes
    /// become dead letters meanwhile.
    pub(super) async fn refresh_table(
        &mut self,
        client: &Client,
        i: usize,
    ) -> Result<(), SessionError> {
        let mapping = self.tables[i].mapping.clone();
        match SourceTable::resolve(client, &mapping, self.ctx()).await {
            Ok(t) => {
                self.tables[i] = t;
                self.state[i].broken = None;
            }
            Err(SetupError::Config(why)) => {
                if self.state[i].broken.is_none() {
                    error!(mapping = %mapping.label(), error = %why,
                        "the table no longer matches the mapping: its changes become dead letters \
                         until the mapping (or the table) is fixed");
                }
                self.state[i].broken = Some(why);
            }
            Err(SetupError::Db(e)) => {
                return Err(db_error(
                    &e,
                    self.url(),
                    "reading a changed table's definition",
                ))
            }
        }
        Ok(())
    }

    pub(super) async fn on_change(
        &mut self,
        relation: u32,
        old: Option<Tuple>,
        old_is_key_only: bool,
        new: Option<Tuple>,
    ) -> Result<(), SessionError> {
        let Some(rs) = self.relations.get(relation) else {
            return Err(SessionError::Transient(format!(
                "change for unknown relation {relation}"
            )));
        };
        if rs.mappings.is_empty() {
            return Ok(());
        }
        let (names, types) = (rs.names.clone(), rs.types.clone());
        let mut rs = rs;
        let (new_vals, new_problems) = match &new {
            Some(t) => {
                let (v, p) = decode_tuple(&types, t, &names);
                (Some(v), p)
            }
            None => (None, Vec::new()),
        };
        let old_vals = old.as_ref().map(|t| decode_tuple(&types, t, &names).0);
        for mi in 0..rs.mappings.len() {
            let rm = &rs.mappings[mi];
            let m = MappingOf {
                table: rm.table,
                key: rm.key.clone(),
                used: rm.used.clone(),
                compiled: rm.compiled.clone(),
            };
            let change = RowChange {
                new: new_vals.as_deref(),
                new_problems: &new_problems,
                old: old_vals.as_deref(),
                old_full: !old_is_key_only,
            };
            self.on_row_change(&m, change).await?;
            rs = self.relations.get(relation).expect("known");
        }
        Ok(())
    }

    /// One change for one mapping of its relation.
    async fn on_row_change(&mut self, m: &MappingOf, c: RowChange<'_>) -> Result<(), SessionError> {
        let on_delete = self.tables[m.table].mapping.on_delete;
        match (c.new, c.old) {
            (None, Some(old)) if on_delete == OnDelete::Soft => {
                if let Some(key) = m.key_of(old) {
                    let basis = c.old_full.then_some(old);
                    self.deliver_delete(m, &key, basis).await?;
                }
            }
            (Some(new), old) => {
                let Some(key) = m.key_of(new) else {
                    return Ok(());
                };
                // A key change deletes the old key.
                if let Some(old_key) = old.and_then(|o| m.key_of(o)) {
                    if cmp_keys(&old_key, &key).is_ne() && on_delete == OnDelete::Soft {
                        self.deliver_delete(m, &old_key, None).await?;
                    }
                }
                self.deliver_upsert(m, &key, new, &c).await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// A delete (or the old key of a re-keyed row), with the full old row
    /// when the replica identity gives it.
    async fn deliver_delete(
        &mut self,
        m: &MappingOf,
        key: &[Value],
        old_row: Option<&[Option<Value>]>,
    ) -> Result<(), SessionError> {
        let sk = source_key(key.iter());
        let verdict = self.machine.on_change(Change {
            table: m.table,
            key,
            source_key: &sk,
            xid: self.in_tx,
            delete: true,
        });
        let basis = match (verdict, &*m.compiled, old_row) {
            (Verdict::Deliver, Ok(compiled), Some(old)) => {
                let row: Vec<Value> = old
                    .iter()
                    .map(|v| v.clone().unwrap_or(Value::Null))
                    .collect();
                let mapped = compiled.map_row(&row);
                mapped.problems.is_empty().then_some(mapped.record)
            }
            _ => None,
        };
        if verdict == Verdict::Skip {
            return Ok(());
        }
        let key = self.state_key(m.table, sk);
        self.push(SinkItem::Delete { key, basis }).await
    }

    /// An insert or update: delivered, skipped (a read holds it), or
    /// re-read (a value the mapping reads was left out of the stream and
    /// the old row does not have it).
    async fn deliver_upsert(
        &mut self,
        m: &MappingOf,
        key: &[Value],
        new: &[Option<Value>],
        c: &RowChange<'_>,
    ) -> Result<(), SessionError> {
        let sk = source_key(key.iter());
        let this = Change {
            table: m.table,
            key,
            source_key: &sk,
            xid: self.in_tx,
            delete: false,
        };
        if self.machine.on_change(this) == Verdict::Skip {
            return Ok(());
        }
        let compiled = match &*m.compiled {
            Ok(compiled) => compiled,
            Err(e) => {
                let ty = self.tables[m.table].mapping.ty;
                let problem = Problem {
                    field: "(mapping)".into(),
                    reason: e.clone(),
                };
                let key = self.state_key(m.table, sk);
                let item = SinkItem::upsert(key, &Record::new(ty), vec![problem], Resend::Changed);
                return self.push(item).await;
            }
        };
        let Some(row) = fill_unchanged(new, c.old.filter(|_| c.old_full), &m.used) else {
            let confirmed = self.machine.confirmable(self.checkpoint.lsn);
            self.machine.request(this, confirmed);
            return Ok(());
        };
        let mut mapped = compiled.map_row(&row);
        mapped.problems.extend(c.new_problems.iter().cloned());
        let key = self.state_key(m.table, sk);
        self.push(SinkItem::upsert(
            key,
            &mapped.record,
            mapped.problems,
            Resend::Changed,
        ))
        .await
    }

    fn state_key(&self, table: usize, source_key: String) -> StateKey {
        let t = &self.tables[table];
        StateKey {
            ty: t.mapping.ty,
            mapping: t.mapping.id.clone(),
            source_key,
        }
    }

    pub(super) async fn on_truncate(
        &mut self,
        client: &mut Client,
        relations: Vec<u32>,
    ) -> Result<(), SessionError> {
        for r in relations {
            let Some(rs) = self.relations.get(r) else {
                continue;
            };
            let (name, partition) = (rs.name.clone(), rs.partition);
            let tables: Vec<usize> = rs.mappings.iter().map(|m| m.table).collect();
            for i in tables {
                self.machine.on_truncate(i, self.in_tx);
                let t = &self.tables[i];
                self.env
                    .metrics
                    .truncates
                    .get_or_create(&TypeLabel {
                        r#type: schema().ty(t.mapping.ty).name.clone(),
                    })
                    .inc();
                match t.mapping.on_truncate {
                    OnTruncate::Error => {
                        error!(table = %name, mapping = %t.mapping.label(),
                            "TRUNCATE on a mapped table: nothing was sent (on_truncate = \"error\"), so \
                             Cobi still holds the truncated records. Set on_truncate = \"soft_delete\" \
                             to mark them deleted, or re-copy with `cobi-sync resync --type {}`",
                            schema().ty(t.mapping.ty).name);
                    }
                    OnTruncate::SoftDelete => {
                        self.truncate_soft_delete(client, i, &name, partition)
                            .await?
                    }
                }
            }
        }
        Ok(())
    }

    /// Soft-deletes what a TRUNCATE removed: after everything sent before
    /// it is durable (so the state store knows every key), every accepted
    /// key of the table — or, for one partition of it, every accepted key
    /// the table no longer has.
    pub(super) async fn truncate_soft_delete(
        &mut self,
        client: &mut Client,
        i: usize,
        name: &str,
        partition: bool,
    ) -> Result<(), SessionError> {
        self.drain().await?;
        let t = &self.tables[i];
        let (ty, id) = (t.mapping.ty, t.mapping.id.clone());
        if partition {
            let url = self.url().clone();
            let keys = reads::absent_keys(client, &url, &self.env.store, t).await?;
            warn!(table = %name, records = keys.len(), "TRUNCATE of a partition of a mapped table: sending soft deletes for every record it held");
            for sk in keys {
                self.push_soft_delete(ty, &id, sk).await?;
            }
            return Ok(());
        }
        warn!(table = %name, "TRUNCATE on a mapped table: sending soft deletes for every record it held");
        // Streamed from the store a chunk at a time: memory stays flat
        // whatever the table's size.
        let mut chunks = crate::state::stream_keys(self.env.store.clone(), ty, id.clone());
        let mut sent = 0u64;
        while let Some(chunk) = chunks.recv().await {
            let chunk = chunk.map_err(|e| SessionError::fatal(e.to_string()))?;
            for (sk, status) in chunk {
                if status == KeyStatus::Accepted {
                    self.push_soft_delete(ty, &id, sk).await?;
                    sent += 1;
                }
            }
        }
        info!(table = %name, records = sent, "TRUNCATE: soft deletes queued");
        Ok(())
    }

    /// Queues the soft delete of one key of a truncated table (built from
    /// its delete image by the sink).
    async fn push_soft_delete(
        &mut self,
        ty: crate::state::TypeId,
        mapping: &std::sync::Arc<str>,
        source_key: String,
    ) -> Result<(), SessionError> {
        self.push(SinkItem::Delete {
            key: StateKey {
                ty,
                mapping: mapping.clone(),
                source_key,
            },
            basis: None,
        })
        .await
    }
}

/// One decoded change of a relation.
struct RowChange<'a> {
    new: Option<&'a [Option<Value>]>,
    new_problems: &'a [Problem],
    old: Option<&'a [Option<Value>]>,
    /// `old` is the full old row (REPLICA IDENTITY FULL), not the key.
    old_full: bool,
}

/// A mapping of the changed relation (shared parts, cheap to clone).
struct MappingOf {
    table: usize,
    key: Arc<[usize]>,
    used: Arc<[usize]>,
    compiled: Arc<Result<crate::mapping::engine::CompiledMapping, String>>,
}

impl MappingOf {
    fn key_of(&self, vals: &[Option<Value>]) -> Option<Vec<Value>> {
        self.key
            .iter()
            .map(|&p| vals.get(p).cloned().flatten())
            .collect()
    }
}

/// The row of an update, with values the stream left out (unchanged
/// TOAST) taken from the full old row; `None` when one the mapping reads
/// (`used`) is not there (the row must be re-read).
fn fill_unchanged(
    new: &[Option<Value>],
    old_full: Option<&[Option<Value>]>,
    used: &[usize],
) -> Option<Vec<Value>> {
    let mut row = Vec::with_capacity(new.len());
    for (p, v) in new.iter().enumerate() {
        match v
            .clone()
            .or_else(|| old_full.and_then(|o| o.get(p).cloned().flatten()))
        {
            Some(v) => row.push(v),
            None if used.contains(&p) => return None,
            None => row.push(Value::Null),
        }
    }
    Some(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_left_out_come_from_the_full_old_row_or_force_a_reread() {
        let i = |n: i64| Some(Value::Int(n));
        let v = Value::Int;
        // (new row, full old row, columns the mapping reads, the row)
        type Row = Vec<Option<Value>>;
        type Case<'a> = (Row, Option<Row>, &'a [usize], Option<Vec<Value>>);
        let cases: &[Case] = &[
            // Nothing left out.
            (vec![i(1), i(2)], None, &[0, 1], Some(vec![v(1), v(2)])),
            // Left out, from the full old row.
            (
                vec![i(1), None],
                Some(vec![i(1), i(9)]),
                &[0, 1],
                Some(vec![v(1), v(9)]),
            ),
            // Left out, no old row, read by the mapping: re-read.
            (vec![i(1), None], None, &[0, 1], None),
            // Left out, the old row lacks it too (key only): re-read.
            (vec![i(1), None], Some(vec![i(1), None]), &[1], None),
            // Left out but not read by the mapping: NULL.
            (vec![i(1), None], None, &[0], Some(vec![v(1), Value::Null])),
        ];
        for (new, old, used, want) in cases {
            assert_eq!(
                &fill_unchanged(new, old.as_deref(), used),
                want,
                "{new:?} {old:?}"
            );
        }
    }
}
