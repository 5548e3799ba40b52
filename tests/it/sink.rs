//! The sink and API client against the real mock API over HTTP: ordering,
//! faults, bisection, key rotation, local validation.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cobi_sync::config::{load_str, Settings};
use cobi_sync::daemon::Pipeline;
use cobi_sync::model::record::{Json, Record};
use cobi_sync::model::schema::{schema, FieldType, Format, Reference, TypeId};
use cobi_sync::sink::SinkItem;
use cobi_sync::state::{MemoryStore, StateKey, StateStore};

use crate::common::{mock, mock_with, Workdir, API_KEY};

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

fn uuid(ty: TypeId, i: usize) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("{ty}:{i}").as_bytes())
        .hyphenated()
        .to_string()
}

/// `n` valid records of every type, each referencing existing parents,
/// generated from the schema alone.
fn generate(n: usize) -> Vec<(StateKey, Record)> {
    let s = schema();
    let mut out = Vec::new();
    for (ty, t) in s.types.iter().enumerate() {
        let ty = ty as TypeId;
        for i in 0..n {
            let mut r = Record::new(ty);
            // Discriminator first (item_type), so item_id can follow it.
            let item_type = ["TAG", "OFFER", "SHOP", "KEYWORD"][i % 4];
            for (fi, f) in t.fields.iter().enumerate() {
                let fi = fi as u8;
                let v = match &f.reference {
                    Some(Reference::To { ty: p, .. }) => {
                        Some(Json::Str(uuid(*p, (i * 7) % n).into()))
                    }
                    Some(Reference::ByField { targets, .. }) => {
                        let p = targets.iter().find(|(v, _)| v == item_type).unwrap().1;
                        Some(Json::Str(uuid(p, (i * 3) % n).into()))
                    }
                    None if t.key.contains(&fi) => Some(Json::Str(uuid(ty, i).into())),
                    None if f.name == "item_type" => Some(Json::Str(item_type.into())),
                    None if !f.required => None,
                    None => Some(match (f.ty, f.format, &f.enumeration) {
                        (_, _, Some(e)) => Json::Str(e[0].clone().unwrap().into()),
                        (_, Some(Format::Uuid), _) => Json::Str(uuid(200, i).into()),
                        (_, Some(Format::CountryCode), _) => Json::Str("GB".into()),
                        (FieldType::Number, _, _) => Json::Num(format!("{}.25", 1 + i % 90).into()),
                        (FieldType::IntegerOrString, _, _) => {
                            Json::Int(1_700_000_000_000 + i as i64)
                        }
                        (FieldType::Boolean, _, _) => Json::Bool(i % 2 == 0),
                        _ => Json::Str(format!("{} {i} Zoë", t.name).into()),
                    }),
                };
                if let Some(v) = v {
                    r.set(fi, v);
                }
            }
            out.push((
                StateKey {
                    ty,
                    mapping: format!("{}/gen", t.name).into(),
                    source_key: i.to_string(),
                },
                r,
            ));
        }
    }
    out
}

fn upsert(k: StateKey, r: Record) -> SinkItem {
    SinkItem::upsert(k, &r, vec![], false)
}

/// Records at the mock, by type, as canonical JSON texts.
fn at_mock(mock: &cobi_sync::mock_api::MockServer) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for t in &schema().types {
        let ty = schema().type_id(&t.name).unwrap();
        let mut v: Vec<String> = mock
            .records(&t.name)
            .into_iter()
            .map(|mut j| {
                j.as_object_mut().unwrap().remove("id");
                let r = Record::from_json(ty, j.to_string().as_bytes()).unwrap();
                String::from_utf8(r.to_json()).unwrap()
            })
            .collect();
        v.sort();
        // Interactions have no key: a request dropped after the API applied
        // it is re-sent and stored twice (at-least-once, no idempotency key).
        v.dedup();
        out.insert(t.name.clone(), v);
    }
    out
}

/// Asserts two per-type record sets are equal, printing a short diff.
fn assert_same(got: &BTreeMap<String, Vec<String>>, want: &BTreeMap<String, Vec<String>>) {
    for (t, w) in want {
        let g = got.get(t).cloned().unwrap_or_default();
        if &g != w {
            let missing: Vec<&String> = w.iter().filter(|x| !g.contains(x)).take(3).collect();
            let extra: Vec<&String> = g.iter().filter(|x| !w.contains(x)).take(3).collect();
            panic!(
                "{t}: mock holds {} records, {} were sent\nmissing (first 3): {missing:?}\nextra (first 3): {extra:?}",
                g.len(),
                w.len()
            );
        }
    }
}

fn sent(records: &[(StateKey, Record)]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in &schema().types {
        out.insert(t.name.clone(), vec![]);
    }
    for (k, r) in records {
        out.get_mut(&schema().ty(k.ty).name)
            .unwrap()
            .push(String::from_utf8(r.to_json()).unwrap());
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
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
    let items: Vec<SinkItem> = records.iter().cloned().map(|(k, r)| upsert(k, r)).collect();
    for chunk in items.chunks(1000) {
        p.sink
            .send(chunk.iter().map(clone_item).collect())
            .await
            .unwrap();
    }
    p.sink.barrier().await.unwrap();
    let stats = mock.stats();
    assert_eq!(
        stats.reference_failures, 0,
        "a child was sent before its parent"
    );
    assert_same(&at_mock(&mock), &sent(&records));
    assert!(store.dead_letters(None).unwrap().is_empty());
    assert!(records.len() >= 50_000);
    p.drain(Duration::from_secs(5)).await;
}

fn clone_item(i: &SinkItem) -> SinkItem {
    match i {
        SinkItem::Upsert { key, record, force } => SinkItem::Upsert {
            key: key.clone(),
            record: record.clone(),
            force: *force,
        },
        _ => unreachable!(),
    }
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
            .send(chunk.iter().cloned().map(|(k, r)| upsert(k, r)).collect())
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
    assert_same(&at_mock(&mock), &sent(&records));
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
    let s = schema();
    let shops = s.type_id("shops").unwrap();
    let branches = s.type_id("branches").unwrap();
    let all = generate(1000);
    let shop_items: Vec<SinkItem> = all
        .iter()
        .filter(|(k, _)| k.ty == shops)
        .cloned()
        .map(|(k, r)| upsert(k, r))
        .collect();
    p.sink.send(shop_items).await.unwrap();
    p.sink.barrier().await.unwrap();
    let before: u64 = mock.stats().requests_by_status.values().sum();
    let mut branch_recs: Vec<(StateKey, Record)> =
        all.into_iter().filter(|(k, _)| k.ty == branches).collect();
    let shop_field = s.ty(branches).field("shop_id").unwrap();
    for i in [17, 500, 911] {
        branch_recs[i]
            .1
            .set(shop_field, Json::Str(uuid(shops, 999_999 + i).into()));
    }
    p.sink
        .send(
            branch_recs
                .iter()
                .cloned()
                .map(|(k, r)| upsert(k, r))
                .collect(),
        )
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
        sink.send(recs.into_iter().map(|(k, r)| upsert(k, r)).collect())
            .await
            .unwrap();
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
    assert_same(&at_mock(&mock), &sent(&records));
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
    let s = schema();
    let shops = s.type_id("shops").unwrap();
    let mut recs: Vec<(StateKey, Record)> = generate(10)
        .into_iter()
        .filter(|(k, _)| k.ty == shops)
        .collect();
    recs[2].1.set(
        s.ty(shops).field("region").unwrap(),
        Json::Str("gbr".into()),
    );
    recs[5].1.set(
        s.ty(shops).field("shop_id").unwrap(),
        Json::Str("42".into()),
    );
    p.sink
        .send(recs.iter().cloned().map(|(k, r)| upsert(k, r)).collect())
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
