//! A Cobi record: typed field values, serialised once to the JSON the API
//! receives.
//!
//! Records are built by the mapping engine, validated by
//! [`crate::model::validate`], serialised with [`Record::to_json`] and
//! parsed back (dead-letter replay, soft deletes from the last-sent copy,
//! the mock API) with [`Record::from_json`].

use std::fmt::Write as _;

use crate::model::schema::{schema, FieldId, FieldType, TypeId};

/// A field value as sent to the API.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A finite float.
    Float(f64),
    /// An exact decimal number, printed verbatim (from `numeric`).
    Num(Box<str>),
    /// A string.
    Str(Box<str>),
}

impl Json {
    /// The value as a float, for range checks (`amount > 0`).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Json::Int(i) => Some(*i as f64),
            Json::Float(f) => Some(*f),
            Json::Num(s) => s.parse().ok(),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Appends the value as JSON (the bytes [`Record::write_json`] uses).
    pub fn write(&self, out: &mut Vec<u8>) {
        match self {
            Json::Null => out.extend_from_slice(b"null"),
            Json::Bool(true) => out.extend_from_slice(b"true"),
            Json::Bool(false) => out.extend_from_slice(b"false"),
            Json::Int(i) => {
                out.extend_from_slice(itoa::Buffer::new().format(*i).as_bytes());
            }
            Json::Float(f) => {
                // serde_json prints the shortest representation that
                // round-trips; non-finite values never get here (mapping
                // rejects them).
                let _ = serde_json::to_writer(&mut *out, f);
            }
            Json::Num(s) => out.extend_from_slice(s.as_bytes()),
            Json::Str(s) => write_json_str(out, s),
        }
    }
}

/// Appends `s` as a JSON string literal.
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // Fast path: nothing to escape (ids, names, codes — nearly everything).
    if !bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\') {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => {
                out.extend_from_slice(&bytes[start..i]);
                let _ = write!(VecWriter(out), "\\u{:04x}", b);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Per type, per field id: the field's name as a JSON object key with its
/// colon (`"shop_id":`), escaped once instead of for every record.
fn json_keys(ty: TypeId) -> &'static [Box<[u8]>] {
    static KEYS: std::sync::OnceLock<Vec<Vec<Box<[u8]>>>> = std::sync::OnceLock::new();
    let all = KEYS.get_or_init(|| {
        schema()
            .types
            .iter()
            .map(|t| {
                t.fields
                    .iter()
                    .map(|f| {
                        let mut k = Vec::with_capacity(f.name.len() + 3);
                        write_json_str(&mut k, &f.name);
                        k.push(b':');
                        k.into_boxed_slice()
                    })
                    .collect()
            })
            .collect()
    });
    &all[ty as usize]
}

struct VecWriter<'a>(&'a mut Vec<u8>);
impl std::fmt::Write for VecWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// A record of one Cobi type: the fields that are present, in schema order.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The record's type.
    pub ty: TypeId,
    /// Present fields (absent fields are omitted from the JSON), sorted by
    /// field id.
    pub fields: Vec<(FieldId, Json)>,
}

impl Record {
    /// An empty record of a type.
    pub fn new(ty: TypeId) -> Self {
        Record {
            ty,
            fields: Vec::new(),
        }
    }

    /// An empty record with room for `fields` fields.
    pub fn with_capacity(ty: TypeId, fields: usize) -> Self {
        Record {
            ty,
            fields: Vec::with_capacity(fields),
        }
    }

    /// The value of a field, if present.
    pub fn get(&self, field: FieldId) -> Option<&Json> {
        self.fields
            .iter()
            .find(|(f, _)| *f == field)
            .map(|(_, v)| v)
    }

    /// The value of a field by name.
    pub fn get_named(&self, name: &str) -> Option<&Json> {
        let f = schema().ty(self.ty).field(name)?;
        self.get(f)
    }

    /// Sets a field, keeping fields sorted.
    pub fn set(&mut self, field: FieldId, value: Json) {
        match self.fields.binary_search_by_key(&field, |(f, _)| *f) {
            Ok(i) => self.fields[i].1 = value,
            Err(i) => self.fields.insert(i, (field, value)),
        }
    }

    /// The API's identity of the record: its key fields' values joined by
    /// `|` (the natural key for types whose key is optional), or `None` for
    /// types without a key (interactions) or when a key field is missing.
    pub fn cobi_key(&self) -> Option<String> {
        let t = schema().ty(self.ty);
        let key = if t
            .key
            .iter()
            .all(|k| self.get(*k).is_some_and(|v| v != &Json::Null))
        {
            t.key.clone()
        } else {
            t.natural_key()
        };
        if key.is_empty() {
            return None;
        }
        let mut out = String::new();
        for (i, k) in key.iter().enumerate() {
            if i > 0 {
                out.push('|');
            }
            match self.get(*k)? {
                Json::Str(s) => out.push_str(s),
                Json::Null => return None,
                other => {
                    let mut b = Vec::new();
                    other.write(&mut b);
                    out.push_str(&String::from_utf8_lossy(&b));
                }
            }
        }
        Some(out)
    }

    /// Serialises the record as a JSON object, fields in schema order.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.json_len_hint());
        self.write_json(&mut out);
        out
    }

    /// An upper bound of the JSON length for typical values (escapes
    /// aside), so serialising allocates once.
    pub fn json_len_hint(&self) -> usize {
        let t = schema().ty(self.ty);
        2 + self
            .fields
            .iter()
            .map(|(f, v)| {
                t.fields[*f as usize].name.len()
                    + 4
                    + match v {
                        Json::Str(s) => s.len() + 2,
                        Json::Num(s) => s.len(),
                        _ => 24,
                    }
            })
            .sum::<usize>()
    }

    /// Appends the JSON object to `out`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let keys = json_keys(self.ty);
        out.push(b'{');
        for (i, (f, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&keys[*f as usize]);
            v.write(out);
        }
        out.push(b'}');
    }

    /// Parses a JSON object into a record of `ty`. Unknown fields are an
    /// error. Numbers keep their exact text (`12345678901234567890.1234567890`
    /// stays that, never a float): integers that fit an `i64` and print the
    /// same become [`Json::Int`], every other number [`Json::Num`] verbatim.
    /// Dead-letter replay and soft deletes built from the last-sent copy
    /// rely on this.
    pub fn from_json(ty: TypeId, text: &[u8]) -> Result<Record, String> {
        let map: std::collections::HashMap<String, &serde_json::value::RawValue> =
            serde_json::from_slice(text).map_err(|e| format!("not a JSON object: {e}"))?;
        let t = schema().ty(ty);
        let mut rec = Record::new(ty);
        for (name, raw) in map {
            let f = t
                .field(&name)
                .ok_or_else(|| format!("unknown field `{name}` for type {}", t.name))?;
            let raw = raw.get();
            let v = match raw.as_bytes().first() {
                Some(b'-' | b'0'..=b'9') => Json::exact_number(raw),
                _ => {
                    let v: serde_json::Value =
                        serde_json::from_str(raw).map_err(|e| format!("field `{name}`: {e}"))?;
                    Json::from_value(&v, t.fields[f as usize].ty)?
                }
            };
            rec.set(f, v);
        }
        Ok(rec)
    }
}

impl Json {
    /// A JSON number token (already checked by the parser), kept exactly:
    /// an `i64` when it is one printed canonically, else its text.
    pub fn exact_number(token: &str) -> Json {
        match token.parse::<i64>() {
            Ok(i) if itoa::Buffer::new().format(i) == token => Json::Int(i),
            _ => Json::Num(token.into()),
        }
    }

    /// Converts a parsed JSON value (scalars only). Numbers here have been
    /// through `f64`; [`Record::from_json`] keeps their text instead.
    pub fn from_value(v: &serde_json::Value, ty: FieldType) -> Result<Json, String> {
        Ok(match v {
            serde_json::Value::Null => Json::Null,
            serde_json::Value::Bool(b) => Json::Bool(*b),
            serde_json::Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Json::Int(i)
                } else if let Some(f) = n.as_f64() {
                    if ty == FieldType::Integer {
                        Json::Float(f)
                    } else {
                        Json::Num(n.to_string().into())
                    }
                } else {
                    Json::Num(n.to_string().into())
                }
            }
            serde_json::Value::String(s) => Json::Str(s.as_str().into()),
            serde_json::Value::Array(_) => return Err("arrays are not allowed".into()),
            serde_json::Value::Object(_) => return Err("objects are not allowed".into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_in_schema_order_and_round_trips() {
        let s = schema();
        let shops = s.type_id("shops").unwrap();
        let t = s.ty(shops);
        let mut r = Record::new(shops);
        r.set(t.field("region").unwrap(), Json::Str("CA".into()));
        r.set(
            t.field("shop_id").unwrap(),
            Json::Str("550e8400-e29b-41d4-a716-446655440000".into()),
        );
        r.set(
            t.field("name").unwrap(),
            Json::Str("Café \"Zoë\"\n\u{1}".into()),
        );
        r.set(t.field("is_public").unwrap(), Json::Bool(true));
        r.set(t.field("created").unwrap(), Json::Null);
        let text = String::from_utf8(r.to_json()).unwrap();
        assert_eq!(
            text,
            r#"{"shop_id":"550e8400-e29b-41d4-a716-446655440000","name":"Café \"Zoë\"\n\u0001","region":"CA","is_public":true,"created":null}"#
        );
        let back = Record::from_json(shops, text.as_bytes()).unwrap();
        assert_eq!(back, r);
        assert_eq!(
            r.cobi_key().as_deref(),
            Some("550e8400-e29b-41d4-a716-446655440000")
        );
    }

    #[test]
    fn exact_numbers_are_kept() {
        let s = schema();
        let tx = s.type_id("transactions").unwrap();
        let t = s.ty(tx);
        let mut r = Record::new(tx);
        r.set(
            t.field("amount").unwrap(),
            Json::Num("12345678901234567890.123456789".into()),
        );
        r.set(t.field("savings").unwrap(), Json::Float(0.1));
        let text = String::from_utf8(r.to_json()).unwrap();
        assert_eq!(
            text,
            r#"{"savings":0.1,"amount":12345678901234567890.123456789}"#
        );
    }

    /// Parsing keeps every number's text, so a record read back (dead
    /// letter replay, a soft delete from the last-sent copy) is sent with
    /// the digits it had.
    #[test]
    fn parsing_keeps_numbers_exactly() {
        let s = schema();
        let tx = s.type_id("transactions").unwrap();
        let cases: &[(&str, Json)] = &[
            (
                "12345678901234567890.1234567890",
                Json::Num("12345678901234567890.1234567890".into()),
            ),
            ("0.1", Json::Num("0.1".into())),
            ("12.50", Json::Num("12.50".into())),
            ("1e3", Json::Num("1e3".into())),
            ("-0", Json::Num("-0".into())),
            (
                "18446744073709551615",
                Json::Num("18446744073709551615".into()),
            ),
            ("9223372036854775807", Json::Int(i64::MAX)),
            ("-42", Json::Int(-42)),
            ("0", Json::Int(0)),
        ];
        for (text, want) in cases {
            let json = format!(r#"{{"amount":{text},"region":"GB"}}"#);
            let r = Record::from_json(tx, json.as_bytes()).unwrap();
            assert_eq!(r.get_named("amount"), Some(want), "{text}");
            assert_eq!(r.get_named("region"), Some(&Json::Str("GB".into())));
            // Serialised again, byte for byte.
            let back = String::from_utf8(r.to_json()).unwrap();
            assert!(back.contains(&format!(":{text}")), "{text} -> {back}");
        }
        let e = Record::from_json(tx, br#"{"amount":[1]}"#).unwrap_err();
        assert!(e.contains("arrays"), "{e}");
        assert!(Record::from_json(tx, br#"{"amount":01}"#).is_err());
    }

    #[test]
    fn unknown_fields_are_rejected_when_parsing() {
        let s = schema();
        let shops = s.type_id("shops").unwrap();
        let err = Record::from_json(shops, br#"{"shop_id":"x","colour":"red"}"#).unwrap_err();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn favourites_fall_back_to_natural_key() {
        let s = schema();
        let fav = s.type_id("student-favourites").unwrap();
        let t = s.ty(fav);
        let mut r = Record::new(fav);
        r.set(t.field("student_id").unwrap(), Json::Str("a".into()));
        r.set(t.field("shop_id").unwrap(), Json::Str("b".into()));
        assert_eq!(r.cobi_key().as_deref(), Some("a|b"));
        r.set(t.field("favourite_id").unwrap(), Json::Str("f".into()));
        assert_eq!(r.cobi_key().as_deref(), Some("f"));
        let ia = s.type_id("interactions").unwrap();
        assert_eq!(Record::new(ia).cobi_key(), None);
    }
}
