//! `v1:<nonce>:<ciphertext>` texts: AES-256-GCM under a versioned key.

use std::collections::BTreeMap;
use std::fmt;

use aes_gcm::KeyInit as _;
use aes_gcm::aead::AeadInOut as _;
use base64::Engine as _;
use zeroize::Zeroizing;

use super::{
    LegacyDecoder, LegacyError, LegacyErrorKind, LegacyPlaintext, LegacyValue, base64_engine,
};
use crate::dek::KeyBytes;
use crate::error::{Error, Result};

const FORMAT: &str = "aes-gcm-versioned";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Opens texts of the form `<version>:<base64 nonce>:<base64 ciphertext
/// and tag>`, or `<version>:<nonce>:<ciphertext>:<tag>`, where the version
/// is `v` and digits (`v1`, `v2`) naming the AES-256-GCM key, the nonce is
/// 12 bytes, the tag 16, base64 standard (padding optional), no associated
/// data: the format an application writes with Python's
/// `AESGCM(key).encrypt(nonce, text, None)` and
/// `f"v1:{b64(nonce)}:{b64(ciphertext)}"`. Values that do not start with
/// such a version and a colon are not in this format.
///
/// ```
/// use phi_types::KeyBytes;
/// use phi_types::legacy::VersionedGcmDecoder;
///
/// let decoder = VersionedGcmDecoder::new()
///     .key("v1", KeyBytes::new([1; 32]))
///     .key("v2", KeyBytes::new([2; 32]));
/// assert_eq!(format!("{decoder:?}"), r#"VersionedGcmDecoder { versions: ["v1", "v2"], .. }"#);
/// ```
#[derive(Default)]
pub struct VersionedGcmDecoder {
    keys: BTreeMap<String, KeyBytes>,
}

impl VersionedGcmDecoder {
    /// A decoder with no key yet.
    pub fn new() -> Self {
        VersionedGcmDecoder::default()
    }

    /// The key of `version` (`v1`), replacing any given before.
    #[must_use]
    pub fn key(mut self, version: impl Into<String>, key: KeyBytes) -> Self {
        self.keys.insert(version.into(), key);
        self
    }

    /// A decoder from a text naming each version's key, as an environment
    /// variable holds it (the application's command line reads it with
    /// `--legacy versioned-gcm`): entries `VERSION=KEY` separated by commas,
    /// semicolons or white space, where `VERSION` is `v` and digits and
    /// `KEY` is the 256-bit key as 64 hexadecimal digits or as base64
    /// (standard or URL-safe, padding optional). Errors name the entry and
    /// its version, never the key.
    ///
    /// ```
    /// use phi_types::legacy::VersionedGcmDecoder;
    ///
    /// let v1 = "32333435363738393a3b3c3d3e3f404142434445464748494a4b4c4d4e4f5051";
    /// let v2 = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
    /// let decoder = VersionedGcmDecoder::from_spec(&format!("v1={v1},v2={v2}"))?;
    /// assert_eq!(format!("{decoder:?}"), r#"VersionedGcmDecoder { versions: ["v1", "v2"], .. }"#);
    /// let err = VersionedGcmDecoder::from_spec("v1=c2hvcnQ=").unwrap_err();
    /// assert!(err.to_string().contains("v1") && !err.to_string().contains("c2hvcnQ"));
    /// # Ok::<(), phi_types::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an entry that is not `VERSION=KEY`, a
    /// version that is not `v` and digits, a key that is not 32 bytes of
    /// hexadecimal or base64, or no entry at all.
    pub fn from_spec(spec: &str) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidInput {
            what: "versioned AES-GCM keys",
            reason,
        };
        let mut decoder = VersionedGcmDecoder::new();
        let entries = spec
            .split(|c: char| c == ',' || c == ';' || c.is_whitespace())
            .filter(|e| !e.is_empty());
        for (n, entry) in entries.enumerate() {
            let Some((version, key)) = entry.split_once('=') else {
                return Err(invalid(format!("entry {} is not VERSION=KEY", n + 1)));
            };
            let digits = version.strip_prefix('v').unwrap_or("");
            if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(invalid(format!(
                    "entry {}: the version is not `v` and digits (v1, v2)",
                    n + 1
                )));
            }
            let bytes = decode_key(key).ok_or_else(|| {
                invalid(format!(
                    "the key of {version}: not 32 bytes as 64 hexadecimal digits or base64"
                ))
            })?;
            let key = KeyBytes::from_slice(&bytes)
                .ok_or_else(|| invalid(format!("the key of {version}: not 32 bytes")))?;
            decoder = decoder.key(version, key);
        }
        if decoder.keys.is_empty() {
            return Err(invalid("no VERSION=KEY entry".into()));
        }
        Ok(decoder)
    }

    /// [`from_spec`](Self::from_spec) of the environment variable `name`.
    ///
    /// # Errors
    /// [`Error::Config`] when `name` is not set; as
    /// [`from_spec`](Self::from_spec).
    pub fn from_env(name: &str) -> Result<Self> {
        let spec =
            Zeroizing::new(std::env::var(name).map_err(|_| {
                Error::Config(format!("{name} is not set: no versioned AES-GCM keys"))
            })?);
        Self::from_spec(&spec)
    }

    fn decrypt(
        &self,
        version: &str,
        rest: &[u8],
    ) -> std::result::Result<Zeroizing<Vec<u8>>, LegacyErrorKind> {
        let engine = base64_engine(false);
        let parts: Vec<&[u8]> = rest.split(|b| *b == b':').collect();
        let decode = |part: &[u8]| {
            engine
                .decode(part)
                .map_err(|_| LegacyErrorKind::Malformed("a part is not base64"))
        };
        let (nonce, mut data) = match parts.as_slice() {
            [nonce, sealed] => (decode(nonce)?, decode(sealed)?),
            [nonce, ciphertext, tag] => {
                let mut data = decode(ciphertext)?;
                data.extend(decode(tag)?);
                (decode(nonce)?, data)
            }
            _ => return Err(LegacyErrorKind::Malformed("not version:nonce:ciphertext")),
        };
        let nonce: [u8; NONCE_LEN] = nonce
            .as_slice()
            .try_into()
            .map_err(|_| LegacyErrorKind::Malformed("the nonce is not 12 bytes"))?;
        if data.len() < TAG_LEN {
            return Err(LegacyErrorKind::Malformed("shorter than a tag"));
        }
        let key = self
            .keys
            .get(version)
            .ok_or_else(|| LegacyErrorKind::UnknownKeyVersion(version.to_owned()))?;
        let cipher = aes_gcm::Aes256Gcm::new(key.expose().into());
        let tag_at = data.len() - TAG_LEN;
        let tag: [u8; TAG_LEN] = data[tag_at..]
            .try_into()
            .map_err(|_| LegacyErrorKind::Malformed("shorter than a tag"))?;
        data.truncate(tag_at);
        let mut plain = Zeroizing::new(data);
        cipher
            .decrypt_inout_detached(
                &aes_gcm::Nonce::from(nonce),
                b"",
                plain.as_mut_slice().into(),
                &aes_gcm::Tag::from(tag),
            )
            .map_err(|_| LegacyErrorKind::Authentication)?;
        Ok(plain)
    }
}

/// A key as 64 hexadecimal digits or base64 (standard or URL-safe), in a
/// buffer zeroized on drop.
fn decode_key(text: &str) -> Option<Zeroizing<Vec<u8>>> {
    let text = text.trim();
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        let digit = |b: u8| (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok());
        let mut out = Zeroizing::new(Vec::with_capacity(32));
        for pair in text.as_bytes().chunks(2) {
            out.push(digit(pair[0])? << 4 | digit(pair[1])?);
        }
        return Some(out);
    }
    let url_safe = text.contains(['-', '_']);
    base64_engine(url_safe)
        .decode(text)
        .ok()
        .map(Zeroizing::new)
}

/// The version label of a stored value: `v` and digits before the first
/// colon, with the rest, when the rest has the format's shape (two or
/// three colon-separated base64 parts). Plain text that merely begins like
/// a label (`v2: follow-up visit`) is not this format's.
fn split_version(stored: &[u8]) -> Option<(&str, &[u8])> {
    let colon = stored.iter().position(|b| *b == b':')?;
    let (version, rest) = (&stored[..colon], &stored[colon + 1..]);
    let digits = version.strip_prefix(b"v")?;
    if digits.is_empty() || digits.len() > 9 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let base64 = |part: &[u8]| {
        !part.is_empty()
            && part
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
    };
    let parts = rest.split(|b| *b == b':').count();
    if !(2..=3).contains(&parts) || !rest.split(|b| *b == b':').all(base64) {
        return None;
    }
    Some((std::str::from_utf8(version).ok()?, rest))
}

impl LegacyDecoder for VersionedGcmDecoder {
    fn recognises(&self, stored: &[u8]) -> bool {
        split_version(stored).is_some()
    }

    fn open(
        &self,
        value: &LegacyValue<'_>,
    ) -> std::result::Result<Option<LegacyPlaintext>, LegacyError> {
        let Some((version, rest)) = split_version(value.stored) else {
            return Ok(None);
        };
        self.decrypt(version, rest)
            .map(|plaintext| {
                Some(LegacyPlaintext {
                    format: FORMAT,
                    plaintext,
                })
            })
            .map_err(|kind| LegacyError::new(FORMAT, kind))
    }
}

impl fmt::Debug for VersionedGcmDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VersionedGcmDecoder")
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_recognised_strictly() {
        assert_eq!(split_version(b"v1:AQEB:xYjm").map(|v| v.0), Some("v1"));
        assert_eq!(
            split_version(b"v12:AQEB:xYjm:Zg==").map(|v| v.0),
            Some("v12")
        );
        assert!(split_version(b"v:AQEB:xYjm").is_none());
        // Plain text that merely begins like a label is not claimed.
        assert!(split_version(b"v2: follow-up visit").is_none());
        assert!(split_version(b"v1:abc").is_none());
        assert!(split_version(b"v1:a:b:c:d").is_none());
        assert!(split_version(b"version:abc").is_none());
        assert!(split_version(b"Doe").is_none());
        assert!(split_version(b"vx1:abc").is_none());
    }
}
