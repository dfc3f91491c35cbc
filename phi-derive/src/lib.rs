//! Procedural macros for `phi`.
//!
//! `#[derive(PhiRecord)]` is being built here; this crate currently exports
//! nothing. Depend on `phi-types` (which re-exports the derive under its
//! `derive` feature) rather than on this crate directly.
