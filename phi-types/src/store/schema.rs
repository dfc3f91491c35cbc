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

diesel::table! {
    /// The key-event feed's head: one row (`id` 1), `head` the id of the
    /// last event appended.
    phi_key_feed (id) {
        id -> Integer,
        head -> BigInt,
    }
}

diesel::table! {
    /// The key-event feed: shred, rotate, retire, rewrap, roll-out changes
    /// and cache clears, in commit order.
    phi_key_events (id) {
        id -> BigInt,
        occurred_at -> Timestamp,
        kind -> Varchar,
        owner_id -> Nullable<Varchar>,
        key_version -> Nullable<BigInt>,
        actor -> Varchar,
        detail -> Nullable<Text>,
    }
}

diesel::table! {
    /// Roll-out policies, by name.
    phi_rollout (policy) {
        policy -> Varchar,
        mode -> Varchar,
        updated_at -> Timestamp,
        updated_by -> Varchar,
    }
}

diesel::table! {
    /// The owners a policy seals when its `phi_rollout.mode` is `owners`.
    phi_rollout_owners (policy, owner_id) {
        policy -> Varchar,
        owner_id -> Varchar,
    }
}

diesel::table! {
    /// How far each following keyring has read the feed.
    phi_feed_readers (reader) {
        reader -> Varchar,
        position -> BigInt,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    /// Values recorded as legacy ciphertexts before phi's writers ran, in
    /// the application's database: the only ones the backfill decodes
    /// ([`legacy`](crate::legacy)).
    phi_legacy_values (table_name, column_name, row_key) {
        table_name -> Varchar,
        column_name -> Varchar,
        row_key -> Varchar,
        owner_id -> Varchar,
        stored -> Binary,
        recorded_at -> Timestamp,
    }
}

diesel::table! {
    /// Rotation jobs shared by several workers: one row per (job, owner),
    /// `state` `pending` or `done`, claimed by one worker until
    /// `claimed_until` ([`rotate_all`](crate::lifecycle::rotate_all)).
    phi_rotation_claims (job_id, owner_id) {
        job_id -> Varchar,
        owner_id -> Varchar,
        state -> Varchar,
        new_version -> Nullable<BigInt>,
        claimed_by -> Nullable<Varchar>,
        claimed_until -> Nullable<Timestamp>,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    /// Values sealed per data key version, added by every process that
    /// seals ([`KeyStore::add_seal_counts`](crate::KeyStore::add_seal_counts)):
    /// may run behind, never backwards.
    phi_seal_counts (owner_id, version) {
        owner_id -> Varchar,
        version -> BigInt,
        seals -> BigInt,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    /// The access log's chains: the id and hash of each chain's last
    /// batch ([`access_log`](crate::access_log)).
    phi_access_chains (chain) {
        chain -> Varchar,
        head -> BigInt,
        head_hash -> Binary,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    /// The access log's batches: each chained to the one before by a keyed
    /// hash ([`access_log`](crate::access_log)).
    phi_access_batches (chain, id) {
        chain -> Varchar,
        id -> BigInt,
        kind -> Varchar,
        written_at -> Timestamp,
        last_at -> Timestamp,
        records -> BigInt,
        key_version -> BigInt,
        prev_hash -> Binary,
        hash -> Binary,
        pruned_before -> Nullable<BigInt>,
        pruned_hash -> Nullable<Binary>,
        detail -> Nullable<Text>,
    }
}

diesel::table! {
    /// The access log: one row per (accessor, operation, owner, table,
    /// row), fields named, never their values.
    phi_access_log (chain, batch, seq) {
        chain -> Varchar,
        batch -> BigInt,
        seq -> Integer,
        occurred_at -> Timestamp,
        user_id -> Varchar,
        purpose -> Varchar,
        request_id -> Nullable<Varchar>,
        op -> Varchar,
        owner_id -> Varchar,
        table_name -> Varchar,
        row_key -> Nullable<Varchar>,
        fields -> Text,
    }
}

diesel::allow_tables_to_appear_in_same_query!(phi_access_batches, phi_access_log);
