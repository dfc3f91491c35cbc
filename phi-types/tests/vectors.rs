//! Envelope v1 against its published test vectors
//! (`tests/vectors/envelope-v1.json`, made by `tests/vectors/generate.py`),
//! and the tamper resistance of values sealed through the real API.

use std::sync::Arc;

use phi_types::{
    Binding, BoxError, Dek, Encrypted, Error, Header, KeyBytes, KeyEncryptionKey, KeyState,
    KeyStore, Keyring, LocalKek, MemoryKeyStore, OwnerKeys, StoredKey, envelope,
};
use serde::Deserialize;

const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/vectors/envelope-v1.json"
);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Vector {
    name: String,
    dek_hex: String,
    dek_version: u32,
    owner: String,
    scope: String,
    row: String,
    plaintext_hex: String,
    envelope_hex: String,
    valid: bool,
}

impl Vector {
    fn dek(&self) -> Dek {
        let bytes = hex::decode(&self.dek_hex).expect("dek_hex is hex");
        let key = KeyBytes::from_slice(&bytes).expect("dek_hex is 32 bytes");
        Dek::new(self.dek_version, key)
    }

    fn envelope(&self) -> Vec<u8> {
        hex::decode(&self.envelope_hex).expect("envelope_hex is hex")
    }

    fn plaintext(&self) -> Vec<u8> {
        hex::decode(&self.plaintext_hex).expect("plaintext_hex is hex")
    }

    fn binding(&self) -> Binding<'_> {
        Binding::new(&self.owner, &self.scope).with_row(self.row.as_bytes())
    }
}

fn vectors() -> Vec<Vector> {
    let text = std::fs::read_to_string(VECTORS).expect("the vectors file is readable");
    serde_json::from_str(&text).expect("the vectors file is a JSON array of vectors")
}

#[test]
fn the_vectors_file_covers_both_outcomes() {
    let vectors = vectors();
    assert!(
        vectors.len() >= 15,
        "only {} vectors in {VECTORS}",
        vectors.len()
    );
    assert!(vectors.iter().any(|v| v.valid), "no valid vector");
    assert!(vectors.iter().any(|v| !v.valid), "no invalid vector");
    let mut names: Vec<&str> = vectors.iter().map(|v| v.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), vectors.len(), "vector names repeat");
}

#[test]
fn envelope_open_agrees_with_every_vector() {
    let mut failures = Vec::new();
    for v in vectors() {
        let envelope = v.envelope();
        let opened = envelope::open(&v.dek(), &envelope, &v.binding());
        match (v.valid, opened) {
            (true, Ok(plaintext)) if plaintext == v.plaintext() => match Header::parse(&envelope) {
                Ok(header) if header.key_version == v.dek_version => {}
                other => failures.push(format!("{}: header parses as {other:?}", v.name)),
            },
            (true, Ok(_)) => failures.push(format!("{}: opened to another plaintext", v.name)),
            (true, Err(e)) => failures.push(format!("{}: valid vector refused: {e}", v.name)),
            (false, Ok(_)) => failures.push(format!("{}: invalid vector opened", v.name)),
            (false, Err(_)) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A KEK whose "wrapped" keys are the plain key bytes: lets a keyring serve
/// the vectors' fixed data keys, so the vectors also go through
/// [`Keyring::open`] and the in-place path it uses.
#[derive(Debug)]
struct PlainKek;

impl KeyEncryptionKey for PlainKek {
    fn id(&self) -> &str {
        "vectors-plain"
    }

    fn wrap(&self, _owner: &str, _version: u32, key: &KeyBytes) -> Result<Vec<u8>, BoxError> {
        Ok(key.expose().to_vec())
    }

    fn unwrap(&self, _owner: &str, _version: u32, wrapped: &[u8]) -> Result<KeyBytes, BoxError> {
        KeyBytes::from_slice(wrapped).ok_or_else(|| "not 32 bytes".into())
    }
}

#[test]
fn keyring_open_agrees_with_every_vector() {
    let mut failures = Vec::new();
    for v in vectors() {
        let store = Arc::new(MemoryKeyStore::new());
        let row = StoredKey {
            owner_id: v.owner.clone(),
            version: v.dek_version,
            kek_id: PlainKek.id().to_owned(),
            wrapped_key: hex::decode(&v.dek_hex).expect("dek_hex is hex"),
            state: KeyState::Active,
            created_at: chrono_epoch(),
        };
        assert!(store.insert_key_if_absent(&row).expect("memory store"));
        let keyring = Keyring::builder(store, Arc::new(PlainKek))
            .build()
            .expect("keyring");
        let keys = open_keys(&keyring, &v.owner);
        let sealed = Encrypted::<Vec<u8>>::from_bytes(v.envelope());
        let opened = keys.open(sealed, &v.scope, v.row.as_bytes());
        match (v.valid, opened) {
            (true, Ok(plaintext)) if plaintext == v.plaintext() => {}
            (true, Ok(_)) => failures.push(format!("{}: opened to another plaintext", v.name)),
            (true, Err(e)) => failures.push(format!("{}: valid vector refused: {e}", v.name)),
            (false, Ok(_)) => failures.push(format!("{}: invalid vector opened", v.name)),
            (false, Err(e)) => {
                let message = e.to_string();
                if !message.contains(&v.owner) || !message.contains(&v.scope) {
                    failures.push(format!(
                        "{}: the error does not name owner and scope: {message}",
                        v.name
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// An owner's keys for opening.
fn open_keys(keyring: &Keyring, owner: &str) -> Arc<OwnerKeys> {
    keyring.keys_for_open(owner).expect("resolve")
}

/// An owner's keys for sealing.
fn seal_keys(keyring: &Keyring, owner: &str) -> Arc<OwnerKeys> {
    keyring.keys_for_seal(owner).expect("resolve")
}

fn chrono_epoch() -> chrono::NaiveDateTime {
    chrono::DateTime::UNIX_EPOCH.naive_utc()
}

fn keyring() -> Keyring {
    let kek = LocalKek::new("local-1", &KeyBytes::new([0x5A; 32]));
    Keyring::builder(Arc::new(MemoryKeyStore::new()), Arc::new(kek))
        .build()
        .expect("keyring")
}

const OWNER: &str = "provider-17";
const SCOPE: &str = "cases.notes";
const ROW: &[u8] = b"C-1001";

fn note_64() -> Vec<u8> {
    (0u8..64).map(|i| b'a' + i % 26).collect()
}

#[test]
fn every_single_bit_flip_of_a_sealed_value_fails_to_open() {
    let keyring = keyring();
    let keys = seal_keys(&keyring, OWNER);
    let value = note_64();
    let sealed = keys.seal(&value, SCOPE, ROW).expect("seal");
    let bytes = sealed.as_bytes().to_vec();
    assert_eq!(bytes.len(), envelope::OVERHEAD + 64);
    assert_eq!(bytes.len(), 98);
    let version = keys.current_version().expect("an active key");
    let dek = keys.dek(version).expect("the current key");
    let binding = Binding::new(OWNER, SCOPE).with_row(ROW);

    // The unmodified value opens, both ways.
    assert_eq!(envelope::open(dek, &bytes, &binding).expect("opens"), value);
    assert_eq!(keys.open(sealed, SCOPE, ROW).expect("opens"), value);

    let mut opened = Vec::new();
    for index in 0..bytes.len() {
        for bit in 0..8 {
            let mut flipped = bytes.clone();
            flipped[index] ^= 1 << bit;
            let low_level = envelope::open(dek, &flipped, &binding);
            let through_keys = keys.open(Encrypted::<Vec<u8>>::from_bytes(flipped), SCOPE, ROW);
            if low_level.is_ok() || through_keys.is_ok() {
                opened.push((index, bit));
            }
        }
    }
    assert!(
        opened.is_empty(),
        "{} of {} single-bit flips opened: {opened:?}",
        opened.len(),
        bytes.len() * 8
    );
}

#[test]
fn another_owner_scope_or_row_fails_with_an_error_naming_scope_and_owner() {
    let keyring = keyring();
    let value = note_64();
    // The other owner has keys of its own (same version number), so the
    // failure is an authentication failure, not a missing key.
    keyring
        .keys_for_seal_many([OWNER, "provider-18"])
        .expect("keys for both owners");
    let sealed = keyring
        .seal(&value, OWNER, SCOPE, ROW)
        .expect("seal for provider-17");

    let cases: [(&str, &str, &[u8]); 4] = [
        ("provider-18", SCOPE, ROW),
        (OWNER, "deleted_cases.notes", ROW),
        (OWNER, SCOPE, b"C-1002"),
        (OWNER, SCOPE, b""),
    ];
    for (owner, scope, row) in cases {
        let err = keyring
            .open::<Vec<u8>>(sealed.clone(), owner, scope, row)
            .expect_err("a value opens only under its own binding");
        assert!(
            matches!(err, Error::Decrypt { .. }),
            "{owner} {scope}: expected an authentication failure, got {err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains(owner) && message.contains(scope),
            "the error must name owner {owner:?} and scope {scope:?}: {message}"
        );
        assert!(
            !message.contains("abcdefghij"),
            "the error must not carry plaintext: {message}"
        );
    }

    // An owner that has no data key at all: named too.
    let err = open_keys(&keyring, "provider-99")
        .open::<Vec<u8>>(sealed.clone(), SCOPE, ROW)
        .expect_err("an owner without keys opens nothing");
    let message = err.to_string();
    assert!(
        message.contains("provider-99") && message.contains(SCOPE),
        "{message}"
    );

    // The right binding still opens it.
    assert_eq!(
        keyring
            .open::<Vec<u8>>(sealed, OWNER, SCOPE, ROW)
            .expect("opens"),
        value
    );
}

#[test]
fn sealed_values_have_the_published_layout() {
    let keyring = keyring();
    let keys = seal_keys(&keyring, OWNER);
    let version = keys.current_version().expect("an active key");
    let a = keys.seal(&"Doe".to_string(), SCOPE, ROW).expect("seal");
    let b = keys.seal(&"Doe".to_string(), SCOPE, ROW).expect("seal");
    let (a, b) = (a.as_bytes(), b.as_bytes());
    assert_eq!(a.len(), envelope::OVERHEAD + 3);
    assert_eq!(a[0], 0xF1);
    assert_eq!(a[1], 0x01);
    assert_eq!(a[2..6], version.to_be_bytes());
    assert_ne!(a[6..18], b[6..18], "each seal draws a fresh nonce");
    let dek = keys.dek(version).expect("the current key");
    let binding = Binding::new(OWNER, SCOPE).with_row(ROW);
    assert_eq!(envelope::open(dek, a, &binding).expect("opens"), b"Doe");
}

/// Runs `f` on a thread of its own and fails if it has not returned within
/// `secs` seconds (a deadlocked keyring would otherwise hang the test run).
fn within<R: Send + 'static>(secs: u64, f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs)).ok()
}

#[test]
fn first_use_of_an_owner_does_not_hang() {
    // `keys_for_seal` / `keys_for_open` on an owner not yet cached, and
    // `Keyring::open` of a key version not cached (which clears and reloads
    // the owner), must resolve the owner, not wait on themselves.
    let sealed = within(10, || {
        let keyring = keyring();
        let sealed = keyring.seal(&"Doe".to_string(), OWNER, SCOPE, ROW);
        (keyring, sealed)
    });
    let Some((keyring, sealed)) = sealed else {
        panic!("Keyring::seal of a new owner did not return within 10 s");
    };
    let sealed = sealed.expect("seal");
    let opened = within(10, move || {
        keyring.clear_all();
        keyring.open::<String>(sealed, OWNER, SCOPE, ROW)
    });
    let Some(opened) = opened else {
        panic!("Keyring::open of a cold owner did not return within 10 s");
    };
    assert_eq!(opened.expect("opens"), "Doe");
}

fn vector(name: &str) -> Vector {
    vectors()
        .into_iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no vector {name} in {VECTORS}"))
}

/// The vectors of `DateTime<Utc>` hold exactly what phi encodes, and open
/// through the keyring to the same instant.
#[test]
fn utc_timestamp_vectors_are_the_phi_value_encoding() {
    use chrono::{DateTime, NaiveDate, Utc};
    use phi_types::PhiValue;
    let cases = [
        ("datetime-utc-2024-03-01", (2024, 3, 1), (8, 30, 0, 0)),
        (
            "datetime-utc-nanoseconds",
            (1980, 1, 15),
            (23, 59, 59, 123_456_789),
        ),
    ];
    for (name, (y, m, d), (h, min, s, nanos)) in cases {
        let v = vector(name);
        let at: DateTime<Utc> = NaiveDate::from_ymd_opt(y, m, d)
            .and_then(|date| date.and_hms_nano_opt(h, min, s, nanos))
            .expect("a valid instant")
            .and_utc();
        let mut encoded = Vec::new();
        at.encode(&mut encoded);
        assert_eq!(encoded, v.plaintext(), "{name}");
        assert_eq!(encoded.len(), at.encoded_len(), "{name}");
        let opened: DateTime<Utc> = envelope::open(&v.dek(), &v.envelope(), &v.binding())
            .map(|plaintext| DateTime::<Utc>::decode(plaintext).expect("the vector decodes"))
            .expect("the vector opens");
        assert_eq!(opened, at, "{name}");
    }
}

/// The JSON vector holds the compact text phi encodes for that value.
#[cfg(feature = "serde_json")]
#[test]
fn json_vector_is_the_phi_value_encoding() {
    use phi_types::PhiValue;
    let v = vector("json-value-compact");
    let value =
        serde_json::json!({"weight_kg": 72.5, "name": "Zoë", "allergies": ["penicillin", "latex"]});
    let mut encoded = Vec::new();
    value.encode(&mut encoded);
    assert_eq!(encoded, v.plaintext());
    let plaintext = envelope::open(&v.dek(), &v.envelope(), &v.binding()).expect("opens");
    assert_eq!(serde_json::Value::decode(plaintext), Ok(value));
}

/// A UUID owner and row key bind their lowercase hyphenated text: the
/// vector opens under the binding phi derives from the `Uuid`s, and not
/// under another spelling of the same row key.
#[cfg(feature = "uuid")]
#[test]
fn uuid_vectors_are_the_phi_binding() {
    use phi_types::{BinaryUuid, OwnerId, RowKey};
    let v = vector("uuid-owner-and-row-key");
    let owner = uuid::Uuid::parse_str(&v.owner).expect("the owner is a UUID");
    let row = uuid::Uuid::parse_str(&v.row).expect("the row key is a UUID");
    for (owner_id, row_key) in [
        (owner.owner_id(), row.row_key()),
        (BinaryUuid(owner).owner_id(), BinaryUuid(row).row_key()),
    ] {
        assert_eq!(owner_id, v.owner);
        assert_eq!(&*row_key, v.row.as_bytes());
        let binding = Binding::new(&owner_id, &v.scope).with_row(&row_key);
        assert_eq!(
            envelope::open(&v.dek(), &v.envelope(), &binding).expect("opens"),
            v.plaintext()
        );
    }
    let upper = vector("invalid-uuid-row-key-upper-case");
    assert_eq!(uuid::Uuid::parse_str(&upper.row).ok(), Some(row));
    assert!(envelope::open(&upper.dek(), &upper.envelope(), &upper.binding()).is_err());
}
