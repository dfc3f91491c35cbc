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

use crate::connection::PhiConnection;
use crate::error::{Error, Result};

/// Applies phi's pending migrations on `conn`; returns how many ran.
///
/// # Errors
/// [`Error::Store`] when a migration fails.
pub fn run_pending<C: PhiConnection>(conn: &mut C) -> Result<usize> {
    conn.run_pending_migrations(C::migrations())
        .map(|applied| applied.len())
        .map_err(|e| Error::store("running phi's migrations", e))
}
