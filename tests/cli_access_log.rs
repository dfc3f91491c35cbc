//! `phi audit access`, `phi audit verify` and `phi audit prune`, run as the
//! built binary against every backend enabled by cargo features (SQLite: a
//! temporary file; MySQL / MariaDB and PostgreSQL: `PHI_TEST_MYSQL_URL` and
//! `PHI_TEST_POSTGRES_URL`, each test on a chain of its own).

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;

use phi::access::{AccessLog as _, AccessOp, AccessRecord, Accessor};
use phi::access_log::{DieselAccessLog, DieselAccessLogStore};
use phi::{DieselKeyStore, Keyring, PhiConnection};

fn phi(url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_phi"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("PHI_MASTER_KEY", common::MASTER_KEY_B64)
        .env("PHI_KEK_ID", "local-test")
        .env_remove("PHI_MASTER_KEY_FILE")
        .env_remove("PHI_TABLES")
        .env_remove("PHI_ACCESS_LOG_URL")
        .stdin(Stdio::null())
        .output()
        .expect("phi runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes four records on a chain of its own (two batches); returns the
/// chain and the owner.
fn write_records<C: PhiConnection>(url: &str) -> (String, String)
where
    DieselKeyStore<C>: phi::KeyStore,
    DieselAccessLogStore<C>: phi::access_log::AccessLogStore,
{
    let store = Arc::new(
        DieselKeyStore::<C>::builder(url)
            .run_migrations(true)
            .connect()
            .expect("key store"),
    );
    let keyring = Keyring::builder(store, common::local_kek())
        .build()
        .expect("keyring");
    let chain = common::unique_owner("cli");
    let owner = common::unique_owner("cli-owner");
    let tables = Arc::new(
        DieselAccessLogStore::<C>::builder(url)
            .run_migrations(true)
            .connect()
            .expect("tables"),
    );
    let log = DieselAccessLog::builder(tables)
        .chain(chain.clone())
        .start(&keyring)
        .expect("log");
    let at = chrono::Utc::now().naive_utc();
    let record = |user: &str, op, row: &str| AccessRecord {
        occurred_at: at,
        accessor: Accessor::new(user, "treatment"),
        op,
        owner_id: owner.clone(),
        table: "cases".into(),
        row: Some(row.into()),
        fields: vec!["patient_last".into()],
    };
    log.append(vec![
        record("dr-smith", AccessOp::Read, "42"),
        record("=cmd()", AccessOp::Read, "42"),
    ])
    .expect("append");
    log.flush().expect("flush");
    log.append(vec![
        record("dr-jones", AccessOp::Update, "42"),
        record("dr-smith", AccessOp::Read, "43"),
    ])
    .expect("append");
    log.flush().expect("flush");
    (chain, owner)
}

fn check<C: PhiConnection>(url: &str)
where
    DieselKeyStore<C>: phi::KeyStore,
    DieselAccessLogStore<C>: phi::access_log::AccessLogStore,
{
    let (chain, owner) = write_records::<C>(url);

    // Every access to one case, in CSV, formulas neutralised.
    let (code, out, err) = phi(
        url,
        &[
            "audit", "access", "--owner", &owner, "--table", "cases", "--row", "42", "--format",
            "csv",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[0].starts_with("occurred_at,user,purpose"), "{out}");
    assert!(out.contains(",'=cmd(),treatment,"), "{out}");
    assert!(out.contains(",dr-jones,treatment,,update,"), "{out}");

    // JSON, by actor.
    let (code, out, err) = phi(
        url,
        &[
            "audit", "access", "--owner", &owner, "--actor", "dr-smith", "--format", "json",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let rows = json.as_array().expect("array");
    assert_eq!(rows.len(), 2, "{out}");
    assert_eq!(rows[0]["row"], "42");
    assert_eq!(rows[1]["row"], "43");
    assert_eq!(rows[0]["fields"], serde_json::json!(["patient_last"]));

    // Text, with a time window that excludes everything.
    let (code, out, _) = phi(
        url,
        &[
            "audit",
            "access",
            "--owner",
            &owner,
            "--until",
            "2000-01-01",
        ],
    );
    assert_eq!(code, Some(0));
    assert!(out.contains("no access record matches"), "{out}");
    let (code, _, err) = phi(url, &["audit", "access", "--since", "last tuesday"]);
    assert_eq!(code, Some(2), "a usage error");
    assert!(err.contains("not a UTC time"), "{err}");
    let (code, _, err) = phi(url, &["keys", "status", "--format", "csv"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("only for `audit access`"), "{err}");

    // Verify: intact, then broken (exit 4, the batch named).
    let (code, out, err) = phi(url, &["audit", "verify", "--chain", &chain]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("intact, batches 1 to 2 (4 records)"), "{out}");
    {
        let mut conn = C::establish(url).expect("connects");
        conn.batch_execute(&format!(
            "UPDATE phi_access_log SET op = 'read' WHERE chain = '{chain}' AND batch = 2 AND seq = 0"
        ))
        .expect("tamper");
    }
    let (code, out, err) = phi(
        url,
        &["audit", "verify", "--chain", &chain, "--format", "json"],
    );
    assert_eq!(code, Some(4), "{out}{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(json["intact"], false);
    assert_eq!(json["chains"][0]["broken"]["batch"], 2);
    assert_eq!(json["chains"][0]["broken"]["kind"], "altered");
    assert_eq!(json["chains"][0]["last"], 1);

    // Prune before a date nothing is older than: nothing goes, exit 0.
    let (code, out, err) = phi(
        url,
        &[
            "audit",
            "prune",
            "--before",
            "1999-01-01",
            "--format",
            "json",
        ],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(json["access_records"], 0);
}

#[cfg(feature = "sqlite")]
#[test]
fn sqlite_audit_access_verify_prune() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = dir.path().join("log.db").display().to_string();
    check::<diesel::SqliteConnection>(&url);
}

#[cfg(feature = "mysql")]
#[test]
fn mysql_audit_access_verify_prune() {
    let url = std::env::var("PHI_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    check::<diesel::MysqlConnection>(&url);
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_audit_access_verify_prune() {
    let url = std::env::var("PHI_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    check::<diesel::PgConnection>(&url);
}
