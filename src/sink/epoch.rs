//! An epoch: the records (and progress marks) gathered while the previous
//! epoch was being sent.
//!
//! Within an epoch, each key keeps only its newest version (compaction), so
//! the batches cut from one type are key-disjoint and can be sent
//! concurrently without reordering versions of a key. Epochs are sent one
//! after another, types level by level (parents first), which gives the
//! delivery contract's "parents first" and "per-key order".
//!
//! A `dlq replay` item never replaces a change from the source ([`merge`]):
//! the source's version is newer than any dead letter of the key.

use std::hash::BuildHasher;
use std::time::Instant;

use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;

use tokio::sync::oneshot;

use crate::model::record::{Json, Record};
use crate::model::schema::{schema, TypeId};
use crate::sink::decide::Resend;
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
    /// delete image in the state store.
    Delete {
        /// Known content of the deleted record.
        basis: Option<Record>,
    },
    /// Re-send a dead letter (`dlq replay`), if it still stands when the
    /// epoch is sent.
    Replay {
        /// The letter's record, ready to send.
        record: Outbound,
        /// Fingerprint of the letter's record as dead-lettered.
        letter: u64,
    },
}

/// The change that stands when `new` arrives for a key holding `old` in
/// the same epoch (with the [`Resend`] of the result: the greater of the
/// two — a forced version stays forced, a change is not demoted to a
/// re-read).
pub fn merge(ty: TypeId, old: (Op, Resend), new: (Op, Resend)) -> (Op, Resend) {
    match (old, new) {
        // A replay never replaces a change from the source.
        (old @ (Op::Upsert { .. } | Op::Delete { .. }, _), (Op::Replay { .. }, _)) => old,
        // A delete after an insert/update in the same epoch: the
        // superseded version is what gets marked deleted.
        ((Op::Upsert { record }, _), (Op::Delete { basis: None }, f)) => (
            Op::Delete {
                basis: Record::from_json(ty, &record.json).ok(),
            },
            f,
        ),
        ((Op::Delete { basis }, _), (Op::Delete { basis: None }, f)) => (Op::Delete { basis }, f),
        // A source change after a replay: the source's, on its own terms.
        ((Op::Replay { .. }, _), new) => new,
        ((_, old_resend), (op, r)) => (op, r.max(old_resend)),
    }
}

/// Approximate bytes an entry holds.
fn op_size(key: &StateKey, op: &Op) -> usize {
    key.source_key.len()
        + match op {
            Op::Upsert { record } | Op::Replay { record, .. } => 96 + record.json.len(),
            Op::Delete { basis } => basis.as_ref().map_or(64, approx_size),
        }
}

/// One key's newest change in the epoch.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its state key.
    pub key: StateKey,
    /// The change.
    pub op: Op,
    /// How an identical prior verdict is treated.
    pub resend: Resend,
}

/// An epoch being filled.
#[derive(Debug, Default)]
pub struct Epoch {
    types: Vec<Vec<Option<Entry>>>,
    /// Per type: the position in `types` of each key's live entry, hashed
    /// by key (the key itself is the entry's, not a copy).
    index: Vec<HashTable<usize>>,
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

/// A key's hash in the epoch's index.
fn key_hash(key: &StateKey) -> u64 {
    FxBuildHasher.hash_one(key)
}

/// The index hash of the live entry at `i` (when the index grows).
fn entry_hash(entries: &[Option<Entry>], i: usize) -> u64 {
    key_hash(&entries[i].as_ref().expect("indexed entries are live").key)
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
            index: (0..n).map(|_| HashTable::new()).collect(),
            live: vec![0; n],
            ..Default::default()
        }
    }

    fn touch(&mut self) {
        if self.started.is_none() {
            self.started = Some(Instant::now());
        }
    }

    /// Adds a change; an older change of the same key is replaced as
    /// [`merge`] says.
    pub fn add(&mut self, key: StateKey, op: Op, resend: Resend) {
        self.touch();
        let t = key.ty as usize;
        let (entries, index) = (&mut self.types[t], &mut self.index[t]);
        if entries.len() == BUSY_KEYS {
            // A busy type fills its epoch: grow once to the most it holds
            // instead of doubling (rehashing was ~3% of a snapshot's CPU).
            entries.reserve(super::EPOCH_RECORDS);
            index.reserve(super::EPOCH_RECORDS, |&i| entry_hash(entries, i));
        }
        let hash = key_hash(&key);
        let found = index.find_mut(hash, |&i| entries[i].as_ref().is_some_and(|e| e.key == key));
        let (op, resend) = match found {
            Some(slot) => {
                // The newest version takes the key's slot in the index.
                let i = std::mem::replace(slot, entries.len());
                let old = entries[i].take().expect("indexed entries are live");
                self.bytes -= op_size(&old.key, &old.op);
                self.live[t] -= 1;
                merge(key.ty, (old.op, old.resend), (op, resend))
            }
            None => {
                index.insert_unique(hash, entries.len(), |&i| entry_hash(entries, i));
                (op, resend)
            }
        };
        self.bytes += op_size(&key, &op);
        // The newest version goes to the end, so it is sent in order of
        // arrival (stable batches).
        entries.push(Some(Entry { key, op, resend }));
        self.live[t] += 1;
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
        // Sized once (growing by doubling was ~2 % of a sync's CPU).
        let mut entries = Vec::with_capacity(self.live[t]);
        self.index[t].clear();
        self.live[t] = 0;
        entries.extend(std::mem::take(&mut self.types[t]).into_iter().flatten());
        for e in &entries {
            self.bytes -= op_size(&e.key, &e.op);
        }
        entries
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
        e.add(
            key("shops", "1"),
            upsert(rec("shops", "v1")),
            Resend::Changed,
        );
        e.add(
            key("shops", "2"),
            upsert(rec("shops", "a")),
            Resend::Changed,
        );
        e.add(
            key("shops", "1"),
            upsert(rec("shops", "v2")),
            Resend::Changed,
        );
        assert_eq!(e.len_of(key("shops", "1").ty), 2);
        let entries = e.take_type(key("shops", "1").ty);
        let names: Vec<_> = entries
            .iter()
            .map(|en| match &en.op {
                Op::Upsert { record } => Record::from_json(key("shops", "1").ty, &record.json)
                    .unwrap()
                    .get_named("name")
                    .cloned(),
                Op::Delete { .. } | Op::Replay { .. } => None,
            })
            .collect();
        assert_eq!(
            names,
            vec![Some(Json::Str("a".into())), Some(Json::Str("v2".into()))]
        );
        assert_eq!(e.len(), 0);
    }

    #[test]
    fn many_repeated_keys_past_the_busy_size_keep_their_newest_versions() {
        // Past BUSY_KEYS the index grows (and rehashes) while the type
        // holds replaced entries; a second round reuses the cleared index.
        let ty = key("shops", "0").ty;
        let n = 3 * BUSY_KEYS;
        let mut e = Epoch::new();
        for round in 0..2 {
            // Each key twice, interleaved: k0 k1 k0' k2 k1' k3 k2' ...
            for i in 0..=n {
                if i < n {
                    let v = format!("{round}-{i}-a");
                    e.add(
                        key("shops", &i.to_string()),
                        upsert(rec("shops", &v)),
                        Resend::Changed,
                    );
                }
                if i > 0 {
                    let v = format!("{round}-{}-b", i - 1);
                    e.add(
                        key("shops", &(i - 1).to_string()),
                        upsert(rec("shops", &v)),
                        Resend::Changed,
                    );
                }
            }
            assert_eq!(e.len_of(ty), n);
            let got: Vec<(String, String)> = e
                .take_type(ty)
                .into_iter()
                .map(|en| {
                    let Op::Upsert { record } = &en.op else {
                        panic!("an upsert")
                    };
                    let r = Record::from_json(ty, &record.json).unwrap();
                    let name = r
                        .get_named("name")
                        .and_then(Json::as_str)
                        .unwrap()
                        .to_string();
                    (en.key.source_key, name)
                })
                .collect();
            // Newest versions only, in the order they arrived.
            let want: Vec<(String, String)> = (0..n)
                .map(|i| (i.to_string(), format!("{round}-{i}-b")))
                .collect();
            assert_eq!(got, want, "round {round}");
            assert_eq!(e.len(), 0);
        }
    }

    #[test]
    fn delete_after_insert_keeps_the_inserted_record_as_basis() {
        let mut e = Epoch::new();
        e.add(key("tags", "9"), upsert(rec("tags", "t")), Resend::Changed);
        e.add(
            key("tags", "9"),
            Op::Delete { basis: None },
            Resend::Changed,
        );
        let entries = e.take_type(key("tags", "9").ty);
        assert_eq!(entries.len(), 1);
        match &entries[0].op {
            Op::Delete { basis: Some(r) } => {
                assert_eq!(r.get_named("name"), Some(&Json::Str("t".into())))
            }
            other => panic!("{other:?}"),
        }
        // An insert after a delete is a plain upsert.
        e.add(
            key("tags", "9"),
            Op::Delete { basis: None },
            Resend::Changed,
        );
        e.add(
            key("tags", "9"),
            upsert(rec("tags", "back")),
            Resend::Changed,
        );
        assert!(matches!(
            e.take_type(key("tags", "9").ty)[0].op,
            Op::Upsert { .. }
        ));
    }

    fn name_of(e: &Entry) -> Option<Json> {
        match &e.op {
            Op::Upsert { record } | Op::Replay { record, .. } => {
                Record::from_json(e.key.ty, &record.json)
                    .unwrap()
                    .get_named("name")
                    .cloned()
            }
            Op::Delete { .. } => None,
        }
    }

    fn replay(r: Record) -> Op {
        Op::Replay {
            record: Outbound::new(&r, vec![]),
            letter: 1,
        }
    }

    /// The merge table: what stands when a key gets a second change in
    /// one epoch.
    #[test]
    fn a_replay_never_replaces_a_source_change() {
        let k = key("tags", "1");
        let ty = k.ty;
        let kind = |op: &Op| match op {
            Op::Upsert { .. } => "upsert",
            Op::Delete { basis: Some(_) } => "delete+basis",
            Op::Delete { basis: None } => "delete",
            Op::Replay { .. } => "replay",
        };
        let up = || upsert(rec("tags", "v2"));
        let del = || Op::Delete { basis: None };
        let rp = || replay(rec("tags", "v1"));
        let cases: Vec<(Op, Op, &str)> = vec![
            (up(), rp(), "upsert"),
            (del(), rp(), "delete"),
            (rp(), up(), "upsert"),
            (rp(), del(), "delete"),
            (rp(), rp(), "replay"),
            (up(), del(), "delete+basis"),
            (up(), up(), "upsert"),
            (del(), up(), "upsert"),
        ];
        for (old, new, want) in cases {
            let what = format!("{} then {}", kind(&old), kind(&new));
            let (op, _) = merge(ty, (old, Resend::Changed), (new, Resend::Changed));
            assert_eq!(kind(&op), want, "{what}");
        }
        // The source's version is the one kept, by content too.
        let mut e = Epoch::new();
        e.add(k.clone(), up(), Resend::Changed);
        e.add(k.clone(), rp(), Resend::Changed);
        let got = e.take_type(ty);
        assert_eq!(got.len(), 1);
        assert_eq!(name_of(&got[0]), Some(Json::Str("v2".into())));
        // A delete after a replay is not built from the replayed record
        // (it never reached Cobi).
        let (op, _) = merge(ty, (rp(), Resend::Changed), (del(), Resend::Changed));
        assert!(matches!(op, Op::Delete { basis: None }));
        // force (snapshot --force) survives a newer source version, and a
        // change is not demoted by a later re-read of the same row.
        let (_, r) = merge(ty, (up(), Resend::Forced), (up(), Resend::Changed));
        assert_eq!(r, Resend::Forced);
        let (_, r) = merge(ty, (up(), Resend::Changed), (up(), Resend::Reread));
        assert_eq!(r, Resend::Changed);
        let (_, r) = merge(ty, (up(), Resend::Reread), (up(), Resend::Reread));
        assert_eq!(r, Resend::Reread);
    }

    #[test]
    fn replaced_entries_give_their_bytes_back() {
        let mut e = Epoch::new();
        let k = key("tags", "1");
        e.add(k.clone(), upsert(rec("tags", "x")), Resend::Changed);
        let one = e.bytes();
        for _ in 0..100 {
            e.add(k.clone(), upsert(rec("tags", "x")), Resend::Changed);
        }
        assert_eq!(e.bytes(), one, "one key's versions count once");
        assert!(!e.is_full(usize::MAX, one + 1));
        e.take_type(k.ty);
        assert_eq!(e.bytes(), 0);
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
                Resend::Changed,
            );
        }
        assert!(e.is_full(10, usize::MAX));
        assert!(!e.is_full(11, usize::MAX));
        assert!(e.is_full(1000, 100));
    }
}
