//! An SQLite application that opens its connection as Diesel does by
//! default (`SqliteConnection::establish`, no busy timeout) while phi
//! writes into the same file from connections of its own (the key store,
//! the keyring's background audit writer): phi's jobs give the
//! application's connection a busy timeout when it has none, so a
//! statement that meets phi's write lock waits for it instead of failing
//! with "database is locked".
#![cfg(feature = "sqlite")]

mod common;

use std::sync::{Arc, mpsc};
use std::time::Duration;

use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use phi::migrate::{self, BackfillOptions};
use phi::{DieselKeyStore, Keyring, PhiRecord, Updated};

mod schema {
    //! The test table.
    #![allow(missing_docs)]
    diesel::table! {
        lock_cases (case_id) {
            case_id -> Text,
            user_id -> Text,
            patient_last -> Binary,
            phi_encrypted -> Bool,
        }
    }
}
use schema::lock_cases;

#[derive(PhiRecord, Clone, PartialEq)]
#[phi(table = lock_cases, crate = phi, debug)]
#[diesel(primary_key(case_id))]
struct Case {
    #[phi(row_key)]
    case_id: String,
    #[phi(owner)]
    user_id: String,
    #[phi(encrypt)]
    patient_last: String,
    #[phi(encrypted_flag)]
    phi_encrypted: bool,
}

const OWNERS: usize = 12;
const ROWS_PER_OWNER: usize = 5;

/// A database file with phi's tables and `lock_cases` holding plain rows
/// (flag off) of several owners; the application's connection, opened
/// the default way.
fn database(dir: &tempfile::TempDir) -> (String, SqliteConnection) {
    let url = dir.path().join("clinic.db").display().to_string();
    let mut conn = SqliteConnection::establish(&url).expect("open");
    conn.batch_execute(
        "CREATE TABLE lock_cases (case_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, \
         patient_last BLOB NOT NULL, phi_encrypted BOOLEAN NOT NULL DEFAULT 0)",
    )
    .expect("create");
    for o in 0..OWNERS {
        for r in 0..ROWS_PER_OWNER {
            diesel::sql_query(format!(
                "INSERT INTO lock_cases VALUES ('C-{o}-{r}', 'dr-{o}', CAST('Doe {r}' AS BLOB), 0)"
            ))
            .execute(&mut conn)
            .expect("insert");
        }
    }
    (url, conn)
}

/// [`database`] with phi's tables (its migrations run) and its key store.
fn database_with_store(
    dir: &tempfile::TempDir,
) -> (
    String,
    SqliteConnection,
    Arc<DieselKeyStore<SqliteConnection>>,
) {
    let (url, conn) = database(dir);
    let store = DieselKeyStore::<SqliteConnection>::builder(&url)
        .run_migrations(true)
        .connect()
        .expect("store");
    (url, conn, Arc::new(store))
}

fn keyring(store: &Arc<DieselKeyStore<SqliteConnection>>) -> Keyring {
    Keyring::builder(store.clone(), common::local_kek())
        .without_feed()
        .build()
        .expect("keyring")
}

/// `PRAGMA busy_timeout` of `conn`, in milliseconds.
fn busy_timeout(conn: &mut SqliteConnection) -> u32 {
    phi::sqlite::busy_timeout(conn).expect("busy timeout")
}

/// Marks each of `cases` "(checked)" with a guarded update while the
/// keyring's writer records its key events, then loads the rows whose id
/// is `LIKE ids` again and finds each sealed and marked.
fn check_each(
    run: usize,
    ids: &str,
    cases: &[Case],
    keyring: &Keyring,
    conn: &mut SqliteConnection,
) {
    for old in cases {
        let mut new = old.clone();
        new.patient_last = format!("{} (checked)", old.patient_last);
        let outcome = new
            .update(old, keyring, conn)
            .unwrap_or_else(|e| panic!("run {run}: update of {}: {e}", old.case_id));
        assert!(
            matches!(outcome, Updated::Applied { sealed: true }),
            "{outcome:?}"
        );
    }
    keyring.flush_audit().expect("every key event recorded");
    let query = lock_cases::table.filter(lock_cases::case_id.like(ids));
    let after = Case::load(query, conn, keyring).expect("load after");
    assert_eq!(after.len(), cases.len());
    assert!(
        after
            .iter()
            .all(|c| c.phi_encrypted && c.patient_last.ends_with("(checked)"))
    );
}

/// The README's first program, 20 times: load, backfill, guarded updates,
/// on a connection opened the default way, while a keyring's background
/// writer records the unwraps of a fresh cache. Each run must succeed.
#[test]
fn load_backfill_and_guarded_updates_on_a_default_connection_never_meet_a_locked_database() {
    for run in 0..20 {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (_url, mut conn, store) = database_with_store(&dir);
        assert_eq!(
            busy_timeout(&mut conn),
            0,
            "Diesel's default: no busy timeout"
        );

        // Load (plain rows), then backfill: every owner gets a data key.
        let sealing = keyring(&store);
        let before = Case::load(lock_cases::table, &mut conn, &sealing).expect("load");
        let report =
            migrate::backfill::<Case, _>(&mut conn, &sealing, &BackfillOptions::default().batch(7))
                .unwrap_or_else(|e| panic!("run {run}: backfill: {e}"));
        assert_eq!(
            (report.rows, report.remaining),
            ((OWNERS * ROWS_PER_OWNER) as u64, 0)
        );
        assert_eq!(
            busy_timeout(&mut conn),
            10_000,
            "run {run}: the backfill gave the connection a busy timeout"
        );

        // Another process's keyring, fresh: its load unwraps every owner's
        // key, and its writer records those unwraps while the updates run.
        let reading = keyring(&store);
        let cases = Case::load(lock_cases::table, &mut conn, &reading).expect("load sealed");
        assert_eq!(cases.len(), before.len());
        check_each(run, "C-%", &cases, &reading, &mut conn);
    }
}

/// Another connection holds a lock on the file when the backfill starts:
/// a statement of a connection without a busy timeout fails at once, and
/// the backfill on such a connection waits for the lock and succeeds.
#[test]
fn a_backfill_on_a_default_connection_waits_for_another_connections_lock() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (url, _conn, store) = database_with_store(&dir);
    let keyring = keyring(&store);
    under_an_exclusive_lock(&url, |conn| {
        let report = migrate::backfill::<Case, _>(conn, &keyring, &BackfillOptions::default())
            .expect("the backfill waits for the lock");
        assert_eq!(report.remaining, 0, "{report}");
    });
}

/// A busy timeout the application chose is left as it is.
#[test]
fn a_busy_timeout_the_application_set_is_kept() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (url, mut conn) = database(&dir);
    conn.batch_execute("PRAGMA busy_timeout = 30000")
        .expect("choose");
    let store = Arc::new(
        DieselKeyStore::<SqliteConnection>::builder(&url)
            .run_migrations(true)
            .connect()
            .expect("store"),
    );
    let keyring = keyring(&store);
    migrate::backfill::<Case, _>(&mut conn, &keyring, &BackfillOptions::default())
        .expect("backfill");
    assert_eq!(busy_timeout(&mut conn), 30_000);
}

/// Runs `operation` on a connection opened the default way while another
/// connection holds an exclusive lock on the file (no reader or writer
/// gets in), released a moment after `operation` starts: a plain
/// statement of a default connection fails at once on that lock, the
/// operation waits for it.
fn under_an_exclusive_lock(url: &str, operation: impl FnOnce(&mut SqliteConnection)) {
    let (locked_tx, locked) = mpsc::channel();
    let (release_tx, release) = mpsc::channel::<()>();
    let holder_url = url.to_owned();
    let holder = std::thread::spawn(move || {
        let mut holder = SqliteConnection::establish(&holder_url).expect("open");
        holder
            .batch_execute("BEGIN EXCLUSIVE")
            .expect("exclusive lock");
        locked_tx.send(()).expect("signal");
        release.recv().expect("release");
        std::thread::sleep(Duration::from_millis(300));
        holder.batch_execute("COMMIT").expect("commit");
    });
    locked.recv().expect("locked");

    let mut other = SqliteConnection::establish(url).expect("open");
    let error = other
        .batch_execute("SELECT count(*) FROM lock_cases")
        .expect_err("a default connection meets the lock");
    assert!(error.to_string().contains("database is locked"), "{error}");

    let mut conn = SqliteConnection::establish(url).expect("open");
    assert_eq!(busy_timeout(&mut conn), 0);
    release_tx.send(()).expect("release");
    operation(&mut conn);
    holder.join().expect("holder");
    assert_eq!(busy_timeout(&mut conn), 10_000);
}

/// The derive's `insert`, `insert_all` and `update`, and `load`, on a
/// connection opened the default way, each meeting another connection's
/// lock: each waits for it instead of failing with "database is locked".
#[test]
fn generated_writes_and_loads_on_a_default_connection_wait_for_a_lock() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (url, _conn, store) = database_with_store(&dir);
    let keyring = keyring(&store);
    let case = |id: &str| Case {
        case_id: id.to_owned(),
        user_id: "dr-new".to_owned(),
        patient_last: "Roe".to_owned(),
        phi_encrypted: true,
    };
    // Its key first: the key store's own writes are not under test here.
    keyring.keys_for_seal("dr-new").expect("key");

    under_an_exclusive_lock(&url, |conn| {
        assert_eq!(case("N-1").insert(&keyring, conn).expect("insert waits"), 1);
    });
    under_an_exclusive_lock(&url, |conn| {
        let rows = [case("N-2"), case("N-3")];
        assert_eq!(
            Case::insert_all(&rows, &keyring, conn).expect("insert_all waits"),
            2
        );
    });
    under_an_exclusive_lock(&url, |conn| {
        let found = Case::load(
            lock_cases::table.filter(lock_cases::user_id.eq("dr-new")),
            conn,
            &keyring,
        )
        .expect("load waits");
        assert_eq!(found.len(), 3);
    });
    under_an_exclusive_lock(&url, |conn| {
        let old = case("N-1");
        let mut new = old.clone();
        new.patient_last = "Roe-Smith".to_owned();
        let outcome = new.update(&old, &keyring, conn).expect("update waits");
        assert!(
            matches!(outcome, Updated::Applied { sealed: true }),
            "{outcome:?}"
        );
    });
}

/// A program that never runs a job (insert for new owners, load, guarded
/// updates) on a connection opened the default way, 20 times, while the
/// keyring's background writer records each new key: every run succeeds.
#[test]
fn insert_load_and_update_on_a_default_connection_never_meet_a_locked_database() {
    for run in 0..20 {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (_url, mut conn, store) = database_with_store(&dir);
        let keyring = keyring(&store);
        for o in 0..OWNERS {
            for r in 0..ROWS_PER_OWNER {
                let case = Case {
                    case_id: format!("N-{o}-{r}"),
                    user_id: format!("dr-new-{o}"),
                    patient_last: format!("Roe {r}"),
                    phi_encrypted: true,
                };
                case.insert(&keyring, &mut conn)
                    .unwrap_or_else(|e| panic!("run {run}: insert of {}: {e}", case.case_id));
            }
        }
        let new_cases = lock_cases::table.filter(lock_cases::case_id.like("N-%"));
        let cases = Case::load(new_cases, &mut conn, &keyring)
            .unwrap_or_else(|e| panic!("run {run}: load: {e}"));
        assert_eq!(cases.len(), OWNERS * ROWS_PER_OWNER);
        check_each(run, "N-%", &cases, &keyring, &mut conn);
    }
}
