//! The service's tables (`migrations/` creates them, the same on every
//! backend): the sealed cases and their plaintext twin.
#![allow(missing_docs)]

diesel::table! {
    service_cases (case_id) {
        case_id -> Text,
        provider_id -> Text,
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
        revision -> BigInt,
    }
}

diesel::table! {
    service_cases_plain (case_id) {
        case_id -> Text,
        provider_id -> Text,
        patient_first -> Text,
        patient_last -> Text,
        patient_dob -> Date,
        ins_provider -> Nullable<Text>,
        patient_last_norm -> Text,
        procedure_code -> Text,
        surgery_date -> Date,
        status -> Text,
        revision -> BigInt,
    }
}
