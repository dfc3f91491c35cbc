//! [`KekSpec`]: a KEK named in configuration text, `local:ID` or
//! `aws-kms:KEY`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use super::{KeyEncryptionKey, LocalKek, MASTER_KEY_ENV, MASTER_KEY_FILE_ENV};
use crate::error::Error;

/// Environment variable naming the KEK that wraps new data keys, as a
/// [`KekSpec`] (`local:ID` or `aws-kms:KEY`).
pub const KEK_ENV: &str = "PHI_KEK";

/// Environment variable holding the id of the KEK over the local master key
/// (`PHI_MASTER_KEY` / `PHI_MASTER_KEY_FILE`) when [`KEK_ENV`] does not name
/// one; default [`DEFAULT_LOCAL_KEK_ID`].
pub const KEK_ID_ENV: &str = "PHI_KEK_ID";

/// The id of the local master key's KEK when none is configured.
pub const DEFAULT_LOCAL_KEK_ID: &str = "local-1";

/// The accepted forms, for error messages.
const FORMS: &str = "expected local:ID (the master key in PHI_MASTER_KEY or PHI_MASTER_KEY_FILE, \
                     KEK id ID) or aws-kms:KEY (an AWS KMS key id, key ARN, alias/NAME or alias ARN)";

/// A key encryption key as configuration names it: `local:ID` or
/// `aws-kms:KEY`, the form of `PHI_KEK` and of the `phi` command's `--kek`
/// and `keys rewrap --to`.
///
/// [`FromStr`] parses the text and [`Display`](fmt::Display) writes it back;
/// [`build`](Self::build) makes the KEK.
///
/// ```
/// use phi_types::KekSpec;
///
/// let spec: KekSpec = "local:local-2".parse()?;
/// assert_eq!(spec, KekSpec::Local { id: "local-2".into() });
/// assert_eq!(spec.to_string(), "local:local-2");
/// assert_eq!(spec.kek_id(), "local-2");
///
/// let error = "locl:local-2".parse::<KekSpec>().unwrap_err();
/// assert!(error.to_string().contains("expected local:ID"));
/// # Ok::<(), phi_types::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KekSpec {
    /// `local:ID`: a [`LocalKek`] with id `id` over the master key in
    /// `PHI_MASTER_KEY` (base64) or the file named by `PHI_MASTER_KEY_FILE`.
    Local {
        /// The KEK id recorded with the keys it wraps.
        id: String,
    },
    /// `aws-kms:KEY`: an `AwsKmsKek` over the KMS key `key` (a key id, key
    /// ARN, `alias/NAME` or alias ARN), configured from the AWS environment
    /// (`AWS_REGION`, `AWS_PROFILE` or role credentials, `AWS_ENDPOINT_URL`);
    /// KEK id `aws-kms:KEY`. Needs the `aws-kms` feature.
    AwsKms {
        /// The KMS key as configured.
        key: String,
    },
}

impl KekSpec {
    /// The id recorded in `user_encryption_keys.kek_id` for the keys this
    /// KEK wraps: `ID` for `local:ID`, the whole text for `aws-kms:KEY`.
    pub fn kek_id(&self) -> String {
        match self {
            KekSpec::Local { id } => id.clone(),
            KekSpec::AwsKms { .. } => self.to_string(),
        }
    }

    /// Makes the KEK: for `local:ID`, [`LocalKek::from_env`] (the master key
    /// from `PHI_MASTER_KEY` or `PHI_MASTER_KEY_FILE`); for `aws-kms:KEY`,
    /// `AwsKmsKek::builder(KEY).build()` (the AWS environment; no KMS call
    /// is made here).
    ///
    /// # Errors
    /// [`Error::MasterKey`] naming the KEK id when no master key is in the
    /// environment or it is invalid; [`Error::Config`] when the AWS
    /// configuration cannot be loaded, or for `aws-kms` in a build without
    /// the `aws-kms` feature.
    pub fn build(&self) -> Result<Arc<dyn KeyEncryptionKey>, Error> {
        match self {
            KekSpec::Local { id } => Ok(Arc::new(LocalKek::from_env(id.as_str())?)),
            KekSpec::AwsKms { key } => aws_kek(key),
        }
    }

    /// Whether a local master key is in the environment (`PHI_MASTER_KEY`
    /// or `PHI_MASTER_KEY_FILE` set), i.e. whether `local:ID` can be built.
    pub fn master_key_in_env() -> bool {
        std::env::var_os(MASTER_KEY_ENV).is_some()
            || std::env::var_os(MASTER_KEY_FILE_ENV).is_some()
    }
}

#[cfg(feature = "aws-kms")]
fn aws_kek(key: &str) -> Result<Arc<dyn KeyEncryptionKey>, Error> {
    Ok(Arc::new(super::AwsKmsKek::builder(key).build()?))
}

#[cfg(not(feature = "aws-kms"))]
fn aws_kek(key: &str) -> Result<Arc<dyn KeyEncryptionKey>, Error> {
    Err(no_aws(key))
}

/// The refusal of `aws-kms:KEY` in a build without the provider.
#[cfg(not(feature = "aws-kms"))]
fn no_aws(key: &str) -> Error {
    Error::Config(format!(
        "KEK \"aws-kms:{key}\": the AWS KMS provider is not built in: enable phi-types' \
         `aws-kms` feature (for the `phi` command, build it with `--features aws-kms`)"
    ))
}

impl FromStr for KekSpec {
    type Err = Error;

    /// Parses `local:ID` or `aws-kms:KEY`.
    ///
    /// # Errors
    /// [`Error::Config`] naming the text and the accepted forms; for
    /// `aws-kms:KEY` in a build without the `aws-kms` feature, naming the
    /// feature to enable.
    fn from_str(text: &str) -> Result<Self, Error> {
        let invalid = |what: &str| Error::Config(format!("KEK {text:?}: {what}; {FORMS}"));
        let Some((provider, name)) = text.split_once(':') else {
            return Err(invalid("no provider"));
        };
        if name.is_empty() {
            return Err(invalid("the id after the provider is empty"));
        }
        if name.trim() != name {
            return Err(invalid("the id has surrounding whitespace"));
        }
        match provider {
            "local" => Ok(KekSpec::Local {
                id: name.to_owned(),
            }),
            #[cfg(feature = "aws-kms")]
            "aws-kms" => Ok(KekSpec::AwsKms {
                key: name.to_owned(),
            }),
            #[cfg(not(feature = "aws-kms"))]
            "aws-kms" => Err(no_aws(name)),
            other => Err(invalid(&format!("unknown provider {other:?}"))),
        }
    }
}

impl fmt::Display for KekSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KekSpec::Local { id } => write!(f, "local:{id}"),
            KekSpec::AwsKms { key } => write!(f, "aws-kms:{key}"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails on the first unexpected error
mod tests {
    use super::*;

    #[test]
    fn parses_and_writes_back_each_form() {
        let spec: KekSpec = "local:kek-2026-12".parse().unwrap();
        assert_eq!(
            spec,
            KekSpec::Local {
                id: "kek-2026-12".into()
            }
        );
        assert_eq!(spec.to_string(), "local:kek-2026-12");
        assert_eq!(spec.kek_id(), "kek-2026-12");
        // An id may hold a colon.
        let spec: KekSpec = "local:a:b".parse().unwrap();
        assert_eq!(spec, KekSpec::Local { id: "a:b".into() });
        let aws = KekSpec::AwsKms {
            key: "alias/phi-prod".into(),
        };
        assert_eq!(aws.to_string(), "aws-kms:alias/phi-prod");
        assert_eq!(aws.kek_id(), "aws-kms:alias/phi-prod");
    }

    #[test]
    fn an_unusable_text_is_refused_naming_it_and_the_forms() {
        for (text, why) in [
            ("local-1", "no provider"),
            ("local:", "the id after the provider is empty"),
            ("aws-kms:", "the id after the provider is empty"),
            ("local: x", "surrounding whitespace"),
            ("gcp-kms:key", "unknown provider \"gcp-kms\""),
            ("", "no provider"),
        ] {
            let error = text.parse::<KekSpec>().unwrap_err();
            let message = error.to_string();
            assert!(matches!(error, Error::Config(_)), "{text:?}: {error:?}");
            assert!(message.contains(&format!("KEK {text:?}")), "{message}");
            assert!(message.contains(why), "{text:?}: {message}");
            assert!(
                message.contains("expected local:ID") && message.contains("aws-kms:KEY"),
                "{message}"
            );
        }
    }

    #[cfg(feature = "aws-kms")]
    #[test]
    fn aws_kms_parses_with_the_feature() {
        let spec: KekSpec = "aws-kms:arn:aws:kms:eu-west-1:111122223333:alias/phi"
            .parse()
            .unwrap();
        assert_eq!(
            spec,
            KekSpec::AwsKms {
                key: "arn:aws:kms:eu-west-1:111122223333:alias/phi".into()
            }
        );
        assert_eq!(
            spec.to_string(),
            "aws-kms:arn:aws:kms:eu-west-1:111122223333:alias/phi"
        );
    }

    #[cfg(not(feature = "aws-kms"))]
    #[test]
    fn aws_kms_without_the_feature_names_the_feature() {
        let message = "aws-kms:alias/phi"
            .parse::<KekSpec>()
            .unwrap_err()
            .to_string();
        assert!(message.contains("aws-kms:alias/phi"), "{message}");
        assert!(message.contains("`aws-kms` feature"), "{message}");
        let built = KekSpec::AwsKms {
            key: "alias/phi".into(),
        }
        .build()
        .unwrap_err();
        assert!(built.to_string().contains("`aws-kms` feature"), "{built}");
    }
}
