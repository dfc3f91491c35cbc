//! The error type of `phi-types`.
//!
//! Every message carries the context an operator needs (the `table.column`
//! scope, the owner id, the key version, the KEK id) and never a plaintext
//! value or key bytes. Owner ids are opaque identifiers chosen by the
//! application (user ids, tenant ids), not PHI.

/// Result alias used throughout `phi-types`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A boxed error from an underlying system (database, KMS, file system).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors returned by `phi-types`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is unusable (no KEK configured, a zero cache size, ...).
    #[error("invalid phi configuration: {0}")]
    Config(String),

    /// Authentication failed while opening a value: the wrong owner, column or
    /// row, a key that does not match, or stored bytes that were altered. The
    /// cause is deliberately not distinguished.
    #[error(
        "cannot open {scope} for owner {owner:?} under key version {key_version}: \
         authentication failed (the value was altered, or belongs to another owner, column or row)"
    )]
    Decrypt {
        /// `table.column` of the value.
        scope: String,
        /// Owner whose key was used.
        owner: String,
        /// Key version named in the envelope header.
        key_version: u32,
    },

    /// A value opened correctly but its plaintext does not decode as the
    /// expected Rust type.
    #[error(
        "value of {scope} for owner {owner:?} (key version {key_version}) does not decode: {source}"
    )]
    Decode {
        /// `table.column` of the value.
        scope: String,
        /// Owner of the value.
        owner: String,
        /// Key version named in the envelope header.
        key_version: u32,
        /// What was wrong with the plaintext encoding.
        #[source]
        source: crate::value::DecodeError,
    },

    /// Sealing failed (a value or context too large for the format).
    #[error("cannot seal {scope} for owner {owner:?}: {reason}")]
    Encrypt {
        /// `table.column` of the value.
        scope: String,
        /// Owner of the value.
        owner: String,
        /// Why sealing was refused.
        reason: &'static str,
    },

    /// The stored bytes of an encrypted column are not a valid envelope.
    #[error("malformed encrypted value in {scope} for owner {owner:?}: {source}")]
    Malformed {
        /// `table.column` of the value.
        scope: String,
        /// Owner the row belongs to.
        owner: String,
        /// What is wrong with the bytes.
        #[source]
        source: crate::envelope::EnvelopeError,
    },

    /// A key encryption key (local master key or KMS) failed.
    #[error(
        "key encryption key {kek_id:?} failed for owner {owner:?} (key version {key_version}): {source}"
    )]
    Kek {
        /// The KEK that was asked.
        kek_id: String,
        /// Owner whose data key was being generated or unwrapped.
        owner: String,
        /// Data key version.
        key_version: u32,
        /// The provider's error.
        #[source]
        source: BoxError,
    },

    /// The key material configured for a KEK is not the one the key store
    /// knows under that KEK id (its stored check value, or the data keys it
    /// wrapped, do not verify). The keyring is refused before anything is
    /// written.
    #[error(
        "KEK {kek_id:?} is not the key this database knows under that id ({reason}); refusing \
         to use it, nothing was written. Check the key configured for {kek_id:?}: \
         PHI_MASTER_KEY / PHI_MASTER_KEY_FILE for a local master key, the KMS key or alias \
         (and that the alias still names the same key) for AWS KMS"
    )]
    KekMismatch {
        /// The KEK id.
        kek_id: String,
        /// What did not verify (never key bytes).
        reason: String,
    },

    /// A KEK could not be checked against the key store's check value (the
    /// KMS unreachable, no permission to use the key, ...). The keyring is
    /// refused before anything is written.
    #[error(
        "cannot check KEK {kek_id:?} against the check value this database holds for it, \
         nothing was written: {source}"
    )]
    KekCheck {
        /// The KEK id.
        kek_id: String,
        /// The provider's error.
        #[source]
        source: BoxError,
    },

    /// A data key of this owner could not be resolved because a concurrent
    /// resolution of the same owner failed; the message repeats that failure.
    #[error("data key of owner {owner:?} is unavailable: {reason}")]
    KeyUnavailable {
        /// Owner whose key was asked for.
        owner: String,
        /// The error of the resolution this call waited for.
        reason: String,
    },

    /// The master key given to [`LocalKek`](crate::LocalKek) is unusable.
    #[error("invalid master key for KEK {kek_id:?}: {reason}")]
    MasterKey {
        /// Id of the KEK being configured.
        kek_id: String,
        /// What is wrong (never the key itself).
        reason: String,
    },

    /// The owner has no active data key to seal with (none yet where keys
    /// are not created, or every version retired or destroyed).
    #[error("owner {owner:?} has no active data key to seal with")]
    NoKey {
        /// The owner.
        owner: String,
    },

    /// An owner id, scope or row key is unusable (empty owner, longer than
    /// 65,535 bytes).
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// Which input (`owner`, `scope`, `row key`).
        what: &'static str,
        /// Why it was refused.
        reason: String,
    },

    /// The key store (the `user_encryption_keys` / `encryption_key_audit`
    /// tables) failed.
    #[error("key store failed while {operation}: {source}")]
    Store {
        /// What the key store was doing.
        operation: &'static str,
        /// The database error.
        #[source]
        source: BoxError,
    },

    /// A query on the application's table failed.
    #[error("database query on table {table} failed while {operation}: {source}")]
    Database {
        /// What was being done.
        operation: &'static str,
        /// The table queried.
        table: &'static str,
        /// Diesel's error.
        #[source]
        source: diesel::result::Error,
    },

    /// A value of a row whose encrypted flag is off (written before the
    /// roll-out) does not decode as the field's type.
    #[error(
        "unsealed value of {scope} for owner {owner:?} (encrypted flag off) does not decode: {source}"
    )]
    Unsealed {
        /// `table.column`.
        scope: String,
        /// The row's owner id.
        owner: String,
        /// Why it does not decode.
        #[source]
        source: crate::value::DecodeError,
    },

    /// The operating system's random source failed while seeding the nonce
    /// generator.
    #[error("the operating system's random source failed: {0}")]
    RandomSource(String),

    /// A stored data key row names a KEK that is not configured on this keyring.
    #[error(
        "data key version {key_version} of owner {owner:?} is wrapped by KEK {kek_id:?}, which is not configured"
    )]
    UnknownKek {
        /// Owner of the data key.
        owner: String,
        /// Data key version.
        key_version: u32,
        /// The KEK id recorded in the key store.
        kek_id: String,
    },

    /// The owner's data keys were destroyed (crypto-shredding): nothing is
    /// sealed for this owner again, and no new key is created silently.
    #[error(
        "owner {owner:?} was crypto-shredded: its data keys are destroyed and no new value is sealed for it"
    )]
    Shredded {
        /// The owner.
        owner: String,
    },

    /// Sealing was refused because this keyring follows the key-event feed
    /// and has not read it for longer than its maximum staleness: another
    /// process may have shredded or rotated the owner, or changed the
    /// roll-out, meanwhile. Opening goes on from the cache.
    #[error(
        "sealing refused for owner {owner:?}: the key-event feed was last read {:.1} s ago, \
         past the maximum staleness of {:.1} s (the owner may have been shredded or rotated meanwhile)",
        stale_for.as_secs_f64(),
        max_staleness.as_secs_f64()
    )]
    FeedStale {
        /// The owner a seal was asked for.
        owner: String,
        /// Time since the feed was last read successfully.
        stale_for: std::time::Duration,
        /// The keyring's maximum staleness.
        max_staleness: std::time::Duration,
    },

    /// A data key version cannot be retired while values still use it.
    #[error(
        "cannot retire data key version {key_version} of owner {owner:?}: \
         {rows} value(s) in {table}.{column} still use it (re-seal them first)"
    )]
    KeyInUse {
        /// The owner.
        owner: String,
        /// The version asked to retire.
        key_version: u32,
        /// The table holding the values.
        table: String,
        /// The column holding the values.
        column: String,
        /// How many values of that column use the version.
        rows: u64,
    },

    /// A key life-cycle operation was refused (retiring the current version,
    /// rotating a shredded owner, ...).
    #[error("{operation} refused for owner {owner:?}: {reason}")]
    Refused {
        /// What was asked (`retire version 2`, `rotate`, ...).
        operation: String,
        /// The owner.
        owner: String,
        /// Why.
        reason: String,
    },

    /// A query on an application table (re-seal, retirement check, shred
    /// verification) failed.
    #[error("{operation} failed on {table}.{column} for owner {owner:?}: {source}")]
    DataTable {
        /// What was being done.
        operation: &'static str,
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// The owner whose values were being worked on.
        owner: String,
        /// The database error.
        #[source]
        source: BoxError,
    },

    /// The envelope names a data key version this owner does not have (never
    /// created, or destroyed).
    #[error("owner {owner:?} has no data key version {key_version} (needed to open {scope})")]
    UnknownKeyVersion {
        /// `table.column` of the value being opened.
        scope: String,
        /// The owner.
        owner: String,
        /// The key version named in the envelope header.
        key_version: u32,
    },
}

impl Error {
    pub(crate) fn store(operation: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Store {
            operation,
            source: source.into(),
        }
    }
}
