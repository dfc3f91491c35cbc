//! Keyring behaviour that needs no database: cache bounds, reloads,
//! configuration errors, input checks and redaction.

use std::sync::Arc;
use std::time::Duration;

use phi_types::{
    AuditAction, Dek, Encrypted, Error, KeyBytes, KeyEncryptionKey, KeyState, KeyStore, Keyring,
    LocalKek, MemoryKeyStore, StoredKey,
};

const SCOPE: &str = "cases.patient_last";

fn kek() -> Arc<LocalKek> {
    Arc::new(LocalKek::new("local-1", &KeyBytes::new([0x42; 32])))
}

fn keyring(store: Arc<MemoryKeyStore>) -> Keyring {
    Keyring::builder(store, kek()).build().expect("keyring")
}

#[test]
fn the_cache_stays_within_its_size_bound() {
    let store = Arc::new(MemoryKeyStore::new());
    let owners: Vec<String> = (0..40).map(|i| format!("owner-{i:02}")).collect();
    let seeding = keyring(store.clone());
    let sealed: Vec<Encrypted<String>> = owners
        .iter()
        .map(|o| seeding.seal(&o.clone(), o, SCOPE, b"").expect("seal"))
        .collect();

    let bounded = Keyring::builder(store, kek())
        .max_owners(16)
        .build()
        .expect("keyring");
    for (owner, value) in owners.iter().zip(&sealed) {
        let opened: String = bounded
            .open(value.clone(), owner, SCOPE, b"")
            .expect("opens");
        assert_eq!(&opened, owner);
        assert!(bounded.stats().cached_owners <= 16, "{:?}", bounded.stats());
    }
    let stats = bounded.stats();
    assert!(stats.evictions >= 24, "{stats:?}");
    assert_eq!(stats.unwraps, 40);
    // An evicted owner is resolved again on its next use.
    let opened: String = bounded
        .open(sealed[0].clone(), &owners[0], SCOPE, b"")
        .expect("opens");
    assert_eq!(opened, owners[0]);
    assert_eq!(bounded.stats().unwraps, 41);
}

#[test]
fn a_key_version_created_elsewhere_is_loaded_on_first_sight() {
    let store = Arc::new(MemoryKeyStore::new());
    let reader = keyring(store.clone());
    let owner = "provider-9";
    let v1 = reader
        .seal(&"old".to_string(), owner, SCOPE, b"r")
        .expect("seal");
    assert_eq!(
        reader.keys_for_open(owner).expect("keys").current_version(),
        Some(1)
    );

    // Another process adds version 2 (as DEK rotation will).
    let kek = kek();
    let (_, wrapped) = kek.generate(owner, 2).expect("generate");
    let row = StoredKey::active(owner, 2, kek.id(), wrapped);
    assert!(store.insert_key_if_absent(&row).expect("insert"));
    let writer = keyring(store.clone());
    let v2 = writer
        .seal(&"new".to_string(), owner, SCOPE, b"r")
        .expect("seal");
    assert_eq!(v2.key_version(), Some(2));

    // The reader still has only version 1 cached: it reloads once.
    let new: String = reader
        .open(v2, owner, SCOPE, b"r")
        .expect("opens after a reload");
    let old: String = reader
        .open(v1, owner, SCOPE, b"r")
        .expect("old version still opens");
    assert_eq!((new.as_str(), old.as_str()), ("new", "old"));
}

#[test]
fn an_envelope_naming_a_missing_key_version_is_reported() {
    let keyring = keyring(Arc::new(MemoryKeyStore::new()));
    let sealed = keyring
        .seal(&"Doe".to_string(), "u1", SCOPE, b"")
        .expect("seal");
    let mut bytes = sealed.into_bytes();
    bytes[5] = 9; // key version 9
    let err = keyring
        .open::<String>(Encrypted::from_bytes(bytes), "u1", SCOPE, b"")
        .expect_err("no version 9");
    assert!(
        matches!(err, Error::UnknownKeyVersion { key_version: 9, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("u1") && err.to_string().contains(SCOPE),
        "{err}"
    );
}

#[test]
fn opening_never_creates_a_key() {
    let store = Arc::new(MemoryKeyStore::new());
    let keyring = keyring(store.clone());
    let keys = keyring
        .keys_for_open("nobody")
        .expect("resolves to no keys");
    assert_eq!(keys.current_version(), None);
    assert!(store.owners().expect("owners").is_empty());
    // Sealing afterwards creates the key, despite the cached empty entry.
    keyring
        .seal(&"x".to_string(), "nobody", SCOPE, b"")
        .expect("seal");
    assert_eq!(store.owners().expect("owners"), ["nobody"]);
}

#[test]
fn generate_and_unwrap_are_audited() {
    let store = Arc::new(MemoryKeyStore::new());
    let sealed = keyring(store.clone())
        .seal(&"x".to_string(), "u1", SCOPE, b"")
        .expect("seal");
    let _: String = keyring(store.clone())
        .open(sealed, "u1", SCOPE, b"")
        .expect("open");
    let actions: Vec<(AuditAction, Option<u32>, Option<String>)> = store
        .audit_events()
        .into_iter()
        .map(|e| (e.action, e.key_version, e.kek_id))
        .collect();
    assert_eq!(
        actions,
        [
            (AuditAction::Generate, Some(1), Some("local-1".into())),
            (AuditAction::Unwrap, Some(1), Some("local-1".into())),
        ]
    );
}

#[test]
fn unusable_owner_ids_are_refused_with_the_reason() {
    let keyring = keyring(Arc::new(MemoryKeyStore::new()));
    let err = keyring
        .seal(&"x".to_string(), "", SCOPE, b"")
        .expect_err("empty");
    assert!(
        matches!(err, Error::InvalidInput { .. }) && err.to_string().contains("empty"),
        "{err}"
    );
    let long = "o".repeat(256);
    let err = keyring
        .seal(&"x".to_string(), &long, SCOPE, b"")
        .expect_err("too long");
    assert!(err.to_string().contains("256 bytes"), "{err}");
}

#[test]
fn bad_configurations_are_refused() {
    let store = || Arc::new(MemoryKeyStore::new());
    let err = Keyring::builder(store(), kek())
        .ttl(Duration::ZERO)
        .build()
        .expect_err("ttl");
    assert!(matches!(err, Error::Config(_)));
    let err = Keyring::builder(store(), kek())
        .max_owners(0)
        .build()
        .expect_err("size");
    assert!(matches!(err, Error::Config(_)));
    let err = Keyring::builder(store(), kek())
        .unwrap_with(kek())
        .build()
        .expect_err("same id");
    assert!(err.to_string().contains("local-1"), "{err}");
}

#[test]
fn debug_output_shows_no_key_material_and_no_plaintext() {
    let store = Arc::new(MemoryKeyStore::new());
    let keyring = keyring(store.clone());
    let secret = "Zebediah Quartermaine";
    let sealed = keyring
        .seal(&secret.to_string(), "u1", SCOPE, b"")
        .expect("seal");
    let keys = keyring.keys_for_open("u1").expect("keys");
    let key_bytes = KeyBytes::new([0xAB; 32]);
    let dek = Dek::new(3, KeyBytes::new([0xCD; 32]));
    let stored = store.load_keys(&["u1"]).expect("rows");

    let shown = [
        format!("{keyring:?}"),
        format!("{keys:?}"),
        format!("{sealed:?}"),
        format!("{key_bytes:?}"),
        format!("{dek:?}"),
        format!("{stored:?}"),
        format!("{:?}", kek()),
    ];
    for text in &shown {
        assert!(!text.contains("Zebediah"), "plaintext in {text}");
        for needle in [
            "171, 171", "0xab", "ab, ab", "abab", "205, 205", "cdcd", "66, 66", "4242",
        ] {
            assert!(!text.to_lowercase().contains(needle), "key bytes in {text}");
        }
    }
    assert_eq!(shown[3], "KeyBytes(<redacted>)");
    assert_eq!(shown[4], "Dek { version: 3, .. }");
    assert!(
        shown[2].starts_with("Encrypted(v1, key version 1,"),
        "{}",
        shown[2]
    );
    // The wrapped key is left out of the stored row's Debug too.
    assert!(!shown[5].contains("wrapped_key"), "{}", shown[5]);
}

#[test]
fn arbitrary_stored_bytes_give_errors_never_panics() {
    let keyring = keyring(Arc::new(MemoryKeyStore::new()));
    let genuine = keyring
        .seal(&"Doe".to_string(), "u1", SCOPE, b"")
        .expect("seal");
    let keys = keyring.keys_for_open("u1").expect("keys");
    // A small xorshift generator: deterministic, no dependency.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..20_000 {
        let len = usize::try_from(next() % 80).expect("small");
        let mut bytes: Vec<u8> = (0..len).map(|_| next().to_be_bytes()[0]).collect();
        // Most inputs keep a valid-looking header, so the cipher path is hit.
        if i % 4 != 0 && bytes.len() >= 6 {
            bytes[..6].copy_from_slice(&genuine.as_bytes()[..6]);
        }
        let result = keys.open::<String>(Encrypted::from_bytes(bytes), SCOPE, b"");
        let err = result.expect_err("random bytes never open");
        assert!(
            matches!(
                err,
                Error::Decrypt { .. } | Error::Malformed { .. } | Error::UnknownKeyVersion { .. }
            ),
            "{err:?}"
        );
    }
}

#[test]
fn the_runtime_types_can_be_shared_across_threads() {
    fn shared<T: Send + Sync + 'static>() {}
    shared::<Keyring>();
    shared::<phi_types::OwnerKeys>();
    shared::<Encrypted<String>>();
    shared::<MemoryKeyStore>();
    shared::<LocalKek>();
    shared::<Error>();
}

#[test]
fn repeated_owners_in_a_batch_are_resolved_once() {
    let store = Arc::new(MemoryKeyStore::new());
    let owners: Vec<String> = (0..10).map(|i| format!("owner-{i}")).collect();
    let seeding = keyring(store.clone());
    seeding
        .keys_for_seal_many(owners.iter().map(String::as_str))
        .expect("keys");
    // Every row's owner, as a load of 30 rows passes them.
    let rows = owners.iter().cycle().take(30).map(String::as_str);
    let fresh = keyring(store);
    let keys = fresh.keys_for_open_many(rows.clone()).expect("resolve");
    assert_eq!(keys.len(), 10);
    let stats = fresh.stats();
    assert_eq!((stats.misses, stats.hits, stats.unwraps), (10, 0, 10));
    fresh.keys_for_open_many(rows).expect("resolve");
    assert_eq!(fresh.stats().hits, 10);
}

/// A KEK recording the size of each batch of unwraps it is asked for.
#[derive(Debug)]
struct BatchKek {
    inner: LocalKek,
    batches: std::sync::Mutex<Vec<usize>>,
}

impl KeyEncryptionKey for BatchKek {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn wrap(
        &self,
        owner: &str,
        version: u32,
        key: &KeyBytes,
    ) -> Result<Vec<u8>, phi_types::BoxError> {
        self.inner.wrap(owner, version, key)
    }
    fn unwrap(
        &self,
        owner: &str,
        version: u32,
        wrapped: &[u8],
    ) -> Result<KeyBytes, phi_types::BoxError> {
        self.inner.unwrap(owner, version, wrapped)
    }
    fn check_value(&self) -> Result<phi_types::KekCheck, phi_types::BoxError> {
        self.inner.check_value()
    }
    fn verify_check_value(&self, check: &phi_types::KekCheck) -> Result<bool, phi_types::BoxError> {
        self.inner.verify_check_value(check)
    }
    fn unwrap_many(
        &self,
        keys: &[(&str, u32, &[u8])],
    ) -> Vec<Result<KeyBytes, phi_types::BoxError>> {
        self.batches.lock().expect("lock").push(keys.len());
        keys.iter()
            .map(|(o, v, w)| self.inner.unwrap(o, *v, w))
            .collect()
    }
}

#[test]
fn a_cold_load_of_many_owners_unwraps_in_one_batch() {
    let store = Arc::new(MemoryKeyStore::new());
    let owners: Vec<String> = (0..50).map(|i| format!("owner-{i:02}")).collect();
    let seeding = keyring(store.clone());
    seeding
        .keys_for_seal_many(owners.iter().map(String::as_str))
        .expect("seal keys");
    // A second version for one owner, and a destroyed one for another.
    store
        .insert_key_if_absent(&StoredKey {
            owner_id: owners[0].clone(),
            version: 2,
            kek_id: "local-1".into(),
            wrapped_key: kek()
                .wrap(&owners[0], 2, &KeyBytes::new([5; 32]))
                .expect("wrap"),
            state: KeyState::Active,
            created_at: chrono::Utc::now().naive_utc(),
        })
        .expect("insert");
    store
        .insert_key_if_absent(&StoredKey {
            owner_id: owners[1].clone(),
            version: 2,
            kek_id: "local-1".into(),
            wrapped_key: vec![0; 60],
            state: KeyState::Destroyed,
            created_at: chrono::Utc::now().naive_utc(),
        })
        .expect("insert");

    let batch = Arc::new(BatchKek {
        inner: LocalKek::new("local-1", &KeyBytes::new([0x42; 32])),
        batches: std::sync::Mutex::new(Vec::new()),
    });
    let cold = Keyring::builder(store, batch.clone())
        .build()
        .expect("keyring");
    let keys = cold
        .keys_for_open_many(owners.iter().map(String::as_str))
        .expect("keys");
    assert_eq!(*batch.batches.lock().expect("lock"), vec![51]);
    assert_eq!(cold.stats().unwraps, 51);
    assert_eq!(keys[&owners[0]].versions().collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(keys[&owners[0]].current_version(), Some(2));
    assert_eq!(keys[&owners[1]].versions().collect::<Vec<_>>(), vec![1]);
}
