//! The decoder trait and what it is given and returns: below the keyring,
//! which holds the decoder its loads read legacy values with
//! ([`KeyringBuilder::legacy`](crate::KeyringBuilder::legacy)).

use std::fmt;
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::error::LegacyError;

/// Opens values stored before phi in an encrypted format of their own.
///
/// Called by the migration jobs for each non-NULL value of a row whose
/// encrypted flag is off, and, registered on the keyring
/// ([`KeyringBuilder::legacy`](crate::KeyringBuilder::legacy)), by the
/// loads of such rows (see [`crate::legacy`]). Implementations hold their
/// keys zeroized on drop and never print them (`Debug` included).
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
