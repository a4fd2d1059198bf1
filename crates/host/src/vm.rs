//! A confidential VM: guest memory, conversions, the launch, vCPU creation, teardown.

use serde::Serialize;
use vmsa_core::{Gpa, SnpPageType, VmKind};

use crate::exit::Conversion;
use crate::refusal::Refusal;
use crate::report::{HostReport, Observed};
use crate::vcpu::Vcpu;

/// The confidential VM to create: the `KVM_CREATE_VM` type and `KVM_SEV_INIT2`'s
/// `vmsa_features` (without `SNP_ACTIVE`, which the host adds for SNP, as
/// `__sev_guest_init` does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct VmSpec {
    /// SEV-ES or SEV-SNP.
    pub kind: VmKind,
    /// The extra SEV features every VMSA of the guest runs with.
    pub vmsa_features: u64,
    /// The supplied-VMSA launch mode (SNP only; the "Streamline VMSA setting" series' 4/4,
    /// which gates it with a flag at init): the host allocates no VMSA for any vCPU, the VMM
    /// supplies the BSP's VMSA with a [`LaunchUpdate`] of page type
    /// [`SnpPageType::Vmsa`], the APs get theirs from the guest's AP creation, and the launch
    /// digest does not depend on the vCPU count. `false` is KVM's classic mode (one VMSA per
    /// vCPU, measured at launch finish). Only where [`crate::Capabilities::supplied_vmsa`].
    pub supplied_vmsa: bool,
}

impl VmSpec {
    /// An SEV-SNP VM in the classic mode with these extra SEV features.
    pub const fn snp(vmsa_features: u64) -> Self {
        Self {
            kind: VmKind::Snp,
            vmsa_features,
            supplied_vmsa: false,
        }
    }

    /// An SEV-ES VM with these SEV features.
    pub const fn sev_es(vmsa_features: u64) -> Self {
        Self {
            kind: VmKind::SevEs,
            vmsa_features,
            supplied_vmsa: false,
        }
    }

    /// This VM in the supplied-VMSA launch mode.
    pub const fn with_supplied_vmsa(self) -> Self {
        Self {
            supplied_vmsa: true,
            ..self
        }
    }
}

/// A guest memory slot (`KVM_SET_USER_MEMORY_REGION2`). With `guest_memfd` the host backs its
/// private side with a guest_memfd (`KVM_CREATE_GUEST_MEMFD`), which SNP private memory needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryRegion {
    /// The slot number.
    pub slot: u32,
    /// First guest-physical byte (page aligned).
    pub gpa: Gpa,
    /// Length in bytes (a multiple of 4 KiB).
    pub size: u64,
    /// Back the private side with a guest_memfd.
    pub guest_memfd: bool,
}

impl MemoryRegion {
    /// A guest's whole RAM as one guest_memfd-backed memslot: slot 0, `size` bytes from GPA 0.
    pub const fn ram(size: u64) -> Self {
        Self {
            slot: 0,
            gpa: Gpa(0),
            size,
            guest_memfd: true,
        }
    }
}

/// One launch update (`KVM_SEV_SNP_LAUNCH_UPDATE`, or SEV-ES `LAUNCH_UPDATE_DATA`): `len`
/// bytes at `gpa` of one page type, from `data` (none for ZERO pages). Page type
/// [`SnpPageType::Vmsa`] (2, `KVM_SEV_SNP_PAGE_TYPE_VMSA` as the pre-merge SNP uapi reserved
/// it, the firmware's `SNP_PAGE_TYPE_VMSA`) is the BSP's VMSA, one page, and only in a VM
/// created with [`VmSpec::supplied_vmsa`]; KVM's classic mode refuses it (`EINVAL`,
/// `snp_launch_update`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchUpdate<'a> {
    /// First page.
    pub gpa: Gpa,
    /// Length in bytes.
    pub len: u64,
    /// The SNP page type (SEV-ES takes only `Normal`).
    pub page_type: SnpPageType,
    /// The contents (`uaddr`), `len` bytes; `None` for ZERO pages.
    pub data: Option<&'a [u8]>,
}

/// Why a VM call failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The call broke one of KVM's rules (launch update before launch start, a range not
    /// private, vCPU creation after launch finish, ...).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The host's own call failed (a firmware error, an ioctl, the simulated machine).
    #[error("{call}: {source}")]
    Host {
        /// The failing call.
        call: &'static str,
        /// The host's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl VmError {
    /// A host failure of `call`.
    pub fn host(call: &'static str, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Host {
            call,
            source: Box::new(source),
        }
    }

    /// The refusal, if the call broke a rule.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            Self::Refused(r) => Some(r),
            Self::Host { .. } => None,
        }
    }
}

/// A confidential VM. The VMM calls the launch steps in KVM's order and then runs each vCPU on
/// its own thread; conversions come from those threads, so they take `&self`.
pub trait Vm: Sync {
    /// The vCPUs it creates.
    type Vcpu: Vcpu;

    /// What was created.
    fn spec(&self) -> VmSpec;

    /// Add a guest memory slot.
    fn add_memory(&mut self, region: MemoryRegion) -> Result<(), VmError>;

    /// `KVM_SET_MEMORY_ATTRIBUTES`: make a range private or shared (the host releases or
    /// assigns the backing pages as KVM and guest_memfd do).
    fn set_memory_attributes(&self, range: Conversion) -> Result<(), VmError>;

    /// `LAUNCH_START` / `KVM_SEV_SNP_LAUNCH_START` with the guest policy.
    fn launch_start(&mut self, policy: u64) -> Result<(), VmError>;

    /// Measure and encrypt pages into the guest (`KVM_SEV_SNP_LAUNCH_UPDATE`, SEV-ES
    /// `LAUNCH_UPDATE_DATA`).
    fn launch_update(&mut self, update: LaunchUpdate<'_>) -> Result<(), VmError>;

    /// SEV-ES `KVM_SEV_LAUNCH_UPDATE_VMSA`: encrypt every vCPU's VMSA (SNP does this inside
    /// launch finish and refuses the call).
    fn launch_update_vmsas(&mut self) -> Result<(), VmError>;

    /// `KVM_SEV_SNP_LAUNCH_FINISH` (SNP in the classic mode: every vCPU's VMSA is synced, made
    /// private and measured first; with supplied VMSAs none is) or SEV-ES `LAUNCH_FINISH`.
    fn launch_finish(&mut self) -> Result<(), VmError>;

    /// `KVM_CREATE_VCPU` with APIC ID `id` (in the classic mode the host allocates its VMSA;
    /// with supplied VMSAs it allocates none).
    fn create_vcpu(&mut self, id: u32) -> Result<Self::Vcpu, VmError>;

    /// The host's clock in simulated cycles, where it has one.
    fn cycles(&self) -> Observed<u64>;

    /// Destroy the VM (its vCPUs must be dropped first) and report what it did and left.
    fn teardown(self) -> HostReport;

    /// `KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM` on this VM (made by
    /// [`crate::Hypervisor::create_migration_target`], with as many vCPUs as `source`): take
    /// `source`'s encryption context, launch state and every vCPU's VMSA; `source` is dead
    /// afterwards (`kvm_vm_dead`: only teardown is left). Nothing moves if a rule is broken.
    /// Guest memory slots do not move: the VMM adds the same ones to this VM first.
    fn move_enc_context_from(&mut self, _source: &mut Self) -> Result<(), VmError> {
        Err(Refusal::new(
            "KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM",
            crate::Errno::EINVAL,
            "this host cannot move an encryption context between VMs",
        )
        .into())
    }
}
