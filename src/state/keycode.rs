//! Compact source keys: how a page slot stores a record's source key.
//!
//! A source key is its key columns' text joined by `|`
//! ([`crate::mapping::engine::source_key`]). Partner keys are mostly UUIDs
//! (36 characters of text) and integers; stored as text they would be most
//! of a slot. A key code stores each part in its smallest exact form:
//!
//! - a canonical lower-case hyphenated UUID → its 16 bytes;
//! - a canonical unsigned integer (`0`, `42`, not `007`) → the number of
//!   its big-endian bytes, then those bytes (`0` is `[0]`);
//! - anything else → its UTF-8 bytes, each `0x00` written `0x00 0xFF`,
//!   ended by `0x00`.
//!
//! Layout: one header byte, `0`/`1`/`2` for a single part of that kind
//! followed by its payload, or `3` followed by the number of parts (varint)
//! and each part as `[kind][payload]`. A key containing `\` (an escaped `|`
//! or a NULL part) is always one text part, so splitting on `|` is exact.
//!
//! The code of a key is a function of the key, and codes sort like their
//! keys within a kind: UUIDs as PostgreSQL orders them, integers
//! numerically, text bytewise. So two keys are equal exactly when their
//! codes are (lookups compare codes without decoding), and a table read in
//! key order (a snapshot) fills the pages of [`super::ranges`] in order.

const UUID: u8 = 0;
const INT: u8 = 1;
const TEXT: u8 = 2;
const PARTS: u8 = 3;

/// Appends `v` as a LEB128 varint.
pub fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a LEB128 varint from the start of `b`: the value and its length.
pub fn get_varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    for (i, &byte) in b.iter().enumerate().take(10) {
        let bits = u64::from(byte & 0x7f);
        if i == 9 && byte > 1 {
            return None; // more than 64 bits
        }
        v |= bits << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// The 16 bytes of `s` if it is a UUID in canonical lower-case hyphenated
/// form (so formatting them back gives `s` exactly).
pub fn canonical_uuid(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    // Lower-case hex digit → value, anything else → 0xFF.
    const HEX: [u8; 256] = {
        let mut t = [0xFFu8; 256];
        let mut c = 0;
        while c < 10 {
            t[b'0' as usize + c] = c as u8;
            c += 1;
        }
        let mut c = 0;
        while c < 6 {
            t[b'a' as usize + c] = 10 + c as u8;
            c += 1;
        }
        t
    };
    if b[8] != b'-' || b[13] != b'-' || b[18] != b'-' || b[23] != b'-' {
        return None;
    }
    let mut out = [0u8; 16];
    let mut bad = 0u8;
    let mut n = 0;
    let mut i = 0;
    while i < 36 {
        if matches!(i, 8 | 13 | 18 | 23) {
            i += 1;
            continue;
        }
        let (hi, lo) = (HEX[b[i] as usize], HEX[b[i + 1] as usize]);
        bad |= hi | lo;
        out[n] = (hi << 4) | (lo & 0x0F);
        n += 1;
        i += 2;
    }
    (bad & 0xF0 == 0).then_some(out)
}

/// `s` as a canonical unsigned integer (what `u64::to_string` gives back).
pub fn canonical_u64(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 20 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if b.len() > 1 && b[0] == b'0' {
        return None;
    }
    s.parse().ok()
}

/// Appends `[kind][payload]` of one part.
fn put_part(part: &str, out: &mut Vec<u8>) {
    if let Some(u) = canonical_uuid(part) {
        out.push(UUID);
        out.extend_from_slice(&u);
    } else if let Some(n) = canonical_u64(part) {
        out.push(INT);
        let bytes = n.to_be_bytes();
        let skip = (n.leading_zeros() / 8) as usize;
        out.push((8 - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    } else {
        out.push(TEXT);
        for &b in part.as_bytes() {
            out.push(b);
            if b == 0 {
                out.push(0xFF);
            }
        }
        out.push(0);
    }
}

/// Appends the code of `source_key`.
pub fn encode(source_key: &str, out: &mut Vec<u8>) {
    // The common case first: one UUID (which holds neither `|` nor `\`).
    if let Some(u) = canonical_uuid(source_key) {
        out.push(UUID);
        out.extend_from_slice(&u);
        return;
    }
    let multi = !source_key.contains('\\') && source_key.contains('|');
    if !multi {
        put_part(source_key, out);
        return;
    }
    out.push(PARTS);
    put_varint(source_key.split('|').count() as u64, out);
    for part in source_key.split('|') {
        put_part(part, out);
    }
}

/// The code of `source_key`, as a new buffer.
pub fn code(source_key: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(source_key.len().min(64) + 2);
    encode(source_key, &mut v);
    v
}

/// Length of the payload of a part of `kind` at the start of `b`.
fn part_len(kind: u8, b: &[u8]) -> Option<usize> {
    match kind {
        UUID => (b.len() >= 16).then_some(16),
        INT => {
            let n = usize::from(*b.first()?);
            (n <= 8 && b.len() > n).then_some(1 + n)
        }
        TEXT => {
            let mut i = 0;
            loop {
                match *b.get(i)? {
                    0 if b.get(i + 1) == Some(&0xFF) => i += 2,
                    0 => return Some(i + 1),
                    _ => i += 1,
                }
            }
        }
        _ => None,
    }
}

/// Length of the key code at the start of `b`.
pub fn len(b: &[u8]) -> Option<usize> {
    let (&head, rest) = b.split_first()?;
    if head != PARTS {
        return Some(1 + part_len(head, rest)?);
    }
    let (parts, mut at) = get_varint(rest)?;
    for _ in 0..parts {
        let kind = *rest.get(at)?;
        at += 1 + part_len(kind, rest.get(at + 1..)?)?;
    }
    Some(1 + at)
}

fn decode_part(kind: u8, b: &[u8], out: &mut String) -> Option<usize> {
    let n = part_len(kind, b)?;
    match kind {
        UUID => {
            let u = uuid::Uuid::from_slice(&b[..16]).ok()?;
            let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
            out.push_str(u.hyphenated().encode_lower(&mut buf));
        }
        INT => {
            let mut be = [0u8; 8];
            be[8 - (n - 1)..].copy_from_slice(&b[1..n]);
            let v = u64::from_be_bytes(be);
            // Only the shortest form is a code (one code per key).
            if (8 - (v.leading_zeros() / 8) as usize) != n - 1 {
                return None;
            }
            out.push_str(itoa::Buffer::new().format(v));
        }
        _ => {
            let mut text = Vec::with_capacity(n - 1);
            let mut i = 0;
            while i < n - 1 {
                text.push(b[i]);
                i += if b[i] == 0 { 2 } else { 1 };
            }
            out.push_str(std::str::from_utf8(&text).ok()?);
        }
    }
    Some(n)
}

/// The source key coded at the start of `b`.
pub fn decode(b: &[u8]) -> Option<String> {
    let (&head, rest) = b.split_first()?;
    let mut out = String::new();
    if head != PARTS {
        decode_part(head, rest, &mut out)?;
        return Some(out);
    }
    let (parts, mut at) = get_varint(rest)?;
    for i in 0..parts {
        if i > 0 {
            out.push('|');
        }
        let kind = *rest.get(at)?;
        at += 1 + decode_part(kind, rest.get(at + 1..)?, &mut out)?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_uuids_become_sixteen_bytes() {
        for n in [
            0u128,
            1,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
            u128::MAX,
        ] {
            let u = uuid::Uuid::from_u128(n);
            let s = u.hyphenated().to_string();
            assert_eq!(canonical_uuid(&s), Some(*u.as_bytes()), "{s}");
        }
        for not in [
            "550E8400-e29b-41d4-a716-446655440000",
            "550e8400-e29b-41d4-a716-44665544000g",
            "550e8400e-29b-41d4-a716-446655440000",
            "550e8400-e29b-41d4-a716-4466554400000",
            "550e8400-e29b-41d4-a716_446655440000",
            "{50e8400-e29b-41d4-a716-446655440000",
            "550e8400-e29b-41d4-a716-44665544000\u{e9}",
        ] {
            assert_eq!(canonical_uuid(not), None, "{not}");
        }
    }
    use proptest::prelude::*;

    #[test]
    fn each_kind_of_key_has_its_compact_code() {
        for (key, code_len) in [
            ("550e8400-e29b-41d4-a716-446655440000", 17),
            ("0", 2),
            ("42", 3),
            ("1000000", 5),
            ("18446744073709551615", 10),
            ("007", 5),
            ("-1", 4),
            ("", 2),
            ("CUST-0001", 11),
            ("nul\0inside", 13),
            // Upper-case UUIDs are not canonical: kept as text.
            ("550E8400-E29B-41D4-A716-446655440000", 38),
            ("550e8400-e29b-41d4-a716-446655440000|7", 1 + 1 + 17 + 3),
            ("a|b", 1 + 1 + 3 + 3),
            ("a\\|b|c", 8),
            ("\\N|1", 6),
            ("Zoë|", 1 + 1 + 6 + 2),
        ] {
            let c = code(key);
            assert_eq!(c.len(), code_len, "{key:?}");
            assert_eq!(len(&c), Some(c.len()), "{key:?}");
            assert_eq!(decode(&c).as_deref(), Some(key), "{key:?}");
        }
    }

    #[test]
    fn varints_round_trip_and_refuse_overflow() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            put_varint(v, &mut b);
            assert_eq!(get_varint(&b), Some((v, b.len())));
        }
        assert_eq!(get_varint(&[0x80; 11]), None);
        assert_eq!(
            get_varint(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]),
            None
        );
        assert_eq!(get_varint(&[0x80]), None);
    }

    #[test]
    fn damaged_codes_are_refused() {
        let c = code("550e8400-e29b-41d4-a716-446655440000|x");
        for cut in 0..c.len() {
            assert_eq!(len(&c[..cut]), None, "cut at {cut}");
            assert_eq!(decode(&c[..cut]), None, "cut at {cut}");
        }
        assert_eq!(len(&[9, 1, 2]), None);
        assert_eq!(decode(&[TEXT, 0xff, 0]), None, "not UTF-8");
        assert_eq!(decode(&[INT, 2, 0, 7]), None, "not the shortest form");
        assert_eq!(decode(&[INT, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9]), None);
    }

    proptest! {
        #[test]
        fn every_key_round_trips_and_codes_are_injective(
            a in "[a-z0-9|\\\\-]{0,40}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            b in "\\PC{0,12}",
        ) {
            for k in [a.as_str(), b.as_str()] {
                let c = code(k);
                prop_assert_eq!(len(&c), Some(c.len()));
                let back = decode(&c);
                prop_assert_eq!(back.as_deref(), Some(k));
            }
            prop_assert_eq!(a == b, code(&a) == code(&b));
        }

        #[test]
        fn codes_sort_like_their_keys(
            a in "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            b in "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            x in any::<u64>(),
            y in any::<u64>(),
            s in "\\PC{0,12}",
            t in "\\PC{0,12}",
        ) {
            prop_assert_eq!(a.cmp(&b), code(&a).cmp(&code(&b)));
            prop_assert_eq!(x.cmp(&y), code(&x.to_string()).cmp(&code(&y.to_string())));
            // Text (not UUID- or integer-shaped) sorts bytewise.
            if canonical_uuid(&s).is_none() && canonical_u64(&s).is_none()
                && canonical_uuid(&t).is_none() && canonical_u64(&t).is_none()
                && !s.contains(['|', '\\']) && !t.contains(['|', '\\'])
            {
                prop_assert_eq!(s.as_bytes().cmp(t.as_bytes()), code(&s).cmp(&code(&t)));
            }
        }
    }
}
