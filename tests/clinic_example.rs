//! The clinic example (`examples/clinic/`), run as the built binary in a
//! temporary directory on SQLite: what its first run leaves behind, a
//! tampered value, and a legacy database sealed and rolled back with the
//! data unchanged.
//!
//! `cargo test` builds the examples before running the tests; run alone,
//! this test needs `cargo build --example clinic` first.
#![cfg(feature = "sqlite")]

use std::path::PathBuf;
use std::process::{Command, Stdio};

use diesel::prelude::*;

/// The example's binary, beside the test binaries' directory.
fn clinic_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let mut dir = exe.parent().expect("test binary directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let binary = dir
        .join("examples")
        .join(format!("clinic{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.exists(),
        "{} is missing: build it with `cargo build --example clinic`",
        binary.display()
    );
    binary
}

struct Clinic {
    dir: tempfile::TempDir,
}

impl Clinic {
    fn new() -> Clinic {
        Clinic {
            dir: tempfile::tempdir().expect("temporary directory"),
        }
    }

    /// Runs the clinic with `args`: success, stdout, stderr.
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let output = Command::new(clinic_binary())
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("PHI_MASTER_KEY")
            .env_remove("PHI_MASTER_KEY_FILE")
            .env_remove("PHI_KEK")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("the clinic runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args);
        assert!(ok, "clinic {args:?} failed:\n{out}\n{err}");
        out
    }

    fn conn(&self) -> SqliteConnection {
        let path = self.dir.path().join("clinic.db");
        SqliteConnection::establish(&path.display().to_string()).expect("database")
    }

    /// Every stored value of the PHI columns, as (case id, column, bytes).
    fn phi_values(&self) -> Vec<(String, &'static str, Option<Vec<u8>>)> {
        let mut conn = self.conn();
        let mut values = Vec::new();
        for column in [
            "patient_first",
            "patient_last",
            "patient_dob",
            "ins_provider",
        ] {
            let rows: Vec<PhiValue> = diesel::sql_query(format!(
                "SELECT case_id, {column} AS value FROM cases ORDER BY case_id"
            ))
            .load(&mut conn)
            .expect("values");
            values.extend(rows.into_iter().map(|r| (r.case_id, column, r.value)));
        }
        values
    }
}

#[derive(QueryableByName)]
struct PhiValue {
    #[diesel(sql_type = diesel::sql_types::Text)]
    case_id: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Binary>)]
    value: Option<Vec<u8>>,
}

#[test]
fn first_run_seeds_and_a_second_run_reuses_the_database_and_key() {
    let clinic = Clinic::new();
    let (ok, first, err) = clinic.run(&[]);
    assert!(ok, "{first}\n{err}");
    assert!(first.contains("Seeded 5 cases into clinic.db."), "{first}");
    assert!(err.contains("development only"), "{err}");
    let key = clinic.dir.path().join("clinic-dev-master.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key)
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let second = clinic.ok(&[]);
    assert!(second.contains("Reusing clinic.db (5 cases)."), "{second}");
    assert!(
        second.lines().any(|l| l.starts_with("  F1 01 ")),
        "{second}"
    );
    assert!(second.contains("Jane Doe"), "{second}");
}

#[derive(QueryableByName)]
struct KekId {
    #[diesel(sql_type = diesel::sql_types::Text)]
    kek_id: String,
}

fn kek_ids(clinic: &Clinic) -> Vec<String> {
    let rows: Vec<KekId> = diesel::sql_query(
        "SELECT DISTINCT kek_id FROM user_encryption_keys UNION SELECT kek_id FROM kek_check_values ORDER BY 1",
    )
    .load(&mut clinic.conn())
    .expect("kek ids");
    rows.into_iter().map(|r| r.kek_id).collect()
}

#[test]
fn the_development_key_has_a_kek_id_of_its_own_and_never_joins_another_kek() {
    let clinic = Clinic::new();
    clinic.ok(&[]);
    assert_eq!(kek_ids(&clinic), ["clinic-dev"]);

    // A database whose keys a configured master key wrapped (KEK local-1).
    let configured = Clinic::new();
    let output = Command::new(clinic_binary())
        .env_remove("DATABASE_URL")
        .env_remove("PHI_MASTER_KEY_FILE")
        .env_remove("PHI_KEK")
        .env(
            "PHI_MASTER_KEY",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        )
        .current_dir(configured.dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("the clinic runs");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(kek_ids(&configured), ["local-1"]);
    // Started without its key: refused, and no development key is made.
    let (ok, out, err) = configured.run(&[]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("local-1")
            && err.contains("no master key is configured")
            && err.contains("PHI_MASTER_KEY_FILE"),
        "{err}"
    );
    assert!(!configured.dir.path().join("clinic-dev-master.key").exists());
    assert_eq!(kek_ids(&configured), ["local-1"], "nothing written");

    // The development database with the wrong master key under its id:
    // refused by the check value.
    let output = Command::new(clinic_binary())
        .env_remove("DATABASE_URL")
        .env_remove("PHI_MASTER_KEY_FILE")
        .env("PHI_KEK", "local:clinic-dev")
        .env(
            "PHI_MASTER_KEY",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        )
        .current_dir(clinic.dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("the clinic runs");
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{err}");
    assert!(err.contains("KEK \"clinic-dev\" is not the key"), "{err}");
}

#[test]
fn demo_stores_no_patient_data_in_the_clear() {
    let clinic = Clinic::new();
    let out = clinic.ok(&["demo", "--owners", "4", "--cases-per-owner", "25"]);
    assert!(out.contains("Stored 100 case(s)"), "{out}");
    for (id, column, value) in clinic.phi_values() {
        if let Some(value) = value {
            assert_eq!(&value[..2], &[0xF1, 0x01], "{id} {column}");
        }
    }
    // Every name and date of birth the demo wrote, read back decrypted,
    // is nowhere in the database's files.
    let list = clinic.ok(&["case", "list", "--limit", "1000"]);
    let mut files = Vec::new();
    for entry in std::fs::read_dir(clinic.dir.path()).expect("directory") {
        let path = entry.expect("entry").path();
        if path.to_string_lossy().contains("clinic.db") {
            files.push(std::fs::read(&path).expect("database file"));
        }
    }
    let rows: Vec<&str> = list.lines().skip(1).collect();
    assert_eq!(rows.len(), 100, "{list}");
    for row in rows {
        let fields: Vec<&str> = row.split_whitespace().collect();
        for needle in &fields[2..5] {
            for bytes in &files {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                    "{needle:?} is stored in the clear"
                );
            }
        }
    }
}

#[test]
fn an_altered_value_fails_its_row_only_naming_table_column_and_owner() {
    let clinic = Clinic::new();
    clinic.ok(&[]);
    let mut conn = clinic.conn();
    let stored: Vec<u8> = diesel::sql_query(
        "SELECT case_id, patient_last AS value FROM cases WHERE case_id = 'C-000003'",
    )
    .get_result::<PhiValue>(&mut conn)
    .expect("value")
    .value
    .expect("not null");
    let mut altered = stored.clone();
    let last = altered.len() - 1;
    altered[last] ^= 0x01;
    diesel::sql_query("UPDATE cases SET patient_last = ? WHERE case_id = 'C-000003'")
        .bind::<diesel::sql_types::Binary, _>(altered)
        .execute(&mut conn)
        .expect("update");

    let (ok, out, err) = clinic.run(&["case", "get", "C-000003"]);
    assert!(!ok, "{out}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("cases.patient_last"), "{err}");
    assert!(err.contains("dr-lindqvist"), "{err}");
    assert!(!out.contains("Nwosu"), "{out}");

    let (ok, out, err) = clinic.run(&["case", "list"]);
    assert!(!ok);
    assert!(err.contains("C-000003"), "{err}");
    assert!(
        out.contains("Jane Doe") && out.contains("Wei Zhang"),
        "{out}"
    );
    assert!(clinic.ok(&["case", "get", "C-000004"]).contains("Zhang"));
}

#[test]
fn a_legacy_database_is_sealed_and_rolled_back_with_its_data_unchanged() {
    let clinic = Clinic::new();
    clinic.ok(&["seed-legacy", "--cases", "3000", "--owners", "7"]);
    for (id, column, value) in clinic.phi_values() {
        if let Some(value) = value {
            assert_ne!(&value[..2], &[0xF1, 0x01], "{id} {column}");
        }
    }
    let before = clinic.ok(&["digest"]);
    assert!(before.contains("(3000 cases, 0 deleted cases)"), "{before}");

    clinic.ok(&["rollout", "enable", "--owner", "provider-003"]);
    let dry = clinic.ok(&["backfill", "--dry-run"]);
    assert!(
        dry.contains("dry run: would seal 3000 row(s) of 7 owner(s)"),
        "{dry}"
    );
    clinic.ok(&["rollout", "all"]);
    clinic.ok(&["backfill", "--batch", "500"]);
    // A second run finds nothing left to do.
    clinic.ok(&["backfill"]);
    let verified = clinic.ok(&["verify"]);
    assert!(
        verified.contains(
            "cases: checked 3000 of 3000 sealed row(s) and 0 of 0 unsealed row(s): all pass"
        ),
        "{verified}"
    );
    for (id, column, value) in clinic.phi_values() {
        if let Some(value) = value {
            assert_eq!(&value[..2], &[0xF1, 0x01], "{id} {column}");
        }
    }
    assert_eq!(clinic.ok(&["digest"]), before);
    let found = clinic.ok(&["case", "get", "L-000042"]);
    let last = found
        .lines()
        .find_map(|l| l.strip_prefix("patient_last"))
        .expect("last name")
        .trim()
        .to_owned();
    let dob = found
        .lines()
        .find_map(|l| l.strip_prefix("patient_dob"))
        .expect("date of birth")
        .trim()
        .to_owned();
    let owner = found
        .lines()
        .find_map(|l| l.strip_prefix("provider"))
        .expect("provider")
        .trim()
        .to_owned();
    let dupes = clinic.ok(&[
        "case",
        "find",
        "--owner",
        &owner,
        "--last",
        &last.to_uppercase(),
        "--dob",
        &dob,
    ]);
    assert!(dupes.lines().any(|l| l == "L-000042"), "{dupes}");

    assert!(!clinic.run(&["decrypt-back"]).0, "needs --yes");
    clinic.ok(&["decrypt-back", "--yes"]);
    assert_eq!(clinic.ok(&["digest"]), before);
    let verified = clinic.ok(&["verify"]);
    assert!(
        verified.contains(
            "cases: checked 0 of 0 sealed row(s) and 3000 of 3000 unsealed row(s): all pass"
        ),
        "{verified}"
    );
}

#[cfg(unix)]
#[test]
fn an_export_never_writes_through_an_existing_file_or_symlink() {
    let clinic = Clinic::new();
    clinic.ok(&[]);
    let csv = clinic.dir.path().join("out.csv");
    let partial = clinic.dir.path().join("out.csv.partial");
    let csv_arg = csv.display().to_string();
    // An existing file (here world-readable) is refused, not reused.
    std::fs::write(&partial, b"left over").expect("file");
    let (ok, _, err) = clinic.run(&["export", "--owner", "dr-okafor", "--csv", &csv_arg]);
    assert!(
        !ok && err.contains(&partial.display().to_string()) && err.contains("already exists"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&partial).expect("file"),
        b"left over",
        "left as it was"
    );
    assert!(!csv.exists());
    // A symlink is refused too; its target is not written.
    std::fs::remove_file(&partial).expect("remove");
    let target = clinic.dir.path().join("elsewhere.txt");
    std::fs::write(&target, b"").expect("target");
    std::os::unix::fs::symlink(&target, &partial).expect("symlink");
    let (ok, _, err) = clinic.run(&["export", "--owner", "dr-okafor", "--csv", &csv_arg]);
    assert!(!ok && err.contains("already exists"), "{err}");
    assert!(
        std::fs::read(&target).expect("target").is_empty(),
        "nothing written through the link"
    );
    // A dangling symlink is not followed either.
    std::fs::remove_file(&target).expect("remove");
    let (ok, _, err) = clinic.run(&["export", "--owner", "dr-okafor", "--csv", &csv_arg]);
    assert!(!ok && err.contains("already exists"), "{err}");
    assert!(!target.exists(), "no file created through a dangling link");
    // Without one, the export is written, mode 0600.
    std::fs::remove_file(&partial).expect("remove");
    let out = clinic.ok(&["export", "--owner", "dr-okafor", "--csv", &csv_arg]);
    assert!(out.contains("Exported"), "{out}");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&csv).expect("csv").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(!partial.exists());
    // An existing export is not replaced.
    let exported = std::fs::read(&csv).expect("csv");
    let (ok, _, err) = clinic.run(&["export", "--owner", "dr-okafor", "--csv", &csv_arg]);
    assert!(
        !ok && err.contains(&csv_arg) && err.contains("already exists"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&csv).expect("csv"),
        exported,
        "left as it was"
    );
    assert!(!partial.exists());
}

#[test]
fn an_unknown_url_scheme_is_refused() {
    let clinic = Clinic::new();
    let (ok, _, err) = clinic.run(&["--database-url", "postgress://localhost/clinic"]);
    assert!(
        !ok && err.contains("unknown scheme \"postgress\"") && err.contains("feature `mysql`"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(clinic.dir.path()).expect("dir").count(),
        0,
        "no file created"
    );
}
