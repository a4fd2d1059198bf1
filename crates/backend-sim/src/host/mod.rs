//! The simulator as an SEV-SNP host behind the one host interface ([`vmsa_host`]).
//!
//! vmsa-core's `Vm<SimPlatform>` plays the KVM kernel: vCPU creation allocates the VMSA
//! (`sev_vcpu_create`), launch finish syncs, makes private and launches every VMSA
//! (`snp_launch_update_vmsa`), the guest's GHCB AP-creation requests go to `Vm::ap_creation`
//! (`sev_snp_ap_creation`) and INIT installs the requested guest VMSA. The [`Machine`] is the
//! hardware beneath it (RMP, PSP firmware, memory, costs, faults), and the scripted guest the
//! host was built with stands in for the guest's code and produces the exits. The interface
//! refuses what KVM refuses, with KVM's errno ([`rules`]), so a VMM's ordering mistakes show
//! here first.
//!
//! ```
//! use backend_sim::host::SimHost;
//! use backend_sim::{GuestScript, Machine, MachineConfig};
//! use vmsa_host::{Errno, Hypervisor, LaunchUpdate, Vm, VmSpec};
//! use vmsa_core::{Gpa, SnpPageType, VmKind};
//!
//! let host = SimHost::new(Machine::new(MachineConfig::default()), GuestScript::default());
//! let mut vm = host.create_vm(VmSpec::snp(0))?;
//! // KVM refuses a launch update before the launch starts, and so does the simulator.
//! let page = [0u8; 4096];
//! let update = LaunchUpdate { gpa: Gpa(0x1000), len: 4096, page_type: SnpPageType::Normal, data: Some(&page) };
//! let refused = vm.launch_update(update).unwrap_err();
//! assert_eq!(refused.refusal().map(|r| r.errno), Some(Errno::EINVAL));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::Arc;

use vmsa_core::VmKind;
use vmsa_core::layout::{SEV_FEAT_DEBUG_SWAP, SEV_FEAT_SECURE_TSC};
use vmsa_host::{Capabilities, Hypervisor, HypervisorError, VmSpec};

use crate::guest::GuestScript;
use crate::machine::Machine;

mod cpu;
pub mod rules;
mod vcpu;
mod vm;

pub use cpu::run_script;
pub use vcpu::{SimKick, SimVcpu};
use vm::Role;
pub use vm::SimVm;

/// The most vCPUs a simulated VM takes (KVM's `KVM_MAX_VCPUS` on x86 is larger; the
/// simulator's APIC IDs fit the firmware's 512-vCPU measurement limit).
pub const MAX_VCPUS: u32 = 512;

/// An SEV-SNP host in software: a [`Machine`] and the guest program (a script) its vCPUs run.
#[derive(Debug)]
pub struct SimHost {
    machine: Arc<Machine>,
    script: Arc<GuestScript>,
    caps: Capabilities,
    options: HostOptions,
}

/// The host kernel's settings (kvm_amd's module parameters).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct HostOptions {
    /// `kvm_amd.dump_invalid_vmcb`: after a failed VMRUN, dump the VMCB and the vCPU's save
    /// area (decrypted where the guest policy allows) into the report's
    /// [`vmsa_host::GuestActivity::vmcb_dumps`].
    pub dump_invalid_vmcb: bool,
}

impl SimHost {
    /// A host on `machine` whose guests run `script`.
    pub fn new(machine: Arc<Machine>, script: GuestScript) -> Self {
        Self {
            machine,
            script: Arc::new(script),
            caps: Capabilities {
                kinds: vec![VmKind::SevEs, VmKind::Snp],
                vmsa_features: SEV_FEAT_DEBUG_SWAP | SEV_FEAT_SECURE_TSC,
                max_vcpus: MAX_VCPUS,
                ownership_visible: true,
                launch_digest_visible: true,
                private_memory: true,
                // vmsa-core's supplied-VMSA mode: SNP_LAUNCH_UPDATE takes page type 2 (VMSA) in
                // a VM created with VmSpec::supplied_vmsa, as the series' 4/4 proposes.
                supplied_vmsa: true,
                // vmsa-core's Vm::migrate_from, as sev_vm_move_enc_context_from (SEV-ES only).
                intra_host_migration: true,
            },
            options: HostOptions::default(),
        }
    }

    /// This host with `kvm_amd.dump_invalid_vmcb` set or not (off by default, as in KVM): a
    /// vCPU whose VMRUN fails then has its VMCB dumped, and its save area with it, which
    /// `sev_decrypt_vmsa` decrypts if the guest policy allows debugging (`SNP_DBG_DECRYPT` /
    /// `DBG_DECRYPT`); see [`vmsa_host::VmcbDump`].
    pub fn with_dump_invalid_vmcb(mut self, on: bool) -> Self {
        self.options.dump_invalid_vmcb = on;
        self
    }

    /// The machine beneath (costs, trace, fault plan, frame ledger).
    pub fn machine(&self) -> &Arc<Machine> {
        &self.machine
    }
}

impl Hypervisor for SimHost {
    type Vm = SimVm;

    fn name(&self) -> &str {
        "sim"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn create_vm(&self, spec: VmSpec) -> Result<SimVm, HypervisorError> {
        rules::check_init(&spec, self.caps.vmsa_features)?;
        SimVm::new(
            &self.machine,
            spec,
            Role::Confidential,
            self.options,
            self.script.clone(),
        )
    }

    fn create_migration_target(&self, kind: VmKind) -> Result<SimVm, HypervisorError> {
        let spec = VmSpec {
            kind,
            vmsa_features: 0,
            supplied_vmsa: false,
        };
        SimVm::new(
            &self.machine,
            spec,
            Role::MigrationTarget,
            self.options,
            self.script.clone(),
        )
    }
}
