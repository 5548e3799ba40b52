//! Bad input never panics: a corpus of malformed configurations and
//! mappings (exit 2 with a message), and property tests ("fuzzing") of the
//! configuration loader. The mapping engine, the pgoutput decoder and the
//! value decoders have their own property tests next to their code.
//! Bad rows end to end: rows the daemon or the API must reject become
//! exactly the dead letters, against an API that names failing records and
//! one that does not (`--opaque-errors`), and everything else arrives.
//!
//! CI runs the default number of cases; a longer run:
//! `PROPTEST_CASES=100000 cargo test --release never_panic` (all fuzz targets).

use proptest::prelude::*;

use cobi_sync::config::load_str;

use std::time::Duration;

use crate::common::{dead_letters, mock, mock_opaque, run_cli, wait_until, Daemon, Workdir};
use crate::partner::{self, wait_in_sync_except};

const BASE: &str = r#"
[source]
url = "postgres://u@127.0.0.1:1/db"
mode = "poll"
[api]
base_url = "http://127.0.0.1:9"
[[mapping]]
type = "shops"
table = "merchant"
[mapping.fields]
shop_id = { column = "id", transform = "uuid5" }
name = "trade_name"
region = "country"
"#;

/// Each entry: a broken configuration and a fragment of the message.
fn corpus() -> Vec<(String, &'static str)> {
    let r = |from: &str, to: &str| BASE.replacen(from, to, 1);
    vec![
        (String::new(), "source.url: is required"),
        ("[source]\nurl = 42".into(), "source.url: not a URL"),
        ("[[mapping]]\n".into(), "mapping[0].type: is required"),
        ("not = [toml".into(), "cannot parse the file as TOML"),
        ("\u{0}\u{1}binary".into(), "cannot parse"),
        (r("mode = \"poll\"", "mode = 3"), "source.mode: `3` is not a mode"),
        (r("mode = \"poll\"", "mode = \"\""), "source.mode: `` is not a mode"),
        (r("[api]", "[api]\nconcurrency = -1"), "api.concurrency"),
        (r("[api]", "[api]\nconcurrency = 99999999999999999999"), "line 6"),
        (r("[api]", "[api]\nrequests_per_minute = -5"), "api.requests_per_minute"),
        (r("[api]", "[api]\ninitial_backoff = \"10m\"\nmax_backoff = \"1s\""), "api.initial_backoff: must not be longer"),
        (r("[api]", "[api]\ntimeout = \"0s\""), "api.timeout: `0s` must be longer than zero"),
        (r("base_url = \"http://127.0.0.1:9\"", "base_url = \"ftp://x\""), "api.base_url: scheme `ftp`"),
        (r("base_url = \"http://127.0.0.1:9\"", "base_url = \"::::\""), "api.base_url"),
        (r("[api]", "[api]\nbase_url = \"https://a\""), "duplicate key `base_url`"),
        (r("[api]", "[batch]\nmax_records = 0\n[api]"), "batch.max_records: 0 is out of range"),
        (r("[api]", "[batch]\nmax_bytes = \"12\"\n[api]"), "batch.max_bytes: 12 bytes is too small"),
        (r("[api]", "[batch]\nlinger = \"forever\"\n[api]"), "batch.linger"),
        (r("[api]", "[http]\nlisten = \"localhost\"\n[api]"), "http.listen"),
        (r("[api]", "[log]\nformat = \"xml\"\n[api]"), "log.format"),
        (r("[api]", "[log]\nlevel = \"loud[[\"\n[api]"), "log.level"),
        (r("[api]", "[ids]\nnamespace = \"not-a-uuid\"\n[api]"), "ids.namespace"),
        (r("[api]", "[source.poll]\npage_size = 0\n[api]"), "source.poll.page_size"),
        (r("[api]", "[source.poll]\nschedule = \"every minute\"\n[api]"), "source.poll.schedule"),
        (r("[api]", "[source.poll]\nschedule = \"61 * * * * *\"\n[api]"), "source.poll.schedule"),
        (r("[api]", "[source.replication]\nmax_slot_lag = \"lots\"\n[api]"), "source.replication.max_slot_lag"),
        (r("[api]", "[source.replication]\nsnapshot = \"sometimes\"\n[api]"), "source.replication.snapshot"),
        (r("[api]", "[source.replication]\npublication = \"\"\n[api]"), "source.replication.publication"),
        (r("url = \"postgres://u@127.0.0.1:1/db\"", "url = \"postgres://u@h:99999/db\""), "source.url"),
        (r("table = \"merchant\"", "table = \"a.b.c\""), "mapping[0].table"),
        (r("table = \"merchant\"", "table = \"merchant\"\nquery = \"SELECT 1\""), "set either `table` or `query`"),
        (r("table = \"merchant\"", "query = \"DELETE FROM x\"\nkey = [\"id\"]"), "must be a SELECT"),
        (r("table = \"merchant\"", "table = \"merchant\"\nkey = []"), "mapping[0].key"),
        (r("table = \"merchant\"", "table = \"merchant\"\non_delete = \"hard\""), "mapping[0].on_delete"),
        (r("table = \"merchant\"", "table = \"merchant\"\non_truncate = \"ignore\""), "mapping[0].on_truncate"),
        (r("table = \"merchant\"", "table = \"merchant\"\nreconcile = \"nightly\""), "mapping[0].reconcile"),
        (r("table = \"merchant\"", "table = \"merchant\"\ncursor = \"\""), "mapping[0].cursor"),
        (r("name = \"trade_name\"", "name = \"\""), "mapping[0].fields.name: column name is empty"),
        (r("name = \"trade_name\"", "name = 7"), "mapping[0].fields.name: must be a column name"),
        (r("name = \"trade_name\"", "name = [1, 2]"), "mapping[0].fields.name"),
        (r("name = \"trade_name\"", "name = { column = \"t\", transform = 5 }"), "mapping[0].fields.name: `transform` must be"),
        (r("name = \"trade_name\"", "name = { column = \"t\", transform = [\"upper\", 1] }"), "mapping[0].fields.name: `transform` list"),
        (r("name = \"trade_name\"", "name = { column = \"t\", map = { a = { b = 1 } } }"), "mapping[0].fields.name"),
        (r("name = \"trade_name\"", "name = { column = \"t\", default = { x = 1 } }"), "mapping[0].fields.name"),
        (r("name = \"trade_name\"", "name = { value = { x = 1 } }"), "mapping[0].fields.name"),
        (r("region = \"country\"", "region = { column = \"c\", transform = \"uuid5:item\" }"), "uuid5:item only applies"),
        (r("type = \"shops\"", "type = \"\""), "mapping[0].type: is required"),
        (r("type = \"shops\"", "type = \"Shops\""), "mapping[0].type: unknown Cobi type"),
        (format!("{BASE}\n{BASE}"), ""),
        (format!("{BASE}\n[[mapping]]\ntype = \"shops\"\ntable = \"merchant\"\n[mapping.fields]\nshop_id = \"id\"\nname = \"n\"\nregion = \"r\"\n"), "maps the same source to the same type"),
    ]
}

#[test]
fn malformed_configs_exit_2_with_a_message_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (text, want)) in corpus().into_iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, &text).unwrap();
        let (code, _, err) = run_cli(&["validate", "--config", path.to_str().unwrap()], &[]);
        assert_eq!(code, 2, "case {i} must exit 2:\n{text}\n---\n{err}");
        assert!(err.contains(want), "case {i}: want `{want}` in:\n{err}");
        assert!(!err.contains("panicked"), "case {i} panicked:\n{err}");
        assert!(err.lines().count() >= 2, "case {i}: no message:\n{err}");
    }
}

/// Arbitrary TOML-ish text built from config fragments.
fn config_text() -> impl Strategy<Value = String> {
    let frag = prop_oneof![
        Just("[source]\n".to_string()),
        Just("[api]\n".to_string()),
        Just("[batch]\n".to_string()),
        Just("[[mapping]]\n".to_string()),
        Just("[mapping.fields]\n".to_string()),
        "[a-z_]{1,12} = \"[ -~]{0,20}\"\n",
        "[a-z_]{1,12} = -?[0-9]{1,22}\n",
        "[a-z_]{1,12} = \\{ column = \"[a-z]{0,5}\", transform = \"[a-z0-9:_]{0,12}\" \\}\n",
        Just("type = \"shops\"\n".to_string()),
        Just("url = \"postgres://u@h/d\"\n".to_string()),
        "[ -~\n]{0,30}",
    ];
    proptest::collection::vec(frag, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        // CI's smoke run; `PROPTEST_CASES=100000` for a longer one.
        std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
    ))]

    #[test]
    fn config_loading_never_panics(text in config_text()) {
        match load_str(&text, "fuzz.toml") {
            Ok(_) => {}
            Err(e) => {
                prop_assert!(!e.errors.is_empty());
                for err in &e.errors {
                    prop_assert!(!err.key.is_empty() && !err.message.is_empty(), "{err:?}");
                }
            }
        }
    }
}

/// Three shops with an invalid region (the daemon dead-letters them) and,
/// for each, children the API must reject because their shop is unknown:
/// two branches, an offer, a transaction, a shop-category, a favourite.
const REJECTED_ROWS: &str = "
INSERT INTO merchant (trade_name, country) SELECT 'Rejected ' || g, 'germany' FROM generate_series(1, 3) g;
INSERT INTO outlet (merchant_id, label, country)
  SELECT m.id, 'Orphan ' || m.id || '/' || g, 'gb' FROM merchant m, generate_series(1, 2) g WHERE m.country = 'germany';
INSERT INTO promo (merchant_id, title, kind, amount, country, outlet_ids)
  SELECT m.id, 'Orphan promo', 'fixed', 5, 'gb', ARRAY(SELECT o.id FROM outlet o WHERE o.merchant_id = m.id)
  FROM merchant m WHERE m.country = 'germany';
INSERT INTO purchase (merchant_id, country, total) SELECT id, 'gb', 9.5 FROM merchant WHERE country = 'germany';
INSERT INTO merchant_genre (merchant_id, genre_id, country) SELECT id, 1, 'gb' FROM merchant WHERE country = 'germany';
INSERT INTO favourite (member_id, merchant_id) SELECT 1, id FROM merchant WHERE country = 'germany';
";

/// How the oracle names the rejected rows.
async fn rejected_labels(
    settings: &cobi_sync::config::Settings,
    client: &tokio_postgres::Client,
) -> std::collections::BTreeSet<String> {
    let bad = "SELECT id FROM merchant WHERE country = 'germany'";
    let mut out = std::collections::BTreeSet::new();
    for (ty, sql) in [
        ("shops", bad.to_string()),
        (
            "branches",
            format!("SELECT id FROM outlet WHERE merchant_id IN ({bad})"),
        ),
        (
            "offers",
            format!("SELECT id FROM promo WHERE merchant_id IN ({bad})"),
        ),
        (
            "transactions",
            format!("SELECT id FROM purchase WHERE merchant_id IN ({bad})"),
        ),
        (
            "shop-categories",
            format!("SELECT id FROM merchant_genre WHERE merchant_id IN ({bad})"),
        ),
        (
            "student-favourites",
            format!("SELECT id FROM favourite WHERE merchant_id IN ({bad})"),
        ),
    ] {
        out.extend(partner::uuid5_labels(settings, client, ty, &sql).await);
    }
    out
}

/// The rejected rows are dead letters, each with its reason; nothing else
/// is missing, different or extra at the mock.
async fn rejected_rows_end_as_exactly_the_dead_letters(mode: &str, opaque: bool) {
    let db = partner::start_db(60).await;
    db.exec(REJECTED_ROWS).await;
    let wd = Workdir::new();
    let mock = if opaque {
        mock_opaque().await
    } else {
        mock().await
    };
    let cfg = wd.config(&db.url(), &mock.base_url(), mode, partner::MAPPINGS);
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let client = db.client().await;
    let absent = rejected_labels(&settings, &client).await;
    assert_eq!(absent.len(), 21);
    let (d, _) = Daemon::start_with_http(&cfg, &wd.path("daemon.log"), "info").await;
    wait_in_sync_except(
        &settings,
        &client,
        &mock,
        Duration::from_secs(120),
        &d.log,
        &absent,
    )
    .await;
    // The rejected rows are absent from the start: the positive signal
    // is their dead letters (the orphans may still be on their way).
    wait_until(
        Duration::from_secs(60),
        "every rejected row dead-lettered",
        || {
            let done = dead_letters(&cfg).len() >= absent.len();
            async move { done }
        },
    )
    .await;
    // Whether the orphans reached the API (and got a 207/400 naming them,
    // or not) or were held back by the daemon, the outcome is the same.
    println!(
        "badinput/{mode} opaque={opaque}: {} records rejected by the API, answers {:?}",
        mock.stats().records_rejected.values().sum::<u64>(),
        mock.stats().requests_by_status
    );
    let rows = dead_letters(&cfg);
    drop(d);
    let letters: std::collections::BTreeSet<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["type"].as_str().unwrap(),
                r["cobi_key"].as_str().unwrap_or("?")
            )
        })
        .collect();
    assert_eq!(
        letters,
        absent,
        "dead letters (type key: reason): {:#?}",
        rows.iter()
            .map(|r| format!("{} {}: {}", r["type"], r["cobi_key"], r["reason"]))
            .collect::<Vec<_>>()
    );
    for r in &rows {
        let reason = r["reason"].as_str().unwrap_or_default();
        assert!(!reason.is_empty(), "a dead letter without a reason: {r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_rows_end_as_dead_letters_replication_naming_api() {
    rejected_rows_end_as_exactly_the_dead_letters("replication", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_rows_end_as_dead_letters_replication_opaque_api() {
    rejected_rows_end_as_exactly_the_dead_letters("replication", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_rows_end_as_dead_letters_poll_opaque_api() {
    rejected_rows_end_as_exactly_the_dead_letters("poll", true).await;
}
