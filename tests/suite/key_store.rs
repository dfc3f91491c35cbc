// Connecting the key store with and without phi's migrations, on a database
// of its own. Included in `tests/suite/mod.rs`, so `Conn`, `server_url()`
// and `common` are in scope.

/// An empty database, dropped at the end: a new SQLite file, or a new
/// database on the test server.
pub(super) type EmptyDatabase = common::EmptyDatabase<Conn>;

impl EmptyDatabase {
    pub(super) fn new() -> EmptyDatabase {
        EmptyDatabase::on(server_url())
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
fn connect_creates_no_table_and_names_the_missing_one() {
    let db = EmptyDatabase::new();
    // The default: a check, no DDL, an error naming the table, the
    // migration and how to apply it.
    let err = phi::DieselKeyStore::<Conn>::connect(&db.url).expect_err("no phi tables");
    let Error::Schema { table, migration, reason } = &err else { panic!("{err:?}") };
    assert_eq!((table.as_str(), migration.as_str()), ("user_encryption_keys", "2026-11-25-000001_phi_key_tables"));
    assert!(reason.contains("phi migrations write --dir migrations/"), "{reason}");
    assert!(reason.contains("run_migrations(true)"), "{reason}");
    assert_eq!(err.kind(), phi::ErrorKind::Config);
    let err = phi::access_log::DieselAccessLogStore::<Conn>::connect(&db.url).expect_err("no access log tables");
    assert!(matches!(&err, Error::Schema { table, .. } if table == "phi_access_chains"), "{err:?}");
    for table in PHI_TABLES {
        assert!(!db.has_table(table), "{table} was created");
    }

    // Without the check either: nothing to work on, and a keyring over it
    // fails with a clear error rather than creating anything.
    let store = phi::DieselKeyStore::<Conn>::builder(&db.url).check_schema(false).connect().expect("connects");
    let err = Keyring::builder(Arc::new(store), common::local_kek()).build().expect_err("no key tables");
    assert!(matches!(err, Error::Store { .. }), "{err:?}");
    for table in PHI_TABLES {
        assert!(!db.has_table(table), "{table} was created");
    }

    // Asked to, the store runs phi's migrations; `connect` then passes.
    let store = phi::DieselKeyStore::<Conn>::builder(&db.url).run_migrations(true).connect().expect("connects and migrates");
    for table in PHI_TABLES {
        assert!(db.has_table(table), "{table} is missing");
    }
    drop(store);
    phi::DieselKeyStore::<Conn>::connect(&db.url).expect("phi's tables are in place");
    phi::access_log::DieselAccessLogStore::<Conn>::connect(&db.url).expect("the access log's too");
}

/// The columns `2026-12-07-000001_owner_ids_byte_exact` makes `VARBINARY`
/// on MySQL / MariaDB: (table, column).
const BYTE_EXACT_COLUMNS: [(&str, &str); 9] = [
    ("user_encryption_keys", "owner_id"),
    ("user_encryption_keys", "kek_id"),
    ("encryption_key_audit", "owner_id"),
    ("kek_check_values", "kek_id"),
    ("phi_key_events", "owner_id"),
    ("phi_rollout", "policy"),
    ("phi_rollout_owners", "policy"),
    ("phi_rollout_owners", "owner_id"),
    ("phi_feed_readers", "reader"),
];

/// MySQL / MariaDB: each column's data type and collation, from
/// `information_schema` (`None` on the other backends).
fn column_types(url: &str) -> Option<Vec<(String, String, Option<String>)>> {
    #[derive(QueryableByName)]
    struct Column {
        #[diesel(sql_type = diesel::sql_types::Text)]
        data_type: String,
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
        collation: Option<String>,
    }
    if BLOB != "BLOB" || server_url().is_none() {
        return None;
    }
    let mut conn = Conn::establish(url).expect("connect");
    Some(
        BYTE_EXACT_COLUMNS
            .iter()
            .map(|(table, column)| {
                let c: Column = diesel::sql_query(
                    "SELECT CAST(DATA_TYPE AS CHAR) AS data_type, CAST(COLLATION_NAME AS CHAR) AS collation \
                     FROM information_schema.COLUMNS \
                     WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = ?",
                )
                .bind::<diesel::sql_types::Text, _>(*table)
                .bind::<diesel::sql_types::Text, _>(*column)
                .get_result(&mut conn)
                .unwrap_or_else(|e| panic!("{table}.{column}: {e}"));
                (format!("{table}.{column}"), c.data_type, c.collation)
            })
            .collect(),
    )
}

/// How many key rows the database takes as `owner`'s.
fn key_rows_equal_to(url: &str, owner: &str) -> i64 {
    let mut conn = Conn::establish(url).expect("connect");
    key_rows(&mut conn, owner)
}

#[test]
fn the_owner_id_migration_makes_an_existing_store_compare_bytes() {
    use diesel::migration::MigrationSource as _;
    use diesel_migrations::MigrationHarness as _;
    let db = EmptyDatabase::new();
    let store = Arc::new(phi::DieselKeyStore::<Conn>::builder(&db.url).run_migrations(true).connect().expect("connects and migrates"));

    // The store as it was before the migration.
    let mut conn = Conn::establish(&db.url).expect("connect");
    let migrations = phi::migrations::Source(<Conn as phi::PhiConnection>::BACKEND).migrations().expect("phi's migrations");
    let byte_exact = migrations
        .iter()
        .find(|m| m.name().to_string().starts_with("2026-12-07-000001_owner_ids_byte_exact"))
        .expect("the owner id migration");
    conn.revert_migration(byte_exact).expect("reverted");
    let mysql = column_types(&db.url);
    if let Some(before) = &mysql {
        for (column, data_type, collation) in before {
            assert_eq!((data_type.as_str(), collation.as_deref()), ("varchar", Some("utf8mb4_bin")), "{column}");
        }
    }
    let acme = common::unique_owner("acme");
    let padded = format!("{acme} ");
    let keyring = Keyring::builder(store.clone(), common::local_kek())
        .allow_owner_id_whitespace(true)
        .build()
        .expect("keyring");
    let sealed = keyring.seal(&"Doe".to_string(), &acme, "t.c", b"r").expect("seal for acme");
    if mysql.is_some() {
        // PAD SPACE: `acme ` is `acme` to the database. The key store
        // refuses `acme`'s row for `acme `: no seal, no shred under it.
        assert_eq!(key_rows_equal_to(&db.url, &padded), 1, "utf8mb4_bin pads");
        let err = keyring.keys_for_seal(&padded).expect_err("acme's key for acme + space");
        let message = format!("{err}: {}", std::error::Error::source(&err).map(ToString::to_string).unwrap_or_default());
        assert!(message.contains(&format!("{acme:?}")) && message.contains(&format!("{padded:?}")), "{message}");
        let audit = phi::AuditEvent {
            occurred_at: chrono::Utc::now().naive_utc(),
            owner_id: padded.clone(),
            action: phi::AuditAction::Destroy,
            key_version: None,
            kek_id: None,
            actor: "test".into(),
            detail: None,
        };
        store.destroy_keys(&padded, None, &audit).expect_err("shredding acme + space destroys acme's key");
        assert_eq!(store.load_keys(&[acme.as_str()]).expect("acme's rows")[0].state, phi::KeyState::Active);
    } else {
        // SQLite's BINARY collation and PostgreSQL's deterministic text
        // equality compare bytes already: the migration changes nothing.
        assert_eq!(key_rows_equal_to(&db.url, &padded), 0, "{padded:?} is another owner");
    }

    // Migrated again: byte for byte, every row kept.
    assert_eq!(phi::migrations::run_pending(&mut conn).expect("migrates"), 1);
    if let Some(after) = column_types(&db.url) {
        for (column, data_type, collation) in after {
            assert_eq!((data_type.as_str(), collation), ("varbinary", None), "{column}");
        }
    }
    assert_eq!(key_rows_equal_to(&db.url, &padded), 0, "{padded:?} is another owner");
    assert_eq!(key_rows_equal_to(&db.url, &acme), 1);
    let keyring = Keyring::builder(store.clone(), common::local_kek())
        .allow_owner_id_whitespace(true)
        .build()
        .expect("keyring");
    assert_eq!(keyring.open(sealed, &acme, "t.c", b"r").expect("acme's value opens"), "Doe");
    keyring.keys_for_seal(&padded).expect("acme + space gets a key of its own");
    let rows = store.load_keys(&[padded.as_str(), acme.as_str()]).expect("both");
    let mut owners: Vec<&str> = rows.iter().map(|r| r.owner_id.as_str()).collect();
    owners.sort_unstable();
    assert_eq!(owners, [acme.as_str(), padded.as_str()]);
    drop(keyring);
}
