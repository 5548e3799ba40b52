//! Range keys held back in the journal: lookups and scans see them, they
//! survive a reopen and a crash at any point of a drain, and a burst's
//! keys share page writes.

use std::collections::BTreeMap;

use super::*;

fn dead(fp: u64) -> KeyState {
    KeyState {
        status: KeyStatus::DeadLettered,
        fingerprint: fp,
        delete_image: None,
    }
}

/// What the store must hold: source key → state, kept by the test itself.
type Model = BTreeMap<String, KeyState>;

/// The store's view of every key of `customers` against the model: each
/// key's lookup, and the listing.
fn check(store: &SledStore, model: &Model, also_absent: &[String], when: &str) {
    let k = key("customers", "x");
    let listed = all_states(store, k.ty, &k.mapping);
    let want: Vec<(String, KeyState)> = model.iter().map(|(k, s)| (k.clone(), s.clone())).collect();
    assert_eq!(listed.len(), want.len(), "{when}: keys listed");
    assert!(
        listed == want,
        "{when}: listed states differ from the model"
    );
    let absent: Vec<StateKey> = also_absent.iter().map(|sk| key("customers", sk)).collect();
    let refs: Vec<&StateKey> = absent.iter().collect();
    for (s, k) in store.get_keys(&refs).unwrap().iter().zip(&absent) {
        assert_eq!(*s, None, "{when}: {} was removed", k.source_key);
    }
}

/// Writes UUID keys 0..3000 to their pages, then updates, removes,
/// dead-letters and adds keys with the journal holding them back: every
/// tenth key of a range (a page or two each: too few to be written at
/// once, [`journal::write_at_once`]), then a key held back again and a
/// few new text keys (fewer than crowd a page).
fn stage(dir: &std::path::Path) -> (Model, Vec<String>) {
    let mut model = Model::new();
    let first: Vec<StateKey> = (0..3000).map(|n| key("customers", &uuid_key(n))).collect();
    {
        let s = paged(dir);
        s.apply(&accept_all(&first, 1, Some("old"))).unwrap();
        s.flush().unwrap();
    }
    for k in &first {
        model.insert(k.source_key.clone(), accepted(1, Some("old")));
    }
    let s = SledStore::open(dir).unwrap();
    let mut writes = Vec::new();
    let mut removed = Vec::new();
    for n in (0..1000u64).step_by(10) {
        let k = key("customers", &uuid_key(n));
        writes.push(Write::Key(k.clone(), accepted(2, Some("new"))));
        model.insert(k.source_key, accepted(2, Some("new")));
    }
    for n in (1000..1500u64).step_by(10) {
        let k = key("customers", &uuid_key(n));
        writes.push(Write::RemoveKey(k.clone()));
        model.remove(&k.source_key);
        removed.push(k.source_key);
    }
    for n in (1500..1600u64).step_by(10) {
        let k = key("customers", &uuid_key(n));
        writes.push(Write::Key(k.clone(), dead(3)));
        model.insert(k.source_key, dead(3));
    }
    s.apply(&writes).unwrap();
    assert_eq!(s.held_back(), 160, "scattered writes are held back");
    // A second apply: a key the first apply held back (held back again),
    // new text keys, one of them removed again (7 writes in one page).
    let mut writes = Vec::new();
    let k = key("customers", &uuid_key(0));
    writes.push(Write::Key(k.clone(), accepted(5, Some("newer"))));
    model.insert(k.source_key, accepted(5, Some("newer")));
    for n in 0..6u64 {
        let k = key("customers", &format!("c-{n}"));
        writes.push(Write::Key(k.clone(), accepted(4, None)));
        model.insert(k.source_key, accepted(4, None));
    }
    writes.push(Write::RemoveKey(key("customers", "c-3")));
    model.remove("c-3");
    removed.push("c-3".into());
    s.apply(&writes).unwrap();
    assert_eq!(s.held_back(), 166, "the second apply's keys are held back");
    s.flush().unwrap();
    (model, removed)
}

#[test]
fn held_back_keys_are_seen_by_lookups_and_scans_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (model, removed) = stage(dir.path());
    {
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.held_back(), 166, "read back from the journal");
        check(&s, &model, &removed, "reopened, held back");
    }
    // A store draining at every apply writes them to their pages.
    let s = paged(dir.path());
    s.apply(&[Write::Key(key("shops", "1"), accepted(1, None))])
        .unwrap();
    assert_eq!(s.held_back(), 0);
    assert_eq!(
        std::fs::metadata(s.journal_path()).unwrap().len(),
        0,
        "the journal is emptied"
    );
    check(&s, &model, &removed, "drained");
    s.flush().unwrap();
    drop(s);
    let s = SledStore::open(dir.path()).unwrap();
    check(&s, &model, &removed, "drained, reopened");
}

#[test]
fn a_crash_between_a_drain_and_the_journal_emptied_loses_nothing() {
    // A drain writes pages, flushes them, then empties the journal: a crash
    // in between leaves the whole journal over drained pages.
    let dir = tempfile::tempdir().unwrap();
    let (model, removed) = stage(dir.path());
    let journal = {
        let s = SledStore::open(dir.path()).unwrap();
        std::fs::read(s.journal_path()).unwrap()
    };
    assert!(!journal.is_empty());
    {
        let s = paged(dir.path());
        s.apply(&[Write::Key(key("shops", "1"), accepted(1, None))])
            .unwrap();
        s.flush().unwrap();
        assert_eq!(s.held_back(), 0, "drained");
        std::fs::write(s.journal_path(), &journal).unwrap();
    }
    let s = SledStore::open(dir.path()).unwrap();
    assert_eq!(s.held_back(), 166);
    check(&s, &model, &removed, "journal left over drained pages");
    drop(s);
    let s = paged(dir.path());
    s.apply(&[Write::Key(key("shops", "2"), accepted(1, None))])
        .unwrap();
    check(&s, &model, &removed, "drained again");
}

#[test]
fn keys_in_key_order_are_written_to_their_pages_at_once() {
    // A snapshot of a UUID-keyed table read in key order: each apply's
    // keys follow the last apply's, crowding the mapping's last page.
    // Held back, they were copied to the journal, sorted and written
    // again at the drain; they now skip it — with the product's drain
    // threshold, nothing is held back.
    let dir = tempfile::tempdir().unwrap();
    let mut codes: Vec<String> = (0..6_000).map(uuid_key).collect();
    codes.sort();
    let keys: Vec<StateKey> = codes.iter().map(|c| key("customers", c)).collect();
    let s = SledStore::open(dir.path()).unwrap();
    for chunk in keys.chunks(1_000) {
        s.apply(&accept_all(chunk, 1, Some("image"))).unwrap();
        assert_eq!(s.held_back(), 0, "a key-ordered apply is not held back");
    }
    assert_eq!(std::fs::metadata(s.journal_path()).unwrap().len(), 0);
    s.flush().unwrap();
    drop(s);
    let s = SledStore::open(dir.path()).unwrap();
    let k = key("customers", "x");
    let listed = all_states(&s, k.ty, &k.mapping);
    let want: Vec<(String, KeyState)> = codes
        .iter()
        .map(|c| (c.clone(), accepted(1, Some("image"))))
        .collect();
    assert!(listed == want, "every key read back from its page");
}

#[test]
fn a_crowded_apply_keeps_each_keys_last_write_and_held_keys_held() {
    // Keys held back (a removal and a write), then one apply that crowds
    // the mapping's last page with new keys — two of them written twice —
    // and writes the held keys again: the new keys go to their pages, each
    // with its last write; the held keys stay held with their new states.
    let dir = tempfile::tempdir().unwrap();
    let base: Vec<StateKey> = (0..3000).map(|n| key("customers", &uuid_key(n))).collect();
    paged(dir.path())
        .apply(&accept_all(&base, 1, None))
        .unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    let (k5, k6) = (base[5].clone(), base[6].clone());
    s.apply(&[
        Write::RemoveKey(k5.clone()),
        Write::Key(k6.clone(), accepted(2, None)),
    ])
    .unwrap();
    assert_eq!(s.held_back(), 2, "two scattered writes are held back");
    // Above every key so far: all in the last page.
    let new = |n: u64| key("customers", &format!("ffffffff-ffff-ffff-ffff-{n:012}"));
    let mut writes = vec![
        Write::Key(new(1), accepted(1, None)),
        Write::Key(new(1), accepted(2, None)),
        Write::Key(new(2), accepted(1, None)),
        Write::RemoveKey(new(2)),
        Write::Key(k5.clone(), accepted(9, None)),
        Write::Key(k6.clone(), accepted(9, None)),
    ];
    // 41 writes in 3 pages (the last, k5's, k6's): they crowd them.
    writes.extend((3..40).map(|n| Write::Key(new(n), accepted(1, None))));
    s.apply(&writes).unwrap();
    assert_eq!(s.held_back(), 2, "only the held keys are held back");
    let want = |s: &SledStore, when: &str| {
        let keys = [new(1), new(2), new(3), k5.clone(), k6.clone()];
        let refs: Vec<&StateKey> = keys.iter().collect();
        let fps: Vec<Option<u64>> = s
            .get_keys(&refs)
            .unwrap()
            .into_iter()
            .map(|st| st.map(|st| st.fingerprint))
            .collect();
        assert_eq!(fps, [Some(2), None, Some(1), Some(9), Some(9)], "{when}");
    };
    want(&s, "applied");
    s.flush().unwrap();
    drop(s);
    let s = paged(dir.path());
    s.apply(&[Write::Key(key("shops", "1"), accepted(1, None))])
        .unwrap();
    assert_eq!(s.held_back(), 0);
    want(&s, "reopened and drained");
}

#[test]
fn a_burst_of_random_keys_shares_page_writes_across_applies() {
    // 20 000 UUID keys in pages, then 20 applies of 500 new random keys:
    // written at each apply, nearly every apply rewrites most pages; held
    // back and drained once, each page is rewritten about once.
    let base: Vec<StateKey> = (0..20_000)
        .map(|n| key("customers", &uuid_key(n)))
        .collect();
    let burst: Vec<Vec<StateKey>> = (0..20u64)
        .map(|a| {
            (0..500)
                .map(|n| key("customers", &uuid_key(1_000_000 + a * 1000 + n)))
                .collect()
        })
        .collect();
    let mut writes_and_states = Vec::new();
    for drain in [0, 4 * 1024 * 1024] {
        let dir = tempfile::tempdir().unwrap();
        paged(dir.path())
            .apply(&accept_all(&base, 1, None))
            .unwrap();
        let s = SledStore::open_draining_at(dir.path(), drain).unwrap();
        for (a, keys) in burst.iter().enumerate() {
            s.apply(&accept_all(keys, a as u64, None)).unwrap();
        }
        let mut written = s.range_page_writes();
        drop(s);
        // Whatever is still held back is drained here.
        let s = paged(dir.path());
        s.apply(&[Write::Key(key("shops", "1"), accepted(1, None))])
            .unwrap();
        written += s.range_page_writes();
        let k = key("customers", "x");
        writes_and_states.push((written, all_states(&s, k.ty, &k.mapping)));
    }
    let (at_each_apply, held_back) = (&writes_and_states[0], &writes_and_states[1]);
    assert!(held_back.1 == at_each_apply.1, "the same states either way");
    assert_eq!(held_back.1.len(), 30_000);
    assert!(
        held_back.0 * 3 < at_each_apply.0,
        "range page writes: {} held back, {} at each apply",
        held_back.0,
        at_each_apply.0
    );
}
