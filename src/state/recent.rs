//! Range pages read or written lately, so the apply that follows a lookup
//! does not read the same pages from sled again.
//!
//! The sink looks an epoch's keys up ([`super::StateStore::get_keys`]),
//! sends the records, then writes their verdicts
//! ([`super::StateStore::apply`]) to the same pages. With random keys (a
//! UUID insert burst) those pages are spread over the whole store, far
//! more than sled's bounded cache holds, and every sled read of one pulls
//! and decodes a whole leaf of sled's tree: reading each page twice was
//! half the store's CPU in a burst. [`Recent`] keeps the bytes of the
//! pages read and written lately (first in, first out, at most
//! [`Recent::CAP_BYTES`]), shared with sled (`IVec` is reference counted).
//!
//! Consistency: only an apply changes pages, and it puts every page it
//! writes here right after writing it. A lookup that reads a page from
//! sled while an apply runs could offer bytes older than what the apply
//! just wrote, so a lookup offers its pages only if no apply began since
//! the lookup did ([`Recent::generation`], bumped by
//! [`Recent::begin_write`]). A failed apply or a reopened store clears it.

use std::collections::VecDeque;

use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use sled::IVec;

/// Recently used range pages: sled key → bytes.
#[derive(Default)]
pub struct Recent {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    generation: u64,
    pages: FxHashMap<Vec<u8>, IVec>,
    /// Insertion order (may name a key twice, or one already gone).
    order: VecDeque<Vec<u8>>,
    bytes: usize,
}

impl Inner {
    fn put(&mut self, key: &[u8], bytes: IVec, cap: usize) {
        self.bytes += bytes.len();
        if let Some(old) = self.pages.insert(key.to_vec(), bytes) {
            self.bytes -= old.len();
        }
        self.order.push_back(key.to_vec());
        while self.bytes > cap || self.order.len() > 2 * self.pages.len() + 64 {
            let Some(k) = self.order.pop_front() else {
                break;
            };
            if let Some(old) = self.pages.remove(&k) {
                self.bytes -= old.len();
            }
        }
    }
}

impl Recent {
    /// Bytes of pages kept at most: an epoch of 10 000 random keys touches
    /// ~8 000 pages of ~1.5 KiB.
    pub const CAP_BYTES: usize = 16 * 1024 * 1024;

    /// The current generation, to pass to [`Recent::offer`].
    pub fn generation(&self) -> u64 {
        self.inner.lock().generation
    }

    /// A page's bytes, if kept.
    pub fn get(&self, key: &[u8]) -> Option<IVec> {
        self.inner.lock().pages.get(key).cloned()
    }

    /// Keeps a page read from sled by a lookup that began at
    /// `generation`, unless an apply began since.
    pub fn offer(&self, generation: u64, key: &[u8], bytes: IVec) {
        let mut inner = self.inner.lock();
        if inner.generation == generation {
            inner.put(key, bytes, Self::CAP_BYTES);
        }
    }

    /// An apply is about to change pages: lookups running now must not
    /// offer what they read.
    pub fn begin_write(&self) {
        self.inner.lock().generation += 1;
    }

    /// Keeps a page an apply has just written.
    pub fn put(&self, key: &[u8], bytes: IVec) {
        self.inner.lock().put(key, bytes, Self::CAP_BYTES);
    }

    /// Forgets every page (a failed apply, a reopened store).
    pub fn clear(&self) {
        let mut inner = self.inner.lock();
        inner.generation += 1;
        inner.pages.clear();
        inner.order.clear();
        inner.bytes = 0;
    }

    /// Bytes kept.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.inner.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offer_from_before_an_apply_began_is_refused() {
        let r = Recent::default();
        let g = r.generation();
        r.offer(g, b"a", IVec::from(&b"old a"[..]));
        assert_eq!(r.get(b"a").as_deref(), Some(&b"old a"[..]));
        // A lookup starts, an apply begins and writes b, then the lookup
        // offers the b it read before: refused.
        let g = r.generation();
        r.begin_write();
        r.put(b"b", IVec::from(&b"new b"[..]));
        r.offer(g, b"b", IVec::from(&b"old b"[..]));
        assert_eq!(r.get(b"b").as_deref(), Some(&b"new b"[..]));
        r.offer(g, b"c", IVec::from(&b"c"[..]));
        assert_eq!(r.get(b"c"), None);
        r.clear();
        assert_eq!(r.get(b"a"), None);
        assert_eq!(r.bytes(), 0);
    }

    #[test]
    fn pages_beyond_the_cap_go_first_in_first_out() {
        let r = Recent::default();
        let page = IVec::from(vec![7u8; 1024 * 1024]);
        for i in 0..20u8 {
            r.put(&[i], page.clone());
            // Re-putting a key replaces it without counting it twice.
            r.put(&[i], page.clone());
        }
        assert!(r.bytes() <= Recent::CAP_BYTES);
        assert_eq!(r.bytes(), 16 * 1024 * 1024);
        assert_eq!(r.get(&[0]), None, "the oldest went");
        assert!(r.get(&[19]).is_some(), "the newest stays");
    }
}
