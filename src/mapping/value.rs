//! The one representation of a source column value.
//!
//! Every reader produces [`Value`]s: rows read with `COPY … (FORMAT binary)`
//! are decoded by [`crate::mapping::decode::binary`], pgoutput text tuples by
//! [`crate::mapping::decode::text`]. The mapping engine only ever sees
//! `Value`s, so a row looks the same whichever way it was read.

use std::cmp::Ordering;
use std::fmt::Write as _;

use uuid::Uuid;

/// Microseconds between 1970-01-01 and 2000-01-01 (PostgreSQL's epoch).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;
/// Days between 1970-01-01 and 2000-01-01.
pub const PG_EPOCH_OFFSET_DAYS: i32 = 10_957;

/// A decoded column value.
///
/// Dates and timestamps keep PostgreSQL's `infinity` / `-infinity` as
/// `i32::MAX`/`i32::MIN` and `i64::MAX`/`i64::MIN`, like PostgreSQL itself.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// `bool`.
    Bool(bool),
    /// `int2`, `int4`, `int8`, `oid`.
    Int(i64),
    /// `float4`, `float8` (may be NaN or ±infinity).
    Float(f64),
    /// `numeric`, as its exact decimal text (`"12.50"`, `"NaN"`, `"Infinity"`).
    Numeric(Box<str>),
    /// Text-like types (`text`, `varchar`, `bpchar`, `name`, enums, and any
    /// type read through its text form).
    Text(Box<str>),
    /// `uuid`.
    Uuid(Uuid),
    /// `date`: days since 1970-01-01.
    Date(i32),
    /// `timestamp without time zone`: microseconds since 1970-01-01 00:00,
    /// wall-clock time with no zone attached.
    Timestamp(i64),
    /// `timestamptz`: microseconds since 1970-01-01 00:00 UTC.
    TimestampTz(i64),
    /// `json` / `jsonb`, as JSON text.
    Json(Box<str>),
    /// A one-dimensional array (multi-dimensional arrays are flattened).
    Array(Vec<Value>),
}

impl Value {
    /// Is this SQL NULL?
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// A short name of the value's kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "integer",
            Value::Float(_) => "float",
            Value::Numeric(_) => "numeric",
            Value::Text(_) => "text",
            Value::Uuid(_) => "uuid",
            Value::Date(_) => "date",
            Value::Timestamp(_) => "timestamp",
            Value::TimestampTz(_) => "timestamptz",
            Value::Json(_) => "json",
            Value::Array(_) => "array",
        }
    }

    /// The value as text, the way the `uuid5` formula and `map` keys see it:
    /// integers in decimal, text verbatim, UUIDs lower-case hyphenated,
    /// booleans `true`/`false`, dates `YYYY-MM-DD`, timestamps RFC 3339.
    /// Returns `None` for NULL.
    pub fn to_text(&self) -> Option<String> {
        let mut out = String::new();
        match self {
            Value::Null => return None,
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Value::Float(f) => out.push_str(&format_float(*f)),
            Value::Numeric(s) | Value::Text(s) | Value::Json(s) => out.push_str(s),
            Value::Uuid(u) => {
                let _ = write!(out, "{}", u.hyphenated());
            }
            Value::Date(d) => out.push_str(&crate::mapping::time::format_date(*d)?),
            Value::Timestamp(t) => out.push_str(&crate::mapping::time::format_naive(*t)?),
            Value::TimestampTz(t) => out.push_str(&crate::mapping::time::format_rfc3339(*t)?),
            Value::Array(items) => {
                out.push('{');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&v.to_text().unwrap_or_else(|| "NULL".into()));
                }
                out.push('}');
            }
        }
        Some(out)
    }

    /// Total order used to compare key values with the order PostgreSQL's
    /// `ORDER BY` gives (text compared byte-wise, as with `COLLATE "C"`).
    /// Values of different kinds order by kind; NULL sorts last, as in
    /// PostgreSQL.
    pub fn key_cmp(&self, other: &Value) -> Ordering {
        use Value::*;
        match (self, other) {
            (Null, Null) => Ordering::Equal,
            (Null, _) => Ordering::Greater,
            (_, Null) => Ordering::Less,
            (Bool(a), Bool(b)) => a.cmp(b),
            (Int(a), Int(b)) => a.cmp(b),
            (Float(a), Float(b)) => a.total_cmp(b),
            (Numeric(a), Numeric(b)) => cmp_decimal(a, b),
            (Text(a), Text(b)) | (Json(a), Json(b)) => a.as_bytes().cmp(b.as_bytes()),
            (Uuid(a), Uuid(b)) => a.as_bytes().cmp(b.as_bytes()),
            (Date(a), Date(b)) => a.cmp(b),
            (Timestamp(a), Timestamp(b)) | (TimestampTz(a), TimestampTz(b)) => a.cmp(b),
            (Array(a), Array(b)) => {
                for (x, y) in a.iter().zip(b.iter()) {
                    let o = x.key_cmp(y);
                    if o != Ordering::Equal {
                        return o;
                    }
                }
                a.len().cmp(&b.len())
            }
            (a, b) => a.rank().cmp(&b.rank()),
        }
    }

    fn rank(&self) -> u8 {
        match self {
            Value::Bool(_) => 0,
            Value::Int(_) => 1,
            Value::Float(_) => 2,
            Value::Numeric(_) => 3,
            Value::Text(_) => 4,
            Value::Uuid(_) => 5,
            Value::Date(_) => 6,
            Value::Timestamp(_) => 7,
            Value::TimestampTz(_) => 8,
            Value::Json(_) => 9,
            Value::Array(_) => 10,
            Value::Null => 11,
        }
    }
}

/// A `real` (float4) as the `f64` of its shortest decimal form — the digits
/// PostgreSQL prints (`0.1`, not `0.10000000149011612`).
pub fn widen_f32(x: f32) -> f64 {
    if x.is_finite() {
        format!("{x:e}").parse().unwrap_or(x as f64)
    } else {
        x as f64
    }
}

/// Formats a float the way PostgreSQL's shortest-exact output does
/// (`1.5`, `NaN`, `Infinity`, `-Infinity`).
pub fn format_float(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f == f64::INFINITY {
        "Infinity".into()
    } else if f == f64::NEG_INFINITY {
        "-Infinity".into()
    } else {
        let mut s = format!("{f}");
        if s == "-0" {
            s = "-0".into();
        }
        s
    }
}

/// Compares two decimal strings numerically (`NaN` sorts above everything,
/// as in PostgreSQL). Falls back to byte order for malformed input.
pub fn cmp_decimal(a: &str, b: &str) -> Ordering {
    fn special(s: &str) -> Option<i8> {
        match s {
            "NaN" => Some(2),
            "Infinity" => Some(1),
            "-Infinity" => Some(-1),
            _ => None,
        }
    }
    match (special(a), special(b)) {
        (Some(x), Some(y)) => return x.cmp(&y),
        (Some(x), None) => {
            return if x > 0 {
                Ordering::Greater
            } else {
                Ordering::Less
            }
        }
        (None, Some(y)) => {
            return if y > 0 {
                Ordering::Less
            } else {
                Ordering::Greater
            }
        }
        (None, None) => {}
    }
    let (na, ia, fa) = split_decimal(a);
    let (nb, ib, fb) = split_decimal(b);
    let a_zero = ia.is_empty() && fa.bytes().all(|c| c == b'0');
    let b_zero = ib.is_empty() && fb.bytes().all(|c| c == b'0');
    let na = na && !a_zero;
    let nb = nb && !b_zero;
    let magnitude = || {
        ia.len()
            .cmp(&ib.len())
            .then_with(|| ia.cmp(ib))
            .then_with(|| {
                let fa = fa.trim_end_matches('0');
                let fb = fb.trim_end_matches('0');
                fa.cmp(fb)
            })
    };
    match (na, nb) {
        (false, false) => magnitude(),
        (true, true) => magnitude().reverse(),
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
    }
}

/// Splits `-0012.340` into (negative, "12", "340").
fn split_decimal(s: &str) -> (bool, &str, &str) {
    let (neg, rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (int, frac) = rest.split_once('.').unwrap_or((rest, ""));
    (neg, int.trim_start_matches('0'), frac)
}

/// What the mapping engine knows about a column's PostgreSQL type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgType {
    /// The type's OID (for domains, the base type's OID).
    pub oid: u32,
    /// The type's name as `format_type` prints it (`integer`, `text[]`…).
    pub name: String,
    /// For arrays, the element type's OID.
    pub elem: Option<u32>,
}

/// Well-known built-in type OIDs (from `pg_type.dat`, stable across versions).
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
    pub const BOOL_ARRAY: u32 = 1000;
    pub const INT2_ARRAY: u32 = 1005;
    pub const INT4_ARRAY: u32 = 1007;
    pub const TEXT_ARRAY: u32 = 1009;
    pub const BPCHAR_ARRAY: u32 = 1014;
    pub const VARCHAR_ARRAY: u32 = 1015;
    pub const INT8_ARRAY: u32 = 1016;
    pub const FLOAT4_ARRAY: u32 = 1021;
    pub const FLOAT8_ARRAY: u32 = 1022;
    pub const DATE_ARRAY: u32 = 1182;
    pub const TIMESTAMP_ARRAY: u32 = 1115;
    pub const TIMESTAMPTZ_ARRAY: u32 = 1185;
    pub const NUMERIC_ARRAY: u32 = 1231;
    pub const UUID_ARRAY: u32 = 2951;
    pub const JSON_ARRAY: u32 = 199;
    pub const JSONB_ARRAY: u32 = 3807;

    /// The element type of a built-in array type.
    pub fn array_elem(oid: u32) -> Option<u32> {
        Some(match oid {
            BOOL_ARRAY => BOOL,
            INT2_ARRAY => INT2,
            INT4_ARRAY => INT4,
            INT8_ARRAY => INT8,
            TEXT_ARRAY => TEXT,
            BPCHAR_ARRAY => BPCHAR,
            VARCHAR_ARRAY => VARCHAR,
            FLOAT4_ARRAY => FLOAT4,
            FLOAT8_ARRAY => FLOAT8,
            DATE_ARRAY => DATE,
            TIMESTAMP_ARRAY => TIMESTAMP,
            TIMESTAMPTZ_ARRAY => TIMESTAMPTZ,
            NUMERIC_ARRAY => NUMERIC,
            UUID_ARRAY => UUID,
            JSON_ARRAY => JSON,
            JSONB_ARRAY => JSONB,
            _ => return None,
        })
    }

    /// Types decoded natively (anything else is read through its text form).
    pub fn is_native(oid: u32) -> bool {
        matches!(
            oid,
            BOOL | CHAR
                | NAME
                | INT8
                | INT2
                | INT4
                | TEXT
                | OID
                | JSON
                | FLOAT4
                | FLOAT8
                | BPCHAR
                | VARCHAR
                | DATE
                | TIMESTAMP
                | TIMESTAMPTZ
                | NUMERIC
                | UUID
                | JSONB
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_order_is_numeric() {
        let cases = [
            ("1", "2", Ordering::Less),
            ("10", "9", Ordering::Greater),
            ("-10", "-9", Ordering::Less),
            ("1.50", "1.5", Ordering::Equal),
            ("0.0", "-0", Ordering::Equal),
            ("-1", "0", Ordering::Less),
            ("NaN", "1e9", Ordering::Greater),
            ("-Infinity", "-1", Ordering::Less),
            ("0012.3", "12.30", Ordering::Equal),
            ("12.31", "12.3", Ordering::Greater),
        ];
        for (a, b, want) in cases {
            assert_eq!(cmp_decimal(a, b), want, "{a} vs {b}");
        }
    }

    #[test]
    fn key_order_matches_postgres_c_collation() {
        let a = Value::Text("B".into());
        let b = Value::Text("a".into());
        assert_eq!(a.key_cmp(&b), Ordering::Less);
        assert_eq!(Value::Null.key_cmp(&Value::Int(1)), Ordering::Greater);
        assert_eq!(Value::Int(-5).key_cmp(&Value::Int(3)), Ordering::Less);
    }

    #[test]
    fn text_form_for_uuid5() {
        assert_eq!(Value::Int(42).to_text().unwrap(), "42");
        let u = Uuid::parse_str("9B1DEB4D-3B7D-4BAD-9BDD-2B0D7B3DCB6D").unwrap();
        assert_eq!(
            Value::Uuid(u).to_text().unwrap(),
            "9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d"
        );
        assert_eq!(Value::Text("Zoë".into()).to_text().unwrap(), "Zoë");
        assert_eq!(Value::Null.to_text(), None);
    }
}
