//! Cold start at scale: resolving 10,000 owners' data keys on a fresh
//! keyring with `AwsKmsKek` against a KMS-compatible server (moto), at
//! several request concurrencies, with the server's own count of the
//! requests it received beside phi's.
//!
//! ```sh
//! cargo bench -p phi-benches --bench cold_start --features aws-kms
//! PHI_COLD_OWNERS=2000 PHI_COLD_CONCURRENCY=1,16,64 cargo bench -p phi-benches --bench cold_start --features aws-kms
//! ```
//!
//! It starts a `python3 -m moto.server` of its own on a free port, with
//! moto's request recorder on (`MOTO_RECORDER_FILEPATH`), so that no other
//! client's requests are counted. One KMS key; the owners' data keys are
//! created once (`keys_for_seal_many`: one `GenerateDataKey` each) in phi's
//! key store on a temporary SQLite file. Then, for each concurrency, a new
//! `AwsKmsKek` with `max_concurrent_requests(c)` and a new keyring over the
//! same store resolve every owner (`keys_for_open_many`: one store query,
//! one `Decrypt` per owner): the time, the `Decrypt` calls phi counted
//! (`AwsKmsKek::stats`) and the `TrentService.Decrypt` requests moto
//! recorded. Not a CI test: it needs moto (`pip install "moto[server]"`).
//!
//! Results: `benches/README.md`.
#![allow(clippy::print_stdout)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use phi::{AwsKmsKek, DieselKeyStore, KeyStore, Keyring};

const REGION: &str = "us-east-1";

/// A moto server of this run's own, recording requests.
struct Moto {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Moto {
    fn start() -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .env("MOTO_RECORDER_FILEPATH", dir.path().join("requests.jsonl"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m moto.server starts (pip install \"moto[server]\")");
        let mut moto = Moto {
            port,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while moto.try_http("GET", "/moto-api/").is_none() {
            if let Ok(Some(status)) = moto.child.try_wait() {
                panic!("moto.server exited ({status})");
            }
            assert!(Instant::now() < deadline, "moto.server did not answer");
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn try_http(&self, method: &str, path: &str) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .ok()?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        response
            .starts_with("HTTP/1.1 200")
            .then(|| response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()))?
    }

    fn http(&self, method: &str, path: &str) -> String {
        self.try_http(method, path)
            .unwrap_or_else(|| panic!("moto {method} {path} failed"))
    }

    /// Starts recording requests, forgetting earlier ones.
    fn record(&self) {
        self.http("POST", "/moto-api/recorder/reset-recording");
        self.http("POST", "/moto-api/recorder/start-recording");
    }

    /// Requests of the KMS operation `op` recorded since `record`.
    fn recorded(&self, op: &str) -> usize {
        let needle = format!("\"TrentService.{op}\"");
        self.http("GET", "/moto-api/recorder/download-recording")
            .lines()
            .filter(|line| line.contains(&needle))
            .count()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn create_key(url: &str) -> String {
    let config = aws_sdk_kms::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(url)
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .build();
    let client = aws_sdk_kms::Client::from_conf(config);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let out = runtime
        .block_on(
            client
                .create_key()
                .description("phi cold start bench")
                .send(),
        )
        .expect("CreateKey");
    out.key_metadata().expect("metadata").key_id().to_owned()
}

fn kek(url: &str, key: &str, concurrency: usize) -> AwsKmsKek {
    AwsKmsKek::builder(key)
        .region(REGION)
        .endpoint_url(url)
        .static_credentials("test", "test")
        .operation_timeout(Duration::from_secs(60))
        .attempt_timeout(Duration::from_secs(30))
        .max_concurrent_requests(concurrency)
        .build()
        .expect("AwsKmsKek builds")
}

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|v| {
            v.trim()
                .replace('_', "")
                .parse()
                .unwrap_or_else(|_| panic!("{name}: numbers"))
        })
        .collect()
}

fn main() {
    let owners_n = env_list("PHI_COLD_OWNERS", "10000")[0].max(1);
    let levels = env_list("PHI_COLD_CONCURRENCY", "1,4,16,64");
    let default_concurrency = 16;
    let moto = Moto::start();
    let url = moto.url();
    let key = create_key(&url);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keys.db");
    let store: Arc<dyn KeyStore> = Arc::new(
        DieselKeyStore::<diesel::SqliteConnection>::builder(path.to_str().expect("UTF-8 path"))
            .run_migrations(true)
            .connect()
            .expect("key store"),
    );
    let owners: Vec<String> = (0..owners_n)
        .map(|i| format!("cold-owner-{i:05}"))
        .collect();

    let creator = Arc::new(kek(&url, &key, default_concurrency));
    let keyring = Keyring::builder(Arc::clone(&store), Arc::clone(&creator))
        .build()
        .expect("keyring");
    moto.record();
    let start = Instant::now();
    for chunk in owners.chunks(1_000) {
        keyring
            .keys_for_seal_many(chunk.iter().map(String::as_str))
            .expect("keys created");
    }
    let created = start.elapsed();
    let created_server = moto.recorded("GenerateDataKey");
    let created_phi = creator.stats().generate_data_key;

    println!(
        "## Cold start, {} ({owners_n} owners, moto {}, {} cores)",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        Command::new("python3")
            .args(["-c", "import moto; print(moto.__version__)"])
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map_or_else(|| "?".into(), |v| v.trim().to_owned()),
        std::thread::available_parallelism().map_or(0, usize::from),
    );
    println!();
    println!(
        "Creating the data keys (`keys_for_seal_many`, 1,000 owners a call, concurrency {default_concurrency}): {:.2} s, {:.0} owners/s; GenerateDataKey: phi {created_phi}, moto {created_server}",
        created.as_secs_f64(),
        owners_n as f64 / created.as_secs_f64()
    );
    println!();
    println!(
        "| concurrency | time | owners/s | Decrypt, phi's count | Decrypt, moto's count | failures |"
    );
    println!("|---|---|---|---|---|---|");
    for &c in &levels {
        let kek = Arc::new(kek(&url, &key, c));
        let keyring = Keyring::builder(Arc::clone(&store), Arc::clone(&kek))
            .build()
            .expect("keyring");
        moto.record();
        let start = Instant::now();
        let keys = keyring
            .keys_for_open_many(owners.iter().map(String::as_str))
            .expect("cold resolve");
        let elapsed = start.elapsed();
        assert_eq!(keys.len(), owners_n, "every owner resolved");
        let server = moto.recorded("Decrypt");
        let stats = kek.stats();
        println!(
            "| {c}{} | {:.2} s | {:.0} | {} | {server} | {} |",
            if c == default_concurrency {
                " (default)"
            } else {
                ""
            },
            elapsed.as_secs_f64(),
            owners_n as f64 / elapsed.as_secs_f64(),
            stats.decrypt,
            stats.failures,
        );
    }
    println!();
}
