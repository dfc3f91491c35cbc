// `#[derive(PhiRecord)]` models on a real database. Included in
// `tests/suite/mod.rs`, so `Conn`, `BLOB`, `server_url()` and `TestDb` are
// in scope.

use phi::blind::BLIND_INDEX_LEN;
use phi::{PhiRecord, Rollout};

diesel::table! {
    phi_it_cases (case_id) {
        case_id -> Varchar,
        user_id -> Varchar,
        patient_first -> Binary,
        patient_last -> Binary,
        patient_dob -> Binary,
        ins_provider -> Nullable<Binary>,
        procedure_code -> Varchar,
        phi_encrypted -> Bool,
        patient_last_bidx -> Nullable<Binary>,
        patient_dob_bidx -> Nullable<Binary>,
    }
}

/// The model: four encrypted fields, an owner, a row key, a flag and two
/// blind indexes.
#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(table = phi_it_cases, crate = phi, debug)]
#[diesel(primary_key(case_id))]
struct Case {
    #[phi(row_key)]
    case_id: String,
    #[phi(owner)]
    user_id: String,
    #[phi(encrypt)]
    patient_first: String,
    #[phi(encrypt, blind_index = patient_last_bidx, normalize = "trim,lowercase")]
    patient_last: String,
    #[phi(encrypt, blind_index = patient_dob_bidx)]
    patient_dob: NaiveDate,
    #[phi(encrypt)]
    ins_provider: Option<String>,
    procedure_code: String,
    #[phi(encrypted_flag)]
    phi_encrypted: bool,
}

const CASES_SCOPE_LAST: &str = "phi_it_cases.patient_last";

fn prepare_cases(conn: &mut Conn) {
    static DDL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = DDL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // The blind index is a short binary column, indexed with the owner.
    let index_type = match BLOB {
        "BYTEA" => "BYTEA",
        _ if server_url().is_some() => "VARBINARY(16)",
        _ => "BLOB",
    };
    let ddl = format!(
        "CREATE TABLE IF NOT EXISTS phi_it_cases (case_id VARCHAR(64) NOT NULL PRIMARY KEY, \
         user_id VARCHAR(255) NOT NULL, patient_first {BLOB} NOT NULL, patient_last {BLOB} NOT NULL, \
         patient_dob {BLOB} NOT NULL, ins_provider {BLOB} NULL, procedure_code VARCHAR(32) NOT NULL, \
         phi_encrypted BOOLEAN NOT NULL, patient_last_bidx {index_type} NULL, patient_dob_bidx {index_type} NULL)"
    );
    diesel::sql_query(ddl).execute(conn).expect("cases table");
    let index = "CREATE INDEX phi_it_cases_dup ON phi_it_cases (user_id, patient_last_bidx, patient_dob_bidx)";
    // Created once; a second CREATE INDEX fails harmlessly on every backend.
    let _ = diesel::sql_query(index).execute(conn);
}

fn dob(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).expect("date")
}

fn case(owner: &str, id: &str, last: &str) -> Case {
    Case {
        case_id: id.to_owned(),
        user_id: owner.to_owned(),
        patient_first: "Zoë".to_owned(),
        patient_last: last.to_owned(),
        patient_dob: dob(1980, 1, 15),
        ins_provider: Some("Acme Health".to_owned()),
        procedure_code: "27447".to_owned(),
        phi_encrypted: false,
    }
}

fn insert_cases(conn: &mut Conn, keyring: &Keyring, cases: &[Case]) {
    let sealed = Case::seal_all(cases, keyring).expect("seal");
    for chunk in sealed.chunks(200) {
        for row in chunk {
            diesel::insert_into(phi_it_cases::table)
                .values(row)
                .execute(conn)
                .expect("insert");
        }
    }
}

fn raw_column(conn: &mut Conn, id: &str, column: &str) -> Option<Vec<u8>> {
    #[derive(QueryableByName)]
    struct Raw {
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Binary>)]
        value: Option<Vec<u8>>,
    }
    let sql = format!("SELECT {column} AS value FROM phi_it_cases WHERE case_id = '{id}'");
    diesel::sql_query(sql)
        .get_result::<Raw>(conn)
        .expect("raw select")
        .value
}

fn set_raw(conn: &mut Conn, id: &str, column: &str, bytes: Option<Vec<u8>>) {
    let sql = format!("UPDATE phi_it_cases SET {column} = ? WHERE case_id = ?");
    let sql = if BLOB == "BYTEA" {
        sql.replacen('?', "$1", 1).replacen('?', "$2", 1)
    } else {
        sql
    };
    diesel::sql_query(sql)
        .bind::<diesel::sql_types::Nullable<diesel::sql_types::Binary>, _>(bytes)
        .bind::<diesel::sql_types::Text, _>(id)
        .execute(conn)
        .expect("raw update");
}

fn load_one(conn: &mut Conn, keyring: &Keyring, id: &str) -> phi::Result<Case> {
    Case::load(phi_it_cases::table.filter(phi_it_cases::case_id.eq(id)), conn, keyring)
        .map(|mut v| v.pop().expect("one row"))
}

#[test]
fn derived_model_round_trips_insert_load_update_delete() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let mut conn = db.conn();
    prepare_cases(&mut conn);
    let owner = common::unique_owner("drv");
    let id = format!("{}-1", &owner[owner.len() - 20..]);
    let mut original = case(&owner, &id, "Doe");
    original.ins_provider = None;
    insert_cases(&mut conn, &keyring, std::slice::from_ref(&original));

    // Stored sealed: every PHI column starts with the envelope header.
    for column in ["patient_first", "patient_last", "patient_dob"] {
        let raw = raw_column(&mut conn, &id, column).expect("not null");
        assert_eq!(&raw[..2], &[0xF1, 0x01], "{column}");
    }
    assert_eq!(raw_column(&mut conn, &id, "ins_provider"), None, "None is NULL");
    assert_eq!(raw_column(&mut conn, &id, "patient_last_bidx").map(|b| b.len()), Some(BLIND_INDEX_LEN));

    let mut loaded = load_one(&mut conn, &keyring, &id).expect("loads");
    assert!(loaded.phi_encrypted, "the flag is set on a sealed row");
    original.phi_encrypted = true;
    assert!(loaded == original);
    let debug = format!("{loaded:?}");
    assert!(debug.contains("<redacted>") && !debug.contains("Doe") && !debug.contains("1980"), "{debug}");

    // Update: only the changed columns are written, re-sealed.
    let first_before = raw_column(&mut conn, &id, "patient_first");
    let last_before = raw_column(&mut conn, &id, "patient_last");
    let mut edited = loaded.clone();
    edited.patient_last = "Doe-Smith".to_owned();
    edited.ins_provider = Some("Blue Shield".to_owned());
    let changes = edited.changes(&loaded, &keyring).expect("changes");
    assert!(!changes.is_empty());
    assert!(changes.patient_first.is_none() && changes.procedure_code.is_none());
    diesel::update(phi_it_cases::table.find(&id)).set(&changes).execute(&mut conn).expect("update");
    assert_eq!(raw_column(&mut conn, &id, "patient_first"), first_before, "unchanged field not rewritten");
    assert_ne!(raw_column(&mut conn, &id, "patient_last"), last_before);
    loaded = load_one(&mut conn, &keyring, &id).expect("loads after update");
    assert!(loaded == edited);
    assert!(edited.changes(&loaded, &keyring).expect("no changes").is_empty());

    // Setting a nullable field back to None writes NULL.
    let mut cleared = loaded.clone();
    cleared.ins_provider = None;
    let changes = cleared.changes(&loaded, &keyring).expect("changes");
    diesel::update(phi_it_cases::table.find(&id)).set(&changes).execute(&mut conn).expect("update");
    assert_eq!(raw_column(&mut conn, &id, "ins_provider"), None);
    assert!(load_one(&mut conn, &keyring, &id).expect("loads") == cleared);

    // Delete is plain Diesel.
    let deleted = diesel::delete(phi_it_cases::table.find(&id)).execute(&mut conn).expect("delete");
    assert_eq!(deleted, 1);
    let left = Case::load(phi_it_cases::table.filter(phi_it_cases::user_id.eq(&owner)), &mut conn, &keyring)
        .expect("load");
    assert!(left.is_empty());
}

#[test]
fn a_derived_models_plaintext_is_not_in_the_stored_bytes() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let mut conn = db.conn();
    prepare_cases(&mut conn);
    let owner = common::unique_owner("file");
    let ids: Vec<String> = (0..20).map(|i| format!("{}-{i}", &owner[owner.len() - 20..])).collect();
    let cases: Vec<Case> = ids.iter().map(|id| case(&owner, id, "Quetzalcoatl-Marchetti")).collect();
    insert_cases(&mut conn, &keyring, &cases);
    let needles = ["Quetzalcoatl", "Acme Health", "1980-01-15", "Zo\u{eb}"];
    let contains = |bytes: &[u8]| needles.iter().any(|n| bytes.windows(n.len()).any(|w| w == n.as_bytes()));

    // Every stored PHI column, read back raw with plain SQL.
    for id in &ids {
        for column in ["patient_first", "patient_last", "patient_dob", "ins_provider"] {
            let raw = raw_column(&mut conn, id, column).expect("stored");
            assert_eq!(&raw[..2], &[0xF1, 0x01], "{column}");
            assert!(!contains(&raw), "plaintext in {column}");
        }
    }
    // On SQLite, the database files themselves (with the WAL, if any).
    if server_url().is_none() {
        drop(conn);
        let dir = std::path::Path::new(&db.url).parent().expect("dir").to_owned();
        for entry in std::fs::read_dir(dir).expect("list") {
            let path = entry.expect("entry").path();
            assert!(!contains(&std::fs::read(&path).expect("read")), "plaintext in {}", path.display());
        }
    }
}

#[test]
fn a_ciphertext_copied_by_sql_fails_naming_table_column_and_owner() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let mut conn = db.conn();
    prepare_cases(&mut conn);
    let alice = common::unique_owner("cpa");
    let bob = common::unique_owner("cpb");
    let tag = |o: &str, n: u32| format!("{}-{n}", &o[o.len() - 20..]);
    let (a1, a2, b1) = (tag(&alice, 1), tag(&alice, 2), tag(&bob, 1));
    insert_cases(
        &mut conn,
        &keyring,
        &[case(&alice, &a1, "Doe"), case(&alice, &a2, "Roe"), case(&bob, &b1, "Poe")],
    );
    let stolen = raw_column(&mut conn, &a1, "patient_last");

    // To another row of the same owner.
    set_raw(&mut conn, &a2, "patient_last", stolen.clone());
    let err = load_one(&mut conn, &keyring, &a2).expect_err("other row fails");
    let message = err.to_string();
    assert!(matches!(err, Error::Decrypt { .. }), "{err:?}");
    assert!(message.contains(CASES_SCOPE_LAST) && message.contains(&alice), "{message}");
    assert!(!message.contains("Doe"), "{message}");

    // To another owner.
    set_raw(&mut conn, &b1, "patient_last", stolen.clone());
    let message = load_one(&mut conn, &keyring, &b1).expect_err("other owner fails").to_string();
    assert!(message.contains(CASES_SCOPE_LAST) && message.contains(&bob), "{message}");

    // To another column of the same row.
    set_raw(&mut conn, &a1, "patient_first", stolen);
    let message = load_one(&mut conn, &keyring, &a1).expect_err("other column fails").to_string();
    assert!(message.contains("phi_it_cases.patient_first") && message.contains(&alice), "{message}");

    // A flag-on row whose bytes are not an envelope is an error, not plaintext.
    set_raw(&mut conn, &a1, "patient_first", Some(b"Jane".to_vec()));
    let err = load_one(&mut conn, &keyring, &a1).expect_err("not an envelope");
    assert!(matches!(err, Error::Malformed { .. }), "{err:?}");

    // The damaged rows do not hide the others: open_each reports per row.
    let rows: Vec<CaseSealed> = phi_it_cases::table
        .filter(phi_it_cases::user_id.eq_any([&alice, &bob]))
        .order(phi_it_cases::case_id)
        .select(CaseSealed::as_select())
        .load(&mut conn)
        .expect("load sealed");
    let results = Case::open_each(rows, &keyring).expect("keys resolve");
    assert_eq!(results.len(), 3);
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 3, "all three were altered");
}

#[test]
fn loading_a_thousand_rows_of_a_hundred_cold_owners_is_one_query_and_a_hundred_unwraps() {
    let db = TestDb::new();
    let mut conn = db.conn();
    prepare_cases(&mut conn);
    let batch = common::unique_owner("bulk");
    let owners: Vec<String> = (0..100).map(|i| format!("{batch}-o{i}")).collect();
    let cases: Vec<Case> = (0..1000)
        .map(|i| {
            let owner = &owners[i % 100];
            case(owner, &format!("{}-{i}", &batch[batch.len() - 16..]), &format!("Patient {i}"))
        })
        .collect();
    let seeding = db.keyring();
    insert_cases(&mut conn, &seeding, &cases);
    assert_eq!(seeding.stats().key_loads, 1, "sealing 1,000 rows resolved 100 new owners in one query");

    let cold = db.keyring();
    let query = phi_it_cases::table
        .filter(phi_it_cases::user_id.like(format!("{batch}-o%")))
        .order(phi_it_cases::case_id);
    let loaded = Case::load(query, &mut conn, &cold).expect("load");
    assert_eq!(loaded.len(), 1000);
    let stats = cold.stats();
    assert_eq!(stats.key_loads, 1, "one key-store query for 100 cold owners: {stats:?}");
    assert_eq!(stats.unwraps, 100, "one unwrap per owner: {stats:?}");
    for c in &loaded {
        let i: usize = c.case_id.rsplit('-').next().expect("n").parse().expect("number");
        assert_eq!(c.patient_last, format!("Patient {i}"));
        assert_eq!(c.user_id, owners[i % 100]);
    }
    // Again, warm: no query, no unwrap.
    Case::load(phi_it_cases::table.filter(phi_it_cases::user_id.like(format!("{batch}-o%"))), &mut conn, &cold)
        .expect("load again");
    assert_eq!((cold.stats().key_loads, cold.stats().unwraps), (1, 100));
}

#[test]
fn a_batch_shared_between_threads_keeps_its_order_and_fails_at_its_first_damaged_row() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let mut conn = db.conn();
    prepare_cases(&mut conn);
    let batch = common::unique_owner("order");
    let owners = [format!("{batch}-a"), format!("{batch}-b")];
    let tag = &batch[batch.len() - 16..];
    let id = |i: usize| format!("{tag}-{i:04}");
    // Large enough to be sealed and opened on every core, in many blocks,
    // and for `load` to open it in three chunks as it reads.
    let cases: Vec<Case> = (0..2600)
        .map(|i| Case {
            phi_encrypted: true, // as they read back
            ..case(&owners[i % 2], &id(i), &format!("Patient {i}"))
        })
        .collect();
    let sealed = Case::seal_all(&cases, &keyring).expect("seal");
    assert!(
        sealed.iter().map(|s| &s.case_id).eq(cases.iter().map(|c| &c.case_id)),
        "sealed in input order"
    );
    for chunk in sealed.chunks(250) {
        diesel::insert_into(phi_it_cases::table)
            .values(chunk)
            .execute(&mut conn)
            .expect("insert");
    }
    let query = || {
        phi_it_cases::table
            .filter(phi_it_cases::user_id.eq_any([&owners[0], &owners[1]]))
            .order(phi_it_cases::case_id)
    };
    let loaded = Case::load(query(), &mut conn, &keyring).expect("load");
    assert!(loaded == cases, "opened in row order");

    // Two damaged rows, far apart (in the second and third chunks a load
    // opens): the error is the first one's.
    let moved = raw_column(&mut conn, &id(1102), "patient_first");
    set_raw(&mut conn, &id(1100), "patient_first", moved);
    let moved = raw_column(&mut conn, &id(2303), "patient_last");
    set_raw(&mut conn, &id(2301), "patient_last", moved);
    let err = Case::load(query(), &mut conn, &keyring).expect_err("damaged rows");
    let message = err.to_string();
    assert!(matches!(err, Error::Decrypt { .. }), "{err:?}");
    assert!(message.contains("phi_it_cases.patient_first") && message.contains(&owners[0]), "{message}");
    assert!(!message.contains(&owners[1]), "{message}");
}

#[test]
fn seal_chunks_writes_each_chunk_in_order_and_stops_at_the_first_failure() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let mut conn = db.conn();
    prepare_cases(&mut conn);
    let batch = common::unique_owner("chunks");
    let owners = [format!("{batch}-a"), format!("{batch}-b"), format!("{batch}-c")];
    let tag = &batch[batch.len() - 16..];
    let id = |i: usize| format!("{tag}-{i:04}");
    let cases: Vec<Case> = (0..2600)
        .map(|i| Case { phi_encrypted: true, ..case(&owners[i % 3], &id(i), &format!("Patient {i}")) })
        .collect();
    let query = || phi_it_cases::table.filter(phi_it_cases::user_id.eq_any(&owners)).order(phi_it_cases::case_id);

    // Every chunk, in order, each one multi-row INSERT in its transaction.
    let mut sizes = Vec::new();
    Case::seal_chunks(&cases, 500, &keyring, |sealed| {
        sizes.push(sealed.len());
        conn.transaction(|c| diesel::insert_into(phi_it_cases::table).values(&sealed).execute(c))
            .map_err(|source| Error::Database { operation: "test insert", table: "phi_it_cases", source })?;
        Ok::<_, Error>(())
    })
    .expect("seal and insert");
    assert_eq!(sizes, [500, 500, 500, 500, 500, 100]);
    assert!(Case::load(query(), &mut conn, &keyring).expect("load") == cases, "stored in order, every value opens");

    // Called on a thread of a pool of one (inside an application's own
    // `par_iter`), it seals there instead of waiting for a job queued
    // behind itself.
    diesel::delete(phi_it_cases::table.filter(phi_it_cases::user_id.eq_any(&owners))).execute(&mut conn).expect("delete");
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a pool of one");
    let mut written = Vec::new();
    pool.install(|| {
        Case::seal_chunks(&cases, 500, &keyring, |sealed| {
            written.extend(sealed);
            Ok::<_, Error>(())
        })
    })
    .expect("sealed on the pool's thread");
    assert_eq!(written.len(), cases.len());
    for chunk in written.chunks(500) {
        diesel::insert_into(phi_it_cases::table).values(chunk).execute(&mut conn).expect("insert");
    }
    assert!(Case::load(query(), &mut conn, &keyring).expect("load") == cases, "the same rows");

    // A failing write stops the job: no chunk after it is handed over.
    diesel::delete(phi_it_cases::table.filter(phi_it_cases::user_id.eq_any(&owners))).execute(&mut conn).expect("delete");
    let mut calls = 0;
    let err = Case::seal_chunks(&cases, 500, &keyring, |sealed| {
        calls += 1;
        if calls == 3 {
            return Err(Error::Config("the third chunk's write failed".into()));
        }
        diesel::insert_into(phi_it_cases::table)
            .values(&sealed)
            .execute(&mut conn)
            .map_err(|source| Error::Database { operation: "test insert", table: "phi_it_cases", source })?;
        Ok(())
    })
    .expect_err("the third write fails");
    assert!(err.to_string().contains("the third chunk's write failed"), "{err}");
    assert_eq!(calls, 3);
    assert!(Case::load(query(), &mut conn, &keyring).expect("load") == cases[..1000], "the first two chunks, nothing after");

    // A chunk that cannot be sealed is never written: a strict table
    // refuses the unsealed rows a roll-out of nobody would give.
    diesel::delete(phi_it_cases::table.filter(phi_it_cases::user_id.eq_any(&owners))).execute(&mut conn).expect("delete");
    let strict = db.keyring();
    strict.set_rollout(Rollout::Nobody);
    strict.set_strict(["phi_it_cases"]);
    let mut calls = 0;
    let err = Case::seal_chunks(&cases, 500, &strict, |_sealed| {
        calls += 1;
        Ok::<_, Error>(())
    })
    .expect_err("strict refuses unsealed rows");
    assert!(matches!(err, Error::Strict { .. }), "{err:?}");
    assert_eq!(calls, 0, "nothing handed over");
}

#[test]
fn the_blind_index_finds_duplicates_without_decrypting() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let mut conn = db.conn();
    prepare_cases(&mut conn);
    let owner = common::unique_owner("dup");
    let other = common::unique_owner("dup-other");
    let t = |n: u32| format!("{}-{n}", &owner[owner.len() - 20..]);
    let mut born_elsewhen = case(&owner, &t(2), "Doe");
    born_elsewhen.patient_dob = dob(1975, 6, 1);
    insert_cases(
        &mut conn,
        &keyring,
        &[
            case(&owner, &t(1), "  DOE "),
            born_elsewhen,
            case(&owner, &t(3), "Roe"),
            case(&other, &format!("{}-1", &other[other.len() - 20..]), "Doe"),
        ],
    );
    let last = Case::patient_last_blind_index(&keyring, &owner, "doe").expect("index");
    let born = Case::patient_dob_blind_index(&keyring, &owner, &dob(1980, 1, 15)).expect("index");
    let found = Case::load(
        phi_it_cases::table
            .filter(phi_it_cases::user_id.eq(&owner))
            .filter(phi_it_cases::patient_last_bidx.eq_any(last))
            .filter(phi_it_cases::patient_dob_bidx.eq_any(born)),
        &mut conn,
        &keyring,
    )
    .expect("lookup");
    assert_eq!(found.len(), 1, "normalised last name and date of birth match one case");
    assert_eq!(found[0].case_id, t(1));
    assert_eq!(found[0].patient_last, "  DOE ", "the stored value keeps its spelling");

    // An owner without keys has no index values, so finds nothing.
    let none = Case::patient_last_blind_index(&keyring, &common::unique_owner("nokeys"), "doe")
        .expect("index");
    assert!(none.is_empty());
    let index = raw_column(&mut conn, &t(1), "patient_last_bidx").expect("index");
    assert_ne!(
        index,
        raw_column(&mut conn, &format!("{}-1", &other[other.len() - 20..]), "patient_last_bidx").expect("index"),
        "the same name under another owner has another index value"
    );
}

#[test]
fn rows_written_before_the_rollout_read_back_and_the_policy_decides_new_writes() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let mut conn = db.conn();
    prepare_cases(&mut conn);
    let early = common::unique_owner("roll-in");
    let late = common::unique_owner("roll-out");
    let t = |o: &str, n: u32| format!("{}-{n}", &o[o.len() - 20..]);
    keyring.set_rollout(Rollout::owners([early.clone()]));
    insert_cases(&mut conn, &keyring, &[case(&early, &t(&early, 1), "Doe"), case(&late, &t(&late, 1), "Roe")]);

    // The allow-listed owner's row is sealed; the other is stored as its
    // plain encoding with the flag off, and no key was created for it.
    assert_eq!(&raw_column(&mut conn, &t(&early, 1), "patient_last").expect("v")[..2], &[0xF1, 0x01]);
    assert_eq!(raw_column(&mut conn, &t(&late, 1), "patient_last").expect("v"), b"Roe".to_vec());
    assert_eq!(raw_column(&mut conn, &t(&late, 1), "patient_dob").expect("v"), b"1980-01-15".to_vec());
    assert_eq!(raw_column(&mut conn, &t(&late, 1), "patient_last_bidx"), None);
    assert_eq!(key_rows(&mut conn, &late), 0);

    // Both read back through one load.
    let both = Case::load(
        phi_it_cases::table.filter(phi_it_cases::user_id.eq_any([&early, &late])).order(phi_it_cases::user_id),
        &mut conn,
        &keyring,
    )
    .expect("mixed load");
    let flags: Vec<(String, bool)> = both.iter().map(|c| (c.patient_last.clone(), c.phi_encrypted)).collect();
    assert!(flags.contains(&("Doe".into(), true)) && flags.contains(&("Roe".into(), false)), "{flags:?}");

    // Rolling out to everyone: the next update of the unsealed row seals
    // every encrypted column and sets the flag.
    keyring.set_rollout(Rollout::All);
    let old = both.iter().find(|c| c.user_id == late).expect("late row").clone();
    let mut new = old.clone();
    new.procedure_code = "99213".into();
    let changes = new.changes(&old, &keyring).expect("changes");
    assert_eq!(changes.phi_encrypted, Some(true));
    assert!(changes.patient_first.is_some() && changes.patient_dob.is_some());
    diesel::update(phi_it_cases::table.find(t(&late, 1))).set(&changes).execute(&mut conn).expect("update");
    assert_eq!(&raw_column(&mut conn, &t(&late, 1), "patient_first").expect("v")[..2], &[0xF1, 0x01]);
    let reread = load_one(&mut conn, &keyring, &t(&late, 1)).expect("reads sealed");
    assert!(reread.phi_encrypted && reread.patient_last == "Roe" && reread.procedure_code == "99213");

    // Turning the roll-out off never writes a sealed row back unsealed.
    keyring.set_rollout(Rollout::Nobody);
    let mut again = reread.clone();
    again.patient_first = "Ann".into();
    let changes = again.changes(&reread, &keyring).expect("changes");
    assert_eq!(changes.phi_encrypted, None);
    assert_eq!(&changes.patient_first.as_ref().expect("changed").as_bytes()[..2], &[0xF1, 0x01]);

    // An unsealed row whose bytes are not the field's encoding is an error
    // naming the column and owner, never garbage.
    insert_cases(&mut conn, &keyring, &[case(&late, &t(&late, 2), "Loe")]);
    set_raw(&mut conn, &t(&late, 2), "patient_last", Some(vec![0xF1, 0x01, 0xFF]));
    let err = load_one(&mut conn, &keyring, &t(&late, 2)).expect_err("undecodable");
    assert!(matches!(err, Error::Unsealed { .. }), "{err:?}");
    assert!(err.to_string().contains(CASES_SCOPE_LAST) && err.to_string().contains(&late), "{err}");
}

#[test]
fn a_stale_follower_refuses_unsealed_writes_as_well_as_seals() {
    let db = TestDb::new();
    let mut conn = db.conn();
    prepare_cases(&mut conn);
    let feed = common::FeedDown::new(db.store());
    let clock = Arc::new(ManualClock::new());
    let policy = common::unique_owner("stale-policy");
    let policy = &policy[policy.len().saturating_sub(60)..];
    // The thread reads once an hour: only `sync_feed` and the writes read.
    let keyring = Keyring::builder(feed.clone(), common::local_kek())
        .clock(clock.clone())
        .rollout(Rollout::Nobody)
        .rollout_policy(policy)
        .feed_interval(Duration::from_secs(3_600))
        .feed_max_staleness(Duration::from_secs(60))
        .build()
        .expect("following keyring");
    let owner = common::unique_owner("stale-off");
    let t = |n: u32| format!("{}-{n}", &owner[owner.len() - 20..]);
    // Fresh: a flag-off row is written unsealed.
    insert_cases(&mut conn, &keyring, &[case(&owner, &t(1), "Doe")]);
    assert_eq!(raw_column(&mut conn, &t(1), "patient_last").expect("v"), b"Doe".to_vec());
    let old = load_one(&mut conn, &keyring, &t(1)).expect("loads");

    // The feed cannot be read, and the keyring's clock passes the maximum
    // staleness.
    feed.set_down(true);
    assert_eq!(keyring.sync_feed(), 0);
    assert_eq!(keyring.feed_status().expect("following").read_failures, 1);
    clock.advance(Duration::from_secs(61));

    // Every write path that would store a plain value is refused.
    let insert = Case::seal_all(&[case(&owner, &t(2), "Roe")], &keyring).map(drop).expect_err("stale: no unsealed insert");
    assert!(matches!(insert, Error::FeedStale { .. }), "{insert:?}");
    assert!(insert.to_string().contains(&owner), "{insert}");
    let mut new = old.clone();
    new.procedure_code = "99213".into();
    let update = new.changes(&old, &keyring).map(drop).expect_err("stale: no unsealed update");
    assert!(matches!(update, Error::FeedStale { .. }), "{update:?}");
    // (and, as before, seals)
    let seal = keyring.seal(&"x".to_string(), &owner, TEXT, b"r").map(drop).expect_err("stale: no seal");
    assert!(matches!(seal, Error::FeedStale { .. }), "{seal:?}");
    // Reading goes on.
    assert_eq!(load_one(&mut conn, &keyring, &t(1)).expect("opens").patient_last, "Doe");

    // The feed is back: a read lifts the refusal.
    feed.set_down(false);
    keyring.sync_feed();
    Case::seal_all(&[case(&owner, &t(2), "Roe")], &keyring).expect("fresh again: writes");
    new.changes(&old, &keyring).expect("fresh again: updates");
}

fn owner_rows(conn: &mut Conn, owner: &str) -> i64 {
    phi_it_cases::table
        .filter(phi_it_cases::user_id.eq(owner))
        .count()
        .get_result(conn)
        .expect("count")
}

#[test]
fn insert_and_insert_all_seal_and_write_in_one_call_every_row_or_none() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let mut conn = db.conn();
    prepare_cases(&mut conn);
    let owner = common::unique_owner("ins");
    let tag = owner[owner.len() - 20..].to_owned();

    let mut one = case(&owner, &format!("{tag}-one"), "Doe");
    assert_eq!(one.insert(&keyring, &mut conn).expect("insert"), 1);
    let raw = raw_column(&mut conn, &one.case_id, "patient_last").expect("stored");
    assert_eq!(&raw[..2], &[0xF1, 0x01], "sealed");
    one.phi_encrypted = true;
    assert!(load_one(&mut conn, &keyring, &one.case_id).expect("loads") == one);

    // Ten bound values a row: 3,276 rows a statement, so two statements.
    let many: Vec<Case> = (0..3_300).map(|i| case(&owner, &format!("{tag}-{i}"), "Roe")).collect();
    assert_eq!(Case::insert_all(&many, &keyring, &mut conn).expect("insert_all"), 3_300);
    assert_eq!(owner_rows(&mut conn, &owner), 3_301);
    let last = load_one(&mut conn, &keyring, &format!("{tag}-3299")).expect("loads");
    assert_eq!(last.patient_last, "Roe");
    assert!(last.phi_encrypted);

    // A batch whose last row (in the second statement) collides with a
    // stored key: nothing of it is written.
    let mut clash: Vec<Case> = (0..3_300).map(|i| case(&owner, &format!("{tag}-x{i}"), "Poe")).collect();
    clash.push(one.clone());
    let err = Case::insert_all(&clash, &keyring, &mut conn).expect_err("duplicate key");
    assert!(matches!(err, Error::Database { table: "phi_it_cases", .. }), "{err:?}");
    assert!(err.to_string().contains("phi_it_cases"), "{err}");
    assert_eq!(owner_rows(&mut conn, &owner), 3_301, "rolled back");

    // A duplicate single insert names the table too.
    let err = one.insert(&keyring, &mut conn).expect_err("duplicate key");
    assert!(matches!(err, Error::Database { table: "phi_it_cases", .. }), "{err:?}");
    assert_eq!(Case::insert_all(&[], &keyring, &mut conn).expect("nothing"), 0);
}

#[test]
fn load_first_and_load_optional_read_one_row_with_limit_one() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let mut conn = db.conn();
    prepare_cases(&mut conn);
    let owner = common::unique_owner("first");
    let tag = owner[owner.len() - 20..].to_owned();
    let cases: Vec<Case> = (1..=3).map(|i| case(&owner, &format!("{tag}-{i}"), "Doe")).collect();
    Case::insert_all(&cases, &keyring, &mut conn).expect("insert_all");
    // The second row does not open: a load of every row fails on it.
    set_raw(&mut conn, &cases[1].case_id, "patient_first", Some(b"Jane".to_vec()));
    let mine = || phi_it_cases::table.filter(phi_it_cases::user_id.eq(owner.clone()));
    let err = Case::load(mine(), &mut conn, &keyring).expect_err("every row read");
    assert!(matches!(err, Error::Malformed { .. }), "{err:?}");

    // One row read (LIMIT 1), so the damaged row is not.
    let first = Case::load_first(mine().order(phi_it_cases::case_id.asc()), &mut conn, &keyring).expect("first");
    assert_eq!(first.case_id, cases[0].case_id);
    assert_eq!(first.patient_first, "Zoë");
    let last = Case::load_optional(mine().order(phi_it_cases::case_id.desc()), &mut conn, &keyring)
        .expect("optional")
        .expect("a row");
    assert_eq!(last.case_id, cases[2].case_id);
    // A damaged row read alone still fails.
    let err = Case::load_first(phi_it_cases::table.find(&cases[1].case_id), &mut conn, &keyring)
        .expect_err("damaged row");
    assert!(matches!(err, Error::Malformed { .. }), "{err:?}");

    // No row: an error naming the table, or None.
    let nobody = || phi_it_cases::table.filter(phi_it_cases::user_id.eq("nobody-at-all"));
    let err = Case::load_first(nobody(), &mut conn, &keyring).expect_err("no row");
    assert!(matches!(err, Error::NotFound { table: "phi_it_cases" }), "{err:?}");
    assert_eq!(err.kind(), phi::ErrorKind::NotFound);
    assert!(err.to_string().contains("phi_it_cases"), "{err}");
    assert!(Case::load_optional(nobody(), &mut conn, &keyring).expect("optional").is_none());
}

#[test]
fn the_duplicate_check_is_one_filter_expression() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let mut conn = db.conn();
    prepare_cases(&mut conn);
    let owner = common::unique_owner("is");
    let other = common::unique_owner("is-other");
    let t = |n: u32| format!("{}-{n}", &owner[owner.len() - 20..]);
    let mut born_elsewhen = case(&owner, &t(2), "Doe");
    born_elsewhen.patient_dob = dob(1975, 6, 1);
    Case::insert_all(
        &[
            case(&owner, &t(1), "  DOE "),
            born_elsewhen,
            case(&owner, &t(3), "Roe"),
            case(&other, &format!("{}-1", &other[other.len() - 20..]), "Doe"),
        ],
        &keyring,
        &mut conn,
    )
    .expect("insert_all");

    // Owner and blind index in one expression; `&str` for a text field.
    let same_name = Case::patient_last_is(&keyring, owner.as_str(), "doe").expect("filter");
    let mut found = Case::load(phi_it_cases::table.filter(same_name), &mut conn, &keyring).expect("load");
    found.sort_by(|a, b| a.case_id.cmp(&b.case_id));
    let ids: Vec<&str> = found.iter().map(|c| c.case_id.as_str()).collect();
    assert_eq!(ids, [t(1), t(2)], "both of the owner's Does, not the other owner's");

    // Two of them together, through a single-row load.
    let duplicate = Case::load_optional(
        phi_it_cases::table
            .filter(Case::patient_last_is(&keyring, &owner, " Doe").expect("filter"))
            .filter(Case::patient_dob_is(&keyring, &owner, &dob(1980, 1, 15)).expect("filter")),
        &mut conn,
        &keyring,
    )
    .expect("load")
    .expect("a duplicate");
    assert_eq!(duplicate.case_id, t(1));
    assert_eq!(duplicate.patient_last, "  DOE ");

    // As any expression: an existence check counts without opening.
    let count = |conn: &mut Conn, last: &str| -> i64 {
        phi_it_cases::table
            .filter(Case::patient_last_is(&keyring, owner.clone(), last).expect("filter"))
            .count()
            .get_result(conn)
            .expect("count")
    };
    assert_eq!(count(&mut conn, "roe"), 1);
    assert_eq!(count(&mut conn, "Poe"), 0);

    // An owner without keys matches nothing.
    let nokeys = common::unique_owner("is-nokeys");
    let none = Case::load(
        phi_it_cases::table.filter(Case::patient_last_is(&keyring, nokeys, "doe").expect("filter")),
        &mut conn,
        &keyring,
    )
    .expect("load");
    assert!(none.is_empty());
}

/// `load_where` answers a prefix and a range query on encrypted fields
/// within one owner exactly as a plaintext filter of the same rows does,
/// over a result large enough to be opened in parallel chunks; another
/// owner's rows that would match are not read.
#[test]
fn load_where_answers_prefix_and_range_queries_like_a_plaintext_filter() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let mut conn = db.conn();
    prepare_cases(&mut conn);
    let owner = common::unique_owner("where");
    let other = common::unique_owner("where-other");
    let tag = owner[owner.len() - 20..].to_owned();
    let surnames = ["Marchbanks", "martin", " MARSH", "Doe", "Roe", "Ølund", "Mar", "Amar"];
    // A fixed pseudo-random sequence (no seed to chase on failure).
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move |n: u32| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        u32::try_from(x % u64::from(n)).expect("below n")
    };
    let mut mine = Vec::new();
    for i in 0..1_500 {
        let mut c = case(&owner, &format!("{tag}-{i}"), surnames[next(8) as usize]);
        let year = 1950 + i32::try_from(next(60)).expect("small");
        c.patient_dob = dob(year, 1 + next(12), 1 + next(28));
        mine.push(c);
    }
    Case::insert_all(&mine, &keyring, &mut conn).expect("insert_all");
    let theirs: Vec<Case> = (0..50)
        .map(|i| case(&other, &format!("{}-{i}", &other[other.len() - 20..]), "Marchbanks"))
        .collect();
    Case::insert_all(&theirs, &keyring, &mut conn).expect("insert_all");

    let prefix = |c: &Case| c.patient_last.trim().to_lowercase().starts_with("mar");
    let range = |c: &Case| (dob(1970, 1, 1)..dob(1980, 1, 1)).contains(&c.patient_dob);
    let ids = |cases: Vec<Case>| {
        let mut ids: Vec<String> = cases.into_iter().map(|c| c.case_id.clone()).collect();
        ids.sort();
        ids
    };
    let oracle = |keep: &dyn Fn(&Case) -> bool| {
        let mut ids: Vec<String> = mine.iter().filter(|c| keep(c)).map(|c| c.case_id.clone()).collect();
        ids.sort();
        ids
    };
    let of_owner = || phi_it_cases::table.filter(phi_it_cases::user_id.eq(owner.clone()));

    // Every statement the searches send, with its bound values.
    let sent = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let record = sent.clone();
    conn.set_instrumentation(move |event: diesel::connection::InstrumentationEvent<'_>| {
        if let diesel::connection::InstrumentationEvent::StartQuery { query, .. } = event {
            record.lock().expect("sent").push(query.to_string());
        }
    });

    let by_prefix = Case::load_where(of_owner(), &mut conn, &keyring, prefix).expect("prefix");
    assert!(by_prefix.len() > 400, "{} of 1500", by_prefix.len());
    assert_eq!(ids(by_prefix), oracle(&prefix));
    let by_range = Case::load_where(of_owner(), &mut conn, &keyring, range).expect("range");
    assert_eq!(ids(by_range), oracle(&range));
    let both = Case::load_where(of_owner(), &mut conn, &keyring, |c| prefix(c) && range(c)).expect("both");
    assert!(!both.is_empty());
    assert_eq!(ids(both), oracle(&|c| prefix(c) && range(c)));
    // Ordered by an encrypted field after opening.
    let mut sorted = Case::load_where(of_owner(), &mut conn, &keyring, range).expect("range");
    sorted.sort_by_key(|c| c.patient_dob);
    assert!(sorted.windows(2).all(|w| w[0].patient_dob <= w[1].patient_dob));
    // Nothing matches: an empty result, not an error.
    let none = Case::load_where(of_owner(), &mut conn, &keyring, |c| c.patient_last == "Nobody").expect("none");
    assert!(none.is_empty());

    // The database saw the owner and nothing of the prefix or the range.
    let sent = sent.lock().expect("sent");
    assert!(sent.len() >= 5, "{sent:?}");
    for statement in sent.iter() {
        let lower = statement.to_lowercase();
        assert!(lower.contains(&owner.to_lowercase()) || !lower.contains("phi_it_cases"), "{statement}");
        // The owner id is bound (its digits are a clock's): not a secret.
        let lower = lower.replace(&owner.to_lowercase(), "<owner>");
        for secret in ["mar", "1970", "1980", "nobody"] {
            assert!(!lower.contains(secret), "{secret:?} reached the database: {statement}");
        }
    }
}
