//! Reads that never wait on the key store: `unwrap` audit records written
//! in the background, and key versions an owner lacks remembered for a
//! while. (The same on real databases: `tests/suite/reads.rs`.)

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use phi_types::{
    AuditAction, AuditEvent, Encrypted, Error, KeyBytes, KeyStore, Keyring, KeyringStats, LocalKek,
    ManualClock, MemoryKeyStore, StoredKey,
};

const SCOPE: &str = "cases.patient_last";

fn kek() -> Arc<LocalKek> {
    Arc::new(LocalKek::new("local-1", &KeyBytes::new([0x42; 32])))
}

/// A key store whose audit appends wait at a gate the test holds, and say
/// when they arrive there; or always fail.
#[derive(Debug)]
struct GatedStore {
    inner: MemoryKeyStore,
    gate: Mutex<()>,
    arrived: Mutex<Sender<usize>>,
    fail: bool,
}

impl GatedStore {
    fn new(fail: bool) -> (Arc<Self>, Receiver<usize>) {
        let (arrived, arrivals) = channel();
        let store = Arc::new(GatedStore {
            inner: MemoryKeyStore::new(),
            gate: Mutex::new(()),
            arrived: Mutex::new(arrived),
            fail,
        });
        (store, arrivals)
    }

    fn unwraps(&self) -> Vec<(String, Option<u32>)> {
        self.inner
            .audit_events()
            .into_iter()
            .filter(|e| e.action == AuditAction::Unwrap)
            .map(|e| (e.owner_id, e.key_version))
            .collect()
    }
}

impl KeyStore for GatedStore {
    fn load_keys(&self, owners: &[&str]) -> phi_types::Result<Vec<StoredKey>> {
        self.inner.load_keys(owners)
    }
    fn insert_key_if_absent(&self, key: &StoredKey) -> phi_types::Result<bool> {
        self.inner.insert_key_if_absent(key)
    }
    fn append_audit(&self, events: &[AuditEvent]) -> phi_types::Result<()> {
        if events.iter().all(|e| e.action != AuditAction::Unwrap) {
            return self.inner.append_audit(events);
        }
        let _ = self.arrived.lock().expect("lock").send(events.len());
        let _gate = self.gate.lock().expect("gate");
        if self.fail {
            // What a database user without INSERT on the audit table gets.
            return Err(phi_types::Error::Store {
                operation: "appending audit records",
                source: "permission denied for table encryption_key_audit".into(),
            });
        }
        self.inner.append_audit(events)
    }
    fn owners(&self) -> phi_types::Result<Vec<String>> {
        self.inner.owners()
    }
    fn kek_check(&self, kek_id: &str) -> phi_types::Result<Option<phi_types::KekCheck>> {
        self.inner.kek_check(kek_id)
    }
    fn insert_kek_check_if_absent(
        &self,
        kek_id: &str,
        check: &phi_types::KekCheck,
    ) -> phi_types::Result<bool> {
        self.inner.insert_kek_check_if_absent(kek_id, check)
    }
    fn keys_page(
        &self,
        wrapped_by: Option<&str>,
        not_wrapped_by: Option<&str>,
        after: Option<(&str, u32)>,
        limit: usize,
    ) -> phi_types::Result<Vec<StoredKey>> {
        self.inner
            .keys_page(wrapped_by, not_wrapped_by, after, limit)
    }
}

/// Seals one value for each owner (creating their keys) with a keyring of
/// its own.
fn seed(store: Arc<GatedStore>, owners: &[&str]) -> Vec<Encrypted<String>> {
    let seeding = Keyring::builder(store, kek()).build().expect("keyring");
    owners
        .iter()
        .map(|o| seeding.seal(&o.to_string(), o, SCOPE, b"").expect("seal"))
        .collect()
}

fn audit_counts(stats: &KeyringStats) -> (u64, u64, u64) {
    (
        stats.audit_written,
        stats.audit_pending,
        stats.audit_dropped,
    )
}

#[test]
fn a_cold_open_does_not_wait_for_its_audit_record() {
    let (store, arrivals) = GatedStore::new(false);
    let sealed = seed(store.clone(), &["a"]);
    let keyring = Keyring::builder(store.clone(), kek())
        .build()
        .expect("keyring");
    let gate = store.gate.lock().expect("gate");

    let opened: String = keyring
        .open(sealed[0].clone(), "a", SCOPE, b"")
        .expect("opens while the audit write is held up");
    assert_eq!(opened, "a");
    assert_eq!(arrivals.recv().expect("the writer took the record"), 1);
    assert_eq!(audit_counts(&keyring.stats()), (0, 1, 0));
    assert!(store.unwraps().is_empty());

    drop(gate);
    keyring.flush_audit().expect("written");
    assert_eq!(audit_counts(&keyring.stats()), (1, 0, 0));
    assert_eq!(store.unwraps(), [("a".to_owned(), Some(1))]);
}

#[test]
fn a_full_audit_queue_drops_counts_and_reports() {
    let (store, arrivals) = GatedStore::new(false);
    let sealed = seed(store.clone(), &["a", "b", "c"]);
    let keyring = Keyring::builder(store.clone(), kek())
        .audit_queue(1)
        .build()
        .expect("keyring");
    let gate = store.gate.lock().expect("gate");
    let open = |i: usize, owner: &str| {
        let opened: String = keyring
            .open(sealed[i].clone(), owner, SCOPE, b"")
            .expect("opens whatever the audit queue holds");
        assert_eq!(opened, owner);
    };
    open(0, "a");
    assert_eq!(arrivals.recv().expect("a's record is being written"), 1);
    open(1, "b"); // queued: the queue is full
    open(2, "c"); // no room: dropped, counted
    assert_eq!(audit_counts(&keyring.stats()), (0, 2, 1));

    drop(gate);
    let err = keyring.flush_audit().expect_err("one record was dropped");
    let message = chain(&err);
    assert!(
        message.contains("1 record(s) could not be written")
            && message.contains("the audit queue is full (1 records)"),
        "{message}"
    );
    assert_eq!(audit_counts(&keyring.stats()), (2, 0, 1));
    assert_eq!(
        store.unwraps(),
        [("a".to_owned(), Some(1)), ("b".to_owned(), Some(1))]
    );
    keyring.flush_audit().expect("reported once");
}

#[test]
fn a_failed_audit_write_is_counted_and_reported_and_the_value_still_opens() {
    let (store, _arrivals) = GatedStore::new(true);
    let sealed = seed(store.clone(), &["a"]);
    let keyring = Keyring::builder(store.clone(), kek())
        .build()
        .expect("keyring");
    let opened: String = keyring
        .open(sealed[0].clone(), "a", SCOPE, b"")
        .expect("opens without an audit write");
    assert_eq!(opened, "a");
    let err = keyring.flush_audit().expect_err("the write failed");
    assert!(
        chain(&err).contains("permission denied for table encryption_key_audit"),
        "{err}"
    );
    assert_eq!(audit_counts(&keyring.stats()), (0, 0, 1));
}

#[test]
fn dropping_the_last_keyring_writes_what_is_queued() {
    let (store, arrivals) = GatedStore::new(false);
    let sealed = seed(store.clone(), &["a", "b"]);
    let keyring = Keyring::builder(store.clone(), kek())
        .build()
        .expect("keyring");
    let clone = keyring.clone();
    let gate = store.gate.lock().expect("gate");
    let _: String = keyring
        .open(sealed[0].clone(), "a", SCOPE, b"")
        .expect("opens");
    assert_eq!(arrivals.recv().expect("a's record is being written"), 1);
    let _: String = keyring
        .open(sealed[1].clone(), "b", SCOPE, b"")
        .expect("opens");
    drop(keyring);
    assert_eq!(clone.stats().audit_pending, 2, "a clone keeps the writer");

    // The last clone's drop waits for the writer, which finishes the queue.
    let dropping = std::thread::spawn(move || drop(clone));
    drop(gate);
    dropping.join().expect("dropped");
    assert_eq!(
        store.unwraps(),
        [("a".to_owned(), Some(1)), ("b".to_owned(), Some(1))]
    );
}

#[test]
fn sealing_writes_its_generate_record_at_once() {
    let (store, _arrivals) = GatedStore::new(false);
    let keyring = Keyring::builder(store.clone(), kek())
        .build()
        .expect("keyring");
    let _gate = store.gate.lock().expect("gate");
    keyring
        .seal(&"x".to_string(), "new", SCOPE, b"")
        .expect("seal");
    let actions: Vec<AuditAction> = store
        .inner
        .audit_events()
        .iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(actions, [AuditAction::Generate]);
    assert_eq!(keyring.stats().audit_pending, 0);
}

/// 1,000 values of one owner whose headers name a version it lacks.
fn bogus_values(keyring: &Keyring, owner: &str, version: u32) -> Vec<Encrypted<String>> {
    (0..1000)
        .map(|i| {
            let sealed = keyring
                .seal(&format!("value {i}"), owner, SCOPE, b"")
                .expect("seal");
            let mut bytes = sealed.into_bytes();
            bytes[2..6].copy_from_slice(&version.to_be_bytes());
            Encrypted::from_bytes(bytes)
        })
        .collect()
}

fn reload_cost(now: &KeyringStats, before: &KeyringStats) -> (u64, u64, u64) {
    (
        now.key_loads - before.key_loads,
        now.unwraps - before.unwraps,
        now.version_reloads - before.version_reloads,
    )
}

#[test]
fn a_key_version_the_owner_lacks_is_looked_for_once_per_interval() {
    let store = Arc::new(MemoryKeyStore::new());
    let clock = Arc::new(ManualClock::new());
    let keyring = Keyring::builder(store.clone(), kek())
        .clock(clock.clone())
        .unknown_version_ttl(Duration::from_secs(10))
        .build()
        .expect("keyring");
    let values = bogus_values(&keyring, "u1", 77);
    let before = keyring.stats();
    for value in &values {
        let err = keyring
            .open::<String>(value.clone(), "u1", SCOPE, b"")
            .expect_err("no version 77");
        assert!(
            matches!(&err, Error::UnknownKeyVersion { key_version: 77, owner, scope } if owner == "u1" && scope == SCOPE),
            "{err:?}"
        );
    }
    let stats = keyring.stats();
    assert_eq!(reload_cost(&stats, &before), (1, 1, 1), "{stats:?}");
    assert_eq!(stats.unknown_versions_remembered, 999);

    // Just before the interval ends: still remembered.
    clock.advance(Duration::from_millis(9_999));
    keyring
        .open::<String>(values[0].clone(), "u1", SCOPE, b"")
        .expect_err("no version 77");
    assert_eq!(reload_cost(&keyring.stats(), &before), (1, 1, 1));
    // After it: one more reload, then remembered again.
    clock.advance(Duration::from_millis(1));
    for value in &values[..100] {
        keyring
            .open::<String>(value.clone(), "u1", SCOPE, b"")
            .expect_err("no version 77");
    }
    assert_eq!(reload_cost(&keyring.stats(), &before), (2, 2, 2));

    // Another bogus version is a miss of its own; neither forgets the other.
    let other = bogus_values(&keyring, "u1", 78);
    for value in other.iter().chain(&values).take(1500) {
        keyring
            .open::<String>(value.clone(), "u1", SCOPE, b"")
            .expect_err("no such version");
    }
    assert_eq!(reload_cost(&keyring.stats(), &before), (3, 3, 3));

    // Clearing the owner forgets its misses: the next open reloads.
    keyring.clear("u1");
    keyring
        .open::<String>(values[0].clone(), "u1", SCOPE, b"")
        .expect_err("no version 77");
    assert_eq!(reload_cost(&keyring.stats(), &before), (4, 4, 3));
}

#[test]
fn a_version_added_after_the_interval_is_found() {
    let store = Arc::new(MemoryKeyStore::new());
    let clock = Arc::new(ManualClock::new());
    let reader = Keyring::builder(store.clone(), kek())
        .clock(clock.clone())
        .build()
        .expect("keyring");
    let v1 = reader
        .seal(&"old".to_string(), "u1", SCOPE, b"")
        .expect("seal");
    // A header naming version 2 before it exists (a row restored from a
    // database where the owner had rotated): refused, and remembered.
    let mut bytes = v1.into_bytes();
    bytes[2..6].copy_from_slice(&2u32.to_be_bytes());
    let early = Encrypted::<String>::from_bytes(bytes);
    for _ in 0..2 {
        let err = reader
            .open::<String>(early.clone(), "u1", SCOPE, b"")
            .expect_err("no version 2 yet");
        assert!(
            matches!(err, Error::UnknownKeyVersion { key_version: 2, .. }),
            "{err:?}"
        );
    }
    assert_eq!(reader.stats().version_reloads, 1);

    // Version 2 is created elsewhere; within the interval it is not looked
    // for again, after it is.
    let kek = kek();
    let (_, wrapped) = phi_types::KeyEncryptionKey::generate(&*kek, "u1", 2).expect("generate");
    assert!(
        store
            .insert_key_if_absent(&StoredKey::active("u1", 2, "local-1", wrapped))
            .expect("insert")
    );
    let v2 = Keyring::builder(store.clone(), kek.clone())
        .build()
        .expect("keyring")
        .seal(&"new".to_string(), "u1", SCOPE, b"")
        .expect("seal");
    assert_eq!(v2.key_version(), Some(2));
    assert!(matches!(
        reader.open::<String>(v2.clone(), "u1", SCOPE, b""),
        Err(Error::UnknownKeyVersion { key_version: 2, .. })
    ));
    clock.advance(phi_types::DEFAULT_UNKNOWN_VERSION_TTL);
    let new: String = reader
        .open(v2, "u1", SCOPE, b"")
        .expect("found after the interval");
    assert_eq!(new, "new");
}

#[test]
fn a_zero_unknown_version_ttl_reloads_every_time() {
    let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), kek())
        .unknown_version_ttl(Duration::ZERO)
        .build()
        .expect("keyring");
    let values = bogus_values(&keyring, "u1", 5);
    for value in &values[..20] {
        keyring
            .open::<String>(value.clone(), "u1", SCOPE, b"")
            .expect_err("no version 5");
    }
    assert_eq!(keyring.stats().version_reloads, 20);
    assert!(matches!(
        Keyring::builder(Arc::new(MemoryKeyStore::new()), kek())
            .audit_queue(0)
            .build(),
        Err(Error::Config(_))
    ));
}

/// An error and its sources, as a report prints them: the message never
/// repeats its source.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
