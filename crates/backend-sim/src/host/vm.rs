//! [`SimVm`]: one confidential VM on the simulated host, with vmsa-core as its kernel.

use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use vmsa_core::{EventLog, VcpuId, VmConfig, VmKind};
use vmsa_host::{
    Conversion, Errno, HostReport, HypervisorError, LaunchUpdate, MemoryRegion, Observed, Refusal,
    TeardownCounts, VmError, VmSpec,
};

use super::cpu::{Cpus, convert};
use super::rules;
use super::vcpu::SimVcpu;
use crate::guest::GuestScript;
use crate::machine::Machine;
use crate::platform::SimPlatform;

/// A guest page state change waiting for the VMM's answer.
#[derive(Debug)]
pub(super) struct Pending {
    /// The vCPU that asked.
    pub vcpu: u32,
    /// Its action's index in the script.
    pub index: usize,
    /// The action.
    pub action: crate::guest::GuestAction,
    /// The range.
    pub range: Conversion,
    /// What converting each page did, or why it failed (set by `set_memory_attributes`).
    pub result: Option<Result<String, String>>,
}

/// The scripted guest's execution state: the next action, the processors, the pending
/// conversion, kicks.
#[derive(Debug)]
pub(super) struct Guest {
    pub script: Arc<GuestScript>,
    pub next: usize,
    pub cpus: Cpus,
    pub pending: Option<Pending>,
    /// The action that took a memory fault and runs again after the VMM's conversion, and the
    /// page it faulted at (a fault at another page of the same action is a new exit).
    pub faulted: Option<(usize, vmsa_core::Gpa)>,
    pub kicked: BTreeSet<u32>,
    pub vcpus: BTreeSet<u32>,
    pub done_reported: bool,
}

/// What the VM and its vCPUs share.
#[derive(Debug)]
pub(super) struct Shared {
    /// The host kernel's view of the VM: VMSA ownership, launch state, AP creation. Its
    /// platform is the guest on the machine (ASID, memory, firmware context), which an
    /// intra-host migration moves to another VM.
    pub kernel: RwLock<vmsa_core::Vm<SimPlatform>>,
    pub guest: Mutex<Guest>,
    /// One per vCPU ID: signalled when that vCPU has something to do (its action is next, it
    /// was kicked, or, for the BSP, the script is exhausted), so progress wakes one thread,
    /// not all of them.
    pub wakes: Vec<Condvar>,
}

impl Shared {
    pub fn guest(&self) -> MutexGuard<'_, Guest> {
        self.guest.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wake whoever runs next, after the guest made progress (`g` is the locked state): the
    /// vCPU whose action is next, every vCPU when that one was never created (any of them runs
    /// it), or the BSP when the script is exhausted (it reports done).
    pub fn wake_next(&self, g: &Guest) {
        match g.script.actions.get(g.next).map(|a| a.vcpu()) {
            Some(v) if g.vcpus.contains(&v) => self.wake(v),
            Some(_) => g.vcpus.iter().for_each(|&v| self.wake(v)),
            None => self.wake(0),
        }
    }

    /// Wake vCPU `id`'s thread.
    pub fn wake(&self, id: u32) {
        if let Some(c) = self.wakes.get(id as usize) {
            c.notify_all();
        }
    }

    pub fn kernel(&self) -> RwLockReadGuard<'_, vmsa_core::Vm<SimPlatform>> {
        self.kernel.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The guest on the machine this VM holds now.
    pub fn platform(&self) -> SimPlatform {
        self.kernel().platform().clone()
    }

    fn kernel_mut(&self) -> RwLockWriteGuard<'_, vmsa_core::Vm<SimPlatform>> {
        self.kernel.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// One confidential VM on the simulated host.
#[derive(Debug)]
pub struct SimVm {
    spec: VmSpec,
    shared: Arc<Shared>,
    events: Arc<EventLog>,
    regions: Vec<MemoryRegion>,
}

/// How a [`SimVm`] is created.
#[derive(Clone, Copy, Debug)]
pub(super) enum Role {
    /// `KVM_CREATE_VM` + `KVM_SEV_INIT2`: a confidential VM of the spec.
    Confidential,
    /// `KVM_CREATE_VM` alone: the destination of an intra-host migration.
    MigrationTarget,
}

impl SimVm {
    pub(super) fn new(
        machine: &Arc<Machine>,
        spec: VmSpec,
        role: Role,
        options: super::HostOptions,
        script: Arc<GuestScript>,
    ) -> Result<Self, HypervisorError> {
        let platform = machine
            .create_guest(spec.kind)
            .map_err(|e| HypervisorError::Host {
                call: "KVM_CREATE_VM",
                source: Box::new(e),
            })?;
        let events = Arc::new(EventLog::new());
        let kernel = match role {
            Role::Confidential => {
                let config = match spec.kind {
                    VmKind::Snp => VmConfig::snp(spec.vmsa_features),
                    VmKind::SevEs => VmConfig::sev_es(spec.vmsa_features),
                };
                // The supplied-VMSA mode is fixed here, before any vCPU: vmsa-core then
                // allocates no VMSA at vCPU creation (rules::check_init refused it for SEV-ES).
                let config = VmConfig {
                    supplied_vmsa: spec.supplied_vmsa,
                    ..config
                };
                vmsa_core::Vm::new(platform, config, events.clone())
            }
            Role::MigrationTarget => vmsa_core::Vm::migration_target(platform, events.clone()),
        };
        let cpus = Cpus::new(options.dump_invalid_vmcb);
        Ok(Self {
            spec,
            shared: Arc::new(Shared {
                kernel: RwLock::new(kernel),
                guest: Mutex::new(Guest {
                    script,
                    next: 0,
                    cpus,
                    pending: None,
                    faulted: None,
                    kicked: BTreeSet::new(),
                    vcpus: BTreeSet::new(),
                    done_reported: false,
                }),
                wakes: (0..super::MAX_VCPUS).map(|_| Condvar::new()).collect(),
            }),
            events,
            regions: Vec::new(),
        })
    }

    /// The simulated guest this VM holds now (its ASID, memory, launch digest).
    pub fn platform(&self) -> SimPlatform {
        self.shared.platform()
    }
}

impl vmsa_host::Vm for SimVm {
    type Vcpu = SimVcpu;

    fn spec(&self) -> VmSpec {
        self.spec
    }

    fn add_memory(&mut self, region: MemoryRegion) -> Result<(), VmError> {
        let max_phys_bits = self.shared.kernel().config().max_phys_bits;
        rules::check_region(&region, &self.regions, max_phys_bits)?;
        // Private memory only comes from guest_memfd; a slot without one holds shared memory
        // the guest cannot launch into (snp_launch_update refuses it).
        if region.guest_memfd {
            self.shared
                .platform()
                .add_memslot(region.gpa, region.size)
                .map_err(|e| VmError::host("KVM_SET_USER_MEMORY_REGION2", e))?;
        }
        self.regions.push(region);
        Ok(())
    }

    /// `KVM_SET_MEMORY_ATTRIBUTES`, and what QEMU does next for a conversion to shared: punch
    /// the private page out of guest_memfd, which makes it shared in the RMP and frees it
    /// (`sev_gmem_invalidate`); any guest VMSA there is re-resolved at its vCPU's next entry.
    fn set_memory_attributes(&self, range: Conversion) -> Result<(), VmError> {
        rules::check_conversion(&range, self.spec.kind)?;
        let mut g = self.shared.guest();
        let kernel = self.shared.kernel();
        let result = convert(&kernel, &mut g.cpus, range);
        drop(kernel);
        if let Some(pending) = g.pending.as_mut().filter(|p| p.range == range) {
            pending.result = Some(result.clone().map_err(|e| e.to_string()));
        }
        drop(g);
        result
            .map(drop)
            .map_err(|source| VmError::host("KVM_SET_MEMORY_ATTRIBUTES", ConversionFailed { range, source }))
    }

    fn launch_start(&mut self, policy: u64) -> Result<(), VmError> {
        self.shared
            .kernel_mut()
            .launch_start(policy)
            .map_err(|e| rules::from_core(launch_call(self.spec.kind, "LAUNCH_START"), e))
    }

    fn launch_update(&mut self, u: LaunchUpdate<'_>) -> Result<(), VmError> {
        if self.spec.kind == VmKind::Snp {
            rules::check_populate(&self.shared.platform(), &u)?;
        }
        self.shared
            .kernel_mut()
            .launch_update_data(u.gpa, u.len, u.page_type, u.data)
            .map_err(|e| rules::from_core(launch_call(self.spec.kind, "LAUNCH_UPDATE"), e))
    }

    fn launch_update_vmsas(&mut self) -> Result<(), VmError> {
        if self.spec.kind == VmKind::Snp {
            return Err(Refusal::new(
                "KVM_SEV_LAUNCH_UPDATE_VMSA",
                Errno::EPERM,
                "an SNP VM refuses every command below KVM_SEV_SNP_LAUNCH_START; SNP launches its VMSAs at launch finish (sev_mem_enc_ioctl)",
            )
            .into());
        }
        self.shared
            .kernel_mut()
            .launch_update_vmsas()
            .map_err(|e| rules::from_core("KVM_SEV_LAUNCH_UPDATE_VMSA", e))
    }

    fn launch_finish(&mut self) -> Result<(), VmError> {
        self.shared
            .kernel_mut()
            .launch_finish([0; 32])
            .map_err(|e| rules::from_core(launch_call(self.spec.kind, "LAUNCH_FINISH"), e))
    }

    fn create_vcpu(&mut self, id: u32) -> Result<SimVcpu, VmError> {
        if id >= super::MAX_VCPUS {
            return Err(Refusal::new(
                "KVM_CREATE_VCPU",
                Errno::EINVAL,
                "the vCPU id is beyond the host's maximum (kvm_vm_ioctl_create_vcpu)",
            )
            .into());
        }
        self.shared
            .kernel_mut()
            .create_vcpu(VcpuId(id))
            .map_err(|e| rules::from_core("KVM_CREATE_VCPU", e))?;
        self.shared.guest().vcpus.insert(id);
        Ok(SimVcpu::new(id, self.shared.clone()))
    }

    fn cycles(&self) -> Observed<u64> {
        Observed::Seen(self.shared.platform().machine().now())
    }

    /// vmsa-core's `Vm::migrate_from` under both VMs' locks, the destination's first, as
    /// `sev_lock_two_vms` takes them. The scripted guest starts afresh on the destination:
    /// the VMM moves a guest before running it (a live update of the VMM).
    fn move_enc_context_from(&mut self, source: &mut SimVm) -> Result<(), VmError> {
        let mut dst = self.shared.kernel_mut();
        let mut src = source.shared.kernel_mut();
        dst.migrate_from(&mut src)
            .map_err(|e| rules::from_core("KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM", e))?;
        drop(dst);
        drop(src);
        self.spec = source.spec;
        Ok(())
    }

    fn teardown(self) -> HostReport {
        let shared = &self.shared;
        let mut g = shared.guest();
        let mut kernel = shared.kernel_mut();
        let script = g.cpus.finish(&kernel);
        let platform = kernel.platform().clone();
        let digest = platform.launch_digest().map(|d| d.hex());
        let down = kernel.teardown();
        drop(kernel);
        drop(g);
        let machine = platform.machine();
        let leaked_before = machine.leaked_frame_count();
        let destroyed = platform.destroy();
        // A failed destroy (DECOMMISSION refused) leaks the guest's memory: count what it
        // leaked from the machine's ledger, since there is no destroy report then.
        let leaked_by_destroy = machine.leaked_frame_count() - leaked_before;
        let frames = |f: fn(&crate::machine::DestroyReport) -> u64, failed: u64| {
            Observed::Seen(destroyed.as_ref().map_or(failed, f))
        };
        HostReport {
            events: Observed::Seen(self.events.snapshot()),
            launch_digest: Observed::Seen(digest),
            rmp_faults: Observed::Seen(machine.stats().rmp_faults),
            guest: Observed::Seen(script),
            teardown: TeardownCounts {
                vcpus: down.vcpus,
                vmsas_leaked: Observed::Seen(down.leaked),
                guest_frames_released: frames(|d| d.frames_released, 0),
                guest_frames_leaked: frames(|d| d.frames_leaked, leaked_by_destroy),
                frames_still_allocated: Observed::Seen(machine.allocated_frames() as u64),
                frames_leaked_on_purpose: Observed::Seen(machine.leaked_frame_count()),
                error: destroyed.err().map(|e| e.to_string()),
            },
        }
    }
}

/// The KVM name of a launch command for this kind of guest.
fn launch_call(kind: VmKind, what: &'static str) -> &'static str {
    match (kind, what) {
        (VmKind::Snp, "LAUNCH_START") => "KVM_SEV_SNP_LAUNCH_START",
        (VmKind::Snp, "LAUNCH_UPDATE") => "KVM_SEV_SNP_LAUNCH_UPDATE",
        (VmKind::Snp, _) => "KVM_SEV_SNP_LAUNCH_FINISH",
        (VmKind::SevEs, "LAUNCH_START") => "KVM_SEV_LAUNCH_START",
        (VmKind::SevEs, "LAUNCH_UPDATE") => "KVM_SEV_LAUNCH_UPDATE_DATA",
        (VmKind::SevEs, _) => "KVM_SEV_LAUNCH_FINISH",
    }
}

/// A conversion the machine could not carry out.
#[derive(Debug, thiserror::Error)]
#[error("converting {size:#x} bytes at GPA {gpa} to {to}", gpa = range.gpa, size = range.size, to = if range.private { "private" } else { "shared" })]
pub struct ConversionFailed {
    /// The range.
    pub range: Conversion,
    /// What the machine refused.
    #[source]
    pub source: crate::error::SimError,
}

impl Pending {
    /// The pending request's outcome, given the VMM's answer.
    pub fn outcome(self, answer: Result<(), Errno>) -> Result<String, String> {
        match (self.result, answer) {
            (Some(r), _) => r,
            (None, Ok(())) => Err("the VMM answered the conversion without converting the range".into()),
            (None, Err(errno)) => Err(format!("the VMM refused the conversion: {errno}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use vmsa_core::{Gpa, SnpPageType};
    use vmsa_host::{Hypervisor, LaunchUpdate, Vm as _};

    use super::*;
    use crate::host::SimHost;
    use crate::machine::MachineConfig;

    const MEMORY: MemoryRegion = MemoryRegion::ram(1 << 20);

    /// A launched SEV-ES VM of `vcpus` vCPUs (its vCPU handles dropped: none runs).
    fn launched(host: &SimHost, vcpus: u32) -> SimVm {
        let mut vm = host.create_vm(VmSpec::sev_es(0)).unwrap();
        vm.add_memory(MEMORY).unwrap();
        for id in 0..vcpus {
            vm.create_vcpu(id).unwrap();
        }
        vm.launch_start(0).unwrap();
        vm.launch_update(LaunchUpdate {
            gpa: Gpa(0x1000),
            len: 0x1000,
            page_type: SnpPageType::Normal,
            data: Some(&[0xf4; 0x1000]),
        })
        .unwrap();
        vm.launch_update_vmsas().unwrap();
        vm.launch_finish().unwrap();
        vm
    }

    fn target(host: &SimHost, vcpus: u32) -> SimVm {
        let mut vm = host.create_migration_target(VmKind::SevEs).unwrap();
        vm.add_memory(MEMORY).unwrap();
        for id in 0..vcpus {
            vm.create_vcpu(id).unwrap();
        }
        vm
    }

    /// An SNP VM on `host` whose memory is all private (guest_memfd), as a launch wants it.
    fn private_snp(host: &SimHost) -> SimVm {
        let mut vm = host.create_vm(VmSpec::snp(0)).unwrap();
        vm.add_memory(MEMORY).unwrap();
        vm.set_memory_attributes(Conversion {
            gpa: Gpa(0),
            size: MEMORY.size,
            private: true,
        })
        .unwrap();
        vm
    }

    fn errno(e: VmError) -> Option<Errno> {
        e.refusal().map(|r| r.errno)
    }

    /// Through the VMM's path: a shared `Write` over three private pages takes one memory
    /// fault per page, each answered by `set_memory_attributes`, and then succeeds (the
    /// retry used to be per action, so the second page's fault was taken for a repeat),
    /// writing each page once (each retry used to start again at the first page).
    #[test]
    fn a_multi_page_write_exits_once_per_faulting_page() {
        use vmsa_host::{Vcpu as _, VcpuExit};

        use crate::guest::GuestAction;

        let machine = Machine::new(MachineConfig::default());
        let script = GuestScript {
            name: "write".into(),
            actions: vec![GuestAction::Write {
                vcpu: 0,
                gpa: 0x4000,
                pages: 3,
                byte: 5,
                private: false,
            }],
        };
        let host = SimHost::new(machine.clone(), script);
        let mut vm = private_snp(&host);
        let mut vcpu = vm.create_vcpu(0).unwrap();
        vm.launch_start(vmsa_core::SNP_POLICY_RSVD_MBO).unwrap();
        vm.launch_finish().unwrap();
        let guest_copies = || {
            let report = machine.cost_report();
            report
                .ops
                .iter()
                .find(|r| r.op == "guest_copy")
                .map_or(0, |r| r.count)
        };
        let copies_before = guest_copies();
        let mut faults = Vec::new();
        loop {
            match vcpu.run().unwrap() {
                VcpuExit::MemoryFault(range) => {
                    faults.push(range.gpa);
                    vm.set_memory_attributes(range).unwrap();
                }
                VcpuExit::IoOut { .. } => break,
                other => panic!("unexpected exit {other:?}"),
            }
        }
        assert_eq!(faults, vec![Gpa(0x4000), Gpa(0x5000), Gpa(0x6000)]);
        // Each run resumes at the page that faulted: each page is written once.
        assert_eq!(guest_copies() - copies_before, 3);
        drop(vcpu);
        let report = vm.teardown();
        let vmsa_host::Observed::Seen(guest) = report.guest else {
            panic!("the simulator reports the guest's steps");
        };
        let steps: Vec<_> = guest
            .steps
            .iter()
            .map(|s| (s.error.clone(), s.detail.clone()))
            .collect();
        assert_eq!(steps, vec![(None, "3 pages ok".to_owned())]);
    }

    /// `gmem_pfn:1=...` of a fault plan is vmsa-core's first `gmem_pfn` call: the host's
    /// `kvm_gmem_populate` precheck of an SNP launch update looks frames up without counting
    /// (it used to call `Platform::gmem_pfn` itself and absorb the injection, so the launch
    /// update succeeded).
    #[test]
    fn the_populate_precheck_does_not_count_as_a_gmem_pfn_call() {
        let faults = "gmem_pfn:1=UNBACKED".parse().unwrap();
        let machine = Machine::new(MachineConfig {
            faults,
            ..MachineConfig::default()
        });
        let host = SimHost::new(machine.clone(), GuestScript::default());
        let mut vm = private_snp(&host);
        vm.launch_start(vmsa_core::SNP_POLICY_RSVD_MBO).unwrap();
        let allocated = machine.allocated_frames();
        let e = vm
            .launch_update(LaunchUpdate {
                gpa: Gpa(0x1000),
                len: 0x1000,
                page_type: SnpPageType::Normal,
                data: Some(&[1; 0x1000]),
            })
            .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("not in a memslot with guest_memfd"), "{text}");
        assert_eq!(errno(e), Some(Errno::EINVAL));
        assert_eq!(machine.stats().injected, 1);
        assert_eq!(machine.allocated_frames(), allocated, "nothing was backed");
        // The next call is not injected: the update works.
        vm.launch_update(LaunchUpdate {
            gpa: Gpa(0x1000),
            len: 0x1000,
            page_type: SnpPageType::Normal,
            data: Some(&[1; 0x1000]),
        })
        .unwrap();
        drop(vm.teardown());
    }

    /// `sev_vm_move_enc_context_from`'s rules, with KVM's errnos: the vCPU counts must agree
    /// (nothing moves if not), an SNP source is refused, a source that moved is dead.
    #[test]
    fn moving_an_encryption_context_follows_kvms_rules() {
        let machine = Machine::new(MachineConfig::default());
        let host = SimHost::new(machine.clone(), GuestScript::default());
        let mut src = launched(&host, 2);
        let mut short = target(&host, 1);
        assert_eq!(
            errno(short.move_enc_context_from(&mut src).unwrap_err()),
            Some(Errno::EINVAL)
        );
        let mut dst = target(&host, 2);
        dst.move_enc_context_from(&mut src).unwrap();
        assert_eq!(dst.spec(), VmSpec::sev_es(0));
        assert_eq!(
            errno(src.launch_start(0).unwrap_err()),
            Some(Errno::EIO),
            "the source is dead"
        );
        let mut again = target(&host, 2);
        assert!(
            errno(again.move_enc_context_from(&mut src).unwrap_err()).is_some(),
            "a source that moved has no context left to give"
        );
        let mut snp = host.create_vm(VmSpec::snp(0)).unwrap();
        snp.create_vcpu(0).unwrap();
        let mut from_snp = target(&host, 1);
        assert_eq!(
            errno(from_snp.move_enc_context_from(&mut snp).unwrap_err()),
            Some(Errno::EINVAL)
        );
        // Every VM torn down, the source's context with the destination: nothing is left.
        let reports: Vec<HostReport> = [short, src, dst, again, snp, from_snp]
            .into_iter()
            .map(vmsa_host::Vm::teardown)
            .collect();
        assert!(reports.iter().all(|r| r.teardown.error.is_none()));
        assert_eq!(machine.allocated_frames(), 0);
        assert!(machine.leaked_frames().is_empty());
        assert!(machine.guests().is_empty());
    }
}
