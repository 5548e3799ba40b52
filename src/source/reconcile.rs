//! Reconciliation: the keys the state store holds as accepted for a
//! mapping that its table no longer has. Their records get soft deletes
//! (`on_delete = "soft"`) when a copy starts over — `snapshot` in both
//! modes, `resync`, recovery after a lost slot — so a row deleted while
//! nothing was watching is not left live at Cobi.
//!
//! The table's keys are read with binary `COPY` in the caller's
//! transaction (one snapshot) and kept as 64-bit hashes of their source
//! keys; the state store's keys are compared against them.

use std::collections::HashSet;
use std::sync::Arc;

use crate::mapping::engine::source_key;
use crate::source::reader::{CopyOut, ReadError, RowStream, SourceTable};
use crate::state::{KeyStatus, StateStore};

/// Why reconciliation failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Reading the table failed.
    #[error("{0}")]
    Read(#[from] ReadError),
    /// Reading the state store failed.
    #[error("state store: {0}")]
    State(String),
}

/// The accepted keys of `t`'s mapping that `t` no longer has, in no
/// particular order. Reads the table only when the store holds keys.
pub async fn absent_keys<C: CopyOut>(
    client: &C,
    store: &Arc<dyn StateStore>,
    t: &SourceTable,
) -> Result<Vec<String>, ReconcileError> {
    let known = {
        let store = store.clone();
        let (ty, id) = (t.mapping.ty, t.mapping.id.clone());
        tokio::task::spawn_blocking(move || store.keys_of(ty, &id))
            .await
            .map_err(|e| ReconcileError::State(e.to_string()))?
            .map_err(|e| ReconcileError::State(e.to_string()))?
    };
    let known: Vec<String> = known
        .into_iter()
        .filter(|(_, st)| st.status == KeyStatus::Accepted)
        .map(|(k, _)| k)
        .collect();
    if known.is_empty() {
        return Ok(Vec::new());
    }
    let hash = |k: &str| xxhash_rust::xxh3::xxh3_64(k.as_bytes());
    let mut present: HashSet<u64> = HashSet::new();
    let mut rows = RowStream::start(client, &t.keys_sql(), t.key_types())
        .await
        .map_err(ReadError::Db)?;
    loop {
        let batch = rows.next_batch(10_000).await?;
        if batch.is_empty() {
            break;
        }
        for r in batch {
            present.insert(hash(&source_key(r.iter())));
        }
    }
    Ok(known
        .into_iter()
        .filter(|k| !present.contains(&hash(k)))
        .collect())
}
