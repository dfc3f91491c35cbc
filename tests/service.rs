//! The clinic service (`examples/clinic-service`), started as the real
//! binary on a free port and driven over HTTP, on every backend built in:
//! create and read back, the update conflict (409), a tampered row (one
//! byte changed with SQL: that case fails, the list still serves the
//! others), the plaintext twin, and, with `aws-kms`, the KMS outage (503)
//! against a private moto server killed mid-test. On SQLite: no plaintext
//! in the database files.
//!
//! MariaDB and PostgreSQL are the servers named by `PHI_TEST_MYSQL_URL` and
//! `PHI_TEST_POSTGRES_URL` (as in `tests/backends.rs`); their tests fail
//! when the server is down. Each test uses providers of its own in the
//! service's tables (`service_cases`, `service_cases_plain`).

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use reqwest::StatusCode;
use reqwest::blocking::Client;
use serde_json::{Value, json};

/// The sealed table, as much of it as tampering needs.
#[allow(missing_docs)]
mod tables {
    diesel::table! {
        service_cases (case_id) {
            case_id -> Text,
            patient_last -> Binary,
        }
    }
}
use tables::service_cases;

/// The service binary, built with this test's features when `cargo test`
/// did not build it already.
fn service_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target directory");
        let bin = profile_dir.join("examples").join("clinic-service");
        let mut features = vec!["service"];
        for (on, name) in [
            (cfg!(feature = "sqlite"), "sqlite"),
            (cfg!(feature = "mysql"), "mysql"),
            (cfg!(feature = "postgres"), "postgres"),
            (cfg!(feature = "aws-kms"), "aws-kms"),
        ] {
            if on {
                features.push(name);
            }
        }
        let status = Command::new(env!("CARGO"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args([
                "build",
                "--quiet",
                "--example",
                "clinic-service",
                "--no-default-features",
                "--features",
            ])
            .arg(features.join(","))
            .status()
            .expect("cargo runs");
        assert!(
            status.success(),
            "building the clinic-service example failed"
        );
        assert!(
            bin.exists(),
            "no clinic-service example at {}",
            bin.display()
        );
        bin
    })
}

/// A database for one test: a fresh SQLite file, or a shared server.
struct Db {
    url: String,
    dir: tempfile::TempDir,
}

impl Db {
    fn new(server: Option<String>) -> Db {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = match server {
            Some(url) => url,
            None => format!("sqlite://{}", dir.path().join("service.db").display()),
        };
        Db { url, dir }
    }

    /// Changes one byte of the sealed last name of `case_id`, in place,
    /// with SQL (the ciphertext, past the 18-byte header).
    fn tamper(&self, case_id: &str) {
        macro_rules! flip {
            ($conn:expr) => {{
                let conn = &mut $conn;
                let mut bytes: Vec<u8> = service_cases::table
                    .find(case_id)
                    .select(service_cases::patient_last)
                    .first(conn)
                    .expect("the case's row");
                assert!(bytes.len() > 20, "an envelope");
                bytes[20] ^= 0x01;
                let n = diesel::update(service_cases::table.find(case_id))
                    .set(service_cases::patient_last.eq(&bytes))
                    .execute(conn)
                    .expect("tampering");
                assert_eq!(n, 1);
            }};
        }
        if let Some(path) = self.url.strip_prefix("sqlite://") {
            #[cfg(feature = "sqlite")]
            {
                let mut conn = SqliteConnection::establish(path).expect("sqlite");
                conn.batch_execute("PRAGMA busy_timeout = 10000;")
                    .expect("busy timeout");
                flip!(conn);
                return;
            }
            #[allow(unreachable_code)]
            {
                panic!("{path}: built without sqlite");
            }
        }
        #[cfg(feature = "mysql")]
        if self.url.starts_with("mysql://") {
            flip!(MysqlConnection::establish(&self.url).expect("mysql"));
            return;
        }
        #[cfg(feature = "postgres")]
        if self.url.starts_with("postgres://") {
            flip!(PgConnection::establish(&self.url).expect("postgres"));
            return;
        }
        panic!("no tamper for {}", self.url);
    }
}

/// Server backends' migrations run once per test process, before any
/// service of this test starts concurrently with another.
fn first_start_lock() -> &'static Mutex<()> {
    static LOCK: Mutex<()> = Mutex::new(());
    &LOCK
}

/// A running service process.
struct Service {
    child: Child,
    base: String,
    http: Client,
    log: PathBuf,
}

impl Service {
    /// Starts the service on `db` with the tests' local master key.
    fn start(db: &Db) -> Service {
        Service::start_with(
            db,
            &[("PHI_MASTER_KEY", common::MASTER_KEY_B64)],
            &["--kek", "local:local-test"],
        )
    }

    fn start_with(db: &Db, env: &[(&str, &str)], args: &[&str]) -> Service {
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = db.dir.path().join(format!("service-{n}.log"));
        let mut command = Command::new(service_bin());
        command
            .args([
                "--database-url",
                &db.url,
                "--listen",
                "127.0.0.1:0",
                "--pool-size",
                "4",
            ])
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("PHI_KEK")
            .env_remove("PHI_MASTER_KEY")
            .env_remove("PHI_MASTER_KEY_FILE")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .current_dir(db.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"));
        let _first = first_start_lock().lock().unwrap_or_else(|e| e.into_inner());
        let mut child = command.spawn().expect("the service starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading the service's address");
        let Some(base) = line.trim().strip_prefix("listening on ") else {
            let _ = child.wait();
            panic!(
                "the service did not start: {line:?}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Service {
            base: base.to_owned(),
            child,
            http: Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
            log,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let r = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .expect("POST");
        (r.status(), r.json().unwrap_or(Value::Null))
    }

    fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self.http.get(self.url(path)).send().expect("GET");
        (r.status(), r.json().unwrap_or(Value::Null))
    }

    fn patch(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let r = self
            .http
            .patch(self.url(path))
            .json(body)
            .send()
            .expect("PATCH");
        (r.status(), r.json().unwrap_or(Value::Null))
    }

    /// Stops the service with SIGTERM; it must shut down gracefully (exit 0).
    /// Returns its log.
    fn stop(mut self) -> String {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        let exit = self.child.wait().expect("the service exits");
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(
            exit.success(),
            "the service did not stop cleanly: {exit}\n{log}"
        );
        log
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn new_case(provider: &str, first: &str, last: &str, dob: &str) -> Value {
    json!({
        "provider_id": provider,
        "patient_first": first,
        "patient_last": last,
        "patient_dob": dob,
        "ins_provider": "Aetna",
        "procedure_code": "27447",
        "surgery_date": "2026-12-02",
    })
}

/// A response body or log that must not hold any of `values`.
fn assert_no_phi(text: &str, values: &[&str]) {
    for v in values {
        assert!(!text.contains(v), "{v:?} appears in: {text}");
    }
}

/// Create, read back, list, duplicates, update, the update conflict, bad
/// input, 404 and delete, on phi's routes (`prefix` "") or the twin's
/// ("/plain"); the request log holds no patient value.
fn round_trip(db: &Db, prefix: &str) {
    let provider = common::unique_owner("svc-rt");
    let service = Service::start(db);
    let (status, created) = service.post(
        &format!("{prefix}/cases"),
        &new_case(&provider, "Marguerite", "Oyelaran-Quist", "1961-04-09"),
    );
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["case_id"].as_str().expect("case id").to_owned();
    assert_eq!(created["revision"], 1);

    let (status, got) = service.get(&format!("{prefix}/cases/{id}"));
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["patient_first"], "Marguerite");
    assert_eq!(got["patient_last"], "Oyelaran-Quist");
    assert_eq!(got["patient_dob"], "1961-04-09");
    assert_eq!(got["ins_provider"], "Aetna");
    assert_eq!(got["provider_id"], provider.as_str());

    let (status, second) = service.post(
        &format!("{prefix}/cases"),
        &new_case(&provider, "Tobias", "Lindgren", "1977-10-30"),
    );
    assert_eq!(status, StatusCode::CREATED, "{second}");
    let (status, page) = service.get(&format!("{prefix}/providers/{provider}/cases?limit=1"));
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["cases"].as_array().expect("cases").len(), 1);
    let after = page["next"].as_str().expect("a next page");
    let (status, rest) = service.get(&format!(
        "{prefix}/providers/{provider}/cases?after={after}"
    ));
    assert_eq!(status, StatusCode::OK, "{rest}");
    assert_eq!(rest["cases"].as_array().expect("cases").len(), 1);
    assert!(rest["next"].is_null());

    // The duplicate check: case and spaces in the last name do not matter.
    let (status, dup) = service.post(
        &format!("{prefix}/providers/{provider}/duplicates"),
        &json!({"patient_last": "  oyelaran-QUIST ", "patient_dob": "1961-04-09"}),
    );
    assert_eq!(status, StatusCode::OK, "{dup}");
    assert_eq!(dup["case_ids"], json!([id]));
    let (_, none) = service.post(
        &format!("{prefix}/providers/{provider}/duplicates"),
        &json!({"patient_last": "Oyelaran-Quist", "patient_dob": "1961-04-10"}),
    );
    assert_eq!(none["case_ids"], json!([]));

    // Update at revision 1, then a stale update at revision 1: 409.
    let (status, updated) = service.patch(
        &format!("{prefix}/cases/{id}"),
        &json!({"revision": 1, "patient_first": "Margot", "ins_provider": null}),
    );
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["revision"], 2);
    let (_, got) = service.get(&format!("{prefix}/cases/{id}"));
    assert_eq!(got["patient_first"], "Margot");
    assert!(got["ins_provider"].is_null());
    assert_eq!(got["patient_last"], "Oyelaran-Quist");
    let (status, conflict) = service.patch(
        &format!("{prefix}/cases/{id}"),
        &json!({"revision": 1, "patient_first": "Marge"}),
    );
    assert_eq!(status, StatusCode::CONFLICT, "{conflict}");
    assert_eq!(conflict["error"], "conflict");
    assert_no_phi(&conflict.to_string(), &["Marge", "Margot", "Oyelaran"]);
    let (_, got) = service.get(&format!("{prefix}/cases/{id}"));
    assert_eq!(
        got["patient_first"], "Margot",
        "the stale update wrote nothing"
    );

    // Bad input: 422 naming the field, never the value.
    let mut bad = new_case(&provider, "Ilse", "Brandvold", "1961-13-45");
    let (status, error) = service.post(&format!("{prefix}/cases"), &bad);
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .contains("patient_dob")
    );
    assert_no_phi(&error.to_string(), &["1961-13-45", "Brandvold"]);
    bad["patient_dob"] = json!(19610409);
    let (status, error) = service.post(&format!("{prefix}/cases"), &bad);
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert_no_phi(&error.to_string(), &["19610409", "Brandvold"]);

    // 404, delete, 404 again.
    let (status, missing) = service.get(&format!("{prefix}/cases/C-0000000000000000"));
    assert_eq!(status, StatusCode::NOT_FOUND, "{missing}");
    let r = service
        .http
        .delete(service.url(&format!("{prefix}/cases/{id}")))
        .send()
        .expect("DELETE");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (status, _) = service.get(&format!("{prefix}/cases/{id}"));
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The CSV export streams the provider's remaining case.
    let csv = service
        .http
        .get(service.url(&format!("{prefix}/providers/{provider}/export.csv")))
        .send()
        .expect("export");
    assert_eq!(csv.status(), StatusCode::OK);
    let csv = csv.text().expect("CSV");
    assert!(csv.starts_with("case_id,provider_id,"), "{csv}");
    assert!(csv.contains("Tobias,Lindgren,1977-10-30"), "{csv}");
    assert_eq!(csv.lines().count(), 2, "{csv}");

    // Metrics are exposed, phi's among them on the sealed routes.
    let metrics = service
        .http
        .get(service.url("/metrics"))
        .send()
        .expect("metrics")
        .text()
        .expect("text");
    assert!(
        metrics.contains("clinic_service_requests_total"),
        "{metrics}"
    );

    let log = service.stop();
    assert!(log.contains("served"), "{log}");
    assert!(log.contains(&id), "the log names case ids: {log}");
    assert_no_phi(
        &log,
        &[
            "Marguerite",
            "Margot",
            "Oyelaran",
            "Tobias",
            "Lindgren",
            "1961-04-09",
            "Brandvold",
        ],
    );
}

/// One byte changed in one sealed case: reading that case is an error
/// naming the column and provider (not the value), and the provider's list
/// still serves the other cases with one error for the damaged one.
fn tamper(db: &Db) {
    let provider = common::unique_owner("svc-tamper");
    let service = Service::start(db);
    let mut ids = Vec::new();
    for (first, last) in [
        ("Anneliese", "Fairweather"),
        ("Bartholomew", "Quennell"),
        ("Cosima", "Ravensworth"),
    ] {
        let (status, created) =
            service.post("/cases", &new_case(&provider, first, last, "1950-01-01"));
        assert_eq!(status, StatusCode::CREATED, "{created}");
        ids.push(created["case_id"].as_str().expect("id").to_owned());
    }
    db.tamper(&ids[1]);

    let (status, error) = service.get(&format!("/cases/{}", ids[1]));
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{error}");
    assert_eq!(error["error"], "stored_value_damaged");
    let message = error["message"].as_str().expect("message");
    assert!(message.contains("service_cases.patient_last"), "{message}");
    assert!(message.contains(&provider), "{message}");
    assert_no_phi(message, &["Quennell", "Bartholomew"]);

    for ok in [&ids[0], &ids[2]] {
        let (status, got) = service.get(&format!("/cases/{ok}"));
        assert_eq!(status, StatusCode::OK, "{got}");
    }
    let (status, page) = service.get(&format!("/providers/{provider}/cases"));
    assert_eq!(status, StatusCode::OK, "{page}");
    let served: Vec<&str> = page["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| c["case_id"].as_str().expect("id"))
        .collect();
    let mut expected = vec![ids[0].as_str(), ids[2].as_str()];
    expected.sort_unstable();
    assert_eq!(served, expected);
    let errors = page["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 1, "{page}");
    assert_eq!(errors[0]["case_id"], ids[1].as_str());
    assert_no_phi(&page["errors"].to_string(), &["Quennell", "Bartholomew"]);
    service.stop();
}

/// A private moto server on a free port, killed to simulate the outage
/// (the shared one on 4566 is never disturbed).
#[cfg(feature = "aws-kms")]
struct Moto {
    child: Child,
    url: String,
}

#[cfg(feature = "aws-kms")]
impl Moto {
    fn start() -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("a free port")
            .local_addr()
            .expect("address")
            .port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m moto.server (pip install \"moto[server]\")");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start on {url}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { child, url }
    }

    /// A new symmetric key's id.
    fn create_key(&self) -> String {
        use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
        let config = aws_sdk_kms::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(&self.url)
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .build();
        let client = aws_sdk_kms::Client::from_conf(config);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime
            .block_on(client.create_key().send())
            .expect("CreateKey")
            .key_metadata()
            .expect("metadata")
            .key_id()
            .to_owned()
    }

    fn kill(&mut self) {
        self.child.kill().expect("killing moto");
        self.child.wait().expect("moto exits");
    }
}

#[cfg(feature = "aws-kms")]
impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The KMS goes down: a case whose provider's key is not cached is 503
/// (`key_unavailable`, no patient value), a new provider's case is 503 and
/// nothing is stored, and cases whose keys are cached are still served.
#[cfg(feature = "aws-kms")]
fn kms_outage(db: &Db) {
    let mut moto = Moto::start();
    let key = moto.create_key();
    let kek = format!("aws-kms:{key}");
    let env = [
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_ENDPOINT_URL", moto.url.as_str()),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_MAX_ATTEMPTS", "2"),
    ];
    let cold = common::unique_owner("svc-kms-cold");
    let warm = common::unique_owner("svc-kms-warm");
    let first = Service::start_with(db, &env, &["--kek", &kek]);
    let (status, created) = first.post(
        "/cases",
        &new_case(&cold, "Henrietta", "Vasquez-Ilori", "1944-02-29"),
    );
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let cold_id = created["case_id"].as_str().expect("id").to_owned();
    first.stop();

    // A fresh process: nothing cached.
    let second = Service::start_with(db, &env, &["--kek", &kek]);
    let (status, created) = second.post(
        "/cases",
        &new_case(&warm, "Ignatius", "Worthington", "1939-06-06"),
    );
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let warm_id = created["case_id"].as_str().expect("id").to_owned();

    moto.kill();

    let (status, error) = second.get(&format!("/cases/{cold_id}"));
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
    assert_eq!(error["error"], "key_unavailable");
    assert!(
        error["message"].as_str().expect("message").contains(&cold),
        "{error}"
    );
    assert_no_phi(&error.to_string(), &["Henrietta", "Vasquez"]);

    let newcomer = common::unique_owner("svc-kms-new");
    let (status, error) = second.post(
        "/cases",
        &new_case(&newcomer, "Josephine", "Abernathy", "1990-09-09"),
    );
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
    assert_no_phi(&error.to_string(), &["Josephine", "Abernathy"]);
    let (_, page) = second.get(&format!("/providers/{newcomer}/cases"));
    assert_eq!(
        page["cases"],
        json!([]),
        "nothing stored for the new provider"
    );

    let (status, got) = second.get(&format!("/cases/{warm_id}"));
    assert_eq!(status, StatusCode::OK, "a cached key still serves: {got}");
    assert_eq!(got["patient_first"], "Ignatius");
    let log = second.stop();
    assert_no_phi(&log, &["Henrietta", "Vasquez", "Ignatius", "Josephine"]);
}

macro_rules! service_suite {
    ($name:ident, $feature:literal, $url:expr) => {
        #[cfg(feature = $feature)]
        mod $name {
            use super::*;

            fn db() -> Db {
                Db::new($url)
            }

            #[test]
            fn sealed_round_trip_and_update_conflict() {
                round_trip(&db(), "");
            }

            #[test]
            fn plaintext_twin_round_trip_and_update_conflict() {
                round_trip(&db(), "/plain");
            }

            #[test]
            fn tampered_case_fails_alone() {
                tamper(&db());
            }

            #[test]
            fn admin_routes_behind_a_bearer_token() {
                admin_routes(&db());
            }

            #[test]
            fn a_shredded_providers_case_is_410_gone() {
                shredded_case_is_gone(&db());
            }

            #[cfg(feature = "aws-kms")]
            #[test]
            fn kms_outage_is_503() {
                kms_outage(&db());
            }
        }
    };
}

service_suite!(sqlite, "sqlite", None);
service_suite!(
    mysql,
    "mysql",
    Some(
        std::env::var("PHI_TEST_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
    )
);
service_suite!(
    postgres,
    "postgres",
    Some(
        std::env::var("PHI_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    )
);

/// On SQLite, the database files (WAL included) hold no patient value in
/// the clear after cases are created, read, updated and listed.
#[cfg(feature = "sqlite")]
#[test]
fn sqlite_file_holds_no_plaintext() {
    let db = Db::new(None);
    let service = Service::start(&db);
    let provider = common::unique_owner("svc-file");
    let (status, created) = service.post(
        "/cases",
        &new_case(&provider, "Wilhelmina", "Throckmorton", "1933-07-17"),
    );
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["case_id"].as_str().expect("id").to_owned();
    let (status, _) = service.patch(
        &format!("/cases/{id}"),
        &json!({"revision": 1, "ins_provider": "Kaiserhof Mutual"}),
    );
    assert_eq!(status, StatusCode::OK);
    let (_, got) = service.get(&format!("/cases/{id}"));
    assert_eq!(got["patient_last"], "Throckmorton");
    service.stop();
    let mut scanned = 0;
    let mut procedure_seen = false;
    for entry in std::fs::read_dir(db.dir.path()).expect("directory") {
        let path = entry.expect("entry").path();
        if !path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("service.db"))
        {
            continue;
        }
        let bytes = std::fs::read(&path).expect("database file");
        scanned += 1;
        for value in [
            "Wilhelmina",
            "Throckmorton",
            "1933-07-17",
            "Kaiserhof",
            "Aetna",
        ] {
            assert!(
                !bytes.windows(value.len()).any(|w| w == value.as_bytes()),
                "{value:?} in clear in {}",
                path.display()
            );
        }
        procedure_seen |= bytes.windows(5).any(|w| w == b"27447");
    }
    assert!(scanned >= 1);
    // The scan reads the rows: the non-PHI columns are there in the clear.
    assert!(procedure_seen, "the case's procedure code is in the files");
}

/// `POST /admin/shred` of a provider: `GET /cases/{id}` of its case then
/// answers 410 Gone, `shredded` (erasure, not a damaged value), from the
/// process that shredded (its cache dropped by the shred) and from a fresh
/// one (a cold cache); another provider's case still opens.
fn shredded_case_is_gone(db: &Db) {
    const TOKEN: &str = "shredded-case-test-token";
    let env = [
        ("PHI_MASTER_KEY", common::MASTER_KEY_B64),
        ("PHI_ADMIN_TOKEN", TOKEN),
    ];
    let args = ["--kek", "local:local-test"];
    let provider = common::unique_owner("svc-shred");
    let other = common::unique_owner("svc-kept");
    let service = Service::start_with(db, &env, &args);
    let create = |provider: &str| {
        let (status, created) = service.post(
            "/cases",
            &new_case(provider, "Winifred", "Ashcombe", "1944-05-06"),
        );
        assert_eq!(status, StatusCode::CREATED, "{created}");
        format!("/cases/{}", created["case_id"].as_str().expect("case id"))
    };
    let (case, kept) = (create(&provider), create(&other));
    assert_eq!(
        service.get(&case).0,
        StatusCode::OK,
        "opens before the shred"
    );
    let response = service
        .http
        .post(service.url("/admin/shred"))
        .bearer_auth(TOKEN)
        .json(&json!({ "owner": provider, "confirm": provider }))
        .send()
        .expect("shred");
    assert_eq!(response.status(), StatusCode::OK);
    let gone = |service: &Service, situation: &str| {
        let (status, body) = service.get(&case);
        assert_eq!(status, StatusCode::GONE, "{situation}: {body}");
        assert_eq!(body["error"], "shredded", "{situation}: {body}");
        let (status, body) = service.get(&kept);
        assert_eq!(status, StatusCode::OK, "{situation}: {body}");
    };
    gone(&service, "the shredding process");
    let log = service.stop();
    assert_no_phi(&log, &["Winifred", "Ashcombe"]);
    let fresh = Service::start_with(db, &env, &args);
    gone(&fresh, "a fresh process");
    fresh.stop();
}

/// phi's admin routes mounted in the service under `/admin` behind a bearer
/// token: a request with no token or a wrong one gets 401, changes nothing
/// and is audited as `denied`; with the token, key status, clear-cache and
/// the roll-out work. Without `PHI_ADMIN_TOKEN` nothing is mounted.
fn admin_routes(db: &Db) {
    const TOKEN: &str = "admin-routes-test-token";
    let provider = common::unique_owner("svc-admin");
    let service = Service::start_with(
        db,
        &[
            ("PHI_MASTER_KEY", common::MASTER_KEY_B64),
            ("PHI_ADMIN_TOKEN", TOKEN),
        ],
        &["--kek", "local:local-test"],
    );
    let (status, created) = service.post(
        "/cases",
        &new_case(&provider, "Ottoline", "Fairweather", "1951-02-03"),
    );
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let admin = |method: reqwest::Method, path: &str, token: Option<&str>, body: Option<Value>| {
        let mut request = service
            .http
            .request(method, service.url(&format!("/admin{path}")));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().expect("admin request");
        (
            response.status(),
            response.json::<Value>().unwrap_or(Value::Null),
        )
    };
    let status_of = |token| {
        admin(
            reqwest::Method::GET,
            &format!("/key-status?owner={provider}"),
            token,
            None,
        )
    };

    // Refused: no token, a wrong one; nothing changes, each is audited.
    let (status, body) = admin(
        reqwest::Method::POST,
        "/shred",
        None,
        Some(serde_json::json!({"owner": provider, "confirm": provider})),
    );
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = admin(
        reqwest::Method::POST,
        "/rotate",
        Some("guess"),
        Some(serde_json::json!({"owner": provider})),
    );
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(status_of(None).0, StatusCode::UNAUTHORIZED);
    let (status, got) = service.get(&format!(
        "/cases/{}",
        created["case_id"].as_str().expect("case id")
    ));
    assert_eq!(status, StatusCode::OK, "the case still opens: {got}");
    let (status, body) = status_of(Some(TOKEN));
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["owner"]["current_version"], 1, "not rotated: {body}");
    assert_eq!(body["owner"]["shredded"], false, "not shredded: {body}");
    let (status, audit) = admin(
        reqwest::Method::GET,
        "/audit-log?action=denied&limit=100",
        Some(TOKEN),
        None,
    );
    assert_eq!(status, StatusCode::OK, "{audit}");
    let denied: Vec<&str> = audit["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|r| r["detail"].as_str())
        .collect();
    assert!(
        denied
            .iter()
            .any(|d| d.starts_with("POST /shred refused (401)")),
        "{audit}"
    );
    assert!(
        denied
            .iter()
            .any(|d| d.starts_with("POST /rotate refused (401)")),
        "{audit}"
    );

    // Admitted: key status shows the feed, clear-cache and roll-out work.
    assert!(body["feed"]["head"].as_i64().is_some(), "{body}");
    assert!(body["feed"]["readers"].is_array(), "{body}");
    let (status, cleared) = admin(
        reqwest::Method::POST,
        "/clear-cache",
        Some(TOKEN),
        Some(serde_json::json!({"owner": provider})),
    );
    assert_eq!(status, StatusCode::OK, "{cleared}");
    assert!(cleared["event_id"].as_i64().is_some(), "{cleared}");
    let (status, rolled) = admin(
        reqwest::Method::POST,
        "/rollout",
        Some(TOKEN),
        Some(serde_json::json!({"mode": "all"})),
    );
    assert_eq!(status, StatusCode::OK, "{rolled}");
    assert_eq!(rolled["rollout"], "all", "{rolled}");
    let (status, got) = service.get(&format!(
        "/cases/{}",
        created["case_id"].as_str().expect("case id")
    ));
    assert_eq!(
        status,
        StatusCode::OK,
        "the case opens after the clear: {got}"
    );
    assert_eq!(got["patient_first"], "Ottoline");
    let log = service.stop();
    assert!(
        log.contains("admin routes are mounted under /admin"),
        "{log}"
    );
    assert!(!log.contains(TOKEN), "the token is never logged");

    // Without the token: not mounted, and the log says so.
    let plain = Service::start(db);
    let (status, _) = plain.get("/admin/key-status");
    assert_eq!(status, StatusCode::NOT_FOUND);
    let log = plain.stop();
    assert!(log.contains("PHI_ADMIN_TOKEN is not set"), "{log}");
}
