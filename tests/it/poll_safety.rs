//! Poll mode loses nothing under the README's least-privilege role (LOGIN +
//! SELECT, no superuser, no `pg_read_all_stats`): late commits of long
//! transactions (writing first or reading first), sequence-fed integer
//! cursors, NULL cursors, undecodable rows, a cursor changed between runs,
//! and an API outage that must not hold the snapshot open.
//!
//! Expected records are written by hand (names and counts), never computed
//! with the product's mapping code.

use std::time::Duration;

use crate::common::{log_lines, mock, mock_with, run_cli, wait_until, Daemon, Db, Workdir};

const SHOPS: &str = r#"
[[mapping]]
type = "shops"
table = "public.merchant"
cursor = "modified_at"
[mapping.fields]
shop_id = "id"
name = "trade_name"
region = { column = "country", transform = "upper" }
"#;

/// A merchant table keyed by UUID, stamped with `now()` on insert.
const MERCHANT: &str = "CREATE TABLE merchant (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), \
    trade_name text NOT NULL, country text NOT NULL, \
    modified_at timestamptz DEFAULT now(), version bigserial);";

/// Config with a 1 s schedule and a 1 s lookback (shorter than the
/// transactions under test), read as `url`.
fn config(wd: &Workdir, url: &str, api: &str, body: &str, page_size: u32) -> std::path::PathBuf {
    let cfg = wd.config(url, api, "poll", body);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("lookback = \"5s\"", "lookback = \"1s\"")
        .replace("page_size = 500", &format!("page_size = {page_size}"));
    std::fs::write(&cfg, text).unwrap();
    cfg
}

fn names(m: &cobi_sync::mock_api::MockServer, ty: &str) -> Vec<String> {
    let mut v: Vec<String> = m
        .records(ty)
        .iter()
        .filter_map(|r| r["name"].as_str().map(String::from))
        .collect();
    v.sort();
    v
}

async fn arrives(m: &cobi_sync::mock_api::MockServer, ty: &str, name: &str, d: &Daemon) {
    let what = format!("{ty} `{name}` delivered");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !names(m, ty).iter().any(|n| n == name) {
        if std::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}\n{}", d.log_text());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn seeded(n: usize) -> (Db, String) {
    let db = Db::start().await;
    db.exec(MERCHANT).await;
    db.exec(&format!(
        "INSERT INTO merchant (trade_name, country) SELECT 'Shop ' || g, 'gb' FROM generate_series(1, {n}) g;"
    ))
    .await;
    let url = db.least_privilege_url(false, &["public.merchant"]).await;
    (db, url)
}

/// Moves the cursor past a pending transaction: commits rows stamped later,
/// waits until they are delivered, for longer than the lookback.
async fn move_cursor_past(db: &Db, m: &cobi_sync::mock_api::MockServer, d: &Daemon, tag: &str) {
    for i in 0..3 {
        let name = format!("{tag} later {i}");
        db.exec(&format!(
            "INSERT INTO merchant (trade_name, country) VALUES ('{name}', 'gb');"
        ))
        .await;
        arrives(m, "shops", &name, d).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
}

/// The late-commit scenario: the daemon has read the table (mapping
/// `body`); a writer runs `open` in a transaction, later rows are
/// committed and delivered for longer than `lookback`, the writer runs
/// `close` (which commits) — and the row named `late` must arrive.
async fn late_commit(body: &str, open: &str, close: &str, late: &str) {
    let (db, url) = seeded(20).await;
    let m = mock().await;
    let wd = Workdir::new();
    let cfg = config(&wd, &url, &m.base_url(), body, 500);
    let d = Daemon::start(&cfg, &wd.path("daemon.log"));
    arrives(&m, "shops", "Shop 20", &d).await;

    let writer = db.client().await;
    writer.batch_execute(open).await.unwrap();
    move_cursor_past(&db, &m, &d, late).await;
    writer.batch_execute(close).await.unwrap();
    arrives(&m, "shops", late, &d).await;
    assert_eq!(m.records("shops").len(), 24);
}

/// A writer stamps a row with `now()`, stays open longer than `lookback`
/// while later rows are committed and delivered, then commits: its row
/// arrives.
#[tokio::test]
async fn a_long_writer_commits_late_and_its_row_arrives() {
    late_commit(
        SHOPS,
        "BEGIN; INSERT INTO merchant (trade_name, country) VALUES ('Written early', 'gb');",
        "COMMIT",
        "Written early",
    )
    .await;
}

/// A transaction reads for a while (no xid yet, invisible to
/// `pg_current_snapshot()`), then writes rows stamped with its start time
/// and commits: they arrive.
#[tokio::test]
async fn a_transaction_that_reads_before_writing_commits_late_and_its_row_arrives() {
    late_commit(
        SHOPS,
        "BEGIN; SELECT count(*) FROM merchant;",
        "INSERT INTO merchant (trade_name, country) VALUES ('Read first', 'gb'); COMMIT;",
        "Read first",
    )
    .await;
}

/// An integer cursor fed by a sequence: a slow transaction takes a value,
/// higher values commit and are delivered, then it commits: its row
/// arrives.
#[tokio::test]
async fn an_integer_cursor_with_an_out_of_order_commit_loses_nothing() {
    late_commit(
        &SHOPS.replace("cursor = \"modified_at\"", "cursor = \"version\""),
        "BEGIN; INSERT INTO merchant (trade_name, country) VALUES ('Low sequence value', 'gb');",
        "COMMIT",
        "Low sequence value",
    )
    .await;
}

/// Rows whose cursor is NULL sort last: with one as the last row of a page
/// the walk must not save a NULL position. Later inserts and updates still
/// arrive, and the NULL-cursor rows themselves are delivered.
#[tokio::test]
async fn a_null_cursor_on_the_last_row_of_a_page_does_not_stop_the_poll() {
    let (db, url) = seeded(5).await;
    db.exec(
        "INSERT INTO merchant (trade_name, country, modified_at) \
         SELECT 'No cursor ' || g, 'gb', NULL FROM generate_series(1, 3) g;",
    )
    .await;
    let m = mock().await;
    let wd = Workdir::new();
    let cfg = config(&wd, &url, &m.base_url(), SHOPS, 4);
    let d = Daemon::start(&cfg, &wd.path("daemon.log"));
    arrives(&m, "shops", "No cursor 3", &d).await;
    arrives(&m, "shops", "Shop 5", &d).await;

    db.exec(
        "INSERT INTO merchant (trade_name, country) VALUES ('Inserted after', 'gb');
         UPDATE merchant SET trade_name = 'Shop 2 renamed', modified_at = now() WHERE trade_name = 'Shop 2';",
    )
    .await;
    arrives(&m, "shops", "Inserted after", &d).await;
    arrives(&m, "shops", "Shop 2 renamed", &d).await;
    assert_eq!(m.records("shops").len(), 9);
}

/// One row that cannot be decoded (invalid UTF-8 in an `SQL_ASCII`
/// database) becomes one dead letter naming the problem; the other rows
/// and the other mappings keep flowing.
#[tokio::test]
async fn an_undecodable_row_is_one_dead_letter_and_the_rest_flows() {
    let base = Db::start().await;
    base.exec(
        "CREATE DATABASE legacy TEMPLATE template0 ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C';",
    )
    .await;
    let db = Db {
        pg: base.pg,
        name: "legacy".into(),
    };
    db.exec(MERCHANT).await;
    db.exec(
        "CREATE TABLE label_tag (id serial PRIMARY KEY, label text NOT NULL, \
           modified_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO merchant (trade_name, country) SELECT 'Shop ' || g, 'gb' FROM generate_series(1, 6) g;
         INSERT INTO merchant (trade_name, country) VALUES (E'Caf\\xe9 Latin-1', 'gb');
         INSERT INTO merchant (trade_name, country) SELECT 'Shop ' || g, 'gb' FROM generate_series(7, 9) g;
         INSERT INTO label_tag (label) SELECT 'Tag ' || g FROM generate_series(1, 4) g;",
    )
    .await;
    let url = db
        .least_privilege_url(false, &["public.merchant", "public.label_tag"])
        .await;
    let m = mock().await;
    let wd = Workdir::new();
    let body = format!(
        "{SHOPS}
[[mapping]]
type = \"tags\"
table = \"public.label_tag\"
cursor = \"modified_at\"
[mapping.fields]
tag_id = {{ column = \"id\", transform = \"uuid5\" }}
name = \"label\"
"
    );
    let cfg = config(&wd, &url, &m.base_url(), &body, 500);
    let mut d = Daemon::start(&cfg, &wd.path("daemon.log"));
    arrives(&m, "shops", "Shop 9", &d).await;
    arrives(&m, "tags", "Tag 4", &d).await;
    // Later changes flow too.
    db.exec(
        "INSERT INTO merchant (trade_name, country) VALUES ('Shop after', 'gb');
         INSERT INTO label_tag (label) VALUES ('Tag after');",
    )
    .await;
    arrives(&m, "shops", "Shop after", &d).await;
    arrives(&m, "tags", "Tag after", &d).await;
    assert_eq!(m.records("shops").len(), 10);
    assert!(d.term().await.success(), "{}", d.log_text());
    let (code, out, err) = run_cli(
        &["dlq", "list", "--json", "--config", cfg.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["type"], "shops");
    let reason = rows[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("could not be decoded") && reason.contains("UTF-8"),
        "{reason}"
    );
}

/// The cursor is changed from a timestamp to an integer column between
/// runs: the mapping starts over (saying why) and converges, and later
/// changes arrive.
#[tokio::test]
async fn a_cursor_changed_between_runs_starts_the_mapping_over() {
    let (db, url) = seeded(30).await;
    let m = mock().await;
    let wd = Workdir::new();
    let cfg = config(&wd, &url, &m.base_url(), SHOPS, 7);
    let log = wd.path("daemon.log");
    let mut d = Daemon::start(&cfg, &log);
    arrives(&m, "shops", "Shop 30", &d).await;
    assert!(d.term().await.success(), "{}", d.log_text());

    let body = SHOPS.replace("cursor = \"modified_at\"", "cursor = \"version\"");
    let cfg = config(&wd, &url, &m.base_url(), &body, 7);
    db.exec("UPDATE merchant SET trade_name = 'Shop 1 changed' WHERE trade_name = 'Shop 1';")
        .await;
    let d = Daemon::start(&cfg, &log);
    wait_until(Duration::from_secs(30), "the reset is logged", || async {
        !log_lines(&log, "does not match the configuration").is_empty()
    })
    .await;
    // The full re-read sees the update made while it was stopped.
    arrives(&m, "shops", "Shop 1 changed", &d).await;
    db.exec("INSERT INTO merchant (trade_name, country) VALUES ('After the change', 'gb');")
        .await;
    arrives(&m, "shops", "After the change", &d).await;
    assert_eq!(m.records("shops").len(), 31);
    assert!(
        log_lines(&log, "poll failed").is_empty(),
        "{}",
        d.log_text()
    );
}

/// While the API fails every request the sink fills and the tick would
/// wait forever with its snapshot open; it releases the transaction, and
/// once the API answers again everything arrives.
#[tokio::test]
async fn an_api_outage_does_not_hold_the_snapshot_open() {
    let (db, url) = seeded(3000).await;
    let m = mock_with(1.0, 0.0, 0.0, Duration::ZERO).await;
    let wd = Workdir::new();
    let cfg = config(&wd, &url, &m.base_url(), SHOPS, 500);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[batch]", "[batch]\nmax_records = 10")
        .replace("[api]", "[api]\nconcurrency = 1");
    std::fs::write(&cfg, text).unwrap();
    let log = wd.path("daemon.log");
    let d = Daemon::start(&cfg, &log);
    wait_until(
        Duration::from_secs(60),
        "the snapshot is released",
        || async { !log_lines(&log, "released the poll snapshot").is_empty() },
    )
    .await;
    // The daemon's session holds no transaction now.
    let admin = db.client().await;
    wait_until(
        Duration::from_secs(10),
        "no open transaction of cobi_sync",
        || async {
            let open: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = 'cobi_sync' \
                 AND xact_start IS NOT NULL",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            open == 0
        },
    )
    .await;
    assert!(!m.stats().requests_by_status.is_empty(), "{}", d.log_text());
    m.set_faults(0.0, 0.0, 0.0, Duration::ZERO);
    wait_until(
        Duration::from_secs(90),
        "all 3000 shops delivered",
        || async { m.records("shops").len() == 3000 },
    )
    .await;
}

/// `check` in poll mode: the guard can see open transactions, how many
/// rows have a NULL cursor, a cursor without a usable index (with the
/// `CREATE INDEX` to run) and then with one, and a `source.timezone`
/// that differs from the server's.
#[tokio::test]
async fn check_reports_null_cursors_a_missing_index_and_the_time_zone() {
    let (db, url) = seeded(20_000).await;
    db.exec(
        "UPDATE merchant SET modified_at = NULL WHERE trade_name IN ('Shop 1', 'Shop 2'); \
         ANALYZE merchant;",
    )
    .await;
    db.exec(&format!(
        "ALTER DATABASE \"{}\" SET TimeZone = 'Europe/Paris'",
        db.name
    ))
    .await;
    let m = mock().await;
    let wd = Workdir::new();
    let cfg = config(&wd, &url, &m.base_url(), SHOPS, 500);
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "mode = \"poll\"",
        "mode = \"poll\"\ntimezone = \"America/New_York\"",
    );
    std::fs::write(&cfg, text).unwrap();
    // The mock answers on this runtime: run the CLI off it.
    let check = || {
        let cfg = cfg.clone();
        async move {
            let (code, out, err) = tokio::task::spawn_blocking(move || {
                run_cli(&["check", "--config", cfg.to_str().unwrap()], &[])
            })
            .await
            .unwrap();
            assert_eq!(code, 0, "{out}\n{err}");
            out
        }
    };
    let out = check().await;
    for want in [
        "open transactions are visible",
        "2 row(s) have a NULL `modified_at`",
        "no index on (cursor, key)",
        "CREATE INDEX CONCURRENTLY ON \"public\".\"merchant\" (\"modified_at\", \"id\");",
        "the server's TimeZone is Europe/Paris",
    ] {
        assert!(out.contains(want), "missing `{want}` in:\n{out}");
    }
    db.exec("CREATE INDEX ON merchant (modified_at, id); ANALYZE merchant;")
        .await;
    let out = check().await;
    assert!(out.contains("a page uses an index"), "{out}");
}

/// `check` on an integer cursor: a sequence with `CACHE` above 1 hands
/// out values out of order across sessions; `check` says so with the fix.
#[tokio::test]
async fn check_warns_about_a_cached_sequence_behind_an_integer_cursor() {
    let (db, url) = seeded(10).await;
    db.exec("ALTER SEQUENCE merchant_version_seq CACHE 20;")
        .await;
    let m = mock().await;
    let wd = Workdir::new();
    let body = SHOPS.replace("cursor = \"modified_at\"", "cursor = \"version\"");
    let cfg = config(&wd, &url, &m.base_url(), &body, 500);
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        run_cli(&["check", "--config", cfg.to_str().unwrap()], &[])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("ALTER SEQUENCE merchant_version_seq CACHE 1;"),
        "{out}"
    );
    assert!(
        out.contains("ok      time zone"),
        "UTC and Etc/UTC are the same: {out}"
    );
}

/// A row the API rejects (its shop is not at Cobi) in a table without a
/// cursor is dead-lettered once, not re-sent by every later tick that reads
/// the whole table again; a change of the row sends it again. (Rows in a
/// cursor mapping's lookback window are sent again while the window lasts:
/// `ops::rejected_rows_are_dead_lettered_then_replayed_after_the_fix`.)
#[tokio::test]
async fn rereads_do_not_resend_rejected_rows_every_tick() {
    let db = Db::start().await;
    db.exec(MERCHANT).await;
    db.exec(
        "CREATE TABLE outlet (id serial PRIMARY KEY, merchant_id uuid NOT NULL, \
           label text NOT NULL, country text NOT NULL);
         INSERT INTO merchant (id, trade_name, country)
           VALUES ('00000000-0000-4000-8000-000000000001', 'Shop 1', 'gb');
         INSERT INTO outlet (merchant_id, label, country) VALUES
           ('00000000-0000-4000-8000-000000000001', 'Outlet good', 'gb'),
           ('00000000-0000-4000-8000-0000000000ff', 'Outlet orphan', 'gb');",
    )
    .await;
    let url = db
        .least_privilege_url(false, &["public.merchant", "public.outlet"])
        .await;
    let m = mock().await;
    let wd = Workdir::new();
    let body = format!(
        "{SHOPS}
[[mapping]]
type = \"branches\"
table = \"public.outlet\"
[mapping.fields]
branch_id = {{ column = \"id\", transform = \"uuid5\" }}
shop_id = \"merchant_id\"
name = \"label\"
region = {{ column = \"country\", transform = \"upper\" }}

"
    );
    let cfg = config(&wd, &url, &m.base_url(), &body, 500);
    // `dlq list` asks the running daemon over its endpoint.
    let (mut d, _) = Daemon::start_with_http(&cfg, &wd.path("daemon.log"), "info").await;
    arrives(&m, "branches", "Outlet good", &d).await;
    wait_until(Duration::from_secs(30), "the orphan's dead letter", || {
        let n = crate::common::dead_letters(&cfg).len();
        async move { n == 1 }
    })
    .await;
    let rejected = || {
        m.stats()
            .records_rejected
            .get("branches")
            .copied()
            .unwrap_or(0)
    };
    let before = rejected();
    assert!(before >= 1, "the orphan was sent and rejected: {before}");
    // Two later ticks, each seen by a new row arriving: each read the
    // whole table again, the orphan included.
    for name in ["Outlet later 1", "Outlet later 2"] {
        db.exec(&format!(
            "INSERT INTO outlet (merchant_id, label, country) \
             VALUES ('00000000-0000-4000-8000-000000000001', '{name}', 'gb');"
        ))
        .await;
        arrives(&m, "branches", name, &d).await;
    }
    assert_eq!(
        rejected(),
        before,
        "an unchanged rejected row was sent again by a re-read\n{}",
        d.log_text()
    );
    let letters = crate::common::dead_letters(&cfg);
    assert_eq!(letters.len(), 1, "{letters:?}");
    for l in &letters {
        assert_eq!(l["attempts"], 1, "{l}");
    }
    // A change of the row still sends it again (and, its shop still
    // missing, it is rejected again).
    db.exec("UPDATE outlet SET label = 'Outlet orphan v2' WHERE label = 'Outlet orphan';")
        .await;
    wait_until(
        Duration::from_secs(30),
        "the changed orphan re-sent",
        || {
            let n = rejected();
            async move { n > before }
        },
    )
    .await;
    assert!(d.term().await.success(), "{}", d.log_text());
}
