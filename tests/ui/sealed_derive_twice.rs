use phi_types::PhiRecord;

include!("schema/cases.rs");

// The sealed struct derives `Insertable` already; `Debug` comes from
// `#[phi(debug)]`; derives go in `sealed_derive`, not `sealed_attr`.
#[derive(PhiRecord)]
#[phi(
    table = cases,
    sealed_derive(Identifiable, Insertable, Debug),
    sealed_attr(derive(Clone))
)]
struct Case {
    id: i32,
    #[phi(owner)]
    user_id: String,
    #[phi(encrypt)]
    patient_last: String,
}

fn main() {}
