//! Micro-benchmarks of the per-row hot path (criterion):
//!
//! - `pgoutput/decode_insert`: [`pgoutput::decode`] of an Insert message of the
//!   10-column `purchase` row the e2e benchmark uses;
//! - `decode_text/row`: [`decode_text`] of its 10 text values;
//! - `map_row/transactions`: [`CompiledMapping::map_row`] with the e2e
//!   benchmark's transactions mapping;
//! - `record/to_json`: [`Record::to_json`] of the mapped record;
//! - `fingerprint/xxh3_64`: [`xxh3_64`] of that JSON;
//! - `copy_binary/1000_rows`: [`CopyBinaryReader`] over a 1000-row
//!   `COPY … (FORMAT binary)` buffer (throughput per row);
//! - `row_total/*`: the chain per row for both wire forms.
//!
//! Every benchmark but `copy_binary` handles one row per iteration, so its
//! time is ns/row; `copy_binary` reports elements (rows)/s, and ns/row =
//! time / 1000. Run: `cargo bench --bench hot_path` (a short
//! summary in ns/row is printed at the end).

#[path = "support/purchase.rs"]
mod purchase;

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{criterion_group, Criterion, Throughput};

use cobi_sync::config::load_str;
use cobi_sync::mapping::decode::binary::CopyBinaryReader;
use cobi_sync::mapping::decode::text::decode_text;
use cobi_sync::mapping::engine::{Column, CompiledMapping, MapContext};
use cobi_sync::mapping::value::{oid, PgType, Value};
use cobi_sync::source::replication::pgoutput::{self, Message, TupleValue};

/// The settings around the e2e benchmark's mappings.
const CONFIG_HEAD: &str = r#"
[source]
url = "postgres://bench@127.0.0.1:5432/bench"
mode = "replication"

[api]
base_url = "http://127.0.0.1:9"
api_key_env = "COBI_BENCH_UNUSED_KEY"

[state]
dir = "/tmp/cobi-sync-hot-path-unused"

"#;

/// The `purchase` columns: name, OID, text value of the sample row.
const COLUMNS: [(&str, u32, &str); 10] = [
    ("id", oid::INT8, "734512"),
    ("shop_ref", oid::INT4, "513"),
    ("member_ref", oid::INT4, "34513"),
    ("promo_ref", oid::INT4, "13"),
    ("outlet_ref", oid::INT4, "1513"),
    ("country", oid::TEXT, "gb"),
    ("channel", oid::TEXT, "online"),
    ("saved", oid::NUMERIC, "5.12"),
    ("total", oid::NUMERIC, "346.12"),
    (
        "modified_at",
        oid::TIMESTAMPTZ,
        "2024-01-09 12:01:52.123456+00",
    ),
];

fn types() -> Vec<PgType> {
    COLUMNS
        .iter()
        .map(|(_, o, _)| PgType {
            oid: *o,
            name: String::new(),
            elem: None,
        })
        .collect()
}

fn columns() -> Vec<Column> {
    COLUMNS
        .iter()
        .zip(types())
        .map(|((n, _, _), ty)| Column {
            name: (*n).into(),
            ty,
        })
        .collect()
}

/// A pgoutput Insert message of the sample row (relation OID 16400).
fn insert_message() -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(16400);
    b.put_u8(b'N');
    b.put_i16(COLUMNS.len() as i16);
    for (_, _, text) in COLUMNS {
        b.put_u8(b't');
        b.put_i32(text.len() as i32);
        b.put_slice(text.as_bytes());
    }
    b.freeze()
}

/// The binary send form of `numeric` for a non-negative decimal with two
/// fraction digits given in hundredths.
fn numeric_binary(hundredths: u64, out: &mut BytesMut) {
    let int = hundredths / 100;
    let frac = (hundredths % 100) * 100; // one base-10000 digit
    let mut int_digits = Vec::new();
    let mut x = int;
    while x > 0 {
        int_digits.push((x % 10_000) as i16);
        x /= 10_000;
    }
    int_digits.reverse();
    let mut digits = int_digits.clone();
    let weight = if int_digits.is_empty() {
        -1
    } else {
        int_digits.len() as i16 - 1
    };
    if frac != 0 {
        digits.push(frac as i16);
    }
    out.put_i32(8 + 2 * digits.len() as i32);
    out.put_i16(digits.len() as i16);
    out.put_i16(if digits.is_empty() { 0 } else { weight });
    out.put_u16(0); // sign +
    out.put_u16(2); // dscale
    for d in digits {
        out.put_i16(d);
    }
}

/// `COPY (SELECT <the 10 columns> FROM purchase) TO STDOUT (FORMAT binary)`
/// of `n` generated rows, like the e2e benchmark's data.
fn copy_buffer(n: u64) -> Bytes {
    let mut b = BytesMut::new();
    b.put_slice(b"PGCOPY\n\xff\r\n\0");
    b.put_i32(0);
    b.put_i32(0);
    let countries = ["gb", "us", "ca", "fr"];
    for g in 1..=n {
        b.put_i16(10);
        b.put_i32(8);
        b.put_i64(g as i64);
        for v in [1 + g % 1000, 1 + g % 50000] {
            b.put_i32(4);
            b.put_i32(v as i32);
        }
        if g % 3 == 0 {
            b.put_i32(-1);
        } else {
            b.put_i32(4);
            b.put_i32((1 + g % 500) as i32);
        }
        b.put_i32(4);
        b.put_i32((1 + g % 2000) as i32);
        let c = countries[(g % 4) as usize];
        b.put_i32(c.len() as i32);
        b.put_slice(c.as_bytes());
        let ch = if g % 2 == 0 { "online" } else { "in-store" };
        b.put_i32(ch.len() as i32);
        b.put_slice(ch.as_bytes());
        numeric_binary(g % 1000, &mut b);
        numeric_binary(100 + g % 100_000, &mut b);
        // 2024-01-01 00:00:00 UTC + g s, µs since 2000-01-01.
        b.put_i32(8);
        b.put_i64((757_382_400 + g as i64) * 1_000_000);
    }
    b.put_i16(-1);
    b.freeze()
}

struct Fixture {
    message: Bytes,
    types: Vec<PgType>,
    texts: Vec<Bytes>,
    row: Vec<Value>,
    compiled: CompiledMapping,
    record: cobi_sync::model::record::Record,
    json: Vec<u8>,
    copy: Bytes,
}

const COPY_ROWS: u64 = 1000;

fn fixture() -> Fixture {
    let settings = load_str(
        &format!("{CONFIG_HEAD}{}", purchase::MAPPINGS),
        "hot_path.rs",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mapping = settings
        .mappings
        .iter()
        .find(|m| m.id.starts_with("transactions"))
        .expect("transactions mapping")
        .clone();
    let ctx = MapContext::from_settings(&settings);
    let compiled = CompiledMapping::compile(&mapping, &["id".into()], &columns(), ctx)
        .unwrap_or_else(|e| panic!("compile: {}", e.join("; ")));
    let message = insert_message();
    let texts: Vec<Bytes> = match pgoutput::decode(&message).expect("decodes") {
        Message::Insert { new, .. } => new
            .0
            .into_iter()
            .map(|v| match v {
                TupleValue::Text(b) => b,
                other => panic!("unexpected {other:?}"),
            })
            .collect(),
        other => panic!("unexpected {other:?}"),
    };
    let types = types();
    let row: Vec<Value> = types
        .iter()
        .zip(&texts)
        .map(|(t, b)| decode_text(t, b).expect("decodes"))
        .collect();
    let mapped = compiled.map_row(&row);
    assert!(mapped.problems.is_empty(), "{:?}", mapped.problems);
    let json = mapped.record.to_json();
    let copy = copy_buffer(COPY_ROWS);
    // The COPY buffer decodes to COPY_ROWS rows that map cleanly.
    let mut reader = CopyBinaryReader::new(types.clone());
    reader.push(copy.clone());
    let mut n = 0;
    while let Some(r) = reader.next_row().expect("valid COPY data") {
        let m = compiled.map_row(&r);
        assert!(m.problems.is_empty(), "{:?}", m.problems);
        n += 1;
    }
    assert!(reader.finished() && n == COPY_ROWS);
    eprintln!(
        "sample record ({} bytes): {}",
        json.len(),
        String::from_utf8_lossy(&json)
    );
    Fixture {
        message,
        types,
        texts,
        row,
        compiled,
        record: mapped.record,
        json,
        copy,
    }
}

fn decode_row(f: &Fixture, msg: &Bytes) -> Vec<Value> {
    match pgoutput::decode(msg) {
        Ok(Message::Insert { new, .. }) => new
            .0
            .iter()
            .zip(&f.types)
            .map(|(v, t)| match v {
                TupleValue::Text(b) => decode_text(t, b).unwrap_or(Value::Null),
                _ => Value::Null,
            })
            .collect(),
        _ => unreachable!(),
    }
}

fn benches(c: &mut Criterion) {
    let f = fixture();
    let mut g = c.benchmark_group("per_row");
    g.throughput(Throughput::Elements(1));
    g.bench_function("pgoutput_decode_insert", |b| {
        b.iter(|| pgoutput::decode(black_box(&f.message)).expect("ok"))
    });
    g.bench_function("decode_text_10_columns", |b| {
        b.iter(|| {
            f.types
                .iter()
                .zip(black_box(&f.texts))
                .map(|(t, v)| decode_text(t, v).expect("ok"))
                .collect::<Vec<_>>()
        })
    });
    g.bench_function("map_row_transactions", |b| {
        b.iter(|| f.compiled.map_row(black_box(&f.row)))
    });
    g.bench_function("source_key", |b| {
        b.iter(|| f.compiled.source_key(black_box(&f.row)))
    });
    g.bench_function("record_to_json", |b| {
        b.iter(|| black_box(&f.record).to_json())
    });
    g.bench_function("fingerprint_xxh3_64", |b| {
        b.iter(|| xxhash_rust::xxh3::xxh3_64(black_box(&f.json)))
    });
    g.bench_function("record_cobi_key", |b| {
        b.iter(|| black_box(&f.record).cobi_key())
    });
    g.bench_function("validate_record", |b| {
        b.iter(|| cobi_sync::model::validate::validate(black_box(&f.record)))
    });
    g.bench_function("total_pgoutput_to_fingerprint", |b| {
        b.iter(|| {
            let row = decode_row(&f, black_box(&f.message));
            let m = f.compiled.map_row(&row);
            let json = m.record.to_json();
            xxhash_rust::xxh3::xxh3_64(&json)
        })
    });
    g.finish();

    let mut g = c.benchmark_group("copy_binary");
    g.throughput(Throughput::Elements(COPY_ROWS));
    g.bench_function("reader_1000_rows", |b| {
        b.iter(|| {
            let mut r = CopyBinaryReader::new(f.types.clone());
            r.push(black_box(f.copy.clone()));
            let mut n = 0u32;
            while let Some(row) = r.next_row().expect("ok") {
                black_box(&row);
                n += 1;
            }
            n
        })
    });
    g.bench_function("total_1000_rows_to_fingerprint", |b| {
        b.iter(|| {
            let mut r = CopyBinaryReader::new(f.types.clone());
            r.push(black_box(f.copy.clone()));
            let mut h = 0u64;
            while let Some(row) = r.next_row().expect("ok") {
                let m = f.compiled.map_row(&row);
                h ^= xxhash_rust::xxh3::xxh3_64(&m.record.to_json());
            }
            h
        })
    });
    g.finish();
}

/// A quick, criterion-independent ns/row summary (median of 5 timed loops).
fn summary() {
    let f = fixture();
    let time =
        |name: &str, per_iter_rows: u64, iters: u64, mut work: Box<dyn FnMut() -> u64 + '_>| {
            let mut samples = Vec::new();
            let mut sink = 0u64;
            for _ in 0..5 {
                let t = Instant::now();
                for _ in 0..iters {
                    sink = sink.wrapping_add(work());
                }
                samples.push(t.elapsed().as_nanos() as f64 / (iters * per_iter_rows) as f64);
            }
            samples.sort_by(f64::total_cmp);
            black_box(sink);
            println!("  {name:<36} {:>9.1} ns/row", samples[2]);
        };
    println!("\nhot path summary (median of 5 loops):");
    time(
        "pgoutput decode (Insert, 10 cols)",
        1,
        200_000,
        Box::new(|| {
            matches!(
                pgoutput::decode(black_box(&f.message)),
                Ok(Message::Insert { .. })
            ) as u64
        }),
    );
    time(
        "decode_text (10 values)",
        1,
        200_000,
        Box::new(|| {
            f.types
                .iter()
                .zip(black_box(&f.texts))
                .map(|(t, v)| decode_text(t, v).is_ok() as u64)
                .sum()
        }),
    );
    time(
        "map_row (transactions)",
        1,
        100_000,
        Box::new(|| f.compiled.map_row(black_box(&f.row)).record.fields.len() as u64),
    );
    time(
        "Record::to_json",
        1,
        200_000,
        Box::new(|| black_box(&f.record).to_json().len() as u64),
    );
    time(
        "xxh3_64 of the JSON",
        1,
        1_000_000,
        Box::new(|| xxhash_rust::xxh3::xxh3_64(black_box(&f.json))),
    );
    time(
        "CopyBinaryReader (1000-row buffer)",
        COPY_ROWS,
        200,
        Box::new(|| {
            let mut r = CopyBinaryReader::new(f.types.clone());
            r.push(black_box(f.copy.clone()));
            let mut n = 0;
            while let Ok(Some(_)) = r.next_row() {
                n += 1;
            }
            n
        }),
    );
    time(
        "pgoutput → row → record → JSON → xxh3",
        1,
        100_000,
        Box::new(|| {
            let row = decode_row(&f, black_box(&f.message));
            xxhash_rust::xxh3::xxh3_64(&f.compiled.map_row(&row).record.to_json())
        }),
    );
    time(
        "COPY binary → record → JSON → xxh3",
        COPY_ROWS,
        100,
        Box::new(|| {
            let mut r = CopyBinaryReader::new(f.types.clone());
            r.push(black_box(f.copy.clone()));
            let mut h = 0u64;
            while let Ok(Some(row)) = r.next_row() {
                h ^= xxhash_rust::xxh3::xxh3_64(&f.compiled.map_row(&row).record.to_json());
            }
            h
        }),
    );
}

criterion_group! {
    name = hot_path;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}

fn main() {
    hot_path();
    Criterion::default().configure_from_args().final_summary();
    // Skip the summary when criterion is only listing or testing (`--list`, `--test`).
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--list" || a == "--test") {
        summary();
    }
}
