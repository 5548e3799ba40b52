//! What the state store knows of a key, as the epoch being sent must see
//! it: the writes of the epoch before (delivered, not yet committed) over
//! the store.
//!
//! One epoch is delivered while the one before it commits, so the key
//! states and dead letters of that earlier epoch are read from its
//! [`Overlay`] first. The lookups are blocking store reads: callers run
//! them on a blocking thread (`spawn_blocking`), never on an async worker.

use rustc_hash::FxHashMap;

use crate::state::{DeadLetter, KeyState, StateError, StateKey, StateStore, Write};

/// Key states and dead letters written by an epoch that is not committed
/// yet (`None`: removed).
#[derive(Default)]
pub struct Overlay {
    keys: FxHashMap<StateKey, Option<KeyState>>,
    letters: FxHashMap<StateKey, Option<DeadLetter>>,
}

impl Overlay {
    /// The overlay of an epoch's writes.
    pub fn of(writes: &[Write]) -> Overlay {
        let mut o = Overlay {
            keys: FxHashMap::with_capacity_and_hasher(writes.len(), rustc_hash::FxBuildHasher),
            letters: FxHashMap::default(),
        };
        for w in writes {
            match w {
                Write::Key(k, s) => {
                    o.keys.insert(k.clone(), Some(s.clone()));
                }
                Write::RemoveKey(k) => {
                    o.keys.insert(k.clone(), None);
                }
                Write::DeadLetter(k, d) => {
                    o.letters.insert(k.clone(), Some((**d).clone()));
                }
                Write::RemoveDeadLetter(k) => {
                    o.letters.insert(k.clone(), None);
                }
                Write::Checkpoint(_) | Write::Stats(..) => {}
            }
        }
        o
    }

    /// The states of `keys`, in order: the overlay's, else the store's
    /// (the rest read in one call: neighbouring keys share pages).
    pub fn key_states(
        &self,
        store: &dyn StateStore,
        keys: &[&StateKey],
    ) -> Result<Vec<Option<KeyState>>, StateError> {
        let mut missing: Vec<&StateKey> = Vec::new();
        let from_overlay: Vec<Option<Option<KeyState>>> = keys
            .iter()
            .map(|k| {
                let s = self.keys.get(*k).cloned();
                if s.is_none() {
                    missing.push(k);
                }
                s
            })
            .collect();
        let mut stored = store.get_keys(&missing)?.into_iter();
        Ok(from_overlay
            .into_iter()
            .map(|s| s.unwrap_or_else(|| stored.next().flatten()))
            .collect())
    }

    /// The latest dead letter of each of `keys`, in order.
    pub fn letters(
        &self,
        store: &dyn StateStore,
        keys: &[&StateKey],
    ) -> Result<Vec<Option<DeadLetter>>, StateError> {
        keys.iter()
            .map(|k| match self.letters.get(*k) {
                Some(d) => Ok(d.clone()),
                None => store.dead_letter(k),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{KeyStatus, MemoryStore};

    fn key(k: &str) -> StateKey {
        StateKey {
            ty: 0,
            mapping: "m".into(),
            source_key: k.into(),
        }
    }

    fn st(fp: u64) -> KeyState {
        KeyState {
            status: KeyStatus::Accepted,
            fingerprint: fp,
            delete_image: None,
        }
    }

    fn dl(attempts: u32) -> DeadLetter {
        DeadLetter {
            ty: "institutes".into(),
            mapping: "m".into(),
            cobi_key: None,
            source_key: "x".into(),
            record: "{}".into(),
            reason: "r".into(),
            attempts,
            first_at: "t0".into(),
            last_at: "t1".into(),
        }
    }

    #[test]
    fn the_uncommitted_epoch_wins_over_the_store() {
        let store = MemoryStore::new();
        store
            .apply(&[
                Write::Key(key("a"), st(1)),
                Write::Key(key("b"), st(2)),
                Write::DeadLetter(key("a"), Box::new(dl(1))),
                Write::DeadLetter(key("b"), Box::new(dl(5))),
            ])
            .unwrap();
        let o = Overlay::of(&[
            Write::Key(key("a"), st(10)),
            Write::RemoveKey(key("b")),
            Write::DeadLetter(key("a"), Box::new(dl(2))),
            Write::RemoveDeadLetter(key("b")),
            Write::DeadLetter(key("c"), Box::new(dl(1))),
        ]);
        let (a, b, c, d) = (key("a"), key("b"), key("c"), key("d"));
        let states = o.key_states(&store, &[&a, &b, &c, &d]).unwrap();
        assert_eq!(states, vec![Some(st(10)), None, None, None]);
        let letters = o.letters(&store, &[&a, &b, &c, &d]).unwrap();
        let attempts: Vec<Option<u32>> = letters
            .iter()
            .map(|l| l.as_ref().map(|l| l.attempts))
            .collect();
        assert_eq!(attempts, vec![Some(2), None, Some(1), None]);
        // Without an overlay: the store.
        let states = Overlay::default().key_states(&store, &[&b]).unwrap();
        assert_eq!(states, vec![Some(st(2))]);
    }
}
