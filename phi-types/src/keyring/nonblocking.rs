//! Async key resolution (feature `async`): the same cache, single-flight and
//! audit as the blocking resolution, without ever blocking a runtime worker.
//!
//! - A cache hit is a hash lookup on the calling task, as in sync code.
//! - A task that misses an owner another task (or thread) is resolving
//!   waits for that resolution's result on a `tokio::sync::Notify`: the task
//!   is parked, its worker thread runs other tasks.
//! - The task that leads a resolution runs the key store's queries on
//!   `tokio::task::spawn_blocking` (the [`KeyStore`](crate::KeyStore) is
//!   the blocking Diesel store with its r2d2 pool; see
//!   [`Keyring::keys_for_open_many_async`] for why) and awaits the KEK's
//!   [`unwrap_many_async`](crate::KeyEncryptionKey::unwrap_many_async) /
//!   [`generate_async`](crate::KeyEncryptionKey::generate_async), which for
//!   `AwsKmsKek` are the SDK's own futures on the caller's runtime.
//!
//! A leader whose task is cancelled (its future dropped) completes its
//! flights with an error, so waiters never hang: they get
//! [`Error::KeyUnavailable`] and may retry.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Keyring, OwnerKeys, Purpose, live_sorted, usable};
use crate::dek::KeyBytes;
use crate::error::{Error, Result};
use crate::store::{AuditAction, AuditEvent, StoredKey};

impl Keyring {
    /// [`keys_for_seal`](Self::keys_for_seal) without blocking the calling
    /// task's thread.
    ///
    /// # Errors
    /// As [`keys_for_seal`](Self::keys_for_seal).
    pub async fn keys_for_seal_async(&self, owner: &str) -> Result<Arc<OwnerKeys>> {
        self.check_feed_nonblocking(owner)?;
        self.resolve_one_async(owner, Purpose::Seal, false).await
    }

    /// [`keys_for_open`](Self::keys_for_open) without blocking the calling
    /// task's thread.
    ///
    /// # Errors
    /// As [`keys_for_open`](Self::keys_for_open).
    pub async fn keys_for_open_async(&self, owner: &str) -> Result<Arc<OwnerKeys>> {
        self.resolve_one_async(owner, Purpose::Open, false).await
    }

    /// [`keys_for_open_many`](Self::keys_for_open_many) for async code: one
    /// key-store query for all the cache misses, one unwrap per data key not
    /// cached, and the same single-flight guarantee (any number of tasks and
    /// threads missing one owner cause one resolution; the others wait for
    /// it without blocking a thread).
    ///
    /// Needs a tokio runtime (multi-thread or current-thread). The key
    /// store's query runs on `spawn_blocking`: the store is the blocking
    /// Diesel store with its own r2d2 pool. That costs one hand-off to the
    /// blocking pool per batch of misses, measured at about 46 µs
    /// (`tests/async_measure.rs`, dev profile, a shared 2-core machine),
    /// beside a key-store query and, with a KMS, a round trip of
    /// milliseconds; a cache hit costs nothing extra. A second, async key
    /// store with a pool of its own would add connections to every database
    /// to save that hand-off on misses only, so there is none.
    ///
    /// # Errors
    /// As [`keys_for_open_many`](Self::keys_for_open_many).
    pub async fn keys_for_open_many_async<'a>(
        &self,
        owners: impl IntoIterator<Item = &'a str>,
    ) -> Result<HashMap<String, Arc<OwnerKeys>>> {
        self.resolve_many_async(owners, Purpose::Open, false).await
    }

    /// [`keys_for_seal_many`](Self::keys_for_seal_many) for async code
    /// (see [`keys_for_open_many_async`](Self::keys_for_open_many_async)).
    ///
    /// # Errors
    /// As [`keys_for_seal_many`](Self::keys_for_seal_many).
    pub async fn keys_for_seal_many_async<'a>(
        &self,
        owners: impl IntoIterator<Item = &'a str>,
    ) -> Result<HashMap<String, Arc<OwnerKeys>>> {
        let owners: Vec<&str> = owners.into_iter().collect();
        if let Some(first) = owners.first() {
            self.check_feed_nonblocking(first)?;
        }
        self.resolve_many_async(owners, Purpose::Seal, false).await
    }

    /// [`warm`](Self::warm) for async code.
    ///
    /// # Errors
    /// As [`keys_for_open_many_async`](Self::keys_for_open_many_async).
    pub async fn warm_async<'a>(&self, owners: impl IntoIterator<Item = &'a str>) -> Result<usize> {
        self.resolve_many_async(owners, Purpose::Open, false)
            .await
            .map(|m| m.len())
    }

    /// [`flush_audit`](Self::flush_audit) for async code: waits on the
    /// blocking pool.
    ///
    /// # Errors
    /// As [`flush_audit`](Self::flush_audit).
    pub async fn flush_audit_async(&self) -> Result<()> {
        let keyring = self.clone();
        blocking("flushing the audit queue", move || keyring.flush_audit()).await
    }

    pub(crate) async fn reload_for_open_async(
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
        let keys = self
            .keys_for_open_many_async(wanted.iter().map(|(owner, _)| *owner))
            .await?;
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

    /// [`Keyring::reserved_keys`] without blocking the task's thread.
    pub(crate) async fn reserved_keys_async(
        &self,
        owner: &str,
        seal: bool,
    ) -> Result<Arc<OwnerKeys>> {
        if seal {
            self.check_feed_nonblocking(owner)?;
            self.resolve_one_async(owner, Purpose::Seal, true).await
        } else {
            self.resolve_one_async(owner, Purpose::Open, true).await
        }
    }

    async fn resolve_one_async(
        &self,
        owner: &str,
        purpose: Purpose,
        reserved: bool,
    ) -> Result<Arc<OwnerKeys>> {
        if !reserved {
            crate::keyring::refuse_reserved(owner)?;
        }
        let now = self.inner.clock.now();
        if let Some(keys) = self.inner.cache.get(owner, now, usable(purpose)) {
            crate::metrics::cache_hit();
            return Ok(keys);
        }
        let mut resolved = self.resolve_many_async([owner], purpose, reserved).await?;
        resolved.remove(owner).ok_or_else(|| Error::KeyUnavailable {
            owner: owner.to_owned(),
            reason: "resolution returned no keys".into(),
        })
    }

    async fn resolve_many_async<'a>(
        &self,
        owners: impl IntoIterator<Item = &'a str>,
        purpose: Purpose,
        reserved: bool,
    ) -> Result<HashMap<String, Arc<OwnerKeys>>> {
        let mut found = HashMap::new();
        for (owner, result) in self.resolve_each_async(owners, purpose, reserved).await {
            found.insert(owner, result?);
        }
        Ok(found)
    }

    /// `resolve_each`, awaiting where it blocks.
    async fn resolve_each_async<'a>(
        &self,
        owners: impl IntoIterator<Item = &'a str>,
        purpose: Purpose,
        reserved: bool,
    ) -> Vec<(String, Result<Arc<OwnerKeys>>)> {
        let mut batch = self.look_up(owners, purpose, reserved);
        if let Some(owners) = batch.leading() {
            let filled = self.fill_async(&owners, purpose).await;
            batch.settle(owners, filled);
        }
        let (mut results, waits) = batch.finish();
        for (owner, flight) in waits {
            let result = match flight.wait_async().await {
                Ok(keys) if usable(purpose)(&keys) => Ok(keys),
                // Resolved for opening while this caller seals: resolve again.
                Ok(_) => Box::pin(self.resolve_one_async(owner, purpose, reserved)).await,
                Err(reason) => Err(Error::KeyUnavailable {
                    owner: owner.to_owned(),
                    reason,
                }),
            };
            results.push((owner.to_owned(), result));
        }
        results
    }

    /// `fill`, awaiting the key store (on the blocking pool) and the KEK.
    async fn fill_async(
        &self,
        owners: &[String],
        purpose: Purpose,
    ) -> Result<Vec<(String, Result<Arc<OwnerKeys>>)>> {
        let fill = self.inner.counters.fills.fetch_add(1, Ordering::SeqCst) + 1;
        self.count_load();
        let rows = {
            let store = self.inner.store.clone();
            let owners = owners.to_vec();
            blocking("loading data keys", move || {
                let refs: Vec<&str> = owners.iter().map(String::as_str).collect();
                store.load_keys(&refs)
            })
            .await?
        };
        let mut by_owner: HashMap<&str, Vec<&StoredKey>> = HashMap::new();
        for row in &rows {
            by_owner.entry(row.owner_id.as_str()).or_default().push(row);
        }
        let groups: Vec<(&String, Vec<&StoredKey>, Vec<&StoredKey>)> = owners
            .iter()
            .map(|owner| {
                let rows = by_owner.remove(owner.as_str()).unwrap_or_default();
                let live = live_sorted(&rows);
                (owner, rows, live)
            })
            .collect();
        let all: Vec<&StoredKey> = groups
            .iter()
            .flat_map(|(_, _, live)| live.iter().copied())
            .collect();
        let mut unwrapped = self.unwrap_keys_async(&all).await.into_iter();
        let mut audit = Vec::new();
        let mut results = Vec::with_capacity(owners.len());
        for (owner, rows, live) in groups {
            let keys: Vec<_> = unwrapped.by_ref().take(live.len()).collect();
            // Into its `Arc` before any `.await`: nothing of a data key is
            // held inline in this future, whose memory is freed unwiped.
            let loaded = self
                .owner_keys(owner, &live, keys, &mut audit)
                .map(|keys| Arc::new(OwnerKeys { fill, ..keys }));
            let result = match loaded {
                Ok(keys) if purpose == Purpose::Seal && keys.current.is_none() => {
                    drop(keys);
                    self.create_async(owner, &rows, fill, &mut audit).await
                }
                other => other,
            };
            results.push((owner.clone(), result));
        }
        let (unwraps, generated): (Vec<_>, Vec<_>) = audit
            .into_iter()
            .partition(|e| e.action == AuditAction::Unwrap);
        self.inner.audit.push(unwraps);
        if !generated.is_empty() {
            self.count_query();
            let store = self.inner.store.clone();
            blocking("writing generate audit records", move || {
                store.append_audit(&generated)
            })
            .await?;
        }
        Ok(results)
    }

    /// `unwrap_keys` through each KEK's `unwrap_many_async`.
    async fn unwrap_keys_async(&self, rows: &[&StoredKey]) -> Vec<Result<KeyBytes>> {
        let mut results: Vec<Option<Result<KeyBytes>>> = rows.iter().map(|_| None).collect();
        let mut by_kek: HashMap<&str, Vec<usize>> = HashMap::new();
        for (index, row) in rows.iter().enumerate() {
            by_kek.entry(row.kek_id.as_str()).or_default().push(index);
        }
        for (kek_id, indices) in by_kek {
            let Some(kek) = self.inner.keks.get(kek_id) else {
                for index in indices {
                    let row = rows[index];
                    results[index] = Some(Err(Error::UnknownKek {
                        owner: row.owner_id.clone(),
                        key_version: row.version,
                        kek_id: row.kek_id.clone(),
                    }));
                }
                continue;
            };
            let requests: Vec<(String, u32, Vec<u8>)> = indices
                .iter()
                .map(|&i| {
                    (
                        rows[i].owner_id.clone(),
                        rows[i].version,
                        rows[i].wrapped_key.clone(),
                    )
                })
                .collect();
            let span = tracing::debug_span!("phi.kek.unwrap", kek = kek_id, keys = requests.len());
            let unwrapped =
                tracing::Instrument::instrument(kek.unwrap_many_async(requests), span).await;
            let mut unwrapped = unwrapped.into_iter();
            for index in indices {
                let row = rows[index];
                results[index] = unwrapped.next().map(|result| {
                    result.map_err(|source| Error::Kek {
                        kek_id: row.kek_id.clone(),
                        owner: row.owner_id.clone(),
                        key_version: row.version,
                        source,
                    })
                });
            }
        }
        results
            .into_iter()
            .zip(rows)
            .map(|(result, row)| {
                result.unwrap_or_else(|| {
                    Err(Error::KeyUnavailable {
                        owner: row.owner_id.clone(),
                        reason: format!(
                            "KEK {:?} returned no result for version {}",
                            row.kek_id, row.version
                        ),
                    })
                })
            })
            .collect()
    }

    /// `create`, awaiting the KEK and the key store.
    async fn create_async(
        &self,
        owner: &str,
        rows: &[&StoredKey],
        fill: u64,
        audit: &mut Vec<AuditEvent>,
    ) -> Result<Arc<OwnerKeys>> {
        let version = match rows.iter().map(|r| r.version).max() {
            None => 1,
            Some(_)
                if rows
                    .iter()
                    .all(|r| r.state == crate::store::KeyState::Destroyed) =>
            {
                return Err(Error::Shredded {
                    owner: owner.to_owned(),
                });
            }
            Some(_) => {
                return Err(Error::NoKey {
                    owner: owner.to_owned(),
                });
            }
        };
        let kek = &self.inner.primary;
        let span = tracing::debug_span!(
            "phi.kek.generate",
            owner = %self.owner_for_telemetry(owner),
            version,
            kek = kek.id()
        );
        let (key, wrapped) =
            tracing::Instrument::instrument(kek.generate_async(owner, version), span)
                .await
                .map_err(|source| Error::Kek {
                    kek_id: kek.id().to_owned(),
                    owner: owner.to_owned(),
                    key_version: version,
                    source,
                })?;
        let row = StoredKey::active(owner, version, kek.id(), wrapped);
        // The new key goes into its `Arc` now, before the store's `.await`,
        // so that no copy of it is held inline in this future (whose memory
        // is freed unwiped); dropped (and wiped) if another process wins.
        let created = Arc::new(OwnerKeys {
            owner: owner.to_owned(),
            deks: super::Deks::One(crate::dek::Dek::new(version, key)),
            current: Some(0),
            loaded_at: self.inner.clock.now(),
            fill,
            blind_keys: Default::default(),
        });
        self.count_query();
        // The key's `generate` record is written by the same blocking task
        // that inserts the key: once the insert is under way it runs to the
        // end even if this future is dropped (a cancelled request, a
        // timeout), so a key is never stored without its record.
        let inserted = {
            let store = self.inner.store.clone();
            let record = self.event(owner, AuditAction::Generate, version, kek.id());
            blocking("storing a new data key", move || {
                let inserted = store.insert_key_if_absent(&row)?;
                if inserted {
                    store.append_audit(std::slice::from_ref(&record))?;
                }
                Ok(inserted)
            })
            .await?
        };
        if inserted {
            // The `generate` record's write.
            self.count_query();
            self.inner
                .counters
                .creations
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                owner = %self.owner_for_telemetry(owner),
                version,
                kek = kek.id(),
                "generated a data key"
            );
            return Ok(created);
        }
        // Another process won the race: use its key, never ours.
        drop(created);
        self.count_load();
        let winners = {
            let store = self.inner.store.clone();
            let owner = owner.to_owned();
            blocking("loading data keys", move || store.load_keys(&[&owner])).await?
        };
        let winners: Vec<&StoredKey> = live_sorted(&winners.iter().collect::<Vec<_>>());
        let unwrapped = self.unwrap_keys_async(&winners).await;
        let keys = self.owner_keys(owner, &winners, unwrapped, audit)?;
        if keys.current.is_none() {
            return Err(Error::NoKey {
                owner: owner.to_owned(),
            });
        }
        Ok(Arc::new(OwnerKeys { fill, ..keys }))
    }
}

/// Runs a blocking key-store call on tokio's blocking pool.
pub(crate) async fn blocking<T, F>(operation: &'static str, call: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(call).await {
        Ok(result) => result,
        Err(joined) => Err(Error::Store {
            operation,
            source: format!("the blocking call did not complete: {joined}").into(),
        }),
    }
}

impl super::KeyringBuilder {
    /// [`build`](Self::build) from async code: the KEK check (one key-store
    /// query and, for a KMS, one call per configured KEK) runs on tokio's
    /// blocking pool, so it never blocks a runtime worker. The keyring is
    /// then used with the `*_async` methods. The check uses the KEKs'
    /// blocking API: an `AwsKmsKek` made with `from_client` /
    /// `from_sdk_config` starts its small runtime for that call (on the
    /// blocking pool's thread, never inside the caller's runtime).
    ///
    /// # Errors
    /// As [`build`](Self::build).
    pub async fn build_async(self) -> Result<Keyring> {
        blocking("building the keyring", move || self.build()).await
    }
}
