//! `cobi-sync teardown [--yes]` (DESIGN.md §2): drops this configuration's
//! replication slot and publication, so a removed daemon pins no WAL.
//!
//! It refuses while the daemon runs (its endpoint answers as cobi-sync, its
//! state store is locked, or a walsender streams from the slot), and asks
//! for confirmation on a terminal unless `--yes`; without a terminal it
//! needs `--yes`. A publication this role may not drop (the table owner
//! created it, as the README's least-privilege setup does) is left with the
//! statement its owner runs. Exit 0 when nothing of cobi-sync is left in the
//! database, 1 when something is (with what to do), 2 for usage.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use tokio_postgres::Client;

use crate::config::{self, quote_ident, Mode, Settings};
use crate::source::pg;

/// What the database holds of this configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The slot exists; `Some(pid)` when a walsender streams from it.
    pub slot: Option<Option<i32>>,
    /// The publication exists.
    pub publication: bool,
}

/// What teardown does about what it found (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Nothing to drop.
    Nothing,
    /// Something streams from the slot: refuse.
    InUse(i32),
    /// Drop these.
    Drop {
        /// The slot.
        slot: bool,
        /// The publication.
        publication: bool,
    },
}

/// Decides from what exists.
pub fn plan(found: &Found) -> Plan {
    match found.slot {
        Some(Some(pid)) => Plan::InUse(pid),
        None if !found.publication => Plan::Nothing,
        slot => Plan::Drop {
            slot: slot.is_some(),
            publication: found.publication,
        },
    }
}

/// `cobi-sync teardown`. The exit code as `Err`.
pub async fn run(path: &Path, yes: bool) -> Result<(), u8> {
    let settings = config::load(path).map_err(|e| {
        eprint!("{e}");
        2
    })?;
    if settings.source.mode == Mode::Poll {
        println!(
            "poll mode: cobi-sync creates no replication slot or publication; nothing to drop"
        );
        return Ok(());
    }
    if let Some(why) = daemon_running(&settings).await {
        eprintln!(
            "cobi-sync teardown: the daemon is running ({why}); stop it first \
             (systemctl stop cobi-sync), then run teardown again"
        );
        return Err(1);
    }
    let client = pg::connect(&settings.source).await.map_err(|e| {
        eprintln!("cobi-sync teardown: {}", e.message);
        1
    })?;
    let r = &settings.source.replication;
    let found = inspect(&client, &r.slot, &r.publication)
        .await
        .map_err(|e| {
            eprintln!(
                "cobi-sync teardown: {}",
                pg::explain(&e, &settings.source.url)
            );
            1
        })?;
    let (drop_slot, drop_publication) = match plan(&found) {
        Plan::Nothing => {
            println!(
                "nothing to drop: no replication slot {} and no publication {} in {}",
                r.slot, r.publication, settings.source.url
            );
            return Ok(());
        }
        Plan::InUse(pid) => {
            eprintln!(
                "cobi-sync teardown: replication slot {} is in use (walsender pid {pid}): a \
                 cobi-sync daemon (here or on another host) still streams from it; stop it first",
                r.slot
            );
            return Err(1);
        }
        Plan::Drop { slot, publication } => (slot, publication),
    };
    let mut what = Vec::new();
    if drop_slot {
        what.push(format!(
            "replication slot {} (cobi-sync's position in the WAL)",
            r.slot
        ));
    }
    if drop_publication {
        what.push(format!("publication {}", r.publication));
    }
    if !yes {
        confirm(&what, &settings)?;
    }
    let mut left = Vec::new();
    if drop_slot {
        match client
            .execute("SELECT pg_drop_replication_slot($1)", &[&r.slot])
            .await
        {
            Ok(_) => println!("dropped replication slot {}", r.slot),
            Err(e) => {
                eprintln!(
                    "cannot drop replication slot {}: {}",
                    r.slot,
                    pg::explain(&e, &settings.source.url)
                );
                left.push(format!(
                    "as a superuser: SELECT pg_drop_replication_slot({});",
                    pg::quote_literal(&r.slot)
                ));
            }
        }
    }
    if drop_publication {
        let sql = format!(
            "DROP PUBLICATION IF EXISTS {};",
            quote_ident(&r.publication)
        );
        match client.batch_execute(&sql).await {
            Ok(()) => println!("dropped publication {}", r.publication),
            Err(e) => {
                eprintln!(
                    "cannot drop publication {}: {}",
                    r.publication,
                    pg::explain(&e, &settings.source.url)
                );
                left.push(format!("as the publication's owner: {sql}"));
            }
        }
    }
    println!(
        "cobi-sync's progress is still in {}; remove that directory too if cobi-sync is gone \
         for good (a later run would otherwise find its slot missing and ask for a snapshot)",
        settings.state.dir.display()
    );
    if left.is_empty() {
        Ok(())
    } else {
        eprintln!("left in the database; to finish, run:");
        for l in &left {
            eprintln!("  {l}");
        }
        Err(1)
    }
}

/// Asks on a terminal; refuses without one.
fn confirm(what: &[String], settings: &Settings) -> Result<(), u8> {
    if !std::io::stdin().is_terminal() {
        eprintln!(
            "cobi-sync teardown would drop {}; pass --yes to do it without a terminal",
            what.join(" and ")
        );
        return Err(2);
    }
    println!("This drops from {}:", settings.source.url);
    for w in what {
        println!("  - {w}");
    }
    print!("cobi-sync will have to copy everything again if it is started later. Type yes: ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    if answer.trim() == "yes" {
        Ok(())
    } else {
        eprintln!("nothing dropped");
        Err(1)
    }
}

/// Whether this configuration's daemon runs: its endpoint answers as
/// cobi-sync, or its state store is locked. The reason, if so.
async fn daemon_running(settings: &Settings) -> Option<String> {
    if let Some(addr) = settings.http.listen {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(3))
            .build()
            .ok()?;
        if let Ok(r) = client.get(format!("http://{addr}/healthz")).send().await {
            if let Ok(id) = r.json::<crate::ops::http::Identity>().await {
                if id.service == crate::ops::http::SERVICE {
                    return Some(format!("it answers on {addr}"));
                }
            }
        }
    }
    match crate::daemon::open_existing_store(settings) {
        Err(e) => Some(format!("its state dir is in use: {e}")),
        Ok(_) => None,
    }
}

async fn inspect(
    client: &Client,
    slot: &str,
    publication: &str,
) -> Result<Found, tokio_postgres::Error> {
    let slot_row = client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    let publication = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .is_some();
    Ok(Found {
        slot: slot_row.map(|r| r.get::<_, Option<i32>>(0)),
        publication,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_teardown_does() {
        let f = |slot, publication| Found { slot, publication };
        let cases = [
            (f(None, false), Plan::Nothing),
            (f(Some(Some(42)), true), Plan::InUse(42)),
            (
                f(Some(None), true),
                Plan::Drop {
                    slot: true,
                    publication: true,
                },
            ),
            (
                f(Some(None), false),
                Plan::Drop {
                    slot: true,
                    publication: false,
                },
            ),
            (
                f(None, true),
                Plan::Drop {
                    slot: false,
                    publication: true,
                },
            ),
        ];
        for (found, want) in cases {
            assert_eq!(plan(&found), want, "{found:?}");
        }
    }
}
