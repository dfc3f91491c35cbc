//! Blind-index keys: derived from each data key version per scope, and
//! cached beside the owner's data keys. The format they serve, and the
//! normalisation of the values they hash, are in [`crate::blind`].

use std::sync::{Arc, RwLock};

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::dek::Dek;

/// Length of a stored blind index value, in bytes.
pub const BLIND_INDEX_LEN: usize = 16;

/// The HKDF `info` prefix of the blind-index key.
pub const BLIND_INDEX_INFO: &[u8] = b"phi-blind-index-v1";

/// The blind-index key of one data key version and one scope.
///
/// Zeroized on drop; its `Debug` shows nothing of the key.
pub struct BlindIndexKey {
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for BlindIndexKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlindIndexKey(<redacted>)")
    }
}

impl BlindIndexKey {
    /// Derives the key for `scope` (`table.column`) from `dek`.
    pub fn derive(dek: &Dek, scope: &str) -> Self {
        let hkdf = Hkdf::<Sha256>::new(None, dek.key().expose());
        let mut key = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's 8,160-byte limit.
        let expanded = hkdf.expand_multi_info(&[BLIND_INDEX_INFO, scope.as_bytes()], &mut key[..]);
        debug_assert!(expanded.is_ok());
        BlindIndexKey { key }
    }

    /// The index value of already normalised bytes.
    pub fn compute(&self, normalised: &[u8]) -> [u8; BLIND_INDEX_LEN] {
        // HMAC accepts keys of any length.
        let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&self.key[..])
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(normalised);
        let tag = mac.finalize().into_bytes();
        let mut out = [0u8; BLIND_INDEX_LEN];
        out.copy_from_slice(&tag[..BLIND_INDEX_LEN]);
        out
    }
}

/// The blind-index keys an owner's data keys have derived, so that a batch
/// derives each (version, scope) key once.
#[derive(Default)]
pub(crate) struct BlindKeyCache {
    keys: RwLock<Vec<DerivedKey>>,
}

/// A blind-index key with the data key version and scope it derives from.
type DerivedKey = (u32, Box<str>, Arc<BlindIndexKey>);

impl BlindKeyCache {
    pub(crate) fn get(&self, dek: &Dek, scope: &str) -> Arc<BlindIndexKey> {
        let find = |keys: &[DerivedKey]| {
            keys.iter()
                .find(|(v, s, _)| *v == dek.version() && &**s == scope)
                .map(|(_, _, k)| Arc::clone(k))
        };
        if let Some(key) = find(
            &self
                .keys
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ) {
            return key;
        }
        let mut keys = self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(key) = find(&keys) {
            return key;
        }
        let key = Arc::new(BlindIndexKey::derive(dek, scope));
        keys.push((dek.version(), scope.into(), Arc::clone(&key)));
        key
    }
}
