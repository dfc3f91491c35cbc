use phi_types::PhiRecord;

include!("schema/cases.rs");

#[derive(PhiRecord)]
#[phi(table = cases)]
struct Case {
    id: i32,
    #[phi(owner)]
    user_id: String,
    #[phi(encrypt, shadow)]
    patient_last: String,
}

fn main() {}
