//! Shared helpers for the scenario tests.

pub mod kvm;
pub mod random;

use std::sync::Arc;
use std::time::Duration;

use backend_sim::host::SimHost;
use backend_sim::{GuestScript, Machine, MachineConfig, PhaseClock, PhaseReport};
use vmm::run::flow::{self, FlowError, FlowReport, Launch};
use vmm::run::progress::Progress;
use vmsa_core::{Event, Gpa, SNP_POLICY_RSVD_MBO, VmKind, layout::SEV_FEAT_SNP_ACTIVE};
use vmsa_host::{GuestActivity, VmSpec};

/// Where the stand-in firmware of [`sim_boot`] sits, and its size in pages (HLT bytes).
pub const FIRMWARE_GPA: u64 = 0x10_0000;
/// Pages of the stand-in firmware.
pub const FIRMWARE_PAGES: u64 = 16;

/// A guest's whole life on the simulated host through the VMM's one flow.
#[derive(Debug)]
pub struct SimRun {
    /// The machine it ran on.
    pub machine: Arc<Machine>,
    /// What the flow reported.
    pub report: FlowReport,
    /// The machine's cycles per phase.
    pub phases: Vec<PhaseReport>,
}

impl SimRun {
    /// What the guest did (every step).
    pub fn guest(&self) -> &GuestActivity {
        self.report
            .host
            .guest
            .seen()
            .expect("the simulator sees the guest")
    }

    /// vmsa-core's events.
    pub fn events(&self) -> &[Event] {
        self.report
            .host
            .events
            .seen()
            .expect("the simulator sees the events")
    }
}

/// Run `script` on an SNP guest of `vcpus` vCPUs and `memory` bytes from GPA 0 on a machine built
/// from `config`: a 16-page HLT firmware at 1 MiB is measured, every vCPU starts from the x86
/// reset state, and the flow creates, launches, runs and tears it down.
pub fn sim_boot(config: MachineConfig, vcpus: u32, memory: u64, script: GuestScript) -> SimRun {
    sim_boot_spec(config, VmSpec::snp(0), SNP_POLICY_RSVD_MBO, vcpus, memory, script)
}

/// [`sim_boot`] of the VM `spec` (SEV-ES or SEV-SNP) launched with `policy`.
pub fn sim_boot_spec(
    config: MachineConfig,
    spec: VmSpec,
    policy: u64,
    vcpus: u32,
    memory: u64,
    script: GuestScript,
) -> SimRun {
    let boot = Boot {
        spec,
        policy,
        vcpus,
        memory,
        watchdog: Duration::from_secs(60),
    };
    sim_boot_expecting(config, &boot, script, &mut |_, _| {})
}

/// The flow's report and the machine's phases, or why the flow could not create the VM.
type TryRun = Result<(FlowReport, Vec<PhaseReport>), FlowError>;

/// [`sim_boot`] that lets `inspect` look at the machine as the guest's run ends, before the
/// teardown (when the guest's state is still there to see).
pub fn sim_boot_inspecting(
    config: MachineConfig,
    vcpus: u32,
    memory: u64,
    script: GuestScript,
    inspect: &mut dyn FnMut(&Machine),
) -> SimRun {
    let boot = Boot {
        spec: VmSpec::snp(0),
        policy: SNP_POLICY_RSVD_MBO,
        vcpus,
        memory,
        watchdog: Duration::from_secs(60),
    };
    sim_boot_expecting(config, &boot, script, &mut |phase, m| {
        if phase == "run" {
            inspect(m);
        }
    })
}

/// [`sim_try_boot_inspecting`] of a boot that must create the VM.
fn sim_boot_expecting(
    config: MachineConfig,
    boot: &Boot,
    script: GuestScript,
    at_phase: &mut dyn FnMut(&'static str, &Machine),
) -> SimRun {
    let (machine, result) = sim_try_boot_inspecting(config, boot, script, at_phase);
    let (report, phases) = result.expect("the simulator creates the VM");
    SimRun {
        machine,
        report,
        phases,
    }
}

/// What [`sim_try_boot_inspecting`] boots.
struct Boot {
    spec: VmSpec,
    policy: u64,
    vcpus: u32,
    memory: u64,
    watchdog: Duration,
}

/// The one harness behind the `sim_*boot*` helpers: `at_phase` is called with the machine as
/// each phase of the flow ends.
fn sim_try_boot_inspecting(
    config: MachineConfig,
    boot: &Boot,
    script: GuestScript,
    at_phase: &mut dyn FnMut(&'static str, &Machine),
) -> (Arc<Machine>, TryRun) {
    let &Boot {
        spec,
        policy,
        vcpus,
        memory,
        watchdog,
    } = boot;
    let machine = Machine::new(config);
    let host = SimHost::new(machine.clone(), script);
    let firmware = vec![0xf4u8; (FIRMWARE_PAGES * vmsa_core::PAGE_SIZE) as usize];
    let features = match spec.kind {
        VmKind::Snp => SEV_FEAT_SNP_ACTIVE,
        VmKind::SevEs => 0,
    } | spec.vmsa_features;
    let vmsas: Vec<_> = (0..vcpus)
        .map(|_| {
            vmm::measure::reset::reset_vmsa(
                vmm::measure::reset::BSP_EIP,
                features,
                vmm::measure::vcpu_types::VcpuType::lookup("EPYC-v4")
                    .expect("a known vCPU type")
                    .signature(),
                vmm::measure::vmm_types::VmmType::Qemu,
            )
        })
        .collect();
    // The memory slot is guest_memfd-backed for SEV-ES too: the simulator keeps a guest's
    // memory only in such slots (KVM itself backs SEV-ES memory with ordinary memory).
    let launch = Launch {
        spec,
        ..Launch::snp_image(memory, policy, Gpa(FIRMWARE_GPA), &firmware, &vmsas)
    };
    let mut clock = PhaseClock::new(&machine);
    let result = flow::run(&host, &launch, watchdog, &Progress::hidden(), &mut |p| {
        at_phase(p, &machine);
        clock.end(p)
    });
    drop(host);
    let result = result.map(|report| (report, clock.into_phases()));
    (machine, result)
}

/// One ownership transition without the frames and GPAs it names (which differ between hosts):
/// the operation, the state kind before and the state kind after.
pub type OwnershipStep = (vmsa_core::Op, vmsa_core::StateKind, vmsa_core::StateKind);

/// Every vCPU's ownership history in `events` as `(vCPU, steps)`, ordered by vCPU, in a form two
/// hosts can be compared by ([`vmsa_core::histories`] without frame numbers and GPAs).
pub fn ownership_histories(events: &[Event]) -> Vec<(u32, Vec<OwnershipStep>)> {
    vmsa_core::histories(events)
        .into_iter()
        .map(|h| {
            let steps = h
                .transitions
                .iter()
                .map(|t| (t.op, t.from.kind(), t.to.kind()))
                .collect();
            (h.vcpu.0, steps)
        })
        .collect()
}
