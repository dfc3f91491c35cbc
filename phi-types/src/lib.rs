//! Runtime of **phi**: transparent, owner-scoped encryption of protected
//! health information (PHI) for Diesel applications.
//!
//! Each owner (a user, provider or tenant) has data keys of its own, wrapped
//! by a key encryption key (a KMS master key, or a local one). Values are
//! sealed as [envelope v1](envelope) bytes under AES-256-GCM, bound to their
//! owner, their `table.column` and their row, and stored in ordinary binary
//! columns through [`Encrypted<T>`].
//!
//! ```
//! use std::sync::Arc;
//! use phi_types::{Keyring, LocalKek, MemoryKeyStore};
//!
//! // Development set-up: a master key from the environment or a file in
//! // production (`LocalKek::from_env`), a key store in the database
//! // (`DieselKeyStore`).
//! let kek = LocalKek::from_base64("local-1", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")?;
//! let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), Arc::new(kek)).build()?;
//!
//! let sealed = keyring.seal(&"Doe".to_string(), "provider-17", "cases.patient_last", b"C-1001")?;
//! // `sealed` goes into a Binary column; later, with the same binding:
//! let name: String = keyring.open(sealed, "provider-17", "cases.patient_last", b"C-1001")?;
//! assert_eq!(name, "Doe");
//!
//! // Bound to its owner: another owner's keys do not open it.
//! let other = keyring.seal(&"Roe".to_string(), "provider-18", "cases.patient_last", b"C-1001")?;
//! let err = keyring.open(other, "provider-17", "cases.patient_last", b"C-1001").unwrap_err();
//! assert!(err.to_string().contains("provider-17"));
//! # Ok::<(), phi_types::Error>(())
//! ```
//!
//! The [`lifecycle`] module rotates, re-seals, retires, rewraps and shreds
//! keys (the `phi` admin CLI drives it); [`metrics`] lists the metrics phi
//! records through the `metrics` facade.
//!
//! # Crate features
//!
//! `Encrypted<T>` itself works on every Diesel backend without a feature;
//! the backend features add the key store ([`DieselKeyStore`]) and the
//! embedded [`migrations`] for that backend.
//!
#![doc = document_features::document_features!()]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "admin-http")]
pub mod admin;
pub mod blind;
mod cipher;
mod connection;
mod dek;
pub mod envelope;
mod error;
pub mod feed;
mod kek;
mod keyring;
pub mod lifecycle;
pub mod lookup;
pub mod metrics;
pub mod migrate;
#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
pub mod migrations;
mod nonce;
pub mod record;
mod sealer;
mod sql;
mod store;
pub mod value;

pub use connection::PhiConnection;
pub use dek::{Dek, KeyBytes};
pub use envelope::{Binding, EnvelopeError, Header};
pub use error::{BoxError, Error, ErrorKind, Result};
#[cfg(feature = "async")]
pub use kek::KekFuture;
#[cfg(feature = "aws-kms")]
pub use kek::{
    AwsKmsError, AwsKmsErrorKind, AwsKmsKek, AwsKmsKekBuilder, AwsKmsStats, CONTEXT_DEK_VERSION,
    CONTEXT_KEK_CHECK, CONTEXT_OWNER, KMS_CALL_SECONDS, KMS_CALLS_TOTAL,
};
pub use kek::{
    CHECK_CANARY, CHECK_FORMAT_LOCAL, CHECK_FORMAT_WRAP, CHECK_OWNER, KekCheck, KeyEncryptionKey,
    LocalKek, MASTER_KEY_ENV, MASTER_KEY_FILE_ENV,
};
pub use keyring::{
    Clock, DEFAULT_AUDIT_QUEUE, DEFAULT_FEED_INTERVAL, DEFAULT_FEED_MAX_STALENESS,
    DEFAULT_MAX_OWNERS, DEFAULT_ROLLOUT_POLICY, DEFAULT_TTL, DEFAULT_UNKNOWN_VERSION_TTL,
    FeedStatus, Keyring, KeyringBuilder, KeyringStats, MAX_OWNER_LEN, ManualClock, OwnerKeys,
    SystemClock, WarmReport,
};
#[cfg(feature = "derive")]
#[doc(inline)]
pub use phi_derive::PhiRecord;
pub use record::{EncryptedFlag, OwnerId, PhiRecord, Rollout, RowKey, SealedRecord, Updated};
pub use sealer::{Sealer, with_sealer};
pub use sql::Encrypted;
#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
pub use store::DieselKeyStore;
pub use store::schema;
pub use store::{
    AuditAction, AuditEvent, AuditFilter, AuditRecord, KeyCount, KeyState, KeyStore,
    MemoryKeyStore, Rewrap, StoredKey,
};
pub use value::{DecodeError, PhiValue};
