//! An application's own `phi` command (`examples/own_cli.rs`: `cli::App`
//! with one derived model), run as a built binary on SQLite and, with their
//! cargo features, MariaDB and PostgreSQL (each in a database of its own,
//! created afresh: `phi_own_cli_it` on the servers named by
//! `PHI_TEST_MYSQL_URL` / `PHI_TEST_POSTGRES_URL`). Every report is read
//! with `--format json`; the database is checked after each step.
#![cfg(feature = "sqlite")]

mod common;

use std::process::{Command, Output};

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use serde_json::Value;

/// Legacy notes, flag off, spread over three authors.
const NOTES: i64 = 30;

/// A database for the binary, and the directory it runs in.
struct Db {
    url: String,
    dir: tempfile::TempDir,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

impl Db {
    fn sqlite() -> Db {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("sqlite://{}", dir.path().join("notes.db").display());
        let db = Db { url, dir };
        db.execute(&[
            "CREATE TABLE own_cli_notes (id INTEGER PRIMARY KEY NOT NULL, author TEXT NOT NULL, \
             body BLOB NOT NULL, sealed BOOLEAN NOT NULL DEFAULT 0)",
        ]);
        db
    }

    /// A fresh database `phi_own_cli_it` beside the server's test database.
    #[allow(dead_code)]
    fn server(test_url: &str, create: &str) -> Db {
        let (base, _) = test_url.rsplit_once('/').expect("URL with a database");
        let admin = Db {
            url: test_url.to_owned(),
            dir: tempfile::tempdir().expect("temporary directory"),
        };
        if test_url.starts_with("postgres") {
            admin.execute(&[
                "DROP DATABASE IF EXISTS phi_own_cli_it WITH (FORCE)",
                "CREATE DATABASE phi_own_cli_it",
            ]);
        } else {
            admin.execute(&[
                "DROP DATABASE IF EXISTS phi_own_cli_it",
                "CREATE DATABASE phi_own_cli_it",
            ]);
        }
        let db = Db {
            url: format!("{base}/phi_own_cli_it"),
            dir: admin.dir,
        };
        db.execute(&[create]);
        db
    }

    fn execute(&self, statements: &[&str]) {
        macro_rules! run {
            ($conn:expr) => {{
                let mut conn = $conn;
                for s in statements {
                    diesel::sql_query(*s).execute(&mut conn).expect(s);
                }
            }};
        }
        if let Some(path) = self.url.strip_prefix("sqlite://") {
            return run!(SqliteConnection::establish(path).expect("sqlite"));
        }
        #[cfg(feature = "mysql")]
        if self.url.starts_with("mysql:") {
            return run!(
                MysqlConnection::establish(&self.url)
                    .unwrap_or_else(|e| panic!("MariaDB at {} is needed: {e}", self.url))
            );
        }
        #[cfg(feature = "postgres")]
        if self.url.starts_with("postgres") {
            return run!(
                PgConnection::establish(&self.url)
                    .unwrap_or_else(|e| panic!("PostgreSQL at {} is needed: {e}", self.url))
            );
        }
        panic!("no backend for {}", self.url);
    }

    fn count(&self, sql: &str) -> i64 {
        macro_rules! one {
            ($conn:expr) => {{
                let mut conn = $conn;
                diesel::sql_query(sql)
                    .get_result::<Count>(&mut conn)
                    .expect(sql)
                    .n
            }};
        }
        if let Some(path) = self.url.strip_prefix("sqlite://") {
            return one!(SqliteConnection::establish(path).expect("sqlite"));
        }
        #[cfg(feature = "mysql")]
        if self.url.starts_with("mysql:") {
            return one!(MysqlConnection::establish(&self.url).expect("mysql"));
        }
        #[cfg(feature = "postgres")]
        if self.url.starts_with("postgres") {
            return one!(PgConnection::establish(&self.url).expect("postgres"));
        }
        panic!("no backend for {}", self.url);
    }

    fn flag(&self, on: bool) -> i64 {
        self.count(&format!(
            "SELECT COUNT(*) AS n FROM own_cli_notes WHERE {}sealed",
            if on { "" } else { "NOT " }
        ))
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(common::example_bin("own_cli"));
        cmd.current_dir(self.dir.path())
            .args(args)
            .env("DATABASE_URL", &self.url)
            .env("PHI_MASTER_KEY", common::MASTER_KEY_B64)
            .env_remove("PHI_MASTER_KEY_FILE")
            .env_remove("PHI_TABLES")
            .env_remove("RUST_LOG");
        cmd
    }

    /// Runs the binary: its exit code, standard output and error.
    fn run(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out: Output = self.command(args).output().expect("the binary runs");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains("panicked"), "{stderr}");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr,
        )
    }

    /// Runs a command with `--format json` that must succeed; its report.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--format", "json"]);
        let (code, out, err) = self.run(&all);
        assert_eq!(code, Some(0), "{all:?}:\n{out}\n{err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{all:?}: not JSON ({e}):\n{out}"))
    }
}

/// The whole adoption path through the application's own command.
fn adopt_through_the_own_command(db: &Db) {
    let binary = if db.url.starts_with("sqlite") {
        "BLOB"
    } else if db.url.starts_with("mysql") {
        "BINARY"
    } else {
        "BYTEA"
    };
    let values: Vec<String> = (1..=NOTES)
        .map(|i| {
            format!(
                "({i}, 'writer-{}', CAST('note {i}' AS {binary}), FALSE)",
                i % 3
            )
        })
        .collect();
    let insert = format!(
        "INSERT INTO own_cli_notes (id, author, body, sealed) VALUES {}",
        values.join(", ")
    );
    db.execute(&[&insert]);

    let status = db.json(&["status"]);
    assert_eq!(status["command"], "status");
    let table = &status["tables"][0];
    assert_eq!(
        (&table["model"], &table["table"]),
        (&Value::from("Note"), &Value::from("own_cli_notes")),
        "{status}"
    );
    assert_eq!(
        (table["sealed"].as_i64(), table["flag_off"].as_i64()),
        (Some(0), Some(NOTES))
    );

    // Schema migrations from the model and the live table: finalize is
    // refused while rows are unsealed (exit status 4), nothing written.
    let (code, out, err) = db.run(&["finalize", "--model", "Note", "--dir", "migrations"]);
    assert_eq!(code, Some(4), "{out}\n{err}");
    assert!(
        err.contains(&format!("{NOTES} rows are not sealed")),
        "{err}"
    );
    assert!(!db.dir.path().join("migrations").exists());
    let generated = db.json(&[
        "migration",
        "generate",
        "--model",
        "Note",
        "--strategy",
        "shadow",
        "--dir",
        "migrations",
    ]);
    let directory = std::path::PathBuf::from(generated["directory"].as_str().expect("directory"));
    let name = directory
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(name.ends_with("_phi_shadow_own_cli_notes"), "{generated}");
    let up = db.dir.path().join(&directory).join("up.sql");
    assert_eq!(
        std::fs::read_to_string(&up).expect("up.sql written"),
        generated["up"].as_str().expect("up")
    );
    assert!(
        generated["up"]
            .as_str()
            .expect("up")
            .contains("ADD COLUMN body_encrypted"),
        "{generated}"
    );
    assert!(
        generated["down"]
            .as_str()
            .expect("down")
            .contains("DROP COLUMN body_encrypted"),
        "{generated}"
    );
    let other = if db.url.starts_with("sqlite") {
        "postgres"
    } else {
        "sqlite"
    };
    let (code, _, err) = db.run(&[
        "migration",
        "generate",
        "--model",
        "Note",
        "--strategy",
        "in-place",
        "--backend",
        other,
        "--dir",
        "migrations",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--backend"), "{err}");

    // A dry run counts and writes nothing, not even a data key.
    let dry = db.json(&["backfill", "--dry-run"]);
    assert_eq!(dry["dry_run"], true, "{dry}");
    let t = &dry["tables"][0];
    assert_eq!(t["rows"].as_i64(), Some(NOTES), "{dry}");
    assert_eq!(t["owners"], 3);
    assert_eq!(t["new_owner_keys"], 3);
    assert_eq!(t["undecodable"], 0);
    assert_eq!(db.flag(false), NOTES, "a dry run changes nothing");
    assert_eq!(
        db.count("SELECT COUNT(*) AS n FROM user_encryption_keys"),
        0
    );

    // The backfill in batches of 7, throttled (generously: the rate logic
    // itself is tested with a clock of its own).
    let done = db.json(&["--quiet", "backfill", "--batch", "7", "--rate", "1000000"]);
    let t = &done["tables"][0];
    assert_eq!(done["dry_run"], false);
    assert_eq!(
        (
            t["rows"].as_i64(),
            t["batches"].as_i64(),
            t["remaining"].as_i64()
        ),
        (Some(NOTES), Some(5), Some(0)),
        "{done}"
    );
    assert_eq!(t["new_owner_keys"], 3);
    assert_eq!(db.flag(true), NOTES);
    let status = db.json(&["status", "--model", "Note"]);
    assert_eq!(
        status["tables"][0]["sealed"].as_i64(),
        Some(NOTES),
        "{status}"
    );
    assert_eq!(status["tables"][0]["flag_off"], 0);

    let verified = db.json(&["verify"]);
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(verified["tables"][0]["sealed"].as_i64(), Some(NOTES));
    assert_eq!(verified["tables"][0]["failures"], Value::Array(Vec::new()));

    // Every row sealed and verified, but the model has no shadow column:
    // finalize is refused (exit status 3).
    let (code, _, err) = db.run(&["finalize", "--model", "Note", "--dir", "migrations"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("own_cli_notes") && err.contains("shadow"),
        "{err}"
    );

    // The key commands see the model's table without any --table.
    let keys = db.json(&["keys", "status"]);
    assert_eq!(keys["command"], "keys status", "{keys}");
    assert_eq!(keys["coverage"]["owners"], 3, "{keys}");
    assert_eq!(keys["coverage"]["with_active_key"], 3);
    let active: i64 = keys["keys_by_kek"]
        .as_array()
        .expect("keys by KEK")
        .iter()
        .filter(|c| c["state"] == "active")
        .map(|c| c["keys"].as_i64().expect("count"))
        .sum();
    assert_eq!(active, 3, "{keys}");
    let rotated = db.json(&["keys", "rotate", "--owner", "writer-1"]);
    assert_eq!(
        (&rotated["command"], &rotated["version"]),
        (&Value::from("keys rotate"), &Value::from(2)),
        "{rotated}"
    );
    assert_eq!(rotated["values_under_older_versions"], 10);
    let resealed = db.json(&["keys", "reseal", "--owner", "writer-1"]);
    assert_eq!(resealed["resealed"], 10, "{resealed}");
    let owner = db.json(&["keys", "status", "--owner", "writer-1"]);
    assert_eq!(owner["current_version"], 2, "{owner}");
    assert_eq!(owner["usage"][0]["key_version"], 2, "{owner}");
    let audit = db.json(&["audit", "--owner", "writer-1"]);
    let actions: Vec<&str> = audit
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|r| r["action"].as_str())
        .collect();
    assert!(
        actions.contains(&"rotate") && actions.contains(&"generate"),
        "{audit}"
    );
    assert!(
        audit
            .as_array()
            .expect("records")
            .iter()
            .all(|r| r["actor"] == "notes-admin"),
        "the application's keyring is the actor: {audit}"
    );

    // A row that no longer opens: verify says where, with exit status 4.
    let doubled = if db.url.starts_with("mysql") {
        "CONCAT(body, body)"
    } else {
        "body || body"
    };
    db.execute(&[&format!(
        "UPDATE own_cli_notes SET body = {doubled} WHERE id = 4"
    )]);
    let (code, out, err) = db.run(&["verify", "--format", "json"]);
    assert_eq!(code, Some(4), "{out}\n{err}");
    let failed: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(failed["ok"], false, "{failed}");
    let failure = &failed["tables"][0]["failures"][0];
    assert_eq!(
        (&failure["column"], &failure["row_key"], &failure["owner"]),
        (
            &Value::from("body"),
            &Value::from("4"),
            &Value::from("writer-1")
        ),
        "{failed}"
    );

    // Unknown models are named, known ones listed.
    let (code, _, err) = db.run(&["status", "--model", "Nope"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("Nope") && err.contains("Note (table own_cli_notes)"),
        "{err}"
    );

    // The rollback: refused without --yes, then while new rows are still
    // sealed (exit status 3, nothing changed).
    db.execute(&["DELETE FROM own_cli_notes WHERE id = 4"]);
    let (code, _, err) = db.run(&["decrypt-back"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("--yes"), "{err}");
    let (code, _, err) = db.run(&["decrypt-back", "--yes"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("rollout nobody"), "{err}");
    assert_eq!(db.flag(true), NOTES - 1);
    let rollout = db.json(&["rollout", "nobody"]);
    assert_eq!(rollout["set"], "nobody", "{rollout}");
    assert_eq!(rollout["rollout"]["value"], "nobody");
    let back = db.json(&["decrypt-back", "--yes", "--batch", "100"]);
    assert_eq!(
        back["tables"][0]["rows"].as_i64(),
        Some(NOTES - 1),
        "{back}"
    );
    assert_eq!(db.flag(true), 0);
    let verified = db.json(&["verify"]);
    assert_eq!(
        verified["tables"][0]["unsealed"].as_i64(),
        Some(NOTES - 1),
        "{verified}"
    );
    assert_eq!(verified["ok"], true);

    // Text for people; the job commands are there, the help lists them.
    let (code, help, _) = db.run(&["--help"]);
    assert_eq!(code, Some(0));
    assert!(
        help.contains("notes-admin") && help.contains("backfill") && help.contains("decrypt-back"),
        "{help}"
    );
    let (code, text, _) = db.run(&["status"]);
    assert_eq!(code, Some(0));
    assert!(
        text.contains("own_cli_notes") && text.contains("Note"),
        "{text}"
    );
}

#[test]
fn own_command_on_sqlite() {
    adopt_through_the_own_command(&Db::sqlite());
}

#[cfg(feature = "postgres")]
#[test]
fn own_command_on_postgres() {
    let url = std::env::var("PHI_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let db = Db::server(
        &url,
        "CREATE TABLE own_cli_notes (id BIGINT PRIMARY KEY, author TEXT NOT NULL, \
         body BYTEA NOT NULL, sealed BOOLEAN NOT NULL DEFAULT FALSE)",
    );
    adopt_through_the_own_command(&db);
}

#[cfg(feature = "mysql")]
#[test]
fn own_command_on_mariadb() {
    let url = std::env::var("PHI_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let db = Db::server(
        &url,
        "CREATE TABLE own_cli_notes (id BIGINT PRIMARY KEY, author VARCHAR(64) NOT NULL, \
         body LONGBLOB NOT NULL, sealed BOOLEAN NOT NULL DEFAULT FALSE)",
    );
    adopt_through_the_own_command(&db);
}
