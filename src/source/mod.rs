//! Sources: reading the partner's PostgreSQL.
//!
//! - [`pg`]: connections (TLS, passwords, errors explained) and catalog.
//! - [`reader`]: a mapping bound to its table/query; ordered reads streamed
//!   with binary `COPY`.
//! - [`poll`]: poll mode (cron ticks, cursors, lookback, reconcile).
//! - [`replication`]: replication mode (pgoutput decoding, slot and
//!   publication setup, consistent snapshot, acknowledgements).
//! - [`snapshot`]: the one-off `snapshot` command.
//! - [`reconcile`]: keys the state store holds that a table no longer has.
//!
//! A source only reads and maps; it hands records and progress marks to the
//! [`crate::sink`] and learns what is durable from it. It never writes the
//! state store itself.

pub mod pg;
pub mod poll;
pub mod progress;
pub mod reader;
pub mod reconcile;
pub mod replication;
pub mod snapshot;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::mapping::value::Value;
use crate::sink::SinkItem;
use crate::state::StateKey;
use reader::SourceTable;

/// A source stopped for a reason an operator must fix.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The configuration does not match the database (a missing table or
    /// column, a mapping that cannot convert): the message says what to fix.
    #[error("{0}")]
    Config(String),
    /// Anything else that retrying cannot fix (a rejected password, missing
    /// privileges, a lost slot): the message says what to do.
    #[error("{0}")]
    Fatal(String),
}

/// Maps rows of `t` into sink items.
pub fn mapped_items(t: &SourceTable, rows: Vec<Vec<Value>>) -> Vec<SinkItem> {
    rows.into_iter()
        .map(|row| {
            let mapped = t.compiled.map_row(&row);
            SinkItem::upsert(
                StateKey {
                    ty: t.mapping.ty,
                    mapping: t.mapping.id.clone(),
                    source_key: t.compiled.source_key(&row),
                },
                &mapped.record,
                mapped.problems,
                crate::sink::Resend::Changed,
            )
        })
        .collect()
}

/// Sleeps for the next reconnect delay (0.5 s doubling to 10 s, jittered).
/// False if `stop` fired.
pub async fn backoff_sleep(stop: &CancellationToken, attempt: &mut u32) -> bool {
    let d = crate::sink::policy::backoff(
        *attempt,
        Duration::from_millis(500),
        Duration::from_secs(10),
        rand::random(),
    );
    *attempt = attempt.saturating_add(1);
    // A backoff that logged what fails is a healthy wait (the watchdog).
    crate::ops::heartbeat::idle(async {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = stop.cancelled() => false,
        }
    })
    .await
}
