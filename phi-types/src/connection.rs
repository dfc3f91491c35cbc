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

    /// Settings phi needs on an application's connection before a job
    /// runs on it (SQLite: a busy timeout when none is set, see
    /// [`crate::sqlite`]).
    #[doc(hidden)]
    fn prepare_for_phi(&mut self) -> diesel::QueryResult<()> {
        Ok(())
    }

    /// Tells listeners that the feed's head is now `head`, inside the
    /// appending transaction (PostgreSQL: `pg_notify`; elsewhere nothing).
    #[doc(hidden)]
    fn notify_feed(&mut self, head: i64) -> diesel::QueryResult<()> {
        let _ = head;
        Ok(())
    }

    /// A listener for the feed's notifications on a new connection to
    /// `database_url`, where the backend has them (PostgreSQL).
    #[doc(hidden)]
    fn feed_listener(database_url: &str) -> crate::Result<Option<Box<dyn FeedListener>>> {
        let _ = database_url;
        Ok(None)
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

    fn prepare_for_phi(&mut self) -> diesel::QueryResult<()> {
        crate::sqlite::busy_timeout_if_unset(self)
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

    fn notify_feed(&mut self, head: i64) -> diesel::QueryResult<()> {
        use diesel::RunQueryDsl as _;
        use diesel::sql_types::Text;
        diesel::sql_query("SELECT pg_notify($1, $2)")
            .bind::<Text, _>(FEED_CHANNEL)
            .bind::<Text, _>(head.to_string())
            .execute(self)
            .map(drop)
    }

    fn feed_listener(database_url: &str) -> crate::Result<Option<Box<dyn FeedListener>>> {
        Ok(Some(Box::new(PgFeedListener::connect(database_url)?)))
    }
}

/// A PostgreSQL connection of its own that `LISTEN`s on the feed's channel.
#[cfg(feature = "postgres")]
struct PgFeedListener {
    conn: diesel::PgConnection,
}

#[cfg(feature = "postgres")]
impl PgFeedListener {
    fn connect(database_url: &str) -> crate::Result<Self> {
        use diesel::connection::{Connection as _, SimpleConnection as _};
        let mut conn = diesel::PgConnection::establish(database_url).map_err(|e| {
            crate::Error::store("opening the key-event feed's listening connection", e)
        })?;
        conn.batch_execute(&format!("LISTEN {}", FEED_CHANNEL))
            .map_err(|e| crate::Error::store("listening to the key-event feed", e))?;
        Ok(PgFeedListener { conn })
    }
}

#[cfg(feature = "postgres")]
impl FeedListener for PgFeedListener {
    fn notified(&mut self) -> crate::Result<bool> {
        let mut notified = false;
        for notification in self.conn.notifications_iter() {
            notification.map_err(|e| {
                crate::Error::store("receiving the key-event feed's notifications", e)
            })?;
            notified = true;
        }
        Ok(notified)
    }
}

/// The PostgreSQL notification channel an append to the feed notifies (in
/// the appending transaction, so delivered at its commit), with the feed's
/// new head as payload.
pub const FEED_CHANNEL: &str = "phi_key_events";

/// Told when events are appended to the feed, from
/// [`KeyStore::feed_listener`](crate::KeyStore::feed_listener): a following
/// keyring checks it several times a second and reads the feed at once
/// when it was notified, instead of waiting for its interval.
pub trait FeedListener: Send {
    /// Whether an append was notified since the last call. Never waits:
    /// takes what the connection has already received.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) when the listening connection
    /// is lost (the keyring then opens another at its next interval).
    fn notified(&mut self) -> crate::Result<bool>;
}
