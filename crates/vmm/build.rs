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

use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    let static_crt = std::env::var("CARGO_CFG_TARGET_FEATURE")
        .is_ok_and(|features| features.split(',').any(|f| f == "crt-static"));
    let linux_gnu = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    if !(static_crt && linux_gnu) {
        return;
    }
    let glibc = Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| glibc_version(&v));
    match glibc {
        Some(v) if v >= (2, 36) => println!("cargo::rustc-link-arg-bins=-Wl,-z,pack-relative-relocs"),
        _ => println!(
            "cargo::warning=vmm is linked without packed relocations: they need glibc 2.36 or later (getconf \
             GNU_LIBC_VERSION: {glibc:?})"
        ),
    }
}

/// `(major, minor)` from `getconf GNU_LIBC_VERSION`'s "glibc 2.36".
fn glibc_version(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.trim().strip_prefix("glibc ")?.split_once('.')?;
    let minor = minor.split(|c: char| !c.is_ascii_digit()).next()?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}
