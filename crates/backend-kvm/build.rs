//! Assembles the built-in guest program (`src/guest/asm.rs`, iced-x86's code assembler) into
//! `$OUT_DIR/guest_program.rs`, which `guest::program` includes as `PROGRAM`: a VMM process then
//! pays nothing for it (assembling at run time cost ~0.5 ms, iced-x86 building its tables).

use std::fmt::Write as _;
use std::path::PathBuf;

// The guest's memory map: the build reads its addresses, its constants and which stretches of
// the AP VMSA template are non-zero (`template_stretches`).
#[allow(dead_code)]
#[path = "src/guest/layout.rs"]
mod layout;

#[path = "src/guest/asm.rs"]
mod asm;

fn main() {
    for f in ["build.rs", "src/guest/asm.rs", "src/guest/layout.rs"] {
        println!("cargo::rerun-if-changed={f}");
    }
    let (code, [scenario, requests, ap, spin, igvm, halt]) = match asm::assemble() {
        Ok(p) => p,
        Err(e) => panic!("assembling the guest program failed: {e}"),
    };
    assert!(
        code.len() as u64 <= layout::CODE_MAX,
        "the guest program is {} bytes; {} fit at CODE_GPA",
        code.len(),
        layout::CODE_MAX
    );
    let mut bytes = String::new();
    for (i, b) in code.iter().enumerate() {
        let sep = if i % 16 == 0 { "\n    " } else { " " };
        let _ = write!(bytes, "{sep}{b:#04x},");
    }
    let out = format!(
        "/// The built-in guest program (see the module docs), as the build assembled it.\n\
         pub const PROGRAM: Program = Program {{\n    code: &[{bytes}\n    ],\n    entries: Entries {{\n        \
         scenario: {scenario:#x},\n        requests: {requests:#x},\n        ap: {ap:#x},\n        spin: {spin:#x},\n        igvm: {igvm:#x},\n        halt: {halt:#x},\n    }},\n}};\n"
    );
    let dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let path = dir.join("guest_program.rs");
    if let Err(e) = std::fs::write(&path, out) {
        panic!("writing {}: {e}", path.display());
    }
}
