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

/// `GHCB_MSR_TERM_REQ`: the GHCB MSR protocol's termination request (GHCB spec pub. 56421,
/// GHCBInfo in bits 11:0).
pub const GHCB_MSR_TERM_REQ: u64 = 0x100;

/// The reason a guest gave for its termination request (GHCB spec pub. 56421, "Termination
/// Request"). Serialized as `reason_set` and `reason_code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TermReason {
    /// The reason code set (0: general, 1: the GHCB protocol), 4 bits.
    #[serde(rename = "reason_set")]
    pub set: u8,
    /// The reason code within the set.
    #[serde(rename = "reason_code")]
    pub code: u8,
}

impl TermReason {
    /// The reason in a GHCB MSR value, if it is a termination request (`GHCB_MSR_TERM_REQ` in
    /// bits 11:0; reason set in bits 15:12, reason code in bits 23:16). `None` for anything else,
    /// such as a page-aligned GHCB GPA.
    pub fn from_ghcb_msr(ghcb_msr: u64) -> Option<Self> {
        (ghcb_msr & 0xfff == GHCB_MSR_TERM_REQ).then_some(Self {
            set: ((ghcb_msr >> 12) & 0xf) as u8,
            code: ((ghcb_msr >> 16) & 0xff) as u8,
        })
    }
}

impl std::fmt::Display for TermReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GHCB reason set {}, code {}", self.set, self.code)
    }
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
    /// `KVM_SYSTEM_EVENT_SEV_TERM`: the guest asked to terminate (a guest's decision, not a host
    /// failure). Built from the event's data by [`VcpuExit::from_sev_term`].
    ///
    /// Serialized with the reason's fields flattened in: `{"exit": "terminate", "reason_set": 1,
    /// "reason_code": 2}`, or just `{"exit": "terminate"}` when the reason is unknown.
    Terminate {
        /// The reason, when KVM reports it: only the GHCB MSR protocol carries one; a request
        /// through the GHCB page (`SVM_VMGEXIT_TERM_REQUEST`) reaches user space without it
        /// (`None`).
        #[serde(flatten)]
        reason: Option<TermReason>,
    },
    /// `KVM_EXIT_SHUTDOWN`: a triple fault; the VM cannot go on.
    Shutdown,
    /// The run was cut short by a [`crate::Kick`] (`KVM_RUN` returning `EINTR`).
    Interrupted,
}

impl VcpuExit {
    /// The `Terminate` exit for a `KVM_SYSTEM_EVENT_SEV_TERM` whose data is `data`.
    ///
    /// KVM stores one of two things in `data[0]` (arch/x86/kvm/svm/sev.c): for the MSR protocol
    /// (`sev_handle_vmgexit_msr_protocol`, `GHCB_MSR_TERM_REQ`) the GHCB MSR value, which holds
    /// the reason ([`TermReason::from_ghcb_msr`]); for the NAE event through the GHCB page
    /// (`sev_handle_vmgexit`, `SVM_VMGEXIT_TERM_REQUEST`: `data[0] = control->ghcb_gpa`) the
    /// page-aligned GHCB GPA, which holds none. Either way the guest asked to terminate; only
    /// the reason may be unknown (also when KVM gave no data at all).
    pub fn from_sev_term(data: &[u64]) -> Self {
        Self::Terminate {
            reason: data.first().copied().and_then(TermReason::from_ghcb_msr),
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
    fn msr_protocol_termination_carries_its_reason() {
        // sev_handle_vmgexit_msr_protocol, GHCB_MSR_TERM_REQ: data[0] is the GHCB MSR value;
        // reason set 1, code 2 (GHCB_SEV_ES_PROT_UNSUPPORTED).
        let msr = GHCB_MSR_TERM_REQ | (1 << 12) | (2 << 16);
        let exit = VcpuExit::from_sev_term(&[msr]);
        assert_eq!(
            exit,
            VcpuExit::Terminate {
                reason: Some(TermReason { set: 1, code: 2 })
            }
        );
        assert_eq!(exit.name(), "terminate");
        assert_eq!(
            serde_json::to_value(exit).unwrap(),
            serde_json::json!({"exit": "terminate", "reason_set": 1, "reason_code": 2})
        );
        assert_eq!(
            TermReason::from_ghcb_msr(GHCB_MSR_TERM_REQ | (0xf << 12) | (0xff << 16)),
            Some(TermReason { set: 0xf, code: 0xff })
        );
        assert_eq!(
            VcpuExit::from_sev_term(&[GHCB_MSR_TERM_REQ]),
            VcpuExit::Terminate {
                reason: Some(TermReason { set: 0, code: 0 })
            }
        );
        assert_eq!(
            TermReason { set: 1, code: 2 }.to_string(),
            "GHCB reason set 1, code 2"
        );
    }

    #[test]
    fn ghcb_page_termination_has_no_reason() {
        // sev_handle_vmgexit, SVM_VMGEXIT_TERM_REQUEST: data[0] is the page-aligned GHCB GPA,
        // whose bits 23:12 are an address, not a reason (decoding them would read set 3,
        // code 0x12).
        let exit = VcpuExit::from_sev_term(&[0x12_3000]);
        assert_eq!(exit, VcpuExit::Terminate { reason: None });
        assert_eq!(
            serde_json::to_value(exit).unwrap(),
            serde_json::json!({"exit": "terminate"})
        );
        assert_eq!(
            VcpuExit::from_sev_term(&[0]),
            VcpuExit::Terminate { reason: None }
        );
        // No data at all: still the guest's request.
        assert_eq!(VcpuExit::from_sev_term(&[]), VcpuExit::Terminate { reason: None });
        // Another MSR-protocol GHCBInfo is not a termination request's reason.
        assert_eq!(TermReason::from_ghcb_msr(0x101 | (1 << 12)), None);
    }
}
