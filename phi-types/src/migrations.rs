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
//! versions of their own, the same on every backend, so they sit beside an
//! application's migrations:
//!
//! | version | migration | tables |
//! |---|---|---|
//! | `2026-11-25-000001` | `phi_key_tables` | `user_encryption_keys`, `encryption_key_audit` |
//! | `2026-11-27-000001` | `kek_check_values` | `kek_check_values` |
//! | `2026-11-28-000001` | `key_event_feed` | `phi_key_feed`, `phi_key_events`, `phi_rollout`, `phi_rollout_owners` |
//! | `2026-11-28-000002` | `feed_readers` | `phi_feed_readers` |
//! | `2026-12-07-000001` | `owner_ids_byte_exact` | every table with an owner id, KEK id, policy or reader name (MySQL / MariaDB only) |
//! | `2026-12-07-000002` | `open_event_kinds` | `phi_key_events` (`kind` any non-empty text) |
//! | `2026-12-07-000003` | `legacy_values` | `phi_legacy_values` |
//! | `2026-12-07-000004` | `rotation_claims` | `phi_rotation_claims` |
//! | `2026-12-07-000005` | `seal_counts` | `phi_seal_counts` |
//! | `2026-12-07-000006` | `access_log` | `phi_access_chains`, `phi_access_batches`, `phi_access_log` |
//!
//! (Later versions are added at the end of this table; the directories
//! `phi-types/migrations/<backend>/` are the authority.)
//!
//! - `diesel migration run` over the application's directory runs only the
//!   application's migrations, and `diesel migration list` shows only them.
//! - `diesel migration revert` reverts the application's latest migration,
//!   never one of phi's: phi's are not in the application's directory. When
//!   one of phi's was recorded under a later version than every
//!   application migration, Diesel stops with "Unable to find migration
//!   version … to revert" instead; revert phi's tables, if ever, with their
//!   own `down.sql` (in `phi-types/migrations/<backend>/`).
//! - `diesel print-schema` should leave phi's tables out of the
//!   application's `schema.rs` ([`schema`](crate::schema) has them), in
//!   `diesel.toml`:
//!
//!   ```toml
//!   [print_schema]
//!   file = "src/schema.rs"
//!   filter = { except_tables = ["user_encryption_keys", "encryption_key_audit", "kek_check_values", "phi_.*"] }
//!   ```
//!
//!   (`phi_.*` covers every table phi names `phi_…`: today `phi_key_feed`,
//!   `phi_key_events`, `phi_rollout`, `phi_rollout_owners`,
//!   `phi_feed_readers`, `phi_legacy_values`, `phi_rotation_claims` and `phi_seal_counts`; the entries are regular
//!   expressions.)
//!
//! On MySQL / MariaDB, `2026-12-07-000001_owner_ids_byte_exact` makes
//! every owner id column of phi's tables (and the KEK id, roll-out policy
//! and feed reader columns) `VARBINARY`: compared byte for byte, with no
//! padding, where `utf8mb4_bin` took `'acme'` and `'acme '` as equal. Its
//! SQLite and PostgreSQL versions change nothing (their text equality is
//! byte for byte already). The `ALTER TABLE`s copy each table, the audit
//! trail included: run it where that is acceptable.
//!
//! [`DieselKeyStore::connect`](crate::DieselKeyStore::connect) runs them
//! too. A deployment that runs migrations in a step of its own, or a
//! database user that may not change the schema, connects with
//! [`DieselKeyStore::connect_without_migrating`](crate::DieselKeyStore::connect_without_migrating)
//! or builds the store over its own pool with
//! [`DieselKeyStore::new`](crate::DieselKeyStore::new); neither creates a
//! table, and a [`Keyring`](crate::Keyring) never does.

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

#[cfg(test)]
mod tests {
    /// The module docs' version table lists every migration directory of
    /// every backend, with its name (so it cannot go stale unseen).
    #[test]
    fn the_version_table_lists_every_migration() {
        let docs = include_str!("migrations.rs");
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut checked = 0;
        for backend in ["sqlite", "mysql", "postgres"] {
            for entry in std::fs::read_dir(root.join(backend)).expect("migrations directory") {
                let dir = entry.expect("entry").file_name();
                let dir = dir.to_str().expect("UTF-8 name");
                let (version, name) = dir.split_once('_').expect("<version>_<name>");
                let row = format!("//! | `{version}` | `{name}` |");
                assert!(docs.contains(&row), "the module docs lack the row {row:?}");
                checked += 1;
            }
        }
        assert!(checked >= 12, "{checked} migrations found");
    }
}
