//! The model and tables of the comparison's load and insert, shared by
//! `benches/compare.rs` and `benches/load_profile.rs` so that the profile
//! counts exactly the load the comparison times.

use diesel::prelude::*;

/// The comparison's tables: the plaintext one and the sealed one.
pub(crate) mod schema {
    #![allow(missing_docs)]
    diesel::table! {
        phi_cmp_plain (case_id) {
            case_id -> BigInt,
            user_id -> Text,
            patient_first -> Text,
            patient_last -> Text,
            patient_dob -> Text,
            ins_provider -> Text,
            status -> Integer,
        }
    }
    diesel::table! {
        phi_cmp_sealed (case_id) {
            case_id -> BigInt,
            user_id -> Text,
            patient_first -> Binary,
            patient_last -> Binary,
            patient_dob -> Binary,
            ins_provider -> Binary,
            status -> Integer,
        }
    }
}
use schema::{phi_cmp_plain, phi_cmp_sealed};

/// A case as the application holds it: phi seals its 4 PHI fields into
/// `phi_cmp_sealed`, each with scope `phi_cmp_sealed.<column>` and bound to
/// the case id. The derive also generates `CaseSealed`, the stored form.
#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(crate = phi, table = phi_cmp_sealed)]
#[diesel(primary_key(case_id))]
pub(crate) struct Case {
    #[phi(row_key)]
    pub(crate) case_id: i64,
    #[phi(owner)]
    pub(crate) user_id: String,
    #[phi(encrypt)]
    pub(crate) patient_first: String,
    #[phi(encrypt)]
    pub(crate) patient_last: String,
    #[phi(encrypt)]
    pub(crate) patient_dob: String,
    #[phi(encrypt)]
    pub(crate) ins_provider: String,
    pub(crate) status: i32,
}

/// The same case in the plaintext table.
#[derive(Clone, PartialEq, Eq, Insertable, Queryable, Selectable)]
#[diesel(table_name = phi_cmp_plain)]
pub(crate) struct PlainCase {
    pub(crate) case_id: i64,
    pub(crate) user_id: String,
    pub(crate) patient_first: String,
    pub(crate) patient_last: String,
    pub(crate) patient_dob: String,
    pub(crate) ins_provider: String,
    pub(crate) status: i32,
}
