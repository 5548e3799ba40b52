//! Tests of the binary value decoders ([`super::decode_binary`]).

use super::*;
use crate::mapping::decode::text::decode_text;
use crate::mapping::time;
use proptest::prelude::*;

pub(in crate::mapping::decode) fn ty(o: u32) -> PgType {
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

pub(in crate::mapping::decode) fn text(s: &str) -> Value {
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
pub(in crate::mapping::decode) fn numeric(
    sign: u16,
    weight: i16,
    dscale: u16,
    digits: &[u16],
) -> Vec<u8> {
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
pub(in crate::mapping::decode) fn array(
    elem: u32,
    dims: &[(i32, i32)],
    items: &[Option<Vec<u8>>],
) -> Vec<u8> {
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

pub(in crate::mapping::decode) fn i4(n: i32) -> Option<Vec<u8>> {
    Some(n.to_be_bytes().to_vec())
}

pub(in crate::mapping::decode) fn s(t: &str) -> Option<Vec<u8>> {
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
}
