// The table the compile-fail cases are written against.
diesel::table! {
    cases (id) {
        id -> Integer,
        user_id -> Text,
        patient_last -> Binary,
        patient_last_bidx -> Nullable<Binary>,
    }
}
