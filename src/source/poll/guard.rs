//! The late-commit guard: which cursor values a tick must re-read so that a
//! row is never skipped because its transaction committed after later rows
//! were read (DESIGN.md §4 rule 9), with a role that has `SELECT` only.
//!
//! What any role can see: `pg_locks` lists every open transaction of the
//! cluster by its virtual transaction id — including transactions that have
//! only read so far and hold no xid — and `pg_stat_activity` says which
//! database each belongs to (`xact_start`, `backend_xid` stay hidden without
//! `pg_read_all_stats`; the lock list does not).
//!
//! Each tick first runs an *observation* statement outside the tick's
//! snapshot — twice, 50 ms apart: the set of open transactions of this
//! database, the server clock, and for integer cursors `max(cursor)` as of
//! that statement's snapshot. Then the tick's `REPEATABLE READ` snapshot is
//! taken. (A transaction first seen in the second look started after the
//! first, so its bound is 50 ms old rather than a whole tick: on a busy
//! database the short transactions that are always open at an observation
//! do not widen every tick's window by the tick interval.)
//!
//! The rule: a transaction first seen open at observation `k` was not open
//! at observation `k − 1`, so it started after it — after that statement's
//! clock reading and after that statement's snapshot. Its rows therefore
//! carry cursor values at or above observation `k − 1`'s *bound*: the clock
//! (for `now()`-style timestamps, minus `lookback` for clock skew) or the
//! then-visible `max(cursor)` (for sequence-fed integers, which a later
//! `nextval` always exceeds). A transaction never seen at all started after
//! the previous observation too. So each tick reads from
//!
//! ```text
//! LEAST(position − lookback, previous bound, bound of every tracked
//!       transaction that is no longer open)
//! ```
//!
//! and forgets the ended ones only once that read completed. The open set
//! and the bounds are stored with the cursor (a `PollGuard` checkpoint), so
//! a restart keeps them; a transaction already open before anything was
//! known about it has an unknown bound ([`Bound::Start`]): when it ends the
//! mapping is read again in full. Timestamps are compared as instants and
//! converted to `timestamp` cursors so that the repeated autumn hour is
//! inside the window ([`SourceTable::bound_sql`]).
//!
//! This module is the pure bookkeeping; the SQL lives in `mod.rs` and
//! [`crate::source::reader`].
//!
//! [`SourceTable::bound_sql`]: crate::source::reader::SourceTable::bound_sql

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Prefix of the ids of prepared (two-phase) transactions.
pub const PREPARED: &str = "prepared:";

/// A lower bound on the cursor values a transaction can write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Bound {
    /// Unknown: the transaction was open before anything was observed.
    /// When it ends, the mapping is read again in full.
    Start,
    /// Time cursors: a server clock reading, UTC microseconds.
    Instant(i64),
    /// Integer cursors: `max(cursor)` then visible, as PostgreSQL text;
    /// `None` when the table had no row with a cursor (read every row).
    Value(Option<String>),
}

/// What the guard remembers for one mapping between ticks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardState {
    /// The cursor column this state was built for.
    pub cursor: String,
    /// The key columns this state was built for.
    pub key: Vec<String>,
    /// Open transactions seen at the last completed tick, with the bounds
    /// of what they may write (the smallest applies).
    pub open: BTreeMap<String, Vec<Bound>>,
    /// The bound of any transaction that starts after the last observation.
    pub next: Bound,
}

impl GuardState {
    /// The state before anything is known: every open transaction has an
    /// unknown bound, and the first tick reads everything.
    pub fn unknown(cursor: &str, key: &[String]) -> GuardState {
        GuardState {
            cursor: cursor.to_string(),
            key: key.to_vec(),
            open: BTreeMap::new(),
            next: Bound::Start,
        }
    }

    /// Whether this state belongs to a mapping with this cursor and key.
    pub fn matches(&self, cursor: &str, key: &[String]) -> bool {
        self.cursor == cursor && self.key == key
    }
}

/// One observation: the open transactions of the database and this
/// mapping's bound for transactions that start after it — taken twice, a
/// moment apart, so that a transaction first seen in the second look gets
/// the first look's (recent) bound rather than the previous tick's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// Ids of open transactions (virtual xids; `prepared:<xid>`).
    pub open: BTreeSet<String>,
    /// The bound for transactions not yet open.
    pub bound: Bound,
    /// The first look's open transactions.
    pub open_before: BTreeSet<String>,
    /// The first look's bound.
    pub bound_before: Bound,
}

/// What one tick must read for a mapping, and the state once it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The mapping must be read in full (an unknown bound is due).
    pub full: bool,
    /// Bounds the walk must start at or below (besides the position).
    pub from: Vec<Bound>,
    /// Transactions that ended since the last completed tick.
    pub ended: usize,
    /// The state to keep once the tick's read of this mapping completed.
    pub next: GuardState,
}

/// Plans a tick from the state of the last completed tick and a new
/// observation.
pub fn plan(state: &GuardState, obs: &Observation) -> Plan {
    let mut from = vec![state.next.clone()];
    let mut ended = 0;
    for (id, bounds) in &state.open {
        if !obs.open.contains(id) {
            ended += 1;
            from.extend(bounds.iter().cloned());
        }
    }
    dedup(&mut from);
    let mut open = BTreeMap::new();
    for id in &obs.open {
        let bounds = match state.open.get(id) {
            Some(b) => b.clone(),
            // A prepared transaction continues one that was open (and is
            // now gone from the list) or one never seen: it inherits every
            // bound this tick applies.
            None if id.starts_with(PREPARED) => from.clone(),
            // Not open at the first look: it started after it.
            None if !obs.open_before.contains(id) => vec![obs.bound_before.clone()],
            None => vec![state.next.clone()],
        };
        open.insert(id.clone(), bounds);
    }
    Plan {
        full: from.contains(&Bound::Start),
        from,
        ended,
        next: GuardState {
            cursor: state.cursor.clone(),
            key: state.key.clone(),
            open,
            next: obs.bound.clone(),
        },
    }
}

/// The state for a first read: transactions open at the first observation
/// `before` have unknown bounds unless they ended while waiting; those that
/// started since have `before`'s bound.
pub fn first_read_state(cursor: &str, key: &[String], before: &Observation) -> GuardState {
    GuardState {
        cursor: cursor.to_string(),
        key: key.to_vec(),
        open: before
            .open
            .iter()
            .map(|id| (id.clone(), vec![Bound::Start]))
            .collect(),
        next: before.bound.clone(),
    }
}

fn dedup(v: &mut Vec<Bound>) {
    let mut seen = Vec::new();
    v.retain(|b| {
        if seen.contains(b) {
            false
        } else {
            seen.push(b.clone());
            true
        }
    });
}

/// Keeps only the smallest instant (instants compare in Rust; other bounds
/// are compared by PostgreSQL in a `LEAST`).
pub fn simplify(v: &[Bound]) -> Vec<Bound> {
    let min_instant = v
        .iter()
        .filter_map(|b| match b {
            Bound::Instant(t) => Some(*t),
            _ => None,
        })
        .min();
    let mut out: Vec<Bound> = v
        .iter()
        .filter(|b| !matches!(b, Bound::Instant(_)))
        .cloned()
        .collect();
    if let Some(t) = min_instant {
        out.push(Bound::Instant(t));
    }
    dedup(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An observation whose two looks saw the same transactions.
    fn obs(open: &[&str], bound: Bound) -> Observation {
        let open: BTreeSet<String> = open.iter().map(|s| s.to_string()).collect();
        Observation {
            open_before: open.clone(),
            bound_before: bound.clone(),
            open,
            bound,
        }
    }

    fn state(open: &[(&str, Bound)], next: Bound) -> GuardState {
        GuardState {
            cursor: "c".into(),
            key: vec!["id".into()],
            open: open
                .iter()
                .map(|(id, b)| (id.to_string(), vec![b.clone()]))
                .collect(),
            next,
        }
    }

    #[test]
    fn table_of_ticks() {
        use Bound::*;
        struct Case {
            name: &'static str,
            state: GuardState,
            obs: Observation,
            full: bool,
            from: Vec<Bound>,
            open_after: Vec<(&'static str, Vec<Bound>)>,
        }
        let cases = vec![
            Case {
                name: "quiet: only the previous observation's bound applies",
                state: state(&[], Instant(100)),
                obs: obs(&[], Instant(200)),
                full: false,
                from: vec![Instant(100)],
                open_after: vec![],
            },
            Case {
                name: "a transaction first seen gets the previous bound, applies nothing yet",
                state: state(&[], Instant(100)),
                obs: obs(&["3/7"], Instant(200)),
                full: false,
                from: vec![Instant(100)],
                open_after: vec![("3/7", vec![Instant(100)])],
            },
            Case {
                name: "still open: its bound is kept, not applied",
                state: state(&[("3/7", Instant(100))], Instant(200)),
                obs: obs(&["3/7"], Instant(300)),
                full: false,
                from: vec![Instant(200)],
                open_after: vec![("3/7", vec![Instant(100)])],
            },
            Case {
                name: "ended: its old bound applies once",
                state: state(&[("3/7", Instant(100))], Instant(900)),
                obs: obs(&[], Instant(1000)),
                full: false,
                from: vec![Instant(900), Instant(100)],
                open_after: vec![],
            },
            Case {
                name: "an unknown transaction ending forces a full read",
                state: state(&[("3/7", Start), ("4/2", Instant(5))], Instant(900)),
                obs: obs(&["4/2"], Instant(1000)),
                full: true,
                from: vec![Instant(900), Start],
                open_after: vec![("4/2", vec![Instant(5)])],
            },
            Case {
                name: "integer cursors carry values",
                state: state(
                    &[("5/1", Value(Some("41".into())))],
                    Value(Some("90".into())),
                ),
                obs: obs(&[], Value(Some("95".into()))),
                full: false,
                from: vec![Value(Some("90".into())), Value(Some("41".into()))],
                open_after: vec![],
            },
            Case {
                name: "a prepared transaction inherits the bounds of what ended",
                state: state(&[("5/1", Instant(10))], Instant(50)),
                obs: obs(&["prepared:812"], Instant(60)),
                full: false,
                from: vec![Instant(50), Instant(10)],
                open_after: vec![("prepared:812", vec![Instant(50), Instant(10)])],
            },
        ];
        for c in cases {
            let p = plan(&c.state, &c.obs);
            assert_eq!(p.full, c.full, "{}", c.name);
            assert_eq!(p.from, c.from, "{}", c.name);
            let want: BTreeMap<String, Vec<Bound>> = c
                .open_after
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            assert_eq!(p.next.open, want, "{}", c.name);
            assert_eq!(p.next.next, c.obs.bound, "{}", c.name);
        }
    }

    #[test]
    fn a_transaction_new_in_the_second_look_gets_the_first_looks_bound() {
        let state = state(&[], Bound::Instant(100));
        let o = Observation {
            open: ["1/1", "2/2"].iter().map(|s| s.to_string()).collect(),
            bound: Bound::Instant(300),
            open_before: ["1/1"].iter().map(|s| s.to_string()).collect(),
            bound_before: Bound::Instant(290),
        };
        let p = plan(&state, &o);
        assert_eq!(p.next.open["1/1"], vec![Bound::Instant(100)]);
        assert_eq!(p.next.open["2/2"], vec![Bound::Instant(290)]);
        assert_eq!(p.from, vec![Bound::Instant(100)]);
    }

    #[test]
    fn first_read_marks_open_transactions_unknown() {
        let before = obs(&["1/1", "2/9"], Bound::Instant(7));
        let s = first_read_state("c", &["id".into()], &before);
        // 1/1 ended while waiting, 2/9 did not, 3/3 started since.
        let p = plan(&s, &obs(&["2/9", "3/3"], Bound::Instant(8)));
        assert!(p.full, "1/1 ended with an unknown bound");
        assert_eq!(p.next.open["2/9"], vec![Bound::Start]);
        assert_eq!(p.next.open["3/3"], vec![Bound::Instant(7)]);
    }

    #[test]
    fn simplify_keeps_the_smallest_instant() {
        use Bound::*;
        assert_eq!(
            simplify(&[Instant(5), Value(None), Instant(3), Value(None)]),
            vec![Value(None), Instant(3)]
        );
    }

    #[test]
    fn state_round_trips_as_json() {
        let s = state(&[("3/7", Bound::Value(Some("12".into())))], Bound::Start);
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(serde_json::from_value::<GuardState>(j).unwrap(), s);
    }
}
