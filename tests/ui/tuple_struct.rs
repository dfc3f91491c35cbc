use phi_types::PhiRecord;

include!("schema/cases.rs");

#[derive(PhiRecord)]
#[phi(table = cases)]
struct Case(i32, String, String);

fn main() {}
