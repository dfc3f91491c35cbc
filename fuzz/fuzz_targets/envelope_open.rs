//! Opening envelopes: stored bytes from the database are untrusted.
//!
//! Input: a mode byte, a 16-bit position and a mask (for tampering), then
//! owner, scope and row key (each a 16-bit big-endian length and bytes),
//! then the envelope (or, when sealing, the plaintext).
//!
//! - Mode 0: open the bytes with one of the published test-vector keys
//!   (the seeds are the vectors): never a panic, and an envelope that opens
//!   stops opening when any byte of it changes.
//! - Mode 1: seal the plaintext under a keyring, open it back, and check
//!   that a tampered copy, another owner, scope or row key do not open.
#![no_main]

use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;
use phi_types::envelope::{self, Header};
use phi_types::{Binding, Dek, Encrypted, KeyBytes, Keyring, LocalKek, MemoryKeyStore};

/// The data keys of `phi-types/tests/vectors/envelope-v1.json`.
const VECTOR_KEYS: [[u8; 32]; 3] = [
    hex32("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"),
    hex32("3e34d402f959c04bb21c30e4363ce07e0c7d8b2baf909fafd30fe24aeae7df50"),
    hex32("43835e90feb7045387c3fbe8cbd859a688f3052d12411ce14211e68e2cc83c5e"),
];

const fn hex32(text: &str) -> [u8; 32] {
    const fn nibble(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("not hex"),
        }
    }
    let bytes = text.as_bytes();
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = nibble(bytes[2 * i]) << 4 | nibble(bytes[2 * i + 1]);
        i += 1;
    }
    out
}

/// A keyring over a fixed master key, holding two owners' keys.
static KEYRING: LazyLock<Keyring> = LazyLock::new(|| {
    let kek = LocalKek::new("fuzz-kek", &KeyBytes::new([0x5A; 32]));
    Keyring::builder(Arc::new(MemoryKeyStore::new()), Arc::new(kek))
        .build()
        .expect("keyring")
});
const OWNERS: [&str; 2] = ["fuzz-owner-a", "fuzz-owner-b"];

/// Splits a 16-bit length-prefixed field off `data`.
fn field<'a>(data: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, rest) = data.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_be_bytes(*len));
    let (value, rest) = rest.split_at_checked(len)?;
    *data = rest;
    Some(value)
}

fuzz_target!(|data: &[u8]| {
    let Some((&[mode, p0, p1, mask], mut rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let pos = usize::from(u16::from_be_bytes([p0, p1]));
    let (Some(owner), Some(scope), Some(row)) =
        (field(&mut rest), field(&mut rest), field(&mut rest))
    else {
        return;
    };
    let bytes = rest;
    let (Ok(owner), Ok(scope)) = (std::str::from_utf8(owner), std::str::from_utf8(scope)) else {
        return;
    };
    if mode & 1 == 0 {
        open_raw(mode >> 1, owner, scope, row, bytes, pos, mask);
    } else {
        seal_and_tamper(mode >> 1, scope, row, bytes, pos, mask);
    }
});

fn open_raw(key: u8, owner: &str, scope: &str, row: &[u8], bytes: &[u8], pos: usize, mask: u8) {
    let version = Header::parse(bytes).map_or(1, |h| h.key_version);
    let dek = Dek::new(version, KeyBytes::new(VECTOR_KEYS[usize::from(key) % 3]));
    let binding = Binding::new(owner, scope).with_row(row);
    if let Ok(plain) = envelope::open(&dek, bytes, &binding) {
        assert_eq!(plain.len() + envelope::OVERHEAD, bytes.len());
        if mask != 0 {
            let mut tampered = bytes.to_vec();
            let at = pos % tampered.len();
            tampered[at] ^= mask;
            let dek = Dek::new(
                Header::parse(&tampered).map_or(1, |h| h.key_version),
                KeyBytes::new(VECTOR_KEYS[usize::from(key) % 3]),
            );
            assert!(
                envelope::open(&dek, &tampered, &binding).is_err(),
                "byte {at} changed, still opens"
            );
        }
    }
    // Through the keyring: the owners' own keys never open these bytes,
    // whatever their header says; the error names the binding.
    for owner in OWNERS {
        let keys = KEYRING.keys_for_seal(owner).expect("keys");
        let opened = keys.open::<Vec<u8>>(Encrypted::from_bytes(bytes.to_vec()), scope, row);
        assert!(opened.is_err(), "random bytes opened for {owner}");
        let _ = keys.open::<String>(Encrypted::from_bytes(bytes.to_vec()), scope, row);
        let _ =
            keys.open::<chrono::NaiveDateTime>(Encrypted::from_bytes(bytes.to_vec()), scope, row);
    }
}

fn seal_and_tamper(which: u8, scope: &str, row: &[u8], plain: &[u8], pos: usize, mask: u8) {
    let owner = OWNERS[usize::from(which & 1)];
    let other = OWNERS[usize::from(!which & 1)];
    let keys = KEYRING.keys_for_seal(owner).expect("keys");
    let sealed = keys.seal(&plain.to_vec(), scope, row).expect("seal");
    let bytes = sealed.as_bytes().to_vec();
    assert_eq!(bytes.len(), plain.len() + envelope::OVERHEAD);
    assert_eq!(sealed.key_version(), keys.current_version());
    let opened: Vec<u8> = keys.open(sealed, scope, row).expect("opens");
    assert_eq!(opened, plain);

    let reopen = |bytes: &[u8], owner: &str, scope: &str, row: &[u8]| {
        let keys = KEYRING.keys_for_open(owner).expect("keys");
        keys.open::<Vec<u8>>(Encrypted::from_bytes(bytes.to_vec()), scope, row)
    };
    if mask != 0 {
        let mut tampered = bytes.clone();
        let at = pos % tampered.len();
        tampered[at] ^= mask;
        assert!(
            reopen(&tampered, owner, scope, row).is_err(),
            "byte {at} changed, still opens"
        );
        assert!(
            reopen(&bytes[..pos % bytes.len()], owner, scope, row).is_err(),
            "truncated, still opens"
        );
    }
    assert!(
        reopen(&bytes, other, scope, row).is_err(),
        "opens for another owner"
    );
    let mut other_scope = scope.to_owned();
    other_scope.push('x');
    assert!(
        reopen(&bytes, owner, &other_scope, row).is_err(),
        "opens in another scope"
    );
    let mut other_row = row.to_vec();
    other_row.push(mask);
    assert!(
        reopen(&bytes, owner, scope, &other_row).is_err(),
        "opens for another row"
    );
}
