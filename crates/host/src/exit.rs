//! What a vCPU's run returns to the VMM: the exits KVM gives a VMM for a confidential guest.

use serde::Serialize;
use vmsa_core::Gpa;

/// A range of guest memory to convert between private (guest_memfd, encrypted) and shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Conversion {
    /// First byte (page aligned).
    pub gpa: Gpa,
    /// Length in bytes (a multiple of 4 KiB).
    pub size: u64,
    /// Convert to private (true) or to shared (false).
    pub private: bool,
}

/// Why [`crate::Vcpu::run`] returned. AP creation, INIT and the VMSA lifecycle are not here: the
/// host kernel handles them, as KVM does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "exit", rename_all = "snake_case")]
pub enum VcpuExit {
    /// `KVM_EXIT_MEMORY_FAULT`: the guest touched a range whose private/shared attribute differs
    /// from the access. The VMM converts it ([`crate::Vm::set_memory_attributes`]) and runs again.
    MemoryFault(Conversion),
    /// `KVM_EXIT_HYPERCALL` with `KVM_HC_MAP_GPA_RANGE`: the guest asked to convert a range (a
    /// GHCB page state change, which KVM forwards as this hypercall). The VMM converts it and
    /// answers with [`crate::Vcpu::complete_conversion`] before running again.
    MapGpaRange(Conversion),
    /// `KVM_EXIT_IO`, an `OUT` to `port` of `size` bytes.
    IoOut {
        /// The port.
        port: u16,
        /// The value written (zero-extended).
        data: u32,
        /// The access size in bytes (1, 2 or 4).
        size: u8,
    },
    /// `HLT` reached user space (the vCPU waits; running it again blocks until it has work).
    Halt,
    /// `KVM_SYSTEM_EVENT_SEV_TERM`: the guest's GHCB termination request (GHCB spec pub. 56421,
    /// MSR protocol `GHCB_MSR_TERM_REQ` 0x100: reason set in bits 15:12, reason code in 23:16).
    Terminate {
        /// The reason code set (0: general, 1: the GHCB protocol).
        reason_set: u8,
        /// The reason code.
        reason_code: u8,
    },
    /// `KVM_EXIT_SHUTDOWN`: a triple fault; the VM cannot go on.
    Shutdown,
    /// The run was cut short by a [`crate::Kick`] (`KVM_RUN` returning `EINTR`).
    Interrupted,
}

impl VcpuExit {
    /// The `Terminate` exit for a GHCB MSR value of a termination request.
    pub fn from_term_request(ghcb_msr: u64) -> Self {
        Self::Terminate {
            reason_set: ((ghcb_msr >> 12) & 0xf) as u8,
            reason_code: ((ghcb_msr >> 16) & 0xff) as u8,
        }
    }

    /// The exit's name, for counters and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Self::MemoryFault(_) => "memory_fault",
            Self::MapGpaRange(_) => "map_gpa_range",
            Self::IoOut { .. } => "io_out",
            Self::Halt => "halt",
            Self::Terminate { .. } => "terminate",
            Self::Shutdown => "shutdown",
            Self::Interrupted => "interrupted",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn termination_request_fields() {
        // GHCB_MSR_TERM_REQ with reason set 1, code 2 (GHCB_SEV_ES_PROT_UNSUPPORTED).
        let msr = 0x100 | (1 << 12) | (2 << 16);
        assert_eq!(
            VcpuExit::from_term_request(msr),
            VcpuExit::Terminate {
                reason_set: 1,
                reason_code: 2
            }
        );
        assert_eq!(VcpuExit::from_term_request(0x100).name(), "terminate");
    }
}
