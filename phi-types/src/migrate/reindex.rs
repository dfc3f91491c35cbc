//! Writing the index columns of sealed rows from their values: for an index
//! added to a table that already holds sealed rows, or for tags `verify`
//! reports stale.

use std::fmt;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use std::collections::BTreeSet;

use super::{Migratable, MigrateOptions, Progress, row_index};
use crate::error::{Error, Result};
use crate::keyring::{Keyring, OwnerKeys};
use crate::lifecycle::tables::{DataConnection, MigrationRow, RowsQuery, StoredTable};
use crate::sql::Encrypted;

/// What [`reindex`] did to one table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReindexReport {
    /// The table.
    pub table: &'static str,
    /// Sealed rows read.
    pub rows: u64,
    /// Rows whose index columns were written (or, in a dry run, would be).
    pub written: u64,
    /// Rows changed by someone else between read and write: left as the
    /// other writer left them (its write computed their tags); a second
    /// run finds any still stale.
    pub conflicts: u64,
    /// Rows of crypto-shredded owners: left alone.
    pub skipped: u64,
    /// How long it took.
    pub elapsed: Duration,
}

impl fmt::Display for ReindexReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} sealed rows read, {} re-indexed, {} changed meanwhile, {} of owners without keys, in {:.1?}",
            self.table, self.rows, self.written, self.conflicts, self.skipped, self.elapsed
        )
    }
}

/// Writes the index columns (blind, derived and compound) of every sealed
/// row of `M`'s table from its values, under each owner's current key
/// version: after adding an index to a table that already holds sealed
/// rows (its new column NULL in them), or to repair the tags
/// [`verify`](super::verify) reports. A row already holding the right tags
/// is not written.
///
/// Rows are read in key order, `options`' batch at a time, without
/// locking; each row's index columns are written by one `UPDATE` guarded by
/// its key, its flag and every sealed value as read, so a row the
/// application changed meanwhile is left as the application wrote it
/// (counted in [`ReindexReport::conflicts`]). Resumable: nothing is lost by
/// a crash, and the next run finds what is left. With
/// [`MigrateOptions::dry_run`], counts without writing. Rows stored
/// unsealed (flag off) have no tags and are left to the backfill.
///
/// Every row read is recorded in the access log as the job's read, as the
/// other jobs that open values record theirs.
///
/// # Errors
/// [`Error::DataTable`] naming the table, column, owner and row of a value
/// that does not open or decode; key resolution errors (an owner whose keys
/// cannot be read, unless the key store says it is shredded); the access
/// log's; query errors.
pub fn reindex<M: Migratable, C: DataConnection>(
    conn: &mut C,
    keyring: &Keyring,
    options: &MigrateOptions<'_>,
) -> Result<ReindexReport> {
    reindex_table(&M::stored_table(), conn, keyring, options)
}

/// [`reindex`] for a table described at run time.
///
/// # Errors
/// As [`reindex`].
pub fn reindex_table<C: DataConnection>(
    t: &StoredTable,
    conn: &mut C,
    keyring: &Keyring,
    options: &MigrateOptions<'_>,
) -> Result<ReindexReport> {
    t.validate()?;
    let started = Instant::now();
    let mut report = ReindexReport {
        table: t.table,
        ..ReindexReport::default()
    };
    let total = conn.migration_count(t, true)?;
    let mut after = None;
    loop {
        let query = RowsQuery {
            sealed: true,
            after: after.as_ref(),
            limit: options.batch,
            random: false,
        };
        let rows = conn.migration_rows(t, &query, true)?;
        if rows.is_empty() {
            break;
        }
        // Every row read is opened: recorded as the job's reads first.
        keyring.record_job(
            t.table,
            &t.columns.iter().map(|c| c.column).collect::<Vec<_>>(),
            rows.iter().map(|r| (r.owner.as_str(), Some(r.key_text()))),
        )?;
        let owners: BTreeSet<&str> = rows.iter().map(|r| r.owner.as_str()).collect();
        // An owner with no key to open with may be crypto-shredded (the key
        // store says); any other is an error, not a row to skip.
        let (keys, shredded) = keyring.keys_for_open_or_shredded(&owners)?;
        for row in &rows {
            report.rows += 1;
            if shredded.contains(&row.owner) {
                report.skipped += 1;
                continue;
            }
            let Some(keys) = keys.get(&row.owner) else {
                return Err(Error::KeyUnavailable {
                    owner: row.owner.clone(),
                    reason: format!(
                        "no data key opens the sealed rows of {} and the owner is not shredded",
                        t.table
                    ),
                });
            };
            let sets = tags_of(t, row, keys)?;
            let stale: Vec<(&'static str, Option<Vec<u8>>)> = sets
                .into_iter()
                .filter(|(column, tag)| row_index(t, row, column) != tag.as_ref())
                .collect();
            if stale.is_empty() {
                continue;
            }
            // A dry run counts the row as written; a write that matches no
            // row met a row changed since it was read.
            if options.is_dry_run() || conn.write_indexes(t, row, &stale)? == 1 {
                report.written += 1;
            } else {
                report.conflicts += 1;
            }
        }
        after = rows.last().map(|r| r.key.clone());
        options.progress.call(&Progress {
            table: t.table,
            done: report.rows,
            total,
            elapsed: started.elapsed(),
        });
    }
    report.elapsed = started.elapsed();
    tracing::info!(
        table = t.table,
        rows = report.rows,
        written = report.written,
        conflicts = report.conflicts,
        "re-index finished"
    );
    Ok(report)
}

/// Index columns with their tags (`None`: NULL).
type Tags = Vec<(&'static str, Option<Vec<u8>>)>;

/// Every index column of `row` with the tag its values give under the
/// owner's current version (`None` beside a NULL value).
fn tags_of(t: &StoredTable, row: &MigrationRow, keys: &OwnerKeys) -> Result<Tags> {
    let mut canonicals: Vec<Option<Zeroizing<Vec<u8>>>> = Vec::with_capacity(t.columns.len());
    let mut out = Vec::new();
    for (i, c) in t.columns.iter().enumerate() {
        let stored = row
            .values
            .get(t.sealed_position(i))
            .and_then(Option::as_ref);
        let canonical = match stored {
            None => None,
            Some(bytes) => {
                let unreadable = |why: String| Error::DataTable {
                    operation: "re-indexing a sealed row",
                    table: t.table.to_owned(),
                    column: c.sealed_column().to_owned(),
                    owner: row.owner.clone(),
                    source: format!("row {:?}: {why}", row.key_text()).into(),
                };
                let plain = Zeroizing::new(
                    keys.open::<Vec<u8>>(Encrypted::from_bytes(bytes.clone()), c.scope, &row.row)
                        .map_err(|e| unreadable(e.to_string()))?,
                );
                Some(
                    (c.canonical)(plain.to_vec())
                        .map_err(|e| unreadable(format!("opens, but does not decode: {e}")))?,
                )
            }
        };
        for (name, index) in c.indexes() {
            let tag = match &canonical {
                Some(canonical) => Some(index.current(keys, c.scope, canonical)?),
                None => None,
            };
            out.push((name, tag));
        }
        canonicals.push(canonical);
    }
    for c in &t.compounds {
        let parts = c.parts_of(&canonicals);
        let tag = match parts {
            Some(parts) => keys.compound_index_encoded(None, c.scope, &parts, &c.index)?,
            None => None,
        };
        out.push((c.column, tag));
    }
    Ok(out)
}
