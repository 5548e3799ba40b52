//! Replication mode: logical replication with pgoutput.

pub mod pgoutput;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::ops::health::Health;
use crate::ops::metrics::Metrics;
use crate::sink::SinkHandle;
use crate::source::SourceError;
use crate::state::StateStore;

/// Runs replication mode until `stop`.
pub async fn run(
    _settings: Settings,
    _store: Arc<dyn StateStore>,
    _sink: SinkHandle,
    _health: Arc<Health>,
    _metrics: Arc<Metrics>,
    _stop: CancellationToken,
) -> Result<(), SourceError> {
    Err(SourceError::Fatal(
        "replication mode is not implemented yet".into(),
    ))
}

/// The `snapshot` command in replication mode.
pub async fn snapshot_command(
    _settings: Settings,
    _store: Arc<dyn StateStore>,
    _sink: SinkHandle,
    _health: Arc<Health>,
    _metrics: Arc<Metrics>,
    _types: &[crate::model::schema::TypeId],
    _stop: CancellationToken,
) -> Result<u64, SourceError> {
    Err(SourceError::Fatal(
        "replication mode is not implemented yet".into(),
    ))
}
