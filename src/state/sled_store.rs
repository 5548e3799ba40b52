//! The sled-backed [`StateStore`] (sled 0.34).
//!
//! Trees: `keys` (record key → [`KeyState`], integer keys grouped in
//! pages of 64, see [`super::pages`]), `dead_letters` (record key →
//! JSON [`DeadLetter`]), `checkpoints` (name → JSON [`Checkpoint`]),
//! `stats` (type id → JSON [`TypeStats`]). Checkpoints of a group of writes
//! are written last (see [`StateStore::apply`] below).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rustc_hash::FxHashMap;

use super::pages::{self, Page};
use super::{Checkpoint, DeadLetter, KeyState, StateError, StateKey, StateStore, TypeStats, Write};
use crate::model::schema::TypeId;

fn is_lock_error(e: &sled::Error) -> bool {
    let t = e.to_string();
    t.contains("lock") || t.contains("WouldBlock")
}

/// One open sled database and its trees.
struct Trees {
    db: sled::Db,
    keys: sled::Tree,
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
    /// Serialises [`StateStore::apply`] (a page is read, changed and
    /// written back, so two applies must not interleave), and
    /// [`StateStore::keys_of`] with it.
    apply_lock: Mutex<()>,
}

fn err(op: &'static str) -> impl Fn(sled::Error) -> StateError {
    move |e| StateError {
        op,
        detail: e.to_string(),
    }
}

impl SledStore {
    /// Opens (or creates) the store in `dir`. Fails with a clear message if
    /// another process holds it (sled locks the directory): stop the daemon
    /// or ask it through its HTTP endpoint.
    pub fn open(dir: &Path) -> Result<SledStore, StateError> {
        let trees = Self::open_trees(dir)?;
        Ok(SledStore {
            dir: dir.to_path_buf(),
            trees: RwLock::new(Some(Arc::new(trees))),
            apply_lock: Mutex::new(()),
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
                .cache_capacity(4 * 1024 * 1024)
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
            keys: open("keys")?,
            dead: open("dead_letters")?,
            checkpoints: open("checkpoints")?,
            stats: open("stats")?,
            db,
        })
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
}

/// A stored page, or an error naming the damage: treating it as empty
/// would silently forget up to 64 keys' states.
fn decode_page(v: &[u8]) -> Result<Page, StateError> {
    Page::decode(v).ok_or_else(|| StateError {
        op: "read",
        detail: "a key page in the state store is damaged; stop the daemon, move state.dir \
                 aside and run `cobi-sync snapshot` to rebuild it (records are re-sent, \
                 the API upserts them)"
            .into(),
    })
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("state values serialise")
}

impl StateStore for SledStore {
    fn get_key(&self, key: &StateKey) -> Result<Option<KeyState>, StateError> {
        Ok(self.get_keys(&[key])?.pop().flatten())
    }

    fn get_keys(&self, keys: &[&StateKey]) -> Result<Vec<Option<KeyState>>, StateError> {
        let tr = self.t()?;
        let mut layout = Layout::new(&tr.keys);
        keys.iter().map(|k| layout.get(k)).collect()
    }

    fn keys_of(&self, ty: TypeId, mapping: &str) -> Result<Vec<(String, KeyState)>, StateError> {
        // Not while an apply moves keys between a page and a per-key entry:
        // the scan could miss a key on its way.
        let _no_apply = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let tr = self.t()?;
        let prefix = StateKey::mapping_prefix(ty, mapping);
        let mut out = Vec::new();
        for item in tr.keys.scan_prefix(&prefix) {
            let (k, v) = item.map_err(err("scan"))?;
            if let Some(page) = pages::page_of_key(prefix.len(), &k) {
                let p = decode_page(&v)?;
                out.extend(
                    p.iter()
                        .map(|(slot, st)| (pages::source_key(page, slot), st)),
                );
            } else if let (Some(sk), Some(state)) =
                (StateKey::source_key_of(&k), KeyState::decode(&v))
            {
                out.push((sk, state));
            }
        }
        Ok(out)
    }

    fn apply(&self, writes: &[Write]) -> Result<(), StateError> {
        let _one_at_a_time = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let tr = self.t()?;
        if writes.is_empty() {
            return Ok(());
        }
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
        // Plain inserts, checkpoints last. sled recovers a prefix of its
        // log after a crash, so a checkpoint that survives implies every
        // write before it did. (Batches and multi-tree transactions hold
        // each write in memory several times over: measured ~100 MiB for
        // one 20 000-record epoch, against ~10 MiB for plain inserts.)
        // Key pages are written after the per-key entries and before the
        // checkpoints.
        let mut layout = Layout::new(&tr.keys);
        let mut checkpoints = Vec::new();
        for w in resolved {
            match w {
                Write::Key(k, s) => layout.set(k, s)?,
                Write::RemoveKey(k) => layout.remove(k)?,
                Write::DeadLetter(k, d) => {
                    tr.dead.insert(k.encode(), json(d)).map_err(err("write"))?;
                }
                Write::RemoveDeadLetter(k) => {
                    tr.dead.remove(k.encode()).map_err(err("write"))?;
                }
                Write::Checkpoint(c) => checkpoints.push(c),
                Write::Stats(ty, s) => {
                    tr.stats.insert([*ty], json(s)).map_err(err("write"))?;
                }
            }
        }
        layout.write_pages()?;
        for c in checkpoints {
            tr.checkpoints
                .insert(c.name().as_bytes(), json(c))
                .map_err(err("write"))?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StateError> {
        let tr = self.t()?;
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
        for item in iter {
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

    fn recover(&self) -> Result<(), StateError> {
        let mut slot = self.trees.write().expect("lock");
        // Drop the failed database first: sled locks the directory.
        if let Some(old) = slot.take() {
            drop(old);
        }
        let fresh = Self::open_trees(&self.dir)?;
        *slot = Some(Arc::new(fresh));
        Ok(())
    }
}

/// Reads and writes key states in their two forms (see [`super::pages`]):
/// a page slot for canonical integer keys without a last-sent record, one
/// entry per key otherwise. A key is kept in one form only: writing it in
/// one form removes it from the other when that form is in use for the
/// mapping (checked once per mapping and call, so the common case costs no
/// extra lookups). Pages read or changed are cached for the call.
struct Layout<'a> {
    tree: &'a sled::Tree,
    /// Page key → (page, changed).
    pages: FxHashMap<Vec<u8>, (Page, bool)>,
    /// Mapping prefix → (has per-key entries with a digit-led key, has pages).
    forms: FxHashMap<Vec<u8>, (bool, bool)>,
}

impl<'a> Layout<'a> {
    fn new(tree: &'a sled::Tree) -> Self {
        Layout {
            tree,
            pages: FxHashMap::default(),
            forms: FxHashMap::default(),
        }
    }

    /// Which forms a mapping uses (as of this call's first look).
    fn forms(&mut self, prefix: &[u8]) -> Result<(bool, bool), StateError> {
        if let Some(f) = self.forms.get(prefix) {
            return Ok(*f);
        }
        let mut lo = prefix.to_vec();
        lo.push(b'0');
        let mut hi = prefix.to_vec();
        hi.push(b'9' + 1);
        let per_key = self
            .tree
            .range(lo..hi)
            .next()
            .transpose()
            .map_err(err("read"))?
            .is_some();
        let mut mark = prefix.to_vec();
        mark.push(pages::PAGE_MARK);
        let paged = self
            .tree
            .scan_prefix(mark)
            .next()
            .transpose()
            .map_err(err("read"))?
            .is_some();
        self.forms.insert(prefix.to_vec(), (per_key, paged));
        Ok((per_key, paged))
    }

    fn page(&mut self, key: Vec<u8>) -> Result<&mut (Page, bool), StateError> {
        use std::collections::hash_map::Entry;
        match self.pages.entry(key) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => {
                let page = match self.tree.get(e.key()).map_err(err("read"))? {
                    Some(v) => decode_page(&v)?,
                    None => Page::default(),
                };
                Ok(e.insert((page, false)))
            }
        }
    }

    /// A key's state. The per-key entry is read before the page slot: a
    /// key that moves into per-key form (it gains a last-sent record) has
    /// its entry written before its slot is cleared, so after a crash
    /// between the two the newer entry wins; the opposite move removes the
    /// entry first, so a crash there only forgets the state (a re-send).
    fn get(&mut self, key: &StateKey) -> Result<Option<KeyState>, StateError> {
        let Some((page, slot)) = pages::locate(&key.source_key) else {
            return self.get_entry(key);
        };
        let prefix = StateKey::mapping_prefix(key.ty, &key.mapping);
        let (per_key, paged) = self.forms(&prefix)?;
        if per_key {
            if let Some(s) = self.get_entry(key)? {
                return Ok(Some(s));
            }
        }
        if paged {
            return Ok(self.page(pages::page_key(&prefix, page))?.0.get(slot));
        }
        Ok(None)
    }

    fn get_entry(&self, key: &StateKey) -> Result<Option<KeyState>, StateError> {
        Ok(self
            .tree
            .get(key.encode())
            .map_err(err("read"))?
            .and_then(|v| KeyState::decode(&v)))
    }

    fn set(&mut self, key: &StateKey, state: &KeyState) -> Result<(), StateError> {
        match pages::locate(&key.source_key) {
            Some((page, slot)) if state.last_sent.is_none() => {
                let prefix = StateKey::mapping_prefix(key.ty, &key.mapping);
                let (per_key, _) = self.forms(&prefix)?;
                if per_key {
                    self.tree.remove(key.encode()).map_err(err("write"))?;
                }
                // From now on this mapping has pages.
                if let Some(f) = self.forms.get_mut(&prefix) {
                    f.1 = true;
                }
                let p = self.page(pages::page_key(&prefix, page))?;
                p.0.set(slot, state);
                p.1 = true;
            }
            located => {
                self.tree
                    .insert(key.encode(), state.encode())
                    .map_err(err("write"))?;
                if let Some((page, slot)) = located {
                    let prefix = StateKey::mapping_prefix(key.ty, &key.mapping);
                    let (_, paged) = self.forms(&prefix)?;
                    if let Some(f) = self.forms.get_mut(&prefix) {
                        f.0 = true;
                    }
                    if paged {
                        self.clear_slot(&prefix, page, slot)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn remove(&mut self, key: &StateKey) -> Result<(), StateError> {
        self.tree.remove(key.encode()).map_err(err("write"))?;
        if let Some((page, slot)) = pages::locate(&key.source_key) {
            let prefix = StateKey::mapping_prefix(key.ty, &key.mapping);
            if self.forms(&prefix)?.1 {
                self.clear_slot(&prefix, page, slot)?;
            }
        }
        Ok(())
    }

    fn clear_slot(&mut self, prefix: &[u8], page: u64, slot: u8) -> Result<(), StateError> {
        let p = self.page(pages::page_key(prefix, page))?;
        if p.0.clear(slot) {
            p.1 = true;
        }
        Ok(())
    }

    /// Writes the changed pages (an empty page is removed).
    fn write_pages(&mut self) -> Result<(), StateError> {
        let mut changed: Vec<_> = self
            .pages
            .drain()
            .filter(|(_, (_, changed))| *changed)
            .collect();
        // In key order: sled appends to the same nodes.
        changed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (k, (page, _)) in changed {
            if page.is_empty() {
                self.tree.remove(k).map_err(err("write"))?;
            } else {
                self.tree.insert(k, page.encode()).map_err(err("write"))?;
            }
        }
        Ok(())
    }
}
