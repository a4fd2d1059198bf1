//! How the `vmm` binary is linked: a static PIE whose relative relocations are packed (DT_RELR)
//! wherever the build's glibc applies them (crates/vmm/build.rs).

#[path = "../glibc_version.rs"]
mod glibc_version;

use std::process::Command;

use glibc_version::{RELR_GLIBC, glibc_version};

/// `d_tag` values of ELF's dynamic section (System V gABI; DT_RELR from the 2022 gABI update).
const DT_NULL: u64 = 0;
const DT_RELR: u64 = 36;
/// `p_type` of the dynamic segment.
const PT_DYNAMIC: u32 = 2;

fn u16_at(b: &[u8], at: usize) -> usize {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap()).into()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The tags of an ELF64 little-endian file's dynamic section (empty without one).
fn dynamic_tags(elf: &[u8]) -> Vec<u64> {
    assert_eq!(&elf[..6], b"\x7fELF\x02\x01", "an ELF64 little-endian file");
    let (phoff, phentsize, phnum) = (u64_at(elf, 0x20) as usize, u16_at(elf, 0x36), u16_at(elf, 0x38));
    let Some(dynamic) = (0..phnum)
        .map(|i| phoff + i * phentsize)
        .find(|&ph| u32_at(elf, ph) == PT_DYNAMIC)
    else {
        return Vec::new();
    };
    let (offset, size) = (
        u64_at(elf, dynamic + 8) as usize,
        u64_at(elf, dynamic + 32) as usize,
    );
    elf[offset..offset + size]
        .chunks_exact(16)
        .map(|entry| u64_at(entry, 0))
        .take_while(|&tag| tag != DT_NULL)
        .collect()
}

#[test]
fn relative_relocations_are_packed_where_glibc_applies_them() {
    let (glibc, version) = glibc_version();
    let Some(version) = version.filter(|v| *v >= RELR_GLIBC) else {
        eprintln!(
            "skipped: packed relocations need glibc 2.36 or later (getconf GNU_LIBC_VERSION: {glibc:?})"
        );
        return;
    };
    let elf = std::fs::read(env!("CARGO_BIN_EXE_vmm")).unwrap();
    let tags = dynamic_tags(&elf);
    assert!(!tags.is_empty(), "vmm is a static PIE, with a dynamic section");
    assert!(
        tags.contains(&DT_RELR),
        "glibc {version:?}: no DT_RELR in {tags:?}"
    );
    // ... and it starts: its relocations were applied.
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("vmm {}", env!("CARGO_PKG_VERSION"))
    );
}
