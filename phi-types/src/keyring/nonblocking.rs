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
//! Every decision (hit, lead, wait, load, unwrap, create, publish, fail) is
//! the resolution core's ([`super::resolve`]), shared with the blocking
//! resolution; this module only awaits what the core asks for.
//!
//! A waiter whose leader fails gets a copy of the leader's error, of the
//! same kind (shredded, KEK failure, ...). A leader whose task is cancelled
//! (its future dropped) completes its flights with an error, so waiters
//! never hang: they get [`Error::KeyUnavailable`] and may retry.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::resolve::{self, Input, Io, Step};
use super::{Keyring, OwnerKeys, Purpose, usable};
use crate::error::{Error, Result};

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

    /// `resolve_each` for async code: drives the same resolution core
    /// ([`super::resolve`]), awaiting the key store (on the blocking pool),
    /// the KEK's async calls, and other callers' flights (their `Notify`).
    ///
    /// Each IO's outcome goes straight into the core's next step, which
    /// puts any data key into its `Arc` before returning: no key is held in
    /// this future across an `.await`.
    async fn resolve_each_async<'a>(
        &self,
        owners: impl IntoIterator<Item = &'a str>,
        purpose: Purpose,
        reserved: bool,
    ) -> Vec<(String, Result<Arc<OwnerKeys>>)> {
        let mut resolution = self.core().start(owners, purpose, reserved);
        let mut step = resolution.step(None);
        loop {
            let io = match step {
                Step::Done(results) => return results,
                Step::Io(io) => io,
            };
            step = match io {
                Io::Load(owners) => {
                    let store = self.inner.store.clone();
                    let rows = blocking("loading data keys", move || {
                        let refs: Vec<&str> = owners.iter().map(String::as_str).collect();
                        store.load_keys(&refs)
                    })
                    .await;
                    resolution.step(Some(Input::Rows(rows)))
                }
                Io::Unwrap { kek, requests } => {
                    let span = tracing::debug_span!(
                        "phi.kek.unwrap",
                        kek = kek.id(),
                        keys = requests.len()
                    );
                    let unwrapped =
                        tracing::Instrument::instrument(kek.unwrap_many_async(requests), span)
                            .await;
                    resolution.step(Some(Input::Unwrapped(unwrapped)))
                }
                Io::Generate {
                    kek,
                    owner,
                    version,
                } => {
                    let span = tracing::debug_span!(
                        "phi.kek.generate",
                        owner = %self.owner_for_telemetry(&owner),
                        version,
                        kek = kek.id()
                    );
                    let generated =
                        tracing::Instrument::instrument(kek.generate_async(&owner, version), span)
                            .await;
                    resolution.step(Some(Input::Generated(generated)))
                }
                Io::Insert { row, record } => {
                    let store = self.inner.store.clone();
                    let inserted = blocking("storing a new data key", move || {
                        resolve::insert_key(store.as_ref(), &row, &record)
                    })
                    .await;
                    resolution.step(Some(Input::Inserted(inserted)))
                }
                Io::Record { unwraps, generated } => {
                    self.inner.audit.push(unwraps);
                    let recorded = if generated.is_empty() {
                        Ok(())
                    } else {
                        let store = self.inner.store.clone();
                        blocking("writing generate audit records", move || {
                            store.append_audit(&generated)
                        })
                        .await
                    };
                    resolution.step(Some(Input::Recorded(recorded)))
                }
                Io::Wait(flight) => {
                    let waited = flight.wait_async().await;
                    resolution.step(Some(Input::Waited(waited)))
                }
                Io::Again(owner) => {
                    let resolved =
                        Box::pin(self.resolve_one_async(&owner, purpose, reserved)).await;
                    resolution.step(Some(Input::Resolved(resolved)))
                }
            };
        }
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
