//! Range pages: how [`super::SledStore`] keeps the states of keys that are
//! not integers (UUIDs, text, composite keys).
//!
//! A UUID-keyed table gets the same treatment as an integer-keyed one: a
//! KiB or two of neighbouring states per sled entry, not one entry per
//! record. Neighbours are by key: a mapping's keys are ordered by their
//! [`super::keycode`] codes (UUIDs in PostgreSQL's order, integers
//! numerically, text bytewise) and cut into ranges, one page each. A
//! page's sled key is `[type][mapping hash][0xFE][start code]`; it holds
//! the keys from its start up to the next page's start. A mapping starts
//! with one page whose start is empty (before every code); a page whose
//! bytes pass [`MAX_BYTES`] after a write is cut into pieces of about
//! [`TARGET_BYTES`] ([`split`]), so pages stay small whatever the table's
//! size (a piece may be written with up to one old page of leftovers more,
//! see below, dropped at its next rewrite). A snapshot reads a table in key order, so it appends to the last
//! page and its splits, like integer pages; random keys (a UUID insert
//! burst) touch one page each.
//!
//! Encoding: `[1]` then slots, each `[key code][status][fingerprint: u64
//! BE][varint image length + 1, or 0][image]`, in no particular order.
//!
//! Crash safety. A split writes the new upper pieces first, lowest first,
//! each also carrying the old page's slots above its own range, and
//! rewrites the lower page last (`layout::split_writes`). A crash between
//! leaves the old page whole next to the pieces written, the highest of
//! which holds the rest of the range through its carried slots. Copies of
//! keys above a page's range (the old page's, a piece's carried slots) are
//! leftovers: never consulted (a key is looked up in the page whose range
//! holds it), dropped by the next rewrite ([`rebuild`] keeps only slots in
//! the page's range) and skipped by scans. Pages are never removed, so a
//! leftover can never come back into range.

use std::cmp::Ordering;

use rustc_hash::FxHashMap;

use super::keycode::{self, get_varint, put_varint};
use super::{decode_fixed, encode_fixed, KeyState, KeyStatus, FIXED_BYTES};

/// Marks a range page key after the mapping prefix (never in UTF-8, and
/// below [`super::pages::PAGE_MARK`]).
pub const MARK: u8 = 0xFE;

/// First byte of an encoded page (format version).
const VERSION: u8 = 1;

/// A page is split once a write makes it larger than this.
pub const MAX_BYTES: usize = 2048;

/// Pieces of a split page are about this large.
pub const TARGET_BYTES: usize = MAX_BYTES / 2;

/// The page key of the page starting at `start` under a mapping prefix.
pub fn page_key(prefix: &[u8], start: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 1 + start.len());
    k.extend_from_slice(prefix);
    k.push(MARK);
    k.extend_from_slice(start);
    k
}

/// The start of a range page key (`None` if it is not one).
pub fn start_of_key(prefix_len: usize, key: &[u8]) -> Option<&[u8]> {
    let rest = key.get(prefix_len..)?;
    (rest.first() == Some(&MARK)).then(|| &rest[1..])
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
pub fn slot_at(b: &[u8]) -> Option<Slot<'_>> {
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

/// Whether `code` is in the range `[lo, hi)` (`hi = None`: unbounded).
pub fn in_range(code: &[u8], lo: &[u8], hi: Option<&[u8]>) -> bool {
    code >= lo && hi.is_none_or(|hi| code < hi)
}

/// The page after `changes` (later changes of a key win): the old slots in
/// `[lo, hi)` whose key is not changed, then the changed keys that are
/// present. `None` if `old` is not a page.
pub fn rebuild(old: &[u8], changes: &[Change], lo: &[u8], hi: Option<&[u8]>) -> Option<Vec<u8>> {
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
        if last.contains_key(s.code) || !in_range(s.code, lo, hi) {
            continue; // replaced, or a leftover of an interrupted split
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

/// Cuts a page starting at `start` into pieces of about [`TARGET_BYTES`]:
/// `(start, bytes)` in order, the first piece starting at `start`, each
/// other at its lowest code. A page at most [`MAX_BYTES`] is returned
/// whole.
pub fn split(page: Vec<u8>, start: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    if page.len() <= MAX_BYTES {
        return Some(vec![(start.to_vec(), page)]);
    }
    let mut sorted = slots(&page)?;
    sorted.sort_by(|a, b| a.code.cmp(b.code));
    let mut pieces: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut cur: Vec<u8> = Vec::with_capacity(TARGET_BYTES + 64);
    cur.push(VERSION);
    let mut cur_start = start.to_vec();
    for s in &sorted {
        if cur.len() >= TARGET_BYTES && s.code.cmp(&cur_start) == Ordering::Greater {
            pieces.push((
                std::mem::replace(&mut cur_start, s.code.to_vec()),
                std::mem::replace(&mut cur, vec![VERSION]),
            ));
        }
        cur.extend_from_slice(s.bytes);
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
        keycode::code(
            &uuid::Uuid::from_u64_pair(n.wrapping_mul(0x9e37_79b9_7f4a_7c15), n).to_string(),
        )
    }

    #[test]
    fn page_keys_sort_between_first_layout_entries_and_integer_pages() {
        let prefix = [3u8, 1, 2, 3, 4, 5, 6, 7, 8];
        let k = page_key(&prefix, &code(77));
        assert_eq!(start_of_key(prefix.len(), &k), Some(code(77).as_slice()));
        assert_eq!(
            start_of_key(prefix.len(), &page_key(&prefix, &[])),
            Some(&[][..])
        );
        assert_eq!(
            start_of_key(prefix.len(), &super::super::pages::page_key(&prefix, 77)),
            None
        );
        assert!(k < super::super::pages::page_key(&prefix, 0));
        let mut per_key = prefix.to_vec();
        per_key.extend_from_slice("zzzz".as_bytes());
        assert!(page_key(&prefix, &[]) > per_key);
        assert_eq!(
            page_key(&prefix, &code(1)).cmp(&page_key(&prefix, &code(2))),
            code(1).cmp(&code(2))
        );
    }

    #[test]
    fn slots_are_found_replaced_and_removed() {
        let changes: Vec<Change> = vec![
            (code(1), Some(st(1, None))),
            (code(2), Some(st(2, Some(b"img")))),
            (code(3), Some(st(3, None))),
        ];
        let p = rebuild(&empty(), &changes, &[], None).unwrap();
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
            &[],
            None,
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
        let p = rebuild(&empty(), &changes, &[], None).unwrap();
        let mut codes: Vec<Vec<u8>> = (0..20).map(code).collect();
        codes.sort();
        let mid = codes[10].clone();
        let low = rebuild(&p, &[], &[], Some(&mid)).unwrap();
        let high = rebuild(&p, &[], &mid, None).unwrap();
        let n = |p: &[u8]| slots(p).unwrap().len();
        assert_eq!((n(&low), n(&high)), (10, 10));
        assert!(slots(&low).unwrap().iter().all(|s| s.code < mid.as_slice()));
    }

    #[test]
    fn oversized_pages_split_into_ordered_ranges() {
        let changes: Vec<Change> = (0..400).map(|n| (code(n), Some(st(n, None)))).collect();
        let p = rebuild(&empty(), &changes, &[], None).unwrap();
        assert!(p.len() > 4 * MAX_BYTES);
        let pieces = split(p, &[]).unwrap();
        assert!(pieces.len() >= 8, "{}", pieces.len());
        assert!(pieces[0].0.is_empty());
        let mut total = 0;
        for (i, (start, bytes)) in pieces.iter().enumerate() {
            let end = pieces.get(i + 1).map(|p| p.0.as_slice());
            assert!(
                bytes.len() <= TARGET_BYTES + 64,
                "piece {i}: {}",
                bytes.len()
            );
            for s in slots(bytes).unwrap() {
                assert!(in_range(s.code, start, end), "piece {i}");
                total += 1;
            }
        }
        assert_eq!(total, 400);
    }

    #[test]
    fn keys_with_long_common_prefixes_split_like_any_others() {
        // Synthetic UUIDs with twelve leading zero bytes, and long text
        // keys that differ only at the end.
        for key in [
            |n: u64| format!("00000000-0000-0000-0000-{n:012x}"),
            |n: u64| format!("CUSTOMER-ACCOUNT-REFERENCE-{n:08}"),
        ] {
            let changes: Vec<Change> = (0..300)
                .map(|n| (keycode::code(&key(n)), Some(st(n, None))))
                .collect();
            let p = rebuild(&empty(), &changes, &[], None).unwrap();
            let pieces = split(p, &[]).unwrap();
            assert!(pieces.len() > 4, "{}", pieces.len());
            // In order: each piece holds consecutive keys.
            let firsts: Vec<String> = pieces[1..]
                .iter()
                .map(|p| keycode::decode(&p.0).unwrap())
                .collect();
            let mut sorted = firsts.clone();
            sorted.sort();
            assert_eq!(firsts, sorted);
        }
    }

    #[test]
    fn damaged_pages_are_refused() {
        let p = rebuild(&empty(), &[(code(1), Some(st(1, Some(b"xy"))))], &[], None).unwrap();
        for cut in 2..p.len() {
            assert_eq!(slots(&p[..cut]), None, "cut at {cut}");
            assert!(rebuild(&p[..cut], &[], &[], None).is_none());
        }
        let mut bad = p.clone();
        bad[0] = 9;
        assert_eq!(find(&bad, &code(1)), None);
        assert_eq!(slots(&[]), None);
    }
}
