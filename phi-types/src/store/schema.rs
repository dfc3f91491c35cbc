//! Diesel table definitions of the key store.
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
