// The set-up the guide's examples share (hidden from the rendered guide):
// a `cases` table on an in-memory SQLite database, its model, and a
// keyring over an in-memory key store with a fixed development key.
use std::sync::Arc;
use chrono::NaiveDate;
use diesel::prelude::*;
use phi_types::{KeyBytes, Keyring, LocalKek, MemoryKeyStore, PhiRecord, Updated};

diesel::table! {
    cases (case_id) {
        case_id -> Text,
        user_id -> Text,
        status -> Text,
        patient_last -> Binary,
        patient_dob -> Binary,
        ins_provider -> Nullable<Binary>,
        phi_encrypted -> Bool,
        patient_last_bidx -> Nullable<Binary>,
        last_prefix -> Nullable<Binary>,
        dob_year -> Nullable<Binary>,
    }
}

#[derive(PhiRecord, Clone, PartialEq)]
#[phi(table = cases, debug)]
#[diesel(primary_key(case_id))]
struct Case {
    #[phi(row_key)]
    case_id: String,
    #[phi(owner)]
    user_id: String,
    status: String,
    #[phi(
        encrypt,
        blind_index = patient_last_bidx,
        normalize = "trim,lowercase",
        index(column = last_prefix, prefix = 2, bits = 16)
    )]
    patient_last: String,
    #[phi(encrypt, index(column = dob_year, year))]
    patient_dob: NaiveDate,
    #[phi(encrypt)]
    ins_provider: Option<String>,
    #[phi(encrypted_flag)]
    phi_encrypted: bool,
}

/// An in-memory database with an empty `cases` table, a key store and a
/// KEK with a development key.
#[allow(dead_code)]
fn parts() -> Result<(SqliteConnection, Arc<MemoryKeyStore>, Arc<LocalKek>), Box<dyn std::error::Error>> {
    let mut conn = SqliteConnection::establish(":memory:")?;
    diesel::sql_query(
        "CREATE TABLE cases (case_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, \
         status TEXT NOT NULL, patient_last BLOB NOT NULL, patient_dob BLOB NOT NULL, \
         ins_provider BLOB, phi_encrypted BOOLEAN NOT NULL, patient_last_bidx BLOB, \
         last_prefix BLOB, dob_year BLOB)",
    )
    .execute(&mut conn)?;
    let kek = LocalKek::new("local-1", &KeyBytes::new([7; 32]));
    Ok((conn, Arc::new(MemoryKeyStore::new()), Arc::new(kek)))
}

/// [`parts`], with a keyring over them and one sealed case of
/// `provider-17` in the table.
#[allow(dead_code)]
fn setup() -> Result<(SqliteConnection, Keyring), Box<dyn std::error::Error>> {
    let (mut conn, store, kek) = parts()?;
    let keyring = Keyring::builder(store, kek).build()?;
    let case = Case {
        case_id: "C-1001".into(),
        user_id: "provider-17".into(),
        status: "open".into(),
        patient_last: "Doe".into(),
        patient_dob: NaiveDate::from_ymd_opt(1980, 1, 15).ok_or("date")?,
        ins_provider: Some("Acme Health".into()),
        phi_encrypted: true,
    };
    diesel::insert_into(cases::table).values(&case.seal(&keyring)?).execute(&mut conn)?;
    Ok((conn, keyring))
}
