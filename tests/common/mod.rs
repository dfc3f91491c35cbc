//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use phi::{BoxError, KeyBytes, KeyEncryptionKey, LocalKek};

/// An owner id no other test (or earlier run against the same server) uses.
pub(crate) fn unique_owner(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!(
        "{tag}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// An empty database of a test's own, dropped at the end: a new SQLite
/// file when `server` is `None`, else a new database on the server of the
/// admin URL `server` (MySQL / MariaDB or PostgreSQL).
pub(crate) struct EmptyDatabase<C: diesel::Connection> {
    pub(crate) url: String,
    admin: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
    connection: std::marker::PhantomData<fn() -> C>,
}

impl<C: diesel::Connection> EmptyDatabase<C> {
    pub(crate) fn on(server: Option<String>) -> Self {
        let Some(admin_url) = server else {
            let dir = tempfile::tempdir().expect("temporary directory");
            let url = dir.path().join("empty.db").display().to_string();
            return EmptyDatabase {
                url,
                admin: None,
                _dir: Some(dir),
                connection: std::marker::PhantomData,
            };
        };
        let unique = unique_owner("x");
        let name = format!(
            "phi_empty_{}",
            unique.rsplit('-').take(2).collect::<Vec<_>>().join("_")
        );
        let (base, _) = admin_url.rsplit_once('/').expect("database in URL");
        let mut admin =
            C::establish(&admin_url).expect("admin connection (is the test server up?)");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create database");
        EmptyDatabase {
            url: format!("{base}/{name}"),
            admin: Some((admin_url, name)),
            _dir: None,
            connection: std::marker::PhantomData,
        }
    }

    /// Whether `table` exists (a query on it succeeds).
    pub(crate) fn has_table(&self, table: &str) -> bool {
        let mut conn = C::establish(&self.url).expect("connect");
        conn.batch_execute(&format!("SELECT 1 FROM {table}"))
            .is_ok()
    }
}

impl<C: diesel::Connection> Drop for EmptyDatabase<C> {
    fn drop(&mut self) {
        let Some((admin_url, name)) = &self.admin else {
            return;
        };
        let force = if admin_url.starts_with("postgres") {
            " WITH (FORCE)"
        } else {
            ""
        };
        let sql = format!("DROP DATABASE IF EXISTS {name}{force}");
        match C::establish(admin_url) {
            Ok(mut admin) => {
                if let Err(e) = admin.batch_execute(&sql) {
                    eprintln!("{sql}: {e}");
                }
            }
            Err(e) => eprintln!("{sql}: {e}"),
        }
    }
}

/// The master key the tests' `LocalKek`s use.
pub(crate) const MASTER_KEY_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// The tests' standard KEK.
pub(crate) fn local_kek() -> Arc<LocalKek> {
    Arc::new(LocalKek::from_base64("local-test", MASTER_KEY_B64).expect("test master key"))
}

/// A KEK that counts its unwraps and can slow generation and unwraps down,
/// to widen races.
#[derive(Debug)]
pub(crate) struct CountingKek {
    inner: Arc<dyn KeyEncryptionKey>,
    pub(crate) unwraps: AtomicUsize,
    delay: Duration,
}

impl CountingKek {
    pub(crate) fn new(inner: Arc<dyn KeyEncryptionKey>, delay: Duration) -> Arc<Self> {
        Arc::new(CountingKek {
            inner,
            unwraps: AtomicUsize::new(0),
            delay,
        })
    }
    pub(crate) fn unwraps(&self) -> usize {
        self.unwraps.load(Ordering::SeqCst)
    }
}

impl KeyEncryptionKey for CountingKek {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn generate(&self, owner: &str, version: u32) -> Result<(KeyBytes, Vec<u8>), BoxError> {
        std::thread::sleep(self.delay);
        self.inner.generate(owner, version)
    }
    fn wrap(&self, owner: &str, version: u32, key: &KeyBytes) -> Result<Vec<u8>, BoxError> {
        self.inner.wrap(owner, version, key)
    }
    fn unwrap(&self, owner: &str, version: u32, wrapped: &[u8]) -> Result<KeyBytes, BoxError> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        self.inner.unwrap(owner, version, wrapped)
    }
    fn check_value(&self) -> Result<phi::KekCheck, BoxError> {
        self.inner.check_value()
    }
    fn verify_check_value(&self, check: &phi::KekCheck) -> Result<bool, BoxError> {
        self.inner.verify_check_value(check)
    }
}

/// A key store wrapper that counts `load_keys` calls.
#[derive(Debug)]
pub(crate) struct CountingStore {
    inner: Arc<dyn phi::KeyStore>,
    pub(crate) loads: AtomicUsize,
}

impl CountingStore {
    pub(crate) fn new(inner: Arc<dyn phi::KeyStore>) -> Arc<Self> {
        Arc::new(CountingStore {
            inner,
            loads: AtomicUsize::new(0),
        })
    }
    pub(crate) fn loads(&self) -> usize {
        self.loads.load(Ordering::SeqCst)
    }
}

impl phi::KeyStore for CountingStore {
    fn load_keys(&self, owners: &[&str]) -> phi::Result<Vec<phi::StoredKey>> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        self.inner.load_keys(owners)
    }
    fn insert_key_if_absent(&self, key: &phi::StoredKey) -> phi::Result<bool> {
        self.inner.insert_key_if_absent(key)
    }
    fn append_audit(&self, events: &[phi::AuditEvent]) -> phi::Result<()> {
        self.inner.append_audit(events)
    }
    fn owners(&self) -> phi::Result<Vec<String>> {
        self.inner.owners()
    }
    fn kek_check(&self, kek_id: &str) -> phi::Result<Option<phi::KekCheck>> {
        self.inner.kek_check(kek_id)
    }
    fn insert_kek_check_if_absent(&self, kek_id: &str, check: &phi::KekCheck) -> phi::Result<bool> {
        self.inner.insert_kek_check_if_absent(kek_id, check)
    }
    fn keys_page(
        &self,
        wrapped_by: Option<&str>,
        not_wrapped_by: Option<&str>,
        after: Option<(&str, u32)>,
        limit: usize,
    ) -> phi::Result<Vec<phi::StoredKey>> {
        self.inner
            .keys_page(wrapped_by, not_wrapped_by, after, limit)
    }
}

/// The clinic example's binary, built (once per test binary) with this
/// test's backends.
pub(crate) fn clinic_bin() -> &'static std::path::Path {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| example_bin("clinic"))
}

/// An example binary, built with this test's backend features.
pub(crate) fn example_bin(name: &str) -> std::path::PathBuf {
    example_bin_with(name, &[])
}

/// Whether this test was built with every feature of the package, as
/// `cargo test --workspace --all-features` (`.ci/run`) builds it.
const ALL_FEATURES: bool = cfg!(all(
    feature = "ring",
    feature = "sqlite",
    feature = "mysql",
    feature = "postgres",
    feature = "aws-kms",
    feature = "async",
    feature = "uuid",
    feature = "serde_json",
    feature = "admin-http",
    feature = "legacy-fernet",
    feature = "service",
));

/// Set (to anything) when the examples were built by the command that
/// built this test, `cargo test --workspace --all-features`: they are then
/// taken as they are (ignored unless every feature is on).
const EXAMPLES_BUILT: &str = "PHI_TEST_EXAMPLES_BUILT";

/// An example binary, built with this test's backend features and
/// `extra`. Under `cargo test --workspace --all-features` (every feature
/// on), by that same command with `--no-run`: nothing to do, the binary
/// that run built is taken as it is. A narrower command would resolve the
/// workspace's features differently (the other members' dev-dependencies
/// left out) and rebuild phi-types and everything above it.
pub(crate) fn example_bin_with(name: &str, extra: &[&str]) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/clinic-… → target/<profile>/examples/clinic
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target directory");
    let bin = profile_dir.join("examples").join(name);
    // `.ci/run` says so: its `cargo test --workspace --all-features` built
    // every example before running any test. A cargo started from inside
    // a test sees another environment and may build phi-types again.
    if ALL_FEATURES && std::env::var_os(EXAMPLES_BUILT).is_some() {
        assert!(
            bin.exists(),
            "{EXAMPLES_BUILT} is set but there is no {}",
            bin.display()
        );
        return bin;
    }
    let mut command = std::process::Command::new(env!("CARGO"));
    command.current_dir(env!("CARGO_MANIFEST_DIR"));
    if ALL_FEATURES {
        command.args([
            "test",
            "--quiet",
            "--workspace",
            "--all-features",
            "--no-run",
        ]);
    } else {
        command.args(["build", "--quiet", "--example", name]);
        let mut features = vec!["sqlite"];
        for (on, feature) in [
            (cfg!(feature = "mysql"), "mysql"),
            (cfg!(feature = "postgres"), "postgres"),
            (cfg!(feature = "aws-kms"), "aws-kms"),
            (cfg!(feature = "legacy-fernet"), "legacy-fernet"),
        ] {
            if on {
                features.push(feature);
            }
        }
        features.extend_from_slice(extra);
        command
            .args(["--no-default-features", "--features"])
            .arg(features.join(","));
    }
    let status = command.status().expect("cargo runs");
    assert!(status.success(), "building the {name} example failed");
    assert!(bin.exists(), "no {name} example at {}", bin.display());
    bin
}

/// A key store whose key-event feed can be made unreadable (every other
/// call goes to the store it wraps), to make a following keyring stale
/// without touching the shared database.
#[derive(Debug)]
pub(crate) struct FeedDown {
    inner: Arc<dyn phi::KeyStore>,
    down: std::sync::atomic::AtomicBool,
}

impl FeedDown {
    pub(crate) fn new(inner: Arc<dyn phi::KeyStore>) -> Arc<Self> {
        Arc::new(FeedDown {
            inner,
            down: std::sync::atomic::AtomicBool::new(false),
        })
    }
    pub(crate) fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

impl phi::KeyStore for FeedDown {
    fn load_keys(&self, owners: &[&str]) -> phi::Result<Vec<phi::StoredKey>> {
        self.inner.load_keys(owners)
    }
    fn insert_key_if_absent(&self, key: &phi::StoredKey) -> phi::Result<bool> {
        self.inner.insert_key_if_absent(key)
    }
    fn append_audit(&self, events: &[phi::AuditEvent]) -> phi::Result<()> {
        self.inner.append_audit(events)
    }
    fn owners(&self) -> phi::Result<Vec<String>> {
        self.inner.owners()
    }
    fn kek_check(&self, kek_id: &str) -> phi::Result<Option<phi::KekCheck>> {
        self.inner.kek_check(kek_id)
    }
    fn insert_kek_check_if_absent(&self, kek_id: &str, check: &phi::KekCheck) -> phi::Result<bool> {
        self.inner.insert_kek_check_if_absent(kek_id, check)
    }
    fn keys_page(
        &self,
        wrapped_by: Option<&str>,
        not_wrapped_by: Option<&str>,
        after: Option<(&str, u32)>,
        limit: usize,
    ) -> phi::Result<Vec<phi::StoredKey>> {
        self.inner
            .keys_page(wrapped_by, not_wrapped_by, after, limit)
    }
    fn has_feed(&self) -> bool {
        self.inner.has_feed()
    }
    fn feed_head(&self) -> phi::Result<i64> {
        self.inner.feed_head()
    }
    fn key_events_after(&self, after: i64, limit: usize) -> phi::Result<Vec<phi::feed::FeedEvent>> {
        if self.down.load(Ordering::SeqCst) {
            return Err(phi::Error::Store {
                operation: "reading key events",
                source: "the feed is down (test)".into(),
            });
        }
        self.inner.key_events_after(after, limit)
    }
    fn fleet_rollout(&self, policy: &str) -> phi::Result<Option<phi::Rollout>> {
        self.inner.fleet_rollout(policy)
    }
    fn record_feed_reader(&self, reader: &str, position: i64) -> phi::Result<()> {
        self.inner.record_feed_reader(reader, position)
    }
    fn forget_feed_reader(&self, reader: &str) -> phi::Result<()> {
        self.inner.forget_feed_reader(reader)
    }
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
pub(crate) struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    /// Everything written so far.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(
            &self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned()
    }
}

/// The events of the `phi::access` target of every test of this binary:
/// the process's global subscriber, installed by the first caller (a
/// scoped subscriber would race the callsites' cached interest with the
/// tests running beside it). Tests pick their own lines by their unique
/// owners or rows.
pub(crate) fn access_events() -> &'static Captured {
    static CAPTURED: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    CAPTURED.get_or_init(|| {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_ansi(false)
            .with_env_filter(tracing_subscriber::EnvFilter::new("phi::access=info"))
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in this test binary");
        captured
    })
}
