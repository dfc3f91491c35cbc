use phi_types::PhiRecord;

include!("schema/cases.rs");

#[derive(PhiRecord)]
#[phi(
    table = cases,
    compound_index(column = one_field, fields(patient_last)),
    compound_index(column = plain_field, fields(patient_last, id)),
    compound_index(column = too_wide, fields(patient_last, patient_first), bits = 0)
)]
struct Case {
    id: i32,
    #[phi(owner)]
    user_id: String,
    #[phi(encrypt)]
    patient_last: String,
    #[phi(encrypt)]
    patient_first: String,
}

fn main() {}
