//! SIGHUP restarts the pipeline in-process to apply batch, request and
//! mapping settings (nothing lost, nothing re-sent; a bad file is refused
//! and the old configuration keeps delivering), and the systemd watchdog is
//! fed only while the pipeline's tasks move (DESIGN.md §2, §6; issue 16).

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::common::{log_lines, mock, wait_until, Daemon, Db, Workdir};

/// A merchant table with a second name column, so that a mapping change is
/// visible in what the API receives.
const TABLE: &str = "CREATE TABLE merchant (id serial PRIMARY KEY, trade_name text NOT NULL, label text NOT NULL, country text NOT NULL, modified_at timestamptz NOT NULL DEFAULT now());
INSERT INTO merchant (trade_name, label, country) SELECT 'Shop ' || g, 'Label ' || g, 'gb' FROM generate_series(1, 5) g;";

const MAPPING: &str = r#"
[[mapping]]
type = "shops"
table = "public.merchant"
cursor = "modified_at"
[mapping.fields]
shop_id = { column = "id", transform = "uuid5" }
name = "trade_name"
region = { column = "country", transform = "upper" }
"#;

/// Waits for a log line holding `needle`; panics with the log after `timeout`.
async fn wait_for_log(d: &Daemon, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while log_lines(&d.log, needle).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no `{needle}` in the log after {timeout:?}:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Answers with a 2xx status (requests that carried records).
fn ok_requests(mock: &cobi_sync::mock_api::MockServer) -> u64 {
    mock.stats()
        .requests_by_status
        .iter()
        .filter(|(status, _)| status.starts_with('2'))
        .map(|(_, n)| n)
        .sum()
}

fn names(mock: &cobi_sync::mock_api::MockServer) -> BTreeSet<String> {
    mock.records("shops")
        .iter()
        .map(|r| r["name"].as_str().expect("a name").to_string())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn hup(d: &Daemon) {
    unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
}

/// Replication mode under the least-privilege role: a SIGHUP after the
/// batch size and a mapping changed restarts the pipeline; the rows written
/// next arrive batched and mapped the new way, nothing is lost or sent
/// twice. A file that does not parse, and a mapping naming a column that
/// does not exist, are refused with the reason while the running
/// configuration keeps delivering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_batch_size_and_mapping_changes_by_restarting_the_pipeline() {
    let db = Db::start().await;
    db.exec(TABLE).await;
    let url = db.least_privilege_url(true, &["merchant"]).await;
    db.publication("cobi_test", &["merchant"]).await;
    let mock = mock().await;
    let wd = Workdir::new();
    let cfg = wd.config(&url, &mock.base_url(), "replication", MAPPING);
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("[batch]\n"));
    std::fs::write(
        &cfg,
        text.replace("[batch]\n", "[batch]\nmax_records = 1\n"),
    )
    .unwrap();
    let mut d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_until(Duration::from_secs(60), "5 shops delivered", || {
        let n = mock.records("shops").len();
        async move { n == 5 }
    })
    .await;
    assert_eq!(
        names(&mock),
        set(&["Shop 1", "Shop 2", "Shop 3", "Shop 4", "Shop 5"])
    );
    let before = ok_requests(&mock);
    assert!(before >= 5, "one record per request: {:?}", mock.stats());

    // Batches of up to 100, and the name from `label`.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("max_records = 1\n", "max_records = 100\n")
            .replace("name = \"trade_name\"", "name = \"label\""),
    )
    .unwrap();
    hup(&d);
    wait_for_log(
        &d,
        "SIGHUP: pipeline restarted with the new settings",
        Duration::from_secs(60),
    )
    .await;
    db.exec(
        "INSERT INTO merchant (trade_name, label, country) SELECT 'Shop ' || g, 'Label ' || g, \
         'gb' FROM generate_series(6, 11) g;",
    )
    .await;
    wait_until(Duration::from_secs(60), "11 shops delivered", || {
        let n = mock.records("shops").len();
        async move { n == 11 }
    })
    .await;
    assert_eq!(
        names(&mock),
        set(&[
            "Shop 1", "Shop 2", "Shop 3", "Shop 4", "Shop 5", "Label 6", "Label 7", "Label 8",
            "Label 9", "Label 10", "Label 11"
        ]),
        "rows written after the reload use the new mapping; earlier ones are not re-sent"
    );
    let batched = ok_requests(&mock) - before;
    assert!(
        batched < 6,
        "6 rows of one transaction took {batched} requests: batch.max_records = 100 was not \
         applied\n{}",
        d.log_text()
    );

    // A file that does not parse: refused, the running settings stay.
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, "[source\nbroken").unwrap();
    hup(&d);
    wait_for_log(
        &d,
        "the running configuration is kept",
        Duration::from_secs(30),
    )
    .await;
    // A mapping naming a column the table lacks: refused with the reason.
    std::fs::write(
        &cfg,
        good.replace("name = \"label\"", "name = \"nickname\""),
    )
    .unwrap();
    hup(&d);
    wait_for_log(
        &d,
        "the mapping changes were not applied",
        Duration::from_secs(60),
    )
    .await;
    assert!(
        !log_lines(&d.log, "nickname").is_empty(),
        "the refusal names the column:\n{}",
        d.log_text()
    );
    assert!(d.is_running(), "{}", d.log_text());
    db.exec(
        "INSERT INTO merchant (trade_name, label, country) VALUES ('Shop 12', 'Label 12', 'gb');",
    )
    .await;
    wait_until(Duration::from_secs(60), "the 12th shop delivered", || {
        let n = mock.records("shops").len();
        async move { n == 12 }
    })
    .await;
    assert!(
        names(&mock).contains("Label 12"),
        "the running mapping kept delivering: {:?}",
        names(&mock)
    );
    let stats = mock.stats();
    assert_eq!(
        stats.records_accepted.get("shops"),
        Some(&12),
        "every row sent exactly once: {stats:?}"
    );
    assert!(d.is_running(), "{}", d.log_text());
    assert!(d.term().await.success(), "{}", d.log_text());
}

/// Reads every datagram waiting on `sock`; returns how many were watchdog
/// pings.
fn drain_pings(sock: &UnixDatagram) -> usize {
    let mut buf = [0u8; 4096];
    let mut pings = 0;
    while let Ok(n) = sock.recv(&mut buf) {
        let msg = String::from_utf8_lossy(&buf[..n]);
        pings += msg.lines().filter(|l| *l == "WATCHDOG=1").count();
    }
    pings
}

/// Waits until a watchdog ping arrives on `sock`.
async fn wait_for_ping(sock: &UnixDatagram, d: &Daemon, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while drain_pings(sock) == 0 {
        assert!(
            Instant::now() < deadline,
            "no WATCHDOG=1 within {timeout:?}:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Under systemd (`NOTIFY_SOCKET`, `WATCHDOG_USEC`): the daemon pings while
/// its poll source and sink move or wait on something healthy; a source
/// blocked on a database that does not answer (a lock held by another
/// session) stops the pings, with an ERROR naming the task; the pings
/// resume when it moves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_source_stops_the_watchdog_pings() {
    let db = Db::start().await;
    db.exec(TABLE).await;
    let url = db.least_privilege_url(false, &["merchant"]).await;
    let mock = mock().await;
    let wd = Workdir::new();
    let cfg = wd.config(&url, &mock.base_url(), "poll", MAPPING);
    let sock_path = wd.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_nonblocking(true).unwrap();
    let mut d = Daemon::start_cmd(
        &cfg,
        &wd.path("daemon.log"),
        &["run"],
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "4000000"),
        ],
    );
    wait_until(Duration::from_secs(60), "5 shops delivered", || {
        let n = mock.records("shops").len();
        async move { n == 5 }
    })
    .await;
    // Healthy and idle between polls: pings.
    drain_pings(&sock);
    wait_for_ping(&sock, &d, Duration::from_secs(20)).await;

    // Another session locks the table: the next poll waits forever.
    let locker = db.client().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE merchant IN ACCESS EXCLUSIVE MODE;")
        .await
        .unwrap();
    wait_for_log(
        &d,
        "the systemd watchdog is no longer fed",
        Duration::from_secs(30),
    )
    .await;
    assert!(
        !log_lines(&d.log, "tasks=source").is_empty(),
        "the ERROR names the source:\n{}",
        d.log_text()
    );
    // Pings sent before the verdict are read now; from here on, a whole
    // watchdog interval passes without one.
    drain_pings(&sock);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        drain_pings(&sock),
        0,
        "pings while the source is stuck:\n{}",
        d.log_text()
    );
    assert!(d.is_running());

    // The lock goes: the source moves, the pings resume.
    locker.batch_execute("ROLLBACK;").await.unwrap();
    wait_for_log(&d, "every task moves again", Duration::from_secs(30)).await;
    wait_for_ping(&sock, &d, Duration::from_secs(20)).await;
    assert!(d.term().await.success(), "{}", d.log_text());
}
