//! Setup and the slot: the server, tables and publication checked once;
//! the slot created, watched (heartbeats, lag, existence) and, when it was
//! lost, handled as `on_slot_lost` says.

use super::*;

impl Replicator {
    /// A fatal error ends the run; a lost slot is recovered or ends it,
    /// as `on_slot_lost` says.
    pub(super) async fn after_error(
        &mut self,
        client: &Client,
        e: SessionError,
    ) -> Result<(), SourceError> {
        match e {
            SessionError::Fatal(e) => Err(e),
            SessionError::Transient(_) => Ok(()),
            SessionError::SlotLost(why) => self.slot_lost(client, &why).await,
        }
    }

    /// Applies `on_slot_lost` (see [`setup::slot_loss`]).
    pub(super) async fn slot_lost(
        &mut self,
        client: &Client,
        why: &str,
    ) -> Result<(), SourceError> {
        let slot = self.slot().to_string();
        let rs = &self.env.settings.source.replication;
        if rs.on_slot_lost == OnSlotLost::Fail && !self.opts.recreate_slot {
            return Err(SourceError::Fatal(format!(
                "replication slot {slot}: {why}. Run `cobi-sync snapshot` to re-create the slot \
                 and re-sync every table (deleted rows are soft-deleted, unchanged records are not \
                 re-sent), then start the daemon again; or set source.replication.on_slot_lost = \
                 \"resnapshot\" to let the daemon do it by itself"
            )));
        }
        warn!(slot = %slot, reason = %why, "replication slot lost: re-creating it and re-copying every table (deleted rows are soft-deleted, unchanged records are not re-sent)");
        tokio::select! {
            r = self.env.sink.barrier() => r.map_err(|_| SourceError::Fatal(SINK_STOPPED.into()))?,
            _ = self.env.stop.cancelled() => return Ok(()),
        }
        setup::drop_slot(client, &slot).await?;
        setup::ensure_publication(client, &rs.publication, &self.tables).await?;
        let lsn = setup::create_slot(client, &slot, rs.failover).await?;
        let mut cp = self.durable_checkpoint()?;
        cp.lsn = lsn;
        for t in &self.tables {
            cp.tables
                .insert(t.mapping.id.to_string(), TableSnapshot::NotStarted);
        }
        replace_checkpoint(&self.env.store, cp)
    }

    pub(super) fn durable_checkpoint(&self) -> Result<ReplicationCheckpoint, SourceError> {
        Ok(replication_checkpoint(self.env.store.as_ref())
            .map_err(|e| SourceError::Fatal(e.to_string()))?
            .unwrap_or_default())
    }

    /// The slot must still be there and hold what was not delivered.
    pub(super) async fn check_slot(&self, client: &Client) -> Result<(), SessionError> {
        // Only a lost connection fails this after setup: retry.
        let status = setup::slot_status(client, self.slot())
            .await
            .map_err(|e| SessionError::Transient(e.to_string()))?;
        let known = self.durable_checkpoint()?.lsn;
        match setup::slot_loss(&status, known) {
            Some(why) => Err(SessionError::SlotLost(why)),
            None if status == SlotStatus::Missing => {
                Err(SessionError::SlotLost("the slot does not exist".into()))
            }
            None => Ok(()),
        }
    }

    pub(super) async fn setup(&mut self, client: &Client) -> Result<(), SourceError> {
        setup::check_server(client).await?;
        let mut ordered: Vec<_> = self.env.settings.mappings.clone();
        ordered.sort_by_key(|m| (m.ty, m.index));
        let mut errors = Vec::new();
        let mut tables = Vec::new();
        for m in &ordered {
            match SourceTable::resolve(client, m, self.ctx()).await {
                Ok(t) => tables.push(t),
                Err(SetupError::Config(e)) => errors.push(e),
                Err(SetupError::Db(e)) => {
                    return Err(SourceError::Fatal(pg::explain(&e, self.url())))
                }
            }
        }
        if !errors.is_empty() {
            return Err(SourceError::Config(errors.join("\n")));
        }
        setup::check_tables(client, &tables).await?;
        let rs = &self.env.settings.source.replication;
        setup::ensure_publication(client, &rs.publication, &tables).await?;
        self.relations = Relations::new(&tables);
        self.state = tables.iter().map(|_| TableState::default()).collect();
        self.tables = tables;
        let status = setup::slot_status(client, &rs.slot).await?;
        let known = self.durable_checkpoint()?.lsn;
        if let Some(why) = setup::slot_loss(&status, known) {
            return self.slot_lost(client, &why).await;
        }
        if status == SlotStatus::Missing {
            // A new slot: whatever position was stored belongs to an old one.
            let lsn = setup::create_slot(client, &rs.slot, rs.failover).await?;
            let mut cp = self.durable_checkpoint()?;
            cp.lsn = lsn;
            replace_checkpoint(&self.env.store, cp)?;
        } else {
            setup::terminate_ours(client, &rs.slot).await?;
        }
        Ok(())
    }

    pub(super) async fn heartbeat(&self, client: &Client) -> Result<(), SessionError> {
        client
            .execute(
                "SELECT pg_logical_emit_message(false, $1, '')",
                &[&HEARTBEAT_PREFIX],
            )
            .await
            .map_err(|e| db_error(&e, self.url(), "emitting a heartbeat"))?;
        Ok(())
    }

    pub(super) async fn check_lag(&mut self, client: &Client) -> Result<(), SessionError> {
        let slot = self.slot().to_string();
        let row = client
            .query_opt(
                "SELECT COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::int8, \
                        COALESCE(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| db_error(&e, self.url(), "reading the slot's lag"))?;
        let Some(row) = row else {
            return Err(SessionError::SlotLost(
                "the slot disappeared while streaming (dropped by someone?)".into(),
            ));
        };
        let lag: i64 = row.get(0);
        let status: String = row.get(1);
        if status == "lost" {
            return Err(SessionError::SlotLost(
                "the server invalidated the slot while streaming (WAL removed, see \
                 max_slot_wal_keep_size)"
                    .into(),
            ));
        }
        let lag = lag.max(0) as u64;
        let max = self.env.settings.source.replication.max_slot_lag;
        self.env.metrics.slot_lag_bytes.set(lag as i64);
        self.env.health.set_slot_lag(lag, max);
        if lag > max && !self.lag_alarm {
            self.lag_alarm = true;
            error!(lag_bytes = lag, max_slot_lag = max, slot = %slot,
                "replication slot lag is above max_slot_lag: PostgreSQL is keeping WAL for cobi-sync. \
                 Check that the Cobi API accepts records (status, dlq) and that the daemon keeps up");
        } else if lag <= max && self.lag_alarm {
            self.lag_alarm = false;
            info!(
                lag_bytes = lag,
                "replication slot lag back under max_slot_lag"
            );
        }
        Ok(())
    }
}
