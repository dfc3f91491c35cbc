//! Settings the whole-run benchmarks read from the environment.

/// The number in the environment variable `name`, or `default` when it is
/// unset or not a number.
pub(crate) fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
