//! Poll mode end to end: the real binary, a real PostgreSQL with the
//! partner schema, the mock API.

use std::time::Duration;

use crate::common::{mock, mock_with, Daemon, Db, Workdir, API_KEY};
use crate::partner::{self, wait_in_sync};

async fn setup(n: usize) -> (Db, Workdir) {
    (partner::start_db(n).await, Workdir::new())
}

fn records_accepted(m: &cobi_sync::mock_api::MockServer) -> u64 {
    m.stats().records_accepted.values().sum()
}

#[tokio::test]
async fn full_run_then_live_changes_then_restarts() {
    let (db, wd) = setup(120).await;
    let mock = mock().await;
    let cfg = wd.config(&db.url(), &mock.base_url(), "poll", partner::MAPPINGS);
    // A key file others can read: warned about, naming the file and the fix.
    crate::common::set_mode(&wd.path("api-key"), 0o644);
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let log = wd.path("daemon.log");
    let mut d = Daemon::start(&cfg, &log);

    // Every row of every table, with the right values, parents first.
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(60), &d.log).await;
    assert_eq!(
        mock.stats().reference_failures,
        0,
        "a child arrived before its parent"
    );
    assert_eq!(mock.records("shops").len(), 120);

    // Inserts, updates, soft deletes while it runs (how fast: the e2e
    // bench's latency figures, not a test deadline).
    client
        .batch_execute(
            "BEGIN;
             INSERT INTO merchant (trade_name, country) VALUES ('New Shop', 'ca');
             INSERT INTO outlet (merchant_id, label, country) VALUES (currval('merchant_id_seq'), 'New Outlet', 'ca');
             COMMIT;
             UPDATE member SET country = 'us', modified_at = now() WHERE id <= 10;
             UPDATE merchant SET archived_at = now(), modified_at = now() WHERE id = 3;",
        )
        .await
        .unwrap();
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(30), &d.log).await;
    let shop3 = mock
        .records("shops")
        .into_iter()
        .find(|r| r["name"] == "Shop 3 Zoë")
        .unwrap();
    assert_eq!(shop3["is_deleted"], true, "soft delete through archived_at");
    assert_eq!(mock.stats().reference_failures, 0);

    // A row whose transaction commits after a later-timestamped row was
    // polled: explicit modified_at in the past, inside the lookback.
    client
        .batch_execute(
            "INSERT INTO genre (label, modified_at) VALUES ('Late Genre', now() - interval '2 seconds');",
        )
        .await
        .unwrap();
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(10), &d.log).await;

    // SIGTERM and restart: nothing re-sent. The positive signal that the
    // restarted daemon has polled (and would have re-sent by then) is two
    // new rows written one after the other, each arriving in its own tick;
    // then exactly those two records, and nothing else, were accepted.
    assert!(
        d.term().await.success(),
        "SIGTERM exits 0\n{}",
        d.log_text()
    );
    let before = records_accepted(&mock);
    let mut d = Daemon::start(&cfg, &log);
    for label in ["After Restart 1", "After Restart 2"] {
        client
            .batch_execute(&format!("INSERT INTO genre (label) VALUES ('{label}');"))
            .await
            .unwrap();
        crate::common::wait_until(Duration::from_secs(30), label, || {
            let there = mock
                .records("categories")
                .iter()
                .any(|r| r["name"] == label);
            async move { there }
        })
        .await;
    }
    assert_eq!(
        records_accepted(&mock),
        before + 2,
        "records re-sent after a clean restart\n{}",
        d.log_text()
    );
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(10), &d.log).await;
    assert!(d.term().await.success());
}

#[tokio::test]
async fn sigkill_during_delivery_loses_nothing() {
    let (db, wd) = setup(400).await;
    // A slow API so the kill lands mid-delivery.
    let mock = mock_with(0.0, 0.0, 0.0, Duration::from_millis(40)).await;
    let body = partner::MAPPINGS.to_string();
    let cfg = wd.config(&db.url(), &mock.base_url(), "poll", &body);
    // Small batches: many requests in flight when the kill lands.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[batch]", "[batch]\nmax_records = 50");
    std::fs::write(&cfg, text).unwrap();
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let log = wd.path("daemon.log");
    for round in 0..3 {
        let mut d = Daemon::start(&cfg, &log);
        let start = records_accepted(&mock);
        crate::common::wait_until(Duration::from_secs(30), "deliveries start", || {
            let m = &mock;
            async move { records_accepted(m) > start + 100 }
        })
        .await;
        client
            .batch_execute(&format!(
                "INSERT INTO merchant (trade_name, country) SELECT 'Kill {round} ' || g, 'gb' FROM generate_series(1, 50) g;"
            ))
            .await
            .unwrap();
        d.kill9();
    }
    let d = Daemon::start(&cfg, &log);
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(90), &d.log).await;
    assert_eq!(mock.stats().reference_failures, 0);
}

#[tokio::test]
async fn invalid_rows_are_dead_lettered_and_the_rest_arrives() {
    let (db, wd) = setup(30).await;
    db.exec(
        "INSERT INTO merchant (trade_name, country) VALUES ('Bad Region', 'germany');
         INSERT INTO purchase (merchant_id, country, total) VALUES (1, 'gb', 0);",
    )
    .await;
    let mock = mock().await;
    let cfg = wd.config(&db.url(), &mock.base_url(), "poll", partner::MAPPINGS);
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let log = wd.path("daemon.log");
    let (mut d, _) = Daemon::start_with_http(&cfg, &log, "info").await;
    // Everything but the two bad rows arrives. They are absent from the
    // start, so their dead letters are the positive signal to wait for.
    let mut absent = partner::uuid5_labels(
        &settings,
        &client,
        "shops",
        "SELECT id FROM merchant WHERE country = 'germany'",
    )
    .await;
    absent.extend(
        partner::uuid5_labels(
            &settings,
            &client,
            "transactions",
            "SELECT id FROM purchase WHERE total = 0",
        )
        .await,
    );
    partner::wait_in_sync_except(
        &settings,
        &client,
        &mock,
        Duration::from_secs(60),
        &d.log,
        &absent,
    )
    .await;
    crate::common::wait_until(Duration::from_secs(60), "two dead letters", || {
        let n = crate::common::dead_letters(&cfg).len();
        async move { n >= 2 }
    })
    .await;
    let rows = crate::common::dead_letters(&cfg);
    assert!(d.term().await.success());
    let reasons: Vec<String> = rows
        .iter()
        .map(|r| format!("{} {}", r["type"], r["reason"]))
        .collect();
    assert_eq!(rows.len(), 2, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("shops") && r.contains("region")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("transactions") && r.contains("amount: must be > 0")),
        "{reasons:?}"
    );
    // The bad rows never reached the API.
    assert_eq!(mock.stats().records_rejected.values().sum::<u64>(), 0);
    let _ = API_KEY;
}

/// SIGTERM while the API fails every request, so the sink is full and the
/// source is blocked handing it rows: shutdown abandons the stuck work
/// after the grace period and exits 0 (DESIGN.md §6: within 10 s).
#[tokio::test]
async fn sigterm_with_the_api_failing_exits_after_the_grace_period() {
    let db = Db::start().await;
    db.exec(
        "CREATE TABLE merchant (id serial PRIMARY KEY, trade_name text NOT NULL, \
           country text NOT NULL, modified_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO merchant (trade_name, country)
           SELECT 'Shop ' || g, 'gb' FROM generate_series(1, 6000) g;",
    )
    .await;
    let wd = Workdir::new();
    let mock = mock_with(1.0, 0.0, 0.0, Duration::ZERO).await;
    let body = r#"
[[mapping]]
type = "shops"
table = "public.merchant"
cursor = "modified_at"
[mapping.fields]
shop_id = { column = "id", transform = "uuid5" }
name = "trade_name"
region = { column = "country", transform = "upper" }
"#;
    let cfg = wd.config(&db.url(), &mock.base_url(), "poll", body);
    // Tiny epochs: the sink is full after a few pages and stops reading.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[batch]", "[batch]\nmax_records = 10")
        .replace("[api]", "[api]\nconcurrency = 1");
    std::fs::write(&cfg, text).unwrap();
    let log = wd.path("daemon.log");
    let mut d = Daemon::start(&cfg, &log);
    // The sink's own batches are being refused (the daemon's start-up probe
    // of the API gets a 500 too, before the source has read anything).
    crate::common::wait_until(Duration::from_secs(30), "the sink retries 500s", || {
        let found = !crate::common::log_lines(&log, "cobi api request failed; retrying").is_empty();
        async move { found }
    })
    .await;
    // Let the source fill the sink and block.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let asked = std::time::Instant::now();
    let status = d.term().await;
    let took = asked.elapsed();
    assert!(status.success(), "exit status {status:?}\n{}", d.log_text());
    assert!(
        took < Duration::from_secs(12),
        "shutdown took {took:?}\n{}",
        d.log_text()
    );
    // Something really was stuck (the source, or since the source releases
    // its snapshot during an outage, the sink's deliveries), and was
    // abandoned rather than awaited.
    assert!(
        d.log_text().contains("shutdown grace period"),
        "{}",
        d.log_text()
    );
    assert_eq!(records_accepted(&mock), 0, "the API accepted nothing");
}
