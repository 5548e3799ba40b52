//! The end-to-end oracle: what Cobi should hold, computed without the code
//! under test, and an exact comparison with what the mock API holds.
//!
//! Expected records come from hand-written SQL, one query per known mapping
//! ([`QUERIES`], keyed by the mapping's `<type>/<schema>.<table>` id), run
//! by PostgreSQL itself: `uuid_generate_v5` from `uuid-ossp` for the id
//! derivations (`<type>:<value>` names), `to_char(… AT TIME ZONE 'UTC')`
//! for date-times, numbers as PostgreSQL prints them, `jsonb_strip_nulls`
//! for the "NULL only where nullable, else absent" rule. Nothing here
//! touches `cobi_sync::mapping` or `cobi_sync::model`: the record types'
//! facts (keys, nullable fields) are read from `schema.json`, the API
//! contract, by this file's own parser. A mapping the registry does not
//! know (or whose columns differ from the query's) is a test-setup panic,
//! never a silent pass.
//!
//! Comparison rules: numbers as exact decimals (`12.50` = `12.5`, but
//! `0.1` ≠ `0.10000000149011612`); keyed types by key, where a key the
//! source no longer has must be soft-deleted at the mock (unless the
//! mapping says `on_delete = "ignore"`); unkeyed types (interactions) as
//! multisets — a source row missing at the mock is *missing*, one stored
//! more often than the source holds it is a *duplicate*, one that never
//! existed at the source is *extra*. An interaction whose source row was
//! deleted or changed after this oracle saw it stays at Cobi (documented in
//! the README) and is only counted.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::{Mutex, OnceLock};

use cobi_sync::config::{OnDelete, Settings};
use cobi_sync::mock_api::MockServer;
use serde_json::value::RawValue;

// ---- exact values -------------------------------------------------------

/// A JSON number as an exact decimal: `0.<digits> × 10^exp`, digits without
/// leading or trailing zeros (empty for zero), so equal values are equal.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dec {
    neg: bool,
    digits: String,
    exp: i64,
}

impl Dec {
    /// Parses JSON number text (`-12.50`, `1e3`, `0.1`); `None` if it is
    /// not one.
    pub fn parse(text: &str) -> Option<Dec> {
        let (neg, rest) = match text.strip_prefix('-') {
            Some(r) => (true, r),
            None => (false, text),
        };
        let (mantissa, e) = match rest.find(['e', 'E']) {
            Some(i) => (&rest[..i], rest[i + 1..].parse::<i64>().ok()?),
            None => (rest, 0),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        if int.is_empty() || !(int.bytes().chain(frac.bytes())).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let all = format!("{int}{frac}");
        let lead = all.len() - all.trim_start_matches('0').len();
        let digits = all
            .trim_start_matches('0')
            .trim_end_matches('0')
            .to_string();
        if digits.is_empty() {
            return Some(Dec {
                neg: false,
                digits,
                exp: 0,
            });
        }
        Some(Dec {
            neg,
            exp: int.len() as i64 - lead as i64 + e,
            digits,
        })
    }

    /// Significant digits.
    pub fn significant_digits(&self) -> usize {
        self.digits.len()
    }
}

impl fmt::Display for Dec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.digits.is_empty() {
            return f.write_str("0");
        }
        if self.neg {
            f.write_str("-")?;
        }
        let n = self.digits.len() as i64;
        if !(-40..=60).contains(&self.exp) {
            return write!(f, "0.{}e{}", self.digits, self.exp);
        }
        if self.exp <= 0 {
            write!(f, "0.{}{}", "0".repeat((-self.exp) as usize), self.digits)
        } else if self.exp >= n {
            write!(f, "{}{}", self.digits, "0".repeat((self.exp - n) as usize))
        } else {
            let (a, b) = self.digits.split_at(self.exp as usize);
            write!(f, "{a}.{b}")
        }
    }
}

/// One field value, compared exactly.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Val {
    Null,
    Bool(bool),
    Num(Dec),
    Str(String),
    /// An array or object (never valid in a Cobi record; kept to show it).
    Other(String),
}

impl fmt::Display for Val {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Val::Null => f.write_str("null"),
            Val::Bool(b) => write!(f, "{b}"),
            Val::Num(d) => write!(f, "{d}"),
            Val::Str(s) => write!(f, "{s:?}"),
            Val::Other(s) => f.write_str(s),
        }
    }
}

/// A record: field name → value.
pub type Rec = BTreeMap<String, Val>;

fn show(r: &Rec) -> String {
    let body: Vec<String> = r.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
    format!("{{{}}}", body.join(","))
}

/// Parses one record's JSON text keeping every number's digits.
pub fn parse_record(text: &str) -> Result<Rec, String> {
    let raw: BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(text).map_err(|e| format!("{e}: {text}"))?;
    raw.into_iter()
        .map(|(k, v)| {
            let t = v.get().trim();
            let val = match t.as_bytes().first() {
                Some(b'"') => Val::Str(serde_json::from_str(t).map_err(|e| e.to_string())?),
                Some(b't') => Val::Bool(true),
                Some(b'f') => Val::Bool(false),
                Some(b'n') => Val::Null,
                Some(b'[' | b'{') => Val::Other(t.to_string()),
                _ => Val::Num(Dec::parse(t).ok_or_else(|| format!("{k}: bad number {t}"))?),
            };
            Ok((k, val))
        })
        .collect()
}

// ---- the contract: schema.json, read independently ------------------------

#[derive(serde::Deserialize)]
struct RawContract {
    types: BTreeMap<String, RawType>,
}

#[derive(serde::Deserialize)]
struct RawType {
    #[serde(default)]
    aliases: Vec<String>,
    key: Vec<String>,
    fields: BTreeMap<String, RawField>,
}

#[derive(serde::Deserialize)]
struct RawField {
    #[serde(rename = "type")]
    ty: serde_json::Value,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    required: bool,
    #[serde(default)]
    nullable: bool,
    #[serde(default)]
    references: Option<String>,
    #[serde(default, rename = "enum")]
    enumeration: Option<Vec<Option<String>>>,
}

/// One field of a record type, as schema.json states it.
#[derive(Debug)]
pub struct FieldFacts {
    pub name: String,
    /// `string`, `number`, `boolean`, or `integer|string`.
    pub ty: String,
    pub format: Option<String>,
    pub required: bool,
    /// The allowed values, when the field has an enumeration (`None`
    /// listed as `null`).
    pub enumeration: Option<Vec<Option<String>>>,
    /// The types it references (`shops.shop_id` → `shops`; one per
    /// alternative of a polymorphic reference), types schema.json defines
    /// only.
    pub references: Vec<String>,
}

/// What the oracle needs to know of one record type.
#[derive(Debug)]
pub struct TypeFacts {
    pub name: String,
    pub aliases: Vec<String>,
    pub key: Vec<String>,
    /// Required reference fields, the identity when the key is optional
    /// (student-favourites: student_id + shop_id).
    pub natural_key: Vec<String>,
    /// Fields that may be sent as `null`.
    pub nullable: BTreeSet<String>,
    pub has_is_deleted: bool,
    /// Every field, by name.
    pub fields: Vec<FieldFacts>,
}

/// The record types of schema.json (the API contract).
pub fn contract() -> &'static [TypeFacts] {
    static C: OnceLock<Vec<TypeFacts>> = OnceLock::new();
    C.get_or_init(|| {
        let raw: RawContract =
            serde_json::from_str(include_str!("../../src/model/schema.json")).unwrap();
        let known: BTreeSet<String> = raw.types.keys().cloned().collect();
        raw.types
            .into_iter()
            .map(|(name, t)| {
                let key_required = t.key.iter().all(|k| t.fields[k].required);
                let natural_key = if key_required {
                    t.key.clone()
                } else {
                    // Schema order: the referencing customer before the shop.
                    let mut n: Vec<String> = t
                        .fields
                        .iter()
                        .filter(|(_, f)| f.required && f.references.is_some())
                        .map(|(k, _)| k.clone())
                        .collect();
                    n.sort_by_key(|k| k != "student_id");
                    n
                };
                TypeFacts {
                    aliases: t.aliases,
                    key: t.key,
                    natural_key,
                    nullable: t
                        .fields
                        .iter()
                        .filter(|(_, f)| {
                            f.nullable
                                || f.enumeration
                                    .as_ref()
                                    .is_some_and(|e| e.iter().any(|v| v.is_none()))
                        })
                        .map(|(k, _)| k.clone())
                        .collect(),
                    has_is_deleted: t.fields.contains_key("is_deleted"),
                    fields: t
                        .fields
                        .iter()
                        .map(|(fname, f)| FieldFacts {
                            name: fname.clone(),
                            ty: match &f.ty {
                                serde_json::Value::String(s) => s.clone(),
                                serde_json::Value::Array(a) => a
                                    .iter()
                                    .filter_map(|v| v.as_str())
                                    .collect::<Vec<_>>()
                                    .join("|"),
                                other => panic!("schema.json: {name}.{fname}: type {other}"),
                            },
                            format: f.format.clone(),
                            required: f.required,
                            enumeration: f.enumeration.clone(),
                            references: f
                                .references
                                .iter()
                                .flat_map(|r| r.split('|'))
                                .map(|r| r.split('.').next().unwrap_or(r).to_string())
                                .filter(|t| known.contains(t))
                                .collect(),
                        })
                        .collect(),
                    name,
                }
            })
            .collect()
    })
}

/// The facts of a type by name or alias.
pub fn facts(name: &str) -> &'static TypeFacts {
    contract()
        .iter()
        .find(|t| t.name == name || t.aliases.iter().any(|a| a == name))
        .unwrap_or_else(|| panic!("schema.json has no type {name}"))
}

/// The API's identity of a record: its key fields joined by `|`, the
/// natural key when a declared key field is absent, `None` without a key.
pub fn key_of(t: &TypeFacts, r: &Rec) -> Option<String> {
    if t.key.is_empty() {
        return None;
    }
    let present = |k: &String| matches!(r.get(k), Some(v) if *v != Val::Null);
    let fields = if t.key.iter().all(present) {
        &t.key
    } else {
        &t.natural_key
    };
    let parts: Option<Vec<String>> = fields
        .iter()
        .map(|k| match r.get(k)? {
            Val::Str(s) => Some(s.clone()),
            Val::Null => None,
            other => Some(other.to_string()),
        })
        .collect();
    Some(parts?.join("|"))
}

// ---- holdings ------------------------------------------------------------

/// What one type holds.
#[derive(Debug, Default, Clone)]
pub struct TypeHolding {
    /// Keyed records by key.
    pub keyed: BTreeMap<String, Rec>,
    /// Unkeyed records (interactions) with their multiplicity.
    pub unkeyed: BTreeMap<Rec, usize>,
    /// Keys held twice (the mock upserts, so never expected).
    pub collisions: Vec<String>,
    /// Deletes are not propagated (`on_delete = "ignore"`).
    pub deletes_ignored: bool,
    /// Unkeyed records the source held at some earlier look (deleted or
    /// changed since): they stay at Cobi.
    pub seen: BTreeMap<Rec, usize>,
}

impl TypeHolding {
    fn add(&mut self, t: &TypeFacts, r: Rec) {
        match key_of(t, &r) {
            Some(k) => {
                if self.keyed.insert(k.clone(), r).is_some() {
                    self.collisions.push(k);
                }
            }
            None => *self.unkeyed.entry(r).or_default() += 1,
        }
    }

    /// Records held (unkeyed ones counted with multiplicity).
    pub fn len(&self) -> usize {
        self.keyed.len() + self.unkeyed.values().sum::<usize>()
    }
}

/// Records by type name (as in the URL).
#[derive(Debug, Default, Clone)]
pub struct Holdings {
    pub types: BTreeMap<String, TypeHolding>,
}

impl Holdings {
    /// Holdings of hand-written records: `(type name or alias, JSON
    /// object text)`. Panics on text that is not a JSON object.
    pub fn of_records<'a>(records: impl IntoIterator<Item = (&'a str, String)>) -> Holdings {
        let mut out = Holdings::default();
        for (ty, text) in records {
            let t = facts(ty);
            let r = parse_record(&text).unwrap_or_else(|e| panic!("expected {ty}: {e}"));
            out.types.entry(t.name.clone()).or_default().add(t, r);
        }
        out
    }

    /// The holding of a type (name or alias); empty if none.
    pub fn of(&self, ty: &str) -> TypeHolding {
        self.types.get(&facts(ty).name).cloned().unwrap_or_default()
    }
}

// ---- the SQL side ---------------------------------------------------------

/// How a query may refer to the id namespace and the source time zone.
pub struct Ctx {
    pub namespace: String,
    pub timezone: String,
}

/// `uuid5:<ty>` of an SQL expression (NULL stays NULL).
pub fn u5(ty: &str, expr: &str, c: &Ctx) -> String {
    format!(
        "cobi_oracle.uuid_generate_v5('{}'::uuid, '{ty}:' || ({expr})::text)::text",
        c.namespace
    )
}

/// A `timestamptz` as RFC 3339 in UTC with microseconds, ending in `Z`.
pub fn tstz(expr: &str) -> String {
    format!("to_char(({expr}) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
}

/// A `timestamp without time zone`, read in `source.timezone`.
pub fn naive(expr: &str, c: &Ctx) -> String {
    tstz(&format!("({expr}) AT TIME ZONE '{}'", c.timezone))
}

/// A `date` as `YYYY-MM-DD`.
pub fn date(expr: &str) -> String {
    format!("to_char({expr}, 'YYYY-MM-DD')")
}

/// An array, each element through `each` (`x` names the element), joined
/// by commas without spaces; NULL stays NULL.
pub fn csv(array: &str, each: &str) -> String {
    format!(
        "CASE WHEN ({array}) IS NULL THEN NULL ELSE array_to_string(ARRAY(SELECT {each} FROM unnest({array}) WITH ORDINALITY AS u(x, o) ORDER BY o), ',') END"
    )
}

/// `epoch_ms` of a `timestamptz` (milliseconds, floor).
pub fn epoch_ms(expr: &str) -> String {
    format!("floor(extract(epoch FROM ({expr})) * 1000)::bigint")
}

/// One hand-written oracle query: for the mapping with this id, the source
/// columns it reads (checked against the config, so a test that changes
/// the mapping must add its own query) and each Cobi field's SQL.
pub struct Query {
    /// `<type>/<schema>.<table>` as in `MappingSettings::id`.
    pub id: &'static str,
    /// The `FROM` clause.
    pub from: &'static str,
    /// Every source column the mapping reads (fields, key, cursor).
    pub reads: &'static [&'static str],
    /// Cobi field → SQL expression.
    pub fields: fn(&Ctx) -> Vec<(&'static str, String)>,
}

impl Query {
    /// The SELECT giving each record as JSON text: NULLs dropped from
    /// fields the contract does not let be null, kept elsewhere.
    pub fn sql(&self, c: &Ctx) -> String {
        let t = facts(self.id.split('/').next().unwrap());
        let (mut strict, mut nullable) = (Vec::new(), Vec::new());
        for (name, expr) in (self.fields)(c) {
            let pair = format!("'{name}', {expr}");
            if t.nullable.contains(name) {
                nullable.push(pair);
            } else {
                strict.push(pair);
            }
        }
        format!(
            "SELECT (jsonb_strip_nulls(jsonb_build_object({})) || jsonb_build_object({}))::text FROM {}",
            strict.join(", "),
            nullable.join(", "),
            self.from
        )
    }
}

/// Every oracle query the suite knows: the demo's partner schema
/// (`src/demo.rs` MAPPINGS, also `config/docker.toml`) and the
/// partner-shaped fixtures of `partner.rs`.
pub fn queries() -> Vec<&'static Query> {
    crate::partner::QUERIES
        .iter()
        .chain(crate::partner::SHAPED_QUERIES.iter())
        .collect()
}

/// The query for a configured mapping; panics when there is none or the
/// mapping reads other columns than the query assumes.
fn query_for(m: &cobi_sync::config::MappingSettings) -> &'static Query {
    let q = queries()
        .into_iter()
        .find(|q| *q.id == *m.id)
        .unwrap_or_else(|| {
            panic!(
                "the oracle has no query for mapping {}: add one to partner.rs (hand-written SQL)",
                m.id
            )
        });
    let want: BTreeSet<&str> = q.reads.iter().copied().collect();
    let cols = m.columns();
    let got: BTreeSet<&str> = cols.iter().map(|s| s.as_str()).collect();
    assert_eq!(
        got, want,
        "mapping {} reads other columns than the oracle's query: give the test its own query",
        m.id
    );
    let n = (q.fields)(&Ctx {
        namespace: String::new(),
        timezone: String::new(),
    })
    .len();
    assert_eq!(
        m.fields.len(),
        n,
        "mapping {} maps {} fields, the oracle's query {n}: give the test its own query",
        m.id,
        m.fields.len()
    );
    q
}

/// Unkeyed records by type name, with the highest multiplicity seen.
type Seen = BTreeMap<String, BTreeMap<Rec, usize>>;

/// Interactions this process has seen at each source (by database
/// identity).
fn seen_store() -> &'static Mutex<HashMap<String, Seen>> {
    static S: OnceLock<Mutex<HashMap<String, Seen>>> = OnceLock::new();
    S.get_or_init(Default::default)
}

/// Installs `uuid-ossp` in its own schema (`cobi_oracle`), once per
/// database. Needs a client that may create schemas and extensions (the
/// test's superuser client).
async fn prepare(client: &tokio_postgres::Client) {
    let sql = "CREATE SCHEMA IF NOT EXISTS cobi_oracle; \
               CREATE EXTENSION IF NOT EXISTS \"uuid-ossp\" WITH SCHEMA cobi_oracle;";
    for attempt in 0..3 {
        match client.batch_execute(sql).await {
            Ok(()) => return,
            // Two first calls racing on the catalog: try again.
            Err(_) if attempt < 2 => {}
            Err(e) => panic!(
                "the oracle needs the uuid-ossp extension (PostgreSQL contrib) and a client \
                 that may create it: {e}"
            ),
        }
    }
}

/// What Cobi should hold: every row of every configured mapping, computed
/// by PostgreSQL from the source tables.
pub async fn expected(settings: &Settings, client: &tokio_postgres::Client) -> Holdings {
    prepare(client).await;
    let c = Ctx {
        namespace: settings.id_namespace.to_string(),
        timezone: settings.source.timezone.name().to_string(),
    };
    let mut out = Holdings::default();
    for m in &settings.mappings {
        let q = query_for(m);
        let t = facts(q.id.split('/').next().unwrap());
        let rows = client
            .query(&q.sql(&c), &[])
            .await
            .unwrap_or_else(|e| panic!("oracle query for {}: {e}\n{}", q.id, q.sql(&c)));
        let h = out.types.entry(t.name.clone()).or_default();
        h.deletes_ignored |= m.on_delete == OnDelete::Ignore;
        for row in rows {
            let text: String = row.get(0);
            h.add(t, parse_record(&text).unwrap());
        }
    }
    // Remember interactions, so that one deleted or changed at the source
    // later is recognised (it stays at Cobi).
    let db: String = client
        .query_one(
            "SELECT current_database() || ':' || coalesce(inet_server_port()::text, 'socket') \
             || ':' || pg_postmaster_start_time()::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mut seen = seen_store().lock().unwrap();
    let seen = seen.entry(db).or_default();
    for (name, h) in out.types.iter_mut() {
        let s = seen.entry(name.clone()).or_default();
        for (r, n) in &h.unkeyed {
            let e = s.entry(r.clone()).or_default();
            *e = (*e).max(*n);
        }
        h.seen = s.clone();
    }
    out
}

/// `<type> <uuid5>` of each value `values_sql` returns (any type, read
/// as text): how [`Diff`] names records keyed by `uuid5` of those values.
pub async fn uuid5_labels(
    settings: &Settings,
    client: &tokio_postgres::Client,
    ty: &str,
    values_sql: &str,
) -> BTreeSet<String> {
    prepare(client).await;
    let c = Ctx {
        namespace: settings.id_namespace.to_string(),
        timezone: String::new(),
    };
    let sql = format!("SELECT {} FROM ({values_sql}) AS v(x)", u5(ty, "x", &c));
    let name = &facts(ty).name;
    client
        .query(&sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| format!("{name} {}", r.get::<_, String>(0)))
        .collect()
}

/// A cheap necessary condition for being in sync: for every type, the
/// mock holds at least as many records as the source has rows, short of
/// at most `slack` records in all (the expected dead letters). Lets a wait
/// loop skip the full comparison while a big delivery is under way.
pub async fn counts_reached(
    settings: &Settings,
    client: &tokio_postgres::Client,
    mock: &MockServer,
    slack: usize,
) -> bool {
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for m in &settings.mappings {
        let q = query_for(m);
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {}", q.from), &[])
            .await
            .unwrap_or_else(|e| panic!("counting {}: {e}", q.from))
            .get(0);
        *want
            .entry(facts(q.id.split('/').next().unwrap()).name.clone())
            .or_default() += n as u64;
    }
    let stored = mock.stats().stored;
    let short: u64 = want
        .iter()
        .map(|(t, n)| n.saturating_sub(stored.get(t).copied().unwrap_or(0)))
        .sum();
    short <= slack as u64
}

/// What the mock holds, read from the exact text it stored.
pub fn actual(mock: &MockServer) -> Holdings {
    let mut out = Holdings::default();
    for t in contract() {
        let mut h = TypeHolding::default();
        for text in mock.records_text(&t.name) {
            let mut r = parse_record(&text).unwrap_or_else(|e| panic!("{}: {e}", t.name));
            // Not part of the record: the id the mock assigned.
            if t.key.is_empty() {
                r.remove("id");
            }
            h.add(t, r);
        }
        if h.len() > 0 {
            out.types.insert(t.name.clone(), h);
        }
    }
    out
}

// ---- comparison -----------------------------------------------------------

/// Differences between the source and the mock.
#[derive(Debug, Default)]
pub struct Diff {
    /// Records checked (the source's).
    pub rows: usize,
    /// At the source, absent at the mock (once per missing copy).
    pub missing: Vec<String>,
    /// In both, with different content (field by field).
    pub different: Vec<String>,
    /// At the mock but not at the source: a key neither live nor
    /// soft-deleted, or an interaction the source never held.
    pub extra: Vec<String>,
    /// Interactions stored more often than the source holds them, and keys
    /// stored twice.
    pub duplicates: Vec<String>,
    /// Interactions whose source row was deleted or changed after the
    /// oracle saw it: they stay at Cobi (README), counted only.
    pub kept_events: usize,
}

impl Diff {
    /// Nothing missing, different, extra or duplicated.
    pub fn is_clean(&self) -> bool {
        self.is_clean_at_least_once() && self.duplicates.is_empty()
    }

    /// As [`Diff::is_clean`], but interactions may be stored more than once
    /// (at-least-once delivery after a kill or a dropped connection).
    pub fn is_clean_at_least_once(&self) -> bool {
        self.missing.is_empty() && self.different.is_empty() && self.extra.is_empty()
    }

    /// A report for a failure message.
    pub fn report(&self) -> String {
        let head = |v: &[String], n: usize| v[..v.len().min(n)].join("\n  ");
        format!(
            "{} missing, {} different, {} extra, {} duplicated (of {} rows; {} kept events)\nmissing:\n  {}\ndifferent:\n  {}\nextra:\n  {}\nduplicates:\n  {}",
            self.missing.len(),
            self.different.len(),
            self.extra.len(),
            self.duplicates.len(),
            self.rows,
            self.kept_events,
            head(&self.missing, 10),
            head(&self.different, 5),
            head(&self.extra, 10),
            head(&self.duplicates, 10),
        )
    }
}

/// Field-by-field differences of two records.
fn field_diff(want: &Rec, got: &Rec) -> String {
    let names: BTreeSet<&String> = want.keys().chain(got.keys()).collect();
    names
        .into_iter()
        .filter(|n| want.get(*n) != got.get(*n))
        .map(|n| {
            let s = |v: Option<&Val>| v.map_or("(absent)".to_string(), |v| v.to_string());
            format!("{n}: want {} got {}", s(want.get(n)), s(got.get(n)))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Compares the source's state with the mock's.
pub fn compare(expected: &Holdings, actual: &Holdings) -> Diff {
    let mut d = Diff::default();
    let empty = TypeHolding::default();
    let names: BTreeSet<&String> = expected.types.keys().chain(actual.types.keys()).collect();
    for name in names {
        let t = facts(name);
        let e = expected.types.get(name).unwrap_or(&empty);
        let a = actual.types.get(name).unwrap_or(&empty);
        d.rows += e.len();
        for k in &a.collisions {
            d.duplicates.push(format!("{name} {k}: stored twice"));
        }
        // Keyed.
        for (k, want) in &e.keyed {
            match a.keyed.get(k) {
                None => d.missing.push(format!("{name} {k}")),
                Some(got) if got != want => d
                    .different
                    .push(format!("{name} {k}: {}", field_diff(want, got))),
                Some(_) => {}
            }
        }
        for (k, got) in &a.keyed {
            if e.keyed.contains_key(k) || e.deletes_ignored {
                continue;
            }
            let soft_deleted = t.has_is_deleted && got.get("is_deleted") == Some(&Val::Bool(true));
            if !soft_deleted {
                d.extra.push(format!("{name} {k}: {}", show(got)));
            }
        }
        // Unkeyed: multisets.
        for (r, &want) in &e.unkeyed {
            let got = a.unkeyed.get(r).copied().unwrap_or(0);
            for _ in got..want {
                d.missing.push(format!("{name} {}", show(r)));
            }
        }
        for (r, &got) in &a.unkeyed {
            let want = e.unkeyed.get(r).copied().unwrap_or(0);
            let seen = e.seen.get(r).copied().unwrap_or(0).max(want);
            if got <= want {
                continue;
            }
            if want == 0 && seen == 0 {
                d.extra.push(format!("{name} {} (x{got})", show(r)));
            } else if got > seen {
                d.duplicates.push(format!(
                    "{name} {} stored {got} times, source has {want}",
                    show(r)
                ));
            } else {
                d.kept_events += got - want;
            }
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_exact() {
        let eq = [
            ("12.50", "12.5"),
            ("1e3", "1000"),
            ("-0", "0"),
            ("0.0", "0"),
            ("1.5E-3", "0.0015"),
            ("00012", "12"),
        ];
        for (a, b) in eq {
            assert_eq!(Dec::parse(a), Dec::parse(b), "{a} = {b}");
        }
        let ne = [
            ("0.1", "0.10000000149011612"),
            (
                "123456789012345678901234567.891",
                "123456789012345678901234567.89",
            ),
            ("1", "-1"),
            ("10", "1"),
        ];
        for (a, b) in ne {
            assert_ne!(Dec::parse(a), Dec::parse(b), "{a} != {b}");
        }
        for (text, shown) in [
            ("12.50", "12.5"),
            ("-0.0015", "-0.0015"),
            ("1e3", "1000"),
            (
                "1234567890123456789012345678.91",
                "1234567890123456789012345678.91",
            ),
        ] {
            assert_eq!(Dec::parse(text).unwrap().to_string(), shown);
        }
        assert_eq!(
            Dec::parse("1234567890123456789012345678.91")
                .unwrap()
                .significant_digits(),
            30
        );
        for bad in ["", "-", "1.2.3", "a", "1e", "--1"] {
            assert_eq!(Dec::parse(bad), None, "{bad}");
        }
    }

    fn rec(text: &str) -> Rec {
        parse_record(text).unwrap()
    }

    fn holding(ty: &str, recs: &[&str]) -> Holdings {
        let t = facts(ty);
        let mut h = TypeHolding::default();
        for r in recs {
            h.add(t, rec(r));
        }
        let mut out = Holdings::default();
        out.types.insert(t.name.clone(), h);
        out
    }

    const S1: &str = r#"{"shop_id":"s1","name":"A","region":"GB","price_like":1}"#;

    #[test]
    fn keyed_rules() {
        let e = holding(
            "shops",
            &[S1, r#"{"shop_id":"s2","name":"B","region":"GB"}"#],
        );
        // Same, with a number written differently.
        let a = holding(
            "shops",
            &[
                r#"{"shop_id":"s1","name":"A","region":"GB","price_like":1.0}"#,
                r#"{"shop_id":"s2","name":"B","region":"GB"}"#,
                r#"{"shop_id":"s3","name":"C","region":"GB","is_deleted":true}"#,
            ],
        );
        assert!(compare(&e, &a).is_clean(), "{}", compare(&e, &a).report());
        // Missing, different, extra (not soft-deleted).
        let a = holding(
            "shops",
            &[
                r#"{"shop_id":"s1","name":"A","region":"GB","price_like":1.0000001}"#,
                r#"{"shop_id":"s4","name":"D","region":"GB"}"#,
                r#"{"shop_id":"s5","name":"D","region":"GB","is_deleted":false}"#,
            ],
        );
        let d = compare(&e, &a);
        assert_eq!(d.missing, ["shops s2"]);
        assert_eq!(d.different.len(), 1);
        assert!(d.different[0].contains("price_like: want 1 got 1.0000001"));
        assert_eq!(d.extra.len(), 2);
    }

    #[test]
    fn interactions_are_multisets() {
        let a1 = r#"{"interaction_type":"SHARE","item_id":"x","event_timestamp":1}"#;
        let a2 = r#"{"interaction_type":"SHARE","item_id":"x","event_timestamp":2}"#;
        let e = holding("interactions", &[a1, a1, a2]);
        assert!(compare(&e, &holding("interactions", &[a1, a2, a1])).is_clean());
        let d = compare(&e, &holding("interactions", &[a1, a2]));
        assert_eq!(d.missing.len(), 1);
        let d = compare(&e, &holding("interactions", &[a1, a1, a1, a2]));
        assert_eq!(d.duplicates.len(), 1);
        assert!(d.is_clean_at_least_once() && !d.is_clean());
        let a3 = r#"{"interaction_type":"SHARE","item_id":"y","event_timestamp":3}"#;
        let d = compare(&e, &holding("interactions", &[a1, a1, a2, a3]));
        assert_eq!(d.extra.len(), 1, "{}", d.report());
        // Seen earlier (deleted at the source since): kept, not extra.
        let mut e2 = holding("interactions", &[a1, a1, a2]);
        e2.types.get_mut("user-interactions").unwrap().seen = [(rec(a3), 1)].into();
        let d = compare(&e2, &holding("interactions", &[a1, a1, a2, a3]));
        assert!(d.is_clean(), "{}", d.report());
        assert_eq!(d.kept_events, 1);
    }

    #[test]
    fn favourites_fall_back_to_the_natural_key() {
        let t = facts("student-favourites");
        assert_eq!(t.natural_key, ["student_id", "shop_id"]);
        assert_eq!(
            key_of(t, &rec(r#"{"student_id":"c","shop_id":"s"}"#)).as_deref(),
            Some("c|s")
        );
        assert_eq!(
            key_of(
                t,
                &rec(r#"{"favourite_id":"f","student_id":"c","shop_id":"s"}"#)
            )
            .as_deref(),
            Some("f")
        );
        assert_eq!(key_of(facts("interactions"), &rec("{}")), None);
    }
}
