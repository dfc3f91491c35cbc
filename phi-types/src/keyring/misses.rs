//! Key versions an owner was recently found not to have.
//!
//! A value whose header names a version the owner's cached keys lack makes
//! the keyring reload the owner once (another process may have rotated).
//! When the reload does not find the version either (a tampered header, a
//! row restored from another database), the miss is remembered for a short
//! time, so that loading many such rows does not query the key store and
//! unwrap the owner's keys again for each one.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(super) struct Misses {
    /// (owner, version) → when the reload that did not find it ran.
    entries: Mutex<HashMap<(String, u32), Instant>>,
    ttl: Duration,
    capacity: usize,
}

impl Misses {
    /// Remembers misses for `ttl` (zero: never), at most `capacity` of them.
    pub(super) fn new(ttl: Duration, capacity: usize) -> Self {
        Misses {
            entries: Mutex::new(HashMap::new()),
            ttl,
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(String, u32), Instant>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `owner` was found without `version` less than the TTL ago.
    pub(super) fn remembered(&self, owner: &str, version: u32, now: Instant) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        let entries = self.lock();
        if entries.is_empty() {
            return false;
        }
        entries
            .get(&(owner.to_owned(), version))
            .is_some_and(|at| now.saturating_duration_since(*at) < self.ttl)
    }

    /// Remembers that a reload at `now` did not find `owner`'s `version`.
    pub(super) fn remember(&self, owner: &str, version: u32, now: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.lock();
        if entries.len() >= self.capacity {
            entries.retain(|_, at| now.saturating_duration_since(*at) < self.ttl);
            if entries.len() >= self.capacity {
                // Many distinct bogus versions at once: forget them all
                // rather than grow (each costs at most one more reload).
                entries.clear();
            }
        }
        entries.insert((owner.to_owned(), version), now);
    }

    /// Forgets `owner`'s misses (its keys changed here, or were cleared).
    pub(super) fn forget(&self, owner: &str) {
        let mut entries = self.lock();
        if !entries.is_empty() {
            entries.retain(|(o, _), _| o != owner);
        }
    }

    /// Forgets every miss.
    pub(super) fn clear(&self) {
        self.lock().clear();
    }
}
