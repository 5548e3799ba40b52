//! Crash durability of the sled store: a child killed mid-write keeps what
//! it flushed, and a split cut short at any write loses no key.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use super::*;

const CHILD_ENV: &str = "COBI_SYNC_STATE_CRASH_CHILD";
const DRAIN_ENV: &str = "COBI_SYNC_STATE_CRASH_DRAIN";

/// Key `j` of apply `i`: each apply writes one key in each of 50 ranges
/// (`00-…` to `49-…`), so once the ranges span more than a few pages an
/// apply's keys are too scattered to be written at once: held back.
fn crash_key(i: u64, j: u64) -> String {
    format!("{j:02}-{i}")
}

/// Writes forever, printing `flushed N H` after each flush and `applied N
/// H` after each other apply (`H`: keys held back; run as a child).
fn crash_child(dir: &str) -> ! {
    let drain = std::env::var(DRAIN_ENV).unwrap().parse().unwrap();
    let store = SledStore::open_draining_at(std::path::Path::new(dir), drain).unwrap();
    let mut i: u64 = 0;
    loop {
        let mut writes = Vec::new();
        for j in 0..50 {
            let k = key("shops", &crash_key(i, j));
            if j % 10 == 0 {
                // Rejected: its dead letter and its state.
                writes.push(Write::DeadLetter(k.clone(), Box::new(letter(&k))));
                writes.push(Write::Key(
                    k,
                    KeyState {
                        status: KeyStatus::DeadLettered,
                        fingerprint: i,
                        delete_image: None,
                    },
                ));
            } else {
                writes.push(Write::Key(k, accepted(i, Some("{\"x\":1}"))));
            }
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
            println!("flushed {i} {}", store.held_back());
        } else {
            println!("applied {i} {}", store.held_back());
        }
        i += 1;
    }
}

fn letter(k: &StateKey) -> DeadLetter {
    DeadLetter {
        ty: "shops".into(),
        mapping: k.mapping.to_string(),
        cobi_key: None,
        source_key: k.source_key.clone(),
        record: "{}".into(),
        reason: "test".into(),
        attempts: 1,
        first_at: String::new(),
        last_at: String::new(),
    }
}

#[test]
fn flushed_writes_survive_sigkill() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        crash_child(&dir);
    }
    // This test's name as the harness knows it (the module path without
    // the crate's name).
    let me = format!(
        "{}::flushed_writes_survive_sigkill",
        module_path!().split_once("::").expect("a crate path").1
    );
    // Killed with keys held back in the journal, amid drains every few
    // applies (64 KiB: ~15), and with every key in its page.
    let rounds = [
        (40u64, DRAINS[2]),
        (93, 64 * 1024),
        (251, 64 * 1024),
        (120, 0),
    ];
    for (round, (target, drain)) in rounds.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", me.as_str(), "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .env(DRAIN_ENV, drain.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut last_flushed = None;
        let mut held = 0;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let numbers = |rest: &str| -> (u64, usize) {
                let (n, h) = rest.trim().split_once(' ').expect("`N H`");
                (n.parse().unwrap(), h.parse().unwrap())
            };
            if let Some(rest) = line.strip_prefix("flushed ") {
                let (n, h) = numbers(rest);
                last_flushed = Some(n);
                held = held.max(h);
            } else if let Some(rest) = line.strip_prefix("applied ") {
                let (n, h) = numbers(rest);
                held = held.max(h);
                if n > target && last_flushed.is_some_and(|f| f >= target) {
                    // Mid-write, after at least one unflushed apply: the
                    // child keeps applying unflushed batches.
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
        if drain > 0 {
            assert!(held > 0, "round {round}: no key was ever held back");
        }
        let last = last_flushed.expect("child flushed at least once");
        let store = SledStore::open(dir.path()).unwrap();
        for i in 0..=last {
            for j in 0..50 {
                let st = store.get_key(&key("shops", &crash_key(i, j))).unwrap();
                assert_eq!(
                    st.map(|s| s.fingerprint),
                    Some(i),
                    "round {round}: entry {j:02}-{i} flushed before the kill is missing"
                );
            }
        }
        // Unflushed applies too: no key keeps a dead-lettered state
        // without its dead letter.
        let mut rejected = 0;
        for i in 0..=last + 50 {
            for j in (0..50).step_by(10) {
                let k = key("shops", &crash_key(i, j));
                let st = store.get_key(&k).unwrap();
                if st.is_some_and(|s| s.status == KeyStatus::DeadLettered) {
                    rejected += 1;
                    assert!(
                        store.dead_letter(&k).unwrap().is_some(),
                        "round {round}: {j:02}-{i} is dead-lettered without its dead letter"
                    );
                }
            }
        }
        assert!(
            rejected >= 5 * (last + 1),
            "round {round}: {rejected} rejected keys"
        );
        let lsn = replication_checkpoint(&store).unwrap().unwrap().lsn;
        assert!(
            lsn >= last,
            "round {round}: checkpoint {lsn} went back before the flushed {last}"
        );
    }
}

#[test]
fn after_a_crash_mid_split_the_new_pages_win_and_damage_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let s = paged(dir.path());
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
    let s = paged(dir.path());
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
        .insert(pages::page_key(&prefix, 3), &b"\x01garbage"[..])
        .unwrap();
    let e = s
        .get_key(&key("transactions", "200"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("damaged"), "{e}");
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
    let writes = layout::split_writes(&old, None, pieces).unwrap();
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
