//! Compile-time checks of `#[derive(PhiRecord)]`: each file in `tests/ui`
//! holds one mistake, and its `.stderr` the error a model author sees.

#[test]
fn derive_mistakes_are_reported_at_their_source() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}
