//! `phi master-key`: a local master key generated, split into shares,
//! rebuilt from them, and checked against the database (the recovery
//! drill). See [`crate::master_key`] for the key file and share formats.
//!
//! Key material goes only where it is asked to go: a new file (mode 0600,
//! never replacing one) or standard output when that is a pipe or a
//! private file. Reports and errors name files, share ids, splits and KEK
//! ids, never a key or a share's value.

use std::io::{IsTerminal as _, Read as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Subcommand;
use serde_json::json;
use zeroize::Zeroizing;

use super::{Backend, Cli, CliResult, EXIT_NOT_VERIFIED, Out, Refused, backend};
use crate::master_key::{self, MasterKeyShare};
use crate::store::DieselKeyStore;
use crate::{KeyBytes, KeyEncryptionKey, KeyStore, LocalKek};

/// A line of the report for people; nothing with `--format json`.
macro_rules! outln {
    ($out:expr, $($arg:tt)*) => {
        if $out.text() {
            println!($($arg)*);
        }
    };
}

/// The master key of a local KEK (`PHI_MASTER_KEY` /
/// `PHI_MASTER_KEY_FILE`): generate it, back it up as shares, rebuild it,
/// and check it against the database.
#[derive(Debug, Subcommand)]
pub(super) enum MasterKeyCommand {
    /// Generates a new 32-byte master key (base64, as PHI_MASTER_KEY_FILE
    /// reads it).
    ///
    /// With --out FILE the key goes to a new file created with mode 0600
    /// (an existing file is never replaced). Without --out it goes to
    /// standard output, for a pipe (`phi master-key generate | vault kv
    /// put …`) or a private file (`(umask 077; phi master-key generate >
    /// FILE)`): refused when standard output is a terminal (its scrollback
    /// would keep the key) unless --terminal, and when it is a file its
    /// group or others may read.
    Generate {
        /// The new key file (created 0600; refused if it exists).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print the key even when standard output is a terminal.
        #[arg(long)]
        terminal: bool,
    },
    /// Splits the master key into shares, any --threshold of which rebuild
    /// it (Shamir's secret sharing; fewer tell nothing about the key).
    ///
    /// The key comes from --key-file, else PHI_MASTER_KEY_FILE, else
    /// PHI_MASTER_KEY. With --out-dir each share goes to a file of its own
    /// (`share-<id>-of-<N>-<split>.txt`, mode 0600, never replacing one),
    /// to be handed to its holder; without it the shares go to standard
    /// output, one a line, under the same rules as `generate`'s key.
    /// Each share is one line of text:
    /// `phi-share-v1:<split>:<K>:<N>:<id>:<key check>:<value>:<checksum>`.
    Split {
        /// How many shares to make (2 to 255).
        #[arg(long)]
        shares: u8,
        /// How many shares rebuild the key (2 to --shares).
        #[arg(long)]
        threshold: u8,
        /// The master key file (default: PHI_MASTER_KEY_FILE, else
        /// PHI_MASTER_KEY).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// A directory for the share files (created if missing).
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Print the shares even when standard output is a terminal.
        #[arg(long)]
        terminal: bool,
    },
    /// Rebuilds the master key from shares of one split.
    ///
    /// Reads the share FILEs (`-` or none: standard input), each holding
    /// one or more shares, one a line (lines beginning with `#` are
    /// skipped). Refuses a damaged share (its checksum), shares of two
    /// splits, a share given twice, and fewer shares than the split's
    /// threshold, each naming the share. The key is written as `generate`
    /// writes it: --out FILE (0600, never replacing one) or standard output.
    Combine {
        /// Files of shares; `-` or none for standard input.
        #[arg(value_name = "FILE")]
        files: Vec<PathBuf>,
        /// The new key file (created 0600; refused if it exists).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print the key even when standard output is a terminal.
        #[arg(long)]
        terminal: bool,
    },
    /// The recovery drill: checks a master key, or shares that rebuild it,
    /// against the KEK check value stored in the database, writing nothing.
    ///
    /// The key comes from --shares (files of shares, `-` for standard
    /// input), else --key-file, else PHI_MASTER_KEY_FILE, else
    /// PHI_MASTER_KEY; it is checked as the KEK of --kek local:ID or
    /// --kek-id. With --kek aws-kms:KEY it checks instead that the KMS
    /// key or alias still decrypts the canary stored for that KEK.
    ///
    /// Exit status: 0 the key matches (the KMS key decrypts the canary);
    /// 4 it does not, or no check value is stored for the KEK, or the KMS
    /// refuses to decrypt the canary (key missing, disabled or pending
    /// deletion, another key behind the alias, access denied to these
    /// credentials); 1 the check could not be made (unreadable key or
    /// shares, database or KMS unreachable).
    Verify {
        /// The master key file to check.
        #[arg(long, conflicts_with = "shares")]
        key_file: Option<PathBuf>,
        /// Files of shares to rebuild the key from and check (`-`:
        /// standard input).
        #[arg(long, num_args = 1.., value_name = "FILE")]
        shares: Vec<PathBuf>,
    },
}

impl MasterKeyCommand {
    fn name(&self) -> &'static str {
        match self {
            MasterKeyCommand::Generate { .. } => "master-key generate",
            MasterKeyCommand::Split { .. } => "master-key split",
            MasterKeyCommand::Combine { .. } => "master-key combine",
            MasterKeyCommand::Verify { .. } => "master-key verify",
        }
    }
}

/// Runs a `master-key` command. `database_url` is the application's
/// (for `verify`, unless `--database-url` names one); `store` its keyring's
/// key store, when it has one.
pub(super) fn run(
    cli: &Cli,
    database_url: Option<&str>,
    store: Option<Arc<dyn KeyStore>>,
    command: &MasterKeyCommand,
) -> CliResult {
    let out = Out::new(cli.format);
    out.set("command", command.name());
    let code = match command {
        MasterKeyCommand::Generate {
            out: path,
            terminal,
        } => {
            let key = master_key::generate()?;
            write_key(
                &out,
                &key,
                path.as_deref(),
                *terminal,
                "Generated a new master key",
            )?;
            ExitCode::SUCCESS
        }
        MasterKeyCommand::Split {
            shares,
            threshold,
            key_file,
            out_dir,
            terminal,
        } => {
            let (key, from) = configured_key(key_file.as_deref())?;
            let made = master_key::split(&key, *threshold, *shares)?;
            write_shares(&out, &made, &from, out_dir.as_deref(), *terminal)?;
            ExitCode::SUCCESS
        }
        MasterKeyCommand::Combine {
            files,
            out: path,
            terminal,
        } => {
            let shares = read_shares(files)?;
            let key = master_key::combine(&shares)?;
            let what = format!("Rebuilt the master key from {}", describe_shares(&shares));
            out.set("split", shares[0].split_id());
            out.set("shares", share_ids(&shares));
            write_key(&out, &key, path.as_deref(), *terminal, &what)?;
            ExitCode::SUCCESS
        }
        MasterKeyCommand::Verify { key_file, shares } => {
            verify(cli, &out, database_url, store, key_file.as_deref(), shares)?
        }
    };
    out.finish()?;
    Ok(code)
}

/// The key `split` and `verify` use: --key-file, else PHI_MASTER_KEY_FILE,
/// else PHI_MASTER_KEY; and where it came from, for the report.
fn configured_key(key_file: Option<&Path>) -> CliResult<(KeyBytes, String)> {
    let from_file = |path: &Path| -> CliResult<(KeyBytes, String)> {
        let key = master_key::read_key_file(path)
            .map_err(|reason| format!("master key file {}: {reason}", path.display()))?;
        Ok((key, path.display().to_string()))
    };
    if let Some(path) = key_file {
        return from_file(path);
    }
    if let Some(path) = std::env::var_os(crate::MASTER_KEY_FILE_ENV) {
        return from_file(Path::new(&path));
    }
    if let Ok(text) = std::env::var(crate::MASTER_KEY_ENV) {
        let text = Zeroizing::new(text);
        let key = master_key::decode(&text)
            .map_err(|reason| format!("{}: {reason}", crate::MASTER_KEY_ENV))?;
        return Ok((key, crate::MASTER_KEY_ENV.to_owned()));
    }
    Err(format!(
        "no master key: pass --key-file, or set {} or {}",
        crate::MASTER_KEY_FILE_ENV,
        crate::MASTER_KEY_ENV
    )
    .into())
}

/// Reads shares from `files` (`-` or none: standard input).
fn read_shares(files: &[PathBuf]) -> CliResult<Vec<MasterKeyShare>> {
    let stdin = Path::new("-");
    let files: Vec<&Path> = if files.is_empty() {
        vec![stdin]
    } else {
        files.iter().map(PathBuf::as_path).collect()
    };
    let mut shares = Vec::new();
    for file in files {
        let mut text = Zeroizing::new(String::new());
        let source = if file == stdin {
            std::io::stdin()
                .lock()
                .read_to_string(&mut text)
                .map_err(|e| format!("cannot read shares from standard input: {e}"))?;
            "standard input".to_owned()
        } else {
            std::fs::File::open(file)
                .and_then(|mut f| f.read_to_string(&mut text))
                .map_err(|e| format!("cannot read shares from {}: {e}", file.display()))?;
            file.display().to_string()
        };
        shares.extend(master_key::parse_shares(&text, &source)?);
    }
    if shares.is_empty() {
        return Err(crate::master_key::ShareError::NoShares.into());
    }
    Ok(shares)
}

fn share_ids(shares: &[MasterKeyShare]) -> Vec<u8> {
    shares.iter().map(MasterKeyShare::id).collect()
}

/// "shares 1, 3, 5 of split …".
fn describe_shares(shares: &[MasterKeyShare]) -> String {
    let ids = share_ids(shares)
        .iter()
        .map(u8::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    match shares.first() {
        Some(first) => format!(
            "shares {ids} of split {} ({} of {} needed)",
            first.split_id(),
            first.threshold(),
            first.shares()
        ),
        None => "no share".to_owned(),
    }
}

/// Standard output may carry key material: refused on a terminal unless
/// `terminal`, and (on Unix) when it is a file its group or others can
/// read.
fn check_stdout(terminal: bool, what: &str, flag: &str) -> CliResult<()> {
    let stdout = std::io::stdout();
    if stdout.is_terminal() && !terminal {
        return Err(Refused(format!(
            "refusing to print {what} on a terminal (its scrollback would keep it): pass \
             {flag}, pipe standard output to where it goes, or pass --terminal"
        ))
        .into());
    }
    #[cfg(unix)]
    {
        use std::os::fd::AsFd as _;
        use std::os::unix::fs::MetadataExt as _;
        let meta = stdout
            .as_fd()
            .try_clone_to_owned()
            .map(std::fs::File::from)
            .and_then(|f| f.metadata());
        if let Ok(meta) = meta
            && meta.is_file()
            && meta.mode() & 0o077 != 0
        {
            return Err(Refused(format!(
                "refusing to write {what} to standard output: it is a file its group or \
                 others may read (mode {:03o}); pass {flag} (created with mode 0600), or \
                 redirect under `umask 077`",
                meta.mode() & 0o777
            ))
            .into());
        }
    }
    Ok(())
}

/// Writes a key to `path` (new, 0600) or standard output, and reports it.
fn write_key(
    out: &Out,
    key: &KeyBytes,
    path: Option<&Path>,
    terminal: bool,
    what: &str,
) -> CliResult<()> {
    match path {
        Some(path) => {
            master_key::write_key_file(path, key).map_err(|e| new_file_error(path, &e))?;
            out.set("out", path.display().to_string());
            outln!(
                out,
                "{what}: written to {} (mode 0600). Point PHI_MASTER_KEY_FILE at it.",
                path.display()
            );
        }
        None => {
            refuse_json_on_stdout(out, "--out FILE")?;
            check_stdout(terminal, "a master key", "--out FILE")?;
            print_secret(&master_key::encode(key))?;
            eprintln!("{what}: printed on standard output.");
        }
    }
    Ok(())
}

/// Writes shares to files in `dir`, or to standard output.
fn write_shares(
    out: &Out,
    shares: &[MasterKeyShare],
    from: &str,
    dir: Option<&Path>,
    terminal: bool,
) -> CliResult<()> {
    let Some(first) = shares.first() else {
        return Err("no share made".into());
    };
    let split = first.split_id();
    let summary = format!(
        "Split the master key from {from} into {} shares (split {split}); any {} of them \
         rebuild it, fewer tell nothing about it.",
        first.shares(),
        first.threshold()
    );
    out.set("split", split.clone());
    out.set("threshold", first.threshold());
    out.set("shares", first.shares());
    let Some(dir) = dir else {
        refuse_json_on_stdout(out, "--out-dir DIR")?;
        check_stdout(terminal, "master key shares", "--out-dir DIR")?;
        let mut text = Zeroizing::new(String::new());
        for share in shares {
            text.push_str(&share.to_text());
            text.push('\n');
        }
        print_secret(&text)?;
        eprintln!("{summary}");
        return Ok(());
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create the directory {}: {e}", dir.display()))?;
    let made = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC");
    let mut written: Vec<PathBuf> = Vec::new();
    let mut files = Vec::new();
    for share in shares {
        let name = format!(
            "share-{}-of-{}-{}.txt",
            share.id(),
            share.shares(),
            &split[..8]
        );
        let path = dir.join(name);
        let mut text = Zeroizing::new(format!(
            "# phi master key share {id} of {n}: any {k} of the {n} shares rebuild the key.\n\
             # Split {split}, made {made}. Keep it apart from the other shares.\n\
             # Rebuild: phi master-key combine --out master.key SHARE-FILE...\n",
            id = share.id(),
            n = share.shares(),
            k = share.threshold(),
        ));
        text.push_str(&share.to_text());
        text.push('\n');
        if let Err(e) = master_key::write_new_private_file(&path, text.as_bytes()) {
            // All or nothing: a half-written set is removed.
            for done in &written {
                let _ = std::fs::remove_file(done);
            }
            return Err(new_file_error(&path, &e));
        }
        written.push(path.clone());
        files.push(json!({"id": share.id(), "file": path.display().to_string()}));
    }
    out.set("files", files);
    outln!(out, "{summary}");
    for path in &written {
        outln!(out, "  {}", path.display());
    }
    outln!(
        out,
        "Give each file to a different holder; check them with `phi master-key verify --shares FILE...`."
    );
    Ok(())
}

fn new_file_error(path: &Path, e: &std::io::Error) -> Box<dyn std::error::Error> {
    if e.kind() == std::io::ErrorKind::AlreadyExists {
        Refused(format!(
            "{} exists: refusing to replace it (nothing was written)",
            path.display()
        ))
        .into()
    } else {
        format!("cannot write {}: {e}", path.display()).into()
    }
}

fn refuse_json_on_stdout(out: &Out, flag: &str) -> CliResult<()> {
    if out.text() {
        return Ok(());
    }
    Err(Refused(format!(
        "--format json reports on standard output, where this key material would go: pass {flag}"
    ))
    .into())
}

/// Key material on standard output.
fn print_secret(text: &str) -> CliResult<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// `master-key verify`.
fn verify(
    cli: &Cli,
    out: &Out,
    database_url: Option<&str>,
    store: Option<Arc<dyn KeyStore>>,
    key_file: Option<&Path>,
    share_files: &[PathBuf],
) -> CliResult<ExitCode> {
    let store = match store {
        Some(store) if cli.database_url.is_none() => store,
        _ => {
            let url = cli
                .database_url
                .as_deref()
                .or(database_url)
                .ok_or("no database: pass --database-url or set DATABASE_URL")?;
            read_only_store(url)?
        }
    };
    let spec = cli.kek.clone().unwrap_or_else(|| crate::KekSpec::Local {
        id: cli.kek_id.clone(),
    });
    let (kek, from): (Arc<dyn KeyEncryptionKey>, String) = match spec {
        crate::KekSpec::Local { id } => {
            let (key, from) = if share_files.is_empty() {
                configured_key(key_file)?
            } else {
                let shares = read_shares(share_files)?;
                let key = master_key::combine(&shares)?;
                (key, describe_shares(&shares))
            };
            (
                Arc::new(LocalKek::new(id, &key)),
                format!("the master key from {from}"),
            )
        }
        crate::KekSpec::AwsKms { key } => {
            if key_file.is_some() || !share_files.is_empty() {
                return Err(
                    "--key-file and --shares check a local master key; with --kek aws-kms:… \
                     the KMS key itself is checked"
                        .into(),
                );
            }
            let from = format!("KMS key {key}");
            (crate::KekSpec::AwsKms { key }.build()?, from)
        }
    };
    let kek_id = kek.id().to_owned();
    out.set("kek_id", kek_id.clone());
    let Some(check) = store.kek_check(&kek_id)? else {
        out.set("matches", false);
        out.set("check_value", serde_json::Value::Null);
        let known = store
            .key_counts()
            .map(|counts| {
                let mut ids: Vec<String> = counts.into_iter().map(|c| c.kek_id).collect();
                ids.dedup();
                ids
            })
            .unwrap_or_default();
        outln!(
            out,
            "NOT VERIFIED: no check value is stored for KEK {kek_id} in this database, so \
             nothing can confirm {from}."
        );
        if known.is_empty() {
            outln!(out, "This database holds no data key under any KEK.");
        } else {
            outln!(
                out,
                "KEK ids with data keys here: {} (pass --kek-id or --kek to check another).",
                known.join(", ")
            );
        }
        return Ok(ExitCode::from(EXIT_NOT_VERIFIED));
    };
    out.set("check_value", check.format.clone());
    match kek.verify_check_value(&check) {
        Ok(true) => {
            out.set("matches", true);
            let how = if check.format == crate::CHECK_FORMAT_LOCAL {
                "matches the check value"
            } else {
                "decrypts the canary"
            };
            outln!(
                out,
                "VERIFIED: {from} {how} stored for KEK {kek_id} ({}): it is the key this \
                 database knows under that id.",
                check.format
            );
            Ok(ExitCode::SUCCESS)
        }
        Ok(false) => {
            out.set("matches", false);
            outln!(
                out,
                "NOT VERIFIED: {from} does not match the check value stored for KEK {kek_id} \
                 ({}{}): it is not the key this database knows under that id.",
                check.format,
                match check.format.as_str() {
                    crate::CHECK_FORMAT_LOCAL => ", a local master key's",
                    "kms-canary-v1" => ", a KMS key's",
                    _ => "",
                }
            );
            Ok(ExitCode::from(EXIT_NOT_VERIFIED))
        }
        Err(error) => {
            if let Some(reason) = kms_does_not_decrypt(error.as_ref()) {
                out.set("matches", false);
                out.set("reason", reason.clone());
                outln!(
                    out,
                    "NOT VERIFIED: {from} does not decrypt the canary stored for KEK {kek_id}: {reason}."
                );
                return Ok(ExitCode::from(EXIT_NOT_VERIFIED));
            }
            Err(format!("cannot check KEK {kek_id} ({from}): {error}").into())
        }
    }
}

/// A KMS answer that says the key does not decrypt the canary (missing,
/// disabled, pending deletion, another key behind the alias, or access
/// refused to these credentials), as opposed to no answer (unreachable,
/// throttled), which cannot tell.
#[cfg(feature = "aws-kms")]
fn kms_does_not_decrypt(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    use crate::AwsKmsErrorKind as Kind;
    let kms = error.downcast_ref::<crate::AwsKmsError>()?;
    matches!(
        kms.kind,
        Kind::KeyDisabled
            | Kind::KeyState
            | Kind::KeyNotFound
            | Kind::InvalidCiphertext
            | Kind::AccessDenied
    )
    .then(|| kms.kind.to_string())
}

#[cfg(not(feature = "aws-kms"))]
fn kms_does_not_decrypt(_: &(dyn std::error::Error + 'static)) -> Option<String> {
    None
}

/// phi's key store at `url`, opened without migrating: `verify` writes
/// nothing (a SQLite file that does not exist is refused, not created).
fn read_only_store(url: &str) -> CliResult<Arc<dyn KeyStore>> {
    let (backend, url) = backend(url)?;
    match backend {
        #[cfg(feature = "sqlite")]
        Backend::Sqlite => {
            let path = url.strip_prefix("file:").unwrap_or(&url);
            let path = path.split('?').next().unwrap_or(path);
            if path != ":memory:" && !Path::new(path).exists() {
                return Err(format!("no SQLite database at {path}").into());
            }
            Ok(Arc::new(
                DieselKeyStore::<diesel::SqliteConnection>::builder(&url)
                    .check_schema(false)
                    .connect()?,
            ))
        }
        #[cfg(feature = "mysql")]
        Backend::Mysql => Ok(Arc::new(
            DieselKeyStore::<diesel::MysqlConnection>::builder(&url)
                .check_schema(false)
                .connect()?,
        )),
        #[cfg(feature = "postgres")]
        Backend::Postgres => Ok(Arc::new(
            DieselKeyStore::<diesel::PgConnection>::builder(&url)
                .check_schema(false)
                .connect()?,
        )),
        #[allow(unreachable_patterns)]
        _ => Err("this phi was built without support for this database's backend".into()),
    }
}
