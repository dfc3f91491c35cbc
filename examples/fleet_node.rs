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
//! ```
//!
//! Arguments: the database URL (a SQLite file path, `mysql://…` or
//! `postgres://…`), the feed interval in milliseconds, and optionally the
//! roll-out policy name. Never prints key bytes or plaintext.

// A line protocol: its output is its interface.
#![allow(clippy::print_stdout)]

use std::io::{BufRead as _, Write as _};
use std::sync::Arc;
use std::time::Duration;

use phi::{DieselKeyStore, Keyring, LocalKek};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .ok_or("usage: fleet_node DATABASE_URL INTERVAL_MS [POLICY]")?;
    let interval: u64 = args.next().ok_or("missing INTERVAL_MS")?.parse()?;
    let policy = args
        .next()
        .unwrap_or_else(|| phi::DEFAULT_ROLLOUT_POLICY.to_owned());
    let kek_id = std::env::var("PHI_KEK_ID").unwrap_or_else(|_| "local-1".into());
    let kek = Arc::new(LocalKek::from_env(&kek_id)?);
    let store = connect(&url)?;
    let keyring = Keyring::builder(store, kek)
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
                    Err(error) => format!("refused {owner}: {}", phi::metrics::error_kind(&error)),
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
            _ => format!("unknown command {line:?}"),
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    Ok(())
}

/// A key store on the backend `url` names.
fn connect(url: &str) -> Result<Arc<dyn phi::KeyStore>, Box<dyn std::error::Error>> {
    if url.starts_with("mysql://") {
        #[cfg(feature = "mysql")]
        return Ok(Arc::new(
            DieselKeyStore::<diesel::MysqlConnection>::connect(url)?,
        ));
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        #[cfg(feature = "postgres")]
        return Ok(Arc::new(DieselKeyStore::<diesel::PgConnection>::connect(
            url,
        )?));
    } else {
        #[cfg(feature = "sqlite")]
        return Ok(Arc::new(
            DieselKeyStore::<diesel::SqliteConnection>::connect(
                url.trim_start_matches("sqlite://"),
            )?,
        ));
    }
    #[allow(unreachable_code)]
    Err(format!("this build has no driver for {url}").into())
}
