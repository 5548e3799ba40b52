//! Packaging and operations files: the systemd unit, the Debian package
//! metadata, docker-compose.yml with config/docker.toml and its init SQL,
//! and `cobi-sync validate` (the unit's ExecStartPre).
//!
//! Only `compose_sample_database_syncs_through_the_least_privilege_role`
//! needs PostgreSQL; the others read files and run the binary.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cobi_sync::config::{self, MappingSource, Settings};

use crate::common::{bin, mock, run_cli, Daemon, Db, Workdir, API_KEY};
use crate::partner::wait_in_sync;

/// The repository root.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// systemd unit

/// A unit file: section → key → every value, in order (a key may repeat;
/// an empty assignment is kept as "").
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

/// The subset of systemd's syntax the unit uses: `[Section]`, `Key=Value`,
/// `#` and `;` comments, blank lines. Anything else fails the test.
fn parse_unit(text: &str) -> Unit {
    let mut unit = Unit::new();
    let mut section: Option<String> = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "line {}: continuation lines are not expected: {raw}",
            n + 1
        );
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_string());
            unit.entry(name.to_string()).or_default();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: not Key=Value: {raw}", n + 1));
        let section = section
            .as_ref()
            .unwrap_or_else(|| panic!("line {}: setting before any [Section]", n + 1));
        unit.get_mut(section)
            .unwrap()
            .entry(key.trim().to_string())
            .or_default()
            .push(value.trim().to_string());
    }
    unit
}

fn values<'a>(unit: &'a Unit, section: &str, key: &str) -> &'a [String] {
    unit.get(section)
        .and_then(|s| s.get(key))
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

#[test]
fn systemd_unit_has_the_required_settings() {
    let text = read("systemd/cobi-sync.service");
    let unit = parse_unit(&text);
    let cfg = config::DEFAULT_PATH;
    let exec_start_pre = format!("/usr/bin/cobi-sync validate --config {cfg}");
    let exec_start = format!("/usr/bin/cobi-sync run --config {cfg}");
    let credential = format!("{}:/etc/cobi-sync/api-key", config::secret::CREDENTIAL_NAME);
    let environment = format!("COBI_SYNC_CONFIG={cfg}");
    let required: &[(&str, &str, &[&str])] = &[
        ("Unit", "Wants", &["network-online.target"]),
        // Restarts are bounded: a failure that repeats ends in "failed".
        ("Unit", "StartLimitIntervalSec", &["10min"]),
        ("Unit", "StartLimitBurst", &["5"]),
        ("Service", "Type", &["notify"]),
        ("Service", "ExecStartPre", &[exec_start_pre.as_str()]),
        ("Service", "ExecStart", &[exec_start.as_str()]),
        // SIGHUP re-reads the configuration and never stops the daemon.
        ("Service", "ExecReload", &["/bin/kill -HUP $MAINPID"]),
        ("Service", "Restart", &["on-failure"]),
        ("Service", "RestartSec", &["5s"]),
        ("Service", "WatchdogSec", &["60s"]),
        ("Service", "TimeoutStopSec", &["30s"]),
        ("Service", "StateDirectory", &["cobi-sync"]),
        ("Service", "LoadCredential", &[credential.as_str()]),
        ("Service", "Environment", &[environment.as_str()]),
        ("Service", "DynamicUser", &["yes"]),
        ("Service", "ProtectSystem", &["strict"]),
        ("Service", "ProtectHome", &["yes"]),
        ("Service", "NoNewPrivileges", &["yes"]),
        ("Service", "PrivateTmp", &["yes"]),
        ("Service", "PrivateDevices", &["yes"]),
        ("Service", "ProtectKernelTunables", &["yes"]),
        ("Service", "ProtectKernelModules", &["yes"]),
        ("Service", "ProtectKernelLogs", &["yes"]),
        ("Service", "ProtectControlGroups", &["yes"]),
        ("Service", "ProtectClock", &["yes"]),
        ("Service", "ProtectHostname", &["yes"]),
        (
            "Service",
            "RestrictAddressFamilies",
            &["AF_UNIX AF_INET AF_INET6"],
        ),
        ("Service", "RestrictNamespaces", &["yes"]),
        ("Service", "RestrictRealtime", &["yes"]),
        ("Service", "RestrictSUIDSGID", &["yes"]),
        ("Service", "LockPersonality", &["yes"]),
        ("Service", "MemoryDenyWriteExecute", &["yes"]),
        ("Service", "SystemCallArchitectures", &["native"]),
        (
            "Service",
            "SystemCallFilter",
            &["@system-service", "~@privileged @resources"],
        ),
        // Empty: no capabilities at all.
        ("Service", "CapabilityBoundingSet", &[""]),
        ("Service", "UMask", &["0077"]),
        ("Install", "WantedBy", &["multi-user.target"]),
    ];
    let mut problems = Vec::new();
    for (section, key, want) in required {
        let got = values(&unit, section, key);
        if got != *want {
            problems.push(format!("[{section}] {key}: want {want:?}, got {got:?}"));
        }
    }
    let after: BTreeSet<&str> = values(&unit, "Unit", "After")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .collect();
    for want in ["network-online.target", "postgresql.service"] {
        if !after.contains(want) {
            problems.push(format!("[Unit] After lacks {want}: {after:?}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // StateDirectory=cobi-sync is /var/lib/cobi-sync: the default state.dir
    // of the installed configuration.
    let installed = config::load(&root().join("config/cobi-sync.example.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(installed.state.dir, Path::new("/var/lib/cobi-sync"));

    verify_with_systemd_analyze(&text);
}

/// `systemd-analyze verify` on a copy whose Exec lines run the binary under
/// test (verify insists that the executables exist), and a ceiling on
/// `systemd-analyze security`'s exposure score. Skipped, with a note, where
/// systemd-analyze is not installed (counted: `.ci/run` fails on skips).
fn verify_with_systemd_analyze(text: &str) {
    let probe = Command::new("systemd-analyze").arg("--version").output();
    if !probe.is_ok_and(|o| o.status.success()) {
        crate::common::skip("systemd-analyze is not installed: unit not verified");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("cobi-sync.service");
    assert!(text.contains("/usr/bin/cobi-sync "));
    std::fs::write(
        &copy,
        text.replace("/usr/bin/cobi-sync ", &format!("{} ", bin())),
    )
    .unwrap();

    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Warnings about the unit (unknown keys, bad values) name its file but
    // do not change the exit status.
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("cobi-sync.service"))
        .collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify failed ({}):\n{stderr}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&copy)
        .output()
        .expect("run systemd-analyze security");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(score) = stdout
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for cobi-sync.service:"))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|s| s.parse::<f64>().ok())
    else {
        crate::common::skip(&format!(
            "no exposure score from `systemd-analyze security --offline` (systemd too old?): {}",
            String::from_utf8_lossy(&out.stderr)
        ));
        return;
    };
    assert!(
        score <= 2.0,
        "exposure level {score} (want <= 2.0):\n{stdout}"
    );
}

// ---------------------------------------------------------------------------
// Debian package (cargo-deb metadata)

fn str_of<'a>(v: &'a toml::Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v}"))
}

#[test]
fn deb_metadata_installs_exactly_the_binary_unit_and_conffile() {
    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    let field = |k: &str| {
        deb.get(k)
            .unwrap_or_else(|| panic!("[package.metadata.deb] lacks {k}"))
    };
    assert_eq!(str_of(field("section"), "section"), "net");
    assert_eq!(str_of(field("priority"), "priority"), "optional");
    assert!(str_of(field("depends"), "depends").contains("$auto"));
    assert!(str_of(field("maintainer"), "maintainer").contains('@'));
    assert!(
        !str_of(field("extended-description"), "extended-description")
            .trim()
            .is_empty()
    );

    // Debug info may go to a separate -dbgsym package, never into this one.
    assert_ne!(
        deb.get("separate-debug-symbols")
            .and_then(toml::Value::as_bool),
        Some(true)
    );

    // Explicit assets (no "$auto"): [source, dest, mode] or a table.
    let mut installed: BTreeMap<String, (String, String)> = BTreeMap::new();
    for a in field("assets").as_array().expect("assets is an array") {
        let (src, dest, mode) = match a {
            toml::Value::Array(v) => (
                str_of(&v[0], "asset source"),
                str_of(&v[1], "asset dest"),
                str_of(&v[2], "asset mode"),
            ),
            toml::Value::Table(t) => (
                str_of(&t["source"], "asset source"),
                str_of(&t["dest"], "asset dest"),
                str_of(&t["mode"], "asset mode"),
            ),
            other => panic!("unexpected asset {other}"),
        };
        assert!(!dest.ends_with('/'), "give {src} a full destination path");
        installed.insert(dest.to_string(), (src.to_string(), mode.to_string()));
    }

    // The unit comes from `systemd-units`: every unit file in its directory
    // is installed in usr/lib/systemd/system/ (with generated maintainer
    // scripts); the directory must hold exactly our unit and no scripts.
    let units = match field("systemd-units") {
        toml::Value::Array(v) => v.clone(),
        t @ toml::Value::Table(_) => vec![t.clone()],
        other => panic!("systemd-units: {other}"),
    };
    assert_eq!(units.len(), 1, "one systemd-units entry");
    let u = &units[0];
    let unit_dir = str_of(&u["unit-scripts"], "unit-scripts");
    assert_eq!(unit_dir.trim_end_matches('/'), "systemd");
    assert_eq!(
        str_of(field("maintainer-scripts"), "maintainer-scripts").trim_end_matches('/'),
        "systemd"
    );
    // Installed, not enabled or started: the partner edits the config first.
    assert_eq!(u["enable"].as_bool(), Some(false), "systemd-units.enable");
    assert_eq!(u["start"].as_bool(), Some(false), "systemd-units.start");
    let in_dir: Vec<String> = std::fs::read_dir(root().join(unit_dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(in_dir, ["cobi-sync.service"], "files in {unit_dir}");
    installed.insert(
        "usr/lib/systemd/system/cobi-sync.service".into(),
        ("systemd/cobi-sync.service".into(), "644".into()),
    );

    let want: BTreeMap<String, (String, String)> = [
        ("usr/bin/cobi-sync", "target/release/cobi-sync", "755"),
        (
            "usr/lib/systemd/system/cobi-sync.service",
            "systemd/cobi-sync.service",
            "644",
        ),
        (
            "etc/cobi-sync/cobi-sync.toml",
            "config/cobi-sync.example.toml",
            "644",
        ),
    ]
    .into_iter()
    .map(|(d, s, m)| (d.to_string(), (s.to_string(), m.to_string())))
    .collect();
    assert_eq!(installed, want);
    assert_eq!(
        format!("/{}", "etc/cobi-sync/cobi-sync.toml"),
        config::DEFAULT_PATH
    );

    // Sources exist; the binary is the one this crate builds (cargo-deb
    // maps target/release/ to the real target directory).
    for (src, _) in installed.values() {
        if let Some(name) = src.strip_prefix("target/release/") {
            assert_eq!(name, env!("CARGO_PKG_NAME"));
            assert!(Path::new(bin()).ends_with(name));
        } else {
            assert!(root().join(src).is_file(), "{src} is missing");
        }
    }

    // The configuration is a conffile (dpkg keeps local edits on upgrade).
    let conf: Vec<&str> = field("conf-files")
        .as_array()
        .expect("conf-files is an array")
        .iter()
        .map(|v| str_of(v, "conf-file"))
        .collect();
    assert_eq!(conf, [config::DEFAULT_PATH]);

    // What the unit runs is what the package installs.
    let unit = read("systemd/cobi-sync.service");
    assert!(
        unit.contains("ExecStart=/usr/bin/cobi-sync run --config /etc/cobi-sync/cobi-sync.toml")
    );
}

// ---------------------------------------------------------------------------
// `cobi-sync validate`

#[test]
fn validate_subcommand() {
    let example = root().join("config/cobi-sync.example.toml");
    let (code, out, err) = run_cli(&["validate", "--config", example.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("is valid"), "{out}");

    // The global option also works before the command, and through the
    // environment variable the unit sets.
    let (code, _, err) = run_cli(&["--config", example.to_str().unwrap(), "validate"], &[]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run_cli(
        &["validate"],
        &[("COBI_SYNC_CONFIG", example.to_str().unwrap())],
    );
    assert_eq!(code, 0, "{err}");

    // Broken: exit 2 naming the key.
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(&example).unwrap();
    for (from, to, key) in [
        ("timeout = \"30s\"", "timeout = \"a while\"", "api.timeout"),
        ("[batch]", "[batch]\ncolour = \"red\"", "batch.colour"),
    ] {
        assert!(good.contains(from), "{from}");
        let broken = dir.path().join("broken.toml");
        std::fs::write(&broken, good.replacen(from, to, 1)).unwrap();
        let (code, out, err) = run_cli(&["validate", "--config", broken.to_str().unwrap()], &[]);
        assert_eq!(code, 2, "{key}: stdout: {out}\nstderr: {err}");
        assert!(err.contains(key), "{key}: {err}");
    }

    // Missing file: exit 2 too.
    let missing = dir.path().join("missing.toml");
    let (code, _, err) = run_cli(&["validate", "--config", missing.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("file not found"), "{err}");
}

// ---------------------------------------------------------------------------
// docker-compose.yml, config/docker.toml, config/docker/init.sql

type Yaml = serde_norway::Value;

/// A command as words, whether written as a string or a list.
fn words(v: &Yaml) -> Vec<String> {
    match v {
        Yaml::String(s) => s.split_whitespace().map(String::from).collect(),
        Yaml::Sequence(seq) => seq
            .iter()
            .map(|w| w.as_str().expect("command words are strings").to_string())
            .collect(),
        other => panic!("not a command: {other:?}"),
    }
}

/// A service's volumes as (source, target): short `src:dst[:mode]` or long
/// syntax.
fn mounts(service: &Yaml) -> Vec<(String, String)> {
    let Some(seq) = service["volumes"].as_sequence() else {
        return Vec::new();
    };
    seq.iter()
        .map(|v| match v {
            Yaml::String(s) => {
                let mut parts = s.splitn(3, ':');
                let src = parts.next().unwrap().to_string();
                let dst = parts.next().expect("volume target").to_string();
                (src, dst)
            }
            Yaml::Mapping(_) => (
                v["source"].as_str().expect("volume source").to_string(),
                v["target"].as_str().expect("volume target").to_string(),
            ),
            other => panic!("unexpected volume {other:?}"),
        })
        .collect()
}

/// A service's environment as a map (list or mapping syntax).
fn environment(service: &Yaml) -> BTreeMap<String, String> {
    match &service["environment"] {
        Yaml::Mapping(m) => m
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Yaml::String(s) => s.clone(),
                    other => serde_norway::to_string(other).unwrap().trim().to_string(),
                };
                (k.as_str().unwrap().to_string(), v)
            })
            .collect(),
        Yaml::Sequence(seq) => seq
            .iter()
            .map(|e| {
                let (k, v) = e.as_str().unwrap().split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// The port after `flag` in a command, e.g. `--listen 0.0.0.0:8080`.
fn arg_after(cmd: &[String], flag: &str) -> String {
    let i = cmd
        .iter()
        .position(|w| w == flag)
        .unwrap_or_else(|| panic!("{flag} missing in {cmd:?}"));
    cmd[i + 1].clone()
}

/// Comma-separated table names after `head` up to the next `stop` word or
/// `;`, in `sql` without its comments and with whitespace collapsed.
fn sql_list(sql: &str, head: &str, stop: &str) -> BTreeSet<String> {
    let sql = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .flat_map(str::split_whitespace)
        .collect::<Vec<_>>()
        .join(" ");
    let start = sql
        .find(head)
        .unwrap_or_else(|| panic!("`{head}` not in init.sql"))
        + head.len();
    let rest = &sql[start..];
    let end = [rest.find(stop), rest.find(';')]
        .into_iter()
        .flatten()
        .min()
        .unwrap();
    rest[..end]
        .split(',')
        .map(|t| t.trim().trim_start_matches("public.").to_string())
        .collect()
}

fn mapped_tables(settings: &Settings) -> BTreeSet<String> {
    settings
        .mappings
        .iter()
        .map(|m| match &m.source {
            MappingSource::Table { schema, name } => {
                assert_eq!(schema, "public");
                name.clone()
            }
            MappingSource::Query(_) => panic!("replication mode maps tables"),
        })
        .collect()
}

#[test]
fn docker_compose_parses_and_its_config_validates() {
    let compose: Yaml = serde_norway::from_str(&read("docker-compose.yml")).unwrap();
    let services = compose["services"]
        .as_mapping()
        .expect("services is a mapping");
    let names: BTreeSet<&str> = services.keys().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["postgres", "mock-api", "cobi-sync"]),
        "services"
    );
    let pg = &compose["services"]["postgres"];
    let mock_api = &compose["services"]["mock-api"];
    let daemon = &compose["services"]["cobi-sync"];

    // PostgreSQL: logical replication on, the init script mounted.
    assert!(pg["image"].as_str().unwrap().starts_with("postgres:"));
    let pg_cmd = words(&pg["command"]);
    assert!(
        pg_cmd.contains(&"wal_level=logical".to_string()),
        "{pg_cmd:?}"
    );
    assert!(
        mounts(pg)
            .iter()
            .any(|(src, dst)| src == "./config/docker/init.sql"
                && dst.starts_with("/docker-entrypoint-initdb.d/")
                && dst.ends_with(".sql")),
        "postgres must mount config/docker/init.sql into /docker-entrypoint-initdb.d/"
    );
    assert!(pg["healthcheck"]["test"].is_sequence());

    // The mock API and the daemon run the image of ./Dockerfile.
    for (name, svc) in [("mock-api", mock_api), ("cobi-sync", daemon)] {
        let context = match &svc["build"] {
            Yaml::String(s) => s.clone(),
            b @ Yaml::Mapping(_) => b["context"].as_str().unwrap_or(".").to_string(),
            other => panic!("{name}: build: {other:?}"),
        };
        assert!(root().join(&context).join("Dockerfile").is_file(), "{name}");
    }
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("ENTRYPOINT [\"cobi-sync\"]"));
    let mock_cmd = words(&mock_api["command"]);
    assert_eq!(mock_cmd[0], "mock-api");
    let mock_key = arg_after(&mock_cmd, "--api-key");
    let mock_listen: std::net::SocketAddr = arg_after(&mock_cmd, "--listen").parse().unwrap();

    // The daemon: its command reads the mounted config/docker.toml.
    let cmd = words(&daemon["command"]);
    assert_eq!(cmd[0], "run");
    let config_in_container = arg_after(&cmd, "--config");
    let daemon_mounts = mounts(daemon);
    assert!(
        daemon_mounts
            .iter()
            .any(|(src, dst)| src == "./config/docker.toml" && *dst == config_in_container),
        "cobi-sync must mount ./config/docker.toml at {config_in_container}: {daemon_mounts:?}"
    );
    let env = environment(daemon);
    assert_eq!(env.get("COBI_API_KEY"), Some(&mock_key), "API key");
    for dep in ["postgres", "mock-api"] {
        assert_eq!(
            daemon["depends_on"][dep]["condition"].as_str(),
            Some("service_healthy"),
            "cobi-sync depends_on {dep}"
        );
        assert!(
            compose["services"][dep]["healthcheck"]["test"].is_sequence(),
            "{dep} has a healthcheck"
        );
    }

    // Every bind mount exists; every named volume is declared.
    let declared: BTreeSet<&str> = compose["volumes"]
        .as_mapping()
        .map(|m| m.keys().map(|k| k.as_str().unwrap()).collect())
        .unwrap_or_default();
    for (name, svc) in services {
        for (src, _) in mounts(svc) {
            if src.starts_with('.') || src.starts_with('/') {
                assert!(
                    root().join(&src).exists(),
                    "{name:?} mounts {src}, which is not in the repository"
                );
            } else {
                assert!(declared.contains(src.as_str()), "volume {src} not declared");
            }
        }
    }

    // config/docker.toml validates with the real binary...
    let docker_toml = root().join("config/docker.toml");
    let (code, out, err) = run_cli(
        &["validate", "--config", docker_toml.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");

    // ...and agrees with the compose file.
    let settings = config::load(&root().join("config/docker.toml")).unwrap();
    let raw: toml::Value = toml::from_str(&read("config/docker.toml")).unwrap();
    let api = url::Url::parse(&settings.api.base_url).unwrap();
    assert_eq!(api.host_str(), Some("mock-api"));
    assert_eq!(api.port(), Some(mock_listen.port()));
    assert_eq!(raw["api"]["allow_insecure_http"].as_bool(), Some(true));
    let source = url::Url::parse(raw["source"]["url"].as_str().unwrap()).unwrap();
    assert_eq!(source.host_str(), Some("postgres"));
    assert_eq!(settings.source.mode, config::Mode::Replication);
    assert_eq!(settings.api.key.env, "COBI_API_KEY");
    assert!(env.contains_key("PGPASSWORD"), "the database password");
    let listen = settings.http.listen.expect("http.listen is set");
    assert!(
        listen.ip().is_unspecified(),
        "{listen}: reachable from the host"
    );
    let ports: Vec<String> = daemon["ports"]
        .as_sequence()
        .map(|s| s.iter().map(|p| p.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    assert!(
        ports
            .iter()
            .any(|p| p.ends_with(&format!(":{}", listen.port()))),
        "{ports:?}"
    );
    assert_eq!(settings.state.dir, Path::new("/var/lib/cobi-sync"));
    assert!(
        daemon_mounts
            .iter()
            .any(|(src, dst)| declared.contains(src.as_str())
                && Path::new(dst) == settings.state.dir),
        "state.dir must be a named volume"
    );

    // The init script: the role of the URL, SELECT on exactly the mapped
    // tables, and a publication of exactly them (cobi-sync would otherwise
    // try to change it, which only the owner may do).
    let sql = read("config/docker/init.sql");
    let role = source.username();
    assert!(
        sql.contains(&format!("CREATE ROLE {role} LOGIN REPLICATION")),
        "init.sql creates role {role} with LOGIN REPLICATION"
    );
    let tables = mapped_tables(&settings);
    assert_eq!(sql_list(&sql, "GRANT SELECT ON ", " TO "), tables);
    let publication = &settings.source.replication.publication;
    assert_eq!(
        sql_list(
            &sql,
            &format!("CREATE PUBLICATION {publication} FOR TABLE "),
            " WITH "
        ),
        tables
    );
}

/// What docker compose would run, without docker: init.sql on a fresh
/// PostgreSQL as the superuser, then the daemon with config/docker.toml as
/// is, pointed at this test's database and mock API through the
/// environment overlay, logged in as the least-privilege role. Everything
/// arrives, a live change follows, and SIGTERM exits 0.
#[tokio::test]
async fn compose_sample_database_syncs_through_the_least_privilege_role() {
    let db = Db::start().await;
    // psql meta-commands (`\set`) are not SQL.
    let init: String = read("config/docker/init.sql")
        .lines()
        .filter(|l| !l.trim_start().starts_with('\\'))
        .collect::<Vec<_>>()
        .join("\n");
    db.exec(&init).await;
    let mock = mock().await;
    let wd = Workdir::new();
    let url = db.url().replacen("postgres@", "cobi_sync@", 1);
    assert!(url.starts_with("postgres://cobi_sync@"), "{url}");
    let state = wd.path("state");
    let config = root().join("config/docker.toml");
    let settings = config::load(&config).unwrap();
    let log = wd.path("daemon.log");
    let base_url = mock.base_url();
    let mut d = Daemon::start_cmd(
        &config,
        &log,
        &["run"],
        &[
            ("COBI_SYNC__SOURCE__URL", url.as_str()),
            ("COBI_SYNC__API__BASE_URL", base_url.as_str()),
            ("COBI_SYNC__STATE__DIR", state.to_str().unwrap()),
            ("COBI_SYNC__HTTP__LISTEN", "127.0.0.1:0"),
            ("COBI_API_KEY", API_KEY),
        ],
    );
    let client = db.client().await;
    let diff = wait_in_sync(&settings, &client, &mock, Duration::from_secs(60), &d.log).await;
    assert!(diff.rows >= 80, "the sample data: {} rows", diff.rows);
    assert_eq!(mock.records("shops").len(), 12);

    client
        .batch_execute(
            "UPDATE merchant SET trade_name = 'Renamed', modified_at = now() WHERE id = 1;
             INSERT INTO internal_notes (body) VALUES ('not mapped');
             DELETE FROM purchase WHERE id = 3;",
        )
        .await
        .unwrap();
    wait_in_sync(&settings, &client, &mock, Duration::from_secs(30), &d.log).await;
    assert!(mock.records("shops").iter().any(|r| r["name"] == "Renamed"));
    assert_eq!(mock.stats().reference_failures, 0);

    let status = d.term().await;
    assert!(status.success(), "{status}\n{}", d.log_text());
}
