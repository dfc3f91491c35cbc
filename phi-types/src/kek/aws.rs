//! A KEK in AWS KMS (or a KMS-compatible server): data keys generated and
//! unwrapped by the KMS, the master key never leaving it.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_sdk_kms::Client;
use aws_sdk_kms::config::retry::RetryConfig;
use aws_sdk_kms::config::timeout::TimeoutConfig;
use aws_sdk_kms::config::{Credentials, Region};
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use tracing::Instrument as _;
use zeroize::Zeroizing;

use super::{CHECK_CANARY, KekCheck, KeyEncryptionKey};
use crate::dek::KeyBytes;
pub use crate::error::{AwsKmsError, AwsKmsErrorKind};
use crate::error::{BoxError, Error};

/// Encryption context key naming the owner of a data key.
pub const CONTEXT_OWNER: &str = "phi:owner";
/// Encryption context key holding the data key version, in decimal.
pub const CONTEXT_DEK_VERSION: &str = "phi:dek_version";
/// Encryption context key of a check value's canary, naming the KEK id.
pub const CONTEXT_KEK_CHECK: &str = "phi:kek-check";
/// Format of an [`AwsKmsKek`]'s check value (`kek_check_values.format`).
const CHECK_FORMAT_KMS: &str = "kms-canary-v1";

use crate::metrics::{KMS_CALL_DURATION_SECONDS, KMS_CALLS_TOTAL, SUCCESS};

/// A key encryption key in AWS KMS.
///
/// - New data keys come from **GenerateDataKey** (`KeySpec` `AES_256`); the
///   stored `wrapped_key` is the KMS `CiphertextBlob`.
/// - Stored data keys are opened by **Decrypt**, with `KeyId` set.
/// - An existing data key is wrapped (re-wrapped from another KEK) by
///   **Encrypt**.
///
/// Every call carries the encryption context
/// `{"phi:owner": owner, "phi:dek_version": "<version in decimal>"}`, so a
/// wrapped key copied to another owner or version does not decrypt, and
/// CloudTrail records which owner each call was for.
///
/// Its check value (format `kms-canary-v1`, see
/// [`KeyEncryptionKey::check_value`]) is the `CiphertextBlob` of an
/// **Encrypt** of the 32 bytes [`CHECK_CANARY`](crate::CHECK_CANARY) with
/// encryption context `{"phi:kek-check": kek_id}`. It verifies when a
/// **Decrypt** with the configured key and the same context returns those
/// bytes: a KMS ciphertext names its key, so another key (an alias
/// retargeted, a key recreated) does not verify. A keyring build therefore
/// costs one Decrypt (one Encrypt when the KEK id is new).
///
/// The id recorded in `user_encryption_keys.kek_id` is `aws-kms:<key>`,
/// where `<key>` is the key id, key ARN, alias name (`alias/…`) or alias ARN
/// exactly as configured (or whatever [`AwsKmsKekBuilder::kek_id`] sets).
/// Keep it stable: rows record it, and the keyring unwraps a row only with
/// the KEK of that id. Decrypt names the configured key, so an alias must
/// keep pointing at the key that wrapped the stored data keys (retargeting
/// an alias means re-wrapping them).
///
/// The trait is synchronous; the KEK runs every KMS call on a small tokio
/// runtime of its own and the calling thread waits for the answer. It works
/// the same from plain threads, from `spawn_blocking` and directly on an
/// async runtime's worker thread (which it blocks for the duration of the
/// call, as any synchronous I/O does). Many unwraps at once (a cold load of
/// many owners) run concurrently, at most
/// [`max_concurrent_requests`](AwsKmsKekBuilder::max_concurrent_requests) at
/// a time.
///
/// Each call runs in a `phi.kms` tracing span with OpenTelemetry's RPC
/// attributes (`rpc.system` `aws-api`, `rpc.service` `KMS`, `rpc.method`
/// `GenerateDataKey`, `Decrypt` or `Encrypt`), the key version and the KEK
/// id; the owner is on the keyring's enclosing span, written as the
/// keyring's [`OwnerIdTelemetry`](crate::OwnerIdTelemetry) says. Each call
/// is counted in [`stats`](AwsKmsKek::stats), and recorded through the
/// [`metrics`](https://docs.rs/metrics/0.24) facade as
/// `phi_kms_calls_total` and `phi_kms_call_duration_seconds` (see
/// [`metrics`](crate::metrics); no-ops unless the application installs a
/// recorder).
///
/// Plaintext data keys never appear in `Debug`, logs or errors, nor do the
/// credentials. Where their bytes are in memory:
///
/// - **Decrypt and GenerateDataKey**: the SDK decodes the answer's
///   `Plaintext` into a `Blob`, whose buffer phi takes and wipes after
///   copying it into zeroizing [`KeyBytes`].
/// - **Encrypt** (`wrap`, and the check value's canary): the plaintext goes
///   into the call's task as zeroizing `KeyBytes`. The SDK is given a
///   public placeholder (32 zero bytes) instead; just before the request is
///   signed, phi rebuilds its body with the base64 of the real plaintext in
///   a buffer that is wiped when the request and its retries are dropped,
///   and refuses to send a body whose placeholder it cannot find.
/// - **Out of phi's reach**: the HTTP and TLS stack's own buffers (hyper's
///   read buffer holding an answer's base64 `Plaintext`, the SDK's copy of
///   the answer's body it deserializes from, the TLS library's record
///   buffers on the way in and out), and copies on the stack. These are
///   freed without being wiped; an attacker who can read the process's
///   freed memory can find data keys there, as with any library that
///   speaks HTTP.
///
/// ```no_run
/// # #[cfg(feature = "sqlite")]
/// # fn main() -> Result<(), phi_types::Error> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use diesel::SqliteConnection;
/// use phi_types::{AwsKmsKek, DieselKeyStore, KeyEncryptionKey, Keyring};
///
/// // Credentials from the default chain (environment, profile, instance or
/// // task role); region from the environment unless set here.
/// let kek = AwsKmsKek::builder("alias/phi-production")
///     .region("eu-west-1")
///     .connect_timeout(Duration::from_secs(2))
///     .operation_timeout(Duration::from_secs(5))
///     .max_attempts(3)
///     .build()?;
/// assert_eq!(kek.id(), "aws-kms:alias/phi-production");
///
/// let store = Arc::new(DieselKeyStore::<SqliteConnection>::connect("clinic.db")?);
/// let keyring = Keyring::builder(store, Arc::new(kek)).build()?;
/// let sealed = keyring.seal(&"Doe".to_string(), "provider-17", "cases.patient_last", b"C-1001")?;
/// # let _ = sealed;
/// # Ok(())
/// # }
/// # #[cfg(not(feature = "sqlite"))]
/// # fn main() {}
/// ```
pub struct AwsKmsKek {
    kms: Arc<Kms>,
    /// The runtime of the blocking API: started by `build` (which loads the
    /// AWS configuration on it), or at the first blocking call of a KEK made
    /// with `from_client` / `from_sdk_config`. The async API (feature
    /// `async`) never uses it.
    worker: std::sync::OnceLock<Result<Worker, String>>,
    max_concurrent: usize,
}

/// Configures an [`AwsKmsKek`]; from [`AwsKmsKek::builder`].
#[must_use]
pub struct AwsKmsKekBuilder {
    key_id: String,
    kek_id: Option<String>,
    region: Option<String>,
    endpoint_url: Option<String>,
    credentials: Option<(String, Zeroizing<String>)>,
    connect_timeout: Duration,
    attempt_timeout: Duration,
    operation_timeout: Duration,
    max_attempts: u32,
    max_concurrent: usize,
}

/// Calls an [`AwsKmsKek`] has sent, from [`AwsKmsKek::stats`]. Each counts
/// operations, successful or not; the SDK's retries of one operation count
/// once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AwsKmsStats {
    /// GenerateDataKey calls (new data keys).
    pub generate_data_key: u64,
    /// Decrypt calls (unwraps).
    pub decrypt: u64,
    /// Encrypt calls (wraps of existing data keys).
    pub encrypt: u64,
    /// Calls of any kind that failed.
    pub failures: u64,
}

/// A KMS operation's name as a metric label: snake_case.
fn operation_label(operation: &'static str) -> &'static str {
    match operation {
        "GenerateDataKey" => "generate_data_key",
        "Decrypt" => "decrypt",
        "Encrypt" => "encrypt",
        _ => "other",
    }
}

impl AwsKmsKek {
    /// A KEK for the KMS key `key_id` (id, ARN or `alias/…`) over an
    /// application's shared AWS configuration, e.g. from
    /// `aws_config::load_defaults(BehaviorVersion::v2026_01_12()).await`: the
    /// application chooses its SDK's behavior version (phi does not turn on
    /// the SDK's `behavior-version-latest`). Its id is `aws-kms:<key_id>`;
    /// see [`AwsKmsKekBuilder::build_with_client`] to choose another or
    /// bound the concurrency. No runtime is started.
    pub fn from_sdk_config(key_id: impl Into<String>, config: &aws_config::SdkConfig) -> AwsKmsKek {
        Self::from_client(key_id, Client::new(config))
    }

    /// A KEK for the KMS key `key_id` over an application's own KMS client;
    /// as [`from_sdk_config`](Self::from_sdk_config).
    pub fn from_client(key_id: impl Into<String>, client: Client) -> AwsKmsKek {
        Self::builder(key_id).build_with_client(client)
    }

    /// The blocking API's runtime, started on first use.
    fn run<F>(&self, future: F) -> Result<F::Output, String>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let worker = self
            .worker
            .get_or_init(|| Worker::start().map_err(|e| format!("cannot start the runtime: {e}")));
        match worker {
            Ok(worker) => worker.run(future).map_err(str::to_owned),
            Err(e) => Err(e.clone()),
        }
    }

    /// Starts configuring a KEK over the KMS key `key_id`: a key id, key ARN,
    /// alias name (`alias/…`) or alias ARN.
    pub fn builder(key_id: impl Into<String>) -> AwsKmsKekBuilder {
        AwsKmsKekBuilder {
            key_id: key_id.into(),
            kek_id: None,
            region: None,
            endpoint_url: None,
            credentials: None,
            connect_timeout: Duration::from_secs(3),
            attempt_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(15),
            max_attempts: 3,
            max_concurrent: 16,
        }
    }

    /// The KMS key as configured.
    pub fn key_id(&self) -> &str {
        &self.kms.key_id
    }

    /// Calls sent to the KMS since this KEK was built.
    pub fn stats(&self) -> AwsKmsStats {
        let c = &self.kms.counters;
        AwsKmsStats {
            generate_data_key: c.generate.load(Ordering::Relaxed),
            decrypt: c.decrypt.load(Ordering::Relaxed),
            encrypt: c.encrypt.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
        }
    }
}

/// The AWS SDK behavior version of the configuration that
/// [`AwsKmsKekBuilder::build`] loads: pinned, so that an SDK update does not
/// change the KEK's defaults unseen (its timeouts and retries are set
/// explicitly as well). The SDK deprecates a version once it ships a newer
/// one; that changes nothing here.
#[allow(deprecated)]
fn behavior_version() -> BehaviorVersion {
    BehaviorVersion::v2026_01_12()
}

impl AwsKmsKekBuilder {
    /// The id recorded in `user_encryption_keys.kek_id` (default
    /// `aws-kms:<key id as configured>`).
    pub fn kek_id(mut self, id: impl Into<String>) -> Self {
        self.kek_id = Some(id.into());
        self
    }

    /// The AWS region (default: from the environment or profile,
    /// `AWS_REGION`).
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Sends requests to this URL instead of the region's KMS endpoint: a VPC
    /// endpoint, or a KMS-compatible server in tests.
    pub fn endpoint_url(mut self, url: impl Into<String>) -> Self {
        self.endpoint_url = Some(url.into());
        self
    }

    /// Signs requests with these static credentials instead of the default
    /// chain (environment, profile, web identity, container or instance
    /// role). Meant for tests and KMS-compatible servers.
    pub fn static_credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
    ) -> Self {
        self.credentials = Some((
            access_key_id.into(),
            Zeroizing::new(secret_access_key.into()),
        ));
        self
    }

    /// Longest wait for a connection to the KMS (default 3 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Longest wait for one attempt of a call (default 5 s).
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// Longest wait for a call, retries included (default 15 s): how long an
    /// owner's resolution can take when the KMS is unreachable.
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Attempts per call, the first included, with exponential back-off on
    /// transient errors (default 3; 1 disables retries).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// How many KMS calls one batch of unwraps runs at once (default 16).
    pub fn max_concurrent_requests(mut self, max: usize) -> Self {
        self.max_concurrent = max.max(1);
        self
    }

    /// Builds the KEK: starts its runtime and loads the AWS configuration
    /// (no KMS call is made), under the SDK behavior version phi pins
    /// (`BehaviorVersion::v2026_01_12`).
    ///
    /// # Errors
    /// [`Error::Config`] when the runtime cannot start or no region is
    /// configured.
    pub fn build(self) -> Result<AwsKmsKek, Error> {
        let kek_id = self
            .kek_id
            .clone()
            .unwrap_or_else(|| format!("aws-kms:{}", self.key_id));
        let worker = Worker::start()
            .map_err(|e| Error::Config(format!("cannot start the AWS KMS runtime: {e}")))?;
        let mut loader = aws_config::defaults(behavior_version())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(self.connect_timeout)
                    .operation_attempt_timeout(self.attempt_timeout)
                    .operation_timeout(self.operation_timeout)
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(self.max_attempts));
        if let Some(region) = &self.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(url) = &self.endpoint_url {
            loader = loader.endpoint_url(url.clone());
        }
        if let Some((access_key_id, secret)) = &self.credentials {
            loader = loader.credentials_provider(Credentials::new(
                access_key_id.clone(),
                secret.as_str(),
                None,
                None,
                "phi-static",
            ));
        }
        let config = worker
            .run(loader.load())
            .map_err(|e| Error::Config(format!("cannot load the AWS configuration: {e}")))?;
        let Some(region) = config.region().map(ToString::to_string) else {
            return Err(Error::Config(format!(
                "no AWS region for KEK {kek_id:?}: set AWS_REGION or call .region()"
            )));
        };
        let endpoint = match &self.endpoint_url {
            Some(url) => url.clone(),
            None => format!("region {region}"),
        };
        Ok(AwsKmsKek {
            kms: Arc::new(Kms {
                client: Client::new(&config),
                key_id: self.key_id,
                kek_id,
                endpoint,
                counters: Counters::default(),
            }),
            worker: std::sync::OnceLock::from(Ok(worker)),
            max_concurrent: self.max_concurrent,
        })
    }

    /// Builds the KEK over an application's own KMS client (its
    /// configuration, credentials, timeouts and retries), without starting
    /// a runtime: async code uses the caller's runtime (feature `async`);
    /// the blocking API starts the KEK's own runtime at its first call. The
    /// region, endpoint, credential and timeout settings of this builder are
    /// not used (they are the client's); the KEK id and the concurrency
    /// bound are.
    pub fn build_with_client(self, client: Client) -> AwsKmsKek {
        let kek_id = self
            .kek_id
            .clone()
            .unwrap_or_else(|| format!("aws-kms:{}", self.key_id));
        let config = client.config();
        let endpoint = match config.region() {
            Some(region) => format!("the client's endpoint, region {region}"),
            None => "the client's endpoint".to_owned(),
        };
        AwsKmsKek {
            kms: Arc::new(Kms {
                client,
                key_id: self.key_id,
                kek_id,
                endpoint,
                counters: Counters::default(),
            }),
            worker: std::sync::OnceLock::new(),
            max_concurrent: self.max_concurrent,
        }
    }
}

impl KeyEncryptionKey for AwsKmsKek {
    fn id(&self) -> &str {
        &self.kms.kek_id
    }

    fn generate(&self, owner: &str, version: u32) -> Result<(KeyBytes, Vec<u8>), BoxError> {
        let owner = owner.to_owned();
        Ok(
            self.blocking(Op::GenerateDataKey, move |kms: Arc<Kms>| async move {
                kms.generate(&owner, version).await
            })?,
        )
    }

    /// Encrypt of `key`. The plaintext phi hands on is a zeroizing copy;
    /// the SDK itself is only ever given a public placeholder (see
    /// `Kms::encrypt`).
    fn wrap(&self, owner: &str, version: u32, key: &KeyBytes) -> Result<Vec<u8>, BoxError> {
        let owner = owner.to_owned();
        let plaintext = wrap_plaintext(key);
        Ok(self.blocking(Op::Encrypt, move |kms: Arc<Kms>| async move {
            kms.encrypt(
                Purpose::DataKey {
                    owner: &owner,
                    version,
                },
                plaintext,
            )
            .await
        })?)
    }

    fn unwrap(&self, owner: &str, version: u32, wrapped: &[u8]) -> Result<KeyBytes, BoxError> {
        let owner = owner.to_owned();
        let wrapped = wrapped.to_vec();
        Ok(self.blocking(Op::Decrypt, move |kms: Arc<Kms>| async move {
            kms.decrypt(
                Purpose::DataKey {
                    owner: &owner,
                    version,
                },
                wrapped,
            )
            .await
        })?)
    }

    fn check_value(&self) -> Result<KekCheck, BoxError> {
        let canary = KeyBytes::new(*CHECK_CANARY);
        let blob = self.blocking(Op::Encrypt, move |kms: Arc<Kms>| async move {
            kms.encrypt(Purpose::Check, canary).await
        })?;
        Ok(KekCheck::new(CHECK_FORMAT_KMS, blob))
    }

    fn verify_check_value(&self, check: &KekCheck) -> Result<bool, BoxError> {
        if check.format != CHECK_FORMAT_KMS {
            return Ok(false);
        }
        let blob = check.value.clone();
        let opened = self.blocking(Op::Decrypt, move |kms: Arc<Kms>| async move {
            kms.decrypt(Purpose::Check, blob).await
        });
        match opened {
            Ok(canary) => Ok(canary.expose() == CHECK_CANARY),
            Err(e) if e.kind == AwsKmsErrorKind::InvalidCiphertext => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn opens(&self, owner: &str, version: u32, wrapped: &[u8]) -> Result<bool, BoxError> {
        match self.unwrap(owner, version, wrapped) {
            Ok(_) => Ok(true),
            Err(e)
                if e.downcast_ref::<AwsKmsError>()
                    .is_some_and(|e| e.kind == AwsKmsErrorKind::InvalidCiphertext) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn unwrap_many(&self, keys: &[(&str, u32, &[u8])]) -> Vec<Result<KeyBytes, BoxError>> {
        let requests: Vec<(String, u32, Vec<u8>)> = keys
            .iter()
            .map(|(owner, version, wrapped)| ((*owner).to_owned(), *version, wrapped.to_vec()))
            .collect();
        let count = requests.len();
        match self.run(self.decrypt_batch(requests)) {
            Ok(results) => self.batch_results(results),
            Err(e) => (0..count)
                .map(|_| Err(self.kms.runtime_error(Op::Decrypt.name(), &e).into()))
                .collect(),
        }
    }

    /// The SDK's own futures, on the caller's runtime: no private runtime,
    /// no `block_on`, nothing that blocks the task's thread (a
    /// current-thread runtime included). The requests are spawned on the
    /// caller's runtime, at most `max_concurrent_requests` at a time.
    #[cfg(feature = "async")]
    fn unwrap_many_async<'a>(
        &'a self,
        keys: Vec<(String, u32, Vec<u8>)>,
    ) -> crate::kek::KekFuture<'a, Vec<Result<KeyBytes, BoxError>>> {
        Box::pin(async move {
            let results = self.decrypt_batch(keys).await;
            self.batch_results(results)
        })
    }

    /// `GenerateDataKey` awaited on the caller's runtime.
    #[cfg(feature = "async")]
    fn generate_async<'a>(
        &'a self,
        owner: &'a str,
        version: u32,
    ) -> crate::kek::KekFuture<'a, Result<(KeyBytes, Vec<u8>), BoxError>> {
        Box::pin(async move {
            self.kms
                .generate(owner, version)
                .await
                .map_err(BoxError::from)
        })
    }
}

/// The plaintext of a `wrap`, moved into the call's task: a zeroizing copy
/// of `key` in an allocation of its own (never a `Vec` or `Blob`, which
/// would be freed unwiped).
fn wrap_plaintext(key: &KeyBytes) -> KeyBytes {
    KeyBytes::from_slice(key.expose()).unwrap_or_else(|| unreachable!("a key is 32 bytes"))
}

impl AwsKmsKek {
    /// Runs one call of the blocking API on the KEK's runtime, and waits for
    /// it; a runtime failure is reported as a failure of `op`.
    fn blocking<T, F>(&self, op: Op, call: impl FnOnce(Arc<Kms>) -> F) -> Result<T, AwsKmsError>
    where
        F: Future<Output = Result<T, AwsKmsError>> + Send + 'static,
        T: Send + 'static,
    {
        self.run(call(self.kms.clone()))
            .map_err(|e| self.kms.runtime_error(op.name(), &e))?
    }

    /// Decrypts a batch concurrently (bounded), on whichever runtime awaits it.
    fn decrypt_batch(
        &self,
        requests: Vec<(String, u32, Vec<u8>)>,
    ) -> impl Future<Output = Vec<Option<Result<KeyBytes, AwsKmsError>>>> + Send + 'static {
        let count = requests.len();
        let kms = self.kms.clone();
        let limit = Arc::new(tokio::sync::Semaphore::new(self.max_concurrent));
        async move {
            let mut tasks = tokio::task::JoinSet::new();
            for (index, (owner, version, wrapped)) in requests.into_iter().enumerate() {
                let permit = limit.clone().acquire_owned().await.ok();
                let kms = kms.clone();
                tasks.spawn(async move {
                    let result = kms
                        .decrypt(
                            Purpose::DataKey {
                                owner: &owner,
                                version,
                            },
                            wrapped,
                        )
                        .await;
                    drop(permit);
                    (index, result)
                });
            }
            let mut results: Vec<Option<Result<KeyBytes, AwsKmsError>>> =
                (0..count).map(|_| None).collect();
            while let Some(joined) = tasks.join_next().await {
                if let Ok((index, result)) = joined {
                    results[index] = Some(result);
                }
            }
            results
        }
    }

    fn batch_results(
        &self,
        results: Vec<Option<Result<KeyBytes, AwsKmsError>>>,
    ) -> Vec<Result<KeyBytes, BoxError>> {
        results
            .into_iter()
            .map(|result| match result {
                Some(result) => result.map_err(BoxError::from),
                None => Err(self
                    .kms
                    .runtime_error(Op::Decrypt.name(), &"the call was lost")
                    .into()),
            })
            .collect()
    }
}

impl fmt::Debug for AwsKmsKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKmsKek")
            .field("id", &self.kms.kek_id)
            .field("key_id", &self.kms.key_id)
            .field("endpoint", &self.kms.endpoint)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for AwsKmsKekBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKmsKekBuilder")
            .field("key_id", &self.key_id)
            .field("kek_id", &self.kek_id)
            .field("region", &self.region)
            .field("endpoint_url", &self.endpoint_url)
            .field("static_credentials", &self.credentials.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Counters {
    generate: AtomicU64,
    decrypt: AtomicU64,
    encrypt: AtomicU64,
    failures: AtomicU64,
}

/// What the calls share, moved into the runtime's tasks.
struct Kms {
    client: Client,
    key_id: String,
    kek_id: String,
    endpoint: String,
    counters: Counters,
}

/// The three KMS operations phi calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    GenerateDataKey,
    Decrypt,
    Encrypt,
}

impl Op {
    /// The operation's name, as the KMS API spells it.
    fn name(self) -> &'static str {
        match self {
            Op::GenerateDataKey => "GenerateDataKey",
            Op::Decrypt => "Decrypt",
            Op::Encrypt => "Encrypt",
        }
    }
}

/// What a call is for: one data key of an owner, or the KEK's check value.
/// It chooses the encryption context and the span.
#[derive(Clone, Copy, Debug)]
enum Purpose<'a> {
    DataKey { owner: &'a str, version: u32 },
    Check,
}

/// The Encrypt plaintext the SDK is given and serializes in the clear in
/// its request body: 32 zero bytes, public. The real plaintext replaces its
/// base64 text in the serialized body, just before signing, in a buffer
/// that wipes itself (see [`Kms::encrypt`]).
const ENCRYPT_PLACEHOLDER: [u8; 32] = [0; 32];

/// The placeholder as the SDK's JSON serializer writes it (base64 of 32
/// zero bytes, 44 characters), with its member name: inside a JSON string
/// a quote is escaped, so this can only be the member itself.
const ENCRYPT_PLACEHOLDER_MEMBER: &[u8] =
    b"\"Plaintext\":\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"";

/// The Encrypt request body `serialized` (holding the placeholder) with
/// `plaintext` in its place, in a buffer of exactly its size (never
/// reallocated) that is overwritten with zeros when the last reference to
/// it (the request's, a retry's) is dropped. `None` when the body does not
/// hold the placeholder exactly once: the request must not be sent.
fn encrypt_body(serialized: &[u8], plaintext: &[u8]) -> Option<bytes::Bytes> {
    use base64::Engine as _;
    let member = ENCRYPT_PLACEHOLDER_MEMBER;
    let mut found = serialized
        .windows(member.len())
        .enumerate()
        .filter(|(_, window)| *window == member)
        .map(|(at, _)| at);
    let at = found.next()?;
    if found.next().is_some() {
        return None;
    }
    let start = at + b"\"Plaintext\":\"".len();
    let end = at + member.len() - 1;
    let mut body = Zeroizing::new(Vec::with_capacity(serialized.len()));
    body.extend_from_slice(serialized);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(plaintext, &mut body[start..end])
        .ok()?;
    (written == end - start).then(|| bytes::Bytes::from_owner(body))
}

/// Why an Encrypt request was not sent.
#[derive(Debug)]
struct PlaceholderMissing;

impl fmt::Display for PlaceholderMissing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "the SDK's Encrypt request body does not hold the plaintext where phi expects it; \
             nothing was sent",
        )
    }
}

impl std::error::Error for PlaceholderMissing {}

impl Kms {
    async fn generate(
        &self,
        owner: &str,
        version: u32,
    ) -> Result<(KeyBytes, Vec<u8>), AwsKmsError> {
        let purpose = Purpose::DataKey { owner, version };
        let sent = self
            .client
            .generate_data_key()
            .key_id(&self.key_id)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(self.context(purpose)))
            .send();
        self.call(Op::GenerateDataKey, purpose, sent, |mut out| {
            let key = self.key_bytes(Op::GenerateDataKey, out.plaintext.take())?;
            let wrapped = self.ciphertext(Op::GenerateDataKey, out.ciphertext_blob.take())?;
            Ok((key, wrapped))
        })
        .await
    }

    /// Decrypt of a data key (or of the check value), with the configured
    /// key.
    async fn decrypt(
        &self,
        purpose: Purpose<'_>,
        wrapped: Vec<u8>,
    ) -> Result<KeyBytes, AwsKmsError> {
        let sent = self
            .client
            .decrypt()
            .key_id(&self.key_id)
            .ciphertext_blob(Blob::new(wrapped))
            .set_encryption_context(Some(self.context(purpose)))
            .send();
        self.call(Op::Decrypt, purpose, sent, |mut out| {
            self.key_bytes(Op::Decrypt, out.plaintext.take())
        })
        .await
    }

    /// Encrypt of a data key (or of the check canary). The SDK is handed
    /// the public [`ENCRYPT_PLACEHOLDER`], never `plaintext`: it copies its
    /// input into buffers phi cannot wipe. Just before the request is
    /// signed, its body is rebuilt with `plaintext` in a buffer that wipes
    /// itself ([`encrypt_body`]); a body without the placeholder is not
    /// sent.
    async fn encrypt(
        &self,
        purpose: Purpose<'_>,
        plaintext: KeyBytes,
    ) -> Result<Vec<u8>, AwsKmsError> {
        let sent = self
            .client
            .encrypt()
            .key_id(&self.key_id)
            .plaintext(Blob::new(ENCRYPT_PLACEHOLDER.to_vec()))
            .set_encryption_context(Some(self.context(purpose)))
            .customize()
            .map_request(move |mut request| {
                let body = request
                    .body()
                    .bytes()
                    .and_then(|serialized| encrypt_body(serialized, plaintext.expose()))
                    .ok_or(PlaceholderMissing)?;
                *request.body_mut() = body.into();
                Ok::<_, PlaceholderMissing>(request)
            })
            .send();
        self.call(Op::Encrypt, purpose, sent, |mut out| {
            self.ciphertext(Op::Encrypt, out.ciphertext_blob.take())
        })
        .await
    }

    /// The one path of every KMS call: counts it, runs `sent` in its span,
    /// maps an SDK error, reads the answer with `read`, and records the
    /// outcome (log, metrics, failure count).
    async fn call<O, T, E, R>(
        &self,
        op: Op,
        purpose: Purpose<'_>,
        sent: impl Future<Output = Result<O, SdkError<E, R>>>,
        read: impl FnOnce(O) -> Result<T, AwsKmsError>,
    ) -> Result<T, AwsKmsError>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: fmt::Debug + 'static,
    {
        let counter = match op {
            Op::GenerateDataKey => &self.counters.generate,
            Op::Decrypt => &self.counters.decrypt,
            Op::Encrypt => &self.counters.encrypt,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let span = self.span(op, purpose);
        let started = Instant::now();
        let sent = sent.instrument(span.clone()).await;
        let result = sent
            .map_err(|e| self.sdk_error(op.name(), &e))
            .and_then(read);
        self.finish(&span, op.name(), started, result)
    }

    /// The encryption context of a call: the owner and version of a data
    /// key, or the KEK id of a check value.
    fn context(&self, purpose: Purpose<'_>) -> std::collections::HashMap<String, String> {
        match purpose {
            Purpose::DataKey { owner, version } => [
                (CONTEXT_OWNER.to_owned(), owner.to_owned()),
                (CONTEXT_DEK_VERSION.to_owned(), version.to_string()),
            ]
            .into(),
            Purpose::Check => [(CONTEXT_KEK_CHECK.to_owned(), self.kek_id.clone())].into(),
        }
    }

    /// The span of a call. For a data key, the owner is on the keyring's
    /// enclosing span, which writes it as the keyring is configured to.
    fn span(&self, op: Op, purpose: Purpose<'_>) -> tracing::Span {
        let operation = op.name();
        match purpose {
            Purpose::DataKey { version, .. } => tracing::debug_span!(
                "phi.kms",
                "rpc.system" = "aws-api",
                "rpc.service" = "KMS",
                "rpc.method" = operation,
                version,
                kek = %self.kek_id
            ),
            Purpose::Check => tracing::debug_span!(
                "phi.kms",
                "rpc.system" = "aws-api",
                "rpc.service" = "KMS",
                "rpc.method" = operation,
                check = true,
                kek = %self.kek_id
            ),
        }
    }

    /// The `CiphertextBlob` of an answer.
    fn ciphertext(&self, op: Op, blob: Option<Blob>) -> Result<Vec<u8>, AwsKmsError> {
        blob.map(Blob::into_inner)
            .ok_or_else(|| self.error(op.name(), AwsKmsErrorKind::BadResponse, "no CiphertextBlob"))
    }

    fn finish<T>(
        &self,
        span: &tracing::Span,
        operation: &'static str,
        started: Instant,
        result: Result<T, AwsKmsError>,
    ) -> Result<T, AwsKmsError> {
        let seconds = started.elapsed().as_secs_f64();
        let millis = seconds * 1000.0;
        let _entered = span.enter();
        let outcome = match &result {
            Ok(_) => {
                tracing::debug!(millis, "{operation} succeeded");
                SUCCESS
            }
            Err(error) => {
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(millis, kind = ?error.kind, "{operation} failed: {error}");
                error.kind.label()
            }
        };
        let operation = operation_label(operation);
        metrics::counter!(KMS_CALLS_TOTAL, "operation" => operation, "outcome" => outcome)
            .increment(1);
        metrics::histogram!(KMS_CALL_DURATION_SECONDS, "operation" => operation).record(seconds);
        result
    }

    /// Moves a plaintext key out of a response into zeroizing key bytes.
    fn key_bytes(&self, op: Op, plaintext: Option<Blob>) -> Result<KeyBytes, AwsKmsError> {
        let operation = op.name();
        let bytes =
            Zeroizing::new(plaintext.map(Blob::into_inner).ok_or_else(|| {
                self.error(operation, AwsKmsErrorKind::BadResponse, "no Plaintext")
            })?);
        KeyBytes::from_slice(&bytes).ok_or_else(|| {
            self.error(
                operation,
                AwsKmsErrorKind::BadResponse,
                format!("the data key is {} bytes, not 32", bytes.len()),
            )
        })
    }

    fn error(
        &self,
        operation: &'static str,
        kind: AwsKmsErrorKind,
        detail: impl Into<String>,
    ) -> AwsKmsError {
        AwsKmsError {
            operation,
            key_id: self.key_id.clone(),
            endpoint: self.endpoint.clone(),
            kind,
            detail: detail.into(),
        }
    }

    fn runtime_error(&self, operation: &'static str, cause: &dyn fmt::Display) -> AwsKmsError {
        self.error(
            operation,
            AwsKmsErrorKind::Other,
            format!("the KMS runtime failed: {cause}"),
        )
    }

    fn sdk_error<E, R>(&self, operation: &'static str, error: &SdkError<E, R>) -> AwsKmsError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: fmt::Debug + 'static,
    {
        let (kind, detail) = match error {
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => (
                AwsKmsErrorKind::Unreachable,
                crate::error::chain_text(error),
            ),
            SdkError::ServiceError(service) => {
                let err = service.err();
                let code = err.code().unwrap_or("unknown error");
                let kind = match code {
                    "DisabledException" => AwsKmsErrorKind::KeyDisabled,
                    "KMSInvalidStateException" | "KeyUnavailableException" => {
                        AwsKmsErrorKind::KeyState
                    }
                    "InvalidCiphertextException" | "IncorrectKeyException" => {
                        AwsKmsErrorKind::InvalidCiphertext
                    }
                    "AccessDeniedException"
                    | "UnrecognizedClientException"
                    | "InvalidSignatureException"
                    | "ExpiredTokenException" => AwsKmsErrorKind::AccessDenied,
                    "NotFoundException" => AwsKmsErrorKind::KeyNotFound,
                    "ThrottlingException" | "LimitExceededException" => AwsKmsErrorKind::Throttled,
                    "DependencyTimeoutException" | "KMSInternalException" => {
                        AwsKmsErrorKind::Unreachable
                    }
                    _ => AwsKmsErrorKind::Other,
                };
                let detail = match err.message() {
                    Some(message) if !message.is_empty() => format!("{code}: {message}"),
                    _ => code.to_owned(),
                };
                (kind, detail)
            }
            SdkError::ResponseError(_) => (
                AwsKmsErrorKind::BadResponse,
                crate::error::chain_text(error),
            ),
            _ => (AwsKmsErrorKind::Other, crate::error::chain_text(error)),
        };
        self.error(operation, kind, detail)
    }
}

/// The KEK's own tokio runtime. Calls are spawned on it and the calling
/// thread waits on a channel, so a caller inside another runtime never
/// enters this one (no "runtime within a runtime") and never blocks it.
struct Worker {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Worker {
    fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("phi-kms")
            .enable_all()
            .build()?;
        Ok(Worker {
            runtime: Some(runtime),
        })
    }

    fn run<F>(&self, future: F) -> Result<F::Output, &'static str>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let runtime = self.runtime.as_ref().ok_or("the runtime is shut down")?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            // The caller waits for this; it only goes away if it panicked.
            let _ = tx.send(future.await);
        });
        rx.recv()
            .map_err(|_| "the call's task ended without an answer")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Never blocks, so dropping the KEK inside an async context is fine.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SDK's serializer writes the placeholder as phi expects.
    #[test]
    fn the_placeholder_member_is_the_sdks_serialization_of_the_placeholder() {
        let encoded = aws_sdk_kms::primitives::Blob::new(ENCRYPT_PLACEHOLDER.to_vec());
        use base64::Engine as _;
        let text = base64::engine::general_purpose::STANDARD.encode(encoded.as_ref());
        assert_eq!(
            ENCRYPT_PLACEHOLDER_MEMBER,
            format!("\"Plaintext\":\"{text}\"").as_bytes()
        );
    }

    /// The Encrypt body carries the real plaintext only in the buffer phi
    /// builds, which has the serialized body's size; a body without the
    /// placeholder (or with it twice) is never sent.
    #[test]
    fn the_encrypt_body_swaps_the_placeholder_for_the_plaintext() {
        use base64::Engine as _;
        let member = std::str::from_utf8(ENCRYPT_PLACEHOLDER_MEMBER).expect("ASCII");
        let serialized = format!(
            "{{\"EncryptionContext\":{{\"phi:owner\":\"o\"}},\"KeyId\":\"alias/k\",{member}}}"
        );
        let key = [0xA5u8; 32];
        let body = encrypt_body(serialized.as_bytes(), &key).expect("swapped");
        let expected = serialized.replace(
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            &base64::engine::general_purpose::STANDARD.encode(key),
        );
        assert_eq!(&body[..], expected.as_bytes());
        assert_eq!(body.len(), serialized.len());
        assert!(encrypt_body(b"{\"Plaintext\":\"other\"}", &key).is_none());
        let twice = format!("{{{member},{member}}}");
        assert!(encrypt_body(twice.as_bytes(), &key).is_none());
        // An owner id that looks like the member is escaped by JSON: it
        // is not taken for it.
        let escaped = format!(
            "{{\"EncryptionContext\":{{\"phi:owner\":\"{}\"}},{member}}}",
            member.replace('"', "\\\"")
        );
        let body = encrypt_body(escaped.as_bytes(), &key).expect("the member only");
        assert!(
            std::str::from_utf8(&body)
                .expect("text")
                .contains("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
        );
    }

    /// What `wrap` moves into its task is zeroizing key bytes in an
    /// allocation of their own, not a `Vec` or a `Blob`.
    #[test]
    fn the_wrap_plaintext_is_a_zeroizing_copy() {
        let key = KeyBytes::new([3; 32]);
        let copy: KeyBytes = wrap_plaintext(&key);
        assert_eq!(copy.expose(), key.expose());
        assert_ne!(copy.expose().as_ptr(), key.expose().as_ptr());
    }

    fn unreachable_kek() -> AwsKmsKek {
        // Nothing listens on port 9 of the loopback: connections are refused.
        AwsKmsKek::builder("alias/phi-unit")
            .region("us-east-1")
            .endpoint_url("http://127.0.0.1:9")
            .static_credentials("AKIDUNIT", "very-secret-key")
            .connect_timeout(Duration::from_millis(200))
            .operation_timeout(Duration::from_secs(1))
            .max_attempts(1)
            .build()
            .expect("builds without calling the KMS")
    }

    #[test]
    fn ids_and_debug_name_the_key_never_the_credentials() {
        let builder =
            AwsKmsKek::builder("alias/x").static_credentials("AKIDUNIT", "very-secret-key");
        assert!(!format!("{builder:?}").contains("very-secret-key"));
        let kek = unreachable_kek();
        assert_eq!(kek.id(), "aws-kms:alias/phi-unit");
        assert_eq!(kek.key_id(), "alias/phi-unit");
        let shown = format!("{kek:?}");
        assert!(shown.contains("alias/phi-unit"), "{shown}");
        assert!(
            !shown.contains("very-secret-key") && !shown.contains("AKIDUNIT"),
            "{shown}"
        );
        let renamed = AwsKmsKek::builder("alias/x")
            .region("us-east-1")
            .kek_id("kms-prod")
            .build();
        assert_eq!(renamed.expect("builds").id(), "kms-prod");
    }

    #[test]
    fn an_unreachable_kms_is_reported_as_such_for_every_operation() {
        let kek = unreachable_kek();
        let key = KeyBytes::new([1; 32]);
        let errors: Vec<BoxError> = vec![
            kek.generate("o", 1).map(|_| ()).expect_err("generate"),
            kek.wrap("o", 1, &key).map(|_| ()).expect_err("wrap"),
            kek.unwrap("o", 1, b"x").map(|_| ()).expect_err("unwrap"),
        ];
        let many = kek.unwrap_many(&[("o", 1, b"x"), ("p", 2, b"y")]);
        for (error, op) in errors
            .iter()
            .chain(many.iter().filter_map(|r| r.as_ref().err()))
            .zip([
                "GenerateDataKey",
                "Encrypt",
                "Decrypt",
                "Decrypt",
                "Decrypt",
            ])
        {
            let error = error.downcast_ref::<AwsKmsError>().expect("AwsKmsError");
            assert_eq!(error.kind(), AwsKmsErrorKind::Unreachable, "{error}");
            assert_eq!(error.operation(), op);
            let text = error.to_string();
            assert!(
                text.contains("alias/phi-unit") && text.contains("127.0.0.1:9"),
                "{text}"
            );
        }
        let stats = kek.stats();
        assert_eq!(
            (
                stats.generate_data_key,
                stats.encrypt,
                stats.decrypt,
                stats.failures
            ),
            (1, 1, 3, 5)
        );
    }
}
