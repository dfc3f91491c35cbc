//! The owner → data keys cache: TTL, size bound, single-flight.

#[cfg(all(test, loom))]
mod loom_model;
mod sync;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use self::sync::{Condvar, DashMap, Entry, Mutex};
use super::OwnerKeys;
use crate::error::Error;

/// What a waiter receives from the resolution it waited for: the keys, or
/// the leader's error, which each waiter copies
/// ([`Error::for_waiter`]) so that it reports the same kind (shredded, KEK
/// failure, ...) as the leader's.
pub(super) type Shared = Result<Arc<OwnerKeys>, Arc<Error>>;

/// One in-flight resolution of one owner; others asking for the same owner
/// wait on it instead of unwrapping again.
#[derive(Debug, Default)]
pub(super) struct Flight {
    result: Mutex<Option<Shared>>,
    done: Condvar,
    /// Wakes async waiters (they never block a thread on `done`).
    #[cfg(feature = "async")]
    done_async: tokio::sync::Notify,
}

impl Flight {
    fn publish(&self, result: Shared) {
        let mut slot = self.result.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(result);
        }
        self.done.notify_all();
        #[cfg(feature = "async")]
        self.done_async.notify_waiters();
    }

    /// [`wait`](Self::wait) for async callers: the task is parked, not the
    /// thread, until the leader publishes.
    #[cfg(feature = "async")]
    pub(super) async fn wait_async(&self) -> Shared {
        loop {
            let mut notified = std::pin::pin!(self.done_async.notified());
            // Registered before the check: a publish in between still wakes it.
            notified.as_mut().enable();
            if let Some(result) = self
                .result
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
            {
                return result.clone();
            }
            notified.await;
        }
    }

    pub(super) fn wait(&self) -> Shared {
        let mut slot = self.result.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(result) = slot.as_ref() {
                return result.clone();
            }
            slot = self.done.wait(slot).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[derive(Clone, Debug)]
enum Slot {
    Loading(Arc<Flight>),
    Ready(Arc<OwnerKeys>),
}

/// How the cache answered for one owner.
#[derive(Debug)]
pub(super) enum Lookup {
    /// Fresh keys in the cache.
    Hit(Arc<OwnerKeys>),
    /// This caller must resolve the owner and then call [`Cache::complete`].
    Lead(Arc<Flight>),
    /// Another caller is resolving the owner.
    Wait(Arc<Flight>),
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) hits: AtomicU64,
    pub(super) misses: AtomicU64,
    pub(super) evictions: AtomicU64,
    pub(super) expirations: AtomicU64,
}

#[derive(Debug)]
pub(super) struct Cache {
    slots: DashMap<String, Slot>,
    ttl: Duration,
    capacity: usize,
    pub(super) counters: Counters,
}

impl Cache {
    pub(super) fn new(ttl: Duration, capacity: usize) -> Self {
        Cache {
            slots: DashMap::new(),
            ttl,
            capacity,
            counters: Counters::default(),
        }
    }

    /// The owner's cached keys if they are fresh and `usable`; counts a hit
    /// only. A miss registers nothing: follow it with [`lookup`](Self::lookup).
    pub(super) fn get(
        &self,
        owner: &str,
        now: Instant,
        usable: impl Fn(&OwnerKeys) -> bool,
    ) -> Option<Arc<OwnerKeys>> {
        let slot = self.slots.get(owner)?;
        match &*slot {
            Slot::Ready(keys) if self.fresh(keys, now) && usable(keys) => {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                Some(keys.clone())
            }
            _ => None,
        }
    }

    /// Looks `owner` up. `usable` says whether cached keys serve this
    /// request (a seal needs an active version; an open does not).
    pub(super) fn lookup(
        &self,
        owner: &str,
        now: Instant,
        usable: impl Fn(&OwnerKeys) -> bool,
    ) -> Lookup {
        if let Some(keys) = self.get(owner, now, &usable) {
            return Lookup::Hit(keys);
        }
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        match self.slots.entry(owner.to_owned()) {
            Entry::Occupied(mut entry) => match entry.get() {
                Slot::Loading(flight) => Lookup::Wait(flight.clone()),
                Slot::Ready(keys) if self.fresh(keys, now) && usable(keys) => {
                    Lookup::Hit(keys.clone())
                }
                Slot::Ready(keys) => {
                    if !self.fresh(keys, now) {
                        self.counters.expirations.fetch_add(1, Ordering::Relaxed);
                    }
                    let flight = Arc::new(Flight::default());
                    entry.insert(Slot::Loading(flight.clone()));
                    Lookup::Lead(flight)
                }
            },
            Entry::Vacant(entry) => {
                let flight = Arc::new(Flight::default());
                entry.insert(Slot::Loading(flight.clone()));
                Lookup::Lead(flight)
            }
        }
    }

    fn fresh(&self, keys: &OwnerKeys, now: Instant) -> bool {
        now.saturating_duration_since(keys.loaded_at) < self.ttl
    }

    /// Publishes the outcome of a resolution this caller led, and caches it
    /// if the slot still belongs to that resolution (a `clear` may have
    /// removed it meanwhile).
    pub(super) fn complete(&self, owner: &str, flight: &Arc<Flight>, result: Shared) {
        if let Entry::Occupied(mut entry) = self.slots.entry(owner.to_owned())
            && matches!(entry.get(), Slot::Loading(f) if Arc::ptr_eq(f, flight))
        {
            match &result {
                Ok(keys) => {
                    entry.insert(Slot::Ready(keys.clone()));
                }
                Err(_) => {
                    entry.remove();
                }
            }
        }
        flight.publish(result);
        if self.slots.len() > self.capacity {
            self.evict();
        }
    }

    /// Evicts the least recently loaded owners down to 15/16 of capacity, so
    /// the scan is paid once per many inserts.
    fn evict(&self) {
        let target = self.capacity - self.capacity / 16;
        let mut ready: Vec<(Instant, String)> = self
            .slots
            .iter()
            .filter_map(|e| match e.value() {
                Slot::Ready(keys) => Some((keys.loaded_at, e.key().clone())),
                Slot::Loading(_) => None,
            })
            .collect();
        let excess = self.slots.len().saturating_sub(target).min(ready.len());
        if excess == 0 {
            return;
        }
        ready.select_nth_unstable(excess - 1);
        for (_, owner) in &ready[..excess] {
            if self
                .slots
                .remove_if(owner, |_, slot| matches!(slot, Slot::Ready(_)))
                .is_some()
            {
                self.counters.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(super) fn remove(&self, owner: &str) -> bool {
        self.slots.remove(owner).is_some()
    }

    pub(super) fn clear(&self) {
        self.slots.clear();
    }

    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    /// How many hold the flight resolving `owner` now (the cache, its
    /// leader, and one per waiter); 0 when none is in flight. For tests
    /// that park a leader and must know its waiter has joined.
    #[cfg(all(test, not(loom)))]
    pub(super) fn flight_holders(&self, owner: &str) -> usize {
        match self.slots.get(owner).as_deref() {
            Some(Slot::Loading(flight)) => Arc::strong_count(flight),
            _ => 0,
        }
    }
}

/// Completes a led resolution with an error if the leader unwinds or returns
/// early, so waiters never hang.
pub(super) struct LeadGuard<'a> {
    pub(super) cache: &'a Cache,
    pub(super) flights: HashMap<String, Arc<Flight>>,
}

impl LeadGuard<'_> {
    pub(super) fn complete(&mut self, owner: &str, result: Shared) {
        if let Some(flight) = self.flights.remove(owner) {
            self.cache.complete(owner, &flight, result);
        }
    }
}

impl Drop for LeadGuard<'_> {
    fn drop(&mut self) {
        for (owner, flight) in std::mem::take(&mut self.flights) {
            // Retryable: the leader gave up (cancelled, or panicked), the
            // owner's keys may well resolve on a second try.
            let abandoned = Error::KeyUnavailable {
                reason: "the resolution of this owner's keys was abandoned".into(),
                owner: owner.clone(),
            };
            self.cache
                .complete(&owner, &flight, Err(Arc::new(abandoned)));
        }
    }
}
