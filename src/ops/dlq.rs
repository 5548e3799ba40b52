//! Dead-letter operations: list, replay, purge.
//!
//! Replay re-sends stored records through the normal sink, in dependency
//! order (parents first), ignoring fingerprints; a record accepted now
//! leaves the queue, one rejected again stays with its attempt count
//! raised. Purge drops dead letters the operator has given up on.

use serde::{Deserialize, Serialize};

use crate::model::record::Record;
use crate::model::schema::{schema, TypeId};
use crate::sink::{SinkHandle, SinkItem};
use crate::state::{DeadLetter, StateError, StateStore, Write};

/// One row of `dlq list`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeadLetterRow {
    /// Cobi type.
    #[serde(rename = "type")]
    pub ty: String,
    /// Cobi key.
    pub cobi_key: Option<String>,
    /// Source key.
    pub source_key: String,
    /// Why.
    pub reason: String,
    /// Rejections so far.
    pub attempts: u32,
    /// Last rejection.
    pub last_attempt: String,
    /// Mapping id.
    pub mapping: String,
    /// The record (JSON).
    pub record: serde_json::Value,
}

impl From<DeadLetter> for DeadLetterRow {
    fn from(d: DeadLetter) -> Self {
        DeadLetterRow {
            record: serde_json::from_str(&d.record)
                .unwrap_or(serde_json::Value::String(d.record.clone())),
            ty: d.ty,
            cobi_key: d.cobi_key,
            source_key: d.source_key,
            reason: d.reason,
            attempts: d.attempts,
            last_attempt: d.last_at,
            mapping: d.mapping,
        }
    }
}

/// Dead letters of `ty` (all when `None`), in dependency order.
pub fn list(store: &dyn StateStore, ty: Option<TypeId>) -> Result<Vec<DeadLetterRow>, StateError> {
    let mut v = store.dead_letters(ty)?;
    v.sort_by_key(|d| {
        (
            schema().type_id(&d.ty),
            d.mapping.clone(),
            d.source_key.clone(),
        )
    });
    Ok(v.into_iter().map(DeadLetterRow::from).collect())
}

/// Renders rows as a table (no record contents).
pub fn render(rows: &[DeadLetterRow]) -> String {
    if rows.is_empty() {
        return "no dead letters\n".into();
    }
    let mut out = format!(
        "{:<18} {:<38} {:<16} {:>8}  {:<27} {}\n",
        "type", "cobi key", "source key", "attempts", "last attempt", "reason"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<18} {:<38} {:<16} {:>8}  {:<27} {}\n",
            r.ty,
            r.cobi_key.as_deref().unwrap_or("-"),
            r.source_key,
            r.attempts,
            r.last_attempt,
            r.reason
        ));
    }
    out
}

/// Queues every dead letter of `ty` for re-sending and waits until the
/// sink has a verdict on each. Returns how many were re-sent.
pub async fn replay(
    store: &dyn StateStore,
    sink: &SinkHandle,
    ty: Option<TypeId>,
) -> Result<usize, String> {
    let mut letters = store.dead_letters(ty).map_err(|e| e.to_string())?;
    letters.sort_by_key(|d| schema().type_id(&d.ty));
    let mut items = Vec::with_capacity(letters.len());
    for d in letters {
        let Some(key) = d.key() else { continue };
        match Record::from_json(key.ty, d.record.as_bytes()) {
            Ok(record) => items.push(SinkItem::upsert(key, &record, Vec::new(), true)),
            Err(e) => {
                return Err(format!(
                    "dead letter {} {} holds a record that no longer parses ({e}); purge it",
                    d.ty, d.source_key
                ))
            }
        }
    }
    let n = items.len();
    for chunk in items.chunks_mut(1000) {
        let chunk: Vec<SinkItem> = chunk
            .iter_mut()
            .map(|i| std::mem::replace(i, SinkItem::Flush))
            .collect();
        sink.send(chunk).await.map_err(|e| e.to_string())?;
    }
    sink.barrier().await.map_err(|e| e.to_string())?;
    Ok(n)
}

/// Removes every dead letter of `ty`. Returns how many.
pub fn purge(store: &dyn StateStore, ty: Option<TypeId>) -> Result<usize, StateError> {
    let letters = store.dead_letters(ty)?;
    let writes: Vec<Write> = letters
        .iter()
        .filter_map(|d| d.key().map(Write::RemoveDeadLetter))
        .collect();
    let n = writes.len();
    store.apply(&writes)?;
    store.flush()?;
    Ok(n)
}
