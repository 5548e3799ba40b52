//! The state store contract, run against both implementations, and the
//! crash-durability proof for sled.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use super::*;
use super::{keycode, ranges};
use crate::mapping::value::oid;

fn key(ty: &str, sk: &str) -> StateKey {
    StateKey {
        ty: schema().type_id(ty).unwrap(),
        mapping: format!("{ty}/public.t").into(),
        source_key: sk.into(),
    }
}

fn accepted(fp: u64, image: Option<&str>) -> KeyState {
    KeyState {
        status: KeyStatus::Accepted,
        fingerprint: fp,
        delete_image: image.map(|s| bytes::Bytes::copy_from_slice(s.as_bytes())),
    }
}

/// Every key of a mapping with its full state, sorted (keys from
/// `keys_of`, states from `get_keys`, which must agree on statuses).
fn all_states(store: &dyn StateStore, ty: TypeId, mapping: &str) -> Vec<(String, KeyState)> {
    let mut listed = store.keys_of(ty, mapping).unwrap();
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    let keys: Vec<StateKey> = listed
        .iter()
        .map(|(k, _)| StateKey {
            ty,
            mapping: mapping.into(),
            source_key: k.clone(),
        })
        .collect();
    let refs: Vec<&StateKey> = keys.iter().collect();
    let states = store.get_keys(&refs).unwrap();
    listed
        .into_iter()
        .zip(states)
        .map(|((k, status), st)| {
            let st = st.unwrap_or_else(|| panic!("{k} is listed but has no state"));
            assert_eq!(st.status, status, "{k}");
            (k, st)
        })
        .collect()
}

fn uuid_key(n: u64) -> String {
    uuid::Uuid::from_u64_pair(n.wrapping_mul(0x9e37_79b9_7f4a_7c15), n).to_string()
}

fn int_pos(v: i64) -> Position {
    Position {
        cursor: None,
        key: vec![CursorValue {
            oid: oid::INT8,
            text: Some(v.to_string()),
        }],
    }
}

fn contract(store: &dyn StateStore) {
    // Keys.
    let a = key("shops", "1");
    let b = key("shops", "2");
    let c = key("branches", "1");
    assert_eq!(store.get_key(&a).unwrap(), None);
    store
        .apply(&[
            Write::Key(a.clone(), accepted(11, Some("{\"a\":1}"))),
            Write::Key(b.clone(), accepted(22, None)),
            Write::Key(c.clone(), accepted(33, None)),
        ])
        .unwrap();
    store.flush().unwrap();
    assert_eq!(
        store.get_key(&a).unwrap(),
        Some(accepted(11, Some("{\"a\":1}")))
    );
    let mut shop_keys = store.keys_of(a.ty, &a.mapping).unwrap();
    shop_keys.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        shop_keys,
        [
            ("1".to_string(), KeyStatus::Accepted),
            ("2".to_string(), KeyStatus::Accepted)
        ]
    );
    store.apply(&[Write::RemoveKey(b.clone())]).unwrap();
    assert_eq!(store.get_key(&b).unwrap(), None);

    // Dead letters.
    let dl = DeadLetter {
        ty: "branches".into(),
        mapping: c.mapping.to_string(),
        cobi_key: Some("k".into()),
        source_key: "1".into(),
        record: "{}".into(),
        reason: "region: must be two upper-case letters".into(),
        attempts: 1,
        first_at: "2024-01-01T00:00:00Z".into(),
        last_at: "2024-01-01T00:00:00Z".into(),
    };
    store
        .apply(&[Write::DeadLetter(c.clone(), Box::new(dl.clone()))])
        .unwrap();
    assert_eq!(store.dead_letters(None).unwrap(), vec![dl.clone()]);
    assert_eq!(store.dead_letters(Some(a.ty)).unwrap(), vec![]);
    assert_eq!(store.dead_letters(Some(c.ty)).unwrap(), vec![dl.clone()]);
    assert_eq!(store.dead_letter(&c).unwrap(), Some(dl.clone()));
    assert_eq!(store.dead_letter_counts().unwrap().get(&c.ty), Some(&1));
    assert_eq!(dl.key(), Some(c.clone()));
    store.apply(&[Write::RemoveDeadLetter(c.clone())]).unwrap();
    assert!(store.dead_letters(None).unwrap().is_empty());

    // Checkpoints never move backwards.
    let rep = |lsn: u64, t: TableSnapshot| {
        let mut tables = BTreeMap::new();
        tables.insert("shops/public.t".to_string(), t);
        Checkpoint::Replication(ReplicationCheckpoint { lsn, tables })
    };
    store
        .apply(&[Write::Checkpoint(rep(
            100,
            TableSnapshot::InProgress(int_pos(50)),
        ))])
        .unwrap();
    store
        .apply(&[Write::Checkpoint(rep(90, TableSnapshot::Done))])
        .unwrap();
    assert_eq!(
        replication_checkpoint(store).unwrap().unwrap().lsn,
        100,
        "an older LSN must be ignored"
    );
    store
        .apply(&[Write::Checkpoint(rep(
            120,
            TableSnapshot::InProgress(int_pos(9)),
        ))])
        .unwrap();
    assert_eq!(
        replication_checkpoint(store).unwrap().unwrap().lsn,
        100,
        "snapshot progress 9 < 50 must be ignored"
    );
    store
        .apply(&[Write::Checkpoint(rep(
            120,
            TableSnapshot::InProgress(int_pos(500)),
        ))])
        .unwrap();
    assert_eq!(replication_checkpoint(store).unwrap().unwrap().lsn, 120);
    store
        .apply(&[Write::Checkpoint(rep(130, TableSnapshot::Done))])
        .unwrap();
    let cp = replication_checkpoint(store).unwrap().unwrap();
    assert_eq!(cp.tables["shops/public.t"], TableSnapshot::Done);

    let cursor = |ts: &str, k: i64| Checkpoint::PollCursor {
        mapping: "shops/public.t".into(),
        position: Position {
            cursor: Some(CursorValue {
                oid: oid::TIMESTAMPTZ,
                text: Some(ts.into()),
            }),
            key: int_pos(k).key,
        },
    };
    store
        .apply(&[Write::Checkpoint(cursor("2024-01-02 00:00:00+00", 5))])
        .unwrap();
    store
        .apply(&[Write::Checkpoint(cursor("2024-01-01 23:00:00+00", 99))])
        .unwrap();
    store
        .apply(&[Write::Checkpoint(cursor("2024-01-02 00:00:00+00", 4))])
        .unwrap();
    assert_eq!(
        poll_cursor(store, "shops/public.t").unwrap().unwrap().key[0]
            .text
            .as_deref(),
        Some("5")
    );
    store
        .apply(&[Write::Checkpoint(cursor("2024-01-02 00:00:00+00", 10))])
        .unwrap();
    assert_eq!(
        poll_cursor(store, "shops/public.t").unwrap().unwrap().key[0]
            .text
            .as_deref(),
        Some("10"),
        "key 10 > 5 at the same cursor (numerically, not as text)"
    );
    assert_eq!(store.checkpoints().unwrap().len(), 2);
    store.remove_checkpoint("replication").unwrap();
    assert_eq!(replication_checkpoint(store).unwrap(), None);

    // Stats.
    let st = TypeStats {
        read: 3,
        sent: 2,
        last_success: Some("2024-01-01T00:00:00Z".into()),
    };
    store.apply(&[Write::Stats(a.ty, st.clone())]).unwrap();
    assert_eq!(store.stats().unwrap().get(&a.ty), Some(&st));
}

/// Integer keys (integer pages in the sled store), UUID, text and
/// composite keys (hashed pages), delete images coming and going: every
/// store must answer like a plain map of keys.
fn key_forms_contract(store: &dyn StateStore) {
    let k = |n: &str| key("transactions", n);
    let fp = |n: u64, round: u64| n * 1000 + round;
    let (ty, mapping) = (k("1").ty, k("1").mapping.clone());
    // 0..200 spans four integer pages; "007" and "7" are different keys.
    let mut writes: Vec<Write> = (0..200u64)
        .map(|n| Write::Key(k(&n.to_string()), accepted(fp(n, 1), None)))
        .collect();
    writes.push(Write::Key(k("007"), accepted(7007, None)));
    writes.push(Write::Key(k("18446744073709551615"), accepted(42, None)));
    // 600 UUID keys: several hashed pages (a split on the way).
    writes.extend((0..600u64).map(|n| Write::Key(k(&uuid_key(n)), accepted(fp(n, 1), None))));
    // Text and composite keys, with and without images.
    for (sk, fp) in [
        ("CUST-0001", 1u64),
        ("", 2),
        ("a|b", 3),
        ("a\\|b", 4),
        ("\\N|7", 5),
        ("550e8400-e29b-41d4-a716-446655440000|12", 6),
        ("Zoë", 7),
    ] {
        writes.push(Write::Key(k(sk), accepted(fp, Some("img"))));
    }
    store.apply(&writes).unwrap();
    store.flush().unwrap();
    let all: Vec<StateKey> = (0..200u64).map(|n| k(&n.to_string())).collect();
    let refs: Vec<&StateKey> = all.iter().collect();
    let got = store.get_keys(&refs).unwrap();
    for (n, g) in got.iter().enumerate() {
        assert_eq!(g, &Some(accepted(fp(n as u64, 1), None)), "key {n}");
    }
    let uuids: Vec<StateKey> = (0..600u64).map(|n| k(&uuid_key(n))).collect();
    let refs: Vec<&StateKey> = uuids.iter().collect();
    for (n, g) in store.get_keys(&refs).unwrap().iter().enumerate() {
        assert_eq!(g, &Some(accepted(fp(n as u64, 1), None)), "uuid {n}");
    }
    assert_eq!(
        store.get_key(&k("7")).unwrap(),
        Some(accepted(fp(7, 1), None))
    );
    assert_eq!(
        store.get_key(&k("007")).unwrap(),
        Some(accepted(7007, None))
    );
    assert_eq!(
        store.get_key(&k("a\\|b")).unwrap(),
        Some(accepted(4, Some("img")))
    );
    assert_eq!(
        store.get_key(&k("a|b")).unwrap(),
        Some(accepted(3, Some("img")))
    );
    assert_eq!(
        store.get_key(&k("")).unwrap(),
        Some(accepted(2, Some("img")))
    );
    assert_eq!(store.get_key(&k("200")).unwrap(), None);
    assert_eq!(store.get_key(&k("0007")).unwrap(), None);
    assert_eq!(store.get_key(&k(&uuid_key(600))).unwrap(), None);
    assert_eq!(store.get_key(&k("a|c")).unwrap(), None);
    // Another mapping of the same type sees none of it.
    let other = StateKey {
        mapping: "transactions/public.other".into(),
        ..k("5")
    };
    assert_eq!(store.get_key(&other).unwrap(), None);
    assert!(store.keys_of(ty, &other.mapping).unwrap().is_empty());

    // Key 5 gains an image, key 64 is dead-lettered, 63 removed; the same
    // for UUIDs 5, 64, 63.
    let dead = |fp| KeyState {
        status: KeyStatus::DeadLettered,
        fingerprint: fp,
        delete_image: None,
    };
    store
        .apply(&[
            Write::Key(k("5"), accepted(fp(5, 2), Some("{\"v\":5}"))),
            Write::Key(k("64"), dead(fp(64, 2))),
            Write::RemoveKey(k("63")),
            Write::Key(k(&uuid_key(5)), accepted(fp(5, 2), Some("u5"))),
            Write::Key(k(&uuid_key(64)), dead(fp(64, 2))),
            Write::RemoveKey(k(&uuid_key(63))),
        ])
        .unwrap();
    assert_eq!(
        store.get_key(&k("5")).unwrap(),
        Some(accepted(fp(5, 2), Some("{\"v\":5}")))
    );
    assert_eq!(
        store.get_key(&k("64")).unwrap().unwrap().status,
        KeyStatus::DeadLettered
    );
    assert_eq!(store.get_key(&k("63")).unwrap(), None);
    assert_eq!(
        store.get_key(&k(&uuid_key(5))).unwrap(),
        Some(accepted(fp(5, 2), Some("u5")))
    );
    assert_eq!(store.get_key(&k(&uuid_key(63))).unwrap(), None);
    // ... and loses it again; keys 6 go through both states in one call.
    store
        .apply(&[
            Write::Key(k("5"), accepted(fp(5, 3), None)),
            Write::Key(k("6"), accepted(fp(6, 2), Some("{}"))),
            Write::Key(k("6"), accepted(fp(6, 3), None)),
            Write::Key(k(&uuid_key(5)), accepted(fp(5, 3), None)),
            Write::Key(k(&uuid_key(6)), accepted(fp(6, 2), Some("{}"))),
            Write::Key(k(&uuid_key(6)), accepted(fp(6, 3), None)),
            Write::RemoveKey(k("a|b")),
        ])
        .unwrap();
    assert_eq!(
        store.get_key(&k("5")).unwrap(),
        Some(accepted(fp(5, 3), None))
    );
    assert_eq!(
        store.get_key(&k("6")).unwrap(),
        Some(accepted(fp(6, 3), None))
    );
    assert_eq!(
        store.get_key(&k(&uuid_key(6))).unwrap(),
        Some(accepted(fp(6, 3), None))
    );

    let want_of = |n: u64| match n {
        5 => accepted(fp(5, 3), None),
        6 => accepted(fp(6, 3), None),
        64 => dead(fp(64, 2)),
        _ => accepted(fp(n, 1), None),
    };
    let mut want: Vec<(String, KeyState)> = (0..200u64)
        .filter(|&n| n != 63)
        .map(|n| (n.to_string(), want_of(n)))
        .chain(
            (0..600u64)
                .filter(|&n| n != 63)
                .map(|n| (uuid_key(n), want_of(n))),
        )
        .collect();
    want.push(("007".into(), accepted(7007, None)));
    want.push(("18446744073709551615".into(), accepted(42, None)));
    for (sk, fp) in [
        ("CUST-0001", 1u64),
        ("", 2),
        ("a\\|b", 4),
        ("\\N|7", 5),
        ("550e8400-e29b-41d4-a716-446655440000|12", 6),
        ("Zoë", 7),
    ] {
        want.push((sk.into(), accepted(fp, Some("img"))));
    }
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(all_states(store, ty, &mapping), want);

    // Removing every key of a page leaves nothing behind.
    let page: Vec<Write> = (128..192u64)
        .map(|n| Write::RemoveKey(k(&n.to_string())))
        .collect();
    store.apply(&page).unwrap();
    let left = store.keys_of(ty, &mapping).unwrap();
    assert_eq!(left.len(), want.len() - 64);
    assert!(left
        .iter()
        .all(|(sk, _)| !(128..192).contains(&sk.parse::<u64>().unwrap_or(0))));
}

#[test]
fn memory_store_key_forms() {
    key_forms_contract(&MemoryStore::new());
}

fn sorted_states(s: &dyn StateStore) -> Vec<(String, KeyState)> {
    let k = key("transactions", "1");
    all_states(s, k.ty, &k.mapping)
}

#[test]
fn sled_store_key_forms_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let s = SledStore::open(dir.path()).unwrap();
        key_forms_contract(&s);
        s.flush().unwrap();
        sorted_states(&s)
    };
    let s = SledStore::open(dir.path()).unwrap();
    assert_eq!(sorted_states(&s), before);
    assert_eq!(
        s.get_key(&key("transactions", "5"))
            .unwrap()
            .unwrap()
            .fingerprint,
        5003
    );
    assert_eq!(
        s.get_key(&key("transactions", &uuid_key(6)))
            .unwrap()
            .unwrap()
            .fingerprint,
        6003
    );
}

#[test]
fn keys_with_long_common_prefixes_lose_nothing() {
    // Synthetic UUIDs (twelve zero bytes, then a counter) and text keys
    // that differ only at their end: pages still split between keys.
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    let keys: Vec<StateKey> = (0..3000u64)
        .flat_map(|n| {
            [
                key("transactions", &format!("00000000-0000-0000-0000-{n:012x}")),
                key(
                    "transactions",
                    &format!("CUSTOMER-ACCOUNT-REFERENCE-{n:08}"),
                ),
            ]
        })
        .collect();
    for chunk in keys.chunks(1000) {
        let writes: Vec<Write> = chunk
            .iter()
            .enumerate()
            .map(|(i, k)| Write::Key(k.clone(), accepted(i as u64, None)))
            .collect();
        s.apply(&writes).unwrap();
    }
    let refs: Vec<&StateKey> = keys.iter().collect();
    let got = s.get_keys(&refs).unwrap();
    assert!(got.iter().all(Option::is_some));
    let k = &keys[0];
    assert!(s.range_pages(k.ty, &k.mapping) > 100);
    assert_eq!(s.keys_of(k.ty, &k.mapping).unwrap().len(), 6000);
}

#[test]
fn a_snapshot_in_key_order_appends_pages() {
    // Sorted UUID keys (a table read in key order) fill pages in order:
    // each epoch writes about as many pages as its keys fill, and a
    // lookup of the next epoch's (new) keys reads one page.
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    let mut all: Vec<String> = (0..20_000u64).map(uuid_key).collect();
    all.sort();
    for chunk in all.chunks(5000) {
        let before = s.entries_in_keys_tree().unwrap();
        let writes: Vec<Write> = chunk
            .iter()
            .map(|u| Write::Key(key("transactions", u), accepted(1, None)))
            .collect();
        s.apply(&writes).unwrap();
        let added = s.entries_in_keys_tree().unwrap() - before;
        // ~27 bytes a key, pages of ~TARGET_BYTES.
        let fill = 5000 * 27 / ranges::TARGET_BYTES;
        assert!(
            (fill - 5..=fill + 5).contains(&added),
            "{added} pages for {fill}"
        );
    }
}

#[test]
fn sled_store_pages_integer_keys() {
    // 10 000 consecutive ids take ~157 entries in the keys tree, not 10 000.
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    let writes: Vec<Write> = (1..=10_000u64)
        .map(|n| Write::Key(key("transactions", &n.to_string()), accepted(n, None)))
        .collect();
    s.apply(&writes).unwrap();
    assert_eq!(s.entries_in_keys_tree().unwrap(), 10_000 / 64 + 1);
}

#[test]
fn sled_store_pages_uuid_keys_and_splits_them_as_they_grow() {
    // 20 000 UUID keys written in epochs of 2 000: a few hundred pages of
    // at most MAX_BYTES, not 20 000 entries; every key readable after
    // each epoch and after a reopen.
    let dir = tempfile::tempdir().unwrap();
    let k = |n: u64| key("transactions", &uuid_key(n));
    {
        let s = SledStore::open(dir.path()).unwrap();
        for epoch in 0..10u64 {
            let writes: Vec<Write> = (epoch * 2000..(epoch + 1) * 2000)
                .map(|n| Write::Key(k(n), accepted(n, None)))
                .collect();
            s.apply(&writes).unwrap();
            let keys: Vec<StateKey> = (0..(epoch + 1) * 2000).map(k).collect();
            let refs: Vec<&StateKey> = keys.iter().collect();
            let got = s.get_keys(&refs).unwrap();
            assert!(
                got.iter()
                    .enumerate()
                    .all(|(n, g)| g.as_ref().map(|g| g.fingerprint) == Some(n as u64)),
                "epoch {epoch}"
            );
        }
        let entries = s.entries_in_keys_tree().unwrap();
        assert!(
            (20_000 * 27 / ranges::MAX_BYTES..=20_000 * 27 / (ranges::TARGET_BYTES / 2))
                .contains(&entries),
            "{entries} pages"
        );
        for (pk, v) in s.keys_tree().iter().map(Result::unwrap) {
            assert!(v.len() <= ranges::MAX_BYTES, "{pk:?}: {} bytes", v.len());
        }
        s.flush().unwrap();
    }
    let s = SledStore::open(dir.path()).unwrap();
    let listed = s.keys_of(k(0).ty, &k(0).mapping).unwrap();
    assert_eq!(listed.len(), 20_000);
    assert_eq!(s.get_key(&k(12_345)).unwrap().unwrap().fingerprint, 12_345);
}

#[test]
fn concurrent_applies_to_one_page_lose_nothing() {
    // Pages are read, changed and written back: applies from several
    // threads (the sink's commit, a future admin path) must not lose
    // slots, and readers racing page splits must find every key.
    let dir = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(SledStore::open(dir.path()).unwrap());
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
fn after_a_crash_mid_split_the_new_pages_win_and_damage_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    let k = |n: u64| key("transactions", &uuid_key(n));
    let prefix = StateKey::mapping_prefix(k(0).ty, &k(0).mapping);
    // One range page (start: empty) holding 20 keys (fingerprint 1).
    s.apply(
        &(0..20)
            .map(|n| Write::Key(k(n), accepted(1, None)))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert_eq!(s.range_pages(k(0).ty, &k(0).mapping), 1);
    let whole = s
        .keys_tree()
        .get(ranges::page_key(&prefix, &[]))
        .unwrap()
        .unwrap();
    // A split cut it at the median code and wrote the upper piece (with
    // newer states: fingerprint 2) — then the process died before the
    // lower page was rewritten: the old whole page is still at the start.
    let mut codes: Vec<(Vec<u8>, u64)> =
        (0..20).map(|n| (keycode::code(&uuid_key(n)), n)).collect();
    codes.sort();
    let cut = codes[10].0.clone();
    let upper: Vec<ranges::Change> = codes[10..]
        .iter()
        .map(|(c, _)| (c.clone(), Some(accepted(2, None))))
        .collect();
    let piece = ranges::rebuild(&ranges::empty(), &upper, &cut, None).unwrap();
    s.keys_tree()
        .insert(ranges::page_key(&prefix, &cut), piece)
        .unwrap();
    s.keys_tree()
        .insert(ranges::page_key(&prefix, &[]), whole)
        .unwrap();
    s.flush().unwrap();
    drop(s);
    let s = SledStore::open(dir.path()).unwrap();
    let want = |n: u64| {
        if codes[10..].iter().any(|c| c.1 == n) {
            2
        } else {
            1
        }
    };
    for n in 0..20 {
        assert_eq!(
            s.get_key(&k(n)).unwrap().unwrap().fingerprint,
            want(n),
            "key {n}"
        );
    }
    let listed = all_states(&s, k(0).ty, &k(0).mapping);
    assert_eq!(
        listed.len(),
        20,
        "the old page's copies are not listed twice"
    );
    // The next write to the lower page drops the leftovers.
    s.apply(&[Write::Key(k(codes[0].1), accepted(3, None))])
        .unwrap();
    let lower = s
        .keys_tree()
        .get(ranges::page_key(&prefix, &[]))
        .unwrap()
        .unwrap();
    assert_eq!(ranges::slots(&lower).unwrap().len(), 10);

    // A damaged page is an error that says what to do, never "no state".
    s.keys_tree()
        .insert(ranges::page_key(&prefix, &cut), &b"\x01garbage"[..])
        .unwrap();
    let e = s.get_key(&k(codes[15].1)).unwrap_err().to_string();
    assert!(
        e.contains("damaged") && e.contains("cobi-sync snapshot"),
        "{e}"
    );
    let e = s.keys_of(k(0).ty, &k(0).mapping).unwrap_err().to_string();
    assert!(e.contains("damaged"), "{e}");
    let e = s
        .apply(&[Write::Key(k(codes[15].1), accepted(4, None))])
        .unwrap_err()
        .to_string();
    assert!(e.contains("damaged"), "{e}");
    s.keys_tree()
        .insert(super::pages::page_key(&prefix, 3), &b"\x01garbage"[..])
        .unwrap();
    let e = s
        .get_key(&key("transactions", "200"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("damaged"), "{e}");
}

#[test]
fn a_store_of_the_first_layout_is_converted_once() {
    let dir = tempfile::tempdir().unwrap();
    let tx = schema().type_id("transactions").unwrap();
    let u = uuid_key(1);
    let json = format!(
        r#"{{"transaction_id":"{u}","shop_id":"{u}","region":"GB","savings":0.1,"amount":12.5,"source":"online"}}"#
    );
    // The first layout: `[prefix][source key]` → `[status][fp][JSON]`.
    let legacy = |k: &StateKey, fp: u64, json: Option<&str>| {
        let mut v = Vec::new();
        encode_fixed(KeyStatus::Accepted, fp, &mut v);
        v.extend_from_slice(json.unwrap_or("").as_bytes());
        (k.encode(), v)
    };
    {
        let s = SledStore::open(dir.path()).unwrap();
        let t = s.keys_tree();
        let (k1, v1) = legacy(&key("transactions", &u), 10, Some(&json));
        t.insert(k1, v1).unwrap();
        let (k2, v2) = legacy(&key("transactions", "text-key"), 11, None);
        t.insert(k2, v2).unwrap();
        // Key 70: in its integer page (fingerprint 1), and — a crash
        // leftover of the first layout — as an entry with a record
        // (fingerprint 2), which was read first and so wins.
        s.apply(&[Write::Key(key("transactions", "70"), accepted(1, None))])
            .unwrap();
        let (k3, v3) = legacy(&key("transactions", "70"), 2, Some(&json));
        t.insert(k3, v3).unwrap();
        // A store written by the first layout has no layout marker.
        s.forget_layout_marker();
        s.flush().unwrap();
    }
    let s = SledStore::open(dir.path()).unwrap();
    let st = s.get_key(&key("transactions", &u)).unwrap().unwrap();
    assert_eq!(st.fingerprint, 10);
    let r = image::decode(tx, st.delete_image.as_ref().unwrap()).unwrap();
    let back = String::from_utf8(r.to_json()).unwrap();
    assert!(back.contains(r#""amount":12.5"#), "{back}");
    assert!(back.contains("online"), "optional fields kept: {back}");
    assert_eq!(
        s.get_key(&key("transactions", "text-key")).unwrap(),
        Some(accepted(11, None))
    );
    let st70 = s.get_key(&key("transactions", "70")).unwrap().unwrap();
    assert_eq!(st70.fingerprint, 2);
    assert!(st70.delete_image.is_some());
    // No entry of the first layout is left: only pages.
    for (k, _) in s.keys_tree().iter().map(Result::unwrap) {
        assert!(matches!(k[9], 0xFE | 0xFF), "{k:?}");
    }
    assert_eq!(sorted_states(&s).len(), 3);
}

#[test]
fn memory_store_contract() {
    contract(&MemoryStore::new());
}

#[test]
fn sled_store_contract_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = SledStore::open(dir.path()).unwrap();
        contract(&s);
        s.flush().unwrap();
    }
    let s = SledStore::open(dir.path()).unwrap();
    assert_eq!(
        s.get_key(&key("shops", "1")).unwrap().unwrap().fingerprint,
        11
    );
}

#[test]
fn second_open_of_the_same_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let _a = SledStore::open(dir.path()).unwrap();
    let err = SledStore::open(dir.path())
        .err()
        .expect("locked")
        .to_string();
    assert!(err.contains("in use by another cobi-sync process"), "{err}");
}

#[test]
fn state_keys_round_trip_and_sort_by_type() {
    let k = key("shops", "a|b\\c");
    assert_eq!(
        StateKey::source_key_of(&k.encode()).as_deref(),
        Some("a|b\\c")
    );
    assert!(k
        .encode()
        .starts_with(&StateKey::mapping_prefix(k.ty, &k.mapping)));
    assert!(key("institutes", "z").encode() < key("shops", "a").encode());
}

const CHILD_ENV: &str = "COBI_SYNC_STATE_CRASH_CHILD";

/// Writes forever, printing `flushed N` after each flush (run as a child).
fn crash_child(dir: &str) -> ! {
    let store = SledStore::open(std::path::Path::new(dir)).unwrap();
    let mut i: u64 = 0;
    loop {
        let mut writes = Vec::new();
        for j in 0..50 {
            writes.push(Write::Key(
                key("shops", &format!("{i}-{j}")),
                accepted(i, Some("{\"x\":1}")),
            ));
        }
        writes.push(Write::Checkpoint(Checkpoint::Replication(
            ReplicationCheckpoint {
                lsn: i,
                tables: BTreeMap::new(),
            },
        )));
        store.apply(&writes).unwrap();
        if i % 5 == 0 {
            store.flush().unwrap();
            println!("flushed {i}");
        }
        i += 1;
    }
}

#[test]
fn flushed_writes_survive_sigkill() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        crash_child(&dir);
    }
    for (round, target) in [7u64, 93, 251].into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "state::tests::flushed_writes_survive_sigkill",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut last_flushed = None;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("flushed ") {
                let n: u64 = n.trim().parse().unwrap();
                last_flushed = Some(n);
                if n >= target {
                    // Mid-write: the child keeps applying unflushed batches.
                    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                    break;
                }
            }
        }
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "round {round}: child must have been killed"
        );
        let last = last_flushed.expect("child flushed at least once");
        let store = SledStore::open(dir.path()).unwrap();
        for i in 0..=last {
            for j in 0..50 {
                let st = store.get_key(&key("shops", &format!("{i}-{j}"))).unwrap();
                assert_eq!(
                    st.map(|s| s.fingerprint),
                    Some(i),
                    "round {round}: entry {i}-{j} flushed before the kill is missing"
                );
            }
        }
        let lsn = replication_checkpoint(&store).unwrap().unwrap().lsn;
        assert!(
            lsn >= last,
            "round {round}: checkpoint {lsn} went back before the flushed {last}"
        );
    }
}

#[test]
fn integer_keys_keep_their_images_outside_their_page() {
    // A page of 64 imaged keys stays ~600 bytes (sled evicts small writes;
    // see `pages`); images come back, change, and go with their keys,
    // also after a reopen.
    let dir = tempfile::tempdir().unwrap();
    let k = |n: u64| key("transactions", &n.to_string());
    let img = |n: u64| format!("image {n} {}", "x".repeat(270));
    {
        let s = SledStore::open(dir.path()).unwrap();
        let writes: Vec<Write> = (0..64)
            .map(|n| Write::Key(k(n), accepted(n, Some(&img(n)))))
            .collect();
        s.apply(&writes).unwrap();
        for (pk, v) in s.keys_tree().iter().map(Result::unwrap) {
            assert!(
                v.len() <= 17 + 64 * FIXED_BYTES,
                "{pk:?}: {} bytes",
                v.len()
            );
        }
        s.apply(&[
            Write::Key(k(1), accepted(100, None)),
            Write::Key(k(2), accepted(200, Some("new"))),
            Write::RemoveKey(k(3)),
        ])
        .unwrap();
        s.flush().unwrap();
    }
    let s = SledStore::open(dir.path()).unwrap();
    assert_eq!(s.get_key(&k(0)).unwrap(), Some(accepted(0, Some(&img(0)))));
    assert_eq!(s.get_key(&k(1)).unwrap(), Some(accepted(100, None)));
    assert_eq!(s.get_key(&k(2)).unwrap(), Some(accepted(200, Some("new"))));
    assert_eq!(s.get_key(&k(3)).unwrap(), None);
    assert_eq!(
        s.get_key(&k(63)).unwrap(),
        Some(accepted(63, Some(&img(63))))
    );
    // A key that comes back has no image left over from before.
    s.apply(&[Write::Key(k(3), accepted(3, None))]).unwrap();
    assert_eq!(s.get_key(&k(3)).unwrap(), Some(accepted(3, None)));
    // The 64 keys' images are in 8 group entries (not one per key); a
    // group whose images all go is removed.
    assert_eq!(s.images_tree().len(), 8);
    let gone: Vec<Write> = (8..16).map(|n| Write::RemoveKey(k(n))).collect();
    s.apply(&gone).unwrap();
    assert_eq!(s.images_tree().len(), 7);
    assert_eq!(
        s.get_key(&k(16)).unwrap(),
        Some(accepted(16, Some(&img(16))))
    );
}

#[test]
fn a_lookup_racing_the_regrouping_of_its_page_still_finds_the_images() {
    // A lookup holds a version 3 page it read; an apply converts that page
    // (images into groups, per-slot entries removed) for another key; the
    // lookup then asks for a third key's image: found in its group.
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    let k = |n: u64| key("transactions", &n.to_string());
    let prefix = StateKey::mapping_prefix(k(0).ty, &k(0).mapping);
    let pk = super::pages::page_key(&prefix, 0);
    let mut v = vec![3u8];
    v.extend_from_slice(&((1u64 << 1) | (1u64 << 2)).to_be_bytes());
    v.extend_from_slice(&((1u64 << 1) | (1u64 << 2)).to_be_bytes());
    for fp in [1, 2] {
        encode_fixed(KeyStatus::Accepted, fp, &mut v);
    }
    let (keys, images) = (s.keys_tree(), s.images_tree());
    keys.insert(&pk, v).unwrap();
    images
        .insert(super::pages::image_key(&pk, 1), &b"one"[..])
        .unwrap();
    images
        .insert(super::pages::image_key(&pk, 2), &b"two"[..])
        .unwrap();
    let dirs = super::layout::Dirs::default();
    let mut reader = super::layout::Reader::new(&keys, &images, &dirs);
    assert_eq!(
        reader.get(&prefix, "1", None).unwrap(),
        Some(accepted(1, Some("one")))
    );
    s.apply(&[Write::Key(k(5), accepted(5, None))]).unwrap();
    assert_eq!(images.get(super::pages::image_key(&pk, 2)).unwrap(), None);
    assert_eq!(
        reader.get(&prefix, "2", None).unwrap(),
        Some(accepted(2, Some("two"))),
        "the page the lookup holds is version 3, its entries are gone"
    );
}

#[test]
fn a_page_with_per_slot_images_is_read_and_regrouped_when_rewritten() {
    // The previous page format (version 3) kept each image in its own
    // entry of the `images` tree, under the page key and the slot.
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    let k = |n: u64| key("transactions", &n.to_string());
    let prefix = StateKey::mapping_prefix(k(0).ty, &k(0).mapping);
    let pk = super::pages::page_key(&prefix, 0);
    let mut v = vec![3u8];
    v.extend_from_slice(&((1u64 << 1) | (1u64 << 2) | (1u64 << 9)).to_be_bytes());
    v.extend_from_slice(&((1u64 << 1) | (1u64 << 9)).to_be_bytes());
    for fp in [1, 2, 9] {
        encode_fixed(KeyStatus::Accepted, fp, &mut v);
    }
    s.keys_tree().insert(&pk, v).unwrap();
    let per_slot = |slot: u8| super::pages::image_key(&pk, slot);
    s.images_tree().insert(per_slot(1), &b"one"[..]).unwrap();
    // Slot 9 is marked but its entry is missing: read without an image.
    assert_eq!(s.get_key(&k(1)).unwrap(), Some(accepted(1, Some("one"))));
    assert_eq!(s.get_key(&k(2)).unwrap(), Some(accepted(2, None)));
    assert_eq!(s.get_key(&k(9)).unwrap(), Some(accepted(9, None)));
    s.apply(&[Write::Key(k(5), accepted(5, Some("five")))])
        .unwrap();
    let page = s.keys_tree().get(&pk).unwrap().unwrap();
    assert_eq!(page[0], 4);
    assert_eq!(s.images_tree().get(per_slot(1)).unwrap(), None);
    assert_eq!(s.images_tree().len(), 1, "one group for slots 0..8");
    assert_eq!(s.get_key(&k(1)).unwrap(), Some(accepted(1, Some("one"))));
    assert_eq!(s.get_key(&k(5)).unwrap(), Some(accepted(5, Some("five"))));
    assert_eq!(s.get_key(&k(9)).unwrap(), Some(accepted(9, None)));
}

#[test]
fn a_page_with_images_inline_is_read_and_converted_when_rewritten() {
    // The previous page format (version 2) held images inline.
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    let k = |n: u64| key("transactions", &n.to_string());
    let prefix = StateKey::mapping_prefix(k(0).ty, &k(0).mapping);
    let mut v = vec![2u8];
    v.extend_from_slice(&((1u64 << 1) | (1u64 << 2)).to_be_bytes());
    encode_fixed(KeyStatus::Accepted, 1, &mut v);
    v.extend_from_slice(&[4, b'o', b'l', b'd']);
    encode_fixed(KeyStatus::Accepted, 2, &mut v);
    v.push(0);
    s.keys_tree()
        .insert(super::pages::page_key(&prefix, 0), v)
        .unwrap();
    assert_eq!(s.get_key(&k(1)).unwrap(), Some(accepted(1, Some("old"))));
    assert_eq!(s.get_key(&k(2)).unwrap(), Some(accepted(2, None)));
    // Rewriting another slot moves key 1's image out of the page.
    s.apply(&[Write::Key(k(5), accepted(5, Some("five")))])
        .unwrap();
    let page = s
        .keys_tree()
        .get(super::pages::page_key(&prefix, 0))
        .unwrap()
        .unwrap();
    assert_eq!(page[0], 4);
    assert_eq!(s.get_key(&k(1)).unwrap(), Some(accepted(1, Some("old"))));
    assert_eq!(s.get_key(&k(5)).unwrap(), Some(accepted(5, Some("five"))));
    assert_eq!(s.get_key(&k(2)).unwrap(), Some(accepted(2, None)));
}

/// Lookups racing applies (the sink's pipeline: epoch N+1 is looked up
/// while epoch N is applied, pages split meanwhile) lose no write: every
/// key ends with the state its last apply gave it, for UUID (range page)
/// and integer keys alike. (Written for a hand-off of lookup pages to the
/// apply, tried and dropped: see the README's performance section.)
#[test]
fn applies_racing_lookups_keep_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(SledStore::open(dir.path()).unwrap());
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
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                store.get_keys(&refs).unwrap();
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

/// A split into three or more pieces, cut short by a crash after each of
/// its page writes in turn: every key the old page held is still found
/// (with its old or its new state) and listed once. Two shapes: old keys
/// spread over every piece (random UUIDs), and a snapshot's (old keys all
/// below the new ones, the pieces carry nothing).
#[test]
fn a_crash_at_any_point_of_a_split_into_many_pieces_loses_no_key() {
    // Random UUIDs: old keys 0..40 spread over the whole range.
    crash_at_every_split_write(&(0..40).map(uuid_key).collect::<Vec<_>>(), |n| {
        uuid_key(1000 + n)
    });
    // A snapshot's shape: ascending keys, old ones first.
    let ordered = |n: u64| format!("{n:08}-key");
    crash_at_every_split_write(&(0..40).map(ordered).collect::<Vec<_>>(), |n| {
        ordered(1000 + n)
    });
}

/// Writes a 40-key page, then the page writes of an apply that gives
/// those keys fingerprint 2 and adds 110 new ones (a split into 3+
/// pieces), cut after each write in turn; checks every old key after
/// reopening.
fn crash_at_every_split_write(old_keys: &[String], new_key: impl Fn(u64) -> String) {
    let k = |sk: &str| key("transactions", sk);
    let prefix = StateKey::mapping_prefix(k("x").ty, &k("x").mapping);
    let change = |sk: &str, fp: u64| (keycode::code(sk), Some(accepted(fp, None)));
    let old_changes: Vec<ranges::Change> = old_keys.iter().map(|sk| change(sk, 1)).collect();
    let old = ranges::rebuild(&ranges::empty(), &old_changes, &[], None).unwrap();
    assert!(old.len() <= ranges::MAX_BYTES);
    let new_changes: Vec<ranges::Change> = old_keys
        .iter()
        .map(|sk| change(sk, 2))
        .chain((0..110).map(|n| change(&new_key(n), 2)))
        .collect();
    let merged = ranges::rebuild(&old, &new_changes, &[], None).unwrap();
    let pieces = ranges::split(merged, &[]).unwrap();
    assert!(pieces.len() >= 3, "{} pieces", pieces.len());
    let writes = super::layout::split_writes(&old, None, pieces).unwrap();
    assert!(
        writes.last().is_some_and(|w| w.0.is_empty()),
        "the old start is written last"
    );
    for crash in 0..=writes.len() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let tree = s.keys_tree();
        tree.insert(ranges::page_key(&prefix, &[]), old.as_slice())
            .unwrap();
        for (start, bytes) in &writes[..crash] {
            tree.insert(ranges::page_key(&prefix, start), bytes.as_slice())
                .unwrap();
        }
        s.flush().unwrap();
        drop((tree, s));
        let s = SledStore::open(dir.path()).unwrap();
        for sk in old_keys {
            let fp = s.get_key(&k(sk)).unwrap().map(|st| st.fingerprint);
            assert!(
                matches!(fp, Some(1 | 2)),
                "crash after {crash} of {} page writes: key {sk} reads {fp:?}",
                writes.len()
            );
        }
        let listed = all_states(&s, k("x").ty, &k("x").mapping);
        let old_listed = old_keys
            .iter()
            .filter(|sk| listed.iter().any(|(l, _)| l == *sk))
            .count();
        assert_eq!(
            old_listed,
            old_keys.len(),
            "crash after {crash}: the old keys listed"
        );
        let unique: std::collections::BTreeSet<&String> = listed.iter().map(|(sk, _)| sk).collect();
        assert_eq!(
            unique.len(),
            listed.len(),
            "crash after {crash}: listed once"
        );
    }
}

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
        let store = SledStore::open(dir.path()).unwrap();
        for chunk in stored.chunks(10_000) {
            let writes: Vec<Write> = chunk
                .iter()
                .map(|k| Write::Key(k.clone(), accepted(1, Some("image"))))
                .collect();
            store.apply(&writes).unwrap();
        }
        store.flush().unwrap();
        check(&store, "after the writes");
    }
    let store = SledStore::open(dir.path()).unwrap();
    check(&store, "after reopening");
}

/// A failed apply drops the directories and their filters; read again
/// from disk, they still find every key stored before.
#[test]
fn the_filter_read_again_after_a_reset_finds_every_stored_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let keys: Vec<StateKey> = (0..3_000u64)
        .map(|n| key("customers", &uuid_key(n)))
        .collect();
    let writes: Vec<Write> = keys
        .iter()
        .map(|k| Write::Key(k.clone(), accepted(4, None)))
        .collect();
    store.apply(&writes).unwrap();
    store.forget_directories();
    let refs: Vec<&StateKey> = keys.iter().collect();
    let states = store.get_keys(&refs).unwrap();
    assert!(states
        .iter()
        .all(|s| s.as_ref().map(|s| s.fingerprint) == Some(4)));
}

/// Lookups racing the reset a failed apply does (directories and filters
/// dropped, read again by the next user) still find every stored key:
/// directories are loaded and read under one lock.
#[test]
fn lookups_racing_a_directory_reset_find_every_stored_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(SledStore::open(dir.path()).unwrap());
    let keys: Vec<StateKey> = (0..200u64)
        .map(|n| key("customers", &uuid_key(n)))
        .collect();
    let writes: Vec<Write> = keys
        .iter()
        .map(|k| Write::Key(k.clone(), accepted(9, None)))
        .collect();
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
