use phi_types::PhiRecord;

include!("schema/cases.rs");

#[derive(PhiRecord)]
#[phi(table = cases)]
enum Case {
    Open { user_id: String },
    Closed,
}

fn main() {}
