//! Request bodies parsed straight into [`Record`]s, without building a
//! `serde_json::Value` tree per record.
//!
//! The result is the same [`Record`] that [`Record::from_json`] builds for
//! the same object (a test below pins that), but the parse goes through
//! serde's streaming visitors with borrowed keys, so the only allocations
//! are the record's own values. Unlike [`Record::from_json`], a bad field
//! does not stop the parse: unknown fields and array/object values are
//! collected as [`Problem`]s so that the record can still be named by its
//! key in the answer.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::model::record::{Json, Record};
use crate::model::schema::{schema, FieldId, FieldType, TypeDef, TypeId};
use crate::model::validate::Problem;

/// One element of a request: the record (when the element is an object)
/// and what made it unparseable.
#[derive(Debug)]
pub(crate) struct Parsed {
    /// The fields that could be read; `None` when the element is not a
    /// JSON object.
    pub record: Option<Record>,
    /// Unknown fields, values that are arrays or objects, or "not an
    /// object".
    pub problems: Vec<Problem>,
}

/// A `{"records": [...]}` body.
#[derive(Debug)]
pub(crate) struct Batch {
    /// The first `max + 1` elements, parsed (the rest are only counted).
    pub records: Vec<Parsed>,
    /// How many elements the array holds.
    pub total: usize,
}

/// Why a batch body is unusable as a whole.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// Not JSON, or not an object whose `records` is an array.
    Json(serde_json::Error),
    /// An object without `records`.
    NoRecords,
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::Json(e) => {
                write!(f, "body must be a JSON object {{\"records\": [...]}}: {e}")
            }
            BodyError::NoRecords => {
                f.write_str("body must be a JSON object {\"records\": [...]}: `records` is missing")
            }
        }
    }
}

/// Parses a batch body for type `ty`. Elements after the first `max + 1`
/// are skipped (only counted), which bounds the work an oversized request
/// costs.
pub(crate) fn parse_batch(ty: TypeId, body: &[u8], max: usize) -> Result<Batch, BodyError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let batch = BodySeed { ty, max }
        .deserialize(&mut de)
        .map_err(BodyError::Json)?;
    de.end().map_err(BodyError::Json)?;
    batch.ok_or(BodyError::NoRecords)
}

/// Parses a body holding one record object (`/user-interactions`).
pub(crate) fn parse_one(ty: TypeId, body: &[u8]) -> Result<Parsed, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = RecordSeed { ty }.deserialize(&mut de)?;
    de.end()?;
    Ok(parsed)
}

// ---- the body -------------------------------------------------------------

struct BodySeed {
    ty: TypeId,
    max: usize,
}

impl<'de> DeserializeSeed<'de> for BodySeed {
    type Value = Option<Batch>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for BodySeed {
    type Value = Option<Batch>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object {\"records\": [...]}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = None;
        while let Some(is_records) = map.next_key_seed(IsRecordsKey)? {
            if !is_records {
                map.next_value::<IgnoredAny>()?;
            } else if out.is_some() {
                return Err(de::Error::duplicate_field("records"));
            } else {
                out = Some(map.next_value_seed(RecordsSeed {
                    ty: self.ty,
                    max: self.max,
                })?);
            }
        }
        Ok(out)
    }
}

/// A key of the body object: is it `records`?
struct IsRecordsKey;

impl<'de> DeserializeSeed<'de> for IsRecordsKey {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for IsRecordsKey {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == "records")
    }
}

struct RecordsSeed {
    ty: TypeId,
    max: usize,
}

impl<'de> DeserializeSeed<'de> for RecordsSeed {
    type Value = Batch;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Batch, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RecordsSeed {
    type Value = Batch;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of records")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Batch, A::Error> {
        let cap = seq.size_hint().unwrap_or(0).min(self.max + 1);
        let mut records = Vec::with_capacity(cap);
        let mut total = 0;
        loop {
            if total <= self.max {
                match seq.next_element_seed(RecordSeed { ty: self.ty })? {
                    Some(p) => records.push(p),
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            total += 1;
        }
        Ok(Batch { records, total })
    }
}

// ---- one record -----------------------------------------------------------

/// Parses one array element (or a whole `/user-interactions` body).
struct RecordSeed {
    ty: TypeId,
}

impl RecordSeed {
    fn not_an_object(&self) -> Parsed {
        Parsed {
            record: None,
            problems: vec![Problem {
                field: "record".into(),
                reason: "must be a JSON object".into(),
            }],
        }
    }
}

impl<'de> DeserializeSeed<'de> for RecordSeed {
    type Value = Parsed;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Parsed, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RecordSeed {
    type Value = Parsed;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a record object")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Parsed, E> {
        Ok(self.not_an_object())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Parsed, E> {
        Ok(self.not_an_object())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Parsed, E> {
        Ok(self.not_an_object())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Parsed, E> {
        Ok(self.not_an_object())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Parsed, E> {
        Ok(self.not_an_object())
    }
    fn visit_unit<E: de::Error>(self) -> Result<Parsed, E> {
        Ok(self.not_an_object())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Parsed, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(self.not_an_object())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Parsed, A::Error> {
        let t = schema().ty(self.ty);
        let mut record = Record {
            ty: self.ty,
            fields: Vec::with_capacity(t.fields.len()),
        };
        let mut problems = Vec::new();
        // Senders usually write fields in schema order: look up the next
        // field first.
        let mut hint = 0usize;
        while let Some(key) = map.next_key_seed(FieldKey { t, hint })? {
            match key {
                Ok(f) => {
                    hint = f as usize + 1;
                    let def = &t.fields[f as usize];
                    match map.next_value_seed(ValueSeed(def.ty))? {
                        Ok(v) => record.set(f, v),
                        Err(reason) => problems.push(Problem {
                            field: def.name.clone(),
                            reason: reason.into(),
                        }),
                    }
                }
                Err(name) => {
                    map.next_value::<IgnoredAny>()?;
                    problems.push(Problem {
                        field: name,
                        reason: format!("unknown field for type {}", t.name),
                    });
                }
            }
        }
        Ok(Parsed {
            record: Some(record),
            problems,
        })
    }
}

/// A record key: the field id, or the unknown name.
struct FieldKey<'s> {
    t: &'s TypeDef,
    hint: usize,
}

impl<'de> DeserializeSeed<'de> for FieldKey<'_> {
    type Value = Result<FieldId, String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for FieldKey<'_> {
    type Value = Result<FieldId, String>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let fields = &self.t.fields;
        if fields.get(self.hint).is_some_and(|f| f.name == v) {
            return Ok(Ok(self.hint as FieldId));
        }
        Ok(fields
            .iter()
            .position(|f| f.name == v)
            .map(|i| i as FieldId)
            .ok_or_else(|| v.to_string()))
    }
}

/// A scalar field value, converted exactly as [`Json::from_value`] does.
struct ValueSeed(FieldType);

impl<'de> DeserializeSeed<'de> for ValueSeed {
    type Value = Result<Json, &'static str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed {
    type Value = Result<Json, &'static str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON scalar")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Ok(Json::Null))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Ok(Json::Bool(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Ok(Json::Int(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Ok(match i64::try_from(v) {
            Ok(i) => Json::Int(i),
            Err(_) if self.0 == FieldType::Integer => Json::Float(v as f64),
            Err(_) => Json::Num(v.to_string().into()),
        }))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Ok(if self.0 == FieldType::Integer {
            Json::Float(v)
        } else {
            match serde_json::Number::from_f64(v) {
                Some(n) => Json::Num(n.to_string().into()),
                None => return Ok(Err("must be a finite number")),
            }
        }))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Ok(Json::Str(v.into())))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Err("arrays are not allowed"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Err("objects are not allowed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> TypeId {
        schema().type_id(name).unwrap()
    }

    #[test]
    fn same_records_as_from_json() {
        let cases: &[(&str, &str)] = &[
            (
                "shops",
                r#"{"shop_id":"550e8400-e29b-41d4-a716-446655440000","name":"Caf\u00e9 \"Zo\u00eb\"\n","region":"CA","is_public":true,"created":null}"#,
            ),
            (
                "shops",
                r#"{ "region" : "CA", "name": "x", "shop_id": "a", "name": "y" }"#,
            ),
            (
                "transactions",
                r#"{"transaction_id":"t","shop_id":"s","region":"US","savings":0,"amount":12.50,"discount_value":1e3,"created":"2024-01-01T00:00:00Z"}"#,
            ),
            (
                "transactions",
                r#"{"amount":18446744073709551615,"savings":-3,"discount_value":0.1}"#,
            ),
            (
                "interactions",
                r#"{"interaction_type":"SHARE","event_timestamp":1700000000000,"item_type":"SHOP","item_id":"x"}"#,
            ),
            (
                "interactions",
                r#"{"event_timestamp":18446744073709551615}"#,
            ),
            ("interactions", r#"{"event_timestamp":1.5}"#),
            ("branches", r#"{"latitude":-45.25,"longitude":170}"#),
            ("shops", r#"{}"#),
        ];
        for (ty, text) in cases {
            let want = Record::from_json(id(ty), text.as_bytes()).unwrap();
            let got = parse_one(id(ty), text.as_bytes()).unwrap();
            assert!(got.problems.is_empty(), "{text}: {:?}", got.problems);
            assert_eq!(got.record.unwrap(), want, "{text}");
        }
    }

    #[test]
    fn bad_fields_are_collected_not_fatal() {
        let p = parse_one(
            id("shops"),
            br#"{"shop_id":"k","colour":{"a":[1]},"name":[1,2],"region":"CA"}"#,
        )
        .unwrap();
        let r = p.record.unwrap();
        assert_eq!(r.cobi_key().as_deref(), Some("k"));
        let text: Vec<String> = p.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            text,
            [
                "colour: unknown field for type shops",
                "name: arrays are not allowed"
            ]
        );
        let p = parse_one(id("shops"), b"[1]").unwrap();
        assert!(p.record.is_none());
    }

    #[test]
    fn batch_bodies() {
        let shops = id("shops");
        let b = parse_batch(
            shops,
            br#"{"x":[{}],"records":[{"shop_id":"a"},7,null]}"#,
            10,
        )
        .unwrap();
        assert_eq!(b.total, 3);
        assert!(b.records[0].record.is_some());
        assert!(b.records[1].record.is_none());
        assert!(b.records[2].record.is_none());
        // Only max + 1 are parsed; all are counted.
        let b = parse_batch(shops, br#"{"records":[{},{},{},{}]}"#, 1).unwrap();
        assert_eq!((b.records.len(), b.total), (2, 4));
        for bad in [
            &b"not json"[..],
            br#"{"records":{}}"#,
            br#"[{"records":[]}]"#,
            br#"{"records":[],"records":[]}"#,
            br#"{"records":[]} x"#,
        ] {
            assert!(
                matches!(parse_batch(shops, bad, 10), Err(BodyError::Json(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            parse_batch(shops, br#"{"rec":[]}"#, 10),
            Err(BodyError::NoRecords)
        ));
    }
}
