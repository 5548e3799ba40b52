//! The watermark snapshot as a pure state machine: events in, decisions
//! out. No I/O happens here; the session ([`super::session`]) reads chunks,
//! emits watermark messages and carries out the verdicts.
//!
//! # Contract
//! Tables are copied in key-ordered chunks while the stream runs. A read
//! (a chunk of a table, or rows re-read by key because the stream left a
//! large value out) is taken in one snapshot `S` and followed by a
//! watermark message that arrives in the stream after every transaction
//! `S` can see. Until its watermark arrives, a read is *pending*:
//!
//! - a change to a key the read holds, from a transaction `S` sees, is
//!   already in the read: the upsert is skipped ([`Verdict::Skip`]);
//! - a change from a transaction `S` does not see is newer than the read:
//!   the key's row is dropped from the read and the change is delivered;
//! - at the watermark the read's remaining rows are delivered
//!   ([`Emit`]), and a chunk moves its table's [`Phase`].
//!
//! A change to a key the copy has not reached yet is skipped (a later chunk
//! reads it) and its transaction id is remembered: a read is only taken
//! from a snapshot that sees every remembered transaction
//! ([`Watermarks::may_read`]), which closes the window in which a commit
//! is decoded before it becomes visible.
//!
//! Deletes are never skipped: a deleted row is never read again, and the
//! API may hold the key (a re-copy, an interrupted copy, a restored
//! mapping). A delete of a key the copy has not reached yet is sent
//! without its old row ([`Verdict::DeleteIfKnown`]): the sink then sends
//! it only for a key the API accepted before, from what it last sent —
//! never a record whose parents may not have been copied yet.
//!
//! A TRUNCATE ([`Watermarks::on_truncate`]) empties every pending read of
//! the table taken before it, so a chunk read before the TRUNCATE never
//! brings its rows back; reads taken after it keep their rows (they were
//! inserted after the TRUNCATE).
//!
//! While rows are waiting to be re-read ([`Watermarks::request`]) or a
//! re-read is pending, the position that may be confirmed to PostgreSQL is
//! held where it was before the first request ([`Watermarks::confirmable`]):
//! after a crash the stream replays the change and asks again.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashSet};

use rustc_hash::FxHashMap;

use crate::mapping::value::Value;
use crate::state::TableSnapshot;

/// Key column values of one row, in key order.
pub type Key = Vec<Value>;

/// Compares two keys with PostgreSQL's ordering of their values.
pub fn cmp_keys(a: &[Value], b: &[Value]) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        let o = x.key_cmp(y);
        if o != Ordering::Equal {
            return o;
        }
    }
    a.len().cmp(&b.len())
}

/// A PostgreSQL snapshot (`pg_current_snapshot()`), with full 64-bit ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSnapshot {
    /// Every transaction below is finished.
    pub xmin: u64,
    /// Every transaction from here on had not started.
    pub xmax: u64,
    /// Transactions in progress between `xmin` and `xmax`.
    pub xip: HashSet<u64>,
}

impl PgSnapshot {
    /// Parses `xmin:xmax:xip,…`.
    pub fn parse(s: &str) -> Option<PgSnapshot> {
        let mut it = s.splitn(3, ':');
        let xmin = it.next()?.parse().ok()?;
        let xmax = it.next()?.parse().ok()?;
        let xip = it
            .next()
            .unwrap_or("")
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().ok())
            .collect::<Option<HashSet<u64>>>()?;
        Some(PgSnapshot { xmin, xmax, xip })
    }

    /// Whether a committed transaction is visible to this snapshot.
    pub fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.xip.contains(&xid))
    }

    /// A 32-bit xid from the stream as a full xid: the one nearest to this
    /// snapshot's `xmax` (PostgreSQL keeps every live xid within 2³¹ of the
    /// next one), so an xid just before or just after a wrap of the 32-bit
    /// counter gets the right epoch.
    pub fn widen(&self, xid: u32) -> u64 {
        let epoch = self.xmax >> 32;
        let at = |e: u64| (e << 32) | u64::from(xid);
        [epoch.checked_sub(1), Some(epoch), Some(epoch + 1)]
            .into_iter()
            .flatten()
            .map(at)
            .min_by_key(|full| full.abs_diff(self.xmax))
            .unwrap_or_else(|| at(epoch))
    }
}

/// How far a table's copy has got.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Nothing copied.
    NotStarted,
    /// Copied up to and including this key.
    Copying(Key),
    /// Fully copied: every change is delivered as it streams.
    Done,
}

/// The rows a read covers.
#[derive(Debug, Clone, PartialEq)]
enum Extent {
    /// Keys in `(lower, upper]`; an open bound is `None`.
    Range {
        lower: Option<Key>,
        upper: Option<Key>,
    },
    /// Exactly the requested keys (by source key).
    Keys(HashSet<String>),
}

/// A read waiting for its watermark.
#[derive(Debug)]
pub struct Read<R> {
    table: usize,
    id: String,
    snapshot: PgSnapshot,
    extent: Extent,
    /// Chunks: the table's phase and durable progress once delivered.
    end: Option<(Phase, TableSnapshot)>,
    rows: Vec<Option<R>>,
    /// Source key → position in `rows` (Fx: the keys come from the
    /// partner's own database, not from an adversary).
    index: FxHashMap<String, usize>,
}

impl<R> Read<R> {
    /// A chunk of table `table`: the rows after `lower` in key order, read
    /// in `snapshot`, each with its key and source key. `full`: the chunk
    /// hit its row limit, so the table goes on after its last row
    /// (`progress` is then the durable position of that row).
    pub fn chunk(
        table: usize,
        id: String,
        snapshot: PgSnapshot,
        lower: Option<Key>,
        rows: Vec<(Key, String, R)>,
        progress: Option<TableSnapshot>,
    ) -> Read<R> {
        let (upper, end) = match progress {
            Some(p) => {
                let last = rows.last().map(|(k, _, _)| k.clone());
                match last {
                    Some(last) => (Some(last.clone()), (Phase::Copying(last), p)),
                    None => (None, (Phase::Done, TableSnapshot::Done)),
                }
            }
            None => (None, (Phase::Done, TableSnapshot::Done)),
        };
        let mut read = Read {
            table,
            id,
            snapshot,
            extent: Extent::Range { lower, upper },
            end: Some(end),
            rows: Vec::with_capacity(rows.len()),
            index: FxHashMap::with_capacity_and_hasher(rows.len(), Default::default()),
        };
        for (_, sk, r) in rows {
            read.index.insert(sk, read.rows.len());
            read.rows.push(Some(r));
        }
        read
    }

    /// Rows of table `table` re-read by key in `snapshot`: `keys` are the
    /// source keys asked for, `rows` those found.
    pub fn keys(
        table: usize,
        id: String,
        snapshot: PgSnapshot,
        keys: HashSet<String>,
        rows: Vec<(String, R)>,
    ) -> Read<R> {
        let mut read = Read {
            table,
            id,
            snapshot,
            extent: Extent::Keys(keys),
            end: None,
            rows: Vec::with_capacity(rows.len()),
            index: FxHashMap::with_capacity_and_hasher(rows.len(), Default::default()),
        };
        for (sk, r) in rows {
            read.index.insert(sk, read.rows.len());
            read.rows.push(Some(r));
        }
        read
    }

    fn holds(&self, key: &[Value], source_key: &str) -> bool {
        match &self.extent {
            Extent::Range { lower, upper } => {
                lower.as_ref().is_none_or(|l| cmp_keys(key, l).is_gt())
                    && upper.as_ref().is_none_or(|u| cmp_keys(key, u).is_le())
            }
            Extent::Keys(keys) => keys.contains(source_key),
        }
    }

    fn drop_row(&mut self, source_key: &str) {
        if let Some(&i) = self.index.get(source_key) {
            self.rows[i] = None;
        }
    }

    fn is_chunk(&self) -> bool {
        self.end.is_some()
    }
}

/// What to do with a change from the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver it now.
    Deliver,
    /// A delete of a key the copy has not reached: deliver it without its
    /// old row, so it reaches only a key the API already holds.
    DeleteIfKnown,
    /// A pending read or a later chunk delivers this key's current version.
    Skip,
}

/// A change from the stream, as the machine sees it.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    /// The table (index into the session's tables).
    pub table: usize,
    /// The row's key values.
    pub key: &'a [Value],
    /// The row's source key (its identity in the state store).
    pub source_key: &'a str,
    /// The 32-bit id of the change's transaction.
    pub xid: Option<u32>,
    /// A delete (or the old key of a re-keyed row), else an insert/update.
    pub delete: bool,
}

/// A read whose watermark arrived: deliver `rows`; a chunk also moves its
/// table to `phase`, durable as `progress`.
#[derive(Debug)]
pub struct Emit<R> {
    /// The table.
    pub table: usize,
    /// Rows still current, in read order.
    pub rows: Vec<R>,
    /// Chunks: the table's new phase and its durable form.
    pub end: Option<(Phase, TableSnapshot)>,
}

/// A row waiting to be re-read.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The table.
    pub table: usize,
    /// Key values.
    pub key: Key,
    /// Source key.
    pub source_key: String,
}

/// The watermark snapshot's state (see the module docs).
#[derive(Debug)]
pub struct Watermarks<R> {
    phases: Vec<Phase>,
    pending: Vec<Read<R>>,
    requests: Vec<Request>,
    requested: HashSet<(usize, String)>,
    skipped: BTreeSet<u64>,
    reference: Option<PgSnapshot>,
    hold: Option<u64>,
}

impl<R> Watermarks<R> {
    /// A machine for tables in these phases (in copy order).
    pub fn new(phases: Vec<Phase>) -> Watermarks<R> {
        Watermarks {
            phases,
            pending: Vec::new(),
            requests: Vec::new(),
            requested: HashSet::new(),
            skipped: BTreeSet::new(),
            reference: None,
            hold: None,
        }
    }

    /// A table's phase.
    pub fn phase(&self, table: usize) -> &Phase {
        &self.phases[table]
    }

    /// Starts table `table`'s copy over (`snapshot --force`, `resync`): its
    /// pending chunk is abandoned (its rows are read again).
    pub fn restart(&mut self, table: usize) {
        self.phases[table] = Phase::NotStarted;
        self.pending.retain(|r| !(r.table == table && r.is_chunk()));
    }

    /// The newest snapshot seen: its epoch widens the stream's 32-bit ids.
    pub fn set_reference(&mut self, snapshot: PgSnapshot) {
        self.reference = Some(snapshot);
    }

    fn widen(&self, xid: u32) -> u64 {
        self.reference
            .as_ref()
            .map_or(u64::from(xid), |s| s.widen(xid))
    }

    /// The table whose next chunk should be read, if no chunk is pending
    /// (the first table, in copy order, not yet done).
    pub fn next_chunk(&self) -> Option<usize> {
        if self.pending.iter().any(Read::is_chunk) {
            return None;
        }
        self.phases.iter().position(|p| *p != Phase::Done)
    }

    /// Whether every table is copied and no chunk is pending.
    pub fn copied(&self) -> bool {
        self.phases.iter().all(|p| *p == Phase::Done) && !self.pending.iter().any(Read::is_chunk)
    }

    /// Whether every table is copied and nothing is pending or waiting to
    /// be re-read (a `snapshot` command may end).
    pub fn settled(&self) -> bool {
        self.copied() && self.requests.is_empty() && self.pending.is_empty()
    }

    /// Whether a read may be taken in `snapshot`: it sees every transaction
    /// whose changes were skipped for a later read.
    pub fn may_read(&self, snapshot: &PgSnapshot) -> bool {
        self.skipped.iter().all(|&x| snapshot.sees(x))
    }

    /// A read was taken (after [`Watermarks::may_read`]) and its watermark
    /// emitted.
    pub fn begin(&mut self, read: Read<R>) {
        // Whatever is below xmin is visible to every later snapshot.
        self.skipped = self.skipped.split_off(&read.snapshot.xmin);
        self.reference = Some(read.snapshot.clone());
        self.pending.push(read);
    }

    /// Where a key of a table stands relative to the copy.
    fn ahead(&self, table: usize, key: &[Value], source_key: &str) -> bool {
        match &self.phases[table] {
            Phase::Done => false,
            Phase::Copying(last) if cmp_keys(key, last).is_le() => false,
            _ => !self
                .pending
                .iter()
                .any(|r| r.table == table && r.is_chunk() && r.holds(key, source_key)),
        }
    }

    /// Decides what happens to a change from the stream.
    pub fn on_change(&mut self, c: Change<'_>) -> Verdict {
        let xid = c.xid.map(|x| self.widen(x));
        let mut covered = false;
        for r in self
            .pending
            .iter_mut()
            .filter(|r| r.table == c.table && r.holds(c.key, c.source_key))
        {
            let sees = c.xid.is_some_and(|x| r.snapshot.sees(r.snapshot.widen(x)));
            if sees {
                covered = true;
            } else {
                r.drop_row(c.source_key);
            }
        }
        let waiting = !self.requested.is_empty()
            && self
                .requested
                .contains(&(c.table, c.source_key.to_string()));
        let ahead = self.ahead(c.table, c.key, c.source_key);
        if waiting || ahead {
            if let Some(x) = xid {
                self.skipped.insert(x);
            }
        }
        match (c.delete, ahead) {
            (true, true) => Verdict::DeleteIfKnown,
            (true, false) => Verdict::Deliver,
            (false, _) if ahead || waiting || covered => Verdict::Skip,
            (false, _) => Verdict::Deliver,
        }
    }

    /// Instead of delivering an upsert (it came with [`Verdict::Deliver`])
    /// whose row must be re-read (a value the stream left out): remember
    /// it. `confirmed` is the position confirmable before the change's
    /// transaction; it is held until the re-read is delivered.
    pub fn request(&mut self, c: Change<'_>, confirmed: u64) {
        if let Some(x) = c.xid.map(|x| self.widen(x)) {
            self.skipped.insert(x);
        }
        if self.hold.is_none() {
            self.hold = Some(confirmed);
        }
        if self.requested.insert((c.table, c.source_key.to_string())) {
            self.requests.push(Request {
                table: c.table,
                key: c.key.to_vec(),
                source_key: c.source_key.to_string(),
            });
        }
    }

    /// Rows waiting to be re-read.
    pub fn requests(&self) -> &[Request] {
        &self.requests
    }

    /// The requests were read (in a snapshot [`Watermarks::may_read`]
    /// allowed) into `reads`, one per table.
    pub fn begin_requests(&mut self, reads: Vec<Read<R>>) {
        self.requests.clear();
        self.requested.clear();
        for r in reads {
            self.begin(r);
        }
    }

    /// A TRUNCATE of `table` in transaction `xid`: reads taken before it
    /// lose their rows; later chunks and re-reads must see it.
    pub fn on_truncate(&mut self, table: usize, xid: Option<u32>) {
        for r in self.pending.iter_mut().filter(|r| r.table == table) {
            let sees = xid.is_some_and(|x| r.snapshot.sees(r.snapshot.widen(x)));
            if !sees {
                r.rows.iter_mut().for_each(|row| *row = None);
            }
        }
        let waiting = self.requests.iter().any(|q| q.table == table);
        if self.phases[table] != Phase::Done || waiting {
            if let Some(x) = xid.map(|x| self.widen(x)) {
                self.skipped.insert(x);
            }
        }
    }

    /// A watermark message arrived: the reads it ends, delivered.
    pub fn on_watermark(&mut self, id: &str) -> Vec<Emit<R>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].id != id {
                i += 1;
                continue;
            }
            let r = self.pending.remove(i);
            if let Some((phase, _)) = &r.end {
                self.phases[r.table] = phase.clone();
            }
            // Sized once: a chunk's rows are megabytes, and growing them
            // by doubling (realloc, copy, fresh pages) was ~2 % of an
            // initial sync's CPU.
            let mut rows = Vec::with_capacity(r.rows.len());
            rows.extend(r.rows.into_iter().flatten());
            out.push(Emit {
                table: r.table,
                rows,
                end: r.end,
            });
        }
        if self.requests.is_empty() && !self.pending.iter().any(|r| !r.is_chunk()) {
            self.hold = None;
        }
        out
    }

    /// The position that may be confirmed when the stream is at `lsn`.
    pub fn confirmable(&self, lsn: u64) -> u64 {
        self.hold.map_or(lsn, |h| h.min(lsn))
    }

    /// Forgets everything but the phases (a new session replays the stream
    /// from the durable position).
    pub fn reset(&mut self, phases: Vec<Phase>) {
        *self = Watermarks::new(phases);
    }
}

#[cfg(test)]
mod tests;
