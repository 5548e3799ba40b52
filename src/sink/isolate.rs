//! Finding the records a batch answer rejected, as a pure state machine.
//!
//! The API's 207/400 answers say only that *some* records failed, in one
//! free-text error whose shape is unspecified (SPEC.md §4.3). An
//! [`Isolator`] turns one batch into a sequence of requests (groups of the
//! batch's records) and, fed each answer, decides what to send next until
//! every record has a [`Verdict`]. The rules, each in one function:
//!
//! - **A record is rejected only alone.** A record becomes a dead letter
//!   only when a request holding nothing but it was rejected; nothing is
//!   ever given up on, so a record the API would accept is always accepted
//!   in the end. There is no request budget: the requests are paced by the
//!   client (`api.concurrency`, `api.requests_per_minute`) instead.
//! - **Named keys first** ([`split`]): when the error text names keys of
//!   records in the rejected group, those are sent alone and the rest as
//!   one group.
//! - **Pre-screen** ([`split`]): otherwise, when the group mixes suspects
//!   (records whose parents this daemon has not seen accepted, or that
//!   were rejected before with the same content) with clean records, the
//!   clean ones go as one group and the suspects are scanned (below).
//! - **Scan**: suspects are sent in groups that start alone and double
//!   after each accepted group ([`grow`]); a rejected group of several is
//!   halved and its scan goes back to smaller groups ([`shrink`]). Accurate
//!   suspicion costs one request per bad record; wrong suspicion costs a
//!   few requests more than the group would have.
//! - **Halves**: anything else is split in two. The left half is sent
//!   first; if it is accepted, the right half is known to hold a rejected
//!   record and is split at once without being sent (it is still never
//!   rejected without a request of its own, [`infer_rejected`]).
//!
//! The async driver ([`super::deliver`]) sends the requests concurrently
//! and feeds the answers back; the tests below run the machine against a
//! simulated API and print the request counts.

use std::collections::{HashSet, VecDeque};

use rustc_hash::FxHashMap;

use crate::sink::deliver::Outgoing;

/// The verdict on one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted.
    Accepted,
    /// Rejected; the reason is the API's error.
    Rejected(String),
}

/// The API's answer to one request of an isolation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Every record accepted.
    Accepted,
    /// Some or all rejected, with the API's error text.
    Rejected(String),
}

/// A request to send: positions in the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Pass back to [`Isolator::answer`].
    pub id: u32,
    /// Positions of the records to send (in the slice given to
    /// [`Isolator::new`]).
    pub records: Vec<u32>,
}

/// Scan steps of one scan in flight at a time.
const SCAN_WIDTH: usize = 4;

/// How a rejected group of several records is divided ([`split`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Split {
    /// The error names some records: each alone, the rest together.
    Named {
        /// Records the error did not name (may be empty).
        rest: Vec<u32>,
        /// Records it named, each sent alone.
        named: Vec<u32>,
    },
    /// Clean records together, suspects scanned.
    Screened {
        /// Records with no reason for suspicion.
        clean: Vec<u32>,
        /// The likeliest failures.
        suspects: Vec<u32>,
    },
    /// The left half first, the right half after it.
    Halves {
        /// Sent first.
        left: Vec<u32>,
        /// Sent (or known rejected) once the left half is answered.
        right: Vec<u32>,
    },
}

/// Tokens of an error text that look like keys (UUIDs and other words of
/// 8+ characters made of letters, digits, `-`, `_` and `|`).
pub fn named_keys(error: &str) -> HashSet<&str> {
    error
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '|'))
        .filter(|t| t.len() >= 8)
        .collect()
}

/// Whether `key` (a Cobi key, `|`-joined for natural keys) is among
/// `names`.
fn is_named(key: Option<&str>, names: &HashSet<&str>) -> bool {
    key.is_some_and(|k| names.contains(k) || k.split('|').any(|p| names.contains(p)))
}

/// How to divide `group` (two records or more), rejected with `error`.
pub fn split(records: &[Outgoing], group: Vec<u32>, error: &str) -> Split {
    debug_assert!(group.len() > 1);
    let names = named_keys(error);
    if !names.is_empty() {
        let (named, rest): (Vec<u32>, Vec<u32>) = group
            .iter()
            .partition(|&&i| is_named(records[i as usize].cobi_key.as_deref(), &names));
        if !named.is_empty() {
            return Split::Named { rest, named };
        }
    }
    let (suspects, clean): (Vec<u32>, Vec<u32>) =
        group.iter().partition(|&&i| records[i as usize].suspect);
    if !suspects.is_empty() && !clean.is_empty() {
        return Split::Screened { clean, suspects };
    }
    let mut left = group;
    let right = left.split_off(left.len() / 2);
    Split::Halves { left, right }
}

/// The next scan group size after an accepted group of `size`.
pub fn grow(size: usize) -> usize {
    size.saturating_mul(2)
}

/// The next scan group size after a rejected group of `size` records.
pub fn shrink(size: usize) -> usize {
    (size / 2).max(1)
}

/// What to do with a group known to hold a rejected record (its sibling
/// half was accepted): `true` to split it without sending it, `false` to
/// send it (a single record is never rejected without its own request).
pub fn infer_rejected(len: usize) -> bool {
    len > 1
}

/// What an answered request was for.
#[derive(Debug)]
enum Role {
    /// A group on its own.
    Whole,
    /// The left half; `right` waits for its answer.
    Left {
        right: Vec<u32>,
        /// The error that rejected both halves together.
        error: String,
    },
    /// A step of scan number `scan`.
    Scan { scan: usize },
}

#[derive(Debug)]
struct Scan {
    queue: VecDeque<u32>,
    size: usize,
    outstanding: usize,
}

/// The isolation of one batch (see the module docs).
pub struct Isolator<'a> {
    records: &'a [Outgoing],
    verdicts: Vec<Option<Verdict>>,
    ready: VecDeque<(Vec<u32>, Role)>,
    in_flight: FxHashMap<u32, (Vec<u32>, Role)>,
    scans: Vec<Scan>,
    next_id: u32,
    requests: usize,
    open: usize,
}

impl<'a> Isolator<'a> {
    /// Starts with the whole batch as the first request.
    pub fn new(records: &'a [Outgoing]) -> Isolator<'a> {
        let mut iso = Isolator {
            records,
            verdicts: vec![None; records.len()],
            ready: VecDeque::new(),
            in_flight: FxHashMap::default(),
            scans: Vec::new(),
            next_id: 0,
            requests: 0,
            open: records.len(),
        };
        if !records.is_empty() {
            iso.ready
                .push_back(((0..records.len() as u32).collect(), Role::Whole));
        }
        iso
    }

    /// A request that can be sent now, if any (more may become ready as
    /// answers come in).
    pub fn next_request(&mut self) -> Option<Request> {
        let (records, role) = self.ready.pop_front()?;
        let id = self.next_id;
        self.next_id += 1;
        self.requests += 1;
        let req = Request {
            id,
            records: records.clone(),
        };
        self.in_flight.insert(id, (records, role));
        Some(req)
    }

    /// Feeds the answer to request `id`.
    pub fn answer(&mut self, id: u32, answer: Answer) {
        let Some((group, role)) = self.in_flight.remove(&id) else {
            return;
        };
        if let Role::Scan { scan } = role {
            let s = &mut self.scans[scan];
            s.outstanding -= 1;
            s.size = match &answer {
                Answer::Accepted => grow(s.size),
                Answer::Rejected(_) => shrink(group.len()).min(s.size),
            };
        }
        match (answer, role) {
            (Answer::Accepted, Role::Left { right, error }) => {
                self.accept(&group);
                self.known_rejected(right, &error);
            }
            (Answer::Accepted, _) => self.accept(&group),
            (Answer::Rejected(error), Role::Left { right, .. }) => {
                self.ready.push_back((right, Role::Whole));
                self.rejected(group, &error);
            }
            (Answer::Rejected(error), _) => self.rejected(group, &error),
        }
        for i in 0..self.scans.len() {
            self.pump(i);
        }
    }

    /// Whether every record has its verdict.
    pub fn is_done(&self) -> bool {
        self.open == 0
    }

    /// Requests issued so far.
    pub fn requests(&self) -> usize {
        self.requests
    }

    /// Every record's verdict, in batch order (call once [`Self::is_done`]).
    pub fn verdicts(self) -> Vec<Verdict> {
        self.verdicts
            .into_iter()
            .map(|v| v.expect("every record has a verdict"))
            .collect()
    }

    fn accept(&mut self, group: &[u32]) {
        for &i in group {
            self.set(i, Verdict::Accepted);
        }
    }

    fn set(&mut self, i: u32, v: Verdict) {
        let slot = &mut self.verdicts[i as usize];
        if slot.is_none() {
            self.open -= 1;
        }
        *slot = Some(v);
    }

    /// A group the API rejected. (A scan step holds only suspects, so
    /// [`split`] names or halves it.)
    fn rejected(&mut self, group: Vec<u32>, error: &str) {
        if group.len() == 1 {
            self.set(group[0], Verdict::Rejected(error.to_string()));
            return;
        }
        let how = split(self.records, group, error);
        self.divide(how, error);
    }

    /// A group of several records known to hold a rejected one, without
    /// its own answer.
    fn known_rejected(&mut self, group: Vec<u32>, error: &str) {
        if infer_rejected(group.len()) {
            let how = split(self.records, group, error);
            self.divide(how, error);
        } else {
            self.ready.push_back((group, Role::Whole));
        }
    }

    fn divide(&mut self, how: Split, error: &str) {
        match how {
            Split::Named { rest, named } => {
                if !rest.is_empty() {
                    self.ready.push_back((rest, Role::Whole));
                }
                for i in named {
                    self.ready.push_back((vec![i], Role::Whole));
                }
            }
            Split::Screened { clean, suspects } => {
                self.ready.push_back((clean, Role::Whole));
                self.scans.push(Scan {
                    queue: suspects.into(),
                    size: 1,
                    outstanding: 0,
                });
            }
            Split::Halves { left, right } => {
                self.ready.push_back((
                    left,
                    Role::Left {
                        right,
                        error: error.to_string(),
                    },
                ));
            }
        }
    }

    /// Issues a scan's next steps (up to [`SCAN_WIDTH`] in flight).
    fn pump(&mut self, scan: usize) {
        loop {
            let s = &mut self.scans[scan];
            if s.outstanding >= SCAN_WIDTH || s.queue.is_empty() {
                return;
            }
            let n = s.size.min(s.queue.len());
            let group: Vec<u32> = s.queue.drain(..n).collect();
            s.outstanding += 1;
            self.ready.push_back((group, Role::Scan { scan }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn key(i: usize) -> String {
        format!("00000000-0000-4000-8000-{i:012}")
    }

    fn batch(n: usize, suspect: impl Fn(usize) -> bool) -> Vec<Outgoing> {
        (0..n)
            .map(|i| Outgoing {
                index: i,
                json: Bytes::new(),
                cobi_key: Some(key(i)),
                suspect: suspect(i),
            })
            .collect()
    }

    /// The simulated API: rejects a request holding any bad record; names
    /// the bad ones (up to 100, like the mock) or only counts them.
    fn api(bad: &HashSet<usize>, group: &[u32], named: bool) -> Answer {
        let failed: Vec<usize> = group
            .iter()
            .map(|&i| i as usize)
            .filter(|i| bad.contains(i))
            .collect();
        if failed.is_empty() {
            return Answer::Accepted;
        }
        Answer::Rejected(if named {
            let mut s = format!("{} of {} records failed: ", failed.len(), group.len());
            for i in failed.iter().take(100) {
                s.push_str(&format!("{}: unknown shop_id; ", key(*i)));
            }
            s
        } else {
            format!(
                "{} of {} records failed validation",
                failed.len(),
                group.len()
            )
        })
    }

    /// Runs an isolation to the end, answering requests in a shuffled
    /// order (the driver sends them concurrently); returns the verdicts
    /// and the request count.
    fn run(records: &[Outgoing], bad: &HashSet<usize>, named: bool) -> (Vec<Verdict>, usize) {
        let mut iso = Isolator::new(records);
        let mut pending: Vec<Request> = Vec::new();
        let mut turn = 0usize;
        while !iso.is_done() {
            while let Some(r) = iso.next_request() {
                pending.push(r);
            }
            assert!(!pending.is_empty(), "stalled with records left");
            // Deterministic but not FIFO: answer every third request first.
            turn = turn.wrapping_mul(31).wrapping_add(7);
            let r = pending.swap_remove(turn % pending.len());
            assert!(!r.records.is_empty());
            iso.answer(r.id, api(bad, &r.records, named));
        }
        assert!(iso.next_request().is_none());
        let n = iso.requests();
        (iso.verdicts(), n)
    }

    fn spread(n: usize, k: usize) -> HashSet<usize> {
        (0..k)
            .map(|j| (j * n / k + n / (2 * k.max(1))) % n)
            .collect()
    }

    fn check(verdicts: &[Verdict], bad: &HashSet<usize>) {
        for (i, v) in verdicts.iter().enumerate() {
            match v {
                Verdict::Accepted => assert!(!bad.contains(&i), "bad record {i} accepted"),
                Verdict::Rejected(e) => {
                    assert!(bad.contains(&i), "good record {i} rejected: {e}");
                    assert!(e.contains("1 of 1"), "rejected alone: {e}");
                }
            }
        }
    }

    #[test]
    fn split_rules() {
        let recs = batch(6, |i| i == 4);
        // Names win over suspicion.
        assert_eq!(
            split(&recs, (0..6).collect(), &format!("bad: {}", key(2))),
            Split::Named {
                rest: vec![0, 1, 3, 4, 5],
                named: vec![2]
            }
        );
        // A name of a record not in the group is no help.
        assert_eq!(
            split(&recs, vec![0, 1, 4], &format!("bad: {}", key(2))),
            Split::Screened {
                clean: vec![0, 1],
                suspects: vec![4]
            }
        );
        // No names, no suspects: halves.
        assert_eq!(
            split(&recs, vec![0, 1, 2], "2 of 3 failed"),
            Split::Halves {
                left: vec![0],
                right: vec![1, 2]
            }
        );
        // All suspects: halves too.
        let all = batch(4, |_| true);
        assert_eq!(
            split(&all, vec![0, 1, 2, 3], "x"),
            Split::Halves {
                left: vec![0, 1],
                right: vec![2, 3]
            }
        );
        // Natural keys match on any part.
        let mut fav = batch(2, |_| false);
        fav[1].cobi_key = Some(format!("{}|{}", key(7), key(8)));
        assert_eq!(
            split(&fav, vec![0, 1], &format!("{} unknown", key(8))),
            Split::Named {
                rest: vec![0],
                named: vec![1]
            }
        );
    }

    #[test]
    fn scan_sizes_and_inference() {
        assert_eq!(
            [grow(1), grow(2), shrink(1), shrink(2), shrink(9)],
            [2, 4, 1, 1, 4]
        );
        assert!(
            !infer_rejected(1),
            "a single record always gets its own request"
        );
        assert!(infer_rejected(2));
    }

    #[test]
    fn an_accepted_batch_is_one_request() {
        let recs = batch(5000, |i| i % 3 == 0);
        let (v, n) = run(&recs, &HashSet::new(), false);
        assert_eq!(n, 1);
        assert!(v.iter().all(|v| *v == Verdict::Accepted));
        let empty: Vec<Outgoing> = Vec::new();
        let iso = Isolator::new(&empty);
        assert!(iso.is_done());
    }

    /// Every good record is accepted and exactly the bad ones rejected,
    /// however many and wherever they are, with or without names and
    /// suspicion; prints the request counts (the table in the report).
    #[test]
    fn isolation_is_exact_and_its_cost_is_printed() {
        let n = 5000;
        let mut table = String::from(
            "bad of 5000 | named | opaque, suspects flagged | opaque, no signal | opaque, all suspect\n",
        );
        for k in [1usize, 10, 50, 200] {
            let bad = spread(n, k);
            let flagged = batch(n, |i| bad.contains(&i));
            let none = batch(n, |_| false);
            let all = batch(n, |_| true);
            let mut row = vec![format!("{k:>11}")];
            for (recs, named) in [
                (&none, true),
                (&flagged, false),
                (&none, false),
                (&all, false),
            ] {
                let (v, c) = run(recs, &bad, named);
                check(&v, &bad);
                row.push(format!("{c:>5}"));
            }
            table.push_str(&row.join(" | "));
            table.push('\n');
        }
        println!("{table}");
    }

    #[test]
    fn clustered_and_wrongly_suspected_failures_are_still_exact() {
        let n = 1000;
        // A block of bad records; half the good ones wrongly suspected.
        let bad: HashSet<usize> = (300..340).collect();
        let recs = batch(n, |i| i % 2 == 0);
        let (v, _) = run(&recs, &bad, false);
        check(&v, &bad);
        // Every record bad.
        let bad: HashSet<usize> = (0..64).collect();
        let recs = batch(64, |_| false);
        let (v, c) = run(&recs, &bad, false);
        check(&v, &bad);
        assert!(c <= 2 * 64, "{c}");
        // Suspects all good, one clean record bad.
        let bad: HashSet<usize> = [999].into();
        let recs = batch(n, |i| i < 500);
        let (v, _) = run(&recs, &bad, false);
        check(&v, &bad);
    }
}
