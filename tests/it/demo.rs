//! `cobi-sync demo` works on this machine, quickly, and reports every type.

use std::time::{Duration, Instant};

use crate::common::run_cli;

#[test]
fn demo_runs_end_to_end_in_under_a_minute() {
    let t = Instant::now();
    let (code, out, err) = run_cli(&["demo"], &[]);
    let took = t.elapsed();
    assert_eq!(code, 0, "demo failed\nstdout:\n{out}\nstderr:\n{err}");
    assert!(took < Duration::from_secs(60), "demo took {took:?}");
    for t in &cobi_sync::model::schema::schema().types {
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
