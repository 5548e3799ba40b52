//! `sslmode` is honoured, including `verify-full`, for the query
//! connections (tokio-postgres + rustls) and the replication stream
//! (pgwire-replication + rustls), against a real PostgreSQL with TLS.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cobi_sync::config::pgurl::PgUrl;
use cobi_sync::pgtemp::PgTemp;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

use crate::common::{mock, run_cli, Daemon, Workdir};
use crate::partner::{self, wait_in_sync};

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    Ca {
        cert: p.self_signed(&key).unwrap(),
        key,
    }
}

/// Writes a server certificate for `names` signed by `ca` into the data
/// dir (owned by the server's user) and turns TLS on.
async fn enable_tls(pg: &PgTemp, ca: &Ca, names: &[&str]) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, names[0]);
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    let dir = pg.data_dir();
    let meta = std::fs::metadata(dir).unwrap();
    for (file, text) in [
        ("server.crt", cert.pem()),
        ("server.key", key.serialize_pem()),
    ] {
        let path = dir.join(file);
        std::fs::write(&path, text).unwrap();
        std::os::unix::fs::chown(&path, Some(meta.uid()), Some(meta.gid())).unwrap();
        crate::common::set_mode(&path, 0o600);
    }
    let c = pg.connect("postgres").await.unwrap();
    for sql in [
        "ALTER SYSTEM SET ssl_cert_file = 'server.crt'",
        "ALTER SYSTEM SET ssl_key_file = 'server.key'",
        "ALTER SYSTEM SET ssl = on",
        "SELECT pg_reload_conf()",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
}

fn write_ca(dir: &Path, name: &str, ca: &Ca) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, ca.cert.pem()).unwrap();
    p
}

/// Connects with the product's code and says whether the session is
/// encrypted.
async fn encrypted(url: &str) -> Result<bool, String> {
    let u = PgUrl::parse(url).unwrap();
    let c = cobi_sync::source::pg::connect_url(&u, None)
        .await
        .map_err(|e| e.message)?;
    let r = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_is_honoured_including_verify_full() {
    let pg = PgTemp::start().await.unwrap();
    let db = pg.create_database(None).await.unwrap();
    let good = ca("cobi test CA");
    let other = ca("some other CA");
    enable_tls(&pg, &good, &["127.0.0.1", "localhost"]).await;
    let wd = Workdir::new();
    let good_pem = write_ca(wd.dir.path(), "ca.pem", &good);
    let other_pem = write_ca(wd.dir.path(), "other.pem", &other);
    let port = pg.port();
    let url = |host: &str, mode: &str, root: Option<&Path>| {
        let mut u = format!("postgres://postgres@{host}:{port}/{db}?sslmode={mode}");
        if let Some(r) = root {
            u.push_str(&format!("&sslrootcert={}", r.display()));
        }
        u
    };
    assert_eq!(
        encrypted(&url("127.0.0.1", "verify-full", Some(&good_pem))).await,
        Ok(true)
    );
    assert_eq!(
        encrypted(&url("localhost", "verify-full", Some(&good_pem))).await,
        Ok(true)
    );
    assert_eq!(
        encrypted(&url("127.0.0.1", "require", None)).await,
        Ok(true)
    );
    assert_eq!(encrypted(&url("127.0.0.1", "prefer", None)).await, Ok(true));
    assert_eq!(
        encrypted(&url("127.0.0.1", "disable", None)).await,
        Ok(false)
    );
    // The wrong CA is refused by verify-ca and verify-full, with a message
    // saying what to fix.
    for mode in ["verify-ca", "verify-full"] {
        let err = encrypted(&url("127.0.0.1", mode, Some(&other_pem)))
            .await
            .unwrap_err();
        assert!(
            err.contains("TLS") && err.contains("sslrootcert"),
            "{mode}: {err}"
        );
    }
    // A certificate for other names: verify-full refuses, verify-ca accepts.
    enable_tls(&pg, &good, &["db.example.internal"]).await;
    let err = encrypted(&url("127.0.0.1", "verify-full", Some(&good_pem)))
        .await
        .unwrap_err();
    assert!(err.contains("TLS"), "{err}");
    assert_eq!(
        encrypted(&url("127.0.0.1", "verify-ca", Some(&good_pem))).await,
        Ok(true)
    );
    // `check` explains it too.
    let api = mock().await;
    let cfg = wd.config(&url("127.0.0.1", "verify-full", Some(&good_pem)), &api.base_url(), "poll", "[[mapping]]\ntype = \"tags\"\ntable = \"t\"\n[mapping.fields]\ntag_id = \"id\"\nname = \"n\"");
    let (code, out, _) = run_cli(&["check", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(
        out.contains("PROBLEM database reachable") && out.contains("sslmode=verify-full"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_streams_over_verify_full() {
    let pg = PgTemp::start().await.unwrap();
    let db = pg.create_database(None).await.unwrap();
    let good = ca("cobi test CA");
    enable_tls(&pg, &good, &["localhost"]).await;
    let c = pg.connect(&db).await.unwrap();
    c.batch_execute(partner::SCHEMA).await.unwrap();
    c.batch_execute(&partner::seed_sql(20)).await.unwrap();
    let wd = Workdir::new();
    let pem = write_ca(wd.dir.path(), "ca.pem", &good);
    // verify-full checks the host name: connect by the certificate's name.
    let url = format!(
        "postgres://postgres@localhost:{}/{db}?sslmode=verify-full&sslrootcert={}",
        pg.port(),
        pem.display()
    );
    let mock = mock().await;
    let cfg = wd.config(&url, &mock.base_url(), "replication", partner::MAPPINGS);
    let settings = cobi_sync::config::load(&cfg).unwrap();
    let d = Daemon::start(&cfg, &wd.path("daemon.log"));
    wait_in_sync(&settings, &c, &mock, Duration::from_secs(60), &d.log).await;
    c.batch_execute("INSERT INTO merchant (trade_name, country) VALUES ('Over TLS', 'gb');")
        .await
        .unwrap();
    wait_in_sync(&settings, &c, &mock, Duration::from_secs(30), &d.log).await;
    // The walsender's session is encrypted.
    let r = c
        .query_one(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_replication r ON r.pid = s.pid LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    assert!(
        r.get::<_, bool>(0),
        "the replication connection is not encrypted"
    );
    drop(d);
    // An IP address cannot be verified by name on the replication
    // connection: a clear, fatal error rather than endless retries.
    let ip_url = url.replace("@localhost:", "@127.0.0.1:");
    enable_tls(&pg, &good, &["localhost", "127.0.0.1"]).await;
    let cfg = wd.config(&ip_url, &mock.base_url(), "replication", partner::MAPPINGS);
    let (code, _, err) = run_cli(&["run", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("verify-full checks the host name"), "{err}");
}
