//! Key life cycle.
