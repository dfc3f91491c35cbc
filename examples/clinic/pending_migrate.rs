//! TEMPORARY: a local stand-in for `phi::migrate` (backfill, rollback and
//! verification of a model with an encrypted flag), with the same types
//! and arguments, so that `backfill`, `verify` and `decrypt-back` work
//! until the library's version is merged. Then this file, its `mod` line in
//! `main.rs` and the `use` in `migration.rs` go, and `migration.rs` calls
//! the library (the three lines marked there).
//!
//! Simpler than the library: it reads and writes whole rows through the
//! models (a plain column changed by the application between the read and
//! the write of a batch is written back as read), and its verification
//! takes the first rows in key order as its sample.
#![allow(dead_code)]

use std::collections::HashSet;
use std::fmt;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use phi::{Error, Keyring, PhiRecord, Rollout, SealedRecord as _};

use crate::db::AnyConnection;
use crate::model::{Case, CaseSealed, DeletedCase, DeletedCaseSealed};
use crate::schema::{cases, deleted_cases};

/// How a job runs.
#[derive(Clone, Debug)]
pub(crate) struct MigrateOptions {
    batch: usize,
    dry_run: bool,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            batch: 1000,
            dry_run: false,
        }
    }
}

impl MigrateOptions {
    /// Rows per batch (one transaction each).
    pub(crate) fn batch(mut self, rows: usize) -> Self {
        self.batch = rows.max(1);
        self
    }

    /// Count only; change nothing.
    pub(crate) fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }
}

/// Where a job is.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Progress {
    pub(crate) done: u64,
    pub(crate) total: u64,
    pub(crate) elapsed: Duration,
}

impl Progress {
    /// Rows per second so far.
    pub(crate) fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.done as f64 / secs
        } else {
            0.0
        }
    }

    /// Time left at the current rate.
    pub(crate) fn eta(&self) -> Option<Duration> {
        let rate = self.rate();
        (rate > 0.0)
            .then(|| Duration::from_secs_f64(self.total.saturating_sub(self.done) as f64 / rate))
    }
}

/// What a backfill or rollback did.
#[derive(Clone, Debug, Default)]
pub(crate) struct MigrationReport {
    pub(crate) rows: u64,
    pub(crate) values: u64,
    pub(crate) batches: u64,
    pub(crate) skipped: u64,
    pub(crate) owners: u64,
    pub(crate) new_owner_keys: u64,
    pub(crate) undecodable: u64,
    pub(crate) remaining: u64,
    pub(crate) elapsed: Duration,
    pub(crate) dry_run: bool,
}

impl fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run {
            "would change"
        } else {
            "changed"
        };
        write!(
            f,
            "{verb} {} row(s) ({} value(s), {} owner(s), {} new data key(s)) in {} batch(es) in {:.1} s; \
             {} skipped, {} undecodable, {} left to do",
            self.rows,
            self.values,
            self.owners,
            self.new_owner_keys,
            self.batches,
            self.elapsed.as_secs_f64(),
            self.skipped,
            self.undecodable,
            self.remaining
        )
    }
}

/// A row that does not open.
#[derive(Clone, Debug)]
pub(crate) struct VerifyFailure {
    pub(crate) table: &'static str,
    pub(crate) row_key: String,
    pub(crate) problem: String,
}

impl fmt::Display for VerifyFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} row {}: {}", self.table, self.row_key, self.problem)
    }
}

/// What a verification found.
#[derive(Clone, Debug, Default)]
pub(crate) struct VerifyReport {
    pub(crate) sealed: u64,
    pub(crate) unsealed: u64,
    pub(crate) failed: u64,
    pub(crate) failures: Vec<VerifyFailure>,
}

impl VerifyReport {
    /// Whether every row checked opened.
    pub(crate) fn is_ok(&self) -> bool {
        self.failed == 0
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} sealed row(s) open, {} plain row(s) decode, {} fail",
            self.sealed, self.unsealed, self.failed
        )?;
        for failure in &self.failures {
            write!(f, "\n  {failure}")?;
        }
        Ok(())
    }
}

/// The table access the stand-in needs, per model.
pub(crate) trait Migratable: PhiRecord + Clone {
    /// The row key of a stored row.
    fn key_of(row: &Self::Sealed) -> &str;
    /// Rows with this flag (or all).
    fn count(conn: &mut AnyConnection, sealed: Option<bool>) -> QueryResult<i64>;
    /// Up to `limit` rows with this flag (or all) after `after`, in key order.
    fn page(
        conn: &mut AnyConnection,
        sealed: Option<bool>,
        after: &str,
        limit: i64,
    ) -> QueryResult<Vec<Self::Sealed>>;
    /// Writes `row` over the stored row if its flag is still `was_sealed`.
    fn write(conn: &mut AnyConnection, row: &Self::Sealed, was_sealed: bool) -> QueryResult<usize>;
}

macro_rules! migratable {
    ($model:ty, $sealed:ty, $table:ident, [$($bidx:ident),*]) => {
        impl Migratable for $model {
            fn key_of(row: &$sealed) -> &str {
                &row.case_id
            }

            fn count(conn: &mut AnyConnection, sealed: Option<bool>) -> QueryResult<i64> {
                let mut query = $table::table.count().into_boxed();
                if let Some(flag) = sealed {
                    query = query.filter($table::phi_encrypted.eq(flag));
                }
                query.get_result(conn)
            }

            fn page(
                conn: &mut AnyConnection,
                sealed: Option<bool>,
                after: &str,
                limit: i64,
            ) -> QueryResult<Vec<$sealed>> {
                let mut query = $table::table
                    .filter($table::case_id.gt(after.to_owned()))
                    .order($table::case_id)
                    .limit(limit)
                    .select(<$sealed>::as_select())
                    .into_boxed();
                if let Some(flag) = sealed {
                    query = query.filter($table::phi_encrypted.eq(flag));
                }
                query.load(conn)
            }

            fn write(conn: &mut AnyConnection, row: &$sealed, was_sealed: bool) -> QueryResult<usize> {
                let n = diesel::update(
                    $table::table
                        .find(&row.case_id)
                        .filter($table::phi_encrypted.eq(was_sealed)),
                )
                .set(row)
                .execute(conn)?;
                if n == 1 && !row.phi_encrypted {
                    $(
                        diesel::update($table::table.find(&row.case_id))
                            .set($table::$bidx.eq(None::<Vec<u8>>))
                            .execute(conn)?;
                    )*
                }
                Ok(n)
            }
        }
    };
}
migratable!(
    Case,
    CaseSealed,
    cases,
    [patient_last_bidx, patient_dob_bidx]
);
migratable!(DeletedCase, DeletedCaseSealed, deleted_cases, []);

fn db(operation: &'static str, table: &'static str) -> impl FnOnce(diesel::result::Error) -> Error {
    move |source| Error::Database {
        operation,
        table,
        source,
    }
}

fn as_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Seals, batch by batch, the rows stored in plain text of the owners the
/// keyring's roll-out covers; others are counted as skipped.
pub(crate) fn backfill<M: Migratable>(
    conn: &mut AnyConnection,
    keyring: &Keyring,
    options: &MigrateOptions,
    progress: &mut dyn FnMut(&Progress),
) -> phi::Result<MigrationReport> {
    seal_unsealed::<M>(conn, keyring, options, progress)
}

/// Writes every sealed row back in plain text, batch by batch.
pub(crate) fn decrypt_back<M: Migratable>(
    conn: &mut AnyConnection,
    keyring: &Keyring,
    options: &MigrateOptions,
    progress: &mut dyn FnMut(&Progress),
) -> phi::Result<MigrationReport> {
    let plain = Keyring::builder(keyring.store().clone(), keyring.primary_kek().clone())
        .rollout(Rollout::Nobody)
        .build()?;
    // Opening needs the configured keys; sealing under `plain` stores the
    // plain encoding.
    rewrite_back::<M>(conn, keyring, &plain, options, progress)
}

fn seal_unsealed<M: Migratable>(
    conn: &mut AnyConnection,
    keyring: &Keyring,
    options: &MigrateOptions,
    progress: &mut dyn FnMut(&Progress),
) -> phi::Result<MigrationReport> {
    let started = Instant::now();
    let creations = keyring.stats().creations;
    let total = as_u64(M::count(conn, Some(false)).map_err(db("counting rows", M::TABLE))?);
    let mut report = MigrationReport {
        dry_run: options.dry_run,
        ..MigrationReport::default()
    };
    let mut owners = HashSet::new();
    let mut after = String::new();
    let limit = i64::try_from(options.batch).unwrap_or(i64::MAX);
    loop {
        let rows =
            M::page(conn, Some(false), &after, limit).map_err(db("reading rows", M::TABLE))?;
        let Some(last) = rows.last() else { break };
        after = M::key_of(last).to_owned();
        let mut todo = Vec::new();
        for row in M::open_each(rows, keyring)? {
            match row {
                Ok(record) if keyring.encrypts_for(&record.owner_id()) => todo.push(record),
                Ok(_) => report.skipped += 1,
                Err(_) => report.undecodable += 1,
            }
        }
        owners.extend(todo.iter().map(|r| r.owner_id().into_owned()));
        if options.dry_run {
            report.rows += todo.len() as u64;
        } else if !todo.is_empty() {
            // Sealed before the transaction opens.
            let sealed = M::seal_all(&todo, keyring)?;
            let written = conn
                .transaction(|c| {
                    let mut n = 0u64;
                    for row in &sealed {
                        n += M::write(c, row, false)? as u64;
                    }
                    diesel::QueryResult::Ok(n)
                })
                .map_err(db("writing sealed rows", M::TABLE))?;
            for row in &sealed {
                row.key_versions(&mut |_| report.values += 1);
            }
            report.rows += written;
            report.skipped += todo.len() as u64 - written;
            report.batches += 1;
        }
        progress(&Progress {
            done: report.rows + report.skipped + report.undecodable,
            total,
            elapsed: started.elapsed(),
        });
    }
    report.owners = owners.len() as u64;
    report.new_owner_keys = keyring.stats().creations - creations;
    report.remaining = as_u64(M::count(conn, Some(false)).map_err(db("counting rows", M::TABLE))?);
    report.elapsed = started.elapsed();
    Ok(report)
}

fn rewrite_back<M: Migratable>(
    conn: &mut AnyConnection,
    keyring: &Keyring,
    plain: &Keyring,
    options: &MigrateOptions,
    progress: &mut dyn FnMut(&Progress),
) -> phi::Result<MigrationReport> {
    let started = Instant::now();
    let total = as_u64(M::count(conn, Some(true)).map_err(db("counting rows", M::TABLE))?);
    let mut report = MigrationReport {
        dry_run: options.dry_run,
        ..MigrationReport::default()
    };
    let mut owners = HashSet::new();
    let mut after = String::new();
    let limit = i64::try_from(options.batch).unwrap_or(i64::MAX);
    loop {
        let rows =
            M::page(conn, Some(true), &after, limit).map_err(db("reading rows", M::TABLE))?;
        let Some(last) = rows.last() else { break };
        after = M::key_of(last).to_owned();
        let mut todo = Vec::new();
        for row in M::open_each(rows, keyring)? {
            match row {
                Ok(record) => todo.push(record),
                Err(_) => report.undecodable += 1,
            }
        }
        owners.extend(todo.iter().map(|r| r.owner_id().into_owned()));
        if options.dry_run {
            report.rows += todo.len() as u64;
        } else if !todo.is_empty() {
            let unsealed = M::seal_all(&todo, plain)?;
            let written = conn
                .transaction(|c| {
                    let mut n = 0u64;
                    for row in &unsealed {
                        n += M::write(c, row, true)? as u64;
                    }
                    diesel::QueryResult::Ok(n)
                })
                .map_err(db("writing rows back in plain text", M::TABLE))?;
            report.rows += written;
            report.skipped += todo.len() as u64 - written;
            report.batches += 1;
        }
        progress(&Progress {
            done: report.rows + report.skipped + report.undecodable,
            total,
            elapsed: started.elapsed(),
        });
    }
    report.owners = owners.len() as u64;
    report.remaining = as_u64(M::count(conn, Some(true)).map_err(db("counting rows", M::TABLE))?);
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Opens every row (or the first `sample`) in key order.
pub(crate) fn verify<M: Migratable>(
    conn: &mut AnyConnection,
    keyring: &Keyring,
    sample: Option<usize>,
    progress: &mut dyn FnMut(&Progress),
) -> phi::Result<VerifyReport> {
    let started = Instant::now();
    let all = as_u64(M::count(conn, None).map_err(db("counting rows", M::TABLE))?);
    let total = sample.map_or(all, |s| all.min(s as u64));
    let mut report = VerifyReport::default();
    let mut after = String::new();
    let mut done = 0u64;
    while done < total {
        let limit = i64::try_from((total - done).min(1000)).unwrap_or(1000);
        let rows = M::page(conn, None, &after, limit).map_err(db("reading rows", M::TABLE))?;
        let Some(last) = rows.last() else { break };
        after = M::key_of(last).to_owned();
        let meta: Vec<(String, bool)> = rows
            .iter()
            .map(|r| (M::key_of(r).to_owned(), r.is_encrypted()))
            .collect();
        for ((key, sealed), result) in meta.into_iter().zip(M::open_each(rows, keyring)?) {
            match result {
                Ok(_) if sealed => report.sealed += 1,
                Ok(_) => report.unsealed += 1,
                Err(error) => {
                    report.failed += 1;
                    report.failures.push(VerifyFailure {
                        table: M::TABLE,
                        row_key: key,
                        problem: error.to_string(),
                    });
                }
            }
            done += 1;
        }
        progress(&Progress {
            done,
            total,
            elapsed: started.elapsed(),
        });
    }
    Ok(report)
}
