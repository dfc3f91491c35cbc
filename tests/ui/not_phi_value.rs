use phi_types::PhiRecord;

include!("schema/cases.rs");

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
