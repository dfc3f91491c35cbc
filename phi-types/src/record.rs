//! Records: the runtime side of `#[derive(PhiRecord)]`.
//!
//! The derive turns a model with plain fields into a [`PhiRecord`] whose
//! [`Sealed`](PhiRecord::Sealed) twin is what Diesel reads and writes. This
//! module holds the trait, the batch algorithms every model shares (one key
//! resolution for all the owners of a batch, one entry into the nonce
//! generator per block of rows, every core for large batches) and the small
//! traits the derive relies on for owner ids, row keys and encrypted flags.
//!
//! # Gradual roll-out
//!
//! A model with an `#[phi(encrypted_flag)]` column can hold rows written
//! before encryption was turned on (flag off: the encrypted columns hold the
//! value's plain encoding) beside sealed rows (flag on). Reads handle both.
//! Writes ask the keyring's [`Rollout`] whether the owner's new rows are
//! sealed. A row whose flag is on but whose bytes are not an envelope is an
//! error ([`Error::Malformed`]), never read as plaintext. A model without a
//! flag is always sealed, whatever the roll-out says.
//!
//! With a legacy decoder on the keyring
//! ([`KeyringBuilder::legacy`](crate::KeyringBuilder::legacy)),
//! [`PhiRecord::load`] and `load_async` also open a flag-off row's values
//! that were recorded as legacy ciphertexts (see [`crate::legacy`]).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::access::AccessOp;
use crate::error::{Error, LegacyErrorKind, Result};
pub use crate::keyring::PARALLEL_MIN_ROWS;
use crate::keyring::{AccessBatch, Keyring, OwnerKeys};
use crate::legacy::decoder::{LegacyDecoder, LegacyValue};
use crate::sealer::{Sealer, with_sealer};
pub use crate::store::Rollout;
use crate::store::schema::phi_legacy_values;

/// A model whose PHI fields are sealed in the database; implemented by
/// `#[derive(PhiRecord)]`.
///
/// The provided methods are the API: [`seal`](Self::seal) /
/// [`seal_all`](Self::seal_all) before an insert,
/// [`load`](Self::load), [`load_first`](Self::load_first),
/// [`load_optional`](Self::load_optional) or [`open_all`](Self::open_all)
/// after a select.
/// The derive also generates, for a model `Case`:
///
/// - `CaseSealed`, the stored form, deriving Diesel's `Queryable`,
///   `Selectable`, `Insertable` and `AsChangeset` for the table;
/// - `Case::update(&new, &old, &keyring, &mut conn)` (for a model with a
///   `#[phi(row_key)]`): the update that re-seals only the changed fields
///   and writes them only while the row's key, owner and encrypted flag are
///   still those of `old`, returning an [`Updated`];
/// - `CaseChanges` and `Case::changes(&new, &old, &keyring)`: the same
///   changes, for a caller that builds its own (guarded) `UPDATE`;
/// - `case.insert(&keyring, &mut conn)` and
///   `Case::insert_all(&cases, &keyring, &mut conn)` (and, with the `async`
///   feature, `insert_async`): seal, then Diesel's `insert_into`, returning
///   the rows inserted; `insert_all` writes multi-row `INSERT`s within the
///   backends' bind limits, in one transaction;
/// - `Case::<field>_blind_index(&keyring, owner, value)` for each field with
///   a blind index: the values to match with `eq_any` (`value` a `&str` for
///   a `String` field, else `&T`);
/// - `Case::<field>_is(&keyring, owner, value)` for each field with a blind
///   index: the duplicate check as one Diesel expression, the owner column
///   equal to `owner` and the index column among the owner's index values,
///   for `cases::table.filter(…)` (and `_is_async`);
/// - `Case::find_by_<column>(owner, probe, &keyring, &mut conn)`,
///   `Case::<column>_tags(&keyring, owner, probe)` and, for a `year` or
///   `year_month` index, `Case::find_<column>_between(owner, &from, &to,
///   &keyring, &mut conn)` (and their `_async` forms) for each derived index
///   ([`blind::derived`](crate::blind::derived)): the owner's records whose
///   field starts with, ends with the digits of, or falls in the year or
///   month of the probe, or lies in the date range; the rows whose tag
///   matches, opened, exact matches kept;
/// - `Case::find_by_<field>(&value, &keyring, &mut conn)` (and, with the
///   `async` feature, `find_by_<field>_async`) for each field with a lookup
///   index: the records holding that value, whoever owns them
///   ([`lookup`](crate::lookup)); a [`Migratable`](crate::migrate::Migratable)
///   model also implements [`LookupIndexed`](crate::lookup::LookupIndexed)
///   for the re-index job;
/// - with `#[phi(debug)]`, a `Debug` for both that prints encrypted fields
///   as `<redacted>`. Without it the model must not implement `Debug` at
///   all: a `#[derive(Debug)]` (or a hand-written `Debug`) on a model with
///   encrypted fields is a compile error pointing to `#[phi(debug)]`, since
///   it would print PHI:
///
/// ```compile_fail
/// # use phi_types::PhiRecord;
/// # diesel::table! { cases (id) { id -> Integer, user_id -> Text, patient_last -> Binary } }
/// #[derive(PhiRecord, Clone, Debug)] // error: must not implement `Debug` itself
/// #[phi(table = cases)]
/// struct Case {
///     id: i32,
///     #[phi(owner)]
///     user_id: String,
///     #[phi(encrypt)]
///     patient_last: String,
/// }
/// ```
///
/// # Attributes
///
/// | attribute | on | meaning |
/// |---|---|---|
/// | `#[diesel(table_name = path)]` or `#[phi(table = path)]` | struct | the Diesel table (one is required; given both, they must be the same path) |
/// | `#[phi(crate = path)]` | struct | where `phi_types` is (default `::phi_types`) |
/// | `#[phi(debug)]` | struct | redacted `Debug` for the model and its sealed form (a plain `Debug` is refused) |
/// | `#[phi(sealed = Name)]`, `#[phi(changes = Name)]` | struct | names of the generated structs |
/// | `#[phi(sealed_derive(Identifiable, Associations))]` | struct | more derives on the sealed struct (not its own `Queryable`, `Selectable`, `Insertable`, `AsChangeset`, nor `Debug`: see `debug`) |
/// | `#[phi(sealed_attr(diesel(belongs_to(ParentSealed))))]` | struct | more attributes on the sealed struct, each written as inside `#[…]` |
/// | `#[phi(owner)]` | one field | whose data key seals the row ([`OwnerId`]: strings, integers, `uuid::Uuid`) |
/// | `#[phi(encrypt)]` | fields | sealed with scope `table.column` (a [`PhiValue`](crate::PhiValue), or `Option` of one for a nullable column) |
/// | `#[phi(encrypt, scope = "…")]` | fields | pins the scope, so renaming the field or column does not orphan data |
/// | `#[phi(encrypt, blind_index = column)]` | fields | keeps an equality index in `column` (nullable binary) |
/// | `#[phi(encrypt, lookup_index = column)]` | fields | keeps an owner-independent index in `column` (nullable binary, 20 bytes), written on every insert and update, sealed row or not, and `find_by_<field>`; equal values are linkable across owners ([`lookup`](crate::lookup)) |
/// | `#[phi(encrypt, index(column = c, prefix = n \| last_digits = n \| year \| year_month, bits = b, normalize = "…"))]` | fields, any number | keeps a [derived index](crate::blind::derived) of a part of the value in `c` (nullable binary, ⌈b / 8⌉ bytes; `bits` 1 to 128, default 128; no transformation: the whole value), and generates `find_by_<c>`, `<c>_tags` and for date parts `find_<c>_between` |
/// | `#[phi(compound_index(column = c, fields(a, b), bits = b))]` | struct, any number | keeps a [compound index](crate::blind::CompoundIndex) of encrypted fields `a`, `b`, … together in `c` (each normalised by its own `normalize`; NULL when one is), and generates `find_by_<c>` and `<c>_tags` |
/// | `normalize = "trim,lowercase"` | with `blind_index`, `lookup_index`, `index` or a compound index | normalises before indexing |
/// | `#[phi(encrypt, shadow)]`, `#[phi(encrypt, shadow = column)]` | fields, with an `encrypted_flag` | the dual-write phase of adopting phi on a live table: the field's own column keeps its plain SQL type and always gets the plain value; the shadow column (`<column>_encrypted` unless named; nullable binary) gets the envelope when the row is sealed, NULL otherwise. A sealed row is read from the shadow (a NULL shadow of a non-`Option` field is an error naming table, column and row), an unsealed one from the plain column. The migration jobs fill, compare and clear the shadow ([`migrate`](crate::migrate)); after `finalize` drops the plain column and renames the shadow to it, remove `shadow` |
/// | `#[phi(row_key)]` | one field | binds each ciphertext to its row ([`RowKey`]) |
/// | `#[phi(encrypted_flag)]` | one field | marks sealed rows, for a gradual roll-out ([`EncryptedFlag`]) |
///
/// `#[diesel(…)]` attributes on the model and its fields (`primary_key`,
/// `column_name`, …) are forwarded to the generated structs. Plain fields
/// must be `Clone` and `PartialEq`, and the model `Send` and `Sync` (a large
/// batch is sealed and opened on several threads).
///
/// # The owner column on MySQL / MariaDB
///
/// phi compares owner ids byte for byte: `"acme"` and `"acme "` are two
/// owners, with two data keys (or, by default, `"acme "` is refused at
/// every keyring entry: see
/// [`KeyringBuilder::allow_owner_id_whitespace`](crate::KeyringBuilder::allow_owner_id_whitespace)).
/// The application's own owner column must compare the same way. On MySQL /
/// MariaDB a `VARCHAR` in a PAD SPACE collation (`utf8mb4_bin`, the `_ci`
/// ones, every collation before MySQL 8) ignores trailing spaces, a `_ci`
/// one also case, and a `CHAR` column strips trailing spaces: there
/// `WHERE user_id = 'acme '` finds `acme`'s rows, so a listing by owner mixes
/// two owners. (Their values still do not open under the wrong owner: each
/// envelope is bound to its owner. Nothing leaks, but reads fail.) Declare
/// the owner column with a NO PAD binary collation, `utf8mb4_nopad_bin` on
/// MariaDB ≥ 10.2 or `utf8mb4_0900_bin` on MySQL ≥ 8.0.17 (it stays text:
/// `diesel print-schema` prints `Text`), or as `VARBINARY` (any version;
/// keep `Text` in `schema.rs`, which Diesel reads from it as UTF-8 bytes).
/// The `in_place` and `shadow` migrations [`adopt`](crate::adopt) generates
/// convert a padding owner column to the server's NO PAD binary collation;
/// the clinic example's `owner_ids_byte_exact` migration does it by hand.
/// SQLite and PostgreSQL compare text byte for byte already.
///
/// Diesel's associations work on the sealed structs: the parent's derives
/// `Identifiable`, the child's `Identifiable` and `Associations` with a
/// `belongs_to` naming the parent's *sealed* struct. Load and group the
/// sealed rows, then open each group:
///
/// ```ignore
/// #[derive(PhiRecord, Clone, PartialEq)]
/// #[phi(table = patients, sealed_derive(Identifiable))]
/// struct Patient { #[phi(row_key)] patient_id: Uuid, #[phi(owner)] clinic_id: Uuid, /* … */ }
///
/// #[derive(PhiRecord, Clone, PartialEq)]
/// #[phi(
///     table = visits,
///     sealed_derive(Identifiable, Associations),
///     sealed_attr(diesel(belongs_to(PatientSealed, foreign_key = patient_id)))
/// )]
/// #[diesel(primary_key(visit_id))]
/// struct Visit { #[phi(row_key)] visit_id: Uuid, #[phi(owner)] patient_id: Uuid, /* … */ }
///
/// let patients: Vec<PatientSealed> = patients::table.select(PatientSealed::as_select()).load(conn)?;
/// let visits: Vec<VisitSealed> = VisitSealed::belonging_to(&patients)
///     .select(VisitSealed::as_select())
///     .load(conn)?;
/// for (patient, visits) in patients.iter().zip(visits.grouped_by(&patients)) {
///     let visits: Vec<Visit> = Visit::open_all(visits, &keyring)?;
///     // …
/// }
/// ```
///
/// # Example: a complete round trip on SQLite
///
/// ```
/// use std::sync::Arc;
/// use chrono::NaiveDate;
/// use diesel::prelude::*;
/// use phi_types::{KeyBytes, Keyring, LocalKek, MemoryKeyStore, PhiRecord, Updated};
///
/// diesel::table! {
///     cases (case_id) {
///         case_id -> Text,
///         user_id -> Text,
///         patient_last -> Binary,
///         patient_dob -> Binary,
///         ins_provider -> Nullable<Binary>,
///         phi_encrypted -> Bool,
///         patient_last_bidx -> Nullable<Binary>,
///     }
/// }
///
/// #[derive(PhiRecord, Clone, PartialEq)]
/// #[phi(table = cases, debug)]
/// #[diesel(primary_key(case_id))]
/// struct Case {
///     #[phi(row_key)]
///     case_id: String,
///     #[phi(owner)]
///     user_id: String,
///     #[phi(encrypt, blind_index = patient_last_bidx, normalize = "trim,lowercase")]
///     patient_last: String,
///     #[phi(encrypt)]
///     patient_dob: NaiveDate,
///     #[phi(encrypt)]
///     ins_provider: Option<String>,
///     #[phi(encrypted_flag)]
///     phi_encrypted: bool,
/// }
///
/// # #[cfg(feature = "sqlite")]
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut conn = SqliteConnection::establish(":memory:")?;
/// diesel::sql_query(
///     "CREATE TABLE cases (case_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, \
///      patient_last BLOB NOT NULL, patient_dob BLOB NOT NULL, ins_provider BLOB, \
///      phi_encrypted BOOLEAN NOT NULL, patient_last_bidx BLOB)",
/// )
/// .execute(&mut conn)?;
/// // In production: `LocalKek::from_env` or a KMS, and a `DieselKeyStore`.
/// let kek = LocalKek::new("local-1", &KeyBytes::new([7; 32]));
/// let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), Arc::new(kek)).build()?;
///
/// // Insert: sealed, then Diesel's `insert_into` (`case.seal(&keyring)?`
/// // gives the sealed row for an insert built by hand).
/// let case = Case {
///     case_id: "C-1001".into(),
///     user_id: "provider-17".into(),
///     patient_last: "Doe".into(),
///     patient_dob: NaiveDate::from_ymd_opt(1980, 1, 15).unwrap(),
///     ins_provider: Some("Acme Health".into()),
///     phi_encrypted: true,
/// };
/// assert_eq!(case.insert(&keyring, &mut conn)?, 1);
///
/// // What the database holds: envelopes, never the name.
/// let raw: Vec<u8> = cases::table.select(cases::patient_last).first(&mut conn)?;
/// assert_eq!(&raw[..2], &[0xF1, 0x01]);
///
/// // Load: one call, keys of every owner resolved in one batch.
/// let mine = Case::load(cases::table.filter(cases::user_id.eq("provider-17")), &mut conn, &keyring)?;
/// assert!(mine == vec![case.clone()]);
/// assert!(!format!("{:?}", mine[0]).contains("Doe"));
///
/// // The duplicate check: an indexed lookup, not a scan (`user_id` equal
/// // to the owner and `patient_last_bidx` among its index values).
/// let doe = Case::patient_last_is(&keyring, "provider-17", " DOE")?;
/// let found = Case::load(cases::table.filter(doe), &mut conn, &keyring)?;
/// assert_eq!(found.len(), 1);
///
/// // Update: only the changed fields are sealed again and written, and only
/// // while the row's key, owner and flag are still those read.
/// let mut edited = case.clone();
/// edited.ins_provider = None;
/// assert!(edited.changes(&case, &keyring)?.patient_last.is_none());
/// assert_eq!(edited.update(&case, &keyring, &mut conn)?, Updated::Applied { sealed: true });
/// let reloaded = Case::load_first(cases::table.find("C-1001"), &mut conn, &keyring)?;
/// assert_eq!(reloaded.ins_provider, None);
///
/// // Delete: plain Diesel.
/// diesel::delete(cases::table.find("C-1001")).execute(&mut conn)?;
/// # Ok(())
/// # }
/// # #[cfg(not(feature = "sqlite"))]
/// # fn main() {}
/// ```
pub trait PhiRecord: Sized + Send + Sync {
    /// The stored form: the same fields with `Encrypted<T>` in place of each
    /// encrypted one; Diesel's `Queryable`, `Selectable`, `Insertable` and
    /// `AsChangeset` for the table.
    type Sealed: SealedRecord + Send;

    /// The table's SQL name.
    const TABLE: &'static str;

    /// Whether the model has an `#[phi(encrypted_flag)]` column, so that its
    /// rows may be stored unsealed during a roll-out.
    const HAS_ENCRYPTED_FLAG: bool;

    /// The `#[phi(encrypted_flag)]` column's name, for errors.
    const ENCRYPTED_FLAG: Option<&'static str> = None;
    /// Whether the model has `lookup_index` fields, whose values are
    /// written under the keys of [`crate::keyring::LOOKUP_OWNER`].
    #[doc(hidden)]
    const HAS_LOOKUP_INDEX: bool = false;

    /// The encrypted fields' column names, as the access log names the
    /// fields an access touched (generated by the derive).
    const ENCRYPTED_COLUMNS: &'static [&'static str] = &[];

    /// The owner whose data key seals this record.
    fn owner_id(&self) -> Cow<'_, str>;

    /// The record's row key as text ([`RowKey::row_text`]), as the access
    /// log names the row; `None` for a model without a `#[phi(row_key)]`.
    fn row_key_text(&self) -> Option<String> {
        None
    }

    /// Tells phi that this record's row was deleted, so that the access
    /// log holds the deletion: one `delete` record (accessor, owner,
    /// table, row, the encrypted columns) under the keyring's accessor.
    /// Call it with the row the application deletes (phi does not run the
    /// `DELETE`), best in the same transaction, before it commits: a
    /// fail-closed access log that refuses the record then aborts it.
    ///
    /// # Errors
    /// [`Error::AccessorRequired`] under
    /// [`KeyringBuilder::require_accessor`](crate::KeyringBuilder::require_accessor)
    /// without an accessor; the access log's error when it refuses the
    /// record.
    fn record_delete(&self, keyring: &Keyring) -> Result<()> {
        Self::record_delete_all(std::slice::from_ref(self), keyring)
    }

    /// [`record_delete`](Self::record_delete) for many rows: one `append`.
    ///
    /// # Errors
    /// As [`record_delete`](Self::record_delete).
    fn record_delete_all(records: &[Self], keyring: &Keyring) -> Result<()> {
        let mut access = keyring.begin_access(
            AccessOp::Delete,
            Self::TABLE,
            Self::ENCRYPTED_COLUMNS,
            || first_owner(records.iter().map(Self::owner_id)),
        )?;
        if let Some(batch) = &mut access {
            for record in records {
                batch.add(&record.owner_id(), record.row_key_text());
            }
        }
        keyring.finish_access(access)
    }

    /// Builds the stored form: sealed under `keys`, or (`None`, only for a
    /// model with an encrypted flag) unsealed with the flag off.
    #[doc(hidden)]
    fn seal_with(&self, keys: Option<&OwnerKeys>, sealer: &mut Sealer<'_>) -> Result<Self::Sealed>;

    /// Opens the stored form: with `keys` for a sealed row, without for a
    /// row whose flag is off.
    #[doc(hidden)]
    fn open_with(sealed: Self::Sealed, keys: Option<&OwnerKeys>) -> Result<Self>;

    /// Seals one record for insertion, creating its owner's data key if the
    /// owner has none.
    ///
    /// # Errors
    /// Key resolution errors (the store, the KEK), and sealing errors naming
    /// the owner and column. Never falls back to plaintext because a key is
    /// unavailable.
    fn seal(&self, keyring: &Keyring) -> Result<Self::Sealed> {
        let mut sealed = Self::seal_all(std::slice::from_ref(self), keyring)?;
        sealed.pop().ok_or_else(|| Error::KeyUnavailable {
            owner: self.owner_id().into_owned(),
            reason: "sealing produced no row".into(),
        })
    }

    /// Seals many records, resolving all their owners' keys in one batch
    /// (one key-store query for the owners not cached). Batches of 512
    /// records or more ([`KeyringBuilder::parallel_min_rows`](crate::KeyringBuilder::parallel_min_rows))
    /// are sealed on rayon's global thread pool, in blocks of 128 rows; the
    /// result is in the order of `records`.
    ///
    /// # Errors
    /// As [`seal`](Self::seal); nothing is returned if any record fails.
    fn seal_all(records: &[Self], keyring: &Keyring) -> Result<Vec<Self::Sealed>> {
        let plan = SealPlan::new(records, keyring)?;
        plan.seal(0..records.len(), keyring.parallel_min_rows())
    }

    /// Seals `records` a chunk of `rows` records at a time and hands each
    /// sealed chunk, in order, to `write` on the calling thread (typically
    /// one multi-row `INSERT`, in a transaction of its own or the
    /// caller's). Every owner's keys are resolved (or created) first, in one
    /// batch, before `write` is first called. From
    /// [`KeyringBuilder::parallel_min_rows`](crate::KeyringBuilder::parallel_min_rows)
    /// records on, the next chunk is sealed on rayon's pool while `write`
    /// stores the current one, so sealing costs the writer almost nothing;
    /// below it, or with `parallel_min_rows(usize::MAX)`, everything runs on
    /// the calling thread.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use diesel::prelude::*;
    /// # use phi_types::{KeyBytes, Keyring, LocalKek, MemoryKeyStore, PhiRecord};
    /// # diesel::table! { cases (case_id) { case_id -> Text, user_id -> Text, patient_last -> Binary } }
    /// # #[derive(PhiRecord, Clone)]
    /// # #[phi(table = cases)]
    /// # struct Case { #[phi(row_key)] case_id: String, #[phi(owner)] user_id: String, #[phi(encrypt)] patient_last: String }
    /// # #[cfg(feature = "sqlite")]
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let mut conn = SqliteConnection::establish(":memory:")?;
    /// # diesel::sql_query("CREATE TABLE cases (case_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, patient_last BLOB NOT NULL)").execute(&mut conn)?;
    /// # let kek = LocalKek::new("local-1", &KeyBytes::new([7; 32]));
    /// # let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), Arc::new(kek)).build()?;
    /// let cases: Vec<Case> = (0..2_000)
    ///     .map(|i| Case { case_id: format!("C-{i}"), user_id: format!("provider-{}", i % 10), patient_last: "Doe".into() })
    ///     .collect();
    /// Case::seal_chunks(&cases, 500, &keyring, |sealed| {
    ///     conn.transaction(|conn| diesel::insert_into(cases::table).values(&sealed).execute(conn))?;
    ///     Ok::<_, Box<dyn std::error::Error>>(())
    /// })?;
    /// # assert_eq!(cases::table.count().get_result::<i64>(&mut conn)?, 2_000);
    /// # Ok(())
    /// # }
    /// # #[cfg(not(feature = "sqlite"))]
    /// # fn main() {}
    /// ```
    ///
    /// Called on one of rayon's own threads (inside a `par_iter`), it seals
    /// every chunk on that thread: waiting there for a job queued behind it
    /// could wait forever.
    ///
    /// # Errors
    /// As [`seal_all`](Self::seal_all), converted into `E`: before the first
    /// chunk is written when keys cannot be resolved or a strict table
    /// refuses a record the roll-out would leave unsealed, or at the first
    /// chunk that fails to seal (the chunks before it written); or the first
    /// error `write` returns. No chunk is written after an error.
    fn seal_chunks<E, F>(
        records: &[Self],
        rows: usize,
        keyring: &Keyring,
        mut write: F,
    ) -> std::result::Result<(), E>
    where
        E: From<Error>,
        F: FnMut(Vec<Self::Sealed>) -> std::result::Result<(), E>,
    {
        let plan = SealPlan::new(records, keyring)?;
        // A strict table refuses a record the roll-out leaves unsealed:
        // before any chunk is written, not at that record's chunk.
        if let Some(at) = plan.first_refused() {
            plan.seal(at..at + 1, usize::MAX)?;
        }
        let rows = rows.max(1);
        let chunks: Vec<std::ops::Range<usize>> = (0..records.len())
            .step_by(rows)
            .map(|start| start..records.len().min(start + rows))
            .collect();
        // On one of rayon's own threads the calling thread would wait for a
        // job queued behind it: sealing stays on this thread there.
        if records.len() < keyring.parallel_min_rows()
            || chunks.len() < 2
            || rayon::current_thread_index().is_some()
        {
            for chunk in chunks {
                write(plan.seal(chunk, keyring.parallel_min_rows())?)?;
            }
            return Ok(());
        }
        let mut outcome = Ok(());
        rayon::in_place_scope(|scope| {
            let plan = &plan;
            let spawn = |chunk: std::ops::Range<usize>| {
                let (done, sealed) = std::sync::mpsc::sync_channel(1);
                scope.spawn(move |_| {
                    // The receiver waits for it unless writing failed.
                    let _ = done.send(plan.seal(chunk, usize::MAX));
                });
                sealed
            };
            let mut chunks = chunks.into_iter();
            let mut pending = chunks.next().map(spawn);
            while let Some(sealed) = pending.take() {
                let sealed = sealed.recv().unwrap_or_else(|_| {
                    Err(Error::Config(
                        "a thread sealing a chunk stopped without its result".into(),
                    ))
                });
                pending = chunks.next().map(spawn);
                if let Err(error) = sealed.map_err(E::from).and_then(&mut write) {
                    outcome = Err(error);
                    break;
                }
            }
        });
        outcome
    }

    /// Opens one stored row.
    ///
    /// # Errors
    /// As [`open_all`](Self::open_all).
    fn open(sealed: Self::Sealed, keyring: &Keyring) -> Result<Self> {
        let owner = sealed.owner_id().into_owned();
        let mut opened = Self::open_all(vec![sealed], keyring)?;
        opened.pop().ok_or_else(|| Error::KeyUnavailable {
            owner,
            reason: "opening produced no row".into(),
        })
    }

    /// Opens stored rows, resolving every owner's keys in one batch (one
    /// key-store query, one unwrap per data key not cached). Batches of 512
    /// rows or more ([`KeyringBuilder::parallel_min_rows`](crate::KeyringBuilder::parallel_min_rows))
    /// are opened on rayon's global thread pool, in blocks of 128 rows; the
    /// result is in the order of `rows`.
    ///
    /// # Errors
    /// The first row that fails, with an error naming the table, column and
    /// owner ([`Error::Decrypt`] for a value altered or moved from another
    /// row, column or owner, [`Error::Malformed`] for bytes that are not an
    /// envelope).
    fn open_all(rows: Vec<Self::Sealed>, keyring: &Keyring) -> Result<Vec<Self>> {
        let access = begin_read::<Self>(AccessOp::Read, &rows, keyring)?;
        let opened = open_batch(rows, keyring, keyring.parallel_min_rows())?;
        keyring.finish_access(access)?;
        Ok(opened)
    }

    /// Opens rows as `rows` yields them: what [`load`](Self::load) does once
    /// its query runs, for rows read some other way. The reason to call it
    /// is PostgreSQL's row-by-row mode, in which Diesel hands over each row
    /// as the server sends it, so the rows are opened while the server is
    /// still producing the rest:
    ///
    /// ```ignore
    /// use diesel::pg::PgRowByRowLoadingMode;
    /// let rows = cases::table
    ///     .select(CaseSealed::as_select())
    ///     .load_iter::<CaseSealed, PgRowByRowLoadingMode>(&mut pg_conn)?;
    /// let cases = Case::open_iter(rows, &keyring)?;
    /// ```
    ///
    /// # Errors
    /// [`Error::Database`] for the first row `rows` fails to read (no row
    /// after it is read); otherwise as [`open_all`](Self::open_all).
    fn open_iter<I>(rows: I, keyring: &Keyring) -> Result<Vec<Self>>
    where
        I: IntoIterator<Item = diesel::QueryResult<Self::Sealed>>,
    {
        load_rows::<Self>(rows.into_iter(), keyring)
    }

    /// Opens stored rows one by one: each row's result, so one damaged row
    /// does not hide the others.
    ///
    /// # Errors
    /// Only when the owners' keys cannot be resolved at all.
    fn open_each(rows: Vec<Self::Sealed>, keyring: &Keyring) -> Result<Vec<Result<Self>>> {
        let access = begin_read::<Self>(AccessOp::Read, &rows, keyring)?;
        let keys = resolve_for_open(&rows, keyring)?;
        let opened = open_each_row::<Self>(rows, &keys, keyring);
        keyring.finish_access(access)?;
        Ok(opened)
    }

    /// Runs `query` selecting the sealed form and opens the rows: the
    /// one-call read (see the example on [`PhiRecord`]).
    ///
    /// The rows are opened while they are read. Up to
    /// [`KeyringBuilder::parallel_min_rows`](crate::KeyringBuilder::parallel_min_rows)
    /// rows (default 512), the whole result is read, then opened on the
    /// calling thread, as [`open_all`](Self::open_all) does. A larger result
    /// is handed to rayon's pool in chunks of [`LOAD_CHUNK_ROWS`] rows as
    /// Diesel reads them: each chunk's owners are resolved and its rows opened
    /// on a pool thread while the calling thread reads the next chunk, so
    /// decoding the database's rows and opening them run side by side. The
    /// result is in the order of the query. The error is that of the first
    /// chunk that fails (within a chunk, as `open_all`: a strict table's
    /// unsealed row first, else the first row that fails); after a failure
    /// no further chunk is read.
    ///
    /// With a legacy decoder on the keyring
    /// ([`KeyringBuilder::legacy`](crate::KeyringBuilder::legacy)), for a
    /// model with an encrypted flag on a table that is not strict, the
    /// whole result is read first; then, per chunk of [`LOAD_CHUNK_ROWS`]
    /// rows, the flag-off rows holding a value the decoder recognises have
    /// their records read from `phi_legacy_values` in one query, and the
    /// values recorded exactly so are opened (see [`crate::legacy`]).
    ///
    /// # Errors
    /// [`Error::Database`] when the query (or that of the legacy records)
    /// fails; [`Error::Legacy`] for a recorded legacy value that does not
    /// open, [`Error::DataTable`] for one whose plaintext is not the
    /// field's encoding, each naming the table, column, row and owner;
    /// then as [`open_all`](Self::open_all).
    fn load<'q, Q, C>(query: Q, conn: &mut C, keyring: &Keyring) -> Result<Vec<Self>>
    where
        Self::Sealed: diesel::Selectable<C::Backend>,
        <Self::Sealed as diesel::Selectable<C::Backend>>::SelectExpression:
            diesel::query_builder::QueryId,
        C: diesel::Connection + LegacyRecords + 'static,
        Q: diesel::query_dsl::methods::SelectDsl<diesel::dsl::AsSelect<Self::Sealed, C::Backend>>,
        diesel::dsl::Select<Q, diesel::dsl::AsSelect<Self::Sealed, C::Backend>>:
            diesel::query_dsl::LoadQuery<'q, C, Self::Sealed> + diesel::RunQueryDsl<C>,
    {
        use diesel::SelectableHelper as _;
        prepare_connection(conn, Self::TABLE)?;
        let rows = diesel::RunQueryDsl::load_iter::<
            Self::Sealed,
            diesel::connection::DefaultLoadingMode,
        >(query.select(Self::Sealed::as_select()), conn)
        .map_err(loading_error::<Self>)?;
        let Some(decoder) = legacy_reads::<Self>(keyring) else {
            return load_rows::<Self>(rows, keyring);
        };
        // The records are read on the same connection, once the rows are.
        let mut rows = rows
            .collect::<diesel::QueryResult<Vec<Self::Sealed>>>()
            .map_err(loading_error::<Self>)?;
        for chunk in rows.chunks_mut(LOAD_CHUNK_ROWS) {
            let (candidates, keys) = legacy_candidates::<Self>(chunk, decoder);
            if candidates.is_empty() {
                continue;
            }
            let records = conn
                .legacy_records(Self::TABLE, keys)
                .map_err(legacy_records_error::<Self>)?;
            open_legacy::<Self>(chunk, &candidates, records, decoder)?;
        }
        Self::open_all(rows, keyring)
    }

    /// [`load`](Self::load), keeping the records `keep` accepts once
    /// opened: a condition on encrypted fields (a range of dates, a prefix
    /// of a name, anything a closure can test) answered exactly for the
    /// rows `query` selects. Filter `query` to one owner (and by any
    /// plaintext column) so that only that owner's rows are read and
    /// opened; sort the result by an encrypted field afterwards
    /// (`sort_by`).
    ///
    /// The rows are read and opened a chunk of [`LOAD_CHUNK_ROWS`] at a
    /// time, each chunk opened and recorded in the access log as
    /// [`open_all`](Self::open_all) does, and only then shown to `keep`:
    /// every row opened is a read in the access log, kept or not, and
    /// `keep` never sees a record the log refused. The records `keep`
    /// rejects are dropped before the next chunk is opened, so phi holds one
    /// chunk of opened records and the matches (the database client may
    /// still buffer the whole result: PostgreSQL's and MySQL's do). With a
    /// legacy decoder on the keyring the whole result is read first, as
    /// `load` does. For an owner with more rows than the client should
    /// buffer, page the query by its key
    /// (`.filter(case_id.gt(&last)).order(case_id).limit(1_000)`) and call
    /// `load_where` for each page. With a derived index, narrow the query
    /// by its tags first (`cases::last_prefix.eq_any(…)`, see
    /// [`blind::derived`](crate::blind::derived)) so that only the
    /// candidates are opened.
    ///
    /// What it reveals: nothing beyond `query` itself, since the condition
    /// is tested in the application. What it costs: every row `query`
    /// selects is opened. It is the exact, leak-free way to answer range
    /// and prefix queries within one owner; phi does not offer
    /// order-revealing encryption, whose stored order leaks the values
    /// themselves to anyone who reads the table (see the guide's models
    /// chapter).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use diesel::prelude::*;
    /// # use phi_types::{KeyBytes, Keyring, LocalKek, MemoryKeyStore, PhiRecord};
    /// # diesel::table! { cases (case_id) { case_id -> Text, user_id -> Text, patient_last -> Binary } }
    /// # #[derive(PhiRecord, Clone, PartialEq)]
    /// # #[diesel(table_name = cases)]
    /// # struct Case { #[phi(row_key)] case_id: String, #[phi(owner)] user_id: String, #[phi(encrypt)] patient_last: String }
    /// # #[cfg(feature = "sqlite")]
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let mut conn = SqliteConnection::establish(":memory:")?;
    /// # diesel::sql_query("CREATE TABLE cases (case_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, patient_last BLOB NOT NULL)").execute(&mut conn)?;
    /// # let kek = LocalKek::new("local-1", &KeyBytes::new([7; 32]));
    /// # let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), Arc::new(kek)).build()?;
    /// let names = ["Marchbanks", "Martin", "Doe", "MARSH"];
    /// let cases: Vec<Case> = names.iter().enumerate().map(|(i, last)| Case {
    ///     case_id: format!("C-{i}"), user_id: "provider-17".into(), patient_last: (*last).into(),
    /// }).collect();
    /// Case::insert_all(&cases, &keyring, &mut conn)?;
    ///
    /// // "Surname starts with MAR", for one provider, ordered by surname.
    /// let mut found = Case::load_where(
    ///     cases::table.filter(cases::user_id.eq("provider-17")),
    ///     &mut conn,
    ///     &keyring,
    ///     |c| c.patient_last.to_lowercase().starts_with("mar"),
    /// )?;
    /// found.sort_by(|a, b| a.patient_last.cmp(&b.patient_last));
    /// let names: Vec<&str> = found.iter().map(|c| c.patient_last.as_str()).collect();
    /// assert_eq!(names, ["MARSH", "Marchbanks", "Martin"]);
    /// # Ok(())
    /// # }
    /// # #[cfg(not(feature = "sqlite"))]
    /// # fn main() {}
    /// ```
    ///
    /// # Errors
    /// As [`load`](Self::load).
    fn load_where<'q, Q, C, F>(
        query: Q,
        conn: &mut C,
        keyring: &Keyring,
        keep: F,
    ) -> Result<Vec<Self>>
    where
        Self::Sealed: diesel::Selectable<C::Backend>,
        <Self::Sealed as diesel::Selectable<C::Backend>>::SelectExpression:
            diesel::query_builder::QueryId,
        C: diesel::Connection + LegacyRecords + 'static,
        Q: diesel::query_dsl::methods::SelectDsl<diesel::dsl::AsSelect<Self::Sealed, C::Backend>>,
        diesel::dsl::Select<Q, diesel::dsl::AsSelect<Self::Sealed, C::Backend>>:
            diesel::query_dsl::LoadQuery<'q, C, Self::Sealed> + diesel::RunQueryDsl<C>,
        F: Fn(&Self) -> bool,
    {
        use diesel::SelectableHelper as _;
        if legacy_reads::<Self>(keyring).is_some() {
            let mut records = Self::load(query, conn, keyring)?;
            records.retain(|record| keep(record));
            return Ok(records);
        }
        prepare_connection(conn, Self::TABLE)?;
        let rows = diesel::RunQueryDsl::load_iter::<
            Self::Sealed,
            diesel::connection::DefaultLoadingMode,
        >(query.select(Self::Sealed::as_select()), conn)
        .map_err(loading_error::<Self>)?;
        let mut found = Vec::new();
        let mut chunk = Vec::with_capacity(LOAD_CHUNK_ROWS);
        let mut rows = rows.peekable();
        while let Some(row) = rows.next() {
            chunk.push(row.map_err(loading_error::<Self>)?);
            if chunk.len() == LOAD_CHUNK_ROWS || rows.peek().is_none() {
                let opened = Self::open_all(std::mem::take(&mut chunk), keyring)?;
                found.extend(opened.into_iter().filter(|record| keep(record)));
            }
        }
        Ok(found)
    }

    /// Runs `query` with `LIMIT 1` and opens the row it selects: the
    /// one-call read of a single record. The row goes through
    /// [`load`](Self::load), so legacy values are read and the access is
    /// logged as `load` does.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use diesel::prelude::*;
    /// use phi_types::{Error, KeyBytes, Keyring, LocalKek, MemoryKeyStore, PhiRecord};
    ///
    /// diesel::table! {
    ///     cases (case_id) {
    ///         case_id -> Text,
    ///         user_id -> Text,
    ///         patient_last -> Binary,
    ///     }
    /// }
    ///
    /// #[derive(PhiRecord, Clone, PartialEq)]
    /// #[diesel(table_name = cases, primary_key(case_id))]
    /// struct Case {
    ///     #[phi(row_key)]
    ///     case_id: String,
    ///     #[phi(owner)]
    ///     user_id: String,
    ///     #[phi(encrypt)]
    ///     patient_last: String,
    /// }
    ///
    /// # #[cfg(feature = "sqlite")]
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let mut conn = SqliteConnection::establish(":memory:")?;
    /// diesel::sql_query(
    ///     "CREATE TABLE cases (case_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, patient_last BLOB NOT NULL)",
    /// )
    /// .execute(&mut conn)?;
    /// let kek = LocalKek::new("local-1", &KeyBytes::new([7; 32]));
    /// let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), Arc::new(kek)).build()?;
    /// let case = Case { case_id: "C-1".into(), user_id: "provider-17".into(), patient_last: "Doe".into() };
    /// case.insert(&keyring, &mut conn)?;
    ///
    /// let found = Case::load_first(cases::table.find("C-1"), &mut conn, &keyring)?;
    /// assert!(found == case);
    /// let missing = Case::load_first(cases::table.find("C-2"), &mut conn, &keyring);
    /// assert!(matches!(missing, Err(Error::NotFound { table: "cases" })));
    /// # Ok(())
    /// # }
    /// # #[cfg(not(feature = "sqlite"))]
    /// # fn main() {}
    /// ```
    ///
    /// # Errors
    /// [`Error::NotFound`] naming the table when no row matches; otherwise
    /// as [`load`](Self::load).
    fn load_first<'q, Q, C>(query: Q, conn: &mut C, keyring: &Keyring) -> Result<Self>
    where
        Self::Sealed: diesel::Selectable<C::Backend>,
        <Self::Sealed as diesel::Selectable<C::Backend>>::SelectExpression:
            diesel::query_builder::QueryId,
        C: diesel::Connection + LegacyRecords + 'static,
        Q: diesel::query_dsl::methods::LimitDsl,
        diesel::dsl::Limit<Q>:
            diesel::query_dsl::methods::SelectDsl<diesel::dsl::AsSelect<Self::Sealed, C::Backend>>,
        diesel::dsl::Select<diesel::dsl::Limit<Q>, diesel::dsl::AsSelect<Self::Sealed, C::Backend>>:
            diesel::query_dsl::LoadQuery<'q, C, Self::Sealed> + diesel::RunQueryDsl<C>,
    {
        Self::load_optional(query, conn, keyring)?.ok_or(Error::NotFound { table: Self::TABLE })
    }

    /// [`load_first`](Self::load_first), with `None` when no row matches:
    /// `query` runs with `LIMIT 1`, through [`load`](Self::load).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use diesel::prelude::*;
    /// # use phi_types::{KeyBytes, Keyring, LocalKek, MemoryKeyStore, PhiRecord};
    /// # diesel::table! { cases (case_id) { case_id -> Text, user_id -> Text, patient_last -> Binary } }
    /// # #[derive(PhiRecord, Clone, PartialEq)]
    /// # #[diesel(table_name = cases)]
    /// # struct Case { #[phi(row_key)] case_id: String, #[phi(owner)] user_id: String, #[phi(encrypt)] patient_last: String }
    /// # #[cfg(feature = "sqlite")]
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let mut conn = SqliteConnection::establish(":memory:")?;
    /// # diesel::sql_query("CREATE TABLE cases (case_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, patient_last BLOB NOT NULL)").execute(&mut conn)?;
    /// # let kek = LocalKek::new("local-1", &KeyBytes::new([7; 32]));
    /// # let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), Arc::new(kek)).build()?;
    /// let cases = [
    ///     Case { case_id: "C-1".into(), user_id: "provider-17".into(), patient_last: "Doe".into() },
    ///     Case { case_id: "C-2".into(), user_id: "provider-17".into(), patient_last: "Roe".into() },
    /// ];
    /// Case::insert_all(&cases, &keyring, &mut conn)?;
    ///
    /// let newest = Case::load_optional(
    ///     cases::table.filter(cases::user_id.eq("provider-17")).order(cases::case_id.desc()),
    ///     &mut conn,
    ///     &keyring,
    /// )?;
    /// assert_eq!(newest.map(|c| c.patient_last).as_deref(), Some("Roe"));
    /// assert!(Case::load_optional(cases::table.filter(cases::user_id.eq("nobody")), &mut conn, &keyring)?.is_none());
    /// # Ok(())
    /// # }
    /// # #[cfg(not(feature = "sqlite"))]
    /// # fn main() {}
    /// ```
    ///
    /// # Errors
    /// As [`load`](Self::load).
    fn load_optional<'q, Q, C>(query: Q, conn: &mut C, keyring: &Keyring) -> Result<Option<Self>>
    where
        Self::Sealed: diesel::Selectable<C::Backend>,
        <Self::Sealed as diesel::Selectable<C::Backend>>::SelectExpression:
            diesel::query_builder::QueryId,
        C: diesel::Connection + LegacyRecords + 'static,
        Q: diesel::query_dsl::methods::LimitDsl,
        diesel::dsl::Limit<Q>:
            diesel::query_dsl::methods::SelectDsl<diesel::dsl::AsSelect<Self::Sealed, C::Backend>>,
        diesel::dsl::Select<diesel::dsl::Limit<Q>, diesel::dsl::AsSelect<Self::Sealed, C::Backend>>:
            diesel::query_dsl::LoadQuery<'q, C, Self::Sealed> + diesel::RunQueryDsl<C>,
    {
        let mut rows = Self::load(query.limit(1), conn, keyring)?;
        Ok(rows.pop())
    }

    /// [`seal`](Self::seal) for async code (feature `async`): the owner's
    /// key is resolved (or created) without blocking the task's thread.
    ///
    /// # Errors
    /// As [`seal`](Self::seal).
    #[cfg(feature = "async")]
    fn seal_async(
        &self,
        keyring: &Keyring,
    ) -> impl std::future::Future<Output = Result<Self::Sealed>> + Send {
        async move {
            let mut sealed = Self::seal_all_async(std::slice::from_ref(self), keyring).await?;
            sealed.pop().ok_or_else(|| Error::KeyUnavailable {
                owner: self.owner_id().into_owned(),
                reason: "sealing produced no row".into(),
            })
        }
    }

    /// [`seal_all`](Self::seal_all) for async code (feature `async`): the
    /// keys of every owner are resolved with
    /// [`Keyring::keys_for_seal_many_async`], then the records are sealed on
    /// the calling task (sealing is CPU work of a microsecond or two per
    /// field). Insert the result with diesel-async, or use the derive's
    /// `insert_async`.
    ///
    /// # Errors
    /// As [`seal_all`](Self::seal_all).
    #[cfg(feature = "async")]
    fn seal_all_async(
        records: &[Self],
        keyring: &Keyring,
    ) -> impl std::future::Future<Output = Result<Vec<Self::Sealed>>> + Send {
        async move {
            let owners: Vec<Cow<'_, str>> = records.iter().map(Self::owner_id).collect();
            let mut sealing: HashSet<&str> = owners.iter().map(|o| o.as_ref()).collect();
            if Self::HAS_ENCRYPTED_FLAG {
                sealing = sealed_owners(sealing, keyring, false)?;
            }
            let sealing: Vec<&str> = sealing.into_iter().collect();
            let access = begin_insert(records, &owners, keyring)?;
            let keys = keyring.keys_for_seal_many_async(sealing).await?;
            let lookup = if Self::HAS_LOOKUP_INDEX && !records.is_empty() {
                Some(keyring.lookup_keys_async().await?)
            } else {
                None
            };
            let sealed =
                seal_records(records, &owners, &keys, lookup, keyring.parallel_min_rows())?;
            refuse_unsealed_rows::<Self>("writing", &sealed, keyring)?;
            keyring.finish_access(access)?;
            Ok(sealed)
        }
    }

    /// [`open_all`](Self::open_all) for async code (feature `async`): keys
    /// are resolved with [`Keyring::keys_for_open_many_async`]; then a
    /// batch of fewer than [`ASYNC_OPEN_INLINE_MAX_ROWS`] rows is opened on
    /// the calling task, a larger one on `tokio::task::spawn_blocking`, so
    /// that a large batch does not hold a runtime worker (see the
    /// constant for the measurement).
    ///
    /// # Errors
    /// As [`open_all`](Self::open_all).
    #[cfg(feature = "async")]
    fn open_all_async(
        rows: Vec<Self::Sealed>,
        keyring: &Keyring,
    ) -> impl std::future::Future<Output = Result<Vec<Self>>> + Send
    where
        Self: 'static,
        Self::Sealed: 'static,
    {
        async move {
            let access = begin_read::<Self>(AccessOp::Read, &rows, keyring)?;
            refuse_unsealed_rows::<Self>("reading", &rows, keyring)?;
            let owners = owned_owners_and_versions(&rows);
            let keys = resolve_for_open_async(owners, keyring).await?;
            let parallel_min_rows = keyring.parallel_min_rows();
            if rows.len() < ASYNC_OPEN_INLINE_MAX_ROWS {
                let opened = open_rows(rows, &keys, parallel_min_rows)?;
                keyring.finish_access(access)?;
                return Ok(opened);
            }
            match tokio::task::spawn_blocking(move || {
                open_rows::<Self>(rows, &keys, parallel_min_rows)
            })
            .await
            {
                Ok(opened) => {
                    let opened = opened?;
                    keyring.finish_access(access)?;
                    Ok(opened)
                }
                Err(joined) => Err(Error::KeyUnavailable {
                    owner: String::new(),
                    reason: format!(
                        "opening {} rows on the blocking pool failed: {joined}",
                        Self::TABLE
                    ),
                }),
            }
        }
    }

    /// [`open_each`](Self::open_each) for async code (feature `async`):
    /// each row's result, keys resolved without blocking.
    ///
    /// # Errors
    /// Only when the owners' keys cannot be resolved at all.
    #[cfg(feature = "async")]
    fn open_each_async(
        rows: Vec<Self::Sealed>,
        keyring: &Keyring,
    ) -> impl std::future::Future<Output = Result<Vec<Result<Self>>>> + Send {
        async move {
            let access = begin_read::<Self>(AccessOp::Read, &rows, keyring)?;
            let owners = owned_owners_and_versions(&rows);
            let keys = resolve_for_open_async(owners, keyring).await?;
            let opened = open_each_row::<Self>(rows, &keys, keyring);
            keyring.finish_access(access)?;
            Ok(opened)
        }
    }

    /// [`load`](Self::load) for diesel-async (feature `async`): runs `query`
    /// selecting the sealed form on an `AsyncPgConnection`,
    /// `AsyncMysqlConnection` or `SyncConnectionWrapper<SqliteConnection>`
    /// (pooled or not), then opens the rows as
    /// [`open_all_async`](Self::open_all_async) does. Legacy values are
    /// opened as [`load`](Self::load) opens them, the records of each
    /// chunk read on `conn`.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")]
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::sync::Arc;
    /// use diesel::{ExpressionMethods, QueryDsl};
    /// use diesel_async::{AsyncConnection, SimpleAsyncConnection};
    /// use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    /// use phi_types::{KeyBytes, Keyring, LocalKek, MemoryKeyStore, PhiRecord, Updated};
    ///
    /// diesel::table! {
    ///     cases (case_id) {
    ///         case_id -> Text,
    ///         user_id -> Text,
    ///         patient_last -> Binary,
    ///         patient_last_bidx -> Nullable<Binary>,
    ///     }
    /// }
    ///
    /// #[derive(PhiRecord, Clone, PartialEq)]
    /// #[phi(table = cases)]
    /// #[diesel(primary_key(case_id))]
    /// struct Case {
    ///     #[phi(row_key)]
    ///     case_id: String,
    ///     #[phi(owner)]
    ///     user_id: String,
    ///     #[phi(encrypt, blind_index = patient_last_bidx, normalize = "trim,lowercase")]
    ///     patient_last: String,
    /// }
    ///
    /// tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
    ///     // `AsyncPgConnection` / `AsyncMysqlConnection`, or a deadpool / bb8
    ///     // pool of them, work the same way.
    ///     let mut conn = SyncConnectionWrapper::<diesel::SqliteConnection>::establish(":memory:").await?;
    ///     conn.batch_execute(
    ///         "CREATE TABLE cases (case_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, \
    ///          patient_last BLOB NOT NULL, patient_last_bidx BLOB)",
    ///     )
    ///     .await?;
    ///     let kek = LocalKek::new("local-1", &KeyBytes::new([7; 32]));
    ///     let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), Arc::new(kek))
    ///         .build_async()
    ///         .await?;
    ///
    ///     let case = Case { case_id: "C-1".into(), user_id: "prov-1".into(), patient_last: "Doe".into() };
    ///     case.insert_async(&keyring, &mut conn).await?;
    ///
    ///     let mine = Case::load_async(cases::table.filter(cases::user_id.eq("prov-1")), &mut conn, &keyring).await?;
    ///     assert!(mine == vec![case.clone()]);
    ///
    ///     let mut edited = case.clone();
    ///     edited.patient_last = "Roe".into();
    ///     assert_eq!(edited.update_async(&case, &keyring, &mut conn).await?, Updated::Applied { sealed: true });
    ///
    ///     let roe = Case::patient_last_is_async(&keyring, "prov-1", " ROE").await?;
    ///     let found = Case::load_first_async(cases::table.filter(roe), &mut conn, &keyring).await?;
    ///     assert!(found == edited);
    ///     Ok::<(), Box<dyn std::error::Error>>(())
    /// })
    /// # }
    /// # #[cfg(not(feature = "sqlite"))]
    /// # fn main() {}
    /// ```
    ///
    /// # Errors
    /// [`Error::Database`] when the query fails; then as
    /// [`open_all`](Self::open_all).
    #[cfg(feature = "async")]
    fn load_async<'q, Q, C>(
        query: Q,
        conn: &mut C,
        keyring: &Keyring,
    ) -> impl std::future::Future<Output = Result<Vec<Self>>> + Send
    where
        Self: 'static,
        Self::Sealed: diesel::Selectable<C::Backend> + 'static,
        <Self::Sealed as diesel::Selectable<C::Backend>>::SelectExpression:
            diesel::query_builder::QueryId,
        C: diesel_async::AsyncConnectionCore + LegacyRecordsAsync,
        Q: diesel::query_dsl::methods::SelectDsl<diesel::dsl::AsSelect<Self::Sealed, C::Backend>>
            + Send,
        diesel::dsl::Select<Q, diesel::dsl::AsSelect<Self::Sealed, C::Backend>>:
            diesel_async::methods::LoadQuery<'q, C, Self::Sealed> + 'q,
    {
        async move {
            use diesel::SelectableHelper as _;
            let mut rows =
                diesel_async::RunQueryDsl::load(query.select(Self::Sealed::as_select()), conn)
                    .await
                    .map_err(|source| Error::Database {
                        operation: "loading sealed rows",
                        table: Self::TABLE,
                        source,
                    })?;
            if let Some(decoder) = legacy_reads::<Self>(keyring) {
                for chunk in rows.chunks_mut(LOAD_CHUNK_ROWS) {
                    let (candidates, keys) = legacy_candidates::<Self>(chunk, decoder);
                    if candidates.is_empty() {
                        continue;
                    }
                    let records = conn
                        .legacy_records_async(Self::TABLE, keys)
                        .await
                        .map_err(legacy_records_error::<Self>)?;
                    open_legacy::<Self>(chunk, &candidates, records, decoder)?;
                }
            }
            Self::open_all_async(rows, keyring).await
        }
    }

    /// [`load_first`](Self::load_first) for diesel-async (feature
    /// `async`): `query` runs with `LIMIT 1` through
    /// [`load_async`](Self::load_async).
    ///
    /// # Errors
    /// [`Error::NotFound`] naming the table when no row matches; otherwise
    /// as [`load_async`](Self::load_async).
    #[cfg(feature = "async")]
    fn load_first_async<'q, Q, C>(
        query: Q,
        conn: &mut C,
        keyring: &Keyring,
    ) -> impl std::future::Future<Output = Result<Self>> + Send
    where
        Self: 'static,
        Self::Sealed: diesel::Selectable<C::Backend> + 'static,
        <Self::Sealed as diesel::Selectable<C::Backend>>::SelectExpression:
            diesel::query_builder::QueryId,
        C: diesel_async::AsyncConnectionCore + LegacyRecordsAsync,
        Q: diesel::query_dsl::methods::LimitDsl,
        diesel::dsl::Limit<Q>: diesel::query_dsl::methods::SelectDsl<diesel::dsl::AsSelect<Self::Sealed, C::Backend>>
            + Send,
        diesel::dsl::Select<diesel::dsl::Limit<Q>, diesel::dsl::AsSelect<Self::Sealed, C::Backend>>:
            diesel_async::methods::LoadQuery<'q, C, Self::Sealed> + 'q,
    {
        let rows = Self::load_optional_async(query, conn, keyring);
        async move { rows.await?.ok_or(Error::NotFound { table: Self::TABLE }) }
    }

    /// [`load_optional`](Self::load_optional) for diesel-async (feature
    /// `async`): `query` runs with `LIMIT 1` through
    /// [`load_async`](Self::load_async).
    ///
    /// # Errors
    /// As [`load_async`](Self::load_async).
    #[cfg(feature = "async")]
    fn load_optional_async<'q, Q, C>(
        query: Q,
        conn: &mut C,
        keyring: &Keyring,
    ) -> impl std::future::Future<Output = Result<Option<Self>>> + Send
    where
        Self: 'static,
        Self::Sealed: diesel::Selectable<C::Backend> + 'static,
        <Self::Sealed as diesel::Selectable<C::Backend>>::SelectExpression:
            diesel::query_builder::QueryId,
        C: diesel_async::AsyncConnectionCore + LegacyRecordsAsync,
        Q: diesel::query_dsl::methods::LimitDsl,
        diesel::dsl::Limit<Q>: diesel::query_dsl::methods::SelectDsl<diesel::dsl::AsSelect<Self::Sealed, C::Backend>>
            + Send,
        diesel::dsl::Select<diesel::dsl::Limit<Q>, diesel::dsl::AsSelect<Self::Sealed, C::Backend>>:
            diesel_async::methods::LoadQuery<'q, C, Self::Sealed> + 'q,
    {
        let rows = Self::load_async(query.limit(1), conn, keyring);
        async move { Ok(rows.await?.pop()) }
    }

    /// [`load_where`](Self::load_where) for diesel-async (feature
    /// `async`): [`load_async`](Self::load_async), then the records `keep`
    /// accepts once opened (and recorded in the access log), the others
    /// dropped. Filter `query` to one owner; page it by key for an owner
    /// with more rows than should be in memory at once.
    ///
    /// # Errors
    /// As [`load_async`](Self::load_async).
    #[cfg(feature = "async")]
    fn load_where_async<'q, Q, C, F>(
        query: Q,
        conn: &mut C,
        keyring: &Keyring,
        keep: F,
    ) -> impl std::future::Future<Output = Result<Vec<Self>>> + Send
    where
        Self: 'static,
        Self::Sealed: diesel::Selectable<C::Backend> + 'static,
        <Self::Sealed as diesel::Selectable<C::Backend>>::SelectExpression:
            diesel::query_builder::QueryId,
        C: diesel_async::AsyncConnectionCore + LegacyRecordsAsync,
        Q: diesel::query_dsl::methods::SelectDsl<diesel::dsl::AsSelect<Self::Sealed, C::Backend>>
            + Send,
        diesel::dsl::Select<Q, diesel::dsl::AsSelect<Self::Sealed, C::Backend>>:
            diesel_async::methods::LoadQuery<'q, C, Self::Sealed> + 'q,
        F: Fn(&Self) -> bool + Send,
    {
        let rows = Self::load_async(query, conn, keyring);
        async move {
            let mut records = rows.await?;
            records.retain(|record| keep(record));
            Ok(records)
        }
    }
}

/// A record of `phi_legacy_values` as a load reads it: the column, the
/// row key, the owner and the stored bytes.
pub type LegacyRecordRow = (String, String, String, Vec<u8>);

/// The query with which a load reads the legacy records of a chunk's rows
/// (`table_name = ? AND row_key IN (…)`): the query a [`LegacyRecords`]
/// connection runs.
pub type LegacyRecordsQuery = diesel::dsl::Select<
    diesel::dsl::Filter<
        diesel::dsl::Filter<
            phi_legacy_values::table,
            diesel::dsl::Eq<phi_legacy_values::table_name, &'static str>,
        >,
        diesel::dsl::EqAny<phi_legacy_values::row_key, Vec<String>>,
    >,
    (
        phi_legacy_values::column_name,
        phi_legacy_values::row_key,
        phi_legacy_values::owner_id,
        phi_legacy_values::stored,
    ),
>;

/// The query reading the records of `table` for the row keys `keys`.
fn legacy_records_query(table: &'static str, keys: Vec<String>) -> LegacyRecordsQuery {
    use diesel::{ExpressionMethods as _, QueryDsl as _};
    phi_legacy_values::table
        .filter(phi_legacy_values::table_name.eq(table))
        .filter(phi_legacy_values::row_key.eq_any(keys))
        .select((
            phi_legacy_values::column_name,
            phi_legacy_values::row_key,
            phi_legacy_values::owner_id,
            phi_legacy_values::stored,
        ))
}

/// A connection on which [`PhiRecord::load`] reads the records of
/// `phi_legacy_values` (see [`crate::legacy`]): every Diesel connection
/// (pooled or not) of a backend that runs [`LegacyRecordsQuery`], which
/// SQLite, MySQL and PostgreSQL do. Queried only with a legacy decoder on
/// the keyring, for rows holding a value it recognises.
pub trait LegacyRecords: diesel::Connection {
    /// The records of `table` for the row keys `keys`.
    ///
    /// # Errors
    /// Diesel's, when the query fails (the table does not exist: phi's
    /// migrations, or the generated adoption migration, create it).
    fn legacy_records(
        &mut self,
        table: &'static str,
        keys: Vec<String>,
    ) -> diesel::QueryResult<Vec<LegacyRecordRow>>;
}

impl<C> LegacyRecords for C
where
    C: diesel::Connection,
    LegacyRecordsQuery: diesel::query_dsl::LoadQuery<'static, C, LegacyRecordRow>,
{
    fn legacy_records(
        &mut self,
        table: &'static str,
        keys: Vec<String>,
    ) -> diesel::QueryResult<Vec<LegacyRecordRow>> {
        diesel::RunQueryDsl::load(legacy_records_query(table, keys), self)
    }
}

/// [`LegacyRecords`] on a diesel-async connection (feature `async`), for
/// [`PhiRecord::load_async`].
#[cfg(feature = "async")]
pub trait LegacyRecordsAsync: diesel_async::AsyncConnectionCore {
    /// The records of `table` for the row keys `keys`.
    ///
    /// # Errors
    /// As [`LegacyRecords::legacy_records`].
    fn legacy_records_async(
        &mut self,
        table: &'static str,
        keys: Vec<String>,
    ) -> impl std::future::Future<Output = diesel::QueryResult<Vec<LegacyRecordRow>>> + Send;
}

#[cfg(feature = "async")]
impl<C> LegacyRecordsAsync for C
where
    C: diesel_async::AsyncConnectionCore,
    LegacyRecordsQuery: diesel_async::methods::LoadQuery<'static, C, LegacyRecordRow>,
{
    // The trait's future is `Send` with the lifetimes written out.
    #[allow(clippy::manual_async_fn)]
    fn legacy_records_async(
        &mut self,
        table: &'static str,
        keys: Vec<String>,
    ) -> impl std::future::Future<Output = diesel::QueryResult<Vec<LegacyRecordRow>>> + Send {
        async move { diesel_async::RunQueryDsl::load(legacy_records_query(table, keys), self).await }
    }
}

/// The keyring's legacy decoder, when a load of `R` reads legacy values
/// with it: `R` has an encrypted flag (only flag-off rows hold them) and
/// its table is not strict (whose flag-off rows are refused).
fn legacy_reads<R: PhiRecord>(keyring: &Keyring) -> Option<&dyn LegacyDecoder> {
    if !R::HAS_ENCRYPTED_FLAG || keyring.is_strict(R::TABLE) {
        return None;
    }
    keyring.legacy_decoder().map(|d| d.as_ref())
}

/// The rows of `chunk` (their indexes) that are unsealed and hold a value
/// `decoder` recognises, and their keys, each once: the only rows whose
/// records are read.
fn legacy_candidates<R: PhiRecord>(
    chunk: &[R::Sealed],
    decoder: &dyn LegacyDecoder,
) -> (Vec<usize>, Vec<String>) {
    let mut candidates = Vec::new();
    let mut keys = Vec::new();
    for (i, row) in chunk.iter().enumerate() {
        if row.is_encrypted() {
            continue;
        }
        let mut recognised = false;
        row.unsealed_values(&mut |_, stored| {
            recognised = recognised || decoder.recognises(stored);
        });
        if let (true, Some(key)) = (recognised, row.row_text()) {
            candidates.push(i);
            keys.push(key);
        }
    }
    keys.sort_unstable();
    keys.dedup();
    (candidates, keys)
}

fn legacy_records_error<R: PhiRecord>(source: diesel::result::Error) -> Error {
    Error::Database {
        operation: "reading the legacy records (phi_legacy_values) of loaded rows",
        table: R::TABLE,
        source,
    }
}

/// Opens the legacy values of the `candidates` of `chunk`: a value is
/// opened only when a record of the same column, row key and owner holds
/// exactly its bytes (compared here, byte for byte), and its plaintext put
/// in its place; every other value stays as it is stored.
fn open_legacy<R: PhiRecord>(
    chunk: &mut [R::Sealed],
    candidates: &[usize],
    records: Vec<LegacyRecordRow>,
    decoder: &dyn LegacyDecoder,
) -> Result<()> {
    let records: HashMap<(String, String), (String, Vec<u8>)> = records
        .into_iter()
        .map(|(column, row, owner, stored)| ((column, row), (owner, stored)))
        .collect();
    let mut opened_values = 0u64;
    for &i in candidates {
        let row = &mut chunk[i];
        let (Some(key), owner) = (row.row_text(), row.owner_id().into_owned()) else {
            continue;
        };
        let mut opened = Vec::new();
        let mut failed = None;
        row.unsealed_values(&mut |column, stored| {
            if failed.is_some() {
                return;
            }
            let recorded = records
                .get(&(column.to_owned(), key.clone()))
                .is_some_and(|(o, s)| o.as_bytes() == owner.as_bytes() && s.as_slice() == stored);
            if !recorded {
                return;
            }
            match decoder.open(&LegacyValue::new(R::TABLE, column, &owner, &key, stored)) {
                Ok(Some(plain)) => opened.push((column, plain)),
                Ok(None) => {}
                // Recorded by the migration's broad pattern but not a
                // token (a note `v1:Follow:Up`): text, as the backfill
                // seals it.
                Err(e) if matches!(e.kind, LegacyErrorKind::Malformed(_)) => {}
                Err(source) => {
                    failed = Some(Error::Legacy {
                        table: R::TABLE.to_owned(),
                        column: column.to_owned(),
                        row: key.clone(),
                        owner: owner.clone(),
                        source: Box::new(source),
                    });
                }
            }
        });
        if let Some(error) = failed {
            return Err(error);
        }
        for (column, mut plain) in opened {
            // Moved out, not copied: no unwiped copy of the plaintext.
            row.set_unsealed(column, std::mem::take(&mut *plain.plaintext))
                .map_err(|e| Error::DataTable {
                    operation: "reading a legacy value",
                    table: R::TABLE.to_owned(),
                    column: column.to_owned(),
                    owner: owner.clone(),
                    source: format!(
                        "row {key:?}: the legacy value opens, but its plaintext does not decode: {e}"
                    )
                    .into(),
                })?;
            opened_values += 1;
        }
    }
    crate::metrics::add_for_table(crate::metrics::LEGACY_READS_TOTAL, R::TABLE, opened_values);
    Ok(())
}

/// The owners among `owners` whose rows the roll-out seals, for a model
/// with an encrypted flag; the others' rows are written unsealed. Refused
/// with [`Error::FeedStale`] when the keyring follows the key-event feed
/// and is past its maximum staleness, whether the rows would be sealed or
/// not: the roll-out it would go by may be out of date. `blocking`: the
/// caller may wait for a read of the feed (not an async task).
fn sealed_owners<'o>(
    owners: HashSet<&'o str>,
    keyring: &Keyring,
    blocking: bool,
) -> Result<HashSet<&'o str>> {
    let mut sealing = HashSet::with_capacity(owners.len());
    for owner in owners {
        let seals = if blocking {
            keyring.encrypts_for_write(owner)?
        } else {
            keyring.encrypts_for_write_nonblocking(owner)?
        };
        if seals {
            sealing.insert(owner);
        }
    }
    Ok(sealing)
}

/// What sealing a batch of records needs, resolved once: each record's
/// owner, the data keys of the owners the roll-out seals for, and the
/// lookup keys of a model with a lookup index.
struct SealPlan<'r, R: PhiRecord> {
    records: &'r [R],
    owners: Vec<Cow<'r, str>>,
    keys: HashMap<String, Arc<OwnerKeys>>,
    lookup: Option<Arc<OwnerKeys>>,
    keyring: &'r Keyring,
}

impl<'r, R: PhiRecord> SealPlan<'r, R> {
    fn new(records: &'r [R], keyring: &'r Keyring) -> Result<Self> {
        let owners: Vec<Cow<'r, str>> = records.iter().map(R::owner_id).collect();
        let access = begin_insert(records, &owners, keyring)?;
        let mut sealing: HashSet<&str> = owners.iter().map(|o| o.as_ref()).collect();
        if R::HAS_ENCRYPTED_FLAG {
            // The roll-out policy is asked once per distinct owner.
            sealing = sealed_owners(sealing, keyring, true)?;
        }
        let keys = keyring.keys_for_seal_many(sealing.iter().copied())?;
        let lookup = if R::HAS_LOOKUP_INDEX && !records.is_empty() {
            Some(keyring.lookup_keys()?)
        } else {
            None
        };
        // One append per call, before anything is sealed.
        keyring.finish_access(access)?;
        Ok(SealPlan {
            records,
            owners,
            keys,
            lookup,
            keyring,
        })
    }

    /// The first record a strict table would refuse: its owner is not in
    /// the roll-out, so it would be written unsealed.
    fn first_refused(&self) -> Option<usize> {
        if !R::HAS_ENCRYPTED_FLAG || !self.keyring.is_strict(R::TABLE) {
            return None;
        }
        self.owners
            .iter()
            .position(|owner| !self.keys.contains_key(owner.as_ref()))
    }

    /// Seals the records of `range`, in order.
    fn seal(
        &self,
        range: std::ops::Range<usize>,
        parallel_min_rows: usize,
    ) -> Result<Vec<R::Sealed>> {
        let sealed = seal_records(
            &self.records[range.clone()],
            &self.owners[range],
            &self.keys,
            self.lookup.clone(),
            parallel_min_rows,
        )?;
        refuse_unsealed_rows::<R>("writing", &sealed, self.keyring)?;
        Ok(sealed)
    }
}

/// Seals `records` (whose owners are `owners`) with resolved `keys`: on the
/// calling thread below `parallel_min_rows` records, on rayon's pool above.
fn seal_records<R: PhiRecord>(
    records: &[R],
    owners: &[Cow<'_, str>],
    keys: &HashMap<String, Arc<OwnerKeys>>,
    lookup: Option<Arc<OwnerKeys>>,
    parallel_min_rows: usize,
) -> Result<Vec<R::Sealed>> {
    let seal_into = |range: std::ops::Range<usize>, out: &mut Vec<R::Sealed>| {
        with_sealer(|sealer| {
            sealer.set_lookup_keys(lookup.clone());
            for (record, owner) in records[range.clone()].iter().zip(&owners[range]) {
                let keys = keys.get(owner.as_ref()).map(Arc::as_ref);
                out.push(record.seal_with(keys, sealer)?);
            }
            Ok(())
        })?
    };
    let len = records.len();
    crate::metrics::timed(crate::metrics::SEAL_DURATION_SECONDS, || {
        if len < parallel_min_rows {
            let mut out = Vec::with_capacity(len);
            seal_into(0..len, &mut out)?;
            return Ok(out);
        }
        in_blocks(
            (0..len)
                .step_by(BLOCK_ROWS)
                .map(|start| start..len.min(start + BLOCK_ROWS))
                .collect(),
            len,
            seal_into,
        )
    })
}

/// Rows from which [`PhiRecord::open_all_async`] (and so `load_async`)
/// opens a batch on `tokio::task::spawn_blocking` instead of the calling
/// task. Measured with `tests/async_measure.rs` (dev profile, a shared
/// 2-core machine): a `spawn_blocking` round trip costs about 46 µs and
/// opening a row of three encrypted fields about 11 µs. Below 16 rows
/// (about 180 µs, four hand-offs) the hand-off would cost more than it
/// frees the worker for; from 16 rows on the worker is released.
#[cfg(feature = "async")]
pub const ASYNC_OPEN_INLINE_MAX_ROWS: usize = 16;

/// Rows a pool thread takes at a time from a batch.
const BLOCK_ROWS: usize = 128;

/// Rows [`PhiRecord::load`] hands to a pool thread at a time while it reads
/// a result larger than
/// [`KeyringBuilder::parallel_min_rows`](crate::KeyringBuilder::parallel_min_rows).
///
/// Each chunk resolves its owners' keys in one batch (one key-store query
/// for those not cached), so a cold load of `n` distinct owners runs at most
/// one query per chunk; opening a chunk of four short fields a row takes
/// about 0.5–1 ms, long enough that handing it over costs nothing
/// measurable, short enough that the calling thread waits little for the
/// last one.
pub const LOAD_CHUNK_ROWS: usize = 1024;

/// Gives an application's SQLite connection without a busy timeout
/// phi's ([`crate::sqlite`]) before phi's statement on it.
fn prepare_connection<C: 'static>(conn: &mut C, table: &'static str) -> Result<()> {
    crate::connection::prepare_application_connection(conn).map_err(|source| Error::Database {
        operation: "giving the application's SQLite connection a busy timeout",
        table,
        source,
    })
}

fn loading_error<R: PhiRecord>(source: diesel::result::Error) -> Error {
    Error::Database {
        operation: "loading sealed rows",
        table: R::TABLE,
        source,
    }
}

/// [`PhiRecord::load`] once the query runs: `rows` are Diesel's rows as it
/// reads them.
fn load_rows<R: PhiRecord>(
    mut rows: impl Iterator<Item = diesel::QueryResult<R::Sealed>>,
    keyring: &Keyring,
) -> Result<Vec<R>> {
    // A result smaller than the first chunk is opened as `open_all` opens a
    // batch: on the calling thread below `parallel_min_rows`, else spread
    // over every core.
    let first_chunk = keyring.parallel_min_rows().max(LOAD_CHUNK_ROWS);
    let mut first = Vec::new();
    for row in rows.by_ref() {
        first.push(row.map_err(loading_error::<R>)?);
        if first.len() >= first_chunk {
            break;
        }
    }
    if first.len() < first_chunk {
        return R::open_all(first, keyring);
    }
    // One batch of records for the whole load, appended once every chunk
    // is opened, before any row is returned.
    let mut access =
        keyring.begin_access(AccessOp::Read, R::TABLE, R::ENCRYPTED_COLUMNS, || {
            first_owner(first.iter().map(SealedRecord::owner_id))
        })?;
    let failed = std::sync::atomic::AtomicBool::new(false);
    let (done, opened) = std::sync::mpsc::channel::<(usize, Result<Vec<R>>)>();
    let mut read_error = None;
    let mut chunks = 0;
    rayon::in_place_scope(|scope| {
        let mut chunk = first;
        loop {
            while chunk.len() < LOAD_CHUNK_ROWS {
                match rows.next() {
                    Some(Ok(row)) => chunk.push(row),
                    Some(Err(source)) => {
                        read_error = Some(loading_error::<R>(source));
                        break;
                    }
                    None => break,
                }
            }
            let last = chunk.len() < LOAD_CHUNK_ROWS;
            if !chunk.is_empty() {
                let (index, done, failed) = (chunks, done.clone(), &failed);
                let block = std::mem::replace(&mut chunk, Vec::with_capacity(LOAD_CHUNK_ROWS));
                chunks += 1;
                if let Some(batch) = &mut access {
                    for row in &block {
                        batch.add(&row.owner_id(), row.row_text());
                    }
                }
                // A first chunk larger than a chunk (a high
                // `parallel_min_rows`) is itself shared between the pool's
                // threads.
                let parallel = if block.len() > LOAD_CHUNK_ROWS {
                    keyring.parallel_min_rows()
                } else {
                    usize::MAX
                };
                scope.spawn(move |_| {
                    let result = open_batch::<R>(block, keyring, parallel);
                    if result.is_err() {
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    // The receiver lives until the scope has ended.
                    let _ = done.send((index, result));
                });
            }
            if last || failed.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
        }
    });
    drop(done);
    let mut parts: Vec<(usize, Result<Vec<R>>)> = opened.into_iter().collect();
    parts.sort_unstable_by_key(|(index, _)| *index);
    let mut out = Vec::with_capacity(parts.len() * LOAD_CHUNK_ROWS);
    for (_, part) in parts {
        out.append(&mut part?);
    }
    match read_error {
        Some(error) => Err(error),
        None => {
            keyring.finish_access(access)?;
            Ok(out)
        }
    }
}

/// The first of `owners`, for an error naming the owner of a call.
fn first_owner<'o>(mut owners: impl Iterator<Item = Cow<'o, str>>) -> String {
    owners.next().map(Cow::into_owned).unwrap_or_default()
}

/// The access records of a read of `rows` (its own operation `own`):
/// refused in strict mode without an accessor, `None` when nothing takes
/// them.
fn begin_read<R: PhiRecord>(
    own: AccessOp,
    rows: &[R::Sealed],
    keyring: &Keyring,
) -> Result<Option<AccessBatch>> {
    let mut access = keyring.begin_access(own, R::TABLE, R::ENCRYPTED_COLUMNS, || {
        first_owner(rows.iter().map(SealedRecord::owner_id))
    })?;
    if let Some(batch) = &mut access {
        for row in rows {
            batch.add(&row.owner_id(), row.row_text());
        }
    }
    Ok(access)
}

/// The access records of an insert of `records` (whose owners are
/// `owners`).
fn begin_insert<R: PhiRecord>(
    records: &[R],
    owners: &[Cow<'_, str>],
    keyring: &Keyring,
) -> Result<Option<AccessBatch>> {
    let mut access =
        keyring.begin_access(AccessOp::Insert, R::TABLE, R::ENCRYPTED_COLUMNS, || {
            owners
                .first()
                .map(|o| o.clone().into_owned())
                .unwrap_or_default()
        })?;
    if let Some(batch) = &mut access {
        for (record, owner) in records.iter().zip(owners) {
            batch.add(owner, record.row_key_text());
        }
    }
    Ok(access)
}

/// [`PhiRecord::open_all`], and one chunk of a pipelined
/// [`PhiRecord::load`]: a strict table's unsealed row refused, the owners
/// resolved in one batch, the rows opened in order (on the pool from
/// `parallel_min_rows` rows).
fn open_batch<R: PhiRecord>(
    rows: Vec<R::Sealed>,
    keyring: &Keyring,
    parallel_min_rows: usize,
) -> Result<Vec<R>> {
    refuse_unsealed_rows::<R>("reading", &rows, keyring)?;
    let keys = resolve_for_open(&rows, keyring)?;
    open_rows(rows, &keys, parallel_min_rows)
}

/// Runs `work` over each block on rayon's global pool (the calling thread
/// waits, or works too when it is one of the pool's). The outputs are
/// concatenated in block order (`len` in all); when blocks fail, the error
/// returned is that of the first failing block in order, so of the first
/// failing row.
fn in_blocks<B, U, F>(blocks: Vec<B>, len: usize, work: F) -> Result<Vec<U>>
where
    B: Send,
    U: Send,
    F: Fn(B, &mut Vec<U>) -> Result<()> + Sync,
{
    use rayon::prelude::*;
    let done: Vec<Result<Vec<U>>> = blocks
        .into_par_iter()
        .map(|block| {
            let mut out = Vec::with_capacity(BLOCK_ROWS);
            work(block, &mut out).map(|()| out)
        })
        .collect();
    let mut out = Vec::with_capacity(len);
    for block in done {
        out.append(&mut block?);
    }
    Ok(out)
}

fn resolve_for_open<S: SealedRecord>(
    rows: &[S],
    keyring: &Keyring,
) -> Result<HashMap<String, Arc<OwnerKeys>>> {
    let owners = owners_and_versions(rows);
    let since = keyring.fill_mark();
    let mut keys = keyring.keys_for_open_many(owners.iter().map(|(o, _)| o.as_ref()))?;
    let stale = stale_owners(&owners, &keys, keyring, since);
    if !stale.is_empty() {
        keys.extend(keyring.reload_for_open(&stale)?);
    }
    Ok(keys)
}

/// [`resolve_for_open`] without blocking the task's thread, for the owners
/// and versions of [`owned_owners_and_versions`].
#[cfg(feature = "async")]
async fn resolve_for_open_async(
    owners: Vec<(Cow<'static, str>, Vec<u32>)>,
    keyring: &Keyring,
) -> Result<HashMap<String, Arc<OwnerKeys>>> {
    let since = keyring.fill_mark();
    let names: Vec<&str> = owners.iter().map(|(o, _)| o.as_ref()).collect();
    let mut keys = keyring.keys_for_open_many_async(names).await?;
    let stale = stale_owners(&owners, &keys, keyring, since);
    if !stale.is_empty() {
        keys.extend(keyring.reload_for_open_async(&stale).await?);
    }
    Ok(keys)
}

/// [`owners_and_versions`], owned: the future that resolves them need not
/// hold the rows.
#[cfg(feature = "async")]
fn owned_owners_and_versions<S: SealedRecord>(rows: &[S]) -> Vec<(Cow<'static, str>, Vec<u32>)> {
    owners_and_versions(rows)
        .into_iter()
        .map(|(owner, versions)| (Cow::Owned(owner.into_owned()), versions))
        .collect()
}

/// Owners whose cached keys lack a version their rows name.
fn stale_owners<'o>(
    owners: &'o [(Cow<'_, str>, Vec<u32>)],
    keys: &HashMap<String, Arc<OwnerKeys>>,
    keyring: &Keyring,
    since: u64,
) -> Vec<(&'o str, &'o [u32])> {
    // A version missing from the cache was added (rotated) by another
    // process since the owner was cached: reload those owners once (unless
    // the version was found missing moments ago: a tampered header).
    owners
        .iter()
        .filter(|(owner, versions)| {
            keys.get(owner.as_ref())
                .is_some_and(|k| keyring.needs_reload(k, versions, since))
        })
        .map(|(owner, versions)| (owner.as_ref(), versions.as_slice()))
        .collect()
}

/// Each owner of the sealed rows once, in the order of the rows, with the
/// key versions its rows name (read from the envelope headers).
fn owners_and_versions<S: SealedRecord>(rows: &[S]) -> Vec<(Cow<'_, str>, Vec<u32>)> {
    let mut index: HashMap<Cow<'_, str>, usize> = HashMap::new();
    let mut owners: Vec<(Cow<'_, str>, Vec<u32>)> = Vec::new();
    for row in rows.iter().filter(|r| r.is_encrypted()) {
        let at = *index.entry(row.owner_id()).or_insert_with_key(|owner| {
            owners.push((owner.clone(), Vec::new()));
            owners.len() - 1
        });
        let versions = &mut owners[at].1;
        row.key_versions(&mut |v| {
            if !versions.contains(&v) {
                versions.push(v);
            }
        });
    }
    owners
}

/// [`PhiRecord::open_each`] once the keys are resolved: each row opened on
/// its own, a flag-off row of a strict table refused.
fn open_each_row<R: PhiRecord>(
    rows: Vec<R::Sealed>,
    keys: &HashMap<String, Arc<OwnerKeys>>,
    keyring: &Keyring,
) -> Vec<Result<R>> {
    let strict = R::HAS_ENCRYPTED_FLAG && keyring.is_strict(R::TABLE);
    crate::metrics::timed(crate::metrics::OPEN_DURATION_SECONDS, || {
        rows.into_iter()
            .map(|row| {
                if strict && !row.is_encrypted() {
                    return Err(strict_error::<R>(
                        "reading",
                        &row.owner_id(),
                        row.row_text(),
                    ));
                }
                open_row(row, keys)
            })
            .collect()
    })
}

fn open_row<R: PhiRecord>(row: R::Sealed, keys: &HashMap<String, Arc<OwnerKeys>>) -> Result<R> {
    if !row.is_encrypted() {
        return R::open_with(row, None);
    }
    // The owner's `Cow` borrows the row: dropped before the row moves.
    let k = {
        let owner = row.owner_id();
        keys.get(owner.as_ref())
            .ok_or_else(|| Error::KeyUnavailable {
                owner: owner.into_owned(),
                reason: "keys were not resolved".into(),
            })?
    };
    R::open_with(row, Some(k))
}

fn open_rows<R: PhiRecord>(
    rows: Vec<R::Sealed>,
    keys: &HashMap<String, Arc<OwnerKeys>>,
    parallel_min_rows: usize,
) -> Result<Vec<R>> {
    let len = rows.len();
    let open_into = |rows: Vec<R::Sealed>, out: &mut Vec<R>| {
        for row in rows {
            out.push(open_row::<R>(row, keys)?);
        }
        Ok(())
    };
    crate::metrics::timed(crate::metrics::OPEN_DURATION_SECONDS, || {
        if len < parallel_min_rows {
            let mut out = Vec::with_capacity(len);
            open_into(rows, &mut out)?;
            return Ok(out);
        }
        let mut blocks = Vec::with_capacity(len.div_ceil(BLOCK_ROWS));
        let mut rows = rows.into_iter();
        loop {
            let block: Vec<R::Sealed> = rows.by_ref().take(BLOCK_ROWS).collect();
            if block.is_empty() {
                break;
            }
            blocks.push(block);
        }
        in_blocks(blocks, len, open_into)
    })
}

/// The stored (sealed) form of a [`PhiRecord`]; implemented by the derive.
pub trait SealedRecord {
    /// The owner whose data key sealed this row.
    fn owner_id(&self) -> Cow<'_, str>;

    /// Whether the row's encrypted columns hold envelopes (always, for a
    /// model without an encrypted flag).
    fn is_encrypted(&self) -> bool;

    /// Calls `f` with the key version of each sealed value of the row
    /// (read from the envelope headers, no decryption).
    fn key_versions(&self, f: &mut dyn FnMut(u32));

    /// The row's key as text, for errors ([`RowKey::row_text`]); `None` for
    /// a model without a `#[phi(row_key)]`.
    fn row_text(&self) -> Option<String> {
        None
    }

    /// Calls `f` with the column and bytes of each non-NULL value of the
    /// encrypted fields of a row whose flag is off, as the legacy records
    /// hold them (a shadow field's plain column in its plain encoding).
    /// Generated for models with a row key and an encrypted flag; none
    /// otherwise.
    #[doc(hidden)]
    fn unsealed_values(&self, f: &mut dyn FnMut(&'static str, &[u8])) {
        let _ = f;
    }

    /// Puts `plain`, a legacy value's plaintext, in `column` of a row whose
    /// flag is off, in place of the legacy value.
    ///
    /// # Errors
    /// [`DecodeError`](crate::value::DecodeError) when `plain` is not an
    /// encoding of the field's type.
    #[doc(hidden)]
    fn set_unsealed(
        &mut self,
        column: &str,
        plain: Vec<u8>,
    ) -> std::result::Result<(), crate::value::DecodeError> {
        let _ = (column, plain);
        Ok(())
    }
}

/// The rows a lookup finder loaded, opened: the rows of crypto-shredded
/// owners are left out (unreadable by design: counted in a log event that
/// names no owner), any other row that does not open fails the finder with
/// an error naming the table, column, owner and row.
pub(crate) fn open_found<R: PhiRecord>(rows: Vec<R::Sealed>, keyring: &Keyring) -> Result<Vec<R>> {
    refuse_unsealed_rows::<R>("reading", &rows, keyring)?;
    let located = locate_rows(&rows);
    let opened = R::open_each(rows, &keyring.for_operation(AccessOp::Lookup))?;
    let keyless = keyless_owners(&located, &opened);
    let shredded = keyring.shredded_owners(keyless.iter().map(String::as_str))?;
    keep_found::<R>(located, opened, &shredded)
}

/// [`open_found`] without blocking the task's thread.
#[cfg(feature = "async")]
pub(crate) async fn open_found_async<R>(rows: Vec<R::Sealed>, keyring: &Keyring) -> Result<Vec<R>>
where
    R: PhiRecord + 'static,
    R::Sealed: 'static,
{
    refuse_unsealed_rows::<R>("reading", &rows, keyring)?;
    let located = locate_rows(&rows);
    let opened = R::open_each_async(rows, &keyring.for_operation(AccessOp::Lookup)).await?;
    let keyless = keyless_owners(&located, &opened);
    let shredded = keyring.shredded_owners_async(keyless).await?;
    keep_found::<R>(located, opened, &shredded)
}

/// Each row's owner and key (as text), before the rows are opened.
fn locate_rows<S: SealedRecord>(rows: &[S]) -> Vec<(String, Option<String>)> {
    rows.iter()
        .map(|r| (r.owner_id().into_owned(), r.row_text()))
        .collect()
}

/// The owners of rows that failed for want of a key version: those the key
/// store may know as shredded.
fn keyless_owners<R>(located: &[(String, Option<String>)], opened: &[Result<R>]) -> Vec<String> {
    let mut owners: Vec<String> = located
        .iter()
        .zip(opened)
        .filter(|(_, r)| matches!(r, Err(Error::UnknownKeyVersion { .. })))
        .map(|((owner, _), _)| owner.clone())
        .collect();
    owners.sort_unstable();
    owners.dedup();
    owners
}

fn keep_found<R: PhiRecord>(
    located: Vec<(String, Option<String>)>,
    opened: Vec<Result<R>>,
    shredded: &HashSet<String>,
) -> Result<Vec<R>> {
    let mut kept = Vec::with_capacity(opened.len());
    let mut left_out = 0u64;
    for ((owner, row), result) in located.into_iter().zip(opened) {
        match result {
            Ok(record) => kept.push(record),
            Err(Error::Shredded { .. }) => left_out += 1,
            Err(Error::UnknownKeyVersion { .. }) if shredded.contains(&owner) => left_out += 1,
            Err(error) => return Err(found_error::<R>(error, owner, row)),
        }
    }
    if left_out > 0 {
        tracing::info!(
            table = R::TABLE,
            rows = left_out,
            "lookup: rows of crypto-shredded owners left out"
        );
    }
    Ok(kept)
}

/// A finder's row that does not open, as an error naming the table,
/// column, owner and row (the opening error follows as its source).
fn found_error<R: PhiRecord>(error: Error, owner: String, row: Option<String>) -> Error {
    let scope = match &error {
        Error::Decrypt { scope, .. }
        | Error::Decode { scope, .. }
        | Error::Malformed { scope, .. }
        | Error::UnknownKeyVersion { scope, .. } => scope.clone(),
        _ => return error,
    };
    let column = scope
        .strip_prefix(R::TABLE)
        .and_then(|c| c.strip_prefix('.'))
        .unwrap_or(&scope)
        .to_owned();
    let row = row.unwrap_or_else(|| "?".to_owned());
    Error::DataTable {
        operation: "finding records by a lookup index",
        table: R::TABLE.to_owned(),
        column,
        owner,
        source: format!("row {row:?}: {error}").into(),
    }
}

/// [`Error::Strict`] for a row of `R`'s table.
pub(crate) fn strict_error<R: PhiRecord>(
    operation: &'static str,
    owner: &str,
    row: Option<String>,
) -> Error {
    Error::Strict {
        operation,
        table: R::TABLE.to_owned(),
        column: R::ENCRYPTED_FLAG.unwrap_or("encrypted flag").to_owned(),
        row: row.unwrap_or_else(|| "?".to_owned()),
        owner: owner.to_owned(),
    }
}

/// In strict mode, the first row of `rows` whose flag is off, as an error.
fn refuse_unsealed_rows<R: PhiRecord>(
    operation: &'static str,
    rows: &[R::Sealed],
    keyring: &Keyring,
) -> Result<()> {
    if !R::HAS_ENCRYPTED_FLAG || !keyring.is_strict(R::TABLE) {
        return Ok(());
    }
    match rows.iter().find(|r| !r.is_encrypted()) {
        Some(row) => Err(strict_error::<R>(
            operation,
            &row.owner_id(),
            row.row_text(),
        )),
        None => Ok(()),
    }
}

/// A field that names an owner: `#[phi(owner)]`.
pub trait OwnerId {
    /// The owner id, as stored in the key tables.
    fn owner_id(&self) -> Cow<'_, str>;
}

impl OwnerId for String {
    fn owner_id(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

impl OwnerId for str {
    fn owner_id(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

macro_rules! owner_id_int {
    ($($t:ty),*) => {$(
        impl OwnerId for $t {
            fn owner_id(&self) -> Cow<'_, str> {
                Cow::Owned(self.to_string())
            }
        }
    )*};
}
owner_id_int!(i16, i32, i64, u16, u32, u64);

/// A UUID owner is its lowercase hyphenated text
/// (`6f1c2a4e-8b5d-4e1f-9a7c-3d2b1e0f4a5c`): the owner id in the key tables,
/// the audit log and the `phi` command, and the bytes bound into its values.
#[cfg(feature = "uuid")]
#[cfg_attr(docsrs, doc(cfg(feature = "uuid")))]
impl OwnerId for uuid::Uuid {
    fn owner_id(&self) -> Cow<'_, str> {
        Cow::Owned(self.hyphenated().to_string())
    }
}

/// The bytes of a row key, bound into every value sealed in its row.
#[derive(Clone, Copy, Debug)]
pub enum RowKeyBytes<'a> {
    /// Borrowed from the field (strings, byte vectors).
    Borrowed(&'a [u8]),
    /// An integer, big-endian.
    Inline([u8; 8], u8),
    /// A UUID, as its lowercase hyphenated text (36 bytes).
    Hyphenated([u8; 36]),
}

impl std::ops::Deref for RowKeyBytes<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            RowKeyBytes::Borrowed(bytes) => bytes,
            RowKeyBytes::Inline(buf, len) => &buf[..usize::from(*len)],
            RowKeyBytes::Hyphenated(text) => text,
        }
    }
}

/// A field that identifies its row: `#[phi(row_key)]`. Each sealed value is
/// bound to these bytes, so a ciphertext copied to another row does not
/// open.
///
/// Strings and byte vectors bind their bytes; integers their big-endian
/// bytes; a `uuid::Uuid` (feature `uuid`) its lowercase hyphenated text,
/// the same bytes as a `String` holding that text, so a text key column
/// holding UUIDs can become a UUID column without re-sealing. The row key must be known before the row is inserted (an
/// application-assigned id, not an auto-increment one).
pub trait RowKey {
    /// The bytes bound into the row's sealed values.
    fn row_key(&self) -> RowKeyBytes<'_>;

    /// The key as text, for errors: the string, the number, or the bytes in
    /// hexadecimal.
    fn row_text(&self) -> String {
        self.row_key().iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl RowKey for String {
    fn row_key(&self) -> RowKeyBytes<'_> {
        RowKeyBytes::Borrowed(self.as_bytes())
    }

    fn row_text(&self) -> String {
        self.clone()
    }
}

impl RowKey for Vec<u8> {
    fn row_key(&self) -> RowKeyBytes<'_> {
        RowKeyBytes::Borrowed(self)
    }
}

macro_rules! row_key_int {
    ($($t:ty),*) => {$(
        impl RowKey for $t {
            fn row_key(&self) -> RowKeyBytes<'_> {
                let bytes = self.to_be_bytes();
                let mut buf = [0u8; 8];
                buf[..bytes.len()].copy_from_slice(&bytes);
                #[allow(clippy::cast_possible_truncation)] // at most 8
                RowKeyBytes::Inline(buf, bytes.len() as u8)
            }

            fn row_text(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
row_key_int!(i16, i32, i64, u16, u32, u64);

/// A UUID row key binds its lowercase hyphenated text, whatever the column
/// stores (PostgreSQL `uuid`, 16 bytes in MySQL or SQLite).
#[cfg(feature = "uuid")]
#[cfg_attr(docsrs, doc(cfg(feature = "uuid")))]
impl RowKey for uuid::Uuid {
    fn row_key(&self) -> RowKeyBytes<'_> {
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        self.hyphenated().encode_lower(&mut text);
        RowKeyBytes::Hyphenated(text)
    }
}

/// A column that marks rows whose encrypted fields hold envelopes:
/// `#[phi(encrypted_flag)]`. `bool` or an integer (1 on, 0 off).
pub trait EncryptedFlag {
    /// The stored flag for a row that is (`true`) or is not sealed.
    fn from_encrypted(encrypted: bool) -> Self;
    /// Whether this flag marks a sealed row.
    fn is_encrypted(&self) -> bool;
    /// Whether the column is a SQL boolean (else an integer, 1 on, 0 off),
    /// for the migration jobs' SQL.
    const SQL_BOOL: bool = false;
}

impl EncryptedFlag for bool {
    const SQL_BOOL: bool = true;
    fn from_encrypted(encrypted: bool) -> Self {
        encrypted
    }
    fn is_encrypted(&self) -> bool {
        *self
    }
}

macro_rules! flag_int {
    ($($t:ty),*) => {$(
        impl EncryptedFlag for $t {
            fn from_encrypted(encrypted: bool) -> Self {
                <$t>::from(encrypted)
            }
            fn is_encrypted(&self) -> bool {
                *self != 0
            }
        }
    )*};
}
flag_int!(i16, i32, i64, u8, u16, u32, u64);

impl EncryptedFlag for i8 {
    fn from_encrypted(encrypted: bool) -> Self {
        i8::from(encrypted)
    }
    fn is_encrypted(&self) -> bool {
        *self != 0
    }
}

/// What a guarded update did: the outcome of the `update` method that
/// `#[derive(PhiRecord)]` generates for a model with a `#[phi(row_key)]`
/// (`edited.update(&old, &keyring, &mut conn)`).
///
/// The update is written only while the stored row is still what `old` was
/// read as: the same row key and owner and, for a model with an encrypted
/// flag, the same flag. Its values are sealed (or stored plain) and bound
/// for exactly that state, so a row a backfill sealed, a decrypt-back
/// unsealed, or a process with another roll-out rewrote since it was read
/// is never given a value of the other kind.
#[must_use = "a conflict or a missing row means nothing was written"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Updated {
    /// The changed columns were written.
    Applied {
        /// Whether the row is stored sealed (flag on) after the update:
        /// always for a model without an encrypted flag.
        sealed: bool,
    },
    /// Nothing was written: the row's encrypted flag (or owner) changed
    /// since `old` was read. Load the row again, make the same edit to it
    /// and update again.
    Conflict,
    /// Nothing was written: no row has `old`'s row key any more.
    NotFound,
    /// Nothing differs from `old`: no statement was sent.
    Unchanged,
}

impl Updated {
    /// Whether the row now holds the edit ([`Applied`](Self::Applied) or
    /// [`Unchanged`](Self::Unchanged)).
    pub fn is_done(self) -> bool {
        matches!(self, Updated::Applied { .. } | Updated::Unchanged)
    }
}

/// Support for the code `#[derive(PhiRecord)]` generates; re-exported as
/// `phi_types::__private`, not a public API.
// Not documented for users (the re-export is hidden): the errors are those
// of the documented calls the generated code makes through it.
#[allow(clippy::missing_errors_doc)]
pub(crate) mod __private {
    use std::fmt;

    use crate::blind::{CompoundIndex, DerivedIndex, Normalize};
    use crate::error::{Error, Result};
    use crate::keyring::OwnerKeys;
    use crate::sealer::Sealer;
    use crate::sql::Encrypted;
    use crate::value::PhiValue;

    #[cfg(feature = "async")]
    pub use diesel_async;
    pub use std::borrow::Cow;

    /// Seals `value`, or stores it unsealed when `keys` is `None` (a row
    /// whose encrypted flag is off).
    pub fn seal<T: PhiValue>(
        keys: Option<&OwnerKeys>,
        sealer: &mut Sealer<'_>,
        value: &T,
        scope: &str,
        row: &[u8],
    ) -> Result<Encrypted<T>> {
        match keys {
            Some(keys) => sealer.seal(keys, value, scope, row),
            None => Ok(Encrypted::unsealed(value)),
        }
    }

    /// [`seal`] for a nullable column.
    pub fn seal_opt<T: PhiValue>(
        keys: Option<&OwnerKeys>,
        sealer: &mut Sealer<'_>,
        value: Option<&T>,
        scope: &str,
        row: &[u8],
    ) -> Result<Option<Encrypted<T>>> {
        value.map(|v| seal(keys, sealer, v, scope, row)).transpose()
    }

    /// Opens `value` with `keys`, or decodes it unsealed when `keys` is
    /// `None` (a row whose encrypted flag is off).
    pub fn open<T: PhiValue>(
        keys: Option<&OwnerKeys>,
        value: Encrypted<T>,
        scope: &str,
        row: &[u8],
        owner: &str,
    ) -> Result<T> {
        match keys {
            Some(keys) => keys.open(value, scope, row),
            None => value.into_unsealed().map_err(|source| Error::Unsealed {
                scope: scope.to_owned(),
                owner: owner.to_owned(),
                source,
            }),
        }
    }

    /// [`open`] for a nullable column.
    pub fn open_opt<T: PhiValue>(
        keys: Option<&OwnerKeys>,
        value: Option<Encrypted<T>>,
        scope: &str,
        row: &[u8],
        owner: &str,
    ) -> Result<Option<T>> {
        value.map(|v| open(keys, v, scope, row, owner)).transpose()
    }

    /// The blind index to store beside a sealed value; `None` for an
    /// unsealed row.
    pub fn blind<T: PhiValue>(
        keys: Option<&OwnerKeys>,
        value: Option<&T>,
        scope: &str,
        normalize: Normalize,
    ) -> Result<Option<Vec<u8>>> {
        match (keys, value) {
            (Some(keys), Some(value)) => keys.blind_index(scope, value, normalize).map(Some),
            _ => Ok(None),
        }
    }

    /// The derived index tag to store beside a sealed value; `None` for an
    /// unsealed row or a null.
    pub fn derived<T: PhiValue>(
        keys: Option<&OwnerKeys>,
        value: Option<&T>,
        scope: &str,
        index: DerivedIndex,
    ) -> Result<Option<Vec<u8>>> {
        match (keys, value) {
            (Some(keys), Some(value)) => keys.derived_index(scope, value, &index).map(Some),
            _ => Ok(None),
        }
    }

    /// The tags a derived-index finder looks `probes` up by, for `owner`'s
    /// rows of `table` (recorded as a lookup of `column`).
    #[allow(clippy::too_many_arguments)]
    pub fn derived_tags(
        keyring: &crate::Keyring,
        table: &str,
        owner: &str,
        column: &str,
        scope: &str,
        index: DerivedIndex,
        probes: &[&[u8]],
    ) -> Result<Vec<Vec<u8>>> {
        let access = begin_lookup(keyring, table, owner, column)?;
        let keys = keyring.keys_for_open(owner)?;
        lookup_done(keyring, access, keys.derived_probes(scope, &index, probes))
    }

    /// [`derived_tags`] for async code: keys resolved without blocking.
    #[cfg(feature = "async")]
    #[allow(clippy::too_many_arguments)]
    pub async fn derived_tags_async(
        keyring: &crate::Keyring,
        table: &str,
        owner: &str,
        column: &str,
        scope: &str,
        index: DerivedIndex,
        probes: &[&[u8]],
    ) -> Result<Vec<Vec<u8>>> {
        let access = begin_lookup(keyring, table, owner, column)?;
        let keys = keyring.keys_for_open_async(owner).await?;
        lookup_done(keyring, access, keys.derived_probes(scope, &index, probes))
    }

    /// The compound index tag to store beside a sealed row: `None` for an
    /// unsealed row or when a field is NULL.
    pub fn compound(
        keys: Option<&OwnerKeys>,
        parts: &[Option<zeroize::Zeroizing<Vec<u8>>>],
        scope: &str,
        index: CompoundIndex,
    ) -> Result<Option<Vec<u8>>> {
        let Some(keys) = keys else {
            return Ok(None);
        };
        let Some(parts) = all_present(parts) else {
            return Ok(None);
        };
        keys.compound_index_encoded(None, scope, &parts, &index)
    }

    /// The tags a compound-index finder looks the fields' encodings
    /// `parts` up by, for `owner`'s rows of `table` (recorded as a lookup
    /// of `fields`).
    #[allow(clippy::too_many_arguments)]
    pub fn compound_tags(
        keyring: &crate::Keyring,
        table: &str,
        owner: &str,
        fields: &[&str],
        scope: &str,
        index: CompoundIndex,
        parts: &[&[u8]],
    ) -> Result<Vec<Vec<u8>>> {
        let access = begin_lookup_of(keyring, table, owner, fields)?;
        let keys = keyring.keys_for_open(owner)?;
        lookup_done(keyring, access, keys.compound_probes(scope, &index, parts))
    }

    /// [`compound_tags`] for async code: keys resolved without blocking.
    #[cfg(feature = "async")]
    #[allow(clippy::too_many_arguments)]
    pub async fn compound_tags_async(
        keyring: &crate::Keyring,
        table: &str,
        owner: &str,
        fields: &[&str],
        scope: &str,
        index: CompoundIndex,
        parts: &[&[u8]],
    ) -> Result<Vec<Vec<u8>>> {
        let access = begin_lookup_of(keyring, table, owner, fields)?;
        let keys = keyring.keys_for_open_async(owner).await?;
        lookup_done(keyring, access, keys.compound_probes(scope, &index, parts))
    }

    /// Whether an opened record's fields (their encodings, `None` for a
    /// NULL) equal a compound finder's probes exactly.
    pub fn compound_keeps(
        index: CompoundIndex,
        values: &[Option<zeroize::Zeroizing<Vec<u8>>>],
        probes: &[&[u8]],
    ) -> bool {
        let Some(values) = all_present(values) else {
            return false;
        };
        index.matches(&values, probes)
    }

    /// The fields' encodings as slices, or `None` when one is NULL.
    fn all_present(parts: &[Option<zeroize::Zeroizing<Vec<u8>>>]) -> Option<Vec<&[u8]>> {
        parts
            .iter()
            .map(|p| p.as_deref().map(Vec::as_slice))
            .collect()
    }

    /// Appends a finder's lookup record once its tags are computed
    /// (`tags`), and returns them; a failed computation records nothing.
    fn lookup_done(
        keyring: &crate::Keyring,
        access: Access,
        tags: Result<Vec<Vec<u8>>>,
    ) -> Result<Vec<Vec<u8>>> {
        let tags = tags?;
        finish_lookup(keyring, access)?;
        Ok(tags)
    }

    /// A value's encoding, wiped on drop: a finder's probe.
    pub fn encoded<T: PhiValue>(value: &T) -> zeroize::Zeroizing<Vec<u8>> {
        let mut out = zeroize::Zeroizing::new(Vec::with_capacity(value.encoded_len()));
        value.encode(&mut out);
        out
    }

    /// Whether an opened value answers a derived-index finder's `probe`
    /// exactly ([`DerivedIndex::matches`]); a null never does.
    pub fn derived_keeps<T: PhiValue>(
        value: Option<&T>,
        index: DerivedIndex,
        probe: &[u8],
    ) -> bool {
        value.is_some_and(|value| index.matches(&encoded(value), probe))
    }

    /// The bucket probes of a date range for a `year` or `year_month`
    /// index on `scope`: at most [`MAX_RANGE_BUCKETS`].
    pub fn derived_range<T: crate::blind::DateParts>(
        scope: &str,
        index: DerivedIndex,
        from: &T,
        to: &T,
    ) -> Result<Vec<Vec<u8>>> {
        index
            .range_probes(from.year_month(), to.year_month(), MAX_RANGE_BUCKETS)
            .map_err(|reason| Error::InvalidInput {
                what: "date range",
                reason: format!("{scope} ({}): {reason}", index.spec()),
            })
    }

    /// The most buckets a range finder looks up in one query.
    pub const MAX_RANGE_BUCKETS: usize = 1_200;

    /// Whether an opened value lies in `from..=to`; a null never does.
    pub fn in_range<T: PartialOrd>(value: Option<&T>, from: &T, to: &T) -> bool {
        value.is_some_and(|value| from <= value && value <= to)
    }

    /// The lookup value to store beside a value (sealed or not): under the
    /// current version of `lookup`, the keys of
    /// [`LOOKUP_OWNER`](crate::keyring::LOOKUP_OWNER); `None` for a NULL.
    pub fn lookup<T: PhiValue>(
        lookup: Option<&OwnerKeys>,
        value: Option<&T>,
        scope: &str,
        normalize: Normalize,
    ) -> Result<Option<Vec<u8>>> {
        let Some(value) = value else {
            return Ok(None);
        };
        let keys = lookup.ok_or_else(|| Error::KeyUnavailable {
            owner: crate::keyring::LOOKUP_OWNER.to_owned(),
            reason: format!("the lookup-index keys were not resolved to index {scope}"),
        })?;
        crate::lookup_key::current_index(keys, scope, value, normalize).map(Some)
    }

    /// Whether `found` (an opened value) equals `wanted` once both are
    /// encoded and normalised: the check a lookup's candidates pass.
    pub fn lookup_matches<T: PhiValue>(found: &T, wanted: &T, normalize: Normalize) -> bool {
        let encode = |v: &T| {
            let mut out = zeroize::Zeroizing::new(Vec::with_capacity(v.encoded_len()));
            v.encode(&mut out);
            out
        };
        let (a, b) = (encode(found), encode(wanted));
        normalize.apply(&a) == normalize.apply(&b)
    }

    /// Loads and opens the rows `query` selects, as the lookup finders
    /// (`find_by_<field>`) do: rows of crypto-shredded owners left out, any
    /// other row that does not open an error naming the table, column,
    /// owner and row. One bound, which the generated finders put on their
    /// connection (a bound naming the query's concrete type, with no
    /// projection to normalise).
    pub trait LoadRecords<R: super::PhiRecord, Q>: diesel::Connection {
        /// [`PhiRecord::load`](super::PhiRecord::load).
        ///
        /// # Errors
        /// As [`PhiRecord::load`](super::PhiRecord::load).
        fn load_records(query: Q, conn: &mut Self, keyring: &crate::Keyring) -> Result<Vec<R>>;
    }

    impl<R, Q, C> LoadRecords<R, Q> for C
    where
        R: super::PhiRecord,
        R::Sealed: diesel::Selectable<C::Backend>,
        <R::Sealed as diesel::Selectable<C::Backend>>::SelectExpression:
            diesel::query_builder::QueryId,
        C: diesel::Connection + 'static,
        Q: diesel::query_dsl::methods::SelectDsl<diesel::dsl::AsSelect<R::Sealed, C::Backend>>,
        diesel::dsl::Select<Q, diesel::dsl::AsSelect<R::Sealed, C::Backend>>:
            diesel::query_dsl::LoadQuery<'static, C, R::Sealed> + diesel::RunQueryDsl<C>,
    {
        fn load_records(query: Q, conn: &mut C, keyring: &crate::Keyring) -> Result<Vec<R>> {
            use diesel::SelectableHelper as _;
            super::prepare_connection(conn, R::TABLE)?;
            let rows = diesel::RunQueryDsl::load(query.select(R::Sealed::as_select()), conn)
                .map_err(|source| Error::Database {
                    operation: "loading sealed rows",
                    table: R::TABLE,
                    source,
                })?;
            super::open_found(rows, keyring)
        }
    }

    /// [`LoadRecords`] on a diesel-async connection (feature `async`).
    #[cfg(feature = "async")]
    pub trait LoadRecordsAsync<R: super::PhiRecord, Q>: diesel_async::AsyncConnectionCore {
        /// [`PhiRecord::load_async`](super::PhiRecord::load_async).
        fn load_records_async<'a>(
            query: Q,
            conn: &'a mut Self,
            keyring: &'a crate::Keyring,
        ) -> impl std::future::Future<Output = Result<Vec<R>>> + Send + 'a
        where
            Q: 'a;
    }

    #[cfg(feature = "async")]
    impl<R, Q, C> LoadRecordsAsync<R, Q> for C
    where
        R: super::PhiRecord + 'static,
        R::Sealed: diesel::Selectable<C::Backend> + 'static,
        <R::Sealed as diesel::Selectable<C::Backend>>::SelectExpression:
            diesel::query_builder::QueryId,
        C: diesel_async::AsyncConnectionCore,
        Q: diesel::query_dsl::methods::SelectDsl<diesel::dsl::AsSelect<R::Sealed, C::Backend>>
            + Send,
        diesel::dsl::Select<Q, diesel::dsl::AsSelect<R::Sealed, C::Backend>>:
            diesel_async::methods::LoadQuery<'static, C, R::Sealed> + 'static,
    {
        // The trait's future is `Send` with the lifetimes written out.
        #[allow(clippy::manual_async_fn)]
        fn load_records_async<'a>(
            query: Q,
            conn: &'a mut C,
            keyring: &'a crate::Keyring,
        ) -> impl std::future::Future<Output = Result<Vec<R>>> + Send + 'a
        where
            Q: 'a,
        {
            async move {
                use diesel::SelectableHelper as _;
                let rows =
                    diesel_async::RunQueryDsl::load(query.select(R::Sealed::as_select()), conn)
                        .await
                        .map_err(|source| Error::Database {
                            operation: "loading sealed rows",
                            table: R::TABLE,
                            source,
                        })?;
                super::open_found_async(rows, keyring).await
            }
        }
    }

    /// Everything the generated code does with an encrypted field's type,
    /// behind one generic call: a type that is not a [`PhiValue`] is then
    /// reported once, at the field, not once per use.
    #[allow(clippy::type_complexity, missing_debug_implementations)]
    pub struct Ops<T> {
        /// [`seal`].
        pub seal: fn(Option<&OwnerKeys>, &mut Sealer<'_>, &T, &str, &[u8]) -> Result<Encrypted<T>>,
        /// [`seal_opt`].
        pub seal_opt: fn(
            Option<&OwnerKeys>,
            &mut Sealer<'_>,
            Option<&T>,
            &str,
            &[u8],
        ) -> Result<Option<Encrypted<T>>>,
        /// [`open`].
        pub open: fn(Option<&OwnerKeys>, Encrypted<T>, &str, &[u8], &str) -> Result<T>,
        /// [`open_opt`].
        pub open_opt:
            fn(Option<&OwnerKeys>, Option<Encrypted<T>>, &str, &[u8], &str) -> Result<Option<T>>,
        /// [`blind`].
        pub blind: fn(Option<&OwnerKeys>, Option<&T>, &str, Normalize) -> Result<Option<Vec<u8>>>,
        /// [`derived`].
        pub derived:
            fn(Option<&OwnerKeys>, Option<&T>, &str, DerivedIndex) -> Result<Option<Vec<u8>>>,
        /// [`OwnerKeys::blind_indexes`].
        pub indexes: fn(&OwnerKeys, &str, &T, Normalize) -> Vec<Vec<u8>>,
        /// [`lookup`].
        pub lookup: fn(Option<&OwnerKeys>, Option<&T>, &str, Normalize) -> Result<Option<Vec<u8>>>,
        /// [`lookup_matches`].
        pub lookup_matches: fn(&T, &T, Normalize) -> bool,
        /// [`Keyring::lookup_indexes`](crate::Keyring::lookup_indexes).
        pub lookup_indexes: fn(&crate::Keyring, &str, &T, Normalize) -> Result<Vec<Vec<u8>>>,
        /// Equality, to detect changed fields.
        pub eq: fn(&T, &T) -> bool,
        /// Equality of nullable fields.
        pub eq_opt: fn(&Option<T>, &Option<T>) -> bool,
        /// The plain encoding (a shadow field's value, as the legacy
        /// records hold it).
        pub encode: fn(&T) -> Vec<u8>,
        /// A value from its plain encoding (a legacy value's plaintext).
        pub decode: fn(Vec<u8>) -> std::result::Result<T, crate::value::DecodeError>,
        /// A legacy value's plaintext, checked and stored as an unsealed
        /// row holds it.
        pub unsealed: fn(Vec<u8>) -> std::result::Result<Encrypted<T>, crate::value::DecodeError>,
    }

    /// The [`Ops`] of `T`.
    pub fn ops<T: PhiValue>() -> Ops<T> {
        Ops {
            seal: seal::<T>,
            seal_opt: seal_opt::<T>,
            open: open::<T>,
            open_opt: open_opt::<T>,
            blind: blind::<T>,
            derived: derived::<T>,
            indexes: |keys, scope, value, normalize| keys.blind_indexes(scope, value, normalize),
            lookup: lookup::<T>,
            lookup_matches: lookup_matches::<T>,
            lookup_indexes: |keyring, scope, value, normalize| {
                keyring.lookup_indexes(scope, value, normalize)
            },
            eq: <T as PartialEq>::eq,
            eq_opt: <Option<T> as PartialEq>::eq,
            encode: |value| {
                let mut out = Vec::with_capacity(value.encoded_len());
                value.encode(&mut out);
                out
            },
            decode: T::decode,
            unsealed: |plain| T::decode(plain).map(|value| Encrypted::unsealed(&value)),
        }
    }

    /// The keys of a sealed row, or the error of a row the batch did not
    /// resolve keys for.
    pub fn keys_for_row<'k>(
        encrypted: bool,
        keys: Option<&'k OwnerKeys>,
        owner: &str,
        table: &str,
    ) -> Result<Option<&'k OwnerKeys>> {
        if !encrypted {
            return Ok(None);
        }
        match keys {
            Some(keys) if keys.owner() == owner => Ok(Some(keys)),
            Some(_) | None => Err(Error::KeyUnavailable {
                owner: owner.to_owned(),
                reason: format!("no data keys were resolved for a sealed row of {table}"),
            }),
        }
    }

    /// Whether an update seals a row stored unsealed: when the roll-out
    /// covers `owner`. Else, on a strict table
    /// ([`Keyring::set_strict`](crate::Keyring::set_strict)), the refusal
    /// to write the row unsealed. A keyring past its feed's maximum
    /// staleness refuses either way ([`Error::FeedStale`]).
    pub fn seals_unsealed_row(
        keyring: &crate::Keyring,
        table: &str,
        flag: &str,
        owner: &str,
        row: Option<String>,
    ) -> Result<bool> {
        if keyring.encrypts_for_write(owner)? {
            return Ok(true);
        }
        if keyring.is_strict(table) {
            return Err(Error::Strict {
                operation: "writing",
                table: table.to_owned(),
                column: flag.to_owned(),
                row: row.unwrap_or_else(|| "?".to_owned()),
                owner: owner.to_owned(),
            });
        }
        Ok(false)
    }

    /// A sealed row whose shadow column (`#[phi(encrypt, shadow)]`) is
    /// NULL although its field is not optional.
    pub fn shadow_missing(table: &str, column: &str, owner: &str, row: Option<String>) -> Error {
        Error::DataTable {
            operation: "reading a sealed row",
            table: table.to_owned(),
            column: column.to_owned(),
            owner: owner.to_owned(),
            source: format!(
                "row {:?}: the flag is on but the shadow column is NULL",
                row.as_deref().unwrap_or("?")
            )
            .into(),
        }
    }

    /// The access records of one `changes` (an update): begun before any
    /// key is resolved, so that strict mode refuses first.
    #[allow(missing_debug_implementations)]
    pub struct Access(Option<crate::keyring::AccessBatch>);

    impl Access {
        /// Whether the records are taken by anything (a log, tracing).
        pub fn is_active(&self) -> bool {
            self.0.is_some()
        }
    }

    /// Begins the `update` record of `changes` for `owner`'s row of
    /// `table`.
    ///
    /// # Errors
    /// [`Error::AccessorRequired`] in strict mode without an accessor.
    pub fn begin_update(keyring: &crate::Keyring, table: &str, owner: &str) -> Result<Access> {
        keyring
            .begin_access(crate::access::AccessOp::Update, table, &[], || {
                owner.to_owned()
            })
            .map(Access)
    }

    /// Records the update of `owner`'s `row`, touching `fields`.
    ///
    /// # Errors
    /// The access log's error when it refuses the record.
    pub fn finish_update(
        keyring: &crate::Keyring,
        mut access: Access,
        owner: &str,
        row: Option<String>,
        fields: Vec<&'static str>,
    ) -> Result<()> {
        if let Some(batch) = &mut access.0 {
            batch.add_with_fields(owner, row, fields.into_iter().map(str::to_owned).collect());
        }
        keyring.finish_access(access.0)
    }

    /// Begins the `lookup` record of a blind-index helper: `owner`'s rows
    /// of `table`, field `column`.
    ///
    /// # Errors
    /// [`Error::AccessorRequired`] in strict mode without an accessor.
    pub fn begin_lookup(
        keyring: &crate::Keyring,
        table: &str,
        owner: &str,
        column: &str,
    ) -> Result<Access> {
        begin_lookup_of(keyring, table, owner, &[column])
    }

    /// [`begin_lookup`] of several fields (a compound index's).
    ///
    /// # Errors
    /// [`Error::AccessorRequired`] in strict mode without an accessor.
    pub fn begin_lookup_of(
        keyring: &crate::Keyring,
        table: &str,
        owner: &str,
        columns: &[&str],
    ) -> Result<Access> {
        let mut access =
            keyring.begin_access(crate::access::AccessOp::Lookup, table, columns, || {
                owner.to_owned()
            })?;
        if let Some(batch) = &mut access {
            batch.add(owner, None);
        }
        Ok(Access(access))
    }

    /// Appends the record [`begin_lookup`] made.
    ///
    /// # Errors
    /// The access log's error when it refuses the record.
    pub fn finish_lookup(keyring: &crate::Keyring, access: Access) -> Result<()> {
        keyring.finish_access(access.0)
    }

    /// Bound parameters one generated multi-row `INSERT` uses at most:
    /// SQLite's limit (32,766), below PostgreSQL's and MySQL's (65,535).
    pub const MAX_INSERT_BINDS: usize = 32_766;

    /// An error inside [`insert_all`]'s transaction.
    enum InsertError {
        Phi(Error),
        Diesel(diesel::result::Error),
    }

    impl From<Error> for InsertError {
        fn from(error: Error) -> Self {
            InsertError::Phi(error)
        }
    }

    impl From<diesel::result::Error> for InsertError {
        fn from(error: diesel::result::Error) -> Self {
            InsertError::Diesel(error)
        }
    }

    /// The generated `insert_all`: `records` sealed a chunk at a time
    /// ([`PhiRecord::seal_chunks`](super::PhiRecord::seal_chunks)), each
    /// chunk one multi-row `INSERT` by `insert` of at most
    /// [`MAX_INSERT_BINDS`] bound values (`columns` per row), all in one
    /// transaction (a savepoint inside the caller's): every row or none.
    /// Returns the rows inserted.
    pub fn insert_all<R, C, F>(
        records: &[R],
        keyring: &crate::Keyring,
        conn: &mut C,
        columns: usize,
        mut insert: F,
    ) -> Result<usize>
    where
        R: super::PhiRecord,
        C: diesel::Connection + 'static,
        F: FnMut(&mut C, Vec<R::Sealed>) -> diesel::QueryResult<usize>,
    {
        if records.is_empty() {
            return Ok(0);
        }
        prepare_connection(conn, R::TABLE)?;
        let rows = (MAX_INSERT_BINDS / columns.max(1)).max(1);
        conn.transaction(|conn| {
            let mut inserted = 0;
            R::seal_chunks(records, rows, keyring, |sealed| {
                inserted += insert(conn, sealed)?;
                Ok::<(), InsertError>(())
            })?;
            Ok(inserted)
        })
        .map_err(|error| match error {
            InsertError::Phi(error) => error,
            InsertError::Diesel(source) => Error::Database {
                operation: "inserting sealed rows",
                table: R::TABLE,
                source,
            },
        })
    }

    /// Before a generated statement on the application's connection: an
    /// SQLite connection without a busy timeout gets phi's (see
    /// [`crate::sqlite`]); any other connection is left as it is.
    pub fn prepare_connection<C: 'static>(conn: &mut C, table: &'static str) -> Result<()> {
        super::prepare_connection(conn, table)
    }

    /// A text value passed as `&str` to a generated helper, as the
    /// `String` the value operations take, wiped when dropped.
    pub fn text(value: &str) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(value.to_owned())
    }

    /// Refusal to store a row unsealed when the model has no encrypted flag.
    pub fn must_seal(owner: &str, table: &str) -> Error {
        Error::KeyUnavailable {
            owner: owner.to_owned(),
            reason: format!(
                "{table} has no encrypted flag, so its rows are always sealed, and no key was resolved"
            ),
        }
    }

    /// Prints as `<redacted>`.
    pub struct Redacted;

    impl fmt::Debug for Redacted {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("<redacted>")
        }
    }

    /// Asks, by autoref specialisation, whether a model implements `Debug`:
    /// `(&DebugProbe::<M>::new()).phi_debug_probe()` is [`HasDebug`] when it
    /// does, else [`NoDebug`].
    #[allow(missing_debug_implementations)]
    pub struct DebugProbe<T>(std::marker::PhantomData<T>);

    impl<T> DebugProbe<T> {
        /// A probe of `T`.
        #[allow(clippy::new_without_default)] // Only generated code builds one.
        pub fn new() -> Self {
            DebugProbe(std::marker::PhantomData)
        }
    }

    /// The probed model implements `Debug`.
    #[allow(missing_debug_implementations)]
    pub struct HasDebug;

    /// The probed model does not implement `Debug`.
    #[allow(missing_debug_implementations)]
    pub struct NoDebug;

    /// Chosen first: the model implements `Debug`.
    pub trait ProbeDebug {
        /// [`HasDebug`].
        fn phi_debug_probe(&self) -> HasDebug {
            HasDebug
        }
    }

    impl<T: fmt::Debug> ProbeDebug for DebugProbe<T> {}

    /// The fallback: the model does not implement `Debug`.
    pub trait ProbeNoDebug {
        /// [`NoDebug`].
        fn phi_debug_probe(&self) -> NoDebug {
            NoDebug
        }
    }

    impl<T> ProbeNoDebug for &DebugProbe<T> {}

    /// Implemented by [`NoDebug`] only: a model with encrypted fields and a
    /// `Debug` of its own (a `#[derive(Debug)]` would print them) fails here.
    #[diagnostic::on_unimplemented(
        message = "a model with encrypted fields must not implement `Debug` itself: `#[derive(Debug)]` would print its PHI",
        label = "this model implements `Debug`",
        note = "remove `Debug` from its derives and add `#[phi(debug)]`: it generates a `Debug` that prints `<redacted>` for every encrypted field"
    )]
    pub trait NoPlainDebug {}

    impl NoPlainDebug for NoDebug {}

    /// Compiles only for [`NoDebug`].
    pub fn refuse_plain_debug<P: NoPlainDebug>(_probe: P) {}
}
