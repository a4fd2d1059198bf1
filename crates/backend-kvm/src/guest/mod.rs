//! The built-in guest: its memory map ([`layout`]) and its program ([`program`]), plus the
//! loader that writes both into guest RAM.

pub mod layout;
pub mod program;

use vmsa_core::SevEsSaveArea;
use zerocopy::IntoBytes;

use crate::gmem::{GmemError, GuestRam};
use layout::{CODE_GPA, GDT, GDT_GPA, PARAMS_GPA, TEMPLATE_GPA, page_tables};
use program::Program;

/// Write the GDT, the page tables, the program and the AP VMSA template (starting at the
/// program's AP entry) into guest RAM, and set the parameter page's vCPU count and flags.
pub fn load(ram: &GuestRam, program: &Program, vcpus: u32, flags: u64) -> Result<(), GmemError> {
    let gdt: Vec<u8> = GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    ram.write(GDT_GPA, &gdt)?;
    for (gpa, entries) in page_tables() {
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        ram.write(gpa, &bytes)?;
    }
    ram.write(CODE_GPA, &program.code)?;
    let template: Box<SevEsSaveArea> = layout::long_mode_image(program.entries.ap);
    ram.write(TEMPLATE_GPA, template.as_bytes())?;
    ram.write_u64(PARAMS_GPA + layout::params::N_VCPUS, u64::from(vcpus))?;
    ram.write_u64(PARAMS_GPA + layout::params::FLAGS, flags)?;
    Ok(())
}
