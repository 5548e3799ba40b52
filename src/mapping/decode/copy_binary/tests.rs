//! Tests of the binary COPY stream reader ([`super::CopyBinaryReader`]).

use super::super::binary::tests::{array, i4, numeric, text, ty};
use super::super::binary::NUMERIC_NEG;
use super::*;
use crate::mapping::value::{oid, PG_EPOCH_OFFSET_DAYS, PG_EPOCH_OFFSET_MICROS};
use proptest::prelude::*;
use uuid::Uuid;

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
