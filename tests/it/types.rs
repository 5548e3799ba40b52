//! Every PostgreSQL type the product supports, end to end, against an
//! oracle written by hand: a table with a column of each type (integers,
//! `oid`, numeric (30 digits), `real`, `double precision`, `bool`, `text`,
//! `varchar`, `char(n)`, `"char"`, `name`, a domain, an enum, `uuid`,
//! `bytea`, `date`, `timestamp`, `timestamptz`, `json`, `jsonb`, `text[]`,
//! `int4[]`), rows with edge values (NULLs, NaN and ±infinity, non-ASCII
//! text, a `timestamp` in the repeated autumn hour and the skipped spring
//! hour of `source.timezone = "Europe/Berlin"`), mapped onto six Cobi
//! types and run through the real daemon:
//!
//! - replication mode: the rows present at start arrive through the
//!   initial snapshot (binary `COPY`), the same rows inserted once the
//!   snapshot is complete arrive through pgoutput (text);
//! - poll mode: the first read (binary `COPY`) and a later tick.
//!
//! The expected records ([`expected`]) are JSON written from PostgreSQL's
//! documented output (checked against what `psql` prints) and DESIGN §3's
//! rules; UUIDv5 ids come from the `uuid` crate (one value pinned to an
//! outside computation). What the mock stored is read as the exact text it
//! received and compared as exact decimals; the 30-digit numerics are also
//! compared digit for digit. Nothing here uses the product's mapping or
//! model code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use cobi_sync::mock_api::MockServer;
use serde_json::value::RawValue;

use crate::common::{dead_letters, mock, Daemon, Db, Workdir};
use crate::oracle::{self, Holdings};

/// `ids.namespace` of these tests.
const NS: &str = "3f0c2b7e-9d1a-4c55-8e61-2a7b9c0d4e5f";

const SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('online', 'in-store', 'ça va');
CREATE DOMAIN label AS varchar(60) CHECK (VALUE <> '');
CREATE TABLE kinds (
    id          int8 PRIMARY KEY,
    ref         uuid NOT NULL,
    shop        int4 NOT NULL,
    title       text NOT NULL,
    title_v     varchar(60),
    outlet      label NOT NULL,
    cc          char(4) NOT NULL,
    lat         int2,
    lng         oid,
    big         int8 NOT NULL,
    total       numeric NOT NULL,
    saved       float8 NOT NULL,
    ratio       real,
    active      bool,
    born        date,
    at_local    timestamp,
    at_utc      timestamptz,
    meta        json,
    metab       jsonb NOT NULL,
    days        text[],
    outlets     int4[],
    via         mood,
    kind        "char",
    nick        name,
    blob        bytea,
    modified_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
"#;

/// Five rows with ids `base + 1 ..= base + 5`:
/// 1. every value set (non-ASCII, 30-digit numeric, `real` 0.1, a float8
///    beyond its precision, microseconds, summer time, a leap day);
/// 2. NULL wherever the column allows, empty array and bytea, a JSON
///    scalar;
/// 3. the repeated autumn hour, tiny and huge numbers, a NULL array
///    element, an empty int array;
/// 4. the skipped spring hour, a negative `real`, a pre-1980 date;
/// 5. NaN and ±infinity (numeric, float8, real, date, timestamps) and a
///    NULL for a required field: dead letters, except for the two types
///    that do not read those columns.
fn rows_sql(base: i64) -> String {
    let id = |k: i64| base + k;
    let r = |k: i64| format!("'550E8400-E29B-41D4-A716-{:012}'", id(k));
    format!(
        r#"
INSERT INTO kinds (id, ref, shop, title, title_v, outlet, cc, lat, lng, big, total, saved, ratio,
                   active, born, at_local, at_utc, meta, metab, days, outlets, via, kind, nick, blob) VALUES
 ({i1}, {r1}, 1, 'Café Zoë 東京 🎓', 'say "hi" \ bye', 'Outlet α', ' ca ', -90, 180, 9007199254740993,
  12345678901234567890.1234567890, 123456789.123456789, 0.1,
  true, '2024-02-29', '2024-07-01 12:00:00.123456', '2024-01-02 03:04:05.654321+02',
  '{{"b": null, "a":  [1, 2.50]}}', '{{"b": null, "a":  [1, 2.50]}}', '{{monday,tuesday}}', '{{1,2}}',
  'ça va', 'x', 'percentage', '\xdeadbeef'),
 ({i2}, {r2}, 1, 'Plain', NULL, 'O', 'us', NULL, NULL, 1,
  1.50, 0, NULL,
  NULL, NULL, NULL, NULL,
  NULL, '"just text"', '{{}}', NULL,
  NULL, NULL, NULL, ''),
 ({i3}, {r3}, 1, 'Third', '', 'O3', 'GB', 45, 0, 1,
  0.000000000000000000000000000001, 1e-7, 3.4028235e38,
  false, '2024-03-31', '2024-10-27 02:30:00.000001', '1999-12-31 23:59:59.999999-08',
  '[]', '{{"deep": {{"ünï": "東京"}}}}', ARRAY['saturday', NULL, 'sunday'], '{{}}',
  'in-store', 'y', 'fixed', '\x00ff'),
 ({i4}, {r4}, 1, 'Fourth — ✓', NULL, 'O4', 'ca', 0, 7, 2,
  99999999999999999999999999999.9, 0.5, -0.25,
  true, '1970-01-01', '2024-03-31 02:30:00', '2024-03-31 01:00:00+00',
  'null', 'false', '{{ä}}', '{{2}}',
  'online', 'z', 'fixed', '\x41'),
 ({i5}, {r5}, 1, 'Infinite', NULL, 'O5', 'GB', 1, 1, 3,
  'Infinity', 'NaN', '-Infinity',
  NULL, 'infinity', '-infinity', 'infinity',
  NULL, '1', NULL, NULL,
  NULL, NULL, NULL, NULL);
"#,
        i1 = id(1),
        i2 = id(2),
        i3 = id(3),
        i4 = id(4),
        i5 = id(5),
        r1 = r(1),
        r2 = r(2),
        r3 = r(3),
        r4 = r(4),
        r5 = r(5),
    )
}

/// The mappings: six Cobi types from the one table, every column read by
/// at least one field. `cursor` is the poll cursor line (empty in
/// replication mode).
fn mappings(cursor: &str) -> String {
    format!(
        r#"
[ids]
namespace = "{NS}"

[[mapping]]
type = "shops"
table = "public.kinds"
{cursor}
[mapping.fields]
shop_id = {{ column = "id", transform = "uuid5" }}
name = "title"
region = {{ column = "cc", transform = ["trim", "upper"] }}
is_public = "active"
updated = "at_utc"

[[mapping]]
type = "customers"
table = "public.kinds"
{cursor}
[mapping.fields]
customer_id = "ref"
user_id = {{ column = "id", transform = "uuid5" }}
birthdate = "born"
region = {{ column = "cc", transform = ["trim", "upper"] }}
gender = "meta"

[[mapping]]
type = "transactions"
table = "public.kinds"
{cursor}
[mapping.fields]
transaction_id = "ref"
shop_id = {{ column = "shop", transform = "uuid5:shops" }}
region = {{ column = "cc", transform = ["trim", "upper"] }}
amount = "total"
savings = "saved"
discount_value = "ratio"
discount_name = "title_v"
discount_type = "nick"
source = "via"
created = "at_local"
updated = "at_utc"

[[mapping]]
type = "offers"
table = "public.kinds"
{cursor}
[mapping.fields]
offer_id = {{ column = "id", transform = "uuid5" }}
shop_id = {{ column = "shop", transform = "uuid5:shops" }}
name = "metab"
type = {{ column = "kind", default = "fixed" }}
value = "big"
region = {{ column = "cc", transform = ["trim", "upper"] }}
allowed_days = {{ column = "days", transform = "csv" }}
allowed_branches = {{ column = "outlets", transform = ["uuid5:branches", "csv"] }}
allowed_from = {{ column = "born", transform = "datetime" }}
is_enabled = "active"

[[mapping]]
type = "branches"
table = "public.kinds"
{cursor}
[mapping.fields]
branch_id = {{ column = "id", transform = "uuid5" }}
shop_id = {{ column = "shop", transform = "uuid5:shops" }}
name = "outlet"
region = {{ column = "cc", transform = ["trim", "upper"] }}
latitude = "lat"
longitude = "lng"

[[mapping]]
type = "tags"
table = "public.kinds"
{cursor}
[mapping.fields]
tag_id = {{ column = "id", transform = "uuid5" }}
name = "blob"
"#
    )
}

/// `UUIDv5(NS, "<type>:<value>")` (DESIGN §3), computed with the `uuid`
/// crate.
fn u5(ty: &str, value: i64) -> String {
    let ns = uuid::Uuid::parse_str(NS).unwrap();
    uuid::Uuid::new_v5(&ns, format!("{ty}:{value}").as_bytes())
        .hyphenated()
        .to_string()
}

/// The `ref` column of row `id`, as the API gets it (lower case).
fn ref_of(id: i64) -> String {
    format!("550e8400-e29b-41d4-a716-{id:012}")
}

/// What the mock must hold for the rows of [`rows_sql`]`(base)`: `(type,
/// JSON)`, written by hand. Numbers as PostgreSQL prints them (`real` 0.1
/// is `0.1`; float8 `123456789.123456789` is `123456789.12345679`);
/// `timestamp` read in Europe/Berlin as PostgreSQL reads it (`AT TIME
/// ZONE`: the repeated 02:30 is the second one, CET; the skipped 02:30 is
/// taken with the offset before the jump, CET); a date for a date-time is
/// midnight there; json text as stored, jsonb as PostgreSQL normalises it;
/// bytea in hex output form; NULL is `null` where the field is nullable,
/// else left out, and `default` fills `type`.
fn expected(base: i64) -> Vec<(&'static str, String)> {
    let id = |k: i64| base + k;
    let shop1 = u5("shops", 1);
    // (Line breaks fall between fields: JSON whitespace, not data.)
    vec![
        // Row 1: every value.
        (
            "shops",
            format!(
                r#"{{"shop_id":"{}","name":"Café Zoë 東京 🎓","region":"CA","is_public":true,
                    "updated":"2024-01-02T01:04:05.654321Z"}}"#,
                u5("shops", id(1))
            ),
        ),
        (
            "customers",
            format!(
                r#"{{"customer_id":"{}","user_id":"{}","birthdate":"2024-02-29","region":"CA",
                    "gender":"{{\"b\": null, \"a\":  [1, 2.50]}}"}}"#,
                ref_of(id(1)),
                u5("customers", id(1))
            ),
        ),
        (
            "transactions",
            format!(
                r#"{{"transaction_id":"{}","shop_id":"{shop1}","region":"CA",
                    "amount":12345678901234567890.1234567890,"savings":123456789.12345679,
                    "discount_value":0.1,"discount_name":"say \"hi\" \\ bye",
                    "discount_type":"percentage","source":"ça va",
                    "created":"2024-07-01T10:00:00.123456Z","updated":"2024-01-02T01:04:05.654321Z"}}"#,
                ref_of(id(1))
            ),
        ),
        (
            "offers",
            format!(
                r#"{{"offer_id":"{}","shop_id":"{shop1}","name":"{{\"a\": [1, 2.50], \"b\": null}}",
                    "type":"x","value":9007199254740993,"region":"CA","allowed_days":"monday,tuesday",
                    "allowed_branches":"{},{}","allowed_from":"2024-02-28T23:00:00.000000Z",
                    "is_enabled":true}}"#,
                u5("offers", id(1)),
                u5("branches", 1),
                u5("branches", 2)
            ),
        ),
        (
            "branches",
            format!(
                r#"{{"branch_id":"{}","shop_id":"{shop1}","name":"Outlet α","region":"CA",
                    "latitude":-90,"longitude":180}}"#,
                u5("branches", id(1))
            ),
        ),
        (
            "tags",
            format!(
                r#"{{"tag_id":"{}","name":"\\xdeadbeef"}}"#,
                u5("tags", id(1))
            ),
        ),
        // Row 2: NULLs (nullable: null; otherwise absent), empties.
        (
            "shops",
            format!(
                r#"{{"shop_id":"{}","name":"Plain","region":"US","is_public":null,"updated":null}}"#,
                u5("shops", id(2))
            ),
        ),
        (
            "customers",
            format!(
                r#"{{"customer_id":"{}","user_id":"{}","birthdate":null,"region":"US","gender":null}}"#,
                ref_of(id(2)),
                u5("customers", id(2))
            ),
        ),
        (
            "transactions",
            format!(
                r#"{{"transaction_id":"{}","shop_id":"{shop1}","region":"US","amount":1.50,
                    "savings":0,"source":null,"created":null,"updated":null}}"#,
                ref_of(id(2))
            ),
        ),
        (
            "offers",
            format!(
                r#"{{"offer_id":"{}","shop_id":"{shop1}","name":"\"just text\"","type":"fixed",
                    "value":1,"region":"US","allowed_days":"","allowed_branches":null,
                    "allowed_from":null}}"#,
                u5("offers", id(2))
            ),
        ),
        (
            "branches",
            format!(
                r#"{{"branch_id":"{}","shop_id":"{shop1}","name":"O","region":"US",
                    "latitude":null,"longitude":null}}"#,
                u5("branches", id(2))
            ),
        ),
        (
            "tags",
            format!(r#"{{"tag_id":"{}","name":"\\x"}}"#, u5("tags", id(2))),
        ),
        // Row 3: the repeated autumn hour, extreme numbers.
        (
            "shops",
            format!(
                r#"{{"shop_id":"{}","name":"Third","region":"GB","is_public":false,
                    "updated":"2000-01-01T07:59:59.999999Z"}}"#,
                u5("shops", id(3))
            ),
        ),
        (
            "customers",
            format!(
                r#"{{"customer_id":"{}","user_id":"{}","birthdate":"2024-03-31","region":"GB",
                    "gender":"[]"}}"#,
                ref_of(id(3)),
                u5("customers", id(3))
            ),
        ),
        (
            "transactions",
            format!(
                r#"{{"transaction_id":"{}","shop_id":"{shop1}","region":"GB",
                    "amount":0.000000000000000000000000000001,"savings":1e-7,
                    "discount_value":3.4028235e38,"discount_name":"","discount_type":"fixed",
                    "source":"in-store","created":"2024-10-27T01:30:00.000001Z",
                    "updated":"2000-01-01T07:59:59.999999Z"}}"#,
                ref_of(id(3))
            ),
        ),
        (
            "offers",
            format!(
                r#"{{"offer_id":"{}","shop_id":"{shop1}","name":"{{\"deep\": {{\"ünï\": \"東京\"}}}}",
                    "type":"y","value":1,"region":"GB","allowed_days":"saturday,sunday",
                    "allowed_branches":"","allowed_from":"2024-03-30T23:00:00.000000Z",
                    "is_enabled":false}}"#,
                u5("offers", id(3))
            ),
        ),
        (
            "branches",
            format!(
                r#"{{"branch_id":"{}","shop_id":"{shop1}","name":"O3","region":"GB",
                    "latitude":45,"longitude":0}}"#,
                u5("branches", id(3))
            ),
        ),
        (
            "tags",
            format!(r#"{{"tag_id":"{}","name":"\\x00ff"}}"#, u5("tags", id(3))),
        ),
        // Row 4: the skipped spring hour, a negative real, 1970 in CET.
        (
            "shops",
            format!(
                r#"{{"shop_id":"{}","name":"Fourth — ✓","region":"CA","is_public":true,
                    "updated":"2024-03-31T01:00:00.000000Z"}}"#,
                u5("shops", id(4))
            ),
        ),
        (
            "customers",
            format!(
                r#"{{"customer_id":"{}","user_id":"{}","birthdate":"1970-01-01","region":"CA",
                    "gender":"null"}}"#,
                ref_of(id(4)),
                u5("customers", id(4))
            ),
        ),
        (
            "transactions",
            format!(
                r#"{{"transaction_id":"{}","shop_id":"{shop1}","region":"CA",
                    "amount":99999999999999999999999999999.9,"savings":0.5,"discount_value":-0.25,
                    "discount_type":"fixed","source":"online",
                    "created":"2024-03-31T01:30:00.000000Z","updated":"2024-03-31T01:00:00.000000Z"}}"#,
                ref_of(id(4))
            ),
        ),
        (
            "offers",
            format!(
                r#"{{"offer_id":"{}","shop_id":"{shop1}","name":"false","type":"z","value":2,
                    "region":"CA","allowed_days":"ä","allowed_branches":"{}",
                    "allowed_from":"1969-12-31T23:00:00.000000Z","is_enabled":true}}"#,
                u5("offers", id(4)),
                u5("branches", 2)
            ),
        ),
        (
            "branches",
            format!(
                r#"{{"branch_id":"{}","shop_id":"{shop1}","name":"O4","region":"CA",
                    "latitude":0,"longitude":7}}"#,
                u5("branches", id(4))
            ),
        ),
        (
            "tags",
            format!(r#"{{"tag_id":"{}","name":"\\x41"}}"#, u5("tags", id(4))),
        ),
        // Row 5: only the types that read no non-finite value.
        (
            "branches",
            format!(
                r#"{{"branch_id":"{}","shop_id":"{shop1}","name":"O5","region":"GB",
                    "latitude":1,"longitude":1}}"#,
                u5("branches", id(5))
            ),
        ),
    ]
}

/// The dead letters of [`rows_sql`]`(base)`: `(type, source key, Cobi
/// key)` and the fields each reason must name.
fn expected_dead_letters(base: i64) -> BTreeMap<(String, String, String), Vec<&'static str>> {
    let id = base + 5;
    [
        ("shops", u5("shops", id), vec!["updated"]),
        ("customers", ref_of(id), vec!["birthdate"]),
        (
            "transactions",
            ref_of(id),
            vec!["amount", "savings", "discount_value", "created", "updated"],
        ),
        ("offers", u5("offers", id), vec!["allowed_from"]),
        ("tags", u5("tags", id), vec!["name"]),
    ]
    .into_iter()
    .map(|(ty, key, fields)| ((ty.to_string(), id.to_string(), key), fields))
    .collect()
}

/// The dead letters `dlq list --json` shows, by (type, source key, Cobi
/// key), with their reasons.
fn letters(cfg: &Path) -> BTreeMap<(String, String, String), String> {
    dead_letters(cfg)
        .into_iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            ((s("type"), s("source_key"), s("cobi_key")), s("reason"))
        })
        .collect()
}

/// Waits until the mock holds exactly `want` and the daemon has exactly
/// `dead` dead letters, each reason naming its fields; panics with the
/// differences after 90 s.
async fn wait_exact(
    mock: &MockServer,
    cfg: &Path,
    d: &Daemon,
    want: &Holdings,
    dead: &BTreeMap<(String, String, String), Vec<&'static str>>,
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let diff = oracle::compare(want, &oracle::actual(mock));
        let got = letters(cfg);
        let same_letters = got.keys().eq(dead.keys());
        if diff.is_clean() && same_letters {
            for (k, fields) in dead {
                for f in fields {
                    assert!(
                        got[k].contains(&format!("{f}:")),
                        "the dead letter {k:?} does not name `{f}`: {}",
                        got[k]
                    );
                }
            }
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "after 90 s the mock and the dead letters differ from the expectation:\n{}\n\
                 dead letters: {got:#?}\nwanted: {:#?}\n--- daemon log (tail) ---\n{}",
                diff.report(),
                dead.keys().collect::<Vec<_>>(),
                crate::partner::tail(&d.log_text(), 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The numbers of one stored record field, exactly as the mock received
/// them (the text the API got, before any parsing).
fn raw_numbers(mock: &MockServer, ty: &str, field: &str) -> BTreeSet<String> {
    mock.records_text(ty)
        .iter()
        .filter_map(|text| {
            let m: BTreeMap<String, Box<RawValue>> = serde_json::from_str(text).unwrap();
            m.get(field).map(|v| v.get().to_string())
        })
        .collect()
}

/// Runs the whole fixture through the daemon in `mode`: rows before the
/// start (snapshot / first read), then the same rows again with other ids
/// (stream / later tick).
async fn every_type_end_to_end(mode: &str) {
    let replication = mode == "replication";
    let db = Db::start().await;
    db.exec(SCHEMA).await;
    db.exec(&rows_sql(0)).await;
    let url = db.least_privilege_url(replication, &["public.kinds"]).await;
    if replication {
        db.publication("cobi_test", &["public.kinds"]).await;
    }
    let mock = mock().await;
    let wd = Workdir::new();
    let cursor = if replication {
        ""
    } else {
        "cursor = \"modified_at\""
    };
    let cfg = wd.config(&url, &mock.base_url(), mode, &mappings(cursor));
    let text = std::fs::read_to_string(&cfg).unwrap().replacen(
        &format!("mode = \"{mode}\""),
        &format!("mode = \"{mode}\"\ntimezone = \"Europe/Berlin\""),
        1,
    );
    std::fs::write(&cfg, text).unwrap();
    let log = wd.path("daemon.log");
    let (mut d, _) = Daemon::start_with_http(&cfg, &log, "info").await;

    // Rows present at start: binary COPY.
    let mut want = expected(0);
    let mut dead = expected_dead_letters(0);
    wait_exact(
        &mock,
        &cfg,
        &d,
        &Holdings::of_records(want.iter().map(|(t, j)| (*t, j.clone()))),
        &dead,
    )
    .await;

    if replication {
        // Once every table's snapshot is complete, new rows can only
        // arrive through pgoutput's text form.
        let done = || crate::common::log_lines(&log, "snapshot of the table complete").len() >= 6;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(
                Instant::now() < deadline,
                "the snapshot did not complete:\n{}",
                d.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The same values, inserted while the daemon runs.
    db.exec(&rows_sql(100)).await;
    want.extend(expected(100));
    dead.extend(expected_dead_letters(100));
    wait_exact(
        &mock,
        &cfg,
        &d,
        &Holdings::of_records(want.iter().map(|(t, j)| (*t, j.clone()))),
        &dead,
    )
    .await;

    // Every digit of the numerics, as sent.
    let amounts = raw_numbers(&mock, "transactions", "amount");
    for exact in [
        "12345678901234567890.1234567890",
        "99999999999999999999999999999.9",
        "1.50",
    ] {
        assert!(
            amounts.contains(exact),
            "{exact} not sent as such: {amounts:?}"
        );
    }
    assert!(
        raw_numbers(&mock, "offers", "value").contains("9007199254740993"),
        "int8 beyond 2^53 not exact"
    );
    assert_eq!(mock.stats().reference_failures, 0);
    assert!(d.term().await.success(), "{}", d.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_through_snapshot_and_stream_replication() {
    every_type_end_to_end("replication").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_through_first_read_and_ticks_poll() {
    every_type_end_to_end("poll").await;
}

/// The test's UUIDv5 helper agrees with an outside computation (Python's
/// `uuid.uuid5`), so the expectations above do not rest on one library.
#[test]
fn uuid5_helper_matches_an_independent_computation() {
    assert_eq!(u5("shops", 1), "49ea07f2-36e4-5354-8f7b-2bee63bd6bef");
    assert_eq!(u5("branches", 2), "35ae0fc4-fea8-5d13-98a0-c295407d3cf5");
    assert_eq!(u5("offers", 101), "9c1b38ca-c841-52e5-a061-ee42048c960f");
}
