//! `phi migrations`: phi's own tables, in the application's hands.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use super::{BackendArg, Cli, CliResult, Format, backend};
use crate::migrations;

/// `phi migrations …`.
#[derive(Debug, Subcommand)]
pub(super) enum MigrationsCommand {
    /// Writes phi's migrations (`up.sql` and `down.sql` per migration)
    /// into the application's Diesel migrations directory, for `diesel
    /// migration run` to apply with the application's own. Writes only what
    /// is not there yet, never overwrites a file that differs, and refuses
    /// an application migration under one of phi's versions.
    Write {
        /// The application's migrations directory (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: std::path::PathBuf,
        /// The backend the SQL is for; default: the --database-url
        /// scheme's.
        #[arg(long, value_enum)]
        backend: Option<BackendArg>,
    },
    /// Runs phi's pending migrations on --database-url (recorded in
    /// Diesel's `__diesel_schema_migrations` under phi's versions), then
    /// checks phi's tables. Refuses, before any change, a database where a
    /// table of phi's name is another application's.
    Run,
    /// Checks that phi's tables are in place for this build (what the
    /// commands and `DieselKeyStore::connect` check), changing nothing.
    /// Exit status 1 names the table and the migration of phi missing.
    Check,
}

/// Runs a `phi migrations` command.
pub(super) fn run(cli: &Cli, url: Option<&str>, command: &MigrationsCommand) -> CliResult {
    match command {
        MigrationsCommand::Write { dir, backend: arg } => {
            let backend = match (arg, url) {
                (Some(BackendArg::Sqlite), _) => migrations::Backend::Sqlite,
                (Some(BackendArg::Mysql), _) => migrations::Backend::Mysql,
                (Some(BackendArg::Postgres), _) => migrations::Backend::Postgres,
                (None, Some(url)) => migrations::Backend::from_url(url)?,
                (None, None) => {
                    return Err(
                        "which backend? pass --backend (sqlite, mysql, postgres) or \
                                --database-url / DATABASE_URL"
                            .into(),
                    );
                }
            };
            let written = migrations::write_to(dir, backend)?;
            match cli.format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "command": "migrations write",
                        "dir": dir.display().to_string(),
                        "backend": backend.name(),
                        "created": written.created,
                        "unchanged": written.unchanged,
                    }))?
                ),
                _ => {
                    for name in &written.created {
                        println!("wrote {}", dir.join(name).display());
                    }
                    println!(
                        "{} migration(s) of phi written for {}, {} already there, in {}; \
                         apply them with `diesel migration run`.",
                        written.created.len(),
                        backend.name(),
                        written.unchanged.len(),
                        dir.display()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        MigrationsCommand::Run | MigrationsCommand::Check => {
            let url = url.ok_or("no database: pass --database-url or set DATABASE_URL")?;
            let (backend, url) = backend(url)?;
            let run = matches!(command, MigrationsCommand::Run);
            let applied = match backend {
                #[cfg(feature = "sqlite")]
                super::Backend::Sqlite => on::<diesel::SqliteConnection>(&url, run)?,
                #[cfg(feature = "mysql")]
                super::Backend::Mysql => on::<diesel::MysqlConnection>(&url, run)?,
                #[cfg(feature = "postgres")]
                super::Backend::Postgres => on::<diesel::PgConnection>(&url, run)?,
                #[allow(unreachable_patterns)]
                _ => {
                    return Err(
                        "this phi was built without support for this database's backend".into(),
                    );
                }
            };
            let name = if run {
                "migrations run"
            } else {
                "migrations check"
            };
            match cli.format {
                Format::Json => {
                    let mut doc = json!({ "command": name, "ready": true });
                    if run {
                        doc["applied"] = json!(applied);
                    }
                    println!("{}", serde_json::to_string_pretty(&doc)?);
                }
                _ if run => {
                    println!("{applied} migration(s) of phi applied; phi's tables are ready.")
                }
                _ => println!("phi's tables are ready."),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs (when `run`) and checks phi's migrations on `url`; how many ran.
#[allow(dead_code)] // Without a backend feature, nothing runs.
fn on<C: crate::PhiConnection>(url: &str, run: bool) -> CliResult<usize> {
    let mut conn = C::establish(url)?;
    conn.prepare_key_store()?;
    let applied = if run {
        migrations::refuse_foreign(&mut conn)?;
        migrations::run_pending(&mut conn)?
    } else {
        0
    };
    migrations::check(&mut conn)?;
    Ok(applied)
}
