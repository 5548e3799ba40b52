//! Table-driven tests of every transform and type conversion.

use serde_json::json;

use super::*;
use crate::config::{MappingSource, OnDelete, OnTruncate};
use crate::mapping::spec::parse_field_spec;

const NS: &str = "9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d";

fn ctx(tz: &str) -> MapContext {
    MapContext {
        namespace: Uuid::parse_str(NS).unwrap(),
        timezone: tz.parse().unwrap(),
    }
}

fn mapping(ty: &str, fields: &[(&str, serde_json::Value)]) -> MappingSettings {
    let t = schema().type_id(ty).unwrap();
    let mut fs: Vec<_> = fields
        .iter()
        .map(|(name, v)| {
            let f = schema().ty(t).field(name).unwrap();
            (f, parse_field_spec(v, t, f).unwrap())
        })
        .collect();
    fs.sort_by_key(|(f, _)| *f);
    MappingSettings {
        index: 0,
        id: format!("{ty}/public.src").into(),
        ty: t,
        source: MappingSource::Table {
            schema: "public".into(),
            name: "src".into(),
        },
        key: Some(vec!["id".into()]),
        cursor: None,
        on_delete: OnDelete::Soft,
        on_truncate: OnTruncate::Error,
        reconcile: None,
        fields: fs,
    }
}

fn col(name: &str, o: u32) -> Column {
    Column {
        name: name.into(),
        ty: PgType {
            oid: o,
            name: String::new(),
            elem: None,
        },
    }
}

/// Maps a single value in column `v` of type `o` to `field` of `ty` with
/// `spec`, returning the JSON text of the field (or `<absent>`) or the
/// problem.
fn one(ty: &str, field: &str, spec: serde_json::Value, o: u32, v: Value, tz: &str) -> String {
    let m = mapping(ty, &[(field, spec)]);
    let cols = [col("id", oid::INT4), col("v", o)];
    let c = match CompiledMapping::compile(&m, &["id".into()], &cols, ctx(tz)) {
        Ok(c) => c,
        Err(e) => return format!("compile: {}", e.join("; ")),
    };
    let out = c.map_row(&[Value::Int(1), v]);
    if let Some(p) = out.problems.first() {
        return format!("problem: {}", p.reason);
    }
    let f = schema().ty(c.ty).field(field).unwrap();
    match out.record.get(f) {
        None => "<absent>".into(),
        Some(j) => {
            let mut r = Record::new(c.ty);
            r.set(f, j.clone());
            let text = String::from_utf8(r.to_json()).unwrap();
            // {"field":VALUE} → VALUE
            text[field.len() + 4..text.len() - 1].to_string()
        }
    }
}

fn ts(s: &str) -> Value {
    Value::Timestamp(time::parse_pg_timestamp(s).unwrap())
}
fn tstz(s: &str) -> Value {
    Value::TimestampTz(time::parse_pg_timestamptz(s).unwrap())
}
fn text(s: &str) -> Value {
    Value::Text(s.into())
}

#[test]
fn type_conversions() {
    let u = Uuid::parse_str("550E8400-E29B-41D4-A716-446655440000").unwrap();
    #[rustfmt::skip]
    let cases: Vec<(&str, &str, serde_json::Value, u32, Value, &str, &str)> = vec![
        // uuid and text → string
        ("shops", "shop_id", json!("v"), oid::UUID, Value::Uuid(u), "UTC", r#""550e8400-e29b-41d4-a716-446655440000""#),
        ("shops", "shop_id", json!("v"), oid::TEXT, text("550E8400-E29B-41D4-A716-446655440000"), "UTC", r#""550e8400-e29b-41d4-a716-446655440000""#),
        ("shops", "shop_id", json!("v"), oid::TEXT, text("not-a-uuid"), "UTC", "problem: text is not a UUID"),
        ("shops", "name", json!("v"), oid::TEXT, text("Café Zoë 東京 🎓"), "UTC", r#""Café Zoë 東京 🎓""#),
        ("shops", "name", json!("v"), oid::VARCHAR, text("a\"b\\c"), "UTC", r#""a\"b\\c""#),
        ("shops", "name", json!("v"), oid::BPCHAR, text("padded   "), "UTC", r#""padded   ""#),
        ("shops", "name", json!("v"), oid::INT8, Value::Int(-42), "UTC", r#""-42""#),
        // integers, floats, numerics → number
        ("transactions", "amount", json!("v"), oid::INT2, Value::Int(7), "UTC", "7"),
        ("transactions", "amount", json!("v"), oid::INT8, Value::Int(9_007_199_254_740_993), "UTC", "9007199254740993"),
        ("transactions", "amount", json!("v"), oid::NUMERIC, Value::Numeric("12345678901234567890.12345678901234567890".into()), "UTC", "12345678901234567890.12345678901234567890"),
        ("transactions", "amount", json!("v"), oid::NUMERIC, Value::Numeric("12.50".into()), "UTC", "12.50"),
        ("transactions", "amount", json!("v"), oid::NUMERIC, Value::Numeric("NaN".into()), "UTC", "problem: NaN and infinity are not numbers the API accepts"),
        ("transactions", "amount", json!("v"), oid::NUMERIC, Value::Numeric("Infinity".into()), "UTC", "problem: NaN and infinity are not numbers the API accepts"),
        ("transactions", "amount", json!("v"), oid::NUMERIC, Value::Numeric("-Infinity".into()), "UTC", "problem: NaN and infinity are not numbers the API accepts"),
        ("transactions", "amount", json!("v"), oid::FLOAT8, Value::Float(0.1), "UTC", "0.1"),
        ("transactions", "amount", json!("v"), oid::FLOAT4, Value::Float(f64::NAN), "UTC", "problem: NaN and infinity are not numbers the API accepts"),
        ("transactions", "amount", json!("v"), oid::FLOAT8, Value::Float(f64::INFINITY), "UTC", "problem: NaN and infinity are not numbers the API accepts"),
        ("transactions", "amount", json!("v"), oid::TEXT, text("12"), "UTC", "compile: fields.amount: a text value cannot become field `amount`, a number: add transform = \"number\" to parse the text"),
        // bool → bool
        ("shops", "is_public", json!("v"), oid::BOOL, Value::Bool(true), "UTC", "true"),
        ("shops", "is_public", json!("v"), oid::TEXT, text("yes"), "UTC", "compile: fields.is_public: a text value cannot become field `is_public`, a boolean: map a boolean column, or use transform = \"is_not_null\""),
        // date → YYYY-MM-DD
        ("customers", "birthdate", json!("v"), oid::DATE, Value::Date(time::parse_pg_date("2001-04-30").unwrap()), "UTC", r#""2001-04-30""#),
        ("customers", "birthdate", json!("v"), oid::DATE, Value::Date(i32::MAX), "UTC", "problem: date or timestamp is infinite or outside years 1-9999"),
        ("customers", "birthdate", json!("v"), oid::TIMESTAMPTZ, tstz("2001-04-30 23:30:00+00"), "Asia/Tokyo", r#""2001-05-01""#),
        // timestamps → RFC 3339 UTC with microseconds
        ("shops", "created", json!("v"), oid::TIMESTAMPTZ, tstz("2024-01-02 03:04:05.123456+00"), "UTC", r#""2024-01-02T03:04:05.123456Z""#),
        ("shops", "created", json!("v"), oid::TIMESTAMP, ts("2024-07-01 12:00:00.5"), "Europe/Berlin", r#""2024-07-01T10:00:00.500000Z""#),
        ("shops", "created", json!("v"), oid::TIMESTAMP, ts("2024-01-01 12:00:00"), "America/New_York", r#""2024-01-01T17:00:00.000000Z""#),
        ("shops", "created", json!("v"), oid::DATE, Value::Date(time::parse_pg_date("2024-01-15").unwrap()), "Europe/Berlin", r#""2024-01-14T23:00:00.000000Z""#),
        ("shops", "created", json!("v"), oid::TIMESTAMPTZ, Value::TimestampTz(i64::MAX), "UTC", "problem: date or timestamp is infinite or outside years 1-9999"),
        ("shops", "created", json!("v"), oid::TIMESTAMP, Value::Timestamp(i64::MIN), "UTC", "problem: date or timestamp is infinite or outside years 1-9999"),
        ("shops", "created", json!("v"), oid::BOOL, Value::Bool(true), "UTC", "compile: fields.created: a boolean value cannot become field `created`, a string (date-time): map a timestamp, timestamptz or date column"),
        // NULL: nullable → null, otherwise omitted
        ("shops", "created", json!("v"), oid::TIMESTAMPTZ, Value::Null, "UTC", "null"),
        ("shops", "name", json!("v"), oid::TEXT, Value::Null, "UTC", "<absent>"),
        ("transactions", "discount_name", json!("v"), oid::TEXT, Value::Null, "UTC", "<absent>"),
        // json/jsonb and enums → string
        ("shops", "name", json!("v"), oid::JSONB, Value::Json(r#"{"a": 1}"#.into()), "UTC", r#""{\"a\": 1}""#),
        ("shops", "name", json!("v"), 90_001, text("enum_label"), "UTC", r#""enum_label""#),
        // arrays
        ("offers", "allowed_days", json!("v"), oid::TEXT_ARRAY, Value::Array(vec![text("monday"), text("tuesday")]), "UTC", r#""monday,tuesday""#),
        ("shops", "name", json!("v"), oid::TEXT_ARRAY, Value::Array(vec![text("a")]), "UTC", "compile: fields.name: a text[] value cannot become field `name`, a string: add transform = \"csv\" to join the array"),
        // integer → uuid needs uuid5
        ("shops", "shop_id", json!("v"), oid::INT4, Value::Int(1), "UTC", "compile: fields.shop_id: a integer value cannot become field `shop_id`, a string (uuid): derive a UUID with transform = \"uuid5\" (or \"uuid5:<type>\")"),
        // event_timestamp: integer or date-time
        ("interactions", "event_timestamp", json!("v"), oid::INT8, Value::Int(1_700_000_000_000), "UTC", "1700000000000"),
        ("interactions", "event_timestamp", json!("v"), oid::TIMESTAMPTZ, tstz("2024-01-02 03:04:05+00"), "UTC", r#""2024-01-02T03:04:05.000000Z""#),
    ];
    for (ty, field, spec, o, v, tz, want) in cases {
        let got = one(ty, field, spec.clone(), o, v.clone(), tz);
        assert_eq!(got, want, "{ty}.{field} {spec} from oid {o} value {v:?}");
    }
}

#[test]
fn transforms() {
    let ns = Uuid::parse_str(NS).unwrap();
    let expect_uuid = |ty: &str, text: &str| {
        format!(
            "\"{}\"",
            Uuid::new_v5(&ns, format!("{ty}:{text}").as_bytes()).hyphenated()
        )
    };
    #[rustfmt::skip]
    let cases: Vec<(&str, &str, serde_json::Value, u32, Value, String)> = vec![
        ("shops", "region", json!({"column": "v", "transform": "upper"}), oid::TEXT, text("ca"), r#""CA""#.into()),
        ("shops", "region", json!({"column": "v", "transform": "upper"}), oid::TEXT, text("straße"), r#""STRASSE""#.into()),
        ("shops", "name", json!({"column": "v", "transform": "lower"}), oid::TEXT, text("ÉCOLE"), r#""école""#.into()),
        ("shops", "name", json!({"column": "v", "transform": "trim"}), oid::BPCHAR, text("  x  "), r#""x""#.into()),
        ("shops", "region", json!({"column": "v", "transform": ["trim", "upper"]}), oid::BPCHAR, text(" us "), r#""US""#.into()),
        ("shops", "name", json!({"column": "v", "transform": "string"}), oid::NUMERIC, Value::Numeric("1.50".into()), r#""1.50""#.into()),
        ("shops", "name", json!({"column": "v", "transform": "string"}), oid::TIMESTAMPTZ, tstz("2024-01-02 03:04:05+00"), r#""2024-01-02T03:04:05.000000Z""#.into()),
        ("transactions", "amount", json!({"column": "v", "transform": "number"}), oid::TEXT, text(" 12.5 "), "12.5".into()),
        ("transactions", "amount", json!({"column": "v", "transform": "number"}), oid::TEXT, text(".5"), "0.5".into()),
        ("transactions", "amount", json!({"column": "v", "transform": "number"}), oid::TEXT, text("twelve"), "problem: transform `number`: text is not a number".into()),
        ("transactions", "amount", json!({"column": "v", "transform": "number"}), oid::TEXT, text("NaN"), "problem: transform `number`: text is not a number".into()),
        ("customers", "birthdate", json!({"column": "v", "transform": "date"}), oid::TEXT, text("2001-04-30"), r#""2001-04-30""#.into()),
        ("customers", "birthdate", json!({"column": "v", "transform": "date"}), oid::TIMESTAMP, ts("2001-04-30 23:59:59"), r#""2001-04-30""#.into()),
        ("shops", "created", json!({"column": "v", "transform": "datetime"}), oid::DATE, Value::Date(time::parse_pg_date("2024-03-01").unwrap()), r#""2024-03-01T00:00:00.000000Z""#.into()),
        ("shops", "created", json!({"column": "v", "transform": "datetime"}), oid::TEXT, text("2024-03-01 10:00:00+02"), r#""2024-03-01T08:00:00.000000Z""#.into()),
        ("interactions", "event_timestamp", json!({"column": "v", "transform": "epoch_ms"}), oid::TIMESTAMPTZ, tstz("1970-01-01 00:00:01.234+00"), "1234".into()),
        ("interactions", "event_timestamp", json!({"column": "v", "transform": "epoch_ms"}), oid::TIMESTAMPTZ, Value::TimestampTz(i64::MAX), "problem: transform `epoch_ms`: infinite timestamp".into()),
        ("shops", "is_deleted", json!({"column": "v", "transform": "is_not_null"}), oid::TIMESTAMPTZ, Value::Null, "false".into()),
        ("shops", "is_deleted", json!({"column": "v", "transform": "is_not_null"}), oid::TIMESTAMPTZ, tstz("2024-01-01 00:00:00+00"), "true".into()),
        ("shops", "is_public", json!({"column": "v", "transform": "is_null"}), oid::TEXT, Value::Null, "true".into()),
        ("offers", "allowed_days", json!({"column": "v", "transform": "csv"}), oid::TEXT_ARRAY, Value::Array(vec![text("mon"), Value::Null, text("tue")]), r#""mon,tue""#.into()),
        ("offers", "allowed_days", json!({"column": "v", "transform": ["upper", "csv"]}), oid::TEXT_ARRAY, Value::Array(vec![text("mon"), text("tue")]), r#""MON,TUE""#.into()),
        ("offers", "allowed_branches", json!({"column": "v", "transform": ["uuid5:branches", "csv"]}), oid::INT4_ARRAY, Value::Array(vec![Value::Int(1), Value::Int(2)]),
            format!("\"{},{}\"", expect_uuid("branches", "1").trim_matches('"'), expect_uuid("branches", "2").trim_matches('"'))),
        ("offers", "allowed_days", json!({"column": "v", "transform": "csv"}), oid::TEXT_ARRAY, Value::Array(vec![]), r#""""#.into()),
        ("shops", "shop_id", json!({"column": "v", "transform": "uuid5"}), oid::INT8, Value::Int(42), expect_uuid("shops", "42")),
        ("branches", "shop_id", json!({"column": "v", "transform": "uuid5:shops"}), oid::INT8, Value::Int(42), expect_uuid("shops", "42")),
        ("shops", "shop_id", json!({"column": "v", "transform": "uuid5"}), oid::TEXT, text("MER-7"), expect_uuid("shops", "MER-7")),
        ("shops", "shop_id", json!({"column": "v", "transform": "uuid5"}), oid::UUID, Value::Uuid(Uuid::parse_str("550E8400-E29B-41D4-A716-446655440000").unwrap()), expect_uuid("shops", "550e8400-e29b-41d4-a716-446655440000")),
        ("shops", "shop_id", json!({"column": "v", "transform": "uuid5"}), oid::INT8, Value::Null, "<absent>".into()),
        ("shops", "shop_id", json!({"column": "v", "transform": "upper"}), oid::INT8, Value::Int(1), "compile: fields.shop_id: transform `upper` does not apply to integer".into()),
        // map, then default
        ("customers", "gender", json!({"column": "v", "map": {"M": "male", "F": "female"}}), oid::BPCHAR, text("M"), r#""male""#.into()),
        ("customers", "gender", json!({"column": "v", "map": {"M": "male"}}), oid::BPCHAR, text("X"), r#""X""#.into()),
        ("customers", "gender", json!({"column": "v", "default": "unknown"}), oid::TEXT, Value::Null, r#""unknown""#.into()),
        ("customers", "gender", json!({"column": "v", "transform": "lower", "map": {"m": "male"}, "default": "n/a"}), oid::TEXT, text("M"), r#""male""#.into()),
        ("shops", "is_public", json!({"column": "v", "map": {"1": true, "0": false}}), oid::INT2, Value::Int(1), "true".into()),
        ("shops", "region", json!({"value": "CA"}), oid::TEXT, Value::Null, r#""CA""#.into()),
        ("shops", "is_public", json!({"value": "maybe"}), oid::TEXT, Value::Null, "compile: fields.is_public: a text value cannot become field `is_public`, a boolean: map a boolean column, or use transform = \"is_not_null\"".into()),
    ];
    for (ty, field, spec, o, v, want) in cases {
        let got = one(ty, field, spec.clone(), o, v.clone(), "UTC");
        assert_eq!(got, want, "{ty}.{field} {spec} value {v:?}");
    }
}

#[test]
fn uuid5_item_follows_item_type() {
    let m = mapping(
        "interactions",
        &[
            ("interaction_type", json!("kind")),
            (
                "item_type",
                json!({"column": "item_kind", "transform": "upper"}),
            ),
            (
                "item_id",
                json!({"column": "item", "transform": "uuid5:item"}),
            ),
            (
                "event_timestamp",
                json!({"column": "at", "transform": "epoch_ms"}),
            ),
        ],
    );
    let cols = [
        col("id", oid::INT4),
        col("kind", oid::TEXT),
        col("item_kind", oid::TEXT),
        col("item", oid::INT4),
        col("at", oid::TIMESTAMPTZ),
    ];
    let c = CompiledMapping::compile(&m, &["id".into()], &cols, ctx("UTC")).unwrap();
    let ns = Uuid::parse_str(NS).unwrap();
    for (kind, ty) in [
        ("offer", "offers"),
        ("tag", "tags"),
        ("shop", "shops"),
        ("keyword", "keywords"),
    ] {
        let row = [
            Value::Int(1),
            text("SHARE"),
            text(kind),
            Value::Int(7),
            Value::TimestampTz(1_000_000),
        ];
        let out = c.map_row(&row);
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        assert_eq!(
            out.record.get_named("item_id"),
            Some(&Json::Str(
                Uuid::new_v5(&ns, format!("{ty}:7").as_bytes())
                    .hyphenated()
                    .to_string()
                    .into()
            ))
        );
        assert_eq!(
            out.record.get_named("event_timestamp"),
            Some(&Json::Int(1000))
        );
    }
    let out = c.map_row(&[
        Value::Int(1),
        text("SHARE"),
        text("video"),
        Value::Int(7),
        Value::Null,
    ]);
    assert_eq!(out.problems[0].field, "item_id");
    assert!(
        out.problems[0].reason.contains("no parent type"),
        "{:?}",
        out.problems
    );
}

#[test]
fn source_keys_are_unambiguous() {
    let a = source_key([text("a|b"), text("c")].iter());
    let b = source_key([text("a"), text("b|c")].iter());
    assert_ne!(a, b);
    assert_eq!(source_key([Value::Int(42)].iter()), "42");
    assert_eq!(source_key([Value::Null].iter()), "\\N");
    assert_ne!(source_key([text("\\N")].iter()), "\\N");
}

#[test]
fn missing_columns_are_named() {
    let m = mapping("shops", &[("name", json!("trade_name"))]);
    let cols = [col("id", oid::INT4), col("title", oid::TEXT)];
    let err =
        CompiledMapping::compile(&m, &["id".into(), "pk2".into()], &cols, ctx("UTC")).unwrap_err();
    assert_eq!(
        err,
        vec![
            "key column `pk2` does not exist (columns: id, title)".to_string(),
            "fields.name: column `trade_name` does not exist (columns: id, title)".to_string(),
        ]
    );
}

#[test]
fn decimal_text_becomes_valid_json_numbers() {
    let cases: &[(&str, Option<&str>)] = &[
        ("12.50", Some("12.50")),
        ("0", Some("0")),
        ("00", Some("0")),
        ("007", Some("7")),
        ("-0012.5", Some("-12.5")),
        ("+5", Some("5")),
        (".5", Some("0.5")),
        ("-.5", Some("-0.5")),
        ("5.", Some("5")),
        ("1.e5", Some("1e5")),
        ("2.5E-3", Some("2.5e-3")),
        (" 42 ", Some("42")),
        (
            "123456789012345678901234567890.123456789",
            Some("123456789012345678901234567890.123456789"),
        ),
        ("", None),
        (".", None),
        ("-", None),
        ("1e", None),
        ("1e+", None),
        ("1.2.3", None),
        ("NaN", None),
        ("Infinity", None),
        ("-Infinity", None),
        ("1e999", None),
        ("0x10", None),
        ("1_000", None),
        ("１２", None),
    ];
    for (input, want) in cases {
        let got = parse_decimal(input);
        assert_eq!(got.as_deref(), *want, "{input:?}");
        if let Some(g) = got {
            let v: serde_json::Value =
                serde_json::from_str(&g).unwrap_or_else(|e| panic!("{input:?} -> {g}: {e}"));
            assert!(v.is_number(), "{input:?} -> {g}");
        }
    }
}

#[test]
fn reference_lists_hold_uuids() {
    let arr = |v: Vec<Value>| Value::Array(v);
    let cases = [
        // An int4[] without uuid5 is refused when the mapping compiles.
        (
            json!({"column": "v", "transform": "csv"}),
            oid::INT4_ARRAY,
            arr(vec![Value::Int(1), Value::Int(2)]),
            "compile: fields.allowed_branches: the elements are integers but must be UUIDs",
        ),
        (
            json!("v"),
            oid::INT4_ARRAY,
            arr(vec![Value::Int(1), Value::Int(2)]),
            "compile: fields.allowed_branches: the elements are integers but must be UUIDs",
        ),
        (
            json!({"column": "v", "transform": ["uuid5:branches", "csv"]}),
            oid::INT4_ARRAY,
            arr(vec![Value::Int(1)]),
            "\"",
        ),
    ];
    for (spec, o, v, want) in cases {
        let got = one("offers", "allowed_branches", spec.clone(), o, v, "UTC");
        assert!(got.starts_with(want), "{spec}: {got}");
    }
}

// ---- fuzzing: arbitrary values through every conversion ----------------

mod fuzz {
    use proptest::prelude::*;

    use super::super::*;

    fn any_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            any::<f64>().prop_map(Value::Float),
            "-?[0-9]{0,30}(\\.[0-9]{0,20})?|NaN|Infinity|-Infinity|garbage"
                .prop_map(|s| Value::Numeric(s.into())),
            any::<String>().prop_map(|s| Value::Text(s.into())),
            any::<u128>().prop_map(|u| Value::Uuid(uuid::Uuid::from_u128(u))),
            any::<i32>().prop_map(Value::Date),
            any::<i64>().prop_map(Value::Timestamp),
            any::<i64>().prop_map(Value::TimestampTz),
            "[ -~]{0,40}".prop_map(|s| Value::Json(s.into())),
        ];
        leaf.prop_recursive(2, 16, 4, |inner| {
            proptest::collection::vec(inner, 0..4).prop_map(Value::Array)
        })
    }

    /// A mapping of every interaction and transaction field, with transforms
    /// that exercise every conversion, applied to arbitrary values.
    fn fuzz_mappings() -> Vec<CompiledMapping> {
        let text = r#"
    [source]
    url = "postgres://u@h/d"
    mode = "poll"
    timezone = "America/Sao_Paulo"
    [api]
    base_url = "http://127.0.0.1:9"
    [[mapping]]
    type = "transactions"
    table = "t"
    key = ["a"]
    [mapping.fields]
    transaction_id = { column = "a", transform = "uuid5" }
    shop_id = { column = "b", transform = ["trim", "uuid5:shops"] }
    region = { column = "c", transform = ["trim", "upper"], map = { "UK" = "GB" }, default = "GB" }
    amount = { column = "d", transform = "number" }
    savings = { column = "e", transform = "number" }
    created = { column = "f", transform = "datetime" }
    updated = "g"
    source = { column = "h", transform = "string" }
    discount_name = { column = "i", transform = "csv" }
    is_deleted = { column = "j", transform = "is_not_null" }
    [[mapping]]
    type = "interactions"
    table = "u"
    key = ["a"]
    [mapping.fields]
    interaction_type = { column = "c", transform = "upper" }
    item_type = { column = "h", transform = "upper" }
    item_id = { column = "a", transform = "uuid5:item" }
    event_timestamp = { column = "f", transform = "epoch_ms" }
    city = { column = "g", transform = "string" }
    student_id = { column = "b", transform = "uuid5:customers" }
    [[mapping]]
    type = "customers"
    table = "v"
    key = ["a"]
    [mapping.fields]
    customer_id = "b"
    user_id = "b"
    region = "c"
    birthdate = { column = "f", transform = "date" }
    gender = { column = "i", transform = "csv" }
    "#;
        let settings = crate::config::load_str(text, "fuzz").unwrap();
        let ctx = MapContext::from_settings(&settings);
        // Every column typed as text (anything is accepted statically), so
        // arbitrary values reach the runtime conversions.
        let cols: Vec<Column> = "abcdefghij"
            .chars()
            .map(|c| Column {
                name: c.to_string(),
                ty: PgType {
                    oid: crate::mapping::value::oid::TEXT,
                    name: "text".into(),
                    elem: None,
                },
            })
            .collect();
        settings
            .mappings
            .iter()
            .map(|m| CompiledMapping::compile(m, &["a".into()], &cols, ctx).unwrap())
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            // CI's smoke run; `PROPTEST_CASES=100000` for a longer one.
            std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512),
        ))]

        #[test]
        fn mapping_never_panics_and_reports_problems_by_field(row in proptest::collection::vec(any_value(), 10)) {
            for m in fuzz_mappings() {
                let out = m.map_row(&row);
                // Whatever came in, what goes out is a record whose JSON parses
                // back, and every problem names a field of the type.
                let json = out.record.to_json();
                let back = crate::model::record::Record::from_json(out.record.ty, &json);
                prop_assert!(back.is_ok(), "{:?}", String::from_utf8_lossy(&json));
                let t = schema().ty(out.record.ty);
                for p in &out.problems {
                    prop_assert!(t.field(&p.field).is_some(), "{p:?}");
                }
                let _ = crate::model::validate::validate(&out.record);
                let _ = m.source_key(&row);
            }
        }
    }
}
