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

/// Why stored bytes are not an envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Zero bytes.
    #[error("empty value (0 bytes)")]
    Empty,
    /// The first byte is not 0xF1: the column holds something else (plaintext,
    /// another format).
    #[error("not an envelope: first byte is 0x{0:02X}, expected 0xF1")]
    BadMagic(u8),
    /// Shorter than the header, nonce and tag of its format.
    #[error("truncated envelope: {len} bytes, at least {min} needed")]
    Truncated {
        /// Length found.
        len: usize,
        /// Minimum length of the format.
        min: usize,
    },
    /// A format version this build cannot read.
    #[error("unsupported envelope format version 0x{0:02X} (this build reads 0x01)")]
    UnsupportedVersion(u8),
}

/// Why decrypted bytes do not decode as the expected type. Never carries the
/// bytes themselves.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A `bool` byte other than 0 or 1.
    #[error("invalid bool byte")]
    Bool,
    /// A date or timestamp that is not ISO-8601 text.
    #[error("invalid {0} text")]
    DateTime(&'static str),
    /// A fixed-width integer of the wrong length.
    #[error("expected {expected} bytes for {ty}, found {found}")]
    Length {
        /// Rust type being decoded.
        ty: &'static str,
        /// Width of that type.
        expected: usize,
        /// Length found.
        found: usize,
    },
    /// Text that is not UTF-8.
    #[error("invalid UTF-8 text")]
    Utf8,
    /// Text that is not JSON (feature `serde_json`). The parser's message is
    /// not kept: it may quote the text.
    #[error("invalid JSON text")]
    Json,
}

/// A value in a legacy format that does not open. Says which format and
/// why, never the value or a key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{format} value: {kind}")]
pub struct LegacyError {
    /// The format (`fernet`, `aes-gcm-versioned`).
    pub format: &'static str,
    /// Why.
    pub kind: LegacyErrorKind,
}

impl LegacyError {
    /// An error of `format`.
    pub fn new(format: &'static str, kind: LegacyErrorKind) -> Self {
        LegacyError { format, kind }
    }
}

/// Why a legacy value does not open.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LegacyErrorKind {
    /// It does not authenticate under any key given: altered, or
    /// encrypted under a key the decoder does not have.
    #[error("does not authenticate under any key given (altered, or under another key)")]
    Authentication,
    /// It names a key version the decoder has no key for.
    #[error("names key version {0:?}, for which no key was given")]
    UnknownKeyVersion(String),
    /// It is not well formed: what is wrong.
    #[error("malformed: {0}")]
    Malformed(&'static str),
}

/// Why an AWS KMS call failed: the source of the [`Error::Kek`] the keyring
/// returns (which names the owner and key version), itself naming the KMS
/// operation, the key and the endpoint.
#[cfg(feature = "aws-kms")]
#[derive(Debug, thiserror::Error)]
#[error("AWS KMS {operation} with key {key_id:?} at {endpoint} failed: {kind} ({detail})")]
pub struct AwsKmsError {
    pub(crate) operation: &'static str,
    pub(crate) key_id: String,
    pub(crate) endpoint: String,
    pub(crate) kind: AwsKmsErrorKind,
    pub(crate) detail: String,
}

#[cfg(feature = "aws-kms")]
impl AwsKmsError {
    /// What kind of failure this was.
    pub fn kind(&self) -> AwsKmsErrorKind {
        self.kind
    }

    /// The KMS operation: `GenerateDataKey`, `Decrypt` or `Encrypt`.
    pub fn operation(&self) -> &'static str {
        self.operation
    }

    /// The KMS key as configured (key id, ARN or alias).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }
}

/// The kinds of [`AwsKmsError`].
#[cfg(feature = "aws-kms")]
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AwsKmsErrorKind {
    /// No answer: connection refused, DNS failure or a timeout, after the
    /// configured retries.
    #[error("the KMS is unreachable or did not answer in time")]
    Unreachable,
    /// The KMS key is disabled (`DisabledException`).
    #[error("the KMS key is disabled")]
    KeyDisabled,
    /// The KMS key is pending deletion, pending import or unavailable
    /// (`KMSInvalidStateException`, `KeyUnavailableException`).
    #[error("the KMS key is not in a usable state")]
    KeyState,
    /// The wrapped key does not decrypt under this KMS key with this owner
    /// and version as encryption context (`InvalidCiphertextException`,
    /// `IncorrectKeyException`): another owner's or version's key, another
    /// KMS key, or altered bytes.
    #[error(
        "the wrapped data key does not decrypt under this KMS key with this owner and version \
         (wrong encryption context, another KMS key, or altered bytes)"
    )]
    InvalidCiphertext,
    /// The credentials may not use the key (`AccessDeniedException`), or
    /// were not accepted.
    #[error("access denied (check the credentials and the key policy)")]
    AccessDenied,
    /// No such key or alias (`NotFoundException`).
    #[error("the KMS key does not exist")]
    KeyNotFound,
    /// The KMS throttled the calls, after the configured retries.
    #[error("the KMS throttled the request")]
    Throttled,
    /// The KMS answered without a usable key or ciphertext.
    #[error("the KMS answered with an unusable response")]
    BadResponse,
    /// Anything else; the detail says what.
    #[error("the KMS call failed")]
    Other,
}

#[cfg(feature = "aws-kms")]
impl AwsKmsErrorKind {
    /// The kind as a metric label: `unreachable`, `key_disabled`, ...
    pub fn label(self) -> &'static str {
        match self {
            AwsKmsErrorKind::Unreachable => "unreachable",
            AwsKmsErrorKind::KeyDisabled => "key_disabled",
            AwsKmsErrorKind::KeyState => "key_state",
            AwsKmsErrorKind::InvalidCiphertext => "invalid_ciphertext",
            AwsKmsErrorKind::AccessDenied => "access_denied",
            AwsKmsErrorKind::KeyNotFound => "key_not_found",
            AwsKmsErrorKind::Throttled => "throttled",
            AwsKmsErrorKind::BadResponse => "bad_response",
            AwsKmsErrorKind::Other => "other",
        }
    }
}

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
    #[error("value of {scope} for owner {owner:?} (key version {key_version}) does not decode")]
    Decode {
        /// `table.column` of the value.
        scope: String,
        /// Owner of the value.
        owner: String,
        /// Key version named in the envelope header.
        key_version: u32,
        /// What was wrong with the plaintext encoding.
        #[source]
        source: DecodeError,
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
    #[error("malformed encrypted value in {scope} for owner {owner:?}")]
    Malformed {
        /// `table.column` of the value.
        scope: String,
        /// Owner the row belongs to.
        owner: String,
        /// What is wrong with the bytes.
        #[source]
        source: EnvelopeError,
    },

    /// A key encryption key (local master key or KMS) failed.
    #[error("key encryption key {kek_id:?} failed for owner {owner:?} (key version {key_version})")]
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
         nothing was written"
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

    /// A worker thread sealing or opening a batch of rows panicked; the
    /// batch's result is lost, nothing of it was returned.
    #[error("a worker thread {operation} rows panicked")]
    WorkerPanicked {
        /// What the thread was doing (`sealing`, `opening`).
        operation: &'static str,
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
    #[error("key store failed while {operation}")]
    Store {
        /// What the key store was doing.
        operation: &'static str,
        /// The database error.
        #[source]
        source: BoxError,
    },

    /// phi's tables are not ready for this build: a table or column is
    /// missing (a migration of phi not applied), or a table of the same
    /// name is another application's. Found when a store connects
    /// ([`migrations::check`](crate::migrations::check)); phi changes no
    /// schema unless asked to.
    #[error("phi's table {table} is not ready (migration {migration}): {reason}")]
    Schema {
        /// The table at fault.
        table: String,
        /// The migration of phi that creates or changes it, by its
        /// directory name (`2026-12-07-000006_access_log`).
        migration: String,
        /// What is wrong and how to put it right.
        reason: String,
    },

    /// A query on the application's table failed.
    #[error("database query on table {table} failed while {operation}")]
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
    #[error("unsealed value of {scope} for owner {owner:?} (encrypted flag off) does not decode")]
    Unsealed {
        /// `table.column`.
        scope: String,
        /// The row's owner id.
        owner: String,
        /// Why it does not decode.
        #[source]
        source: DecodeError,
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

    /// A write was refused because this keyring follows the key-event feed
    /// and has not read it for longer than its maximum staleness: another
    /// process may have shredded or rotated the owner, or changed the
    /// roll-out, meanwhile. Both seals and the unsealed writes of a model
    /// with an encrypted flag (for an owner the roll-out leaves out) are
    /// refused. Opening goes on from the cache.
    #[error(
        "writing refused for owner {owner:?}: the key-event feed was last read {:.1} s ago, \
         past the maximum staleness of {:.1} s (the owner may have been shredded, rotated or \
         moved into the roll-out meanwhile)",
        stale_for.as_secs_f64(),
        max_staleness.as_secs_f64()
    )]
    FeedStale {
        /// The owner a write was asked for.
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
    #[error("{operation} failed on {table}.{column} for owner {owner:?}")]
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

    /// A value stored before phi in a format a
    /// [`LegacyDecoder`](crate::legacy::LegacyDecoder) reads (a Fernet
    /// token, a `v1:` text) does not open: tampered, truncated, or under a
    /// key the decoder was not given. No detail of the value or key.
    #[error("{table}.{column} of row {row:?} (owner {owner:?}) does not open")]
    Legacy {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// The row's key.
        row: String,
        /// The row's owner.
        owner: String,
        /// Why, without the value.
        #[source]
        source: Box<LegacyError>,
    },

    /// Strict mode ([`Keyring::set_strict`](crate::Keyring::set_strict)):
    /// a row of a strict table was read, or was about to be written, with
    /// its encrypted flag off.
    #[error(
        "strict mode: {operation} row {row:?} of {table} (owner {owner:?}) refused: its {column} flag is off (not sealed)"
    )]
    Strict {
        /// `reading`, `writing` or `unsealing`.
        operation: &'static str,
        /// The table.
        table: String,
        /// The encrypted flag column.
        column: String,
        /// The row's key (`?` for a model without a row key).
        row: String,
        /// The row's owner.
        owner: String,
    },

    /// [`KeyringBuilder::require_accessor`](crate::KeyringBuilder::require_accessor):
    /// a typed read or write was made on a keyring not seen
    /// [on behalf of](crate::Keyring::on_behalf_of) an accessor, so it
    /// could not be recorded in the access log under a person. Nothing was
    /// opened or sealed.
    #[error(
        "{operation} of {table} (owner {owner:?}) refused: this keyring requires an accessor (Keyring::on_behalf_of) for every open and seal"
    )]
    AccessorRequired {
        /// The access operation (`read`, `insert`, `update`, `delete`,
        /// `export`, `lookup`).
        operation: &'static str,
        /// The table (or the scope of a value sealed or opened by
        /// `Keyring::seal`/`Keyring::open`).
        table: String,
        /// The first owner concerned (empty for an empty batch).
        owner: String,
    },

    /// The keyring's [`AccessLog`](crate::access::AccessLog) could not take
    /// the records of an access (a fail-closed log that cannot write them
    /// now): the access did not go ahead.
    #[error("the access log refused the records of this access: {reason}")]
    AccessLogUnavailable {
        /// Why.
        reason: String,
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

    /// A single-row load (`PhiRecord::load_first`) whose query matched no
    /// row.
    #[error("no row of table {table} matched the query")]
    NotFound {
        /// The table queried.
        table: &'static str,
    },
}

/// A stable classification of an [`Error`], for deciding what to do about
/// it (retry, alert, report a bad input) without matching every variant.
///
/// New kinds may be added; match with a wildcard arm.
///
/// ```
/// use phi_types::{Error, ErrorKind};
///
/// let err = Error::Shredded { owner: "provider-17".into() };
/// assert_eq!(err.kind(), ErrorKind::Shredded);
/// assert!(!err.is_retryable());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The configuration is unusable: no or a wrong master key, a KEK not
    /// configured or not the one the database knows, a KMS key disabled,
    /// missing or not accessible.
    Config,
    /// An owner id, scope, row key or value the caller passed is unusable.
    InvalidInput,
    /// A stored value or wrapped key does not authenticate or parse: altered,
    /// moved from another owner, column or row, or wrapped by another key.
    Tampered,
    /// A value opened but does not decode as the expected type.
    Decode,
    /// A data key or key version that is needed does not exist, or a
    /// single-row load matched no row ([`Error::NotFound`]).
    NotFound,
    /// The owner was crypto-shredded.
    Shredded,
    /// A key life-cycle operation was refused (a version still in use, the
    /// current version, ...).
    Refused,
    /// A key encryption key or the key resolution is unavailable for now
    /// (the KMS unreachable or throttling, a concurrent resolution failed,
    /// the random source failed).
    Unavailable,
    /// A database query (the key store or an application table) failed.
    Database,
    /// A bug: a worker thread panicked.
    Internal,
}

impl Error {
    /// The classification of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_)
            | Error::Schema { .. }
            | Error::MasterKey { .. }
            | Error::KekMismatch { .. }
            | Error::UnknownKek { .. } => ErrorKind::Config,
            Error::InvalidInput { .. } | Error::Encrypt { .. } => ErrorKind::InvalidInput,
            Error::Decrypt { .. } | Error::Malformed { .. } | Error::Legacy { .. } => {
                ErrorKind::Tampered
            }
            Error::Decode { .. } | Error::Unsealed { .. } => ErrorKind::Decode,
            Error::NoKey { .. } | Error::UnknownKeyVersion { .. } | Error::NotFound { .. } => {
                ErrorKind::NotFound
            }
            Error::Shredded { .. } => ErrorKind::Shredded,
            Error::Refused { .. }
            | Error::KeyInUse { .. }
            | Error::Strict { .. }
            | Error::AccessorRequired { .. } => ErrorKind::Refused,
            Error::Kek { source, .. } | Error::KekCheck { source, .. } => kek_kind(source.as_ref()),
            Error::KeyUnavailable { .. }
            | Error::RandomSource(_)
            | Error::FeedStale { .. }
            | Error::AccessLogUnavailable { .. } => ErrorKind::Unavailable,
            Error::Store { .. } | Error::Database { .. } | Error::DataTable { .. } => {
                ErrorKind::Database
            }
            Error::WorkerPanicked { .. } => ErrorKind::Internal,
        }
    }

    /// Whether the same call may succeed if tried again later: the KMS
    /// unreachable or throttling, a concurrent key resolution that failed,
    /// a database serialization failure, deadlock or lost connection.
    /// Configuration, input, tampering and refusals are not retryable.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::KeyUnavailable { .. }
            | Error::FeedStale { .. }
            | Error::AccessLogUnavailable { .. } => true,
            Error::Kek { source, .. } | Error::KekCheck { source, .. } => {
                #[cfg(feature = "aws-kms")]
                if let Some(kms) = source.downcast_ref::<AwsKmsError>() {
                    return matches!(
                        kms.kind(),
                        AwsKmsErrorKind::Unreachable | AwsKmsErrorKind::Throttled
                    );
                }
                let _ = source;
                false
            }
            Error::Database { source, .. } => diesel_retryable(source),
            Error::Store { source, .. } | Error::DataTable { source, .. } => source
                .downcast_ref::<diesel::result::Error>()
                .is_some_and(diesel_retryable),
            _ => false,
        }
    }

    /// The AWS KMS failure behind this error, if a KMS call caused it,
    /// without downcasting the source.
    #[cfg(feature = "aws-kms")]
    pub fn kms_error_kind(&self) -> Option<AwsKmsErrorKind> {
        match self {
            Error::Kek { source, .. } | Error::KekCheck { source, .. } => {
                source.downcast_ref::<AwsKmsError>().map(AwsKmsError::kind)
            }
            _ => None,
        }
    }

    /// A copy of this error for each caller that waited on the key
    /// resolution that failed with it: the same variant with the same
    /// fields, so the same [`kind`](Self::kind), retryability and message.
    /// A source that cannot be cloned is kept as its text, except what the
    /// classification reads: an AWS KMS error is copied whole, a database
    /// error keeps its kind.
    pub(crate) fn for_waiter(&self) -> Error {
        match self {
            Error::Config(text) => Error::Config(text.clone()),
            Error::Schema {
                table,
                migration,
                reason,
            } => Error::Schema {
                table: table.clone(),
                migration: migration.clone(),
                reason: reason.clone(),
            },
            Error::Decrypt {
                scope,
                owner,
                key_version,
            } => Error::Decrypt {
                scope: scope.clone(),
                owner: owner.clone(),
                key_version: *key_version,
            },
            Error::Decode {
                scope,
                owner,
                key_version,
                source,
            } => Error::Decode {
                scope: scope.clone(),
                owner: owner.clone(),
                key_version: *key_version,
                source: source.clone(),
            },
            Error::Encrypt {
                scope,
                owner,
                reason,
            } => Error::Encrypt {
                scope: scope.clone(),
                owner: owner.clone(),
                reason,
            },
            Error::Malformed {
                scope,
                owner,
                source,
            } => Error::Malformed {
                scope: scope.clone(),
                owner: owner.clone(),
                source: *source,
            },
            Error::Kek {
                kek_id,
                owner,
                key_version,
                source,
            } => Error::Kek {
                kek_id: kek_id.clone(),
                owner: owner.clone(),
                key_version: *key_version,
                source: copy_kek_source(source.as_ref()),
            },
            Error::KekMismatch { kek_id, reason } => Error::KekMismatch {
                kek_id: kek_id.clone(),
                reason: reason.clone(),
            },
            Error::KekCheck { kek_id, source } => Error::KekCheck {
                kek_id: kek_id.clone(),
                source: copy_kek_source(source.as_ref()),
            },
            Error::KeyUnavailable { owner, reason } => Error::KeyUnavailable {
                owner: owner.clone(),
                reason: reason.clone(),
            },
            Error::WorkerPanicked { operation } => Error::WorkerPanicked { operation },
            Error::MasterKey { kek_id, reason } => Error::MasterKey {
                kek_id: kek_id.clone(),
                reason: reason.clone(),
            },
            Error::NoKey { owner } => Error::NoKey {
                owner: owner.clone(),
            },
            Error::InvalidInput { what, reason } => Error::InvalidInput {
                what,
                reason: reason.clone(),
            },
            Error::Store { operation, source } => Error::Store {
                operation,
                source: match source.downcast_ref::<diesel::result::Error>() {
                    Some(diesel) => Box::new(copy_diesel(diesel)),
                    None => chain_text(source.as_ref()).into(),
                },
            },
            Error::Database {
                operation,
                table,
                source,
            } => Error::Database {
                operation,
                table,
                source: copy_diesel(source),
            },
            Error::Unsealed {
                scope,
                owner,
                source,
            } => Error::Unsealed {
                scope: scope.clone(),
                owner: owner.clone(),
                source: source.clone(),
            },
            Error::RandomSource(text) => Error::RandomSource(text.clone()),
            Error::UnknownKek {
                owner,
                key_version,
                kek_id,
            } => Error::UnknownKek {
                owner: owner.clone(),
                key_version: *key_version,
                kek_id: kek_id.clone(),
            },
            Error::Shredded { owner } => Error::Shredded {
                owner: owner.clone(),
            },
            Error::FeedStale {
                owner,
                stale_for,
                max_staleness,
            } => Error::FeedStale {
                owner: owner.clone(),
                stale_for: *stale_for,
                max_staleness: *max_staleness,
            },
            Error::KeyInUse {
                owner,
                key_version,
                table,
                column,
                rows,
            } => Error::KeyInUse {
                owner: owner.clone(),
                key_version: *key_version,
                table: table.clone(),
                column: column.clone(),
                rows: *rows,
            },
            Error::AccessLogUnavailable { reason } => Error::AccessLogUnavailable {
                reason: reason.clone(),
            },
            Error::AccessorRequired {
                operation,
                table,
                owner,
            } => Error::AccessorRequired {
                operation,
                table: table.clone(),
                owner: owner.clone(),
            },
            Error::Refused {
                operation,
                owner,
                reason,
            } => Error::Refused {
                operation: operation.clone(),
                owner: owner.clone(),
                reason: reason.clone(),
            },
            Error::DataTable {
                operation,
                table,
                column,
                owner,
                source,
            } => Error::DataTable {
                operation,
                table: table.clone(),
                column: column.clone(),
                owner: owner.clone(),
                source: match source.downcast_ref::<diesel::result::Error>() {
                    Some(diesel) => Box::new(copy_diesel(diesel)),
                    None => chain_text(source.as_ref()).into(),
                },
            },
            Error::Legacy {
                table,
                column,
                row,
                owner,
                source,
            } => Error::Legacy {
                table: table.clone(),
                column: column.clone(),
                row: row.clone(),
                owner: owner.clone(),
                source: source.clone(),
            },
            Error::Strict {
                operation,
                table,
                column,
                row,
                owner,
            } => Error::Strict {
                operation,
                table: table.clone(),
                column: column.clone(),
                row: row.clone(),
                owner: owner.clone(),
            },
            Error::UnknownKeyVersion {
                scope,
                owner,
                key_version,
            } => Error::UnknownKeyVersion {
                scope: scope.clone(),
                owner: owner.clone(),
                key_version: *key_version,
            },
            Error::NotFound { table } => Error::NotFound { table },
        }
    }

    pub(crate) fn store(operation: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Store {
            operation,
            source: source.into(),
        }
    }
}

/// An error's message followed by each of its sources', `: `-separated: for
/// the places that keep an error as text (a waiter's copy of another
/// call's failure, a log field), since no message repeats its source.
pub(crate) fn chain_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A KEK failure's source for a waiter's copy ([`Error::for_waiter`]): an
/// AWS KMS error whole (its kind classifies the error), any other as its
/// text (classified the same: a local KEK's failure).
fn copy_kek_source(source: &(dyn std::error::Error + Send + Sync + 'static)) -> BoxError {
    #[cfg(feature = "aws-kms")]
    if let Some(kms) = source.downcast_ref::<AwsKmsError>() {
        return Box::new(AwsKmsError {
            operation: kms.operation,
            key_id: kms.key_id.clone(),
            endpoint: kms.endpoint.clone(),
            kind: kms.kind,
            detail: kms.detail.clone(),
        });
    }
    chain_text(source).into()
}

/// A Diesel error for a waiter's copy: a database error keeps its kind (it
/// decides retryability) and message; any other becomes a query-builder
/// error with its text.
fn copy_diesel(error: &diesel::result::Error) -> diesel::result::Error {
    use diesel::result::Error as E;
    match error {
        E::DatabaseError(kind, info) => {
            E::DatabaseError(*kind, Box::new(info.message().to_owned()))
        }
        E::NotFound => E::NotFound,
        other => E::QueryBuilderError(chain_text(other).into()),
    }
}

/// The kind of a KEK failure: the KMS's own classification where it is
/// one; otherwise (a [`LocalKek`](crate::LocalKek)) a wrapped key that does
/// not authenticate or has the wrong length.
fn kek_kind(source: &(dyn std::error::Error + Send + Sync + 'static)) -> ErrorKind {
    #[cfg(feature = "aws-kms")]
    if let Some(kms) = source.downcast_ref::<AwsKmsError>() {
        use AwsKmsErrorKind as K;
        return match kms.kind() {
            K::KeyDisabled | K::KeyState | K::AccessDenied | K::KeyNotFound => ErrorKind::Config,
            K::InvalidCiphertext => ErrorKind::Tampered,
            _ => ErrorKind::Unavailable,
        };
    }
    let _ = source;
    ErrorKind::Tampered
}

/// Serialization failures, deadlocks and lost connections may pass on a
/// second try.
fn diesel_retryable(error: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind as D, Error as E};
    matches!(
        error,
        E::DatabaseError(D::SerializationFailure | D::ClosedConnection, _)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    fn boxed(text: &str) -> BoxError {
        text.to_owned().into()
    }

    /// Whether `error`'s variant carries a source. Exhaustive on purpose: a
    /// new variant does not compile until it is sorted here, and one with a
    /// source is then missing from `display_never_repeats_the_source` (which
    /// checks it has every such variant).
    fn has_source(error: &Error) -> bool {
        match error {
            Error::Decode { .. }
            | Error::Malformed { .. }
            | Error::Kek { .. }
            | Error::KekCheck { .. }
            | Error::Store { .. }
            | Error::Database { .. }
            | Error::Unsealed { .. }
            | Error::DataTable { .. }
            | Error::Legacy { .. } => true,
            Error::Config(_)
            | Error::Schema { .. }
            | Error::Decrypt { .. }
            | Error::Encrypt { .. }
            | Error::KekMismatch { .. }
            | Error::KeyUnavailable { .. }
            | Error::WorkerPanicked { .. }
            | Error::MasterKey { .. }
            | Error::NoKey { .. }
            | Error::InvalidInput { .. }
            | Error::RandomSource(_)
            | Error::UnknownKek { .. }
            | Error::Shredded { .. }
            | Error::FeedStale { .. }
            | Error::KeyInUse { .. }
            | Error::Refused { .. }
            | Error::UnknownKeyVersion { .. }
            | Error::NotFound { .. }
            | Error::AccessorRequired { .. }
            | Error::AccessLogUnavailable { .. }
            | Error::Strict { .. } => false,
        }
    }

    /// The variants `has_source` says carry a source.
    const VARIANTS_WITH_A_SOURCE: usize = 9;

    /// Every variant with a source: the message never repeats it (chains
    /// printed by anyhow or eyre would say it twice), and `source()` gives it.
    #[test]
    fn display_never_repeats_the_source() {
        let owner = || "provider-17".to_owned();
        let scope = || "cases.patient_last".to_owned();
        let cases: Vec<(Error, &str, &str)> = vec![
            (
                Error::Decode {
                    scope: scope(),
                    owner: owner(),
                    key_version: 2,
                    source: DecodeError::Bool,
                },
                "value of cases.patient_last for owner \"provider-17\" (key version 2) does not decode",
                "invalid bool byte",
            ),
            (
                Error::Malformed {
                    scope: scope(),
                    owner: owner(),
                    source: EnvelopeError::BadMagic(0x44),
                },
                "malformed encrypted value in cases.patient_last for owner \"provider-17\"",
                "not an envelope: first byte is 0x44, expected 0xF1",
            ),
            (
                Error::Kek {
                    kek_id: "local-1".into(),
                    owner: owner(),
                    key_version: 3,
                    source: boxed("wrapped key does not authenticate"),
                },
                "key encryption key \"local-1\" failed for owner \"provider-17\" (key version 3)",
                "wrapped key does not authenticate",
            ),
            (
                Error::KekCheck {
                    kek_id: "aws-kms:alias/phi".into(),
                    source: boxed("the KMS is unreachable"),
                },
                "cannot check KEK \"aws-kms:alias/phi\" against the check value this database \
                 holds for it, nothing was written",
                "the KMS is unreachable",
            ),
            (
                Error::store("loading keys", boxed("disk I/O error")),
                "key store failed while loading keys",
                "disk I/O error",
            ),
            (
                Error::Database {
                    operation: "loading rows",
                    table: "cases",
                    source: diesel::result::Error::NotFound,
                },
                "database query on table cases failed while loading rows",
                "Record not found",
            ),
            (
                Error::Unsealed {
                    scope: scope(),
                    owner: owner(),
                    source: DecodeError::DateTime("date"),
                },
                "unsealed value of cases.patient_last for owner \"provider-17\" (encrypted flag off) \
                 does not decode",
                "invalid date text",
            ),
            (
                Error::DataTable {
                    operation: "re-seal",
                    table: "cases".into(),
                    column: "patient_last".into(),
                    owner: owner(),
                    source: boxed("deadlock detected"),
                },
                "re-seal failed on cases.patient_last for owner \"provider-17\"",
                "deadlock detected",
            ),
            (
                Error::Legacy {
                    table: "cases".into(),
                    column: "patient_last".into(),
                    row: "c-1".into(),
                    owner: owner(),
                    source: Box::new(LegacyError::new("fernet", LegacyErrorKind::Authentication)),
                },
                "cases.patient_last of row \"c-1\" (owner \"provider-17\") does not open",
                "fernet value: does not authenticate under any key given (altered, or under another key)",
            ),
        ];
        let variants: std::collections::HashSet<_> = cases
            .iter()
            .map(|(error, _, _)| std::mem::discriminant(error))
            .collect();
        assert_eq!(
            variants.len(),
            VARIANTS_WITH_A_SOURCE,
            "every variant with a source is checked"
        );
        for (error, display, source) in cases {
            assert!(has_source(&error), "{error:?}");
            assert_eq!(error.to_string(), display, "{error:?}");
            let cause = error.source().expect("a source").to_string();
            assert_eq!(cause, source, "{error:?}");
            assert!(!error.to_string().contains(&cause), "{error}");
        }
    }

    /// The variants without a source say everything themselves.
    #[test]
    fn variants_without_a_source_have_none() {
        let cases = [
            Error::Config("zero cache size".into()),
            Error::Decrypt {
                scope: "cases.patient_last".into(),
                owner: "provider-17".into(),
                key_version: 1,
            },
            Error::KeyUnavailable {
                owner: "provider-17".into(),
                reason: "a concurrent resolution failed".into(),
            },
            Error::WorkerPanicked {
                operation: "sealing",
            },
            Error::Shredded {
                owner: "provider-17".into(),
            },
            Error::NoKey {
                owner: "provider-17".into(),
            },
        ];
        for error in cases {
            assert!(!has_source(&error), "{error:?}");
            assert!(error.source().is_none(), "{error:?}");
        }
        assert_eq!(
            Error::WorkerPanicked {
                operation: "opening"
            }
            .to_string(),
            "a worker thread opening rows panicked"
        );
    }

    #[test]
    fn kinds_and_retries() {
        let decrypt = Error::Decrypt {
            scope: "cases.patient_last".into(),
            owner: "provider-17".into(),
            key_version: 1,
        };
        assert_eq!(decrypt.kind(), ErrorKind::Tampered);
        assert!(!decrypt.is_retryable());

        let waited = Error::KeyUnavailable {
            owner: "provider-17".into(),
            reason: "the KMS did not answer".into(),
        };
        assert_eq!(waited.kind(), ErrorKind::Unavailable);
        assert!(waited.is_retryable());

        // A local KEK's failure is a wrapped key that does not open: trying
        // again gives the same answer.
        let local = Error::Kek {
            kek_id: "local-1".into(),
            owner: "provider-17".into(),
            key_version: 1,
            source: boxed("wrapped key does not authenticate"),
        };
        assert_eq!(local.kind(), ErrorKind::Tampered);
        assert!(!local.is_retryable());

        let conflict = Error::Database {
            operation: "updating",
            table: "cases",
            source: diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::SerializationFailure,
                Box::new("could not serialize access".to_owned()),
            ),
        };
        assert_eq!(conflict.kind(), ErrorKind::Database);
        assert!(conflict.is_retryable());
        let missing = Error::store("loading keys", diesel::result::Error::NotFound);
        assert_eq!(missing.kind(), ErrorKind::Database);
        assert!(!missing.is_retryable());
        let stored = Error::store(
            "loading keys",
            diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::ClosedConnection,
                Box::new("server closed the connection".to_owned()),
            ),
        );
        assert!(stored.is_retryable());

        let in_use = Error::KeyInUse {
            owner: "provider-17".into(),
            key_version: 1,
            table: "cases".into(),
            column: "patient_last".into(),
            rows: 5,
        };
        assert_eq!(in_use.kind(), ErrorKind::Refused);
        assert_eq!(
            Error::MasterKey {
                kek_id: "local-1".into(),
                reason: "not base64".into()
            }
            .kind(),
            ErrorKind::Config
        );
        assert_eq!(
            Error::WorkerPanicked {
                operation: "sealing"
            }
            .kind(),
            ErrorKind::Internal
        );
    }
}
