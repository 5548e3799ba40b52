//! The mock's own validation of a record against schema.json's facts
//! (types, formats, required/nullable, enums, bounds) — written for the
//! mock, independent of the product's `model::validate`, so that a
//! validation bug in the product cannot hide behind the same bug here.
//!
//! Values are judged as they were sent: a number is checked on its exact
//! text (bounds compared as exact decimals), a string after unescaping.
//! Reasons name the field and the rule, never the value.

use std::cmp::Ordering;
use std::fmt;

use crate::mock_api::parse::Wire;
use crate::model::schema::{FieldDef, FieldId, FieldType, Format, TypeDef};

/// One rule a record breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    /// Field name (`record` for the element as a whole).
    pub field: String,
    /// What is wrong, without the value.
    pub reason: String,
}

impl Problem {
    pub fn new(field: &str, reason: impl Into<String>) -> Problem {
        Problem {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Joins problems into one reason text.
pub(crate) fn describe(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The value of each field of `t`, by field id (`None`: absent).
pub(crate) fn by_field<'r, 'a>(
    t: &TypeDef,
    fields: &'r [(FieldId, Wire<'a>)],
) -> Vec<Option<&'r Wire<'a>>> {
    let mut out = vec![None; t.fields.len()];
    for (f, v) in fields {
        out[*f as usize] = Some(v);
    }
    out
}

/// Checks the fields of a record of type `t`. Empty when valid.
pub(crate) fn validate(t: &TypeDef, values: &[Option<&Wire>]) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (def, v) in t.fields.iter().zip(values) {
        let reason = match v {
            None if def.required => Some("required field is missing".to_string()),
            None => None,
            Some(Wire::Null) if def.required => Some("required field is null".to_string()),
            Some(Wire::Null) if !def.nullable && !null_in_enum(def) => {
                Some("must not be null (leave it out instead)".to_string())
            }
            Some(Wire::Null) => None,
            Some(v) => check_value(def, v),
        };
        if let Some(reason) = reason {
            problems.push(Problem::new(&def.name, reason));
        }
    }
    problems
}

fn null_in_enum(def: &FieldDef) -> bool {
    def.enumeration
        .as_ref()
        .is_some_and(|e| e.iter().any(|v| v.is_none()))
}

fn check_value(def: &FieldDef, v: &Wire) -> Option<String> {
    let type_ok = match (def.ty, v) {
        (FieldType::String, Wire::Str(_)) => true,
        (FieldType::Number, Wire::Num(_)) => true,
        (FieldType::Integer, Wire::Num(n)) => is_integer(n),
        (FieldType::Boolean, Wire::Bool(_)) => true,
        (FieldType::IntegerOrString, Wire::Str(_)) => true,
        (FieldType::IntegerOrString, Wire::Num(n)) => is_integer(n),
        _ => false,
    };
    if !type_ok {
        return Some(
            match def.ty {
                FieldType::String => "must be a string",
                FieldType::Number => "must be a number",
                FieldType::Integer => "must be an integer",
                FieldType::Boolean => "must be a boolean",
                FieldType::IntegerOrString => "must be an integer or a date-time string",
            }
            .to_string(),
        );
    }
    if let Wire::Num(n) = v {
        if !n.parse::<f64>().is_ok_and(f64::is_finite) {
            return Some("must be a finite number".into());
        }
    }
    if let Some(reason) = check_format(def.format, v) {
        return Some(reason.to_string());
    }
    if let (Some(allowed), Wire::Str(s)) = (&def.enumeration, v) {
        if !allowed.iter().any(|a| a.as_deref() == Some(&**s)) {
            let list: Vec<&str> = allowed.iter().flatten().map(|s| s.as_str()).collect();
            return Some(format!("must be one of {}", list.join(", ")));
        }
    }
    if let Wire::Num(n) = v {
        let cmp = |bound: f64| compare_decimal(n, &format!("{bound}"));
        if let Some(min) = def.minimum {
            if cmp(min) == Some(Ordering::Less) {
                return Some(format!("must be >= {min}"));
            }
        }
        if let Some(min) = def.exclusive_minimum {
            if cmp(min) != Some(Ordering::Greater) {
                return Some(format!("must be > {min}"));
            }
        }
        if let Some((lo, hi)) = def.range {
            if cmp(lo) == Some(Ordering::Less) || cmp(hi) == Some(Ordering::Greater) {
                return Some(format!("must be between {lo} and {hi}"));
            }
        }
    }
    None
}

fn check_format(format: Option<Format>, v: &Wire) -> Option<&'static str> {
    match (format?, v) {
        (Format::Uuid, Wire::Str(s)) if !is_uuid(s) => {
            Some("must be a UUID (e.g. 550e8400-e29b-41d4-a716-446655440000)")
        }
        (Format::DateTime, Wire::Str(s)) if !is_date_time(s) => {
            Some("must be an RFC 3339 date-time (e.g. 2024-01-15T14:30:00Z)")
        }
        (Format::Date, Wire::Str(s)) if !is_date(s.as_bytes()) => {
            Some("must be a date YYYY-MM-DD (e.g. 2001-04-30)")
        }
        (Format::CountryCode, Wire::Str(s))
            if !(s.len() == 2 && s.bytes().all(|b| b.is_ascii_uppercase())) =>
        {
            Some(
                "must be two upper-case letters, ISO 3166-1 alpha-2 (e.g. CA); \
                 add transform = \"upper\" if the source is lower-case",
            )
        }
        (Format::EpochIntegerOrIsoDateTime, Wire::Num(n))
            if compare_decimal(n, "0") != Some(Ordering::Greater) =>
        {
            Some("must be a positive integer epoch")
        }
        (Format::EpochIntegerOrIsoDateTime, Wire::Str(s)) if !is_date_time(s) => {
            Some("must be a positive integer or an RFC 3339 date-time")
        }
        _ => None,
    }
}

/// JSON number text without a fraction or exponent.
fn is_integer(n: &str) -> bool {
    !n.bytes().any(|b| matches!(b, b'.' | b'e' | b'E'))
}

/// The hyphenated UUID form, any case (`8-4-4-4-12` hex digits).
pub(crate) fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn digits(b: &[u8]) -> Option<u32> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
}

/// `YYYY-MM-DD`, a real calendar day.
pub(crate) fn is_date(b: &[u8]) -> bool {
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let (Some(y), Some(m), Some(d)) = (digits(&b[0..4]), digits(&b[5..7]), digits(&b[8..10]))
    else {
        return false;
    };
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&d)
}

/// RFC 3339 `date-time`: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
pub(crate) fn is_date_time(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 20 || !is_date(&b[..10]) || !matches!(b[10], b'T' | b't') {
        return false;
    }
    let t = &b[11..];
    if t[2] != b':' || t[5] != b':' {
        return false;
    }
    let (Some(h), Some(mi), Some(sec)) = (digits(&t[0..2]), digits(&t[3..5]), digits(&t[6..8]))
    else {
        return false;
    };
    if h > 23 || mi > 59 || sec > 60 {
        return false;
    }
    let mut rest = &t[8..];
    if let Some(frac) = rest.strip_prefix(b".") {
        let n = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return false;
        }
        rest = &frac[n..];
    }
    match rest {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => {
            matches!((digits(&[*h1, *h2]), digits(&[*m1, *m2])), (Some(h), Some(m)) if h <= 23 && m <= 59)
        }
        _ => false,
    }
}

/// A decimal in normal form: sign, significant digits (no leading or
/// trailing zeros; empty for zero) and the exponent `e` of `0.digits × 10^e`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decimal {
    neg: bool,
    digits: Vec<u8>,
    exp: i64,
}

impl Decimal {
    /// Normalises JSON number text; `None` if it is not one.
    pub fn parse(text: &str) -> Option<Decimal> {
        let (neg, rest) = match text.strip_prefix('-') {
            Some(r) => (true, r),
            None => (false, text),
        };
        let (mantissa, e) = match rest.find(['e', 'E']) {
            Some(i) => (&rest[..i], rest[i + 1..].parse::<i64>().ok()?),
            None => (rest, 0),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let all: Vec<u8> = int.bytes().chain(frac.bytes()).collect();
        let lead = all.iter().take_while(|&&d| d == b'0').count();
        let trail = all[lead..].iter().rev().take_while(|&&d| d == b'0').count();
        let digits = all[lead..all.len() - trail].to_vec();
        if digits.is_empty() {
            return Some(Decimal {
                neg: false,
                digits,
                exp: 0,
            });
        }
        Some(Decimal {
            neg,
            exp: (int.len() as i64 - lead as i64).checked_add(e)?,
            digits,
        })
    }

    fn cmp_abs(&self, other: &Decimal) -> Ordering {
        match (self.digits.is_empty(), other.digits.is_empty()) {
            (true, true) => return Ordering::Equal,
            (true, false) => return Ordering::Less,
            (false, true) => return Ordering::Greater,
            _ => {}
        }
        self.exp
            .cmp(&other.exp)
            .then_with(|| self.digits.cmp(&other.digits))
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Decimal) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Decimal {
    fn cmp(&self, other: &Decimal) -> Ordering {
        match (self.neg, other.neg) {
            (false, true) => Ordering::Greater,
            (true, false) => Ordering::Less,
            (false, false) => self.cmp_abs(other),
            (true, true) => other.cmp_abs(self),
        }
    }
}

/// Compares two JSON number texts exactly; `None` if either is not one.
pub(crate) fn compare_decimal(a: &str, b: &str) -> Option<Ordering> {
    Some(Decimal::parse(a)?.cmp(&Decimal::parse(b)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::schema::schema;
    use std::borrow::Cow;

    #[test]
    fn decimals_compare_exactly() {
        use Ordering::*;
        let cases = [
            ("0", "0", Equal),
            ("-0", "0", Equal),
            ("0.0", "-0.00", Equal),
            ("12.50", "12.5", Equal),
            ("1e2", "100", Equal),
            ("1E-400", "0", Greater),
            ("-1E-400", "0", Less),
            ("0.1", "0.10000000000000000000000000001", Less),
            (
                "123456789012345678901234567890",
                "1.2345678901234567890123456789e29",
                Equal,
            ),
            ("-90.000001", "-90", Less),
            ("180", "180.0", Equal),
            ("-5", "-50", Greater),
            ("9.99", "10", Less),
        ];
        for (a, b, want) in cases {
            assert_eq!(compare_decimal(a, b), Some(want), "{a} vs {b}");
        }
        for bad in ["", "-", "1.2.3", "x", "1e"] {
            assert_eq!(Decimal::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn formats() {
        for ok in [
            "2024-01-15T14:30:00Z",
            "2024-02-29T23:59:60.123456Z",
            "2024-01-15t14:30:00+05:30",
            "1999-12-31T00:00:00.1-08:00",
        ] {
            assert!(is_date_time(ok), "{ok}");
        }
        for bad in [
            "2024-01-15",
            "2024-01-15 14:30:00Z",
            "2023-02-29T00:00:00Z",
            "2024-01-15T24:00:00Z",
            "2024-01-15T14:30:00",
            "2024-01-15T14:30:00.Z",
            "2024-01-15T14:30:00+0530",
            "2024-13-01T00:00:00Z",
        ] {
            assert!(!is_date_time(bad), "{bad}");
        }
        assert!(is_date(b"2000-02-29") && !is_date(b"1900-02-29") && !is_date(b"2024-1-01"));
        assert!(is_uuid("550e8400-E29B-41d4-a716-446655440000"));
        for bad in [
            "550e8400e29b41d4a716446655440000",
            "{550e8400-e29b-41d4-a716-446655440000}",
            "550e8400-e29b-41d4-a716-44665544000g",
            "42",
        ] {
            assert!(!is_uuid(bad), "{bad}");
        }
    }

    fn problems(ty: &str, fields: &[(&str, Wire)]) -> Vec<String> {
        let s = schema();
        let t = s.ty(s.type_id(ty).unwrap());
        let fields: Vec<(FieldId, Wire)> = fields
            .iter()
            .map(|(n, v)| (t.field(n).unwrap(), v.clone()))
            .collect();
        validate(t, &by_field(t, &fields))
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    const U1: &str = "550e8400-e29b-41d4-a716-446655440000";
    const U2: &str = "550e8400-e29b-41d4-a716-446655440001";

    fn s(v: &str) -> Wire<'_> {
        Wire::Str(Cow::Borrowed(v))
    }

    #[test]
    fn table_of_rules() {
        let tx = |field: &'static str, v: Option<Wire<'static>>| {
            let mut f = vec![
                ("transaction_id", s(U1)),
                ("shop_id", s(U2)),
                ("region", s("CA")),
                ("savings", Wire::Num("0")),
                ("amount", Wire::Num("12.50")),
            ];
            f.retain(|(n, _)| *n != field);
            if let Some(v) = v {
                f.push((field, v));
            }
            problems("transactions", &f)
        };
        type Case = (&'static str, Option<Wire<'static>>, Option<&'static str>);
        let cases: Vec<Case> = vec![
            ("amount", Some(Wire::Num("12.50")), None),
            ("shop_id", None, Some("shop_id: required field is missing")),
            (
                "shop_id",
                Some(Wire::Null),
                Some("shop_id: required field is null"),
            ),
            ("shop_id", Some(s("42")), Some("shop_id: must be a UUID")),
            (
                "region",
                Some(s("ca")),
                Some("region: must be two upper-case"),
            ),
            ("amount", Some(Wire::Num("0")), Some("amount: must be > 0")),
            (
                "amount",
                Some(Wire::Num("-0.01")),
                Some("amount: must be > 0"),
            ),
            ("amount", Some(Wire::Num("1E-400")), None),
            (
                "amount",
                Some(Wire::Num("123456789012345678901234567.891")),
                None,
            ),
            (
                "amount",
                Some(Wire::Num("1e999")),
                Some("amount: must be a finite"),
            ),
            ("amount", Some(s("12")), Some("amount: must be a number")),
            (
                "savings",
                Some(Wire::Num("-1")),
                Some("savings: must be >= 0"),
            ),
            (
                "created",
                Some(s("yesterday")),
                Some("created: must be an RFC 3339"),
            ),
            ("created", Some(Wire::Null), None),
            (
                "discount_name",
                Some(Wire::Null),
                Some("discount_name: must not be null"),
            ),
            (
                "is_deleted",
                Some(Wire::Num("1")),
                Some("is_deleted: must be a boolean"),
            ),
        ];
        for (field, v, want) in cases {
            let got = tx(field, v.clone());
            match want {
                None => assert!(got.is_empty(), "{field} {v:?}: {got:?}"),
                Some(w) => {
                    assert_eq!(got.len(), 1, "{field} {v:?}: {got:?}");
                    assert!(got[0].starts_with(w), "{field} {v:?}: {got:?}");
                }
            }
        }
        let ia = |ts: Wire<'static>| {
            problems(
                "interactions",
                &[
                    ("interaction_type", s("SHARE")),
                    ("item_type", s("SHOP")),
                    ("item_id", s(U1)),
                    ("event_timestamp", ts),
                    ("source", Wire::Null),
                ],
            )
        };
        assert!(ia(Wire::Num("1700000000000")).is_empty());
        assert!(ia(s("2024-01-15T14:30:00Z")).is_empty());
        assert_eq!(
            ia(Wire::Num("0")),
            ["event_timestamp: must be a positive integer epoch"]
        );
        assert_eq!(
            ia(Wire::Num("1.5")),
            ["event_timestamp: must be an integer or a date-time string"]
        );
        let br = |lat: &'static str| {
            problems(
                "branches",
                &[
                    ("branch_id", s(U1)),
                    ("shop_id", s(U2)),
                    ("name", s("b")),
                    ("region", s("GB")),
                    ("latitude", Wire::Num(lat)),
                ],
            )
        };
        assert!(br("-90").is_empty() && br("51.500000").is_empty());
        assert_eq!(br("90.0000001").len(), 1);
        assert!(
            problems("interactions", &[("interaction_type", s("CLICK"))])[0]
                .starts_with("interaction_type: must be one of FILTER_CLICK")
        );
    }
}
