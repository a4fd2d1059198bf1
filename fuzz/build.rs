//! Declares the `fuzzing` cfg, which `cargo xtask fuzz` sets in RUSTFLAGS for the instrumented
//! build (as cargo-fuzz does), so the compiler's check of cfg names knows it.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(fuzzing)");
}
