//! Deterministic core tests.
