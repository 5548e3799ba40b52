//! Dead-letter operations: list, replay, purge.
//!
//! Replay re-sends stored records through the normal sink, in dependency
//! order (parents first), as [`SinkItem::Replay`]: a replayed letter never
//! replaces a change of the same key from the source, and it is sent only
//! if, when its epoch is sent, the key is still dead-lettered with the
//! letter's content — a newer version, a delete or an accept since wins
//! (DESIGN.md §5). A record accepted now leaves the queue, one rejected
//! again stays with its attempt count raised. Records are re-sent with
//! their numbers exactly as stored. A dead letter that cannot be re-sent — its type is unknown to
//! this version, or its record no longer parses — is skipped, counted and
//! reported, and the others are replayed. Purge drops dead letters the
//! operator has given up on.

use serde::{Deserialize, Serialize};
use tracing::{trace, warn};

use crate::model::record::Record;
use crate::model::schema::{schema, TypeId};
use crate::sink::{Outbound, SinkHandle, SinkItem};
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

/// A count of dead letters per type and reason, most frequent first; empty
/// when there are none.
pub fn summary(rows: &[DeadLetterRow]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut counts: std::collections::BTreeMap<(&str, &str), usize> = Default::default();
    for r in rows {
        *counts
            .entry((r.ty.as_str(), r.reason.as_str()))
            .or_default() += 1;
    }
    let mut sorted: Vec<_> = counts.into_iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut out = format!("{} dead letters by type and reason:\n", rows.len());
    for ((ty, reason), n) in sorted {
        let reason: String = reason.chars().take(120).collect();
        out.push_str(&format!("{n:>8}  {ty:<18} {reason}\n"));
    }
    out.push('\n');
    out
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayReport {
    /// Dead letters re-sent (accepted now, or dead again with their attempt
    /// count raised).
    pub replayed: usize,
    /// Dead letters left as they are: their type is unknown to this version
    /// of cobi-sync, or their record no longer parses.
    pub skipped: usize,
}

impl ReplayReport {
    /// What the operator should know about skipped letters, if any.
    pub fn skipped_note(&self) -> Option<String> {
        (self.skipped > 0).then(|| {
            format!(
                "{} dead letter{} not replayed: a type this version of cobi-sync does not know, \
                 or a record that no longer parses. They stay in the queue: see `cobi-sync dlq \
                 list`; purge a type's unparsable records with `cobi-sync dlq purge --type T`, \
                 and replay letters of an unknown type with the cobi-sync version that wrote them",
                self.skipped,
                if self.skipped == 1 { "" } else { "s" },
            )
        })
    }
}

/// Sink items re-sending `letters` (sorted into dependency order), and how
/// many letters were skipped because they cannot be re-sent.
fn replay_items(mut letters: Vec<DeadLetter>) -> (Vec<SinkItem>, usize) {
    letters.sort_by_key(|d| schema().type_id(&d.ty));
    let mut items = Vec::with_capacity(letters.len());
    let mut skipped = 0;
    for d in letters {
        let Some(key) = d.key() else {
            skipped += 1;
            warn!(type = %d.ty, mapping = %d.mapping, "dead letter skipped: its type is unknown to this version of cobi-sync");
            trace!(source_key = %d.source_key, "skipped dead letter");
            continue;
        };
        match Record::from_json(key.ty, d.record.as_bytes()) {
            Ok(record) => items.push(SinkItem::Replay {
                key,
                record: Outbound::new(&record, Vec::new()),
                letter: xxhash_rust::xxh3::xxh3_64(d.record.as_bytes()),
            }),
            Err(e) => {
                skipped += 1;
                warn!(type = %d.ty, mapping = %d.mapping, "dead letter skipped: its record no longer parses");
                // The parse error may quote record contents (personal data).
                trace!(source_key = %d.source_key, error = %e, "skipped dead letter");
            }
        }
    }
    (items, skipped)
}

/// Queues every dead letter of `ty` that can be re-sent and waits until
/// the sink has a verdict on each (or found it superseded). The letters
/// are read on a blocking thread.
pub async fn replay(
    store: std::sync::Arc<dyn StateStore>,
    sink: &SinkHandle,
    ty: Option<TypeId>,
) -> Result<ReplayReport, String> {
    let letters = tokio::task::spawn_blocking(move || store.dead_letters(ty))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let (mut items, skipped) = replay_items(letters);
    let n = items.len();
    for chunk in items.chunks_mut(1000) {
        let chunk: Vec<SinkItem> = chunk
            .iter_mut()
            .map(|i| std::mem::replace(i, SinkItem::Flush))
            .collect();
        sink.send(chunk).await.map_err(|e| e.to_string())?;
    }
    sink.barrier().await.map_err(|e| e.to_string())?;
    Ok(ReplayReport {
        replayed: n,
        skipped,
    })
}

/// Removes every dead letter of `ty`. Returns how many.
pub fn purge(store: &dyn StateStore, ty: Option<TypeId>) -> Result<usize, StateError> {
    let letters = store.dead_letters(ty)?;
    let writes: Vec<Write> = letters
        .iter()
        .filter_map(|d| d.key().map(Write::RemoveDeadLetter))
        .collect();
    let n = writes.len();
    // Fails rather than report removals a re-open undid (the running
    // daemon's store, after a failure).
    store.write_durably(&[&writes])?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(ty: &str, source_key: &str, record: &str) -> DeadLetter {
        DeadLetter {
            ty: ty.into(),
            mapping: format!("{ty}/public.t"),
            cobi_key: None,
            source_key: source_key.into(),
            record: record.into(),
            reason: "rejected".into(),
            attempts: 1,
            first_at: "2024-01-01T00:00:00Z".into(),
            last_at: "2024-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn summary_counts_per_type_and_reason_most_frequent_first() {
        let row = |ty: &str, reason: &str| DeadLetterRow {
            reason: reason.into(),
            ..DeadLetterRow::from(letter(ty, "1", "{}"))
        };
        assert_eq!(summary(&[]), "");
        let rows = [
            row("shops", "region: must be 2 letters"),
            row("transactions", "amount: must be > 0"),
            row("transactions", "amount: must be > 0"),
            row("shops", "region: must be 2 letters"),
            row("transactions", "amount: must be > 0"),
            row("branches", "shop_id: unknown shop"),
        ];
        let s = summary(&rows);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "6 dead letters by type and reason:");
        assert!(lines[1].trim_start().starts_with("3  transactions"), "{s}");
        assert!(lines[2].trim_start().starts_with("2  shops"), "{s}");
        assert!(lines[3].trim_start().starts_with("1  branches"), "{s}");
    }

    #[test]
    fn letters_that_cannot_be_resent_are_skipped_and_counted() {
        let shop = r#"{"shop_id":"7f0c1b9e-1d2a-4c1e-9a57-0f3f6c8b2a10","name":"A","region":"GB"}"#;
        let letters = vec![
            letter("branches", "1", "{\"branch_id\": 12"),
            letter("stores", "2", shop),
            letter("shops", "3", shop),
            letter("shops", "4", "not json"),
        ];
        let (items, skipped) = replay_items(letters);
        assert_eq!(skipped, 3, "unknown type + two unparsable records");
        assert_eq!(items.len(), 1, "the good letter is still replayed");
        match &items[0] {
            SinkItem::Replay { key, letter, .. } => {
                assert_eq!(key.source_key, "3");
                assert_eq!(
                    *letter,
                    xxhash_rust::xxh3::xxh3_64(shop.as_bytes()),
                    "sent only while the key holds this letter"
                );
            }
            other => panic!("want a replay, got {other:?}"),
        }
    }

    #[test]
    fn the_report_tells_the_operator_what_to_do() {
        assert_eq!(ReplayReport::default().skipped_note(), None);
        let one = ReplayReport {
            replayed: 2,
            skipped: 1,
        }
        .skipped_note()
        .unwrap();
        assert!(one.starts_with("1 dead letter not replayed"), "{one}");
        assert!(one.contains("dlq list"), "{one}");
        let two = ReplayReport {
            replayed: 0,
            skipped: 2,
        }
        .skipped_note()
        .unwrap();
        assert!(two.starts_with("2 dead letters not replayed"), "{two}");
    }
}
