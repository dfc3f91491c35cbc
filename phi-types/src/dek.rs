//! Data encryption keys: 256-bit keys, one per (owner, version).

use std::fmt;

use zeroize::Zeroizing;

use crate::cipher::Cipher;

/// 32 bytes of key material, zeroized on drop, never printed.
///
/// This is what a [`KeyEncryptionKey`](crate::KeyEncryptionKey) wraps and
/// unwraps.
pub struct KeyBytes(Zeroizing<[u8; 32]>);

impl KeyBytes {
    /// Wraps existing key bytes.
    pub fn new(bytes: [u8; 32]) -> Self {
        KeyBytes(Zeroizing::new(bytes))
    }

    /// Fresh random key bytes from the operating system's CSPRNG.
    ///
    /// # Errors
    /// The operating system's random source failed.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut key = Zeroizing::new([0u8; 32]);
        getrandom::fill(key.as_mut())?;
        Ok(KeyBytes(key))
    }

    /// Copies key bytes out of a slice of exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let array: [u8; 32] = bytes.try_into().ok()?;
        Some(KeyBytes::new(array))
    }

    /// The key bytes. Handle with care: do not log or copy them.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyBytes(<redacted>)")
    }
}

/// One unwrapped data key of an owner, with its initialised cipher.
///
/// The raw key bytes kept for derivations are zeroized on drop. The
/// cipher's expanded key is wiped too: with the aes-gcm backend by
/// aes-gcm's `zeroize` feature; with ring (see
/// [`envelope::BACKEND`](crate::envelope::BACKEND)), whose key types do not
/// wipe themselves, phi keeps the schedule in a box of its own and on drop
/// overwrites it in place with the schedule of an all-zero key. Copies the
/// key expansion leaves on the stack (in ring's frames, and in phi's before
/// the schedule is boxed) are out of phi's reach.
pub struct Dek {
    version: u32,
    key: KeyBytes,
    cipher: Cipher,
}

impl Dek {
    /// Builds a data key of `version` from its bytes.
    pub fn new(version: u32, key: KeyBytes) -> Self {
        let cipher = Cipher::new(key.expose());
        Dek {
            version,
            key,
            cipher,
        }
    }

    /// The key version, as stored in envelope headers.
    pub fn version(&self) -> u32 {
        self.version
    }

    pub(crate) fn cipher(&self) -> &Cipher {
        &self.cipher
    }

    /// Raw key bytes, for key derivations (the blind index).
    pub(crate) fn key(&self) -> &KeyBytes {
        &self.key
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dek")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}
