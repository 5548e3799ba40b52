//! The partner-shaped dataset of the e2e benchmark: shops → branches
//! (integer keys) → offers and customers (UUID keys) → transactions (UUID
//! keys, referencing all four), every table `REPLICA IDENTITY FULL`, the
//! default mapping options, replication mode. Phases:
//!
//! - COPY binary of the five tables to /dev/null (median of 3): the read
//!   ceiling the initial sync is compared with;
//! - the initial sync (`snapshot = "initial"`), from process start until
//!   the mock holds every record: rows/s, daemon CPU per record
//!   (`/proc/PID/stat`), peak RSS, state dir bytes per record;
//! - the same initial sync once more with `on_delete = "ignore"` (no
//!   delete images: the state with fingerprints only), on a slot of its
//!   own;
//! - a streaming burst of inserts into `transaction` in 10 000-row
//!   transactions while the daemon streams, compared with
//!   `pg_recvlogical` over the same WAL and with the commit rate;
//! - latency: 1 000 single-row commits/s, and 5 000 rows/s in 10-row
//!   transactions, commit → received at an in-harness receiver;
//! - re-syncs: `cobi-sync snapshot --force` of the unchanged dataset in
//!   poll mode, three times, and the state dir after each.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::proc::{log_tail, Proc};
use super::report::{median, Row, Target};
use crate::{wait_slot, Cfg, Env, MockProc};

/// Rows per table.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub shops: u64,
    pub branches: u64,
    pub offers: u64,
    pub customers: u64,
    pub transactions: u64,
}

impl Sizes {
    /// About `total` records: 0.1 % shops, 1 % branches, 5 % offers, 20 %
    /// customers, the rest transactions.
    pub fn of(total: u64) -> Sizes {
        let part = |per_mille: u64| (total * per_mille / 1000).max(10);
        let (shops, branches, offers, customers) = (part(1), part(10), part(50), part(200));
        Sizes {
            shops,
            branches,
            offers,
            customers,
            transactions: total
                .saturating_sub(shops + branches + offers + customers)
                .max(10),
        }
    }

    pub fn total(&self) -> u64 {
        self.shops + self.branches + self.offers + self.customers + self.transactions
    }

    /// (Cobi type, table, rows).
    pub fn types(&self) -> [(&'static str, &'static str, u64); 5] {
        [
            ("shops", "shop", self.shops),
            ("branches", "branch", self.branches),
            ("offers", "offer", self.offers),
            ("customers", "customer", self.customers),
            ("transactions", "transaction", self.transactions),
        ]
    }
}

const SCHEMA: &str = "
CREATE TABLE shop (id int PRIMARY KEY, name text NOT NULL, cc text NOT NULL,
    listed boolean NOT NULL, created_at timestamptz NOT NULL);
CREATE TABLE branch (id int PRIMARY KEY, shop_id int NOT NULL, name text NOT NULL, cc text NOT NULL,
    lat numeric(9,6), lng numeric(9,6), created_at timestamptz NOT NULL);
CREATE TABLE offer (id uuid PRIMARY KEY, shop_id int NOT NULL, title text NOT NULL, kind text NOT NULL,
    amount numeric(10,2) NOT NULL, cc text NOT NULL, valid_from timestamptz, valid_to timestamptz,
    created_at timestamptz NOT NULL);
CREATE TABLE customer (id uuid PRIMARY KEY, user_id uuid NOT NULL, dob date, cc text NOT NULL, sex text,
    created_at timestamptz NOT NULL);
CREATE TABLE transaction (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), customer_id uuid NOT NULL,
    shop_id int NOT NULL, offer_id uuid, branch_id int, cc text NOT NULL, channel text,
    saved numeric(12,2) NOT NULL, total numeric(12,2) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now());
ALTER TABLE shop REPLICA IDENTITY FULL;
ALTER TABLE branch REPLICA IDENTITY FULL;
ALTER TABLE offer REPLICA IDENTITY FULL;
ALTER TABLE customer REPLICA IDENTITY FULL;
ALTER TABLE transaction REPLICA IDENTITY FULL;
";

/// The mappings: default options (`on_delete = "soft"`), no cursors.
pub const MAPPINGS: &str = r#"
[[mapping]]
type = "shops"
table = "public.shop"
[mapping.fields]
shop_id = { column = "id", transform = "uuid5" }
name = "name"
region = { column = "cc", transform = "upper" }
is_public = "listed"
created = "created_at"

[[mapping]]
type = "branches"
table = "public.branch"
[mapping.fields]
branch_id = { column = "id", transform = "uuid5" }
shop_id = { column = "shop_id", transform = "uuid5:shops" }
name = "name"
region = { column = "cc", transform = "upper" }
latitude = "lat"
longitude = "lng"
created = "created_at"

[[mapping]]
type = "offers"
table = "public.offer"
[mapping.fields]
offer_id = "id"
shop_id = { column = "shop_id", transform = "uuid5:shops" }
name = "title"
type = "kind"
value = "amount"
region = { column = "cc", transform = "upper" }
allowed_from = "valid_from"
allowed_to = "valid_to"
created = "created_at"

[[mapping]]
type = "customers"
table = "public.customer"
[mapping.fields]
customer_id = "id"
user_id = "user_id"
birthdate = "dob"
region = { column = "cc", transform = "upper" }
gender = "sex"
created = "created_at"

[[mapping]]
type = "transactions"
table = "public.transaction"
[mapping.fields]
transaction_id = "id"
student_id = "customer_id"
shop_id = { column = "shop_id", transform = "uuid5:shops" }
offer_id = "offer_id"
branch_id = { column = "branch_id", transform = "uuid5:branches" }
region = { column = "cc", transform = "upper" }
source = "channel"
savings = "saved"
amount = "total"
created = "created_at"
"#;

/// The same mappings with `on_delete = "ignore"`: no delete images, the
/// state keeps fingerprints only (the issue's ≤ 100 B/record target).
pub fn fingerprint_only_mappings() -> String {
    const FIELDS: &str = "\n[mapping.fields]\n";
    assert_eq!(MAPPINGS.matches(FIELDS).count(), 5, "one per mapping");
    MAPPINGS.replace(FIELDS, "\non_delete = \"ignore\"\n[mapping.fields]\n")
}

/// The same mappings for poll mode (each table gets its cursor).
pub fn poll_mappings() -> String {
    MAPPINGS.replace(
        "\n[mapping.fields]\n",
        "\ncursor = \"created_at\"\n[mapping.fields]\n",
    )
}

/// Transactions `from..from+count` (`g` numbers them; ids are random).
pub fn transactions_sql(s: &Sizes, from: u64, count: u64) -> String {
    format!(
        "INSERT INTO transaction (customer_id, shop_id, offer_id, branch_id, cc, channel, saved, total, created_at)
         SELECT md5('c' || (1 + g % {c}))::uuid, 1 + g % {sh},
                CASE WHEN g % 3 = 0 THEN NULL ELSE md5('o' || (1 + g % {o}))::uuid END,
                1 + g % {b}, (ARRAY['gb','us','ca','fr'])[1 + g % 4],
                CASE WHEN g % 2 = 0 THEN 'online' ELSE 'in-store' END,
                (g % 1000) / 100.0, 1 + (g % 100000) / 100.0,
                timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second'
         FROM generate_series({from}, {to}) g",
        c = s.customers,
        sh = s.shops,
        o = s.offers,
        b = s.branches,
        to = from + count - 1
    )
}

/// Creates database `db` with the partner tables and `s` rows.
pub async fn make_database(env: &Env, db: &str, s: &Sizes) -> Result<()> {
    let t = Instant::now();
    env.pg.create_database(Some(db)).await?;
    let c = env.client(db).await?;
    c.batch_execute(SCHEMA).await.context("partner schema")?;
    c.batch_execute(&format!(
        "INSERT INTO shop SELECT g, 'Shop ' || g, (ARRAY['gb','us','ca','fr'])[1 + g % 4], g % 5 <> 0,
                timestamptz '2023-06-01 00:00:00+00' + g * interval '1 minute'
         FROM generate_series(1, {sh}) g;
         INSERT INTO branch SELECT g, 1 + g % {sh}, 'Branch ' || g, 'gb', 51.5 + (g % 1000) / 10000.0,
                -0.12 - (g % 1000) / 10000.0, timestamptz '2023-06-01 00:00:00+00' + g * interval '1 minute'
         FROM generate_series(1, {b}) g;
         INSERT INTO offer SELECT md5('o' || g)::uuid, 1 + g % {sh}, 'Offer ' || g,
                (ARRAY['percentage','fixed'])[1 + g % 2], 5 + g % 20, 'gb',
                timestamptz '2024-01-01 00:00:00+00', CASE WHEN g % 2 = 0 THEN NULL ELSE timestamptz '2025-01-01 00:00:00+00' END,
                timestamptz '2023-06-01 00:00:00+00' + g * interval '1 second'
         FROM generate_series(1, {o}) g;",
        sh = s.shops,
        b = s.branches,
        o = s.offers
    ))
    .await
    .context("shops, branches, offers")?;
    let step = 500_000;
    let mut from = 1;
    while from <= s.customers {
        let n = step.min(s.customers - from + 1);
        c.batch_execute(&format!(
            "INSERT INTO customer SELECT md5('c' || g)::uuid, md5('u' || g)::uuid, DATE '1995-01-01' + g % 3000,
                    (ARRAY['gb','us','ca','fr'])[1 + g % 4], (ARRAY['M','F',NULL])[1 + g % 3],
                    timestamptz '2023-06-01 00:00:00+00' + g * interval '1 second'
             FROM generate_series({from}, {to}) g",
            to = from + n - 1
        ))
        .await
        .context("customers")?;
        from += n;
    }
    let mut from = 1;
    while from <= s.transactions {
        let n = step.min(s.transactions - from + 1);
        c.batch_execute(&transactions_sql(s, from, n))
            .await
            .context("transactions")?;
        from += n;
    }
    for (_, t, _) in s.types() {
        c.batch_execute(&format!("VACUUM ANALYZE {t}")).await?;
    }
    eprintln!(
        "  database {db}: {} shops, {} branches, {} offers, {} customers, {} transactions in {:.1}s",
        s.shops,
        s.branches,
        s.offers,
        s.customers,
        s.transactions,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Apparent size of every file under `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if let Ok(m) = e.metadata() {
            total += if m.is_dir() {
                dir_bytes(&e.path())
            } else {
                m.len()
            };
        }
    }
    total
}

/// COPY binary of the five tables to /dev/null, median of 3.
pub async fn phase_copy(env: &Env, db: &str, s: &Sizes) -> Result<Row> {
    use futures_util::StreamExt;
    let c = env.client(db).await?;
    let mut secs = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        for (_, table, _) in s.types() {
            let sql = format!("COPY {table} TO STDOUT (FORMAT binary)");
            let stream = c.copy_out(sql.as_str()).await?;
            futures_util::pin_mut!(stream);
            while let Some(chunk) = stream.next().await {
                chunk?;
            }
        }
        secs.push(t.elapsed().as_secs_f64());
    }
    let all = secs
        .iter()
        .map(|s| format!("{s:.2}"))
        .collect::<Vec<_>>()
        .join("/");
    Ok(Row::measured(
        "partner: COPY binary of the 5 tables → /dev/null (read ceiling)",
        s.total(),
        median(&mut secs),
    )
    .note(format!("median of 3 ({all} s)")))
}

/// Waits until the mock holds at least `want` records of each type.
async fn wait_types(
    mock: &MockProc,
    want: &[(&str, u64)],
    timeout: Duration,
    d: &mut Proc,
) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let stats = mock.stats().await?;
        let short: Vec<String> = want
            .iter()
            .filter_map(|(ty, n)| {
                let got = stats.records_accepted.get(*ty).copied().unwrap_or(0);
                (got < *n).then(|| format!("{ty} {got}/{n}"))
            })
            .collect();
        if short.is_empty() {
            return Ok(Instant::now());
        }
        if !d.is_running() {
            let how = d.try_reap().map(|e| e.describe()).unwrap_or_default();
            bail!(
                "{} exited ({how}); missing {}; log tail:\n{}",
                d.name,
                short.join(", "),
                d.log_tail(30)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "timed out after {timeout:?}: {}; log tail:\n{}",
                short.join(", "),
                d.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `perf record` of a daemon while a phase runs, when
/// `COBI_BENCH_PERF_DIR` is set (`<dir>/<name>.perf`; read it with `perf
/// report -i`), of `COBI_BENCH_PERF_EVENT` (default `cpu-clock`;
/// `page-faults`, sampled like the clock at ~999 Hz, shows where the
/// daemon touches fresh memory). Stopped (and written) when dropped.
pub struct Profile(Option<Proc>);

impl Profile {
    pub fn attach(env: &Env, d: &Proc, name: &str) -> Profile {
        let Ok(dir) = std::env::var("COBI_BENCH_PERF_DIR") else {
            return Profile(None);
        };
        let _ = std::fs::create_dir_all(&dir);
        let event = std::env::var("COBI_BENCH_PERF_EVENT").unwrap_or_else(|_| "cpu-clock".into());
        let mut cmd = Command::new("perf");
        cmd.args([
            "record",
            "-e",
            &event,
            "-F",
            "999",
            "--call-graph",
            "dwarf,16384",
            "-o",
        ])
        .arg(Path::new(&dir).join(format!("{name}.perf")))
        .arg("-p")
        .arg(d.pid().to_string());
        match Proc::spawn("perf record", cmd, &env.path(&format!("{name}-perf.log"))) {
            Ok(p) => Profile(Some(p)),
            Err(e) => {
                eprintln!("  ! perf record not started: {e:#}");
                Profile(None)
            }
        }
    }

    pub async fn stop(mut self) {
        if let Some(mut p) = self.0.take() {
            unsafe { libc::kill(p.pid(), libc::SIGINT) };
            let _ = p.wait(Duration::from_secs(120)).await;
        }
    }
}

/// Counts ERROR lines of a log.
fn errors_in(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("ERROR"))
        .count()
}

/// What the initial sync leaves for the burst: the mock holding the
/// parents, and the config whose state and slot the burst resumes.
pub struct Synced {
    pub mock: MockProc,
    pub cfg: std::path::PathBuf,
    pub state: std::path::PathBuf,
    pub log: std::path::PathBuf,
}

/// What an initial sync runs with: its mappings and its slot.
pub struct Variant<'a> {
    pub mappings: &'a str,
    pub slot: &'a str,
}

/// The default mappings on the slot the burst resumes.
pub const DEFAULT: Variant<'static> = Variant {
    mappings: MAPPINGS,
    slot: "cobi_partner",
};

/// One initial sync from a fresh state dir and slot. `label` names the row.
pub async fn phase_sync(
    env: &Env,
    db: &str,
    s: &Sizes,
    v: &Variant<'_>,
    name: &str,
    label: &str,
) -> Result<(Row, Synced)> {
    let c = env.client(db).await?;
    let slot = v.slot;
    if crate::slot_exists(&c, slot, false).await? {
        c.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await?;
    }
    let mock = MockProc::start(env, &format!("{name}-mock"))?;
    let cfg = env.config_of(&Cfg {
        name,
        db,
        api: &mock.url,
        mode: "replication",
        snapshot: "initial",
        slot,
        linger: "1s",
        publication: "cobi_partner",
        mappings: v.mappings,
    })?;
    let log = env.path(&format!("{name}.log"));
    let _ = std::fs::remove_file(&log);
    let mut d = Proc::spawn(
        "cobi-sync run (partner sync)",
        env.daemon_cmd(&cfg, &["run"]),
        &log,
    )?;
    let perf = Profile::attach(env, &d, name);
    let want: Vec<(&str, u64)> = s.types().iter().map(|(ty, _, n)| (*ty, *n)).collect();
    let done = wait_types(
        &mock,
        &want,
        Duration::from_secs(600 + s.total() / 1_000),
        &mut d,
    )
    .await?;
    let secs = (done - d.started).as_secs_f64();
    d.sample_now();
    let cpu = d.cpu_secs_now().unwrap_or(f64::NAN);
    perf.stop().await;
    let e = d.term(Duration::from_secs(30)).await;
    let state = env.path(&format!("{name}-state"));
    let mut row = Row::measured(label, s.total(), secs);
    row.rss_mib = Some(d.peak_rss_mib());
    row.cpu_us = Some(cpu * 1e6 / s.total() as f64);
    row.state_bpr = Some(dir_bytes(&state) as f64 / s.total() as f64);
    row.add_note(format!(
        "{cpu:.1} CPU s (mock-api: {:.1}); process start → the mock holds all {} records",
        mock.proc.cpu_secs_now().unwrap_or(f64::NAN),
        s.total()
    ));
    if !e.success() {
        row.add_note(format!("stopped with {} on SIGTERM", e.describe()));
    }
    let rejected: u64 = mock.stats().await?.records_rejected.values().sum();
    if rejected > 0 {
        row.add_note(format!("{rejected} records REJECTED by the mock"));
    }
    let errors = errors_in(&log);
    if errors > 0 {
        row.add_note(format!("{errors} ERROR log lines (see {})", log.display()));
    }
    Ok((
        row,
        Synced {
            mock,
            cfg,
            state,
            log,
        },
    ))
}

/// One initial sync whose mappings keep no delete images
/// (`on_delete = "ignore"`), on a slot of its own (dropped after, so the
/// burst's slot is untouched): what the state costs with fingerprints
/// only. The default mappings keep an image per record (see the README's
/// state store section).
async fn fingerprint_only(env: &Env, s: &Sizes) -> Row {
    const LABEL: &str = "partner: initial sync, on_delete = \"ignore\" (fingerprints only)";
    let mappings = fingerprint_only_mappings();
    let v = Variant {
        mappings: &mappings,
        slot: "cobi_partner_fp",
    };
    // The mock goes with `Synced` (dropped here); the daemon has stopped.
    let r = phase_sync(env, "partner", s, &v, "partner-sync-fp", LABEL)
        .await
        .map(|(row, _synced)| row);
    // Its walsender may hold the slot for a moment after the daemon
    // exits: dropped once inactive (a slot left behind would hold WAL
    // through the burst).
    let dropped = async {
        let c = env.client("partner").await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = c
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                     WHERE slot_name = $1 AND NOT active",
                    &[&v.slot],
                )
                .await;
            if !crate::slot_exists(&c, v.slot, false).await? {
                return anyhow::Ok(());
            }
            if Instant::now() > deadline {
                bail!("slot {} still exists: {r:?}", v.slot);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let r = match (r, dropped.await) {
        (r, Ok(())) => r,
        (Ok(mut row), Err(e)) => {
            row.add_note(format!("{e:#}"));
            Ok(row)
        }
        (Err(e), Err(_)) => Err(e),
    };
    r.unwrap_or_else(|e| Row::failed(LABEL, format!("{e:#}")))
}

/// The burst: `rows` inserts into `transaction` in transactions of
/// `per_tx` rows while the daemon streams. Returns the daemon's row, the
/// `pg_recvlogical` row and the commit rate.
pub async fn phase_burst(
    env: &Env,
    db: &str,
    s: &Sizes,
    synced: &Synced,
    rows: u64,
    per_tx: u64,
) -> Result<(Row, Row, f64)> {
    let c = env.client(db).await?;
    let mut d = Proc::spawn(
        "cobi-sync run (partner burst)",
        env.daemon_cmd(&synced.cfg, &["run"]),
        &synced.log,
    )?;
    wait_slot(&c, "cobi_partner", true, &mut d, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refs = ["partner_ref_1", "partner_ref_2", "partner_ref_3"];
    for r in refs {
        c.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&r],
        )
        .await
        .with_context(|| format!("creating slot {r}"))?;
    }
    let before = synced.mock.accepted("transactions").await?;
    let perf = Profile::attach(env, &d, "partner-burst");
    let cpu0 = d.cpu_secs_now().unwrap_or(f64::NAN);
    let t0 = Instant::now();
    let mut from = s.transactions + 1;
    let end = from + rows;
    while from < end {
        let n = per_tx.min(end - from);
        c.batch_execute(&transactions_sql(s, from, n)).await?;
        from += n;
    }
    let insert_secs = t0.elapsed().as_secs_f64();
    let commit_rate = rows as f64 / insert_secs;
    let endpos: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let done = synced
        .mock
        .wait_accepted(
            "transactions",
            before + rows,
            Duration::from_secs(300 + rows / 1_000),
            &mut d,
        )
        .await?;
    let secs = (done - t0).as_secs_f64();
    d.sample_now();
    let cpu = d.cpu_secs_now().unwrap_or(f64::NAN) - cpu0;
    perf.stop().await;
    let e = d.term(Duration::from_secs(30)).await;
    let mut row = Row::measured(
        &format!("partner: streaming burst, {per_tx}-row transactions → mock-api"),
        rows,
        secs,
    );
    row.rss_mib = Some(d.peak_rss_mib());
    row.cpu_us = Some(cpu * 1e6 / rows as f64);
    row.state_bpr = Some(dir_bytes(&synced.state) as f64 / (s.total() + rows) as f64);
    row.add_note(format!(
        "{cpu:.1} CPU s; first insert → the mock holds all; inserts committed in {insert_secs:.2} s ({commit_rate:.0} rows/s); state B/record over {} tracked",
        s.total() + rows
    ));
    if !e.success() {
        row.add_note(format!("stopped with {} on SIGTERM", e.describe()));
    }
    let recv = recvlogical(env, db, &c, &refs, &endpos, rows).await?;
    Ok((row, recv, commit_rate))
}

/// `pg_recvlogical` drains each reference slot to `endpos` (median of 3).
async fn recvlogical(
    env: &Env,
    db: &str,
    c: &tokio_postgres::Client,
    slots: &[&str],
    endpos: &str,
    rows: u64,
) -> Result<Row> {
    let bin = env.pg.bindir().join("pg_recvlogical");
    let mut times = Vec::new();
    for s in slots {
        let mut cmd = Command::new(&bin);
        cmd.args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            db,
            "--no-loop",
            "--start",
        ])
        .arg("-p")
        .arg(env.pg.port().to_string())
        .arg("--slot")
        .arg(s)
        .arg("--endpos")
        .arg(endpos)
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=cobi_partner",
            "-f",
            "/dev/null",
        ]);
        let log = env.path("partner-pg_recvlogical.log");
        let mut p = Proc::spawn("pg_recvlogical", cmd, &log)?;
        let e = p.wait(Duration::from_secs(300 + rows / 2_000)).await?;
        if !e.success() {
            bail!(
                "pg_recvlogical ended with {}: {}",
                e.describe(),
                log_tail(&log, 5)
            );
        }
        times.push(e.wall.as_secs_f64());
        c.execute("SELECT pg_drop_replication_slot($1)", &[s])
            .await
            .ok();
    }
    let all = times
        .iter()
        .map(|s| format!("{s:.2}"))
        .collect::<Vec<_>>()
        .join("/");
    Ok(Row::measured(
        "partner: pg_recvlogical over the burst → /dev/null",
        rows,
        median(&mut times),
    )
    .note(format!("median of 3 slots ({all} s), --endpos {endpos}")))
}

/// `cobi-sync snapshot --force` of the unchanged dataset in poll mode, on
/// one state dir, `times` times: the state dir after each.
pub async fn phase_resyncs(
    env: &Env,
    db: &str,
    s: &Sizes,
    times: usize,
) -> Result<Vec<(f64, u64)>> {
    let mock = MockProc::start(env, "partner-resync-mock")?;
    let mappings = poll_mappings();
    let cfg = env.config_of(&Cfg {
        name: "partner-resync",
        db,
        api: &mock.url,
        mode: "poll",
        snapshot: "initial",
        slot: "cobi_unused",
        linger: "1s",
        publication: "cobi_unused",
        mappings: &mappings,
    })?;
    let state = env.path("partner-resync-state");
    let log = env.path("partner-resync.log");
    let mut out = Vec::new();
    for i in 0..=times {
        let args: &[&str] = if i == 0 {
            &["snapshot"]
        } else {
            &["snapshot", "--force"]
        };
        let mut p = Proc::spawn("cobi-sync snapshot", env.daemon_cmd(&cfg, args), &log)?;
        let e = p.wait(Duration::from_secs(600 + s.total() / 1_000)).await?;
        if !e.success() {
            bail!(
                "`snapshot {}` ended with {}; log tail:\n{}",
                args.join(" "),
                e.describe(),
                log_tail(&log, 20)
            );
        }
        out.push((e.wall.as_secs_f64(), dir_bytes(&state)));
    }
    Ok(out)
}

/// A partner latency run: `rate` rows/s in `per_tx`-row transactions.
pub async fn phase_latency(
    env: &Env,
    db: &str,
    s: &Sizes,
    rate: u64,
    per_tx: u64,
) -> Result<crate::Latency> {
    let insert = format!(
        "INSERT INTO transaction (customer_id, shop_id, offer_id, branch_id, cc, channel, saved, total)
         SELECT md5('c' || (1 + (g + $2) % {c}))::uuid, 1 + (g + $2) % {sh},
                md5('o' || (1 + (g + $2) % {o}))::uuid, 1 + (g + $2) % {b}, 'gb', 'online', 1.50, 12.34
         FROM generate_series(1, $1::int) g RETURNING id::text",
        c = s.customers,
        sh = s.shops,
        o = s.offers,
        b = s.branches
    );
    let name = format!("partner-latency-{per_tx}");
    crate::latency_run(
        env,
        &crate::LatencySpec {
            cfg: Cfg {
                name: &name,
                db,
                api: "",
                mode: "replication",
                snapshot: "never",
                slot: "cobi_partner_lat",
                linger: "100ms",
                publication: "cobi_partner",
                mappings: MAPPINGS,
            },
            rate,
            per_tx,
            insert: &insert,
            key_of: |r| r.get::<_, String>(0),
            idle: false,
        },
    )
    .await
}

/// Everything the partner dataset adds to the report.
pub struct Outcome {
    pub rows: Vec<Row>,
    pub extra: Vec<String>,
    pub targets: Vec<Target>,
}

fn target(what: impl Into<String>, measured: impl Into<String>, met: Option<bool>) -> Target {
    Target {
        what: what.into(),
        measured: measured.into(),
        met,
    }
}

/// Runs every partner phase (see the module doc) and judges the targets.
pub async fn run(env: &Env) -> Outcome {
    let o = &env.opts;
    let s = Sizes::of(o.partner_rows);
    let mut out = Outcome {
        rows: Vec::new(),
        extra: Vec::new(),
        targets: Vec::new(),
    };
    eprintln!("[P1/7] partner dataset: {} records", s.total());
    if let Err(e) = make_database(env, "partner", &s).await {
        out.extra.push(format!("Partner dataset FAILED: {e:#}"));
        return out;
    }
    eprintln!("[P2/7] partner: COPY binary");
    let copy = phase_copy(env, "partner", &s)
        .await
        .unwrap_or_else(|e| Row::failed("partner: COPY binary → /dev/null", format!("{e:#}")));
    eprintln!("[P3/7] partner: initial sync ({} runs)", o.runs);
    let mut runs: Vec<(Row, Synced)> = Vec::new();
    let mut sync_err = None;
    for i in 0..o.runs {
        match phase_sync(
            env,
            "partner",
            &s,
            &DEFAULT,
            &format!("partner-sync-{i}"),
            "partner: initial sync, replication → mock-api",
        )
        .await
        {
            Ok(r) => runs.push(r),
            Err(e) => {
                sync_err = Some(format!("{e:#}"));
                break;
            }
        }
    }
    let failed = sync_err.or_else(|| runs.is_empty().then(|| "no run".to_string()));
    let (mut sync, synced) = if let Some(e) = failed {
        (
            Row::failed("partner: initial sync, replication → mock-api", e),
            None,
        )
    } else {
        let times: Vec<String> = runs
            .iter()
            .map(|r| format!("{:.2}", r.0.secs.unwrap_or(f64::NAN)))
            .collect();
        let peak = runs.iter().filter_map(|r| r.0.rss_mib).fold(0.0, f64::max);
        let last = runs.pop().expect("one run");
        let mut rows: Vec<Row> = runs
            .into_iter()
            .map(|r| r.0)
            .chain([last.0.clone()])
            .collect();
        rows.sort_by(|a, b| {
            a.secs
                .unwrap_or(f64::INFINITY)
                .total_cmp(&b.secs.unwrap_or(f64::INFINITY))
        });
        let mut med = rows.swap_remove(rows.len() / 2);
        if times.len() > 1 {
            med.rss_mib = Some(peak);
            med.add_note(format!(
                "median of {} ({} s); peak RSS: highest of the runs",
                times.len(),
                times.join("/")
            ));
        }
        (med, Some(last.1))
    };
    if let (Some(a), Some(b)) = (sync.rate(), copy.rate()) {
        sync.ratios.push((a / b, "COPY binary".into()));
    }
    out.targets.push(target(
        "partner initial sync ≤ 4 µs daemon CPU per record",
        sync.cpu_us
            .map_or("not measured".into(), |c| format!("{c:.2} µs")),
        sync.cpu_us.map(|c| c <= 4.0),
    ));
    out.targets.push(target(
        "partner initial sync ≥ 200 000 records/s",
        sync.rate()
            .map_or("not measured".into(), |r| format!("{r:.0} records/s")),
        sync.rate().map(|r| r >= 200_000.0),
    ));
    eprintln!("[P3b/7] partner: initial sync with fingerprints only (on_delete = \"ignore\")");
    let fp = fingerprint_only(env, &s).await;
    out.targets.push(target(
        "partner state dir ≤ 100 B per tracked record (fingerprints only: on_delete = \"ignore\")",
        fp.state_bpr
            .map_or("not measured".into(), |b| format!("{b:.1} B")),
        fp.state_bpr.map(|b| b <= 100.0),
    ));

    eprintln!("[P4/7] partner: streaming burst of {} rows", o.burst);
    let (burst, recv, commit_rate) = match &synced {
        Some(sy) => match phase_burst(env, "partner", &s, sy, o.burst, o.burst_tx).await {
            Ok((b, r, c)) => (b, r, Some(c)),
            Err(e) => (
                Row::failed("partner: streaming burst → mock-api", format!("{e:#}")),
                Row::failed("partner: pg_recvlogical over the burst", "burst failed"),
                None,
            ),
        },
        None => (
            Row::failed("partner: streaming burst → mock-api", "no synced daemon"),
            Row::failed("partner: pg_recvlogical over the burst", "no synced daemon"),
            None,
        ),
    };
    let mut burst = burst;
    let mut recv = recv;
    if let (Some(a), Some(r)) = (burst.rate(), recv.rate()) {
        burst.ratios.push((a / r, "pg_recvlogical".into()));
    }
    if let (Some(a), Some(c)) = (burst.rate(), commit_rate) {
        burst.ratios.push((a / c, "commit rate".into()));
        recv.add_note(format!("commit rate of the burst: {c:.0} rows/s"));
    }
    let bound = match (recv.rate(), commit_rate) {
        (Some(r), Some(c)) => Some(r.min(c)),
        _ => None,
    };
    out.targets.push(target(
        "partner burst ≥ 0.8 × min(pg_recvlogical, commit rate)",
        match (burst.rate(), bound) {
            (Some(a), Some(b)) => format!("{a:.0} vs {b:.0} rows/s = {:.2}×", a / b),
            _ => "not measured".into(),
        },
        burst.rate().zip(bound).map(|(a, b)| a / b >= 0.8),
    ));
    out.targets.push(target(
        "partner burst ≤ 5 µs daemon CPU per row",
        burst
            .cpu_us
            .map_or("not measured".into(), |c| format!("{c:.2} µs")),
        burst.cpu_us.map(|c| c <= 5.0),
    ));
    drop(synced);

    eprintln!(
        "[P5/7] partner: latency at {} single-row commits/s and 5000 rows/s in 10-row transactions",
        o.rate
    );
    for (rate, per_tx) in [(o.rate, 1u64), (5_000, 10)] {
        let what =
            format!("partner latency p99 ≤ 150 ms at {rate} rows/s in {per_tx}-row transactions");
        match phase_latency(env, "partner", &s, rate, per_tx).await {
            Ok(l) => {
                out.extra.push(format!(
                    "Partner latency commit → received ({} rows, {per_tx} per transaction, target {rate} rows/s, achieved {:.0} rows/s, linger 100ms): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms; commit round trip p50 {:.2} ms, p99 {:.2} ms; {}{}",
                    l.count, l.achieved_rate, l.p50, l.p90, l.p99, l.max, l.commit_p50, l.commit_p99, l.notes,
                    if l.missing > 0 { format!("; {} NEVER RECEIVED", l.missing) } else { String::new() }
                ));
                out.targets.push(target(
                    what,
                    format!("{:.1} ms", l.p99),
                    Some(l.p99 <= 150.0 && l.missing == 0),
                ));
            }
            Err(e) => {
                out.extra.push(format!(
                    "Partner latency at {rate} rows/s ({per_tx}/tx) FAILED: {e:#}"
                ));
                out.targets.push(target(what, "phase failed", None));
            }
        }
    }

    eprintln!(
        "[P6/7] partner: {} re-syncs of the unchanged dataset (poll mode, snapshot --force)",
        o.resyncs
    );
    match phase_resyncs(env, "partner", &s, o.resyncs).await {
        Ok(v) => {
            let sizes: Vec<String> = v
                .iter()
                .enumerate()
                .map(|(i, (secs, b))| {
                    format!(
                        "{} {:.1} B/record ({:.1} s)",
                        if i == 0 {
                            "first sync".to_string()
                        } else {
                            format!("re-sync {i}")
                        },
                        *b as f64 / s.total() as f64,
                        secs
                    )
                })
                .collect();
            out.extra.push(format!(
                "Partner state dir across re-syncs of the unchanged dataset (poll mode, `snapshot --force`: every record re-sent, its state written again only where it differs): {}",
                sizes.join(", ")
            ));
            let first = v.first().map_or(0, |x| x.1) as f64;
            let last = v.last().map_or(0, |x| x.1) as f64;
            out.targets.push(target(
                format!(
                    "state dir does not grow across {} re-syncs of an unchanged table (≤ +10 %)",
                    o.resyncs
                ),
                format!(
                    "{:.1} → {:.1} B/record",
                    first / s.total() as f64,
                    last / s.total() as f64
                ),
                (first > 0.0).then_some(last <= first * 1.1),
            ));
        }
        Err(e) => {
            out.extra.push(format!("Partner re-syncs FAILED: {e:#}"));
            out.targets.push(target(
                "state dir does not grow across re-syncs",
                "phase failed",
                None,
            ));
        }
    }

    let mut big_row = None;
    if o.partner_big_rows > 0 {
        let b = Sizes::of(o.partner_big_rows);
        eprintln!(
            "[P7/7] partner: initial sync of {} records (RSS, state)",
            b.total()
        );
        let r = async {
            make_database(env, "partner_big", &b).await?;
            let r = phase_sync(
                env,
                "partner_big",
                &b,
                &DEFAULT,
                "partner-big",
                "partner: initial sync (RSS point 2) → mock-api",
            )
            .await;
            let c = env.client("postgres").await?;
            c.batch_execute("DROP DATABASE partner_big").await.ok();
            r.map(|x| x.0)
        }
        .await
        .unwrap_or_else(|e| Row::failed("partner: initial sync (RSS point 2)", format!("{e:#}")));
        big_row = Some(r);
    } else {
        eprintln!("[P7/7] partner: big sync skipped (COBI_BENCH_PARTNER_BIG_ROWS=0)");
    }
    for (label, r) in [("1M", Some(&sync)), ("5M", big_row.as_ref())] {
        out.targets
            .push(match r.and_then(|r| r.rss_mib.map(|m| (m, r.rows))) {
                Some((m, rows)) => target(
                    format!(
                        "partner peak RSS ≤ 100 MiB, initial sync of {} records",
                        rows.unwrap_or(0)
                    ),
                    format!("{m:.1} MiB"),
                    Some(m <= 100.0),
                ),
                None => target(
                    format!("partner peak RSS ≤ 100 MiB ({label} point)"),
                    "not measured",
                    None,
                ),
            });
    }
    if let (Some(a), Some(b)) = (sync.rss_mib, big_row.as_ref().and_then(|b| b.rss_mib)) {
        out.targets.push(target(
            "partner peak RSS flat between the two syncs (≤ +20 %)",
            format!("{a:.1} → {b:.1} MiB"),
            Some(b <= a * 1.2),
        ));
    }
    out.rows.push(copy);
    out.rows.push(sync);
    out.rows.push(fp);
    out.rows.extend(big_row);
    out.rows.push(recv);
    out.rows.push(burst);
    out
}
