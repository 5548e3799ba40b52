//! What the mock API holds: the latest record per key and type, exactly as
//! it was received, the interactions, and the counters behind
//! `/_mock/stats`.
//!
//! A request is judged in two phases. [`Store::check`] validates the
//! parsed records with the mock's own rules ([`validate`]) and then checks
//! their validated references against the store *as it is before the
//! request is applied* (no type references itself, so a parent can never
//! come from the same request). [`Store::apply`] then upserts the accepted
//! records under the type's write lock. Each type has its own lock, so
//! requests of different types never wait for each other and reference
//! checks only take read locks on the parent types.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;
use xxhash_rust::xxh3::Xxh3DefaultBuilder;

use crate::mock_api::check::{by_field, describe, validate, Problem};
use crate::mock_api::keys::{key_of, parent_refs, same_content, Key};
use crate::mock_api::parse::Parsed;
use crate::model::schema::{schema, TypeId};

/// A record that passed every check, ready to be stored.
#[derive(Debug)]
pub(crate) struct Candidate {
    /// The record's key (`None` for interactions).
    pub key: Option<Key>,
    /// The record's JSON text as it was received.
    pub json: Box<[u8]>,
}

/// A rejected record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    /// Position in the request.
    pub index: usize,
    /// The record's Cobi key, or `#<index>` when it has none.
    pub label: String,
    /// Why, as `field: reason; …`.
    pub reason: String,
    /// Whether a validated parent was unknown.
    pub reference: bool,
}

/// The verdict on one request's records.
#[derive(Debug, Default)]
pub(crate) struct Checked {
    /// Accepted records, in request order.
    pub accepted: Vec<Candidate>,
    /// Rejected records, in request order.
    pub failures: Vec<Failure>,
}

#[derive(Default)]
struct TypeStore {
    /// Latest received JSON per key.
    by_key: HashMap<Key, Box<[u8]>, Xxh3DefaultBuilder>,
    /// Every accepted record of a type without a key (interactions).
    unkeyed: Vec<Box<[u8]>>,
    accepted: u64,
    rejected: u64,
    duplicates: u64,
}

/// Per-type record maps and counters.
pub(crate) struct Store {
    types: Vec<RwLock<TypeStore>>,
    reference_failures: AtomicU64,
}

/// A record that passed validation, before its references are checked.
struct Valid<'a> {
    index: usize,
    key: Option<String>,
    /// Validated references: (field name, parent type, parent key).
    parents: Vec<(&'static str, TypeId, std::borrow::Cow<'a, str>)>,
    span: std::ops::Range<usize>,
}

impl Store {
    /// An empty store with one slot per schema type.
    pub fn new() -> Self {
        Store {
            types: (0..schema().types.len())
                .map(|_| RwLock::new(TypeStore::default()))
                .collect(),
            reference_failures: AtomicU64::new(0),
        }
    }

    /// Judges parsed records of type `ty`: parse problems, the mock's
    /// validation, then validated references against what is stored now.
    /// `body` is the request body the records were parsed from.
    pub fn check(&self, ty: TypeId, parsed: Vec<Parsed>, body: &[u8]) -> Checked {
        let t = schema().ty(ty);
        let mut out = Checked::default();
        // Phase 1: shape (no locks).
        let mut valid: Vec<Valid> = Vec::with_capacity(parsed.len());
        for (index, p) in parsed.into_iter().enumerate() {
            let Some(fields) = &p.fields else {
                out.failures.push(Failure {
                    index,
                    label: format!("#{index}"),
                    reason: describe(&p.problems),
                    reference: false,
                });
                continue;
            };
            let values = by_field(t, fields);
            let key = key_of(t, &values).map(|k| k.into_owned());
            let mut problems = p.problems.clone();
            let extra: Vec<Problem> = validate(t, &values)
                .into_iter()
                // A field already reported as unreadable is not also
                // "missing".
                .filter(|v| !problems.iter().any(|b| b.field == v.field))
                .collect();
            problems.extend(extra);
            let label = key.clone().unwrap_or_else(|| format!("#{index}"));
            if problems.is_empty() {
                let parents = parent_refs(t, &values);
                valid.push(Valid {
                    index,
                    key,
                    parents,
                    span: p.span,
                });
            } else {
                out.failures.push(Failure {
                    index,
                    label,
                    reason: describe(&problems),
                    reference: false,
                });
            }
        }

        // Phase 2: references, one parent type (one read lock) at a time.
        let mut parent_types: Vec<TypeId> = valid
            .iter()
            .flat_map(|v| v.parents.iter().map(|p| p.1))
            .collect();
        parent_types.sort_unstable();
        parent_types.dedup();
        let mut missing: Vec<Vec<String>> = vec![Vec::new(); valid.len()];
        for parent in parent_types {
            let store = self.types[parent as usize].read();
            for (i, v) in valid.iter().enumerate() {
                for (field, _, key) in v.parents.iter().filter(|p| p.1 == parent) {
                    if !store.by_key.contains_key(key.as_bytes()) {
                        missing[i].push(format!(
                            "{field} references unknown {} {key}",
                            schema().ty(parent).name
                        ));
                    }
                }
            }
        }
        for (v, missing) in valid.into_iter().zip(missing) {
            if missing.is_empty() {
                out.accepted.push(Candidate {
                    key: v.key.as_deref().map(Key::from),
                    json: body[v.span].into(),
                });
            } else {
                out.failures.push(Failure {
                    index: v.index,
                    label: v.key.unwrap_or_else(|| format!("#{}", v.index)),
                    reason: missing.join("; "),
                    reference: true,
                });
            }
        }
        out.failures.sort_by_key(|f| f.index);
        out
    }

    /// Stores the accepted records (upsert by key; unkeyed records are
    /// appended) and counts the request's outcome.
    pub fn apply(&self, ty: TypeId, accepted: Vec<Candidate>, failures: &[Failure]) {
        let refs = failures.iter().filter(|f| f.reference).count() as u64;
        if refs > 0 {
            self.reference_failures.fetch_add(refs, Ordering::Relaxed);
        }
        let mut guard = self.types[ty as usize].write();
        let store = &mut *guard;
        store.rejected += failures.len() as u64;
        store.accepted += accepted.len() as u64;
        // Replaced versions are freed after the lock is released.
        let mut replaced = Vec::new();
        for Candidate { key, json } in accepted {
            match key {
                None => store.unkeyed.push(json),
                Some(key) => match store.by_key.get_mut(key.as_bytes()) {
                    Some(old) => {
                        if *old == json || same_content(ty, old, &json) {
                            store.duplicates += 1;
                        }
                        replaced.push(std::mem::replace(old, json));
                    }
                    None => {
                        store.by_key.insert(key, json);
                    }
                },
            }
        }
        drop(guard);
    }

    /// The stored records of a type as received: sorted by key, or in
    /// arrival order for types without a key.
    pub fn records_json(&self, ty: TypeId) -> Vec<Box<[u8]>> {
        let store = self.types[ty as usize].read();
        if !store.unkeyed.is_empty() {
            return store.unkeyed.clone();
        }
        let mut all: Vec<(&Key, &Box<[u8]>)> = store.by_key.iter().collect();
        all.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        all.into_iter().map(|(_, v)| v.clone()).collect()
    }

    /// Per-type counters (non-zero entries only) and the reference failures.
    pub fn counters(&self) -> StoreCounters {
        let mut c = StoreCounters {
            reference_failures: self.reference_failures.load(Ordering::Relaxed),
            ..StoreCounters::default()
        };
        for (t, store) in schema().types.iter().zip(&self.types) {
            let s = store.read();
            let stored = (s.by_key.len() + s.unkeyed.len()) as u64;
            for (map, n) in [
                (&mut c.accepted, s.accepted),
                (&mut c.rejected, s.rejected),
                (&mut c.duplicates, s.duplicates),
                (&mut c.stored, stored),
            ] {
                if n > 0 {
                    map.insert(t.name.clone(), n);
                }
            }
        }
        c
    }

    /// Forgets every record and counter.
    pub fn reset(&self) {
        for s in &self.types {
            *s.write() = TypeStore::default();
        }
        self.reference_failures.store(0, Ordering::Relaxed);
    }
}

/// A snapshot of the store's counters.
#[derive(Debug, Default)]
pub(crate) struct StoreCounters {
    pub accepted: BTreeMap<String, u64>,
    pub rejected: BTreeMap<String, u64>,
    pub duplicates: BTreeMap<String, u64>,
    pub stored: BTreeMap<String, u64>,
    pub reference_failures: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_api::parse::parse_batch;

    const S1: &str = "550e8400-e29b-41d4-a716-446655440001";
    const B1: &str = "550e8400-e29b-41d4-a716-4466554400b1";

    fn run(store: &Store, ty: &str, body: &str) -> Vec<Failure> {
        let ty = schema().type_id(ty).unwrap();
        let batch = parse_batch(ty, body.as_bytes(), 5000).unwrap();
        let c = store.check(ty, batch.records, body.as_bytes());
        store.apply(ty, c.accepted, &c.failures);
        c.failures
    }

    #[test]
    fn references_are_checked_against_earlier_requests() {
        let store = Store::new();
        let branch = format!(
            r#"{{"records":[{{"branch_id":"{B1}","shop_id":"{S1}","name":"b","region":"CA"}}]}}"#
        );
        let f = run(&store, "branches", &branch);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].label, B1);
        assert_eq!(
            f[0].reason,
            format!("shop_id references unknown shops {S1}")
        );
        assert!(f[0].reference);
        let shop = format!(
            r#"{{"records":[{{"shop_id":"{S1}","name":"s","region":"CA","is_deleted":true}}]}}"#
        );
        assert!(run(&store, "shops", &shop).is_empty());
        // A soft-deleted parent still counts.
        assert!(run(&store, "branches", &branch).is_empty());
        assert!(run(&store, "branches", &branch).is_empty());
        let c = store.counters();
        assert_eq!(c.reference_failures, 1);
        assert_eq!(c.accepted["branches"], 2);
        assert_eq!(c.rejected["branches"], 1);
        assert_eq!(c.duplicates["branches"], 1);
        assert_eq!(c.stored["branches"], 1);
        assert_eq!(c.stored["shops"], 1);
        store.reset();
        assert!(store.counters().stored.is_empty());
    }

    #[test]
    fn records_are_stored_as_received() {
        let store = Store::new();
        let tx = schema().type_id("shops").unwrap();
        let one = format!(r#"{{"shop_id":"{S1}", "region":"CA","name":"caf\u00e9"}}"#);
        assert!(run(&store, "shops", &format!(r#"{{"records":[{one}]}}"#)).is_empty());
        assert_eq!(&*store.records_json(tx)[0], one.as_bytes());
        // The same content written differently is a duplicate.
        let again = format!(r#"{{"name":"café","shop_id":"{S1}","region":"CA"}}"#);
        assert!(run(&store, "shops", &format!(r#"{{"records":[{again}]}}"#)).is_empty());
        assert_eq!(store.counters().duplicates["shops"], 1);
        assert_eq!(&*store.records_json(tx)[0], again.as_bytes());
    }

    #[test]
    fn failures_are_labelled_and_in_order() {
        let store = Store::new();
        let body = format!(
            r#"{{"records":[{{"shop_id":"{S1}","name":"s","region":"ca"}},{{"name":"x","region":"CA"}},5,{{"shop_id":"{B1}","name":"s","region":"CA","colour":1}}]}}"#
        );
        let f = run(&store, "shops", &body);
        let got: Vec<(String, String)> = f.into_iter().map(|f| (f.label, f.reason)).collect();
        assert_eq!(got[0].0, S1);
        assert!(got[0].1.starts_with("region: must be two upper-case"));
        assert_eq!(
            got[1],
            ("#1".into(), "shop_id: required field is missing".into())
        );
        assert_eq!(
            got[2],
            ("#2".into(), "record: must be a JSON object".into())
        );
        assert_eq!(
            got[3],
            (B1.into(), "colour: unknown field for type shops".into())
        );
    }
}
