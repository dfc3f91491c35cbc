//! [`KeyringConfig`]: which KEKs a keyring uses, read from the environment.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::{Keyring, KeyringBuilder};
use crate::error::{Error, Result};
use crate::kek::{
    DEFAULT_LOCAL_KEK_ID, KEK_ENV, KEK_ID_ENV, KekSpec, KeyEncryptionKey, LocalKek, MASTER_KEY_ENV,
    MASTER_KEY_FILE_ENV,
};
use crate::store::KeyStore;

/// Where the local master key comes from.
enum MasterKey {
    /// `PHI_MASTER_KEY`: the base64 key itself.
    Base64(Zeroizing<String>),
    /// `PHI_MASTER_KEY_FILE`: a file holding it.
    File(PathBuf),
}

/// The KEKs of a keyring as the environment configures them: the one that
/// wraps new data keys and the older ones that still unwrap.
///
/// | variable | meaning |
/// |---|---|
/// | `PHI_KEK` | the KEK that wraps new data keys, a [`KekSpec`]: `local:ID` or `aws-kms:KEY` (default `local:<PHI_KEK_ID>`) |
/// | `PHI_KEK_ID` | the id of the local master key's KEK (default `local-1`) |
/// | `PHI_MASTER_KEY` | the local master key, base64 of 32 bytes |
/// | `PHI_MASTER_KEY_FILE` | a private file holding it (read when `PHI_MASTER_KEY` is unset) |
///
/// When `PHI_KEK` names an AWS KMS key and a local master key is configured
/// as well, the local key's KEK (id `PHI_KEK_ID`) stays as an older one: data
/// keys it wrapped before the move to the KMS keep opening until
/// `phi keys rewrap --to aws-kms:KEY` has moved them, after which the local
/// key can be removed from the environment.
///
/// ```no_run
/// use phi_types::{DieselKeyStore, Keyring, KeyringConfig};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let url = "";
/// let store = DieselKeyStore::<diesel::SqliteConnection>::connect(url)?;
/// // PHI_MASTER_KEY_FILE=/run/secrets/phi-master.key, or PHI_KEK=aws-kms:alias/phi-prod
/// let keyring = KeyringConfig::from_env()?.builder(store)?.build()?;
/// // The same with the builder's defaults:
/// # let store = DieselKeyStore::<diesel::SqliteConnection>::connect(url)?;
/// let keyring = Keyring::from_env(store)?;
/// # Ok(()) }
/// ```
pub struct KeyringConfig {
    /// The KEK named by `PHI_KEK` (or the caller), if any.
    kek: Option<KekSpec>,
    /// The local master key's KEK id.
    local_kek_id: String,
    /// The local master key, if configured.
    master_key: Option<MasterKey>,
}

impl fmt::Debug for KeyringConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let master_key = match &self.master_key {
            None => "none",
            Some(MasterKey::Base64(_)) => MASTER_KEY_ENV,
            Some(MasterKey::File(_)) => MASTER_KEY_FILE_ENV,
        };
        f.debug_struct("KeyringConfig")
            .field("kek", &self.kek_spec().to_string())
            .field("local_kek_id", &self.local_kek_id)
            .field("master_key", &master_key)
            .finish()
    }
}

impl KeyringConfig {
    /// Reads `PHI_KEK`, `PHI_KEK_ID`, `PHI_MASTER_KEY` and
    /// `PHI_MASTER_KEY_FILE` (see the [type's documentation](Self)). An
    /// empty variable counts as unset. Nothing is read from the master key
    /// file or the KMS until [`keks`](Self::keks).
    ///
    /// # Errors
    /// [`Error::Config`] when `PHI_KEK` is not a [`KekSpec`] (naming its
    /// text and the accepted forms) or a variable is not UTF-8.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var_os(name))
    }

    /// [`from_env`](Self::from_env), with `kek` and `local_kek_id` in the
    /// place of `PHI_KEK` and `PHI_KEK_ID` when given (a command's `--kek`
    /// and `--kek-id`); the master key still comes from the environment.
    ///
    /// # Errors
    /// As [`from_env`](Self::from_env).
    pub fn from_env_with(kek: Option<KekSpec>, local_kek_id: Option<&str>) -> Result<Self> {
        let mut config = Self::from_vars(|name| match name {
            KEK_ENV if kek.is_some() => None,
            KEK_ID_ENV if local_kek_id.is_some() => None,
            _ => std::env::var_os(name),
        })?;
        if let Some(kek) = kek {
            config.kek = Some(kek);
        }
        if let Some(id) = local_kek_id {
            config.local_kek_id = id.to_owned();
        }
        Ok(config)
    }

    /// [`from_env`](Self::from_env) with each variable's value from `vars`
    /// (`None`: unset): for a configuration kept elsewhere than in the
    /// process environment, and for tests.
    ///
    /// ```
    /// use phi_types::{KekSpec, KeyringConfig};
    ///
    /// let config = KeyringConfig::from_vars(|name| match name {
    ///     "PHI_KEK" => Some("aws-kms:alias/phi-prod".into()),
    ///     "PHI_MASTER_KEY" => Some("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into()),
    ///     _ => None,
    /// });
    /// # #[cfg(feature = "aws-kms")] {
    /// let config = config?;
    /// assert_eq!(config.kek_spec(), KekSpec::AwsKms { key: "alias/phi-prod".into() });
    /// // The local master key still unwraps the keys it wrapped.
    /// assert_eq!(config.older_specs(), [KekSpec::Local { id: "local-1".into() }]);
    /// # }
    /// # Ok::<(), phi_types::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`from_env`](Self::from_env).
    pub fn from_vars(vars: impl Fn(&str) -> Option<OsString>) -> Result<Self> {
        let text = |name: &str| -> Result<Option<String>> {
            match vars(name) {
                None => Ok(None),
                Some(value) if value.is_empty() => Ok(None),
                Some(value) => value
                    .into_string()
                    .map(Some)
                    .map_err(|_| Error::Config(format!("{name} is not UTF-8"))),
            }
        };
        let kek = text(KEK_ENV)?
            .map(|spec| {
                spec.parse::<KekSpec>()
                    .map_err(|e| Error::Config(format!("{KEK_ENV}: {}", config_text(e))))
            })
            .transpose()?;
        let local_kek_id = text(KEK_ID_ENV)?.unwrap_or_else(|| DEFAULT_LOCAL_KEK_ID.to_owned());
        let master_key = match text(MASTER_KEY_ENV)? {
            Some(key) => Some(MasterKey::Base64(Zeroizing::new(key))),
            None => vars(MASTER_KEY_FILE_ENV)
                .filter(|path| !path.is_empty())
                .map(|path| MasterKey::File(path.into())),
        };
        Ok(KeyringConfig {
            kek,
            local_kek_id,
            master_key,
        })
    }

    /// The KEK that wraps new data keys: `PHI_KEK`'s, else
    /// `local:<PHI_KEK_ID>`.
    pub fn kek_spec(&self) -> KekSpec {
        self.kek.clone().unwrap_or_else(|| KekSpec::Local {
            id: self.local_kek_id.clone(),
        })
    }

    /// The older KEKs that still unwrap: the local master key's
    /// (`local:<PHI_KEK_ID>`) when new keys are wrapped by a KMS and a local
    /// master key is configured. (With `PHI_KEK=local:ID` the master key is
    /// that KEK's, and no other id is given to it.)
    pub fn older_specs(&self) -> Vec<KekSpec> {
        match self.kek_spec() {
            KekSpec::Local { .. } => Vec::new(),
            _ if self.master_key.is_none() => Vec::new(),
            _ => vec![KekSpec::Local {
                id: self.local_kek_id.clone(),
            }],
        }
    }

    /// Whether anything is configured: a KEK named (`PHI_KEK`) or a local
    /// master key present. An application may fall back to a development
    /// key when nothing is; without one the local KEK of
    /// [`keks`](Self::keks) fails naming the missing variables.
    pub fn is_configured(&self) -> bool {
        self.kek.is_some() || self.master_key.is_some()
    }

    /// Makes the KEKs: the one that wraps new data keys, and the older ones
    /// ([`older_specs`](Self::older_specs)).
    ///
    /// # Errors
    /// [`Error::MasterKey`] naming the KEK id when a local KEK has no
    /// master key (neither variable set), an unreadable or non-private
    /// file, or a key that is not base64 of 32 bytes; [`Error::Config`] for
    /// an AWS KMS key when the AWS configuration cannot be loaded or the
    /// `aws-kms` feature is off.
    #[allow(clippy::type_complexity)] // the KEK and the older ones, as the builder takes them
    pub fn keks(&self) -> Result<(Arc<dyn KeyEncryptionKey>, Vec<Arc<dyn KeyEncryptionKey>>)> {
        let primary = self.build(&self.kek_spec())?;
        let older = self
            .older_specs()
            .iter()
            .map(|spec| self.build(spec))
            .collect::<Result<Vec<_>>>()?;
        Ok((primary, older))
    }

    /// A [`Keyring::builder`] over `store` with these KEKs (the older ones
    /// through [`KeyringBuilder::unwrap_with`]), for further options.
    ///
    /// # Errors
    /// As [`keks`](Self::keks).
    pub fn builder(&self, store: impl crate::IntoShared<dyn KeyStore>) -> Result<KeyringBuilder> {
        let (primary, older) = self.keks()?;
        Ok(older.into_iter().fold(
            Keyring::builder(store, primary),
            KeyringBuilder::unwrap_with,
        ))
    }

    /// One KEK, the local one over this configuration's master key.
    fn build(&self, spec: &KekSpec) -> Result<Arc<dyn KeyEncryptionKey>> {
        let KekSpec::Local { id } = spec else {
            return spec.build();
        };
        let kek = match &self.master_key {
            Some(MasterKey::Base64(key)) => LocalKek::from_base64(id.as_str(), key)?,
            Some(MasterKey::File(path)) => LocalKek::from_file(id.as_str(), path)?,
            None => {
                return Err(Error::MasterKey {
                    kek_id: id.clone(),
                    reason: format!(
                        "neither {MASTER_KEY_ENV} nor {MASTER_KEY_FILE_ENV} is set \
                         (or set {KEK_ENV}=aws-kms:KEY)"
                    ),
                });
            }
        };
        Ok(Arc::new(kek))
    }
}

/// The text of a configuration error without its "invalid phi
/// configuration" prefix, to be wrapped in another.
fn config_text(error: Error) -> String {
    match error {
        Error::Config(text) => text,
        other => other.to_string(),
    }
}

impl Keyring {
    /// A keyring over `store` with the KEKs the environment configures
    /// ([`KeyringConfig::from_env`]: `PHI_KEK`, `PHI_KEK_ID`,
    /// `PHI_MASTER_KEY`, `PHI_MASTER_KEY_FILE`) and the builder's defaults.
    /// For other options, `KeyringConfig::from_env()?.builder(store)?`.
    ///
    /// # Errors
    /// As [`KeyringConfig::from_env`], [`KeyringConfig::keks`] and
    /// [`KeyringBuilder::build`].
    pub fn from_env(store: impl crate::IntoShared<dyn KeyStore>) -> Result<Keyring> {
        KeyringConfig::from_env()?.builder(store)?.build()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails on the first unexpected error
mod tests {
    use super::*;

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn vars<'a>(set: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| {
            set.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| OsString::from(*v))
        }
    }

    #[test]
    fn nothing_set_is_local_1_without_a_key() {
        let config = KeyringConfig::from_vars(vars(&[])).unwrap();
        assert!(!config.is_configured());
        assert_eq!(
            config.kek_spec(),
            KekSpec::Local {
                id: "local-1".into()
            }
        );
        assert!(config.older_specs().is_empty());
        let error = config.keks().unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, Error::MasterKey { ref kek_id, .. } if kek_id == "local-1"));
        assert!(message.contains("PHI_MASTER_KEY") && message.contains("PHI_MASTER_KEY_FILE"));
    }

    #[test]
    fn a_bad_phi_kek_names_the_variable_its_text_and_the_forms() {
        let message = KeyringConfig::from_vars(vars(&[("PHI_KEK", "locale:x")]))
            .unwrap_err()
            .to_string();
        assert!(message.contains("PHI_KEK: KEK \"locale:x\""), "{message}");
        assert!(message.contains("unknown provider \"locale\""), "{message}");
        assert!(message.contains("expected local:ID"), "{message}");
    }

    #[test]
    fn the_master_key_wraps_under_phi_kek_id() {
        let config =
            KeyringConfig::from_vars(vars(&[("PHI_MASTER_KEY", KEY), ("PHI_KEK_ID", "kek-2")]))
                .unwrap();
        assert!(config.is_configured());
        let (primary, older) = config.keks().unwrap();
        assert_eq!(primary.id(), "kek-2");
        assert!(older.is_empty());
        // The key never shows in Debug.
        let debug = format!("{config:?}");
        assert!(
            !debug.contains(KEY) && debug.contains("PHI_MASTER_KEY"),
            "{debug}"
        );
    }

    #[test]
    fn an_explicit_kek_takes_the_place_of_phi_kek() {
        let config =
            KeyringConfig::from_vars(vars(&[("PHI_KEK", "local:named"), ("PHI_MASTER_KEY", KEY)]))
                .unwrap();
        assert_eq!(config.kek_spec(), KekSpec::Local { id: "named".into() });
        // The master key is that KEK's: it is not given PHI_KEK_ID's id too.
        let (primary, older) = config.keks().unwrap();
        assert_eq!(primary.id(), "named");
        assert!(older.is_empty());
        let config = KeyringConfig::from_vars(vars(&[("PHI_KEK", "local:env")])).unwrap();
        assert_eq!(config.kek_spec(), KekSpec::Local { id: "env".into() });
    }

    #[test]
    fn a_master_key_file_is_read_when_the_kek_is_built() {
        let dir = std::env::temp_dir().join(format!("phi-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("master.key");
        let _ = std::fs::remove_file(&path);
        let config = KeyringConfig::from_vars(|name| {
            (name == "PHI_MASTER_KEY_FILE").then(|| path.clone().into_os_string())
        })
        .unwrap();
        assert!(config.is_configured());
        // Not there yet: the error names the KEK id.
        let error = config.keks().unwrap_err();
        assert!(
            matches!(error, Error::MasterKey { ref kek_id, .. } if kek_id == "local-1"),
            "{error}"
        );
        write_private(&path, KEY);
        let (primary, older) = config.keks().unwrap();
        assert_eq!(primary.id(), "local-1");
        assert!(older.is_empty());
        // The KEK is the file's key: it unwraps what LocalKek over the same
        // key wrapped.
        let same = LocalKek::from_base64("local-1", KEY).unwrap();
        let dek = crate::dek::KeyBytes::new([9; 32]);
        let wrapped = same.wrap("owner-1", 1, &dek).unwrap();
        assert_eq!(
            primary.unwrap("owner-1", 1, &wrapped).unwrap().expose(),
            dek.expose()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    fn write_private(path: &std::path::Path, text: &str) {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .unwrap();
        file.write_all(text.as_bytes()).unwrap();
    }

    #[cfg(not(unix))]
    fn write_private(path: &std::path::Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    #[cfg(feature = "aws-kms")]
    #[test]
    fn a_kms_kek_keeps_the_local_master_key_as_an_older_unwrapper() {
        let with_key = KeyringConfig::from_vars(vars(&[
            ("PHI_KEK", "aws-kms:alias/phi"),
            ("PHI_KEK_ID", "local-7"),
            ("PHI_MASTER_KEY", KEY),
        ]))
        .unwrap();
        assert_eq!(
            with_key.kek_spec(),
            KekSpec::AwsKms {
                key: "alias/phi".into()
            }
        );
        assert_eq!(
            with_key.older_specs(),
            [KekSpec::Local {
                id: "local-7".into()
            }]
        );
        let without = KeyringConfig::from_vars(vars(&[("PHI_KEK", "aws-kms:alias/phi")])).unwrap();
        assert!(without.older_specs().is_empty());
    }
}
