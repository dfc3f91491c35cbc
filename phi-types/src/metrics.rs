//! Metrics, through the [`metrics`](https://docs.rs/metrics/0.24) facade.
//!
//! phi records to whatever recorder the application installs (a Prometheus
//! exporter, say); with none installed every call is a no-op. Install the
//! recorder before the first value is sealed or opened.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `phi_seal_total` | counter | | values sealed |
//! | `phi_open_total` | counter | | values opened |
//! | `phi_seal_errors_total` | counter | `kind` | seals that failed, by [error kind](error_kind) |
//! | `phi_open_errors_total` | counter | `kind` | opens that failed, by [error kind](error_kind) |
//! | `phi_cache_hits_total` | counter | | owner lookups answered by the key cache |
//! | `phi_cache_misses_total` | counter | | owner lookups that had to resolve (or wait for) the owner |
//! | `phi_cache_owners` | gauge | | owners in the key cache |
//! | `phi_key_store_query_seconds` | histogram | `operation` | latency of each key-store query |
//! | `phi_key_store_errors_total` | counter | `operation` | key-store queries that failed |
//! | `phi_keys_rotated_total` | counter | | data key versions added by rotation |
//! | `phi_keys_rewrapped_total` | counter | | data keys rewrapped under another KEK |
//! | `phi_keys_retired_total` | counter | | data key versions retired |
//! | `phi_keys_destroyed_total` | counter | | data key versions destroyed (crypto-shredding) |
//! | `phi_values_resealed_total` | counter | `table` | values moved to an owner's current key version |
//! | `phi_audit_pending` | gauge | | `unwrap` audit records queued and not yet written |
//! | `phi_audit_written_total` | counter | | `unwrap` audit records written by the background writer |
//! | `phi_audit_dropped_total` | counter | | `unwrap` audit records that could not be written (queue full, failed write); each is also logged |
//! | `phi_key_version_reloads_total` | counter | | owners reloaded because a value named a key version not cached |
//! | `phi_unknown_key_version_remembered_total` | counter | | opens of a key version the owner was recently found not to have, refused without a reload |
//! | `phi_feed_position` | gauge | | id of the last key event a following keyring applied |
//! | `phi_feed_events_total` | counter | | key events applied by following keyrings |
//! | `phi_feed_read_errors_total` | counter | | reads of the key-event feed that failed (each is also logged with the staleness) |
//! | `phi_feed_staleness_seconds` | gauge | | time since the feed was last read successfully, set when a read fails (0 after a success) |
//!
//! Sealing or opening one value takes about 150 ns, so the per-value
//! counters (`phi_seal_total`, `phi_open_total`, and cache hits on the
//! single-owner path) are kept in plain thread-local cells and handed to the
//! recorder every 256 operations, when the thread exits, or on [`flush`].
//! Everything else is recorded as it happens: errors, cache misses and
//! key-store queries are already slow paths, and batch operations count
//! once per batch.

use std::cell::Cell;
use std::time::Instant;

use crate::error::{Error, Result};

/// Values sealed.
pub const SEAL_TOTAL: &str = "phi_seal_total";
/// Values opened.
pub const OPEN_TOTAL: &str = "phi_open_total";
/// Failed seals, label `kind`.
pub const SEAL_ERRORS_TOTAL: &str = "phi_seal_errors_total";
/// Failed opens, label `kind`.
pub const OPEN_ERRORS_TOTAL: &str = "phi_open_errors_total";
/// Key cache hits.
pub const CACHE_HITS_TOTAL: &str = "phi_cache_hits_total";
/// Key cache misses.
pub const CACHE_MISSES_TOTAL: &str = "phi_cache_misses_total";
/// Owners in the key cache.
pub const CACHE_OWNERS: &str = "phi_cache_owners";
/// Key-store query latency in seconds, label `operation`.
pub const KEY_STORE_QUERY_SECONDS: &str = "phi_key_store_query_seconds";
/// Failed key-store queries, label `operation`.
pub const KEY_STORE_ERRORS_TOTAL: &str = "phi_key_store_errors_total";
/// Data key versions added by rotation.
pub const KEYS_ROTATED_TOTAL: &str = "phi_keys_rotated_total";
/// Data keys rewrapped under another KEK.
pub const KEYS_REWRAPPED_TOTAL: &str = "phi_keys_rewrapped_total";
/// Data key versions retired.
pub const KEYS_RETIRED_TOTAL: &str = "phi_keys_retired_total";
/// Data key versions destroyed.
pub const KEYS_DESTROYED_TOTAL: &str = "phi_keys_destroyed_total";
/// Values re-sealed under an owner's current key version, label `table`.
pub const VALUES_RESEALED_TOTAL: &str = "phi_values_resealed_total";

/// `unwrap` audit records queued and not yet written.
pub const AUDIT_PENDING: &str = "phi_audit_pending";
/// `unwrap` audit records written in the background.
pub const AUDIT_WRITTEN_TOTAL: &str = "phi_audit_written_total";
/// `unwrap` audit records that could not be written.
pub const AUDIT_DROPPED_TOTAL: &str = "phi_audit_dropped_total";
/// Owners reloaded for a key version not cached.
pub const KEY_VERSION_RELOADS_TOTAL: &str = "phi_key_version_reloads_total";
/// Opens of a remembered unknown key version, refused without a reload.
pub const UNKNOWN_KEY_VERSION_REMEMBERED_TOTAL: &str = "phi_unknown_key_version_remembered_total";
/// Id of the last key event a following keyring applied.
pub const FEED_POSITION: &str = "phi_feed_position";
/// Key events applied by following keyrings.
pub const FEED_EVENTS_TOTAL: &str = "phi_feed_events_total";
/// Failed reads of the key-event feed.
pub const FEED_READ_ERRORS_TOTAL: &str = "phi_feed_read_errors_total";
/// Seconds since the feed was last read successfully.
pub const FEED_STALENESS_SECONDS: &str = "phi_feed_staleness_seconds";

/// Operations a thread counts before handing them to the recorder.
const FLUSH_EVERY: u64 = 256;

struct Local {
    seals: Cell<u64>,
    opens: Cell<u64>,
    hits: Cell<u64>,
}

impl Local {
    fn flush(&self) {
        for (name, cell) in [
            (SEAL_TOTAL, &self.seals),
            (OPEN_TOTAL, &self.opens),
            (CACHE_HITS_TOTAL, &self.hits),
        ] {
            let n = cell.replace(0);
            if n > 0 {
                metrics::counter!(name).increment(n);
            }
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        self.flush();
    }
}

thread_local! {
    static LOCAL: Local = const {
        Local {
            seals: Cell::new(0),
            opens: Cell::new(0),
            hits: Cell::new(0),
        }
    };
}

#[inline]
fn bump(name: &'static str, pick: fn(&Local) -> &Cell<u64>) {
    // During thread teardown the cell may be gone: the count is dropped.
    let _ = LOCAL.try_with(|local| {
        let cell = pick(local);
        let n = cell.get() + 1;
        if n >= FLUSH_EVERY {
            cell.set(0);
            metrics::counter!(name).increment(n);
        } else {
            cell.set(n);
        }
    });
}

/// Hands the calling thread's pending per-value counts to the recorder
/// (they are otherwise handed over every 256 operations and when the thread
/// exits).
pub fn flush() {
    let _ = LOCAL.try_with(Local::flush);
}

/// The `kind` label of an error in `phi_seal_errors_total` and
/// `phi_open_errors_total`: `decrypt`, `malformed`, `unknown_key_version`,
/// `decode`, `encrypt`, `no_key`, `shredded`, `kek`, `store`, `feed_stale`,
/// `random` or `other`.
pub fn error_kind(error: &Error) -> &'static str {
    match error {
        Error::Decrypt { .. } => "decrypt",
        Error::Malformed { .. } => "malformed",
        Error::UnknownKeyVersion { .. } => "unknown_key_version",
        Error::Decode { .. } => "decode",
        Error::Encrypt { .. } => "encrypt",
        Error::NoKey { .. } => "no_key",
        Error::Shredded { .. } => "shredded",
        Error::Kek { .. } | Error::UnknownKek { .. } | Error::KeyUnavailable { .. } => "kek",
        Error::Store { .. } => "store",
        Error::FeedStale { .. } => "feed_stale",
        Error::RandomSource(_) => "random",
        _ => "other",
    }
}

/// Counts one seal (or its error).
#[inline]
pub(crate) fn sealed<T>(result: Result<T>) -> Result<T> {
    match &result {
        Ok(_) => bump(SEAL_TOTAL, |l| &l.seals),
        Err(e) => metrics::counter!(SEAL_ERRORS_TOTAL, "kind" => error_kind(e)).increment(1),
    }
    result
}

/// Counts one open (or its error).
#[inline]
pub(crate) fn opened<T>(result: Result<T>) -> Result<T> {
    match &result {
        Ok(_) => bump(OPEN_TOTAL, |l| &l.opens),
        Err(e) => metrics::counter!(OPEN_ERRORS_TOTAL, "kind" => error_kind(e)).increment(1),
    }
    result
}

/// Counts one cache hit on the single-owner path.
#[inline]
pub(crate) fn cache_hit() {
    bump(CACHE_HITS_TOTAL, |l| &l.hits);
}

/// Counts the hits and misses of one batch lookup.
pub(crate) fn cache_lookups(hits: usize, misses: usize) {
    if hits > 0 {
        metrics::counter!(CACHE_HITS_TOTAL).increment(hits as u64);
    }
    if misses > 0 {
        metrics::counter!(CACHE_MISSES_TOTAL).increment(misses as u64);
    }
}

/// Sets the cache size gauge.
#[allow(clippy::cast_precision_loss)] // A gauge; owners fit an f64 exactly well past any cache size.
pub(crate) fn cache_owners(owners: usize) {
    metrics::gauge!(CACHE_OWNERS).set(owners as f64);
}

/// Runs one key-store query inside a `phi.store` tracing span, recording
/// its latency and any failure under `operation`.
pub(crate) fn store_query<T>(operation: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let _span = tracing::debug_span!("phi.store", operation).entered();
    let started = Instant::now();
    let result = f();
    metrics::histogram!(KEY_STORE_QUERY_SECONDS, "operation" => operation)
        .record(started.elapsed().as_secs_f64());
    if let Err(error) = &result {
        metrics::counter!(KEY_STORE_ERRORS_TOTAL, "operation" => operation).increment(1);
        tracing::debug!(operation, %error, "key store query failed");
    }
    result
}

/// Adds `n` to a life-cycle counter.
pub(crate) fn add(name: &'static str, n: u64) {
    if n > 0 {
        metrics::counter!(name).increment(n);
    }
}

/// Adds `n` to a life-cycle counter labelled with a table.
pub(crate) fn add_for_table(name: &'static str, table: &str, n: u64) {
    if n > 0 {
        metrics::counter!(name, "table" => table.to_owned()).increment(n);
    }
}

/// Counts `unwrap` audit records queued.
#[allow(clippy::cast_precision_loss)] // A gauge of queued records: far below 2^52.
pub(crate) fn audit_queued(n: u64) {
    if n > 0 {
        metrics::gauge!(AUDIT_PENDING).increment(n as f64);
    }
}

/// Counts `unwrap` audit records taken off the queue (written or not).
#[allow(clippy::cast_precision_loss)] // A gauge of queued records: far below 2^52.
pub(crate) fn audit_finished(n: u64) {
    if n > 0 {
        metrics::gauge!(AUDIT_PENDING).decrement(n as f64);
    }
}

/// Counts `unwrap` audit records written.
pub(crate) fn audit_written(n: u64) {
    add(AUDIT_WRITTEN_TOTAL, n);
}

/// Counts `unwrap` audit records that could not be written.
pub(crate) fn audit_dropped(n: u64) {
    add(AUDIT_DROPPED_TOTAL, n);
}

#[allow(clippy::cast_precision_loss)] // A gauge of an event id.
pub(crate) fn feed_read(position: i64, events: usize) {
    metrics::gauge!(FEED_POSITION).set(position as f64);
    metrics::gauge!(FEED_STALENESS_SECONDS).set(0.0);
    if events > 0 {
        metrics::counter!(FEED_EVENTS_TOTAL).increment(events as u64);
    }
}

pub(crate) fn feed_failed(stale_for: std::time::Duration) {
    metrics::counter!(FEED_READ_ERRORS_TOTAL).increment(1);
    metrics::gauge!(FEED_STALENESS_SECONDS).set(stale_for.as_secs_f64());
}
