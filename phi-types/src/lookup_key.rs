//! Lookup-index keys and values: what the derive's generated code and the
//! keyring compute, below the re-index job ([`crate::lookup`] documents
//! the construction).

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::blind::Normalize;
use crate::dek::Dek;
use crate::error::Result;
use crate::keyring::{Keyring, LOOKUP_OWNER, OwnerKeys};
use crate::value::PhiValue;

/// The HKDF `info` prefix of a lookup-index key.
pub const LOOKUP_INDEX_INFO: &[u8] = b"phi-lookup-index-v1";

/// Length of the HMAC tag kept in a lookup value, in bytes.
pub const LOOKUP_TAG_LEN: usize = 16;

/// Length of a stored lookup value: the key version (4 bytes, big-endian)
/// and the tag.
pub const LOOKUP_INDEX_LEN: usize = 4 + LOOKUP_TAG_LEN;

/// The lookup-index key of one data key version of [`LOOKUP_OWNER`] and
/// one scope.
///
/// Zeroized on drop; its `Debug` shows nothing of the key.
pub struct LookupIndexKey {
    key: Zeroizing<[u8; 32]>,
    version: u32,
}

impl std::fmt::Debug for LookupIndexKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LookupIndexKey")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl LookupIndexKey {
    /// Derives the key for `scope` from `dek`, a data key of
    /// [`LOOKUP_OWNER`].
    pub fn derive(dek: &Dek, scope: &str) -> Self {
        let hkdf = Hkdf::<Sha256>::new(None, dek.key().expose());
        let mut key = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's 8,160-byte limit.
        let expanded = hkdf.expand_multi_info(&[LOOKUP_INDEX_INFO, scope.as_bytes()], &mut key[..]);
        debug_assert!(expanded.is_ok());
        LookupIndexKey {
            key,
            version: dek.version(),
        }
    }

    /// The data key version this key derives from.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The stored value of already normalised bytes.
    pub fn compute(&self, normalised: &[u8]) -> [u8; LOOKUP_INDEX_LEN] {
        let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&self.key[..])
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(normalised);
        let tag = mac.finalize().into_bytes();
        let mut out = [0u8; LOOKUP_INDEX_LEN];
        out[..4].copy_from_slice(&self.version.to_be_bytes());
        out[4..].copy_from_slice(&tag[..LOOKUP_TAG_LEN]);
        out
    }

    /// The stored value of encoded bytes: normalised, then hashed.
    pub fn compute_encoded(&self, encoded: &[u8], normalize: Normalize) -> [u8; LOOKUP_INDEX_LEN] {
        let normalised = normalize.apply(encoded);
        let out = self.compute(&normalised);
        if let std::borrow::Cow::Owned(mut owned) = normalised {
            zeroize::Zeroize::zeroize(&mut owned);
        }
        out
    }

    /// The stored value of `value`: encoded as [`PhiValue`], normalised,
    /// then hashed.
    pub fn index<T: PhiValue>(&self, value: &T, normalize: Normalize) -> [u8; LOOKUP_INDEX_LEN] {
        let mut encoded = Zeroizing::new(Vec::with_capacity(value.encoded_len()));
        value.encode(&mut encoded);
        self.compute_encoded(&encoded, normalize)
    }
}

/// The value to store, under the current version of `keys` (the reserved
/// owner's).
pub(crate) fn current_index<T: PhiValue>(
    keys: &OwnerKeys,
    scope: &str,
    value: &T,
    normalize: Normalize,
) -> Result<Vec<u8>> {
    let dek = keys.current_dek()?;
    Ok(LookupIndexKey::derive(dek, scope)
        .index(value, normalize)
        .to_vec())
}

/// The values to look up: one per version `keys` hold.
pub(crate) fn all_indexes<T: PhiValue>(
    keys: &OwnerKeys,
    scope: &str,
    value: &T,
    normalize: Normalize,
) -> Vec<Vec<u8>> {
    keys.versions()
        .filter_map(|version| keys.dek(version))
        .map(|dek| {
            LookupIndexKey::derive(dek, scope)
                .index(value, normalize)
                .to_vec()
        })
        .collect()
}

impl Keyring {
    /// The keys of [`LOOKUP_OWNER`] for writing lookup values: its first
    /// data key is created if it has none.
    ///
    /// # Errors
    /// Key store and KEK errors, as [`keys_for_seal`](Self::keys_for_seal).
    pub fn lookup_keys(&self) -> Result<std::sync::Arc<OwnerKeys>> {
        self.reserved_keys(LOOKUP_OWNER, true)
    }

    /// [`lookup_keys`](Self::lookup_keys) without blocking the task's thread
    /// (feature `async`).
    ///
    /// # Errors
    /// As [`lookup_keys`](Self::lookup_keys).
    #[cfg(feature = "async")]
    pub async fn lookup_keys_async(&self) -> Result<std::sync::Arc<OwnerKeys>> {
        self.reserved_keys_async(LOOKUP_OWNER, true).await
    }

    /// The lookup value of `value` in `scope` to store, under the current
    /// version of [`LOOKUP_OWNER`]'s key.
    ///
    /// # Errors
    /// As [`lookup_keys`](Self::lookup_keys).
    pub fn lookup_index<T: PhiValue>(
        &self,
        scope: &str,
        value: &T,
        normalize: Normalize,
    ) -> Result<Vec<u8>> {
        current_index(&*self.lookup_keys()?, scope, value, normalize)
    }

    /// The values to find `value` in `scope` by (`column.eq_any(…)`): one per
    /// version of [`LOOKUP_OWNER`]'s key, retired versions included. Empty
    /// when no lookup value was ever written (no key exists); never creates
    /// a key.
    ///
    /// # Errors
    /// Key store and KEK errors.
    pub fn lookup_indexes<T: PhiValue>(
        &self,
        scope: &str,
        value: &T,
        normalize: Normalize,
    ) -> Result<Vec<Vec<u8>>> {
        let keys = self.reserved_keys(LOOKUP_OWNER, false)?;
        Ok(all_indexes(&keys, scope, value, normalize))
    }

    /// [`lookup_indexes`](Self::lookup_indexes) without blocking the task's
    /// thread (feature `async`).
    ///
    /// # Errors
    /// As [`lookup_indexes`](Self::lookup_indexes).
    #[cfg(feature = "async")]
    pub async fn lookup_indexes_async<T: PhiValue>(
        &self,
        scope: &str,
        value: &T,
        normalize: Normalize,
    ) -> Result<Vec<Vec<u8>>> {
        let keys = self.reserved_keys_async(LOOKUP_OWNER, false).await?;
        Ok(all_indexes(&keys, scope, value, normalize))
    }
}
