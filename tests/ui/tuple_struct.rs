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
struct Case(i32, String, String);

fn main() {}
