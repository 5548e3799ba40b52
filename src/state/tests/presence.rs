//! The presence filter seen from the store: lookups of keys never stored
//! read no page, and no stored key is ever filtered out.

use super::*;

/// Lookups of UUID keys never stored read no range page (the presence
/// filter answers), whether the filter was built by writes or by reading
/// the pages at open, while every stored key is still found — also after
/// the filter grew new layers (more keys than its first layer holds).
#[test]
fn lookups_of_keys_never_stored_read_no_page() {
    let dir = tempfile::tempdir().unwrap();
    let stored: Vec<StateKey> = (0..90_000u64)
        .map(|n| key("transactions", &uuid_key(n)))
        .collect();
    let fresh: Vec<StateKey> = (1_000_000..1_005_000u64)
        .map(|n| key("transactions", &uuid_key(n)))
        .collect();
    let check = |store: &SledStore, when: &str| {
        let before = store.range_page_reads();
        let refs: Vec<&StateKey> = fresh.iter().collect();
        assert!(store.get_keys(&refs).unwrap().iter().all(Option::is_none));
        let reads = store.range_page_reads() - before;
        // 1 % false positives per layer, a few layers.
        assert!(
            reads < 250,
            "{when}: {reads} pages read to look up 5 000 keys never stored"
        );
        let refs: Vec<&StateKey> = stored.iter().collect();
        let states = store.get_keys(&refs).unwrap();
        for (k, s) in stored.iter().zip(states) {
            assert!(s.is_some(), "{when}: {} stored but not found", k.source_key);
        }
        assert!(
            store.range_page_reads() > before + 1000,
            "stored keys read pages"
        );
    };
    {
        let store = paged(dir.path());
        for chunk in stored.chunks(10_000) {
            let writes = accept_all(chunk, 1, Some("image"));
            store.apply(&writes).unwrap();
        }
        store.flush().unwrap();
        check(&store, "after the writes");
    }
    let store = paged(dir.path());
    check(&store, "after reopening");
}

/// A failed apply drops the directories and their filters; read again
/// from disk, they still find every key stored before.
#[test]
fn the_filter_read_again_after_a_reset_finds_every_stored_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = paged(dir.path());
    let keys: Vec<StateKey> = (0..3_000u64)
        .map(|n| key("customers", &uuid_key(n)))
        .collect();
    let writes = accept_all(&keys, 4, None);
    store.apply(&writes).unwrap();
    store.forget_directories();
    let refs: Vec<&StateKey> = keys.iter().collect();
    let states = store.get_keys(&refs).unwrap();
    assert!(states
        .iter()
        .all(|s| s.as_ref().map(|s| s.fingerprint) == Some(4)));
}
