//! Adopting phi on a database that predates it: backfill, verify and the
//! emergency rollback, for any `#[derive(PhiRecord)]` model with an
//! encrypted flag and a row key.
//!
//! A table whose rows were written before phi holds each PHI column's
//! plain encoding (UTF-8 text, an ISO-8601 date: see [`crate::value`]) with
//! its `#[phi(encrypted_flag)]` off, and such rows keep reading. Then:
//!
//! ```text
//! backfill(dry_run)  scan the unsealed rows: how many, which owners need a
//!                    data key, which values would not decode; write nothing
//! backfill           seal every unsealed row, batch by batch
//! verify             every sealed value is an envelope that opens and decodes
//!                    (blind indexes current), every unsealed value decodes;
//!                    values not in their canonical encoding are reported
//! decrypt_back       the rollback: every sealed row back to its plain encoding
//! ```
//!
//! A legacy value may decode without being in the encoding the model
//! writes: a date stored as `1980-1-15` decodes, but the model writes
//! `1980-01-15`. The jobs decode each value and encode it again
//! (as the model's own encoding does), then seal that and compute the blind
//! index from it, exactly as the model does: the backfilled row is found
//! by the application's lookup of `1980-01-15`. Text is not altered (a
//! padded ` Doe ` stays ` Doe `); its blind index is normalised by the
//! field's `normalize` option, as the model's lookups are.
//!
//! Each batch is one transaction: `SELECT … WHERE flag off AND key > last
//! ORDER BY key LIMIT n` (rows locked on MySQL and PostgreSQL, the database
//! on SQLite; `last` is the last key the previous batch read, so each batch
//! reads an index range instead of stepping over every row already sealed),
//! then one set-based `UPDATE` for the whole batch, which seals each row's
//! values and sets its blind indexes and its flag where the row's key
//! matches and its flag is still off: `UPDATE … FROM (VALUES …)` on
//! PostgreSQL and SQLite, `UPDATE … JOIN (SELECT … UNION ALL …)` on MySQL
//! and MariaDB, split only past the backend's bind-parameter limit or a
//! few MiB of values. The rows it reports written are the rows sealed; the
//! others were sealed by another writer first (counted as `skipped`). A crash loses at
//! most the batch in flight, rolled back; running the job again goes on
//! from there. Two jobs running at once never seal a row twice: the second
//! finds the flag already on and leaves the row alone (counted as
//! `skipped`). A row left behind the cursor (its owner changed while its
//! batch ran, or another writer turned its flag back) is found by a further
//! pass from the first key: the job ends when a pass from the first key
//! finds no row to migrate. [`decrypt_back`] is the same in reverse,
//! guarded by the flag being on.
//!
//! The owners' data keys are resolved (and created, for owners that have
//! none) before each batch's transaction opens, so a key store on the same
//! SQLite file never waits on the batch's write lock. Values are sealed
//! exactly as the model seals them (same scope, row key and owner), so the
//! application cannot tell a backfilled row from one it wrote sealed; the
//! plaintext never leaves the process and its buffers are zeroized.
//!
//! **Shadow columns** (`#[phi(encrypt, shadow)]`, the dual-write phase):
//! the plaintext column keeps its own SQL type and is read as text; the
//! backfill seals it into the shadow column ([`StoredColumn::sealed_column`])
//! and leaves it unchanged; verify opens a sealed row's shadow and compares
//! it with the canonical encoding of the plaintext column (a difference, or
//! one of the two NULL, is [`ProblemKind::ShadowMismatch`]); decrypt-back
//! writes the opened value into the plaintext column as text (the backend
//! converts it to the column's type: a date, say), which also refills a
//! plaintext column emptied by a finalize's down migration, and sets the
//! shadow and blind index columns NULL. A sealed row whose shadow is NULL
//! keeps its plaintext. Fields whose encoding is not text (integers,
//! `bool`, bytes) cannot be written back into a plaintext column.
//! Lookup-index re-indexing waits for finalize.
//!
//! ```
//! # #[cfg(feature = "sqlite")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use diesel::prelude::*;
//! use phi_types::migrate::{self, BackfillOptions, VerifyOptions};
//! use phi_types::{Keyring, LocalKek, MemoryKeyStore, KeyBytes, PhiRecord, Rollout};
//!
//! diesel::table! {
//!     cases (case_id) {
//!         case_id -> Text,
//!         user_id -> Text,
//!         patient_last -> Binary,
//!         phi_encrypted -> Bool,
//!     }
//! }
//!
//! #[derive(PhiRecord, Clone, PartialEq)]
//! #[phi(table = cases, debug)]
//! #[diesel(primary_key(case_id))]
//! struct Case {
//!     #[phi(row_key)]
//!     case_id: String,
//!     #[phi(owner)]
//!     user_id: String,
//!     #[phi(encrypt)]
//!     patient_last: String,
//!     #[phi(encrypted_flag)]
//!     phi_encrypted: bool,
//! }
//!
//! let mut conn = SqliteConnection::establish(":memory:")?;
//! diesel::sql_query(
//!     "CREATE TABLE cases (case_id TEXT PRIMARY KEY, user_id TEXT NOT NULL,
//!      patient_last BLOB NOT NULL, phi_encrypted BOOLEAN NOT NULL DEFAULT 0)",
//! ).execute(&mut conn)?;
//! // A database that predates phi: plain bytes, flag off.
//! diesel::sql_query("INSERT INTO cases VALUES ('C-1', 'dr-okafor', CAST('Doe' AS BLOB), 0)")
//!     .execute(&mut conn)?;
//!
//! let kek = Arc::new(LocalKek::new("local-1", &KeyBytes::new([7; 32])));
//! let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), kek).build()?;
//! let mut batches = 0;
//! let options = BackfillOptions::default().batch(500).progress(|_| batches += 1);
//! let report = migrate::backfill::<Case, _>(&mut conn, &keyring, &options)?;
//! assert_eq!((report.rows, report.remaining), (1, 0));
//! drop(options);
//! assert_eq!(batches, 1);
//!
//! let verified = migrate::verify::<Case, _>(&mut conn, &keyring, &VerifyOptions::default())?;
//! assert!(verified.is_ok() && verified.sealed == 1 && verified.unsealed == 0);
//! let cases = Case::load(cases::table, &mut conn, &keyring)?;
//! assert_eq!((cases[0].patient_last.as_str(), cases[0].phi_encrypted), ("Doe", true));
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "sqlite"))]
//! # fn main() {}
//! ```

mod reindex;

pub use reindex::{ReindexReport, reindex, reindex_table};

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::keyring::{Keyring, OwnerKeys};
use crate::legacy::{
    LegacyCount, LegacyDecoder, LegacyErrorKind, LegacyPlaintext, LegacyValue, Tally,
};
pub use crate::lifecycle::tables::Migratable;
#[doc(hidden)]
pub use crate::lifecycle::tables::{CanonicalFn, StoredColumn, StoredCompound, StoredTable};
use crate::lifecycle::tables::{
    ColumnType, DataConnection, LegacyRecord, MigrationRow, RowWrite, RowsQuery, SqlValue,
};
use crate::sql::Encrypted;
use crate::store::KeyState;
use crate::value::{DecodeError, PhiValue};

/// Rows per batch unless [`MigrateOptions::batch`] says otherwise.
pub const DEFAULT_BATCH: usize = 500;

/// The most rows one batch may hold (one `IN` list of keys per column).
pub const MAX_BATCH: usize = 10_000;

/// Problems kept in a report; the rest are only counted.
const MAX_PROBLEMS: usize = 50;

/// [`StoredColumn::canonical`] for a field of type `T`: `bytes` decoded as
/// a `T` and encoded again, so `1980-1-15` becomes `1980-01-15` for a
/// `NaiveDate`. Every encoding the model writes is its own canonical form.
///
/// # Errors
/// When `bytes` are not an encoding of `T`.
#[doc(hidden)]
pub fn canonical<T: PhiValue>(
    bytes: Vec<u8>,
) -> std::result::Result<Zeroizing<Vec<u8>>, DecodeError> {
    let mut value = T::decode(bytes)?;
    // Room for a fraction of a second beyond a timestamp's usual length, so
    // the buffer is not reallocated (leaving an unwiped copy).
    let mut out = Zeroizing::new(Vec::with_capacity(value.encoded_len() + 16));
    value.encode(&mut out);
    // The decoded value (for text, the very buffer `bytes` was) is
    // plaintext: wiped before it is dropped, only `out` goes on.
    value.wipe();
    Ok(out)
}

/// The SQL type of an owner or row key field, for [`StoredTable`]:
/// implemented for `String` and the integer types; `Vec<u8>` and
/// `uuid::Uuid` have none.
#[doc(hidden)]
pub trait KeyColumnType {
    /// The column type, if the migration jobs can bind it.
    const COLUMN_TYPE: Option<ColumnType>;
}

macro_rules! key_column_type {
    ($($t:ty => $v:expr),* $(,)?) => {$(
        impl KeyColumnType for $t {
            const COLUMN_TYPE: Option<ColumnType> = $v;
        }
    )*};
}
key_column_type! {
    String => Some(ColumnType::Text),
    i16 => Some(ColumnType::I16),
    i32 => Some(ColumnType::I32),
    i64 => Some(ColumnType::I64),
    u16 => Some(ColumnType::U16),
    u32 => Some(ColumnType::U32),
    u64 => Some(ColumnType::U64),
    Vec<u8> => None,
}

/// The migration jobs bind text and integer key columns only: a model keyed
/// by a UUID is sealed and opened by the derive, not backfilled by the jobs.
#[cfg(feature = "uuid")]
impl KeyColumnType for uuid::Uuid {
    const COLUMN_TYPE: Option<ColumnType> = None;
}

/// As for `uuid::Uuid`.
#[cfg(feature = "uuid")]
impl KeyColumnType for crate::BinaryUuid {
    const COLUMN_TYPE: Option<ColumnType> = None;
}

/// Settings of [`backfill`] and [`decrypt_back`]: the batch size, a dry
/// run, a legacy decoder and a progress callback.
///
/// ```
/// use phi_types::migrate::{BackfillOptions, Progress};
///
/// let mut seen = Vec::new();
/// let options = BackfillOptions::default()
///     .batch(500)
///     .progress(|p: &Progress| seen.push(p.done));
/// // phi_types::migrate::backfill::<Case, _>(&mut conn, &keyring, &options)?;
/// # drop(options);
/// ```
#[derive(Clone, Debug)]
pub struct MigrateOptions<'a> {
    batch: usize,
    dry_run: bool,
    legacy: Option<Arc<dyn LegacyDecoder>>,
    progress: crate::shared::Callback<'a, Progress>,
}

/// The options of [`backfill`] (and [`decrypt_back`]).
pub type BackfillOptions<'a> = MigrateOptions<'a>;

impl Default for MigrateOptions<'_> {
    fn default() -> Self {
        MigrateOptions {
            batch: DEFAULT_BATCH,
            dry_run: false,
            legacy: None,
            progress: crate::shared::Callback::default(),
        }
    }
}

impl MigrateOptions<'_> {
    /// Calls `f` after each batch with how far the job is (default: no
    /// callback).
    #[must_use]
    pub fn progress<'b>(self, f: impl FnMut(&Progress) + 'b) -> MigrateOptions<'b> {
        MigrateOptions {
            batch: self.batch,
            dry_run: self.dry_run,
            legacy: self.legacy,
            progress: crate::shared::Callback::new(f),
        }
    }

    /// Rows per batch, each batch one transaction (default
    /// [`DEFAULT_BATCH`]; clamped to 1..=[`MAX_BATCH`]).
    #[must_use]
    pub fn batch(mut self, rows: usize) -> Self {
        self.batch = rows.clamp(1, MAX_BATCH);
        self
    }

    /// Only report what would be done: every row to migrate is read and
    /// checked, nothing is written and no data key is created.
    #[must_use]
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Values stored before phi in an encrypted format of their own (a
    /// Fernet token, a `v1:` text): [`backfill`] opens a flag-off value
    /// with `decoder` only when it was recorded as legacy in its own row,
    /// column and owner before phi's writers ran ([`record_legacy`], the
    /// generated migrations; see [`crate::legacy`]), and seals its
    /// plaintext; a recorded value it recognises but cannot open stops the
    /// job ([`Error::Legacy`], that batch rolled back), and a dry run
    /// counts them per format ([`MigrationReport::legacy`]). Any other
    /// value is the field's plain encoding; one that `decoder` recognises
    /// is reported ([`MigrationReport::legacy_as_text`]). Without a
    /// decoder here, the keyring's ([`KeyringBuilder::legacy`](crate::KeyringBuilder::legacy))
    /// is used; without either, flag-off values are the fields' plain
    /// encodings.
    #[must_use]
    pub fn legacy(mut self, decoder: Arc<dyn LegacyDecoder>) -> Self {
        self.legacy = Some(decoder);
        self
    }

    /// The legacy decoder, if any.
    pub fn legacy_decoder(&self) -> Option<&dyn LegacyDecoder> {
        self.legacy.as_deref()
    }

    /// The decoder a job uses: this one, else the keyring's.
    fn decoder<'k>(&'k self, keyring: &'k Keyring) -> Option<&'k dyn LegacyDecoder> {
        self.legacy
            .as_deref()
            .or_else(|| keyring.legacy_decoder().map(|d| d.as_ref()))
    }

    /// The batch size.
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// Whether this is a dry run.
    pub fn is_dry_run(&self) -> bool {
        self.dry_run
    }
}

/// How far a job is, passed to its progress callback after each batch.
#[non_exhaustive]
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// The table.
    pub table: &'static str,
    /// Rows done (migrated, or checked).
    pub done: u64,
    /// Rows to do when the job started (rows written meanwhile may add a
    /// few).
    pub total: u64,
    /// Time since the job started.
    pub elapsed: Duration,
}

impl Progress {
    /// Rows per second so far.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.done as f64 / secs
        } else {
            0.0
        }
    }

    /// Estimated time left at the rate so far.
    pub fn eta(&self) -> Option<Duration> {
        let rate = self.rate();
        (rate > 0.0)
            .then(|| Duration::from_secs_f64(self.total.saturating_sub(self.done) as f64 / rate))
    }
}

/// What kind of problem a [`VerifyFailure`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemKind {
    /// The blind index is missing, or is not the index of the value's
    /// canonical encoding (the one the application's lookups compute).
    BlindIndex,
    /// The value reads, but is not stored in its type's canonical encoding
    /// (a date stored as `1980-1-15` where the model writes `1980-01-15`).
    /// On an unsealed row this is a notice, not a failure: the backfill
    /// seals the canonical encoding. On a sealed row it is a failure (an
    /// earlier backfill sealed the bytes as they were): run
    /// [`decrypt_back`] and [`backfill`] again to re-encode it.
    NotCanonical,
    /// The value cannot be read: not an envelope (or an envelope where the
    /// flag is off), it does not open or does not decode, or its owner's
    /// keys cannot be loaded.
    Unreadable,
    /// During the dual-write phase (`#[phi(encrypt, shadow)]`): the shadow
    /// column of a sealed row does not hold the value of its plaintext
    /// column (changed by hand, one of them NULL, or a plaintext that does
    /// not decode), or the shadow column of an unsealed row is not NULL.
    /// The message names the table, column, row and owner, never a value.
    ShadowMismatch,
    /// A notice, not a failure: a flag-off value that looks like a legacy
    /// ciphertext (a [`LegacyDecoder`] recognises it) but was not recorded
    /// as one before phi's writers ran, or was recorded but is not well
    /// formed, or was recorded while no decoder was given. The backfill
    /// seals it as the text it is, never decoded (see [`crate::legacy`]):
    /// plain text that merely looks legacy (`v1:Follow:Up`) stays what it
    /// is, and a token copied into another owner's row never opens there.
    LegacyAsText,
}

/// A row a job could not migrate or verify: where, and why. Never holds a
/// value.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyFailure {
    /// The table.
    pub table: &'static str,
    /// The column (or blind index column).
    pub column: &'static str,
    /// The row's owner.
    pub owner: String,
    /// The row's key.
    pub row_key: String,
    /// What kind of problem it is.
    pub kind: ProblemKind,
    /// What is wrong.
    pub problem: String,
}

impl fmt::Display for VerifyFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{} of row {:?} (owner {:?}): {}",
            self.table, self.column, self.row_key, self.owner, self.problem
        )
    }
}

/// What [`backfill`] or [`decrypt_back`] did, or with a dry run would do.
#[non_exhaustive]
#[derive(Clone, Debug, Default)]
pub struct MigrationReport {
    /// The table.
    pub table: &'static str,
    /// Whether this was a dry run (nothing written).
    pub dry_run: bool,
    /// Whether rows were sealed ([`backfill`]) or unsealed
    /// ([`decrypt_back`]).
    pub sealing: bool,
    /// Rows migrated (with a dry run: rows that would be).
    pub rows: u64,
    /// Non-NULL values sealed or opened.
    pub values: u64,
    /// Transactions committed.
    pub batches: u64,
    /// Rows another job or writer migrated first: left alone.
    pub skipped: u64,
    /// Distinct owners of the rows migrated.
    pub owners: u64,
    /// Owners without an active data key before the job: the backfill
    /// creates one for each.
    pub new_owner_keys: u64,
    /// Rows whose values do not decode as their field's type (only a dry
    /// run counts them; a real run stops at the first).
    pub undecodable: u64,
    /// Values whose stored form was not their type's canonical encoding
    /// (a date stored as `1980-1-15`), written in canonical form
    /// (`1980-01-15`); with a dry run, values that would be.
    pub reencoded: u64,
    /// The first problems a dry run found (values not in canonical form
    /// among them: [`ProblemKind::NotCanonical`]), and the first values
    /// any run sealed as text though they look legacy
    /// ([`ProblemKind::LegacyAsText`]).
    pub problems: Vec<VerifyFailure>,
    /// With a [`MigrateOptions::legacy`] decoder: the recorded legacy
    /// values found in each format (see [`crate::legacy`]), and (a dry
    /// run) how many of them do not open.
    pub legacy: Vec<LegacyCount>,
    /// Values sealed as the text they are (with a dry run: that would be)
    /// though they look legacy: not recorded as legacy before phi's
    /// writers ran, recorded but not well formed, or recorded while no
    /// decoder was given ([`ProblemKind::LegacyAsText`], the first of them
    /// in [`problems`](Self::problems)). Never decoded.
    pub legacy_as_text: u64,
    /// Rows still to migrate when the job ended.
    pub remaining: u64,
    /// How long the job took.
    pub elapsed: Duration,
}

impl fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (verb, state) = if self.sealing {
            ("seal", "unsealed")
        } else {
            ("unseal", "sealed")
        };
        let secs = self.elapsed.as_secs_f64();
        if self.dry_run {
            write!(
                f,
                "{}: dry run: would {verb} {} row(s) of {} owner(s)",
                self.table, self.rows, self.owners
            )?;
            if self.sealing {
                write!(
                    f,
                    ", creating {} data key(s) for owners that have none",
                    self.new_owner_keys
                )?;
            }
            write!(f, "; {} row(s) do not decode", self.undecodable)?;
            if self.reencoded > 0 {
                write!(
                    f,
                    "; {} value(s) not in canonical form would be re-encoded",
                    self.reencoded
                )?;
            }
            for count in &self.legacy {
                write!(f, "; {count}")?;
            }
            if self.legacy_as_text > 0 {
                write!(
                    f,
                    "; {} value(s) look legacy but were not recorded as legacy: they would be sealed as text",
                    self.legacy_as_text
                )?;
            }
            write!(f, "; nothing was changed ({secs:.1} s).")?;
            for p in &self.problems {
                write!(f, "\n  {p}")?;
            }
            return Ok(());
        }
        if self.rows == 0 && self.skipped == 0 && self.remaining == 0 {
            return write!(f, "{}: no {state} row: nothing to {verb}.", self.table);
        }
        write!(
            f,
            "{}: {verb}ed {} row(s) ({} value(s)) of {} owner(s) in {} batch(es), {:.0} rows/s; {} skipped (done meanwhile by another writer); {} {state} row(s) remain ({secs:.1} s).",
            self.table,
            self.rows,
            self.values,
            self.owners,
            self.batches,
            if secs > 0.0 {
                self.rows as f64 / secs
            } else {
                0.0
            },
            self.skipped,
            self.remaining,
        )?;
        if self.sealing && self.new_owner_keys > 0 {
            write!(f, " Created {} data key(s).", self.new_owner_keys)?;
        }
        if self.reencoded > 0 {
            write!(
                f,
                " Re-encoded {} value(s) not in canonical form.",
                self.reencoded
            )?;
        }
        for count in &self.legacy {
            write!(f, " Opened {} {} value(s).", count.found, count.format)?;
        }
        if self.legacy_as_text > 0 {
            write!(
                f,
                " Sealed {} value(s) that look legacy as the text they are (not recorded as legacy: not decoded).",
                self.legacy_as_text
            )?;
            for p in &self.problems {
                write!(f, "\n  {p}")?;
            }
        }
        Ok(())
    }
}

/// What [`verify`] found.
#[non_exhaustive]
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    /// The table.
    pub table: &'static str,
    /// Sealed rows checked.
    pub sealed: u64,
    /// Unsealed rows (flag off) checked.
    pub unsealed: u64,
    /// Sealed rows in the table.
    pub sealed_total: u64,
    /// Unsealed rows in the table.
    pub unsealed_total: u64,
    /// Rows with at least one problem, a value not in canonical form on
    /// an unsealed row excepted (the backfill re-encodes it), and one that
    /// looks legacy but is sealed as text ([`ProblemKind::LegacyAsText`]).
    pub failed: u64,
    /// Rows with at least one value not stored in its type's canonical
    /// encoding ([`ProblemKind::NotCanonical`]), sealed or not.
    pub not_canonical: u64,
    /// Problems found, one per value or blind index.
    pub problems_found: u64,
    /// The first problems found, of every kind.
    pub failures: Vec<VerifyFailure>,
    /// With a legacy decoder ([`VerifyOptions::legacy`]): the recorded unsealed
    /// values found in each legacy format, and how many of them do not
    /// open.
    pub legacy: Vec<LegacyCount>,
    /// Unsealed values the backfill would seal as text though they look
    /// legacy ([`ProblemKind::LegacyAsText`], a notice).
    pub legacy_as_text: u64,
    /// How long the check took.
    pub elapsed: Duration,
}

impl VerifyReport {
    /// Whether every row checked passed.
    pub fn is_ok(&self) -> bool {
        self.failed == 0
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: checked {} of {} sealed row(s) and {} of {} unsealed row(s): ",
            self.table, self.sealed, self.sealed_total, self.unsealed, self.unsealed_total
        )?;
        if self.is_ok() {
            write!(f, "all pass")?;
        } else {
            write!(f, "{} row(s) FAIL", self.failed)?;
        }
        if self.not_canonical > 0 {
            write!(
                f,
                "; {} row(s) hold values not in canonical form",
                self.not_canonical
            )?;
        }
        for count in &self.legacy {
            write!(f, "; {count}")?;
        }
        if self.legacy_as_text > 0 {
            write!(
                f,
                "; {} unsealed value(s) look legacy but were not recorded as legacy (sealed as text by the backfill)",
                self.legacy_as_text
            )?;
        }
        write!(f, " ({:.1} s).", self.elapsed.as_secs_f64())?;
        for failure in &self.failures {
            write!(f, "\n  {failure}")?;
        }
        let listed = self.failures.len() as u64;
        if listed > 0 && self.problems_found > listed {
            write!(
                f,
                "\n  … and {} more problem(s)",
                self.problems_found - listed
            )?;
        }
        Ok(())
    }
}

/// Seals every row of `M`'s table whose encrypted flag is off, in batches
/// of [`MigrateOptions::batch`] rows, each one transaction; with
/// [`MigrateOptions::dry_run`], reads and checks them and writes nothing.
/// Owners without a data key get one. The options' progress callback
/// ([`MigrateOptions::progress`]) is called after each batch.
///
/// Safe to run again after a crash (it goes on where the last committed
/// batch ended) and alongside another run or the application (a row is
/// written only while its flag is still off). The keyring's [`Rollout`]
/// does not limit it: it seals every owner's rows.
///
/// [`Rollout`]: crate::Rollout
///
/// # Errors
/// [`Error::DataTable`] naming the table, column, owner and row key when a
/// plain value does not decode as its field's type (nothing of that batch
/// is written); key resolution errors (a shredded owner, the KEK, the key
/// store); [`Error::Database`]. Batches committed before the error stay
/// committed.
pub fn backfill<M: Migratable, C: DataConnection>(
    conn: &mut C,
    keyring: &Keyring,
    options: &MigrateOptions<'_>,
) -> Result<MigrationReport> {
    backfill_table(&M::stored_table(), conn, keyring, options)
}

/// The emergency rollback: turns every sealed row of `M`'s table back into
/// its plain encoding with the flag off (blind indexes cleared), batch by
/// batch like [`backfill`], equally resumable and guarded. Set the
/// keyring's roll-out to [`Rollout::Nobody`](crate::Rollout::Nobody) in
/// every process first, or new writes keep being sealed.
///
/// # Errors
/// As [`backfill`]; a value that does not open ([`Error::Decrypt`] and
/// friends, naming the column and owner) stops the job with its batch
/// rolled back.
pub fn decrypt_back<M: Migratable, C: DataConnection>(
    conn: &mut C,
    keyring: &Keyring,
    options: &MigrateOptions<'_>,
) -> Result<MigrationReport> {
    decrypt_back_table(&M::stored_table(), conn, keyring, options)
}

/// [`backfill`] (`sealing`) or [`decrypt_back`] with `between` called in
/// each batch's transaction, on its connection, after the batch's rows are
/// read and locked and before they are written: a fixed interleaving in
/// which another writer changes rows the batch has read, for tests of the
/// write's guard. Not for applications.
#[doc(hidden)]
pub fn migrate_interleaved<M: Migratable, C: DataConnection>(
    conn: &mut C,
    keyring: &Keyring,
    options: &MigrateOptions<'_>,
    sealing: bool,
    between: &mut dyn FnMut(&mut C) -> Result<()>,
) -> Result<MigrationReport> {
    migrate::<C>(
        &M::stored_table(),
        conn,
        keyring,
        options,
        sealing,
        &mut |p| options.progress.call(p),
        between,
    )
}

/// Settings of [`verify`]: a sample size, a legacy decoder and a progress
/// callback.
///
/// ```
/// use phi_types::migrate::VerifyOptions;
///
/// let options = VerifyOptions::default()
///     .sample(1_000)
///     .progress(|p| eprintln!("{}: {} of {}", p.table, p.done, p.total));
/// // let report = phi_types::migrate::verify::<Case, _>(&mut conn, &keyring, &options)?;
/// # drop(options);
/// ```
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions<'a> {
    sample: Option<usize>,
    legacy: Option<Arc<dyn LegacyDecoder>>,
    progress: crate::shared::Callback<'a, Progress>,
}

impl VerifyOptions<'_> {
    /// Checks at most `rows` sealed and `rows` unsealed rows, chosen at
    /// random (default: every row).
    #[must_use]
    pub fn sample(mut self, rows: usize) -> Self {
        self.sample = Some(rows);
        self
    }

    /// [`sample`](Self::sample) when `Some`, every row when `None`.
    #[must_use]
    pub fn sample_opt(mut self, rows: Option<usize>) -> Self {
        self.sample = rows;
        self
    }

    /// Opens the recorded legacy values of unsealed rows with `decoder`, as
    /// the backfill opens them (see [`MigrateOptions::legacy`]): such a
    /// value that does not open, or whose plaintext does not decode as its
    /// field's type, is a failure ([`ProblemKind::Unreadable`]); the values
    /// found in each format are counted in [`VerifyReport::legacy`]. A
    /// value that looks legacy but the backfill would seal as text is a
    /// notice ([`ProblemKind::LegacyAsText`],
    /// [`VerifyReport::legacy_as_text`]). Default: none.
    #[must_use]
    pub fn legacy(mut self, decoder: Arc<dyn LegacyDecoder>) -> Self {
        self.legacy = Some(decoder);
        self
    }

    /// Calls `f` after each batch with how far the check is (default: no
    /// callback).
    #[must_use]
    pub fn progress<'b>(self, f: impl FnMut(&Progress) + 'b) -> VerifyOptions<'b> {
        VerifyOptions {
            sample: self.sample,
            legacy: self.legacy,
            progress: crate::shared::Callback::new(f),
        }
    }

    /// The sample size, if any.
    pub fn sample_size(&self) -> Option<usize> {
        self.sample
    }
}

/// Checks `M`'s table: every value of a sealed row is an envelope that
/// opens for its owner, column and row, and decodes as its field's type,
/// and its blind index matches; every value of an unsealed row decodes.
/// With [`VerifyOptions::sample`], at most that many sealed and that many
/// unsealed rows, chosen at random; else every row. With
/// [`VerifyOptions::legacy`], recorded legacy values are opened too.
///
/// Reads only; rows written while it runs may be missed or reported.
///
/// # Errors
/// [`Error::Database`] when the table cannot be read. Rows that fail are
/// reported in the [`VerifyReport`], not as errors.
pub fn verify<M: Migratable, C: DataConnection>(
    conn: &mut C,
    keyring: &Keyring,
    options: &VerifyOptions<'_>,
) -> Result<VerifyReport> {
    verify_table(&M::stored_table(), conn, keyring, options)
}

/// [`backfill`] of the table `t` describes ([`Migratable::stored_table`]),
/// for code that holds models' descriptions rather than their types (the
/// command line's registered models).
///
/// # Errors
/// As [`backfill`].
pub fn backfill_table<C: DataConnection>(
    t: &StoredTable,
    conn: &mut C,
    keyring: &Keyring,
    options: &MigrateOptions<'_>,
) -> Result<MigrationReport> {
    let progress = &mut |p: &Progress| options.progress.call(p);
    migrate::<C>(t, conn, keyring, options, true, progress, &mut |_| Ok(()))
}

/// [`decrypt_back`] of the table `t` describes.
///
/// # Errors
/// As [`decrypt_back`].
pub fn decrypt_back_table<C: DataConnection>(
    t: &StoredTable,
    conn: &mut C,
    keyring: &Keyring,
    options: &MigrateOptions<'_>,
) -> Result<MigrationReport> {
    let progress = &mut |p: &Progress| options.progress.call(p);
    migrate::<C>(t, conn, keyring, options, false, progress, &mut |_| Ok(()))
}

/// What [`record_legacy`] recorded.
#[non_exhaustive]
#[derive(Clone, Debug, Default)]
pub struct RecordReport {
    /// The table.
    pub table: &'static str,
    /// Rows with the flag off that were read.
    pub rows: u64,
    /// Values the decoder recognised.
    pub recognised: u64,
    /// Of those, values recorded now (the others were recorded already,
    /// by the generated migration or an earlier run).
    pub recorded: u64,
    /// How long it took.
    pub elapsed: Duration,
}

impl fmt::Display for RecordReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: read {} row(s) with the flag off; {} value(s) look legacy, {} recorded now ({} were already) ({:.1} s).",
            self.table,
            self.rows,
            self.recognised,
            self.recorded,
            self.recognised - self.recorded,
            self.elapsed.as_secs_f64()
        )
    }
}

/// Records, in `phi_legacy_values`, every flag-off value of `M`'s table
/// that `decoder` [recognises](LegacyDecoder::recognises), with its
/// column, row key and owner: the values [`backfill`] may then decode,
/// and the only ones (see [`crate::legacy`]). The generated `in_place`
/// and `shadow` migrations record the shipped formats themselves; run this
/// for an application that adopts phi without them, or whose decoder
/// reads a format of its own.
///
/// **Run it before any of phi's writers is deployed, and not again after
/// they have written**: a value an application writes once phi runs is
/// stored as it was given, and recording it would let a copied token
/// decode. It refuses a table that holds a sealed row (a sign phi has
/// written it); it cannot see a flag-off write of phi's. A value already
/// recorded for its (column, row key) keeps its record.
///
/// # Errors
/// [`Error::Refused`] when a row of the table is sealed;
/// [`Error::Config`] when `phi_legacy_values` does not exist in this
/// database (run phi's migrations on it,
/// [`migrations::run_pending`](crate::migrations::run_pending));
/// [`Error::Database`].
pub fn record_legacy<M: Migratable, C: DataConnection>(
    conn: &mut C,
    decoder: &dyn LegacyDecoder,
) -> Result<RecordReport> {
    record_legacy_table(&M::stored_table(), conn, decoder)
}

/// [`record_legacy`] of the table `t` describes.
///
/// # Errors
/// As [`record_legacy`].
pub fn record_legacy_table<C: DataConnection>(
    t: &StoredTable,
    conn: &mut C,
    decoder: &dyn LegacyDecoder,
) -> Result<RecordReport> {
    t.validate()?;
    prepare_connection(conn, t)?;
    let started = Instant::now();
    let sealed = conn.migration_count(t, true)?;
    if sealed > 0 {
        return Err(Error::Refused {
            operation: format!("recording the legacy values of {}", t.table),
            owner: "*".into(),
            reason: format!(
                "{sealed} row(s) are sealed already, so phi's writers have run: values written since are stored \
                 as they were given, and recording them would let a copied legacy token decode"
            ),
        });
    }
    if conn.count_legacy_records(t.table)?.is_none() {
        return Err(Error::Config(format!(
            "{}: the table phi_legacy_values does not exist in this database: run phi's migrations on it \
             (phi_types::migrations::run_pending) or the generated adoption migration",
            t.table
        )));
    }
    let mut report = RecordReport {
        table: t.table,
        ..RecordReport::default()
    };
    let mut after: Option<SqlValue> = None;
    loop {
        let query = RowsQuery {
            sealed: false,
            after: after.as_ref(),
            limit: DEFAULT_BATCH,
            random: false,
        };
        let rows = conn.migration_rows(t, &query, true)?;
        if rows.is_empty() {
            break;
        }
        let mut records = Vec::new();
        for row in &rows {
            for (c, value) in t.columns.iter().zip(&row.values) {
                if let Some(stored) = value
                    && decoder.recognises(stored)
                {
                    records.push(LegacyRecord {
                        column: c.column.to_owned(),
                        row_key: row.key_text(),
                        owner: row.owner.clone(),
                        stored: stored.clone(),
                    });
                }
            }
        }
        report.rows += rows.len() as u64;
        report.recognised += records.len() as u64;
        report.recorded += conn.insert_legacy_records(t.table, &records)?;
        after = rows.last().map(|r| r.key.clone());
    }
    report.elapsed = started.elapsed();
    tracing::info!(
        table = t.table,
        recognised = report.recognised,
        recorded = report.recorded,
        "phi legacy values recorded"
    );
    Ok(report)
}

/// Rows of the table `t` describes whose encrypted flag is on (`sealed`)
/// or off.
///
/// # Errors
/// [`Error::Config`] for a description the jobs cannot use;
/// [`Error::Database`].
pub fn count_rows<C: DataConnection>(t: &StoredTable, conn: &mut C, sealed: bool) -> Result<u64> {
    t.validate()?;
    conn.migration_count(t, sealed)
}

/// [`verify`] of the table `t` describes.
///
/// # Errors
/// As [`verify`].
pub fn verify_table<C: DataConnection>(
    t: &StoredTable,
    conn: &mut C,
    keyring: &Keyring,
    options: &VerifyOptions<'_>,
) -> Result<VerifyReport> {
    let sample = options.sample;
    let legacy = options.legacy.as_deref();
    let progress = &mut |p: &Progress| options.progress.call(p);
    let mut tally = Tally::default();
    t.validate()?;
    prepare_connection(conn, t)?;
    let started = Instant::now();
    let has_records = conn.count_legacy_records(t.table)?.is_some_and(|n| n > 0);
    let mut report = VerifyReport {
        table: t.table,
        sealed_total: conn.migration_count(t, true)?,
        unsealed_total: conn.migration_count(t, false)?,
        ..VerifyReport::default()
    };
    let total = match sample {
        Some(n) => report.sealed_total.min(n as u64) + report.unsealed_total.min(n as u64),
        None => report.sealed_total + report.unsealed_total,
    };
    let _span = tracing::info_span!("phi.verify", table = t.table).entered();
    for sealed in [true, false] {
        let mut after: Option<SqlValue> = None;
        let mut left = sample.map(|n| n as u64);
        loop {
            let limit = match left {
                Some(0) => break,
                Some(n) => usize::try_from(n).unwrap_or(MAX_BATCH).min(MAX_BATCH),
                None => DEFAULT_BATCH.max(1000),
            };
            let query = RowsQuery {
                sealed,
                after: after.as_ref(),
                limit,
                random: sample.is_some(),
            };
            let rows = conn.migration_rows(t, &query, true)?;
            if rows.is_empty() {
                break;
            }
            let keys = if sealed {
                keys_for_check(keyring, &rows)
            } else {
                HashMap::new()
            };
            let records = Records::load(conn, t, &rows, !sealed && has_records)?;
            for row in &rows {
                let problems = if sealed {
                    check_sealed(t, row, &keys)
                } else {
                    check_unsealed(t, row, legacy, &records, &mut tally)
                };
                if problems.iter().any(|p| p.kind == ProblemKind::NotCanonical) {
                    report.not_canonical += 1;
                }
                report.legacy_as_text += problems
                    .iter()
                    .filter(|p| p.kind == ProblemKind::LegacyAsText)
                    .count() as u64;
                // An unsealed value not in canonical form, or sealed as
                // text though it looks legacy, is a notice: the backfill
                // re-encodes it, or seals it as it is.
                if problems.iter().any(|p| {
                    sealed
                        || !matches!(
                            p.kind,
                            ProblemKind::NotCanonical | ProblemKind::LegacyAsText
                        )
                }) {
                    report.failed += 1;
                }
                report.problems_found += problems.len() as u64;
                for problem in problems {
                    if report.failures.len() < MAX_PROBLEMS {
                        report.failures.push(problem);
                    }
                }
            }
            keyring.record_job(
                t.table,
                &t.columns.iter().map(|c| c.column).collect::<Vec<_>>(),
                rows.iter().map(|r| (r.owner.as_str(), Some(r.key_text()))),
            )?;
            let n = rows.len() as u64;
            if sealed {
                report.sealed += n;
            } else {
                report.unsealed += n;
            }
            progress(&Progress {
                table: t.table,
                done: report.sealed + report.unsealed,
                total,
                elapsed: started.elapsed(),
            });
            match &mut left {
                Some(left) => *left = left.saturating_sub(n),
                None => after = rows.last().map(|r| r.key.clone()),
            }
            if sample.is_some() {
                break;
            }
        }
    }
    report.legacy = tally.counts();
    report.elapsed = started.elapsed();
    tracing::info!(
        table = t.table,
        sealed = report.sealed,
        unsealed = report.unsealed,
        failed = report.failed,
        "phi verify done"
    );
    Ok(report)
}

/// The owners' keys for checking sealed rows; an owner whose keys cannot
/// be resolved is absent (its rows are reported).
fn keys_for_check(keyring: &Keyring, rows: &[MigrationRow]) -> HashMap<String, Arc<OwnerKeys>> {
    let owners: BTreeSet<&str> = rows.iter().map(|r| r.owner.as_str()).collect();
    match keyring.keys_for_open_many(owners.iter().copied()) {
        Ok(keys) => keys,
        Err(_) => owners
            .into_iter()
            .filter_map(|o| keyring.keys_for_open(o).ok().map(|k| (o.to_owned(), k)))
            .collect(),
    }
}

fn failure(
    t: &StoredTable,
    column: &'static str,
    row: &MigrationRow,
    kind: ProblemKind,
    problem: impl fmt::Display,
) -> VerifyFailure {
    VerifyFailure {
        table: t.table,
        column,
        owner: row.owner.clone(),
        row_key: row.key_text(),
        kind,
        problem: problem.to_string(),
    }
}

fn check_sealed(
    t: &StoredTable,
    row: &MigrationRow,
    keys: &HashMap<String, Arc<OwnerKeys>>,
) -> Vec<VerifyFailure> {
    use ProblemKind::{BlindIndex, NotCanonical, ShadowMismatch, Unreadable};
    let mut out = Vec::new();
    let Some(keys) = keys.get(&row.owner) else {
        out.push(failure(
            t,
            t.owner_column,
            row,
            Unreadable,
            "the owner's data keys cannot be loaded",
        ));
        return out;
    };
    // Each column's canonical encoding, for the compound indexes.
    let mut canonicals: Vec<Option<Zeroizing<Vec<u8>>>> = vec![None; t.columns.len()];
    for (i, c) in t.columns.iter().enumerate() {
        let value = row
            .values
            .get(t.sealed_position(i))
            .and_then(Option::as_ref);
        if c.shadow.is_some() {
            let plain = row.values.get(i).and_then(Option::as_ref);
            if value.is_none() != plain.is_none() {
                out.push(failure(
                    t,
                    c.sealed_column(),
                    row,
                    ShadowMismatch,
                    if value.is_none() {
                        "the flag is on but the shadow column is NULL while the plaintext column is not"
                    } else {
                        "the flag is on but the plaintext column is NULL while the shadow column is not"
                    },
                ));
                continue;
            }
        }
        let Some(bytes) = value else {
            continue;
        };
        let sealed = Encrypted::<Vec<u8>>::from_bytes(bytes.clone());
        if let Err(e) = sealed.header() {
            out.push(failure(
                t,
                c.sealed_column(),
                row,
                Unreadable,
                format_args!("the flag is on but the value is not an envelope: {e}"),
            ));
            continue;
        }
        let plain = match keys.open(sealed, c.scope, &row.row) {
            Ok(plain) => Zeroizing::new(plain),
            Err(e) => {
                out.push(failure(t, c.sealed_column(), row, Unreadable, e));
                continue;
            }
        };
        let canonical = match (c.canonical)(plain.to_vec()) {
            Ok(canonical) => canonical,
            Err(e) => {
                out.push(failure(
                    t,
                    c.sealed_column(),
                    row,
                    Unreadable,
                    format_args!("opens, but does not decode: {e}"),
                ));
                continue;
            }
        };
        if let Some(Some(text)) = c.shadow.and(row.values.get(i)) {
            // The plaintext column, kept during the dual-write phase, must
            // hold what the shadow column seals.
            match (c.canonical)(text.clone()) {
                Ok(plain_canonical) if *plain_canonical == *canonical => {}
                Ok(_) => out.push(failure(
                    t,
                    c.column,
                    row,
                    ShadowMismatch,
                    format_args!(
                        "the plaintext column differs from the value sealed in {}",
                        c.sealed_column()
                    ),
                )),
                Err(e) => out.push(failure(
                    t,
                    c.column,
                    row,
                    ShadowMismatch,
                    format_args!("the plaintext column does not decode: {e}"),
                )),
            }
        }
        if *canonical != *plain {
            out.push(failure(
                t,
                c.sealed_column(),
                row,
                NotCanonical,
                "opens, but the sealed value is not in its type's canonical encoding (decrypt-back and backfill again re-encode it)",
            ));
        }
        for (index, kind) in c.indexes() {
            // From the decoded value, as the application's lookups compute it.
            let expected = kind.any_version(keys, c.scope, &canonical);
            let stored = row_index(t, row, index);
            if !stored.is_some_and(|s| expected.iter().any(|e| e == s)) {
                out.push(failure(
                    t,
                    index,
                    row,
                    BlindIndex,
                    format_args!("the {} is missing or does not match the value", kind.kind()),
                ));
            }
        }
        canonicals[i] = Some(canonical);
    }
    for c in &t.compounds {
        // Every part opened: the tag is the one of their values under one
        // of the owner's versions; a NULL part: no tag.
        let parts = c.parts_of(&canonicals);
        let stored = row_index(t, row, c.column);
        let fine = match &parts {
            Some(parts) => stored.is_some_and(|s| {
                keys.versions().any(|v| {
                    keys.compound_index_encoded(Some(v), c.scope, parts, &c.index)
                        .ok()
                        .flatten()
                        .is_some_and(|e| e == *s)
                })
            }),
            None => {
                // A part that did not open is reported above; a NULL part
                // stores no tag.
                let unread = c.parts.iter().any(|&p| {
                    canonicals[p].is_none()
                        && row
                            .values
                            .get(t.sealed_position(p))
                            .is_some_and(Option::is_some)
                });
                unread || stored.is_none()
            }
        };
        if !fine {
            out.push(failure(
                t,
                c.column,
                row,
                BlindIndex,
                "the compound index is missing or does not match the values",
            ));
        }
    }
    out
}

/// An index column's stored value, read after the encrypted columns.
fn row_index<'r>(t: &StoredTable, row: &'r MigrationRow, index: &str) -> Option<&'r Vec<u8>> {
    let position = t.all_index_columns().position(|i| i == index)?;
    row.values.get(t.columns.len() + position)?.as_ref()
}

fn check_unsealed(
    t: &StoredTable,
    row: &MigrationRow,
    legacy: Option<&dyn LegacyDecoder>,
    records: &Records,
    tally: &mut Tally,
) -> Vec<VerifyFailure> {
    let mut out = Vec::new();
    for (i, c) in t.columns.iter().enumerate() {
        if c.shadow.is_some()
            && row
                .values
                .get(t.sealed_position(i))
                .is_some_and(Option::is_some)
        {
            out.push(failure(
                t,
                c.sealed_column(),
                row,
                ProblemKind::ShadowMismatch,
                "the flag is off but the shadow column is not NULL",
            ));
        }
    }
    for (c, value) in t.columns.iter().zip(&row.values) {
        let Some(bytes) = value else {
            continue;
        };
        match classify(t, c.column, row, bytes, legacy, records) {
            Ok(Stored::Plain) => {}
            Ok(Stored::AsText(why)) => {
                out.push(failure(t, c.column, row, ProblemKind::LegacyAsText, why));
            }
            Ok(Stored::Opened(opened)) => {
                tally.opened(opened.format);
                if let Err(e) = (c.canonical)(opened.plaintext.to_vec()) {
                    out.push(failure(
                        t,
                        c.column,
                        row,
                        ProblemKind::Unreadable,
                        format_args!(
                            "the flag is off and the {} value opens, but does not decode: {e}",
                            opened.format
                        ),
                    ));
                }
                continue;
            }
            Err(e) => {
                let Error::Legacy { source, .. } = &e else {
                    continue;
                };
                tally.failed(source.format);
                out.push(failure(
                    t,
                    c.column,
                    row,
                    ProblemKind::Unreadable,
                    format_args!("the flag is off and the value does not open: {source}"),
                ));
                continue;
            }
        }
        match (c.canonical)(bytes.clone()) {
            Err(e) => out.push(failure(
                t,
                c.column,
                row,
                ProblemKind::Unreadable,
                format_args!("the flag is off and the value does not decode: {e}"),
            )),
            Ok(canonical) if *canonical != *bytes => out.push(failure(
                t,
                c.column,
                row,
                ProblemKind::NotCanonical,
                "the flag is off and the value decodes, but is not in its type's canonical encoding (the backfill seals the canonical one)",
            )),
            Ok(_) => {}
        }
    }
    out
}

/// The owners of the next batch (after the key `after`), read without
/// locks.
fn next_owners(
    conn: &mut impl DataConnection,
    t: &StoredTable,
    sealed: bool,
    batch: usize,
    after: Option<&SqlValue>,
) -> Result<BTreeSet<String>> {
    let query = RowsQuery {
        sealed,
        after,
        limit: batch,
        random: false,
    };
    Ok(conn
        .migration_rows(t, &query, false)?
        .iter()
        .map(|r| r.owner.clone())
        .collect())
}

/// Owners among `owners` without an active data key (read from the key
/// store, nothing unwrapped).
fn owners_without_key(keyring: &Keyring, owners: &BTreeSet<String>) -> Result<u64> {
    let list: Vec<&str> = owners.iter().map(String::as_str).collect();
    let mut with_key = BTreeSet::new();
    for chunk in list.chunks(500) {
        for key in keyring.store().load_keys(chunk)? {
            if key.state == KeyState::Active {
                with_key.insert(key.owner_id);
            }
        }
    }
    Ok(owners.iter().filter(|o| !with_key.contains(*o)).count() as u64)
}

/// What the jobs set on the application's connection first (SQLite: a busy
/// timeout when it has none; see [`crate::sqlite`]).
fn prepare_connection<C: DataConnection>(conn: &mut C, t: &StoredTable) -> Result<()> {
    crate::connection::prepare_application_connection(conn).map_err(|source| Error::Database {
        operation: "giving the application's SQLite connection a busy timeout",
        table: t.table,
        source,
    })
}

/// Batches in a row that read rows but wrote none, after which a job gives
/// up (rows whose owner keeps changing between the owners' read and the
/// batch).
const MAX_IDLE_BATCHES: u32 = 100;

fn migrate<C: DataConnection>(
    t: &StoredTable,
    conn: &mut C,
    keyring: &Keyring,
    options: &MigrateOptions,
    sealing: bool,
    progress: &mut dyn FnMut(&Progress),
    before_write: &mut dyn FnMut(&mut C) -> Result<()>,
) -> Result<MigrationReport> {
    t.validate()?;
    prepare_connection(conn, t)?;
    let started = Instant::now();
    // Rows to migrate have the flag `from`.
    let from = !sealing;
    let total = conn.migration_count(t, from)?;
    let mut report = MigrationReport {
        table: t.table,
        dry_run: options.dry_run,
        sealing,
        ..MigrationReport::default()
    };
    let _span = tracing::info_span!(
        "phi.migrate",
        table = t.table,
        sealing,
        dry_run = options.dry_run
    )
    .entered();
    if options.dry_run {
        dry_run(
            t,
            conn,
            keyring,
            options,
            sealing,
            total,
            &mut report,
            started,
            progress,
        )?;
        report.remaining = total;
        report.elapsed = started.elapsed();
        return Ok(report);
    }

    let mut owners_seen: BTreeSet<String> = BTreeSet::new();
    let mut idle = 0;
    let mut tally = Tally::default();
    let legacy = options.decoder(keyring);
    let strict = !sealing && keyring.is_strict(t.table);
    // Read once, outside any transaction: whether the records table exists
    // and holds records of this table (recorded before any phi writer ran,
    // so none appear while the job runs).
    let has_records = sealing && conn.count_legacy_records(t.table)?.is_some_and(|n| n > 0);
    // Each batch starts after the last row the previous one read, so a
    // batch reads its rows by key range instead of skipping every row
    // migrated so far. Rows left behind the cursor (deferred, or made
    // unsealed meanwhile) are found by the next pass from the first key:
    // the job ends when a pass from the first key finds nothing.
    let mut after: Option<SqlValue> = None;
    loop {
        let owners = next_owners(conn, t, from, options.batch, after.as_ref())?;
        if owners.is_empty() {
            if after.take().is_some() {
                continue;
            }
            break;
        }
        let new_owners: BTreeSet<String> = owners.difference(&owners_seen).cloned().collect();
        if sealing && !new_owners.is_empty() {
            report.new_owner_keys += owners_without_key(keyring, &new_owners)?;
        }
        // Outside the transaction: creating or unwrapping keys writes to
        // the key store, which may share the database.
        let keys = if sealing {
            keyring.keys_for_seal_many(owners.iter().map(String::as_str))?
        } else {
            keyring.keys_for_open_many(owners.iter().map(String::as_str))?
        };
        let mut values = 0u64;
        let mut reencoded = 0u64;
        let mut batch_tally = Tally::default();
        let mut notices: Vec<VerifyFailure> = Vec::new();
        // The batch's records, read in its transaction once its rows are
        // locked; the keys of the rows it writes, whose records it deletes
        // in the same transaction.
        let records = std::cell::RefCell::new(Records::default());
        let written = std::cell::RefCell::new(Vec::<String>::new());
        // The rows opened or sealed, for the access log.
        let touched = std::cell::RefCell::new(Vec::<(String, String)>::new());
        let mut prepare = |conn: &mut C, rows: &[MigrationRow]| -> Result<()> {
            *records.borrow_mut() = Records::load(conn, t, rows, has_records)?;
            Ok(())
        };
        let mut write_records = |conn: &mut C| -> Result<()> {
            let keys = written.borrow();
            if has_records && !keys.is_empty() {
                conn.delete_legacy_records(t.table, &keys)?;
            }
            before_write(conn)
        };
        let mut transform = |row: &MigrationRow| -> Result<Option<RowWrite>> {
            let Some(keys) = keys.get(&row.owner) else {
                return Ok(None);
            };
            if strict {
                return Err(Error::Strict {
                    operation: "unsealing",
                    table: t.table.to_owned(),
                    column: t.flag_column.to_owned(),
                    row: row.key_text(),
                    owner: row.owner.clone(),
                });
            }
            let (write, n) = if sealing {
                seal_row(
                    t,
                    row,
                    keys,
                    legacy,
                    &records.borrow(),
                    &mut batch_tally,
                    &mut notices,
                )?
            } else {
                unseal_row(t, row, keys)?
            };
            written.borrow_mut().push(row.key_text());
            touched
                .borrow_mut()
                .push((row.owner.clone(), row.key_text()));
            values += write.values.iter().flatten().count() as u64;
            reencoded += n;
            Ok(Some(write))
        };
        let outcome = conn.migration_batch(
            t,
            from,
            options.batch,
            after.as_ref(),
            &mut prepare,
            &mut transform,
            &mut write_records,
        )?;
        if outcome.last.is_some() {
            after.clone_from(&outcome.last);
        }
        keyring.record_job(
            t.table,
            &t.columns.iter().map(|c| c.column).collect::<Vec<_>>(),
            touched
                .borrow()
                .iter()
                .map(|(owner, key)| (owner.as_str(), Some(key.clone()))),
        )?;
        tally.merge(batch_tally);
        report.legacy_as_text += notices.len() as u64;
        for notice in notices {
            if report.problems.len() < MAX_PROBLEMS {
                report.problems.push(notice);
            }
        }
        report.rows += outcome.updated;
        report.values += values;
        report.reencoded += reencoded;
        report.skipped += outcome.conflicts;
        report.batches += 1;
        owners_seen.extend(new_owners);
        tracing::debug!(
            table = t.table,
            read = outcome.read,
            updated = outcome.updated,
            conflicts = outcome.conflicts,
            deferred = outcome.deferred,
            "phi migration batch"
        );
        progress(&Progress {
            table: t.table,
            done: report.rows,
            total,
            elapsed: started.elapsed(),
        });
        // A batch that read rows but wrote none (their owners changed
        // meanwhile) is idle; one that found its rows taken by another run
        // is not: that run made the progress.
        if outcome.updated == 0 && outcome.read > 0 {
            idle += 1;
            if idle >= MAX_IDLE_BATCHES {
                return Err(Error::Config(format!(
                    "{}: {MAX_IDLE_BATCHES} batches in a row migrated nothing (rows keep changing owner or flag while the job runs); {} row(s) migrated so far, run it again",
                    t.table, report.rows
                )));
            }
        } else {
            idle = 0;
        }
    }
    report.owners = owners_seen.len() as u64;
    report.legacy = tally.counts();
    report.remaining = conn.migration_count(t, from)?;
    report.elapsed = started.elapsed();
    tracing::info!(
        table = t.table,
        rows = report.rows,
        skipped = report.skipped,
        remaining = report.remaining,
        "phi migration done"
    );
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn dry_run<C: DataConnection>(
    t: &StoredTable,
    conn: &mut C,
    keyring: &Keyring,
    options: &MigrateOptions,
    sealing: bool,
    total: u64,
    report: &mut MigrationReport,
    started: Instant,
    progress: &mut dyn FnMut(&Progress),
) -> Result<()> {
    let from = !sealing;
    let mut owners: BTreeSet<String> = BTreeSet::new();
    let mut after: Option<SqlValue> = None;
    let mut tally = Tally::default();
    let has_records = sealing && conn.count_legacy_records(t.table)?.is_some_and(|n| n > 0);
    loop {
        let query = RowsQuery {
            sealed: from,
            after: after.as_ref(),
            limit: options.batch,
            random: false,
        };
        let rows = conn.migration_rows(t, &query, true)?;
        if rows.is_empty() {
            break;
        }
        let keys = if sealing {
            HashMap::new()
        } else {
            keys_for_check(keyring, &rows)
        };
        let records = Records::load(conn, t, &rows, sealing && has_records)?;
        for row in &rows {
            owners.insert(row.owner.clone());
            let problems = if sealing {
                check_unsealed(t, row, options.decoder(keyring), &records, &mut tally)
            } else {
                check_sealed(t, row, &keys)
            };
            report.legacy_as_text += problems
                .iter()
                .filter(|p| p.kind == ProblemKind::LegacyAsText)
                .count() as u64;
            // Only an unreadable value stops the real run: a value not in
            // canonical form is re-encoded, a stale blind index replaced
            // (sealing) or cleared (unsealing).
            if problems.iter().any(|p| p.kind == ProblemKind::Unreadable) {
                report.undecodable += 1;
            } else {
                report.rows += 1;
                report.values += (0..t.columns.len())
                    .filter(|&i| {
                        let at = if sealing { i } else { t.sealed_position(i) };
                        row.values.get(at).is_some_and(Option::is_some)
                    })
                    .count() as u64;
                report.reencoded += problems
                    .iter()
                    .filter(|p| p.kind == ProblemKind::NotCanonical)
                    .count() as u64;
            }
            for p in problems {
                if report.problems.len() < MAX_PROBLEMS {
                    report.problems.push(p);
                }
            }
        }
        after = rows.last().map(|r| r.key.clone());
        progress(&Progress {
            table: t.table,
            done: report.rows + report.undecodable,
            total,
            elapsed: started.elapsed(),
        });
    }
    report.owners = owners.len() as u64;
    report.legacy = tally.counts();
    if sealing {
        report.new_owner_keys = owners_without_key(keyring, &owners)?;
    }
    Ok(())
}

fn decode_error(
    t: &StoredTable,
    column: &'static str,
    row: &MigrationRow,
    what: &str,
    e: DecodeError,
) -> Error {
    Error::DataTable {
        operation: "migrating a row",
        table: t.table.to_owned(),
        column: column.to_owned(),
        owner: row.owner.clone(),
        source: format!("row {:?}: {what}: {e}", row.key_text()).into(),
    }
}

/// A row's values sealed in their canonical encoding, and its blind
/// indexes computed from that encoding, as the model computes them; with
/// the number of values that were not in canonical form. A value sealed as
/// text though it looks legacy is added to `notices`.
fn seal_row(
    t: &StoredTable,
    row: &MigrationRow,
    keys: &OwnerKeys,
    legacy: Option<&dyn LegacyDecoder>,
    records: &Records,
    tally: &mut Tally,
    notices: &mut Vec<VerifyFailure>,
) -> Result<(RowWrite, u64)> {
    let mut write = RowWrite {
        values: Vec::with_capacity(t.columns.len()),
        indexes: Vec::new(),
    };
    let mut reencoded = 0;
    let mut canonicals: Vec<Option<Zeroizing<Vec<u8>>>> = Vec::with_capacity(t.columns.len());
    for (c, value) in t.columns.iter().zip(&row.values) {
        let Some(plain) = value else {
            write.values.push(None);
            write.indexes.extend(c.indexes().map(|_| None));
            canonicals.push(None);
            continue;
        };
        let stored = classify(t, c.column, row, plain, legacy, records)?;
        let from_legacy = matches!(stored, Stored::Opened(_));
        let canonical = match stored {
            Stored::Opened(opened) => {
                tally.opened(opened.format);
                (c.canonical)(opened.plaintext.to_vec()).map_err(|e| {
                    decode_error(
                        t,
                        c.column,
                        row,
                        "the legacy value opens, but its plaintext does not decode",
                        e,
                    )
                })?
            }
            other => {
                if let Stored::AsText(why) = other {
                    notices.push(failure(t, c.column, row, ProblemKind::LegacyAsText, why));
                }
                (c.canonical)(plain.clone()).map_err(|e| {
                    let what = if Encrypted::<Vec<u8>>::from_bytes(plain.clone())
                        .header()
                        .is_ok()
                    {
                        "the flag is off but the value is an envelope (was the flag changed by hand?)"
                    } else {
                        "the plain value does not decode"
                    };
                    decode_error(t, c.column, row, what, e)
                })?
            }
        };
        if !from_legacy && *canonical != *plain {
            reencoded += 1;
        }
        write.values.push(Some(
            keys.seal(&*canonical, c.scope, &row.row)?.into_bytes(),
        ));
        for (_, index) in c.indexes() {
            write
                .indexes
                .push(Some(index.current(keys, c.scope, &canonical)?));
        }
        canonicals.push(Some(canonical));
    }
    for c in &t.compounds {
        let parts = c.parts_of(&canonicals);
        write.indexes.push(match parts {
            Some(parts) => keys.compound_index_encoded(None, c.scope, &parts, &c.index)?,
            None => None,
        });
    }
    Ok((write, reencoded))
}

/// The values of `phi_legacy_values` a batch's rows may match, by (column,
/// row key): the only flag-off values a decoder opens (see
/// [`crate::legacy`]).
#[derive(Default)]
struct Records(HashMap<(String, String), LegacyRecord>);

impl Records {
    /// The records of `t` for `rows`, when the table has any (`wanted`).
    fn load<C: DataConnection>(
        conn: &mut C,
        t: &StoredTable,
        rows: &[MigrationRow],
        wanted: bool,
    ) -> Result<Records> {
        if !wanted || rows.is_empty() {
            return Ok(Records::default());
        }
        let keys: Vec<String> = rows.iter().map(MigrationRow::key_text).collect();
        Ok(Records(
            conn.legacy_records(t.table, &keys)?
                .into_iter()
                .map(|r| ((r.column.clone(), r.row_key.clone()), r))
                .collect(),
        ))
    }

    /// Whether `stored`, in `column` of `row`, is exactly what was recorded
    /// there, for the row's owner: compared byte for byte, in Rust (not by
    /// a collation that pads or folds case).
    fn matches(&self, column: &str, row: &MigrationRow, stored: &[u8]) -> bool {
        self.0
            .get(&(column.to_owned(), row.key_text()))
            .is_some_and(|r| r.owner.as_bytes() == row.owner.as_bytes() && r.stored == stored)
    }
}

/// What a flag-off value is, for the backfill.
enum Stored {
    /// The field's plain encoding.
    Plain,
    /// A recorded legacy value, opened.
    Opened(LegacyPlaintext),
    /// Looks legacy, or was recorded, but is sealed as the text it is: why.
    AsText(&'static str),
}

const UNRECORDED: &str = "looks like a legacy ciphertext but was not recorded as one before phi's writers ran \
     (written since, or copied from another row or owner): sealed as the text it is, not decoded";
const NOT_WELL_FORMED: &str =
    "was recorded as legacy but is not well formed in its format: sealed as the text it is";
const NO_DECODER: &str =
    "was recorded as legacy but no legacy decoder was given: sealed as the text it is";

/// Decides what the flag-off value `stored` of `column` in `row` is: opened
/// by the decoder only when a record of that table, column, row key and
/// owner holds exactly these bytes (see [`crate::legacy`]).
fn classify(
    t: &StoredTable,
    column: &'static str,
    row: &MigrationRow,
    stored: &[u8],
    legacy: Option<&dyn LegacyDecoder>,
    records: &Records,
) -> Result<Stored> {
    let recorded = records.matches(column, row, stored);
    let Some(decoder) = legacy else {
        return Ok(if recorded {
            Stored::AsText(NO_DECODER)
        } else {
            Stored::Plain
        });
    };
    if !recorded {
        // Never opened: whether it would open must not decide anything.
        return Ok(if decoder.recognises(stored) {
            Stored::AsText(UNRECORDED)
        } else {
            Stored::Plain
        });
    }
    let key = row.key_text();
    match decoder.open(&LegacyValue::new(t.table, column, &row.owner, &key, stored)) {
        Ok(Some(opened)) => Ok(Stored::Opened(opened)),
        Ok(None) => Ok(Stored::Plain),
        Err(e) if matches!(e.kind, LegacyErrorKind::Malformed(_)) => {
            Ok(Stored::AsText(NOT_WELL_FORMED))
        }
        Err(source) => Err(Error::Legacy {
            table: t.table.to_owned(),
            column: column.to_owned(),
            row: key,
            owner: row.owner.clone(),
            source: Box::new(source),
        }),
    }
}

/// A row's values opened back to their plain (canonical) encoding, blind
/// indexes cleared; with the number of values that were not in canonical
/// form.
fn unseal_row(t: &StoredTable, row: &MigrationRow, keys: &OwnerKeys) -> Result<(RowWrite, u64)> {
    let mut write = RowWrite {
        values: Vec::with_capacity(t.columns.len()),
        indexes: Vec::new(),
    };
    let mut reencoded = 0;
    for (i, c) in t.columns.iter().enumerate() {
        write.indexes.extend(c.indexes().map(|_| None));
        let Some(sealed) = row
            .values
            .get(t.sealed_position(i))
            .and_then(Option::as_ref)
        else {
            // A NULL shadow: the plaintext column keeps what it holds.
            let kept = if c.shadow.is_some() {
                row.values.get(i).cloned().flatten()
            } else {
                None
            };
            write.values.push(kept);
            continue;
        };
        let plain: Vec<u8> = keys.open(
            Encrypted::<Vec<u8>>::from_bytes(sealed.clone()),
            c.scope,
            &row.row,
        )?;
        let plain = Zeroizing::new(plain);
        let canonical = (c.canonical)(plain.to_vec())
            .map_err(|e| decode_error(t, c.column, row, "the opened value does not decode", e))?;
        if *canonical != *plain {
            reencoded += 1;
        }
        if c.shadow.is_some() && std::str::from_utf8(&canonical).is_err() {
            // A plaintext column is written as text: a type whose encoding
            // is not text (an integer, say) cannot be written back there.
            return Err(decode_error(
                t,
                c.column,
                row,
                "the opened value's encoding is not text, so it cannot be written to the plaintext column",
                DecodeError::Utf8,
            ));
        }
        write.values.push(Some(canonical.to_vec()));
    }
    write.indexes.extend(t.compounds.iter().map(|_| None));
    Ok((write, reencoded))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_rate_and_eta() {
        let p = Progress {
            table: "cases",
            done: 500,
            total: 1500,
            elapsed: Duration::from_secs(2),
        };
        assert!((p.rate() - 250.0).abs() < 1e-9);
        assert_eq!(p.eta(), Some(Duration::from_secs(4)));
        let idle = Progress {
            done: 0,
            elapsed: Duration::ZERO,
            ..p
        };
        assert_eq!((idle.rate(), idle.eta()), (0.0, None));
    }

    #[test]
    fn canonical_re_encodes_what_decodes() {
        use chrono::{NaiveDate, NaiveDateTime};
        let c = |f: CanonicalFn, b: &[u8]| f(b.to_vec()).map(|v| v.to_vec());
        assert_eq!(
            c(canonical::<NaiveDate>, b"1980-1-15"),
            Ok(b"1980-01-15".to_vec())
        );
        assert_eq!(
            c(canonical::<NaiveDate>, b"1980-01-15 "),
            Ok(b"1980-01-15".to_vec())
        );
        assert_eq!(
            c(canonical::<NaiveDateTime>, b"1980-01-15T08:30:00.000"),
            Ok(b"1980-01-15T08:30:00".to_vec())
        );
        // Text and bytes are their own canonical form: never trimmed.
        assert_eq!(c(canonical::<String>, b" Doe "), Ok(b" Doe ".to_vec()));
        assert_eq!(c(canonical::<Vec<u8>>, &[0xF1, 0x01]), Ok(vec![0xF1, 0x01]));
        assert_eq!(c(canonical::<i32>, &[0, 0, 1, 0]), Ok(vec![0, 0, 1, 0]));
        assert_eq!(
            c(canonical::<NaiveDate>, b"15/01/1980"),
            Err(DecodeError::DateTime("date"))
        );
        assert!(c(canonical::<i64>, &[1, 2]).is_err());
    }

    #[test]
    fn options_clamp_the_batch() {
        assert_eq!(MigrateOptions::default().batch_size(), DEFAULT_BATCH);
        assert_eq!(MigrateOptions::default().batch(0).batch_size(), 1);
        assert_eq!(
            MigrateOptions::default().batch(1 << 30).batch_size(),
            MAX_BATCH
        );
    }
}
