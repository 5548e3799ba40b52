//! The memory a restart's first lookup takes to read a mapping's range
//! pages (its directory load), measured by a counting allocator — which is
//! why this test is a binary of its own: nothing else allocates while it
//! measures.
//!
//! sled 0.34 evicts nodes only once 64 accesses of one of its 256 cache
//! shards have queued; a plain scan counts one access per node, so a scan
//! of a few thousand nodes kept every node it read until later reads
//! (the e2e bench's partner burst: +160 MiB RSS in the first second after
//! a restart). The store's scans now count an access per entry.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use cobi_sync::state::{KeyState, KeyStatus, SledStore, StateKey, StateStore, Write};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(layout.size(), Relaxed) + layout.size();
        PEAK.fetch_max(now, Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= layout.size() {
            let now =
                CURRENT.fetch_add(new_size - layout.size(), Relaxed) + new_size - layout.size();
            PEAK.fetch_max(now, Relaxed);
        } else {
            CURRENT.fetch_sub(layout.size() - new_size, Relaxed);
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Keys written, each with an image big enough to fill most of a range
/// page: ~60 000 pages, ~4 000 sled nodes (of 16 pages), ~90 MB. With
/// paced scans the load holds ~1 300 nodes at most (256 shards × 64
/// accesses, ~13 accesses a node); without, every node it read.
const KEYS: u64 = 60_000;

/// Bytes of each key's delete image.
const IMAGE: usize = 1_500;

fn key(i: u64) -> StateKey {
    // Random-looking, well-spread UUIDs (a partner's keys).
    let n = u128::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835);
    StateKey {
        ty: cobi_sync::sink::type_id("transactions").expect("a Cobi type"),
        mapping: Arc::from("transactions/memory"),
        source_key: uuid::Uuid::from_u128(n).to_string(),
    }
}

#[test]
fn a_restarts_directory_load_does_not_keep_the_pages_it_reads() {
    let dir = tempfile::tempdir().unwrap();
    {
        // Drained at every apply: the keys go to their pages at once.
        let store = SledStore::open_draining_at(dir.path(), 0).unwrap();
        let image = Bytes::from(vec![7u8; IMAGE]);
        // In key order: each page is written once (the log stays small).
        let mut keys: Vec<(StateKey, u64)> = (0..KEYS).map(|i| (key(i), i)).collect();
        keys.sort_by(|a, b| a.0.source_key.cmp(&b.0.source_key));
        for chunk in keys.chunks(10_000) {
            let writes: Vec<Write> = chunk
                .iter()
                .map(|(k, i)| {
                    Write::Key(
                        k.clone(),
                        KeyState {
                            status: KeyStatus::Accepted,
                            fingerprint: *i,
                            delete_image: Some(image.clone()),
                        },
                    )
                })
                .collect();
            store.apply(&writes).unwrap();
        }
        store.flush().unwrap();
    }
    let pages = KEYS as usize * IMAGE;
    let store = SledStore::open(dir.path()).unwrap();
    let before = CURRENT.load(Relaxed);
    PEAK.store(before, Relaxed);
    // The first lookup of the mapping reads its directory (every page).
    let k = key(17);
    let got = store.get_keys(&[&k]).unwrap();
    assert_eq!(got[0].as_ref().map(|s| s.fingerprint), Some(17));
    let peak = PEAK.load(Relaxed) - before;
    eprintln!(
        "state {:.1} MB; the directory load's peak {:.1} MB above the open store",
        pages as f64 / 1e6,
        peak as f64 / 1e6
    );
    // The load read the pages (else the bound below says nothing)...
    assert!(
        peak > pages / 20,
        "the directory load allocated only {peak} bytes: did it read the pages?"
    );
    // ...and, without the store's paced scans, held every node it read
    // (~the size of the pages); with them, a bounded part.
    assert!(
        peak < pages / 2,
        "the directory load held {peak} bytes for {pages} bytes of pages"
    );
}
