//! `AwsKmsKek` against a real KMS-compatible server (moto).
//!
//! The shared server is named by `PHI_TEST_KMS_URL` (default
//! `http://127.0.0.1:4566`; `.ci/run` starts it). The tests that count
//! server-side requests or stop the server start servers of their own
//! (`python3 -m moto.server`) on free ports. A missing server or moto
//! fails the tests: they are never skipped.
#![cfg(all(feature = "aws-kms", feature = "sqlite"))]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use diesel::prelude::*;
use phi::{
    AwsKmsError, AwsKmsErrorKind, AwsKmsKek, DieselKeyStore, Encrypted, Error, KeyBytes,
    KeyEncryptionKey, KeyStore, Keyring, MemoryKeyStore, StoredKey,
};

const REGION: &str = "us-east-1";

fn shared_kms_url() -> String {
    let url = std::env::var("PHI_TEST_KMS_URL").unwrap_or_else(|_| "http://127.0.0.1:4566".into());
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    if TcpStream::connect(addr).is_err() {
        panic!(
            "no KMS-compatible server at {url} (PHI_TEST_KMS_URL): start one with \
             `moto_server -H 127.0.0.1 -p 4566` (pip install \"moto[server]\"), as .ci/run does"
        );
    }
    url
}

/// Creates keys and aliases, as an operator would.
struct Admin {
    runtime: tokio::runtime::Runtime,
    client: aws_sdk_kms::Client,
}

impl Admin {
    fn new(url: &str) -> Admin {
        let config = aws_sdk_kms::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(url)
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .build();
        Admin {
            runtime: tokio::runtime::Runtime::new().expect("runtime"),
            client: aws_sdk_kms::Client::from_conf(config),
        }
    }

    /// A new symmetric key; returns its key id.
    fn create_key(&self) -> String {
        let out = self
            .runtime
            .block_on(self.client.create_key().description("phi test").send())
            .expect("CreateKey");
        out.key_metadata().expect("metadata").key_id().to_owned()
    }

    fn create_alias(&self, alias: &str, key_id: &str) {
        self.runtime
            .block_on(
                self.client
                    .create_alias()
                    .alias_name(alias)
                    .target_key_id(key_id)
                    .send(),
            )
            .expect("CreateAlias");
    }

    fn update_alias(&self, alias: &str, key_id: &str) {
        self.runtime
            .block_on(
                self.client
                    .update_alias()
                    .alias_name(alias)
                    .target_key_id(key_id)
                    .send(),
            )
            .expect("UpdateAlias");
    }

    /// Decrypts a KEK check value as any KMS client would.
    fn decrypt_check(&self, key_id: &str, blob: &[u8], kek_id: &str) -> Vec<u8> {
        let out = self
            .runtime
            .block_on(
                self.client
                    .decrypt()
                    .key_id(key_id)
                    .ciphertext_blob(aws_sdk_kms::primitives::Blob::new(blob))
                    .encryption_context("phi:kek-check", kek_id)
                    .send(),
            )
            .expect("Decrypt with the documented check context");
        out.plaintext().expect("plaintext").as_ref().to_vec()
    }

    fn disable_key(&self, key_id: &str) {
        self.runtime
            .block_on(self.client.disable_key().key_id(key_id).send())
            .expect("DisableKey");
    }

    /// Decrypts as any KMS client would, with the documented context.
    fn decrypt(&self, key_id: &str, wrapped: &[u8], owner: &str, version: &str) -> Vec<u8> {
        let out = self
            .runtime
            .block_on(
                self.client
                    .decrypt()
                    .key_id(key_id)
                    .ciphertext_blob(aws_sdk_kms::primitives::Blob::new(wrapped))
                    .encryption_context("phi:owner", owner)
                    .encryption_context("phi:dek_version", version)
                    .send(),
            )
            .expect("Decrypt with the documented encryption context");
        out.plaintext().expect("plaintext").as_ref().to_vec()
    }
}

fn kek(url: &str, key: &str) -> AwsKmsKek {
    kek_builder(url, key).build().expect("AwsKmsKek builds")
}

/// The tests' KEK configuration: short timeouts, one retry.
fn kek_builder(url: &str, key: &str) -> phi::AwsKmsKekBuilder {
    AwsKmsKek::builder(key)
        .region(REGION)
        .endpoint_url(url)
        .static_credentials("test", "test")
        .connect_timeout(Duration::from_millis(500))
        .attempt_timeout(Duration::from_secs(1))
        .operation_timeout(Duration::from_secs(2))
        .max_attempts(2)
}

fn unique_alias(tag: &str) -> String {
    format!("alias/{}", common::unique_owner(tag))
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn kms_error(error: &Error) -> &AwsKmsError {
    let kms = match error {
        Error::Kek { source, .. } => source
            .downcast_ref::<AwsKmsError>()
            .expect("an AwsKmsError"),
        other => panic!("expected Error::Kek, got {other:?}"),
    };
    // The same kind without downcasting, and a classification from it.
    assert_eq!(error.kms_error_kind(), Some(kms.kind()));
    let expected = match kms.kind() {
        AwsKmsErrorKind::KeyDisabled
        | AwsKmsErrorKind::KeyState
        | AwsKmsErrorKind::AccessDenied
        | AwsKmsErrorKind::KeyNotFound => phi::ErrorKind::Config,
        AwsKmsErrorKind::InvalidCiphertext => phi::ErrorKind::Tampered,
        _ => phi::ErrorKind::Unavailable,
    };
    assert_eq!(error.kind(), expected, "{error:?}");
    assert_eq!(
        error.is_retryable(),
        matches!(
            kms.kind(),
            AwsKmsErrorKind::Unreachable | AwsKmsErrorKind::Throttled
        )
    );
    kms
}

#[test]
fn generate_and_decrypt_follow_the_stored_contract() {
    let url = shared_kms_url();
    let admin = Admin::new(&url);
    let key_id = admin.create_key();
    let kek = kek(&url, &key_id);
    assert_eq!(kek.id(), format!("aws-kms:{key_id}"));
    let owner = common::unique_owner("contract");

    let (key, wrapped) = kek.generate(&owner, 7).expect("GenerateDataKey");
    // The stored form is the CiphertextBlob: any KMS client opens it with
    // the documented encryption context.
    assert_eq!(
        admin.decrypt(&key_id, &wrapped, &owner, "7"),
        key.expose().to_vec()
    );
    assert_eq!(
        kek.unwrap(&owner, 7, &wrapped).expect("Decrypt").expose(),
        key.expose()
    );

    // Wrapping an existing key (a rewrap under KMS) uses Encrypt, same context.
    let existing = KeyBytes::new([42; 32]);
    let rewrapped = kek.wrap(&owner, 3, &existing).expect("Encrypt");
    assert_eq!(
        admin.decrypt(&key_id, &rewrapped, &owner, "3"),
        vec![42; 32]
    );
    assert_eq!(
        kek.unwrap(&owner, 3, &rewrapped).expect("Decrypt").expose(),
        &[42; 32]
    );

    let stats = kek.stats();
    assert_eq!(
        (
            stats.generate_data_key,
            stats.decrypt,
            stats.encrypt,
            stats.failures
        ),
        (1, 2, 1, 0)
    );
    let shown = format!("{kek:?}");
    assert!(
        shown.contains(&key_id) && !shown.contains("\"test\""),
        "{shown}"
    );
}

#[test]
fn a_wrapped_key_does_not_open_for_another_owner_or_version() {
    let url = shared_kms_url();
    let key_id = Admin::new(&url).create_key();
    let kek = Arc::new(kek(&url, &key_id));
    let owner = common::unique_owner("ctx");
    let (_, wrapped) = kek.generate(&owner, 1).expect("generate");

    for (who, version) in [("someone-else", 1), (owner.as_str(), 2)] {
        let err = kek
            .unwrap(who, version, &wrapped)
            .expect_err("wrong context");
        let err = err.downcast_ref::<AwsKmsError>().expect("AwsKmsError");
        assert_eq!(err.kind(), AwsKmsErrorKind::InvalidCiphertext, "{err}");
    }

    // Through the keyring: a row copied to another owner names that owner,
    // the KEK and the KMS key.
    let store = Arc::new(MemoryKeyStore::new());
    let keyring = Keyring::builder(store.clone(), kek.clone())
        .build()
        .expect("keyring");
    let thief = common::unique_owner("thief");
    store
        .insert_key_if_absent(&StoredKey::active(
            thief.clone(),
            1,
            kek.id().to_owned(),
            wrapped,
        ))
        .expect("insert");
    let err = keyring.keys_for_open(&thief).expect_err("copied key");
    let text = chain(&err);
    assert!(text.contains(&thief) && text.contains(&key_id), "{text}");
    assert!(text.contains("wrong encryption context"), "{text}");
    assert_eq!(kms_error(&err).kind(), AwsKmsErrorKind::InvalidCiphertext);
}

#[test]
fn a_key_addressed_by_alias_seals_and_opens_through_a_keyring() {
    let url = shared_kms_url();
    let admin = Admin::new(&url);
    let key_id = admin.create_key();
    let alias = unique_alias("phi-alias");
    admin.create_alias(&alias, &key_id);
    let kek = Arc::new(kek(&url, &alias));
    assert_eq!(kek.id(), format!("aws-kms:{alias}"));

    let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), kek.clone())
        .build()
        .expect("keyring");
    let owner = common::unique_owner("alias");
    let sealed = keyring
        .seal(&"Doe".to_string(), &owner, "cases.patient_last", b"C-1")
        .expect("seal");
    let rows = keyring.store().load_keys(&[&owner]).expect("rows");
    assert_eq!(rows[0].kek_id, format!("aws-kms:{alias}"));
    // The key behind the alias opens it with the documented context.
    assert_eq!(
        admin
            .decrypt(&key_id, &rows[0].wrapped_key, &owner, "1")
            .len(),
        32
    );

    keyring.clear_all();
    let name: String = keyring
        .open(sealed, &owner, "cases.patient_last", b"C-1")
        .expect("open");
    assert_eq!(name, "Doe");
    assert_eq!((kek.stats().generate_data_key, kek.stats().decrypt), (1, 1));
}

#[test]
fn access_denied_names_the_owner_and_the_key() {
    // The data key was wrapped under key A; a KEK configured for key B asks
    // to decrypt it with KeyId B: moto, like KMS, refuses.
    let url = shared_kms_url();
    let admin = Admin::new(&url);
    let (a, b) = (admin.create_key(), admin.create_key());
    let owner = common::unique_owner("denied");
    let (_, wrapped) = kek(&url, &a).generate(&owner, 1).expect("generate");
    let other = Arc::new(kek(&url, &b));
    let store = Arc::new(MemoryKeyStore::new());
    let keyring = Keyring::builder(store.clone(), other.clone())
        .build()
        .expect("keyring");
    store
        .insert_key_if_absent(&StoredKey::active(
            owner.clone(),
            1,
            other.id().to_owned(),
            wrapped,
        ))
        .expect("insert");
    let err = keyring.keys_for_open(&owner).expect_err("denied");
    let text = chain(&err);
    assert!(
        text.contains(&owner) && text.contains(&b) && text.contains("access denied"),
        "{text}"
    );
    assert_eq!(kms_error(&err).kind(), AwsKmsErrorKind::AccessDenied);
}

/// A stand-in KMS endpoint giving every request the same answer after a
/// delay, each connection on a thread of its own; it records how many
/// requests it served and how many it held at once. For answers moto does
/// not give (moto ignores a key's Disabled state) and for a KMS with
/// latency. The KEK check value's calls (encryption context
/// `phi:kek-check`) are answered as a working KMS would, at once and
/// uncounted, so keyrings build.
struct StubKms {
    url: String,
    requests: Arc<AtomicUsize>,
    most_in_flight: Arc<AtomicUsize>,
}

impl StubKms {
    fn start(status: &'static str, answer: String, delay: Duration) -> StubKms {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let requests = Arc::new(AtomicUsize::new(0));
        let most_in_flight = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (count, most) = (requests.clone(), most_in_flight.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (answer, count, most, in_flight) = (
                    answer.clone(),
                    count.clone(),
                    most.clone(),
                    in_flight.clone(),
                );
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream);
                    let mut length = 0usize;
                    let mut target = String::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                            break;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(value) = lower.strip_prefix("content-length:") {
                            length = value.trim().parse().unwrap_or(0);
                        }
                        if let Some(value) = lower.strip_prefix("x-amz-target:") {
                            target = value.trim().to_owned();
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    if String::from_utf8_lossy(&body).contains("phi:kek-check") {
                        let canary = if target.ends_with(".decrypt") {
                            format!(
                                r#"{{"KeyId":"stub","Plaintext":"{}"}}"#,
                                base64(phi::CHECK_CANARY)
                            )
                        } else {
                            format!(
                                r#"{{"KeyId":"stub","CiphertextBlob":"{}"}}"#,
                                base64(b"stub canary")
                            )
                        };
                        let _ = write!(
                            reader.get_mut(),
                            "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\n\
                             x-amzn-RequestId: stub\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{canary}",
                            canary.len()
                        );
                        return;
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(delay);
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    let _ = write!(
                        reader.get_mut(),
                        "HTTP/1.1 {status}\r\nContent-Type: application/x-amz-json-1.1\r\n\
                         x-amzn-RequestId: stub\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                        answer.len()
                    );
                });
            }
        });
        StubKms {
            url,
            requests,
            most_in_flight,
        }
    }

    /// Answers every request with the KMS error `error_type`.
    fn error(error_type: &str, message: &str) -> StubKms {
        let answer = format!(r#"{{"__type":"{error_type}","message":"{message}"}}"#);
        StubKms::start("400 Bad Request", answer, Duration::ZERO)
    }
}

#[test]
fn a_disabled_key_gives_a_clear_error_naming_owner_and_key() {
    // moto records DisableKey but keeps serving the key, so the KMS answer
    // for a disabled key comes from a stub endpoint speaking KMS's protocol.
    let url = shared_kms_url();
    let admin = Admin::new(&url);
    let key_id = admin.create_key();
    admin.disable_key(&key_id);

    let stub = StubKms::error("DisabledException", "The key is disabled.");
    let kek = Arc::new(kek(&stub.url, &key_id));
    let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), kek.clone())
        .build()
        .expect("keyring");
    let owner = common::unique_owner("disabled");
    let err = keyring
        .seal(&"Doe".to_string(), &owner, "cases.patient_last", b"C-1")
        .expect_err("disabled");
    let text = chain(&err);
    assert!(text.contains(&owner), "{text}");
    assert!(text.contains(&key_id), "{text}");
    assert!(
        text.contains("GenerateDataKey") && text.contains("the KMS key is disabled"),
        "{text}"
    );
    assert_eq!(kms_error(&err).kind(), AwsKmsErrorKind::KeyDisabled);
    eprintln!("disabled key: {text}");
    assert!(
        keyring
            .store()
            .load_keys(&[&owner])
            .expect("rows")
            .is_empty(),
        "no key row without a key"
    );

    let err = kek.unwrap(&owner, 1, b"whatever").expect_err("disabled");
    assert_eq!(
        err.downcast_ref::<AwsKmsError>()
            .expect("AwsKmsError")
            .kind(),
        AwsKmsErrorKind::KeyDisabled
    );
}

#[test]
fn a_batch_of_unwraps_runs_concurrently_within_the_bound() {
    // A KMS that takes 100 ms per Decrypt: 40 owners one after another
    // would take 4 s.
    let answer = r#"{"KeyId":"arn:aws:kms:us-east-1:123456789012:key/stub","Plaintext":"%KEY%","EncryptionAlgorithm":"SYMMETRIC_DEFAULT"}"#
        .replace("%KEY%", "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=");
    let stub = StubKms::start("200 OK", answer, Duration::from_millis(100));
    let kek = Arc::new(
        kek_builder(&stub.url, "alias/stub")
            .max_concurrent_requests(8)
            .build()
            .expect("kek"),
    );
    let store = Arc::new(MemoryKeyStore::new());
    let keyring = Keyring::builder(store.clone(), kek.clone())
        .build()
        .expect("keyring");
    let owners: Vec<String> = (0..40).map(|i| format!("provider-{i:02}")).collect();
    for owner in &owners {
        store
            .insert_key_if_absent(&StoredKey::active(
                owner.clone(),
                1,
                kek.id().to_owned(),
                b"ciphertext blob".to_vec(),
            ))
            .expect("insert");
    }
    let started = Instant::now();
    let keys = keyring
        .keys_for_open_many(owners.iter().map(String::as_str))
        .expect("keys");
    let took = started.elapsed();
    assert_eq!(keys.len(), 40);
    assert_eq!(kek.stats().decrypt, 40);
    assert_eq!(stub.requests.load(Ordering::SeqCst), 40);
    let most = stub.most_in_flight.load(Ordering::SeqCst);
    assert!(
        (2..=8).contains(&most),
        "{most} requests in flight at once, expected 2..=8"
    );
    assert!(
        took < Duration::from_secs(2),
        "40 unwraps at 100 ms each took {took:?}"
    );
    eprintln!("40 Decrypts of 100 ms each, at most 8 at once: {took:?} ({most} in flight at most)");
}

/// A metrics recorder keeping, per `name{label=value,...}`, counter totals
/// and the number of histogram samples.
#[derive(Debug)]
struct Recorded(Mutex<BTreeMap<String, u64>>);

static RECORDED: Recorded = Recorded(Mutex::new(BTreeMap::new()));

impl Recorded {
    fn get(&self, key: &str) -> u64 {
        self.0.lock().expect("lock").get(key).copied().unwrap_or(0)
    }
    fn add(&self, key: &str, n: u64) {
        *self
            .0
            .lock()
            .expect("lock")
            .entry(key.to_owned())
            .or_default() += n;
    }
}

struct Series(String);

impl metrics::CounterFn for Series {
    fn increment(&self, value: u64) {
        RECORDED.add(&self.0, value);
    }
    fn absolute(&self, value: u64) {
        RECORDED
            .0
            .lock()
            .expect("lock")
            .insert(self.0.clone(), value);
    }
}

impl metrics::HistogramFn for Series {
    fn record(&self, _: f64) {
        RECORDED.add(&self.0, 1);
    }
}

struct TestRecorder;

fn series(key: &metrics::Key) -> Arc<Series> {
    let labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    Arc::new(Series(format!("{}{{{}}}", key.name(), labels.join(","))))
}

impl metrics::Recorder for TestRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::from_arc(series(key))
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::from_arc(series(key))
    }
}

#[test]
fn kms_calls_are_recorded_as_metrics_and_retries_are_bounded() {
    // The only test installing a recorder; others' calls may be recorded too.
    metrics::set_global_recorder(TestRecorder).expect("the only recorder");
    let stub = StubKms::error("ThrottlingException", "Rate exceeded");
    let throttled = kek(&stub.url, "alias/stub");
    let err = throttled
        .unwrap("provider-throttled", 1, b"blob")
        .expect_err("throttled");
    let err = err.downcast_ref::<AwsKmsError>().expect("AwsKmsError");
    assert_eq!(err.kind(), AwsKmsErrorKind::Throttled, "{err}");
    assert_eq!(
        stub.requests.load(Ordering::SeqCst),
        2,
        "max_attempts(2): one retry"
    );
    assert_eq!(throttled.stats().decrypt, 1, "a retried call counts once");
    assert_eq!(
        RECORDED.get("phi_kms_calls_total{operation=decrypt,outcome=throttled}"),
        1
    );
    assert!(RECORDED.get("phi_kms_call_duration_seconds{operation=decrypt}") >= 1);

    let url = shared_kms_url();
    let kek = kek(&url, &Admin::new(&url).create_key());
    kek.generate("provider-metrics", 1).expect("generate");
    assert!(RECORDED.get("phi_kms_calls_total{operation=generate_data_key,outcome=success}") >= 1);
}

#[test]
fn works_from_plain_threads_a_runtime_worker_and_spawn_blocking() {
    let url = shared_kms_url();
    let key_id = Admin::new(&url).create_key();
    let kek = Arc::new(kek(&url, &key_id));
    let owner = common::unique_owner("modes");
    let (key, wrapped) = kek.generate(&owner, 1).expect("plain thread");
    let expected = *key.expose();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // Directly on a worker thread of the caller's runtime.
    let (k, w, o) = (kek.clone(), wrapped.clone(), owner.clone());
    let on_worker = runtime.block_on(async move {
        tokio::spawn(async move { *k.unwrap(&o, 1, &w).expect("on a worker").expose() })
            .await
            .expect("task")
    });
    assert_eq!(on_worker, expected);
    // Inside block_on itself (a runtime context on this thread).
    let (k, w, o) = (kek.clone(), wrapped.clone(), owner.clone());
    let in_block_on =
        runtime.block_on(async move { *k.unwrap(&o, 1, &w).expect("in block_on").expose() });
    assert_eq!(in_block_on, expected);
    // From spawn_blocking, many at once.
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (k, w, o) = (kek.clone(), wrapped.clone(), owner.clone());
            runtime.spawn_blocking(move || *k.unwrap(&o, 1, &w).expect("spawn_blocking").expose())
        })
        .collect();
    for handle in handles {
        assert_eq!(runtime.block_on(handle).expect("join"), expected);
    }
    // The KEK may be dropped inside an async context.
    runtime.block_on(async move { drop(kek) });
}

/// A `moto_server` process of a test's own, with a request recorder.
struct Moto {
    port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl Moto {
    fn start() -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        Moto::start_on(port, tempfile::tempdir().expect("tempdir"))
    }

    fn start_on(port: u16, dir: tempfile::TempDir) -> Moto {
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
            .unwrap_or_else(|e| {
                panic!("cannot start moto_server (pip install \"moto[server]\"): {e}")
            });
        let mut moto = Moto { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while moto.try_http("GET", "/moto-api/").is_none() {
            if let Ok(Some(status)) = moto.child.try_wait() {
                panic!(
                    "moto_server exited ({status}) on port {port}: pip install \"moto[server]\""
                );
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer on port {port}"
            );
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
            .set_read_timeout(Some(Duration::from_secs(10)))
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

    /// Requests of the KMS operation `op` the server received since `record`.
    fn recorded(&self, op: &str) -> usize {
        let needle = format!("\"TrentService.{op}\"");
        self.http("GET", "/moto-api/recorder/download-recording")
            .lines()
            .filter(|line| line.contains(&needle))
            .count()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Kills the server (its keys are lost), runs `during` while it is
    /// down, then starts a fresh, empty one on the same port.
    fn restart_after(mut self, during: impl FnOnce()) -> Moto {
        let _ = self.child.kill();
        let _ = self.child.wait();
        during();
        let port = self.port;
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        drop(self);
        Moto::start_on(port, dir)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

mod schema {
    diesel::table! {
        phi_kms_cases (id) {
            id -> Text,
            owner_id -> Text,
            patient_last -> Binary,
        }
    }
}
use schema::phi_kms_cases;

#[derive(Insertable, Queryable, Selectable)]
#[diesel(table_name = phi_kms_cases)]
struct CaseRow {
    id: String,
    owner_id: String,
    patient_last: Encrypted<String>,
}

const SCOPE: &str = "phi_kms_cases.patient_last";

/// The application's connection: it waits for the keyring's own writes
/// (unwrap audit records are written from a thread of its own).
fn app_conn(db: &str) -> SqliteConnection {
    let mut conn = SqliteConnection::establish(db).expect("sqlite");
    diesel::sql_query("PRAGMA busy_timeout = 10000")
        .execute(&mut conn)
        .expect("busy timeout");
    conn
}

/// A SQLite database with phi's key tables and a cases table.
fn sqlite_db() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = dir.path().join("kms.db").display().to_string();
    let mut conn = SqliteConnection::establish(&url).expect("sqlite");
    phi::migrations::run_pending(&mut conn).expect("migrations");
    diesel::sql_query(
        "CREATE TABLE phi_kms_cases (id TEXT NOT NULL PRIMARY KEY, owner_id TEXT NOT NULL, patient_last BLOB NOT NULL)",
    )
    .execute(&mut conn)
    .expect("cases table");
    (dir, url)
}

fn keyring(url: &str, kek: Arc<AwsKmsKek>) -> Keyring {
    let store = Arc::new(
        DieselKeyStore::<SqliteConnection>::builder(url)
            .run_migrations(true)
            .connect()
            .expect("key store"),
    );
    Keyring::builder(store, kek).build().expect("keyring")
}

/// Loads every case and opens it: one batch resolution of the rows' owners.
fn open_all(conn: &mut SqliteConnection, keyring: &Keyring) -> usize {
    let rows: Vec<CaseRow> = phi_kms_cases::table
        .select(CaseRow::as_select())
        .load(conn)
        .expect("load");
    let keys = keyring
        .keys_for_open_many(rows.iter().map(|r| r.owner_id.as_str()))
        .expect("keys");
    for row in &rows {
        let name: String = keys[&row.owner_id]
            .open(row.patient_last.clone(), SCOPE, row.id.as_bytes())
            .expect("open");
        assert_eq!(name, format!("Patient {}", row.id));
    }
    rows.len()
}

#[test]
fn a_thousand_rows_of_a_hundred_owners_load_cold_with_exactly_100_decrypts() {
    let moto = Moto::start();
    let url = moto.url();
    let admin = Admin::new(&url);
    let key_id = admin.create_key();
    let (_dir, db) = sqlite_db();
    let mut conn = app_conn(&db);

    // Seal 1,000 values for 100 owners (10 each) and store them.
    let writer = keyring(&db, Arc::new(kek(&url, &key_id)));
    let owners: Vec<String> = (0..100).map(|i| format!("provider-{i:03}")).collect();
    let keys = writer
        .keys_for_seal_many(owners.iter().map(String::as_str))
        .expect("seal keys");
    let rows: Vec<CaseRow> = (0..1000)
        .map(|i| {
            let owner = &owners[i % 100];
            let id = format!("C-{i:04}");
            let patient_last = keys[owner]
                .seal(&format!("Patient {id}"), SCOPE, id.as_bytes())
                .expect("seal");
            CaseRow {
                id,
                owner_id: owner.clone(),
                patient_last,
            }
        })
        .collect();
    diesel::insert_into(phi_kms_cases::table)
        .values(&rows)
        .execute(&mut conn)
        .expect("insert");

    // A fresh keyring and KEK: a cold cache, as after a restart. Building it
    // checks the KEK: one Decrypt of the check value.
    let kek = Arc::new(kek(&url, &key_id));
    let reader = keyring(&db, kek.clone());
    assert_eq!(kek.stats().decrypt, 1, "the build's check");
    moto.record();
    let started = Instant::now();
    assert_eq!(open_all(&mut conn, &reader), 1000);
    let cold = started.elapsed();
    assert_eq!(kek.stats().decrypt, 101, "one Decrypt per owner");
    assert_eq!(
        moto.recorded("Decrypt"),
        100,
        "the server received exactly 100 Decrypt calls"
    );
    assert_eq!(reader.stats().store_queries, 1, "one key query");
    reader.flush_audit().expect("unwrap audit records written");
    assert_eq!(
        reader.stats().audit_written,
        100,
        "one unwrap record per owner, written in the background"
    );

    // Again within the TTL: no KMS call at all.
    let started = Instant::now();
    assert_eq!(open_all(&mut conn, &reader), 1000);
    let warm = started.elapsed();
    assert_eq!(kek.stats().decrypt, 101, "no Decrypt within the TTL");
    assert_eq!(moto.recorded("Decrypt"), 100);
    assert_eq!(moto.recorded("GenerateDataKey"), 0);
    eprintln!("1,000 rows of 100 owners: cold {cold:?} (100 Decrypt), warm {warm:?} (0 Decrypt)");
}

/// Seals a case for `owner` and inserts it: the application's write path.
fn write_case(
    conn: &mut SqliteConnection,
    keyring: &Keyring,
    owner: &str,
    id: &str,
) -> phi::Result<()> {
    let patient_last = keyring.seal(&format!("Patient {id}"), owner, SCOPE, id.as_bytes())?;
    diesel::insert_into(phi_kms_cases::table)
        .values(&CaseRow {
            id: id.to_owned(),
            owner_id: owner.to_owned(),
            patient_last,
        })
        .execute(conn)
        .expect("insert");
    Ok(())
}

fn read_case(conn: &mut SqliteConnection, keyring: &Keyring, id: &str) -> phi::Result<String> {
    let row: CaseRow = phi_kms_cases::table
        .find(id)
        .select(CaseRow::as_select())
        .first(conn)
        .expect("row");
    keyring.open(row.patient_last, &row.owner_id, SCOPE, row.id.as_bytes())
}

fn stored_rows(conn: &mut SqliteConnection, owner: &str) -> (i64, i64) {
    use phi::schema::user_encryption_keys;
    let keys = user_encryption_keys::table
        .filter(user_encryption_keys::owner_id.eq(owner))
        .count()
        .get_result(conn)
        .expect("count keys");
    let cases = phi_kms_cases::table
        .filter(phi_kms_cases::owner_id.eq(owner))
        .count()
        .get_result(conn)
        .expect("count cases");
    (keys, cases)
}

/// While the KMS is unreachable, asserts that resolving `owner` for a
/// write fails fast with an error naming the owner and the key, and that
/// nothing was written.
fn assert_write_fails_fast(
    conn: &mut SqliteConnection,
    keyring: &Keyring,
    owner: &str,
    alias: &str,
) -> Duration {
    let started = Instant::now();
    let err = write_case(conn, keyring, owner, &format!("{owner}-1")).expect_err("KMS unreachable");
    let took = started.elapsed();
    let text = chain(&err);
    assert!(text.contains(owner) && text.contains(alias), "{text}");
    assert!(text.contains("unreachable"), "{text}");
    assert_eq!(kms_error(&err).kind(), AwsKmsErrorKind::Unreachable);
    assert!(
        took < Duration::from_secs(6),
        "failed after {took:?}, expected a fast failure"
    );
    eprintln!("KMS unreachable: {text}");
    assert_eq!(
        stored_rows(conn, owner),
        (0, 0),
        "no key row and no plaintext row"
    );
    took
}

#[test]
fn kms_outage_cached_owners_keep_working_others_fail_fast_and_work_resumes() {
    let moto = Moto::start();
    let url = moto.url();
    let alias = unique_alias("phi-outage");
    let admin = Admin::new(&url);
    admin.create_alias(&alias, &admin.create_key());
    let (_dir, db) = sqlite_db();
    let mut conn = app_conn(&db);
    let kek = Arc::new(kek(&url, &alias));
    let keyring = keyring(&db, kek.clone());

    let cached = "provider-cached";
    write_case(&mut conn, &keyring, cached, "A-1").expect("write before the outage");
    let uncached = "provider-uncached";
    write_case(&mut conn, &keyring, uncached, "U-1").expect("write before the outage");
    keyring.clear(uncached);

    // 1. The server stops answering (SIGSTOP: connections hang, state kept).
    moto.signal("-STOP");
    write_case(&mut conn, &keyring, cached, "A-2").expect("a cached owner keeps sealing");
    assert_eq!(
        read_case(&mut conn, &keyring, "A-1").expect("and opening"),
        "Patient A-1"
    );
    let new_owner = "provider-new";
    let took = assert_write_fails_fast(&mut conn, &keyring, new_owner, &alias);
    let started = Instant::now();
    let err = read_case(&mut conn, &keyring, "U-1").expect_err("an uncached owner cannot open");
    let took_open = started.elapsed();
    assert!(err.to_string().contains(uncached), "{err}");
    assert!(took_open < Duration::from_secs(6), "{took_open:?}");
    eprintln!(
        "KMS stopped: a new owner's write failed after {took:?}, an uncached owner's read after {took_open:?}"
    );

    // The server answers again: the same keyring resumes, failures were not cached.
    moto.signal("-CONT");
    write_case(&mut conn, &keyring, new_owner, "N-1").expect("the new owner writes");
    assert_eq!(
        read_case(&mut conn, &keyring, "U-1").expect("opens again"),
        "Patient U-1"
    );
    assert_eq!(
        read_case(&mut conn, &keyring, "N-1").expect("opens"),
        "Patient N-1"
    );

    // 2. The server dies (connections refused) and comes back empty: the
    // operator recreates the key under the same alias.
    let moto = moto.restart_after(|| {
        let took = assert_write_fails_fast(&mut conn, &keyring, "provider-during-restart", &alias);
        eprintln!("KMS down: a new owner's write failed after {took:?}");
    });
    let admin = Admin::new(&moto.url());
    admin.create_alias(&alias, &admin.create_key());
    write_case(&mut conn, &keyring, "provider-after", "P-1")
        .expect("a new owner works after the restart");
    keyring.clear("provider-after");
    assert_eq!(
        read_case(&mut conn, &keyring, "P-1").expect("opens"),
        "Patient P-1"
    );
    assert_eq!(
        read_case(&mut conn, &keyring, "A-1").expect("still cached"),
        "Patient A-1"
    );
}

/// The `phi` CLI against the KMS: rewrap every data key from a local master
/// key to a KMS key, then administer keys with the KMS key alone.
#[test]
fn the_cli_rewraps_local_keys_to_the_kms_and_then_works_with_it_alone() {
    let url = shared_kms_url();
    let admin = Admin::new(&url);
    let alias = unique_alias("cli");
    admin.create_alias(&alias, &admin.create_key());
    let (dir, db) = sqlite_db();
    let mut conn = app_conn(&db);
    let local = Keyring::builder(
        Arc::new(
            DieselKeyStore::<SqliteConnection>::builder(&db)
                .run_migrations(true)
                .connect()
                .expect("store"),
        ),
        common::local_kek(),
    )
    .build()
    .expect("keyring");
    let owners = ["dr-a", "dr-b", "dr-c"];
    for (i, owner) in owners.iter().enumerate() {
        let id = format!("{i}");
        let row = CaseRow {
            patient_last: local
                .seal(&format!("Patient {id}"), owner, SCOPE, id.as_bytes())
                .expect("seal"),
            id,
            owner_id: (*owner).to_owned(),
        };
        diesel::insert_into(phi_kms_cases::table)
            .values(&row)
            .execute(&mut conn)
            .expect("insert");
    }
    let phi = |args: &[&str], local_key: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_phi"));
        command
            .args(args)
            .env("DATABASE_URL", &db)
            .env("PHI_TABLES", "phi_kms_cases:owner_id:id:patient_last")
            .env("PHI_KEK_ID", "local-test")
            .env("AWS_REGION", REGION)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_ENDPOINT_URL", &url)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("PHI_KEK")
            .env_remove("PHI_MASTER_KEY_FILE")
            .current_dir(dir.path())
            .stdin(Stdio::null());
        if local_key {
            command.env("PHI_MASTER_KEY", common::MASTER_KEY_B64);
        } else {
            command.env_remove("PHI_MASTER_KEY");
        }
        let out = command.output().expect("phi runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !text.contains("Patient ") && !text.contains(common::MASTER_KEY_B64),
            "{text}"
        );
        (out.status.success(), text)
    };

    let target = format!("aws-kms:{alias}");
    let (ok, out) = phi(&["keys", "rewrap", "--to", &target], true);
    assert!(
        ok && out.contains(&format!("Rewrapped 3 of 3 data key(s) under KEK {target}")),
        "{out}"
    );
    let kek_ids: Vec<String> = phi::schema::user_encryption_keys::table
        .select(phi::schema::user_encryption_keys::kek_id)
        .load(&mut conn)
        .expect("key rows");
    assert_eq!(kek_ids, vec![target.clone(); 3]);

    // From now on the KMS key alone: no local master key in the environment.
    let (ok, out) = phi(
        &["--kek", &target, "keys", "rotate", "--owner", "dr-a"],
        false,
    );
    assert!(ok, "{out}");
    let (ok, out) = phi(
        &["--kek", &target, "keys", "status", "--owner", "dr-a"],
        false,
    );
    assert!(ok && out.contains(&target), "{out}");
    // What the CLI did opens through a keyring with only the KMS key.
    let kms_only = keyring(&db, Arc::new(kek(&url, &alias)));
    assert_eq!(open_all(&mut conn, &kms_only), 3);
    assert_eq!(
        kms_only
            .keys_for_open("dr-a")
            .expect("keys")
            .current_version(),
        Some(2)
    );
    // Without the KMS configured, the error says which KEK is missing.
    let (ok, out) = phi(&["keys", "status", "--owner", "dr-a"], true);
    assert!(!ok && out.contains(&target), "{out}");
}

/// The KMS check value on one key store: recorded on first use as the
/// documented canary, verified by every later build, and a key that is not
/// the one behind the KEK id refused with nothing written.
fn kms_check_values_on(store: Arc<dyn KeyStore>) {
    let url = shared_kms_url();
    let admin = Admin::new(&url);
    let (a, b) = (admin.create_key(), admin.create_key());
    let alias = unique_alias("kek-check");
    admin.create_alias(&alias, &a);

    let first = Arc::new(kek(&url, &alias));
    let keyring = Keyring::builder(store.clone(), first.clone())
        .build()
        .expect("first use");
    let stats = first.stats();
    assert_eq!(
        (stats.encrypt, stats.decrypt),
        (1, 0),
        "first use: one Encrypt"
    );
    let check = store
        .kek_check(first.id())
        .expect("read")
        .expect("stored on first use");
    assert_eq!(check.format, "kms-canary-v1");
    assert_eq!(
        admin.decrypt_check(&a, &check.value, first.id()),
        phi::CHECK_CANARY.to_vec(),
        "the canary opens with the documented context"
    );
    let owner = common::unique_owner("kek-check");
    keyring
        .seal(&"Doe".to_string(), &owner, "cases.patient_last", b"C-1")
        .expect("seal");

    let again = Arc::new(kek(&url, &alias));
    Keyring::builder(store.clone(), again.clone())
        .build()
        .expect("the same key builds");
    let stats = again.stats();
    assert_eq!(
        (stats.encrypt, stats.decrypt),
        (0, 1),
        "later builds: one Decrypt"
    );

    // The alias moved to another key: refused, nothing written.
    let written = |store: &Arc<dyn KeyStore>| {
        (
            store.load_keys(&[&owner]).expect("keys").len(),
            store.audit(Some(&owner), 100).expect("audit").len(),
            store.kek_check(first.id()).expect("check"),
        )
    };
    let before = written(&store);
    admin.update_alias(&alias, &b);
    let err = Keyring::builder(store.clone(), Arc::new(kek(&url, &alias)))
        .build()
        .expect_err("another key behind the alias");
    let text = chain(&err);
    assert!(
        matches!(err, Error::KekMismatch { ref kek_id, .. } | Error::KekCheck { ref kek_id, .. } if *kek_id == format!("aws-kms:{alias}")),
        "{err:?}"
    );
    assert!(
        text.contains(&alias) && text.contains("nothing was written"),
        "{text}"
    );
    eprintln!("alias moved to another key: {text}");
    assert_eq!(written(&store), before);

    // A check value that does not open under the key: a mismatch.
    let id = common::unique_owner("kek-check-altered");
    let mut altered = check.clone();
    let last = altered.value.len() - 1;
    altered.value[last] ^= 1;
    assert!(
        store
            .insert_kek_check_if_absent(&id, &altered)
            .expect("insert")
    );
    let err = Keyring::builder(
        store.clone(),
        Arc::new(kek_builder(&url, &a).kek_id(&id).build().expect("kek")),
    )
    .build()
    .expect_err("altered check value");
    assert!(
        matches!(err, Error::KekMismatch { ref kek_id, .. } if *kek_id == id),
        "{err:?}"
    );
    assert!(err.to_string().contains("KMS key or alias"), "{err}");
}

#[test]
fn kms_check_values_on_sqlite() {
    let (_dir, db) = sqlite_db();
    kms_check_values_on(Arc::new(
        DieselKeyStore::<SqliteConnection>::builder(&db)
            .run_migrations(true)
            .connect()
            .expect("key store"),
    ));
}

#[cfg(feature = "mysql")]
#[test]
fn kms_check_values_on_mariadb() {
    let url = std::env::var("PHI_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    kms_check_values_on(Arc::new(
        DieselKeyStore::<diesel::MysqlConnection>::builder(&url)
            .run_migrations(true)
            .connect()
            .unwrap_or_else(|e| panic!("MariaDB at {url}: {e}")),
    ));
}

#[cfg(feature = "postgres")]
#[test]
fn kms_check_values_on_postgres() {
    let url = std::env::var("PHI_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    kms_check_values_on(Arc::new(
        DieselKeyStore::<diesel::PgConnection>::builder(&url)
            .run_migrations(true)
            .connect()
            .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}")),
    ));
}

/// An error and its sources, as a report prints them: the message never
/// repeats its source.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
