//! The Diesel connections phi's key store runs on.

use diesel::migration::MigrationSource;
// With no backend feature no connection is a `PhiConnection`, and Diesel's
// `r2d2` feature (the key store's pool) is off.
#[cfg(not(any(feature = "sqlite", feature = "mysql", feature = "postgres")))]
use diesel::Connection as PoolConnection;
#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
use diesel::r2d2::R2D2Connection as PoolConnection;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness};

mod sealed {
    pub trait Sealed {}
}

/// A Diesel connection type phi can keep its key tables on:
/// `SqliteConnection`, `MysqlConnection` or `PgConnection`, each behind the
/// cargo feature of the same backend name.
pub trait PhiConnection:
    PoolConnection + MigrationHarness<Self::Backend> + sealed::Sealed + 'static
{
    /// phi's migrations for this backend.
    #[doc(hidden)]
    const MIGRATIONS: EmbeddedMigrations;

    /// Per-connection settings for the key store's pool.
    #[doc(hidden)]
    fn prepare_key_store(&mut self) -> diesel::QueryResult<()> {
        Ok(())
    }

    #[doc(hidden)]
    fn migrations() -> impl MigrationSource<Self::Backend> {
        Self::MIGRATIONS
    }
}

#[cfg(feature = "sqlite")]
impl sealed::Sealed for diesel::SqliteConnection {}
#[cfg(feature = "sqlite")]
impl PhiConnection for diesel::SqliteConnection {
    const MIGRATIONS: EmbeddedMigrations =
        diesel_migrations::embed_migrations!("migrations/sqlite");

    fn prepare_key_store(&mut self) -> diesel::QueryResult<()> {
        use diesel::connection::SimpleConnection;
        // Another process (or the application's own connection) may hold the
        // write lock briefly; wait for it rather than fail. Deleted and
        // overwritten content is zeroed in the database file, so a shredded
        // owner's wrapped keys do not linger in free space (copies already
        // in a write-ahead log or a backup are out of its reach).
        self.batch_execute("PRAGMA busy_timeout = 10000; PRAGMA secure_delete = ON;")
    }
}

#[cfg(feature = "mysql")]
impl sealed::Sealed for diesel::MysqlConnection {}
#[cfg(feature = "mysql")]
impl PhiConnection for diesel::MysqlConnection {
    const MIGRATIONS: EmbeddedMigrations = diesel_migrations::embed_migrations!("migrations/mysql");
}

#[cfg(feature = "postgres")]
impl sealed::Sealed for diesel::PgConnection {}
#[cfg(feature = "postgres")]
impl PhiConnection for diesel::PgConnection {
    const MIGRATIONS: EmbeddedMigrations =
        diesel_migrations::embed_migrations!("migrations/postgres");
}
