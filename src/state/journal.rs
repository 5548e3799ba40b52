//! Range-page key writes held back from their pages: in memory
//! ([`Pending`]) and, durably, in a journal file beside the sled database
//! ([`JOURNAL_FILE`]), until enough have gathered to write them to their
//! pages in key order (the store's drain).
//!
//! Why: a burst of random (UUID) keys rewrites one page per key, and each
//! rewrite pulls a sled node back from the log — over a million keys,
//! ~10 000 nodes of 8–16 pages each, none of them cached for long. Written
//! together and in key order, the keys of many applies share each page
//! rewrite and each node pull.
//!
//! Why a file of its own: in a sled tree, the journal's bytes stayed in
//! sled's memory as well as in [`Pending`] (state-store bench: +30 MiB
//! peak RSS and +10 % CPU per key for a 32 MiB journal).
//!
//! Safety: an apply appends its held-back key writes to the journal (one
//! frame, length and CRC first) and, when it writes checkpoints, makes the
//! journal durable (`fdatasync`) before them: a checkpoint that survives
//! a crash implies every journal frame before it did. Opening the store
//! reads the journal back, up to its first incomplete frame (cut off). A
//! drain writes the pages and flushes sled before it empties the journal:
//! a crash in between leaves the journal over drained pages, read again
//! and written again (later writes of a key win). Lookups and scans see
//! the pending state before the pages', so a key held back stays held
//! back until a drain: writing it to its page directly would be hidden
//! by, then overwritten with, its older held-back state.
//!
//! Integer keys are not held back: their pages take consecutive keys,
//! which a snapshot writes together anyway. Nor are range keys that
//! crowd their pages ([`write_at_once`]): a snapshot read in key order
//! (UUID, text and composite keys too) appends each apply's keys to the
//! mapping's last page.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use hashbrown::HashTable;

use super::layout::{damaged, PREFIX};
use super::{keycode, ranges};
use super::{KeyState, KeyStatus, StateError};

/// The journal's file name in the state directory.
pub const JOURNAL_FILE: &str = "cobi-journal";

/// Bytes of a frame's header: payload length and CRC-32, little-endian.
const FRAME_HEAD: usize = 8;

/// Held-back bytes (records, and their index) at which an apply writes
/// the pending keys to their pages: ~200 000 keys with a 100-byte delete
/// image each, ~600 000 without.
pub const DRAIN_BYTES: usize = 32 * 1024 * 1024;

/// Keys per page from which an apply writes a mapping's range keys to
/// their pages at once rather than holding them back (see
/// [`write_at_once`]): well above what a drain of random keys gathers in
/// a page (~1–5 in the e2e bench's burst), well below what one apply of
/// a snapshot read in key order brings to the mapping's last page
/// (thousands).
pub const CROWDED: usize = 8;

/// Whether an apply's writes to one mapping's range keys skip the
/// journal and go to their pages at once (but those held back already,
/// see below): `keys` writes falling in `pages` distinct pages, at least
/// [`CROWDED`] a page — a snapshot read in key order appends thousands of
/// keys to the mapping's last page, which holding back would only copy to
/// the journal, sort and write later all the same. Scattered writes
/// (random inserts, a key or a few a page) are held back, so that a drain
/// rewrites each page once for many of them.
///
/// A key held back already is held back again whatever this says: the
/// next drain writes every held key's held state to its page, over any
/// newer state written there directly.
///
/// Not at once: the changed records of a re-copy in key order over pages
/// already written (~6 keys a page with delete images; unchanged records
/// write no state, see `sink::verdicts::accepted`). Each of its applies
/// covers a run of
/// neighbouring pages, as a drain would, but so does a burst of random
/// keys into a small store, and which one an apply is cannot be told
/// without reading the pages.
pub fn write_at_once(keys: usize, pages: usize) -> bool {
    keys >= CROWDED * pages.max(1)
}

/// Room kept beyond [`DRAIN_BYTES`] for the apply that crosses it.
pub const SLACK_BYTES: usize = 2 * 1024 * 1024;

/// Key bytes (prefix and the start of the code) a drain sorts on before
/// it compares keys whole: a mapping's prefix and the tag and first 14
/// bytes of a UUID.
const HEAD_BYTES: usize = 24;

/// Index bytes per held-back key (an offset, with the table's slack).
const INDEX_BYTES: usize = 8;

/// Keys written to the journal and not yet to their pages.
///
/// Held as the journal's own records, one after the other in `arena` (a
/// key written again appends a new record), and an index from each key
/// to its newest record: ~50 bytes a key beside its delete image, against
/// ~150 as a map of owned keys and states.
pub struct Pending {
    /// Journal records, oldest first.
    arena: Vec<u8>,
    /// Offset in `arena` of each key's newest record, hashed by key.
    index: HashTable<u32>,
    /// The journal file (appended to), and its path for errors.
    file: File,
    path: std::path::PathBuf,
    /// Whether frames were appended since the last `fdatasync`.
    unsynced: bool,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> StateError + 'a {
    move |e| StateError {
        op,
        detail: format!("{}: {e}", path.display()),
    }
}

/// The frames at the start of `b` that are whole and intact: their
/// payloads, and the bytes they take.
fn whole_frames(b: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(head) = b.get(at..at + FRAME_HEAD) {
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
        let Some(payload) = b.get(at + FRAME_HEAD..at + FRAME_HEAD + len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        out.push(payload);
        at += FRAME_HEAD + len;
    }
    (out, at)
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
    /// Opens the journal in `dir` (created if need be) and reads it back,
    /// with room for `expected` bytes of records (taken as they are
    /// written). A frame cut short by a crash, and anything after it, is
    /// cut off: no checkpoint depends on it.
    pub fn open(dir: &Path, expected: usize) -> Result<Pending, StateError> {
        let path = dir.join(JOURNAL_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(io_err("read", &path))?;
        let (frames, whole) = whole_frames(&bytes);
        if whole < bytes.len() {
            file.set_len(whole as u64).map_err(io_err("write", &path))?;
            tracing::warn!(
                bytes = bytes.len() - whole,
                file = %path.display(),
                "state journal: an incomplete last write (a crash) was cut off"
            );
        }
        // Created now, or left by a process killed before its sync: make
        // the file's entry and its frames durable before anything builds
        // on them.
        if let Some(parent) = path.parent() {
            File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(io_err("flush", parent))?;
        }
        let mut p = Pending {
            arena: Vec::with_capacity(whole.max(expected)),
            index: HashTable::new(),
            file,
            path,
            unsynced: whole > 0,
        };
        for payload in frames {
            let from = p.arena.len();
            p.arena.extend_from_slice(payload);
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

    /// Appends key writes (`(mapping prefix, key code, state)`; `None`:
    /// removed) to the journal as one frame, then holds them.
    pub fn record_writes<'w>(
        &mut self,
        writes: impl Iterator<Item = (&'w [u8], Vec<u8>, Option<&'w KeyState>)>,
    ) -> Result<(), StateError> {
        let from = self.arena.len();
        for (prefix, code, state) in writes {
            put_record(prefix, &code, state, &mut self.arena);
        }
        let payload = &self.arena[from..];
        if payload.is_empty() {
            return Ok(());
        }
        let too_large = || StateError {
            op: "write",
            detail: format!("{}: over 4 GiB held back", self.path.display()),
        };
        let (Ok(len), Ok(_)) = (
            u32::try_from(payload.len()),
            u32::try_from(self.arena.len()),
        ) else {
            self.arena.truncate(from);
            return Err(too_large());
        };
        let mut head = [0u8; FRAME_HEAD];
        head[..4].copy_from_slice(&len.to_le_bytes());
        head[4..].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
        // Two writes: a crash between them leaves a head without its
        // payload, cut off when the journal is read back.
        let io = io_err("write", &self.path);
        let before = self.file.metadata().map_err(&io)?.len();
        let written = self
            .file
            .write_all(&head)
            .and_then(|()| self.file.write_all(payload));
        if let Err(e) = written {
            // Undone, so that later frames follow whole ones.
            self.arena.truncate(from);
            let _ = self.file.set_len(before);
            return Err(io(e));
        }
        drop(io);
        self.unsynced = true;
        self.index_from(from).ok_or_else(damaged)
    }

    /// Makes the journal durable (before checkpoints that depend on it).
    pub fn sync(&mut self) -> Result<(), StateError> {
        if self.unsynced {
            self.file.sync_data().map_err(io_err("flush", &self.path))?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// The pending state of a key (`Some(None)`: removed), if it has one.
    pub fn get(&self, prefix: &[u8], code: &[u8]) -> Option<Option<KeyState>> {
        let at = self.newest(prefix, code)?;
        Some(self.record(at).slot.map(|s| s.state()))
    }

    /// Whether a key is held back (written or removed).
    pub fn holds(&self, prefix: &[u8], code: &[u8]) -> bool {
        !self.index.is_empty() && self.newest(prefix, code).is_some()
    }

    /// The offset of a key's newest record, if it is held back.
    fn newest(&self, prefix: &[u8], code: &[u8]) -> Option<u32> {
        self.index
            .find(hash(prefix, code), |o| {
                let r = self.record(*o);
                r.prefix == prefix && r.code == code
            })
            .copied()
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
    ///
    /// Sorted on each key's first [`HEAD_BYTES`] bytes, copied beside its
    /// record's offset (no record read per comparison: those reads missed
    /// the cache and took ~10 % of an initial sync's CPU); keys whose
    /// heads are equal are then compared whole.
    pub fn sorted(&self) -> Vec<u32> {
        let mut heads: Vec<([u64; 3], u32)> =
            self.index.iter().map(|&at| (self.head(at), at)).collect();
        heads.sort_unstable_by(|(ha, a), (hb, b)| {
            ha.cmp(hb).then_with(|| {
                let (a, b) = (self.record(*a), self.record(*b));
                (a.prefix, a.code).cmp(&(b.prefix, b.code))
            })
        });
        heads.into_iter().map(|(_, at)| at).collect()
    }

    /// The first [`HEAD_BYTES`] bytes of the key (prefix, then code) of
    /// the record at `at`, zero-padded, as big-endian words: words compare
    /// like the bytes they hold.
    fn head(&self, at: u32) -> [u64; 3] {
        let r = self.record(at);
        let mut b = [0u8; HEAD_BYTES];
        let (p, c) = b.split_at_mut(PREFIX);
        p.copy_from_slice(r.prefix);
        let n = r.code.len().min(c.len());
        c[..n].copy_from_slice(&r.code[..n]);
        let word = |i: usize| u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        [word(0), word(1), word(2)]
    }

    /// The key of a record of [`Pending::sorted`]: `(prefix, code)`.
    pub fn key_at(&self, record: u32) -> (&[u8], &[u8]) {
        let r = self.record(record);
        (r.prefix, r.code)
    }

    /// The key and state of a record of [`Pending::sorted`]: `(prefix,
    /// code, state)`.
    pub fn at(&self, record: u32) -> (&[u8], &[u8], Option<KeyState>) {
        let r = self.record(record);
        (r.prefix, r.code, r.slot.map(|s| s.state()))
    }

    /// After the pending keys are written to their pages and those are
    /// durable: empties the journal and forgets them.
    pub fn drained(&mut self) -> Result<(), StateError> {
        let io = io_err("write", &self.path);
        self.file.set_len(0).map_err(&io)?;
        self.file.sync_data().map_err(io)?;
        self.unsynced = false;
        // Capacity kept: refilled by the next applies without growing
        // (each growth of a large buffer is a copy onto fresh pages).
        self.arena.clear();
        self.index.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_crowding_their_pages_go_to_them_at_once() {
        let cases = [
            // (keys, pages, at once?, why)
            (4_000, 1, true, "a snapshot chunk appended to the last page"),
            (8, 0, true, "no page yet: the mapping's first keys"),
            (4_000, 500, true, "8 keys a page: more than a drain gathers"),
            (4_000, 501, false, "under 8 keys a page: held back"),
            (4_000, 3_900, false, "random inserts: a key a page"),
            (3_000, 600, false, "a re-copy over written pages: held back"),
            (
                7,
                1,
                false,
                "a few keys: held back, the drain sorts them in",
            ),
            (0, 0, false, "nothing left to write"),
        ];
        for (keys, pages, want, why) in cases {
            assert_eq!(write_at_once(keys, pages), want, "{why}");
        }
    }

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

    /// A key write: `((prefix, code), state)`.
    type KeyWrite = ((Vec<u8>, Vec<u8>), Option<KeyState>);

    fn record(p: &mut Pending, writes: &[KeyWrite]) {
        p.record_writes(
            writes
                .iter()
                .map(|((p, c), s)| (p.as_slice(), c.clone(), s.as_ref())),
        )
        .expect("record");
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
        let mut starts = Vec::new();
        for ((p, c), s) in &writes {
            starts.push(b.len());
            put_record(p, c, s.as_ref(), &mut b);
        }
        let ends = starts.iter().skip(1).copied().chain([b.len()]);
        for ((((p, c), s), at), end) in writes.iter().zip(&starts).zip(ends) {
            let r = record_at(&b[*at..]).expect("a record");
            assert_eq!((r.prefix, r.code), (p.as_slice(), c.as_slice()));
            assert_eq!(r.slot.map(|s| s.state()), *s);
            assert_eq!(at + r.len, end);
        }
        assert!(
            record_at(&b[starts[2]..b.len() - 1]).is_none(),
            "a cut record is damage"
        );
    }

    #[test]
    fn sorted_lists_keys_in_key_order_where_their_heads_are_equal_too() {
        let long = "customer-2026-campus-north-building-7";
        let mut sources: Vec<String> = (0..40).map(|i| format!("{long}-{i}")).collect();
        sources.extend(["a", "ab", "b", "0f5e2b7c-1d7e-4a59-8d1c-3f1a0e9b2c44"].map(String::from));
        // Integer codes, some with zero bytes inside their heads.
        sources.extend(["0", "255", "256", "65536", "a\u{0}b"].map(String::from));
        sources.extend((0..20).map(|i| format!("{:08x}-1d7e-4a59-8d1c-3f1a0e9b2c44", i * 7919)));
        let mut keys: Vec<(Vec<u8>, Vec<u8>)> = [3u8, 1, 2]
            .iter()
            .flat_map(|&p| sources.iter().map(move |s| key(p, s)))
            .collect();
        // Written in an order unlike the key order: every 7th, wrapping.
        let n = keys.len();
        let order: Vec<usize> = (0..n).map(|i| (i * 7) % n).collect();
        assert!(n % 7 != 0, "a permutation");
        let dir = tempfile::tempdir().unwrap();
        let mut p = Pending::open(dir.path(), 0).unwrap();
        let writes: Vec<KeyWrite> = order
            .iter()
            .map(|&i| (keys[i].clone(), state(i as u64, None)))
            .collect();
        record(&mut p, &writes);
        let listed: Vec<(Vec<u8>, Vec<u8>)> = p
            .sorted()
            .into_iter()
            .map(|r| {
                let (p, c) = p.key_at(r);
                (p.to_vec(), c.to_vec())
            })
            .collect();
        keys.sort();
        assert_eq!(listed, keys);
    }

    #[test]
    fn the_newest_write_of_a_key_wins_in_memory_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Pending::open(dir.path(), 0).unwrap();
        record(
            &mut p,
            &[(key(1, "a"), state(1, None)), (key(2, "a"), state(5, None))],
        );
        record(
            &mut p,
            &[(key(1, "a"), state(2, Some("x"))), (key(1, "b"), None)],
        );
        p.sync().unwrap();
        let again = Pending::open(dir.path(), 0).unwrap();
        for p in [&p, &again] {
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
            let order: Vec<_> = p
                .sorted()
                .into_iter()
                .map(|r| p.at(r))
                .map(|(p, c, _)| (p[0], c.to_vec()))
                .collect();
            assert_eq!(
                order,
                vec![(1, a.1.clone()), (1, b.1.clone()), (2, other.1)]
            );
            let mut listed = p.of_mapping(&a.0);
            listed.sort_by(|x, y| x.0.cmp(&y.0));
            assert_eq!(listed, vec![(a.1, Some(KeyStatus::Accepted)), (b.1, None)]);
        }
        p.drained().unwrap();
        assert!(p.is_empty() && !p.is_full(1));
        drop((p, again));
        assert!(Pending::open(dir.path(), 0).unwrap().is_empty());
    }

    #[test]
    fn a_frame_cut_short_by_a_crash_is_cut_off_and_later_writes_follow_the_whole_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let mut p = Pending::open(dir.path(), 0).unwrap();
        record(&mut p, &[(key(1, "a"), state(1, None))]);
        let whole = std::fs::metadata(&path).unwrap().len();
        record(&mut p, &[(key(1, "b"), state(2, Some("image")))]);
        drop(p);
        // The second frame cut short, or with a byte flipped: dropped.
        let full = std::fs::read(&path).unwrap();
        for damage in [full[..full.len() - 3].to_vec(), {
            let mut f = full.clone();
            *f.last_mut().unwrap() ^= 0xff;
            f
        }] {
            std::fs::write(&path, &damage).unwrap();
            let mut p = Pending::open(dir.path(), 0).unwrap();
            assert_eq!(p.len(), 1);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
            record(&mut p, &[(key(1, "c"), state(3, None))]);
            drop(p);
            let p = Pending::open(dir.path(), 0).unwrap();
            let c = key(1, "c");
            assert_eq!(p.get(&c.0, &c.1), Some(state(3, None)));
            assert_eq!(p.len(), 2);
        }
    }

    #[test]
    fn the_drain_threshold_counts_records_and_index() {
        let dir = tempfile::tempdir().unwrap();
        let image = "i".repeat(200);
        let writes: Vec<_> = (0..1000)
            .map(|i| (key(3, &format!("k{i}")), state(i, Some(&image))))
            .collect();
        let mut p = Pending::open(dir.path(), 0).unwrap();
        record(&mut p, &writes);
        assert!(p.is_full(1000 * 200) && !p.is_full(1000 * 300));
        assert_eq!(Pending::open(dir.path(), 0).unwrap().len(), 1000);
    }
}
