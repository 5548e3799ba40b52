//! The stored form of a record: its canonical JSON (the exact bytes
//! [`Record::to_json`] produces, with the field names pre-serialised), and
//! its key in a form that keeps UUID keys inside the hash table.

use std::borrow::{Borrow, Cow};
use std::hash::{Hash, Hasher};
use std::sync::OnceLock;

use crate::model::record::{write_json_str, Json, Record};
use crate::model::schema::schema;

/// `"name":` of every field of every type, indexed `[type][field]`.
fn field_prefixes() -> &'static [Vec<Box<[u8]>>] {
    static PREFIXES: OnceLock<Vec<Vec<Box<[u8]>>>> = OnceLock::new();
    PREFIXES.get_or_init(|| {
        schema()
            .types
            .iter()
            .map(|t| {
                t.fields
                    .iter()
                    .map(|f| {
                        let mut out = Vec::new();
                        write_json_str(&mut out, &f.name);
                        out.push(b':');
                        out.into_boxed_slice()
                    })
                    .collect()
            })
            .collect()
    })
}

/// Appends the record's JSON to `out`: the same bytes as
/// [`Record::write_json`], values written by the same [`Json::write`], field
/// names copied from a table instead of escaped each time.
pub(crate) fn write_record(record: &Record, out: &mut Vec<u8>) {
    let prefixes = &field_prefixes()[record.ty as usize];
    out.push(b'{');
    for (i, (f, v)) in record.fields.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&prefixes[*f as usize]);
        v.write(out);
    }
    out.push(b'}');
}

/// The record's Cobi key, borrowed when it is a single string field (the
/// common case), else [`Record::cobi_key`].
pub(crate) fn key_of(record: &Record) -> Option<Cow<'_, str>> {
    let t = schema().ty(record.ty);
    if let [k] = t.key[..] {
        if let Some(Json::Str(s)) = record.get(k) {
            return Some(Cow::Borrowed(s));
        }
    }
    record.cobi_key().map(Cow::Owned)
}

/// A stored key. Keys of UUID length (36 bytes) live inline in the table,
/// which saves a cache miss per lookup; others on the heap. The
/// representation depends only on the length, so derived equality is
/// byte equality.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Key {
    /// Exactly 36 bytes.
    Inline([u8; 36]),
    /// Any other length.
    Heap(Box<[u8]>),
}

impl Key {
    /// The key's bytes (UTF-8).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Inline(b) => b,
            Key::Heap(b) => b,
        }
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Key {
        match <[u8; 36]>::try_from(s.as_bytes()) {
            Ok(b) => Key::Inline(b),
            Err(_) => Key::Heap(s.as_bytes().into()),
        }
    }
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Must agree with `<[u8] as Hash>` for `Borrow<[u8]>` lookups.
        self.as_bytes().hash(state)
    }
}

impl Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_api::parse::parse_one;

    #[test]
    fn same_bytes_as_to_json() {
        let s = schema();
        let cases: &[(&str, &str)] = &[
            (
                "shops",
                r#"{"is_deleted":false,"shop_id":"550e8400-e29b-41d4-a716-446655440000","name":"Caf\u00e9 \"Zo\u00eb\"\n\u0001\\","region":"CA","is_public":true,"created":null}"#,
            ),
            (
                "transactions",
                r#"{"transaction_id":"t","amount":12.50,"savings":0,"discount_value":-1e3,"region":"US"}"#,
            ),
            ("transactions", r#"{"amount":18446744073709551615}"#),
            ("interactions", r#"{"event_timestamp":-17,"item_id":"x"}"#),
            ("shops", "{}"),
        ];
        for (ty, text) in cases {
            let r = parse_one(s.type_id(ty).unwrap(), text.as_bytes())
                .unwrap()
                .record
                .unwrap();
            let mut out = Vec::new();
            write_record(&r, &mut out);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                String::from_utf8(r.to_json()).unwrap()
            );
        }
        let mut r = Record::new(s.type_id("interactions").unwrap());
        for i in [0, 7, -7, 10, 1_700_000_000_000, i64::MIN, i64::MAX] {
            r.set(0, Json::Int(i));
            let mut out = Vec::new();
            write_record(&r, &mut out);
            assert_eq!(out, r.to_json());
        }
        let mut r = Record::new(s.type_id("branches").unwrap());
        r.set(4, Json::Float(45.5));
        let mut out = Vec::new();
        write_record(&r, &mut out);
        assert_eq!(out, r.to_json());
    }

    #[test]
    fn keys() {
        let s = schema();
        let fav = s.type_id("student-favourites").unwrap();
        let t = s.ty(fav);
        let mut r = Record::new(fav);
        r.set(t.field("student_id").unwrap(), Json::Str("a".into()));
        r.set(t.field("shop_id").unwrap(), Json::Str("b".into()));
        assert_eq!(key_of(&r).as_deref(), Some("a|b"));
        r.set(t.field("favourite_id").unwrap(), Json::Str("f".into()));
        assert!(matches!(key_of(&r), Some(Cow::Borrowed("f"))));
        assert_eq!(
            key_of(&Record::new(s.type_id("interactions").unwrap())),
            None
        );

        let uuid = "550e8400-e29b-41d4-a716-446655440000";
        assert!(matches!(Key::from(uuid), Key::Inline(_)));
        assert!(matches!(Key::from("a|b"), Key::Heap(_)));
        let mut m = std::collections::HashMap::new();
        m.insert(Key::from(uuid), 1);
        m.insert(Key::from("a|b"), 2);
        assert_eq!(m.get(uuid.as_bytes()), Some(&1));
        assert_eq!(m.get(&b"a|b"[..]), Some(&2));
    }
}
