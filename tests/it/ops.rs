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

    // Fix the source; the poll picks the fixed rows up by themselves. The
    // orphan branch is read again at each tick (inside `lookback`): a dead
    // letter read again is sent, never skipped as unchanged (DESIGN.md §5),
    // so it is accepted once its shop is, without a replay.
    db.exec(
        "UPDATE merchant SET country = 'gb', modified_at = now() WHERE id = 900;
         UPDATE purchase SET total = 1, modified_at = now() WHERE total = 0;
         UPDATE member SET uid = gen_random_uuid(), modified_at = now() WHERE uid IS NULL;",
    )
    .await;
    wait_until(
        Duration::from_secs(30),
        "fixed rows and the orphan delivered",
        || {
            let n = dead().len();
            async move { n == 0 }
        },
    )
    .await;
    // Nothing left to replay.
    let (code, out, err) = run_cli(&["dlq", "replay", "--type", "branches", "--config", c], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("\"replayed\":0"), "{out}");
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
    let (code, out, _) = run_cli(&["dlq", "purge", "--yes", "--config", c], &[]);
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

/// The endpoint token of [`endpoint_state`].
const TOKEN: &str = "0123456789abcdef";

/// GET with the endpoint token.
async fn get_auth(url: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .get(url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
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
        live: cobi_sync::ops::live::Live::new(
            std::sync::Arc::new(settings),
            Some(cobi_sync::ops::live::Running {
                sink: pipeline.sink.clone(),
                resync: None,
            }),
        ),
        store,
        health: pipeline.health.clone(),
        metrics: pipeline.metrics.clone(),
        token: Some(TOKEN.into()),
    };
    (pipeline, state)
}

/// While a SIGHUP restarts the pipeline (no sink or source to reach),
/// `/resync` and `/dlq/replay` answer 503 saying so; in poll mode with a
/// pipeline running, `/resync` answers 409 with the command to use instead.
#[tokio::test]
async fn resync_and_replay_answer_503_while_the_pipeline_restarts() {
    use axum::extract::connect_info::MockConnectInfo;
    use cobi_sync::ops::http::{router, Peer};
    let (pipeline, state) = endpoint_state();
    let app = router(state.clone()).layer(MockConnectInfo(Peer {
        remote: "127.0.0.1:40000".parse().unwrap(),
        local: "127.0.0.1:9187".parse().unwrap(),
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let served = tokio::spawn(async move { axum::serve(listener, app).await });
    let post = |path: &'static str| {
        let url = format!("{base}{path}");
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (code, body) = post("/resync?types=shops").await;
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("snapshot --force"), "{body}");

    state.live.pause();
    for path in ["/resync?types=shops", "/dlq/replay?type=shops"] {
        let (code, body) = post(path).await;
        assert_eq!(code, 503, "{path}: {body}");
        assert!(body.contains("restarting"), "{path}: {body}");
    }
    served.abort();
    let _ = served.await;
    drop(state);
    pipeline.drain(Duration::from_secs(1)).await;
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
    let (code, body) = get_auth(&format!("{other_host}/dlq")).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("daemon's own host"), "{body}");
    let r = reqwest::Client::new()
        .post(format!("{other_host}/dlq/purge"))
        .bearer_auth(TOKEN)
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
    let (code, body) = get_auth(&format!("http://127.0.0.1:{port}/dlq")).await;
    assert_eq!((code, body.as_str()), (200, "[]"));
    match non_loopback_ip() {
        Some(ip) => {
            let (code, body) = get_auth(&format!("http://{ip}:{port}/dlq")).await;
            assert_eq!((code, body.as_str()), (200, "[]"), "through {ip}");
        }
        None => crate::common::skip(
            "this machine has no address but loopback: the same-host case through another address",
        ),
    }
    // Without the token, or with another one: 401, on this host too.
    let (code, body) = get(&format!("http://127.0.0.1:{port}/dlq")).await;
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("http-token"), "{body}");
    for (method, path) in [("POST", "/dlq/purge"), ("POST", "/dlq/replay")] {
        let r = reqwest::Client::new()
            .request(
                method.parse().unwrap(),
                format!("http://127.0.0.1:{port}{path}"),
            )
            .bearer_auth("not-the-token")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path}");
    }
    // Health names the daemon; status and metrics need no token.
    let (code, body) = get(&format!("http://127.0.0.1:{port}/healthz")).await;
    assert_eq!(code, 200);
    let id: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(id["service"], "cobi-sync", "{body}");
    assert_eq!(id["version"], env!("CARGO_PKG_VERSION"), "{body}");
    assert_eq!(get(&format!("http://127.0.0.1:{port}/status")).await.0, 200);
    stop.cancel();
    task.await.unwrap();
    let _ = mocked.await;
    pipeline.drain(Duration::from_secs(1)).await;
}

// ---------------------------------------------------------------------------
// Day-2 operations (issue 16): key discovery, signals, exit codes, ports,
// the endpoint token, logs under systemd, status.

/// One merchant table and its mapping, for tests that need a little data.
const SHOP_TABLE: &str = "CREATE TABLE merchant (id serial PRIMARY KEY, trade_name text NOT NULL, country text NOT NULL, modified_at timestamptz NOT NULL DEFAULT now());
INSERT INTO merchant (trade_name, country) SELECT 'Shop ' || g, 'gb' FROM generate_series(1, 5) g;";

const SHOP_MAPPING: &str = r#"
[[mapping]]
type = "shops"
table = "public.merchant"
cursor = "modified_at"
[mapping.fields]
shop_id = { column = "id", transform = "uuid5" }
name = "trade_name"
region = { column = "country", transform = "upper" }
"#;

/// A config in `wd` whose key comes from no configured place (no
/// `api_key_file`, an unset variable): only the installed `api-key` beside
/// the config file can provide it.
fn config_without_key_source(
    wd: &Workdir,
    db_url: &str,
    api: &str,
    mode: &str,
    body: &str,
) -> std::path::PathBuf {
    let cfg = wd.config(db_url, api, mode, body);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let key_line = format!("api_key_file = \"{}\"\n", wd.path("api-key").display());
    assert!(text.contains(&key_line));
    std::fs::write(
        &cfg,
        text.replace(&key_line, "api_key_env = \"COBI_TEST_NO_SUCH_KEY_VAR\"\n"),
    )
    .unwrap();
    cfg
}

/// Waits for a log line holding `needle`; panics with the log after `timeout`.
async fn wait_for_log(d: &Daemon, needle: &str, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while crate::common::log_lines(&d.log, needle).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no `{needle}` in the log after {timeout:?}:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn requests(mock: &cobi_sync::mock_api::MockServer) -> u64 {
    mock.stats().requests_by_status.values().sum()
}

/// `check`, `snapshot` and the daemon run from a shell find the key the
/// README installs beside the configuration (`/etc/cobi-sync/api-key`);
/// without one, they say where to put it and never send a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_installed_key_is_found_and_nothing_is_sent_without_a_key() {
    let mock = mock().await;
    let wd = Workdir::new();
    let cfg = config_without_key_source(
        &wd,
        "postgres://cobi_sync@127.0.0.1:1/shop",
        &mock.base_url(),
        "poll",
        SHOP_MAPPING,
    );
    let c = cfg.to_str().unwrap();
    // The key file beside the config is found (the database is down: only
    // the API line matters here).
    let (_, out, err) = run_cli(&["check", "--config", c], &[]);
    assert!(
        out.contains("ok      cobi api key") && out.contains("key accepted"),
        "{out}{err}"
    );
    let before = requests(&mock);
    assert!(before >= 1, "check sent its probe");

    // No key anywhere: check says where to put it, and sends nothing.
    std::fs::remove_file(wd.path("api-key")).unwrap();
    let (code, out, _) = run_cli(&["check", "--config", c], &[]);
    assert_eq!(code, 1);
    let installed = wd.path("api-key").display().to_string();
    assert!(out.contains("PROBLEM cobi api key"), "{out}");
    assert!(
        out.contains(&format!("put the key in {installed}")),
        "{out}"
    );
    // snapshot from a shell: exit 1 at once, naming the place.
    let (code, _, err) = run_cli(&["snapshot", "--config", c], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no API key found") && err.contains(&installed),
        "{err}"
    );
    assert_eq!(requests(&mock), before, "no request without a key");

    // The daemon with data to send but no key: delivery pauses with an
    // ERROR naming the fix, and nothing reaches the API.
    let db = crate::common::Db::start().await;
    db.exec(SHOP_TABLE).await;
    let cfg = config_without_key_source(&wd, &db.url(), &mock.base_url(), "poll", SHOP_MAPPING);
    std::fs::remove_file(wd.path("api-key")).unwrap(); // `config` wrote one again
    let mut d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_for_log(
        &d,
        "no API key found; delivery paused",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        requests(&mock),
        before,
        "the daemon sent a request without a key:\n{}",
        d.log_text()
    );
    // The key arrives (file replaced): delivery resumes by itself.
    std::fs::write(wd.path("api-key"), API_KEY).unwrap();
    crate::common::set_mode(&wd.path("api-key"), 0o600);
    wait_until(Duration::from_secs(30), "5 shops delivered", || {
        let n = mock.records("shops").len();
        async move { n == 5 }
    })
    .await;
    assert!(d.term().await.success());
}

/// SIGHUP re-reads the configuration: the daemon stays up, the new log
/// level applies, and what cannot change live is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_the_log_level_and_keeps_running() {
    let db = crate::common::Db::start().await;
    db.exec(SHOP_TABLE).await;
    let mock = mock().await;
    let wd = Workdir::new();
    let cfg = wd.config(&db.url(), &mock.base_url(), "poll", SHOP_MAPPING);
    let mut d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_until(Duration::from_secs(30), "5 shops delivered", || {
        let n = mock.records("shops").len();
        async move { n == 5 }
    })
    .await;
    // debug, and a poll page size that needs a restart.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("level = \"info\"", "level = \"debug\"")
            .replace("page_size = 500", "page_size = 100"),
    )
    .unwrap();
    let lines_before = d.log_text().lines().count();
    unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    wait_for_log(&d, "SIGHUP: log.level applied", Duration::from_secs(20)).await;
    // New rows make the daemon log at debug.
    db.exec("INSERT INTO merchant (trade_name, country) VALUES ('Late', 'gb');")
        .await;
    wait_until(
        Duration::from_secs(30),
        "a DEBUG line after the reload",
        || {
            let text = d.log_text();
            let found = text.lines().skip(lines_before).any(|l| l.contains("DEBUG"));
            async move { found }
        },
    )
    .await;
    assert!(
        d.is_running(),
        "SIGHUP stopped the daemon:\n{}",
        d.log_text()
    );
    let log = d.log_text();
    assert!(
        log.contains("SIGHUP: source.poll changed but cannot change while running"),
        "{log}"
    );
    assert!(
        !log.lines().take(lines_before).any(|l| l.contains("DEBUG")),
        "debug lines before the reload: the level was debug all along?"
    );
    // A broken file on SIGHUP is reported and ignored.
    std::fs::write(&cfg, "[source\nbroken").unwrap();
    unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    wait_for_log(
        &d,
        "the running configuration is kept",
        Duration::from_secs(20),
    )
    .await;
    assert!(d.is_running());
    assert!(d.term().await.success(), "{}", d.log_text());
}

/// A port taken by another process is exit 1 (systemd restarts; 2 would
/// stop it for good) naming `http.listen`; the ERROR carries the journald
/// priority when stderr is the journal, and a text log written to a file
/// has no colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_in_use_is_exit_1_and_logs_suit_the_journal_and_files() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let wd = Workdir::new();
    let mock = mock().await;
    let cfg = wd.config(
        "postgres://cobi_sync@127.0.0.1:1/shop",
        &mock.base_url(),
        "poll",
        SHOP_MAPPING,
    );
    with_http(&cfg, port, "info");

    // Stderr to a plain file: no JOURNAL_STREAM.
    let log = wd.path("plain.log");
    let mut d = Daemon::start_cmd(&cfg, &log, &["run"], &[("JOURNAL_STREAM", "")]);
    let status = d.child.wait().unwrap();
    let text = d.log_text();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains("http.listen") && text.contains(&port.to_string()),
        "{text}"
    );
    assert!(text.lines().count() >= 2, "{text}");
    assert!(!text.contains("\x1b["), "colour codes in a file:\n{text:?}");
    assert!(!text.contains("<3>"), "{text}");

    // Stderr is "the journal": JOURNAL_STREAM names the log file itself.
    use std::os::unix::fs::MetadataExt;
    let log = wd.path("journal.log");
    std::fs::write(&log, "").unwrap();
    let meta = std::fs::metadata(&log).unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let mut d = Daemon::start_cmd(&cfg, &log, &["run"], &[("JOURNAL_STREAM", &stream)]);
    assert_eq!(d.child.wait().unwrap().code(), Some(1));
    let text = d.log_text();
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(!errors.is_empty(), "{text}");
    for l in &errors {
        assert!(l.starts_with("<3>"), "ERROR line without priority: {l}");
    }
    for l in text.lines().filter(|l| l.contains(" INFO ")) {
        assert!(l.starts_with("<6>"), "INFO line: {l}");
    }
    assert!(!text.contains("\x1b["), "{text:?}");
    drop(taken);
}

/// `status --json` from the running daemon: its version, uptime, a place
/// for per-table snapshot progress, and each last error with its time;
/// `/readyz` is not ready before the API was reached. The CLI's `dlq`
/// carries the endpoint token; a request without it gets 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_version_uptime_and_timestamped_errors() {
    let wd = Workdir::new();
    // Neither the database nor the API answers.
    let cfg = wd.config(
        "postgres://cobi_sync@127.0.0.1:1/shop",
        "http://127.0.0.1:1",
        "poll",
        SHOP_MAPPING,
    );
    let port = free_port();
    with_http(&cfg, port, "info");
    let c = cfg.to_str().unwrap();
    let mut d = Daemon::start(&cfg, &wd.path("daemon.log"));
    let base = format!("http://127.0.0.1:{port}");
    wait_until(Duration::from_secs(20), "http endpoint up", || {
        let u = format!("{base}/healthz");
        async move { reqwest::get(&u).await.is_ok() }
    })
    .await;
    let status = || {
        let (code, out, err) = run_cli(&["status", "--json", "--config", c], &[]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    wait_until(Duration::from_secs(30), "both errors recorded", || {
        let st = status();
        async move {
            st["running"] == true
                && st["api"]["last_error_at"].is_string()
                && st["source"]["last_error_at"].is_string()
        }
    })
    .await;
    let st = status();
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"), "{st}");
    assert!(st["uptime_seconds"].is_u64(), "{st}");
    assert!(st["started_at"].as_str().unwrap().ends_with('Z'), "{st}");
    assert!(st["source"]["snapshot_progress"].is_object(), "{st}");
    assert!(
        st["api"]["last_error"]
            .as_str()
            .unwrap()
            .contains("connect"),
        "{st}"
    );
    let (code, body) = get(&format!("{base}/readyz")).await;
    assert_eq!(code, 503, "{body}");
    let (_, text, _) = run_cli(&["status", "--config", c], &[]);
    assert!(
        text.contains(env!("CARGO_PKG_VERSION")) && text.contains("running for"),
        "{text}"
    );
    assert!(text.contains("last error at 20"), "{text}");

    // /metrics additions.
    let (_, metrics) = get(&format!("{base}/metrics")).await;
    for name in [
        "cobi_sync_build_info{version=",
        "cobi_sync_dead_letters{type=\"shops\"} 0",
        "cobi_sync_state_store_bytes ",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }

    // The endpoint token: the CLI has it, others get 401.
    let (code, out, err) = run_cli(&["dlq", "list", "--json", "--config", c], &[]);
    assert_eq!((code, out.trim()), (0, "[]"), "{err}");
    let (code, body) = get(&format!("{base}/dlq")).await;
    assert_eq!(code, 401, "{body}");
    let r = reqwest::Client::new()
        .post(format!("{base}/dlq/purge"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(wd.path("state/http-token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Purging everything from a script needs --yes.
    let (code, _, err) = run_cli(&["dlq", "purge", "--config", c], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--yes"), "{err}");
    let (code, out, err) = run_cli(&["dlq", "purge", "--yes", "--json", "--config", c], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"purged\":0"), "{out}");
    let (code, out, err) = run_cli(&["dlq", "replay", "--json", "--config", c], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"replayed\":0"), "{out}");
    assert!(d.term().await.success());
}

/// Another service on `http.listen` (postgres_exporter on its port, say)
/// is not taken for the daemon: `status` says so and reads the state dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_service_on_the_port_is_not_the_daemon() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/status",
            axum::routing::get(|| async { "# HELP pg_up\npg_up 1\n" }),
        );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let wd = Workdir::new();
    let cfg = wd.config(
        "postgres://cobi_sync@127.0.0.1:1/shop",
        "http://127.0.0.1:1",
        "poll",
        SHOP_MAPPING,
    );
    with_http(&cfg, port, "info");
    let (code, out, err) = run_cli(&["status", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("not as cobi-sync"), "{err}");
    assert!(
        out.contains("no state yet") && out.contains("stopped"),
        "{out}"
    );
    server.abort();
}

/// `teardown`: refuses while the daemon runs and without a terminal or
/// --yes; then drops the slot; the publication the owner created (the
/// README's least-privilege setup) is left with the statement to run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_drops_the_slot_and_says_what_is_left() {
    let db = crate::common::Db::start().await;
    db.exec(SHOP_TABLE).await;
    let url = db.least_privilege_url(true, &["merchant"]).await;
    db.publication("cobi_test", &["merchant"]).await;
    let mock = mock().await;
    let wd = Workdir::new();
    let cfg = wd.config(&url, &mock.base_url(), "replication", SHOP_MAPPING);
    let port = free_port();
    with_http(&cfg, port, "info");
    let c = cfg.to_str().unwrap();
    let slot_exists = || async {
        db.client()
            .await
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'cobi_test'",
                &[],
            )
            .await
            .unwrap()
            .is_some()
    };
    let mut d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_until(Duration::from_secs(60), "5 shops delivered", || {
        let n = mock.records("shops").len();
        async move { n == 5 }
    })
    .await;
    assert!(slot_exists().await);
    let (code, _, err) = run_cli(&["teardown", "--yes", "--config", c], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the daemon is running"), "{err}");
    assert!(slot_exists().await);
    assert!(d.term().await.success());

    let (code, _, err) = run_cli(&["teardown", "--config", c], &[]);
    assert_eq!(code, 2, "no terminal, no --yes: {err}");
    assert!(err.contains("--yes"), "{err}");
    assert!(slot_exists().await);

    let (code, out, err) = run_cli(&["teardown", "--yes", "--config", c], &[]);
    assert!(!slot_exists().await, "{out}{err}");
    assert!(out.contains("dropped replication slot cobi_test"), "{out}");
    assert_eq!(code, 1, "the publication is left: {out}{err}");
    assert!(
        err.contains("DROP PUBLICATION IF EXISTS \"cobi_test\""),
        "{err}"
    );
    db.exec("DROP PUBLICATION cobi_test;").await;
    let (code, out, err) = run_cli(&["teardown", "--yes", "--config", c], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("nothing to drop"), "{out}");
}
