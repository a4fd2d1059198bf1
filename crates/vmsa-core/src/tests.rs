//! Tests of the transitions and whole-VM flows against [`TestPlatform`], one per behaviour and
//! failure path, plus property tests over random lifecycles of several vCPUs.

use std::sync::Arc;
use std::{boxed::Box, string::ToString, vec::Vec};

use crate::testing::{Call, TestPlatform};
use crate::vcpu::{Cx, Vcpu};
use crate::*;

const BSP: VcpuId = VcpuId(0);
const SNP_POLICY: u64 = SNP_POLICY_RSVD_MBO;

fn snp_vm(vcpus: u32) -> (Vm<TestPlatform>, Arc<EventLog>) {
    vm_with(VmConfig::snp(0), vcpus, TestPlatform::default())
}

fn vm_with(config: VmConfig, vcpus: u32, p: TestPlatform) -> (Vm<TestPlatform>, Arc<EventLog>) {
    let log = Arc::new(EventLog::new());
    let mut vm = Vm::new(p, config, log.clone());
    for i in 0..vcpus {
        vm.create_vcpu(VcpuId(i)).unwrap();
    }
    (vm, log)
}

fn launched_snp(vcpus: u32, policy: u64) -> (Vm<TestPlatform>, Arc<EventLog>) {
    let (mut vm, log) = snp_vm(vcpus);
    vm.launch_start(policy).unwrap();
    vm.launch_finish([0; 32]).unwrap();
    (vm, log)
}

fn host_pfn(vm: &Vm<TestPlatform>, id: VcpuId) -> Pfn {
    match vm.vcpu(id).unwrap().state {
        VmsaState::KvmShared(p) | VmsaState::KvmPrivate(p) => p,
        s => panic!("vCPU {id} has no host VMSA: {s:?}"),
    }
}

fn transitions(log: &EventLog, vcpu: VcpuId) -> Vec<(Op, StateKind, StateKind)> {
    log.snapshot()
        .into_iter()
        .filter_map(|e| match e {
            Event::Transition {
                vcpu: v,
                op,
                from,
                to,
            } if v == vcpu => Some((op, from.kind(), to.kind())),
            _ => None,
        })
        .collect()
}

fn ap(requester: u32, request: u32, target: u32, gpa: u64) -> ApCreationRequest {
    ApCreationRequest::new(
        VcpuId(requester),
        request,
        target,
        gpa,
        Some(layout::SEV_FEAT_SNP_ACTIVE),
    )
}

// ---- allocation -------------------------------------------------------------------------

#[test]
fn create_allocates_a_shared_vmsa_and_points_the_vmcb_at_it() {
    let (vm, log) = snp_vm(1);
    let v = vm.vcpu(BSP).unwrap();
    let VmsaState::KvmShared(pfn) = v.state else {
        panic!("{:?}", v.state)
    };
    assert_eq!(v.vmcb_vmsa_pa, Some(pfn.hpa()));
    assert_eq!(v.mp_state, MpState::Runnable);
    assert_eq!(vm.platform().live_pages(), vec![pfn]);
    assert_eq!(
        transitions(&log, BSP),
        vec![(Op::Alloc, StateKind::None, StateKind::KvmShared)]
    );
}

#[test]
fn alloc_refuses_a_2m_aligned_page_and_returns_it() {
    let (vm, log) = vm_with(VmConfig::snp(0), 1, TestPlatform::new(Asid(1), Pfn(1024)));
    assert_eq!(host_pfn(&vm, BSP), Pfn(1025));
    assert_eq!(vm.platform().freed_pages(), vec![Pfn(1024)]);
    assert_eq!(vm.platform().live_pages(), vec![Pfn(1025)]);
    assert!(log.snapshot().contains(&Event::Erratum1467Avoided {
        vcpu: BSP,
        refused: Pfn(1024)
    }));
}

#[test]
fn alloc_failure_creates_no_vcpu() {
    let p = TestPlatform::default();
    p.fail_next(Call::AllocPage);
    let mut vm = Vm::without_events(p, VmConfig::snp(0));
    let err = vm.create_vcpu(BSP).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Platform {
                op: PlatformOp::AllocPage,
                vcpu: Some(BSP),
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(vm.vcpu(BSP), Err(Error::UnknownVcpu(BSP))));
    // A later attempt works.
    vm.create_vcpu(BSP).unwrap();
}

#[test]
fn alloc_failure_after_a_refused_page_returns_the_refused_page() {
    let p = TestPlatform::new(Asid(1), Pfn(512));
    p.fail_nth(Call::AllocPage, 2);
    let mut vm = Vm::without_events(p, VmConfig::snp(0));
    assert!(vm.create_vcpu(BSP).is_err());
    assert!(vm.platform().live_pages().is_empty());
    assert_eq!(vm.platform().freed_pages(), vec![Pfn(512)]);
}

#[test]
fn alloc_from_a_state_other_than_none_warns_and_fails() {
    let (vm, log) = snp_vm(1);
    let cx = Cx {
        p: vm.platform(),
        kind: VmKind::Snp,
        events: &*log,
    };
    let mut v: Vcpu<testing::TestPage> = Vcpu::new(VcpuId(7), MpState::Runnable);
    cx.alloc(&mut v).unwrap();
    let err = cx.alloc(&mut v).unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidState {
            vcpu: VcpuId(7),
            op: Op::Alloc,
            state: StateKind::KvmShared
        }
    ));
    assert_eq!(log.warnings().len(), 1);
    cx.free(&mut v, Op::Free);
}

#[test]
fn duplicate_and_unknown_vcpus_are_refused() {
    let (mut vm, _) = snp_vm(1);
    assert!(matches!(vm.create_vcpu(BSP), Err(Error::VcpuExists(BSP))));
    assert!(matches!(vm.vcpu(VcpuId(9)), Err(Error::UnknownVcpu(VcpuId(9)))));
    assert_eq!(vm.platform().live_pages().len(), 1);
}

#[test]
fn vcpus_whose_ids_are_not_their_indices_are_found_by_id() {
    // Index 0 holds id 2, index 1 id 0, index 2 id 1 (an id equal to another vCPU's index),
    // index 3 id 7: the fast path (id == index) must never answer for the wrong vCPU.
    let ids = [VcpuId(2), VcpuId(0), VcpuId(1), VcpuId(7)];
    let log = Arc::new(EventLog::new());
    let mut vm = Vm::new(TestPlatform::default(), VmConfig::snp(0), log);
    for id in ids {
        vm.create_vcpu(id).unwrap();
    }
    assert_eq!(vm.vcpu_ids(), ids);
    for id in ids {
        assert_eq!(vm.vcpu(id).unwrap().id, id);
    }
    assert!(matches!(vm.vcpu(VcpuId(3)), Err(Error::UnknownVcpu(VcpuId(3)))));
    assert_eq!(
        vm.vcpu(VcpuId(2)).unwrap().mp_state,
        MpState::Runnable,
        "the first created is the BSP"
    );
    vm.launch_start(SNP_POLICY).unwrap();
    vm.launch_finish([0; 32]).unwrap();
    for target in [1, 7] {
        vm.ap_creation(&ap(
            2,
            ghcb::AP_CREATE,
            target,
            0x20_1000 + u64::from(target) * 0x1000,
        ))
        .unwrap();
        let gpa = vm.vcpu(VcpuId(target)).unwrap().pending_gpa;
        assert_eq!(
            gpa,
            Some(Gpa(0x20_1000 + u64::from(target) * 0x1000)),
            "target {target}"
        );
    }
    assert_eq!(vm.vcpu(VcpuId(0)).unwrap().pending_gpa, None);
    assert!(matches!(
        vm.ap_creation(&ap(2, ghcb::AP_CREATE, 3, 0x20_1000)),
        Err(ApCreationError::UnknownApicId { apic_id: 3 })
    ));
}

// ---- SNP launch --------------------------------------------------------------------------

#[test]
fn snp_launch_makes_every_vmsa_a_measured_private_page_in_index_order() {
    let (mut vm, log) = snp_vm(4);
    let mut regs = SevEsSaveArea::boxed();
    regs.rip = 0xfff0;
    regs.dr7 = layout::DR7_FIXED_1;
    vm.set_registers(VcpuId(2), &regs).unwrap();
    vm.launch_start(SNP_POLICY).unwrap();
    vm.launch_finish([0; 32]).unwrap();
    assert_eq!(vm.launch_state(), LaunchState::Finished);
    let pfns: Vec<_> = (0..4).map(|i| host_pfn(&vm, VcpuId(i))).collect();
    for (i, info) in vm.vcpus().into_iter().enumerate() {
        assert_eq!(info.state, VmsaState::KvmPrivate(pfns[i]));
        assert!(info.protected);
        assert_eq!(info.vmcb_vmsa_pa, Some(pfns[i].hpa()));
        assert!(vm.platform().is_assigned(pfns[i]));
    }
    let measured: Vec<_> = vm.platform().measured();
    assert_eq!(
        measured,
        pfns.iter()
            .map(|p| (*p, SnpPageType::Vmsa as u8))
            .collect::<Vec<_>>()
    );
    // The synced image carries the VM's SEV features (SNP_ACTIVE added) and the registers.
    let image = SevEsSaveArea::from_page(&vm.platform().frame(pfns[2]));
    assert_eq!(image.rip, 0xfff0);
    assert_eq!(image.sev_features, layout::SEV_FEAT_SNP_ACTIVE);
    assert_eq!(
        transitions(&log, VcpuId(3)),
        vec![
            (Op::Alloc, StateKind::None, StateKind::KvmShared),
            (Op::MakePrivate, StateKind::KvmShared, StateKind::KvmPrivate)
        ]
    );
}

#[test]
fn snp_launch_failure_reclaims_the_vmsa_and_a_retry_gets_a_typed_error() {
    let (mut vm, log) = snp_vm(4);
    vm.platform().fail_nth(Call::SnpLaunchUpdate, 3);
    vm.launch_start(SNP_POLICY).unwrap();
    let victim = host_pfn(&vm, VcpuId(2));
    let err = vm.launch_finish([0; 32]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Platform {
                vcpu: Some(VcpuId(2)),
                op: PlatformOp::SnpLaunchUpdate,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(vm.launch_state(), LaunchState::Failed);
    let infos = vm.vcpus();
    assert!(infos[0].protected && infos[1].protected);
    let v2 = &infos[2];
    assert_eq!((v2.state.clone(), v2.vmcb_vmsa_pa), (VmsaState::None, None));
    assert!(matches!(infos[3].state, VmsaState::KvmShared(_)));
    // Reclaimed: firmware reclaim, RMP back to shared, then freed; nothing leaked.
    assert_eq!(vm.platform().calls(Call::PageReclaim), 1);
    assert!(!vm.platform().is_assigned(victim));
    assert!(vm.platform().freed_pages().contains(&victim));
    assert!(log.leaks().is_empty());
    assert!(transitions(&log, VcpuId(2)).contains(&(Op::Reclaim, StateKind::KvmPrivate, StateKind::None)));
    // The retry: no write through the freed VMSA, a typed error instead.
    let writes = vm.platform().calls(Call::WriteFrame);
    let err = vm.launch_finish([0; 32]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Launch {
                state: LaunchState::Failed,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(vm.platform().calls(Call::WriteFrame), writes);
    assert!(vm.platform().violations().is_empty());
}

#[test]
fn failed_reclaim_leaks_the_vmsa_with_a_message_and_bugs_the_vm() {
    let (mut vm, log) = snp_vm(2);
    vm.platform().fail_nth(Call::SnpLaunchUpdate, 1);
    vm.platform().fail_nth(Call::PageReclaim, 1);
    vm.launch_start(SNP_POLICY).unwrap();
    let victim = host_pfn(&vm, BSP);
    vm.launch_finish([0; 32]).unwrap_err();
    assert_eq!(vm.platform().leaked_pages(), vec![victim]);
    assert!(!vm.platform().freed_pages().contains(&victim));
    let leaks = log.leaks();
    assert!(matches!(
        &leaks[..],
        [Event::Leaked { vcpu: Some(BSP), pfn, reason: LeakReason::ReclaimFailed, detail }]
            if *pfn == victim && detail.contains("PageReclaim")
    ));
    assert_eq!(vm.vcpu(BSP).unwrap().vmcb_vmsa_pa, None);
    assert!(vm.is_bugged());
    assert!(matches!(vm.prepare_entry(BSP), Err(Error::VmBugged { pfn, .. }) if pfn == victim));
    assert!(vm.platform().violations().is_empty());
}

#[test]
fn make_shared_failure_after_reclaim_leaks_too() {
    let (mut vm, log) = snp_vm(1);
    vm.platform().fail_nth(Call::SnpLaunchUpdate, 1);
    vm.platform().fail_nth(Call::RmpMakeShared, 1);
    vm.launch_start(SNP_POLICY).unwrap();
    vm.launch_finish([0; 32]).unwrap_err();
    assert!(matches!(
        &log.leaks()[..],
        [Event::Leaked {
            reason: LeakReason::ReclaimMakeSharedFailed,
            ..
        }]
    ));
    assert_eq!(vm.platform().leaked_pages().len(), 1);
}

#[test]
fn rmpupdate_failure_during_launch_keeps_the_page_shared() {
    let (mut vm, _) = snp_vm(2);
    vm.platform().fail_nth(Call::RmpMakePrivate, 2);
    vm.launch_start(SNP_POLICY).unwrap();
    let err = vm.launch_finish([0; 32]).unwrap_err();
    assert!(matches!(
        err,
        Error::Platform {
            op: PlatformOp::RmpMakePrivate,
            vcpu: Some(VcpuId(1)),
            ..
        }
    ));
    let v1 = vm.vcpu(VcpuId(1)).unwrap();
    assert!(matches!(v1.state, VmsaState::KvmShared(_)));
    assert!(!v1.protected);
    assert_eq!(vm.platform().calls(Call::SnpLaunchUpdate), 1);
    assert_eq!(vm.launch_state(), LaunchState::Failed);
}

#[test]
fn launch_commands_are_ordered() {
    let (mut vm, _) = snp_vm(1);
    assert!(matches!(
        vm.launch_finish([0; 32]),
        Err(Error::Launch {
            state: LaunchState::NotStarted,
            ..
        })
    ));
    assert!(matches!(
        vm.launch_start(0),
        Err(Error::BadPolicy { policy: 0, .. })
    ));
    vm.launch_start(SNP_POLICY).unwrap();
    assert!(matches!(
        vm.launch_start(SNP_POLICY),
        Err(Error::Launch {
            state: LaunchState::Started,
            ..
        })
    ));
    assert!(matches!(
        vm.launch_update_vmsas(),
        Err(Error::WrongKind {
            needed: VmKind::SevEs,
            kind: VmKind::Snp,
            ..
        })
    ));
    vm.launch_finish([0; 32]).unwrap();
    assert!(matches!(
        vm.launch_finish([0; 32]),
        Err(Error::Launch {
            state: LaunchState::Finished,
            ..
        })
    ));
}

#[test]
fn launch_start_failure_leaves_the_launch_startable() {
    let (mut vm, _) = snp_vm(1);
    vm.platform().fail_next(Call::LaunchStart);
    assert!(matches!(
        vm.launch_start(SNP_POLICY),
        Err(Error::Platform {
            op: PlatformOp::LaunchStart,
            ..
        })
    ));
    // snp_launch_start decommissions the context it created: a new start may follow.
    assert_eq!(vm.launch_state(), LaunchState::NotStarted);
    vm.launch_start(SNP_POLICY).unwrap();
}

#[test]
fn snp_finish_failure_after_the_vmsas_leaves_them_protected() {
    let (mut vm, log) = snp_vm(2);
    vm.platform().fail_next(Call::LaunchFinish);
    vm.launch_start(SNP_POLICY).unwrap();
    assert!(matches!(
        vm.launch_finish([0; 32]),
        Err(Error::Platform {
            op: PlatformOp::LaunchFinish,
            ..
        })
    ));
    assert!(vm.vcpus().iter().all(|v| v.protected));
    assert_eq!(vm.teardown(), Teardown { vcpus: 2, leaked: 0 });
    assert!(log.leaks().is_empty());
    assert!(vm.platform().violations().is_empty());
}

#[test]
fn sync_refuses_debugged_vcpus_and_armed_dr7() {
    let (mut vm, _) = snp_vm(2);
    vm.set_guest_debug(VcpuId(1), true).unwrap();
    vm.launch_start(SNP_POLICY).unwrap();
    assert!(matches!(
        vm.launch_finish([0; 32]),
        Err(Error::GuestDebug { vcpu: VcpuId(1) })
    ));

    let (mut vm, _) = snp_vm(1);
    let mut regs = SevEsSaveArea::boxed();
    regs.dr7 = 0x401;
    vm.set_registers(BSP, &regs).unwrap();
    vm.launch_start(SNP_POLICY).unwrap();
    assert!(matches!(
        vm.launch_finish([0; 32]),
        Err(Error::Dr7 { dr7: 0x401, .. })
    ));
    assert!(matches!(vm.vcpu(BSP).unwrap().state, VmsaState::KvmShared(_)));
}

#[test]
fn sync_of_a_protected_or_missing_vmsa_never_writes() {
    let (vm, log) = launched_snp(1, SNP_POLICY);
    let cx = Cx {
        p: vm.platform(),
        kind: VmKind::Snp,
        events: &*log,
    };
    let writes = vm.platform().calls(Call::WriteFrame);
    let mut fresh: Vcpu<testing::TestPage> = Vcpu::new(VcpuId(5), MpState::Runnable);
    let err = cx.sync(&mut fresh, 1, true).unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidState {
            op: Op::Sync,
            state: StateKind::None,
            ..
        }
    ));
    fresh.protected = true;
    assert!(matches!(
        cx.sync(&mut fresh, 1, true),
        Err(Error::AlreadyProtected { .. })
    ));
    assert_eq!(vm.platform().calls(Call::WriteFrame), writes);
    assert!(matches!(
        vm.set_registers(BSP, &SevEsSaveArea::boxed()),
        Err(Error::AlreadyProtected { vcpu: BSP, .. })
    ));
}

#[test]
fn legacy_vms_launch_without_the_fpu_area() {
    let config = VmConfig {
        sync_fpu: false,
        ..VmConfig::sev_es(0)
    };
    let (mut vm, _) = vm_with(config, 1, TestPlatform::default());
    let mut regs = SevEsSaveArea::boxed();
    regs.mxcsr = 0x1f80;
    regs.rip = 0x1234;
    vm.set_registers(BSP, &regs).unwrap();
    vm.launch_start(1 << 2).unwrap();
    vm.launch_update_vmsas().unwrap();
    let image = SevEsSaveArea::from_page(&vm.platform().frame(host_pfn(&vm, BSP)));
    assert_eq!((image.rip, image.mxcsr), (0x1234, 0));
}

// ---- SEV-ES launch -----------------------------------------------------------------------

#[test]
fn sev_es_launch_encrypts_without_touching_the_rmp() {
    let (mut vm, _) = vm_with(
        VmConfig::sev_es(layout::SEV_FEAT_DEBUG_SWAP),
        2,
        TestPlatform::default(),
    );
    vm.launch_start(1 << 2).unwrap();
    vm.launch_update_vmsas().unwrap();
    vm.launch_finish([0; 32]).unwrap();
    assert_eq!(vm.platform().calls(Call::RmpMakePrivate), 0);
    assert_eq!(vm.platform().calls(Call::LaunchUpdateVmsa), 2);
    for v in vm.vcpus() {
        assert!(v.protected && matches!(v.state, VmsaState::KvmPrivate(_)));
    }
    let image = SevEsSaveArea::from_page(&vm.platform().frame(host_pfn(&vm, BSP)));
    assert_eq!(
        image.sev_features,
        layout::SEV_FEAT_DEBUG_SWAP,
        "no SNP_ACTIVE for SEV-ES"
    );
    vm.teardown();
    assert_eq!(vm.platform().calls(Call::RmpMakeShared), 0);
    assert_eq!(vm.platform().flushes(), (2, 0));
}

#[test]
fn sev_es_launch_failure_after_a_protected_vcpu_keeps_the_vmsa_and_fails_the_launch() {
    let (mut vm, log) = vm_with(VmConfig::sev_es(0), 3, TestPlatform::default());
    vm.platform().fail_nth(Call::LaunchUpdateVmsa, 2);
    vm.launch_start(1 << 2).unwrap();
    let victim = host_pfn(&vm, VcpuId(1));
    let err = vm.launch_update_vmsas().unwrap_err();
    assert!(matches!(
        err,
        Error::Platform {
            op: PlatformOp::LaunchUpdateVmsa,
            vcpu: Some(VcpuId(1)),
            ..
        }
    ));
    let infos = vm.vcpus();
    assert!(infos[0].protected);
    // __sev_launch_update_vmsa keeps the refused VMSA: shared, unprotected, still in the VMCB.
    assert_eq!(
        (infos[1].state.clone(), infos[1].vmcb_vmsa_pa, infos[1].protected),
        (VmsaState::KvmShared(victim), Some(victim.hpa()), false)
    );
    assert!(matches!(infos[2].state, VmsaState::KvmShared(_)));
    assert!(vm.platform().freed_pages().is_empty());
    assert!(transitions(&log, VcpuId(1)).contains(&(
        Op::LaunchUpdate,
        StateKind::KvmPrivate,
        StateKind::KvmShared
    )));
    // vCPU 0 is protected: the launch cannot be retried.
    assert!(matches!(
        vm.launch_update_vmsas(),
        Err(Error::Launch {
            state: LaunchState::Failed,
            ..
        })
    ));
}

// ---- launch data ---------------------------------------------------------------------------

#[test]
fn snp_data_pages_are_written_assigned_and_measured() {
    let (mut vm, _) = snp_vm(1);
    let p0 = vm.platform().map_gmem(Gfn(0x100));
    let p1 = vm.platform().map_gmem(Gfn(0x101));
    let p2 = vm.platform().map_gmem(Gfn(0x102));
    vm.launch_start(SNP_POLICY).unwrap();
    let data = vec![0xabu8; 8192];
    vm.launch_update_data(Gpa(0x10_0000), 8192, SnpPageType::Normal, Some(&data))
        .unwrap();
    vm.launch_update_data(Gpa(0x10_2000), 4096, SnpPageType::Zero, None)
        .unwrap();
    assert_eq!(vm.platform().frame(p0)[0], 0xab);
    assert_eq!(
        vm.platform().measured(),
        vec![(p0, 1), (p1, 1), (p2, SnpPageType::Zero as u8)]
    );
    assert!(vm.platform().is_assigned(p1));
}

#[test]
fn contents_given_for_a_zero_page_are_ignored_as_by_kvm() {
    let (mut vm, _) = snp_vm(1);
    let p = vm.platform().map_gmem(Gfn(0x100));
    vm.launch_start(SNP_POLICY).unwrap();
    let junk = vec![0x5au8; 4096];
    vm.launch_update_data(Gpa(0x10_0000), 4096, SnpPageType::Zero, Some(&junk))
        .unwrap();
    assert_eq!(vm.platform().measured(), vec![(p, SnpPageType::Zero as u8)]);
    assert_eq!(vm.platform().frame(p)[0], 0, "the junk is not written");
}

#[test]
fn bad_data_updates_name_the_rule() {
    let (mut vm, _) = snp_vm(1);
    vm.launch_start(SNP_POLICY).unwrap();
    let page = [0u8; 4096];
    type Case<'a> = (Gpa, u64, SnpPageType, Option<&'a [u8]>, &'static str);
    let cases: [Case<'_>; 5] = [
        (
            Gpa(0x1000),
            0,
            SnpPageType::Normal,
            Some(&[]),
            "non-zero multiple",
        ),
        (
            Gpa(0x1000),
            100,
            SnpPageType::Normal,
            Some(&page[..100]),
            "non-zero multiple",
        ),
        (
            Gpa(0x1008),
            4096,
            SnpPageType::Normal,
            Some(&page),
            "4 KiB aligned",
        ),
        (
            Gpa(0x1000),
            4096,
            SnpPageType::Vmsa,
            Some(&page),
            "without supplied VMSAs",
        ),
        (
            Gpa(0x1000),
            4096,
            SnpPageType::Normal,
            None,
            "contents are required",
        ),
    ];
    for (gpa, len, t, data, rule) in cases {
        let err = vm.launch_update_data(gpa, len, t, data).unwrap_err();
        assert!(err.to_string().contains(rule), "{err} vs {rule}");
    }
    // The rule checks come before any platform effect, and do not fail the launch.
    assert_eq!(vm.launch_state(), LaunchState::Started);
    let err = vm
        .launch_update_data(Gpa(0x1000), 4096, SnpPageType::Normal, Some(&page))
        .unwrap_err();
    assert!(matches!(err, Error::NoGuestMemory { gpa: Gpa(0x1000) }));
    // Nothing changed (no vCPU protected, no VMSA freed): the launch can go on.
    assert_eq!(vm.launch_state(), LaunchState::Started);
}

#[test]
fn refused_data_page_is_reclaimed_and_shared_again() {
    let (mut vm, log) = snp_vm(1);
    let pfn = vm.platform().map_gmem(Gfn(0x10));
    vm.platform().fail_next(Call::SnpLaunchUpdate);
    vm.launch_start(SNP_POLICY).unwrap();
    let err = vm
        .launch_update_data(Gpa(0x10_000), 4096, SnpPageType::Cpuid, Some(&[0; 4096]))
        .unwrap_err();
    assert!(matches!(
        err,
        Error::Platform {
            op: PlatformOp::SnpLaunchUpdate,
            vcpu: None,
            ..
        }
    ));
    assert!(!vm.platform().is_assigned(pfn));
    assert!(log.leaks().is_empty());
}

/// `snp_page_reclaim` → `kvm_rmp_make_shared` leaks a refused launch page with
/// `snp_leak_pages` when RMPUPDATE fails: the platform is told, so releasing the guest's
/// memory never frees that frame.
#[test]
fn refused_data_page_that_cannot_be_shared_is_leaked_on_the_platform() {
    let (mut vm, log) = snp_vm(1);
    let pfn = vm.platform().map_gmem(Gfn(0x10));
    vm.platform().fail_next(Call::SnpLaunchUpdate);
    vm.platform().fail_next(Call::RmpMakeShared);
    vm.launch_start(SNP_POLICY).unwrap();
    vm.launch_update_data(Gpa(0x10_000), 4096, SnpPageType::Normal, Some(&[0; 4096]))
        .unwrap_err();
    assert!(matches!(
        &log.leaks()[..],
        [Event::Leaked { vcpu: None, pfn: p, reason: LeakReason::ReclaimMakeSharedFailed, .. }] if *p == pfn
    ));
    assert_eq!(vm.platform().leaked_pages(), [pfn]);
    assert!(vm.is_bugged());
    assert!(vm.platform().violations().is_empty());
}

#[test]
fn sev_es_data_pages_use_launch_update_data() {
    let (mut vm, _) = vm_with(VmConfig::sev_es(0), 1, TestPlatform::default());
    let pfn = vm.platform().map_gmem(Gfn(1));
    vm.launch_start(1 << 2).unwrap();
    vm.launch_update_data(Gpa(0x1000), 4096, SnpPageType::Normal, Some(&[7; 4096]))
        .unwrap();
    assert_eq!(vm.platform().calls(Call::LaunchUpdateData), 1);
    assert_eq!(vm.platform().calls(Call::RmpMakePrivate), 0);
    assert_eq!(vm.platform().measured(), vec![(pfn, 1)]);
    let err = vm
        .launch_update_data(Gpa(0x1000), 4096, SnpPageType::Secrets, Some(&[7; 4096]))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("SEV-ES launches only measure normal pages")
    );
}

// ---- supplied-VMSA launch mode (the series' 4/4) ------------------------------------------------

/// Where the supplied BSP VMSA lives in the tests: 4 KiB but not 2 MiB aligned.
const SUPPLIED_GPA: Gpa = Gpa(0x7_000);

fn supplied_vm(vcpus: u32) -> (Vm<TestPlatform>, Arc<EventLog>) {
    let (vm, log) = vm_with(
        VmConfig::snp(0).with_supplied_vmsa(),
        vcpus,
        TestPlatform::default(),
    );
    vm.platform().map_gmem(SUPPLIED_GPA.gfn());
    (vm, log)
}

/// A VMSA page carrying `sev_features`.
fn vmsa_page(sev_features: u64) -> Box<PageBuf> {
    let mut a = SevEsSaveArea::boxed();
    a.sev_features = sev_features;
    a.rip = 0xfff0;
    Box::new(*a.as_page())
}

fn supply(vm: &mut Vm<TestPlatform>, gpa: Gpa) -> Result<(), Error<crate::testing::TestError>> {
    let page = vmsa_page(layout::SEV_FEAT_SNP_ACTIVE);
    vm.launch_update_data(gpa, PAGE_SIZE, SnpPageType::Vmsa, Some(&page[..]))
}

#[test]
fn supplied_mode_allocates_no_vmsa_and_leaves_every_vcpu_without_a_vmcb_address() {
    let (vm, log) = supplied_vm(3);
    assert_eq!(vm.platform().calls(Call::AllocPage), 0);
    for v in vm.vcpus() {
        assert_eq!(
            (v.state.clone(), v.vmcb_vmsa_pa, v.protected),
            (VmsaState::None, None, false)
        );
        assert!(transitions(&log, v.id).is_empty());
    }
    assert_eq!(vm.vcpu(BSP).unwrap().mp_state, MpState::Runnable);
    assert_eq!(vm.vcpu(VcpuId(1)).unwrap().mp_state, MpState::Uninitialized);
    // Not runnable before anything names a VMSA for it.
    assert!(matches!(
        vm.prepare_entry(BSP),
        Err(Error::InvalidVmsa { vcpu: BSP })
    ));
    assert_eq!(
        vm.prepare_entry(VcpuId(1)).unwrap(),
        Entry::Blocked(MpState::Uninitialized)
    );
}

#[test]
fn supplied_vmsa_makes_the_bsp_guest_owned_and_launch_finish_measures_no_vcpu_vmsa() {
    let (mut vm, log) = supplied_vm(4);
    let frame = vm.platform().gmem_pfn(SUPPLIED_GPA.gfn()).unwrap();
    vm.launch_start(SNP_POLICY).unwrap();
    supply(&mut vm, SUPPLIED_GPA).unwrap();
    let bsp = vm.vcpu(BSP).unwrap();
    assert_eq!(bsp.state, VmsaState::GuestOwned(SUPPLIED_GPA));
    assert_eq!((bsp.vmcb_vmsa_pa, bsp.protected), (Some(frame.hpa()), true));
    assert_eq!(
        transitions(&log, BSP),
        [(Op::Supply, StateKind::None, StateKind::GuestOwned)]
    );
    // Measured once, as a VMSA page in the guest's memory, made private there.
    assert_eq!(vm.platform().measured(), vec![(frame, SnpPageType::Vmsa as u8)]);
    assert!(vm.platform().is_assigned(frame));
    vm.launch_finish([0; 32]).unwrap();
    assert_eq!(
        vm.platform().measured().len(),
        1,
        "no per-vCPU VMSA at launch finish"
    );
    assert_eq!(vm.platform().calls(Call::AllocPage), 0);
    for ap_id in 1..4 {
        let v = vm.vcpu(VcpuId(ap_id)).unwrap();
        assert_eq!((v.state, v.vmcb_vmsa_pa), (VmsaState::None, None));
    }
    assert_eq!(vm.prepare_entry(BSP).unwrap(), Entry::Run(frame.hpa()));
    // The register state lives in the encrypted page now.
    assert!(matches!(
        vm.set_registers(BSP, &SevEsSaveArea::boxed()),
        Err(Error::AlreadyProtected { .. })
    ));
    // Teardown forgets the guest page (guest_memfd owns it) and frees nothing.
    let down = vm.teardown();
    assert_eq!(down.leaked, 0);
    assert!(vm.platform().freed_pages().is_empty());
    assert!(vm.platform().violations().is_empty());
}

#[test]
fn supplied_mode_aps_start_from_none_through_ap_creation() {
    let (mut vm, log) = supplied_vm(2);
    vm.launch_start(SNP_POLICY).unwrap();
    supply(&mut vm, SUPPLIED_GPA).unwrap();
    vm.launch_finish([0; 32]).unwrap();
    let gmem = vm.platform().map_gmem(Gfn(0x31));
    let created = vm.ap_creation(&ap(0, ghcb::AP_CREATE, 1, 0x31_000)).unwrap();
    assert_eq!((created.target, created.kick), (VcpuId(1), true));
    assert_eq!(vm.prepare_entry(VcpuId(1)).unwrap(), Entry::Run(gmem.hpa()));
    assert_eq!(
        vm.vcpu(VcpuId(1)).unwrap().state,
        VmsaState::GuestOwned(Gpa(0x31_000))
    );
    // None → GuestOwned directly: there was no host page to release.
    assert_eq!(
        transitions(&log, VcpuId(1)),
        [(Op::SetGuestVmsa, StateKind::None, StateKind::GuestOwned)]
    );
    assert!(vm.platform().freed_pages().is_empty());
}

fn supplied_refusal(vm: &mut Vm<TestPlatform>, gpa: Gpa, page: &PageBuf, len: u64) -> SuppliedVmsaError {
    let data = &page[..len.min(PAGE_SIZE) as usize];
    let data = if len > PAGE_SIZE {
        let mut two = data.to_vec();
        two.extend_from_slice(page);
        vm.launch_update_data(gpa, len, SnpPageType::Vmsa, Some(&two))
    } else {
        vm.launch_update_data(gpa, len, SnpPageType::Vmsa, Some(data))
    };
    match data {
        Err(Error::SuppliedVmsa(e)) => e,
        other => panic!("expected a SuppliedVmsa refusal, got {other:?}"),
    }
}

#[test]
fn supplied_vmsa_second_page_for_the_bsp_is_refused() {
    let (mut vm, _) = supplied_vm(2);
    vm.platform().map_gmem(Gfn(0x9));
    vm.launch_start(SNP_POLICY).unwrap();
    supply(&mut vm, SUPPLIED_GPA).unwrap();
    let page = vmsa_page(layout::SEV_FEAT_SNP_ACTIVE);
    assert_eq!(
        supplied_refusal(&mut vm, Gpa(0x9_000), &page, PAGE_SIZE),
        SuppliedVmsaError::Duplicate {
            vcpu: BSP,
            existing: SUPPLIED_GPA,
            gpa: Gpa(0x9_000)
        }
    );
    assert_eq!(
        vm.platform().measured().len(),
        1,
        "the refused page is not measured"
    );
    assert_eq!(vm.launch_state(), LaunchState::Started);
    vm.launch_finish([0; 32]).unwrap();
}

#[test]
fn supplied_vmsa_with_sev_features_other_than_the_vms_is_refused() {
    let (mut vm, _) = supplied_vm(1);
    vm.launch_start(SNP_POLICY).unwrap();
    let expected = layout::SEV_FEAT_SNP_ACTIVE;
    for found in [0, expected | layout::SEV_FEAT_DEBUG_SWAP] {
        assert_eq!(
            supplied_refusal(&mut vm, SUPPLIED_GPA, &vmsa_page(found), PAGE_SIZE),
            SuppliedVmsaError::FeatureMismatch {
                gpa: SUPPLIED_GPA,
                found,
                expected
            }
        );
    }
    assert!(vm.platform().measured().is_empty());
    assert_eq!(vm.vcpu(BSP).unwrap().state, VmsaState::None);
}

#[test]
fn supplied_vmsa_at_a_2m_aligned_gpa_is_refused_for_erratum_1467() {
    let (mut vm, _) = supplied_vm(1);
    vm.platform().map_gmem(Gfn(0x200));
    vm.launch_start(SNP_POLICY).unwrap();
    let page = vmsa_page(layout::SEV_FEAT_SNP_ACTIVE);
    assert_eq!(
        supplied_refusal(&mut vm, Gpa(0x20_0000), &page, PAGE_SIZE),
        SuppliedVmsaError::Erratum1467 { gpa: Gpa(0x20_0000) }
    );
    assert!(vm.platform().measured().is_empty());
}

#[test]
fn supplied_vmsa_in_sev_es_is_refused() {
    let (mut vm, _) = vm_with(VmConfig::sev_es(0), 1, TestPlatform::default());
    vm.launch_start(1 << 2).unwrap();
    let page = vmsa_page(0);
    assert_eq!(
        supplied_refusal(&mut vm, SUPPLIED_GPA, &page, PAGE_SIZE),
        SuppliedVmsaError::SevEs { gpa: SUPPLIED_GPA }
    );
    assert_eq!(vm.platform().calls(Call::LaunchUpdateData), 0);
    // And the mode itself is SNP-only, refused at creation as __sev_guest_init would.
    let mut es = Vm::without_events(TestPlatform::default(), VmConfig::sev_es(0).with_supplied_vmsa());
    assert!(matches!(es.create_vcpu(BSP), Err(Error::Config(_))));
}

#[test]
fn supplied_vmsa_after_launch_finish_is_refused() {
    let (mut vm, _) = supplied_vm(1);
    vm.launch_start(SNP_POLICY).unwrap();
    supply(&mut vm, SUPPLIED_GPA).unwrap();
    vm.launch_finish([0; 32]).unwrap();
    let page = vmsa_page(layout::SEV_FEAT_SNP_ACTIVE);
    assert_eq!(
        supplied_refusal(&mut vm, SUPPLIED_GPA, &page, PAGE_SIZE),
        SuppliedVmsaError::AfterLaunchFinish { gpa: SUPPLIED_GPA }
    );
    // Also in the classic mode: after launch finish no VMSA page is taken.
    let (mut classic, _) = launched_snp(1, SNP_POLICY);
    assert_eq!(
        supplied_refusal(&mut classic, SUPPLIED_GPA, &page, PAGE_SIZE),
        SuppliedVmsaError::AfterLaunchFinish { gpa: SUPPLIED_GPA }
    );
}

#[test]
fn supplied_vmsa_in_the_classic_mode_is_refused() {
    let (mut vm, _) = snp_vm(1);
    vm.platform().map_gmem(SUPPLIED_GPA.gfn());
    vm.launch_start(SNP_POLICY).unwrap();
    let page = vmsa_page(layout::SEV_FEAT_SNP_ACTIVE);
    assert_eq!(
        supplied_refusal(&mut vm, SUPPLIED_GPA, &page, PAGE_SIZE),
        SuppliedVmsaError::NotEnabled { gpa: SUPPLIED_GPA }
    );
    assert!(matches!(vm.vcpu(BSP).unwrap().state, VmsaState::KvmShared(_)));
}

#[test]
fn supplied_vmsa_of_more_than_one_page_beyond_maxphyaddr_or_without_a_bsp_is_refused() {
    let page = vmsa_page(layout::SEV_FEAT_SNP_ACTIVE);
    let (mut vm, _) = supplied_vm(1);
    vm.launch_start(SNP_POLICY).unwrap();
    assert_eq!(
        supplied_refusal(&mut vm, SUPPLIED_GPA, &page, 2 * PAGE_SIZE),
        SuppliedVmsaError::NotOnePage {
            gpa: SUPPLIED_GPA,
            len: 2 * PAGE_SIZE
        }
    );
    let far = Gpa((1 << 48) + 0x1000);
    assert_eq!(
        supplied_refusal(&mut vm, far, &page, PAGE_SIZE),
        SuppliedVmsaError::BeyondMaxPhys {
            gpa: far,
            max_phys_bits: 48
        }
    );
    let (mut empty, _) = supplied_vm(0);
    empty.launch_start(SNP_POLICY).unwrap();
    assert_eq!(
        supplied_refusal(&mut empty, SUPPLIED_GPA, &page, PAGE_SIZE),
        SuppliedVmsaError::NoBsp { gpa: SUPPLIED_GPA }
    );
    assert!(vm.platform().measured().is_empty() && empty.platform().measured().is_empty());
}

#[test]
fn supplied_mode_launch_finish_without_the_bsp_vmsa_is_refused() {
    let (mut vm, _) = supplied_vm(2);
    vm.launch_start(SNP_POLICY).unwrap();
    assert!(matches!(
        vm.launch_finish([0; 32]),
        Err(Error::SuppliedVmsa(SuppliedVmsaError::MissingBspVmsa {
            vcpu: BSP
        }))
    ));
    assert_eq!(vm.platform().calls(Call::LaunchFinish), 0);
    // Nothing changed: the VMM can still supply the VMSA and finish.
    supply(&mut vm, SUPPLIED_GPA).unwrap();
    vm.launch_finish([0; 32]).unwrap();
}

#[test]
fn supplied_vmsa_refused_by_the_firmware_is_reclaimed_and_can_be_retried() {
    let (mut vm, _) = supplied_vm(1);
    let frame = vm.platform().gmem_pfn(SUPPLIED_GPA.gfn()).unwrap();
    vm.launch_start(SNP_POLICY).unwrap();
    vm.platform().fail_next(Call::SnpLaunchUpdate);
    assert!(matches!(
        supply(&mut vm, SUPPLIED_GPA),
        Err(Error::Platform {
            op: PlatformOp::SnpLaunchUpdate,
            ..
        })
    ));
    assert_eq!(vm.vcpu(BSP).unwrap().state, VmsaState::None);
    assert!(!vm.platform().is_assigned(frame));
    assert_eq!(vm.launch_state(), LaunchState::Started);
    supply(&mut vm, SUPPLIED_GPA).unwrap();
    vm.launch_finish([0; 32]).unwrap();
}

// ---- free ------------------------------------------------------------------------------------

#[test]
fn free_of_a_launched_snp_vmsa_makes_it_shared_flushes_and_frees() {
    let (vm, log) = launched_snp(1, SNP_POLICY);
    let pfn = host_pfn(&vm, BSP);
    let info = vm.free_vcpu_vmsa(BSP).unwrap();
    assert_eq!((info.state, info.vmcb_vmsa_pa), (VmsaState::None, None));
    assert!(!vm.platform().is_assigned(pfn));
    assert_eq!(vm.platform().freed_pages(), vec![pfn]);
    assert_eq!(vm.platform().flushes(), (1, 0));
    assert_eq!(
        transitions(&log, BSP).last(),
        Some(&(Op::Free, StateKind::KvmPrivate, StateKind::None))
    );
    assert!(vm.platform().violations().is_empty());
}

#[test]
fn make_shared_failure_at_free_leaks_the_page_on_purpose() {
    let (vm, log) = launched_snp(2, SNP_POLICY);
    let pfn = host_pfn(&vm, BSP);
    vm.platform().fail_next(Call::RmpMakeShared);
    let info = vm.free_vcpu_vmsa(BSP).unwrap();
    assert_eq!((info.state, info.vmcb_vmsa_pa), (VmsaState::None, None));
    assert_eq!(vm.platform().leaked_pages(), vec![pfn]);
    assert!(
        vm.platform().freed_pages().is_empty(),
        "a still-private page must never be freed"
    );
    assert!(matches!(
        &log.leaks()[..],
        [Event::Leaked { reason: LeakReason::MakeSharedFailed, pfn: p, .. }] if *p == pfn
    ));
    assert!(vm.is_bugged());
    // Teardown still frees the other vCPU, and counts the page leaked before it (the count
    // agrees with the `Leaked` events).
    let mut vm = vm;
    assert_eq!(vm.teardown(), Teardown { vcpus: 2, leaked: 1 });
    assert_eq!(vm.platform().freed_pages().len(), 1);
    assert!(vm.platform().violations().is_empty());
}

#[test]
fn failed_page_flush_falls_back_to_a_cache_writeback() {
    let (vm, log) = launched_snp(1, SNP_POLICY);
    vm.platform().fail_next(Call::FlushEncryptedPage);
    vm.free_vcpu_vmsa(BSP).unwrap();
    assert_eq!(vm.platform().flushes(), (0, 1));
    assert_eq!(log.warnings().len(), 1);
    assert_eq!(vm.platform().freed_pages().len(), 1);
}

#[test]
fn unlaunched_vmsas_are_freed_without_flush() {
    let (mut vm, _) = snp_vm(2);
    assert_eq!(vm.teardown(), Teardown { vcpus: 2, leaked: 0 });
    assert_eq!(vm.platform().flushes(), (0, 0));
    assert_eq!(vm.platform().calls(Call::RmpMakeShared), 0);
    assert!(vm.platform().live_pages().is_empty());
}

#[test]
fn free_of_none_and_guest_owned_touches_no_page() {
    let (vm, log) = launched_snp(2, SNP_POLICY);
    vm.platform().map_gmem(Gfn(0x31));
    vm.ap_creation(&ap(0, ghcb::AP_CREATE, 1, 0x31_000)).unwrap();
    vm.prepare_entry(VcpuId(1)).unwrap();
    let freed = vm.platform().freed_pages().len();
    let info = vm.free_vcpu_vmsa(VcpuId(1)).unwrap();
    assert_eq!(info.state, VmsaState::None);
    vm.free_vcpu_vmsa(VcpuId(1)).unwrap();
    assert_eq!(vm.platform().freed_pages().len(), freed);
    assert!(log.warnings().is_empty());
}

#[test]
fn dropping_a_vm_frees_its_pages() {
    let p = Arc::new(EventLog::new());
    let live = {
        let mut vm = Vm::new(TestPlatform::default(), VmConfig::snp(0), p.clone());
        vm.create_vcpu(BSP).unwrap();
        vm.launch_start(SNP_POLICY).unwrap();
        vm.launch_finish([0; 32]).unwrap();
        vm
    };
    let pfn = host_pfn(&live, BSP);
    drop(live);
    assert!(p.snapshot().contains(&Event::Transition {
        vcpu: BSP,
        op: Op::Free,
        from: VmsaState::KvmPrivate(pfn),
        to: VmsaState::None
    }));
}

// ---- reclaim transition ------------------------------------------------------------------------

#[test]
fn reclaim_is_only_defined_for_private_snp_vmsas() {
    let (vm, log) = snp_vm(1);
    let cx = Cx {
        p: vm.platform(),
        kind: VmKind::Snp,
        events: &*log,
    };
    let mut v: Vcpu<testing::TestPage> = Vcpu::new(VcpuId(3), MpState::Runnable);
    cx.alloc(&mut v).unwrap();
    assert!(matches!(
        cx.reclaim(&mut v),
        Err(Error::InvalidState {
            op: Op::Reclaim,
            state: StateKind::KvmShared,
            ..
        })
    ));
    cx.make_private(&mut v).unwrap();
    let es = Cx {
        kind: VmKind::SevEs,
        ..cx
    };
    assert!(matches!(
        es.reclaim(&mut v),
        Err(Error::InvalidState { op: Op::Reclaim, .. })
    ));
    assert!(matches!(
        es.make_private(&mut v),
        Err(Error::InvalidState {
            op: Op::MakePrivate,
            state: StateKind::KvmPrivate,
            ..
        })
    ));
    assert_eq!(log.warnings().len(), 3);
    let cx = Cx {
        kind: VmKind::Snp,
        ..es
    };
    assert_eq!(cx.reclaim(&mut v).unwrap(), None);
    assert_eq!(v.state, VmsaState::None);
    assert!(vm.platform().violations().is_empty());
}

// ---- AP creation, INIT, entry ----------------------------------------------------------------

#[test]
fn ap_create_switches_the_target_to_the_guest_vmsa_at_its_next_entry() {
    let (vm, log) = launched_snp(2, SNP_POLICY);
    let gmem = vm.platform().map_gmem(Gfn(0x31));
    let old = host_pfn(&vm, VcpuId(1));
    let created = vm.ap_creation(&ap(0, ghcb::AP_CREATE, 1, 0x31_000)).unwrap();
    assert_eq!((created.target, created.kick), (VcpuId(1), true));
    let pending = vm.vcpu(VcpuId(1)).unwrap();
    assert_eq!(pending.pending_gpa, Some(Gpa(0x31_000)));
    assert!(
        matches!(pending.state, VmsaState::KvmPrivate(_)),
        "applied only by the target"
    );

    assert_eq!(vm.prepare_entry(VcpuId(1)).unwrap(), Entry::Run(gmem.hpa()));
    let v = vm.vcpu(VcpuId(1)).unwrap();
    assert_eq!(v.state, VmsaState::GuestOwned(Gpa(0x31_000)));
    assert_eq!(
        (v.pending_gpa, v.vmcb_vmsa_pa, v.mp_state),
        (None, Some(gmem.hpa()), MpState::Runnable)
    );
    // The host VMSA it replaced was released properly.
    assert!(!vm.platform().is_assigned(old));
    assert!(vm.platform().freed_pages().contains(&old));
    assert_eq!(
        transitions(&log, VcpuId(1))[2..],
        [
            (Op::SetGuestVmsa, StateKind::KvmPrivate, StateKind::None),
            (Op::SetGuestVmsa, StateKind::None, StateKind::GuestOwned)
        ]
    );
}

#[test]
fn only_the_entry_that_applies_an_ap_creation_notes_the_switch() {
    let (vm, _) = launched_snp(2, SNP_POLICY);
    let gmem = vm.platform().map_gmem(Gfn(0x31));
    let first = vm.prepare_entry_noting_switch(VcpuId(1));
    assert!(!first.switched, "nothing pending");
    // Re-creating from the same GPA gives the same address: only the note says to reload.
    for round in 0..2 {
        vm.ap_creation(&ap(0, ghcb::AP_CREATE, 1, 0x31_000)).unwrap();
        let applied = vm.prepare_entry_noting_switch(VcpuId(1));
        assert_eq!(
            (applied.entry.unwrap(), applied.switched),
            (Entry::Run(gmem.hpa()), true),
            "round {round}"
        );
        let again = vm.prepare_entry_noting_switch(VcpuId(1));
        assert_eq!(
            (again.entry.unwrap(), again.switched),
            (Entry::Run(gmem.hpa()), false),
            "round {round}: consumed"
        );
    }
    // A switch that leaves the vCPU halted (no page backs the GPA) is still noted.
    vm.ap_creation(&ap(0, ghcb::AP_CREATE, 1, 0x77_000)).unwrap();
    let halted = vm.prepare_entry_noting_switch(VcpuId(1));
    assert!(matches!(halted.entry, Ok(Entry::Blocked(MpState::Halted))) && halted.switched);
}

#[test]
fn ap_create_on_init_waits_for_init() {
    let (vm, _) = launched_snp(2, SNP_POLICY);
    let gmem2 = vm.platform().map_gmem(Gfn(0x41));
    let c = vm
        .ap_creation(&ap(0, ghcb::AP_CREATE_ON_INIT, 1, 0x41_000))
        .unwrap();
    assert!(!c.kick);
    assert_eq!(
        vm.prepare_entry(VcpuId(1)).unwrap(),
        Entry::Blocked(MpState::Uninitialized)
    );
    assert!(matches!(
        vm.vcpu(VcpuId(1)).unwrap().state,
        VmsaState::KvmPrivate(_)
    ));
    let v = vm.init_vcpu(VcpuId(1)).unwrap();
    assert_eq!(v.state, VmsaState::GuestOwned(Gpa(0x41_000)));
    assert_eq!(vm.prepare_entry(VcpuId(1)).unwrap(), Entry::Run(gmem2.hpa()));
}

#[test]
fn ap_destroy_halts_the_target_and_a_forced_run_is_refused() {
    let (vm, _) = launched_snp(2, SNP_POLICY);
    vm.platform().map_gmem(Gfn(0x33));
    vm.ap_creation(&ap(0, ghcb::AP_CREATE, 1, 0x33_000)).unwrap();
    vm.prepare_entry(VcpuId(1)).unwrap();
    vm.ap_creation(&ApCreationRequest::new(BSP, ghcb::AP_DESTROY, 1, 0, None))
        .unwrap();
    assert_eq!(
        vm.prepare_entry(VcpuId(1)).unwrap(),
        Entry::Blocked(MpState::Halted)
    );
    let v = vm.vcpu(VcpuId(1)).unwrap();
    assert_eq!((v.state, v.vmcb_vmsa_pa), (VmsaState::None, None));
    vm.set_mp_state(VcpuId(1), MpState::Runnable).unwrap();
    assert!(matches!(
        vm.prepare_entry(VcpuId(1)),
        Err(Error::InvalidVmsa { vcpu: VcpuId(1) })
    ));
}

#[test]
fn ap_create_without_backing_memory_leaves_the_ap_halted() {
    // __sev_snp_update_protected_guest_state halts the vCPU first and returns before making it
    // runnable when kvm_gmem_get_pfn finds no page for the requested GPA.
    let (vm, _) = launched_snp(2, SNP_POLICY);
    vm.ap_creation(&ap(0, ghcb::AP_CREATE, 1, 0x77_000)).unwrap();
    assert_eq!(
        vm.prepare_entry(VcpuId(1)).unwrap(),
        Entry::Blocked(MpState::Halted)
    );
    let v = vm.vcpu(VcpuId(1)).unwrap();
    assert_eq!(
        (v.state, v.mp_state, v.vmcb_vmsa_pa),
        (VmsaState::GuestOwned(Gpa(0x77_000)), MpState::Halted, None)
    );
    // A later request for a backed page starts it.
    let gmem = vm.platform().map_gmem(Gfn(0x78));
    vm.ap_creation(&ap(0, ghcb::AP_CREATE, 1, 0x78_000)).unwrap();
    assert_eq!(vm.prepare_entry(VcpuId(1)).unwrap(), Entry::Run(gmem.hpa()));
}

#[test]
fn refused_requests_leave_the_target_unchanged() {
    let (vm, log) = launched_snp(2, SNP_POLICY);
    let before = vm.vcpu(VcpuId(1)).unwrap();
    let bad = [
        ap(0, ghcb::AP_CREATE, 1, 0x20_0000),
        ap(0, ghcb::AP_CREATE, 1, 0x3_0008),
        ap(0, ghcb::AP_CREATE, 5, 0x3_0000),
        ap(0, 9, 1, 0x3_0000),
        ApCreationRequest::new(BSP, ghcb::AP_CREATE, 1, 0x3_0000, Some(0)),
        ApCreationRequest::new(BSP, ghcb::AP_CREATE, 1, 0x3_0000, None),
        ap(0, ghcb::AP_CREATE, 1, 1 << 50),
    ];
    for r in bad {
        let e = vm.ap_creation(&r).unwrap_err();
        assert_eq!(e.sw_exit_info().0, 2);
    }
    vm.prepare_entry(VcpuId(1)).unwrap();
    assert_eq!(vm.vcpu(VcpuId(1)).unwrap(), before);
    assert!(
        !log.snapshot()
            .iter()
            .any(|e| matches!(e, Event::ApRequest { .. }))
    );
}

#[test]
fn sev_es_guests_cannot_create_aps() {
    let (vm, _) = launched_es(2);
    let e = vm
        .ap_creation(&ApCreationRequest::new(BSP, ghcb::AP_CREATE, 1, 0x3000, Some(0)))
        .unwrap_err();
    assert_eq!(e.ghcb_error(), ghcb::GHCB_ERR_MISSING_INPUT);
}

#[test]
fn the_last_request_wins_and_a_vcpu_may_target_itself() {
    let (vm, _) = launched_snp(2, SNP_POLICY);
    vm.platform().map_gmem(Gfn(0x51));
    let second = vm.platform().map_gmem(Gfn(0x52));
    vm.ap_creation(&ap(1, ghcb::AP_CREATE, 1, 0x51_000)).unwrap();
    vm.ap_creation(&ap(0, ghcb::AP_CREATE, 1, 0x52_000)).unwrap();
    assert_eq!(vm.prepare_entry(VcpuId(1)).unwrap(), Entry::Run(second.hpa()));
    // A re-creation replaces the installed guest VMSA.
    vm.ap_creation(&ap(1, ghcb::AP_CREATE, 1, 0x51_000)).unwrap();
    vm.prepare_entry(VcpuId(1)).unwrap();
    assert_eq!(
        vm.vcpu(VcpuId(1)).unwrap().state,
        VmsaState::GuestOwned(Gpa(0x51_000))
    );
}

#[test]
fn init_without_a_request_keeps_the_vmsa() {
    let (vm, _) = launched_snp(1, SNP_POLICY);
    let before = vm.vcpu(BSP).unwrap();
    assert_eq!(vm.init_vcpu(BSP).unwrap(), before);
}

#[test]
fn replaced_guest_memory_is_re_resolved_at_the_next_entry() {
    let (vm, log) = launched_snp(2, SNP_POLICY);
    vm.platform().map_gmem(Gfn(0x61));
    vm.ap_creation(&ap(0, ghcb::AP_CREATE, 1, 0x61_000)).unwrap();
    vm.prepare_entry(VcpuId(1)).unwrap();
    // Hole punch: the VMCB stops pointing at the old frame at once.
    vm.platform().unmap_gmem(Gfn(0x61));
    assert_eq!(vm.gmem_invalidate(Gfn(0x60), Gfn(0x62)), vec![VcpuId(1)]);
    assert_eq!(vm.vcpu(VcpuId(1)).unwrap().vmcb_vmsa_pa, None);
    // New memory at the same GPA before the next entry: the entry finds it.
    let fresh = vm.platform().map_gmem(Gfn(0x61));
    assert_eq!(vm.prepare_entry(VcpuId(1)).unwrap(), Entry::Run(fresh.hpa()));
    assert!(transitions(&log, VcpuId(1)).contains(&(
        Op::Reload,
        StateKind::GuestOwned,
        StateKind::GuestOwned
    )));
    // Ranges that miss the VMSA do nothing.
    assert!(vm.gmem_invalidate(Gfn(0x62), Gfn(0x100)).is_empty());
}

// ---- debug decrypt -----------------------------------------------------------------------------

#[test]
fn decrypt_returns_plaintext_or_asks_the_firmware_per_policy() {
    let (mut vm, _) = snp_vm(1);
    let mut regs = SevEsSaveArea::boxed();
    regs.rip = 0xabc;
    vm.set_registers(BSP, &regs).unwrap();
    // Unlaunched: the host page as is (still zero: registers are synced at launch).
    assert_eq!(vm.decrypt_vmsa(BSP).unwrap().rip, 0);
    assert_eq!(vm.platform().calls(Call::DbgDecrypt), 0);
    vm.launch_start(SNP_POLICY | SNP_POLICY_DEBUG).unwrap();
    vm.launch_finish([0; 32]).unwrap();
    assert_eq!(vm.decrypt_vmsa(BSP).unwrap().rip, 0xabc);
    assert_eq!(vm.platform().calls(Call::DbgDecrypt), 1);

    let (vm, _) = launched_snp(1, SNP_POLICY);
    assert!(matches!(vm.decrypt_vmsa(BSP), Err(Error::DebugPolicy { rule, .. }) if rule.contains("bit 19")));

    let (mut vm, _) = vm_with(VmConfig::sev_es(0), 1, TestPlatform::default());
    vm.launch_start((1 << 2) | SEV_POLICY_NODBG).unwrap();
    vm.launch_update_vmsas().unwrap();
    assert!(matches!(vm.decrypt_vmsa(BSP), Err(Error::DebugPolicy { rule, .. }) if rule.contains("NODBG")));
    vm.free_vcpu_vmsa(BSP).unwrap();
    assert!(matches!(
        vm.decrypt_vmsa(BSP),
        Err(Error::InvalidState { op: Op::Decrypt, .. })
    ));
}

#[test]
fn decrypt_of_a_guest_owned_vmsa_reads_the_guest_page() {
    let (vm, _) = launched_snp(2, SNP_POLICY | SNP_POLICY_DEBUG);
    vm.platform().map_gmem(Gfn(0x71));
    let mut guest = SevEsSaveArea::boxed();
    guest.rip = 0x7777;
    vm.platform().guest_write(Gpa(0x71_000), guest.as_page());
    vm.ap_creation(&ap(0, ghcb::AP_CREATE, 1, 0x71_000)).unwrap();
    vm.prepare_entry(VcpuId(1)).unwrap();
    assert_eq!(vm.decrypt_vmsa(VcpuId(1)).unwrap().rip, 0x7777);
}

// ---- migration -----------------------------------------------------------------------------

fn launched_es(vcpus: u32) -> (Vm<TestPlatform>, Arc<EventLog>) {
    let (mut vm, log) = vm_with(VmConfig::sev_es(0), vcpus, TestPlatform::default());
    vm.launch_start(1 << 2).unwrap();
    vm.launch_update_vmsas().unwrap();
    vm.launch_finish([0; 32]).unwrap();
    (vm, log)
}

fn target(vcpus: u32, log: &Arc<EventLog>) -> Vm<TestPlatform> {
    let mut dst = Vm::migration_target(TestPlatform::new(Asid(9), Pfn(0x9001)), log.clone());
    for i in 0..vcpus {
        assert_eq!(dst.create_vcpu(VcpuId(i)).unwrap().state, VmsaState::None);
    }
    dst
}

#[test]
fn migration_moves_every_vmsa_and_kills_the_source() {
    let (mut src, log) = launched_es(2);
    let before: Vec<_> = src.vcpus();
    let mut dst = target(2, &log);
    dst.migrate_from(&mut src).unwrap();
    for (d, s) in dst.vcpus().iter().zip(&before) {
        assert_eq!(
            (&d.state, d.vmcb_vmsa_pa, d.protected),
            (&s.state, s.vmcb_vmsa_pa, true)
        );
    }
    assert!(
        src.vcpus()
            .iter()
            .all(|v| v.state == VmsaState::None && !v.protected)
    );
    assert!(matches!(src.prepare_entry(BSP), Err(Error::VmDead)));
    // Back again: the destination is an SEV guest now (sev_guest(kvm): -EINVAL).
    assert!(matches!(
        dst.migrate_from(&mut src),
        Err(Error::Migration(MigrationError::DestinationIsConfidential { .. }))
    ));
    assert_eq!(dst.platform().asid(), Asid(1), "the encryption context moved");
    assert!(transitions(&log, BSP).contains(&(Op::MigrateIn, StateKind::None, StateKind::KvmPrivate)));
    assert_eq!(src.teardown(), Teardown { vcpus: 2, leaked: 0 });
    assert_eq!(dst.teardown(), Teardown { vcpus: 2, leaked: 0 });
    assert!(dst.platform().live_pages().is_empty());
    assert!(dst.platform().violations().is_empty());
}

#[test]
fn migration_refusals_move_nothing() {
    let log = Arc::new(EventLog::new());
    let (mut snp, _) = launched_snp(1, SNP_POLICY);
    assert!(matches!(
        target(1, &log).migrate_from(&mut snp),
        Err(Error::Migration(MigrationError::SourceIsSnp))
    ));
    let (mut es, _) = launched_es(2);
    assert!(matches!(
        target(1, &log).migrate_from(&mut es),
        Err(Error::Migration(MigrationError::VcpuCountMismatch {
            source_vcpus: 2,
            destination_vcpus: 1
        }))
    ));
    let (mut unlaunched, _) = vm_with(VmConfig::sev_es(0), 1, TestPlatform::default());
    assert!(matches!(
        target(1, &log).migrate_from(&mut unlaunched),
        Err(Error::Migration(MigrationError::SourceNotLaunched { vcpu: BSP }))
    ));
    let (mut confidential, _) = launched_es(2);
    assert!(matches!(
        confidential.migrate_from(&mut es),
        Err(Error::Migration(MigrationError::DestinationIsConfidential {
            kind: VmKind::SevEs
        }))
    ));
    assert!(es.vcpus().iter().all(|v| v.protected), "nothing moved");
}

/// space is refused before any page is touched, instead of wrapping to GPA 0.
#[test]
fn launch_update_range_past_the_top_of_the_address_space_is_refused() {
    let (mut vm, _) = snp_vm(1);
    let top = Gpa(!(PAGE_SIZE - 1));
    vm.platform().map_gmem(top.gfn());
    vm.platform().map_gmem(Gfn(0));
    vm.launch_start(SNP_POLICY).unwrap();
    let data = vec![0u8; 0x2000];
    let err = vm
        .launch_update_data(top, 0x2000, SnpPageType::Normal, Some(&data))
        .unwrap_err();
    assert!(err.to_string().contains("address space"), "{err}");
    assert!(vm.platform().measured().is_empty(), "no page measured");
    // The last page itself is a valid range.
    vm.launch_update_data(top, 0x1000, SnpPageType::Normal, Some(&data[..0x1000]))
        .unwrap();
}

/// `sev_vm_move_enc_context_from`: -EINVAL when the source is not an SEV guest.
#[test]
fn migration_from_a_source_moved_away_before_is_einval_not_eio() {
    // sev_vm_move_enc_context_from runs on the destination: a source that was moved away
    // (sev_migrate_from left it inactive, kvm_vm_dead) is "not an SEV guest", -EINVAL.
    let (mut src, log) = launched_es(2);
    let (mut first, mut second) = (target(2, &log), target(2, &log));
    first.migrate_from(&mut src).unwrap();
    assert!(matches!(
        second.migrate_from(&mut src),
        Err(Error::Migration(MigrationError::SourceNotConfidential))
    ));
}

#[test]
fn migration_refuses_a_source_that_is_not_confidential() {
    let log = Arc::new(EventLog::new());
    let mut src = target(0, &log);
    let mut dst = target(0, &log);
    let err = dst.migrate_from(&mut src).unwrap_err();
    assert!(err.to_string().contains("not a confidential"), "{err}");
    // Nothing moved: the destination can still receive a real context.
    let (mut es, _) = launched_es(1);
    let mut dst = target(1, &log);
    dst.migrate_from(&mut es).unwrap();
}

/// `sev_handle_vmgexit`); a bugged or dead VM runs nothing.
#[test]
fn ap_creation_needs_a_launched_usable_vm() {
    let (mut vm, _) = snp_vm(2);
    vm.platform().map_gmem(Gfn(0x61));
    assert!(vm.ap_creation(&ap(0, ghcb::AP_CREATE, 1, 0x61_000)).is_err());
    let v1 = vm.vcpu(VcpuId(1)).unwrap();
    assert_eq!(v1.pending_gpa, None, "the target is unchanged");
    vm.launch_start(SNP_POLICY).unwrap();
    assert!(vm.ap_creation(&ap(0, ghcb::AP_CREATE, 1, 0x61_000)).is_err());
    vm.launch_finish([0; 32]).unwrap();
    assert_eq!(vm.vcpu(VcpuId(1)).unwrap().pending_gpa, None);
    vm.ap_creation(&ap(0, ghcb::AP_CREATE, 1, 0x61_000)).unwrap();

    let (vm, _) = launched_snp(2, SNP_POLICY);
    vm.platform().fail_next(Call::RmpMakeShared);
    vm.free_vcpu_vmsa(BSP).unwrap();
    assert!(vm.is_bugged());
    assert!(vm.ap_creation(&ap(0, ghcb::AP_CREATE, 1, 0x61_000)).is_err());
    assert_eq!(vm.vcpu(VcpuId(1)).unwrap().pending_gpa, None);
}

/// changed nothing leaves the launch where it was, and a retry succeeds.
#[test]
fn a_launch_error_without_side_effects_leaves_the_launch_retryable() {
    let (mut vm, _) = snp_vm(2);
    vm.platform().fail_next(Call::LaunchStart);
    vm.launch_start(SNP_POLICY).unwrap_err();
    assert_eq!(vm.launch_state(), LaunchState::NotStarted);
    vm.launch_start(SNP_POLICY).unwrap();
    // A debug refusal (sev_es_sync_vmsa) of the first vCPU.
    vm.set_guest_debug(BSP, true).unwrap();
    assert!(matches!(vm.launch_finish([0; 32]), Err(Error::GuestDebug { .. })));
    assert_eq!(vm.launch_state(), LaunchState::Started);
    vm.set_guest_debug(BSP, false).unwrap();
    // An RMPUPDATE failure that left the first VMSA shared.
    vm.platform().fail_next(Call::RmpMakePrivate);
    vm.launch_finish([0; 32]).unwrap_err();
    assert_eq!(vm.launch_state(), LaunchState::Started);
    // A data page without guest memory.
    vm.launch_update_data(Gpa(0x1000), 4096, SnpPageType::Normal, Some(&[0; 4096]))
        .unwrap_err();
    assert_eq!(vm.launch_state(), LaunchState::Started);
    vm.launch_finish([0; 32]).unwrap();
    assert!(vm.vcpus().iter().all(|v| v.protected));
    // Once a vCPU is protected, a failure is for good.
    let (mut vm, _) = snp_vm(2);
    vm.launch_start(SNP_POLICY).unwrap();
    vm.set_guest_debug(VcpuId(1), true).unwrap();
    vm.launch_finish([0; 32]).unwrap_err();
    assert_eq!(vm.launch_state(), LaunchState::Failed);
}

/// succeeds, so a later invalidation does not revive a VMSA whose re-resolve failed.
#[test]
fn a_failed_reload_drops_the_guest_vmsa_gpa() {
    let (vm, log) = launched_snp(2, SNP_POLICY);
    vm.platform().map_gmem(Gfn(0x61));
    vm.ap_creation(&ap(0, ghcb::AP_CREATE, 1, 0x61_000)).unwrap();
    vm.prepare_entry(VcpuId(1)).unwrap();
    vm.platform().unmap_gmem(Gfn(0x61));
    vm.gmem_invalidate(Gfn(0x61), Gfn(0x62));
    assert!(matches!(
        vm.prepare_entry(VcpuId(1)),
        Err(Error::InvalidVmsa { .. })
    ));
    assert_eq!(vm.vcpu(VcpuId(1)).unwrap().state, VmsaState::None);
    assert!(transitions(&log, VcpuId(1)).contains(&(Op::Reload, StateKind::GuestOwned, StateKind::None)));
    vm.platform().map_gmem(Gfn(0x61));
    assert!(vm.gmem_invalidate(Gfn(0x61), Gfn(0x62)).is_empty());
    assert!(matches!(
        vm.prepare_entry(VcpuId(1)),
        Err(Error::InvalidVmsa { .. })
    ));
}

/// bits 26 and up; the supported bits are also limited to what the firmware reports).
#[test]
fn snp_policy_bits_outside_the_supported_mask_are_refused() {
    for bad in [1u64 << 18, 1 << 26, 1 << 63] {
        let (mut vm, _) = snp_vm(1);
        let err = vm.launch_start(SNP_POLICY | bad).unwrap_err();
        assert!(matches!(err, Error::BadPolicy { .. }), "{bad:#x}: {err}");
        assert_eq!(vm.platform().calls(Call::LaunchStart), 0);
        assert_eq!(vm.launch_state(), LaunchState::NotStarted);
    }
    let (mut vm, _) = snp_vm(1);
    vm.launch_start(SNP_POLICY | SNP_POLICY_DEBUG | (1 << 16) | (1 << 25) | 0xffff)
        .unwrap();
}

/// come only from `KVM_SEV_INIT2`, which syncs the FPU.
#[test]
fn vm_config_is_validated_as_sev_guest_init_does() {
    use layout::{SEV_FEAT_DEBUG_SWAP, SEV_FEAT_SECURE_TSC, SEV_FEAT_SNP_ACTIVE};
    let bad = [
        VmConfig::sev_es(SEV_FEAT_SNP_ACTIVE | SEV_FEAT_SECURE_TSC),
        VmConfig::sev_es(SEV_FEAT_SECURE_TSC),
        VmConfig::sev_es(1 << 40),
        VmConfig::snp(layout::SEV_FEAT_RESTRICTED_INJECTION),
        VmConfig {
            sync_fpu: false,
            ..VmConfig::sev_es(SEV_FEAT_DEBUG_SWAP)
        },
        VmConfig {
            sync_fpu: false,
            ..VmConfig::snp(0)
        },
    ];
    for config in bad {
        let mut vm = Vm::without_events(TestPlatform::default(), config);
        assert!(vm.create_vcpu(BSP).is_err(), "{config:?}");
        assert!(vm.launch_start(SNP_POLICY | (1 << 2)).is_err(), "{config:?}");
        assert_eq!(vm.platform().calls(Call::AllocPage), 0);
        assert_eq!(vm.platform().calls(Call::LaunchStart), 0);
    }
    let good = [
        VmConfig::sev_es(SEV_FEAT_DEBUG_SWAP),
        VmConfig::snp(SEV_FEAT_DEBUG_SWAP | SEV_FEAT_SECURE_TSC),
        VmConfig {
            sync_fpu: false,
            ..VmConfig::sev_es(0)
        },
    ];
    for config in good {
        let mut vm = Vm::without_events(TestPlatform::default(), config);
        vm.create_vcpu(BSP).unwrap();
    }
}

/// `__sev_launch_update_vmsa`: LAUNCH_UPDATE_VMSA encrypts the page in place, so KVM flushes
/// it (`clflush_cache_range`) after syncing the registers into it. SNP's
/// `snp_launch_update_vmsa` does not.
#[test]
fn sev_es_launch_flushes_the_vmsa_before_the_firmware_encrypts_it() {
    let (mut vm, _) = vm_with(VmConfig::sev_es(0), 2, TestPlatform::default());
    vm.launch_start(1 << 2).unwrap();
    vm.launch_update_vmsas().unwrap();
    assert_eq!(vm.platform().calls(Call::ClflushPage), 2);
    assert!(
        vm.platform().violations().is_empty(),
        "{:?}",
        vm.platform().violations()
    );
    let (vm, _) = launched_snp(2, SNP_POLICY);
    assert_eq!(vm.platform().calls(Call::ClflushPage), 0);
}

/// `sev_decrypt_vmsa`: SNP reclaims the firmware destination page whatever the outcome; if
/// `snp_page_reclaim` fails the page is leaked and the VM bugged (`KVM_BUG`).
#[test]
fn snp_debug_decrypt_leaks_an_unreclaimable_destination_page_and_bugs_the_vm() {
    let (vm, log) = launched_snp(1, SNP_POLICY | SNP_POLICY_DEBUG);
    vm.platform().fail_next(Call::DbgDecryptReclaim);
    let err = vm.decrypt_vmsa(BSP).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Platform {
                op: PlatformOp::DbgDecrypt,
                ..
            }
        ),
        "{err}"
    );
    let leaked = vm.platform().leaked_pages();
    assert_eq!(leaked.len(), 1);
    assert!(matches!(
        &log.leaks()[..],
        [Event::Leaked { vcpu: Some(BSP), pfn, reason: LeakReason::ReclaimFailed, .. }] if *pfn == leaked[0]
    ));
    assert!(vm.is_bugged());
    assert!(matches!(vm.prepare_entry(BSP), Err(Error::VmBugged { .. })));
}

/// INVALID_PAGE: both are reported as VMCB-address events.
#[test]
fn migration_reports_the_moved_vmcb_vmsa_addresses() {
    let (mut src, log) = launched_es(1);
    let pa = src.vcpu(BSP).unwrap().vmcb_vmsa_pa;
    assert!(pa.is_some());
    let mut dst = target(1, &log);
    let before = log.snapshot().len();
    dst.migrate_from(&mut src).unwrap();
    let after = log.snapshot().split_off(before);
    let vmcb: Vec<_> = after
        .iter()
        .filter(|e| matches!(e, Event::VmcbVmsaPa { .. }))
        .cloned()
        .collect();
    assert_eq!(
        vmcb,
        vec![
            Event::VmcbVmsaPa { vcpu: BSP, pa: None },
            Event::VmcbVmsaPa { vcpu: BSP, pa },
        ]
    );
    // The policy moves with the context (KVM leaves the destination's `sev->policy` at 0; see
    // `Vm::migrate_from`).
    assert_eq!(dst.policy(), 1 << 2);
}

/// `sev_launch_update_data`: SEV-ES guests have no guest_memfd; KVM pins the VMM's memory of
/// any alignment and length (`sev_pin_memory` refuses only a zero or wrapping length) and the
/// firmware encrypts it in place, so a 176-byte table at an unaligned address is measured.
#[test]
fn sev_es_launch_update_data_takes_any_alignment_and_length() {
    let (mut vm, _) = vm_with(VmConfig::sev_es(0), 1, TestPlatform::default());
    let p1 = vm.platform().map_gmem(Gfn(1));
    let p2 = vm.platform().map_gmem(Gfn(2));
    vm.launch_start(1 << 2).unwrap();
    let table: Vec<u8> = (0..176u8).collect();
    vm.launch_update_data(Gpa(0x1c10), 176, SnpPageType::Normal, Some(&table))
        .unwrap();
    assert_eq!(&vm.platform().frame(p1)[0xc10..0xc10 + 176], &table[..]);
    // A range crossing a page boundary, at no alignment.
    vm.launch_update_data(Gpa(0x1ff8), 0x10, SnpPageType::Normal, Some(&[9; 0x10]))
        .unwrap();
    assert_eq!(vm.platform().frame(p2)[..8], [9; 8]);
    assert_eq!(vm.platform().measured(), vec![(p1, 1), (p1, 1), (p2, 1)]);
    assert_eq!(vm.platform().calls(Call::LaunchUpdateData), 2);
    // Only an empty or wrapping range is refused, before the firmware is asked.
    for (gpa, len) in [(Gpa(0x1000), 0), (Gpa(u64::MAX - 7), 16)] {
        let err = vm
            .launch_update_data(gpa, len, SnpPageType::Normal, Some(&vec![0; len as usize]))
            .unwrap_err();
        assert!(matches!(err, Error::BadLaunchUpdate { .. }), "{err}");
    }
    assert_eq!(vm.platform().calls(Call::LaunchUpdateData), 2);
    assert_eq!(vm.launch_state(), LaunchState::Started);
}

/// `__sev_launch_update_vmsa`: when the firmware refuses LAUNCH_UPDATE_VMSA, KVM returns the
/// error with the VMSA still allocated and the vCPU unprotected, so the same command works
/// again while no vCPU is protected.
#[test]
fn sev_es_launch_update_vmsa_refusal_keeps_the_vmsa_and_the_launch_retryable() {
    let (mut vm, _) = vm_with(VmConfig::sev_es(0), 2, TestPlatform::default());
    vm.platform().fail_nth(Call::LaunchUpdateVmsa, 1);
    vm.launch_start(1 << 2).unwrap();
    let page = host_pfn(&vm, BSP);
    vm.launch_update_vmsas().unwrap_err();
    let v0 = vm.vcpu(BSP).unwrap();
    assert_eq!(
        (v0.state, v0.protected, v0.vmcb_vmsa_pa),
        (VmsaState::KvmShared(page), false, Some(page.hpa()))
    );
    assert!(vm.platform().freed_pages().is_empty());
    assert_eq!(vm.launch_state(), LaunchState::Started);
    vm.launch_update_vmsas().unwrap();
    assert!(vm.vcpus().iter().all(|v| v.protected));
    assert_eq!(host_pfn(&vm, BSP), page);
}

// ---- concurrency ---------------------------------------------------------------------------

#[test]
fn vcpu_threads_create_each_other_concurrently() {
    // Every vCPU thread keeps asking for its neighbour to be (re)created from one of two guest
    // VMSAs, destroys it now and then, and enters itself, all at once. The per-vCPU locks must
    // keep every vCPU's record consistent: no deadlock, no page lost, no rule broken.
    const N: u32 = 4;
    const ROUNDS: u64 = 300;
    let (vm, log) = launched_snp(N, SNP_POLICY);
    for g in 0..2 * u64::from(N) {
        vm.platform().map_gmem(Gfn(0x90 + g));
    }
    std::thread::scope(|s| {
        for me in 0..N {
            let vm = &vm;
            s.spawn(move || {
                let target = (me + 1) % N;
                for round in 0..ROUNDS {
                    let gfn = 0x90 + u64::from(target) * 2 + round % 2;
                    let req = if round % 7 == 6 {
                        ApCreationRequest::new(VcpuId(me), ghcb::AP_DESTROY, target, 0, None)
                    } else {
                        ap(me, ghcb::AP_CREATE, target, gfn << 12)
                    };
                    vm.ap_creation(&req).expect("valid request");
                    match vm.prepare_entry(VcpuId(me)) {
                        Ok(_) | Err(Error::InvalidVmsa { .. }) => {}
                        Err(e) => panic!("vCPU {me}: {e}"),
                    }
                }
            });
        }
    });
    for v in vm.vcpus() {
        vm.prepare_entry(v.id).ok();
        let v = vm.vcpu(v.id).unwrap();
        match v.state {
            VmsaState::GuestOwned(gpa) => {
                assert_eq!(v.vmcb_vmsa_pa, vm.platform().gmem_pfn(gpa.gfn()).map(Pfn::hpa));
            }
            VmsaState::None => assert_eq!(v.vmcb_vmsa_pa, None),
            other => panic!("vCPU {} still holds a host VMSA: {other:?}", v.id),
        }
    }
    let accepted = log
        .snapshot()
        .iter()
        .filter(|e| matches!(e, Event::ApRequest { .. }))
        .count();
    assert_eq!(accepted as u64, u64::from(N) * ROUNDS);
    let mut vm = vm;
    assert_eq!(vm.teardown().leaked, 0);
    assert!(vm.platform().live_pages().is_empty());
    assert!(vm.platform().violations().is_empty());
    assert!(log.warnings().is_empty());
}

// ---- property tests ----------------------------------------------------------------------------

mod props {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const VCPUS: u32 = 3;
    const GFNS: [u64; 3] = [0x81, 0x82, 0x83];

    #[derive(Clone, Debug)]
    enum Step {
        LaunchStart,
        LaunchFinish,
        Ap {
            requester: u32,
            request: u32,
            target: u32,
            gfn: usize,
        },
        Init(u32),
        Entry(u32),
        HolePunch(usize),
        Map(usize),
        Free(u32),
        Decrypt(u32),
        Fail(Call),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            Just(Step::LaunchStart),
            Just(Step::LaunchFinish),
            (0..VCPUS, 0u32..4, 0..VCPUS + 1, 0..GFNS.len()).prop_map(|(requester, request, target, gfn)| {
                Step::Ap {
                    requester,
                    request,
                    target,
                    gfn,
                }
            }),
            (0..VCPUS).prop_map(Step::Init),
            (0..VCPUS).prop_map(Step::Entry),
            (0..GFNS.len()).prop_map(Step::HolePunch),
            (0..GFNS.len()).prop_map(Step::Map),
            (0..VCPUS).prop_map(Step::Free),
            (0..VCPUS).prop_map(Step::Decrypt),
            prop_oneof![
                Just(Call::RmpMakePrivate),
                Just(Call::RmpMakeShared),
                Just(Call::SnpLaunchUpdate),
                Just(Call::PageReclaim),
                Just(Call::FlushEncryptedPage),
                Just(Call::LaunchFinish),
                Just(Call::AllocPage),
            ]
            .prop_map(Step::Fail),
        ]
    }

    fn run(steps: &[Step], first_pfn: u64) -> Result<(), TestCaseError> {
        let log = Arc::new(EventLog::new());
        let p = TestPlatform::new(Asid(3), Pfn(first_pfn));
        let mut vm = Vm::new(p, VmConfig::snp(0), log.clone());
        for i in 0..VCPUS {
            // An injected allocation failure may refuse a vCPU; the rest must still hold.
            let _ = vm.create_vcpu(VcpuId(i));
        }
        for s in steps {
            match *s {
                Step::LaunchStart => drop(vm.launch_start(SNP_POLICY | SNP_POLICY_DEBUG)),
                Step::LaunchFinish => drop(vm.launch_finish([0; 32])),
                Step::Ap {
                    requester,
                    request,
                    target,
                    gfn,
                } => {
                    let gpa = GFNS[gfn] << 12;
                    drop(vm.ap_creation(&ap(requester, request, target, gpa)));
                }
                Step::Init(v) => drop(vm.init_vcpu(VcpuId(v))),
                Step::Entry(v) => drop(vm.prepare_entry(VcpuId(v))),
                Step::HolePunch(g) => {
                    vm.platform().unmap_gmem(Gfn(GFNS[g]));
                    vm.gmem_invalidate(Gfn(GFNS[g]), Gfn(GFNS[g] + 1));
                }
                Step::Map(g) => {
                    vm.platform().map_gmem(Gfn(GFNS[g]));
                    vm.gmem_invalidate(Gfn(GFNS[g]), Gfn(GFNS[g] + 1));
                }
                Step::Free(v) => drop(vm.free_vcpu_vmsa(VcpuId(v))),
                Step::Decrypt(v) => drop(vm.decrypt_vmsa(VcpuId(v))),
                Step::Fail(c) => vm.platform().fail_next(c),
            }
            check(&vm)?;
        }
        vm.teardown();
        let p = vm.platform();
        prop_assert!(p.violations().is_empty(), "{:?}", p.violations());
        prop_assert!(
            p.live_pages().is_empty(),
            "pages neither freed nor leaked: {:?}",
            p.live_pages()
        );
        let reported: BTreeSet<Pfn> = log
            .leaks()
            .iter()
            .map(|e| match e {
                Event::Leaked { pfn, .. } => *pfn,
                _ => unreachable!(),
            })
            .collect();
        let leaked: BTreeSet<Pfn> = p.leaked_pages().into_iter().collect();
        prop_assert_eq!(&leaked, &reported, "every leak is reported, and only leaks are");
        prop_assert!(
            leaked.iter().all(|l| !p.freed_pages().contains(l)),
            "a leaked page was also freed"
        );
        Ok(())
    }

    fn check(vm: &Vm<TestPlatform>) -> Result<(), TestCaseError> {
        let p = vm.platform();
        prop_assert!(p.violations().is_empty(), "{:?}", p.violations());
        let mut held = BTreeSet::new();
        for v in vm.vcpus() {
            match v.state {
                VmsaState::None => prop_assert_eq!(v.vmcb_vmsa_pa, None),
                VmsaState::KvmShared(pfn) => {
                    prop_assert!(!p.is_assigned(pfn), "a shared VMSA is assigned in the RMP");
                    prop_assert_eq!(v.vmcb_vmsa_pa, Some(pfn.hpa()));
                    prop_assert!(held.insert(pfn));
                }
                VmsaState::KvmPrivate(pfn) => {
                    prop_assert!(p.is_assigned(pfn), "a private VMSA is not assigned in the RMP");
                    prop_assert_eq!(v.vmcb_vmsa_pa, Some(pfn.hpa()));
                    prop_assert!(held.insert(pfn));
                }
                VmsaState::GuestOwned(gpa) => {
                    if let Some(pa) = v.vmcb_vmsa_pa {
                        prop_assert_eq!(Some(pa), p.gmem_pfn(gpa.gfn()).map(Pfn::hpa));
                    }
                }
            }
            prop_assert_eq!(
                vm.resolve_vmsa_pa(v.id).unwrap().is_some(),
                match v.state {
                    VmsaState::None => false,
                    VmsaState::GuestOwned(g) => p.gmem_pfn(g.gfn()).is_some(),
                    _ => true,
                }
            );
        }
        let live: BTreeSet<Pfn> = p.live_pages().into_iter().collect();
        prop_assert_eq!(live, held, "every live page is held by exactly one vCPU");
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn random_lifecycles_keep_every_page_accounted_for(
            steps in prop::collection::vec(step(), 1..60),
            first_pfn in prop_oneof![Just(0x1001u64), Just(0x1200), Just(0x11ff)],
        ) {
            run(&steps, first_pfn)?;
        }
    }
}
