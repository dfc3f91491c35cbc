//! The clinic service (`examples/clinic-service`), started as the real
//! binary on a free port and driven over HTTP, on every backend built in:
//! create and read back, the update conflict (409), a tampered row (one
//! byte changed with SQL: that case fails, the list still serves the
//! others), the plaintext twin, and, with `aws-kms`, the KMS outage (503)
//! against a private moto server killed mid-test. On SQLite: no plaintext
//! in the database files.
//!
//! The OpenAPI document at `/openapi.json` against real answers: every
//! documented route exercised, each answer's status, content type and
//! body checked against it (a JSON-schema validator).
//!
//! Operations: `/live` and `/ready` (503 while the key-event feed is staler
//! than its maximum, the KMS or PostgreSQL unreachable behind a proxy the
//! test cuts, 200 again after), a shred on one instance reaching another
//! within its feed interval, and every metric that `ops/prometheus`'s
//! alerts and `ops/grafana`'s dashboard read exported on `/metrics`.
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
use std::time::Duration;

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
    BIN.get_or_init(|| common::example_bin_with("clinic-service", &["service"]))
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
            .env_remove("CLINIC_JWT_PUBLIC_KEY_FILE")
            .env_remove("CLINIC_JWT_ALGORITHM")
            .env_remove("CLINIC_JWT_ISSUER")
            .env_remove("CLINIC_JWT_AUDIENCE")
            .env_remove("CLINIC_JWT_SECRET")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .current_dir(db.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"));
        // The tests' HS256 secret, unless the test configures verification.
        if !env.iter().any(|(name, _)| name.starts_with("CLINIC_JWT_")) {
            command.env("CLINIC_JWT_SECRET", JWT_SECRET);
        }
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

    /// A client of the service signed in as `user` of `provider` (a token
    /// valid for an hour).
    fn as_user(&self, user: &str, provider: &str) -> Session<'_> {
        self.with_token(&token(user, provider, 3600))
    }

    /// A client of the service sending `token` as its bearer token.
    fn with_token(&self, token: &str) -> Session<'_> {
        Session {
            service: self,
            token: Some(token.to_owned()),
        }
    }

    /// A client sending no token.
    fn anonymous(&self) -> Session<'_> {
        Session {
            service: self,
            token: None,
        }
    }

    /// The keyring's counters from `/metrics` (`clinic_service_keyring_*`):
    /// cache hits and misses, key loads, unwraps, creations. Equal before
    /// and after a request when it touched no key.
    fn key_counters(&self) -> Vec<(String, u64)> {
        let text = self
            .http
            .get(self.url("/metrics"))
            .send()
            .expect("metrics")
            .text()
            .expect("text");
        let mut counters: Vec<(String, u64)> = text
            .lines()
            .filter(|l| l.starts_with("clinic_service_keyring_"))
            .map(|l| {
                let (name, value) = l.split_once(' ').expect("name value");
                (name.to_owned(), value.parse().expect("a count"))
            })
            .collect();
        assert_eq!(counters.len(), 5, "{text}");
        counters.sort();
        counters
    }

    /// The `/metrics` text.
    fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .expect("metrics")
            .text()
            .expect("text")
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

/// The HS256 secret the tests' services verify tokens with.
const JWT_SECRET: &str = "clinic-service-tests-jwt-secret-0123456789";

/// A token for `user` of `provider`, signed with [`JWT_SECRET`], expiring
/// `ttl` seconds from now (negative: already expired).
fn token(user: &str, provider: &str, ttl: i64) -> String {
    signed(
        &json!({
            "sub": user,
            "provider": provider,
            "exp": now().saturating_add_signed(ttl),
        }),
        JWT_SECRET,
    )
}

/// `claims` as an HS256 JWT signed with `secret`.
fn signed(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("signing a token")
}

/// Seconds since the epoch.
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs()
}

/// Requests to a service with one bearer token (or none).
struct Session<'a> {
    service: &'a Service,
    token: Option<String>,
}

impl Session<'_> {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        let request = self.service.http.request(method, self.service.url(path));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> reqwest::blocking::Response {
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request.json(body);
        }
        request.send().expect("request")
    }

    fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let r = self.send(reqwest::Method::POST, path, Some(body));
        (r.status(), r.json().unwrap_or(Value::Null))
    }

    fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self.send(reqwest::Method::GET, path, None);
        (r.status(), r.json().unwrap_or(Value::Null))
    }

    fn patch(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let r = self.send(reqwest::Method::PATCH, path, Some(body));
        (r.status(), r.json().unwrap_or(Value::Null))
    }

    fn delete(&self, path: &str) -> StatusCode {
        self.send(reqwest::Method::DELETE, path, None).status()
    }

    /// A text response (the CSV export).
    fn text(&self, path: &str) -> (StatusCode, String) {
        let r = self.send(reqwest::Method::GET, path, None);
        (r.status(), r.text().expect("text"))
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
    let user = service.as_user("dr-rt", &provider);
    let (status, created) = user.post(
        &format!("{prefix}/cases"),
        &new_case(&provider, "Marguerite", "Oyelaran-Quist", "1961-04-09"),
    );
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["case_id"].as_str().expect("case id").to_owned();
    assert_eq!(created["revision"], 1);

    let (status, got) = user.get(&format!("{prefix}/cases/{id}"));
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["patient_first"], "Marguerite");
    assert_eq!(got["patient_last"], "Oyelaran-Quist");
    assert_eq!(got["patient_dob"], "1961-04-09");
    assert_eq!(got["ins_provider"], "Aetna");
    assert_eq!(got["provider_id"], provider.as_str());

    let (status, second) = user.post(
        &format!("{prefix}/cases"),
        &new_case(&provider, "Tobias", "Lindgren", "1977-10-30"),
    );
    assert_eq!(status, StatusCode::CREATED, "{second}");
    let (status, page) = user.get(&format!("{prefix}/providers/{provider}/cases?limit=1"));
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["cases"].as_array().expect("cases").len(), 1);
    let after = page["next"].as_str().expect("a next page");
    let (status, rest) = user.get(&format!(
        "{prefix}/providers/{provider}/cases?after={after}"
    ));
    assert_eq!(status, StatusCode::OK, "{rest}");
    assert_eq!(rest["cases"].as_array().expect("cases").len(), 1);
    assert!(rest["next"].is_null());

    // The duplicate check: case and spaces in the last name do not matter.
    let (status, dup) = user.post(
        &format!("{prefix}/providers/{provider}/duplicates"),
        &json!({"patient_last": "  oyelaran-QUIST ", "patient_dob": "1961-04-09"}),
    );
    assert_eq!(status, StatusCode::OK, "{dup}");
    assert_eq!(dup["case_ids"], json!([id]));
    let (_, none) = user.post(
        &format!("{prefix}/providers/{provider}/duplicates"),
        &json!({"patient_last": "Oyelaran-Quist", "patient_dob": "1961-04-10"}),
    );
    assert_eq!(none["case_ids"], json!([]));

    // Update at revision 1, then a stale update at revision 1: 409.
    let (status, updated) = user.patch(
        &format!("{prefix}/cases/{id}"),
        &json!({"revision": 1, "patient_first": "Margot", "ins_provider": null}),
    );
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["revision"], 2);
    let (_, got) = user.get(&format!("{prefix}/cases/{id}"));
    assert_eq!(got["patient_first"], "Margot");
    assert!(got["ins_provider"].is_null());
    assert_eq!(got["patient_last"], "Oyelaran-Quist");
    let (status, conflict) = user.patch(
        &format!("{prefix}/cases/{id}"),
        &json!({"revision": 1, "patient_first": "Marge"}),
    );
    assert_eq!(status, StatusCode::CONFLICT, "{conflict}");
    assert_eq!(conflict["error"], "conflict");
    assert_no_phi(&conflict.to_string(), &["Marge", "Margot", "Oyelaran"]);
    let (_, got) = user.get(&format!("{prefix}/cases/{id}"));
    assert_eq!(
        got["patient_first"], "Margot",
        "the stale update wrote nothing"
    );

    // Bad input: 422 naming the field, never the value.
    let mut bad = new_case(&provider, "Ilse", "Brandvold", "1961-13-45");
    let (status, error) = user.post(&format!("{prefix}/cases"), &bad);
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .contains("patient_dob")
    );
    assert_no_phi(&error.to_string(), &["1961-13-45", "Brandvold"]);
    bad["patient_dob"] = json!(19610409);
    let (status, error) = user.post(&format!("{prefix}/cases"), &bad);
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert_no_phi(&error.to_string(), &["19610409", "Brandvold"]);

    // 404, delete, 404 again.
    let (status, missing) = user.get(&format!("{prefix}/cases/C-0000000000000000"));
    assert_eq!(status, StatusCode::NOT_FOUND, "{missing}");
    assert_eq!(
        user.delete(&format!("{prefix}/cases/{id}")),
        StatusCode::NO_CONTENT
    );
    let (status, _) = user.get(&format!("{prefix}/cases/{id}"));
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The CSV export streams the provider's remaining case.
    let (status, csv) = user.text(&format!("{prefix}/providers/{provider}/export.csv"));
    assert_eq!(status, StatusCode::OK, "{csv}");
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
    let user = service.as_user("dr-tamper", &provider);
    let mut ids = Vec::new();
    for (first, last) in [
        ("Anneliese", "Fairweather"),
        ("Bartholomew", "Quennell"),
        ("Cosima", "Ravensworth"),
    ] {
        let (status, created) =
            user.post("/cases", &new_case(&provider, first, last, "1950-01-01"));
        assert_eq!(status, StatusCode::CREATED, "{created}");
        ids.push(created["case_id"].as_str().expect("id").to_owned());
    }
    db.tamper(&ids[1]);

    let (status, error) = user.get(&format!("/cases/{}", ids[1]));
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{error}");
    assert_eq!(error["error"], "stored_value_damaged");
    let message = error["message"].as_str().expect("message");
    assert!(message.contains("service_cases.patient_last"), "{message}");
    assert!(message.contains(&provider), "{message}");
    assert_no_phi(message, &["Quennell", "Bartholomew"]);

    for ok in [&ids[0], &ids[2]] {
        let (status, got) = user.get(&format!("/cases/{ok}"));
        assert_eq!(status, StatusCode::OK, "{got}");
    }
    let (status, page) = user.get(&format!("/providers/{provider}/cases"));
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
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "moto did not start on {url}"
            );
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
    // Without the access log: its chain key (owner `phi:access-log`) may
    // already be wrapped by the other tests' local KEK in this database,
    // which this service is not given; this test is about the KMS.
    let first = Service::start_with(db, &env, &["--kek", &kek, "--no-access-log"]);
    let (status, created) = first.as_user("dr-cold", &cold).post(
        "/cases",
        &new_case(&cold, "Henrietta", "Vasquez-Ilori", "1944-02-29"),
    );
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let cold_id = created["case_id"].as_str().expect("id").to_owned();
    first.stop();

    // A fresh process: nothing cached.
    let second = Service::start_with(db, &env, &["--kek", &kek, "--no-access-log"]);
    let (status, created) = second.as_user("dr-warm", &warm).post(
        "/cases",
        &new_case(&warm, "Ignatius", "Worthington", "1939-06-06"),
    );
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let warm_id = created["case_id"].as_str().expect("id").to_owned();

    moto.kill();

    let (status, error) = second
        .as_user("dr-cold", &cold)
        .get(&format!("/cases/{cold_id}"));
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
    assert_eq!(error["error"], "key_unavailable");
    assert!(
        error["message"].as_str().expect("message").contains(&cold),
        "{error}"
    );
    assert_no_phi(&error.to_string(), &["Henrietta", "Vasquez"]);

    let newcomer = common::unique_owner("svc-kms-new");
    let (status, error) = second.as_user("dr-new", &newcomer).post(
        "/cases",
        &new_case(&newcomer, "Josephine", "Abernathy", "1990-09-09"),
    );
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
    assert_no_phi(&error.to_string(), &["Josephine", "Abernathy"]);
    let (_, page) = second
        .as_user("dr-new", &newcomer)
        .get(&format!("/providers/{newcomer}/cases"));
    assert_eq!(
        page["cases"],
        json!([]),
        "nothing stored for the new provider"
    );

    let (status, got) = second
        .as_user("dr-warm", &warm)
        .get(&format!("/cases/{warm_id}"));
    assert_eq!(status, StatusCode::OK, "a cached key still serves: {got}");
    assert_eq!(got["patient_first"], "Ignatius");
    let log = second.stop();
    assert_no_phi(&log, &["Henrietta", "Vasquez", "Ignatius", "Josephine"]);
}

/// A TCP forwarder the test can cut: it accepts on a port of its own and
/// forwards each connection to `target`; cut, it closes every open
/// connection and closes new ones at once (a server gone, as the client
/// sees it), until restored.
struct Proxy {
    port: u16,
    state: std::sync::Arc<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    cut: std::sync::atomic::AtomicBool,
    stopped: std::sync::atomic::AtomicBool,
    open: Mutex<Vec<std::net::TcpStream>>,
}

impl Proxy {
    fn start(target: std::net::SocketAddr) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener.local_addr().expect("address").port();
        let state = std::sync::Arc::new(ProxyState::default());
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if shared.stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                if shared.cut.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let mut open = shared.open.lock().unwrap_or_else(|e| e.into_inner());
                for stream in [&client, &server] {
                    open.push(stream.try_clone().expect("a stream's clone"));
                }
                drop(open);
                for (mut from, mut to) in [
                    (
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                    ),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, state }
    }

    /// Closes every connection; new ones are closed at once.
    fn cut(&self) {
        self.state
            .cut
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for stream in self
            .state
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Forwards new connections again.
    fn restore(&self) {
        self.state
            .cut
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state
            .stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.cut();
        // Wakes the accepting thread, which then ends.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// `url` with `PORT` in place of its port and `127.0.0.1` of its host (for
/// a proxy's port), and the address it named.
fn through_proxy(url: &str) -> (String, std::net::SocketAddr) {
    use std::net::ToSocketAddrs as _;
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (credentials, rest) = rest.rsplit_once('@').map_or(("", rest), |(c, r)| (c, r));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let target = authority
        .to_socket_addrs()
        .expect("the server's address")
        .next()
        .expect("an address");
    let at = if credentials.is_empty() { "" } else { "@" };
    (
        format!("{scheme}://{credentials}{at}127.0.0.1:PORT/{path}"),
        target,
    )
}

impl Service {
    /// `GET /ready`: its status and JSON body.
    fn ready(&self) -> (StatusCode, Value) {
        let response = self.http.get(self.url("/ready")).send().expect("/ready");
        (response.status(), response.json().unwrap_or(Value::Null))
    }

    /// Polls `/ready` until it answers `want` (at most `within`); returns
    /// the body of that answer.
    fn ready_becomes(&self, want: StatusCode, within: Duration) -> Value {
        let deadline = std::time::Instant::now() + within;
        loop {
            let (status, body) = self.ready();
            if status == want {
                return body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "/ready did not answer {want} within {within:?}; last: {status} {body}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `/live` and `/ready` answer without a token; the readiness body names
/// the checks and no owner.
fn live_and_ready(db: &Db) {
    let provider = common::unique_owner("svc-ready");
    let service = Service::start(db);
    let (status, created) = service.as_user("dr-ready", &provider).post(
        "/cases",
        &new_case(&provider, "Perpetua", "Lindqvist", "1961-03-04"),
    );
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let response = service
        .http
        .get(service.url("/live"))
        .send()
        .expect("/live");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.json::<Value>().expect("json"),
        json!({"live": true})
    );
    let (status, body) = service.ready();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ready"], true, "{body}");
    assert_eq!(body["key_store"]["ok"], true, "{body}");
    assert_eq!(body["kek"]["kek_id"], "local-test", "{body}");
    assert_eq!(body["kek"]["reachable"]["ok"], true, "{body}");
    assert_eq!(
        body["feed"]["ok"], true,
        "the service follows the feed: {body}"
    );
    assert_eq!(body["feed"]["max_staleness_seconds"], 60.0, "{body}");
    assert!(body["audit_queue"]["capacity"].as_u64() > Some(0), "{body}");
    assert!(
        body["access_log_queue"]["capacity"].as_u64() > Some(0),
        "{body}"
    );
    assert!(body["pool"]["max"].as_u64() > Some(0), "{body}");
    let text = body.to_string();
    assert!(!text.contains(&provider), "no owner id: {text}");
    assert_no_phi(&text, &["Perpetua", "Lindqvist"]);
    service.stop();
}

/// The key-event feed made unreadable (its table locked, or renamed away
/// on SQLite): `/ready` is 503 once the feed is staler than its maximum,
/// and 200 again once it is read.
fn stale_feed_is_not_ready(db: &Db) {
    let service = Service::start_with(
        db,
        &[("PHI_MASTER_KEY", common::MASTER_KEY_B64)],
        &[
            "--kek",
            "local:local-test",
            "--feed-interval",
            "0.2",
            "--feed-max-staleness",
            "1",
        ],
    );
    service.ready_becomes(StatusCode::OK, Duration::from_secs(10));
    let blocked = FeedBlock::start(db);
    let body = service.ready_becomes(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(20));
    assert_eq!(body["feed"]["ok"], false, "{body}");
    assert_eq!(body["key_store"]["ok"], true, "{body}");
    assert!(body["feed"]["stale_seconds"].as_f64() > Some(1.0), "{body}");
    blocked.end();
    let body = service.ready_becomes(StatusCode::OK, Duration::from_secs(20));
    assert_eq!(body["feed"]["ok"], true, "{body}");
    service.stop();
}

/// What keeps the service's keyring from reading `phi_key_events`: a lock
/// held in an open transaction (PostgreSQL, MariaDB), or the table renamed
/// away (SQLite, whose readers no lock stops).
enum FeedBlock {
    #[cfg(feature = "sqlite")]
    Sqlite(SqliteConnection),
    #[cfg(feature = "mysql")]
    Mysql(MysqlConnection),
    #[cfg(feature = "postgres")]
    Postgres(PgConnection),
}

impl FeedBlock {
    fn start(db: &Db) -> FeedBlock {
        if let Some(path) = db.url.strip_prefix("sqlite://") {
            #[cfg(feature = "sqlite")]
            {
                let mut conn = SqliteConnection::establish(path).expect("sqlite");
                conn.batch_execute(
                    "PRAGMA busy_timeout = 10000; \
                     ALTER TABLE phi_key_events RENAME TO phi_key_events_away;",
                )
                .expect("renaming the feed's table");
                return FeedBlock::Sqlite(conn);
            }
            #[allow(unreachable_code)]
            {
                panic!("{path}: built without sqlite");
            }
        }
        #[cfg(feature = "mysql")]
        if db.url.starts_with("mysql://") {
            let mut conn = MysqlConnection::establish(&db.url).expect("mysql");
            conn.batch_execute("LOCK TABLES phi_key_events WRITE")
                .expect("locking the feed's table");
            return FeedBlock::Mysql(conn);
        }
        #[cfg(feature = "postgres")]
        if db.url.starts_with("postgres://") {
            let mut conn = PgConnection::establish(&db.url).expect("postgres");
            conn.batch_execute("BEGIN; LOCK TABLE phi_key_events IN ACCESS EXCLUSIVE MODE")
                .expect("locking the feed's table");
            return FeedBlock::Postgres(conn);
        }
        panic!("no feed block for {}", db.url);
    }

    fn end(self) {
        match self {
            #[cfg(feature = "sqlite")]
            FeedBlock::Sqlite(mut conn) => conn
                .batch_execute("ALTER TABLE phi_key_events_away RENAME TO phi_key_events")
                .expect("renaming the feed's table back"),
            #[cfg(feature = "mysql")]
            FeedBlock::Mysql(mut conn) => conn
                .batch_execute("UNLOCK TABLES")
                .expect("unlocking the feed's table"),
            #[cfg(feature = "postgres")]
            FeedBlock::Postgres(mut conn) => conn
                .batch_execute("COMMIT")
                .expect("unlocking the feed's table"),
        }
    }
}

/// The KMS unreachable (a proxy in front of a private moto, cut): `/ready`
/// is 503 once the KEK's probe fails, naming the KEK, and 200 again once
/// the proxy forwards again.
#[cfg(feature = "aws-kms")]
fn kms_unreachable_is_not_ready(db: &Db) {
    let moto = Moto::start();
    let key = moto.create_key();
    let target = moto
        .url
        .strip_prefix("http://")
        .expect("an http URL")
        .parse()
        .expect("moto's address");
    let proxy = Proxy::start(target);
    let endpoint = format!("http://127.0.0.1:{}", proxy.port);
    let kek = format!("aws-kms:{key}");
    let env = [
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_MAX_ATTEMPTS", "2"),
    ];
    let service = Service::start_with(
        db,
        &env,
        &[
            "--kek",
            &kek,
            "--no-access-log",
            "--kek-probe-interval",
            "0.2",
        ],
    );
    service.ready_becomes(StatusCode::OK, Duration::from_secs(10));
    proxy.cut();
    let body = service.ready_becomes(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(30));
    assert_eq!(body["kek"]["reachable"]["ok"], false, "{body}");
    assert_eq!(body["key_store"]["ok"], true, "{body}");
    let error = body["kek"]["reachable"]["error"].as_str().expect("error");
    assert!(error.contains(&key), "names the KEK: {error}");
    proxy.restore();
    let body = service.ready_becomes(StatusCode::OK, Duration::from_secs(30));
    assert_eq!(body["kek"]["reachable"]["ok"], true, "{body}");
    service.stop();
}

/// A shred through one instance's admin route: a second instance, which
/// had the provider's key cached, refuses the provider (410) within its
/// feed interval and a second.
fn shred_reaches_another_instance(db: &Db) {
    const TOKEN: &str = "shred-reaches-test-token";
    const INTERVAL: Duration = Duration::from_secs(1);
    let env = [
        ("PHI_MASTER_KEY", common::MASTER_KEY_B64),
        ("PHI_ADMIN_TOKEN", TOKEN),
    ];
    let args = ["--kek", "local:local-test", "--feed-interval", "1"];
    let provider = common::unique_owner("svc-shred-fleet");
    let first = Service::start_with(db, &env, &args);
    let second = Service::start_with(db, &env, &args);
    let (status, created) = first.as_user("dr-fleet", &provider).post(
        "/cases",
        &new_case(&provider, "Leopoldine", "Harrowgate", "1957-08-09"),
    );
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let case = format!("/cases/{}", created["case_id"].as_str().expect("case id"));
    let (status, got) = second.as_user("dr-fleet", &provider).get(&case);
    assert_eq!(
        status,
        StatusCode::OK,
        "the second instance opens it: {got}"
    );

    let response = first
        .http
        .post(first.url("/admin/shred"))
        .bearer_auth(TOKEN)
        .json(&json!({ "owner": provider, "confirm": provider }))
        .send()
        .expect("shred");
    assert_eq!(response.status(), StatusCode::OK);
    let shredded = std::time::Instant::now();
    let deadline = shredded + INTERVAL + Duration::from_secs(1);
    loop {
        let (status, body) = second.as_user("dr-fleet", &provider).get(&case);
        if status == StatusCode::GONE {
            assert_eq!(body["error"], "shredded", "{body}");
            break;
        }
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            std::time::Instant::now() < deadline,
            "the second instance still opens the case {:?} after the shred",
            shredded.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = second.stop();
    assert_no_phi(&log, &["Leopoldine", "Harrowgate"]);
    first.stop();
}

/// The metric names an expression reads: its identifiers that start with
/// `phi_` or `clinic_service_`, quoted label values left out.
fn metric_names(expr: &str, names: &mut std::collections::BTreeSet<String>) {
    let mut unquoted = String::new();
    let mut quote = None;
    for c in expr.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' || c == '`' => quote = Some(c),
            None => unquoted.push(c),
        }
    }
    for word in unquoted.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
        if word.starts_with("phi_") || word.starts_with("clinic_service_") {
            names.insert(word.to_owned());
        }
    }
}

/// The repository's `ops/` file at `path`.
fn ops_file(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("ops").join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The alerting rules: (alert name, expression) of each.
fn alert_rules() -> Vec<(String, String)> {
    let docs = yaml_rust2::YamlLoader::load_from_str(&ops_file("prometheus/phi-rules.yml"))
        .expect("the rules are YAML");
    let mut rules = Vec::new();
    for group in docs[0]["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            let name = rule["alert"].as_str().expect("an alerting rule");
            let expr = rule["expr"].as_str().expect("an expression");
            rules.push((name.to_owned(), expr.to_owned()));
        }
    }
    assert!(!rules.is_empty());
    rules
}

/// Every alert has a unit test in which it fires and one in which it does
/// not (`promtool test rules` runs them in CI).
#[test]
fn every_alert_has_a_firing_and_a_quiet_unit_test() {
    let docs = yaml_rust2::YamlLoader::load_from_str(&ops_file("prometheus/phi-rules.test.yml"))
        .expect("the rules' tests are YAML");
    let mut firing = std::collections::BTreeSet::new();
    let mut quiet = std::collections::BTreeSet::new();
    for test in docs[0]["tests"].as_vec().expect("tests") {
        for case in test["alert_rule_test"].as_vec().expect("alert_rule_test") {
            let name = case["alertname"].as_str().expect("alertname").to_owned();
            if case["exp_alerts"].as_vec().is_some_and(|a| !a.is_empty()) {
                firing.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    for (name, _) in alert_rules() {
        assert!(firing.contains(&name), "no unit test in which {name} fires");
        assert!(
            quiet.contains(&name),
            "no unit test in which {name} is quiet"
        );
    }
}

/// Every metric that an alert rule or a dashboard panel reads is on a
/// running service's `/metrics` after some traffic (a histogram's
/// `_bucket`, `_sum` and `_count` series included): a renamed metric fails
/// here.
#[cfg(feature = "sqlite")]
#[test]
fn every_metric_of_the_alerts_and_the_dashboard_is_exported() {
    let mut wanted = std::collections::BTreeSet::new();
    for (_, expr) in alert_rules() {
        metric_names(&expr, &mut wanted);
    }
    let dashboard: Value =
        serde_json::from_str(&ops_file("grafana/phi.json")).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6, "the dashboard's panels");
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            metric_names(target["expr"].as_str().expect("an expression"), &mut wanted);
        }
    }

    let db = Db::new(None);
    let service = Service::start(&db);
    let provider = common::unique_owner("svc-metrics");
    for prefix in ["", "/plain"] {
        let user = service.as_user("dr-metrics", &provider);
        let (status, created) = user.post(
            &format!("{prefix}/cases"),
            &new_case(&provider, "Aurelio", "Banfield", "1970-01-02"),
        );
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let id = created["case_id"].as_str().expect("case id");
        assert_eq!(user.get(&format!("{prefix}/cases/{id}")).0, StatusCode::OK);
        assert_eq!(user.get(&format!("{prefix}/cases")).0, StatusCode::OK);
    }
    assert_eq!(service.ready().0, StatusCode::OK);
    let text = service.metrics();
    let mut exported = std::collections::BTreeSet::new();
    let mut histograms = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(typed) = line.strip_prefix("# TYPE ") {
            if let Some(name) = typed.strip_suffix(" histogram") {
                histograms.insert(name.to_owned());
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            exported.insert(line[..end].to_owned());
        }
    }
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|name| {
            !exported.contains(*name)
                && !["_bucket", "_sum", "_count"].iter().any(|suffix| {
                    name.strip_suffix(suffix)
                        .is_some_and(|base| histograms.contains(base))
                })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "read by an alert or a panel but not on /metrics: {missing:?}\n{text}"
    );
    // The histograms the rules and panels take quantiles of are histograms
    // (buckets), not summaries.
    for name in wanted.iter().filter_map(|n| n.strip_suffix("_bucket")) {
        assert!(
            histograms.contains(name),
            "{name} is not a histogram\n{text}"
        );
    }
    service.stop();
}

/// PostgreSQL unreachable (the service's connections go through a proxy
/// that the test cuts): `/ready` is 503, and 200 again once the proxy
/// forwards again.
#[cfg(feature = "postgres")]
#[test]
fn ready_is_503_while_postgres_is_unreachable_and_200_after() {
    let url = std::env::var("PHI_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let (template, target) = through_proxy(&url);
    let proxy = Proxy::start(target);
    let db = Db::new(Some(template.replace("PORT", &proxy.port.to_string())));
    let service = Service::start(&db);
    service.ready_becomes(StatusCode::OK, Duration::from_secs(10));
    proxy.cut();
    let body = service.ready_becomes(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(30));
    assert_eq!(body["key_store"]["ok"], false, "{body}");
    assert!(body["key_store"]["error"].is_string(), "{body}");
    proxy.restore();
    let body = service.ready_becomes(StatusCode::OK, Duration::from_secs(60));
    assert_eq!(body["key_store"]["ok"], true, "{body}");
    service.stop();
}

/// `POST /providers/{p}/search` on phi's routes and the twin's, against
/// an oracle computed here from the cases as created: last-name prefixes
/// (case, spaces, and `%` / `_` taken literally), a year of birth, a range
/// of surgery dates and all at once, over more cases than one page of the
/// sealed search (100); another provider's cases never appear; bad
/// criteria are 422.
fn search_matches_a_plaintext_oracle(db: &Db) {
    const LASTS: &[&str] = &[
        "Marchbanks",
        "Martin",
        "MARSH",
        "Doe",
        "Mar_tinez",
        "Ma%rk",
        "O'Neil",
        "marlow",
        "Mears",
        "Smith",
    ];
    let provider = common::unique_owner("svc-search");
    let other = common::unique_owner("svc-search-other");
    let service = Service::start(db);
    let user = service.as_user("dr-search", &provider);
    let stranger = service.as_user("dr-other", &other);
    for prefix in ["", "/plain"] {
        // (case id, last name, date of birth, surgery date)
        let mut cases: Vec<(String, String, String, String)> = Vec::new();
        for i in 0..130 {
            let last = LASTS[i % LASTS.len()];
            let dob = format!("196{}-0{}-1{}", i % 7, 1 + i % 9, i % 10);
            let surgery = format!("2026-{:02}-{:02}", 10 + i % 3, 1 + i % 28);
            let mut body = new_case(&provider, "Pat", last, &dob);
            body["surgery_date"] = json!(surgery);
            let (status, created) = user.post(&format!("{prefix}/cases"), &body);
            assert_eq!(status, StatusCode::CREATED, "{created}");
            let id = created["case_id"].as_str().expect("case id").to_owned();
            cases.push((id, last.to_owned(), dob, surgery));
        }
        for last in ["Marvin", "Doe"] {
            let (status, created) = stranger.post(
                &format!("{prefix}/cases"),
                &new_case(&other, "Al", last, "1963-05-05"),
            );
            assert_eq!(status, StatusCode::CREATED, "{created}");
        }
        let oracle = |prefix: Option<&str>,
                      year: Option<&str>,
                      from: Option<&str>,
                      to: Option<&str>|
         -> Vec<String> {
            let mut hits: Vec<&(String, String, String, String)> = cases
                .iter()
                .filter(|(_, last, dob, surgery)| {
                    prefix.is_none_or(|p| last.to_lowercase().starts_with(&p.trim().to_lowercase()))
                        && year.is_none_or(|y| dob.starts_with(y))
                        && from.is_none_or(|f| surgery.as_str() >= f)
                        && to.is_none_or(|t| surgery.as_str() <= t)
                })
                .collect();
            hits.sort_by(|a, b| {
                a.1.to_lowercase()
                    .cmp(&b.1.to_lowercase())
                    .then_with(|| a.0.cmp(&b.0))
            });
            hits.into_iter().map(|c| c.0.clone()).collect()
        };
        let checks: Vec<(Value, Vec<String>)> = vec![
            (
                json!({"last_prefix": "mar"}),
                oracle(Some("mar"), None, None, None),
            ),
            (
                json!({"last_prefix": "  MAR "}),
                oracle(Some("mar"), None, None, None),
            ),
            (
                json!({"last_prefix": "ma%"}),
                oracle(Some("ma%"), None, None, None),
            ),
            (
                json!({"last_prefix": "mar_"}),
                oracle(Some("mar_"), None, None, None),
            ),
            (json!({"last_prefix": "zz"}), Vec::new()),
            (
                json!({"dob_year": 1963}),
                oracle(None, Some("1963"), None, None),
            ),
            (
                json!({"surgery_from": "2026-11-05", "surgery_to": "2026-11-20"}),
                oracle(None, None, Some("2026-11-05"), Some("2026-11-20")),
            ),
            (
                json!({"last_prefix": "m", "dob_year": 1961, "surgery_from": "2026-10-10"}),
                oracle(Some("m"), Some("1961"), Some("2026-10-10"), None),
            ),
        ];
        for (query, expected) in checks {
            let (status, found) =
                user.post(&format!("{prefix}/providers/{provider}/search"), &query);
            assert_eq!(status, StatusCode::OK, "{prefix} {query}: {found}");
            let ids: Vec<String> = found["cases"]
                .as_array()
                .expect("cases")
                .iter()
                .map(|c| {
                    assert_eq!(
                        c["provider_id"],
                        provider.as_str(),
                        "only the caller's provider"
                    );
                    c["case_id"].as_str().expect("id").to_owned()
                })
                .collect();
            assert_eq!(ids, expected, "{prefix} {query}");
        }
        assert!(!oracle(Some("mar"), None, None, None).is_empty());
        for bad in [
            json!({}),
            json!({"dob_year": 3000}),
            json!({"last_prefix": "   "}),
            json!({"surgery_from": "2026-11-20", "surgery_to": "2026-11-05"}),
            json!({"last_prefix": "mar", "ssn": "1"}),
        ] {
            let (status, error) = user.post(&format!("{prefix}/providers/{provider}/search"), &bad);
            assert_eq!(
                status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{prefix} {bad}: {error}"
            );
        }
    }
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
            fn search_by_name_prefix_year_and_surgery_dates_matches_an_oracle() {
                search_matches_a_plaintext_oracle(&db());
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
            fn openapi_document_matches_real_responses() {
                super::openapi_document_matches_real_responses(&db());
            }

            #[test]
            fn cross_provider_read_update_delete_export_are_404_with_nothing_opened() {
                cross_provider_requests_refused(&db());
            }

            #[test]
            fn missing_wrong_and_expired_tokens_are_401() {
                bad_tokens_are_401(&db());
            }

            #[test]
            fn csv_export_neutralises_formula_cells() {
                csv_neutralised(&db(), "");
                csv_neutralised(&db(), "/plain");
            }

            #[test]
            fn a_shredded_providers_case_is_410_gone() {
                shredded_case_is_gone(&db());
            }

            #[test]
            fn the_access_log_holds_each_request_of_the_tokens_user() {
                access_log_of_a_session(&db());
            }

            #[cfg(feature = "aws-kms")]
            #[test]
            fn kms_outage_is_503() {
                kms_outage(&db());
            }

            #[test]
            fn live_and_ready_answer_without_a_token() {
                live_and_ready(&db());
            }

            #[test]
            fn ready_is_503_while_the_feed_is_stale_and_200_after() {
                stale_feed_is_not_ready(&db());
            }

            #[cfg(feature = "aws-kms")]
            #[test]
            fn ready_is_503_while_the_kms_is_unreachable_and_200_after() {
                kms_unreachable_is_not_ready(&db());
            }

            #[test]
            fn a_shred_on_one_instance_reaches_another_within_the_interval() {
                shred_reaches_another_instance(&db());
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
    let user = service.as_user("dr-file", &provider);
    let (status, created) = user.post(
        "/cases",
        &new_case(&provider, "Wilhelmina", "Throckmorton", "1933-07-17"),
    );
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["case_id"].as_str().expect("id").to_owned();
    let (status, _) = user.patch(
        &format!("/cases/{id}"),
        &json!({"revision": 1, "ins_provider": "Kaiserhof Mutual"}),
    );
    assert_eq!(status, StatusCode::OK);
    let (_, got) = user.get(&format!("/cases/{id}"));
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
        let (status, created) = service.as_user("dr-shred", provider).post(
            "/cases",
            &new_case(provider, "Winifred", "Ashcombe", "1944-05-06"),
        );
        assert_eq!(status, StatusCode::CREATED, "{created}");
        (
            provider.to_owned(),
            format!("/cases/{}", created["case_id"].as_str().expect("case id")),
        )
    };
    let (case, kept) = (create(&provider), create(&other));
    assert_eq!(
        service.as_user("dr-shred", &case.0).get(&case.1).0,
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
        let (status, body) = service.as_user("dr-shred", &case.0).get(&case.1);
        assert_eq!(status, StatusCode::GONE, "{situation}: {body}");
        assert_eq!(body["error"], "shredded", "{situation}: {body}");
        let (status, body) = service.as_user("dr-shred", &kept.0).get(&kept.1);
        assert_eq!(status, StatusCode::OK, "{situation}: {body}");
    };
    gone(&service, "the shredding process");
    let log = service.stop();
    assert_no_phi(&log, &["Winifred", "Ashcombe"]);
    let fresh = Service::start_with(db, &env, &args);
    gone(&fresh, "a fresh process");
    fresh.stop();
}

/// The service's `/openapi.json`, and the routes and statuses seen so far:
/// each response is checked against the document (its status documented
/// for the route, its content type, its JSON body valid against the
/// documented schema with `$ref`s resolved into the components).
struct Contract<'a> {
    service: &'a Service,
    doc: Value,
    seen: std::collections::BTreeSet<(String, String, u16)>,
}

impl<'a> Contract<'a> {
    fn fetch(service: &'a Service) -> Contract<'a> {
        let response = service
            .http
            .get(service.url("/openapi.json"))
            .send()
            .expect("openapi.json");
        assert_eq!(response.status(), StatusCode::OK);
        let doc: Value = response.json().expect("the document is JSON");
        assert!(
            doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
            "{doc}"
        );
        let mut contract = Contract {
            service,
            doc,
            seen: Default::default(),
        };
        // The document lists itself: its own answer checked too.
        let r = service
            .http
            .get(service.url("/openapi.json"))
            .send()
            .expect("openapi.json");
        contract.check("GET", "/openapi.json", r);
        contract
    }

    /// Sends `method` to `path` (an instance of the documented `template`)
    /// with `token` and `body`, and checks the answer.
    fn call(
        &mut self,
        method: &str,
        template: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.service.http.request(
            reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
            self.service.url(path),
        );
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().expect("request");
        self.check(method, template, response)
    }

    /// Checks `response` against the document's `method` `template`.
    fn check(
        &mut self,
        method: &str,
        template: &str,
        response: reqwest::blocking::Response,
    ) -> (StatusCode, Value) {
        let status = response.status();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let text = response.text().expect("body");
        let operation = &self.doc["paths"][template][method.to_lowercase()];
        assert!(
            operation.is_object(),
            "{method} {template} is not in /openapi.json"
        );
        let documented = &operation["responses"][status.as_str()];
        assert!(
            documented.is_object(),
            "{method} {template}: status {status} is not documented: {text}"
        );
        self.seen
            .insert((method.to_owned(), template.to_owned(), status.as_u16()));
        let Some(content) = documented["content"].as_object() else {
            assert!(text.is_empty(), "{method} {template} {status}: {text}");
            return (status, Value::Null);
        };
        let media = content_type.split(';').next().unwrap_or("").trim();
        let Some(schema) = content.get(media) else {
            panic!("{method} {template} {status}: {media} is not documented: {content:?}");
        };
        if media != "application/json" {
            return (status, Value::Null);
        }
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {template} {status}: {e}: {text}"));
        // The documented schema, its `$ref`s resolved in this root.
        let root = json!({
            "allOf": [schema["schema"].clone()],
            "components": self.doc["components"].clone(),
        });
        let validator = jsonschema::validator_for(&root)
            .unwrap_or_else(|e| panic!("{method} {template} {status}: the schema: {e}"));
        let errors: Vec<String> = validator
            .iter_errors(&body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {template} {status}: the body does not match the document: {errors:?}\n{body}"
        );
        (status, body)
    }

    /// The documented operations never exercised, as `METHOD path`.
    fn unexercised(&self) -> Vec<String> {
        let mut missing = Vec::new();
        for (path, item) in self.doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("a path item").keys() {
                let method = method.to_uppercase();
                if !self.seen.iter().any(|(m, p, _)| *m == method && p == path) {
                    missing.push(format!("{method} {path}"));
                }
            }
        }
        missing
    }
}

/// The service's `/openapi.json` (its routes, phi's probes and admin
/// routes) against real answers: every documented route is exercised, with
/// the statuses a test can provoke (successes, 401, 404, 409, 410, 422, a
/// damaged row's 500, the admin API's 400, 415 and 422), and each answer's
/// status, content type and JSON body are checked against the document.
fn openapi_document_matches_real_responses(db: &Db) {
    const TOKEN: &str = "openapi-test-token";
    let provider = common::unique_owner("svc-openapi");
    let service = Service::start_with(
        db,
        &[
            ("PHI_MASTER_KEY", common::MASTER_KEY_B64),
            ("PHI_ADMIN_TOKEN", TOKEN),
        ],
        &["--kek", "local:local-test"],
    );
    let mut api = Contract::fetch(&service);
    let bearer = token("dr-openapi", &provider, 3600);
    let user = Some(bearer.as_str());
    let admin = Some(TOKEN);
    let other = common::unique_owner("svc-openapi-other");
    let mut damaged = None;
    for prefix in ["", "/plain"] {
        let t = |template: &str| format!("{prefix}{template}");
        let cases = t("/cases");
        let case = t("/cases/{id}");
        let body = new_case(&provider, "Araminta", "Quill", "1962-07-08");
        let (status, created) = api.call("POST", &cases, &cases, user, Some(&body));
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let id = created["case_id"].as_str().expect("case id").to_owned();
        let one = t(&format!("/cases/{id}"));
        assert_eq!(
            api.call("POST", &cases, &cases, None, Some(&body)).0,
            StatusCode::UNAUTHORIZED
        );
        let bad = json!({ "patient_first": "Araminta" });
        assert_eq!(
            api.call("POST", &cases, &cases, user, Some(&bad)).0,
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            api.call("GET", &cases, &cases, user, None).0,
            StatusCode::OK
        );
        let zero = format!("{cases}?limit=0");
        assert_eq!(
            api.call("GET", &cases, &zero, user, None).0,
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(api.call("GET", &case, &one, user, None).0, StatusCode::OK);
        let missing = t("/cases/C-0000000000000000");
        assert_eq!(
            api.call("GET", &case, &missing, user, None).0,
            StatusCode::NOT_FOUND
        );
        let change = json!({ "revision": created["revision"], "status": "completed" });
        let (status, changed) = api.call("PATCH", &case, &one, user, Some(&change));
        assert_eq!(status, StatusCode::OK, "{changed}");
        assert_eq!(
            api.call("PATCH", &case, &one, user, Some(&change)).0,
            StatusCode::CONFLICT
        );
        let wrong = json!({ "revision": changed["revision"], "status": "lost" });
        assert_eq!(
            api.call("PATCH", &case, &one, user, Some(&wrong)).0,
            StatusCode::UNPROCESSABLE_ENTITY
        );
        let list = t("/providers/{provider}/cases");
        let dups = t("/providers/{provider}/duplicates");
        let export = t("/providers/{provider}/export.csv");
        for (template, method) in [(&list, "GET"), (&dups, "POST"), (&export, "GET")] {
            let path = |p: &str| template.replace("{provider}", p);
            let query = json!({ "patient_last": "quill", "patient_dob": "1962-07-08" });
            let body = (method == "POST").then_some(&query);
            let (status, found) = api.call(method, template, &path(&provider), user, body);
            assert_eq!(status, StatusCode::OK, "{template}: {found}");
            if method == "POST" {
                assert_eq!(found["case_ids"], json!([id]));
                let bad = json!({ "patient_last": "quill" });
                assert_eq!(
                    api.call(method, template, &path(&provider), user, Some(&bad))
                        .0,
                    StatusCode::UNPROCESSABLE_ENTITY
                );
            }
            assert_eq!(
                api.call(method, template, &path(&other), user, body).0,
                StatusCode::NOT_FOUND,
                "{template}"
            );
        }
        let search = t("/providers/{provider}/search");
        let search_path = |p: &str| search.replace("{provider}", p);
        let query = json!({ "last_prefix": " QUI", "dob_year": 1962 });
        let (status, found) =
            api.call("POST", &search, &search_path(&provider), user, Some(&query));
        assert_eq!(status, StatusCode::OK, "{found}");
        assert_eq!(found["cases"][0]["case_id"], json!(id), "{found}");
        assert_eq!(found["cases"].as_array().map(Vec::len), Some(1), "{found}");
        assert_eq!(
            api.call(
                "POST",
                &search,
                &search_path(&provider),
                user,
                Some(&json!({}))
            )
            .0,
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            api.call("POST", &search, &search_path(&other), user, Some(&query))
                .0,
            StatusCode::NOT_FOUND
        );
        // A second case to delete (204, then 404).
        let (status, doomed) = api.call("POST", &cases, &cases, user, Some(&body));
        assert_eq!(status, StatusCode::CREATED, "{doomed}");
        let doomed = t(&format!(
            "/cases/{}",
            doomed["case_id"].as_str().expect("id")
        ));
        assert_eq!(
            api.call("DELETE", &case, &doomed, user, None).0,
            StatusCode::NO_CONTENT
        );
        assert_eq!(
            api.call("DELETE", &case, &doomed, user, None).0,
            StatusCode::NOT_FOUND
        );
        if prefix.is_empty() {
            damaged = Some(id);
        }
    }
    // A damaged sealed row: 500 alone, listed as an error in a page.
    let damaged = damaged.expect("a sealed case");
    db.tamper(&damaged);
    let (status, page) = api.call("GET", "/cases", "/cases", user, None);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["errors"][0]["case_id"], json!(damaged), "{page}");
    let path = format!("/cases/{damaged}");
    assert_eq!(
        api.call("GET", "/cases/{id}", &path, user, None).0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    for path in ["/metrics", "/health", "/live", "/ready"] {
        assert_eq!(api.call("GET", path, path, None, None).0, StatusCode::OK);
    }

    // phi's admin routes.
    let owner = format!("/admin/key-status?owner={provider}");
    assert_eq!(
        api.call("GET", "/admin/key-status", &owner, admin, None).0,
        StatusCode::OK
    );
    assert_eq!(
        api.call("GET", "/admin/key-status", "/admin/key-status", admin, None)
            .0,
        StatusCode::OK
    );
    assert_eq!(
        api.call("GET", "/admin/key-status", &owner, None, None).0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        api.call(
            "GET",
            "/admin/key-status",
            "/admin/key-status?nonsense=1",
            admin,
            None
        )
        .0,
        StatusCode::BAD_REQUEST
    );
    let fresh = common::unique_owner("svc-openapi-new");
    for dry_run in [true, false] {
        let body = json!({ "owner": fresh, "dry_run": dry_run });
        let (status, answer) = api.call(
            "POST",
            "/admin/generate-key",
            "/admin/generate-key",
            admin,
            Some(&body),
        );
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    let neither = json!({});
    assert_eq!(
        api.call(
            "POST",
            "/admin/generate-key",
            "/admin/generate-key",
            admin,
            Some(&neither)
        )
        .0,
        StatusCode::BAD_REQUEST
    );
    let mistyped = json!({ "owner": 7 });
    assert_eq!(
        api.call(
            "POST",
            "/admin/generate-key",
            "/admin/generate-key",
            admin,
            Some(&mistyped)
        )
        .0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    // A body not sent as JSON: 415.
    let response = service
        .http
        .post(service.url("/admin/rotate"))
        .bearer_auth(TOKEN)
        .body(format!("{{\"owner\": \"{fresh}\"}}"))
        .send()
        .expect("rotate");
    assert_eq!(
        api.check("POST", "/admin/rotate", response).0,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let rotate = json!({ "owner": fresh });
    assert_eq!(
        api.call(
            "POST",
            "/admin/rotate",
            "/admin/rotate",
            admin,
            Some(&rotate)
        )
        .0,
        StatusCode::OK
    );
    assert_eq!(
        api.call(
            "GET",
            "/admin/audit-log",
            "/admin/audit-log?limit=5",
            admin,
            None
        )
        .0,
        StatusCode::OK
    );
    assert_eq!(
        api.call(
            "GET",
            "/admin/audit-log",
            "/admin/audit-log?limit=0",
            admin,
            None
        )
        .0,
        StatusCode::BAD_REQUEST
    );
    // The service's admin router has no access log configured: 400.
    assert_eq!(
        api.call("GET", "/admin/access-log", "/admin/access-log", admin, None)
            .0,
        StatusCode::BAD_REQUEST
    );
    // Not `{"all": true}`: the database is shared with the other tests,
    // whose services follow the feed, and a fleet-wide clear would drop
    // the keys they rely on being cached (the KMS outage test's). The
    // answer's shape is the same for one owner.
    for (body, expected) in [
        (json!({ "owner": fresh }), StatusCode::OK),
        (json!({}), StatusCode::BAD_REQUEST),
    ] {
        assert_eq!(
            api.call(
                "POST",
                "/admin/clear-cache",
                "/admin/clear-cache",
                admin,
                Some(&body)
            )
            .0,
            expected
        );
    }
    for (body, expected) in [
        (json!({ "mode": "all" }), StatusCode::OK),
        (json!({ "mode": "some" }), StatusCode::BAD_REQUEST),
    ] {
        assert_eq!(
            api.call(
                "POST",
                "/admin/rollout",
                "/admin/rollout",
                admin,
                Some(&body)
            )
            .0,
            expected
        );
    }
    // A case that opens, until the shred below.
    let (status, created) = api.call(
        "POST",
        "/cases",
        "/cases",
        user,
        Some(&new_case(&provider, "Araminta", "Quill", "1962-07-08")),
    );
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let kept = created["case_id"].as_str().expect("case id").to_owned();
    let unconfirmed = json!({ "owner": provider });
    assert_eq!(
        api.call(
            "POST",
            "/admin/shred",
            "/admin/shred",
            admin,
            Some(&unconfirmed)
        )
        .0,
        StatusCode::BAD_REQUEST
    );
    let confirmed = json!({ "owner": provider, "confirm": provider });
    assert_eq!(
        api.call(
            "POST",
            "/admin/shred",
            "/admin/shred",
            admin,
            Some(&confirmed)
        )
        .0,
        StatusCode::OK
    );
    // Rotating a shredded owner is refused by its keys' state: 409.
    let shredded = json!({ "owner": provider });
    assert_eq!(
        api.call(
            "POST",
            "/admin/rotate",
            "/admin/rotate",
            admin,
            Some(&shredded)
        )
        .0,
        StatusCode::CONFLICT
    );
    // The shredded provider's case: 410.
    let path = format!("/cases/{kept}");
    let (status, body) = api.call("GET", "/cases/{id}", &path, user, None);
    assert_eq!(status, StatusCode::GONE, "{body}");

    let unexercised = api.unexercised();
    assert!(
        unexercised.is_empty(),
        "documented but never exercised: {unexercised:?}"
    );
    service.stop();
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
    let user = service.as_user("dr-admin", &provider);
    let (status, created) = user.post(
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
    let (status, got) = user.get(&format!(
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
    let (status, got) = user.get(&format!(
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
    let (status, _) = plain.anonymous().get("/admin/key-status");
    assert_eq!(status, StatusCode::NOT_FOUND);
    let log = plain.stop();
    assert!(log.contains("PHI_ADMIN_TOKEN is not set"), "{log}");
}

/// Another provider's cases, through every route that reaches a case or a
/// provider, on phi's routes and the twin's: each is 404 (422 for a body
/// naming another provider), and the keyring's counters (cache hits and
/// misses, key loads, unwraps, creations) do not move, so no key was
/// fetched and nothing opened. The service is restarted before, so the
/// victim's key is not even cached: opening anything would load it. Then
/// the owner reads the case, unchanged, and the counters do move.
fn cross_provider_requests_refused(db: &Db) {
    let victim = common::unique_owner("svc-victim");
    let intruder = common::unique_owner("svc-intruder");
    let first = Service::start(db);
    let (status, created) = first.as_user("dr-owner", &victim).post(
        "/cases",
        &new_case(&victim, "Clementine", "Hargreaves", "1958-03-14"),
    );
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["case_id"].as_str().expect("id").to_owned();
    let (status, twin) = first.as_user("dr-owner", &victim).post(
        "/plain/cases",
        &new_case(&victim, "Clementine", "Hargreaves", "1958-03-14"),
    );
    assert_eq!(status, StatusCode::CREATED, "{twin}");
    let twin_id = twin["case_id"].as_str().expect("id").to_owned();
    // The intruder is a real user of a real provider with a key of its own.
    let (status, own) = first.as_user("dr-intruder", &intruder).post(
        "/cases",
        &new_case(&intruder, "Alaric", "Pennyworth", "1970-01-02"),
    );
    assert_eq!(status, StatusCode::CREATED, "{own}");
    first.stop();

    let service = Service::start(db);
    let intruder_user = service.as_user("dr-intruder", &intruder);
    let before = service.key_counters();
    for (prefix, id) in [("", &id), ("/plain", &twin_id)] {
        let case = format!("{prefix}/cases/{id}");
        let (status, body) = intruder_user.get(&case);
        assert_eq!(status, StatusCode::NOT_FOUND, "read {case}: {body}");
        assert_no_phi(&body.to_string(), &["Clementine", "Hargreaves"]);
        let (status, body) = intruder_user.patch(
            &case,
            &json!({"revision": 1, "patient_first": "Mallory", "status": "cancelled"}),
        );
        assert_eq!(status, StatusCode::NOT_FOUND, "update {case}: {body}");
        assert_eq!(
            intruder_user.delete(&case),
            StatusCode::NOT_FOUND,
            "delete {case}"
        );
        let (status, csv) = intruder_user.text(&format!("{prefix}/providers/{victim}/export.csv"));
        assert_eq!(status, StatusCode::NOT_FOUND, "export: {csv}");
        assert_no_phi(&csv, &["Clementine", "Hargreaves"]);
        let (status, body) = intruder_user.get(&format!("{prefix}/providers/{victim}/cases"));
        assert_eq!(status, StatusCode::NOT_FOUND, "list: {body}");
        let (status, body) = intruder_user.post(
            &format!("{prefix}/providers/{victim}/duplicates"),
            &json!({"patient_last": "Hargreaves", "patient_dob": "1958-03-14"}),
        );
        assert_eq!(status, StatusCode::NOT_FOUND, "duplicates: {body}");
        // A case for the victim's provider, through the body: refused.
        let (status, body) = intruder_user.post(
            &format!("{prefix}/cases"),
            &new_case(&victim, "Mallory", "Intruder", "1980-01-01"),
        );
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "create: {body}");
        assert!(
            body["message"]
                .as_str()
                .expect("message")
                .starts_with("provider_id:"),
            "{body}"
        );
    }
    assert_eq!(
        service.key_counters(),
        before,
        "no key fetched, nothing opened"
    );
    // The intruder's own list holds only the intruder's cases.
    for prefix in ["", "/plain"] {
        let (status, page) = intruder_user.get(&format!("{prefix}/cases"));
        assert_eq!(status, StatusCode::OK, "{page}");
        assert_no_phi(&page.to_string(), &["Clementine", "Hargreaves", "Mallory"]);
    }

    // The owner: the case is there, unchanged, and reading it loads its key.
    let before = service.key_counters();
    let owner = service.as_user("dr-owner", &victim);
    let (status, got) = owner.get(&format!("/cases/{id}"));
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["patient_first"], "Clementine");
    assert_eq!(got["status"], "scheduled");
    assert_eq!(got["revision"], 1);
    let (status, got) = owner.get(&format!("/plain/cases/{twin_id}"));
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["patient_first"], "Clementine");
    assert_ne!(
        service.key_counters(),
        before,
        "the counters see a real read"
    );
    let log = service.stop();
    assert_no_phi(&log, &["Clementine", "Hargreaves", "Mallory"]);
}

/// A missing, malformed, wrongly signed, expired or incomplete token: 401
/// with `WWW-Authenticate: Bearer`, on every case route, before anything is
/// read: the keyring's counters do not move and no case is created.
fn bad_tokens_are_401(db: &Db) {
    let provider = common::unique_owner("svc-auth");
    let service = Service::start(db);
    let (status, created) = service.as_user("dr-auth", &provider).post(
        "/cases",
        &new_case(&provider, "Evangeline", "Oduya", "1966-06-16"),
    );
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["case_id"].as_str().expect("id").to_owned();
    let before = service.key_counters();
    let in_an_hour = now() + 3600;
    let bad = [
        ("missing", None),
        ("not a JWT", Some("not-a-token".to_owned())),
        (
            "another secret",
            Some(signed(
                &json!({"sub": "dr-auth", "provider": provider, "exp": in_an_hour}),
                "another-secret-of-the-same-length-0123456789",
            )),
        ),
        ("expired", Some(token("dr-auth", &provider, -3600))),
        (
            "no exp",
            Some(signed(
                &json!({"sub": "dr-auth", "provider": provider}),
                JWT_SECRET,
            )),
        ),
        (
            "no provider",
            Some(signed(
                &json!({"sub": "dr-auth", "exp": in_an_hour}),
                JWT_SECRET,
            )),
        ),
        (
            "empty user",
            Some(signed(
                &json!({"sub": " ", "provider": provider, "exp": in_an_hour}),
                JWT_SECRET,
            )),
        ),
        ("alg none", Some(unsigned_token(&provider, in_an_hour))),
    ];
    for (what, token) in &bad {
        let client = match token {
            Some(token) => service.with_token(token),
            None => service.anonymous(),
        };
        for (method, path, body) in [
            (reqwest::Method::GET, format!("/cases/{id}"), None),
            (reqwest::Method::GET, "/cases".to_owned(), None),
            (
                reqwest::Method::PATCH,
                format!("/cases/{id}"),
                Some(json!({"revision": 1, "patient_first": "Mallory"})),
            ),
            (reqwest::Method::DELETE, format!("/cases/{id}"), None),
            (
                reqwest::Method::GET,
                format!("/providers/{provider}/export.csv"),
                None,
            ),
            (
                reqwest::Method::POST,
                "/cases".to_owned(),
                Some(new_case(&provider, "Mallory", "Intruder", "1980-01-01")),
            ),
            (reqwest::Method::GET, format!("/plain/cases/{id}"), None),
        ] {
            let r = client.send(method.clone(), &path, body.as_ref());
            assert_eq!(
                r.status(),
                StatusCode::UNAUTHORIZED,
                "{what}: {method} {path}"
            );
            assert_eq!(
                r.headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok()),
                Some("Bearer"),
                "{what}"
            );
            let body: Value = r.json().expect("JSON");
            assert_eq!(body["error"], "unauthorized", "{what}: {body}");
            assert_no_phi(&body.to_string(), &["Evangeline", "Oduya"]);
        }
    }
    // A bearer header of another scheme.
    let r = service
        .http
        .get(service.url(&format!("/cases/{id}")))
        .basic_auth("dr-auth", Some("password"))
        .send()
        .expect("GET");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(service.key_counters(), before, "nothing opened, no key");
    // Nothing changed: the case is as created, and nothing was created.
    let user = service.as_user("dr-auth", &provider);
    let (status, got) = user.get(&format!("/cases/{id}"));
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["patient_first"], "Evangeline");
    let (_, page) = user.get("/cases");
    assert_eq!(page["cases"].as_array().expect("cases").len(), 1, "{page}");
    let log = service.stop();
    assert!(!log.contains(JWT_SECRET), "the secret is never logged");
    for (_, token) in &bad {
        if let Some(token) = token {
            assert!(!log.contains(token.as_str()), "a token is never logged");
        }
    }
}

/// A JWT with `alg: none` and no signature.
fn unsigned_token(provider: &str, exp: u64) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(json!({"sub": "dr-auth", "provider": provider, "exp": exp}).to_string()),
    )
}

/// CSV injection: an export's cells that start with `=`, `+`, `-` or `@`
/// are prefixed with `'` (a spreadsheet shows them as text); the JSON API
/// still gives the values as stored.
fn csv_neutralised(db: &Db, prefix: &str) {
    let provider = common::unique_owner("svc-csv");
    let service = Service::start(db);
    let user = service.as_user("dr-csv", &provider);
    let mut case = new_case(
        &provider,
        "=HYPERLINK(\"http://x.test\",\"open\")",
        "+1+1",
        "1972-08-19",
    );
    case["ins_provider"] = json!("@SUM(A1:A9)");
    let (status, created) = user.post(&format!("{prefix}/cases"), &case);
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let mut second = new_case(&provider, "-2+3", "Plain", "1972-08-19");
    second["ins_provider"] = json!("Safe, Inc.");
    let (status, _) = user.post(&format!("{prefix}/cases"), &second);
    assert_eq!(status, StatusCode::CREATED);
    let id = created["case_id"].as_str().expect("id");
    let (_, got) = user.get(&format!("{prefix}/cases/{id}"));
    assert_eq!(got["patient_last"], "+1+1", "stored as given");

    let (status, csv) = user.text(&format!("{prefix}/providers/{provider}/export.csv"));
    assert_eq!(status, StatusCode::OK, "{csv}");
    assert!(
        csv.contains(
            r#","'=HYPERLINK(""http://x.test"",""open"")","'+1+1",1972-08-19,"'@SUM(A1:A9)","#
        ),
        "{csv}"
    );
    assert!(
        csv.contains(r#","'-2+3",Plain,1972-08-19,"Safe, Inc.","#),
        "{csv}"
    );
    for line in csv.lines() {
        for cell in line.split(',') {
            assert!(
                !cell.starts_with(['=', '+', '-', '@']),
                "{cell:?} in {line}"
            );
        }
    }
    service.stop();
}

/// A service started without token verification refuses to start, with
/// the settings named; a short HS256 secret likewise.
#[cfg(feature = "sqlite")]
#[test]
fn refuses_to_start_without_token_verification() {
    let dir = tempfile::tempdir().expect("directory");
    for (secret, expected) in [
        (None, "no token verification configured"),
        (Some("tiny-secret"), "shorter than 32 bytes"),
    ] {
        let mut command = Command::new(service_bin());
        command
            .args(["--listen", "127.0.0.1:0", "--database-url"])
            .arg(format!("sqlite://{}", dir.path().join("none.db").display()))
            .env_remove("CLINIC_JWT_SECRET")
            .env_remove("CLINIC_JWT_PUBLIC_KEY_FILE")
            .env("PHI_MASTER_KEY", common::MASTER_KEY_B64)
            .current_dir(dir.path());
        if let Some(secret) = secret {
            command.env("CLINIC_JWT_SECRET", secret);
        }
        let out = command.output().expect("the service runs");
        assert!(!out.status.success(), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!stdout.contains("listening"), "{stdout}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{stderr}");
        assert!(stderr.contains("CLINIC_JWT_SECRET"), "{stderr}");
        assert!(
            !stderr.contains("tiny-secret"),
            "the secret is not echoed: {stderr}"
        );
    }
}

/// Tokens of an identity provider: ES256, verified with its public key
/// (`CLINIC_JWT_PUBLIC_KEY_FILE`, PEM); an HS256 token signed with the
/// public key's bytes (the algorithm confusion attack) is refused.
#[cfg(feature = "sqlite")]
#[test]
fn es256_tokens_from_a_public_key() {
    use base64::Engine as _;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .expect("key pair");
    // SubjectPublicKeyInfo of a P-256 key: the fixed prefix, then the point.
    let mut spki =
        hex::decode("3059301306072a8648ce3d020106082a8648ce3d030107034200").expect("prefix");
    spki.extend_from_slice(pair.public_key().as_ref());
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(&spki)
    );
    let db = Db::new(None);
    let key_file = db.dir.path().join("issuer.pem");
    std::fs::write(&key_file, &pem).expect("key file");
    let key_path = key_file.to_str().expect("path");
    let service = Service::start_with(
        &db,
        &[
            ("PHI_MASTER_KEY", common::MASTER_KEY_B64),
            ("CLINIC_JWT_PUBLIC_KEY_FILE", key_path),
            ("CLINIC_JWT_ALGORITHM", "es256"),
            ("CLINIC_JWT_ISSUER", "https://idp.test"),
        ],
        &[],
    );
    let provider = common::unique_owner("svc-es256");
    let claims =
        |iss: &str| json!({"sub": "dr-es", "provider": provider, "exp": now() + 600, "iss": iss});
    let es256 = |claims: &Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            claims,
            &jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()),
        )
        .expect("ES256 token")
    };
    let good = es256(&claims("https://idp.test"));
    let (status, created) = service.with_token(&good).post(
        "/cases",
        &new_case(&provider, "Ottilie", "Brennan", "1949-11-11"),
    );
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (status, _) = service
        .with_token(&es256(&claims("https://other.test")))
        .get("/cases");
    assert_eq!(status, StatusCode::UNAUTHORIZED, "another issuer");
    let (status, _) = service
        .with_token(&signed(&claims("https://idp.test"), &pem))
        .get("/cases");
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "HS256 with the public key"
    );
    let (status, _) = service
        .with_token(&token("dr-es", &provider, 600))
        .get("/cases");
    assert_eq!(status, StatusCode::UNAUTHORIZED, "HS256 with a secret");
    let (status, page) = service.with_token(&good).get("/cases");
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["cases"][0]["patient_first"], "Ottilie");
    service.stop();
}

/// The request metrics' labels take few values whatever clients send
/// (methods outside the known ones are `other`, unknown paths
/// `unmatched`); every response carries a request id of the service's own
/// (a client's is not taken), logged with its line; an id in a path with a
/// newline cannot forge a log line.
#[cfg(feature = "sqlite")]
#[test]
fn bounded_labels_request_ids_and_unforgeable_log_lines() {
    let db = Db::new(None);
    let service = Service::start(&db);
    let provider = common::unique_owner("svc-labels");
    let user = service.as_user("dr-labels", &provider);
    for i in 0..20 {
        let method = reqwest::Method::from_bytes(format!("BREW{i}").as_bytes()).expect("method");
        let r = user.send(method, "/cases", None);
        assert!(r.status().is_client_error(), "{}", r.status());
        let r = user.send(reqwest::Method::GET, &format!("/no/such/path/{i}"), None);
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }
    let metrics = service.metrics();
    assert!(!metrics.contains("BREW"), "{metrics}");
    assert!(!metrics.contains("/no/such/path"), "{metrics}");
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("clinic_service_requests_total{"))
        .collect();
    assert!(
        series
            .iter()
            .any(|l| l.contains(r#"method="other""#) && l.ends_with(" 20")),
        "{metrics}"
    );
    assert!(
        series
            .iter()
            .any(|l| l.contains(r#"route="unmatched""#) && l.ends_with(" 20")),
        "{metrics}"
    );
    assert!(series.len() <= 4, "{series:#?}");

    // Request ids: generated, unique, echoed; a client's is not taken.
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let r = user
            .request(reqwest::Method::GET, "/cases")
            .header("x-request-id", "client-chosen-id")
            .send()
            .expect("GET");
        assert_eq!(r.status(), StatusCode::OK);
        let id = r
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .expect("x-request-id")
            .to_owned();
        assert_eq!(id.len(), 16, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        ids.insert(id);
    }
    assert_eq!(ids.len(), 10, "{ids:?}");
    let anonymous = service.http.get(service.url("/cases")).send().expect("GET");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert!(anonymous.headers().contains_key("x-request-id"));

    // A forged line through an id in the path.
    let (status, _) = user.get("/cases/C-1%0A2026-12-07T00:00:00Z%20INFO%20forged%20admin%20login");
    assert_eq!(status, StatusCode::NOT_FOUND);
    let log = service.stop();
    assert!(!log.contains("client-chosen-id"), "{log}");
    for id in &ids {
        assert!(log.contains(&format!("id={id}")), "{id} in {log}");
    }
    assert!(
        log.lines().all(|l| !l.starts_with("2026-12-07T00:00:00Z")),
        "{log}"
    );
    assert!(
        log.contains(r#"path="/cases/C-1\n2026-12-07T00:00:00Z INFO forged admin login""#),
        "{log}"
    );
    assert!(log.contains(r#"user="dr-labels""#), "{log}");
}

/// Runs `phi` on the service's database with the tests' master key.
fn phi_cli(db: &Db, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_phi"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("PHI_MASTER_KEY", common::MASTER_KEY_B64)
        .env("PHI_KEK_ID", "local-test")
        .env_remove("PHI_MASTER_KEY_FILE")
        .env_remove("PHI_KEK")
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

/// Every request that reached a case is one access record naming the
/// token's user, the request's operation, the provider and the case;
/// another provider's attempts (404, nothing opened) leave none; the
/// chain verifies afterwards.
fn access_log_of_a_session(db: &Db) {
    let provider = common::unique_owner("svc-log");
    let other = common::unique_owner("svc-log-other");
    let service = Service::start(db);
    let nurse = service.as_user("nurse-ito", &provider);
    let (status, created) = nurse.post(
        "/cases",
        &new_case(&provider, "Octavia", "Brightwater", "1961-07-30"),
    );
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["case_id"].as_str().expect("id").to_owned();
    let case = format!("/cases/{id}");
    let doctor = service.as_user("dr-mensah", &provider);
    assert_eq!(doctor.get(&case).0, StatusCode::OK);
    let (status, body) = doctor.patch(&case, &json!({"revision": 1, "status": "completed"}));
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = doctor.text(&format!("/providers/{provider}/export.csv"));
    assert_eq!(status, StatusCode::OK);
    // Another provider's user: refused, nothing opened, nothing recorded.
    let intruder = service.as_user("dr-elsewhere", &other);
    assert_eq!(intruder.get(&case).0, StatusCode::NOT_FOUND);
    assert_eq!(intruder.delete(&case), StatusCode::NOT_FOUND);
    assert_eq!(nurse.delete(&case), StatusCode::NO_CONTENT);
    service.stop();

    let (code, out, err) = phi_cli(
        db,
        &["audit", "access", "--owner", &provider, "--format", "csv"],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("occurred_at,user,purpose,request_id,op,owner,table,row,fields,chain,batch,seq")
    );
    let got: Vec<(String, String, String, String)> = lines
        .map(|line| {
            let cells: Vec<&str> = line.split(',').collect();
            assert!(!cells[3].is_empty(), "a request id: {line}");
            (
                cells[1].to_owned(),
                cells[4].to_owned(),
                cells[5].to_owned(),
                cells[7].to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String, String, String)> = [
        ("nurse-ito", "insert"),
        ("dr-mensah", "read"),
        ("dr-mensah", "update"),
        ("dr-mensah", "export"),
        ("nurse-ito", "delete"),
    ]
    .iter()
    .map(|(user, op)| {
        (
            (*user).to_owned(),
            (*op).to_owned(),
            provider.clone(),
            id.clone(),
        )
    })
    .collect();
    let mut sorted_got = got.clone();
    sorted_got.sort();
    let mut sorted_want = want.clone();
    sorted_want.sort();
    // The update reads the case first (a read), then seals it again.
    sorted_want.push((
        "dr-mensah".into(),
        "read".into(),
        provider.clone(),
        id.clone(),
    ));
    sorted_want.sort();
    assert_eq!(sorted_got, sorted_want, "{out}");
    let (code, out, err) = phi_cli(
        db,
        &["audit", "access", "--owner", &other, "--format", "csv"],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(
        out.lines().count(),
        1,
        "nothing of the other provider: {out}"
    );
    // The service's chain (other tests of a shared database break chains
    // of their own on purpose).
    let (code, out, err) = phi_cli(db, &["audit", "verify", "--chain", "default"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("intact"), "{out}");
}
