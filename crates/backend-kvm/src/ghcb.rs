//! The GHCB page as the VMSA-image doorbell uses it: the hypervisor side of an AP-creation
//! request, over guest memory.
//!
//! The page format, the checks of KVM's `sev_es_validate_vmgexit` and the answer encoding are
//! [`vmsa_core::ghcb`]'s codec; this module only copies the 4 KiB page between [`GuestRam`]
//! and that codec. The AP-creation rules themselves are vmsa-core's
//! [`vmsa_core::Vm::ap_creation`], so a guest gets exactly the answers the simulator gives.

pub use vmsa_core::ghcb::{GHCB_MSR, GhcbRequest};
use vmsa_core::ghcb::{GHCB_PAGE_SIZE, GhcbPage};

use crate::gmem::{GmemError, GuestRam};

fn read_page(ram: &GuestRam, gpa: u64) -> Result<GhcbPage, GmemError> {
    let mut page = [0; GHCB_PAGE_SIZE];
    ram.read(gpa, &mut page)?;
    Ok(page)
}

/// Reading a [`GhcbRequest`] out of guest memory.
pub trait ReadGhcb: Sized {
    /// Read and decode the GHCB page at `gpa`.
    fn read(ram: &GuestRam, gpa: u64) -> Result<Self, GmemError>;
}

impl ReadGhcb for GhcbRequest {
    fn read(ram: &GuestRam, gpa: u64) -> Result<Self, GmemError> {
        Ok(Self::decode(&read_page(ram, gpa)?))
    }
}

/// Write the hypervisor's answer into the GHCB page at `gpa` (marking both infos valid).
pub fn respond(ram: &GuestRam, gpa: u64, info1: u64, info2: u64) -> Result<(), GmemError> {
    let mut page = read_page(ram, gpa)?;
    vmsa_core::ghcb::write_response(&mut page, info1, info2);
    ram.write(gpa, &page)
}
