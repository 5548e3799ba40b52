//! Replication mode at the edges (issue 12): re-copies and the deletes
//! they must not lose (`snapshot --force` in both modes, `resync`, a crash
//! between delivery and checkpoint), TRUNCATE, partitions, schema changes,
//! lost slots, values the stream leaves out, synchronous standbys.
//!
//! Real PostgreSQL, the real mock API over HTTP, the real binary, and the
//! README's least-privilege role wherever the scenario allows it. Expected
//! Cobi ids are computed here with the DESIGN formula
//! (`UUIDv5(namespace, "<type>:<id>")`), never with the product's mapping.

use std::time::{Duration, Instant};

use cobi_sync::mock_api::MockServer;
use serde_json::Value as Json;

use crate::common::{
    free_port, mock, mock_with, run_cli, wait_until, with_http, Daemon, Db, Workdir,
};
use crate::partner::{self, wait_in_sync};

/// The partner tables (the publication and the role's grants).
const TABLES: &[&str] = &[
    "campus",
    "programme",
    "genre",
    "label_tag",
    "search_term",
    "merchant",
    "member",
    "outlet",
    "promo",
    "merchant_genre",
    "merchant_tag",
    "merchant_term",
    "favourite",
    "purchase",
    "event_log",
];

/// The default `ids.namespace`.
const NAMESPACE: &str = "9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d";

/// The Cobi id of integer source id `id` of `ty` (DESIGN §3, `uuid5`).
fn cobi_id(ty: &str, id: i64) -> String {
    let ns = uuid::Uuid::parse_str(NAMESPACE).unwrap();
    uuid::Uuid::new_v5(&ns, format!("{ty}:{id}").as_bytes()).to_string()
}

/// The least-privilege role (REPLICATION, SELECT on the partner tables)
/// and the publication its owner created. Returns the role's URL.
async fn least_privilege(db: &Db) -> String {
    let url = db.least_privilege_url(true, TABLES).await;
    db.publication("cobi_test", TABLES).await;
    url
}

/// The records of `ty` at the mock, by `id_field`.
fn by_id(mock: &MockServer, ty: &str, id_field: &str) -> std::collections::HashMap<String, Json> {
    mock.records(ty)
        .into_iter()
        .filter_map(|r| Some((r.get(id_field)?.as_str()?.to_string(), r)))
        .collect()
}

/// Source ids of `ids` whose record at the mock is not soft-deleted.
fn not_deleted(mock: &MockServer, ty: &str, id_field: &str, ids: &[i64]) -> Vec<i64> {
    let held = by_id(mock, ty, id_field);
    ids.iter()
        .copied()
        .filter(|&id| {
            held.get(&cobi_id(ty, id)).and_then(|r| r.get("is_deleted")) != Some(&Json::Bool(true))
        })
        .collect()
}

async fn wait_deleted(
    mock: &MockServer,
    ty: &str,
    id_field: &str,
    ids: &[i64],
    d: &Daemon,
    secs: u64,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left = not_deleted(mock, ty, id_field, ids);
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{} of {} deleted rows are still live at the mock: {:?}\n{}",
                left.len(),
                ids.len(),
                &left[..left.len().min(10)],
                partner::tail(&d.log_text(), 60)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn accepted(mock: &MockServer) -> u64 {
    mock.stats().records_accepted.values().sum()
}

/// Inserts `text` after `after` in the config.
fn edit(cfg: &std::path::Path, after: &str, text: &str) {
    let body = std::fs::read_to_string(cfg).unwrap();
    assert!(body.contains(after), "config has no `{after}`");
    std::fs::write(cfg, body.replacen(after, &format!("{after}\n{text}"), 1)).unwrap();
}

/// Waits for the daemon to exit; its exit code.
fn wait_exit(d: &mut Daemon, secs: u64) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Some(s) = d.child.try_wait().unwrap() {
            return s.code();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// `GET /status` of the daemon on `port`.
async fn status(port: u16) -> Json {
    reqwest::get(format!("http://127.0.0.1:{port}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Drops the slot under a running daemon, in one transaction with `sql`
/// (so the slot that replaces it never sees that change): terminates the
/// walsender holding it and retries until the drop wins the race with the
/// daemon's reconnect.
async fn drop_slot_with(db: &Db, sql: &str) {
    let client = db.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = client
            .batch_execute(&format!(
                "BEGIN;
                 {sql}
                 SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                   WHERE slot_name = 'cobi_test' AND active_pid IS NOT NULL;
                 SELECT pg_sleep(0.05);
                 SELECT pg_drop_replication_slot('cobi_test');
                 COMMIT;"
            ))
            .await;
        match r {
            Ok(()) => return,
            Err(_) => {
                let _ = client.batch_execute("ROLLBACK").await;
                assert!(Instant::now() < deadline, "could not drop the slot");
            }
        }
    }
}

// ---------------------------------------------------------------------
// Deletes during re-copies (items 1 and 9)
// ---------------------------------------------------------------------

/// The issue's reproduction: rows deleted while the daemon is stopped,
/// then `snapshot --force --type` of their type, must be soft-deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_force_soft_deletes_rows_deleted_while_stopped() {
    let db = partner::start_db(60).await;
    let url = least_privilege(&db).await;
    let wd = Workdir::new();
    let mock = mock().await;
    let cfg = wd.config(&url, &mock.base_url(), "replication", partner::MAPPINGS);
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let mut d = Daemon::start(&cfg, &wd.path("d1.log"));
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(90), &d.log).await;
    assert!(d.term().await.success(), "{}", d.log_text());

    client
        .batch_execute("DELETE FROM merchant_tag WHERE id BETWEEN 11 AND 30")
        .await
        .unwrap();
    let c = cfg.to_str().unwrap();
    let (code, out, err) = run_cli(
        &["snapshot", "--force", "--type", "shop-tags", "--config", c],
        &[],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let deleted: Vec<i64> = (11..=30).collect();
    assert_eq!(
        not_deleted(&mock, "shop-tags", "shop_tag_id", &deleted),
        Vec::<i64>::new(),
        "rows deleted while the daemon was stopped stay live after snapshot --force\n{err}"
    );
    // The daemon streams on from there.
    let d = Daemon::start(&cfg, &wd.path("d2.log"));
    client
        .batch_execute("INSERT INTO merchant_tag (merchant_id, tag_id) VALUES (1, 1)")
        .await
        .unwrap();
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(60), &d.log).await;
}

/// `resync` re-copies a synced table while the daemon streams; rows deleted
/// during the re-copy (ahead of it or inside its window) are soft-deleted,
/// and `status` shows the copy's progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_soft_deletes_rows_deleted_while_it_copies() {
    let db = partner::start_db(50).await;
    db.exec(
        "INSERT INTO merchant_tag (merchant_id, tag_id)
         SELECT 1 + g % 50, 1 + g % 12 FROM generate_series(1, 30000) g;
         ANALYZE merchant_tag;",
    )
    .await;
    let url = least_privilege(&db).await;
    let wd = Workdir::new();
    // Slow enough that the re-copy takes a while.
    let mock = mock_with(0.0, 0.0, 0.0, Duration::from_millis(150)).await;
    let cfg = wd.config(&url, &mock.base_url(), "replication", partner::MAPPINGS);
    edit(&cfg, "[batch]", "max_records = 500");
    edit(&cfg, "[api]", "concurrency = 1");
    let port = free_port();
    with_http(&cfg, port, "info");
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(180), &d.log).await;

    let c = cfg.to_str().unwrap();
    let (code, out, err) = run_cli(&["resync", "--type", "shop-tags", "--config", c], &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("shop-tags"), "{out}");
    // Deleted while the re-copy runs: far ahead of it, and near its start.
    client
        .batch_execute(
            "DELETE FROM merchant_tag WHERE id BETWEEN 29001 AND 29100 OR id BETWEEN 101 AND 110",
        )
        .await
        .unwrap();
    let copy = status(port).await["source"]["snapshot_progress"].clone();
    let (label, p) = copy
        .as_object()
        .and_then(|m| m.iter().find(|(k, _)| k.contains("shop-tags")))
        .unwrap_or_else(|| panic!("no copy progress for shop-tags in /status: {copy}"));
    assert!(
        p["done"] == false && p["rows"].as_u64().unwrap() < 29_000,
        "precondition: the re-copy of {label} must still be running when the rows are deleted: {p}"
    );
    assert!(p["estimate"].as_u64().is_some_and(|e| e > 25_000), "{p}");
    let (_, text, _) = run_cli(&["status", "--config", c], &[]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("snapshot mapping[10] (shop-tags): ")
                && l.contains(" of ~")
                && l.contains(" rows")),
        "{text}"
    );

    let deleted: Vec<i64> = (29001..=29100).chain(101..=110).collect();
    wait_deleted(&mock, "shop-tags", "shop_tag_id", &deleted, &d, 120).await;
    wait_until(Duration::from_secs(120), "the re-copy finishes", || async {
        status(port).await["source"]["snapshot_progress"][label]["done"] == true
    })
    .await;
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(60), &d.log).await;
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("cobi_sync_snapshot_rows{mapping=\"mapping[10] (shop-tags)\"}"),
        "{metrics}"
    );
}

/// A crash after a chunk was delivered but before its position was
/// checkpointed leaves accepted keys ahead of the durable position; a
/// delete of one of them must still be sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_after_a_crash_between_chunk_delivery_and_checkpoint_is_sent() {
    use cobi_sync::state::{
        replication_checkpoint, Checkpoint, CursorValue, Position, SledStore, StateStore,
        TableSnapshot, Write,
    };
    let db = partner::start_db(300).await;
    let url = least_privilege(&db).await;
    let wd = Workdir::new();
    let mock = mock().await;
    let cfg = wd.config(&url, &mock.base_url(), "replication", partner::MAPPINGS);
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let mut d = Daemon::start(&cfg, &wd.path("d1.log"));
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(90), &d.log).await;
    assert!(d.term().await.success());

    // The state such a crash leaves: every shop-tag accepted, the table's
    // copy durable only up to id 100.
    {
        let store = SledStore::open(&wd.path("state")).unwrap();
        let mut cp = replication_checkpoint(&store).unwrap().unwrap();
        let id = settings
            .mappings
            .iter()
            .find(|m| Some(m.ty) == cobi_sync::sink::type_id("shop-tags"))
            .unwrap()
            .id
            .to_string();
        cp.tables.insert(
            id,
            TableSnapshot::InProgress(Position {
                cursor: None,
                key: vec![CursorValue {
                    oid: 23,
                    text: Some("100".into()),
                }],
            }),
        );
        store.remove_checkpoint("replication").unwrap();
        store
            .apply(&[Write::Checkpoint(Checkpoint::Replication(cp))])
            .unwrap();
        store.flush().unwrap();
    }
    client
        .batch_execute("DELETE FROM merchant_tag WHERE id BETWEEN 150 AND 169")
        .await
        .unwrap();
    let d = Daemon::start(&cfg, &wd.path("d2.log"));
    wait_deleted(
        &mock,
        "shop-tags",
        "shop_tag_id",
        &(150..=169).collect::<Vec<_>>(),
        &d,
        60,
    )
    .await;
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(60), &d.log).await;
}

/// Poll mode: rows hard-deleted at the source are soft-deleted by
/// `snapshot --force` (the re-read no longer finds them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_snapshot_force_soft_deletes_hard_deleted_rows() {
    let db = partner::start_db(40).await;
    let url = db.least_privilege_url(false, TABLES).await;
    let wd = Workdir::new();
    let mock = mock().await;
    let cfg = wd.config(&url, &mock.base_url(), "poll", partner::MAPPINGS);
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let mut d = Daemon::start(&cfg, &wd.path("d1.log"));
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(90), &d.log).await;
    assert!(d.term().await.success());

    client
        .batch_execute("DELETE FROM merchant_tag WHERE id BETWEEN 5 AND 14")
        .await
        .unwrap();
    let c = cfg.to_str().unwrap();
    let before = accepted(&mock);
    let (code, out, err) = run_cli(
        &["snapshot", "--force", "--type", "shop-tags", "--config", c],
        &[],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let deleted: Vec<i64> = (5..=14).collect();
    assert_eq!(
        not_deleted(&mock, "shop-tags", "shop_tag_id", &deleted),
        Vec::<i64>::new(),
        "{err}"
    );
    // --force re-sends every record of the types, unchanged ones too.
    assert!(accepted(&mock) - before >= 40, "{err}");
    partner::assert_in_sync(&settings, &client, &mock).await;
}

// ---------------------------------------------------------------------
// TRUNCATE (item 3)
// ---------------------------------------------------------------------

fn truncate_config(wd: &Workdir, url: &str, mock: &MockServer) -> std::path::PathBuf {
    let cfg = wd.config(url, &mock.base_url(), "replication", partner::MAPPINGS);
    edit(
        &cfg,
        "table = \"public.merchant_tag\"",
        "on_truncate = \"soft_delete\"",
    );
    cfg
}

/// Waits until the tag named `label` is at the mock: everything the stream
/// carried before it has been delivered.
async fn wait_marker(mock: &MockServer, label: &str, d: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !mock.records("tags").iter().any(|r| r["name"] == label) {
        assert!(
            Instant::now() < deadline,
            "marker {label} never arrived\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn live_shop_tags(mock: &MockServer) -> Vec<Json> {
    mock.records("shop-tags")
        .into_iter()
        .filter(|r| r.get("is_deleted") != Some(&Json::Bool(true)))
        .collect()
}

/// INSERT then TRUNCATE within 100 ms: every key is soft-deleted, also the
/// ones still in flight when the TRUNCATE arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_then_truncate_soft_deletes_every_key() {
    let db = partner::start_db(30).await;
    let url = least_privilege(&db).await;
    let wd = Workdir::new();
    let mock = mock().await;
    let cfg = truncate_config(&wd, &url, &mock);
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(90), &d.log).await;

    client
        .batch_execute(
            "INSERT INTO merchant_tag (merchant_id, tag_id) SELECT 1 + g % 30, 1 + g % 7 FROM generate_series(1, 50) g",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.batch_execute("TRUNCATE merchant_tag").await.unwrap();
    client
        .batch_execute("INSERT INTO label_tag (label) VALUES ('after the truncate')")
        .await
        .unwrap();
    wait_marker(&mock, "after the truncate", &d).await;
    wait_until(
        Duration::from_secs(30),
        "every shop-tag soft-deleted",
        || {
            let n = live_shop_tags(&mock).len();
            async move { n == 0 }
        },
    )
    .await;
    // None comes back.
    client
        .batch_execute("INSERT INTO label_tag (label) VALUES ('later still')")
        .await
        .unwrap();
    wait_marker(&mock, "later still", &d).await;
    assert_eq!(live_shop_tags(&mock), Vec::<Json>::new());
    assert!(mock.records("shop-tags").len() >= 30);
}

/// A TRUNCATE while the table is being copied: chunks read before it bring
/// nothing back to life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_during_the_copy_revives_nothing() {
    let db = partner::start_db(40).await;
    db.exec(
        "INSERT INTO merchant_tag (merchant_id, tag_id)
         SELECT 1 + g % 40, 1 + g % 10 FROM generate_series(1, 30000) g",
    )
    .await;
    let url = least_privilege(&db).await;
    let wd = Workdir::new();
    let mock = mock_with(0.0, 0.0, 0.0, Duration::from_millis(200)).await;
    let cfg = truncate_config(&wd, &url, &mock);
    edit(&cfg, "[batch]", "max_records = 1000");
    edit(&cfg, "[api]", "concurrency = 1");
    let client = db.client().await;
    let d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_until(
        Duration::from_secs(120),
        "the copy of shop-tags under way",
        || {
            let n = mock.records("shop-tags").len();
            async move { n > 500 }
        },
    )
    .await;
    assert!(
        mock.records("shop-tags").len() < 20_000,
        "precondition: the copy must still be running at the TRUNCATE"
    );
    client.batch_execute("TRUNCATE merchant_tag").await.unwrap();
    client
        .batch_execute("INSERT INTO merchant_tag (merchant_id, tag_id) VALUES (1, 1)")
        .await
        .unwrap();
    client
        .batch_execute("INSERT INTO label_tag (label) VALUES ('after the truncate')")
        .await
        .unwrap();
    wait_marker(&mock, "after the truncate", &d).await;
    let settings = cobi_sync::config::load(&cfg).unwrap();
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(120), &d.log).await;
    // Exactly the row inserted after the TRUNCATE is live.
    assert_eq!(
        live_shop_tags(&mock).len(),
        1,
        "{}",
        partner::tail(&d.log_text(), 40)
    );
}

// ---------------------------------------------------------------------
// Partitions (item 2)
// ---------------------------------------------------------------------

const PARTITIONED: &str = "
CREATE TABLE pshop (id int NOT NULL, name text NOT NULL, country text NOT NULL, PRIMARY KEY (id))
  PARTITION BY RANGE (id);
CREATE TABLE pshop_1 PARTITION OF pshop FOR VALUES FROM (1) TO (1000);
CREATE TABLE pshop_2 PARTITION OF pshop FOR VALUES FROM (1000) TO (2000);
INSERT INTO pshop SELECT g, 'Shop ' || g, 'gb' FROM generate_series(1, 20) g;
INSERT INTO pshop SELECT g, 'Shop ' || g, 'ca' FROM generate_series(1000, 1019) g;
";

const PARTITIONED_MAPPING: &str = r#"
[[mapping]]
type = "shops"
table = "public.pshop"
on_truncate = "soft_delete"
[mapping.fields]
shop_id = { column = "id", transform = "uuid5" }
name = "name"
region = { column = "country", transform = "upper" }
"#;

/// Whether the mock holds exactly `pshop` (computed in SQL): every row with
/// its name and upper-cased country, every other shop soft-deleted.
async fn pshop_in_sync(client: &tokio_postgres::Client, mock: &MockServer) -> Result<(), String> {
    let rows = client
        .query("SELECT id, name, upper(country) FROM pshop", &[])
        .await
        .unwrap();
    let held = by_id(mock, "shops", "shop_id");
    let mut want = std::collections::HashSet::new();
    for r in &rows {
        let (id, name, region): (i32, String, String) = (r.get(0), r.get(1), r.get(2));
        let key = cobi_id("shops", id.into());
        match held.get(&key) {
            Some(rec)
                if rec["name"] == name.as_str()
                    && rec["region"] == region.as_str()
                    && rec.get("is_deleted") != Some(&Json::Bool(true)) => {}
            other => {
                return Err(format!(
                    "pshop {id}: want {name}/{region}, mock has {other:?}"
                ))
            }
        }
        want.insert(key);
    }
    for (k, rec) in &held {
        if !want.contains(k) && rec.get("is_deleted") != Some(&Json::Bool(true)) {
            return Err(format!("shop {k} is live at the mock but not in pshop"));
        }
    }
    Ok(())
}

async fn wait_pshop(client: &tokio_postgres::Client, mock: &MockServer, d: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match pshop_in_sync(client, mock).await {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => {
                panic!("{e}\n{}", partner::tail(&d.log_text(), 40))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn partitions_stream(all_tables: bool) {
    let db = Db::start().await;
    db.exec(PARTITIONED).await;
    let url = db.least_privilege_url(true, &["pshop"]).await;
    if all_tables {
        // As a DBA might have it: every table, published under its own name.
        db.exec("CREATE PUBLICATION cobi_test FOR ALL TABLES").await;
    } else {
        db.publication("cobi_test", &["pshop"]).await;
    }
    let wd = Workdir::new();
    let mock = mock().await;
    let cfg = wd.config(&url, &mock.base_url(), "replication", PARTITIONED_MAPPING);
    let client = db.client().await;
    let d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_pshop(&client, &mock, &d).await;
    // Changes in every partition.
    client
        .batch_execute(
            "INSERT INTO pshop VALUES (21, 'New 21', 'us'), (1020, 'New 1020', 'us');
             UPDATE pshop SET name = 'Renamed' WHERE id IN (3, 1003);
             DELETE FROM pshop WHERE id IN (4, 1004);",
        )
        .await
        .unwrap();
    wait_pshop(&client, &mock, &d).await;
    // A partition attached while streaming.
    client
        .batch_execute(
            "CREATE TABLE pshop_3 (id int NOT NULL, name text NOT NULL, country text NOT NULL);
             ALTER TABLE pshop ATTACH PARTITION pshop_3 FOR VALUES FROM (2000) TO (3000);
             INSERT INTO pshop SELECT g, 'Shop ' || g, 'fr' FROM generate_series(2000, 2009) g;
             UPDATE pshop SET country = 'de' WHERE id = 2001;
             DELETE FROM pshop WHERE id = 2002;",
        )
        .await
        .unwrap();
    wait_pshop(&client, &mock, &d).await;
    assert!(by_id(&mock, "shops", "shop_id").contains_key(&cobi_id("shops", 2009)));
    if all_tables {
        // One partition truncated (published under its own name only when
        // not through the root): its rows, and only those, soft-deleted.
        client.batch_execute("TRUNCATE pshop_2").await.unwrap();
        wait_pshop(&client, &mock, &d).await;
        assert!(
            by_id(&mock, "shops", "shop_id")[&cobi_id("shops", 1)].get("is_deleted")
                != Some(&Json::Bool(true))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_stream_under_a_for_table_publication() {
    partitions_stream(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_stream_under_a_for_all_tables_publication() {
    partitions_stream(true).await;
}

// ---------------------------------------------------------------------
// Schema changes (item 5)
// ---------------------------------------------------------------------

/// ADD/DROP of an unmapped column and int4 → int8 of a mapped key while the
/// table is being copied: the copy goes on; then a mapped column dropped
/// while streaming turns that table's changes into dead letters while the
/// rest flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_while_copying_and_streaming_never_stalls() {
    let db = partner::start_db(40).await;
    db.exec(
        "INSERT INTO merchant_tag (merchant_id, tag_id)
         SELECT 1 + g % 40, 1 + g % 10 FROM generate_series(1, 30000) g",
    )
    .await;
    let url = least_privilege(&db).await;
    let wd = Workdir::new();
    let mock = mock_with(0.0, 0.0, 0.0, Duration::from_millis(100)).await;
    let cfg = wd.config(&url, &mock.base_url(), "replication", partner::MAPPINGS);
    edit(&cfg, "[batch]", "max_records = 1000");
    edit(&cfg, "[api]", "concurrency = 1");
    let port = free_port();
    with_http(&cfg, port, "info");
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let mut d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_until(
        Duration::from_secs(120),
        "the copy of shop-tags under way",
        || {
            let n = mock.records("shop-tags").len();
            async move { n > 500 }
        },
    )
    .await;
    assert!(
        mock.records("shop-tags").len() < 20_000,
        "precondition: the copy must still be running at the DDL"
    );
    client
        .batch_execute(
            "ALTER TABLE merchant_tag ADD COLUMN note text;
             ALTER TABLE merchant_tag ALTER COLUMN id TYPE bigint;
             ALTER TABLE merchant_tag DROP COLUMN note;",
        )
        .await
        .unwrap();
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(120), &d.log).await;
    assert!(d.is_running(), "{}", d.log_text());

    // Streaming: the same DDL, a mapped reference column int4 → int8, then
    // a mapped column dropped.
    client
        .batch_execute(
            "ALTER TABLE merchant_tag ADD COLUMN note text;
             INSERT INTO merchant_tag (merchant_id, tag_id, note) VALUES (1, 1, 'x');
             ALTER TABLE merchant_tag DROP COLUMN note;
             INSERT INTO merchant_tag (merchant_id, tag_id) VALUES (2, 2);
             ALTER TABLE merchant_tag ALTER COLUMN merchant_id TYPE bigint;
             INSERT INTO merchant_tag (merchant_id, tag_id) VALUES (4, 4);
             UPDATE merchant_tag SET tag_id = 5 WHERE id = 10;",
        )
        .await
        .unwrap();
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(60), &d.log).await;
    client
        .batch_execute(
            "ALTER TABLE merchant_tag DROP COLUMN tag_id;
             INSERT INTO merchant_tag (merchant_id) VALUES (3);
             INSERT INTO label_tag (label) VALUES ('after the drop');",
        )
        .await
        .unwrap();
    wait_marker(&mock, "after the drop", &d).await;
    wait_until(
        Duration::from_secs(30),
        "a dead letter for the row without tag_id",
        || async { status(port).await["types"]["shop-tags"]["dead_letters"].as_u64() == Some(1) },
    )
    .await;
    assert!(d.is_running(), "{}", d.log_text());
    assert!(d.log_text().contains("tag_id"), "{}", d.log_text());
    assert!(d.term().await.success());
}

/// A mapped column dropped while its table is being copied: exit 1 within
/// 30 s naming the column, never a silent retry loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_mapped_column_during_the_copy_exits_with_the_fix() {
    let db = partner::start_db(40).await;
    db.exec(
        "INSERT INTO merchant_tag (merchant_id, tag_id)
         SELECT 1 + g % 40, 1 + g % 10 FROM generate_series(1, 30000) g",
    )
    .await;
    let url = least_privilege(&db).await;
    let wd = Workdir::new();
    let mock = mock_with(0.0, 0.0, 0.0, Duration::from_millis(100)).await;
    let cfg = wd.config(&url, &mock.base_url(), "replication", partner::MAPPINGS);
    edit(&cfg, "[batch]", "max_records = 1000");
    edit(&cfg, "[api]", "concurrency = 1");
    let client = db.client().await;
    let mut d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_until(
        Duration::from_secs(120),
        "the copy of shop-tags under way",
        || {
            let n = mock.records("shop-tags").len();
            async move { n > 500 }
        },
    )
    .await;
    assert!(mock.records("shop-tags").len() < 20_000, "precondition");
    client
        .batch_execute("ALTER TABLE merchant_tag DROP COLUMN tag_id")
        .await
        .unwrap();
    let code = wait_exit(&mut d, 30);
    let log = d.log_text();
    assert_eq!(
        code,
        Some(1),
        "the daemon must exit 1 within 30 s\n{}",
        partner::tail(&log, 40)
    );
    assert!(
        log.contains("tag_id") && log.contains("mapping[10] (shop-tags)"),
        "{log}"
    );
}

/// Text the database cannot send as UTF-8 (latin-1 bytes in an SQL_ASCII
/// database): the row fails alone — one dead letter naming the problem,
/// its children wait behind it as the sink decides — while the other rows
/// are copied and later changes stream (never a silent retry loop, never a
/// whole read failed by one value).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_the_database_cannot_send_fails_its_row_only() {
    let mut db = Db::start().await;
    db.exec(
        "CREATE DATABASE legacy ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
    )
    .await;
    db.name = "legacy".into();
    db.exec(partner::SCHEMA).await;
    db.exec(&partner::seed_sql(30)).await;
    db.exec("UPDATE merchant SET trade_name = E'Caf\\xe9' WHERE id = 7")
        .await;
    let url = least_privilege(&db).await;
    let wd = Workdir::new();
    let mock = mock().await;
    let cfg = wd.config(&url, &mock.base_url(), "replication", partner::MAPPINGS);
    let mut d = Daemon::start(&cfg, &wd.path("daemon.log"));
    let names = |m: &MockServer| -> Vec<String> {
        m.records("shops")
            .iter()
            .filter_map(|r| r["name"].as_str().map(str::to_string))
            .collect()
    };
    wait_until(
        Duration::from_secs(60),
        "the other 29 shops are copied",
        || {
            let n = names(&mock).len();
            async move { n == 29 }
        },
    )
    .await;
    assert!(d.is_running(), "{}", partner::tail(&d.log_text(), 20));
    // Changes stream after the bad row.
    db.exec("INSERT INTO merchant (trade_name, country) VALUES ('After the bad row', 'gb')")
        .await;
    wait_until(Duration::from_secs(60), "a later insert streams", || {
        let found = names(&mock).iter().any(|n| n == "After the bad row");
        async move { found }
    })
    .await;
    assert!(d.term().await.success(), "{}", d.log_text());
    let (code, out, err) = run_cli(
        &[
            "dlq",
            "list",
            "--json",
            "--type",
            "shops",
            "--config",
            cfg.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Json> = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let reason = rows[0]["reason"].as_str().unwrap();
    assert!(reason.contains("UTF-8"), "{reason}");
}

// ---------------------------------------------------------------------
// Lost slots (item 7)
// ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_under_a_running_daemon_fails_with_the_fix() {
    let db = partner::start_db(20).await;
    let url = least_privilege(&db).await;
    let wd = Workdir::new();
    let mock = mock().await;
    let cfg = wd.config(&url, &mock.base_url(), "replication", partner::MAPPINGS);
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let mut d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(90), &d.log).await;
    drop_slot_with(&db, "").await;
    let code = wait_exit(&mut d, 30);
    let log = d.log_text();
    assert_eq!(code, Some(1), "{}", partner::tail(&log, 30));
    assert!(
        log.contains("cobi-sync snapshot") && log.contains("on_slot_lost"),
        "the message must say how to recover\n{log}"
    );
}

/// `on_slot_lost = "resnapshot"`: the daemon re-creates the slot, finds the
/// rows deleted while it was gone, and re-sends nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_under_a_running_daemon_is_recovered_by_resnapshot() {
    let db = partner::start_db(40).await;
    let url = least_privilege(&db).await;
    let wd = Workdir::new();
    let mock = mock().await;
    let cfg = wd.config(&url, &mock.base_url(), "replication", partner::MAPPINGS);
    edit(
        &cfg,
        "publication = \"cobi_test\"",
        "on_slot_lost = \"resnapshot\"",
    );
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(90), &d.log).await;
    let before = accepted(&mock);
    // Deleted in the transaction that drops the slot: no slot ever
    // streams these deletes.
    drop_slot_with(&db, "DELETE FROM merchant_tag WHERE id BETWEEN 3 AND 7;").await;
    wait_deleted(&mock, "shop-tags", "shop_tag_id", &[3, 4, 5, 6, 7], &d, 60).await;
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(60), &d.log).await;
    // The re-copy finished (a row inserted now streams in) …
    client
        .batch_execute("INSERT INTO label_tag (label) VALUES ('after recovery')")
        .await
        .unwrap();
    wait_marker(&mock, "after recovery", &d).await;
    // … and sent the five soft deletes and the new tag, nothing else.
    assert_eq!(
        accepted(&mock) - before,
        6,
        "{}",
        partner::tail(&d.log_text(), 40)
    );
    assert!(d.log_text().contains("re-creating it"), "{}", d.log_text());
}

/// A state directory restored from a backup is behind the slot: the changes
/// in between were confirmed but never delivered. Detected, not skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_dir_behind_the_slot_is_detected() {
    let db = partner::start_db(20).await;
    let url = least_privilege(&db).await;
    let wd = Workdir::new();
    let mock = mock().await;
    let cfg = wd.config(&url, &mock.base_url(), "replication", partner::MAPPINGS);
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let mut d = Daemon::start(&cfg, &wd.path("d1.log"));
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(90), &d.log).await;
    assert!(d.term().await.success());
    let backup = wd.path("state-backup");
    let status = std::process::Command::new("cp")
        .args([
            "-a",
            wd.path("state").to_str().unwrap(),
            backup.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let mut d = Daemon::start(&cfg, &wd.path("d2.log"));
    client
        .batch_execute(
            "INSERT INTO merchant (trade_name, country) VALUES ('After the backup', 'gb')",
        )
        .await
        .unwrap();
    let after: String = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(60), &d.log).await;
    // The slot confirms past the backup's position.
    wait_until(Duration::from_secs(30), "the slot confirmed the insert", || async {
        client
            .query_one(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'cobi_test'",
                &[&after],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    assert!(d.term().await.success());
    std::fs::remove_dir_all(wd.path("state")).unwrap();
    std::fs::rename(&backup, wd.path("state")).unwrap();
    let mut d = Daemon::start(&cfg, &wd.path("d3.log"));
    let code = wait_exit(&mut d, 30);
    let log = d.log_text();
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("older than the slot"), "{log}");
}

// ---------------------------------------------------------------------
// Values the stream leaves out (item 4), synchronous standbys (item 8)
// ---------------------------------------------------------------------

/// An update that leaves a large (TOASTed) value unchanged, whose row has
/// since moved to a new parent: the re-read row is never sent before that
/// parent (one record per request, so nothing hides the order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reread_row_is_never_sent_before_its_new_parent() {
    let db = partner::start_db(8).await;
    db.exec(
        "UPDATE outlet SET label = (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 2000) g) WHERE id = 1",
    )
    .await;
    let url = least_privilege(&db).await;
    let wd = Workdir::new();
    let mock = mock().await;
    let cfg = wd.config(&url, &mock.base_url(), "replication", partner::MAPPINGS);
    edit(&cfg, "[batch]", "max_records = 1");
    edit(&cfg, "[api]", "concurrency = 1");
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let mut d = Daemon::start(&cfg, &wd.path("d1.log"));
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(120), &d.log).await;
    assert!(d.term().await.success());
    // While the daemon is stopped: a small update (the label stays out of
    // the stream), then the row moves to a parent created after it.
    // Two transactions (one query string with a BEGIN would make them one).
    client
        .batch_execute("UPDATE outlet SET country = 'us' WHERE id = 1")
        .await
        .unwrap();
    client
        .batch_execute(
            "BEGIN;
             INSERT INTO merchant (trade_name, country) VALUES ('New parent', 'gb');
             UPDATE outlet SET merchant_id = currval('merchant_id_seq') WHERE id = 1;
             COMMIT;",
        )
        .await
        .unwrap();
    let d = Daemon::start(&cfg, &wd.path("d2.log"));
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(60), &d.log).await;
    assert_eq!(mock.stats().reference_failures, 0, "{}", d.log_text());
    let branch = by_id(&mock, "branches", "branch_id")[&cobi_id("branches", 1)].clone();
    assert_eq!(branch["name"].as_str().unwrap().len(), 64_000);
}

/// `synchronous_standby_names = '*'` makes cobi-sync's connection a
/// synchronous standby: commits wait for its confirmation. The snapshot
/// must keep confirming while it waits for those commits to become
/// visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_standby_setting_does_not_deadlock_the_snapshot() {
    let db = partner::start_db(20).await;
    db.exec(
        "INSERT INTO merchant (trade_name, country) SELECT 'S' || g, 'gb' FROM generate_series(1, 25000) g;",
    )
    .await;
    let url = least_privilege(&db).await;
    // From here on every commit waits for a synchronous standby.
    db.exec("ALTER SYSTEM SET synchronous_standby_names = '*'")
        .await;
    db.exec("SELECT pg_reload_conf()").await;
    let wd = Workdir::new();
    let mock = mock().await;
    let cfg = wd.config(&url, &mock.base_url(), "replication", partner::MAPPINGS);
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_until(Duration::from_secs(60), "cobi-sync is the synchronous standby", || async {
        client
            .query_opt(
                "SELECT 1 FROM pg_stat_replication WHERE application_name = 'cobi-sync' AND sync_state = 'sync'",
                &[],
            )
            .await
            .unwrap()
            .is_some()
    })
    .await;
    // Writes ahead of the copy while it runs (each commit waits for the
    // daemon's confirmation).
    let writer = {
        let client = db.client().await;
        // (The throwaway cluster turns synchronous_commit off for speed.)
        client
            .batch_execute("SET synchronous_commit = on")
            .await
            .unwrap();
        tokio::spawn(async move {
            for i in 0..20 {
                client
                    .batch_execute(&format!(
                        "UPDATE merchant SET trade_name = 'W{i}' WHERE id = {}",
                        24_000 - i
                    ))
                    .await
                    .unwrap();
            }
        })
    };
    tokio::time::timeout(Duration::from_secs(120), writer)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "writes blocked: commits wait for the daemon\n{}",
                d.log_text()
            )
        })
        .unwrap();
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(120), &d.log).await;
}

/// SIGHUP (`systemctl reload`) in replication mode: the configuration is
/// re-read, the stream goes on, the daemon keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_while_streaming_keeps_the_daemon_running() {
    let db = partner::start_db(20).await;
    let url = least_privilege(&db).await;
    let wd = Workdir::new();
    let mock = mock().await;
    let cfg = wd.config(&url, &mock.base_url(), "replication", partner::MAPPINGS);
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let mut d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(90), &d.log).await;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    wait_until(Duration::from_secs(20), "the SIGHUP re-read", || {
        let seen = d.log_text().contains("SIGHUP: configuration re-read");
        async move { seen }
    })
    .await;
    client
        .batch_execute("INSERT INTO label_tag (label) VALUES ('after the reload')")
        .await
        .unwrap();
    wait_marker(&mock, "after the reload", &d).await;
    assert!(d.is_running(), "{}", d.log_text());
    assert!(d.term().await.success(), "{}", d.log_text());
}
