use phi_types::PhiRecord;

include!("schema/cases.rs");

#[derive(PhiRecord)]
#[phi(table = cases)]
struct Case {
    id: i32,
    user_id: String,
    #[phi(encrypt)]
    patient_last: String,
}

fn main() {}
