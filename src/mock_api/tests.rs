//! The mock over real HTTP on 127.0.0.1:0.

use std::time::Duration;

use serde_json::{json, Value};

use super::*;

const KEY: &str = "test-key";

async fn start() -> MockServer {
    MockServer::start(MockOptions::local(KEY)).await.unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

struct Answer {
    status: u16,
    text: String,
    headers: reqwest::header::HeaderMap,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }
    /// `batches[0].data.error` of an envelope.
    fn error(&self) -> String {
        self.json()["batches"][0]["data"]["error"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

async fn post_raw(
    srv: &MockServer,
    path: &str,
    key: Option<&str>,
    body: String,
) -> reqwest::Result<Answer> {
    let mut req = client()
        .post(format!("{}{path}", srv.base_url()))
        .header("content-type", "application/json")
        .body(body);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await?;
    Ok(Answer {
        status,
        text,
        headers,
    })
}

async fn post(srv: &MockServer, path: &str, body: String) -> Answer {
    post_raw(srv, path, Some(KEY), body).await.unwrap()
}

async fn upload(srv: &MockServer, ty: &str, records: Vec<Value>) -> Answer {
    post(srv, &format!("/v1/data/{ty}"), batch(records)).await
}

async fn get(srv: &MockServer, path: &str) -> Value {
    let resp = client()
        .get(format!("{}{path}", srv.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "GET {path}");
    serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
}

fn batch(records: Vec<Value>) -> String {
    json!({ "records": records }).to_string()
}

fn id(kind: u32, n: u32) -> String {
    format!("00000000-0000-4000-8{kind:03}-{n:012}")
}

fn shop(n: u32) -> Value {
    json!({
        "shop_id": id(1, n),
        "name": format!("Shop {n}"),
        "region": "CA",
        "is_public": true,
        "created": "2023-01-15T14:30:00Z",
        "updated": "2023-06-22T09:15:30Z",
        "is_deleted": false
    })
}

fn branch(n: u32, shop: u32) -> Value {
    json!({
        "branch_id": id(2, n),
        "shop_id": id(1, shop),
        "name": format!("Branch {n}"),
        "region": "CA",
        "latitude": 45.5,
        "longitude": -73.25
    })
}

fn transaction(n: u32, shop: u32) -> Value {
    json!({
        "transaction_id": id(3, n),
        "shop_id": id(1, shop),
        "region": "US",
        "savings": 1.25,
        "amount": 12.5,
        "source": "online"
    })
}

fn stats_of(map: &std::collections::BTreeMap<String, u64>, k: &str) -> u64 {
    map.get(k).copied().unwrap_or(0)
}

#[tokio::test]
async fn auth_is_required_and_checked() {
    let srv = start().await;
    let body = batch(vec![shop(1)]);
    for key in [None, Some("wrong"), Some("")] {
        let a = post_raw(&srv, "/v1/data/shops", key, body.clone())
            .await
            .unwrap();
        assert_eq!(a.status, 401, "{key:?}");
        assert_eq!(
            a.text,
            r#"{"error":"Unauthorized","message":"Invalid or missing API key"}"#
        );
    }
    assert_eq!(post(&srv, "/v1/data/shops", body.clone()).await.status, 200);
    // `check`: an empty batch with the right key is not a 401.
    let a = post(&srv, "/v1/data/shops", batch(vec![])).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.error(), "records must not be empty");

    srv.set_api_key("rotated");
    assert_eq!(post(&srv, "/v1/data/shops", body.clone()).await.status, 401);
    let a = post_raw(&srv, "/v1/data/shops", Some("rotated"), body)
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    let s = srv.stats();
    assert_eq!(stats_of(&s.requests_by_status, "401"), 4);
    assert_eq!(stats_of(&s.requests_by_status, "200"), 2);
    srv.stop().await;
}

#[tokio::test]
async fn valid_shops_are_stored_and_resends_are_duplicates() {
    let srv = start().await;
    let shops: Vec<Value> = (0..50).rev().map(shop).collect();
    let a = upload(&srv, "shops", shops.clone()).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let env = a.json();
    let rid = env["request_id"].as_str().unwrap();
    assert!(uuid::Uuid::parse_str(rid).is_ok());
    assert_eq!(env["type"], "shops");
    let b = &env["batches"][0];
    assert_eq!(b["batch"], 0);
    assert_eq!(b["status"], 200);
    assert_eq!(b["data"]["status"], "success");
    assert_eq!(b["data"]["type"], "shops");
    assert_eq!(b["data"]["message"], "Records uploaded successfully");
    assert_eq!(b["data"]["request_id"], rid);
    assert!(uuid::Uuid::parse_str(b["data"]["batch_id"].as_str().unwrap()).is_ok());
    assert_eq!(b["data"]["error"], "");

    // Stored, sorted by key, exactly as sent.
    let mut want = shops.clone();
    want.sort_by_key(|s| s["shop_id"].as_str().unwrap().to_string());
    assert_eq!(
        get(&srv, "/_mock/records/shops").await,
        Value::Array(want.clone())
    );
    assert_eq!(srv.records("shops"), want);

    // Re-sending the same content (other whitespace) counts duplicates.
    let pretty = serde_json::to_string_pretty(&json!({ "records": shops })).unwrap();
    assert_eq!(post(&srv, "/v1/data/shops", pretty).await.status, 200);
    // A changed record is an update, not a duplicate.
    let mut changed = shop(7);
    changed["name"] = json!("Renamed");
    assert_eq!(
        upload(&srv, "shops", vec![changed.clone()]).await.status,
        200
    );
    let stored = srv.records("shops");
    assert_eq!(stored.len(), 50);
    assert!(stored.contains(&changed));

    let s: MockStats = serde_json::from_value(get(&srv, "/_mock/stats").await).unwrap();
    assert_eq!(s, srv.stats());
    assert_eq!(s.records_accepted["shops"], 101);
    assert_eq!(s.duplicates["shops"], 50);
    assert_eq!(s.stored["shops"], 50);
    assert!(s.records_rejected.is_empty());

    // Reset forgets everything.
    let resp = client()
        .post(format!("{}/_mock/reset", srv.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(srv.stats(), MockStats::default());
    assert_eq!(get(&srv, "/_mock/records/shops").await, json!([]));
}

#[tokio::test]
async fn references_need_a_parent_from_an_earlier_request() {
    let srv = start().await;
    // Branches whose shop is unknown: all fail, each named.
    let a = upload(&srv, "branches", vec![branch(1, 1), branch(2, 1)]).await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert_eq!(a.json()["batches"][0]["data"]["status"], "error");
    assert_eq!(a.json()["batches"][0]["status"], 400);
    let err = a.error();
    assert!(err.starts_with("2 of 2 records failed: "), "{err}");
    assert!(
        err.contains(&format!(
            "{}: shop_id references unknown shops {}",
            id(2, 1),
            id(1, 1)
        )),
        "{err}"
    );
    assert!(err.contains(&id(2, 2)), "{err}");

    // Upload the shop (soft-deleted: still a parent), then the branches pass.
    let mut s1 = shop(1);
    s1["is_deleted"] = json!(true);
    assert_eq!(upload(&srv, "shops", vec![s1]).await.status, 200);
    let a = upload(&srv, "branches", vec![branch(1, 1), branch(2, 1)]).await;
    assert_eq!(a.status, 200, "{}", a.text);

    // Mixed: 207, only the valid one stored.
    let a = upload(&srv, "branches", vec![branch(3, 1), branch(4, 9)]).await;
    assert_eq!(a.status, 207, "{}", a.text);
    let env = a.json();
    assert_eq!(env["batches"][0]["status"], 207);
    assert_eq!(env["batches"][0]["data"]["status"], "partial");
    let err = a.error();
    assert!(err.starts_with("1 of 2 records failed: "), "{err}");
    assert!(err.contains(&id(2, 4)) && !err.contains(&id(2, 3)), "{err}");
    let keys: Vec<String> = srv
        .records("branches")
        .iter()
        .map(|b| b["branch_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, [id(2, 1), id(2, 2), id(2, 3)]);
    let s = srv.stats();
    assert_eq!(s.reference_failures, 3);
    assert_eq!(s.records_rejected["branches"], 3);
    assert_eq!(s.records_accepted["branches"], 3);
    assert_eq!(s.requests_by_status["207"], 1);
    assert_eq!(s.requests_by_status["400"], 1);

    // Unvalidated (inferred) references are not checked: a transaction's
    // unknown branch is fine, its unknown shop is not.
    let mut tx = transaction(1, 1);
    tx["branch_id"] = json!(id(2, 99));
    assert_eq!(upload(&srv, "transactions", vec![tx]).await.status, 200);
}

#[tokio::test]
async fn favourites_upsert_by_natural_key() {
    let srv = start().await;
    assert_eq!(upload(&srv, "shops", vec![shop(1)]).await.status, 200);
    let customer = json!({"customer_id": id(4, 1), "user_id": id(5, 1), "region": "GB"});
    assert_eq!(upload(&srv, "customers", vec![customer]).await.status, 200);
    let fav = json!({"student_id": id(4, 1), "shop_id": id(1, 1)});
    let mut deleted = fav.clone();
    deleted["is_deleted"] = json!(true);
    assert_eq!(
        upload(&srv, "student-favourites", vec![fav]).await.status,
        200
    );
    assert_eq!(
        upload(&srv, "student-favourites", vec![deleted.clone()])
            .await
            .status,
        200
    );
    assert_eq!(srv.records("student-favourites"), vec![deleted]);
    let bad = json!({"student_id": id(4, 2), "shop_id": id(1, 1)});
    let a = upload(&srv, "student-favourites", vec![bad]).await;
    assert_eq!(a.status, 400);
    assert!(a.error().contains(&format!(
        "{}|{}: student_id references unknown customers {}",
        id(4, 2),
        id(1, 1),
        id(4, 2)
    )));
}

#[tokio::test]
async fn validation_failures_name_the_record_and_the_reason() {
    let srv = start().await;
    assert_eq!(upload(&srv, "shops", vec![shop(1)]).await.status, 200);
    let mut bad_region = transaction(1, 1);
    bad_region["region"] = json!("us");
    let mut zero = transaction(2, 1);
    zero["amount"] = json!(0);
    let mut unknown = transaction(3, 1);
    unknown["colour"] = json!("red");
    let mut missing = transaction(4, 1);
    missing.as_object_mut().unwrap().remove("shop_id");
    let mut no_key = transaction(5, 1);
    no_key.as_object_mut().unwrap().remove("transaction_id");
    let a = upload(
        &srv,
        "transactions",
        vec![
            transaction(6, 1),
            bad_region,
            zero,
            unknown,
            missing,
            no_key,
        ],
    )
    .await;
    assert_eq!(a.status, 207, "{}", a.text);
    let err = a.error();
    for want in [
        "5 of 6 records failed: ".to_string(),
        format!("{}: region: must be two upper-case letters", id(3, 1)),
        format!("{}: amount: must be > 0", id(3, 2)),
        format!("{}: colour: unknown field for type transactions", id(3, 3)),
        format!("{}: shop_id: required field is missing", id(3, 4)),
        "#5: transaction_id: required field is missing".to_string(),
    ] {
        assert!(err.contains(&want), "{want} not in {err}");
    }
    assert_eq!(srv.stats().stored["transactions"], 1);
    assert_eq!(srv.stats().records_rejected["transactions"], 5);
    assert_eq!(srv.stats().reference_failures, 0);
}

#[tokio::test]
async fn bad_bodies() {
    let srv = start().await;
    let a = post(&srv, "/v1/data/shops", "nope".into()).await;
    assert_eq!(a.status, 400);
    assert!(
        a.error().starts_with("body must be a JSON object"),
        "{}",
        a.text
    );
    let a = post(&srv, "/v1/data/shops", r#"{"shops":[]}"#.into()).await;
    assert_eq!(a.status, 400);
    assert!(a.error().contains("`records` is missing"), "{}", a.text);
    let a = upload(&srv, "shops", (0..5001).map(shop).collect()).await;
    assert_eq!(a.status, 400);
    assert_eq!(
        a.error(),
        "too many records: 5001 (at most 5000 per request)"
    );
    let a = upload(&srv, "shops", (0..5000).map(shop).collect()).await;
    assert_eq!(a.status, 200);
    let a = post(&srv, "/v1/data/widgets", batch(vec![shop(1)])).await;
    assert_eq!(a.status, 404);
    assert!(a.json()["message"].as_str().unwrap().contains("widgets"));
    let resp = client()
        .get(format!("{}/v1/data/shops", srv.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    // Many failures: the error names 100 and counts the rest.
    let bad: Vec<Value> = (0..300)
        .map(|n| {
            let mut s = shop(n);
            s["region"] = json!("xx");
            s
        })
        .collect();
    let a = upload(&srv, "shops", bad).await;
    assert_eq!(a.status, 400);
    let err = a.error();
    assert!(err.ends_with("; … and 200 more"), "{err}");
    assert_eq!(err.matches("region: must be").count(), 100);
}

#[tokio::test]
async fn interactions_one_object_per_request() {
    let srv = start().await;
    assert_eq!(upload(&srv, "shops", vec![shop(1)]).await.status, 200);
    let customer = json!({"customer_id": id(4, 1), "user_id": id(5, 1), "region": "GB"});
    assert_eq!(upload(&srv, "customers", vec![customer]).await.status, 200);
    let ia = json!({
        "interaction_type": "PAGE_VIEW",
        "student_id": id(4, 1),
        "item_type": "SHOP",
        "item_id": id(1, 1),
        "platform": "WEB",
        "event_timestamp": 1_700_000_000_000i64,
        "source": null
    });
    let a = post(&srv, "/user-interactions", ia.to_string()).await;
    assert_eq!(a.status, 201, "{}", a.text);
    let mut echo = a.json();
    let gen = echo.as_object_mut().unwrap().remove("id").unwrap();
    assert!(uuid::Uuid::parse_str(gen.as_str().unwrap()).is_ok());
    assert_eq!(echo, ia);

    // The item is looked up in the type item_type names.
    let mut offer = ia.clone();
    offer["item_type"] = json!("OFFER");
    let a = post(&srv, "/user-interactions", offer.to_string()).await;
    assert_eq!(a.status, 400, "{}", a.text);
    let body = a.json();
    assert_eq!(body["error"], "Validation failed");
    assert_eq!(
        body["message"],
        format!("item_id references unknown offers {}", id(1, 1))
    );
    let mut student = ia.clone();
    student["student_id"] = json!(id(4, 9));
    let a = post(&srv, "/user-interactions", student.to_string()).await;
    assert_eq!(a.status, 400);
    let mut invalid = ia.clone();
    invalid["interaction_type"] = json!("CLICK");
    let a = post(&srv, "/user-interactions", invalid.to_string()).await;
    assert_eq!(a.status, 400);
    assert!(a.json()["message"]
        .as_str()
        .unwrap()
        .starts_with("interaction_type: must be one of"));
    let a = post(&srv, "/user-interactions", batch(vec![ia.clone()])).await;
    assert_eq!(a.status, 400, "a records wrapper is an unknown field");
    let a = post_raw(&srv, "/user-interactions", None, ia.to_string())
        .await
        .unwrap();
    assert_eq!(a.status, 401);

    // Every accepted interaction is kept, in arrival order.
    assert_eq!(
        post(&srv, "/user-interactions", ia.to_string())
            .await
            .status,
        201
    );
    assert_eq!(
        get(&srv, "/_mock/records/interactions").await,
        json!([ia.clone(), ia.clone()])
    );
    assert_eq!(srv.records("user-interactions").len(), 2);
    let s = srv.stats();
    assert_eq!(s.stored["user-interactions"], 2);
    assert_eq!(s.records_rejected["user-interactions"], 4);
    assert_eq!(s.reference_failures, 2);
    assert_eq!(s.requests_by_status["201"], 2);
}

#[tokio::test]
async fn injected_failures_and_throttling() {
    let srv = start().await;
    srv.set_faults(1.0, 0.0, 0.0, Duration::ZERO);
    let a = upload(&srv, "shops", vec![shop(1)]).await;
    assert_eq!(a.status, 500);
    assert_eq!(a.text, r#"{"error":"internal"}"#);
    srv.set_faults(0.0, 1.0, 0.0, Duration::ZERO);
    let a = upload(&srv, "shops", vec![shop(1)]).await;
    assert_eq!(a.status, 429);
    assert_eq!(a.headers["retry-after"], "1");
    // Control endpoints are never faulty; /_mock/faults changes the rates.
    let resp = client()
        .post(format!("{}/_mock/faults", srv.base_url()))
        .body(r#"{"fail_rate":0,"throttle_rate":0,"drop_rate":0,"latency_ms":50}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let t0 = std::time::Instant::now();
    assert_eq!(upload(&srv, "shops", vec![shop(1)]).await.status, 200);
    assert!(t0.elapsed() >= Duration::from_millis(50));
    let resp = client()
        .post(format!("{}/_mock/faults", srv.base_url()))
        .body(r#"{"fail_rate":2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let s = srv.stats();
    assert_eq!(s.requests_by_status["500"], 1);
    assert_eq!(s.requests_by_status["429"], 1);
    assert_eq!(s.stored["shops"], 1);
}

#[tokio::test]
async fn dropped_connections_get_no_answer() {
    let mut opts = MockOptions::local(KEY);
    opts.drop_rate = 1.0;
    opts.seed = 42;
    let srv = MockServer::start(opts).await.unwrap();
    let n = 16;
    for i in 0..n {
        let body = batch(vec![shop(i)]);
        let err = post_raw(&srv, "/v1/data/shops", Some(KEY), body)
            .await
            .err()
            .expect("no answer");
        assert!(!err.is_timeout() && !err.is_status(), "{err:?}");
    }
    let s = srv.stats();
    assert_eq!(s.requests_by_status.get("dropped"), Some(&(n as u64)));
    assert_eq!(s.requests_by_status.len(), 1);
    // Some were applied before the connection was closed, some not.
    let applied = stats_of(&s.stored, "shops");
    assert!(applied > 0 && applied < n as u64, "{applied}");
    srv.set_faults(0.0, 0.0, 0.0, Duration::ZERO);
    assert_eq!(upload(&srv, "shops", vec![shop(0)]).await.status, 200);
}

#[tokio::test]
async fn seeded_faults_are_deterministic() {
    async fn statuses(seed: u64) -> Vec<String> {
        let opts = MockOptions {
            fail_rate: 0.3,
            throttle_rate: 0.3,
            drop_rate: 0.2,
            seed,
            ..MockOptions::local(KEY)
        };
        let srv = MockServer::start(opts).await.unwrap();
        let mut out = Vec::new();
        for i in 0..30 {
            match post_raw(&srv, "/v1/data/shops", Some(KEY), batch(vec![shop(i)])).await {
                Ok(a) => out.push(a.status.to_string()),
                Err(_) => out.push("dropped".into()),
            }
        }
        srv.stop().await;
        out
    }
    let a = statuses(7).await;
    assert_eq!(a, statuses(7).await);
    assert_ne!(a, statuses(8).await);
    for s in ["200", "500", "429", "dropped"] {
        assert!(a.iter().any(|x| x == s), "{s} missing from {a:?}");
    }
}

#[tokio::test]
async fn stop_closes_the_port() {
    let srv = start().await;
    let addr = srv.addr();
    assert_eq!(srv.base_url(), format!("http://{addr}"));
    srv.stop().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    assert!(MockServer::start(MockOptions {
        drop_rate: 1.5,
        ..MockOptions::local(KEY)
    })
    .await
    .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_are_all_counted() {
    let srv = std::sync::Arc::new(start().await);
    let mut tasks = Vec::new();
    for t in 0..8u32 {
        let srv = srv.clone();
        tasks.push(tokio::spawn(async move {
            for b in 0..10u32 {
                // Overlapping keys across tasks: 0..=299.
                let shops = (0..100)
                    .map(|i| shop((t * 37 + b * 11 + i) % 300))
                    .collect();
                assert_eq!(upload(&srv, "shops", shops).await.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let s = srv.stats();
    assert_eq!(s.records_accepted["shops"], 8000);
    assert_eq!(s.stored["shops"], 300);
    assert_eq!(s.duplicates["shops"], 8000 - 300);
    assert_eq!(s.requests_by_status["200"], 80);
    let resp = client()
        .get(format!("{}/_mock/records/widgets", srv.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
}

#[tokio::test]
async fn opaque_errors_name_no_record() {
    let srv = MockServer::start(MockOptions {
        opaque_errors: true,
        ..MockOptions::local(KEY)
    })
    .await
    .unwrap();
    assert_eq!(upload(&srv, "shops", vec![shop(1)]).await.status, 200);
    // Mixed: 207 with a count only.
    let a = upload(&srv, "branches", vec![branch(3, 1), branch(4, 9)]).await;
    assert_eq!(a.status, 207, "{}", a.text);
    let err = a.error();
    assert_eq!(err, "1 of 2 records failed validation");
    assert!(!a.text.contains(&id(2, 4)), "{}", a.text);
    // All failing: 400, still no key.
    let a = upload(&srv, "branches", vec![branch(5, 9), branch(6, 9)]).await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert_eq!(a.error(), "2 of 2 records failed validation");
    assert!(!a.text.contains(&id(2, 5)), "{}", a.text);
    assert_eq!(srv.records("branches").len(), 1);
}
