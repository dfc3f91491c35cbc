//! Blind indexes: equality lookups on encrypted columns without decrypting.
//!
//! A blind index is a keyed hash of a value, stored in a column of its own
//! beside the ciphertext, so that "this owner's cases for patient Doe, born
//! 1980-01-15" is an indexed `WHERE` clause instead of a decrypt-everything
//! scan. The format is a contract:
//!
//! - key = HKDF-SHA256(ikm = the owner's data key, salt = empty,
//!   info = `"phi-blind-index-v1" ‖ scope`), 32 bytes;
//! - value = HMAC-SHA256(key, normalised UTF-8 bytes of the value), first
//!   16 bytes, stored as binary.
//!
//! The key is derived from the data key version that sealed the row, so a
//! lookup computes one value per version the owner holds
//! ([`OwnerKeys::blind_indexes`]) and matches any of them (`eq_any`):
//! rows sealed before a data key rotation are still found.
//!
//! A blind index reveals which rows of one owner share a value; that is its
//! purpose. Values of different owners, or of different columns, never
//! match, because the key depends on both.
//!
//! ```
//! use std::sync::Arc;
//! use phi_types::{Keyring, LocalKek, MemoryKeyStore, KeyBytes};
//! use phi_types::blind::Normalize;
//!
//! let kek = LocalKek::new("local-1", &KeyBytes::new([7; 32]));
//! let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), Arc::new(kek)).build()?;
//! let keys = keyring.keys_for_seal("provider-17")?;
//!
//! let stored = keys.blind_index("cases.patient_last", &"Doe ".to_string(), Normalize::TRIM_LOWERCASE)?;
//! let lookup = keys.blind_indexes("cases.patient_last", &"doe".to_string(), Normalize::TRIM_LOWERCASE);
//! assert!(lookup.contains(&stored));
//! # Ok::<(), phi_types::Error>(())
//! ```
//!
//! [`OwnerKeys::blind_indexes`]: crate::OwnerKeys::blind_indexes

pub mod derived;

use std::borrow::Cow;

use zeroize::Zeroizing;

use crate::error::Result;
use crate::keyring::OwnerKeys;
pub use crate::keyring::{BLIND_INDEX_INFO, BLIND_INDEX_LEN, BlindIndexKey};
use crate::value::PhiValue;
pub use derived::{CompoundIndex, DateParts, DerivedIndex, Transform};

/// How a value is normalised before it is hashed, so that lookups match
/// values that differ only in ways the application does not care about.
///
/// Normalisation applies to values whose encoding is UTF-8 text (strings,
/// dates); other encodings are hashed as they are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Normalize {
    trim: bool,
    lowercase: bool,
}

impl Normalize {
    /// Hash the value exactly as encoded.
    pub const NONE: Normalize = Normalize {
        trim: false,
        lowercase: false,
    };
    /// Remove leading and trailing white space.
    pub const TRIM: Normalize = Normalize {
        trim: true,
        lowercase: false,
    };
    /// Lower-case (Unicode) the value.
    pub const LOWERCASE: Normalize = Normalize {
        trim: false,
        lowercase: true,
    };
    /// Trim, then lower-case.
    pub const TRIM_LOWERCASE: Normalize = Normalize {
        trim: true,
        lowercase: true,
    };

    /// Whether leading and trailing white space is removed.
    pub fn trims(self) -> bool {
        self.trim
    }

    /// Whether the value is lower-cased.
    pub fn lowercases(self) -> bool {
        self.lowercase
    }

    /// Applies this normalisation to encoded bytes.
    pub fn apply(self, bytes: &[u8]) -> Cow<'_, [u8]> {
        if self == Normalize::NONE {
            return Cow::Borrowed(bytes);
        }
        let Ok(text) = std::str::from_utf8(bytes) else {
            return Cow::Borrowed(bytes);
        };
        let text = if self.trim { text.trim() } else { text };
        // Not `char::is_uppercase`: titlecase letters (`ǅ`, `ᾈ`) are not
        // uppercase, yet lower-case to other letters.
        if self.lowercase && text.chars().any(changes_when_lowercased) {
            Cow::Owned(text.to_lowercase().into_bytes())
        } else {
            Cow::Borrowed(text.as_bytes())
        }
    }
}

/// Whether lower-casing changes `c`.
fn changes_when_lowercased(c: char) -> bool {
    let mut lower = c.to_lowercase();
    lower.next() != Some(c) || lower.next().is_some()
}

impl BlindIndexKey {
    /// The index value of `value`: encoded as [`PhiValue`], normalised, then
    /// hashed.
    pub fn index<T: PhiValue>(&self, value: &T, normalize: Normalize) -> [u8; BLIND_INDEX_LEN] {
        let mut encoded = Zeroizing::new(Vec::with_capacity(value.encoded_len()));
        value.encode(&mut encoded);
        let normalised = normalize.apply(&encoded);
        let out = self.compute(&normalised);
        if let Cow::Owned(mut owned) = normalised {
            zeroize::Zeroize::zeroize(&mut owned);
        }
        out
    }
}

impl OwnerKeys {
    /// The blind index of `value` in `scope`, under the current data key:
    /// the value to store beside a newly sealed value.
    ///
    /// # Errors
    /// [`Error::NoKey`](crate::Error::NoKey) if the owner has no active data key.
    pub fn blind_index<T: PhiValue>(
        &self,
        scope: &str,
        value: &T,
        normalize: Normalize,
    ) -> Result<Vec<u8>> {
        let dek = self.current_dek()?;
        Ok(self
            .blind_keys
            .with(dek, scope, |key| key.index(value, normalize).to_vec()))
    }

    /// The blind index of `value` in `scope` under every data key version
    /// the owner holds: the values to look up (`column.eq_any(…)`). Empty
    /// when the owner has no keys, so the lookup finds nothing.
    pub fn blind_indexes<T: PhiValue>(
        &self,
        scope: &str,
        value: &T,
        normalize: Normalize,
    ) -> Vec<Vec<u8>> {
        self.versions()
            .filter_map(|version| self.dek(version))
            .map(|dek| {
                self.blind_keys
                    .with(dek, scope, |key| key.index(value, normalize).to_vec())
            })
            .collect()
    }
}

impl OwnerKeys {
    /// The tag of `value` in `index` on `scope` (`table.column`), under the
    /// current data key: what a derived index column stores beside a newly
    /// sealed value.
    ///
    /// # Errors
    /// [`Error::NoKey`](crate::Error::NoKey) if the owner has no active data key.
    pub fn derived_index<T: PhiValue>(
        &self,
        scope: &str,
        value: &T,
        index: &DerivedIndex,
    ) -> Result<Vec<u8>> {
        checked(scope, index.check())?;
        let mut encoded = Zeroizing::new(Vec::with_capacity(value.encoded_len()));
        value.encode(&mut encoded);
        Ok(self.derived_index_of(self.current_dek()?, scope, &encoded, index))
    }

    /// The tag of a value's encoding under data key `version`, if the
    /// owner holds it: what a value sealed under that version stores.
    pub(crate) fn derived_index_under(
        &self,
        version: u32,
        scope: &str,
        encoded: &[u8],
        index: &DerivedIndex,
    ) -> Option<Vec<u8>> {
        Some(self.derived_index_of(self.dek(version)?, scope, encoded, index))
    }

    /// The tag of a value's encoding under the current data key.
    pub(crate) fn derived_index_encoded(
        &self,
        scope: &str,
        encoded: &[u8],
        index: &DerivedIndex,
    ) -> Result<Vec<u8>> {
        Ok(self.derived_index_of(self.current_dek()?, scope, encoded, index))
    }

    fn derived_index_of(
        &self,
        dek: &crate::Dek,
        scope: &str,
        encoded: &[u8],
        index: &DerivedIndex,
    ) -> Vec<u8> {
        let input = index.input(encoded);
        self.blind_keys.with_derived(
            dek,
            &index.cache_scope(scope),
            || index.key(dek, scope),
            |key| index.tag(key, &input),
        )
    }

    /// The blind index of a value's encoding under the current data key.
    pub(crate) fn blind_index_encoded(
        &self,
        scope: &str,
        encoded: &[u8],
        normalize: Normalize,
    ) -> Result<Vec<u8>> {
        Ok(self.blind_index_of(self.current_dek()?, scope, encoded, normalize))
    }

    /// The blind index of a value's encoding under data key `version`, if
    /// the owner holds it.
    pub(crate) fn blind_index_encoded_under(
        &self,
        version: u32,
        scope: &str,
        encoded: &[u8],
        normalize: Normalize,
    ) -> Option<Vec<u8>> {
        Some(self.blind_index_of(self.dek(version)?, scope, encoded, normalize))
    }

    fn blind_index_of(
        &self,
        dek: &crate::Dek,
        scope: &str,
        encoded: &[u8],
        normalize: Normalize,
    ) -> Vec<u8> {
        let normalised = normalize.apply(encoded);
        let out = self
            .blind_keys
            .with(dek, scope, |key| key.compute(&normalised).to_vec());
        if let Cow::Owned(mut owned) = normalised {
            zeroize::Zeroize::zeroize(&mut owned);
        }
        out
    }

    /// The tag of the fields' encodings `parts` (in the index's order) in
    /// compound `index` on `scope` (the fields' scopes joined by `+`), under
    /// the current data key: what a compound index column stores.
    ///
    /// # Errors
    /// [`Error::NoKey`](crate::Error::NoKey) if the owner has no active data key.
    pub fn compound_index(
        &self,
        scope: &str,
        parts: &[&[u8]],
        index: &CompoundIndex,
    ) -> Result<Vec<u8>> {
        self.compound_index_encoded(None, scope, parts, index)?
            .ok_or_else(|| crate::Error::NoKey {
                owner: self.owner().to_owned(),
            })
    }

    /// The tag of a compound index of the fields' encodings `parts` (in
    /// the index's order) on `scope`, under data key `version` (the current
    /// one when `None`).
    pub(crate) fn compound_index_encoded(
        &self,
        version: Option<u32>,
        scope: &str,
        parts: &[&[u8]],
        index: &CompoundIndex,
    ) -> Result<Option<Vec<u8>>> {
        checked(scope, index.check())?;
        let dek = match version {
            None => self.current_dek()?,
            Some(v) => match self.dek(v) {
                Some(dek) => dek,
                None => return Ok(None),
            },
        };
        let input = index.input(parts);
        Ok(Some(self.blind_keys.with_derived(
            dek,
            &index.cache_scope(scope),
            || index.key(dek, scope),
            |key| index.tag(key, &input),
        )))
    }

    /// The tags to look up the fields' encodings `parts` in a compound
    /// index on `scope`, under every data key version the owner holds.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for an index
    /// that is not well formed ([`CompoundIndex::check`]).
    pub fn compound_probes(
        &self,
        scope: &str,
        index: &CompoundIndex,
        parts: &[&[u8]],
    ) -> Result<Vec<Vec<u8>>> {
        checked(scope, index.check())?;
        let input = index.input(parts);
        let mut out = Vec::new();
        for version in self.versions() {
            let Some(dek) = self.dek(version) else {
                continue;
            };
            out.push(self.blind_keys.with_derived(
                dek,
                &index.cache_scope(scope),
                || index.key(dek, scope),
                |key| index.tag(key, &input),
            ));
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// The tags to look up `probes` (encodings, as values have: a name
    /// prefix, digits, [`DerivedIndex::year_probe`]) in `index` on `scope`,
    /// under every data key version the owner holds: the values a query
    /// matches with `eq_any`. Empty when the owner has no keys.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) naming the scope
    /// and the index when a probe is too short for it
    /// ([`DerivedIndex::probe`]).
    pub fn derived_probes(
        &self,
        scope: &str,
        index: &DerivedIndex,
        probes: &[&[u8]],
    ) -> Result<Vec<Vec<u8>>> {
        checked(scope, index.check())?;
        let mut inputs = Vec::with_capacity(probes.len());
        for probe in probes {
            inputs.push(
                index
                    .probe(probe)
                    .map_err(|reason| crate::Error::InvalidInput {
                        what: "search term",
                        reason: format!("{scope} ({}): {reason}", index.spec()),
                    })?,
            );
        }
        let mut out = Vec::new();
        for version in self.versions() {
            let Some(dek) = self.dek(version) else {
                continue;
            };
            self.blind_keys.with_derived(
                dek,
                &index.cache_scope(scope),
                || index.key(dek, scope),
                |key| out.extend(inputs.iter().map(|input| index.tag(key, input))),
            );
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }
}

/// A derived or compound index that is not well formed, as an error naming
/// the scope.
fn checked(scope: &str, check: std::result::Result<(), String>) -> Result<()> {
    check.map_err(|reason| crate::Error::InvalidInput {
        what: "index",
        reason: format!("{scope}: {reason}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dek::{Dek, KeyBytes};

    #[test]
    fn normalisation() {
        assert_eq!(&*Normalize::TRIM.apply(b"  Doe \n"), b"Doe");
        assert_eq!(&*Normalize::LOWERCASE.apply(b" DoE"), b" doe");
        assert_eq!(
            &*Normalize::TRIM_LOWERCASE.apply(" ÉLISE ".as_bytes()),
            "élise".as_bytes()
        );
        assert_eq!(&*Normalize::NONE.apply(b" A "), b" A ");
        // Not UTF-8: hashed as it is.
        assert_eq!(
            &*Normalize::TRIM_LOWERCASE.apply(&[0xff, b' ']),
            &[0xff, b' ']
        );
    }

    #[test]
    fn titlecase_letters_are_lowercased() {
        // Found by fuzzing (fuzz/fuzz_targets/blind_normalize.rs): `ǅ` (U+01C5,
        // titlecase) is not uppercase, so a value holding no uppercase letter
        // was left as it was, and "ǅemal" did not find "ǆemal" or "Ǆemal".
        assert_eq!(
            &*Normalize::LOWERCASE.apply("ǅemal".as_bytes()),
            "ǆemal".as_bytes()
        );
        assert_eq!(
            &*Normalize::TRIM_LOWERCASE.apply(" ᾈ ".as_bytes()),
            "ᾀ".as_bytes()
        );
        let key = BlindIndexKey::derive(&Dek::new(1, KeyBytes::new([1; 32])), "cases.patient_last");
        let index = |v: &str| key.index(&v.to_owned(), Normalize::TRIM_LOWERCASE);
        assert_eq!(index("ǅemal"), index("ǆemal"));
        assert_eq!(index("ǅemal"), index(" Ǆemal"));
        // Lower-case text is still hashed without a copy.
        assert!(matches!(
            Normalize::LOWERCASE.apply(b"doe"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn matches_the_published_construction() {
        // HKDF-SHA256(ikm = 32 × 0x01, salt = empty, info = "phi-blind-index-v1" ‖ scope)
        // then HMAC-SHA256 truncated to 16 bytes, computed independently with
        // Python's `cryptography` and `hmac` modules.
        let dek = Dek::new(1, KeyBytes::new([1; 32]));
        let key = BlindIndexKey::derive(&dek, "cases.patient_last");
        let value = key.compute(b"doe");
        assert_eq!(hex(&value), "755ae5bf72d8111365b3f113510883e3");
    }

    #[test]
    fn scope_and_key_separate_values() {
        let a = Dek::new(1, KeyBytes::new([1; 32]));
        let b = Dek::new(1, KeyBytes::new([2; 32]));
        let v = "Doe".to_string();
        let ia = BlindIndexKey::derive(&a, "cases.patient_last").index(&v, Normalize::NONE);
        assert_ne!(
            ia,
            BlindIndexKey::derive(&a, "cases.patient_first").index(&v, Normalize::NONE)
        );
        assert_ne!(
            ia,
            BlindIndexKey::derive(&b, "cases.patient_last").index(&v, Normalize::NONE)
        );
        assert_eq!(
            ia,
            BlindIndexKey::derive(&a, "cases.patient_last").index(&v, Normalize::NONE)
        );
        assert!(!format!("{:?}", BlindIndexKey::derive(&a, "s")).contains("1"));
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
