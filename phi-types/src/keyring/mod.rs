//! The keyring: resolves an owner's data keys, caching them unwrapped.
//!
//! ```text
//! Keyring ─ cache (owner → DEK versions, TTL) ─ miss ─► key store table ─► KEK unwrap
//! ```
//!
//! A cache hit costs a hash lookup. Misses for many owners are resolved
//! together: one key-store query for all of them, one unwrap per data key
//! (all handed to the KEK at once, so a KMS can answer them concurrently),
//! and, when sealing, a new data key for each owner that has none. Any number
//! of threads missing the same owner at once cause one resolution: the
//! first leads, the others wait for its result.
//!
//! # Reads never wait on the key store's write lock
//!
//! Opening values only reads the key store: a cold cache fill loads the
//! owner's rows and unwraps them, and its `unwrap` audit records are handed
//! to a bounded queue that a thread of the keyring writes through the key
//! store's own pool. So a read inside the application's own write
//! transaction (on SQLite, where the key store shares the database's write
//! lock) does not wait for that transaction, and a key store connected
//! with a database user that may only read the key tables still opens
//! values. What could not be audited is never lost silently: records that
//! do not fit in the queue (see [`KeyringBuilder::audit_queue`]) or whose
//! write fails are counted in [`KeyringStats::audit_dropped`] and in the
//! `phi_audit_dropped_total` metric, logged with their owner ids and key
//! versions, and reported by [`Keyring::flush_audit`]. The queue is written
//! out by `flush_audit` and when the last clone of the keyring is dropped
//! (a clean shutdown): drop it, or flush, outside a write transaction of
//! the application's on SQLite, or the writes wait for that transaction.
//! A keyring that is never dropped (one kept in a `static`), a
//! `process::exit`, a signal's default action or a crash loses what is
//! still queued: call `flush_audit` before such an exit. When a write
//! fails while the keyring is being dropped, the rest of the queue is
//! given up at once (counted and logged) rather than holding the drop
//! through one timeout per batch.
//! Sealing is a write path: a new data key and its `generate` record are
//! written before the value sealed under it can be.

mod audit;
mod blind_key;
mod cache;
mod check;
mod clock;
mod config;
mod follow;
mod misses;
#[cfg(feature = "async")]
mod nonblocking;
mod readiness;
mod recording;
mod resolve;
mod seals;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

pub(crate) use blind_key::BlindKeyCache;
pub use blind_key::{BLIND_INDEX_INFO, BLIND_INDEX_LEN, BlindIndexKey};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::KeyringConfig;
pub use follow::FeedStatus;
pub use readiness::{
    DEFAULT_KEK_PROBE_INTERVAL, DEFAULT_READINESS_TIMEOUT, FeedReadiness, KekReadiness, PoolState,
    QueueFill, Readiness, ReadinessCheck,
};
pub(crate) use recording::{AccessBatch, row_text};
pub use seals::{DEFAULT_MAX_SEALS_PER_KEY, NONCE_BUDGET, RotationPolicy};

use self::audit::AuditWriter;
use self::cache::Cache;
use self::misses::Misses;
use self::resolve::{Core, Input, Io, Step};
use crate::dek::Dek;
use crate::envelope::{self, Binding};
use crate::error::{Error, Result};
use crate::kek::KeyEncryptionKey;
use crate::legacy::decoder::LegacyDecoder;
use crate::sql::Encrypted;
use crate::store::{KeyState, KeyStore, Rollout, StoredKey};
use crate::telemetry::{OwnerIdTelemetry, TelemetryOwner};
use crate::value::PhiValue;

/// Default time an unwrapped data key stays cached.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Default number of owners kept in the cache.
pub const DEFAULT_MAX_OWNERS: usize = 10_000;
/// Longest owner id the key tables hold, in bytes.
pub const MAX_OWNER_LEN: usize = 255;
/// Default time a key version an owner was found not to have is remembered.
pub const DEFAULT_UNKNOWN_VERSION_TTL: Duration = Duration::from_secs(30);
/// Default number of `unwrap` audit records queued for writing.
pub const DEFAULT_AUDIT_QUEUE: usize = 65_536;
/// Default interval between two reads of the key-event feed by a following
/// keyring.
pub const DEFAULT_FEED_INTERVAL: Duration = Duration::from_secs(2);
/// Default maximum staleness of a following keyring: past it without a
/// successful read of the feed, sealing is refused.
pub const DEFAULT_FEED_MAX_STALENESS: Duration = Duration::from_secs(60);
/// Rows from which a batch is sealed or opened on the thread pool, unless
/// the keyring says otherwise
/// ([`KeyringBuilder::parallel_min_rows`]).
///
/// Handing a batch to rayon's pool and collecting it costs a few
/// microseconds (no thread is started: the pool's threads live across
/// calls); sealing or opening a row of four short fields costs about
/// 0.5–1 µs. From 512 rows the work (0.25 ms or more) outweighs the
/// hand-off many times over; below it, the calling thread alone.
pub const PARALLEL_MIN_ROWS: usize = 512;

/// The roll-out policy a keyring follows unless configured otherwise.
pub const DEFAULT_ROLLOUT_POLICY: &str = "default";
/// A keyring's name in its metrics unless configured otherwise
/// ([`KeyringBuilder::name`]).
pub const DEFAULT_KEYRING_NAME: &str = "default";

/// An owner's data keys, sorted by version: inline when there is one, as
/// for most owners, which saves an allocation per cached owner.
pub(crate) enum Deks {
    One(Dek),
    Many(Vec<Dek>),
}

impl std::ops::Deref for Deks {
    type Target = [Dek];

    fn deref(&self) -> &[Dek] {
        match self {
            Deks::One(dek) => std::slice::from_ref(dek),
            Deks::Many(deks) => deks,
        }
    }
}

/// The unwrapped data keys of one owner: every version still readable, and
/// the current one that seals.
pub struct OwnerKeys {
    owner: String,
    /// Sorted by version.
    deks: Deks,
    current: Option<usize>,
    loaded_at: Instant,
    /// The cache fill that loaded these keys (see [`Keyring::fill_mark`]).
    fill: u64,
    /// The owner was crypto-shredded: it had key rows, and every version is
    /// destroyed. Opening any of its values is then [`Error::Shredded`].
    shredded: bool,
    /// Blind-index keys derived so far, by version and scope.
    pub(crate) blind_keys: BlindKeyCache,
    /// The seal tally of the current version, when the store counts seals.
    seals: Option<Arc<seals::Tally>>,
}

impl OwnerKeys {
    /// The owner these keys belong to.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The version new values are sealed under, if the owner has an active
    /// data key.
    pub fn current_version(&self) -> Option<u32> {
        self.current.map(|i| self.deks[i].version())
    }

    /// Every version this owner can open, in ascending order.
    pub fn versions(&self) -> impl Iterator<Item = u32> + '_ {
        self.deks.iter().map(Dek::version)
    }

    /// The data key of `version`, if the owner has it.
    pub fn dek(&self, version: u32) -> Option<&Dek> {
        self.deks
            .binary_search_by_key(&version, Dek::version)
            .ok()
            .map(|i| &self.deks[i])
    }

    /// Counts `n` values sealed under the current version (one relaxed
    /// atomic add: no lock).
    #[inline]
    pub(crate) fn count_seals(&self, n: u64) {
        if let Some(tally) = &self.seals {
            tally.add(n);
        }
    }

    /// The data key new values are sealed under.
    pub(crate) fn current_dek(&self) -> Result<&Dek> {
        self.current
            .map(|i| &self.deks[i])
            .ok_or_else(|| Error::NoKey {
                owner: self.owner.clone(),
            })
    }

    /// Opens `value`, sealed for `scope` and `row`, with the data key version
    /// named in its header.
    ///
    /// # Errors
    /// [`Error::Malformed`] when the stored bytes are not an envelope,
    /// [`Error::Shredded`] when the owner was crypto-shredded (every data
    /// key version destroyed), [`Error::UnknownKeyVersion`] when the owner
    /// has no such version, [`Error::Decrypt`] when the value does not
    /// authenticate (wrong owner,
    /// scope or row, or altered bytes), [`Error::Decode`] when the plaintext
    /// is not a `T`.
    pub fn open<T: PhiValue>(&self, value: Encrypted<T>, scope: &str, row: &[u8]) -> Result<T> {
        crate::metrics::opened(self.open_uncounted(value, scope, row))
    }

    fn open_uncounted<T: PhiValue>(
        &self,
        value: Encrypted<T>,
        scope: &str,
        row: &[u8],
    ) -> Result<T> {
        let header = value.header().map_err(|source| Error::Malformed {
            scope: scope.to_owned(),
            owner: self.owner.clone(),
            source,
        })?;
        if self.shredded {
            // Erasure, not damage: the value was sealed under a key that
            // was destroyed on purpose.
            return Err(Error::Shredded {
                owner: self.owner.clone(),
            });
        }
        let dek = self
            .dek(header.key_version)
            .ok_or_else(|| Error::UnknownKeyVersion {
                scope: scope.to_owned(),
                owner: self.owner.clone(),
                key_version: header.key_version,
            })?;
        let binding = Binding::new(&self.owner, scope).with_row(row);
        let mut bytes = value.into_bytes();
        envelope::open_in_place(dek.cipher(), &mut bytes, &binding)
            .map_err(|e| e.into_error(&binding))?;
        T::decode(bytes).map_err(|source| Error::Decode {
            scope: scope.to_owned(),
            owner: self.owner.clone(),
            key_version: header.key_version,
            source,
        })
    }
}

impl fmt::Debug for OwnerKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnerKeys")
            .field("owner", &self.owner)
            .field("versions", &self.versions().collect::<Vec<_>>())
            .field("current", &self.current_version())
            .finish_non_exhaustive()
    }
}

/// What [`Keyring::warm_all`] did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct WarmReport {
    /// Owners now cached.
    pub warmed: usize,
    /// Owners whose keys could not be resolved, with the reason.
    pub failures: Vec<(String, Error)>,
}

/// Counters of a [`Keyring`], from [`Keyring::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyringStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that had to resolve (or wait for) an owner.
    pub misses: u64,
    /// Data keys unwrapped by a KEK.
    pub unwraps: u64,
    /// Data keys generated and stored by this keyring.
    pub creations: u64,
    /// Owners dropped to keep the cache within its size bound.
    pub evictions: u64,
    /// Cached owners found past their TTL.
    pub expirations: u64,
    /// Queries sent to the key store on behalf of callers (loads, inserts,
    /// `generate` audit appends); the background writes of `unwrap` audit
    /// records are counted in `audit_written` instead.
    pub store_queries: u64,
    /// Of those, the queries that loaded data keys (one per batch of cache
    /// misses).
    pub key_loads: u64,
    /// `unwrap` audit records written by the background writer.
    pub audit_written: u64,
    /// `unwrap` audit records queued and not yet written (or given up on).
    pub audit_pending: u64,
    /// `unwrap` audit records that could not be written: the queue was full,
    /// or the write failed (a read-only database user, say). Each is logged.
    pub audit_dropped: u64,
    /// Owners reloaded because a value named a key version not cached.
    pub version_reloads: u64,
    /// Opens of a key version its owner was found not to have less than
    /// [`KeyringBuilder::unknown_version_ttl`] ago, refused without asking
    /// the key store.
    pub unknown_versions_remembered: u64,
    /// Owners currently cached (or being resolved).
    pub cached_owners: usize,
}

/// One line for people: the cache, the key store and the audit writer.
///
/// ```
/// # use std::sync::Arc;
/// # use phi_types::{KeyBytes, Keyring, LocalKek, MemoryKeyStore};
/// # let kek = LocalKek::new("local-1", &KeyBytes::new([7; 32]));
/// # let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), Arc::new(kek)).build()?;
/// keyring.seal(&"Doe".to_string(), "provider-17", "cases.patient_last", b"C-1")?;
/// assert_eq!(
///     keyring.stats().to_string(),
///     "1 owner cached; 0 cache hits, 1 miss; 0 data keys unwrapped, 1 created; \
///      3 key-store queries; audit: 0 written, 0 pending, 0 dropped"
/// );
/// # Ok::<(), phi_types::Error>(())
/// ```
impl fmt::Display for KeyringStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn n(count: u64, one: &str, many: &str) -> String {
            format!("{count} {}", if count == 1 { one } else { many })
        }
        write!(
            f,
            "{} cached; {}, {}; {} unwrapped, {} created; {}; audit: {} written, {} pending, {} dropped",
            n(self.cached_owners as u64, "owner", "owners"),
            n(self.hits, "cache hit", "cache hits"),
            n(self.misses, "miss", "misses"),
            n(self.unwraps, "data key", "data keys"),
            self.creations,
            n(self.store_queries, "key-store query", "key-store queries"),
            self.audit_written,
            self.audit_pending,
            self.audit_dropped,
        )?;
        if self.evictions > 0 || self.expirations > 0 {
            write!(
                f,
                "; {} evicted, {} expired",
                self.evictions, self.expirations
            )?;
        }
        if self.version_reloads > 0 || self.unknown_versions_remembered > 0 {
            write!(
                f,
                "; {} reloaded for a version not cached, {} refused as unknown",
                self.version_reloads, self.unknown_versions_remembered
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Counters {
    unwraps: AtomicU64,
    creations: AtomicU64,
    store_queries: AtomicU64,
    key_loads: AtomicU64,
    version_reloads: AtomicU64,
    unknown_versions_remembered: AtomicU64,
    fills: AtomicU64,
}

/// Resolves owners' data keys: cache, key store, KEK.
///
/// Cheap to clone (an `Arc`); share one per process.
///
/// ```
/// use std::sync::Arc;
/// use phi_types::{Keyring, LocalKek, MemoryKeyStore, KeyBytes};
///
/// let kek = LocalKek::new("local-1", &KeyBytes::new([7; 32]));
/// let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), Arc::new(kek)).build()?;
///
/// let keys = keyring.keys_for_seal("provider-17")?;
/// let sealed = keys.seal(&"Doe".to_string(), "cases.patient_last", b"C-1001")?;
/// assert_eq!(&sealed.as_bytes()[..2], &[0xF1, 0x01]);
///
/// let name: String = keyring.open(sealed, "provider-17", "cases.patient_last", b"C-1001")?;
/// assert_eq!(name, "Doe");
/// # Ok::<(), phi_types::Error>(())
/// ```
#[derive(Clone)]
pub struct Keyring {
    /// Shared by the application's clones only (not by the feed thread's
    /// short-lived handle): its drop, before `inner`'s, stops the feed
    /// thread and waits for it, so that the last clone's drop returns
    /// only after every connection of the keyring's is idle.
    handles: Option<Arc<Handles>>,
    inner: Arc<Inner>,
    /// [`Keyring::on_behalf_of`]: who the typed reads and writes made
    /// through this clone are for.
    accessor: Option<Arc<crate::access::Accessor>>,
    /// [`Keyring::for_operation`]: the operation the typed reads and
    /// writes made through this clone are recorded as.
    access_op: Option<crate::access::AccessOp>,
}

struct Inner {
    store: Arc<dyn KeyStore>,
    primary: Arc<dyn KeyEncryptionKey>,
    keks: HashMap<String, Arc<dyn KeyEncryptionKey>>,
    cache: Cache,
    clock: Arc<dyn Clock>,
    actor: String,
    counters: Counters,
    rollout: RwLock<Rollout>,
    strict: RwLock<std::collections::BTreeSet<String>>,
    audit: AuditWriter,
    misses: Misses,
    parallel_min_rows: usize,
    /// [`KeyringBuilder::legacy`].
    legacy: Option<Arc<dyn LegacyDecoder>>,
    rollout_policy: String,
    follower: Option<Arc<follow::Follower>>,
    name: String,
    owner_telemetry: OwnerIdTelemetry,
    /// [`KeyringBuilder::allow_owner_id_whitespace`].
    owner_id_whitespace: bool,
    /// Values sealed per (owner, version), not yet in the key store.
    seal_counts: seals::SealCounts,
    /// [`KeyringBuilder::rotation_policy`].
    rotation_policy: RwLock<RotationPolicy>,
    /// [`KeyringBuilder::access_log`], [`KeyringBuilder::require_accessor`].
    access: recording::AccessConfig,
    probes: Arc<readiness::Probes>,
}

/// How long dropping the last clone of a following keyring waits for its
/// feed thread to finish.
const FOLLOWER_EXIT_WAIT: Duration = Duration::from_secs(5);

/// What the application's clones of a keyring share: dropped with the
/// last of them.
///
/// The feed thread reads the feed through a handle of its own, which
/// keeps `Inner` alive while it reads. Were the stop left to `Inner`'s
/// drop, an application dropping its last clone during such a read would
/// go on (to `exit`, say) while the feed thread is still inside the
/// database client, and `Inner` would be dropped later on the feed
/// thread. Stopping the thread here, before the application's reference
/// to `Inner` goes, makes the last clone's drop wait for the read, then
/// drop `Inner` (its writers flushed, its pools closed) on the
/// application's thread.
struct Handles {
    follower: Option<Arc<follow::Follower>>,
}

impl Drop for Handles {
    fn drop(&mut self) {
        if let Some(follower) = &self.follower {
            follower.stop_and_wait(FOLLOWER_EXIT_WAIT);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(follower) = &self.follower {
            follower.stop_and_wait(FOLLOWER_EXIT_WAIT);
        }
        if let Err(error) = self.seal_counts.flush(self.store.as_ref()) {
            tracing::warn!(%error, "cannot record this keyring's last seal counts in the key store");
        }
    }
}

/// Whether a keyring follows the key-event feed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FeedChoice {
    /// Where the store has a feed ([`KeyStore::has_feed`](crate::KeyStore::has_feed)), every
    /// [`DEFAULT_FEED_INTERVAL`].
    Default,
    /// Every interval, whatever the store says.
    Follow(Duration),
    /// Never ([`KeyringBuilder::without_feed`]).
    Off,
}

/// Configures a [`Keyring`]; from [`Keyring::builder`].
#[must_use]
pub struct KeyringBuilder {
    store: Arc<dyn KeyStore>,
    primary: Arc<dyn KeyEncryptionKey>,
    keks: Vec<Arc<dyn KeyEncryptionKey>>,
    ttl: Duration,
    max_owners: usize,
    clock: Arc<dyn Clock>,
    actor: String,
    rollout: Rollout,
    unknown_version_ttl: Duration,
    audit_queue: usize,
    parallel_min_rows: usize,
    legacy: Option<Arc<dyn LegacyDecoder>>,
    rollout_policy: String,
    feed: FeedChoice,
    feed_max_staleness: Duration,
    name: String,
    owner_telemetry: OwnerIdTelemetry,
    feed_reader: Option<String>,
    owner_id_whitespace: bool,
    rotation_policy: RotationPolicy,
    access: recording::AccessConfig,
    readiness_timeout: Duration,
    kek_probe_interval: Duration,
}

impl fmt::Debug for KeyringBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyringBuilder")
            .field("primary", &self.primary.id())
            .field("ttl", &self.ttl)
            .field("max_owners", &self.max_owners)
            .finish_non_exhaustive()
    }
}

impl KeyringBuilder {
    /// Also unwrap data keys wrapped by `kek` (an older KEK during rotation).
    /// New data keys are always wrapped by the primary KEK.
    ///
    /// `kek` is a KEK by value or an `Arc` of one ([`IntoShared`](crate::IntoShared)).
    pub fn unwrap_with(mut self, kek: impl crate::IntoShared<dyn KeyEncryptionKey>) -> Self {
        self.keks.push(kek.into_shared());
        self
    }

    /// How long an unwrapped data key stays cached (default 24 h).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How many owners the cache holds before evicting the least recently
    /// loaded (default 10,000).
    pub fn max_owners(mut self, max: usize) -> Self {
        self.max_owners = max;
        self
    }

    /// The clock for TTLs (tests use a [`ManualClock`]).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Who the audit records name as actor (default `"phi"`).
    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = actor.into();
        self
    }

    /// Which owners' new rows are sealed, for models with an encrypted flag
    /// (default [`Rollout::All`]); changeable later with
    /// [`Keyring::set_rollout`].
    pub fn rollout(mut self, rollout: Rollout) -> Self {
        self.rollout = rollout;
        self
    }

    /// How long a key version an owner was found not to have (after one
    /// reload of the owner's keys) is remembered (default 30 s; zero: not
    /// remembered). Meanwhile opening a value that names it fails with
    /// [`Error::UnknownKeyVersion`] at once, without querying the key store
    /// or unwrapping again: a tampered or foreign header costs one reload per
    /// owner and version per interval, however many rows carry it. A version
    /// rotated in by another process is never affected in practice: its key
    /// row is committed before any value sealed under it can be read.
    pub fn unknown_version_ttl(mut self, ttl: Duration) -> Self {
        self.unknown_version_ttl = ttl;
        self
    }

    /// How many `unwrap` audit records may wait for the background writer
    /// (default 65,536). Beyond that, records are dropped, counted in
    /// [`KeyringStats::audit_dropped`] and logged; reads never wait.
    pub fn audit_queue(mut self, records: usize) -> Self {
        self.audit_queue = records;
        self
    }

    /// Batches of at least this many rows are sealed and opened
    /// (`seal_all`, `open_all`, `load`) on the rayon thread pool, all
    /// available cores; smaller ones on the calling thread (default
    /// [`PARALLEL_MIN_ROWS`](crate::record::PARALLEL_MIN_ROWS), 512).
    /// `usize::MAX` keeps every batch on the calling thread: for an
    /// application that wants phi to start no threads of its own (an
    /// async server already using every core, or a restricted sandbox).
    pub fn parallel_min_rows(mut self, rows: usize) -> Self {
        self.parallel_min_rows = rows;
        self
    }

    /// Reads values stored before phi in an encrypted format of their own
    /// (Fernet tokens, versioned AES-GCM, the application's format) with
    /// `decoder` during the roll-out: [`PhiRecord::load`](crate::PhiRecord::load)
    /// and `load_async` open a flag-off row's value with it when
    /// `phi_legacy_values` records exactly that value for that row, column
    /// and owner, so the application reads plaintext before the backfill
    /// has sealed the row; the backfill uses it too when its options name
    /// no decoder. Every other value is read as it is stored. See
    /// [`crate::legacy`] (the read path, what it costs, and the rule that
    /// keeps it from decoding values an application wrote).
    pub fn legacy(mut self, decoder: Arc<dyn LegacyDecoder>) -> Self {
        self.legacy = Some(decoder);
        self
    }

    /// Follows the key-event feed ([`crate::feed`]) and the fleet's
    /// roll-out policy, reading the feed every
    /// [`DEFAULT_FEED_INTERVAL`] (see [`feed_interval`](Self::feed_interval)).
    ///
    /// **This is the default** over a store that keeps the feed
    /// ([`KeyStore::has_feed`](crate::KeyStore::has_feed): a [`DieselKeyStore`](crate::DieselKeyStore),
    /// whose migrations create its tables), so that a shred, a rotation or
    /// a roll-out change made anywhere reaches every process without
    /// configuration; [`without_feed`](Self::without_feed) opts out. Called
    /// explicitly, it also follows a store that does not say it has a feed
    /// (a [`MemoryKeyStore`](crate::MemoryKeyStore) shared in one process),
    /// and [`build`](Self::build) fails when the store cannot be read as
    /// one.
    ///
    /// A thread of the keyring's reads the events after its position (the
    /// feed's head when it is built) with one query per interval and
    /// applies each: a shredded, rotated, retired or rewrapped owner and a
    /// cleared owner are dropped from the cache (the next use loads them
    /// from the key store: a shredded owner then refuses to seal and opens
    /// nothing); a fleet-wide clear drops every owner; a roll-out change
    /// is read from `phi_rollout` and applied; an event of a kind this
    /// build does not know drops the owner it names, or every owner. At
    /// build the stored roll-out policy, if one was ever set, replaces
    /// [`rollout`](Self::rollout). The thread stops when the last clone of
    /// the keyring is dropped (dropping never waits for it).
    ///
    /// When the feed cannot be read the keyring keeps serving from its
    /// cache; each failure is logged with how stale the keyring is and
    /// counted (`phi_feed_read_errors_total`, `phi_feed_staleness_seconds`).
    /// Past [`feed_max_staleness`](Self::feed_max_staleness) without a
    /// successful read (measured on the keyring's [`clock`](Self::clock)),
    /// every write is refused with [`Error::FeedStale`]: seals, and the
    /// writes of a model with an encrypted flag that would store a row
    /// unsealed because the roll-out leaves its owner out. Which owners
    /// another process shredded, rotated or moved into or out of the
    /// roll-out meanwhile is exactly what the keyring cannot know, so it
    /// refuses for all of them rather than seal under a destroyed or
    /// superseded key or write plaintext for an owner the fleet now seals.
    /// Before refusing, a stale keyring reads the feed once on the calling
    /// thread (at most once per interval after a failed read): a feed that
    /// is back lifts the refusal at once. Opening goes on: refusing reads
    /// would turn a feed outage into an application outage, and a shredded
    /// owner's values still stop opening once the cached keys are dropped
    /// (on the next successful read, or when their TTL expires).
    pub fn follow_feed(mut self) -> Self {
        if !matches!(self.feed, FeedChoice::Follow(_)) {
            self.feed = FeedChoice::Follow(DEFAULT_FEED_INTERVAL);
        }
        self
    }

    /// Does not follow the key-event feed, even over a store that has one
    /// (see [`follow_feed`](Self::follow_feed), the default there). Such a
    /// keyring learns of another process's shred, rotation or roll-out
    /// change only when its cached keys expire ([`ttl`](Self::ttl), 24 h by
    /// default): for one-shot tools and tests that must start no thread,
    /// not for a long-running process sharing the key store.
    pub fn without_feed(mut self) -> Self {
        self.feed = FeedChoice::Off;
        self
    }

    /// Follows the key-event feed (as [`follow_feed`](Self::follow_feed)),
    /// reading it every `interval`: a change made anywhere in the fleet
    /// reaches this keyring within about `interval` plus one query.
    pub fn feed_interval(mut self, interval: Duration) -> Self {
        self.feed = FeedChoice::Follow(interval);
        self
    }

    /// How long a following keyring goes on sealing without a successful
    /// read of the feed (default [`DEFAULT_FEED_MAX_STALENESS`]).
    pub fn feed_max_staleness(mut self, max: Duration) -> Self {
        self.feed_max_staleness = max;
        self
    }

    /// The name under which a following keyring records how far it has
    /// read the feed (`phi_feed_readers`, shown by `phi keys status` and
    /// the admin API's `GET /key-status`); default `host:pid`. At most 255
    /// bytes; give each process its own.
    pub fn feed_reader(mut self, name: impl Into<String>) -> Self {
        self.feed_reader = Some(name.into());
        self
    }

    /// The name of the fleet roll-out policy (`phi_rollout.policy`) this
    /// keyring follows and [`lifecycle::set_rollout`](crate::lifecycle::set_rollout)
    /// changes (default [`DEFAULT_ROLLOUT_POLICY`]): applications sharing
    /// one database can each have their own.
    pub fn rollout_policy(mut self, name: impl Into<String>) -> Self {
        self.rollout_policy = name.into();
        self
    }

    /// The keyring's name in its metrics (the `keyring` label of
    /// `phi_cache_owners`; default `"default"`): two keyrings in one process
    /// need two names, or their gauges overwrite each other.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Where the access records of this keyring's typed reads and writes
    /// go (see [`crate::access`]): one [`AccessRecord`](crate::access::AccessRecord)
    /// per (accessor, operation, owner, table, row), appended once per call
    /// (a load, an insert, an update) before its result is returned. An
    /// `append` that fails fails the call: a fail-closed log refuses reads
    /// while it cannot write. Without a log (the default) records are only
    /// built when the `tracing` target [`phi::access`](crate::access::TRACING_TARGET)
    /// is enabled.
    ///
    /// `log` is a log by value or an `Arc` of one ([`IntoShared`](crate::IntoShared)).
    pub fn access_log(mut self, log: impl crate::IntoShared<dyn crate::access::AccessLog>) -> Self {
        self.access.log = Some(log.into_shared());
        self
    }

    /// Strict access logging (default off): every typed open and seal
    /// (loads, `open_*`, inserts, updates, finders, blind-index helpers,
    /// [`Keyring::seal`] and [`Keyring::open`]) on a keyring not seen
    /// [on behalf of](Keyring::on_behalf_of) an accessor fails with
    /// [`Error::AccessorRequired`] naming the operation and table, before
    /// any key is resolved: nothing escapes the log. Jobs (backfill,
    /// verify, decrypt-back, re-seal, lookup re-index) are recorded under
    /// the keyring's [`actor`](Self::actor) when no accessor is given.
    ///
    /// [`OwnerKeys`] (from [`Keyring::keys_for_open`],
    /// [`Keyring::keys_for_seal`] and their batch forms) is the key-level
    /// interface below the typed API: its `seal` and `open` are neither
    /// recorded nor refused. An application that proves its accesses with
    /// this setting keeps `OwnerKeys` out of its request paths.
    pub fn require_accessor(mut self, required: bool) -> Self {
        self.access.require_accessor = required;
        self
    }

    /// How owner ids appear in this keyring's tracing spans and log events
    /// (and in those of the life-cycle jobs run with it): in clear (the
    /// default), hashed, or omitted. See [`OwnerIdTelemetry`] for what
    /// hashing does and does not hide.
    pub fn owner_ids_in_telemetry(mut self, mode: OwnerIdTelemetry) -> Self {
        self.owner_telemetry = mode;
        self
    }

    /// Whether owner ids may begin or end with whitespace, or hold a
    /// whitespace control character (tab, line feed, carriage return, …)
    /// anywhere (default: no).
    ///
    /// By default every entry that takes an owner id (sealing, opening, key
    /// resolution, the [`lifecycle`](crate::lifecycle) operations, the admin
    /// API and the CLI all reach [`Keyring::check_owner_id`]) refuses, with
    /// [`Error::InvalidInput`] naming the owner, an id that is empty, longer
    /// than [`MAX_OWNER_LEN`] bytes, begins with [`RESERVED_OWNER_PREFIX`],
    /// begins or ends with whitespace (Unicode `White_Space`), or contains a
    /// control character. `"acme "` is almost always `"acme"` mistyped or
    /// badly trimmed, and a database that pads (MySQL / MariaDB PAD SPACE
    /// collations, `CHAR` columns) takes the two as one owner in the
    /// application's own tables.
    ///
    /// `true` is for a population whose owner ids already have such
    /// whitespace: they are then taken as they are, byte for byte, in the
    /// key tables (phi's migrations make those compare bytes on every
    /// backend) and in every envelope's binding: `"acme"` and `"acme "` are
    /// two owners, with two data keys and distinct blind indexes, and
    /// shredding one leaves the other readable. Make the application's
    /// owner column compare bytes too (on MySQL / MariaDB, `VARBINARY` or a
    /// NO PAD binary collation; see [`PhiRecord`](crate::PhiRecord)), or
    /// its queries by owner find both. Control characters that are not
    /// whitespace (NUL, escape, …) are refused either way.
    pub fn allow_owner_id_whitespace(mut self, allow: bool) -> Self {
        self.owner_id_whitespace = allow;
        self
    }

    /// When an owner's current data key is due for rotation (default:
    /// [`RotationPolicy::default`], no age limit and a budget of
    /// [`DEFAULT_MAX_SEALS_PER_KEY`] seals): what
    /// [`lifecycle::due_keys`](crate::lifecycle::due_keys) lists and
    /// `phi keys due` shows.
    pub fn rotation_policy(mut self, policy: RotationPolicy) -> Self {
        self.rotation_policy = policy;
        self
    }

    /// Builds the keyring, after checking every configured KEK against the
    /// key store: a KEK id names exactly one key. The first keyring built
    /// with a KEK stores its check value (`kek_check_values`); a KEK whose
    /// key material does not match the stored value (or, in a store from
    /// before check values, opens none of the data keys stored under its
    /// id) is refused, and nothing is written.
    ///
    /// # Errors
    /// [`Error::Config`] for a zero TTL, cache size or audit queue, two
    /// different KEKs with one id, or when the audit writer thread cannot be
    /// started; [`Error::KekMismatch`] for a KEK that is not the key the
    /// store knows under its id; [`Error::KekCheck`] when a KEK cannot be
    /// checked (a KMS unreachable); key store errors.
    pub fn build(self) -> Result<Keyring> {
        crate::metrics::describe();
        if self.ttl.is_zero() {
            return Err(Error::Config("the key cache TTL must be positive".into()));
        }
        if self.max_owners == 0 {
            return Err(Error::Config(
                "the key cache must hold at least one owner".into(),
            ));
        }
        if self.audit_queue == 0 {
            return Err(Error::Config(
                "the audit queue must hold at least one record".into(),
            ));
        }
        self.rotation_policy.check()?;
        if self.readiness_timeout.is_zero() {
            return Err(Error::Config(
                "the readiness check's timeout must be positive".into(),
            ));
        }
        let mut keks: HashMap<String, Arc<dyn KeyEncryptionKey>> = HashMap::new();
        for kek in std::iter::once(self.primary.clone()).chain(self.keks) {
            if let Some(existing) = keks.get(kek.id())
                && !Arc::ptr_eq(existing, &kek)
            {
                return Err(Error::Config(format!(
                    "two KEKs are configured with the id {:?}",
                    kek.id()
                )));
            }
            keks.insert(kek.id().to_owned(), kek);
        }
        let mut checked: Vec<&Arc<dyn KeyEncryptionKey>> = keks
            .values()
            .filter(|k| k.id() != self.primary.id())
            .collect();
        checked.sort_by(|a, b| a.id().cmp(b.id()));
        checked.insert(0, &self.primary);
        check::verify_keks(self.store.as_ref(), &checked)?;
        if self.rollout_policy.is_empty() || self.rollout_policy.len() > 64 {
            return Err(Error::Config(format!(
                "the roll-out policy name must be 1 to 64 bytes long, not {}",
                self.rollout_policy.len()
            )));
        }
        if self.name.is_empty() || self.name.len() > 64 {
            return Err(Error::Config(format!(
                "the keyring name must be 1 to 64 bytes long, not {}",
                self.name.len()
            )));
        }
        let mut rollout = self.rollout;
        let interval = match self.feed {
            FeedChoice::Follow(interval) => Some(interval),
            FeedChoice::Default if self.store.has_feed() => Some(DEFAULT_FEED_INTERVAL),
            FeedChoice::Default | FeedChoice::Off => None,
        };
        let follower = match interval {
            None => None,
            Some(interval) => {
                if interval.is_zero() {
                    return Err(Error::Config(
                        "the key-event feed interval must be positive".into(),
                    ));
                }
                let reader = self.feed_reader.unwrap_or_else(follow::default_reader);
                if reader.is_empty() || reader.len() > 255 {
                    return Err(Error::Config(format!(
                        "the feed reader name must be 1 to 255 bytes long, not {}",
                        reader.len()
                    )));
                }
                // Listening before reading the head: no notification of a
                // change after it is missed (and the interval's read would
                // catch it anyway).
                let listener = match self.store.feed_listener() {
                    Ok(listener) => listener,
                    Err(error) => {
                        tracing::warn!(%error, "cannot listen to the key-event feed: reading it once per interval only");
                        None
                    }
                };
                // The head first: a change committed after it is read
                // again, never missed.
                let head = self.store.feed_head().map_err(|error| {
                    if matches!(self.feed, FeedChoice::Default) {
                        Error::Config(format!(
                            "cannot read the key-event feed, which a keyring follows by default \
                             (are phi's migrations run, and may this login read phi_key_feed, \
                             phi_key_events and phi_rollout?); opt out with \
                             KeyringBuilder::without_feed: {error}"
                        ))
                    } else {
                        error
                    }
                })?;
                if let Some(stored) = self.store.fleet_rollout(&self.rollout_policy)? {
                    rollout = stored;
                }
                Some((
                    Arc::new(follow::Follower::new(
                        interval,
                        self.feed_max_staleness,
                        head,
                        reader,
                        self.clock.clone(),
                    )),
                    listener,
                ))
            }
        };
        let audit = AuditWriter::start(self.store.clone(), self.audit_queue, self.owner_telemetry)?;
        let keyring = Keyring {
            handles: Some(Arc::new(Handles {
                follower: follower.as_ref().map(|(f, _)| f.clone()),
            })),
            accessor: None,
            access_op: None,
            inner: Arc::new(Inner {
                primary: self.primary,
                keks,
                cache: Cache::new(self.ttl, self.max_owners),
                clock: self.clock,
                actor: self.actor,
                counters: Counters::default(),
                rollout: RwLock::new(rollout),
                strict: RwLock::default(),
                audit,
                misses: Misses::new(self.unknown_version_ttl, self.max_owners),
                parallel_min_rows: self.parallel_min_rows,
                legacy: self.legacy,
                rollout_policy: self.rollout_policy,
                follower: follower.as_ref().map(|(f, _)| f.clone()),
                name: self.name,
                owner_telemetry: self.owner_telemetry,
                owner_id_whitespace: self.owner_id_whitespace,
                seal_counts: seals::SealCounts::new(self.store.counts_seals()),
                rotation_policy: RwLock::new(self.rotation_policy),
                store: self.store,
                access: self.access,
                probes: Arc::new(readiness::Probes::new(
                    self.readiness_timeout,
                    self.kek_probe_interval,
                )),
            }),
        };
        if let Some((follower, listener)) = follower {
            follow::start(&keyring.inner, follower, listener)?;
        }
        Ok(keyring)
    }
}

/// Why an owner is being resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    /// Opening values: the owner's existing keys, none created.
    Open,
    /// Sealing values: an active key is needed, created if the owner has none.
    Seal,
}

impl Keyring {
    /// Starts configuring a keyring over `store`, wrapping new data keys with
    /// `kek`.
    ///
    /// Each is taken by value or as an `Arc` (of the concrete type or of the
    /// trait object): see [`IntoShared`](crate::IntoShared).
    ///
    /// ```
    /// use phi_types::{KeyBytes, Keyring, LocalKek, MemoryKeyStore};
    ///
    /// let kek = LocalKek::new("local-1", &KeyBytes::new([7; 32]));
    /// let keyring = Keyring::builder(MemoryKeyStore::new(), kek).build()?;
    /// # Ok::<(), phi_types::Error>(())
    /// ```
    pub fn builder(
        store: impl crate::IntoShared<dyn KeyStore>,
        kek: impl crate::IntoShared<dyn KeyEncryptionKey>,
    ) -> KeyringBuilder {
        KeyringBuilder {
            store: store.into_shared(),
            primary: kek.into_shared(),
            keks: Vec::new(),
            ttl: DEFAULT_TTL,
            max_owners: DEFAULT_MAX_OWNERS,
            clock: Arc::new(SystemClock),
            actor: "phi".to_owned(),
            rollout: Rollout::All,
            unknown_version_ttl: DEFAULT_UNKNOWN_VERSION_TTL,
            audit_queue: DEFAULT_AUDIT_QUEUE,
            parallel_min_rows: PARALLEL_MIN_ROWS,
            legacy: None,
            rollout_policy: DEFAULT_ROLLOUT_POLICY.to_owned(),
            feed: FeedChoice::Default,
            feed_max_staleness: DEFAULT_FEED_MAX_STALENESS,
            name: DEFAULT_KEYRING_NAME.to_owned(),
            owner_telemetry: OwnerIdTelemetry::default(),
            feed_reader: None,
            owner_id_whitespace: false,
            rotation_policy: RotationPolicy::default(),
            access: recording::AccessConfig::default(),
            readiness_timeout: readiness::DEFAULT_READINESS_TIMEOUT,
            kek_probe_interval: readiness::DEFAULT_KEK_PROBE_INTERVAL,
        }
    }

    /// Checks `owner` as every entry of this keyring that takes an owner id
    /// does (see [`KeyringBuilder::allow_owner_id_whitespace`] for the
    /// rules): for an application that validates owner ids at its own edge.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the owner (Debug-escaped, so that
    /// whitespace shows) and what is wrong with it.
    pub fn check_owner_id(&self, owner: &str) -> Result<()> {
        check_owner(owner, false, self.inner.owner_id_whitespace)
    }

    /// [`check_owner_id`](Self::check_owner_id) for the life-cycle
    /// operations, which also take phi's own owners
    /// ([`RESERVED_OWNER_PREFIX`]).
    pub(crate) fn check_owner_id_or_reserved(&self, owner: &str) -> Result<()> {
        check_owner(owner, true, self.inner.owner_id_whitespace)
    }

    /// The keyring's name in its metrics ([`KeyringBuilder::name`]).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// An error's text for a log event: its full cause chain while owner
    /// ids are written in clear; otherwise only its kind, since error
    /// messages name the owner.
    pub(crate) fn error_for_telemetry(&self, error: &Error) -> String {
        match self.inner.owner_telemetry {
            OwnerIdTelemetry::Plain => crate::error::chain_text(error),
            _ => format!(
                "{:?} error (details withheld: owner ids are not logged)",
                error.kind()
            ),
        }
    }

    /// `owner` as this keyring writes it into tracing spans and log events
    /// ([`KeyringBuilder::owner_ids_in_telemetry`]): for an application's
    /// own logs that should follow the same rule.
    pub fn owner_for_telemetry<'o>(&self, owner: &'o str) -> TelemetryOwner<'o> {
        self.inner.owner_telemetry.render(owner)
    }

    /// Rows from which a batch is sealed or opened on several threads (see
    /// [`KeyringBuilder::parallel_min_rows`]).
    pub fn parallel_min_rows(&self) -> usize {
        self.inner.parallel_min_rows
    }

    /// The decoder of legacy values ([`KeyringBuilder::legacy`]), if any.
    pub fn legacy_decoder(&self) -> Option<&Arc<dyn LegacyDecoder>> {
        self.inner.legacy.as_ref()
    }

    /// The owner's keys for sealing: an active data key is created (and
    /// committed to the key store) if the owner has none.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an unusable owner id;
    /// [`Error::Shredded`] for a crypto-shredded owner (no key is created
    /// for it again); key store and KEK errors.
    pub fn keys_for_seal(&self, owner: &str) -> Result<Arc<OwnerKeys>> {
        self.check_feed(owner)?;
        self.resolve_one(owner, Purpose::Seal, false)
    }

    /// The owner's existing keys, for opening. Never creates a key: an owner
    /// without one gets an empty set, and opening then fails with
    /// [`Error::UnknownKeyVersion`]; a crypto-shredded owner gets an empty
    /// set too, and opening any of its values fails with
    /// [`Error::Shredded`].
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an unusable owner id; key store and KEK
    /// errors.
    pub fn keys_for_open(&self, owner: &str) -> Result<Arc<OwnerKeys>> {
        self.resolve_one(owner, Purpose::Open, false)
    }

    /// Resolves many owners for opening at once: one key-store query for all
    /// cache misses, one unwrap per data key not cached.
    ///
    /// # Errors
    /// The first error met; the other owners resolved meanwhile stay cached.
    pub fn keys_for_open_many<'a>(
        &self,
        owners: impl IntoIterator<Item = &'a str>,
    ) -> Result<HashMap<String, Arc<OwnerKeys>>> {
        self.resolve_many(owners, Purpose::Open, false)
    }

    /// Resolves many owners for sealing at once, creating data keys for
    /// those that have none.
    ///
    /// # Errors
    /// The first error met; the other owners resolved meanwhile stay cached.
    pub fn keys_for_seal_many<'a>(
        &self,
        owners: impl IntoIterator<Item = &'a str>,
    ) -> Result<HashMap<String, Arc<OwnerKeys>>> {
        let owners: Vec<&str> = owners.into_iter().collect();
        if let Some(first) = owners.first() {
            self.check_feed(first)?;
        }
        self.resolve_many(owners, Purpose::Seal, false)
    }

    /// Refuses writing past the feed's maximum staleness. A stale keyring
    /// first reads the feed once on this thread (unless a read failed
    /// within the last interval): a feed that is back lifts the refusal.
    pub(crate) fn check_feed(&self, owner: &str) -> Result<()> {
        let Some(follower) = &self.inner.follower else {
            return Ok(());
        };
        if follower.check_fresh(owner).is_ok() {
            return Ok(());
        }
        if follower.may_catch_up() {
            self.read_feed_now();
        }
        follower.check_fresh(owner)
    }

    /// Whether a write of a model with an encrypted flag seals `owner`'s
    /// row under the roll-out policy ([`encrypts_for`](Self::encrypts_for)),
    /// refusing when the keyring follows the key-event feed and is past its
    /// maximum staleness: then the roll-out it would go by may be out of
    /// date, and a row written unsealed for an owner the fleet has moved
    /// into the roll-out is plaintext where ciphertext was expected. The
    /// derive's write paths ask this.
    ///
    /// # Errors
    /// [`Error::FeedStale`] past the maximum staleness, whatever the answer
    /// would have been.
    pub fn encrypts_for_write(&self, owner: &str) -> Result<bool> {
        self.check_feed(owner)?;
        Ok(self.encrypts_for(owner))
    }

    /// [`encrypts_for_write`](Self::encrypts_for_write) for async code: a
    /// stale keyring refuses without reading the feed on the calling task
    /// (its thread reads it).
    pub(crate) fn encrypts_for_write_nonblocking(&self, owner: &str) -> Result<bool> {
        self.check_feed_nonblocking(owner)?;
        Ok(self.encrypts_for(owner))
    }

    /// [`check_feed`](Self::check_feed) without the read: for async code.
    pub(crate) fn check_feed_nonblocking(&self, owner: &str) -> Result<()> {
        match &self.inner.follower {
            Some(follower) => follower.check_fresh(owner),
            None => Ok(()),
        }
    }

    /// Where this keyring stands in the key-event feed, when it follows it
    /// ([`KeyringBuilder::follow_feed`], the default over a store with a
    /// feed); `None` when it does not.
    pub fn feed_status(&self) -> Option<FeedStatus> {
        self.inner.follower.as_ref().map(|f| f.status())
    }

    /// Reads the key-event feed now, on the calling thread, and applies
    /// what is new (the thread does this every interval); returns how many
    /// events were applied. `0` for a keyring that does not follow the feed.
    pub fn sync_feed(&self) -> u64 {
        self.read_feed_now()
    }

    /// The name of the fleet roll-out policy this keyring follows
    /// ([`KeyringBuilder::rollout_policy`]).
    pub fn rollout_policy(&self) -> &str {
        &self.inner.rollout_policy
    }

    /// Seals `value` for `owner`, `scope` and `row` under the owner's current
    /// data key, creating one if the owner has none.
    ///
    /// # Errors
    /// As [`keys_for_seal`](Self::keys_for_seal) and [`OwnerKeys::seal`];
    /// access recording as for [`open`](Self::open) (operation `insert`).
    pub fn seal<T: PhiValue>(
        &self,
        value: &T,
        owner: &str,
        scope: &str,
        row: &[u8],
    ) -> Result<Encrypted<T>> {
        let access =
            self.begin_scoped_access(crate::access::AccessOp::Insert, owner, scope, row)?;
        let sealed = self.keys_for_seal(owner)?.seal(value, scope, row)?;
        self.finish_access(access)?;
        Ok(sealed)
    }

    /// Opens `value` for `owner`, `scope` and `row` with the key version
    /// named in its header. A version not yet cached (rotated by another
    /// process) reloads the owner once; a version the reload did not find
    /// either is refused without another reload for
    /// [`KeyringBuilder::unknown_version_ttl`].
    ///
    /// # Errors
    /// As [`OwnerKeys::open`]. Recorded in the access log as a `read` of
    /// the scope's table, field the scope's column, row the row key (as
    /// UTF-8 text, else `0x` and hex); [`Error::AccessorRequired`] under
    /// [`KeyringBuilder::require_accessor`] without an accessor; the log's
    /// error when it refuses the record (nothing is returned).
    pub fn open<T: PhiValue>(
        &self,
        value: Encrypted<T>,
        owner: &str,
        scope: &str,
        row: &[u8],
    ) -> Result<T> {
        let access = self.begin_scoped_access(crate::access::AccessOp::Read, owner, scope, row)?;
        let since = self.fill_mark();
        let mut keys = self.keys_for_open(owner)?;
        if let Ok(header) = value.header() {
            let version = [header.key_version];
            if self.needs_reload(&keys, &version, since) {
                let mut reloaded = self.reload_for_open(&[(owner, &version)])?;
                if let Some(fresh) = reloaded.remove(owner) {
                    keys = fresh;
                }
            }
        }
        let opened = keys.open(value, scope, row)?;
        self.finish_access(access)?;
        Ok(opened)
    }

    /// Waits until every `unwrap` audit record queued so far is written (or
    /// given up on). Audit records of cache fills are written in the
    /// background; this is for tests, and for a shutdown that must know.
    /// On SQLite, do not call it inside a write transaction of the
    /// application's: the writes would wait for it.
    ///
    /// # Errors
    /// [`Error::Store`] when records could not be written since the last
    /// flush (the queue was full, or the key store refused the write): how
    /// many, and the last reason. They are also counted in
    /// [`KeyringStats::audit_dropped`].
    pub fn flush_audit(&self) -> Result<()> {
        self.inner.audit.flush()
    }

    /// A mark of the cache fills so far: keys whose fill is later were
    /// loaded from the key store after the mark was taken.
    pub(crate) fn fill_mark(&self) -> u64 {
        self.inner.counters.fills.load(Ordering::SeqCst)
    }

    /// Whether `keys` lack one of `versions` that a reload might find: not
    /// when the keys were loaded since `since` (a [`fill_mark`](Self::fill_mark)
    /// taken before the values were asked for), nor for a version found
    /// missing recently (counted).
    pub(crate) fn needs_reload(&self, keys: &OwnerKeys, versions: &[u32], since: u64) -> bool {
        let mut now = None;
        let mut reload = false;
        if keys.shredded {
            // Final: a shredded owner never gets a key again.
            return false;
        }
        for &version in versions {
            if keys.dek(version).is_some() {
                continue;
            }
            let now = *now.get_or_insert_with(|| self.inner.clock.now());
            if keys.fill > since {
                // Just loaded: a reload would find what this load found.
                self.missed(&keys.owner, version, now);
            } else if self.inner.misses.remembered(&keys.owner, version, now) {
                self.inner
                    .counters
                    .unknown_versions_remembered
                    .fetch_add(1, Ordering::Relaxed);
                crate::metrics::add(crate::metrics::UNKNOWN_KEY_VERSION_REMEMBERED_TOTAL, 1);
            } else {
                reload = true;
            }
        }
        reload
    }

    /// Reloads owners whose values name versions their cached keys lack
    /// (added by another process's rotation, say), and remembers the
    /// versions the reload did not find either.
    pub(crate) fn reload_for_open(
        &self,
        wanted: &[(&str, &[u32])],
    ) -> Result<HashMap<String, Arc<OwnerKeys>>> {
        for (owner, _) in wanted {
            self.inner.cache.remove(owner);
        }
        let reloads = wanted.len() as u64;
        self.inner
            .counters
            .version_reloads
            .fetch_add(reloads, Ordering::Relaxed);
        crate::metrics::add(crate::metrics::KEY_VERSION_RELOADS_TOTAL, reloads);
        let keys = self.keys_for_open_many(wanted.iter().map(|(owner, _)| *owner))?;
        let now = self.inner.clock.now();
        for (owner, versions) in wanted {
            let Some(found) = keys.get(*owner) else {
                continue;
            };
            for &version in *versions {
                if found.dek(version).is_none() {
                    self.missed(owner, version, now);
                }
            }
        }
        Ok(keys)
    }

    /// Remembers, and logs, that `owner`'s keys fresh from the store lack
    /// `version`.
    fn missed(&self, owner: &str, version: u32, now: Instant) {
        tracing::warn!(
            owner = %self.owner_for_telemetry(owner),
            version,
            "a value names a data key version its owner does not have"
        );
        self.inner.misses.remember(owner, version, now);
    }

    /// The rotation policy ([`KeyringBuilder::rotation_policy`]).
    pub fn rotation_policy(&self) -> RotationPolicy {
        *self
            .inner
            .rotation_policy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the rotation policy, for this keyring and its clones (a
    /// command line's options over an application's keyring, say).
    ///
    /// # Errors
    /// [`Error::Config`] for a limit of zero or a seal budget above
    /// [`NONCE_BUDGET`] (nothing changed).
    pub fn set_rotation_policy(&self, policy: RotationPolicy) -> Result<()> {
        policy.check()?;
        *self
            .inner
            .rotation_policy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = policy;
        Ok(())
    }

    /// Adds the values this keyring sealed since the last flush, per
    /// (owner, data key version), to the key store's counts
    /// (`phi_seal_counts`). A following keyring does it once per feed
    /// interval, and the drop of its last clone once more; call it before
    /// an exit that skips the drop. Returns how many seals were recorded.
    /// Nothing is counted over a store that does not record counts
    /// ([`KeyStore::counts_seals`](crate::KeyStore::counts_seals)).
    ///
    /// # Errors
    /// [`Error::Store`] when the counts could not be written: they are kept
    /// for the next flush.
    pub fn flush_seal_counts(&self) -> Result<u64> {
        self.inner.seal_counts.flush(self.inner.store.as_ref())
    }

    /// The values this keyring sealed per (owner, data key version) and
    /// has not flushed yet.
    pub fn unflushed_seal_counts(&self) -> Vec<crate::store::SealCount> {
        self.inner.seal_counts.pending()
    }

    /// The current time (UTC) on the keyring's [`Clock`]: what key ages
    /// are measured against.
    pub fn utc_now(&self) -> chrono::NaiveDateTime {
        self.inner.clock.utc_now()
    }

    /// Counters since this keyring was built.
    pub fn stats(&self) -> KeyringStats {
        let cache = &self.inner.cache.counters;
        let own = &self.inner.counters;
        let audit = self.inner.audit.counts();
        KeyringStats {
            hits: cache.hits.load(Ordering::Relaxed),
            misses: cache.misses.load(Ordering::Relaxed),
            unwraps: own.unwraps.load(Ordering::Relaxed),
            creations: own.creations.load(Ordering::Relaxed),
            evictions: cache.evictions.load(Ordering::Relaxed),
            expirations: cache.expirations.load(Ordering::Relaxed),
            store_queries: own.store_queries.load(Ordering::Relaxed),
            key_loads: own.key_loads.load(Ordering::Relaxed),
            audit_written: audit.written,
            audit_pending: audit.pending,
            audit_dropped: audit.dropped,
            version_reloads: own.version_reloads.load(Ordering::Relaxed),
            unknown_versions_remembered: own.unknown_versions_remembered.load(Ordering::Relaxed),
            cached_owners: self.inner.cache.len(),
        }
    }

    /// Drops one owner's cached keys; the next use unwraps again. Returns
    /// whether the owner was cached.
    pub fn clear(&self, owner: &str) -> bool {
        self.inner.misses.forget(owner);
        let removed = self.inner.cache.remove(owner);
        crate::metrics::cache_owners(&self.inner.name, self.inner.cache.len());
        removed
    }

    /// Drops every cached key.
    pub fn clear_all(&self) {
        self.inner.misses.clear();
        self.inner.cache.clear();
        crate::metrics::cache_owners(&self.inner.name, 0);
    }

    /// Loads the given owners' keys into the cache (e.g. at start-up).
    ///
    /// # Errors
    /// As [`keys_for_open_many`](Self::keys_for_open_many).
    pub fn warm<'a>(&self, owners: impl IntoIterator<Item = &'a str>) -> Result<usize> {
        self.resolve_many(owners, Purpose::Open, false)
            .map(|m| m.len())
    }

    /// Loads every owner in the key store into the cache, up to the cache's
    /// size bound. An owner whose keys cannot be unwrapped (a KEK not
    /// configured here, say) is reported, not fatal: the others are warmed.
    ///
    /// # Errors
    /// Only when the key store cannot list its owners.
    pub fn warm_all(&self) -> Result<WarmReport> {
        self.count_query();
        let owners = self.inner.store.owners()?;
        let mut report = WarmReport::default();
        for chunk in owners.chunks(1_000) {
            for (owner, result) in
                self.resolve_each(chunk.iter().map(String::as_str), Purpose::Open, true)
            {
                match result {
                    Ok(_) => report.warmed += 1,
                    Err(error) => {
                        tracing::warn!(
                            owner = %self.owner_for_telemetry(&owner),
                            error = %self.error_for_telemetry(&error),
                            "cannot warm an owner's keys"
                        );
                        report.failures.push((owner, error));
                    }
                }
            }
        }
        Ok(report)
    }

    /// Whether new rows of `owner` are sealed under the roll-out policy (for
    /// models with an encrypted flag; others are always sealed).
    pub fn encrypts_for(&self, owner: &str) -> bool {
        self.inner
            .rollout
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .encrypts(owner)
    }

    /// The current roll-out policy.
    pub fn rollout(&self) -> Rollout {
        self.inner
            .rollout
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the roll-out policy; later writes follow it.
    pub fn set_rollout(&self, rollout: Rollout) {
        *self
            .inner
            .rollout
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = rollout;
    }

    /// Makes `tables` strict, replacing the tables strict before: the end
    /// of a table's adoption, once [`migrate::backfill`](crate::migrate::backfill)
    /// has sealed every row and [`migrate::verify`](crate::migrate::verify)
    /// passes. On a strict table, for a model with an encrypted flag:
    ///
    /// - reading a row whose flag is off ([`PhiRecord::load`](crate::PhiRecord::load),
    ///   `open_all`, `open_each`, their async forms) is [`Error::Strict`]
    ///   naming the table, the flag column, the row and its owner, instead
    ///   of the row's plain values;
    /// - a write that would store a row with its flag off (an insert or
    ///   update for an owner the [`Rollout`] does not cover) is the same
    ///   error, and nothing is written;
    /// - [`migrate::decrypt_back`](crate::migrate::decrypt_back) refuses to
    ///   unseal its rows ([`migrate::backfill`](crate::migrate::backfill)
    ///   still seals any it finds).
    ///
    /// Strictness is per table because adoption is: one table may be
    /// finished while another is still being backfilled. It is a setting of
    /// the keyring, not of the model, because the keyring is what every read
    /// and write already consults (as for the roll-out): a process turns it
    /// on from its configuration, with no code change, and turns it off
    /// again the same way to roll back. The database can enforce the same
    /// on every client with [`legacy::sealed_check`](crate::legacy::sealed_check).
    /// Models without an encrypted flag are always sealed and unaffected.
    pub fn set_strict<I, S>(&self, tables: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        *self
            .inner
            .strict
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            tables.into_iter().map(Into::into).collect();
    }

    /// Whether `table` is strict ([`set_strict`](Self::set_strict)).
    pub fn is_strict(&self, table: &str) -> bool {
        self.inner
            .strict
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(table)
    }

    /// The strict tables ([`set_strict`](Self::set_strict)).
    pub fn strict_tables(&self) -> Vec<String> {
        self.inner
            .strict
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// The KEK that wraps new data keys.
    pub fn primary_kek(&self) -> &Arc<dyn KeyEncryptionKey> {
        &self.inner.primary
    }

    /// The key store.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.inner.store
    }

    /// Which of `owners` are crypto-shredded (every data key version
    /// destroyed), asked of the key store: the owners whose rows are
    /// unreadable by design, which jobs and finders leave out rather than
    /// fail on. An owner with no key row at all is not shredded.
    ///
    /// # Errors
    /// Key store errors.
    pub fn shredded_owners<'o>(
        &self,
        owners: impl IntoIterator<Item = &'o str>,
    ) -> Result<HashSet<String>> {
        let owners: Vec<&str> = owners.into_iter().collect();
        if owners.is_empty() {
            return Ok(Default::default());
        }
        Ok(shredded_among(&self.inner.store.load_keys(&owners)?))
    }

    /// The keys to open `owners`' values with (one key-store query), and
    /// those of the keyless owners the key store calls crypto-shredded (one
    /// more): what a job reading several owners' sealed rows needs, leaving
    /// shredded owners out and failing on any other owner without keys.
    ///
    /// # Errors
    /// Key store and KEK errors.
    pub(crate) fn keys_for_open_or_shredded(
        &self,
        owners: &std::collections::BTreeSet<&str>,
    ) -> Result<(OwnersKeys, HashSet<String>)> {
        let keys = self.keys_for_open_many(owners.iter().copied())?;
        let keyless = owners
            .iter()
            .copied()
            .filter(|o| keys.get(*o).is_none_or(|k| k.versions().next().is_none()));
        let shredded = self.shredded_owners(keyless)?;
        Ok((keys, shredded))
    }

    /// [`shredded_owners`](Self::shredded_owners) without blocking the
    /// task's thread (feature `async`): the query runs on tokio's blocking
    /// pool.
    ///
    /// # Errors
    /// Key store errors.
    #[cfg(feature = "async")]
    pub async fn shredded_owners_async(&self, owners: Vec<String>) -> Result<HashSet<String>> {
        if owners.is_empty() {
            return Ok(Default::default());
        }
        let store = self.inner.store.clone();
        let rows = nonblocking::blocking("loading data keys", move || {
            let refs: Vec<&str> = owners.iter().map(String::as_str).collect();
            store.load_keys(&refs)
        })
        .await?;
        Ok(shredded_among(&rows))
    }

    /// The configured KEK with this id (the primary or one added with
    /// [`KeyringBuilder::unwrap_with`]).
    pub fn kek(&self, id: &str) -> Option<&Arc<dyn KeyEncryptionKey>> {
        self.inner.keks.get(id)
    }

    /// Who this keyring's audit records name as actor.
    pub fn actor(&self) -> &str {
        &self.inner.actor
    }

    /// This keyring, seen on behalf of `accessor`: the same keys and cache
    /// (a cheap clone), and every typed read and write made through it is
    /// recorded in the access log under `accessor`.
    #[must_use]
    pub fn on_behalf_of(&self, accessor: &crate::access::Accessor) -> Self {
        Self {
            handles: self.handles.clone(),
            inner: self.inner.clone(),
            accessor: Some(Arc::new(accessor.clone())),
            access_op: self.access_op,
        }
    }

    /// Who this keyring is seen on behalf of ([`Keyring::on_behalf_of`]),
    /// if anyone.
    pub fn accessor(&self) -> Option<&crate::access::Accessor> {
        self.accessor.as_deref()
    }

    /// Keys of one of phi's reserved owners ([`crate::lookup::LOOKUP_OWNER`]),
    /// which the public methods refuse: resolved and cached as any owner's,
    /// and created on first use when `seal`.
    pub(crate) fn reserved_keys(&self, owner: &str, seal: bool) -> Result<Arc<OwnerKeys>> {
        if seal {
            self.check_feed(owner)?;
            self.resolve_one(owner, Purpose::Seal, true)
        } else {
            self.resolve_one(owner, Purpose::Open, true)
        }
    }

    fn resolve_one(&self, owner: &str, purpose: Purpose, reserved: bool) -> Result<Arc<OwnerKeys>> {
        if !reserved {
            refuse_reserved(owner)?;
        }
        let now = self.inner.clock.now();
        if let Some(keys) = self.inner.cache.get(owner, now, usable(purpose)) {
            crate::metrics::cache_hit();
            return Ok(keys);
        }
        let mut resolved = self.resolve_many([owner], purpose, reserved)?;
        resolved.remove(owner).ok_or_else(|| Error::KeyUnavailable {
            owner: owner.to_owned(),
            reason: "resolution returned no keys".into(),
        })
    }

    fn resolve_many<'a>(
        &self,
        owners: impl IntoIterator<Item = &'a str>,
        purpose: Purpose,
        reserved: bool,
    ) -> Result<HashMap<String, Arc<OwnerKeys>>> {
        let mut found = HashMap::new();
        for (owner, result) in self.resolve_each(owners, purpose, reserved) {
            found.insert(owner, result?);
        }
        Ok(found)
    }

    /// The parts of this keyring the resolution core reads and counts.
    fn core(&self) -> Core<'_> {
        let inner = &*self.inner;
        Core {
            cache: &inner.cache,
            primary: &inner.primary,
            keks: &inner.keks,
            counters: &inner.counters,
            clock: &*inner.clock,
            actor: &inner.actor,
            name: &inner.name,
            owner_telemetry: inner.owner_telemetry,
            owner_id_whitespace: inner.owner_id_whitespace,
            seal_counts: &inner.seal_counts,
        }
    }

    /// Resolves each owner, with a result per owner: drives the resolution
    /// core ([`resolve`]) with blocking calls, and waits for other callers'
    /// flights on their condition variable.
    fn resolve_each<'a>(
        &self,
        owners: impl IntoIterator<Item = &'a str>,
        purpose: Purpose,
        reserved: bool,
    ) -> Vec<(String, Result<Arc<OwnerKeys>>)> {
        let mut resolution = self.core().start(owners, purpose, reserved);
        let leads = resolution.leads();
        let _span =
            (leads > 0).then(|| tracing::debug_span!("phi.resolve", owners = leads).entered());
        let mut input = None;
        loop {
            let io = match resolution.step(input.take()) {
                Step::Done(results) => return results,
                Step::Io(io) => io,
            };
            input = Some(match io {
                Io::Load(owners) => {
                    let refs: Vec<&str> = owners.iter().map(String::as_str).collect();
                    Input::Rows(self.inner.store.load_keys(&refs))
                }
                Io::Unwrap { kek, requests } => {
                    let _span = tracing::debug_span!(
                        "phi.kek.unwrap",
                        kek = kek.id(),
                        keys = requests.len()
                    )
                    .entered();
                    let refs: Vec<(&str, u32, &[u8])> = requests
                        .iter()
                        .map(|(owner, version, wrapped)| {
                            (owner.as_str(), *version, wrapped.as_slice())
                        })
                        .collect();
                    Input::Unwrapped(kek.unwrap_many(&refs))
                }
                Io::Generate {
                    kek,
                    owner,
                    version,
                } => {
                    let _span = tracing::debug_span!(
                        "phi.kek.generate",
                        owner = %self.owner_for_telemetry(&owner),
                        version,
                        kek = kek.id()
                    )
                    .entered();
                    Input::Generated(kek.generate(&owner, version))
                }
                Io::Insert { row, record } => Input::Inserted(resolve::insert_key(
                    self.inner.store.as_ref(),
                    &row,
                    &record,
                )),
                Io::Record { unwraps, generated } => {
                    self.inner.audit.push(unwraps);
                    Input::Recorded(if generated.is_empty() {
                        Ok(())
                    } else {
                        self.inner.store.append_audit(&generated)
                    })
                }
                Io::Wait(flight) => Input::Waited(flight.wait()),
                Io::Again(owner) => Input::Resolved(self.resolve_one(&owner, purpose, reserved)),
            });
        }
    }

    fn count_query(&self) {
        self.inner
            .counters
            .store_queries
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// The rows that still hold a key, by ascending version.
fn live_sorted<'a>(rows: &[&'a StoredKey]) -> Vec<&'a StoredKey> {
    let mut live: Vec<&StoredKey> = rows
        .iter()
        .copied()
        .filter(|r| r.state != KeyState::Destroyed)
        .collect();
    live.sort_by_key(|r| r.version);
    live
}

fn usable(purpose: Purpose) -> impl Fn(&OwnerKeys) -> bool {
    move |keys| purpose == Purpose::Open || keys.current.is_some()
}

/// The one check of an owner id, at every entry that takes one (see
/// [`KeyringBuilder::allow_owner_id_whitespace`]); `reserved` lets phi's
/// own owners through, `whitespace` whitespace at either end and whitespace
/// control characters.
fn check_owner(owner: &str, reserved: bool, whitespace: bool) -> Result<()> {
    let refuse = |reason: String| {
        Err(Error::InvalidInput {
            what: "owner id",
            reason,
        })
    };
    if !reserved {
        refuse_reserved(owner)?;
    }
    if owner.is_empty() {
        return refuse("it is empty".into());
    }
    if owner.len() > MAX_OWNER_LEN {
        return refuse(format!(
            "it is {} bytes, the key tables hold at most {MAX_OWNER_LEN}",
            owner.len()
        ));
    }
    if !whitespace {
        let end = if owner.starts_with(char::is_whitespace) {
            Some("begins")
        } else if owner.ends_with(char::is_whitespace) {
            Some("ends")
        } else {
            None
        };
        if let Some(end) = end {
            return refuse(format!(
                "{owner:?} {end} with whitespace, which phi refuses: almost always a badly trimmed id, \
                 and one a padding comparison takes for another (MySQL / MariaDB PAD SPACE collations \
                 equal \"acme \" and \"acme\"); a keyring built with \
                 KeyringBuilder::allow_owner_id_whitespace(true) takes it as it is"
            ));
        }
    }
    if let Some(c) = owner
        .chars()
        .find(|c| c.is_control() && !(whitespace && c.is_whitespace()))
    {
        return refuse(format!(
            "{owner:?} contains the control character U+{:04X}, which phi refuses{}",
            u32::from(c),
            if c.is_whitespace() && !whitespace {
                " (a keyring built with KeyringBuilder::allow_owner_id_whitespace(true) takes whitespace ones)"
            } else {
                ""
            }
        ));
    }
    Ok(())
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("store", &self.inner.store)
            .field("primary_kek", &self.inner.primary.id())
            .field("keks", &self.inner.keks.keys().collect::<Vec<_>>())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// The reserved owner whose data keys the lookup-index keys derive from.
pub const LOOKUP_OWNER: &str = "phi:lookup";

/// Owner ids beginning with this are phi's own: the keyring's public
/// methods refuse them.
pub const RESERVED_OWNER_PREFIX: &str = "phi:";

/// Refuses an owner id reserved for phi's own keys.
pub(crate) fn refuse_reserved(owner: &str) -> Result<()> {
    if owner.starts_with(RESERVED_OWNER_PREFIX) {
        return Err(Error::InvalidInput {
            what: "owner id",
            reason: format!(
                "owner ids beginning with {RESERVED_OWNER_PREFIX:?} are reserved for phi's own keys"
            ),
        });
    }
    Ok(())
}

/// The owners of `rows` whose every key row is destroyed.
fn shredded_among(rows: &[StoredKey]) -> HashSet<String> {
    let mut live: HashMap<&str, bool> = HashMap::new();
    for row in rows {
        *live.entry(row.owner_id.as_str()).or_default() |= row.state != KeyState::Destroyed;
    }
    live.into_iter()
        .filter(|(_, live)| !live)
        .map(|(owner, _)| owner.to_owned())
        .collect()
}

/// Owners' keys by owner id.
pub(crate) type OwnersKeys = HashMap<String, Arc<OwnerKeys>>;
