//! The guest-driven AP-creation scenario on real KVM (VMSA-image mode) through the VMM's flow: the
//! BSP writes a VMSA for every AP into its guest_memfd memory, asks for AP_CREATE through the
//! GHCB doorbell, waits for every AP's report, then destroys AP 1 and creates it again. What the
//! guest did comes from the host's report: its GHCB requests as guest steps, the VMSA ownership
//! events, and the flow's per-vCPU exits.

use std::time::Duration;

use backend_kvm::guest::builtin::GuestProgram;
use backend_kvm::guest::layout;
use backend_kvm::guest::program::PROGRAM;
use backend_kvm::{Mode, probe};
use scenario_tests::kvm::{self, KvmRun};
use vmm::run::flow::{self, Launch, RunEnd, VcpuExits};
use vmm::run::progress::Progress;
use vmsa_core::{Event, Gpa, Op, SNP_POLICY_RSVD_MBO, StateKind};
use vmsa_host::{Hypervisor, Observed, Vm};

const WATCHDOG: Duration = Duration::from_secs(60);

fn ap_creation(test: &str, n: u32, recreate: bool) -> Option<KvmRun> {
    let host = kvm::image_host(test)?;
    let _turn = kvm::turn();
    let r = kvm::run(
        &host,
        &GuestProgram::ApCreation { recreate },
        n,
        kvm::memory_for(n),
        WATCHDOG,
    );
    println!(
        "{n} vCPUs through the flow: {} µs, {:?}",
        r.elapsed.as_micros(),
        r.end()
    );
    assert_eq!(kvm::kvm_fds(), 0, "every KVM fd is closed after teardown");
    Some(r)
}

/// Teardown released everything vmsa-core allocated.
fn check_teardown(r: &KvmRun, n: u32) {
    let t = &r.report.host.teardown;
    assert_eq!(t.vcpus, n as usize);
    assert_eq!(t.vmsas_leaked, Observed::Seen(0));
    assert_eq!(t.frames_still_allocated, Observed::Seen(0));
    assert_eq!(t.frames_leaked_on_purpose, Observed::Seen(0));
    assert!(!r.events().iter().any(|e| matches!(e, Event::Leaked { .. })));
}

fn check_scenario(r: &KvmRun, n: u32) {
    assert!(r.report.launch_error.is_none(), "{:?}", r.report.launch_error);
    assert_eq!(*r.end(), RunEnd::Done, "the BSP's DONE ends the run");
    let g = r.guest();
    // n - 1 creates, one destroy, one re-create: every GHCB request is a step, none failed.
    let want: Vec<(&str, u32)> = (1..n)
        .map(|apic| ("ap_create", apic))
        .chain([("ap_destroy", 1), ("ap_create", 1)])
        .collect();
    let got: Vec<(&str, u32)> = g
        .steps
        .iter()
        .map(|s| (s.action.as_str(), s.target_of()))
        .collect();
    assert_eq!(got, want, "{:#?}", g.steps);
    assert!(
        g.steps
            .iter()
            .enumerate()
            .all(|(i, s)| s.index == i && s.vcpu == 0)
    );
    assert_eq!(g.failures().count(), 0, "{:#?}", g.steps);
    assert_eq!((g.ap_requests, g.ap_refused), (u64::from(n) + 1, 0));
    // Each AP entered from the VMSA the guest wrote, with the SEV_FEATURES the guest derived
    // from SEV_STATUS (SNP_ACTIVE alone, which vmsa-core checked against the VM's).
    for s in g.steps.iter().filter(|s| s.action == "ap_create") {
        let apic = s.target_of();
        assert_eq!(
            s.detail,
            format!(
                "vCPU {apic} entered (VMSA at {:#x}, SEV_FEATURES 0x1)",
                0x20_0000 + u64::from(apic) * 0x1000
            )
        );
    }
    assert_eq!(g.steps[n as usize - 1].detail, "vCPU 1 halted", "AP_DESTROY");
    // One VMSA load per vCPU, two for AP 1; each AP ran to its report (DONE parks it: a halt),
    // AP 1 once per generation.
    assert_eq!(g.vmruns, u64::from(n) + 1);
    let halts: Vec<u64> = r.exits().iter().map(|e| e.halts).collect();
    assert_eq!(halts[1], 2, "AP 1 reported in both generations");
    assert!(halts[2..].iter().all(|h| *h == 1), "{halts:?}");
    // Ownership: the BSP keeps its launched host VMSA; every AP moves from its host VMSA to the
    // guest page at 0x200000 + apic * 4096; AP 1 is destroyed and re-created.
    use Op::*;
    use StateKind as S;
    assert_eq!(
        r.ops(0),
        vec![
            (Alloc, S::KvmShared),
            (MakePrivate, S::KvmPrivate),
            (Free, S::None)
        ]
    );
    assert_eq!(
        r.ops(1),
        vec![
            (Alloc, S::KvmShared),
            (MakePrivate, S::KvmPrivate),
            (SetGuestVmsa, S::None),
            (SetGuestVmsa, S::GuestOwned),
            (Destroy, S::None),
            (SetGuestVmsa, S::GuestOwned),
            (Free, S::None),
        ]
    );
    let histories = r.histories();
    assert_eq!(histories.len(), n as usize);
    for (apic, h) in histories.iter().enumerate().skip(2) {
        let ops: Vec<(Op, StateKind)> = h.transitions.iter().map(|t| (t.op, t.to.kind())).collect();
        assert_eq!(
            ops,
            vec![
                (Alloc, S::KvmShared),
                (MakePrivate, S::KvmPrivate),
                (SetGuestVmsa, S::None),
                (SetGuestVmsa, S::GuestOwned),
                (Free, S::None),
            ],
            "AP {apic}"
        );
        assert_eq!(
            h.transitions[3].to,
            vmsa_core::VmsaState::GuestOwned(Gpa(0x20_0000 + apic as u64 * 0x1000))
        );
    }
    assert!(r.report.host.launch_digest.seen().is_none());
    check_teardown(r, n);
}

/// The APIC ID a step's request targeted, from its detail ("vCPU N ...").
trait Target {
    fn target_of(&self) -> u32;
}

impl Target for vmsa_host::GuestStep {
    fn target_of(&self) -> u32 {
        self.detail
            .strip_prefix("vCPU ")
            .and_then(|d| d.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("step {}: {}", self.index, self.detail))
    }
}

#[test]
fn ap_creation_on_4_vcpus() {
    if let Some(r) = ap_creation("ap_creation_on_4_vcpus", 4, true) {
        check_scenario(&r, 4);
    }
}

#[test]
fn ap_creation_on_64_vcpus() {
    if let Some(r) = ap_creation("ap_creation_on_64_vcpus", 64, true) {
        check_scenario(&r, 64);
    }
}

#[test]
fn a_single_vcpu_runs_the_bsp_alone() {
    let Some(r) = ap_creation("a_single_vcpu_runs_the_bsp_alone", 1, true) else {
        return;
    };
    assert_eq!(*r.end(), RunEnd::Done);
    let g = r.guest();
    assert!(g.steps.is_empty(), "no GHCB request: {:?}", g.steps);
    assert_eq!((g.ap_requests, g.ap_refused, g.vmruns), (0, 0, 1));
    check_teardown(&r, 1);
}

#[test]
fn without_recreation_ap_1_reports_once() {
    let Some(r) = ap_creation("without_recreation_ap_1_reports_once", 3, false) else {
        return;
    };
    assert_eq!(*r.end(), RunEnd::Done);
    let g = r.guest();
    let actions: Vec<&str> = g.steps.iter().map(|s| s.action.as_str()).collect();
    assert_eq!(actions, ["ap_create", "ap_create"]);
    assert_eq!(g.ap_requests, 2);
    assert_eq!(
        r.exits().iter().map(|e| e.halts).collect::<Vec<_>>()[1..],
        [1, 1],
        "each AP reported once"
    );
    assert!(!r.ops(1).iter().any(|(op, _)| *op == Op::Destroy));
    check_teardown(&r, 3);
}

/// `program` on 2 vCPUs, whose BSP never exits on its own, ended by a 300 ms watchdog: the
/// kick brought `KVM_RUN` back interrupted, the BSP never reported, nothing is left. The BSP's
/// exits, or `None` where KVM cannot be used.
fn ended_by_the_watchdog(test: &str, program: &GuestProgram) -> Option<VcpuExits> {
    let host = kvm::image_host(test)?;
    let _turn = kvm::turn();
    let r = kvm::run(&host, program, 2, kvm::memory_for(2), Duration::from_millis(300));
    assert!(r.elapsed < Duration::from_secs(10), "{:?}", r.elapsed);
    assert_eq!(*r.end(), RunEnd::Watchdog { after_ms: 300 });
    let bsp = r.exits()[0].clone();
    assert!(
        bsp.interrupted >= 1,
        "KVM_RUN returned EINTR after the kick: {bsp:?}"
    );
    assert_eq!(bsp.io, 0, "the BSP never reported");
    assert_eq!(r.report.host.teardown.frames_still_allocated, Observed::Seen(0));
    assert_eq!(kvm::kvm_fds(), 0);
    Some(bsp)
}

#[test]
fn a_vcpu_stuck_in_kvm_run_is_ended_by_the_watchdog() {
    ended_by_the_watchdog(
        "a_vcpu_stuck_in_kvm_run_is_ended_by_the_watchdog",
        &GuestProgram::Spin,
    );
}

/// A guest HLT halts its vCPU inside KVM, its local APIC being in the kernel (a split irqchip,
/// as an SNP VM has), rather than exiting to the VMM: the vCPU never reported a halt to the VMM.
#[test]
fn a_halted_vcpu_stays_in_kvm_until_the_watchdog() {
    if let Some(bsp) = ended_by_the_watchdog(
        "a_halted_vcpu_stays_in_kvm_until_the_watchdog",
        &GuestProgram::Halt,
    ) {
        assert_eq!(bsp.halts, 0, "HLT did not leave KVM: {bsp:?}");
    }
}

/// The BSP writes a fresh AP page (zero since launch) with only the template's non-zero
/// stretches, and AP 1's page, rewritten for generation 2, whole: after the run every AP page
/// is the whole template with the APIC ID (RDI), the generation (RSI) and the SEV_FEATURES the
/// guest derived, byte for byte. Drives the VMM's flow a step at a time, to read guest memory
/// before teardown.
#[test]
fn every_ap_page_the_bsp_wrote_is_the_whole_template() {
    let Some(host) = kvm::image_host("every_ap_page_the_bsp_wrote_is_the_whole_template") else {
        return;
    };
    let _turn = kvm::turn();
    let n = 6;
    let image = GuestProgram::ApCreation { recreate: true }.image(n).unwrap();
    let launch = Launch::snp_image(
        kvm::memory_for(n),
        SNP_POLICY_RSVD_MBO,
        image.gpa,
        &image.bytes,
        &image.vmsas,
    );
    let mut vm = host.create_vm(launch.spec).unwrap();
    let mut vcpus = Vec::new();
    flow::create(&mut vm, &launch, host.capabilities(), &mut vcpus).unwrap();
    flow::launch(&mut vm, &launch, &Progress::hidden()).unwrap();
    let out = flow::run_vcpus(&vm, vcpus, WATCHDOG, &Progress::hidden()).unwrap();
    assert_eq!(out.end, RunEnd::Done);
    for apic in 1..n {
        let mut want = layout::long_mode_image(PROGRAM.entries.ap);
        want.rdi = u64::from(apic);
        want.rsi = if apic == 1 { 2 } else { 1 };
        want.sev_features = 1;
        let mut page = [0u8; 4096];
        vm.read_memory(layout::ap_vmsa_gpa(apic), &mut page).unwrap();
        let diff: Vec<usize> = (0..4096).filter(|&i| page[i] != want.as_page()[i]).collect();
        assert!(diff.is_empty(), "AP {apic}: bytes differ at {diff:x?}");
    }
    vm.teardown();
    assert_eq!(kvm::kvm_fds(), 0);
}

fn run_args(vcpus: &str, memory: &str) -> vmm::run::RunArgs {
    vmm::run::RunArgs::from_args([
        "--backend",
        "kvm",
        "--vcpus",
        vcpus,
        "--memory",
        memory,
        "--guest",
        "builtin:ap-churn",
        "--json",
    ])
    .unwrap()
}

#[test]
fn four_vcpus_in_automatic_mode() {
    if !kvm::kvm_or_skip("four_vcpus_in_automatic_mode") {
        return;
    }
    // The probe opens /dev/kvm and VMs: it takes the turn as every KVM user of this binary does,
    // so that the tests counting KVM fds under it see none of these.
    let _turn = kvm::turn();
    let host = probe();
    if host.supports(Mode::Snp) {
        eprintln!("skipped: this host has SNP, so automatic mode would not use VMSA-image mode");
        return;
    }
    if !host.supports(Mode::VmsaImage) {
        eprintln!("skipped four_vcpus_in_automatic_mode: this host's KVM cannot run VMSA-image mode");
        return;
    }
    let s = vmm::run::run(&run_args("4", "16M")).unwrap();
    assert!(s.ok, "{:?}", s.problems);
    assert_eq!(s.mode, Mode::VmsaImage.to_string());
    let reason = s.mode_reason.as_deref().unwrap();
    assert!(
        reason.contains("SEV-SNP is not available") && reason.contains("VMSA-image"),
        "{reason}"
    );
    for m in host.missing(Mode::Snp) {
        assert!(reason.contains(&m.to_string()), "{reason}");
    }
    let run = s.guest_run.as_ref().unwrap();
    assert_eq!(run.end, RunEnd::Done);
    // The guest's requests are reported like the simulator's actions.
    assert_eq!((run.actions, run.failed), (5, 0));
    assert_eq!((run.ap_requests, run.ap_refused), (5, 0));
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["mode"], "VMSA-image");
    assert_eq!(json["guest_run"]["actions"], 5);
    let path: Vec<&str> = json["ownership"]["vcpus"][1]["path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(path.contains(&"GuestOwned"), "{path:?}");
}

#[test]
fn bad_configurations_are_refused_before_any_vm_exists() {
    if !kvm::kvm_or_skip("bad_configurations_are_refused_before_any_vm_exists") {
        return;
    }
    let _turn = kvm::turn();
    let e = vmm::run::run(&run_args("4", "1M")).unwrap_err();
    assert!(matches!(e, vmm::run::RunError::KvmMemory { .. }), "{e}");
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("--memory 1M"), "{e}");
    assert_eq!(kvm::kvm_fds(), 0, "no VM was created");
    assert!("0".parse::<vmm::measure::VcpuCount>().is_err(), "0 vCPUs");
}
