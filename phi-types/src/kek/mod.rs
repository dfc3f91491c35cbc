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

#[cfg(feature = "aws-kms")]
pub use aws::{
    AwsKmsError, AwsKmsErrorKind, AwsKmsKek, AwsKmsKekBuilder, AwsKmsStats, CONTEXT_DEK_VERSION,
    CONTEXT_OWNER, KMS_CALL_SECONDS, KMS_CALLS_TOTAL,
};
pub use local::{LocalKek, MASTER_KEY_ENV, MASTER_KEY_FILE_ENV};

use crate::dek::KeyBytes;
use crate::error::BoxError;

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
}
