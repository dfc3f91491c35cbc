//! The key store: wrapped data keys and the audit trail, in the
//! application's database.
//!
//! Tables (created by the embedded [`migrations`](crate::migrations)):
//!
//! - `user_encryption_keys (owner_id, version, kek_id, wrapped_key, state,
//!   created_at, updated_at)`, primary key `(owner_id, version)`;
//! - `encryption_key_audit (id, occurred_at, owner_id, action, key_version,
//!   kek_id, actor, detail)`;
//! - `kek_check_values (kek_id, format, check_value, created_at)`, primary
//!   key `kek_id`: one [`KekCheck`] per KEK id, written once, when a keyring
//!   is first built with that KEK.
//!
//! The [`Keyring`](crate::Keyring) reaches the store through a connection
//! pool of its own, never the caller's transaction, so a new data key row is
//! committed before any value sealed under it can be written.

#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
mod builder;
pub(crate) mod claims;
#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
mod diesel_store;
mod memory;

/// In a test's key store double, the `KeyStore` methods it does not
/// change, each handed to the store in `$field`.
#[cfg(test)]
macro_rules! forward_key_store {
    ($field:ident; $($method:ident),* $(,)?) => {
        $(crate::store::forward_key_store!(@one $field $method);)*
    };
    (@one $f:ident load_keys) => {
        fn load_keys(&self, owners: &[&str]) -> crate::Result<Vec<crate::StoredKey>> {
            self.$f.load_keys(owners)
        }
    };
    (@one $f:ident insert_key_if_absent) => {
        fn insert_key_if_absent(&self, key: &crate::StoredKey) -> crate::Result<bool> {
            self.$f.insert_key_if_absent(key)
        }
    };
    (@one $f:ident append_audit) => {
        fn append_audit(&self, events: &[crate::AuditEvent]) -> crate::Result<()> {
            self.$f.append_audit(events)
        }
    };
    (@one $f:ident owners) => {
        fn owners(&self) -> crate::Result<Vec<String>> {
            self.$f.owners()
        }
    };
    (@one $f:ident kek_check) => {
        fn kek_check(&self, kek_id: &str) -> crate::Result<Option<crate::KekCheck>> {
            self.$f.kek_check(kek_id)
        }
    };
    (@one $f:ident insert_kek_check_if_absent) => {
        fn insert_kek_check_if_absent(&self, kek_id: &str, check: &crate::KekCheck) -> crate::Result<bool> {
            self.$f.insert_kek_check_if_absent(kek_id, check)
        }
    };
    (@one $f:ident keys_page) => {
        fn keys_page(
            &self,
            wrapped_by: Option<&str>,
            not_wrapped_by: Option<&str>,
            after: Option<(&str, u32)>,
            limit: usize,
        ) -> crate::Result<Vec<crate::StoredKey>> {
            self.$f.keys_page(wrapped_by, not_wrapped_by, after, limit)
        }
    };
}
#[cfg(test)]
pub(crate) use forward_key_store;

pub mod schema;

use std::collections::HashSet;
use std::fmt;

use chrono::NaiveDateTime;

#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
pub use builder::{PooledStore, StoreBuilder};
#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
pub(crate) use builder::{open_pool, sealed::Sealed as PooledStoreSealed};
#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
pub(crate) use diesel_store::Connecting;
#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
pub use diesel_store::{DieselKeyStore, DieselKeyStoreBuilder};
pub use memory::MemoryKeyStore;

use crate::error::Result;
use crate::feed::{FeedEvent, FeedListener, FeedReader, KeyEvent};
use crate::kek::KekCheck;

/// Which owners' new rows are sealed, for models with an encrypted flag
/// (the gradual roll-out). Set on the [`Keyring`](crate::Keyring); the default is
/// [`Rollout::All`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rollout {
    /// Every owner's new rows are sealed.
    #[default]
    All,
    /// Only these owners' new rows are sealed.
    Owners(HashSet<String>),
    /// No new row is sealed (rows already sealed stay sealed when updated).
    Nobody,
}

impl Rollout {
    /// Whether new rows of `owner` are sealed.
    pub fn encrypts(&self, owner: &str) -> bool {
        match self {
            Rollout::All => true,
            Rollout::Owners(owners) => owners.contains(owner),
            Rollout::Nobody => false,
        }
    }

    /// An allow-list of owners.
    pub fn owners<I, S>(owners: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Rollout::Owners(owners.into_iter().map(Into::into).collect())
    }
}

/// Life-cycle state of a data key version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyState {
    /// Seals new values (the highest active version) and opens old ones.
    Active,
    /// Its key material was destroyed: values under it no longer open.
    Destroyed,
    /// Opens old values; never seals new ones.
    Retired,
}

impl KeyState {
    /// The text stored in `user_encryption_keys.state`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Destroyed => "destroyed",
            KeyState::Retired => "retired",
        }
    }

    /// Parses the stored text.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(KeyState::Active),
            "destroyed" => Some(KeyState::Destroyed),
            "retired" => Some(KeyState::Retired),
            _ => None,
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One row of `user_encryption_keys`.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredKey {
    /// The owner.
    pub owner_id: String,
    /// Data key version (1, 2, ...).
    pub version: u32,
    /// The KEK that wrapped the key.
    pub kek_id: String,
    /// The wrapped key, as the KEK produced it.
    pub wrapped_key: Vec<u8>,
    /// Life-cycle state.
    pub state: KeyState,
    /// When the row was created (UTC).
    pub created_at: NaiveDateTime,
}

impl StoredKey {
    /// A new active data key row of `owner`, created now, wrapped by the
    /// KEK `kek_id`.
    pub fn active(
        owner_id: impl Into<String>,
        version: u32,
        kek_id: impl Into<String>,
        wrapped_key: Vec<u8>,
    ) -> Self {
        StoredKey {
            owner_id: owner_id.into(),
            version,
            kek_id: kek_id.into(),
            wrapped_key,
            state: KeyState::Active,
            created_at: chrono::Utc::now().naive_utc(),
        }
    }
}

impl fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The wrapped key is not secret, but it has no business in logs.
        f.debug_struct("StoredKey")
            .field("owner_id", &self.owner_id)
            .field("version", &self.version)
            .field("kek_id", &self.kek_id)
            .field("state", &self.state)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

/// What happened to a key, as recorded in `encryption_key_audit.action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuditAction {
    /// An owner's data key versions were destroyed (crypto-shredding).
    Destroy,
    /// A new data key was generated and stored.
    Generate,
    /// A data key version was retired.
    Retire,
    /// A data key was rewrapped under another KEK.
    Rewrap,
    /// A new data key version was added for an owner.
    Rotate,
    /// A data key was unwrapped into the cache.
    Unwrap,
    /// Cached keys were cleared fleet-wide (owner `*`: every owner).
    ClearCache,
    /// The fleet's roll-out policy was changed (owner `*`).
    Rollout,
    /// A request of the admin HTTP API, admitted by its guard (`detail`
    /// names the route and what it did).
    Admin,
    /// A request of the admin HTTP API that its guard refused; nothing was
    /// changed.
    Denied,
}

impl AuditAction {
    /// The text stored in `encryption_key_audit.action`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Destroy => "destroy",
            AuditAction::Generate => "generate",
            AuditAction::Retire => "retire",
            AuditAction::Rewrap => "rewrap",
            AuditAction::Rotate => "rotate",
            AuditAction::Unwrap => "unwrap",
            AuditAction::ClearCache => "clear_cache",
            AuditAction::Rollout => "rollout",
            AuditAction::Admin => "admin",
            AuditAction::Denied => "denied",
        }
    }

    /// Parses the stored text.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "destroy" => AuditAction::Destroy,
            "generate" => AuditAction::Generate,
            "retire" => AuditAction::Retire,
            "rewrap" => AuditAction::Rewrap,
            "rotate" => AuditAction::Rotate,
            "unwrap" => AuditAction::Unwrap,
            "clear_cache" => AuditAction::ClearCache,
            "rollout" => AuditAction::Rollout,
            "admin" => AuditAction::Admin,
            "denied" => AuditAction::Denied,
            _ => return None,
        })
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One audit record to append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    /// When it happened (UTC).
    pub occurred_at: NaiveDateTime,
    /// Whose key.
    pub owner_id: String,
    /// What happened.
    pub action: AuditAction,
    /// Which data key version, if one.
    pub key_version: Option<u32>,
    /// Which KEK, if one.
    pub kek_id: Option<String>,
    /// Who did it (service name, operator).
    pub actor: String,
    /// Free text for the operator; never key bytes or plaintext.
    pub detail: Option<String>,
}

crate::shared::into_shared!(KeyStore);

/// Where wrapped data keys and audit records live.
///
/// [`DieselKeyStore`] keeps them in the application's database;
/// [`MemoryKeyStore`] keeps them in memory for tests and examples.
pub trait KeyStore: Send + Sync + fmt::Debug {
    /// Every version of the given owners' data keys, destroyed ones included,
    /// in one query.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure.
    fn load_keys(&self, owners: &[&str]) -> Result<Vec<StoredKey>>;

    /// Inserts `key` unless a row with the same (owner, version) exists.
    /// Returns whether this call inserted it.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure.
    fn insert_key_if_absent(&self, key: &StoredKey) -> Result<bool>;

    /// Appends audit records.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure.
    fn append_audit(&self, events: &[AuditEvent]) -> Result<()>;

    /// The check value stored for the KEK `kek_id`, if one is.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure.
    fn kek_check(&self, kek_id: &str) -> Result<Option<KekCheck>>;

    /// Stores `check` for the KEK `kek_id` unless a check value is already
    /// stored for it (then nothing changes). Returns whether this call
    /// stored it. Two processes racing for a new KEK id: one wins, and
    /// both then verify against the winner.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure.
    fn insert_kek_check_if_absent(&self, kek_id: &str, check: &KekCheck) -> Result<bool>;

    /// Every owner that has at least one data key row.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure.
    fn owners(&self) -> Result<Vec<String>>;

    /// The state of the store's connection pool, where it has one (for
    /// [`Keyring::readiness`](crate::Keyring::readiness)); `None` by default.
    fn pool_state(&self) -> Option<PoolState> {
        None
    }

    /// A page of data key rows in `(owner_id, version)` order, after
    /// `after` (keyset pagination), at most `limit` rows. Destroyed rows are
    /// left out; with `wrapped_by`, only rows whose `kek_id` is that KEK
    /// are listed; with `not_wrapped_by`, rows whose `kek_id` is that KEK
    /// are left out (what a rewrap to it still has to do).
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure, or when
    /// the store does not support the key life cycle.
    fn keys_page(
        &self,
        wrapped_by: Option<&str>,
        not_wrapped_by: Option<&str>,
        after: Option<(&str, u32)>,
        limit: usize,
    ) -> Result<Vec<StoredKey>> {
        let _ = (wrapped_by, not_wrapped_by, after, limit);
        Err(unsupported("listing data keys"))
    }

    /// Applies `rewraps` in one transaction, each a compare-and-set that
    /// changes a row only while it is still wrapped by
    /// [`Rewrap::from_kek`] (and not destroyed), appending the audit record
    /// of each change that applied. Returns, per rewrap, whether it applied.
    /// A row listed twice is changed once, by its first rewrap.
    /// [`DieselKeyStore`](crate::DieselKeyStore) locks the batch's rows,
    /// then writes them with one set-based `UPDATE` (per 1,000 rows) that
    /// carries the same guard.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure (nothing
    /// of the batch is applied), or when the store does not support the key
    /// life cycle.
    fn rewrap_keys(&self, rewraps: &[Rewrap]) -> Result<Vec<bool>> {
        let _ = rewraps;
        Err(unsupported("rewrapping data keys"))
    }

    /// Sets the state of (`owner`, `version`) from `from` to `to` if it is
    /// `from`, appending `audit` in the same transaction when it changed.
    /// Returns whether it changed.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure, or when
    /// the store does not support the key life cycle.
    fn set_key_state(
        &self,
        owner: &str,
        version: u32,
        from: KeyState,
        to: KeyState,
        audit: &AuditEvent,
    ) -> Result<bool> {
        let _ = (owner, version, from, to, audit);
        Err(unsupported("changing a data key's state"))
    }

    /// Crypto-shredding: marks the data key rows of `owner` that are not
    /// destroyed yet destroyed and overwrites their wrapped keys with zero
    /// bytes (an empty value), in one transaction with one audit record
    /// per version, copied from `audit` with `key_version` set, and a
    /// `shred` key event when any was destroyed. Returns the versions
    /// destroyed by this call.
    ///
    /// `listed` is what the caller showed and had confirmed: with
    /// `Some(versions)`, the owner's versions not destroyed yet, read in
    /// the transaction, must all be among `versions`; when one is not (a
    /// key created after the listing, for an owner listed with no key at
    /// all included), nothing is changed and the call is refused. With
    /// `None`, every version not destroyed yet is destroyed. Either way
    /// only the versions read in the transaction are destroyed and audited:
    /// a row inserted concurrently is never destroyed unaudited.
    ///
    /// # Errors
    /// [`Error::Refused`](crate::Error::Refused) when a version not listed
    /// exists (nothing is changed); [`Error::Store`](crate::Error::Store) on
    /// a database failure (nothing is changed), or when the store does not
    /// support the key life cycle.
    fn destroy_keys(
        &self,
        owner: &str,
        listed: Option<&[u32]>,
        audit: &AuditEvent,
    ) -> Result<Vec<u32>> {
        let _ = (owner, listed, audit);
        Err(unsupported("destroying data keys"))
    }

    /// The most recent audit records, newest first, of one owner or of all.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure, or when
    /// the store does not support reading the audit trail.
    fn audit(&self, owner: Option<&str>, limit: usize) -> Result<Vec<AuditRecord>> {
        let _ = (owner, limit);
        Err(unsupported("reading the audit trail"))
    }

    /// One page of audit records matching `filter`, newest first (by
    /// `id`), at most `filter.limit` records.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure, or when
    /// the store does not support reading the audit trail.
    fn audit_page(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
        let _ = filter;
        Err(unsupported("reading the audit trail"))
    }

    /// Runs `sql`, a query of the application's whose first column is an
    /// owner id (e.g. `SELECT DISTINCT user_id FROM cases`), and returns the
    /// distinct non-NULL owner ids it yields, as text, sorted. The query runs
    /// in a read-only transaction that is rolled back (read-only on
    /// PostgreSQL and MySQL / MariaDB, `PRAGMA query_only` on SQLite): one
    /// that tries to write (`DELETE … RETURNING owner_id`, a function that
    /// writes) is refused and changes nothing.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) when the query fails or tries
    /// to write, or when the store cannot run SQL.
    fn owners_from_query(&self, sql: &str) -> Result<Vec<String>> {
        let _ = sql;
        Err(unsupported("running an owners query"))
    }

    /// Data key rows counted by KEK and state.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure, or when
    /// the store does not support the key life cycle.
    fn key_counts(&self) -> Result<Vec<KeyCount>> {
        Err(unsupported("counting data keys"))
    }

    /// Inserts `key` (a new data key version of an owner that has keys)
    /// unless a row with the same (owner, version) exists, and when it did,
    /// appends `audit` and the feed event `event` in the same transaction.
    /// Returns whether this call inserted it.
    ///
    /// A shredded owner (it has key rows, every one destroyed) gets no new
    /// version: [`Error::Shredded`](crate::Error::Shredded), nothing
    /// written. [`DieselKeyStore`] checks it on the owner's rows locked in
    /// the insert's transaction, and [`destroy_keys`](Self::destroy_keys)
    /// locks the same rows, so a rotation racing a shred either commits
    /// first (and the shred destroys its version too) or finds the owner
    /// shredded; [`MemoryKeyStore`] checks it under its lock.
    ///
    /// The default runs the steps one after the other (not atomic: a shred
    /// between the check and the insert is not seen); [`DieselKeyStore`]
    /// runs them in one transaction.
    ///
    /// # Errors
    /// [`Error::Shredded`](crate::Error::Shredded) for a shredded owner;
    /// [`Error::Store`](crate::Error::Store) on a database failure.
    fn add_key_version(
        &self,
        key: &StoredKey,
        audit: &AuditEvent,
        event: &KeyEvent,
    ) -> Result<bool> {
        let rows = self.load_keys(&[key.owner_id.as_str()])?;
        if !rows.is_empty() && rows.iter().all(|r| r.state == KeyState::Destroyed) {
            return Err(crate::Error::Shredded {
                owner: key.owner_id.clone(),
            });
        }
        if !self.insert_key_if_absent(key)? {
            return Ok(false);
        }
        self.append_audit(std::slice::from_ref(audit))?;
        self.append_key_events(std::slice::from_ref(event), &[])?;
        Ok(true)
    }

    /// Adds each count to the seals recorded for its (owner, version) in
    /// `phi_seal_counts`, creating the row when there is none, in one
    /// transaction: counts from any number of processes add up, and a
    /// recorded count never goes down. Counts of zero are skipped.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure (nothing
    /// is added), or when the store does not count seals.
    fn add_seal_counts(&self, counts: &[SealCount]) -> Result<()> {
        let _ = counts;
        Err(unsupported("recording seal counts"))
    }

    /// The seals recorded for the given owners' data key versions, in
    /// `(owner, version)` order; a version without a row has none recorded.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure, or when
    /// the store does not count seals.
    fn seal_counts(&self, owners: &[&str]) -> Result<Vec<SealCount>> {
        let _ = owners;
        Err(unsupported("reading seal counts"))
    }

    /// Whether this store records seal counts ([`add_seal_counts`](Self::add_seal_counts)):
    /// a keyring over it then counts the values it seals per data key
    /// version. `false` by default: a store that wraps another should
    /// forward it.
    fn counts_seals(&self) -> bool {
        false
    }

    /// Appends `events` to the key-event feed (`phi_key_events`) and
    /// `audit` to the audit trail, in one transaction. Returns the feed's
    /// head afterwards: the id of the last event appended (or the current
    /// head when `events` is empty).
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure (nothing
    /// is appended), or when the store has no feed.
    fn append_key_events(&self, events: &[KeyEvent], audit: &[AuditEvent]) -> Result<i64> {
        let _ = (events, audit);
        Err(unsupported("appending key events"))
    }

    /// The feed's events with an id above `after`, oldest first, at most
    /// `limit`. Ids have no gaps: the next id to read is the last one read
    /// plus one.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure, or when
    /// the store has no feed.
    fn key_events_after(&self, after: i64, limit: usize) -> Result<Vec<FeedEvent>> {
        let _ = (after, limit);
        Err(unsupported("reading key events"))
    }

    /// Whether this store keeps a key-event feed shared by every process
    /// using it (the tables `phi_key_feed` and `phi_key_events`, created by
    /// phi's migrations): keyrings over it then follow the feed by default
    /// ([`KeyringBuilder::follow_feed`](crate::KeyringBuilder::follow_feed)).
    /// `false` by default: a store that wraps another should forward it.
    fn has_feed(&self) -> bool {
        false
    }

    /// The feed's head: the id of the last event appended (0: none yet).
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure, or when
    /// the store has no feed.
    fn feed_head(&self) -> Result<i64> {
        Err(unsupported("reading the key-event feed's head"))
    }

    /// The fleet's roll-out policy named `policy` (`phi_rollout`), or
    /// `None` when it was never set (each keyring then keeps the policy it
    /// was built with).
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure, or when
    /// the store has no roll-out table.
    fn fleet_rollout(&self, policy: &str) -> Result<Option<Rollout>> {
        let _ = policy;
        Ok(None)
    }

    /// Replaces the fleet's roll-out policy named `policy` with `rollout`, appending
    /// `event` (a [`KeyEventKind::Rollout`](crate::feed::KeyEventKind::Rollout))
    /// and `audit` in the same transaction. Returns the feed's head
    /// afterwards.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure (nothing
    /// is changed), or when the store has no roll-out table.
    fn set_fleet_rollout(
        &self,
        policy: &str,
        rollout: &Rollout,
        event: &KeyEvent,
        audit: &[AuditEvent],
    ) -> Result<i64> {
        let _ = (policy, rollout, event, audit);
        Err(unsupported("changing the fleet's roll-out"))
    }

    /// A listener that is told at once when an event is appended to the
    /// feed, on a connection of its own (PostgreSQL's `LISTEN` on channel
    /// [`FEED_CHANNEL`](crate::feed::FEED_CHANNEL)), or `None` when the
    /// store has no such thing (then followers only read the feed once per
    /// interval).
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) when the listening connection
    /// cannot be opened.
    fn feed_listener(&self) -> Result<Option<Box<dyn FeedListener>>> {
        Ok(None)
    }

    /// Records that the following keyring `reader` has applied the feed up
    /// to event `position` (`phi_feed_readers`).
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure, or when
    /// the store does not record readers.
    fn record_feed_reader(&self, reader: &str, position: i64) -> Result<()> {
        let _ = (reader, position);
        Err(unsupported("recording a feed reader's position"))
    }

    /// Forgets the feed reader `reader` (a keyring that stopped following).
    ///
    /// # Errors
    /// As [`record_feed_reader`](Self::record_feed_reader).
    fn forget_feed_reader(&self, reader: &str) -> Result<()> {
        let _ = reader;
        Err(unsupported("forgetting a feed reader"))
    }

    /// Every recorded feed reader, by name.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure, or when
    /// the store does not record readers.
    fn feed_readers(&self) -> Result<Vec<FeedReader>> {
        Err(unsupported("reading the feed readers' positions"))
    }

    /// Adds `owners` to the rotation job `job` (`phi_rotation_claims`) as
    /// pending, except those it lists already (pending or done): every
    /// worker of a job may call it, and a rerun adds nothing twice.
    /// Returns how many were added.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure, or when
    /// the store has no rotation jobs.
    fn rotation_enqueue(&self, job: &str, owners: &[String]) -> Result<u64> {
        let _ = (job, owners);
        Err(unsupported("adding owners to a rotation job"))
    }

    /// Claims for `worker`, until `until`, up to `limit` owners of `job`
    /// that are pending and not claimed by another worker at `now` (never
    /// claimed, released, or their claim expired), in owner order, in one
    /// transaction: `SELECT … FOR UPDATE SKIP LOCKED` on PostgreSQL and
    /// MySQL / MariaDB, so concurrent workers get disjoint owners without
    /// waiting for each other. On SQLite one worker at a time works on a
    /// job: while another worker holds an unexpired claim, nothing is
    /// claimed.
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) for a MySQL / MariaDB server
    /// without `SKIP LOCKED` (see
    /// [`skip_locked_supported`](crate::lifecycle::skip_locked_supported));
    /// [`Error::Store`](crate::Error::Store) on a database failure, or when
    /// the store has no rotation jobs.
    fn rotation_claim(
        &self,
        job: &str,
        worker: &str,
        limit: usize,
        now: NaiveDateTime,
        until: NaiveDateTime,
    ) -> Result<Vec<claims::RotationClaim>> {
        let _ = (job, worker, limit, now, until);
        Err(unsupported("claiming owners of a rotation job"))
    }

    /// In one transaction: inserts each new data key version unless its
    /// (owner, version) exists, with its audit record and feed event, and
    /// records it as the new version of the owner in `job`. Returns, per
    /// version, whether this call inserted it.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure (nothing
    /// is changed), or when the store has no rotation jobs.
    fn rotation_add_versions(
        &self,
        job: &str,
        versions: &[claims::NewKeyVersion],
    ) -> Result<Vec<bool>> {
        let _ = (job, versions);
        Err(unsupported("adding data key versions for a rotation job"))
    }

    /// Retires data key versions in one transaction: for each `retire`
    /// audit record, the version of its owner named by its `key_version`,
    /// if still active, with the record and a `retire` feed event. Returns,
    /// per record, whether this call retired it.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure (nothing
    /// is changed), or when the store does not support the key life cycle.
    fn retire_versions(&self, retires: &[AuditEvent]) -> Result<Vec<bool>> {
        let _ = retires;
        Err(unsupported("retiring data key versions"))
    }

    /// Marks `owners` done in `job` (their claims end).
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure, or when
    /// the store has no rotation jobs.
    fn rotation_done(&self, job: &str, owners: &[String]) -> Result<()> {
        let _ = (job, owners);
        Err(unsupported("finishing owners of a rotation job"))
    }

    /// Ends `worker`'s claims on `owners` in `job` without finishing them,
    /// so any worker takes them at once (after a failure).
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure, or when
    /// the store has no rotation jobs.
    fn rotation_release(&self, job: &str, worker: &str, owners: &[String]) -> Result<()> {
        let _ = (job, worker, owners);
        Err(unsupported("releasing owners of a rotation job"))
    }

    /// The owners of `job` by state at `now`.
    ///
    /// # Errors
    /// [`Error::Store`](crate::Error::Store) on a database failure, or when
    /// the store has no rotation jobs.
    fn rotation_counts(&self, job: &str, now: NaiveDateTime) -> Result<claims::RotationCounts> {
        let _ = (job, now);
        Err(unsupported("counting the owners of a rotation job"))
    }
}

/// The refusal of [`KeyStore::destroy_keys`] when `owner` has versions
/// not destroyed that were not `listed` (`unlisted`, in version order).
pub(crate) fn unlisted_versions(owner: &str, listed: &[u32], unlisted: &[u32]) -> crate::Error {
    crate::Error::Refused {
        operation: "shred".to_owned(),
        owner: owner.to_owned(),
        reason: format!(
            "data key version(s) {unlisted:?} exist but were not among the versions listed and \
             confirmed ({listed:?}), so a key was created after the listing; nothing was \
             destroyed: list the owner's keys again and confirm them"
        ),
    }
}

fn unsupported(operation: &'static str) -> crate::Error {
    crate::Error::store(operation, "not supported by this key store")
}

/// Refuses data key rows whose owner id is not, byte for byte, one of the
/// owners asked for: a store whose owner column compares otherwise (MySQL /
/// MariaDB `utf8mb4_bin` before phi's migration
/// `2026-12-07-000001_owner_ids_byte_exact`, a PAD SPACE collation where
/// `'acme'` equals `'acme '`) would otherwise hand one owner another's data
/// keys. The error names both owner ids, Debug-escaped so that whitespace
/// shows.
///
/// # Errors
/// [`Error::Store`](crate::Error::Store) for the first such row.
pub(crate) fn check_key_owners(
    operation: &'static str,
    asked: &[&str],
    rows: &[StoredKey],
) -> Result<()> {
    let Some(row) = (match asked {
        [one] => rows.iter().find(|r| r.owner_id != *one),
        _ => {
            let asked: HashSet<&str> = asked.iter().copied().collect();
            rows.iter().find(|r| !asked.contains(r.owner_id.as_str()))
        }
    }) else {
        return Ok(());
    };
    let found = row.owner_id.as_str();
    // The owner asked for that the store took as equal, if one is plain to
    // see: equal but for trailing spaces.
    let near = asked
        .iter()
        .find(|a| a.trim_end_matches(' ') == found.trim_end_matches(' '))
        .or(asked.first().filter(|_| asked.len() == 1));
    let wanted = match near {
        Some(owner) => format!("owner {owner:?}"),
        None => format!("{} owners, none of them it", asked.len()),
    };
    Err(crate::Error::store(
        operation,
        format!(
            "the key store returned a data key row of owner {found:?} (version {}) when asked for {wanted}: \
             owner ids must compare byte for byte (on MySQL / MariaDB, run phi's migrations: \
             2026-12-07-000001_owner_ids_byte_exact makes them VARBINARY); no other owner's key is used",
            row.version
        ),
    ))
}

/// One compare-and-set rewrap, for [`KeyStore::rewrap_keys`].
#[derive(Clone, PartialEq, Eq)]
pub struct Rewrap {
    /// The owner.
    pub owner_id: String,
    /// The data key version.
    pub version: u32,
    /// The KEK the row must still name for the change to apply.
    pub from_kek: String,
    /// The KEK that wrapped `wrapped_key`.
    pub to_kek: String,
    /// The same data key, wrapped by `to_kek`.
    pub wrapped_key: Vec<u8>,
    /// Appended when the change applies.
    pub audit: AuditEvent,
}

impl fmt::Debug for Rewrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rewrap")
            .field("owner_id", &self.owner_id)
            .field("version", &self.version)
            .field("from_kek", &self.from_kek)
            .field("to_kek", &self.to_kek)
            .finish_non_exhaustive()
    }
}

/// One stored audit record, from [`KeyStore::audit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    /// `encryption_key_audit.id`: increasing in insertion order.
    pub id: i64,
    /// The record.
    pub event: AuditEvent,
}

/// Which audit records [`KeyStore::audit_page`] returns: every criterion
/// given must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditFilter {
    /// Only this owner's records.
    pub owner: Option<String>,
    /// Only records of this action.
    pub action: Option<AuditAction>,
    /// Only records that occurred at or after this time (UTC).
    pub since: Option<NaiveDateTime>,
    /// Only records that occurred before this time (UTC).
    pub until: Option<NaiveDateTime>,
    /// Only records with an id below this one: the `id` of the last record
    /// of the previous page (keyset paging, newest first).
    pub before_id: Option<i64>,
    /// At most this many records.
    pub limit: usize,
}

impl AuditFilter {
    /// Every record, newest first, at most `limit`.
    pub fn new(limit: usize) -> Self {
        AuditFilter {
            limit,
            ..AuditFilter::default()
        }
    }

    /// Whether `record` passes every criterion but the limit.
    pub fn matches(&self, record: &AuditRecord) -> bool {
        let e = &record.event;
        self.owner.as_ref().is_none_or(|o| &e.owner_id == o)
            && self.action.is_none_or(|a| e.action == a)
            && self.since.is_none_or(|t| e.occurred_at >= t)
            && self.until.is_none_or(|t| e.occurred_at < t)
            && self.before_id.is_none_or(|id| record.id < id)
    }
}

/// How many data key rows one KEK wraps in one state, from
/// [`KeyStore::key_counts`].
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyCount {
    /// `kek_id`.
    pub kek_id: String,
    /// `state`.
    pub state: KeyState,
    /// Number of rows.
    pub keys: u64,
    /// Number of distinct owners among them.
    pub owners: u64,
}

/// Values sealed under one data key version (`phi_seal_counts`): added to
/// by [`KeyStore::add_seal_counts`], read by [`KeyStore::seal_counts`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealCount {
    /// The owner.
    pub owner_id: String,
    /// The data key version.
    pub version: u32,
    /// Values sealed under it (recorded so far, or to add).
    pub seals: u64,
}

impl SealCount {
    /// `seals` values of `owner_id` sealed under `version`.
    pub fn new(owner_id: impl Into<String>, version: u32, seals: u64) -> Self {
        SealCount {
            owner_id: owner_id.into(),
            version,
            seals,
        }
    }
}

/// A key store's connection pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "admin-http", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub struct PoolState {
    /// Connections open.
    pub connections: u32,
    /// Of them, idle.
    pub idle: u32,
    /// Connections the pool opens at most.
    pub max: u32,
}

impl PoolState {
    /// A pool of `connections` open (`idle` of them idle), at most `max`.
    pub fn new(connections: u32, idle: u32, max: u32) -> Self {
        PoolState {
            connections,
            idle,
            max,
        }
    }
}
