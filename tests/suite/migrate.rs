// Adopting phi on a table written before it: backfill, verify and
// decrypt-back. Included in `tests/suite/mod.rs`, so `Conn`, `BLOB`,
// `server_url()` and `TestDb` are in scope. Each test owns its table (on a
// server, dropped and created again at its start).

use std::collections::BTreeSet;

use phi::migrate::{self, MigrateOptions, Migratable, VerifyOptions};
use phi::{PhiRecord, Rollout};

diesel::table! {
    phi_it_legacy (case_id) {
        case_id -> Varchar,
        user_id -> Varchar,
        patient_first -> Binary,
        patient_last -> Binary,
        patient_dob -> Binary,
        ins_provider -> Nullable<Binary>,
        status -> Varchar,
        phi_encrypted -> Bool,
        patient_last_bidx -> Nullable<Binary>,
    }
}

/// The clinical case again, on a table of its own.
#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(table = phi_it_legacy, crate = phi, debug)]
#[diesel(primary_key(case_id))]
struct Legacy {
    #[phi(row_key)]
    case_id: String,
    #[phi(owner)]
    user_id: String,
    #[phi(encrypt)]
    patient_first: String,
    #[phi(encrypt, blind_index = patient_last_bidx, normalize = "trim,lowercase")]
    patient_last: String,
    #[phi(encrypt)]
    patient_dob: NaiveDate,
    #[phi(encrypt)]
    ins_provider: Option<String>,
    status: String,
    #[phi(encrypted_flag)]
    phi_encrypted: bool,
}

diesel::table! {
    phi_it_legacy_int (id) {
        id -> BigInt,
        clinic_id -> Integer,
        note -> Nullable<Binary>,
        sealed -> SmallInt,
    }
}

/// Integer row key and owner, an integer flag.
#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(table = phi_it_legacy_int, crate = phi, debug)]
struct LegacyNote {
    #[phi(row_key)]
    id: i64,
    #[phi(owner)]
    clinic_id: i32,
    #[phi(encrypt)]
    note: Option<String>,
    #[phi(encrypted_flag)]
    sealed: i16,
}

fn recreate(conn: &mut Conn, table: &str, ddl: &str) {
    diesel::sql_query(format!("DROP TABLE IF EXISTS {table}"))
        .execute(conn)
        .expect("drop");
    diesel::sql_query(ddl).execute(conn).expect("create");
}

fn legacy_table(conn: &mut Conn) {
    let index = if BLOB == "BYTEA" { "BYTEA" } else if server_url().is_some() { "VARBINARY(16)" } else { "BLOB" };
    recreate(
        conn,
        "phi_it_legacy",
        &format!(
            "CREATE TABLE phi_it_legacy (case_id VARCHAR(64) NOT NULL PRIMARY KEY, user_id VARCHAR(255) NOT NULL, \
             patient_first {BLOB} NOT NULL, patient_last {BLOB} NOT NULL, patient_dob {BLOB} NOT NULL, \
             ins_provider {BLOB} NULL, status VARCHAR(32) NOT NULL, phi_encrypted BOOLEAN NOT NULL DEFAULT FALSE, \
             patient_last_bidx {index} NULL)"
        ),
    );
}

const LAST_NAMES: [&str; 6] = ["Doe", "García", "Nwosu", "Zhang", "Haddad-Ali", " O'Brien "];

fn legacy_case(owners: &[String], i: usize) -> Legacy {
    let small = |n: usize| u32::try_from(n).expect("small");
    Legacy {
        case_id: format!("L-{i:06}"),
        user_id: owners[i % owners.len()].clone(),
        patient_first: format!("Pat{i}"),
        patient_last: LAST_NAMES[i % LAST_NAMES.len()].to_owned(),
        patient_dob: NaiveDate::from_ymd_opt(1940 + small(i % 60).cast_signed(), 1 + small(i % 12), 1 + small(i % 28))
            .expect("date"),
        ins_provider: (!i.is_multiple_of(5)).then(|| format!("Insurer {}", i % 7)),
        status: "scheduled".to_owned(),
        phi_encrypted: false,
    }
}

/// Writes rows as a database that predates phi holds them: the plain
/// encoding of each field, the flag off, no blind index.
fn insert_legacy(conn: &mut Conn, db: &TestDb, rows: &[Legacy]) {
    let plain = db.keyring();
    plain.set_rollout(Rollout::Nobody);
    let stored = Legacy::seal_all(rows, &plain).expect("unsealed rows");
    for chunk in stored.chunks(100) {
        diesel::insert_into(phi_it_legacy::table)
            .values(chunk)
            .execute(conn)
            .expect("insert legacy rows");
    }
}

fn all_cases(conn: &mut Conn, keyring: &Keyring) -> Vec<Legacy> {
    Legacy::load(phi_it_legacy::table.order(phi_it_legacy::case_id), conn, keyring).expect("load all")
}

fn without_flag(mut cases: Vec<Legacy>) -> Vec<Legacy> {
    for c in &mut cases {
        c.phi_encrypted = false;
    }
    cases
}

fn count_flag(conn: &mut Conn, on: bool) -> i64 {
    phi_it_legacy::table
        .filter(phi_it_legacy::phi_encrypted.eq(on))
        .count()
        .get_result(conn)
        .expect("count")
}

fn raw(conn: &mut Conn, id: &str) -> (Vec<u8>, Option<Vec<u8>>) {
    phi_it_legacy::table
        .find(id)
        .select((phi_it_legacy::patient_last, phi_it_legacy::patient_last_bidx))
        .first(conn)
        .expect("raw row")
}

fn set_raw_first(conn: &mut Conn, id: &str, bytes: Vec<u8>) {
    diesel::update(phi_it_legacy::table.find(id))
        .set(phi_it_legacy::patient_first.eq(bytes))
        .execute(conn)
        .expect("raw update");
}

fn raw_first(conn: &mut Conn, id: &str) -> Vec<u8> {
    phi_it_legacy::table
        .find(id)
        .select(phi_it_legacy::patient_first)
        .first(conn)
        .expect("raw first")
}

#[test]
fn backfill_dry_run_crash_resume_verify_and_decrypt_back_keep_every_value() {
    let db = TestDb::new();
    let mut conn = db.conn();
    legacy_table(&mut conn);
    let owners: Vec<String> = (0..4).map(|i| common::unique_owner(&format!("legacy{i}"))).collect();
    let rows: Vec<Legacy> = (0..1203).map(|i| legacy_case(&owners, i)).collect();
    insert_legacy(&mut conn, &db, &rows);
    let keyring = db.keyring();
    let before = all_cases(&mut conn, &keyring);
    assert_eq!(before, rows, "legacy rows read back as written");
    let (plain, index) = raw(&mut conn, "L-000000");
    assert_eq!((plain, index), (b"Doe".to_vec(), None));

    // The description the derive generated.
    let t = Legacy::stored_table();
    assert_eq!((t.table, t.key_column, t.flag_column, t.columns.len()), ("phi_it_legacy", "case_id", "phi_encrypted", 4));
    assert_eq!(t.read_columns().last(), Some(&"patient_last_bidx"));

    // A value that does not decode: the dry run names it, the real run
    // stops at it without writing anything of its batch.
    set_raw_first(&mut conn, "L-000007", vec![0xC3, 0x28]);
    let dry = migrate::backfill::<Legacy, _>(&mut conn, &keyring, &MigrateOptions::default().batch(100).dry_run(true))
        .expect("dry run");
    assert_eq!((dry.rows, dry.undecodable, dry.owners, dry.new_owner_keys), (1202, 1, 4, 4), "{dry}");
    assert_eq!(dry.problems.len(), 1);
    let problem = dry.problems[0].to_string();
    assert!(problem.contains("phi_it_legacy.patient_first") && problem.contains("L-000007") && problem.contains(&owners[3]), "{problem}");
    assert_eq!(count_flag(&mut conn, true), 0, "a dry run writes nothing");
    for owner in &owners {
        assert!(keyring.store().load_keys(&[owner]).expect("keys").is_empty(), "a dry run creates no key");
    }
    let err = migrate::backfill::<Legacy, _>(&mut conn, &keyring, &MigrateOptions::default().batch(100))
        .expect_err("undecodable value");
    // The message and its causes (no message repeats its source).
    let msg = std::iter::successors(Some(&err as &dyn std::error::Error), |e| e.source()).map(|e| e.to_string()).collect::<Vec<_>>().join(": ");
    assert!(matches!(err, Error::DataTable { .. }), "{err:?}");
    assert!(msg.contains("phi_it_legacy.patient_first") && msg.contains(&owners[3]) && msg.contains("L-000007"), "{msg}");
    assert!(!msg.contains("Pat7"), "no plaintext in errors: {msg}");
    assert_eq!(count_flag(&mut conn, true), 0, "the failing batch was rolled back");
    set_raw_first(&mut conn, "L-000007", b"Pat7".to_vec());

    // A crash after two committed batches (the progress callback panics):
    // what was committed stays, every row still reads, and a second run
    // finishes the rest.
    let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut batches = 0;
        migrate::backfill::<Legacy, _>(&mut conn, &keyring, &MigrateOptions::default().batch(100).progress(|p| {
            batches += 1;
            assert!(p.done <= p.total);
            if batches == 2 {
                panic!("simulated crash");
            }
        }))
    }));
    assert!(crashed.is_err());
    let mut conn = db.conn();
    assert_eq!(count_flag(&mut conn, true), 200);
    assert_eq!(without_flag(all_cases(&mut conn, &keyring)), before, "a half-done backfill reads the same");

    let mut last = None;
    let report = migrate::backfill::<Legacy, _>(&mut conn, &keyring, &MigrateOptions::default().batch(100).progress(|p| last = Some(*p)))
        .expect("backfill resumes");
    assert_eq!((report.rows, report.remaining, report.skipped, report.batches), (1003, 0, 0, 11), "{report}");
    assert_eq!(report.values, 1003 * 3 + rows[200..].iter().filter(|r| r.ins_provider.is_some()).count() as u64);
    let last = last.expect("progress reported");
    assert_eq!((last.done, last.total), (1003, 1003));
    assert_eq!(count_flag(&mut conn, false), 0);
    let after = all_cases(&mut conn, &keyring);
    assert!(after.iter().all(|c| c.phi_encrypted));
    assert_eq!(without_flag(after), before, "every value survives the backfill");
    let (sealed, index) = raw(&mut conn, "L-000000");
    assert_eq!(&sealed[..2], &[0xF1, 0x01]);
    assert_eq!(index.map(|i| i.len()), Some(16));

    // Sealed exactly as the model seals: the blind index finds the case.
    let lookup = Legacy::patient_last_blind_index(&keyring, &owners[5 % 4], "o'brien").expect("index");
    let found = Legacy::load(
        phi_it_legacy::table
            .filter(phi_it_legacy::user_id.eq(&owners[5 % 4]))
            .filter(phi_it_legacy::patient_last_bidx.eq_any(lookup))
            .order(phi_it_legacy::case_id),
        &mut conn,
        &keyring,
    )
    .expect("lookup");
    let expected: Vec<&str> = rows
        .iter()
        .filter(|r| r.user_id == owners[1] && r.patient_last == " O'Brien ")
        .map(|r| r.case_id.as_str())
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(found.iter().map(|c| c.case_id.as_str()).collect::<Vec<_>>(), expected);

    // Nothing left: a third run does nothing.
    let again = migrate::backfill::<Legacy, _>(&mut conn, &keyring, &MigrateOptions::default()).expect("re-run");
    assert_eq!((again.rows, again.batches), (0, 0));

    // Verify: all pass; then one altered byte is reported at its row and
    // column, and only there.
    let ok = migrate::verify::<Legacy, _>(&mut conn, &keyring, &VerifyOptions::default()).expect("verify");
    assert!(ok.is_ok(), "{ok}");
    assert_eq!((ok.sealed, ok.unsealed, ok.sealed_total), (1203, 0, 1203));
    let good = raw_first(&mut conn, "L-000042");
    let mut bad = good.clone();
    let last_byte = bad.len() - 1;
    bad[last_byte] ^= 1;
    set_raw_first(&mut conn, "L-000042", bad);
    let report = migrate::verify::<Legacy, _>(&mut conn, &keyring, &VerifyOptions::default()).expect("verify");
    assert_eq!((report.failed, report.failures.len()), (1, 1), "{report}");
    let f = &report.failures[0];
    assert_eq!((f.table, f.column, f.row_key.as_str(), f.owner.as_str()), ("phi_it_legacy", "patient_first", "L-000042", owners[42 % 4].as_str()));
    let sampled = migrate::verify::<Legacy, _>(&mut conn, &keyring, &VerifyOptions::default().sample(50)).expect("sample");
    assert_eq!((sampled.sealed, sampled.unsealed), (50, 0));

    // The rollback stops at the altered value, its batch rolled back ...
    let err = migrate::decrypt_back::<Legacy, _>(&mut conn, &keyring, &MigrateOptions::default().batch(500))
        .expect_err("altered value");
    assert!(err.to_string().contains("phi_it_legacy.patient_first") && err.to_string().contains(&owners[2]), "{err}");
    assert_eq!(count_flag(&mut conn, false), 0);
    // ... and once repaired, turns every row back into its plain encoding.
    set_raw_first(&mut conn, "L-000042", good);
    let back = migrate::decrypt_back::<Legacy, _>(&mut conn, &keyring, &MigrateOptions::default().batch(500))
        .expect("decrypt back");
    assert_eq!((back.rows, back.remaining, back.batches), (1203, 0, 3), "{back}");
    assert_eq!(raw(&mut conn, "L-000000"), (b"Doe".to_vec(), None));
    assert_eq!(all_cases(&mut conn, &keyring), before);
    let unsealed = migrate::verify::<Legacy, _>(&mut conn, &keyring, &VerifyOptions::default()).expect("verify");
    assert!(unsealed.is_ok() && unsealed.unsealed == 1203 && unsealed.sealed == 0, "{unsealed}");
}

#[test]
fn concurrent_backfills_never_seal_a_row_twice() {
    let db = TestDb::new();
    let mut conn = db.conn();
    // A table of its own: the other migration test owns phi_it_legacy.
    diesel::sql_query("DROP TABLE IF EXISTS phi_it_legacy_int").execute(&mut conn).expect("drop");
    let flag = "SMALLINT NOT NULL DEFAULT 0";
    let ddl = format!(
        "CREATE TABLE phi_it_legacy_int (id BIGINT NOT NULL PRIMARY KEY, clinic_id INTEGER NOT NULL, note {BLOB} NULL, sealed {flag})"
    );
    diesel::sql_query(ddl).execute(&mut conn).expect("create");
    // Owner ids no earlier run against the same server used.
    let base = i32::try_from(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_micros() % 1_000_000_000,
    )
    .expect("fits");
    let clinics: Vec<i32> = (0..3).map(|i| base + i).collect();
    let notes: Vec<LegacyNote> = (0..1500i64)
        .map(|i| LegacyNote {
            id: i * 7 - 500,
            clinic_id: clinics[usize::try_from(i).expect("index") % 3],
            note: (i % 4 != 0).then(|| format!("note {i}")),
            sealed: 0,
        })
        .collect();
    let plain = db.keyring();
    plain.set_rollout(Rollout::Nobody);
    for chunk in LegacyNote::seal_all(&notes, &plain).expect("unsealed").chunks(100) {
        diesel::insert_into(phi_it_legacy_int::table).values(chunk).execute(&mut conn).expect("insert");
    }
    let keyring = db.keyring();
    let load = |conn: &mut Conn| {
        LegacyNote::load(phi_it_legacy_int::table.order(phi_it_legacy_int::id), conn, &keyring).expect("load")
    };
    let before = load(&mut conn);
    assert_eq!(before, notes);

    let reports: Vec<migrate::MigrationReport> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut conn = db.conn();
                    if server_url().is_none() {
                        // As an application sets it: wait for the other
                        // writer instead of failing at once.
                        diesel::sql_query("PRAGMA busy_timeout = 10000").execute(&mut conn).expect("busy timeout");
                    }
                    let keyring = db.keyring();
                    migrate::backfill::<LegacyNote, _>(&mut conn, &keyring, &MigrateOptions::default().batch(50))
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("no panic").expect("backfill")).collect()
    });
    let sealed: u64 = reports.iter().map(|r| r.rows).sum();
    assert_eq!(sealed, 1500, "{reports:?}");
    let after = load(&mut conn);
    assert!(after.iter().all(|n| n.sealed == 1));
    let mut unflagged = after.clone();
    for n in &mut unflagged {
        n.sealed = 0;
    }
    assert_eq!(unflagged, notes, "no value sealed twice or lost");
    let report = migrate::verify::<LegacyNote, _>(&mut conn, &keyring, &VerifyOptions::default()).expect("verify");
    assert!(report.is_ok() && report.sealed == 1500, "{report}");
    let versions: BTreeSet<String> = after.iter().map(|n| n.clinic_id.to_string()).collect();
    assert_eq!(versions.len(), 3);
}

diesel::table! {
    phi_it_canon (case_id) {
        case_id -> Varchar,
        user_id -> Varchar,
        patient_last -> Binary,
        patient_dob -> Binary,
        seen_at -> Nullable<Binary>,
        phi_encrypted -> Bool,
        patient_last_bidx -> Nullable<Binary>,
        patient_dob_bidx -> Nullable<Binary>,
    }
}

/// Blind indexes on a normalised text field and on a date.
#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(table = phi_it_canon, crate = phi, debug)]
#[diesel(primary_key(case_id))]
struct Canon {
    #[phi(row_key)]
    case_id: String,
    #[phi(owner)]
    user_id: String,
    #[phi(encrypt, blind_index = patient_last_bidx, normalize = "trim,lowercase")]
    patient_last: String,
    #[phi(encrypt, blind_index = patient_dob_bidx)]
    patient_dob: NaiveDate,
    #[phi(encrypt)]
    seen_at: Option<NaiveDateTime>,
    #[phi(encrypted_flag)]
    phi_encrypted: bool,
}

const CANON_DOB: &str = "phi_it_canon.patient_dob";

fn canon_table(conn: &mut Conn) {
    let index = if BLOB == "BYTEA" { "BYTEA" } else if server_url().is_some() { "VARBINARY(16)" } else { "BLOB" };
    recreate(
        conn,
        "phi_it_canon",
        &format!(
            "CREATE TABLE phi_it_canon (case_id VARCHAR(64) NOT NULL PRIMARY KEY, user_id VARCHAR(255) NOT NULL, \
             patient_last {BLOB} NOT NULL, patient_dob {BLOB} NOT NULL, seen_at {BLOB} NULL, \
             phi_encrypted BOOLEAN NOT NULL DEFAULT FALSE, patient_last_bidx {index} NULL, patient_dob_bidx {index} NULL)"
        ),
    );
}

/// A row as a database that predates phi may hold it: whatever bytes the
/// old application wrote, the flag off.
fn legacy_canon(id: &str, owner: &str, last: &str, dob: &str, seen: Option<&str>) -> CanonSealed {
    CanonSealed {
        case_id: id.to_owned(),
        user_id: owner.to_owned(),
        patient_last: Encrypted::from_bytes(last.as_bytes().to_vec()),
        patient_dob: Encrypted::from_bytes(dob.as_bytes().to_vec()),
        seen_at: seen.map(|s| Encrypted::from_bytes(s.as_bytes().to_vec())),
        phi_encrypted: false,
        patient_last_bidx: None,
        patient_dob_bidx: None,
    }
}

/// The case ids of `owner` an application lookup finds.
fn find_canon(conn: &mut Conn, keyring: &Keyring, owner: &str, last: Option<&str>, dob: Option<NaiveDate>) -> Vec<String> {
    let mut query = phi_it_canon::table.filter(phi_it_canon::user_id.eq(owner)).into_boxed();
    if let Some(last) = last {
        let lookup = Canon::patient_last_blind_index(keyring, owner, last).expect("index");
        query = query.filter(phi_it_canon::patient_last_bidx.eq_any(lookup));
    }
    if let Some(dob) = dob {
        let lookup = Canon::patient_dob_blind_index(keyring, owner, &dob).expect("index");
        query = query.filter(phi_it_canon::patient_dob_bidx.eq_any(lookup));
    }
    Canon::load(query.order(phi_it_canon::case_id), conn, keyring)
        .expect("lookup")
        .into_iter()
        .map(|c| c.case_id)
        .collect()
}

/// The plaintext bytes sealed in a column of a row.
fn opened_raw(conn: &mut Conn, keyring: &Keyring, id: &str, owner: &str) -> (Vec<u8>, Option<Vec<u8>>) {
    let (dob, seen): (Vec<u8>, Option<Vec<u8>>) = phi_it_canon::table
        .find(id)
        .select((phi_it_canon::patient_dob, phi_it_canon::seen_at))
        .first(conn)
        .expect("raw row");
    let open = |bytes: Vec<u8>, scope: &str| -> Vec<u8> {
        keyring.open(Encrypted::<Vec<u8>>::from_bytes(bytes), owner, scope, id.as_bytes()).expect("opens")
    };
    (open(dob, CANON_DOB), seen.map(|s| open(s, "phi_it_canon.seen_at")))
}

#[test]
fn backfill_seals_canonical_values_and_lookups_find_them() {
    let db = TestDb::new();
    let mut conn = db.conn();
    canon_table(&mut conn);
    let (me, other) = (common::unique_owner("canon"), common::unique_owner("canon-other"));
    let legacy = [
        legacy_canon("C-1", &me, " Doe ", "1980-1-15", Some("1980-01-15T08:30:00.000")),
        legacy_canon("C-2", &me, "DOE", "1980-01-15", None),
        legacy_canon("C-3", &me, "doe", "1980-1-15 ", Some("1980-01-15T08:30:00")),
        legacy_canon("C-4", &me, "Roe", "1975-12-01", None),
        legacy_canon("C-5", &other, " doe", "1980-1-15", None),
    ];
    diesel::insert_into(phi_it_canon::table).values(&legacy[..]).execute(&mut conn).expect("legacy rows");
    let keyring = db.keyring();
    let dob = NaiveDate::from_ymd_opt(1980, 1, 15).expect("date");
    let before = Canon::load(phi_it_canon::table.order(phi_it_canon::case_id), &mut conn, &keyring).expect("legacy rows read");
    assert_eq!((before[0].patient_last.as_str(), before[0].patient_dob, before[2].patient_dob), (" Doe ", dob, dob));

    // Verify reads the legacy rows: all decode, three of them hold values
    // not in canonical form (a notice, not a failure).
    let checked = migrate::verify::<Canon, _>(&mut conn, &keyring, &VerifyOptions::default()).expect("verify");
    assert!(checked.is_ok(), "{checked}");
    assert_eq!((checked.unsealed, checked.not_canonical, checked.problems_found), (5, 3, 4), "{checked}");
    assert!(checked.failures.iter().all(|f| f.kind == migrate::ProblemKind::NotCanonical), "{checked}");
    let listed: BTreeSet<(&str, &str)> = checked.failures.iter().map(|f| (f.row_key.as_str(), f.column)).collect();
    assert_eq!(
        listed,
        BTreeSet::from([("C-1", "patient_dob"), ("C-1", "seen_at"), ("C-3", "patient_dob"), ("C-5", "patient_dob")])
    );
    assert!(checked.to_string().contains("3 row(s) hold values not in canonical form"), "{checked}");
    // No value in the report (the owner ids carry digits of their own).
    let report = checked.to_string();
    assert!(!report.contains("1980-1-15") && !report.contains("1980-01-15"), "no value in the report: {checked}");

    let dry = migrate::backfill::<Canon, _>(&mut conn, &keyring, &MigrateOptions::default().dry_run(true))
        .expect("dry run");
    assert_eq!((dry.rows, dry.undecodable, dry.reencoded), (5, 0, 4), "{dry}");
    let report = migrate::backfill::<Canon, _>(&mut conn, &keyring, &MigrateOptions::default().batch(2))
        .expect("backfill");
    assert_eq!((report.rows, report.remaining, report.reencoded), (5, 0, 4), "{report}");
    assert!(report.to_string().contains("Re-encoded 4 value(s)"), "{report}");

    // Sealed in canonical form: the bytes the model itself would seal.
    assert_eq!(opened_raw(&mut conn, &keyring, "C-1", &me), (b"1980-01-15".to_vec(), Some(b"1980-01-15T08:30:00".to_vec())));
    assert_eq!(opened_raw(&mut conn, &keyring, "C-3", &me).0, b"1980-01-15");
    // Text is not altered: the padded name reads back padded.
    let after = Canon::load(phi_it_canon::table.order(phi_it_canon::case_id), &mut conn, &keyring).expect("load");
    assert!(after.iter().all(|c| c.phi_encrypted));
    assert_eq!(after.iter().map(|c| Canon { phi_encrypted: false, ..c.clone() }).collect::<Vec<_>>(), before);

    // The application's lookups find the backfilled rows.
    let ids = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(find_canon(&mut conn, &keyring, &me, Some("doe"), None), ids(&["C-1", "C-2", "C-3"]));
    assert_eq!(find_canon(&mut conn, &keyring, &me, Some("  DOE "), Some(dob)), ids(&["C-1", "C-2", "C-3"]));
    assert_eq!(find_canon(&mut conn, &keyring, &me, None, Some(dob)), ids(&["C-1", "C-2", "C-3"]));
    assert_eq!(find_canon(&mut conn, &keyring, &other, Some("Doe"), Some(dob)), ids(&["C-5"]));
    let roe = NaiveDate::from_ymd_opt(1975, 12, 1).expect("date");
    assert_eq!(find_canon(&mut conn, &keyring, &me, Some("roe"), Some(roe)), ids(&["C-4"]));

    let checked = migrate::verify::<Canon, _>(&mut conn, &keyring, &VerifyOptions::default()).expect("verify");
    assert!(checked.is_ok() && checked.sealed == 5 && checked.not_canonical == 0, "{checked}");

    // A row sealed as an earlier backfill did: the legacy bytes as they
    // were, indexed as they were. Verify recomputes the index from the
    // decoded value and reports both.
    let keys = keyring.keys_for_seal(&me).expect("keys");
    let old_form = b"1975-12-1".to_vec();
    diesel::update(phi_it_canon::table.find("C-4"))
        .set((
            phi_it_canon::patient_dob.eq(keys.seal(&old_form, CANON_DOB, b"C-4").expect("seal").into_bytes()),
            phi_it_canon::patient_dob_bidx.eq(Some(keys.blind_index(CANON_DOB, &old_form, phi::blind::Normalize::NONE).expect("index"))),
        ))
        .execute(&mut conn)
        .expect("old-style row");
    assert!(find_canon(&mut conn, &keyring, &me, None, Some(roe)).is_empty(), "the old index is not found");
    let checked = migrate::verify::<Canon, _>(&mut conn, &keyring, &VerifyOptions::default()).expect("verify");
    assert_eq!((checked.failed, checked.not_canonical), (1, 1), "{checked}");
    let kinds: BTreeSet<(&str, &str)> = checked
        .failures
        .iter()
        .map(|f| {
            assert_eq!((f.row_key.as_str(), f.owner.as_str()), ("C-4", me.as_str()));
            let kind = match f.kind {
                migrate::ProblemKind::NotCanonical => "not canonical",
                migrate::ProblemKind::BlindIndex => "index",
                _ => "other",
            };
            (f.column, kind)
        })
        .collect();
    assert_eq!(kinds, BTreeSet::from([("patient_dob", "not canonical"), ("patient_dob_bidx", "index")]));

    // Decrypt-back writes the canonical form, and a new backfill indexes it.
    let back = migrate::decrypt_back::<Canon, _>(&mut conn, &keyring, &MigrateOptions::default())
        .expect("decrypt back");
    assert_eq!((back.rows, back.reencoded), (5, 1), "{back}");
    let plain_dob = |conn: &mut Conn, id: &str| -> Vec<u8> {
        phi_it_canon::table.find(id).select(phi_it_canon::patient_dob).first(conn).expect("raw")
    };
    assert_eq!((plain_dob(&mut conn, "C-1"), plain_dob(&mut conn, "C-4")), (b"1980-01-15".to_vec(), b"1975-12-01".to_vec()));
    let checked = migrate::verify::<Canon, _>(&mut conn, &keyring, &VerifyOptions::default()).expect("verify");
    assert!(checked.is_ok() && checked.not_canonical == 0 && checked.unsealed == 5, "{checked}");
    migrate::backfill::<Canon, _>(&mut conn, &keyring, &MigrateOptions::default()).expect("backfill");
    assert_eq!(find_canon(&mut conn, &keyring, &me, Some("roe"), Some(roe)), ids(&["C-4"]));
}

diesel::table! {
    phi_it_pass (id) {
        id -> BigInt,
        owner_id -> Varchar,
        note -> Binary,
        sealed -> Bool,
    }
}

/// A table of its own for the backfill's passes.
#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(table = phi_it_pass, crate = phi, debug)]
struct PassNote {
    #[phi(row_key)]
    id: i64,
    #[phi(owner)]
    owner_id: String,
    #[phi(encrypt)]
    note: String,
    #[phi(encrypted_flag)]
    sealed: bool,
}

#[test]
fn a_row_written_unsealed_behind_the_backfills_cursor_is_sealed_by_a_second_pass() {
    let db = TestDb::new();
    let mut conn = db.conn();
    recreate(
        &mut conn,
        "phi_it_pass",
        &format!(
            "CREATE TABLE phi_it_pass (id BIGINT NOT NULL PRIMARY KEY, owner_id VARCHAR(255) NOT NULL, \
             note {BLOB} NOT NULL, sealed BOOLEAN NOT NULL DEFAULT FALSE)"
        ),
    );
    let owners = [common::unique_owner("pass-a"), common::unique_owner("pass-b")];
    let note = |id: i64| PassNote {
        id,
        owner_id: owners[usize::try_from(id).expect("positive") % 2].clone(),
        note: format!("note {id}"),
        sealed: false,
    };
    // Rows 10, 20, …, 3000: batches of 50 read them by key range.
    let notes: Vec<PassNote> = (1..=300).map(|i| note(i * 10)).collect();
    let plain = db.keyring();
    plain.set_rollout(Rollout::Nobody);
    for chunk in PassNote::seal_all(&notes, &plain).expect("unsealed").chunks(100) {
        diesel::insert_into(phi_it_pass::table).values(chunk).execute(&mut conn).expect("insert");
    }
    // While the third batch (rows 1010 to 1500) holds its rows, another
    // writer adds an unsealed row whose key, 5, is behind every batch
    // still to come: only a second pass from the first key finds it.
    let late = note(5);
    let late_row = PassNote::seal(&late, &plain).expect("unsealed");
    let keyring = db.keyring();
    let mut batches = 0;
    let report = migrate::migrate_interleaved::<PassNote, _>(
        &mut conn,
        &keyring,
        &MigrateOptions::default().batch(50),
        true,
        &mut |c| {
            batches += 1;
            if batches == 3 {
                diesel::insert_into(phi_it_pass::table)
                    .values(&late_row)
                    .execute(c)
                    .map_err(|source| phi::Error::Database { operation: "test insert", table: "phi_it_pass", source })?;
            }
            Ok(())
        },
    )
    .expect("backfill");
    // Six batches over the 300 rows, then one more in the second pass.
    assert_eq!((report.rows, report.skipped, report.remaining, report.batches), (301, 0, 0, 7), "{report}");
    let loaded = PassNote::load(phi_it_pass::table.order(phi_it_pass::id), &mut conn, &keyring).expect("load");
    let mut expected: Vec<PassNote> = std::iter::once(late).chain(notes).collect();
    for n in &mut expected {
        n.sealed = true;
    }
    assert!(loaded == expected, "every row sealed once, the late one too");
}
