//! Criterion benchmarks of envelope v1 and the keyring.
//!
//! `cargo bench -p phi-benches --bench envelope`; results and how to read them are in
//! `benches/README.md`. Groups:
//!
//! - `aes_gcm_raw`: the baseline, aes-gcm 0.11 encrypt / decrypt, detached,
//!   in place, no associated data, one initialised cipher;
//! - `ring_raw`: ring 0.17's AES-256-GCM, the same calls, with the same 49
//!   bytes of associated data as `aes_gcm_raw/*_with_aad`;
//! - `phi_seal` and `phi_open` run on the backend of the build
//!   (`phi_types::envelope::BACKEND`, printed first): ring by default,
//!   aes-gcm with `--no-default-features --features sqlite`;
//! - `phi_seal`: `OwnerKeys::seal` (one fork check per call) and
//!   `Sealer::seal` per value inside one `with_sealer` batch, warm cache;
//! - `phi_open`: `OwnerKeys::open` and `Keyring::open` (cache lookup
//!   included), warm cache; the sealed input is cloned outside the timing;
//! - `keyring`: a cache hit, and the cold resolution of 1,000 owners through
//!   `LocalKek` over a `MemoryKeyStore` and over SQLite (`DieselKeyStore`).

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use phi_types::{
    Encrypted, KeyBytes, KeyStore, Keyring, LocalKek, MemoryKeyStore, OwnerKeys, StoredKey,
};

const SIZES: [usize; 5] = [16, 64, 1024, 5_000, 50_000];
const OWNER: &str = "provider-17";
const SCOPE: &str = "cases.patient_note";
const ROW: &[u8] = b"C-000001";
const COLD_OWNERS: usize = 1_000;

fn value(len: usize) -> Vec<u8> {
    b"abcdefghijklmnopqrstuvwxyz"
        .iter()
        .cycle()
        .take(len)
        .copied()
        .collect()
}

fn kek() -> Arc<LocalKek> {
    Arc::new(LocalKek::new("bench-local", &KeyBytes::new([0x42; 32])))
}

fn keyring(store: Arc<dyn KeyStore>) -> Keyring {
    Keyring::builder(store, kek())
        .max_owners(2 * COLD_OWNERS)
        .build()
        .expect("keyring")
}

/// The owner's keys for sealing (which also fills the cache, so later
/// `keys_for_*` calls are hits).
fn warm_keys(keyring: &Keyring, owner: &str) -> Arc<OwnerKeys> {
    keyring.keys_for_seal(owner).expect("resolve")
}

fn owners() -> Vec<String> {
    (0..COLD_OWNERS).map(|i| format!("owner-{i:05}")).collect()
}

fn raw_aes_gcm(c: &mut Criterion) {
    let cipher = Aes256Gcm::new(&[0x42u8; 32].into());
    let nonce = Nonce::from([7u8; 12]);
    let mut group = c.benchmark_group("aes_gcm_raw");
    for len in SIZES {
        group.throughput(Throughput::Bytes(len as u64));
        let mut buf = value(len);
        group.bench_function(BenchmarkId::new("encrypt", len), |b| {
            b.iter(|| {
                let tag = cipher
                    .encrypt_inout_detached(&nonce, b"", buf.as_mut_slice().into())
                    .expect("encrypt");
                black_box(tag)
            });
        });
        let mut sealed = value(len);
        let tag: Tag = cipher
            .encrypt_inout_detached(&nonce, b"", sealed.as_mut_slice().into())
            .expect("encrypt");
        group.bench_function(BenchmarkId::new("decrypt", len), |b| {
            b.iter_batched(
                || sealed.clone(),
                |mut buf| {
                    cipher
                        .decrypt_inout_detached(&nonce, b"", buf.as_mut_slice().into(), &tag)
                        .expect("decrypt");
                    buf
                },
                BatchSize::SmallInput,
            );
        });
    }
    // The same cipher calls with the associated data phi binds to every
    // value (49 bytes here): GHASH over it is part of any bound envelope.
    let aad = phi_aad();
    for len in SIZES {
        group.throughput(Throughput::Bytes(len as u64));
        let mut buf = value(len);
        group.bench_function(BenchmarkId::new("encrypt_with_aad", len), |b| {
            b.iter(|| {
                let tag = cipher
                    .encrypt_inout_detached(&nonce, &aad, buf.as_mut_slice().into())
                    .expect("encrypt");
                black_box(tag)
            });
        });
        let mut sealed = value(len);
        let tag: Tag = cipher
            .encrypt_inout_detached(&nonce, &aad, sealed.as_mut_slice().into())
            .expect("encrypt");
        group.bench_function(BenchmarkId::new("decrypt_with_aad", len), |b| {
            b.iter_batched(
                || sealed.clone(),
                |mut buf| {
                    cipher
                        .decrypt_inout_detached(&nonce, &aad, buf.as_mut_slice().into(), &tag)
                        .expect("decrypt");
                    buf
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

fn raw_ring(c: &mut Criterion) {
    use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce as RingNonce, UnboundKey};
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[0x42u8; 32]).expect("key"));
    let nonce = || RingNonce::assume_unique_for_key([7u8; 12]);
    let aad = phi_aad();
    let mut group = c.benchmark_group("ring_raw");
    for len in SIZES {
        group.throughput(Throughput::Bytes(len as u64));
        let mut buf = value(len);
        group.bench_function(BenchmarkId::new("encrypt_with_aad", len), |b| {
            b.iter(|| {
                let tag = key
                    .seal_in_place_separate_tag(nonce(), Aad::from(&aad), buf.as_mut_slice())
                    .expect("encrypt");
                black_box(tag)
            });
        });
        let mut sealed = value(len);
        let tag = key
            .seal_in_place_separate_tag(nonce(), Aad::from(&aad), sealed.as_mut_slice())
            .expect("encrypt");
        group.bench_function(BenchmarkId::new("decrypt_with_aad", len), |b| {
            b.iter_batched(
                || sealed.clone(),
                |mut buf| {
                    key.open_in_place_separate_tag(nonce(), Aad::from(&aad), tag, &mut buf, 0..)
                        .expect("decrypt");
                    buf
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

/// The associated data of envelope v1 for `OWNER`, `SCOPE` and `ROW`.
fn phi_aad() -> Vec<u8> {
    let mut aad = vec![0xF1, 0x01, 0, 0, 0, 1];
    for part in [OWNER.as_bytes(), SCOPE.as_bytes(), ROW] {
        aad.extend_from_slice(&u16::try_from(part.len()).expect("short").to_be_bytes());
        aad.extend_from_slice(part);
    }
    aad
}

fn phi_seal(c: &mut Criterion) {
    let keyring = keyring(Arc::new(MemoryKeyStore::new()));
    let keys = warm_keys(&keyring, OWNER);
    let mut group = c.benchmark_group("phi_seal");
    for len in SIZES {
        group.throughput(Throughput::Bytes(len as u64));
        let plain = value(len);
        group.bench_function(BenchmarkId::new("owner_keys", len), |b| {
            b.iter(|| keys.seal(black_box(&plain), SCOPE, ROW).expect("seal"));
        });
        group.bench_function(BenchmarkId::new("with_sealer_batch", len), |b| {
            phi_types::__private::with_sealer(|sealer| {
                b.iter(|| {
                    sealer
                        .seal(&keys, black_box(&plain), SCOPE, ROW)
                        .expect("seal")
                });
            })
            .expect("sealer");
        });
    }
    group.finish();
}

fn phi_open(c: &mut Criterion) {
    let keyring = keyring(Arc::new(MemoryKeyStore::new()));
    let keys = warm_keys(&keyring, OWNER);
    let mut group = c.benchmark_group("phi_open");
    for len in SIZES {
        group.throughput(Throughput::Bytes(len as u64));
        let sealed: Encrypted<Vec<u8>> = keys.seal(&value(len), SCOPE, ROW).expect("seal");
        group.bench_function(BenchmarkId::new("owner_keys", len), |b| {
            b.iter_batched(
                || sealed.clone(),
                |sealed| keys.open(sealed, SCOPE, ROW).expect("open"),
                BatchSize::SmallInput,
            );
        });
        group.bench_function(BenchmarkId::new("keyring", len), |b| {
            b.iter_batched(
                || sealed.clone(),
                |sealed| keyring.open(sealed, OWNER, SCOPE, ROW).expect("open"),
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

fn keyring_cache_hit(c: &mut Criterion) {
    let keyring = keyring(Arc::new(MemoryKeyStore::new()));
    warm_keys(&keyring, OWNER);
    let mut group = c.benchmark_group("keyring");
    group.bench_function("cache_hit", |b| {
        b.iter(|| keyring.keys_for_open(black_box(OWNER)).expect("hit"));
    });
    group.finish();
}

/// Every data key row of `owners`, as sealing once for each owner leaves
/// them in a key store.
fn stored_keys(owners: &[String]) -> Vec<StoredKey> {
    let store = Arc::new(MemoryKeyStore::new());
    let keyring = keyring(store.clone());
    let refs: Vec<&str> = owners.iter().map(String::as_str).collect();
    let keys = keyring
        .keys_for_seal_many(refs.iter().copied())
        .expect("keys");
    for owner in &refs {
        keys[*owner]
            .seal(&"Doe".to_string(), SCOPE, ROW)
            .expect("seal");
    }
    store.load_keys(&refs).expect("load")
}

fn check_resolved(resolved: &HashMap<String, Arc<OwnerKeys>>) {
    debug_assert_eq!(resolved.len(), COLD_OWNERS);
    debug_assert!(resolved.values().all(|k| k.current_version() == Some(1)));
}

fn keyring_cold(c: &mut Criterion) {
    let owners = owners();
    let refs: Vec<&str> = owners.iter().map(String::as_str).collect();
    let rows = stored_keys(&owners);
    assert_eq!(rows.len(), COLD_OWNERS);

    let mut group = c.benchmark_group("keyring_cold_1000_owners");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));

    // A fresh keyring over a freshly filled in-memory store per iteration
    // (so the store's audit log does not grow across iterations).
    group.bench_function("local_kek_memory_store", |b| {
        b.iter_batched(
            || {
                let store = Arc::new(MemoryKeyStore::new());
                for row in &rows {
                    store.insert_key_if_absent(row).expect("insert");
                }
                keyring(store)
            },
            |keyring| {
                let resolved = keyring
                    .keys_for_open_many(refs.iter().copied())
                    .expect("resolve");
                check_resolved(&resolved);
                (keyring, resolved)
            },
            BatchSize::PerIteration,
        );
    });

    // SQLite file database: one `SELECT … IN (…)` for the 1,000 owners,
    // 1,000 unwraps, and the 1,000 `unwrap` audit rows appended.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("keys.db");
    let store = phi_types::DieselKeyStore::<diesel::SqliteConnection>::builder(
        path.to_str().expect("UTF-8 temp path"),
    )
    .run_migrations(true)
    .connect()
    .expect("SQLite key store");
    for row in &rows {
        store.insert_key_if_absent(row).expect("insert");
    }
    let sqlite = keyring(Arc::new(store));
    group.bench_function("local_kek_sqlite_store", |b| {
        b.iter_batched(
            || sqlite.clear_all(),
            |()| {
                let resolved = sqlite
                    .keys_for_open_many(refs.iter().copied())
                    .expect("resolve");
                check_resolved(&resolved);
                resolved
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    eprintln!(
        "phi's AES-256-GCM backend: {}",
        phi_types::envelope::BACKEND
    );
    raw_aes_gcm(&mut c);
    raw_ring(&mut c);
    phi_seal(&mut c);
    phi_open(&mut c);
    keyring_cache_hit(&mut c);
    keyring_cold(&mut c);
    c.final_summary();
}
