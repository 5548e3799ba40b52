//! The [`StateStore`] contract, run against both implementations (and
//! across a reopen for sled).

use super::*;

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
fn memory_store_contract() {
    contract(&MemoryStore::new());
}

#[test]
fn sled_store_contract_and_reopen() {
    for drain in DRAINS {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open_draining_at(dir.path(), drain).unwrap();
            contract(&s);
            s.flush().unwrap();
        }
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(
            s.get_key(&key("shops", "1")).unwrap().unwrap().fingerprint,
            11,
            "drain at {drain} bytes"
        );
    }
}

/// A re-open counts (a writer that flushes after one must apply again),
/// and the store reads as of its last flush after it.
#[test]
fn sled_store_generation_counts_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    assert_eq!(s.generation(), 0);
    contract(&s);
    s.flush().unwrap();
    s.recover().unwrap();
    assert_eq!(s.generation(), 1);
    assert_eq!(
        s.get_key(&key("shops", "1")).unwrap().unwrap().fingerprint,
        11
    );
    s.recover().unwrap();
    assert_eq!(s.generation(), 2);
}

#[test]
fn memory_store_key_forms() {
    key_forms_contract(&MemoryStore::new());
}

#[test]
fn sled_store_key_forms_and_reopen() {
    for drain in DRAINS {
        sled_store_key_forms_and_reopen_draining_at(drain);
    }
}

fn sled_store_key_forms_and_reopen_draining_at(drain: usize) {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let s = SledStore::open_draining_at(dir.path(), drain).unwrap();
        key_forms_contract(&s);
        s.flush().unwrap();
        sorted_states(&s)
    };
    let s = SledStore::open(dir.path()).unwrap();
    assert_eq!(sorted_states(&s), before, "drain at {drain} bytes");
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
