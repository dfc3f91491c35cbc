use phi_types::PhiRecord;

include!("schema/cases.rs");

#[derive(PhiRecord)]
#[phi(table = cases)]
struct Case {
    id: i32,
    #[phi(owner)]
    user_id: String,
    #[phi(encrypt, index(column = last_prefix, prefix = 3, last_digits = 4))]
    patient_last: String,
    #[phi(encrypt, index(column = dob_year, year, bits = 200))]
    patient_dob: String,
    #[phi(encrypt, index(column = first_prefix, prefix = 0))]
    patient_first: String,
    #[phi(index(column = code_prefix, prefix = 2))]
    procedure_code: String,
}

fn main() {}
