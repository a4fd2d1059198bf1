//! vmsa-core's errors. Every variant names the value that broke a rule and the rule.

use alloc::format;

use crate::addr::{Gpa, Pfn};
use crate::ghcb::ApCreationError;
use crate::state::{Op, StateKind, VcpuId, VmKind};

/// The platform call that failed, for [`Error::Platform`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum PlatformOp {
    /// [`Platform::alloc_page`](crate::Platform::alloc_page).
    AllocPage,
    /// [`Platform::write_frame`](crate::Platform::write_frame).
    WriteFrame,
    /// [`Platform::read_frame`](crate::Platform::read_frame).
    ReadFrame,
    /// [`Platform::rmp_make_private`](crate::Platform::rmp_make_private).
    RmpMakePrivate,
    /// [`Platform::launch_start`](crate::Platform::launch_start).
    LaunchStart,
    /// [`Platform::launch_update_vmsa`](crate::Platform::launch_update_vmsa).
    LaunchUpdateVmsa,
    /// [`Platform::launch_update_data`](crate::Platform::launch_update_data).
    LaunchUpdateData,
    /// [`Platform::snp_launch_update`](crate::Platform::snp_launch_update).
    SnpLaunchUpdate,
    /// [`Platform::launch_finish`](crate::Platform::launch_finish).
    LaunchFinish,
    /// [`Platform::dbg_decrypt_vmsa`](crate::Platform::dbg_decrypt_vmsa).
    DbgDecrypt,
}

impl core::fmt::Display for PlatformOp {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::AllocPage => "page allocation",
            Self::WriteFrame => "host write",
            Self::ReadFrame => "host read",
            Self::RmpMakePrivate => "RMPUPDATE to private",
            Self::LaunchStart => "launch start",
            Self::LaunchUpdateVmsa => "LAUNCH_UPDATE_VMSA",
            Self::LaunchUpdateData => "LAUNCH_UPDATE_DATA",
            Self::SnpLaunchUpdate => "SNP_LAUNCH_UPDATE",
            Self::LaunchFinish => "launch finish",
            Self::DbgDecrypt => "debug decrypt",
        })
    }
}

/// The phase of a VM's launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum LaunchState {
    /// No launch command yet.
    NotStarted,
    /// Launch started; pages and VMSAs may be added.
    Started,
    /// Launch finished; the guest may run.
    Finished,
    /// A launch step failed after a vCPU was protected or a VMSA was freed or leaked. The
    /// launch can never be finished (the kernel patch would retry into a freed VMSA); tear the
    /// VM down. A failure that changed nothing leaves the launch where it was.
    Failed,
}

impl core::fmt::Display for LaunchState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(self, f)
    }
}

/// A [`VmConfig`](crate::VmConfig) that KVM's `__sev_guest_init` would refuse (-EINVAL).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} VM with SEV features {sev_features:#x} (FPU sync {sync_fpu}): {rule}")]
pub struct ConfigError {
    /// The VM's kind.
    pub kind: VmKind,
    /// The SEV features asked for.
    pub sev_features: u64,
    /// Whether launch VMSAs carry the FPU state (`KVM_SEV_INIT2`) or not (`KVM_SEV_ES_INIT`).
    pub sync_fpu: bool,
    /// The rule broken.
    pub rule: &'static str,
}

/// Why an intra-host migration was refused (KVM's `sev_vm_move_enc_context_from` rules).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MigrationError {
    /// The destination already has an encryption context.
    #[error("the destination already is a {kind} VM; it must be created with Vm::migration_target")]
    DestinationIsConfidential {
        /// The destination's kind.
        kind: VmKind,
    },
    /// The source has no encryption context to give (KVM: `!sev_guest(source_kvm)`).
    #[error("the source is not a confidential VM; it has no encryption context to move")]
    SourceNotConfidential,
    /// SNP guests cannot migrate (KVM: "until additional state transfer is implemented").
    #[error("the source is an SEV-SNP VM; only SEV-ES guests can migrate within a host")]
    SourceIsSnp,
    /// The two VMs have different vCPU counts.
    #[error("the source has {source_vcpus} vCPUs but the destination has {destination_vcpus}")]
    VcpuCountMismatch {
        /// vCPUs in the source.
        source_vcpus: usize,
        /// vCPUs in the destination.
        destination_vcpus: usize,
    },
    /// A source vCPU never had its VMSA launched.
    #[error("source vCPU {vcpu} was never launched (LAUNCH_UPDATE_VMSA not done)")]
    SourceNotLaunched {
        /// The vCPU.
        vcpu: VcpuId,
    },
}

/// Why a VMSA supplied in guest memory at launch (an `SNP_LAUNCH_UPDATE` of page type VMSA, the
/// "Streamline VMSA setting" series' patch 4/4 "kvm: svm: Support KVM_SEV_SNP_PAGE_TYPE_VMSA at
/// SNP_LAUNCH_UPDATE") was refused. Each is `-EINVAL` on a host that follows KVM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SuppliedVmsaError {
    /// The VM was created in the classic mode, where KVM allocates and measures one VMSA per
    /// vCPU at launch finish (`snp_launch_update` refuses type 2 there).
    #[error(
        "a VMSA page at GPA {gpa}: this VM was created without supplied VMSAs; its VMSAs come from the vCPUs at launch finish (snp_launch_update)"
    )]
    NotEnabled {
        /// The page's address.
        gpa: Gpa,
    },
    /// SEV-ES has no SNP launch page types: its VMSAs are KVM's, launched by
    /// `LAUNCH_UPDATE_VMSA`.
    #[error(
        "a VMSA page at GPA {gpa} in an SEV-ES launch: SEV-ES has no page types; its VMSAs are KVM's (sev_launch_update_vmsa)"
    )]
    SevEs {
        /// The page's address.
        gpa: Gpa,
    },
    /// A VMSA update covers exactly one 4 KiB page.
    #[error("a VMSA launch update of {len:#x} bytes at GPA {gpa}: a supplied VMSA is exactly one 4 KiB page")]
    NotOnePage {
        /// The range's start.
        gpa: Gpa,
        /// Its length.
        len: u64,
    },
    /// AMD erratum 1467: a VMSA on a 2 MiB-aligned page can be hit by an RMP check of the large
    /// page around it (the rule `sev_snp_ap_creation` applies to guest VMSAs).
    #[error("a VMSA page at 2 MiB-aligned GPA {gpa} (AMD erratum 1467 forbids VMSAs on 2 MiB-aligned pages)")]
    Erratum1467 {
        /// The page's address.
        gpa: Gpa,
    },
    /// The page lies beyond the guest's MAXPHYADDR (`page_address_valid`).
    #[error("a VMSA page at GPA {gpa} lies beyond the guest's {max_phys_bits}-bit physical address space")]
    BeyondMaxPhys {
        /// The page's address.
        gpa: Gpa,
        /// The guest's MAXPHYADDR.
        max_phys_bits: u8,
    },
    /// The page's SEV_FEATURES are not the VM's `vmsa_features` (the check
    /// `sev_snp_ap_creation` makes on AP VMSAs: "mismatched AP sev_features").
    #[error("the VMSA page at GPA {gpa} has SEV_FEATURES {found:#x}; the VM runs with {expected:#x}")]
    FeatureMismatch {
        /// The page's address.
        gpa: Gpa,
        /// SEV_FEATURES in the page.
        found: u64,
        /// The VM's `vmsa_features` (with SNP_ACTIVE).
        expected: u64,
    },
    /// The VM has no vCPU yet, so there is no BSP to own the page.
    #[error(
        "a VMSA page at GPA {gpa} before any vCPU exists: the first vCPU created is the BSP that owns it"
    )]
    NoBsp {
        /// The page's address.
        gpa: Gpa,
    },
    /// The BSP already has its supplied VMSA; only one VMSA is supplied per launch.
    #[error(
        "vCPU {vcpu} already has the supplied VMSA at GPA {existing}; a second one at GPA {gpa} is refused"
    )]
    Duplicate {
        /// The BSP.
        vcpu: VcpuId,
        /// The VMSA it has.
        existing: Gpa,
        /// The page refused.
        gpa: Gpa,
    },
    /// The launch finished: the measurement is closed (and the guest runs; it creates VMSAs
    /// through AP creation only).
    #[error("a VMSA page at GPA {gpa} after launch finish: the launch measurement is closed")]
    AfterLaunchFinish {
        /// The page's address.
        gpa: Gpa,
    },
    /// Launch finish in the supplied mode without the BSP's VMSA: the BSP could never run.
    #[error("launch finish without a supplied VMSA for the BSP (vCPU {vcpu}): it would have nothing to run")]
    MissingBspVmsa {
        /// The BSP.
        vcpu: VcpuId,
    },
}

/// Errors of vmsa-core, generic over the platform's error `E`.
#[derive(Debug, thiserror::Error)]
pub enum Error<E: core::error::Error + Send + Sync + 'static> {
    /// A transition was called from a state it is not defined for (also reported as a `Warn`
    /// event: in the kernel this is a `WARN_ON_ONCE`).
    #[error("vCPU {vcpu}: {op} is not valid for a VMSA in state {state}")]
    InvalidState {
        /// The vCPU.
        vcpu: VcpuId,
        /// The transition attempted.
        op: Op,
        /// The state found.
        state: StateKind,
    },
    /// The guest state was already launched, so writing it would write an encrypted page.
    #[error("vCPU {vcpu}: guest state is already protected, so {op} would write an encrypted VMSA")]
    AlreadyProtected {
        /// The vCPU.
        vcpu: VcpuId,
        /// The operation attempted.
        op: Op,
    },
    /// Guest debugging cannot be used with protected register state.
    #[error("vCPU {vcpu}: guest debugging is enabled; SEV-ES/SNP VMSAs cannot be launched with it")]
    GuestDebug {
        /// The vCPU.
        vcpu: VcpuId,
    },
    /// DR7 must be in its reset state when a VMSA is launched.
    #[error(
        "vCPU {vcpu}: DR7 {dr7:#x} has bits beyond DR7_FIXED_1 (0x400); a launched VMSA may not carry breakpoints"
    )]
    Dr7 {
        /// The vCPU.
        vcpu: VcpuId,
        /// Its DR7.
        dr7: u64,
    },
    /// A platform operation failed.
    #[error("{}{op} failed", vcpu.map(|v| format!("vCPU {v}: ")).unwrap_or_default())]
    Platform {
        /// The vCPU concerned, if any.
        vcpu: Option<VcpuId>,
        /// The operation.
        op: PlatformOp,
        /// The platform's error.
        #[source]
        source: E,
    },
    /// The allocator kept returning 2 MiB-aligned pages.
    #[error(
        "vCPU {vcpu}: {tries} page allocations in a row were 2 MiB aligned (erratum 1467 forbids them for a VMSA)"
    )]
    NoUnalignedPage {
        /// The vCPU.
        vcpu: VcpuId,
        /// Attempts made.
        tries: usize,
    },
    /// No vCPU has this id.
    #[error("no vCPU with id {0}")]
    UnknownVcpu(VcpuId),
    /// A vCPU with this id exists already.
    #[error("vCPU {0} already exists")]
    VcpuExists(VcpuId),
    /// A launch command came in the wrong launch phase.
    #[error("{op} is not allowed while the launch is {state}")]
    Launch {
        /// The command.
        op: &'static str,
        /// The phase the VM is in.
        state: LaunchState,
    },
    /// The command exists only for another kind of guest.
    #[error("{op} needs an {needed} guest; this is an {kind} guest")]
    WrongKind {
        /// The command.
        op: &'static str,
        /// The kind it needs.
        needed: VmKind,
        /// The VM's kind.
        kind: VmKind,
    },
    /// A guest policy broke a rule.
    #[error("guest policy {policy:#x}: {rule}")]
    BadPolicy {
        /// The policy.
        policy: u64,
        /// The rule broken.
        rule: &'static str,
    },
    /// A launch-update range broke a rule.
    #[error("launch update of {len:#x} bytes at GPA {gpa}: {rule}")]
    BadLaunchUpdate {
        /// Start of the range.
        gpa: Gpa,
        /// Length of the range in bytes.
        len: u64,
        /// The rule broken.
        rule: &'static str,
    },
    /// No guest memory backs a guest frame.
    #[error("no guest memory (memslot with guest_memfd) backs GPA {gpa}")]
    NoGuestMemory {
        /// The address.
        gpa: Gpa,
    },
    /// An AP-creation request was refused.
    #[error(transparent)]
    ApCreation(#[from] ApCreationError),
    /// The vCPU is runnable but has no valid VMSA (KVM_RUN returns -EINVAL in this case).
    #[error("vCPU {vcpu}: runnable but its VMCB holds no valid VMSA address (INVALID_PAGE)")]
    InvalidVmsa {
        /// The vCPU.
        vcpu: VcpuId,
    },
    /// The guest policy forbids debugging.
    #[error("debug decrypt of vCPU {vcpu} refused: policy {policy:#x} {rule}")]
    DebugPolicy {
        /// The vCPU.
        vcpu: VcpuId,
        /// The guest policy.
        policy: u64,
        /// The rule.
        rule: &'static str,
    },
    /// The VM's configuration is one KVM refuses at init.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A supplied VMSA (launch update of page type VMSA) was refused.
    #[error(transparent)]
    SuppliedVmsa(#[from] SuppliedVmsaError),
    /// Intra-host migration refused.
    #[error("intra-host migration refused: {0}")]
    Migration(#[from] MigrationError),
    /// The VM's encryption context was migrated away; only teardown remains.
    #[error("the VM is dead: its encryption context was migrated to another VM")]
    VmDead,
    /// A page was leaked earlier; like a `KVM_BUG`'d VM, only teardown remains.
    #[error("the VM is bugged: pfn {pfn} was leaked (vCPU {vcpu:?}); only teardown is allowed")]
    VmBugged {
        /// The vCPU whose page leaked, if any.
        vcpu: Option<VcpuId>,
        /// The leaked frame.
        pfn: Pfn,
    },
}
