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
//!   the field is NULL). The encoding is the field's [`PhiValue`](crate::PhiValue) encoding
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
//! A lookup value is computed under phi's own key, not the owner's: a
//! crypto-shred of an owner leaves that owner's lookup values in place, and
//! someone holding the keyring can still test a guessed value against them.
//! When an owner is shredded, set its rows' lookup columns to NULL (or
//! delete the rows) in the same change. phi's own key is never shredded:
//! [`shred`](crate::lifecycle::shred) refuses owner ids beginning with
//! [`RESERVED_OWNER_PREFIX`].
//!
//! # Finding, and rows that do not open
//!
//! `Model::find_by_<field>` (and `find_by_<field>_async`) loads the rows
//! whose lookup value matches, opens them and keeps those whose value is
//! equal once normalised. A matching row of a crypto-shredded owner (every
//! data key version destroyed, as the key store says) is unreadable by
//! design: it is left out of the result, and counted in an `info` log event
//! (`lookup: rows of crypto-shredded owners left out`, with the table and
//! the number of rows, never an owner id). Any other row that does not
//! open (a value altered or moved from another row, a key version its
//! owner does not have) fails the call with [`Error::DataTable`] naming the
//! table, column and owner, its source naming the row and the opening
//! error: an integrity failure is never hidden.
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
//! [`rotate`] does the three steps of the data side at once, over every
//! lookup-indexed table named ([`LookupTable`]): after a suspected leak,
//! run it beside [`rotate_all`](crate::lifecycle::rotate_all) over every
//! owner, so that no index stays keyed by the leaked key (`phi keys rotate
//! --all` does both for the models the command line registers).
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

use zeroize::Zeroizing;

use crate::blind::Normalize;
use crate::error::{Error, Result};
use crate::keyring::Keyring;
use crate::lifecycle::DataConnection;
use crate::lifecycle::tables::{RowsQuery, SqlValue, check_identifier};
use crate::migrate::{CanonicalFn, Migratable, Progress, StoredTable};
use crate::sql::Encrypted;

pub use crate::keyring::{LOOKUP_OWNER, RESERVED_OWNER_PREFIX};
pub use crate::lookup_key::{LOOKUP_INDEX_INFO, LOOKUP_INDEX_LEN, LOOKUP_TAG_LEN, LookupIndexKey};

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

/// A lookup-indexed table as the jobs take it, whatever its model:
/// [`reindex_table`] and [`rotate`] work on several models at once.
#[derive(Clone, Debug)]
pub struct LookupTable {
    table: StoredTable,
    columns: Vec<LookupColumn>,
}

impl LookupTable {
    /// The table of model `M`.
    pub fn of<M: LookupIndexed>() -> LookupTable {
        LookupTable {
            table: M::stored_table(),
            columns: M::lookup_columns(),
        }
    }

    /// The lookup-indexed columns of a stored table
    /// ([`Migratable::stored_table`]), or `None` when it has none.
    pub fn from_stored(table: StoredTable) -> Option<LookupTable> {
        let columns: Vec<LookupColumn> = table
            .columns
            .iter()
            .filter_map(|c| {
                let (lookup_column, normalize) = c.lookup_index?;
                Some(LookupColumn {
                    column: c.column,
                    scope: c.scope,
                    lookup_column,
                    normalize,
                    canonical: c.canonical,
                })
            })
            .collect();
        (!columns.is_empty()).then_some(LookupTable { table, columns })
    }

    /// The table's SQL name.
    pub fn table(&self) -> &'static str {
        self.table.table
    }

    /// Its lookup-indexed columns.
    pub fn columns(&self) -> &[LookupColumn] {
        &self.columns
    }
}

/// Options of [`reindex`] (and [`rotate`]): the batch size and a progress
/// callback.
///
/// ```
/// use phi_types::lookup::ReindexOptions;
/// use phi_types::migrate::Progress;
///
/// let mut seen = Vec::new();
/// let options = ReindexOptions::default()
///     .batch(500)
///     .progress(|p: &Progress| seen.push((p.done, p.total)));
/// // phi_types::lookup::reindex::<User, _>(&mut conn, &keyring, &options)?;
/// # drop(options);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ReindexOptions<'a> {
    /// Rows read per batch.
    pub batch: usize,
    progress: crate::shared::Callback<'a, Progress>,
}

impl Default for ReindexOptions<'_> {
    fn default() -> Self {
        ReindexOptions {
            batch: crate::migrate::DEFAULT_BATCH,
            progress: crate::shared::Callback::default(),
        }
    }
}

impl ReindexOptions<'_> {
    /// Rows read per batch (1 to [`MAX_BATCH`](crate::migrate::MAX_BATCH)).
    #[must_use]
    pub fn batch(mut self, rows: usize) -> Self {
        self.batch = rows.clamp(1, crate::migrate::MAX_BATCH);
        self
    }

    /// Calls `f` after each batch with the rows read of the table and how
    /// many it held when the re-index started (default: no callback).
    #[must_use]
    pub fn progress<'b>(self, f: impl FnMut(&Progress) + 'b) -> ReindexOptions<'b> {
        ReindexOptions {
            batch: self.batch,
            progress: crate::shared::Callback::new(f),
        }
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
    /// Rows skipped because their owner is crypto-shredded: their values
    /// are unreadable by design, so their lookup values are left as they
    /// are (set them to NULL, or delete the rows, with the shred: see the
    /// [module](self) documentation).
    pub shredded: u64,
    /// Time taken.
    pub elapsed: Duration,
}

impl std::fmt::Display for ReindexReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} row(s) read, {} lookup value(s) rewritten under version {}, {} unchanged, \
             {} row(s) of shredded owners skipped, in {:.1?}",
            self.table,
            self.rows,
            self.rewritten,
            self.version,
            self.unchanged,
            self.shredded,
            self.elapsed
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
/// Rows of a crypto-shredded owner (every data key version destroyed, as
/// the key store says) are skipped and counted in
/// [`ReindexReport::shredded`]: they are unreadable by design, and the job
/// goes on with the other rows. A sealed row whose value does not open for
/// any other reason (altered bytes, a key version its owner does not have)
/// still stops the job with an error naming it.
///
/// # Errors
/// [`Error::Config`] for identifiers that are not plain; key errors;
/// [`Error::DataTable`] naming the table, column, owner and row of a value
/// that does not open or decode; [`Error::Database`] naming the table.
pub fn reindex<M: LookupIndexed, C: DataConnection>(
    conn: &mut C,
    keyring: &Keyring,
    options: &ReindexOptions<'_>,
) -> Result<ReindexReport> {
    reindex_table(conn, keyring, &LookupTable::of::<M>(), options)
}

/// [`reindex`] of a [`LookupTable`], for jobs over several models.
///
/// # Errors
/// As [`reindex`].
pub fn reindex_table<C: DataConnection>(
    conn: &mut C,
    keyring: &Keyring,
    table: &LookupTable,
    options: &ReindexOptions<'_>,
) -> Result<ReindexReport> {
    let started = Instant::now();
    let t = &table.table;
    t.validate()?;
    crate::connection::prepare_application_connection(conn).map_err(|source| Error::Database {
        operation: "giving the application's SQLite connection a busy timeout",
        table: t.table,
        source,
    })?;
    let columns = &table.columns;
    let mut positions = Vec::with_capacity(columns.len());
    for c in columns {
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
        if t.columns[position].shadow.is_some() {
            return Err(Error::Config(format!(
                "{}.{} is in the dual-write phase (a shadow column): re-index its lookup values after finalize",
                t.table, c.column
            )));
        }
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
    // Counted for a progress callback only (two counts of the table).
    let total = if options.progress.is_set() {
        conn.migration_count(t, false)? + conn.migration_count(t, true)?
    } else {
        0
    };
    for sealed in [false, true] {
        let mut after: Option<SqlValue> = None;
        loop {
            let query = RowsQuery {
                sealed,
                after: after.as_ref(),
                limit,
                random: false,
            };
            let rows = conn.migration_rows(t, &query, true)?;
            let Some(last) = rows.last() else {
                break;
            };
            after = Some(last.key.clone());
            keyring.record_job(
                t.table,
                &columns.iter().map(|c| c.column).collect::<Vec<_>>(),
                rows.iter().map(|r| (r.owner.as_str(), Some(r.key_text()))),
            )?;
            let (owner_keys, shredded) = if sealed {
                let owners: BTreeSet<&str> = rows.iter().map(|r| r.owner.as_str()).collect();
                // An owner with no key to open with may be shredded: the
                // key store says (one query for the batch's such owners).
                let (keys, shredded) = keyring.keys_for_open_or_shredded(&owners)?;
                (Some(keys), shredded)
            } else {
                (None, Default::default())
            };
            for row in &rows {
                report.rows += 1;
                if shredded.contains(&row.owner) {
                    report.shredded += 1;
                    continue;
                }
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
                    let written = conn.write_lookup(
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
            options.progress.call(&Progress {
                table: t.table,
                done: report.rows,
                total,
                elapsed: started.elapsed(),
            });
        }
    }
    report.elapsed = started.elapsed();
    tracing::info!(
        table = t.table,
        rows = report.rows,
        rewritten = report.rewritten,
        version = report.version,
        shredded = report.shredded,
        "phi lookup re-index done"
    );
    Ok(report)
}

/// What [`rotate`] did.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct LookupRotation {
    /// The version of [`LOOKUP_OWNER`]'s key created, which every lookup
    /// value was rewritten under.
    pub version: u32,
    /// The re-index of each table, in the order given.
    pub reindexed: Vec<ReindexReport>,
    /// The older versions this call retired: no lookup value of the
    /// tables named was under them after the re-index. They no longer
    /// write, and still find.
    pub retired: Vec<u32>,
    /// The older versions left active, each with the number of lookup
    /// values still under it across the tables named: values of
    /// crypto-shredded owners' rows (skipped by the re-index; set them to
    /// NULL), or values a process wrote under an older version after the
    /// re-index passed their row (its key cache had not yet followed the
    /// feed). Run [`rotate`] or [`reindex_table`] and
    /// [`retire`](crate::lifecycle::retire) again once those are gone.
    pub pending: Vec<(u32, u64)>,
}

impl LookupRotation {
    /// Whether every older version was retired: nothing is left under
    /// them.
    pub fn finished(&self) -> bool {
        self.pending.is_empty()
    }
}

impl std::fmt::Display for LookupRotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "lookup key version {} created", self.version)?;
        for r in &self.reindexed {
            write!(f, "; {r}")?;
        }
        match (&self.retired[..], &self.pending[..]) {
            ([], []) => write!(f, "; no older version to retire")?,
            ([], _) => {}
            (versions, _) => write!(f, "; retired version(s) {versions:?}")?,
        }
        for (version, values) in &self.pending {
            write!(
                f,
                "; version {version} left active: {values} lookup value(s) still under it"
            )?;
        }
        Ok(())
    }
}

/// Rotates the lookup key: adds a new version of [`LOOKUP_OWNER`]'s data
/// key (audited as `rotate` and on the key-event feed, so other processes
/// write under it once they follow the feed), re-indexes every table of
/// `tables` under it ([`reindex_table`]), then retires every older active
/// version that no lookup value of `tables` is under any more, counted per
/// version in one grouped query per lookup column. The lookup side of an
/// emergency rotation, with [`rotate_all`](crate::lifecycle::rotate_all)
/// over [`RotateOwners::All`](crate::lifecycle::RotateOwners::All).
///
/// An older version that still has values is left active and reported in
/// [`LookupRotation::pending`] with their number: rows of crypto-shredded
/// owners, which keep their lookup values (see
/// [`ReindexReport::shredded`]; set them to NULL), and values that a
/// process whose key cache had not yet followed the feed wrote under an
/// older version after the re-index passed their row (a later
/// [`reindex_table`] rewrites them).
///
/// The count is not a lock: a process that has not yet followed the feed
/// can still write a value under an older version after it, and a retired
/// version still finds such a value. Before destroying a retired lookup
/// version, wait until every process has followed the feed (its
/// `feed_max_staleness`), then run [`reindex_table`] over every table
/// until a run reports nothing [`rewritten`](ReindexReport::rewritten).
///
/// `tables` must name every lookup-indexed table of the database: values
/// of a table left out are neither rewritten nor counted. A run that fails part way
/// leaves the new version current and the older ones active: running
/// [`reindex_table`] and [`retire`](crate::lifecycle::retire) (or this
/// again, adding yet another version) finishes it.
///
/// # Errors
/// Key store and KEK errors; those of [`reindex_table`].
pub fn rotate<C: DataConnection>(
    conn: &mut C,
    keyring: &Keyring,
    tables: &[LookupTable],
    options: &ReindexOptions<'_>,
) -> Result<LookupRotation> {
    for t in tables {
        t.table.validate()?;
    }
    // Its first key, when no lookup value was ever written.
    keyring.lookup_keys()?;
    let version = crate::lifecycle::rotate(keyring, LOOKUP_OWNER)?;
    let mut rotation = LookupRotation {
        version,
        ..LookupRotation::default()
    };
    for t in tables {
        rotation
            .reindexed
            .push(reindex_table(conn, keyring, t, options)?);
    }
    let mut older: Vec<u32> = keyring
        .store()
        .load_keys(&[LOOKUP_OWNER])?
        .into_iter()
        .filter(|k| k.version < version && k.state == crate::store::KeyState::Active)
        .map(|k| k.version)
        .collect();
    older.sort_unstable();
    let mut in_use: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
    for t in tables {
        for c in &t.columns {
            for (v, n) in conn.lookup_versions_in_use(t.table.table, c.lookup_column)? {
                *in_use.entry(v).or_default() += n;
            }
        }
    }
    for v in older {
        match in_use.get(&v) {
            Some(&values) if values > 0 => rotation.pending.push((v, values)),
            _ => {
                if crate::lifecycle::retire(conn, keyring, LOOKUP_OWNER, v, &[])? {
                    rotation.retired.push(v);
                }
            }
        }
    }
    keyring.clear(LOOKUP_OWNER);
    tracing::info!(
        version,
        tables = tables.len(),
        retired = rotation.retired.len(),
        pending = rotation.pending.len(),
        "phi lookup key rotated"
    );
    Ok(rotation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dek::Dek;
    use crate::dek::KeyBytes;
    use crate::keyring::refuse_reserved;

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
