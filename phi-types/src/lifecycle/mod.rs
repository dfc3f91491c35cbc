//! The key life cycle: KEK rotation (rewrap), data key rotation, re-seal,
//! retirement and crypto-shredding, plus key coverage of the application's
//! owners.
//!
//! ```text
//! rotate(owner)          add data key version n+1; new writes use it
//! reseal(owner, tables)  move the owner's values from older versions to n+1
//! retire(owner, v)       mark version v retired once no value uses it
//! rewrap()               rewrap every data key under the keyring's primary KEK
//! shred(owner)           destroy every version of the owner's keys
//! ```
//!
//! Every job is batched and resumable: a crash loses at most the batch in
//! flight (rolled back), and running the job again skips what is done.
//! Each operation is audited in `encryption_key_audit`.
//!
//! Values are found by the key version in their envelope header, at a fixed
//! offset, with SQL on the stored bytes: counting, finding and retiring never
//! decrypt. On a table with an encrypted flag
//! ([`ResealTable::flag_column`]) only rows whose flag is on are looked at:
//! a value stored unsealed is plain data, even one whose bytes begin like
//! an envelope. Re-sealing opens a value with its old version and seals the same
//! plaintext bytes under the current one for the same owner, scope and row
//! key; the plaintext never leaves the process and its buffer is zeroized.
//!
//! Other processes keep the keys they cached until their TTL expires (or
//! they clear the owner): after a rotation they may still seal under the
//! previous version for up to one TTL, which is why retirement counts the
//! values under a version at the moment it retires it, and why a retired
//! version still opens. After a shred, other processes' caches keep the
//! destroyed keys until their TTL expires: clear them (or restart) when
//! shredding must take effect everywhere at once.
//!
//! ```
//! use std::sync::Arc;
//! use phi_types::{lifecycle, Keyring, LocalKek, MemoryKeyStore, KeyBytes};
//!
//! let kek = Arc::new(LocalKek::new("local-1", &KeyBytes::new([7; 32])));
//! let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), kek).build()?;
//! let old = keyring.seal(&"Doe".to_string(), "provider-17", "cases.patient_last", b"C-1")?;
//!
//! assert_eq!(lifecycle::rotate(&keyring, "provider-17")?, 2);
//! let new = keyring.seal(&"Roe".to_string(), "provider-17", "cases.patient_last", b"C-2")?;
//! assert_eq!((old.key_version(), new.key_version()), (Some(1), Some(2)));
//! // The old version still opens.
//! let name: String = keyring.open(old, "provider-17", "cases.patient_last", b"C-1")?;
//! assert_eq!(name, "Doe");
//! # Ok::<(), phi_types::Error>(())
//! ```

mod due;
mod rotate_all;
pub(crate) mod tables;

use std::collections::HashMap;
use std::sync::Arc;

use zeroize::Zeroizing;

pub use due::{DueKey, DueReason, DueReport, due_keys, due_owner_ids};
pub use rotate_all::{
    MAX_JOB_ID_LEN, NewKeyVersion, RotateAllOptions, RotateAllReport, RotateOwners, RotatePlan,
    RotationClaim, RotationCounts, check_job_id, plan as rotate_all_plan, rotate_all,
    skip_locked_supported,
};
#[doc(hidden)]
pub use rotate_all::{RotateStage, rotate_all_interleaved};
pub use tables::{ColumnType, DataConnection, FlagType, ResealColumn, ResealTable};

use crate::error::{Error, Result};
use crate::feed::{FeedEvent, FeedReader, KeyEvent, KeyEventKind};
use crate::kek::KeyEncryptionKey;
use crate::keyring::{Keyring, OwnerKeys};
use crate::metrics;
use crate::record::Rollout;
use crate::sql::Encrypted;
use crate::store::{AuditAction, AuditEvent, KeyState, KeyStore, Rewrap, StoredKey};

/// Default rows per batch of the life-cycle jobs.
pub const DEFAULT_BATCH_SIZE: usize = 500;

fn event(
    keyring: &Keyring,
    owner: &str,
    action: AuditAction,
    version: Option<u32>,
    kek_id: Option<&str>,
    detail: Option<String>,
) -> AuditEvent {
    event_by(keyring.actor(), owner, action, version, kek_id, detail)
}

fn event_by(
    actor: &str,
    owner: &str,
    action: AuditAction,
    version: Option<u32>,
    kek_id: Option<&str>,
    detail: Option<String>,
) -> AuditEvent {
    AuditEvent {
        occurred_at: chrono::Utc::now().naive_utc(),
        owner_id: owner.to_owned(),
        action,
        key_version: version,
        kek_id: kek_id.map(str::to_owned),
        actor: actor.to_owned(),
        detail,
    }
}

fn kek_error(
    kek: &dyn KeyEncryptionKey,
    owner: &str,
    version: u32,
) -> impl FnOnce(crate::BoxError) -> Error {
    let kek_id = kek.id().to_owned();
    let owner = owner.to_owned();
    move |source| Error::Kek {
        kek_id,
        owner,
        key_version: version,
        source,
    }
}

fn load_owner(keyring: &Keyring, owner: &str) -> Result<Vec<StoredKey>> {
    keyring.check_owner_id_or_reserved(owner)?;
    let mut rows = keyring.store().load_keys(&[owner])?;
    rows.sort_by_key(|r| r.version);
    Ok(rows)
}

fn is_shredded(rows: &[StoredKey]) -> bool {
    !rows.is_empty() && rows.iter().all(|r| r.state == KeyState::Destroyed)
}

/// The version an owner's new values are sealed under: its highest active one.
fn current_version(rows: &[StoredKey]) -> Option<u32> {
    rows.iter()
        .filter(|r| r.state == KeyState::Active)
        .map(|r| r.version)
        .max()
}

// ---------------------------------------------------------------------------
// Data key rotation

/// Adds data key version n+1 for `owner`, wrapped by the keyring's primary
/// KEK, and drops the owner from this keyring's cache so its next seal uses
/// the new version. Older versions stay active for opening until retired.
/// Audited as `rotate`. Returns the new version.
///
/// # Errors
/// [`Error::Refused`] when the owner has no data key yet or another process
/// added the same version first, [`Error::Shredded`] for a shredded owner;
/// key store and KEK errors.
pub fn rotate(keyring: &Keyring, owner: &str) -> Result<u32> {
    rotate_by(keyring, owner, keyring.actor())
}

/// [`rotate`], audited with `actor` instead of the keyring's own (an
/// operator reported by the admin API's guard, say).
///
/// # Errors
/// As [`rotate`].
pub fn rotate_by(keyring: &Keyring, owner: &str, actor: &str) -> Result<u32> {
    let rows = load_owner(keyring, owner)?;
    let refuse = |reason: String| Error::Refused {
        operation: "rotate".into(),
        owner: owner.to_owned(),
        reason,
    };
    let Some(last) = rows.last().map(|r| r.version) else {
        return Err(refuse(
            "the owner has no data key yet (its first is created by its first seal or `keys generate`)".into(),
        ));
    };
    if is_shredded(&rows) {
        return Err(Error::Shredded {
            owner: owner.to_owned(),
        });
    }
    let version = last
        .checked_add(1)
        .ok_or_else(|| refuse("the owner has used every key version".into()))?;
    let kek = keyring.primary_kek();
    let (key, wrapped) =
        kek.generate(owner, version)
            .map_err(kek_error(kek.as_ref(), owner, version))?;
    drop(key);
    let row = StoredKey::active(owner, version, kek.id(), wrapped);
    let previous = current_version(&rows)
        .map(|v| format!("previous current version {v}"))
        .unwrap_or_else(|| "no previous active version".into());
    let audit = event_by(
        actor,
        owner,
        AuditAction::Rotate,
        Some(version),
        Some(kek.id()),
        Some(previous.clone()),
    );
    let feed = KeyEvent::new(KeyEventKind::Rotate, Some(owner), actor)
        .with_version(version)
        .with_detail(previous);
    if !keyring.store().add_key_version(&row, &audit, &feed)? {
        return Err(refuse(format!(
            "version {version} was added meanwhile by another process"
        )));
    }
    keyring.clear(owner);
    metrics::add(metrics::KEYS_ROTATED_TOTAL, 1);
    tracing::info!(
        owner = %keyring.owner_for_telemetry(owner),
        version,
        kek = kek.id(),
        "rotated a data key"
    );
    Ok(version)
}

// ---------------------------------------------------------------------------
// The fleet: cache clears, roll-out, the key-event feed

/// The owner id audit records of fleet-wide actions name: every owner.
pub const EVERY_OWNER: &str = "*";

/// Clears cached keys in every process following the key-event feed: of
/// `owner`, or of every owner when `None`. Clears this keyring's cache at
/// once, and appends a [`KeyEventKind::Clear`] event with its
/// `clear_cache` audit record (owner [`EVERY_OWNER`] for all) in one
/// transaction; every keyring following the feed
/// ([`KeyringBuilder::follow_feed`](crate::KeyringBuilder::follow_feed))
/// drops those keys within its interval, and unwraps them again on their
/// next use. Returns the event's id in the feed.
///
/// ```
/// use std::sync::Arc;
/// use phi_types::{lifecycle, Keyring, LocalKek, MemoryKeyStore, KeyBytes};
///
/// let kek = Arc::new(LocalKek::new("local-1", &KeyBytes::new([7; 32])));
/// let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), kek).build()?;
/// keyring.keys_for_seal("provider-17")?;
/// let id = lifecycle::clear_cache_fleet(&keyring, None)?;
/// assert_eq!(lifecycle::feed_head(keyring.store().as_ref())?, id);
/// assert_eq!(keyring.stats().cached_owners, 0);
/// # Ok::<(), phi_types::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidInput`] for an owner id the keyring refuses
/// ([`Keyring::check_owner_id`]); key store errors
/// (nothing is appended; this keyring's cache is cleared all the same).
pub fn clear_cache_fleet(keyring: &Keyring, owner: Option<&str>) -> Result<i64> {
    clear_cache_fleet_by(keyring, owner, keyring.actor())
}

/// [`clear_cache_fleet`], audited with `actor` instead of the keyring's own.
///
/// # Errors
/// As [`clear_cache_fleet`].
pub fn clear_cache_fleet_by(keyring: &Keyring, owner: Option<&str>, actor: &str) -> Result<i64> {
    if let Some(owner) = owner {
        keyring.check_owner_id_or_reserved(owner)?;
        keyring.clear(owner);
    } else {
        keyring.clear_all();
    }
    let detail = match owner {
        Some(_) => "fleet-wide cache clear of one owner",
        None => "fleet-wide cache clear of every owner",
    };
    let feed = KeyEvent::new(KeyEventKind::Clear, owner, actor).with_detail(detail);
    let audit = event_by(
        actor,
        owner.unwrap_or(EVERY_OWNER),
        AuditAction::ClearCache,
        None,
        None,
        Some(detail.into()),
    );
    let id = keyring.store().append_key_events(&[feed], &[audit])?;
    tracing::info!(
        owner = %owner.map_or(EVERY_OWNER.into(), |o| keyring.owner_for_telemetry(o).to_string()),
        event = id,
        "cleared cached keys fleet-wide"
    );
    Ok(id)
}

/// Sets the fleet's roll-out policy (`phi_rollout`, the policy named by
/// [`Keyring::rollout_policy`]): applies it to this
/// keyring at once, and stores it with a [`KeyEventKind::Rollout`] event
/// and a `rollout` audit record (owner [`EVERY_OWNER`]) in one
/// transaction; every keyring following the feed applies it within its
/// interval. Returns the event's id in the feed.
///
/// ```
/// use std::sync::Arc;
/// use phi_types::{lifecycle, Keyring, LocalKek, MemoryKeyStore, KeyBytes, Rollout};
///
/// let kek = Arc::new(LocalKek::new("local-1", &KeyBytes::new([7; 32])));
/// let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), kek).build()?;
/// lifecycle::set_rollout(&keyring, &Rollout::owners(["provider-17"]))?;
/// assert!(keyring.encrypts_for("provider-17"));
/// assert!(!keyring.encrypts_for("provider-18"));
/// assert_eq!(
///     lifecycle::fleet_rollout(keyring.store().as_ref(), keyring.rollout_policy())?,
///     Some(Rollout::owners(["provider-17"]))
/// );
/// # Ok::<(), phi_types::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidInput`] for an owner id the keyring refuses
/// ([`Keyring::check_owner_id`]); key store errors (nothing is changed,
/// here or in the store).
pub fn set_rollout(keyring: &Keyring, rollout: &Rollout) -> Result<i64> {
    set_rollout_by(keyring, rollout, keyring.actor())
}

/// [`set_rollout`], audited with `actor` instead of the keyring's own.
///
/// # Errors
/// As [`set_rollout`].
pub fn set_rollout_by(keyring: &Keyring, rollout: &Rollout, actor: &str) -> Result<i64> {
    if let Rollout::Owners(owners) = rollout {
        for owner in owners {
            keyring.check_owner_id(owner)?;
        }
    }
    let policy = keyring.rollout_policy();
    let detail = format!("policy {policy}: {}", describe_rollout(rollout));
    let feed = KeyEvent::new(KeyEventKind::Rollout, None, actor).with_detail(detail.clone());
    let audit = event_by(
        actor,
        EVERY_OWNER,
        AuditAction::Rollout,
        None,
        None,
        Some(detail),
    );
    let id = keyring
        .store()
        .set_fleet_rollout(policy, rollout, &feed, &[audit])?;
    keyring.set_rollout(rollout.clone());
    tracing::info!(event = id, "changed the fleet's roll-out");
    Ok(id)
}

/// A short description of a roll-out policy, for logs and audit records
/// (`all`, `nobody`, `3 owner(s)`).
pub fn describe_rollout(rollout: &Rollout) -> String {
    match rollout {
        Rollout::All => "all".into(),
        Rollout::Nobody => "nobody".into(),
        Rollout::Owners(owners) => format!("{} owner(s)", owners.len()),
    }
}

/// The fleet's roll-out policy named `policy` (see
/// [`KeyringBuilder::rollout_policy`](crate::KeyringBuilder::rollout_policy)),
/// or `None` when it was never set.
///
/// # Errors
/// Key store errors.
pub fn fleet_rollout(store: &dyn KeyStore, policy: &str) -> Result<Option<Rollout>> {
    store.fleet_rollout(policy)
}

/// The key-event feed's head: the id of the last event (0: none yet).
///
/// # Errors
/// Key store errors.
pub fn feed_head(store: &dyn KeyStore) -> Result<i64> {
    store.feed_head()
}

/// The feed's events after id `after`, oldest first, at most `limit`.
///
/// # Errors
/// Key store errors.
pub fn read_feed(store: &dyn KeyStore, after: i64, limit: usize) -> Result<Vec<FeedEvent>> {
    store.key_events_after(after, limit)
}

/// How far each keyring following the feed has read it, by reader name
/// (`phi_feed_readers`): each records its position at most once per feed
/// interval, and forgets it when it stops following.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use phi_types::{lifecycle, Keyring, LocalKek, MemoryKeyStore, KeyBytes};
///
/// let kek = Arc::new(LocalKek::new("local-1", &KeyBytes::new([7; 32])));
/// let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), kek)
///     .feed_interval(Duration::from_secs(2))
///     .feed_reader("web-1")
///     .build()?;
/// lifecycle::clear_cache_fleet(&keyring, None)?;
/// keyring.sync_feed();
/// let readers = lifecycle::feed_readers(keyring.store().as_ref())?;
/// assert_eq!(readers.len(), 1);
/// assert_eq!((readers[0].reader.as_str(), readers[0].position), ("web-1", 1));
/// # Ok::<(), phi_types::Error>(())
/// ```
///
/// # Errors
/// Key store errors.
pub fn feed_readers(store: &dyn KeyStore) -> Result<Vec<FeedReader>> {
    store.feed_readers()
}

// ---------------------------------------------------------------------------
// KEK rotation

/// Progress of a running [`rewrap`], after each committed batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RewrapProgress {
    /// Data keys that needed rewrapping when the job started.
    pub total: u64,
    /// Rewrapped so far by this run.
    pub rewrapped: u64,
    /// Changed by another process meanwhile (rewrapped or destroyed), left alone.
    pub skipped: u64,
    /// Batches committed so far.
    pub batches: u64,
}

/// Settings of [`rewrap`]: which data keys it moves, its batch size and a
/// progress callback.
///
/// ```
/// use phi_types::lifecycle::RewrapOptions;
///
/// let options = RewrapOptions::default()
///     .from_kek("local-1")
///     .batch_size(500)
///     .progress(|p| eprintln!("{} of {} rewrapped", p.rewrapped, p.total));
/// // let report = phi_types::lifecycle::rewrap(&keyring, &options)?;
/// # drop(options);
/// ```
#[derive(Clone, Debug, Default)]
pub struct RewrapOptions<'a> {
    from_kek: Option<String>,
    batch_size: usize,
    progress: crate::shared::Callback<'a, RewrapProgress>,
}

impl RewrapOptions<'_> {
    /// Only keys wrapped by the KEK `id` (default: every key not already
    /// under the target).
    #[must_use]
    pub fn from_kek(mut self, id: impl Into<String>) -> Self {
        self.from_kek = Some(id.into());
        self
    }

    /// [`from_kek`](Self::from_kek) when `Some`, every KEK when `None`.
    #[must_use]
    pub fn from_kek_opt(mut self, id: Option<String>) -> Self {
        self.from_kek = id;
        self
    }

    /// Keys per batch (one key-store transaction each); 0 (the default)
    /// means [`DEFAULT_BATCH_SIZE`].
    #[must_use]
    pub fn batch_size(mut self, keys: usize) -> Self {
        self.batch_size = keys;
        self
    }

    /// Calls `f` after each committed batch (default: no callback).
    #[must_use]
    pub fn progress<'b>(self, f: impl FnMut(&RewrapProgress) + 'b) -> RewrapOptions<'b> {
        RewrapOptions {
            from_kek: self.from_kek,
            batch_size: self.batch_size,
            progress: crate::shared::Callback::new(f),
        }
    }
}

/// KEK rotation: rewraps every data key row not wrapped by the keyring's
/// primary KEK (or only those of [`RewrapOptions::from_kek`]) under the
/// primary KEK. Each key is unwrapped by the KEK its row names (configure
/// it with [`KeyringBuilder::unwrap_with`](crate::KeyringBuilder::unwrap_with)),
/// wrapped by the primary, checked to unwrap back to the same key, and
/// written with a compare-and-set on the old KEK id, with a `rewrap` audit
/// record, one transaction per batch ([`KeyStore::rewrap_keys`]: on a
/// database store, one set-based `UPDATE` per batch). A row changed by
/// another process between the batch's read and its write is left alone
/// and counted in [`RewrapProgress::skipped`]. Data rows are never touched; the old
/// KEK keeps opening rows not yet rewrapped. A crash loses nothing: the
/// next run skips the rows already naming the primary KEK. Destroyed keys
/// are left alone.
///
/// # Errors
/// [`Error::UnknownKek`] for a row whose KEK is not configured,
/// [`Error::Kek`] when a KEK fails; key store errors. Batches committed
/// before the error stay committed.
pub fn rewrap(keyring: &Keyring, options: &RewrapOptions<'_>) -> Result<RewrapProgress> {
    rewrap_with(keyring, options, &mut |_| Ok(()))
}

/// [`rewrap`] with `between` called for each batch after its rows are read
/// and rewrapped and before they are written: a fixed interleaving in which
/// another process changes rows the batch has read, for tests of the
/// write's compare-and-set. Not for applications.
#[doc(hidden)]
pub fn rewrap_interleaved(
    keyring: &Keyring,
    options: &RewrapOptions<'_>,
    between: &mut dyn FnMut(&[StoredKey]) -> Result<()>,
) -> Result<RewrapProgress> {
    rewrap_with(keyring, options, between)
}

fn rewrap_with(
    keyring: &Keyring,
    scope: &RewrapOptions<'_>,
    between: &mut dyn FnMut(&[StoredKey]) -> Result<()>,
) -> Result<RewrapProgress> {
    let progress = |p: &RewrapProgress| scope.progress.call(p);
    let target = keyring.primary_kek().clone();
    let store = keyring.store();
    let batch = if scope.batch_size == 0 {
        DEFAULT_BATCH_SIZE
    } else {
        scope.batch_size
    };
    let from = scope.from_kek.as_deref();
    let mut report = RewrapProgress {
        total: store
            .key_counts()?
            .iter()
            .filter(|c| c.state != KeyState::Destroyed && c.kek_id != target.id())
            .filter(|c| from.is_none_or(|f| c.kek_id == f))
            .map(|c| c.keys)
            .sum(),
        ..RewrapProgress::default()
    };
    let _span = tracing::info_span!("phi.rewrap", to = target.id()).entered();
    let mut after: Option<(String, u32)> = None;
    loop {
        let page = store.keys_page(
            from,
            Some(target.id()),
            after.as_ref().map(|(o, v)| (o.as_str(), *v)),
            batch,
        )?;
        let Some(last) = page.last() else { break };
        after = Some((last.owner_id.clone(), last.version));
        let mut rewraps = Vec::with_capacity(page.len());
        for row in &page {
            rewraps.push(rewrap_one(keyring, &target, row)?);
        }
        between(&page)?;
        let applied = store.rewrap_keys(&rewraps)?;
        let done = applied.iter().filter(|a| **a).count() as u64;
        report.rewrapped += done;
        report.skipped += applied.len() as u64 - done;
        report.batches += 1;
        metrics::add(metrics::KEYS_REWRAPPED_TOTAL, done);
        progress(&report);
    }
    tracing::info!(
        rewrapped = report.rewrapped,
        skipped = report.skipped,
        "rewrap finished"
    );
    Ok(report)
}

fn rewrap_one(
    keyring: &Keyring,
    target: &Arc<dyn KeyEncryptionKey>,
    row: &StoredKey,
) -> Result<Rewrap> {
    let (owner, version) = (row.owner_id.as_str(), row.version);
    let old = keyring.kek(&row.kek_id).ok_or_else(|| Error::UnknownKek {
        owner: owner.to_owned(),
        key_version: version,
        kek_id: row.kek_id.clone(),
    })?;
    let key = old
        .unwrap(owner, version, &row.wrapped_key)
        .map_err(kek_error(old.as_ref(), owner, version))?;
    let wrapped =
        target
            .wrap(owner, version, &key)
            .map_err(kek_error(target.as_ref(), owner, version))?;
    let check = target.unwrap(owner, version, &wrapped).map_err(kek_error(
        target.as_ref(),
        owner,
        version,
    ))?;
    if check.expose() != key.expose() {
        return Err(kek_error(target.as_ref(), owner, version)(
            "the rewrapped key does not unwrap to the same key".into(),
        ));
    }
    Ok(Rewrap {
        owner_id: owner.to_owned(),
        version,
        from_kek: row.kek_id.clone(),
        to_kek: target.id().to_owned(),
        wrapped_key: wrapped,
        audit: event(
            keyring,
            owner,
            AuditAction::Rewrap,
            Some(version),
            Some(target.id()),
            Some(format!("from KEK {}", row.kek_id)),
        ),
    })
}

// ---------------------------------------------------------------------------
// Re-seal

/// Progress of a running [`reseal`], after each committed batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResealProgress {
    /// The owner's current version, which values are moved to.
    pub current_version: u32,
    /// Values under older versions when the job started, in every column.
    pub total: u64,
    /// Values re-sealed so far.
    pub resealed: u64,
    /// Values changed by the application between read and write, left to it
    /// (or to the next batch when still under an older version).
    pub conflicts: u64,
    /// The table of the last batch.
    pub table: String,
    /// The column of the last batch.
    pub column: String,
    /// Batches committed so far.
    pub batches: u64,
}

/// What a job sets on the application's connection first (SQLite: a busy
/// timeout when it has none; see [`crate::sqlite`]).
pub(crate) fn prepare_connection<C: DataConnection>(
    conn: &mut C,
    tables: &[ResealTable],
    owner: &str,
) -> Result<()> {
    crate::connection::prepare_application_connection(conn).map_err(|source| Error::DataTable {
        operation: "giving the application's SQLite connection a busy timeout",
        table: tables.first().map(|t| t.table.clone()).unwrap_or_default(),
        column: String::new(),
        owner: owner.to_owned(),
        source: source.into(),
    })
}

/// Consecutive batches with no progress before a re-seal gives up on a
/// column (values that keep changing under it).
const MAX_IDLE_BATCHES: u32 = 20;

/// Settings of [`reseal`]: its batch size and a progress callback.
#[derive(Clone, Debug, Default)]
pub struct ResealOptions<'a> {
    batch_size: usize,
    progress: crate::shared::Callback<'a, ResealProgress>,
}

impl ResealOptions<'_> {
    /// Values per batch (one transaction each); 0 (the default) means
    /// [`DEFAULT_BATCH_SIZE`].
    #[must_use]
    pub fn batch_size(mut self, values: usize) -> Self {
        self.batch_size = values;
        self
    }

    /// Calls `f` after each committed batch (default: no callback).
    #[must_use]
    pub fn progress<'b>(self, f: impl FnMut(&ResealProgress) + 'b) -> ResealOptions<'b> {
        ResealOptions {
            batch_size: self.batch_size,
            progress: crate::shared::Callback::new(f),
        }
    }
}

/// Re-seals every value of `owner` in `tables` that is under an older key
/// version than the owner's current one, so the older versions can be
/// retired. One transaction per batch of [`ResealOptions::batch_size`]
/// values (default [`DEFAULT_BATCH_SIZE`]); the options' progress callback
/// is called after each; rows are locked as they are read (`FOR UPDATE`,
/// or SQLite's write lock) and each `UPDATE` is guarded by the bytes read,
/// so a concurrent write of the application is never overwritten. NULLs,
/// values already under the current (or a newer) version and rows whose
/// encrypted flag is off are left alone.
/// Resumable: a crash rolls back the batch in flight and the next run finds
/// what is left by its key version. `conn` is the application's connection,
/// outside any transaction.
///
/// # Errors
/// [`Error::NoKey`] when the owner has no active version, the errors of
/// [`OwnerKeys::open`] for a value that does not open (named by scope, owner
/// and key version), [`Error::DataTable`] for a failed query.
pub fn reseal<C: DataConnection>(
    conn: &mut C,
    keyring: &Keyring,
    owner: &str,
    tables: &[ResealTable],
    options: &ResealOptions<'_>,
) -> Result<ResealProgress> {
    let batch_size = options.batch_size;
    let progress = |p: &ResealProgress| options.progress.call(p);
    keyring.check_owner_id_or_reserved(owner)?;
    for t in tables {
        t.validate()?;
    }
    prepare_connection(conn, tables, owner)?;
    let batch = if batch_size == 0 {
        DEFAULT_BATCH_SIZE
    } else {
        batch_size
    };
    // A fresh view: another process may have rotated.
    keyring.clear(owner);
    let keys = keyring.keys_for_open(owner)?;
    let current = keys.current_version().ok_or_else(|| {
        let rows = keyring.store().load_keys(&[owner]).unwrap_or_default();
        if is_shredded(&rows) {
            Error::Shredded {
                owner: owner.to_owned(),
            }
        } else {
            Error::NoKey {
                owner: owner.to_owned(),
            }
        }
    })?;
    let mut report = ResealProgress {
        current_version: current,
        ..ResealProgress::default()
    };
    for t in tables {
        for c in &t.columns {
            report.total += conn
                .key_versions_in_use(t, c, owner)?
                .iter()
                .filter(|(v, _)| *v < current)
                .map(|(_, n)| n)
                .sum::<u64>();
        }
    }
    let _span = tracing::info_span!(
        "phi.reseal",
        owner = %keyring.owner_for_telemetry(owner),
        current
    )
    .entered();
    for t in tables {
        for c in &t.columns {
            report.table.clone_from(&t.table);
            report.column.clone_from(&c.column);
            let mut idle = 0;
            loop {
                let mut rows: Vec<Option<String>> = Vec::new();
                let mut reseal = |value: &tables::StoredValue| -> Result<tables::Resealed> {
                    rows.push(crate::keyring::row_text(value.row()));
                    reseal_value(&keys, value.bytes.clone(), c, value.row())
                };
                let outcome = conn.reseal_batch(t, c, owner, current, batch, &mut reseal)?;
                keyring.record_job(
                    &t.table,
                    &[c.column.as_str()],
                    rows.into_iter().map(|row| (owner, row)),
                )?;
                if outcome.read == 0 {
                    break;
                }
                report.resealed += outcome.updated;
                report.conflicts += outcome.conflicts;
                report.batches += 1;
                metrics::add_for_table(metrics::VALUES_RESEALED_TOTAL, &t.table, outcome.updated);
                progress(&report);
                if outcome.updated == 0 {
                    idle += 1;
                    if idle == MAX_IDLE_BATCHES {
                        return Err(Error::DataTable {
                            operation: "re-sealing",
                            table: t.table.clone(),
                            column: c.column.clone(),
                            owner: owner.to_owned(),
                            source: format!(
                                "values of owner {owner:?} kept changing under {MAX_IDLE_BATCHES} batches in a row"
                            )
                            .into(),
                        });
                    }
                } else {
                    idle = 0;
                }
            }
        }
    }
    tracing::info!(
        owner = %keyring.owner_for_telemetry(owner),
        current,
        resealed = report.resealed,
        "re-seal finished"
    );
    Ok(report)
}

/// Opens one stored value of `column` (as raw plaintext bytes: every value
/// type's encoding is bytes) and seals it under the current version with
/// the same binding; computes the value's blind and derived indexes under
/// that same version from the plaintext (the encoding the model indexes).
fn reseal_value(
    keys: &OwnerKeys,
    stored: Vec<u8>,
    column: &ResealColumn,
    row: &[u8],
) -> Result<tables::Resealed> {
    let scope = column.scope.as_str();
    let plain = Zeroizing::new(keys.open::<Vec<u8>>(Encrypted::from_bytes(stored), scope, row)?);
    let value = keys.seal::<Vec<u8>>(&plain, scope, row)?.into_bytes();
    let indexes = column
        .indexes()
        .map(|(_, index)| index.current(keys, scope, &plain))
        .collect::<Result<_>>()?;
    Ok(tables::Resealed { value, indexes })
}

// ---------------------------------------------------------------------------
// Usage, retirement

/// How many values of one owner in one column use one key version.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionUsage {
    /// The table.
    pub table: String,
    /// The column.
    pub column: String,
    /// The key version.
    pub key_version: u32,
    /// Values under that version.
    pub values: u64,
}

/// Counts `owner`'s values in `tables` per column and key version, from the
/// envelope headers (nothing is decrypted); rows whose encrypted flag is
/// off are not counted.
///
/// # Errors
/// [`Error::DataTable`] for a failed query, [`Error::Config`] for a bad
/// table description.
pub fn usage<C: DataConnection>(
    conn: &mut C,
    owner: &str,
    tables: &[ResealTable],
) -> Result<Vec<VersionUsage>> {
    let mut out = Vec::new();
    for t in tables {
        t.validate()?;
        for c in &t.columns {
            for (key_version, values) in conn.key_versions_in_use(t, c, owner)? {
                out.push(VersionUsage {
                    table: t.table.clone(),
                    column: c.column.clone(),
                    key_version,
                    values,
                });
            }
        }
    }
    Ok(out)
}

/// Retires data key version `version` of `owner`: it keeps opening values
/// but never seals again. Refused while any value in `tables` uses it
/// (counted from the envelope headers of rows whose encrypted flag, if the
/// table has one, is on), and for the owner's current version
/// (rotate first, so a newer one exists). Audited as `retire`. Returns
/// whether this call retired it (`false`: it was already retired).
///
/// # Errors
/// [`Error::KeyInUse`] naming the table, column and count of values still
/// under the version; [`Error::Refused`] for the current, a destroyed or an
/// unknown version; query and key store errors.
pub fn retire<C: DataConnection>(
    conn: &mut C,
    keyring: &Keyring,
    owner: &str,
    version: u32,
    tables: &[ResealTable],
) -> Result<bool> {
    let rows = load_owner(keyring, owner)?;
    let refuse = |reason: String| Error::Refused {
        operation: format!("retire version {version}"),
        owner: owner.to_owned(),
        reason,
    };
    let Some(row) = rows.iter().find(|r| r.version == version) else {
        return Err(refuse(format!(
            "the owner has no data key version {version}"
        )));
    };
    match row.state {
        KeyState::Retired => return Ok(false),
        KeyState::Destroyed => return Err(refuse("the version was destroyed".into())),
        _ => {}
    }
    if current_version(&rows) == Some(version) {
        return Err(refuse(format!(
            "version {version} is the current version: rotate first so a newer version seals"
        )));
    }
    for t in tables {
        t.validate()?;
        for c in &t.columns {
            let rows = conn
                .key_versions_in_use(t, c, owner)?
                .into_iter()
                .find(|(v, _)| *v == version)
                .map_or(0, |(_, n)| n);
            if rows > 0 {
                return Err(Error::KeyInUse {
                    owner: owner.to_owned(),
                    key_version: version,
                    table: t.table.clone(),
                    column: c.column.clone(),
                    rows,
                });
            }
        }
    }
    let retired = keyring.store().set_key_state(
        owner,
        version,
        KeyState::Active,
        KeyState::Retired,
        &event(
            keyring,
            owner,
            AuditAction::Retire,
            Some(version),
            Some(&row.kek_id),
            None,
        ),
    )?;
    keyring.clear(owner);
    if retired {
        metrics::add(metrics::KEYS_RETIRED_TOTAL, 1);
        tracing::info!(
            owner = %keyring.owner_for_telemetry(owner),
            version,
            "retired a data key version"
        );
    }
    Ok(retired)
}

// ---------------------------------------------------------------------------
// Crypto-shredding

/// What [`shred`] did and found; [`ShredReport::outcome`] says whether
/// that proves anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShredReport {
    /// Versions destroyed by this call.
    pub destroyed_versions: Vec<u32>,
    /// Data key rows of the owner afterwards, destroyed by this call or
    /// before (0: the owner never had a key here; a mistyped owner id?).
    pub key_rows: usize,
    /// Data key rows of the owner still holding key material afterwards
    /// (0 when shredding worked).
    pub keys_left: usize,
    /// Encrypted columns checked, over every table given.
    pub columns: usize,
    /// Stored values sampled from the tables.
    pub sampled: usize,
    /// Sampled values that still opened (0 when shredding worked).
    pub still_open: usize,
    /// Non-NULL values of the owner in those columns that are not sealed
    /// envelopes: rows stored in the clear (encrypted flag off, never
    /// backfilled or decrypted back). Shredding does not protect them:
    /// they stay readable until the application deletes them.
    pub in_clear: u64,
}

/// Whether a [`shred`] is verified.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShredOutcome {
    /// Not verified, for these reasons (at least one).
    NotVerified(Vec<UnverifiedReason>),
    /// Verified: the owner has data key rows, none holds key material, and
    /// at least one sampled value was checked and none opens.
    Verified,
}

/// Why a [`shred`] is not verified.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnverifiedReason {
    /// Key rows of the owner still hold key material.
    KeyMaterialLeft {
        /// How many.
        rows: usize,
    },
    /// The owner has no data key row at all: nothing was destroyed, and
    /// nothing proves the owner id names anyone (mistyped?).
    NoKeyRows,
    /// Tables were given but none of their columns holds a sealed value of
    /// the owner: nothing was checked.
    NoSampledValues,
    /// No table was given: no stored value was checked.
    NoTables,
    /// Sampled values that still open.
    StillOpen {
        /// Values that opened.
        values: usize,
        /// Values sampled.
        sampled: usize,
    },
}

impl std::fmt::Display for UnverifiedReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnverifiedReason::KeyMaterialLeft { rows } => {
                write!(f, "{rows} data key row(s) still hold key material")
            }
            UnverifiedReason::NoKeyRows => f.write_str(
                "the owner has no data key row: nothing was destroyed (is the owner id mistyped?)",
            ),
            UnverifiedReason::NoSampledValues => f.write_str(
                "no sealed value of the owner was found in the configured columns: nothing was checked",
            ),
            UnverifiedReason::NoTables => {
                f.write_str("no table is configured (--table): no stored value was checked")
            }
            UnverifiedReason::StillOpen { values, sampled } => {
                write!(f, "{values} of {sampled} sampled value(s) still open")
            }
        }
    }
}

impl ShredReport {
    /// Verified only when the owner has at least one data key row, none
    /// holds key material, at least one stored value was sampled and none
    /// opens. Values stored in the clear ([`ShredReport::in_clear`]) do not
    /// enter: shredding cannot protect them, and says so.
    pub fn outcome(&self) -> ShredOutcome {
        let mut reasons = Vec::new();
        if self.key_rows == 0 {
            reasons.push(UnverifiedReason::NoKeyRows);
        }
        if self.keys_left > 0 {
            reasons.push(UnverifiedReason::KeyMaterialLeft {
                rows: self.keys_left,
            });
        }
        if self.columns == 0 {
            reasons.push(UnverifiedReason::NoTables);
        } else if self.sampled == 0 {
            reasons.push(UnverifiedReason::NoSampledValues);
        }
        if self.still_open > 0 {
            reasons.push(UnverifiedReason::StillOpen {
                values: self.still_open,
                sampled: self.sampled,
            });
        }
        if reasons.is_empty() {
            ShredOutcome::Verified
        } else {
            ShredOutcome::NotVerified(reasons)
        }
    }

    /// Whether [`ShredReport::outcome`] is [`ShredOutcome::Verified`].
    pub fn verified(&self) -> bool {
        self.outcome() == ShredOutcome::Verified
    }
}

/// Crypto-shredding: destroys every data key version of `owner` (state
/// `destroyed`, wrapped key overwritten with an empty value) in one
/// transaction, audited as `destroy` per version; drops the owner from this
/// keyring's cache; then verifies, from the key store and on up to `sample`
/// stored values per column of `tables`, that nothing of the owner opens
/// any more, and counts the owner's values in those columns stored in the
/// clear. Other owners are untouched. Afterwards sealing for the owner
/// fails with [`Error::Shredded`]: no new key is ever created for it
/// silently.
///
/// What this guarantees, exactly: the owner's sealed values no longer open
/// from this database, now. Other processes keep their cached copy of the
/// keys until their cache TTL expires or they clear the owner. The old
/// wrapped keys survive in the database's free pages and write-ahead log,
/// in server logs and point-in-time-recovery archives, and in every backup:
/// those open again with the KEK that wrapped them, so backups are
/// unreadable only once they expire, or once that KEK is rotated away
/// ([`rewrap`]) and destroyed.
///
/// The report's [`ShredReport::outcome`] is verified only when it proves
/// something: a mistyped owner (no key rows), no tables or no sampled value
/// is [`ShredOutcome::NotVerified`] with the reason.
///
/// Every version not destroyed when the destroy runs is destroyed, those
/// created since the caller last looked included: after a listing shown to
/// a person, use [`shred_listed`], which destroys only what was listed.
///
/// # Errors
/// Key store and query errors (when the destroy itself failed, nothing was
/// changed).
pub fn shred<C: DataConnection>(
    conn: &mut C,
    keyring: &Keyring,
    owner: &str,
    tables: &[ResealTable],
    sample: usize,
) -> Result<ShredReport> {
    shred_verified(conn, keyring, owner, None, tables, sample)
}

/// [`shred`] of the key versions a caller listed and had confirmed
/// (`listed`, e.g. by a person at a prompt): when the owner has a version
/// not destroyed that is not among them (a key created after the listing;
/// for an owner listed with no key, any key at all), nothing is destroyed
/// and the call is refused. The check and the destroy are one transaction
/// of the key store.
///
/// # Errors
/// [`Error::Refused`] when a version not listed exists (nothing was
/// changed); otherwise as [`shred`].
pub fn shred_listed<C: DataConnection>(
    conn: &mut C,
    keyring: &Keyring,
    owner: &str,
    listed: &[u32],
    tables: &[ResealTable],
    sample: usize,
) -> Result<ShredReport> {
    shred_verified(conn, keyring, owner, Some(listed), tables, sample)
}

fn shred_verified<C: DataConnection>(
    conn: &mut C,
    keyring: &Keyring,
    owner: &str,
    listed: Option<&[u32]>,
    tables: &[ResealTable],
    sample: usize,
) -> Result<ShredReport> {
    keyring.check_owner_id_or_reserved(owner)?;
    for t in tables {
        t.validate()?;
    }
    let mut report = shred_keys(keyring, owner, listed, keyring.actor())?;
    let keys = keyring.keys_for_open(owner)?;
    for t in tables {
        for c in &t.columns {
            report.columns += 1;
            for value in conn.sample_values(t, c, owner, sample)? {
                report.sampled += 1;
                let opened = keys.open::<Vec<u8>>(
                    Encrypted::from_bytes(value.bytes.clone()),
                    &c.scope,
                    value.row(),
                );
                if let Ok(plain) = opened {
                    drop(Zeroizing::new(plain));
                    report.still_open += 1;
                }
            }
            report.in_clear += conn.count_clear_values(t, c, owner)?;
        }
    }
    Ok(report)
}

/// The key half of [`shred`], audited with `actor`: destroys every data
/// key version of `owner` in one transaction (audited as `destroy` per
/// version), drops the owner from this keyring's cache, and reports the
/// owner's key rows afterwards. No stored value is sampled, so the report's
/// [`ShredReport::outcome`] is never verified (no tables); the admin API
/// uses it.
///
/// # Errors
/// Key store errors (when the destroy itself failed, nothing was changed).
pub fn shred_keys_by(keyring: &Keyring, owner: &str, actor: &str) -> Result<ShredReport> {
    shred_keys(keyring, owner, None, actor)
}

/// [`shred_keys_by`], of the `listed` versions only when given (see
/// [`KeyStore::destroy_keys`](crate::KeyStore::destroy_keys)).
fn shred_keys(
    keyring: &Keyring,
    owner: &str,
    listed: Option<&[u32]>,
    actor: &str,
) -> Result<ShredReport> {
    keyring.check_owner_id_or_reserved(owner)?;
    // phi's own keys (`phi:lookup`) are rotated and retired, never shredded:
    // shredding them would leave every lookup-indexed model unwritable.
    if owner.starts_with(crate::keyring::RESERVED_OWNER_PREFIX) {
        return Err(Error::InvalidInput {
            what: "owner id",
            reason: format!(
                "owner ids beginning with {:?} are phi's own keys, which are rotated and retired, never shredded",
                crate::keyring::RESERVED_OWNER_PREFIX
            ),
        });
    }
    let destroyed_versions = keyring.store().destroy_keys(
        owner,
        listed,
        &event_by(
            actor,
            owner,
            AuditAction::Destroy,
            None,
            None,
            Some("crypto-shredded".into()),
        ),
    )?;
    keyring.clear(owner);
    metrics::add(
        metrics::KEYS_DESTROYED_TOTAL,
        destroyed_versions.len() as u64,
    );
    tracing::warn!(
        owner = %keyring.owner_for_telemetry(owner),
        versions = ?destroyed_versions,
        "crypto-shredded an owner"
    );
    let rows = keyring.store().load_keys(&[owner])?;
    let keys_left = rows
        .iter()
        .filter(|r| r.state != KeyState::Destroyed || !r.wrapped_key.is_empty())
        .count();
    Ok(ShredReport {
        destroyed_versions,
        key_rows: rows.len(),
        keys_left,
        ..ShredReport::default()
    })
}

// ---------------------------------------------------------------------------
// Coverage

/// Key coverage of the owners an application query returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Coverage {
    /// Owners the query returned.
    pub owners: usize,
    /// Owners with an active data key.
    pub with_active_key: usize,
    /// Owners with no data key row at all.
    pub without_key: Vec<String>,
    /// Owners whose key rows are all retired (none seals).
    pub all_retired: Vec<String>,
    /// Owners crypto-shredded.
    pub shredded: usize,
}

impl Coverage {
    /// Percentage of owners with an active key (100 when there are none).
    #[allow(clippy::cast_precision_loss)] // A display percentage.
    pub fn percent(&self) -> f64 {
        if self.owners == 0 {
            100.0
        } else {
            self.with_active_key as f64 * 100.0 / self.owners as f64
        }
    }
}

/// Runs `owners_query` (see [`KeyStore::owners_from_query`]) and classifies
/// its owners by their data keys.
///
/// # Errors
/// Key store errors, or a failing owners query.
pub fn coverage(store: &dyn KeyStore, owners_query: &str) -> Result<Coverage> {
    let owners = store.owners_from_query(owners_query)?;
    let mut cov = Coverage {
        owners: owners.len(),
        ..Coverage::default()
    };
    for chunk in owners.chunks(5_000) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let mut by_owner: HashMap<&str, Vec<KeyState>> = HashMap::new();
        let rows = store.load_keys(&refs)?;
        for row in &rows {
            by_owner.entry(&row.owner_id).or_default().push(row.state);
        }
        for owner in chunk {
            match by_owner.get(owner.as_str()) {
                None => cov.without_key.push(owner.clone()),
                Some(states) if states.contains(&KeyState::Active) => cov.with_active_key += 1,
                Some(states) if states.iter().all(|s| *s == KeyState::Destroyed) => {
                    cov.shredded += 1;
                }
                Some(_) => cov.all_retired.push(owner.clone()),
            }
        }
    }
    Ok(cov)
}

/// Settings of [`generate`]: its batch size and a progress callback.
#[derive(Clone, Debug, Default)]
pub struct GenerateOptions<'a> {
    batch_size: usize,
    progress: crate::shared::Callback<'a, usize>,
}

impl GenerateOptions<'_> {
    /// Owners per batch; 0 (the default) means [`DEFAULT_BATCH_SIZE`].
    #[must_use]
    pub fn batch_size(mut self, owners: usize) -> Self {
        self.batch_size = owners;
        self
    }

    /// Calls `f` after each batch with the number of owners done so far
    /// (default: no callback).
    #[must_use]
    pub fn progress<'b>(self, f: impl FnMut(&usize) + 'b) -> GenerateOptions<'b> {
        GenerateOptions {
            batch_size: self.batch_size,
            progress: crate::shared::Callback::new(f),
        }
    }
}

/// Creates a data key for each owner in `owners` that has none (batches of
/// [`GenerateOptions::batch_size`]), race-safe as every first
/// seal is; pass [`Coverage::without_key`]. An owner that already has keys
/// gets none here: one with an active key is left as it is, a shredded one
/// fails the batch with [`Error::Shredded`], one with retired keys only with
/// [`Error::NoKey`]. Reports the owners done so far after each batch to
/// the options' progress callback; returns how many keys this call created.
///
/// # Errors
/// Key store and KEK errors, and the two above; batches done before stay
/// done.
pub fn generate(
    keyring: &Keyring,
    owners: &[String],
    options: &GenerateOptions<'_>,
) -> Result<u64> {
    let batch_size = options.batch_size;
    let batch = if batch_size == 0 {
        DEFAULT_BATCH_SIZE
    } else {
        batch_size
    };
    let before = keyring.stats().creations;
    let mut done = 0;
    for chunk in owners.chunks(batch) {
        keyring.keys_for_seal_many(chunk.iter().map(String::as_str))?;
        done += chunk.len();
        options.progress.call(&done);
    }
    Ok(keyring.stats().creations - before)
}
