//! The clinic's tables, as `diesel print-schema` prints them (the same on
//! every backend; `migrations/` creates them).
#![allow(missing_docs)]

diesel::table! {
    cases (case_id) {
        case_id -> Text,
        user_id -> Text,
        patient_first -> Binary,
        patient_last -> Binary,
        patient_dob -> Binary,
        ins_provider -> Nullable<Binary>,
        patient_last_bidx -> Nullable<Binary>,
        patient_dob_bidx -> Nullable<Binary>,
        procedure_code -> Text,
        surgery_date -> Date,
        status -> Text,
        phi_encrypted -> Bool,
        last_prefix -> Nullable<Binary>,
        dob_year -> Nullable<Binary>,
    }
}

diesel::table! {
    deleted_cases (case_id) {
        case_id -> Text,
        user_id -> Text,
        patient_first -> Binary,
        patient_last -> Binary,
        patient_dob -> Binary,
        ins_provider -> Nullable<Binary>,
        procedure_code -> Text,
        surgery_date -> Date,
        status -> Text,
        deleted_at -> Timestamp,
        phi_encrypted -> Bool,
    }
}

diesel::allow_tables_to_appear_in_same_query!(cases, deleted_cases);
