// phi's tables in the application's hands: its migrations written into the
// application's directory and run by Diesel, the check `connect` makes, and
// tables of phi's names that belong to another application. Included in
// `tests/suite/mod.rs`, so `Conn`, `BLOB`, `server_url()` and `common` are in
// scope.

use diesel_migrations::{FileBasedMigrations, MigrationHarness as _};
use phi::migrations::{self, Backend};

use super::key_store::EmptyDatabase;

fn backend(db: &EmptyDatabase) -> Backend {
    Backend::from_url(&db.url).expect("test URL")
}

/// Runs the migrations of `dir` as `diesel migration run` does.
fn diesel_migration_run(db: &EmptyDatabase, dir: &std::path::Path) -> usize {
    let mut conn = Conn::establish(&db.url).expect("connect");
    let source = FileBasedMigrations::from_path(dir).expect("migrations directory");
    conn.run_pending_migrations(source).expect("diesel migration run").len()
}

fn schema_error(err: Error) -> (String, String, String) {
    match err {
        Error::Schema { table, migration, reason } => (table, migration, reason),
        other => panic!("not a schema error: {other:?}"),
    }
}

/// The migration directory names `write_to` writes, in order.
fn written_names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn written_migrations_run_by_diesel_pass_the_check() {
    let db = EmptyDatabase::new();
    let dir = tempfile::tempdir().expect("tempdir");
    // The application's own migration beside phi's.
    let app = dir.path().join("2026-12-01-120000_create_cases");
    std::fs::create_dir(&app).expect("mkdir");
    std::fs::write(app.join("up.sql"), "CREATE TABLE app_cases (case_id VARCHAR(64) PRIMARY KEY)").expect("up");
    std::fs::write(app.join("down.sql"), "DROP TABLE app_cases").expect("down");

    let written = migrations::write_to(dir.path(), backend(&db)).expect("written");
    assert_eq!(written.created.len(), written_names(dir.path()).len() - 1, "{written:?}");
    assert!(written.unchanged.is_empty());
    let applied = diesel_migration_run(&db, dir.path());
    assert_eq!(applied, written.created.len() + 1);

    phi::DieselKeyStore::<Conn>::connect(&db.url).expect("the check accepts Diesel's run");
    phi::access_log::DieselAccessLogStore::<Conn>::connect(&db.url).expect("the access log's tables too");
    let mut conn = Conn::establish(&db.url).expect("connect");
    migrations::check(&mut conn).expect("every table");
    // The same versions as phi's own: nothing left for phi to run.
    assert_eq!(migrations::run_pending(&mut conn).expect("nothing pending"), 0);

    // Written again: nothing new, nothing changed.
    let again = migrations::write_to(dir.path(), backend(&db)).expect("idempotent");
    assert!(again.created.is_empty(), "{again:?}");
    assert_eq!(again.unchanged, written.created);

    // A key store over them works.
    let store = Arc::new(phi::DieselKeyStore::<Conn>::connect(&db.url).expect("store"));
    let keyring = Keyring::builder(store, common::local_kek()).build().expect("keyring");
    let sealed = keyring.seal(&"Doe".to_string(), "schema-owner", "app_cases.patient_last", b"C-1").expect("seals");
    let opened: String = keyring.open(sealed, "schema-owner", "app_cases.patient_last", b"C-1").expect("opens");
    assert_eq!(opened, "Doe");
}

#[test]
fn a_half_applied_set_fails_the_check_naming_the_first_missing_migration() {
    let db = EmptyDatabase::new();
    let dir = tempfile::tempdir().expect("tempdir");
    migrations::write_to(dir.path(), backend(&db)).expect("written");
    // The application copied phi's migrations up to seal counts only.
    let held = tempfile::tempdir().expect("tempdir");
    let names = written_names(dir.path());
    let later: Vec<&String> = names.iter().filter(|n| n.as_str() >= "2026-12-07-000004").collect();
    assert_eq!(later.len(), 3, "{names:?}");
    for name in &later {
        std::fs::rename(dir.path().join(name), held.path().join(name)).expect("move");
    }
    diesel_migration_run(&db, dir.path());

    let (table, migration, reason) =
        schema_error(phi::DieselKeyStore::<Conn>::connect(&db.url).expect_err("behind"));
    assert_eq!((table.as_str(), migration.as_str()), ("phi_rotation_claims", "2026-12-07-000004_rotation_claims"));
    assert!(reason.contains("not applied"), "{reason}");
    let (table, migration, _) = schema_error(
        phi::access_log::DieselAccessLogStore::<Conn>::connect(&db.url).expect_err("no access log"),
    );
    assert_eq!((table.as_str(), migration.as_str()), ("phi_access_chains", "2026-12-07-000006_access_log"));

    // The rest added and run: the check passes.
    for name in &later {
        std::fs::rename(held.path().join(name), dir.path().join(name)).expect("move back");
    }
    assert_eq!(diesel_migration_run(&db, dir.path()), 3);
    phi::DieselKeyStore::<Conn>::connect(&db.url).expect("complete");
    phi::access_log::DieselAccessLogStore::<Conn>::connect(&db.url).expect("complete");
}

#[test]
fn writing_refuses_to_overwrite_or_share_a_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = server_url().map_or(Backend::Sqlite, |url| Backend::from_url(&url).expect("backend"));
    migrations::write_to(dir.path(), backend).expect("written");
    let up = dir.path().join("2026-11-27-000001_kek_check_values/up.sql");
    std::fs::write(&up, "-- edited\n").expect("edit");
    let err = migrations::write_to(dir.path(), backend).expect_err("a different file");
    let message = err.to_string();
    assert!(message.contains("kek_check_values/up.sql") && message.contains("does not overwrite"), "{message}");
    assert_eq!(std::fs::read_to_string(&up).expect("read"), "-- edited\n", "left as it was");

    // An application migration under one of phi's versions.
    let other = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(other.path().join("2026-11-25-000001_create_cases")).expect("mkdir");
    let err = migrations::write_to(other.path(), backend).expect_err("same version");
    let message = err.to_string();
    assert!(message.contains("2026-11-25-000001_create_cases") && message.contains("2026-11-25-000001_phi_key_tables"), "{message}");
    assert!(!other.path().join("2026-11-25-000001_phi_key_tables").exists(), "nothing written");
}

/// A database that already has tables of phi's key store's names with
/// other columns (as an application that kept its own per-user keys had).
fn foreign_key_tables(db: &EmptyDatabase) {
    let mut conn = Conn::establish(&db.url).expect("connect");
    for ddl in [
        format!(
            "CREATE TABLE user_encryption_keys (id INTEGER PRIMARY KEY, user_id VARCHAR(255) NOT NULL, \
             encrypted_key {BLOB} NOT NULL, created_at TIMESTAMP NOT NULL)"
        ),
        "CREATE TABLE encryption_key_audit (id INTEGER PRIMARY KEY, action VARCHAR(64) NOT NULL, \
         user_id VARCHAR(255), created_at TIMESTAMP NULL)"
            .to_owned(),
    ] {
        diesel::sql_query(ddl).execute(&mut conn).expect("foreign table");
    }
}

#[test]
fn a_table_of_phis_name_that_is_not_phis_is_refused_before_any_change() {
    let db = EmptyDatabase::new();
    foreign_key_tables(&db);

    let (table, migration, reason) =
        schema_error(phi::DieselKeyStore::<Conn>::connect(&db.url).expect_err("not phi's"));
    assert_eq!((table.as_str(), migration.as_str()), ("user_encryption_keys", "2026-11-25-000001_phi_key_tables"));
    assert!(reason.contains("not phi's") && reason.contains("owner_id") && reason.contains("encrypted_key"), "{reason}");
    assert!(reason.contains("database of their own") && reason.contains("set_table_prefix"), "{reason}");

    // Asked to migrate, it refuses before creating anything.
    let (table, _, _) = schema_error(
        phi::DieselKeyStore::<Conn>::builder(&db.url).run_migrations(true).connect().expect_err("refused"),
    );
    assert_eq!(table, "user_encryption_keys");
    for table in ["kek_check_values", "phi_key_feed", "__diesel_schema_migrations"] {
        assert!(!db.has_table(table), "{table} was created");
    }
}

/// Such a database adopts phi with phi's tables apart from the
/// application's: on PostgreSQL in a schema of their own (the URL's search
/// path), elsewhere in a database of their own. The application's tables
/// of the same names are left as they were.
#[test]
fn a_database_with_tables_of_phis_names_adopts_phi_with_its_tables_apart() {
    let db = EmptyDatabase::new();
    foreign_key_tables(&db);
    let _own_database;
    let phi_url = if BLOB == "BYTEA" {
        let mut conn = Conn::establish(&db.url).expect("connect");
        diesel::sql_query("CREATE SCHEMA phi").execute(&mut conn).expect("schema");
        format!("{}?options=-csearch_path%3Dphi", db.url)
    } else {
        let own = EmptyDatabase::new();
        let url = own.url.clone();
        _own_database = own;
        url
    };
    let store = phi::DieselKeyStore::<Conn>::builder(&phi_url).run_migrations(true).connect().expect("phi's tables apart");
    phi::DieselKeyStore::<Conn>::connect(&phi_url).expect("checked");
    let keyring = Keyring::builder(Arc::new(store), common::local_kek()).build().expect("keyring");
    let sealed = keyring.seal(&"Doe".to_string(), "surgeon-1", "cases.patient_last", b"C-1").expect("seals");
    assert_eq!(keyring.open::<String>(sealed, "surgeon-1", "cases.patient_last", b"C-1").expect("opens"), "Doe");

    // The application's tables of the same names: unchanged, empty.
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = Conn::establish(&db.url).expect("connect");
    for table in ["user_encryption_keys", "encryption_key_audit"] {
        let count: Count = diesel::sql_query(format!("SELECT COUNT(*) AS n FROM {table}"))
            .get_result(&mut conn)
            .expect("the application's table");
        assert_eq!(count.n, 0, "{table}");
    }
    let (table, _, _) = schema_error(phi::DieselKeyStore::<Conn>::connect(&db.url).expect_err("still not phi's"));
    assert_eq!(table, "user_encryption_keys");
}
