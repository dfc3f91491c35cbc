//! `backfill`, `verify`, `decrypt-back` and `status`: phi's migration
//! commands (`phi_types::cli::JobCommand`) run on both of the clinic's tables,
//! with the clinic's connection and keyring.

use std::process::ExitCode;

use phi_types::Rollout;
use phi_types::cli::{Format, JobCommand, Jobs};

use crate::Result;
use crate::commands::{Clinic, outln};
use crate::db;
use crate::model::{Case, DeletedCase};

/// Runs one of phi's migration commands on the clinic's tables. Before a
/// backfill, says which providers' new rows are sealed; before the
/// rollback (confirmed, not a dry run), stops sealing new rows (the
/// persisted roll-out becomes nobody), as phi's `decrypt-back` requires.
pub(crate) fn run(clinic: &mut Clinic, job: &JobCommand) -> Result<ExitCode> {
    match job {
        JobCommand::Backfill(_) => {}
        JobCommand::DecryptBack(args) if args.yes && !args.migrate.dry_run => {
            clinic.set_rollout(Rollout::Nobody)?;
        }
        _ => return run_jobs(clinic, job),
    }
    outln!(
        "Roll-out: {}.",
        db::describe_rollout(&clinic.keyring.rollout())
    );
    run_jobs(clinic, job)
}

fn run_jobs(clinic: &mut Clinic, job: &JobCommand) -> Result<ExitCode> {
    let jobs = Jobs::new().model::<Case>().model::<DeletedCase>();
    let keyring = &clinic.keyring;
    db::on_backend!(&mut clinic.conn, c => jobs.run(c, keyring, job, Format::Text, true))
}
