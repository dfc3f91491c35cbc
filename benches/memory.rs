//! Memory per cached owner: the resident memory one owner's cached keys
//! take (the `OwnerKeys` with its data key's expanded cipher key and raw
//! bytes, one derived blind-index key, the cache's map entry and the
//! owner id), measured as the growth of the process's resident set while
//! 1,000,000 owners are cached; then the same owners through a keyring
//! whose size bound is a tenth of that, to show the bound holding.
//!
//! `cargo bench -p phi-benches --bench memory` (about a minute; `PHI_MEMORY_OWNERS=N`
//! for another count). Linux only (reads `/proc/self/status`). Results in
//! `benches/README.md`. Not a test: nothing is asserted but that the
//! counts add up.

#![allow(clippy::print_stdout, clippy::cast_precision_loss)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use phi_types::blind::Normalize;
use phi_types::{
    AuditEvent, KekCheck, KeyBytes, KeyStore, Keyring, LocalKek, MemoryKeyStore, StoredKey,
};

const CHUNK: usize = 10_000;

/// A `MemoryKeyStore` that drops audit records, so the resident set
/// measures the key cache and not a growing in-memory audit log.
#[derive(Debug, Default)]
struct NoAudit(MemoryKeyStore);

impl KeyStore for NoAudit {
    fn load_keys(&self, owners: &[&str]) -> phi_types::Result<Vec<StoredKey>> {
        self.0.load_keys(owners)
    }
    fn insert_key_if_absent(&self, key: &StoredKey) -> phi_types::Result<bool> {
        self.0.insert_key_if_absent(key)
    }
    fn append_audit(&self, _events: &[AuditEvent]) -> phi_types::Result<()> {
        Ok(())
    }
    fn kek_check(&self, kek_id: &str) -> phi_types::Result<Option<KekCheck>> {
        self.0.kek_check(kek_id)
    }
    fn insert_kek_check_if_absent(
        &self,
        kek_id: &str,
        check: &KekCheck,
    ) -> phi_types::Result<bool> {
        self.0.insert_kek_check_if_absent(kek_id, check)
    }
    fn owners(&self) -> phi_types::Result<Vec<String>> {
        self.0.owners()
    }
    fn keys_page(
        &self,
        wrapped_by: Option<&str>,
        not_wrapped_by: Option<&str>,
        after: Option<(&str, u32)>,
        limit: usize,
    ) -> phi_types::Result<Vec<StoredKey>> {
        self.0.keys_page(wrapped_by, not_wrapped_by, after, limit)
    }
}

/// `VmRSS` and `VmHWM` (peak) of this process, in KiB.
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn keyring(store: Arc<NoAudit>, max_owners: usize) -> Keyring {
    let kek = Arc::new(LocalKek::new("bench-memory", &KeyBytes::new([0x42; 32])));
    Keyring::builder(store, kek)
        .max_owners(max_owners)
        .ttl(Duration::from_secs(24 * 60 * 60))
        .build()
        .expect("keyring")
}

/// Resolves every owner, chunk by chunk, deriving one blind-index key each
/// (as a model with one blind-indexed column does on its first write).
fn cache_all(keyring: &Keyring, owners: &[String]) {
    for chunk in owners.chunks(CHUNK) {
        let keys = keyring
            .keys_for_open_many(chunk.iter().map(String::as_str))
            .expect("resolve");
        assert_eq!(keys.len(), chunk.len());
        for k in keys.values() {
            k.blind_index("cases.patient_last", &"doe".to_string(), Normalize::NONE)
                .expect("blind index");
        }
    }
}

fn main() {
    let n: usize = std::env::var("PHI_MEMORY_OWNERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    println!("backend: {}", phi_types::envelope::BACKEND);
    println!(
        "size_of: OwnerKeys {} B, Dek {} B (inline; the ring backend boxes its key schedule)",
        size_of::<phi_types::OwnerKeys>(),
        size_of::<phi_types::Dek>()
    );
    // Owner ids as the compare bench's: 16 bytes.
    let owners: Vec<String> = (0..n).map(|i| format!("owner-{i:010}")).collect();

    // The store: one data key per owner, created through a keyring with a
    // small cache (dropped before measuring).
    let store = Arc::new(NoAudit::default());
    let started = Instant::now();
    {
        let filler = keyring(store.clone(), CHUNK);
        for chunk in owners.chunks(CHUNK) {
            filler
                .keys_for_seal_many(chunk.iter().map(String::as_str))
                .expect("create keys");
        }
    }
    println!("{n} owners' keys created in {:.1?}", started.elapsed());

    let (before, _) = rss_kib();
    let started = Instant::now();
    let all = keyring(store.clone(), n + 1);
    cache_all(&all, &owners);
    let (after, peak) = rss_kib();
    let stats = all.stats();
    println!(
        "cache of {n} owners (max_owners {}): filled in {:.1?}, {} unwraps, {} evictions",
        n + 1,
        started.elapsed(),
        stats.unwraps,
        stats.evictions
    );
    println!(
        "RSS {before} KiB -> {after} KiB: {} KiB for the cache, {:.0} B an owner; peak RSS {peak} KiB",
        after.saturating_sub(before),
        after.saturating_sub(before) as f64 * 1024.0 / n as f64
    );
    drop(all);

    // The size bound: a tenth of the owners at most.
    let bound = (n / 10).max(1);
    let (before_bounded, _) = rss_kib();
    let bounded = keyring(store, bound);
    cache_all(&bounded, &owners);
    let (after_bounded, peak) = rss_kib();
    let stats = bounded.stats();
    println!(
        "max_owners {bound}: {} unwraps, {} evictions; RSS {before_bounded} KiB -> {after_bounded} KiB \
         ({} KiB more), peak RSS {peak} KiB",
        stats.unwraps,
        stats.evictions,
        after_bounded.saturating_sub(before_bounded)
    );
}
