//! KEK check values on the in-memory key store: a KEK id names exactly one
//! key, whatever the KEK's kind.

use std::sync::Arc;

use phi_types::{
    BoxError, Error, KekCheck, KeyBytes, KeyEncryptionKey, KeyStore, Keyring, LocalKek,
    MemoryKeyStore, StoredKey,
};

fn local(id: &str, byte: u8) -> Arc<LocalKek> {
    Arc::new(LocalKek::new(id, &KeyBytes::new([byte; 32])))
}

#[test]
fn a_wrong_key_is_refused_before_anything_is_written() {
    let store = Arc::new(MemoryKeyStore::new());
    let keyring = Keyring::builder(store.clone(), local("local-1", 1))
        .build()
        .expect("first use");
    keyring.keys_for_seal("owner-1").expect("a key");
    let check = store.kek_check("local-1").expect("read").expect("stored");
    assert_eq!(check.format, "local-hmac-v1");
    let audit = store.audit_events().len();

    let err = Keyring::builder(store.clone(), local("local-1", 2))
        .build()
        .expect_err("another key");
    let text = err.to_string();
    assert!(matches!(err, Error::KekMismatch { .. }), "{err:?}");
    assert!(
        text.contains("\"local-1\"")
            && text.contains("PHI_MASTER_KEY / PHI_MASTER_KEY_FILE")
            && text.contains("KMS key or alias"),
        "{text}"
    );
    assert_eq!(store.audit_events().len(), audit);
    assert_eq!(store.owners().expect("owners"), ["owner-1"]);
    assert_eq!(store.kek_check("local-1").expect("read"), Some(check));
}

/// A KEK of the application's own: wrapped keys are the key XOR a byte.
#[derive(Debug)]
struct XorKek(u8);

impl KeyEncryptionKey for XorKek {
    fn id(&self) -> &str {
        "xor"
    }
    fn wrap(&self, _: &str, _: u32, key: &KeyBytes) -> Result<Vec<u8>, BoxError> {
        Ok(key.expose().iter().map(|b| b ^ self.0).collect())
    }
    fn unwrap(&self, _: &str, version: u32, wrapped: &[u8]) -> Result<KeyBytes, BoxError> {
        let key: Vec<u8> = wrapped.iter().map(|b| b ^ self.0).collect();
        // Like an authenticated wrap, a wrong key is detected: data keys
        // here are never all-0xFF, the canary starts with "phi-".
        if version == 0 && !key.starts_with(b"phi-") {
            return Err("does not authenticate".into());
        }
        KeyBytes::from_slice(&key).ok_or_else(|| "not 32 bytes".into())
    }
}

#[test]
fn a_kek_of_its_own_gets_the_default_wrapped_canary() {
    let store = Arc::new(MemoryKeyStore::new());
    Keyring::builder(store.clone(), Arc::new(XorKek(7)))
        .build()
        .expect("first use");
    let check = store.kek_check("xor").expect("read").expect("stored");
    assert_eq!(check.format, "wrap-canary-v1");
    assert_eq!(
        check.value,
        XorKek(7)
            .wrap("phi:kek-check", 0, &KeyBytes::new(*phi_types::CHECK_CANARY))
            .expect("wrap")
    );
    Keyring::builder(store.clone(), Arc::new(XorKek(7)))
        .build()
        .expect("same key");
    let err = Keyring::builder(store, Arc::new(XorKek(9)))
        .build()
        .expect_err("another key");
    assert!(matches!(err, Error::KekMismatch { .. }), "{err:?}");
}

#[test]
fn keys_stored_before_check_values_are_what_a_kek_is_checked_against() {
    let store = Arc::new(MemoryKeyStore::new());
    let kek = local("local-1", 1);
    let key = KeyBytes::new([3; 32]);
    let row = StoredKey::active(
        "owner-1",
        1,
        "local-1",
        kek.wrap("owner-1", 1, &key).expect("wrap"),
    );
    store.insert_key_if_absent(&row).expect("insert");

    let err = Keyring::builder(store.clone(), local("local-1", 2))
        .build()
        .expect_err("opens none");
    assert!(matches!(err, Error::KekMismatch { .. }), "{err:?}");
    assert!(
        err.to_string().contains("owner \"owner-1\", version 1"),
        "{err}"
    );
    assert_eq!(store.kek_check("local-1").expect("read"), None);

    Keyring::builder(store.clone(), kek.clone())
        .build()
        .expect("opens them");
    assert_eq!(
        store.kek_check("local-1").expect("read"),
        Some(kek.check_value().expect("check"))
    );
}

#[test]
fn an_older_kek_is_checked_too_and_a_lost_race_verifies_the_winner() {
    let store = Arc::new(MemoryKeyStore::new());
    Keyring::builder(store.clone(), local("old", 1))
        .build()
        .expect("old");
    let err = Keyring::builder(store.clone(), local("new", 2))
        .unwrap_with(local("old", 9))
        .build()
        .expect_err("wrong older key");
    assert!(
        matches!(err, Error::KekMismatch { ref kek_id, .. } if kek_id == "old"),
        "{err:?}"
    );
    assert_eq!(
        store.kek_check("new").expect("read"),
        None,
        "nothing written"
    );

    // Another process stored its value first: ours is not stored.
    let theirs = KekCheck::new("local-hmac-v1", vec![0; 32]);
    assert!(
        store
            .insert_kek_check_if_absent("raced", &theirs)
            .expect("insert")
    );
    assert!(
        !store
            .insert_kek_check_if_absent("raced", &local("raced", 1).check_value().expect("c"))
            .expect("insert")
    );
    assert!(matches!(
        Keyring::builder(store, local("raced", 1)).build(),
        Err(Error::KekMismatch { .. })
    ));
}
