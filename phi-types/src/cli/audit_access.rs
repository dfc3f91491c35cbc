//! `phi audit access`, `phi audit verify` and `phi audit prune`: the
//! access log's queries, its chain's verification, and retention.

use std::process::ExitCode;
use std::sync::Arc;

use chrono::NaiveDateTime;
use clap::Subcommand;
use serde_json::{Value, json};

use super::{CliResult, Env, Format, backend};
use crate::access_log::{self, AccessFilter, AccessLogStore, StoredAccess};
use crate::lifecycle::DataConnection;

/// Exit status of `audit verify` when a chain is broken.
const EXIT_BROKEN: u8 = 4;

#[derive(Debug, Subcommand)]
pub(super) enum AuditCommand {
    /// Lists access records (who read or wrote which owner's record), the
    /// oldest first, in text, JSON (`--format json`: an array) or CSV
    /// (`--format csv`; cells beginning with `=`, `+`, `-`, `@`, a tab or
    /// a carriage return are prefixed with `'`, so that a spreadsheet
    /// takes them as text).
    ///
    /// `--actor USER` (or `--user USER`) selects the records of one end
    /// user.
    ///
    /// Every access to one case: `phi audit access --table cases --row 42`
    /// (`--table NAME`: only this table's records; a table description
    /// with `:`, as other commands take, is ignored here).
    Access {
        /// Only this owner's records.
        #[arg(long)]
        owner: Option<String>,
        /// Only this end user's (the accessor's user id); `--actor USER`
        /// given on the command line does the same.
        #[arg(long)]
        user: Option<String>,
        /// Only this row's (the row key's text).
        #[arg(long)]
        row: Option<String>,
        /// Only those at or after this UTC time (`YYYY-MM-DD` or
        /// `YYYY-MM-DDTHH:MM:SS`).
        #[arg(long, value_parser = parse_time)]
        since: Option<NaiveDateTime>,
        /// Only those before this UTC time.
        #[arg(long, value_parser = parse_time)]
        until: Option<NaiveDateTime>,
        /// Only this chain's.
        #[arg(long)]
        chain: Option<String>,
        /// At most this many (0: all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        #[command(flatten)]
        log: LogDatabase,
    },
    /// Walks every chain of the access log and checks each batch's keyed
    /// hash; names the first broken, missing or reordered batch.
    ///
    /// Exit status: 0 every chain intact; 4 a chain broken; 1 an error.
    /// The head printed (last batch and its hash) is worth keeping
    /// elsewhere: a later cut of the log's tail shows against it.
    Verify {
        /// Only this chain.
        #[arg(long)]
        chain: Option<String>,
        #[command(flatten)]
        log: LogDatabase,
    },
    /// Deletes access records, key audit records and key events older than
    /// a date. Each access chain keeps a checkpoint, so that it stays
    /// verifiable. Refused (exit 3, nothing deleted) while a keyring
    /// following the key-event feed has not read an event it would delete.
    Prune {
        /// Delete what happened before this UTC time (`YYYY-MM-DD` or
        /// `YYYY-MM-DDTHH:MM:SS`).
        #[arg(long, value_parser = parse_time)]
        before: NaiveDateTime,
        #[command(flatten)]
        log: LogDatabase,
    },
}

/// Where the access log is.
#[derive(Debug, clap::Args)]
pub(super) struct LogDatabase {
    /// The access log's database, when it is not the key store's
    /// (same URL forms as --database-url). Key audit records and key
    /// events stay in the key store's database.
    #[arg(long, env = "PHI_ACCESS_LOG_URL", hide_env_values = true)]
    access_log_url: Option<String>,
}

fn parse_time(text: &str) -> Result<NaiveDateTime, String> {
    let trimmed = text.trim_end_matches('Z');
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(trimmed, f).ok())
        .or_else(|| {
            chrono::NaiveDate::parse_from_str(trimmed, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
        })
        .ok_or_else(|| {
            format!("{text:?} is not a UTC time: expected YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS")
        })
}

/// The access log's tables at `url`.
fn access_store(url: &str) -> CliResult<Arc<dyn AccessLogStore>> {
    let (backend, url) = backend(url)?;
    match backend {
        #[cfg(feature = "sqlite")]
        super::Backend::Sqlite => Ok(Arc::new(access_log::DieselAccessLogStore::<
            diesel::SqliteConnection,
        >::connect(&url)?)),
        #[cfg(feature = "mysql")]
        super::Backend::Mysql => Ok(Arc::new(access_log::DieselAccessLogStore::<
            diesel::MysqlConnection,
        >::connect(&url)?)),
        #[cfg(feature = "postgres")]
        super::Backend::Postgres => Ok(Arc::new(access_log::DieselAccessLogStore::<
            diesel::PgConnection,
        >::connect(&url)?)),
        #[allow(unreachable_patterns)]
        _ => Err("this build has no support for the access log database's backend".into()),
    }
}

fn store_for<C>(env: &Env<C>, log: &LogDatabase) -> CliResult<Arc<dyn AccessLogStore>> {
    access_store(log.access_log_url.as_deref().unwrap_or(&env.url))
}

pub(super) fn run<C: DataConnection>(
    env: &Env<C>,
    cli: &super::Cli,
    command: &AuditCommand,
) -> CliResult {
    let actor = cli.actor.as_str();
    let tables = cli.tables.as_slice();
    match command {
        AuditCommand::Access {
            owner,
            user,
            row,
            since,
            until,
            chain,
            limit,
            log,
        } => {
            env.out.set("command", "audit access");
            let names: Vec<&String> = tables
                .iter()
                .filter(|t| !t.trim().is_empty() && !t.contains(':'))
                .collect();
            if names.len() > 1 {
                return Err("audit access takes one --table".into());
            }
            let table = names.first().map(|t| (*t).clone());
            let store = store_for(env, log)?;
            let filter = AccessFilter {
                owner: owner.clone(),
                user: user
                    .clone()
                    .or_else(|| cli.actor_given.then(|| cli.actor.clone())),
                table,
                row: row.clone(),
                since: *since,
                until: *until,
                chain: chain.clone(),
                limit: *limit,
                offset: 0,
            };
            let records = store.query(&filter)?;
            print_records(env, &records)?;
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify { chain, log } => {
            env.out.set("command", "audit verify");
            let store = store_for(env, log)?;
            let keyring = env.keyring(actor)?;
            let reports = match chain {
                Some(chain) => vec![access_log::verify_chain(
                    store.as_ref(),
                    &keyring,
                    chain,
                    &mut None,
                )?],
                None => access_log::verify(store.as_ref(), &keyring)?,
            };
            let mut broken = false;
            let mut chains = Vec::new();
            for r in &reports {
                broken |= !r.is_intact();
                let head = r.last_hash.as_deref().map(hex);
                match &r.broken {
                    None => outln!(
                        env,
                        "chain {:?}: intact, batches {} to {} ({} records); head {} {}",
                        r.chain,
                        r.first.map_or("-".into(), |b| b.to_string()),
                        r.last.map_or("-".into(), |b| b.to_string()),
                        r.records,
                        r.last.map_or("-".into(), |b| b.to_string()),
                        head.as_deref().unwrap_or("-")
                    ),
                    Some(b) => outln!(env, "BROKEN at batch {}: {}", b.batch, b.message),
                }
                chains.push(json!({
                    "chain": r.chain,
                    "intact": r.is_intact(),
                    "first": r.first,
                    "last": r.last,
                    "batches": r.batches,
                    "records": r.records,
                    "head_hash": head,
                    "broken": r.broken.as_ref().map(|b| json!({
                        "batch": b.batch,
                        "kind": b.kind.as_str(),
                        "message": b.message,
                    })),
                }));
            }
            if reports.is_empty() {
                outln!(env, "The access log is empty: nothing to verify.");
            }
            env.out.set("intact", !broken);
            env.out.set("chains", Value::Array(chains));
            Ok(if broken {
                ExitCode::from(EXIT_BROKEN)
            } else {
                ExitCode::SUCCESS
            })
        }
        AuditCommand::Prune { before, log } => {
            env.out.set("command", "audit prune");
            let store = store_for(env, log)?;
            let keyring = env.keyring(actor)?;
            let report = access_log::prune(store.as_ref(), &keyring, *before)?;
            // With the access log in another database, the key tables are
            // pruned there too (the checkpoint hashes nothing of them).
            outln!(
                env,
                "Pruned before {}: {} access record(s) in {} batch(es), {} key audit record(s), {} key event(s).",
                before.format("%Y-%m-%dT%H:%M:%S"),
                report.access_records,
                report.access_batches,
                report.key_audit_records,
                report.feed_events
            );
            for (chain, id) in &report.checkpoints {
                outln!(env, "chain {chain:?}: checkpoint batch {id}");
            }
            env.out
                .set("before", before.format("%Y-%m-%dT%H:%M:%S").to_string());
            env.out.set("access_records", report.access_records);
            env.out.set("access_batches", report.access_batches);
            env.out.set("key_audit_records", report.key_audit_records);
            env.out.set("feed_events", report.feed_events);
            env.out.set(
                "checkpoints",
                report
                    .checkpoints
                    .iter()
                    .map(|(chain, id)| json!({"chain": chain, "batch": id}))
                    .collect::<Vec<_>>(),
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn time(t: NaiveDateTime) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// A CSV cell: quoted when needed, and neutralised when a spreadsheet
/// would take it as a formula.
fn csv_cell(text: &str) -> String {
    let neutral = if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_owned()
    };
    if neutral.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", neutral.replace('"', "\"\""))
    } else {
        neutral
    }
}

const CSV_HEADER: &str =
    "occurred_at,user,purpose,request_id,op,owner,table,row,fields,chain,batch,seq";

fn csv_line(r: &StoredAccess) -> String {
    [
        time(r.occurred_at),
        r.user.clone(),
        r.purpose.clone(),
        r.request_id.clone().unwrap_or_default(),
        r.op.clone(),
        r.owner_id.clone(),
        r.table.clone(),
        r.row.clone().unwrap_or_default(),
        r.fields.clone(),
        r.chain.clone(),
        r.batch.to_string(),
        r.seq.to_string(),
    ]
    .iter()
    .map(|c| csv_cell(c))
    .collect::<Vec<_>>()
    .join(",")
}

fn print_records<C>(env: &Env<C>, records: &[StoredAccess]) -> CliResult<()> {
    match env.out.format {
        Format::Json => {
            env.out.printed.set(true);
            let array: Vec<Value> = records.iter().map(access_log::record_json).collect();
            println!("{}", serde_json::to_string_pretty(&array)?);
        }
        Format::Csv => {
            env.out.printed.set(true);
            println!("{CSV_HEADER}");
            for r in records {
                println!("{}", csv_line(r));
            }
        }
        Format::Text => {
            println!(
                "{:<27}  {:<16}  {:<12}  {:<6}  {:<20}  {:<12}  {:<12}  fields",
                "occurred at (UTC)", "user", "purpose", "op", "owner", "table", "row"
            );
            for r in records {
                let line = format!(
                    "{:<27}  {:<16}  {:<12}  {:<6}  {:<20}  {:<12}  {:<12}  {}",
                    time(r.occurred_at),
                    r.user,
                    r.purpose,
                    r.op,
                    r.owner_id,
                    r.table,
                    r.row.as_deref().unwrap_or("-"),
                    r.fields
                );
                println!("{}", line.trim_end());
            }
            if records.is_empty() {
                println!("(no access record matches)");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_that_a_spreadsheet_would_run_are_neutralised() {
        assert_eq!(csv_cell("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_cell("+1"), "'+1");
        assert_eq!(csv_cell("-2"), "'-2");
        assert_eq!(csv_cell("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_cell("dr-smith"), "dr-smith");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
    }

    #[test]
    fn times_parse_as_dates_or_utc_times() {
        assert_eq!(
            parse_time("2026-01-02").expect("date").to_string(),
            "2026-01-02 00:00:00"
        );
        assert_eq!(
            parse_time("2026-01-02T03:04:05Z")
                .expect("time")
                .to_string(),
            "2026-01-02 03:04:05"
        );
        assert!(parse_time("yesterday").is_err());
    }
}
