//! An epoch: the records (and progress marks) gathered while the previous
//! epoch was being sent.
//!
//! Within an epoch, each key keeps only its newest version (compaction), so
//! the batches cut from one type are key-disjoint and can be sent
//! concurrently without reordering versions of a key. Epochs are sent one
//! after another, types level by level (parents first), which gives the
//! delivery contract's "parents first" and "per-key order".

use rustc_hash::FxHashMap;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::model::record::{Json, Record};
use crate::model::schema::{schema, TypeId};
use crate::sink::Outbound;
use crate::state::{Checkpoint, StateKey};

/// Keys of a type after which its epoch is taken to be busy.
const BUSY_KEYS: usize = 256;

/// What to do with a key.
#[derive(Debug, Clone)]
pub enum Op {
    /// Send this version.
    Upsert {
        /// The record, ready to send.
        record: Outbound,
    },
    /// Send a soft delete; the record to mark deleted comes from `basis`
    /// (the old row image, or a version superseded in this epoch) or the
    /// last-sent copy in the state store.
    Delete {
        /// Known content of the deleted record.
        basis: Option<Record>,
    },
}

/// One key's newest change in the epoch.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its state key.
    pub key: StateKey,
    /// The change.
    pub op: Op,
    /// Send even if identical to the last accepted version (dlq replay).
    pub force: bool,
}

/// An epoch being filled.
#[derive(Debug, Default)]
pub struct Epoch {
    types: Vec<Vec<Option<Entry>>>,
    index: Vec<FxHashMap<StateKey, usize>>,
    live: Vec<usize>,
    /// Progress marks, latest per checkpoint name.
    pub marks: Vec<Checkpoint>,
    /// Waiters to wake when this epoch is durable.
    pub barriers: Vec<oneshot::Sender<()>>,
    /// When the first item arrived.
    pub started: Option<Instant>,
    /// Seal as soon as possible.
    pub flush: bool,
    bytes: usize,
}

fn approx_size(r: &Record) -> usize {
    32 + r
        .fields
        .iter()
        .map(|(_, v)| {
            24 + match v {
                Json::Str(s) | Json::Num(s) => s.len(),
                _ => 8,
            }
        })
        .sum::<usize>()
}

impl Epoch {
    /// An empty epoch.
    pub fn new() -> Self {
        let n = schema().types.len();
        Epoch {
            types: vec![Vec::new(); n],
            index: vec![FxHashMap::default(); n],
            live: vec![0; n],
            ..Default::default()
        }
    }

    fn touch(&mut self) {
        if self.started.is_none() {
            self.started = Some(Instant::now());
        }
    }

    /// Adds a change, replacing an older change of the same key.
    pub fn add(&mut self, key: StateKey, op: Op, force: bool) {
        self.touch();
        let t = key.ty as usize;
        let size = match &op {
            Op::Upsert { record } => 96 + record.json.len() + key.source_key.len(),
            Op::Delete { basis } => basis.as_ref().map_or(64, approx_size),
        };
        self.bytes += size;
        if self.types[t].len() == BUSY_KEYS {
            // A busy type fills its epoch: grow once to the most it holds
            // instead of doubling (rehashing was ~3% of a snapshot's CPU).
            self.types[t].reserve(super::EPOCH_RECORDS);
            self.index[t].reserve(super::EPOCH_RECORDS);
        }
        if let Some(&i) = self.index[t].get(&key) {
            let old = self.types[t][i].take().expect("indexed entries are live");
            let op = match (op, old.op) {
                // A delete after an insert/update in the same epoch: the
                // superseded version is what gets marked deleted.
                (Op::Delete { basis: None }, Op::Upsert { record }) => Op::Delete {
                    basis: Record::from_json(key.ty, &record.json).ok(),
                },
                (Op::Delete { basis: None }, Op::Delete { basis }) => Op::Delete { basis },
                (op, _) => op,
            };
            // Keep the newest version at the end so it is sent in order of
            // arrival (stable batches).
            self.types[t].push(Some(Entry {
                key: key.clone(),
                op,
                force: force || old.force,
            }));
            let n = self.types[t].len() - 1;
            self.index[t].insert(key, n);
        } else {
            self.types[t].push(Some(Entry {
                key: key.clone(),
                op,
                force,
            }));
            let n = self.types[t].len() - 1;
            self.index[t].insert(key, n);
            self.live[t] += 1;
        }
    }

    /// Records a progress mark (replacing an older one with the same name).
    pub fn mark(&mut self, c: Checkpoint) {
        self.touch();
        let name = c.name();
        self.marks.retain(|m| m.name() != name);
        self.marks.push(c);
    }

    /// Adds a waiter and asks for a prompt seal.
    pub fn barrier(&mut self, tx: oneshot::Sender<()>) {
        self.touch();
        self.barriers.push(tx);
        self.flush = true;
    }

    /// Nothing at all in it.
    pub fn is_empty(&self) -> bool {
        self.started.is_none()
    }

    /// Number of distinct keys in a type.
    pub fn len_of(&self, ty: TypeId) -> usize {
        self.live[ty as usize]
    }

    /// Total distinct keys.
    pub fn len(&self) -> usize {
        self.live.iter().sum()
    }

    /// Approximate bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether it holds as much as one round of concurrent requests can
    /// carry (`limit_records` for any type, or `limit_bytes` in all).
    pub fn is_full(&self, limit_records: usize, limit_bytes: usize) -> bool {
        self.live.iter().any(|&n| n >= limit_records) || self.bytes >= limit_bytes
    }

    /// Takes a type's entries in arrival order of their newest version.
    pub fn take_type(&mut self, ty: TypeId) -> Vec<Entry> {
        let t = ty as usize;
        self.index[t].clear();
        self.live[t] = 0;
        std::mem::take(&mut self.types[t])
            .into_iter()
            .flatten()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::record::Json;

    fn key(ty: &str, k: &str) -> StateKey {
        StateKey {
            ty: schema().type_id(ty).unwrap(),
            mapping: "m".into(),
            source_key: k.into(),
        }
    }

    fn rec(ty: &str, name: &str) -> Record {
        let t = schema().type_id(ty).unwrap();
        let mut r = Record::new(t);
        r.set(
            schema().ty(t).field("name").unwrap(),
            Json::Str(name.into()),
        );
        r
    }

    fn upsert(r: Record) -> Op {
        Op::Upsert {
            record: Outbound::new(&r, vec![]),
        }
    }

    #[test]
    fn newest_version_of_a_key_wins_and_keeps_arrival_order() {
        let mut e = Epoch::new();
        e.add(key("shops", "1"), upsert(rec("shops", "v1")), false);
        e.add(key("shops", "2"), upsert(rec("shops", "a")), false);
        e.add(key("shops", "1"), upsert(rec("shops", "v2")), false);
        assert_eq!(e.len_of(key("shops", "1").ty), 2);
        let entries = e.take_type(key("shops", "1").ty);
        let names: Vec<_> = entries
            .iter()
            .map(|en| match &en.op {
                Op::Upsert { record } => Record::from_json(key("shops", "1").ty, &record.json)
                    .unwrap()
                    .get_named("name")
                    .cloned(),
                Op::Delete { .. } => None,
            })
            .collect();
        assert_eq!(
            names,
            vec![Some(Json::Str("a".into())), Some(Json::Str("v2".into()))]
        );
        assert_eq!(e.len(), 0);
    }

    #[test]
    fn delete_after_insert_keeps_the_inserted_record_as_basis() {
        let mut e = Epoch::new();
        e.add(key("tags", "9"), upsert(rec("tags", "t")), false);
        e.add(key("tags", "9"), Op::Delete { basis: None }, false);
        let entries = e.take_type(key("tags", "9").ty);
        assert_eq!(entries.len(), 1);
        match &entries[0].op {
            Op::Delete { basis: Some(r) } => {
                assert_eq!(r.get_named("name"), Some(&Json::Str("t".into())))
            }
            other => panic!("{other:?}"),
        }
        // An insert after a delete is a plain upsert.
        e.add(key("tags", "9"), Op::Delete { basis: None }, false);
        e.add(key("tags", "9"), upsert(rec("tags", "back")), false);
        assert!(matches!(
            e.take_type(key("tags", "9").ty)[0].op,
            Op::Upsert { .. }
        ));
    }

    #[test]
    fn marks_keep_the_latest_per_name_and_fullness() {
        let mut e = Epoch::new();
        assert!(e.is_empty());
        let cp = |lsn| {
            Checkpoint::Replication(crate::state::ReplicationCheckpoint {
                lsn,
                tables: Default::default(),
            })
        };
        e.mark(cp(1));
        e.mark(cp(5));
        assert_eq!(e.marks, vec![cp(5)]);
        assert!(!e.is_empty());
        for i in 0..10 {
            e.add(
                key("shops", &i.to_string()),
                upsert(rec("shops", "x")),
                false,
            );
        }
        assert!(e.is_full(10, usize::MAX));
        assert!(!e.is_full(11, usize::MAX));
        assert!(e.is_full(1000, 100));
    }
}
