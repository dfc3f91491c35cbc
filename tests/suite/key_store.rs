// Connecting the key store with and without phi's migrations, on a database
// of its own. Included in `tests/suite/mod.rs`, so `Conn`, `server_url()`
// and `common` are in scope.

/// An empty database, dropped at the end: a new SQLite file, or a new
/// database on the test server.
struct EmptyDatabase {
    url: String,
    admin: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl EmptyDatabase {
    fn new() -> EmptyDatabase {
        let Some(admin_url) = server_url() else {
            let dir = tempfile::tempdir().expect("temporary directory");
            let url = dir.path().join("empty.db").display().to_string();
            return EmptyDatabase { url, admin: None, _dir: Some(dir) };
        };
        let unique = common::unique_owner("x");
        let name = format!("phi_empty_{}", unique.rsplit('-').take(2).collect::<Vec<_>>().join("_"));
        let (base, _) = admin_url.rsplit_once('/').expect("database in URL");
        let mut admin = Conn::establish(&admin_url).expect("admin connection");
        diesel::sql_query(format!("CREATE DATABASE {name}")).execute(&mut admin).expect("create database");
        EmptyDatabase { url: format!("{base}/{name}"), admin: Some((admin_url, name)), _dir: None }
    }

    /// Whether `table` exists (a query on it succeeds).
    fn has_table(&self, table: &str) -> bool {
        let mut conn = Conn::establish(&self.url).expect("connect");
        diesel::sql_query(format!("SELECT 1 FROM {table}")).execute(&mut conn).is_ok()
    }
}

impl Drop for EmptyDatabase {
    fn drop(&mut self) {
        if let Some((admin_url, name)) = &self.admin {
            let force = if BLOB == "BYTEA" { " WITH (FORCE)" } else { "" };
            let sql = format!("DROP DATABASE IF EXISTS {name}{force}");
            match Conn::establish(admin_url) {
                Ok(mut admin) => {
                    if let Err(e) = diesel::sql_query(&sql).execute(&mut admin) {
                        eprintln!("{sql}: {e}");
                    }
                }
                Err(e) => eprintln!("{sql}: {e}"),
            }
        }
    }
}

/// phi's tables, and Diesel's record of applied migrations.
const PHI_TABLES: [&str; 8] = [
    "user_encryption_keys",
    "encryption_key_audit",
    "kek_check_values",
    "phi_key_feed",
    "phi_key_events",
    "phi_rollout",
    "phi_rollout_owners",
    "__diesel_schema_migrations",
];

#[test]
fn a_key_store_connected_without_migrating_creates_no_tables() {
    let db = EmptyDatabase::new();
    let store = phi::DieselKeyStore::<Conn>::connect_without_migrating(&db.url).expect("connects");
    for table in PHI_TABLES {
        assert!(!db.has_table(table), "{table} was created");
    }
    // Nothing to work on: a keyring over it fails with a clear error
    // rather than creating anything.
    let err = Keyring::builder(Arc::new(store), common::local_kek()).build().expect_err("no key tables");
    assert!(matches!(err, Error::Store { .. }), "{err:?}");
    for table in PHI_TABLES {
        assert!(!db.has_table(table), "{table} was created");
    }

    // `connect` runs phi's migrations.
    let store = phi::DieselKeyStore::<Conn>::connect(&db.url).expect("connects and migrates");
    for table in PHI_TABLES {
        assert!(db.has_table(table), "{table} is missing");
    }
    drop(store);
}
