//! The SQLite load of `benches/compare.rs` as one program per variant, for
//! an instruction profile (`valgrind --tool=callgrind`): instruction counts
//! do not depend on what else the machine runs.
//!
//! ```sh
//! cargo bench -p phi-benches --bench load_profile --no-run      # release build; prints the binary's path
//! BIN=target/release/deps/load_profile-…         # that path
//! valgrind --tool=callgrind --toggle-collect='load_profile::measured' $BIN plain
//! valgrind --tool=callgrind --toggle-collect='load_profile::measured' $BIN phi
//! callgrind_annotate --inclusive=yes callgrind.out.<pid>
//! ```
//!
//! Both variants create the same two tables on a temporary SQLite file
//! (`phi_cmp_plain` with the 4 PHI columns as text, `phi_cmp_sealed` with
//! them sealed by the `#[derive(PhiRecord)]` model `Case`), insert the same
//! `PHI_PROFILE_ROWS` cases (default 5,000, over 100 owners) into both and
//! resolve the owners' keys (a warm keyring); then `measured` does one load:
//! `plain` loads `phi_cmp_plain` into plain structs, `phi` runs
//! `Case::load(phi_cmp_sealed::table, …)`. `--toggle-collect` counts only
//! what runs inside `measured`. The keyring opens on the calling thread
//! (`parallel_min_rows` above the row count): instructions are the work
//! done, whichever thread does it, and a pool's idle spinning would count
//! too. Results: `benches/README.md`.
#![allow(clippy::print_stdout)]

use std::hint::black_box;
use std::sync::Arc;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use phi::{KeyBytes, KeyStore, Keyring, LocalKek, PhiRecord};

#[path = "common/cmp_model.rs"]
mod cmp_model;
use cmp_model::schema::{phi_cmp_plain, phi_cmp_sealed};
use cmp_model::{Case, PlainCase};

const OWNERS: usize = 100;

/// `rows` cases over [`OWNERS`] owners, fields from a fixed sequence (the
/// comparison's value lengths: names, a date, an insurer).
fn cases(rows: usize) -> Vec<Case> {
    const FIRST: [&str; 8] = [
        "Margaret", "James", "Aisha", "Wei", "Luis", "Olivia", "Noah", "Fatima",
    ];
    const LAST: [&str; 8] = [
        "Johnson", "García", "Nguyen", "Okafor", "Smith", "Kowalski", "Patel", "O'Brien",
    ];
    const INSURERS: [&str; 4] = ["Aetna", "Blue Cross Blue Shield", "Medicare", "Cigna"];
    (0..rows)
        .map(|i| Case {
            case_id: i64::try_from(i + 1).expect("row count fits i64"),
            user_id: format!("cmp-provider-{:03}", i % OWNERS),
            patient_first: FIRST[i % 8].to_owned(),
            patient_last: LAST[(i / 8) % 8].to_owned(),
            patient_dob: format!("{:04}-{:02}-{:02}", 1930 + i % 80, 1 + i % 12, 1 + i % 28),
            ins_provider: INSURERS[i % 4].to_owned(),
            status: i32::try_from(i % 4).expect("small status"),
        })
        .collect()
}

/// The one load the profile counts.
#[inline(never)]
fn measured(phi: bool, conn: &mut SqliteConnection, keyring: &Keyring) -> usize {
    if phi {
        let rows = Case::load(phi_cmp_sealed::table, conn, keyring).expect("phi load");
        black_box(rows).len()
    } else {
        let rows: Vec<PlainCase> = phi_cmp_plain::table
            .select(PlainCase::as_select())
            .load(conn)
            .expect("plaintext load");
        black_box(rows).len()
    }
}

fn main() {
    let phi = match std::env::args().nth(1).as_deref() {
        Some("phi") => true,
        Some("plain") => false,
        _ => panic!("usage: load_profile plain|phi"),
    };
    let rows: usize = std::env::var("PHI_PROFILE_ROWS")
        .ok()
        .map_or(5_000, |n| n.parse().expect("PHI_PROFILE_ROWS is a number"));
    let dir = tempfile::tempdir().expect("tempdir");
    let url = dir.path().join("profile.db").display().to_string();
    let mut conn = SqliteConnection::establish(&url).expect("open");
    conn.batch_execute(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
         CREATE TABLE phi_cmp_plain (case_id INTEGER PRIMARY KEY NOT NULL, user_id TEXT NOT NULL,
            patient_first TEXT NOT NULL, patient_last TEXT NOT NULL, patient_dob TEXT NOT NULL,
            ins_provider TEXT NOT NULL, status INTEGER NOT NULL);
         CREATE TABLE phi_cmp_sealed (case_id INTEGER PRIMARY KEY NOT NULL, user_id TEXT NOT NULL,
            patient_first BLOB NOT NULL, patient_last BLOB NOT NULL, patient_dob BLOB NOT NULL,
            ins_provider BLOB NOT NULL, status INTEGER NOT NULL);",
    )
    .expect("tables");
    let store: Arc<dyn KeyStore> = Arc::new(
        phi::DieselKeyStore::<SqliteConnection>::builder(&url)
            .run_migrations(true)
            .connect()
            .expect("key store"),
    );
    let kek = LocalKek::new("bench-profile", &KeyBytes::new([0x42; 32]));
    let keyring = Keyring::builder(store, Arc::new(kek))
        .parallel_min_rows(usize::MAX)
        .build()
        .expect("keyring");
    let data = cases(rows);
    let plain: Vec<PlainCase> = data
        .iter()
        .map(|c| PlainCase {
            case_id: c.case_id,
            user_id: c.user_id.clone(),
            patient_first: c.patient_first.clone(),
            patient_last: c.patient_last.clone(),
            patient_dob: c.patient_dob.clone(),
            ins_provider: c.ins_provider.clone(),
            status: c.status,
        })
        .collect();
    for (cases, plain) in data.chunks(1_000).zip(plain.chunks(1_000)) {
        let sealed = Case::seal_all(cases, &keyring).expect("seal");
        conn.transaction::<_, diesel::result::Error, _>(|conn| {
            diesel::insert_into(phi_cmp_sealed::table)
                .values(&sealed)
                .execute(conn)?;
            diesel::insert_into(phi_cmp_plain::table)
                .values(plain)
                .execute(conn)
        })
        .expect("insert");
    }
    // Warm: every owner's key cached before the measured load.
    keyring
        .keys_for_open_many(data.iter().map(|c| c.user_id.as_str()))
        .expect("keys");
    let loaded = measured(phi, &mut conn, &keyring);
    assert_eq!(loaded, rows);
    println!(
        "{} load of {rows} rows done",
        if phi { "phi" } else { "plaintext" }
    );
}
