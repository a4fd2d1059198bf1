//! Link the `vmm` binary with packed relative relocations (DT_RELR, `ld -z pack-relative-relocs`)
//! where the C library it is statically linked against applies them.
//!
//! The workspace links its binaries as static PIEs (`.cargo/config.toml`), which relocate
//! themselves before `main`: with classic RELA entries that meant reading 7,586 of them (182 KiB,
//! 45 pages to fault in) on every start. Packed, the same relocations take 1.8 KiB. Measured on
//! the development host (BENCHMARKS.md, "Packed relocations"): `vmm --version` 1.13x faster,
//! `vmm measure` 1.03-1.07x. glibc's static-PIE start-up code applies DT_RELR only since 2.36;
//! linked against an older glibc the binary would start with its pointers unrelocated, so the
//! flag is given only where `getconf GNU_LIBC_VERSION` reports 2.36 or later (an `ld` older
//! than binutils 2.38 ignores it with a warning).

#[path = "glibc_version.rs"]
mod glibc_version;

use glibc_version::{RELR_GLIBC, glibc_version};

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=glibc_version.rs");
    let static_crt = std::env::var("CARGO_CFG_TARGET_FEATURE")
        .is_ok_and(|features| features.split(',').any(|f| f == "crt-static"));
    let linux_gnu = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    if !(static_crt && linux_gnu) {
        return;
    }
    match glibc_version() {
        (_, Some(v)) if v >= RELR_GLIBC => println!("cargo::rustc-link-arg-bins=-Wl,-z,pack-relative-relocs"),
        (text, _) => println!(
            "cargo::warning=vmm is linked without packed relocations: they need glibc 2.36 or later (getconf \
             GNU_LIBC_VERSION: {text:?})"
        ),
    }
}
