//! The clinic example (`examples/clinic/`), run as a built binary the way a
//! user runs it, on SQLite and, with their cargo features, MariaDB and
//! PostgreSQL (each in a database of its own, created afresh: `phi_clinic_it`
//! on the servers named by `PHI_TEST_MYSQL_URL` / `PHI_TEST_POSTGRES_URL`).
//! A backend whose feature is on and whose server is down fails.
//!
//! The test builds the example with its own backends first (nothing to do
//! after `cargo test`, which builds it).
#![cfg(feature = "sqlite")]

mod common;

use common::clinic_bin;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Binary, Nullable};

/// The columns holding PHI, per table.
const PHI_COLUMNS: [&str; 4] = [
    "patient_first",
    "patient_last",
    "patient_dob",
    "ins_provider",
];

/// A database for the clinic, and the directory it runs in.
struct Clinic {
    url: String,
    dir: tempfile::TempDir,
}

impl Clinic {
    fn sqlite() -> Clinic {
        let dir = tempfile::tempdir().expect("temporary directory");
        Clinic {
            url: "sqlite://clinic.db".into(),
            dir,
        }
    }

    /// A fresh database `phi_clinic_it` beside the server's test database.
    #[allow(dead_code)]
    fn server(test_url: &str) -> Clinic {
        let (base, _) = test_url.rsplit_once('/').expect("URL with a database");
        let url = format!("{base}/phi_clinic_it");
        admin_recreate(test_url);
        Clinic {
            url,
            dir: tempfile::tempdir().expect("temporary directory"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(clinic_bin());
        cmd.current_dir(self.dir.path())
            .args(args)
            .env("DATABASE_URL", &self.url)
            .env("PHI_MASTER_KEY", common::MASTER_KEY_B64)
            .env_remove("PHI_MASTER_KEY_FILE")
            .env_remove("PHI_KEK")
            .env_remove("RUST_LOG");
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("the clinic runs")
    }

    /// Runs a command that must succeed; its standard output.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let (stdout, stderr) = texts(&out);
        assert!(
            out.status.success(),
            "clinic {args:?} failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        stdout
    }

    /// Runs a command that must fail; its standard error.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let (stdout, stderr) = texts(&out);
        assert_eq!(
            out.status.code(),
            Some(1),
            "clinic {args:?} should fail:\n{stdout}\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "no panic: {stderr}");
        stderr
    }

    fn db(&self) -> Db {
        Db {
            url: self.url.clone(),
            dir: self.dir.path().to_owned(),
        }
    }
}

fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Drops and creates `phi_clinic_it` on the server of `test_url`.
fn admin_recreate(test_url: &str) {
    let statements = [
        "DROP DATABASE IF EXISTS phi_clinic_it",
        "CREATE DATABASE phi_clinic_it",
    ];
    #[cfg(feature = "mysql")]
    if test_url.starts_with("mysql:") {
        let mut conn = MysqlConnection::establish(test_url)
            .unwrap_or_else(|e| panic!("MariaDB at {test_url} is needed: {e}"));
        for s in statements {
            diesel::sql_query(s).execute(&mut conn).expect(s);
        }
        return;
    }
    #[cfg(feature = "postgres")]
    if test_url.starts_with("postgres") {
        let mut conn = PgConnection::establish(test_url)
            .unwrap_or_else(|e| panic!("PostgreSQL at {test_url} is needed: {e}"));
        diesel::sql_query("DROP DATABASE IF EXISTS phi_clinic_it WITH (FORCE)")
            .execute(&mut conn)
            .expect("drop database");
        diesel::sql_query(statements[1])
            .execute(&mut conn)
            .expect("create database");
        return;
    }
    let _ = statements;
    panic!("no backend for {test_url}");
}

/// The test's own view of what the clinic stored: a new connection for
/// each look, so no snapshot outlives the clinic's writes.
struct Db {
    url: String,
    dir: PathBuf,
}

enum Conn {
    Sqlite(SqliteConnection),
    #[cfg(feature = "mysql")]
    Mysql(MysqlConnection),
    #[cfg(feature = "postgres")]
    Postgres(PgConnection),
}

#[derive(QueryableByName)]
struct Value {
    #[diesel(sql_type = Nullable<Binary>)]
    value: Option<Vec<u8>>,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

macro_rules! with_db {
    ($db:expr, $conn:ident => $body:expr) => {
        match &mut $db.connect() {
            Conn::Sqlite($conn) => $body,
            #[cfg(feature = "mysql")]
            Conn::Mysql($conn) => $body,
            #[cfg(feature = "postgres")]
            Conn::Postgres($conn) => $body,
        }
    };
}

impl Db {
    fn connect(&self) -> Conn {
        let url = self.url.as_str();
        if let Some(path) = url.strip_prefix("sqlite://") {
            let path = self.dir.join(path);
            return Conn::Sqlite(
                SqliteConnection::establish(&path.display().to_string()).expect("sqlite"),
            );
        }
        #[cfg(feature = "mysql")]
        if url.starts_with("mysql:") {
            return Conn::Mysql(MysqlConnection::establish(url).expect("mysql"));
        }
        #[cfg(feature = "postgres")]
        if url.starts_with("postgres") {
            return Conn::Postgres(PgConnection::establish(url).expect("postgres"));
        }
        panic!("no backend for {url}");
    }

    fn numbered(&self) -> bool {
        self.url.starts_with("postgres")
    }

    /// Every non-NULL value of `column` in `table`.
    fn values(&mut self, table: &str, column: &str) -> Vec<Vec<u8>> {
        let sql = format!("SELECT {column} AS value FROM {table} ORDER BY case_id");
        let rows: Vec<Value> =
            with_db!(self, c => diesel::sql_query(&sql).load(c).expect("values"));
        rows.into_iter().filter_map(|r| r.value).collect()
    }

    fn value(&mut self, table: &str, column: &str, id: &str) -> Option<Vec<u8>> {
        let sql = format!("SELECT {column} AS value FROM {table} WHERE case_id = '{id}'");
        let rows: Vec<Value> = with_db!(self, c => diesel::sql_query(&sql).load(c).expect("value"));
        rows.into_iter().next().and_then(|r| r.value)
    }

    fn set_value(&mut self, table: &str, column: &str, id: &str, bytes: &[u8]) {
        let p = if self.numbered() { "$1" } else { "?" };
        let sql = format!("UPDATE {table} SET {column} = {p} WHERE case_id = '{id}'");
        let n = with_db!(self, c => diesel::sql_query(&sql)
            .bind::<Binary, _>(bytes)
            .execute(c)
            .expect("raw update"));
        assert_eq!(n, 1, "{sql}");
    }

    fn count(&mut self, sql: &str) -> i64 {
        // Every row loaded, so no statement is left holding a read
        // snapshot while the clinic writes.
        let rows: Vec<Count> = with_db!(self, c => diesel::sql_query(sql).load(c).expect("count"));
        rows.first().map_or(0, |r| r.n)
    }

    fn rows_with_flag(&mut self, table: &str, on: bool) -> i64 {
        let flag = if on {
            "phi_encrypted"
        } else {
            "NOT phi_encrypted"
        };
        self.count(&format!("SELECT COUNT(*) AS n FROM {table} WHERE {flag}"))
    }
}

const ENVELOPE: [u8; 2] = [0xF1, 0x01];

fn assert_all_sealed(db: &mut Db, table: &str) {
    for column in PHI_COLUMNS {
        for value in db.values(table, column) {
            assert_eq!(
                value.get(..2),
                Some(&ENVELOPE[..]),
                "{table}.{column} holds a value that is not an envelope"
            );
        }
    }
}

/// The digest line's hash.
fn digest(clinic: &Clinic) -> String {
    let out = clinic.ok(&["digest"]);
    let line = out
        .lines()
        .find(|l| l.starts_with("digest: "))
        .unwrap_or_else(|| panic!("no digest in {out}"));
    line["digest: ".len()..]
        .split_whitespace()
        .next()
        .expect("hash")
        .to_owned()
}

/// A pseudo-random number below `n`, different on every run.
fn random_below(n: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos();
    u64::from(nanos.wrapping_mul(2_654_435_761)) % n.max(1)
}

/// The first run, a second run, the demo, every case command, a damaged
/// ciphertext, the roll-out.
fn first_runs_and_every_case_command(clinic: &Clinic) {
    let first = clinic.ok(&[]);
    assert!(first.contains("Seeded 5 cases"), "{first}");
    let second = clinic.ok(&[]);
    assert!(
        second.contains("(5 cases)") && second.contains("Reusing"),
        "{second}"
    );
    assert!(
        second.lines().any(|l| l.starts_with("  F1 01 ")),
        "{second}"
    );
    assert!(
        second.contains("Jane") && second.contains("Doe"),
        "{second}"
    );

    let demo = clinic.ok(&["demo", "--owners", "3", "--cases-per-owner", "4"]);
    assert!(demo.contains("12 case(s)"), "{demo}");
    let mut db = clinic.db();
    assert_all_sealed(&mut db, "cases");
    assert_eq!(db.rows_with_flag("cases", false), 0);

    // Every patient name and date of birth the demo wrote is absent from the
    // SQLite files' bytes.
    if clinic.url.starts_with("sqlite") {
        let listing = clinic.ok(&["case", "list", "--limit", "100"]);
        let mut secrets: Vec<String> = Vec::new();
        for line in listing.lines().skip(1) {
            let cells: Vec<char> = line.chars().collect();
            let cell = |from: usize, len: usize| -> String {
                cells
                    .iter()
                    .skip(from)
                    .take(len)
                    .collect::<String>()
                    .trim()
                    .to_owned()
            };
            let patient = cell(24, 22);
            let born = cell(47, 10);
            assert!(born.len() == 10 && born.as_bytes()[4] == b'-', "{line}");
            secrets.extend(patient.split_whitespace().map(str::to_owned));
            secrets.push(born);
        }
        assert!(secrets.len() >= 17 * 3, "{listing}");
        let mut files = Vec::new();
        for entry in std::fs::read_dir(clinic.dir.path()).expect("dir") {
            let path = entry.expect("entry").path();
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("clinic.db"))
            {
                files.push(std::fs::read(&path).expect("read database file"));
            }
        }
        assert!(!files.is_empty());
        for secret in &secrets {
            for bytes in &files {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{secret:?} is in the database file"
                );
            }
        }
    }

    // create, get, update, find, export, delete
    let owner = "dr-test";
    let id = clinic
        .ok(&[
            "case",
            "create",
            "--owner",
            owner,
            "--first",
            "Ada",
            "--last",
            "Lovelace-Byron",
            "--dob",
            "1915-12-10",
            "--insurer",
            "Acme Health",
            "--procedure",
            "27447",
            "--surgery-date",
            "2026-12-24",
        ])
        .trim()
        .to_owned();
    assert!(!id.is_empty() && !id.contains(' '), "{id}");
    let got = clinic.ok(&["case", "get", &id]);
    assert!(
        got.contains("Lovelace-Byron") && got.contains("1915-12-10") && got.contains("Acme Health"),
        "{got}"
    );
    let updated = clinic.ok(&["case", "update", &id, "--last", "Lovelace", "--no-insurer"]);
    assert!(updated.contains("updated"), "{updated}");
    let got = clinic.ok(&["case", "get", &id]);
    assert!(
        got.contains("Lovelace") && !got.contains("Lovelace-Byron") && !got.contains("Acme"),
        "{got}"
    );
    assert_eq!(db.value("cases", "ins_provider", &id), None);
    assert_eq!(
        db.value("cases", "patient_last", &id)
            .expect("sealed")
            .get(..2),
        Some(&ENVELOPE[..])
    );
    let found = clinic.ok(&[
        "case",
        "find",
        "--owner",
        owner,
        "--last",
        "  LOVELACE ",
        "--dob",
        "1915-12-10",
    ]);
    assert_eq!(found.trim(), id, "the duplicate check finds the case");
    let none = clinic.ok(&[
        "case",
        "find",
        "--owner",
        owner,
        "--last",
        "Lovelace",
        "--dob",
        "1915-12-11",
    ]);
    assert!(none.contains("no duplicate"), "{none}");
    let other = clinic.ok(&[
        "case",
        "find",
        "--owner",
        "dr-okafor",
        "--last",
        "Lovelace",
        "--dob",
        "1915-12-10",
    ]);
    assert!(
        other.contains("no duplicate"),
        "another provider's index differs: {other}"
    );
    // Searches within the provider: a prefix and a year of birth on
    // encrypted fields, the surgery dates in SQL.
    let search = |args: &[&str]| {
        let mut all = vec!["case", "find", "--owner", owner];
        all.extend_from_slice(args);
        clinic.ok(&all).trim().to_owned()
    };
    assert_eq!(search(&["--last-prefix", " lOVE"]), id);
    assert_eq!(search(&["--last-prefix", "love", "--dob-year", "1915"]), id);
    assert_eq!(search(&["--last-prefix", "lovelace-"]), "no case");
    assert_eq!(search(&["--dob-year", "1916"]), "no case");
    assert_eq!(
        search(&["--surgery-from", "2026-12-01", "--surgery-to", "2026-12-31"]),
        id
    );
    assert_eq!(search(&["--surgery-from", "2026-12-25"]), "no case");
    assert_eq!(search(&["--last", "lovelace"]), id);
    // The prefix and year searches narrow the sealed rows by derived
    // indexes: tags of 16 and 6 bits (2 bytes, 1 byte). A row without tags
    // is tested anyway; a stale tag hides the row from the prefix search
    // until `reindex` writes the tags from the values.
    let tag = db.value("cases", "last_prefix", &id).expect("a prefix tag");
    assert_eq!(tag.len(), 2);
    assert_eq!(db.value("cases", "dob_year", &id).map(|t| t.len()), Some(1));
    db.set_value("cases", "last_prefix", &id, &[tag[0] ^ 0xff, tag[1] ^ 0xff]);
    assert_eq!(search(&["--last-prefix", "love"]), "no case");
    let reindexed = clinic.ok(&["reindex"]);
    assert!(reindexed.contains(" 1 re-indexed"), "{reindexed}");
    assert_eq!(db.value("cases", "last_prefix", &id), Some(tag));
    assert_eq!(search(&["--last-prefix", "love"]), id);

    let csv = clinic.dir.path().join("export.csv");
    let csv_arg = csv.display().to_string();
    let exported = clinic.ok(&["export", "--owner", "dr-okafor", "--csv", &csv_arg]);
    assert!(exported.contains("Exported 2 case(s)"), "{exported}");
    let text = std::fs::read_to_string(&csv).expect("csv");
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(
        text.contains("Jane") && text.contains("García") && text.contains("1955-07-03"),
        "{text}"
    );

    let deleted = clinic.ok(&["case", "delete", &id]);
    assert!(deleted.contains("deleted_cases"), "{deleted}");
    assert_eq!(
        db.count(&format!(
            "SELECT COUNT(*) AS n FROM cases WHERE case_id = '{id}'"
        )),
        0
    );
    assert_all_sealed(&mut db, "deleted_cases");
    assert_eq!(db.rows_with_flag("deleted_cases", true), 1);
    let got = clinic.ok(&["case", "get", &id]);
    assert!(
        got.contains("Lovelace") && got.contains("deleted_at"),
        "a deleted case still opens: {got}"
    );

    // One altered byte: `case get` of that row fails naming table, column
    // and owner; the other rows still read.
    let good = db
        .value("cases", "patient_last", "C-000001")
        .expect("seeded case");
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x40;
    db.set_value("cases", "patient_last", "C-000001", &bad);
    let err = clinic.fails(&["case", "get", "C-000001"]);
    assert!(
        err.contains("cases.patient_last") && err.contains("dr-okafor"),
        "{err}"
    );
    assert!(!err.contains("Doe"), "no plaintext in the error: {err}");
    let got = clinic.ok(&["case", "get", "C-000002"]);
    assert!(got.contains("García"), "{got}");
    let out = clinic.run(&["case", "list", "--owner", "dr-okafor"]);
    let (stdout, stderr) = texts(&out);
    assert!(
        !out.status.success()
            && stderr.contains("C-000001")
            && stderr.contains("cases.patient_last"),
        "{stderr}"
    );
    assert!(
        stdout.contains("C-000002") && !stdout.contains("C-000001"),
        "{stdout}"
    );
    db.set_value("cases", "patient_last", "C-000001", &good);
    clinic.ok(&["case", "get", "C-000001"]);

    // The roll-out: a provider left out stores new rows in plain text.
    clinic.ok(&["rollout", "disable", "--owner", "dr-haddad"]);
    let plain = clinic
        .ok(&[
            "case",
            "create",
            "--owner",
            "dr-haddad",
            "--first",
            "Grace",
            "--last",
            "Hopper",
            "--dob",
            "1906-12-09",
            "--procedure",
            "49505",
            "--surgery-date",
            "2026-12-01",
        ])
        .trim()
        .to_owned();
    assert_eq!(
        db.value("cases", "patient_last", &plain),
        Some(b"Hopper".to_vec())
    );
    let got = clinic.ok(&["case", "get", &plain]);
    assert!(
        got.contains("Hopper") && got.contains("plain text"),
        "{got}"
    );
    clinic.ok(&["rollout", "enable", "--owner", "dr-haddad"]);
    clinic.ok(&["rollout", "all"]);
    let sealed = clinic
        .ok(&[
            "case",
            "create",
            "--owner",
            "dr-haddad",
            "--first",
            "Grace",
            "--last",
            "Hopper",
            "--dob",
            "1906-12-09",
            "--procedure",
            "49505",
            "--surgery-date",
            "2026-12-02",
        ])
        .trim()
        .to_owned();
    assert_eq!(
        db.value("cases", "patient_last", &sealed)
            .expect("value")
            .get(..2),
        Some(&ENVELOPE[..])
    );
}

/// Legacy rows seeded for the killed backfill: 20 batches of 500, so the
/// kill (at most halfway) always leaves whole batches still to do.
const LEGACY_ROWS: u64 = 10_000;

/// seed-legacy, digest, a backfill killed with SIGKILL at a random point, a
/// second backfill, digest, verify; then the rollback.
fn legacy_backfill_survives_sigkill(clinic: &Clinic, legacy: u64) {
    let n = legacy.to_string();
    let seeded = clinic.ok(&["seed-legacy", "--cases", &n, "--owners", "40"]);
    assert!(
        seeded.contains(&format!("Wrote {n} legacy case(s)")),
        "{seeded}"
    );
    let mut db = clinic.db();
    let unsealed = db.rows_with_flag("cases", false);
    assert!(
        unsealed >= i64::try_from(legacy).expect("count"),
        "{unsealed}"
    );
    let before = digest(clinic);

    let dry = clinic.ok(&["backfill", "--dry-run"]);
    assert!(
        dry.contains("dry run") && dry.contains(&format!("would seal {unsealed} row(s)")),
        "{dry}"
    );
    assert_eq!(
        db.rows_with_flag("cases", false),
        unsealed,
        "a dry run changes nothing"
    );

    // Killed at a random point once some batches are committed: when a
    // random number of rows, at least one and at most half of them, is
    // sealed, so the kill lands midway however fast or loaded the host is.
    let kill_after = 1 + i64::try_from(random_below(u64::try_from(unsealed / 2).expect("count")))
        .expect("count");
    let mut child = clinic
        .command(&["backfill", "--batch", "500"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("backfill starts");
    let started = Instant::now();
    while unsealed - db.rows_with_flag("cases", false) < kill_after {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the backfill ended before sealing {kill_after} row(s)"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the backfill makes no progress"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the backfill finished before it could be killed: seed more cases"
    );
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("reaped");
    assert!(!status.success());
    let left = db.rows_with_flag("cases", false);
    assert!(
        left > 0 && left < unsealed,
        "killed midway: {left} of {unsealed} left"
    );
    assert_eq!(
        digest(clinic),
        before,
        "a half-done backfill reads the same"
    );

    let done = clinic.ok(&["backfill", "--batch", "500"]);
    assert!(
        done.contains(&format!("sealed {left} row(s)")),
        "the second run seals what was left: {done}"
    );
    assert_eq!(db.rows_with_flag("cases", false), 0);
    assert_eq!(db.rows_with_flag("deleted_cases", false), 0);
    assert_all_sealed(&mut db, "cases");
    assert_eq!(digest(clinic), before, "the same cases after the backfill");
    let verified = clinic.ok(&["verify"]);
    assert!(
        verified.contains("all pass") && !verified.contains("FAIL"),
        "{verified}"
    );
    let sampled = clinic.ok(&["verify", "--sample", "100"]);
    assert!(sampled.contains("checked 100 of"), "{sampled}");

    // The rollback asks for --yes, then leaves every row in plain text.
    let refused = clinic.fails(&["decrypt-back"]);
    assert!(refused.contains("--yes"), "{refused}");
    assert_eq!(
        db.rows_with_flag("cases", true),
        db.count("SELECT COUNT(*) AS n FROM cases"),
        "a refused rollback changes nothing"
    );
    clinic.ok(&["decrypt-back", "--yes"]);
    assert_eq!(db.rows_with_flag("cases", true), 0);
    assert_eq!(db.rows_with_flag("deleted_cases", true), 0);
    assert_eq!(digest(clinic), before, "the same cases after the rollback");
    let verified = clinic.ok(&["verify"]);
    assert!(verified.contains("all pass"), "{verified}");
}

#[test]
fn clinic_on_sqlite() {
    let clinic = Clinic::sqlite();
    first_runs_and_every_case_command(&clinic);
    legacy_backfill_survives_sigkill(&clinic, LEGACY_ROWS);
}

#[cfg(feature = "postgres")]
#[test]
fn clinic_on_postgres() {
    let url = std::env::var("PHI_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let clinic = Clinic::server(&url);
    first_runs_and_every_case_command(&clinic);
    legacy_backfill_survives_sigkill(&clinic, LEGACY_ROWS);
}

#[cfg(feature = "mysql")]
#[test]
fn clinic_on_mariadb() {
    let url = std::env::var("PHI_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let clinic = Clinic::server(&url);
    first_runs_and_every_case_command(&clinic);
    legacy_backfill_survives_sigkill(&clinic, LEGACY_ROWS);
}

/// The clinic's roll-out table moves into phi's (policy `clinic`) with the
/// clinic's `rollout_in_phi` migration, and its `down.sql` brings it back:
/// run on `$conn` at `$url`, one clinic migration at a time.
macro_rules! rollout_migration {
    ($conn:ty, $dir:literal, $url:expr) => {{
        use diesel_migrations::{EmbeddedMigrations, MigrationHarness as _, embed_migrations};
        const CLINIC: EmbeddedMigrations = embed_migrations!($dir);
        #[derive(QueryableByName)]
        struct Owner {
            #[diesel(sql_type = diesel::sql_types::Text)]
            owner_id: String,
        }
        let url: &str = $url;
        let store = phi::DieselKeyStore::<$conn>::builder(url)
            .run_migrations(true)
            .connect()
            .expect("phi's tables");
        let mut conn = <$conn>::establish(url).expect("connects");
        let policy = |store: &phi::DieselKeyStore<$conn>| {
            phi::lifecycle::fleet_rollout(store, "clinic").expect("read the policy")
        };
        // The clinic before: its own table, sealing two providers.
        conn.run_next_migration(CLINIC).expect("create_cases");
        diesel::sql_query("DELETE FROM clinic_rollout")
            .execute(&mut conn)
            .expect("delete");
        diesel::sql_query("INSERT INTO clinic_rollout (owner_id) VALUES ('dr-a'), ('dr-b')")
            .execute(&mut conn)
            .expect("insert");
        conn.run_next_migration(CLINIC).expect("rollout_in_phi");
        assert_eq!(policy(&store), Some(phi::Rollout::owners(["dr-a", "dr-b"])));
        assert!(
            diesel::sql_query("SELECT owner_id FROM clinic_rollout")
                .load::<Owner>(&mut conn)
                .is_err(),
            "clinic_rollout is gone"
        );
        // Back: the table again, with the same providers; phi's policy gone.
        // Reverted by name: phi's migrations (run by `connect`) have later
        // versions than these two, so Diesel's "last" would be one of phi's,
        // which the clinic's directory does not have.
        let rollout_in_phi = {
            use diesel::migration::MigrationSource as _;
            let all: Vec<
                Box<dyn diesel::migration::Migration<<$conn as diesel::Connection>::Backend>>,
            > = CLINIC.migrations().expect("the clinic's migrations");
            all.into_iter()
                .find(|m| m.name().to_string().ends_with("_rollout_in_phi"))
                .expect("rollout_in_phi")
        };
        conn.revert_migration(rollout_in_phi.as_ref())
            .expect("revert rollout_in_phi");
        let owners: Vec<String> =
            diesel::sql_query("SELECT owner_id FROM clinic_rollout ORDER BY owner_id")
                .load::<Owner>(&mut conn)
                .expect("clinic_rollout is back")
                .into_iter()
                .map(|o| o.owner_id)
                .collect();
        assert_eq!(owners, ["dr-a", "dr-b"]);
        assert_eq!(policy(&store), None);
        // Every provider ('*') becomes mode `all`, and back.
        diesel::sql_query("DELETE FROM clinic_rollout")
            .execute(&mut conn)
            .expect("delete");
        diesel::sql_query("INSERT INTO clinic_rollout (owner_id) VALUES ('*')")
            .execute(&mut conn)
            .expect("insert");
        conn.run_next_migration(CLINIC)
            .expect("rollout_in_phi again");
        assert_eq!(policy(&store), Some(phi::Rollout::All));
        conn.revert_migration(rollout_in_phi.as_ref())
            .expect("revert again");
        let owners: Vec<String> = diesel::sql_query("SELECT owner_id FROM clinic_rollout")
            .load::<Owner>(&mut conn)
            .expect("clinic_rollout is back")
            .into_iter()
            .map(|o| o.owner_id)
            .collect();
        assert_eq!(owners, ["*"]);
        // No row (nobody) becomes mode `nobody`.
        diesel::sql_query("DELETE FROM clinic_rollout")
            .execute(&mut conn)
            .expect("delete");
        conn.run_next_migration(CLINIC)
            .expect("rollout_in_phi, nobody");
        assert_eq!(policy(&store), Some(phi::Rollout::Nobody));
    }};
}

#[test]
fn the_clinic_rollout_table_moves_into_phis_and_back_on_sqlite() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("clinic.db").display().to_string();
    rollout_migration!(SqliteConnection, "examples/clinic/migrations/sqlite", &path);
}

#[cfg(feature = "postgres")]
#[test]
fn the_clinic_rollout_table_moves_into_phis_and_back_on_postgres() {
    let url = std::env::var("PHI_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let url = recreate(&url, "phi_clinic_rollout_it");
    rollout_migration!(PgConnection, "examples/clinic/migrations/postgres", &url);
}

#[cfg(feature = "mysql")]
#[test]
fn the_clinic_rollout_table_moves_into_phis_and_back_on_mariadb() {
    let url = std::env::var("PHI_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let url = recreate(&url, "phi_clinic_rollout_it");
    rollout_migration!(MysqlConnection, "examples/clinic/migrations/mysql", &url);
}

/// Drops and creates the database `name` on the server of `test_url`; its URL.
#[cfg(any(feature = "mysql", feature = "postgres"))]
fn recreate(test_url: &str, name: &str) -> String {
    let drop_it = if test_url.starts_with("postgres") {
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    } else {
        format!("DROP DATABASE IF EXISTS {name}")
    };
    let create = format!("CREATE DATABASE {name}");
    #[cfg(feature = "mysql")]
    if test_url.starts_with("mysql:") {
        let mut conn = MysqlConnection::establish(test_url)
            .unwrap_or_else(|e| panic!("MariaDB at {test_url} is needed: {e}"));
        diesel::sql_query(&drop_it)
            .execute(&mut conn)
            .expect("drop");
        diesel::sql_query(&create)
            .execute(&mut conn)
            .expect("create");
    }
    #[cfg(feature = "postgres")]
    if test_url.starts_with("postgres") {
        let mut conn = PgConnection::establish(test_url)
            .unwrap_or_else(|e| panic!("PostgreSQL at {test_url} is needed: {e}"));
        diesel::sql_query(&drop_it)
            .execute(&mut conn)
            .expect("drop");
        diesel::sql_query(&create)
            .execute(&mut conn)
            .expect("create");
    }
    let (base, _) = test_url.rsplit_once('/').expect("URL with a database");
    format!("{base}/{name}")
}

/// On MariaDB the clinic's owner column compares bytes (its
/// `owner_ids_byte_exact` migration): `acme `'s listing never holds
/// `acme`'s case, and `acme ` is refused (the clinic's keyring does not take
/// whitespace), never sealed under `acme`'s key.
#[cfg(feature = "mysql")]
#[test]
fn the_clinics_owner_column_compares_bytes_on_mariadb() {
    #[derive(QueryableByName)]
    struct Collation {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
    }
    let test_url = std::env::var("PHI_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let name = format!(
        "{}_clinic_owner",
        test_url.rsplit('/').next().unwrap_or("test")
    );
    let clinic = Clinic {
        url: recreate(&test_url, &name),
        dir: tempfile::tempdir().expect("temporary directory"),
    };
    clinic.ok(&[]);
    let create = |owner: &str| {
        clinic.run(&[
            "case",
            "create",
            "--owner",
            owner,
            "--first",
            "Jane",
            "--last",
            "Doe",
            "--dob",
            "1980-01-15",
            "--procedure",
            "27447",
            "--surgery-date",
            "2026-12-24",
        ])
    };
    let created = create("acme");
    let (id, stderr) = texts(&created);
    assert!(created.status.success(), "{stderr}");
    let id = id
        .split_whitespace()
        .find(|w| w.starts_with("C-"))
        .unwrap_or_else(|| panic!("no case id printed: {id}"))
        .trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned();

    let mut conn = MysqlConnection::establish(&clinic.url).expect("connects");
    for table in ["cases", "deleted_cases"] {
        let c: Collation = diesel::sql_query(
            "SELECT CAST(COLLATION_NAME AS CHAR) AS name FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = 'user_id'",
        )
        .bind::<diesel::sql_types::Text, _>(table)
        .get_result(&mut conn)
        .expect("collation");
        assert!(
            ["utf8mb4_nopad_bin", "utf8mb4_0900_bin"].contains(&c.name.as_str()),
            "{table}.user_id: {}",
            c.name
        );
    }

    let listing = clinic.run(&["case", "list", "--owner", "acme "]);
    let (stdout, stderr) = texts(&listing);
    assert!(
        !stdout.contains(&id) && !stderr.contains(&id),
        "acme's case listed for \"acme \": {stdout}\n{stderr}"
    );
    assert!(
        clinic
            .ok(&["case", "list", "--owner", "acme"])
            .contains(&id)
    );

    let refused = create("acme ");
    let (stdout, stderr) = texts(&refused);
    assert!(!refused.status.success(), "sealed for \"acme \": {stdout}");
    assert!(
        stderr.contains("\"acme \"") && stderr.contains("whitespace"),
        "{stderr}"
    );
}
