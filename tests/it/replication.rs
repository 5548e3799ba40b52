//! Replication mode end to end: the real binary streaming from a real
//! PostgreSQL (wal_level=logical) to the mock API.

use std::time::Duration;

use crate::common::{mock, wait_until, Daemon, Db, Workdir};
use crate::partner::{self, wait_in_sync, wait_in_sync_at_least_once};

async fn setup(n: usize) -> (Db, Workdir) {
    (partner::start_db(n).await, Workdir::new())
}

#[tokio::test]
async fn snapshot_then_stream_all_types() {
    let (db, wd) = setup(150).await;
    let mock = mock().await;
    let cfg = wd.config(
        &db.url(),
        &mock.base_url(),
        "replication",
        partner::MAPPINGS,
    );
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let log = wd.path("daemon.log");
    let mut d = Daemon::start(&cfg, &log);
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(60), &d.log).await;
    assert_eq!(mock.stats().reference_failures, 0);

    // Inserts, updates, deletes (soft deletes from DELETE), in one transaction
    // and across several.
    client
        .batch_execute(
            "BEGIN;
             INSERT INTO merchant (trade_name, country) VALUES ('Streamed Shop', 'us');
             INSERT INTO outlet (merchant_id, label, country) VALUES (currval('merchant_id_seq'), 'Streamed Outlet', 'us');
             INSERT INTO promo (merchant_id, title, kind, amount, country, days, outlet_ids)
               VALUES (currval('merchant_id_seq'), 'Streamed Promo', 'fixed', 9.99, 'us', ARRAY['sunday'], ARRAY[currval('outlet_id_seq')::int]);
             COMMIT;
             UPDATE merchant SET trade_name = 'Renamed', listed = false WHERE id = 7;
             UPDATE member SET country = 'ca' WHERE id BETWEEN 1 AND 20;
             DELETE FROM event_log WHERE id = 5;
             DELETE FROM favourite WHERE id = 4;
             DELETE FROM purchase WHERE id = 9;",
        )
        .await
        .unwrap();
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(20), &d.log).await;
    assert_eq!(mock.stats().reference_failures, 0);
    // The deleted purchase is a soft delete carrying its required fields.
    let deleted: Vec<_> = mock
        .records("transactions")
        .into_iter()
        .filter(|r| r["is_deleted"] == true)
        .collect();
    assert_eq!(deleted.len(), 1, "{deleted:?}");
    assert!(deleted[0].get("amount").is_some() && deleted[0].get("shop_id").is_some());
    assert!(d.term().await.success(), "{}", d.log_text());
    if std::env::var_os("COBI_TEST_SHOW_LOG").is_some() {
        eprintln!("{}", d.log_text());
    }
}

#[tokio::test]
async fn writes_during_the_initial_snapshot_are_all_present_and_current() {
    let (db, wd) = setup(0).await;
    // A big enough table that the snapshot takes several chunks.
    db.exec(
        "INSERT INTO merchant (trade_name, country) SELECT 'S' || g, 'gb' FROM generate_series(1, 40000) g;
         INSERT INTO outlet (merchant_id, label, country) SELECT 1 + g % 40000, 'O' || g, 'gb' FROM generate_series(1, 30000) g;",
    )
    .await;
    let mock = mock().await;
    let cfg = wd.config(
        &db.url(),
        &mock.base_url(),
        "replication",
        partner::MAPPINGS,
    );
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let log = wd.path("daemon.log");
    let d = Daemon::start(&cfg, &log);
    // Write continuously while the snapshot runs: updates all over the key
    // range (behind, inside and ahead of the copy), inserts, deletes, and new
    // parent+child pairs.
    let writer = {
        let client = db.client().await;
        tokio::spawn(async move {
            for i in 0..150 {
                let sql = format!(
                    "BEGIN;
                     UPDATE merchant SET trade_name = 'U{i}-' || id WHERE id % 150 = {i};
                     INSERT INTO merchant (trade_name, country) VALUES ('W{i}', 'ca');
                     INSERT INTO outlet (merchant_id, label, country) VALUES (currval('merchant_id_seq'), 'WO{i}', 'ca');
                     DELETE FROM outlet WHERE id = {};
                     COMMIT;",
                    1 + i * 97
                );
                client.batch_execute(&sql).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    writer.await.unwrap();
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(120), &d.log).await;
    assert_eq!(mock.stats().reference_failures, 0, "{}", d.log_text());
}

#[tokio::test]
async fn restarts_and_kills_under_writes_lose_nothing() {
    let (db, wd) = setup(100).await;
    let mock = mock().await;
    let cfg = wd.config(
        &db.url(),
        &mock.base_url(),
        "replication",
        partner::MAPPINGS,
    );
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let log = wd.path("daemon.log");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let client = db.client().await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let sql = format!(
                    "BEGIN;
                     INSERT INTO merchant (trade_name, country) VALUES ('K{i}', 'gb');
                     INSERT INTO outlet (merchant_id, label, country) VALUES (currval('merchant_id_seq'), 'KO{i}', 'gb');
                     UPDATE member SET dob = dob + 1 WHERE id = {};
                     DELETE FROM merchant_tag WHERE id = {};
                     COMMIT;",
                    1 + i % 100,
                    1 + i % 100
                );
                client.batch_execute(&sql).await.unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    let seed = 12345u64;
    let mut rng = seed;
    for _ in 0..5 {
        let mut d = Daemon::start(&cfg, &log);
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let ms = 300 + (rng >> 33) % 2500;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        d.kill9();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    let d = Daemon::start(&cfg, &log);
    // A kill -9 between the API's answer and the confirmation re-sends
    // that batch: interactions (no key) may then be stored twice
    // (at-least-once, README); everything else must match exactly.
    let diff =
        wait_in_sync_at_least_once(&settings, &client, &mock, Duration::from_secs(60), &d.log)
            .await;
    println!(
        "restarts/kills: {} rows checked, {} interactions stored twice",
        diff.rows,
        diff.duplicates.len()
    );
    assert_eq!(mock.stats().reference_failures, 0);
}

#[tokio::test]
async fn postgres_restart_mid_stream_reconnects() {
    let (mut db, wd) = setup(50).await;
    let mock = mock().await;
    let cfg = wd.config(
        &db.url(),
        &mock.base_url(),
        "replication",
        partner::MAPPINGS,
    );
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let log = wd.path("daemon.log");
    let mut d = Daemon::start(&cfg, &log);
    {
        let client = db.client().await;
        wait_in_sync(&settings, &client, &mock, Duration::from_secs(60), &d.log).await;
        client
            .batch_execute("INSERT INTO merchant (trade_name, country) SELECT 'Before ' || g, 'gb' FROM generate_series(1, 20) g;")
            .await
            .unwrap();
    }
    db.pg.stop().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    db.pg.start_again().await.unwrap();
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO merchant (trade_name, country) SELECT 'After ' || g, 'gb' FROM generate_series(1, 20) g;")
        .await
        .unwrap();
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(60), &d.log).await;
    assert!(
        d.is_running(),
        "the daemon must reconnect by itself\n{}",
        d.log_text()
    );
    assert!(d.log_text().contains("reconnect"), "{}", d.log_text());
}

#[tokio::test]
async fn toasted_value_is_delivered_whole_on_a_small_update() {
    let (db, wd) = setup(0).await;
    // A large, incompressible name is stored out of line (TOAST).
    db.exec(
        "INSERT INTO merchant (trade_name, country)
         SELECT string_agg(md5(g::text), '') , 'gb' FROM generate_series(1, 2000) g;",
    )
    .await;
    let mock = mock().await;
    let cfg = wd.config(
        &db.url(),
        &mock.base_url(),
        "replication",
        partner::MAPPINGS,
    );
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let log = wd.path("daemon.log");
    let d = Daemon::start(&cfg, &log);
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(30), &d.log).await;
    // Update a small column only: pgoutput sends the big one as "unchanged".
    client
        .batch_execute("UPDATE merchant SET listed = false WHERE id = 1")
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), "update delivered", || {
        let m = &mock;
        async move { m.records("shops").iter().any(|r| r["is_public"] == false) }
    })
    .await;
    let shop = &mock.records("shops")[0];
    assert_eq!(
        shop["name"].as_str().unwrap().len(),
        64_000,
        "the TOASTed name must be sent whole"
    );
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(10), &d.log).await;
}

#[tokio::test]
async fn writes_to_unmapped_tables_keep_the_slot_advancing() {
    let (db, wd) = setup(5).await;
    db.exec(partner::UNMAPPED).await;
    let mock = mock().await;
    let cfg = wd.config(
        &db.url(),
        &mock.base_url(),
        "replication",
        partner::MAPPINGS,
    );
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let log = wd.path("daemon.log");
    let d = Daemon::start(&cfg, &log);
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(30), &d.log).await;
    let mut last = confirmed_lsn(&client).await;
    let mut advances = 0;
    // Unmapped writes for a while (scaled down from a minute).
    for round in 0..6 {
        for _ in 0..20 {
            client
                .batch_execute("INSERT INTO unmapped_noise (payload) SELECT repeat('x', 500) FROM generate_series(1, 200)")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let now = confirmed_lsn(&client).await;
        if now > last {
            advances += 1;
        }
        last = now;
        let _ = round;
    }
    assert!(
        advances >= 4,
        "confirmed_flush_lsn advanced in only {advances} of 6 rounds\n{}",
        d.log_text()
    );
    let lag: i64 = client
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name = 'cobi_test'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(lag < 4 << 20, "slot lag {lag} bytes: WAL is pinned");
}

async fn confirmed_lsn(c: &tokio_postgres::Client) -> u64 {
    let r = c
        .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'cobi_test'", &[])
        .await
        .unwrap();
    cobi_sync::source::replication::setup::parse_lsn(&r.get::<_, String>(0)).unwrap()
}
