//! Per-key decisions: send, skip, dead-letter, forget — pure functions of
//! the change and of what the state store knows of the key.
//!
//! - [`decide`]: a record is skipped as unchanged only when it is
//!   identical to the version the API last *accepted* (DESIGN.md §4.5): a
//!   dead-lettered record is sent again when its row changes, even if the
//!   new record is the same as the rejected one (its parent may have
//!   arrived since) — unless the row was only read again, not changed
//!   ([`Resend::Reread`]). A `dlq replay` item is sent only while its key is
//!   still dead-lettered with the letter's content: a newer version, a
//!   delete, or an accept since then wins (DESIGN.md §5).
//! - [`delete_from`]: what a soft delete is built from — the deleted row's
//!   image, else the delete image kept of what was last accepted. A key never accepted
//!   needs no delete; one whose delete cannot be built is a dead letter
//!   with the reason, never a silent skip (DESIGN.md §4.7).

use crate::model::record::{Json, Record};
use crate::model::schema::{schema, TypeId};
use crate::state::{KeyState, KeyStatus};

/// What a source version of a key says about its row, for the skip rule.
/// Ordered: when versions of a key meet in one epoch the greater stands
/// ([`Resend::max`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Resend {
    /// The row was read again without evidence that it changed (a poll
    /// read that repeats every tick: a table without a cursor, NULL-cursor
    /// rows): identical to what was accepted *or dead-lettered*, it is
    /// skipped — re-sending a rejected record every tick forever would
    /// only churn its letter. A change of the row or `dlq replay` sends it
    /// again.
    Reread,
    /// A change of the row (a replication change, a copy, a poll row read
    /// by the cursor walk — including its bounded lookback and late-commit
    /// windows): skipped only when identical to what the API accepted.
    #[default]
    Changed,
    /// `snapshot --force`: sent even if unchanged.
    Forced,
}

/// Where a change comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The source (a row version).
    Source {
        /// How an identical prior verdict is treated.
        resend: Resend,
    },
    /// `dlq replay` of a letter whose record has this fingerprint.
    Replay {
        /// Fingerprint of the letter's record as it was dead-lettered.
        letter: u64,
    },
}

/// What to do with one key's change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send it to the API.
    Send,
    /// Identical to what the API accepted (or, invalid, to what was
    /// dead-lettered): nothing to do.
    Unchanged,
    /// A replayed letter that no longer stands (the key changed since).
    StaleReplay,
    /// Fails local validation: a dead letter now, never sent.
    Invalid,
}

/// The rule for a change with `fingerprint` (`invalid`: it fails local
/// validation), given the key's last verdict.
pub fn decide(
    origin: Origin,
    fingerprint: u64,
    invalid: bool,
    prior: Option<&KeyState>,
) -> Decision {
    let last = prior.map(|p| (p.status, p.fingerprint));
    match origin {
        Origin::Replay { letter } if last != Some((KeyStatus::DeadLettered, letter)) => {
            return Decision::StaleReplay
        }
        Origin::Source { resend } if resend != Resend::Forced => {
            if last == Some((KeyStatus::Accepted, fingerprint)) {
                return Decision::Unchanged;
            }
            // Validation is deterministic: the same invalid record
            // dead-lettered again would only churn the letter; so would a
            // re-read of a row that did not change.
            if (invalid || resend == Resend::Reread)
                && last == Some((KeyStatus::DeadLettered, fingerprint))
            {
                return Decision::Unchanged;
            }
        }
        _ => {}
    }
    if invalid {
        Decision::Invalid
    } else {
        Decision::Send
    }
}

/// What a soft delete is built from.
#[derive(Debug, Clone, PartialEq)]
pub enum DeleteFrom {
    /// This record, marked `is_deleted = true`.
    Record(Record),
    /// Nothing known of the key (never delivered): nothing to send.
    Nothing,
    /// The key was only ever dead-lettered: forget it and its letter.
    Forget,
    /// It cannot be built: a dead letter with this reason.
    Unbuildable(String),
}

/// Builds the soft delete of a key of `ty` from the deleted row's image
/// (`basis`) or the key's delete image (`prior`). `None` for types
/// without `is_deleted` (interactions).
pub fn delete_from(
    ty: TypeId,
    basis: Option<Record>,
    prior: Option<&KeyState>,
) -> Option<DeleteFrom> {
    let is_deleted = schema().ty(ty).field("is_deleted")?;
    let mark = |mut r: Record| {
        r.set(is_deleted, Json::Bool(true));
        DeleteFrom::Record(r)
    };
    if let Some(r) = basis {
        return Some(mark(r));
    }
    Some(match prior {
        None => DeleteFrom::Nothing,
        Some(p) => match (&p.delete_image, p.status) {
            (Some(image), _) => match crate::state::image::decode(ty, image) {
                Ok(r) => mark(r),
                Err(e) => DeleteFrom::Unbuildable(format!(
                    "soft delete not sent: the delete image kept for this key (the record as \
                     last accepted) no longer reads as a {} record ({e}) — the schema changed \
                     since; Cobi still holds it as not deleted",
                    schema().ty(ty).name
                )),
            },
            (None, KeyStatus::DeadLettered) => DeleteFrom::Forget,
            (None, KeyStatus::Accepted) => DeleteFrom::Unbuildable(
                "soft delete not sent: no delete image of the record last accepted for this key \
                 is kept (it was accepted while the mapping kept none) and the deleted row's image lacks \
                 columns (set REPLICA IDENTITY FULL on the table); Cobi still holds it as not \
                 deleted"
                    .into(),
            ),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn state(status: KeyStatus, fingerprint: u64, image: Option<&[u8]>) -> KeyState {
        KeyState {
            status,
            fingerprint,
            delete_image: image.map(Bytes::copy_from_slice),
        }
    }

    #[test]
    fn the_send_table() {
        use Decision::*;
        use KeyStatus::*;
        let src = Origin::Source {
            resend: Resend::Changed,
        };
        let forced = Origin::Source {
            resend: Resend::Forced,
        };
        let reread = Origin::Source {
            resend: Resend::Reread,
        };
        let replay = Origin::Replay { letter: 7 };
        let acc = |fp| Some(state(Accepted, fp, None));
        let dead = |fp| Some(state(DeadLettered, fp, None));
        // (origin, fingerprint, invalid, prior) -> decision
        let cases: Vec<(Origin, u64, bool, Option<KeyState>, Decision)> = vec![
            (src, 1, false, None, Send),
            (src, 1, false, acc(1), Unchanged),
            (src, 1, false, acc(2), Send),
            // A dead letter's row changed: sent, even when identical.
            (src, 1, false, dead(1), Send),
            (src, 1, false, dead(2), Send),
            (forced, 1, false, acc(1), Send),
            (src, 1, true, None, Invalid),
            (src, 1, true, acc(2), Invalid),
            (src, 1, true, dead(1), Unchanged),
            (src, 1, true, dead(2), Invalid),
            (forced, 1, true, dead(1), Invalid),
            // A re-read without a change: a dead letter stays a letter
            // unless the record differs.
            (reread, 1, false, dead(1), Unchanged),
            (reread, 1, false, dead(2), Send),
            (reread, 1, false, acc(1), Unchanged),
            (reread, 1, false, None, Send),
            (reread, 1, true, dead(1), Unchanged),
            // A replay only while its letter stands.
            (replay, 9, false, dead(7), Send),
            (replay, 9, true, dead(7), Invalid),
            (replay, 9, false, dead(8), StaleReplay),
            (replay, 9, false, acc(7), StaleReplay),
            (replay, 9, false, acc(9), StaleReplay),
            (replay, 9, false, None, StaleReplay),
        ];
        for (origin, fp, invalid, prior, want) in cases {
            assert_eq!(
                decide(origin, fp, invalid, prior.as_ref()),
                want,
                "{origin:?} fp={fp} invalid={invalid} prior={prior:?}"
            );
        }
    }

    #[test]
    fn the_delete_table() {
        use KeyStatus::*;
        let s = schema();
        let shops = s.type_id("shops").unwrap();
        let copy = r#"{"shop_id":"7f0c1b9e-1d2a-4c1e-9a57-0f3f6c8b2a10","name":"A","region":"GB"}"#;
        let deleted = |text: &str| {
            let mut r = Record::from_json(shops, text.as_bytes()).unwrap();
            r.set(s.ty(shops).field("is_deleted").unwrap(), Json::Bool(true));
            DeleteFrom::Record(r)
        };
        // The image of `copy`.
        let image =
            crate::state::image::encode(&Record::from_json(shops, copy.as_bytes()).unwrap())
                .unwrap();
        let copy_image = Some(&image[..]);
        let basis =
            Record::from_json(shops, br#"{"shop_id":"b","name":"B","region":"GB"}"#).unwrap();
        let cases: Vec<(Option<Record>, Option<KeyState>, DeleteFrom)> = vec![
            // The row image wins.
            (Some(basis.clone()), Some(state(Accepted, 1, copy_image)), {
                let mut r = basis.clone();
                r.set(s.ty(shops).field("is_deleted").unwrap(), Json::Bool(true));
                DeleteFrom::Record(r)
            }),
            (None, Some(state(Accepted, 1, copy_image)), deleted(copy)),
            // Accepted once, then a newer version dead-lettered: the copy
            // of the accepted one.
            (
                None,
                Some(state(DeadLettered, 1, copy_image)),
                deleted(copy),
            ),
            (None, None, DeleteFrom::Nothing),
            (None, Some(state(DeadLettered, 1, None)), DeleteFrom::Forget),
        ];
        for (basis, prior, want) in cases {
            assert_eq!(
                delete_from(shops, basis, prior.as_ref()),
                Some(want),
                "{prior:?}"
            );
        }
        // Cannot be built: a reason, never a silent skip.
        let gone = delete_from(
            shops,
            None,
            // A damaged image (an unknown field id).
            Some(&state(Accepted, 1, Some(&[0xff, 0xff, 0xff][..]))),
        );
        match gone {
            Some(DeleteFrom::Unbuildable(r)) => {
                assert!(
                    r.contains("delete image") && r.contains("not deleted"),
                    "{r}"
                )
            }
            other => panic!("{other:?}"),
        }
        match delete_from(shops, None, Some(&state(Accepted, 1, None))) {
            Some(DeleteFrom::Unbuildable(r)) => assert!(r.contains("REPLICA IDENTITY FULL"), "{r}"),
            other => panic!("{other:?}"),
        }
        // Interactions have no soft delete.
        let ia = s.type_id("interactions").unwrap();
        assert_eq!(delete_from(ia, None, None), None);
    }
}
