//! Which keys a mapping's range pages may hold: a Bloom filter over their
//! key codes, so that a lookup of a key never stored (every row of an
//! insert burst) reads no page.
//!
//! Without it, each new random key (a UUID) costs a sled read of the page
//! its range falls in — with a working set larger than sled's cache, a
//! node pulled back from the log — only to learn that the key is absent.
//!
//! The filter answers "maybe" for every code added and, rarely, for one
//! that was not (then the page is read, as before); it never answers "no"
//! for a code added. It is built when a mapping's directory is loaded
//! (every slot of every range page, see [`super::layout::Dirs::load`]) and
//! a code is added when a write gives its key a state, before the page is
//! written, so a lookup that misses the filter cannot miss a stored key.
//!
//! The number of keys is not known in advance and grows, so the filter is
//! a list of layers, each four times larger than the one before, a new
//! one started when the newest is full: a key is present if any layer
//! says so. Each layer is sized for a 1 % false-positive rate at its
//! capacity (~10 bits a key: ~1.2 MB per million keys of capacity). Just
//! after a layer is added, the capacity is up to ~4× the keys held
//! (~5 MB per million keys); at most, with ~4 layers full, false
//! positives approach 4 %.

use std::sync::atomic::{AtomicUsize, Ordering};

use fastbloom::AtomicBloomFilter;

/// Keys the first layer is sized for.
const FIRST: usize = 64 * 1024;

/// False-positive rate of each layer at its capacity.
const FALSE_POSITIVES: f64 = 0.01;

/// How much larger each layer is than the one before.
const GROWTH: usize = 4;

/// A growing Bloom filter over key codes (see the module doc).
pub struct Presence {
    /// Oldest first; codes are added to the last.
    layers: Vec<AtomicBloomFilter>,
    /// Keys the last layer is sized for.
    capacity: usize,
    /// Keys added to the last layer.
    added: AtomicUsize,
}

impl Default for Presence {
    fn default() -> Self {
        Presence {
            layers: vec![layer(FIRST)],
            capacity: FIRST,
            added: AtomicUsize::new(0),
        }
    }
}

fn layer(capacity: usize) -> AtomicBloomFilter {
    AtomicBloomFilter::with_false_pos(FALSE_POSITIVES).expected_items(capacity)
}

fn hash(code: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(code)
}

impl Presence {
    /// Whether a key with this code may have been added (`false`: it
    /// certainly was not).
    pub fn may_hold(&self, code: &[u8]) -> bool {
        self.holds(hash(code))
    }

    fn holds(&self, h: u64) -> bool {
        self.layers.iter().any(|l| l.contains_hash(h))
    }

    /// Adds a key's code. Takes `&self` (lookups read concurrently); call
    /// [`Presence::grow`] when [`Presence::is_full`].
    pub fn add(&self, code: &[u8]) {
        let h = hash(code);
        if self.holds(h) {
            return;
        }
        let last = self.layers.last().expect("at least one layer");
        last.insert_hash(h);
        self.added.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds a key's code, first starting a new layer if the newest is full
    /// (when nothing reads the filter yet: loading it).
    pub fn add_growing(&mut self, code: &[u8]) {
        if self.is_full() {
            self.grow();
        }
        self.add(code);
    }

    /// Whether the newest layer holds as many keys as it was sized for.
    pub fn is_full(&self) -> bool {
        self.added.load(Ordering::Relaxed) >= self.capacity
    }

    /// Starts a new, larger layer (the older ones keep answering).
    pub fn grow(&mut self) {
        self.capacity = self.capacity.saturating_mul(GROWTH);
        self.layers.push(layer(self.capacity));
        self.added.store(0, Ordering::Relaxed);
    }

    /// Layers so far (tests).
    #[cfg(test)]
    pub fn layers(&self) -> usize {
        self.layers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(i: u64) -> Vec<u8> {
        let mut c = vec![0x03];
        c.extend_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes());
        c.extend_from_slice(&i.to_be_bytes());
        c
    }

    /// Adds `n` codes the way the store does, growing when full.
    fn filled(n: u64) -> Presence {
        let mut p = Presence::default();
        for i in 0..n {
            p.add_growing(&code(i));
        }
        p
    }

    #[test]
    fn every_added_code_is_held_across_layers() {
        let p = filled(400_000);
        assert!(p.layers() >= 3, "400 000 keys span several layers");
        for i in 0..400_000 {
            assert!(p.may_hold(&code(i)), "code {i} added but not held");
        }
    }

    #[test]
    fn codes_never_added_are_mostly_told_absent() {
        let p = filled(400_000);
        let false_positives = (1_000_000..1_100_000)
            .filter(|&i| p.may_hold(&code(i)))
            .count();
        // 1 % per layer at capacity, at most a few layers.
        assert!(
            false_positives < 4_000,
            "{false_positives} of 100 000 absent codes said present"
        );
    }

    #[test]
    fn an_empty_filter_holds_nothing_and_readding_does_not_count() {
        let p = Presence::default();
        assert!(!p.may_hold(&code(7)));
        p.add(&code(7));
        p.add(&code(7));
        assert_eq!(p.added.load(Ordering::Relaxed), 1);
        assert!(p.may_hold(&code(7)));
    }
}
