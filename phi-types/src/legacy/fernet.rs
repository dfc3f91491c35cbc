//! Fernet tokens: <https://github.com/fernet/spec/blob/master/Spec.md>.

use std::fmt;

use aes::cipher::{BlockModeDecrypt as _, KeyIvInit as _, block_padding::Pkcs7};
use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{
    LegacyDecoder, LegacyError, LegacyErrorKind, LegacyPlaintext, LegacyValue, base64_engine,
};
use crate::error::{Error, Result};

const FORMAT: &str = "fernet";
const VERSION: u8 = 0x80;
/// Version, timestamp, IV.
const HEADER_LEN: usize = 1 + 8 + 16;
const TAG_LEN: usize = 32;

/// One Fernet key: its signing and encryption halves, zeroized on drop.
struct FernetKey(Zeroizing<[u8; 32]>);

impl FernetKey {
    fn parse(encoded: &str, which: &str) -> Result<Self> {
        let bytes = Zeroizing::new(
            base64_engine(true)
                .decode(encoded.trim())
                .map_err(|_| invalid(which, "it is not URL-safe base64"))?,
        );
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| invalid(which, "it does not decode to 32 bytes"))?;
        Ok(FernetKey(Zeroizing::new(key)))
    }

    fn signing(&self) -> &[u8] {
        &self.0[..16]
    }

    fn encryption(&self) -> &[u8] {
        &self.0[16..]
    }
}

fn invalid(which: &str, reason: &str) -> Error {
    Error::InvalidInput {
        what: "Fernet key",
        reason: format!("the {which} key: {reason}"),
    }
}

/// Opens Fernet tokens (`gAAAAA…`, as Python's `cryptography.fernet`
/// writes them): the primary key first, then each fallback key, as
/// `MultiFernet` does; a token's age is not checked. Values that do not
/// start with `gAAAAA` are not tokens (taken as plain encodings).
///
/// A token is read as Python's `Fernet.decrypt` reads it
/// (`base64.urlsafe_b64decode`): the URL-safe alphabet it writes (`-`,
/// `_`), the standard one (`+`, `/`) too, and line breaks and other ASCII
/// white space anywhere after the `gAAAAA` (a token wrapped at 76
/// characters, `\n` or `\r\n`, or stored with a trailing newline) are
/// skipped; padding is optional.
///
/// ```
/// use phi_types::legacy::FernetDecoder;
///
/// // As a runbook's ENCRYPTION_KEY / ENCRYPTION_KEY_FALLBACK hold them.
/// let decoder = FernetDecoder::new("dOwzoPqlIfUybDtTBsf41QysOeKV5Nf_H8jhKFeotsU=")?
///     .fallback("j6dPukal_rD5ElbANK0pPsViMkFXtaEtmVl8AxuT4HY=")?;
/// assert_eq!(format!("{decoder:?}"), "FernetDecoder { keys: 2, .. }");
/// # Ok::<(), phi_types::Error>(())
/// ```
pub struct FernetDecoder {
    keys: Vec<FernetKey>,
}

impl FernetDecoder {
    /// A decoder with the primary key, URL-safe base64 of 32 bytes (as
    /// `Fernet.generate_key()` prints it).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the key is not 32 bytes of URL-safe
    /// base64 (the error does not repeat it).
    pub fn new(primary: &str) -> Result<Self> {
        Ok(FernetDecoder {
            keys: vec![FernetKey::parse(primary, "primary")?],
        })
    }

    /// Adds a fallback key, tried after the primary and the fallbacks
    /// added before it: a key the tokens were written under before a
    /// rotation.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn fallback(mut self, key: &str) -> Result<Self> {
        self.keys.push(FernetKey::parse(key, "fallback")?);
        Ok(self)
    }

    /// A decoder from the environment: the primary key from the variable
    /// `primary`, and a fallback from `fallback` when it is set and not
    /// empty (`FernetDecoder::from_env("ENCRYPTION_KEY",
    /// "ENCRYPTION_KEY_FALLBACK")`).
    ///
    /// # Errors
    /// [`Error::Config`] when `primary` is not set; as [`new`](Self::new).
    pub fn from_env(primary: &str, fallback: &str) -> Result<Self> {
        let key = Zeroizing::new(
            std::env::var(primary)
                .map_err(|_| Error::Config(format!("{primary} is not set: no Fernet key")))?,
        );
        let mut decoder = FernetDecoder::new(&key)?;
        if let Ok(key) = std::env::var(fallback).map(Zeroizing::new)
            && !key.trim().is_empty()
        {
            decoder = decoder.fallback(&key)?;
        }
        Ok(decoder)
    }

    fn decrypt(&self, token: &[u8]) -> std::result::Result<Zeroizing<Vec<u8>>, LegacyErrorKind> {
        let data = base64_engine(true)
            .decode(normalise(token))
            .map_err(|_| LegacyErrorKind::Malformed("not base64"))?;
        if data.len() < HEADER_LEN + TAG_LEN
            || !(data.len() - HEADER_LEN - TAG_LEN).is_multiple_of(16)
        {
            return Err(LegacyErrorKind::Malformed("truncated token"));
        }
        if data[0] != VERSION {
            return Err(LegacyErrorKind::Malformed(
                "not a Fernet version 0x80 token",
            ));
        }
        let (signed, tag) = data.split_at(data.len() - TAG_LEN);
        let key = self
            .keys
            .iter()
            .find(|key| {
                <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(key.signing())
                    .map(|mac| mac.chain_update(signed).verify_slice(tag).is_ok())
                    .unwrap_or(false)
            })
            .ok_or(LegacyErrorKind::Authentication)?;
        let iv = &signed[9..HEADER_LEN];
        let ciphertext = &signed[HEADER_LEN..];
        let decryptor = cbc::Decryptor::<aes::Aes128>::new_from_slices(key.encryption(), iv)
            .map_err(|_| LegacyErrorKind::Malformed("key or IV length"))?;
        decryptor
            .decrypt_padded_vec::<Pkcs7>(ciphertext)
            .map(Zeroizing::new)
            // Authenticated, yet the padding is wrong: written with the
            // right signing key and a wrong encryption key.
            .map_err(|_| LegacyErrorKind::Authentication)
    }
}

/// A token as URL-safe base64: white space (line breaks) dropped, the
/// standard alphabet's `+` and `/` read as `-` and `_`, as Python's
/// `base64.urlsafe_b64decode` reads them. Any other byte is kept (and
/// fails to decode).
fn normalise(token: &[u8]) -> Vec<u8> {
    token
        .iter()
        .filter(|b| !b.is_ascii_whitespace())
        .map(|b| match b {
            b'+' => b'-',
            b'/' => b'_',
            other => *other,
        })
        .collect()
}

impl LegacyDecoder for FernetDecoder {
    fn recognises(&self, stored: &[u8]) -> bool {
        stored.starts_with(b"gAAAAA")
    }

    fn open(
        &self,
        value: &LegacyValue<'_>,
    ) -> std::result::Result<Option<LegacyPlaintext>, LegacyError> {
        if !value.stored.starts_with(b"gAAAAA") {
            return Ok(None);
        }
        self.decrypt(value.stored)
            .map(|plaintext| {
                Some(LegacyPlaintext {
                    format: FORMAT,
                    plaintext,
                })
            })
            .map_err(|kind| LegacyError::new(FORMAT, kind))
    }
}

impl fmt::Debug for FernetDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FernetDecoder")
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}
