//! SQLite connections for an application whose database phi shares.
//!
//! phi writes into the application's SQLite file from connections of its
//! own: the key store's pool, the keyring's background audit writer, the
//! access-log writer. SQLite has one write lock per file, and a connection
//! without a busy timeout (Diesel's `SqliteConnection::establish` sets
//! none) fails at once with "database is locked" when it meets another
//! connection's write, where it should wait a few milliseconds.
//!
//! - phi's own connections wait up to [`BUSY_TIMEOUT`].
//! - On an application's connection, the first thing the jobs
//!   ([`migrate`](crate::migrate), [`lifecycle`](crate::lifecycle),
//!   [`lookup`](crate::lookup)), the derive's `insert`, `insert_all` and
//!   `update`, and [`PhiRecord::load`](crate::PhiRecord::load) (and the
//!   loads built on it) do is set the same busy timeout when the
//!   connection has none (`PRAGMA busy_timeout` is 0); a timeout the
//!   application chose is left as it is. The connection keeps it. This
//!   holds for a `SqliteConnection` and for a connection of Diesel's r2d2
//!   pool of them; give other wrappers a busy timeout with [`prepare`].
//! - [`establish`] opens a connection with the busy timeout and in WAL mode
//!   (readers never wait for the writer), ready for anything the
//!   application does before phi's calls: use it (or [`prepare`] on each
//!   connection of a pool) wherever `SqliteConnection::establish` was.
//!
//! ```
//! use diesel::RunQueryDsl as _;
//! let mut conn = phi_types::sqlite::establish(":memory:")?;
//! diesel::sql_query("CREATE TABLE t (x INTEGER)").execute(&mut conn)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::time::Duration;

use diesel::connection::SimpleConnection as _;
use diesel::{Connection as _, ConnectionError, ConnectionResult, QueryResult, SqliteConnection};

/// How long phi's SQLite connections, and an application's connection
/// phi prepares, wait for another connection's write lock: 10 s.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// `PRAGMA busy_timeout = <BUSY_TIMEOUT in ms>`.
const SET_BUSY_TIMEOUT: &str = "PRAGMA busy_timeout = 10000;";

/// Opens the SQLite database at `url` (a path, `:memory:` or a `file:`
/// URI, as `SqliteConnection::establish` takes) and [`prepare`]s it.
///
/// # Errors
/// Diesel's, when the database cannot be opened; its
/// `CouldntSetupConfiguration` when a setting cannot be made.
pub fn establish(url: &str) -> ConnectionResult<SqliteConnection> {
    let mut conn = SqliteConnection::establish(url)?;
    prepare(&mut conn).map_err(ConnectionError::CouldntSetupConfiguration)?;
    Ok(conn)
}

/// Sets a busy timeout of [`BUSY_TIMEOUT`] on `conn`, and WAL mode on its
/// database (`PRAGMA journal_mode = WAL`: kept by the file; an in-memory
/// database stays in memory mode).
///
/// # Errors
/// Diesel's, when a setting cannot be made.
pub fn prepare(conn: &mut SqliteConnection) -> QueryResult<()> {
    conn.batch_execute(SET_BUSY_TIMEOUT)?;
    conn.batch_execute("PRAGMA journal_mode = WAL;")
}

/// The busy timeout of `conn` in milliseconds (0: none).
///
/// # Errors
/// Diesel's.
pub fn busy_timeout(conn: &mut SqliteConnection) -> QueryResult<u32> {
    #[derive(diesel::QueryableByName)]
    struct Timeout {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        timeout: i32,
    }
    let row: Timeout =
        diesel::RunQueryDsl::get_result(diesel::sql_query("PRAGMA busy_timeout"), conn)?;
    Ok(u32::try_from(row.timeout).unwrap_or(0))
}

/// Sets [`BUSY_TIMEOUT`] on an application's connection that has no busy
/// timeout; leaves one the application set.
pub(crate) fn busy_timeout_if_unset(conn: &mut SqliteConnection) -> QueryResult<()> {
    if busy_timeout(conn)? == 0 {
        conn.batch_execute(SET_BUSY_TIMEOUT)?;
    }
    Ok(())
}

/// [`busy_timeout_if_unset`] on an application's connection that is an
/// SQLite connection (Diesel's, or one of Diesel's r2d2 pool); nothing on
/// any other. Generated `insert`, `update` and `PhiRecord::load` call it
/// before their statement, and phi's jobs before their first (through
/// `connection::prepare_application_connection`), so a program that opened its connection with
/// `SqliteConnection::establish` waits for phi's writers instead of failing
/// with "database is locked".
pub(crate) fn prepare_application_connection<C: 'static>(conn: &mut C) -> QueryResult<()> {
    use std::any::Any;
    type Pooled = diesel::r2d2::PooledConnection<diesel::r2d2::ConnectionManager<SqliteConnection>>;
    if let Some(conn) = (conn as &mut dyn Any).downcast_mut::<SqliteConnection>() {
        return busy_timeout_if_unset(conn);
    }
    if let Some(conn) = (conn as &mut dyn Any).downcast_mut::<Pooled>() {
        return busy_timeout_if_unset(conn);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails on the first unexpected error
mod tests {
    use super::*;

    #[test]
    fn an_unset_timeout_is_set_and_a_chosen_one_kept() {
        let mut conn = SqliteConnection::establish(":memory:").expect("open");
        assert_eq!(busy_timeout(&mut conn).expect("read"), 0);
        busy_timeout_if_unset(&mut conn).expect("set");
        assert_eq!(busy_timeout(&mut conn).expect("read"), 10_000);
        conn.batch_execute("PRAGMA busy_timeout = 250")
            .expect("choose");
        busy_timeout_if_unset(&mut conn).expect("keep");
        assert_eq!(busy_timeout(&mut conn).expect("read"), 250);
        let mut prepared = establish(":memory:").expect("establish");
        assert_eq!(busy_timeout(&mut prepared).expect("read"), 10_000);
    }
}
