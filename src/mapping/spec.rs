//! Field specs as the configuration states them (DESIGN.md §3):
//! `"column"`, `{ column, transform?, default?, map? }`, `{ value = … }`.
//!
//! [`parse_field_spec`] turns one `[mapping.fields]` entry into a
//! [`FieldSpec`], with errors that say which part is wrong.

use crate::mapping::value::Value;
use crate::model::schema::{schema, FieldId, Reference, TypeId};

/// A transform, applied in list order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transform {
    /// Upper-case text.
    Upper,
    /// Lower-case text.
    Lower,
    /// Trim surrounding whitespace.
    Trim,
    /// Any value → its text form.
    String,
    /// Text or number → exact number.
    Number,
    /// Timestamp or text → date.
    Date,
    /// Date, timestamp or text → UTC date-time (`date` = midnight in
    /// `source.timezone`).
    Datetime,
    /// Date-time → milliseconds since the Unix epoch.
    EpochMs,
    /// `true` when NULL.
    IsNull,
    /// `true` when not NULL.
    IsNotNull,
    /// Array → `a,b,c`.
    Csv,
    /// `UUIDv5(ids.namespace, "<type>:<value>")`, with the mapping's own
    /// type (`None`) or a named one.
    Uuid5(Option<TypeId>),
    /// `uuid5` with the type chosen by the record's `item_type`.
    Uuid5Item,
}

impl Transform {
    /// Does this transform work on a whole array rather than each element?
    pub fn takes_whole_array(&self) -> bool {
        matches!(
            self,
            Transform::Csv | Transform::IsNull | Transform::IsNotNull
        )
    }

    /// The configuration spelling.
    pub fn name(&self) -> String {
        match self {
            Transform::Upper => "upper".into(),
            Transform::Lower => "lower".into(),
            Transform::Trim => "trim".into(),
            Transform::String => "string".into(),
            Transform::Number => "number".into(),
            Transform::Date => "date".into(),
            Transform::Datetime => "datetime".into(),
            Transform::EpochMs => "epoch_ms".into(),
            Transform::IsNull => "is_null".into(),
            Transform::IsNotNull => "is_not_null".into(),
            Transform::Csv => "csv".into(),
            Transform::Uuid5(None) => "uuid5".into(),
            Transform::Uuid5(Some(t)) => format!("uuid5:{}", schema().ty(*t).name),
            Transform::Uuid5Item => "uuid5:item".into(),
        }
    }
}

/// Every transform name, for error messages.
pub const TRANSFORM_NAMES: &str = "upper, lower, trim, string, number, date, datetime, epoch_ms, \
     is_null, is_not_null, csv, uuid5, uuid5:<type>, uuid5:item";

/// How one Cobi field gets its value.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldSpec {
    /// From a source column.
    Column {
        /// Source column name.
        column: String,
        /// Transforms in order.
        transforms: Vec<Transform>,
        /// Value rewrites (`{ "M" = "male" }`), matched on the value's text.
        map: Vec<(String, Value)>,
        /// Used when the result is NULL.
        default: Option<Value>,
    },
    /// A constant.
    Const(Value),
}

impl FieldSpec {
    /// The source column, if any.
    pub fn column(&self) -> Option<&str> {
        match self {
            FieldSpec::Column { column, .. } => Some(column),
            FieldSpec::Const(_) => None,
        }
    }
}

/// Converts a TOML scalar (as JSON) into a [`Value`].
pub fn const_value(v: &serde_json::Value) -> Result<Value, String> {
    Ok(match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(f) = n.as_f64() {
                Value::Float(f)
            } else {
                Value::Numeric(n.to_string().into())
            }
        }
        serde_json::Value::String(s) => Value::Text(s.as_str().into()),
        serde_json::Value::Array(items) => {
            Value::Array(items.iter().map(const_value).collect::<Result<_, _>>()?)
        }
        serde_json::Value::Object(_) => return Err("a table is not a value".into()),
    })
}

/// Parses one transform name for a mapping of type `own`, target `field`.
pub fn parse_transform(name: &str, own: TypeId, field: FieldId) -> Result<Transform, String> {
    Ok(match name {
        "upper" => Transform::Upper,
        "lower" => Transform::Lower,
        "trim" => Transform::Trim,
        "string" => Transform::String,
        "number" => Transform::Number,
        "date" => Transform::Date,
        "datetime" => Transform::Datetime,
        "epoch_ms" => Transform::EpochMs,
        "is_null" => Transform::IsNull,
        "is_not_null" => Transform::IsNotNull,
        "csv" => Transform::Csv,
        "uuid5" => Transform::Uuid5(None),
        "uuid5:item" => {
            let f = &schema().ty(own).fields[field as usize];
            if !matches!(f.reference, Some(Reference::ByField { .. })) {
                return Err(format!(
                    "uuid5:item only applies to a field whose parent type depends on another \
                     field (interactions.item_id), not {}.{}",
                    schema().ty(own).name,
                    f.name
                ));
            }
            Transform::Uuid5Item
        }
        other => {
            if let Some(t) = other.strip_prefix("uuid5:") {
                let id = schema().type_id(t).ok_or_else(|| {
                    format!(
                        "unknown type `{t}` in `{other}`; types are: {}",
                        schema().type_names().join(", ")
                    )
                })?;
                Transform::Uuid5(Some(id))
            } else {
                return Err(format!(
                    "unknown transform `{other}`; known: {TRANSFORM_NAMES}"
                ));
            }
        }
    })
}

/// Parses a `[mapping.fields]` entry.
pub fn parse_field_spec(
    v: &serde_json::Value,
    own: TypeId,
    field: FieldId,
) -> Result<FieldSpec, String> {
    match v {
        serde_json::Value::String(col) => {
            if col.is_empty() {
                return Err("column name is empty".into());
            }
            Ok(FieldSpec::Column {
                column: col.clone(),
                transforms: Vec::new(),
                map: Vec::new(),
                default: None,
            })
        }
        serde_json::Value::Object(obj) => {
            if let Some(val) = obj.get("value") {
                if obj.len() > 1 {
                    return Err("`value` cannot be combined with other keys".into());
                }
                return Ok(FieldSpec::Const(const_value(val)?));
            }
            let mut column = None;
            let mut transforms = Vec::new();
            let mut map = Vec::new();
            let mut default = None;
            for (k, val) in obj {
                match k.as_str() {
                    "column" => match val {
                        serde_json::Value::String(c) if !c.is_empty() => column = Some(c.clone()),
                        _ => return Err("`column` must be a column name string".into()),
                    },
                    "transform" => {
                        let names: Vec<&str> = match val {
                            serde_json::Value::String(s) => vec![s.as_str()],
                            serde_json::Value::Array(a) => a
                                .iter()
                                .map(|x| {
                                    x.as_str().ok_or_else(|| {
                                        "`transform` list must hold names".to_string()
                                    })
                                })
                                .collect::<Result<_, _>>()?,
                            _ => return Err("`transform` must be a name or a list of names".into()),
                        };
                        for n in names {
                            transforms.push(parse_transform(n, own, field)?);
                        }
                    }
                    "map" => match val {
                        serde_json::Value::Object(m) => {
                            for (from, to) in m {
                                map.push((from.clone(), const_value(to)?));
                            }
                        }
                        _ => return Err("`map` must be a table like { \"M\" = \"male\" }".into()),
                    },
                    "default" => default = Some(const_value(val)?),
                    other => {
                        return Err(format!(
                            "unknown key `{other}`; a field spec takes column, transform, \
                             default, map, or value"
                        ))
                    }
                }
            }
            let column = column.ok_or("missing `column` (or use { value = … } for a constant)")?;
            Ok(FieldSpec::Column {
                column,
                transforms,
                map,
                default,
            })
        }
        _ => Err("must be a column name or a table { column = …, transform = … }".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ids(ty: &str, field: &str) -> (TypeId, FieldId) {
        let t = schema().type_id(ty).unwrap();
        (t, schema().ty(t).field(field).unwrap())
    }

    #[test]
    fn spec_forms() {
        let (t, f) = ids("branches", "shop_id");
        assert_eq!(
            parse_field_spec(&json!("merchant_id"), t, f).unwrap(),
            FieldSpec::Column {
                column: "merchant_id".into(),
                transforms: vec![],
                map: vec![],
                default: None
            }
        );
        let spec = parse_field_spec(
            &json!({"column": "merchant_id", "transform": ["trim", "uuid5:shops"], "default": "x", "map": {"a": "b"}}),
            t,
            f,
        )
        .unwrap();
        let shops = schema().type_id("shops").unwrap();
        assert_eq!(
            spec,
            FieldSpec::Column {
                column: "merchant_id".into(),
                transforms: vec![Transform::Trim, Transform::Uuid5(Some(shops))],
                map: vec![("a".into(), Value::Text("b".into()))],
                default: Some(Value::Text("x".into())),
            }
        );
        assert_eq!(
            parse_field_spec(&json!({"value": true}), t, f).unwrap(),
            FieldSpec::Const(Value::Bool(true))
        );
    }

    #[test]
    fn spec_errors_say_what_is_wrong() {
        let (t, f) = ids("branches", "shop_id");
        let cases = [
            (
                json!({"column": "a", "transform": "uuid5:nosuchtype"}),
                "unknown type `nosuchtype`",
            ),
            (
                json!({"column": "a", "transform": "shout"}),
                "unknown transform `shout`",
            ),
            (
                json!({"column": "a", "transform": "uuid5:item"}),
                "uuid5:item only applies",
            ),
            (json!({"transform": "upper"}), "missing `column`"),
            (json!({"column": "a", "colour": 1}), "unknown key `colour`"),
            (json!({"value": 1, "column": "a"}), "cannot be combined"),
            (json!(42), "must be a column name"),
            (json!({"column": "a", "map": "x"}), "`map` must be a table"),
        ];
        for (v, want) in cases {
            let err = parse_field_spec(&v, t, f).unwrap_err();
            assert!(err.contains(want), "{v}: {err}");
        }
        let (t, f) = ids("interactions", "item_id");
        assert_eq!(
            parse_transform("uuid5:item", t, f).unwrap(),
            Transform::Uuid5Item
        );
    }
}
