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
//! # Only values recorded before phi's writers ran are decoded
//!
//! Neither legacy format says whose value it is or which row it belongs
//! to. Once phi's writers run, a row whose flag is off holds whatever the
//! application was given, verbatim: a user who pastes another person's old
//! token (from a leaked dump, an export) into a field of their own stores
//! that token as their own plain text. Were the backfill to decode every
//! value that looks legacy, it would seal the other person's plaintext
//! under the user's key, and the user would read it: a decryption oracle.
//!
//! So a legacy value is decoded only when it was **recorded** as legacy
//! before the application could write such values, in phi's table
//! `phi_legacy_values` (table, column, row key, owner id, the exact stored
//! bytes, `recorded_at`). Two steps record them, both before phi's
//! writers are deployed:
//!
//! - the generated `in_place` and `shadow` migrations
//!   ([`adopt`](crate::adopt)) insert every value of the table that has
//!   the shape of a shipped format (`gAAAAA…`, `v<digits>:…:…`) into it,
//!   in the migration's own transaction where the backend has one
//!   ([`record_sql`]);
//! - [`migrate::record_legacy`](crate::migrate::record_legacy) (`phi
//!   migration record-legacy`) records the values a decoder
//!   [recognises](LegacyDecoder::recognises), for an application that does
//!   not run the generated migrations or whose decoder reads a format of
//!   its own. It refuses a table that already has a sealed row.
//!
//! The backfill ([`migrate::backfill`](crate::migrate::backfill)) opens a
//! flag-off value with the decoder only when a record of the same table,
//! column, row key **and owner** holds **exactly** its bytes. Every other
//! value is the field's plain encoding, sealed as it is; one that a
//! decoder recognises is counted and named in the report
//! ([`MigrationReport::legacy_as_text`](crate::migrate::MigrationReport::legacy_as_text),
//! [`ProblemKind::LegacyAsText`](crate::migrate::ProblemKind::LegacyAsText)),
//! as values not in canonical form are: plain text that merely looks
//! legacy (`v1:Follow:Up`, a note starting `gAAAAA`) never stops a
//! backfill.
//!
//! **Why this is complete.** A value is decoded only if its bytes were in
//! that very row slot (table, column, row key) of that very owner when the
//! recording ran, and records are only made then. Before phi, every value
//! of the column came from the old application's encryptor: whatever a
//! user typed (another person's token included) was encrypted first, so
//! opening it yields what that user typed, never someone else's
//! plaintext. After the recording, nothing an application writes can
//! become decodable: a token copied into another owner's row fails the
//! owner comparison; one written into a row whose key was deleted and
//! reused by another owner fails it too (the record names the first
//! owner); one moved to another column or row fails the slot comparison;
//! any other bytes fail the exact comparison. The one value an owner can
//! have decoded is a record of their own slot that they write back
//! unchanged: their own plaintext, under their own key. The records are
//! deleted in the transaction of the batch that seals their row (whether
//! it was decoded or not), so a row that is sealed, then rolled back by
//! [`decrypt_back`](crate::migrate::decrypt_back) (which writes the
//! decoded plaintext, never the token) and written again is never matched
//! by a stale record either.
//!
//! What the design assumes, and so what an operator must do: the
//! recording runs before any phi writer (the generated migration precedes
//! the deployment; `record-legacy` is run before it), and is not run
//! again once they have written. Values that the old application writes
//! after the recording are not decoded: they are sealed as the token text
//! they are and reported by row, never lost silently (decrypt-back gives
//! the token back).
//!
//! A recorded value a decoder recognises but cannot open stops the
//! backfill: an [`Error::Legacy`](crate::Error::Legacy) naming the table,
//! column, row and owner, that batch rolled back (a key is missing, or the
//! value was altered): sealing it as text would hide that. A recorded value
//! that is not well formed in its format
//! ([`LegacyErrorKind::Malformed`]: a note `v1:Follow:Up` recorded by the
//! migration's broad pattern) is plain text: sealed as it is and reported.
//! A dry run and verify count both.
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
pub use self::sql::{Dialect, SealedCheck, record_sql, sealed_check};
pub use self::versioned::VersionedGcmDecoder;
pub use crate::error::{LegacyError, LegacyErrorKind};

/// Opens values stored before phi in an encrypted format of their own.
///
/// Called by the migration jobs for each non-NULL value of a row whose
/// encrypted flag is off. Implementations hold their keys zeroized on drop
/// and never print them (`Debug` included).
pub trait LegacyDecoder: Send + Sync + fmt::Debug {
    /// Whether `stored` has this decoder's format, without opening it: the
    /// values [`migrate::record_legacy`](crate::migrate::record_legacy)
    /// records, and the unrecorded ones the backfill reports as
    /// [`legacy_as_text`](crate::migrate::MigrationReport::legacy_as_text).
    ///
    /// The default opens the value (and drops the result): a value it
    /// recognises, whether it opens or not, is in the format. Override it
    /// with a check of the value's shape.
    fn recognises(&self, stored: &[u8]) -> bool {
        !matches!(
            self.open(&LegacyValue::new("", "", "", "", stored)),
            Ok(None)
        )
    }

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
    fn recognises(&self, stored: &[u8]) -> bool {
        self.0.iter().any(|d| d.recognises(stored))
    }

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
