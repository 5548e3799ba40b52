//! Features beyond the main paths: query mappings, reconcile, truncate
//! policies, adding a mapping to a running replication setup.

use std::time::Duration;

use crate::common::{mock, run_cli, wait_until, Daemon, Db, Workdir};
use crate::partner::{self, wait_in_sync};

const SHOPS_QUERY: &str = r#"
[[mapping]]
type = "shops"
query = "SELECT m.id, m.trade_name || ' (' || m.country || ')' AS label, upper(m.country) AS cc, m.modified_at FROM merchant m WHERE m.listed"
key = ["id"]
cursor = "modified_at"
reconcile = "* * * * * *"
[mapping.fields]
shop_id = { column = "id", transform = "uuid5" }
name = "label"
region = "cc"
updated = "modified_at"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_query_mapping_and_reconcile_of_hard_deletes() {
    let db = partner::start_db(20).await;
    let wd = Workdir::new();
    let mock = mock().await;
    let cfg = wd.config(&db.url(), &mock.base_url(), "poll", SHOPS_QUERY);
    let d = Daemon::start(&cfg, &wd.path("daemon.log"));
    // Only listed merchants (the query's WHERE), named by the query.
    let listed: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM merchant WHERE listed", &[])
        .await
        .unwrap()
        .get(0);
    wait_until(
        Duration::from_secs(30),
        "the query's rows delivered",
        || {
            let n = mock.records("shops").len() as i64;
            async move { n == listed }
        },
    )
    .await;
    assert!(mock
        .records("shops")
        .iter()
        .all(|r| r["name"].as_str().unwrap().ends_with("(gb)")
            || r["name"].as_str().unwrap().ends_with("(us)")
            || r["name"].as_str().unwrap().ends_with("(ca)")));
    // A hard delete (no soft-delete column): reconcile finds and soft-deletes it.
    db.exec("DELETE FROM merchant_genre; DELETE FROM merchant_tag; DELETE FROM merchant_term; DELETE FROM favourite; DELETE FROM purchase; DELETE FROM promo; DELETE FROM outlet; DELETE FROM merchant WHERE id = 1;").await;
    wait_until(
        Duration::from_secs(30),
        "reconcile soft-deletes the vanished row",
        || {
            let gone = mock
                .records("shops")
                .iter()
                .any(|r| r["is_deleted"] == true);
            async move { gone }
        },
    )
    .await;
    let deleted: Vec<_> = mock
        .records("shops")
        .into_iter()
        .filter(|r| r["is_deleted"] == true)
        .collect();
    assert_eq!(deleted.len(), 1, "{deleted:?}");
    assert!(
        deleted[0]["name"].as_str().unwrap().starts_with("Shop 1 "),
        "the tombstone carries the last-sent fields"
    );
    drop(d);
}

#[test]
fn a_query_without_its_cursor_column_is_a_startup_error() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (db, wd) = rt.block_on(async {
        let db = Db::start().await;
        db.exec(partner::SCHEMA).await;
        (db, Workdir::new())
    });
    let body = SHOPS_QUERY
        .replace(", m.modified_at FROM", " FROM")
        .replace("updated = \"modified_at\"\n", "");
    let cfg = wd.config(&db.url(), "http://127.0.0.1:9", "poll", &body);
    let (code, _, err) = run_cli(&["run", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("cursor column `modified_at` does not exist"),
        "{err}"
    );
    let (code, out, _) = run_cli(&["check", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(
        out.contains("cursor column `modified_at` does not exist"),
        "{out}"
    );
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_policies() {
    let db = partner::start_db(10).await;
    let wd = Workdir::new();
    let mock = mock().await;
    // tags: soft_delete on truncate; keywords: the default (error).
    let mappings = partner::MAPPINGS.replace(
        "type = \"tags\"\ntable = \"public.label_tag\"",
        "type = \"tags\"\ntable = \"public.label_tag\"\non_truncate = \"soft_delete\"",
    );
    let cfg = wd.config(&db.url(), &mock.base_url(), "replication", &mappings);
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_in_sync(
        &settings,
        &db.client().await,
        &mock,
        Duration::from_secs(60),
        &d.log,
    )
    .await;
    db.exec("TRUNCATE label_tag, merchant_tag, search_term, merchant_term;")
        .await;
    wait_until(Duration::from_secs(30), "tags soft-deleted", || {
        let all = mock.records("tags").iter().all(|r| r["is_deleted"] == true);
        async move { all }
    })
    .await;
    wait_until(Duration::from_secs(30), "the error policy logged", || {
        let logged = d
            .log_text()
            .contains("TRUNCATE on a mapped table: nothing was sent");
        async move { logged }
    })
    .await;
    // keywords stay as they were (nothing sent).
    assert!(mock
        .records("keywords")
        .iter()
        .all(|r| r.get("is_deleted").is_none()));
    assert!(
        d.log_text().contains("public.search_term"),
        "the ERROR names the table"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapping_added_later_is_published_and_snapshotted_while_streaming() {
    let db = partner::start_db(15).await;
    let wd = Workdir::new();
    let mock = mock().await;
    // Start without the courses mapping.
    let without = partner::MAPPINGS.replace(
        "[[mapping]]\ntype = \"courses\"\ntable = \"public.programme\"\ncursor = \"modified_at\"\n[mapping.fields]\ncourse_id = { column = \"id\", transform = \"uuid5\" }\nname = \"title\"\n",
        "",
    );
    assert_ne!(without, partner::MAPPINGS);
    let cfg = wd.config(&db.url(), &mock.base_url(), "replication", &without);
    let mut d = Daemon::start(&cfg, &wd.path("d1.log"));
    wait_until(Duration::from_secs(30), "first sync", || {
        let n = mock.records("shops").len();
        async move { n == 15 }
    })
    .await;
    assert!(d.term().await.success());
    assert!(mock.records("courses").is_empty());
    let client = db.client().await;
    assert_eq!(published(&client).await, 0);
    // Add it back: the table joins the publication, is copied once, and
    // its changes stream.
    let cfg = wd.config(
        &db.url(),
        &mock.base_url(),
        "replication",
        partner::MAPPINGS,
    );
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let d = Daemon::start(&cfg, &wd.path("d2.log"));
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(60), &d.log).await;
    assert_eq!(published(&client).await, 1);
    client
        .batch_execute("INSERT INTO programme (title) VALUES ('Added later')")
        .await
        .unwrap();
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(30), &d.log).await;
}

async fn published(c: &tokio_postgres::Client) -> usize {
    c.query(
        "SELECT tablename::text FROM pg_publication_tables \
         WHERE pubname = 'cobi_test' AND tablename = 'programme'",
        &[],
    )
    .await
    .unwrap()
    .len()
}
