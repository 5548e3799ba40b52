//! Every common PostgreSQL type, read back from a real server through both
//! wire forms (binary COPY, as snapshots and polls read; text, as pgoutput
//! sends), maps to the same valid Cobi records.

use cobi_sync::config::load_str;
use cobi_sync::mapping::decode::text::decode_text;
use cobi_sync::mapping::engine::MapContext;
use cobi_sync::mapping::value::Value;
use cobi_sync::model::record::Json;
use cobi_sync::model::validate::validate;
use cobi_sync::source::reader::{RowStream, SourceTable};

use crate::common::Db;

const SCHEMA: &str = r#"
CREATE TYPE channel AS ENUM ('web', 'in-store', 'app');
CREATE TABLE ledger (
    id          int8 PRIMARY KEY,
    ref         uuid NOT NULL,
    shop        int4 NOT NULL,
    label       text,
    label_short varchar(20),
    country     char(4),
    qty         int2,
    total       numeric(30, 10),
    saved       float8,
    ratio       float4,
    active      bool,
    born        date,
    at_local    timestamp,
    at_utc      timestamptz,
    meta        json,
    metab       jsonb,
    days        text[],
    outlets     int4[],
    via         channel
);
INSERT INTO ledger VALUES
 (1, '550E8400-E29B-41D4-A716-446655440000', 42, 'Café Zoë 東京 🎓', 'short', ' ca ', 3,
  12345678901234567890.1234567890, 0.25, 1.5, true, '2001-04-30', '2024-07-01 12:00:00.123456',
  '2024-01-02 03:04:05.654321+02', '{"a": [1, 2]}', '{"b": null}', '{monday,tuesday}', '{1,2,3}', 'in-store'),
 (2, '00000000-0000-0000-0000-000000000001', 7, NULL, NULL, 'us', NULL,
  1.5, 0, NULL, false, NULL, NULL, NULL, NULL, NULL, '{}', NULL, 'web'),
 (3, '00000000-0000-0000-0000-000000000002', 7, 'nan row', NULL, 'US', NULL,
  'NaN', 'Infinity', '-Infinity', NULL, 'infinity', 'infinity', '-infinity', NULL, NULL, NULL, NULL, 'app');
"#;

fn config(url: &str) -> cobi_sync::config::Settings {
    let text = format!(
        r#"
[source]
url = "{url}"
mode = "poll"
timezone = "Europe/Berlin"
[api]
base_url = "http://127.0.0.1:9"
[[mapping]]
type = "transactions"
table = "public.ledger"
[mapping.fields]
transaction_id = "ref"
shop_id = {{ column = "shop", transform = "uuid5:shops" }}
region = {{ column = "country", transform = ["trim", "upper"] }}
amount = "total"
savings = "saved"
discount_value = "ratio"
discount_name = "label"
discount_type = "via"
created = "at_local"
updated = "at_utc"
is_deleted = {{ column = "active", map = {{ "true" = false, "false" = true }} }}

[[mapping]]
type = "offers"
table = "public.ledger"
[mapping.fields]
offer_id = {{ column = "id", transform = "uuid5" }}
shop_id = {{ column = "shop", transform = "uuid5:shops" }}
name = "metab"
type = {{ column = "label_short", default = "fixed" }}
value = "qty"
region = {{ column = "country", transform = ["trim", "upper"] }}
allowed_days = "days"
allowed_branches = {{ column = "outlets", transform = ["uuid5:branches", "csv"] }}
allowed_from = {{ column = "born", transform = "datetime" }}
is_enabled = "active"

[[mapping]]
type = "customers"
table = "public.ledger"
[mapping.fields]
customer_id = "ref"
user_id = {{ column = "id", transform = "uuid5" }}
region = {{ column = "country", transform = ["trim", "upper"] }}
birthdate = "born"
gender = {{ column = "meta", transform = "string" }}
"#
    );
    load_str(&text, "types.toml").unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn every_type_maps_the_same_through_binary_and_text() {
    let db = Db::start().await;
    db.exec(SCHEMA).await;
    let settings = config(&db.url());
    let client = db.client().await;
    let ctx = MapContext::from_settings(&settings);
    let mut all = Vec::new();
    for m in &settings.mappings {
        let t = SourceTable::resolve(&client, m, ctx)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // Binary: the snapshot path.
        let mut rows = RowStream::start(&client, &t.key_chunk_sql(None, None), t.types())
            .await
            .unwrap();
        let binary = rows.next_batch(100).await.unwrap();
        assert_eq!(binary.len(), 3);
        // Text: what pgoutput sends (type output functions, same GUCs).
        let cols: Vec<String> = t.select.iter().map(|c| c.expr.clone()).collect();
        let sql = format!("SELECT {} FROM public.ledger ORDER BY id", cols.join(", "));
        let msgs = client.simple_query(&sql).await.unwrap();
        let text_rows: Vec<Vec<Value>> = msgs
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                    t.select
                        .iter()
                        .enumerate()
                        .map(|(i, c)| match r.get(i) {
                            None => Value::Null,
                            Some(s) => decode_text(&c.ty, s.as_bytes()).unwrap(),
                        })
                        .collect(),
                ),
                _ => None,
            })
            .collect();
        for (b, tx) in binary.iter().zip(&text_rows) {
            assert_eq!(b, tx, "binary and text decodes differ for {}", m.label());
            assert_eq!(t.compiled.map_row(b), t.compiled.map_row(tx));
        }
        all.push((
            m.ty,
            binary
                .iter()
                .map(|r| t.compiled.map_row(r))
                .collect::<Vec<_>>(),
        ));
    }
    let s = cobi_sync::model::schema::schema();
    let get = |ty: &str, row: usize, f: &str| -> Option<Json> {
        let (_, mapped) = all.iter().find(|(t, _)| s.ty(*t).name == ty).unwrap();
        mapped[row].record.get_named(f).cloned()
    };
    let str_ = |v: &str| Some(Json::Str(v.into()));
    // Row 1: every value converted.
    assert_eq!(
        get("transactions", 0, "transaction_id"),
        str_("550e8400-e29b-41d4-a716-446655440000")
    );
    assert_eq!(get("transactions", 0, "region"), str_("CA"));
    assert_eq!(
        get("transactions", 0, "amount"),
        Some(Json::Num("12345678901234567890.1234567890".into()))
    );
    assert_eq!(get("transactions", 0, "savings"), Some(Json::Float(0.25)));
    assert_eq!(
        get("transactions", 0, "discount_value"),
        Some(Json::Float(1.5))
    );
    assert_eq!(
        get("transactions", 0, "discount_name"),
        str_("Café Zoë 東京 🎓")
    );
    assert_eq!(get("transactions", 0, "discount_type"), str_("in-store"));
    assert_eq!(
        get("transactions", 0, "created"),
        str_("2024-07-01T10:00:00.123456Z"),
        "timestamp read in Europe/Berlin"
    );
    assert_eq!(
        get("transactions", 0, "updated"),
        str_("2024-01-02T01:04:05.654321Z")
    );
    assert_eq!(
        get("transactions", 0, "is_deleted"),
        Some(Json::Bool(false))
    );
    assert_eq!(get("offers", 0, "allowed_days"), str_("monday,tuesday"));
    let ns = settings.id_namespace;
    let b = |i: i64| {
        uuid::Uuid::new_v5(&ns, format!("branches:{i}").as_bytes())
            .hyphenated()
            .to_string()
    };
    assert_eq!(
        get("offers", 0, "allowed_branches"),
        str_(&format!("{},{},{}", b(1), b(2), b(3)))
    );
    assert_eq!(get("offers", 0, "name"), str_(r#"{"b": null}"#));
    assert_eq!(get("offers", 0, "type"), str_("short"));
    assert_eq!(get("offers", 0, "value"), Some(Json::Int(3)));
    assert_eq!(
        get("offers", 0, "allowed_from"),
        str_("2001-04-29T22:00:00.000000Z"),
        "a date is midnight in source.timezone"
    );
    assert_eq!(get("offers", 0, "is_enabled"), Some(Json::Bool(true)));
    assert_eq!(get("customers", 0, "birthdate"), str_("2001-04-30"));
    assert_eq!(get("customers", 0, "gender"), str_(r#"{"a": [1, 2]}"#));
    let shop = uuid::Uuid::new_v5(&ns, b"shops:42")
        .hyphenated()
        .to_string();
    assert_eq!(get("transactions", 0, "shop_id"), str_(&shop));
    // Row 1 is valid for every type.
    for (ty, mapped) in &all {
        assert!(
            mapped[0].problems.is_empty(),
            "{}: {:?}",
            s.ty(*ty).name,
            mapped[0].problems
        );
        assert_eq!(validate(&mapped[0].record), vec![], "{}", s.ty(*ty).name);
    }
    // Row 2: NULLs — nullable fields are null, others left out; defaults apply.
    assert_eq!(
        get("transactions", 1, "discount_name"),
        None,
        "not nullable: omitted"
    );
    assert_eq!(
        get("customers", 1, "birthdate"),
        Some(Json::Null),
        "nullable: null"
    );
    assert_eq!(get("offers", 1, "type"), str_("fixed"), "default");
    assert_eq!(get("offers", 1, "allowed_days"), str_(""));
    assert_eq!(get("offers", 1, "allowed_branches"), Some(Json::Null));
    let (_, tx) = all
        .iter()
        .find(|(t, _)| s.ty(*t).name == "transactions")
        .unwrap();
    assert!(
        validate(&tx[1].record).is_empty(),
        "{:?}",
        validate(&tx[1].record)
    );
    // Row 3: NaN, ±Infinity numerics and infinite dates are problems (dead
    // letters), never garbage.
    let reasons: Vec<String> = tx[2].problems.iter().map(|p| p.to_string()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("amount:") && r.contains("NaN")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.starts_with("savings:")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("created:") && r.contains("infinite")),
        "{reasons:?}"
    );
}
