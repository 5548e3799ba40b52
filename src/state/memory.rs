//! An in-memory [`StateStore`] for tests: the same contract as
//! [`super::SledStore`], nothing on disk.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{
    Checkpoint, DeadLetter, KeyState, KeyStatus, StateError, StateKey, StateStore, TypeStats, Write,
};
use crate::model::schema::TypeId;

#[derive(Default)]
struct Inner {
    keys: BTreeMap<Vec<u8>, KeyState>,
    dead: BTreeMap<Vec<u8>, DeadLetter>,
    checkpoints: BTreeMap<String, Checkpoint>,
    stats: BTreeMap<TypeId, TypeStats>,
    flushes: u64,
}

/// State held in memory.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many times `flush` was called.
    pub fn flushes(&self) -> u64 {
        self.inner.lock().expect("lock").flushes
    }
}

impl StateStore for MemoryStore {
    fn get_key(&self, key: &StateKey) -> Result<Option<KeyState>, StateError> {
        Ok(self
            .inner
            .lock()
            .expect("lock")
            .keys
            .get(&key.encode())
            .cloned())
    }

    fn scan_keys(
        &self,
        ty: TypeId,
        mapping: &str,
        visit: &mut dyn FnMut(String, KeyStatus),
    ) -> Result<(), StateError> {
        let prefix = StateKey::mapping_prefix(ty, mapping);
        let found: Vec<(String, KeyStatus)> = {
            let inner = self.inner.lock().expect("lock");
            inner
                .keys
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .filter_map(|(k, v)| StateKey::source_key_of(k).map(|sk| (sk, v.status)))
                .collect()
        };
        for (k, s) in found {
            visit(k, s);
        }
        Ok(())
    }

    fn apply(&self, writes: &[Write]) -> Result<(), StateError> {
        let mut inner = self.inner.lock().expect("lock");
        for w in writes.iter().cloned() {
            match w {
                Write::Key(k, s) => {
                    inner.keys.insert(k.encode(), s);
                }
                Write::RemoveKey(k) => {
                    inner.keys.remove(&k.encode());
                }
                Write::DeadLetter(k, d) => {
                    inner.dead.insert(k.encode(), *d);
                }
                Write::RemoveDeadLetter(k) => {
                    inner.dead.remove(&k.encode());
                }
                Write::Checkpoint(c) => {
                    let name = c.name();
                    if inner
                        .checkpoints
                        .get(&name)
                        .is_some_and(|old| c.is_behind(old))
                    {
                        continue;
                    }
                    inner.checkpoints.insert(name, c);
                }
                Write::Stats(t, s) => {
                    inner.stats.insert(t, s);
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StateError> {
        self.inner.lock().expect("lock").flushes += 1;
        Ok(())
    }

    fn checkpoint(&self, name: &str) -> Result<Option<Checkpoint>, StateError> {
        Ok(self
            .inner
            .lock()
            .expect("lock")
            .checkpoints
            .get(name)
            .cloned())
    }

    fn checkpoints(&self) -> Result<Vec<Checkpoint>, StateError> {
        Ok(self
            .inner
            .lock()
            .expect("lock")
            .checkpoints
            .values()
            .cloned()
            .collect())
    }

    fn remove_checkpoint(&self, name: &str) -> Result<(), StateError> {
        self.inner.lock().expect("lock").checkpoints.remove(name);
        Ok(())
    }

    fn dead_letters(&self, ty: Option<TypeId>) -> Result<Vec<DeadLetter>, StateError> {
        let inner = self.inner.lock().expect("lock");
        Ok(inner
            .dead
            .iter()
            .filter(|(k, _)| ty.is_none_or(|t| k.first() == Some(&t)))
            .map(|(_, d)| d.clone())
            .collect())
    }

    fn dead_letter(&self, key: &StateKey) -> Result<Option<DeadLetter>, StateError> {
        Ok(self
            .inner
            .lock()
            .expect("lock")
            .dead
            .get(&key.encode())
            .cloned())
    }

    fn stats(&self) -> Result<BTreeMap<TypeId, TypeStats>, StateError> {
        Ok(self.inner.lock().expect("lock").stats.clone())
    }
}
