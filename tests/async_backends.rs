//! The async (diesel-async) API, on every backend enabled by cargo features
//! together with `async`: the generated `load_async`, `insert_async`,
//! `update_async` and blind-index lookups, async key resolution and its
//! single-flight, and `AwsKmsKek`'s async calls (with `aws-kms`).
//!
//! SQLite runs on `SyncConnectionWrapper<SqliteConnection>` over a temporary
//! file; MySQL / MariaDB on `AsyncMysqlConnection` and PostgreSQL on
//! `AsyncPgConnection`, at `PHI_TEST_MYSQL_URL` / `PHI_TEST_POSTGRES_URL`
//! (defaults as in `tests/backends.rs`). A backend whose feature is on and
//! whose server is down fails: it is never skipped.

mod common;

macro_rules! async_suite {
    ($name:ident, $feature:literal, $sync:ty, $async:ty, $blob:literal, $url:expr) => {
        #[cfg(all(feature = "async", feature = $feature))]
        mod $name {
            #[allow(unused_imports)]
            use super::common;
            /// The blocking connection, for set-up.
            type SyncConn = $sync;
            /// The connection under test.
            type AsyncConn = $async;
            /// The binary column type of this backend, for test tables.
            const BLOB: &str = $blob;
            fn server_url() -> Option<String> {
                $url
            }
            include!("async_suite/mod.rs");
        }
    };
}

async_suite!(
    sqlite,
    "sqlite",
    diesel::SqliteConnection,
    diesel_async::sync_connection_wrapper::SyncConnectionWrapper<diesel::SqliteConnection>,
    "BLOB",
    None
);
async_suite!(
    mysql,
    "mysql",
    diesel::MysqlConnection,
    diesel_async::AsyncMysqlConnection,
    "BLOB",
    Some(
        std::env::var("PHI_TEST_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
    )
);
async_suite!(
    postgres,
    "postgres",
    diesel::PgConnection,
    diesel_async::AsyncPgConnection,
    "BYTEA",
    Some(
        std::env::var("PHI_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    )
);
