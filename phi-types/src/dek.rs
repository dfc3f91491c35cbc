//! Data encryption keys: 256-bit keys, one per (owner, version).

use std::fmt;

use zeroize::Zeroizing;

use crate::cipher::Cipher;

/// 32 bytes of key material, zeroized on drop, never printed.
///
/// This is what a [`KeyEncryptionKey`](crate::KeyEncryptionKey) wraps and
/// unwraps.
///
/// The bytes live in a heap allocation of their own for the whole life of
/// the value: moving a `KeyBytes` (into a `Vec` that later grows, an `Arc`,
/// a channel, a task) moves a pointer, never the key, so no copy is left
/// behind in memory freed or reused later; on drop the one copy is
/// overwritten with zeros before it is freed. [`generate`](Self::generate)
/// and [`from_slice`](Self::from_slice) write the key straight into that
/// allocation; [`new`](Self::new) copies the array it is given, which stays
/// the caller's to wipe.
pub struct KeyBytes(Box<Zeroizing<[u8; 32]>>);

impl KeyBytes {
    /// Wraps existing key bytes (a copy: `bytes` stays the caller's to
    /// wipe; [`from_slice`](Self::from_slice) of a zeroizing buffer leaves
    /// no other copy).
    pub fn new(bytes: [u8; 32]) -> Self {
        let mut key = Self::zeroed();
        key.0.copy_from_slice(&bytes);
        key
    }

    /// An all-zero key in its allocation, to be filled in place.
    fn zeroed() -> Self {
        KeyBytes(Box::new(Zeroizing::new([0u8; 32])))
    }

    /// Fresh random key bytes from the operating system's CSPRNG, written
    /// straight into their allocation.
    ///
    /// # Errors
    /// The operating system's random source failed.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut key = Self::zeroed();
        getrandom::fill(&mut key.0[..])?;
        Ok(key)
    }

    /// Copies key bytes out of a slice of exactly 32 bytes, straight into
    /// their allocation.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 32 {
            return None;
        }
        let mut key = Self::zeroed();
        key.0.copy_from_slice(bytes);
        Some(key)
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
/// wipe themselves, phi overwrites it in place on drop with the schedule of
/// an all-zero key. Under both backends the key bytes and the schedule each
/// live in a heap allocation of their own from the moment they are built
/// (a `Dek` holds two pointers and its version): moving a `Dek` never
/// copies key material, so none is left behind in memory freed or reused
/// later. Copies the key expansion leaves on the stack (in ring's or
/// aes-gcm's frames, and in phi's while the schedule is built, before it is
/// moved into its box) are out of phi's reach; they are overwritten by
/// later calls.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Moving key material moves a pointer: a `KeyBytes` and a `Dek` (key
    /// bytes and cipher) hold their secrets behind boxes, so a move (into
    /// a `Vec` that grows, an `Arc`, a task) leaves no copy of a key or a
    /// key schedule behind, under either backend.
    #[test]
    fn keys_and_schedules_are_boxed_so_a_move_copies_no_key_material() {
        assert_eq!(size_of::<KeyBytes>(), size_of::<usize>());
        assert_eq!(size_of::<Cipher>(), size_of::<usize>());
        assert!(size_of::<Dek>() <= 3 * size_of::<usize>());
        let key = KeyBytes::from_slice(&[7; 32]).expect("32 bytes");
        let at = key.expose().as_ptr();
        let mut moved = Vec::new();
        moved.push(key);
        moved.reserve(1_000);
        assert_eq!(moved[0].expose().as_ptr(), at, "the key never moved");
        assert_eq!(moved[0].expose(), &[7; 32]);
        assert!(KeyBytes::from_slice(&[7; 31]).is_none());
        assert_eq!(KeyBytes::new([9; 32]).expose(), &[9; 32]);
    }
}
