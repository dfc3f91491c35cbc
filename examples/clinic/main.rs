//! A small clinic: surgical cases whose patient fields are sealed under each
//! provider's own data key, on SQLite, MariaDB/MySQL or PostgreSQL.
//!
//! ```sh
//! cargo run --example clinic                   # first run: creates clinic.db, seeds, shows
//! cargo run --example clinic -- --help         # every command
//! cargo run --example clinic -- case list
//! cargo run --example clinic --features postgres -- \
//!     --database-url postgres://app@db/clinic demo
//! ```
//!
//! With no arguments and no configuration it creates `clinic.db` in the
//! current directory (running the clinic's migrations and phi's), a
//! development master key file beside it, seeds five cases of three
//! providers on the first run, and on every run prints the cases decrypted,
//! one stored value as the raw bytes the database holds, and the keyring's
//! counters. A second run reuses the database and the key.
//!
//! - `--database-url` / `DATABASE_URL`: `sqlite://FILE` or a path (default
//!   `sqlite://clinic.db`), `mysql://…`, `postgres://…` (built with
//!   `--features mysql` / `--features postgres`).
//! - `PHI_MASTER_KEY` (base64) or `PHI_MASTER_KEY_FILE`: the master key, as
//!   production would set it; or `--kek aws-kms:KEY` / `PHI_KEK` with
//!   `--features aws-kms`.
//!
//! The commands also walk through adopting phi on a database that predates
//! it: `seed-legacy` writes plaintext rows, `rollout` turns sealing on per
//! owner, `backfill` seals the old rows, `verify` and `digest` check the
//! result, `decrypt-back` rolls it all back (see the README). Those
//! migration commands, and `status`, are phi's own (`phi_types::cli`).

mod commands;
mod db;
mod migration;
mod model;
mod schema;

use std::path::PathBuf;
use std::process::ExitCode;

use chrono::NaiveDate;
use clap::{Parser, Subcommand};

/// The clinic's error and result types.
pub(crate) type Error = Box<dyn std::error::Error>;
/// The clinic's result type.
pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

/// A small clinic on phi: surgical cases whose patient fields are sealed
/// under each provider's own data key.
///
/// Without a command: creates and seeds the database on the first run, then
/// shows the cases, one stored value as raw bytes, and the keyring's counters.
#[derive(Debug, Parser)]
#[command(name = "clinic")]
pub(crate) struct Cli {
    /// Database URL: `sqlite://FILE` (or a file path), `mysql://…`, `postgres://…`.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://clinic.db",
        global = true,
        hide_env_values = true
    )]
    database_url: String,

    /// The KEK that wraps new data keys: `aws-kms:KEY` (key id, ARN or
    /// `alias/…`; a build with `--features aws-kms`) or `local:ID` (the master
    /// key in PHI_MASTER_KEY / PHI_MASTER_KEY_FILE). Default: that local
    /// master key as `local-1` (or `PHI_KEK_ID`), else a development key file (KEK id
    /// `clinic-dev`; refused on a database holding keys of another KEK).
    #[arg(long, env = "PHI_KEK", global = true)]
    kek: Option<phi_types::KekSpec>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Adds made-up cases, sealed, for a few providers.
    Demo {
        /// Providers (`provider-001`, …).
        #[arg(long, default_value_t = 3)]
        owners: u64,
        /// Cases for each provider.
        #[arg(long, default_value_t = 4)]
        cases_per_owner: u64,
    },
    /// Creates, reads, changes, deletes and finds cases.
    #[command(subcommand)]
    Case(CaseCommand),
    /// Writes one provider's cases, decrypted, to a CSV file.
    Export {
        /// The provider.
        #[arg(long)]
        owner: String,
        /// The CSV file to write (created with mode 0600).
        #[arg(long)]
        csv: PathBuf,
    },
    /// Writes plaintext cases with the encrypted flag off, as a database
    /// that predates phi holds them.
    SeedLegacy {
        /// How many cases.
        #[arg(long)]
        cases: u64,
        /// Spread over this many providers.
        #[arg(long, default_value_t = 50)]
        owners: u64,
    },
    /// Which providers' new rows are sealed (the gradual roll-out).
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// A SHA-256 over every case's decrypted fields, in case id order: the
    /// same before and after a backfill or a rollback.
    Digest,
    /// phi's migration commands on both tables: `backfill`, `verify`,
    /// `decrypt-back` (which first stops sealing new rows), `status`.
    #[command(flatten)]
    Jobs(phi_types::cli::JobCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum CaseCommand {
    /// Creates a case; prints its id.
    Create {
        /// The provider who owns the case.
        #[arg(long)]
        owner: String,
        /// Patient's first name.
        #[arg(long)]
        first: String,
        /// Patient's last name.
        #[arg(long)]
        last: String,
        /// Patient's date of birth, YYYY-MM-DD.
        #[arg(long)]
        dob: NaiveDate,
        /// Insurance provider.
        #[arg(long)]
        insurer: Option<String>,
        /// Procedure (CPT) code.
        #[arg(long)]
        procedure: String,
        /// Surgery date, YYYY-MM-DD.
        #[arg(long)]
        surgery_date: NaiveDate,
        /// Status.
        #[arg(long, default_value = "scheduled")]
        status: String,
    },
    /// Shows one case, decrypted.
    Get {
        /// The case id.
        id: String,
    },
    /// Lists cases, decrypted, in id order.
    List {
        /// Only this provider's cases.
        #[arg(long)]
        owner: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Changes a case: only the changed fields are sealed again.
    Update {
        /// The case id.
        id: String,
        /// New first name.
        #[arg(long)]
        first: Option<String>,
        /// New last name.
        #[arg(long)]
        last: Option<String>,
        /// New date of birth, YYYY-MM-DD.
        #[arg(long)]
        dob: Option<NaiveDate>,
        /// New insurance provider.
        #[arg(long, conflicts_with = "no_insurer")]
        insurer: Option<String>,
        /// Removes the insurance provider.
        #[arg(long)]
        no_insurer: bool,
        /// New procedure code.
        #[arg(long)]
        procedure: Option<String>,
        /// New surgery date, YYYY-MM-DD.
        #[arg(long)]
        surgery_date: Option<NaiveDate>,
        /// New status.
        #[arg(long)]
        status: Option<String>,
    },
    /// Deletes a case: moves it to deleted_cases, still sealed under its provider.
    Delete {
        /// The case id.
        id: String,
    },
    /// A provider's cases. With `--last` and `--dob`: the duplicate-case
    /// check, through the blind indexes. Otherwise a search within the
    /// provider: the surgery dates in SQL (they are stored in clear), the
    /// encrypted fields tested once opened (`PhiRecord::load_where`).
    Find {
        /// The provider.
        #[arg(long)]
        owner: String,
        /// Patient's last name (case and surrounding spaces do not matter).
        #[arg(long)]
        last: Option<String>,
        /// Patient's date of birth, YYYY-MM-DD.
        #[arg(long)]
        dob: Option<NaiveDate>,
        /// The start of the patient's last name (case and leading spaces do
        /// not matter).
        #[arg(long)]
        last_prefix: Option<String>,
        /// The patient's year of birth.
        #[arg(long)]
        dob_year: Option<i32>,
        /// Surgeries on or after this date, YYYY-MM-DD.
        #[arg(long)]
        surgery_from: Option<NaiveDate>,
        /// Surgeries on or before this date, YYYY-MM-DD.
        #[arg(long)]
        surgery_to: Option<NaiveDate>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum RolloutCommand {
    /// Seals this provider's new rows.
    Enable {
        /// The provider.
        #[arg(long)]
        owner: String,
    },
    /// Stops sealing this provider's new rows (rows already sealed stay sealed).
    Disable {
        /// The provider.
        #[arg(long)]
        owner: String,
    },
    /// Seals every provider's new rows.
    All,
    /// Shows the roll-out.
    Status,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match commands::run(cli) {
        Ok(code) => code,
        Err(error) => {
            // Output piped into a command that stopped reading: done.
            if error
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            {
                return ExitCode::FAILURE;
            }
            // The whole chain on one line: phi's errors never repeat their
            // source, so each cause is printed after the message.
            let mut line = format!("error: {error}");
            let mut source = error.source();
            while let Some(cause) = source {
                line.push_str(": ");
                line.push_str(&cause.to_string());
                source = cause.source();
            }
            eprintln!("{line}");
            ExitCode::FAILURE
        }
    }
}
