//! Hashed pages: how [`super::SledStore`] keeps the states of keys that
//! are not integers (UUIDs, text, composite keys).
//!
//! A UUID-keyed table gets the same treatment as an integer-keyed one: a
//! few hundred bytes to a few KiB of neighbouring states per sled entry,
//! not one entry per record. Neighbours are by hash: a key's place is the
//! xxh3 hash of its [`super::keycode`] code, and a mapping's hash space
//! `0..=u64::MAX` is cut into ranges, one page each. A page's sled key is
//! `[type][mapping hash][0xFE][start, 8 bytes big-endian]`; it covers the
//! hashes from its start up to the next page's start. A mapping starts
//! with one page at 0; a page whose bytes pass [`MAX_BYTES`] after a write
//! is cut into pieces of about [`TARGET_BYTES`] at hash boundaries
//! ([`split`]), so pages stay small whatever the table's size. Keys whose
//! hashes collide always share a page (and are told apart by their codes).
//!
//! Encoding: `[1]` then slots, each `[key code][status][fingerprint: u64
//! BE][varint image length + 1, or 0][image]`, in no particular order.
//!
//! Crash safety. A split writes the new upper pieces first and rewrites
//! the lower page last. A crash between leaves the old page whole next to
//! the new pieces: the copies it still holds of keys above its range are
//! never consulted (a key is looked up in the page covering its hash) and
//! are dropped by the next rewrite ([`rebuild`] keeps only slots in the
//! page's range) and skipped by scans. Pages are never removed, so such a
//! leftover can never come back into range.

use rustc_hash::FxHashMap;

use super::keycode::{self, get_varint, put_varint};
use super::{decode_fixed, encode_fixed, KeyState, KeyStatus, FIXED_BYTES};

/// Marks a hashed page key after the mapping prefix (never in UTF-8, and
/// below [`super::pages::PAGE_MARK`]).
pub const MARK: u8 = 0xFE;

/// First byte of an encoded page (format version).
const VERSION: u8 = 1;

/// A page is split once a write makes it larger than this.
pub const MAX_BYTES: usize = 2048;

/// Pieces of a split page are about this large.
pub const TARGET_BYTES: usize = MAX_BYTES / 2;

/// The hash that places a key code (xxh3; tests substitute colliding ones).
pub type Hasher = fn(&[u8]) -> u64;

/// The product's hasher.
pub fn xxh3(code: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(code)
}

/// The page key of the page starting at `start` under a mapping prefix.
pub fn page_key(prefix: &[u8], start: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 9);
    k.extend_from_slice(prefix);
    k.push(MARK);
    k.extend_from_slice(&start.to_be_bytes());
    k
}

/// The start of a hashed page key (`None` if it is not one).
pub fn start_of_key(prefix_len: usize, key: &[u8]) -> Option<u64> {
    let rest = key.get(prefix_len..)?;
    if rest.len() != 9 || rest[0] != MARK {
        return None;
    }
    Some(u64::from_be_bytes(rest[1..].try_into().ok()?))
}

/// An empty page.
pub fn empty() -> Vec<u8> {
    vec![VERSION]
}

/// One slot of an encoded page, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot<'a> {
    /// The key code.
    pub code: &'a [u8],
    /// Accepted or dead-lettered.
    pub status: KeyStatus,
    /// Fingerprint.
    pub fingerprint: u64,
    /// The delete image, if kept.
    pub image: Option<&'a [u8]>,
    /// The slot's bytes as stored.
    pub bytes: &'a [u8],
}

impl Slot<'_> {
    /// The key state the slot stands for.
    pub fn state(&self) -> KeyState {
        KeyState {
            status: self.status,
            fingerprint: self.fingerprint,
            delete_image: self.image.map(bytes::Bytes::copy_from_slice),
        }
    }
}

/// Reads the slot at the start of `b`.
fn slot_at(b: &[u8]) -> Option<Slot<'_>> {
    let k = keycode::len(b)?;
    let (status, fingerprint) = decode_fixed(b.get(k..)?)?;
    let at = k + FIXED_BYTES;
    let (len, h) = get_varint(b.get(at..)?)?;
    let at = at + h;
    let (image, end) = if len == 0 {
        (None, at)
    } else {
        let end = at.checked_add(usize::try_from(len - 1).ok()?)?;
        (Some(b.get(at..end)?), end)
    };
    Some(Slot {
        code: &b[..k],
        status,
        fingerprint,
        image,
        bytes: &b[..end],
    })
}

/// The slots of an encoded page, or `None` if the bytes are not a page.
pub fn slots(page: &[u8]) -> Option<Vec<Slot<'_>>> {
    let (&v, mut rest) = page.split_first()?;
    if v != VERSION {
        return None;
    }
    let mut out = Vec::new();
    while !rest.is_empty() {
        let s = slot_at(rest)?;
        rest = &rest[s.bytes.len()..];
        out.push(s);
    }
    Some(out)
}

/// The slot of `code` in an encoded page: `Some(None)` if absent, `None`
/// if the bytes are not a page.
pub fn find<'a>(page: &'a [u8], code: &[u8]) -> Option<Option<Slot<'a>>> {
    let (&v, mut rest) = page.split_first()?;
    if v != VERSION {
        return None;
    }
    while !rest.is_empty() {
        let s = slot_at(rest)?;
        if s.code == code {
            return Some(Some(s));
        }
        rest = &rest[s.bytes.len()..];
    }
    Some(None)
}

/// Appends a slot.
pub fn put_slot(code: &[u8], state: &KeyState, out: &mut Vec<u8>) {
    out.extend_from_slice(code);
    encode_fixed(state.status, state.fingerprint, out);
    match &state.delete_image {
        None => out.push(0),
        Some(i) => {
            put_varint(i.len() as u64 + 1, out);
            out.extend_from_slice(i);
        }
    }
}

/// One write to a page: a key code and its new state (`None`: removed).
pub type Change = (Vec<u8>, Option<KeyState>);

/// The page after `changes` (later changes of a key win): the old slots
/// whose hash is in `lo..=hi` and whose key is not changed, then the
/// changed keys that are present. `None` if `old` is not a page.
pub fn rebuild(old: &[u8], changes: &[Change], lo: u64, hi: u64, hash: Hasher) -> Option<Vec<u8>> {
    let mut last: FxHashMap<&[u8], usize> =
        FxHashMap::with_capacity_and_hasher(changes.len(), Default::default());
    for (i, (code, _)) in changes.iter().enumerate() {
        last.insert(code.as_slice(), i);
    }
    let added: usize = changes
        .iter()
        .map(|(c, s)| {
            s.as_ref().map_or(0, |s| {
                c.len() + 12 + s.delete_image.as_ref().map_or(0, |i| i.len() + 2)
            })
        })
        .sum();
    let mut out = Vec::with_capacity(old.len() + added);
    out.push(VERSION);
    let (&v, mut rest) = old.split_first()?;
    if v != VERSION {
        return None;
    }
    while !rest.is_empty() {
        let s = slot_at(rest)?;
        rest = &rest[s.bytes.len()..];
        if last.contains_key(s.code) {
            continue;
        }
        let h = hash(s.code);
        if h < lo || h > hi {
            continue; // a leftover of an interrupted split
        }
        out.extend_from_slice(s.bytes);
    }
    for (i, (code, state)) in changes.iter().enumerate() {
        if let Some(state) = state {
            if last.get(code.as_slice()) == Some(&i) {
                put_slot(code, state, &mut out);
            }
        }
    }
    Some(out)
}

/// Cuts a page starting at `start` into pieces of about [`TARGET_BYTES`]
/// (never between two slots of one hash): `(start, bytes)` in order, the
/// first piece starting at `start`. A page at most [`MAX_BYTES`] is
/// returned whole.
pub fn split(page: Vec<u8>, start: u64, hash: Hasher) -> Option<Vec<(u64, Vec<u8>)>> {
    if page.len() <= MAX_BYTES {
        return Some(vec![(start, page)]);
    }
    let mut hashed: Vec<(u64, &[u8])> = slots(&page)?
        .into_iter()
        .map(|s| (hash(s.code), s.bytes))
        .collect();
    hashed.sort_by_key(|(h, _)| *h);
    let mut pieces: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut cur: Vec<u8> = Vec::with_capacity(TARGET_BYTES + 64);
    cur.push(VERSION);
    let mut cur_start = start;
    for (i, (h, bytes)) in hashed.iter().enumerate() {
        if cur.len() >= TARGET_BYTES && i > 0 && hashed[i - 1].0 != *h {
            pieces.push((cur_start, std::mem::replace(&mut cur, vec![VERSION])));
            cur_start = *h;
        }
        cur.extend_from_slice(bytes);
    }
    pieces.push((cur_start, cur));
    Some(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(fp: u64, image: Option<&'static [u8]>) -> KeyState {
        KeyState {
            status: KeyStatus::Accepted,
            fingerprint: fp,
            delete_image: image.map(bytes::Bytes::from_static),
        }
    }

    fn code(n: u64) -> Vec<u8> {
        keycode::code(&uuid::Uuid::from_u64_pair(n, n).to_string())
    }

    #[test]
    fn page_keys_sort_between_first_layout_entries_and_integer_pages() {
        let prefix = [3u8, 1, 2, 3, 4, 5, 6, 7, 8];
        let k = page_key(&prefix, 77);
        assert_eq!(start_of_key(prefix.len(), &k), Some(77));
        assert_eq!(
            start_of_key(prefix.len(), &super::super::pages::page_key(&prefix, 77)),
            None
        );
        assert!(k < super::super::pages::page_key(&prefix, 0));
        let mut per_key = prefix.to_vec();
        per_key.extend_from_slice("zzzz".as_bytes());
        assert!(k > per_key);
        assert!(page_key(&prefix, 1) < page_key(&prefix, 256));
    }

    #[test]
    fn slots_are_found_replaced_and_removed() {
        let changes: Vec<Change> = vec![
            (code(1), Some(st(1, None))),
            (code(2), Some(st(2, Some(b"img")))),
            (code(3), Some(st(3, None))),
        ];
        let p = rebuild(&empty(), &changes, 0, u64::MAX, xxh3).unwrap();
        assert_eq!(
            find(&p, &code(2)).unwrap().unwrap().state(),
            st(2, Some(b"img"))
        );
        assert_eq!(find(&p, &code(4)).unwrap(), None);
        let p = rebuild(
            &p,
            &[
                (code(2), Some(st(20, None))),
                (code(1), None),
                (code(4), Some(st(4, None))),
                (code(4), Some(st(40, None))),
            ],
            0,
            u64::MAX,
            xxh3,
        )
        .unwrap();
        let got: Vec<(Vec<u8>, KeyState)> = slots(&p)
            .unwrap()
            .into_iter()
            .map(|s| (s.code.to_vec(), s.state()))
            .collect();
        assert_eq!(
            got,
            vec![
                (code(3), st(3, None)),
                (code(2), st(20, None)),
                (code(4), st(40, None))
            ]
        );
    }

    #[test]
    fn a_rewrite_drops_slots_outside_the_range() {
        let changes: Vec<Change> = (0..20).map(|n| (code(n), Some(st(n, None)))).collect();
        let p = rebuild(&empty(), &changes, 0, u64::MAX, xxh3).unwrap();
        let mid = 1u64 << 63;
        let low = rebuild(&p, &[], 0, mid - 1, xxh3).unwrap();
        let high = rebuild(&p, &[], mid, u64::MAX, xxh3).unwrap();
        let n = |p: &[u8]| slots(p).unwrap().len();
        assert_eq!(n(&low) + n(&high), 20);
        assert!(slots(&low).unwrap().iter().all(|s| xxh3(s.code) < mid));
    }

    #[test]
    fn oversized_pages_split_at_hash_boundaries() {
        let changes: Vec<Change> = (0..400).map(|n| (code(n), Some(st(n, None)))).collect();
        let p = rebuild(&empty(), &changes, 0, u64::MAX, xxh3).unwrap();
        assert!(p.len() > 4 * MAX_BYTES);
        let pieces = split(p, 0, xxh3).unwrap();
        assert!(pieces.len() >= 4, "{}", pieces.len());
        assert_eq!(pieces[0].0, 0);
        let mut total = 0;
        for (i, (start, bytes)) in pieces.iter().enumerate() {
            let end = pieces.get(i + 1).map_or(u64::MAX, |p| p.0 - 1);
            assert!(
                bytes.len() <= TARGET_BYTES + 64,
                "piece {i}: {}",
                bytes.len()
            );
            for s in slots(bytes).unwrap() {
                let h = xxh3(s.code);
                assert!(h >= *start && h <= end, "piece {i}");
                total += 1;
            }
        }
        assert_eq!(total, 400);
    }

    #[test]
    fn colliding_hashes_stay_in_one_page() {
        // Every key hashes to 7: the page cannot be cut, it grows instead.
        let same: Hasher = |_| 7;
        let changes: Vec<Change> = (0..300).map(|n| (code(n), Some(st(n, None)))).collect();
        let p = rebuild(&empty(), &changes, 0, u64::MAX, same).unwrap();
        let pieces = split(p, 0, same).unwrap();
        assert_eq!(pieces.len(), 1);
        assert_eq!(slots(&pieces[0].1).unwrap().len(), 300);
        for n in [0, 150, 299] {
            assert_eq!(
                find(&pieces[0].1, &code(n)).unwrap().unwrap().fingerprint,
                n
            );
        }
        // Two hashes: cut between them only.
        let two: Hasher = |c| u64::from(c[c.len() - 1] % 2) * 1000;
        let p = rebuild(&empty(), &changes, 0, u64::MAX, two).unwrap();
        let pieces = split(p, 0, two).unwrap();
        assert_eq!(pieces.iter().map(|p| p.0).collect::<Vec<_>>(), [0, 1000]);
    }

    #[test]
    fn damaged_pages_are_refused() {
        let p = rebuild(
            &empty(),
            &[(code(1), Some(st(1, Some(b"xy"))))],
            0,
            u64::MAX,
            xxh3,
        )
        .unwrap();
        for cut in 2..p.len() {
            assert_eq!(slots(&p[..cut]), None, "cut at {cut}");
            assert!(rebuild(&p[..cut], &[], 0, u64::MAX, xxh3).is_none());
        }
        let mut bad = p.clone();
        bad[0] = 9;
        assert_eq!(find(&bad, &code(1)), None);
        assert_eq!(slots(&[]), None);
    }
}
