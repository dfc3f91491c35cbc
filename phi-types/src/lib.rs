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
//! # What you write by hand
//!
//! - A model: `#[derive(PhiRecord)]` with `#[phi(...)]` attributes, then
//!   [`PhiRecord`]'s `seal`, `seal_all`, `open_all`, `load` (and their
//!   async forms), the generated guarded update ([`Updated`]) and blind-index
//!   lookups. [`Encrypted<T>`] is the type of a sealed column.
//! - A keyring: [`Keyring::builder`] over a key store ([`DieselKeyStore`],
//!   [`MemoryKeyStore`], or your own [`KeyStore`]) and a key encryption key
//!   ([`LocalKek`], `AwsKmsKek`, or your own [`KeyEncryptionKey`]),
//!   configured through [`KeyringBuilder`]; single values through
//!   [`Keyring::seal`] / [`Keyring::open`] or [`OwnerKeys`].
//! - Your own stored types: [`PhiValue`], and for owner ids and row keys
//!   [`OwnerId`] and [`RowKey`] (already implemented for strings and
//!   integers).
//! - Errors: [`Error`], classified by [`Error::kind`] ([`ErrorKind`]).
//! - Jobs: [`lifecycle`] (rotate, re-seal, retire, rewrap, shred, audit)
//!   and [`migrate`] (backfill, verify, decrypt-back) with
//!   [`migrate::Migratable`] models.
//! - Operations: [`metrics`], and [`OwnerIdTelemetry`] for how owner ids
//!   appear in spans and logs; [`migrations`] for the key store's tables;
//!   [`envelope`] and [`Dek`] for reading the stored format with a key of
//!   your own (test vectors, tools).
//!
//! The code the derive generates calls into a hidden `__private` module:
//! it is not part of the public API and may change in any release.
//!
//! phi's own tables (the key store's) come from its [`migrations`]: the
//! application writes them into its own Diesel migrations directory
//! ([`migrations::write_to`], `phi migrations write`) and runs them with
//! its own, or has phi run them explicitly
//! ([`DieselKeyStore::builder`]`(url).run_migrations(true)`).
//! [`DieselKeyStore::connect`] changes no schema: it checks phi's tables
//! and names what is missing (see [`migrations`] for `diesel migration
//! revert` and the `diesel print-schema` filter that leaves them out of
//! the application's `schema.rs`).
//!
//! # Crate features
//!
//! As in Diesel, no backend is on by default. `Encrypted<T>`, records and
//! the keyring work on every Diesel backend without a feature; a backend
//! feature adds the key store ([`DieselKeyStore`], on Diesel's `r2d2` pool
//! with `chrono` timestamps, both turned on with it) and the embedded
//! [`migrations`] for that backend. `sqlite` links the system's
//! `libsqlite3` (or SQLCipher's); `sqlite-bundled` compiles SQLite in.
//!
#![doc = document_features::document_features!()]
#![cfg_attr(docsrs, feature(doc_cfg))]
// With no backend feature the jobs' SQL and the key store's helpers have no
// connection to run on; every build with a backend checks them.
#![cfg_attr(
    not(any(feature = "sqlite", feature = "mysql", feature = "postgres")),
    allow(dead_code, unused_macros)
)]

pub mod access;
pub mod access_log;
#[cfg(feature = "admin-http")]
pub mod admin;
pub mod adopt;
pub mod blind;
mod cipher;
#[cfg(feature = "cli")]
pub mod cli;
mod connection;
mod dek;
pub mod envelope;
mod error;
pub mod feed;
pub mod guide;
mod kek;
mod keyring;
pub mod legacy;
pub mod lifecycle;
pub mod lookup;
mod lookup_key;
#[cfg(feature = "cli")]
pub mod master_key;
pub mod metrics;
pub mod migrate;
#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
pub mod migrations;
mod nonce;
pub mod record;
mod sealer;
mod set_shape;
mod shared;
mod sql;
#[cfg(feature = "sqlite")]
pub mod sqlite;
mod store;
mod table_names;
mod telemetry;
#[cfg(feature = "uuid")]
mod uuid_key;
pub mod value;

/// Support for the code `#[derive(PhiRecord)]` generates. Not a public API:
/// nothing here is covered by semantic versioning, and an application never
/// names it.
#[doc(hidden)]
pub mod __private {
    pub use crate::migrate::{
        CanonicalFn, KeyColumnType, StoredColumn, StoredCompound, StoredTable, canonical,
    };
    pub use crate::record::__private::*;
    pub use crate::sealer::{Sealer, with_sealer};
}

pub use connection::PhiConnection;
pub use dek::{Dek, KeyBytes};
pub use envelope::{Binding, EnvelopeError, Header};
pub use error::{BoxError, Error, ErrorKind, Result};
#[cfg(feature = "async")]
pub use kek::KekFuture;
#[cfg(feature = "aws-kms")]
pub use kek::{
    AwsKmsError, AwsKmsErrorKind, AwsKmsKek, AwsKmsKekBuilder, AwsKmsStats, CONTEXT_DEK_VERSION,
    CONTEXT_KEK_CHECK, CONTEXT_OWNER,
};
pub use kek::{
    CHECK_CANARY, CHECK_FORMAT_LOCAL, CHECK_FORMAT_WRAP, CHECK_OWNER, DEFAULT_LOCAL_KEK_ID,
    KEK_ENV, KEK_ID_ENV, KekCheck, KekSpec, KeyEncryptionKey, LocalKek, MASTER_KEY_ENV,
    MASTER_KEY_FILE_ENV,
};
pub use keyring::{
    Clock, DEFAULT_AUDIT_QUEUE, DEFAULT_FEED_INTERVAL, DEFAULT_FEED_MAX_STALENESS,
    DEFAULT_KEYRING_NAME, DEFAULT_MAX_OWNERS, DEFAULT_ROLLOUT_POLICY, DEFAULT_TTL,
    DEFAULT_UNKNOWN_VERSION_TTL, FeedStatus, Keyring, KeyringBuilder, KeyringConfig, KeyringStats,
    MAX_OWNER_LEN, ManualClock, OwnerKeys, SystemClock, WarmReport,
};
pub use keyring::{
    DEFAULT_KEK_PROBE_INTERVAL, DEFAULT_READINESS_TIMEOUT, FeedReadiness, KekReadiness, PoolState,
    QueueFill, Readiness, ReadinessCheck,
};
pub use keyring::{DEFAULT_MAX_SEALS_PER_KEY, NONCE_BUDGET, RotationPolicy};
#[cfg(feature = "derive")]
#[doc(inline)]
pub use phi_derive::PhiRecord;
pub use record::{EncryptedFlag, OwnerId, PhiRecord, Rollout, RowKey, SealedRecord, Updated};
pub use shared::IntoShared;
pub use sql::Encrypted;
pub use store::schema;
pub use store::{
    AuditAction, AuditEvent, AuditFilter, AuditRecord, KeyCount, KeyState, KeyStore,
    MemoryKeyStore, Rewrap, SealCount, StoredKey,
};
#[cfg(any(feature = "sqlite", feature = "mysql", feature = "postgres"))]
pub use store::{DieselKeyStore, DieselKeyStoreBuilder, PooledStore, StoreBuilder};
pub use telemetry::{OwnerIdTelemetry, TelemetryOwner};
#[cfg(feature = "uuid")]
#[cfg_attr(docsrs, doc(cfg(feature = "uuid")))]
pub use uuid_key::BinaryUuid;
pub use value::{DecodeError, PhiValue};
