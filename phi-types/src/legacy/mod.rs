//! Importing data that was encrypted before phi, and the strict finish.
//!
//! A table adopted by phi may hold, in its flag-off rows, values that an
//! earlier scheme encrypted: Fernet tokens (`gAAAAA…`, Python's
//! `cryptography.fernet`), or `v1:<nonce>:<ciphertext>` texts of
//! AES-256-GCM under a versioned key. A [`LegacyDecoder`] opens them, so
//! that [`migrate::backfill`](crate::migrate::backfill) seals the
//! plaintext under phi (not the old ciphertext) and
//! [`migrate::verify`](crate::migrate::verify_legacy) checks that every
//! such value opens. Pass one with
//! [`MigrateOptions::legacy`](crate::migrate::MigrateOptions::legacy):
//!
//! | decoder | stored value | keys |
//! |---|---|---|
//! | [`FernetDecoder`] (feature `legacy-fernet`) | a Fernet token, `gAAAAA…` | a primary and fallback keys (`ENCRYPTION_KEY`, `ENCRYPTION_KEY_FALLBACK`) |
//! | [`VersionedGcmDecoder`] | `v1:<base64 nonce>:<base64 ciphertext and tag>` (or the tag as a fourth part) | one 256-bit key per version label (`v1`, `v2`) |
//! | [`LegacyDecoders`] | any of several formats | each decoder's |
//!
//! A value a decoder does not recognise (`Ok(None)`) is taken as the
//! field's plain encoding, as without a decoder. A value it recognises but
//! cannot open is an [`Error::Legacy`](crate::Error::Legacy) naming the
//! table, column, row and owner: the backfill stops with that batch rolled
//! back, a dry run and verify count it.
//!
//! After the backfill, a table can be made strict
//! ([`Keyring::set_strict`](crate::Keyring::set_strict)): phi then refuses
//! to read or write a row of it whose flag is off, and [`sealed_check`]
//! gives the SQL with which the database refuses, from any client, a
//! sealed row whose values are not envelopes.

#[cfg(feature = "legacy-fernet")]
mod fernet;
pub(crate) mod sql;
mod versioned;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use zeroize::Zeroizing;

#[cfg(feature = "legacy-fernet")]
pub use self::fernet::FernetDecoder;
pub use self::sql::{Dialect, SealedCheck, sealed_check};
pub use self::versioned::VersionedGcmDecoder;
pub use crate::error::{LegacyError, LegacyErrorKind};

/// Opens values stored before phi in an encrypted format of their own.
///
/// Called by the migration jobs for each non-NULL value of a row whose
/// encrypted flag is off. Implementations hold their keys zeroized on drop
/// and never print them (`Debug` included).
pub trait LegacyDecoder: Send + Sync + fmt::Debug {
    /// The plaintext of `value` (the field's plain encoding: UTF-8 text,
    /// an ISO-8601 date…), or `Ok(None)` when the stored bytes are not in
    /// this decoder's format (they are then taken as the plain encoding).
    ///
    /// # Errors
    /// [`LegacyError`] when the value is in this format but does not open.
    fn open(&self, value: &LegacyValue<'_>) -> Result<Option<LegacyPlaintext>, LegacyError>;
}

/// A stored value given to a [`LegacyDecoder`], with where it is (for the
/// decoder's keys, if they depend on the owner, and for errors).
#[non_exhaustive]
#[derive(Clone, Copy)]
pub struct LegacyValue<'a> {
    /// The table.
    pub table: &'a str,
    /// The column.
    pub column: &'a str,
    /// The row's owner.
    pub owner: &'a str,
    /// The row's key, as text.
    pub row: &'a str,
    /// The stored bytes.
    pub stored: &'a [u8],
}

impl<'a> LegacyValue<'a> {
    /// A value of `table.column` in row `row` of `owner`.
    pub fn new(
        table: &'a str,
        column: &'a str,
        owner: &'a str,
        row: &'a str,
        stored: &'a [u8],
    ) -> Self {
        LegacyValue {
            table,
            column,
            owner,
            row,
            stored,
        }
    }
}

impl fmt::Debug for LegacyValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LegacyValue")
            .field("table", &self.table)
            .field("column", &self.column)
            .field("owner", &self.owner)
            .field("row", &self.row)
            .field("stored_len", &self.stored.len())
            .finish()
    }
}

/// What a [`LegacyDecoder`] opened: the plaintext, zeroized on drop, and
/// the name of its format for reports.
pub struct LegacyPlaintext {
    /// The format (`fernet`, `aes-gcm-versioned`).
    pub format: &'static str,
    /// The plaintext.
    pub plaintext: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for LegacyPlaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LegacyPlaintext")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// Several decoders, tried in order: the first that recognises a value
/// opens it (or reports why it does not open).
#[derive(Clone, Debug, Default)]
pub struct LegacyDecoders(Vec<Arc<dyn LegacyDecoder>>);

impl LegacyDecoders {
    /// No decoder yet.
    pub fn new() -> Self {
        LegacyDecoders::default()
    }

    /// Adds `decoder` after those already added.
    #[must_use]
    pub fn with(mut self, decoder: Arc<dyn LegacyDecoder>) -> Self {
        self.0.push(decoder);
        self
    }
}

impl LegacyDecoder for LegacyDecoders {
    fn open(&self, value: &LegacyValue<'_>) -> Result<Option<LegacyPlaintext>, LegacyError> {
        for decoder in &self.0 {
            if let Some(plain) = decoder.open(value)? {
                return Ok(Some(plain));
            }
        }
        Ok(None)
    }
}

/// How many values of one legacy format a job found, and how many of them
/// did not open.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LegacyCount {
    /// The format (`fernet`, `aes-gcm-versioned`).
    pub format: &'static str,
    /// Values in that format.
    pub found: u64,
    /// Of those, values that did not open.
    pub failed: u64,
}

impl fmt::Display for LegacyCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} value(s), {} do not open",
            self.format, self.found, self.failed
        )
    }
}

/// Counts per format, as a job goes.
#[derive(Debug, Default)]
pub(crate) struct Tally(BTreeMap<&'static str, (u64, u64)>);

impl Tally {
    pub(crate) fn opened(&mut self, format: &'static str) {
        self.0.entry(format).or_default().0 += 1;
    }

    pub(crate) fn failed(&mut self, format: &'static str) {
        let entry = self.0.entry(format).or_default();
        entry.0 += 1;
        entry.1 += 1;
    }

    pub(crate) fn merge(&mut self, other: Tally) {
        for (format, (found, failed)) in other.0 {
            let entry = self.0.entry(format).or_default();
            entry.0 += found;
            entry.1 += failed;
        }
    }

    pub(crate) fn counts(&self) -> Vec<LegacyCount> {
        self.0
            .iter()
            .map(|(format, (found, failed))| LegacyCount {
                format,
                found: *found,
                failed: *failed,
            })
            .collect()
    }
}

/// A base64 engine for both padded and unpadded input.
pub(crate) fn base64_engine(url_safe: bool) -> base64::engine::GeneralPurpose {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    let alphabet = if url_safe {
        &base64::alphabet::URL_SAFE
    } else {
        &base64::alphabet::STANDARD
    };
    GeneralPurpose::new(
        alphabet,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    )
}
