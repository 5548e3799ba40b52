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

use std::collections::BTreeMap;

use super::layout::{err, PREFIX};
use super::ranges;
use super::{KeyState, StateError};

/// Bytes of journal records per entry (about).
const CHUNK_BYTES: usize = 32 * 1024;

/// Memory a held-back key write is counted for, beside its key and image
/// (the map's node share, the state).
const ENTRY_OVERHEAD: usize = 64;

/// Held-back memory at which an apply writes the pending keys to their
/// pages. About 45 000 keys with a 100-byte delete image each, 120 000
/// without.
pub const DRAIN_BYTES: usize = 8 * 1024 * 1024;

/// Keys written to the journal and not yet to their pages: `[mapping
/// prefix][key code]` → the newest state (`None`: removed).
#[derive(Default)]
pub struct Pending {
    keys: BTreeMap<Vec<u8>, Option<KeyState>>,
    bytes: usize,
    /// The number of the next journal entry.
    next: u64,
}

fn weight(key: &[u8], state: &Option<KeyState>) -> usize {
    let image = state
        .as_ref()
        .and_then(|s| s.delete_image.as_ref())
        .map_or(0, |i| i.len());
    key.len() + image + ENTRY_OVERHEAD
}

/// Appends one record: `[mapping prefix][0 + code | 1 + slot]`.
fn put_record(key: &[u8], state: &Option<KeyState>, out: &mut Vec<u8>) {
    let (prefix, code) = key.split_at(PREFIX);
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

/// The records of one journal entry, or `None` if damaged.
fn records(mut b: &[u8]) -> Option<Vec<(Vec<u8>, Option<KeyState>)>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let prefix = b.get(..PREFIX)?;
        let tag = *b.get(PREFIX)?;
        let rest = &b[PREFIX + 1..];
        let (code, state, used) = match tag {
            0 => {
                let n = super::keycode::len(rest)?;
                (&rest[..n], None, n)
            }
            1 => {
                let s = ranges::slot_at(rest)?;
                (s.code, Some(s.state()), s.bytes.len())
            }
            _ => return None,
        };
        let mut key = Vec::with_capacity(PREFIX + code.len());
        key.extend_from_slice(prefix);
        key.extend_from_slice(code);
        out.push((key, state));
        b = &rest[used..];
    }
    Some(out)
}

impl Pending {
    /// Reads the journal back.
    pub fn load(journal: &sled::Tree) -> Result<Pending, StateError> {
        let mut p = Pending::default();
        for item in journal.iter() {
            let (k, v) = item.map_err(err("read"))?;
            let n = <[u8; 8]>::try_from(k.as_ref()).map_err(|_| super::layout::damaged())?;
            p.next = u64::from_be_bytes(n) + 1;
            for (key, state) in records(&v).ok_or_else(super::layout::damaged)? {
                p.hold(key, state);
            }
        }
        Ok(p)
    }

    fn hold(&mut self, key: Vec<u8>, state: Option<KeyState>) {
        self.bytes += weight(&key, &state);
        if let Some(old) = self.keys.insert(key.clone(), state) {
            self.bytes -= weight(&key, &old);
        }
    }

    /// Writes key writes (`[prefix][code]`, state) to the journal, then
    /// holds them.
    pub fn record(
        &mut self,
        journal: &sled::Tree,
        writes: Vec<(Vec<u8>, Option<KeyState>)>,
    ) -> Result<(), StateError> {
        let mut chunk = Vec::with_capacity(CHUNK_BYTES + 512);
        let put = |chunk: &mut Vec<u8>, next: &mut u64| {
            journal
                .insert(next.to_be_bytes(), chunk.as_slice())
                .map_err(err("write"))?;
            *next += 1;
            chunk.clear();
            Ok::<(), StateError>(())
        };
        for (key, state) in &writes {
            put_record(key, state, &mut chunk);
            if chunk.len() >= CHUNK_BYTES {
                put(&mut chunk, &mut self.next)?;
            }
        }
        if !chunk.is_empty() {
            put(&mut chunk, &mut self.next)?;
        }
        for (key, state) in writes {
            self.hold(key, state);
        }
        Ok(())
    }

    /// The pending state of a key (`Some(None)`: removed), if it has one.
    pub fn get(&self, key: &[u8]) -> Option<&Option<KeyState>> {
        self.keys.get(key)
    }

    /// The pending keys of one mapping, in key order.
    pub fn of_mapping<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> impl Iterator<Item = (&'a [u8], &'a Option<KeyState>)> + 'a {
        self.keys
            .range(prefix.to_vec()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(k, s)| (&k[PREFIX..], s))
    }

    /// Whether the held-back writes have reached `limit` bytes.
    pub fn is_full(&self, limit: usize) -> bool {
        self.bytes >= limit
    }

    /// Keys held back.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether nothing is held back.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Every pending key in key order, as `(prefix, code, state)`.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8], &Option<KeyState>)> {
        self.keys.iter().map(|(k, s)| {
            let (p, c) = k.split_at(PREFIX);
            (p, c, s)
        })
    }

    /// After the pending keys are written to their pages: removes their
    /// journal entries (oldest first, so a crash leaves the newest ones)
    /// and forgets them.
    pub fn drained(&mut self, journal: &sled::Tree) -> Result<(), StateError> {
        for item in journal.iter() {
            let (k, _) = item.map_err(err("read"))?;
            journal.remove(k).map_err(err("write"))?;
        }
        self.keys.clear();
        self.bytes = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::KeyStatus;

    fn key(prefix: u8, source: &str) -> Vec<u8> {
        let mut k = vec![prefix; PREFIX];
        k.extend_from_slice(&super::super::keycode::code(source));
        k
    }

    fn state(fp: u64, image: Option<&str>) -> Option<KeyState> {
        Some(KeyState {
            status: KeyStatus::Accepted,
            fingerprint: fp,
            delete_image: image.map(|i| bytes::Bytes::copy_from_slice(i.as_bytes())),
        })
    }

    #[test]
    fn records_read_back_as_written() {
        let writes = vec![
            (key(1, "a"), state(7, None)),
            (key(1, "b"), None),
            (
                key(2, "0f5e2b7c-1d7e-4a59-8d1c-3f1a0e9b2c44"),
                state(9, Some("img")),
            ),
        ];
        let mut b = Vec::new();
        for (k, s) in &writes {
            put_record(k, s, &mut b);
        }
        assert_eq!(records(&b), Some(writes));
        assert_eq!(records(&b[..b.len() - 1]), None, "a cut record is damage");
    }

    #[test]
    fn the_journal_is_read_back_newest_last_and_counted_once() {
        let db = sled::Config::new().temporary(true).open().expect("db");
        let j = db.open_tree("journal").expect("tree");
        let mut p = Pending::default();
        p.record(&j, vec![(key(1, "a"), state(1, None))])
            .expect("record");
        p.record(
            &j,
            vec![(key(1, "a"), state(2, Some("x"))), (key(1, "b"), None)],
        )
        .expect("record");
        let again = Pending::load(&j).expect("load");
        assert_eq!(again.get(&key(1, "a")), Some(&state(2, Some("x"))));
        assert_eq!(again.get(&key(1, "b")), Some(&None));
        assert_eq!(again.bytes, p.bytes);
        assert_eq!(again.next, 2);
        p.drained(&j).expect("drain");
        assert!(p.is_empty() && j.is_empty());
        assert_eq!(p.bytes, 0);
    }

    #[test]
    fn large_writes_are_cut_into_entries_of_about_chunk_bytes() {
        let db = sled::Config::new().temporary(true).open().expect("db");
        let j = db.open_tree("journal").expect("tree");
        let image = "i".repeat(200);
        let writes: Vec<_> = (0..1000)
            .map(|i| (key(3, &format!("k{i}")), state(i, Some(&image))))
            .collect();
        Pending::default().record(&j, writes).expect("record");
        assert!(j.len() > 1);
        for v in j.iter().values() {
            assert!(v.expect("value").len() < CHUNK_BYTES + 512);
        }
        assert_eq!(Pending::load(&j).expect("load").keys.len(), 1000);
    }
}
