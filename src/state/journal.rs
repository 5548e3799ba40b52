//! Range-page key writes held back from their pages: in memory
//! ([`Pending`]) and, durably, in the `journal` tree, until enough have
//! gathered to write them to their pages in key order ([`Pending::drain`]).
//!
//! Why: a burst of random (UUID) keys rewrites one page per key, and each
//! rewrite pulls a sled node back from the log — over a million keys,
//! ~10 000 nodes of 8–16 pages each, none of them cached for long. Written
//! together and in key order, the keys of many applies share each page
//! rewrite and each node pull.
//!
//! Safety: an apply writes its key writes to the journal (chunks of
//! [`CHUNK_BYTES`], numbered in order) before its checkpoints, so a
//! checkpoint that survives a crash implies its journal entries did
//! (sled recovers a prefix of its log). Opening the store reads the
//! journal back into memory. A drain writes the pages first, then removes
//! the journal entries in order: a crash in between leaves newer entries
//! than the pages hold, or the same, read again on open and written again
//! at the next drain. Lookups and scans see the pending state before the
//! pages'.
//!
//! Integer keys are not held back: their pages take consecutive keys,
//! which a snapshot writes together anyway.

use hashbrown::HashTable;

use super::layout::{damaged, err, PREFIX};
use super::{keycode, ranges};
use super::{KeyState, KeyStatus, StateError};

/// Bytes of journal records per entry (about).
const CHUNK_BYTES: usize = 32 * 1024;

/// Held-back bytes (records, and their index) at which an apply writes
/// the pending keys to their pages: ~200 000 keys with a 100-byte delete
/// image each, ~600 000 without.
pub const DRAIN_BYTES: usize = 32 * 1024 * 1024;

/// Index bytes per held-back key (an offset, with the table's slack).
const INDEX_BYTES: usize = 8;

/// Keys written to the journal and not yet to their pages.
///
/// Held as the journal's own records, one after the other in `arena` (a
/// key written again appends a new record), and an index from each key
/// to its newest record: ~50 bytes a key beside its delete image, against
/// ~150 as a map of owned keys and states.
#[derive(Default)]
pub struct Pending {
    /// Journal records, oldest first.
    arena: Vec<u8>,
    /// Offset in `arena` of each key's newest record, hashed by key.
    index: HashTable<u32>,
    /// The number of the next journal entry.
    next: u64,
}

/// One record: `[mapping prefix][0][code]` (removed) or `[mapping
/// prefix][1][slot]` ([`ranges::put_slot`]).
struct Record<'a> {
    prefix: &'a [u8],
    code: &'a [u8],
    /// `None`: removed.
    slot: Option<ranges::Slot<'a>>,
    /// Its length in bytes.
    len: usize,
}

/// The record at the start of `b`, or `None` if damaged.
fn record_at(b: &[u8]) -> Option<Record<'_>> {
    let prefix = b.get(..PREFIX)?;
    let rest = b.get(PREFIX + 1..)?;
    let (code, slot, used) = match b[PREFIX] {
        0 => {
            let n = keycode::len(rest)?;
            (&rest[..n], None, n)
        }
        1 => {
            let s = ranges::slot_at(rest)?;
            (s.code, Some(s), s.bytes.len())
        }
        _ => return None,
    };
    Some(Record {
        prefix,
        code,
        slot,
        len: PREFIX + 1 + used,
    })
}

/// Appends a record.
fn put_record(prefix: &[u8], code: &[u8], state: Option<&KeyState>, out: &mut Vec<u8>) {
    out.extend_from_slice(prefix);
    match state {
        None => {
            out.push(0);
            out.extend_from_slice(code);
        }
        Some(s) => {
            out.push(1);
            ranges::put_slot(code, s, out);
        }
    }
}

fn hash(prefix: &[u8], code: &[u8]) -> u64 {
    let seed = xxhash_rust::xxh3::xxh3_64(prefix);
    xxhash_rust::xxh3::xxh3_64_with_seed(code, seed)
}

impl Pending {
    /// Reads the journal back.
    pub fn load(journal: &sled::Tree) -> Result<Pending, StateError> {
        let mut p = Pending::default();
        for item in journal.iter() {
            let (k, v) = item.map_err(err("read"))?;
            let n = <[u8; 8]>::try_from(k.as_ref()).map_err(|_| damaged())?;
            p.next = u64::from_be_bytes(n) + 1;
            let from = p.arena.len();
            p.arena.extend_from_slice(&v);
            p.index_from(from).ok_or_else(damaged)?;
        }
        Ok(p)
    }

    fn record(&self, at: u32) -> Record<'_> {
        record_at(&self.arena[at as usize..]).expect("records are checked when indexed")
    }

    /// Indexes the records from `from` to the end of the arena (`None`:
    /// damaged).
    fn index_from(&mut self, from: usize) -> Option<()> {
        let mut at = from;
        while at < self.arena.len() {
            let r = record_at(&self.arena[at..])?;
            let (h, len) = (hash(r.prefix, r.code), r.len);
            let off = u32::try_from(at).ok()?;
            let arena = &self.arena;
            let same = |o: &u32| {
                let other = record_at(&arena[*o as usize..]).expect("indexed");
                other.prefix == r.prefix && other.code == r.code
            };
            let rehash = |o: &u32| {
                let other = record_at(&arena[*o as usize..]).expect("indexed");
                hash(other.prefix, other.code)
            };
            match self.index.entry(h, same, rehash) {
                hashbrown::hash_table::Entry::Occupied(mut e) => *e.get_mut() = off,
                hashbrown::hash_table::Entry::Vacant(e) => {
                    e.insert(off);
                }
            }
            at += len;
        }
        Some(())
    }

    /// Writes key writes (`(mapping prefix, key code, state)`; `None`:
    /// removed) to the journal, then holds them.
    pub fn record_writes<'w>(
        &mut self,
        journal: &sled::Tree,
        writes: impl Iterator<Item = (&'w [u8], Vec<u8>, Option<&'w KeyState>)>,
    ) -> Result<(), StateError> {
        let from = self.arena.len();
        let mut chunk = from;
        for (prefix, code, state) in writes {
            put_record(prefix, &code, state, &mut self.arena);
            if self.arena.len() - chunk >= CHUNK_BYTES {
                self.put_entry(journal, chunk)?;
                chunk = self.arena.len();
            }
        }
        if self.arena.len() > chunk {
            self.put_entry(journal, chunk)?;
        }
        self.index_from(from).ok_or_else(damaged)
    }

    /// Writes the records from `from` to the end of the arena as the next
    /// journal entry.
    fn put_entry(&mut self, journal: &sled::Tree, from: usize) -> Result<(), StateError> {
        journal
            .insert(self.next.to_be_bytes(), &self.arena[from..])
            .map_err(err("write"))?;
        self.next += 1;
        Ok(())
    }

    /// The pending state of a key (`Some(None)`: removed), if it has one.
    pub fn get(&self, prefix: &[u8], code: &[u8]) -> Option<Option<KeyState>> {
        let at = self.index.find(hash(prefix, code), |o| {
            let r = self.record(*o);
            r.prefix == prefix && r.code == code
        })?;
        Some(self.record(*at).slot.map(|s| s.state()))
    }

    /// The pending keys of one mapping (key codes; `None`: removed).
    pub fn of_mapping(&self, prefix: &[u8]) -> Vec<(Vec<u8>, Option<KeyStatus>)> {
        self.index
            .iter()
            .map(|o| self.record(*o))
            .filter(|r| r.prefix == prefix)
            .map(|r| (r.code.to_vec(), r.slot.map(|s| s.status)))
            .collect()
    }

    /// Whether the held-back writes have reached `limit` bytes.
    pub fn is_full(&self, limit: usize) -> bool {
        self.arena.len() + self.index.len() * INDEX_BYTES >= limit
    }

    /// Whether nothing is held back.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Keys held back.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// The records of every pending key, in key order (see
    /// [`Pending::at`]): 4 bytes a key while they are written.
    pub fn sorted(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self.index.iter().copied().collect();
        out.sort_unstable_by(|a, b| {
            let (a, b) = (self.record(*a), self.record(*b));
            (a.prefix, a.code).cmp(&(b.prefix, b.code))
        });
        out
    }

    /// The key and state of a record of [`Pending::sorted`]: `(prefix,
    /// code, state)`.
    pub fn at(&self, record: u32) -> (&[u8], &[u8], Option<KeyState>) {
        let r = self.record(record);
        (r.prefix, r.code, r.slot.map(|s| s.state()))
    }

    /// After the pending keys are written to their pages: removes their
    /// journal entries (oldest first, so a crash leaves the newest ones)
    /// and forgets them.
    pub fn drained(&mut self, journal: &sled::Tree) -> Result<(), StateError> {
        for item in journal.iter() {
            let (k, _) = item.map_err(err("read"))?;
            journal.remove(k).map_err(err("write"))?;
        }
        self.arena = Vec::new();
        self.index = HashTable::new();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(prefix: u8, source: &str) -> (Vec<u8>, Vec<u8>) {
        (vec![prefix; PREFIX], keycode::code(source))
    }

    fn state(fp: u64, image: Option<&str>) -> Option<KeyState> {
        Some(KeyState {
            status: KeyStatus::Accepted,
            fingerprint: fp,
            delete_image: image.map(|i| bytes::Bytes::copy_from_slice(i.as_bytes())),
        })
    }

    fn record(
        p: &mut Pending,
        journal: &sled::Tree,
        writes: &[((Vec<u8>, Vec<u8>), Option<KeyState>)],
    ) {
        p.record_writes(
            journal,
            writes
                .iter()
                .map(|((p, c), s)| (p.as_slice(), c.clone(), s.as_ref())),
        )
        .expect("record");
    }

    fn journal() -> sled::Tree {
        let db = sled::Config::new().temporary(true).open().expect("db");
        db.open_tree("journal").expect("tree")
    }

    #[test]
    fn records_read_back_as_written_and_a_cut_one_is_damage() {
        let uuid = "0f5e2b7c-1d7e-4a59-8d1c-3f1a0e9b2c44";
        let writes = [
            (key(1, "a"), state(7, None)),
            (key(1, "b"), None),
            (key(2, uuid), state(9, Some("img"))),
        ];
        let mut b = Vec::new();
        for ((p, c), s) in &writes {
            put_record(p, c, s.as_ref(), &mut b);
        }
        let mut at = 0;
        for ((p, c), s) in &writes {
            let r = record_at(&b[at..]).expect("a record");
            assert_eq!((r.prefix, r.code), (p.as_slice(), c.as_slice()));
            assert_eq!(r.slot.map(|s| s.state()), *s);
            at += r.len;
        }
        assert_eq!(at, b.len());
        let last = b.len() - 1;
        assert!(
            record_at(&b[at - 20..last]).is_none(),
            "a cut record is damage"
        );
    }

    #[test]
    fn the_newest_write_of_a_key_wins_in_memory_and_read_back() {
        let j = journal();
        let mut p = Pending::default();
        record(
            &mut p,
            &j,
            &[(key(1, "a"), state(1, None)), (key(2, "a"), state(5, None))],
        );
        record(
            &mut p,
            &j,
            &[(key(1, "a"), state(2, Some("x"))), (key(1, "b"), None)],
        );
        for p in [&p, &Pending::load(&j).expect("load")] {
            let (a, b) = (key(1, "a"), key(1, "b"));
            assert_eq!(p.get(&a.0, &a.1), Some(state(2, Some("x"))));
            assert_eq!(p.get(&b.0, &b.1), Some(None));
            let other = key(2, "a");
            assert_eq!(
                p.get(&other.0, &other.1),
                Some(state(5, None)),
                "another mapping"
            );
            assert_eq!(p.get(&b.0, &key(1, "c").1), None, "never written");
            assert_eq!(p.len(), 3);
            assert_eq!(p.next, 2);
            let order: Vec<_> = p
                .sorted()
                .into_iter()
                .map(|r| p.at(r))
                .map(|(p, c, _)| (p[0], c.to_vec()))
                .collect();
            assert_eq!(
                order,
                vec![(1, a.1.clone()), (1, b.1.clone()), (2, other.1.clone())]
            );
            let mut listed = p.of_mapping(&a.0);
            listed.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(
                listed,
                vec![(a.1.clone(), Some(KeyStatus::Accepted)), (b.1, None)]
            );
        }
        p.drained(&j).expect("drain");
        assert!(p.is_empty() && j.is_empty());
        assert!(!p.is_full(1));
    }

    #[test]
    fn large_writes_are_cut_into_entries_of_about_chunk_bytes() {
        let j = journal();
        let image = "i".repeat(200);
        let writes: Vec<_> = (0..1000)
            .map(|i| (key(3, &format!("k{i}")), state(i, Some(&image))))
            .collect();
        let mut p = Pending::default();
        record(&mut p, &j, &writes);
        assert!(j.len() > 1);
        for v in j.iter().values() {
            assert!(v.expect("value").len() < CHUNK_BYTES + 512);
        }
        assert_eq!(Pending::load(&j).expect("load").len(), 1000);
        assert!(p.is_full(1000 * 200) && !p.is_full(1000 * 300));
    }
}
