//! A small clinic on SQLite: surgical cases whose patient fields are sealed
//! under each provider's own data key.
//!
//! ```sh
//! cargo run --example clinic
//! ```
//!
//! With no configuration it creates `clinic.db` in the current directory and
//! a development master key file beside it, seeds a few cases on the first
//! run, and on every run prints the cases decrypted, one stored value as the
//! raw bytes the database holds, and the keyring's counters. A second run
//! reuses the database and the key.
//!
//! - `DATABASE_URL`: another SQLite file.
//! - `PHI_MASTER_KEY` (base64) or `PHI_MASTER_KEY_FILE`: the master key, as
//!   production would set it.
#![allow(clippy::print_stdout)]

use std::error::Error;
use std::path::Path;
use std::sync::Arc;

use chrono::NaiveDate;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use phi::{DieselKeyStore, Keyring, LocalKek, PhiRecord};

mod schema {
    //! The clinic's table, as `diesel print-schema` prints it.
    #![allow(missing_docs)]
    diesel::table! {
        cases (case_id) {
            case_id -> Text,
            user_id -> Text,
            patient_first -> Binary,
            patient_last -> Binary,
            patient_dob -> Binary,
            ins_provider -> Nullable<Binary>,
            procedure_code -> Text,
            surgery_date -> Date,
            status -> Text,
        }
    }
}
use schema::cases;

/// A case as the application sees it: plain types. The derive generates
/// `CaseSealed`, what Diesel stores, with the PHI fields sealed under the
/// provider's own data key and bound to the case id.
#[derive(PhiRecord)]
#[phi(crate = phi, table = cases)]
#[diesel(primary_key(case_id))]
struct Case {
    #[phi(row_key)]
    case_id: String,
    #[phi(owner)]
    user_id: String,
    #[phi(encrypt)]
    patient_first: String,
    #[phi(encrypt)]
    patient_last: String,
    #[phi(encrypt)]
    patient_dob: NaiveDate,
    #[phi(encrypt)]
    ins_provider: Option<String>,
    procedure_code: String,
    surgery_date: NaiveDate,
    status: String,
}

const DEV_KEY_FILE: &str = "clinic-dev-master.key";

fn main() -> Result<(), Box<dyn Error>> {
    let database = std::env::var("DATABASE_URL").unwrap_or_else(|_| "clinic.db".into());
    let database = database
        .strip_prefix("sqlite://")
        .unwrap_or(&database)
        .to_owned();

    let mut conn = SqliteConnection::establish(&database)?;
    conn.batch_execute(
        "PRAGMA journal_mode = WAL;
         CREATE TABLE IF NOT EXISTS cases (
             case_id        TEXT PRIMARY KEY NOT NULL,
             user_id        TEXT NOT NULL,
             patient_first  BLOB NOT NULL,
             patient_last   BLOB NOT NULL,
             patient_dob    BLOB NOT NULL,
             ins_provider   BLOB,
             procedure_code TEXT NOT NULL,
             surgery_date   DATE NOT NULL,
             status         TEXT NOT NULL
         );",
    )?;

    // The key store runs phi's migrations and keeps a pool of its own.
    let store = Arc::new(DieselKeyStore::<SqliteConnection>::connect(&database)?);
    let keyring = Keyring::builder(store, Arc::new(master_key()?))
        .actor("clinic-example")
        .build()?;

    let existing: i64 = cases::table.count().get_result(&mut conn)?;
    if existing == 0 {
        seed(&mut conn, &keyring)?;
        println!("Seeded {} cases into {database}.", seed_cases().len());
    } else {
        println!("Reusing {database} ({existing} cases).");
    }

    // One query, then one key-store query and one unwrap per provider
    // (however many rows), then every field opened.
    let all = Case::load(cases::table.order(cases::case_id), &mut conn, &keyring)?;
    let raw: Option<Vec<u8>> = cases::table
        .order(cases::case_id)
        .select(cases::patient_last)
        .first(&mut conn)
        .optional()?;

    println!();
    println!(
        "{:<8} {:<12} {:<22} {:<10} {:<14} {:<6} {:<10} status",
        "case", "provider", "patient", "born", "insurer", "proc", "surgery"
    );
    for case in all {
        println!(
            "{:<8} {:<12} {:<22} {:<10} {:<14} {:<6} {:<10} {}",
            case.case_id,
            case.user_id,
            format!("{} {}", case.patient_first, case.patient_last),
            case.patient_dob,
            case.ins_provider.as_deref().unwrap_or("-"),
            case.procedure_code,
            case.surgery_date,
            case.status,
        );
    }
    if let Some(raw) = raw {
        println!();
        println!(
            "What the database holds for the first case's patient_last ({} bytes):",
            raw.len()
        );
        println!("  {}", hex(&raw));
        println!("  F1 = magic, 01 = format v1, then the key version, nonce, ciphertext and tag.");
    }
    println!();
    println!("Keyring: {:?}", keyring.stats());
    Ok(())
}

/// The master key: from the environment as in production, else a
/// development key file created on the first run.
fn master_key() -> Result<LocalKek, Box<dyn Error>> {
    if std::env::var_os(phi::MASTER_KEY_ENV).is_some()
        || std::env::var_os(phi::MASTER_KEY_FILE_ENV).is_some()
    {
        return Ok(LocalKek::from_env("local-1")?);
    }
    let path = Path::new(DEV_KEY_FILE);
    if !path.exists() {
        let key = LocalKek::generate_master_key_base64()?;
        write_private(path, key.as_bytes())?;
        eprintln!(
            "warning: created {DEV_KEY_FILE}, a master key for development only; \
             production sets PHI_MASTER_KEY / PHI_MASTER_KEY_FILE or uses a KMS"
        );
    }
    Ok(LocalKek::from_file("local-1", path)?)
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

fn seed_cases() -> Vec<Case> {
    let date = |y, m, d| NaiveDate::from_ymd_opt(y, m, d).unwrap_or_default();
    let case = |id: &str,
                user: &str,
                first: &str,
                last: &str,
                dob,
                ins: Option<&str>,
                code: &str,
                surgery,
                status: &str| Case {
        case_id: id.into(),
        user_id: user.into(),
        patient_first: first.into(),
        patient_last: last.into(),
        patient_dob: dob,
        ins_provider: ins.map(Into::into),
        procedure_code: code.into(),
        surgery_date: surgery,
        status: status.into(),
    };
    vec![
        case(
            "C-1001",
            "dr-okafor",
            "Jane",
            "Doe",
            date(1980, 1, 15),
            Some("Aetna"),
            "27447",
            date(2026, 12, 2),
            "scheduled",
        ),
        case(
            "C-1002",
            "dr-okafor",
            "Luis",
            "García",
            date(1955, 7, 3),
            Some("Medicare"),
            "29881",
            date(2026, 12, 9),
            "scheduled",
        ),
        case(
            "C-1003",
            "dr-lindqvist",
            "Amara",
            "Nwosu",
            date(1992, 11, 28),
            None,
            "47562",
            date(2026, 11, 20),
            "completed",
        ),
        case(
            "C-1004",
            "dr-lindqvist",
            "Wei",
            "Zhang",
            date(1948, 3, 9),
            Some("Kaiser"),
            "33533",
            date(2026, 12, 15),
            "scheduled",
        ),
        case(
            "C-1005",
            "dr-haddad",
            "Noor",
            "Haddad-Ali",
            date(2001, 5, 21),
            Some("Cigna"),
            "49505",
            date(2026, 11, 30),
            "cancelled",
        ),
    ]
}

fn seed(conn: &mut SqliteConnection, keyring: &Keyring) -> Result<(), Box<dyn Error>> {
    // Sealed before the write transaction: a new provider's data key is
    // committed to the key store before anything is sealed under it.
    let sealed = Case::seal_all(&seed_cases(), keyring)?;
    conn.transaction(|conn| {
        diesel::insert_into(cases::table)
            .values(&sealed)
            .execute(conn)
    })?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(" ")
}
