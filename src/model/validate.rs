//! Local validation of a record against the schema: what the API would
//! reject, caught before a request is spent on it.
//!
//! Reasons name the field and the rule, never the value (values may be a
//! student's personal data and reasons end up in logs).

use std::fmt;

use crate::mapping::time::{is_iso_date, is_rfc3339};
use crate::model::record::{Json, Record};
use crate::model::schema::{schema, FieldDef, FieldType, Format};

/// One rule a record breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Field name.
    pub field: String,
    /// What is wrong, without the value.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Joins problems into one dead-letter reason.
pub fn describe(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Checks a record against its type's schema. Empty when valid.
pub fn validate(record: &Record) -> Vec<Problem> {
    let t = schema().ty(record.ty);
    let mut problems = Vec::new();
    // The record's fields are sorted by id: walked beside the type's.
    debug_assert!(record.fields.windows(2).all(|w| w[0].0 < w[1].0));
    let mut present = record.fields.iter().peekable();
    for (i, def) in t.fields.iter().enumerate() {
        let id = i as u8;
        while present.next_if(|(f, _)| *f < id).is_some() {}
        let value = present.next_if(|(f, _)| *f == id).map(|(_, v)| v);
        match value {
            None if def.required => problems.push(problem(def, "required field is missing")),
            None => {}
            Some(Json::Null) if def.required => {
                problems.push(problem(def, "required field is null"))
            }
            Some(Json::Null) if !def.nullable && !nullable_by_enum(def) => {
                problems.push(problem(def, "must not be null (leave it out instead)"))
            }
            Some(Json::Null) => {}
            Some(v) => {
                if let Some(reason) = check_value(def, v) {
                    problems.push(problem(def, &reason));
                }
            }
        }
    }
    problems
}

fn nullable_by_enum(def: &FieldDef) -> bool {
    def.enumeration
        .as_ref()
        .is_some_and(|e| e.iter().any(|v| v.is_none()))
}

fn problem(def: &FieldDef, reason: &str) -> Problem {
    Problem {
        field: def.name.clone(),
        reason: reason.to_string(),
    }
}

fn check_value(def: &FieldDef, v: &Json) -> Option<String> {
    // JSON type.
    let type_ok = match def.ty {
        FieldType::String => matches!(v, Json::Str(_)),
        FieldType::Number => matches!(v, Json::Int(_) | Json::Float(_) | Json::Num(_)),
        FieldType::Integer => matches!(v, Json::Int(_)),
        FieldType::Boolean => matches!(v, Json::Bool(_)),
        FieldType::IntegerOrString => matches!(v, Json::Int(_) | Json::Str(_)),
    };
    if !type_ok {
        let want = match def.ty {
            FieldType::String => "a string",
            FieldType::Number => "a number",
            FieldType::Integer => "an integer",
            FieldType::Boolean => "a boolean",
            FieldType::IntegerOrString => "an integer or a date-time string",
        };
        return Some(format!("must be {want}"));
    }
    // A decimal's text is parsed once, for this and the bounds below.
    let number = match v {
        Json::Num(n) => match n.parse::<f64>() {
            Ok(f) if f.is_finite() => Some(f),
            _ => return Some("must be a finite number".into()),
        },
        other => other.as_f64(),
    };
    // Format.
    match (def.format, v) {
        (Some(Format::Uuid), Json::Str(s)) if uuid::Uuid::try_parse(s).is_err() => {
            return Some("must be a UUID (e.g. 550e8400-e29b-41d4-a716-446655440000)".into());
        }
        (Some(Format::DateTime), Json::Str(s)) if !is_rfc3339(s) => {
            return Some("must be an RFC 3339 date-time (e.g. 2024-01-15T14:30:00Z)".into());
        }
        (Some(Format::Date), Json::Str(s)) if !is_iso_date(s) => {
            return Some("must be a date YYYY-MM-DD (e.g. 2001-04-30)".into());
        }
        (Some(Format::CountryCode), Json::Str(s))
            if !(s.len() == 2 && s.bytes().all(|b| b.is_ascii_uppercase())) =>
        {
            return Some(
                "must be two upper-case letters, ISO 3166-1 alpha-2 (e.g. CA); \
                 add transform = \"upper\" if the source is lower-case"
                    .into(),
            );
        }
        (Some(Format::CommaSeparatedList), Json::Str(s))
            if def.reference.is_some()
                && !s.is_empty()
                && s.split(',').any(|e| uuid::Uuid::try_parse(e).is_err()) =>
        {
            return Some(
                "must list UUIDs of the referenced records; derive them with                  transform = [\"uuid5:<type>\", \"csv\"]"
                    .into(),
            );
        }
        (Some(Format::EpochIntegerOrIsoDateTime), Json::Int(i)) if *i <= 0 => {
            return Some("must be a positive integer epoch".into());
        }
        (Some(Format::EpochIntegerOrIsoDateTime), Json::Str(s)) if !is_rfc3339(s) => {
            return Some("must be a positive integer or an RFC 3339 date-time".into());
        }
        _ => {}
    }
    // Enumeration.
    if let (Some(allowed), Json::Str(s)) = (&def.enumeration, v) {
        if !allowed.iter().any(|a| a.as_deref() == Some(&**s)) {
            let list: Vec<&str> = allowed.iter().flatten().map(|s| s.as_str()).collect();
            return Some(format!("must be one of {}", list.join(", ")));
        }
    }
    // Numeric bounds.
    if let Some(x) = number {
        if let Some(min) = def.minimum {
            if x < min {
                return Some(format!("must be >= {min}"));
            }
        }
        if let Some(min) = def.exclusive_minimum {
            if x <= min {
                return Some(format!("must be > {min}"));
            }
        }
        if let Some((lo, hi)) = def.range {
            if !(lo..=hi).contains(&x) {
                return Some(format!("must be between {lo} and {hi}"));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::schema::TypeId;

    fn rec(ty: &str, fields: &[(&str, Json)]) -> Record {
        let s = schema();
        let id: TypeId = s.type_id(ty).unwrap();
        let t = s.ty(id);
        let mut r = Record::new(id);
        for (n, v) in fields {
            r.set(t.field(n).unwrap(), v.clone());
        }
        r
    }

    fn s(v: &str) -> Json {
        Json::Str(v.into())
    }

    const U1: &str = "550e8400-e29b-41d4-a716-446655440000";
    const U2: &str = "550e8400-e29b-41d4-a716-446655440001";

    fn valid_tx() -> Vec<(&'static str, Json)> {
        vec![
            ("transaction_id", s(U1)),
            ("shop_id", s(U2)),
            ("region", s("CA")),
            ("savings", Json::Int(0)),
            ("amount", Json::Num("12.50".into())),
        ]
    }

    #[test]
    fn reference_lists_must_list_uuids() {
        let offer = |list: &str| {
            validate(&rec("offers", &[("allowed_branches", s(list))]))
                .into_iter()
                .find(|p| p.field == "allowed_branches")
                .map(|p| p.reason)
        };
        assert!(offer("1,2,3").unwrap().starts_with("must list UUIDs"));
        assert!(offer(&format!("{U1},7")).is_some());
        assert_eq!(offer(&format!("{U1},{U2}")), None);
        assert_eq!(offer(""), None);
    }

    #[test]
    fn table_of_rules() {
        let with = |field: &'static str, v: Json| {
            let mut f = valid_tx();
            f.retain(|(n, _)| *n != field);
            f.push((field, v));
            f
        };
        let without = |field: &'static str| {
            let mut f = valid_tx();
            f.retain(|(n, _)| *n != field);
            f
        };
        type Case<'a> = (&'a str, Vec<(&'a str, Json)>, Option<&'a str>);
        let cases: Vec<Case> = vec![
            ("valid", valid_tx(), None),
            (
                "missing required",
                without("shop_id"),
                Some("shop_id: required field is missing"),
            ),
            (
                "null required",
                with("shop_id", Json::Null),
                Some("shop_id: required field is null"),
            ),
            (
                "bad uuid",
                with("shop_id", s("42")),
                Some("shop_id: must be a UUID"),
            ),
            (
                "region lower",
                with("region", s("ca")),
                Some("region: must be two upper-case"),
            ),
            (
                "region long",
                with("region", s("CAN")),
                Some("region: must be two upper-case"),
            ),
            (
                "amount zero",
                with("amount", Json::Int(0)),
                Some("amount: must be > 0"),
            ),
            (
                "amount negative",
                with("amount", Json::Num("-0.01".into())),
                Some("amount: must be > 0"),
            ),
            (
                "savings negative",
                with("savings", Json::Float(-1.0)),
                Some("savings: must be >= 0"),
            ),
            (
                "amount string",
                with("amount", s("12")),
                Some("amount: must be a number"),
            ),
            (
                "bad datetime",
                with("created", s("2024-01-01 10:00")),
                Some("created: must be an RFC 3339"),
            ),
            (
                "good datetime",
                with("created", s("2024-01-01T10:00:00.000001Z")),
                None,
            ),
            ("nullable null", with("created", Json::Null), None),
            (
                "not nullable null",
                with("discount_name", Json::Null),
                Some("discount_name: must not be null"),
            ),
        ];
        for (name, fields, want) in cases {
            let problems = validate(&rec("transactions", &fields));
            match want {
                None => assert!(problems.is_empty(), "{name}: {problems:?}"),
                Some(w) => {
                    let text = describe(&problems);
                    assert!(text.starts_with(w), "{name}: got {text}");
                }
            }
        }
    }

    #[test]
    fn dates_enums_and_ranges() {
        let c = rec(
            "customers",
            &[
                ("customer_id", s(U1)),
                ("user_id", s(U2)),
                ("region", s("US")),
                ("birthdate", s("2001-02-30")),
            ],
        );
        assert_eq!(
            describe(&validate(&c)),
            "birthdate: must be a date YYYY-MM-DD (e.g. 2001-04-30)"
        );
        let b = rec(
            "branches",
            &[
                ("branch_id", s(U1)),
                ("shop_id", s(U2)),
                ("name", s("Main")),
                ("region", s("US")),
                ("latitude", Json::Float(91.0)),
                ("longitude", Json::Float(-180.0)),
            ],
        );
        assert_eq!(
            describe(&validate(&b)),
            "latitude: must be between -90 and 90"
        );
        let i = rec(
            "interactions",
            &[
                ("interaction_type", s("CLICK")),
                ("item_type", s("SHOP")),
                ("item_id", s(U1)),
                ("event_timestamp", Json::Int(1_700_000_000_000)),
                ("source", Json::Null),
            ],
        );
        assert_eq!(
            describe(&validate(&i)),
            "interaction_type: must be one of FILTER_CLICK, SHARE, PAGE_VIEW, DISCOUNT_CODE"
        );
        let i = rec(
            "interactions",
            &[
                ("interaction_type", s("SHARE")),
                ("item_type", s("SHOP")),
                ("item_id", s(U1)),
                ("event_timestamp", Json::Int(0)),
            ],
        );
        assert_eq!(
            describe(&validate(&i)),
            "event_timestamp: must be a positive integer epoch"
        );
    }
}
