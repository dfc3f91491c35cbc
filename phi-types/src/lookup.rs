//! Lookup indexes: finding a record without knowing its owner.
//!
//! A [blind index](crate::blind) is keyed by its owner's data key, so it
//! answers "this owner's cases for patient Doe" but not "which user has the
//! e-mail address `jane@example.org`?", asked at login before any owner is
//! known. A lookup index answers that: a keyed hash of the value under a key
//! that belongs to no owner, stored in a column of its own (typically with a
//! `UNIQUE` index, so the database refuses a second account for one
//! address across all owners).
//!
//! # The key
//!
//! The key is derived from a data key of the reserved owner
//! [`LOOKUP_OWNER`] (`"phi:lookup"`): a row of `user_encryption_keys` like
//! any other, wrapped by the KEK, audited, cached and rotated the same way.
//! Owner ids beginning with [`RESERVED_OWNER_PREFIX`] (`"phi:"`) are refused
//! by the keyring's public methods, so no application owner can share it.
//! Its first data key is created on the first write of a lookup index.
//!
//! # The format (a contract)
//!
//! - key = HKDF-SHA256(ikm = data key version `v` of [`LOOKUP_OWNER`],
//!   salt = empty, info = `"phi-lookup-index-v1" ‖ scope`), 32 bytes, where
//!   `scope` is the encrypted field's scope (`table.column` unless pinned):
//!   two lookup columns never share a key, and no lookup key is a blind-index
//!   key;
//! - value = `u32be(v) ‖ HMAC-SHA256(key, normalised canonical encoding)[..16]`,
//!   20 bytes ([`LOOKUP_INDEX_LEN`]), in a nullable binary column (NULL when
//!   the field is NULL). The encoding is the field's [`PhiValue`] encoding
//!   (UTF-8 for text), normalised as the field says (`trim`, `lowercase`).
//!
//! The value is written whether or not the owner's row is sealed (it does not
//! depend on the owner's keys), so rows stored unsealed during a roll-out are
//! found too.
//!
//! # The trade-off
//!
//! Equal values are linkable across owners: two rows whose e-mail addresses
//! are equal (after normalisation) hold equal lookup values, whoever owns
//! them. That is what makes the lookup and a `UNIQUE` index possible; it is
//! also what a reader of the table learns. Use it for identifiers that must
//! be found globally (a login e-mail), not for general PHI.
//!
//! # Rotation
//!
//! ```text
//! lifecycle::rotate(&keyring, LOOKUP_OWNER)                 version v+1 writes
//! lifecycle::clear_cache_fleet(&keyring, Some(LOOKUP_OWNER)) other processes follow
//! lookup::reindex::<Model, _>(conn, &keyring, &opts)         rows rewritten under v+1
//! lifecycle::retire(conn, &keyring, LOOKUP_OWNER, v, &[])     v no longer writes
//! ```
//!
//! Finding queries the values under every version the reserved owner holds
//! ([`Keyring::lookup_indexes`]), so rows are found throughout. The re-index
//! job is resumable: a run reads the table in key order and rewrites only
//! values that are not already current, each `UPDATE` guarded by the stored
//! field bytes it read; a second run rewrites nothing. During the
//! transition, a `UNIQUE` index only compares values of one version: an
//! application that must refuse duplicates checks with `find_by_…` (every
//! version) as well, until the re-index is done.
//!
//! ```
//! use std::sync::Arc;
//! use phi_types::{Keyring, LocalKek, MemoryKeyStore, KeyBytes};
//! use phi_types::blind::Normalize;
//!
//! let kek = LocalKek::new("local-1", &KeyBytes::new([7; 32]));
//! let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), Arc::new(kek)).build()?;
//! let stored = keyring.lookup_index("users.email", &"Jane@Example.org ".to_string(), Normalize::TRIM_LOWERCASE)?;
//! let wanted = keyring.lookup_indexes("users.email", &"jane@example.org".to_string(), Normalize::TRIM_LOWERCASE)?;
//! assert!(wanted.contains(&stored));
//! // The reserved owner is not an application owner.
//! assert!(keyring.keys_for_open(phi_types::lookup::LOOKUP_OWNER).is_err());
//! # Ok::<(), phi_types::Error>(())
//! ```

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::blind::Normalize;
use crate::dek::Dek;
use crate::error::{Error, Result};
use crate::keyring::{Keyring, OwnerKeys};
use crate::lifecycle::DataConnection;
use crate::lifecycle::tables::{RowsQuery, SqlValue, check_identifier};
use crate::migrate::{CanonicalFn, Migratable};
use crate::sql::Encrypted;
use crate::value::PhiValue;

/// The reserved owner whose data keys the lookup-index keys derive from.
pub const LOOKUP_OWNER: &str = "phi:lookup";

/// Owner ids beginning with this are phi's own: the keyring's public
/// methods refuse them.
pub const RESERVED_OWNER_PREFIX: &str = "phi:";

/// The HKDF `info` prefix of a lookup-index key.
pub const LOOKUP_INDEX_INFO: &[u8] = b"phi-lookup-index-v1";

/// Length of the HMAC tag kept in a lookup value, in bytes.
pub const LOOKUP_TAG_LEN: usize = 16;

/// Length of a stored lookup value: the key version (4 bytes, big-endian)
/// and the tag.
pub const LOOKUP_INDEX_LEN: usize = 4 + LOOKUP_TAG_LEN;

/// Refuses an owner id reserved for phi's own keys.
pub(crate) fn refuse_reserved(owner: &str) -> Result<()> {
    if owner.starts_with(RESERVED_OWNER_PREFIX) {
        return Err(Error::InvalidInput {
            what: "owner id",
            reason: format!(
                "owner ids beginning with {RESERVED_OWNER_PREFIX:?} are reserved for phi's own keys"
            ),
        });
    }
    Ok(())
}

/// The lookup-index key of one data key version of [`LOOKUP_OWNER`] and
/// one scope.
///
/// Zeroized on drop; its `Debug` shows nothing of the key.
pub struct LookupIndexKey {
    key: Zeroizing<[u8; 32]>,
    version: u32,
}

impl std::fmt::Debug for LookupIndexKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LookupIndexKey")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl LookupIndexKey {
    /// Derives the key for `scope` from `dek`, a data key of
    /// [`LOOKUP_OWNER`].
    pub fn derive(dek: &Dek, scope: &str) -> Self {
        let hkdf = Hkdf::<Sha256>::new(None, dek.key().expose());
        let mut key = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's 8,160-byte limit.
        let expanded = hkdf.expand_multi_info(&[LOOKUP_INDEX_INFO, scope.as_bytes()], &mut key[..]);
        debug_assert!(expanded.is_ok());
        LookupIndexKey {
            key,
            version: dek.version(),
        }
    }

    /// The data key version this key derives from.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The stored value of already normalised bytes.
    pub fn compute(&self, normalised: &[u8]) -> [u8; LOOKUP_INDEX_LEN] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key[..])
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(normalised);
        let tag = mac.finalize().into_bytes();
        let mut out = [0u8; LOOKUP_INDEX_LEN];
        out[..4].copy_from_slice(&self.version.to_be_bytes());
        out[4..].copy_from_slice(&tag[..LOOKUP_TAG_LEN]);
        out
    }

    /// The stored value of encoded bytes: normalised, then hashed.
    pub fn compute_encoded(&self, encoded: &[u8], normalize: Normalize) -> [u8; LOOKUP_INDEX_LEN] {
        let normalised = normalize.apply(encoded);
        let out = self.compute(&normalised);
        if let std::borrow::Cow::Owned(mut owned) = normalised {
            zeroize::Zeroize::zeroize(&mut owned);
        }
        out
    }

    /// The stored value of `value`: encoded as [`PhiValue`], normalised,
    /// then hashed.
    pub fn index<T: PhiValue>(&self, value: &T, normalize: Normalize) -> [u8; LOOKUP_INDEX_LEN] {
        let mut encoded = Zeroizing::new(Vec::with_capacity(value.encoded_len()));
        value.encode(&mut encoded);
        self.compute_encoded(&encoded, normalize)
    }
}

/// The value to store, under the current version of `keys` (the reserved
/// owner's).
pub(crate) fn current_index<T: PhiValue>(
    keys: &OwnerKeys,
    scope: &str,
    value: &T,
    normalize: Normalize,
) -> Result<Vec<u8>> {
    let dek = keys.current_dek()?;
    Ok(LookupIndexKey::derive(dek, scope)
        .index(value, normalize)
        .to_vec())
}

/// The values to look up: one per version `keys` hold.
pub(crate) fn all_indexes<T: PhiValue>(
    keys: &OwnerKeys,
    scope: &str,
    value: &T,
    normalize: Normalize,
) -> Vec<Vec<u8>> {
    keys.versions()
        .filter_map(|version| keys.dek(version))
        .map(|dek| {
            LookupIndexKey::derive(dek, scope)
                .index(value, normalize)
                .to_vec()
        })
        .collect()
}

impl Keyring {
    /// The keys of [`LOOKUP_OWNER`] for writing lookup values: its first
    /// data key is created if it has none.
    ///
    /// # Errors
    /// Key store and KEK errors, as [`keys_for_seal`](Self::keys_for_seal).
    pub fn lookup_keys(&self) -> Result<std::sync::Arc<OwnerKeys>> {
        self.reserved_keys(LOOKUP_OWNER, true)
    }

    /// [`lookup_keys`](Self::lookup_keys) without blocking the task's thread
    /// (feature `async`).
    ///
    /// # Errors
    /// As [`lookup_keys`](Self::lookup_keys).
    #[cfg(feature = "async")]
    pub async fn lookup_keys_async(&self) -> Result<std::sync::Arc<OwnerKeys>> {
        self.reserved_keys_async(LOOKUP_OWNER, true).await
    }

    /// The lookup value of `value` in `scope` to store, under the current
    /// version of [`LOOKUP_OWNER`]'s key.
    ///
    /// # Errors
    /// As [`lookup_keys`](Self::lookup_keys).
    pub fn lookup_index<T: PhiValue>(
        &self,
        scope: &str,
        value: &T,
        normalize: Normalize,
    ) -> Result<Vec<u8>> {
        current_index(&*self.lookup_keys()?, scope, value, normalize)
    }

    /// The values to find `value` in `scope` by (`column.eq_any(…)`): one per
    /// version of [`LOOKUP_OWNER`]'s key, retired versions included. Empty
    /// when no lookup value was ever written (no key exists); never creates
    /// a key.
    ///
    /// # Errors
    /// Key store and KEK errors.
    pub fn lookup_indexes<T: PhiValue>(
        &self,
        scope: &str,
        value: &T,
        normalize: Normalize,
    ) -> Result<Vec<Vec<u8>>> {
        let keys = self.reserved_keys(LOOKUP_OWNER, false)?;
        Ok(all_indexes(&keys, scope, value, normalize))
    }

    /// [`lookup_indexes`](Self::lookup_indexes) without blocking the task's
    /// thread (feature `async`).
    ///
    /// # Errors
    /// As [`lookup_indexes`](Self::lookup_indexes).
    #[cfg(feature = "async")]
    pub async fn lookup_indexes_async<T: PhiValue>(
        &self,
        scope: &str,
        value: &T,
        normalize: Normalize,
    ) -> Result<Vec<Vec<u8>>> {
        let keys = self.reserved_keys_async(LOOKUP_OWNER, false).await?;
        Ok(all_indexes(&keys, scope, value, normalize))
    }
}

/// A model with lookup indexes that the re-index job can work on:
/// generated by `#[derive(PhiRecord)]` for [`Migratable`] models with a
/// `lookup_index` field.
pub trait LookupIndexed: Migratable {
    /// The model's lookup-indexed fields.
    fn lookup_columns() -> Vec<LookupColumn>;
}

/// One lookup-indexed field of a [`LookupIndexed`] model.
#[derive(Clone)]
pub struct LookupColumn {
    /// The encrypted column the value is stored in.
    pub column: &'static str,
    /// The scope the value is sealed and indexed under.
    pub scope: &'static str,
    /// The lookup column.
    pub lookup_column: &'static str,
    /// How the value is normalised before it is hashed.
    pub normalize: Normalize,
    /// The field type's canonical encoding of plain bytes.
    pub canonical: CanonicalFn,
}

impl std::fmt::Debug for LookupColumn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LookupColumn")
            .field("column", &self.column)
            .field("scope", &self.scope)
            .field("lookup_column", &self.lookup_column)
            .field("normalize", &self.normalize)
            .finish_non_exhaustive()
    }
}

/// Options of [`reindex`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ReindexOptions {
    /// Rows read per batch.
    pub batch: usize,
}

impl Default for ReindexOptions {
    fn default() -> Self {
        ReindexOptions {
            batch: crate::migrate::DEFAULT_BATCH,
        }
    }
}

impl ReindexOptions {
    /// Rows read per batch (1 to [`MAX_BATCH`](crate::migrate::MAX_BATCH)).
    #[must_use]
    pub fn batch(mut self, rows: usize) -> Self {
        self.batch = rows.clamp(1, crate::migrate::MAX_BATCH);
        self
    }
}

/// What [`reindex`] did.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ReindexReport {
    /// The table.
    pub table: &'static str,
    /// The version of [`LOOKUP_OWNER`]'s key the values were written under.
    pub version: u32,
    /// Rows read.
    pub rows: u64,
    /// Lookup values rewritten (they were NULL or under another version).
    pub rewritten: u64,
    /// Values left alone: already current, NULL fields, or changed by a
    /// writer since they were read (that writer wrote their lookup value).
    pub unchanged: u64,
    /// Time taken.
    pub elapsed: Duration,
}

impl std::fmt::Display for ReindexReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} row(s) read, {} lookup value(s) rewritten under version {}, {} unchanged, in {:.1?}",
            self.table, self.rows, self.rewritten, self.version, self.unchanged, self.elapsed
        )
    }
}

/// Recomputes every lookup value of `M`'s table under the current version
/// of [`LOOKUP_OWNER`]'s key: the step between rotating that key and
/// retiring the old version (see the [module](self) documentation), and the
/// way to fill a lookup column added to a table that already has rows.
///
/// Rows are read in key order, in batches, sealed and unsealed ones alike;
/// each value is opened (or decoded, for a row stored unsealed), encoded
/// canonically, normalised and hashed; then one `UPDATE` per row whose
/// lookup value is not already the current one, guarded by the field's
/// stored bytes as read (a row changed since is left to its writer).
/// Resumable: a second run rewrites nothing.
///
/// # Errors
/// [`Error::Config`] for identifiers that are not plain; key errors;
/// [`Error::DataTable`] naming the table, column, owner and row of a value
/// that does not open or decode; [`Error::Database`] naming the table.
pub fn reindex<M: LookupIndexed, C: DataConnection>(
    conn: &mut C,
    keyring: &Keyring,
    options: &ReindexOptions,
) -> Result<ReindexReport> {
    let started = Instant::now();
    let t = M::stored_table();
    t.validate()?;
    let columns = M::lookup_columns();
    let mut positions = Vec::with_capacity(columns.len());
    for c in &columns {
        check_identifier("lookup column", c.lookup_column, false)?;
        let position = t
            .columns
            .iter()
            .position(|s| s.column == c.column)
            .ok_or_else(|| {
                Error::Config(format!(
                    "{}.{} has a lookup index but is not an encrypted column of the model",
                    t.table, c.column
                ))
            })?;
        positions.push(position);
    }
    let lookup = keyring.lookup_keys()?;
    let dek = lookup.current_dek()?;
    let keys: Vec<LookupIndexKey> = columns
        .iter()
        .map(|c| LookupIndexKey::derive(dek, c.scope))
        .collect();
    let mut report = ReindexReport {
        table: t.table,
        version: dek.version(),
        ..ReindexReport::default()
    };
    let _span = tracing::info_span!("phi.lookup.reindex", table = t.table).entered();
    let limit = options.batch.clamp(1, crate::migrate::MAX_BATCH);
    for sealed in [false, true] {
        let mut after: Option<SqlValue> = None;
        loop {
            let query = RowsQuery {
                sealed,
                after: after.as_ref(),
                limit,
                random: false,
            };
            let rows = conn.migration_rows(&t, &query, true)?;
            let Some(last) = rows.last() else {
                break;
            };
            after = Some(last.key.clone());
            let owner_keys = if sealed {
                let owners: BTreeSet<&str> = rows.iter().map(|r| r.owner.as_str()).collect();
                Some(keyring.keys_for_open_many(owners)?)
            } else {
                None
            };
            for row in &rows {
                report.rows += 1;
                for ((c, key), &position) in columns.iter().zip(&keys).zip(&positions) {
                    let Some(Some(stored)) = row.values.get(position) else {
                        report.unchanged += 1;
                        continue;
                    };
                    let data_error = |what: String| Error::DataTable {
                        operation: "re-indexing a lookup value",
                        table: t.table.to_owned(),
                        column: c.column.to_owned(),
                        owner: row.owner.clone(),
                        source: format!("row {:?}: {what}", row.key_text()).into(),
                    };
                    let plain = match &owner_keys {
                        Some(owner_keys) => {
                            let keys = owner_keys.get(&row.owner).ok_or_else(|| {
                                data_error("the owner's keys were not resolved".into())
                            })?;
                            let opened: Vec<u8> = keys.open(
                                Encrypted::<Vec<u8>>::from_bytes(stored.clone()),
                                c.scope,
                                &row.row,
                            )?;
                            Zeroizing::new(opened)
                        }
                        None => Zeroizing::new(stored.clone()),
                    };
                    let canonical = (c.canonical)(plain.to_vec())
                        .map_err(|e| data_error(format!("the value does not decode: {e}")))?;
                    let value = key.compute_encoded(&canonical, c.normalize);
                    let written = write_lookup(
                        conn,
                        t.table,
                        t.key_column,
                        &row.key,
                        c.column,
                        stored,
                        c.lookup_column,
                        &value,
                    )?;
                    if written > 0 {
                        report.rewritten += 1;
                    } else {
                        report.unchanged += 1;
                    }
                }
            }
        }
    }
    report.elapsed = started.elapsed();
    tracing::info!(
        table = t.table,
        rows = report.rows,
        rewritten = report.rewritten,
        version = report.version,
        "phi lookup re-index done"
    );
    Ok(report)
}

/// `UPDATE table SET lookup = value WHERE key = key AND column = stored AND
/// (lookup IS NULL OR lookup <> value)`: the number of rows written.
#[allow(clippy::too_many_arguments)]
fn write_lookup<C: DataConnection>(
    conn: &mut C,
    table: &'static str,
    key_column: &str,
    key: &SqlValue,
    column: &str,
    stored: &[u8],
    lookup_column: &str,
    value: &[u8],
) -> Result<usize> {
    let any: &mut dyn std::any::Any = conn;
    let database = |source| Error::Database {
        operation: "writing a re-indexed lookup value",
        table,
        source,
    };
    macro_rules! run {
        ($conn:expr, $sql:expr) => {{
            use diesel::RunQueryDsl as _;
            use diesel::sql_types::{BigInt, Binary, Text};
            let query = diesel::sql_query($sql).bind::<Binary, _>(value);
            match key {
                SqlValue::Text(k) => query
                    .bind::<Text, _>(k)
                    .bind::<Binary, _>(stored)
                    .bind::<Binary, _>(value)
                    .execute($conn),
                SqlValue::Int(k) => query
                    .bind::<BigInt, _>(*k)
                    .bind::<Binary, _>(stored)
                    .bind::<Binary, _>(value)
                    .execute($conn),
            }
            .map_err(database)
        }};
    }
    let question = format!(
        "UPDATE {table} SET {lookup_column} = ? WHERE {key_column} = ? AND {column} = ? \
         AND ({lookup_column} IS NULL OR {lookup_column} <> ?)"
    );
    #[cfg(feature = "sqlite")]
    if let Some(conn) = any.downcast_mut::<diesel::SqliteConnection>() {
        return run!(conn, &question);
    }
    #[cfg(feature = "mysql")]
    if let Some(conn) = any.downcast_mut::<diesel::MysqlConnection>() {
        return run!(conn, &question);
    }
    #[cfg(feature = "postgres")]
    if let Some(conn) = any.downcast_mut::<diesel::PgConnection>() {
        let dollar = format!(
            "UPDATE {table} SET {lookup_column} = $1 WHERE {key_column} = $2 AND {column} = $3 \
             AND ({lookup_column} IS NULL OR {lookup_column} <> $4)"
        );
        return run!(conn, &dollar);
    }
    let _ = (any, question);
    Err(Error::Config(format!(
        "{table}: the lookup re-index runs on SQLite, MySQL or PostgreSQL connections"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dek::KeyBytes;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn matches_the_published_construction() {
        // HKDF-SHA256(ikm = 32 × 0x01, salt = empty, info = "phi-lookup-index-v1" ‖ scope)
        // then u32be(version) ‖ HMAC-SHA256 truncated to 16 bytes, computed
        // independently with Python's `cryptography` and `hmac` modules.
        let dek = Dek::new(3, KeyBytes::new([1; 32]));
        let key = LookupIndexKey::derive(&dek, "users.email");
        let value = key.compute(b"jane@example.org");
        assert_eq!(hex(&value), "00000003fba0bdf22d8125bc30a89639bac9ba83");
    }

    #[test]
    fn scope_version_and_label_separate_values() {
        let a = Dek::new(1, KeyBytes::new([1; 32]));
        let b = Dek::new(2, KeyBytes::new([1; 32]));
        let v = "jane@example.org".to_string();
        let ia = LookupIndexKey::derive(&a, "users.email").index(&v, Normalize::NONE);
        assert_ne!(
            ia,
            LookupIndexKey::derive(&a, "users.backup_email").index(&v, Normalize::NONE)
        );
        // Same key bytes, another version: another prefix.
        let ib = LookupIndexKey::derive(&b, "users.email").index(&v, Normalize::NONE);
        assert_eq!(ia[4..], ib[4..]);
        assert_ne!(ia[..4], ib[..4]);
        // Never a blind-index value of the same key bytes and scope.
        let blind =
            crate::blind::BlindIndexKey::derive(&a, "users.email").index(&v, Normalize::NONE);
        assert_ne!(ia[4..], blind[..]);
        assert_eq!(
            ia,
            LookupIndexKey::derive(&a, "users.email")
                .index(&" JANE@example.org".to_string(), Normalize::TRIM_LOWERCASE)
        );
        assert!(!format!("{:?}", LookupIndexKey::derive(&a, "s")).contains("[1"));
    }

    #[test]
    fn reserved_owners_are_refused() {
        assert!(refuse_reserved("phi:lookup").is_err());
        assert!(refuse_reserved("phi:anything").is_err());
        assert!(refuse_reserved("provider-17").is_ok());
        assert!(refuse_reserved("phi").is_ok());
    }
}
