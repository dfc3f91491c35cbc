//! The `phi` command line as a library: administration of phi's data keys
//! (coverage, generation, rotation, re-seal, retirement, KEK rewrap,
//! crypto-shredding, the audit trail), which the standalone `phi` binary
//! runs with [`App::standalone`].
//!
//! The database comes from `--database-url` or `DATABASE_URL`
//! (`sqlite://file.db` or a file path, `mysql://…`, `postgres://…`); the
//! master key from `PHI_MASTER_KEY` or `PHI_MASTER_KEY_FILE`. Nothing
//! printed ever contains key bytes or plaintext: owner ids, versions, KEK
//! ids and counts only.

// A command-line tool: its output is its interface.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::fmt;
use std::io::{BufRead as _, Write as _};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use std::cell::{Cell, RefCell};

use clap::{Args, CommandFactory as _, FromArgMatches as _, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::lifecycle::{self, DataConnection, ResealTable, RewrapOptions};
use crate::store::DieselKeyStore;
use crate::{KeyEncryptionKey, KeyStore, Keyring, LocalKek};

pub use jobs::{
    BackendArg, DecryptBackArgs, FinalizeArgs, GenerateArgs, JobCommand, Jobs, LegacyArgs,
    LegacyFormat, MigrateArgs, MigrationCommand, ModelArgs, RecordLegacyArgs, StatusArgs,
    StrategyArg, VerifyArgs, is_refused,
};

/// Prints a line of a report for people; nothing with `--format json`,
/// whose document is printed at the end.
macro_rules! outln {
    ($env:expr, $($arg:tt)*) => {
        if $env.out.text() {
            println!($($arg)*);
        }
    };
}

mod audit_access;
mod due;
mod jobs;
mod master_key;
mod phi_migrations;
mod rotate_all;

/// Administration of phi's owner-scoped data keys, and the migration jobs
/// of the application's models.
///
/// Exit status: 0 done; 1 an error (the message says what and where); 2 a
/// usage error (unknown option, missing argument); 3 refused or not
/// confirmed, nothing changed; 4 done but not verified (`keys shred`,
/// `verify`).
#[derive(Debug, clap::Parser)]
#[command(name = "phi", version)]
struct Cli {
    /// Database URL: `sqlite://FILE` or a file path (feature `sqlite`),
    /// `mysql://…` or `mariadb://…` (feature `mysql`), `postgres://…` or
    /// `postgresql://…` (feature `postgres`); any other scheme is refused.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,

    /// Id of the KEK whose master key is in PHI_MASTER_KEY / PHI_MASTER_KEY_FILE.
    #[arg(long, env = "PHI_KEK_ID", default_value = "local-1", global = true)]
    kek_id: String,

    /// The KEK that wraps new data keys: `local:ID` (the master key in
    /// PHI_MASTER_KEY / PHI_MASTER_KEY_FILE; the default, with --kek-id) or
    /// `aws-kms:KEY` (key id, ARN or `alias/…`; region, credentials and
    /// endpoint from the AWS environment: AWS_REGION, AWS_PROFILE,
    /// AWS_ENDPOINT_URL, …). With `aws-kms`, a local master key in the
    /// environment still unwraps the keys it wrapped.
    #[arg(long, env = "PHI_KEK", global = true)]
    kek: Option<crate::KekSpec>,

    /// How often the application's keyrings read the key-event feed, in
    /// seconds (their `KeyringBuilder::feed_interval`): shred output says
    /// when they will have dropped the keys.
    #[arg(long, env = "PHI_FEED_INTERVAL", default_value_t = 2.0, global = true)]
    feed_interval: f64,

    /// The fleet roll-out policy `rollout` changes and `keys status` shows.
    #[arg(long, env = "PHI_ROLLOUT_POLICY", default_value = crate::DEFAULT_ROLLOUT_POLICY, global = true)]
    rollout_policy: String,

    /// Take owner ids that begin or end with whitespace as they are
    /// (`KeyringBuilder::allow_owner_id_whitespace`), for a population
    /// whose ids already have it; refused by default.
    #[arg(long, env = "PHI_ALLOW_OWNER_ID_WHITESPACE", global = true)]
    allow_owner_id_whitespace: bool,

    /// More log output on standard error: -v info, -vv debug, -vvv trace
    /// (default: warnings and errors). RUST_LOG, when set, decides instead.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    /// The report's format: `text` for people, or `json`, one document on
    /// standard output (the schema is in the README; errors stay on
    /// standard error).
    #[arg(long, value_enum, default_value_t = Format::Text, global = true)]
    format: Format,

    /// Less log output: -q errors only, -qq none; no progress bars.
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "verbose")]
    quiet: u8,

    /// Actor recorded in the audit trail.
    #[arg(long, env = "PHI_ACTOR", default_value = "phi-cli", global = true)]
    actor: String,

    /// A prefix before the name of every table of phi
    /// (`phi_types::schema::set_table_prefix`), for a database that has
    /// tables of phi's names already: every process sharing the database
    /// uses the same one. (An application's own command over a keyring it
    /// built first sets the prefix in code; this must then match it.)
    #[arg(long, env = "PHI_TABLE_PREFIX", global = true)]
    table_prefix: Option<String>,

    /// An application table holding encrypted columns, as
    /// `table:owner_column:key_column:col1,col2@scope[:flag_column]` (key
    /// column may be empty; a column's scope is `table.column`, the table
    /// without its schema, unless given after `@`); repeat for several.
    /// From PHI_TABLES, `;`-separated. The owner and key columns are text
    /// unless typed with `#i16`, `#i32`, `#i64`, `#u16`, `#u32` or `#u64`
    /// (integer owners and row keys of derived models), e.g.
    /// `visits:user_id#i64:id#i64:reason,notes`. A table with an encrypted
    /// flag names it last (a boolean, or `#int`), e.g.
    /// `cases:user_id:case_id:patient_last:phi_encrypted`: rows whose flag
    /// is off are plain data, never re-sealed or counted.
    #[arg(
        long = "table",
        env = "PHI_TABLES",
        value_delimiter = ';',
        global = true
    )]
    tables: Vec<String>,

    #[command(flatten)]
    policy: due::PolicyArgs,

    #[command(subcommand)]
    command: Command,

    /// `--actor` was given on the command line (`audit access` then takes
    /// it as the end user to filter by).
    #[arg(skip)]
    actor_given: bool,
}

/// Whether `id` was given on the command line, at any level of subcommand.
fn given_on_command_line(matches: &clap::ArgMatches, id: &str) -> bool {
    matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
        || matches
            .subcommand()
            .is_some_and(|(_, sub)| given_on_command_line(sub, id))
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Data key operations.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The fleet's roll-out policy: which owners' new rows are sealed.
    /// Every change is stored in `phi_rollout` with a key event that every
    /// keyring following the feed applies within its interval.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Clears cached keys in every process following the key-event feed.
    ClearCache {
        /// Only this owner (default: every owner).
        #[arg(long)]
        owner: Option<String>,
    },
    /// Shows the audit trail, newest first.
    ///
    /// With `--format json`: one array of records, newest first, each
    /// `{"id": 7, "occurred_at": "2026-11-27T21:00:00.123456Z", "owner":
    /// "…", "action": "generate|unwrap|…", "key_version": 1 or null,
    /// "kek_id": "…" or null, "actor": "…", "detail": "…" or null}`.
    ///
    /// `audit access`, `audit verify` and `audit prune` work on the access
    /// log (who read or wrote which record).
    #[command(args_conflicts_with_subcommands = true)]
    Audit {
        #[command(subcommand)]
        command: Option<audit_access::AuditCommand>,
        /// Only this owner's records.
        #[arg(long)]
        owner: Option<String>,
        /// How many records.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// A local master key: generate it, split it into shares that rebuild
    /// it, and check it (or shares) against the database.
    #[command(subcommand)]
    MasterKey(master_key::MasterKeyCommand),
    /// phi's own tables: write its migrations into the application's
    /// Diesel migrations directory, run them, or check them. The other
    /// commands change no schema: they check phi's tables first.
    #[command(subcommand)]
    Migrations(phi_migrations::MigrationsCommand),
    #[command(flatten)]
    Jobs(JobCommand),
    /// Prints a shell completion script, e.g. `phi completions bash >
    /// /etc/bash_completion.d/phi`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Prints the man page (roff), e.g. `phi man > /usr/local/share/man/man1/phi.1`.
    Man,
}

/// Report formats (`--format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
#[non_exhaustive]
pub enum Format {
    /// For people: lines of text.
    #[default]
    Text,
    /// For scripts: one JSON document on standard output (the schema is
    /// in the README).
    Json,
    /// Comma-separated values with a header line (`audit access` only).
    Csv,
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// Shows the stored policy and the feed's head.
    Status,
    /// Seal every owner's new rows.
    All,
    /// Seal no new row.
    Nobody,
    /// Add owners to the sealed set.
    Enable {
        /// The owners.
        #[arg(long = "owner", required = true)]
        owners: Vec<String>,
    },
    /// Remove owners from the sealed set (refused while the policy is `all`:
    /// set the owners with `rollout set` instead).
    Disable {
        /// The owners.
        #[arg(long = "owner", required = true)]
        owners: Vec<String>,
    },
    /// Seal exactly these owners' new rows.
    Set {
        /// The owners.
        #[arg(long = "owner", required = true)]
        owners: Vec<String>,
    },
}

#[derive(Debug, Args)]
struct OwnersQuery {
    /// SQL whose first column lists the application's owners; default: the
    /// owner columns of the --table descriptions. Runs in a read-only
    /// transaction: a query that writes is refused.
    #[arg(long, env = "PHI_OWNERS_QUERY")]
    owners_query: Option<String>,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Creates a data key for every owner of the owners query that has none.
    Generate {
        #[command(flatten)]
        owners: OwnersQuery,
        /// Only show what would be done.
        #[arg(long)]
        dry_run: bool,
        /// Generate even when more than 1,000 owners lack a key (a guard
        /// against a wrong owners query).
        #[arg(long)]
        force: bool,
    },
    /// Key coverage, keys per KEK and state, or one owner's versions and
    /// the values using each.
    Status {
        /// Show this owner.
        #[arg(long)]
        owner: Option<String>,
        #[command(flatten)]
        owners: OwnersQuery,
    },
    /// Lists every owner whose current data key is due for rotation under
    /// the rotation policy (--max-key-age, --max-seals-per-key): older
    /// than the age limit, or with at least the seal budget's values
    /// sealed under it. Shows each one's version, creation time, age, seal
    /// count and reason (`age`, `seals`). Seal counts are those every
    /// process recorded in phi_seal_counts (each adds its own at most once
    /// per feed interval). Changes nothing.
    Due,
    /// Adds a new data key version for an owner (`--owner`); or rotates
    /// many owners at once (`--all`, `--due`, `--owners-query`): new
    /// versions, values of the --table columns re-sealed, a sample
    /// verified, old versions retired, as a job several workers share.
    ///
    /// Exit status: 0 done; 1 an error; 4 owners left pending (values
    /// written under their old versions meanwhile: run it again).
    Rotate(rotate_all::RotateArgs),
    /// Re-seals an owner's values in the --table columns under its current version.
    Reseal {
        /// The owner.
        #[arg(long)]
        owner: String,
        /// Values per transaction.
        #[arg(long, default_value_t = lifecycle::DEFAULT_BATCH_SIZE)]
        batch_size: usize,
    },
    /// Rewraps every data key under another KEK (KEK rotation).
    Rewrap {
        /// The target KEK: `local:ID` (master key from --to-key-file or
        /// PHI_NEW_MASTER_KEY).
        #[arg(long)]
        to: String,
        /// File holding the target's base64 master key.
        #[arg(long)]
        to_key_file: Option<std::path::PathBuf>,
        /// Only keys wrapped by this KEK id.
        #[arg(long)]
        from: Option<String>,
        /// Keys per transaction.
        #[arg(long, default_value_t = lifecycle::DEFAULT_BATCH_SIZE)]
        batch_size: usize,
    },
    /// Retires a data key version no value uses any more.
    Retire {
        /// The owner.
        #[arg(long)]
        owner: String,
        /// The version.
        #[arg(long)]
        version: u32,
    },
    /// Crypto-shredding: lists the data keys of an owner and destroys
    /// them, then checks that a sample of its stored values in the --table
    /// columns no longer opens.
    ///
    /// Its sealed values become unreadable in this database at once; in
    /// other processes once their key cache expires (default 24 h) or they
    /// clear the owner; in backups, WAL, database logs and point-in-time
    /// archives only once those expire, or once the KEK that wrapped the
    /// keys is rotated away (`keys rewrap`) and destroyed. Values stored in
    /// the clear are counted, not protected.
    ///
    /// Asks for the owner id to be typed again (on standard error) unless
    /// --yes is given. Only the versions listed are destroyed: when the
    /// owner has no key row at all (a mistyped id) it stops there; when every
    /// key is already destroyed it asks nothing, destroys nothing and
    /// verifies again; a key created after the listing makes it stop
    /// without destroying anything.
    ///
    /// Exit status: 0 destroyed and verified; 1 an error; 3 refused or not
    /// confirmed (nothing changed: no key row, a key created after the
    /// listing, or the owner id not typed again); 4 not verified (no
    /// --table, no sealed value sampled, or a value still opens: the output
    /// says which).
    Shred {
        /// The owner.
        #[arg(long)]
        owner: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Stored values per column checked to no longer open.
        #[arg(long, default_value_t = 20)]
        sample: usize,
    },
}

/// More keys than this to generate at once need `--force`.
const GENERATE_GUARD: usize = 1_000;

/// Environment variable holding the target KEK's base64 master key for
/// `keys rewrap --to local:ID`.
const NEW_MASTER_KEY_ENV: &str = "PHI_NEW_MASTER_KEY";

type CliResult<T = ExitCode> = Result<T, Box<dyn std::error::Error>>;

/// A command refused: nothing was changed (exit status 3).
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// The `phi` command line, ready to run: every key command, and for the
/// models registered with [`App::model`] the migration jobs (`backfill`,
/// `verify`, `decrypt-back`, `status`).
///
/// In an application's own binary (the workspace's `examples/own_cli.rs`),
/// for a `#[derive(PhiRecord)]` model `Note` with an encrypted flag and a
/// row key:
///
/// ```text
/// fn main() -> ExitCode {
///     let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite://notes.db".into());
///     // Built only for the commands that need it (`migrations run` does not).
///     App::with_keyring(url, |url| {
///         Ok(KeyringConfig::from_env()?.builder(phi_types::cli::key_store(url)?)?.actor("notes-admin").build()?)
///     })
///     .name("notes-admin")
///     .model::<Note>()
///     .run()
/// }
/// ```
#[derive(Debug, Default)]
pub struct App {
    name: Option<String>,
    database_url: Option<String>,
    keyring: Option<Keyring>,
    make_keyring: Option<MakeKeyring>,
    jobs: Jobs,
}

/// The keyring of [`App::with_keyring`], built when a command needs it.
type KeyringFn = Box<dyn FnOnce(&str) -> Result<Keyring, Box<dyn std::error::Error>> + Send>;

/// [`KeyringFn`], printed as its name.
struct MakeKeyring(KeyringFn);

impl fmt::Debug for MakeKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MakeKeyring")
    }
}

impl App {
    /// The standalone `phi` binary: the database from `--database-url` /
    /// `DATABASE_URL`, the KEK from `--kek` / `PHI_KEK` and the master key
    /// from the environment.
    pub fn standalone() -> App {
        App::default()
    }

    /// An application's command line: its database (unless
    /// `--database-url` / `DATABASE_URL` names another) and its keyring,
    /// which every command uses (the key store, the KEK and its actor are
    /// the keyring's; `--kek`, `--kek-id` and `--actor` are then ignored;
    /// `keys rewrap` unwraps with the keyring's primary KEK).
    pub fn new(database_url: impl Into<String>, keyring: Keyring) -> App {
        App {
            database_url: Some(database_url.into()),
            keyring: Some(keyring),
            ..App::default()
        }
    }

    /// [`App::new`] with the keyring built by `make` (given the database
    /// URL) only when a command needs it: `migrations run` then works on a
    /// database that does not yet have phi's tables (the key store's
    /// check would refuse it), and `master-key` commands work when the
    /// configured KEK does not (`make` is not called for either).
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlite")] {
    /// use phi_types::KeyringConfig;
    /// use phi_types::cli::{App, key_store};
    ///
    /// let url = "sqlite://notes.db";
    /// let status = App::with_keyring(url, |url| {
    ///     Ok(KeyringConfig::from_env()?.builder(key_store(url)?)?.actor("notes-admin").build()?)
    /// })
    /// .name("notes-admin")
    /// .run();
    /// # drop(status);
    /// # }
    /// ```
    pub fn with_keyring(
        database_url: impl Into<String>,
        make: impl FnOnce(&str) -> Result<Keyring, Box<dyn std::error::Error>> + Send + 'static,
    ) -> App {
        App {
            database_url: Some(database_url.into()),
            make_keyring: Some(MakeKeyring(Box::new(make))),
            ..App::default()
        }
    }

    /// The command's name in its help, completions and man page (default
    /// `phi`).
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> App {
        self.name = Some(name.into());
        self
    }

    /// Registers a derived model for the migration commands, and for the
    /// key commands' tables (`keys reseal`, `retire`, `shred`, `status
    /// --owner`) beside any `--table`.
    #[must_use]
    pub fn model<M: crate::migrate::Migratable>(mut self) -> App {
        self.jobs = self.jobs.model::<M>();
        self
    }

    /// The application's decoder of values stored before phi in an
    /// encrypted format of its own ([`crate::legacy`]): `backfill` seals
    /// their plaintext and `verify` checks that they open. Tried before the
    /// formats named with `--legacy fernet` / `--legacy versioned-gcm`;
    /// several decoders of the application's go in one
    /// [`LegacyDecoders`](crate::legacy::LegacyDecoders).
    #[must_use]
    pub fn legacy(mut self, decoder: Arc<dyn crate::legacy::LegacyDecoder>) -> App {
        self.jobs = self.jobs.legacy(decoder);
        self
    }

    /// Parses the process's arguments, runs the command and returns its
    /// exit status (printing a usage error and exiting with 2 on bad
    /// arguments, as clap does).
    pub fn run(self) -> ExitCode {
        self.run_from(std::env::args_os())
    }

    /// [`App::run`] with these arguments (the first is the program name).
    pub fn run_from<I, T>(self, args: I) -> ExitCode
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = self.command().get_matches_from(args);
        let mut cli = match Cli::from_arg_matches(&matches) {
            Ok(cli) => cli,
            Err(error) => error.exit(),
        };
        cli.actor_given = given_on_command_line(&matches, "actor");
        self.main_with(cli)
    }

    /// The clap command: the migration commands hidden when no model is
    /// registered.
    fn command(&self) -> clap::Command {
        let mut command = Cli::command();
        if let Some(name) = &self.name {
            command = command.name(name.clone()).bin_name(name);
        }
        if self.jobs.is_empty() {
            for job in ["backfill", "verify", "decrypt-back", "status"] {
                command = command.mut_subcommand(job, |s| s.hide(true));
            }
        }
        command
    }

    fn main_with(self, cli: Cli) -> ExitCode {
        init_logging(cli.verbose, cli.quiet);
        let name = self.name.clone().unwrap_or_else(|| "phi".to_owned());
        match &cli.command {
            Command::Completions { shell } => {
                clap_complete::generate(*shell, &mut self.command(), name, &mut std::io::stdout());
                return ExitCode::SUCCESS;
            }
            Command::Man => {
                return match clap_mangen::Man::new(self.command()).render(&mut std::io::stdout()) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => {
                        eprintln!("error: {error}");
                        ExitCode::FAILURE
                    }
                };
            }
            _ => {}
        }
        let prefixed = match cli.table_prefix.as_deref() {
            Some(prefix) => crate::schema::set_table_prefix(prefix).map_err(Into::into),
            None => Ok(()),
        };
        let result = prefixed.and_then(|()| match &cli.command {
            Command::MasterKey(command) => master_key::run(
                &cli,
                self.database_url.as_deref(),
                self.keyring.as_ref().map(|k| k.store().clone()),
                command,
            ),
            Command::Migrations(command) => phi_migrations::run(
                &cli,
                cli.database_url.as_deref().or(self.database_url.as_deref()),
                command,
            ),
            _ => self.keyring_built().and_then(|app| app.dispatch(&cli)),
        });
        match result {
            Ok(code) => code,
            Err(error) => {
                // The whole chain on one line: each error's message, then its
                // source's (phi's errors never repeat their source).
                let mut line = format!("error: {error}");
                let mut source = error.source();
                while let Some(cause) = source {
                    line.push_str(": ");
                    line.push_str(&cause.to_string());
                    source = cause.source();
                }
                eprintln!("{line}");
                let refused = is_refused(error.as_ref());
                ExitCode::from(if refused { EXIT_REFUSED } else { 1 })
            }
        }
    }

    /// This app with the keyring of [`App::with_keyring`] built.
    fn keyring_built(mut self) -> CliResult<App> {
        if let Some(MakeKeyring(make)) = self.make_keyring.take() {
            let url = self.database_url.clone().unwrap_or_default();
            self.keyring = Some(make(&url)?);
        }
        Ok(self)
    }

    fn dispatch(&self, cli: &Cli) -> CliResult {
        if let (Some(given), Some(own), Some(_)) =
            (&cli.database_url, &self.database_url, &self.keyring)
            && given != own
        {
            return Err(
                "--database-url / DATABASE_URL names another database than the \
                 application's, whose keyring this command uses"
                    .into(),
            );
        }
        let url = cli
            .database_url
            .as_deref()
            .or(self.database_url.as_deref())
            .ok_or("no database: pass --database-url or set DATABASE_URL")?;
        let (backend, url) = backend(url)?;
        match backend {
            #[cfg(feature = "sqlite")]
            Backend::Sqlite => self.run_on::<diesel::SqliteConnection>(cli, &url),
            #[cfg(feature = "mysql")]
            Backend::Mysql => self.run_on::<diesel::MysqlConnection>(cli, &url),
            #[cfg(feature = "postgres")]
            Backend::Postgres => self.run_on::<diesel::PgConnection>(cli, &url),
            #[allow(unreachable_patterns)]
            other => {
                let (name, feature) = match other {
                    Backend::Sqlite => ("SQLite", "sqlite"),
                    Backend::Mysql => ("MySQL / MariaDB", "mysql"),
                    Backend::Postgres => ("PostgreSQL", "postgres"),
                };
                Err(format!(
                    "this phi was built without {name} support: rebuild with `--features {feature}`"
                )
                .into())
            }
        }
    }

    #[allow(dead_code)] // Without a backend feature, nothing runs.
    fn run_on<C: crate::adopt::SchemaConnection>(&self, cli: &Cli, url: &str) -> CliResult
    where
        DieselKeyStore<C>: KeyStore,
    {
        // `audit access --table NAME` filters by a table name instead.
        let access_query = matches!(
            &cli.command,
            Command::Audit {
                command: Some(audit_access::AuditCommand::Access { .. }),
                ..
            }
        );
        let mut tables = cli
            .tables
            .iter()
            .filter(|t| !t.trim().is_empty() && !access_query)
            .map(|t| ResealTable::parse(t))
            .collect::<Result<Vec<_>, _>>()?;
        tables.extend(self.jobs.reseal_tables()?);
        let (store, kek, older): (Arc<dyn KeyStore>, _, _) = match &self.keyring {
            Some(keyring) => (
                keyring.store().clone(),
                keyring.primary_kek().clone(),
                Vec::new(),
            ),
            None => {
                let (kek, older) = configured_keks(cli)?;
                (key_store_on::<C>(url)?, kek, older)
            }
        };
        let env: Env<C> = Env {
            store,
            kek,
            older,
            tables,
            lookup: self.jobs.lookup_tables(),
            url: url.to_owned(),
            rollout_policy: self
                .keyring
                .as_ref()
                .map_or(cli.rollout_policy.as_str(), Keyring::rollout_policy)
                .to_owned(),
            keyring: self.keyring.clone(),
            owner_id_whitespace: cli.allow_owner_id_whitespace,
            out: Out::new(cli.format),
            progress: cli.quiet == 0,
            policy: cli.policy.clone(),
            connection: std::marker::PhantomData,
        };
        if cli.format == Format::Csv
            && !matches!(
                &cli.command,
                Command::Audit {
                    command: Some(audit_access::AuditCommand::Access { .. }),
                    ..
                }
            )
        {
            return Err("--format csv is only for `audit access`".into());
        }
        let code = match &cli.command {
            Command::Audit {
                command: Some(command),
                ..
            } => audit_access::run(&env, cli, command),
            Command::Audit { owner, limit, .. } => {
                env.out.set("command", "audit");
                audit(&env, owner.as_deref(), *limit)
            }
            Command::Rollout(command) => {
                env.out.set("command", "rollout");
                rollout(cli, &env, command)
            }
            Command::ClearCache { owner } => {
                env.out.set("command", "clear-cache");
                let keyring = env.keyring(&cli.actor)?;
                let id = lifecycle::clear_cache_fleet(&keyring, owner.as_deref())?;
                outln!(
                    env,
                    "Cleared the cached keys of {} fleet-wide (key event #{id}); processes following the feed drop them within {:.1} s.",
                    owner.as_deref().unwrap_or("every owner"),
                    cli.feed_interval
                );
                env.out.set("owner", owner.as_deref());
                env.out.set("key_event", id);
                Ok(ExitCode::SUCCESS)
            }
            Command::Keys(command) => keys(cli, &env, command),
            Command::Jobs(job) => {
                let keyring = env.keyring(&cli.actor)?;
                let mut conn = env.data()?;
                // The jobs print their own report.
                env.out.printed.set(true);
                self.jobs
                    .run(&mut conn, &keyring, job, cli.format, env.progress)
            }
            Command::Completions { .. }
            | Command::Man
            | Command::MasterKey(_)
            | Command::Migrations(_) => Ok(ExitCode::SUCCESS),
        }?;
        env.out.finish()?;
        Ok(code)
    }
}

/// phi's key store on the database at `url`, the backend chosen by its
/// scheme as the command line chooses it: `sqlite://FILE` or a file path,
/// `mysql://…` or `mariadb://…`, `postgres://…` or `postgresql://…`, each
/// with its cargo feature. Changes no schema: checks phi's tables
/// ([`DieselKeyStore::connect`]), which `phi migrations run` (or the
/// application's own `diesel migration run` over
/// [`migrations::write_to`](crate::migrations::write_to)'s files) puts in
/// place.
///
/// # Errors
/// An unknown scheme, a backend not built in, or the store's
/// [`DieselKeyStore::connect`] errors ([`Error::Schema`](crate::Error::Schema)
/// naming a missing table and migration).
pub fn key_store(url: &str) -> CliResult<Arc<dyn KeyStore>> {
    let (backend, url) = backend(url)?;
    match backend {
        #[cfg(feature = "sqlite")]
        Backend::Sqlite => key_store_on::<diesel::SqliteConnection>(&url),
        #[cfg(feature = "mysql")]
        Backend::Mysql => key_store_on::<diesel::MysqlConnection>(&url),
        #[cfg(feature = "postgres")]
        Backend::Postgres => key_store_on::<diesel::PgConnection>(&url),
        #[allow(unreachable_patterns)]
        _ => Err(format!(
            "{}: this build has no support for this database's backend",
            url.split("://").next().unwrap_or("the database URL")
        )
        .into()),
    }
}

/// The key store on the database at `url`.
fn key_store_on<C: DataConnection>(url: &str) -> CliResult<Arc<dyn KeyStore>>
where
    DieselKeyStore<C>: KeyStore,
{
    Ok(Arc::new(DieselKeyStore::<C>::connect(url)?))
}

/// Events of phi and its libraries to standard error: warnings and errors
/// by default, more with -v, fewer with -q; RUST_LOG, when set, overrides.
fn init_logging(verbose: u8, quiet: u8) {
    let level = match (verbose, quiet) {
        (0, 0) => "warn",
        (0, 1) => "error",
        (0, _) => "off",
        (1, _) => "info",
        (2, _) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Fails only when a subscriber is already set (by the application).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
}

/// The backends, chosen by the URL's scheme.
enum Backend {
    Sqlite,
    Mysql,
    Postgres,
}

/// The accepted URL forms and the cargo feature each backend needs, for
/// an error naming an unknown scheme.
const URL_SCHEMES: &str = "sqlite://FILE or a plain file path (feature `sqlite`, on by default), \
     mysql:// or mariadb:// (feature `mysql`), postgres:// or postgresql:// (feature `postgres`)";

/// The backend of `url`, and the URL its Diesel connection takes. A URL
/// with an unknown scheme (`postgress://…`) is refused, never taken for a
/// SQLite file name; text without `://` is a SQLite file path.
fn backend(url: &str) -> CliResult<(Backend, String)> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        Ok((Backend::Sqlite, path.to_owned()))
    } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        Ok((Backend::Mysql, url.replacen("mariadb://", "mysql://", 1)))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok((Backend::Postgres, url.to_owned()))
    } else if let Some((scheme, _)) = url.split_once("://") {
        Err(format!(
            "--database-url / DATABASE_URL: unknown scheme {scheme:?}; accepted: {URL_SCHEMES}"
        )
        .into())
    } else {
        Ok((Backend::Sqlite, url.to_owned()))
    }
}

/// A report in the chosen format: lines for people as the command goes,
/// or one JSON object printed at the end.
struct Out {
    format: Format,
    json: RefCell<serde_json::Map<String, Value>>,
    /// The command printed its own document (`audit`'s array, the jobs').
    printed: Cell<bool>,
}

impl Out {
    fn new(format: Format) -> Out {
        Out {
            format,
            json: RefCell::new(serde_json::Map::new()),
            printed: Cell::new(false),
        }
    }

    fn text(&self) -> bool {
        self.format == Format::Text
    }

    fn set(&self, key: &str, value: impl Into<Value>) {
        self.json.borrow_mut().insert(key.to_owned(), value.into());
    }

    fn finish(&self) -> CliResult<()> {
        if self.format == Format::Json && !self.printed.get() {
            let json = Value::Object(self.json.take());
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        Ok(())
    }
}

/// Everything a command needs on one backend.
struct Env<C> {
    store: Arc<dyn KeyStore>,
    kek: Arc<dyn KeyEncryptionKey>,
    /// Older KEKs that still unwrap keys they wrapped.
    older: Vec<Arc<dyn KeyEncryptionKey>>,
    tables: Vec<ResealTable>,
    /// The registered models' lookup-indexed tables.
    lookup: Vec<crate::lookup::LookupTable>,
    url: String,
    rollout_policy: String,
    /// The application's keyring, used as it is.
    keyring: Option<Keyring>,
    /// `--allow-owner-id-whitespace` (for a keyring built here).
    owner_id_whitespace: bool,
    out: Out,
    /// Progress bars (off with `-q`; drawn only on a terminal).
    progress: bool,
    /// `--max-key-age`, `--max-seals-per-key`, applied to the keyring.
    policy: due::PolicyArgs,
    connection: std::marker::PhantomData<fn() -> C>,
}

impl<C: DataConnection> Env<C> {
    fn keyring(&self, actor: &str) -> CliResult<Keyring> {
        if let Some(keyring) = &self.keyring {
            self.policy.apply(keyring)?;
            return Ok(keyring.clone());
        }
        let mut builder = Keyring::builder(self.store.clone(), self.kek.clone());
        for kek in &self.older {
            builder = builder.unwrap_with(kek.clone());
        }
        let keyring = builder
            .actor(actor)
            .rollout_policy(&self.rollout_policy)
            .allow_owner_id_whitespace(self.owner_id_whitespace)
            .build()?;
        self.policy.apply(&keyring)?;
        Ok(keyring)
    }

    fn data(&self) -> CliResult<C> {
        let mut conn = C::establish(&self.url)?;
        conn.prepare_key_store()?;
        Ok(conn)
    }

    fn owners_query(&self, given: &OwnersQuery) -> CliResult<String> {
        if let Some(q) = &given.owners_query {
            return Ok(q.clone());
        }
        if self.tables.is_empty() {
            return Err(
                "no owners query: pass --owners-query (e.g. \"SELECT DISTINCT user_id FROM cases\") or --table"
                    .into(),
            );
        }
        Ok(self
            .tables
            .iter()
            .map(|t| format!("SELECT {} FROM {}", t.owner_column, t.table))
            .collect::<Vec<_>>()
            .join(" UNION "))
    }

    fn need_tables(&self, what: &str) -> CliResult<()> {
        if self.tables.is_empty() {
            return Err(format!(
                "{what} needs the application's encrypted columns: pass --table (or PHI_TABLES)"
            )
            .into());
        }
        Ok(())
    }
}

/// A progress bar on standard error, drawn only when `visible` and
/// standard error is a terminal.
fn bar(len: u64, what: &str, visible: bool) -> ProgressBar {
    use std::io::IsTerminal as _;
    if !visible || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({per_sec}, {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn coverage_json(cov: &lifecycle::Coverage) -> Value {
    json!({
        "owners": cov.owners,
        "with_active_key": cov.with_active_key,
        "without_key": cov.without_key.len(),
        "all_retired": cov.all_retired.len(),
        "shredded": cov.shredded,
    })
}

fn print_coverage<C>(env: &Env<C>, label: &str, cov: &lifecycle::Coverage) {
    outln!(
        env,
        "{label}: {} of {} owners have an active data key ({:.1}%); {} without a key, {} with retired keys only, {} shredded",
        cov.with_active_key,
        cov.owners,
        cov.percent(),
        cov.without_key.len(),
        cov.all_retired.len(),
        cov.shredded
    );
}

fn keys<C>(cli: &Cli, env: &Env<C>, command: &KeysCommand) -> CliResult
where
    C: DataConnection,
{
    let name = match command {
        KeysCommand::Generate { .. } => "keys generate",
        KeysCommand::Status { .. } => "keys status",
        KeysCommand::Rotate(_) => "keys rotate",
        KeysCommand::Reseal { .. } => "keys reseal",
        KeysCommand::Rewrap { .. } => "keys rewrap",
        KeysCommand::Retire { .. } => "keys retire",
        KeysCommand::Shred { .. } => "keys shred",
        KeysCommand::Due => "keys due",
    };
    env.out.set("command", name);
    match command {
        KeysCommand::Generate {
            owners,
            dry_run,
            force,
        } => {
            let query = env.owners_query(owners)?;
            let before = lifecycle::coverage(env.store.as_ref(), &query)?;
            print_coverage(env, "Coverage before", &before);
            let todo = &before.without_key;
            env.out.set("dry_run", *dry_run);
            env.out.set("coverage_before", coverage_json(&before));
            env.out.set("to_generate", todo.len());
            if *dry_run {
                const SHOWN: usize = 20;
                for owner in todo.iter().take(SHOWN) {
                    outln!(env, "would generate a data key for owner {owner}");
                }
                if todo.len() > SHOWN {
                    outln!(
                        env,
                        "... and {} more owner(s) without a key",
                        todo.len() - SHOWN
                    );
                }
                outln!(
                    env,
                    "Dry run: {} key(s) would be generated; nothing was changed.",
                    todo.len()
                );
                if todo.len() > GENERATE_GUARD && !force {
                    outln!(
                        env,
                        "(more than {GENERATE_GUARD}: the real run needs --force)"
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            if todo.len() > GENERATE_GUARD && !force {
                env.out.printed.set(true);
                eprintln!(
                    "error: {} owners lack a data key, more than {GENERATE_GUARD}: check the owners query \
                     (--dry-run lists them), then pass --force; nothing was changed",
                    todo.len()
                );
                return Ok(ExitCode::from(EXIT_REFUSED));
            }
            let keyring = env.keyring(&cli.actor)?;
            let progress = bar(todo.len() as u64, "generating", env.progress);
            let options = lifecycle::GenerateOptions::default().progress(|done| {
                progress.set_position(*done as u64);
            });
            let created = lifecycle::generate(&keyring, todo, &options)?;
            progress.finish_and_clear();
            outln!(env, "Generated {created} data key(s).");
            let after = lifecycle::coverage(env.store.as_ref(), &query)?;
            print_coverage(env, "Coverage after", &after);
            env.out.set("generated", created);
            env.out.set("coverage_after", coverage_json(&after));
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::Status { owner, owners } => status(cli, env, owner.as_deref(), owners),
        KeysCommand::Rotate(args) => rotate_all::rotate(cli, env, args),
        KeysCommand::Reseal { owner, batch_size } => {
            env.need_tables("keys reseal")?;
            let keyring = env.keyring(&cli.actor)?;
            let mut conn = env.data()?;
            let progress = bar(0, "re-sealing", env.progress);
            let options = lifecycle::ResealOptions::default()
                .batch_size(*batch_size)
                .progress(|p| {
                    progress.set_length(p.total);
                    progress.set_position(p.resealed);
                });
            let report = lifecycle::reseal(&mut conn, &keyring, owner, &env.tables, &options)?;
            progress.finish_and_clear();
            outln!(
                env,
                "Owner {owner}: re-sealed {} of {} value(s) under version {} in {} batch(es); {} changed meanwhile by the application.",
                report.resealed,
                report.total,
                report.current_version,
                report.batches,
                report.conflicts
            );
            env.out.set("owner", owner.as_str());
            env.out.set("resealed", report.resealed);
            env.out.set("total", report.total);
            env.out.set("current_version", report.current_version);
            env.out.set("batches", report.batches);
            env.out.set("conflicts", report.conflicts);
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::Rewrap {
            to,
            to_key_file,
            from,
            batch_size,
        } => {
            let target = target_kek(to, to_key_file.as_deref())?;
            if target.id() == env.kek.id() {
                return Err(format!("the target KEK {:?} is the current KEK", target.id()).into());
            }
            let mut builder =
                Keyring::builder(env.store.clone(), target.clone()).unwrap_with(env.kek.clone());
            for kek in env.older.iter().filter(|k| k.id() != target.id()) {
                builder = builder.unwrap_with(kek.clone());
            }
            let keyring = builder.actor(&cli.actor).build()?;
            let progress = bar(0, "rewrapping", env.progress);
            let options = RewrapOptions::default()
                .from_kek_opt(from.clone())
                .batch_size(*batch_size)
                .progress(|p| {
                    progress.set_length(p.total);
                    progress.set_position(p.rewrapped + p.skipped);
                });
            let report = lifecycle::rewrap(&keyring, &options)?;
            progress.finish_and_clear();
            outln!(
                env,
                "Rewrapped {} of {} data key(s) under KEK {} in {} batch(es); {} changed meanwhile.",
                report.rewrapped,
                report.total,
                target.id(),
                report.batches,
                report.skipped
            );
            env.out.set("rewrapped", report.rewrapped);
            env.out.set("total", report.total);
            env.out.set("target_kek", target.id());
            env.out.set("batches", report.batches);
            env.out.set("skipped", report.skipped);
            outln!(
                env,
                "Point every process at the new KEK (PHI_KEK / --kek, or PHI_MASTER_KEY and PHI_KEK_ID); keep the old one configured until all have switched."
            );
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::Retire { owner, version } => {
            env.need_tables("keys retire")?;
            let keyring = env.keyring(&cli.actor)?;
            let mut conn = env.data()?;
            let retired = lifecycle::retire(&mut conn, &keyring, owner, *version, &env.tables)?;
            env.out.set("owner", owner.as_str());
            env.out.set("version", *version);
            env.out.set("retired", retired);
            if retired {
                outln!(
                    env,
                    "Owner {owner}: retired data key version {version}; it still opens old values, never seals."
                );
            } else {
                outln!(
                    env,
                    "Owner {owner}: data key version {version} was already retired."
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::Shred { owner, yes, sample } => shred(cli, env, owner, *yes, *sample),
        KeysCommand::Due => due::run(env, &cli.actor),
    }
}

/// Exit status of a refused operation (a key version still in use, the
/// current version, more than 1,000 keys to generate without `--force`) and
/// of a `keys shred` not confirmed: nothing was changed.
const EXIT_REFUSED: u8 = 3;

/// Exit status of `keys shred` when the keys were destroyed (or there were
/// none) but the result is not verified.
const EXIT_NOT_VERIFIED: u8 = 4;

/// What shredding guarantees, said before and after.
const SHRED_SCOPE: &str = "unreadable in this database now; in other processes once their key cache expires \
     (default 24 h) or they clear the owner; in backups, WAL, database logs and point-in-time-recovery \
     archives only once those expire, or once the KEK that wrapped the keys is rotated away \
     (`phi keys rewrap`) and destroyed";

fn shred<C>(cli: &Cli, env: &Env<C>, owner: &str, yes: bool, sample: usize) -> CliResult
where
    C: DataConnection,
{
    // Refused before anything is listed or asked.
    env.keyring(&cli.actor)?.check_owner_id(owner)?;
    let rows = env.store.load_keys(&[owner])?;
    let live: Vec<&crate::StoredKey> = rows
        .iter()
        .filter(|r| r.state != crate::KeyState::Destroyed)
        .collect();
    if rows.is_empty() {
        // Nothing to list, so nothing to confirm: stop here (a mistyped
        // owner id is the likely cause).
        env.out.set("owner", owner);
        env.out.set("key_rows", 0);
        env.out.set("destroyed_versions", Vec::<u32>::new());
        outln!(
            env,
            "Owner {owner}: no data key row at all (is the owner id mistyped?). Nothing was changed."
        );
        env.out.set("refused", "no data key row");
        return Ok(ExitCode::from(EXIT_REFUSED));
    }
    let listed: Vec<u32> = live.iter().map(|r| r.version).collect();
    let shown: Vec<String> = live
        .iter()
        .map(|r| format!("version {} ({}, KEK {})", r.version, r.state, r.kek_id))
        .collect();
    // Every row already destroyed: nothing is asked, nothing is destroyed
    // (an empty listing refuses any key created meanwhile), and the
    // verification runs again.
    if !live.is_empty() && !yes && !confirm(owner, &shown)? {
        eprintln!("Not confirmed: nothing was changed.");
        env.out.printed.set(true);
        return Ok(ExitCode::from(EXIT_REFUSED));
    }
    let keyring = env.keyring(&cli.actor)?;
    let mut conn = env.data()?;
    let before = lifecycle::feed_head(env.store.as_ref())?;
    // Only the versions listed (and confirmed): a key created since is
    // refused, not destroyed.
    let report =
        match lifecycle::shred_listed(&mut conn, &keyring, owner, &listed, &env.tables, sample) {
            Ok(report) => report,
            Err(error @ crate::Error::Refused { .. }) => {
                eprintln!("{error}");
                env.out.set("owner", owner);
                env.out.set("refused", error.to_string());
                return Ok(ExitCode::from(EXIT_REFUSED));
            }
            Err(error) => return Err(error.into()),
        };
    let event = lifecycle::read_feed(env.store.as_ref(), before, 10_000)?
        .into_iter()
        .find(|e| {
            e.event.kind == crate::feed::KeyEventKind::Shred
                && e.event.owner_id.as_deref() == Some(owner)
        });
    env.out.set("owner", owner);
    env.out
        .set("destroyed_versions", report.destroyed_versions.clone());
    env.out.set("key_rows", report.key_rows);
    env.out.set("keys_left", report.keys_left);
    env.out.set("sampled", report.sampled);
    env.out.set("still_open", report.still_open);
    env.out.set("columns", report.columns);
    env.out.set("in_clear", report.in_clear);
    env.out.set("key_event", event.as_ref().map(|e| e.id));
    if report.destroyed_versions.is_empty() {
        outln!(env, "Owner {owner}: no data key left to destroy.");
    } else {
        outln!(
            env,
            "Owner {owner}: destroyed data key version(s) {:?}.",
            report.destroyed_versions
        );
    }
    outln!(
        env,
        "Verification: {} of {} key row(s) still hold key material; {} of {} sampled value(s) in {} column(s) still open.",
        report.keys_left,
        report.key_rows,
        report.still_open,
        report.sampled,
        report.columns
    );
    if report.columns > 0 {
        if report.in_clear > 0 {
            outln!(
                env,
                "WARNING: {} value(s) of the owner in these columns are stored in the clear (not sealed: \
                 encrypted flag off); shredding does not protect them: delete them.",
                report.in_clear
            );
        } else {
            outln!(
                env,
                "No value of the owner in these columns is stored in the clear."
            );
        }
    }
    if let Some(event) = &event {
        // One interval for the next read, plus a second for the read itself.
        let by =
            event.event.occurred_at + Duration::from_secs_f64(cli.feed_interval.max(0.0) + 1.0);
        outln!(
            env,
            "Key event #{} recorded: processes following the key-event feed (every {:.1} s) drop this \
             owner's keys by {} UTC; processes that do not follow it keep them until their cache TTL \
             expires (default 24 h) or they restart.",
            event.id,
            cli.feed_interval,
            by.format("%H:%M:%S")
        );
    }
    if report.key_rows > 0 {
        outln!(
            env,
            "Backups, WAL, database logs and point-in-time-recovery archives still hold the old wrapped \
             keys: readable with the KEK that wrapped them until they expire, or until that KEK is \
             rotated away (`phi keys rewrap`) and destroyed."
        );
    }
    match report.outcome() {
        lifecycle::ShredOutcome::Verified => {
            env.out.set("verified", true);
            env.out.set("reasons", Value::Array(Vec::new()));
            outln!(
                env,
                "Crypto-shredding verified: the owner's sealed values no longer open from this database."
            );
            Ok(ExitCode::SUCCESS)
        }
        lifecycle::ShredOutcome::NotVerified(reasons) => {
            env.out.set("verified", false);
            env.out.set(
                "reasons",
                reasons.iter().map(ToString::to_string).collect::<Vec<_>>(),
            );
            outln!(env, "Crypto-shredding NOT verified:");
            for reason in reasons {
                outln!(env, "  - {reason}");
            }
            Ok(ExitCode::from(EXIT_NOT_VERIFIED))
        }
    }
}

/// A configured KEK.
type SharedKek = Arc<dyn KeyEncryptionKey>;

/// The KEK of `--kek` (default `local:<--kek-id>`), and the local KEK that
/// still unwraps older keys when the primary is a KMS key and a local master
/// key is in the environment ([`crate::KeyringConfig`]).
fn configured_keks(cli: &Cli) -> CliResult<(SharedKek, Vec<SharedKek>)> {
    Ok(crate::KeyringConfig::from_env_with(cli.kek.clone(), Some(&cli.kek_id))?.keks()?)
}

/// The target of `keys rewrap --to`: `local:ID` (a new local master key,
/// from `--to-key-file` or `PHI_NEW_MASTER_KEY`) or `aws-kms:KEY`.
fn target_kek(
    spec: &str,
    key_file: Option<&std::path::Path>,
) -> CliResult<Arc<dyn KeyEncryptionKey>> {
    match spec
        .parse::<crate::KekSpec>()
        .map_err(|e| format!("--to: {e}"))?
    {
        crate::KekSpec::Local { id } => {
            let kek = match key_file {
                Some(path) => LocalKek::from_file(id, path)?,
                None => {
                    let key = std::env::var(NEW_MASTER_KEY_ENV).map_err(|_| {
                        format!("--to {spec}: pass --to-key-file or set {NEW_MASTER_KEY_ENV}")
                    })?;
                    LocalKek::from_base64(id, &zeroize::Zeroizing::new(key))?
                }
            };
            Ok(Arc::new(kek))
        }
        other => Ok(other.build()?),
    }
}

/// Asks on standard error (standard output stays the report) for the owner
/// id, typed again: a `yes` typed by habit does not shred the wrong owner.
fn confirm(owner: &str, versions: &[String]) -> CliResult<bool> {
    eprint!(
        "Destroy every data key of owner {owner}: {}?\n\
         Its sealed values become {SHRED_SCOPE}. Values stored in the clear are not affected.\n\
         Type the owner id again to continue: ",
        versions.join(", ")
    );
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(answer.trim_end_matches(['\r', '\n']) == owner)
}

fn status<C>(cli: &Cli, env: &Env<C>, owner: Option<&str>, owners: &OwnersQuery) -> CliResult
where
    C: DataConnection,
{
    match owner {
        None => {
            if owners.owners_query.is_some() || !env.tables.is_empty() {
                let query = env.owners_query(owners)?;
                let coverage = lifecycle::coverage(env.store.as_ref(), &query)?;
                print_coverage(env, "Coverage", &coverage);
                env.out.set("coverage", coverage_json(&coverage));
            }
            print_feed(env)?;
            outln!(env, "Data keys by KEK and state:");
            let counts = env.store.key_counts()?;
            env.out.set(
                "keys_by_kek",
                counts
                    .iter()
                    .map(|c| {
                        json!({
                            "kek_id": c.kek_id,
                            "state": c.state.to_string(),
                            "keys": c.keys,
                            "owners": c.owners,
                        })
                    })
                    .collect::<Vec<_>>(),
            );
            if counts.is_empty() {
                outln!(env, "  (none)");
            }
            for c in counts {
                outln!(
                    env,
                    "  {:<20} {:<10} {:>6} key(s)  {:>6} owner(s)",
                    c.kek_id,
                    c.state,
                    c.keys,
                    c.owners
                );
            }
        }
        Some(owner) => {
            let mut rows = env.store.load_keys(&[owner])?;
            rows.sort_by_key(|r| r.version);
            env.out.set("owner", owner);
            env.out.set(
                "versions",
                rows.iter()
                    .map(|r| {
                        json!({
                            "version": r.version,
                            "state": r.state.to_string(),
                            "kek_id": r.kek_id,
                            "created_at": r.created_at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
                        })
                    })
                    .collect::<Vec<_>>(),
            );
            outln!(env, "Owner {owner}:");
            if rows.is_empty() {
                outln!(env, "  no data key");
            }
            for r in &rows {
                outln!(
                    env,
                    "  version {:<4} {:<10} KEK {:<20} created {}",
                    r.version,
                    r.state,
                    r.kek_id,
                    r.created_at.format("%Y-%m-%d %H:%M:%S")
                );
            }
            if !env.tables.is_empty() {
                let mut conn = env.data()?;
                outln!(env, "Stored values by key version:");
                let usage = lifecycle::usage(&mut conn, owner, &env.tables)?;
                env.out.set(
                    "usage",
                    usage
                        .iter()
                        .map(|u| {
                            json!({
                                "table": u.table,
                                "column": u.column,
                                "key_version": u.key_version,
                                "values": u.values,
                            })
                        })
                        .collect::<Vec<_>>(),
                );
                if usage.is_empty() {
                    outln!(env, "  (none)");
                }
                for u in usage {
                    outln!(
                        env,
                        "  {}.{:<24} version {:<4} {:>8} value(s)",
                        u.table,
                        u.column,
                        u.key_version,
                        u.values
                    );
                }
            }
            if rows.iter().any(|r| r.state != crate::KeyState::Destroyed) {
                let keyring = env.keyring(&cli.actor)?;
                let keys = keyring.keys_for_open(owner)?;
                let stats = keyring.stats();
                env.out.set("current_version", keys.current_version());
                outln!(
                    env,
                    "Keyring (this process): current version {}; cache {} owner(s), {} hit(s), {} miss(es), {} unwrap(s), {} key-store quer(ies)",
                    keys.current_version()
                        .map_or("none".to_owned(), |v| v.to_string()),
                    stats.cached_owners,
                    stats.hits,
                    stats.misses,
                    stats.unwraps,
                    stats.store_queries
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_feed<C>(env: &Env<C>) -> CliResult<()>
where
    C: DataConnection,
{
    let head = lifecycle::feed_head(env.store.as_ref())?;
    let last = lifecycle::read_feed(env.store.as_ref(), head - 1, 1)?;
    env.out.set(
        "feed",
        json!({
            "head": head,
            "last": last.first().map(|last| json!({
                "kind": last.event.kind.to_string(),
                "owner": last.event.owner_id,
                "actor": last.event.actor,
                "occurred_at": last.event.occurred_at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
            })),
        }),
    );
    match last.first() {
        Some(last) => outln!(
            env,
            "Key-event feed: head #{head} (last: {} {} by {} at {} UTC)",
            last.event.kind,
            last.event.owner_id.as_deref().unwrap_or("every owner"),
            last.event.actor,
            last.event.occurred_at.format("%Y-%m-%d %H:%M:%S")
        ),
        None => outln!(env, "Key-event feed: head #{head} (no event yet)"),
    }
    let readers = lifecycle::feed_readers(env.store.as_ref())?;
    env.out.set(
        "feed_readers",
        Value::Array(
            readers
                .iter()
                .map(|r| {
                    json!({
                        "reader": r.reader,
                        "position": r.position,
                        "behind": r.behind(head),
                        "age_ms": u64::try_from(r.age().as_millis()).unwrap_or(u64::MAX),
                    })
                })
                .collect(),
        ),
    );
    if readers.is_empty() {
        outln!(
            env,
            "Feed readers: none recorded (no keyring follows the feed, or none has read it yet)"
        );
    } else {
        outln!(env, "Feed readers: {}", readers.len());
        for r in &readers {
            outln!(
                env,
                "  {}  at #{} ({} behind), recorded {:.1} s ago",
                r.reader,
                r.position,
                r.behind(head),
                r.age().as_secs_f64()
            );
        }
    }
    let policy = &env.rollout_policy;
    let stored = lifecycle::fleet_rollout(env.store.as_ref(), policy)?;
    env.out.set(
        "rollout",
        json!({ "policy": policy, "value": stored.as_ref().map(describe) }),
    );
    match stored {
        Some(rollout) => outln!(env, "Roll-out policy {policy:?}: {}", describe(&rollout)),
        None => outln!(
            env,
            "Roll-out policy {policy:?}: never set (each keyring uses the policy it was built with)"
        ),
    }
    Ok(())
}

fn describe(rollout: &crate::Rollout) -> String {
    match rollout {
        crate::Rollout::Owners(owners) => {
            let mut owners: Vec<&str> = owners.iter().map(String::as_str).collect();
            owners.sort_unstable();
            format!("owners {}", owners.join(", "))
        }
        other => lifecycle::describe_rollout(other),
    }
}

fn rollout<C>(cli: &Cli, env: &Env<C>, command: &RolloutCommand) -> CliResult
where
    C: DataConnection,
{
    use crate::Rollout;
    let current = lifecycle::fleet_rollout(env.store.as_ref(), &env.rollout_policy)?;
    let next = match command {
        RolloutCommand::Status => None,
        RolloutCommand::All => Some(Rollout::All),
        RolloutCommand::Nobody => Some(Rollout::Nobody),
        RolloutCommand::Set { owners } => Some(Rollout::owners(owners.iter().cloned())),
        RolloutCommand::Enable { owners } => Some(match current {
            Some(Rollout::All) => Rollout::All,
            Some(Rollout::Owners(mut set)) => {
                set.extend(owners.iter().cloned());
                Rollout::Owners(set)
            }
            _ => Rollout::owners(owners.iter().cloned()),
        }),
        RolloutCommand::Disable { owners } => match current {
            Some(Rollout::All) | None => {
                return Err(
                    "the roll-out is every owner (or was never set): name the owners to seal with `phi rollout set --owner …`"
                        .into(),
                );
            }
            Some(Rollout::Owners(mut set)) => {
                for owner in owners {
                    set.remove(owner);
                }
                Some(if set.is_empty() {
                    Rollout::Nobody
                } else {
                    Rollout::Owners(set)
                })
            }
            Some(other) => Some(other),
        },
    };
    if let Some(next) = next {
        let keyring = env.keyring(&cli.actor)?;
        let id = lifecycle::set_rollout(&keyring, &next)?;
        env.out.set("set", describe(&next));
        env.out.set("key_event", id);
        outln!(
            env,
            "Roll-out policy {:?} set to {} (key event #{id}); processes following the feed apply it within {:.1} s.",
            env.rollout_policy,
            describe(&next),
            cli.feed_interval
        );
    }
    print_feed(env)?;
    Ok(ExitCode::SUCCESS)
}

fn audit<C>(env: &Env<C>, owner: Option<&str>, limit: usize) -> CliResult
where
    C: DataConnection,
{
    let records = env.store.audit(owner, limit)?;
    if !env.out.text() {
        let records: Vec<serde_json::Value> = records
            .into_iter()
            .map(|r| {
                let e = r.event;
                serde_json::json!({
                    "id": r.id,
                    "occurred_at": e.occurred_at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
                    "owner": e.owner_id,
                    "action": e.action.as_str(),
                    "key_version": e.key_version,
                    "kek_id": e.kek_id,
                    "actor": e.actor,
                    "detail": e.detail,
                })
            })
            .collect();
        env.out.printed.set(true);
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        env,
        "{:>6}  {:<26}  {:<24}  {:<8}  {:>7}  {:<14}  {:<12}  detail",
        "id",
        "occurred at (UTC)",
        "owner",
        "action",
        "version",
        "KEK",
        "actor"
    );
    for r in records {
        let e = r.event;
        let line = format!(
            "{:>6}  {:<26}  {:<24}  {:<8}  {:>7}  {:<14}  {:<12}  {}",
            r.id,
            e.occurred_at.format("%Y-%m-%d %H:%M:%S%.6f").to_string(),
            e.owner_id,
            e.action,
            e.key_version.map_or("-".to_owned(), |v| v.to_string()),
            e.kek_id.as_deref().unwrap_or("-"),
            e.actor,
            e.detail.as_deref().unwrap_or("")
        );
        outln!(env, "{}", line.trim_end());
    }
    Ok(ExitCode::SUCCESS)
}
