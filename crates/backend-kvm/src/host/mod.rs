//! backend-kvm behind vmsa-host's interface ([`vmsa_host::Hypervisor`] → [`vmsa_host::Vm`] →
//! [`vmsa_host::Vcpu`]), in both modes:
//!
//! - [`image`]: VMSA-image mode, vmsa-core playing the SNP kernel over plain KVM;
//! - [`snp`]: SEV-SNP mode, a thin layer of ioctls over a real SNP KVM;
//! - [`KvmHost`]: probes the host and picks SNP where it can, VMSA-image mode otherwise,
//!   keeping the probe's reason for the report.
//!
//! Both modes kick vCPUs the same way ([`crate::kick`]). The VMM drives them only through the
//! traits.

pub mod image;
pub mod snp;

use vmsa_host::{
    Capabilities, Conversion, Errno, HostReport, Hypervisor, HypervisorError, LaunchUpdate, MemoryRegion,
    Observed, Vcpu, VcpuError, VcpuExit, Vm, VmError, VmSpec,
};

pub use image::{KvmImageHost, KvmImageVcpu, KvmImageVm};
pub use snp::{KvmSnpHost, KvmSnpVcpu, KvmSnpVm};

use crate::guest::builtin::{GuestImage, GuestImageError, GuestProgram};
use crate::kick::KvmKick;
use crate::probe::{Missing, Mode, ProbeReport};

/// Why this backend could not do something the interface asked, beyond KVM's own refusals.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// The probe says the mode cannot run here.
    #[error("{mode} mode is not available on this host: {}", missing.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Missing {
        /// The mode.
        mode: Mode,
        /// Why, from the probe.
        missing: Vec<Missing>,
    },
    /// VMSA-image mode fixes its frame space when the first vCPU is created.
    #[error("VMSA-image mode takes guest memory only before the first vCPU is created")]
    MemoryAfterVcpus,
    /// A vCPU call came before vmsa-core's VM existed.
    #[error("vmsa-core's VM does not exist yet")]
    NoVm,
    /// A memory region's size does not fit this host's address space (`usize`), so its shared
    /// mapping cannot be made.
    #[error("memory region size {size:#x} does not fit this host's address space")]
    RegionTooLarge {
        /// The size asked for.
        size: u64,
    },
}

/// The kvm host of this machine: SEV-SNP where the host has it, else VMSA-image mode.
#[derive(Debug)]
pub enum KvmHost {
    /// A real SEV-SNP KVM.
    Snp(KvmSnpHost),
    /// Plain KVM with vmsa-core playing the SNP kernel.
    Image(KvmImageHost),
}

impl KvmHost {
    /// Probe this host and pick the mode.
    pub fn new() -> Result<Self, HypervisorError> {
        Self::from_probe(&crate::probe::probe())
    }

    /// The built-in guest `program` on `vcpus` vCPUs as this mode runs it: in VMSA-image mode
    /// the program itself (it creates its APs through the GHCB doorbell); on SEV-SNP, where
    /// AP creation is the kernel's and the program's doorbell does not exist, every vCPU
    /// terminates through the GHCB MSR protocol, with the C-bit of this host's CPUID.
    pub fn builtin_guest(&self, program: &GuestProgram, vcpus: u32) -> Result<GuestImage, GuestImageError> {
        match self {
            Self::Image(_) => program.image(vcpus),
            Self::Snp(_) => {
                let kvm =
                    kvm_ioctls::Kvm::new().map_err(|e| crate::error::IoctlError::new("open /dev/kvm", e))?;
                let table = crate::cpuid::supported(&kvm)?;
                let c_bit = crate::cpuid::c_bit(&table).map_err(|ebx| GuestImageError::NoCBit { ebx })?;
                crate::guest::builtin::snp_terminate(c_bit, vcpus)
            }
        }
    }

    /// Pick the mode a probe allows: SNP if supported, else VMSA-image mode, saying why.
    pub fn from_probe(probe: &ProbeReport) -> Result<Self, HypervisorError> {
        if probe.supports(Mode::Snp) {
            return Ok(Self::Snp(KvmSnpHost::new(probe)?));
        }
        let why = probe
            .missing(Mode::Snp)
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let reason = format!(
            "SEV-SNP is not available ({why}); using VMSA-image mode: real vCPUs started from VMSA images, without encryption or RMP"
        );
        Ok(Self::Image(KvmImageHost::new(probe, reason)?))
    }

    /// The mode picked.
    pub fn mode(&self) -> Mode {
        match self {
            Self::Snp(_) => Mode::Snp,
            Self::Image(_) => Mode::VmsaImage,
        }
    }

    /// Why this mode (for the report).
    pub fn reason(&self) -> &str {
        match self {
            Self::Snp(h) => h.reason(),
            Self::Image(h) => h.reason(),
        }
    }

    /// What its VMs' guest RAM is, from GPA 0 (for the report).
    pub fn memory_layout(&self) -> String {
        match self {
            Self::Snp(_) => "guest_memfd-backed RAM from GPA 0".to_owned(),
            Self::Image(h) => format!("RAM in {} from GPA 0", h.ram_backing()),
        }
    }
}

/// A VM of [`KvmHost`]: one of the two modes.
#[derive(Debug)]
pub enum KvmVm {
    /// SEV-SNP mode.
    Snp(KvmSnpVm),
    /// VMSA-image mode.
    Image(KvmImageVm),
}

/// A vCPU of [`KvmVm`].
#[derive(Debug)]
pub enum KvmVcpu {
    /// SEV-SNP mode.
    Snp(KvmSnpVcpu),
    /// VMSA-image mode.
    Image(KvmImageVcpu),
}

/// Forward a call to whichever mode `self` is.
macro_rules! either {
    ($self:expr, $x:ident => $body:expr) => {
        match $self {
            Self::Snp($x) => $body,
            Self::Image($x) => $body,
        }
    };
}

impl Hypervisor for KvmHost {
    type Vm = KvmVm;

    fn name(&self) -> &str {
        either!(self, h => h.name())
    }

    fn capabilities(&self) -> &Capabilities {
        either!(self, h => h.capabilities())
    }

    fn create_vm(&self, spec: VmSpec) -> Result<KvmVm, HypervisorError> {
        match self {
            Self::Snp(h) => h.create_vm(spec).map(KvmVm::Snp),
            Self::Image(h) => h.create_vm(spec).map(KvmVm::Image),
        }
    }
}

impl Vm for KvmVm {
    type Vcpu = KvmVcpu;

    fn spec(&self) -> VmSpec {
        either!(self, v => v.spec())
    }

    fn add_memory(&mut self, region: MemoryRegion) -> Result<(), VmError> {
        either!(self, v => v.add_memory(region))
    }

    fn set_memory_attributes(&self, range: Conversion) -> Result<(), VmError> {
        either!(self, v => v.set_memory_attributes(range))
    }

    fn launch_start(&mut self, policy: u64) -> Result<(), VmError> {
        either!(self, v => v.launch_start(policy))
    }

    fn launch_update(&mut self, update: LaunchUpdate<'_>) -> Result<(), VmError> {
        either!(self, v => v.launch_update(update))
    }

    fn launch_update_vmsas(&mut self) -> Result<(), VmError> {
        either!(self, v => v.launch_update_vmsas())
    }

    fn launch_finish(&mut self) -> Result<(), VmError> {
        either!(self, v => v.launch_finish())
    }

    fn create_vcpu(&mut self, id: u32) -> Result<KvmVcpu, VmError> {
        match self {
            Self::Snp(v) => v.create_vcpu(id).map(KvmVcpu::Snp),
            Self::Image(v) => v.create_vcpu(id).map(KvmVcpu::Image),
        }
    }

    fn cycles(&self) -> Observed<u64> {
        either!(self, v => v.cycles())
    }

    fn teardown(self) -> HostReport {
        either!(self, v => v.teardown())
    }
}

impl Vcpu for KvmVcpu {
    type Kick = KvmKick;

    fn id(&self) -> u32 {
        either!(self, v => v.id())
    }

    fn set_state(&mut self, vmsa: &vmsa_core::SevEsSaveArea) -> Result<(), VcpuError> {
        either!(self, v => v.set_state(vmsa))
    }

    fn run(&mut self) -> Result<VcpuExit, VcpuError> {
        either!(self, v => v.run())
    }

    fn complete_conversion(&mut self, result: Result<(), Errno>) -> Result<(), VcpuError> {
        either!(self, v => v.complete_conversion(result))
    }

    fn kicker(&self) -> KvmKick {
        either!(self, v => v.kicker())
    }
}
