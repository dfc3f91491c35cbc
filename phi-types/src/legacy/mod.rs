//! Importing data that was encrypted before phi, and the strict finish.
//!
//! A table adopted by phi may hold, in its flag-off rows, values that an
//! earlier scheme encrypted: Fernet tokens (`gAAAAA…`, Python's
//! `cryptography.fernet`), or `v1:<nonce>:<ciphertext>` texts of
//! AES-256-GCM under a versioned key. A [`LegacyDecoder`] opens them, so
//! that [`migrate::backfill`](crate::migrate::backfill) seals the
//! plaintext under phi (not the old ciphertext) and
//! [`migrate::verify`](crate::migrate::verify) (with [`VerifyOptions::legacy`](crate::migrate::VerifyOptions::legacy)) checks that every
//! such value opens. Pass one with
//! [`MigrateOptions::legacy`](crate::migrate::MigrateOptions::legacy), or
//! register it on the keyring
//! ([`KeyringBuilder::legacy`](crate::KeyringBuilder::legacy)), which
//! also opens them when the application loads its rows before the
//! backfill has sealed them ([below](#read-during-the-roll-out)):
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
//! # Read during the roll-out
//!
//! Until the backfill has sealed a row, the row holds its legacy value.
//! A decoder registered on the keyring
//! ([`KeyringBuilder::legacy`](crate::KeyringBuilder::legacy)) is also used
//! on the read path, by the same rule: [`PhiRecord::load`](crate::PhiRecord::load)
//! and `load_async` open a flag-off value only when a record of the same
//! table, column, row key and owner holds exactly its bytes, so the
//! application reads plaintext from the moment it deploys phi, and the
//! same plaintext once the backfill has sealed the row. Every other value
//! is returned as it is stored, as without a decoder: a value written
//! since the recording (a pasted token included) is the text it is. What
//! a load does and costs:
//!
//! - **No decoder registered** (or a model without an encrypted flag, or a
//!   strict table): nothing new, no query, the rows are read and opened
//!   as before (in chunks, side by side with the reading).
//! - **A decoder registered**: the whole result is read, then each chunk
//!   of [`LOAD_CHUNK_ROWS`](crate::record::LOAD_CHUNK_ROWS) rows is
//!   scanned for flag-off rows holding a value the decoder
//!   [recognises](LegacyDecoder::recognises) (a check of the value's
//!   shape, no decryption). A chunk with none costs no query; one with
//!   some reads their records with one query on the load's connection
//!   (`table_name = ? AND row_key IN (…)`,
//!   [`LegacyRecordsQuery`](crate::record::LegacyRecordsQuery)), compares
//!   column, owner and bytes in Rust, and opens the matches. Each value
//!   opened is counted in `phi_legacy_reads_total{table}`
//!   ([`metrics`](crate::metrics)): once it stays at zero, no row the
//!   application reads holds a legacy value any more.
//! - **After the backfill**: the batch that seals a row deletes its
//!   records in its transaction; the row is read as sealed, its value
//!   opened under phi's keys, the same plaintext.
//! - A recorded value the decoder recognises but cannot open fails the
//!   load with [`Error::Legacy`](crate::Error::Legacy) naming the table,
//!   column, row and owner (never the value); a plaintext that is not the
//!   field's encoding, with [`Error::DataTable`](crate::Error::DataTable).
//!   A recorded value that is not well formed in its format is returned
//!   as its text, as the backfill seals it.
//!
//! The rows and their records are read by two statements. Inside a
//! transaction that reads one snapshot (SQLite; MySQL's default
//! `REPEATABLE READ`; PostgreSQL's `REPEATABLE READ`), the records are
//! those of the rows read. Outside one, a row read just before the
//! backfill batch sealing it commits has lost its records when they are
//! read, and that one read returns the row's legacy text; the next read
//! finds it sealed.
//!
//! Only `load` and `load_async` read the records, since they hold the
//! connection: rows read some other way and opened with
//! [`open_all`](crate::PhiRecord::open_all), and the lookup finders,
//! return legacy values as stored.
//!
//! After the backfill, a table can be made strict
//! ([`Keyring::set_strict`](crate::Keyring::set_strict)): phi then refuses
//! to read or write a row of it whose flag is off, and [`sealed_check`]
//! gives the SQL with which the database refuses, from any client, a
//! sealed row whose values are not envelopes.

pub(crate) mod decoder;
#[cfg(feature = "legacy-fernet")]
mod fernet;
pub(crate) mod sql;
mod versioned;

use std::collections::BTreeMap;
use std::fmt;

pub use self::decoder::{LegacyDecoder, LegacyDecoders, LegacyPlaintext, LegacyValue};
#[cfg(feature = "legacy-fernet")]
pub use self::fernet::FernetDecoder;
pub use self::sql::{Dialect, SealedCheck, record_sql, sealed_check};
pub use self::versioned::VersionedGcmDecoder;
pub use crate::error::{LegacyError, LegacyErrorKind};

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
