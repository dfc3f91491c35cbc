use phi_types::PhiRecord;

include!("schema/cases.rs");

#[derive(PhiRecord)]
#[phi(table = cases)]
struct Case {
    id: i32,
    #[phi(owner)]
    user_id: String,
    #[phi(lookup_index = patient_last_lookup)]
    patient_last: String,
}

fn main() {}
