//! The built-in guest: its memory map ([`layout`]), its program ([`program`]), the image of
//! both, and the guests ready to launch ([`builtin`]).

pub mod builtin;
pub mod layout;
pub mod program;

use vmsa_core::SevEsSaveArea;
use zerocopy::IntoBytes;

use layout::{CODE_GPA, GDT, GDT_GPA, PARAMS_GPA, TEMPLATE_GPA, page_tables};
use program::Program;

/// Where the guest image ends: it covers GPAs `0..IMAGE_END` (GDT, page tables, program,
/// parameters, mailboxes and the AP VMSA template), whole pages.
pub const IMAGE_END: u64 = TEMPLATE_GPA + 0x1000;

/// The pieces of the guest image for `vcpus` vCPUs and `flags`, as `(gpa, bytes)`: the GDT, the
/// page tables, the program, the AP VMSA template (starting at the program's AP entry) and the
/// parameter page's vCPU count and flags.
fn pieces(program: &Program, vcpus: u32, flags: u64) -> Vec<(u64, Vec<u8>)> {
    let mut out = vec![(GDT_GPA, GDT.iter().flat_map(|e| e.to_le_bytes()).collect())];
    for (gpa, entries) in page_tables() {
        out.push((gpa, entries.iter().flat_map(|e| e.to_le_bytes()).collect()));
    }
    out.push((CODE_GPA, program.code.to_vec()));
    let template: Box<SevEsSaveArea> = layout::long_mode_image(program.entries.ap);
    out.push((TEMPLATE_GPA, template.as_bytes().to_vec()));
    out.push((
        PARAMS_GPA + layout::params::N_VCPUS,
        u64::from(vcpus).to_le_bytes().to_vec(),
    ));
    out.push((PARAMS_GPA + layout::params::FLAGS, flags.to_le_bytes().to_vec()));
    out
}

/// The guest image as the bytes of GPAs `0..IMAGE_END` (what a VMM hands to launch update).
pub fn image(program: &Program, vcpus: u32, flags: u64) -> Vec<u8> {
    let mut img = vec![0u8; IMAGE_END as usize];
    for (gpa, bytes) in pieces(program, vcpus, flags) {
        img[gpa as usize..gpa as usize + bytes.len()].copy_from_slice(&bytes);
    }
    img
}
