//! The partner schema of `cobi-sync demo` (all 15 Cobi types, table and column names
//! unlike Cobi's (integer keys mapped with uuid5, a `timestamp without time
//! zone`, numeric amounts, an enum, a text[] mapped with csv), data
//! generators, the oracle's hand-written SQL for each of its mappings
//! ([`QUERIES`]), and the comparison of the source's current state with
//! what the mock API holds ([`wait_in_sync`], computed by `oracle.rs`
//! without the code under test).

#![allow(dead_code)]

use cobi_sync::config::{load_str, Settings};
use cobi_sync::mock_api::MockServer;

use crate::oracle::{self, csv, date, epoch_ms, naive, tstz, u5, Ctx, Query};
pub use crate::oracle::{Diff, Holdings};

/// The demo's partner tables and mappings.
pub use cobi_sync::demo::{MAPPINGS, SCHEMA};

/// A table no mapping reads.
pub const UNMAPPED: &str = "CREATE TABLE unmapped_noise (id serial PRIMARY KEY, payload text);";

/// Seeds `n` shops and a consistent web of every other type.
/// A fresh PostgreSQL with the partner schema and `n` seeded rows per
/// table (none for `n = 0`).
pub async fn start_db(n: usize) -> crate::common::Db {
    let db = crate::common::Db::start().await;
    db.exec(SCHEMA).await;
    if n > 0 {
        db.exec(&seed_sql(n)).await;
    }
    db
}

pub fn seed_sql(n: usize) -> String {
    format!(
        r#"
INSERT INTO campus (title, cc) SELECT 'Campus ' || g, (ARRAY['gb','us','ca'])[1 + g % 3] FROM generate_series(1, {a}) g;
INSERT INTO programme (title) SELECT 'Programme ' || g FROM generate_series(1, {a}) g;
INSERT INTO genre (label) SELECT 'Genre ' || g FROM generate_series(1, {a}) g;
INSERT INTO label_tag (label) SELECT 'Tag ' || g FROM generate_series(1, {a}) g;
INSERT INTO search_term (term) SELECT 'term-' || g FROM generate_series(1, {a}) g;
INSERT INTO merchant (trade_name, country, listed) SELECT 'Shop ' || g || ' Zoë', (ARRAY['gb','us','ca'])[1 + g % 3], g % 5 <> 0 FROM generate_series(1, {n}) g;
INSERT INTO member (dob, campus_id, programme_id, country, sex)
  SELECT DATE '2000-01-01' + g, 1 + g % {a}, CASE WHEN g % 4 = 0 THEN NULL ELSE 1 + g % {a} END, 'gb', (ARRAY['M','F',NULL])[1 + g % 3]
  FROM generate_series(1, {n}) g;
INSERT INTO outlet (merchant_id, label, country, lat, lng) SELECT 1 + g % {n}, 'Outlet ' || g, 'gb', 51.5 + g / 1000.0, -0.12 FROM generate_series(1, {n}) g;
INSERT INTO promo (merchant_id, title, kind, amount, country, days, outlet_ids, valid_from)
  SELECT 1 + g % {n}, 'Promo ' || g, (ARRAY['percentage','fixed'])[1 + g % 2]::promo_kind, 5 + g % 20, 'gb',
         ARRAY['monday','friday'], ARRAY[1 + g % {n}], now() - interval '1 day'
  FROM generate_series(1, {n}) g;
INSERT INTO merchant_genre (merchant_id, genre_id, country) SELECT 1 + g % {n}, 1 + g % {a}, 'gb' FROM generate_series(1, {n}) g;
INSERT INTO merchant_tag (merchant_id, tag_id) SELECT 1 + g % {n}, 1 + g % {a} FROM generate_series(1, {n}) g;
INSERT INTO merchant_term (merchant_id, term_id) SELECT 1 + g % {n}, 1 + g % {a} FROM generate_series(1, {n}) g;
INSERT INTO favourite (member_id, merchant_id) SELECT 1 + g % {n}, 1 + (g * 7) % {n} FROM generate_series(1, {n}) g;
INSERT INTO purchase (member_id, merchant_id, promo_id, outlet_id, country, channel, saved, total)
  SELECT 1 + g % {n}, 1 + g % {n}, 1 + g % {n}, 1 + g % {n}, 'gb', (ARRAY['online','in-store'])[1 + g % 2], g % 3, 10 + g % 50
  FROM generate_series(1, {n}) g;
INSERT INTO event_log (member_id, kind, item_kind, item_ref, platform)
  SELECT 1 + g % {n}, (ARRAY['SHARE','PAGE_VIEW'])[1 + g % 2], (ARRAY['SHOP','TAG','OFFER','KEYWORD'])[1 + g % 4], 1 + g % {a}, 'WEB'
  FROM generate_series(1, {n}) g;
"#,
        n = n,
        a = (n / 4).max(3)
    )
}

/// Settings for the partner schema.
pub fn settings(header: &str) -> Settings {
    load_str(&format!("{header}\n{MAPPINGS}"), "partner.toml").unwrap_or_else(|e| panic!("{e}"))
}

// ---- the oracle's SQL for the demo mappings --------------------------------

/// `uuid5:item`: the type chosen by `item_type`.
fn item_uuid(kind: &str, value: &str, c: &Ctx) -> String {
    format!(
        "cobi_oracle.uuid_generate_v5('{}'::uuid, (CASE {kind} WHEN 'TAG' THEN 'tags' WHEN 'OFFER' THEN 'offers' \
         WHEN 'SHOP' THEN 'shops' WHEN 'KEYWORD' THEN 'keywords' END) || ':' || ({value})::text)::text",
        c.namespace
    )
}

/// One query per mapping of [`MAPPINGS`] (and of `config/docker.toml`,
/// which maps the same tables the same way), written from DESIGN §3's
/// rules and the mapping text, not from the product's code.
pub static QUERIES: &[Query] = &[
    Query {
        id: "institutes/public.campus",
        from: "public.campus",
        reads: &["id", "title", "cc", "modified_at"],
        fields: |c| {
            vec![
                ("institute_id", u5("institutes", "id", c)),
                ("name", "title".into()),
                ("region", "upper(cc)".into()),
                ("updated", tstz("modified_at")),
            ]
        },
    },
    Query {
        id: "courses/public.programme",
        from: "public.programme",
        reads: &["id", "title", "modified_at"],
        fields: |c| {
            vec![
                ("course_id", u5("courses", "id", c)),
                ("name", "title".into()),
            ]
        },
    },
    Query {
        id: "categories/public.genre",
        from: "public.genre",
        reads: &["id", "label", "modified_at"],
        fields: |c| {
            vec![
                ("category_id", u5("categories", "id", c)),
                ("name", "label".into()),
            ]
        },
    },
    Query {
        id: "tags/public.label_tag",
        from: "public.label_tag",
        reads: &["id", "label", "modified_at"],
        fields: |c| vec![("tag_id", u5("tags", "id", c)), ("name", "label".into())],
    },
    Query {
        id: "keywords/public.search_term",
        from: "public.search_term",
        reads: &["id", "term", "modified_at"],
        fields: |c| {
            vec![
                ("keyword_id", u5("keywords", "id", c)),
                ("name", "term".into()),
            ]
        },
    },
    Query {
        id: "shops/public.merchant",
        from: "public.merchant",
        reads: &[
            "id",
            "trade_name",
            "country",
            "listed",
            "opened",
            "modified_at",
            "archived_at",
        ],
        fields: |c| {
            vec![
                ("shop_id", u5("shops", "id", c)),
                ("name", "trade_name".into()),
                ("region", "upper(country)".into()),
                ("is_public", "listed".into()),
                ("created", naive("opened", c)),
                ("updated", tstz("modified_at")),
                ("is_deleted", "archived_at IS NOT NULL".into()),
            ]
        },
    },
    Query {
        id: "customers/public.member",
        from: "public.member",
        reads: &[
            "id",
            "uid",
            "dob",
            "campus_id",
            "programme_id",
            "country",
            "sex",
            "modified_at",
        ],
        fields: |c| {
            vec![
                ("customer_id", u5("customers", "id", c)),
                ("user_id", "uid::text".into()),
                ("birthdate", date("dob")),
                ("institute_id", u5("institutes", "campus_id", c)),
                ("course_id", u5("courses", "programme_id", c)),
                ("region", "upper(country)".into()),
                (
                    "gender",
                    "CASE sex::text WHEN 'M' THEN 'male' WHEN 'F' THEN 'female' ELSE sex::text END"
                        .into(),
                ),
            ]
        },
    },
    Query {
        id: "branches/public.outlet",
        from: "public.outlet",
        reads: &[
            "id",
            "merchant_id",
            "label",
            "country",
            "lat",
            "lng",
            "modified_at",
        ],
        fields: |c| {
            vec![
                ("branch_id", u5("branches", "id", c)),
                ("shop_id", u5("shops", "merchant_id", c)),
                ("name", "label".into()),
                ("region", "upper(country)".into()),
                ("latitude", "lat".into()),
                ("longitude", "lng".into()),
            ]
        },
    },
    Query {
        id: "offers/public.promo",
        from: "public.promo",
        reads: &[
            "id",
            "merchant_id",
            "title",
            "kind",
            "amount",
            "country",
            "days",
            "outlet_ids",
            "valid_from",
            "enabled",
            "modified_at",
        ],
        fields: |c| {
            vec![
                ("offer_id", u5("offers", "id", c)),
                ("shop_id", u5("shops", "merchant_id", c)),
                ("name", "title".into()),
                ("type", "kind::text".into()),
                ("value", "amount".into()),
                ("region", "upper(country)".into()),
                ("allowed_days", csv("days", "x")),
                (
                    "allowed_branches",
                    csv("outlet_ids", &u5("branches", "x", c)),
                ),
                ("allowed_from", tstz("valid_from")),
                ("is_enabled", "enabled".into()),
            ]
        },
    },
    Query {
        id: "shop-categories/public.merchant_genre",
        from: "public.merchant_genre",
        reads: &["id", "merchant_id", "genre_id", "country", "modified_at"],
        fields: |c| {
            vec![
                ("shop_category_id", u5("shop-categories", "id", c)),
                ("shop_id", u5("shops", "merchant_id", c)),
                ("category_id", u5("categories", "genre_id", c)),
                ("region", "upper(country)".into()),
            ]
        },
    },
    Query {
        id: "shop-tags/public.merchant_tag",
        from: "public.merchant_tag",
        reads: &["id", "merchant_id", "tag_id", "modified_at"],
        fields: |c| {
            vec![
                ("shop_tag_id", u5("shop-tags", "id", c)),
                ("shop_id", u5("shops", "merchant_id", c)),
                ("tag_id", u5("tags", "tag_id", c)),
            ]
        },
    },
    Query {
        id: "shop-keywords/public.merchant_term",
        from: "public.merchant_term",
        reads: &["id", "merchant_id", "term_id", "modified_at"],
        fields: |c| {
            vec![
                ("shop_keyword_id", u5("shop-keywords", "id", c)),
                ("shop_id", u5("shops", "merchant_id", c)),
                ("keyword_id", u5("keywords", "term_id", c)),
            ]
        },
    },
    Query {
        id: "student-favourites/public.favourite",
        from: "public.favourite",
        reads: &["id", "member_id", "merchant_id", "modified_at"],
        fields: |c| {
            vec![
                ("favourite_id", u5("student-favourites", "id", c)),
                ("student_id", u5("customers", "member_id", c)),
                ("shop_id", u5("shops", "merchant_id", c)),
            ]
        },
    },
    Query {
        id: "transactions/public.purchase",
        from: "public.purchase",
        reads: &[
            "id",
            "member_id",
            "merchant_id",
            "promo_id",
            "outlet_id",
            "country",
            "channel",
            "saved",
            "total",
            "modified_at",
        ],
        fields: |c| {
            vec![
                ("transaction_id", u5("transactions", "id", c)),
                ("student_id", u5("customers", "member_id", c)),
                ("shop_id", u5("shops", "merchant_id", c)),
                ("offer_id", u5("offers", "promo_id", c)),
                ("branch_id", u5("branches", "outlet_id", c)),
                ("region", "upper(country)".into()),
                ("source", "channel".into()),
                ("savings", "saved".into()),
                ("amount", "total".into()),
                ("updated", tstz("modified_at")),
            ]
        },
    },
    Query {
        id: "user-interactions/public.event_log",
        from: "public.event_log",
        reads: &[
            "kind",
            "member_id",
            "item_kind",
            "item_ref",
            "platform",
            "happened_at",
            "modified_at",
        ],
        fields: |c| {
            vec![
                ("interaction_type", "kind".into()),
                ("student_id", u5("customers", "member_id", c)),
                ("item_type", "item_kind".into()),
                ("item_id", item_uuid("item_kind", "item_ref", c)),
                ("platform", "platform".into()),
                ("event_timestamp", epoch_ms("happened_at")),
            ]
        },
    },
];

/// What Cobi should hold: every source row mapped, by type and key,
/// computed in SQL by the oracle (never by the product's mapping code).
pub async fn expected(settings: &Settings, client: &tokio_postgres::Client) -> Holdings {
    oracle::expected(settings, client).await
}

/// What the mock holds, in the same shape (numbers with their digits).
pub fn actual(mock: &MockServer) -> Holdings {
    oracle::actual(mock)
}

/// Compares the source's current state with the mock: keys the source no
/// longer has must be soft-deleted at the mock; interactions are compared
/// as multisets.
pub fn compare(expected: &Holdings, actual: &Holdings) -> Diff {
    oracle::compare(expected, actual)
}

/// Asserts the mock holds exactly the source's current state.
pub async fn assert_in_sync(
    settings: &Settings,
    client: &tokio_postgres::Client,
    mock: &MockServer,
) -> Diff {
    let d = compare(&expected(settings, client).await, &actual(mock));
    assert!(d.is_clean(), "source and mock differ: {}", d.report());
    d
}

/// Waits until the mock holds exactly the source's state (no duplicated
/// interaction either).
pub async fn wait_in_sync(
    settings: &Settings,
    client: &tokio_postgres::Client,
    mock: &MockServer,
    timeout: std::time::Duration,
    log: &std::path::Path,
) -> Diff {
    wait(settings, client, mock, timeout, log, 0, Diff::is_clean).await
}

/// As [`wait_in_sync`], for tests that kill the daemon or drop connections:
/// an interaction re-sent after an unconfirmed delivery may be stored twice
/// (at-least-once, README). Duplicates are in the returned diff.
pub async fn wait_in_sync_at_least_once(
    settings: &Settings,
    client: &tokio_postgres::Client,
    mock: &MockServer,
    timeout: std::time::Duration,
    log: &std::path::Path,
) -> Diff {
    wait(
        settings,
        client,
        mock,
        timeout,
        log,
        0,
        Diff::is_clean_at_least_once,
    )
    .await
}

/// Waits until the mock holds the source's state except exactly the
/// records in `absent` (named as [`Diff::missing`] names them: `<type>
/// <key>`), which must be missing — the dead letters. Nothing else may be
/// missing, different, extra or duplicated.
pub async fn wait_in_sync_except(
    settings: &Settings,
    client: &tokio_postgres::Client,
    mock: &MockServer,
    timeout: std::time::Duration,
    log: &std::path::Path,
    absent: &std::collections::BTreeSet<String>,
) -> Diff {
    wait(
        settings,
        client,
        mock,
        timeout,
        log,
        absent.len(),
        |d: &Diff| {
            let missing: std::collections::BTreeSet<String> = d.missing.iter().cloned().collect();
            missing == *absent
                && missing.len() == d.missing.len()
                && d.different.is_empty()
                && d.extra.is_empty()
                && d.duplicates.is_empty()
        },
    )
    .await
}

/// `<type> <uuid5>` of each value `values_sql` returns: how [`Diff`] names
/// records keyed by `uuid5` of those source values.
pub async fn uuid5_labels(
    settings: &Settings,
    client: &tokio_postgres::Client,
    ty: &str,
    values_sql: &str,
) -> std::collections::BTreeSet<String> {
    oracle::uuid5_labels(settings, client, ty, values_sql).await
}

/// Polls until `clean` holds for the comparison of the source with the
/// mock. The full comparison runs only once the mock holds enough records
/// (short of at most `slack`), and the pause between rounds grows with
/// what a round costs, so that the oracle never takes more than about a
/// third of the machine from the daemon under test.
async fn wait(
    settings: &Settings,
    client: &tokio_postgres::Client,
    mock: &MockServer,
    timeout: std::time::Duration,
    log: &std::path::Path,
    slack: usize,
    clean: impl Fn(&Diff) -> bool,
) -> Diff {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let round = std::time::Instant::now();
        if oracle::counts_reached(settings, client, mock, slack).await {
            let d = compare(&expected(settings, client).await, &actual(mock));
            if clean(&d) {
                return d;
            }
        }
        if std::time::Instant::now() > deadline {
            let d = compare(&expected(settings, client).await, &actual(mock));
            if clean(&d) {
                return d;
            }
            panic!(
                "not in sync after {timeout:?}: {}\n--- daemon log tail ---\n{}",
                d.report(),
                tail(&std::fs::read_to_string(log).unwrap_or_default(), 60)
            );
        }
        let pause = (round.elapsed() * 2).max(std::time::Duration::from_millis(300));
        tokio::time::sleep(pause).await;
    }
}

/// The last `n` lines of a text.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---- partner-shaped fixtures ----------------------------------------------

/// Tables shaped like partners' rather than like the product's fast
/// paths: a text primary key in a non-`public` schema with a mixed-case
/// table and column name (`crm."Shop"`), UUID primary keys (sent as they
/// are, and through `uuid5`), a range-partitioned table with a composite
/// key (`booking`, partitions per year), a composite key with no
/// surrogate id (`favourite_pair`: Cobi's natural key), numerics with 30
/// significant digits, a `date` sent as a date-time, and REPLICA IDENTITY
/// FULL on some tables (`student`, `favourite_pair`) but not the others.
pub const SHAPED_SCHEMA: &str = r#"
CREATE SCHEMA crm;
CREATE TABLE crm."Shop" (code text PRIMARY KEY, "Name" text NOT NULL, country text NOT NULL,
    closed boolean NOT NULL DEFAULT false, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE public.student (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), no serial UNIQUE,
    account uuid NOT NULL DEFAULT gen_random_uuid(), country text NOT NULL, born date,
    updated_at timestamptz NOT NULL DEFAULT now());
ALTER TABLE public.student REPLICA IDENTITY FULL;
CREATE TABLE crm.branch (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), no serial UNIQUE,
    shop_code text NOT NULL, label text NOT NULL, country text NOT NULL, lat numeric,
    updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE public.booking (id uuid NOT NULL DEFAULT gen_random_uuid(), booked_on date NOT NULL,
    student uuid, shop_code text NOT NULL, branch uuid, country text NOT NULL, amount numeric NOT NULL,
    saved numeric(12,2) NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, booked_on)) PARTITION BY RANGE (booked_on);
CREATE TABLE public.booking_2024 PARTITION OF public.booking FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE public.booking_2025 PARTITION OF public.booking FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE public.favourite_pair (student uuid NOT NULL, shop_code text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (student, shop_code));
ALTER TABLE public.favourite_pair REPLICA IDENTITY FULL;
"#;

/// The mapped tables of [`SHAPED_SCHEMA`], as SQL names (for GRANTs and
/// the publication).
pub const SHAPED_TABLES: &[&str] = &[
    "crm.\"Shop\"",
    "public.student",
    "crm.branch",
    "public.booking",
    "public.favourite_pair",
];

/// `n` rows per table of [`SHAPED_SCHEMA`] (bookings in both partitions;
/// every tenth amount with 30 significant digits), plus a shop whose key
/// is not ASCII.
pub fn shaped_seed_sql(n: usize) -> String {
    format!(
        r#"
INSERT INTO crm."Shop" (code, "Name", country)
  SELECT 'SHOP-' || lpad(g::text, 4, '0'), 'Shop ' || g || ' Zoë', (ARRAY['gb','fr','de'])[1 + g % 3] FROM generate_series(1, {n}) g;
INSERT INTO crm."Shop" (code, "Name", country) VALUES ('café-ü 1', 'Unicode key', 'fr');
INSERT INTO public.student (country, born) SELECT (ARRAY['gb','fr'])[1 + g % 2], DATE '2001-01-01' + g FROM generate_series(1, {n}) g;
INSERT INTO crm.branch (shop_code, label, country, lat)
  SELECT 'SHOP-' || lpad((1 + g % {n})::text, 4, '0'), 'Branch ' || g, 'gb', 51.5 + g / 1000.0 FROM generate_series(1, {n}) g;
INSERT INTO public.booking (student, shop_code, branch, country, amount, saved, booked_on)
  SELECT s.id, b.shop_code, b.id, 'gb',
         CASE WHEN g % 10 = 0 THEN 1234567890123456789012345678.91 + g ELSE 10 + g % 50 + 0.5 END,
         g % 3, DATE '2024-06-01' + (g * 7) % 400
  FROM generate_series(1, {n}) g JOIN public.student s ON s.no = 1 + g % {n} JOIN crm.branch b ON b.no = 1 + (g * 3) % {n};
INSERT INTO public.favourite_pair (student, shop_code)
  SELECT s.id, 'SHOP-' || lpad((1 + (g * 5) % {n})::text, 4, '0') FROM generate_series(1, {n}) g JOIN public.student s ON s.no = g;
INSERT INTO public.favourite_pair (student, shop_code) SELECT id, 'café-ü 1' FROM public.student WHERE no = 1;
"#
    )
}

/// Mappings of [`SHAPED_SCHEMA`] (cursors for poll mode; replication mode
/// ignores them).
pub const SHAPED_MAPPINGS: &str = r#"
[[mapping]]
type = "shops"
table = "crm.Shop"
cursor = "updated_at"
[mapping.fields]
shop_id = { column = "code", transform = "uuid5" }
name = "Name"
region = { column = "country", transform = "upper" }
is_deleted = "closed"
updated = "updated_at"

[[mapping]]
type = "customers"
table = "public.student"
cursor = "updated_at"
[mapping.fields]
customer_id = "id"
user_id = "account"
birthdate = "born"
region = { column = "country", transform = "upper" }
updated = "updated_at"

[[mapping]]
type = "branches"
table = "crm.branch"
cursor = "updated_at"
[mapping.fields]
branch_id = { column = "id", transform = "uuid5" }
shop_id = { column = "shop_code", transform = "uuid5:shops" }
name = "label"
region = { column = "country", transform = "upper" }
latitude = "lat"

[[mapping]]
type = "transactions"
table = "public.booking"
cursor = "updated_at"
[mapping.fields]
transaction_id = "id"
student_id = "student"
shop_id = { column = "shop_code", transform = "uuid5:shops" }
branch_id = { column = "branch", transform = "uuid5:branches" }
region = { column = "country", transform = "upper" }
amount = "amount"
savings = "saved"
created = { column = "booked_on", transform = "datetime" }
updated = "updated_at"

[[mapping]]
type = "student-favourites"
table = "public.favourite_pair"
cursor = "updated_at"
[mapping.fields]
student_id = "student"
shop_id = { column = "shop_code", transform = "uuid5:shops" }
updated = "updated_at"
"#;

/// A fresh PostgreSQL with [`SHAPED_SCHEMA`] and `n` seeded rows per table.
pub async fn start_shaped_db(n: usize) -> crate::common::Db {
    let db = crate::common::Db::start().await;
    db.exec(SHAPED_SCHEMA).await;
    db.exec(&shaped_seed_sql(n)).await;
    db
}

/// Numbers at the edges: numerics with 30 significant digits (with and
/// without REPLICA IDENTITY FULL, for soft deletes built from the old row
/// or from what was last sent) and `real` values.
pub const NUMBERS_SCHEMA: &str = r#"
CREATE TABLE public.store (id int PRIMARY KEY, name text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE public.place (id int PRIMARY KEY, store int NOT NULL, lat numeric NOT NULL, lng real,
    updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE public.place_full (LIKE public.place INCLUDING ALL);
ALTER TABLE public.place_full REPLICA IDENTITY FULL;
INSERT INTO public.store (id, name) VALUES (1, 'Numbers');
"#;

/// Mappings of [`NUMBERS_SCHEMA`] (a constant region and name too).
pub const NUMBERS_MAPPINGS: &str = r#"
[[mapping]]
type = "shops"
table = "public.store"
cursor = "updated_at"
[mapping.fields]
shop_id = { column = "id", transform = "uuid5" }
name = "name"
region = { value = "GB" }

[[mapping]]
type = "branches"
table = "public.place"
cursor = "updated_at"
[mapping.fields]
branch_id = { column = "id", transform = "uuid5" }
shop_id = { column = "store", transform = "uuid5:shops" }
name = { value = "Place" }
region = { value = "GB" }
latitude = "lat"
longitude = "lng"

[[mapping]]
type = "branches"
table = "public.place_full"
cursor = "updated_at"
[mapping.fields]
branch_id = { column = "id", transform = "uuid5" }
shop_id = { column = "store", transform = "uuid5:shops" }
name = { value = "Place" }
region = { value = "GB" }
latitude = "lat"
longitude = "lng"
"#;

fn place_fields(c: &Ctx) -> Vec<(&'static str, String)> {
    vec![
        ("branch_id", u5("branches", "id", c)),
        ("shop_id", u5("shops", "store", c)),
        ("name", "'Place'".into()),
        ("region", "'GB'".into()),
        ("latitude", "lat".into()),
        ("longitude", "lng".into()),
    ]
}

/// Oracle queries of the partner-shaped fixtures.
pub static SHAPED_QUERIES: &[Query] = &[
    Query {
        id: "shops/public.store",
        from: "public.store",
        reads: &["id", "name", "updated_at"],
        fields: |c| {
            vec![
                ("shop_id", u5("shops", "id", c)),
                ("name", "name".into()),
                ("region", "'GB'".into()),
            ]
        },
    },
    Query {
        id: "branches/public.place",
        from: "public.place",
        reads: &["id", "store", "lat", "lng", "updated_at"],
        fields: place_fields,
    },
    Query {
        id: "branches/public.place_full",
        from: "public.place_full",
        reads: &["id", "store", "lat", "lng", "updated_at"],
        fields: place_fields,
    },
    Query {
        id: "shops/crm.Shop",
        from: "crm.\"Shop\"",
        reads: &["code", "Name", "country", "closed", "updated_at"],
        fields: |c| {
            vec![
                ("shop_id", u5("shops", "code", c)),
                ("name", "\"Name\"".into()),
                ("region", "upper(country)".into()),
                ("is_deleted", "closed".into()),
                ("updated", tstz("updated_at")),
            ]
        },
    },
    Query {
        id: "customers/public.student",
        from: "public.student",
        reads: &["id", "account", "born", "country", "updated_at"],
        fields: |_| {
            vec![
                ("customer_id", "id::text".into()),
                ("user_id", "account::text".into()),
                ("birthdate", date("born")),
                ("region", "upper(country)".into()),
                ("updated", tstz("updated_at")),
            ]
        },
    },
    Query {
        id: "branches/crm.branch",
        from: "crm.branch",
        reads: &["id", "shop_code", "label", "country", "lat", "updated_at"],
        fields: |c| {
            vec![
                ("branch_id", u5("branches", "id", c)),
                ("shop_id", u5("shops", "shop_code", c)),
                ("name", "label".into()),
                ("region", "upper(country)".into()),
                ("latitude", "lat".into()),
            ]
        },
    },
    Query {
        id: "transactions/public.booking",
        from: "public.booking",
        reads: &[
            "id",
            "student",
            "shop_code",
            "branch",
            "country",
            "amount",
            "saved",
            "booked_on",
            "updated_at",
        ],
        fields: |c| {
            vec![
                ("transaction_id", "id::text".into()),
                ("student_id", "student::text".into()),
                ("shop_id", u5("shops", "shop_code", c)),
                ("branch_id", u5("branches", "branch", c)),
                ("region", "upper(country)".into()),
                ("amount", "amount".into()),
                ("savings", "saved".into()),
                ("created", naive("booked_on::timestamp", c)),
                ("updated", tstz("updated_at")),
            ]
        },
    },
    Query {
        id: "student-favourites/public.favourite_pair",
        from: "public.favourite_pair",
        reads: &["student", "shop_code", "updated_at"],
        fields: |c| {
            vec![
                ("student_id", "student::text".into()),
                ("shop_id", u5("shops", "shop_code", c)),
                ("updated", tstz("updated_at")),
            ]
        },
    },
];
