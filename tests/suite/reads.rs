// Reads never wait on, or write to, the key store's lock; a key version an
// owner lacks is looked for once per interval. Included in the `derive`
// module of `tests/suite/mod.rs`, so `Case`, `TestDb`, `Conn`, `BLOB` and
// `server_url()` are in scope.

use phi::schema::encryption_key_audit as audit;

/// The `unwrap` audit records of `owner`.
fn unwrap_records(conn: &mut Conn, owner: &str) -> i64 {
    audit::table
        .filter(audit::owner_id.eq(owner))
        .filter(audit::action.eq("unwrap"))
        .count()
        .get_result(conn)
        .expect("count audit records")
}

/// Seeds one case of a new owner and returns (owner, case id).
fn seeded_case(db: &TestDb, conn: &mut Conn, tag: &str) -> (String, String) {
    prepare_cases(conn);
    let owner = common::unique_owner(tag);
    let id = format!("{}-r", &owner[owner.len() - 20..]);
    insert_cases(conn, &db.keyring(), &[case(&owner, &id, "Doe")]);
    (owner, id)
}

/// A cold load inside the application's open write transaction: the key
/// store only reads, and the unwrap is audited once the transaction ends.
fn cold_load_in_write_transaction(db: &TestDb, conn: &mut Conn) {
    let (owner, id) = seeded_case(db, conn, "in-tx");
    let cold = db.keyring();
    let sqlite = server_url().is_none();
    conn.transaction(|conn| -> QueryResult<()> {
        // The application writes first: on SQLite it now holds the
        // database's write lock until it commits.
        diesel::update(phi_it_cases::table.find(&id))
            .set(phi_it_cases::procedure_code.eq("99999"))
            .execute(conn)?;
        let loaded = Case::load(phi_it_cases::table.find(&id), conn, &cold).expect("cold load inside the transaction");
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].patient_last, "Doe");
        assert_eq!(loaded[0].procedure_code, "99999", "read inside the transaction");
        let stats = cold.stats();
        assert_eq!((stats.key_loads, stats.unwraps), (1, 1), "{stats:?}");
        if sqlite {
            // The record waits for the write lock this transaction holds.
            assert_eq!(stats.audit_pending, 1, "{stats:?}");
            assert_eq!(unwrap_records(conn, &owner), 0);
        }
        Ok(())
    })
    .expect("the application's transaction commits");
    cold.flush_audit().expect("the unwrap is audited after the commit");
    let stats = cold.stats();
    assert_eq!((stats.audit_written, stats.audit_pending, stats.audit_dropped), (1, 0, 0), "{stats:?}");
    assert_eq!(unwrap_records(conn, &owner), 1);
}

#[test]
fn a_cold_load_inside_the_applications_write_transaction_succeeds() {
    let db = TestDb::new();
    let mut conn = db.conn();
    if server_url().is_some() {
        cold_load_in_write_transaction(&db, &mut conn);
        return;
    }
    // SQLite (the application's connection waits for other writers, see
    // `TestDb::conn`): in the default rollback-journal mode and in WAL mode.
    cold_load_in_write_transaction(&db, &mut conn);
    let wal = TestDb::new();
    let mut conn = wal.conn();
    diesel::sql_query("PRAGMA journal_mode = WAL").execute(&mut conn).expect("WAL");
    cold_load_in_write_transaction(&wal, &mut conn);
}

/// A database login that may only read phi's key tables, removed on drop.
struct ReadOnlyLogin {
    url: String,
    cleanup: Vec<String>,
    admin_url: String,
}

impl ReadOnlyLogin {
    fn new(db: &TestDb) -> ReadOnlyLogin {
        let Some(admin_url) = server_url() else {
            // SQLite: the same file, opened read-only.
            return ReadOnlyLogin { url: format!("file:{}?mode=ro", db.url), cleanup: Vec::new(), admin_url: db.url.clone() };
        };
        let name = format!("phi_ro_{}_{}", std::process::id(), common::unique_owner("x").rsplit('-').next().expect("n"));
        let (scheme, rest) = admin_url.split_once("://").expect("server URL");
        let host_db = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        let database = host_db.rsplit_once('/').map(|(_, d)| d).expect("database in URL");
        let (setup, cleanup) = if BLOB == "BYTEA" {
            (
                vec![
                    format!("CREATE ROLE {name} LOGIN"),
                    format!("GRANT SELECT ON user_encryption_keys, encryption_key_audit, kek_check_values TO {name}"),
                    // A keyring follows the key-event feed by default.
                    format!("GRANT SELECT ON phi_key_feed, phi_key_events, phi_rollout, phi_rollout_owners TO {name}"),
                ],
                vec![format!("DROP OWNED BY {name}"), format!("DROP ROLE {name}")],
            )
        } else {
            let user = format!("'{name}'@'%'");
            (
                vec![
                    format!("CREATE USER {user}"),
                    format!("GRANT SELECT ON {database}.user_encryption_keys TO {user}"),
                    format!("GRANT SELECT ON {database}.encryption_key_audit TO {user}"),
                    format!("GRANT SELECT ON {database}.kek_check_values TO {user}"),
                    // A keyring follows the key-event feed by default.
                    format!("GRANT SELECT ON {database}.phi_key_feed TO {user}"),
                    format!("GRANT SELECT ON {database}.phi_key_events TO {user}"),
                    format!("GRANT SELECT ON {database}.phi_rollout TO {user}"),
                    format!("GRANT SELECT ON {database}.phi_rollout_owners TO {user}"),
                ],
                vec![format!("DROP USER {user}")],
            )
        };
        let login = ReadOnlyLogin { url: format!("{scheme}://{name}@{host_db}"), cleanup, admin_url };
        let mut admin = Conn::establish(&login.admin_url).expect("admin connection");
        for sql in setup {
            diesel::sql_query(&sql).execute(&mut admin).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        login
    }
}

impl Drop for ReadOnlyLogin {
    fn drop(&mut self) {
        if self.cleanup.is_empty() {
            return;
        }
        let mut admin = Conn::establish(&self.admin_url).expect("admin connection");
        for sql in &self.cleanup {
            if let Err(e) = diesel::sql_query(sql).execute(&mut admin) {
                eprintln!("cleanup {sql}: {e}");
            }
        }
    }
}

#[test]
fn a_key_store_with_a_read_only_login_opens_values_and_reports_what_it_could_not_audit() {
    let db = TestDb::new();
    let mut conn = db.conn();
    let (owner, id) = seeded_case(&db, &mut conn, "read-only");
    let login = ReadOnlyLogin::new(&db);

    // The login cannot create phi's tables: asked to migrate, it fails.
    if server_url().is_some() {
        assert!(phi::DieselKeyStore::<Conn>::builder(&login.url).run_migrations(true).connect().is_err(), "a read-only login cannot migrate");
    }
    // It may not see every table of phi in the catalog (MySQL / MariaDB show
    // a login only the tables it holds a privilege on): no check.
    let store = phi::DieselKeyStore::<Conn>::builder(&login.url).check_schema(false).connect().expect("read-only key store connects");
    let reader = Keyring::builder(Arc::new(store), common::local_kek()).actor("read-only-test").build().expect("keyring");

    let loaded = Case::load(phi_it_cases::table.find(&id), &mut conn, &reader).expect("opens with a read-only key store");
    assert_eq!(loaded[0].patient_last, "Doe");
    let err = reader.flush_audit().expect_err("the unwrap record could not be written");
    assert!(matches!(err, Error::Store { .. }), "{err:?}");
    // The message and its causes (no message repeats its source).
    let message = std::iter::successors(Some(&err as &dyn std::error::Error), |e| e.source()).map(|e| e.to_string()).collect::<Vec<_>>().join(": ");
    assert!(message.contains("1 record(s) could not be written"), "{message}");
    let stats = reader.stats();
    assert_eq!((stats.unwraps, stats.audit_written, stats.audit_pending, stats.audit_dropped), (1, 0, 0, 1), "{stats:?}");
    // None written by this keyring (another test's `warm_all` may unwrap
    // every owner of the shared key table, under its own actor).
    let written: i64 = audit::table
        .filter(audit::owner_id.eq(&owner))
        .filter(audit::action.eq("unwrap"))
        .filter(audit::actor.eq("read-only-test"))
        .count()
        .get_result(&mut conn)
        .expect("count audit records");
    assert_eq!(written, 0);
    // Reported once: a later flush with nothing new is clean.
    reader.flush_audit().expect("nothing new to report");

    // Sealing for a new owner is a write: refused, never a plaintext fallback.
    let err = reader.seal(&"x".to_string(), &common::unique_owner("ro-new"), TEXT, b"r").expect_err("no INSERT privilege");
    assert!(matches!(err, Error::Store { .. }), "{err:?}");
}

#[test]
fn a_key_version_the_owner_lacks_costs_one_reload_per_interval() {
    const BOGUS: u32 = 3_999_999_999;
    let db = TestDb::new();
    let mut conn = db.conn();
    prepare_cases(&mut conn);
    let owner = common::unique_owner("bogus-version");
    let tag = &owner[owner.len() - 16..];
    let cases: Vec<Case> = (0..1000).map(|i| case(&owner, &format!("{tag}-{i:04}"), "Doe")).collect();
    // Sealed, then each envelope's key version (header bytes 2..6) rewritten
    // to one the owner does not have, as a tampered or restored row would be.
    let bogus = |e: &mut Vec<u8>| e[2..6].copy_from_slice(&BOGUS.to_be_bytes());
    let rows: Vec<CaseSealed> = Case::seal_all(&cases, &db.keyring())
        .expect("seal")
        .into_iter()
        .map(|mut row| {
            let mut first = row.patient_first.into_bytes();
            bogus(&mut first);
            row.patient_first = Encrypted::from_bytes(first);
            let mut last = row.patient_last.into_bytes();
            bogus(&mut last);
            row.patient_last = Encrypted::from_bytes(last);
            row
        })
        .collect();
    for chunk in rows.chunks(200) {
        diesel::insert_into(phi_it_cases::table).values(chunk).execute(&mut conn).expect("insert");
    }

    let clock = Arc::new(ManualClock::new());
    let reader = Keyring::builder(db.store(), common::local_kek())
        .clock(clock.clone())
        .unknown_version_ttl(Duration::from_secs(30))
        .build()
        .expect("keyring");
    reader.keys_for_open(&owner).expect("the owner's real keys");
    let before = reader.stats();
    for c in &cases {
        let err = load_one(&mut conn, &reader, &c.case_id).expect_err("no such key version");
        match &err {
            Error::UnknownKeyVersion { scope, owner: o, key_version } => {
                assert_eq!((scope.as_str(), o.as_str(), *key_version), ("phi_it_cases.patient_first", owner.as_str(), BOGUS));
            }
            other => panic!("{other:?}"),
        }
        let message = err.to_string();
        assert!(message.contains(&owner) && message.contains("phi_it_cases.patient_first") && message.contains(&BOGUS.to_string()), "{message}");
    }
    let after = reader.stats();
    let cost = |a: &phi::KeyringStats, b: &phi::KeyringStats| (a.key_loads - b.key_loads, a.unwraps - b.unwraps, a.version_reloads - b.version_reloads);
    assert_eq!(cost(&after, &before), (1, 1, 1), "one reload and one unwrap for 1,000 rows: {after:?}");
    assert_eq!(after.unknown_versions_remembered - before.unknown_versions_remembered, 999);

    // All 1,000 in one load: still no reload within the interval.
    let all = Case::load(phi_it_cases::table.filter(phi_it_cases::user_id.eq(&owner)), &mut conn, &reader);
    assert!(matches!(all, Err(Error::UnknownKeyVersion { key_version: BOGUS, .. })), "{all:?}");
    assert_eq!(cost(&reader.stats(), &before), (1, 1, 1));

    // After the interval, the store is asked once more.
    clock.advance(Duration::from_secs(30));
    for c in &cases[..10] {
        load_one(&mut conn, &reader, &c.case_id).expect_err("still no such key version");
    }
    assert_eq!(cost(&reader.stats(), &before), (2, 2, 2));
}

/// Opening a crypto-shredded owner's value reports the shred
/// ([`Error::Shredded`], kind `Shredded`: erasure, not damage), whatever
/// the keyring's cache held: this process's own shred, a following
/// keyring told by the feed, a dropped cache, a cold one.
#[test]
fn a_shredded_owners_values_report_the_shred_whatever_the_cache_held() {
    let db = TestDb::new();
    let mut conn = db.conn();
    let (owner, id) = seeded_case(&db, &mut conn, "shred-open");
    let shredder = db.keyring();
    // A following keyring (its thread reads the feed once an hour; the test
    // reads it with `sync_feed`), and one whose cache the test drops.
    let follower = Keyring::builder(db.store(), common::local_kek())
        .feed_interval(Duration::from_secs(3600))
        .build()
        .expect("following keyring");
    let dropped = db.keyring();
    for keyring in [&shredder, &follower, &dropped] {
        let cases = Case::load(phi_it_cases::table.find(&id), &mut conn, keyring).expect("opens before the shred");
        assert_eq!(cases.len(), 1);
    }
    let sealed: Vec<u8> = phi_it_cases::table
        .find(&id)
        .select(phi_it_cases::patient_last)
        .first(&mut conn)
        .expect("sealed value");

    phi::lifecycle::shred_keys_by(&shredder, &owner, "phi-test").expect("shred");
    follower.sync_feed();
    dropped.clear_all();
    let cold = db.keyring();
    for (situation, keyring) in [
        ("this process's own shred", &shredder),
        ("a feed event", &follower),
        ("a dropped cache", &dropped),
        ("a cold cache", &cold),
    ] {
        let err = Case::load(phi_it_cases::table.find(&id), &mut conn, keyring).expect_err("shredded");
        assert!(matches!(&err, Error::Shredded { owner: o } if *o == owner), "{situation}: {err:?}");
        assert_eq!(err.kind(), phi::ErrorKind::Shredded, "{situation}");
        let err = keyring
            .open(Encrypted::<String>::from_bytes(sealed.clone()), &owner, "phi_it_cases.patient_last", id.as_bytes())
            .expect_err("shredded");
        assert!(matches!(&err, Error::Shredded { owner: o } if *o == owner), "{situation}: {err:?}");
    }
}
