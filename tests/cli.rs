//! The `phi` admin CLI, run as a built binary against a temporary SQLite
//! database holding sealed cases; each test checks the output and the
//! database afterwards.
#![cfg(feature = "sqlite")]

mod common;

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use phi::schema::user_encryption_keys as keys;
use phi::{DieselKeyStore, Encrypted, KeyBytes, Keyring, LocalKek};

mod schema {
    #![allow(missing_docs)]
    diesel::table! {
    cases (case_id) {
        case_id -> Text,
        user_id -> Text,
        patient_last -> Binary,
        ins_provider -> Nullable<Binary>,
    }
    }
}
use schema::cases;

const TABLES: &str = "cases:user_id:case_id:patient_last,ins_provider";

struct Clinic {
    dir: tempfile::TempDir,
    url: String,
}

impl Clinic {
    /// A database with `per_owner` cases for each owner, sealed under the
    /// tests' KEK (`local-test`).
    fn new(owners: &[&str], per_owner: usize) -> Clinic {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = dir.path().join("clinic.db").display().to_string();
        let mut conn = SqliteConnection::establish(&url).expect("database");
        conn.batch_execute(
            "CREATE TABLE cases (case_id TEXT PRIMARY KEY NOT NULL, user_id TEXT NOT NULL, \
             patient_last BLOB NOT NULL, ins_provider BLOB)",
        )
        .expect("table");
        let clinic = Clinic { dir, url };
        let keyring = clinic.keyring(common::local_kek());
        for owner in owners {
            for i in 0..per_owner {
                let id = format!("{owner}-C{i}");
                let last = keyring
                    .seal(
                        &format!("Last{i} of {owner}"),
                        owner,
                        "cases.patient_last",
                        id.as_bytes(),
                    )
                    .expect("seal");
                let ins = (i % 2 == 0).then(|| {
                    keyring
                        .seal(
                            &format!("Insurer {i}"),
                            owner,
                            "cases.ins_provider",
                            id.as_bytes(),
                        )
                        .expect("seal")
                });
                diesel::insert_into(cases::table)
                    .values((
                        cases::case_id.eq(&id),
                        cases::user_id.eq(owner),
                        cases::patient_last.eq(last.into_bytes()),
                        cases::ins_provider.eq(ins.map(Encrypted::into_bytes)),
                    ))
                    .execute(&mut conn)
                    .expect("insert");
            }
        }
        clinic
    }

    fn keyring(&self, kek: Arc<LocalKek>) -> Keyring {
        let store = Arc::new(
            DieselKeyStore::<SqliteConnection>::builder(&self.url)
                .run_migrations(true)
                .connect()
                .expect("store"),
        );
        Keyring::builder(store, kek).build().expect("keyring")
    }

    fn conn(&self) -> SqliteConnection {
        let mut conn = SqliteConnection::establish(&self.url).expect("database");
        // The keyring writes its unwrap audit records from a thread of its
        // own: an SQLite application waits for other writers.
        diesel::sql_query("PRAGMA busy_timeout = 10000")
            .execute(&mut conn)
            .expect("busy timeout");
        conn
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_phi"));
        command
            .args(args)
            .env("DATABASE_URL", &self.url)
            .env("PHI_MASTER_KEY", common::MASTER_KEY_B64)
            .env("PHI_KEK_ID", "local-test")
            .env("PHI_TABLES", TABLES)
            .env_remove("PHI_MASTER_KEY_FILE")
            .env_remove("PHI_NEW_MASTER_KEY")
            .env_remove("PHI_OWNERS_QUERY")
            .env_remove("PHI_ACTOR")
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        command
    }

    fn run(&self, args: &[&str]) -> (bool, String, String) {
        finish(self.command(args).output().expect("phi runs"))
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args);
        assert!(ok, "phi {args:?} failed:\n{out}\n{err}");
        out
    }

    fn key_rows(&self, owner: &str) -> Vec<(i64, String, String, usize)> {
        let rows: Vec<(i64, String, String, Vec<u8>)> = keys::table
            .filter(keys::owner_id.eq(owner))
            .order(keys::version)
            .select((keys::version, keys::state, keys::kek_id, keys::wrapped_key))
            .load(&mut self.conn())
            .expect("key rows");
        rows.into_iter()
            .map(|(v, s, k, w)| (v, s, k, w.len()))
            .collect()
    }

    /// Opens every case of `owner` and returns the key versions seen.
    fn check_cases(&self, keyring: &Keyring, owner: &str, per_owner: usize) -> Vec<u32> {
        let rows: Vec<(String, Vec<u8>, Option<Vec<u8>>)> = cases::table
            .filter(cases::user_id.eq(owner))
            .select((cases::case_id, cases::patient_last, cases::ins_provider))
            .load(&mut self.conn())
            .expect("cases");
        assert_eq!(rows.len(), per_owner);
        let mut versions = Vec::new();
        for (id, last, ins) in rows {
            let i: usize = id
                .rsplit('C')
                .next()
                .expect("index")
                .parse()
                .expect("index");
            let last = Encrypted::<String>::from_bytes(last);
            versions.extend(last.key_version());
            let opened = keyring
                .open(last, owner, "cases.patient_last", id.as_bytes())
                .expect("opens");
            assert_eq!(opened, format!("Last{i} of {owner}"));
            assert_eq!(ins.is_some(), i.is_multiple_of(2), "NULLs stay NULL");
            if let Some(ins) = ins {
                let ins = Encrypted::<String>::from_bytes(ins);
                versions.extend(ins.key_version());
                let opened = keyring
                    .open(ins, owner, "cases.ins_provider", id.as_bytes())
                    .expect("opens");
                assert_eq!(opened, format!("Insurer {i}"));
            }
        }
        versions.sort_unstable();
        versions.dedup();
        versions
    }
}

fn finish(out: Output) -> (bool, String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    for text in [&stdout, &stderr] {
        assert!(
            !text.contains("Last0 of") && !text.contains("Insurer"),
            "no plaintext in output: {text}"
        );
        assert!(
            !text.contains(common::MASTER_KEY_B64),
            "no key in output: {text}"
        );
    }
    (out.status.success(), stdout, stderr)
}

#[test]
fn status_rotate_reseal_and_retire() {
    let clinic = Clinic::new(&["dr-a", "dr-b"], 5);
    let out = clinic.ok(&["keys", "status"]);
    assert!(
        out.contains("Coverage: 2 of 2 owners have an active data key (100.0%)"),
        "{out}"
    );
    assert!(
        out.contains("local-test") && out.contains("active"),
        "{out}"
    );

    let out = clinic.ok(&["keys", "rotate", "--owner", "dr-a"]);
    assert!(
        out.contains("Owner dr-a: added data key version 2"),
        "{out}"
    );
    assert!(
        out.contains("8 stored value(s) are under older versions"),
        "{out}"
    );

    let (code, _, err) =
        status_of(&mut clinic.command(&["keys", "retire", "--owner", "dr-a", "--version", "1"]));
    assert_eq!(code, Some(3), "a refusal: {err}");
    assert!(
        err.contains(
            "cannot retire data key version 1 of owner \"dr-a\": 5 value(s) in cases.patient_last"
        ),
        "{err}"
    );
    let (code, _, err) =
        status_of(&mut clinic.command(&["keys", "retire", "--owner", "dr-a", "--version", "2"]));
    assert_eq!(code, Some(3), "a refusal: {err}");
    assert!(err.contains("current version"), "{err}");

    let out = clinic.ok(&["keys", "reseal", "--owner", "dr-a", "--batch-size", "2"]);
    assert!(
        out.contains("Owner dr-a: re-sealed 8 of 8 value(s) under version 2"),
        "{out}"
    );
    let out = clinic.ok(&["keys", "retire", "--owner", "dr-a", "--version", "1"]);
    assert!(out.contains("retired data key version 1"), "{out}");

    let out = clinic.ok(&["keys", "status", "--owner", "dr-a"]);
    assert!(out.contains("version 1    retired"), "{out}");
    assert!(out.contains("version 2    active"), "{out}");
    assert!(
        out.contains("cases.patient_last") && out.contains("version 2           5 value(s)"),
        "{out}"
    );
    assert!(out.contains("current version 2"), "{out}");

    let states: Vec<(i64, String)> = clinic
        .key_rows("dr-a")
        .into_iter()
        .map(|(v, s, _, _)| (v, s))
        .collect();
    assert_eq!(
        states,
        [(1, "retired".to_owned()), (2, "active".to_owned())]
    );
    let keyring = clinic.keyring(common::local_kek());
    assert_eq!(clinic.check_cases(&keyring, "dr-a", 5), [2]);
    assert_eq!(
        clinic.check_cases(&keyring, "dr-b", 5),
        [1],
        "the other owner is untouched"
    );
}

#[test]
fn generate_reports_coverage_and_dry_run_changes_nothing() {
    let clinic = Clinic::new(&["dr-a"], 1);
    let query = "SELECT user_id FROM cases UNION SELECT 'dr-new-1' UNION SELECT 'dr-new-2'";
    let out = clinic.ok(&["keys", "generate", "--owners-query", query, "--dry-run"]);
    assert!(
        out.contains(
            "Coverage before: 1 of 3 owners have an active data key (33.3%); 2 without a key"
        ),
        "{out}"
    );
    assert!(
        out.contains("would generate a data key for owner dr-new-1"),
        "{out}"
    );
    assert!(out.contains("nothing was changed"), "{out}");
    assert!(
        clinic.key_rows("dr-new-1").is_empty(),
        "dry run wrote nothing"
    );

    let out = clinic.ok(&["keys", "generate", "--owners-query", query]);
    assert!(out.contains("Generated 2 data key(s)"), "{out}");
    assert!(
        out.contains("Coverage after: 3 of 3 owners have an active data key (100.0%)"),
        "{out}"
    );
    assert_eq!(clinic.key_rows("dr-new-2").len(), 1);
    // Idempotent.
    let out = clinic.ok(&["keys", "generate", "--owners-query", query]);
    assert!(out.contains("Generated 0 data key(s)"), "{out}");
    // A query returning many owners (a wrong column, say) needs --force.
    let many = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1001) \
                SELECT 'bulk-' || i FROM n";
    let out = clinic.ok(&["keys", "generate", "--owners-query", many, "--dry-run"]);
    assert!(
        out.contains("1001 key(s) would be generated") && out.contains("needs --force"),
        "{out}"
    );
    assert!(
        out.contains("... and 981 more owner(s) without a key"),
        "{out}"
    );
    let (code, _, err) =
        status_of(&mut clinic.command(&["keys", "generate", "--owners-query", many]));
    assert_eq!(code, Some(3), "refused: {err}");
    assert!(
        err.contains("1001 owners lack a data key") && err.contains("--force"),
        "{err}"
    );
    assert!(clinic.key_rows("bulk-1").is_empty());
    // Without a query the --table owner columns are used.
    let out = clinic.ok(&["keys", "generate", "--dry-run"]);
    assert!(out.contains("Coverage before: 1 of 1 owners"), "{out}");
}

#[test]
fn rewrap_moves_every_key_to_the_new_kek() {
    let clinic = Clinic::new(&["dr-a", "dr-b"], 3);
    clinic.ok(&["keys", "rotate", "--owner", "dr-a"]);
    let new_key = KeyBytes::new([0x5A; 32]);
    let key_file = clinic.dir.path().join("new.key");
    std::fs::write(&key_file, base64_of(&new_key)).expect("key file");
    #[cfg(unix)]
    {
        // A key file others may read is refused, with the fix.
        use std::os::unix::fs::PermissionsExt as _;
        let readable = std::fs::Permissions::from_mode(0o644);
        std::fs::set_permissions(&key_file, readable).expect("chmod");
        let (ok, _, err) = clinic.run(&[
            "keys",
            "rewrap",
            "--to",
            "local:local-2",
            "--to-key-file",
            path(&key_file),
        ]);
        assert!(!ok && err.contains("chmod 600"), "{err}");
        assert!(
            clinic
                .key_rows("dr-a")
                .iter()
                .all(|(_, _, kek, _)| kek == "local-test")
        );
        let private = std::fs::Permissions::from_mode(0o600);
        std::fs::set_permissions(&key_file, private).expect("chmod");
    }

    #[cfg(not(feature = "aws-kms"))]
    {
        let (ok, _, err) = clinic.run(&["keys", "rewrap", "--to", "aws-kms:alias/phi"]);
        assert!(
            !ok && err.contains("aws-kms KEK provider is not built into this phi"),
            "{err}"
        );
    }
    let (ok, _, err) = clinic.run(&["keys", "rewrap", "--to", "local:local-2"]);
    assert!(!ok && err.contains("PHI_NEW_MASTER_KEY"), "{err}");

    let out = clinic.ok(&[
        "keys",
        "rewrap",
        "--to",
        "local:local-2",
        "--to-key-file",
        path(&key_file),
        "--batch-size",
        "2",
    ]);
    assert!(
        out.contains("Rewrapped 3 of 3 data key(s) under KEK local-2 in 2 batch(es)"),
        "{out}"
    );
    for owner in ["dr-a", "dr-b"] {
        assert!(
            clinic
                .key_rows(owner)
                .iter()
                .all(|(_, _, kek, _)| kek == "local-2")
        );
    }
    // The rewrap recorded the new KEK's check value: a wrong key under
    // local-2 is refused from now on.
    let formats: Vec<String> = phi::schema::kek_check_values::table
        .filter(phi::schema::kek_check_values::kek_id.eq("local-2"))
        .select(phi::schema::kek_check_values::format)
        .load(&mut clinic.conn())
        .expect("check values");
    assert_eq!(formats, ["local-hmac-v1"]);
    let (ok, _, err) = finish(
        clinic
            .command(&["--kek-id", "local-2", "keys", "status", "--owner", "dr-a"])
            .env("PHI_MASTER_KEY", base64_of(&KeyBytes::new([0x5B; 32])))
            .output()
            .expect("runs"),
    );
    assert!(
        !ok && err.contains("KEK \"local-2\" is not the key"),
        "{err}"
    );
    let only_new = clinic.keyring(Arc::new(LocalKek::new("local-2", &new_key)));
    assert_eq!(clinic.check_cases(&only_new, "dr-a", 3), [1]);
    assert_eq!(clinic.check_cases(&only_new, "dr-b", 3), [1]);
    // The old key no longer serves; the new one does, from the environment.
    let (ok, _, err) = clinic.run(&["keys", "status", "--owner", "dr-a"]);
    assert!(!ok && err.contains("local-2"), "{err}");
    let out = finish(
        clinic
            .command(&["--kek-id", "local-2", "keys", "status", "--owner", "dr-a"])
            .env("PHI_MASTER_KEY", base64_of(&new_key))
            .output()
            .expect("runs"),
    );
    assert!(out.0 && out.1.contains("KEK local-2"), "{out:?}");
    let audit = clinic.ok(&["audit", "--owner", "dr-a"]);
    assert_eq!(audit.matches(" rewrap ").count(), 2, "{audit}");
    assert!(audit.contains("from KEK local-test"), "{audit}");
}

#[test]
fn shred_asks_first_then_destroys_one_owner() {
    let clinic = Clinic::new(&["dr-a", "dr-b"], 4);
    let mut child = clinic
        .command(&["keys", "shred", "--owner", "dr-a"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"yes\n")
        .expect("answer");
    let out = child.wait_with_output().expect("exit");
    let code = out.status.code();
    let (_, out, err) = finish(out);
    // The prompt and the refusal go to standard error; "yes" is not the
    // owner id typed again: refused (3), nothing changed.
    assert_eq!(code, Some(3), "{out}\n{err}");
    assert!(
        err.contains("Type the owner id again to continue")
            && err.contains("nothing was changed")
            && !out.contains("Type the owner id"),
        "{out}\n{err}"
    );
    assert!(
        err.contains("version 1 (active, KEK local-test)")
            && err.contains("in backups")
            && err.contains("rotated away")
            && !err.contains("for good"),
        "the prompt says exactly what holds: {err}"
    );
    // Another owner's id typed: refused too.
    let mut other = clinic.command(&["keys", "shred", "--owner", "dr-a"]);
    let mut child = other
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"dr-b\n")
        .expect("answer");
    let out = child.wait_with_output().expect("exit");
    assert_eq!(out.status.code(), Some(3));
    assert!(
        clinic
            .key_rows("dr-a")
            .iter()
            .all(|(_, s, _, _)| s == "active")
    );

    // The owner id typed again: shredded.
    let mut child = clinic
        .command(&["keys", "shred", "--owner", "dr-a"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"dr-a\n")
        .expect("answer");
    let out = child.wait_with_output().expect("exit");
    assert_eq!(out.status.code(), Some(0));
    let (_, out, _) = finish(out);
    assert!(
        out.contains("Owner dr-a: destroyed data key version(s) [1]"),
        "{out}"
    );
    assert!(
        out.contains("0 of 1 key row(s) still hold key material; 0 of 6 sampled value(s) in 2 column(s) still open"),
        "{out}"
    );
    assert!(out.contains("Crypto-shredding verified"), "{out}");
    assert!(
        out.contains(
            "processes following the key-event feed (every 2.0 s) drop this owner's keys by"
        ) && out.contains("keep them until their cache TTL expires (default 24 h) or they restart"),
        "{out}"
    );
    assert!(
        out.contains("No value of the owner in these columns is stored in the clear"),
        "{out}"
    );
    assert_eq!(
        clinic.key_rows("dr-a"),
        [(1, "destroyed".to_owned(), "local-test".to_owned(), 0)]
    );

    let keyring = clinic.keyring(common::local_kek());
    let err = keyring
        .seal(&"x".to_string(), "dr-a", "cases.patient_last", b"r")
        .expect_err("shredded");
    assert!(matches!(err, phi::Error::Shredded { .. }), "{err:?}");
    assert_eq!(clinic.check_cases(&keyring, "dr-b", 4), [1]);
    let out = clinic.ok(&["keys", "status"]);
    assert!(
        out.contains("1 of 2 owners have an active data key") && out.contains("1 shredded"),
        "{out}"
    );
    let out = clinic.ok(&["keys", "shred", "--owner", "dr-a", "--yes"]);
    assert!(
        out.contains("no data key left to destroy") && out.contains("verified"),
        "{out}"
    );
    let (ok, _, err) = clinic.run(&["keys", "rotate", "--owner", "dr-a"]);
    assert!(!ok && err.contains("crypto-shredded"), "{err}");
    let audit = clinic.ok(&["audit", "--owner", "dr-a", "--limit", "1"]);
    assert!(
        audit.contains("dr-a") && audit.contains("destroy") && audit.contains("crypto-shredded"),
        "{audit}"
    );
    assert_eq!(audit.lines().count(), 2, "header and one record: {audit}");
}

/// Runs `phi` and returns its exit code and output.
fn status_of(command: &mut Command) -> (Option<i32>, String, String) {
    let out = command.output().expect("phi runs");
    let code = out.status.code();
    let (_, stdout, stderr) = finish(out);
    (code, stdout, stderr)
}

#[test]
fn shred_exit_codes_tell_verified_from_not_verified() {
    let clinic = Clinic::new(&["dr-a", "dr-b", "dr-c"], 2);
    // A mistyped owner: no key listed, so nothing to confirm: refused (3)
    // before any shred step, nothing destroyed.
    let (code, out, _) =
        status_of(&mut clinic.command(&["keys", "shred", "--owner", "dr-aa", "--yes"]));
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains("no data key row at all (is the owner id mistyped?). Nothing was changed.")
            && !out.contains("Crypto-shredding"),
        "{out}"
    );
    assert!(clinic.key_rows("dr-aa").is_empty());
    assert_eq!(clinic.key_rows("dr-a")[0].1, "active");
    // No tables: the keys are destroyed, but nothing was checked.
    let (code, out, _) = status_of(
        clinic
            .command(&["keys", "shred", "--owner", "dr-b", "--yes"])
            .env_remove("PHI_TABLES"),
    );
    assert_eq!(code, Some(4), "{out}");
    assert!(
        out.contains("destroyed data key version(s) [1]")
            && out.contains("- no table is configured"),
        "{out}"
    );
    assert_eq!(clinic.key_rows("dr-b")[0].1, "destroyed");
    // Values stored in the clear are counted and said to stay readable.
    clinic
        .conn()
        .batch_execute(
            "INSERT INTO cases (case_id, user_id, patient_last) VALUES ('dr-c-plain', 'dr-c', CAST('Plain' AS BLOB))",
        )
        .expect("a row stored in the clear");
    let (code, out, _) =
        status_of(&mut clinic.command(&["keys", "shred", "--owner", "dr-c", "--yes"]));
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("WARNING: 1 value(s) of the owner in these columns are stored in the clear")
            && out.contains("Crypto-shredding verified"),
        "{out}"
    );
    let help = clinic.ok(&["keys", "shred", "--help"]);
    assert!(
        help.contains("4 not verified") && help.contains("rotated away"),
        "{help}"
    );
}

#[test]
fn shredding_leaves_no_wrapped_key_in_the_sqlite_file() {
    // Several key rows on one page, so the page is not rewritten whole.
    let clinic = Clinic::new(&["dr-a", "dr-b", "dr-c", "dr-d", "dr-e"], 1);
    let wrapped: Vec<u8> = keys::table
        .filter(keys::owner_id.eq("dr-c"))
        .select(keys::wrapped_key)
        .first(&mut clinic.conn())
        .expect("wrapped key");
    let file = clinic.dir.path().join("clinic.db");
    let holds = |bytes: &[u8]| {
        bytes
            .windows(wrapped.len())
            .any(|w| w == wrapped.as_slice())
    };
    assert!(holds(&std::fs::read(&file).expect("database file")));
    clinic.ok(&["keys", "shred", "--owner", "dr-c", "--yes"]);
    // The key store's connections zero what they delete.
    #[derive(QueryableByName)]
    struct SecureDelete {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        secure_delete: i32,
    }
    let store = DieselKeyStore::<SqliteConnection>::builder(&clinic.url)
        .run_migrations(true)
        .connect()
        .expect("store");
    let pragma: SecureDelete = diesel::sql_query("PRAGMA secure_delete")
        .get_result(&mut *store.pool().get().expect("connection"))
        .expect("pragma");
    assert_eq!(pragma.secure_delete, 1);
    assert!(
        !holds(&std::fs::read(&file).expect("database file")),
        "secure_delete zeroes the old wrapped key in the file"
    );
}

#[test]
fn an_unknown_url_scheme_is_refused_not_taken_for_a_file() {
    let clinic = Clinic::new(&[], 0);
    let (ok, _, err) = clinic.run(&["--database-url", "postgress://localhost/x", "audit"]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("unknown scheme \"postgress\"")
            && err.contains("sqlite://FILE")
            && err.contains("mysql://")
            && err.contains("feature `postgres`"),
        "{err}"
    );
    assert!(
        !clinic.dir.path().join("postgress:").exists() && !Path::new("postgress:").exists(),
        "no SQLite file was created"
    );
    // A plain path and sqlite:// stay SQLite.
    clinic.ok(&["--database-url", &clinic.url, "audit"]);
    clinic.ok(&[
        "--database-url",
        &format!("sqlite://{}", clinic.url),
        "audit",
    ]);
}

#[test]
fn an_owners_query_that_writes_is_refused() {
    let clinic = Clinic::new(&["dr-a"], 1);
    let (ok, _, err) = clinic.run(&[
        "keys",
        "generate",
        "--owners-query",
        "DELETE FROM user_encryption_keys RETURNING owner_id",
    ]);
    assert!(!ok && err.contains("owners query"), "{err}");
    assert_eq!(clinic.key_rows("dr-a").len(), 1, "no key row deleted");
}

#[test]
fn audit_lists_every_key_operation() {
    let clinic = Clinic::new(&["dr-a"], 1);
    clinic.ok(&["--actor", "ops-alice", "keys", "rotate", "--owner", "dr-a"]);
    let out = clinic.ok(&["audit"]);
    let actions: Vec<&str> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(4))
        .collect();
    assert_eq!(actions, ["rotate", "generate"], "{out}");
    assert!(out.contains("ops-alice"), "{out}");

    // The same records for scripts, in the schema `phi audit --help` gives.
    let out = clinic.ok(&["audit", "--format", "json"]);
    let records: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let records = records.as_array().expect("an array");
    assert_eq!(records.len(), 2, "{out}");
    let (rotate, generate) = (&records[0], &records[1]);
    assert_eq!(rotate["action"], "rotate", "{out}");
    assert_eq!(rotate["owner"], "dr-a");
    assert_eq!(rotate["actor"], "ops-alice");
    assert_eq!(rotate["key_version"], 2);
    assert_eq!(rotate["kek_id"], "local-test");
    assert_eq!(generate["action"], "generate");
    assert_eq!(generate["key_version"], 1);
    assert!(
        rotate["id"].as_i64().expect("id") > generate["id"].as_i64().expect("id"),
        "newest first: {out}"
    );
    assert!(
        rotate["occurred_at"]
            .as_str()
            .is_some_and(|t| t.len() == 27 && t.ends_with('Z') && t.as_bytes()[10] == b'T'),
        "{out}"
    );
    let help = clinic.ok(&["audit", "--help"]);
    assert!(
        help.contains("\"occurred_at\"") && help.contains("json"),
        "{help}"
    );
}

#[test]
fn configuration_errors_are_clear() {
    let clinic = Clinic::new(&["dr-a"], 1);
    let (ok, _, err) = finish(
        clinic
            .command(&["audit"])
            .env_remove("DATABASE_URL")
            .output()
            .expect("runs"),
    );
    assert!(
        !ok && err.contains("--database-url or set DATABASE_URL"),
        "{err}"
    );
    let (ok, _, err) = finish(
        clinic
            .command(&["audit"])
            .env_remove("PHI_MASTER_KEY")
            .output()
            .expect("runs"),
    );
    assert!(!ok && err.contains("PHI_MASTER_KEY"), "{err}");
    let (ok, _, err) = clinic.run(&["--table", "cases:user_id", "keys", "status"]);
    assert!(
        !ok && err.contains("four or five ':'-separated fields"),
        "{err}"
    );
    let (ok, _, err) = clinic.run(&["--table", "cases:user_id::x-y", "keys", "status"]);
    assert!(!ok && err.contains("not a plain SQL identifier"), "{err}");
    #[cfg(not(feature = "postgres"))]
    {
        let (ok, _, err) = clinic.run(&["--database-url", "postgres://localhost/x", "audit"]);
        assert!(!ok && err.contains("without PostgreSQL support"), "{err}");
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn base64_of(key: &KeyBytes) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(key.expose())
}

#[test]
fn integer_owner_and_row_key_columns_are_typed_in_the_table_description() {
    let clinic = Clinic::new(&[], 0);
    let mut conn = clinic.conn();
    conn.batch_execute(
        "CREATE TABLE visits (id BIGINT PRIMARY KEY NOT NULL, user_id BIGINT NOT NULL, \
         reason BLOB NOT NULL)",
    )
    .expect("table");
    let keyring = clinic.keyring(common::local_kek());
    let seal = |owner: i64, id: i64| {
        keyring
            .seal(
                &format!("Reason {id}"),
                &owner.to_string(),
                "visits.reason",
                &id.to_be_bytes(),
            )
            .expect("seal")
            .into_bytes()
    };
    for (owner, id) in [(42_i64, 1_i64), (42, 2), (42, 300), (7, 4)] {
        diesel::sql_query("INSERT INTO visits (id, user_id, reason) VALUES (?, ?, ?)")
            .bind::<diesel::sql_types::BigInt, _>(id)
            .bind::<diesel::sql_types::BigInt, _>(owner)
            .bind::<diesel::sql_types::Binary, _>(seal(owner, id))
            .execute(&mut conn)
            .expect("insert");
    }
    let table = ["--table", "visits:user_id#i64:id#i64:reason"];
    let with = |args: &[&'static str]| [&table[..], args].concat();

    let out = clinic.ok(&with(&["keys", "status"]));
    assert!(out.contains("Coverage: 2 of 2 owners"), "{out}");
    clinic.ok(&with(&["keys", "rotate", "--owner", "42"]));
    let out = clinic.ok(&with(&[
        "keys",
        "reseal",
        "--owner",
        "42",
        "--batch-size",
        "2",
    ]));
    assert!(
        out.contains("re-sealed 3 of 3 value(s) under version 2"),
        "{out}"
    );
    let out = clinic.ok(&with(&[
        "keys",
        "retire",
        "--owner",
        "42",
        "--version",
        "1",
    ]));
    assert!(out.contains("retired data key version 1"), "{out}");

    let fresh = clinic.keyring(common::local_kek());
    for (owner, id, version) in [(42_i64, 1_i64, 2), (42, 2, 2), (42, 300, 2), (7, 4, 1)] {
        #[derive(QueryableByName)]
        struct Reason {
            #[diesel(sql_type = diesel::sql_types::Binary)]
            reason: Vec<u8>,
        }
        let stored = diesel::sql_query("SELECT reason FROM visits WHERE id = ?")
            .bind::<diesel::sql_types::BigInt, _>(id)
            .get_result::<Reason>(&mut conn)
            .expect("row")
            .reason;
        let value = Encrypted::<String>::from_bytes(stored);
        assert_eq!(value.key_version(), Some(version), "visit {id}");
        let opened = fresh
            .open(
                value,
                &owner.to_string(),
                "visits.reason",
                &id.to_be_bytes(),
            )
            .expect("opens");
        assert_eq!(opened, format!("Reason {id}"));
    }

    let (ok, _, err) = clinic.run(&with(&["keys", "status", "--owner", "dr-a"]));
    assert!(!ok, "a non-numeric owner on an integer owner column fails");
    assert!(
        err.contains("visits.user_id") && err.contains("dr-a"),
        "{err}"
    );
}

#[test]
fn exit_codes_are_documented_and_distinct() {
    let clinic = Clinic::new(&["dr-a"], 1);
    // 2: clap's usage error.
    let (code, _, err) = status_of(&mut clinic.command(&["keys", "status", "--no-such-option"]));
    assert_eq!(code, Some(2), "{err}");
    // 1: an error, with the whole chain of causes on one line.
    let (code, _, err) = status_of(
        clinic
            .command(&["keys", "status"])
            .env("DATABASE_URL", "postgress://localhost/test"),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("unknown scheme \"postgress\""),
        "{err}"
    );
    // 0: done.
    let (code, _, _) = status_of(&mut clinic.command(&["keys", "status"]));
    assert_eq!(code, Some(0));
    // 3 and 4 are tested with the commands that refuse and verify; all are
    // documented in the help.
    let help = clinic.ok(&["--help"]);
    assert!(
        help.contains("0 done")
            && help.contains("1 an error")
            && help.contains("2 a usage error")
            && help.contains("3 refused or not confirmed")
            && help.contains("4 done but not verified"),
        "{help}"
    );
}

#[test]
fn completions_and_man_page_need_no_database() {
    let clinic = Clinic::new(&["dr-a"], 1);
    let (code, bash, _) = status_of(
        clinic
            .command(&["completions", "bash"])
            .env_remove("DATABASE_URL"),
    );
    assert_eq!(code, Some(0));
    assert!(bash.contains("_phi()") && bash.contains("shred"), "{bash}");
    let (code, man, _) = status_of(clinic.command(&["man"]).env_remove("DATABASE_URL"));
    assert_eq!(code, Some(0));
    assert!(man.starts_with(".ie") || man.contains(".TH phi"), "{man}");
    assert!(man.contains("Exit status"), "{man}");
}

#[test]
fn rotate_due_rotates_exactly_the_owners_past_their_seal_budget() {
    // dr-a: 6 values sealed by the set-up and 10 more; dr-b: 6.
    let clinic = Clinic::new(&["dr-a", "dr-b"], 4);
    {
        let keyring = clinic.keyring(common::local_kek());
        for i in 0..10 {
            keyring
                .seal(
                    &format!("extra {i}"),
                    "dr-a",
                    "cases.patient_last",
                    b"extra",
                )
                .expect("seal");
        }
        keyring.flush_seal_counts().expect("seal counts written");
    }
    let due = clinic.ok(&["keys", "due", "--max-seals-per-key", "10"]);
    assert!(due.contains("dr-a") && !due.contains("dr-b"), "{due}");
    let out = clinic.ok(&[
        "keys",
        "rotate",
        "--due",
        "--max-seals-per-key",
        "10",
        "--job",
        "due-1",
    ]);
    let states = |owner: &str| -> Vec<(i64, String)> {
        clinic
            .key_rows(owner)
            .into_iter()
            .map(|(v, s, _, _)| (v, s))
            .collect()
    };
    assert_eq!(
        states("dr-a"),
        [(1, "retired".to_owned()), (2, "active".to_owned())],
        "{out}"
    );
    assert_eq!(states("dr-b"), [(1, "active".to_owned())], "{out}");
    // The new version has sealed nothing yet: nobody is due any more, and
    // the same job run again (from cron, on another host) does nothing.
    let due = clinic.ok(&["keys", "due", "--max-seals-per-key", "10"]);
    assert!(!due.contains("dr-a"), "{due}");
    clinic.ok(&[
        "keys",
        "rotate",
        "--due",
        "--max-seals-per-key",
        "10",
        "--job",
        "due-1",
    ]);
    assert_eq!(states("dr-a").len(), 2);
}

#[test]
fn rotate_all_plans_then_rotates_reseals_and_retires_every_owner() {
    let clinic = Clinic::new(&["dr-a", "dr-b", "dr-c"], 4);
    let out = clinic.ok(&["keys", "rotate", "--all", "--job", "drill-1", "--dry-run"]);
    assert!(
        out.contains(
            "Plan of job drill-1: 3 owner(s), 3 to rotate (0 done already by this job), 12 row(s), \
             18 value(s) to re-seal, 3 version(s) to retire"
        ),
        "{out}"
    );
    assert!(out.contains("Nothing was changed."), "{out}");
    assert_eq!(
        clinic.key_rows("dr-a").len(),
        1,
        "a dry run changes nothing"
    );

    let out = clinic.ok(&[
        "--format",
        "json",
        "keys",
        "rotate",
        "--all",
        "--job",
        "drill-1",
        "--owners-per-claim",
        "2",
    ]);
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(report["command"], "keys rotate", "{report}");
    assert_eq!(report["job"], "drill-1");
    for (field, n) in [
        ("owners", 3),
        ("rotated", 3),
        ("resealed", 18),
        ("rows", 12),
        ("retired", 3),
        ("done", 3),
        ("pending", 0),
    ] {
        assert_eq!(report[field].as_u64(), Some(n), "{field}: {report}");
    }
    let keyring = clinic.keyring(common::local_kek());
    for owner in ["dr-a", "dr-b", "dr-c"] {
        let states: Vec<(i64, String)> = clinic
            .key_rows(owner)
            .into_iter()
            .map(|(v, s, _, _)| (v, s))
            .collect();
        assert_eq!(
            states,
            [(1, "retired".to_owned()), (2, "active".to_owned())],
            "{owner}"
        );
        assert_eq!(clinic.check_cases(&keyring, owner, 4), [2], "{owner}");
    }
    // The same job again: nothing left to do.
    let out = clinic.ok(&["keys", "rotate", "--all", "--job", "drill-1"]);
    assert!(
        out.contains("3 done before; this worker claimed 0"),
        "{out}"
    );

    let (code, _, err) = status_of(&mut clinic.command(&["keys", "rotate"]));
    assert_eq!(code, Some(2), "which owners is a usage error: {err}");
    let (code, _, err) =
        status_of(&mut clinic.command(&["keys", "rotate", "--all", "--job", "bad job"]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("\"bad job\""), "{err}");
}

#[test]
fn a_killed_rotate_all_worker_is_finished_by_the_next_run() {
    let clinic = Clinic::new(&["dr-a", "dr-b", "dr-c", "dr-d"], 3);
    let marker = clinic.dir.path().join("claimed");
    // A worker whose claims last 0 s stops right after its first claim
    // (dr-a, dr-b), and is killed there.
    let mut child = clinic
        .command(&[
            "keys",
            "rotate",
            "--all",
            "--job",
            "incident",
            "--owners-per-claim",
            "2",
            "--claim-ttl",
            "0",
        ])
        .env("PHI_TEST_PAUSE_AFTER_CLAIM", &marker)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("phi runs");
    while !marker.exists() {
        assert!(
            child.try_wait().expect("child").is_none(),
            "the worker ended before it claimed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL");
    assert!(!child.wait().expect("exit").success());
    assert_eq!(
        clinic.key_rows("dr-a").len(),
        1,
        "killed before any key was created"
    );

    // The next run takes the expired claims and finishes every owner.
    let out = clinic.ok(&[
        "--format", "json", "keys", "rotate", "--all", "--job", "incident",
    ]);
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(report["claimed"].as_u64(), Some(4), "{report}");
    assert_eq!(report["done"].as_u64(), Some(4), "{report}");
    let keyring = clinic.keyring(common::local_kek());
    for owner in ["dr-a", "dr-b", "dr-c", "dr-d"] {
        let states: Vec<(i64, String)> = clinic
            .key_rows(owner)
            .into_iter()
            .map(|(v, s, _, _)| (v, s))
            .collect();
        assert_eq!(
            states,
            [(1, "retired".to_owned()), (2, "active".to_owned())],
            "{owner}"
        );
        assert_eq!(clinic.check_cases(&keyring, owner, 3), [2], "{owner}");
    }
}

#[test]
fn a_fresh_database_is_refused_until_phis_migrations_are_run_or_written() {
    let clinic = Clinic::new(&[], 0);
    let fresh = clinic.dir.path().join("fresh.db").display().to_string();
    // No DDL from an ordinary command: an error naming the table, the
    // migration and the commands that add it.
    let (ok, _, err) = clinic.run(&["--database-url", &fresh, "audit"]);
    assert!(!ok);
    assert!(
        err.contains("user_encryption_keys")
            && err.contains("2026-11-25-000001_phi_key_tables")
            && err.contains("phi migrations write --dir migrations/")
            && err.contains("phi migrations run"),
        "{err}"
    );
    let (code, _, err) =
        status_of(&mut clinic.command(&["--database-url", &fresh, "migrations", "check"]));
    assert_eq!(code, Some(1), "{err}");

    // Written into the application's directory, for its `diesel migration run`.
    let (code, out, err) = status_of(
        clinic
            .command(&[
                "migrations",
                "write",
                "--dir",
                "app-migrations",
                "--backend",
                "sqlite",
            ])
            .env_remove("DATABASE_URL"),
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("migration(s) of phi written for sqlite"),
        "{out}"
    );
    let written = clinic
        .dir
        .path()
        .join("app-migrations/2026-11-25-000001_phi_key_tables/up.sql");
    assert!(written.exists());
    let again = clinic.ok(&[
        "--format",
        "json",
        "migrations",
        "write",
        "--dir",
        "app-migrations",
    ]);
    let again: serde_json::Value = serde_json::from_str(&again).expect("JSON");
    assert_eq!(again["created"], serde_json::json!([]), "{again}");
    assert_eq!(again["backend"], "sqlite", "the backend of DATABASE_URL");

    // Or run by phi, then every command works.
    let out = clinic.ok(&["--database-url", &fresh, "migrations", "run"]);
    assert!(out.contains("phi's tables are ready"), "{out}");
    clinic.ok(&["--database-url", &fresh, "migrations", "check"]);
    clinic.ok(&["--database-url", &fresh, "audit"]);
}

/// A database with tables of phi's names that are another system's (the
/// SurgiCase schema's `user_encryption_keys` and `encryption_key_audit`):
/// the command refuses it naming the prefix option, and with
/// `PHI_TABLE_PREFIX` migrates and manages keys in `phi_…` tables beside
/// them, leaving them as they were.
#[test]
fn a_table_prefix_keeps_phis_tables_beside_another_systems_of_the_same_names() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = dir.path().join("surgicase.db").display().to_string();
    let mut conn = SqliteConnection::establish(&url).expect("database");
    conn.batch_execute(
        "CREATE TABLE user_encryption_keys (id INTEGER PRIMARY KEY, user_id TEXT NOT NULL, \
         encrypted_dek BLOB NOT NULL, kms_key_id TEXT NOT NULL); \
         CREATE TABLE encryption_key_audit (id INTEGER PRIMARY KEY, user_id TEXT NOT NULL, action TEXT NOT NULL); \
         INSERT INTO user_encryption_keys VALUES (1, 'USER001', X'00FF', 'alias/surgicase'); \
         INSERT INTO encryption_key_audit VALUES (1, 'USER001', 'generate');",
    )
    .expect("SurgiCase's tables");
    let clinic = Clinic { dir, url };

    let (ok, _, err) = clinic.run(&["migrations", "run"]);
    assert!(!ok);
    assert!(
        err.contains("user_encryption_keys")
            && err.contains("is not phi's")
            && err.contains("PHI_TABLE_PREFIX"),
        "{err}"
    );
    let prefixed = |args: &[&str]| {
        let mut command = clinic.command(args);
        command
            .env("PHI_TABLE_PREFIX", "phi_")
            .env_remove("PHI_TABLES");
        finish(command.output().expect("phi runs"))
    };
    let (ok, out, err) = prefixed(&["migrations", "run"]);
    assert!(ok, "{err}");
    assert!(out.contains("phi's tables are ready"), "{out}");
    let (ok, out, err) = prefixed(&[
        "keys",
        "generate",
        "--owners-query",
        "SELECT user_id FROM user_encryption_keys",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("Generated 1 data key(s)"), "{out}");
    let (ok, out, err) = prefixed(&["keys", "status"]);
    assert!(ok, "{err}");
    assert!(out.contains("1 key(s)"), "{out}");

    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        row: String,
    }
    let rows = |sql: &str| -> Vec<String> {
        diesel::sql_query(sql)
            .load::<Row>(&mut clinic.conn())
            .expect(sql)
            .into_iter()
            .map(|r| r.row)
            .collect()
    };
    assert_eq!(
        rows("SELECT owner_id || ' v' || version AS row FROM phi_user_encryption_keys"),
        ["USER001 v1"]
    );
    assert_eq!(
        rows(
            "SELECT user_id || ' ' || hex(encrypted_dek) || ' ' || kms_key_id AS row FROM user_encryption_keys"
        ),
        ["USER001 00FF alias/surgicase"],
        "SurgiCase's keys as they were"
    );
    assert_eq!(
        rows("SELECT user_id || ' ' || action AS row FROM encryption_key_audit"),
        ["USER001 generate"],
        "SurgiCase's audit as it was"
    );

    // The flag, and written migrations, carry the prefix too.
    let written = clinic.dir.path().join("written");
    let (ok, _, err) = clinic.run(&[
        "migrations",
        "write",
        "--dir",
        path(&written),
        "--backend",
        "sqlite",
        "--table-prefix",
        "phi_",
    ]);
    assert!(ok, "{err}");
    let up = std::fs::read_to_string(written.join("2026-11-25-000001_phi_key_tables/up.sql"))
        .expect("written up.sql");
    assert!(up.contains("CREATE TABLE phi_user_encryption_keys"), "{up}");
    assert!(!up.contains("TABLE user_encryption_keys"), "{up}");

    let (ok, _, err) = clinic.run(&["keys", "status", "--table-prefix", "Phi-"]);
    assert!(!ok);
    assert!(
        err.contains("invalid table prefix") && err.contains("\"Phi-\""),
        "{err}"
    );
}
