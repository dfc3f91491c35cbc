//! The single-flight checked on every interleaving by loom.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 \
//!     cargo test -p phi-types --no-default-features --release --lib loom_model
//! ```
//!
//! Each thread runs the keyring's own resolution core
//! (`keyring/resolve.rs`, the code `Keyring::resolve_each` and
//! `resolve_each_async` drive) against the real [`Cache`], its locks and
//! `DashMap` replaced by loom's models (`cache/sync.rs`); this driver does
//! only the IO the core asks for: the key store's load (a model counting
//! its calls), the KEK's unwraps (a real `LocalKek`), and waiting for
//! another thread's flight. Loom reports a thread blocked forever (a lost
//! wake-up) as a deadlock.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::SeqCst};
use loom::thread;

use super::{Cache, Lookup};
use crate::dek::KeyBytes;
use crate::error::{Error, ErrorKind, chain_text};
use crate::kek::{KeyEncryptionKey, LocalKek};
use crate::keyring::resolve::{Core, Input, Io, Step};
use crate::keyring::{Clock, Counters, OwnerKeys, Purpose};
use crate::store::StoredKey;
use crate::telemetry::OwnerIdTelemetry;

const TTL: Duration = Duration::from_secs(60);
const OWNERS: [&str; 2] = ["a", "b"];
const KEK_ID: &str = "model";
/// What the failing first load says.
const LOAD_FAILED: &str = "key store failed while loading data keys: the key store failed";

/// Runs `f` on every interleaving, at most `LOOM_MAX_PREEMPTIONS` (default
/// 3) preemptions each.
fn check(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

/// What the first fill (key-store load) does; the later ones succeed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fill {
    Succeed,
    Fail,
    Panic,
}

/// The clock of one call: the instant the test gives it.
#[derive(Debug)]
struct At(Instant);

impl Clock for At {
    fn now(&self) -> Instant {
        self.0
    }
}

/// The key store and KEK: the generation of keys each owner has stored
/// (its one active data key has that version), and the fills (loads) made.
struct Store {
    kek: Arc<dyn KeyEncryptionKey>,
    keks: HashMap<String, Arc<dyn KeyEncryptionKey>>,
    generation: [AtomicU32; 2],
    fills: [AtomicUsize; 2],
    /// Fills of an owner running now; the single-flight allows one.
    in_flight: [AtomicUsize; 2],
    /// Whether two fills of one owner may overlap (after a `clear`, the new
    /// resolution does not wait for the one the clear dropped).
    overlap_allowed: AtomicBool,
    first: Fill,
    counters: Counters,
}

impl Store {
    fn new(first: Fill) -> Self {
        let kek: Arc<dyn KeyEncryptionKey> =
            Arc::new(LocalKek::new(KEK_ID, &KeyBytes::new([7; 32])));
        let keks = HashMap::from([(KEK_ID.to_owned(), kek.clone())]);
        Store {
            kek,
            keks,
            generation: [AtomicU32::new(1), AtomicU32::new(1)],
            fills: Default::default(),
            in_flight: Default::default(),
            overlap_allowed: AtomicBool::new(false),
            first,
            counters: Counters::default(),
        }
    }

    fn index(owner: &str) -> usize {
        OWNERS
            .iter()
            .position(|o| *o == owner)
            .expect("a modelled owner")
    }

    fn fills(&self, owner: &str) -> usize {
        self.fills[Self::index(owner)].load(SeqCst)
    }

    fn fills_total(&self) -> usize {
        self.fills.iter().map(|f| f.load(SeqCst)).sum()
    }

    /// One load: per owner, its stored generation's key row.
    fn load(&self, owners: &[String]) -> crate::Result<Vec<StoredKey>> {
        let first_of_all = self.fills_total() == 0;
        let mut rows = Vec::new();
        for owner in owners {
            let i = Self::index(owner);
            let running = self.in_flight[i].fetch_add(1, SeqCst);
            assert!(
                running == 0 || self.overlap_allowed.load(SeqCst),
                "two resolutions of {owner:?} at once"
            );
            self.fills[i].fetch_add(1, SeqCst);
            let generation = self.generation[i].load(SeqCst);
            self.in_flight[i].fetch_sub(1, SeqCst);
            let wrapped = self
                .kek
                .wrap(owner, generation, &KeyBytes::new([generation as u8; 32]))
                .expect("wrapped");
            rows.push(StoredKey::active(owner, generation, KEK_ID, wrapped));
        }
        match self.first {
            Fill::Fail if first_of_all => Err(Error::store(
                "loading data keys",
                "the key store failed".to_owned(),
            )),
            Fill::Panic if first_of_all => resume_unwind(Box::new("the key store panicked")),
            _ => Ok(rows),
        }
    }
}

fn generation(result: &crate::Result<Arc<OwnerKeys>>) -> Result<u32, String> {
    result
        .as_ref()
        .map(|keys| keys.current_version().expect("an active key"))
        .map_err(|error| chain_text(error))
}

/// The keyring's resolution of `owners` for opening at `now`: the core,
/// driven with blocking calls as `Keyring::resolve_each` drives it.
fn resolve(
    cache: &Cache,
    store: &Store,
    owners: &[&str],
    now: Instant,
) -> HashMap<String, crate::Result<Arc<OwnerKeys>>> {
    let clock = At(now);
    // Seals are not counted here: the model resolves keys, it seals nothing.
    let seal_counts = super::super::seals::SealCounts::new(false);
    let core = Core {
        cache,
        primary: &store.kek,
        keks: &store.keks,
        counters: &store.counters,
        clock: &clock,
        actor: "loom",
        name: "loom",
        owner_telemetry: OwnerIdTelemetry::default(),
        owner_id_whitespace: false,
        seal_counts: &seal_counts,
    };
    let mut resolution = core.start(owners.iter().copied(), Purpose::Open, false);
    let mut input = None;
    loop {
        let io = match resolution.step(input.take()) {
            Step::Done(results) => return results.into_iter().collect(),
            Step::Io(io) => io,
        };
        input = Some(match io {
            // The core asks for its owners sorted: loom replays need the
            // same order on every run.
            Io::Load(owners) => {
                assert!(owners.is_sorted(), "{owners:?}");
                Input::Rows(store.load(&owners))
            }
            Io::Unwrap { kek, requests } => {
                let refs: Vec<(&str, u32, &[u8])> = requests
                    .iter()
                    .map(|(o, v, w)| (o.as_str(), *v, w.as_slice()))
                    .collect();
                Input::Unwrapped(kek.unwrap_many(&refs))
            }
            Io::Record { .. } => Input::Recorded(Ok(())),
            Io::Wait(flight) => Input::Waited(flight.wait()),
            Io::Generate { .. } | Io::Insert { .. } | Io::Again(_) => {
                unreachable!("opening creates no key and is never resolved again")
            }
        });
    }
}

/// [`resolve`] for one owner, a panic in the fill caught (as a server's
/// request handler would).
fn resolve_one(cache: &Cache, store: &Store, owner: &str, now: Instant) -> Result<u32, String> {
    resolve_one_kind(cache, store, owner, now).map_err(|(_, text)| text)
}

/// [`resolve_one`], with the error's kind.
fn resolve_one_kind(
    cache: &Cache,
    store: &Store,
    owner: &str,
    now: Instant,
) -> Result<u32, (Option<ErrorKind>, String)> {
    match catch_unwind(AssertUnwindSafe(|| resolve(cache, store, &[owner], now))) {
        Ok(mut results) => {
            let result = results.remove(owner).expect("a result per owner");
            let kind = result.as_ref().err().map(Error::kind);
            generation(&result).map_err(|text| (kind, text))
        }
        Err(_) => Err((None, "this thread's fill panicked".to_owned())),
    }
}

/// After every thread is done no resolution is left in flight: a lookup
/// leads or hits, never waits.
fn assert_settled(cache: &Cache, owner: &str, now: Instant) {
    assert!(
        !matches!(cache.lookup(owner, now, |_| true), Lookup::Wait(_)),
        "a resolution of {owner:?} was left in flight"
    );
}

#[test]
fn concurrent_misses_share_one_fill() {
    check(|| {
        let cache = Arc::new(Cache::new(TTL, 16));
        let store = Arc::new(Store::new(Fill::Succeed));
        let now = Instant::now();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (cache, store) = (cache.clone(), store.clone());
                thread::spawn(move || {
                    let mut r = resolve(&cache, &store, &["a"], now);
                    r.remove("a").expect("a result")
                })
            })
            .collect();
        let mine = resolve(&cache, &store, &["a"], now)
            .remove("a")
            .expect("a result");
        let theirs: Vec<crate::Result<Arc<OwnerKeys>>> = threads
            .into_iter()
            .map(|t| t.join().expect("no panic"))
            .collect();
        assert_eq!(store.fills("a"), 1, "one fill per miss");
        let mine = mine.expect("resolved");
        for keys in theirs {
            assert!(
                Arc::ptr_eq(&keys.expect("resolved"), &mine),
                "the same keys"
            );
        }
        assert_settled(&cache, "a", now);
    });
}

#[test]
fn a_failed_fill_reaches_its_waiters_and_is_not_cached() {
    check(|| {
        let cache = Arc::new(Cache::new(TTL, 16));
        let store = Arc::new(Store::new(Fill::Fail));
        let now = Instant::now();
        let thread = {
            let (cache, store) = (cache.clone(), store.clone());
            thread::spawn(move || resolve_one_kind(&cache, &store, "a", now))
        };
        let mine = resolve_one_kind(&cache, &store, "a", now);
        let theirs = thread.join().expect("no panic");
        // The first fill failed: whoever led or waited for it got its
        // error, of its kind (a waiter's copy, not a generic
        // "unavailable"); a thread that came after it led a fill of its own.
        let results = [mine, theirs];
        let failed = results.iter().filter(|r| r.is_err()).count();
        assert!(failed >= 1);
        for result in &results {
            assert!(
                matches!(result, Ok(1))
                    || matches!(result, Err((Some(ErrorKind::Database), e)) if e == LOAD_FAILED),
                "{result:?}"
            );
        }
        assert_eq!(store.fills("a"), 1 + (2 - failed), "one fill per miss");
        assert_settled(&cache, "a", now);
    });
}

#[test]
fn a_panicking_fill_releases_its_waiters() {
    check(|| {
        let cache = Arc::new(Cache::new(TTL, 16));
        let store = Arc::new(Store::new(Fill::Panic));
        let now = Instant::now();
        let thread = {
            let (cache, store) = (cache.clone(), store.clone());
            thread::spawn(move || resolve_one(&cache, &store, "a", now))
        };
        let mine = resolve_one(&cache, &store, "a", now);
        let theirs = thread.join().expect("the panic was caught");
        let results = [mine, theirs];
        let failed = results.iter().filter(|r| r.is_err()).count();
        assert!(failed >= 1);
        for result in &results {
            assert!(
                matches!(result, Ok(1))
                    || matches!(result, Err(e) if e == "this thread's fill panicked"
                        || e.contains("abandoned")),
                "{result:?}"
            );
        }
        assert_eq!(store.fills("a"), 1 + (2 - failed), "one fill per miss");
        assert_settled(&cache, "a", now);
    });
}

#[test]
fn ttl_expiry_racing_a_fill_refills_once() {
    check(|| {
        let cache = Arc::new(Cache::new(TTL, 16));
        let store = Arc::new(Store::new(Fill::Succeed));
        let loaded = Instant::now();
        let expired = loaded + TTL;
        // Generation 1 cached at `loaded`; the store now holds generation 2.
        assert_eq!(resolve_one(&cache, &store, "a", loaded), Ok(1));
        store.generation[0].store(2, SeqCst);
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (cache, store) = (cache.clone(), store.clone());
                thread::spawn(move || resolve_one(&cache, &store, "a", expired))
            })
            .collect();
        // A caller whose clock still reads `loaded` may be served either.
        let fresh = resolve_one(&cache, &store, "a", loaded);
        assert!(matches!(fresh, Ok(1 | 2)), "{fresh:?}");
        for thread in threads {
            assert_eq!(thread.join().expect("no panic"), Ok(2), "no expired key");
        }
        assert_eq!(store.fills("a"), 2, "one refill");
        assert_eq!(cache.counters.expirations.load(SeqCst), 1);
        assert_eq!(resolve_one(&cache, &store, "a", expired), Ok(2));
        assert_eq!(store.fills("a"), 2);
    });
}

/// `Keyring::clear` (one owner) or `Keyring::clear_all` racing a fill that
/// may have read the keys the clear is meant to drop.
fn clear_racing_a_fill(clear: fn(&Cache)) {
    check(move || {
        let cache = Arc::new(Cache::new(TTL, 16));
        let store = Arc::new(Store::new(Fill::Succeed));
        store.overlap_allowed.store(true, SeqCst);
        let now = Instant::now();
        let filling = {
            let (cache, store) = (cache.clone(), store.clone());
            thread::spawn(move || resolve_one(&cache, &store, "a", now))
        };
        // The owner's keys change in the store (a rotation elsewhere), then
        // the cache is told: from here on nobody may be served generation 1.
        store.generation[0].store(2, SeqCst);
        clear(&cache);
        assert_eq!(resolve_one(&cache, &store, "a", now), Ok(2));
        let raced = filling.join().expect("no panic");
        assert!(matches!(raced, Ok(1 | 2)), "{raced:?}");
        assert_eq!(
            resolve_one(&cache, &store, "a", now),
            Ok(2),
            "stale key cached"
        );
        assert_settled(&cache, "a", now);
    });
}

#[test]
fn clearing_an_owner_racing_a_fill_serves_no_stale_key() {
    clear_racing_a_fill(|cache| {
        cache.remove("a");
    });
}

#[test]
fn clearing_everything_racing_a_fill_serves_no_stale_key() {
    clear_racing_a_fill(Cache::clear);
}

#[test]
fn batches_in_opposite_orders_do_not_deadlock() {
    check(|| {
        let cache = Arc::new(Cache::new(TTL, 16));
        let store = Arc::new(Store::new(Fill::Succeed));
        let now = Instant::now();
        let thread = {
            let (cache, store) = (cache.clone(), store.clone());
            thread::spawn(move || resolve(&cache, &store, &["a", "b"], now))
        };
        let mine = resolve(&cache, &store, &["b", "a"], now);
        let theirs = thread.join().expect("no panic");
        for owner in OWNERS {
            assert_eq!(store.fills(owner), 1, "one fill of {owner:?}");
            let (m, t) = (&mine[owner], &theirs[owner]);
            assert!(Arc::ptr_eq(
                m.as_ref().expect("resolved"),
                t.as_ref().expect("resolved")
            ));
        }
    });
}
