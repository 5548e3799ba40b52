//! The pre-screen: which records of a batch are the likeliest failures.
//!
//! The API checks a child's validated references against the parents it
//! holds (SPEC.md §3), so a record whose parent this daemon has not seen
//! accepted is the likeliest reason for a 207/400 — and a record rejected
//! before, unchanged since, the likeliest of all. [`is_suspect`] flags
//! them; when a batch is rejected, [`super::isolate`] sends the clean
//! records together and scans the suspects, which isolates reference
//! failures with about one request each even when the answer names no
//! record. Suspicion only orders the search: a wrongly suspected record
//! costs a request or two, never a verdict.
//!
//! [`Seen`] remembers hashes of the parent keys accepted by this process
//! (types that some validated reference points at), bounded: two
//! generations of at most [`Seen::GENERATION`] keys each, the older dropped
//! when the newer fills. Forgetting a parent only makes its children
//! suspects. It starts empty at each start-up: then every child is a
//! suspect, which the scan handles like plain halving.

use rustc_hash::FxHashSet;

use crate::model::record::{Json, Record};
use crate::model::schema::{schema, Reference, TypeId};

/// The hash of a key of type `ty`, as [`Seen`] holds it.
pub fn key_hash(ty: TypeId, key: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(key.as_bytes(), u64::from(ty))
}

/// Hashes of the parents `record` references through fields the API
/// validates (absent and null references are none).
pub fn parent_refs(record: &Record) -> Box<[u64]> {
    let t = schema().ty(record.ty);
    let mut out = Vec::new();
    for (f, v) in &record.fields {
        let Json::Str(key) = v else { continue };
        let parent = match &t.fields[*f as usize].reference {
            Some(Reference::To {
                ty,
                validated: true,
            }) => Some(*ty),
            Some(Reference::ByField {
                field,
                targets,
                validated: true,
            }) => record
                .get(*field)
                .and_then(Json::as_str)
                .and_then(|d| targets.iter().find(|(v, _)| v == d))
                .map(|(_, ty)| *ty),
            _ => None,
        };
        if let Some(p) = parent {
            out.push(key_hash(p, key));
        }
    }
    out.into_boxed_slice()
}

/// Whether some validated reference of any type points at `ty` (only
/// such keys are worth remembering).
pub fn is_parent_type(ty: TypeId) -> bool {
    schema().types.iter().any(|t| {
        t.fields.iter().any(|f| match &f.reference {
            Some(Reference::To { ty: p, validated }) => *validated && *p == ty,
            Some(Reference::ByField {
                targets, validated, ..
            }) => *validated && targets.iter().any(|(_, p)| *p == ty),
            None => false,
        })
    })
}

/// The rule: a record is a suspect when it was rejected before exactly as
/// it is now, or when one of its validated parents was not seen accepted.
pub fn is_suspect(rejected_before: bool, parents: &[u64], seen: &Seen) -> bool {
    rejected_before || parents.iter().any(|&p| !seen.contains(p))
}

/// Parent keys accepted by this process (bounded; see the module docs).
#[derive(Debug, Default)]
pub struct Seen {
    current: FxHashSet<u64>,
    previous: FxHashSet<u64>,
}

impl Seen {
    /// Most keys of one generation (two are kept: ~10 MiB at most).
    pub const GENERATION: usize = 1 << 18;

    /// Whether the key with this hash was accepted (and not rejected
    /// since).
    pub fn contains(&self, h: u64) -> bool {
        self.current.contains(&h) || self.previous.contains(&h)
    }

    /// A parent key was accepted.
    pub fn accepted(&mut self, h: u64) {
        if self.current.len() >= Self::GENERATION {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(h);
    }

    /// A parent key was rejected: its children are suspects again.
    pub fn rejected(&mut self, h: u64) {
        self.current.remove(&h);
        self.previous.remove(&h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ty: &str, fields: &[(&str, &str)]) -> Record {
        let t = schema().type_id(ty).unwrap();
        let mut r = Record::new(t);
        for (f, v) in fields {
            r.set(schema().ty(t).field(f).unwrap(), Json::Str((*v).into()));
        }
        r
    }

    #[test]
    fn validated_references_only() {
        let s = schema();
        let shops = s.type_id("shops").unwrap();
        let customers = s.type_id("customers").unwrap();
        let offers = s.type_id("offers").unwrap();
        // branches.shop_id is validated.
        let b = record("branches", &[("branch_id", "b"), ("shop_id", "s1")]);
        assert_eq!(&*parent_refs(&b), &[key_hash(shops, "s1")]);
        // transactions: shop_id validated; offer_id, student_id inferred.
        let t = record(
            "transactions",
            &[("shop_id", "s1"), ("offer_id", "o1"), ("student_id", "c1")],
        );
        assert_eq!(&*parent_refs(&t), &[key_hash(shops, "s1")]);
        // interactions.item_id: the parent type follows item_type.
        let i = record(
            "interactions",
            &[
                ("item_type", "OFFER"),
                ("item_id", "o1"),
                ("student_id", "c1"),
            ],
        );
        let mut refs = parent_refs(&i).to_vec();
        refs.sort();
        let mut want = vec![key_hash(offers, "o1"), key_hash(customers, "c1")];
        want.sort();
        assert_eq!(refs, want);
        // A root has none; the same key of another type hashes apart.
        assert!(parent_refs(&record("shops", &[("shop_id", "s1")])).is_empty());
        assert_ne!(key_hash(shops, "k"), key_hash(customers, "k"));
        assert!(is_parent_type(shops) && is_parent_type(customers));
        assert!(!is_parent_type(s.type_id("transactions").unwrap()));
    }

    #[test]
    fn the_suspect_rule() {
        let mut seen = Seen::default();
        let (a, b) = (key_hash(0, "a"), key_hash(0, "b"));
        seen.accepted(a);
        let cases: &[(bool, &[u64], bool)] = &[
            (false, &[], false),
            (false, &[a], false),
            (false, &[a, b], true),
            (false, &[b], true),
            (true, &[a], true),
            (true, &[], true),
        ];
        for (before, parents, want) in cases {
            assert_eq!(
                is_suspect(*before, parents, &seen),
                *want,
                "{before} {parents:?}"
            );
        }
        seen.rejected(a);
        assert!(
            is_suspect(false, &[a], &seen),
            "a rejected parent is unseen again"
        );
    }

    #[test]
    fn seen_keeps_two_generations() {
        let mut seen = Seen::default();
        for i in 0..(Seen::GENERATION as u64 * 2) {
            seen.accepted(i);
        }
        assert!(seen.contains(0), "the previous generation is still there");
        seen.accepted(u64::MAX);
        assert!(!seen.contains(0), "the oldest generation is dropped");
        assert!(seen.contains(Seen::GENERATION as u64 * 2 - 1));
        assert!(seen.contains(u64::MAX));
    }
}
