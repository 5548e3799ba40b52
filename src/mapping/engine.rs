//! The mapping engine: one source row → one Cobi record. Pure, no I/O.
//!
//! A mapping is compiled once per row layout ([`CompiledMapping::compile`]):
//! column names are resolved to positions, and every field's chain
//! (transforms → `map` → `default` → conversion to the target field's type
//! and format) is checked statically, so a mapping that can never convert
//! is a startup/`check` error rather than a stream of dead letters.
//! Applying it ([`CompiledMapping::map_row`]) never fails as a whole: a
//! value that cannot be converted leaves its field out and is reported as
//! a [`Problem`], which makes the record a dead letter with that reason.
//!
//! NULL handling (DESIGN.md §3): a NULL result is sent as `null` only where
//! the schema marks the field nullable; otherwise the field is omitted (and
//! a missing required field is a validation problem).

use chrono_tz::Tz;
use uuid::Uuid;

use crate::config::{MappingSettings, Settings};
use crate::mapping::spec::{FieldSpec, Transform};
use crate::mapping::time;
use crate::mapping::value::{format_float, oid, PgType, Value};
use crate::model::record::{Json, Record};
use crate::model::schema::{schema, FieldDef, FieldId, FieldType, Format, Reference, TypeId};
use crate::model::validate::Problem;

/// A column of the rows a mapping is applied to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Its type.
    pub ty: PgType,
}

/// What mapping needs from the environment.
#[derive(Debug, Clone, Copy)]
pub struct MapContext {
    /// `ids.namespace`.
    pub namespace: Uuid,
    /// `source.timezone`.
    pub timezone: Tz,
}

impl MapContext {
    /// From settings.
    pub fn from_settings(s: &Settings) -> Self {
        MapContext {
            namespace: s.id_namespace,
            timezone: s.source.timezone,
        }
    }
}

/// The result of mapping a row.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    /// The record (fields that failed to convert are left out).
    pub record: Record,
    /// Conversion problems; non-empty means the record is a dead letter.
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone)]
enum Input {
    Column(usize),
    Const(Value),
}

#[derive(Debug, Clone)]
struct FieldOp {
    field: FieldId,
    input: Input,
    transforms: Vec<Transform>,
    map: Vec<(String, Value)>,
    default: Option<Value>,
}

/// A mapping resolved against one row layout.
#[derive(Debug, Clone)]
pub struct CompiledMapping {
    /// The Cobi type produced.
    pub ty: TypeId,
    ops: Vec<FieldOp>,
    key_columns: Vec<usize>,
    item_type_field: Option<FieldId>,
    is_deleted_field: Option<FieldId>,
    ctx: MapContext,
}

/// Static type of a value flowing through a field's chain.
#[derive(Debug, Clone, PartialEq)]
enum SType {
    Bool,
    Int,
    Float,
    Numeric,
    Text,
    Uuid,
    Date,
    Timestamp,
    TimestampTz,
    Json,
    Array(Box<SType>),
    /// Unknown until run time (after `map`, or a constant `null`).
    Any,
}

impl SType {
    fn of_oid(o: u32, elem: Option<u32>) -> SType {
        if let Some(e) = elem.or_else(|| oid::array_elem(o)) {
            return SType::Array(Box::new(SType::of_oid(e, None)));
        }
        match o {
            oid::BOOL => SType::Bool,
            oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => SType::Int,
            oid::FLOAT4 | oid::FLOAT8 => SType::Float,
            oid::NUMERIC => SType::Numeric,
            oid::UUID => SType::Uuid,
            oid::DATE => SType::Date,
            oid::TIMESTAMP => SType::Timestamp,
            oid::TIMESTAMPTZ => SType::TimestampTz,
            oid::JSON | oid::JSONB => SType::Json,
            _ => SType::Text,
        }
    }

    fn of_value(v: &Value) -> SType {
        match v {
            Value::Null => SType::Any,
            Value::Bool(_) => SType::Bool,
            Value::Int(_) => SType::Int,
            Value::Float(_) => SType::Float,
            Value::Numeric(_) => SType::Numeric,
            Value::Text(_) => SType::Text,
            Value::Uuid(_) => SType::Uuid,
            Value::Date(_) => SType::Date,
            Value::Timestamp(_) => SType::Timestamp,
            Value::TimestampTz(_) => SType::TimestampTz,
            Value::Json(_) => SType::Json,
            Value::Array(a) => {
                SType::Array(Box::new(a.first().map_or(SType::Any, SType::of_value)))
            }
        }
    }

    fn name(&self) -> String {
        match self {
            SType::Bool => "boolean".into(),
            SType::Int => "integer".into(),
            SType::Float => "float".into(),
            SType::Numeric => "numeric".into(),
            SType::Text => "text".into(),
            SType::Uuid => "uuid".into(),
            SType::Date => "date".into(),
            SType::Timestamp => "timestamp".into(),
            SType::TimestampTz => "timestamptz".into(),
            SType::Json => "json".into(),
            SType::Array(e) => format!("{}[]", e.name()),
            SType::Any => "any".into(),
        }
    }
}

fn static_transform(t: &Transform, st: SType) -> Result<SType, String> {
    if let SType::Array(elem) = &st {
        if !t.takes_whole_array() {
            return Ok(SType::Array(Box::new(static_transform(
                t,
                (**elem).clone(),
            )?)));
        }
    }
    use SType::*;
    let bad = |st: &SType| {
        Err(format!(
            "transform `{}` does not apply to {}",
            t.name(),
            st.name()
        ))
    };
    Ok(match t {
        Transform::Upper | Transform::Lower | Transform::Trim => match st {
            Text | Uuid | Any => Text,
            other => return bad(&other),
        },
        Transform::String => Text,
        Transform::Number => match st {
            Int | Float | Numeric | Text | Any => Numeric,
            other => return bad(&other),
        },
        Transform::Date => match st {
            Date | Timestamp | TimestampTz | Text | Any => Date,
            other => return bad(&other),
        },
        Transform::Datetime => match st {
            Date | Timestamp | TimestampTz | Text | Any => TimestampTz,
            other => return bad(&other),
        },
        Transform::EpochMs => match st {
            Date | Timestamp | TimestampTz | Text | Any => Int,
            other => return bad(&other),
        },
        Transform::IsNull | Transform::IsNotNull => Bool,
        Transform::Csv => match st {
            Array(_) | Text | Any => Text,
            other => return bad(&other),
        },
        Transform::Uuid5(_) | Transform::Uuid5Item => match st {
            Int | Text | Uuid | Numeric | Any => Uuid,
            other => return bad(&other),
        },
    })
}

/// Whether a constant (`{ value = … }`) can ever be a valid value of
/// `def`: its type fits the field, it converts, and the result passes the
/// field's local validation. The message says why not.
pub fn check_constant(v: &Value, ty: TypeId, field: FieldId) -> Result<(), String> {
    let def = &schema().ty(ty).fields[field as usize];
    if v.is_null() {
        return Ok(());
    }
    static_target(&SType::of_value(v), def)?;
    let json = to_json(v.clone(), def, Tz::UTC)?;
    let mut record = Record::new(ty);
    record.set(field, json);
    match crate::model::validate::validate(&record)
        .into_iter()
        .find(|p| p.field == def.name)
    {
        Some(p) => Err(format!("the constant {}", p.reason)),
        None => Ok(()),
    }
}

fn static_target(st: &SType, def: &FieldDef) -> Result<(), String> {
    use SType::*;
    if matches!(st, Any) {
        return Ok(());
    }
    let hint = |msg: &str| {
        Err(format!(
            "a {} value cannot become {}: {msg}",
            st.name(),
            describe_field(def)
        ))
    };
    match (def.ty, def.format) {
        (FieldType::String, Some(Format::Uuid)) => match st {
            Uuid | Text => Ok(()),
            Int | Numeric => hint("derive a UUID with transform = \"uuid5\" (or \"uuid5:<type>\")"),
            _ => hint("map a uuid or text column"),
        },
        (FieldType::String, Some(Format::DateTime)) => match st {
            Timestamp | TimestampTz | Date | Text => Ok(()),
            _ => hint("map a timestamp, timestamptz or date column"),
        },
        (FieldType::String, Some(Format::Date)) => match st {
            Date | Timestamp | TimestampTz | Text => Ok(()),
            _ => hint("map a date column"),
        },
        (FieldType::String, Some(Format::CountryCode)) => match st {
            Text => Ok(()),
            _ => hint("map a text column holding a two-letter code"),
        },
        (FieldType::String, Some(Format::CommaSeparatedList)) => match st {
            Array(_) | Text => Ok(()),
            _ => hint("map an array column (it becomes a comma-separated list) or a text column"),
        },
        (FieldType::String, _) => match st {
            Array(_) => hint("add transform = \"csv\" to join the array"),
            _ => Ok(()),
        },
        (FieldType::Number, _) => match st {
            Int | Float | Numeric => Ok(()),
            Text => hint("add transform = \"number\" to parse the text"),
            _ => hint("map a numeric column"),
        },
        (FieldType::Integer, _) => match st {
            Int | Numeric => Ok(()),
            _ => hint("map an integer column"),
        },
        (FieldType::Boolean, _) => match st {
            Bool => Ok(()),
            _ => hint("map a boolean column, or use transform = \"is_not_null\""),
        },
        (FieldType::IntegerOrString, _) => match st {
            Int | Numeric | Timestamp | TimestampTz | Date | Text => Ok(()),
            _ => hint("map a timestamp or an integer epoch (transform = \"epoch_ms\")"),
        },
    }
}

fn describe_field(def: &FieldDef) -> String {
    let fmt = match def.format {
        Some(Format::Uuid) => " (uuid)",
        Some(Format::DateTime) => " (date-time)",
        Some(Format::Date) => " (date)",
        Some(Format::CountryCode) => " (country code)",
        Some(Format::CommaSeparatedList) => " (comma-separated list)",
        _ => "",
    };
    let ty = match def.ty {
        FieldType::String => "string",
        FieldType::Number => "number",
        FieldType::Integer => "integer",
        FieldType::Boolean => "boolean",
        FieldType::IntegerOrString => "integer or date-time",
    };
    format!("field `{}`, a {ty}{fmt}", def.name)
}

impl CompiledMapping {
    /// Resolves `mapping` against `columns` (the layout of the rows it will
    /// be applied to). `key_columns` are the source key (the mapping's `key`
    /// or the table's primary key). Errors are one line each, naming the
    /// field or column.
    pub fn compile(
        mapping: &MappingSettings,
        key_columns: &[String],
        columns: &[Column],
        ctx: MapContext,
    ) -> Result<CompiledMapping, Vec<String>> {
        let t = schema().ty(mapping.ty);
        let mut errors = Vec::new();
        let find = |name: &str| columns.iter().position(|c| c.name == name);
        let available = || {
            columns
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut key_idx = Vec::new();
        for k in key_columns {
            match find(k) {
                Some(i) => key_idx.push(i),
                None => errors.push(format!(
                    "key column `{k}` does not exist (columns: {})",
                    available()
                )),
            }
        }
        let mut ops = Vec::new();
        for (field, spec) in &mapping.fields {
            let def = &t.fields[*field as usize];
            let (input, mut st) = match spec {
                FieldSpec::Const(v) => (Input::Const(v.clone()), SType::of_value(v)),
                FieldSpec::Column { column, .. } => match find(column) {
                    Some(i) => {
                        let c = &columns[i];
                        (Input::Column(i), SType::of_oid(c.ty.oid, c.ty.elem))
                    }
                    None => {
                        errors.push(format!(
                            "fields.{}: column `{column}` does not exist (columns: {})",
                            def.name,
                            available()
                        ));
                        continue;
                    }
                },
            };
            let (transforms, map, default) = match spec {
                FieldSpec::Column {
                    transforms,
                    map,
                    default,
                    ..
                } => (
                    transforms
                        .iter()
                        .map(|t| match t {
                            Transform::Uuid5(None) => Transform::Uuid5(Some(mapping.ty)),
                            other => other.clone(),
                        })
                        .collect::<Vec<_>>(),
                    map.clone(),
                    default.clone(),
                ),
                FieldSpec::Const(_) => (Vec::new(), Vec::new(), None),
            };
            // A list of references holds UUIDs: integer ids need uuid5.
            if def.format == Some(Format::CommaSeparatedList)
                && def.reference.is_some()
                && matches!(&st, SType::Array(e) if matches!(**e, SType::Int | SType::Numeric))
                && !transforms.iter().any(|t| matches!(t, Transform::Uuid5(_)))
            {
                errors.push(format!(
                    "fields.{}: the elements are integers but must be UUIDs of the referenced \
                     records; derive them with transform = [\"uuid5:<type>\", \"csv\"]",
                    def.name
                ));
                continue;
            }
            let mut failed = false;
            for tr in &transforms {
                match static_transform(tr, st.clone()) {
                    Ok(next) => st = next,
                    Err(e) => {
                        errors.push(format!("fields.{}: {e}", def.name));
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                continue;
            }
            if !map.is_empty() && map.iter().any(|(_, v)| SType::of_value(v) != st) {
                st = SType::Any;
            }
            if let Err(e) = static_target(&st, def) {
                errors.push(format!("fields.{}: {e}", def.name));
                continue;
            }
            // Constants and defaults must convert, checked now.
            for c in [
                matches!(input, Input::Const(_)).then(|| match &input {
                    Input::Const(v) => v.clone(),
                    Input::Column(_) => Value::Null,
                }),
                default.clone(),
            ]
            .into_iter()
            .flatten()
            {
                if c.is_null() {
                    continue;
                }
                if let Err(e) = to_json(c, def, ctx.timezone) {
                    errors.push(format!("fields.{}: constant/default {e}", def.name));
                }
            }
            ops.push(FieldOp {
                field: *field,
                input,
                transforms,
                map,
                default,
            });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        // Fields whose uuid5 depends on item_type go last.
        ops.sort_by_key(|op| op.transforms.contains(&Transform::Uuid5Item));
        Ok(CompiledMapping {
            ty: mapping.ty,
            ops,
            key_columns: key_idx,
            item_type_field: t.field("item_type"),
            is_deleted_field: t.field("is_deleted"),
            ctx,
        })
    }

    /// Maps one row (values in the compiled column order).
    pub fn map_row(&self, row: &[Value]) -> Mapped {
        let t = schema().ty(self.ty);
        // Sized once: growing it was ~1 % of a snapshot's CPU.
        let mut record = Record::with_capacity(self.ty, self.ops.len());
        let mut problems = Vec::new();
        for op in &self.ops {
            let def = &t.fields[op.field as usize];
            let input = match &op.input {
                Input::Column(i) => row.get(*i).cloned().unwrap_or(Value::Null),
                Input::Const(v) => v.clone(),
            };
            match self.eval(op, input, &record) {
                Ok(Value::Null) => {
                    if def.nullable {
                        record.set(op.field, Json::Null);
                    }
                }
                Ok(v) => match to_json(v, def, self.ctx.timezone) {
                    Ok(j) => record.set(op.field, j),
                    Err(reason) => problems.push(Problem {
                        field: def.name.clone(),
                        reason,
                    }),
                },
                Err(reason) => problems.push(Problem {
                    field: def.name.clone(),
                    reason,
                }),
            }
        }
        Mapped { record, problems }
    }

    /// The source key of a row: key columns' text joined by `|` (with `|`
    /// and `\` escaped, NULL as `\N`). Stable across restarts; the state
    /// store is keyed by it.
    pub fn source_key(&self, row: &[Value]) -> String {
        source_key(
            self.key_columns
                .iter()
                .map(|&i| row.get(i).unwrap_or(&Value::Null)),
        )
    }

    /// The key columns' values.
    pub fn key_values(&self, row: &[Value]) -> Vec<Value> {
        self.key_columns
            .iter()
            .map(|&i| row.get(i).cloned().unwrap_or(Value::Null))
            .collect()
    }

    /// Positions of the key columns in the row layout.
    pub fn key_positions(&self) -> &[usize] {
        &self.key_columns
    }

    /// Positions of every column some field reads.
    pub fn used_positions(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .ops
            .iter()
            .filter_map(|op| match op.input {
                Input::Column(i) => Some(i),
                Input::Const(_) => None,
            })
            .chain(self.key_columns.iter().copied())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The `is_deleted` field of this type, if it has one.
    pub fn is_deleted_field(&self) -> Option<FieldId> {
        self.is_deleted_field
    }

    fn eval(&self, op: &FieldOp, input: Value, record: &Record) -> Result<Value, String> {
        let mut v = input;
        for t in &op.transforms {
            v = self.apply(t, v, record)?;
        }
        if !op.map.is_empty() {
            v = apply_map(v, &op.map);
        }
        if v.is_null() {
            if let Some(d) = &op.default {
                v = d.clone();
            }
        }
        Ok(v)
    }

    fn apply(&self, t: &Transform, v: Value, record: &Record) -> Result<Value, String> {
        if let Value::Array(items) = v {
            if !t.takes_whole_array() {
                return items
                    .into_iter()
                    .map(|x| self.apply(t, x, record))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Value::Array);
            }
            return apply_scalar(t, Value::Array(items), &self.ctx, || self.item_type(record));
        }
        apply_scalar(t, v, &self.ctx, || self.item_type(record))
    }

    fn item_type(&self, record: &Record) -> Result<TypeId, String> {
        let f = self.item_type_field.ok_or("this type has no item_type")?;
        let Some(Json::Str(v)) = record.get(f) else {
            return Err("uuid5:item needs item_type, which is missing".into());
        };
        let t = schema().ty(self.ty);
        for def in &t.fields {
            if let Some(Reference::ByField { targets, .. }) = &def.reference {
                if let Some((_, ty)) = targets.iter().find(|(name, _)| name == &**v) {
                    return Ok(*ty);
                }
            }
        }
        Err("item_type has no parent type for uuid5:item".into())
    }
}

/// Builds a source key from key values (see [`CompiledMapping::source_key`]).
pub fn source_key<'a>(values: impl Iterator<Item = &'a Value>) -> String {
    // Sized for one UUID: most keys fit without growing.
    let mut out = String::with_capacity(36);
    for (i, v) in values.enumerate() {
        if i > 0 {
            out.push('|');
        }
        match v.to_text() {
            None => out.push_str("\\N"),
            Some(t) if !t.contains(['|', '\\']) => out.push_str(&t),
            Some(t) => {
                for c in t.chars() {
                    if c == '|' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
            }
        }
    }
    out
}

/// A UUID as lower-case hyphenated text (no formatting machinery).
fn uuid_string(u: &Uuid) -> String {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    u.hyphenated().encode_lower(&mut buf).to_string()
}

/// [`uuid5`] of a value's text form, without building the text for the
/// common kinds (integers, text, UUIDs).
fn uuid5_of(namespace: &Uuid, ty: TypeId, v: &Value) -> Result<Uuid, String> {
    match v {
        Value::Int(i) => Ok(uuid5(namespace, ty, itoa::Buffer::new().format(*i))),
        Value::Text(s) => Ok(uuid5(namespace, ty, s)),
        Value::Uuid(u) => {
            let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
            Ok(uuid5(namespace, ty, u.hyphenated().encode_lower(&mut buf)))
        }
        other => Ok(uuid5(namespace, ty, &text_of(other)?)),
    }
}

/// `UUIDv5(namespace, "<type>:<value>")` (DESIGN.md §3): SHA-1 of the
/// namespace and the name, hashed in place (no intermediate string), with
/// the `sha1` crate's hardware-accelerated backend where the CPU has one.
pub fn uuid5(namespace: &Uuid, ty: TypeId, value_text: &str) -> Uuid {
    use sha1::Digest;
    let mut h = sha1::Sha1::new();
    h.update(namespace.as_bytes());
    h.update(schema().ty(ty).name.as_bytes());
    h.update(b":");
    h.update(value_text.as_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

fn apply_map(v: Value, map: &[(String, Value)]) -> Value {
    match v {
        Value::Array(items) => Value::Array(items.into_iter().map(|x| apply_map(x, map)).collect()),
        other => match other.to_text() {
            Some(text) => match map.iter().find(|(k, _)| *k == text) {
                Some((_, to)) => to.clone(),
                None => other,
            },
            None => other,
        },
    }
}

fn text_of(v: &Value) -> Result<String, String> {
    v.to_text()
        .ok_or_else(|| "value has no text form (infinite or out-of-range date)".to_string())
}

fn apply_scalar(
    t: &Transform,
    v: Value,
    ctx: &MapContext,
    item_type: impl FnOnce() -> Result<TypeId, String>,
) -> Result<Value, String> {
    match t {
        Transform::IsNull => return Ok(Value::Bool(v.is_null())),
        Transform::IsNotNull => return Ok(Value::Bool(!v.is_null())),
        _ => {}
    }
    if v.is_null() {
        return Ok(Value::Null);
    }
    // The name only for an error: a `String` built per value otherwise.
    let fail = |what: &str| Err(format!("transform `{}`: {what}", t.name()));
    Ok(match t {
        Transform::Upper => Value::Text(text_of(&v)?.to_uppercase().into()),
        Transform::Lower => Value::Text(text_of(&v)?.to_lowercase().into()),
        Transform::Trim => Value::Text(text_of(&v)?.trim().into()),
        Transform::String => match v {
            Value::TimestampTz(t) => Value::Text(
                time::format_rfc3339(t)
                    .ok_or("transform `string`: infinite or out-of-range timestamp")?
                    .into(),
            ),
            other => Value::Text(text_of(&other)?.into()),
        },
        Transform::Number => match v {
            Value::Int(_) | Value::Float(_) | Value::Numeric(_) => v,
            Value::Text(s) => match parse_decimal(&s) {
                Some(n) => Value::Numeric(n.into()),
                None => return fail("text is not a number"),
            },
            _ => return fail(&format!("cannot make a number of a {}", v.kind())),
        },
        Transform::Date => match v {
            Value::Date(_) => v,
            Value::Timestamp(t) => Value::Date(time::naive_to_date(t)),
            Value::TimestampTz(t) => Value::Date(
                time::utc_to_date(t, ctx.timezone)
                    .ok_or("transform `date`: timestamp out of range")?,
            ),
            Value::Text(s) => match time::parse_pg_date(s.trim())
                .or_else(|| time::parse_pg_timestamp(s.trim()).map(time::naive_to_date))
            {
                Some(d) => Value::Date(d),
                None => return fail("text is not a date (YYYY-MM-DD)"),
            },
            _ => return fail(&format!("cannot make a date of a {}", v.kind())),
        },
        Transform::Datetime => Value::TimestampTz(
            to_utc_micros(&v, ctx.timezone).map_err(|e| format!("transform `datetime`: {e}"))?,
        ),
        Transform::EpochMs => {
            let micros = to_utc_micros(&v, ctx.timezone)
                .map_err(|e| format!("transform `epoch_ms`: {e}"))?;
            if micros == i64::MAX || micros == i64::MIN {
                return fail("infinite timestamp");
            }
            Value::Int(time::epoch_ms(micros))
        }
        Transform::Csv => match v {
            Value::Array(items) => {
                let mut out = String::new();
                for item in items.iter().filter(|x| !x.is_null()) {
                    if !out.is_empty() {
                        out.push(',');
                    }
                    out.push_str(&text_of(item)?);
                }
                Value::Text(out.into())
            }
            Value::Text(_) => v,
            _ => return fail(&format!("cannot join a {}", v.kind())),
        },
        Transform::Uuid5(ty) => {
            let ty = match ty {
                Some(t) => *t,
                None => return Err("transform `uuid5`: internal: own type not resolved".into()),
            };
            Value::Uuid(uuid5_of(&ctx.namespace, ty, &v)?)
        }
        Transform::Uuid5Item => {
            let ty = item_type()?;
            Value::Uuid(uuid5_of(&ctx.namespace, ty, &v)?)
        }
        Transform::IsNull | Transform::IsNotNull => unreachable!("handled above"),
    })
}

fn to_utc_micros(v: &Value, tz: Tz) -> Result<i64, String> {
    match v {
        Value::TimestampTz(t) => Ok(*t),
        Value::Timestamp(t) => {
            time::naive_to_utc(*t, tz).ok_or_else(|| "timestamp out of range".into())
        }
        Value::Date(d) => time::date_to_utc(*d, tz).ok_or_else(|| "date out of range".into()),
        Value::Text(s) => {
            let s = s.trim();
            if let Some(t) = time::parse_pg_timestamptz(s) {
                Ok(t)
            } else if let Some(t) = time::parse_pg_timestamp(s) {
                time::naive_to_utc(t, tz).ok_or_else(|| "timestamp out of range".into())
            } else if let Some(d) = time::parse_pg_date(s) {
                time::date_to_utc(d, tz).ok_or_else(|| "date out of range".into())
            } else {
                Err("text is not a date-time".into())
            }
        }
        other => Err(format!("cannot make a date-time of a {}", other.kind())),
    }
}

/// Validates and normalises decimal text (`" 12.50 "` → `12.50`,
/// `+1` → `1`, `1e3` kept). `None` if not a finite number.
fn parse_decimal(s: &str) -> Option<String> {
    // Decimal text in, a JSON number out (exact: no float round trip).
    // Accepts `[+-]digits[.digits][e[+-]digits]` with digits on at least one
    // side of the point; JSON forbids a leading '+', leading zeros, a bare
    // '.' at either end, so those are normalised away. NaN, infinities and
    // numbers beyond f64 range are refused: the API cannot take them.
    let t = s.trim();
    let (neg, body) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    let (mantissa, exp) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((i, f)) => (i, f),
        None => (mantissa, ""),
    };
    let all_digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !all_digits(int) || !all_digits(frac) {
        return None;
    }
    let exp = match exp {
        None => None,
        Some(e) => {
            let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
            if digits.is_empty() || !all_digits(digits) {
                return None;
            }
            Some(e)
        }
    };
    let int = int.trim_start_matches('0');
    let mut out = String::with_capacity(t.len() + 1);
    if neg {
        out.push('-');
    }
    out.push_str(if int.is_empty() { "0" } else { int });
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    if let Some(e) = exp {
        out.push('e');
        out.push_str(e);
    }
    out.parse::<f64>().ok().filter(|f| f.is_finite())?;
    Some(out)
}

/// Converts a final value to the field's JSON type and format.
fn to_json(v: Value, def: &FieldDef, tz: Tz) -> Result<Json, String> {
    let out_of_range = || "date or timestamp is infinite or outside years 1-9999".to_string();
    let rfc3339 = |micros: i64| time::format_rfc3339(micros).ok_or_else(out_of_range);
    match def.ty {
        FieldType::String => {
            let s: String = match (def.format, v) {
                (_, Value::Array(items)) if def.format == Some(Format::CommaSeparatedList) => {
                    match apply_scalar(
                        &Transform::Csv,
                        Value::Array(items),
                        &MapContext {
                            namespace: Uuid::nil(),
                            timezone: tz,
                        },
                        || Err(String::new()),
                    )? {
                        Value::Text(t) => t.into(),
                        _ => unreachable!("csv gives text"),
                    }
                }
                (_, Value::Array(_)) => return Err("an array needs transform = \"csv\"".into()),
                (Some(Format::Uuid), Value::Uuid(u)) => uuid_string(&u),
                (Some(Format::Uuid), Value::Text(s)) => match Uuid::try_parse(s.trim()) {
                    Ok(u) => uuid_string(&u),
                    Err(_) => return Err("text is not a UUID".into()),
                },
                (Some(Format::Uuid), other) => {
                    return Err(format!(
                        "a {} is not a UUID; use transform = \"uuid5\"",
                        other.kind()
                    ))
                }
                (
                    Some(Format::DateTime),
                    v @ (Value::TimestampTz(_)
                    | Value::Timestamp(_)
                    | Value::Date(_)
                    | Value::Text(_)),
                ) => rfc3339(to_utc_micros(&v, tz)?)?,
                (Some(Format::Date), Value::Date(d)) => {
                    time::format_date(d).ok_or_else(out_of_range)?
                }
                (Some(Format::Date), Value::Timestamp(t)) => {
                    time::format_date(time::naive_to_date(t)).ok_or_else(out_of_range)?
                }
                (Some(Format::Date), Value::TimestampTz(t)) => {
                    time::format_date(time::utc_to_date(t, tz).ok_or_else(out_of_range)?)
                        .ok_or_else(out_of_range)?
                }
                (Some(Format::Date), Value::Text(s)) => match time::parse_pg_date(s.trim()) {
                    Some(d) => time::format_date(d).ok_or_else(out_of_range)?,
                    None => return Err("text is not a date (YYYY-MM-DD)".into()),
                },
                (_, Value::Text(s)) => s.into(),
                (_, Value::Uuid(u)) => uuid_string(&u),
                (_, Value::Int(i)) => itoa::Buffer::new().format(i).to_string(),
                (_, Value::Float(f)) => format_float(f),
                (_, Value::Numeric(n)) => n.into(),
                (_, Value::Bool(b)) => b.to_string(),
                (_, Value::Date(d)) => time::format_date(d).ok_or_else(out_of_range)?,
                (_, Value::Timestamp(t)) => {
                    rfc3339(time::naive_to_utc(t, tz).ok_or_else(out_of_range)?)?
                }
                (_, Value::TimestampTz(t)) => rfc3339(t)?,
                (_, Value::Json(j)) => j.into(),
                (fmt, other) => return Err(format!("a {} cannot be {:?}", other.kind(), fmt)),
            };
            Ok(Json::Str(s.into()))
        }
        FieldType::Number => match v {
            Value::Int(i) => Ok(Json::Int(i)),
            Value::Float(f) if f.is_finite() => Ok(Json::Float(f)),
            Value::Float(_) => Err("NaN and infinity are not numbers the API accepts".into()),
            Value::Numeric(n) => match parse_decimal(&n) {
                Some(d) => Ok(Json::Num(d.into())),
                None => Err("NaN and infinity are not numbers the API accepts".into()),
            },
            Value::Text(s) => match parse_decimal(&s) {
                Some(d) => Ok(Json::Num(d.into())),
                None => Err("text is not a number".into()),
            },
            other => Err(format!("a {} is not a number", other.kind())),
        },
        FieldType::Integer => integer(&v).map(Json::Int),
        FieldType::Boolean => match v {
            Value::Bool(b) => Ok(Json::Bool(b)),
            Value::Text(s) if &*s == "true" => Ok(Json::Bool(true)),
            Value::Text(s) if &*s == "false" => Ok(Json::Bool(false)),
            other => Err(format!("a {} is not a boolean", other.kind())),
        },
        FieldType::IntegerOrString => match v {
            Value::Int(i) => Ok(Json::Int(i)),
            Value::Numeric(_) => integer(&v).map(Json::Int),
            v @ (Value::TimestampTz(_) | Value::Timestamp(_) | Value::Date(_)) => {
                Ok(Json::Str(rfc3339(to_utc_micros(&v, tz)?)?.into()))
            }
            Value::Text(s) => match s.trim().parse::<i64>() {
                Ok(i) => Ok(Json::Int(i)),
                Err(_) => Ok(Json::Str(
                    rfc3339(to_utc_micros(&Value::Text(s), tz)?)?.into(),
                )),
            },
            other => Err(format!("a {} is not an epoch or a date-time", other.kind())),
        },
    }
}

fn integer(v: &Value) -> Result<i64, String> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::Numeric(n) => {
            let t = n.trim_end_matches('0').trim_end_matches('.');
            let t = if n.contains('.') { t } else { n };
            t.parse()
                .map_err(|_| "numeric is not a whole number".to_string())
        }
        other => Err(format!("a {} is not an integer", other.kind())),
    }
}

#[cfg(test)]
mod tests;
