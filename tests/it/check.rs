//! `cobi-sync check`, table-driven: each case breaks one thing on a real
//! PostgreSQL (or the API) and asserts the message and the exit code.

use std::path::PathBuf;

use cobi_sync::pgtemp::PgTemp;

use crate::common::{mock, run_cli, set_mode, Workdir, API_KEY};

const TABLES: &str = r#"
CREATE TABLE merchant (id serial PRIMARY KEY, trade_name text NOT NULL, country text NOT NULL, listed bool NOT NULL DEFAULT true);
CREATE TABLE outlet (id serial PRIMARY KEY, merchant_id int NOT NULL, label text NOT NULL, country text NOT NULL);
INSERT INTO merchant (trade_name, country) VALUES ('A', 'gb');
GRANT SELECT ON merchant, outlet TO cobi;
"#;

const MAPPINGS: &str = r#"
[[mapping]]
type = "shops"
table = "public.merchant"
[mapping.fields]
shop_id = { column = "id", transform = "uuid5" }
name = "trade_name"
region = { column = "country", transform = "upper" }

[[mapping]]
type = "branches"
table = "public.outlet"
[mapping.fields]
branch_id = { column = "id", transform = "uuid5" }
shop_id = { column = "merchant_id", transform = "uuid5:shops" }
name = "label"
region = { column = "country", transform = "upper" }
"#;

struct Case {
    name: &'static str,
    /// SQL run (as postgres) in the case's fresh database after the tables.
    sql: &'static str,
    /// Edits to the config text: (from, to).
    edit: Vec<(&'static str, String)>,
    /// Expected exit code and output fragments.
    code: i32,
    want: Vec<&'static str>,
}

fn case(
    name: &'static str,
    sql: &'static str,
    edit: Vec<(&'static str, String)>,
    code: i32,
    want: Vec<&'static str>,
) -> Case {
    Case {
        name,
        sql,
        edit,
        code,
        want,
    }
}

async fn fresh_db(pg: &PgTemp, with_publication: bool) -> String {
    let db = pg.create_database(None).await.unwrap();
    let c = pg.connect(&db).await.unwrap();
    c.batch_execute(TABLES).await.unwrap();
    if with_publication {
        c.batch_execute("CREATE PUBLICATION cobi_test FOR TABLE merchant, outlet")
            .await
            .unwrap();
    }
    db
}

fn write_config(wd: &Workdir, url: &str, api: &str, edits: &[(&'static str, String)]) -> PathBuf {
    let mut text = std::fs::read_to_string(wd.config(url, api, "replication", MAPPINGS)).unwrap();
    for (from, to) in edits {
        assert!(text.contains(from), "edit `{from}` does not apply");
        text = text.replacen(from, to, 1);
    }
    let path = wd.path("check.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_check_names_the_problem_and_the_fix() {
    let pg = PgTemp::start().await.unwrap();
    let admin = pg.connect("postgres").await.unwrap();
    admin
        .batch_execute(
            "CREATE ROLE cobi LOGIN REPLICATION;
             CREATE ROLE plain LOGIN;",
        )
        .await
        .unwrap();
    let low = PgTemp::start_with(&["wal_level = replica"]).await.unwrap();
    low.connect("postgres")
        .await
        .unwrap()
        .batch_execute("CREATE ROLE cobi LOGIN REPLICATION;")
        .await
        .unwrap();
    let api = mock().await;
    let good_url = |db: &str| pg.url(db).replace("postgres@", "cobi@");

    let cases = vec![
        case(
            "all good",
            "",
            vec![],
            0,
            vec![
                "ok      database reachable",
                "ok      wal_level",
                "has REPLICATION",
                "lists every mapped table",
                "mapped columns trade_name, country can be stored out of line (TOAST)",
                "ALTER TABLE \"public\".\"merchant\" REPLICA IDENTITY FULL",
                "missing; the daemon creates it at start",
                "no state yet",
                "key accepted",
                "all checks passed",
            ],
        ),
        case(
            "config invalid",
            "",
            vec![("[batch]", "[batch]\nmax_records = 0".into())],
            2,
            vec!["PROBLEM configuration"],
        ),
        case(
            "database unreachable",
            "",
            vec![],
            1,
            vec!["PROBLEM database reachable", "connection refused"],
        ),
        case(
            "unknown role",
            "",
            vec![("cobi@", "nobody@".into())],
            1,
            vec!["PROBLEM database reachable", "nobody"],
        ),
        case(
            "superuser",
            "",
            vec![("cobi@", "postgres@".into())],
            1,
            vec![
                "PROBLEM least privilege",
                "superuser postgres",
                "CREATE ROLE cobi_sync LOGIN REPLICATION",
            ],
        ),
        case(
            "no REPLICATION",
            "",
            vec![("cobi@", "plain@".into())],
            1,
            vec![
                "PROBLEM privileges",
                "lacks the REPLICATION attribute",
                "ALTER ROLE \"plain\" REPLICATION",
            ],
        ),
        case(
            "no SELECT",
            "REVOKE SELECT ON outlet FROM cobi;",
            vec![],
            1,
            vec![
                "PROBLEM mapping[1] (branches)",
                "cannot SELECT",
                "GRANT SELECT ON \"public\".\"outlet\"",
            ],
        ),
        case(
            "missing table",
            "",
            vec![("public.outlet", "public.outlets".into())],
            1,
            vec!["PROBLEM mapping[1] (branches)", "does not exist"],
        ),
        case(
            "missing column",
            "",
            vec![("name = \"label\"", "name = \"title\"".into())],
            1,
            vec![
                "PROBLEM mapping[1] (branches)",
                "column `title` does not exist",
            ],
        ),
        case(
            "type not convertible",
            "",
            vec![(
                "name = \"trade_name\"",
                "name = \"trade_name\"\nis_public = \"country\"".into(),
            )],
            1,
            vec![
                "PROBLEM mapping[0] (shops)",
                "a text value cannot become field `is_public`",
            ],
        ),
        case(
            "replica identity nothing",
            "ALTER TABLE outlet REPLICA IDENTITY NOTHING;",
            vec![],
            1,
            vec![
                "PROBLEM replica identity",
                "REPLICA IDENTITY NOTHING",
                "ALTER TABLE \"public\".\"outlet\" REPLICA IDENTITY DEFAULT",
            ],
        ),
        case(
            "publication not creatable",
            "DROP PUBLICATION cobi_test;",
            vec![],
            1,
            vec![
                "PROBLEM publication cobi_test",
                "cannot create it",
                "CREATE PUBLICATION \"cobi_test\" FOR TABLE",
            ],
        ),
        case(
            "api key rejected",
            "",
            vec![],
            1,
            vec!["PROBLEM cobi api key", "rejected the key"],
        ),
        case(
            "api unreachable",
            "",
            vec![],
            1,
            vec!["PROBLEM cobi api key", "cannot reach"],
        ),
        case(
            "world-readable key file",
            "",
            vec![],
            1,
            vec![
                "PROBLEM secret file permissions",
                "readable by other users",
                "chmod 600",
            ],
        ),
        case(
            "wal_level replica",
            "",
            vec![],
            1,
            vec!["PROBLEM wal_level", "is `replica`", "wal_level = logical"],
        ),
        case(
            "slot of another database",
            "",
            vec![],
            1,
            vec![
                "PROBLEM replication slot cobi_test",
                "belongs to database postgres",
                "pg_drop_replication_slot('cobi_test')",
            ],
        ),
        case(
            "slot lost after progress",
            "",
            vec![],
            1,
            vec![
                "PROBLEM replication slot cobi_test",
                "confirmed changes up to",
                "cobi-sync snapshot",
            ],
        ),
    ];
    for c in cases {
        let wd = Workdir::new();
        let on_low = c.name == "wal_level replica";
        let cluster = if on_low { &low } else { &pg };
        let db = fresh_db(cluster, true).await;
        if !c.sql.is_empty() {
            cluster
                .connect(&db)
                .await
                .unwrap()
                .batch_execute(c.sql)
                .await
                .unwrap();
        }
        let url = if on_low {
            low.url(&db).replace("postgres@", "cobi@")
        } else if c.name == "database unreachable" {
            "postgres://cobi@127.0.0.1:1/shop".to_string()
        } else {
            good_url(&db)
        };
        let api_url = if c.name == "api unreachable" {
            "http://127.0.0.1:1".to_string()
        } else {
            api.base_url()
        };
        let cfg = write_config(&wd, &url, &api_url, &c.edit);
        match c.name {
            "api key rejected" => std::fs::write(wd.path("api-key"), "not-the-key").unwrap(),
            "world-readable key file" => set_mode(&wd.path("api-key"), 0o644),
            "slot lost after progress" => {
                let store = cobi_sync::state::SledStore::open(&wd.path("state")).unwrap();
                use cobi_sync::state::{Checkpoint, ReplicationCheckpoint, StateStore, Write};
                store
                    .apply(&[Write::Checkpoint(Checkpoint::Replication(
                        ReplicationCheckpoint {
                            lsn: 0x016B_3748,
                            tables: Default::default(),
                        },
                    ))])
                    .unwrap();
                store.flush().unwrap();
            }
            _ => {}
        }
        if c.name == "slot of another database" {
            admin
                .batch_execute("SELECT pg_create_logical_replication_slot('cobi_test', 'pgoutput')")
                .await
                .unwrap();
        }
        let (code, out, err) = run_cli(&["check", "--config", cfg.to_str().unwrap()], &[]);
        if c.name == "slot of another database" {
            admin
                .batch_execute("SELECT pg_drop_replication_slot('cobi_test')")
                .await
                .unwrap();
        }
        if c.name != "slot lost after progress" {
            // `check` inspects state; it never creates the state dir.
            assert!(
                !wd.path("state").exists(),
                "case `{}`: check created the state dir",
                c.name
            );
        }
        for w in &c.want {
            assert!(
                out.contains(w) || err.contains(w),
                "case `{}`: want `{w}` in:\n{out}\n{err}",
                c.name
            );
        }
        assert_eq!(code, c.code, "case `{}` exit code\n{out}\n{err}", c.name);
        assert!(
            !out.contains("panicked") && !err.contains("panicked"),
            "{}",
            c.name
        );
    }
    let _ = API_KEY;
}

/// `check`'s API line passes only on the API's own envelope answer: a 404,
/// a 405, a 5xx, a redirect (never followed) and an HTML 200 from a proxy
/// or portal are problem lines naming what came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_probe_accepts_only_the_api_itself() {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let api = mock().await;
    let (lst, port) = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let p = l.local_addr().unwrap().port();
        (l, p)
    };
    let real = api.base_url();
    let app =
        axum::Router::new()
            .route(
                "/notfound/v1/data/shops",
                axum::routing::post(|| async {
                    (StatusCode::NOT_FOUND, "no such route").into_response()
                }),
            )
            .route(
                "/redirect/v1/data/shops",
                axum::routing::post(move || {
                    let to = format!("{real}/v1/data/shops");
                    async move {
                        (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, to)]).into_response()
                    }
                }),
            )
            .route(
                "/portal/v1/data/shops",
                axum::routing::post(|| async {
                    (
                        [(header::CONTENT_TYPE, "text/html")],
                        "<html><body>Please sign in to continue</body></html>",
                    )
                        .into_response()
                }),
            )
            .route(
                "/broken/v1/data/shops",
                axum::routing::post(|| async { StatusCode::BAD_GATEWAY.into_response() }),
            );
    let server = tokio::spawn(async move { axum::serve(lst, app).await });
    let cases = [
        (format!("http://127.0.0.1:{port}/notfound"), "HTTP 404"),
        (
            format!("http://127.0.0.1:{port}/redirect"),
            "redirect (HTTP 307 to",
        ),
        (
            format!("http://127.0.0.1:{port}/portal"),
            "HTTP 200 (text/html) without the Cobi API's JSON envelope",
        ),
        (format!("http://127.0.0.1:{port}/broken"), "HTTP 502"),
        (api.base_url(), "key accepted (HTTP 400 to an empty batch)"),
    ];
    for (base, want) in cases {
        let wd = Workdir::new();
        // The database is down: only the API line is looked at.
        let cfg = write_config(&wd, "postgres://cobi@127.0.0.1:1/shop", &base, &[]);
        let (code, out, err) = run_cli(&["check", "--config", cfg.to_str().unwrap()], &[]);
        assert_eq!(code, 1, "{out}{err}");
        let line = out
            .lines()
            .find(|l| l.contains("cobi api key"))
            .unwrap_or_else(|| panic!("no api line:\n{out}"));
        let passed = base == api.base_url();
        assert_eq!(line.starts_with("ok"), passed, "{base}: {line}");
        if !passed {
            assert!(line.starts_with("PROBLEM"), "{base}: {line}");
        }
        assert!(line.contains(want), "{base}: want `{want}` in {line}");
    }
    // The redirect was not followed: the real API saw only the direct probe.
    let served: u64 = api.stats().requests_by_status.values().sum();
    assert_eq!(served, 1, "{:?}", api.stats().requests_by_status);
    server.abort();
}
