//! How phi's stores over a Diesel pool connect: one builder for the key
//! store and the access log's tables.

use std::fmt;
use std::marker::PhantomData;

use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};

use super::diesel_store::Connecting;
use crate::connection::PhiConnection;
use crate::error::{Error, Result};
use crate::migrations::Tables;

/// Keeps [`PooledStore`] phi's own.
pub(crate) mod sealed {
    /// Implemented by phi's stores only.
    pub trait Sealed {}
}

/// One of phi's stores over a Diesel r2d2 pool of its own
/// ([`DieselKeyStore`](crate::DieselKeyStore),
/// [`DieselAccessLogStore`](crate::access_log::DieselAccessLogStore)),
/// connected by a [`StoreBuilder`]. Sealed: implemented by phi only.
pub trait PooledStore: Sized + sealed::Sealed {
    /// The Diesel connection of its pool.
    type Connection: PhiConnection;
    /// The builder's name, for `Debug`.
    #[doc(hidden)]
    const BUILDER: &'static str;
    /// Whether its tables are the access log's (else the key store's): the
    /// tables [`StoreBuilder::connect`] checks.
    #[doc(hidden)]
    const ACCESS_LOG: bool;
    /// A small pool to `database_url`, with no check.
    #[doc(hidden)]
    fn open(database_url: &str) -> Result<Self>;
    /// A connection of the pool.
    #[doc(hidden)]
    fn pooled(&self) -> Result<PooledConnection<ConnectionManager<Self::Connection>>>;
}

/// How a [`DieselKeyStore`](crate::DieselKeyStore) or a
/// [`DieselAccessLogStore`](crate::access_log::DieselAccessLogStore)
/// connects, from its `builder`: by default it checks its tables and
/// changes nothing, as its `connect` does.
#[must_use = "a builder does nothing until `connect` is called"]
pub struct StoreBuilder<S> {
    database_url: String,
    run_migrations: bool,
    check_schema: bool,
    store: PhantomData<fn() -> S>,
}

impl<S: PooledStore> fmt::Debug for StoreBuilder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the URL: it may hold a password.
        f.debug_struct(S::BUILDER)
            .field("backend", &std::any::type_name::<S::Connection>())
            .field("run_migrations", &self.run_migrations)
            .field("check_schema", &self.check_schema)
            .finish()
    }
}

impl<S: PooledStore> StoreBuilder<S> {
    /// Checks the tables, runs no migration: the stores' `builder`.
    pub(crate) fn new(database_url: &str) -> Self {
        StoreBuilder {
            database_url: database_url.to_owned(),
            run_migrations: false,
            check_schema: true,
            store: PhantomData,
        }
    }

    /// Runs phi's pending migrations (all of phi's tables) when connecting
    /// (default: no), into Diesel's `__diesel_schema_migrations` under
    /// phi's versions ([`migrations::run_pending`](crate::migrations::run_pending)),
    /// after refusing a database where a table of phi's name is another
    /// application's; then checks the tables. For a deployment step or a
    /// development database: an application that runs `diesel migration
    /// run` adds phi's migrations to its own instead
    /// ([`migrations::write_to`](crate::migrations::write_to)). The login
    /// needs the right to create tables.
    pub fn run_migrations(mut self, run: bool) -> Self {
        self.run_migrations = run;
        self
    }

    /// Checks the store's tables when connecting (default: yes). Off for a
    /// login that cannot see every one of them in the catalog (on MySQL /
    /// MariaDB, a login that may only read some tables sees only those); a
    /// missing table then fails the first query that needs it.
    pub fn check_schema(mut self, check: bool) -> Self {
        self.check_schema = check;
        self
    }

    /// Connects a small pool (up to 4 connections), then migrates and
    /// checks as configured.
    ///
    /// # Errors
    /// [`Error::Store`] when the database cannot be reached or a migration
    /// fails; [`Error::Schema`] naming the table and the migration of phi
    /// that is missing, or a table of phi's name that is not phi's.
    pub fn connect(self) -> Result<S> {
        let store = S::open(&self.database_url)?;
        let tables = if S::ACCESS_LOG {
            Tables::AccessLog
        } else {
            Tables::KeyStore
        };
        if self.run_migrations {
            crate::migrations::migrate_and_check(&mut *store.pooled()?, tables)?;
        } else if self.check_schema {
            crate::migrations::check_tables(&mut *store.pooled()?, tables)?;
        }
        Ok(store)
    }
}

/// A pool of up to 4 connections to `database_url`, each prepared for
/// phi's writes ([`PhiConnection::prepare_key_store`]), opened on a thread
/// named `thread` that dropping the [`Connecting`] waits for; one
/// connection is taken to prove the database is reachable. `what` names
/// the pool in the error.
pub(crate) fn open_pool<C: PhiConnection>(
    database_url: &str,
    thread: &str,
    what: &'static str,
) -> Result<(Pool<ConnectionManager<C>>, Connecting)> {
    let connecting = Connecting::new(thread);
    let pool = Pool::builder()
        .max_size(4)
        .min_idle(Some(0))
        .thread_pool(connecting.thread())
        .connection_customizer(Box::new(Prepare))
        .build(ConnectionManager::<C>::new(database_url))
        .map_err(|e| Error::store(what, e))?;
    drop(pool.get().map_err(|e| Error::store(what, e))?);
    Ok((pool, connecting))
}

/// Prepares each connection of a store's pool for phi's writes.
#[derive(Debug)]
struct Prepare;

impl<C: PhiConnection> diesel::r2d2::CustomizeConnection<C, diesel::r2d2::Error> for Prepare {
    fn on_acquire(&self, conn: &mut C) -> std::result::Result<(), diesel::r2d2::Error> {
        conn.prepare_key_store()
            .map_err(diesel::r2d2::Error::QueryError)
    }
}
