//! `keys rotate`: one owner (`--owner`), or many at once as a job shared
//! by several workers (`--all`, `--due`, `--owners-query`), with a plan
//! under `--dry-run`, progress with an ETA and `--format json`.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;

use super::{Cli, CliResult, EXIT_NOT_VERIFIED, Env, bar};
use crate::lifecycle::{
    self, DataConnection, RotateAllOptions, RotateAllReport, RotateOwners, RotateStage,
};
use crate::lookup::{self, ReindexOptions};

/// Environment variable naming a file: a worker of a rotation job writes
/// it once it has claimed its first batch, then waits until `<file>.go`
/// exists (for tests that stop a worker at that point).
const PAUSE_AFTER_CLAIM_ENV: &str = "PHI_TEST_PAUSE_AFTER_CLAIM";

/// `keys rotate`'s arguments.
#[derive(Debug, clap::Args)]
#[command(group(
    clap::ArgGroup::new("which")
        .required(true)
        .args(["owner", "all", "due", "owners_query"])
))]
pub(super) struct RotateArgs {
    /// One owner: adds its next data key version (re-seal and retire are
    /// then `keys reseal` and `keys retire`).
    #[arg(long)]
    owner: Option<String>,
    /// Every owner with a data key: new versions, every value of the
    /// --table columns re-sealed (their blind indexes rewritten with
    /// them), a sample verified, the old versions retired. Then, when the
    /// registered models have lookup indexes, the lookup key is rotated,
    /// every lookup value rewritten under it and its old versions retired
    /// (unless --keep-lookup-key).
    #[arg(long)]
    all: bool,
    /// With --all: leave the lookup key and the lookup indexes as they are.
    #[arg(long, requires = "all")]
    keep_lookup_key: bool,
    /// The owners due under the rotation policy, as --all does.
    #[arg(long)]
    due: bool,
    /// The owners this SQL returns (first column; run read-only), as
    /// --all does.
    #[arg(long)]
    owners_query: Option<String>,
    /// The job's id: every worker of one rotation passes the same, and a
    /// rerun with it skips the owners done (default
    /// `rotate-<all|due|query>-<UTC date>`).
    #[arg(long)]
    job: Option<String>,
    /// This worker's name in the claims (default host:pid).
    #[arg(long)]
    worker: Option<String>,
    /// Owners claimed at once.
    #[arg(long, default_value_t = 100)]
    owners_per_claim: usize,
    /// Seconds a claim lasts: a worker that dies leaves its owners to the
    /// others once it expires.
    #[arg(long, default_value_t = 900)]
    claim_ttl: u64,
    /// Rows per re-seal transaction.
    #[arg(long, default_value_t = lifecycle::DEFAULT_BATCH_SIZE)]
    batch_size: usize,
    /// Values opened per table and claim to verify the re-seal.
    #[arg(long, default_value_t = 20)]
    sample: usize,
    /// Only print the plan (owners, rows, values, KMS calls, a time
    /// estimate from a measured sample); nothing is changed.
    #[arg(long)]
    dry_run: bool,
}

/// Runs `keys rotate`.
pub(super) fn rotate<C>(cli: &Cli, env: &Env<C>, args: &RotateArgs) -> CliResult
where
    C: DataConnection,
{
    if let Some(owner) = &args.owner {
        return rotate_one(cli, env, owner);
    }
    let (owners, kind) = if args.all {
        (RotateOwners::All, "all")
    } else if args.due {
        (RotateOwners::Due, "due")
    } else if let Some(query) = &args.owners_query {
        (RotateOwners::Query(query.clone()), "query")
    } else {
        return Err("keys rotate: pass --owner, --all, --due or --owners-query".into());
    };
    let job = args.job.clone().unwrap_or_else(|| {
        format!(
            "rotate-{kind}-{}",
            chrono::Utc::now().date_naive().format("%Y-%m-%d")
        )
    });
    lifecycle::check_job_id(&job)?;
    env.out.set("job", job.as_str());
    env.out.set("owners_set", kind);
    env.out.set("dry_run", args.dry_run);
    if env.tables.is_empty() {
        outln!(
            env,
            "Note: no --table given: new versions are created and the old ones stay active (nothing to re-seal or count)."
        );
    }
    let keyring = env.keyring(&cli.actor)?;
    let mut conn = env.data()?;
    if args.dry_run {
        let plan =
            lifecycle::rotate_all_plan(&mut conn, &keyring, &owners, &env.tables, Some(&job), 200)?;
        outln!(
            env,
            "Plan of job {job}: {} owner(s), {} to rotate ({} done already by this job), {} row(s), \
             {} value(s) to re-seal, {} version(s) to retire, {} KMS call(s).",
            plan.owners,
            plan.to_rotate,
            plan.done,
            plan.rows,
            plan.values,
            plan.to_retire,
            plan.kms_calls
        );
        outln!(
            env,
            "Estimate for one worker: {:.1} s (from {} sampled row(s) read, opened and sealed in memory, \
             and their owners' keys unwrapped; writes counted as twice that). Nothing was changed.",
            plan.estimate_seconds,
            plan.sample_rows
        );
        if args.all && !args.keep_lookup_key && !env.lookup.is_empty() {
            let names: Vec<&str> = env.lookup.iter().map(|t| t.table()).collect();
            outln!(
                env,
                "Then the lookup key would be rotated, the lookup values of {} rewritten under it, and its old versions retired.",
                names.join(", ")
            );
        }
        env.out.set(
            "plan",
            json!({
                "owners": plan.owners,
                "to_rotate": plan.to_rotate,
                "done": plan.done,
                "rows": plan.rows,
                "values": plan.values,
                "to_retire": plan.to_retire,
                "kms_calls": plan.kms_calls,
                "sample_rows": plan.sample_rows,
                "estimate_seconds": plan.estimate_seconds,
            }),
        );
        return Ok(ExitCode::SUCCESS);
    }
    let progress = bar(0, "rotating", env.progress);
    let mut options = RotateAllOptions::new(job.as_str())
        .owners_per_claim(args.owners_per_claim)
        .claim_ttl(Duration::from_secs(args.claim_ttl))
        .batch_size(args.batch_size)
        .sample(args.sample)
        .progress(|r: &RotateAllReport| {
            progress.set_length(r.owners);
            progress.set_position(r.done_before + r.done);
        });
    if let Some(worker) = &args.worker {
        options = options.worker(worker.as_str());
    }
    let pause = std::env::var_os(PAUSE_AFTER_CLAIM_ENV).map(std::path::PathBuf::from);
    let mut paused = false;
    let report = lifecycle::rotate_all_interleaved(
        &mut conn,
        &keyring,
        &owners,
        &env.tables,
        &options,
        &mut |stage, _owners| {
            if let (RotateStage::Claimed, Some(file), false) = (stage, &pause, paused) {
                paused = true;
                pause_at(file);
            }
            Ok(())
        },
    )?;
    progress.finish_and_clear();
    outln!(
        env,
        "Job {job} (worker {}): {} owner(s) in the job, {} done before; this worker claimed {}, \
         created {} data key version(s), re-sealed {} value(s) in {} row(s), opened {} to verify, \
         retired {} version(s), finished {} owner(s) ({} skipped: shredded or without a key).",
        options.worker,
        report.owners,
        report.done_before,
        report.claimed,
        report.rotated,
        report.resealed,
        report.rows,
        report.sampled,
        report.retired,
        report.done,
        report.skipped
    );
    if report.claimed_by_others > 0 {
        outln!(
            env,
            "{} owner(s) are claimed by other workers (run this again with --job {job} once their claims expire, \
             should a worker have died).",
            report.claimed_by_others
        );
    }
    if report.pending > 0 {
        outln!(
            env,
            "{} owner(s) are still pending: values were written under their old versions meanwhile \
             (processes whose key cache predates the rotation); run this again with --job {job}.",
            report.pending
        );
    }
    env.out.set("worker", options.worker.as_str());
    env.out.set("owners", report.owners);
    env.out.set("added", report.added);
    env.out.set("done_before", report.done_before);
    env.out.set("claimed", report.claimed);
    env.out.set("rotated", report.rotated);
    env.out.set("resealed", report.resealed);
    env.out.set("rows", report.rows);
    env.out.set("conflicts", report.conflicts);
    env.out.set("sampled", report.sampled);
    env.out.set("retired", report.retired);
    env.out.set("done", report.done);
    env.out.set("skipped", report.skipped);
    env.out.set("pending", report.pending);
    env.out.set("claimed_by_others", report.claimed_by_others);
    let mut lookup_pending = false;
    if args.all && !args.keep_lookup_key && !env.lookup.is_empty() {
        // Every owner is rotated: so is the key of the indexes across them.
        let rotation =
            lookup::rotate(&mut conn, &keyring, &env.lookup, &ReindexOptions::default())?;
        outln!(env, "Lookup indexes: {rotation}.");
        env.out.set("lookup_version", rotation.version);
        env.out.set(
            "lookup_rewritten",
            rotation.reindexed.iter().map(|r| r.rewritten).sum::<u64>(),
        );
        env.out.set("lookup_retired", rotation.retired.clone());
        env.out.set(
            "lookup_pending",
            rotation
                .pending
                .iter()
                .map(|&(version, values)| serde_json::json!({ "version": version, "values": values }))
                .collect::<Vec<_>>(),
        );
        lookup_pending = !rotation.finished();
    }
    if report.pending > 0 || lookup_pending {
        return Ok(ExitCode::from(EXIT_NOT_VERIFIED));
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `file` and waits until `<file>.go` exists.
fn pause_at(file: &std::path::Path) {
    let go = file.with_extension("go");
    if std::fs::write(file, std::process::id().to_string()).is_err() {
        return;
    }
    while !go.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `keys rotate --owner X`: adds the owner's next version.
fn rotate_one<C>(cli: &Cli, env: &Env<C>, owner: &str) -> CliResult
where
    C: DataConnection,
{
    let keyring = env.keyring(&cli.actor)?;
    let version = lifecycle::rotate(&keyring, owner)?;
    env.out.set("owner", owner);
    env.out.set("version", version);
    outln!(
        env,
        "Owner {owner}: added data key version {version}; new values are sealed under it \
         (processes following the key-event feed within {:.1} s).",
        cli.feed_interval
    );
    if !env.tables.is_empty() {
        let mut conn = env.data()?;
        let old: u64 = lifecycle::usage(&mut conn, owner, &env.tables)?
            .iter()
            .filter(|u| u.key_version < version)
            .map(|u| u.values)
            .sum();
        env.out.set("values_under_older_versions", old);
        outln!(
            env,
            "{old} stored value(s) are under older versions: run `phi keys reseal --owner {owner}`."
        );
    }
    Ok(ExitCode::SUCCESS)
}
