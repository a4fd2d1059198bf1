//! The host: what it can run, and VM creation.

use serde::Serialize;
use vmsa_core::VmKind;

use crate::refusal::Refusal;
use crate::vm::{Vm, VmSpec};

/// What a host can do and show, answered before anything is created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// The confidential VM kinds it creates.
    pub kinds: Vec<VmKind>,
    /// The SEV features `vmsa_features` may hold (`KVM_X86_SEV_VMSA_FEATURES`).
    pub vmsa_features: u64,
    /// The most vCPUs one VM may have.
    pub max_vcpus: u32,
    /// Whether the host can report each vCPU's VMSA ownership history (a real SNP kernel
    /// cannot: the VMSAs are its own).
    pub ownership_visible: bool,
    /// Whether the host reports the launch digest the firmware computed.
    pub launch_digest_visible: bool,
    /// Whether its SNP VMs have private memory (`KVM_MEMORY_ATTRIBUTE_PRIVATE` over
    /// guest_memfd). Where they do, a range must be made private
    /// ([`crate::Vm::set_memory_attributes`]) before a launch update measures it, as KVM's
    /// `kvm_gmem_populate` requires.
    pub private_memory: bool,
    /// Whether it creates VMs in the supplied-VMSA launch mode ([`crate::VmSpec::supplied_vmsa`]:
    /// `SNP_LAUNCH_UPDATE` takes the BSP's VMSA, the series' 4/4). Mainline KVM does not.
    pub supplied_vmsa: bool,
    /// Whether it moves an SEV-ES guest's encryption context into another VM
    /// (`KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM`: [`Hypervisor::create_migration_target`], then
    /// [`crate::Vm::move_enc_context_from`]). A host without it keeps their defaults, which
    /// refuse.
    pub intra_host_migration: bool,
}

/// Why a host could not create a VM.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The call broke one of KVM's rules.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The host cannot run this kind of VM.
    #[error("create_vm: {kind} guests need what this host lacks: {reason}")]
    Unsupported {
        /// The kind asked for.
        kind: VmKind,
        /// What is missing (the probe's reasons).
        reason: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The host's own call failed.
    #[error("{call}: {source}")]
    Host {
        /// The failing call.
        call: &'static str,
        /// The host's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A host that runs confidential VMs: Cloud Hypervisor's `Hypervisor`, with an associated VM type.
pub trait Hypervisor {
    /// The VMs it creates.
    type Vm: Vm;

    /// A short name for reports (`"sim"`, `"kvm VMSA-image"`, `"kvm SEV-SNP"`).
    fn name(&self) -> &str;

    /// What it can create and show.
    fn capabilities(&self) -> &Capabilities;

    /// `KVM_CREATE_VM` of the kind's type, then `KVM_SEV_INIT2` with `spec.vmsa_features`.
    fn create_vm(&self, spec: VmSpec) -> Result<Self::Vm, HypervisorError>;

    /// `KVM_CREATE_VM` of the kind's type without `KVM_SEV_INIT2`: the destination of an
    /// intra-host migration, which gets its encryption context (and its vCPUs' VMSAs) from a
    /// launched VM with [`crate::Vm::move_enc_context_from`] once it has as many vCPUs
    /// (`sev_vm_move_enc_context_from` requires the same VM type, a destination that is no SEV
    /// guest yet, and `sev_check_source_vcpus` the same vCPU count).
    fn create_migration_target(&self, _kind: VmKind) -> Result<Self::Vm, HypervisorError> {
        Err(Refusal::new(
            "KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM",
            crate::Errno::EINVAL,
            "this host cannot move an encryption context between VMs",
        )
        .into())
    }
}
