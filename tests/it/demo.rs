//! `cobi-sync demo` works on this machine and reports every type. (How
//! long it takes is printed, not asserted: timing belongs in benches.)

use std::time::Instant;

use crate::common::run_cli;

#[test]
fn demo_runs_end_to_end() {
    let t = Instant::now();
    let (code, out, err) = run_cli(&["demo"], &[]);
    println!("demo took {:?}", t.elapsed());
    assert_eq!(code, 0, "demo failed\nstdout:\n{out}\nstderr:\n{err}");
    for t in crate::oracle::contract() {
        let line = out.lines().find(|l| l.starts_with(&format!("{} ", t.name)));
        let line = line.unwrap_or_else(|| panic!("no row for {} in:\n{out}", t.name));
        let records: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(records > 0, "{line}");
    }
    assert!(out.contains("reference failures at the API: 0"), "{out}");
    assert!(
        out.contains("\"name\": \"Brand New Bakery\""),
        "sample record missing:\n{out}"
    );
    assert!(out.contains("everything cleaned up"), "{out}");
    // The deleted transaction arrived as a soft delete.
    let tx = out
        .lines()
        .find(|l| l.starts_with("transactions "))
        .unwrap();
    assert_eq!(tx.split_whitespace().nth(2), Some("1"), "{tx}");
}
