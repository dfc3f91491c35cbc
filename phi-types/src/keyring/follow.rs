//! Following the key-event feed: a thread of the keyring's reads the events
//! after its position once per interval and applies them. Where the store
//! has a feed listener (PostgreSQL `LISTEN`), the thread checks it every
//! [`LISTEN_TICK`] and reads the feed at once when an append was notified.
//! After a read it records its position in `phi_feed_readers`, at most once
//! per interval.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak, mpsc};
use std::time::{Duration, Instant};

use super::{Clock, Inner, Keyring};
use crate::error::{Error, Result};
use crate::feed::{FeedEvent, FeedListener, KeyEventKind};
use crate::store::KeyStore;

/// Events read per feed query; a longer backlog takes several.
const EVENTS_PER_READ: usize = 1_000;

/// How often a listening follower checks for notifications: a check takes
/// what the connection has already received, with no round trip.
const LISTEN_TICK: Duration = Duration::from_millis(20);

/// The default feed reader name: `host:pid`.
pub(super) fn default_reader() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    let mut name = format!("{host}:{}", std::process::id());
    if name.len() > 255 {
        let cut = name.len() - 255;
        name.drain(..cut);
    }
    name
}

/// Where a following keyring stands in the feed, from
/// [`Keyring::feed_status`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FeedStatus {
    /// The id of the last event applied (the feed's head when the keyring
    /// was built, at first).
    pub position: i64,
    /// How often the feed is read.
    pub interval: Duration,
    /// Past this long without a successful read, writing is refused.
    pub max_staleness: Duration,
    /// Time since the last successful read of the feed.
    pub stale_for: Duration,
    /// Events applied since the keyring was built.
    pub events_applied: u64,
    /// Reads of the feed that failed since the keyring was built.
    pub read_failures: u64,
    /// The name under which the position is recorded in `phi_feed_readers`.
    pub reader: String,
    /// Whether the keyring is woken by the store's notifications
    /// (PostgreSQL `LISTEN`) as well as by its interval.
    pub listening: bool,
}

/// The follower's state, shared between the keyring and its thread.
pub(super) struct Follower {
    pub(super) interval: Duration,
    pub(super) max_staleness: Duration,
    position: AtomicI64,
    /// The keyring's clock: staleness is measured on it.
    clock: Arc<dyn Clock>,
    /// When the feed was last read successfully, on `clock`.
    last_ok: Mutex<Instant>,
    /// When a read last failed (the system's clock): a stale keyring's
    /// writes read the feed again at most once per interval after it.
    last_failure: Mutex<Option<Instant>>,
    applied: AtomicU64,
    failures: AtomicU64,
    stop: Mutex<bool>,
    wake: Condvar,
    /// One reader at a time (the thread, or [`Keyring::sync_feed`]).
    reading: Mutex<()>,
    reader: String,
    listening: std::sync::atomic::AtomicBool,
    /// When the position was last recorded in `phi_feed_readers`.
    recorded: Mutex<Option<Instant>>,
    /// The thread, and what tells that it has finished (its sender is
    /// dropped when it ends).
    thread: Mutex<Option<(std::thread::ThreadId, mpsc::Receiver<()>)>>,
}

impl Follower {
    pub(super) fn new(
        interval: Duration,
        max_staleness: Duration,
        head: i64,
        reader: String,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Follower {
            interval,
            max_staleness,
            position: AtomicI64::new(head),
            last_ok: Mutex::new(clock.now()),
            clock,
            last_failure: Mutex::new(None),
            applied: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            stop: Mutex::new(false),
            wake: Condvar::new(),
            reading: Mutex::new(()),
            reader,
            listening: std::sync::atomic::AtomicBool::new(false),
            recorded: Mutex::new(None),
            thread: Mutex::new(None),
        }
    }

    fn last_ok(&self) -> MutexGuard<'_, Instant> {
        self.last_ok.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn stale_for(&self) -> Duration {
        let last_ok = *self.last_ok();
        self.clock.now().saturating_duration_since(last_ok)
    }

    /// Records a successful read, now.
    fn read_ok(&self) {
        *self.last_ok() = self.clock.now();
        *self
            .last_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Records a failed read, now.
    fn read_failed(&self) {
        *self
            .last_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    /// Whether a stale keyring's write may read the feed itself: unless a
    /// read failed less than an interval ago (a feed that is down is not
    /// queried by every write).
    pub(super) fn may_catch_up(&self) -> bool {
        self.last_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none_or(|at| at.elapsed() >= self.interval)
    }

    pub(super) fn status(&self) -> FeedStatus {
        FeedStatus {
            position: self.position.load(Ordering::SeqCst),
            interval: self.interval,
            max_staleness: self.max_staleness,
            stale_for: self.stale_for(),
            events_applied: self.applied.load(Ordering::Relaxed),
            read_failures: self.failures.load(Ordering::Relaxed),
            reader: self.reader.clone(),
            listening: self.listening.load(Ordering::Relaxed),
        }
    }

    /// Refuses writing for `owner` past the maximum staleness.
    pub(super) fn check_fresh(&self, owner: &str) -> Result<()> {
        let stale_for = self.stale_for();
        if stale_for > self.max_staleness {
            return Err(Error::FeedStale {
                owner: owner.to_owned(),
                stale_for,
                max_staleness: self.max_staleness,
            });
        }
        Ok(())
    }

    /// Asks the thread to stop and wakes it.
    pub(super) fn stop(&self) {
        *self.stop.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.wake.notify_all();
    }

    /// [`stop`](Self::stop)s the thread and waits, at most `timeout`, until
    /// it has finished (its last write, the position forgotten, done): a
    /// process that exits right after dropping its keyring must not leave
    /// the thread inside the database client library while the process's
    /// exit handlers tear that library down. Does not wait when called on
    /// the thread itself.
    pub(super) fn stop_and_wait(&self, timeout: Duration) {
        self.stop();
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((id, finished)) = thread
            && id != std::thread::current().id()
        {
            // Disconnected: finished; a timeout: given up on.
            let _ = finished.recv_timeout(timeout);
        }
    }

    /// Waits `timeout` (or until stopped); returns whether to go on.
    fn wait(&self, timeout: Duration) -> bool {
        let stop = self.stop.lock().unwrap_or_else(PoisonError::into_inner);
        if *stop {
            return false;
        }
        let (stop, _) = self
            .wake
            .wait_timeout(stop, timeout)
            .unwrap_or_else(PoisonError::into_inner);
        !*stop
    }

    /// Records the position in the store if the last record is at least
    /// an interval old.
    fn record(&self, store: &dyn KeyStore) {
        let mut recorded = self.recorded.lock().unwrap_or_else(PoisonError::into_inner);
        if recorded.is_some_and(|at| at.elapsed() < self.interval) {
            return;
        }
        let first = recorded.is_none();
        *recorded = Some(Instant::now());
        let position = self.position.load(Ordering::SeqCst);
        if let Err(error) = store.record_feed_reader(&self.reader, position) {
            if first {
                tracing::warn!(%error, reader = %self.reader, "cannot record this keyring's position in the key-event feed");
            } else {
                tracing::debug!(%error, reader = %self.reader, "cannot record this keyring's position in the key-event feed");
            }
        }
    }

    /// Takes the listener's news; drops a listener whose connection failed.
    fn notified(&self, listener: &mut Option<Box<dyn FeedListener>>) -> bool {
        let Some(l) = listener.as_mut() else {
            return false;
        };
        match l.notified() {
            Ok(notified) => notified,
            Err(error) => {
                tracing::warn!(%error, "lost the key-event feed's listening connection: reading the feed once per interval until it is back");
                *listener = None;
                self.listening.store(false, Ordering::Relaxed);
                false
            }
        }
    }
}

/// Starts the follower thread of the keyring whose state is `inner`,
/// woken by `listener` too when there is one.
pub(super) fn start(
    inner: &Arc<Inner>,
    follower: Arc<Follower>,
    listener: Option<Box<dyn FeedListener>>,
) -> Result<()> {
    let weak = Arc::downgrade(inner);
    let store = inner.store.clone();
    follower
        .listening
        .store(listener.is_some(), Ordering::Relaxed);
    let (finished, finished_rx) = mpsc::channel::<()>();
    let shared = follower.clone();
    let handle = std::thread::Builder::new()
        .name("phi-feed".into())
        .spawn(move || {
            let _finished = finished;
            run(&weak, &follower, listener);
            // Stopped: this keyring no longer reads the feed.
            if let Err(error) = store.forget_feed_reader(&follower.reader) {
                tracing::debug!(%error, "cannot forget this keyring's feed position");
            }
            // Before `_finished` says so: the store (and its pools) may
            // be dropped by the waiting thread once it hears.
            drop(store);
        })
        .map_err(|e| Error::Config(format!("cannot start the key-event feed thread: {e}")))?;
    *shared.thread.lock().unwrap_or_else(PoisonError::into_inner) =
        Some((handle.thread().id(), finished_rx));
    Ok(())
}

fn run(weak: &Weak<Inner>, follower: &Follower, mut listener: Option<Box<dyn FeedListener>>) {
    let can_listen = listener.is_some();
    let mut next_read = Instant::now() + follower.interval;
    loop {
        let until_read = next_read.saturating_duration_since(Instant::now());
        let timeout = if listener.is_some() {
            until_read.min(LISTEN_TICK)
        } else {
            until_read
        };
        if !follower.wait(timeout) {
            return;
        }
        let notified = follower.notified(&mut listener);
        if !notified && Instant::now() < next_read {
            continue;
        }
        let Some(inner) = weak.upgrade() else { return };
        // Not one of the application's handles: dropping it never stops
        // this thread.
        let keyring = Keyring {
            handles: None,
            inner,
            accessor: None,
            access_op: None,
        };
        keyring.read_feed_now();
        keyring
            .inner
            .seal_counts
            .flush_if_due(keyring.inner.store.as_ref(), follower.interval);
        next_read = Instant::now() + follower.interval;
        if can_listen && listener.is_none() {
            match keyring.inner.store.feed_listener() {
                Ok(Some(l)) => {
                    tracing::info!("listening to the key-event feed again");
                    listener = Some(l);
                    follower.listening.store(true, Ordering::Relaxed);
                    // Appends between losing and regaining it: read now.
                    keyring.read_feed_now();
                }
                Ok(None) => {}
                Err(error) => tracing::debug!(%error, "cannot listen to the key-event feed yet"),
            }
        }
    }
}

impl Keyring {
    /// Reads the feed after this keyring's position and applies every
    /// event; on failure logs and records how stale the keyring is.
    /// Returns how many events were applied.
    pub(super) fn read_feed_now(&self) -> u64 {
        let Some(follower) = self.inner.follower.as_ref() else {
            return 0;
        };
        let _reading = follower
            .reading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut applied = 0;
        loop {
            let after = follower.position.load(Ordering::SeqCst);
            let read = self
                .inner
                .store
                .key_events_after(after, EVENTS_PER_READ)
                .and_then(|events| {
                    for event in &events {
                        self.apply(event)?;
                        follower.position.store(event.id, Ordering::SeqCst);
                        follower.applied.fetch_add(1, Ordering::Relaxed);
                        applied += 1;
                    }
                    Ok(events.len())
                });
            match read {
                Ok(n) => {
                    follower.read_ok();
                    crate::metrics::feed_read(follower.position.load(Ordering::SeqCst), n);
                    if n < EVENTS_PER_READ {
                        follower.record(self.inner.store.as_ref());
                        return applied;
                    }
                }
                Err(error) => {
                    follower.read_failed();
                    follower.failures.fetch_add(1, Ordering::Relaxed);
                    let stale_for = follower.stale_for();
                    crate::metrics::feed_failed(stale_for);
                    let refusing = stale_for > follower.max_staleness;
                    tracing::warn!(
                        %error,
                        stale_seconds = stale_for.as_secs_f64(),
                        max_staleness_seconds = follower.max_staleness.as_secs_f64(),
                        position = follower.position.load(Ordering::SeqCst),
                        refusing_writes = refusing,
                        "cannot read the key-event feed: serving from the cache, {:.1} s stale{}",
                        stale_for.as_secs_f64(),
                        if refusing {
                            "; writing is refused until the feed is read again"
                        } else {
                            ""
                        }
                    );
                    return applied;
                }
            }
        }
    }

    /// Applies one event. A failure leaves the position before it: it is
    /// applied again at the next read.
    ///
    /// An event of a kind this build does not know (a newer build's, during
    /// a rolling upgrade) is applied conservatively, as a cache clear of
    /// the owner it names, or of every owner when it names none: whatever
    /// the newer build meant, the next use reloads from the key store,
    /// which is always right. It is counted and logged, and reading goes
    /// on: an event that cannot be understood must never stop the events
    /// after it (a shred among them) from being applied.
    fn apply(&self, feed: &FeedEvent) -> Result<()> {
        let event = &feed.event;
        tracing::debug!(
            id = feed.id,
            kind = %feed.stored_kind,
            owner = event
                .owner_id
                .as_deref()
                .map(|o| tracing::field::display(self.owner_for_telemetry(o))),
            "applying a key event"
        );
        match (event.kind, event.owner_id.as_deref()) {
            (KeyEventKind::Rollout, _) => {
                if let Some(rollout) = self.inner.store.fleet_rollout(&self.inner.rollout_policy)? {
                    self.set_rollout(rollout);
                }
            }
            (KeyEventKind::Unknown, owner) => {
                ::metrics::counter!(crate::metrics::FEED_UNKNOWN_EVENTS_TOTAL).increment(1);
                tracing::warn!(
                    id = feed.id,
                    kind = ?feed.stored_kind,
                    owner = owner.map(|o| tracing::field::display(self.owner_for_telemetry(o))),
                    "a key event of a kind this build does not know: {}",
                    if owner.is_some() {
                        "dropping the owner's cached keys and reading on"
                    } else {
                        "dropping every owner's cached keys and reading on"
                    }
                );
                match owner {
                    Some(owner) => {
                        self.clear(owner);
                    }
                    None => self.clear_all(),
                }
            }
            (_, Some(owner)) => {
                self.clear(owner);
            }
            (_, None) => self.clear_all(),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::{Receiver, Sender, channel};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use super::Follower;
    use crate::dek::KeyBytes;
    use crate::error::Result;
    use crate::feed::FeedEvent;
    use crate::kek::LocalKek;
    use crate::keyring::Keyring;
    use crate::store::{KeyStore, MemoryKeyStore};

    /// A key store whose feed read, once the test hands it the follower,
    /// says it arrived and holds until that follower is told to stop (at
    /// most 30 s): a read in flight when the application drops its last
    /// clone. Its drop is recorded.
    struct HeldFeed {
        inner: MemoryKeyStore,
        follower: Mutex<Receiver<Arc<Follower>>>,
        arrived: Mutex<Sender<()>>,
        dropped: Arc<AtomicBool>,
    }

    impl Drop for HeldFeed {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    impl std::fmt::Debug for HeldFeed {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("HeldFeed").finish_non_exhaustive()
        }
    }

    impl KeyStore for HeldFeed {
        fn key_events_after(&self, after: i64, limit: usize) -> Result<Vec<FeedEvent>> {
            let handed = self.follower.lock().expect("lock").try_recv();
            if let Ok(follower) = handed {
                self.arrived
                    .lock()
                    .expect("lock")
                    .send(())
                    .expect("the test");
                let deadline = Instant::now() + Duration::from_secs(30);
                while follower.wait(Duration::from_millis(100)) && Instant::now() < deadline {}
            }
            self.inner.key_events_after(after, limit)
        }
        fn has_feed(&self) -> bool {
            true
        }
        fn feed_head(&self) -> Result<i64> {
            self.inner.feed_head()
        }
        fn record_feed_reader(&self, reader: &str, position: i64) -> Result<()> {
            self.inner.record_feed_reader(reader, position)
        }
        fn forget_feed_reader(&self, reader: &str) -> Result<()> {
            self.inner.forget_feed_reader(reader)
        }
        crate::store::forward_key_store!(inner; load_keys, insert_key_if_absent, append_audit, owners, kek_check, insert_kek_check_if_absent, keys_page);
    }

    /// The last clone's drop, made while the feed thread reads, returns
    /// only after the keyring's state (its store and the store's pools
    /// with it) is dropped: a process that exits after it has no
    /// database client still at work on another thread.
    #[test]
    fn dropping_the_last_clone_during_a_feed_read_waits_for_it() {
        let (hand, follower) = channel();
        let (arrived, arrivals) = channel();
        let dropped = Arc::new(AtomicBool::new(false));
        let store = Arc::new(HeldFeed {
            inner: MemoryKeyStore::new(),
            follower: Mutex::new(follower),
            arrived: Mutex::new(arrived),
            dropped: dropped.clone(),
        });
        let kek = Arc::new(LocalKek::new("local-1", &KeyBytes::new([7; 32])));
        let keyring = Keyring::builder(store, kek)
            .feed_interval(Duration::from_millis(1))
            .build()
            .expect("keyring");
        let following = keyring.inner.follower.clone().expect("a following keyring");
        hand.send(following).expect("the store");
        arrivals.recv().expect("the feed thread reads");
        // The feed thread now holds the keyring's state through a handle
        // of its own, inside the read.
        drop(keyring);
        assert!(
            dropped.load(Ordering::SeqCst),
            "the last clone's drop returned while the feed thread still held the store"
        );
    }
}
