//! The state store contract, run against both implementations, and the
//! crash-durability proof for sled.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use super::*;
use crate::mapping::value::oid;

fn key(ty: &str, sk: &str) -> StateKey {
    StateKey {
        ty: schema().type_id(ty).unwrap(),
        mapping: format!("{ty}/public.t").into(),
        source_key: sk.into(),
    }
}

fn accepted(fp: u64, last: Option<&str>) -> KeyState {
    KeyState {
        status: KeyStatus::Accepted,
        fingerprint: fp,
        last_sent: last.map(|s| bytes::Bytes::copy_from_slice(s.as_bytes())),
    }
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
    let shop_keys: Vec<String> = store
        .keys_of(a.ty, &a.mapping)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(shop_keys, ["1", "2"]);
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

/// Integer keys (pages in the sled store) and the switch between the two
/// forms of a key (with and without a last-sent record): every store must
/// answer like a plain map of keys.
fn key_forms_contract(store: &dyn StateStore) {
    let k = |n: &str| key("transactions", n);
    let fp = |n: u64, round: u64| n * 1000 + round;
    // 0..200 spans four pages; "007" and "7" are different keys.
    let mut writes: Vec<Write> = (0..200u64)
        .map(|n| Write::Key(k(&n.to_string()), accepted(fp(n, 1), None)))
        .collect();
    writes.push(Write::Key(k("007"), accepted(7007, None)));
    writes.push(Write::Key(k("18446744073709551615"), accepted(42, None)));
    store.apply(&writes).unwrap();
    store.flush().unwrap();
    let all: Vec<StateKey> = (0..200u64).map(|n| k(&n.to_string())).collect();
    let refs: Vec<&StateKey> = all.iter().collect();
    let got = store.get_keys(&refs).unwrap();
    for (n, g) in got.iter().enumerate() {
        assert_eq!(g, &Some(accepted(fp(n as u64, 1), None)), "key {n}");
    }
    assert_eq!(
        store.get_key(&k("7")).unwrap(),
        Some(accepted(fp(7, 1), None))
    );
    assert_eq!(
        store.get_key(&k("007")).unwrap(),
        Some(accepted(7007, None))
    );
    assert_eq!(store.get_key(&k("200")).unwrap(), None);
    assert_eq!(store.get_key(&k("0007")).unwrap(), None);

    // Key 5 gains a last-sent record, key 64 is dead-lettered, 63 removed.
    store
        .apply(&[
            Write::Key(k("5"), accepted(fp(5, 2), Some("{\"v\":5}"))),
            Write::Key(
                k("64"),
                KeyState {
                    status: KeyStatus::DeadLettered,
                    fingerprint: fp(64, 2),
                    last_sent: None,
                },
            ),
            Write::RemoveKey(k("63")),
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
    // ... and loses it again; key 6 goes through both forms in one call.
    store
        .apply(&[
            Write::Key(k("5"), accepted(fp(5, 3), None)),
            Write::Key(k("6"), accepted(fp(6, 2), Some("{}"))),
            Write::Key(k("6"), accepted(fp(6, 3), None)),
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

    let mut listed = store.keys_of(k("1").ty, &k("1").mapping).unwrap();
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    let mut want: Vec<(String, KeyState)> = (0..200u64)
        .filter(|&n| n != 63)
        .map(|n| {
            let st = match n {
                5 => accepted(fp(5, 3), None),
                6 => accepted(fp(6, 3), None),
                64 => KeyState {
                    status: KeyStatus::DeadLettered,
                    fingerprint: fp(64, 2),
                    last_sent: None,
                },
                _ => accepted(fp(n, 1), None),
            };
            (n.to_string(), st)
        })
        .collect();
    want.push(("007".into(), accepted(7007, None)));
    want.push(("18446744073709551615".into(), accepted(42, None)));
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(listed, want);

    // Removing every key of a page leaves nothing behind.
    let page: Vec<Write> = (128..192u64)
        .map(|n| Write::RemoveKey(k(&n.to_string())))
        .collect();
    store.apply(&page).unwrap();
    let left = store.keys_of(k("1").ty, &k("1").mapping).unwrap();
    assert_eq!(left.len(), want.len() - 64);
    assert!(left
        .iter()
        .all(|(sk, _)| !(128..192).contains(&sk.parse::<u64>().unwrap_or(0))));
}

#[test]
fn memory_store_key_forms() {
    key_forms_contract(&MemoryStore::new());
}

#[test]
fn sled_store_key_forms_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let s = SledStore::open(dir.path()).unwrap();
        key_forms_contract(&s);
        s.flush().unwrap();
        let mut l = s
            .keys_of(
                key("transactions", "1").ty,
                &key("transactions", "1").mapping,
            )
            .unwrap();
        l.sort_by(|a, b| a.0.cmp(&b.0));
        l
    };
    let s = SledStore::open(dir.path()).unwrap();
    let mut after = s
        .keys_of(
            key("transactions", "1").ty,
            &key("transactions", "1").mapping,
        )
        .unwrap();
    after.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(after, before);
    assert_eq!(
        s.get_key(&key("transactions", "5"))
            .unwrap()
            .unwrap()
            .fingerprint,
        5003
    );
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
fn concurrent_applies_to_one_page_lose_nothing() {
    // Pages are read, changed and written back: applies from several
    // threads (the sink's commit, a future admin path) must not lose slots.
    let dir = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(SledStore::open(dir.path()).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                // Thread t owns ids ≡ t (mod 4): every apply touches the
                // same two pages as the other threads.
                for round in 0..50u64 {
                    let writes: Vec<Write> = (0..128u64)
                        .filter(|n| n % 4 == t)
                        .map(|n| {
                            Write::Key(key("transactions", &n.to_string()), accepted(round, None))
                        })
                        .collect();
                    s.apply(&writes).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let listed = s
        .keys_of(
            key("transactions", "1").ty,
            &key("transactions", "1").mapping,
        )
        .unwrap();
    assert_eq!(listed.len(), 128);
    assert!(listed.iter().all(|(_, st)| st.fingerprint == 49));
}

#[test]
fn after_a_crash_mid_move_the_per_key_entry_wins_and_damage_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    let k = key("transactions", "70");
    // Key 70 in its page (fingerprint 1) ...
    s.apply(&[Write::Key(k.clone(), accepted(1, None))])
        .unwrap();
    // ... then moved to a per-key entry with a last-sent record, the crash
    // landing after the entry was written and before the slot was cleared.
    s.keys_tree()
        .insert(k.encode(), accepted(2, Some("{}")).encode())
        .unwrap();
    assert_eq!(s.get_key(&k).unwrap(), Some(accepted(2, Some("{}"))));

    // A damaged page is an error that says what to do, never "no state".
    let prefix = StateKey::mapping_prefix(k.ty, &k.mapping);
    s.keys_tree()
        .insert(super::pages::page_key(&prefix, 3), &b"\x01garbage"[..])
        .unwrap();
    let damaged = key("transactions", "200"); // page 3
    let e = s.get_key(&damaged).unwrap_err().to_string();
    assert!(
        e.contains("damaged") && e.contains("cobi-sync snapshot"),
        "{e}"
    );
    let e = s.keys_of(k.ty, &k.mapping).unwrap_err().to_string();
    assert!(e.contains("damaged"), "{e}");
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
