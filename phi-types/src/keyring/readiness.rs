//! Readiness: whether this process's keyring can serve, for a load
//! balancer's or an orchestrator's probe ([`Keyring::readiness`]).
//!
//! A check never waits longer than its timeout. The key store's query
//! runs on a thread of its own, one at a time: a caller that times out
//! leaves the running query to finish (its result serves the next call)
//! and reports the store as not answering; a hung store never piles up
//! threads. The KEK is probed (a KMS `Decrypt` of its check value) on
//! another thread, at most once per
//! [`KeyringBuilder::kek_probe_interval`] and one probe at a time: every
//! call reports the last finished probe's result, so a slow KMS neither
//! delays the answer nor is called once per probe request.
//!
//! The status names no owner and holds no key material: the KEK's id, the
//! error texts of the store and KEK checks (which name tables and KEK ids),
//! counts and durations.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{Keyring, KeyringBuilder};
use crate::kek::KeyEncryptionKey;
use crate::store::KeyStore;

/// Default timeout of a [`Keyring::readiness`] check.
pub const DEFAULT_READINESS_TIMEOUT: Duration = Duration::from_secs(2);
/// Default interval between two probes of the KEK by
/// [`Keyring::readiness`].
pub const DEFAULT_KEK_PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// Longest error text a readiness status carries.
const MAX_ERROR_LEN: usize = 512;

/// Whether a keyring can serve, from [`Keyring::readiness`]. Serialises
/// (feature `serde`) to the JSON that the admin API's `GET /ready` answers.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "admin-http", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub struct Readiness {
    /// Every check passed: the key store answered, the KEK's last probe
    /// succeeded and the feed (if followed) is within its maximum staleness.
    /// The queues' fill and the pool do not decide it (they are reported
    /// for dashboards and alerts).
    pub ready: bool,
    /// The key store's check.
    pub key_store: ReadinessCheck,
    /// The primary KEK's checks.
    pub kek: KekReadiness,
    /// The key-event feed, if the keyring follows it.
    pub feed: Option<FeedReadiness>,
    /// The `unwrap` audit records' queue.
    pub audit_queue: QueueFill,
    /// The access log's queue, when the keyring has an access log that
    /// reports one.
    pub access_log_queue: Option<QueueFill>,
    /// The key store's connection pool, when the store reports one.
    pub pool: Option<PoolState>,
}

/// One check's outcome.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "admin-http", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub struct ReadinessCheck {
    /// The check passed.
    pub ok: bool,
    /// How long it took, in seconds (the timeout when it did not answer).
    pub seconds: f64,
    /// Why it failed.
    pub error: Option<String>,
}

/// The primary KEK's checks.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "admin-http", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub struct KekReadiness {
    /// The KEK's id.
    pub kek_id: String,
    /// The KEK verified against its stored check value when the keyring
    /// was built (always true: a keyring is not built otherwise).
    pub checked_at_build: bool,
    /// The last probe: the KEK opened its check value (a KMS call for a
    /// KMS key). Before the first probe, the check at build.
    pub reachable: ReadinessCheck,
    /// Seconds since that probe (or the build).
    pub probed_seconds_ago: f64,
    /// Seconds between two probes.
    pub probe_interval_seconds: f64,
}

/// The key-event feed's staleness against its maximum.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "admin-http", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub struct FeedReadiness {
    /// Within the maximum staleness (past it, sealing is refused).
    pub ok: bool,
    /// Seconds since the last successful read of the feed.
    pub stale_seconds: f64,
    /// The maximum staleness, in seconds.
    pub max_staleness_seconds: f64,
    /// Seconds between two reads.
    pub interval_seconds: f64,
    /// Reads that failed since the keyring was built.
    pub read_failures: u64,
    /// Woken by the store's notifications (PostgreSQL `LISTEN`).
    pub listening: bool,
}

pub use crate::access::QueueFill;

pub use crate::store::PoolState;

/// The probes' shared state.
pub(super) struct Probes {
    timeout: Duration,
    kek_interval: Duration,
    state: Mutex<State>,
    done: Condvar,
}

struct State {
    /// A store check is running.
    store_running: bool,
    /// A KEK probe is running.
    kek_running: bool,
    /// Store checks finished, ever.
    rounds: u64,
    store: ReadinessCheck,
    kek: ReadinessCheck,
    kek_at: Instant,
}

impl Probes {
    pub(super) fn new(timeout: Duration, kek_interval: Duration) -> Self {
        let ok = ReadinessCheck {
            ok: true,
            seconds: 0.0,
            error: None,
        };
        Probes {
            timeout,
            kek_interval,
            state: Mutex::new(State {
                store_running: false,
                kek_running: false,
                rounds: 0,
                store: ok.clone(),
                kek: ok,
                kek_at: Instant::now(),
            }),
            done: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs a store check (or joins the running one) and waits for its
    /// result at most the timeout; returns the store's and the KEK's last
    /// outcomes and when the KEK was last probed.
    fn probe(
        self: &Arc<Self>,
        store: &Arc<dyn KeyStore>,
        kek: &Arc<dyn KeyEncryptionKey>,
    ) -> (ReadinessCheck, ReadinessCheck, Instant) {
        let started = Instant::now();
        let mut state = self.lock();
        let round = state.rounds;
        if !state.store_running {
            state.store_running = true;
            let probes = self.clone();
            let (store, kek) = (store.clone(), kek.clone());
            let spawned = std::thread::Builder::new()
                .name("phi-readiness".into())
                .spawn(move || probes.check_store(store.as_ref(), kek));
            if let Err(error) = spawned {
                state.store_running = false;
                let failed = ReadinessCheck {
                    ok: false,
                    seconds: 0.0,
                    error: Some(format!(
                        "cannot start the readiness check's thread: {error}"
                    )),
                };
                return (failed, state.kek.clone(), state.kek_at);
            }
        }
        while state.rounds == round {
            let left = self.timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                let silent = ReadinessCheck {
                    ok: false,
                    seconds: self.timeout.as_secs_f64(),
                    error: Some(format!(
                        "the key store did not answer within {:?}",
                        self.timeout
                    )),
                };
                return (silent, state.kek.clone(), state.kek_at);
            }
            state = self
                .done
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        (state.store.clone(), state.kek.clone(), state.kek_at)
    }

    /// The store check's thread: the store's query (the primary KEK's
    /// stored check value), published at once; then, when due and none is
    /// running, the KEK's probe on a thread of its own (a slow KMS does not
    /// hold up the next store check).
    fn check_store(self: Arc<Self>, store: &dyn KeyStore, kek: Arc<dyn KeyEncryptionKey>) {
        let started = Instant::now();
        let stored = store.kek_check(kek.id());
        let store_check = match &stored {
            Ok(_) => passed(started),
            Err(error) => failed(started, &crate::error::chain_text(error)),
        };
        let mut state = self.lock();
        state.store = store_check;
        state.rounds += 1;
        state.store_running = false;
        self.done.notify_all();
        let Ok(check) = stored else { return };
        if state.kek_running || state.kek_at.elapsed() < self.kek_interval {
            return;
        }
        state.kek_running = true;
        drop(state);
        let probes = self.clone();
        let spawned = std::thread::Builder::new()
            .name("phi-readiness-kek".into())
            .spawn(move || probes.probe_kek(kek.as_ref(), check));
        if spawned.is_err() {
            self.lock().kek_running = false;
        }
    }

    /// The KEK probe's thread: the KEK opens its stored check value.
    fn probe_kek(&self, kek: &dyn KeyEncryptionKey, check: Option<crate::kek::KekCheck>) {
        let started = Instant::now();
        let outcome = match check.map(|check| kek.verify_check_value(&check)) {
            Some(Ok(true)) => passed(started),
            Some(Ok(false)) => failed(
                started,
                &format!("KEK {:?} no longer opens its stored check value", kek.id()),
            ),
            Some(Err(error)) => failed(
                started,
                &format!(
                    "KEK {:?} cannot be reached: {}",
                    kek.id(),
                    crate::error::chain_text(&*error)
                ),
            ),
            None => failed(
                started,
                &format!("KEK {:?} has no stored check value", kek.id()),
            ),
        };
        let mut state = self.lock();
        state.kek = outcome;
        state.kek_at = Instant::now();
        state.kek_running = false;
    }
}

fn passed(started: Instant) -> ReadinessCheck {
    ReadinessCheck {
        ok: true,
        seconds: started.elapsed().as_secs_f64(),
        error: None,
    }
}

fn failed(started: Instant, error: &str) -> ReadinessCheck {
    let mut error = error.to_owned();
    if error.len() > MAX_ERROR_LEN {
        let mut end = MAX_ERROR_LEN;
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        error.truncate(end);
        error.push('…');
    }
    ReadinessCheck {
        ok: false,
        seconds: started.elapsed().as_secs_f64(),
        error: Some(error),
    }
}

impl KeyringBuilder {
    /// How long a [`Keyring::readiness`] check waits for the key store at
    /// most (default [`DEFAULT_READINESS_TIMEOUT`]).
    pub fn readiness_timeout(mut self, timeout: Duration) -> Self {
        self.readiness_timeout = timeout;
        self
    }

    /// How often [`Keyring::readiness`] probes the KEK at most (a KMS call
    /// for a KMS key; default [`DEFAULT_KEK_PROBE_INTERVAL`]).
    pub fn kek_probe_interval(mut self, interval: Duration) -> Self {
        self.kek_probe_interval = interval;
        self
    }
}

impl Keyring {
    /// Whether this keyring can serve: the key store answers a cheap query
    /// (the primary KEK's check value) within the
    /// [readiness timeout](KeyringBuilder::readiness_timeout), the KEK's
    /// last probe opened its check value, and the feed, if followed, is
    /// within its maximum staleness; with the audit and access-log queues'
    /// fill and the key store's pool. Blocks at most the timeout: the
    /// store's query runs on a thread of its own, one at a time, and the
    /// KEK is probed on another at most once per
    /// [`kek_probe_interval`](KeyringBuilder::kek_probe_interval), each
    /// call reporting the last finished probe; from async code use
    /// [`readiness_async`](Self::readiness_async).
    pub fn readiness(&self) -> Readiness {
        let inner = &self.inner;
        let (key_store, reachable, probed_at) = inner.probes.probe(&inner.store, &inner.primary);
        let feed = inner.follower.as_ref().map(|follower| {
            let status = follower.status();
            FeedReadiness {
                ok: status.stale_for <= status.max_staleness,
                stale_seconds: status.stale_for.as_secs_f64(),
                max_staleness_seconds: status.max_staleness.as_secs_f64(),
                interval_seconds: status.interval.as_secs_f64(),
                read_failures: status.read_failures,
                listening: status.listening,
            }
        });
        let ready = key_store.ok && reachable.ok && feed.as_ref().is_none_or(|f| f.ok);
        Readiness {
            ready,
            key_store,
            kek: KekReadiness {
                kek_id: inner.primary.id().to_owned(),
                checked_at_build: true,
                reachable,
                probed_seconds_ago: probed_at.elapsed().as_secs_f64(),
                probe_interval_seconds: inner.probes.kek_interval.as_secs_f64(),
            },
            feed,
            audit_queue: inner.audit.fill(),
            access_log_queue: inner.access.log.as_ref().and_then(|log| log.queue_fill()),
            pool: inner.store.pool_state(),
        }
    }

    /// [`readiness`](Self::readiness) on tokio's blocking pool: the caller's
    /// worker thread is never blocked (feature `async` or `admin-http`).
    #[cfg(any(feature = "async", feature = "admin-http"))]
    #[cfg_attr(docsrs, doc(cfg(any(feature = "async", feature = "admin-http"))))]
    pub async fn readiness_async(&self) -> Readiness {
        let keyring = self.clone();
        let timeout = self.inner.probes.timeout;
        match tokio::task::spawn_blocking(move || keyring.readiness()).await {
            Ok(readiness) => readiness,
            Err(error) => {
                // The check panicked or the runtime is shutting down.
                let mut readiness = self.queues_only();
                readiness.key_store = ReadinessCheck {
                    ok: false,
                    seconds: timeout.as_secs_f64(),
                    error: Some(format!("the readiness check did not finish: {error}")),
                };
                readiness
            }
        }
    }

    /// A not-ready status with only the cheap, local parts filled in.
    #[cfg(any(feature = "async", feature = "admin-http"))]
    fn queues_only(&self) -> Readiness {
        let inner = &self.inner;
        let unknown = ReadinessCheck {
            ok: false,
            seconds: 0.0,
            error: None,
        };
        Readiness {
            ready: false,
            key_store: unknown.clone(),
            kek: KekReadiness {
                kek_id: inner.primary.id().to_owned(),
                checked_at_build: true,
                reachable: unknown,
                probed_seconds_ago: 0.0,
                probe_interval_seconds: inner.probes.kek_interval.as_secs_f64(),
            },
            feed: None,
            audit_queue: inner.audit.fill(),
            access_log_queue: inner.access.log.as_ref().and_then(|log| log.queue_fill()),
            pool: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::dek::KeyBytes;
    use crate::kek::LocalKek;
    use crate::store::MemoryKeyStore;

    /// A store whose `kek_check` fails while `down` is set, and, while
    /// `hang` is set, waits until `release` gets a message (counting the
    /// checks that waited).
    #[derive(Debug, Default)]
    struct Flaky {
        inner: MemoryKeyStore,
        down: Arc<AtomicBool>,
        hang: AtomicBool,
        hung: std::sync::atomic::AtomicUsize,
        release: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    }

    fn keyring(store: Arc<Flaky>, timeout: Duration) -> Keyring {
        let kek = Arc::new(LocalKek::new("local-1", &KeyBytes::new([7; 32])));
        Keyring::builder(store, kek)
            .without_feed()
            .kek_probe_interval(Duration::ZERO)
            .readiness_timeout(timeout)
            .build()
            .expect("keyring")
    }

    #[test]
    fn a_hung_store_is_not_ready_within_the_timeout_and_probed_once() {
        let store = Arc::new(Flaky::default());
        let keyring = keyring(store.clone(), Duration::from_millis(200));
        let (release, wait) = std::sync::mpsc::channel();
        *store.release.lock().expect("lock") = Some(wait);
        store.hang.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            let started = Instant::now();
            let status = keyring.readiness();
            assert!(started.elapsed() < Duration::from_secs(5));
            assert!(!status.ready);
            let error = status.key_store.error.expect("an error");
            assert!(error.contains("did not answer within"), "{error}");
        }
        assert_eq!(store.hung.load(Ordering::SeqCst), 1, "one check at a time");
        store.hang.store(false, Ordering::SeqCst);
        release.send(()).expect("the hung check waits");
        // The hung check's result (a pass) or a new one: ready either way.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !keyring.readiness().ready {
            assert!(
                Instant::now() < deadline,
                "ready again once the store answers"
            );
        }
    }

    #[test]
    fn ready_until_the_store_fails_and_again_after() {
        let store = Arc::new(Flaky::default());
        let down = store.down.clone();
        let keyring = keyring(store, DEFAULT_READINESS_TIMEOUT);
        let status = keyring.readiness();
        assert!(status.ready, "{status:?}");
        assert!(status.kek.reachable.ok);
        assert_eq!(status.kek.kek_id, "local-1");
        assert_eq!(status.feed, None);
        assert_eq!(
            status.audit_queue.capacity,
            crate::DEFAULT_AUDIT_QUEUE as u64
        );

        down.store(true, Ordering::SeqCst);
        let status = keyring.readiness();
        assert!(!status.ready);
        let error = status.key_store.error.expect("an error");
        assert!(error.contains("store is down"), "{error}");

        down.store(false, Ordering::SeqCst);
        assert!(keyring.readiness().ready);
    }

    impl KeyStore for Flaky {
        crate::store::forward_key_store!(inner; load_keys, insert_key_if_absent, append_audit);
        fn kek_check(&self, kek_id: &str) -> crate::Result<Option<crate::KekCheck>> {
            if self.hang.load(Ordering::SeqCst) {
                self.hung.fetch_add(1, Ordering::SeqCst);
                let wait = self.release.lock().expect("lock").take();
                if let Some(wait) = wait {
                    let _ = wait.recv();
                }
            }
            if self.down.load(Ordering::SeqCst) {
                return Err(crate::Error::store(
                    "reading a KEK check value",
                    "the store is down",
                ));
            }
            self.inner.kek_check(kek_id)
        }
        crate::store::forward_key_store!(inner; insert_kek_check_if_absent, owners, keys_page);
    }
}
