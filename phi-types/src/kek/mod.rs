//! Key encryption keys (KEKs): what wraps each data key.
//!
//! A KEK never leaves its provider in production: `AwsKmsKek` (feature
//! `aws-kms`) keeps it in AWS KMS. [`LocalKek`] holds a 256-bit master key
//! in memory for development, tests and deployments without a KMS. Several
//! KEKs may be configured at once: every data key row records the id of the
//! KEK that wrapped it.

#[cfg(feature = "aws-kms")]
mod aws;
mod local;
mod spec;

#[cfg(feature = "aws-kms")]
pub use aws::{
    AwsKmsError, AwsKmsErrorKind, AwsKmsKek, AwsKmsKekBuilder, AwsKmsStats, CONTEXT_DEK_VERSION,
    CONTEXT_KEK_CHECK, CONTEXT_OWNER,
};
pub use local::{CHECK_FORMAT_LOCAL, LocalKek, MASTER_KEY_ENV, MASTER_KEY_FILE_ENV};
#[cfg(feature = "cli")]
pub(crate) use local::{decode_master_key, read_master_key_file};
pub use spec::{DEFAULT_LOCAL_KEK_ID, KEK_ENV, KEK_ID_ENV, KekSpec};

use std::fmt;

use crate::dek::KeyBytes;
use crate::error::BoxError;

/// The future a [`KeyEncryptionKey`]'s async methods return (feature
/// `async`).
#[cfg(feature = "async")]
pub type KekFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// The 32 bytes a canary check value wraps: `"phi-kek-check-v1"` twice.
/// Public on purpose: a check value commits to the key, not to a secret.
pub const CHECK_CANARY: &[u8; 32] = b"phi-kek-check-v1phi-kek-check-v1";

/// The owner a [`KeyEncryptionKey`]'s default canary is wrapped for, with
/// data key version 0 (never a real version, so a canary never passes for
/// a data key).
pub const CHECK_OWNER: &str = "phi:kek-check";

/// Format of the default check value: [`CHECK_CANARY`] wrapped by
/// [`KeyEncryptionKey::wrap`] for [`CHECK_OWNER`], version 0.
pub const CHECK_FORMAT_WRAP: &str = "wrap-canary-v1";

/// A KEK's check value: a commitment to its key material, stored once per
/// KEK id in `kek_check_values`. A KEK whose key material differs from the
/// one that made the check value does not verify against it.
///
/// It reveals nothing of the key: [`LocalKek`]'s is a one-way HMAC, a
/// KMS's a ciphertext only the KMS opens.
#[derive(Clone, PartialEq, Eq)]
pub struct KekCheck {
    /// What `value` is: `local-hmac-v1`, `kms-canary-v1` or
    /// `wrap-canary-v1` (stored in `kek_check_values.format`).
    pub format: String,
    /// The check value itself (`kek_check_values.check_value`).
    pub value: Vec<u8>,
}

impl KekCheck {
    /// A check value of `format`.
    pub fn new(format: impl Into<String>, value: Vec<u8>) -> Self {
        KekCheck {
            format: format.into(),
            value,
        }
    }
}

impl fmt::Debug for KekCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KekCheck")
            .field("format", &self.format)
            .field("bytes", &self.value.len())
            .finish_non_exhaustive()
    }
}

crate::shared::into_shared!(KeyEncryptionKey);

/// A key encryption key: wraps and unwraps owners' data keys.
///
/// Implementations bind each wrapped key to its owner and version (the
/// associated data of [`LocalKek`], the encryption context of AWS KMS), so a
/// wrapped key copied to another owner or version does not unwrap.
pub trait KeyEncryptionKey: Send + Sync + std::fmt::Debug {
    /// The id recorded in `user_encryption_keys.kek_id` for keys this KEK
    /// wraps.
    fn id(&self) -> &str;

    /// Generates a new data key for (`owner`, `version`), returning the
    /// plaintext key and its wrapped form. The default draws the key from the
    /// OS and calls [`wrap`](Self::wrap); a KMS overrides it with its own
    /// data-key generation.
    ///
    /// # Errors
    /// The provider failed or the random source failed.
    fn generate(&self, owner: &str, version: u32) -> Result<(KeyBytes, Vec<u8>), BoxError> {
        let key = KeyBytes::generate()?;
        let wrapped = self.wrap(owner, version, &key)?;
        Ok((key, wrapped))
    }

    /// Wraps `key` for (`owner`, `version`).
    ///
    /// # Errors
    /// The provider failed.
    fn wrap(&self, owner: &str, version: u32, key: &KeyBytes) -> Result<Vec<u8>, BoxError>;

    /// Unwraps a key wrapped for (`owner`, `version`).
    ///
    /// # Errors
    /// The provider failed, or the wrapped bytes do not authenticate for this
    /// owner and version.
    fn unwrap(&self, owner: &str, version: u32, wrapped: &[u8]) -> Result<KeyBytes, BoxError>;

    /// Unwraps many keys, each given as (`owner`, `version`, `wrapped`),
    /// with one result per key in the same order. The keyring resolves a
    /// batch of owners through this. The default unwraps one after another,
    /// right for a KEK in memory; a remote KEK overrides it to send its
    /// requests concurrently.
    fn unwrap_many(&self, keys: &[(&str, u32, &[u8])]) -> Vec<Result<KeyBytes, BoxError>> {
        keys.iter()
            .map(|(owner, version, wrapped)| self.unwrap(owner, *version, wrapped))
            .collect()
    }

    /// [`unwrap_many`](Self::unwrap_many) for async callers (feature
    /// `async`): the keyring's `*_async` resolution awaits it on the
    /// caller's runtime, so it must not block the thread.
    ///
    /// The default runs [`unwrap_many`](Self::unwrap_many) in place: right
    /// for a KEK that only computes (like [`LocalKek`], a few microseconds
    /// per key). A KEK that does I/O overrides it with async calls, as
    /// `AwsKmsKek` does, or moves its blocking calls to
    /// `tokio::task::spawn_blocking`.
    #[cfg(feature = "async")]
    fn unwrap_many_async<'a>(
        &'a self,
        keys: Vec<(String, u32, Vec<u8>)>,
    ) -> KekFuture<'a, Vec<Result<KeyBytes, BoxError>>> {
        Box::pin(async move {
            let refs: Vec<(&str, u32, &[u8])> = keys
                .iter()
                .map(|(owner, version, wrapped)| (owner.as_str(), *version, wrapped.as_slice()))
                .collect();
            self.unwrap_many(&refs)
        })
    }

    /// [`generate`](Self::generate) for async callers (feature `async`);
    /// the default runs it in place, as
    /// [`unwrap_many_async`](Self::unwrap_many_async) says.
    #[cfg(feature = "async")]
    fn generate_async<'a>(
        &'a self,
        owner: &'a str,
        version: u32,
    ) -> KekFuture<'a, Result<(KeyBytes, Vec<u8>), BoxError>> {
        Box::pin(async move { self.generate(owner, version) })
    }

    /// A new check value for this KEK's key material, stored once under its
    /// id by the first keyring built with it.
    ///
    /// The default wraps [`CHECK_CANARY`] for [`CHECK_OWNER`], version 0
    /// (format [`CHECK_FORMAT_WRAP`]).
    ///
    /// # Errors
    /// The provider failed.
    fn check_value(&self) -> Result<KekCheck, BoxError> {
        let canary = KeyBytes::new(*CHECK_CANARY);
        let wrapped = self.wrap(CHECK_OWNER, 0, &canary)?;
        Ok(KekCheck::new(CHECK_FORMAT_WRAP, wrapped))
    }

    /// Whether `check` was made by this KEK's key material: `Ok(false)` for
    /// another key (or another kind of KEK), an error when the provider
    /// cannot tell (unreachable, no permission).
    ///
    /// The default opens a [`CHECK_FORMAT_WRAP`] canary with
    /// [`unwrap`](Self::unwrap) and counts any failure as another key: a KEK
    /// whose unwraps can fail for other reasons overrides it.
    ///
    /// # Errors
    /// The provider failed in a way that says nothing about the key.
    fn verify_check_value(&self, check: &KekCheck) -> Result<bool, BoxError> {
        if check.format != CHECK_FORMAT_WRAP {
            return Ok(false);
        }
        Ok(self
            .unwrap(CHECK_OWNER, 0, &check.value)
            .is_ok_and(|key| key.expose() == CHECK_CANARY))
    }

    /// Whether this KEK opens a stored data key: how a key store holding
    /// data keys under this KEK's id but no check value (written before
    /// check values existed) is verified. `Ok(false)` when the key does not
    /// open (another key, or altered bytes); an error when the provider
    /// cannot tell. The default counts any unwrap failure as `Ok(false)`.
    ///
    /// # Errors
    /// The provider failed in a way that says nothing about the key.
    fn opens(&self, owner: &str, version: u32, wrapped: &[u8]) -> Result<bool, BoxError> {
        Ok(self.unwrap(owner, version, wrapped).is_ok())
    }
}
