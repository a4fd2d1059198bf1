//! AP-creation requests a real guest makes through the GHCB doorbell, answered by the KVM
//! backend exactly as vmsa-core (and hence the simulator) answers them.

mod common;

use backend_kvm::runner::{self, GuestProgram, GuestRequest, ModeChoice, RunConfig};
use vmsa_core::ghcb::{AP_CREATE, AP_CREATE_ON_INIT};
use vmsa_core::testing::TestPlatform;
use vmsa_core::{ApCreationRequest, VcpuId, Vm, VmConfig};

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
    if !common::kvm_or_skip("invalid_requests_get_the_same_ghcb_errors_as_vmsa_core") {
        return;
    }
    let memory = 16u64 << 20;
    let unbacked = memory + 0x1000; // inside MAXPHYADDR, outside every memslot
    // (request, what the guest must read back, why)
    let cases: Vec<(GuestRequest, (u64, u64), &str)> = vec![
        (
            GuestRequest::new(AP_CREATE, 1, 0x20_1008, Some(SNP_ACTIVE)),
            (2, 5),
            "unaligned GPA",
        ),
        (
            GuestRequest::new(AP_CREATE, 1, 0x20_1000, Some(SNP_ACTIVE | 0x20)),
            (2, 5),
            "SEV_FEATURES mismatch",
        ),
        (
            GuestRequest::new(AP_CREATE, 9, 0x20_9000, Some(SNP_ACTIVE)),
            (2, 5),
            "unknown APIC ID",
        ),
        (
            GuestRequest::new(AP_CREATE, 1, 1 << 56, Some(SNP_ACTIVE)),
            (2, 5),
            "GPA beyond MAXPHYADDR",
        ),
        (
            GuestRequest::new(AP_CREATE_ON_INIT, 1, 0x40_0000, Some(SNP_ACTIVE)),
            (2, 5),
            "2 MiB-aligned GPA (erratum 1467)",
        ),
        (
            GuestRequest::new(AP_CREATE, 1, 0x20_1000, None),
            (2, 4),
            "RAX not marked valid",
        ),
        (
            GuestRequest::new(3, 1, 0x20_1000, Some(SNP_ACTIVE)),
            (2, 5),
            "unknown request type",
        ),
        (
            GuestRequest::create_with_vmsa(2, 0x20_2000, SNP_ACTIVE),
            (0, 0),
            "a valid request",
        ),
        (
            GuestRequest::new(AP_CREATE, 3, unbacked, Some(SNP_ACTIVE)),
            (0, 0),
            "a GPA no guest_memfd backs (accepted; the entry fails)",
        ),
    ];
    let cfg = RunConfig {
        vcpus: 4,
        memory,
        guest: GuestProgram::Requests {
            requests: cases.iter().map(|c| c.0).collect(),
            expect_reports: 1,
        },
        mode: ModeChoice::VmsaImage,
        timeout: std::time::Duration::from_secs(60),
    };
    let r = runner::run(&cfg).unwrap();
    println!("{r}");
    assert!(!r.timed_out);
    assert_eq!(r.vcpu_records[0].done, vec![0], "the BSP finished its table");

    let mut core = Vm::without_events(TestPlatform::default(), VmConfig::snp(0));
    for id in 0..4 {
        core.create_vcpu(VcpuId(id)).unwrap();
    }
    // Requests come from a launched guest: vmsa-core refuses them before the launch finished.
    core.launch_start(vmsa_core::SNP_POLICY_RSVD_MBO).unwrap();
    core.launch_finish([0; 32]).unwrap();
    for ((req, want, why), got) in cases.iter().zip(&r.request_results) {
        assert_eq!(*got, *want, "{why}");
        assert_eq!(*got, core_answer(&core, req), "{why}: vmsa-core agrees");
    }

    // The valid request started AP 2 from the VMSA the guest wrote; AP 1 was never touched.
    assert_eq!(r.mailboxes[2], (1 << 32) | 2);
    assert_eq!(r.mailboxes[1], 0);
    assert_eq!(r.accepted_requests.len(), 2);
    let ap1: Vec<_> = r.histories[1].transitions.iter().map(|t| t.op).collect();
    assert_eq!(
        ap1,
        vec![
            vmsa_core::Op::Alloc,
            vmsa_core::Op::MakePrivate,
            vmsa_core::Op::Free
        ],
        "AP 1 was only launched and torn down: refused requests change nothing"
    );
    // The unbacked request was recorded, but the AP could not enter: vmsa-core refuses a
    // runnable vCPU whose VMSA resolves to nothing (KVM_RUN would fail with EINVAL on SNP).
    let ap3 = &r.vcpu_records[3];
    assert_eq!(ap3.vmsa_loads, 0);
    assert!(
        ap3.errors.iter().any(|e| e.to_string().contains("no valid VMSA")),
        "{:?}",
        ap3.errors
    );
    let t3 = &r.histories[3].transitions;
    assert_eq!(
        t3[t3.len() - 2].to,
        vmsa_core::VmsaState::GuestOwned(vmsa_core::Gpa(unbacked))
    );
    assert!(!r.completed, "an AP error means the run did not complete cleanly");
    assert_eq!(r.teardown.host_pages_live, 0);
}
