//! Request bodies parsed straight into [`Record`]s, without building a
//! `serde_json::Value` tree per record.
//!
//! The result is the same [`Record`] that [`Record::from_json`] builds for
//! the same object, numbers aside (read through f64 here, kept as their
//! text there; a test below pins that), but the parse goes through
//! serde's streaming visitors with borrowed keys, so the only allocations
//! are the record's own values. Unlike [`Record::from_json`], a bad field
//! does not stop the parse: unknown fields and array/object values are
//! collected as [`Problem`]s so that the record can still be named by its
//! key in the answer.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::model::record::{Json, Record};
use crate::model::schema::{schema, FieldId, FieldType, TypeDef, TypeId};
use crate::model::validate::Problem;

/// One element of a request: the record (when the element is an object)
/// and what made it unparseable.
#[derive(Debug, PartialEq)]
pub(crate) struct Parsed {
    /// The fields that could be read; `None` when the element is not a
    /// JSON object.
    pub record: Option<Record>,
    /// Unknown fields, values that are arrays or objects, or "not an
    /// object".
    pub problems: Vec<Problem>,
    /// Where the record's text lies in the body when that text already is
    /// exactly its canonical JSON (what the daemon sends): it is then
    /// stored as it came, saving a serialisation. (Copied only when
    /// stored: allocating long-lived copies while parsing, between the
    /// short-lived field values, fragments the heap badly.)
    pub canonical: Option<std::ops::Range<usize>>,
}

/// A `{"records": [...]}` body.
#[derive(Debug, PartialEq)]
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
    if let Some(batch) = fast::parse_batch(ty, body, max) {
        return Ok(batch);
    }
    parse_batch_serde(ty, body, max)
}

/// [`parse_batch`] without the fast path.
fn parse_batch_serde(ty: TypeId, body: &[u8], max: usize) -> Result<Batch, BodyError> {
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

// ---- the fast path --------------------------------------------------------

/// A hand-written scanner for the common shape of a batch body: an object
/// whose only key is `records`, holding flat objects with scalar values,
/// at most `max` of them. Anything else (nested values, other keys, syntax
/// errors, too many records) makes it give up with `None`, and the serde
/// path above parses the body instead, with its exact error messages.
/// Numbers other than short integers and strings with escapes are handed
/// to serde_json token by token, so the values are exactly those of the
/// serde path (a test compares both).
mod fast {
    use super::*;

    /// The body, already known to be UTF-8 (so string slices between
    /// quotes are `str`s without a second check).
    struct Cursor<'a> {
        s: &'a str,
        b: &'a [u8],
        i: usize,
        /// Whether whitespace was skipped since it was last reset.
        ws_seen: bool,
    }

    /// Bytes that end the plain part of a string: `"`, `\\`, controls.
    static SPECIAL: [bool; 256] = {
        let mut t = [false; 256];
        let mut c = 0;
        while c < 0x20 {
            t[c] = true;
            c += 1;
        }
        t[b'"' as usize] = true;
        t[b'\\' as usize] = true;
        t
    };

    impl<'a> Cursor<'a> {
        fn ws(&mut self) {
            while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.b.get(self.i) {
                self.i += 1;
                self.ws_seen = true;
            }
        }

        fn peek(&self) -> Option<u8> {
            self.b.get(self.i).copied()
        }

        /// Consumes `c` (after whitespace).
        fn eat(&mut self, c: u8) -> Option<()> {
            self.ws();
            (self.peek()? == c).then(|| self.i += 1)
        }

        fn literal(&mut self, word: &[u8]) -> Option<()> {
            self.b[self.i..]
                .starts_with(word)
                .then(|| self.i += word.len())
        }

        /// A string starting at the opening quote.
        fn string(&mut self) -> Option<Cow<'a, str>> {
            let start = self.i + 1;
            let mut j = start;
            while !SPECIAL[*self.b.get(j)? as usize] {
                j += 1;
            }
            match self.b[j] {
                b'"' => {
                    self.i = j + 1;
                    return Some(Cow::Borrowed(&self.s[start..j]));
                }
                b'\\' => {}
                _ => return None,
            }
            // Escapes: find the end, let serde_json decode the token.
            loop {
                match *self.b.get(j)? {
                    b'"' => break,
                    b'\\' => j += 2,
                    _ => j += 1,
                }
            }
            let token = &self.b[self.i..=j];
            self.i = j + 1;
            serde_json::from_slice::<String>(token).ok().map(Cow::Owned)
        }

        /// A scalar value; `None` (give up) for arrays and objects.
        /// A scalar value and whether its text is already canonical (what
        /// [`Record::to_json`] writes); `None` (give up) for arrays and
        /// objects.
        fn value(&mut self, ty: FieldType) -> Option<(Result<Json, &'static str>, bool)> {
            self.ws();
            let v = match self.peek()? {
                b'"' => {
                    let s = self.string()?;
                    let canonical = matches!(s, Cow::Borrowed(_));
                    return Some((Ok(Json::Str(s.into())), canonical));
                }
                b't' => self.literal(b"true").map(|_| Json::Bool(true))?,
                b'f' => self.literal(b"false").map(|_| Json::Bool(false))?,
                b'n' => self.literal(b"null").map(|_| Json::Null)?,
                b'-' | b'0'..=b'9' => return self.number(ty),
                _ => return None,
            };
            Some((Ok(v), true))
        }

        fn number(&mut self, ty: FieldType) -> Option<(Result<Json, &'static str>, bool)> {
            let start = self.i;
            let mut j = start;
            let mut simple = true;
            while let Some(&c) = self.b.get(j) {
                match c {
                    b'0'..=b'9' => {}
                    b'-' if j == start => {}
                    b'.' | b'e' | b'E' | b'+' | b'-' => simple = false,
                    _ => break,
                }
                j += 1;
            }
            self.i = j;
            let token = &self.b[start..j];
            let digits = token.strip_prefix(b"-").unwrap_or(token);
            // Short integers directly (serde_json reads `-0` as a float).
            if simple
                && !digits.is_empty()
                && digits.len() <= 18
                && (digits[0] != b'0' || token == b"0")
            {
                let mut n: i64 = 0;
                for &d in digits {
                    n = n * 10 + (d - b'0') as i64;
                }
                let n = if token[0] == b'-' { -n } else { n };
                return Some((Ok(Json::Int(n)), true));
            }
            let mut de = serde_json::Deserializer::from_slice(token);
            let v = ValueSeed(ty).deserialize(&mut de).ok()?;
            de.end().ok()?;
            let canonical = matches!(&v, Ok(Json::Num(n)) if n.as_bytes() == token);
            Some((v, canonical))
        }

        fn record(&mut self, t: &TypeDef, ty: TypeId) -> Option<Parsed> {
            self.ws();
            let start = self.i;
            if self.peek()? != b'{' {
                return None;
            }
            self.i += 1;
            let mut record = Record {
                ty,
                fields: Vec::with_capacity(t.fields.len()),
            };
            let mut problems = Vec::new();
            // Whether the record's text is exactly its canonical JSON, so
            // that it can be stored as it came.
            let mut canonical = true;
            self.ws_seen = false;
            self.ws();
            if self.peek()? != b'}' {
                let mut hint = 0usize;
                loop {
                    self.ws();
                    if self.peek()? != b'"' {
                        return None;
                    }
                    let name = self.string()?;
                    canonical &= matches!(name, Cow::Borrowed(_));
                    self.eat(b':')?;
                    let f = if t.fields.get(hint).is_some_and(|f| f.name == name) {
                        Some(hint)
                    } else {
                        t.fields.iter().position(|f| f.name == name)
                    };
                    match f {
                        Some(f) => {
                            hint = f + 1;
                            let def = &t.fields[f];
                            let f = f as FieldId;
                            let (v, plain) = self.value(def.ty)?;
                            canonical &= plain;
                            match v {
                                Ok(v) => match record.fields.last() {
                                    Some((last, _)) if *last >= f => {
                                        canonical = false;
                                        record.set(f, v)
                                    }
                                    _ => record.fields.push((f, v)),
                                },
                                Err(reason) => problems.push(Problem {
                                    field: def.name.clone(),
                                    reason: reason.into(),
                                }),
                            }
                        }
                        None => {
                            let _ = self.value(FieldType::String)?;
                            problems.push(Problem {
                                field: name.into_owned(),
                                reason: format!("unknown field for type {}", t.name),
                            });
                        }
                    }
                    self.ws();
                    match self.peek()? {
                        b',' => self.i += 1,
                        b'}' => break,
                        _ => return None,
                    }
                }
            }
            self.i += 1;
            let canonical =
                (canonical && !self.ws_seen && problems.is_empty()).then_some(start..self.i);
            Some(Parsed {
                record: Some(record),
                problems,
                canonical,
            })
        }
    }

    pub(super) fn parse_batch(ty: TypeId, body: &[u8], max: usize) -> Option<Batch> {
        let t = schema().ty(ty);
        let s = std::str::from_utf8(body).ok()?;
        let mut c = Cursor {
            s,
            b: s.as_bytes(),
            i: 0,
            ws_seen: false,
        };
        c.eat(b'{')?;
        c.ws();
        c.literal(br#""records""#)?;
        c.eat(b':')?;
        c.eat(b'[')?;
        let mut records = Vec::new();
        c.ws();
        if c.peek()? == b']' {
            c.i += 1;
        } else {
            // A record is at least 2 bytes and a comma.
            records.reserve((body.len() / 64).min(max));
            loop {
                if records.len() == max {
                    return None;
                }
                records.push(c.record(t, ty)?);
                c.ws();
                match c.peek()? {
                    b',' => c.i += 1,
                    b']' => {
                        c.i += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        c.eat(b'}')?;
        c.ws();
        if c.i != body.len() {
            return None;
        }
        let total = records.len();
        Some(Batch { records, total })
    }
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
            canonical: None,
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
                        // Fields usually come in schema order: append.
                        Ok(v) => match record.fields.last() {
                            Some((last, _)) if *last >= f => record.set(f, v),
                            _ => record.fields.push((f, v)),
                        },
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
            canonical: None,
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
            Err(_) => Json::Num(display_boxed(&v)),
        }))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Ok(if self.0 == FieldType::Integer {
            Json::Float(v)
        } else {
            match serde_json::Number::from_f64(v) {
                Some(n) => Json::Num(display_boxed(&n)),
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

/// `value.to_string().into_boxed_str()` with one exact allocation (the
/// text is formatted on the stack first).
fn display_boxed(value: &dyn fmt::Display) -> Box<str> {
    struct Stack {
        buf: [u8; 64],
        len: usize,
    }
    impl fmt::Write for Stack {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            let end = self.len + s.len();
            self.buf
                .get_mut(self.len..end)
                .ok_or(fmt::Error)?
                .copy_from_slice(s.as_bytes());
            self.len = end;
            Ok(())
        }
    }
    let mut stack = Stack {
        buf: [0; 64],
        len: 0,
    };
    if fmt::write(&mut stack, format_args!("{value}")).is_ok() {
        if let Ok(s) = std::str::from_utf8(&stack.buf[..stack.len]) {
            return s.into();
        }
    }
    value.to_string().into_boxed_str()
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
            // The mock reads numbers through f64 (as an API storing floats
            // would); from_json keeps their exact text: equal as JSON values.
            let value =
                |r: &Record| serde_json::from_slice::<serde_json::Value>(&r.to_json()).unwrap();
            assert_eq!(value(&got.record.unwrap()), value(&want), "{text}");
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
    fn fast_path_agrees_with_serde() {
        let tx = id("transactions");
        let common = [
            r#"{"records":[]}"#,
            r#" { "records" : [ { } , {"transaction_id":"a"} ] } "#,
            r#"{"records":[{"transaction_id":"t","shop_id":"s","region":"US","savings":0,"amount":12.50,"discount_value":1e3,"created":null,"is_deleted":false}]}"#,
            r#"{"records":[{"amount":-0,"savings":-12,"discount_value":123456789012345678}]}"#,
            r#"{"records":[{"amount":1234567890123456789,"savings":18446744073709551616,"discount_value":-1.5E-3}]}"#,
            r#"{"records":[{"discount_name":"caf\u00e9 \"q\" \\ \/ \n","source":"ü∂","colour":"x","colour2":null,"region":"US","region":"CA"}]}"#,
            r#"{"records":[{"region":"US","transaction_id":"b"},{"shop_id":"s","transaction_id":"c","amount":0}]}"#,
            r#"{"records":[{"discount_\u006eame":"escaped key","shop_id":"\ud83d\ude00"}]}"#,
            r#"{"records":[{"transaction_id":"t","student_id":null,"region":"US","source":"in-store","savings":0.25,"amount":1e2,"is_deleted":true,"discount_value":7}]}"#,
            r#"{"records":[{"transaction_id":"t","region":"US","savings":0.25,"amount":12.5,"discount_value":18446744073709551616}]}"#,
            r#"{"records":[{"region":"US","transaction_id":"t"}]}"#,
            r#"{"records":[{"transaction_id":"t","region":"US","region":"CA"}]}"#,
            r#"{"records":[{"transaction_id":"t", "region":"US"}]}"#,
            r#"{"records":[{"transaction_id":"t","amount":-0}]}"#,
            r#"{"records":[{"transaction_id":"t","amount":-0.0}]}"#,
            r#"{"records":[{"transaction_id":"t","amount":0.10}]}"#,
            "{\"records\":[{\"discount_name\":\"tab\\there\"}]}\n",
        ];
        for text in common {
            let fast = fast::parse_batch(tx, text.as_bytes(), 5000);
            assert!(fast.is_some(), "fast path gave up on {text}");
            let mut fast = fast.unwrap();
            for p in &mut fast.records {
                // A record stored as it came must be exactly canonical.
                if let Some(range) = p.canonical.take() {
                    let json = &text.as_bytes()[range];
                    assert_eq!(json, p.record.as_ref().unwrap().to_json(), "{text}");
                }
            }
            let slow = parse_batch_serde(tx, text.as_bytes(), 5000).unwrap();
            assert_eq!(fast, slow, "{text}");
        }
        // The fast path gives up; the serde path decides.
        let unusual = [
            r#"{"records":[{"amount":[1]}]}"#,
            r#"{"records":[{"x":{"a":1}}]}"#,
            r#"{"records":[1]}"#,
            r#"{"other":1,"records":[]}"#,
            r#"{"records":[{"amount":01}]}"#,
            r#"{"records":[{"amount":1.}]}"#,
            r#"{"records":[{"amount":-}]}"#,
            r#"{"records":[{"region":"bad \u12"}]}"#,
            r#"{"records":[{"region":"lone \ud83d"}]}"#,
            "{\"records\":[{\"region\":\"ctl\u{1}\"}]}",
            r#"{"records":[{"region":"US"}]"#,
            r#"{"records":[{"region":"US"},]}"#,
            r#"{"records":[{"region":"US"}]} x"#,
            r#"{"records":[{},{},{}]}"#,
        ];
        for text in unusual {
            assert!(
                fast::parse_batch(tx, text.as_bytes(), 2).is_none(),
                "{text}"
            );
        }
        let bad_utf8 = b"{\"records\":[{\"region\":\"\xff\"}]}";
        assert!(fast::parse_batch(tx, bad_utf8, 5).is_none());
        assert!(parse_batch(tx, bad_utf8, 5).is_err());
    }

    #[test]
    fn canonical_records_are_kept_as_they_came() {
        let tx = id("transactions");
        let text = r#"{"transaction_id":"t","student_id":null,"region":"US","savings":0.25,"amount":12.5,"is_deleted":true,"discount_name":"caf\u00e9","discount_value":7}"#;
        let canonical = parse_one(tx, text.as_bytes())
            .unwrap()
            .record
            .unwrap()
            .to_json();
        let body = [&b"{\"records\":["[..], &canonical, b",", &canonical, b"]}"].concat();
        let b = fast::parse_batch(tx, &body, 10).unwrap();
        for p in b.records {
            assert_eq!(&body[p.canonical.unwrap()], canonical);
        }
        // An escaped string is canonical only once unescaped.
        let body = format!(r#"{{"records":[{text}]}}"#);
        assert_eq!(
            fast::parse_batch(tx, body.as_bytes(), 10).unwrap().records[0].canonical,
            None
        );
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
