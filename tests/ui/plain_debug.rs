use phi_types::PhiRecord;

include!("schema/cases.rs");

// A plain `Debug` would print the patient's name: `#[phi(debug)]` redacts it.
#[derive(PhiRecord, Debug)]
#[phi(table = cases)]
struct Case {
    #[phi(owner)]
    user_id: String,
    #[phi(encrypt)]
    patient_last: String,
}

fn main() {}
