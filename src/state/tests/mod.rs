//! The state store's tests, one idea per file: the contract both stores
//! keep ([`contract`]), the sled store's page layout ([`page_layout`]), crash
//! durability ([`crash`]), concurrent lookups and applies ([`races`]) and
//! the presence filter ([`presence`]), keys held back in the journal
//! ([`journal`]). Shared helpers are here.

mod contract;
mod crash;
mod journal;
mod page_layout;
mod presence;
mod races;

use super::*;
use super::{keycode, layout, pages, ranges};
use crate::mapping::value::oid;

/// A sled store that writes every key to its page at once (no key held
/// back in the journal): for tests of the pages themselves.
fn paged(dir: &std::path::Path) -> SledStore {
    SledStore::open_draining_at(dir, 0).unwrap()
}

/// Drain thresholds the contract is kept under: every apply, every few
/// applies, and the product's (scattered keys stay held back; keys that
/// crowd their pages are written at once).
const DRAINS: [usize; 3] = [0, 4096, super::journal::DRAIN_BYTES];

fn key(ty: &str, sk: &str) -> StateKey {
    StateKey {
        ty: schema().type_id(ty).unwrap(),
        mapping: format!("{ty}/public.t").into(),
        source_key: sk.into(),
    }
}

fn accepted(fp: u64, image: Option<&str>) -> KeyState {
    KeyState {
        status: KeyStatus::Accepted,
        fingerprint: fp,
        delete_image: image.map(|s| bytes::Bytes::copy_from_slice(s.as_bytes())),
    }
}

/// Every key of a mapping with its full state, sorted (keys from
/// `keys_of`, states from `get_keys`, which must agree on statuses).
fn all_states(store: &dyn StateStore, ty: TypeId, mapping: &str) -> Vec<(String, KeyState)> {
    let mut listed = store.keys_of(ty, mapping).unwrap();
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    let keys: Vec<StateKey> = listed
        .iter()
        .map(|(k, _)| StateKey {
            ty,
            mapping: mapping.into(),
            source_key: k.clone(),
        })
        .collect();
    let refs: Vec<&StateKey> = keys.iter().collect();
    let states = store.get_keys(&refs).unwrap();
    listed
        .into_iter()
        .zip(states)
        .map(|((k, status), st)| {
            let st = st.unwrap_or_else(|| panic!("{k} is listed but has no state"));
            assert_eq!(st.status, status, "{k}");
            (k, st)
        })
        .collect()
}

/// An integer page of the previous format (version 3): the present and
/// imaged slot masks, then each present slot accepted with its slot number
/// as fingerprint.
fn v3_page(present: &[u8], imaged: &[u8]) -> Vec<u8> {
    let mask = |slots: &[u8]| slots.iter().fold(0u64, |m, s| m | (1 << s));
    let mut v = vec![3u8];
    v.extend_from_slice(&mask(present).to_be_bytes());
    v.extend_from_slice(&mask(imaged).to_be_bytes());
    for &slot in present {
        encode_fixed(KeyStatus::Accepted, u64::from(slot), &mut v);
    }
    v
}

fn uuid_key(n: u64) -> String {
    uuid::Uuid::from_u64_pair(n.wrapping_mul(0x9e37_79b9_7f4a_7c15), n).to_string()
}

fn int_pos(v: i64) -> Position {
    Position {
        cursor: None,
        key: vec![CursorValue {
            oid: oid::INT8,
            text: Some(v.to_string()),
        }],
    }
}

fn sorted_states(s: &dyn StateStore) -> Vec<(String, KeyState)> {
    let k = key("transactions", "1");
    all_states(s, k.ty, &k.mapping)
}

/// Writes giving each key an accepted state with fingerprint `fp`.
fn accept_all(keys: &[StateKey], fp: u64, image: Option<&str>) -> Vec<Write> {
    keys.iter()
        .map(|k| Write::Key(k.clone(), accepted(fp, image)))
        .collect()
}
