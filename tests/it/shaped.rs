//! End to end on partner-shaped data (`partner::SHAPED_SCHEMA`): text and
//! UUID primary keys, a composite key without a surrogate id, a
//! range-partitioned table, a mixed-case table in a non-`public` schema,
//! soft deletes with and without REPLICA IDENTITY FULL — under the
//! README's least-privilege role in both modes, checked against the SQL
//! oracle. And numbers at the edges: 30 significant digits and `real`.

use std::time::Duration;

use crate::common::{mock, Daemon, Db, Workdir};
use crate::oracle::{self, Dec, Val};
use crate::partner::{self, wait_in_sync};

/// Changes while the daemon runs: a new shop with a branch and a booking
/// in one transaction, a rename in the mixed-case table, 30-digit amounts
/// updated, a booking moved to the other partition.
const LIVE_CHANGES: &str = r#"
BEGIN;
INSERT INTO crm."Shop" (code, "Name", country) VALUES ('SHOP-NEW', 'Streamed', 'de');
INSERT INTO crm.branch (id, shop_code, label, country, lat)
  VALUES ('0b6e7a3c-0000-4000-8000-000000000001', 'SHOP-NEW', 'Streamed branch', 'de', 48.137154);
INSERT INTO public.booking (student, shop_code, branch, country, amount, booked_on)
  SELECT id, 'SHOP-NEW', '0b6e7a3c-0000-4000-8000-000000000001', 'de', 98765432109876543210.123456789, DATE '2025-02-02'
  FROM public.student WHERE no = 2;
COMMIT;
UPDATE crm."Shop" SET "Name" = 'Renamed', updated_at = now() WHERE code = 'SHOP-0002';
UPDATE public.booking SET amount = amount + 0.000000001, updated_at = now() WHERE amount > 1e20;
UPDATE public.booking SET booked_on = DATE '2025-12-24', updated_at = now()
  WHERE (id, booked_on) IN (SELECT id, booked_on FROM public.booking WHERE booked_on < '2025-01-01' ORDER BY id LIMIT 1);
UPDATE public.student SET country = 'de', updated_at = now() WHERE no BETWEEN 10 AND 14;
"#;

/// Hard deletes (replication mode): a shop (default replica identity: the
/// delete is built from what was last sent), a student and a favourite
/// (FULL: from the old row), a booking in a partition.
const DELETES: &str = r#"
DELETE FROM crm."Shop" WHERE code = 'SHOP-0003';
DELETE FROM public.student WHERE no = 5;
DELETE FROM public.booking
  WHERE (id, booked_on) IN (SELECT id, booked_on FROM public.booking
                            WHERE booked_on >= '2025-01-01' AND booked_on < '2025-12-01' ORDER BY id LIMIT 1);
DELETE FROM public.favourite_pair WHERE shop_code = 'café-ü 1';
"#;

/// The shaped database with the least-privilege role; its URL.
async fn shaped(replication: bool) -> (Db, String) {
    let db = partner::start_shaped_db(60).await;
    let url = db
        .least_privilege_url(replication, partner::SHAPED_TABLES)
        .await;
    if replication {
        db.publication("cobi_test", partner::SHAPED_TABLES).await;
    }
    assert!(url.starts_with("postgres://cobi_sync@"), "{url}");
    (db, url)
}

fn deleted(mock: &cobi_sync::mock_api::MockServer, ty: &str) -> usize {
    mock.records(ty)
        .iter()
        .filter(|r| r["is_deleted"] == true)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_shaped_tables_replication_mode_least_privilege_role() {
    let (db, url) = shaped(true).await;
    let wd = Workdir::new();
    let mock = mock().await;
    let cfg = wd.config(
        &url,
        &mock.base_url(),
        "replication",
        partner::SHAPED_MAPPINGS,
    );
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let mut d = Daemon::start(&cfg, &wd.path("daemon.log"));
    let first = wait_in_sync(&settings, &client, &mock, Duration::from_secs(90), &d.log).await;
    assert!(first.rows > 300, "{} rows", first.rows);
    client.batch_execute(LIVE_CHANGES).await.unwrap();
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(60), &d.log).await;
    client.batch_execute(DELETES).await.unwrap();
    // Every deleted key soft-deleted (the oracle's "extra" rule), each
    // record still valid at the mock (required fields carried).
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(60), &d.log).await;
    for (ty, n) in [
        ("shops", 1),
        ("customers", 1),
        ("transactions", 1),
        ("student-favourites", 1),
    ] {
        assert_eq!(deleted(&mock, ty), n, "{ty} soft deletes");
    }
    assert_eq!(mock.stats().reference_failures, 0);
    assert!(d.term().await.success(), "{}", d.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_shaped_tables_poll_mode_least_privilege_role() {
    let (db, url) = shaped(false).await;
    let wd = Workdir::new();
    let mock = mock().await;
    let cfg = wd.config(&url, &mock.base_url(), "poll", partner::SHAPED_MAPPINGS);
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let mut d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(90), &d.log).await;
    client.batch_execute(LIVE_CHANGES).await.unwrap();
    // Poll mode sees deletes through soft-delete columns.
    client
        .batch_execute(
            r#"UPDATE crm."Shop" SET closed = true, updated_at = now() WHERE code = 'SHOP-0003';"#,
        )
        .await
        .unwrap();
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(60), &d.log).await;
    assert_eq!(deleted(&mock, "shops"), 1);
    assert_eq!(mock.stats().reference_failures, 0);
    assert!(d.term().await.success(), "{}", d.log_text());
}

// ---- numbers ---------------------------------------------------------------

/// 30 significant digits in range for a latitude.
const LAT: [&str; 3] = [
    "12.3456789012345678901234567891",
    "-89.9999999999999999999999999999",
    "0.000000000000000000000000000001",
];

async fn numbers_db() -> Db {
    let db = Db::start().await;
    db.exec(partner::NUMBERS_SCHEMA).await;
    db
}

/// The latitude the mock holds for `place`'s (or `place_full`'s) row `id`,
/// as an exact decimal, with whether it is soft-deleted.
async fn held_latitude(
    settings: &cobi_sync::config::Settings,
    client: &tokio_postgres::Client,
    mock: &cobi_sync::mock_api::MockServer,
    id: i32,
) -> Option<(Dec, bool)> {
    let label = partner::uuid5_labels(settings, client, "branches", &format!("SELECT {id}"))
        .await
        .into_iter()
        .next()
        .unwrap();
    let key = label.split_once(' ').unwrap().1.to_string();
    let held = oracle::actual(mock)
        .of("branches")
        .keyed
        .get(&key)
        .cloned()?;
    let Some(Val::Num(lat)) = held.get("latitude").cloned() else {
        panic!("no latitude in {held:?}");
    };
    Some((lat, held.get("is_deleted") == Some(&Val::Bool(true))))
}

/// Numerics with 30 significant digits keep every digit when inserted,
/// updated, and soft-deleted from `table` — `place_full` has REPLICA
/// IDENTITY FULL (the delete carries the old row), `place` has not (the
/// delete carries what was last sent).
async fn numeric_with_30_significant_digits_keeps_every_digit(table: &str, id: i32) {
    let db = numbers_db().await;
    for (i, lat) in LAT.iter().enumerate() {
        db.exec(&format!(
            "INSERT INTO place (id, store, lat) VALUES ({}, 1, {lat}); \
             INSERT INTO place_full (id, store, lat) VALUES ({}, 1, {lat});",
            1 + i,
            101 + i
        ))
        .await;
    }
    let wd = Workdir::new();
    let mock = mock().await;
    let cfg = wd.config(
        &db.url(),
        &mock.base_url(),
        "replication",
        partner::NUMBERS_MAPPINGS,
    );
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(60), &d.log).await;
    assert_eq!(
        Dec::parse(LAT[0]).unwrap().significant_digits(),
        30,
        "the fixture itself"
    );
    // Updated to another 30-digit value while streaming.
    db.exec(&format!(
        "UPDATE {table} SET lat = lat * 3 WHERE id = {id};"
    ))
    .await;
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(30), &d.log).await;
    let want: String = client
        .query_one(
            &format!("SELECT lat::text FROM {table} WHERE id = {id}"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        Dec::parse(&want).unwrap().significant_digits(),
        30,
        "{want}"
    );
    // The soft delete carries the same digits.
    db.exec(&format!("DELETE FROM {table} WHERE id = {id};"))
        .await;
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(30), &d.log).await;
    let (lat, gone) = held_latitude(&settings, &client, &mock, id).await.unwrap();
    assert!(gone, "{table} {id} soft-deleted");
    assert_eq!(
        lat,
        Dec::parse(&want).unwrap(),
        "{table} {id}: the soft delete must carry every digit of {want}, got {lat}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_with_30_significant_digits_keeps_every_digit_replica_identity_full() {
    numeric_with_30_significant_digits_keeps_every_digit("place_full", 101).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_with_30_significant_digits_keeps_every_digit_default_replica_identity() {
    numeric_with_30_significant_digits_keeps_every_digit("place", 1).await;
}

/// `real` (float4) values are sent as PostgreSQL prints them (`0.1`), not
/// widened to float8 (`0.10000000149011612`).
async fn real_values_are_sent_as_postgres_prints_them(mode: &str) {
    let db = numbers_db().await;
    db.exec(
        "INSERT INTO place (id, store, lat, lng) VALUES
           (1, 1, 1, 0.1), (2, 1, 1, -0.12), (3, 1, 1, 1.1), (4, 1, 1, 179.9), (5, 1, 1, 1e-7), (6, 1, 1, NULL);",
    )
    .await;
    let wd = Workdir::new();
    let mock = mock().await;
    let cfg = wd.config(&db.url(), &mock.base_url(), mode, partner::NUMBERS_MAPPINGS);
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(60), &d.log).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_values_are_sent_as_postgres_prints_them_replication() {
    real_values_are_sent_as_postgres_prints_them("replication").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_values_are_sent_as_postgres_prints_them_poll() {
    real_values_are_sent_as_postgres_prints_them("poll").await;
}
