// Derived blind indexes: prefix, last digits, year and year-month finders,
// truncated tags, and their upkeep by the backfill, re-seal and rotation
// jobs. Included in `tests/suite/mod.rs`, so `Conn`, `BLOB`,
// `server_url()` and `TestDb` are in scope.

use std::collections::BTreeSet;

use phi::blind::{CompoundIndex, DerivedIndex, Normalize};
use phi::lifecycle::{self, ResealOptions};
use phi::migrate::{self, Migratable as _, MigrateOptions, VerifyOptions};
use chrono::Datelike as _;
use phi::Rollout;

diesel::table! {
    phi_sr_cases (case_id) {
        case_id -> Varchar,
        user_id -> Varchar,
        patient_last -> Binary,
        member_id -> Binary,
        patient_dob -> Binary,
        surgery_date -> Nullable<Binary>,
        phi_encrypted -> Bool,
        last_prefix -> Nullable<Binary>,
        member_last4 -> Nullable<Binary>,
        dob_year -> Nullable<Binary>,
        surgery_month -> Nullable<Binary>,
        patient_match -> Nullable<Binary>,
    }
}

/// A case with four derived indexes: type-ahead on the surname (3
/// characters, 2-bit tags: 4 buckets, so the surnames' 15 prefixes of 3
/// characters must share them), the last
/// four digits of the member number (16 bits), the year of birth (full
/// tags) and the month of surgery (8 bits); and the duplicate-patient
/// check, surname and date of birth together (12 bits: 4,096 buckets).
#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(
    table = phi_sr_cases,
    crate = phi,
    debug,
    compound_index(column = patient_match, fields(patient_last, patient_dob), bits = 12)
)]
#[diesel(primary_key(case_id))]
struct Case {
    #[phi(row_key)]
    case_id: String,
    #[phi(owner)]
    user_id: String,
    #[phi(encrypt, normalize = "trim,lowercase", index(column = last_prefix, prefix = 3, bits = 2))]
    patient_last: String,
    #[phi(encrypt, index(column = member_last4, last_digits = 4, bits = 16))]
    member_id: String,
    #[phi(encrypt, index(column = dob_year, year))]
    patient_dob: NaiveDate,
    #[phi(encrypt, index(column = surgery_month, year_month, bits = 8))]
    surgery_date: Option<NaiveDate>,
    #[phi(encrypted_flag)]
    phi_encrypted: bool,
}

const LAST_PREFIX: DerivedIndex = DerivedIndex::prefix(3).normalize(Normalize::TRIM_LOWERCASE).bits(2);
const SURGERY_MONTH: DerivedIndex = DerivedIndex::year_month().bits(8);
const PATIENT_MATCH: CompoundIndex = CompoundIndex::new(&[Normalize::TRIM_LOWERCASE, Normalize::NONE]).bits(12);
const PATIENT_SCOPE: &str = "phi_sr_cases.patient_last+phi_sr_cases.patient_dob";

fn prepare_cases(conn: &mut Conn) {
    // On a server, the table is made afresh once per run (its columns may
    // have changed since the last); each SQLite test has a file of its own.
    static CREATED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut created = CREATED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if server_url().is_some() {
        if *created {
            return;
        }
        diesel::sql_query("DROP TABLE IF EXISTS phi_sr_cases").execute(conn).expect("drop");
    }
    *created = true;
    let tag = match BLOB {
        "BYTEA" => "BYTEA",
        _ if server_url().is_some() => "VARBINARY(16)",
        _ => "BLOB",
    };
    let ddl = format!(
        "CREATE TABLE phi_sr_cases (case_id VARCHAR(64) NOT NULL PRIMARY KEY, \
         user_id VARCHAR(255) NOT NULL, patient_last {BLOB} NOT NULL, member_id {BLOB} NOT NULL, \
         patient_dob {BLOB} NOT NULL, surgery_date {BLOB} NULL, phi_encrypted BOOLEAN NOT NULL, \
         last_prefix {tag} NULL, member_last4 {tag} NULL, dob_year {tag} NULL, surgery_month {tag} NULL, \
         patient_match {tag} NULL)"
    );
    diesel::sql_query(ddl).execute(conn).expect("cases table");
    // Each finder is one indexed lookup on (owner, tag).
    for column in ["last_prefix", "member_last4", "dob_year", "surgery_month", "patient_match"] {
        let index = format!("CREATE INDEX phi_sr_cases_{column} ON phi_sr_cases (user_id, {column})");
        diesel::sql_query(index).execute(conn).expect("index");
    }
}

const SURNAMES: [&str; 24] = [
    "Marchbanks", "Martin", "MARSH", "Marquez", "Doe", "Dobson", "O'Neil", "Ng", "Li", "Élise",
    "élan", "Smith", "Smythe", "Garcia", "García", "Nguyen", "Nakamura", "Okafor", "Oduya", "Patel",
    "Pató", "Zhang", "Zhao", "  mart ",
];

/// `n` cases of `owner`, sealed or (`sealed` false) stored in the clear
/// with the flag off: surnames from a fixed list with collisions of every
/// kind, member numbers, dates of birth over 1950–1999 and surgery dates
/// over 2024–2026 (every seventh NULL).
fn cases(owner: &str, n: usize, sealed: bool) -> Vec<Case> {
    let day0 = NaiveDate::from_ymd_opt(1950, 1, 1).expect("date");
    let surgery0 = NaiveDate::from_ymd_opt(2024, 1, 1).expect("date");
    (0..n)
        .map(|i| Case {
            case_id: format!("{owner}-{i:04}"),
            user_id: owner.to_owned(),
            patient_last: SURNAMES[(i * 7) % SURNAMES.len()].to_owned(),
            member_id: format!("MBR-{:03}-{:04}", i % 17, (i * 37) % 10_000),
            patient_dob: day0 + chrono::Days::new(((i * 997) % 18_262) as u64),
            surgery_date: (i % 7 != 0).then(|| surgery0 + chrono::Days::new(((i * 13) % 1_096) as u64)),
            phi_encrypted: sealed,
        })
        .collect()
}

fn ids(mut found: Vec<Case>) -> Vec<String> {
    let mut out: Vec<String> = found.drain(..).map(|c| c.case_id).collect();
    out.sort();
    out
}

fn oracle(all: &[Case], keep: impl Fn(&Case) -> bool) -> Vec<String> {
    let mut out: Vec<String> = all.iter().filter(|c| keep(c)).map(|c| c.case_id.clone()).collect();
    out.sort();
    out
}

fn norm(s: &str) -> String {
    s.trim().to_lowercase()
}

fn digits(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

/// Every finder of every index, against the plaintext oracle.
fn check_every_finder(conn: &mut Conn, keyring: &Keyring, owner: &str, all: &[Case]) {
    for probe in ["mar", "MARS", "Mart", " mart", "smy", "éli", "gar", "garc", "garcí", "zzz"] {
        let found = Case::find_by_last_prefix(owner, probe, keyring, conn).expect("prefix");
        let wanted = oracle(all, |c| norm(&c.patient_last).starts_with(&norm(probe)));
        assert_eq!(ids(found), wanted, "surnames starting {probe:?}");
    }
    for probe in ["4477", "0000", "1-0370", "9990"] {
        let found = Case::find_by_member_last4(owner, probe, keyring, conn).expect("digits");
        let wanted = oracle(all, |c| digits(&c.member_id).ends_with(&digits(probe)));
        assert_eq!(ids(found), wanted, "member numbers ending {probe:?}");
    }
    for year in [1950, 1971, 1999, 2000] {
        let found = Case::find_by_dob_year(owner, year, keyring, conn).expect("year");
        assert_eq!(ids(found), oracle(all, |c| c.patient_dob.year() == year), "born in {year}");
    }
    for (year, month) in [(2024, 1), (2025, 6), (2026, 12), (2027, 1)] {
        let found = Case::find_by_surgery_month(owner, year, month, keyring, conn).expect("month");
        let wanted = oracle(all, |c| c.surgery_date.is_some_and(|d| d.year() == year && d.month() == month));
        assert_eq!(ids(found), wanted, "surgery in {year}-{month}");
    }
    // The duplicate check: surname (normalised) and date of birth at once.
    for case in all.iter().step_by(37) {
        let probe = format!("  {} ", case.patient_last.to_uppercase());
        let found = Case::find_by_patient_match(owner, &probe, &case.patient_dob, keyring, conn).expect("duplicates");
        let wanted = oracle(all, |c| norm(&c.patient_last) == norm(&probe) && c.patient_dob == case.patient_dob);
        assert!(wanted.contains(&case.case_id));
        assert_eq!(ids(found), wanted, "duplicates of {}", case.case_id);
    }
    let day = |y, m, d| NaiveDate::from_ymd_opt(y, m, d).expect("date");
    for (from, to) in [(day(2025, 3, 14), day(2025, 5, 2)), (day(2024, 12, 31), day(2024, 12, 31)), (day(2023, 1, 1), day(2027, 1, 1))] {
        let found = Case::find_surgery_month_between(owner, &from, &to, keyring, conn).expect("range");
        let wanted = oracle(all, |c| c.surgery_date.is_some_and(|d| from <= d && d <= to));
        assert_eq!(ids(found), wanted, "surgery from {from} to {to}");
    }
    for (from, to) in [(day(1960, 2, 29), day(1963, 7, 1)), (day(1999, 12, 31), day(1999, 12, 31))] {
        let found = Case::find_dob_year_between(owner, &from, &to, keyring, conn).expect("range");
        let wanted = oracle(all, |c| from <= c.patient_dob && c.patient_dob <= to);
        assert_eq!(ids(found), wanted, "born from {from} to {to}");
    }
}

/// The stored tags of `owner`'s rows equal those of their values under the
/// owner's current key version: the upkeep left none stale.
fn check_tags_current(conn: &mut Conn, keyring: &Keyring, owner: &str, all: &[Case]) {
    let keys = keyring.keys_for_open(owner).expect("keys");
    type Tags = (String, Option<Vec<u8>>, Option<Vec<u8>>);
    let stored: Vec<Tags> = phi_sr_cases::table
        .filter(phi_sr_cases::user_id.eq(owner))
        .select((phi_sr_cases::case_id, phi_sr_cases::last_prefix, phi_sr_cases::surgery_month))
        .load(conn)
        .expect("tags");
    assert_eq!(stored.len(), all.len());
    for (id, prefix, month) in stored {
        let case = all.iter().find(|c| c.case_id == id).expect("known row");
        let expected = keys.derived_index("phi_sr_cases.patient_last", &case.patient_last, &LAST_PREFIX).expect("tag");
        assert_eq!(prefix.as_deref(), Some(&expected[..]), "row {id}: prefix tag");
        assert_eq!(expected.len(), 1, "2 bits are stored as one byte");
        let expected = case
            .surgery_date
            .map(|d| keys.derived_index("phi_sr_cases.surgery_date", &d, &SURGERY_MONTH).expect("tag"));
        assert_eq!(month, expected, "row {id}: month tag");
    }
}

#[test]
fn derived_finders_match_a_plaintext_oracle_with_truncated_tags_colliding() {
    let db = TestDb::new();
    let mut conn = db.conn();
    prepare_cases(&mut conn);
    let keyring = db.keyring();
    let owner = common::unique_owner("sr-find");
    let other = common::unique_owner("sr-find-other");
    let mine = cases(&owner, 400, true);
    Case::insert_all(&mine, &keyring, &mut conn).expect("insert");
    // Another owner's cases share every value and are never found.
    Case::insert_all(&cases(&other, 60, true), &keyring, &mut conn).expect("insert");
    check_every_finder(&mut conn, &keyring, &owner, &mine);

    // The 2-bit prefix tags collide on purpose: fewer distinct tags than
    // distinct prefixes, and the rows of a tag include other prefixes,
    // which the finder dropped.
    let prefixes: BTreeSet<String> = mine.iter().map(|c| norm(&c.patient_last).chars().take(3).collect()).collect();
    let tags: BTreeSet<Option<Vec<u8>>> = phi_sr_cases::table
        .filter(phi_sr_cases::user_id.eq(&owner))
        .select(phi_sr_cases::last_prefix)
        .load::<Option<Vec<u8>>>(&mut conn)
        .expect("tags")
        .into_iter()
        .collect();
    assert!(tags.len() <= 4 && tags.len() < prefixes.len(), "{} tags for {} prefixes", tags.len(), prefixes.len());
    // Surnames shorter than the prefix ("Ng", "Li") are indexed whole, and
    // no search term of 3 characters selects them: skip them here.
    let collided = prefixes.iter().filter(|p| p.chars().count() == 3).any(|p| {
        let tags = Case::last_prefix_tags(&keyring, owner.as_str(), p).expect("tags");
        let selected: i64 = phi_sr_cases::table
            .filter(phi_sr_cases::user_id.eq(&owner))
            .filter(phi_sr_cases::last_prefix.eq_any(tags))
            .count()
            .get_result(&mut conn)
            .expect("count");
        usize::try_from(selected).expect("count") > oracle(&mine, |c| norm(&c.patient_last).starts_with(p.as_str())).len()
    });
    assert!(collided, "some tag selects rows of another prefix");

    // A probe shorter than the index is refused, naming column and index.
    let err = Case::find_by_last_prefix(owner.as_str(), "ma", &keyring, &mut conn).expect_err("short probe");
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("phi_sr_cases.patient_last") && text.contains("prefix(3)") && text.contains("3 characters"), "{text}");
    assert!(!text.contains("ma\""), "{text}");
    let err = Case::find_surgery_month_between(owner.as_str(), &NaiveDate::MIN, &NaiveDate::MAX, &keyring, &mut conn)
        .expect_err("too wide");
    assert!(err.to_string().contains("more than 1200 months"), "{err}");
    // An owner with no key finds nothing, and is not given one.
    let stranger = common::unique_owner("sr-none");
    assert!(Case::find_by_last_prefix(stranger.as_str(), "mar", &keyring, &mut conn).expect("none").is_empty());
}

#[test]
fn the_database_never_sees_a_prefix_digits_or_date_a_finder_looks_for() {
    let db = TestDb::new();
    let mut conn = db.conn();
    prepare_cases(&mut conn);
    let keyring = db.keyring();
    let owner = common::unique_owner("sr-sql");
    let mine = cases(&owner, 120, true);
    Case::insert_all(&mine, &keyring, &mut conn).expect("insert");
    let sent = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let record = sent.clone();
    conn.set_instrumentation(move |event: diesel::connection::InstrumentationEvent<'_>| {
        if let diesel::connection::InstrumentationEvent::StartQuery { query, .. } = event {
            record.lock().expect("sent").push(query.to_string());
        }
    });
    check_every_finder(&mut conn, &keyring, &owner, &mine);
    let sent = sent.lock().expect("sent");
    assert!(sent.len() >= 20, "{sent:?}");
    for statement in sent.iter().filter(|s| s.contains("phi_sr_cases")) {
        // The owner id is bound (its digits are a clock's): not a secret.
        let lower = statement.replace(&owner, "<owner>").to_lowercase();
        for secret in ["mar", "smy", "4477", "0370", "1950", "1971", "1999", "2025", "2024-12", "1963", "doe", "nguyen"] {
            assert!(!lower.contains(secret), "{secret:?} reached the database: {statement}");
        }
    }
}

#[test]
fn the_backfill_rotation_and_reseal_keep_every_finder_exact() {
    let db = TestDb::new();
    let mut conn = db.conn();
    prepare_cases(&mut conn);
    let keyring = db.keyring();
    let owner = common::unique_owner("sr-upkeep");
    // Rows stored in the clear before the roll-out: no tags.
    let mine = cases(&owner, 150, false);
    keyring.set_rollout(Rollout::Nobody);
    Case::insert_all(&mine, &keyring, &mut conn).expect("insert unsealed");
    let untagged: i64 = phi_sr_cases::table
        .filter(phi_sr_cases::user_id.eq(&owner))
        .filter(phi_sr_cases::last_prefix.is_not_null())
        .count()
        .get_result(&mut conn)
        .expect("count");
    assert_eq!(untagged, 0, "an unsealed row has no tags");
    keyring.set_rollout(Rollout::All);

    // The backfill seals the rows and writes their tags; verify checks them.
    migrate::backfill::<Case, _>(&mut conn, &keyring, &MigrateOptions::default().batch(40)).expect("backfill");
    check_tags_current(&mut conn, &keyring, &owner, &mine);
    check_every_finder(&mut conn, &keyring, &owner, &mine);
    let report = migrate::verify::<Case, _>(&mut conn, &keyring, &VerifyOptions::default()).expect("verify");
    assert!(report.failures.is_empty(), "{report}");

    // A stale tag is a verification failure naming the column.
    diesel::update(phi_sr_cases::table.find(format!("{owner}-0001")))
        .set(phi_sr_cases::member_last4.eq(Some(vec![0u8, 0])))
        .execute(&mut conn)
        .expect("tamper");
    let report = migrate::verify::<Case, _>(&mut conn, &keyring, &VerifyOptions::default()).expect("verify");
    assert!(
        report.failures.iter().any(|f| f.column == "member_last4" && f.row_key == format!("{owner}-0001")),
        "{report}"
    );

    // Rotation: new writes use version 2, and the re-seal rewrites each
    // value and its tags (the tampered one included) under it.
    assert_eq!(lifecycle::rotate(&keyring, &owner).expect("rotate"), 2);
    let table = Case::stored_table().reseal_table().expect("reseal table");
    lifecycle::reseal(&mut conn, &keyring, &owner, std::slice::from_ref(&table), &ResealOptions::default()).expect("reseal");
    check_tags_current(&mut conn, &keyring, &owner, &mine);
    check_every_finder(&mut conn, &keyring, &owner, &mine);
    let report = migrate::verify::<Case, _>(&mut conn, &keyring, &VerifyOptions::default()).expect("verify");
    assert!(report.failures.is_empty(), "{report}");

    // Population-wide rotation keeps them exact too.
    let options = lifecycle::RotateAllOptions::new(common::unique_owner("sr-job"));
    lifecycle::rotate_all(&mut conn, &keyring, &lifecycle::RotateOwners::List(vec![owner.clone()]), &[table], &options)
        .expect("rotate_all");
    let version = keyring.keys_for_open(&owner).expect("keys").current_version();
    assert_eq!(version, Some(3));
    check_tags_current(&mut conn, &keyring, &owner, &mine);
    check_every_finder(&mut conn, &keyring, &owner, &mine);

    // The compound tags are still those of version 1 (the re-seal leaves
    // them): the finders match them, and the re-index rewrites them under
    // the current version, as it fills an index added to sealed rows.
    let compound_of = |conn: &mut Conn| -> Vec<Option<Vec<u8>>> {
        phi_sr_cases::table
            .filter(phi_sr_cases::user_id.eq(&owner))
            .order(phi_sr_cases::case_id)
            .select(phi_sr_cases::patient_match)
            .load(conn)
            .expect("tags")
    };
    let before = compound_of(&mut conn);
    diesel::update(phi_sr_cases::table.filter(phi_sr_cases::user_id.eq(&owner)))
        .set((phi_sr_cases::last_prefix.eq(None::<Vec<u8>>), phi_sr_cases::dob_year.eq(None::<Vec<u8>>)))
        .execute(&mut conn)
        .expect("an index added after the rows were sealed");
    let dry = migrate::reindex::<Case, _>(&mut conn, &keyring, &MigrateOptions::default().dry_run(true)).expect("dry run");
    assert!(dry.written >= 150, "{dry}");
    assert_eq!(compound_of(&mut conn), before, "a dry run writes nothing");
    let report = migrate::reindex::<Case, _>(&mut conn, &keyring, &MigrateOptions::default().batch(64)).expect("reindex");
    assert!(report.written >= 150 && report.rows >= 150, "{report}");
    let after = compound_of(&mut conn);
    let keys = keyring.keys_for_open(&owner).expect("keys");
    let mut sorted = mine.clone();
    sorted.sort_by(|a, b| a.case_id.cmp(&b.case_id));
    for (case, stored) in sorted.iter().zip(&after) {
        let mut dob = Vec::new();
        phi::PhiValue::encode(&case.patient_dob, &mut dob);
        let expected = keys
            .compound_index(PATIENT_SCOPE, &[case.patient_last.as_bytes(), &dob], &PATIENT_MATCH)
            .expect("tag");
        assert_eq!(stored.as_deref(), Some(&expected[..]), "row {}: the compound tag under version 3", case.case_id);
    }
    check_tags_current(&mut conn, &keyring, &owner, &mine);
    check_every_finder(&mut conn, &keyring, &owner, &mine);
    let again = migrate::reindex::<Case, _>(&mut conn, &keyring, &MigrateOptions::default()).expect("again");
    assert_eq!(compound_of(&mut conn), after, "{again}");

    // A compound tag that does not match its values is a verification
    // failure naming the column; put back, the row verifies.
    let target = format!("{owner}-0003");
    let kept: Option<Vec<u8>> = phi_sr_cases::table
        .find(&target)
        .select(phi_sr_cases::patient_match)
        .first(&mut conn)
        .expect("tag");
    assert_eq!(kept.as_ref().map(Vec::len), Some(2), "12 bits in 2 bytes");
    let wrong = kept.as_ref().map(|t| vec![t[0] ^ 0x80, t[1]]);
    diesel::update(phi_sr_cases::table.find(&target))
        .set(phi_sr_cases::patient_match.eq(wrong))
        .execute(&mut conn)
        .expect("tamper");
    let failed = |conn: &mut Conn| {
        let report = migrate::verify::<Case, _>(conn, &keyring, &VerifyOptions::default()).expect("verify");
        report.failures.iter().any(|f| f.column == "patient_match" && f.row_key == target)
    };
    assert!(failed(&mut conn), "a stale compound tag is reported");
    diesel::update(phi_sr_cases::table.find(&target))
        .set(phi_sr_cases::patient_match.eq(kept))
        .execute(&mut conn)
        .expect("restore");
    assert!(!failed(&mut conn));

}
