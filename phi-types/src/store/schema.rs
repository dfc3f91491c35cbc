//! Diesel table definitions of the key store, for queries of your own
//! (key coverage, the audit trail):
//!
//! ```
//! use diesel::prelude::*;
//! use phi_types::schema::encryption_key_audit as audit;
//! let recent = audit::table
//!     .filter(audit::owner_id.eq("provider-17"))
//!     .order(audit::id.desc())
//!     .select((audit::occurred_at, audit::action, audit::key_version))
//!     .limit(20);
//! # let _ = recent;
//! ```
#![allow(missing_docs)]

diesel::table! {
    /// Wrapped data keys, one row per (owner, version).
    user_encryption_keys (owner_id, version) {
        owner_id -> Varchar,
        version -> BigInt,
        kek_id -> Varchar,
        wrapped_key -> Binary,
        state -> Varchar,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    /// Every key operation.
    encryption_key_audit (id) {
        id -> BigInt,
        occurred_at -> Timestamp,
        owner_id -> Varchar,
        action -> Varchar,
        key_version -> Nullable<BigInt>,
        kek_id -> Nullable<Varchar>,
        actor -> Varchar,
        detail -> Nullable<Text>,
    }
}

diesel::table! {
    /// One check value per KEK id: a commitment to the key material first
    /// used under that id.
    kek_check_values (kek_id) {
        kek_id -> Varchar,
        format -> Varchar,
        check_value -> Binary,
        created_at -> Timestamp,
    }
}
