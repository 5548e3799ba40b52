//! The copy side of the session: chunk reads, re-reads of rows whose
//! values the stream left out, reconciliation before a copy starts over,
//! and `resync` requests. Each read is taken only in a snapshot the state
//! machine accepts; a refused read is retried later without blocking the
//! stream (confirmations keep flowing).

use super::*;
use crate::mapping::decode::DecodeError;

impl Replicator {
    /// A read was refused because a decoded transaction is not visible yet.
    pub(super) fn refused(&mut self, reread: bool) -> Result<(), SessionError> {
        let waited = self.copy.wait.refused();
        let hint = "a transaction cobi-sync has decoded is still invisible to new snapshots; \
                    if synchronous_standby_names names cobi-sync's connection (application_name \
                    cobi-sync, or '*'), commits wait for cobi-sync: list your standbys by name \
                    instead";
        if reread && waited > REREAD_PATIENCE {
            return Err(SessionError::fatal(format!(
                "re-reading rows whose large values the stream left out: waited {}s; {hint}",
                waited.as_secs()
            )));
        }
        if waited > Duration::from_secs(10) && !self.copy.wait.warned {
            self.copy.wait.warned = true;
            warn!(waited_secs = waited.as_secs(), "{hint}");
        }
        Ok(())
    }

    /// Reads between transactions: re-reads first (they hold the position),
    /// then the next chunk; the end of a `snapshot` command.
    pub(super) async fn between_transactions(
        &mut self,
        client: &mut Client,
    ) -> Result<Option<End>, SessionError> {
        if !self.copy.wait.due() {
            return Ok(None);
        }
        if !self.machine.requests().is_empty() {
            self.reread(client).await?;
            return Ok(None);
        }
        if let Some(i) = self.machine.next_chunk() {
            self.read_chunk(client, i).await?;
            return Ok(None);
        }
        if self.opts.until_copied && self.machine.settled() {
            self.mark().await?;
            tokio::select! {
                r = self.env.sink.barrier() => r.map_err(|_| SessionError::fatal(SINK_STOPPED))?,
                _ = self.env.stop.cancelled() => {}
            }
            return Ok(Some(End::Copied));
        }
        Ok(None)
    }

    pub(super) fn next_id(&mut self) -> String {
        self.copy.ids.1 += 1;
        format!("{:016x}:{}", self.copy.ids.0, self.copy.ids.1)
    }

    /// Reads the next chunk of table `i` and emits its watermark.
    pub(super) async fn read_chunk(
        &mut self,
        client: &mut Client,
        i: usize,
    ) -> Result<(), SessionError> {
        // A definition changed without a change to the table in the stream
        // (no Relation message yet): rebuild the reads first.
        let sig = reads::table_signature(client, self.url(), &self.tables[i]).await?;
        if self.state[i].signature.as_ref().is_some_and(|s| *s != sig) {
            self.refresh_table(client, i).await?;
        }
        self.state[i].signature = Some(sig);
        if let Some(why) = &self.state[i].broken {
            return Err(SessionError::fatal(format!(
                "{} cannot be copied: {why}. The table changed while cobi-sync was copying it: fix \
                 the mapping (or the table), run `cobi-sync check`, then start cobi-sync again (the \
                 copy continues where it stopped)",
                self.tables[i].mapping.label()
            )));
        }
        if *self.machine.phase(i) == Phase::NotStarted && !self.state[i].reconciled {
            self.reconcile(client, i).await?;
            self.state[i].reconciled = true;
        }
        if self.state[i].progress.is_none() {
            let t = &self.tables[i];
            let estimate = reads::estimate_rows(client, t).await;
            info!(mapping = %t.mapping.label(), estimate, "copying table");
            self.state[i].progress = Some(
                Progress::new(&t.mapping.label(), estimate).on_health(self.env.health.clone()),
            );
        }
        let url = self.url().clone();
        let t = &self.tables[i];
        let after = match &self.checkpoint.tables[&*t.mapping.id] {
            TableSnapshot::InProgress(p) => Some(p.clone()),
            _ => None,
        };
        let machine = &self.machine;
        let read = reads::chunk(client, &url, t, after.as_ref(), CHUNK_ROWS, |s| {
            machine.may_read(s)
        })
        .await?;
        let Some((snapshot, rows)) = read else {
            return self.refused(false);
        };
        self.copy.wait.done();
        let t = &self.tables[i];
        let progress = (rows.len() >= CHUNK_ROWS)
            .then(|| {
                rows.last()
                    .map(|(r, _)| TableSnapshot::InProgress(t.position_of(r)))
            })
            .flatten();
        let lower = match self.machine.phase(i) {
            Phase::Copying(k) => Some(k.clone()),
            _ => None,
        };
        let force = self.opts.force.contains(&t.mapping.id);
        let items = rows
            .into_iter()
            .map(|(row, errors)| {
                let key = t.compiled.key_values(&row);
                let sk = t.compiled.source_key(&row);
                let item = upsert_of(t, &row, &errors, sk.clone(), force);
                (key, sk, item)
            })
            .collect();
        let id = self.next_id();
        reads::emit_watermark(client, &url, &id).await?;
        self.machine
            .begin(Read::chunk(i, id, snapshot, lower, items, progress));
        Ok(())
    }

    /// Before a table's copy starts over: soft-deletes the keys the state
    /// store holds that the table no longer has.
    pub(super) async fn reconcile(
        &mut self,
        client: &mut Client,
        i: usize,
    ) -> Result<(), SessionError> {
        let t = &self.tables[i];
        if t.mapping.on_delete != OnDelete::Soft {
            return Ok(());
        }
        let url = self.url().clone();
        let absent = reads::absent_keys(client, &url, &self.env.store, t).await?;
        if absent.is_empty() {
            return Ok(());
        }
        info!(mapping = %t.mapping.label(), deleted = absent.len(),
            "rows the state store knows are gone from the table; sending soft deletes");
        let (ty, id) = (t.mapping.ty, t.mapping.id.clone());
        for sk in absent {
            self.push(SinkItem::Delete {
                key: StateKey {
                    ty,
                    mapping: id.clone(),
                    source_key: sk,
                },
                basis: None,
            })
            .await?;
        }
        Ok(())
    }

    /// Re-reads the rows whose large values the stream left out.
    pub(super) async fn reread(&mut self, client: &mut Client) -> Result<(), SessionError> {
        let url = self.url().clone();
        let mut by_table: BTreeMap<usize, (Vec<Vec<Value>>, HashSet<String>)> = BTreeMap::new();
        for r in self.machine.requests().iter().take(REREAD_BATCH * 8) {
            let e = by_table.entry(r.table).or_default();
            e.0.push(r.key.clone());
            e.1.insert(r.source_key.clone());
        }
        let groups: Vec<(&SourceTable, Vec<Vec<Value>>)> = by_table
            .iter()
            .map(|(&i, (keys, _))| (&self.tables[i], keys.clone()))
            .collect();
        let machine = &self.machine;
        let read = reads::rows_by_keys(client, &url, &groups, |s| machine.may_read(s)).await?;
        let Some((snapshot, found)) = read else {
            return self.refused(true);
        };
        self.copy.wait.done();
        let id = self.next_id();
        let mut reads_ = Vec::new();
        for ((&i, (_, keys)), rows) in by_table.iter().zip(found) {
            let t = &self.tables[i];
            let rows = rows
                .into_iter()
                .map(|(row, errors)| {
                    let sk = t.compiled.source_key(&row);
                    (sk.clone(), upsert_of(t, &row, &errors, sk, false))
                })
                .collect();
            reads_.push(Read::keys(
                i,
                id.clone(),
                snapshot.clone(),
                keys.clone(),
                rows,
            ));
        }
        reads::emit_watermark(client, &url, &id).await?;
        self.machine.begin_requests(reads_);
        Ok(())
    }

    /// `resync`: re-copies the tables of the requested types while the
    /// stream goes on, with delete reconciliation; records are sent even if
    /// unchanged.
    pub(super) async fn on_resync(
        &mut self,
        client: &Client,
        req: ResyncRequest,
    ) -> Result<(), SessionError> {
        let chosen: Vec<usize> = (0..self.tables.len())
            .filter(|&i| req.types.contains(&self.tables[i].mapping.ty))
            .collect();
        if chosen.is_empty() {
            let _ = req.reply.send(Err(format!(
                "no mapping has the type(s) {}",
                req.types
                    .iter()
                    .map(|t| schema().ty(*t).name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
            return Ok(());
        }
        let labels: Vec<String> = chosen
            .iter()
            .map(|&i| self.tables[i].mapping.label())
            .collect();
        // Progress shows from now on (`status` right after the request).
        for &i in &chosen {
            let t = &self.tables[i];
            let estimate = reads::estimate_rows(client, t).await;
            self.state[i].progress = Some(
                Progress::new(&t.mapping.label(), estimate).on_health(self.env.health.clone()),
            );
        }
        let _ = req.reply.send(Ok(labels.clone()));
        info!(mappings = %labels.join(", "), "resync requested: re-copying while streaming");
        // Nothing of the old copy in flight: the checkpoint can go back.
        self.drain().await?;
        for &i in &chosen {
            let id = self.tables[i].mapping.id.clone();
            self.machine.restart(i);
            self.checkpoint
                .tables
                .insert(id.to_string(), TableSnapshot::NotStarted);
            self.opts.force.insert(id);
            self.state[i].reconciled = false;
        }
        let mut cp = self.checkpoint.clone();
        cp.lsn = self.machine.confirmable(cp.lsn);
        replace_checkpoint(&self.env.store, cp)?;
        let reference = reads::current_snapshot(client, self.url()).await?;
        self.machine.set_reference(reference);
        Ok(())
    }
}

/// An upsert of a row read from `t`; `errors` are its values that could
/// not be decoded (the record becomes a dead letter naming them).
fn upsert_of(
    t: &SourceTable,
    row: &[Value],
    errors: &[(usize, DecodeError)],
    sk: String,
    force: bool,
) -> SinkItem {
    let mut mapped = t.compiled.map_row(row);
    mapped.problems.extend(errors.iter().map(|(i, e)| {
        Problem {
            field: t
                .select
                .get(*i)
                .map_or_else(String::new, |c| c.name.clone()),
            reason: e.to_string(),
        }
    }));
    SinkItem::upsert(
        StateKey {
            ty: t.mapping.ty,
            mapping: t.mapping.id.clone(),
            source_key: sk,
        },
        &mapped.record,
        mapped.problems,
        force,
    )
}
