#![doc = include_str!("../README.md")]
//!
//! This package hosts the workspace's examples, cross-backend integration
//! tests and benchmarks; the library itself is [`phi_types`], re-exported
//! here whole.

pub use phi_types::*;
