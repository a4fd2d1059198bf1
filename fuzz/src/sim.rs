//! A VM on a fresh simulated machine, for the targets that run what they parsed, and the
//! machine's frame ledger checked at the end: every frame freed or leaked with a reason, no
//! host bug recorded.

use std::collections::BTreeSet;
use std::sync::Arc;

use backend_sim::{Machine, MachineConfig, SimPlatform};
use vmsa_core::{Event, EventLog, Gpa, Pfn, VcpuId, Vm, VmConfig};

/// Guest memory: one guest_memfd slot from GPA 0 (the simulator's memory is sparse; only the
/// pages a run touches cost anything).
pub(crate) const MEMORY: u64 = 64 << 20;

/// A VM of `config` with up to `vcpus` vCPUs (creation stops at the first refusal: the
/// configuration is the fuzzer's and may be invalid).
pub(crate) struct SimGuest {
    pub(crate) machine: Arc<Machine>,
    pub(crate) platform: SimPlatform,
    pub(crate) vm: Vm<SimPlatform>,
    pub(crate) log: Arc<EventLog>,
}

impl SimGuest {
    pub(crate) fn new(config: VmConfig, vcpus: u32) -> Self {
        let machine = Machine::new(MachineConfig {
            trace: false,
            ..MachineConfig::default()
        });
        let platform = machine
            .create_guest(config.kind)
            .expect("a fresh machine has a free ASID");
        platform
            .add_private_memslot(Gpa(0), MEMORY)
            .expect("a fresh guest takes a memslot");
        let log = Arc::new(EventLog::new());
        let mut vm = Vm::new(platform.clone(), config, log.clone());
        for i in 0..vcpus {
            if vm.create_vcpu(VcpuId(i)).is_err() {
                break;
            }
        }
        Self {
            machine,
            platform,
            vm,
            log,
        }
    }

    /// Tear the VM down and destroy the guest, then check the machine as the fault matrix
    /// does (tests/tests/fault_matrix.rs): no frame left allocated; every frame a `Leaked` event
    /// names is leaked in the machine; the machine's leaked frames are the vCPU pages those
    /// events name plus the guest frames the destruction leaked; nothing freed while assigned,
    /// unflushed, or twice; no host access took an RMP fault.
    pub(crate) fn finish(self) {
        let Self {
            machine,
            platform,
            mut vm,
            log,
        } = self;
        let down = vm.teardown();
        drop(vm);
        let before = machine.leaked_frames().len() as u64;
        let destroyed = platform.destroy();
        let by_destroy = machine.leaked_frames().len() as u64 - before;
        assert_eq!(
            machine.allocated_frames(),
            0,
            "frames still allocated after destroy"
        );
        let leaked: BTreeSet<Pfn> = machine.leaked_frames().into_iter().collect();
        let mut vcpu_pages = BTreeSet::new();
        for e in log.leaks() {
            if let Event::Leaked { vcpu, pfn, .. } = e {
                assert!(
                    leaked.contains(&pfn),
                    "{pfn:?} reported leaked, the machine holds it"
                );
                if vcpu.is_some() {
                    vcpu_pages.insert(pfn);
                }
            }
        }
        assert_eq!(
            down.leaked,
            vcpu_pages.len(),
            "teardown's VMSA leaks vs the events"
        );
        let guest = destroyed.as_ref().map_or(by_destroy, |d| d.frames_leaked);
        assert_eq!(
            leaked.len() as u64,
            vcpu_pages.len() as u64 + guest,
            "machine leaks vs vCPU pages with a Leaked event plus guest frames leaked by destroy ({destroyed:?})"
        );
        let s = machine.stats();
        assert_eq!(
            (
                s.bad_frees,
                s.freed_while_assigned,
                s.freed_unflushed,
                s.rmp_faults
            ),
            (0, 0, 0, 0),
            "{s:?}"
        );
    }
}
