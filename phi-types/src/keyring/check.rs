//! Check values: a KEK id names exactly one key.
//!
//! The first keyring built with a KEK stores the KEK's check value under its
//! id (`kek_check_values`); every later keyring verifies its KEKs against
//! the stored values and is refused on a mismatch, before it writes
//! anything. A store that already holds data keys under a KEK id but no
//! check value (written before check values existed) is verified by
//! opening some of those keys first.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::kek::{KekCheck, KeyEncryptionKey};
use crate::store::KeyStore;

/// Data key rows tried when a KEK id has keys but no check value: the KEK
/// matches only when every sampled row opens with it (one that does not is
/// a mismatch, and the keyring is refused). The sample is the first rows of
/// the (not destroyed) rows under that KEK id in `(owner_id, version)`
/// order, at most this many.
const LEGACY_SAMPLE: usize = 3;

/// Verifies every KEK of a keyring against `store`, then stores the check
/// value of each KEK id that has none. Nothing is written unless every
/// KEK verified.
///
/// # Errors
/// [`Error::KekMismatch`] when a KEK's key material is not the one the
/// store knows under its id; [`Error::KekCheck`] when a KEK cannot tell;
/// key store errors.
pub(crate) fn verify_keks(store: &dyn KeyStore, keks: &[&Arc<dyn KeyEncryptionKey>]) -> Result<()> {
    let mut absent = Vec::new();
    for kek in keks {
        let kek = kek.as_ref();
        match store.kek_check(kek.id())? {
            Some(check) => verify(kek, &check)?,
            None => {
                verify_legacy(store, kek)?;
                absent.push(kek);
            }
        }
    }
    for kek in absent {
        let check = kek.check_value().map_err(|source| Error::KekCheck {
            kek_id: kek.id().to_owned(),
            source,
        })?;
        if store.insert_kek_check_if_absent(kek.id(), &check)? {
            tracing::info!(kek = kek.id(), format = %check.format, "stored the KEK's check value");
            continue;
        }
        // Another process stored one meanwhile: verify against the winner.
        let winner = store.kek_check(kek.id())?.ok_or_else(|| {
            Error::store(
                "reading a KEK check value",
                format!(
                    "the check value of KEK {:?} was neither stored nor found",
                    kek.id()
                ),
            )
        })?;
        verify(kek, &winner)?;
    }
    Ok(())
}

fn verify(kek: &dyn KeyEncryptionKey, check: &KekCheck) -> Result<()> {
    let matches = kek
        .verify_check_value(check)
        .map_err(|source| Error::KekCheck {
            kek_id: kek.id().to_owned(),
            source,
        })?;
    if matches {
        return Ok(());
    }
    let reason = format!(
        "it does not verify against the check value stored for it in kek_check_values \
         (form {:?}: local-hmac-v1 is a local master key's, kms-canary-v1 a KMS key's)",
        check.format
    );
    Err(Error::KekMismatch {
        kek_id: kek.id().to_owned(),
        reason,
    })
}

/// A KEK id without a check value: if data keys are stored under it, the
/// KEK must open every one of those tried. A store from before check values
/// may hold keys that a misconfigured process wrapped under the same id with
/// another key: pinning a key that opens only some of them would orphan the
/// rest, so such a store is refused and the operator decides which key is
/// right.
fn verify_legacy(store: &dyn KeyStore, kek: &dyn KeyEncryptionKey) -> Result<()> {
    let rows = store.keys_page(Some(kek.id()), None, None, LEGACY_SAMPLE)?;
    let mut refused = Vec::new();
    for row in &rows {
        let opens = kek
            .opens(&row.owner_id, row.version, &row.wrapped_key)
            .map_err(|source| Error::KekCheck {
                kek_id: kek.id().to_owned(),
                source,
            })?;
        if !opens {
            refused.push(format!("owner {:?}, version {}", row.owner_id, row.version));
        }
    }
    if refused.is_empty() {
        return Ok(());
    }
    Err(Error::KekMismatch {
        kek_id: kek.id().to_owned(),
        reason: format!(
            "it has no check value yet, and {} of the {} data key row(s) stored under it \
             that were tried do not open with it ({})",
            refused.len(),
            rows.len(),
            refused.join("; ")
        ),
    })
}
