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
        db.execute_then_migrate(
            &[
                "CREATE TABLE own_cli_notes (id INTEGER PRIMARY KEY NOT NULL, author TEXT NOT NULL, \
                 body BLOB NOT NULL, sealed BOOLEAN NOT NULL DEFAULT 0)",
            ],
            true,
        );
        db
    }

    /// A fresh database `name` beside the server's test database.
    #[allow(dead_code)]
    fn server(test_url: &str, name: &str, create: &str) -> Db {
        let (base, _) = test_url.rsplit_once('/').expect("URL with a database");
        let admin = Db {
            url: test_url.to_owned(),
            dir: tempfile::tempdir().expect("temporary directory"),
        };
        if test_url.starts_with("postgres") {
            admin.execute(&[
                &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                &format!("CREATE DATABASE {name}"),
            ]);
        } else {
            admin.execute(&[
                &format!("DROP DATABASE IF EXISTS {name}"),
                &format!("CREATE DATABASE {name}"),
            ]);
        }
        let db = Db {
            url: format!("{base}/{name}"),
            dir: admin.dir,
        };
        db.execute_then_migrate(&[create], true);
        db
    }

    fn execute(&self, statements: &[&str]) {
        self.execute_then_migrate(statements, false);
    }

    /// Runs `statements`, then, if asked, phi's migrations: the
    /// application's schema, with phi's tables in it as its own migrations
    /// would add them (`phi migrations write`). phi's stores create none.
    fn execute_then_migrate(&self, statements: &[&str], phi_migrations: bool) {
        macro_rules! run {
            ($conn:expr) => {{
                let mut conn = $conn;
                for s in statements {
                    diesel::sql_query(*s).execute(&mut conn).expect(s);
                }
                if phi_migrations {
                    phi::migrations::run_pending(&mut conn).expect("phi's migrations");
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
            .env_remove("ENCRYPTION_KEY")
            .env_remove("ENCRYPTION_KEY_FALLBACK")
            .env_remove("PHI_LEGACY_GCM_KEYS")
            .env_remove("RUST_LOG");
        cmd
    }

    /// [`Db::run`] with these environment variables set.
    #[allow(dead_code)]
    fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
        let mut cmd = self.command(args);
        cmd.envs(env.iter().copied());
        let out: Output = cmd.output().expect("the binary runs");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains("panicked"), "{stderr}");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr,
        )
    }

    /// [`Db::json`] with these environment variables set.
    #[allow(dead_code)]
    fn json_env(&self, args: &[&str], env: &[(&str, &str)]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--format", "json"]);
        let (code, out, err) = self.run_env(&all, env);
        assert_eq!(code, Some(0), "{all:?}:\n{out}\n{err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{all:?}: not JSON ({e}):\n{out}"))
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
    // down.sql quotes every identifier.
    let quote = if db.url.starts_with("mysql") {
        '`'
    } else {
        '"'
    };
    assert!(
        generated["down"]
            .as_str()
            .expect("down")
            .contains(&format!("DROP COLUMN {quote}body_encrypted{quote}")),
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
    // The backfill's process recorded its seals when its keyring was
    // dropped; `keys due` in this process reads them: ten notes per author.
    let due = db.json(&["keys", "due", "--max-seals-per-key", "10"]);
    assert_eq!(due["command"], "keys due", "{due}");
    let mut listed: Vec<(String, u64)> = due["due"]
        .as_array()
        .expect("due")
        .iter()
        .map(|d| {
            assert_eq!(d["reasons"], serde_json::json!(["seals"]), "{due}");
            (
                d["owner"].as_str().expect("owner").to_owned(),
                d["seals"].as_u64().expect("seals"),
            )
        })
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            ("writer-0".to_owned(), 10),
            ("writer-1".to_owned(), 10),
            ("writer-2".to_owned(), 10)
        ],
        "{due}"
    );
    let due = db.json(&["keys", "due", "--max-seals-per-key", "11"]);
    assert_eq!(due["due"], serde_json::json!([]), "{due}");
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

    // An emergency rotation of every author from the application's own
    // command: the model's table re-sealed, the old versions retired.
    let plan = db.json(&["keys", "rotate", "--all", "--dry-run"]);
    assert_eq!(plan["plan"]["rows"].as_i64(), Some(NOTES), "{plan}");
    assert_eq!(plan["plan"]["values"].as_i64(), Some(NOTES), "{plan}");
    let rotated = db.json(&["keys", "rotate", "--all", "--job", "own-rotation"]);
    assert_eq!(rotated["resealed"].as_i64(), Some(NOTES), "{rotated}");
    // writer-1 was rotated and re-sealed above: versions 1 and 2 retire.
    assert_eq!(rotated["rotated"].as_i64(), Some(3), "{rotated}");
    assert_eq!(rotated["retired"].as_i64(), Some(4), "{rotated}");
    assert_eq!(rotated["pending"].as_i64(), Some(0), "{rotated}");
    let verified = db.json(&["verify"]);
    assert_eq!(verified["ok"], true, "{verified}");

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

#[cfg(feature = "legacy-fernet")]
/// Notes written before phi by applications that encrypted them
/// themselves (Fernet tokens, versioned AES-GCM texts; the fixtures of
/// `tests/fixtures/legacy.py`), imported with `--legacy`.
fn import_legacy_through_the_own_command(db: &Db) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/legacy.json");
    let all: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixtures")).expect("JSON");
    let stored = |format: &str, name: &str| -> (String, String) {
        let item = all[format]
            .as_array()
            .expect("a list")
            .iter()
            .find(|i| i["name"] == name)
            .unwrap_or_else(|| panic!("fixture {format}/{name}"));
        (
            item["stored"].as_str().expect("stored").to_owned(),
            item["plain"].as_str().unwrap_or_default().to_owned(),
        )
    };
    let binary = if db.url.starts_with("sqlite") {
        "BLOB"
    } else if db.url.starts_with("mysql") {
        "BINARY"
    } else {
        "BYTEA"
    };
    // (id, stored, plain): two Fernet tokens (primary and fallback key),
    // three versioned AES-GCM texts (v1, v1 with the tag apart, v2), one
    // plain note.
    let rows = [
        (1, stored("fernet", "primary")),
        (2, stored("fernet", "fallback")),
        (3, stored("gcm", "v1")),
        (4, stored("gcm", "v1_tag_apart")),
        (5, stored("gcm", "v2")),
        (6, ("plain note".to_owned(), "plain note".to_owned())),
    ];
    let values: Vec<String> = rows
        .iter()
        .map(|(id, (text, _))| {
            format!(
                "({id}, 'writer-{}', CAST('{text}' AS {binary}), FALSE)",
                id % 2
            )
        })
        .collect();
    db.execute(&[&format!(
        "INSERT INTO own_cli_notes (id, author, body, sealed) VALUES {}",
        values.join(", ")
    )]);
    let fernet_primary = all["fernet_keys"]["primary"].as_str().expect("key");
    let fernet_fallback = all["fernet_keys"]["fallback"].as_str().expect("key");
    let gcm = format!(
        "v1={}, v2={}",
        all["gcm_keys"]["v1"].as_str().expect("key"),
        all["gcm_keys"]["v2"].as_str().expect("key")
    );
    // The fallback key under a name of the application's.
    let env = [
        ("ENCRYPTION_KEY", fernet_primary),
        ("NOTES_OLD_FERNET_KEY", fernet_fallback),
        ("NOTES_GCM_KEYS", gcm.as_str()),
    ];
    let legacy = [
        "--legacy",
        "fernet",
        "--legacy",
        "versioned-gcm",
        "--legacy-key-env",
        "ENCRYPTION_KEY,NOTES_OLD_FERNET_KEY",
        "--legacy-gcm-keys-env",
        "NOTES_GCM_KEYS",
    ];
    fn with<'a>(command: &[&'a str], legacy: &[&'a str]) -> Vec<&'a str> {
        command.iter().chain(legacy).copied().collect()
    }
    // Recorded before phi's writers run: the values the backfill decodes.
    let recorded = db.json_env(&with(&["migration", "record-legacy"], &legacy), &env);
    assert_eq!(
        (
            recorded["tables"][0]["recognised"].as_i64(),
            recorded["tables"][0]["recorded"].as_i64()
        ),
        (Some(5), Some(5)),
        "{recorded}"
    );
    // Then a note that merely looks legacy, written by the application
    // (unrecorded): counted, reported, sealed as it is.
    db.execute(&[&format!(
        "INSERT INTO own_cli_notes (id, author, body, sealed) VALUES (7, 'writer-1', CAST('v1:Follow:Up' AS {binary}), FALSE)"
    )]);
    let rows: Vec<(i32, (String, String))> = rows
        .into_iter()
        .chain([(7, ("v1:Follow:Up".to_owned(), "v1:Follow:Up".to_owned()))])
        .collect();
    let counts = |report: &Value| -> Vec<(String, i64, i64)> {
        report["tables"][0]["legacy"]
            .as_array()
            .unwrap_or_else(|| panic!("legacy counts: {report}"))
            .iter()
            .map(|c| {
                (
                    c["format"].as_str().expect("format").to_owned(),
                    c["found"].as_i64().expect("found"),
                    c["failed"].as_i64().expect("failed"),
                )
            })
            .collect()
    };
    let never_printed = |text: &str| {
        for key in [fernet_primary, fernet_fallback, gcm.as_str()] {
            assert!(!text.contains(key), "a key was printed: {text}");
        }
        assert!(
            !text.contains(all["gcm_keys"]["v1"].as_str().expect("key")),
            "{text}"
        );
    };

    // The dry run counts each format; without the fallback key, the token
    // written under it is counted as failing.
    let dry = db.json_env(&with(&["backfill", "--dry-run"], &legacy), &env);
    never_printed(&dry.to_string());
    assert_eq!(
        counts(&dry),
        [
            ("aes-gcm-versioned".to_owned(), 3, 0),
            ("fernet".to_owned(), 2, 0)
        ],
        "{dry}"
    );
    assert_eq!(dry["tables"][0]["rows"].as_i64(), Some(7), "{dry}");
    assert_eq!(
        dry["tables"][0]["legacy_as_text"].as_i64(),
        Some(1),
        "{dry}"
    );
    assert!(
        dry["tables"][0]["problems"].as_array().is_some_and(|p| p
            .iter()
            .any(|p| p["kind"] == "LegacyAsText" && p["row_key"] == "7")),
        "{dry}"
    );
    let only_primary = [
        ("ENCRYPTION_KEY", fernet_primary),
        ("NOTES_GCM_KEYS", gcm.as_str()),
    ];
    let dry = db.json_env(&with(&["backfill", "--dry-run"], &legacy), &only_primary);
    assert_eq!(counts(&dry)[1], ("fernet".to_owned(), 2, 1), "{dry}");
    let (code, text, err) = db.run_env(&with(&["backfill", "--dry-run"], &legacy), &env);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        text.contains("fernet")
            && text.contains("aes-gcm-versioned")
            && text.contains("1 value(s) look legacy"),
        "{text}"
    );
    never_printed(&text);
    never_printed(&err);
    assert_eq!(db.flag(false), 7, "a dry run changes nothing");

    // verify checks that the legacy values open.
    let verified = db.json_env(&with(&["verify"], &legacy), &env);
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(
        counts(&verified),
        counts(&db.json_env(&with(&["backfill", "--dry-run"], &legacy), &env))
    );

    // A format whose keys are missing is an error naming the variable.
    let (code, _, err) = db.run_env(
        &["backfill", "--dry-run", "--legacy", "versioned-gcm"],
        &env,
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("PHI_LEGACY_GCM_KEYS"), "{err}");
    let (code, _, err) = db.run_env(
        &[
            "backfill",
            "--dry-run",
            "--legacy",
            "versioned-gcm",
            "--legacy-gcm-keys-env",
            "NOTES_GCM_KEYS",
        ],
        &[("NOTES_GCM_KEYS", "v1=c2hvcnQ=")],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("v1") && !err.contains("c2hvcnQ"), "{err}");

    // The backfill seals the plaintexts, not the old ciphertexts: every
    // envelope is its plaintext's length plus the same overhead.
    let done = db.json_env(&with(&["--quiet", "backfill"], &legacy), &env);
    assert_eq!(
        counts(&done),
        counts(&dry)
            .into_iter()
            .map(|(f, n, _)| (f, n, 0))
            .collect::<Vec<_>>(),
        "{done}"
    );
    assert_eq!(db.flag(true), 7);
    assert_eq!(
        done["tables"][0]["legacy_as_text"].as_i64(),
        Some(1),
        "{done}"
    );
    let overheads: Vec<i64> = rows
        .iter()
        .map(|(id, (_, plain))| {
            let length = if db.url.starts_with("postgres") {
                "LENGTH(body)::BIGINT"
            } else {
                "LENGTH(body)"
            };
            db.count(&format!(
                "SELECT {length} AS n FROM own_cli_notes WHERE id = {id}"
            )) - plain.len() as i64
        })
        .collect();
    assert!(
        overheads.iter().all(|o| *o == overheads[0] && *o < 100),
        "{overheads:?}"
    );
    let verified = db.json(&["verify"]);
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(
        verified["tables"][0]["sealed"].as_i64(),
        Some(7),
        "{verified}"
    );
    // Once a row is sealed, recording is refused (exit 3), nothing recorded.
    let (code, _, err) = db.run_env(&with(&["migration", "record-legacy"], &legacy), &env);
    assert_eq!(code, Some(3), "{err}");
}

#[test]
fn own_command_on_sqlite() {
    adopt_through_the_own_command(&Db::sqlite());
}

#[cfg(feature = "legacy-fernet")]
#[test]
fn legacy_import_on_sqlite() {
    import_legacy_through_the_own_command(&Db::sqlite());
}

#[cfg(all(feature = "postgres", feature = "legacy-fernet"))]
#[test]
fn legacy_import_on_postgres() {
    let url = std::env::var("PHI_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let db = Db::server(
        &url,
        "phi_own_cli_legacy_it",
        "CREATE TABLE own_cli_notes (id BIGINT PRIMARY KEY, author TEXT NOT NULL, \
         body BYTEA NOT NULL, sealed BOOLEAN NOT NULL DEFAULT FALSE)",
    );
    import_legacy_through_the_own_command(&db);
}

#[cfg(all(feature = "mysql", feature = "legacy-fernet"))]
#[test]
fn legacy_import_on_mariadb() {
    let url = std::env::var("PHI_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let db = Db::server(
        &url,
        "phi_own_cli_legacy_it",
        "CREATE TABLE own_cli_notes (id BIGINT PRIMARY KEY, author VARCHAR(64) NOT NULL, \
         body LONGBLOB NOT NULL, sealed BOOLEAN NOT NULL DEFAULT FALSE)",
    );
    import_legacy_through_the_own_command(&db);
}

#[cfg(feature = "postgres")]
#[test]
fn own_command_on_postgres() {
    let url = std::env::var("PHI_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let db = Db::server(
        &url,
        "phi_own_cli_it",
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
        "phi_own_cli_it",
        "CREATE TABLE own_cli_notes (id BIGINT PRIMARY KEY, author VARCHAR(64) NOT NULL, \
         body LONGBLOB NOT NULL, sealed BOOLEAN NOT NULL DEFAULT FALSE)",
    );
    adopt_through_the_own_command(&db);
}

/// A new database with the application's table and none of phi's: the
/// application's command puts phi's tables in place with `migrations run`
/// (its keyring is built only for commands that need it), where a key
/// command first fails naming what is missing.
#[test]
fn own_command_runs_phi_migrations_on_a_new_database() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = format!("sqlite://{}", dir.path().join("notes.db").display());
    let db = Db { url, dir };
    db.execute(&[
        "CREATE TABLE own_cli_notes (id INTEGER PRIMARY KEY NOT NULL, author TEXT NOT NULL, \
         body BLOB NOT NULL, sealed BOOLEAN NOT NULL DEFAULT 0)",
    ]);

    let (code, _, err) = db.run(&["status"]);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("is not ready (migration 20"), "{err}");

    let (code, out, err) = db.run(&["migrations", "run"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = db.run(&["status"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("own_cli_notes"), "{out}");
}
