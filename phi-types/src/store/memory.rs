//! An in-memory key store, for tests and examples.

use std::collections::BTreeMap;
use std::sync::Mutex;

use std::collections::BTreeSet;

use super::{
    AuditEvent, AuditFilter, AuditRecord, KeyCount, KeyState, KeyStore, Rewrap, SealCount,
    StoredKey,
};
use crate::error::{Error, Result};
use crate::feed::{FeedEvent, FeedReader, KeyEvent, KeyEventKind};
use crate::kek::KekCheck;
use crate::store::Rollout;

/// A [`KeyStore`] in process memory. Nothing survives the process.
#[derive(Debug, Default)]
pub struct MemoryKeyStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    keys: BTreeMap<(String, u32), StoredKey>,
    audit: Vec<AuditEvent>,
    checks: BTreeMap<String, KekCheck>,
    events: Vec<KeyEvent>,
    rollout: BTreeMap<String, Rollout>,
    readers: BTreeMap<String, FeedReader>,
    seals: BTreeMap<(String, u32), u64>,
}

impl Inner {
    fn push_event(&mut self, audit: &AuditEvent, kind: KeyEventKind, version: Option<u32>) {
        self.events.push(KeyEvent {
            occurred_at: audit.occurred_at,
            kind,
            owner_id: Some(audit.owner_id.clone()),
            key_version: version,
            actor: audit.actor.clone(),
            detail: audit.detail.clone(),
        });
    }

    fn head(&self) -> i64 {
        i64::try_from(self.events.len()).unwrap_or(i64::MAX)
    }
}

impl MemoryKeyStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryKeyStore::default()
    }

    /// The audit records appended so far.
    pub fn audit_events(&self) -> Vec<AuditEvent> {
        self.lock()
            .map(|inner| inner.audit.clone())
            .unwrap_or_default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| Error::store("locking the in-memory key store", "poisoned lock"))
    }
}

impl KeyStore for MemoryKeyStore {
    fn load_keys(&self, owners: &[&str]) -> Result<Vec<StoredKey>> {
        let inner = self.lock()?;
        // Each distinct owner's range of the map, in the map's order (owner,
        // then version): no scan of every stored key per owner.
        let owners: BTreeSet<&str> = owners.iter().copied().collect();
        Ok(owners
            .into_iter()
            .flat_map(|owner| {
                inner
                    .keys
                    .range((owner.to_owned(), 0)..=(owner.to_owned(), u32::MAX))
                    .map(|(_, key)| key.clone())
            })
            .collect())
    }

    fn insert_key_if_absent(&self, key: &StoredKey) -> Result<bool> {
        let mut inner = self.lock()?;
        let slot = (key.owner_id.clone(), key.version);
        if inner.keys.contains_key(&slot) {
            return Ok(false);
        }
        inner.keys.insert(slot, key.clone());
        Ok(true)
    }

    fn append_audit(&self, events: &[AuditEvent]) -> Result<()> {
        self.lock()?.audit.extend_from_slice(events);
        Ok(())
    }

    fn kek_check(&self, kek_id: &str) -> Result<Option<KekCheck>> {
        Ok(self.lock()?.checks.get(kek_id).cloned())
    }

    fn insert_kek_check_if_absent(&self, kek_id: &str, check: &KekCheck) -> Result<bool> {
        let mut inner = self.lock()?;
        if inner.checks.contains_key(kek_id) {
            return Ok(false);
        }
        inner.checks.insert(kek_id.to_owned(), check.clone());
        Ok(true)
    }

    fn owners(&self) -> Result<Vec<String>> {
        let inner = self.lock()?;
        let mut owners: Vec<String> = inner.keys.keys().map(|(o, _)| o.clone()).collect();
        owners.dedup();
        Ok(owners)
    }

    fn keys_page(
        &self,
        wrapped_by: Option<&str>,
        not_wrapped_by: Option<&str>,
        after: Option<(&str, u32)>,
        limit: usize,
    ) -> Result<Vec<StoredKey>> {
        let inner = self.lock()?;
        Ok(inner
            .keys
            .iter()
            .filter(|((owner, version), _)| {
                after.is_none_or(|(o, v)| (owner.as_str(), *version) > (o, v))
            })
            .map(|(_, key)| key)
            .filter(|k| k.state != KeyState::Destroyed)
            .filter(|k| wrapped_by.is_none_or(|kek| k.kek_id == kek))
            .filter(|k| not_wrapped_by.is_none_or(|kek| k.kek_id != kek))
            .take(limit)
            .cloned()
            .collect())
    }

    fn rewrap_keys(&self, rewraps: &[Rewrap]) -> Result<Vec<bool>> {
        let mut inner = self.lock()?;
        let mut applied = Vec::with_capacity(rewraps.len());
        for r in rewraps {
            let done = match inner.keys.get_mut(&(r.owner_id.clone(), r.version)) {
                Some(key) if key.kek_id == r.from_kek && key.state != KeyState::Destroyed => {
                    key.kek_id.clone_from(&r.to_kek);
                    key.wrapped_key.clone_from(&r.wrapped_key);
                    true
                }
                _ => false,
            };
            if done {
                inner.audit.push(r.audit.clone());
                inner.push_event(&r.audit, KeyEventKind::Rewrap, Some(r.version));
            }
            applied.push(done);
        }
        Ok(applied)
    }

    fn set_key_state(
        &self,
        owner: &str,
        version: u32,
        from: KeyState,
        to: KeyState,
        audit: &AuditEvent,
    ) -> Result<bool> {
        let mut inner = self.lock()?;
        let changed = match inner.keys.get_mut(&(owner.to_owned(), version)) {
            Some(key) if key.state == from => {
                key.state = to;
                true
            }
            _ => false,
        };
        if changed {
            inner.audit.push(audit.clone());
            let kind = match to {
                KeyState::Retired => KeyEventKind::Retire,
                KeyState::Destroyed => KeyEventKind::Shred,
                KeyState::Active => KeyEventKind::Clear,
            };
            inner.push_event(audit, kind, Some(version));
        }
        Ok(changed)
    }

    fn destroy_keys(
        &self,
        owner: &str,
        listed: Option<&[u32]>,
        audit: &AuditEvent,
    ) -> Result<Vec<u32>> {
        let mut inner = self.lock()?;
        if let Some(listed) = listed {
            let unlisted: Vec<u32> = inner
                .keys
                .iter()
                .filter(|((o, version), key)| {
                    o == owner && key.state != KeyState::Destroyed && !listed.contains(version)
                })
                .map(|((_, version), _)| *version)
                .collect();
            if !unlisted.is_empty() {
                return Err(super::unlisted_versions(owner, listed, &unlisted));
            }
        }
        let mut destroyed = Vec::new();
        for ((o, version), key) in inner.keys.iter_mut() {
            if o == owner && key.state != KeyState::Destroyed {
                key.state = KeyState::Destroyed;
                key.wrapped_key.fill(0);
                key.wrapped_key.clear();
                destroyed.push(*version);
            }
        }
        for version in &destroyed {
            let mut event = audit.clone();
            event.key_version = Some(*version);
            inner.audit.push(event);
        }
        if !destroyed.is_empty() {
            inner.push_event(audit, KeyEventKind::Shred, None);
        }
        Ok(destroyed)
    }

    fn audit(&self, owner: Option<&str>, limit: usize) -> Result<Vec<AuditRecord>> {
        let inner = self.lock()?;
        Ok(inner
            .audit
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, e)| owner.is_none_or(|o| e.owner_id == o))
            .take(limit)
            .map(|(i, e)| AuditRecord {
                id: i64::try_from(i + 1).unwrap_or(i64::MAX),
                event: e.clone(),
            })
            .collect())
    }

    fn audit_page(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
        let inner = self.lock()?;
        Ok(inner
            .audit
            .iter()
            .enumerate()
            .rev()
            .map(|(i, e)| AuditRecord {
                id: i64::try_from(i + 1).unwrap_or(i64::MAX),
                event: e.clone(),
            })
            .filter(|r| filter.matches(r))
            .take(filter.limit)
            .collect())
    }

    fn key_counts(&self) -> Result<Vec<KeyCount>> {
        let inner = self.lock()?;
        let mut counts: Vec<(String, KeyState, u64, BTreeSet<String>)> = Vec::new();
        for key in inner.keys.values() {
            let slot = match counts
                .iter()
                .position(|(k, s, _, _)| *k == key.kek_id && *s == key.state)
            {
                Some(i) => &mut counts[i],
                None => {
                    counts.push((key.kek_id.clone(), key.state, 0, BTreeSet::new()));
                    let last = counts.len() - 1;
                    &mut counts[last]
                }
            };
            slot.2 += 1;
            slot.3.insert(key.owner_id.clone());
        }
        Ok(counts
            .into_iter()
            .map(|(kek_id, state, keys, owners)| KeyCount {
                kek_id,
                state,
                keys,
                owners: owners.len() as u64,
            })
            .collect())
    }

    fn add_key_version(
        &self,
        key: &StoredKey,
        audit: &AuditEvent,
        event: &KeyEvent,
    ) -> Result<bool> {
        crate::feed::check_writable(std::slice::from_ref(event))?;
        let mut inner = self.lock()?;
        let owner = key.owner_id.as_str();
        let mut rows = inner
            .keys
            .range((owner.to_owned(), 0)..=(owner.to_owned(), u32::MAX))
            .peekable();
        // Under the same lock as a shred: a shredded owner never gets a
        // new version.
        if rows.peek().is_some() && rows.all(|(_, k)| k.state == KeyState::Destroyed) {
            return Err(Error::Shredded {
                owner: owner.to_owned(),
            });
        }
        let slot = (key.owner_id.clone(), key.version);
        if inner.keys.contains_key(&slot) {
            return Ok(false);
        }
        inner.keys.insert(slot, key.clone());
        inner.audit.push(audit.clone());
        inner.events.push(event.clone());
        Ok(true)
    }

    fn counts_seals(&self) -> bool {
        true
    }

    fn add_seal_counts(&self, counts: &[SealCount]) -> Result<()> {
        let mut inner = self.lock()?;
        for c in counts.iter().filter(|c| c.seals > 0) {
            let seals = inner
                .seals
                .entry((c.owner_id.clone(), c.version))
                .or_default();
            *seals = seals.saturating_add(c.seals);
        }
        Ok(())
    }

    fn seal_counts(&self, owners: &[&str]) -> Result<Vec<SealCount>> {
        let inner = self.lock()?;
        let owners: BTreeSet<&str> = owners.iter().copied().collect();
        Ok(owners
            .into_iter()
            .flat_map(|owner| {
                inner
                    .seals
                    .range((owner.to_owned(), 0)..=(owner.to_owned(), u32::MAX))
                    .map(|((o, v), n)| SealCount::new(o.clone(), *v, *n))
            })
            .collect())
    }

    fn append_key_events(&self, events: &[KeyEvent], audit: &[AuditEvent]) -> Result<i64> {
        crate::feed::check_writable(events)?;
        let mut inner = self.lock()?;
        inner.audit.extend_from_slice(audit);
        inner.events.extend_from_slice(events);
        Ok(inner.head())
    }

    fn key_events_after(&self, after: i64, limit: usize) -> Result<Vec<FeedEvent>> {
        let inner = self.lock()?;
        let skip = usize::try_from(after.max(0)).unwrap_or(usize::MAX);
        Ok(inner
            .events
            .iter()
            .enumerate()
            .skip(skip)
            .take(limit)
            .map(|(i, e)| FeedEvent::new(i64::try_from(i + 1).unwrap_or(i64::MAX), e.clone()))
            .collect())
    }

    fn feed_head(&self) -> Result<i64> {
        Ok(self.lock()?.head())
    }

    fn fleet_rollout(&self, policy: &str) -> Result<Option<Rollout>> {
        Ok(self.lock()?.rollout.get(policy).cloned())
    }

    fn set_fleet_rollout(
        &self,
        policy: &str,
        rollout: &Rollout,
        event: &KeyEvent,
        audit: &[AuditEvent],
    ) -> Result<i64> {
        crate::feed::check_writable(std::slice::from_ref(event))?;
        let mut inner = self.lock()?;
        inner.rollout.insert(policy.to_owned(), rollout.clone());
        inner.audit.extend_from_slice(audit);
        inner.events.push(event.clone());
        Ok(inner.head())
    }

    fn record_feed_reader(&self, reader: &str, position: i64) -> Result<()> {
        let now = chrono::Utc::now().naive_utc();
        self.lock()?
            .readers
            .insert(reader.to_owned(), FeedReader::new(reader, position, now));
        Ok(())
    }

    fn forget_feed_reader(&self, reader: &str) -> Result<()> {
        self.lock()?.readers.remove(reader);
        Ok(())
    }

    fn feed_readers(&self) -> Result<Vec<FeedReader>> {
        Ok(self.lock()?.readers.values().cloned().collect())
    }
}
