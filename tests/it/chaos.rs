//! Fault injection (slow: run by `.ci/run` like everything else). Each test
//! ends with an exact comparison of the source's current state with what
//! the mock API holds (the SQL oracle of `oracle.rs`), and prints what was
//! injected and what was found. Kills and dropped connections allow
//! at-least-once duplicates of interactions (README), reported; every
//! other test allows none. The mock runs in both its modes: naming the
//! failing records, and `--opaque-errors` (answers that name none).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{mock, mock_opaque_with, mock_with, run_cli, Daemon, Db, Workdir};
use crate::partner::{self, wait_in_sync, wait_in_sync_at_least_once, wait_in_sync_except};

/// Continuous writes across related tables: new parent + children in one
/// transaction, updates, deletes. Returns (stop flag, transactions done).
async fn writer(
    db: &Db,
    pause_ms: u64,
) -> (Arc<AtomicBool>, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let mut client = db.client().await;
    let url = db.url();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let (s, d) = (stop.clone(), done.clone());
    let task = tokio::spawn(async move {
        let mut i = 0u64;
        while !s.load(Ordering::Relaxed) {
            let sql = format!(
                "BEGIN;
                 INSERT INTO merchant (trade_name, country) VALUES ('Chaos {i}', 'gb');
                 INSERT INTO outlet (merchant_id, label, country) VALUES (currval('merchant_id_seq'), 'Chaos outlet {i}', 'gb');
                 INSERT INTO promo (merchant_id, title, kind, amount, country) VALUES (currval('merchant_id_seq'), 'Chaos promo {i}', 'fixed', 3, 'gb');
                 INSERT INTO purchase (merchant_id, promo_id, outlet_id, country, total)
                   VALUES (currval('merchant_id_seq'), currval('promo_id_seq'), currval('outlet_id_seq'), 'gb', 12.5);
                 UPDATE member SET dob = coalesce(dob, DATE '2000-01-01') + 1, modified_at = now() WHERE id = {};
                 UPDATE merchant SET listed = NOT listed, modified_at = now() WHERE id = {};
                 DELETE FROM favourite WHERE id = {};
                 COMMIT;",
                1 + i % 50,
                1 + i % 50,
                1 + i % 200
            );
            // The database may be down on purpose: reconnect and retry
            // until it is back.
            if client.batch_execute(&sql).await.is_err() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Ok((c, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    tokio::spawn(conn);
                    client = c;
                }
                continue;
            }
            d.fetch_add(1, Ordering::Relaxed);
            i += 1;
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        }
    });
    (stop, done, task)
}

fn dead_letters(cfg: &std::path::Path) -> usize {
    let (code, out, err) = run_cli(
        &["dlq", "list", "--json", "--config", cfg.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    serde_json::from_str::<Vec<serde_json::Value>>(&out)
        .unwrap()
        .len()
}

fn duplicates(mock: &cobi_sync::mock_api::MockServer) -> u64 {
    mock.stats().duplicates.values().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_kills_during_snapshot_streaming_and_retry_storms() {
    let db = partner::start_db(200).await;
    // A large table so the first kills land during the initial snapshot.
    db.exec("INSERT INTO merchant (trade_name, country) SELECT 'Bulk ' || g, 'ca' FROM generate_series(1, 300000) g;").await;
    let wd = Workdir::new();
    let mock = mock().await;
    let cfg = wd.config(
        &db.url(),
        &mock.base_url(),
        "replication",
        partner::MAPPINGS,
    );
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let log = wd.path("daemon.log");
    let (stop, done, task) = writer(&db, 10).await;
    let mut rng: u64 = 0x5eed_c0b1;
    let mut phases = Vec::new();
    for k in 0..10 {
        // Kills 5..=7 land in a retry storm.
        let storm = (5..=7).contains(&k);
        if storm {
            mock.set_faults(0.5, 0.2, 0.1, Duration::from_millis(5));
        } else {
            mock.set_faults(0.0, 0.0, 0.0, Duration::ZERO);
        }
        // The random delay counts from the moment this daemon streams (a
        // debug build on a loaded machine can take seconds to get there):
        // every kill lands in a working daemon, not in its start-up.
        let streaming = crate::common::log_lines(&log, "streaming changes").len();
        let mut d = Daemon::start(&cfg, &log);
        crate::common::wait_until(Duration::from_secs(120), "the daemon streams", || {
            let up = crate::common::log_lines(&log, "streaming changes").len() > streaming;
            async move { up }
        })
        .await;
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let wait = 200 + (rng >> 33) % 1800;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let shops = mock.stats().stored.get("shops").copied().unwrap_or(0);
        phases.push(format!(
            "kill {k} after {wait} ms ({}; {shops} shops at the API)",
            if shops < 300_000 {
                "snapshot"
            } else if storm {
                "retry storm"
            } else {
                "streaming"
            }
        ));
        d.kill9();
    }
    mock.set_faults(0.0, 0.0, 0.0, Duration::ZERO);
    stop.store(true, Ordering::Relaxed);
    task.await.unwrap();
    let d = Daemon::start(&cfg, &log);
    let diff = wait_in_sync_at_least_once(
        &settings,
        &db.client().await,
        &mock,
        Duration::from_secs(600),
        &d.log,
    )
    .await;
    let stats = mock.stats();
    println!(
        "chaos/kills: {} kills [{}], {} writer transactions, {} rows checked, 0 missing, {} duplicates re-sent, {} interactions stored twice, {} reference failures",
        phases.len(),
        phases.join("; "),
        done.load(Ordering::Relaxed),
        diff.rows,
        duplicates(&mock),
        diff.duplicates.len(),
        stats.reference_failures
    );
    assert_eq!(
        stats.reference_failures, 0,
        "a child was sent before its parent"
    );
    assert!(
        phases.iter().any(|p| p.contains("(snapshot")),
        "no kill landed during the snapshot: {phases:?}"
    );
    drop(d);
    assert_eq!(dead_letters(&cfg), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_fault_mix_for_the_whole_run() {
    let db = partner::start_db(150).await;
    let wd = Workdir::new();
    let mock = mock_with(0.2, 0.1, 0.05, Duration::from_millis(20)).await;
    let cfg = wd.config(
        &db.url(),
        &mock.base_url(),
        "replication",
        partner::MAPPINGS,
    );
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let log = wd.path("daemon.log");
    let d = Daemon::start(&cfg, &log);
    let (stop, done, task) = writer(&db, 20).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::Relaxed);
    task.await.unwrap();
    let diff = wait_in_sync_at_least_once(
        &settings,
        &db.client().await,
        &mock,
        Duration::from_secs(120),
        &d.log,
    )
    .await;
    let stats = mock.stats();
    let faults: u64 = ["500", "429", "dropped"]
        .iter()
        .map(|s| stats.requests_by_status.get(*s).copied().unwrap_or(0))
        .sum();
    println!(
        "chaos/api faults: {faults} faults injected ({:?}), {} writer transactions, {} rows checked, 0 missing, {} duplicates, {} interactions stored twice",
        stats.requests_by_status,
        done.load(Ordering::Relaxed),
        diff.rows,
        duplicates(&mock),
        diff.duplicates.len()
    );
    assert!(
        faults > 10,
        "too few faults to mean anything: {:?}",
        stats.requests_by_status
    );
    drop(d);
    assert_eq!(dead_letters(&cfg), 0, "faults must never dead-letter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_for_30_seconds() {
    let mut db = Db::start().await;
    db.exec(partner::SCHEMA).await;
    db.exec(&partner::seed_sql(80)).await;
    let wd = Workdir::new();
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
    wait_in_sync(
        &settings,
        &db.client().await,
        &mock,
        Duration::from_secs(60),
        &d.log,
    )
    .await;
    let (stop, done, task) = writer(&db, 15).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    db.pg.stop().await.unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        d.is_running(),
        "the daemon must survive the outage\n{}",
        d.log_text()
    );
    db.pg.start_again().await.unwrap();
    let before = done.load(Ordering::Relaxed);
    crate::common::wait_until(
        Duration::from_secs(30),
        "writes resume after the restart",
        || {
            let done = done.clone();
            async move { done.load(Ordering::Relaxed) > before + 20 }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    task.await.unwrap();
    let diff = wait_in_sync(
        &settings,
        &db.client().await,
        &mock,
        Duration::from_secs(90),
        &d.log,
    )
    .await;
    println!(
        "chaos/postgres down: {:.0} s outage, {} writer transactions, {} rows checked, 0 missing, {} duplicates",
        30.0,
        done.load(Ordering::Relaxed),
        diff.rows,
        duplicates(&mock)
    );
    assert!(d.is_running());
    assert!(
        d.log_text().contains("replication reconnected"),
        "{}",
        crate::partner::tail(&d.log_text(), 30)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_down_for_60_seconds() {
    let db = partner::start_db(80).await;
    let wd = Workdir::new();
    let mut mock = mock().await;
    let cfg = wd.config(
        &db.url(),
        &mock.base_url(),
        "replication",
        partner::MAPPINGS,
    );
    let log = wd.path("daemon.log");
    let (d, port) = Daemon::start_with_http(&cfg, &log, "info").await;
    let settings = cobi_sync::config::load(&cfg).unwrap();
    wait_in_sync(
        &settings,
        &db.client().await,
        &mock,
        Duration::from_secs(60),
        &d.log,
    )
    .await;
    let ready = || async move {
        let r = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    assert_eq!(ready().await.0, 200);
    let (stop, done, task) = writer(&db, 20).await;
    mock.go_down().await;
    let mut not_ready_seen = false;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (code, body) = ready().await;
        if code == 503 {
            not_ready_seen = true;
            assert!(body.contains("Cobi API not accepting"), "{body}");
        }
    }
    assert!(not_ready_seen, "/readyz must fail while the API is down");
    let backlog = done.load(Ordering::Relaxed);
    mock.come_back().await.unwrap();
    stop.store(true, Ordering::Relaxed);
    task.await.unwrap();
    let diff = wait_in_sync(
        &settings,
        &db.client().await,
        &mock,
        Duration::from_secs(120),
        &d.log,
    )
    .await;
    crate::common::wait_until(Duration::from_secs(30), "ready again", || async move {
        ready().await.0 == 200
    })
    .await;
    println!(
        "chaos/api down: 60 s outage, {backlog} transactions written during it, {} rows checked, 0 missing, {} duplicates",
        diff.rows,
        duplicates(&mock)
    );
    drop(d);
    assert_eq!(
        dead_letters(&cfg),
        0,
        "nothing is dead-lettered while the API is down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_dir_full_stops_confirming_then_recovers() {
    let wd = Workdir::new();
    let state = wd.path("state");
    std::fs::create_dir_all(&state).unwrap();
    // A small filesystem of its own for the state dir (needs root).
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&state)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        crate::common::skip("cannot mount a tmpfs for the state dir here (needs root)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _guard = Unmount(state.clone());
    let db = partner::start_db(50).await;
    let mock = mock().await;
    let cfg = wd.config(
        &db.url(),
        &mock.base_url(),
        "replication",
        partner::MAPPINGS,
    );
    let log = wd.path("daemon.log");
    let (d, port) = Daemon::start_with_http(&cfg, &log, "info").await;
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(60), &d.log).await;
    // Fill the filesystem.
    let filler = state.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=64"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    let (stop, done, task) = writer(&db, 10).await;
    let readyz = || async move {
        let r = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    crate::common::wait_until(
        Duration::from_secs(60),
        "the daemon reports the state store",
        || async move {
            let (code, body) = readyz().await;
            code == 503 && body.contains("state store not writable")
        },
    )
    .await;
    let client = &client;
    // A position made durable just before the disk filled may still be
    // confirmed by the next status update: take the stuck position only
    // after one status update has followed the failure report.
    let failed_at = server_now(client).await;
    crate::common::wait_until(
        Duration::from_secs(60),
        "a status update from the daemon after the failure",
        || {
            let failed_at = failed_at.clone();
            async move { walsender(client).await.1.is_some_and(|t| t > failed_at) }
        },
    )
    .await;
    let stuck_at = confirmed_lsn(client).await;
    // Positive signals first: the server has sent the daemon WAL past the
    // stuck position (the writer keeps writing), and the daemon has
    // answered with a status update since — the moment it would confirm.
    crate::common::wait_until(
        Duration::from_secs(60),
        "WAL past the stuck position sent to the daemon",
        || async move { walsender(client).await.0 > stuck_at },
    )
    .await;
    let sent_at = server_now(client).await;
    crate::common::wait_until(
        Duration::from_secs(60),
        "a status update from the daemon after that WAL",
        || {
            let sent_at = sent_at.clone();
            async move { walsender(client).await.1.is_some_and(|t| t > sent_at) }
        },
    )
    .await;
    assert_eq!(
        confirmed_lsn(client).await,
        stuck_at,
        "progress confirmed while the state store cannot be written"
    );
    let (code, body) = readyz().await;
    assert_eq!(code, 503, "the store stayed unwritable throughout: {body}");
    assert!(
        d.log_text().contains("cannot write the state store"),
        "{}",
        d.log_text()
    );
    // Space comes back.
    std::fs::remove_file(&filler).unwrap();
    stop.store(true, Ordering::Relaxed);
    task.await.unwrap();
    let diff = wait_in_sync(&settings, client, &mock, Duration::from_secs(90), &d.log).await;
    crate::common::wait_until(Duration::from_secs(30), "ready again", || async move {
        readyz().await.0 == 200
    })
    .await;
    // The position is confirmed with the next status update after the
    // state flush.
    crate::common::wait_until(
        Duration::from_secs(30),
        "progress confirmed again",
        || async move { confirmed_lsn(client).await > stuck_at },
    )
    .await;
    println!(
        "chaos/state dir full: {} writer transactions, {} rows checked, 0 missing, {} duplicates",
        done.load(Ordering::Relaxed),
        diff.rows,
        duplicates(&mock)
    );
}

/// The slot's walsender: the position it has sent, and (as text, UTC) when
/// the daemon last answered with a status update.
async fn walsender(c: &tokio_postgres::Client) -> (u64, Option<String>) {
    let rows = c
        .query(
            "SELECT s.sent_lsn::text, (s.reply_time AT TIME ZONE 'UTC')::text \
             FROM pg_stat_replication s JOIN pg_replication_slots r ON r.active_pid = s.pid \
             WHERE r.slot_name = 'cobi_test'",
            &[],
        )
        .await
        .unwrap();
    match rows.first() {
        Some(r) => (
            r.get::<_, Option<String>>(0)
                .and_then(|l| cobi_sync::source::replication::setup::parse_lsn(&l))
                .unwrap_or(0),
            r.get(1),
        ),
        None => (0, None),
    }
}

async fn confirmed_lsn(c: &tokio_postgres::Client) -> u64 {
    let r = c
        .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'cobi_test'", &[])
        .await
        .unwrap();
    cobi_sync::source::replication::setup::parse_lsn(&r.get::<_, String>(0)).unwrap()
}

/// The fault mix again, against an API that never says which records
/// failed (`--opaque-errors`), while rows it must reject keep arriving: a
/// shop with an invalid region (dead-lettered by the daemon) and its
/// branch, which the API rejects for the unknown shop — only a 207/400
/// naming nobody tells the daemon. Exactly those rows end as dead letters;
/// everything else arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_fault_mix_with_opaque_errors_and_rejected_rows() {
    let db = partner::start_db(100).await;
    let wd = Workdir::new();
    let mock = mock_opaque_with(0.0, 0.0, 0.0, Duration::ZERO).await;
    let cfg = wd.config(
        &db.url(),
        &mock.base_url(),
        "replication",
        partner::MAPPINGS,
    );
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let log = wd.path("daemon.log");
    let (d, _) = Daemon::start_with_http(&cfg, &log, "info").await;
    let client = db.client().await;
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(60), &d.log).await;
    mock.set_faults(0.2, 0.1, 0.05, Duration::from_millis(20));
    let (stop, done, task) = writer(&db, 20).await;
    const REJECTED: usize = 8;
    for i in 0..REJECTED {
        client
            .batch_execute(&format!(
                "BEGIN;
                 INSERT INTO merchant (trade_name, country) VALUES ('Rejected {i}', 'germany');
                 INSERT INTO outlet (merchant_id, label, country) VALUES (currval('merchant_id_seq'), 'Orphan {i}', 'gb');
                 COMMIT;"
            ))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    stop.store(true, Ordering::Relaxed);
    task.await.unwrap();
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
            "branches",
            "SELECT o.id FROM outlet o JOIN merchant m ON m.id = o.merchant_id WHERE m.country = 'germany'",
        )
        .await,
    );
    assert_eq!(absent.len(), 2 * REJECTED);
    let diff = wait_in_sync_except(
        &settings,
        &client,
        &mock,
        Duration::from_secs(180),
        &d.log,
        &absent,
    )
    .await;
    // Absent from the start: their dead letters are the positive signal.
    crate::common::wait_until(Duration::from_secs(120), "the dead letters", || {
        let done = crate::common::dead_letters(&cfg).len() >= absent.len();
        async move { done }
    })
    .await;
    let letters: std::collections::BTreeSet<String> = crate::common::dead_letters(&cfg)
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["type"].as_str().unwrap(),
                r["cobi_key"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        letters, absent,
        "exactly the rejected rows are dead letters"
    );
    let stats = mock.stats();
    println!(
        "chaos/opaque: {:?}, {} writer transactions, {} rows checked, {} rejected rows dead-lettered, {} duplicates",
        stats.requests_by_status,
        done.load(Ordering::Relaxed),
        diff.rows,
        absent.len(),
        duplicates(&mock)
    );
    assert!(
        stats.requests_by_status.contains_key("207")
            || stats.requests_by_status.contains_key("400"),
        "the API never rejected a record: the test proves nothing {:?}",
        stats.requests_by_status
    );
    drop(d);
}

/// SIGTERM while a 100,000-row transaction is being delivered to a slow
/// API: the daemon finishes its in-flight requests, persists its state and
/// exits 0 within 10 s (DESIGN §6); restarted, it re-sends nothing that
/// was accepted (every record accepted exactly once) and delivers the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_100k_row_delivery_exits_0_and_resends_nothing() {
    const ROWS: u64 = 100_000;
    let db = partner::start_db(0).await;
    let wd = Workdir::new();
    let mock = mock_with(0.0, 0.0, 0.0, Duration::from_millis(250)).await;
    let cfg = wd.config(
        &db.url(),
        &mock.base_url(),
        "replication",
        partner::MAPPINGS,
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[batch]", "[batch]\nmax_records = 1000");
    std::fs::write(&cfg, text).unwrap();
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let log = wd.path("daemon.log");
    let client = db.client().await;
    let mut d = Daemon::start(&cfg, &log);
    // Streaming has started once a first row comes through.
    client
        .batch_execute("INSERT INTO merchant (trade_name, country) VALUES ('First', 'gb');")
        .await
        .unwrap();
    crate::common::wait_until(Duration::from_secs(60), "the first shop", || {
        let n = mock.records("shops").len();
        async move { n == 1 }
    })
    .await;
    client
        .batch_execute(&format!(
            "INSERT INTO merchant (trade_name, country) SELECT 'Bulk ' || g, 'gb' FROM generate_series(1, {ROWS}) g;"
        ))
        .await
        .unwrap();
    let stored =
        |m: &cobi_sync::mock_api::MockServer| m.stats().stored.get("shops").copied().unwrap_or(0);
    crate::common::wait_until(Duration::from_secs(120), "delivery under way", || {
        let n = stored(&mock);
        async move { n > 5_000 }
    })
    .await;
    let (status, took) = d.term_timed().await;
    let at_exit = stored(&mock);
    assert!(
        at_exit < ROWS + 1,
        "the delivery was over before the SIGTERM: the test proves nothing"
    );
    assert!(status.success(), "exit status {status}\n{}", d.log_text());
    assert!(
        took <= Duration::from_secs(10),
        "SIGTERM took {took:?} (DESIGN §6: within 10 s)\n{}",
        d.log_text()
    );
    let d = Daemon::start(&cfg, &log);
    let diff = wait_in_sync(&settings, &client, &mock, Duration::from_secs(300), &d.log).await;
    let stats = mock.stats();
    println!(
        "chaos/sigterm under load: exit 0 after {took:?} with {at_exit} of {} shops delivered; {} rows checked after the restart",
        ROWS + 1,
        diff.rows
    );
    assert_eq!(
        stats.records_accepted.get("shops").copied().unwrap_or(0),
        ROWS + 1,
        "records re-sent after the restart ({} duplicates)",
        duplicates(&mock)
    );
}

/// The server's clock, as `walsender` reports reply times (UTC text).
async fn server_now(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT (now() AT TIME ZONE 'UTC')::text", &[])
        .await
        .unwrap()
        .get(0)
}
