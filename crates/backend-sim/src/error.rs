//! The machine's error type: every refusal carries the failing value and the rule (an RMP
//! return code, a firmware status, a fault with the check that failed).

use vmsa_core::{Gfn, Gpa, Hpa, Pfn, SevStatus, VmKind};
use vmsa_host::Errno;

use crate::firmware::PageState;
use crate::memory::MemError;
use crate::rmp::{GuestFault, PageSize, RmpRet};

/// Errors of the machine (the `Platform::Error` of [`crate::SimPlatform`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// An RMP instruction returned a failure code.
    #[error("{op} of pfn {pfn} returned {code}{}", inj(*injected))]
    Rmp {
        /// The instruction.
        op: &'static str,
        /// The frame.
        pfn: Pfn,
        /// The return code.
        code: RmpRet,
        /// Whether the fault plan made it fail.
        injected: bool,
    },
    /// A host access broke the RMP rules: an RMP #PF (APM §15.36.10; error code bit 31, Linux
    /// `X86_PF_RMP`, which `show_fault_oops` reports as "RMP violation" before the oops),
    /// counted in the stats.
    #[error(
        "RMP fault: host {access} of pfn {pfn} through a {} mapping: pfn {checked} is {state:?} (assigned to ASID {asid}){}",
        size_name(*mapping),
        inj(*injected)
    )]
    RmpFault {
        /// `write` or `read`.
        access: &'static str,
        /// The frame accessed.
        pfn: Pfn,
        /// The page size of the host mapping the access went through.
        mapping: PageSize,
        /// The frame whose RMP entry failed the check: `pfn`, or (through a 2 MiB mapping) an
        /// assigned frame of its 2 MiB region.
        checked: Pfn,
        /// The firmware page state of `checked`.
        state: PageState,
        /// The owner of `checked`.
        asid: u32,
        /// Whether the fault plan made it fail.
        injected: bool,
    },
    /// A firmware command returned a status.
    #[error("firmware {cmd} failed with {status}{}", inj(*injected))]
    Firmware {
        /// The command.
        cmd: &'static str,
        /// The status code.
        status: SevStatus,
        /// Whether the fault plan made it fail.
        injected: bool,
    },
    /// The page allocator failed.
    #[error("host memory: {0}")]
    Memory(#[from] MemError),
    /// The machine's own structures outgrew their budget ([`crate::MachineConfig::memory_budget`]).
    #[error(
        "{op}: the simulator's own structures take {used} bytes, more than its memory budget of {budget} bytes (vmm run --sim-memory-budget)"
    )]
    MemoryBudget {
        /// The operation that outgrew it.
        op: &'static str,
        /// Bytes taken.
        used: u64,
        /// The budget.
        budget: u64,
    },
    /// The allocator was told to fail.
    #[error("page allocation failed (ENOMEM, injected)")]
    InjectedNoMemory,
    /// The VM_PAGE_FLUSH MSR write raised #GP.
    #[error("VM_PAGE_FLUSH of pfn {pfn} for ASID {asid} raised #GP: {rule}")]
    FlushFault {
        /// The frame.
        pfn: Pfn,
        /// The ASID.
        asid: u32,
        /// Why.
        rule: &'static str,
    },
    /// Every ASID is in use.
    #[error("no free ASID: all {max} SEV-ES/SNP ASIDs are in use")]
    NoAsid {
        /// The highest ASID.
        max: u32,
    },
    /// No guest has this ASID on the machine.
    #[error("no live guest with ASID {asid} on this machine")]
    UnknownGuest {
        /// The ASID.
        asid: u32,
    },
    /// A live guest has no memory encryption key yet: the firmware generates it at the launch
    /// start (`LAUNCH_START`, SEV API §6.2; `SNP_LAUNCH_START`, SNP ABI §8.16) and binds it to
    /// the ASID at ACTIVATE, so a private access or VMRUN before then has no key to use.
    #[error("guest ASID {asid} has no memory encryption key yet: it is made at the launch start")]
    NoKey {
        /// The guest.
        asid: u32,
    },
    /// A launch update was given fewer bytes of data than the length it measures: the range
    /// is refused before anything is written (KVM copies `len` bytes from the VMM's buffer,
    /// `sev_launch_update_data` in Linux arch/x86/kvm/svm/sev.c).
    #[error(
        "{op} of guest ASID {asid} at GPA {gpa}: {len:#x} bytes to update but only {data_len:#x} bytes of data"
    )]
    DataTooShort {
        /// The call.
        op: &'static str,
        /// The guest.
        asid: u32,
        /// The start of the range.
        gpa: Gpa,
        /// The length of the range.
        len: u64,
        /// The bytes of data given.
        data_len: u64,
    },
    /// The operation is for the other kind of guest.
    #[error("{op} is for {needed} guests; ASID {asid} is an {kind} guest")]
    WrongKind {
        /// The operation.
        op: &'static str,
        /// The kind it needs.
        needed: VmKind,
        /// The guest's kind.
        kind: VmKind,
        /// The guest.
        asid: u32,
    },
    /// A guest address outside every memslot.
    #[error("GPA {gpa} of guest ASID {asid} is not in any memslot")]
    NotInSlot {
        /// The address.
        gpa: Gpa,
        /// The guest.
        asid: u32,
    },
    /// A guest access or instruction faulted.
    #[error("guest ASID {asid}: {fault}")]
    GuestFault {
        /// The guest.
        asid: u32,
        /// The fault.
        fault: GuestFault,
    },
    /// A guest RMP instruction returned a failure code.
    #[error("guest ASID {asid}: {op} at GPA {gpa} returned {code}{}", inj(*injected))]
    GuestInstr {
        /// The guest.
        asid: u32,
        /// The instruction.
        op: &'static str,
        /// The address.
        gpa: Gpa,
        /// The return code.
        code: RmpRet,
        /// Whether the fault plan made it fail.
        injected: bool,
    },
    /// VMRUN refused the VMSA (`VMEXIT_INVALID`, APM table 15-41).
    #[error("VMRUN of ASID {asid} with VMSA {hpa} failed with VMEXIT_INVALID: {check}")]
    VmrunInvalid {
        /// The guest.
        asid: u32,
        /// The VMSA address.
        hpa: Hpa,
        /// The check that failed.
        check: &'static str,
    },
    /// VMRUN found the VMSA's BUSY bit set: another processor runs it (`VMEXIT_BUSY`, exit
    /// code -2, AMD APM vol. 2 table C-1 "BUSY bit was set in the VMSA"). KVM has no handler
    /// for that exit code: `svm_invoke_exit_handler` (arch/x86/kvm/svm/svm.c) dumps the VMCB
    /// and ends `KVM_RUN` with `KVM_EXIT_INTERNAL_ERROR` (unexpected exit reason).
    #[error(
        "VMRUN of ASID {asid} with VMSA {hpa} failed with VMEXIT_BUSY: another vCPU runs that VMSA (its BUSY bit is set)"
    )]
    VmrunBusy {
        /// The guest.
        asid: u32,
        /// The VMSA address.
        hpa: Hpa,
    },
    /// A shared (C=0) access to a frame whose attribute is private (KVM exits with
    /// `KVM_EXIT_MEMORY_FAULT` for an implicit conversion, which this machine refuses).
    #[error("guest ASID {asid}: shared access to GPA {gpa}, which is private")]
    PrivateMemory {
        /// The guest.
        asid: u32,
        /// The address.
        gpa: Gpa,
    },
    /// A range of guest frames whose end lies before its start: refused before any lookup
    /// (an interval `[start, end)` with `start > end` has no frames; treating it as empty
    /// would hide the caller's bug).
    #[error("{op} of guest ASID {asid}: guest frame range [{start}, {end}) ends before it starts")]
    ReversedRange {
        /// The call.
        op: &'static str,
        /// The guest.
        asid: u32,
        /// The first frame asked for.
        start: Gfn,
        /// The end asked for (exclusive), below `start`.
        end: Gfn,
    },
    /// A memslot that overlaps one the guest has: KVM's `__kvm_set_memory_region`
    /// (virt/kvm/kvm_main.c) refuses it with `-EEXIST` (`kvm_check_memslot_overlap`).
    #[error(
        "KVM_SET_USER_MEMORY_REGION2 of guest ASID {asid}: memslot at GPA {gpa} of {len:#x} bytes overlaps the memslot of guest frames [{other_start}, {other_end}) (__kvm_set_memory_region) ({errno})"
    )]
    SlotOverlap {
        /// The guest.
        asid: u32,
        /// The new slot's address.
        gpa: Gpa,
        /// The new slot's length in bytes.
        len: u64,
        /// The first frame of the slot it overlaps.
        other_start: Gfn,
        /// The end (exclusive) of the slot it overlaps.
        other_end: Gfn,
        /// KVM's answer: `EEXIST`.
        errno: Errno,
    },
    /// An operation failed, and so did the cleanup it does whatever its outcome (e.g. the
    /// reclaim of `SNP_DBG_DECRYPT`'s temporary firmware page, `snp_page_reclaim` in Linux
    /// arch/x86/kvm/svm/sev.c): both errors are kept, the operation's first.
    #[error("{source}; then the cleanup failed too: {cleanup}")]
    CleanupFailed {
        /// The operation's own failure.
        source: Box<SimError>,
        /// The cleanup's failure (its page is leaked).
        cleanup: Box<SimError>,
    },
    /// A private access to a frame the guest made shared (KVM exits with
    /// `KVM_EXIT_MEMORY_FAULT`).
    #[error("guest ASID {asid}: private access to GPA {gpa}, which is shared")]
    SharedMemory {
        /// The guest.
        asid: u32,
        /// The address.
        gpa: Gpa,
    },
}

fn inj(injected: bool) -> &'static str {
    if injected { " (injected)" } else { "" }
}

fn size_name(size: PageSize) -> &'static str {
    match size {
        PageSize::Size4K => "4 KiB",
        PageSize::Size2M => "2 MiB",
    }
}

impl SimError {
    /// The firmware status, if this is a firmware failure.
    pub fn firmware_status(&self) -> Option<SevStatus> {
        match self {
            Self::Firmware { status, .. } => Some(*status),
            Self::CleanupFailed { source, .. } => source.firmware_status(),
            _ => None,
        }
    }

    /// The RMP return code, if this is an RMP instruction failure.
    pub fn rmp_code(&self) -> Option<RmpRet> {
        match self {
            Self::Rmp { code, .. } | Self::GuestInstr { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether this is an RMP #PF of a host access.
    pub fn is_rmp_fault(&self) -> bool {
        matches!(self, Self::RmpFault { .. })
    }
}
