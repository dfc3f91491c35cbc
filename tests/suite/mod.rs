// The backend-independent integration suite. Included once per backend by
// `tests/backends.rs`, with `Conn`, `BLOB` and `server_url()` in scope.

use std::sync::{Arc, Barrier, OnceLock};
use std::time::Duration;

use chrono::{NaiveDate, NaiveDateTime};
use diesel::prelude::*;
use phi::{Encrypted, EnvelopeError, Error, KeyEncryptionKey, Keyring, KeyStore, ManualClock};

diesel::table! {
    phi_it_values (id) {
        id -> Varchar,
        owner_id -> Varchar,
        v_text -> Nullable<Binary>,
        v_bytes -> Nullable<Binary>,
        v_i64 -> Nullable<Binary>,
        v_i32 -> Nullable<Binary>,
        v_bool -> Nullable<Binary>,
        v_date -> Nullable<Binary>,
        v_datetime -> Nullable<Binary>,
        v_opt -> Nullable<Binary>,
    }
}

use phi::schema::{encryption_key_audit, user_encryption_keys};

#[derive(Debug, Clone, Insertable, Queryable, Selectable)]
#[diesel(table_name = phi_it_values)]
struct ValueRow {
    id: String,
    owner_id: String,
    v_text: Option<Encrypted<String>>,
    v_bytes: Option<Encrypted<Vec<u8>>>,
    v_i64: Option<Encrypted<i64>>,
    v_i32: Option<Encrypted<i32>>,
    v_bool: Option<Encrypted<bool>>,
    v_date: Option<Encrypted<NaiveDate>>,
    v_datetime: Option<Encrypted<NaiveDateTime>>,
    v_opt: Option<Encrypted<String>>,
}

/// A database for one test: a fresh SQLite file, or the shared server.
struct TestDb {
    url: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    fn new() -> TestDb {
        match server_url() {
            Some(url) => {
                static READY: OnceLock<()> = OnceLock::new();
                READY.get_or_init(|| prepare(&url));
                TestDb { url, _dir: None }
            }
            None => {
                let dir = tempfile::tempdir().expect("temporary directory");
                let url = dir.path().join("phi-test.db").display().to_string();
                prepare(&url);
                TestDb {
                    url,
                    _dir: Some(dir),
                }
            }
        }
    }

    fn conn(&self) -> Conn {
        let mut conn = Conn::establish(&self.url).unwrap_or_else(|e| {
            panic!("cannot connect to the test database {}: {e}", self.url)
        });
        if server_url().is_none() {
            // The keyring writes its unwrap audit records from a thread of
            // its own: an SQLite application waits for other writers, as
            // any multi-connection SQLite application must.
            diesel::sql_query("PRAGMA busy_timeout = 10000").execute(&mut conn).expect("busy timeout");
        }
        conn
    }

    fn store(&self) -> Arc<phi::DieselKeyStore<Conn>> {
        // Prepared: phi's tables are in place, `connect` only checks them.
        Arc::new(phi::DieselKeyStore::<Conn>::connect(&self.url).expect("key store connects"))
    }

    fn keyring(&self) -> Keyring {
        Keyring::builder(self.store(), common::local_kek())
            .actor("integration-test")
            .build()
            .expect("keyring")
    }
}

/// Returns once the server shows another session's statement on `table`
/// waiting for a lock (PostgreSQL), or under way while the session holding
/// the lock is idle (MariaDB); at once on SQLite, whose writers run one at
/// a time. Panics after 30 s.
fn wait_until_blocked_on(db: &TestDb, table: &str) {
    #[derive(QueryableByName)]
    struct Waiting {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    if server_url().is_none() {
        return;
    }
    let sql = if db.url.starts_with("postgres") {
        format!(
            "SELECT COUNT(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND datname = current_database() AND query LIKE '%{table}%'"
        )
    } else {
        format!(
            "SELECT COUNT(*) AS n FROM information_schema.processlist WHERE id <> CONNECTION_ID() \
             AND db = DATABASE() AND info LIKE '%{table}%'"
        )
    };
    let mut watcher = db.conn();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: Waiting = diesel::sql_query(&sql).get_result(&mut watcher).expect("lock waits");
        if waiting.n > 0 {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no statement on {table} waited for the lock");
        std::thread::yield_now();
    }
}

/// Runs phi's migrations and creates the test table.
fn prepare(url: &str) {
    let mut conn = Conn::establish(url)
        .unwrap_or_else(|e| panic!("cannot connect to the test database {url}: {e}"));
    phi::migrations::run_pending(&mut conn).expect("phi migrations run");
    let columns: Vec<String> = [
        "v_text", "v_bytes", "v_i64", "v_i32", "v_bool", "v_date", "v_datetime", "v_opt",
    ]
    .iter()
    .map(|c| format!("{c} {BLOB} NULL"))
    .collect();
    let ddl = format!(
        "CREATE TABLE IF NOT EXISTS phi_it_values (id VARCHAR(255) NOT NULL PRIMARY KEY, \
         owner_id VARCHAR(255) NOT NULL, {})",
        columns.join(", ")
    );
    diesel::sql_query(ddl).execute(&mut conn).expect("test table");
}

const TEXT: &str = "phi_it_values.v_text";

fn sample_row(keyring: &Keyring, owner: &str, id: &str) -> ValueRow {
    let keys = keyring.keys_for_seal(owner).expect("keys");
    let row = id.as_bytes();
    let date = NaiveDate::from_ymd_opt(1980, 1, 15).expect("date");
    ValueRow {
        id: id.to_owned(),
        owner_id: owner.to_owned(),
        v_text: Some(keys.seal(&"Zoë Doe-Smith".to_string(), TEXT, row).expect("seal")),
        v_bytes: Some(keys.seal(&vec![0u8, 1, 255], "phi_it_values.v_bytes", row).expect("seal")),
        v_i64: Some(keys.seal(&-42i64, "phi_it_values.v_i64", row).expect("seal")),
        v_i32: Some(keys.seal(&i32::MAX, "phi_it_values.v_i32", row).expect("seal")),
        v_bool: Some(keys.seal(&true, "phi_it_values.v_bool", row).expect("seal")),
        v_date: Some(keys.seal(&date, "phi_it_values.v_date", row).expect("seal")),
        v_datetime: Some(
            keys.seal(
                &date.and_hms_micro_opt(8, 30, 5, 123_456).expect("time"),
                "phi_it_values.v_datetime",
                row,
            )
            .expect("seal"),
        ),
        v_opt: None,
    }
}

fn insert(conn: &mut Conn, row: &ValueRow) {
    diesel::insert_into(phi_it_values::table)
        .values(row)
        .execute(conn)
        .expect("insert");
}

fn load(conn: &mut Conn, id: &str) -> ValueRow {
    phi_it_values::table
        .find(id)
        .select(ValueRow::as_select())
        .first(conn)
        .expect("row loads")
}

fn set_text_bytes(conn: &mut Conn, id: &str, bytes: Vec<u8>) {
    diesel::update(phi_it_values::table.find(id))
        .set(phi_it_values::v_text.eq(Some(bytes)))
        .execute(conn)
        .expect("raw update");
}

fn key_rows(conn: &mut Conn, owner: &str) -> i64 {
    user_encryption_keys::table
        .filter(user_encryption_keys::owner_id.eq(owner))
        .count()
        .get_result(conn)
        .expect("count key rows")
}

fn open_text(keyring: &Keyring, row: &ValueRow, encrypted: Encrypted<String>) -> phi::Result<String> {
    keyring.open(encrypted, &row.owner_id, TEXT, row.id.as_bytes())
}

#[test]
fn every_supported_type_and_null_round_trips() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let owner = common::unique_owner("types");
    let id = format!("{owner}-r1");
    let mut conn = db.conn();
    insert(&mut conn, &sample_row(&keyring, &owner, &id));

    let row = load(&mut conn, &id);
    let r = id.as_bytes();
    let keys = keyring.keys_for_open(&owner).expect("keys");
    for stored in [row.v_text.as_ref().map(Encrypted::as_bytes), row.v_date.as_ref().map(Encrypted::as_bytes)] {
        assert_eq!(&stored.expect("not null")[..2], &[0xF1, 0x01], "stored as envelope v1");
    }
    assert_eq!(keys.open(row.v_text.expect("text"), TEXT, r).expect("text"), "Zoë Doe-Smith");
    assert_eq!(keys.open(row.v_bytes.expect("bytes"), "phi_it_values.v_bytes", r).expect("bytes"), vec![0, 1, 255]);
    assert_eq!(keys.open(row.v_i64.expect("i64"), "phi_it_values.v_i64", r).expect("i64"), -42);
    assert_eq!(keys.open(row.v_i32.expect("i32"), "phi_it_values.v_i32", r).expect("i32"), i32::MAX);
    assert!(keys.open(row.v_bool.expect("bool"), "phi_it_values.v_bool", r).expect("bool"));
    let date = NaiveDate::from_ymd_opt(1980, 1, 15).expect("date");
    assert_eq!(keys.open(row.v_date.expect("date"), "phi_it_values.v_date", r).expect("date"), date);
    assert_eq!(
        keys.open(row.v_datetime.expect("datetime"), "phi_it_values.v_datetime", r).expect("datetime"),
        date.and_hms_micro_opt(8, 30, 5, 123_456).expect("time")
    );
    assert!(row.v_opt.is_none(), "None is stored as SQL NULL");

    // NULL in the database, not an encrypted empty value.
    let nulls: i64 = phi_it_values::table
        .filter(phi_it_values::id.eq(&id))
        .filter(phi_it_values::v_opt.is_null())
        .count()
        .get_result(&mut conn)
        .expect("count");
    assert_eq!(nulls, 1);
}

#[test]
fn a_byte_altered_in_the_database_fails_to_open_naming_column_and_owner() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let owner = common::unique_owner("tamper");
    let id = format!("{owner}-r1");
    let other_id = format!("{owner}-r2");
    let mut conn = db.conn();
    insert(&mut conn, &sample_row(&keyring, &owner, &id));
    insert(&mut conn, &sample_row(&keyring, &owner, &other_id));

    let mut bytes = load(&mut conn, &id).v_text.expect("text").into_bytes();
    let last = bytes.len() - 20;
    bytes[last] ^= 0x01;
    set_text_bytes(&mut conn, &id, bytes);

    let row = load(&mut conn, &id);
    let err = open_text(&keyring, &row, row.v_text.clone().expect("text")).expect_err("altered");
    assert!(matches!(err, Error::Decrypt { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(TEXT) && message.contains(&owner) && message.contains("key version 1"), "{message}");
    assert!(!message.contains("Zoë"), "no plaintext in errors: {message}");

    // The other row still reads.
    let other = load(&mut conn, &other_id);
    assert_eq!(open_text(&keyring, &other, other.v_text.clone().expect("text")).expect("opens"), "Zoë Doe-Smith");
}

#[test]
fn values_copied_to_another_owner_column_or_row_fail_to_open() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let alice = common::unique_owner("swap-a");
    let bob = common::unique_owner("swap-b");
    let (a1, a2, b1) = (format!("{alice}-r1"), format!("{alice}-r2"), format!("{bob}-r1"));
    let mut conn = db.conn();
    for (owner, id) in [(&alice, &a1), (&alice, &a2), (&bob, &b1)] {
        insert(&mut conn, &sample_row(&keyring, owner, id));
    }
    let a1_text = load(&mut conn, &a1).v_text.expect("text").into_bytes();

    // Another owner's row.
    set_text_bytes(&mut conn, &b1, a1_text.clone());
    let row = load(&mut conn, &b1);
    let err = open_text(&keyring, &row, row.v_text.clone().expect("text")).expect_err("other owner");
    assert!(matches!(err, Error::Decrypt { ref owner, .. } if *owner == bob), "{err:?}");

    // Another row of the same owner.
    set_text_bytes(&mut conn, &a2, a1_text.clone());
    let row = load(&mut conn, &a2);
    let err = open_text(&keyring, &row, row.v_text.clone().expect("text")).expect_err("other row");
    assert!(matches!(err, Error::Decrypt { .. }), "{err:?}");

    // Another column of the same row.
    diesel::update(phi_it_values::table.find(&a1))
        .set(phi_it_values::v_opt.eq(Some(a1_text)))
        .execute(&mut conn)
        .expect("copy to v_opt");
    let row = load(&mut conn, &a1);
    let err = keyring
        .open(row.v_opt.clone().expect("copied"), &alice, "phi_it_values.v_opt", a1.as_bytes())
        .expect_err("other column");
    assert!(err.to_string().contains("phi_it_values.v_opt"), "{err}");
    // The original still opens where it belongs.
    assert_eq!(open_text(&keyring, &row, row.v_text.clone().expect("text")).expect("original"), "Zoë Doe-Smith");
}

#[test]
fn malformed_stored_bytes_give_typed_errors_naming_the_column() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let owner = common::unique_owner("malformed");
    let id = format!("{owner}-r1");
    let mut conn = db.conn();
    insert(&mut conn, &sample_row(&keyring, &owner, &id));

    let mut unknown_version = vec![0xF1, 0x02, 0, 0, 0, 1];
    unknown_version.resize(40, 0);
    let cases: [(Vec<u8>, EnvelopeError); 4] = [
        (Vec::new(), EnvelopeError::Empty),
        (vec![0xF1, 0x01, 0, 0, 0, 1, 9, 9], EnvelopeError::Truncated { len: 8, min: 34 }),
        (b"Doe".to_vec(), EnvelopeError::BadMagic(b'D')),
        (unknown_version, EnvelopeError::UnsupportedVersion(2)),
    ];
    for (bytes, expected) in cases {
        set_text_bytes(&mut conn, &id, bytes);
        // Loading never fails on bad bytes: the error comes with context at open.
        let row = load(&mut conn, &id);
        let encrypted = row.v_text.clone().expect("not null");
        assert_eq!(encrypted.header(), Err(expected));
        let err = open_text(&keyring, &row, encrypted).expect_err("malformed");
        match &err {
            Error::Malformed { scope, owner: o, source } => {
                assert_eq!((scope.as_str(), o.as_str(), source), (TEXT, owner.as_str(), &expected));
            }
            other => panic!("expected Error::Malformed, got {other:?}"),
        }
        assert!(err.to_string().contains(TEXT) && err.to_string().contains(&owner), "{err}");
    }
}

#[test]
fn two_threads_creating_the_first_key_end_with_one_row() {
    let db = TestDb::new();
    let owner = common::unique_owner("race-threads");
    let barrier = Arc::new(Barrier::new(2));
    let sealed: Vec<Encrypted<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|i| {
                let barrier = barrier.clone();
                let (owner, db) = (&owner, &db);
                s.spawn(move || {
                    // Separate keyrings and pools: as two processes would be.
                    let kek = common::CountingKek::new(common::local_kek(), Duration::from_millis(50));
                    let keyring = Keyring::builder(db.store(), kek).build().expect("keyring");
                    barrier.wait();
                    keyring
                        .seal(&format!("value {i}"), owner, TEXT, b"row")
                        .expect("seal")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let mut conn = db.conn();
    assert_eq!(key_rows(&mut conn, &owner), 1, "exactly one data key row");
    let fresh = db.keyring();
    for (i, value) in sealed.into_iter().enumerate() {
        assert_eq!(fresh.open(value, &owner, TEXT, b"row").expect("opens"), format!("value {i}"));
    }
}

/// The child half of `two_processes_creating_the_first_key_end_with_one_row`.
#[test]
#[ignore = "run as a child process by two_processes_creating_the_first_key_end_with_one_row"]
fn race_child_seals_for_a_new_owner() {
    let Ok(url) = std::env::var("PHI_RACE_URL") else {
        return;
    };
    let owner = std::env::var("PHI_RACE_OWNER").expect("PHI_RACE_OWNER");
    let go_at: u128 = std::env::var("PHI_RACE_GO_AT").expect("go").parse().expect("millis");
    let store = Arc::new(phi::DieselKeyStore::<Conn>::builder(&url).run_migrations(true).connect().expect("store"));
    let keyring = Keyring::builder(store, common::local_kek()).build().expect("keyring");
    while std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis()
        < go_at
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    let sealed = keyring
        .seal(&format!("from {}", std::process::id()), &owner, TEXT, b"row")
        .expect("seal");
    let stats = keyring.stats();
    #[allow(clippy::print_stdout)]
    {
        println!("PHI_SEALED {}", hex::encode(sealed.as_bytes()));
        println!("PHI_CREATED {}", stats.creations);
    }
}

#[test]
fn two_processes_creating_the_first_key_end_with_one_row() {
    let db = TestDb::new();
    let owner = common::unique_owner("race-procs");
    let go_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis()
        + 1_500;
    let test_name = format!(
        "{}::race_child_seals_for_a_new_owner",
        module_path!().split_once("::").expect("module path").1
    );
    let children: Vec<_> = (0..2)
        .map(|_| {
            std::process::Command::new(std::env::current_exe().expect("test binary"))
                .args(["--exact", &test_name, "--ignored", "--nocapture", "--test-threads=1"])
                .env("PHI_RACE_URL", &db.url)
                .env("PHI_RACE_OWNER", &owner)
                .env("PHI_RACE_GO_AT", go_at.to_string())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("child starts")
        })
        .collect();
    let mut sealed = Vec::new();
    let mut created = 0;
    let mut outputs = Vec::new();
    for child in children {
        let out = child.wait_with_output().expect("child output");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        outputs.push(stdout.clone());
        assert!(out.status.success(), "child failed: {stdout}");
        for line in stdout.lines() {
            // libtest prints the test's name on the same line as its first output.
            if let Some((_, hex)) = line.split_once("PHI_SEALED ") {
                sealed.push((hex::decode(hex.trim()).expect("hex"), line.to_owned()));
            }
            if let Some((_, n)) = line.split_once("PHI_CREATED ") {
                created += n.trim().parse::<u32>().expect("count");
            }
        }
    }
    assert_eq!(sealed.len(), 2, "both children sealed a value: {outputs:?}");
    assert_eq!(created, 1, "exactly one child's key won");
    let mut conn = db.conn();
    assert_eq!(key_rows(&mut conn, &owner), 1, "exactly one data key row");
    let keyring = db.keyring();
    for (bytes, line) in sealed {
        let value: String = keyring
            .open(Encrypted::from_bytes(bytes), &owner, TEXT, b"row")
            .unwrap_or_else(|e| panic!("value sealed by a child ({line}) does not open: {e}"));
        assert!(value.starts_with("from "));
    }
}

#[test]
fn sixty_four_threads_missing_one_cold_owner_cause_one_unwrap() {
    let db = TestDb::new();
    let owner = common::unique_owner("single-flight");
    let sealed = db.keyring().seal(&"Doe".to_string(), &owner, TEXT, b"r").expect("seal");

    let kek = common::CountingKek::new(common::local_kek(), Duration::from_millis(100));
    let keyring = Keyring::builder(db.store(), kek.clone()).build().expect("keyring");
    let barrier = Barrier::new(64);
    std::thread::scope(|s| {
        for _ in 0..64 {
            s.spawn(|| {
                barrier.wait();
                let value: String = keyring.open(sealed.clone(), &owner, TEXT, b"r").expect("opens");
                assert_eq!(value, "Doe");
            });
        }
    });
    assert_eq!(kek.unwraps(), 1, "one KEK unwrap for 64 concurrent misses");
    let stats = keyring.stats();
    assert_eq!(stats.unwraps, 1);
    assert_eq!(stats.hits + stats.misses, 64);
}

#[test]
fn ttl_expiry_and_clear_force_a_new_unwrap() {
    let db = TestDb::new();
    let owner = common::unique_owner("ttl");
    let sealed = db.keyring().seal(&"Doe".to_string(), &owner, TEXT, b"r").expect("seal");
    let clock = Arc::new(ManualClock::new());
    let kek = common::CountingKek::new(common::local_kek(), Duration::ZERO);
    let keyring = Keyring::builder(db.store(), kek.clone())
        .ttl(Duration::from_secs(60))
        .clock(clock.clone())
        .build()
        .expect("keyring");
    let open = |k: &Keyring| -> String { k.open(sealed.clone(), &owner, TEXT, b"r").expect("opens") };

    open(&keyring);
    open(&keyring);
    assert_eq!(kek.unwraps(), 1, "second open is a cache hit");
    clock.advance(Duration::from_secs(59));
    open(&keyring);
    assert_eq!(kek.unwraps(), 1, "still within the TTL");
    clock.advance(Duration::from_secs(2));
    open(&keyring);
    assert_eq!(kek.unwraps(), 2, "expired after the TTL");
    assert_eq!(keyring.stats().expirations, 1);
    assert!(keyring.clear(&owner));
    open(&keyring);
    assert_eq!(kek.unwraps(), 3, "clear(owner) forces an unwrap");
    keyring.clear_all();
    assert_eq!(keyring.stats().cached_owners, 0);
    open(&keyring);
    assert_eq!(kek.unwraps(), 4, "clear_all forces an unwrap");
}

#[test]
fn resolving_many_cold_owners_sends_one_key_store_query() {
    let db = TestDb::new();
    let seeding = db.keyring();
    let owners: Vec<String> = (0..100).map(|i| common::unique_owner(&format!("batch{i}"))).collect();
    let sealed: Vec<Encrypted<String>> = owners
        .iter()
        .map(|o| seeding.seal(&format!("patient of {o}"), o, TEXT, b"").expect("seal"))
        .collect();

    let store = common::CountingStore::new(db.store());
    let kek = common::CountingKek::new(common::local_kek(), Duration::ZERO);
    let keyring = Keyring::builder(store.clone(), kek.clone()).build().expect("keyring");
    let keys = keyring
        .keys_for_open_many(owners.iter().map(String::as_str).chain(owners.iter().map(String::as_str)))
        .expect("resolve");
    assert_eq!(keys.len(), 100);
    assert_eq!(store.loads(), 1, "one key-store query for 100 misses");
    assert_eq!(kek.unwraps(), 100, "one unwrap per owner");
    for ((owner, value), o) in owners.iter().zip(sealed).zip(&owners) {
        assert_eq!(keys[owner].open(value, TEXT, b"").expect("opens"), format!("patient of {o}"));
    }
    keyring.keys_for_open_many(owners.iter().map(String::as_str)).expect("warm");
    assert_eq!((store.loads(), kek.unwraps()), (1, 100), "warm cache: no query, no unwrap");
}

#[test]
fn key_operations_are_audited_without_key_material() {
    let db = TestDb::new();
    let owner = common::unique_owner("audit");
    let sealed = db.keyring().seal(&"Doe".to_string(), &owner, TEXT, b"r").expect("seal");
    let _: String = db.keyring().open(sealed, &owner, TEXT, b"r").expect("opens");
    let mut conn = db.conn();
    type AuditRow = (String, Option<i64>, Option<String>, String, Option<String>);
    let rows: Vec<AuditRow> = encryption_key_audit::table
        .filter(encryption_key_audit::owner_id.eq(&owner))
        .order(encryption_key_audit::id)
        .select((
            encryption_key_audit::action,
            encryption_key_audit::key_version,
            encryption_key_audit::kek_id,
            encryption_key_audit::actor,
            encryption_key_audit::detail,
        ))
        .load(&mut conn)
        .expect("audit rows");
    let actions: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(actions, ["generate", "unwrap"]);
    for (_, version, kek, actor, detail) in &rows {
        assert_eq!((*version, kek.as_deref(), actor.as_str()), (Some(1), Some("local-test"), "integration-test"));
        assert!(detail.is_none());
    }
}

#[test]
fn an_older_kek_still_unwraps_and_a_missing_one_is_named() {
    let db = TestDb::new();
    let owner = common::unique_owner("kek-rotation");
    let sealed = db.keyring().seal(&"Doe".to_string(), &owner, TEXT, b"r").expect("seal");
    let new_kek = Arc::new(phi::LocalKek::new("local-next", &phi::KeyBytes::new([42; 32])));

    let rotating = Keyring::builder(db.store(), new_kek.clone())
        .unwrap_with(common::local_kek())
        .build()
        .expect("keyring");
    let value: String = rotating.open(sealed.clone(), &owner, TEXT, b"r").expect("old KEK unwraps");
    assert_eq!(value, "Doe");
    // New owners get keys wrapped by the new primary KEK.
    let fresh = common::unique_owner("kek-rotation-new");
    rotating.seal(&"Roe".to_string(), &fresh, TEXT, b"r").expect("seal");
    let mut conn = db.conn();
    let kek_id: String = user_encryption_keys::table
        .filter(user_encryption_keys::owner_id.eq(&fresh))
        .select(user_encryption_keys::kek_id)
        .first(&mut conn)
        .expect("row");
    assert_eq!(kek_id, "local-next");

    let without_old = Keyring::builder(db.store(), new_kek).build().expect("keyring");
    let err = without_old.open(sealed, &owner, TEXT, b"r").expect_err("old KEK missing");
    assert!(matches!(err, Error::UnknownKek { ref kek_id, .. } if kek_id == "local-test"), "{err:?}");
    assert!(err.to_string().contains(&owner));
}

#[test]
fn a_wrong_master_key_is_refused_at_build_and_a_bad_wrap_names_the_owner() {
    let db = TestDb::new();
    let owner = common::unique_owner("wrong-master");
    let keyring = db.keyring();
    let sealed = keyring.seal(&"Doe".to_string(), &owner, TEXT, b"r").expect("seal");
    let impostor: Arc<dyn KeyEncryptionKey> =
        Arc::new(phi::LocalKek::new("local-test", &phi::KeyBytes::new([0xEE; 32])));
    let err = Keyring::builder(db.store(), impostor).build().expect_err("wrong master key");
    assert!(matches!(err, Error::KekMismatch { ref kek_id, .. } if kek_id == "local-test"), "{err:?}");

    // A stored wrap that does not open (altered bytes) fails naming the
    // owner, the version and the KEK, and is not cached.
    let mut conn = db.conn();
    diesel::update(user_encryption_keys::table.filter(user_encryption_keys::owner_id.eq(&owner)))
        .set(user_encryption_keys::wrapped_key.eq(vec![0u8; 60]))
        .execute(&mut conn)
        .expect("alter the wrap");
    keyring.clear(&owner);
    let err = keyring.open(sealed, &owner, TEXT, b"r").expect_err("altered wrap");
    assert!(matches!(err, Error::Kek { key_version: 1, .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&owner) && message.contains("local-test"), "{message}");
    // A failed resolution is not cached: nothing half-built lingers.
    assert_eq!(keyring.stats().cached_owners, 0);
}

#[test]
fn the_key_store_lists_owners_and_warm_all_fills_the_cache() {
    let db = TestDb::new();
    let owner = common::unique_owner("warm");
    db.keyring().seal(&"Doe".to_string(), &owner, TEXT, b"r").expect("seal");
    let store = db.store();
    assert!(store.owners().expect("owners").contains(&owner));
    let keyring = db.keyring();
    let report = keyring.warm_all().expect("warm");
    assert!(report.warmed >= 1);
    // On a shared server other tests' owners may use KEKs this keyring lacks:
    // those are reported, never fatal, and never this owner.
    assert!(report.failures.iter().all(|(o, _)| *o != owner), "{:?}", report.failures);
    let before = keyring.stats().unwraps;
    keyring.keys_for_open(&owner).expect("keys");
    assert_eq!(keyring.stats().unwraps, before, "warm owner is a cache hit");
}

mod derive {
    use super::*;
    include!("derive.rs");

    /// Reads never wait on the key store's lock; unknown key versions.
    mod reads {
        use super::*;
        include!("reads.rs");
    }
}

/// UUID owners and row keys, UTC timestamps, JSON values; sealed structs
/// with `Identifiable` and `Associations`.
#[cfg(all(feature = "uuid", feature = "serde_json"))]
mod types {
    use super::*;
    include!("types.rs");
}

/// Backfill, verify and decrypt-back on tables written before phi.
mod migrate {
    use super::*;
    include!("migrate.rs");
}

/// Adopting phi end to end with generated schema migrations, both
/// strategies.
mod adopt {
    use super::*;
    include!("adopt.rs");
}

/// The dual-write phase: shadow columns beside the plaintext columns.
mod shadow {
    use super::*;
    include!("shadow.rs");
}

/// Legacy ciphertexts imported, strict mode, the database's guard.
mod legacy {
    use super::*;
    include!("legacy.rs");
}

/// Lookup indexes: finding a record without knowing its owner.
mod lookup {
    use super::*;
    include!("lookup.rs");
}

mod search {
    use super::*;
    include!("search.rs");
}

/// Guarded updates racing backfill, decrypt-back and other writers.
mod guarded {
    use super::*;
    include!("guarded.rs");
}

/// The key life cycle: rotation, re-seal, retirement, rewrap, shredding.
mod lifecycle {
    use super::*;
    include!("lifecycle.rs");

    /// Rotation of many owners as one job shared by several workers.
    mod rotate_all {
        use super::*;
        include!("rotate_all.rs");
    }
}

/// The key store's connection, with and without phi's migrations.
mod key_store {
    use super::*;
    include!("key_store.rs");
}

/// The application owns the schema: phi's migrations written into its
/// own, the check on connect, tables of phi's names that are not phi's.
mod schema {
    use super::*;
    include!("schema.rs");
}

/// Owner ids compared byte for byte; whitespace refused or taken as is.
mod owner_ids {
    use super::*;
    include!("owner_ids.rs");
}

/// KEK check values: a wrong key under a KEK id is refused.
mod kek_check {
    use super::*;
    include!("kek_check.rs");
}

/// The key-event feed and the fleet roll-out, within one process.
mod fleet {
    use super::*;
    include!("fleet.rs");
}

/// Rotation racing a shred; the rotation policy, seal counts, keys due.
mod due {
    use super::*;
    include!("due.rs");
}

/// The admin HTTP API: every route, its guard, its audit records.
#[cfg(feature = "admin-http")]
mod admin_http {
    use super::*;
    include!("admin.rs");
}

/// The access log: accessors, strict mode, a refusing log, tracing events.
mod access {
    use super::*;
    include!("access.rs");
}

/// The durable access log: chained batches, verification, queries, prune.
mod access_log_store {
    use super::*;
    include!("access_log.rs");
}
