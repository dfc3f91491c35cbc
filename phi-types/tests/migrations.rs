//! phi's embedded migrations on SQLite.
#![cfg(feature = "sqlite")]

use std::sync::Barrier;

use diesel::prelude::*;
use diesel::sql_types::Text;
use diesel_migrations::{FileBasedMigrations, MigrationHarness};

#[derive(QueryableByName)]
struct Table {
    #[diesel(sql_type = Text)]
    name: String,
}

fn tables(conn: &mut SqliteConnection) -> Vec<String> {
    diesel::sql_query("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .load::<Table>(conn)
        .expect("tables")
        .into_iter()
        .map(|t| t.name)
        .collect()
}

/// The versions of phi's migrations on SQLite (`migrations/sqlite`), in
/// order, as Diesel records them (`2026-11-25-000001_…` is `20261125000001`).
fn versions() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    let mut versions: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| {
            let name = entry.expect("directory entry").file_name();
            let name = name.to_string_lossy();
            name.split('_').next().unwrap_or_default().replace('-', "")
        })
        .collect();
    versions.sort();
    versions
}

#[test]
fn migrations_create_the_key_tables_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = dir.path().join("m.db").display().to_string();
    let mut conn = SqliteConnection::establish(&url).expect("connect");
    // Every migration of phi, once.
    assert_eq!(
        phi_types::migrations::run_pending(&mut conn).expect("migrate"),
        versions().len()
    );
    assert_eq!(
        phi_types::migrations::run_pending(&mut conn).expect("again"),
        0
    );
    let tables = tables(&mut conn);
    for table in [
        "encryption_key_audit",
        "kek_check_values",
        "phi_key_events",
        "phi_key_feed",
        "phi_rollout",
        "phi_rollout_owners",
        "user_encryption_keys",
    ] {
        assert!(
            tables.iter().any(|t| t == table),
            "{table} missing from {tables:?}"
        );
    }
}

#[test]
fn processes_starting_together_all_find_the_tables_ready() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = dir.path().join("m.db").display().to_string();
    let barrier = Barrier::new(4);
    let applied: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let mut conn = SqliteConnection::establish(&url).expect("connect");
                    barrier.wait();
                    phi_types::migrations::run_pending(&mut conn).expect("every starter succeeds")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).sum()
    });
    assert_eq!(applied, versions().len(), "each migration ran exactly once");
}

#[test]
fn a_key_store_connects_without_creating_tables_unless_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = dir.path().join("m.db").display().to_string();
    let err =
        phi_types::DieselKeyStore::<SqliteConnection>::connect(&url).expect_err("no phi tables");
    assert!(
        matches!(&err, phi_types::Error::Schema { table, .. } if table == "user_encryption_keys"),
        "{err:?}"
    );
    let store = phi_types::DieselKeyStore::<SqliteConnection>::builder(&url)
        .check_schema(false)
        .connect()
        .expect("connects");
    let mut conn = SqliteConnection::establish(&url).expect("connect");
    assert_eq!(tables(&mut conn), Vec::<String>::new(), "nothing created");
    drop(store);

    // Only when asked.
    let _store = phi_types::DieselKeyStore::<SqliteConnection>::builder(&url)
        .run_migrations(true)
        .connect()
        .expect("connects");
    let tables = tables(&mut conn);
    assert!(
        tables.iter().any(|t| t == "user_encryption_keys"),
        "{tables:?}"
    );
    assert!(
        tables.iter().any(|t| t == "__diesel_schema_migrations"),
        "{tables:?}"
    );
}

/// An application's migration directory with one migration, `version`.
fn application_migrations(version: &str) -> (tempfile::TempDir, FileBasedMigrations) {
    let dir = tempfile::tempdir().expect("tempdir");
    let migration = dir.path().join(format!("{version}_create_cases"));
    std::fs::create_dir(&migration).expect("migration directory");
    std::fs::write(
        migration.join("up.sql"),
        "CREATE TABLE cases (case_id TEXT PRIMARY KEY)",
    )
    .expect("up.sql");
    std::fs::write(migration.join("down.sql"), "DROP TABLE cases").expect("down.sql");
    let source = FileBasedMigrations::from_path(dir.path()).expect("migration source");
    (dir, source)
}

/// What `diesel migration revert` does (Diesel's `revert_last_migration`
/// over the application's directory) beside phi's migrations: it reverts
/// the application's latest migration, or, when phi's was recorded under a
/// later version, stops with an error; phi's tables stay either way.
#[test]
fn the_applications_revert_never_reverts_phis_migrations() {
    for (version, reverts) in [("2099-01-01-000000", true), ("2000-01-01-000000", false)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = dir.path().join("m.db").display().to_string();
        let mut conn = SqliteConnection::establish(&url).expect("connect");
        let (_app_dir, app) = application_migrations(version);
        phi_types::migrations::run_pending(&mut conn).expect("phi's migrations");
        conn.run_pending_migrations(app.clone())
            .expect("the application's migrations");
        assert!(tables(&mut conn).iter().any(|t| t == "cases"));

        let reverted = conn.revert_last_migration(app);
        let tables = tables(&mut conn);
        if reverts {
            assert_eq!(
                reverted.expect("reverted").to_string(),
                version.replace('-', "")
            );
            assert!(!tables.iter().any(|t| t == "cases"), "{tables:?}");
        } else {
            let err = reverted.expect_err("phi's migration is the latest");
            let latest = versions().pop().expect("phi has migrations");
            assert!(err.to_string().contains(&latest), "{err}");
            assert!(tables.iter().any(|t| t == "cases"), "{tables:?}");
        }
        assert!(
            tables.iter().any(|t| t == "user_encryption_keys"),
            "{tables:?}"
        );
        assert_eq!(
            phi_types::migrations::run_pending(&mut conn).expect("nothing pending"),
            0
        );
    }
}
