//! The key store in the application's database, through Diesel.

use std::fmt;

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};
use diesel::result::{DatabaseErrorKind, Error as DieselError};

use super::schema::{encryption_key_audit, user_encryption_keys};
use super::{AuditEvent, KeyState, KeyStore, StoredKey};
use crate::connection::PhiConnection;
use crate::error::{Error, Result};

/// Owners per `IN (...)` list; larger sets are loaded in several queries.
const OWNERS_PER_QUERY: usize = 5_000;
/// Audit rows per multi-row `INSERT`.
const AUDIT_ROWS_PER_INSERT: usize = 500;

/// A [`KeyStore`] in the application's database, reached through a Diesel
/// connection pool of its own.
///
/// On SQLite the pool and the application's connection share one database
/// file and one write lock: resolve keys for sealing
/// ([`Keyring::keys_for_seal_many`](crate::Keyring::keys_for_seal_many))
/// before beginning a write transaction, or a new owner's key insert waits
/// for that transaction (up to a 10 s busy timeout) and then fails. MySQL /
/// MariaDB and PostgreSQL have no such constraint.
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
}

impl<C: PhiConnection> DieselKeyStore<C> {
    /// A store over an existing pool. Its connections must not be shared
    /// with a transaction of the caller's.
    pub fn new(pool: Pool<ConnectionManager<C>>) -> Self {
        DieselKeyStore { pool }
    }

    /// Connects a small pool (up to 4 connections) to `database_url` and
    /// runs phi's pending migrations on it.
    ///
    /// On SQLite, use a file database: an in-memory database is private to
    /// each connection.
    ///
    /// # Errors
    /// [`Error::Store`] when the database cannot be reached or migrated.
    pub fn connect(database_url: &str) -> Result<Self> {
        let pool = Pool::builder()
            .max_size(4)
            .min_idle(Some(0))
            .connection_customizer(Box::new(Prepare))
            .build(ConnectionManager::<C>::new(database_url))
            .map_err(|e| Error::store("connecting the key store pool", e))?;
        let store = DieselKeyStore { pool };
        crate::migrations::run_pending(&mut *store.conn()?)?;
        Ok(store)
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

impl<C: PhiConnection> fmt::Debug for DieselKeyStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DieselKeyStore")
            .field("backend", &std::any::type_name::<C>())
            .field("pool", &self.pool.state())
            .finish()
    }
}

#[derive(Debug)]
struct Prepare;

impl<C: PhiConnection> diesel::r2d2::CustomizeConnection<C, diesel::r2d2::Error> for Prepare {
    fn on_acquire(&self, conn: &mut C) -> std::result::Result<(), diesel::r2d2::Error> {
        conn.prepare_key_store()
            .map_err(diesel::r2d2::Error::QueryError)
    }
}

type KeyRow = (String, i64, String, Vec<u8>, String, NaiveDateTime);

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

macro_rules! diesel_key_store {
    ($($feature:literal => $conn:ty),* $(,)?) => {$(
        #[cfg(feature = $feature)]
        impl KeyStore for DieselKeyStore<$conn> {
            fn load_keys(&self, owners: &[&str]) -> Result<Vec<StoredKey>> {
                use user_encryption_keys::dsl as k;
                let mut conn = self.conn()?;
                let mut keys = Vec::new();
                for chunk in owners.chunks(OWNERS_PER_QUERY) {
                    let rows: Vec<KeyRow> = k::user_encryption_keys
                        .filter(k::owner_id.eq_any(chunk))
                        .select((k::owner_id, k::version, k::kek_id, k::wrapped_key, k::state, k::created_at))
                        .load(&mut *conn)
                        .map_err(|e| Error::store("loading data keys", e))?;
                    for row in rows {
                        keys.push(stored_key(row)?);
                    }
                }
                Ok(keys)
            }

            fn insert_key_if_absent(&self, key: &StoredKey) -> Result<bool> {
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

            fn append_audit(&self, events: &[AuditEvent]) -> Result<()> {
                use encryption_key_audit::dsl as a;
                if events.is_empty() {
                    return Ok(());
                }
                let mut conn = self.conn()?;
                for chunk in events.chunks(AUDIT_ROWS_PER_INSERT) {
                    let rows: Vec<_> = chunk
                        .iter()
                        .map(|e| {
                            (
                                a::occurred_at.eq(e.occurred_at),
                                a::owner_id.eq(&e.owner_id),
                                a::action.eq(e.action.as_str()),
                                a::key_version.eq(e.key_version.map(i64::from)),
                                a::kek_id.eq(e.kek_id.as_deref()),
                                a::actor.eq(&e.actor),
                                a::detail.eq(e.detail.as_deref()),
                            )
                        })
                        .collect();
                    diesel::insert_into(a::encryption_key_audit)
                        .values(&rows)
                        .execute(&mut *conn)
                        .map_err(|e| Error::store("appending audit records", e))?;
                }
                Ok(())
            }

            fn owners(&self) -> Result<Vec<String>> {
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
    "sqlite" => diesel::SqliteConnection,
    "mysql" => diesel::MysqlConnection,
    "postgres" => diesel::PgConnection,
}
