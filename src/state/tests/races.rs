//! Lookups and applies running at the same time lose no write and never
//! read a stored key as absent.

use super::*;

#[test]
fn concurrent_applies_to_one_page_lose_nothing() {
    // Pages written at every apply, and amid drains of held-back keys.
    for drain in [0, 4096] {
        concurrent_applies_to_one_page_lose_nothing_draining_at(drain);
    }
}

fn concurrent_applies_to_one_page_lose_nothing_draining_at(drain: usize) {
    // Pages are read, changed and written back: applies from several
    // threads (the sink's commit, a future admin path) must not lose
    // slots, and readers racing page splits must find every key.
    let dir = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(SledStore::open_draining_at(dir.path(), drain).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                // Thread t owns ids ≡ t (mod 4): every apply touches the
                // same two integer pages as the other threads, and the
                // same hashed pages (which split as they fill).
                for round in 0..50u64 {
                    let writes: Vec<Write> = (0..128u64)
                        .filter(|n| n % 4 == t)
                        .flat_map(|n| {
                            let u = n + 1000 * round;
                            [
                                Write::Key(
                                    key("transactions", &n.to_string()),
                                    accepted(round, None),
                                ),
                                Write::Key(key("transactions", &uuid_key(u)), accepted(u, None)),
                            ]
                        })
                        .collect();
                    s.apply(&writes).unwrap();
                    // What this thread wrote before is there, whatever
                    // the others split meanwhile.
                    let mine: Vec<StateKey> = (0..=round)
                        .flat_map(|r| {
                            (0..128u64)
                                .filter(|n| n % 4 == t)
                                .map(move |n| n + 1000 * r)
                        })
                        .map(|u| key("transactions", &uuid_key(u)))
                        .collect();
                    let refs: Vec<&StateKey> = mine.iter().collect();
                    for (st, k) in s.get_keys(&refs).unwrap().iter().zip(&mine) {
                        assert!(
                            st.is_some(),
                            "thread {t} round {round}: {} lost",
                            k.source_key
                        );
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let k = key("transactions", "1");
    let listed = all_states(s.as_ref(), k.ty, &k.mapping);
    assert_eq!(listed.len(), 128 + 128 * 50);
    assert!(listed
        .iter()
        .filter(|(sk, _)| sk.len() < 4)
        .all(|(_, st)| st.fingerprint == 49));
    assert!(s.range_pages(k.ty, &k.mapping) > 1);
}

#[test]
fn a_lookup_racing_the_regrouping_of_its_page_still_finds_the_images() {
    // A lookup holds a version 3 page it read; an apply converts that page
    // (images into groups, per-slot entries removed) for another key; the
    // lookup then asks for a third key's image: found in its group.
    let dir = tempfile::tempdir().unwrap();
    let s = paged(dir.path());
    let k = |n: u64| key("transactions", &n.to_string());
    let prefix = StateKey::mapping_prefix(k(0).ty, &k(0).mapping);
    let pk = pages::page_key(&prefix, 0);
    let v = v3_page(&[1, 2], &[1, 2]);
    let (keys, images) = (s.keys_tree(), s.images_tree());
    keys.insert(&pk, v).unwrap();
    images
        .insert(pages::image_key(&pk, 1), &b"one"[..])
        .unwrap();
    images
        .insert(pages::image_key(&pk, 2), &b"two"[..])
        .unwrap();
    let dirs = layout::Dirs::default();
    let mut reader = layout::Reader::new(&keys, &images, &dirs);
    assert_eq!(
        reader.get(&prefix, "1", None).unwrap(),
        Some(accepted(1, Some("one")))
    );
    s.apply(&[Write::Key(k(5), accepted(5, None))]).unwrap();
    assert_eq!(images.get(pages::image_key(&pk, 2)).unwrap(), None);
    assert_eq!(
        reader.get(&prefix, "2", None).unwrap(),
        Some(accepted(2, Some("two"))),
        "the page the lookup holds is version 3, its entries are gone"
    );
}

/// Lookups racing applies (the sink's pipeline: epoch N+1 is looked up
/// while epoch N is applied, pages split meanwhile) lose no write: every
/// key ends with the state its last apply gave it, for UUID (range page)
/// and integer keys alike; and a racing lookup never reads a key older
/// than it read it before (held-back keys drained meanwhile included).
#[test]
fn applies_racing_lookups_keep_every_write() {
    for drain in [0, 4096] {
        applies_racing_lookups_keep_every_write_draining_at(drain);
    }
}

fn applies_racing_lookups_keep_every_write_draining_at(drain: usize) {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(SledStore::open_draining_at(dir.path(), drain).unwrap());
    let keys: Vec<StateKey> = (0..150u64)
        .map(|n| key("customers", &uuid_key(n)))
        .chain((0..150u64).map(|n| key("shops", &n.to_string())))
        .collect();
    let image = "x".repeat(60);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (store, keys, done) = (store.clone(), keys.clone(), done.clone());
        std::thread::spawn(move || {
            let refs: Vec<&StateKey> = keys.iter().collect();
            let mut lookups = 0u64;
            let mut seen = vec![0u64; keys.len()];
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let states = store.get_keys(&refs).unwrap();
                for ((s, seen), k) in states.iter().zip(&mut seen).zip(&keys) {
                    let now = s.as_ref().map_or(0, |s| s.fingerprint);
                    assert!(
                        now >= *seen,
                        "drain at {drain}: {} read {now} after {seen}",
                        k.source_key
                    );
                    *seen = now;
                }
                lookups += 1;
            }
            lookups
        })
    };
    let mut last = std::collections::HashMap::new();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for round in 1..=400u64 {
        let mut writes = Vec::new();
        for k in &keys {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if rng % 5 == 0 {
                writes.push(Write::Key(k.clone(), accepted(round, Some(&image))));
                last.insert(k.clone(), round);
            }
        }
        // A lookup before each apply, as the sink does.
        let refs: Vec<&StateKey> = keys.iter().step_by(3).collect();
        store.get_keys(&refs).unwrap();
        store.apply(&writes).unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let lookups = reader.join().unwrap();
    assert!(lookups > 10, "the lookups raced the applies ({lookups})");
    let refs: Vec<&StateKey> = keys.iter().collect();
    let states = store.get_keys(&refs).unwrap();
    for (k, s) in keys.iter().zip(states) {
        let want = last.get(k).copied();
        assert_eq!(s.map(|s| s.fingerprint), want, "{}", k.source_key);
    }
}

/// Lookups racing the reset a failed apply does (directories and filters
/// dropped, read again by the next user) still find every stored key:
/// directories are loaded and read under one lock.
#[test]
fn lookups_racing_a_directory_reset_find_every_stored_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(paged(dir.path()));
    let keys: Vec<StateKey> = (0..200u64)
        .map(|n| key("customers", &uuid_key(n)))
        .collect();
    let writes = accept_all(&keys, 9, None);
    store.apply(&writes).unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let resetter = {
        let (store, done) = (store.clone(), done.clone());
        std::thread::spawn(move || {
            let mut resets = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                store.forget_directories();
                resets += 1;
                std::thread::yield_now();
            }
            resets
        })
    };
    let refs: Vec<&StateKey> = keys.iter().collect();
    for round in 0..3000 {
        let states = store.get_keys(&refs).unwrap();
        let missing = states.iter().filter(|s| s.is_none()).count();
        assert_eq!(missing, 0, "round {round}: stored keys read as absent");
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        resetter.join().unwrap() > 100,
        "the resets raced the lookups"
    );
}
