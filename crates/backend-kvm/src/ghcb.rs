//! The GHCB page as the VMSA-image doorbell uses it, and the hypervisor side of an AP-creation
//! request.
//!
//! Offsets are those of Linux `struct ghcb` / `struct ghcb_save_area` (GHCB spec pub. 56421;
//! `kernel.md` §4.1, §4.4). A field is valid when its bit — its offset in the save area
//! divided by 8 — is set in the valid bitmap at 0x3f0 (`GHCB_BITMAP_IDX`).
//!
//! The checks before vmsa-core follow KVM's `sev_es_validate_vmgexit`: `ghcb_usage` must be 0
//! (`GHCB_ERR_INVALID_USAGE`), the exit code and both exit infos must be valid
//! (`GHCB_ERR_MISSING_INPUT`), the exit code must be one this hypervisor handles
//! (`GHCB_ERR_INVALID_EVENT`). The AP-creation rules themselves are vmsa-core's
//! [`vmsa_core::Vm::ap_creation`], so a guest gets exactly the answers the simulator gives.

use serde::Serialize;
use vmsa_core::ghcb::{GHCB_ERR_INVALID_EVENT, GHCB_ERR_MISSING_INPUT, GHCB_HV_RESP_MALFORMED_INPUT};

use crate::gmem::{GmemError, GuestRam};

/// `MSR_AMD64_SEV_ES_GHCB`: the GHCB MSR, whose write is the doorbell.
pub const GHCB_MSR: u32 = 0xc001_0130;
/// RAX in the save area.
pub const RAX: u64 = 0x1f8;
/// `sw_exit_code`.
pub const SW_EXIT_CODE: u64 = 0x390;
/// `sw_exit_info_1`.
pub const SW_EXIT_INFO_1: u64 = 0x398;
/// `sw_exit_info_2`.
pub const SW_EXIT_INFO_2: u64 = 0x3a0;
/// The 16-byte valid bitmap.
pub const VALID_BITMAP: u64 = 0x3f0;
/// `protocol_version` (u16).
pub const PROTOCOL_VERSION: u64 = 0xffa;
/// `ghcb_usage` (u32).
pub const USAGE: u64 = 0xffc;
/// `GHCB_ERR_INVALID_USAGE`.
pub const GHCB_ERR_INVALID_USAGE: u64 = 2;

/// `(qword of the bitmap, bit mask)` that marks the field at `offset` valid.
pub const fn valid_bit(offset: u64) -> (u64, u64) {
    let idx = offset / 8;
    (idx / 64, 1 << (idx % 64))
}

/// A request as the guest left it in its GHCB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GhcbRequest {
    /// `sw_exit_code`.
    pub exit_code: u64,
    /// `sw_exit_info_1`.
    pub exit_info_1: u64,
    /// `sw_exit_info_2`.
    pub exit_info_2: u64,
    /// RAX if marked valid.
    pub rax: Option<u64>,
    /// `ghcb_usage`.
    pub usage: u32,
    /// The valid bitmap.
    pub valid: [u64; 2],
}

impl GhcbRequest {
    /// Read the GHCB at `gpa`.
    pub fn read(ram: &GuestRam, gpa: u64) -> Result<Self, GmemError> {
        let valid = [
            ram.read_u64(gpa + VALID_BITMAP)?,
            ram.read_u64(gpa + VALID_BITMAP + 8)?,
        ];
        let mut usage = [0u8; 4];
        ram.read(gpa + USAGE, &mut usage)?;
        let is_valid = |off: u64| {
            let (q, m) = valid_bit(off);
            valid[q as usize] & m != 0
        };
        Ok(Self {
            exit_code: ram.read_u64(gpa + SW_EXIT_CODE)?,
            exit_info_1: ram.read_u64(gpa + SW_EXIT_INFO_1)?,
            exit_info_2: ram.read_u64(gpa + SW_EXIT_INFO_2)?,
            rax: is_valid(RAX).then(|| ram.read_u64(gpa + RAX)).transpose()?,
            usage: u32::from_le_bytes(usage),
            valid,
        })
    }

    fn is_valid(&self, off: u64) -> bool {
        let (q, m) = valid_bit(off);
        self.valid[q as usize] & m != 0
    }

    /// The protocol-level refusal KVM's `sev_es_validate_vmgexit` would give, if any:
    /// `(sw_exit_info_1, sw_exit_info_2)`.
    pub fn precheck(&self) -> Option<(u64, u64)> {
        if self.usage != 0 {
            return Some((GHCB_HV_RESP_MALFORMED_INPUT, GHCB_ERR_INVALID_USAGE));
        }
        if !(self.is_valid(SW_EXIT_CODE) && self.is_valid(SW_EXIT_INFO_1) && self.is_valid(SW_EXIT_INFO_2)) {
            return Some((GHCB_HV_RESP_MALFORMED_INPUT, GHCB_ERR_MISSING_INPUT));
        }
        if self.exit_code != vmsa_core::ghcb::SVM_VMGEXIT_AP_CREATION {
            return Some((GHCB_HV_RESP_MALFORMED_INPUT, GHCB_ERR_INVALID_EVENT));
        }
        None
    }
}

/// Write the hypervisor's answer into the GHCB at `gpa` (marking both infos valid).
pub fn respond(ram: &GuestRam, gpa: u64, info1: u64, info2: u64) -> Result<(), GmemError> {
    ram.write_u64(gpa + SW_EXIT_INFO_1, info1)?;
    ram.write_u64(gpa + SW_EXIT_INFO_2, info2)?;
    let (q, m1) = valid_bit(SW_EXIT_INFO_1);
    let (_, m2) = valid_bit(SW_EXIT_INFO_2);
    let at = gpa + VALID_BITMAP + q * 8;
    let v = ram.read_u64(at)?;
    ram.write_u64(at, v | m1 | m2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_bits_are_the_kernels_bitmap_indices() {
        // GHCB_BITMAP_IDX(rax) = 0x1f8 / 8 = 63; sw_exit_code = 114, info_1 = 115, info_2 = 116.
        assert_eq!(valid_bit(RAX), (0, 1 << 63));
        assert_eq!(valid_bit(SW_EXIT_CODE), (1, 1 << 50));
        assert_eq!(valid_bit(SW_EXIT_INFO_1), (1, 1 << 51));
        assert_eq!(valid_bit(SW_EXIT_INFO_2), (1, 1 << 52));
    }

    #[test]
    fn precheck_follows_sev_es_validate_vmgexit() {
        let ok = GhcbRequest {
            exit_code: 0x8000_0013,
            exit_info_1: 1,
            exit_info_2: 0x1000,
            rax: Some(1),
            usage: 0,
            valid: [1 << 63, 7 << 50],
        };
        assert_eq!(ok.precheck(), None);
        assert_eq!(GhcbRequest { usage: 1, ..ok }.precheck(), Some((2, 2)));
        assert_eq!(
            GhcbRequest {
                valid: [1 << 63, 3 << 50],
                ..ok
            }
            .precheck(),
            Some((2, 4))
        );
        assert_eq!(
            GhcbRequest {
                exit_code: 0x8000_0001,
                ..ok
            }
            .precheck(),
            Some((2, 6))
        );
    }
}
