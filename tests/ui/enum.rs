use phi_types::PhiRecord;

diesel::table! {
    cases (id) {
        id -> Integer,
        user_id -> Text,
        patient_last -> Binary,
        patient_last_bidx -> Nullable<Binary>,
    }
}

#[derive(PhiRecord)]
#[phi(table = cases)]
enum Case {
    Open { user_id: String },
    Closed,
}

fn main() {}
