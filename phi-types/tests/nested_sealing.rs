//! Sealing inside sealing: a sealer opened while the thread's nonce
//! generator is in use is served by a generator of its own, never a panic.

use std::sync::Arc;

// `with_sealer` is what the derive's generated code seals through.
use phi_types::__private::with_sealer;
use phi_types::{
    DecodeError, Encrypted, KeyBytes, Keyring, LocalKek, MemoryKeyStore, OwnerKeys, PhiValue,
};

const SCOPE: &str = "cases.patient_last";

fn keyring() -> Keyring {
    let kek = LocalKek::new("local-1", &KeyBytes::new([0x42; 32]));
    Keyring::builder(Arc::new(MemoryKeyStore::new()), Arc::new(kek))
        .build()
        .expect("keyring")
}

/// A value whose encoding is an envelope of its own: encoding it seals.
struct Wrapped {
    keys: Arc<OwnerKeys>,
    inner: String,
}

impl PartialEq for Wrapped {
    fn eq(&self, other: &Self) -> bool {
        self.inner == other.inner
    }
}

const INNER_SCOPE: &str = "cases.patient_last.inner";

impl PhiValue for Wrapped {
    fn encode(&self, out: &mut Vec<u8>) {
        let sealed = self
            .keys
            .seal(&self.inner, INNER_SCOPE, b"")
            .expect("the inner value seals");
        out.extend_from_slice(sealed.as_bytes());
    }

    fn encoded_len(&self) -> usize {
        phi_types::envelope::OVERHEAD + self.inner.len()
    }

    fn decode(_: Vec<u8>) -> Result<Self, DecodeError> {
        Err(DecodeError::Utf8)
    }
}

#[test]
fn a_sealer_inside_a_sealer_seals() {
    let keyring = keyring();
    let keys = keyring.keys_for_seal("provider-17").expect("keys");
    let (outer, inner, after) = with_sealer(|outer| {
        let first = outer
            .seal(&keys, &"Doe".to_string(), SCOPE, b"C-1")
            .expect("outer seal");
        let inner = with_sealer(|inner| {
            inner
                .seal(&keys, &"Roe".to_string(), SCOPE, b"C-2")
                .expect("inner seal")
        })
        .expect("a nested sealer is served");
        let after = outer
            .seal(&keys, &"Poe".to_string(), SCOPE, b"C-3")
            .expect("outer seal after the nested one");
        (first, inner, after)
    })
    .expect("sealer");
    for (sealed, row, name) in [
        (outer, "C-1", "Doe"),
        (inner, "C-2", "Roe"),
        (after, "C-3", "Poe"),
    ] {
        let opened: String = keys.open(sealed, SCOPE, row.as_bytes()).expect("opens");
        assert_eq!(opened, name);
    }
}

#[test]
fn owner_keys_seal_inside_a_sealer_seals() {
    let keyring = keyring();
    let keys = keyring.keys_for_seal("provider-17").expect("keys");
    let sealed = with_sealer(|_| keys.seal(&"Doe".to_string(), SCOPE, b"C-1"))
        .expect("sealer")
        .expect("nested seal");
    let opened: String = keys.open(sealed, SCOPE, b"C-1").expect("opens");
    assert_eq!(opened, "Doe");
}

#[test]
fn a_value_whose_encoding_seals_can_be_sealed() {
    let keyring = keyring();
    let keys = keyring.keys_for_seal("provider-17").expect("keys");
    let value = Wrapped {
        keys: keys.clone(),
        inner: "Doe".to_owned(),
    };
    // Through a sealer and through `OwnerKeys::seal`: the encoding's seal
    // runs while the outer seal holds the thread's generator.
    let through_sealer = with_sealer(|s| s.seal(&keys, &value, SCOPE, b"C-1"))
        .expect("sealer")
        .expect("seal");
    let direct = keys.seal(&value, SCOPE, b"C-1").expect("seal");
    for sealed in [through_sealer, direct] {
        // The outer envelope holds the inner envelope; both open.
        let dek = keys.dek(1).expect("version 1");
        let binding = phi_types::Binding::new("provider-17", SCOPE).with_row(b"C-1");
        let inner_bytes =
            phi_types::envelope::open(dek, sealed.as_bytes(), &binding).expect("outer opens");
        let inner: String = keys
            .open(Encrypted::from_bytes(inner_bytes), INNER_SCOPE, b"")
            .expect("inner opens");
        assert_eq!(inner, "Doe");
    }
}

#[test]
fn nested_sealers_draw_distinct_nonces() {
    let keyring = keyring();
    let keys = keyring.keys_for_seal("provider-17").expect("keys");
    let nonce = |e: &Encrypted<String>| e.as_bytes()[6..18].to_vec();
    let mut nonces = std::collections::HashSet::new();
    with_sealer(|outer| {
        for _ in 0..50 {
            let a = outer
                .seal(&keys, &"x".to_string(), SCOPE, b"")
                .expect("seal");
            assert!(nonces.insert(nonce(&a)));
            with_sealer(|inner| {
                for _ in 0..5 {
                    let b = inner
                        .seal(&keys, &"x".to_string(), SCOPE, b"")
                        .expect("seal");
                    assert!(nonces.insert(nonce(&b)), "a nonce repeated");
                }
            })
            .expect("nested sealer");
        }
    })
    .expect("sealer");
    assert_eq!(nonces.len(), 300);
}
