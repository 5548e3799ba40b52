//! A record's identity at the mock: its key as the API names it (key
//! fields joined by `|`, the natural key when a declared key is absent),
//! the parents its validated references name, content equality of two
//! stored versions, and the stored form of a key.

use std::borrow::{Borrow, Cow};
use std::hash::{Hash, Hasher};

use crate::mock_api::check::Decimal;
use crate::mock_api::parse::{parse_one, Wire};
use crate::model::schema::{FieldId, Reference, TypeDef, TypeId};

/// The text a key part is written as.
fn part<'r>(v: &'r Wire) -> Option<Cow<'r, str>> {
    match v {
        Wire::Str(s) => Some(Cow::Borrowed(s)),
        Wire::Num(n) => Some(Cow::Borrowed(n)),
        Wire::Bool(b) => Some(Cow::Owned(b.to_string())),
        Wire::Null => None,
    }
}

/// The record's Cobi key: the declared key fields when all are present
/// and non-null, else the natural key (student-favourites:
/// `student_id|shop_id`); `None` for types without a key or when a key
/// field is missing. Borrowed when it is one string field.
pub(crate) fn key_of<'r>(t: &TypeDef, values: &[Option<&'r Wire>]) -> Option<Cow<'r, str>> {
    let present = |k: &FieldId| matches!(values[*k as usize], Some(v) if *v != Wire::Null);
    let natural;
    let key: &[FieldId] = if t.key.iter().all(present) {
        &t.key
    } else {
        natural = t.natural_key();
        &natural
    };
    match key {
        [] => None,
        [k] => part(values[*k as usize]?),
        _ => {
            let mut out = String::new();
            for (i, k) in key.iter().enumerate() {
                if i > 0 {
                    out.push('|');
                }
                out.push_str(&part(values[*k as usize]?)?);
            }
            Some(Cow::Owned(out))
        }
    }
}

/// The validated references a record makes: (field name, parent type,
/// parent key). Null or absent references are fine and not listed; wrong
/// types were already reported by validation.
pub(crate) fn parent_refs<'a>(
    t: &'static TypeDef,
    values: &[Option<&Wire<'a>>],
) -> Vec<(&'static str, TypeId, Cow<'a, str>)> {
    let mut out = Vec::new();
    for (def, v) in t.fields.iter().zip(values) {
        let parent = match &def.reference {
            Some(Reference::To {
                ty,
                validated: true,
            }) => *ty,
            Some(Reference::ByField {
                field,
                targets,
                validated: true,
            }) => {
                let Some(Wire::Str(d)) = values[*field as usize] else {
                    continue;
                };
                match targets.iter().find(|(v, _)| v == d) {
                    Some((_, ty)) => *ty,
                    None => continue,
                }
            }
            _ => continue,
        };
        if let Some(Wire::Str(key)) = v {
            out.push((def.name.as_str(), parent, key.clone()));
        }
    }
    out
}

/// A value in a form where equal content is equal: strings unescaped,
/// numbers as exact decimals.
#[derive(Debug, PartialEq)]
enum Norm<'a> {
    Null,
    Bool(bool),
    Str(Cow<'a, str>),
    Num(Option<Decimal>),
}

fn normalised<'a>(ty: TypeId, json: &'a [u8]) -> Option<Vec<(FieldId, Norm<'a>)>> {
    let p = parse_one(ty, json).ok()?;
    let mut fields: Vec<(FieldId, Norm)> = p
        .fields?
        .into_iter()
        .map(|(f, v)| {
            let n = match v {
                Wire::Null => Norm::Null,
                Wire::Bool(b) => Norm::Bool(b),
                Wire::Str(s) => Norm::Str(s),
                Wire::Num(n) => Norm::Num(Decimal::parse(n)),
            };
            (f, n)
        })
        .collect();
    fields.sort_by_key(|(f, _)| *f);
    Some(fields)
}

/// Whether two stored versions of a record hold the same content (field
/// order, whitespace, escapes and number spelling aside).
pub(crate) fn same_content(ty: TypeId, a: &[u8], b: &[u8]) -> bool {
    match (normalised(ty, a), normalised(ty, b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
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

/// The key of a record given as JSON text.
#[cfg(test)]
pub(crate) fn key_of_json(ty: TypeId, json: &[u8]) -> Option<String> {
    let t = crate::model::schema::schema().ty(ty);
    use crate::mock_api::check::by_field;
    let p = parse_one(ty, json).ok()?;
    let fields = p.fields?;
    let values = by_field(t, &fields);
    key_of(t, &values).map(Cow::into_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::schema::schema;

    #[test]
    fn keys() {
        let fav = schema().type_id("student-favourites").unwrap();
        assert_eq!(
            key_of_json(fav, br#"{"student_id":"a","shop_id":"b"}"#).as_deref(),
            Some("a|b")
        );
        assert_eq!(
            key_of_json(
                fav,
                br#"{"favourite_id":"f","student_id":"a","shop_id":"b"}"#
            )
            .as_deref(),
            Some("f")
        );
        assert_eq!(
            key_of_json(
                fav,
                br#"{"favourite_id":null,"student_id":"a","shop_id":"b"}"#
            )
            .as_deref(),
            Some("a|b")
        );
        assert_eq!(key_of_json(fav, br#"{"student_id":"a"}"#), None);
        let ia = schema().type_id("interactions").unwrap();
        assert_eq!(key_of_json(ia, br#"{"item_id":"x"}"#), None);

        let uuid = "550e8400-e29b-41d4-a716-446655440000";
        assert!(matches!(Key::from(uuid), Key::Inline(_)));
        assert!(matches!(Key::from("a|b"), Key::Heap(_)));
        let mut m = std::collections::HashMap::new();
        m.insert(Key::from(uuid), 1);
        m.insert(Key::from("a|b"), 2);
        assert_eq!(m.get(uuid.as_bytes()), Some(&1));
        assert_eq!(m.get(&b"a|b"[..]), Some(&2));
    }

    #[test]
    fn content_equality() {
        let tx = schema().type_id("transactions").unwrap();
        let same = [
            (
                r#"{"transaction_id":"t","amount":12.50,"region":"US"}"#,
                r#"{ "region" : "US", "amount": 1.25e1, "transaction_id":"\u0074" }"#,
            ),
            (r#"{"savings":0}"#, r#"{"savings":-0.0}"#),
        ];
        for (a, b) in same {
            assert!(same_content(tx, a.as_bytes(), b.as_bytes()), "{a} = {b}");
        }
        let differ = [
            (r#"{"amount":0.1}"#, r#"{"amount":0.10000000149011612}"#),
            (r#"{"amount":1}"#, r#"{"amount":1,"is_deleted":true}"#),
            (r#"{"source":null}"#, r#"{}"#),
            (r#"{"discount_name":"1"}"#, r#"{"discount_value":1}"#),
        ];
        for (a, b) in differ {
            assert!(!same_content(tx, a.as_bytes(), b.as_bytes()), "{a} != {b}");
        }
    }
}
