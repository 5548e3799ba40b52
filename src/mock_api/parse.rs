//! Request bodies read into the fields each record was sent with, values
//! kept as sent: strings unescaped, numbers as their exact text (never
//! through a float), and where each record's text lies in the body, so
//! that the store keeps what was received.
//!
//! A hand-written scanner reads the common shape (an object whose only
//! key is `records`, holding flat objects) without building a value tree;
//! anything else (nesting, other keys, syntax errors) goes through
//! serde_json, which also gives the exact error of a malformed body. A bad
//! field does not stop the parse: unknown fields, repeated fields and
//! array/object values are collected as [`Problem`]s so that the record
//! can still be named by its key in the answer.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::mock_api::check::Problem;
use crate::model::schema::{schema, FieldId, TypeDef, TypeId};

/// A scalar value as it was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Wire<'a> {
    Null,
    Bool(bool),
    /// Unescaped (borrowed from the body when it had no escapes).
    Str(Cow<'a, str>),
    /// The number's text exactly as sent.
    Num(&'a str),
}

/// One element of a request.
#[derive(Debug, PartialEq)]
pub(crate) struct Parsed<'a> {
    /// Where the element's text lies in the body.
    pub span: Range<usize>,
    /// The fields that could be read, in arrival order (first occurrence);
    /// `None` when the element is not a JSON object.
    pub fields: Option<Vec<(FieldId, Wire<'a>)>>,
    /// Unknown or repeated fields, arrays/objects as values, "not an
    /// object".
    pub problems: Vec<Problem>,
}

/// A `{"records": [...]}` body.
#[derive(Debug, PartialEq)]
pub(crate) struct Batch<'a> {
    /// The first `max + 1` elements, parsed (the rest are only counted).
    pub records: Vec<Parsed<'a>>,
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

/// Collects the fields of one record, noting problems.
struct Fields<'a> {
    t: &'static TypeDef,
    fields: Vec<(FieldId, Wire<'a>)>,
    problems: Vec<Problem>,
    /// Fields seen so far (types have fewer than 64 fields).
    seen: u64,
    /// The next field in schema order: senders usually write that order.
    hint: usize,
}

impl<'a> Fields<'a> {
    fn new(t: &'static TypeDef) -> Self {
        Fields {
            t,
            fields: Vec::with_capacity(t.fields.len()),
            problems: Vec::new(),
            seen: 0,
            hint: 0,
        }
    }

    fn lookup(&mut self, name: &str) -> Option<FieldId> {
        let fields = &self.t.fields;
        let f = if fields.get(self.hint).is_some_and(|f| f.name == name) {
            self.hint
        } else {
            fields.iter().position(|f| f.name == name)?
        };
        self.hint = f + 1;
        Some(f as FieldId)
    }

    /// Records `name = value`; `Err(reason)` values become problems.
    fn add(&mut self, name: &str, value: Result<Wire<'a>, &'static str>) {
        let Some(f) = self.lookup(name) else {
            self.problems.push(Problem::new(
                name,
                format!("unknown field for type {}", self.t.name),
            ));
            return;
        };
        let bit = 1u64 << f;
        if self.seen & bit != 0 {
            self.problems
                .push(Problem::new(name, "field appears more than once"));
            return;
        }
        self.seen |= bit;
        match value {
            Ok(v) => self.fields.push((f, v)),
            Err(reason) => self.problems.push(Problem::new(name, reason)),
        }
    }

    fn done(self, span: Range<usize>) -> Parsed<'a> {
        Parsed {
            span,
            fields: Some(self.fields),
            problems: self.problems,
        }
    }
}

fn not_an_object<'a>(span: Range<usize>) -> Parsed<'a> {
    Parsed {
        span,
        fields: None,
        problems: vec![Problem::new("record", "must be a JSON object")],
    }
}

/// Parses a batch body for type `ty`. Elements after the first `max + 1`
/// are skipped (only counted), which bounds the work an oversized request
/// costs.
pub(crate) fn parse_batch(ty: TypeId, body: &[u8], max: usize) -> Result<Batch<'_>, BodyError> {
    if let Some(batch) = fast::parse_batch(ty, body, max) {
        return Ok(batch);
    }
    slow::parse_batch(ty, body, max)
}

/// Parses a body holding one record object (`/user-interactions`); the
/// span is the object without surrounding whitespace.
pub(crate) fn parse_one(ty: TypeId, body: &[u8]) -> Result<Parsed<'_>, serde_json::Error> {
    if let Some(p) = fast::parse_one(ty, body) {
        return Ok(p);
    }
    let raw: &RawValue = serde_json::from_slice(body)?;
    slow::element(ty, body, raw)
}

// ---- the fast path --------------------------------------------------------

/// A hand-written scanner for the common shape of a batch body: an object
/// whose only key is `records`, holding flat objects with scalar values,
/// at most `max` of them. Anything else (nested values, other keys, syntax
/// errors, too many records) makes it give up with `None`, and the serde
/// path parses the body instead. Strings with escapes are decoded by
/// serde_json token by token; numbers are checked against JSON's grammar
/// and kept as text.
mod fast {
    use super::*;

    struct Cursor<'a> {
        s: &'a str,
        b: &'a [u8],
        i: usize,
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

        /// A number token, checked against JSON's grammar
        /// (`-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?`).
        fn number(&mut self) -> Option<&'a str> {
            let start = self.i;
            let b = self.b;
            let mut j = start;
            let run = |mut j: usize| {
                let from = j;
                while b.get(j).is_some_and(u8::is_ascii_digit) {
                    j += 1;
                }
                (j > from).then_some(j)
            };
            if b.get(j) == Some(&b'-') {
                j += 1;
            }
            match b.get(j)? {
                b'0' => j += 1,
                b'1'..=b'9' => j = run(j)?,
                _ => return None,
            }
            if b.get(j) == Some(&b'.') {
                j = run(j + 1)?;
            }
            if matches!(b.get(j), Some(b'e' | b'E')) {
                j += 1;
                if matches!(b.get(j), Some(b'+' | b'-')) {
                    j += 1;
                }
                j = run(j)?;
            }
            self.i = j;
            Some(&self.s[start..j])
        }

        /// A scalar value; `None` (give up) for arrays, objects and bad
        /// syntax.
        fn value(&mut self) -> Option<Wire<'a>> {
            self.ws();
            Some(match self.peek()? {
                b'"' => Wire::Str(self.string()?),
                b't' => self.literal(b"true").map(|_| Wire::Bool(true))?,
                b'f' => self.literal(b"false").map(|_| Wire::Bool(false))?,
                b'n' => self.literal(b"null").map(|_| Wire::Null)?,
                b'-' | b'0'..=b'9' => Wire::Num(self.number()?),
                _ => return None,
            })
        }

        fn record(&mut self, t: &'static TypeDef) -> Option<Parsed<'a>> {
            self.ws();
            let start = self.i;
            if self.peek()? != b'{' {
                return None;
            }
            self.i += 1;
            let mut fields = Fields::new(t);
            self.ws();
            if self.peek()? != b'}' {
                loop {
                    self.ws();
                    if self.peek()? != b'"' {
                        return None;
                    }
                    let name = self.string()?;
                    self.eat(b':')?;
                    let v = self.value()?;
                    fields.add(&name, Ok(v));
                    self.ws();
                    match self.peek()? {
                        b',' => self.i += 1,
                        b'}' => break,
                        _ => return None,
                    }
                }
            }
            self.i += 1;
            Some(fields.done(start..self.i))
        }
    }

    fn cursor(body: &[u8]) -> Option<Cursor<'_>> {
        let s = std::str::from_utf8(body).ok()?;
        Some(Cursor {
            s,
            b: s.as_bytes(),
            i: 0,
        })
    }

    pub(super) fn parse_batch(ty: TypeId, body: &[u8], max: usize) -> Option<Batch<'_>> {
        let t = schema().ty(ty);
        let mut c = cursor(body)?;
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
                records.push(c.record(t)?);
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

    pub(super) fn parse_one(ty: TypeId, body: &[u8]) -> Option<Parsed<'_>> {
        let mut c = cursor(body)?;
        let p = c.record(schema().ty(ty))?;
        c.ws();
        (c.i == body.len()).then_some(p)
    }
}

// ---- the serde path -------------------------------------------------------

mod slow {
    use super::*;

    pub(super) fn parse_batch(ty: TypeId, body: &[u8], max: usize) -> Result<Batch<'_>, BodyError> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let elements = BodySeed.deserialize(&mut de).map_err(BodyError::Json)?;
        de.end().map_err(BodyError::Json)?;
        let elements = elements.ok_or(BodyError::NoRecords)?;
        let total = elements.len();
        let records = elements
            .into_iter()
            .take(max + 1)
            .map(|raw| element(ty, body, raw))
            .collect::<Result<_, _>>()
            .map_err(BodyError::Json)?;
        Ok(Batch { records, total })
    }

    /// One element, whose text `raw` borrows from `body`.
    pub(super) fn element<'a>(
        ty: TypeId,
        body: &'a [u8],
        raw: &'a RawValue,
    ) -> Result<Parsed<'a>, serde_json::Error> {
        let text = raw.get();
        let start = text.as_ptr() as usize - body.as_ptr() as usize;
        let span = start..start + text.len();
        if !text.starts_with('{') {
            return Ok(not_an_object(span));
        }
        let mut de = serde_json::Deserializer::from_str(text);
        let fields = RecordSeed(Fields::new(schema().ty(ty))).deserialize(&mut de)?;
        Ok(fields.done(span))
    }

    /// The body object: the `records` array's elements, unparsed.
    struct BodySeed;

    impl<'de> DeserializeSeed<'de> for BodySeed {
        type Value = Option<Vec<&'de RawValue>>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for BodySeed {
        type Value = Option<Vec<&'de RawValue>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object {\"records\": [...]}")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = None;
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                if key != "records" {
                    map.next_value::<IgnoredAny>()?;
                } else if out.is_some() {
                    return Err(de::Error::duplicate_field("records"));
                } else {
                    out = Some(map.next_value::<Vec<&'de RawValue>>()?);
                }
            }
            Ok(out)
        }
    }

    /// A record object's fields.
    struct RecordSeed<'a>(Fields<'a>);

    impl<'de> DeserializeSeed<'de> for RecordSeed<'de> {
        type Value = Fields<'de>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for RecordSeed<'de> {
        type Value = Fields<'de>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a record object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut fields = self.0;
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                let raw: &'de RawValue = map.next_value()?;
                let v = scalar(raw.get()).map_err(de::Error::custom)?;
                fields.add(&key, v);
            }
            Ok(fields)
        }
    }

    /// A value's raw text as a scalar; arrays and objects are problems.
    fn scalar(text: &str) -> Result<Result<Wire<'_>, &'static str>, serde_json::Error> {
        Ok(Ok(match text.as_bytes()[0] {
            b'"' => Wire::Str(Cow::Owned(serde_json::from_str(text)?)),
            b't' => Wire::Bool(true),
            b'f' => Wire::Bool(false),
            b'n' => Wire::Null,
            b'[' => return Ok(Err("arrays are not allowed")),
            b'{' => return Ok(Err("objects are not allowed")),
            _ => Wire::Num(text),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> TypeId {
        schema().type_id(name).unwrap()
    }

    fn names(p: &Parsed) -> Vec<String> {
        let t = schema().ty(id("transactions"));
        p.fields
            .as_ref()
            .unwrap()
            .iter()
            .map(|(f, v)| format!("{}={v:?}", t.fields[*f as usize].name))
            .collect()
    }

    #[test]
    fn values_are_kept_as_sent() {
        let body = br#"{"records":[{"transaction_id":"t","amount":123456789012345678901234567.891,"savings":0.10,"discount_value":1e3,"discount_name":"caf\u00e9","is_deleted":false,"student_id":null}]}"#;
        let b = parse_batch(id("transactions"), body, 10).unwrap();
        assert_eq!(b.total, 1);
        let p = &b.records[0];
        assert!(p.problems.is_empty());
        assert_eq!(
            names(p),
            [
                r#"transaction_id=Str("t")"#,
                r#"amount=Num("123456789012345678901234567.891")"#,
                r#"savings=Num("0.10")"#,
                r#"discount_value=Num("1e3")"#,
                r#"discount_name=Str("café")"#,
                "is_deleted=Bool(false)",
                "student_id=Null",
            ]
        );
        assert_eq!(&body[p.span.clone()], &body[12..body.len() - 2]);
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
            r#"{"records":[{"discount_\u006eame":"escaped key","shop_id":"\ud83d\ude00"}]}"#,
            r#"{"records":[{"transaction_id":"t", "region":"US"}]}"#,
            r#"{"records":[{"transaction_id":"t","amount":-0.0e+2}]}"#,
            "{\"records\":[{\"discount_name\":\"tab\\there\"}]}\n",
        ];
        for text in common {
            let fast = fast::parse_batch(tx, text.as_bytes(), 5000);
            assert!(fast.is_some(), "fast path gave up on {text}");
            let slow = slow::parse_batch(tx, text.as_bytes(), 5000).unwrap();
            assert_eq!(fast.unwrap(), slow, "{text}");
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
            r#"{"records":[{"amount":1e}]}"#,
            r#"{"records":[{"amount":.5}]}"#,
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
    fn bad_fields_are_collected_not_fatal() {
        let body = br#"{"records":[{"shop_id":"k","colour":{"a":[1]},"name":[1,2],"region":"CA","region":"GB"},7]}"#;
        let b = parse_batch(id("shops"), body, 10).unwrap();
        let p = &b.records[0];
        assert_eq!(p.fields.as_ref().unwrap().len(), 2);
        let text: Vec<String> = p.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            text,
            [
                "colour: unknown field for type shops",
                "name: arrays are not allowed",
                "region: field appears more than once",
            ]
        );
        assert_eq!(&body[p.span.clone()][..12], br#"{"shop_id":""#);
        assert_eq!(b.records[1].fields, None);
        assert_eq!(&body[b.records[1].span.clone()], b"7");
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
        assert!(b.records[0].fields.is_some());
        assert!(b.records[1].fields.is_none());
        assert!(b.records[2].fields.is_none());
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

    #[test]
    fn one_object() {
        let ia = id("interactions");
        let body = b" {\"event_timestamp\": 17, \"item_type\":\"SHOP\"}\n";
        let p = parse_one(ia, body).unwrap();
        assert_eq!(&body[p.span.clone()], &body[1..body.len() - 1]);
        assert_eq!(p.fields.unwrap().len(), 2);
        let p = parse_one(ia, br#"{"event_timestamp":[1]}"#).unwrap();
        assert_eq!(
            p.problems[0].to_string(),
            "event_timestamp: arrays are not allowed"
        );
        assert!(parse_one(ia, b"{").is_err());
        assert!(parse_one(ia, b"[1]").unwrap().fields.is_none());
    }
}
