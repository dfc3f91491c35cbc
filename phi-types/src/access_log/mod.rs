//! The durable access log: [`DieselAccessLog`], an [`AccessLog`] that
//! writes the keyring's [`AccessRecord`]s into tables of phi's own, in
//! batches chained by a keyed hash, and the queries, verification and
//! retention over them.
//!
//! # Writing
//!
//! [`AccessLog::append`] only queues (a bounded queue, default
//! [`DEFAULT_QUEUE`] records); a thread of the log's own writes the queue
//! in batches (up to [`DEFAULT_BATCH`] records, one transaction each),
//! through a connection pool of its own, into the application's database or
//! another one. The writer lingers up to [`DEFAULT_LINGER`] after the first
//! record of a batch for more to come (less when the batch fills or
//! `flush` is called), so that a busy application pays one transaction
//! (and, on SQLite, one turn of the database's single writer lock) for
//! many calls rather than one each; an `append` wakes the writer only when
//! it waits for one, so most appends are a short lock of the queue and no
//! system call. What lingers is queued like any record: written by `flush`
//! and on drop, counted if lost. Records that do not fit in the queue are dropped, counted
//! (`phi_access_log_dropped_total`) and logged. A batch whose write fails is
//! kept at the head of the queue and tried again (every second), so a
//! database that is down for a while loses nothing but what overflows the
//! queue meanwhile. [`AccessLog::flush`] waits until everything queued
//! before it is written (or a write fails); dropping the log writes the
//! queue out.
//!
//! **Fail-closed** ([`DieselAccessLogBuilder::fail_closed`], off by
//! default): `append` refuses (and the read or write that made the records
//! fails with it) while records cannot be written: the queue is full, or
//! the last write failed and no write has succeeded since. The trade-off:
//! fail-closed guarantees that no access goes unlogged, at the price of
//! availability: an outage of the log's database, or a burst larger than
//! the queue, stops every read and write of PHI. Fail-open (the default)
//! keeps the application running and accounts for what is lost in the
//! metric and the logs, at the price of gaps in the log.
//!
//! # Tables
//!
//! (Migration `2026-12-07-000006_access_log`.) Times are UTC, kept to the
//! microsecond.
//!
//! | table | columns |
//! |---|---|
//! | `phi_access_chains` | chain VARCHAR(64) PK, head BIGINT (id of the last batch), head_hash (its hash), updated_at |
//! | `phi_access_batches` | chain, id BIGINT (1, 2, … per chain), kind `records\|checkpoint`, written_at, last_at (the newest record's time, or written_at), records BIGINT, key_version BIGINT, prev_hash, hash, pruned_before BIGINT?, pruned_hash?, detail TEXT?; PK (chain, id) |
//! | `phi_access_log` | chain, batch, seq INTEGER (0, 1, … within the batch), occurred_at, user_id, purpose, request_id?, op, owner_id, table_name, row_key?, fields TEXT (the column names joined by `,`); PK (chain, batch, seq); indexes (owner_id, occurred_at), (user_id, occurred_at), (table_name, row_key), (occurred_at) |
//!
//! A database holds any number of chains (named by the application,
//! default [`DEFAULT_CHAIN`]); each is verified on its own. User ids,
//! purposes, request ids, table names and row keys are at most
//! [`MAX_FIELD_LEN`] bytes; chain names at most 64.
//!
//! # The chain (a stored format: outside readers rely on it)
//!
//! The chain key of version `v`:
//!
//! ```text
//! K_v = HKDF-SHA256(ikm = data key version v of the reserved owner "phi:access-log",
//!                   salt = empty, info = "phi-access-log-v1"), 32 bytes
//! ```
//!
//! The data key is generated, wrapped by the KEK and stored like any
//! owner's (so an AWS KMS KEK serves too): someone holding only the
//! database cannot compute `K_v`. A writer uses the current version when it
//! starts; rotating `phi:access-log` moves writers started afterwards to
//! the new version, and verification uses each batch's own.
//!
//! The hash of batch `n` is `HMAC-SHA256(K_v, M_n)`, 32 bytes, where `M_n`
//! is the concatenation of
//!
//! ```text
//! "phi-access-log-v1"
//! str(chain) ‖ u64be(n) ‖ str(kind) ‖ u32be(v)
//! prev_hash                       32 bytes: the hash of batch n-1; 32 zero bytes for batch 1
//! ts(written_at) ‖ ts(last_at)
//! opt_u64(pruned_before) ‖ opt_bytes(pruned_hash) ‖ opt_str(detail)
//! u64be(record count)
//! then for each record, in seq order 0, 1, …:
//!   u32be(seq) ‖ ts(occurred_at) ‖ str(user_id) ‖ str(purpose) ‖ opt_str(request_id)
//!   ‖ str(op) ‖ str(owner_id) ‖ str(table_name) ‖ opt_str(row_key) ‖ str(fields)
//! ```
//!
//! with `str(s)` = `u32be(byte length) ‖ UTF-8 bytes`, `opt_str(None)` =
//! `0x00`, `opt_str(Some(s))` = `0x01 ‖ str(s)` (likewise `opt_u64` with
//! `u64be`, `opt_bytes` with `u32be(length) ‖ bytes`), and `ts(t)` =
//! `i64be(microseconds since 1970-01-01T00:00:00 UTC)`. `op` is one of
//! `read`, `insert`, `update`, `delete`, `export`, `lookup`, `job`.
//!
//! Each batch is appended in one transaction that first increments its
//! chain's `head` (the row lock orders appenders, in one process or many),
//! then inserts the batch and its records and stores the new head hash.
//!
//! **Retention.** [`prune`] deletes, in one transaction, the batches (and
//! their records) of each chain whose records all occurred before a date,
//! as a prefix of the chain (it stops at the first batch it keeps), and
//! appends a *checkpoint* batch (kind `checkpoint`, no records) whose
//! `pruned_before` is the id of the first batch kept and whose
//! `pruned_hash` is that batch's `prev_hash`. The checkpoint is chained and
//! hashed like any batch, so it cannot be forged or moved without the key.
//!
//! **Verification** ([`verify`], `phi audit verify`) walks each chain from
//! its first stored batch: from 32 zero bytes when that is batch 1, else
//! from the `pruned_hash` of the checkpoint whose `pruned_before` names it;
//! every batch must follow the one before (`prev_hash`), hold exactly its
//! records, numbered from 0, and carry the hash of its contents; the last
//! must be the chain's head. The first break is named: a missing batch, a
//! batch that does not follow its predecessor (reordered, or rewritten), a
//! batch whose records were deleted, added or altered, records of a batch
//! not in the chain, a log cut short of its head.
//!
//! What it does not detect: someone holding the database who deletes the
//! newest batches *and* sets the head row back to an earlier batch's id and
//! hash (both are in the database). Keep the head that `phi audit verify`
//! prints somewhere else now and then (a ticket, another system's log),
//! and compare.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use chrono::{NaiveDateTime, Timelike as _};
use hkdf::Hkdf;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::access::{AccessLog, AccessRecord};
use crate::error::{Error, Result};
use crate::keyring::Keyring;

mod backend;
mod verify;
mod writer;

#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
pub use backend::{DieselAccessLogStore, DieselAccessLogStoreBuilder};
pub use verify::{Break, BreakKind, ChainReport, verify, verify_chain};

/// The reserved owner whose data keys the chain keys derive from.
pub const ACCESS_LOG_OWNER: &str = "phi:access-log";

/// The HKDF `info`, and the first bytes of every hashed message.
pub const CHAIN_INFO: &[u8] = b"phi-access-log-v1";

/// The chain a log writes to unless told otherwise.
pub const DEFAULT_CHAIN: &str = "default";

/// Records queued at most by default.
pub const DEFAULT_QUEUE: usize = 65_536;

/// Records per batch (one transaction) at most by default.
pub const DEFAULT_BATCH: usize = 5_000;

/// How long the writer waits, at most, for a batch to fill after its
/// first record by default.
pub const DEFAULT_LINGER: std::time::Duration = std::time::Duration::from_millis(50);

/// The longest user id, purpose, request id, table name or row key
/// stored, in bytes.
pub const MAX_FIELD_LEN: usize = 255;

/// The longest chain name, in bytes.
pub const MAX_CHAIN_LEN: usize = 64;

/// The kind of a batch of records.
pub const KIND_RECORDS: &str = "records";
/// The kind of a checkpoint batch, appended by [`prune`].
pub const KIND_CHECKPOINT: &str = "checkpoint";

/// The metric counting records that could not be written.
pub const DROPPED_TOTAL: &str = crate::metrics::ACCESS_LOG_DROPPED_TOTAL;
/// The metric counting records written.
pub const WRITTEN_TOTAL: &str = crate::metrics::ACCESS_LOG_WRITTEN_TOTAL;

/// One chain key: `K_v` of the module docs. Zeroized on drop; its `Debug`
/// shows the version only.
pub struct ChainKey {
    key: Zeroizing<[u8; 32]>,
    version: u32,
}

impl fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainKey")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl ChainKey {
    /// Derives the chain key from `dek`, a data key of [`ACCESS_LOG_OWNER`].
    pub fn derive(dek: &crate::Dek) -> Self {
        let hkdf = Hkdf::<Sha256>::new(None, dek.key().expose());
        let mut key = Zeroizing::new([0u8; 32]);
        let expanded = hkdf.expand(CHAIN_INFO, &mut key[..]);
        debug_assert!(expanded.is_ok());
        ChainKey {
            key,
            version: dek.version(),
        }
    }

    /// The current chain key of `keyring`'s KEK: the current data key of
    /// [`ACCESS_LOG_OWNER`], created on first use.
    ///
    /// # Errors
    /// The keyring's errors resolving or creating the reserved owner's key.
    pub fn current(keyring: &Keyring) -> Result<Self> {
        let keys = keyring.reserved_keys(ACCESS_LOG_OWNER, true)?;
        let version = keys.current_version().ok_or_else(|| Error::NoKey {
            owner: ACCESS_LOG_OWNER.to_owned(),
        })?;
        let dek = keys.dek(version).ok_or_else(|| Error::NoKey {
            owner: ACCESS_LOG_OWNER.to_owned(),
        })?;
        Ok(Self::derive(dek))
    }

    /// The data key version this key derives from.
    pub fn version(&self) -> u32 {
        self.version
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&self.key[..])
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"))
    }

    /// The hash of a batch with these `records` (in seq order).
    pub fn hash(&self, batch: &BatchRow, records: &[StoredAccess]) -> [u8; 32] {
        let records: Vec<RecordRef<'_>> = records.iter().map(RecordRef::of_stored).collect();
        self.hash_refs(batch, &records)
    }

    /// [`hash`](Self::hash) of records borrowed.
    pub(crate) fn hash_refs(&self, batch: &BatchRow, records: &[RecordRef<'_>]) -> [u8; 32] {
        let mut mac = self.mac();
        feed_batch(&mut mac, batch, records);
        mac.finalize().into_bytes().into()
    }

    /// Whether `batch.hash` is the hash of its contents (compared in
    /// constant time).
    pub fn verifies(&self, batch: &BatchRow, records: &[StoredAccess]) -> bool {
        let records: Vec<RecordRef<'_>> = records.iter().map(RecordRef::of_stored).collect();
        let mut mac = self.mac();
        feed_batch(&mut mac, batch, &records);
        mac.verify_slice(&batch.hash).is_ok()
    }
}

fn put_str(mac: &mut Hmac<Sha256>, s: &str) {
    put_bytes(mac, s.as_bytes());
}

fn put_bytes(mac: &mut Hmac<Sha256>, b: &[u8]) {
    let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
    mac.update(&len.to_be_bytes());
    mac.update(b);
}

fn put_opt_str(mac: &mut Hmac<Sha256>, s: Option<&str>) {
    match s {
        None => mac.update(&[0]),
        Some(s) => {
            mac.update(&[1]);
            put_str(mac, s);
        }
    }
}

fn put_ts(mac: &mut Hmac<Sha256>, t: NaiveDateTime) {
    mac.update(&t.and_utc().timestamp_micros().to_be_bytes());
}

fn feed_batch(mac: &mut Hmac<Sha256>, batch: &BatchRow, records: &[RecordRef<'_>]) {
    mac.update(CHAIN_INFO);
    put_str(mac, &batch.chain);
    mac.update(&batch.id.to_be_bytes());
    put_str(mac, &batch.kind);
    mac.update(&batch.key_version.to_be_bytes());
    // Always 32 bytes when written by phi; a stored value of another
    // length goes in as it is (and fails to verify).
    mac.update(&batch.prev_hash);
    put_ts(mac, batch.written_at);
    put_ts(mac, batch.last_at);
    match batch.pruned_before {
        None => mac.update(&[0]),
        Some(id) => {
            mac.update(&[1]);
            mac.update(&id.to_be_bytes());
        }
    }
    match &batch.pruned_hash {
        None => mac.update(&[0]),
        Some(h) => {
            mac.update(&[1]);
            put_bytes(mac, h);
        }
    }
    put_opt_str(mac, batch.detail.as_deref());
    mac.update(
        &u64::try_from(records.len())
            .unwrap_or(u64::MAX)
            .to_be_bytes(),
    );
    for r in records {
        mac.update(&r.seq.to_be_bytes());
        put_ts(mac, r.occurred_at);
        put_str(mac, r.user);
        put_str(mac, r.purpose);
        put_opt_str(mac, r.request_id);
        put_str(mac, r.op);
        put_str(mac, r.owner_id);
        put_str(mac, r.table);
        put_opt_str(mac, r.row);
        put_str(mac, &r.fields);
    }
}

/// The chain keys of every version, for verification and checkpoints.
pub struct ChainKeys {
    keys: Arc<crate::OwnerKeys>,
}

impl fmt::Debug for ChainKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainKeys")
            .field("versions", &self.keys.versions().collect::<Vec<_>>())
            .finish()
    }
}

impl ChainKeys {
    /// The chain keys `keyring`'s KEKs can unwrap; `create` makes the
    /// first one when there is none.
    ///
    /// # Errors
    /// The keyring's errors resolving the reserved owner's keys.
    pub fn load(keyring: &Keyring, create: bool) -> Result<Self> {
        Ok(ChainKeys {
            keys: keyring.reserved_keys(ACCESS_LOG_OWNER, create)?,
        })
    }

    /// The key of `version`, if it is held.
    pub fn version(&self, version: u32) -> Option<ChainKey> {
        self.keys.dek(version).map(ChainKey::derive)
    }

    /// The current key.
    ///
    /// # Errors
    /// [`Error::NoKey`] when the reserved owner has no active key.
    pub fn current(&self) -> Result<ChainKey> {
        self.keys
            .current_version()
            .and_then(|v| self.version(v))
            .ok_or_else(|| Error::NoKey {
                owner: ACCESS_LOG_OWNER.to_owned(),
            })
    }
}

/// One stored batch (a row of `phi_access_batches`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchRow {
    /// The chain.
    pub chain: String,
    /// Its id: 1, 2, … within the chain.
    pub id: i64,
    /// [`KIND_RECORDS`] or [`KIND_CHECKPOINT`].
    pub kind: String,
    /// When the writer wrote it (UTC).
    pub written_at: NaiveDateTime,
    /// The newest record's time, or `written_at` for a batch without records.
    pub last_at: NaiveDateTime,
    /// How many records it holds.
    pub records: i64,
    /// The chain key version its hash is under.
    pub key_version: u32,
    /// The hash of the batch before.
    pub prev_hash: Vec<u8>,
    /// Its own hash.
    pub hash: Vec<u8>,
    /// A checkpoint's: the first batch kept.
    pub pruned_before: Option<i64>,
    /// A checkpoint's: the `prev_hash` of the first batch kept.
    pub pruned_hash: Option<Vec<u8>>,
    /// A checkpoint's: what was pruned.
    pub detail: Option<String>,
}

/// One stored access record (a row of `phi_access_log`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredAccess {
    /// The chain.
    pub chain: String,
    /// Its batch.
    pub batch: i64,
    /// Its place in the batch: 0, 1, …
    pub seq: u32,
    /// When the access happened (UTC).
    pub occurred_at: NaiveDateTime,
    /// The end user.
    pub user: String,
    /// The purpose.
    pub purpose: String,
    /// The request id, if one was given.
    pub request_id: Option<String>,
    /// The operation (`read`, `insert`, …, see [`crate::access::AccessOp`]).
    pub op: String,
    /// Whose record.
    pub owner_id: String,
    /// Which table.
    pub table: String,
    /// Which row.
    pub row: Option<String>,
    /// The fields touched, joined by `,`.
    pub fields: String,
}

/// One record as hashed and inserted (the columns of `phi_access_log` but
/// its chain and batch), borrowed from an [`AccessRecord`] being written or
/// a [`StoredAccess`] read back: no copy of its text.
pub(crate) struct RecordRef<'a> {
    pub(crate) seq: u32,
    pub(crate) occurred_at: NaiveDateTime,
    pub(crate) user: &'a str,
    pub(crate) purpose: &'a str,
    pub(crate) request_id: Option<&'a str>,
    pub(crate) op: &'a str,
    pub(crate) owner_id: &'a str,
    pub(crate) table: &'a str,
    pub(crate) row: Option<&'a str>,
    pub(crate) fields: Cow<'a, str>,
}

impl<'a> RecordRef<'a> {
    /// Record `r`, the `seq`th of its batch, as it is stored.
    pub(crate) fn of_record(seq: u32, r: &'a AccessRecord) -> Self {
        RecordRef {
            seq,
            occurred_at: to_micros(r.occurred_at),
            user: r.accessor.user(),
            purpose: r.accessor.purpose(),
            request_id: r.accessor.request_id(),
            op: r.op.as_str(),
            owner_id: &r.owner_id,
            table: &r.table,
            row: r.row.as_deref(),
            fields: match r.fields.as_slice() {
                [] => Cow::Borrowed(""),
                [one] => Cow::Borrowed(one.as_str()),
                many => Cow::Owned(many.join(",")),
            },
        }
    }

    fn of_stored(r: &'a StoredAccess) -> Self {
        RecordRef {
            seq: r.seq,
            occurred_at: r.occurred_at,
            user: &r.user,
            purpose: &r.purpose,
            request_id: r.request_id.as_deref(),
            op: &r.op,
            owner_id: &r.owner_id,
            table: &r.table,
            row: r.row.as_deref(),
            fields: Cow::Borrowed(&r.fields),
        }
    }
}

/// A time as the tables keep it: to the microsecond.
pub(crate) fn to_micros(t: NaiveDateTime) -> NaiveDateTime {
    let nanos = t.nanosecond();
    t.with_nanosecond(nanos - nanos % 1_000).unwrap_or(t)
}

/// The current time, as the tables keep it.
pub(crate) fn now() -> NaiveDateTime {
    to_micros(chrono::Utc::now().naive_utc())
}

/// A chain's head: the id and hash of its last batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainHead {
    /// The chain.
    pub chain: String,
    /// The id of its last batch.
    pub head: i64,
    /// The hash of its last batch.
    pub head_hash: Vec<u8>,
}

/// Which access records a query returns (every condition given must hold).
#[derive(Clone, Debug, Default)]
pub struct AccessFilter {
    /// Only this owner's records.
    pub owner: Option<String>,
    /// Only this end user's.
    pub user: Option<String>,
    /// Only this table's.
    pub table: Option<String>,
    /// Only this row's (the row key's text).
    pub row: Option<String>,
    /// Only those at or after this time (UTC).
    pub since: Option<NaiveDateTime>,
    /// Only those before this time (UTC).
    pub until: Option<NaiveDateTime>,
    /// Only this chain's.
    pub chain: Option<String>,
    /// At most this many (0: no limit); the oldest first.
    pub limit: usize,
    /// Skip this many first (with a limit): the next page.
    pub offset: usize,
}

/// What [`prune`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Access records deleted.
    pub access_records: u64,
    /// Access batches deleted (checkpoints included).
    pub access_batches: u64,
    /// The checkpoint appended to each chain pruned: (chain, its batch id).
    pub checkpoints: Vec<(String, i64)>,
    /// `encryption_key_audit` records deleted.
    pub key_audit_records: u64,
    /// `phi_key_events` deleted.
    pub feed_events: u64,
}

crate::shared::into_shared!(AccessLogStore);

/// The access log's tables in one database: what the writer, the queries,
/// [`verify`] and [`prune`] run on. [`DieselAccessLogStore`] implements it
/// for each backend.
pub trait AccessLogStore: Send + Sync + fmt::Debug {
    /// Appends one batch of `records` to `chain`, hashed under `key`, in
    /// one transaction; returns the batch's id.
    ///
    /// # Errors
    /// [`Error::Store`] when the write fails (nothing is written).
    fn append_batch(
        &self,
        chain: &str,
        key: &ChainKey,
        written_at: NaiveDateTime,
        records: &[AccessRecord],
    ) -> Result<i64>;

    /// Every chain's head, by name.
    ///
    /// # Errors
    /// [`Error::Store`] when the query fails.
    fn heads(&self) -> Result<Vec<ChainHead>>;

    /// The chains that have batches (with or without a head row).
    ///
    /// # Errors
    /// [`Error::Store`] when the query fails.
    fn chains_with_batches(&self) -> Result<Vec<String>>;

    /// The lowest batch id stored for `chain`.
    ///
    /// # Errors
    /// [`Error::Store`] when the query fails.
    fn first_batch(&self, chain: &str) -> Result<Option<i64>>;

    /// The checkpoint batch of `chain` whose `pruned_before` is `first`.
    ///
    /// # Errors
    /// [`Error::Store`] when the query fails.
    fn checkpoint(&self, chain: &str, first: i64) -> Result<Option<BatchRow>>;

    /// Up to `limit` batches of `chain` from id `from` on, in id order.
    ///
    /// # Errors
    /// [`Error::Store`] when the query fails.
    fn batches(&self, chain: &str, from: i64, limit: usize) -> Result<Vec<BatchRow>>;

    /// The records of `chain`'s batches `from..=to`, in (batch, seq) order.
    ///
    /// # Errors
    /// [`Error::Store`] when the query fails.
    fn batch_records(&self, chain: &str, from: i64, to: i64) -> Result<Vec<StoredAccess>>;

    /// A batch id of `chain` that has records but no batch row, if any.
    ///
    /// # Errors
    /// [`Error::Store`] when the query fails.
    fn orphan_batch(&self, chain: &str) -> Result<Option<i64>>;

    /// The records `filter` selects, oldest first.
    ///
    /// # Errors
    /// [`Error::Store`] when the query fails.
    fn query(&self, filter: &AccessFilter) -> Result<Vec<StoredAccess>>;

    /// Deletes, in one transaction, the access batches whose records all
    /// occurred before `before` (a prefix of each chain, with a checkpoint
    /// appended under `key`), the key audit records and the key events
    /// before `before`. Refused, with nothing deleted, when a feed reader
    /// has not read an event that would be deleted.
    ///
    /// # Errors
    /// [`Error::Refused`] as above; [`Error::Store`] when a query fails.
    fn prune(
        &self,
        before: NaiveDateTime,
        key: &ChainKey,
        written_at: NaiveDateTime,
    ) -> Result<PruneReport>;
}

/// Prunes the access log, the key audit trail and the key-event feed
/// before `before` (see [`AccessLogStore::prune`]); the checkpoints are
/// hashed under `keyring`'s current chain key.
///
/// # Errors
/// [`Error::Refused`] when a feed reader has not read an event that would
/// be deleted (nothing is deleted); the store's and keyring's errors.
pub fn prune(
    store: &dyn AccessLogStore,
    keyring: &Keyring,
    before: NaiveDateTime,
) -> Result<PruneReport> {
    let key = ChainKey::current(keyring)?;
    store.prune(to_micros(before), &key, now())
}

/// Checks what an [`AccessRecord`] will store, naming the field and its
/// limit.
pub(crate) fn check_record(r: &AccessRecord) -> Result<()> {
    let checks: [(&'static str, Option<&str>); 6] = [
        ("access record user id", Some(r.accessor.user())),
        ("access record purpose", Some(r.accessor.purpose())),
        ("access record request id", r.accessor.request_id()),
        ("access record table", Some(&r.table)),
        ("access record row", r.row.as_deref()),
        ("access record owner id", Some(&r.owner_id)),
    ];
    for (what, value) in checks {
        let Some(value) = value else { continue };
        let limit = if what == "access record owner id" {
            crate::MAX_OWNER_LEN
        } else {
            MAX_FIELD_LEN
        };
        if value.len() > limit {
            return Err(Error::InvalidInput {
                what,
                reason: format!(
                    "{} bytes, more than the {limit} the access log stores",
                    value.len()
                ),
            });
        }
    }
    Ok(())
}

/// Checks a chain name.
pub(crate) fn check_chain(chain: &str) -> Result<()> {
    if chain.is_empty() || chain.len() > MAX_CHAIN_LEN {
        return Err(Error::InvalidInput {
            what: "access log chain",
            reason: format!("a chain name is 1 to {MAX_CHAIN_LEN} bytes"),
        });
    }
    Ok(())
}

/// An [`AccessLog`] that writes into phi's access-log tables, in batches,
/// on a thread of its own (see the [module docs](self)).
///
/// ```no_run
/// # #[cfg(feature = "postgres")] {
/// use std::sync::Arc;
/// use diesel::PgConnection;
/// use phi_types::access_log::{DieselAccessLog, DieselAccessLogStore};
/// # fn f(keyring: &phi_types::Keyring) -> phi_types::Result<()> {
/// let url = "postgres://phi@db/clinic";
/// let tables = Arc::new(DieselAccessLogStore::<PgConnection>::connect(url)?);
/// // The keyring whose KEK the chain key derives from (it needs no log).
/// let log = DieselAccessLog::builder(tables).fail_closed(true).start(keyring)?;
/// # let _ = log; Ok(()) }
/// # }
/// ```
pub struct DieselAccessLog {
    writer: writer::Writer,
    chain: String,
}

impl fmt::Debug for DieselAccessLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DieselAccessLog")
            .field("chain", &self.chain)
            .field("writer", &self.writer)
            .finish()
    }
}

/// Options of a [`DieselAccessLog`].
#[derive(Debug)]
pub struct DieselAccessLogBuilder {
    store: Arc<dyn AccessLogStore>,
    chain: String,
    queue: usize,
    batch: usize,
    linger: std::time::Duration,
    fail_closed: bool,
    retry: std::time::Duration,
}

impl DieselAccessLog {
    /// A log writing into `store`: a store by value or an `Arc` of one
    /// ([`IntoShared`](crate::IntoShared)).
    pub fn builder(store: impl crate::IntoShared<dyn AccessLogStore>) -> DieselAccessLogBuilder {
        DieselAccessLogBuilder {
            store: store.into_shared(),
            chain: DEFAULT_CHAIN.to_owned(),
            queue: DEFAULT_QUEUE,
            batch: DEFAULT_BATCH,
            linger: DEFAULT_LINGER,
            fail_closed: false,
            retry: std::time::Duration::from_secs(1),
        }
    }

    /// The chain it writes to.
    pub fn chain(&self) -> &str {
        &self.chain
    }

    /// Records written, dropped, and queued now.
    pub fn counts(&self) -> AccessLogCounts {
        self.writer.counts()
    }
}

/// The counters of a [`DieselAccessLog`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccessLogCounts {
    /// Records written.
    pub written: u64,
    /// Records dropped (queue full, stopped).
    pub dropped: u64,
    /// Records queued and not yet written.
    pub pending: u64,
}

impl DieselAccessLogBuilder {
    /// The chain to write to (default [`DEFAULT_CHAIN`]).
    #[must_use]
    pub fn chain(mut self, chain: impl Into<String>) -> Self {
        self.chain = chain.into();
        self
    }

    /// Records queued at most (default [`DEFAULT_QUEUE`]).
    #[must_use]
    pub fn queue(mut self, records: usize) -> Self {
        self.queue = records.max(1);
        self
    }

    /// Records per batch at most (default [`DEFAULT_BATCH`]).
    #[must_use]
    pub fn batch(mut self, records: usize) -> Self {
        self.batch = records.max(1);
        self
    }

    /// How long the writer waits, at most, after the first record of a
    /// batch for more (default [`DEFAULT_LINGER`]; zero: write what is
    /// queued at once). Longer means fewer, larger transactions; records
    /// wait in memory that long before they are written (`flush` does not
    /// wait).
    #[must_use]
    pub fn linger(mut self, linger: std::time::Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Refuse `append` while records cannot be written (see the
    /// [module docs](self) for the trade-off). Default off.
    #[must_use]
    pub fn fail_closed(mut self, on: bool) -> Self {
        self.fail_closed = on;
        self
    }

    /// How long the writer waits before trying a failed batch again
    /// (default 1 s).
    #[must_use]
    pub fn retry_interval(mut self, interval: std::time::Duration) -> Self {
        self.retry = interval;
        self
    }

    /// Derives the chain key from `keyring`'s KEK (creating the reserved
    /// owner's first data key if there is none) and starts the writer.
    ///
    /// # Errors
    /// An invalid chain name; the keyring's errors; [`Error::Config`] when
    /// the writer thread cannot start.
    pub fn start(self, keyring: &Keyring) -> Result<DieselAccessLog> {
        let key = ChainKey::current(keyring)?;
        self.start_with_key(key)
    }

    /// Starts the writer with a chain key already derived.
    ///
    /// # Errors
    /// An invalid chain name; [`Error::Config`] when the writer thread
    /// cannot start.
    pub fn start_with_key(self, key: ChainKey) -> Result<DieselAccessLog> {
        check_chain(&self.chain)?;
        describe_metrics();
        let writer = writer::Writer::start(writer::Config {
            store: self.store,
            key,
            chain: self.chain.clone(),
            capacity: self.queue,
            batch: self.batch,
            linger: self.linger,
            fail_closed: self.fail_closed,
            retry: self.retry,
        })?;
        Ok(DieselAccessLog {
            writer,
            chain: self.chain,
        })
    }
}

impl AccessLog for DieselAccessLog {
    fn append(&self, records: Vec<AccessRecord>) -> Result<()> {
        for r in &records {
            check_record(r)?;
        }
        self.writer.push(records)
    }

    fn flush(&self) -> Result<()> {
        self.writer.flush()
    }

    fn queue_fill(&self) -> Option<crate::access::QueueFill> {
        Some(self.writer.fill())
    }
}

/// Registers the access log's metrics with the installed recorder.
pub fn describe_metrics() {
    crate::metrics::describe_access_log();
}

/// A record as JSON, as `phi audit access --format json` prints it and the
/// admin API's `GET /access-log` returns it (feature `cli` or
/// `admin-http`).
#[cfg(any(feature = "cli", feature = "admin-http"))]
pub fn record_json(r: &StoredAccess) -> serde_json::Value {
    serde_json::json!({
        "occurred_at": r.occurred_at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        "user": r.user,
        "purpose": r.purpose,
        "request_id": r.request_id,
        "op": r.op,
        "owner": r.owner_id,
        "table": r.table,
        "row": r.row,
        "fields": if r.fields.is_empty() { Vec::new() } else { r.fields.split(',').collect::<Vec<_>>() },
        "chain": r.chain,
        "batch": r.batch,
        "seq": r.seq,
    })
}
