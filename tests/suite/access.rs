// The access log: every typed read and write recorded once per (accessor,
// operation, owner, table, row), strict mode, a log that refuses, and no
// value in records or tracing events. Included in `tests/suite/mod.rs`, so
// `Conn`, `BLOB`, `server_url()` and `TestDb` are in scope.

use phi::access::{AccessOp, AccessRecord, Accessor, MemoryAccessLog};
use phi::{PhiRecord, Updated};

diesel::table! {
    phi_ac_cases (case_id) {
        case_id -> Varchar,
        user_id -> Varchar,
        patient_last -> Binary,
        patient_note -> Nullable<Binary>,
        status -> Varchar,
        patient_last_bidx -> Nullable<Binary>,
    }
}

diesel::table! {
    phi_ac_users (user_id) {
        user_id -> Varchar,
        tenant_id -> Varchar,
        email -> Binary,
        email_lookup -> Nullable<Binary>,
    }
}

#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(table = phi_ac_cases, crate = phi, debug)]
#[diesel(primary_key(case_id))]
struct AcCase {
    #[phi(row_key)]
    case_id: String,
    #[phi(owner)]
    user_id: String,
    #[phi(encrypt, blind_index = patient_last_bidx, normalize = "trim,lowercase")]
    patient_last: String,
    #[phi(encrypt)]
    patient_note: Option<String>,
    status: String,
}

#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(table = phi_ac_users, crate = phi, debug)]
#[diesel(primary_key(user_id))]
struct AcUser {
    #[phi(row_key)]
    user_id: String,
    #[phi(owner)]
    tenant_id: String,
    #[phi(encrypt, lookup_index = email_lookup, normalize = "trim,lowercase")]
    email: String,
}

/// A value no record or event may hold.
const SECRET_LAST: &str = "Zoë-Secretname";
const SECRET_NOTE: &str = "allergic to penicillin";

fn access_tables(db: &TestDb) -> Conn {
    static READY: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let mut conn = db.conn();
    let create = |conn: &mut Conn| {
        let index = if BLOB == "BYTEA" {
            "BYTEA"
        } else if server_url().is_some() {
            "VARBINARY(20)"
        } else {
            "BLOB"
        };
        for ddl in [
            format!(
                "CREATE TABLE IF NOT EXISTS phi_ac_cases (case_id VARCHAR(255) NOT NULL PRIMARY KEY, \
                 user_id VARCHAR(255) NOT NULL, patient_last {BLOB} NOT NULL, patient_note {BLOB} NULL, \
                 status VARCHAR(32) NOT NULL, patient_last_bidx {index} NULL)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS phi_ac_users (user_id VARCHAR(255) NOT NULL PRIMARY KEY, \
                 tenant_id VARCHAR(255) NOT NULL, email {BLOB} NOT NULL, email_lookup {index} NULL)"
            ),
        ] {
            diesel::sql_query(ddl).execute(conn).expect("access test tables");
        }
    };
    if server_url().is_some() {
        READY.get_or_init(|| create(&mut conn));
    } else {
        create(&mut conn);
    }
    conn
}

fn logged_keyring(db: &TestDb, log: &Arc<MemoryAccessLog>) -> Keyring {
    Keyring::builder(db.store(), common::local_kek())
        .actor("access-test")
        .access_log(log.clone())
        .build()
        .expect("keyring")
}

fn dr_smith() -> Accessor {
    Accessor::new("dr-smith", "treatment").with_request_id("req-1")
}

fn cases(owner: &str, n: usize) -> Vec<AcCase> {
    (1..=n)
        .map(|i| AcCase {
            case_id: format!("{owner}-{i:04}"),
            user_id: owner.to_owned(),
            patient_last: SECRET_LAST.to_owned(),
            patient_note: (i % 2 == 1).then(|| SECRET_NOTE.to_owned()),
            status: "open".to_owned(),
        })
        .collect()
}

fn insert_cases(conn: &mut Conn, keyring: &Keyring, rows: &[AcCase]) {
    AcCase::seal_chunks(rows, 500, keyring, |sealed| {
        diesel::insert_into(phi_ac_cases::table).values(&sealed).execute(conn)?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })
    .map_err(|e| e.to_string())
    .expect("insert");
}

fn mine(owner: &str) -> diesel::dsl::Order<diesel::dsl::Filter<phi_ac_cases::table, diesel::dsl::Eq<phi_ac_cases::user_id, String>>, phi_ac_cases::case_id> {
    phi_ac_cases::table.filter(phi_ac_cases::user_id.eq(owner.to_owned())).order(phi_ac_cases::case_id)
}

/// (user, purpose, request id, op, owner, table, row, fields) of each
/// record.
type Summary = (String, String, Option<String>, AccessOp, String, String, Option<String>, Vec<String>);

fn summary(records: &[AccessRecord]) -> Vec<Summary> {
    records
        .iter()
        .map(|r| {
            (
                r.accessor.user().to_owned(),
                r.accessor.purpose().to_owned(),
                r.accessor.request_id().map(str::to_owned),
                r.op,
                r.owner_id.clone(),
                r.table.clone(),
                r.row.clone(),
                r.fields.clone(),
            )
        })
        .collect()
}

fn expected(accessor: &Accessor, op: AccessOp, owner: &str, table: &str, rows: &[Option<String>], fields: &[&str]) -> Vec<Summary> {
    rows.iter()
        .map(|row| {
            (
                accessor.user().to_owned(),
                accessor.purpose().to_owned(),
                accessor.request_id().map(str::to_owned),
                op,
                owner.to_owned(),
                table.to_owned(),
                row.clone(),
                fields.iter().map(|f| (*f).to_owned()).collect(),
            )
        })
        .collect()
}

fn row_ids(rows: &[AcCase]) -> Vec<Option<String>> {
    rows.iter().map(|r| Some(r.case_id.clone())).collect()
}

const CASE_FIELDS: &[&str] = &["patient_last", "patient_note"];

#[test]
fn every_typed_path_records_its_accesses_once_per_row_in_one_append() {
    let db = TestDb::new();
    let mut conn = access_tables(&db);
    let log = Arc::new(MemoryAccessLog::new());
    let base = logged_keyring(&db, &log);
    let smith = dr_smith();
    let keyring = base.on_behalf_of(&smith);
    let owner = common::unique_owner("acc-paths");
    let rows = cases(&owner, 3);
    let ids = row_ids(&rows);

    // Insert (seal_chunks): one record per row, one append.
    insert_cases(&mut conn, &keyring, &rows);
    assert_eq!(log.appends(), 1);
    assert_eq!(summary(&log.take()), expected(&smith, AccessOp::Insert, &owner, "phi_ac_cases", &ids, CASE_FIELDS));

    // seal_all and seal: inserts too.
    let extra = AcCase { case_id: format!("{owner}-x"), ..rows[0].clone() };
    extra.seal(&keyring).expect("seal");
    assert_eq!(summary(&log.take()), expected(&smith, AccessOp::Insert, &owner, "phi_ac_cases", &[Some(extra.case_id.clone())], CASE_FIELDS));

    // load: one append for the whole result.
    let before = log.appends();
    let loaded = AcCase::load(mine(&owner), &mut conn, &keyring).expect("load");
    assert!(loaded == rows);
    assert_eq!(log.appends(), before + 1);
    assert_eq!(summary(&log.take()), expected(&smith, AccessOp::Read, &owner, "phi_ac_cases", &ids, CASE_FIELDS));

    // open_all, open_each, open_iter, open.
    let sealed = || mine(&owner).select(AcCaseSealed::as_select()).load::<AcCaseSealed>(&mut db.conn()).expect("sealed rows");
    AcCase::open_all(sealed(), &keyring).expect("open_all");
    assert_eq!(summary(&log.take()), expected(&smith, AccessOp::Read, &owner, "phi_ac_cases", &ids, CASE_FIELDS));
    let each = AcCase::open_each(sealed(), &keyring).expect("open_each");
    assert!(each.iter().all(Result::is_ok));
    assert_eq!(summary(&log.take()), expected(&smith, AccessOp::Read, &owner, "phi_ac_cases", &ids, CASE_FIELDS));
    AcCase::open_iter(sealed().into_iter().map(Ok), &keyring).expect("open_iter");
    assert_eq!(summary(&log.take()), expected(&smith, AccessOp::Read, &owner, "phi_ac_cases", &ids, CASE_FIELDS));
    let one = sealed().remove(1);
    AcCase::open(one, &keyring).expect("open");
    assert_eq!(summary(&log.take()), expected(&smith, AccessOp::Read, &owner, "phi_ac_cases", &ids[1..2], CASE_FIELDS));

    // A guarded update: the encrypted fields it sealed again.
    let mut edited = rows[0].clone();
    edited.patient_last = "Roe".into();
    assert_eq!(edited.update(&rows[0], &keyring, &mut conn).expect("update"), Updated::Applied { sealed: true });
    assert_eq!(summary(&log.take()), expected(&smith, AccessOp::Update, &owner, "phi_ac_cases", &ids[..1], &["patient_last"]));
    // A plain column only: an update of the row touching no encrypted field.
    let mut closed = edited.clone();
    closed.status = "closed".into();
    assert_eq!(closed.update(&edited, &keyring, &mut conn).expect("update"), Updated::Applied { sealed: true });
    assert_eq!(summary(&log.take()), expected(&smith, AccessOp::Update, &owner, "phi_ac_cases", &ids[..1], &[]));
    // Nothing changed: nothing sealed, nothing recorded.
    assert_eq!(closed.update(&closed, &keyring, &mut conn).expect("update"), Updated::Unchanged);
    assert!(log.take().is_empty());

    // A blind-index lookup: the owner and field, no row.
    let roe = AcCase::patient_last_blind_index(&keyring, &owner, " ROE").expect("blind index");
    assert_eq!(summary(&log.take()), expected(&smith, AccessOp::Lookup, &owner, "phi_ac_cases", &[None], &["patient_last"]));
    let found = AcCase::load(phi_ac_cases::table.filter(phi_ac_cases::patient_last_bidx.eq_any(roe)), &mut conn, &keyring).expect("found");
    assert_eq!(found.len(), 1);
    log.take();

    // An export: the application's loads seen as exports.
    AcCase::load(mine(&owner), &mut conn, &keyring.for_operation(AccessOp::Export)).expect("export");
    assert_eq!(summary(&log.take()), expected(&smith, AccessOp::Export, &owner, "phi_ac_cases", &ids, CASE_FIELDS));

    // A delete the application tells phi about.
    let gone = AcCase::load(mine(&owner).filter(phi_ac_cases::case_id.eq(ids[2].clone().expect("id"))), &mut conn, &keyring).expect("row");
    log.take();
    diesel::delete(phi_ac_cases::table.find(&rows[2].case_id)).execute(&mut conn).expect("delete");
    gone[0].record_delete(&keyring).expect("record delete");
    assert_eq!(summary(&log.take()), expected(&smith, AccessOp::Delete, &owner, "phi_ac_cases", &ids[2..3], CASE_FIELDS));

    // Keyring::seal and Keyring::open: the scope's table and column.
    let sealed_value = keyring.seal(&SECRET_NOTE.to_string(), &owner, "phi_ac_cases.patient_note", b"R-9").expect("seal");
    let opened: String = keyring.open(sealed_value, &owner, "phi_ac_cases.patient_note", b"R-9").expect("open");
    assert_eq!(opened, SECRET_NOTE);
    let mut low = expected(&smith, AccessOp::Insert, &owner, "phi_ac_cases", &[Some("R-9".into())], &["patient_note"]);
    low.extend(expected(&smith, AccessOp::Read, &owner, "phi_ac_cases", &[Some("R-9".into())], &["patient_note"]));
    assert_eq!(summary(&log.take()), low);

    // Without an accessor (not strict): under the keyring's actor.
    AcCase::load(mine(&owner), &mut conn, &base).expect("load");
    let unattributed = Accessor::new("access-test", phi::access::UNATTRIBUTED_PURPOSE);
    assert_eq!(summary(&log.take()), expected(&unattributed, AccessOp::Read, &owner, "phi_ac_cases", &ids[..2], CASE_FIELDS));
}

#[test]
fn a_pipelined_load_records_every_row_in_one_append() {
    let db = TestDb::new();
    let mut conn = access_tables(&db);
    let log = Arc::new(MemoryAccessLog::new());
    let smith = dr_smith();
    let keyring = logged_keyring(&db, &log).on_behalf_of(&smith);
    let owner = common::unique_owner("acc-pipe");
    // More than a load chunk: read and opened in chunks on the pool.
    let rows = cases(&owner, phi::record::LOAD_CHUNK_ROWS + 200);
    insert_cases(&mut conn, &keyring, &rows);
    log.take();
    let before = log.appends();
    let loaded = AcCase::load(mine(&owner), &mut conn, &keyring).expect("load");
    assert_eq!(loaded.len(), rows.len());
    assert_eq!(log.appends(), before + 1, "one append per load");
    assert_eq!(summary(&log.take()), expected(&smith, AccessOp::Read, &owner, "phi_ac_cases", &row_ids(&rows), CASE_FIELDS));
}

#[test]
fn a_lookup_finder_records_lookups_of_the_rows_it_found() {
    let db = TestDb::new();
    let mut conn = access_tables(&db);
    let log = Arc::new(MemoryAccessLog::new());
    let smith = dr_smith();
    let keyring = logged_keyring(&db, &log).on_behalf_of(&smith);
    let tenant = common::unique_owner("acc-tenant");
    let email = format!("{tenant}@example.org");
    let user = AcUser { user_id: format!("{tenant}-u1"), tenant_id: tenant.clone(), email: email.clone() };
    let sealed = user.seal(&keyring).expect("seal");
    diesel::insert_into(phi_ac_users::table).values(&sealed).execute(&mut conn).expect("insert");
    log.take();
    let found = AcUser::find_by_email(&format!("  {}", email.to_uppercase()), &keyring, &mut conn).expect("find");
    assert!(found == vec![user.clone()]);
    assert_eq!(
        summary(&log.take()),
        expected(&smith, AccessOp::Lookup, &tenant, "phi_ac_users", &[Some(user.user_id.clone())], &["email"])
    );
}

#[test]
fn strict_mode_refuses_every_open_and_seal_without_an_accessor() {
    let db = TestDb::new();
    let mut conn = access_tables(&db);
    let log = Arc::new(MemoryAccessLog::new());
    let strict = Keyring::builder(db.store(), common::local_kek())
        .actor("access-test")
        .access_log(log.clone())
        .require_accessor(true)
        .build()
        .expect("keyring");
    assert!(strict.requires_accessor());
    let owner = common::unique_owner("acc-strict");
    let rows = cases(&owner, 2);

    let refused = |result: phi::Result<()>, op: &str| {
        let error = result.expect_err("refused without an accessor");
        assert!(matches!(error, Error::AccessorRequired { .. }), "{error:?}");
        assert_eq!(error.kind(), phi::ErrorKind::Refused);
        let text = error.to_string();
        assert!(text.starts_with(&format!("{op} of phi_ac_cases")), "{text}");
        assert!(text.contains("requires an accessor"), "{text}");
    };
    // A seal refused before any key is created.
    refused(AcCase::seal_all(&rows, &strict).map(drop), "insert");
    refused(rows[0].seal(&strict).map(drop), "insert");
    refused(strict.seal(&SECRET_NOTE.to_string(), &owner, "phi_ac_cases.patient_note", b"R-1").map(drop), "insert");
    assert_eq!(key_rows(&mut conn, &owner), 0, "no key was created for a refused seal");
    let mut edited = rows[0].clone();
    edited.patient_last = "Roe".into();
    refused(edited.changes(&rows[0], &strict).map(drop), "update");
    refused(AcCase::patient_last_blind_index(&strict, &owner, "Doe").map(drop), "lookup");
    refused(rows[0].record_delete(&strict), "delete");
    assert_eq!(key_rows(&mut conn, &owner), 0);

    // With an accessor everything passes; without, no read opens anything.
    let smith = dr_smith();
    let seen = strict.on_behalf_of(&smith);
    insert_cases(&mut conn, &seen, &rows);
    assert!(AcCase::load(mine(&owner), &mut conn, &seen).expect("load") == rows);
    let misses = strict.stats().misses;
    refused(AcCase::load(mine(&owner), &mut conn, &strict).map(drop), "read");
    let sealed = |conn: &mut Conn| mine(&owner).select(AcCaseSealed::as_select()).load::<AcCaseSealed>(conn).expect("rows");
    refused(AcCase::open_all(sealed(&mut conn), &strict).map(drop), "read");
    refused(AcCase::open_each(sealed(&mut conn), &strict).map(drop), "read");
    refused(AcCase::open_iter(sealed(&mut conn).into_iter().map(Ok), &strict).map(drop), "read");
    refused(AcCase::load(mine(&owner), &mut conn, &strict.for_operation(AccessOp::Export)).map(drop), "export");
    let value = sealed(&mut conn).remove(0).patient_last;
    refused(strict.open(value, &owner, "phi_ac_cases.patient_last", rows[0].case_id.as_bytes()).map(drop::<String>), "read");
    assert_eq!(strict.stats().misses, misses, "no key was even looked up");
    let records = log.take();
    assert_eq!(records.len(), 4, "two inserts and two reads, all by dr-smith");
    assert!(records.iter().all(|r| r.accessor == smith));
}

#[test]
fn a_log_that_refuses_fails_the_access_and_nothing_opened_is_returned() {
    let db = TestDb::new();
    let mut conn = access_tables(&db);
    let log = Arc::new(MemoryAccessLog::new());
    let keyring = logged_keyring(&db, &log).on_behalf_of(&dr_smith());
    let owner = common::unique_owner("acc-closed");
    let rows = cases(&owner, 2);
    insert_cases(&mut conn, &keyring, &rows);
    log.refuse_appends(true);

    let unavailable = |error: Error| {
        assert!(matches!(error, Error::AccessLogUnavailable { .. }), "{error:?}");
        assert!(error.is_retryable());
    };
    unavailable(AcCase::load(mine(&owner), &mut conn, &keyring).map(drop).expect_err("load refused"));
    let sealed = |conn: &mut Conn| mine(&owner).select(AcCaseSealed::as_select()).load::<AcCaseSealed>(conn).expect("rows");
    unavailable(AcCase::open_all(sealed(&mut conn), &keyring).map(drop).expect_err("open_all refused"));
    unavailable(AcCase::open_each(sealed(&mut conn), &keyring).map(drop).expect_err("open_each refused"));
    let value = sealed(&mut conn).remove(0).patient_last;
    unavailable(keyring.open::<String>(value, &owner, "phi_ac_cases.patient_last", rows[0].case_id.as_bytes()).map(drop).expect_err("open refused"));
    // Writes too: nothing sealed is handed back to be written.
    unavailable(AcCase::seal_all(&cases(&owner, 1), &keyring).map(drop).expect_err("seal refused"));
    let mut edited = rows[0].clone();
    edited.patient_last = "Roe".into();
    unavailable(edited.update(&rows[0], &keyring, &mut conn).map(drop).expect_err("update refused"));
    let stored = AcCase::load(mine(&owner), &mut conn, &keyring.for_operation(AccessOp::Read));
    assert!(stored.is_err());
    log.refuse_appends(false);
    assert!(AcCase::load(mine(&owner), &mut conn, &keyring).expect("load") == rows, "the refused update wrote nothing");
}

#[test]
fn access_events_on_the_tracing_target_carry_names_never_values() {
    let db = TestDb::new();
    let mut conn = access_tables(&db);
    let owner = common::unique_owner("acc-trace");
    let rows = cases(&owner, 2);
    let captured = common::access_events();
    // No access log: the records are built for the tracing target only.
    let keyring = Keyring::builder(db.store(), common::local_kek())
        .owner_ids_in_telemetry(phi::OwnerIdTelemetry::Hashed)
        .build()
        .expect("keyring")
        .on_behalf_of(&dr_smith());
    insert_cases(&mut conn, &keyring, &rows);
    AcCase::load(mine(&owner), &mut conn, &keyring).expect("load");
    let text = captured.text();
    let mine_only = format!("row=\"{owner}-");
    let events: Vec<&str> = text.lines().filter(|l| l.contains("phi::access") && l.contains(&mine_only)).collect();
    assert_eq!(events.len(), 4, "captured: {text:?}");
    for (event, op) in events.iter().zip(["insert", "insert", "read", "read"]) {
        for field in ["user=\"dr-smith\"", "purpose=\"treatment\"", "request_id=\"req-1\"", "table=phi_ac_cases", "patient_last", "patient_note"] {
            assert!(event.contains(field), "{field} missing: {event}");
        }
        assert!(event.contains(&format!("op=\"{op}\"")), "{event}");
        assert!(event.contains("owner=sha256:"), "owner ids hashed: {event}");
        assert!(!event.contains(&format!("owner={owner}")), "owner id in clear: {event}");
    }
    assert!(!text.contains(SECRET_LAST) && !text.contains(SECRET_NOTE), "a value was logged: {text}");
    assert!(text.lines().all(|l| l.contains("phi::access")), "only the access target is captured");

    // Nor in the records or their Debug.
    let log = Arc::new(MemoryAccessLog::new());
    let keyring = logged_keyring(&db, &log).on_behalf_of(&dr_smith());
    AcCase::load(mine(&owner), &mut conn, &keyring).expect("load");
    let records = format!("{:?}", log.records());
    assert!(records.contains("patient_note"));
    assert!(!records.contains(SECRET_LAST) && !records.contains(SECRET_NOTE), "{records}");
}

diesel::table! {
    phi_ac_jobs (case_id) {
        case_id -> Varchar,
        user_id -> Varchar,
        patient_last -> Binary,
        phi_encrypted -> Bool,
    }
}

#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(table = phi_ac_jobs, crate = phi, debug)]
#[diesel(primary_key(case_id))]
struct AcJob {
    #[phi(row_key)]
    case_id: String,
    #[phi(owner)]
    user_id: String,
    #[phi(encrypt)]
    patient_last: String,
    #[phi(encrypted_flag)]
    phi_encrypted: bool,
}

#[test]
fn the_jobs_record_each_batch_under_their_actor_even_in_strict_mode() {
    use phi::migrate::{self, MigrateOptions, VerifyOptions};
    let db = TestDb::new();
    let mut conn = db.conn();
    diesel::sql_query("DROP TABLE IF EXISTS phi_ac_jobs").execute(&mut conn).expect("drop");
    diesel::sql_query(format!(
        "CREATE TABLE phi_ac_jobs (case_id VARCHAR(255) NOT NULL PRIMARY KEY, user_id VARCHAR(255) NOT NULL, \
         patient_last {BLOB} NOT NULL, phi_encrypted BOOLEAN NOT NULL)"
    ))
    .execute(&mut conn)
    .expect("create");
    let log = Arc::new(MemoryAccessLog::new());
    // Strict: the jobs are recorded under the keyring's actor all the same.
    let keyring = Keyring::builder(db.store(), common::local_kek())
        .actor("nightly-backfill")
        .without_feed()
        .rollout(phi::Rollout::Nobody)
        .access_log(log.clone())
        .require_accessor(true)
        .build()
        .expect("keyring");
    let owner = common::unique_owner("acc-jobs");
    let rows: Vec<AcJob> = (1..=3)
        .map(|i| AcJob { case_id: format!("{owner}-{i}"), user_id: owner.clone(), patient_last: SECRET_LAST.into(), phi_encrypted: false })
        .collect();
    let smith = dr_smith();
    let sealed = AcJob::seal_all(&rows, &keyring.on_behalf_of(&smith)).expect("written unsealed");
    diesel::insert_into(phi_ac_jobs::table).values(&sealed).execute(&mut conn).expect("insert");
    log.take();
    let ids: Vec<Option<String>> = rows.iter().map(|r| Some(r.case_id.clone())).collect();
    let job = Accessor::new("nightly-backfill", phi::access::JOB_PURPOSE);
    let jobs = |what: &str| {
        let mut records = summary(&log.take());
        records.sort_by(|a, b| a.6.cmp(&b.6));
        assert_eq!(records, expected(&job, AccessOp::Job, &owner, "phi_ac_jobs", &ids, &["patient_last"]), "{what}");
    };

    let options = MigrateOptions::default().batch(2);
    let before = log.appends();
    let report = migrate::backfill::<AcJob, Conn>(&mut conn, &keyring, &options).expect("backfill");
    assert_eq!(report.rows, 3);
    assert_eq!(log.appends() - before, 2, "one append per batch of 2 + 1 rows");
    jobs("backfill");
    migrate::verify::<AcJob, Conn>(&mut conn, &keyring, &VerifyOptions::default()).expect("verify");
    jobs("verify");
    assert_eq!(phi::lifecycle::rotate(&keyring, &owner).expect("rotate"), 2);
    let table = phi::lifecycle::ResealTable::parse("phi_ac_jobs:user_id:case_id:patient_last:phi_encrypted#bool").expect("table");
    let resealed = phi::lifecycle::reseal(&mut conn, &keyring, &owner, &[table], &phi::lifecycle::ResealOptions::default().batch_size(10)).expect("reseal");
    assert_eq!(resealed.resealed, 3);
    jobs("reseal");
    // A job seen on behalf of an operator names the operator.
    let operator = Accessor::new("ops-jane", "rollback");
    migrate::decrypt_back::<AcJob, Conn>(&mut conn, &keyring.on_behalf_of(&operator), &options).expect("decrypt back");
    assert_eq!(summary(&log.take()), expected(&operator, AccessOp::Job, &owner, "phi_ac_jobs", &ids, &["patient_last"]));

    // A refusing log stops the job at its first batch.
    log.refuse_appends(true);
    let error = migrate::backfill::<AcJob, Conn>(&mut conn, &keyring, &options).expect_err("refused");
    assert!(matches!(error, Error::AccessLogUnavailable { .. }), "{error:?}");
}
