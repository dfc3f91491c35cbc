//! Seal counting per (owner, data key version), and the rotation policy
//! the counts are held against.
//!
//! Every cached owner's current version has a tally, an atomic counter
//! shared by every thread sealing under it: a seal adds one with a relaxed
//! atomic increment, never a lock. The keyring's registry of tallies is
//! locked only when an owner's keys are loaded or created and when the
//! counts are flushed: a following keyring's feed thread adds them to the
//! key store (`phi_seal_counts`, [`KeyStore::add_seal_counts`]) at most
//! once per feed interval, and [`Keyring::flush_seal_counts`] and the drop
//! of the last clone of a keyring add what is left. A count taken out of a
//! tally and not written is put back, so a failed flush loses nothing; a
//! count still in a tally when the process dies (a crash, a
//! `process::exit`) is lost, which is why the default budget
//! ([`DEFAULT_MAX_SEALS_PER_KEY`]) leaves a wide margin.
//!
//! [`Keyring::flush_seal_counts`]: super::Keyring::flush_seal_counts

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::store::{KeyStore, SealCount};

/// Envelope v1's random-nonce budget per data key version: 2³² seals
/// (NIST SP 800-38D §8.3, 96-bit random nonces: the chance of any nonce
/// repeating stays below 2⁻³² up to this many messages under one key).
pub const NONCE_BUDGET: u64 = 1 << 32;

/// The default [`RotationPolicy::max_seals_per_key`]: a quarter of
/// [`NONCE_BUDGET`] (2³⁰ = 1,073,741,824 seals). The margin covers counts
/// that run behind (each process flushes once per feed interval), counts
/// lost with a process that crashed before flushing, and the seals made
/// between a key falling due and its rotation; at 2³⁰ seals the chance of
/// a repeated nonce is about 2⁻³⁷.
pub const DEFAULT_MAX_SEALS_PER_KEY: u64 = 1 << 30;

/// When an owner's current data key version is due for rotation
/// ([`lifecycle::due_keys`](crate::lifecycle::due_keys)): past
/// `max_key_age` since it was created, or past `max_seals_per_key` values
/// sealed under it. `None` leaves that criterion out.
///
/// The default has no age limit and the seal budget
/// [`DEFAULT_MAX_SEALS_PER_KEY`]: envelope v1's nonce budget is a limit of
/// the cipher, a key's age one of the organisation's policy (90 days, 12
/// months, …).
///
/// ```
/// use std::time::Duration;
/// use phi_types::RotationPolicy;
/// let policy = RotationPolicy {
///     max_key_age: Some(Duration::from_secs(90 * 24 * 60 * 60)),
///     ..RotationPolicy::default()
/// };
/// assert_eq!(policy.max_seals_per_key, Some(phi_types::DEFAULT_MAX_SEALS_PER_KEY));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RotationPolicy {
    /// A current version older than this is due.
    pub max_key_age: Option<Duration>,
    /// A current version with at least this many values sealed under it
    /// (as counted in `phi_seal_counts`) is due; at most [`NONCE_BUDGET`].
    pub max_seals_per_key: Option<u64>,
}

impl Default for RotationPolicy {
    fn default() -> Self {
        RotationPolicy {
            max_key_age: None,
            max_seals_per_key: Some(DEFAULT_MAX_SEALS_PER_KEY),
        }
    }
}

impl RotationPolicy {
    /// Checks the limits: positive, and a seal budget within
    /// [`NONCE_BUDGET`].
    ///
    /// # Errors
    /// [`Error::Config`] naming the limit and why.
    pub fn check(&self) -> Result<()> {
        if self.max_key_age.is_some_and(|age| age.is_zero()) {
            return Err(Error::Config(
                "the rotation policy's max_key_age must be positive".into(),
            ));
        }
        match self.max_seals_per_key {
            Some(0) => Err(Error::Config(
                "the rotation policy's max_seals_per_key must be positive".into(),
            )),
            Some(n) if n > NONCE_BUDGET => Err(Error::Config(format!(
                "the rotation policy's max_seals_per_key is {n}, above envelope v1's nonce budget \
                 of {NONCE_BUDGET} seals per key version (2^32, NIST SP 800-38D); the default is {DEFAULT_MAX_SEALS_PER_KEY}"
            ))),
            _ => Ok(()),
        }
    }
}

/// The values sealed under one (owner, version) in this process and not
/// yet flushed.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    seals: AtomicU64,
}

impl Tally {
    /// One more value sealed.
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.seals.fetch_add(n, Ordering::Relaxed);
    }
}

/// A keyring's tallies, by (owner, version).
#[derive(Debug, Default)]
pub(super) struct SealCounts {
    /// Whether the key store records counts ([`KeyStore::counts_seals`]);
    /// when not, no tally is handed out and sealing counts nothing.
    enabled: bool,
    tallies: Mutex<HashMap<(String, u32), Arc<Tally>>>,
    /// One flush at a time; when the last one was made.
    flushed: Mutex<Option<Instant>>,
}

impl SealCounts {
    pub(super) fn new(enabled: bool) -> Self {
        SealCounts {
            enabled,
            ..SealCounts::default()
        }
    }

    /// The tally of (`owner`, `version`), for the keys that seal under it
    /// (`None` when the store records no counts).
    pub(super) fn tally(&self, owner: &str, version: u32) -> Option<Arc<Tally>> {
        if !self.enabled {
            return None;
        }
        let mut tallies = self.tallies.lock().unwrap_or_else(PoisonError::into_inner);
        Some(
            tallies
                .entry((owner.to_owned(), version))
                .or_default()
                .clone(),
        )
    }

    /// Flushes when the last flush is at least `interval` old (the feed
    /// thread's call, once per interval or notification); logs a failure.
    pub(super) fn flush_if_due(&self, store: &dyn KeyStore, interval: Duration) {
        let last = *self.flushed.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|at| at.elapsed() < interval) {
            return;
        }
        if let Err(error) = self.flush(store) {
            tracing::warn!(%error, "cannot record seal counts in the key store: keeping them for the next flush");
        }
    }

    /// Adds every tally's count to the key store and takes it out of the
    /// tally; on failure puts the counts back. Returns the seals recorded.
    pub(super) fn flush(&self, store: &dyn KeyStore) -> Result<u64> {
        if !self.enabled {
            return Ok(0);
        }
        let mut flushed = self.flushed.lock().unwrap_or_else(PoisonError::into_inner);
        *flushed = Some(Instant::now());
        let mut taken: Vec<(Arc<Tally>, SealCount)> = Vec::new();
        {
            let mut tallies = self.tallies.lock().unwrap_or_else(PoisonError::into_inner);
            tallies.retain(|(owner, version), tally| {
                let seals = tally.seals.swap(0, Ordering::Relaxed);
                if seals > 0 {
                    taken.push((
                        tally.clone(),
                        SealCount::new(owner.clone(), *version, seals),
                    ));
                    return true;
                }
                // Nothing pending, and no cached keys seal under it any more.
                Arc::strong_count(tally) > 1
            });
        }
        if taken.is_empty() {
            return Ok(0);
        }
        let counts: Vec<SealCount> = taken.iter().map(|(_, c)| c.clone()).collect();
        match store.add_seal_counts(&counts) {
            Ok(()) => Ok(counts.iter().map(|c| c.seals).sum()),
            Err(error) => {
                for (tally, count) in &taken {
                    tally.add(count.seals);
                }
                Err(error)
            }
        }
    }

    /// The counts not flushed yet, without taking them.
    pub(super) fn pending(&self) -> Vec<SealCount> {
        let tallies = self.tallies.lock().unwrap_or_else(PoisonError::into_inner);
        let mut pending: Vec<SealCount> = tallies
            .iter()
            .filter_map(|((owner, version), tally)| {
                let seals = tally.seals.load(Ordering::Relaxed);
                (seals > 0).then(|| SealCount::new(owner.clone(), *version, seals))
            })
            .collect();
        pending.sort_by(|a, b| (&a.owner_id, a.version).cmp(&(&b.owner_id, b.version)));
        pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryKeyStore;

    #[test]
    fn a_failed_flush_loses_no_count_and_a_flush_takes_each_seal_once() {
        #[derive(Debug)]
        struct Down;
        impl KeyStore for Down {
            fn load_keys(&self, _: &[&str]) -> Result<Vec<crate::StoredKey>> {
                Ok(Vec::new())
            }
            fn insert_key_if_absent(&self, _: &crate::StoredKey) -> Result<bool> {
                Ok(false)
            }
            fn append_audit(&self, _: &[crate::AuditEvent]) -> Result<()> {
                Ok(())
            }
            fn kek_check(&self, _: &str) -> Result<Option<crate::KekCheck>> {
                Ok(None)
            }
            fn insert_kek_check_if_absent(&self, _: &str, _: &crate::KekCheck) -> Result<bool> {
                Ok(false)
            }
            fn owners(&self) -> Result<Vec<String>> {
                Ok(Vec::new())
            }
            fn add_seal_counts(&self, _: &[SealCount]) -> Result<()> {
                Err(Error::store("recording seal counts", "down"))
            }
        }
        let counts = SealCounts::new(true);
        let tally = counts.tally("acme", 1).expect("tally");
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1_000 {
                        tally.add(1);
                    }
                });
            }
        });
        assert!(counts.flush(&Down).is_err());
        assert_eq!(counts.pending(), vec![SealCount::new("acme", 1, 4_000)]);
        let store = MemoryKeyStore::new();
        assert_eq!(counts.flush(&store).expect("flush"), 4_000);
        assert_eq!(counts.flush(&store).expect("flush"), 0, "taken once");
        tally.add(5);
        counts.flush(&store).expect("flush");
        assert_eq!(
            store.seal_counts(&["acme"]).expect("counts"),
            vec![SealCount::new("acme", 1, 4_005)]
        );
        // A tally no keys hold any more is forgotten once flushed.
        drop(tally);
        counts.flush(&store).expect("flush");
        assert!(counts.tallies.lock().expect("lock").is_empty());
    }

    #[test]
    fn the_policy_refuses_a_budget_above_the_nonce_budget() {
        let mut policy = RotationPolicy::default();
        policy.check().expect("default");
        policy.max_seals_per_key = Some(NONCE_BUDGET + 1);
        let err = policy.check().expect_err("above");
        assert!(err.to_string().contains("max_seals_per_key"), "{err}");
        policy.max_seals_per_key = Some(0);
        assert!(policy.check().is_err());
        policy = RotationPolicy {
            max_key_age: Some(Duration::ZERO),
            max_seals_per_key: None,
        };
        assert!(policy.check().is_err());
    }
}
