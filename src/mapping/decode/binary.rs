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
pub(super) const NUMERIC_NEG: u16 = 0x4000;
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
pub(super) mod tests;
