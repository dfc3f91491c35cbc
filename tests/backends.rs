//! The integration suite, run on every backend enabled by cargo features.
//!
//! SQLite (the default feature) uses a temporary file per test. MySQL /
//! MariaDB and PostgreSQL use the servers named by `PHI_TEST_MYSQL_URL` and
//! `PHI_TEST_POSTGRES_URL` (defaults: `mysql://root@127.0.0.1:3306/test`,
//! `postgres://postgres@127.0.0.1:5432/test`); when a backend's feature is
//! on and its server is down, its tests fail: they are never skipped.

mod common;

macro_rules! backend_suite {
    (
        $name:ident, $feature:literal, $conn:ty, $blob:literal,
        uuid: ($uuid_id:ty, $uuid_sql:ty, $uuid_ddl:literal),
        $url:expr
    ) => {
        #[cfg(feature = $feature)]
        mod $name {
            #[allow(unused_imports)]
            use super::common;
            type Conn = $conn;
            /// The binary column type of this backend, for test tables.
            const BLOB: &str = $blob;
            /// How this backend stores a UUID key: its Rust type, Diesel
            /// SQL type and column type.
            #[cfg(feature = "uuid")]
            type UuidId = $uuid_id;
            #[cfg(feature = "uuid")]
            type UuidSql = $uuid_sql;
            #[cfg(feature = "uuid")]
            const UUID_DDL: &str = $uuid_ddl;
            fn server_url() -> Option<String> {
                $url
            }
            include!("suite/mod.rs");
        }
    };
}

backend_suite!(
    sqlite,
    "sqlite",
    diesel::SqliteConnection,
    "BLOB",
    uuid: (phi::BinaryUuid, diesel::sql_types::Binary, "BLOB"),
    None
);
backend_suite!(
    mysql,
    "mysql",
    diesel::MysqlConnection,
    "BLOB",
    uuid: (phi::BinaryUuid, diesel::sql_types::Binary, "BINARY(16)"),
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
    uuid: (uuid::Uuid, diesel::sql_types::Uuid, "UUID"),
    Some(
        std::env::var("PHI_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    )
);
