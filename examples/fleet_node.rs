//! One process of a fleet: a keyring following the key-event feed, driven
//! line by line on standard input, answering on standard output. The fleet
//! tests run several of these beside the `phi` CLI; try it by hand:
//!
//! ```text
//! PHI_MASTER_KEY=… cargo run --example fleet_node -- fleet.db 500
//! seal provider-17        → sealed provider-17 v1
//! encrypts provider-17    → encrypts provider-17 true
//! unwraps                 → unwraps 1
//! position                → position 4
//! shred provider-17       → shredded provider-17 1
//! rollout provider-18     → rollout provider-18 head 6
//! clear provider-18       → cleared provider-18 head 7
//! head                    → head 7
//! events 4 provider-17    → events 1   (after #4, naming the owner)
//! policy-events 4         → policy-events 1   (roll-out changes of this policy)
//! ```
//!
//! Arguments: the database URL (a SQLite file path, `mysql://…` or
//! `postgres://…`), the feed interval in milliseconds, and optionally the
//! roll-out policy name. Never prints key bytes or plaintext.
//!
//! With `FLEET_NODE_PAUSE=inside`, the node stops inside the transaction of
//! its first life-cycle change, right after taking the feed's next id
//! (`UPDATE phi_key_feed`), prints `paused inside` and waits for ever; with
//! `FLEET_NODE_PAUSE=committed`, it stops right after that transaction's
//! `COMMIT` and prints `paused committed`. The fleet tests kill it there.

// A line protocol: its output is its interface.
#![allow(clippy::print_stdout)]

use std::io::{BufRead as _, Write as _};
use std::sync::Arc;
use std::time::Duration;

use diesel::connection::{Instrumentation, InstrumentationEvent};
use phi_types::{DieselKeyStore, Keyring, KeyringConfig, Rollout, lifecycle};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .ok_or("usage: fleet_node DATABASE_URL INTERVAL_MS [POLICY]")?;
    let interval: u64 = args.next().ok_or("missing INTERVAL_MS")?.parse()?;
    let policy = args
        .next()
        .unwrap_or_else(|| phi_types::DEFAULT_ROLLOUT_POLICY.to_owned());
    if let Ok(pause) = std::env::var("FLEET_NODE_PAUSE") {
        let make: fn() -> Option<Box<dyn Instrumentation>> = match pause.as_str() {
            "inside" => || Some(Box::new(Pause::inside())),
            "committed" => || Some(Box::new(Pause::committed())),
            other => return Err(format!("FLEET_NODE_PAUSE={other:?}: inside or committed").into()),
        };
        diesel::connection::set_default_instrumentation(make)?;
    }
    // PHI_KEK / PHI_KEK_ID / PHI_MASTER_KEY(_FILE), as every phi process reads them.
    let keyring = KeyringConfig::from_env()?
        .builder(connect(&url)?)?
        .actor("fleet-node")
        .feed_interval(Duration::from_millis(interval))
        .rollout_policy(policy)
        .build()?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(
        out,
        "ready {}",
        keyring.feed_status().map_or(0, |s| s.position)
    )?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        let answer = match (words.next(), words.next()) {
            (Some("seal"), Some(owner)) => {
                match keyring.seal(&"fleet".to_string(), owner, "fleet.value", b"row") {
                    Ok(sealed) => format!("sealed {owner} v{}", sealed.key_version().unwrap_or(0)),
                    Err(error) => format!(
                        "refused {owner}: {}",
                        phi_types::metrics::error_kind(&error)
                    ),
                }
            }
            (Some("encrypts"), Some(owner)) => {
                format!("encrypts {owner} {}", keyring.encrypts_for(owner))
            }
            (Some("unwraps"), _) => format!("unwraps {}", keyring.stats().unwraps),
            (Some("position"), _) => format!(
                "position {}",
                keyring.feed_status().map_or(0, |s| s.position)
            ),
            (Some("head"), _) => answer(lifecycle::feed_head(keyring.store().as_ref()), |h| {
                format!("head {h}")
            }),
            (Some("events"), Some(after)) => {
                let owner = words.next().unwrap_or_default();
                answer(events_after(&keyring, after), |events| {
                    let n = events
                        .iter()
                        .filter(|e| e.event.owner_id.as_deref() == Some(owner))
                        .count();
                    format!("events {n}")
                })
            }
            (Some("policy-events"), Some(after)) => {
                let prefix = format!("policy {}:", keyring.rollout_policy());
                answer(events_after(&keyring, after), |events| {
                    let n = events
                        .iter()
                        .filter(|e| e.event.kind == phi_types::feed::KeyEventKind::Rollout)
                        .filter(|e| {
                            e.event
                                .detail
                                .as_deref()
                                .is_some_and(|d| d.starts_with(&prefix))
                        })
                        .count();
                    format!("policy-events {n}")
                })
            }
            (Some("shred"), Some(owner)) => answer(
                lifecycle::shred_keys_by(&keyring, owner, "fleet-node"),
                |report| format!("shredded {owner} {}", report.destroyed_versions.len()),
            ),
            (Some("rollout"), Some(owner)) => answer(
                lifecycle::set_rollout(&keyring, &Rollout::owners([owner])),
                |head| format!("rollout {owner} head {head}"),
            ),
            (Some("clear"), Some(owner)) => answer(
                lifecycle::clear_cache_fleet(&keyring, Some(owner)),
                |head| format!("cleared {owner} head {head}"),
            ),
            _ => format!("unknown command {line:?}"),
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    Ok(())
}

/// The feed's events after id `after` (every one: a test's backlog is short).
fn events_after(
    keyring: &Keyring,
    after: &str,
) -> phi_types::Result<Vec<phi_types::feed::FeedEvent>> {
    let after: i64 = after.parse().map_err(|_| phi_types::Error::InvalidInput {
        what: "event id",
        reason: format!("{after:?} is not a number"),
    })?;
    lifecycle::read_feed(keyring.store().as_ref(), after, 100_000)
}

/// The answer to a command: `ok`'s text, or `error` and the error's kind.
fn answer<T>(result: phi_types::Result<T>, ok: impl FnOnce(T) -> String) -> String {
    match result {
        Ok(value) => ok(value),
        Err(error) => format!("error {}", phi_types::metrics::error_kind(&error)),
    }
}

/// A key store on the backend `url` names.
fn connect(url: &str) -> Result<Arc<dyn phi_types::KeyStore>, Box<dyn std::error::Error>> {
    if url.starts_with("mysql://") {
        #[cfg(feature = "mysql")]
        return Ok(Arc::new(
            DieselKeyStore::<diesel::MysqlConnection>::builder(url)
                .run_migrations(true)
                .connect()?,
        ));
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        #[cfg(feature = "postgres")]
        return Ok(Arc::new(
            DieselKeyStore::<diesel::PgConnection>::builder(url)
                .run_migrations(true)
                .connect()?,
        ));
    } else {
        #[cfg(feature = "sqlite")]
        return Ok(Arc::new(
            DieselKeyStore::<diesel::SqliteConnection>::builder(
                url.trim_start_matches("sqlite://"),
            )
            .run_migrations(true)
            .connect()?,
        ));
    }
    #[allow(unreachable_code)]
    Err(format!("this build has no driver for {url}").into())
}

/// Stops a connection at a fixed point of a life-cycle change's
/// transaction (see the module's documentation).
struct Pause {
    /// Stop after the `COMMIT`, not after the feed's `UPDATE`.
    after_commit: bool,
    /// This connection has taken a feed id in its open transaction.
    took_id: bool,
}

impl Pause {
    fn inside() -> Self {
        Pause {
            after_commit: false,
            took_id: false,
        }
    }

    fn committed() -> Self {
        Pause {
            after_commit: true,
            took_id: false,
        }
    }

    fn stop(at: &str) -> ! {
        println!("paused {at}");
        loop {
            std::thread::park();
        }
    }
}

impl Instrumentation for Pause {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        let InstrumentationEvent::FinishQuery { query, error, .. } = event else {
            return;
        };
        if error.is_some() {
            return;
        }
        let sql = query.to_string();
        if sql.starts_with("UPDATE") && sql.contains("phi_key_feed") {
            if !self.after_commit {
                Self::stop("inside");
            }
            self.took_id = true;
        } else if self.took_id && sql.trim() == "COMMIT" {
            Self::stop("committed");
        }
    }
}
