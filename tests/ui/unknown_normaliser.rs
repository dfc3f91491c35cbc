use phi_types::PhiRecord;

include!("schema/cases.rs");

#[derive(PhiRecord)]
#[phi(table = cases)]
struct Case {
    id: i32,
    #[phi(owner)]
    user_id: String,
    #[phi(encrypt, blind_index = patient_last_bidx, normalize = "uppercase")]
    patient_last: String,
}

fn main() {}
