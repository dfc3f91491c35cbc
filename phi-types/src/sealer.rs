//! Sealing many values with one entry into the nonce generator.

use crate::envelope::{self, Binding};
use crate::error::{Error, Result};
use crate::keyring::OwnerKeys;
use crate::nonce::{self, Nonces};
use crate::sql::Encrypted;
use crate::value::PhiValue;

impl OwnerKeys {
    /// Seals `value` for `scope` (`table.column`) and `row` (the row key's
    /// bytes, or empty) under this owner's current data key.
    ///
    /// # Errors
    /// [`Error::NoKey`] if the owner has no active key; [`Error::Encrypt`] if
    /// the context is too long for the format.
    pub fn seal<T: PhiValue>(&self, value: &T, scope: &str, row: &[u8]) -> Result<Encrypted<T>> {
        with_sealer(|sealer| sealer.seal(self, value, scope, row))?
    }
}

/// Seals values; obtained from [`with_sealer`].
///
/// Entering a sealer checks once that the process has not forked since the
/// thread's nonce generator was seeded (a system call); sealing through it
/// then costs the cipher and one allocation per value.
pub struct Sealer<'a> {
    nonces: Nonces<'a>,
    /// The keys of [`crate::lookup::LOOKUP_OWNER`], when the records being
    /// sealed have lookup indexes.
    lookup: Option<std::sync::Arc<OwnerKeys>>,
}

impl std::fmt::Debug for Sealer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").finish_non_exhaustive()
    }
}

impl Sealer<'_> {
    /// The keys lookup values are written under, if resolved for this
    /// sealer.
    #[doc(hidden)]
    pub fn lookup_keys(&self) -> Option<&OwnerKeys> {
        self.lookup.as_deref()
    }

    /// Sets the keys lookup values are written under.
    pub(crate) fn set_lookup_keys(&mut self, keys: Option<std::sync::Arc<OwnerKeys>>) {
        self.lookup = keys;
    }

    /// Seals `value` for `scope` and `row` under `keys`' current data key.
    ///
    /// # Errors
    /// [`Error::NoKey`] if the owner has no active key; [`Error::Encrypt`] if
    /// the owner, scope or row is too long for the format or the random
    /// source failed.
    pub fn seal<T: PhiValue>(
        &mut self,
        keys: &OwnerKeys,
        value: &T,
        scope: &str,
        row: &[u8],
    ) -> Result<Encrypted<T>> {
        crate::metrics::sealed(self.seal_uncounted(keys, value, scope, row))
    }

    fn seal_uncounted<T: PhiValue>(
        &mut self,
        keys: &OwnerKeys,
        value: &T,
        scope: &str,
        row: &[u8],
    ) -> Result<Encrypted<T>> {
        let dek = keys.current_dek()?;
        let refuse = |reason| Error::Encrypt {
            scope: scope.to_owned(),
            owner: keys.owner().to_owned(),
            reason,
        };
        let nonce = self
            .nonces
            .next()
            .map_err(|_| refuse("the operating system's random source failed"))?;
        let binding = Binding::new(keys.owner(), scope).with_row(row);
        let bytes = envelope::seal_with(
            dek.cipher(),
            dek.version(),
            nonce,
            &binding,
            value.encoded_len(),
            |out| value.encode(out),
        )
        .map_err(refuse)?;
        keys.count_seals(1);
        Ok(Encrypted::from_bytes(bytes))
    }
}

/// Runs `f` with a [`Sealer`]: the way to seal many values (a row, a batch of
/// rows) with one fork check.
///
/// `f` may seal through another sealer, or [`OwnerKeys::seal`], itself (as
/// a [`PhiValue`] whose encoding seals does): the nested sealer draws its
/// nonces from a generator of its own, seeded from the OS for it.
///
/// ```
/// # use std::sync::Arc;
/// # use phi_types::{Keyring, LocalKek, MemoryKeyStore, KeyBytes};
/// # let kek = LocalKek::new("k", &KeyBytes::new([1; 32]));
/// # let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), Arc::new(kek)).build()?;
/// let keys = keyring.keys_for_seal("provider-17")?;
/// let (first, last) = phi_types::__private::with_sealer(|s| -> phi_types::Result<_> {
///     Ok((
///         s.seal(&keys, &"Jane".to_string(), "cases.patient_first", b"C-1")?,
///         s.seal(&keys, &"Doe".to_string(), "cases.patient_last", b"C-1")?,
///     ))
/// })??;
/// # Ok::<(), phi_types::Error>(())
/// ```
///
/// # Errors
/// [`Error::RandomSource`] if the generator could not be seeded.
pub fn with_sealer<R>(f: impl FnOnce(&mut Sealer<'_>) -> R) -> Result<R> {
    nonce::with_nonces(|nonces| {
        let mut sealer = Sealer {
            nonces: Nonces::reborrow(nonces),
            lookup: None,
        };
        f(&mut sealer)
    })
    .map_err(|e| Error::RandomSource(e.to_string()))
}
