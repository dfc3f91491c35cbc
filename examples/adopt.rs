//! Adopting phi on a table that predates it, with either strategy: the
//! walk-through of README.md's "Adopting phi on an existing database".
//!
//! The application is a small patient register on SQLite (`adopt.db`, or
//! `DATABASE_URL`). Its code changes as the adoption goes on, and
//! `ADOPT_PHASE` says which build is running:
//!
//! - `legacy`: before phi, plain columns, no phi model;
//! - `shadow`: the dual-write phase of the shadow strategy, the model with
//!   `#[phi(encrypt, shadow)]` (plain columns kept, sealed values in
//!   `<column>_encrypted`);
//! - `sealed`: the model once the columns hold envelopes, after the
//!   in-place migration or after `finalize`.
//!
//! Its own commands are `seed`, `admit`, `rename`, `digest` and `migrate`
//! (Diesel migrations from a directory); everything else is the
//! application's `phi` command (`phi_types::cli::App`): `migration generate`,
//! `backfill`, `verify`, `finalize`, `decrypt-back`, `status`, `rollout`
//! and the key commands.
//!
//! ```sh
//! export PHI_MASTER_KEY=$(openssl rand -base64 32)
//! cargo run --example adopt -- seed --patients 1000
//! ADOPT_PHASE=legacy cargo run --example adopt -- digest
//! cargo run --example adopt -- migration generate --model Patient --strategy shadow --dir adopt-migrations
//! ```

// A command-line program: its output is what it prints.
#![allow(clippy::print_stdout)]

use std::error::Error;
use std::process::ExitCode;
use std::sync::Arc;

use chrono::NaiveDate;
use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;
use diesel_migrations::{FileBasedMigrations, MigrationHarness};
use phi_types::cli::App;
use phi_types::{Keyring, LocalKek, PhiRecord};
use sha2::{Digest, Sha256};

type BoxError = Box<dyn Error>;

/// The build before phi: plain columns.
mod legacy {
    use super::*;

    diesel::table! {
        patients (id) {
            id -> BigInt,
            clinic -> Text,
            first_name -> Text,
            last_name -> Text,
            birth_date -> Date,
            insurer -> Nullable<Text>,
        }
    }

    /// A patient as the register stored it before phi.
    #[derive(Queryable, Selectable, Insertable, Clone)]
    #[allow(missing_debug_implementations)]
    #[diesel(table_name = patients)]
    pub(crate) struct Patient {
        pub(crate) id: i64,
        pub(crate) clinic: String,
        pub(crate) first_name: String,
        pub(crate) last_name: String,
        pub(crate) birth_date: NaiveDate,
        pub(crate) insurer: Option<String>,
    }
}

/// The dual-write build of the shadow strategy.
mod shadow {
    use super::*;

    diesel::table! {
        patients (id) {
            id -> BigInt,
            clinic -> Text,
            first_name -> Text,
            first_name_encrypted -> Nullable<Binary>,
            last_name -> Text,
            last_name_encrypted -> Nullable<Binary>,
            birth_date -> Date,
            birth_date_encrypted -> Nullable<Binary>,
            insurer -> Nullable<Text>,
            insurer_encrypted -> Nullable<Binary>,
            last_name_bidx -> Nullable<Binary>,
            phi_encrypted -> Bool,
        }
    }

    /// A patient, written both in plain and sealed while the roll-out runs.
    #[derive(PhiRecord, Clone)]
    #[phi(table = patients, debug)]
    pub(crate) struct Patient {
        #[phi(row_key)]
        pub(crate) id: i64,
        #[phi(owner)]
        pub(crate) clinic: String,
        #[phi(encrypt, shadow)]
        pub(crate) first_name: String,
        #[phi(encrypt, shadow, blind_index = last_name_bidx, normalize = "trim,lowercase")]
        pub(crate) last_name: String,
        #[phi(encrypt, shadow)]
        pub(crate) birth_date: NaiveDate,
        #[phi(encrypt, shadow)]
        pub(crate) insurer: Option<String>,
        #[phi(encrypted_flag)]
        pub(crate) phi_encrypted: bool,
    }
}

/// The build once the PHI columns hold envelopes.
mod sealed {
    use super::*;

    diesel::table! {
        patients (id) {
            id -> BigInt,
            clinic -> Text,
            first_name -> Binary,
            last_name -> Binary,
            birth_date -> Binary,
            insurer -> Nullable<Binary>,
            last_name_bidx -> Nullable<Binary>,
            phi_encrypted -> Bool,
        }
    }

    /// A patient, sealed in place.
    #[derive(PhiRecord, Clone)]
    #[phi(table = patients, debug)]
    pub(crate) struct Patient {
        #[phi(row_key)]
        pub(crate) id: i64,
        #[phi(owner)]
        pub(crate) clinic: String,
        #[phi(encrypt)]
        pub(crate) first_name: String,
        #[phi(encrypt, blind_index = last_name_bidx, normalize = "trim,lowercase")]
        pub(crate) last_name: String,
        #[phi(encrypt)]
        pub(crate) birth_date: NaiveDate,
        #[phi(encrypt)]
        pub(crate) insurer: Option<String>,
        #[phi(encrypted_flag)]
        pub(crate) phi_encrypted: bool,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Legacy,
    Shadow,
    Sealed,
}

fn phase() -> Result<Phase, BoxError> {
    match std::env::var("ADOPT_PHASE").as_deref() {
        Ok("legacy") | Err(_) => Ok(Phase::Legacy),
        Ok("shadow") => Ok(Phase::Shadow),
        Ok("sealed") => Ok(Phase::Sealed),
        Ok(other) => {
            Err(format!("ADOPT_PHASE={other:?}: expected legacy, shadow or sealed").into())
        }
    }
}

/// (id, clinic, first, last, birth date, insurer) of every patient.
type Plain = (i64, String, String, String, NaiveDate, Option<String>);

/// A patient of any build as its plain tuple.
macro_rules! plain {
    () => {
        |p| {
            (
                p.id,
                p.clinic,
                p.first_name,
                p.last_name,
                p.birth_date,
                p.insurer,
            )
        }
    };
}

fn all_plain(
    phase: Phase,
    conn: &mut SqliteConnection,
    keyring: &Keyring,
) -> Result<Vec<Plain>, BoxError> {
    Ok(match phase {
        Phase::Legacy => legacy::patients::table
            .order(legacy::patients::id)
            .select(legacy::Patient::as_select())
            .load(conn)?
            .into_iter()
            .map(plain!())
            .collect(),
        Phase::Shadow => shadow::Patient::load(
            shadow::patients::table.order(shadow::patients::id),
            conn,
            keyring,
        )?
        .into_iter()
        .map(plain!())
        .collect(),
        Phase::Sealed => sealed::Patient::load(
            sealed::patients::table.order(sealed::patients::id),
            conn,
            keyring,
        )?
        .into_iter()
        .map(plain!())
        .collect(),
    })
}

const FIRST: [&str; 8] = [
    "Maria", "Jonas", "Aiko", "Tomas", "Fatima", "Lena", "Kwame", "Ines",
];
const LAST: [&str; 8] = [
    "Okonkwo", "Quispe", "Lindahl", "García", "Haddad", "Nwosu", "Zhang", "O'Brien",
];

fn seed(conn: &mut SqliteConnection, patients: i64) -> Result<(), BoxError> {
    conn.batch_execute(
        "CREATE TABLE patients (id BIGINT NOT NULL PRIMARY KEY, clinic TEXT NOT NULL, \
         first_name TEXT NOT NULL, last_name TEXT NOT NULL, birth_date DATE NOT NULL, insurer TEXT); \
         CREATE INDEX patients_last_name ON patients (last_name);",
    )?;
    let rows: Vec<legacy::Patient> = (1..=patients)
        .map(|id| {
            let i = usize::try_from(id).unwrap_or_default();
            legacy::Patient {
                id,
                clinic: format!("clinic-{}", id % 5 + 1),
                first_name: FIRST[i % FIRST.len()].to_owned(),
                last_name: LAST[(i / 8) % LAST.len()].to_owned(),
                birth_date: NaiveDate::from_ymd_opt(
                    1940 + i32::try_from(id % 60).unwrap_or(0),
                    1 + u32::try_from(id % 12).unwrap_or(0),
                    1 + u32::try_from(id % 28).unwrap_or(0),
                )
                .unwrap_or_default(),
                insurer: (id % 3 != 0)
                    .then(|| ["Aetna", "Medicaid", "BlueCross"][i % 3].to_owned()),
            }
        })
        .collect();
    conn.transaction(|conn| {
        for chunk in rows.chunks(1000) {
            diesel::insert_into(legacy::patients::table)
                .values(chunk)
                .execute(conn)?;
        }
        Ok::<_, diesel::result::Error>(())
    })?;
    println!(
        "Created table patients (index patients_last_name) with {patients} patient(s) in plain text."
    );
    Ok(())
}

fn digest(rows: &[Plain]) -> String {
    let mut hash = Sha256::new();
    for (id, clinic, first, last, dob, insurer) in rows {
        hash.update(format!(
            "{id}\t{clinic}\t{first}\t{last}\t{dob}\t{}\n",
            insurer.as_deref().unwrap_or("-")
        ));
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn main() -> ExitCode {
    run().unwrap_or_else(|e| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    })
}

fn run() -> Result<ExitCode, BoxError> {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "adopt.db".into());
    let args: Vec<String> = std::env::args().collect();
    let phase = phase()?;
    let conn = || phi_types::sqlite::establish(url.trim_start_matches("sqlite://"));
    match args.get(1).map(String::as_str) {
        Some("seed") => {
            let patients = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(1000);
            seed(&mut conn()?, patients)?;
            return Ok(ExitCode::SUCCESS);
        }
        Some("migrate") => {
            let dir = args
                .get(3)
                .map(String::as_str)
                .unwrap_or("adopt-migrations");
            let migrations = FileBasedMigrations::from_path(dir)?;
            let mut conn = conn()?;
            if args.get(2).map(String::as_str) == Some("revert") {
                let version = conn
                    .revert_last_migration(migrations)
                    .map_err(|e| e.to_string())?;
                println!("Reverted {version}.");
            } else {
                for version in conn
                    .run_pending_migrations(migrations)
                    .map_err(|e| e.to_string())?
                {
                    println!("Applied {version}.");
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let kek = Arc::new(LocalKek::from_env("local-1")?);
    let keyring = Keyring::builder(phi_types::cli::key_store(&url)?, kek)
        .actor("adopt")
        .build()?;
    match args.get(1).map(String::as_str) {
        Some("digest") => {
            let rows = all_plain(phase, &mut conn()?, &keyring)?;
            println!("digest: {} ({} patients)", digest(&rows), rows.len());
            Ok(ExitCode::SUCCESS)
        }
        _ => {
            let app = App::new(url, keyring).name("adopt");
            Ok(match phase {
                Phase::Legacy | Phase::Sealed => app.model::<sealed::Patient>().run(),
                Phase::Shadow => app.model::<shadow::Patient>().run(),
            })
        }
    }
}
