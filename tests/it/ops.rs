//! What an operator sees: the HTTP endpoint (health, readiness, metrics,
//! status), `status` and `dlq` through the running daemon and from the state
//! dir, and logs free of secrets and personal data.

use std::io::BufRead;
use std::time::Duration;

use crate::common::{free_port, mock, run_cli, wait_until, with_http, Daemon, Workdir, API_KEY};
use crate::partner::{self, wait_in_sync};

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_metrics_and_status() {
    let db = partner::start_db(40).await;
    let wd = Workdir::new();
    let mock = mock().await;
    let cfg = wd.config(
        &db.url(),
        &mock.base_url(),
        "replication",
        partner::MAPPINGS,
    );
    let port = free_port();
    with_http(&cfg, port, "info");
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let mut d = Daemon::start(&cfg, &wd.path("daemon.log"));
    let base = format!("http://127.0.0.1:{port}");
    wait_until(Duration::from_secs(20), "http endpoint up", || {
        let u = format!("{base}/healthz");
        async move { reqwest::get(&u).await.is_ok() }
    })
    .await;
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(60), &d.log).await;
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
    let (code, body) = get(&format!("{base}/readyz")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["ready"],
        true
    );

    // /metrics parses as Prometheus text and counts what happened.
    let (code, text) = get(&format!("{base}/metrics")).await;
    assert_eq!(code, 200);
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let value = |name: &str, ty: &str| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && s.labels.get("type") == Some(ty))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    assert_eq!(
        value("cobi_sync_records_sent_total", "shops"),
        40.0,
        "{text}"
    );
    assert!(value("cobi_sync_records_read_total", "transactions") >= 40.0);
    assert!(value("cobi_sync_last_success_timestamp_seconds", "branches") > 1.7e9);
    assert!(scrape
        .samples
        .iter()
        .any(|s| s.metric == "cobi_sync_requests_total" && s.labels.get("status") == Some("200")));
    assert!(scrape
        .samples
        .iter()
        .any(|s| s.metric.starts_with("cobi_sync_batch_latency_seconds")));
    assert!(scrape
        .samples
        .iter()
        .any(|s| s.metric == "cobi_sync_slot_lag_bytes"));

    // status through the running daemon.
    let (code, out, err) = run_cli(
        &["status", "--json", "--config", cfg.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["running"], true);
    assert_eq!(st["mode"], "replication");
    assert_eq!(st["source"]["connected"], true);
    assert_eq!(st["source"]["slot"], "cobi_test");
    assert_eq!(st["api"]["ready"], true);
    assert_eq!(st["types"]["shops"]["sent"], 40);
    assert_eq!(st["types"]["shops"]["dead_letters"], 0);
    let (code, out, _) = run_cli(&["status", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 0);
    assert!(
        out.contains("daemon running") && out.contains("shops"),
        "{out}"
    );

    // …and from the state dir once stopped.
    assert!(d.term().await.success());
    let (code, out, err) = run_cli(
        &["status", "--json", "--config", cfg.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["running"], false);
    assert_eq!(st["types"]["shops"]["sent"], 40);
    assert!(st["source"]["confirmed_lsn"]
        .as_str()
        .unwrap()
        .contains('/'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_rows_are_dead_lettered_then_replayed_after_the_fix() {
    let db = partner::start_db(20).await;
    // What the API would reject: a bad region, amount 0, a missing required
    // value, and a branch of that bad shop (dangling reference once the
    // shop is dead-lettered).
    db.exec(
        "INSERT INTO merchant (id, trade_name, country) VALUES (900, 'Bad Region Shop', 'England');
         INSERT INTO outlet (merchant_id, label, country) VALUES (900, 'Orphan Outlet', 'gb');
         INSERT INTO purchase (merchant_id, country, total) VALUES (1, 'gb', 0);
         INSERT INTO member (country, campus_id, programme_id) VALUES ('gb', 1, 1);
         UPDATE member SET uid = uid WHERE false;",
    )
    .await;
    // member.uid is NOT NULL with a default; make one required value missing
    // through the mapping instead: customers.user_id from a NULL-able copy.
    db.exec("ALTER TABLE member ALTER COLUMN uid DROP NOT NULL; UPDATE member SET uid = NULL WHERE id = (SELECT max(id) FROM member);").await;
    let wd = Workdir::new();
    let mock = mock().await;
    let cfg = wd.config(&db.url(), &mock.base_url(), "poll", partner::MAPPINGS);
    let port = free_port();
    with_http(&cfg, port, "info");
    let c = cfg.to_str().unwrap();
    let mut d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_until(Duration::from_secs(20), "http endpoint up", || {
        let u = format!("http://127.0.0.1:{port}/healthz");
        async move { reqwest::get(&u).await.is_ok() }
    })
    .await;
    let dead = || {
        let (code, out, err) = run_cli(&["dlq", "list", "--json", "--config", c], &[]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap()
    };
    wait_until(Duration::from_secs(60), "four dead letters", || {
        let n = dead().len();
        async move { n == 4 }
    })
    .await;
    let rows = dead();
    let summary: Vec<String> = rows
        .iter()
        .map(|r| format!("{}: {}", r["type"], r["reason"]))
        .collect();
    let has = |ty: &str, needle: &str| summary.iter().any(|s| s.contains(ty) && s.contains(needle));
    assert!(has("shops", "region"), "{summary:?}");
    assert!(has("transactions", "amount: must be > 0"), "{summary:?}");
    assert!(
        has("customers", "user_id: required field is missing"),
        "{summary:?}"
    );
    assert!(
        has("branches", "shop"),
        "the orphan branch is rejected by the API: {summary:?}"
    );
    // The table output names type, keys, reason, attempts.
    let (_, table, _) = run_cli(&["dlq", "list", "--config", c], &[]);
    assert!(
        table.contains("attempts") && table.contains("branches"),
        "{table}"
    );
    // Everything else arrived.
    let shops = mock.records("shops").len();
    assert_eq!(shops, 20);

    // Fix the source; the poll picks the fixed rows up by themselves, and
    // `dlq replay` re-sends the orphan branch now that its shop exists.
    db.exec(
        "UPDATE merchant SET country = 'gb', modified_at = now() WHERE id = 900;
         UPDATE purchase SET total = 1, modified_at = now() WHERE total = 0;
         UPDATE member SET uid = gen_random_uuid(), modified_at = now() WHERE uid IS NULL;",
    )
    .await;
    wait_until(Duration::from_secs(30), "fixed rows delivered", || {
        let n = dead().len();
        async move { n == 1 }
    })
    .await;
    let (code, out, err) = run_cli(&["dlq", "replay", "--type", "branches", "--config", c], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("\"replayed\":1"), "{out}");
    assert!(dead().is_empty(), "{:?}", dead());
    let settings = cobi_sync::config::load(&cfg).unwrap();
    wait_in_sync(
        &settings,
        &db.client().await,
        &mock,
        Duration::from_secs(30),
        &d.log,
    )
    .await;

    // purge works too (stopped daemon: on the state dir).
    assert!(d.term().await.success());
    let (code, out, _) = run_cli(&["dlq", "purge", "--config", c], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("\"purged\":0"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_status_and_metrics_hold_no_secrets_or_personal_data() {
    let db = partner::start_db(30).await;
    const PERSON_UID: &str = "c0ffee00-1234-4abc-8def-0123456789ab";
    const PERSON_DOB: &str = "1987-06-05";
    db.exec(&format!(
        "INSERT INTO member (uid, dob, country, sex) VALUES ('{PERSON_UID}', '{PERSON_DOB}', 'gb', 'F');"
    ))
    .await;
    let wd = Workdir::new();
    let mock = mock().await;
    // A password in the URL (trust auth ignores it) and in a file.
    const DB_PASSWORD: &str = "Sup3rS3cretDbPw";
    let url = db
        .url()
        .replace("postgres@", &format!("postgres:{DB_PASSWORD}@"));
    let cfg = wd.config(&url, &mock.base_url(), "replication", partner::MAPPINGS);
    let port = free_port();
    with_http(&cfg, port, "debug");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("format = \"text\"", "format = \"json\"");
    std::fs::write(&cfg, text).unwrap();
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let log = wd.path("daemon.log");
    let mut d = Daemon::start(&cfg, &log);
    wait_in_sync(
        &settings,
        &db.client().await,
        &mock,
        Duration::from_secs(60),
        &d.log,
    )
    .await;
    db.exec("UPDATE member SET country = 'us' WHERE dob = '1987-06-05'; DELETE FROM favourite WHERE id = 1;").await;
    wait_in_sync(
        &settings,
        &db.client().await,
        &mock,
        Duration::from_secs(30),
        &d.log,
    )
    .await;
    let (_, status) = get(&format!("http://127.0.0.1:{port}/status")).await;
    let (_, metrics) = get(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert!(d.term().await.success());
    let logs = d.log_text();
    assert!(
        logs.lines().count() > 10,
        "debug logging produced too little to be a real test:\n{logs}"
    );
    // Every line is JSON.
    for l in std::io::BufReader::new(std::fs::File::open(&log).unwrap()).lines() {
        let l = l.unwrap();
        serde_json::from_str::<serde_json::Value>(&l).unwrap_or_else(|_| panic!("not JSON: {l}"));
    }
    let customer_key = uuid::Uuid::new_v5(&settings.id_namespace, b"customers:31")
        .hyphenated()
        .to_string();
    for (what, text) in [
        ("logs", &logs),
        ("/status", &status),
        ("/metrics", &metrics),
    ] {
        for secret in [
            API_KEY,
            DB_PASSWORD,
            PERSON_UID,
            PERSON_DOB,
            customer_key.as_str(),
        ] {
            assert!(!text.contains(secret), "{what} contain `{secret}`");
        }
    }
}

/// A local address other than loopback, if this machine has a route
/// anywhere (no packet is sent: a UDP "connect" only picks the source).
fn non_loopback_ip() -> Option<std::net::IpAddr> {
    ["192.0.2.1:9", "203.0.113.1:9", "10.255.255.1:9"]
        .iter()
        .find_map(|target| {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
            s.connect(target).ok()?;
            let ip = s.local_addr().ok()?.ip();
            (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
        })
}

/// The daemon's endpoint state on a pipeline that reaches nothing.
fn endpoint_state() -> (cobi_sync::daemon::Pipeline, cobi_sync::ops::http::AppState) {
    let settings = cobi_sync::config::load_str(
        r#"
[source]
url = "postgres://cobi_sync@127.0.0.1:1/shop"
[api]
base_url = "http://127.0.0.1:9"
[[mapping]]
type = "shops"
table = "public.merchant"
[mapping.fields]
shop_id = { column = "id", transform = "uuid5" }
name = "trade_name"
region = { column = "country", transform = "upper" }
"#,
        "<test>",
    )
    .unwrap();
    let store: std::sync::Arc<dyn cobi_sync::state::StateStore> =
        std::sync::Arc::new(cobi_sync::state::MemoryStore::new());
    let pipeline = cobi_sync::daemon::Pipeline::start(&settings, store.clone()).unwrap();
    let state = cobi_sync::ops::http::AppState {
        settings: std::sync::Arc::new(settings),
        store,
        health: pipeline.health.clone(),
        metrics: pipeline.metrics.clone(),
        sink: pipeline.sink.clone(),
    };
    (pipeline, state)
}

/// Other hosts get health and metrics but not the dead letters (record
/// contents, purge); clients on the daemon's host get both.
#[tokio::test]
async fn dlq_endpoints_refuse_other_hosts() {
    use axum::extract::connect_info::MockConnectInfo;
    use cobi_sync::ops::http::{router, serve, Peer};

    // The router as another host sees it: the connection info says the
    // client is 203.0.113.9 (the test itself connects over loopback).
    let (pipeline, state) = endpoint_state();
    let app = router(state.clone()).layer(MockConnectInfo(Peer {
        remote: "203.0.113.9:40000".parse().unwrap(),
        local: "192.0.2.2:9187".parse().unwrap(),
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other_host = format!("http://{}", listener.local_addr().unwrap());
    let mocked = tokio::spawn(async move { axum::serve(listener, app).await });
    let (code, body) = get(&format!("{other_host}/dlq")).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("daemon's own host"), "{body}");
    let r = reqwest::Client::new()
        .post(format!("{other_host}/dlq/purge"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert_eq!(get(&format!("{other_host}/metrics")).await.0, 200);
    assert_eq!(get(&format!("{other_host}/status")).await.0, 200);
    mocked.abort();

    // The real endpoint on 0.0.0.0, as `serve` wires it: this host's own
    // clients, over loopback or through its other address, get /dlq.
    let port = free_port();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = serve(([0, 0, 0, 0], port).into(), state, stop.clone())
        .await
        .unwrap();
    let (code, body) = get(&format!("http://127.0.0.1:{port}/dlq")).await;
    assert_eq!((code, body.as_str()), (200, "[]"));
    match non_loopback_ip() {
        Some(ip) => {
            let (code, body) = get(&format!("http://{ip}:{port}/dlq")).await;
            assert_eq!((code, body.as_str()), (200, "[]"), "through {ip}");
        }
        None => crate::common::skip(
            "this machine has no address but loopback: the same-host case through another address",
        ),
    }
    stop.cancel();
    task.await.unwrap();
    let _ = mocked.await;
    pipeline.drain(Duration::from_secs(1)).await;
}
