//! Table tests of the watermark state machine: interleavings of chunk
//! reads, re-reads, watermarks and changes (insert/update/delete/re-key
//! before, inside and after the chunk window, TRUNCATE).

use super::*;

use Step::*;
use Verdict::{DeleteIfKnown, Deliver, Skip};

/// One step of a scenario on table 0 (integer keys; a row's payload is its
/// key).
#[derive(Debug, Clone)]
enum Step {
    /// Read the next chunk in snapshot `snap` after the copied position:
    /// these rows; `full` when the table goes on after them.
    Chunk(&'static str, &'static [i64], bool),
    /// An insert or update of `key` in `xid`, and the expected verdict.
    Up(i64, u32, Verdict),
    /// A delete of `key` in `xid`, and the expected verdict.
    Del(i64, u32, Verdict),
    /// A re-key from `old` to `new` in `xid`: the old key's delete and the
    /// new key's upsert verdicts.
    Rekey(i64, i64, u32, Verdict, Verdict),
    /// The watermark of the newest read arrives: the rows delivered.
    Mark(&'static [i64]),
    /// A stale watermark (another process's) arrives: nothing happens.
    StaleMark,
    /// Whether a read may be taken in this snapshot.
    MayRead(&'static str, bool),
    /// TRUNCATE in `xid`.
    Truncate(u32),
    /// An upsert in `xid` that must be re-read (its verdict was Deliver).
    Ask(i64, u32),
    /// The requests are re-read in `snap`; these keys were found.
    Reread(&'static str, &'static [i64]),
    /// The table's phase now.
    Is(Phase),
    /// The confirmable position when the stream is at 1000.
    Confirm(u64),
    /// `snapshot --force` / `resync`.
    Restart,
    /// Whether a `snapshot` command may end now.
    Settled(bool),
}

fn key(k: i64) -> Key {
    vec![Value::Int(k)]
}

fn sk(k: i64) -> String {
    k.to_string()
}

fn snap(s: &str) -> PgSnapshot {
    PgSnapshot::parse(s).unwrap_or_else(|| panic!("bad snapshot {s}"))
}

fn run(name: &str, start: Phase, steps: &[Step]) {
    let mut m: Watermarks<i64> = Watermarks::new(vec![start]);
    m.set_reference(snap("1:1:"));
    let mut seq = 0;
    let mut last_id = String::new();
    for (n, step) in steps.iter().enumerate() {
        let at = format!("{name}, step {n} {step:?}");
        match step {
            Chunk(s, rows, full) => {
                let s = snap(s);
                assert!(m.may_read(&s), "{at}: read not allowed");
                assert_eq!(m.next_chunk(), Some(0), "{at}: no chunk expected now");
                let lower = match m.phase(0) {
                    Phase::Copying(k) => Some(k.clone()),
                    _ => None,
                };
                seq += 1;
                last_id = format!("w{seq}");
                let progress = full.then(|| {
                    TableSnapshot::InProgress(crate::state::Position {
                        cursor: None,
                        key: vec![],
                    })
                });
                let rows = rows.iter().map(|&k| (key(k), sk(k), k)).collect();
                m.begin(Read::chunk(0, last_id.clone(), s, lower, rows, progress));
            }
            Up(k, x, want) => {
                let v = m.on_change(change(*k, *x, false));
                assert_eq!(v, *want, "{at}");
            }
            Del(k, x, want) => {
                let v = m.on_change(change(*k, *x, true));
                assert_eq!(v, *want, "{at}");
            }
            Rekey(old, new, x, want_old, want_new) => {
                assert_eq!(
                    m.on_change(change(*old, *x, true)),
                    *want_old,
                    "{at} (old key)"
                );
                assert_eq!(
                    m.on_change(change(*new, *x, false)),
                    *want_new,
                    "{at} (new key)"
                );
            }
            Mark(want) => {
                let out = m.on_watermark(&last_id);
                assert_eq!(out.len(), 1, "{at}: one read ends");
                assert_eq!(out[0].rows, want.to_vec(), "{at}");
            }
            StaleMark => {
                assert!(m.on_watermark("an-old-process:1").is_empty(), "{at}");
            }
            MayRead(s, want) => assert_eq!(m.may_read(&snap(s)), *want, "{at}"),
            Truncate(x) => m.on_truncate(0, Some(*x)),
            Ask(k, x) => {
                assert_eq!(m.on_change(change(*k, *x, false)), Deliver, "{at}");
                m.request(change(*k, *x, false), 500);
            }
            Reread(s, found) => {
                let s = snap(s);
                assert!(m.may_read(&s), "{at}: re-read not allowed");
                seq += 1;
                last_id = format!("w{seq}");
                let keys = m.requests().iter().map(|r| r.source_key.clone()).collect();
                let rows = found.iter().map(|&k| (sk(k), k)).collect();
                m.begin_requests(vec![Read::keys(0, last_id.clone(), s, keys, rows)]);
            }
            Is(p) => assert_eq!(m.phase(0), p, "{at}"),
            Confirm(want) => assert_eq!(m.confirmable(1000), *want, "{at}"),
            Restart => m.restart(0),
            Settled(want) => assert_eq!(m.settled(), *want, "{at}"),
        }
    }
}

fn change<'a>(k: i64, xid: u32, delete: bool) -> Change<'a> {
    // Leaked so the change can borrow them for the test's length.
    let key: &'a [Value] = Box::leak(key(k).into_boxed_slice());
    let source_key: &'a str = Box::leak(sk(k).into_boxed_str());
    Change {
        table: 0,
        key,
        source_key,
        xid: Some(xid),
        delete,
    }
}

fn copying(k: i64) -> Phase {
    Phase::Copying(key(k))
}

#[test]
fn changes_before_inside_and_after_the_chunk_window() {
    // Chunk 2 reads keys 11..=20 in snapshot 100:105:102 (sees < 100, 100,
    // 101, 103, 104; not 102, not ≥ 105). Keys ≤ 10 are copied.
    let cases: &[(&str, Phase, &[Step])] = &[
        (
            "upserts before the window are delivered",
            copying(10),
            &[Chunk("100:105:102", &[11, 12, 20], true), Up(5, 106, Deliver), Up(10, 101, Deliver)],
        ),
        (
            "an upsert inside the window the chunk sees is skipped; the chunk row stays",
            copying(10),
            &[Chunk("100:105:102", &[11, 12, 20], true), Up(12, 101, Skip), Mark(&[11, 12, 20])],
        ),
        (
            "an upsert inside the window the chunk does not see is delivered and the row dropped",
            copying(10),
            &[
                Chunk("100:105:102", &[11, 12, 20], true),
                Up(12, 102, Deliver),
                Up(20, 105, Deliver),
                Mark(&[11]),
                Is(copying(20)),
            ],
        ),
        (
            "an insert inside the window of a key the chunk lacks, not seen: delivered",
            copying(10),
            &[Chunk("100:105:", &[11, 20], true), Up(15, 106, Deliver), Mark(&[11, 20])],
        ),
        (
            "upserts after the window are skipped for a later chunk, which must see them",
            copying(10),
            &[
                Chunk("100:105:", &[11, 20], true),
                Up(25, 106, Skip),
                Mark(&[11, 20]),
                MayRead("105:107:106", false),
                MayRead("107:107:", true),
                Chunk("107:107:", &[25], false),
                Mark(&[25]),
                Is(Phase::Done),
            ],
        ),
        (
            "deletes are delivered before and inside the window, seen or not",
            copying(10),
            &[
                Chunk("100:105:102", &[11, 20], true),
                Del(3, 101, Deliver),
                Del(11, 101, Deliver),
                Del(20, 102, Deliver),
                Mark(&[11]),
            ],
        ),
        (
            "a delete after the window goes to keys the API holds only, and the next chunk sees it",
            copying(10),
            &[
                Chunk("100:105:", &[11, 20], true),
                Del(30, 106, DeleteIfKnown),
                Mark(&[11, 20]),
                MayRead("106:108:106", false),
                MayRead("107:108:", true),
            ],
        ),
        (
            "a delete then a re-insert inside the window, both not seen: the newest version wins",
            copying(10),
            &[
                Chunk("100:105:", &[11, 20], true),
                Del(11, 106, Deliver),
                Up(11, 107, Deliver),
                Mark(&[20]),
            ],
        ),
        (
            "a re-key from inside the window to after it",
            copying(10),
            &[
                Chunk("100:105:", &[11, 20], true),
                Rekey(11, 40, 106, Deliver, Skip),
                Mark(&[20]),
            ],
        ),
        (
            "a re-key from after the window to before it",
            copying(10),
            &[
                Chunk("100:105:", &[11, 20], true),
                Rekey(40, 2, 106, DeleteIfKnown, Deliver),
                Mark(&[11, 20]),
            ],
        ),
        (
            "a re-key seen by the chunk: the old key's delete is still delivered, the new row comes with the chunk",
            copying(10),
            &[
                Chunk("100:105:", &[12, 20], true),
                Rekey(11, 12, 101, Deliver, Skip),
                Mark(&[12, 20]),
            ],
        ),
        (
            "the last chunk has no upper bound",
            copying(10),
            &[
                Chunk("100:105:", &[11], false),
                Up(1_000_000, 101, Skip),
                Up(1_000_001, 106, Deliver),
                Mark(&[11]),
                Is(Phase::Done),
                Up(1_000_002, 107, Deliver),
                Del(7, 108, Deliver),
            ],
        ),
        (
            "a table not started: upserts wait, deletes reach known keys",
            Phase::NotStarted,
            &[Up(1, 50, Skip), Del(2, 50, DeleteIfKnown), MayRead("50:52:50", false), Chunk("51:52:", &[1], false), Mark(&[1])],
        ),
        (
            "a watermark of another process (same pid after a restart) ends nothing",
            copying(10),
            &[Chunk("100:105:", &[11], true), StaleMark, Up(11, 106, Deliver), Mark(&[])],
        ),
        (
            "a copied table delivers everything",
            Phase::Done,
            &[Up(1, 5, Deliver), Del(1, 6, Deliver), Rekey(2, 3, 7, Deliver, Deliver)],
        ),
    ];
    for (name, start, steps) in cases {
        run(name, start.clone(), steps);
    }
}

#[test]
fn truncate_empties_reads_taken_before_it() {
    let cases: &[(&str, Phase, &[Step])] = &[
        (
            "a chunk read before the TRUNCATE brings nothing back",
            copying(10),
            &[
                Chunk("100:105:", &[11, 12, 20], true),
                Truncate(106),
                Mark(&[]),
                Is(copying(20)),
            ],
        ),
        (
            "a chunk read after the TRUNCATE keeps its rows (inserted after it)",
            copying(10),
            &[
                Chunk("100:105:", &[11], true),
                Truncate(99),
                Up(11, 101, Skip),
                Mark(&[11]),
            ],
        ),
        (
            "rows inserted after the TRUNCATE the chunk did not see are delivered",
            copying(10),
            &[
                Chunk("100:105:", &[11, 20], true),
                Truncate(106),
                Up(11, 107, Deliver),
                Mark(&[]),
            ],
        ),
        (
            "later chunks must see the TRUNCATE",
            copying(10),
            &[
                Truncate(120),
                MayRead("119:121:120", false),
                MayRead("121:121:", true),
            ],
        ),
        (
            "a re-read taken before the TRUNCATE brings nothing back",
            Phase::Done,
            &[
                Ask(5, 100),
                Reread("101:101:", &[5]),
                Truncate(102),
                Mark(&[]),
            ],
        ),
    ];
    for (name, start, steps) in cases {
        run(name, start.clone(), steps);
    }
}

#[test]
fn rereads_of_rows_with_values_left_out() {
    let cases: &[(&str, Phase, &[Step])] = &[
        (
            "a re-read is delivered at its watermark; the position is held until then",
            Phase::Done,
            &[
                Confirm(1000),
                Settled(true),
                Ask(5, 100),
                Confirm(500),
                Settled(false),
                MayRead("100:101:100", false),
                Reread("101:101:", &[5]),
                Confirm(500),
                Settled(false),
                Mark(&[5]),
                Confirm(1000),
                Settled(true),
            ],
        ),
        (
            "changes to a requested key wait for the re-read, which must see them",
            Phase::Done,
            &[
                Ask(5, 100),
                Up(5, 101, Skip),
                Del(6, 101, Deliver),
                MayRead("101:102:101", false),
                Reread("102:102:", &[5]),
                Mark(&[5]),
            ],
        ),
        (
            "a delete of a requested key is delivered; the re-read finds nothing",
            Phase::Done,
            &[
                Ask(5, 100),
                Del(5, 101, Deliver),
                Reread("102:102:", &[]),
                Mark(&[]),
            ],
        ),
        (
            "a change the re-read does not see supersedes it",
            Phase::Done,
            &[
                Ask(5, 100),
                Reread("101:103:102", &[5]),
                Up(5, 102, Deliver),
                Up(5, 101, Skip),
                Mark(&[]),
            ],
        ),
        (
            "a re-read inside a chunk window: both hold the key",
            copying(10),
            &[
                Chunk("100:105:", &[11, 20], true),
                Ask(15, 106),
                Reread("107:107:", &[15]),
                Up(15, 106, Skip),
                Up(11, 108, Deliver),
                Mark(&[15]),
            ],
        ),
    ];
    for (name, start, steps) in cases {
        run(name, start.clone(), steps);
    }
}

#[test]
fn restart_abandons_the_pending_chunk() {
    run(
        "restart",
        copying(10),
        &[
            Chunk("100:105:", &[11, 20], true),
            Restart,
            Is(Phase::NotStarted),
            Up(11, 101, Skip),
            Del(3, 101, DeleteIfKnown),
            StaleMark,
            Chunk("101:106:", &[3, 11], false),
            Settled(false),
            Mark(&[3, 11]),
            Is(Phase::Done),
            Settled(true),
        ],
    );
}

#[test]
fn snapshot_visibility() {
    let s = PgSnapshot::parse("100:105:101,103").unwrap();
    let cases = [
        (99, true),
        (100, true),
        (101, false),
        (102, true),
        (103, false),
        (104, true),
        (105, false),
        (200, false),
    ];
    for (xid, sees) in cases {
        assert_eq!(s.sees(xid), sees, "xid {xid}");
    }
    assert_eq!(PgSnapshot::parse("5:5:").unwrap().xip.len(), 0);
    assert!(PgSnapshot::parse("x:y:").is_none());
}

#[test]
fn xids_widen_to_the_nearest_epoch() {
    let e = |epoch: u64, xid: u64| (epoch << 32) + xid;
    let max = u64::from(u32::MAX);
    let cases = [
        // (snapshot xmax, stream xid, full xid)
        (e(3, 20), 15u32, e(3, 15)),
        // Just before the wrap: the previous epoch.
        (e(3, 20), u32::MAX - 5, e(2, max - 5)),
        // The snapshot was taken just before the wrap, the change just after.
        (e(3, max - 10), 5, e(4, 5)),
        (e(3, max - 10), u32::MAX - 20, e(3, max - 20)),
        // Epoch 0 has no previous epoch.
        (e(0, 20), u32::MAX - 5, e(0, max - 5)),
    ];
    for (xmax, xid, want) in cases {
        let s = PgSnapshot {
            xmin: xmax,
            xmax,
            xip: HashSet::new(),
        };
        assert_eq!(s.widen(xid), want, "xmax {xmax:#x}, xid {xid:#x}");
    }
}

#[test]
fn key_ranges_follow_postgres_order() {
    let read = |lower: Option<i64>, upper: Option<i64>| Read::<()> {
        table: 0,
        id: String::new(),
        snapshot: snap("1:1:"),
        extent: Extent::Range {
            lower: lower.map(key),
            upper: upper.map(key),
        },
        end: None,
        rows: vec![],
        index: Default::default(),
    };
    let cases = [
        (Some(10), Some(20), 10, false),
        (Some(10), Some(20), 11, true),
        (Some(10), Some(20), 20, true),
        (Some(10), Some(20), 21, false),
        (Some(10), None, 1_000_000, true),
        (None, Some(5), -3, true),
    ];
    for (lower, upper, k, holds) in cases {
        assert_eq!(
            read(lower, upper).holds(&key(k), &sk(k)),
            holds,
            "({lower:?}, {upper:?}] holds {k}"
        );
    }
    // Composite keys compare column by column; NULL sorts last.
    let ab = |a: i64, b: Option<&str>| {
        vec![
            Value::Int(a),
            b.map_or(Value::Null, |b| Value::Text(b.into())),
        ]
    };
    assert!(cmp_keys(&ab(1, Some("b")), &ab(1, Some("a"))).is_gt());
    assert!(cmp_keys(&ab(1, Some("z")), &ab(2, Some("a"))).is_lt());
    assert!(cmp_keys(&ab(1, None), &ab(1, Some("zz"))).is_gt());
}
