//! The Diesel connections phi's key store runs on.

// With no backend feature no connection is a `PhiConnection`, and Diesel's
// `r2d2` feature (the key store's pool) is off.
#[cfg(not(any(feature = "sqlite", feature = "mysql", feature = "postgres")))]
use diesel::Connection as PoolConnection;
#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
use diesel::r2d2::R2D2Connection as PoolConnection;
use diesel_migrations::MigrationHarness;

use crate::error::{Error, Result};

mod sealed {
    pub trait Sealed {}
}

/// A Diesel connection type phi can keep its key tables on:
/// `SqliteConnection`, `MysqlConnection` or `PgConnection`, each behind the
/// cargo feature of the same backend name.
pub trait PhiConnection:
    PoolConnection + MigrationHarness<Self::Backend> + sealed::Sealed + 'static
{
    /// The backend, for phi's migrations of it.
    #[doc(hidden)]
    const BACKEND: Backend;

    /// Whether phi's migrations make identifier columns `VARBINARY`
    /// (MySQL / MariaDB).
    #[doc(hidden)]
    const BINARY_IDENTIFIERS: bool = false;

    /// Per-connection settings for the key store's pool.
    #[doc(hidden)]
    fn prepare_key_store(&mut self) -> diesel::QueryResult<()> {
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

    /// The catalog query of [`catalog_columns`](Self::catalog_columns):
    /// `(table_name, column_name, data_type)` rows, ending in `IN ` before
    /// the list of names.
    #[doc(hidden)]
    const CATALOG_QUERY: &'static str;

    /// The columns of the tables named `tables` that an unqualified name
    /// reaches on this connection (SQLite: the main database; MySQL /
    /// MariaDB: the current database; PostgreSQL: the search path), as
    /// (table, column, lower-case type name), in one catalog query.
    #[doc(hidden)]
    fn catalog_columns(
        &mut self,
        tables: &[&str],
    ) -> diesel::QueryResult<Vec<(String, String, String)>>;
}

/// One row of [`PhiConnection::catalog_columns`]' query.
#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
#[derive(diesel::QueryableByName)]
struct CatalogColumn {
    #[diesel(sql_type = diesel::sql_types::Text)]
    table_name: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    column_name: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    data_type: String,
}

/// `tables` as an SQL list of string literals (phi's own table names:
/// letters, digits and `_` only; anything else is left out).
#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
fn table_list(tables: &[&str]) -> String {
    let names: Vec<String> = tables
        .iter()
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .map(|t| format!("'{t}'"))
        .collect();
    if names.is_empty() {
        "''".to_owned()
    } else {
        names.join(", ")
    }
}

/// Runs a backend's catalog query (`query`, which ends in `IN `) for
/// `tables`, listed by [`table_list`].
#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
fn load_catalog<C>(
    conn: &mut C,
    query: &str,
    tables: &[&str],
) -> diesel::QueryResult<Vec<(String, String, String)>>
where
    diesel::query_builder::SqlQuery: diesel::query_dsl::LoadQuery<'static, C, CatalogColumn>,
{
    use diesel::RunQueryDsl as _;
    Ok(
        diesel::sql_query(format!("{query}({})", table_list(tables)))
            .load::<CatalogColumn>(conn)?
            .into_iter()
            .map(|c| (c.table_name, c.column_name, c.data_type))
            .collect(),
    )
}

#[cfg(feature = "sqlite")]
impl sealed::Sealed for diesel::SqliteConnection {}
#[cfg(feature = "sqlite")]
impl PhiConnection for diesel::SqliteConnection {
    const BACKEND: Backend = Backend::Sqlite;

    fn prepare_key_store(&mut self) -> diesel::QueryResult<()> {
        use diesel::connection::SimpleConnection;
        // Another process (or the application's own connection) may hold the
        // write lock briefly; wait for it rather than fail. Deleted and
        // overwritten content is zeroed in the database file, so a shredded
        // owner's wrapped keys do not linger in free space (copies already
        // in a write-ahead log or a backup are out of its reach).
        self.batch_execute("PRAGMA busy_timeout = 10000; PRAGMA secure_delete = ON;")
    }

    const CATALOG_QUERY: &'static str = "SELECT m.name AS table_name, p.name AS column_name, lower(p.type) AS data_type \
                 FROM sqlite_master m, pragma_table_info(m.name) p \
                 WHERE m.type = 'table' AND m.name IN ";

    fn catalog_columns(
        &mut self,
        tables: &[&str],
    ) -> diesel::QueryResult<Vec<(String, String, String)>> {
        load_catalog(self, Self::CATALOG_QUERY, tables)
    }
}

#[cfg(feature = "mysql")]
impl sealed::Sealed for diesel::MysqlConnection {}
#[cfg(feature = "mysql")]
impl PhiConnection for diesel::MysqlConnection {
    const BACKEND: Backend = Backend::Mysql;
    const BINARY_IDENTIFIERS: bool = true;

    const CATALOG_QUERY: &'static str = "SELECT CAST(TABLE_NAME AS CHAR) AS table_name, CAST(COLUMN_NAME AS CHAR) AS column_name, \
                 CAST(LOWER(DATA_TYPE) AS CHAR) AS data_type FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME IN ";

    fn catalog_columns(
        &mut self,
        tables: &[&str],
    ) -> diesel::QueryResult<Vec<(String, String, String)>> {
        load_catalog(self, Self::CATALOG_QUERY, tables)
    }
}

#[cfg(feature = "postgres")]
impl sealed::Sealed for diesel::PgConnection {}
#[cfg(feature = "postgres")]
impl PhiConnection for diesel::PgConnection {
    const BACKEND: Backend = Backend::Postgres;

    fn notify_feed(&mut self, head: i64) -> diesel::QueryResult<()> {
        use diesel::RunQueryDsl as _;
        use diesel::sql_types::Text;
        diesel::sql_query("SELECT pg_notify($1, $2)")
            .bind::<Text, _>(feed_channel())
            .bind::<Text, _>(head.to_string())
            .execute(self)
            .map(drop)
    }

    fn feed_listener(database_url: &str) -> crate::Result<Option<Box<dyn FeedListener>>> {
        Ok(Some(Box::new(PgFeedListener::connect(database_url)?)))
    }

    const CATALOG_QUERY: &'static str = "SELECT c.relname::text AS table_name, a.attname::text AS column_name, \
                 format_type(a.atttypid, NULL) AS data_type \
                 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid \
                 WHERE c.relkind IN ('r', 'p', 'v', 'f') AND a.attnum > 0 AND NOT a.attisdropped \
                 AND pg_catalog.pg_table_is_visible(c.oid) AND c.relname IN ";

    fn catalog_columns(
        &mut self,
        tables: &[&str],
    ) -> diesel::QueryResult<Vec<(String, String, String)>> {
        load_catalog(self, Self::CATALOG_QUERY, tables)
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
        conn.batch_execute(&format!("LISTEN {}", feed_channel()))
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
/// new head as payload, when phi's tables have no prefix; with one, the
/// channel carries it ([`feed_channel`]).
pub const FEED_CHANNEL: &str = "phi_key_events";

/// The PostgreSQL notification channel of the key-event feed in this
/// process: [`FEED_CHANNEL`] with the table prefix
/// ([`set_table_prefix`](crate::schema::set_table_prefix)), so that two
/// installations of phi in one database under different prefixes do not
/// wake each other's keyrings.
pub fn feed_channel() -> &'static str {
    static CHANNEL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CHANNEL.get_or_init(|| crate::table_names::sql_name(FEED_CHANNEL))
}

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

/// The database backends phi has migrations for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Backend {
    /// SQLite.
    Sqlite,
    /// MySQL / MariaDB.
    Mysql,
    /// PostgreSQL.
    Postgres,
}

impl Backend {
    /// The backend of a database URL, by its scheme as Diesel and the
    /// `phi` command take it: `sqlite://FILE` or text without `://` (a
    /// file path), `mysql://…` or `mariadb://…`, `postgres://…` or
    /// `postgresql://…`.
    ///
    /// ```
    /// use phi_types::migrations::Backend;
    /// assert_eq!(Backend::from_url("postgres://app@db/clinic")?, Backend::Postgres);
    /// assert_eq!(Backend::from_url("clinic.db")?, Backend::Sqlite);
    /// assert!(Backend::from_url("postgress://app@db/clinic").is_err());
    /// # Ok::<(), phi_types::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for another scheme (never taken for a file
    /// name).
    pub fn from_url(url: &str) -> Result<Backend> {
        if url.starts_with("sqlite://") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            Ok(Backend::Mysql)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if let Some((scheme, _)) = url.split_once("://") {
            Err(Error::InvalidInput {
                what: "database URL",
                reason: format!(
                    "unknown scheme {scheme:?}: sqlite://, mysql://, mariadb://, postgres:// or postgresql://"
                ),
            })
        } else {
            Ok(Backend::Sqlite)
        }
    }

    /// The backend's directory of phi's migrations (`sqlite`, `mysql`,
    /// `postgres`).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Mysql => "mysql",
            Backend::Postgres => "postgres",
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = Error;

    /// `sqlite`, `mysql` (or `mariadb`), `postgres` (or `postgresql`).
    fn from_str(name: &str) -> Result<Backend> {
        match name {
            "sqlite" => Ok(Backend::Sqlite),
            "mysql" | "mariadb" => Ok(Backend::Mysql),
            "postgres" | "postgresql" => Ok(Backend::Postgres),
            other => Err(Error::InvalidInput {
                what: "backend",
                reason: format!("{other:?}: sqlite, mysql (mariadb) or postgres (postgresql)"),
            }),
        }
    }
}

/// What phi sets on an application's connection before its own statements
/// on it (a generated write or load, a job): on an SQLite connection
/// (Diesel's, or one of Diesel's r2d2 pool) a busy timeout when it has
/// none (see [`crate::sqlite`]); nothing on any other.
pub(crate) fn prepare_application_connection<C: 'static>(conn: &mut C) -> diesel::QueryResult<()> {
    #[cfg(feature = "sqlite")]
    crate::sqlite::prepare_application_connection(conn)?;
    #[cfg(not(feature = "sqlite"))]
    let _ = conn;
    Ok(())
}
