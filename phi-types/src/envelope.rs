//! Envelope format v1: the stored form of one encrypted value.
//!
//! ```text
//! offset  size  field
//! 0       1     magic 0xF1
//! 1       1     format version 0x01  (AES-256-GCM, 96-bit random nonce, 128-bit tag)
//! 2       4     DEK version, u32 big-endian
//! 6       12    nonce
//! 18      n     ciphertext of the encoded value
//! 18+n    16    GCM tag
//! ```
//!
//! The associated data, authenticated but not stored, binds the value to its
//! owner, its `table.column` scope and its row:
//!
//! ```text
//! header[0..6] ‖ u16be(len owner) ‖ owner ‖ u16be(len scope) ‖ scope ‖ u16be(len row) ‖ row
//! ```
//!
//! This module holds no keys: it parses and lays out bytes. Parsing is total:
//! any byte string gives a [`Header`] or an [`EnvelopeError`], never a panic.
//!
//! # The nonce budget
//!
//! Nonces are 96 random bits, drawn afresh for every seal. NIST SP 800-38D
//! (§8.3) caps random-nonce AES-GCM at 2³² seals per key: the chance that
//! any two of `q` random nonces collide is at most `q² / 2⁹⁷`, 2⁻³³ at
//! `q = 2³²`, and a collision under one key would expose the XOR of two
//! plaintexts and the key's authentication subkey. The budget is per data
//! key *version*: [`rotate`](crate::lifecycle::rotate) starts a fresh one.
//!
//! phi does not count seals per data key. What bounds them instead:
//!
//! - One seal is one non-NULL encrypted value written: each such field of a
//!   row sealed for an insert or an update, and each value a backfill or a
//!   re-seal writes. An owner is one provider or tenant. A busy clinic owner writing 10,000 rows a day with
//!   10 encrypted fields seals 10⁵ values a day, 3.7 × 10⁷ a year: 2³²
//!   (4.3 × 10⁹) would take over a century, and 2³⁰, a quarter of the
//!   budget (collision chance at most 2⁻³⁷), about 29 years.
//! - A tenant-sized owner writing a million such rows a day (10⁷ seals)
//!   reaches 2³⁰ in about 107 days: rotate such an owner's data key at
//!   least every quarter (`phi keys rotate --owner …`, then `keys reseal`).
//! - The `phi_seal_total` counter (see [`metrics`](crate::metrics)),
//!   summed over every process, counts the seals of all owners together,
//!   so it bounds each owner's: while the deployment as a whole seals fewer
//!   than 2³⁰ values between rotations, no owner's version can come near
//!   the budget.

use crate::cipher::Cipher;
pub use crate::cipher::{BACKEND, NONCE_LEN, TAG_LEN};
use crate::dek::Dek;
pub use crate::error::EnvelopeError;

/// First byte of every envelope.
pub const MAGIC: u8 = 0xF1;
/// Format version byte of envelope v1 (AES-256-GCM, 96-bit nonce, 128-bit tag).
pub const VERSION_V1: u8 = 0x01;
/// Length of the fixed header (magic, version, key version).
pub const HEADER_LEN: usize = 6;
/// Offset of the ciphertext.
pub const CIPHERTEXT_OFFSET: usize = HEADER_LEN + NONCE_LEN;
/// Bytes an envelope adds to its plaintext.
pub const OVERHEAD: usize = CIPHERTEXT_OFFSET + TAG_LEN;
/// Largest owner id, scope or row key the associated data can carry.
pub const MAX_CONTEXT_LEN: usize = u16::MAX as usize;

/// The parsed fixed header of an envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version byte (always [`VERSION_V1`] today).
    pub format: u8,
    /// Version of the owner's data key that sealed the value.
    pub key_version: u32,
}

impl Header {
    /// Parses and checks the header of `bytes` (magic, format version, length).
    ///
    /// # Errors
    /// [`EnvelopeError`] when `bytes` is not a complete envelope of a known format.
    pub fn parse(bytes: &[u8]) -> Result<Header, EnvelopeError> {
        let (&magic, rest) = bytes.split_first().ok_or(EnvelopeError::Empty)?;
        if magic != MAGIC {
            return Err(EnvelopeError::BadMagic(magic));
        }
        let Some(&format) = rest.first() else {
            return Err(EnvelopeError::Truncated {
                len: bytes.len(),
                min: OVERHEAD,
            });
        };
        match format {
            VERSION_V1 => {
                if bytes.len() < OVERHEAD {
                    return Err(EnvelopeError::Truncated {
                        len: bytes.len(),
                        min: OVERHEAD,
                    });
                }
                let key_version = u32::from_be_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]);
                Ok(Header {
                    format,
                    key_version,
                })
            }
            other => Err(EnvelopeError::UnsupportedVersion(other)),
        }
    }

    /// The six header bytes as stored.
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let v = self.key_version.to_be_bytes();
        [MAGIC, self.format, v[0], v[1], v[2], v[3]]
    }
}

/// The context a value is bound to: who owns it, which column it lives in,
/// which row it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding<'a> {
    /// Owner id (whose data key seals the value).
    pub owner: &'a str,
    /// `table.column`, or the scope pinned on the field.
    pub scope: &'a str,
    /// The row key's encoded bytes, empty when the model declares none.
    pub row: &'a [u8],
}

impl<'a> Binding<'a> {
    /// A binding without a row key.
    pub fn new(owner: &'a str, scope: &'a str) -> Self {
        Binding {
            owner,
            scope,
            row: &[],
        }
    }

    /// The same binding with a row key.
    #[must_use]
    pub fn with_row(self, row: &'a [u8]) -> Self {
        Binding { row, ..self }
    }

    /// Checks the lengths the associated data can encode.
    pub(crate) fn check(&self) -> Result<(), &'static str> {
        if self.owner.is_empty() {
            return Err("the owner id is empty");
        }
        if self.owner.len() > MAX_CONTEXT_LEN {
            return Err("the owner id is longer than 65,535 bytes");
        }
        if self.scope.len() > MAX_CONTEXT_LEN {
            return Err("the scope is longer than 65,535 bytes");
        }
        if self.row.len() > MAX_CONTEXT_LEN {
            return Err("the row key is longer than 65,535 bytes");
        }
        Ok(())
    }

    fn aad_len(&self) -> usize {
        HEADER_LEN + 6 + self.owner.len() + self.scope.len() + self.row.len()
    }

    /// Calls `f` with the associated data for `header`, built on the stack
    /// when it fits in 256 bytes.
    fn with_aad<R>(&self, header: &[u8; HEADER_LEN], f: impl FnOnce(&[u8]) -> R) -> R {
        fn fill(out: &mut [u8], header: &[u8], parts: [&[u8]; 3]) {
            out[..HEADER_LEN].copy_from_slice(header);
            let mut at = HEADER_LEN;
            for part in parts {
                // Lengths were checked by `Binding::check`.
                let len = u16::try_from(part.len()).unwrap_or(u16::MAX);
                out[at..at + 2].copy_from_slice(&len.to_be_bytes());
                out[at + 2..at + 2 + part.len()].copy_from_slice(part);
                at += 2 + part.len();
            }
        }
        let parts = [self.owner.as_bytes(), self.scope.as_bytes(), self.row];
        let len = self.aad_len();
        if len <= 256 {
            let mut buf = [0u8; 256];
            fill(&mut buf[..len], header, parts);
            f(&buf[..len])
        } else {
            let mut buf = vec![0u8; len];
            fill(&mut buf, header, parts);
            f(&buf)
        }
    }
}

/// Seals `encode`'s output into a new envelope under `cipher`.
///
/// `encode` appends the value's plaintext encoding to the buffer it is given;
/// the buffer already holds the header and nonce. One allocation of the
/// final size when `size_hint` is right.
pub(crate) fn seal_with(
    cipher: &Cipher,
    key_version: u32,
    nonce: [u8; NONCE_LEN],
    binding: &Binding<'_>,
    size_hint: usize,
    encode: impl FnOnce(&mut Vec<u8>),
) -> Result<Vec<u8>, &'static str> {
    binding.check()?;
    let header = Header {
        format: VERSION_V1,
        key_version,
    }
    .to_bytes();
    let mut out = Vec::with_capacity(OVERHEAD + size_hint);
    out.extend_from_slice(&header);
    out.extend_from_slice(&nonce);
    encode(&mut out);
    let tag = binding
        .with_aad(&header, |aad| {
            cipher.seal_in_place(nonce, aad, &mut out[CIPHERTEXT_OFFSET..])
        })
        .map_err(|_| "the value is too large for AES-GCM")?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Opens `envelope` in place under `cipher`, leaving the plaintext in the
/// same buffer. On failure the buffer is zeroed and emptied, so no partial
/// plaintext survives.
pub(crate) fn open_in_place(
    cipher: &Cipher,
    envelope: &mut Vec<u8>,
    binding: &Binding<'_>,
) -> Result<(), OpenError> {
    let header = Header::parse(envelope).map_err(OpenError::Malformed)?;
    binding.check().map_err(OpenError::Context)?;
    let len = envelope.len();
    let mut header_bytes = [0u8; HEADER_LEN];
    header_bytes.copy_from_slice(&envelope[..HEADER_LEN]);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&envelope[HEADER_LEN..CIPHERTEXT_OFFSET]);
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&envelope[len - TAG_LEN..]);
    let result = binding.with_aad(&header_bytes, |aad| {
        cipher.open_in_place(
            nonce,
            aad,
            &mut envelope[CIPHERTEXT_OFFSET..len - TAG_LEN],
            tag,
        )
    });
    if result.is_err() {
        // Nothing of a failed open survives, whatever the cipher left behind.
        zeroize::Zeroize::zeroize(envelope);
        return Err(OpenError::Auth(header.key_version));
    }
    envelope.truncate(len - TAG_LEN);
    envelope.drain(..CIPHERTEXT_OFFSET);
    Ok(())
}

/// Opens `envelope` with `dek`, returning the plaintext encoding of the
/// value. A low-level building block (test vectors, tools):
/// [`OwnerKeys::open`](crate::OwnerKeys::open) picks the key version from
/// the header and decodes the value.
///
/// ```
/// use phi_types::{Binding, Dek, KeyBytes, envelope};
/// let dek = Dek::new(1, KeyBytes::new([0x11; 32]));
/// let bogus = [0xF1, 0x01, 0, 0, 0, 1];
/// assert!(envelope::open(&dek, &bogus, &Binding::new("u1", "cases.patient_last")).is_err());
/// ```
///
/// # Errors
/// [`Error::Malformed`](crate::Error::Malformed) when the bytes are not an
/// envelope, [`Error::UnknownKeyVersion`](crate::Error::UnknownKeyVersion)
/// when the header names another key version than `dek`'s,
/// [`Error::Decrypt`](crate::Error::Decrypt) when it does not authenticate
/// under `binding`.
pub fn open(dek: &Dek, envelope: &[u8], binding: &Binding<'_>) -> crate::Result<Vec<u8>> {
    let context = |source| crate::Error::Malformed {
        scope: binding.scope.to_owned(),
        owner: binding.owner.to_owned(),
        source,
    };
    let header = Header::parse(envelope).map_err(context)?;
    if header.key_version != dek.version() {
        return Err(crate::Error::UnknownKeyVersion {
            scope: binding.scope.to_owned(),
            owner: binding.owner.to_owned(),
            key_version: header.key_version,
        });
    }
    let mut bytes = envelope.to_vec();
    open_in_place(dek.cipher(), &mut bytes, binding).map_err(|e| e.into_error(binding))?;
    Ok(bytes)
}

impl OpenError {
    pub(crate) fn into_error(self, binding: &Binding<'_>) -> crate::Error {
        match self {
            OpenError::Auth(key_version) => crate::Error::Decrypt {
                scope: binding.scope.to_owned(),
                owner: binding.owner.to_owned(),
                key_version,
            },
            OpenError::Context(reason) => crate::Error::InvalidInput {
                what: "binding",
                reason: reason.to_owned(),
            },
            OpenError::Malformed(source) => crate::Error::Malformed {
                scope: binding.scope.to_owned(),
                owner: binding.owner.to_owned(),
                source,
            },
        }
    }
}

/// Why [`open_in_place`] failed, before context is attached.
#[derive(Debug)]
pub(crate) enum OpenError {
    Auth(u32),
    Context(&'static str),
    Malformed(EnvelopeError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_is_total_on_short_inputs() {
        assert_eq!(Header::parse(&[]), Err(EnvelopeError::Empty));
        assert_eq!(Header::parse(&[0x41]), Err(EnvelopeError::BadMagic(0x41)));
        assert_eq!(
            Header::parse(&[MAGIC]),
            Err(EnvelopeError::Truncated { len: 1, min: 34 })
        );
        assert_eq!(
            Header::parse(&[MAGIC, 0x02, 0, 0, 0, 1]),
            Err(EnvelopeError::UnsupportedVersion(2))
        );
        for len in 2..OVERHEAD {
            let mut bytes = vec![0u8; len];
            bytes[0] = MAGIC;
            bytes[1] = VERSION_V1;
            assert_eq!(
                Header::parse(&bytes),
                Err(EnvelopeError::Truncated { len, min: OVERHEAD })
            );
        }
    }

    #[test]
    fn parse_reads_key_version_big_endian() {
        let mut bytes = vec![0u8; OVERHEAD];
        bytes[..6].copy_from_slice(&[MAGIC, VERSION_V1, 0x01, 0x02, 0x03, 0x04]);
        let header = Header::parse(&bytes).expect("valid header");
        assert_eq!(header.key_version, 0x0102_0304);
        assert_eq!(header.to_bytes(), [MAGIC, VERSION_V1, 1, 2, 3, 4]);
    }

    #[test]
    fn parse_never_panics_on_any_two_byte_prefix() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                for len in [2usize, 5, 33, 34, 40] {
                    let mut bytes = vec![0u8; len];
                    bytes[0] = a;
                    bytes[1] = b;
                    let _ = Header::parse(&bytes);
                }
            }
        }
    }

    #[test]
    fn aad_layout_matches_the_contract() {
        let binding = Binding::new("u1", "cases.patient_last").with_row(b"C-9");
        let header = [MAGIC, VERSION_V1, 0, 0, 0, 7];
        let aad = binding.with_aad(&header, <[u8]>::to_vec);
        let mut expected = header.to_vec();
        expected.extend_from_slice(&[0, 2]);
        expected.extend_from_slice(b"u1");
        expected.extend_from_slice(&[0, 18]);
        expected.extend_from_slice(b"cases.patient_last");
        expected.extend_from_slice(&[0, 3]);
        expected.extend_from_slice(b"C-9");
        assert_eq!(aad, expected);
        // The heap path lays out the same bytes.
        let long_scope = "t.".repeat(200);
        let binding = Binding::new("u1", &long_scope);
        let aad = binding.with_aad(&header, <[u8]>::to_vec);
        assert_eq!(aad.len(), 6 + 2 + 2 + 2 + 400 + 2);
        assert_eq!(&aad[10..12], &400u16.to_be_bytes());
    }

    /// Envelope v1 over arbitrary keys, nonces, bindings and values.
    mod properties {
        use proptest::collection::vec;
        use proptest::prelude::*;

        use super::*;
        use crate::dek::KeyBytes;

        fn config() -> ProptestConfig {
            ProptestConfig::with_cases(512)
        }

        /// Owner (never empty), scope and row: up to a few hundred bytes, so
        /// the associated data is built both on the stack and on the heap.
        fn context() -> impl Strategy<Value = (String, String, Vec<u8>)> {
            (
                vec(any::<char>(), 1..80).prop_map(String::from_iter),
                vec(any::<char>(), 0..80).prop_map(String::from_iter),
                vec(any::<u8>(), 0..200),
            )
        }

        fn seal(dek: &Dek, nonce: [u8; NONCE_LEN], binding: &Binding<'_>, value: &[u8]) -> Vec<u8> {
            seal_with(
                dek.cipher(),
                dek.version(),
                nonce,
                binding,
                value.len(),
                |out| {
                    out.extend_from_slice(value);
                },
            )
            .expect("a binding within the format's limits seals")
        }

        /// Opens a copy of `bytes` the way `OwnerKeys::open` does, after it
        /// picked `dek` by the header's key version.
        fn open_copy(dek: &Dek, bytes: &[u8], binding: &Binding<'_>) -> Result<Vec<u8>, OpenError> {
            let mut buf = bytes.to_vec();
            let result = open_in_place(dek.cipher(), &mut buf, binding);
            if let Err(OpenError::Auth(_)) = result {
                assert!(buf.iter().all(|b| *b == 0), "a failed open leaves nothing");
            }
            result.map(|()| buf)
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn seal_then_open_round_trips(
                key in any::<[u8; 32]>(),
                version in any::<u32>(),
                nonce in any::<[u8; NONCE_LEN]>(),
                (owner, scope, row) in context(),
                value in vec(any::<u8>(), 0..600),
            ) {
                let dek = Dek::new(version, KeyBytes::new(key));
                let binding = Binding::new(&owner, &scope).with_row(&row);
                let sealed = seal(&dek, nonce, &binding, &value);
                prop_assert_eq!(sealed.len(), OVERHEAD + value.len());
                prop_assert_eq!(
                    Header::parse(&sealed),
                    Ok(Header { format: VERSION_V1, key_version: version })
                );
                prop_assert_eq!(&sealed[HEADER_LEN..CIPHERTEXT_OFFSET], &nonce[..]);
                prop_assert_eq!(open(&dek, &sealed, &binding).expect("opens"), value.clone());
                prop_assert_eq!(open_copy(&dek, &sealed, &binding).expect("opens"), value);
            }

            #[test]
            fn every_mutation_of_a_sealed_value_is_rejected(
                key in any::<[u8; 32]>(),
                version in any::<u32>(),
                nonce in any::<[u8; NONCE_LEN]>(),
                (owner, scope, row) in context(),
                value in vec(any::<u8>(), 0..64),
                flip in 1..=255u8,
                extra in vec(any::<u8>(), 1..8),
            ) {
                let dek = Dek::new(version, KeyBytes::new(key));
                let binding = Binding::new(&owner, &scope).with_row(&row);
                let sealed = seal(&dek, nonce, &binding, &value);
                // Any byte changed: header, nonce, ciphertext or tag.
                for at in 0..sealed.len() {
                    let mut altered = sealed.clone();
                    altered[at] ^= flip;
                    prop_assert!(open_copy(&dek, &altered, &binding).is_err(), "byte {} altered", at);
                    prop_assert!(open(&dek, &altered, &binding).is_err());
                }
                // Cut short or extended.
                for len in 0..sealed.len() {
                    prop_assert!(open_copy(&dek, &sealed[..len], &binding).is_err(), "cut to {}", len);
                }
                let mut longer = sealed.clone();
                longer.extend_from_slice(&extra);
                prop_assert!(open_copy(&dek, &longer, &binding).is_err());
                // Moved to another owner, scope or row.
                let other_owner = format!("{owner}\0");
                let other_scope = format!("{scope}.");
                let mut other_row = row.clone();
                other_row.push(flip);
                for moved in [
                    Binding::new(&other_owner, &scope).with_row(&row),
                    Binding::new(&owner, &other_scope).with_row(&row),
                    Binding::new(&owner, &scope).with_row(&other_row),
                    Binding::new(&owner, &scope).with_row(&row[..row.len().saturating_sub(1)]),
                ] {
                    if moved != binding {
                        prop_assert!(matches!(
                            open_copy(&dek, &sealed, &moved),
                            Err(OpenError::Auth(v)) if v == version
                        ));
                    }
                }
                // Opened with another key of the same version.
                let mut other_key = key;
                other_key[usize::from(flip) % 32] ^= flip;
                let other = Dek::new(version, KeyBytes::new(other_key));
                prop_assert!(open_copy(&other, &sealed, &binding).is_err());
            }

            #[test]
            fn parsing_and_opening_arbitrary_bytes_never_panic(
                bytes in vec(any::<u8>(), 0..120),
                envelope_like in vec(any::<u8>(), 0..120),
                key in any::<[u8; 32]>(),
            ) {
                match Header::parse(&bytes) {
                    Ok(header) => {
                        prop_assert!(bytes.len() >= OVERHEAD);
                        prop_assert_eq!(&header.to_bytes()[..], &bytes[..HEADER_LEN]);
                    }
                    Err(EnvelopeError::Empty) => prop_assert!(bytes.is_empty()),
                    Err(EnvelopeError::BadMagic(b)) => prop_assert_eq!(b, bytes[0]),
                    Err(EnvelopeError::Truncated { len, min }) => {
                        prop_assert_eq!((len, min), (bytes.len(), OVERHEAD));
                    }
                    Err(EnvelopeError::UnsupportedVersion(v)) => prop_assert_eq!(v, bytes[1]),
                }
                // Past the header checks: the tag decides, and it fails.
                let mut forged = vec![MAGIC, VERSION_V1];
                forged.extend_from_slice(&envelope_like);
                let version = Header::parse(&forged).map_or(0, |h| h.key_version);
                let dek = Dek::new(version, KeyBytes::new(key));
                let binding = Binding::new("u1", "cases.patient_last");
                for candidate in [&bytes, &forged] {
                    prop_assert!(open(&dek, candidate, &binding).is_err());
                    prop_assert!(open_copy(&dek, candidate, &binding).is_err());
                }
            }
        }
    }
}
