//! Which owners' data keys are due for rotation, under the keyring's
//! [`RotationPolicy`](crate::RotationPolicy).

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use chrono::NaiveDateTime;

use crate::error::Result;
use crate::keyring::{Keyring, RESERVED_OWNER_PREFIX, RotationPolicy};
use crate::metrics;
use crate::store::{KeyState, StoredKey};

/// Key rows read per key-store query while listing the keys due.
const KEYS_PER_PAGE: usize = 1_000;

/// Why a data key version is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DueReason {
    /// Older than [`RotationPolicy::max_key_age`].
    Age,
    /// At least [`RotationPolicy::max_seals_per_key`] values sealed under it.
    Seals,
}

impl DueReason {
    /// `age` or `seals`.
    pub fn as_str(self) -> &'static str {
        match self {
            DueReason::Age => "age",
            DueReason::Seals => "seals",
        }
    }
}

impl fmt::Display for DueReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One owner whose current data key version is due.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DueKey {
    /// The owner.
    pub owner_id: String,
    /// Its current version: the highest active one, which seals.
    pub version: u32,
    /// When that version was created (UTC).
    pub created_at: NaiveDateTime,
    /// Its age on the keyring's clock.
    pub age: Duration,
    /// Values sealed under it, as recorded in `phi_seal_counts` (this
    /// keyring's own seals flushed first; other processes' up to their
    /// last flush).
    pub seals: u64,
    /// Why it is due (one or both), in this order: age, seals.
    pub reasons: Vec<DueReason>,
}

/// What [`due_keys`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DueReport {
    /// The policy applied.
    pub policy: RotationPolicy,
    /// When the ages were measured (UTC, on the keyring's clock).
    pub checked_at: NaiveDateTime,
    /// Owners with a current (active) version, phi's own (`phi:…`) left
    /// out.
    pub owners: u64,
    /// The owners whose current version is due, in the key store's owner
    /// order.
    pub due: Vec<DueKey>,
    /// Age of the oldest current version, if any owner has one.
    pub oldest_key_age: Option<Duration>,
    /// The highest seal count of any current version (0 when none).
    pub highest_seals: u64,
}

/// The owners whose current data key version is due for rotation under the
/// keyring's [`RotationPolicy`] (see [`due_keys`]), in the key store's
/// owner order: what `phi keys rotate --due` rotates.
///
/// # Errors
/// As [`due_keys`].
pub fn due_owner_ids(keyring: &Keyring) -> Result<Vec<String>> {
    Ok(due_keys(keyring)?
        .due
        .into_iter()
        .map(|d| d.owner_id)
        .collect())
}

/// Every owner whose current data key version (its highest active one) is
/// due under the keyring's [`RotationPolicy`]: older than `max_key_age` on
/// the keyring's [`Clock`](crate::Clock), or with at least
/// `max_seals_per_key` values sealed under it in `phi_seal_counts`. Flushes
/// this keyring's own seal counts first. Shredded owners and owners whose
/// keys are all retired have no current version and are never due; phi's
/// own keys (`phi:lookup`) are left out (they are rotated with their
/// re-index). Reads the key rows a page at a time, and the seal counts of
/// each page's owners in one query.
///
/// Sets the gauges `phi_key_oldest_active_age_seconds`, `phi_keys_due` and
/// `phi_key_seals_max`.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use phi_types::{lifecycle, KeyBytes, Keyring, LocalKek, ManualClock, MemoryKeyStore, RotationPolicy};
///
/// let clock = Arc::new(ManualClock::new());
/// let kek = Arc::new(LocalKek::new("local-1", &KeyBytes::new([7; 32])));
/// let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), kek)
///     .clock(clock.clone())
///     .rotation_policy(RotationPolicy {
///         max_key_age: Some(Duration::from_secs(90 * 86_400)),
///         max_seals_per_key: Some(1_000_000),
///     })
///     .build()?;
/// keyring.seal(&"Doe".to_string(), "provider-17", "cases.patient_last", b"C-1")?;
/// assert!(lifecycle::due_owner_ids(&keyring)?.is_empty());
/// clock.advance(Duration::from_secs(91 * 86_400));
/// assert_eq!(lifecycle::due_owner_ids(&keyring)?, ["provider-17"]);
/// # Ok::<(), phi_types::Error>(())
/// ```
///
/// # Errors
/// Key store errors (listing the keys, reading or flushing seal counts).
pub fn due_keys(keyring: &Keyring) -> Result<DueReport> {
    let store = keyring.store();
    let counts_seals = store.counts_seals();
    keyring.flush_seal_counts()?;
    let policy = keyring.rotation_policy();
    let now = keyring.utc_now();
    let mut report = DueReport {
        policy,
        checked_at: now,
        ..DueReport::default()
    };
    // Each owner's current row; an owner's rows may span two pages, so the
    // last owner of a page waits for the next.
    let mut pending: Vec<StoredKey> = Vec::new();
    let mut after: Option<(String, u32)> = None;
    loop {
        let page = store.keys_page(
            None,
            None,
            after.as_ref().map(|(o, v)| (o.as_str(), *v)),
            KEYS_PER_PAGE,
        )?;
        let done = page.len() < KEYS_PER_PAGE;
        after = page.last().map(|k| (k.owner_id.clone(), k.version));
        for key in page {
            if key.state != KeyState::Active || key.owner_id.starts_with(RESERVED_OWNER_PREFIX) {
                continue;
            }
            match pending.last_mut() {
                Some(last) if last.owner_id == key.owner_id => {
                    if key.version > last.version {
                        *last = key;
                    }
                }
                _ => pending.push(key),
            }
        }
        let keep = if done { 0 } else { 1.min(pending.len()) };
        let ready: Vec<StoredKey> = pending.drain(..pending.len() - keep).collect();
        judge(store.as_ref(), counts_seals, now, &ready, &mut report)?;
        if done {
            break;
        }
    }
    ::metrics::gauge!(metrics::KEY_OLDEST_ACTIVE_AGE_SECONDS)
        .set(report.oldest_key_age.map_or(0.0, |a| a.as_secs_f64()));
    #[allow(clippy::cast_precision_loss)] // Gauges: exact below 2^52.
    {
        ::metrics::gauge!(metrics::KEYS_DUE).set(report.due.len() as f64);
        ::metrics::gauge!(metrics::KEY_SEALS_MAX).set(report.highest_seals as f64);
    }
    Ok(report)
}

/// Adds the owners of `current` (each owner's current row) to `report`.
fn judge(
    store: &dyn crate::KeyStore,
    counts_seals: bool,
    now: NaiveDateTime,
    current: &[StoredKey],
    report: &mut DueReport,
) -> Result<()> {
    if current.is_empty() {
        return Ok(());
    }
    let seals: HashMap<(String, u32), u64> = if counts_seals {
        let owners: Vec<&str> = current.iter().map(|k| k.owner_id.as_str()).collect();
        store
            .seal_counts(&owners)?
            .into_iter()
            .map(|c| ((c.owner_id, c.version), c.seals))
            .collect()
    } else {
        HashMap::new()
    };
    let policy = report.policy;
    for key in current {
        let age = (now - key.created_at).to_std().unwrap_or(Duration::ZERO);
        let sealed = seals
            .get(&(key.owner_id.clone(), key.version))
            .copied()
            .unwrap_or(0);
        report.owners += 1;
        report.oldest_key_age = Some(report.oldest_key_age.map_or(age, |a| a.max(age)));
        report.highest_seals = report.highest_seals.max(sealed);
        let mut reasons = Vec::new();
        if policy.max_key_age.is_some_and(|max| age >= max) {
            reasons.push(DueReason::Age);
        }
        if policy.max_seals_per_key.is_some_and(|max| sealed >= max) {
            reasons.push(DueReason::Seals);
        }
        if !reasons.is_empty() {
            report.due.push(DueKey {
                owner_id: key.owner_id.clone(),
                version: key.version,
                created_at: key.created_at,
                age,
                seals: sealed,
                reasons,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{KeyBytes, KeyStore as _, LocalKek, ManualClock, MemoryKeyStore};

    fn keyring(
        store: Arc<MemoryKeyStore>,
        clock: Arc<ManualClock>,
        policy: RotationPolicy,
    ) -> Keyring {
        let kek = Arc::new(LocalKek::new("local-1", &KeyBytes::new([7; 32])));
        Keyring::builder(store, kek)
            .clock(clock)
            .rotation_policy(policy)
            .build()
            .expect("keyring")
    }

    #[test]
    fn keys_fall_due_by_age_on_the_injected_clock_and_by_seals() {
        let store = Arc::new(MemoryKeyStore::new());
        let clock = Arc::new(ManualClock::new());
        let day = Duration::from_secs(86_400);
        let policy = RotationPolicy {
            max_key_age: Some(90 * day),
            max_seals_per_key: Some(10),
        };
        let a = keyring(store.clone(), clock.clone(), policy);
        let b = keyring(store.clone(), clock.clone(), policy);
        for i in 0..6 {
            a.seal(&i, "busy", "t.c", b"r").expect("seal");
            b.seal(&i, "busy", "t.c", b"r").expect("seal");
        }
        a.seal(&1, "quiet", "t.c", b"r").expect("seal");
        // `a` flushes its own six; `b`'s are not recorded yet.
        let report = due_keys(&a).expect("due");
        assert!(report.due.is_empty(), "{report:?}");
        assert_eq!(report.highest_seals, 6);
        b.flush_seal_counts().expect("flush");
        let report = due_keys(&a).expect("due");
        assert_eq!(report.owners, 2);
        assert_eq!(report.due.len(), 1, "{report:?}");
        assert_eq!(report.due[0].owner_id, "busy");
        assert_eq!(report.due[0].seals, 12);
        assert_eq!(report.due[0].reasons, [DueReason::Seals]);

        // A rotated owner's new version has sealed nothing yet.
        crate::lifecycle::rotate(&a, "busy").expect("rotate");
        assert!(due_owner_ids(&a).expect("due").is_empty());

        clock.advance(91 * day);
        let report = due_keys(&a).expect("due");
        assert_eq!(due_owner_ids(&a).expect("due"), ["busy", "quiet"]);
        assert_eq!((report.due[0].version, report.due[0].seals), (2, 0));
        assert_eq!(report.due[0].reasons, [DueReason::Age]);
        assert_eq!(report.due[1].reasons, [DueReason::Age]);
        assert!(report.due[1].age >= 90 * day);
        assert!(report.oldest_key_age.is_some_and(|age| age >= 90 * day));

        // A shredded owner is never due.
        crate::lifecycle::shred_keys_by(&a, "quiet", "test").expect("shred");
        assert_eq!(due_owner_ids(&a).expect("due"), ["busy"]);
        // Counts never go backwards: a seal under the old version still adds.
        assert_eq!(store.seal_counts(&["busy"]).expect("counts")[0].seals, 12);
    }
}
