//! An in-memory key store, for tests and examples.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{AuditEvent, KeyStore, StoredKey};
use crate::error::{Error, Result};

/// A [`KeyStore`] in process memory. Nothing survives the process.
#[derive(Debug, Default)]
pub struct MemoryKeyStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    keys: BTreeMap<(String, u32), StoredKey>,
    audit: Vec<AuditEvent>,
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
        Ok(inner
            .keys
            .values()
            .filter(|k| owners.contains(&k.owner_id.as_str()))
            .cloned()
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

    fn owners(&self) -> Result<Vec<String>> {
        let inner = self.lock()?;
        let mut owners: Vec<String> = inner.keys.keys().map(|(o, _)| o.clone()).collect();
        owners.dedup();
        Ok(owners)
    }
}
