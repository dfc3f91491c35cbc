//! phi's embedded migrations: the key store tables for each backend.
//!
//! Run them from code at start-up, beside the application's own:
//!
//! ```
//! # #[cfg(feature = "sqlite")] {
//! use diesel::{Connection, SqliteConnection};
//! let mut conn = SqliteConnection::establish(":memory:")?;
//! phi_types::migrations::run_pending(&mut conn)?;
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! They are recorded in Diesel's `__diesel_schema_migrations` table under
//! versions of their own, so they sit beside an application's migrations.

use std::time::Duration;

use crate::connection::PhiConnection;
use crate::error::{Error, Result};

/// Applies phi's pending migrations on `conn`; returns how many ran.
///
/// Several processes may start at once against a fresh database: a run that
/// fails while another process is applying the same migrations waits for
/// that process (up to about five seconds) instead of failing.
///
/// # Errors
/// [`Error::Store`] when a migration fails and is still pending afterwards.
pub fn run_pending<C: PhiConnection>(conn: &mut C) -> Result<usize> {
    const ATTEMPTS: u32 = 50;
    let mut attempt = 0;
    loop {
        let error = match conn.run_pending_migrations(C::migrations()) {
            Ok(applied) => return Ok(applied.len()),
            Err(error) => error,
        };
        attempt += 1;
        // Done by another process meanwhile? (The check itself may find the
        // database busy: that counts as not done yet.)
        if let Ok(false) = conn.has_pending_migration(C::migrations()) {
            return Ok(0);
        }
        if attempt == ATTEMPTS {
            return Err(Error::store("running phi's migrations", error));
        }
        tracing::debug!(attempt, %error, "phi's migrations are busy; retrying");
        std::thread::sleep(Duration::from_millis(100));
    }
}
