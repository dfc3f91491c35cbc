//! The migration jobs of an application's derived models as commands:
//! `backfill`, `verify`, `decrypt-back`, `reindex` and `status`, with progress bars,
//! `--dry-run`, `--batch`, `--rate` and `--format json`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{CliResult, EXIT_NOT_VERIFIED, Format, Refused, bar};
use crate::adopt::{self, SchemaConnection, Strategy};
use crate::legacy::Dialect;
use crate::legacy::{LegacyCount, LegacyDecoder, LegacyDecoders, VersionedGcmDecoder};
use crate::lifecycle::ResealTable;
use crate::migrate::{
    self, DEFAULT_BATCH, Migratable, MigrateOptions, MigrationReport, Progress, StoredTable,
    VerifyFailure, VerifyOptions, VerifyReport,
};
use crate::{Keyring, Rollout};

/// The migration commands, for the models registered with
/// [`Jobs::model`] (or [`App::model`](super::App::model)).
///
/// An application with a command line of its own flattens them into its
/// `clap` subcommands (`#[command(flatten)]`) and runs the parsed command
/// with [`Jobs::run`]; [`App`](super::App) does both.
#[derive(Debug, Clone, clap::Subcommand)]
#[non_exhaustive]
pub enum JobCommand {
    /// Seals every row of the models' tables whose encrypted flag is off,
    /// batch by batch (one transaction each); resumable, and safe beside
    /// the application and another run. Owners without a data key get one.
    Backfill(MigrateArgs),
    /// Checks the models' stored rows: sealed ones open, decode and have
    /// current blind indexes; rows with the flag off decode. Exit status 4
    /// when a row fails.
    Verify(VerifyArgs),
    /// The emergency rollback: writes every sealed row of the models'
    /// tables back in its plain encoding with the flag off. Refused unless
    /// the roll-out seals nobody's new rows (`rollout nobody` first) and
    /// `--yes` is given.
    DecryptBack(DecryptBackArgs),
    /// Writes the index columns (blind, derived, compound) of every sealed
    /// row from its values, under the owner's current key version: after
    /// adding an index to a model whose table holds sealed rows, or to
    /// repair tags `verify` reports. Each row is written only if its tags
    /// differ, guarded by its values as read (a row the application changed
    /// meanwhile is left as it wrote it); resumable.
    Reindex(MigrateArgs),
    /// Per table: rows sealed and rows with the encrypted flag off.
    Status(StatusArgs),
    /// Schema migrations generated from a model and its live table.
    #[command(subcommand)]
    Migration(MigrationCommand),
    /// Ends the dual-write phase of a model with shadow columns: checks
    /// that every row is sealed and verifies (exit status 4 otherwise),
    /// then writes the migration that drops the plain columns and renames
    /// the shadows to their names.
    Finalize(FinalizeArgs),
}

/// `migration …`.
#[derive(Debug, Clone, clap::Subcommand)]
#[non_exhaustive]
pub enum MigrationCommand {
    /// Writes a Diesel migration (`up.sql`, `down.sql`) adopting a model's
    /// table, generated from the model and the table as the database
    /// describes it; prints the directory written.
    Generate(GenerateArgs),
    /// Records the values of the models' tables that a legacy decoder
    /// recognises (table, column, row key, owner, exact value), the only
    /// ones `backfill` will decode. Run it before deploying phi's writers,
    /// never after (the generated in-place and shadow migrations record
    /// the shipped formats themselves); refused once a row is sealed.
    RecordLegacy(RecordLegacyArgs),
}

/// Options of `migration record-legacy`.
#[derive(Debug, Clone, clap::Args)]
#[non_exhaustive]
pub struct RecordLegacyArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub models: ModelArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub legacy: LegacyArgs,
}

/// The strategies of `migration generate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[non_exhaustive]
pub enum StrategyArg {
    /// The sealed check alone (a table sealed in place, after the backfill).
    Check,
    /// The encrypted columns converted to binary where they are.
    InPlace,
    /// Shadow columns beside the plain ones (dual write).
    Shadow,
}

/// The backends `--backend` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[non_exhaustive]
pub enum BackendArg {
    /// MySQL or MariaDB.
    Mysql,
    /// PostgreSQL.
    Postgres,
    /// SQLite.
    Sqlite,
}

/// Options of `migration generate`.
#[derive(Debug, Clone, clap::Args)]
#[non_exhaustive]
pub struct GenerateArgs {
    /// The model (its type name, e.g. `Case`, or its table's name).
    #[arg(long = "model", value_name = "NAME")]
    pub model: String,
    /// Which migration.
    #[arg(long, value_enum)]
    pub strategy: StrategyArg,
    /// The backend the SQL is for: the connection's (the only one the
    /// live table can be read from).
    #[arg(long, value_enum)]
    pub backend: Option<BackendArg>,
    /// The migrations directory; the migration is a new directory in it.
    #[arg(long, value_name = "DIR")]
    pub dir: std::path::PathBuf,
}

/// Options of `finalize`.
#[derive(Debug, Clone, clap::Args)]
#[non_exhaustive]
pub struct FinalizeArgs {
    /// The model (its type name, e.g. `Case`, or its table's name).
    #[arg(long = "model", value_name = "NAME")]
    pub model: String,
    /// The migrations directory; the migration is a new directory in it.
    #[arg(long, value_name = "DIR")]
    pub dir: std::path::PathBuf,
    /// Leaves out the sealed check (a CHECK constraint, or SQLite
    /// triggers, refusing a sealed row that holds no envelope).
    #[arg(long)]
    pub no_check: bool,
}

/// Which models a job works on.
#[derive(Debug, Clone, Default, clap::Args)]
#[non_exhaustive]
pub struct ModelArgs {
    /// Only this model (its type name, e.g. `Case`, or its table's name);
    /// default: every registered model, in the order registered.
    #[arg(long = "model", value_name = "NAME")]
    pub model: Option<String>,
}

/// Options of `backfill`.
#[derive(Debug, Clone, clap::Args)]
#[non_exhaustive]
pub struct MigrateArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub models: ModelArgs,
    /// Reads and checks every row to migrate, counts what would be done,
    /// and writes nothing (no data key is created either).
    #[arg(long)]
    pub dry_run: bool,
    /// Rows per batch, each one transaction (at most 10,000).
    #[arg(long, default_value_t = DEFAULT_BATCH)]
    pub batch: usize,
    /// At most this many rows per second, on average: the job waits
    /// between batches (for a production database under load).
    #[arg(long, value_name = "ROWS_PER_SEC", value_parser = parse_rate)]
    pub rate: Option<f64>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub legacy: LegacyArgs,
}

/// Values stored before phi in an encrypted format of their own, which
/// `backfill` opens (sealing their plaintext) and `verify` checks (see
/// [`crate::legacy`]); `decrypt-back` ignores them. The application's own
/// decoder ([`App::legacy`](super::App::legacy)) is tried first, then the
/// formats named here, in the order given.
#[derive(Debug, Clone, clap::Args)]
#[non_exhaustive]
pub struct LegacyArgs {
    /// A shipped legacy format to open: `fernet` (tokens `gAAAAA…`, keys
    /// from --legacy-key-env; feature `legacy-fernet`) or `versioned-gcm`
    /// (`v1:<nonce>:<ciphertext>`, keys from --legacy-gcm-keys-env).
    /// Repeat for both.
    #[arg(long = "legacy", value_enum, value_name = "FORMAT")]
    pub formats: Vec<LegacyFormat>,
    /// The environment variables holding the Fernet keys: the primary,
    /// then fallback keys tried after it (each URL-safe base64 of 32
    /// bytes, as `Fernet.generate_key()` prints it); a fallback variable
    /// that is unset or empty is skipped.
    #[arg(
        long = "legacy-key-env",
        value_name = "PRIMARY[,FALLBACK]",
        default_value = "ENCRYPTION_KEY,ENCRYPTION_KEY_FALLBACK"
    )]
    pub key_env: String,
    /// The environment variable holding the versioned AES-GCM keys:
    /// `v1=KEY,v2=KEY` (commas, semicolons or spaces between entries), each
    /// key 256 bits as 64 hexadecimal digits or base64.
    #[arg(
        long = "legacy-gcm-keys-env",
        value_name = "NAME",
        default_value = "PHI_LEGACY_GCM_KEYS"
    )]
    pub gcm_keys_env: String,
}

impl Default for LegacyArgs {
    fn default() -> Self {
        LegacyArgs {
            formats: Vec::new(),
            key_env: "ENCRYPTION_KEY,ENCRYPTION_KEY_FALLBACK".into(),
            gcm_keys_env: "PHI_LEGACY_GCM_KEYS".into(),
        }
    }
}

/// A legacy format shipped with phi, for `--legacy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[non_exhaustive]
pub enum LegacyFormat {
    /// Fernet tokens ([`FernetDecoder`](crate::legacy::FernetDecoder),
    /// feature `legacy-fernet`).
    Fernet,
    /// `v1:<nonce>:<ciphertext>` texts ([`VersionedGcmDecoder`]).
    VersionedGcm,
}

/// Options of `decrypt-back`.
#[derive(Debug, Clone, clap::Args)]
#[non_exhaustive]
pub struct DecryptBackArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub migrate: MigrateArgs,
    /// Confirms: the values are stored unencrypted afterwards.
    #[arg(long)]
    pub yes: bool,
}

/// Options of `verify`.
#[derive(Debug, Clone, clap::Args)]
#[non_exhaustive]
pub struct VerifyArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub models: ModelArgs,
    /// Checks only this many sealed and this many unsealed rows of each
    /// table, chosen at random.
    #[arg(long)]
    pub sample: Option<usize>,
    /// At most this many rows per second, on average.
    #[arg(long, value_name = "ROWS_PER_SEC", value_parser = parse_rate)]
    pub rate: Option<f64>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub legacy: LegacyArgs,
}

/// Options of `status`.
#[derive(Debug, Clone, clap::Args)]
#[non_exhaustive]
pub struct StatusArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub models: ModelArgs,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!(
            "{text:?} is not a positive number of rows per second"
        )),
    }
}

/// A registered model: its name and how it is stored.
#[derive(Clone, Copy)]
struct Model {
    name: &'static str,
    table: fn() -> StoredTable,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// The models the migration commands work on, each described by its
/// `#[derive(PhiRecord)]` ([`Migratable`]): table, owner, row key, flag and
/// encrypted columns, never typed by hand.
#[derive(Debug, Clone, Default)]
pub struct Jobs {
    models: Vec<Model>,
    legacy: Option<Arc<dyn LegacyDecoder>>,
}

impl Jobs {
    /// No model yet.
    pub fn new() -> Jobs {
        Jobs::default()
    }

    /// Adds a model, named by its type (`Case` for `my_app::model::Case`).
    #[must_use]
    pub fn model<M: Migratable>(mut self) -> Jobs {
        let full = std::any::type_name::<M>();
        let base = full.split('<').next().unwrap_or(full);
        let name = base.rsplit("::").next().unwrap_or(base);
        self.models.push(Model {
            name,
            table: M::stored_table,
        });
        self
    }

    /// The application's own decoder of values stored before phi in an
    /// encrypted format ([`crate::legacy`]), which `backfill` and `verify`
    /// use, tried before any format named with `--legacy` (several: a
    /// [`LegacyDecoders`]).
    #[must_use]
    pub fn legacy(mut self, decoder: Arc<dyn LegacyDecoder>) -> Jobs {
        self.legacy = Some(decoder);
        self
    }

    /// The decoder of a job: the application's, then the `--legacy` ones.
    fn decoder(&self, args: &LegacyArgs) -> CliResult<Option<Arc<dyn LegacyDecoder>>> {
        let mut decoders = LegacyDecoders::new();
        let mut any = false;
        if let Some(own) = &self.legacy {
            decoders = decoders.with(own.clone());
            any = true;
        }
        let mut seen = Vec::new();
        for format in &args.formats {
            if seen.contains(format) {
                continue;
            }
            seen.push(*format);
            let decoder: Arc<dyn LegacyDecoder> = match format {
                LegacyFormat::Fernet => fernet_decoder(&args.key_env)?,
                LegacyFormat::VersionedGcm => {
                    Arc::new(VersionedGcmDecoder::from_env(args.gcm_keys_env.trim())?)
                }
            };
            decoders = decoders.with(decoder);
            any = true;
        }
        Ok(any.then(|| Arc::new(decoders) as Arc<dyn LegacyDecoder>))
    }

    /// `migration record-legacy`.
    fn record_legacy<C: SchemaConnection>(
        &self,
        conn: &mut C,
        args: &RecordLegacyArgs,
        format: Format,
    ) -> CliResult {
        let decoder = self.decoder(&args.legacy)?.ok_or(
            "migration record-legacy: no legacy decoder (name the formats with --legacy, or register the \
             application's own with App::legacy)",
        )?;
        let mut reports = Vec::new();
        for (model, table) in self.selected(&args.models)? {
            let report = migrate::record_legacy_table(&table, conn, decoder.as_ref())?;
            if format == Format::Text {
                println!("{report}");
            }
            reports.push(json!({
                "model": model.name,
                "table": report.table,
                "rows": report.rows,
                "recognised": report.recognised,
                "recorded": report.recorded,
                "elapsed_seconds": seconds(report.elapsed),
            }));
        }
        if format == Format::Json {
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "command": "record-legacy",
                    "tables": reports,
                }))?
            );
        }
        Ok(ExitCode::SUCCESS)
    }

    /// Whether no model is registered.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// The registered models' tables as the key commands (`keys reseal`,
    /// `retire`, `shred`, `status --owner`) take them.
    /// The models' lookup-indexed tables, in the order registered.
    pub(crate) fn lookup_tables(&self) -> Vec<crate::lookup::LookupTable> {
        self.models
            .iter()
            .filter_map(|m| crate::lookup::LookupTable::from_stored((m.table)()))
            .collect()
    }

    pub(crate) fn reseal_tables(&self) -> crate::Result<Vec<ResealTable>> {
        self.models
            .iter()
            .map(|m| (m.table)().reseal_table())
            .collect()
    }

    /// The one model named `name`.
    fn one(&self, name: &str) -> CliResult<(Model, StoredTable)> {
        let mut chosen = self.selected(&ModelArgs {
            model: Some(name.to_owned()),
        })?;
        if chosen.len() > 1 {
            return Err(format!("--model {name:?} names several models").into());
        }
        chosen
            .pop()
            .ok_or_else(|| format!("--model {name:?}: no such model").into())
    }

    fn selected(&self, args: &ModelArgs) -> CliResult<Vec<(Model, StoredTable)>> {
        if self.models.is_empty() {
            return Err(
                "no model is registered: the migration commands run from the application's own \
                 binary, built with phi_types::cli::App::model"
                    .into(),
            );
        }
        let all = self.models.iter().map(|m| (*m, (m.table)()));
        let Some(wanted) = &args.model else {
            return Ok(all.collect());
        };
        let chosen: Vec<_> = all
            .filter(|(m, t)| m.name == wanted || t.table == wanted)
            .collect();
        if chosen.is_empty() {
            let known: Vec<String> = self
                .models
                .iter()
                .map(|m| format!("{} (table {})", m.name, (m.table)().table))
                .collect();
            return Err(format!(
                "--model {wanted:?}: no such model; known: {}",
                known.join(", ")
            )
            .into());
        }
        Ok(chosen)
    }

    /// Runs `command` on `conn` with `keyring`, printing its report in
    /// `format` on standard output and, with `progress`, a progress bar on
    /// standard error (drawn only on a terminal).
    ///
    /// Exit status: 0 done; 4 `verify` found rows that fail, or `finalize`
    /// found rows unsealed or failing.
    ///
    /// # Errors
    /// The job's errors (naming table, column, owner and row); an unknown
    /// `--model`; `decrypt-back` without `--yes`, or while the roll-out
    /// still seals new rows (an error whose [`is_refused`] is true: nothing
    /// was changed).
    pub fn run<C: SchemaConnection>(
        &self,
        conn: &mut C,
        keyring: &Keyring,
        command: &JobCommand,
        format: Format,
        progress: bool,
    ) -> CliResult {
        let mut reports = Vec::new();
        let name = match command {
            JobCommand::Backfill(_) => "backfill",
            JobCommand::Verify(_) => "verify",
            JobCommand::DecryptBack(_) => "decrypt-back",
            JobCommand::Reindex(_) => "reindex",
            JobCommand::Status(_) => "status",
            JobCommand::Migration(MigrationCommand::Generate(args)) => {
                let (_, table) = self.one(&args.model)?;
                let strategy = match args.strategy {
                    StrategyArg::Check => Strategy::Check,
                    StrategyArg::InPlace => Strategy::InPlace,
                    StrategyArg::Shadow => Strategy::Shadow,
                };
                if let Some(backend) = args.backend {
                    let wanted = match backend {
                        BackendArg::Mysql => Dialect::Mysql,
                        BackendArg::Postgres => Dialect::Postgres,
                        BackendArg::Sqlite => Dialect::Sqlite,
                    };
                    if wanted != C::DIALECT {
                        return Err(format!(
                            "--backend {backend:?} but the database is {:?}: the migration is generated \
                             from the live table, on the database it will run on",
                            C::DIALECT
                        )
                        .into());
                    }
                }
                let migration =
                    adopt::migration_for(&table, conn, strategy, &adopt::Options::default())?;
                return write_migration(&migration, &args.dir, format);
            }
            JobCommand::Migration(MigrationCommand::RecordLegacy(args)) => {
                return self.record_legacy(conn, args, format);
            }
            JobCommand::Finalize(args) => {
                return finalize(self, conn, keyring, args, format, progress);
            }
        };
        let mut code = ExitCode::SUCCESS;
        let mut extra = serde_json::Map::new();
        match command {
            JobCommand::Backfill(args)
            | JobCommand::DecryptBack(DecryptBackArgs { migrate: args, .. }) => {
                let sealing = matches!(command, JobCommand::Backfill(_));
                if let JobCommand::DecryptBack(d) = command
                    && !args.dry_run
                {
                    check_decrypt_back(keyring, d.yes)?;
                }
                let mut options = MigrateOptions::default()
                    .batch(args.batch)
                    .dry_run(args.dry_run);
                if sealing && let Some(decoder) = self.decoder(&args.legacy)? {
                    options = options.legacy(decoder);
                }
                extra.insert("dry_run".into(), args.dry_run.into());
                for (model, table) in self.selected(&args.models)? {
                    let verb = if sealing { "sealing" } else { "decrypting" };
                    let report = with_progress(
                        &format!("{verb} {}", table.table),
                        progress,
                        args.rate,
                        |on| {
                            let options = options.clone().progress(on);
                            if sealing {
                                migrate::backfill_table(&table, conn, keyring, &options)
                            } else {
                                migrate::decrypt_back_table(&table, conn, keyring, &options)
                            }
                        },
                    )?;
                    if format == Format::Text {
                        println!("{report}");
                    }
                    reports.push(migration_json(model.name, &report));
                }
            }
            JobCommand::Reindex(args) => {
                let options = MigrateOptions::default()
                    .batch(args.batch)
                    .dry_run(args.dry_run);
                extra.insert("dry_run".into(), args.dry_run.into());
                for (model, table) in self.selected(&args.models)? {
                    let report = with_progress(
                        &format!("re-indexing {}", table.table),
                        progress,
                        args.rate,
                        |on| {
                            let options = options.clone().progress(on);
                            migrate::reindex_table(&table, conn, keyring, &options)
                        },
                    )?;
                    if format == Format::Text {
                        println!("{report}");
                    }
                    reports.push(json!({
                        "model": model.name,
                        "table": report.table,
                        "rows": report.rows,
                        "written": report.written,
                        "conflicts": report.conflicts,
                        "skipped": report.skipped,
                        "elapsed_seconds": seconds(report.elapsed),
                    }));
                }
            }
            JobCommand::Verify(args) => {
                let mut ok = true;
                let selected = self.selected(&args.models)?;
                let decoder = self.decoder(&args.legacy)?;
                for (model, table) in selected {
                    let report = with_progress(
                        &format!("verifying {}", table.table),
                        progress,
                        args.rate,
                        |on| {
                            let mut options = VerifyOptions::default()
                                .sample_opt(args.sample)
                                .progress(on);
                            if let Some(decoder) = &decoder {
                                options = options.legacy(decoder.clone());
                            }
                            migrate::verify_table(&table, conn, keyring, &options)
                        },
                    )?;
                    if format == Format::Text {
                        println!("{report}");
                    }
                    ok &= report.is_ok();
                    reports.push(verify_json(model.name, &report));
                }
                extra.insert("ok".into(), ok.into());
                if !ok {
                    code = ExitCode::from(EXIT_NOT_VERIFIED);
                }
            }
            JobCommand::Migration(_) | JobCommand::Finalize(_) => {}
            JobCommand::Status(args) => {
                let selected = self.selected(&args.models)?;
                if format == Format::Text {
                    println!(
                        "{:<24} {:<24} {:>12} {:>12} {:>7}",
                        "model", "table", "sealed", "flag off", "done"
                    );
                }
                for (model, table) in selected {
                    let sealed = migrate::count_rows(&table, conn, true)?;
                    let flag_off = migrate::count_rows(&table, conn, false)?;
                    let total = sealed + flag_off;
                    let percent = if total == 0 {
                        100.0
                    } else {
                        sealed as f64 * 100.0 / total as f64
                    };
                    if format == Format::Text {
                        println!(
                            "{:<24} {:<24} {sealed:>12} {flag_off:>12} {percent:>6.1}%",
                            model.name, table.table
                        );
                    }
                    reports.push(json!({
                        "model": model.name,
                        "table": table.table,
                        "sealed": sealed,
                        "flag_off": flag_off,
                        "total": total,
                    }));
                }
            }
        }
        if format == Format::Json {
            let mut out = serde_json::Map::new();
            out.insert("command".into(), name.into());
            out.extend(extra);
            out.insert("tables".into(), Value::Array(reports));
            println!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
        }
        Ok(code)
    }
}

/// Writes `migration` into `dir` and prints the directory (JSON: the
/// directory and both scripts).
fn write_migration(
    migration: &adopt::Migration,
    dir: &std::path::Path,
    format: Format,
) -> CliResult {
    let path = migration.write(dir)?;
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "directory": path.display().to_string(),
                "up": migration.up,
                "down": migration.down,
            }))?
        ),
        _ => println!("{}", path.display()),
    }
    Ok(ExitCode::SUCCESS)
}

/// `finalize`: every row sealed, all verified, then the migration.
fn finalize<C: SchemaConnection>(
    jobs: &Jobs,
    conn: &mut C,
    keyring: &Keyring,
    args: &FinalizeArgs,
    format: Format,
    progress: bool,
) -> CliResult {
    let (_, table) = jobs.one(&args.model)?;
    let not_ready = |message: String, unsealed: u64, failed: u64| -> CliResult {
        if format == Format::Json {
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "command": "finalize",
                    "ok": false,
                    "table": table.table,
                    "unsealed": unsealed,
                    "failed": failed,
                    "message": message,
                }))?
            );
        }
        eprintln!("finalize refused: {message}");
        Ok(ExitCode::from(EXIT_NOT_VERIFIED))
    };
    let unsealed = migrate::count_rows(&table, conn, false)?;
    if unsealed > 0 {
        return not_ready(
            format!(
                "{}: {unsealed} rows are not sealed (encrypted flag off): run backfill, then verify",
                table.table
            ),
            unsealed,
            0,
        );
    }
    if !table.has_shadow() {
        return Err(Refused(format!(
            "{}: the model has no shadow column (#[phi(encrypt, shadow)]): nothing to finalize",
            table.table
        ))
        .into());
    }
    let report = with_progress(
        &format!("verifying {}", table.table),
        progress,
        None,
        |on| {
            let options = VerifyOptions::default().progress(on);
            migrate::verify_table(&table, conn, keyring, &options)
        },
    )?;
    if !report.is_ok() {
        return not_ready(
            format!(
                "{}: {} sealed rows fail to verify ({} unsealed): fix them before finalizing",
                table.table, report.failed, report.unsealed_total
            ),
            report.unsealed_total,
            report.failed,
        );
    }
    let options = adopt::Options::default().sealed_check(!args.no_check);
    let migration = adopt::migration_for(&table, conn, Strategy::Finalize, &options)?;
    write_migration(&migration, &args.dir, format)
}

/// Whether `error` (from [`Jobs::run`] or a key command) is a refusal:
/// nothing was changed (exit status 3).
pub fn is_refused(error: &(dyn std::error::Error + 'static)) -> bool {
    error.downcast_ref::<Refused>().is_some()
        || error
            .downcast_ref::<crate::Error>()
            .is_some_and(|e| e.kind() == crate::ErrorKind::Refused)
}

/// `decrypt-back` needs `--yes` and a roll-out that seals no new row (the
/// fleet's stored policy, else this keyring's).
fn check_decrypt_back(keyring: &Keyring, yes: bool) -> CliResult<()> {
    if !yes {
        return Err(Refused(
            "decrypt-back stores every encrypted value of the models' tables in plain text again; \
             pass --yes to confirm"
                .into(),
        )
        .into());
    }
    let rollout =
        crate::lifecycle::fleet_rollout(keyring.store().as_ref(), keyring.rollout_policy())?
            .unwrap_or_else(|| keyring.rollout());
    if rollout != Rollout::Nobody {
        return Err(Refused(format!(
            "the roll-out still seals new rows ({}): new writes would be sealed while decrypt-back runs; \
             stop sealing first (`rollout nobody`)",
            crate::lifecycle::describe_rollout(&rollout)
        ))
        .into());
    }
    Ok(())
}

/// Runs `job` with a progress callback that draws a bar (when `visible`)
/// and keeps to `rate` rows per second.
fn with_progress<T>(
    what: &str,
    visible: bool,
    rate: Option<f64>,
    job: impl FnOnce(&mut dyn FnMut(&Progress)) -> crate::Result<T>,
) -> crate::Result<T> {
    let progress = bar(0, what, visible);
    let throttle = Throttle::new(rate, RealPace(Instant::now()));
    let result = job(&mut |p: &Progress| {
        progress.set_length(p.total);
        progress.set_position(p.done);
        throttle.after(p.done);
    });
    progress.finish_and_clear();
    result
}

/// The Fernet decoder of `--legacy fernet`: the keys in the variables
/// `names` (`PRIMARY[,FALLBACK…]`).
fn fernet_decoder(names: &str) -> CliResult<Arc<dyn LegacyDecoder>> {
    let names: Vec<&str> = names
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    let Some((primary, fallbacks)) = names.split_first() else {
        return Err("--legacy-key-env names no variable".into());
    };
    #[cfg(feature = "legacy-fernet")]
    {
        let key = zeroize::Zeroizing::new(std::env::var(primary).map_err(|_| {
            format!("--legacy fernet: {primary} is not set (the primary Fernet key)")
        })?);
        let mut decoder = crate::legacy::FernetDecoder::new(&key)?;
        for name in fallbacks {
            if let Ok(key) = std::env::var(name).map(zeroize::Zeroizing::new)
                && !key.trim().is_empty()
            {
                decoder = decoder.fallback(&key)?;
            }
        }
        Ok(Arc::new(decoder))
    }
    #[cfg(not(feature = "legacy-fernet"))]
    {
        let _ = (primary, fallbacks);
        Err(
            "--legacy fernet: this command was built without Fernet support \
             (rebuild with the cargo feature `legacy-fernet`)"
                .into(),
        )
    }
}

fn legacy_json(counts: &[LegacyCount]) -> Vec<Value> {
    counts
        .iter()
        .map(|c| json!({ "format": c.format, "found": c.found, "failed": c.failed }))
        .collect()
}

fn seconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn failures_json(failures: &[VerifyFailure]) -> Vec<Value> {
    failures
        .iter()
        .map(|f| {
            json!({
                "table": f.table,
                "column": f.column,
                "owner": f.owner,
                "row_key": f.row_key,
                "kind": format!("{:?}", f.kind),
                "problem": f.problem,
            })
        })
        .collect()
}

fn migration_json(model: &str, r: &MigrationReport) -> Value {
    json!({
        "model": model,
        "table": r.table,
        "rows": r.rows,
        "values": r.values,
        "batches": r.batches,
        "skipped": r.skipped,
        "owners": r.owners,
        "new_owner_keys": r.new_owner_keys,
        "undecodable": r.undecodable,
        "reencoded": r.reencoded,
        "remaining": r.remaining,
        "legacy": legacy_json(&r.legacy),
        "legacy_as_text": r.legacy_as_text,
        "elapsed_seconds": seconds(r.elapsed),
        "problems": failures_json(&r.problems),
    })
}

fn verify_json(model: &str, r: &VerifyReport) -> Value {
    json!({
        "model": model,
        "table": r.table,
        "ok": r.is_ok(),
        "sealed": r.sealed,
        "unsealed": r.unsealed,
        "sealed_total": r.sealed_total,
        "unsealed_total": r.unsealed_total,
        "failed": r.failed,
        "not_canonical": r.not_canonical,
        "problems_found": r.problems_found,
        "legacy": legacy_json(&r.legacy),
        "legacy_as_text": r.legacy_as_text,
        "failures": failures_json(&r.failures),
        "elapsed_seconds": seconds(r.elapsed),
    })
}

/// The time `--rate` keeps to: how long since the job started, and a way
/// to wait.
trait Pace {
    fn elapsed(&self) -> Duration;
    fn sleep(&self, duration: Duration);
}

/// The real clock.
struct RealPace(Instant);

impl Pace for RealPace {
    fn elapsed(&self) -> Duration {
        self.0.elapsed()
    }
    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// Keeps a job to at most `rows_per_sec` on average: after each batch it
/// waits until the rows done so far are due.
struct Throttle<P: Pace> {
    rows_per_sec: Option<f64>,
    pace: P,
}

impl<P: Pace> Throttle<P> {
    fn new(rows_per_sec: Option<f64>, pace: P) -> Self {
        Throttle { rows_per_sec, pace }
    }

    /// Called with the rows done so far: waits until they are due.
    fn after(&self, done: u64) {
        if let Some(rate) = self.rows_per_sec {
            let wait = due_in(done, rate, self.pace.elapsed());
            if !wait.is_zero() {
                self.pace.sleep(wait);
            }
        }
    }
}

/// How long until `done` rows are due at `rate` rows per second, `elapsed`
/// after the start.
fn due_in(done: u64, rate: f64, elapsed: Duration) -> Duration {
    Duration::try_from_secs_f64(done as f64 / rate)
        .unwrap_or(Duration::MAX)
        .saturating_sub(elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    /// A clock that moves only when the job works (`work`) or waits.
    #[derive(Default)]
    struct ManualPace {
        now: Cell<Duration>,
        sleeps: RefCell<Vec<Duration>>,
    }

    impl ManualPace {
        fn work(&self, d: Duration) {
            self.now.set(self.now.get() + d);
        }
    }

    impl Pace for &ManualPace {
        fn elapsed(&self) -> Duration {
            self.now.get()
        }
        fn sleep(&self, d: Duration) {
            self.sleeps.borrow_mut().push(d);
            self.now.set(self.now.get() + d);
        }
    }

    #[test]
    fn the_throttle_waits_until_the_rows_done_are_due() {
        let pace = ManualPace::default();
        let throttle = Throttle::new(Some(100.0), &pace);
        // 500 rows in 1 s at 100 rows/s: due at 5 s, so it waits 4 s.
        pace.work(Duration::from_secs(1));
        throttle.after(500);
        assert_eq!(*pace.sleeps.borrow(), [Duration::from_secs(4)]);
        assert_eq!(pace.now.get(), Duration::from_secs(5));
        // A slow batch (500 more rows in 6 s, due at 10 s, now 11 s): no wait.
        pace.work(Duration::from_secs(6));
        throttle.after(1000);
        assert_eq!(pace.sleeps.borrow().len(), 1);
        // The next batch is quick again: due at 15 s, now 11.5 s.
        pace.work(Duration::from_millis(500));
        throttle.after(1500);
        assert_eq!(
            pace.sleeps.borrow().last(),
            Some(&Duration::from_millis(3500))
        );
        // The average never exceeds the rate.
        let rate = 1500.0 / pace.now.get().as_secs_f64();
        assert!(rate <= 100.0, "{rate}");
    }

    #[test]
    fn without_a_rate_the_throttle_never_waits() {
        let pace = ManualPace::default();
        let throttle = Throttle::new(None, &pace);
        throttle.after(1_000_000);
        assert!(pace.sleeps.borrow().is_empty());
    }

    #[test]
    fn due_in_and_the_rate_parser() {
        assert_eq!(
            due_in(10, 4.0, Duration::from_secs(1)),
            Duration::from_millis(1500)
        );
        assert_eq!(due_in(10, 4.0, Duration::from_secs(9)), Duration::ZERO);
        assert_eq!(parse_rate("250"), Ok(250.0));
        assert_eq!(parse_rate("0.5"), Ok(0.5));
        for bad in ["0", "-3", "NaN", "inf", "fast"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }
}
