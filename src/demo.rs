//! `cobi-sync demo`: the zero-setup tour.
//!
//! Starts a throwaway PostgreSQL (server binaries from `$PATH`,
//! `pg_config --bindir` or `/usr/lib/postgresql/*/bin`), creates sample
//! partner tables covering every Cobi type (named like a partner's schema,
//! not like Cobi's), starts the mock API in-process, runs the sync in
//! replication mode — snapshot, then live inserts, an update and a delete it
//! makes itself — prints what the API received per type and a sample
//! record, cleans everything up and exits 0.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::{self, Settings};
use crate::daemon::Pipeline;
use crate::mock_api::{MockOptions, MockServer};
use crate::model::schema::schema;
use crate::ops::logging;
use crate::pgtemp::{DirGuard, PgTemp, PgTempError};
use crate::source::replication;
use crate::state::{SledStore, StateStore};

/// The sample partner schema: one table per Cobi type, named like a
/// partner's (integer keys, a `timestamp without time zone`, numeric amounts,
/// an enum, arrays). The integration tests use the same tables and mappings.
pub const SCHEMA: &str = r#"
CREATE TYPE promo_kind AS ENUM ('percentage', 'fixed');
CREATE TABLE campus (id serial PRIMARY KEY, title text NOT NULL, cc text NOT NULL DEFAULT 'gb',
    modified_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE programme (id serial PRIMARY KEY, title text NOT NULL, modified_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE genre (id serial PRIMARY KEY, label text NOT NULL, modified_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE label_tag (id serial PRIMARY KEY, label text NOT NULL, modified_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE search_term (id serial PRIMARY KEY, term text NOT NULL, modified_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE merchant (id serial PRIMARY KEY, trade_name text NOT NULL, country text NOT NULL,
    listed bool NOT NULL DEFAULT true, archived_at timestamptz,
    opened timestamp NOT NULL DEFAULT localtimestamp, modified_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE member (id serial PRIMARY KEY, uid uuid NOT NULL DEFAULT gen_random_uuid(), dob date,
    campus_id int REFERENCES campus, programme_id int REFERENCES programme, country text NOT NULL,
    sex char(1), modified_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE outlet (id serial PRIMARY KEY, merchant_id int NOT NULL REFERENCES merchant, label text NOT NULL,
    country text NOT NULL, lat numeric(9,6), lng float8, modified_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE promo (id serial PRIMARY KEY, merchant_id int NOT NULL REFERENCES merchant, title text NOT NULL,
    kind promo_kind NOT NULL, amount numeric(12,2) NOT NULL, country text NOT NULL, days text[],
    outlet_ids int[], valid_from timestamptz, enabled bool NOT NULL DEFAULT true,
    modified_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE merchant_genre (id serial PRIMARY KEY, merchant_id int NOT NULL REFERENCES merchant,
    genre_id int NOT NULL REFERENCES genre, country text NOT NULL, modified_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE merchant_tag (id serial PRIMARY KEY, merchant_id int NOT NULL REFERENCES merchant,
    tag_id int NOT NULL REFERENCES label_tag, modified_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE merchant_term (id serial PRIMARY KEY, merchant_id int NOT NULL REFERENCES merchant,
    term_id int NOT NULL REFERENCES search_term, modified_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE favourite (id serial PRIMARY KEY, member_id int NOT NULL REFERENCES member,
    merchant_id int NOT NULL REFERENCES merchant, modified_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE purchase (id serial PRIMARY KEY, member_id int REFERENCES member, merchant_id int NOT NULL REFERENCES merchant,
    promo_id int REFERENCES promo, outlet_id int REFERENCES outlet, country text NOT NULL, channel text,
    saved numeric(12,2) NOT NULL DEFAULT 0, total numeric(12,2) NOT NULL, modified_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE event_log (id serial PRIMARY KEY, member_id int REFERENCES member, kind text NOT NULL,
    item_kind text NOT NULL, item_ref int NOT NULL, platform text, happened_at timestamptz NOT NULL DEFAULT now(),
    modified_at timestamptz NOT NULL DEFAULT now());
"#;

/// The demo's sample rows.
const SAMPLE_ROWS: &str = r#"
INSERT INTO campus (title, cc) VALUES ('University of Leeds', 'gb'), ('McGill University', 'ca'), ('UCLA', 'us');
INSERT INTO programme (title) VALUES ('Computer Science'), ('History'), ('Medicine');
INSERT INTO genre (label) VALUES ('Books'), ('Food'), ('Fashion'), ('Tech');
INSERT INTO label_tag (label) VALUES ('Student Discount'), ('Eco'), ('Late Night');
INSERT INTO search_term (term) VALUES ('coffee'), ('laptop'), ('trainers');
INSERT INTO merchant (trade_name, country, listed)
  SELECT (ARRAY['Campus Books','Bean There Café','Pixel Repair','Threads','Noodle Bar','Bike Hub'])[1 + g % 6] || ' #' || g,
         (ARRAY['gb','ca','us'])[1 + g % 3], g % 7 <> 0 FROM generate_series(1, 24) g;
INSERT INTO member (dob, campus_id, programme_id, country, sex)
  SELECT DATE '1999-09-01' + g * 17, 1 + g % 3, 1 + g % 3, (ARRAY['gb','ca','us'])[1 + g % 3], (ARRAY['M','F',NULL])[1 + g % 3]
  FROM generate_series(1, 40) g;
INSERT INTO outlet (merchant_id, label, country, lat, lng)
  SELECT 1 + g % 24, 'Outlet ' || g, 'gb', 53.8 + g / 1000.0, -1.55 FROM generate_series(1, 30) g;
INSERT INTO promo (merchant_id, title, kind, amount, country, days)
  SELECT 1 + g % 24, (ARRAY['10% off','£5 off','2 for 1'])[1 + g % 3], (ARRAY['percentage','fixed'])[1 + g % 2]::promo_kind,
         5 + g % 10, 'gb', ARRAY['monday','friday'] FROM generate_series(1, 20) g;
INSERT INTO merchant_genre (merchant_id, genre_id, country) SELECT 1 + g % 24, 1 + g % 4, 'gb' FROM generate_series(1, 24) g;
INSERT INTO merchant_tag (merchant_id, tag_id) SELECT 1 + g % 24, 1 + g % 3 FROM generate_series(1, 24) g;
INSERT INTO merchant_term (merchant_id, term_id) SELECT 1 + g % 24, 1 + g % 3 FROM generate_series(1, 12) g;
INSERT INTO favourite (member_id, merchant_id) SELECT 1 + g % 40, 1 + (g * 5) % 24 FROM generate_series(1, 30) g;
INSERT INTO purchase (member_id, merchant_id, promo_id, outlet_id, country, channel, saved, total)
  SELECT 1 + g % 40, 1 + g % 24, 1 + g % 20, 1 + g % 30, 'gb', (ARRAY['online','in-store'])[1 + g % 2], g % 4, 8 + g % 40
  FROM generate_series(1, 60) g;
INSERT INTO event_log (member_id, kind, item_kind, item_ref, platform)
  SELECT 1 + g % 40, (ARRAY['PAGE_VIEW','SHARE','DISCOUNT_CODE'])[1 + g % 3], (ARRAY['SHOP','OFFER','TAG'])[1 + g % 3], 1 + g % 3, 'WEB'
  FROM generate_series(1, 25) g;
"#;

/// The mappings of [`SCHEMA`]: every Cobi type.
pub const MAPPINGS: &str = r#"
[[mapping]]
type = "institutes"
table = "public.campus"
cursor = "modified_at"
[mapping.fields]
institute_id = { column = "id", transform = "uuid5" }
name = "title"
region = { column = "cc", transform = "upper" }
updated = "modified_at"

[[mapping]]
type = "courses"
table = "public.programme"
cursor = "modified_at"
[mapping.fields]
course_id = { column = "id", transform = "uuid5" }
name = "title"

[[mapping]]
type = "categories"
table = "public.genre"
cursor = "modified_at"
[mapping.fields]
category_id = { column = "id", transform = "uuid5" }
name = "label"

[[mapping]]
type = "tags"
table = "public.label_tag"
cursor = "modified_at"
[mapping.fields]
tag_id = { column = "id", transform = "uuid5" }
name = "label"

[[mapping]]
type = "keywords"
table = "public.search_term"
cursor = "modified_at"
[mapping.fields]
keyword_id = { column = "id", transform = "uuid5" }
name = "term"

[[mapping]]
type = "shops"
table = "public.merchant"
cursor = "modified_at"
[mapping.fields]
shop_id = { column = "id", transform = "uuid5" }
name = "trade_name"
region = { column = "country", transform = "upper" }
is_public = "listed"
created = "opened"
updated = "modified_at"
is_deleted = { column = "archived_at", transform = "is_not_null" }

[[mapping]]
type = "customers"
table = "public.member"
cursor = "modified_at"
[mapping.fields]
customer_id = { column = "id", transform = "uuid5" }
user_id = "uid"
birthdate = "dob"
institute_id = { column = "campus_id", transform = "uuid5:institutes" }
course_id = { column = "programme_id", transform = "uuid5:courses" }
region = { column = "country", transform = "upper" }
gender = { column = "sex", map = { "M" = "male", "F" = "female" } }

[[mapping]]
type = "branches"
table = "public.outlet"
cursor = "modified_at"
[mapping.fields]
branch_id = { column = "id", transform = "uuid5" }
shop_id = { column = "merchant_id", transform = "uuid5:shops" }
name = "label"
region = { column = "country", transform = "upper" }
latitude = "lat"
longitude = "lng"

[[mapping]]
type = "offers"
table = "public.promo"
cursor = "modified_at"
[mapping.fields]
offer_id = { column = "id", transform = "uuid5" }
shop_id = { column = "merchant_id", transform = "uuid5:shops" }
name = "title"
type = "kind"
value = "amount"
region = { column = "country", transform = "upper" }
allowed_days = { column = "days", transform = "csv" }
allowed_branches = { column = "outlet_ids", transform = ["uuid5:branches", "csv"] }
allowed_from = "valid_from"
is_enabled = "enabled"

[[mapping]]
type = "shop-categories"
table = "public.merchant_genre"
cursor = "modified_at"
[mapping.fields]
shop_category_id = { column = "id", transform = "uuid5" }
shop_id = { column = "merchant_id", transform = "uuid5:shops" }
category_id = { column = "genre_id", transform = "uuid5:categories" }
region = { column = "country", transform = "upper" }

[[mapping]]
type = "shop-tags"
table = "public.merchant_tag"
cursor = "modified_at"
[mapping.fields]
shop_tag_id = { column = "id", transform = "uuid5" }
shop_id = { column = "merchant_id", transform = "uuid5:shops" }
tag_id = { column = "tag_id", transform = "uuid5:tags" }

[[mapping]]
type = "shop-keywords"
table = "public.merchant_term"
cursor = "modified_at"
[mapping.fields]
shop_keyword_id = { column = "id", transform = "uuid5" }
shop_id = { column = "merchant_id", transform = "uuid5:shops" }
keyword_id = { column = "term_id", transform = "uuid5:keywords" }

[[mapping]]
type = "student-favourites"
table = "public.favourite"
cursor = "modified_at"
[mapping.fields]
favourite_id = { column = "id", transform = "uuid5" }
student_id = { column = "member_id", transform = "uuid5:customers" }
shop_id = { column = "merchant_id", transform = "uuid5:shops" }

[[mapping]]
type = "transactions"
table = "public.purchase"
cursor = "modified_at"
[mapping.fields]
transaction_id = { column = "id", transform = "uuid5" }
student_id = { column = "member_id", transform = "uuid5:customers" }
shop_id = { column = "merchant_id", transform = "uuid5:shops" }
offer_id = { column = "promo_id", transform = "uuid5:offers" }
branch_id = { column = "outlet_id", transform = "uuid5:branches" }
region = { column = "country", transform = "upper" }
source = "channel"
savings = "saved"
amount = "total"
updated = "modified_at"

[[mapping]]
type = "interactions"
table = "public.event_log"
cursor = "modified_at"
[mapping.fields]
interaction_type = "kind"
student_id = { column = "member_id", transform = "uuid5:customers" }
item_type = "item_kind"
item_id = { column = "item_ref", transform = "uuid5:item" }
platform = "platform"
event_timestamp = { column = "happened_at", transform = "epoch_ms" }
"#;

const DEMO_KEY: &str = "demo-key";

/// `cobi-sync demo`.
pub async fn run() -> Result<(), u8> {
    let started = Instant::now();
    if let Err(e) = PgTemp::find_bindir() {
        eprintln!("{}", no_binaries_message(&e));
        return Err(1);
    }
    // Quiet logs: the demo prints its own story; warnings still show.
    logging::init(&config::LogSettings {
        format: config::LogFormat::Text,
        level: "warn".into(),
    });
    match tour(started).await {
        Ok(()) => Ok(()),
        Err(e) => {
            eprintln!("demo failed: {e}");
            Err(1)
        }
    }
}

fn no_binaries_message(e: &PgTempError) -> String {
    format!(
        "the demo needs PostgreSQL server binaries (initdb, postgres): {e}. Install them, e.g. \
         `apt install postgresql` on Debian/Ubuntu, or point COBI_SYNC_PG_BINDIR at their directory"
    )
}

async fn tour(started: Instant) -> anyhow::Result<()> {
    println!("cobi-sync demo: a throwaway PostgreSQL and a local mock of the Cobi API\n");
    let pg = PgTemp::start().await?;
    let db = pg.create_database(Some("partner")).await?;
    let client = pg.connect(&db).await?;
    client.batch_execute(SCHEMA).await?;
    client.batch_execute(SAMPLE_ROWS).await?;
    println!(
        "1. PostgreSQL {} started on port {}; sample partner tables created",
        version(&client).await,
        pg.port()
    );

    let mock = MockServer::start(MockOptions {
        listen: "127.0.0.1:0".parse()?,
        api_key: DEMO_KEY.into(),
        fail_rate: 0.0,
        throttle_rate: 0.0,
        drop_rate: 0.0,
        latency: Duration::ZERO,
        seed: 1,
        opaque_errors: false,
    })
    .await?;
    println!("2. mock Cobi API listening on {}", mock.base_url());

    // Removed on every way out of the tour, failures included (after the
    // store using it, declared below, has been dropped).
    let workdir = DirGuard::new(tempdir()?);
    let state = workdir.path();
    let key_file = state.join("api-key");
    std::fs::write(&key_file, DEMO_KEY)?;
    set_private(&key_file)?;
    let settings = settings(
        &pg.url(&db),
        &mock.base_url(),
        &key_file,
        &state.join("state"),
    )?;
    let store: Arc<dyn StateStore> = Arc::new(SledStore::open(&settings.state.dir)?);
    let pipeline = Pipeline::start(&settings, store.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let stop = CancellationToken::new();
    let source = tokio::spawn(replication::run(
        settings.clone(),
        store.clone(),
        pipeline.sink.clone(),
        pipeline.health.clone(),
        pipeline.metrics.clone(),
        stop.clone(),
    ));
    let expected = expected_counts(&client).await?;
    let total: usize = expected.iter().map(|(_, n)| n).sum();
    println!(
        "3. syncing in replication mode: snapshot of {total} rows across 15 tables, then streaming"
    );
    wait_for(&mock, &expected, Duration::from_secs(40)).await?;
    println!(
        "   snapshot delivered in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    client
        .batch_execute(
            "BEGIN;
             INSERT INTO merchant (trade_name, country) VALUES ('Brand New Bakery', 'gb');
             INSERT INTO outlet (merchant_id, label, country) VALUES (currval('merchant_id_seq'), 'Bakery Kiosk', 'gb');
             COMMIT;
             UPDATE promo SET amount = 25, title = '25% off this week' WHERE id = 1;
             DELETE FROM purchase WHERE id = 2;",
        )
        .await?;
    println!("4. live changes made: a new shop and its branch (one transaction), an offer updated, a transaction deleted");
    let mut expected = expected;
    for (t, n) in expected.iter_mut() {
        if t == "shops" || t == "branches" {
            *n += 1;
        }
    }
    wait_for(&mock, &expected, Duration::from_secs(20)).await?;
    wait_until(Duration::from_secs(20), || {
        let deleted = mock
            .records("transactions")
            .iter()
            .any(|r| r["is_deleted"] == true);
        let updated = mock
            .records("offers")
            .iter()
            .any(|r| r["name"] == "25% off this week");
        deleted && updated
    })
    .await?;
    println!("   streamed and delivered\n");

    print_table(&mock);
    if let Some(shop) = mock
        .records("shops")
        .into_iter()
        .find(|r| r["name"] == "Brand New Bakery")
    {
        println!(
            "\nsample record (POST /v1/data/shops):\n{}",
            serde_json::to_string_pretty(&shop)?
        );
    }

    stop.cancel();
    let _ = source.await;
    pipeline.drain(Duration::from_secs(5)).await;
    mock.stop().await;
    drop(client);
    drop(pg);
    drop(store);
    drop(workdir);
    println!(
        "\ndone in {:.1}s; everything cleaned up. Next: write your mappings (config/cobi-sync.example.toml) and run `cobi-sync check`.",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn version(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SHOW server_version", &[])
        .await
        .map(|r| r.get::<_, String>(0))
        .unwrap_or_default()
}

fn tempdir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "cobi-sync-demo-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn set_private(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

fn settings(
    db_url: &str,
    api: &str,
    key_file: &std::path::Path,
    state: &std::path::Path,
) -> anyhow::Result<Settings> {
    let text = format!(
        r#"
[source]
url = "{db_url}"
mode = "replication"
[source.replication]
slot = "cobi_demo"
publication = "cobi_demo"
[api]
base_url = "{api}"
api_key_file = "{}"
[batch]
linger = "100ms"
[state]
dir = "{}"
[http]
listen = ""
{MAPPINGS}
"#,
        key_file.display(),
        state.display()
    );
    config::load_str(&text, "demo").map_err(|e| anyhow::anyhow!("{e}"))
}

/// Rows per Cobi type at the source.
async fn expected_counts(client: &tokio_postgres::Client) -> anyhow::Result<Vec<(String, usize)>> {
    let tables = [
        ("institutes", "campus"),
        ("courses", "programme"),
        ("categories", "genre"),
        ("tags", "label_tag"),
        ("keywords", "search_term"),
        ("shops", "merchant"),
        ("customers", "member"),
        ("branches", "outlet"),
        ("offers", "promo"),
        ("shop-categories", "merchant_genre"),
        ("shop-tags", "merchant_tag"),
        ("shop-keywords", "merchant_term"),
        ("student-favourites", "favourite"),
        ("transactions", "purchase"),
        ("user-interactions", "event_log"),
    ];
    let mut out = Vec::new();
    for (ty, table) in tables {
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await?
            .get(0);
        out.push((ty.to_string(), n as usize));
    }
    Ok(out)
}

async fn wait_for(
    mock: &MockServer,
    expected: &[(String, usize)],
    timeout: Duration,
) -> anyhow::Result<()> {
    wait_until(timeout, || {
        expected.iter().all(|(t, n)| mock.records(t).len() >= *n)
    })
    .await
}

async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            anyhow::bail!("the API did not receive everything within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn print_table(mock: &MockServer) {
    let stats = mock.stats();
    println!("what the API received:");
    println!(
        "{:<20} {:>8} {:>8} {:>10}",
        "type", "records", "deleted", "re-sends"
    );
    println!("{}", "-".repeat(50));
    let mut total = 0;
    for t in &schema().types {
        let recs = mock.records(&t.name);
        let deleted = recs.iter().filter(|r| r["is_deleted"] == true).count();
        let dups = stats.duplicates.get(&t.name).copied().unwrap_or(0);
        total += recs.len();
        println!(
            "{:<20} {:>8} {:>8} {:>10}",
            t.name,
            recs.len(),
            deleted,
            dups
        );
    }
    println!("{}", "-".repeat(50));
    println!(
        "{:<20} {:>8}   reference failures at the API: {}",
        "total", total, stats.reference_failures
    );
}
