//! A SurgiCase database (seed 001) already has tables named
//! `user_encryption_keys` and `encryption_key_audit`, with columns of its
//! own and its users' keys in them. It adopts phi with a table prefix
//! (`phi::schema::set_table_prefix("phi_")`): phi's migrations, written into
//! the application's directory or run by phi, create `phi_user_encryption_keys`
//! and the rest beside SurgiCase's tables; keys, audit, legacy records and
//! the access log go there; SurgiCase's tables are left exactly as they were.
//!
//! The prefix is the process's, so these tests have a binary of their own.
//! SQLite: a temporary file; MySQL / MariaDB and PostgreSQL: a database of
//! each test's own on the servers of `PHI_TEST_MYSQL_URL` /
//! `PHI_TEST_POSTGRES_URL` (defaults as in `tests/backends.rs`); a server that
//! is down fails the test.

mod common;

const PREFIX: &str = "phi_";

macro_rules! prefix_suite {
    ($name:ident, $feature:literal, $conn:ty, $blob:literal, $url:expr) => {
        #[cfg(feature = $feature)]
        mod $name {
            use std::sync::Arc;

            use diesel::prelude::*;
            use diesel_migrations::{FileBasedMigrations, MigrationHarness as _};
            use phi::access::{AccessLog as _, AccessOp, AccessRecord, Accessor};
            use phi::access_log::{DieselAccessLog, DieselAccessLogStore};
            use phi::migrations::{self, Backend};
            use phi::{DieselKeyStore, Error, Keyring, PhiRecord, Updated};

            use super::{PREFIX, common};

            type Conn = $conn;
            const BLOB: &str = $blob;

            mod schema {
                #![allow(missing_docs)]
                diesel::table! {
                    cases (case_id) {
                        case_id -> Text,
                        user_id -> Text,
                        patient_last -> Binary,
                    }
                }
            }
            use schema::cases;

            #[derive(PhiRecord, Clone, PartialEq)]
            #[phi(table = cases, crate = phi, debug)]
            #[diesel(primary_key(case_id))]
            struct Case {
                #[phi(row_key)]
                case_id: String,
                #[phi(owner)]
                user_id: String,
                #[phi(encrypt)]
                patient_last: String,
            }

            /// A database of the test's own, dropped at the end.
            type Database = common::EmptyDatabase<Conn>;

            fn database() -> Database {
                Database::on($url)
            }

            /// SurgiCase's own key tables, with keys of its users, and its
            /// cases table.
            fn surgicase(conn: &mut Conn) {
                let bytes = |s: &str| match (BLOB, stringify!($name)) {
                    ("BYTEA", _) => format!("convert_to('{s}', 'UTF8')"),
                    (_, "sqlite") => format!("CAST('{s}' AS BLOB)"),
                    _ => format!("CAST('{s}' AS BINARY)"),
                };
                for ddl in [
                    format!(
                        "CREATE TABLE user_encryption_keys (id INTEGER PRIMARY KEY, user_id VARCHAR(100) NOT NULL, \
                         encrypted_dek {BLOB} NOT NULL, kms_key_id VARCHAR(255) NOT NULL, is_active INTEGER NOT NULL, \
                         created_at VARCHAR(32) NOT NULL)"
                    ),
                    "CREATE TABLE encryption_key_audit (id INTEGER PRIMARY KEY, user_id VARCHAR(100) NOT NULL, \
                     action VARCHAR(50) NOT NULL, performed_by VARCHAR(100), created_at VARCHAR(32) NOT NULL)"
                        .to_owned(),
                    format!(
                        "INSERT INTO user_encryption_keys VALUES (1, 'USER001', {}, 'alias/surgicase', 1, '2025-01-02')",
                        bytes("dek-1")
                    ),
                    format!(
                        "INSERT INTO user_encryption_keys VALUES (2, 'USER002', {}, 'alias/surgicase', 1, '2025-01-02')",
                        bytes("dek-2")
                    ),
                    "INSERT INTO encryption_key_audit VALUES (1, 'USER001', 'generate', 'admin', '2025-01-02')".to_owned(),
                    // Indexes of the names phi gives its own (index names
                    // are database-wide on SQLite, schema-wide on
                    // PostgreSQL): phi's, prefixed, must not meet them.
                    "CREATE INDEX user_encryption_keys_kek_id ON user_encryption_keys (kms_key_id)".to_owned(),
                    "CREATE INDEX encryption_key_audit_owner ON encryption_key_audit (user_id)".to_owned(),
                    format!(
                        "CREATE TABLE cases (case_id VARCHAR(64) PRIMARY KEY, user_id VARCHAR(100) NOT NULL, \
                         patient_last {BLOB} NOT NULL)"
                    ),
                ] {
                    diesel::sql_query(&ddl).execute(conn).unwrap_or_else(|e| panic!("{ddl}: {e}"));
                }
            }

            #[derive(QueryableByName, Debug, PartialEq)]
            struct SurgiKey {
                #[diesel(sql_type = diesel::sql_types::Integer)]
                id: i32,
                #[diesel(sql_type = diesel::sql_types::Text)]
                user_id: String,
                #[diesel(sql_type = diesel::sql_types::Binary)]
                encrypted_dek: Vec<u8>,
                #[diesel(sql_type = diesel::sql_types::Text)]
                kms_key_id: String,
            }

            #[derive(QueryableByName, Debug, PartialEq)]
            struct SurgiAudit {
                #[diesel(sql_type = diesel::sql_types::Integer)]
                id: i32,
                #[diesel(sql_type = diesel::sql_types::Text)]
                user_id: String,
                #[diesel(sql_type = diesel::sql_types::Text)]
                action: String,
            }

            /// SurgiCase's key tables as they are.
            fn surgicase_rows(conn: &mut Conn) -> (Vec<SurgiKey>, Vec<SurgiAudit>) {
                let keys = diesel::sql_query(
                    "SELECT id, user_id, encrypted_dek, kms_key_id FROM user_encryption_keys ORDER BY id",
                )
                .load(conn)
                .expect("SurgiCase's keys");
                let audit = diesel::sql_query("SELECT id, user_id, action FROM encryption_key_audit ORDER BY id")
                .load(conn)
                .expect("SurgiCase's audit");
                (keys, audit)
            }

            #[derive(QueryableByName)]
            struct Count {
                #[diesel(sql_type = diesel::sql_types::BigInt)]
                n: i64,
            }

            fn count(conn: &mut Conn, table: &str) -> i64 {
                diesel::sql_query(format!("SELECT COUNT(*) AS n FROM {table}"))
                    .get_result::<Count>(conn)
                    .unwrap_or_else(|e| panic!("{table}: {e}"))
                    .n
            }

            fn backend() -> Backend {
                match stringify!($name) {
                    "sqlite" => Backend::Sqlite,
                    "mysql" => Backend::Mysql,
                    _ => Backend::Postgres,
                }
            }

            /// Seals, loads, updates and rotates on the prefixed tables.
            fn use_phi(url: &str, conn: &mut Conn) {
                let store = Arc::new(DieselKeyStore::<Conn>::connect(url).expect("phi's prefixed tables pass the check"));
                let keyring = Keyring::builder(store, common::local_kek()).build().expect("keyring");
                let cases: Vec<Case> = (0..4)
                    .map(|i| Case {
                        case_id: format!("C-{i}"),
                        user_id: format!("USER00{}", 1 + i % 2),
                        patient_last: format!("Doe {i}"),
                    })
                    .collect();
                Case::insert_all(&cases, &keyring, conn).expect("insert");
                let mut loaded = Case::load(cases::table.order(cases::case_id), conn, &keyring).expect("load");
                assert_eq!(loaded, cases);
                let old = loaded[0].clone();
                loaded[0].patient_last = "Roe".to_owned();
                assert_eq!(loaded[0].update(&old, &keyring, conn).expect("update"), Updated::Applied { sealed: true });
                assert_eq!(phi::lifecycle::rotate(&keyring, "USER001").expect("rotate"), 2);
                let again = Case::load(cases::table.order(cases::case_id), conn, &keyring).expect("load");
                assert_eq!(again[0].patient_last, "Roe");
                keyring.flush_audit().expect("audit written");

                // phi's keys and audit are in its prefixed tables, where
                // phi::schema reaches them too.
                assert_eq!(count(conn, "phi_user_encryption_keys"), 3, "two owners, one rotated");
                assert!(count(conn, "phi_encryption_key_audit") >= 3);
                use phi::schema::user_encryption_keys as k;
                assert_eq!(k::sql_name(), "phi_user_encryption_keys");
                let versions: Vec<i64> = k::table
                    .filter(k::owner_id.eq("USER001"))
                    .select(k::version)
                    .order(k::version)
                    .load(conn)
                    .expect("phi::schema query");
                assert_eq!(versions, [1, 2]);

                // Every owner rotated by the shared job: its claims are in
                // the prefixed claims table, the values re-sealed in place.
                use phi::lifecycle::{self, ResealTable, RotateAllOptions, RotateOwners};
                let report = lifecycle::rotate_all(
                    conn,
                    &keyring,
                    &RotateOwners::List(vec!["USER001".to_owned(), "USER002".to_owned()]),
                    &[ResealTable::new("cases", "user_id").key_column("case_id").column("patient_last")],
                    &RotateAllOptions::new("surgicase-prefix"),
                )
                .expect("rotate every owner");
                assert_eq!(report.rotated, 2, "{report:?}");
                assert_eq!(count(conn, "phi_phi_rotation_claims"), 2);
                let after = Case::load(cases::table.order(cases::case_id), conn, &keyring).expect("load");
                assert_eq!(after[0].patient_last, "Roe");
                assert_eq!(after[1..], cases[1..]);

                // The access log, on its prefixed tables.
                let log_store = Arc::new(
                    DieselAccessLogStore::<Conn>::connect(url).expect("the access log's prefixed tables"),
                );
                let log = DieselAccessLog::builder(log_store).chain("surgicase").start(&keyring).expect("log");
                log.append(vec![AccessRecord {
                    occurred_at: chrono::Utc::now().naive_utc(),
                    accessor: Accessor::new("dr-1", "treatment"),
                    op: AccessOp::Read,
                    owner_id: "USER001".to_owned(),
                    table: "cases".to_owned(),
                    row: Some("C-0".to_owned()),
                    fields: vec!["patient_last".to_owned()],
                }])
                .expect("append");
                log.flush().expect("flush");
                assert_eq!(count(conn, "phi_phi_access_log"), 1);
            }

            #[test]
            fn a_surgicase_database_adopts_phi_with_a_prefix_through_its_own_diesel_migrations() {
                phi::schema::set_table_prefix(PREFIX).expect("prefix");
                let db = database();
                let mut conn = Conn::establish(&db.url).expect("connect");
                surgicase(&mut conn);
                let before = surgicase_rows(&mut conn);

                // Before phi's migrations: the error names phi's prefixed
                // table, not SurgiCase's table of the same base name.
                let Err(Error::Schema { table, .. }) = DieselKeyStore::<Conn>::connect(&db.url) else {
                    panic!("phi's tables are not there yet");
                };
                assert_eq!(table, "phi_user_encryption_keys");

                // phi's migrations, written into the application's
                // directory, name the prefixed tables and run with Diesel.
                let dir = tempfile::tempdir().expect("migrations directory");
                let written = migrations::write_to(dir.path(), backend()).expect("write");
                assert!(written.created.contains(&"2026-11-25-000001_phi_key_tables".to_owned()));
                let up = std::fs::read_to_string(dir.path().join("2026-11-25-000001_phi_key_tables/up.sql"))
                    .expect("up.sql");
                assert!(up.contains("CREATE TABLE phi_user_encryption_keys"), "{up}");
                assert!(up.contains("CREATE TABLE phi_encryption_key_audit"), "{up}");
                // No file names one of phi's tables, indexes or constraints
                // without the prefix (every such name begins with a
                // table's name; the prefixed ones begin with `phi_phi_`
                // or `phi_` + a name that is no table's).
                let tables = [
                    "user_encryption_keys", "encryption_key_audit", "kek_check_values", "phi_key_feed",
                    "phi_key_events", "phi_rollout", "phi_feed_readers", "phi_legacy_values",
                    "phi_rotation_claims", "phi_seal_counts", "phi_access_chains", "phi_access_batches",
                    "phi_access_log",
                ];
                let mut files = 0;
                for migration in written.created.iter() {
                    for file in ["up.sql", "down.sql"] {
                        let path = dir.path().join(migration).join(file);
                        let text = std::fs::read_to_string(&path).expect("written file");
                        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                            assert!(
                                !tables.iter().any(|t| word.starts_with(t)),
                                "{}: {word} has no prefix",
                                path.display()
                            );
                        }
                        files += 1;
                    }
                }
                assert_eq!(files, 20, "ten migrations written");
                let source = FileBasedMigrations::from_path(dir.path()).expect("directory");
                conn.run_pending_migrations(source).expect("diesel migration run");
                migrations::check(&mut conn).expect("every prefixed table in place");

                use_phi(&db.url, &mut conn);
                assert_eq!(surgicase_rows(&mut conn), before, "SurgiCase's key tables are untouched");
            }

            #[test]
            fn a_surgicase_database_adopts_phi_with_a_prefix_through_phis_own_migrations() {
                phi::schema::set_table_prefix(PREFIX).expect("prefix");
                let db = database();
                let mut conn = Conn::establish(&db.url).expect("connect");
                surgicase(&mut conn);
                let before = surgicase_rows(&mut conn);

                let store = DieselKeyStore::<Conn>::builder(&db.url).run_migrations(true).connect();
                store.expect("phi's migrations create its prefixed tables beside SurgiCase's");
                DieselAccessLogStore::<Conn>::builder(&db.url)
                    .run_migrations(true)
                    .connect()
                    .expect("nothing left to run");
                assert_eq!(count(&mut conn, "phi_phi_key_feed"), 1);

                use_phi(&db.url, &mut conn);
                assert_eq!(surgicase_rows(&mut conn), before, "SurgiCase's key tables are untouched");

                // Reverted under the prefix, phi's tables go and
                // SurgiCase's stay.
                let reverted = conn
                    .revert_all_migrations(migrations::Source(backend()))
                    .expect("phi's migrations reverted");
                assert_eq!(reverted.len(), 10);
                assert_eq!(surgicase_rows(&mut conn), before, "SurgiCase's key tables survive the revert");
                for table in ["phi_user_encryption_keys", "phi_encryption_key_audit", "phi_phi_access_log"] {
                    assert!(
                        diesel::sql_query(format!("SELECT 1 FROM {table}")).execute(&mut conn).is_err(),
                        "{table} is dropped"
                    );
                }
            }

            /// Another prefix than the process's is refused, naming both.
            #[test]
            fn the_prefix_is_fixed_for_the_process() {
                phi::schema::set_table_prefix(PREFIX).expect("prefix");
                let err = phi::schema::set_table_prefix("other_").expect_err("fixed");
                assert!(err.to_string().contains("\"phi_\""), "{err}");
                assert!(phi::schema::set_table_prefix("Bad-Prefix").is_err());
            }
        }
    };
}

prefix_suite!(sqlite, "sqlite", diesel::SqliteConnection, "BLOB", None);
prefix_suite!(
    mysql,
    "mysql",
    diesel::MysqlConnection,
    "BLOB",
    Some(
        std::env::var("PHI_TEST_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
    )
);
prefix_suite!(
    postgres,
    "postgres",
    diesel::PgConnection,
    "BYTEA",
    Some(
        std::env::var("PHI_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    )
);
