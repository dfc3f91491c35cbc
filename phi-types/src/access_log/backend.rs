//! The access log's tables through Diesel, on each backend.

#![cfg_attr(
    not(any(feature = "sqlite", feature = "mysql", feature = "postgres")),
    allow(unused_imports, dead_code)
)]

use std::fmt;

use chrono::NaiveDateTime;
use diesel::prelude::*;

use super::{AccessFilter, BatchRow, RecordRef, StoredAccess};
use crate::error::{Error, Result};
use crate::store::schema::{phi_access_batches, phi_access_chains, phi_access_log};

/// Records per multi-row `INSERT`.
#[cfg(any(feature = "sqlite", feature = "mysql"))]
const ROWS_PER_INSERT: usize = 2_000;

/// The access log's tables ([`AccessLogStore`](super::AccessLogStore)) in a
/// database reached through a Diesel connection pool of its own: the
/// application's database, or another one.
#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
pub struct DieselAccessLogStore<C: crate::PhiConnection> {
    pool: diesel::r2d2::Pool<diesel::r2d2::ConnectionManager<C>>,
    /// The thread the pool of [`connect`](Self::connect) opens its
    /// connections on, waited for on drop.
    connecting: Option<crate::store::Connecting>,
}

#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
impl<C: crate::PhiConnection> fmt::Debug for DieselAccessLogStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DieselAccessLogStore")
            .field("backend", &std::any::type_name::<C>())
            .field("pool", &self.pool.state())
            .finish()
    }
}

#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
impl<C: crate::PhiConnection> DieselAccessLogStore<C> {
    /// The tables over an existing pool (whose connections no transaction
    /// of the caller's shares). Runs no migrations.
    pub fn new(pool: diesel::r2d2::Pool<diesel::r2d2::ConnectionManager<C>>) -> Self {
        DieselAccessLogStore {
            pool,
            connecting: None,
        }
    }

    /// Connects a small pool (up to 4 connections) to `database_url` and
    /// checks the access log's tables on it (one catalog query). Changes
    /// no schema: phi's migrations are the application's to run (see
    /// [`migrations`](crate::migrations)), or phi runs them when asked
    /// ([`builder`](Self::builder)`(url).run_migrations(true)`).
    ///
    /// # Errors
    /// [`Error::Store`] when the database cannot be reached;
    /// [`Error::Schema`] naming the table and the migration of phi that is
    /// missing, or a table of phi's name that is not phi's.
    pub fn connect(database_url: &str) -> Result<Self> {
        Self::builder(database_url).connect()
    }

    /// How to connect to `database_url`: whether to run phi's migrations
    /// or check the tables first.
    ///
    /// ```no_run
    /// # #[cfg(feature = "postgres")] {
    /// use diesel::PgConnection;
    /// use phi_types::access_log::DieselAccessLogStore;
    /// let tables = DieselAccessLogStore::<PgConnection>::builder("postgres://app@db/clinic")
    ///     .run_migrations(true)
    ///     .connect()?;
    /// # }
    /// # Ok::<(), phi_types::Error>(())
    /// ```
    pub fn builder(database_url: &str) -> DieselAccessLogStoreBuilder<C> {
        DieselAccessLogStoreBuilder::new(database_url)
    }

    /// Connects a small pool (up to 4 connections) to `database_url`
    /// without running migrations or checking the tables.
    ///
    /// # Errors
    /// [`Error::Store`] when the database cannot be reached.
    #[deprecated(note = "`connect` no longer migrates; to skip its check too, use \
                `DieselAccessLogStore::builder(url).check_schema(false).connect()`")]
    pub fn connect_without_migrating(database_url: &str) -> Result<Self> {
        Self::builder(database_url).check_schema(false).connect()
    }

    /// The pool this store uses.
    pub fn pool(&self) -> &diesel::r2d2::Pool<diesel::r2d2::ConnectionManager<C>> {
        &self.pool
    }

    fn conn(&self) -> Result<diesel::r2d2::PooledConnection<diesel::r2d2::ConnectionManager<C>>> {
        self.pool
            .get()
            .map_err(|e| Error::store("taking an access log connection", e))
    }
}

/// How a [`DieselAccessLogStore`] connects, from
/// [`DieselAccessLogStore::builder`]: by default it checks the access
/// log's tables and changes nothing.
#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
pub type DieselAccessLogStoreBuilder<C> = crate::store::StoreBuilder<DieselAccessLogStore<C>>;

#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
impl<C: crate::PhiConnection> crate::store::PooledStoreSealed for DieselAccessLogStore<C> {}

#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
impl<C: crate::PhiConnection> crate::store::PooledStore for DieselAccessLogStore<C> {
    type Connection = C;
    const BUILDER: &'static str = "DieselAccessLogStoreBuilder";
    const ACCESS_LOG: bool = true;

    fn open(database_url: &str) -> Result<Self> {
        let (pool, connecting) = crate::store::open_pool(
            database_url,
            "phi-access-log-connect",
            "connecting the access log's pool",
        )?;
        let mut store = DieselAccessLogStore::new(pool);
        store.connecting = Some(connecting);
        Ok(store)
    }

    fn pooled(&self) -> Result<diesel::r2d2::PooledConnection<diesel::r2d2::ConnectionManager<C>>> {
        self.conn()
    }
}

#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
#[derive(Insertable)]
#[diesel(table_name = phi_access_log, treat_none_as_default_value = false)]
struct LogInsert<'a> {
    chain: &'a str,
    batch: i64,
    seq: i32,
    occurred_at: NaiveDateTime,
    user_id: &'a str,
    purpose: &'a str,
    request_id: Option<&'a str>,
    op: &'a str,
    owner_id: &'a str,
    table_name: &'a str,
    row_key: Option<&'a str>,
    fields: &'a str,
}

#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
impl<'a> LogInsert<'a> {
    fn new(chain: &'a str, batch: i64, r: &'a RecordRef<'a>) -> Self {
        LogInsert {
            chain,
            batch,
            seq: i32::try_from(r.seq).unwrap_or(i32::MAX),
            occurred_at: r.occurred_at,
            user_id: r.user,
            purpose: r.purpose,
            request_id: r.request_id,
            op: r.op,
            owner_id: r.owner_id,
            table_name: r.table,
            row_key: r.row,
            fields: &r.fields,
        }
    }
}

#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
#[derive(Insertable)]
#[diesel(table_name = phi_access_batches)]
struct BatchInsert<'a> {
    chain: &'a str,
    id: i64,
    kind: &'a str,
    written_at: NaiveDateTime,
    last_at: NaiveDateTime,
    records: i64,
    key_version: i64,
    prev_hash: &'a [u8],
    hash: &'a [u8],
    pruned_before: Option<i64>,
    pruned_hash: Option<&'a [u8]>,
    detail: Option<&'a str>,
}

#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
impl<'a> From<&'a BatchRow> for BatchInsert<'a> {
    fn from(b: &'a BatchRow) -> Self {
        BatchInsert {
            chain: &b.chain,
            id: b.id,
            kind: &b.kind,
            written_at: b.written_at,
            last_at: b.last_at,
            records: b.records,
            key_version: i64::from(b.key_version),
            prev_hash: &b.prev_hash,
            hash: &b.hash,
            pruned_before: b.pruned_before,
            pruned_hash: b.pruned_hash.as_deref(),
            detail: b.detail.as_deref(),
        }
    }
}

type BatchTuple = (
    String,
    i64,
    String,
    NaiveDateTime,
    NaiveDateTime,
    i64,
    i64,
    Vec<u8>,
    Vec<u8>,
    Option<i64>,
    Option<Vec<u8>>,
    Option<String>,
);

fn batch_row(t: BatchTuple) -> BatchRow {
    let (
        chain,
        id,
        kind,
        written_at,
        last_at,
        records,
        key_version,
        prev_hash,
        hash,
        pruned_before,
        pruned_hash,
        detail,
    ) = t;
    BatchRow {
        chain,
        id,
        kind,
        written_at,
        last_at,
        records,
        // A version out of range cannot verify: 0 is never a version.
        key_version: u32::try_from(key_version).unwrap_or(0),
        prev_hash,
        hash,
        pruned_before,
        pruned_hash,
        detail,
    }
}

type LogTuple = (
    String,
    i64,
    i32,
    NaiveDateTime,
    String,
    String,
    Option<String>,
    String,
    String,
    String,
    Option<String>,
    String,
);

fn log_row(t: LogTuple) -> StoredAccess {
    let (
        chain,
        batch,
        seq,
        occurred_at,
        user,
        purpose,
        request_id,
        op,
        owner_id,
        table,
        row,
        fields,
    ) = t;
    StoredAccess {
        chain,
        batch,
        // A negative seq cannot verify: u32::MAX is never one written.
        seq: u32::try_from(seq).unwrap_or(u32::MAX),
        occurred_at,
        user,
        purpose,
        request_id,
        op,
        owner_id,
        table,
        row,
        fields,
    }
}

macro_rules! batch_columns {
    () => {
        (
            phi_access_batches::chain,
            phi_access_batches::id,
            phi_access_batches::kind,
            phi_access_batches::written_at,
            phi_access_batches::last_at,
            phi_access_batches::records,
            phi_access_batches::key_version,
            phi_access_batches::prev_hash,
            phi_access_batches::hash,
            phi_access_batches::pruned_before,
            phi_access_batches::pruned_hash,
            phi_access_batches::detail,
        )
    };
}

macro_rules! log_columns {
    () => {
        (
            phi_access_log::chain,
            phi_access_log::batch,
            phi_access_log::seq,
            phi_access_log::occurred_at,
            phi_access_log::user_id,
            phi_access_log::purpose,
            phi_access_log::request_id,
            phi_access_log::op,
            phi_access_log::owner_id,
            phi_access_log::table_name,
            phi_access_log::row_key,
            phi_access_log::fields,
        )
    };
}

/// A failure inside a transaction: the database's, or a refusal.
enum TxError {
    Db(diesel::result::Error),
    Refused(String),
}

impl From<diesel::result::Error> for TxError {
    fn from(e: diesel::result::Error) -> Self {
        TxError::Db(e)
    }
}

/// Inserts records: multi-row `INSERT`s.
#[cfg(any(feature = "sqlite", feature = "mysql"))]
macro_rules! insert_rows {
    ($conn:expr, $chain:expr, $batch:expr, $records:expr) => {{
        for chunk in $records.chunks(ROWS_PER_INSERT) {
            let rows: Vec<LogInsert<'_>> = chunk
                .iter()
                .map(|r| LogInsert::new($chain, $batch, r))
                .collect();
            diesel::insert_into(phi_access_log::table)
                .values(rows)
                .execute($conn)?;
        }
        Ok(())
    }};
}

#[cfg(feature = "sqlite")]
fn insert_records_sqlite(
    conn: &mut diesel::SqliteConnection,
    chain: &str,
    batch: i64,
    records: &[RecordRef<'_>],
) -> diesel::QueryResult<()> {
    insert_rows!(conn, chain, batch, records)
}

#[cfg(feature = "mysql")]
fn insert_records_mysql(
    conn: &mut diesel::MysqlConnection,
    chain: &str,
    batch: i64,
    records: &[RecordRef<'_>],
) -> diesel::QueryResult<()> {
    insert_rows!(conn, chain, batch, records)
}

/// Inserts records with `COPY … FROM STDIN` (binary): several times the
/// rate of multi-row `INSERT`s.
#[cfg(feature = "postgres")]
fn insert_records_pg(
    conn: &mut diesel::PgConnection,
    chain: &str,
    batch: i64,
    records: &[RecordRef<'_>],
) -> diesel::QueryResult<()> {
    if records.is_empty() {
        return Ok(());
    }
    let rows: Vec<LogInsert<'_>> = records
        .iter()
        .map(|r| LogInsert::new(chain, batch, r))
        .collect();
    diesel::copy_from(phi_access_log::table)
        .from_insertable(&rows)
        .execute(conn)
        .map(drop)
}

macro_rules! access_log_store {
    ($($feature:literal => $conn:ty, $transaction:ident, $insert:ident);* $(;)?) => {$(
        #[cfg(feature = $feature)]
        impl DieselAccessLogStore<$conn> {
            /// Creates the chain's head row if it has none.
            fn ensure_chain(conn: &mut $conn, chain: &str) -> diesel::QueryResult<()> {
                use phi_access_chains::dsl as c;
                let exists: i64 = c::phi_access_chains.filter(c::chain.eq(chain)).count().get_result(conn)?;
                if exists > 0 {
                    return Ok(());
                }
                let inserted = diesel::insert_into(c::phi_access_chains)
                    .values((
                        c::chain.eq(chain),
                        c::head.eq(0i64),
                        c::head_hash.eq(vec![0u8; 32]),
                        c::updated_at.eq(super::now()),
                    ))
                    .execute(conn);
                match inserted {
                    Ok(_) | Err(diesel::result::Error::DatabaseError(
                        diesel::result::DatabaseErrorKind::UniqueViolation, _)) => Ok(()),
                    Err(e) => Err(e),
                }
            }

            /// Takes the next batch id of `chain` (locking its head row
            /// until the transaction ends); returns it and the head hash.
            fn next_batch(conn: &mut $conn, chain: &str, at: NaiveDateTime) -> diesel::QueryResult<(i64, Vec<u8>)> {
                use phi_access_chains::dsl as c;
                let updated = diesel::update(c::phi_access_chains.filter(c::chain.eq(chain)))
                    .set((c::head.eq(c::head + 1i64), c::updated_at.eq(at)))
                    .execute(conn)?;
                if updated != 1 {
                    return Err(diesel::result::Error::NotFound);
                }
                c::phi_access_chains
                    .filter(c::chain.eq(chain))
                    .select((c::head, c::head_hash))
                    .first(conn)
            }

            fn insert_batch(conn: &mut $conn, batch: &BatchRow, records: &[RecordRef<'_>]) -> diesel::QueryResult<()> {
                use phi_access_chains::dsl as c;
                diesel::insert_into(phi_access_batches::table)
                    .values(BatchInsert::from(batch))
                    .execute(conn)?;
                $insert(conn, &batch.chain, batch.id, records)?;
                diesel::update(c::phi_access_chains.filter(c::chain.eq(&batch.chain)))
                    .set(c::head_hash.eq(&batch.hash))
                    .execute(conn)?;
                Ok(())
            }
        }

        #[cfg(feature = $feature)]
        impl super::AccessLogStore for DieselAccessLogStore<$conn> {
            fn append_batch(
                &self,
                chain: &str,
                key: &super::ChainKey,
                written_at: NaiveDateTime,
                records: &[crate::access::AccessRecord],
            ) -> Result<i64> {
                super::check_chain(chain)?;
                let rows: Vec<RecordRef<'_>> = records
                    .iter()
                    .enumerate()
                    .map(|(i, r)| RecordRef::of_record(u32::try_from(i).unwrap_or(u32::MAX), r))
                    .collect();
                let last_at = rows.iter().map(|r| r.occurred_at).max().unwrap_or(written_at);
                let mut conn = self.conn()?;
                Self::ensure_chain(&mut *conn, chain)
                    .map_err(|e| Error::store("creating an access log chain", e))?;
                (*conn)
                    .$transaction(|conn| -> diesel::QueryResult<i64> {
                        let (id, prev_hash) = Self::next_batch(conn, chain, written_at)?;
                        let mut batch = BatchRow {
                            chain: chain.to_owned(),
                            id,
                            kind: super::KIND_RECORDS.to_owned(),
                            written_at,
                            last_at,
                            records: i64::try_from(rows.len()).unwrap_or(i64::MAX),
                            key_version: key.version(),
                            prev_hash,
                            hash: Vec::new(),
                            pruned_before: None,
                            pruned_hash: None,
                            detail: None,
                        };
                        batch.hash = key.hash_refs(&batch, &rows).to_vec();
                        Self::insert_batch(conn, &batch, &rows)?;
                        Ok(id)
                    })
                    .map_err(|e| Error::store("appending a batch to the access log", e))
            }

            fn heads(&self) -> Result<Vec<super::ChainHead>> {
                use phi_access_chains::dsl as c;
                let mut conn = self.conn()?;
                let rows: Vec<(String, i64, Vec<u8>)> = c::phi_access_chains
                    .select((c::chain, c::head, c::head_hash))
                    .order(c::chain)
                    .load(&mut *conn)
                    .map_err(|e| Error::store("reading the access log's chains", e))?;
                Ok(rows
                    .into_iter()
                    .map(|(chain, head, head_hash)| super::ChainHead { chain, head, head_hash })
                    .collect())
            }

            fn chains_with_batches(&self) -> Result<Vec<String>> {
                use phi_access_batches::dsl as b;
                let mut conn = self.conn()?;
                b::phi_access_batches
                    .select(b::chain)
                    .distinct()
                    .order(b::chain)
                    .load(&mut *conn)
                    .map_err(|e| Error::store("reading the access log's chains", e))
            }

            fn first_batch(&self, chain: &str) -> Result<Option<i64>> {
                use phi_access_batches::dsl as b;
                let mut conn = self.conn()?;
                b::phi_access_batches
                    .filter(b::chain.eq(chain))
                    .select(diesel::dsl::min(b::id))
                    .first::<Option<i64>>(&mut *conn)
                    .map_err(|e| Error::store("reading the access log's batches", e))
            }

            fn checkpoint(&self, chain: &str, first: i64) -> Result<Option<BatchRow>> {
                use phi_access_batches::dsl as b;
                let mut conn = self.conn()?;
                let row: Option<BatchTuple> = b::phi_access_batches
                    .filter(b::chain.eq(chain))
                    .filter(b::kind.eq(super::KIND_CHECKPOINT))
                    .filter(b::pruned_before.eq(first))
                    .select(batch_columns!())
                    .order(b::id.desc())
                    .first(&mut *conn)
                    .optional()
                    .map_err(|e| Error::store("reading the access log's checkpoints", e))?;
                Ok(row.map(batch_row))
            }

            fn batches(&self, chain: &str, from: i64, limit: usize) -> Result<Vec<BatchRow>> {
                use phi_access_batches::dsl as b;
                let mut conn = self.conn()?;
                let rows: Vec<BatchTuple> = b::phi_access_batches
                    .filter(b::chain.eq(chain))
                    .filter(b::id.ge(from))
                    .select(batch_columns!())
                    .order(b::id)
                    .limit(i64::try_from(limit).unwrap_or(i64::MAX))
                    .load(&mut *conn)
                    .map_err(|e| Error::store("reading the access log's batches", e))?;
                Ok(rows.into_iter().map(batch_row).collect())
            }

            fn batch_records(&self, chain: &str, from: i64, to: i64) -> Result<Vec<StoredAccess>> {
                use phi_access_log::dsl as l;
                let mut conn = self.conn()?;
                let rows: Vec<LogTuple> = l::phi_access_log
                    .filter(l::chain.eq(chain))
                    .filter(l::batch.between(from, to))
                    .select(log_columns!())
                    .order((l::batch, l::seq))
                    .load(&mut *conn)
                    .map_err(|e| Error::store("reading the access log", e))?;
                Ok(rows.into_iter().map(log_row).collect())
            }

            fn orphan_batch(&self, chain: &str) -> Result<Option<i64>> {
                use phi_access_batches::dsl as b;
                use phi_access_log::dsl as l;
                let mut conn = self.conn()?;
                l::phi_access_log
                    .filter(l::chain.eq(chain))
                    .filter(diesel::dsl::not(diesel::dsl::exists(
                        b::phi_access_batches
                            .filter(b::chain.eq(l::chain))
                            .filter(b::id.eq(l::batch)),
                    )))
                    .select(l::batch)
                    .order(l::batch)
                    .first(&mut *conn)
                    .optional()
                    .map_err(|e| Error::store("reading the access log", e))
            }

            fn query(&self, filter: &AccessFilter) -> Result<Vec<StoredAccess>> {
                use phi_access_log::dsl as l;
                let mut conn = self.conn()?;
                let mut query = l::phi_access_log
                    .select(log_columns!())
                    .order((l::occurred_at, l::chain, l::batch, l::seq))
                    .into_boxed();
                if let Some(owner) = &filter.owner {
                    query = query.filter(l::owner_id.eq(owner.clone()));
                }
                if let Some(user) = &filter.user {
                    query = query.filter(l::user_id.eq(user.clone()));
                }
                if let Some(table) = &filter.table {
                    query = query.filter(l::table_name.eq(table.clone()));
                }
                if let Some(row) = &filter.row {
                    query = query.filter(l::row_key.eq(row.clone()));
                }
                if let Some(since) = filter.since {
                    query = query.filter(l::occurred_at.ge(since));
                }
                if let Some(until) = filter.until {
                    query = query.filter(l::occurred_at.lt(until));
                }
                if let Some(chain) = &filter.chain {
                    query = query.filter(l::chain.eq(chain.clone()));
                }
                if filter.limit > 0 {
                    query = query
                        .limit(i64::try_from(filter.limit).unwrap_or(i64::MAX))
                        .offset(i64::try_from(filter.offset).unwrap_or(i64::MAX));
                }
                let rows: Vec<LogTuple> = query
                    .load(&mut *conn)
                    .map_err(|e| Error::store("querying the access log", e))?;
                Ok(rows.into_iter().map(log_row).collect())
            }

            fn prune(
                &self,
                before: NaiveDateTime,
                key: &super::ChainKey,
                written_at: NaiveDateTime,
            ) -> Result<super::PruneReport> {
                use crate::store::schema::{encryption_key_audit as a, phi_feed_readers as r, phi_key_events as e};
                use phi_access_batches::dsl as b;
                use phi_access_chains::dsl as c;
                use phi_access_log::dsl as l;
                let mut conn = self.conn()?;
                let result = (*conn).$transaction(|conn| -> std::result::Result<super::PruneReport, TxError> {
                    let mut report = super::PruneReport::default();
                    // The feed first: nothing is deleted when a reader is behind.
                    let last_event: Option<i64> = e::table
                        .filter(e::occurred_at.lt(before))
                        .select(diesel::dsl::max(e::id))
                        .first(conn)?;
                    if let Some(last_event) = last_event {
                        let behind: Option<(String, i64)> = r::table
                            .filter(r::position.lt(last_event))
                            .select((r::reader, r::position))
                            .order(r::position)
                            .first(conn)
                            .optional()?;
                        if let Some((reader, position)) = behind {
                            return Err(TxError::Refused(format!(
                                "feed reader {reader:?} is at key event {position}, and pruning before {} \
                                 would delete key events up to {last_event} it has not read \
                                 (stop that keyring, or wait until it has read them)",
                                before.format("%Y-%m-%dT%H:%M:%S%.6f")
                            )));
                        }
                    }
                    let chains: Vec<String> = c::phi_access_chains.select(c::chain).order(c::chain).load(conn)?;
                    for chain in chains {
                        let (checkpoint_id, head_hash) = Self::next_batch(conn, &chain, written_at)?;
                        let first: Option<i64> = b::phi_access_batches
                            .filter(b::chain.eq(&chain))
                            .select(diesel::dsl::min(b::id))
                            .first(conn)?;
                        let kept: Option<i64> = b::phi_access_batches
                            .filter(b::chain.eq(&chain))
                            .filter(b::last_at.ge(before))
                            .select(diesel::dsl::min(b::id))
                            .first(conn)?;
                        let kept = kept.unwrap_or(checkpoint_id);
                        let Some(first) = first.filter(|first| *first < kept) else {
                            // Nothing to prune: give the id back.
                            diesel::update(c::phi_access_chains.filter(c::chain.eq(&chain)))
                                .set(c::head.eq(c::head - 1i64))
                                .execute(conn)?;
                            continue;
                        };
                        let pruned_hash: Vec<u8> = if kept == checkpoint_id {
                            head_hash.clone()
                        } else {
                            b::phi_access_batches
                                .filter(b::chain.eq(&chain))
                                .filter(b::id.eq(kept))
                                .select(b::prev_hash)
                                .first(conn)?
                        };
                        let records = diesel::delete(
                            l::phi_access_log.filter(l::chain.eq(&chain)).filter(l::batch.lt(kept)),
                        )
                        .execute(conn)?;
                        let batches = diesel::delete(
                            b::phi_access_batches.filter(b::chain.eq(&chain)).filter(b::id.lt(kept)),
                        )
                        .execute(conn)?;
                        let mut checkpoint = BatchRow {
                            chain: chain.clone(),
                            id: checkpoint_id,
                            kind: super::KIND_CHECKPOINT.to_owned(),
                            written_at,
                            last_at: written_at,
                            records: 0,
                            key_version: key.version(),
                            prev_hash: head_hash,
                            hash: Vec::new(),
                            pruned_before: Some(kept),
                            pruned_hash: Some(pruned_hash),
                            detail: Some(format!(
                                "pruned batches {first} to {} ({records} records) whose records all occurred before {}",
                                kept - 1,
                                before.format("%Y-%m-%dT%H:%M:%S%.6fZ")
                            )),
                        };
                        checkpoint.hash = key.hash(&checkpoint, &[]).to_vec();
                        Self::insert_batch(conn, &checkpoint, &[])?;
                        report.access_records += records as u64;
                        report.access_batches += batches as u64;
                        report.checkpoints.push((chain, checkpoint_id));
                    }
                    report.key_audit_records =
                        diesel::delete(a::table.filter(a::occurred_at.lt(before))).execute(conn)? as u64;
                    report.feed_events =
                        diesel::delete(e::table.filter(e::occurred_at.lt(before))).execute(conn)? as u64;
                    Ok(report)
                });
                match result {
                    Ok(report) => Ok(report),
                    Err(TxError::Refused(reason)) => Err(Error::Refused {
                        operation: "prune".into(),
                        owner: "*".into(),
                        reason,
                    }),
                    Err(TxError::Db(e)) => Err(Error::store("pruning the access log and audit trail", e)),
                }
            }
        }
    )*};
}

access_log_store! {
    "sqlite" => diesel::SqliteConnection, immediate_transaction, insert_records_sqlite;
    "mysql" => diesel::MysqlConnection, transaction, insert_records_mysql;
    "postgres" => diesel::PgConnection, transaction, insert_records_pg;
}
