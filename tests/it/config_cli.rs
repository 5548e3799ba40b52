//! `cobi-sync run --config bad.toml` exits 2 naming the key, for a corpus
//! of broken configurations, and never panics.

use crate::common::run_cli;

const GOOD: &str = r#"
[source]
url = "postgres://cobi_sync@127.0.0.1:1/shop"
mode = "poll"
[api]
base_url = "http://127.0.0.1:9"
[state]
dir = "/tmp/cobi-sync-test-never-used"
[[mapping]]
type = "shops"
table = "public.merchant"
[mapping.fields]
shop_id = { column = "id", transform = "uuid5" }
name = "trade_name"
region = { column = "country", transform = "upper" }
"#;

fn run_with(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let (code, _, err) = run_cli(&["run", "--config", path.to_str().unwrap()], &[]);
    (code, err)
}

#[test]
fn broken_configs_exit_2_naming_the_key() {
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown key",
            GOOD.replace("[api]", "[api]\ncolour = \"red\""),
            "api.colour: unknown key",
        ),
        (
            "bad duration",
            GOOD.replace("[api]", "[api]\ntimeout = \"a while\""),
            "api.timeout: `a while` is not a duration",
        ),
        (
            "max_records = 6000",
            GOOD.replace("[api]", "[batch]\nmax_records = 6000\n[api]"),
            "batch.max_records: 6000 is out of range 1..=5000",
        ),
        (
            "unknown type",
            GOOD.replace("type = \"shops\"", "type = \"stores\""),
            "mapping[0].type: unknown Cobi type `stores`",
        ),
        (
            "field not in schema",
            GOOD.replace(
                "name = \"trade_name\"",
                "name = \"trade_name\"\nlogo = \"logo_url\"",
            ),
            "mapping[0].fields.logo: `logo` is not a field of shops",
        ),
        (
            "missing required field",
            GOOD.replace("name = \"trade_name\"\n", ""),
            "mapping[0].fields.name: required field of shops is not mapped",
        ),
        (
            "uuid5:nosuchtype",
            GOOD.replace("transform = \"uuid5\"", "transform = \"uuid5:nosuchtype\""),
            "mapping[0].fields.shop_id: unknown type `nosuchtype`",
        ),
        (
            "not toml",
            "[source\nurl=".to_string(),
            "cannot parse the file as TOML",
        ),
        ("missing file", String::new(), ""),
    ];
    for (name, text, want) in cases {
        let (code, err) = if name == "missing file" {
            let (c, _, e) = run_cli(&["run", "--config", "/nonexistent/cobi-sync.toml"], &[]);
            (c, e)
        } else {
            run_with(&text)
        };
        assert_eq!(code, 2, "{name}: exit code, stderr: {err}");
        assert!(err.contains(want), "{name}: want `{want}` in:\n{err}");
        assert!(!err.contains("panicked"), "{name}: panic:\n{err}");
    }
}

#[test]
fn environment_overlays_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, GOOD).unwrap();
    let p = path.to_str().unwrap();
    // The overlay makes an otherwise valid file invalid: it was applied.
    let (code, _, err) = run_cli(
        &["check", "--config", p],
        &[("COBI_SYNC__BATCH__MAX_RECORDS", "9000")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("batch.max_records: 9000"), "{err}");
    // COBI_SYNC_CONFIG names the file when --config is absent.
    let (code, _, err) = run_cli(
        &["check"],
        &[("COBI_SYNC_CONFIG", p), ("COBI_SYNC__API__TIMEOUT", "nope")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("api.timeout"), "{err}");
}

#[test]
fn usage_errors_exit_2() {
    let (code, _, err) = run_cli(&["frobnicate"], &[]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run_cli(
        &["snapshot", "--type", "stores", "--config", "/nonexistent"],
        &[],
    );
    assert_eq!(code, 2, "{err}");
}

#[test]
fn help_never_prints_the_api_key_from_the_environment() {
    let secret = "sk-live-3f9a7c2e-do-not-print";
    for args in [&["mock-api", "--help"][..], &["mock-api", "-h"][..]] {
        let (code, out, err) = run_cli(args, &[("COBI_API_KEY", secret)]);
        assert_eq!(code, 0, "{args:?}: {err}");
        // The variable is still named, so the operator knows it is read…
        assert!(out.contains("[env: COBI_API_KEY]"), "{args:?}:\n{out}");
        // …but its value is not shown.
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "{args:?} printed the key:\n{out}{err}"
        );
    }
}

#[test]
fn bad_mock_api_fault_rates_exit_2_naming_the_flag() {
    // An address in use: had a rate been accepted, the command would fail
    // to listen and exit 1 rather than 2 (and never serve).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    for (flag, value, want) in [
        ("--fail-rate", "1.5", "out of range"),
        ("--throttle-rate", "-0.1", "out of range"),
        ("--drop-rate", "often", "is not a number"),
        ("--fail-rate", "NaN", "out of range"),
    ] {
        let arg = format!("{flag}={value}");
        let (code, out, err) = run_cli(
            &["mock-api", "--api-key", "k", "--listen", &listen, &arg],
            &[],
        );
        assert_eq!(code, 2, "{arg}: exit code\n{out}{err}");
        assert!(err.contains(flag), "{arg}: flag not named:\n{err}");
        assert!(err.contains(want), "{arg}: want `{want}`:\n{err}");
        assert!(err.contains("between 0 and 1"), "{arg}:\n{err}");
    }
    // A good rate passes parsing: the command gets as far as listening.
    let (code, _, err) = run_cli(
        &[
            "mock-api",
            "--api-key",
            "k",
            "--listen",
            &listen,
            "--fail-rate=0.25",
        ],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot listen"), "{err}");
}

#[test]
fn status_and_dlq_without_state_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let path = dir.path().join("c.toml");
    let text = GOOD.replace("/tmp/cobi-sync-test-never-used", state.to_str().unwrap())
        + "[http]\nlisten = \"\"\n";
    std::fs::write(&path, text).unwrap();
    let p = path.to_str().unwrap();
    let (code, out, err) = run_cli(&["status", "--config", p], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("no state yet"), "{out}");
    assert!(out.contains("(the daemon has not run)"), "{out}");
    let (code, out, err) = run_cli(&["status", "--json", "--config", p], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("--json stays JSON");
    assert_eq!(report["running"], false);
    let (code, out, err) = run_cli(&["dlq", "list", "--json", "--config", p], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.trim(), "[]");
    assert!(err.contains("no state yet"), "{err}");
    let (code, out, err) = run_cli(&["dlq", "purge", "--config", p], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("\"purged\":0"), "{out}");
    assert!(!state.exists(), "a read-only command created the state dir");
    // An empty directory (systemd's StateDirectory before the first run)
    // is no state either, and stays empty.
    std::fs::create_dir(&state).unwrap();
    let (code, out, err) = run_cli(&["status", "--config", p], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("no state yet"), "{out}");
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0);
}

/// A daemon endpoint that answers /healthz and then never answers /status:
/// `status` gives up after its timeout instead of hanging.
#[test]
fn status_times_out_on_a_stalled_daemon() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            // One request per connection is enough for a probe; hold every
            // connection open so a stalled one stays stalled.
            let mut buf = [0u8; 4096];
            let n = conn.read(&mut buf).unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]).into_owned();
            if request.starts_with("GET /healthz") {
                // What a cobi-sync daemon's /healthz says.
                let body = r#"{"service":"cobi-sync","version":"0.1.0","status":"ok"}"#;
                let _ = conn.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
            held.push(conn);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let state = dir.path().join("state");
    let text = GOOD.replace("/tmp/cobi-sync-test-never-used", state.to_str().unwrap())
        + &format!("[http]\nlisten = \"{addr}\"\n");
    std::fs::write(&path, text).unwrap();
    let started = std::time::Instant::now();
    let (code, out, err) = run_cli(&["status", "--config", path.to_str().unwrap()], &[]);
    let took = started.elapsed();
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("/status"), "{err}");
    assert!(
        took < std::time::Duration::from_secs(10),
        "status took {took:?}"
    );
}
