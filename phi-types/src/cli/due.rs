//! `keys due`, and the rotation policy options every command's keyring
//! takes (`--max-key-age`, `--max-seals-per-key`).

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};

use super::{CliResult, Env};
use crate::lifecycle::{self, DataConnection, DueReport};
use crate::{DEFAULT_MAX_SEALS_PER_KEY, Keyring, NONCE_BUDGET, RotationPolicy};

/// The rotation policy of the keyring a command uses (what `keys due`
/// lists and `keys rotate --due` rotates).
#[derive(Clone, Debug, Default, Args)]
pub(super) struct PolicyArgs {
    /// A current data key older than this is due for rotation: a number and
    /// a unit, `s`, `m`, `h`, `d` or `w` (`90d`, `12w`, `36h`). Default: no
    /// age limit (the application's keyring's, with its own command line).
    #[arg(long, env = "PHI_MAX_KEY_AGE", value_parser = parse_age, global = true)]
    max_key_age: Option<Duration>,

    /// A current data key with at least this many values sealed under it
    /// (as counted in phi_seal_counts) is due for rotation; at most
    /// 4294967296, envelope v1's random-nonce budget per key (2^32).
    /// Default: 1073741824 (2^30, a quarter of the budget; the
    /// application's keyring's, with its own command line).
    #[arg(long, env = "PHI_MAX_SEALS_PER_KEY", global = true)]
    max_seals_per_key: Option<u64>,
}

impl PolicyArgs {
    /// Applies the options given to `keyring`'s policy; the others stay.
    pub(super) fn apply(&self, keyring: &Keyring) -> CliResult<()> {
        if self.max_key_age.is_none() && self.max_seals_per_key.is_none() {
            return Ok(());
        }
        let mut policy = keyring.rotation_policy();
        if let Some(age) = self.max_key_age {
            policy.max_key_age = Some(age);
        }
        if let Some(seals) = self.max_seals_per_key {
            policy.max_seals_per_key = Some(seals);
        }
        policy.check().map_err(|e| {
            format!(
                "--max-key-age / --max-seals-per-key (PHI_MAX_KEY_AGE / PHI_MAX_SEALS_PER_KEY): {e}"
            )
        })?;
        keyring.set_rotation_policy(policy)?;
        Ok(())
    }
}

/// `90d` → 90 days: a positive whole number and one unit.
fn parse_age(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let expected = "expected a whole number and a unit s, m, h, d or w, e.g. 90d";
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a key age: {expected}"))?;
    let unit_secs = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        "" => return Err(format!("{text:?} has no unit: {expected}")),
        other => return Err(format!("{other:?} is not a unit of key age: {expected}")),
    };
    if n == 0 {
        return Err(format!("{text:?}: a key age must be positive"));
    }
    n.checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long a key age"))
}

/// `120d 3h`, `5h 2m`, `42s`: an age to the two largest units.
pub(super) fn human_age(age: Duration) -> String {
    let s = age.as_secs();
    let (d, h, m) = (s / 86_400, s % 86_400 / 3_600, s % 3_600 / 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, m) => format!("{m}m {}s", s % 60),
        (0, h, m) => format!("{h}h {m}m"),
        (d, 0, _) => format!("{d}d"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

fn policy_json(policy: &RotationPolicy) -> Value {
    json!({
        "max_key_age_seconds": policy.max_key_age.map(|a| a.as_secs()),
        "max_seals_per_key": policy.max_seals_per_key,
        "nonce_budget": NONCE_BUDGET,
    })
}

fn describe_policy(policy: &RotationPolicy) -> String {
    let age = policy
        .max_key_age
        .map_or_else(|| "none".to_owned(), human_age);
    let seals = policy.max_seals_per_key.map_or_else(
        || "none".to_owned(),
        |n| {
            if n == DEFAULT_MAX_SEALS_PER_KEY {
                format!("{n} (2^30, the default)")
            } else {
                n.to_string()
            }
        },
    );
    format!(
        "max key age {age}, max seals per key {seals}; envelope v1's nonce budget is {NONCE_BUDGET} seals per key"
    )
}

/// `keys due`: every owner whose current data key is due, with its age,
/// seal count and reason.
pub(super) fn run<C: DataConnection>(env: &Env<C>, actor: &str) -> CliResult {
    let keyring = env.keyring(actor)?;
    let report = lifecycle::due_keys(&keyring)?;
    env.out.set("policy", policy_json(&report.policy));
    env.out.set(
        "checked_at",
        report.checked_at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
    );
    env.out.set("owners", report.owners);
    env.out.set(
        "oldest_key_age_seconds",
        report.oldest_key_age.map(|a| a.as_secs()),
    );
    env.out.set("highest_seals", report.highest_seals);
    env.out
        .set("due", report.due.iter().map(due_json).collect::<Vec<_>>());
    if env.out.text() {
        print_text(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn due_json(d: &lifecycle::DueKey) -> Value {
    json!({
        "owner": d.owner_id,
        "version": d.version,
        "created_at": d.created_at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        "age_seconds": d.age.as_secs(),
        "seals": d.seals,
        "reasons": d.reasons.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
    })
}

fn print_text(report: &DueReport) {
    println!("Rotation policy: {}", describe_policy(&report.policy));
    let oldest = report
        .oldest_key_age
        .map_or_else(|| "none".to_owned(), human_age);
    println!(
        "{} of {} owners' current data keys are due (oldest key {oldest}, highest seal count {}).",
        report.due.len(),
        report.owners,
        report.highest_seals
    );
    if report.due.is_empty() {
        return;
    }
    let width = report
        .due
        .iter()
        .map(|d| d.owner_id.chars().count())
        .max()
        .unwrap_or(0)
        .max("OWNER".len());
    println!(
        "{:<width$}  {:>7}  {:<19}  {:>9}  {:>12}  REASON",
        "OWNER", "VERSION", "CREATED (UTC)", "AGE", "SEALS"
    );
    for d in &report.due {
        let reasons: Vec<&str> = d.reasons.iter().map(|r| r.as_str()).collect();
        println!(
            "{:<width$}  {:>7}  {:<19}  {:>9}  {:>12}  {}",
            d.owner_id,
            d.version,
            d.created_at.format("%Y-%m-%d %H:%M:%S"),
            human_age(d.age),
            d.seals,
            reasons.join(", ")
        );
    }
    println!(
        "Rotate them with `keys rotate --due` (or `keys rotate --owner ID`, then `keys reseal`)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ages_parse_with_a_unit_and_bad_ones_say_why() {
        assert_eq!(parse_age("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_age("12w"), Ok(Duration::from_secs(84 * 86_400)));
        assert_eq!(parse_age("36h"), Ok(Duration::from_secs(36 * 3_600)));
        assert!(parse_age("90").expect_err("no unit").contains("no unit"));
        assert!(parse_age("90y").expect_err("unit").contains("\"y\""));
        assert!(parse_age("0d").expect_err("zero").contains("positive"));
        assert!(parse_age("d").is_err());
        assert!(parse_age("99999999999999999999d").is_err());
        assert_eq!(
            human_age(Duration::from_secs(120 * 86_400 + 3 * 3_600 + 5)),
            "120d 3h"
        );
        assert_eq!(human_age(Duration::from_secs(42)), "42s");
    }
}
