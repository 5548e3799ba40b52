//! The state-store writes that record a key's verdict (pure).
//!
//! - Accepted: the key's state (fingerprint, and the delete image soft
//!   deletes need) and the removal of the key's dead letter whenever it may have
//!   one — its state says dead-lettered, *or* the store holds a letter for
//!   it ([`remove_letter`]): a letter orphaned by a crash between two
//!   writes of an earlier run never outlives the record's delivery. The
//!   state is not written again when the key's prior state is exactly it
//!   (a forced re-send of an unchanged record: `snapshot --force`,
//!   `resync`), so re-copying an unchanged table rewrites no page. The
//!   prior is read through the overlay of the epoch before, which commits
//!   first: what the store holds once that epoch has committed.
//! - Rejected: the dead letter (attempts counted on from the key's latest
//!   letter, committed or still in the epoch before) and the key's state,
//!   which keeps the delete image of what Cobi last accepted.
//! - Forgotten: a deleted key that was never accepted loses its state and
//!   its letter.

use bytes::Bytes;

use crate::model::schema::schema;
use crate::state::{DeadLetter, KeyState, KeyStatus, StateKey, Write};

/// Whether an accept must remove the key's dead letter: its last verdict
/// was a dead letter, or a letter of it is known to exist.
pub fn remove_letter(prior: Option<&KeyState>, letter_known: bool) -> bool {
    letter_known || prior.is_some_and(|p| p.status == KeyStatus::DeadLettered)
}

/// Writes for an accepted record (`remove_letter`: see [`remove_letter`]);
/// `prior` is the key's state before (none written if it is the same).
pub fn accepted(
    key: StateKey,
    prior: Option<&KeyState>,
    fingerprint: u64,
    delete_image: Option<Bytes>,
    remove_letter: bool,
) -> impl Iterator<Item = Write> {
    let remove = remove_letter.then(|| Write::RemoveDeadLetter(key.clone()));
    let state = KeyState {
        status: KeyStatus::Accepted,
        fingerprint,
        delete_image,
    };
    let changed = prior != Some(&state);
    let state = changed.then(|| Write::Key(key, state));
    remove.into_iter().chain(state)
}

/// What a rejected record's dead letter holds.
pub struct Rejection<'a> {
    /// The record's Cobi key, if it has one.
    pub cobi_key: Option<String>,
    /// The record as sent (or as it would have been).
    pub json: &'a [u8],
    /// Why.
    pub reason: String,
    /// The key's latest letter, if any.
    pub previous: Option<&'a DeadLetter>,
    /// Now (RFC 3339).
    pub now: &'a str,
}

/// The dead letter for a rejection.
pub fn letter(key: &StateKey, r: Rejection<'_>) -> DeadLetter {
    DeadLetter {
        ty: schema().ty(key.ty).name.clone(),
        mapping: key.mapping.to_string(),
        cobi_key: r.cobi_key,
        source_key: key.source_key.clone(),
        record: String::from_utf8_lossy(r.json).into_owned(),
        reason: r.reason,
        attempts: r.previous.map_or(1, |d| d.attempts.saturating_add(1)),
        first_at: r
            .previous
            .map_or_else(|| r.now.to_string(), |d| d.first_at.clone()),
        last_at: r.now.to_string(),
    }
}

/// Writes for a rejected record with `fingerprint`; `prior` is the key's
/// state before (its delete image of what Cobi accepted is kept).
pub fn rejected(
    key: StateKey,
    fingerprint: u64,
    prior: Option<KeyState>,
    letter: DeadLetter,
) -> [Write; 2] {
    [
        Write::DeadLetter(key.clone(), Box::new(letter)),
        Write::Key(
            key,
            KeyState {
                status: KeyStatus::DeadLettered,
                fingerprint,
                delete_image: prior.and_then(|p| p.delete_image),
            },
        ),
    ]
}

/// Writes for a deleted key that Cobi never accepted.
pub fn forgotten(key: StateKey) -> [Write; 2] {
    [Write::RemoveDeadLetter(key.clone()), Write::RemoveKey(key)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> StateKey {
        StateKey {
            ty: schema().type_id("shops").unwrap(),
            mapping: "shops/public.shop".into(),
            source_key: "42".into(),
        }
    }

    #[test]
    fn an_accept_removes_any_letter_the_key_may_have() {
        let st = |status| KeyState {
            status,
            fingerprint: 1,
            delete_image: None,
        };
        let (acc, dead) = (st(KeyStatus::Accepted), st(KeyStatus::DeadLettered));
        // (prior state, a letter known in the store) -> remove it
        let cases = [
            (None, false, false),
            (Some(&acc), false, false),
            (Some(&dead), false, true),
            // The orphan: a letter whose key reads as accepted (or unknown).
            (Some(&acc), true, true),
            (None, true, true),
        ];
        for (prior, known, want) in cases {
            assert_eq!(remove_letter(prior, known), want, "{prior:?} {known}");
        }
        let w: Vec<Write> = accepted(key(), None, 5, None, true).collect();
        assert_eq!(w[0], Write::RemoveDeadLetter(key()));
        assert!(
            matches!(&w[1], Write::Key(_, s) if s.status == KeyStatus::Accepted && s.fingerprint == 5)
        );
        assert_eq!(accepted(key(), None, 5, None, false).count(), 1);
    }

    #[test]
    fn an_accept_writes_the_state_only_when_it_changes() {
        let image = |b: &'static [u8]| Some(Bytes::from_static(b));
        let st = |status, fingerprint, delete_image| KeyState {
            status,
            fingerprint,
            delete_image,
        };
        use KeyStatus::{Accepted, DeadLettered};
        // (prior, accepted fingerprint and image) -> the state is written
        let cases = [
            (None, 5, image(b"a"), true),
            // A forced re-send of what the store holds: nothing to write.
            (Some(st(Accepted, 5, image(b"a"))), 5, image(b"a"), false),
            (Some(st(Accepted, 5, None)), 5, None, false),
            (Some(st(Accepted, 4, image(b"a"))), 5, image(b"a"), true),
            (Some(st(DeadLettered, 5, image(b"a"))), 5, image(b"a"), true),
            // The image policy changed since (or the image differs).
            (Some(st(Accepted, 5, None)), 5, image(b"a"), true),
            (Some(st(Accepted, 5, image(b"a"))), 5, None, true),
            (Some(st(Accepted, 5, image(b"a"))), 5, image(b"b"), true),
        ];
        for (prior, fingerprint, img, want) in cases {
            let w: Vec<Write> =
                accepted(key(), prior.as_ref(), fingerprint, img.clone(), false).collect();
            let want_writes: Vec<Write> = if want {
                vec![Write::Key(key(), st(Accepted, fingerprint, img))]
            } else {
                vec![]
            };
            assert_eq!(w, want_writes, "{prior:?} {fingerprint}");
        }
        // A letter to remove is removed even when the state stands.
        let prior = st(Accepted, 5, None);
        let w: Vec<Write> = accepted(key(), Some(&prior), 5, None, true).collect();
        assert_eq!(w, vec![Write::RemoveDeadLetter(key())]);
    }

    #[test]
    fn attempts_count_on_from_the_latest_letter() {
        let first = letter(
            &key(),
            Rejection {
                cobi_key: Some("k".into()),
                json: b"{}",
                reason: "unknown shop".into(),
                previous: None,
                now: "2024-01-01T00:00:00Z",
            },
        );
        assert_eq!(
            (first.attempts, first.first_at.as_str()),
            (1, "2024-01-01T00:00:00Z")
        );
        assert_eq!(first.ty, "shops");
        let second = letter(
            &key(),
            Rejection {
                cobi_key: Some("k".into()),
                json: b"{\"a\":1}",
                reason: "again".into(),
                previous: Some(&first),
                now: "2024-01-02T00:00:00Z",
            },
        );
        assert_eq!(second.attempts, 2);
        assert_eq!(second.first_at, "2024-01-01T00:00:00Z");
        assert_eq!(second.last_at, "2024-01-02T00:00:00Z");
        assert_eq!(second.record, "{\"a\":1}");
    }

    #[test]
    fn a_rejection_keeps_the_accepted_copy() {
        let prior = KeyState {
            status: KeyStatus::Accepted,
            fingerprint: 1,
            delete_image: Some(Bytes::from_static(b"\x01image")),
        };
        let l = letter(
            &key(),
            Rejection {
                cobi_key: None,
                json: b"{}",
                reason: "x".into(),
                previous: None,
                now: "t",
            },
        );
        let w = rejected(key(), 2, Some(prior), l);
        match &w[1] {
            Write::Key(_, s) => {
                assert_eq!(s.status, KeyStatus::DeadLettered);
                assert_eq!(s.fingerprint, 2);
                assert_eq!(s.delete_image.as_deref(), Some(&b"\x01image"[..]));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(forgotten(key())[1], Write::RemoveKey(key()));
    }
}
