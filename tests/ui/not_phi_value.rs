use phi_types::PhiRecord;

diesel::table! {
    cases (id) {
        id -> Integer,
        user_id -> Text,
        patient_last -> Binary,
        patient_last_bidx -> Nullable<Binary>,
    }
}

struct Insurer {
    name: String,
}

#[derive(PhiRecord)]
#[phi(table = cases)]
struct Case {
    id: i32,
    #[phi(owner)]
    user_id: String,
    #[phi(encrypt)]
    patient_last: Insurer,
}

fn main() {}
