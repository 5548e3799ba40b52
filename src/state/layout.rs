//! Where each key's state lives in the sled `keys` tree, and how a group
//! of key writes becomes page writes.
//!
//! A key's form depends on its source key only: a canonical unsigned
//! integer lives in an integer page ([`super::pages`]), anything else in a
//! range page ([`super::ranges`]). Keys never move between forms, so no
//! write order between forms matters for crash safety.
//!
//! [`Dirs`] is the in-memory directory of range pages: per mapping, the
//! sorted starts of its pages (a key code, ~20 bytes, per page of ~40
//! keys; read once per mapping by a scan). Readers hold it shared while they look a page up and read it;
//! a split is published under it exclusively (upper pieces lowest
//! first, each but the highest carrying the old page's keys above its
//! range, then the
//! lower page, then the new starts; see [`split_writes`]), so a reader
//! never routes a key to a page that no longer holds it.
//!
//! The first layout of the store (one entry per non-integer key and per
//! key with a last-sent record, `[prefix][source key UTF-8]` →
//! `[status][fingerprint][last-sent JSON]`) is converted once, when a
//! store without a layout marker is opened ([`migrate`]).

use rustc_hash::FxHashMap;
use sled::IVec;

use super::keycode;
use super::pages::{self, Group, Page};
use super::presence::Presence;
use super::ranges::{self, Change};
use super::{decode_fixed, KeyState, KeyStatus, StateError, FIXED_BYTES};
use crate::model::record::Record;
use crate::model::schema::schema;

/// Bytes of a mapping prefix (`[type][mapping hash]`).
pub const PREFIX: usize = 9;

pub(super) fn err(op: &'static str) -> impl Fn(sled::Error) -> StateError {
    move |e| StateError {
        op,
        detail: e.to_string(),
    }
}

/// The entries of `iter` (an iterator over `tree`), read so that sled's
/// page cache stays bounded while a scan goes through many nodes.
///
/// sled 0.34 evaluates its LRU per shard (of 256) only once 64 accesses
/// of that shard have queued, and an iterator counts one access per node
/// it moves to: a scan of a few thousand nodes (~16 pages each) queues
/// too few accesses per shard to evict any of them, and every node read
/// stays in memory until later reads fill the queues. Reading each
/// entry's key again counts its node (and the nodes above it) once per
/// entry, so the queues fill and evict as the scan goes. Measured on the
/// e2e bench's partner state (a mapping's 154 386 range pages, 181 MB,
/// read at a restart's first lookup): peak RSS of the scan 173 → 34 MiB,
/// its time +5–10 %.
pub(super) fn bounded<'t>(
    tree: &'t sled::Tree,
    iter: sled::Iter,
) -> impl Iterator<Item = sled::Result<(IVec, IVec)>> + 't {
    iter.inspect(move |item| {
        if let Ok((key, _)) = item {
            // Only the access matters: its answer is the entry just read
            // (or a newer write of it, or nothing if it was removed since).
            let _ = tree.get(key);
        }
    })
}

/// A stored page that cannot be read: an error naming the damage
/// (treating it as empty would silently forget its keys' states).
pub(super) fn damaged() -> StateError {
    StateError {
        op: "read",
        detail: "a key page in the state store is damaged; stop the daemon, move state.dir \
                 aside and run `cobi-sync snapshot` to rebuild it (records are re-sent, \
                 the API upserts them)"
            .into(),
    }
}

fn decode_page(v: &[u8]) -> Result<Page, StateError> {
    Page::decode(v).ok_or_else(damaged)
}

/// The range-page starts of each mapping read so far, sorted, and which
/// keys its pages may hold ([`Presence`]).
#[derive(Default)]
pub struct Dirs {
    map: FxHashMap<Vec<u8>, Starts>,
    /// Only for mappings read by [`Dirs::load`] (without one, every key
    /// may be held).
    presence: FxHashMap<Vec<u8>, Presence>,
}

/// One mapping's page starts, sorted, with the first 8 bytes of each as a
/// number beside them: a lookup's binary search runs over those numbers
/// (one cache line holds 8) and compares whole starts only among the few
/// sharing its first 8 bytes — a directory of ~100 000 pages was a tenth
/// of a random-key burst's CPU when every step followed a pointer. The
/// starts themselves are one buffer with their end offsets (~33 bytes per
/// page with a UUID start, against ~56 as a boxed slice each: the
/// directory of a 5 M-record store is ~500 000 pages).
///
/// Every [`BLOCK`]th head is kept again in `tops` (~1 600 numbers for
/// 100 000 pages, a few KiB that stay in the CPU cache): a lookup searches
/// those, then one block of heads, touching ~3 cache lines of the
/// directory instead of one per step of a binary search over all of it.
#[derive(Default)]
struct Starts {
    heads: Vec<u64>,
    tops: Vec<u64>,
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

/// Heads per entry of [`Starts::tops`].
const BLOCK: usize = 64;

/// Makes room for `extra` more items, growing by an eighth at least:
/// amortised like a `Vec`'s own growth, without its up to 2x slack.
fn room<T>(v: &mut Vec<T>, extra: usize) {
    if v.capacity() - v.len() < extra {
        v.reserve_exact(extra.max(v.len() / 8));
    }
}

/// The first 8 bytes of `b` as a big-endian number, zero-padded: `a <= b`
/// implies `head(a) <= head(b)`.
fn head(b: &[u8]) -> u64 {
    let mut h = [0u8; 8];
    let n = b.len().min(8);
    h[..n].copy_from_slice(&b[..n]);
    u64::from_be_bytes(h)
}

impl Starts {
    /// Appends a start (callers append in order).
    fn push(&mut self, start: &[u8]) {
        if self.heads.len() % BLOCK == 0 {
            self.tops.push(head(start));
        }
        self.heads.push(head(start));
        self.bytes.extend_from_slice(start);
        self.ends.push(self.bytes.len());
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    /// The `i`th start.
    fn get(&self, i: usize) -> Option<&[u8]> {
        let end = *self.ends.get(i)?;
        let begin = i.checked_sub(1).map_or(0, |j| self.ends[j]);
        Some(&self.bytes[begin..end])
    }

    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }

    /// How many starts are `<= code`.
    fn count_at_or_below(&self, code: &[u8]) -> usize {
        let h = head(code);
        // The first head >= h: after the last block that starts below h,
        // within that block or at the next one's start.
        let j = self.tops.partition_point(|&t| t < h);
        let lo = match j.checked_sub(1) {
            None => 0,
            Some(b) => {
                let base = b * BLOCK;
                let end = (base + BLOCK).min(self.heads.len());
                base + self.heads[base..end].partition_point(|&x| x < h)
            }
        };
        // The heads equal to h (few, but text keys may share many): a
        // galloping search from `lo`.
        let rest = &self.heads[lo..];
        let mut bound = 1;
        while bound < rest.len() && rest[bound] == h {
            bound *= 2;
        }
        let hi = lo + rest[..bound.min(rest.len())].partition_point(|&x| x == h);
        let (mut a, mut b) = (lo, hi);
        // Binary search among the starts sharing the head.
        while a < b {
            let mid = a + (b - a) / 2;
            if self.get(mid).is_some_and(|s| s <= code) {
                a = mid + 1;
            } else {
                b = mid;
            }
        }
        a
    }

    /// Whether `start` is one of the starts.
    fn contains(&self, start: &[u8]) -> bool {
        let i = self.count_at_or_below(start);
        i > 0 && self.get(i - 1) == Some(start)
    }

    /// Merges sorted, distinct starts that are not yet in the directory
    /// into it, in place, from the back: the starts below the first new one
    /// do not move (a snapshot's new pages come last: nothing moves), and
    /// no second copy of the directory is alive (but for one vector's, for
    /// the moment it grows, every eighth of its size or so; the copy a
    /// merge into fresh vectors made was, at 5 M records, ~15 MB allocated,
    /// faulted in and freed per apply that split a page).
    fn merge(&mut self, new: &[Vec<u8>]) {
        let (old_len, old_bytes) = (self.len(), self.bytes.len());
        let added: usize = new.iter().map(Vec::len).sum();
        room(&mut self.heads, new.len());
        room(&mut self.ends, new.len());
        room(&mut self.bytes, added);
        self.heads.resize(old_len + new.len(), 0);
        self.ends.resize(old_len + new.len(), 0);
        self.bytes.resize(old_bytes + added, 0);
        // `i` old and `j` new starts are left to place; everything from
        // `w` (starts) and `end` (bytes) on is placed. Writes land at or
        // above the old start being read, never below it.
        let (mut i, mut j, mut w, mut end) =
            (old_len, new.len(), old_len + new.len(), old_bytes + added);
        while j > 0 {
            let old_begin = if i >= 2 { self.ends[i - 2] } else { 0 };
            let take_new =
                i == 0 || new[j - 1].as_slice() > &self.bytes[old_begin..self.ends[i - 1]];
            w -= 1;
            if take_new {
                j -= 1;
                let s = &new[j];
                self.bytes[end - s.len()..end].copy_from_slice(s);
                self.heads[w] = head(s);
                self.ends[w] = end;
                end -= s.len();
            } else {
                i -= 1;
                let old_end = self.ends[i];
                self.bytes
                    .copy_within(old_begin..old_end, end - (old_end - old_begin));
                self.heads[w] = self.heads[i];
                self.ends[w] = end;
                end -= old_end - old_begin;
            }
        }
        self.tops = self.heads.iter().step_by(BLOCK).copied().collect();
    }
}

impl Dirs {
    /// Whether a mapping's directory is in memory.
    pub fn has(&self, prefix: &[u8]) -> bool {
        self.map.contains_key(prefix)
    }

    /// Reads a mapping's page starts from the tree, and the codes its
    /// pages hold into its [`Presence`] filter.
    pub fn load(&mut self, tree: &sled::Tree, prefix: &[u8]) -> Result<(), StateError> {
        let mut mark = prefix.to_vec();
        mark.push(ranges::MARK);
        let mut starts = Starts::default();
        let mut presence = Presence::default();
        for item in bounded(tree, tree.scan_prefix(&mark)) {
            let (k, v) = item.map_err(err("scan"))?;
            // The tree returns them in order.
            starts.push(ranges::start_of_key(prefix.len(), &k).ok_or_else(damaged)?);
            // Every slot, in range or not: a filter may hold more.
            for slot in ranges::slots(&v).ok_or_else(damaged)? {
                presence.add_growing(slot.code);
            }
        }
        self.map.insert(prefix.to_vec(), starts);
        self.presence.insert(prefix.to_vec(), presence);
        Ok(())
    }

    /// Whether a mapping's range pages may hold the key with this code
    /// (`false`: no page does, nothing to read).
    pub fn may_hold(&self, prefix: &[u8], code: &[u8]) -> bool {
        self.presence.get(prefix).is_none_or(|p| p.may_hold(code))
    }

    /// Notes that a key with this code is being given a state (before its
    /// page is written).
    fn note(&self, prefix: &[u8], code: &[u8]) {
        if let Some(p) = self.presence.get(prefix) {
            p.add(code);
        }
    }

    /// Whether a presence filter is full (then [`Dirs::grow_full`]).
    pub fn any_full(&self) -> bool {
        self.presence.values().any(Presence::is_full)
    }

    /// Gives every full presence filter a new layer.
    pub fn grow_full(&mut self) {
        for p in self.presence.values_mut().filter(|p| p.is_full()) {
            p.grow();
        }
    }

    /// The page whose range holds `code`, as `(start, next page's start)`,
    /// if the mapping has range pages.
    pub fn page_for(&self, prefix: &[u8], code: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
        let starts = self.map.get(prefix)?;
        // The first start above `code`; the page is the one before it.
        let i = starts.count_at_or_below(code);
        let start = starts.get(i.checked_sub(1)?)?;
        Some((start, starts.get(i)))
    }

    /// The position in the mapping's directory of the page whose range
    /// holds `code` (`None`: no range page yet).
    pub fn page_index(&self, prefix: &[u8], code: &[u8]) -> Option<usize> {
        self.map.get(prefix)?.count_at_or_below(code).checked_sub(1)
    }

    /// Adds page starts to a mapping's directory (one merge per call).
    fn add(&mut self, prefix: &[u8], mut new: Vec<Vec<u8>>) {
        let starts = self.map.entry(prefix.to_vec()).or_default();
        new.sort_unstable();
        new.dedup();
        new.retain(|n| !starts.contains(n));
        if new.is_empty() {
            return;
        }
        starts.merge(&new);
    }

    /// Forgets every directory (after a failed write: reread from disk).
    pub fn clear(&mut self) {
        self.map.clear();
        self.presence.clear();
    }

    /// Pages in a mapping's directory.
    #[cfg(test)]
    pub fn pages(&self, prefix: &[u8]) -> usize {
        self.map.get(prefix).map_or(0, Starts::len)
    }
}

/// Where a key lives.
enum Place<'m> {
    Int {
        key: Vec<u8>,
        slot: u8,
    },
    /// The key's range page (`None`: the mapping has no range page yet),
    /// and its code.
    Range {
        page: Option<&'m RangeOf>,
        code: Vec<u8>,
    },
}

/// A range page located in the directory.
pub struct RangeOf {
    prefix: Vec<u8>,
    start: Vec<u8>,
    next: Option<Vec<u8>>,
    /// Its sled key.
    key: Vec<u8>,
}

/// Locates keys, remembering the last range page found: keys read in key
/// order (a snapshot's) mostly fall in the page of the key before.
#[derive(Default)]
struct Locator {
    last: Option<RangeOf>,
}

impl Locator {
    /// Where `source_key` lives; `code` is its key code if the caller
    /// has it already (computed here otherwise).
    fn place(
        &mut self,
        dirs: &Dirs,
        prefix: &[u8],
        source_key: &str,
        code: Option<Vec<u8>>,
    ) -> Place<'_> {
        if let Some((page, slot)) = pages::locate(source_key) {
            return Place::Int {
                key: pages::page_key(prefix, page),
                slot,
            };
        }
        let code = code.unwrap_or_else(|| keycode::code(source_key));
        Place::Range {
            page: self.range(dirs, prefix, &code),
            code,
        }
    }

    /// The range page of the key with this code, if the mapping has one.
    fn range(&mut self, dirs: &Dirs, prefix: &[u8], code: &[u8]) -> Option<&RangeOf> {
        let hit = self.last.as_ref().is_some_and(|l| {
            l.prefix == prefix && ranges::in_range(code, &l.start, l.next.as_deref())
        });
        if !hit {
            self.last = dirs.page_for(prefix, code).map(|(start, next)| RangeOf {
                prefix: prefix.to_vec(),
                start: start.to_vec(),
                next: next.map(<[u8]>::to_vec),
                key: ranges::page_key(prefix, start),
            });
        }
        self.last.as_ref()
    }
}

/// Reads key states; pages read are kept for the call.
pub struct Reader<'a> {
    tree: &'a sled::Tree,
    images: &'a sled::Tree,
    dirs: &'a Dirs,
    locator: Locator,
    ints: FxHashMap<Vec<u8>, Option<Page>>,
    groups: FxHashMap<Vec<u8>, Option<Group>>,
    ranges: FxHashMap<Vec<u8>, Option<IVec>>,
    /// Range pages read from the tree.
    range_reads: u64,
}

/// Reads and decodes an image group (`None`: not stored).
fn read_group(images: &sled::Tree, key: &[u8]) -> Result<Option<Group>, StateError> {
    match images.get(key).map_err(err("read"))? {
        Some(v) => Ok(Some(Group::decode(&v).ok_or_else(damaged)?)),
        None => Ok(None),
    }
}

/// The stored image of `slot` of the integer page at `key` (its own entry
/// if the page is `per_slot`, else in its group, read once per reader).
fn int_image(
    images: &sled::Tree,
    groups: &mut FxHashMap<Vec<u8>, Option<Group>>,
    key: &[u8],
    per_slot: bool,
    slot: u8,
) -> Result<Option<bytes::Bytes>, StateError> {
    if per_slot {
        let image = images
            .get(pages::image_key(key, slot))
            .map_err(err("read"))?;
        if let Some(i) = image {
            return Ok(Some(bytes::Bytes::copy_from_slice(&i)));
        }
        // A concurrent apply may have converted the page since it was
        // read: it writes the groups before removing per-slot entries.
    }
    let gk = pages::group_key(key, slot);
    let group = match groups.get(&gk) {
        Some(g) => g,
        None => {
            let g = read_group(images, &gk)?;
            groups.entry(gk).or_insert(g)
        }
    };
    Ok(group.as_ref().and_then(|g| g.get(slot).cloned()))
}

impl<'a> Reader<'a> {
    /// A reader over `tree` and its `images` tree (every prefix read must
    /// be loaded in `dirs`).
    pub fn new(tree: &'a sled::Tree, images: &'a sled::Tree, dirs: &'a Dirs) -> Self {
        Reader {
            tree,
            images,
            dirs,
            locator: Locator::default(),
            ints: FxHashMap::default(),
            groups: FxHashMap::default(),
            ranges: FxHashMap::default(),
            range_reads: 0,
        }
    }

    /// Range pages read from the tree so far.
    pub fn range_reads(&self) -> u64 {
        self.range_reads
    }

    /// The state of `source_key` under a mapping prefix; `code` is its
    /// key code ([`keycode::code`]) if the caller has it.
    pub fn get(
        &mut self,
        prefix: &[u8],
        source_key: &str,
        code: Option<Vec<u8>>,
    ) -> Result<Option<KeyState>, StateError> {
        match self.locator.place(self.dirs, prefix, source_key, code) {
            Place::Int { key, slot } => {
                let page = match self.ints.entry(key.clone()) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let p = match self.tree.get(e.key()).map_err(err("read"))? {
                            Some(v) => Some(decode_page(&v)?),
                            None => None,
                        };
                        e.insert(p)
                    }
                };
                let Some(page) = page.as_ref() else {
                    return Ok(None);
                };
                let mut state = page.get(slot);
                if let Some(s) = state.as_mut().filter(|_| page.has_stored_image(slot)) {
                    // Written before the page that marks it (see
                    // Writer::write); absent only if a concurrent apply
                    // removed it after this page was read (the key is
                    // then seen as it is after that apply, without one).
                    s.delete_image = int_image(
                        self.images,
                        &mut self.groups,
                        &key,
                        page.is_per_slot(),
                        slot,
                    )?;
                }
                Ok(state)
            }
            Place::Range { page: None, .. } => Ok(None),
            Place::Range { code, .. } if !self.dirs.may_hold(prefix, &code) => Ok(None),
            Place::Range {
                page: Some(r),
                code,
            } => {
                let bytes = match self.ranges.get(&r.key) {
                    Some(v) => v,
                    None => {
                        let v = self.tree.get(&r.key).map_err(err("read"))?;
                        self.range_reads += 1;
                        self.ranges.entry(r.key.clone()).or_insert(v)
                    }
                };
                match bytes {
                    None => Ok(None),
                    Some(p) => Ok(ranges::find(p, &code)
                        .ok_or_else(damaged)?
                        .map(|s| s.state())),
                }
            }
        }
    }
}

/// A group of key writes, turned into page writes by [`Writer::write`].
pub struct Writer<'a> {
    tree: &'a sled::Tree,
    images: &'a sled::Tree,
    locator: Locator,
    ints: FxHashMap<Vec<u8>, (Page, bool)>,
    /// Integer keys' delete images: image group key → `(slot, image)`
    /// edits in order (`None`: remove it).
    groups: FxHashMap<Vec<u8>, Vec<(u8, Option<bytes::Bytes>)>>,
    /// Per-slot image entries of version 3 pages moved into groups: removed
    /// once the pages are rewritten.
    moved: Vec<Vec<u8>>,
    /// Page key → the page's changes.
    ranges: FxHashMap<Vec<u8>, PageChanges>,
}

/// The writes to one range page: `(mapping prefix, page start, changes)`.
type PageChanges = (Vec<u8>, Vec<u8>, Vec<Change>);

/// Pages split by a write: `(prefix, page writes)` in the order
/// [`split_writes`] gives.
type Splits = Vec<(Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>)>;

impl<'a> Writer<'a> {
    /// A writer over `tree` and its `images` tree.
    pub fn new(tree: &'a sled::Tree, images: &'a sled::Tree) -> Self {
        Writer {
            tree,
            images,
            locator: Locator::default(),
            ints: FxHashMap::default(),
            groups: FxHashMap::default(),
            moved: Vec::new(),
            ranges: FxHashMap::default(),
        }
    }

    /// Sets (`Some`) or removes (`None`) a key's state. `dirs` must hold
    /// the prefix.
    pub fn set(
        &mut self,
        dirs: &Dirs,
        prefix: &[u8],
        source_key: &str,
        state: Option<&KeyState>,
    ) -> Result<(), StateError> {
        let Some((page, slot)) = pages::locate(source_key) else {
            self.set_range(dirs, prefix, keycode::code(source_key), state.cloned());
            return Ok(());
        };
        let key = pages::page_key(prefix, page);
        let page = match self.ints.entry(key.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let mut p = match self.tree.get(e.key()).map_err(err("read"))? {
                    Some(v) => decode_page(&v)?,
                    None => Page::default(),
                };
                // Earlier formats move their images into groups
                // now that the page is rewritten: inline ones
                // (version 2), per-slot entries (version 3).
                let mut moved = p.take_inline_images();
                let mut changed = !moved.is_empty();
                if p.is_per_slot() {
                    let mut missing = Vec::new();
                    for slot in p.imaged_slots() {
                        let ik = pages::image_key(e.key(), slot);
                        match self.images.get(&ik).map_err(err("read"))? {
                            Some(i) => moved.push((slot, bytes::Bytes::copy_from_slice(&i))),
                            None => missing.push(slot),
                        }
                        self.moved.push(ik);
                    }
                    p.regroup(&missing);
                    changed = true;
                }
                for (slot, image) in moved {
                    self.groups
                        .entry(pages::group_key(e.key(), slot))
                        .or_default()
                        .push((slot, Some(image)));
                }
                e.insert((p, changed))
            }
        };
        let had_image = page.0.has_stored_image(slot);
        let image = state.and_then(|s| s.delete_image.clone());
        match state {
            Some(s) => {
                page.0.set(slot, s);
                page.1 = true;
            }
            None => page.1 |= page.0.clear(slot),
        }
        if image.is_some() || had_image {
            self.groups
                .entry(pages::group_key(&key, slot))
                .or_default()
                .push((slot, image));
        }
        Ok(())
    }

    /// Sets (`Some`) or removes (`None`) the state of the range key with
    /// this code. `dirs` must hold the prefix.
    pub fn set_range(
        &mut self,
        dirs: &Dirs,
        prefix: &[u8],
        code: Vec<u8>,
        state: Option<KeyState>,
    ) {
        if state.is_some() {
            dirs.note(prefix, &code);
        }
        let group = match self.locator.range(dirs, prefix, &code) {
            // Most keys of a group share a few pages: no copies then.
            Some(r) if self.ranges.contains_key(&r.key) => {
                self.ranges.get_mut(&r.key).expect("present")
            }
            Some(r) => self
                .ranges
                .entry(r.key.clone())
                .or_insert_with(|| (prefix.to_vec(), r.start.clone(), Vec::new())),
            None => self
                .ranges
                .entry(ranges::page_key(prefix, &[]))
                .or_insert_with(|| (prefix.to_vec(), Vec::new(), Vec::new())),
        };
        group.2.push((code, state));
    }

    /// Writes every changed page: integer keys' image groups with their
    /// new images first, then range pages that keep their size, split ones
    /// (under `dirs` exclusively, see the module doc), integer pages, and
    /// last the groups that lose images. sled recovers a prefix of its log,
    /// so a page never marks an image that is not stored; a crash can only
    /// leave an image no page marks (never read, replaced when its key gets
    /// one again). An empty integer page is removed; range pages never are.
    /// Returns how many range pages were written (split pieces count one
    /// each).
    pub fn write(self, dirs: &parking_lot::RwLock<Dirs>) -> Result<u64, StateError> {
        let Writer {
            tree,
            images,
            ints,
            ranges,
            groups,
            moved,
            ..
        } = self;
        let mut groups: Vec<_> = groups.into_iter().collect();
        groups.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        // Groups that lose an image after the pages: (key, final group).
        let mut shrinking: Vec<(Vec<u8>, Group)> = Vec::new();
        for (k, edits) in groups {
            let mut now = read_group(images, &k)?.unwrap_or_default();
            let mut last: Vec<(u8, Option<bytes::Bytes>)> = Vec::with_capacity(edits.len());
            for (slot, image) in edits {
                match last.iter_mut().find(|(s, _)| *s == slot) {
                    Some(e) => e.1 = image,
                    None => last.push((slot, image)),
                }
            }
            // Now: every new image, and every old one still marked.
            let mut grows = false;
            for (slot, image) in &last {
                if image.is_some() {
                    grows |= now.set(*slot, image.clone());
                }
            }
            if grows {
                images
                    .insert(k.as_slice(), now.encode())
                    .map_err(err("write"))?;
            }
            let mut after = now;
            let mut shrinks = false;
            for (slot, image) in last {
                if image.is_none() {
                    shrinks |= after.set(slot, None);
                }
            }
            if shrinks {
                shrinking.push((k, after));
            }
        }
        let mut changed: Vec<_> = ranges.into_iter().collect();
        changed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut splits: Splits = Vec::new();
        let mut range_writes = 0u64;
        let mut created: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        {
            let d = dirs.read();
            for (key, (prefix, start, changes)) in changed {
                let page = d
                    .page_for(&prefix, &start)
                    .filter(|p| p.0 == start.as_slice());
                if page.is_none() {
                    created.push((prefix.clone(), start.clone()));
                }
                let end = page.and_then(|p| p.1);
                let old = tree.get(&key).map_err(err("read"))?;
                let new = ranges::rebuild(
                    old.as_deref().unwrap_or(&ranges::empty()),
                    &changes,
                    &start,
                    end,
                )
                .ok_or_else(damaged)?;
                if new.len() <= ranges::MAX_BYTES {
                    tree.insert(key, new).map_err(err("write"))?;
                    range_writes += 1;
                } else {
                    let pieces = ranges::split(new, &start).ok_or_else(damaged)?;
                    let empty = ranges::empty();
                    let old = old.as_deref().unwrap_or(&empty);
                    let writes = split_writes(old, end, pieces).ok_or_else(damaged)?;
                    splits.push((prefix, writes));
                }
            }
        }
        if !splits.is_empty() || !created.is_empty() {
            let mut d = dirs.write();
            let mut starts: FxHashMap<Vec<u8>, Vec<Vec<u8>>> = FxHashMap::default();
            for (prefix, start) in created {
                starts.entry(prefix).or_default().push(start);
            }
            for (prefix, pieces) in splits {
                for (start, bytes) in &pieces {
                    tree.insert(ranges::page_key(&prefix, start), bytes.as_slice())
                        .map_err(err("write"))?;
                }
                range_writes += pieces.len() as u64;
                starts
                    .entry(prefix)
                    .or_default()
                    .extend(pieces.into_iter().map(|p| p.0));
            }
            for (prefix, new) in starts {
                d.add(&prefix, new);
            }
        }
        let mut ints: Vec<_> = ints
            .into_iter()
            .filter(|(_, (_, changed))| *changed)
            .collect();
        // In key order: sled appends to the same nodes.
        ints.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (k, (page, _)) in ints {
            if page.is_empty() {
                tree.remove(k).map_err(err("write"))?;
            } else {
                tree.insert(k, page.encode()).map_err(err("write"))?;
            }
        }
        for (k, group) in shrinking {
            if group.is_empty() {
                images.remove(k).map_err(err("write"))?;
            } else {
                images.insert(k, group.encode()).map_err(err("write"))?;
            }
        }
        for k in moved {
            images.remove(k).map_err(err("write"))?;
        }
        Ok(range_writes)
    }
}

/// The page writes of a split, in order: the upper pieces from the lowest
/// up, then the old start. `pieces` come from [`ranges::split`] (the first
/// at the old page's start), `old` is the page before the split and `end`
/// the start of the page after it.
///
/// A crash at any point leaves every key routed to a page that holds it.
/// Keys below the lowest upper piece written go to the old page, which
/// still holds its whole old range. Keys above the highest one written go
/// to it, so each upper piece also carries the old page's slots above its
/// own range (as they were before the split): leftovers out of its range,
/// never consulted once the pieces above are written, skipped by scans and
/// dropped by its next rewrite. A key new in this apply may be lost, which
/// is harmless: the checkpoint covering it is written after the pages.
///
/// Why this order: in key order, sled keeps a snapshot's pages (each
/// apply appends a few thousand keys to the last page, split into
/// hundreds of pieces) compactly; written from the highest down, the
/// initial sync's peak RSS rose from 76 to 105 MiB in the state-store
/// bench (91 → 129 MiB for the e2e partner sync). Written lowest first
/// without the carried slots, a crash after piece 1 lost the old keys of
/// piece 2's range (found by `flushed_writes_survive_sigkill` under load).
/// In a snapshot the old page's keys are all below the new ones, so the
/// pieces carry nothing.
pub(super) fn split_writes(
    old: &[u8],
    end: Option<&[u8]>,
    mut pieces: Vec<(Vec<u8>, Vec<u8>)>,
) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let old_slots = ranges::slots(old)?;
    for i in 1..pieces.len().saturating_sub(1) {
        let (piece, above) = pieces.split_at_mut(i + 1);
        let (next_start, bytes) = (&above[0].0, &mut piece[i].1);
        for s in &old_slots {
            if ranges::in_range(s.code, next_start, end) {
                bytes.extend_from_slice(s.bytes);
            }
        }
    }
    if !pieces.is_empty() {
        pieces.rotate_left(1);
    }
    Some(pieces)
}

/// Every key of a mapping with its status, page by page (see
/// [`super::StateStore::scan_keys`]). Range pages come first in the tree,
/// in order; each is read with the start of the next one, and only its
/// slots in that range count (a leftover of an interrupted split is
/// skipped).
pub fn scan(
    tree: &sled::Tree,
    prefix: &[u8],
    visit: &mut dyn FnMut(String, KeyStatus),
) -> Result<(), StateError> {
    let mut pending: Option<(IVec, IVec)> = None;
    let flush =
        |p: Option<(IVec, IVec)>, end: Option<&[u8]>, visit: &mut dyn FnMut(String, KeyStatus)| {
            if let Some((key, bytes)) = p {
                let start = ranges::start_of_key(prefix.len(), &key).ok_or_else(damaged)?;
                for s in ranges::slots(&bytes).ok_or_else(damaged)? {
                    if ranges::in_range(s.code, start, end) {
                        visit(keycode::decode(s.code).ok_or_else(damaged)?, s.status);
                    }
                }
            }
            Ok::<(), StateError>(())
        };
    for item in bounded(tree, tree.scan_prefix(prefix)) {
        let (k, v) = item.map_err(err("scan"))?;
        if let Some(start) = ranges::start_of_key(prefix.len(), &k) {
            let start = start.to_vec();
            let prev = pending.replace((k, v));
            flush(prev, Some(&start), visit)?;
        } else if let Some(page) = pages::page_of_key(prefix.len(), &k) {
            flush(pending.take(), None, visit)?;
            for (slot, status) in decode_page(&v)?.statuses() {
                visit(pages::source_key(page, slot), status);
            }
        }
    }
    flush(pending.take(), None, visit)
}

/// The marker of the current layout in the `meta` tree.
const LAYOUT_KEY: &[u8] = b"layout";
const LAYOUT: &[u8] = b"2";

/// Entries of the first layout converted per group.
const MIGRATE_GROUP: usize = 10_000;

/// Converts entries of the first layout into pages, once: each group of
/// entries is written to pages, then the entries are removed (a crash in
/// between converts the same entries again on the next open). A last-sent
/// record becomes a delete image; one that no longer parses is dropped
/// (its key then gets no soft delete built from the store). Returns how
/// many entries were converted.
pub fn migrate(
    tree: &sled::Tree,
    images: &sled::Tree,
    meta: &sled::Tree,
    dirs: &parking_lot::RwLock<Dirs>,
) -> Result<usize, StateError> {
    if meta.get(LAYOUT_KEY).map_err(err("read"))?.is_some() {
        return Ok(0);
    }
    let mut converted = 0;
    let mut after: Option<IVec> = None;
    loop {
        let range = match &after {
            None => tree.range::<&[u8], _>(..),
            Some(k) => tree.range((
                std::ops::Bound::Excluded(k.to_vec()),
                std::ops::Bound::Unbounded,
            )),
        };
        let mut group: Vec<(IVec, IVec)> = Vec::new();
        for item in bounded(tree, range) {
            let (k, v) = item.map_err(err("scan"))?;
            let is_page = match k.get(PREFIX) {
                Some(&ranges::MARK) => true,
                Some(&pages::PAGE_MARK) => k.len() == PREFIX + 9,
                _ => false,
            };
            if !is_page {
                group.push((k, v));
                if group.len() == MIGRATE_GROUP {
                    break;
                }
            }
        }
        let Some(last) = group.last().map(|(k, _)| k.clone()) else {
            break;
        };
        let mut w = Writer::new(tree, images);
        for (k, v) in &group {
            let (Some(prefix), Some(sk)) = (k.get(..PREFIX), super::StateKey::source_key_of(k))
            else {
                continue;
            };
            {
                let mut d = dirs.write();
                if !d.has(prefix) {
                    d.load(tree, prefix)?;
                }
            }
            let Some((status, fingerprint)) = decode_fixed(v) else {
                continue;
            };
            let delete_image = v
                .get(FIXED_BYTES..)
                .filter(|j| !j.is_empty() && (prefix[0] as usize) < schema().types.len())
                .and_then(|j| Record::from_json(prefix[0], j).ok())
                .and_then(|r| super::image::encode(&r));
            let state = KeyState {
                status,
                fingerprint,
                delete_image,
            };
            w.set(&dirs.read(), prefix, &sk, Some(&state))?;
        }
        w.write(dirs)?;
        if dirs.read().any_full() {
            dirs.write().grow_full();
        }
        for (k, _) in &group {
            tree.remove(k).map_err(err("write"))?;
        }
        converted += group.len();
        after = Some(last);
    }
    tree.flush().map_err(err("flush"))?;
    meta.insert(LAYOUT_KEY, LAYOUT).map_err(err("write"))?;
    meta.flush().map_err(err("flush"))?;
    Ok(converted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn directory_lookups_agree_with_a_plain_search(
            mut starts in proptest::collection::vec(proptest::collection::vec(0u8..3, 0..11), 0..400),
            code in proptest::collection::vec(0u8..3, 0..11),
        ) {
            // Few byte values and lengths around 8: many starts share their
            // first 8 bytes, some are shorter than 8; up to several blocks.
            starts.sort();
            starts.dedup();
            let mut d = Starts::default();
            for s in &starts {
                d.push(s);
            }
            prop_assert_eq!(d.iter().count(), starts.len());
            for (i, s) in starts.iter().enumerate() {
                prop_assert_eq!(d.get(i), Some(s.as_slice()));
                prop_assert!(d.contains(s));
            }
            prop_assert_eq!(d.contains(&code), starts.contains(&code));
            let want = starts.iter().filter(|s| s.as_slice() <= code.as_slice()).count();
            prop_assert_eq!(d.count_at_or_below(&code), want);
        }

        #[test]
        fn adding_starts_merges_them_in_order_once(
            rounds in proptest::collection::vec(
                proptest::collection::vec(proptest::collection::vec(0u8..3, 0..11), 0..150),
                1..5,
            ),
            code in proptest::collection::vec(0u8..3, 0..11),
        ) {
            // Several merges into one directory, past a block of heads:
            // new starts land before, between and after the old ones.
            let mut d = Dirs::default();
            for r in &rounds {
                d.add(b"p", r.clone());
            }
            let mut want: Vec<Vec<u8>> = rounds.into_iter().flatten().collect();
            want.sort();
            want.dedup();
            let starts = &d.map[&b"p"[..]];
            let below = want.iter().filter(|s| s.as_slice() <= code.as_slice()).count();
            prop_assert_eq!(starts.count_at_or_below(&code), below);
            for (i, s) in want.iter().enumerate() {
                prop_assert_eq!(starts.count_at_or_below(s), i + 1);
            }
            let got: Vec<Vec<u8>> = starts.iter().map(<[u8]>::to_vec).collect();
            prop_assert_eq!(got, want);
        }
    }
}
