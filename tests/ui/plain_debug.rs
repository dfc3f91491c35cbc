use phi_types::PhiRecord;

include!("schema/cases.rs");

#[derive(PhiRecord, Clone, Debug)]
#[phi(table = cases)]
struct Case {
    id: i32,
    #[phi(owner)]
    user_id: String,
    #[phi(encrypt)]
    patient_last: String,
}

fn main() {}
