//! The sink and API client against the real mock API over HTTP: ordering,
//! faults, bisection, key rotation, local validation.

use std::sync::Arc;
use std::time::Duration;

use cobi_sync::config::{load_str, Settings};
use cobi_sync::daemon::Pipeline;
use serde_json::{json, Map, Value};

use cobi_sync::sink::{type_id, SinkItem};
use cobi_sync::state::{MemoryStore, StateKey, StateStore};

use crate::common::{mock, mock_with, Workdir, API_KEY};
use crate::oracle::{self, Holdings};

fn settings(wd: &Workdir, api: &str, extra: &str) -> Settings {
    let key = wd.path("api-key");
    if !key.exists() {
        std::fs::write(&key, API_KEY).unwrap();
    }
    let text = format!(
        r#"
[source]
url = "postgres://x@127.0.0.1:1/x"
[api]
base_url = "{api}"
api_key_file = "{}"
initial_backoff = "20ms"
max_backoff = "1s"
timeout = "5s"
{extra}
[[mapping]]
type = "tags"
table = "t"
[mapping.fields]
tag_id = "id"
name = "name"
"#,
        key.display()
    );
    load_str(&text, "sink.toml").unwrap_or_else(|e| panic!("{e}"))
}

fn uuid(ty: &str, i: usize) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("{ty}:{i}").as_bytes())
        .hyphenated()
        .to_string()
}

/// One generated record: its type (as in the URL), state key and JSON
/// object.
#[derive(Clone)]
struct Gen {
    ty: &'static str,
    key: StateKey,
    record: Map<String, Value>,
}

/// The type a polymorphic `item_id` references for an `item_type` (the
/// API documentation's table).
fn item_target(item_type: &str) -> &'static str {
    match item_type {
        "TAG" => "tags",
        "OFFER" => "offers",
        "SHOP" => "shops",
        "KEYWORD" => "keywords",
        other => panic!("no item_type {other}"),
    }
}

/// How deep a type sits below the types it references (0: references
/// none), from schema.json's references.
fn depth(ty: &str) -> usize {
    oracle::facts(ty)
        .fields
        .iter()
        .flat_map(|f| &f.references)
        .filter(|p| p.as_str() != ty)
        .map(|p| 1 + depth(p))
        .max()
        .unwrap_or(0)
}

/// `n` valid records of every type, each referencing existing parents,
/// generated from the facts of schema.json alone (the oracle's reader, not
/// the product's model); parents' types first, as a source hands them
/// over.
fn generate(n: usize) -> Vec<Gen> {
    let mut types: Vec<&oracle::TypeFacts> = oracle::contract().iter().collect();
    types.sort_by_key(|t| depth(&t.name));
    let mut out = Vec::new();
    for t in types {
        for i in 0..n {
            let item_type = ["TAG", "OFFER", "SHOP", "KEYWORD"][i % 4];
            let mut r = Map::new();
            for f in &t.fields {
                let v = if f.name == "item_id" {
                    Some(json!(uuid(item_target(item_type), (i * 3) % n)))
                } else if let Some(p) = f.references.first() {
                    Some(json!(uuid(p, (i * 7) % n)))
                } else if t.key.contains(&f.name) {
                    Some(json!(uuid(&t.name, i)))
                } else if f.name == "item_type" {
                    Some(json!(item_type))
                } else if !f.required {
                    None
                } else if let Some(e) = &f.enumeration {
                    Some(json!(e[0].clone().unwrap()))
                } else {
                    Some(match (f.ty.as_str(), f.format.as_deref()) {
                        (_, Some("uuid")) => json!(uuid("other", i)),
                        (_, Some("country-code")) => json!("GB"),
                        (_, Some("date-time")) => json!("2024-01-02T03:04:05Z"),
                        (_, Some("date")) => json!("2024-01-02"),
                        ("number", _) => json!(1.25 + (i % 90) as f64),
                        ("integer|string", _) => json!(1_700_000_000_000 + i as i64),
                        ("boolean", _) => json!(i % 2 == 0),
                        _ => json!(format!("{} {i} Zoë", t.name)),
                    })
                };
                if let Some(v) = v {
                    r.insert(f.name.clone(), v);
                }
            }
            out.push(Gen {
                ty: &t.name,
                key: StateKey {
                    ty: type_id(&t.name).unwrap(),
                    mapping: format!("{}/gen", t.name).into(),
                    source_key: i.to_string(),
                },
                record: r,
            });
        }
    }
    out
}

fn upsert(g: &Gen) -> SinkItem {
    let text = Value::Object(g.record.clone()).to_string();
    SinkItem::upsert_json(g.key.clone(), text.as_bytes())
        .unwrap_or_else(|e| panic!("{}: {e}: {text}", g.ty))
}

/// Asserts the mock holds exactly the generated records (interactions
/// stored more than once are allowed when `at_least_once`: a request
/// dropped after the API applied it is re-sent, and interactions have no
/// key).
fn assert_delivered(mock: &cobi_sync::mock_api::MockServer, records: &[Gen], at_least_once: bool) {
    let want = Holdings::of_records(
        records
            .iter()
            .map(|g| (g.ty, Value::Object(g.record.clone()).to_string())),
    );
    let diff = oracle::compare(&want, &oracle::actual(mock));
    let clean = if at_least_once {
        diff.is_clean_at_least_once()
    } else {
        diff.is_clean()
    };
    assert!(
        clean,
        "the mock differs from what was sent:\n{}",
        diff.report()
    );
}

#[tokio::test]
async fn fifty_thousand_records_out_of_order_arrive_parents_first() {
    let wd = Workdir::new();
    let mock = mock().await;
    let settings = settings(&wd, &mock.base_url(), "[batch]\nlinger = \"30s\"");
    let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
    let p = Pipeline::start(&settings, store.clone()).unwrap();
    let mut records = generate(50_000 / 15 + 1);
    // Children first: the reverse of the upload order, shuffled within.
    records.reverse();
    for chunk in records.chunks(1000) {
        p.sink
            .send(chunk.iter().map(upsert).collect())
            .await
            .unwrap();
    }
    p.sink.barrier().await.unwrap();
    let stats = mock.stats();
    assert_eq!(
        stats.reference_failures, 0,
        "a child was sent before its parent"
    );
    assert_delivered(&mock, &records, false);
    assert!(store.dead_letters(None).unwrap().is_empty());
    assert!(records.len() >= 50_000);
    p.drain(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn faults_lose_nothing_and_dead_letter_nothing() {
    let wd = Workdir::new();
    let mock = mock_with(0.2, 0.1, 0.05, Duration::from_millis(5)).await;
    let settings = settings(
        &wd,
        &mock.base_url(),
        "[batch]\nmax_records = 200\nlinger = \"50ms\"",
    );
    let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
    let p = Pipeline::start(&settings, store.clone()).unwrap();
    let records = generate(200);
    for chunk in records.chunks(500) {
        p.sink
            .send(chunk.iter().map(upsert).collect())
            .await
            .unwrap();
    }
    p.sink.barrier().await.unwrap();
    let stats = mock.stats();
    assert!(
        stats.requests_by_status.get("500").copied().unwrap_or(0) > 0,
        "faults were injected: {stats:?}"
    );
    assert!(
        stats.requests_by_status.get("429").copied().unwrap_or(0) > 0,
        "{stats:?}"
    );
    assert!(
        stats
            .requests_by_status
            .get("dropped")
            .copied()
            .unwrap_or(0)
            > 0,
        "{stats:?}"
    );
    assert_delivered(&mock, &records, true);
    assert!(store.dead_letters(None).unwrap().is_empty());
    assert_eq!(stats.reference_failures, 0);
    p.drain(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn three_bad_of_a_thousand_are_isolated_with_few_requests() {
    let wd = Workdir::new();
    let mock = mock().await;
    let settings = settings(&wd, &mock.base_url(), "");
    let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
    let p = Pipeline::start(&settings, store.clone()).unwrap();
    let branches = type_id("branches").unwrap();
    let all = generate(1000);
    let shop_items: Vec<SinkItem> = all.iter().filter(|g| g.ty == "shops").map(upsert).collect();
    p.sink.send(shop_items).await.unwrap();
    p.sink.barrier().await.unwrap();
    let before: u64 = mock.stats().requests_by_status.values().sum();
    let mut branch_recs: Vec<Gen> = all.into_iter().filter(|g| g.ty == "branches").collect();
    for i in [17, 500, 911] {
        branch_recs[i]
            .record
            .insert("shop_id".into(), json!(uuid("shops", 999_999 + i)));
    }
    p.sink
        .send(branch_recs.iter().map(upsert).collect())
        .await
        .unwrap();
    p.sink.barrier().await.unwrap();
    let requests = mock.stats().requests_by_status.values().sum::<u64>() - before;
    let dead = store.dead_letters(Some(branches)).unwrap();
    let mut dead_keys: Vec<String> = dead.iter().map(|d| d.source_key.clone()).collect();
    dead_keys.sort();
    assert_eq!(dead_keys, ["17", "500", "911"]);
    assert!(
        dead[0].reason.contains("shop"),
        "the API's error is kept: {}",
        dead[0].reason
    );
    assert_eq!(mock.records("branches").len(), 997);
    // The error names the three: the batch, the rest, and each alone.
    assert_eq!(requests, 5, "named failures cost one request each");
    println!("named errors: 3 bad of 1000 isolated with {requests} requests");
    p.drain(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_wrong_key_pauses_and_a_rotated_key_resumes() {
    let wd = Workdir::new();
    let mock = mock().await;
    std::fs::write(wd.path("api-key"), "wrong-key").unwrap();
    let settings = settings(&wd, &mock.base_url(), "");
    let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
    let p = Pipeline::start(&settings, store.clone()).unwrap();
    let records = generate(20);
    let sink = p.sink.clone();
    let recs = records.clone();
    let barrier = tokio::spawn(async move {
        sink.send(recs.iter().map(upsert).collect()).await.unwrap();
        sink.barrier().await.unwrap();
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!barrier.is_finished(), "delivery must pause on 401");
    assert!(
        mock.stats()
            .requests_by_status
            .get("401")
            .copied()
            .unwrap_or(0)
            > 0
    );
    assert!(
        !p.health.report().api_ready,
        "not ready while the key is rejected"
    );
    assert!(
        store.dead_letters(None).unwrap().is_empty(),
        "nothing dead-lettered on 401"
    );
    assert_eq!(mock.records("tags").len(), 0);
    // Rotate by rename, as a secrets manager would.
    std::fs::write(wd.path("api-key.new"), format!("{API_KEY}\n")).unwrap();
    std::fs::rename(wd.path("api-key.new"), wd.path("api-key")).unwrap();
    tokio::time::timeout(Duration::from_secs(10), barrier)
        .await
        .expect("resumed after the key changed")
        .unwrap();
    assert_delivered(&mock, &records, false);
    assert!(p.health.report().api_ready);
    p.drain(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn locally_invalid_records_never_reach_the_api() {
    let wd = Workdir::new();
    let mock = mock().await;
    let settings = settings(&wd, &mock.base_url(), "");
    let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
    let p = Pipeline::start(&settings, store.clone()).unwrap();
    let mut recs: Vec<Gen> = generate(10)
        .into_iter()
        .filter(|g| g.ty == "shops")
        .collect();
    recs[2].record.insert("region".into(), json!("gbr"));
    recs[5].record.insert("shop_id".into(), json!("42"));
    p.sink
        .send(recs.iter().map(upsert).collect())
        .await
        .unwrap();
    p.sink.barrier().await.unwrap();
    assert_eq!(mock.records("shops").len(), 8);
    assert_eq!(
        mock.stats().records_rejected.values().sum::<u64>(),
        0,
        "invalid records were sent"
    );
    let mut reasons: Vec<String> = store
        .dead_letters(None)
        .unwrap()
        .into_iter()
        .map(|d| d.reason)
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 2);
    assert!(reasons[0].starts_with("region:"), "{reasons:?}");
    assert!(
        reasons[1].starts_with("shop_id: must be a UUID"),
        "{reasons:?}"
    );
    p.drain(Duration::from_secs(5)).await;
}
