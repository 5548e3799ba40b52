//! SIGHUP restarts the pipeline in-process to apply batch, request and
//! mapping settings (nothing lost, nothing re-sent; a bad file is refused
//! and the old configuration keeps delivering), and the systemd watchdog is
//! fed only while the pipeline's tasks move (DESIGN.md §2, §6; issue 16).

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::common::{
    free_port, log_lines, mock, run_cli, wait_until, with_http, Daemon, Db, Workdir,
};

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

/// Waits until the API holds `n` shops; panics with the daemon's log after
/// `timeout`.
async fn wait_shops(mock: &cobi_sync::mock_api::MockServer, d: &Daemon, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while mock.records("shops").len() != n {
        assert!(
            Instant::now() < deadline,
            "{} shops, not {n}, after 60 s:\n{}",
            mock.records("shops").len(),
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

/// A second table of shops (ids from 1001, so its keys never meet the
/// merchants').
const OUTLETS: &str = "CREATE TABLE outlet (id int PRIMARY KEY, trade_name text NOT NULL, country text NOT NULL);
INSERT INTO outlet VALUES (1001, 'Outlet 1', 'gb'), (1002, 'Outlet 2', 'gb'), (1003, 'Outlet 3', 'gb');";

const OUTLET_MAPPING: &str = r#"
[[mapping]]
type = "shops"
table = "public.outlet"
[mapping.fields]
shop_id = { column = "id", transform = "uuid5" }
name = "trade_name"
region = { column = "country", transform = "upper" }
"#;

/// Replication mode under the least-privilege role, whose publication the
/// owner manages: a mapping added or removed before the owner changed the
/// publication is refused with the statement to run (the daemon keeps
/// delivering); once done, a mapping added by SIGHUP starts with a copy of
/// its table and then streams its changes, and a mapping removed is no
/// longer sent while the others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_mappings() {
    let db = Db::start().await;
    db.exec(TABLE).await;
    db.exec(OUTLETS).await;
    let url = db.least_privilege_url(true, &["merchant", "outlet"]).await;
    db.publication("cobi_test", &["merchant"]).await;
    let mock = mock().await;
    let wd = Workdir::new();
    let cfg = wd.config(&url, &mock.base_url(), "replication", MAPPING);
    let mut d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_shops(&mock, &d, 5).await;
    let restarts = |d: &Daemon| log_lines(&d.log, "SIGHUP: pipeline restarted").len();

    // Added before the owner published the table: refused, with the fix.
    let refusals = |d: &Daemon| log_lines(&d.log, "the mapping changes were not applied").len();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}\n{OUTLET_MAPPING}")).unwrap();
    hup(&d);
    wait_until(Duration::from_secs(60), "the addition refused", || {
        let n = refusals(&d);
        async move { n == 1 }
    })
    .await;
    assert!(
        !log_lines(
            &d.log,
            r#"ALTER PUBLICATION "cobi_test" ADD TABLE "public"."outlet""#
        )
        .is_empty(),
        "{}",
        d.log_text()
    );
    assert!(d.is_running(), "{}", d.log_text());
    // Added once published: its rows are copied, then its changes stream.
    db.exec("ALTER PUBLICATION cobi_test ADD TABLE outlet;")
        .await;
    hup(&d);
    wait_until(Duration::from_secs(60), "the pipeline restarted", || {
        let n = restarts(&d);
        async move { n == 1 }
    })
    .await;
    wait_shops(&mock, &d, 8).await;
    db.exec(
        "INSERT INTO outlet VALUES (1004, 'Outlet 4', 'gb'); \
         INSERT INTO merchant (trade_name, label, country) VALUES ('Shop 6', 'x', 'gb');",
    )
    .await;
    wait_shops(&mock, &d, 10).await;
    let mut want: Vec<String> = (1..=6).map(|i| format!("Shop {i}")).collect();
    want.extend((1..=4).map(|i| format!("Outlet {i}")));
    assert_eq!(names(&mock), want.iter().cloned().collect::<BTreeSet<_>>());

    // Removed while still published: refused, with the fix.
    std::fs::write(&cfg, &text).unwrap();
    hup(&d);
    wait_until(Duration::from_secs(60), "the removal refused", || {
        let n = refusals(&d);
        async move { n == 2 }
    })
    .await;
    assert!(
        !log_lines(
            &d.log,
            r#"ALTER PUBLICATION "cobi_test" DROP TABLE "public"."outlet""#
        )
        .is_empty(),
        "{}",
        d.log_text()
    );
    assert!(d.is_running(), "{}", d.log_text());
    // Removed once unpublished: its changes are no longer sent; the
    // merchants' still are.
    db.exec("ALTER PUBLICATION cobi_test DROP TABLE outlet;")
        .await;
    hup(&d);
    wait_until(
        Duration::from_secs(60),
        "the pipeline restarted again",
        || {
            let n = restarts(&d);
            async move { n == 2 }
        },
    )
    .await;
    assert!(!log_lines(&d.log, "SIGHUP: mapping removed").is_empty());
    db.exec(
        "BEGIN; INSERT INTO outlet VALUES (1005, 'Outlet 5', 'gb'); \
         INSERT INTO merchant (trade_name, label, country) VALUES ('Shop 7', 'x', 'gb'); COMMIT;",
    )
    .await;
    wait_until(Duration::from_secs(60), "Shop 7 delivered", || {
        let found = names(&mock).contains("Shop 7");
        async move { found }
    })
    .await;
    assert!(
        !names(&mock).contains("Outlet 5"),
        "a removed mapping was sent:\n{}",
        d.log_text()
    );
    let stats = mock.stats();
    assert_eq!(
        stats.records_accepted.get("shops"),
        Some(&11),
        "every row sent once: {stats:?}"
    );
    assert!(d.term().await.success(), "{}", d.log_text());
}

/// Replication mode with the HTTP endpoint: after a SIGHUP restarted the
/// pipeline, `cobi-sync resync` reaches the new replication source (each
/// generation has its own channel), which re-copies the table while it
/// streams; changes stream on afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_reaches_the_source_restarted_by_sighup() {
    let db = Db::start().await;
    db.exec(TABLE).await;
    let url = db.least_privilege_url(true, &["merchant"]).await;
    db.publication("cobi_test", &["merchant"]).await;
    let mock = mock().await;
    let wd = Workdir::new();
    let cfg = wd.config(&url, &mock.base_url(), "replication", MAPPING);
    with_http(&cfg, free_port(), "info");
    let mut d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_shops(&mock, &d, 5).await;

    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("[batch]\n", "[batch]\nmax_records = 50\n"),
    )
    .unwrap();
    hup(&d);
    wait_for_log(
        &d,
        "SIGHUP: pipeline restarted with the new settings",
        Duration::from_secs(60),
    )
    .await;
    let copies = |d: &Daemon| log_lines(&d.log, "snapshot of the table complete").len();
    let copied_before = copies(&d);

    let c = cfg.to_str().unwrap();
    let (code, out, err) = run_cli(&["resync", "--type", "shops", "--config", c], &[]);
    assert_eq!(code, 0, "{out}\n{err}\n{}", d.log_text());
    assert!(out.contains("shops"), "{out}");
    assert_eq!(
        log_lines(&d.log, "resync requested: re-copying while streaming").len(),
        1,
        "{}",
        d.log_text()
    );
    wait_until(Duration::from_secs(60), "the re-copy complete", || {
        let n = copies(&d);
        async move { n > copied_before }
    })
    .await;
    // Changes still stream after the re-copy.
    db.exec(
        "INSERT INTO merchant (trade_name, label, country) VALUES ('Shop 6', 'Label 6', 'gb');",
    )
    .await;
    wait_shops(&mock, &d, 6).await;
    let stats = mock.stats();
    assert_eq!(
        (stats.duplicates.get("shops"), stats.stored.get("shops")),
        (Some(&5), Some(&6)),
        "the re-copy re-sent the 5 rows it found (resync sends unchanged records too): \
         {stats:?}"
    );
    assert!(d.term().await.success(), "{}", d.log_text());
}

/// Under systemd in replication mode: a stream with nothing to send is a
/// healthy wait, so the watchdog is fed through quiet periods longer than
/// the source's own heartbeat (10 s) — never a gap of a whole watchdog
/// interval between two pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_replication_stream_keeps_the_watchdog_fed() {
    let db = Db::start().await;
    db.exec(TABLE).await;
    let url = db.least_privilege_url(true, &["merchant"]).await;
    db.publication("cobi_test", &["merchant"]).await;
    let mock = mock().await;
    let wd = Workdir::new();
    let cfg = wd.config(&url, &mock.base_url(), "replication", MAPPING);
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
    wait_shops(&mock, &d, 5).await;
    drain_pings(&sock);
    wait_for_ping(&sock, &d, Duration::from_secs(20)).await;
    // 15 s of a quiet stream (the database writes nothing).
    let start = Instant::now();
    let mut last = start;
    let mut longest = Duration::ZERO;
    while start.elapsed() < Duration::from_secs(15) {
        if drain_pings(&sock) > 0 {
            longest = longest.max(last.elapsed());
            last = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    longest = longest.max(last.elapsed());
    assert!(
        longest < Duration::from_secs(4),
        "no ping for {longest:?} (WatchdogSec is 4 s: systemd would restart the daemon):\n{}",
        d.log_text()
    );
    assert!(
        log_lines(&d.log, "the systemd watchdog is no longer fed").is_empty(),
        "{}",
        d.log_text()
    );
    assert_eq!(mock.records("shops").len(), 5);
    assert!(d.term().await.success(), "{}", d.log_text());
}
