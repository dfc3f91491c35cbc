//! Metrics, through the [`metrics`](https://docs.rs/metrics/0.24) facade.
//!
//! phi records to whatever recorder the application installs (a Prometheus
//! exporter, say); with none installed every call is a no-op. Install the
//! recorder before the first keyring is built: building a keyring registers
//! every metric below with its unit and description ([`describe`]; call it
//! yourself after installing a recorder later), and the counters, gauges
//! and histograms without labels at zero, so that an alert or a dashboard
//! finds each series before its first event.
//!
//! Labels share one vocabulary: `operation` (what was done) and `outcome`
//! (`success`, or the failure's kind), both in snake_case; besides them,
//! `keyring` (the name the application gave the keyring,
//! [`KeyringBuilder::name`](crate::KeyringBuilder::name)) and `table`.
//!
//! | name | kind | unit | labels | what |
//! |---|---|---|---|---|
//! | `phi_seal_total` | counter | count | | values sealed |
//! | `phi_open_total` | counter | count | | values opened |
//! | `phi_seal_errors_total` | counter | count | `outcome` | seals that failed, by [error kind](error_kind) |
//! | `phi_open_errors_total` | counter | count | `outcome` | opens that failed, by [error kind](error_kind) |
//! | `phi_seal_duration_seconds` | histogram | seconds | | sealing one batch of records (`PhiRecord::seal_all` and the calls built on it), keys already resolved |
//! | `phi_open_duration_seconds` | histogram | seconds | | opening one batch of rows (`PhiRecord::open_all`, `open_each`, `load` and their async forms), keys already resolved |
//! | `phi_cache_hits_total` | counter | count | | owner lookups answered by the key cache |
//! | `phi_cache_misses_total` | counter | count | | owner lookups that had to resolve (or wait for) the owner |
//! | `phi_cache_owners` | gauge | count | `keyring` | owners in the keyring's key cache |
//! | `phi_key_store_query_duration_seconds` | histogram | seconds | `operation` | each key-store query |
//! | `phi_key_store_errors_total` | counter | count | `operation` | key-store queries that failed |
//! | `phi_kms_calls_total` | counter | count | `operation`, `outcome` | AWS KMS calls (`generate_data_key`, `decrypt`, `encrypt`); `outcome` is `success` or an `AwsKmsErrorKind::label` |
//! | `phi_kms_call_duration_seconds` | histogram | seconds | `operation` | each AWS KMS call, retries included |
//! | `phi_keys_rotated_total` | counter | count | | data key versions added by rotation |
//! | `phi_keys_rewrapped_total` | counter | count | | data keys rewrapped under another KEK |
//! | `phi_keys_retired_total` | counter | count | | data key versions retired |
//! | `phi_keys_destroyed_total` | counter | count | | data key versions destroyed (crypto-shredding) |
//! | `phi_values_resealed_total` | counter | count | `table` | values moved to an owner's current key version |
//! | `phi_legacy_reads_total` | counter | count | `table` | legacy values (recorded in `phi_legacy_values`) opened by a load with the keyring's decoder ([`KeyringBuilder::legacy`](crate::KeyringBuilder::legacy)): zero once the backfill has sealed every row |
//! | `phi_audit_pending` | gauge | count | | `unwrap` audit records queued and not yet written |
//! | `phi_audit_written_total` | counter | count | | `unwrap` audit records written by the background writer |
//! | `phi_audit_dropped_total` | counter | count | | `unwrap` audit records that could not be written (queue full, failed write); each is also logged |
//! | `phi_key_version_reloads_total` | counter | count | | owners reloaded because a value named a key version not cached |
//! | `phi_unknown_key_version_remembered_total` | counter | count | | opens of a key version the owner was recently found not to have, refused without a reload |
//! | `phi_feed_position` | gauge | | | id of the last key event a following keyring applied |
//! | `phi_feed_events_total` | counter | count | | key events applied by following keyrings |
//! | `phi_feed_read_errors_total` | counter | count | | reads of the key-event feed that failed (each is also logged with the staleness) |
//! | `phi_feed_staleness_seconds` | gauge | seconds | | time since the feed was last read successfully, set when a read fails (0 after a success) |
//! | `phi_admin_denied_unaudited_total` | counter | count | | refused admin API requests over the router's `denied_audit_limit`, neither audited nor logged one by one (one log line per window says the limit was reached; feature `admin-http`) |
//! | `phi_key_oldest_active_age_seconds` | gauge | seconds | | age of the oldest current (active) data key version of any owner, set by each [`lifecycle::due_keys`](crate::lifecycle::due_keys) (and `phi keys due`) |
//! | `phi_keys_due` | gauge | count | | owners whose current data key version is due for rotation under the keyring's [`RotationPolicy`](crate::RotationPolicy), set by each `due_keys` |
//! | `phi_key_seals_max` | gauge | count | | the highest seal count recorded (`phi_seal_counts`) for any owner's current data key version, set by each `due_keys`: against envelope v1's budget of 2³² |
//! | `phi_feed_unknown_events_total` | counter | count | | key events of a kind this build does not know (a newer build's), applied conservatively: the named owner, or every owner, dropped from the cache; each is also logged with its id and kind |
//! | `phi_access_log_written_total` | counter | count | | access records written by a [`DieselAccessLog`](crate::access_log::DieselAccessLog) |
//! | `phi_access_log_dropped_total` | counter | count | | access records that could not be written (queue full, writer stopped); each batch of them is also logged |
//!
//! # Alerting
//!
//! The repository's `ops/prometheus/phi-rules.yml` holds these rules and
//! more (feed staleness and read errors, dropped audit and access records,
//! keys due, the seal budget), each unit-tested with `promtool test rules`;
//! `ops/grafana/phi.json` is a dashboard over the same metrics. The core
//! of them, in Prometheus terms (the names as a Prometheus exporter writes
//! them):
//!
//! ```text
//! # Page: values that do not open (tampering, a value moved between rows
//! # or owners, a wrong key), more than 5 in 5 minutes.
//! sum(increase(phi_open_errors_total{outcome=~"decrypt|malformed|unknown_key_version"}[5m])) > 5
//!
//! # Page: seals failing (no key, KMS or key store down), more than 10 in
//! # 5 minutes.
//! sum(increase(phi_seal_errors_total[5m])) > 10
//!
//! # Warn: the key cache answers fewer than 95 % of lookups over 15 minutes
//! # (a TTL too short, a cache too small, or a feed clearing it).
//! sum(rate(phi_cache_hits_total[15m]))
//!   / (sum(rate(phi_cache_hits_total[15m])) + sum(rate(phi_cache_misses_total[15m]))) < 0.95
//!
//! # Page: KMS calls failing (unreachable, access denied, disabled key),
//! # more than 1 % of calls over 5 minutes.
//! sum(rate(phi_kms_calls_total{outcome!="success"}[5m]))
//!   / sum(rate(phi_kms_calls_total[5m])) > 0.01
//!
//! # Warn: KMS latency, p95 above 1 s.
//! histogram_quantile(0.95, sum by (le) (rate(phi_kms_call_duration_seconds_bucket[5m]))) > 1
//! ```
//!
//! Sealing or opening one value takes about 150 ns, so the per-value
//! counters (`phi_seal_total`, `phi_open_total`, and cache hits on the
//! single-owner path) are kept in plain thread-local cells and handed to the
//! recorder every 256 operations, when the thread exits, or on [`flush`].
//! For the same reason durations are timed per batch of records, not per
//! value: the two clock reads of a timing took 54 ns at best on this
//! project's machine (a TSC clock source), a third of a seal, before the
//! histogram sample is even recorded. `Keyring::seal`/`open` and
//! `OwnerKeys::seal`/`open` of single values are counted but not timed.
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
/// Failed seals, label `outcome`.
pub const SEAL_ERRORS_TOTAL: &str = "phi_seal_errors_total";
/// Failed opens, label `outcome`.
pub const OPEN_ERRORS_TOTAL: &str = "phi_open_errors_total";
/// Sealing a batch of records (each chunk of
/// [`PhiRecord::seal_chunks`](crate::PhiRecord::seal_chunks)), in seconds.
pub const SEAL_DURATION_SECONDS: &str = "phi_seal_duration_seconds";
/// Opening a batch of rows (each chunk of a
/// [`PhiRecord::load`](crate::PhiRecord::load) past
/// [`parallel_min_rows`](crate::KeyringBuilder::parallel_min_rows)), in
/// seconds.
pub const OPEN_DURATION_SECONDS: &str = "phi_open_duration_seconds";
/// Key cache hits.
pub const CACHE_HITS_TOTAL: &str = "phi_cache_hits_total";
/// Key cache misses.
pub const CACHE_MISSES_TOTAL: &str = "phi_cache_misses_total";
/// Owners in a keyring's key cache, label `keyring`.
pub const CACHE_OWNERS: &str = "phi_cache_owners";
/// Key-store query latency in seconds, label `operation`.
pub const KEY_STORE_QUERY_DURATION_SECONDS: &str = "phi_key_store_query_duration_seconds";
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
/// Legacy values a load opened with the keyring's decoder, label `table`.
pub const LEGACY_READS_TOTAL: &str = "phi_legacy_reads_total";

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
/// Key events of a kind this build does not know, applied conservatively.
pub const FEED_UNKNOWN_EVENTS_TOTAL: &str = "phi_feed_unknown_events_total";
/// Age in seconds of the oldest current data key version of any owner.
pub const KEY_OLDEST_ACTIVE_AGE_SECONDS: &str = "phi_key_oldest_active_age_seconds";
/// Owners whose current data key version is due for rotation.
pub const KEYS_DUE: &str = "phi_keys_due";
/// The highest seal count recorded for any current data key version.
pub const KEY_SEALS_MAX: &str = "phi_key_seals_max";
/// AWS KMS calls, labels `operation` (`generate_data_key`, `decrypt`,
/// `encrypt`) and `outcome` (`success`, or the failure's
/// `AwsKmsErrorKind::label`; feature `aws-kms`).
pub const KMS_CALLS_TOTAL: &str = "phi_kms_calls_total";
/// AWS KMS call latency in seconds, retries included, label `operation`.
pub const KMS_CALL_DURATION_SECONDS: &str = "phi_kms_call_duration_seconds";

/// Refused admin API requests neither audited nor logged one by one, over the
/// router's `denied_audit_limit` (feature `admin-http`).
pub const ADMIN_DENIED_UNAUDITED_TOTAL: &str = "phi_admin_denied_unaudited_total";

/// The `outcome` label of a success.
pub const SUCCESS: &str = "success";

/// Registers every metric phi records with the installed recorder: its
/// unit and description. Building a keyring calls it; an application that
/// installs its recorder later calls it again afterwards. Describing twice
/// is harmless.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(SEAL_TOTAL, Unit::Count, "Values sealed.");
    describe_gauge!(
        KEY_OLDEST_ACTIVE_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest current data key version of any owner (set when the keys due are listed)."
    );
    describe_gauge!(
        KEYS_DUE,
        Unit::Count,
        "Owners whose current data key version is due for rotation (set when the keys due are listed)."
    );
    describe_gauge!(
        KEY_SEALS_MAX,
        Unit::Count,
        "Highest seal count recorded for any current data key version (set when the keys due are listed)."
    );
    describe_counter!(OPEN_TOTAL, Unit::Count, "Values opened.");
    describe_counter!(
        SEAL_ERRORS_TOTAL,
        Unit::Count,
        "Seals that failed, by outcome (the error kind)."
    );
    describe_counter!(
        OPEN_ERRORS_TOTAL,
        Unit::Count,
        "Opens that failed, by outcome (the error kind)."
    );
    describe_histogram!(
        SEAL_DURATION_SECONDS,
        Unit::Seconds,
        "Sealing one batch of records, keys already resolved."
    );
    describe_histogram!(
        OPEN_DURATION_SECONDS,
        Unit::Seconds,
        "Opening one batch of rows, keys already resolved."
    );
    describe_counter!(
        CACHE_HITS_TOTAL,
        Unit::Count,
        "Owner lookups answered by the key cache."
    );
    describe_counter!(
        CACHE_MISSES_TOTAL,
        Unit::Count,
        "Owner lookups that had to resolve (or wait for) the owner."
    );
    describe_gauge!(
        CACHE_OWNERS,
        Unit::Count,
        "Owners in the key cache of the keyring named by the keyring label."
    );
    describe_histogram!(
        KEY_STORE_QUERY_DURATION_SECONDS,
        Unit::Seconds,
        "Key-store queries, by operation."
    );
    describe_counter!(
        KEY_STORE_ERRORS_TOTAL,
        Unit::Count,
        "Key-store queries that failed, by operation."
    );
    describe_counter!(
        KMS_CALLS_TOTAL,
        Unit::Count,
        "AWS KMS calls, by operation and outcome."
    );
    describe_histogram!(
        KMS_CALL_DURATION_SECONDS,
        Unit::Seconds,
        "AWS KMS calls, retries included, by operation."
    );
    describe_counter!(
        KEYS_ROTATED_TOTAL,
        Unit::Count,
        "Data key versions added by rotation."
    );
    describe_counter!(
        KEYS_REWRAPPED_TOTAL,
        Unit::Count,
        "Data keys rewrapped under another KEK."
    );
    describe_counter!(
        KEYS_RETIRED_TOTAL,
        Unit::Count,
        "Data key versions retired."
    );
    describe_counter!(
        KEYS_DESTROYED_TOTAL,
        Unit::Count,
        "Data key versions destroyed (crypto-shredding)."
    );
    describe_counter!(
        VALUES_RESEALED_TOTAL,
        Unit::Count,
        "Values moved to their owner's current key version, by table."
    );
    describe_counter!(
        LEGACY_READS_TOTAL,
        Unit::Count,
        "Legacy values opened by loads with the keyring's decoder, by table."
    );
    describe_gauge!(
        AUDIT_PENDING,
        Unit::Count,
        "Unwrap audit records queued and not yet written."
    );
    describe_counter!(
        AUDIT_WRITTEN_TOTAL,
        Unit::Count,
        "Unwrap audit records written by the background writer."
    );
    describe_counter!(
        AUDIT_DROPPED_TOTAL,
        Unit::Count,
        "Unwrap audit records that could not be written."
    );
    describe_counter!(
        KEY_VERSION_RELOADS_TOTAL,
        Unit::Count,
        "Owners reloaded because a value named a key version not cached."
    );
    describe_counter!(
        UNKNOWN_KEY_VERSION_REMEMBERED_TOTAL,
        Unit::Count,
        "Opens of a key version recently found missing, refused without a reload."
    );
    describe_gauge!(
        FEED_POSITION,
        "Id of the last key event a following keyring applied."
    );
    describe_counter!(
        FEED_EVENTS_TOTAL,
        Unit::Count,
        "Key events applied by following keyrings."
    );
    describe_counter!(
        FEED_READ_ERRORS_TOTAL,
        Unit::Count,
        "Reads of the key-event feed that failed."
    );
    describe_gauge!(
        FEED_STALENESS_SECONDS,
        Unit::Seconds,
        "Time since the key-event feed was last read successfully."
    );
    describe_counter!(
        FEED_UNKNOWN_EVENTS_TOTAL,
        Unit::Count,
        "Key events of a kind this build does not know, applied conservatively."
    );
    describe_counter!(
        ADMIN_DENIED_UNAUDITED_TOTAL,
        Unit::Count,
        "Refused admin API requests not audited, over the router's limit."
    );
    describe_access_log();
    register_at_zero();
}

/// The access log's counter of records that could not be written
/// ([`access_log::DROPPED_TOTAL`](crate::access_log::DROPPED_TOTAL)).
pub const ACCESS_LOG_DROPPED_TOTAL: &str = "phi_access_log_dropped_total";
/// The access log's counter of records written.
pub const ACCESS_LOG_WRITTEN_TOTAL: &str = "phi_access_log_written_total";

/// Describes the access log's counters.
pub(crate) fn describe_access_log() {
    use metrics::{Unit, describe_counter};
    describe_counter!(
        ACCESS_LOG_DROPPED_TOTAL,
        Unit::Count,
        "Access records that could not be written (queue full, writer stopped); each is also logged."
    );
    describe_counter!(
        ACCESS_LOG_WRITTEN_TOTAL,
        Unit::Count,
        "Access records written."
    );
}

/// Registers the series that alerts and dashboards read at zero (without
/// labels), so that they are exported before their first event: a rule
/// over a series that does not exist yet cannot tell "none" from "not
/// exported", and a renamed metric is caught at start-up. Gauges set by a
/// job ([`KEYS_DUE`], [`KEY_SEALS_MAX`], [`KEY_OLDEST_ACTIVE_AGE_SECONDS`])
/// read 0 until the job first runs.
fn register_at_zero() {
    for name in [
        SEAL_TOTAL,
        OPEN_TOTAL,
        SEAL_ERRORS_TOTAL,
        OPEN_ERRORS_TOTAL,
        CACHE_HITS_TOTAL,
        CACHE_MISSES_TOTAL,
        KEY_STORE_ERRORS_TOTAL,
        KMS_CALLS_TOTAL,
        KEYS_ROTATED_TOTAL,
        KEYS_REWRAPPED_TOTAL,
        KEYS_RETIRED_TOTAL,
        KEYS_DESTROYED_TOTAL,
        VALUES_RESEALED_TOTAL,
        AUDIT_WRITTEN_TOTAL,
        AUDIT_DROPPED_TOTAL,
        FEED_EVENTS_TOTAL,
        FEED_READ_ERRORS_TOTAL,
        ACCESS_LOG_WRITTEN_TOTAL,
        ACCESS_LOG_DROPPED_TOTAL,
    ] {
        metrics::counter!(name).increment(0);
    }
    for name in [
        AUDIT_PENDING,
        FEED_STALENESS_SECONDS,
        KEYS_DUE,
        KEY_SEALS_MAX,
        KEY_OLDEST_ACTIVE_AGE_SECONDS,
    ] {
        metrics::gauge!(name).increment(0.0);
    }
    for name in [
        SEAL_DURATION_SECONDS,
        OPEN_DURATION_SECONDS,
        KEY_STORE_QUERY_DURATION_SECONDS,
        KMS_CALL_DURATION_SECONDS,
    ] {
        drop(metrics::histogram!(name));
    }
}

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

/// The `outcome` label of an error in `phi_seal_errors_total` and
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
        Err(e) => metrics::counter!(SEAL_ERRORS_TOTAL, "outcome" => error_kind(e)).increment(1),
    }
    result
}

/// Counts one open (or its error).
#[inline]
pub(crate) fn opened<T>(result: Result<T>) -> Result<T> {
    match &result {
        Ok(_) => bump(OPEN_TOTAL, |l| &l.opens),
        Err(e) => metrics::counter!(OPEN_ERRORS_TOTAL, "outcome" => error_kind(e)).increment(1),
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

/// Sets the cache size gauge of the keyring named `keyring`.
#[allow(clippy::cast_precision_loss)] // A gauge; owners fit an f64 exactly well past any cache size.
pub(crate) fn cache_owners(keyring: &str, owners: usize) {
    metrics::gauge!(CACHE_OWNERS, "keyring" => keyring.to_owned()).set(owners as f64);
}

/// Runs `f`, sealing or opening one batch of records, and records its
/// duration in the histogram `name`.
pub(crate) fn timed<T>(name: &'static str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    metrics::histogram!(name).record(started.elapsed().as_secs_f64());
    out
}

/// Runs one key-store query inside a `phi.store` tracing span (with
/// OpenTelemetry's `db.operation.name`), recording its latency and any
/// failure under `operation`.
pub(crate) fn store_query<T>(operation: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let _span = tracing::debug_span!("phi.store", "db.operation.name" = operation).entered();
    let started = Instant::now();
    let result = f();
    metrics::histogram!(KEY_STORE_QUERY_DURATION_SECONDS, "operation" => operation)
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
