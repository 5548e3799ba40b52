//! Where each key's state lives in the sled `keys` tree, and how a group
//! of key writes becomes page writes.
//!
//! A key's form depends on its source key only: a canonical unsigned
//! integer lives in an integer page ([`super::pages`]), anything else in a
//! hashed page ([`super::hashed`]). Keys never move between forms, so no
//! write order between forms matters for crash safety.
//!
//! [`Dirs`] is the in-memory directory of hashed pages: per mapping, the
//! sorted starts of its pages (8 bytes a page, read once per mapping by a
//! scan). Readers hold it shared while they look a page up and read it;
//! a split is published under it exclusively (upper pieces, then the
//! lower page, then the new starts), so a reader never routes a key to a
//! page that no longer holds it.
//!
//! The first layout of the store (one entry per non-integer key and per
//! key with a last-sent record, `[prefix][source key UTF-8]` →
//! `[status][fingerprint][last-sent JSON]`) is converted once, when a
//! store without a layout marker is opened ([`migrate`]).

use std::collections::BTreeSet;

use rustc_hash::FxHashMap;
use sled::IVec;

use super::hashed::{self, Change, Hasher};
use super::keycode;
use super::pages::{self, Page};
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

/// The hashed-page starts of each mapping read so far.
#[derive(Default)]
pub struct Dirs {
    map: FxHashMap<Vec<u8>, BTreeSet<u64>>,
}

impl Dirs {
    /// Whether a mapping's directory is in memory.
    pub fn has(&self, prefix: &[u8]) -> bool {
        self.map.contains_key(prefix)
    }

    /// Reads a mapping's page starts from the tree.
    pub fn load(&mut self, tree: &sled::Tree, prefix: &[u8]) -> Result<(), StateError> {
        let mut mark = prefix.to_vec();
        mark.push(hashed::MARK);
        let mut starts = BTreeSet::new();
        for item in tree.scan_prefix(&mark) {
            let (k, _) = item.map_err(err("scan"))?;
            starts.insert(hashed::start_of_key(prefix.len(), &k).ok_or_else(damaged)?);
        }
        self.map.insert(prefix.to_vec(), starts);
        Ok(())
    }

    /// The page covering hash `h` as `(start, last hash covered)`, if the
    /// mapping has hashed pages.
    pub fn page_for(&self, prefix: &[u8], h: u64) -> Option<(u64, u64)> {
        let starts = self.map.get(prefix)?;
        let start = *starts.range(..=h).next_back()?;
        let end = h
            .checked_add(1)
            .and_then(|n| starts.range(n..).next())
            .map_or(u64::MAX, |next| next - 1);
        Some((start, end))
    }

    fn add(&mut self, prefix: &[u8], start: u64) {
        self.map.entry(prefix.to_vec()).or_default().insert(start);
    }

    /// Forgets every directory (after a failed write: reread from disk).
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Pages in a mapping's directory.
    #[cfg(test)]
    pub fn pages(&self, prefix: &[u8]) -> usize {
        self.map.get(prefix).map_or(0, BTreeSet::len)
    }
}

/// Where a key lives.
enum Place {
    Int {
        key: Vec<u8>,
        slot: u8,
    },
    /// `known`: the page is in the directory (else the mapping has no
    /// hashed page yet and `start` is 0).
    Hashed {
        key: Vec<u8>,
        code: Vec<u8>,
        start: u64,
        known: bool,
    },
}

fn place(dirs: &Dirs, hash: Hasher, prefix: &[u8], source_key: &str) -> Place {
    match pages::locate(source_key) {
        Some((page, slot)) => Place::Int {
            key: pages::page_key(prefix, page),
            slot,
        },
        None => {
            let code = keycode::code(source_key);
            let page = dirs.page_for(prefix, hash(&code));
            let start = page.map_or(0, |p| p.0);
            Place::Hashed {
                key: hashed::page_key(prefix, start),
                code,
                start,
                known: page.is_some(),
            }
        }
    }
}

/// Reads key states; pages read are kept for the call.
pub struct Reader<'a> {
    tree: &'a sled::Tree,
    dirs: &'a Dirs,
    hash: Hasher,
    ints: FxHashMap<Vec<u8>, Option<Page>>,
    hashed: FxHashMap<Vec<u8>, Option<IVec>>,
}

impl<'a> Reader<'a> {
    /// A reader over `tree` (every prefix read must be loaded in `dirs`).
    pub fn new(tree: &'a sled::Tree, dirs: &'a Dirs, hash: Hasher) -> Self {
        Reader {
            tree,
            dirs,
            hash,
            ints: FxHashMap::default(),
            hashed: FxHashMap::default(),
        }
    }

    /// The state of `source_key` under a mapping prefix.
    pub fn get(&mut self, prefix: &[u8], source_key: &str) -> Result<Option<KeyState>, StateError> {
        match place(self.dirs, self.hash, prefix, source_key) {
            Place::Int { key, slot } => {
                let page = match self.ints.entry(key) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let p = match self.tree.get(e.key()).map_err(err("read"))? {
                            Some(v) => Some(decode_page(&v)?),
                            None => None,
                        };
                        e.insert(p)
                    }
                };
                Ok(page.as_ref().and_then(|p| p.get(slot)))
            }
            Place::Hashed {
                key, code, known, ..
            } => {
                if !known {
                    return Ok(None);
                }
                let page = match self.hashed.entry(key) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let v = self.tree.get(e.key()).map_err(err("read"))?;
                        e.insert(v)
                    }
                };
                match page {
                    None => Ok(None),
                    Some(p) => Ok(hashed::find(p, &code)
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
    hash: Hasher,
    ints: FxHashMap<Vec<u8>, (Page, bool)>,
    /// Page key → (prefix, start, changes).
    hashed: FxHashMap<Vec<u8>, (Vec<u8>, u64, Vec<Change>)>,
}

/// Pages split by a write: `(prefix, pieces)`, the first piece at the old
/// page's start.
type Splits = Vec<(Vec<u8>, Vec<(u64, Vec<u8>)>)>;

impl<'a> Writer<'a> {
    /// A writer over `tree`.
    pub fn new(tree: &'a sled::Tree, hash: Hasher) -> Self {
        Writer {
            tree,
            hash,
            ints: FxHashMap::default(),
            hashed: FxHashMap::default(),
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
        match place(dirs, self.hash, prefix, source_key) {
            Place::Int { key, slot } => {
                let page = match self.ints.entry(key) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let p = match self.tree.get(e.key()).map_err(err("read"))? {
                            Some(v) => decode_page(&v)?,
                            None => Page::default(),
                        };
                        e.insert((p, false))
                    }
                };
                match state {
                    Some(s) => {
                        page.0.set(slot, s);
                        page.1 = true;
                    }
                    None => page.1 |= page.0.clear(slot),
                }
            }
            Place::Hashed {
                key, code, start, ..
            } => {
                self.hashed
                    .entry(key)
                    .or_insert_with(|| (prefix.to_vec(), start, Vec::new()))
                    .2
                    .push((code, state.cloned()));
            }
        }
        Ok(())
    }

    /// Writes every changed page: hashed pages that keep their size, then
    /// split ones (under `dirs` exclusively, see the module doc), then
    /// integer pages. An empty integer page is removed; hashed pages never
    /// are.
    pub fn write(self, dirs: &parking_lot::RwLock<Dirs>) -> Result<(), StateError> {
        let Writer {
            tree,
            hash,
            ints,
            hashed,
        } = self;
        let mut hashed: Vec<_> = hashed.into_iter().collect();
        hashed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut splits: Splits = Vec::new();
        let mut created: Vec<(Vec<u8>, u64)> = Vec::new();
        {
            let d = dirs.read();
            for (key, (prefix, start, changes)) in hashed {
                let page = d.page_for(&prefix, start).filter(|p| p.0 == start);
                if page.is_none() {
                    created.push((prefix.clone(), start));
                }
                let end = page.map_or(u64::MAX, |p| p.1);
                let old = tree.get(&key).map_err(err("read"))?;
                let new = hashed::rebuild(
                    old.as_deref().unwrap_or(&hashed::empty()),
                    &changes,
                    start,
                    end,
                    hash,
                )
                .ok_or_else(damaged)?;
                if new.len() <= hashed::MAX_BYTES {
                    tree.insert(key, new).map_err(err("write"))?;
                } else {
                    let pieces = hashed::split(new, start, hash).ok_or_else(damaged)?;
                    splits.push((prefix, pieces));
                }
            }
        }
        if !splits.is_empty() || !created.is_empty() {
            let mut d = dirs.write();
            for (prefix, start) in created {
                d.add(&prefix, start);
            }
            for (prefix, pieces) in splits {
                // Upper pieces first, the page at the old start last.
                for (start, bytes) in pieces.iter().skip(1) {
                    tree.insert(hashed::page_key(&prefix, *start), bytes.as_slice())
                        .map_err(err("write"))?;
                }
                let (start, bytes) = &pieces[0];
                tree.insert(hashed::page_key(&prefix, *start), bytes.as_slice())
                    .map_err(err("write"))?;
                for (start, _) in &pieces {
                    d.add(&prefix, *start);
                }
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
        Ok(())
    }
}

/// Every key of a mapping with its status, page by page (see
/// [`super::StateStore::scan_keys`]). Hashed pages come first in the
/// tree; each is read with the start of the next one, and only its slots
/// in that range count (a leftover of an interrupted split is skipped).
pub fn scan(
    tree: &sled::Tree,
    hash: Hasher,
    prefix: &[u8],
    visit: &mut dyn FnMut(String, KeyStatus),
) -> Result<(), StateError> {
    let mut pending: Option<(u64, IVec)> = None;
    let flush = |p: Option<(u64, IVec)>, end: u64, visit: &mut dyn FnMut(String, KeyStatus)| {
        if let Some((start, bytes)) = p {
            for s in hashed::slots(&bytes).ok_or_else(damaged)? {
                let h = hash(s.code);
                if h >= start && h <= end {
                    visit(keycode::decode(s.code).ok_or_else(damaged)?, s.status);
                }
            }
        }
        Ok::<(), StateError>(())
    };
    for item in tree.scan_prefix(prefix) {
        let (k, v) = item.map_err(err("scan"))?;
        if let Some(start) = hashed::start_of_key(prefix.len(), &k) {
            let prev = pending.replace((start, v));
            flush(prev, start.saturating_sub(1), visit)?;
        } else if let Some(page) = pages::page_of_key(prefix.len(), &k) {
            flush(pending.take(), u64::MAX, visit)?;
            for (slot, status) in decode_page(&v)?.statuses() {
                visit(pages::source_key(page, slot), status);
            }
        }
    }
    flush(pending.take(), u64::MAX, visit)
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
    meta: &sled::Tree,
    dirs: &parking_lot::RwLock<Dirs>,
    hash: Hasher,
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
        for item in range {
            let (k, v) = item.map_err(err("scan"))?;
            let is_page = matches!(k.get(PREFIX), Some(&hashed::MARK) | Some(&pages::PAGE_MARK))
                && k.len() == PREFIX + 9;
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
        let mut w = Writer::new(tree, hash);
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
