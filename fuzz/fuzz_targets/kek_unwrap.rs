//! `LocalKek`: unwrapping stored wrapped keys (`user_encryption_keys.
//! wrapped_key` is read from the database) and reading master key text.
//!
//! Input: a mode byte, a 32-bit key version, a 16-bit position and a mask,
//! an owner (8-bit length and bytes), then the rest.
//!
//! - Mode 0: unwrap the rest as a wrapped key: never a panic.
//! - Mode 1: wrap the first 32 bytes of the rest (zero-padded) as a data
//!   key, unwrap it back; a tampered wrap, another owner, version or KEK id
//!   do not unwrap.
//! - Mode 2: read the rest as master key text (`PHI_MASTER_KEY`, a key
//!   file): a key only from base64 of exactly 32 bytes, and an error that
//!   does not repeat the text.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use phi_types::{KeyBytes, KeyEncryptionKey, LocalKek};

const MASTER: [u8; 32] = [0xA5; 32];
static KEK: LazyLock<LocalKek> =
    LazyLock::new(|| LocalKek::new("fuzz-kek", &KeyBytes::new(MASTER)));

fuzz_target!(|data: &[u8]| {
    let Some((&[mode, v0, v1, v2, v3, p0, p1, mask, owner_len], rest)) =
        data.split_first_chunk::<9>()
    else {
        return;
    };
    let version = u32::from_be_bytes([v0, v1, v2, v3]);
    let pos = usize::from(u16::from_be_bytes([p0, p1]));
    let Some((owner, rest)) = rest.split_at_checked(usize::from(owner_len)) else {
        return;
    };
    let Ok(owner) = std::str::from_utf8(owner) else {
        return;
    };
    match mode % 3 {
        0 => {
            if let Err(e) = KEK.unwrap(owner, version, rest) {
                let _ = e.to_string();
            }
        }
        1 => {
            let mut key = [0u8; 32];
            let n = rest.len().min(32);
            key[..n].copy_from_slice(&rest[..n]);
            let wrapped = KEK.wrap(owner, version, &KeyBytes::new(key)).expect("wrap");
            assert_eq!(wrapped.len(), 60);
            let back = KEK.unwrap(owner, version, &wrapped).expect("unwrap");
            assert_eq!(back.expose(), &key);
            if mask != 0 {
                let mut tampered = wrapped.clone();
                tampered[pos % 60] ^= mask;
                assert!(
                    KEK.unwrap(owner, version, &tampered).is_err(),
                    "tampered wrap unwraps"
                );
            }
            assert!(
                KEK.unwrap(owner, version ^ 1, &wrapped).is_err(),
                "another version unwraps"
            );
            let mut other = owner.to_owned();
            other.push('x');
            assert!(
                KEK.unwrap(&other, version, &wrapped).is_err(),
                "another owner unwraps"
            );
            let renamed = LocalKek::new("fuzz-kek2", &KeyBytes::new(MASTER));
            assert!(
                renamed.unwrap(owner, version, &wrapped).is_err(),
                "another KEK id unwraps"
            );
            assert!(
                KEK.unwrap(owner, version, &wrapped[..pos % 60]).is_err(),
                "truncated wrap unwraps"
            );
        }
        _ => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            match LocalKek::from_base64("fuzz-kek", text) {
                Ok(kek) => {
                    // Only 32 bytes of base64 make a key; it wraps and unwraps.
                    let wrapped = kek.wrap("o", 1, &KeyBytes::new([1; 32])).expect("wrap");
                    assert!(kek.unwrap("o", 1, &wrapped).is_ok());
                    let trimmed = text.trim();
                    assert!((43..=44).contains(&trimmed.len()), "{trimmed:?} is a key");
                }
                Err(e) => {
                    // One of two fixed reasons: nothing of the text itself.
                    let shown = e.to_string();
                    let reason = shown
                        .strip_prefix("invalid master key for KEK \"fuzz-kek\": ")
                        .unwrap_or_else(|| panic!("unexpected error: {shown}"));
                    let length = reason
                        .strip_prefix("decodes to ")
                        .and_then(|r| r.strip_suffix(" bytes, a master key is exactly 32"));
                    assert!(
                        reason == "not valid base64"
                            || length.is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())),
                        "unexpected error: {shown}"
                    );
                }
            }
        }
    }
});
