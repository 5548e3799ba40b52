//! PostgreSQL binary send format → [`Value`].
//!
//! [`decode_binary`] decodes one value as PostgreSQL's `*send` functions
//! write it; the binary COPY stream's framing is [`super::copy_binary`]
//! (re-exported here: [`CopyBinaryReader`], [`LenientRow`]).
//!
//! Contract: pure, no I/O, never panics on any input. Every length or count
//! read from the input is checked against the bytes actually present before
//! anything is sliced or allocated. Malformed input gives a [`DecodeError`]
//! naming the type and quoting at most 40 bytes of a value. Types without a
//! native decoder here are an error, not a panic: callers cast such columns
//! to `text` in their `SELECT`.

use uuid::Uuid;

pub use super::copy_binary::{CopyBinaryReader, LenientRow};
use super::{element_name, element_oid, error, utf8, DecodeError};
use crate::mapping::value::{oid, PgType, Value, PG_EPOCH_OFFSET_DAYS, PG_EPOCH_OFFSET_MICROS};

/// Most dimensions of an array (PostgreSQL's `MAXDIM`).
const MAX_DIMS: i32 = 6;

/// `numeric` sign words.
const NUMERIC_POS: u16 = 0x0000;
const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_NAN: u16 = 0xC000;
const NUMERIC_PINF: u16 = 0xD000;
const NUMERIC_NINF: u16 = 0xF000;
/// Largest display scale a `numeric` can carry.
const NUMERIC_DSCALE_MAX: u16 = 0x3FFF;
/// `numeric` digits are base 10000.
const NBASE: u16 = 10_000;

/// Decodes `raw`, the binary send form of a value of type `ty`.
///
/// - `bool`, `int2`/`int4`/`int8`/`oid` → [`Value::Bool`] / [`Value::Int`];
///   `float4`/`float8` → [`Value::Float`];
/// - `numeric` → [`Value::Numeric`] with exactly the text `numeric_out`
///   prints (`0.00`, `-0.001`, `NaN`, `Infinity`…);
/// - `text`, `varchar`, `bpchar`, `name` → [`Value::Text`] (UTF-8 checked);
///   `"char"` → [`Value::Text`] as `charout` prints it;
/// - `uuid`, `date`, `timestamp`, `timestamptz` → their variants, moved to
///   the 1970 epoch, infinities kept;
/// - `json`, `jsonb` (version 1) → [`Value::Json`]; `bytea` →
///   [`Value::Text`] as `\x` + lower-case hex;
/// - arrays (`ty.elem`, or a built-in array OID) → [`Value::Array`],
///   multi-dimensional arrays flattened, elements decoded with the element
///   type;
/// - any other type → an error saying it has no binary decoder.
pub fn decode_binary(ty: &PgType, raw: &[u8]) -> Result<Value, DecodeError> {
    decode(ty.oid, &ty.name, ty.elem, raw)
}

pub(super) fn decode(
    ty_oid: u32,
    name: &str,
    elem: Option<u32>,
    raw: &[u8],
) -> Result<Value, DecodeError> {
    match element_oid(ty_oid, elem) {
        Some(elem) => decode_array(ty_oid, name, elem, raw),
        None => decode_scalar(ty_oid, name, raw),
    }
}

/// `raw` as exactly `N` bytes.
fn fixed<const N: usize>(ty_oid: u32, name: &str, raw: &[u8]) -> Result<[u8; N], DecodeError> {
    raw.try_into().map_err(|_| {
        error(
            ty_oid,
            name,
            format!("expected {N} bytes, got {}", raw.len()),
        )
    })
}

fn decode_scalar(ty_oid: u32, name: &str, raw: &[u8]) -> Result<Value, DecodeError> {
    Ok(match ty_oid {
        oid::BOOL => Value::Bool(fixed::<1>(ty_oid, name, raw)?[0] != 0),
        oid::INT2 => Value::Int(i16::from_be_bytes(fixed(ty_oid, name, raw)?).into()),
        oid::INT4 => Value::Int(i32::from_be_bytes(fixed(ty_oid, name, raw)?).into()),
        oid::INT8 => Value::Int(i64::from_be_bytes(fixed(ty_oid, name, raw)?)),
        oid::OID => Value::Int(u32::from_be_bytes(fixed(ty_oid, name, raw)?).into()),
        oid::FLOAT4 => Value::Float(crate::mapping::value::widen_f32(f32::from_be_bytes(fixed(
            ty_oid, name, raw,
        )?))),
        oid::FLOAT8 => Value::Float(f64::from_be_bytes(fixed(ty_oid, name, raw)?)),
        oid::NUMERIC => Value::Numeric(
            numeric_text(raw)
                .map_err(|d| error(ty_oid, name, d))?
                .into(),
        ),
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME => {
            Value::Text(utf8(ty_oid, name, raw)?.into())
        }
        oid::CHAR => Value::Text(char_out(fixed::<1>(ty_oid, name, raw)?[0]).into()),
        oid::UUID => Value::Uuid(Uuid::from_bytes(fixed(ty_oid, name, raw)?)),
        oid::DATE => {
            let days = i32::from_be_bytes(fixed(ty_oid, name, raw)?);
            Value::Date(match days {
                i32::MAX | i32::MIN => days,
                _ => days
                    .checked_add(PG_EPOCH_OFFSET_DAYS)
                    .filter(|d| *d != i32::MAX)
                    .ok_or_else(|| error(ty_oid, name, format!("date {days} is out of range")))?,
            })
        }
        oid::TIMESTAMP | oid::TIMESTAMPTZ => {
            let micros = i64::from_be_bytes(fixed(ty_oid, name, raw)?);
            let t = match micros {
                i64::MAX | i64::MIN => micros,
                _ => micros
                    .checked_add(PG_EPOCH_OFFSET_MICROS)
                    .filter(|t| *t != i64::MAX)
                    .ok_or_else(|| {
                        error(ty_oid, name, format!("timestamp {micros} is out of range"))
                    })?,
            };
            if ty_oid == oid::TIMESTAMP {
                Value::Timestamp(t)
            } else {
                Value::TimestampTz(t)
            }
        }
        oid::JSON => Value::Json(utf8(ty_oid, name, raw)?.into()),
        oid::JSONB => match raw.split_first() {
            Some((1, text)) => Value::Json(utf8(ty_oid, name, text)?.into()),
            Some((v, _)) => {
                return Err(error(
                    ty_oid,
                    name,
                    format!("unsupported jsonb version {v}"),
                ))
            }
            None => return Err(error(ty_oid, name, "empty jsonb value")),
        },
        oid::BYTEA => Value::Text(bytea_hex(raw).into()),
        _ => {
            return Err(error(
                ty_oid,
                name,
                format!("type OID {ty_oid} has no native binary decoder (select it cast to text)"),
            ))
        }
    })
}

/// `bytea` in PostgreSQL's hex output form.
fn bytea_hex(raw: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(raw.len().saturating_mul(2).saturating_add(2));
    s.push_str("\\x");
    for &b in raw {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    s
}

/// `"char"` as `charout` prints it: `\ooo` for bytes with the high bit set,
/// nothing for `\0`.
fn char_out(c: u8) -> String {
    match c {
        0 => String::new(),
        0x80.. => format!("\\{:03o}", c),
        _ => char::from(c).to_string(),
    }
}

/// Decodes the binary `numeric` form into the text `numeric_out` prints.
///
/// Like `numeric_recv` followed by `numeric_out`: digits beyond `dscale` are
/// truncated, leading/trailing zero digit groups are ignored, and a value
/// that is zero once truncated prints without a minus sign.
fn numeric_text(raw: &[u8]) -> Result<String, String> {
    let word = |i: usize| u16::from_be_bytes([raw[i], raw[i + 1]]);
    if raw.len() < 8 {
        return Err(format!("expected at least 8 bytes, got {}", raw.len()));
    }
    let ndigits = usize::from(word(0));
    let weight = i32::from(word(2) as i16);
    let sign = word(4);
    let dscale = word(6);
    if raw.len() != 8 + 2 * ndigits {
        return Err(format!("{} bytes do not hold {ndigits} digits", raw.len()));
    }
    match sign {
        NUMERIC_NAN => return Ok("NaN".into()),
        NUMERIC_PINF => return Ok("Infinity".into()),
        NUMERIC_NINF => return Ok("-Infinity".into()),
        NUMERIC_POS | NUMERIC_NEG => {}
        _ => return Err(format!("invalid sign 0x{sign:04x}")),
    }
    if dscale > NUMERIC_DSCALE_MAX {
        return Err(format!("invalid scale {dscale}"));
    }
    let digits = &raw[8..];
    if let Some(d) = (0..ndigits).map(|k| word(8 + 2 * k)).find(|&d| d >= NBASE) {
        return Err(format!("invalid digit {}", d as i16));
    }
    // Digit group at position `k` (0 = most significant, weight 10000^weight).
    let group = |k: i32| -> u16 {
        match usize::try_from(k) {
            Ok(k) if k < ndigits => u16::from_be_bytes([digits[2 * k], digits[2 * k + 1]]),
            _ => 0,
        }
    };
    let int_len = if weight >= 0 {
        (weight as usize + 1) * 4
    } else {
        1
    };
    let mut out = String::with_capacity(1 + int_len + 1 + usize::from(dscale));
    out.push('-');
    let mut nonzero = false;
    // Integer part: groups 0..=weight, without leading zeros ("0" if none).
    if weight < 0 {
        out.push('0');
    } else {
        let mut started = false;
        for k in 0..=weight {
            let g = group(k);
            if started {
                push_group(&mut out, g, 4);
            } else if g != 0 || k == weight {
                // The first group without its leading zeros.
                let n = match g {
                    1000.. => 4,
                    100.. => 3,
                    10.. => 2,
                    _ => 1,
                };
                push_group_tail(&mut out, g, n);
                started = true;
            }
            nonzero |= g != 0;
        }
    }
    // Fraction: exactly dscale digits, from group weight + 1 on.
    if dscale > 0 {
        out.push('.');
        let mut left = usize::from(dscale);
        let mut k = weight + 1;
        while left > 0 {
            let g = group(k);
            let n = left.min(4);
            push_group(&mut out, g, n);
            // Only the digits printed count towards "is it zero".
            nonzero |= g / 10u16.pow(4 - n as u32) != 0;
            left -= n;
            k += 1;
        }
    }
    if sign == NUMERIC_NEG && nonzero {
        Ok(out)
    } else {
        Ok(out.split_off(1))
    }
}

/// The 4 decimal digits of a base-10000 digit group `g` (< 10000).
fn group_digits(g: u16) -> [u8; 4] {
    // Each is 0..=9, so the casts are exact.
    [
        b'0' + (g / 1000 % 10) as u8,
        b'0' + (g / 100 % 10) as u8,
        b'0' + (g / 10 % 10) as u8,
        b'0' + (g % 10) as u8,
    ]
}

/// Appends the first `n` (1..=4) of the 4 decimal digits of group `g`.
fn push_group(out: &mut String, g: u16, n: usize) {
    for &c in &group_digits(g)[..n] {
        out.push(char::from(c));
    }
}

/// Appends the last `n` (1..=4) of the 4 decimal digits of group `g`.
fn push_group_tail(out: &mut String, g: u16, n: usize) {
    for &c in &group_digits(g)[4 - n..] {
        out.push(char::from(c));
    }
}

/// Reads big-endian integers and byte runs off the front of a slice.
struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.b.len() {
            return None;
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Some(head)
    }

    fn i32(&mut self) -> Option<i32> {
        self.take(4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

fn decode_array(ty_oid: u32, name: &str, elem: u32, raw: &[u8]) -> Result<Value, DecodeError> {
    let fail = |detail: String| error(ty_oid, name, detail);
    let truncated = || fail(format!("array truncated ({} bytes)", raw.len()));
    let mut c = Cursor { b: raw };
    let ndim = c.i32().ok_or_else(truncated)?;
    let flags = c.i32().ok_or_else(truncated)?;
    // The element OID in the data may be a domain's; the caller's element
    // type (the base type) is the one to decode with.
    let _data_elem = c.i32().ok_or_else(truncated)?;
    if !(0..=MAX_DIMS).contains(&ndim) {
        return Err(fail(format!("invalid number of dimensions {ndim}")));
    }
    if flags != 0 && flags != 1 {
        return Err(fail(format!("invalid array flags {flags}")));
    }
    let mut count: usize = if ndim == 0 { 0 } else { 1 };
    for _ in 0..ndim {
        let size = c.i32().ok_or_else(truncated)?;
        let _lower_bound = c.i32().ok_or_else(truncated)?;
        let size = usize::try_from(size).map_err(|_| fail(format!("invalid dimension {size}")))?;
        count = count
            .checked_mul(size)
            .ok_or_else(|| fail("too many elements".into()))?;
    }
    // Every element takes at least its 4-byte length.
    if count > c.b.len() / 4 {
        return Err(fail(format!(
            "{count} elements declared but only {} bytes follow",
            c.b.len()
        )));
    }
    let elem_name = element_name(name, elem);
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let len = c.i32().ok_or_else(truncated)?;
        let v = match len {
            -1 => Value::Null,
            _ => {
                let n = usize::try_from(len)
                    .map_err(|_| fail(format!("element {}: invalid length {len}", i + 1)))?;
                let left = c.b.len();
                let bytes = c.take(n).ok_or_else(|| {
                    fail(format!(
                        "element {}: length {len} but only {left} bytes left",
                        i + 1
                    ))
                })?;
                decode(elem, elem_name, None, bytes)
                    .map_err(|e| fail(format!("element {}: {}", i + 1, e.detail)))?
            }
        };
        out.push(v);
    }
    if !c.b.is_empty() {
        return Err(fail(format!("{} bytes after the last element", c.b.len())));
    }
    Ok(Value::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::decode::copy_binary::COPY_SIGNATURE;
    use crate::mapping::decode::text::decode_text;
    use crate::mapping::time;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn ty(o: u32) -> PgType {
        PgType {
            oid: o,
            name: super::super::builtin_name(o).unwrap_or("").to_owned(),
            elem: None,
        }
    }

    fn dec(o: u32, raw: &[u8]) -> Result<Value, DecodeError> {
        decode_binary(&ty(o), raw)
    }

    fn ok(o: u32, raw: &[u8]) -> Value {
        dec(o, raw).unwrap_or_else(|e| panic!("{raw:?}: {e}"))
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn booleans_and_integers() {
        let cases: &[(u32, &[u8], Option<Value>)] = &[
            (oid::BOOL, &[1], Some(Value::Bool(true))),
            (oid::BOOL, &[0], Some(Value::Bool(false))),
            (oid::BOOL, &[], None),
            (oid::BOOL, &[1, 0], None),
            (oid::INT2, &[0x7f, 0xff], Some(Value::Int(32767))),
            (oid::INT2, &[0x80, 0x00], Some(Value::Int(-32768))),
            (oid::INT2, &[0, 0, 1], None),
            (oid::INT4, &[0xff, 0xff, 0xff, 0xfe], Some(Value::Int(-2))),
            (oid::INT4, &[0, 0, 1, 0], Some(Value::Int(256))),
            (oid::INT4, &[0, 1], None),
            (
                oid::INT8,
                &i64::MIN.to_be_bytes(),
                Some(Value::Int(i64::MIN)),
            ),
            (
                oid::INT8,
                &i64::MAX.to_be_bytes(),
                Some(Value::Int(i64::MAX)),
            ),
            (oid::INT8, &[0; 4], None),
            (oid::OID, &[0xff; 4], Some(Value::Int(4_294_967_295))),
            (oid::OID, &[0xff; 8], None),
        ];
        for (o, raw, want) in cases {
            assert_eq!(dec(*o, raw).ok(), want.clone(), "{o} {raw:?}");
        }
        let e = dec(oid::INT4, &[0, 1]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot decode integer value: expected 4 bytes, got 2"
        );
    }

    #[test]
    fn floats() {
        let cases: &[(u32, Vec<u8>, f64)] = &[
            // The digits PostgreSQL prints, not the widened binary value.
            (oid::FLOAT4, 0.1f32.to_be_bytes().to_vec(), 0.1),
            (oid::FLOAT4, 1e20f32.to_be_bytes().to_vec(), 1e20),
            (
                oid::FLOAT4,
                123456789f32.to_be_bytes().to_vec(),
                123456790.0,
            ),
            (
                oid::FLOAT4,
                1.1754944e-38f32.to_be_bytes().to_vec(),
                1.1754944e-38,
            ),
            (oid::FLOAT4, 1e-45f32.to_be_bytes().to_vec(), 1e-45),
            (
                oid::FLOAT4,
                f32::INFINITY.to_be_bytes().to_vec(),
                f64::INFINITY,
            ),
            (
                oid::FLOAT4,
                f32::NEG_INFINITY.to_be_bytes().to_vec(),
                f64::NEG_INFINITY,
            ),
            (oid::FLOAT4, (-0.0f32).to_be_bytes().to_vec(), -0.0),
            (oid::FLOAT8, 1.5f64.to_be_bytes().to_vec(), 1.5),
            (oid::FLOAT8, f64::MAX.to_be_bytes().to_vec(), f64::MAX),
            (
                oid::FLOAT8,
                f64::INFINITY.to_be_bytes().to_vec(),
                f64::INFINITY,
            ),
            (
                oid::FLOAT8,
                f64::NEG_INFINITY.to_be_bytes().to_vec(),
                f64::NEG_INFINITY,
            ),
        ];
        for (o, raw, want) in cases {
            match ok(*o, raw) {
                Value::Float(f) => assert_eq!(f.to_bits(), want.to_bits(), "{o} {want}"),
                v => panic!("{v:?}"),
            }
        }
        assert!(matches!(ok(oid::FLOAT4, &f32::NAN.to_be_bytes()), Value::Float(f) if f.is_nan()));
        assert!(matches!(ok(oid::FLOAT8, &f64::NAN.to_be_bytes()), Value::Float(f) if f.is_nan()));
        assert!(dec(oid::FLOAT4, &[0; 8]).is_err());
        assert!(dec(oid::FLOAT8, &[0; 4]).is_err());
        // Same value as the text form.
        assert_eq!(
            ok(oid::FLOAT4, &0.1f32.to_be_bytes()),
            decode_text(&ty(oid::FLOAT4), b"0.1").unwrap()
        );
    }

    #[test]
    fn texts() {
        for o in [oid::TEXT, oid::VARCHAR, oid::BPCHAR, oid::NAME] {
            for s in ["", "plain", "Zoë", "東京", "🦀 crab", "a,b\"c\\d", "pad  "] {
                assert_eq!(ok(o, s.as_bytes()), text(s), "{o} {s}");
            }
            let e = dec(o, b"ab\xffcd").unwrap_err();
            assert!(e.detail.contains("invalid UTF-8 at byte 2"), "{e}");
            assert!(dec(o, "東".as_bytes().split_last().unwrap().1).is_err());
        }
        // "char" prints like charout.
        assert_eq!(ok(oid::CHAR, b"a"), text("a"));
        assert_eq!(ok(oid::CHAR, &[0]), text(""));
        assert_eq!(ok(oid::CHAR, &[0xe9]), text("\\351"));
        assert_eq!(ok(oid::CHAR, &[0x80]), text("\\200"));
        assert!(dec(oid::CHAR, b"ab").is_err());
    }

    #[test]
    fn uuids() {
        let u = Uuid::parse_str("9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d").unwrap();
        assert_eq!(ok(oid::UUID, u.as_bytes()), Value::Uuid(u));
        assert!(dec(oid::UUID, &u.as_bytes()[..15]).is_err());
        assert!(dec(oid::UUID, &[0; 17]).is_err());
    }

    #[test]
    fn dates_and_timestamps() {
        let d = |n: i32| n.to_be_bytes();
        let t = |n: i64| n.to_be_bytes();
        assert_eq!(ok(oid::DATE, &d(0)), Value::Date(10_957));
        assert_eq!(ok(oid::DATE, &d(-10_957)), Value::Date(0));
        assert_eq!(ok(oid::DATE, &d(i32::MAX)), Value::Date(i32::MAX));
        assert_eq!(ok(oid::DATE, &d(i32::MIN)), Value::Date(i32::MIN));
        assert!(dec(oid::DATE, &d(i32::MAX - 1)).is_err());
        assert!(dec(oid::DATE, &d(i32::MAX - PG_EPOCH_OFFSET_DAYS)).is_err());
        assert!(dec(oid::DATE, &[0; 3]).is_err());
        for o in [oid::TIMESTAMP, oid::TIMESTAMPTZ] {
            let wrap = |v: i64| {
                if o == oid::TIMESTAMP {
                    Value::Timestamp(v)
                } else {
                    Value::TimestampTz(v)
                }
            };
            assert_eq!(ok(o, &t(0)), wrap(PG_EPOCH_OFFSET_MICROS));
            assert_eq!(ok(o, &t(-PG_EPOCH_OFFSET_MICROS)), wrap(0));
            assert_eq!(ok(o, &t(i64::MAX)), wrap(i64::MAX));
            assert_eq!(ok(o, &t(i64::MIN)), wrap(i64::MIN));
            assert!(dec(o, &t(i64::MAX - 1)).is_err());
            assert!(dec(o, &t(0)[..7]).is_err());
        }
        // Julian day 0 (PostgreSQL's earliest date) is 2451545 days before
        // 2000-01-01: independent check of the BC arithmetic.
        assert_eq!(
            ok(oid::DATE, &d(-2_451_545)),
            decode_text(&ty(oid::DATE), b"4714-11-24 BC").unwrap()
        );
        // Binary and text forms agree, BC dates included.
        let dates = [
            "2024-02-29",
            "1970-01-01",
            "0001-01-01",
            "0044-03-15 BC",
            "4713-01-01 BC",
        ];
        for s in dates {
            let days = time::parse_pg_date(s).unwrap();
            let raw = d(days - PG_EPOCH_OFFSET_DAYS);
            assert_eq!(
                ok(oid::DATE, &raw),
                decode_text(&ty(oid::DATE), s.as_bytes()).unwrap(),
                "{s}"
            );
        }
        let stamps = [
            (
                "2024-01-02 03:04:05.123456",
                "2024-01-02 03:04:05.123456+00",
            ),
            ("0044-03-15 12:00:00 BC", "0044-03-15 12:00:00+00 BC"),
            (
                "1969-12-31 23:59:59.999999",
                "1969-12-31 23:59:59.999999+00",
            ),
        ];
        for (naive, tz) in stamps {
            let v = time::parse_pg_timestamp(naive).unwrap();
            let raw = t(v - PG_EPOCH_OFFSET_MICROS);
            assert_eq!(
                ok(oid::TIMESTAMP, &raw),
                decode_text(&ty(oid::TIMESTAMP), naive.as_bytes()).unwrap()
            );
            assert_eq!(
                ok(oid::TIMESTAMPTZ, &raw),
                decode_text(&ty(oid::TIMESTAMPTZ), tz.as_bytes()).unwrap()
            );
        }
    }

    #[test]
    fn json_bytea_and_unsupported() {
        let j = r#"{"a": "Zoë"}"#;
        assert_eq!(ok(oid::JSON, j.as_bytes()), Value::Json(j.into()));
        let mut jb = vec![1u8];
        jb.extend_from_slice(j.as_bytes());
        assert_eq!(ok(oid::JSONB, &jb), Value::Json(j.into()));
        jb[0] = 2;
        assert_eq!(
            dec(oid::JSONB, &jb).unwrap_err().detail,
            "unsupported jsonb version 2"
        );
        assert!(dec(oid::JSONB, &[]).is_err());
        assert!(dec(oid::JSONB, &[1, 0xff]).is_err());
        assert!(dec(oid::JSON, &[0xff]).is_err());
        assert_eq!(
            ok(oid::BYTEA, &[0xde, 0xad, 0x00, 0x0f]),
            text("\\xdead000f")
        );
        assert_eq!(ok(oid::BYTEA, &[]), text("\\x"));
        let t = PgType {
            oid: 1186,
            name: "interval".into(),
            elem: None,
        };
        let e = decode_binary(&t, &[0; 16]).unwrap_err();
        assert_eq!(e.type_name, "interval");
        assert!(e.detail.contains("no native binary decoder"), "{e}");
    }

    /// Test-only encoder of the binary numeric form.
    fn numeric(sign: u16, weight: i16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(digits.len() as u16).to_be_bytes());
        v.extend_from_slice(&weight.to_be_bytes());
        v.extend_from_slice(&sign.to_be_bytes());
        v.extend_from_slice(&dscale.to_be_bytes());
        for d in digits {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v
    }

    /// Encodes `n / 10^scale` like `numeric_send` (normalized digits).
    fn numeric_of(n: i64, scale: u32) -> Vec<u8> {
        let mag = n.unsigned_abs().to_string();
        let scale_us = scale as usize;
        let padded = format!("{mag:0>width$}", width = scale_us + 1);
        let (int, frac) = padded.split_at(padded.len() - scale_us);
        // Align to base-10000 groups around the decimal point.
        let int_pad = (4 - int.len() % 4) % 4;
        let frac_pad = (4 - frac.len() % 4) % 4;
        let all = format!("{}{int}{frac}{}", "0".repeat(int_pad), "0".repeat(frac_pad));
        let mut groups: Vec<u16> = all
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap().parse().unwrap())
            .collect();
        let mut weight = ((int.len() + int_pad) / 4) as i16 - 1;
        while groups.first() == Some(&0) {
            groups.remove(0);
            weight -= 1;
        }
        while groups.last() == Some(&0) {
            groups.pop();
        }
        if groups.is_empty() {
            weight = 0;
        }
        let sign = if n < 0 && !groups.is_empty() {
            NUMERIC_NEG
        } else {
            NUMERIC_POS
        };
        numeric(sign, weight, scale as u16, &groups)
    }

    /// `n / 10^scale` formatted by hand.
    fn decimal_of(n: i64, scale: u32) -> String {
        let p = 10u128.pow(scale);
        let mag = n.unsigned_abs() as u128;
        let sign = if n < 0 { "-" } else { "" };
        if scale == 0 {
            format!("{sign}{mag}")
        } else {
            format!("{sign}{}.{:0>w$}", mag / p, mag % p, w = scale as usize)
        }
    }

    #[test]
    fn numeric_vectors() {
        let pos = NUMERIC_POS;
        let neg = NUMERIC_NEG;
        let cases: &[(Vec<u8>, &str)] = &[
            (numeric(pos, 0, 0, &[]), "0"),
            (numeric(pos, 0, 2, &[]), "0.00"),
            (numeric(neg, 0, 2, &[]), "0.00"),
            (numeric(pos, 0, 0, &[1]), "1"),
            (numeric(neg, 0, 0, &[1]), "-1"),
            (numeric(pos, 0, 3, &[12, 5000]), "12.500"),
            (numeric(neg, -1, 3, &[10]), "-0.001"),
            (numeric(pos, 1, 0, &[10]), "100000"),
            (numeric(pos, 1, 0, &[10, 0]), "100000"),
            (numeric(pos, -5, 20, &[1]), "0.00000000000000000001"),
            (numeric(neg, 1, 2, &[123, 4567, 8900]), "-1234567.89"),
            (numeric(pos, 25, 0, &[1]), &*format!("1{}", "0".repeat(100))),
            (numeric(pos, 0, 5, &[3, 1415, 9000]), "3.14159"),
            (numeric(pos, 0, 4, &[9999, 9999]), "9999.9999"),
            (numeric(pos, -1, 4, &[1]), "0.0001"),
            (numeric(pos, -1, 6, &[1]), "0.000100"),
            (numeric(pos, 2, 1, &[1, 0, 1]), "100000001.0"),
            (numeric(pos, 0, 0, &[9999]), "9999"),
            (numeric(pos, 1, 0, &[1, 1]), "10001"),
            // Digits beyond dscale are truncated, like numeric_recv does.
            (numeric(pos, 0, 2, &[1, 2345]), "1.23"),
            (numeric(neg, 0, 0, &[1, 5000]), "-1"),
            // Negative values that truncate to zero lose their sign.
            (numeric(neg, -1, 2, &[10]), "0.00"),
            (numeric(neg, -1, 0, &[5000]), "0"),
            // Not normalized: leading zero groups are skipped.
            (numeric(pos, 1, 0, &[0, 5]), "5"),
            (numeric(neg, 2, 1, &[0, 0, 7]), "-7.0"),
            (numeric(pos, 3, 0, &[]), "0"),
            (numeric(NUMERIC_NAN, 0, 0, &[]), "NaN"),
            (numeric(NUMERIC_PINF, 0, 0, &[]), "Infinity"),
            (numeric(NUMERIC_NINF, 0, 0, &[]), "-Infinity"),
        ];
        for (raw, want) in cases {
            assert_eq!(
                ok(oid::NUMERIC, raw),
                Value::Numeric((*want).into()),
                "{raw:?}"
            );
        }
        // Largest weight and scale stay bounded and correct.
        let Value::Numeric(big) = ok(oid::NUMERIC, &numeric(pos, i16::MAX, 0, &[1])) else {
            panic!()
        };
        assert_eq!(big.len(), 1 + 4 * i16::MAX as usize);
        let Value::Numeric(tiny) = ok(
            oid::NUMERIC,
            &numeric(pos, i16::MIN, NUMERIC_DSCALE_MAX, &[1]),
        ) else {
            panic!()
        };
        assert_eq!(&*tiny, &format!("0.{}", "0".repeat(16383)));
    }

    #[test]
    fn numeric_errors() {
        let cases: &[(Vec<u8>, &str)] = &[
            (vec![], "expected at least 8 bytes, got 0"),
            (vec![0; 7], "expected at least 8 bytes, got 7"),
            (numeric(0x1234, 0, 0, &[]), "invalid sign 0x1234"),
            (numeric(NUMERIC_POS, 0, 0x4000, &[]), "invalid scale 16384"),
            (numeric(NUMERIC_POS, 0, 0, &[10_000]), "invalid digit 10000"),
            (numeric(NUMERIC_POS, 0, 0, &[0xffff]), "invalid digit -1"),
            (
                numeric(NUMERIC_POS, 0, 0, &[1])[..9].to_vec(),
                "9 bytes do not hold 1 digits",
            ),
            (
                [numeric(NUMERIC_POS, 0, 0, &[1]), vec![0]].concat(),
                "11 bytes do not hold 1 digits",
            ),
        ];
        for (raw, want) in cases {
            let e = dec(oid::NUMERIC, raw).unwrap_err();
            assert_eq!(e.type_name, "numeric");
            assert_eq!(e.detail, *want);
        }
        // A declared digit count larger than the data is not trusted.
        let mut raw = numeric(NUMERIC_POS, 0, 0, &[]);
        raw[0] = 0xff;
        raw[1] = 0xff;
        assert!(dec(oid::NUMERIC, &raw).is_err());
    }

    #[test]
    fn numeric_round_trip_examples() {
        for (n, s, want) in [
            (0, 0, "0"),
            (0, 3, "0.000"),
            (-1, 3, "-0.001"),
            (125, 1, "12.5"),
            (i64::MIN, 6, "-9223372036854.775808"),
            (i64::MAX, 0, "9223372036854775807"),
            (100_000, 0, "100000"),
            (-100_000_000, 4, "-10000.0000"),
        ] {
            assert_eq!(decimal_of(n, s), want);
            assert_eq!(
                ok(oid::NUMERIC, &numeric_of(n, s)),
                Value::Numeric(want.into())
            );
        }
    }

    /// Test-only encoder of the binary array form.
    fn array(elem: u32, dims: &[(i32, i32)], items: &[Option<Vec<u8>>]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(dims.len() as i32).to_be_bytes());
        v.extend_from_slice(&i32::from(items.iter().any(Option::is_none)).to_be_bytes());
        v.extend_from_slice(&elem.to_be_bytes());
        for (size, lb) in dims {
            v.extend_from_slice(&size.to_be_bytes());
            v.extend_from_slice(&lb.to_be_bytes());
        }
        for it in items {
            match it {
                None => v.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(b) => {
                    v.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    v.extend_from_slice(b);
                }
            }
        }
        v
    }

    fn i4(n: i32) -> Option<Vec<u8>> {
        Some(n.to_be_bytes().to_vec())
    }

    fn s(t: &str) -> Option<Vec<u8>> {
        Some(t.as_bytes().to_vec())
    }

    #[test]
    fn arrays() {
        let raw = array(oid::INT4, &[(4, 1)], &[i4(1), i4(-2), None, i4(3)]);
        assert_eq!(
            ok(oid::INT4_ARRAY, &raw),
            Value::Array(vec![
                Value::Int(1),
                Value::Int(-2),
                Value::Null,
                Value::Int(3)
            ])
        );
        // Empty arrays have no dimensions.
        assert_eq!(
            ok(oid::INT4_ARRAY, &array(oid::INT4, &[], &[])),
            Value::Array(vec![])
        );
        assert_eq!(
            ok(oid::INT4_ARRAY, &array(oid::INT4, &[(0, 1)], &[])),
            Value::Array(vec![])
        );
        // Two dimensions, lower bound 0, flattened.
        let items = [
            s("a,b"),
            s("c \"d\""),
            s("e\\f"),
            None,
            s("NULL"),
            s("Zoë 東京 🦀"),
        ];
        let raw = array(oid::TEXT, &[(2, 0), (3, 1)], &items);
        let want: Vec<Value> = items
            .iter()
            .map(|i| {
                i.as_ref()
                    .map_or(Value::Null, |b| text(std::str::from_utf8(b).unwrap()))
            })
            .collect();
        assert_eq!(ok(oid::TEXT_ARRAY, &raw), Value::Array(want));
        // Element type from `elem` for arrays without a built-in OID; the
        // element OID in the data (a domain's, say) does not matter.
        let t = PgType {
            oid: 1001,
            name: "bytea[]".into(),
            elem: Some(oid::BYTEA),
        };
        let raw = array(99_999, &[(2, 1)], &[Some(vec![0xab]), None]);
        assert_eq!(
            decode_binary(&t, &raw).unwrap(),
            Value::Array(vec![text("\\xab"), Value::Null])
        );
        // Numeric and date elements.
        let raw = array(
            oid::NUMERIC,
            &[(2, 1)],
            &[
                Some(numeric(NUMERIC_POS, 0, 2, &[1, 5000])),
                Some(numeric(NUMERIC_NAN, 0, 0, &[])),
            ],
        );
        assert_eq!(
            ok(oid::NUMERIC_ARRAY, &raw),
            Value::Array(vec![
                Value::Numeric("1.50".into()),
                Value::Numeric("NaN".into())
            ])
        );
        let raw = array(oid::DATE, &[(2, 1)], &[i4(0), i4(i32::MAX)]);
        assert_eq!(
            ok(oid::DATE_ARRAY, &raw),
            Value::Array(vec![Value::Date(10_957), Value::Date(i32::MAX)])
        );
    }

    #[test]
    fn bad_arrays() {
        let good = array(oid::INT4, &[(2, 1)], &[i4(1), i4(2)]);
        for n in 0..good.len() {
            assert!(dec(oid::INT4_ARRAY, &good[..n]).is_err(), "prefix {n}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        let cases: &[(Vec<u8>, &str)] = &[
            (trailing, "1 bytes after the last element"),
            (array(oid::INT4, &[(-1, 1)], &[]), "invalid dimension -1"),
            (
                array(oid::INT4, &[(1, 1); 7], &[i4(1)]),
                "invalid number of dimensions 7",
            ),
            (
                array(oid::INT4, &[(i32::MAX, 1), (i32::MAX, 1)], &[]),
                "4611686014132420609 elements declared but only 0 bytes follow",
            ),
            (
                array(oid::INT4, &[(1, 1)], &[Some(vec![1])]),
                "element 1: expected 4 bytes, got 1",
            ),
            (
                array(oid::INT4, &[(2, 1)], &[i4(1), i4(2)])[..34].to_vec(),
                "element 2: length 4 but only 2 bytes left",
            ),
        ];
        for (raw, want) in cases {
            let e = dec(oid::INT4_ARRAY, raw).unwrap_err();
            assert_eq!(e.type_name, "integer[]");
            assert_eq!(e.detail, *want);
        }
        let mut flags = good.clone();
        flags[7] = 2;
        assert!(dec(oid::INT4_ARRAY, &flags).is_err());
        let mut bad_len = good;
        bad_len[20..24].copy_from_slice(&(-2i32).to_be_bytes());
        assert_eq!(
            dec(oid::INT4_ARRAY, &bad_len).unwrap_err().detail,
            "element 1: invalid length -2"
        );
    }

    // ---- COPY stream ----

    fn field(out: &mut Vec<u8>, v: Option<&[u8]>) {
        match v {
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(b) => {
                out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                out.extend_from_slice(b);
            }
        }
    }

    fn header(ext: &[u8]) -> Vec<u8> {
        let mut v = COPY_SIGNATURE.to_vec();
        v.extend_from_slice(&0i32.to_be_bytes());
        v.extend_from_slice(&(ext.len() as i32).to_be_bytes());
        v.extend_from_slice(ext);
        v
    }

    fn tuple(out: &mut Vec<u8>, fields: &[Option<Vec<u8>>]) {
        out.extend_from_slice(&(fields.len() as i16).to_be_bytes());
        for f in fields {
            field(out, f.as_deref());
        }
    }

    fn copy_types() -> Vec<PgType> {
        [
            oid::INT4,
            oid::TEXT,
            oid::NUMERIC,
            oid::DATE,
            oid::TIMESTAMPTZ,
            oid::UUID,
            oid::BOOL,
            oid::INT4_ARRAY,
            oid::FLOAT8,
            oid::BYTEA,
            oid::JSONB,
            oid::INT8,
        ]
        .into_iter()
        .map(ty)
        .collect()
    }

    /// A stream of 3 rows of [`copy_types`] and the rows it holds.
    fn copy_stream(ext: &[u8]) -> (Vec<u8>, Vec<Vec<Value>>) {
        let u = Uuid::parse_str("9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d").unwrap();
        let mut out = header(ext);
        let mut rows = Vec::new();
        let texts = ["Zoë", "東京 🦀", &"long ".repeat(50)];
        for r in 0..3i32 {
            let mut jb = vec![1u8];
            jb.extend_from_slice(format!("{{\"row\": {r}}}").as_bytes());
            let fields = vec![
                Some(r.to_be_bytes().to_vec()),
                Some(texts[r as usize].as_bytes().to_vec()),
                Some(numeric(NUMERIC_NEG, 0, 2, &[r as u16, 2500])),
                Some((r * 1000).to_be_bytes().to_vec()),
                Some((i64::from(r) * 1_000_000).to_be_bytes().to_vec()),
                Some(u.as_bytes().to_vec()),
                if r == 1 {
                    None
                } else {
                    Some(vec![(r % 2) as u8])
                },
                Some(array(oid::INT4, &[(2, 1)], &[i4(r), None])),
                Some((f64::from(r) + 0.5).to_be_bytes().to_vec()),
                Some(vec![r as u8, 0xff]),
                Some(jb),
                None,
            ];
            tuple(&mut out, &fields);
            rows.push(vec![
                Value::Int(r.into()),
                text(texts[r as usize]),
                Value::Numeric(if r == 0 {
                    "-0.25".into()
                } else {
                    format!("-{r}.25").into()
                }),
                Value::Date(r * 1000 + PG_EPOCH_OFFSET_DAYS),
                Value::TimestampTz(i64::from(r) * 1_000_000 + PG_EPOCH_OFFSET_MICROS),
                Value::Uuid(u),
                if r == 1 {
                    Value::Null
                } else {
                    Value::Bool(r % 2 == 1)
                },
                Value::Array(vec![Value::Int(r.into()), Value::Null]),
                Value::Float(f64::from(r) + 0.5),
                text(&format!("\\x{:02x}ff", r)),
                Value::Json(format!("{{\"row\": {r}}}").into()),
                Value::Null,
            ]);
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        (out, rows)
    }

    /// Feeds `data` split at `cuts` (sorted offsets), reading rows after
    /// every chunk.
    fn read_split(data: &[u8], cuts: &[usize]) -> Result<(Vec<Vec<Value>>, bool), DecodeError> {
        let mut r = CopyBinaryReader::new(copy_types());
        let mut rows = Vec::new();
        let mut start = 0;
        for &c in cuts.iter().chain(std::iter::once(&data.len())) {
            let c = c.clamp(start, data.len());
            r.push(Bytes::copy_from_slice(&data[start..c]));
            start = c;
            while let Some(row) = r.next_row()? {
                rows.push(row);
            }
        }
        Ok((rows, r.finished()))
    }

    #[test]
    fn copy_whole_stream() {
        let (data, want) = copy_stream(&[]);
        assert_eq!(read_split(&data, &[]).unwrap(), (want, true));
    }

    #[test]
    fn copy_one_byte_at_a_time() {
        let (data, want) = copy_stream(&[]);
        let cuts: Vec<usize> = (1..data.len()).collect();
        assert_eq!(read_split(&data, &cuts).unwrap(), (want, true));
    }

    #[test]
    fn copy_random_splits() {
        let (data, want) = copy_stream(&[]);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200 {
            let mut cuts = Vec::new();
            let mut at = 0usize;
            loop {
                // xorshift64
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                at += (seed % 64) as usize;
                if at >= data.len() {
                    break;
                }
                cuts.push(at);
            }
            assert_eq!(
                read_split(&data, &cuts).unwrap(),
                (want.clone(), true),
                "{cuts:?}"
            );
        }
    }

    #[test]
    fn copy_header_extension_is_skipped() {
        let (data, want) = copy_stream(b"extension data");
        assert_eq!(read_split(&data, &[]).unwrap(), (want.clone(), true));
        let cuts: Vec<usize> = (1..data.len()).collect();
        assert_eq!(read_split(&data, &cuts).unwrap(), (want, true));
    }

    #[test]
    fn copy_truncated_stream_yields_only_whole_rows() {
        let (data, want) = copy_stream(&[]);
        for n in 0..data.len() {
            let (rows, finished) = read_split(&data[..n], &[]).unwrap();
            assert!(!finished, "prefix {n}");
            assert!(rows.len() < want.len() || n >= data.len() - 2, "prefix {n}");
            assert_eq!(rows[..], want[..rows.len()], "prefix {n}");
            // The rest completes it.
            let mut r = CopyBinaryReader::new(copy_types());
            r.push(Bytes::copy_from_slice(&data[..n]));
            let mut got = Vec::new();
            while let Some(row) = r.next_row().unwrap() {
                got.push(row);
            }
            r.push(Bytes::copy_from_slice(&data[n..]));
            while let Some(row) = r.next_row().unwrap() {
                got.push(row);
            }
            assert!(r.finished());
            assert_eq!(got, want, "prefix {n}");
            assert_eq!(r.next_row().unwrap(), None);
        }
    }

    #[test]
    fn copy_framing_errors_are_sticky() {
        // Wrong field count.
        let mut data = header(&[]);
        tuple(&mut data, &[Some(vec![0, 0, 0, 1])]);
        let mut r = CopyBinaryReader::new(copy_types());
        r.push(Bytes::from(data));
        let e = r.next_row().unwrap_err();
        assert_eq!(e.type_name, "COPY binary stream");
        assert_eq!(e.detail, "tuple has 1 fields, expected 12");
        assert_eq!(r.next_row().unwrap_err(), e);
        // Bad signature, seen as soon as its first byte arrives.
        let mut r = CopyBinaryReader::new(copy_types());
        r.push(Bytes::from_static(b"X"));
        assert_eq!(r.next_row().unwrap_err().detail, "bad signature");
        let mut r = CopyBinaryReader::new(copy_types());
        r.push(Bytes::from_static(b"PGCOPY\n\xfe"));
        assert!(r.next_row().is_err());
        // OIDs flag.
        let mut data = header(&[]);
        data[13] = 1;
        let mut r = CopyBinaryReader::new(copy_types());
        r.push(Bytes::from(data));
        assert!(r.next_row().unwrap_err().detail.contains("flags"));
        // Negative field length other than -1.
        let mut data = header(&[]);
        data.extend_from_slice(&1i16.to_be_bytes());
        data.extend_from_slice(&(-2i32).to_be_bytes());
        let mut r = CopyBinaryReader::new(vec![ty(oid::INT4)]);
        r.push(Bytes::from(data));
        assert_eq!(
            r.next_row().unwrap_err().detail,
            "field 1 has invalid length -2"
        );
    }

    #[test]
    fn lenient_rows_carry_their_undecodable_values() {
        let types = vec![ty(oid::INT4), ty(oid::TEXT)];
        let mut data = header(&[]);
        tuple(&mut data, &[Some(vec![0, 0, 0, 3]), Some(b"\xff".to_vec())]);
        tuple(&mut data, &[Some(vec![0, 0, 0, 4]), Some(b"next".to_vec())]);
        data.extend_from_slice(&(-1i16).to_be_bytes());
        let mut r = CopyBinaryReader::new(types);
        r.push(Bytes::from(data));
        let (row, errors) = r.next_row_lenient().unwrap().unwrap();
        assert_eq!(row, vec![Value::Int(3), Value::Null]);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, 1);
        assert!(errors[0].1.detail.starts_with("column 2: invalid UTF-8"));
        let (row, errors) = r.next_row_lenient().unwrap().unwrap();
        assert_eq!(row, vec![Value::Int(4), text("next")]);
        assert!(errors.is_empty());
        assert_eq!(r.next_row_lenient().unwrap(), None);
    }

    #[test]
    fn copy_value_errors_skip_the_row() {
        let types = vec![ty(oid::INT4), ty(oid::TEXT)];
        let mut data = header(&[]);
        tuple(&mut data, &[Some(vec![0, 0, 0, 1]), Some(b"ok".to_vec())]);
        tuple(
            &mut data,
            &[Some(vec![0, 0, 1]), Some(b"short int".to_vec())],
        );
        tuple(&mut data, &[Some(vec![0, 0, 0, 3]), Some(b"\xff".to_vec())]);
        tuple(&mut data, &[None, Some(b"last".to_vec())]);
        data.extend_from_slice(&(-1i16).to_be_bytes());
        let mut r = CopyBinaryReader::new(types);
        r.push(Bytes::from(data));
        assert_eq!(r.next_row().unwrap(), Some(vec![Value::Int(1), text("ok")]));
        let e = r.next_row().unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot decode integer value: column 1: expected 4 bytes, got 3"
        );
        let e = r.next_row().unwrap_err();
        assert_eq!(e.type_name, "text");
        assert!(e.detail.starts_with("column 2: invalid UTF-8"), "{e}");
        assert_eq!(r.next_row().unwrap(), Some(vec![Value::Null, text("last")]));
        assert_eq!(r.next_row().unwrap(), None);
        assert!(r.finished());
    }

    #[test]
    fn copy_reader_debug_hides_data() {
        let mut r = CopyBinaryReader::new(vec![ty(oid::TEXT)]);
        r.push(Bytes::from_static(b"PGCOPY\n\xff\r\n\0secret"));
        let d = format!("{r:?}");
        assert!(d.contains("buffered_bytes: 17"), "{d}");
        assert!(!d.contains("secret"), "{d}");
    }

    #[test]
    fn copy_zero_columns_and_empty_pushes() {
        let mut data = header(&[]);
        tuple(&mut data, &[]);
        data.extend_from_slice(&(-1i16).to_be_bytes());
        let mut r = CopyBinaryReader::new(vec![]);
        r.push(Bytes::new());
        assert_eq!(r.next_row().unwrap(), None);
        r.push(Bytes::from(data));
        r.push(Bytes::new());
        assert_eq!(r.next_row().unwrap(), Some(vec![]));
        assert_eq!(r.next_row().unwrap(), None);
        assert!(r.finished());
    }

    proptest! {
        #[test]
        fn never_panics_on_bytes(o in proptest::sample::select(super::super::test_oids()), raw in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = dec(o, &raw);
        }

        #[test]
        fn never_panics_with_any_type(o in any::<u32>(), elem in proptest::option::of(any::<u32>()), raw in proptest::collection::vec(any::<u8>(), 0..32)) {
            let t = PgType { oid: o, name: String::new(), elem };
            let _ = decode_binary(&t, &raw);
        }

        #[test]
        fn never_panics_on_array_like_input(
            o in proptest::sample::select(super::super::test_oids()),
            ndim in -1i32..8,
            dims in proptest::collection::vec((-2i32..4, any::<i32>()), 0..8),
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut raw = Vec::new();
            raw.extend_from_slice(&ndim.to_be_bytes());
            raw.extend_from_slice(&0i32.to_be_bytes());
            raw.extend_from_slice(&o.to_be_bytes());
            for (size, lb) in dims {
                raw.extend_from_slice(&size.to_be_bytes());
                raw.extend_from_slice(&lb.to_be_bytes());
            }
            raw.extend_from_slice(&body);
            let _ = dec(o, &raw);
        }

        #[test]
        fn never_panics_on_numeric_like_input(
            ndigits in 0u16..6,
            weight in any::<i16>(),
            sign in prop_oneof![Just(NUMERIC_POS), Just(NUMERIC_NEG), Just(NUMERIC_NAN), any::<u16>()],
            dscale in prop_oneof![0u16..40, any::<u16>()],
            digits in proptest::collection::vec(prop_oneof![0u16..10_000, any::<u16>()], 0..6),
        ) {
            let mut raw = numeric(sign, weight, dscale, &digits);
            raw[0..2].copy_from_slice(&ndigits.to_be_bytes());
            let _ = dec(oid::NUMERIC, &raw);
        }

        #[test]
        fn numeric_round_trip(n in any::<i64>(), scale in 0u32..=6) {
            let want = decimal_of(n, scale);
            prop_assert_eq!(ok(oid::NUMERIC, &numeric_of(n, scale)), Value::Numeric(want.into()));
        }

        #[test]
        fn copy_reader_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..8)) {
            let mut r = CopyBinaryReader::new(copy_types());
            for c in chunks {
                r.push(Bytes::from(c));
                for _ in 0..16 {
                    match r.next_row() {
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }

        #[test]
        fn copy_reader_never_panics_after_a_header(
            ncols in 0usize..4,
            tail in proptest::collection::vec(any::<u8>(), 0..200),
            cuts in proptest::collection::vec(0usize..220, 0..6),
        ) {
            let types: Vec<PgType> = [oid::INT4, oid::TEXT, oid::NUMERIC, oid::INT4_ARRAY][..ncols]
                .iter().map(|&o| ty(o)).collect();
            let mut data = header(&[]);
            data.extend_from_slice(&(ncols as i16).to_be_bytes());
            data.extend_from_slice(&tail);
            let mut cuts = cuts;
            cuts.sort_unstable();
            let mut r = CopyBinaryReader::new(types);
            let mut start = 0;
            for c in cuts.into_iter().chain(std::iter::once(data.len())) {
                let c = c.clamp(start, data.len());
                r.push(Bytes::copy_from_slice(&data[start..c]));
                start = c;
                for _ in 0..64 {
                    match r.next_row() {
                        Ok(Some(_)) | Err(_) => {}
                        Ok(None) => break,
                    }
                }
            }
        }

        #[test]
        fn copy_any_split_gives_the_same_rows(cuts in proptest::collection::vec(0usize..1200, 0..12)) {
            let (data, want) = copy_stream(&[]);
            let mut cuts = cuts;
            cuts.sort_unstable();
            prop_assert_eq!(read_split(&data, &cuts).unwrap(), (want, true));
        }
    }
}
