//! Rotation jobs shared by several workers through the key store
//! (`phi_rotation_claims`): what [`KeyStore`](super::KeyStore)'s rotation
//! methods take and return.
//!
//! A job is a name (`rotate-2026-12-07`, say) and a set of owners, each
//! `pending` until one worker has rotated it, re-sealed its values,
//! verified a sample and retired its older versions, then `done`. A worker
//! claims pending owners for a while (a lease, `claimed_until`); a claim
//! whose worker died expires and any worker takes it again. The data key
//! version a worker creates for a claimed owner is recorded in the same
//! transaction as the key row (`new_version`), so the worker that takes
//! the owner over uses it instead of creating another.

use chrono::NaiveDateTime;

use super::{AuditEvent, StoredKey};
use crate::error::{Error, Result};
use crate::feed::KeyEvent;

/// An owner of a rotation job claimed by a worker
/// ([`KeyStore::rotation_claim`](super::KeyStore::rotation_claim)).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RotationClaim {
    /// The owner.
    pub owner_id: String,
    /// The data key version created for the owner by this job, when a
    /// worker (maybe a dead one) got that far.
    pub new_version: Option<u32>,
}

impl RotationClaim {
    /// A claim of `owner_id`, with the version the job created for it.
    pub fn new(owner_id: impl Into<String>, new_version: Option<u32>) -> Self {
        RotationClaim {
            owner_id: owner_id.into(),
            new_version,
        }
    }
}

/// A new data key version of a claimed owner, for
/// [`KeyStore::rotation_add_versions`](super::KeyStore::rotation_add_versions):
/// the key row, its `rotate` audit record and its feed event.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct NewKeyVersion {
    /// The key row (active).
    pub key: StoredKey,
    /// Its `rotate` audit record.
    pub audit: AuditEvent,
    /// Its `rotate` feed event.
    pub event: KeyEvent,
}

impl NewKeyVersion {
    /// A new version with its audit record and feed event.
    pub fn new(key: StoredKey, audit: AuditEvent, event: KeyEvent) -> Self {
        NewKeyVersion { key, audit, event }
    }
}

/// Owners of a rotation job by state
/// ([`KeyStore::rotation_counts`](super::KeyStore::rotation_counts)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RotationCounts {
    /// Pending and free to claim (never claimed, released, or their claim
    /// expired).
    pub pending: u64,
    /// Pending and claimed by a worker whose claim has not expired.
    pub claimed: u64,
    /// Done.
    pub done: u64,
}

impl RotationCounts {
    /// Every owner of the job.
    pub fn total(&self) -> u64 {
        self.pending + self.claimed + self.done
    }
}

/// The state of an owner of a rotation job still to do.
pub(crate) const PENDING: &str = "pending";
/// The state of an owner of a rotation job done.
pub(crate) const DONE: &str = "done";

/// The longest job id (`phi_rotation_claims.job_id`).
pub const MAX_JOB_ID_LEN: usize = 64;

/// Checks a rotation job id: 1 to 64 bytes of letters, digits, `-`, `_`,
/// `.` and `:`.
///
/// # Errors
/// [`Error::InvalidInput`] naming what is wrong.
pub fn check_job_id(job: &str) -> Result<()> {
    let plain = job
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if job.is_empty() || job.len() > MAX_JOB_ID_LEN || !plain {
        return Err(Error::InvalidInput {
            what: "rotation job id",
            reason: format!(
                "{job:?} is not 1 to {MAX_JOB_ID_LEN} letters, digits, '-', '_', '.' or ':'"
            ),
        });
    }
    Ok(())
}

/// Refuses a MySQL or MariaDB server without `SELECT … FOR UPDATE SKIP
/// LOCKED`, from its version as `SELECT VERSION()` reports it: several
/// workers share a rotation job by skipping the rows another worker is
/// claiming, which MariaDB does from 10.6 and MySQL from 8.0.1.
///
/// ```
/// use phi_types::lifecycle::skip_locked_supported;
/// assert!(skip_locked_supported("10.11.6-MariaDB-0+deb12u1").is_ok());
/// assert!(skip_locked_supported("8.0.36").is_ok());
/// let error = skip_locked_supported("10.5.23-MariaDB").unwrap_err().to_string();
/// assert!(error.contains("MariaDB 10.5.23"), "{error}");
/// ```
///
/// # Errors
/// [`Error::Config`] naming the version and the versions needed.
pub fn skip_locked_supported(version: &str) -> Result<()> {
    let mariadb = version.to_ascii_lowercase().contains("mariadb");
    let text = match version.strip_prefix("5.5.5-") {
        Some(rest) if mariadb => rest,
        _ => version,
    };
    let numbers: Vec<u32> = text
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()
        .unwrap_or("")
        .split('.')
        .map_while(|n| n.parse().ok())
        .collect();
    let needed: [u32; 3] = if mariadb { [10, 6, 0] } else { [8, 0, 1] };
    let server = if mariadb { "MariaDB" } else { "MySQL" };
    let wanted = "rotation jobs claim owners with SELECT ... FOR UPDATE SKIP LOCKED: MariaDB >= 10.6 or MySQL >= 8.0.1";
    let &[major, minor, ref rest @ ..] = numbers.as_slice() else {
        return Err(Error::Config(format!(
            "cannot read the server's version {version:?} ({wanted})"
        )));
    };
    let patch = rest.first().copied().unwrap_or(0);
    if [major, minor, patch] < needed {
        return Err(Error::Config(format!(
            "{server} {major}.{minor}.{patch} (version {version:?}) has no SKIP LOCKED: {wanted}; \
             upgrade the server, or rotate owner by owner (phi keys rotate --owner)"
        )));
    }
    Ok(())
}

/// The end of a claim taken at `now` for `ttl`.
pub(crate) fn claim_end(now: NaiveDateTime, ttl: std::time::Duration) -> NaiveDateTime {
    now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::days(365))
}
