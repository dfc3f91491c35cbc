//! Compile-time checks of `#[derive(PhiRecord)]`: each file in `tests/ui`
//! holds one mistake, and its `.stderr` the error a model author sees.
//!
//! The expected output is recorded with the default features: with the
//! server backends on, rustc's list of other `PhiValue` implementors is
//! spelled differently, so the test is ignored there and `.ci/run` runs it
//! separately with the default features.

#[test]
#[cfg_attr(
    any(feature = "mysql", feature = "postgres"),
    ignore = "expected compiler output is recorded with the default features; run `cargo test --test ui`"
)]
fn derive_mistakes_are_reported_at_their_source() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}
