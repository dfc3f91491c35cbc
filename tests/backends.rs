//! The integration suite, run on every backend enabled by cargo features.
//!
//! SQLite (the default feature) uses a temporary file per test. MySQL /
//! MariaDB and PostgreSQL use the servers named by `PHI_TEST_MYSQL_URL` and
//! `PHI_TEST_POSTGRES_URL` (defaults: `mysql://root@127.0.0.1:3306/test`,
//! `postgres://postgres@127.0.0.1:5432/test`); when a backend's feature is
//! on and its server is down, its tests fail: they are never skipped.

mod common;

macro_rules! backend_suite {
    ($name:ident, $feature:literal, $conn:ty, $blob:literal, $url:expr) => {
        #[cfg(feature = $feature)]
        mod $name {
            #[allow(unused_imports)]
            use super::common;
            type Conn = $conn;
            /// The binary column type of this backend, for test tables.
            const BLOB: &str = $blob;
            fn server_url() -> Option<String> {
                $url
            }
            include!("suite/mod.rs");
        }
    };
}

backend_suite!(sqlite, "sqlite", diesel::SqliteConnection, "BLOB", None);
backend_suite!(
    mysql,
    "mysql",
    diesel::MysqlConnection,
    "BLOB",
    Some(
        std::env::var("PHI_TEST_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
    )
);
backend_suite!(
    postgres,
    "postgres",
    diesel::PgConnection,
    "BYTEA",
    Some(
        std::env::var("PHI_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    )
);
