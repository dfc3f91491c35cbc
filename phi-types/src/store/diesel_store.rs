//! The key store in the application's database, through Diesel.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDateTime;
use diesel::connection::{AnsiTransactionManager, TransactionManager as _};
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use scheduled_thread_pool::ScheduledThreadPool;

use super::schema::{
    encryption_key_audit, kek_check_values, phi_feed_readers, phi_key_events, phi_key_feed,
    phi_rollout, phi_rollout_owners, phi_rotation_claims, phi_seal_counts, user_encryption_keys,
};
use super::{
    AuditAction, AuditEvent, AuditFilter, AuditRecord, KeyCount, KeyState, KeyStore, Rewrap,
    SealCount, StoredKey,
};
use crate::connection::PhiConnection;
use crate::error::{Error, Result};
use crate::feed::{FeedEvent, FeedListener, FeedReader, KeyEvent, KeyEventKind};
use crate::kek::KekCheck;
use crate::set_shape::SetShape;
use crate::store::Rollout;

/// Owners per `IN (...)` list; larger sets are loaded in several queries.
const OWNERS_PER_QUERY: usize = 5_000;
/// Owners of a rotation job per `IN (...)` list or multi-row `INSERT`.
const CLAIMS_PER_QUERY: usize = 1_000;
/// Audit rows per multi-row `INSERT`.
const AUDIT_ROWS_PER_INSERT: usize = 500;

/// A [`KeyStore`] in the application's database, reached through a Diesel
/// connection pool of its own.
///
/// On SQLite the pool and the application's connection share one database
/// file and one write lock. Reads never need it: opening values inside the
/// application's write transaction only reads the key tables (the `unwrap`
/// audit records are written in the background, once the transaction
/// ends). Sealing for an owner without a key writes: resolve keys for
/// sealing ([`Keyring::keys_for_seal_many`](crate::Keyring::keys_for_seal_many))
/// before beginning a write transaction, or a new owner's key insert waits
/// for that transaction (up to a 10 s busy timeout) and then fails. (In
/// SQLite's default rollback-journal mode, a transaction that outgrows its
/// page cache takes the exclusive lock early and then blocks readers too;
/// WAL mode, `PRAGMA journal_mode = WAL`, never does.) The keyring writes
/// audit records from a thread of its own at any time, so give the
/// application's SQLite connections a busy timeout (`PRAGMA busy_timeout =
/// 10000`) as any SQLite database with more than one connection needs:
/// without one, a query that meets such a write fails at once with
/// "database is locked". MySQL / MariaDB and PostgreSQL have no such
/// constraint.
///
/// A database user that may only read the key tables can open values:
/// connect with [`connect_without_migrating`](Self::connect_without_migrating);
/// the `unwrap` audit records it cannot write are counted and logged (see
/// [`Keyring::flush_audit`](crate::Keyring::flush_audit)).
///
/// ```no_run
/// # #[cfg(feature = "sqlite")] {
/// use diesel::SqliteConnection;
/// use phi_types::DieselKeyStore;
/// let store = DieselKeyStore::<SqliteConnection>::connect("clinic.db")?;
/// # }
/// # Ok::<(), phi_types::Error>(())
/// ```
pub struct DieselKeyStore<C: PhiConnection> {
    pool: Pool<ConnectionManager<C>>,
    /// Where a feed listener connects ([`connect`](Self::connect) only).
    database_url: Option<String>,
    /// The one thread on which the pool of [`connect`](Self::connect)
    /// opens its connections, waited for on drop.
    connecting: Option<Connecting>,
}

/// How long dropping a pool's [`Connecting`] waits for a connection being
/// opened.
const CONNECTING_WAIT: Duration = Duration::from_secs(5);

/// The one thread on which a pool of phi's own opens its connections
/// (r2d2's `thread_pool`), waited for when dropped.
///
/// r2d2 opens a connection in the background for every `get` that finds
/// no idle one, and may hand the caller another that came back first, so
/// the opening can outlive the work that asked for it. A process exiting
/// then tears down the client library (libpq's OpenSSL or Kerberos state,
/// say) under that thread and crashes on its way out. Dropping this waits
/// (at most [`CONNECTING_WAIT`]) until the opening in progress is done.
pub(crate) struct Connecting(Arc<ScheduledThreadPool>);

impl Connecting {
    /// A thread named `name`.
    pub(crate) fn new(name: &str) -> Self {
        Connecting(Arc::new(
            ScheduledThreadPool::builder()
                .num_threads(1)
                .thread_name_pattern(name)
                .build(),
        ))
    }

    /// For r2d2's `Builder::thread_pool`.
    pub(crate) fn thread(&self) -> Arc<ScheduledThreadPool> {
        self.0.clone()
    }
}

impl Drop for Connecting {
    fn drop(&mut self) {
        let (done, waited) = std::sync::mpsc::channel::<()>();
        // Runs after the opening in progress, on the same single thread.
        self.0.execute(move || {
            let _ = done.send(());
        });
        let _ = waited.recv_timeout(CONNECTING_WAIT);
    }
}

impl<C: PhiConnection> DieselKeyStore<C> {
    /// A store over an existing pool. Its connections must not be shared
    /// with a transaction of the caller's. Runs no migrations: phi's tables
    /// must exist (see [`migrations`](crate::migrations)).
    ///
    /// On PostgreSQL a keyring following the feed over this store reads it
    /// once per interval only: to be woken by `NOTIFY` at once, it needs the
    /// database URL ([`connect`](Self::connect), or
    /// [`listen_url`](Self::listen_url)).
    pub fn new(pool: Pool<ConnectionManager<C>>) -> Self {
        DieselKeyStore {
            pool,
            database_url: None,
            connecting: None,
        }
    }

    /// The same store, opening its feed listener (PostgreSQL `LISTEN`, see
    /// [`KeyStore::feed_listener`]) on a connection of its own to
    /// `database_url`. [`connect`](Self::connect) sets it.
    #[must_use]
    pub fn listen_url(mut self, database_url: impl Into<String>) -> Self {
        self.database_url = Some(database_url.into());
        self
    }

    /// Connects a small pool (up to 4 connections) to `database_url` and
    /// checks phi's tables on it ([`migrations::check`](crate::migrations::check),
    /// one catalog query). Changes no schema: the application owns it, and
    /// adds phi's migrations to its own
    /// ([`migrations::write_to`](crate::migrations::write_to), `phi
    /// migrations write`) or runs them explicitly
    /// ([`builder`](Self::builder)`(url).run_migrations(true)`).
    ///
    /// On SQLite, use a file database: an in-memory database is private to
    /// each connection.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::SqliteConnection;
    /// use phi_types::DieselKeyStore;
    /// // phi's migrations already applied, by `diesel migration run`:
    /// let store = DieselKeyStore::<SqliteConnection>::connect("clinic.db")?;
    /// # }
    /// # Ok::<(), phi_types::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Store`] when the database cannot be reached;
    /// [`Error::Schema`] naming the table and the migration of phi that is
    /// missing, or a table of phi's name that is not phi's.
    pub fn connect(database_url: &str) -> Result<Self> {
        Self::builder(database_url).connect()
    }

    /// How to connect to `database_url`: whether to run phi's migrations
    /// or check its tables first.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::SqliteConnection;
    /// use phi_types::DieselKeyStore;
    /// // A deployment step, or a development database: phi runs its own
    /// // pending migrations (recorded in `__diesel_schema_migrations`).
    /// let store = DieselKeyStore::<SqliteConnection>::builder("clinic.db")
    ///     .run_migrations(true)
    ///     .connect()?;
    /// # }
    /// # Ok::<(), phi_types::Error>(())
    /// ```
    pub fn builder(database_url: &str) -> DieselKeyStoreBuilder<C> {
        DieselKeyStoreBuilder::new(database_url)
    }

    /// Connects a small pool (up to 4 connections) to `database_url`,
    /// neither running migrations nor checking phi's tables.
    ///
    /// # Errors
    /// [`Error::Store`] when the database cannot be reached.
    #[deprecated(
        note = "`connect` no longer migrates; for a login that may not read the catalog of every \
                table, use `DieselKeyStore::builder(url).check_schema(false).connect()`"
    )]
    pub fn connect_without_migrating(database_url: &str) -> Result<Self> {
        Self::builder(database_url).check_schema(false).connect()
    }

    /// The pool this store uses.
    pub fn pool(&self) -> &Pool<ConnectionManager<C>> {
        &self.pool
    }

    fn conn(&self) -> Result<PooledConnection<ConnectionManager<C>>> {
        self.pool
            .get()
            .map_err(|e| Error::store("taking a key store connection", e))
    }
}

/// How a [`DieselKeyStore`] connects, from [`DieselKeyStore::builder`]:
/// by default it checks phi's tables and changes nothing, as
/// [`DieselKeyStore::connect`] does.
pub type DieselKeyStoreBuilder<C> = super::StoreBuilder<DieselKeyStore<C>>;

impl<C: PhiConnection> super::PooledStoreSealed for DieselKeyStore<C> {}

impl<C: PhiConnection> super::PooledStore for DieselKeyStore<C> {
    type Connection = C;
    const BUILDER: &'static str = "DieselKeyStoreBuilder";
    const ACCESS_LOG: bool = false;

    fn open(database_url: &str) -> Result<Self> {
        let (pool, connecting) = super::open_pool(
            database_url,
            "phi-store-connect",
            "connecting the key store pool",
        )?;
        let mut store = DieselKeyStore::new(pool).listen_url(database_url);
        store.connecting = Some(connecting);
        Ok(store)
    }

    fn pooled(&self) -> Result<PooledConnection<ConnectionManager<C>>> {
        self.conn()
    }
}

impl<C: PhiConnection> fmt::Debug for DieselKeyStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DieselKeyStore")
            .field("backend", &std::any::type_name::<C>())
            .field("pool", &self.pool.state())
            .finish()
    }
}

type KeyRow = (String, i64, String, Vec<u8>, String, NaiveDateTime);
type AuditRow = (
    i64,
    NaiveDateTime,
    String,
    String,
    Option<i64>,
    Option<String>,
    String,
    Option<String>,
);

fn audit_record(row: AuditRow) -> Result<AuditRecord> {
    let (id, occurred_at, owner_id, action, key_version, kek_id, actor, detail) = row;
    let bad = |what: String| {
        Error::store(
            "reading encryption_key_audit",
            format!("record {id} of owner {owner_id:?}: {what}"),
        )
    };
    let action =
        AuditAction::parse(&action).ok_or_else(|| bad(format!("unknown action {action:?}")))?;
    let key_version = key_version
        .map(|v| u32::try_from(v).map_err(|_| bad(format!("key version {v} is out of range"))))
        .transpose()?;
    Ok(AuditRecord {
        id,
        event: AuditEvent {
            occurred_at,
            owner_id,
            action,
            key_version,
            kek_id,
            actor,
            detail,
        },
    })
}

/// The server's version (`SELECT VERSION()`).
#[derive(QueryableByName)]
#[allow(dead_code)] // Read on MySQL / MariaDB only.
struct ServerVersion {
    #[diesel(sql_type = diesel::sql_types::Text)]
    version: String,
}

/// One owner id, from an owners query.
#[derive(QueryableByName)]
struct OwnerRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    owner_id: String,
}

/// Counts per (KEK, state).
#[derive(QueryableByName)]
struct CountRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    kek_id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    state: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n_keys: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n_owners: i64,
}

/// The owners query wrapped so its first column, whatever its name and
/// type, is read as text.
fn owners_sql(query: &str, text: &str) -> Result<String> {
    let query = query.trim().trim_end_matches(';').trim_end();
    if query.is_empty() {
        return Err(Error::Config("the owners query is empty".into()));
    }
    if query.contains(';') {
        return Err(Error::Config(
            "the owners query must be a single SELECT statement".into(),
        ));
    }
    // A block comment left open would swallow the wrapper below, and MySQL /
    // MariaDB accept an unterminated one: the query could then close the
    // `WITH` early and end in `INTO OUTFILE`, a file written on the database
    // host that no read-only transaction prevents. `INTO` has no place in an
    // owners query on any backend, so it is refused outright, whatever
    // follows it (`OUTFILE`, `DUMPFILE`, a variable, a table).
    if query.contains("/*") {
        return Err(Error::Config(
            "the owners query must not contain a block comment (`/*`)".into(),
        ));
    }
    if query
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|word| word.eq_ignore_ascii_case("into"))
    {
        return Err(Error::Config(
            "the owners query must not contain INTO: it only selects owner ids".into(),
        ));
    }
    Ok(format!(
        // The query on lines of its own: a trailing `--` comment ends at its
        // line and cannot swallow the wrapper.
        "WITH phi_owners (owner_id) AS (\n{query}\n) \
         SELECT DISTINCT CAST(owner_id AS {text}) AS owner_id FROM phi_owners \
         WHERE owner_id IS NOT NULL ORDER BY 1"
    ))
}

fn now() -> NaiveDateTime {
    chrono::Utc::now().naive_utc()
}

fn stored_key(row: KeyRow) -> Result<StoredKey> {
    let (owner_id, version, kek_id, wrapped_key, state, created_at) = row;
    let bad = |what: String| {
        Error::store(
            "reading user_encryption_keys",
            format!("row of owner {owner_id:?}: {what}"),
        )
    };
    let version = u32::try_from(version)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| bad(format!("version {version} is outside 1..=4294967295")))?;
    let state = KeyState::parse(&state).ok_or_else(|| bad(format!("unknown state {state:?}")))?;
    Ok(StoredKey {
        owner_id,
        version,
        kek_id,
        wrapped_key,
        state,
        created_at,
    })
}

/// Rewraps per set-based `UPDATE` statement (five bound values each).
const REWRAPS_PER_UPDATE: usize = 1_000;

/// The rewrap of a batch of data key rows as one `UPDATE`, built with
/// Diesel's [`AstPass`](diesel::query_builder::AstPass) (identifiers quoted
/// by the backend, every value bound): Diesel's `update()` DSL cannot join
/// a list of bound rows.
///
/// ```text
/// UPDATE user_encryption_keys AS phi_t
///   SET kek_id = phi_v.to_kek, wrapped_key = phi_v.wrapped_key, updated_at = ?
///   <(owner_id, version, from_kek, to_kek, wrapped_key), … as phi_v>
/// WHERE phi_t.owner_id = phi_v.owner_id AND phi_t.version = phi_v.version
///   AND phi_t.kek_id = phi_v.from_kek AND phi_t.state <> 'destroyed'
/// ```
///
/// A row changes only while it still names the KEK it was read under and
/// is not destroyed: the compare-and-set of one rewrap, for every row.
struct RewrapUpdate<'a> {
    shape: SetShape,
    rows: &'a [&'a Rewrap],
    /// Each row's version, as bound.
    versions: Vec<i64>,
    at: NaiveDateTime,
}

impl<'a> RewrapUpdate<'a> {
    fn new(shape: SetShape, rows: &'a [&'a Rewrap], at: NaiveDateTime) -> Self {
        let versions = rows.iter().map(|r| i64::from(r.version)).collect();
        RewrapUpdate {
            shape,
            rows,
            versions,
            at,
        }
    }
}

impl<DB> diesel::query_builder::QueryFragment<DB> for RewrapUpdate<'_>
where
    DB: diesel::backend::Backend
        + diesel::sql_types::HasSqlType<diesel::sql_types::Text>
        + diesel::sql_types::HasSqlType<diesel::sql_types::BigInt>
        + diesel::sql_types::HasSqlType<diesel::sql_types::Binary>
        + diesel::sql_types::HasSqlType<diesel::sql_types::Timestamp>,
    String: diesel::serialize::ToSql<diesel::sql_types::Text, DB>,
    str: diesel::serialize::ToSql<diesel::sql_types::Text, DB>,
    i64: diesel::serialize::ToSql<diesel::sql_types::BigInt, DB>,
    Vec<u8>: diesel::serialize::ToSql<diesel::sql_types::Binary, DB>,
    NaiveDateTime: diesel::serialize::ToSql<diesel::sql_types::Timestamp, DB>,
{
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, DB>,
    ) -> QueryResult<()> {
        use diesel::sql_types::{BigInt, Binary, Text, Timestamp};
        fn qualified<DB: diesel::backend::Backend>(
            out: &mut diesel::query_builder::AstPass<'_, '_, DB>,
            alias: &str,
            column: &str,
        ) -> QueryResult<()> {
            out.push_identifier(alias)?;
            out.push_sql(".");
            out.push_identifier(column)
        }
        // The text varies with the number of rows.
        out.unsafe_to_cache_prepared();
        let join = self.shape == SetShape::Join;
        let values = |out: &mut diesel::query_builder::AstPass<'_, 'b, DB>,
                      n: usize,
                      named: bool|
         -> QueryResult<()> {
            let r: &'b Rewrap = self.rows[n];
            for i in 0..5 {
                if i > 0 {
                    out.push_sql(", ");
                }
                match i {
                    0 => out.push_bind_param::<Text, String>(&r.owner_id)?,
                    1 => out.push_bind_param::<BigInt, i64>(&self.versions[n])?,
                    2 => out.push_bind_param::<Text, String>(&r.from_kek)?,
                    3 => out.push_bind_param::<Text, String>(&r.to_kek)?,
                    _ => out.push_bind_param::<Binary, Vec<u8>>(&r.wrapped_key)?,
                }
                if named {
                    out.push_sql(" AS ");
                    out.push_identifier(&self.shape.value_column(i))?;
                }
            }
            Ok(())
        };
        out.push_sql("UPDATE ");
        out.push_identifier(super::schema::user_encryption_keys::sql_name())?;
        out.push_sql(" AS ");
        out.push_identifier("phi_t")?;
        let matches = [("owner_id", 0), ("version", 1), ("kek_id", 2)];
        if join {
            out.push_sql(" JOIN (");
            for n in 0..self.rows.len() {
                out.push_sql(if n == 0 {
                    "SELECT "
                } else {
                    " UNION ALL SELECT "
                });
                values(&mut out, n, n == 0)?;
            }
            out.push_sql(") AS ");
            out.push_identifier("phi_v")?;
            for (n, (column, i)) in matches.iter().enumerate() {
                out.push_sql(if n == 0 { " ON " } else { " AND " });
                qualified(&mut out, "phi_t", column)?;
                out.push_sql(" = ");
                qualified(&mut out, "phi_v", &self.shape.value_column(*i))?;
            }
        }
        out.push_sql(" SET ");
        for (n, (column, value)) in [
            ("kek_id", Some(3)),
            ("wrapped_key", Some(4)),
            ("updated_at", None),
        ]
        .into_iter()
        .enumerate()
        {
            if n > 0 {
                out.push_sql(", ");
            }
            if join {
                qualified(&mut out, "phi_t", column)?;
            } else {
                out.push_identifier(column)?;
            }
            out.push_sql(" = ");
            match value {
                Some(i) => qualified(&mut out, "phi_v", &self.shape.value_column(i))?,
                None => out.push_bind_param::<Timestamp, NaiveDateTime>(&self.at)?,
            }
        }
        if join {
            out.push_sql(" WHERE ");
        } else {
            out.push_sql(" FROM (VALUES ");
            for n in 0..self.rows.len() {
                out.push_sql(if n == 0 { "(" } else { ", (" });
                values(&mut out, n, false)?;
                out.push_sql(")");
            }
            out.push_sql(") AS ");
            out.push_identifier("phi_v")?;
            if self.shape == SetShape::Values {
                out.push_sql(" (");
                for i in 0..5 {
                    if i > 0 {
                        out.push_sql(", ");
                    }
                    out.push_identifier(&self.shape.value_column(i))?;
                }
                out.push_sql(")");
            }
            for (column, i) in matches {
                out.push_sql(if i == 0 { " WHERE " } else { " AND " });
                qualified(&mut out, "phi_t", column)?;
                out.push_sql(" = ");
                qualified(&mut out, "phi_v", &self.shape.value_column(i))?;
            }
            out.push_sql(" AND ");
        }
        qualified(&mut out, "phi_t", "state")?;
        out.push_sql(" <> ");
        out.push_bind_param::<Text, str>(KeyState::Destroyed.as_str())?;
        Ok(())
    }
}

impl diesel::query_builder::QueryId for RewrapUpdate<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Conn> RunQueryDsl<Conn> for RewrapUpdate<'_> {}

macro_rules! diesel_key_store {
    ($($feature:literal => $conn:ty, $transaction:ident, lock($($lock:ident)?), $shape:expr, $text:literal, $read_only:expr, $version_sql:expr, $one_worker:literal);* $(;)?) => {$(
        #[cfg(feature = $feature)]
        impl KeyStore for DieselKeyStore<$conn> {
            fn pool_state(&self) -> Option<crate::store::PoolState> {
                let state = self.pool.state();
                Some(crate::store::PoolState::new(
                    state.connections,
                    state.idle_connections,
                    self.pool.max_size(),
                ))
            }

            fn load_keys(&self, owners: &[&str]) -> Result<Vec<StoredKey>> {
                crate::metrics::store_query("load_keys", || self.load_keys_now(owners))
            }

            fn insert_key_if_absent(&self, key: &StoredKey) -> Result<bool> {
                crate::metrics::store_query("insert_key", || self.insert_key_now(key))
            }

            fn append_audit(&self, events: &[AuditEvent]) -> Result<()> {
                crate::metrics::store_query("append_audit", || self.append_audit_now(events))
            }

            fn kek_check(&self, kek_id: &str) -> Result<Option<KekCheck>> {
                use kek_check_values::dsl as c;
                crate::metrics::store_query("kek_check", || {
                    let mut conn = self.conn()?;
                    let row: Option<(String, Vec<u8>)> = c::kek_check_values
                        .filter(c::kek_id.eq(kek_id))
                        .select((c::format, c::check_value))
                        .first(&mut *conn)
                        .optional()
                        .map_err(|e| Error::store("reading a KEK check value", e))?;
                    Ok(row.map(|(format, value)| KekCheck::new(format, value)))
                })
            }

            fn insert_kek_check_if_absent(&self, kek_id: &str, check: &KekCheck) -> Result<bool> {
                use kek_check_values::dsl as c;
                crate::metrics::store_query("insert_kek_check", || {
                    let mut conn = self.conn()?;
                    let inserted = diesel::insert_into(c::kek_check_values)
                        .values((
                            c::kek_id.eq(kek_id),
                            c::format.eq(&check.format),
                            c::check_value.eq(&check.value),
                            c::created_at.eq(now()),
                        ))
                        .execute(&mut *conn);
                    match inserted {
                        Ok(n) => Ok(n == 1),
                        Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => Ok(false),
                        Err(e) => Err(Error::store("storing a KEK check value", e)),
                    }
                })
            }

            fn owners(&self) -> Result<Vec<String>> {
                crate::metrics::store_query("owners", || self.owners_now())
            }

            fn keys_page(
                &self,
                wrapped_by: Option<&str>,
                not_wrapped_by: Option<&str>,
                after: Option<(&str, u32)>,
                limit: usize,
            ) -> Result<Vec<StoredKey>> {
                use user_encryption_keys::dsl as k;
                crate::metrics::store_query("keys_page", || {
                    let mut conn = self.conn()?;
                    let mut query = k::user_encryption_keys
                        .filter(k::state.ne(KeyState::Destroyed.as_str()))
                        .select((k::owner_id, k::version, k::kek_id, k::wrapped_key, k::state, k::created_at))
                        .order((k::owner_id, k::version))
                        .limit(i64::try_from(limit).unwrap_or(i64::MAX))
                        .into_boxed();
                    if let Some(kek) = wrapped_by {
                        query = query.filter(k::kek_id.eq(kek));
                    }
                    if let Some(kek) = not_wrapped_by {
                        query = query.filter(k::kek_id.ne(kek));
                    }
                    if let Some((owner, version)) = after {
                        query = query.filter(
                            k::owner_id
                                .gt(owner)
                                .or(k::owner_id.eq(owner).and(k::version.gt(i64::from(version)))),
                        );
                    }
                    let rows: Vec<KeyRow> = query
                        .load(&mut *conn)
                        .map_err(|e| Error::store("listing data keys", e))?;
                    rows.into_iter().map(stored_key).collect()
                })
            }

            fn rewrap_keys(&self, rewraps: &[Rewrap]) -> Result<Vec<bool>> {
                use user_encryption_keys::dsl as k;
                if rewraps.is_empty() {
                    return Ok(Vec::new());
                }
                crate::metrics::store_query("rewrap_keys", || {
                    let mut conn = self.conn()?;
                    let at = now();
                    (*conn)
                        .$transaction(|conn| -> diesel::QueryResult<Vec<bool>> {
                            // The rows as they are now, locked until the
                            // end of the transaction (SQLite's immediate
                            // transaction holds the write lock already).
                            let mut owners: Vec<&str> = rewraps.iter().map(|r| r.owner_id.as_str()).collect();
                            owners.sort_unstable();
                            owners.dedup();
                            let mut current = std::collections::HashMap::new();
                            for chunk in owners.chunks(OWNERS_PER_QUERY) {
                                let rows: Vec<(String, i64, String, String)> = k::user_encryption_keys
                                    .filter(k::owner_id.eq_any(chunk))
                                    .select((k::owner_id, k::version, k::kek_id, k::state))
                                    $(.$lock())?
                                    .load(conn)?;
                                for (owner, version, kek, state) in rows {
                                    current.insert((owner, version), (kek, state));
                                }
                            }
                            // What the compare-and-set will change: a row
                            // still wrapped by the KEK it was read under and
                            // not destroyed. A row listed twice is changed
                            // once, by its first rewrap.
                            let mut applied = Vec::with_capacity(rewraps.len());
                            let mut writes = Vec::new();
                            for r in rewraps {
                                let key = (r.owner_id.clone(), i64::from(r.version));
                                let applies = current.get(&key).is_some_and(|(kek, state): &(String, String)| {
                                    *kek == r.from_kek && state != KeyState::Destroyed.as_str()
                                });
                                if applies {
                                    current.remove(&key);
                                    writes.push(r);
                                }
                                applied.push(applies);
                            }
                            // One guarded statement per chunk: the guard is
                            // the same compare-and-set, so the rows it
                            // reports are exactly those counted above.
                            let mut written = 0;
                            for chunk in writes.chunks(REWRAPS_PER_UPDATE) {
                                written += RewrapUpdate::new($shape, chunk, at).execute(conn)?;
                            }
                            if written != writes.len() {
                                return Err(DieselError::QueryBuilderError(
                                    format!("rewrapping data keys changed {written} rows, {} expected", writes.len()).into(),
                                ));
                            }
                            let audit: Vec<AuditEvent> = writes.iter().map(|r| r.audit.clone()).collect();
                            Self::insert_audit(conn, &audit)?;
                            let events: Vec<KeyEvent> = writes
                                .iter()
                                .map(|r| {
                                    feed_event(&r.audit, KeyEventKind::Rewrap)
                                        .with_detail(format!("from KEK {} to KEK {}", r.from_kek, r.to_kek))
                                })
                                .collect();
                            Self::insert_events(conn, &events)?;
                            Ok(applied)
                        })
                        .map_err(|e| Error::store("rewrapping data keys", e))
                })
            }

            fn set_key_state(
                &self,
                owner: &str,
                version: u32,
                from: KeyState,
                to: KeyState,
                audit: &AuditEvent,
            ) -> Result<bool> {
                use user_encryption_keys::dsl as k;
                crate::metrics::store_query("set_key_state", || {
                    let mut conn = self.conn()?;
                    (*conn)
                        .$transaction(|conn| -> diesel::QueryResult<bool> {
                            let n = diesel::update(
                                k::user_encryption_keys
                                    .filter(k::owner_id.eq(owner))
                                    .filter(k::version.eq(i64::from(version)))
                                    .filter(k::state.eq(from.as_str())),
                            )
                            .set((k::state.eq(to.as_str()), k::updated_at.eq(now())))
                            .execute(conn)?;
                            if n == 1 {
                                Self::insert_audit(conn, std::slice::from_ref(audit))?;
                                let kind = match to {
                                    KeyState::Retired => KeyEventKind::Retire,
                                    KeyState::Destroyed => KeyEventKind::Shred,
                                    KeyState::Active => KeyEventKind::Clear,
                                };
                                Self::insert_events(conn, &[feed_event(audit, kind)])?;
                            }
                            Ok(n == 1)
                        })
                        .map_err(|e| Error::store("changing a data key's state", e))
                })
            }

            fn destroy_keys(
                &self,
                owner: &str,
                listed: Option<&[u32]>,
                audit: &AuditEvent,
            ) -> Result<Vec<u32>> {
                use user_encryption_keys::dsl as k;
                crate::metrics::store_query("destroy_keys", || {
                    let mut conn = self.conn()?;
                    // Ok(Err(unlisted)): refused, nothing written.
                    let outcome = (*conn)
                        .$transaction(|conn| -> diesel::QueryResult<std::result::Result<Vec<i64>, Vec<u32>>> {
                            // The rows locked (SQLite's immediate transaction
                            // holds the write lock already), then read again
                            // until a read finds no new one: a version added
                            // by a rotation that held the lock first (its
                            // insert committed after this statement began) is
                            // seen, and no later rotation can add one before
                            // this transaction ends (it locks these rows first).
                            let read = |conn: &mut $conn| -> diesel::QueryResult<Vec<(String, i64)>> {
                                k::user_encryption_keys
                                    .filter(k::owner_id.eq(owner))
                                    .filter(k::state.ne(KeyState::Destroyed.as_str()))
                                    .select((k::owner_id, k::version))
                                    .order(k::version)
                                    $(.$lock())?
                                    .load(conn)
                            };
                            let mut rows = read(conn)?;
                            let mut reads = 1;
                            loop {
                                let again = read(conn)?;
                                if again == rows {
                                    break;
                                }
                                rows = again;
                                reads += 1;
                                if reads > 8 {
                                    return Err(DieselError::QueryBuilderError(
                                        "data keys of the owner kept being added while shredding it; nothing was destroyed: shred again".into(),
                                    ));
                                }
                            }
                            // Never another owner's keys, whatever the
                            // column's collation: nothing is destroyed.
                            if let Some((other, version)) = rows.iter().find(|(o, _)| o != owner) {
                                return Err(DieselError::QueryBuilderError(
                                    format!(
                                        "the key store matched a data key row of owner {other:?} (version {version}) \
                                         for owner {owner:?}: owner ids must compare byte for byte (on MySQL / MariaDB, \
                                         run phi's migrations: 2026-12-07-000001_owner_ids_byte_exact); nothing was destroyed"
                                    )
                                    .into(),
                                ));
                            }
                            let versions: Vec<i64> = rows.into_iter().map(|(_, v)| v).collect();
                            if let Some(listed) = listed {
                                let unlisted: Vec<u32> = versions
                                    .iter()
                                    .filter_map(|v| u32::try_from(*v).ok())
                                    .filter(|v| !listed.contains(v))
                                    .collect();
                                if !unlisted.is_empty() {
                                    return Ok(Err(unlisted));
                                }
                            }
                            // Exactly the versions read: a row committed
                            // since (READ COMMITTED) is neither destroyed
                            // nor left unaudited.
                            diesel::update(
                                k::user_encryption_keys
                                    .filter(k::owner_id.eq(owner))
                                    .filter(k::version.eq_any(&versions))
                                    .filter(k::state.ne(KeyState::Destroyed.as_str())),
                            )
                            .set((
                                k::state.eq(KeyState::Destroyed.as_str()),
                                k::wrapped_key.eq(Vec::<u8>::new()),
                                k::updated_at.eq(now()),
                            ))
                            .execute(conn)?;
                            let events: Vec<AuditEvent> = versions
                                .iter()
                                .map(|v| AuditEvent {
                                    key_version: u32::try_from(*v).ok(),
                                    ..audit.clone()
                                })
                                .collect();
                            Self::insert_audit(conn, &events)?;
                            if !versions.is_empty() {
                                let event = KeyEvent {
                                    key_version: None,
                                    ..feed_event(audit, KeyEventKind::Shred)
                                };
                                Self::insert_events(conn, &[event])?;
                            }
                            Ok(Ok(versions))
                        })
                        .map_err(|e| Error::store("destroying data keys", e))?;
                    match outcome {
                        Ok(versions) => Ok(versions.into_iter().filter_map(|v| u32::try_from(v).ok()).collect()),
                        Err(unlisted) => Err(super::unlisted_versions(owner, listed.unwrap_or_default(), &unlisted)),
                    }
                })
            }

            fn audit(&self, owner: Option<&str>, limit: usize) -> Result<Vec<AuditRecord>> {
                use encryption_key_audit::dsl as a;
                crate::metrics::store_query("audit", || {
                    let mut conn = self.conn()?;
                    let mut query = a::encryption_key_audit
                        .select((a::id, a::occurred_at, a::owner_id, a::action, a::key_version, a::kek_id, a::actor, a::detail))
                        .order(a::id.desc())
                        .limit(i64::try_from(limit).unwrap_or(i64::MAX))
                        .into_boxed();
                    if let Some(owner) = owner {
                        query = query.filter(a::owner_id.eq(owner));
                    }
                    let rows: Vec<AuditRow> = query
                        .load(&mut *conn)
                        .map_err(|e| Error::store("reading the audit trail", e))?;
                    rows.into_iter().map(audit_record).collect()
                })
            }

            fn audit_page(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
                use encryption_key_audit::dsl as a;
                crate::metrics::store_query("audit_page", || {
                    let mut conn = self.conn()?;
                    let mut query = a::encryption_key_audit
                        .select((a::id, a::occurred_at, a::owner_id, a::action, a::key_version, a::kek_id, a::actor, a::detail))
                        .order(a::id.desc())
                        .limit(i64::try_from(filter.limit).unwrap_or(i64::MAX))
                        .into_boxed();
                    if let Some(owner) = &filter.owner {
                        query = query.filter(a::owner_id.eq(owner.clone()));
                    }
                    if let Some(action) = filter.action {
                        query = query.filter(a::action.eq(action.as_str()));
                    }
                    if let Some(since) = filter.since {
                        query = query.filter(a::occurred_at.ge(since));
                    }
                    if let Some(until) = filter.until {
                        query = query.filter(a::occurred_at.lt(until));
                    }
                    if let Some(before) = filter.before_id {
                        query = query.filter(a::id.lt(before));
                    }
                    let rows: Vec<AuditRow> = query
                        .load(&mut *conn)
                        .map_err(|e| Error::store("reading the audit trail", e))?;
                    rows.into_iter().map(audit_record).collect()
                })
            }

            fn owners_from_query(&self, sql: &str) -> Result<Vec<String>> {
                let sql = owners_sql(sql, $text)?;
                crate::metrics::store_query("owners_from_query", || {
                    let mut conn = self.conn()?;
                    let rows: Vec<OwnerRow> = read_only(&mut *conn, $read_only, |conn| {
                        diesel::sql_query(sql).load(conn)
                    })
                    .map_err(|e| Error::store("running the owners query (read-only)", e))?;
                    Ok(rows.into_iter().map(|r| r.owner_id).collect())
                })
            }

            fn add_key_version(&self, key: &StoredKey, audit: &AuditEvent, event: &KeyEvent) -> Result<bool> {
                use user_encryption_keys::dsl as k;
                crate::feed::check_writable(std::slice::from_ref(event))?;
                crate::metrics::store_query("add_key_version", || {
                    let mut conn = self.conn()?;
                    // Ok(Err(())): the owner was shredded, nothing written.
                    let inserted = (*conn).$transaction(|conn| -> diesel::QueryResult<std::result::Result<bool, ()>> {
                        // The owner's rows, locked until the end of the
                        // transaction (SQLite's immediate transaction holds
                        // the write lock already): a shred that committed
                        // first is seen here, and one that comes later waits
                        // for this insert and destroys the new version too
                        // (it locks the same rows, then reads again).
                        let rows: Vec<(String, i64, String)> = k::user_encryption_keys
                            .filter(k::owner_id.eq(&key.owner_id))
                            .select((k::owner_id, k::version, k::state))
                            .order(k::version)
                            $(.$lock())?
                            .load(conn)?;
                        let rows: Vec<&(String, i64, String)> = rows.iter().filter(|(o, _, _)| *o == key.owner_id).collect();
                        if !rows.is_empty() && rows.iter().all(|(_, _, state)| state == KeyState::Destroyed.as_str()) {
                            return Ok(Err(()));
                        }
                        if rows.iter().any(|(_, v, _)| *v == i64::from(key.version)) {
                            return Ok(Ok(false));
                        }
                        diesel::insert_into(k::user_encryption_keys)
                            .values((
                                k::owner_id.eq(&key.owner_id),
                                k::version.eq(i64::from(key.version)),
                                k::kek_id.eq(&key.kek_id),
                                k::wrapped_key.eq(&key.wrapped_key),
                                k::state.eq(key.state.as_str()),
                                k::created_at.eq(key.created_at),
                                k::updated_at.eq(key.created_at),
                            ))
                            .execute(conn)?;
                        Self::insert_audit(conn, std::slice::from_ref(audit))?;
                        Self::insert_events(conn, std::slice::from_ref(event))?;
                        Ok(Ok(true))
                    });
                    match inserted {
                        Ok(Ok(inserted)) => Ok(inserted),
                        Ok(Err(())) => Err(Error::Shredded { owner: key.owner_id.clone() }),
                        Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => Ok(false),
                        Err(e) => Err(Error::store("adding a data key version", e)),
                    }
                })
            }

            fn counts_seals(&self) -> bool {
                true
            }

            fn add_seal_counts(&self, counts: &[SealCount]) -> Result<()> {
                let mut counts: Vec<&SealCount> = counts.iter().filter(|c| c.seals > 0).collect();
                if counts.is_empty() {
                    return Ok(());
                }
                // One order for every process: concurrent flushes lock the
                // rows they share in the same order.
                counts.sort_by(|a, b| (a.owner_id.as_bytes(), a.version).cmp(&(b.owner_id.as_bytes(), b.version)));
                crate::metrics::store_query("add_seal_counts", || {
                    let mut conn = self.conn()?;
                    let at = now();
                    (*conn)
                        .$transaction(|conn| -> diesel::QueryResult<()> {
                            for c in &counts {
                                let seals = i64::try_from(c.seals).unwrap_or(i64::MAX);
                                Self::add_seal_count(conn, &c.owner_id, i64::from(c.version), seals, at)?;
                            }
                            Ok(())
                        })
                        .map_err(|e| Error::store("recording seal counts", e))
                })
            }

            fn seal_counts(&self, owners: &[&str]) -> Result<Vec<SealCount>> {
                use phi_seal_counts::dsl as s;
                crate::metrics::store_query("seal_counts", || {
                    let mut conn = self.conn()?;
                    let mut counts = Vec::new();
                    for chunk in owners.chunks(OWNERS_PER_QUERY) {
                        let rows: Vec<(String, i64, i64)> = s::phi_seal_counts
                            .filter(s::owner_id.eq_any(chunk))
                            .select((s::owner_id, s::version, s::seals))
                            .load(&mut *conn)
                            .map_err(|e| Error::store("reading seal counts", e))?;
                        for (owner_id, version, seals) in rows {
                            // Byte for byte, whatever the column's collation.
                            if !chunk.contains(&owner_id.as_str()) {
                                continue;
                            }
                            let version = u32::try_from(version).map_err(|_| {
                                Error::store(
                                    "reading seal counts",
                                    format!("row of owner {owner_id:?}: version {version} is outside 1..=4294967295"),
                                )
                            })?;
                            counts.push(SealCount::new(owner_id, version, u64::try_from(seals).unwrap_or(0)));
                        }
                    }
                    counts.sort_by(|a, b| (a.owner_id.as_str(), a.version).cmp(&(b.owner_id.as_str(), b.version)));
                    Ok(counts)
                })
            }

            fn append_key_events(&self, events: &[KeyEvent], audit: &[AuditEvent]) -> Result<i64> {
                crate::feed::check_writable(events)?;
                crate::metrics::store_query("append_key_events", || {
                    let mut conn = self.conn()?;
                    (*conn)
                        .$transaction(|conn| -> diesel::QueryResult<i64> {
                            Self::insert_audit(conn, audit)?;
                            Self::insert_events(conn, events)
                        })
                        .map_err(|e| Error::store("appending key events", e))
                })
            }

            fn key_events_after(&self, after: i64, limit: usize) -> Result<Vec<FeedEvent>> {
                use phi_key_events::dsl as e;
                crate::metrics::store_query("key_events_after", || {
                    let mut conn = self.conn()?;
                    let rows: Vec<EventRow> = e::phi_key_events
                        .filter(e::id.gt(after))
                        .order(e::id)
                        .limit(i64::try_from(limit).unwrap_or(i64::MAX))
                        .select((e::id, e::occurred_at, e::kind, e::owner_id, e::key_version, e::actor, e::detail))
                        .load(&mut *conn)
                        .map_err(|e| Error::store("reading key events", e))?;
                    rows.into_iter().map(feed_record).collect()
                })
            }

            fn has_feed(&self) -> bool {
                true
            }

            fn feed_head(&self) -> Result<i64> {
                use phi_key_feed::dsl as f;
                crate::metrics::store_query("feed_head", || {
                    let mut conn = self.conn()?;
                    f::phi_key_feed
                        .filter(f::id.eq(1))
                        .select(f::head)
                        .first(&mut *conn)
                        .map_err(|e| Error::store("reading the key-event feed's head", e))
                })
            }

            fn fleet_rollout(&self, policy: &str) -> Result<Option<Rollout>> {
                use phi_rollout::dsl as r;
                use phi_rollout_owners::dsl as o;
                crate::metrics::store_query("fleet_rollout", || {
                    let mut conn = self.conn()?;
                    let read = |conn: &mut $conn| -> diesel::QueryResult<Option<(String, Vec<String>)>> {
                        let Some(mode) = r::phi_rollout
                            .filter(r::policy.eq(policy))
                            .select(r::mode)
                            .first::<String>(conn)
                            .optional()?
                        else {
                            return Ok(None);
                        };
                        let owners = if mode == "owners" {
                            o::phi_rollout_owners
                                .filter(o::policy.eq(policy))
                                .select(o::owner_id)
                                .load(conn)?
                        } else {
                            Vec::new()
                        };
                        Ok(Some((mode, owners)))
                    };
                    // One snapshot: the mode and its owners as one change left them.
                    let row = (*conn)
                        .transaction(read)
                        .map_err(|e| Error::store("reading the fleet's roll-out", e))?;
                    row.map(|(mode, owners)| match mode.as_str() {
                        "all" => Ok(Rollout::All),
                        "nobody" => Ok(Rollout::Nobody),
                        "owners" => Ok(Rollout::owners(owners)),
                        other => Err(Error::store(
                            "reading the fleet's roll-out",
                            format!("phi_rollout.mode is {other:?}, not all, nobody or owners"),
                        )),
                    })
                    .transpose()
                })
            }

            fn set_fleet_rollout(
                &self,
                policy: &str,
                rollout: &Rollout,
                event: &KeyEvent,
                audit: &[AuditEvent],
            ) -> Result<i64> {
                use phi_rollout::dsl as r;
                use phi_rollout_owners::dsl as o;
                crate::feed::check_writable(std::slice::from_ref(event))?;
                let (mode, owners): (&str, Vec<&str>) = match rollout {
                    Rollout::All => ("all", Vec::new()),
                    Rollout::Nobody => ("nobody", Vec::new()),
                    Rollout::Owners(owners) => {
                        let mut owners: Vec<&str> = owners.iter().map(String::as_str).collect();
                        owners.sort_unstable();
                        ("owners", owners)
                    }
                };
                crate::metrics::store_query("set_fleet_rollout", || {
                    let mut conn = self.conn()?;
                    let change = |conn: &mut $conn| {
                        (*conn).$transaction(|conn| -> diesel::QueryResult<i64> {
                            // The policy's row first: locked, it orders two
                            // changes of the same policy one after the other.
                            let updated = diesel::update(r::phi_rollout.filter(r::policy.eq(policy)))
                                .set((
                                    r::mode.eq(mode),
                                    r::updated_at.eq(event.occurred_at),
                                    r::updated_by.eq(&event.actor),
                                ))
                                .execute(conn)?;
                            if updated == 0 {
                                diesel::insert_into(r::phi_rollout)
                                    .values((
                                        r::policy.eq(policy),
                                        r::mode.eq(mode),
                                        r::updated_at.eq(event.occurred_at),
                                        r::updated_by.eq(&event.actor),
                                    ))
                                    .execute(conn)?;
                            }
                            diesel::delete(o::phi_rollout_owners.filter(o::policy.eq(policy))).execute(conn)?;
                            for chunk in owners.chunks(AUDIT_ROWS_PER_INSERT) {
                                let rows: Vec<_> = chunk
                                    .iter()
                                    .map(|owner| (o::policy.eq(policy), o::owner_id.eq(*owner)))
                                    .collect();
                                diesel::insert_into(o::phi_rollout_owners).values(rows).execute(conn)?;
                            }
                            Self::insert_audit(conn, audit)?;
                            Self::insert_events(conn, std::slice::from_ref(event))
                        })
                    };
                    // A change that found no row while another inserted
                    // the policy's first (or, on PostgreSQL, waited on a
                    // row the other replaced) meets the other's row once
                    // it runs again.
                    match change(&mut *conn) {
                        Err(diesel::result::Error::DatabaseError(
                            diesel::result::DatabaseErrorKind::UniqueViolation,
                            _,
                        )) => change(&mut *conn),
                        other => other,
                    }
                    .map_err(|e| Error::store("changing the fleet's roll-out", e))
                })
            }

            fn feed_listener(&self) -> Result<Option<Box<dyn FeedListener>>> {
                match &self.database_url {
                    Some(url) => <$conn as PhiConnection>::feed_listener(url),
                    None => Ok(None),
                }
            }

            fn record_feed_reader(&self, reader: &str, position: i64) -> Result<()> {
                use phi_feed_readers::dsl as r;
                crate::metrics::store_query("record_feed_reader", || {
                    let mut conn = self.conn()?;
                    let at = now();
                    let updated = diesel::update(r::phi_feed_readers.filter(r::reader.eq(reader)))
                        .set((r::position.eq(position), r::updated_at.eq(at)))
                        .execute(&mut *conn)
                        .map_err(|e| Error::store("recording a feed reader's position", e))?;
                    if updated > 0 {
                        return Ok(());
                    }
                    match diesel::insert_into(r::phi_feed_readers)
                        .values((r::reader.eq(reader), r::position.eq(position), r::updated_at.eq(at)))
                        .execute(&mut *conn)
                    {
                        // Recorded meanwhile under the same name: as good.
                        Ok(_) | Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => Ok(()),
                        Err(e) => Err(Error::store("recording a feed reader's position", e)),
                    }
                })
            }

            fn forget_feed_reader(&self, reader: &str) -> Result<()> {
                use phi_feed_readers::dsl as r;
                crate::metrics::store_query("forget_feed_reader", || {
                    let mut conn = self.conn()?;
                    diesel::delete(r::phi_feed_readers.filter(r::reader.eq(reader)))
                        .execute(&mut *conn)
                        .map(drop)
                        .map_err(|e| Error::store("forgetting a feed reader", e))
                })
            }

            fn feed_readers(&self) -> Result<Vec<FeedReader>> {
                use phi_feed_readers::dsl as r;
                crate::metrics::store_query("feed_readers", || {
                    let mut conn = self.conn()?;
                    let rows: Vec<(String, i64, NaiveDateTime)> = r::phi_feed_readers
                        .order(r::reader)
                        .select((r::reader, r::position, r::updated_at))
                        .load(&mut *conn)
                        .map_err(|e| Error::store("reading the feed readers' positions", e))?;
                    Ok(rows
                        .into_iter()
                        .map(|(reader, position, at)| FeedReader::new(reader, position, at))
                        .collect())
                })
            }

            fn rotation_enqueue(&self, job: &str, owners: &[String]) -> Result<u64> {
                use phi_rotation_claims::dsl as r;
                super::claims::check_job_id(job)?;
                crate::metrics::store_query("rotation_enqueue", || {
                    let mut conn = self.conn()?;
                    let mut added = 0u64;
                    for chunk in owners.chunks(CLAIMS_PER_QUERY) {
                        // Another worker may add the same owners meanwhile:
                        // its rows win, and this chunk is read again.
                        let mut attempt = 0;
                        loop {
                            attempt += 1;
                            let at = now();
                            let result = (*conn).$transaction(|conn| -> diesel::QueryResult<u64> {
                                let present: std::collections::HashSet<String> = r::phi_rotation_claims
                                    .filter(r::job_id.eq(job))
                                    .filter(r::owner_id.eq_any(chunk))
                                    .select(r::owner_id)
                                    .load::<String>(conn)?
                                    .into_iter()
                                    .collect();
                                let rows: Vec<_> = chunk
                                    .iter()
                                    .filter(|o| !present.contains(o.as_str()))
                                    .map(|o| {
                                        (
                                            r::job_id.eq(job),
                                            r::owner_id.eq(o.as_str()),
                                            r::state.eq(super::claims::PENDING),
                                            r::updated_at.eq(at),
                                        )
                                    })
                                    .collect();
                                if rows.is_empty() {
                                    return Ok(0);
                                }
                                let n = diesel::insert_into(r::phi_rotation_claims).values(rows).execute(conn)?;
                                Ok(n as u64)
                            });
                            match result {
                                Ok(n) => {
                                    added += n;
                                    break;
                                }
                                Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) if attempt < 5 => {}
                                Err(e) => return Err(Error::store("adding owners to a rotation job", e)),
                            }
                        }
                    }
                    Ok(added)
                })
            }

            fn rotation_claim(
                &self,
                job: &str,
                worker: &str,
                limit: usize,
                now: NaiveDateTime,
                until: NaiveDateTime,
            ) -> Result<Vec<super::claims::RotationClaim>> {
                use phi_rotation_claims::dsl as r;
                super::claims::check_job_id(job)?;
                crate::metrics::store_query("rotation_claim", || {
                    let mut conn = self.conn()?;
                    if let Some(sql) = $version_sql {
                        let row: ServerVersion = diesel::sql_query(sql)
                            .get_result(&mut *conn)
                            .map_err(|e| Error::store("reading the server's version", e))?;
                        super::claims::skip_locked_supported(&row.version)?;
                        // MySQL / MariaDB only (the only backend with a
                        // version check): the claim's transaction keeps
                        // locks on the rows it claims only, not on every
                        // row its scan met (REPEATABLE READ would lock those
                        // too, and concurrent claims would skip them).
                        diesel::connection::SimpleConnection::batch_execute(
                            &mut *conn,
                            "SET TRANSACTION ISOLATION LEVEL READ COMMITTED",
                        )
                            .map_err(|e| Error::store("claiming owners of a rotation job", e))?;
                    }
                    let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
                    (*conn)
                        .$transaction(|conn| -> diesel::QueryResult<Vec<super::claims::RotationClaim>> {
                            if $one_worker {
                                // One worker at a time: SQLite has no row
                                // locks to skip, and one writer anyway.
                                let others: i64 = r::phi_rotation_claims
                                    .filter(r::job_id.eq(job))
                                    .filter(r::state.eq(super::claims::PENDING))
                                    .filter(r::claimed_by.ne(worker))
                                    .filter(r::claimed_until.gt(now))
                                    .count()
                                    .get_result(conn)?;
                                if others > 0 {
                                    return Ok(Vec::new());
                                }
                            }
                            let rows: Vec<(String, Option<i64>)> = r::phi_rotation_claims
                                .filter(r::job_id.eq(job))
                                .filter(r::state.eq(super::claims::PENDING))
                                .filter(r::claimed_until.is_null().or(r::claimed_until.le(now)))
                                .order(r::owner_id)
                                .limit(limit)
                                .select((r::owner_id, r::new_version))
                                $(.$lock().skip_locked())?
                                .load(conn)?;
                            let owners: Vec<&str> = rows.iter().map(|(o, _)| o.as_str()).collect();
                            for chunk in owners.chunks(CLAIMS_PER_QUERY) {
                                diesel::update(
                                    r::phi_rotation_claims
                                        .filter(r::job_id.eq(job))
                                        .filter(r::owner_id.eq_any(chunk)),
                                )
                                .set((
                                    r::claimed_by.eq(worker),
                                    r::claimed_until.eq(until),
                                    r::updated_at.eq(now),
                                ))
                                .execute(conn)?;
                            }
                            Ok(rows
                                .into_iter()
                                .map(|(owner, v)| {
                                    super::claims::RotationClaim::new(owner, v.and_then(|v| u32::try_from(v).ok()))
                                })
                                .collect())
                        })
                        .map_err(|e| Error::store("claiming owners of a rotation job", e))
                })
            }

            fn rotation_add_versions(
                &self,
                job: &str,
                versions: &[super::claims::NewKeyVersion],
            ) -> Result<Vec<bool>> {
                use phi_rotation_claims::dsl as r;
                use user_encryption_keys::dsl as k;
                if versions.is_empty() {
                    return Ok(Vec::new());
                }
                let events: Vec<KeyEvent> = versions.iter().map(|v| v.event.clone()).collect();
                crate::feed::check_writable(&events)?;
                crate::metrics::store_query("rotation_add_versions", || {
                    let mut conn = self.conn()?;
                    (*conn)
                        .$transaction(|conn| -> diesel::QueryResult<Vec<bool>> {
                            let mut owners: Vec<&str> = versions.iter().map(|v| v.key.owner_id.as_str()).collect();
                            owners.sort_unstable();
                            owners.dedup();
                            let mut present = std::collections::HashSet::new();
                            for chunk in owners.chunks(OWNERS_PER_QUERY) {
                                let rows: Vec<(String, i64)> = k::user_encryption_keys
                                    .filter(k::owner_id.eq_any(chunk))
                                    .select((k::owner_id, k::version))
                                    $(.$lock())?
                                    .load(conn)?;
                                present.extend(rows);
                            }
                            let mut inserted = Vec::with_capacity(versions.len());
                            let mut new = Vec::new();
                            for v in versions {
                                let key = (v.key.owner_id.clone(), i64::from(v.key.version));
                                let fresh = present.insert(key);
                                inserted.push(fresh);
                                if fresh {
                                    new.push(v);
                                }
                            }
                            for chunk in new.chunks(AUDIT_ROWS_PER_INSERT) {
                                let rows: Vec<_> = chunk
                                    .iter()
                                    .map(|v| {
                                        (
                                            k::owner_id.eq(v.key.owner_id.as_str()),
                                            k::version.eq(i64::from(v.key.version)),
                                            k::kek_id.eq(v.key.kek_id.as_str()),
                                            k::wrapped_key.eq(v.key.wrapped_key.as_slice()),
                                            k::state.eq(v.key.state.as_str()),
                                            k::created_at.eq(v.key.created_at),
                                            k::updated_at.eq(v.key.created_at),
                                        )
                                    })
                                    .collect();
                                diesel::insert_into(k::user_encryption_keys).values(rows).execute(conn)?;
                            }
                            let audit: Vec<AuditEvent> = new.iter().map(|v| v.audit.clone()).collect();
                            Self::insert_audit(conn, &audit)?;
                            let events: Vec<KeyEvent> = new.iter().map(|v| v.event.clone()).collect();
                            Self::insert_events(conn, &events)?;
                            let at = now();
                            for v in &new {
                                diesel::update(
                                    r::phi_rotation_claims
                                        .filter(r::job_id.eq(job))
                                        .filter(r::owner_id.eq(v.key.owner_id.as_str())),
                                )
                                .set((r::new_version.eq(Some(i64::from(v.key.version))), r::updated_at.eq(at)))
                                .execute(conn)?;
                            }
                            Ok(inserted)
                        })
                        .map_err(|e| Error::store("adding data key versions for a rotation job", e))
                })
            }

            fn retire_versions(&self, retires: &[AuditEvent]) -> Result<Vec<bool>> {
                use user_encryption_keys::dsl as k;
                if retires.is_empty() {
                    return Ok(Vec::new());
                }
                crate::metrics::store_query("retire_versions", || {
                    let mut conn = self.conn()?;
                    let at = now();
                    (*conn)
                        .$transaction(|conn| -> diesel::QueryResult<Vec<bool>> {
                            let mut applied = Vec::with_capacity(retires.len());
                            let mut audit = Vec::new();
                            for a in retires {
                                let Some(version) = a.key_version else {
                                    applied.push(false);
                                    continue;
                                };
                                let n = diesel::update(
                                    k::user_encryption_keys
                                        .filter(k::owner_id.eq(&a.owner_id))
                                        .filter(k::version.eq(i64::from(version)))
                                        .filter(k::state.eq(KeyState::Active.as_str())),
                                )
                                .set((k::state.eq(KeyState::Retired.as_str()), k::updated_at.eq(at)))
                                .execute(conn)?;
                                applied.push(n == 1);
                                if n == 1 {
                                    audit.push(a.clone());
                                }
                            }
                            Self::insert_audit(conn, &audit)?;
                            let events: Vec<KeyEvent> =
                                audit.iter().map(|a| feed_event(a, KeyEventKind::Retire)).collect();
                            Self::insert_events(conn, &events)?;
                            Ok(applied)
                        })
                        .map_err(|e| Error::store("retiring data key versions", e))
                })
            }

            fn rotation_done(&self, job: &str, owners: &[String]) -> Result<()> {
                use phi_rotation_claims::dsl as r;
                crate::metrics::store_query("rotation_done", || {
                    let mut conn = self.conn()?;
                    let at = now();
                    for chunk in owners.chunks(CLAIMS_PER_QUERY) {
                        diesel::update(
                            r::phi_rotation_claims
                                .filter(r::job_id.eq(job))
                                .filter(r::owner_id.eq_any(chunk)),
                        )
                        .set((
                            r::state.eq(super::claims::DONE),
                            r::claimed_until.eq(None::<NaiveDateTime>),
                            r::updated_at.eq(at),
                        ))
                        .execute(&mut *conn)
                        .map_err(|e| Error::store("finishing owners of a rotation job", e))?;
                    }
                    Ok(())
                })
            }

            fn rotation_release(&self, job: &str, worker: &str, owners: &[String]) -> Result<()> {
                use phi_rotation_claims::dsl as r;
                crate::metrics::store_query("rotation_release", || {
                    let mut conn = self.conn()?;
                    let at = now();
                    for chunk in owners.chunks(CLAIMS_PER_QUERY) {
                        diesel::update(
                            r::phi_rotation_claims
                                .filter(r::job_id.eq(job))
                                .filter(r::claimed_by.eq(worker))
                                .filter(r::state.eq(super::claims::PENDING))
                                .filter(r::owner_id.eq_any(chunk)),
                        )
                        .set((r::claimed_until.eq(None::<NaiveDateTime>), r::updated_at.eq(at)))
                        .execute(&mut *conn)
                        .map_err(|e| Error::store("releasing owners of a rotation job", e))?;
                    }
                    Ok(())
                })
            }

            fn rotation_counts(&self, job: &str, now: NaiveDateTime) -> Result<super::claims::RotationCounts> {
                use phi_rotation_claims::dsl as r;
                crate::metrics::store_query("rotation_counts", || {
                    let mut conn = self.conn()?;
                    let count = |conn: &mut $conn, done: bool, claimed: bool| -> diesel::QueryResult<u64> {
                        let mut q = r::phi_rotation_claims.filter(r::job_id.eq(job)).into_boxed();
                        if done {
                            q = q.filter(r::state.eq(super::claims::DONE));
                        } else {
                            q = q.filter(r::state.eq(super::claims::PENDING));
                            q = if claimed {
                                q.filter(r::claimed_until.gt(now))
                            } else {
                                q.filter(r::claimed_until.is_null().or(r::claimed_until.le(now)))
                            };
                        }
                        let n: i64 = q.count().get_result(conn)?;
                        Ok(u64::try_from(n).unwrap_or(0))
                    };
                    let counts = (|| -> diesel::QueryResult<super::claims::RotationCounts> {
                        Ok(super::claims::RotationCounts {
                            pending: count(&mut *conn, false, false)?,
                            claimed: count(&mut *conn, false, true)?,
                            done: count(&mut *conn, true, false)?,
                        })
                    })();
                    counts.map_err(|e| Error::store("counting the owners of a rotation job", e))
                })
            }

            fn key_counts(&self) -> Result<Vec<KeyCount>> {
                crate::metrics::store_query("key_counts", || {
                    let mut conn = self.conn()?;
                    let rows: Vec<CountRow> = diesel::sql_query(format!(
                        "SELECT kek_id, state, COUNT(*) AS n_keys, COUNT(DISTINCT owner_id) AS n_owners \
                         FROM {} GROUP BY kek_id, state ORDER BY kek_id, state",
                        user_encryption_keys::sql_name()
                    ))
                    .load(&mut *conn)
                    .map_err(|e| Error::store("counting data keys", e))?;
                    rows.into_iter()
                        .map(|r| {
                            let state = KeyState::parse(&r.state).ok_or_else(|| {
                                Error::store("counting data keys", format!("unknown state {:?}", r.state))
                            })?;
                            Ok(KeyCount {
                                kek_id: r.kek_id,
                                state,
                                keys: u64::try_from(r.n_keys).unwrap_or(0),
                                owners: u64::try_from(r.n_owners).unwrap_or(0),
                            })
                        })
                        .collect()
                })
            }
        }

        #[cfg(feature = $feature)]
        impl DieselKeyStore<$conn> {
            /// Appends feed events on `conn`, inside the caller's
            /// transaction: increments the head first (its row lock orders
            /// concurrent appenders until commit), then inserts the events
            /// under the ids just taken. Returns the head afterwards.
            fn insert_events(conn: &mut $conn, events: &[KeyEvent]) -> diesel::QueryResult<i64> {
                use phi_key_feed::dsl as f;
                // The schema accepts any non-empty kind (a newer build's
                // events must never be refused by an older schema): the
                // kinds written are checked here.
                if let Some(e) = events.iter().find(|e| !e.kind.is_writable()) {
                    return Err(DieselError::QueryBuilderError(
                        format!("a key event of kind {} cannot be written", e.kind).into(),
                    ));
                }
                let n = i64::try_from(events.len()).unwrap_or(i64::MAX);
                if n > 0 {
                    let updated = diesel::update(f::phi_key_feed.filter(f::id.eq(1)))
                        .set(f::head.eq(f::head + n))
                        .execute(conn)?;
                    if updated != 1 {
                        return Err(DieselError::NotFound);
                    }
                }
                let head: i64 = f::phi_key_feed.filter(f::id.eq(1)).select(f::head).first(conn)?;
                let first = head - n + 1;
                for (chunk_start, chunk) in events.chunks(AUDIT_ROWS_PER_INSERT).enumerate() {
                    let base = first + i64::try_from(chunk_start * AUDIT_ROWS_PER_INSERT).unwrap_or(0);
                    let rows: Vec<EventInsert<'_>> = chunk
                        .iter()
                        .enumerate()
                        .map(|(i, e)| EventInsert::new(base + i64::try_from(i).unwrap_or(0), e))
                        .collect();
                    diesel::insert_into(phi_key_events::table).values(rows).execute(conn)?;
                }
                if n > 0 {
                    conn.notify_feed(head)?;
                }
                Ok(head)
            }

            fn load_keys_now(&self, owners: &[&str]) -> Result<Vec<StoredKey>> {
                use user_encryption_keys::dsl as k;
                let mut conn = self.conn()?;
                let mut keys = Vec::new();
                for chunk in owners.chunks(OWNERS_PER_QUERY) {
                    let rows: Vec<KeyRow> = k::user_encryption_keys
                        .filter(k::owner_id.eq_any(chunk))
                        .select((k::owner_id, k::version, k::kek_id, k::wrapped_key, k::state, k::created_at))
                        .load(&mut *conn)
                        .map_err(|e| Error::store("loading data keys", e))?;
                    let rows = rows.into_iter().map(stored_key).collect::<Result<Vec<_>>>()?;
                    // Byte for byte, whatever the column's collation.
                    super::check_key_owners("loading data keys", chunk, &rows)?;
                    keys.extend(rows);
                }
                Ok(keys)
            }

            /// Appends audit records on `conn` (inside the caller's
            /// transaction, if any).
            fn insert_audit(conn: &mut $conn, events: &[AuditEvent]) -> diesel::QueryResult<()> {
                for chunk in events.chunks(AUDIT_ROWS_PER_INSERT) {
                    let rows: Vec<AuditInsert<'_>> = chunk.iter().map(AuditInsert::from).collect();
                    diesel::insert_into(encryption_key_audit::table)
                        .values(rows)
                        .execute(conn)?;
                }
                Ok(())
            }

            fn insert_key_now(&self, key: &StoredKey) -> Result<bool> {
                use user_encryption_keys::dsl as k;
                let mut conn = self.conn()?;
                let inserted = diesel::insert_into(k::user_encryption_keys)
                    .values((
                        k::owner_id.eq(&key.owner_id),
                        k::version.eq(i64::from(key.version)),
                        k::kek_id.eq(&key.kek_id),
                        k::wrapped_key.eq(&key.wrapped_key),
                        k::state.eq(key.state.as_str()),
                        k::created_at.eq(key.created_at),
                        k::updated_at.eq(key.created_at),
                    ))
                    .execute(&mut *conn);
                match inserted {
                    Ok(n) => Ok(n == 1),
                    Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => Ok(false),
                    Err(e) => Err(Error::store("inserting a data key", e)),
                }
            }

            fn append_audit_now(&self, events: &[AuditEvent]) -> Result<()> {
                if events.is_empty() {
                    return Ok(());
                }
                let mut conn = self.conn()?;
                Self::insert_audit(&mut *conn, events)
                    .map_err(|e| Error::store("appending audit records", e))
            }

            fn owners_now(&self) -> Result<Vec<String>> {
                use user_encryption_keys::dsl as k;
                let mut conn = self.conn()?;
                k::user_encryption_keys
                    .select(k::owner_id)
                    .distinct()
                    .order(k::owner_id)
                    .load(&mut *conn)
                    .map_err(|e| Error::store("listing owners", e))
            }
        }
    )*};
}

diesel_key_store! {
    "sqlite" => diesel::SqliteConnection, immediate_transaction, lock(), SetShape::SqliteValues, "TEXT",
        ReadOnly { begin: "PRAGMA query_only = ON; BEGIN DEFERRED", reset: Some("PRAGMA query_only = OFF") },
        None::<&str>, true;
    "mysql" => diesel::MysqlConnection, transaction, lock(for_update), SetShape::Join, "CHAR",
        ReadOnly { begin: "START TRANSACTION READ ONLY", reset: None },
        Some("SELECT VERSION() AS version"), false;
    "postgres" => diesel::PgConnection, transaction, lock(for_update), SetShape::Values, "TEXT",
        ReadOnly { begin: "BEGIN TRANSACTION READ ONLY", reset: None },
        None::<&str>, false;
}

/// Adds `seals` to the count of (`owner`, `version`) on `conn`, creating
/// the row when there is none: one `INSERT … ON CONFLICT DO UPDATE`
/// (`ON DUPLICATE KEY UPDATE` on MySQL / MariaDB), atomic on every backend.
macro_rules! add_seal_count {
    ($($feature:literal => $conn:ty, $target:expr);* $(;)?) => {$(
        #[cfg(feature = $feature)]
        impl DieselKeyStore<$conn> {
            fn add_seal_count(
                conn: &mut $conn,
                owner: &str,
                version: i64,
                seals: i64,
                at: NaiveDateTime,
            ) -> diesel::QueryResult<()> {
                use phi_seal_counts::dsl as s;
                diesel::insert_into(s::phi_seal_counts)
                    .values((
                        s::owner_id.eq(owner),
                        s::version.eq(version),
                        s::seals.eq(seals),
                        s::updated_at.eq(at),
                    ))
                    .on_conflict($target)
                    .do_update()
                    .set((s::seals.eq(s::seals + seals), s::updated_at.eq(at)))
                    .execute(conn)
                    .map(drop)
            }
        }
    )*};
}

add_seal_count! {
    "sqlite" => diesel::SqliteConnection, (phi_seal_counts::owner_id, phi_seal_counts::version);
    "mysql" => diesel::MysqlConnection, diesel::dsl::DuplicatedKeys;
    "postgres" => diesel::PgConnection, (phi_seal_counts::owner_id, phi_seal_counts::version);
}

/// How one backend runs a query that must not write: the statements that
/// begin a read-only transaction, and those that restore the connection
/// afterwards (a SQLite `PRAGMA` outlives the transaction).
#[allow(dead_code)] // Unused when no backend feature is on.
struct ReadOnly {
    begin: &'static str,
    reset: Option<&'static str>,
}

/// Runs `f` inside a read-only transaction (`BEGIN TRANSACTION READ ONLY`
/// on PostgreSQL, the transaction mode `SET TRANSACTION READ ONLY` sets, in
/// one statement; `START TRANSACTION READ ONLY` on MySQL / MariaDB; `PRAGMA
/// query_only` on SQLite), which is always rolled back: a statement that
/// tries to write fails and nothing it did is kept. The connection is
/// restored to read-write even when `f` fails.
#[allow(dead_code)] // Unused when no backend feature is on.
fn read_only<C, T>(
    conn: &mut C,
    how: ReadOnly,
    f: impl FnOnce(&mut C) -> diesel::QueryResult<T>,
) -> diesel::QueryResult<T>
where
    C: diesel::Connection<TransactionManager = AnsiTransactionManager>,
{
    let result = AnsiTransactionManager::begin_transaction_sql(conn, how.begin).and_then(|()| {
        let result = f(conn);
        let rollback = AnsiTransactionManager::rollback_transaction(conn);
        let value = result?;
        rollback.map(|()| value)
    });
    match how.reset {
        Some(reset) => {
            let reset = conn.batch_execute(reset);
            let value = result?;
            reset.map(|()| value)
        }
        None => result,
    }
}

/// The feed event of a life-cycle change, from its audit record.
fn feed_event(audit: &AuditEvent, kind: KeyEventKind) -> KeyEvent {
    KeyEvent {
        occurred_at: audit.occurred_at,
        kind,
        owner_id: Some(audit.owner_id.clone()),
        key_version: audit.key_version,
        actor: audit.actor.clone(),
        detail: audit.detail.clone(),
    }
}

type EventRow = (
    i64,
    NaiveDateTime,
    String,
    Option<String>,
    Option<i64>,
    String,
    Option<String>,
);

fn feed_record(row: EventRow) -> Result<FeedEvent> {
    let (id, occurred_at, kind, owner_id, key_version, actor, detail) = row;
    let bad = |what: String| Error::store("reading phi_key_events", format!("event {id}: {what}"));
    let key_version = key_version
        .map(|v| u32::try_from(v).map_err(|_| bad(format!("key version {v} is out of range"))))
        .transpose()?;
    // A kind this build does not know is read as `Unknown` (with its text
    // kept): a following keyring applies it conservatively and reads on.
    let event = KeyEvent {
        occurred_at,
        kind: KeyEventKind::Unknown,
        owner_id,
        key_version,
        actor,
        detail,
    };
    Ok(FeedEvent::read(id, event, kind))
}

#[derive(Insertable)]
#[diesel(table_name = phi_key_events)]
struct EventInsert<'a> {
    id: i64,
    occurred_at: NaiveDateTime,
    kind: &'static str,
    owner_id: Option<&'a str>,
    key_version: Option<i64>,
    actor: &'a str,
    detail: Option<&'a str>,
}

impl<'a> EventInsert<'a> {
    fn new(id: i64, e: &'a KeyEvent) -> Self {
        EventInsert {
            id,
            occurred_at: e.occurred_at,
            kind: e.kind.as_str(),
            owner_id: e.owner_id.as_deref(),
            key_version: e.key_version.map(i64::from),
            actor: &e.actor,
            detail: e.detail.as_deref(),
        }
    }
}

#[derive(Insertable)]
#[diesel(table_name = encryption_key_audit)]
struct AuditInsert<'a> {
    occurred_at: NaiveDateTime,
    owner_id: &'a str,
    action: &'static str,
    key_version: Option<i64>,
    kek_id: Option<&'a str>,
    actor: &'a str,
    detail: Option<&'a str>,
}

impl<'a> From<&'a AuditEvent> for AuditInsert<'a> {
    fn from(e: &'a AuditEvent) -> Self {
        AuditInsert {
            occurred_at: e.occurred_at,
            owner_id: &e.owner_id,
            action: e.action.as_str(),
            key_version: e.key_version.map(i64::from),
            kek_id: e.kek_id.as_deref(),
            actor: &e.actor,
            detail: e.detail.as_deref(),
        }
    }
}
