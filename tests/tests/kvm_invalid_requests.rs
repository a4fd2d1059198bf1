//! AP-creation requests a real guest makes through the GHCB doorbell on KVM (VMSA-image mode),
//! run through the VMM's flow: each request is a guest step of the host's report, answered
//! exactly as vmsa-core (and hence the simulator) answers it.

use std::time::Duration;

use backend_kvm::guest::builtin::{GuestProgram, GuestRequest};
use scenario_tests::kvm;
use vmm::run::flow::RunEnd;
use vmsa_core::ghcb::{AP_CREATE, AP_CREATE_ON_INIT};
use vmsa_core::testing::TestPlatform;
use vmsa_core::{ApCreationRequest, Gpa, Op, VcpuId, Vm, VmConfig, VmsaState};
use vmsa_host::Observed;

const SNP_ACTIVE: u64 = 1;

/// What vmsa-core answers a request from vCPU 0 of a 4-vCPU SNP VM.
fn core_answer(vm: &Vm<TestPlatform>, r: &GuestRequest) -> (u64, u64) {
    let req = ApCreationRequest {
        requester: VcpuId(0),
        exit_info_1: r.exit_info_1,
        exit_info_2: r.exit_info_2,
        rax: r.rax,
    };
    match vm.ap_creation(&req) {
        Ok(_) => (0, 0),
        Err(e) => e.sw_exit_info(),
    }
}

#[test]
fn invalid_requests_get_the_same_ghcb_errors_as_vmsa_core() {
    let Some(host) = kvm::image_host("invalid_requests_get_the_same_ghcb_errors_as_vmsa_core") else {
        return;
    };
    let memory = 16u64 << 20;
    let unbacked = memory + 0x1000; // inside MAXPHYADDR, outside every memslot
    // (request, what the guest must read back, the step's action, why)
    let cases: Vec<(GuestRequest, (u64, u64), &str, &str)> = vec![
        (
            GuestRequest::new(AP_CREATE, 1, 0x20_1008, Some(SNP_ACTIVE)),
            (2, 5),
            "ap_create",
            "unaligned GPA",
        ),
        (
            GuestRequest::new(AP_CREATE, 1, 0x20_1000, Some(SNP_ACTIVE | 0x20)),
            (2, 5),
            "ap_create",
            "SEV_FEATURES mismatch",
        ),
        (
            GuestRequest::new(AP_CREATE, 9, 0x20_9000, Some(SNP_ACTIVE)),
            (2, 5),
            "ap_create",
            "unknown APIC ID",
        ),
        (
            GuestRequest::new(AP_CREATE, 1, 1 << 56, Some(SNP_ACTIVE)),
            (2, 5),
            "ap_create",
            "GPA beyond MAXPHYADDR",
        ),
        (
            GuestRequest::new(AP_CREATE_ON_INIT, 1, 0x40_0000, Some(SNP_ACTIVE)),
            (2, 5),
            "ap_create_on_init",
            "2 MiB-aligned GPA (erratum 1467)",
        ),
        (
            GuestRequest::new(AP_CREATE, 1, 0x20_1000, None),
            (2, 4),
            "ap_create",
            "RAX not marked valid",
        ),
        (
            GuestRequest::new(3, 1, 0x20_1000, Some(SNP_ACTIVE)),
            (2, 5),
            "ap_creation",
            "unknown request type",
        ),
        (
            // AP 2 reports before the next request, whose failed entry ends the run: its VMSA
            // load is counted whatever the scheduling.
            GuestRequest::create_with_vmsa(2, 0x20_2000, SNP_ACTIVE).then_wait_for_reports(1),
            (0, 0),
            "ap_create",
            "a valid request",
        ),
        (
            GuestRequest::new(AP_CREATE, 3, unbacked, Some(SNP_ACTIVE)),
            (0, 0),
            "ap_create",
            "a GPA no guest_memfd backs (accepted; the AP stays halted)",
        ),
    ];
    // Only AP 2 can report: the BSP waits for that one report after its table, then ends the run.
    let program = GuestProgram::Requests {
        requests: cases.iter().map(|c| c.0).collect(),
        expect_reports: 1,
    };
    let r = {
        let _turn = kvm::turn();
        kvm::run(&host, &program, 4, memory, Duration::from_secs(60))
    };
    let g = r.guest();
    println!("{:?}\n{:#?}", r.end(), g.steps);

    // Every request of the table is a step, in order, from the BSP.
    assert_eq!(
        g.steps.len(),
        cases.len(),
        "the BSP made every request of its table"
    );
    let mut core = Vm::without_events(TestPlatform::default(), VmConfig::snp(0));
    for id in 0..4 {
        core.create_vcpu(VcpuId(id)).unwrap();
    }
    // Requests come from a launched guest: vmsa-core refuses them before the launch finished.
    core.launch_start(vmsa_core::SNP_POLICY_RSVD_MBO).unwrap();
    core.launch_finish([0; 32]).unwrap();
    for ((req, want, action, why), step) in cases.iter().zip(&g.steps) {
        assert_eq!(step.vcpu, 0, "{why}");
        assert_eq!(step.action, *action, "{why}");
        let got = kvm::sw_exit_info(step);
        assert_eq!(got, *want, "{why}: {step:?}");
        assert_eq!(got, core_answer(&core, req), "{why}: vmsa-core agrees");
    }
    assert_eq!(g.failures().count(), 7);
    assert_eq!((g.ap_requests, g.ap_refused), (2, 7));

    // The valid request started AP 2 from the VMSA the guest wrote; AP 1 was never touched.
    assert_eq!(
        g.steps[7].detail,
        "vCPU 2 entered (VMSA at 0x202000, SEV_FEATURES 0x1)"
    );
    let histories = r.histories();
    assert_eq!(
        histories[2].transitions[3].to,
        VmsaState::GuestOwned(Gpa(0x20_2000))
    );
    let ap1: Vec<Op> = histories[1].transitions.iter().map(|t| t.op).collect();
    assert_eq!(
        ap1,
        vec![Op::Alloc, Op::MakePrivate, Op::Free],
        "AP 1 was only launched and torn down: refused requests change nothing"
    );
    // The BSP's launch VMSA and AP 2's were loaded; AP 3's never was.
    assert_eq!(g.vmruns, 2);
    // The unbacked request was recorded, but no page backs it: as
    // __sev_snp_update_protected_guest_state, AP 3 is left halted with no VMSA address, and the
    // run ends when the BSP is done.
    assert_eq!(
        g.steps[8].detail,
        format!("vCPU 3 halted (VMSA at {unbacked:#x}, SEV_FEATURES 0x1)")
    );
    let t3 = &histories[3].transitions;
    assert_eq!(t3[t3.len() - 2].to, VmsaState::GuestOwned(Gpa(unbacked)));
    assert!(matches!(r.end(), RunEnd::Done), "{}", r.end());
    assert_eq!(r.report.host.teardown.frames_still_allocated, Observed::Seen(0));
}
