//! The AES-256-GCM implementation behind envelope v1.
//!
//! Two interchangeable backends produce and accept the same bytes (the
//! envelope format does not change with the backend, and each opens the
//! other's output):
//!
//! - **aes-gcm** (RustCrypto `aes-gcm` 0.11), when the `ring` feature is off.
//!   Its expanded key (AES round keys and GHASH key) is wiped on drop by
//!   aes-gcm's `zeroize` feature. That wipes the value where it is dropped,
//!   not the places it was moved from, so phi boxes the schedule as soon as
//!   it is built: it lives at one heap address, never copied by a move of
//!   the `Cipher` or of the [`Dek`](crate::Dek) holding it, and is wiped
//!   there. What phi cannot reach, as with ring: the copies the key setup
//!   leaves on the stack (aes-gcm builds the AES schedule, derives the
//!   GHASH key and moves both into its value, and phi moves that value
//!   into its box: a few hundred bytes, overwritten by later calls).
//! - **ring** (`ring` 0.17), with the `ring` feature (on by default). Its
//!   assembly is chosen at run time for the CPU, so a default build without
//!   `target-cpu` gets AES-NI and carry-less multiplication; it runs in
//!   about half the time of aes-gcm on the short values phi stores
//!   (`benches/README.md`).
//!
//! # Key material with ring
//!
//! ring 0.17's `LessSafeKey` and `UnboundKey` do **not** wipe their memory
//! on drop: they implement neither `Drop` nor `Zeroize`, and ring has no
//! way to reach into them (ring keeps the AES round keys and the GHASH
//! table inline in the key value). phi therefore keeps each ring key in a
//! box of its own, so once boxed the key schedule lives at one address for
//! the rest of its life and is not copied by a move, and on drop overwrites that box
//! with the schedule of an all-zero key before freeing it: the secret
//! schedule is replaced in place by a public one. The 32 key bytes
//! themselves are held by [`KeyBytes`](crate::dek::KeyBytes), zeroized on drop, under both
//! backends. What phi cannot reach: the copies the key setup leaves on the
//! stack while expanding the key, in ring's frames and in phi's own while
//! the schedule is built before it is moved into its box (a few hundred
//! bytes, overwritten by later calls).

/// Name of the AES-256-GCM backend of this build: `"ring"` or `"aes-gcm"`.
#[cfg(feature = "ring")]
pub const BACKEND: &str = "ring";
/// Name of the AES-256-GCM backend of this build: `"ring"` or `"aes-gcm"`.
#[cfg(not(feature = "ring"))]
pub const BACKEND: &str = "aes-gcm";

/// Length of the nonce.
pub const NONCE_LEN: usize = 12;
/// Length of the GCM tag.
pub const TAG_LEN: usize = 16;

/// The AEAD failed: a value too large to seal, or a tag that does not
/// authenticate. No detail, on purpose.
#[derive(Debug)]
pub(crate) struct AeadError;

/// One initialised AES-256-GCM key.
pub(crate) struct Cipher {
    #[cfg(feature = "ring")]
    key: Box<ring::aead::LessSafeKey>,
    #[cfg(not(feature = "ring"))]
    key: AesGcmKey,
}

impl Cipher {
    /// Expands `key`.
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        #[cfg(feature = "ring")]
        {
            Cipher {
                key: Box::new(ring_key(key)),
            }
        }
        #[cfg(not(feature = "ring"))]
        {
            Cipher {
                key: AesGcmKey::new(key),
            }
        }
    }

    /// Encrypts `in_out` in place, returning the tag.
    pub(crate) fn seal_in_place(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], AeadError> {
        #[cfg(feature = "ring")]
        {
            let tag = self
                .key
                .seal_in_place_separate_tag(
                    ring::aead::Nonce::assume_unique_for_key(nonce),
                    ring::aead::Aad::from(aad),
                    in_out,
                )
                .map_err(|_| AeadError)?;
            let mut out = [0u8; TAG_LEN];
            out.copy_from_slice(tag.as_ref());
            Ok(out)
        }
        #[cfg(not(feature = "ring"))]
        {
            self.key.seal_in_place(nonce, aad, in_out)
        }
    }

    /// Decrypts `in_out` in place if `tag` authenticates it with `aad`. On
    /// failure `in_out` may hold anything: the caller wipes it.
    pub(crate) fn open_in_place(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
        tag: [u8; TAG_LEN],
    ) -> Result<(), AeadError> {
        #[cfg(feature = "ring")]
        {
            self.key
                .open_in_place_separate_tag(
                    ring::aead::Nonce::assume_unique_for_key(nonce),
                    ring::aead::Aad::from(aad),
                    ring::aead::Tag::from(tag),
                    in_out,
                    0..,
                )
                .map(|_| ())
                .map_err(|_| AeadError)
        }
        #[cfg(not(feature = "ring"))]
        {
            self.key.open_in_place(nonce, aad, in_out, tag)
        }
    }
}

/// The aes-gcm backend's key: the [`Cipher`] of a build without `ring`.
/// Compiled in every build, so that a `ring` build's tests check it
/// against ring, byte for byte.
#[cfg_attr(all(feature = "ring", not(test)), allow(dead_code))]
struct AesGcmKey(Box<aes_gcm::Aes256Gcm>);

#[cfg_attr(all(feature = "ring", not(test)), allow(dead_code))]
impl AesGcmKey {
    fn new(key: &[u8; 32]) -> Self {
        use aes_gcm::KeyInit as _;
        AesGcmKey(Box::new(aes_gcm::Aes256Gcm::new(key.into())))
    }

    fn seal_in_place(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], AeadError> {
        use aes_gcm::aead::AeadInOut as _;
        let tag = self
            .0
            .encrypt_inout_detached(&aes_gcm::Nonce::from(nonce), aad, in_out.into())
            .map_err(|_| AeadError)?;
        Ok(tag.into())
    }

    fn open_in_place(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
        tag: [u8; TAG_LEN],
    ) -> Result<(), AeadError> {
        use aes_gcm::aead::AeadInOut as _;
        self.0
            .decrypt_inout_detached(
                &aes_gcm::Nonce::from(nonce),
                aad,
                in_out.into(),
                &aes_gcm::Tag::from(tag),
            )
            .map_err(|_| AeadError)
    }
}

#[cfg(feature = "ring")]
fn ring_key(key: &[u8; 32]) -> ring::aead::LessSafeKey {
    // ring refuses a key only when its length is not the algorithm's (32).
    let unbound = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key)
        .unwrap_or_else(|_| unreachable!("ring refused a 32-byte AES-256 key"));
    ring::aead::LessSafeKey::new(unbound)
}

#[cfg(feature = "ring")]
impl Drop for Cipher {
    fn drop(&mut self) {
        // Overwrite the boxed schedule in place with a public one (see the
        // module docs), and keep the write from being optimised away.
        *self.key = ring_key(&[0u8; 32]);
        std::hint::black_box(&*self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Seal<'a> = &'a dyn Fn(&mut [u8]) -> Result<[u8; TAG_LEN], AeadError>;
    type Open<'a> = &'a dyn Fn(&mut [u8], [u8; TAG_LEN]) -> Result<(), AeadError>;

    /// NIST SP 800-38D / McGrew–Viega test case 14 (AES-256, zero key,
    /// zero nonce, one zero block) through `seal` and `open`, and a changed
    /// tag refused.
    fn known_answer_of(seal: Seal<'_>, open: Open<'_>) {
        let mut block = [0u8; 16];
        let tag = seal(&mut block).expect("seals");
        assert_eq!(hex::encode(block), "cea7403d4d606b6e074ec5d3baf39d18");
        assert_eq!(hex::encode(tag), "d0d1c8a799996bf0265b98b5d48ab919");
        let mut bad = tag;
        bad[0] ^= 1;
        assert!(open(&mut block.clone(), bad).is_err());
        open(&mut block, tag).expect("opens");
        assert_eq!(block, [0u8; 16]);
    }

    /// The build's backend on the known answer.
    #[test]
    fn known_answer() {
        let cipher = Cipher::new(&[0; 32]);
        known_answer_of(
            &|block| cipher.seal_in_place([0; NONCE_LEN], &[], block),
            &|block, tag| cipher.open_in_place([0; NONCE_LEN], &[], block, tag),
        );
    }

    /// The aes-gcm backend (as a build without `ring` uses it) on the known
    /// answer, in every build.
    #[test]
    fn known_answer_with_aes_gcm() {
        let key = AesGcmKey::new(&[0; 32]);
        known_answer_of(
            &|block| key.seal_in_place([0; NONCE_LEN], &[], block),
            &|block, tag| key.open_in_place([0; NONCE_LEN], &[], block, tag),
        );
    }

    /// With the `ring` feature, the two backends side by side (the aes-gcm
    /// one as a build without `ring` uses it): each opens what the other
    /// sealed, byte for byte the same envelope body and tag, and each
    /// refuses the other's output once altered.
    #[cfg(feature = "ring")]
    mod ring_against_aes_gcm {
        use proptest::collection::vec;
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn each_opens_the_others_output(
                key in any::<[u8; 32]>(),
                nonce in any::<[u8; NONCE_LEN]>(),
                aad in vec(any::<u8>(), 0..300),
                value in vec(any::<u8>(), 0..2_000),
                flip in 0..2_016usize,
            ) {
                let ring = Cipher::new(&key);
                let rust_crypto = AesGcmKey::new(&key);

                // ring seals, aes-gcm opens.
                let mut by_ring = value.clone();
                let ring_tag = ring.seal_in_place(nonce, &aad, &mut by_ring).expect("ring seals");
                let mut opened = by_ring.clone();
                rust_crypto
                    .open_in_place(nonce, &aad, &mut opened, ring_tag)
                    .expect("aes-gcm opens ring's output");
                prop_assert_eq!(&opened, &value);

                // aes-gcm seals, ring opens: the same bytes and tag.
                let mut by_rust_crypto = value.clone();
                let tag = rust_crypto
                    .seal_in_place(nonce, &aad, &mut by_rust_crypto)
                    .expect("aes-gcm seals");
                prop_assert_eq!(&by_rust_crypto, &by_ring);
                prop_assert_eq!(tag, ring_tag);
                let mut opened = by_rust_crypto.clone();
                ring.open_in_place(nonce, &aad, &mut opened, tag)
                    .expect("ring opens aes-gcm's output");
                prop_assert_eq!(&opened, &value);

                // One bit changed in the ciphertext or the tag: refused.
                let mut body = by_rust_crypto.clone();
                let mut bad_tag = ring_tag;
                if flip < body.len() {
                    body[flip] ^= 1;
                } else {
                    bad_tag[flip % TAG_LEN] ^= 1;
                }
                prop_assert!(ring.open_in_place(nonce, &aad, &mut body.clone(), bad_tag).is_err());
                prop_assert!(rust_crypto.open_in_place(nonce, &aad, &mut body, bad_tag).is_err());
            }
        }
    }
}
