//! The state store under a running daemon: which keys keep a delete image
//! (and what is in it), deletes built from the old row or from the image,
//! and TRUNCATE soft deletes streamed from a UUID-keyed table.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{mock, Daemon, Db, Workdir};
use cobi_sync::state::{StateKey, StateStore};

const SCHEMA: &str = "
CREATE TABLE shop_full (id uuid PRIMARY KEY, title text NOT NULL, cc text NOT NULL,
    listed boolean NOT NULL DEFAULT true);
ALTER TABLE shop_full REPLICA IDENTITY FULL;
CREATE TABLE branch_plain (id uuid PRIMARY KEY, shop uuid NOT NULL, title text NOT NULL,
    cc text NOT NULL, lat numeric);
";

const MAPPINGS: &str = r#"
[[mapping]]
type = "shops"
table = "public.shop_full"
[mapping.fields]
shop_id = "id"
name = "title"
region = { column = "cc", transform = "upper" }
is_public = "listed"

[[mapping]]
type = "branches"
table = "public.branch_plain"
[mapping.fields]
branch_id = "id"
shop_id = "shop"
name = "title"
region = { column = "cc", transform = "upper" }
latitude = "lat"
"#;

/// Waits for `f`, failing with the daemon's log.
async fn wait_for<F, Fut>(d: &Daemon, timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    while !f().await {
        if std::time::Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for: {what}; daemon log:\n{}",
                d.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A UUID from a number, the same in SQL (`lpad(to_hex(n), 32, '0')::uuid`).
fn uuid_of(n: u32) -> String {
    format!("00000000-0000-0000-0000-{n:012x}")
}

fn record_of(
    mock: &cobi_sync::mock_api::MockServer,
    ty: &str,
    key: &str,
    id: &str,
) -> Option<Value> {
    mock.records(ty).into_iter().find(|r| r[key] == id)
}

/// States of every key of a mapping, read from a stopped daemon's state dir.
fn stored(
    dir: &std::path::Path,
    ty: &str,
    mapping: &str,
) -> Vec<(String, cobi_sync::state::KeyState)> {
    let store = cobi_sync::state::SledStore::open(dir).expect("open the state dir");
    let ty = cobi_sync::sink::type_id(ty).unwrap();
    let keys: Vec<StateKey> = store
        .keys_of(ty, mapping)
        .unwrap()
        .into_iter()
        .map(|(k, _)| StateKey {
            ty,
            mapping: mapping.into(),
            source_key: k,
        })
        .collect();
    let refs: Vec<&StateKey> = keys.iter().collect();
    let states = store.get_keys(&refs).unwrap();
    keys.into_iter()
        .zip(states)
        .map(|(k, s)| (k.source_key, s.expect("listed keys have a state")))
        .collect()
}

#[tokio::test]
async fn delete_images_of_every_field_build_the_soft_deletes() {
    let db = Db::start().await;
    db.exec(SCHEMA).await;
    db.exec(
        "INSERT INTO shop_full (id, title, cc, listed)
           SELECT lpad(to_hex(g), 32, '0')::uuid, 'Shop ' || g, 'gb', g % 2 = 0 FROM generate_series(1, 40) g;
         INSERT INTO branch_plain (id, shop, title, cc, lat)
           SELECT lpad(to_hex(1000 + g), 32, '0')::uuid, lpad(to_hex(1 + g % 40), 32, '0')::uuid,
                  'Branch ' || g, 'fr', 51.5
           FROM generate_series(1, 120) g;",
    )
    .await;
    let tables = ["public.shop_full", "public.branch_plain"];
    let url = db.least_privilege_url(true, &tables).await;
    db.publication("cobi_test", &tables).await;
    let mock = mock().await;
    let wd = Workdir::new();
    let cfg = wd.config(&url, &mock.base_url(), "replication", MAPPINGS);
    let log = wd.path("daemon.log");
    let mut d = Daemon::start(&cfg, &log);
    wait_for(
        &d,
        Duration::from_secs(60),
        "the snapshot at the mock",
        || async { mock.records("shops").len() == 40 && mock.records("branches").len() == 120 },
    )
    .await;
    assert!(d.term().await.success(), "{}", d.log_text());

    // FULL identity: a DELETE carries the old row, but a re-copy's
    // reconciliation has no row to read: an image is kept all the same.
    let shops = stored(&wd.path("state"), "shops", "shops/public.shop_full");
    assert_eq!(shops.len(), 40);
    assert!(
        shops.iter().all(|(_, s)| s.delete_image.is_some()),
        "{shops:?}"
    );
    // Default identity: an image of every field as sent (optional ones
    // too: a delete must not blank them).
    let branches = stored(
        &wd.path("state"),
        "branches",
        "branches/public.branch_plain",
    );
    assert_eq!(branches.len(), 120);
    let bt = cobi_sync::sink::type_id("branches").unwrap();
    for (sk, s) in &branches {
        let image = s
            .delete_image
            .as_ref()
            .unwrap_or_else(|| panic!("{sk}: no image"));
        let r = cobi_sync::state::image::decode(bt, image).unwrap();
        let got: Value = serde_json::from_slice(&r.to_json()).unwrap();
        assert_eq!(
            got.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["branch_id", "latitude", "name", "region", "shop_id"],
            "{sk}: {got}"
        );
        assert_eq!(got["branch_id"], sk.as_str());
        assert_eq!(got["latitude"], 51.5, "{sk}: {got}");
    }

    // Restart; delete a shop (old row), re-key a shop (old row of an
    // UPDATE), delete a branch (from its image).
    let mut d = Daemon::start(&cfg, &log);
    db.exec(&format!(
        "DELETE FROM shop_full WHERE id = '{}';
         UPDATE shop_full SET id = '{}' WHERE id = '{}';
         DELETE FROM branch_plain WHERE id = '{}';",
        uuid_of(3),
        uuid_of(999),
        uuid_of(4),
        uuid_of(1005)
    ))
    .await;
    wait_for(
        &d,
        Duration::from_secs(30),
        "the soft deletes at the mock",
        || async {
            [
                (uuid_of(3), "shops", "shop_id"),
                (uuid_of(4), "shops", "shop_id"),
                (uuid_of(1005), "branches", "branch_id"),
            ]
            .iter()
            .all(|(id, ty, key)| {
                record_of(&mock, ty, key, id).is_some_and(|r| r["is_deleted"] == true)
            }) && record_of(&mock, "shops", "shop_id", &uuid_of(999)).is_some()
        },
    )
    .await;
    // From the old row: every mapped field.
    assert_eq!(
        record_of(&mock, "shops", "shop_id", &uuid_of(3)).unwrap(),
        json!({"shop_id": uuid_of(3), "name": "Shop 3", "region": "GB", "is_public": false, "is_deleted": true})
    );
    assert_eq!(
        record_of(&mock, "shops", "shop_id", &uuid_of(4)).unwrap(),
        json!({"shop_id": uuid_of(4), "name": "Shop 4", "region": "GB", "is_public": true, "is_deleted": true})
    );
    // From the image: every field as last sent.
    assert_eq!(
        record_of(&mock, "branches", "branch_id", &uuid_of(1005)).unwrap(),
        json!({"branch_id": uuid_of(1005), "shop_id": uuid_of(6), "name": "Branch 5", "region": "FR", "latitude": 51.5, "is_deleted": true})
    );
    assert_eq!(mock.stats().records_rejected.values().sum::<u64>(), 0);
    assert!(d.term().await.success(), "{}", d.log_text());
}

#[tokio::test]
async fn truncate_soft_deletes_every_uuid_key_in_chunks() {
    let db = Db::start().await;
    db.exec(SCHEMA).await;
    // More keys than one chunk of the key stream (1 024), in many pages.
    db.exec(
        "INSERT INTO shop_full (id, title, cc)
           SELECT lpad(to_hex(g), 32, '0')::uuid, 'Shop ' || g, 'gb' FROM generate_series(1, 3000) g;",
    )
    .await;
    let body = MAPPINGS.replace(
        "table = \"public.shop_full\"",
        "table = \"public.shop_full\"\non_truncate = \"soft_delete\"",
    );
    let mock = mock().await;
    let wd = Workdir::new();
    let cfg = wd.config(&db.url(), &mock.base_url(), "replication", &body);
    let log = wd.path("daemon.log");
    let mut d = Daemon::start(&cfg, &log);
    wait_for(
        &d,
        Duration::from_secs(60),
        "the snapshot at the mock",
        || async { mock.records("shops").len() == 3000 },
    )
    .await;
    // Every key committed to the state store first (the slot's confirmed
    // position passes only what is durable): a TRUNCATE racing the commit
    // of the keys it must delete is issue 12's, not this test's.
    let client = db.client().await;
    let lsn: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    wait_for(&d, Duration::from_secs(60), "the snapshot confirmed", || async {
        client
            .query_one(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'cobi_test'",
                &[&lsn],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    db.exec("TRUNCATE shop_full;").await;
    wait_for(
        &d,
        Duration::from_secs(60),
        "every shop soft-deleted",
        || async {
            mock.records("shops")
                .iter()
                .filter(|r| r["is_deleted"] == true)
                .count()
                == 3000
        },
    )
    .await;
    // Built from the images: every field as last sent.
    let r = record_of(&mock, "shops", "shop_id", &uuid_of(2999)).unwrap();
    assert_eq!(
        r,
        json!({"shop_id": uuid_of(2999), "name": "Shop 2999", "region": "GB", "is_public": true, "is_deleted": true})
    );
    assert!(d.term().await.success(), "{}", d.log_text());
}
