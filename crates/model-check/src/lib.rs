//! Model checks of vmsa-core's locking, in `tests/model_check.rs` (run them with
//! `cargo test -p vmsa-model-check --test model_check -- --nocapture`).
//!
//! They live in a crate of their own so that the `shuttle` feature they need is enabled for
//! their build alone, never for vmsa-core's benchmarks. The library is empty.
