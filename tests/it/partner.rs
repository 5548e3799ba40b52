//! The partner schema of `cobi-sync demo` (all 15 Cobi types, table and column names
//! unlike Cobi's (integer keys mapped with uuid5, a `timestamp without time
//! zone`, numeric amounts, an enum, a text[] mapped with csv), data
//! generators, and the comparison of the source's current state with what
//! the mock API holds.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use cobi_sync::config::{load_str, Settings};
use cobi_sync::mapping::engine::MapContext;
use cobi_sync::mock_api::MockServer;
use cobi_sync::model::record::Record;
use cobi_sync::model::schema::schema;
use cobi_sync::source::reader::{RowStream, SourceTable};

/// The demo's partner tables and mappings.
pub use cobi_sync::demo::{MAPPINGS, SCHEMA};

/// A table no mapping reads.
pub const UNMAPPED: &str = "CREATE TABLE unmapped_noise (id serial PRIMARY KEY, payload text);";

/// Seeds `n` shops and a consistent web of every other type.
/// A fresh PostgreSQL with the partner schema and `n` seeded rows per
/// table (none for `n = 0`).
pub async fn start_db(n: usize) -> crate::common::Db {
    let db = crate::common::Db::start().await;
    db.exec(SCHEMA).await;
    if n > 0 {
        db.exec(&seed_sql(n)).await;
    }
    db
}

pub fn seed_sql(n: usize) -> String {
    format!(
        r#"
INSERT INTO campus (title, cc) SELECT 'Campus ' || g, (ARRAY['gb','us','ca'])[1 + g % 3] FROM generate_series(1, {a}) g;
INSERT INTO programme (title) SELECT 'Programme ' || g FROM generate_series(1, {a}) g;
INSERT INTO genre (label) SELECT 'Genre ' || g FROM generate_series(1, {a}) g;
INSERT INTO label_tag (label) SELECT 'Tag ' || g FROM generate_series(1, {a}) g;
INSERT INTO search_term (term) SELECT 'term-' || g FROM generate_series(1, {a}) g;
INSERT INTO merchant (trade_name, country, listed) SELECT 'Shop ' || g || ' Zoë', (ARRAY['gb','us','ca'])[1 + g % 3], g % 5 <> 0 FROM generate_series(1, {n}) g;
INSERT INTO member (dob, campus_id, programme_id, country, sex)
  SELECT DATE '2000-01-01' + g, 1 + g % {a}, CASE WHEN g % 4 = 0 THEN NULL ELSE 1 + g % {a} END, 'gb', (ARRAY['M','F',NULL])[1 + g % 3]
  FROM generate_series(1, {n}) g;
INSERT INTO outlet (merchant_id, label, country, lat, lng) SELECT 1 + g % {n}, 'Outlet ' || g, 'gb', 51.5 + g / 1000.0, -0.12 FROM generate_series(1, {n}) g;
INSERT INTO promo (merchant_id, title, kind, amount, country, days, outlet_ids, valid_from)
  SELECT 1 + g % {n}, 'Promo ' || g, (ARRAY['percentage','fixed'])[1 + g % 2]::promo_kind, 5 + g % 20, 'gb',
         ARRAY['monday','friday'], ARRAY[1 + g % {n}], now() - interval '1 day'
  FROM generate_series(1, {n}) g;
INSERT INTO merchant_genre (merchant_id, genre_id, country) SELECT 1 + g % {n}, 1 + g % {a}, 'gb' FROM generate_series(1, {n}) g;
INSERT INTO merchant_tag (merchant_id, tag_id) SELECT 1 + g % {n}, 1 + g % {a} FROM generate_series(1, {n}) g;
INSERT INTO merchant_term (merchant_id, term_id) SELECT 1 + g % {n}, 1 + g % {a} FROM generate_series(1, {n}) g;
INSERT INTO favourite (member_id, merchant_id) SELECT 1 + g % {n}, 1 + (g * 7) % {n} FROM generate_series(1, {n}) g;
INSERT INTO purchase (member_id, merchant_id, promo_id, outlet_id, country, channel, saved, total)
  SELECT 1 + g % {n}, 1 + g % {n}, 1 + g % {n}, 1 + g % {n}, 'gb', (ARRAY['online','in-store'])[1 + g % 2], g % 3, 10 + g % 50
  FROM generate_series(1, {n}) g;
INSERT INTO event_log (member_id, kind, item_kind, item_ref, platform)
  SELECT 1 + g % {n}, (ARRAY['SHARE','PAGE_VIEW'])[1 + g % 2], (ARRAY['SHOP','TAG','OFFER','KEYWORD'])[1 + g % 4], 1 + g % {a}, 'WEB'
  FROM generate_series(1, {n}) g;
"#,
        n = n,
        a = (n / 4).max(3)
    )
}

/// Settings for the partner schema.
pub fn settings(header: &str) -> Settings {
    load_str(&format!("{header}\n{MAPPINGS}"), "partner.toml").unwrap_or_else(|e| panic!("{e}"))
}

/// What Cobi should hold: every source row mapped, by type and key (the
/// JSON value). Interactions (no key) are keyed by their JSON text.
pub async fn expected(
    settings: &Settings,
    client: &tokio_postgres::Client,
) -> BTreeMap<String, BTreeMap<String, serde_json::Value>> {
    let ctx = MapContext::from_settings(settings);
    let mut out = BTreeMap::new();
    for m in &settings.mappings {
        let t = SourceTable::resolve(client, m, ctx)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut rows = RowStream::start(client, &t.key_chunk_sql(None, None), t.types())
            .await
            .unwrap();
        let entry: &mut BTreeMap<String, serde_json::Value> =
            out.entry(schema().ty(m.ty).name.clone()).or_default();
        loop {
            let batch = rows.next_batch(10_000).await.unwrap();
            if batch.is_empty() {
                break;
            }
            for r in batch {
                let mapped = t.compiled.map_row(&r);
                let json = String::from_utf8(mapped.record.to_json()).unwrap();
                let key = mapped.record.cobi_key().unwrap_or_else(|| json.clone());
                entry.insert(key, serde_json::from_str(&json).unwrap());
            }
        }
    }
    out
}

/// What the mock holds, in the same shape.
pub fn actual(mock: &MockServer) -> BTreeMap<String, BTreeMap<String, serde_json::Value>> {
    let mut out = BTreeMap::new();
    for t in &schema().types {
        let mut m = BTreeMap::new();
        for v in mock.records(&t.name) {
            let mut v = v;
            if let Some(o) = v.as_object_mut() {
                o.remove("id"); // interactions: the id the mock assigned
            }
            let text = serde_json::to_string(&v).unwrap();
            let ty = schema().type_id(&t.name).unwrap();
            let rec = Record::from_json(ty, text.as_bytes())
                .unwrap_or_else(|e| panic!("{}: {e}", t.name));
            let canonical = String::from_utf8(rec.to_json()).unwrap();
            let key = rec.cobi_key().unwrap_or_else(|| canonical.clone());
            m.insert(key, v);
        }
        if !m.is_empty() {
            out.insert(t.name.clone(), m);
        }
    }
    out
}

/// Differences between the source and the mock.
#[derive(Debug, Default)]
pub struct Diff {
    /// Rows checked.
    pub rows: usize,
    /// Present at the source, absent at the mock.
    pub missing: Vec<String>,
    /// Present in both, different content.
    pub different: Vec<String>,
    /// At the mock but not the source, and not marked deleted.
    pub extra: Vec<String>,
}

impl Diff {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.different.is_empty() && self.extra.is_empty()
    }
}

fn normalise(v: &serde_json::Value) -> serde_json::Value {
    // Numbers compare by value (12.50 == 12.5).
    match v {
        serde_json::Value::Object(o) => {
            serde_json::Value::Object(o.iter().map(|(k, v)| (k.clone(), normalise(v))).collect())
        }
        serde_json::Value::Number(n) => serde_json::json!(n.as_f64()),
        other => other.clone(),
    }
}

/// Compares the source's current state with the mock. Keys the source no
/// longer has must be marked deleted at the mock.
pub fn compare(
    expected: &BTreeMap<String, BTreeMap<String, serde_json::Value>>,
    actual: &BTreeMap<String, BTreeMap<String, serde_json::Value>>,
) -> Diff {
    let mut d = Diff::default();
    let empty = BTreeMap::new();
    let types: BTreeSet<&String> = expected.keys().chain(actual.keys()).collect();
    for t in types {
        let e = expected.get(t).unwrap_or(&empty);
        let a = actual.get(t).unwrap_or(&empty);
        for (k, v) in e {
            d.rows += 1;
            match a.get(k) {
                None => d.missing.push(format!("{t} {k}")),
                Some(got) if normalise(got) != normalise(v) => {
                    d.different.push(format!("{t} {k}: want {v} got {got}"))
                }
                _ => {}
            }
        }
        // Interactions are events without a soft-delete flag: one deleted at
        // the source stays at Cobi (documented).
        let deletable = schema()
            .type_id(t)
            .is_some_and(|id| schema().ty(id).field("is_deleted").is_some());
        for (k, v) in a {
            if deletable
                && !e.contains_key(k)
                && v.get("is_deleted") != Some(&serde_json::Value::Bool(true))
            {
                d.extra.push(format!("{t} {k}"));
            }
        }
    }
    d
}

/// Asserts the mock holds exactly the source's current state.
pub async fn assert_in_sync(
    settings: &Settings,
    client: &tokio_postgres::Client,
    mock: &MockServer,
) -> Diff {
    let e = expected(settings, client).await;
    let a = actual(mock);
    let d = compare(&e, &a);
    assert!(
        d.is_clean(),
        "source and mock differ: {} missing, {} different, {} extra (of {} rows)\nmissing: {:?}\ndifferent: {:?}\nextra: {:?}",
        d.missing.len(),
        d.different.len(),
        d.extra.len(),
        d.rows,
        &d.missing[..d.missing.len().min(10)],
        &d.different[..d.different.len().min(5)],
        &d.extra[..d.extra.len().min(10)]
    );
    d
}

/// Waits until the mock holds exactly the source's state.
pub async fn wait_in_sync(
    settings: &Settings,
    client: &tokio_postgres::Client,
    mock: &MockServer,
    timeout: std::time::Duration,
    log: &std::path::Path,
) -> Diff {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let e = expected(settings, client).await;
        let d = compare(&e, &actual(mock));
        if d.is_clean() {
            return d;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "not in sync after {timeout:?}: {} missing, {} different, {} extra of {} rows\nmissing: {:?}\ndifferent: {:?}\nextra: {:?}\n--- daemon log tail ---\n{}",
                d.missing.len(),
                d.different.len(),
                d.extra.len(),
                d.rows,
                &d.missing[..d.missing.len().min(10)],
                &d.different[..d.different.len().min(3)],
                &d.extra[..d.extra.len().min(10)],
                tail(&std::fs::read_to_string(log).unwrap_or_default(), 60)
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// The last `n` lines of a text.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
