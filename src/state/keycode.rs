//! Compact source keys: how a page slot stores a record's source key.
//!
//! A source key is its key columns' text joined by `|`
//! ([`crate::mapping::engine::source_key`]). Partner keys are mostly UUIDs
//! (36 characters of text) and integers; stored as text they would be most
//! of a slot. A key code stores each part in its smallest exact form:
//!
//! - a canonical lower-case hyphenated UUID → 16 bytes;
//! - a canonical unsigned integer (`0`, `42`, not `007`) → a LEB128 varint;
//! - anything else → its length (varint) and UTF-8 bytes.
//!
//! Layout: one header byte, `0`/`1`/`2` for a single part of that kind
//! followed by its payload, or `3` followed by the number of parts (varint)
//! and each part as `[kind][payload]`. A key containing `\` (an escaped `|`
//! or a NULL part) is always one text part, so splitting on `|` is exact.
//!
//! The code of a key is a function of the key: two keys are equal exactly
//! when their codes are, so lookups compare codes without decoding.

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
    let mut out = [0u8; 16];
    let mut n = 0;
    let mut i = 0;
    while i < 36 {
        if matches!(i, 8 | 13 | 18 | 23) {
            if b[i] != b'-' {
                return None;
            }
            i += 1;
            continue;
        }
        let hex = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        out[n] = (hex(b[i])? << 4) | hex(b[i + 1])?;
        n += 1;
        i += 2;
    }
    Some(out)
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
    let at = out.len();
    out.push(TEXT);
    if let Some(u) = canonical_uuid(part) {
        out[at] = UUID;
        out.extend_from_slice(&u);
    } else if let Some(n) = canonical_u64(part) {
        out[at] = INT;
        put_varint(n, out);
    } else {
        put_varint(part.len() as u64, out);
        out.extend_from_slice(part.as_bytes());
    }
}

/// Appends the code of `source_key`.
pub fn encode(source_key: &str, out: &mut Vec<u8>) {
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
        INT => get_varint(b).map(|(_, n)| n),
        TEXT => {
            let (len, n) = get_varint(b)?;
            let end = n.checked_add(usize::try_from(len).ok()?)?;
            (b.len() >= end).then_some(end)
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
        INT => out.push_str(itoa::Buffer::new().format(get_varint(b)?.0)),
        _ => {
            let (_, h) = get_varint(b)?;
            out.push_str(std::str::from_utf8(&b[h..n]).ok()?);
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
    use proptest::prelude::*;

    #[test]
    fn each_kind_of_key_has_its_compact_code() {
        for (key, code_len) in [
            ("550e8400-e29b-41d4-a716-446655440000", 17),
            ("0", 2),
            ("42", 2),
            ("1000000", 4),
            ("18446744073709551615", 11),
            ("007", 5),
            ("-1", 4),
            ("", 2),
            ("CUST-0001", 11),
            // Upper-case UUIDs are not canonical: kept as text.
            ("550E8400-E29B-41D4-A716-446655440000", 38),
            ("550e8400-e29b-41d4-a716-446655440000|7", 1 + 1 + 17 + 2),
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
        assert_eq!(decode(&[TEXT, 1, 0xff]), None);
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
    }
}
