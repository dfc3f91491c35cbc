//! Blind-index keys: derived from each data key version per scope, and
//! cached beside the owner's data keys. The format they serve, and the
//! normalisation of the values they hash, are in [`crate::blind`].

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

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

    /// Derives a key from `dek` with HKDF-SHA256 (salt empty) and `info`
    /// the concatenation of `info`'s parts: the derivation of
    /// [derived indexes](crate::blind::derived).
    pub fn derive_with_info(dek: &Dek, info: &[&[u8]]) -> Self {
        let hkdf = Hkdf::<Sha256>::new(None, dek.key().expose());
        let mut key = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's 8,160-byte limit.
        let expanded = hkdf.expand_multi_info(info, &mut key[..]);
        debug_assert!(expanded.is_ok());
        BlindIndexKey { key }
    }

    /// A second copy of the key (zeroized on drop like the first).
    fn duplicate(&self) -> Self {
        BlindIndexKey {
            key: Zeroizing::new(*self.key),
        }
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
/// derives each (version, scope) key once. One allocation an owner for its
/// first key (the entries are stored inline, the scope shared with every
/// other owner's entry for it: see [`intern`]).
#[derive(Default)]
pub(crate) struct BlindKeyCache {
    keys: RwLock<Vec<DerivedKey>>,
}

/// A blind-index key with the data key version and scope it derives from.
/// `(version, derived, scope, key)`: `derived` keeps the keys of derived
/// and compound indexes apart from blind-index keys of any scope.
type DerivedKey = (u32, bool, Arc<str>, BlindIndexKey);

/// The one shared copy of `scope`: a process holds as many scopes as its
/// models have blind-indexed columns, and every owner's cache points at
/// them instead of holding its own copy. Scopes are never forgotten: an
/// application passing scopes built at run time to
/// [`OwnerKeys::blind_index`](crate::OwnerKeys::blind_index) (not a
/// `table.column` of its models) grows this set by each new one.
fn intern(scope: &str) -> Arc<str> {
    static SCOPES: OnceLock<Mutex<HashSet<Arc<str>>>> = OnceLock::new();
    let mut scopes = SCOPES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(found) = scopes.get(scope) {
        return Arc::clone(found);
    }
    let scope: Arc<str> = scope.into();
    scopes.insert(Arc::clone(&scope));
    scope
}

impl BlindKeyCache {
    /// Runs `f` with the blind-index key of `dek`'s version and `scope`,
    /// derived on first use.
    pub(crate) fn with<R>(&self, dek: &Dek, scope: &str, f: impl FnOnce(&BlindIndexKey) -> R) -> R {
        self.with_kind(dek, false, scope, || BlindIndexKey::derive(dek, scope), f)
    }

    /// [`with`](Self::with) for a key derived otherwise (a
    /// [derived or compound index](crate::blind::derived)'s), cached under
    /// `scope` (the index's scope and spec) apart from blind-index keys.
    pub(crate) fn with_derived<R>(
        &self,
        dek: &Dek,
        scope: &str,
        derive: impl FnOnce() -> BlindIndexKey,
        f: impl FnOnce(&BlindIndexKey) -> R,
    ) -> R {
        self.with_kind(dek, true, scope, derive, f)
    }

    fn with_kind<R>(
        &self,
        dek: &Dek,
        derived: bool,
        scope: &str,
        derive: impl FnOnce() -> BlindIndexKey,
        f: impl FnOnce(&BlindIndexKey) -> R,
    ) -> R {
        let find = |keys: &[DerivedKey]| {
            keys.iter()
                .position(|(v, d, s, _)| *v == dek.version() && *d == derived && &**s == scope)
        };
        {
            let keys = self
                .keys
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(at) = find(&keys) {
                return f(&keys[at].3);
            }
        }
        let mut keys = self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let at = match find(&keys) {
            Some(at) => at,
            None => {
                if keys.len() == keys.capacity() {
                    // Grown by hand: a `Vec` growing moves its entries and
                    // frees the old buffer unwiped. Copies are made and the
                    // old entries dropped, which zeroizes their keys.
                    let mut grown = Vec::with_capacity((keys.len() * 2).max(1));
                    grown.extend(
                        keys.iter()
                            .map(|(v, d, s, k)| (*v, *d, Arc::clone(s), k.duplicate())),
                    );
                    *keys = grown;
                }
                keys.push((dek.version(), derived, intern(scope), derive()));
                keys.len() - 1
            }
        };
        f(&keys[at].3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dek::KeyBytes;

    #[test]
    fn the_cache_keeps_every_derived_key_as_it_grows_and_shares_scopes() {
        let deks = [
            Dek::new(1, KeyBytes::new([1; 32])),
            Dek::new(2, KeyBytes::new([2; 32])),
        ];
        let scopes = ["cases.patient_last", "cases.patient_dob", "visits.reason"];
        let cache = BlindKeyCache::default();
        let index = |dek: &Dek, scope: &str| cache.with(dek, scope, |k| k.compute(b"doe"));
        // The entries' buffer grows from 1 to 2, 4 and 8 entries: after
        // each new key, every key so far still matches a fresh derivation.
        for (n, (dek, scope)) in deks
            .iter()
            .flat_map(|d| scopes.iter().map(move |s| (d, *s)))
            .enumerate()
        {
            assert_eq!(
                index(dek, scope),
                BlindIndexKey::derive(dek, scope).compute(b"doe")
            );
            for (dek, scope) in deks
                .iter()
                .flat_map(|d| scopes.iter().map(move |s| (d, *s)))
                .take(n + 1)
            {
                assert_eq!(
                    index(dek, scope),
                    BlindIndexKey::derive(dek, scope).compute(b"doe")
                );
            }
        }
        let keys = cache.keys.read().expect("lock");
        assert_eq!(keys.len(), 6, "each (version, scope) derived once");
        let other = BlindKeyCache::default();
        other.with(&deks[0], scopes[0], |_| ());
        let theirs = other.keys.read().expect("lock");
        assert!(
            Arc::ptr_eq(&keys[0].2, &theirs[0].2),
            "one shared copy of the scope"
        );
    }
}
