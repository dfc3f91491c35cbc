// UUID owners and row keys, UTC timestamps and JSON values through derived
// models, and a parent/child pair whose sealed structs derive
// `Identifiable` and `Associations`. Included in `tests/suite/mod.rs`, so
// `Conn`, `BLOB`, `server_url()`, `TestDb` and `key_rows` are in scope.

use std::hash::{BuildHasher, Hasher};

use chrono::{DateTime, Utc};
use phi::{OwnerId, PhiRecord, RowKey};

/// Each backend stores a UUID key as Diesel users store it there:
/// PostgreSQL's `uuid` type (Diesel's `Uuid`, a `uuid::Uuid` field); the 16
/// bytes in MySQL `BINARY(16)` and SQLite `BLOB` (Diesel's `Binary`, a
/// `BinaryUuid` field). `UuidId`, `UuidSql` and `UUID_DDL` come from
/// `tests/backends.rs`.
type Id = UuidId;
type IdSql = UuidSql;

diesel::table! {
    use diesel::sql_types::*;
    use super::IdSql;

    phi_it_uuid_patients (patient_id) {
        patient_id -> IdSql,
        clinic_id -> IdSql,
        full_name -> Binary,
        admitted_at -> Binary,
        chart -> Nullable<Binary>,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use super::IdSql;

    phi_it_uuid_visits (visit_id) {
        visit_id -> IdSql,
        patient_id -> IdSql,
        reason -> Binary,
        seen_at -> Binary,
    }
}

diesel::joinable!(phi_it_uuid_visits -> phi_it_uuid_patients (patient_id));
diesel::allow_tables_to_appear_in_same_query!(phi_it_uuid_patients, phi_it_uuid_visits);

/// A patient's record, sealed under its clinic's key.
#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(table = phi_it_uuid_patients, crate = phi, debug, sealed_derive(Identifiable))]
#[diesel(primary_key(patient_id))]
struct Patient {
    #[phi(row_key)]
    patient_id: Id,
    #[phi(owner)]
    clinic_id: Id,
    #[phi(encrypt)]
    full_name: String,
    #[phi(encrypt)]
    admitted_at: DateTime<Utc>,
    #[phi(encrypt)]
    chart: Option<serde_json::Value>,
}

/// A visit belongs to its patient, and is sealed under the patient's own
/// key.
#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(
    table = phi_it_uuid_visits,
    crate = phi,
    debug,
    sealed_derive(Identifiable, Associations),
    sealed_attr(diesel(belongs_to(PatientSealed, foreign_key = patient_id)))
)]
#[diesel(primary_key(visit_id))]
struct Visit {
    #[phi(row_key)]
    visit_id: Id,
    #[phi(owner)]
    patient_id: Id,
    #[phi(encrypt)]
    reason: String,
    #[phi(encrypt)]
    seen_at: DateTime<Utc>,
}

fn prepare_uuid_tables(conn: &mut Conn) {
    static DDL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = DDL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let id = UUID_DDL;
    for ddl in [
        format!(
            "CREATE TABLE IF NOT EXISTS phi_it_uuid_patients (patient_id {id} NOT NULL PRIMARY KEY, \
             clinic_id {id} NOT NULL, full_name {BLOB} NOT NULL, admitted_at {BLOB} NOT NULL, chart {BLOB} NULL)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS phi_it_uuid_visits (visit_id {id} NOT NULL PRIMARY KEY, \
             patient_id {id} NOT NULL, reason {BLOB} NOT NULL, seen_at {BLOB} NOT NULL)"
        ),
    ] {
        diesel::sql_query(ddl).execute(conn).expect("UUID test tables");
    }
}

/// A UUID no other test or run uses (random bits from the standard
/// library's hasher seeds).
fn fresh_uuid() -> uuid::Uuid {
    let random = || std::collections::hash_map::RandomState::new().build_hasher().finish();
    uuid::Builder::from_random_bytes(
        ((u128::from(random()) << 64) | u128::from(random())).to_be_bytes(),
    )
    .into_uuid()
}

fn instant(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .expect("an RFC 3339 instant")
        .with_timezone(&Utc)
}

fn patient(clinic: Id, name: &str, chart: Option<serde_json::Value>) -> Patient {
    Patient {
        patient_id: Id::from(fresh_uuid()),
        clinic_id: clinic,
        full_name: name.to_owned(),
        admitted_at: instant("2024-03-01T08:30:00.123456789Z"),
        chart,
    }
}

fn visit(patient: &Patient, reason: &str, seen_at: &str) -> Visit {
    Visit {
        visit_id: Id::from(fresh_uuid()),
        patient_id: patient.patient_id,
        reason: reason.to_owned(),
        seen_at: instant(seen_at),
    }
}

fn insert_patients(conn: &mut Conn, keyring: &Keyring, patients: &[Patient]) {
    for row in Patient::seal_all(patients, keyring).expect("seal patients") {
        diesel::insert_into(phi_it_uuid_patients::table)
            .values(&row)
            .execute(conn)
            .expect("insert patient");
    }
}

fn insert_visits(conn: &mut Conn, keyring: &Keyring, visits: &[Visit]) {
    for row in Visit::seal_all(visits, keyring).expect("seal visits") {
        diesel::insert_into(phi_it_uuid_visits::table)
            .values(&row)
            .execute(conn)
            .expect("insert visit");
    }
}

#[test]
fn uuid_keys_utc_timestamps_and_json_round_trip_through_a_derived_model() {
    let db = TestDb::new();
    let mut conn = db.conn();
    prepare_uuid_tables(&mut conn);
    let keyring = db.keyring();
    let chart = serde_json::json!({
        "allergies": ["penicillin", "latex"],
        "weight_kg": 72.5,
        "smoker": false,
        "name": "Zoë Ñúñez",
    });
    let clinic = Id::from(fresh_uuid());
    let with_chart = patient(clinic, "Zoë Ñúñez", Some(chart));
    let without = patient(clinic, "John Roe", None);
    insert_patients(&mut conn, &keyring, &[with_chart.clone(), without.clone()]);

    for expected in [&with_chart, &without] {
        let loaded = Patient::load(
            phi_it_uuid_patients::table.find(expected.patient_id),
            &mut conn,
            &keyring,
        )
        .expect("loads");
        assert!(loaded == vec![expected.clone()], "{:?} != {expected:?}", loaded);
    }

    // The column holds the UUID's 16 bytes (PostgreSQL's `uuid` in its
    // binary form, `BINARY(16)` and `BLOB` as written).
    let stored: Vec<u8> = phi_it_uuid_patients::table
        .filter(phi_it_uuid_patients::patient_id.eq(with_chart.patient_id))
        .select(diesel::dsl::sql::<diesel::sql_types::Binary>("patient_id"))
        .first(&mut conn)
        .expect("the stored key");
    let as_uuid = uuid::Uuid::parse_str(&with_chart.patient_id.owner_id()).expect("a UUID");
    assert_eq!(stored, as_uuid.as_bytes());

    // The key tables name the owner by its lowercase hyphenated text.
    let owner_text = clinic.owner_id().into_owned();
    let parsed = uuid::Uuid::parse_str(&owner_text).expect("the owner id is a UUID");
    assert_eq!(parsed.hyphenated().to_string(), owner_text);
    assert_eq!(key_rows(&mut conn, &owner_text), 1);
    let row_text = with_chart.patient_id.owner_id().into_owned();
    assert_eq!(&*with_chart.patient_id.row_key(), row_text.as_bytes());

    // Each value is bound to the owner's and the row's UUID text: it opens
    // under that binding, and not under another row's.
    let sealed: PatientSealed = phi_it_uuid_patients::table
        .find(with_chart.patient_id)
        .select(PatientSealed::as_select())
        .first(&mut conn)
        .expect("sealed row");
    let name: String = keyring
        .open(
            sealed.full_name.clone(),
            &owner_text,
            "phi_it_uuid_patients.full_name",
            row_text.as_bytes(),
        )
        .expect("opens under the UUID text binding");
    assert_eq!(name, "Zoë Ñúñez");
    let other_row = without.patient_id.row_key();
    let err = keyring
        .open::<String>(
            sealed.full_name,
            &owner_text,
            "phi_it_uuid_patients.full_name",
            &other_row,
        )
        .expect_err("bound to its own row");
    assert!(err.to_string().contains(&owner_text), "{err}");

    // The timestamp's and the JSON's plaintext encodings.
    let keys = keyring.keys_for_open(&owner_text).expect("keys");
    let admitted: Vec<u8> = keys
        .open(
            phi::Encrypted::<Vec<u8>>::from_bytes(sealed.admitted_at.into_bytes()),
            "phi_it_uuid_patients.admitted_at",
            row_text.as_bytes(),
        )
        .expect("opens as bytes");
    assert_eq!(admitted, b"2024-03-01T08:30:00.123456789Z");
    let chart_bytes: Vec<u8> = keys
        .open(
            phi::Encrypted::<Vec<u8>>::from_bytes(
                sealed.chart.expect("a chart").into_bytes(),
            ),
            "phi_it_uuid_patients.chart",
            row_text.as_bytes(),
        )
        .expect("opens as bytes");
    assert_eq!(
        String::from_utf8(chart_bytes).expect("JSON text is UTF-8"),
        r#"{"allergies":["penicillin","latex"],"name":"Zoë Ñúñez","smoker":false,"weight_kg":72.5}"#
    );
}

#[test]
fn visits_grouped_by_their_patients_open_under_each_patients_key() {
    let db = TestDb::new();
    let mut conn = db.conn();
    prepare_uuid_tables(&mut conn);
    let keyring = db.keyring();
    let clinic = Id::from(fresh_uuid());
    let ann = patient(clinic, "Ann Doe", None);
    let bob = patient(clinic, "Bob Roe", Some(serde_json::json!({"blood_type": "O-"})));
    let idle = patient(clinic, "Cy Poe", None);
    insert_patients(&mut conn, &keyring, &[ann.clone(), bob.clone(), idle.clone()]);
    let visits = [
        visit(&ann, "follow-up: knee", "2024-03-02T09:00:00Z"),
        visit(&bob, "annual check", "2024-03-03T10:15:30.5Z"),
        visit(&ann, "physiotherapy", "2024-03-09T09:00:00Z"),
    ];
    insert_visits(&mut conn, &keyring, &visits);

    let ids = [ann.patient_id, bob.patient_id, idle.patient_id];
    let mut patients: Vec<PatientSealed> = phi_it_uuid_patients::table
        .filter(phi_it_uuid_patients::patient_id.eq_any(ids))
        .select(PatientSealed::as_select())
        .load(&mut conn)
        .expect("patients");
    // In the order of `ids`, whatever order the database returns.
    patients.sort_by_key(|p| ids.iter().position(|id| *id == p.patient_id));
    let children: Vec<VisitSealed> = VisitSealed::belonging_to(&patients)
        .select(VisitSealed::as_select())
        .load(&mut conn)
        .expect("visits belonging to the patients");
    assert_eq!(children.len(), 3);
    let grouped: Vec<Vec<VisitSealed>> = children.grouped_by(&patients);
    assert_eq!(grouped.len(), 3);

    let opened_patients = Patient::open_all(patients, &keyring).expect("patients open");
    assert!(opened_patients == vec![ann.clone(), bob.clone(), idle.clone()]);
    let mut expected: Vec<Vec<Visit>> = vec![
        vec![visits[0].clone(), visits[2].clone()],
        vec![visits[1].clone()],
        Vec::new(),
    ];
    for (group, want) in grouped.into_iter().zip(&mut expected) {
        let mut opened = Visit::open_all(group, &keyring).expect("a patient's visits open");
        opened.sort_by_key(|v| v.seen_at);
        want.sort_by_key(|v| v.seen_at);
        assert!(opened == *want, "{opened:?} != {want:?}");
    }

    // A visit is sealed under its patient's key: moved to another patient,
    // it does not open.
    let moved: Vec<VisitSealed> = VisitSealed::belonging_to(&idle_sealed(&mut conn, &idle))
        .select(VisitSealed::as_select())
        .load(&mut conn)
        .expect("no visits");
    assert!(moved.is_empty());
    diesel::update(phi_it_uuid_visits::table.find(visits[1].visit_id))
        .set(phi_it_uuid_visits::patient_id.eq(ann.patient_id))
        .execute(&mut conn)
        .expect("moves the visit");
    let err = Visit::load(
        phi_it_uuid_visits::table.find(visits[1].visit_id),
        &mut conn,
        &keyring,
    )
    .expect_err("a visit moved to another patient does not open");
    let owner = ann.patient_id.owner_id();
    assert!(err.to_string().contains(&*owner), "{err}");
    assert!(!err.to_string().contains("annual check"), "{err}");
}

fn idle_sealed(conn: &mut Conn, idle: &Patient) -> Vec<PatientSealed> {
    phi_it_uuid_patients::table
        .find(idle.patient_id)
        .select(PatientSealed::as_select())
        .load(conn)
        .expect("the idle patient")
}
