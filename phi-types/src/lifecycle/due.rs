//! Which owners' data keys are due for rotation.

use crate::error::{Error, Result};
use crate::keyring::Keyring;

/// The owners whose current data key version is due for rotation under
/// the keyring's rotation policy.
///
/// # Errors
/// [`Error::Config`] when no rotation policy is configured.
pub fn due_owner_ids(keyring: &Keyring) -> Result<Vec<String>> {
    let _ = keyring;
    Err(Error::Config(
        "no rotation policy is configured: nothing is due (rotate --all, --owners-query or a list instead)"
            .into(),
    ))
}
