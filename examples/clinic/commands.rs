//! What each command does.

/// `println!` that returns an error (a closed pipe, say) instead of
/// panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)?
    }};
}
pub(crate) use outln;

use std::collections::HashSet;
use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use diesel::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use phi_types::{KeyEncryptionKey, KeyStore, Keyring, PhiRecord as _, Rollout};
use sha2::{Digest as _, Sha256};

use crate::db::{self, AnyConnection};
use crate::model::{
    CASE_PREFIX, Case, CaseSealed, DeletedCase, DeletedCaseSealed, LEGACY_PREFIX, MAX_CASE_NUMBER,
    case_id, first_run_cases, made_up_case,
};
use crate::schema::{cases, deleted_cases};
use crate::{CaseCommand, Cli, Command, Result, RolloutCommand};

/// Rows read per query by the commands that walk a whole table.
const PAGE: i64 = 1000;
/// Rows per multi-row `INSERT`.
const INSERT_ROWS: usize = 500;

/// An open clinic: the connection, the keyring (with the persisted
/// roll-out) and what it was built from.
pub(crate) struct Clinic {
    pub(crate) conn: AnyConnection,
    pub(crate) keyring: Keyring,
    store: Arc<dyn KeyStore>,
    kek: Arc<dyn KeyEncryptionKey>,
    older: Vec<Arc<dyn KeyEncryptionKey>>,
    /// The database, as output names it.
    pub(crate) name: String,
}

impl Clinic {
    /// Another keyring over the same keys, with another roll-out: for the
    /// writes whose sealing must not follow the persisted one.
    pub(crate) fn keyring_with(&self, rollout: Rollout) -> Result<Keyring> {
        db::keyring(&self.store, &self.kek, &self.older, rollout, false)
    }

    /// Persists `rollout` (phi's roll-out policy `clinic`, with a key
    /// event that every process following the feed applies) and applies it
    /// to this process's keyring.
    pub(crate) fn set_rollout(&mut self, rollout: Rollout) -> Result<()> {
        phi_types::lifecycle::set_rollout(&self.keyring, &rollout)?;
        Ok(())
    }
}

/// Opens the clinic and runs the command.
pub(crate) fn run(cli: Cli) -> Result<ExitCode> {
    let (backend, url, name) = db::parse_url(&cli.database_url)?;
    let (conn, store) = db::open(backend, &url)?;
    let (kek, older) = db::keks(cli.kek.clone(), store.as_ref())?;
    let persisted = db::load_rollout(store.as_ref())?;
    let keyring = db::keyring(&store, &kek, &older, persisted, true)?;
    let mut clinic = Clinic {
        conn,
        keyring,
        store,
        kek,
        older,
        name,
    };
    let Some(command) = cli.command else {
        return overview(&mut clinic);
    };
    match command {
        Command::Demo {
            owners,
            cases_per_owner,
        } => demo(&mut clinic, owners, cases_per_owner),
        Command::Case(command) => case(&mut clinic, command),
        Command::Export { owner, csv } => export(&mut clinic, &owner, &csv),
        Command::SeedLegacy { cases, owners } => seed_legacy(&mut clinic, cases, owners),
        Command::Rollout(command) => rollout(&mut clinic, command),
        Command::Digest => digest(&mut clinic),
        Command::Jobs(job) => crate::migration::run(&mut clinic, &job),
    }
}

/// A progress bar on stderr (drawn only on a terminal).
pub(crate) fn bar(len: u64, what: &str) -> ProgressBar {
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

/// The command-less run: seed on the first run, then show.
fn overview(clinic: &mut Clinic) -> Result<ExitCode> {
    let existing: i64 = cases::table.count().get_result(&mut clinic.conn)?;
    if existing == 0 {
        let seeded = first_run_cases();
        insert_cases(&mut clinic.conn, &Case::seal_all(&seeded, &clinic.keyring)?)?;
        outln!("Seeded {} cases into {}.", seeded.len(), clinic.name);
    } else {
        outln!("Reusing {} ({existing} cases).", clinic.name);
    }

    // One query, then one key-store query and one unwrap per provider
    // (however many rows), then every field opened.
    const SHOWN: i64 = 20;
    let shown = Case::load(
        cases::table.order(cases::case_id).limit(SHOWN),
        &mut clinic.conn,
        &clinic.keyring,
    )?;
    outln!();
    print_cases(&shown)?;
    let total: i64 = cases::table.count().get_result(&mut clinic.conn)?;
    if total > SHOWN {
        outln!("… and {} more (`case list --limit N`)", total - SHOWN);
    }

    let raw: Option<(String, Vec<u8>, bool)> = cases::table
        .order(cases::case_id)
        .select((cases::case_id, cases::patient_last, cases::phi_encrypted))
        .first(&mut clinic.conn)
        .optional()?;
    if let Some((id, raw, sealed)) = raw {
        outln!();
        outln!(
            "What the database holds for {id}'s patient_last ({} bytes):",
            raw.len()
        );
        outln!("  {}", hex(&raw));
        if sealed {
            outln!(
                "  F1 = magic, 01 = format v1, then the key version, nonce, ciphertext and tag."
            );
        } else {
            outln!("  Stored in plain text: a row from before the roll-out (flag off).");
        }
    }
    outln!();
    outln!("Keyring: {}", clinic.keyring.stats());
    Ok(ExitCode::SUCCESS)
}

/// Prints cases as a table.
fn print_cases(cases: &[Case]) -> Result<()> {
    outln!(
        "{:<9} {:<13} {:<22} {:<10} {:<16} {:<6} {:<10} {:<10} sealed",
        "case",
        "provider",
        "patient",
        "born",
        "insurer",
        "proc",
        "surgery",
        "status"
    );
    for case in cases {
        outln!(
            "{:<9} {:<13} {:<22} {:<10} {:<16} {:<6} {:<10} {:<10} {}",
            case.case_id,
            case.user_id,
            format!("{} {}", case.patient_first, case.patient_last),
            case.patient_dob,
            case.ins_provider.as_deref().unwrap_or("-"),
            case.procedure_code,
            case.surgery_date,
            case.status,
            if case.phi_encrypted { "yes" } else { "no" },
        );
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Inserts stored rows, many per statement, in one transaction. (Diesel's
/// multi-row `INSERT` is written per backend: through `AnyConnection` a
/// statement inserts one row.)
fn insert_cases(conn: &mut AnyConnection, rows: &[CaseSealed]) -> Result<()> {
    db::on_backend!(conn, c => c.transaction(|c| {
        for chunk in rows.chunks(INSERT_ROWS) {
            diesel::insert_into(cases::table).values(chunk).execute(c)?;
        }
        diesel::QueryResult::Ok(())
    }))?;
    Ok(())
}

/// `count` case numbers from the next free one, checked against the id
/// format.
fn case_numbers(conn: &mut AnyConnection, prefix: &str, count: u64) -> Result<(u64, u64)> {
    let first = db::next_case_number(conn, prefix)?;
    let last = first + count.saturating_sub(1);
    if last > MAX_CASE_NUMBER {
        return Err(format!(
            "case ids {prefix}{first:06}… would run past {prefix}{MAX_CASE_NUMBER}: \
             ask for at most {} case(s)",
            (MAX_CASE_NUMBER + 1).saturating_sub(first)
        )
        .into());
    }
    Ok((first, last))
}

/// Seals and stores made-up cases, `per_owner` for each of `owners`
/// providers, block by block: each block sealed first (so that a new
/// provider's data key is committed by the key store's own connection),
/// then inserted in one transaction.
fn demo(clinic: &mut Clinic, owners: u64, per_owner: u64) -> Result<ExitCode> {
    if owners == 0 || per_owner == 0 {
        return Err("--owners and --cases-per-owner must be at least 1".into());
    }
    let total = owners.saturating_mul(per_owner);
    let (first, last) = case_numbers(&mut clinic.conn, CASE_PREFIX, total)?;
    let started = Instant::now();
    let progress = bar(total, "sealing and storing");
    let mut sealed_rows = 0u64;
    let numbers: Vec<u64> = (first..=last).collect();
    for block in numbers.chunks(5_000) {
        let cases: Vec<Case> = block
            .iter()
            .map(|&n| {
                let owner = format!("provider-{:03}", (n - first) % owners + 1);
                made_up_case(n, case_id(CASE_PREFIX, n), owner)
            })
            .collect();
        let sealed = Case::seal_all(&cases, &clinic.keyring)?;
        sealed_rows += sealed.iter().filter(|r| r.phi_encrypted).count() as u64;
        insert_cases(&mut clinic.conn, &sealed)?;
        progress.inc(block.len() as u64);
    }
    progress.finish_and_clear();
    outln!(
        "Stored {total} case(s) of {owners} provider(s) (provider-001…), {} to {}, {sealed_rows} sealed, in {:.1} s.",
        case_id(CASE_PREFIX, first),
        case_id(CASE_PREFIX, last),
        started.elapsed().as_secs_f64()
    );
    outln!("Keyring: {}", clinic.keyring.stats());
    Ok(ExitCode::SUCCESS)
}

/// Writes `count` cases in plain text with the flag off, spread over
/// `owners` providers: what a database that predates phi holds once its
/// PHI columns are binary. On a database with no sealed row yet, the
/// roll-out is first set to nobody, as it would be before adoption.
fn seed_legacy(clinic: &mut Clinic, count: u64, owners: u64) -> Result<ExitCode> {
    if count == 0 || owners == 0 {
        return Err("--cases and --owners must be at least 1".into());
    }
    let sealed_live: i64 = cases::table
        .filter(cases::phi_encrypted.eq(true))
        .count()
        .get_result(&mut clinic.conn)?;
    let sealed_deleted: i64 = deleted_cases::table
        .filter(deleted_cases::phi_encrypted.eq(true))
        .count()
        .get_result(&mut clinic.conn)?;
    if sealed_live + sealed_deleted == 0 && clinic.keyring.rollout() != Rollout::Nobody {
        clinic.set_rollout(Rollout::Nobody)?;
        outln!("Roll-out set to nobody: a database from before phi seals nothing.");
    }
    let (first, last) = case_numbers(&mut clinic.conn, LEGACY_PREFIX, count)?;
    // Under a roll-out of nobody the model stores each value's plain
    // encoding (UTF-8 text, ISO dates) with the flag off: no key involved.
    let plain = clinic.keyring_with(Rollout::Nobody)?;
    let started = Instant::now();
    let progress = bar(count, "writing legacy rows");
    let numbers: Vec<u64> = (first..=last).collect();
    for block in numbers.chunks(10_000) {
        let cases: Vec<Case> = block
            .iter()
            .map(|&n| {
                let owner = format!("provider-{:03}", (n - first) % owners + 1);
                made_up_case(n, case_id(LEGACY_PREFIX, n), owner)
            })
            .collect();
        insert_cases(&mut clinic.conn, &Case::seal_all(&cases, &plain)?)?;
        progress.inc(block.len() as u64);
    }
    progress.finish_and_clear();
    outln!(
        "Wrote {count} legacy case(s) in plain text (flag off), {} to {}, for {owners} provider(s), in {:.1} s.",
        case_id(LEGACY_PREFIX, first),
        case_id(LEGACY_PREFIX, last),
        started.elapsed().as_secs_f64()
    );
    outln!(
        "Roll-out: {}.",
        db::describe_rollout(&clinic.keyring.rollout())
    );
    Ok(ExitCode::SUCCESS)
}

fn rollout(clinic: &mut Clinic, command: RolloutCommand) -> Result<ExitCode> {
    let current = clinic.keyring.rollout();
    let next = match command {
        RolloutCommand::Status => None,
        RolloutCommand::All => Some(Rollout::All),
        RolloutCommand::Enable { owner } => match current {
            Rollout::All => {
                outln!("Every provider's new rows are already sealed.");
                None
            }
            Rollout::Owners(mut owners) => {
                owners.insert(owner);
                Some(Rollout::Owners(owners))
            }
            _ => Some(Rollout::owners([owner])),
        },
        RolloutCommand::Disable { owner } => match current {
            Rollout::All => {
                // "Everyone but one" is an allow-list of today's providers.
                let mut owners = db::owners(&mut clinic.conn)?;
                owners.remove(&owner);
                outln!(
                    "The roll-out was every provider: it is now the {} other provider(s) with cases; \
                     providers added later are not sealed until enabled (or `rollout all`).",
                    owners.len()
                );
                Some(if owners.is_empty() {
                    Rollout::Nobody
                } else {
                    Rollout::Owners(owners)
                })
            }
            Rollout::Owners(mut owners) => {
                if !owners.remove(&owner) {
                    outln!("Provider {owner} was not in the roll-out.");
                }
                Some(if owners.is_empty() {
                    Rollout::Nobody
                } else {
                    Rollout::Owners(owners)
                })
            }
            _ => {
                outln!("No provider's new rows are sealed.");
                None
            }
        },
    };
    if let Some(next) = next {
        clinic.set_rollout(next)?;
    }
    outln!(
        "Roll-out: {}.",
        db::describe_rollout(&clinic.keyring.rollout())
    );
    Ok(ExitCode::SUCCESS)
}

fn case(clinic: &mut Clinic, command: CaseCommand) -> Result<ExitCode> {
    match command {
        CaseCommand::Create {
            owner,
            first,
            last,
            dob,
            insurer,
            procedure,
            surgery_date,
            status,
        } => {
            let duplicates = find_duplicates(clinic, &owner, &last, dob)?;
            let (number, _) = case_numbers(&mut clinic.conn, CASE_PREFIX, 1)?;
            let case = Case {
                case_id: case_id(CASE_PREFIX, number),
                user_id: owner,
                patient_first: first,
                patient_last: last,
                patient_dob: dob,
                ins_provider: insurer,
                procedure_code: procedure,
                surgery_date,
                status,
                phi_encrypted: true,
            };
            // Sealed before the write: the key store commits a new
            // provider's data key on its own connection.
            let sealed = case.seal(&clinic.keyring)?;
            let stored_sealed = sealed.phi_encrypted;
            diesel::insert_into(cases::table)
                .values(&sealed)
                .execute(&mut clinic.conn)?;
            if !duplicates.is_empty() {
                eprintln!(
                    "warning: the provider already has a case for this patient: {}",
                    duplicates.join(", ")
                );
            }
            if !stored_sealed {
                eprintln!(
                    "note: stored in plain text: the roll-out does not seal {}'s rows",
                    case.user_id
                );
            }
            outln!("{}", case.case_id);
            Ok(ExitCode::SUCCESS)
        }
        CaseCommand::Get { id } => {
            let row: Option<CaseSealed> = cases::table
                .find(&id)
                .select(CaseSealed::as_select())
                .first(&mut clinic.conn)
                .optional()?;
            if let Some(row) = row {
                let case =
                    Case::open(row, &clinic.keyring).map_err(|e| format!("case {id}: {e}"))?;
                print_case(&case, None)?;
                return Ok(ExitCode::SUCCESS);
            }
            let deleted: Option<DeletedCaseSealed> = deleted_cases::table
                .find(&id)
                .select(DeletedCaseSealed::as_select())
                .first(&mut clinic.conn)
                .optional()?;
            let Some(deleted) = deleted else {
                return Err(format!("no case {id}").into());
            };
            let d = DeletedCase::open(deleted, &clinic.keyring)
                .map_err(|e| format!("deleted case {id}: {e}"))?;
            let at = d.deleted_at;
            let case = d.into_case();
            print_case(&case, Some(at))?;
            Ok(ExitCode::SUCCESS)
        }
        CaseCommand::List { owner, limit } => {
            let mut query = cases::table
                .select(CaseSealed::as_select())
                .order(cases::case_id)
                .limit(limit)
                .into_boxed();
            if let Some(owner) = &owner {
                query = query.filter(cases::user_id.eq(owner));
            }
            let rows: Vec<CaseSealed> = query.load(&mut clinic.conn)?;
            let ids: Vec<String> = rows.iter().map(|r| r.case_id.clone()).collect();
            // Each row on its own: a damaged one is reported, the others shown.
            let mut shown = Vec::new();
            let mut failed = 0usize;
            for (id, result) in ids.iter().zip(Case::open_each(rows, &clinic.keyring)?) {
                match result {
                    Ok(case) => shown.push(case),
                    Err(error) => {
                        failed += 1;
                        eprintln!("error: case {id}: {error}");
                    }
                }
            }
            print_cases(&shown)?;
            if failed > 0 {
                eprintln!("{failed} of {} case(s) could not be opened.", ids.len());
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        CaseCommand::Update {
            id,
            first,
            last,
            dob,
            insurer,
            no_insurer,
            procedure,
            surgery_date,
            status,
        } => {
            let edit = |case: &mut Case| {
                if let Some(v) = &first {
                    case.patient_first.clone_from(v);
                }
                if let Some(v) = &last {
                    case.patient_last.clone_from(v);
                }
                if let Some(v) = dob {
                    case.patient_dob = v;
                }
                if insurer.is_some() || no_insurer {
                    case.ins_provider.clone_from(&insurer);
                }
                if let Some(v) = &procedure {
                    case.procedure_code.clone_from(v);
                }
                if let Some(v) = surgery_date {
                    case.surgery_date = v;
                }
                if let Some(v) = &status {
                    case.status.clone_from(v);
                }
            };
            // A backfill or rollback may seal or unseal the row between
            // the read and the write: the guarded update then writes
            // nothing, and the edit is made again on the row as it is now,
            // at most this many times.
            const UPDATE_RETRIES: u32 = 5;
            use phi_types::Updated;
            let mut retries = 0;
            loop {
                let old = load_case(clinic, &id)?;
                let mut new = old.clone();
                edit(&mut new);
                match new.update(&old, &clinic.keyring, &mut clinic.conn)? {
                    Updated::Applied { sealed } => {
                        let how = if sealed {
                            "sealed"
                        } else {
                            "stored in plain text: not in the roll-out"
                        };
                        if retries == 0 {
                            outln!("{id}: updated ({how}).");
                        } else {
                            outln!(
                                "{id}: updated ({how}) after {retries} retry(ies): the row was sealed or unsealed meanwhile."
                            );
                        }
                        return Ok(ExitCode::SUCCESS);
                    }
                    Updated::Unchanged => {
                        outln!("{id}: nothing changed.");
                        return Ok(ExitCode::SUCCESS);
                    }
                    Updated::NotFound => {
                        return Err(format!("case {id} was deleted meanwhile").into());
                    }
                    Updated::Conflict if retries < UPDATE_RETRIES => retries += 1,
                    Updated::Conflict => {
                        return Err(format!(
                            "case {id} was sealed or unsealed by another process {} times while it was being updated (is a backfill or decrypt-back running?); nothing was written, try again",
                            retries + 1
                        )
                        .into());
                    }
                }
            }
        }
        CaseCommand::Delete { id } => {
            let case = load_case(clinic, &id)?;
            let owner = case.user_id.clone();
            // A sealed case stays sealed in deleted_cases, whatever the
            // roll-out says now.
            let keyring = if case.phi_encrypted && !clinic.keyring.encrypts_for(&owner) {
                clinic.keyring_with(Rollout::All)?
            } else {
                clinic.keyring.clone()
            };
            // Microseconds: what every backend's timestamp keeps.
            let now = chrono::SubsecRound::trunc_subsecs(chrono::Utc::now().naive_utc(), 6);
            let deleted = DeletedCase::from_case(case, now);
            // Sealed for deleted_cases before the transaction opens.
            let sealed = deleted.seal(&keyring)?;
            let stored_sealed = sealed.phi_encrypted;
            clinic
                .conn
                .transaction(|conn| {
                    diesel::insert_into(deleted_cases::table)
                        .values(&sealed)
                        .execute(conn)?;
                    let removed = diesel::delete(cases::table.find(&id)).execute(conn)?;
                    if removed == 1 {
                        Ok(())
                    } else {
                        Err(diesel::result::Error::RollbackTransaction)
                    }
                })
                .map_err(|e| match e {
                    diesel::result::Error::RollbackTransaction => {
                        format!("case {id} was deleted meanwhile").into()
                    }
                    other => crate::Error::from(other),
                })?;
            outln!(
                "{id}: moved to deleted_cases, {} provider {owner}.",
                if stored_sealed {
                    "sealed under"
                } else {
                    "in plain text (not in the roll-out) for"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        CaseCommand::Find {
            owner,
            last,
            dob,
            last_prefix,
            dob_year,
            surgery_from,
            surgery_to,
        } => {
            let search = (&last_prefix, dob_year, surgery_from, surgery_to);
            let found = match (&last, dob, search) {
                (Some(last), Some(dob), (None, None, None, None)) => {
                    let found = find_duplicates(clinic, &owner, last, dob)?;
                    if found.is_empty() {
                        outln!("no duplicate");
                    }
                    found
                }
                _ => {
                    let search = Search {
                        last: last.as_deref(),
                        dob,
                        last_prefix: last_prefix.as_deref(),
                        dob_year,
                        surgery_from,
                        surgery_to,
                    };
                    let found = search_cases(clinic, &owner, &search)?;
                    if found.is_empty() {
                        outln!("no case");
                    }
                    found
                }
            };
            for id in found {
                outln!("{id}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Loads and opens one case.
fn load_case(clinic: &mut Clinic, id: &str) -> Result<Case> {
    let row: Option<CaseSealed> = cases::table
        .find(id)
        .select(CaseSealed::as_select())
        .first(&mut clinic.conn)
        .optional()?;
    let row = row.ok_or_else(|| format!("no case {id}"))?;
    Ok(Case::open(row, &clinic.keyring).map_err(|e| format!("case {id}: {e}"))?)
}

fn print_case(case: &Case, deleted_at: Option<chrono::NaiveDateTime>) -> Result<()> {
    let sealed = if case.phi_encrypted {
        "yes"
    } else {
        "no (stored in plain text, flag off)"
    };
    let mut fields: Vec<(&str, String)> = vec![
        ("case", case.case_id.clone()),
        ("provider", case.user_id.clone()),
        ("patient_first", case.patient_first.clone()),
        ("patient_last", case.patient_last.clone()),
        ("patient_dob", case.patient_dob.to_string()),
        (
            "ins_provider",
            case.ins_provider.clone().unwrap_or_else(|| "-".into()),
        ),
        ("procedure_code", case.procedure_code.clone()),
        ("surgery_date", case.surgery_date.to_string()),
        ("status", case.status.clone()),
        ("sealed", sealed.to_owned()),
    ];
    if let Some(at) = deleted_at {
        fields.push(("deleted_at", at.format("%Y-%m-%d %H:%M:%S UTC").to_string()));
    }
    for (name, value) in fields {
        outln!("{name:<15} {value}");
    }
    Ok(())
}

/// What `case find` searches a provider's cases for, each condition
/// optional.
struct Search<'a> {
    last: Option<&'a str>,
    dob: Option<NaiveDate>,
    last_prefix: Option<&'a str>,
    dob_year: Option<i32>,
    surgery_from: Option<NaiveDate>,
    surgery_to: Option<NaiveDate>,
}

impl Search<'_> {
    /// Whether an opened case meets the conditions on encrypted fields.
    fn matches(&self, case: &Case) -> bool {
        let last = case.patient_last.trim().to_lowercase();
        self.last
            .is_none_or(|wanted| last == wanted.trim().to_lowercase())
            && self
                .last_prefix
                .is_none_or(|prefix| last.starts_with(&prefix.trim_start().to_lowercase()))
            && self.dob.is_none_or(|dob| case.patient_dob == dob)
            && self
                .dob_year
                .is_none_or(|year| chrono::Datelike::year(&case.patient_dob) == year)
    }
}

/// The provider's cases that meet `search`, ordered by patient name then
/// case id: the surgery-date range in SQL (a plaintext column), the
/// conditions on encrypted fields tested as the provider's rows are
/// opened (`load_where`). A surname prefix of two characters or more and a
/// year of birth narrow the sealed rows first by their derived indexes
/// (the tags of the prefix's first two characters, of the year); rows
/// without tags (stored before the roll-out, or sealed before the indexes
/// were added and not re-indexed yet) are all tested.
fn search_cases(clinic: &mut Clinic, owner: &str, search: &Search<'_>) -> Result<Vec<String>> {
    let mut query = cases::table.filter(cases::user_id.eq(owner)).into_boxed();
    // Rows stored before the roll-out have no tags, nor rows sealed before
    // the indexes were added (until `reindex`): they are tested all.
    if let Some(prefix) = search.last_prefix.map(str::trim_start)
        && prefix.trim().chars().count() >= 2
    {
        let tags = Case::last_prefix_tags(&clinic.keyring, owner, prefix)?;
        query = query.filter(
            cases::last_prefix
                .eq_any(tags)
                .or(cases::last_prefix.is_null().nullable()),
        );
    }
    if let Some(year) = search.dob_year {
        let tags = Case::dob_year_tags(&clinic.keyring, owner, year)?;
        query = query.filter(
            cases::dob_year
                .eq_any(tags)
                .or(cases::dob_year.is_null().nullable()),
        );
    }
    if let Some(from) = search.surgery_from {
        query = query.filter(cases::surgery_date.ge(from));
    }
    if let Some(to) = search.surgery_to {
        query = query.filter(cases::surgery_date.le(to));
    }
    let mut found = Case::load_where(query, &mut clinic.conn, &clinic.keyring, |case| {
        search.matches(case)
    })?;
    found.sort_by(|a, b| {
        (a.patient_last.to_lowercase(), &a.patient_first, &a.case_id).cmp(&(
            b.patient_last.to_lowercase(),
            &b.patient_first,
            &b.case_id,
        ))
    });
    Ok(found.into_iter().map(|c| c.case_id.clone()).collect())
}

/// The provider's cases for this patient: sealed rows through the blind
/// indexes (one indexed query, however many cases the provider has), then
/// the provider's rows stored before the roll-out, which have no index,
/// compared one by one.
fn find_duplicates(
    clinic: &mut Clinic,
    owner: &str,
    last: &str,
    dob: NaiveDate,
) -> Result<Vec<String>> {
    let last_index = Case::patient_last_blind_index(&clinic.keyring, owner, last)?;
    let dob_index = Case::patient_dob_blind_index(&clinic.keyring, owner, &dob)?;
    let wanted = last.trim().to_lowercase();
    let same =
        |case: &Case| case.patient_last.trim().to_lowercase() == wanted && case.patient_dob == dob;
    let mut found = HashSet::new();
    if !last_index.is_empty() && !dob_index.is_empty() {
        let indexed = Case::load(
            cases::table
                .filter(cases::user_id.eq(owner))
                .filter(cases::patient_last_bidx.eq_any(last_index))
                .filter(cases::patient_dob_bidx.eq_any(dob_index)),
            &mut clinic.conn,
            &clinic.keyring,
        )?;
        // A 16-byte index could in principle collide: confirm on the values.
        found.extend(indexed.into_iter().filter(same).map(|c| c.case_id));
    }
    let unsealed = Case::load(
        cases::table
            .filter(cases::user_id.eq(owner))
            .filter(cases::phi_encrypted.eq(false)),
        &mut clinic.conn,
        &clinic.keyring,
    )?;
    found.extend(unsealed.into_iter().filter(same).map(|c| c.case_id));
    let mut found: Vec<String> = found.into_iter().collect();
    found.sort();
    Ok(found)
}

/// Streams one provider's cases, decrypted, to a CSV file (mode 0600),
/// a page at a time; the file appears under its name only when complete.
fn export(clinic: &mut Clinic, owner: &str, path: &Path) -> Result<ExitCode> {
    let total: i64 = cases::table
        .filter(cases::user_id.eq(owner))
        .count()
        .get_result(&mut clinic.conn)?;
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(format!(
            "{} already exists: refusing to replace it with decrypted data; choose another name",
            path.display()
        )
        .into());
    }
    let partial = path.with_extension("csv.partial");
    let file = create_private(&partial)?;
    let mut out = std::io::BufWriter::new(file);
    let progress = bar(u64::try_from(total).unwrap_or(0), "exporting");
    let result = (|| -> Result<u64> {
        writeln!(
            out,
            "case_id,provider,patient_first,patient_last,patient_dob,ins_provider,procedure_code,surgery_date,status"
        )?;
        let mut after = String::new();
        let mut written = 0u64;
        loop {
            let page = Case::load(
                cases::table
                    .filter(cases::user_id.eq(owner))
                    .filter(cases::case_id.gt(&after))
                    .order(cases::case_id)
                    .limit(PAGE),
                &mut clinic.conn,
                &clinic.keyring,
            )?;
            let Some(last) = page.last() else { break };
            after = last.case_id.clone();
            for c in &page {
                let fields = [
                    c.case_id.clone(),
                    c.user_id.clone(),
                    c.patient_first.clone(),
                    c.patient_last.clone(),
                    c.patient_dob.to_string(),
                    c.ins_provider.clone().unwrap_or_default(),
                    c.procedure_code.clone(),
                    c.surgery_date.to_string(),
                    c.status.clone(),
                ];
                let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
                writeln!(out, "{}", line.join(","))?;
            }
            written += page.len() as u64;
            progress.inc(page.len() as u64);
        }
        out.flush()?;
        Ok(written)
    })();
    progress.finish_and_clear();
    match result {
        Ok(written) => {
            // Published without replacing anything: a hard link fails when
            // the name exists (created meanwhile). The partial file goes
            // either way, so no decrypted copy is left behind.
            let published = std::fs::hard_link(&partial, path);
            let _ = std::fs::remove_file(&partial);
            published.map_err(|e| format!("cannot publish {}: {e}", path.display()))?;
            outln!(
                "Exported {written} case(s) of provider {owner} to {} (decrypted: keep it safe).",
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            Err(error)
        }
    }
}

/// One CSV field: quoted when it holds a comma, a quote or a line break,
/// with quotes doubled.
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
}

/// Creates `path` for decrypted data: a new file only (never an existing
/// file, which would keep its own mode, nor through a symlink: `O_EXCL`
/// fails on both), mode 0600 on Unix.
fn create_private(path: &Path) -> Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            format!(
                "{} already exists (a file or a symlink): refusing to write decrypted data \
                 through it; remove it (an interrupted export leaves one) and export again",
                path.display()
            )
            .into()
        } else {
            format!("cannot create {}: {e}", path.display()).into()
        }
    })
}

/// Appends one field to the digest: `0` for none, else `1`, the length as
/// eight big-endian bytes, and the bytes.
fn digest_field(hash: &mut Sha256, value: Option<&[u8]>) {
    match value {
        None => hash.update([0u8]),
        Some(bytes) => {
            hash.update([1u8]);
            hash.update((bytes.len() as u64).to_be_bytes());
            hash.update(bytes);
        }
    }
}

/// One case's fields into the digest: each length-prefixed, `None` apart
/// from empty.
fn digest_case(hash: &mut Sha256, c: &Case) {
    hash.update([b'R']);
    digest_field(hash, Some(c.case_id.as_bytes()));
    digest_field(hash, Some(c.user_id.as_bytes()));
    digest_field(hash, Some(c.patient_first.as_bytes()));
    digest_field(hash, Some(c.patient_last.as_bytes()));
    digest_field(hash, Some(c.patient_dob.to_string().as_bytes()));
    digest_field(hash, c.ins_provider.as_deref().map(str::as_bytes));
    digest_field(hash, Some(c.procedure_code.as_bytes()));
    digest_field(hash, Some(c.surgery_date.to_string().as_bytes()));
    digest_field(hash, Some(c.status.as_bytes()));
}

/// A SHA-256 over every case's decrypted fields: `cases` then
/// `deleted_cases`, each in case id order, each row every field but the
/// encrypted flag (which a migration changes). Read a page at a time.
fn digest(clinic: &mut Clinic) -> Result<ExitCode> {
    let mut hash = Sha256::new();
    let mut live = 0u64;
    let mut deleted = 0u64;
    let total: i64 = cases::table.count().get_result(&mut clinic.conn)?;
    let total_deleted: i64 = deleted_cases::table.count().get_result(&mut clinic.conn)?;
    let progress = bar(
        u64::try_from(total + total_deleted).unwrap_or(0),
        "digesting",
    );

    hash.update([b'T']);
    digest_field(&mut hash, Some(b"cases"));
    let mut after = String::new();
    loop {
        let page = Case::load(
            cases::table
                .filter(cases::case_id.gt(&after))
                .order(cases::case_id)
                .limit(PAGE),
            &mut clinic.conn,
            &clinic.keyring,
        )?;
        let Some(last) = page.last() else { break };
        after = last.case_id.clone();
        for c in &page {
            digest_case(&mut hash, c);
        }
        live += page.len() as u64;
        progress.inc(page.len() as u64);
    }

    hash.update([b'T']);
    digest_field(&mut hash, Some(b"deleted_cases"));
    let mut after = String::new();
    loop {
        let page = DeletedCase::load(
            deleted_cases::table
                .filter(deleted_cases::case_id.gt(&after))
                .order(deleted_cases::case_id)
                .limit(PAGE),
            &mut clinic.conn,
            &clinic.keyring,
        )?;
        let Some(last) = page.last() else { break };
        after = last.case_id.clone();
        let rows = page.len() as u64;
        for d in page {
            let at = d.deleted_at;
            digest_case(&mut hash, &d.into_case());
            digest_field(&mut hash, Some(at.to_string().as_bytes()));
        }
        deleted += rows;
        progress.inc(rows);
    }
    progress.finish_and_clear();
    let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    outln!("digest: {hex} ({live} cases, {deleted} deleted cases)");
    Ok(ExitCode::SUCCESS)
}
