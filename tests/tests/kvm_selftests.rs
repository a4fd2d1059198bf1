//! The KVM SEV selftests (Linux `tools/testing/selftests/kvm/x86/`: `sev_smoke_test.c`,
//! `sev_init2_tests.c`, `sev_migrate_tests.c`), scenario by scenario, on the simulator.
//!
//! Each test is named after the kernel test function it mirrors and asserts what that function
//! asserts, as far as the host interface (`vmsa-host`) can express it. The guest code of the
//! selftests is played by a [`GuestScript`]; the VM is created, launched, run and torn down by
//! the VMM's one flow (`scenario_tests::sim_boot_spec`, i.e. `vmm::run::flow::run`) or, for
//! VM creation alone, by `Hypervisor::create_vm`. The host interface has no intra-host
//! migration call, so `sev_migrate_tests.c` is mirrored one level down, on `vmsa_core::Vm`
//! over backend-sim's `SimPlatform` (`Vm::migrate_from` is KVM's
//! `KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM`). TESTING.md at the repository root lists every scenario,
//! mirrored or not (and why not).

use std::sync::Arc;

use backend_sim::host::SimHost;
use backend_sim::{GuestAction, GuestScript, Machine, MachineConfig, SimPlatform};
use scenario_tests::{SimRun, sim_boot_spec};
use vmm::run::flow::RunEnd;
use vmsa_core::layout::{SEV_FEAT_DEBUG_SWAP, SEV_FEAT_SNP_ACTIVE};
use vmsa_core::{
    Error, EventLog, Gpa, MigrationError, SNP_POLICY_DEBUG, SNP_POLICY_RSVD_MBO, SnpPageType, VcpuId, Vm,
    VmConfig, VmKind,
};
use vmsa_host::{Errno, Hypervisor, HypervisorError, Observed, Refusal, VcpuExit, Vm as _, VmSpec};

// ---- Constants of the selftests' library (tools/testing/selftests/kvm/include/x86/sev.h).

/// `SEV_POLICY_NO_DBG` (policy bit 0).
const SEV_POLICY_NO_DBG: u64 = 1 << 0;
/// `SEV_POLICY_ES` (policy bit 2).
const SEV_POLICY_ES: u64 = 1 << 2;
/// `GHCB_MSR_TERM_REQ`: the value the smoke test's guest writes to the GHCB MSR before
/// VMGEXIT, and the `system_event.data[0]` it expects back.
const GHCB_MSR_TERM_REQ: u64 = 0x100;
/// `NR_MIGRATE_TEST_VCPUS`.
const NR_MIGRATE_TEST_VCPUS: u32 = 4;
/// `NR_MIGRATE_TEST_VMS`.
const NR_MIGRATE_TEST_VMS: usize = 3;

/// `snp_default_policy()` on a host without SMT: only the must-be-one bit 17.
const SNP_DEFAULT_POLICY: u64 = SNP_POLICY_RSVD_MBO;

fn script(name: &str, actions: Vec<GuestAction>) -> GuestScript {
    GuestScript {
        name: name.into(),
        actions,
    }
}

// ---- sev_smoke_test.c

/// What `guest_sev_es_code` does once its SEV_STATUS checks pass: write `GHCB_MSR_TERM_REQ`
/// (reason set 0, code 0) to the GHCB MSR and VMGEXIT.
fn guest_sev_es_code() -> GuestScript {
    script(
        "guest_sev_es_code",
        vec![GuestAction::Terminate {
            vcpu: 0,
            reason_set: 0,
            reason_code: 0,
        }],
    )
}

/// `test_sev(guest_code, policy)` for an SEV-ES or SNP `kind`: `vm_sev_create_with_one_vcpu`,
/// `vm_sev_launch(policy)`, `vcpu_run`, then the exit checks.
fn test_sev(kind: VmKind, policy: u64) -> SimRun {
    let spec = match kind {
        VmKind::SevEs => VmSpec::sev_es(0),
        VmKind::Snp => VmSpec::snp(0),
    };
    let run = sim_boot_spec(
        MachineConfig::default(),
        spec,
        policy,
        1,
        16 << 20,
        guest_sev_es_code(),
    );
    // vm_sev_launch: every launch command returns 0 with no firmware error.
    assert!(
        run.report.launch_error.is_none(),
        "{kind} policy {policy:#x}: the launch fails: {:?}",
        run.report.launch_error
    );
    let end = &run.report.run.as_ref().expect("the launch finished").end;
    // exit_reason == KVM_EXIT_SYSTEM_EVENT, type KVM_SYSTEM_EVENT_SEV_TERM, ndata 1,
    // data[0] == GHCB_MSR_TERM_REQ: the interface's Terminate exit carries data[0]'s reason
    // fields, and a bare GHCB_MSR_TERM_REQ is reason set 0, code 0.
    let VcpuExit::Terminate { reason } = VcpuExit::from_sev_term(&[GHCB_MSR_TERM_REQ]) else {
        unreachable!("a termination request is a Terminate exit")
    };
    assert_eq!(
        end,
        &RunEnd::Terminated { vcpu: 0, reason },
        "{kind} policy {policy:#x}: wanted SYSTEM_EVENT SEV_TERM with data[0] = {GHCB_MSR_TERM_REQ:#x}"
    );
    // kvm_vm_free: nothing left behind.
    let t = &run.report.host.teardown;
    assert_eq!(t.error, None, "{kind}: teardown fails");
    assert_eq!(t.vmsas_leaked, Observed::Seen(0), "{kind}: VMSAs leaked");
    assert_eq!(
        t.frames_still_allocated,
        Observed::Seen(0),
        "{kind}: frames left allocated"
    );
    run
}

/// `main`: `test_sev(guest_sev_es_code, SEV_POLICY_ES | SEV_POLICY_NO_DBG)`.
#[test]
fn sev_smoke_test_sev_es_policy_es_no_dbg_terminates() {
    test_sev(VmKind::SevEs, SEV_POLICY_ES | SEV_POLICY_NO_DBG);
}

/// `main`: `test_sev(guest_sev_es_code, SEV_POLICY_ES)`.
#[test]
fn sev_smoke_test_sev_es_policy_es_terminates() {
    test_sev(VmKind::SevEs, SEV_POLICY_ES);
}

/// Newer trees: `test_sev_smoke(guest_snp_code, VM_SHAPE_SNP, snp_default_policy())`, whose
/// first case is `test_sev` with `| SNP_POLICY_DBG`: SNP guests terminate as SEV-ES ones do.
#[test]
fn sev_smoke_test_snp_policy_dbg_terminates() {
    test_sev(VmKind::Snp, SNP_DEFAULT_POLICY | SNP_POLICY_DEBUG);
}

/// Newer trees: `test_sev_smoke(guest_snp_code, VM_SHAPE_SNP, snp_default_policy())`, its
/// second case (the plain default policy).
#[test]
fn sev_smoke_test_snp_default_policy_terminates() {
    test_sev(VmKind::Snp, SNP_DEFAULT_POLICY);
}

/// `test_sev_es_shutdown` (newer trees: `test_sev_shutdown`, SEV-ES and SNP): the guest installs
/// an all-zero IDT and executes `ud2`, a triple fault; `KVM_RUN` exits with `KVM_EXIT_SHUTDOWN`.
fn test_sev_shutdown(kind: VmKind, policy: u64) {
    let spec = match kind {
        VmKind::SevEs => VmSpec::sev_es(0),
        VmKind::Snp => VmSpec::snp(0),
    };
    let run = sim_boot_spec(
        MachineConfig::default(),
        spec,
        policy,
        1,
        16 << 20,
        script("guest_shutdown_code", vec![GuestAction::TripleFault { vcpu: 0 }]),
    );
    assert!(
        run.report.launch_error.is_none(),
        "{kind}: {:?}",
        run.report.launch_error
    );
    let end = &run.report.run.as_ref().expect("the launch finished").end;
    assert_eq!(
        end,
        &RunEnd::Shutdown { vcpu: 0 },
        "{kind}: wanted KVM_EXIT_SHUTDOWN"
    );
    let t = &run.report.host.teardown;
    assert_eq!(
        t.frames_still_allocated,
        Observed::Seen(0),
        "{kind}: frames left allocated"
    );
}

/// `test_sev_es_shutdown` on an SEV-ES guest.
#[test]
fn sev_smoke_test_sev_es_shutdown() {
    test_sev_shutdown(VmKind::SevEs, SEV_POLICY_ES);
}

/// `test_sev_shutdown` on an SNP guest (newer trees).
#[test]
fn sev_smoke_test_snp_shutdown() {
    test_sev_shutdown(VmKind::Snp, SNP_DEFAULT_POLICY);
}

// ---- sev_init2_tests.c

/// A fresh simulated host: each `test_init2` case uses a fresh VM (`vm_create_barebones_type`).
fn sim_host() -> SimHost {
    SimHost::new(
        Machine::new(MachineConfig::default()),
        script("no guest", Vec::new()),
    )
}

/// `test_init2(vm_type, init)`: `KVM_SEV_INIT2` returns 0; then `kvm_vm_free`.
#[track_caller]
fn test_init2(host: &SimHost, spec: VmSpec) {
    let vm = host
        .create_vm(spec)
        .unwrap_or_else(|e| panic!("KVM_SEV_INIT2 of {spec:?} fails: {e}"));
    let t = vm.teardown().teardown;
    assert_eq!(t.frames_still_allocated, Observed::Seen(0), "{spec:?}");
}

/// `test_init2_invalid(vm_type, init, msg)`: `KVM_SEV_INIT2` returns -1 with errno EINVAL.
#[track_caller]
fn test_init2_invalid(host: &SimHost, spec: VmSpec, msg: &str) {
    match host.create_vm(spec) {
        Err(HypervisorError::Refused(Refusal { call, errno, .. })) => {
            assert_eq!(
                (call, errno),
                ("KVM_SEV_INIT2", Errno::EINVAL),
                "KVM_SEV_INIT2 should fail, {msg}: {spec:?}"
            )
        }
        Err(e) => panic!("KVM_SEV_INIT2 should fail with EINVAL, {msg}: {spec:?}: {e}"),
        Ok(vm) => {
            vm.teardown();
            panic!("KVM_SEV_INIT2 should fail, {msg}: {spec:?} was created")
        }
    }
}

/// `main`: `KVM_CAP_VM_TYPES` has the SEV-ES and SNP bits iff the CPU has them. The host
/// interface's equivalent of both is `capabilities().kinds`: it must list exactly the kinds
/// `create_vm` creates.
#[test]
fn sev_init2_tests_vm_types_match_the_capabilities() {
    let host = sim_host();
    let kinds = host.capabilities().kinds.clone();
    assert!(kinds.contains(&VmKind::SevEs), "have_sev_es: {kinds:?}");
    assert!(kinds.contains(&VmKind::Snp), "have_snp: {kinds:?}");
    for kind in [VmKind::SevEs, VmKind::Snp] {
        let created = host.create_vm(VmSpec {
            kind,
            vmsa_features: 0,
            supplied_vmsa: false,
        });
        assert_eq!(created.is_ok(), kinds.contains(&kind), "{kind}");
        if let Ok(vm) = created {
            vm.teardown();
        }
    }
}

/// `test_vm_types`: `test_init2(KVM_X86_SEV_ES_VM, {})` and `test_init2(KVM_X86_SNP_VM, {})`,
/// an all-zero `kvm_sev_init`.
#[test]
fn sev_init2_tests_test_vm_types() {
    let host = sim_host();
    test_init2(&host, VmSpec::sev_es(0));
    test_init2(&host, VmSpec::snp(0));
}

/// `test_features(vm_type, supported_vmsa_features)` for SEV-ES and SNP: every single bit not in
/// `KVM_X86_SEV_VMSA_FEATURES` is EINVAL; `SVM_SEV_FEAT_DEBUG_SWAP` (the one `KNOWN_FEATURES`
/// bit), when supported, succeeds; other supported bits are not tried.
#[test]
fn sev_init2_tests_test_features() {
    let host = sim_host();
    let supported = host.capabilities().vmsa_features;
    assert_eq!(
        SEV_FEAT_DEBUG_SWAP, 32,
        "SVM_SEV_FEAT_DEBUG_SWAP is 32u in the test"
    );
    let mut tried = (0, 0);
    for spec in [VmSpec::sev_es, VmSpec::snp] {
        for i in 0..64 {
            let bit = 1u64 << i;
            if supported & bit == 0 {
                test_init2_invalid(&host, spec(bit), "unknown feature");
                tried.0 += 1;
            } else if bit == SEV_FEAT_DEBUG_SWAP {
                test_init2(&host, spec(bit));
                tried.1 += 1;
            }
        }
    }
    assert_eq!(tried.1, 2, "DEBUG_SWAP is supported here: {supported:#x}");
    assert!(
        supported & SEV_FEAT_SNP_ACTIVE == 0,
        "SNP_ACTIVE is the kernel's to set, never a supported vmsa_features bit"
    );
    println!(
        "sev_init2_tests: {} unsupported bits refused, {} DEBUG_SWAP inits accepted",
        tried.0, tried.1
    );
}

// ---- sev_migrate_tests.c, on vmsa-core over the simulator's platform.

/// A machine and the VMs made on it, torn down and checked at the end (`kvm_vm_free` of each).
struct Migrations {
    machine: Arc<Machine>,
    log: Arc<EventLog>,
    vms: Vec<Vm<SimPlatform>>,
}

impl Migrations {
    fn new() -> Self {
        Self {
            machine: Machine::new(MachineConfig::default()),
            log: Arc::new(EventLog::new()),
            vms: Vec::new(),
        }
    }

    fn add(&mut self, vm: Vm<SimPlatform>) -> usize {
        self.vms.push(vm);
        self.vms.len() - 1
    }

    /// `sev_vm_create(es = true)`: `sev_es_vm_init`, 4 vCPUs, `sev_vm_launch(SEV_POLICY_ES)`
    /// (LAUNCH_START, LAUNCH_UPDATE_DATA of the protected memory, LAUNCH_UPDATE_VMSA; no
    /// measure, no finish). `vcpus` other than 4 and `launch = false` give the test's
    /// `sev_es_vm_no_vmsa` (ES_INIT and vCPUs, never launched).
    fn sev_es_vm(&mut self, vcpus: &[u32], launch: bool) -> usize {
        let p = self.machine.create_guest(VmKind::SevEs).expect("a free ASID");
        p.add_memslot(Gpa(0), 1 << 20).expect("memory");
        let mut vm = Vm::new(p, VmConfig::sev_es(0), self.log.clone());
        for &id in vcpus {
            vm.create_vcpu(VcpuId(id)).expect("__vm_vcpu_add");
        }
        if launch {
            vm.launch_start(SEV_POLICY_ES).expect("LAUNCH_START");
            vm.launch_update_data(Gpa(0), 4096, SnpPageType::Normal, Some(&[0xaa; 4096]))
                .expect("LAUNCH_UPDATE_DATA");
            vm.launch_update_vmsas().expect("LAUNCH_UPDATE_VMSA");
        }
        self.add(vm)
    }

    /// `aux_vm_create(with_vcpus)`: a VM without SEV (a migration target), with 4 vCPUs or none.
    fn aux_vm(&mut self, with_vcpus: bool) -> usize {
        let p = self.machine.create_guest(VmKind::SevEs).expect("a free ASID");
        let mut vm = Vm::migration_target(p, self.log.clone());
        if with_vcpus {
            for id in 0..NR_MIGRATE_TEST_VCPUS {
                vm.create_vcpu(VcpuId(id)).expect("__vm_vcpu_add");
            }
        }
        self.add(vm)
    }

    /// `__sev_migrate_from(dst, src)`.
    fn migrate(&mut self, dst: usize, src: usize) -> Result<(), Error<backend_sim::SimError>> {
        assert_ne!(dst, src, "a VM cannot be borrowed twice");
        let (lo, hi) = (dst.min(src), dst.max(src));
        let (a, b) = self.vms.split_at_mut(hi);
        let (d, s) = if dst < src {
            (&mut a[lo], &mut b[0])
        } else {
            (&mut b[0], &mut a[lo])
        };
        d.migrate_from(s)
    }

    /// `kvm_vm_free` of every VM: every frame goes back to the machine, none leaked.
    fn free(self) {
        for mut vm in self.vms {
            vm.teardown();
            vm.platform().destroy().expect("the guest is destroyed");
        }
        assert!(self.machine.leaked_frames().is_empty(), "frames leaked");
        assert_eq!(self.machine.allocated_frames(), 0, "frames left allocated");
        let s = self.machine.stats();
        assert_eq!(
            (s.bad_frees, s.freed_while_assigned, s.freed_unflushed),
            (0, 0, 0),
            "{s:?}"
        );
    }
}

/// KVM's errno for a vmsa-core error of `KVM_ENABLE_CAP(KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM)`.
fn errno(e: &Error<backend_sim::SimError>) -> Option<Errno> {
    Refusal::from_core("KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM", e).map(|r| r.errno)
}

const ALL: [u32; 4] = [0, 1, 2, 3];

/// `test_sev_migrate_from(es = true)`: src → dst[0] → dst[1] → dst[2] all succeed; then
/// dst[2] → src fails with EIO ("VM that was migrated from should be dead").
#[test]
fn sev_migrate_tests_test_sev_migrate_from_es() {
    let mut m = Migrations::new();
    let src = m.sev_es_vm(&ALL, true);
    let dst: Vec<usize> = (0..NR_MIGRATE_TEST_VMS).map(|_| m.aux_vm(true)).collect();
    m.migrate(dst[0], src).expect("Migration failed");
    for i in 1..NR_MIGRATE_TEST_VMS {
        m.migrate(dst[i], dst[i - 1]).expect("Migration failed");
    }
    let e = m
        .migrate(src, dst[NR_MIGRATE_TEST_VMS - 1])
        .expect_err("VM that was migrated from should be dead");
    assert!(matches!(e, Error::VmDead), "{e}");
    assert_eq!(errno(&e), Some(Errno::EIO), "{e}");
    m.free();
}

/// `test_sev_migrate_parameters`: `vm_no_vcpu` ← `vm_no_sev` (4 vCPUs, no SEV) is EINVAL
/// ("Migrations require SEV enabled").
#[test]
fn sev_migrate_tests_test_sev_migrate_parameters_require_sev() {
    let mut m = Migrations::new();
    let vm_no_vcpu = m.aux_vm(false);
    let vm_no_sev = m.aux_vm(true);
    let e = m
        .migrate(vm_no_vcpu, vm_no_sev)
        .expect_err("Migrations require SEV enabled");
    assert!(
        matches!(e, Error::Migration(MigrationError::SourceNotConfidential)),
        "{e}"
    );
    m.free();
}

/// `test_sev_migrate_parameters`: a launched SEV VM ← a launched SEV-ES VM is EINVAL ("Should
/// not be able migrate to SEV enabled VM"). The host has no plain-SEV VMs: the destination here
/// is a second launched SEV-ES VM, which breaks the same rule (the destination already has an
/// encryption context).
#[test]
fn sev_migrate_tests_test_sev_migrate_parameters_dst_already_sev() {
    let mut m = Migrations::new();
    let sev_vm = m.sev_es_vm(&ALL, true);
    let sev_es_vm = m.sev_es_vm(&ALL, true);
    let e = m
        .migrate(sev_vm, sev_es_vm)
        .expect_err("Should not be able migrate to SEV enabled VM");
    assert!(
        matches!(
            e,
            Error::Migration(MigrationError::DestinationIsConfidential { .. })
        ),
        "{e}"
    );
    m.free();
}

/// `test_sev_migrate_parameters`: `vm_no_vcpu` ← a launched SEV-ES VM with 4 vCPUs is EINVAL
/// ("SEV-ES migrations require same number of vCPUS").
#[test]
fn sev_migrate_tests_test_sev_migrate_parameters_same_vcpu_count() {
    let mut m = Migrations::new();
    let vm_no_vcpu = m.aux_vm(false);
    let sev_es_vm = m.sev_es_vm(&ALL, true);
    let e = m
        .migrate(vm_no_vcpu, sev_es_vm)
        .expect_err("SEV-ES migrations require same number of vCPUS");
    assert!(
        matches!(
            e,
            Error::Migration(MigrationError::VcpuCountMismatch {
                source_vcpus: 4,
                destination_vcpus: 0
            })
        ),
        "{e}"
    );
    m.free();
}

/// `test_sev_migrate_parameters`: `vm_no_vcpu` ← `sev_es_vm_no_vmsa` (ES_INIT, one vCPU with id
/// 1, no LAUNCH_UPDATE_VMSA) is EINVAL ("SEV-ES migrations require UPDATE_VMSA"). As in the
/// kernel test, the vCPU counts differ too; the second half isolates the UPDATE_VMSA rule with a
/// destination of one vCPU.
#[test]
fn sev_migrate_tests_test_sev_migrate_parameters_require_update_vmsa() {
    let mut m = Migrations::new();
    let vm_no_vcpu = m.aux_vm(false);
    let no_vmsa = m.sev_es_vm(&[1], false);
    let e = m
        .migrate(vm_no_vcpu, no_vmsa)
        .expect_err("SEV-ES migrations require UPDATE_VMSA");
    assert!(matches!(e, Error::Migration(_)), "{e}");
    // The same source into a destination with as many vCPUs: only the launch is missing.
    let one = {
        let p = m.machine.create_guest(VmKind::SevEs).expect("a free ASID");
        let mut vm = Vm::migration_target(p, m.log.clone());
        vm.create_vcpu(VcpuId(1)).expect("__vm_vcpu_add");
        m.add(vm)
    };
    let e = m
        .migrate(one, no_vmsa)
        .expect_err("SEV-ES migrations require UPDATE_VMSA");
    assert!(
        matches!(
            e,
            Error::Migration(MigrationError::SourceNotLaunched { vcpu: VcpuId(1) })
        ),
        "{e}"
    );
    m.free();
}
