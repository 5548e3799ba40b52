//! The sled-backed [`StateStore`] (sled 0.34).
//!
//! Trees: `keys` (key states in pages, see [`super::layout`]), `images`
//! (the delete images of integer keys, see [`super::pages`]),
//! `dead_letters` (record key → JSON [`DeadLetter`]), `checkpoints`
//! (name → JSON [`Checkpoint`]), `stats` (type id → JSON [`TypeStats`]),
//! `meta` (the layout marker). Beside them, the file `cobi-journal`
//! holds range keys' writes not yet in their pages ([`super::journal`]).
//! Checkpoints of a group of writes are written last (see
//! [`StateStore::apply`] below).
//!
//! Memory: sled's page cache is bounded ([`CACHE_BYTES`]). Beyond it,
//! pages are read from the log (the OS page cache) as needed and RSS
//! stays flat — provided no single write is large: sled 0.34 evaluates
//! its LRU only once 64 accesses of one of its 256 shards have queued, so
//! what a few thousand writes of big values bring in is never evicted
//! (see [`super::pages`] for why integer keys' images are entries of
//! their own), and the scans of key pages and dead letters count an
//! access per entry ([`layout::bounded`]: otherwise one per node, and a
//! scan kept every node it read).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use super::journal::{self, Pending};
use super::keycode;
use super::layout::{self, err, Dirs, Reader, Writer};
use super::pages;
use super::{
    Checkpoint, DeadLetter, KeyState, KeyStatus, StateError, StateKey, StateStore, TypeStats, Write,
};
use crate::model::schema::TypeId;

/// sled's cache. Delete images (~300 bytes a record) now fill it during
/// a bulk load, and its resident size is about twice its nominal one: 4
/// MiB keeps a 200 000-row transaction at ~87 MiB peak RSS (32 MiB: ~118).
/// Key pages that do not fit are read back from the OS page cache.
pub const CACHE_BYTES: u64 = 4 * 1024 * 1024;

fn is_lock_error(e: &sled::Error) -> bool {
    let t = e.to_string();
    t.contains("lock") || t.contains("WouldBlock")
}

/// One open sled database and its trees.
struct Trees {
    db: sled::Db,
    meta: sled::Tree,
    keys: sled::Tree,
    images: sled::Tree,
    dead: sled::Tree,
    checkpoints: sled::Tree,
    stats: sled::Tree,
}

/// sled database in the state directory.
///
/// After an I/O error (a full or read-only disk) sled refuses every later
/// write even once the cause is gone, so [`StateStore::recover`] closes and
/// reopens the database: it comes back as of its last flush, and the
/// caller re-applies what was not flushed.
pub struct SledStore {
    dir: PathBuf,
    trees: RwLock<Option<Arc<Trees>>>,
    /// Serialises [`StateStore::apply`] (pages are read, changed and
    /// written back, so two applies must not interleave).
    apply_lock: Mutex<()>,
    /// Range-page directories (see [`super::layout`]).
    dirs: parking_lot::RwLock<Dirs>,
    /// Range keys' writes held back from their pages (see
    /// [`super::journal`]); changed only under the apply lock.
    pending: parking_lot::RwLock<Pending>,
    /// Held-back bytes at which an apply writes them to their pages.
    drain_bytes: usize,
    /// Range pages read by lookups since open (tests).
    range_reads: std::sync::atomic::AtomicU64,
    /// Range pages written since open (tests).
    range_writes: std::sync::atomic::AtomicU64,
    /// Re-opens by [`StateStore::recover`] ([`StateStore::generation`]).
    reopened: std::sync::atomic::AtomicU64,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`. Fails with a clear message if
    /// another process holds it (sled locks the directory): stop the daemon
    /// or ask it through its HTTP endpoint. A store of the first layout is
    /// converted on the way.
    pub fn open(dir: &Path) -> Result<SledStore, StateError> {
        Self::open_draining_at(dir, journal::DRAIN_BYTES)
    }

    /// Opens the store, writing held-back keys to their pages once they
    /// reach `drain_bytes` (0: at every apply).
    pub fn open_draining_at(dir: &Path, drain_bytes: usize) -> Result<SledStore, StateError> {
        let trees = Self::open_trees(dir)?;
        let dirs = parking_lot::RwLock::new(Dirs::default());
        let converted = layout::migrate(&trees.keys, &trees.images, &trees.meta, &dirs)?;
        if converted > 0 {
            tracing::info!(entries = converted, dir = %dir.display(), "state store converted to key pages");
        }
        let pending =
            parking_lot::RwLock::new(Pending::open(dir, drain_bytes + journal::SLACK_BYTES)?);
        Ok(SledStore {
            dir: dir.to_path_buf(),
            trees: RwLock::new(Some(Arc::new(trees))),
            apply_lock: Mutex::new(()),
            dirs,
            pending,
            drain_bytes,
            range_reads: Default::default(),
            range_writes: Default::default(),
            reopened: Default::default(),
        })
    }

    fn t(&self) -> Result<Arc<Trees>, StateError> {
        self.trees
            .read()
            .expect("lock")
            .clone()
            .ok_or_else(|| StateError {
                op: "open",
                detail: format!("{} could not be reopened", self.dir.display()),
            })
    }

    fn open_trees(dir: &Path) -> Result<Trees, StateError> {
        std::fs::create_dir_all(dir).map_err(|e| StateError {
            op: "open",
            detail: format!("cannot create {}: {e}", dir.display()),
        })?;
        // sled releases its directory lock when its last handle (some held
        // by background threads) drops, shortly after the owner closed it:
        // retry a locked directory for up to two seconds.
        let mut tries = 0;
        let db = loop {
            let result = sled::Config::new()
                .path(dir)
                .cache_capacity(CACHE_BYTES)
                .flush_every_ms(None)
                .open();
            match result {
                Ok(db) => break db,
                Err(e) if is_lock_error(&e) && tries < 40 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(StateError {
                        op: "open",
                        detail: if is_lock_error(&e) {
                            format!(
                                "{} is in use by another cobi-sync process (is the daemon running? \
                                 `status` and `dlq` talk to it through http.listen): {e}",
                                dir.display()
                            )
                        } else {
                            format!("{}: {e}", dir.display())
                        },
                    })
                }
            }
        };
        let open = |name: &str| db.open_tree(name).map_err(err("open"));
        Ok(Trees {
            meta: open("meta")?,
            keys: open("keys")?,
            images: open("images")?,
            dead: open("dead_letters")?,
            checkpoints: open("checkpoints")?,
            stats: open("stats")?,
            db,
        })
    }

    /// The trees and the directories of `prefixes` (read if need be) for a
    /// lookup, both taken under the directory lock. [`StateStore::recover`]
    /// holds that lock while it swaps the trees, and a failed apply while it
    /// clears the directories, so a lookup never reads directories (and
    /// presence filters) from a database other than the one it reads pages
    /// from, nor finds them cleared between loading and reading.
    fn lookup_view<'p>(
        &self,
        prefixes: impl Iterator<Item = &'p [u8]> + Clone,
    ) -> Result<(Arc<Trees>, parking_lot::RwLockReadGuard<'_, Dirs>), StateError> {
        let d = self.dirs.read();
        if prefixes.clone().all(|p| d.has(p)) {
            return Ok((self.t()?, d));
        }
        drop(d);
        let mut d = self.dirs.write();
        let tr = self.t()?;
        for p in prefixes {
            if !d.has(p) {
                d.load(&tr.keys, p)?;
            }
        }
        Ok((tr, parking_lot::RwLockWriteGuard::downgrade(d)))
    }

    /// Makes sure the directories of `prefixes` are in memory (applies:
    /// under the apply lock, so nothing clears them or swaps the trees
    /// meanwhile).
    fn load_dirs<'p>(
        &self,
        tree: &sled::Tree,
        prefixes: impl Iterator<Item = &'p [u8]> + Clone,
    ) -> Result<(), StateError> {
        if prefixes.clone().all(|p| self.dirs.read().has(p)) {
            return Ok(());
        }
        let mut d = self.dirs.write();
        for p in prefixes {
            if !d.has(p) {
                d.load(tree, p)?;
            }
        }
        Ok(())
    }
}

impl SledStore {
    /// Entries in the keys tree (pages count once), for tests.
    #[cfg(test)]
    pub(crate) fn entries_in_keys_tree(&self) -> Result<usize, StateError> {
        Ok(self.t()?.keys.len())
    }

    /// The raw keys tree, for tests that stage a crash's leftovers.
    #[cfg(test)]
    pub(crate) fn keys_tree(&self) -> sled::Tree {
        self.t().expect("open").keys.clone()
    }

    /// The `images` tree (tests).
    #[cfg(test)]
    pub(crate) fn images_tree(&self) -> sled::Tree {
        self.t().expect("open").images.clone()
    }

    /// Removes the layout marker (as in a store of the first layout).
    #[cfg(test)]
    pub(crate) fn forget_layout_marker(&self) {
        self.t()
            .expect("open")
            .meta
            .remove("layout")
            .expect("remove");
    }

    /// Range pages of a mapping, for tests.
    #[cfg(test)]
    pub(crate) fn range_pages(&self, ty: TypeId, mapping: &str) -> usize {
        let prefix = StateKey::mapping_prefix(ty, mapping);
        let tree = self.t().expect("open").keys.clone();
        self.load_dirs(&tree, std::iter::once(prefix.as_slice()))
            .expect("load");
        self.dirs.read().pages(&prefix)
    }

    /// Drops the in-memory directories and filters, as a failed apply does
    /// (tests).
    #[cfg(test)]
    pub(crate) fn forget_directories(&self) {
        self.dirs.write().clear();
    }

    /// Range pages read by lookups since the store was opened (tests).
    #[cfg(test)]
    pub(crate) fn range_page_reads(&self) -> u64 {
        self.range_reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Range pages written since the store was opened (tests).
    #[cfg(test)]
    pub(crate) fn range_page_writes(&self) -> u64 {
        self.range_writes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The journal file (tests stage a crash's leftovers in it).
    #[cfg(test)]
    pub(crate) fn journal_path(&self) -> PathBuf {
        self.dir.join(journal::JOURNAL_FILE)
    }

    /// Range keys held back from their pages (tests).
    #[cfg(test)]
    pub(crate) fn held_back(&self) -> usize {
        self.pending.read().len()
    }

    /// Bytes of the database on disk (sled's files and the journal), for
    /// measurements.
    pub fn disk_bytes(&self) -> Result<u64, StateError> {
        let journal =
            std::fs::metadata(self.dir.join(journal::JOURNAL_FILE)).map_or(0, |m| m.len());
        Ok(self.t()?.db.size_on_disk().map_err(err("size"))? + journal)
    }
}

/// Held-back keys written to pages per [`Writer`] in a drain.
const DRAIN_GROUP: usize = 10_000;

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("state values serialise")
}

/// The mapping prefixes of a group of keys, without repeats (keys of one
/// mapping come in runs).
fn prefixes_of<'k>(keys: impl Iterator<Item = &'k StateKey>) -> Vec<(Vec<u8>, TypeId, Arc<str>)> {
    let mut out: Vec<(Vec<u8>, TypeId, Arc<str>)> = Vec::new();
    for k in keys {
        if !out
            .iter()
            .any(|(_, t, m)| *t == k.ty && (Arc::ptr_eq(m, &k.mapping) || **m == *k.mapping))
        {
            out.push((
                StateKey::mapping_prefix(k.ty, &k.mapping),
                k.ty,
                k.mapping.clone(),
            ));
        }
    }
    out
}

fn prefix_of<'a>(prefixes: &'a [(Vec<u8>, TypeId, Arc<str>)], k: &StateKey) -> &'a [u8] {
    prefixes
        .iter()
        .find(|(_, t, m)| *t == k.ty && (Arc::ptr_eq(m, &k.mapping) || **m == *k.mapping))
        .map(|(p, _, _)| p.as_slice())
        .expect("every key's prefix is listed")
}

/// One range key's write in an apply: mapping prefix, key code, state
/// (`None`: removed).
type RangeWrite<'w> = (&'w [u8], Vec<u8>, Option<&'w KeyState>);

/// Splits an apply's range-key writes into those written to their pages
/// at once and those held back: each mapping's writes go at once if they
/// crowd their pages ([`journal::write_at_once`]), save keys held back
/// already, which stay held back. Both keep the apply's order (writes to
/// one key: the last wins, in a page as in the journal). Per key: a
/// directory search where the mapping has enough writes to crowd a page,
/// and a journal lookup where they do; the keys themselves are not
/// sorted. `prefixes`: the apply's mappings ([`prefixes_of`]).
fn crowded<'w>(
    writes: Vec<RangeWrite<'w>>,
    prefixes: &[(Vec<u8>, TypeId, Arc<str>)],
    dirs: &Dirs,
    pending: &Pending,
) -> (Vec<RangeWrite<'w>>, Vec<RangeWrite<'w>>) {
    // Each write's mapping, as its position in `prefixes`.
    let of: Vec<usize> = writes
        .iter()
        .map(|w| {
            prefixes
                .iter()
                .position(|(p, _, _)| p.as_slice() == w.0)
                .expect("every write's prefix is listed")
        })
        .collect();
    let at_once: Vec<bool> = (0..prefixes.len())
        .map(|m| {
            let ours = || writes.iter().zip(&of).filter(|(_, &o)| o == m);
            let keys = ours().count();
            // Too few to crowd even one page: no page to look up.
            if !journal::write_at_once(keys, 1) {
                return false;
            }
            // The pages the mapping's keys fall in (`usize::MAX`: no page
            // yet, the first one).
            let prefix = prefixes[m].0.as_slice();
            let mut pages: Vec<usize> = ours()
                .map(|(w, _)| dirs.page_index(prefix, &w.1).unwrap_or(usize::MAX))
                .collect();
            pages.sort_unstable();
            pages.dedup();
            journal::write_at_once(keys, pages.len())
        })
        .collect();
    let (mut now, mut later) = (Vec::new(), Vec::with_capacity(writes.len()));
    for (w, m) in writes.into_iter().zip(of) {
        if at_once[m] && !pending.holds(w.0, &w.1) {
            now.push(w);
        } else {
            later.push(w);
        }
    }
    (now, later)
}

impl StateStore for SledStore {
    fn get_key(&self, key: &StateKey) -> Result<Option<KeyState>, StateError> {
        Ok(self.get_keys(&[key])?.pop().flatten())
    }

    fn get_keys(&self, keys: &[&StateKey]) -> Result<Vec<Option<KeyState>>, StateError> {
        let prefixes = prefixes_of(keys.iter().copied());
        let mut out = vec![None; keys.len()];
        // Range keys held back answer first; the rest read pages in key
        // order (mapping, then key code): neighbouring keys share pages
        // and sled nodes, read once while they are cached rather than once
        // per key. The code is computed once, here.
        let mut order: Vec<(&[u8], Vec<u8>, usize)> = Vec::with_capacity(keys.len());
        {
            let pending = self.pending.read();
            for (i, k) in keys.iter().enumerate() {
                let prefix = prefix_of(&prefixes, k);
                let code = keycode::code(&k.source_key);
                if !pending.is_empty() && pages::locate(&k.source_key).is_none() {
                    if let Some(s) = pending.get(prefix, &code) {
                        out[i] = s;
                        continue;
                    }
                }
                order.push((prefix, code, i));
            }
        }
        if order.is_empty() {
            return Ok(out);
        }
        order.sort_unstable();
        let (tr, dirs) = self.lookup_view(order.iter().map(|o| o.0))?;
        let mut reader = Reader::new(&tr.keys, &tr.images, &dirs);
        for (prefix, code, i) in order {
            out[i] = reader.get(prefix, &keys[i].source_key, Some(code))?;
        }
        self.range_reads
            .fetch_add(reader.range_reads(), std::sync::atomic::Ordering::Relaxed);
        Ok(out)
    }

    fn scan_keys(
        &self,
        ty: TypeId,
        mapping: &str,
        visit: &mut dyn FnMut(String, KeyStatus),
    ) -> Result<(), StateError> {
        let tr = self.t()?;
        let prefix = StateKey::mapping_prefix(ty, mapping);
        // Held-back keys as they are now, instead of their pages' states.
        let held: BTreeMap<Vec<u8>, Option<KeyStatus>> = self
            .pending
            .read()
            .of_mapping(&prefix)
            .into_iter()
            .collect();
        if held.is_empty() {
            return layout::scan(&tr.keys, &prefix, visit);
        }
        layout::scan(&tr.keys, &prefix, &mut |key, status| {
            if pages::locate(&key).is_some() || !held.contains_key(&keycode::code(&key)) {
                visit(key, status)
            }
        })?;
        for (code, status) in held {
            if let Some(status) = status {
                visit(keycode::decode(&code).ok_or_else(layout::damaged)?, status);
            }
        }
        Ok(())
    }

    fn apply(&self, writes: &[Write]) -> Result<(), StateError> {
        self.apply_all(&[writes])
    }

    fn apply_all(&self, groups: &[&[Write]]) -> Result<(), StateError> {
        // Held for every group: `recover` takes it too.
        let _one_at_a_time = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let tr = self.t()?;
        for writes in groups.iter().filter(|w| !w.is_empty()) {
            let r = self.apply_locked(&tr, writes);
            if r.is_err() {
                // Pages may be half written: read the directories again.
                // (The journal needs nothing: a failed write to it is
                // undone where it fails, and a failed drain leaves it as
                // it was.)
                self.dirs.write().clear();
                return r;
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StateError> {
        let tr = self.t()?;
        self.pending.write().sync()?;
        tr.db.flush().map_err(err("flush"))?;
        Ok(())
    }

    fn checkpoint(&self, name: &str) -> Result<Option<Checkpoint>, StateError> {
        let tr = self.t()?;
        Ok(tr
            .checkpoints
            .get(name.as_bytes())
            .map_err(err("read"))?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    fn checkpoints(&self) -> Result<Vec<Checkpoint>, StateError> {
        let tr = self.t()?;
        let mut out = Vec::new();
        for item in tr.checkpoints.iter() {
            let (_, v) = item.map_err(err("scan"))?;
            if let Ok(c) = serde_json::from_slice(&v) {
                out.push(c);
            }
        }
        Ok(out)
    }

    fn remove_checkpoint(&self, name: &str) -> Result<(), StateError> {
        let tr = self.t()?;
        tr.checkpoints
            .remove(name.as_bytes())
            .map_err(err("write"))?;
        Ok(())
    }

    fn dead_letters(&self, ty: Option<TypeId>) -> Result<Vec<DeadLetter>, StateError> {
        let tr = self.t()?;
        let iter = match ty {
            Some(t) => tr.dead.scan_prefix([t]),
            None => tr.dead.iter(),
        };
        let mut out = Vec::new();
        for item in layout::bounded(&tr.dead, iter) {
            let (_, v) = item.map_err(err("scan"))?;
            if let Ok(d) = serde_json::from_slice(&v) {
                out.push(d);
            }
        }
        Ok(out)
    }

    fn dead_letter(&self, key: &StateKey) -> Result<Option<DeadLetter>, StateError> {
        let tr = self.t()?;
        Ok(tr
            .dead
            .get(key.encode())
            .map_err(err("read"))?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    fn stats(&self) -> Result<BTreeMap<TypeId, TypeStats>, StateError> {
        let tr = self.t()?;
        let mut out = BTreeMap::new();
        for item in tr.stats.iter() {
            let (k, v) = item.map_err(err("scan"))?;
            if let (Some(&t), Ok(s)) = (k.first(), serde_json::from_slice(&v)) {
                out.insert(t, s);
            }
        }
        Ok(out)
    }

    fn generation(&self) -> u64 {
        self.reopened.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn recover(&self) -> Result<(), StateError> {
        let _no_apply = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        // No lookup between here and the new trees (see `lookup_view`).
        let mut dirs = self.dirs.write();
        let mut slot = self.trees.write().expect("lock");
        // Before the old database goes: a flush that ends after this
        // counts as lost (see `generation`).
        self.reopened
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        dirs.clear();
        // Drop the failed database first: sled locks the directory.
        if let Some(old) = slot.take() {
            drop(old);
        }
        let fresh = Self::open_trees(&self.dir)?;
        *self.pending.write() = Pending::open(&self.dir, self.drain_bytes + journal::SLACK_BYTES)?;
        *slot = Some(Arc::new(fresh));
        Ok(())
    }
}

impl SledStore {
    /// Writes the held-back keys to their pages, in key order and in
    /// groups of [`DRAIN_GROUP`] (bounded memory; each group's pages are
    /// neighbours). Lookups meanwhile still find them held back.
    fn drain(&self, tr: &Trees, pending: &Pending) -> Result<(), StateError> {
        let records = pending.sorted();
        for group in records.chunks(DRAIN_GROUP) {
            let mut prefixes: Vec<&[u8]> = group.iter().map(|r| pending.key_at(*r).0).collect();
            prefixes.dedup();
            self.load_dirs(&tr.keys, prefixes.iter().copied())?;
            let mut writer = Writer::new(&tr.keys, &tr.images);
            {
                let dirs = self.dirs.read();
                for r in group {
                    let (prefix, code, state) = pending.at(*r);
                    writer.set_range(&dirs, prefix, code.to_vec(), state);
                }
            }
            let written = writer.write(&self.dirs)?;
            self.range_writes
                .fetch_add(written, std::sync::atomic::Ordering::Relaxed);
            if self.dirs.read().any_full() {
                self.dirs.write().grow_full();
            }
        }
        Ok(())
    }

    fn apply_locked(&self, tr: &Trees, writes: &[Write]) -> Result<(), StateError> {
        // Checkpoint monotonicity is decided against what is stored.
        let mut resolved = Vec::with_capacity(writes.len());
        for w in writes {
            if let Write::Checkpoint(c) = w {
                if let Some(old) = self.checkpoint(&c.name())? {
                    if c.is_behind(&old) {
                        continue;
                    }
                }
            }
            resolved.push(w);
        }
        let prefixes = prefixes_of(resolved.iter().filter_map(|w| match w {
            Write::Key(k, _) | Write::RemoveKey(k) => Some(k),
            _ => None,
        }));
        self.load_dirs(&tr.keys, prefixes.iter().map(|p| p.0.as_slice()))?;
        // Plain inserts, checkpoints last. sled recovers a prefix of its
        // log after a crash, so a checkpoint that survives implies every
        // write before it did. (Batches and multi-tree transactions hold
        // each write in memory several times over: measured ~100 MiB for
        // one 20 000-record epoch, against ~10 MiB for plain inserts.)
        // Key pages are written after the dead letters and before the
        // checkpoints; range keys' writes go to the journal after the rest,
        // save those that crowd their pages (written with the rest).
        let mut writer = Writer::new(&tr.keys, &tr.images);
        let mut checkpoints = Vec::new();
        let mut held = Vec::new();
        let mut letters = false;
        {
            let dirs = self.dirs.read();
            for w in resolved {
                let range = |k: &StateKey| pages::locate(&k.source_key).is_none();
                match w {
                    Write::Key(k, s) if range(k) => held.push((
                        prefix_of(&prefixes, k),
                        keycode::code(&k.source_key),
                        Some(s),
                    )),
                    Write::RemoveKey(k) if range(k) => {
                        held.push((prefix_of(&prefixes, k), keycode::code(&k.source_key), None))
                    }
                    Write::Key(k, s) => {
                        writer.set(&dirs, prefix_of(&prefixes, k), &k.source_key, Some(s))?
                    }
                    Write::RemoveKey(k) => {
                        writer.set(&dirs, prefix_of(&prefixes, k), &k.source_key, None)?
                    }
                    Write::DeadLetter(k, d) => {
                        letters = true;
                        tr.dead.insert(k.encode(), json(d)).map_err(err("write"))?;
                    }
                    Write::RemoveDeadLetter(k) => {
                        letters = true;
                        tr.dead.remove(k.encode()).map_err(err("write"))?;
                    }
                    Write::Checkpoint(c) => checkpoints.push(c),
                    Write::Stats(ty, s) => {
                        tr.stats.insert([*ty], json(s)).map_err(err("write"))?;
                    }
                }
            }
        }
        // Range keys that crowd their pages are written with the rest.
        let held = {
            let pending = self.pending.read();
            let dirs = self.dirs.read();
            let (now, later) = crowded(held, &prefixes, &dirs, &pending);
            for (prefix, code, state) in now {
                writer.set_range(&dirs, prefix, code, state.cloned());
            }
            later
        };
        let written = writer.write(&self.dirs)?;
        self.range_writes
            .fetch_add(written, std::sync::atomic::Ordering::Relaxed);
        if self.dirs.read().any_full() {
            self.dirs.write().grow_full();
        }
        // A key's state must not outlive its dead letter (or the removal
        // of one) in a crash: sled's writes reach the disk at its next
        // flush, the journal's at once (a killed process's writes stay in
        // the OS). Dead letters are rare: flush them first.
        if letters && !held.is_empty() {
            tr.db.flush().map_err(err("flush"))?;
        }
        let mut pending = self.pending.upgradable_read();
        if !held.is_empty() {
            pending.with_upgraded(|p| p.record_writes(held.into_iter()))?;
        }
        if pending.is_full(self.drain_bytes) {
            self.drain(tr, &pending)?;
            // The pages are durable before the journal is emptied.
            tr.db.flush().map_err(err("flush"))?;
            pending.with_upgraded(Pending::drained)?;
        }
        if !checkpoints.is_empty() {
            pending.with_upgraded(Pending::sync)?;
        }
        for c in checkpoints {
            tr.checkpoints
                .insert(c.name().as_bytes(), json(c))
                .map_err(err("write"))?;
        }
        Ok(())
    }
}
