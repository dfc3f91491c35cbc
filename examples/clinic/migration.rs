//! `backfill`, `verify` and `decrypt-back`: phi's migration jobs run on
//! both of the clinic's tables, with a progress bar.

use std::process::ExitCode;

use phi::{Keyring, Rollout};

use crate::Result;
use crate::commands::{Clinic, bar, outln};
use crate::db::{self, AnyConnection};
use crate::model::{Case, DeletedCase};
use phi::migrate::{self, Migratable, MigrateOptions, MigrationReport, Progress, VerifyReport};

/// A progress callback drawing `bar`.
fn on_progress(bar: &indicatif::ProgressBar) -> impl FnMut(&Progress) + '_ {
    move |p: &Progress| {
        bar.set_length(p.total);
        bar.set_position(p.done);
    }
}

/// Seals (`sealing`) or unseals one table's rows.
fn migrate_table<M: Migratable>(
    conn: &mut AnyConnection,
    keyring: &Keyring,
    options: &MigrateOptions,
    sealing: bool,
    progress: &mut dyn FnMut(&Progress),
) -> phi::Result<MigrationReport> {
    if sealing {
        crate::db::on_backend!(conn, c => migrate::backfill::<M, _>(c, keyring, options, progress))
    } else {
        crate::db::on_backend!(conn, c => migrate::decrypt_back::<M, _>(c, keyring, options, progress))
    }
}

/// Runs the backfill (`sealing`) or the rollback on both tables, each with
/// a progress bar, and prints their reports.
fn migrate_tables(clinic: &mut Clinic, options: &MigrateOptions, sealing: bool) -> Result<()> {
    for table in [Table::Cases, Table::DeletedCases] {
        let verb = if sealing { "sealing" } else { "decrypting" };
        let progress = bar(0, &format!("{verb} {}", table.name()));
        let report = {
            let mut on = on_progress(&progress);
            let (conn, keyring) = (&mut clinic.conn, &clinic.keyring);
            match table {
                Table::Cases => migrate_table::<Case>(conn, keyring, options, sealing, &mut on),
                Table::DeletedCases => {
                    migrate_table::<DeletedCase>(conn, keyring, options, sealing, &mut on)
                }
            }
        };
        progress.finish_and_clear();
        outln!("{}", report?);
    }
    Ok(())
}

fn verify_table<M: Migratable>(
    conn: &mut AnyConnection,
    keyring: &Keyring,
    sample: Option<usize>,
    progress: &mut dyn FnMut(&Progress),
) -> phi::Result<VerifyReport> {
    crate::db::on_backend!(conn, c => migrate::verify::<M, _>(c, keyring, sample, progress))
}

/// Seals the rows still stored in plain text, in both tables. Resumable: a
/// run that stops half-way (even killed) is completed by running it again.
pub(crate) fn backfill(clinic: &mut Clinic, dry_run: bool, batch: usize) -> Result<ExitCode> {
    outln!(
        "Roll-out: {}.",
        db::describe_rollout(&clinic.keyring.rollout())
    );
    let options = MigrateOptions::default().batch(batch).dry_run(dry_run);
    migrate_tables(clinic, &options, true)?;
    Ok(ExitCode::SUCCESS)
}

/// The emergency rollback: stops sealing new rows (the persisted roll-out
/// becomes nobody), then writes every sealed row of both tables back in
/// plain text. Resumable like the backfill.
pub(crate) fn decrypt_back(clinic: &mut Clinic, yes: bool, batch: usize) -> Result<ExitCode> {
    if !yes {
        return Err(
            "decrypt-back stores every patient field in plain text again; \
                    pass --yes to confirm"
                .into(),
        );
    }
    clinic.set_rollout(Rollout::Nobody)?;
    outln!(
        "Roll-out: {}.",
        db::describe_rollout(&clinic.keyring.rollout())
    );
    let options = MigrateOptions::default().batch(batch);
    migrate_tables(clinic, &options, false)?;
    Ok(ExitCode::SUCCESS)
}

/// Opens every row (or a sample) of both tables; fails when any does not.
pub(crate) fn verify(clinic: &mut Clinic, sample: Option<usize>) -> Result<ExitCode> {
    let mut ok = true;
    for table in [Table::Cases, Table::DeletedCases] {
        let progress = bar(0, &format!("verifying {}", table.name()));
        let report = {
            let mut on = on_progress(&progress);
            match table {
                Table::Cases => {
                    verify_table::<Case>(&mut clinic.conn, &clinic.keyring, sample, &mut on)
                }
                Table::DeletedCases => {
                    verify_table::<DeletedCase>(&mut clinic.conn, &clinic.keyring, sample, &mut on)
                }
            }
        };
        progress.finish_and_clear();
        let report = report?;
        outln!("{report}");
        ok &= report.is_ok();
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[derive(Clone, Copy)]
enum Table {
    Cases,
    DeletedCases,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Cases => "cases",
            Table::DeletedCases => "deleted_cases",
        }
    }
}
