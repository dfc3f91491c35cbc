//! A KEK held in process memory: AES-256-GCM under a 256-bit master key.

use std::fmt;
use std::path::Path;

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{KekCheck, KeyEncryptionKey};
use crate::dek::KeyBytes;
use crate::error::{BoxError, Error};

/// Environment variable holding the base64 master key.
pub const MASTER_KEY_ENV: &str = "PHI_MASTER_KEY";
/// Environment variable naming a file that holds the base64 master key.
pub const MASTER_KEY_FILE_ENV: &str = "PHI_MASTER_KEY_FILE";

/// Format of a [`LocalKek`]'s check value (`kek_check_values.format`).
pub const CHECK_FORMAT_LOCAL: &str = "local-hmac-v1";

const AAD_LABEL: &[u8] = b"phi-dek-v1";
const WRAPPED_LEN: usize = 12 + 32 + 16;
/// HKDF info and HMAC label of the check value.
const CHECK_LABEL: &[u8] = b"phi-kek-check-v1";

/// A local key encryption key: a 256-bit master key in memory.
///
/// Wrapped data keys are `nonce(12) ‖ ciphertext(32) ‖ tag(16)`, AES-256-GCM
/// under the master key with associated data
/// `"phi-dek-v1" ‖ u16be(len kek_id) ‖ kek_id ‖ u16be(len owner) ‖ owner ‖ u32be(version)`.
///
/// Meant for development, tests and deployments without a KMS: the master
/// key is only as safe as the environment or file it is read from.
///
/// Its check value (format `local-hmac-v1`, see
/// [`KeyEncryptionKey::check_value`]) is
/// `HMAC-SHA256(HKDF-SHA256(ikm = master key, salt = empty, info =
/// "phi-kek-check-v1"), "phi-kek-check-v1" ‖ u16be(len kek_id) ‖ kek_id)`,
/// 32 bytes: one-way, it reveals nothing of the key.
///
/// ```
/// use phi_types::LocalKek;
/// let kek = LocalKek::from_base64("local-1", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")?;
/// # Ok::<(), phi_types::Error>(())
/// ```
pub struct LocalKek {
    id: String,
    cipher: Aes256Gcm,
    check: [u8; 32],
}

impl LocalKek {
    /// A KEK with id `id` over the given master key.
    pub fn new(id: impl Into<String>, master_key: &KeyBytes) -> Self {
        let id = id.into();
        let check = check_value(&id, master_key);
        LocalKek {
            id,
            cipher: Aes256Gcm::new(master_key.expose().into()),
            check,
        }
    }

    /// A KEK over a base64-encoded 32-byte master key (surrounding
    /// whitespace ignored).
    ///
    /// # Errors
    /// [`Error::MasterKey`] when the text is not base64 of exactly 32 bytes.
    pub fn from_base64(id: impl Into<String>, encoded: &str) -> Result<Self, Error> {
        let id = id.into();
        match decode_master_key(encoded) {
            Ok(key) => Ok(LocalKek::new(id, &key)),
            Err(reason) => Err(Error::MasterKey { kek_id: id, reason }),
        }
    }

    /// A KEK over the master key in the file at `path` (base64 text).
    ///
    /// On Unix the file must be private: owned by the user the process runs
    /// as, with no permission for its group or others (mode `0600` or
    /// `0400`). Create one with `phi master-key generate --out FILE` (or
    /// `(umask 077; openssl rand -base64 32 > FILE)`), or fix one with
    /// `chmod 600 FILE`.
    ///
    /// # Errors
    /// [`Error::MasterKey`] when the file cannot be read, is readable or
    /// writable by others or owned by another user, or does not hold a
    /// base64 master key.
    pub fn from_file(id: impl Into<String>, path: impl AsRef<Path>) -> Result<Self, Error> {
        let id = id.into();
        match read_master_key_file(path.as_ref()) {
            Ok(key) => Ok(LocalKek::new(id, &key)),
            Err(reason) => Err(Error::MasterKey { kek_id: id, reason }),
        }
    }

    /// A KEK over the master key in `PHI_MASTER_KEY` (base64), or else in the
    /// file named by `PHI_MASTER_KEY_FILE`.
    ///
    /// # Errors
    /// [`Error::MasterKey`] when neither variable is set or the key is invalid.
    pub fn from_env(id: impl Into<String>) -> Result<Self, Error> {
        let id = id.into();
        if let Ok(value) = std::env::var(MASTER_KEY_ENV) {
            let value = Zeroizing::new(value);
            return LocalKek::from_base64(id, &value);
        }
        if let Some(path) = std::env::var_os(MASTER_KEY_FILE_ENV) {
            return LocalKek::from_file(id, path);
        }
        Err(Error::MasterKey {
            kek_id: id,
            reason: format!("neither {MASTER_KEY_ENV} nor {MASTER_KEY_FILE_ENV} is set"),
        })
    }

    /// A fresh random master key, base64-encoded: what to put in
    /// `PHI_MASTER_KEY` or a key file.
    ///
    /// # Errors
    /// The operating system's random source failed.
    pub fn generate_master_key_base64() -> Result<Zeroizing<String>, getrandom::Error> {
        let key = KeyBytes::generate()?;
        Ok(Zeroizing::new(STANDARD.encode(key.expose())))
    }

    fn aad(&self, owner: &str, version: u32) -> Result<Vec<u8>, BoxError> {
        let id_len = u16::try_from(self.id.len()).map_err(|_| "KEK id longer than 65,535 bytes")?;
        let owner_len =
            u16::try_from(owner.len()).map_err(|_| "owner id longer than 65,535 bytes")?;
        let mut aad = Vec::with_capacity(AAD_LABEL.len() + 8 + self.id.len() + owner.len());
        aad.extend_from_slice(AAD_LABEL);
        aad.extend_from_slice(&id_len.to_be_bytes());
        aad.extend_from_slice(self.id.as_bytes());
        aad.extend_from_slice(&owner_len.to_be_bytes());
        aad.extend_from_slice(owner.as_bytes());
        aad.extend_from_slice(&version.to_be_bytes());
        Ok(aad)
    }
}

/// A master key from its text form: base64 of exactly 32 bytes, surrounding
/// whitespace ignored. The error says what is wrong, never the key.
pub(crate) fn decode_master_key(encoded: &str) -> Result<KeyBytes, String> {
    let bytes = Zeroizing::new(
        STANDARD
            .decode(encoded.trim())
            .map_err(|_| "not valid base64".to_owned())?,
    );
    KeyBytes::from_slice(&bytes).ok_or_else(|| {
        format!(
            "decodes to {} bytes, a master key is exactly 32",
            bytes.len()
        )
    })
}

/// The master key in the file at `path` (base64 text), the file refused on
/// Unix unless private to this user (see [`LocalKek::from_file`]).
pub(crate) fn read_master_key_file(path: &Path) -> Result<KeyBytes, String> {
    use std::io::Read as _;
    let cannot_read = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    // One open: the permissions checked are those of the file read.
    let mut file = std::fs::File::open(path).map_err(cannot_read)?;
    #[cfg(unix)]
    {
        let meta = file.metadata().map_err(cannot_read)?;
        private_file(path, &meta)?;
    }
    let mut text = Zeroizing::new(String::new());
    file.read_to_string(&mut text).map_err(cannot_read)?;
    decode_master_key(&text)
}

/// The check value of a local KEK: see [`LocalKek`].
fn check_value(id: &str, master_key: &KeyBytes) -> [u8; 32] {
    let mut key = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's 8,160-byte limit.
    let expanded = Hkdf::<Sha256>::new(None, master_key.expose()).expand(CHECK_LABEL, &mut key[..]);
    debug_assert!(expanded.is_ok());
    let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&key[..])
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    // A KEK id longer than 65,535 bytes cannot wrap anything (see `aad`);
    // its check value is still defined, with the length saturated.
    let id_len = u16::try_from(id.len()).unwrap_or(u16::MAX);
    mac.update(CHECK_LABEL);
    mac.update(&id_len.to_be_bytes());
    mac.update(id.as_bytes());
    mac.finalize().into_bytes().into()
}

/// Refuses a key file that others may read or change, or that belongs to
/// another user; the reason says how to fix it.
#[cfg(unix)]
fn private_file(path: &Path, meta: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is accessible to its group or others (mode {mode:03o}); a master key file must \
             be private: run `chmod 600 {}` (and create key files with \
             `phi master-key generate --out FILE` or `(umask 077; openssl rand -base64 32 > FILE)`)",
            path.display(),
            path.display()
        ));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(format!(
            "{} is owned by user id {}, not by the user this process runs as ({me}); a master \
             key file must belong to that user: `chown` it to them and `chmod 600` it",
            path.display(),
            meta.uid()
        ));
    }
    Ok(())
}

impl KeyEncryptionKey for LocalKek {
    fn id(&self) -> &str {
        &self.id
    }

    fn check_value(&self) -> Result<KekCheck, BoxError> {
        Ok(KekCheck::new(CHECK_FORMAT_LOCAL, self.check.to_vec()))
    }

    fn verify_check_value(&self, check: &KekCheck) -> Result<bool, BoxError> {
        Ok(check.format == CHECK_FORMAT_LOCAL && check.value.as_slice() == self.check.as_slice())
    }

    fn wrap(&self, owner: &str, version: u32, key: &KeyBytes) -> Result<Vec<u8>, BoxError> {
        let aad = self.aad(owner, version)?;
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce)?;
        let mut out = Vec::with_capacity(WRAPPED_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(key.expose());
        let tag = self
            .cipher
            .encrypt_inout_detached(&Nonce::from(nonce), &aad, (&mut out[12..]).into())
            .map_err(|_| "AES-GCM refused to wrap the key")?;
        out.extend_from_slice(tag.as_slice());
        Ok(out)
    }

    fn unwrap(&self, owner: &str, version: u32, wrapped: &[u8]) -> Result<KeyBytes, BoxError> {
        if wrapped.len() != WRAPPED_LEN {
            return Err(format!(
                "wrapped key is {} bytes, a LocalKek wrap is {WRAPPED_LEN}",
                wrapped.len()
            )
            .into());
        }
        let aad = self.aad(owner, version)?;
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&wrapped[..12]);
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&wrapped[44..]);
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&wrapped[12..44]);
        self.cipher
            .decrypt_inout_detached(
                &Nonce::from(nonce),
                &aad,
                key.as_mut_slice().into(),
                &Tag::from(tag),
            )
            .map_err(
                |_| "wrapped key does not authenticate (another master key, owner or version)",
            )?;
        Ok(KeyBytes::new(*key))
    }
}

impl fmt::Debug for LocalKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalKek")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek(id: &str, byte: u8) -> LocalKek {
        LocalKek::new(id, &KeyBytes::new([byte; 32]))
    }

    #[test]
    fn wrap_round_trips_and_binds_owner_version_and_kek_id() {
        let a = kek("a", 1);
        let key = KeyBytes::new([9; 32]);
        let wrapped = a.wrap("u1", 3, &key).expect("wrap");
        assert_eq!(wrapped.len(), 60);
        assert_eq!(
            a.unwrap("u1", 3, &wrapped).expect("unwrap").expose(),
            &[9; 32]
        );
        assert!(a.unwrap("u2", 3, &wrapped).is_err());
        assert!(a.unwrap("u1", 4, &wrapped).is_err());
        assert!(kek("b", 1).unwrap("u1", 3, &wrapped).is_err());
        assert!(kek("a", 2).unwrap("u1", 3, &wrapped).is_err());
        assert!(a.unwrap("u1", 3, &wrapped[..59]).is_err());
    }

    #[test]
    fn wrap_layout_matches_the_contract() {
        // Re-open the wrap with a bare AES-GCM, building the AAD by hand.
        let a = kek("kek-1", 5);
        let wrapped = a.wrap("owner", 7, &KeyBytes::new([3; 32])).expect("wrap");
        let mut aad = b"phi-dek-v1".to_vec();
        aad.extend_from_slice(&[0, 5]);
        aad.extend_from_slice(b"kek-1");
        aad.extend_from_slice(&[0, 5]);
        aad.extend_from_slice(b"owner");
        aad.extend_from_slice(&7u32.to_be_bytes());
        let cipher = Aes256Gcm::new((&[5u8; 32]).into());
        let mut body = wrapped[12..44].to_vec();
        let nonce: [u8; 12] = wrapped[..12].try_into().expect("12");
        let tag: [u8; 16] = wrapped[44..].try_into().expect("16");
        cipher
            .decrypt_inout_detached(
                &Nonce::from(nonce),
                &aad,
                body.as_mut_slice().into(),
                &Tag::from(tag),
            )
            .expect("opens with the documented AAD");
        assert_eq!(body, vec![3; 32]);
    }

    #[test]
    fn bad_master_keys_name_the_problem_not_the_key() {
        let err = LocalKek::from_base64("k", "not base64!").expect_err("invalid");
        assert!(err.to_string().contains("not valid base64"), "{err}");
        let err = LocalKek::from_base64("k", "AAAA").expect_err("short");
        assert!(err.to_string().contains("3 bytes"), "{err}");
        let err = LocalKek::from_file("k", "/nonexistent/phi.key").expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/phi.key"), "{err}");
    }

    #[test]
    fn check_value_matches_the_contract_and_tells_keys_and_ids_apart() {
        // HMAC-SHA256(HKDF-SHA256(master, salt = empty, info = label),
        // label ‖ u16be(len id) ‖ id), by hand.
        let master = [5u8; 32];
        let mut derived = [0u8; 32];
        Hkdf::<Sha256>::new(None, &master)
            .expand(b"phi-kek-check-v1", &mut derived)
            .expect("hkdf");
        let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&derived).expect("hmac");
        mac.update(b"phi-kek-check-v1\x00\x05kek-1");
        let expected = mac.finalize().into_bytes().to_vec();

        let check = kek("kek-1", 5).check_value().expect("check value");
        assert_eq!(check.format, "local-hmac-v1");
        assert_eq!(check.value, expected);
        assert!(kek("kek-1", 5).verify_check_value(&check).expect("verify"));
        assert!(!kek("kek-1", 6).verify_check_value(&check).expect("verify"));
        assert!(!kek("kek-2", 5).verify_check_value(&check).expect("verify"));
        let other_kind = KekCheck::new("kms-canary-v1", check.value.clone());
        assert!(
            !kek("kek-1", 5)
                .verify_check_value(&other_kind)
                .expect("verify")
        );
        assert!(!format!("{check:?}").contains(&hex_of(&check.value)));
    }

    fn hex_of(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[cfg(unix)]
    #[test]
    fn a_key_file_others_can_read_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("master.key");
        std::fs::write(&path, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").expect("write");
        for mode in [0o644, 0o640, 0o604, 0o620, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let err = LocalKek::from_file("k", &path).expect_err("not private");
            let text = err.to_string();
            assert!(
                text.contains(&format!("mode {mode:03o}"))
                    && text.contains(&format!("chmod 600 {}", path.display()))
                    && text.contains("umask 077"),
                "{text}"
            );
            assert!(!text.contains("AAECAwQF"), "{text}");
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            LocalKek::from_file("k", &path).expect("a private file");
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_key_file_of_another_user_is_refused() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("master.key");
        std::fs::write(&path, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").expect("write");
        let me = rustix::process::geteuid().as_raw();
        assert_eq!(std::fs::metadata(&path).expect("stat").uid(), me);
        if me != 0 {
            // Only root can give a file away; the check is the same.
            eprintln!("not root: the ownership refusal is not exercised");
            return;
        }
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::os::unix::fs::chown(&path, Some(65534), None).expect("chown");
        let err = LocalKek::from_file("k", &path).expect_err("another user's file");
        let text = err.to_string();
        assert!(
            text.contains("owned by user id 65534") && text.contains("chown"),
            "{text}"
        );
    }

    #[test]
    fn debug_does_not_show_key_material() {
        let shown = format!("{:?}", kek("k", 0xAB));
        assert_eq!(shown, "LocalKek { id: \"k\", .. }");
    }
}
