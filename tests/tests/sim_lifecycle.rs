//! Every vmsa-core VMSA transition on the simulated SEV-SNP machine, and every failure path
//! of vmsa-core driven by the simulator's fault plan, with the leak events checked against
//! the frames the machine really lost.

use std::sync::Arc;

use backend_sim::guest::{GuestAction, GuestScript};
use backend_sim::host::run_script;
use backend_sim::{FaultPlan, Machine, MachineConfig, PageState, RmpRet, SimError, SimPlatform};
use vmsa_core::{
    Entry, Error, Event, EventLog, Gpa, INITIAL_VMSA_GPA, LaunchState, LeakReason, MpState, Op, Pfn,
    PlatformOp, SNP_POLICY_DEBUG, SNP_POLICY_RSVD_MBO, SevStatus, SnpPageType, StateKind, VcpuId, Vm,
    VmConfig, VmKind, VmsaState,
};

const POLICY: u64 = SNP_POLICY_RSVD_MBO;

struct G {
    m: Arc<Machine>,
    p: SimPlatform,
    vm: Vm<SimPlatform>,
    log: Arc<EventLog>,
}

fn machine(faults: &str) -> Arc<Machine> {
    Machine::new(MachineConfig {
        faults: faults.parse::<FaultPlan>().expect("valid fault plan"),
        ..MachineConfig::default()
    })
}

fn guest(faults: &str, kind: VmKind, vcpus: u32) -> G {
    let m = machine(faults);
    let p = m.create_guest(kind).unwrap();
    p.add_private_memslot(Gpa(0), 64 << 20).unwrap();
    let log = Arc::new(EventLog::new());
    let cfg = match kind {
        VmKind::Snp => VmConfig::snp(0),
        VmKind::SevEs => VmConfig::sev_es(0),
    };
    let mut vm = Vm::new(p.clone(), cfg, log.clone());
    for i in 0..vcpus {
        vm.create_vcpu(VcpuId(i)).unwrap();
    }
    G { m, p, vm, log }
}

/// An SNP guest of `vcpus` vCPUs launched with the default policy.
#[track_caller]
fn launched(faults: &str, vcpus: u32) -> G {
    let mut g = guest(faults, VmKind::Snp, vcpus);
    g.vm.launch_start(POLICY).unwrap();
    g.vm.launch_finish([0; 32]).unwrap();
    g
}

fn host_pfn(vm: &Vm<SimPlatform>, id: u32) -> Pfn {
    match vm.vcpu(VcpuId(id)).unwrap().state {
        VmsaState::KvmShared(p) | VmsaState::KvmPrivate(p) => p,
        s => panic!("vCPU {id} has no host page: {s}"),
    }
}

fn leaks(log: &EventLog) -> Vec<(Option<VcpuId>, Pfn, LeakReason)> {
    log.leaks()
        .into_iter()
        .map(|e| match e {
            Event::Leaked {
                vcpu, pfn, reason, ..
            } => (vcpu, pfn, reason),
            _ => unreachable!(),
        })
        .collect()
}

fn ops(log: &EventLog) -> Vec<Op> {
    log.snapshot()
        .into_iter()
        .filter_map(|e| match e {
            Event::Transition { op, .. } => Some(op),
            _ => None,
        })
        .collect()
}

fn fw_status<T: std::fmt::Debug>(r: Result<T, Error<SimError>>) -> (PlatformOp, SevStatus) {
    match r {
        Err(Error::Platform { op, source, .. }) => (op, source.firmware_status().expect("firmware error")),
        other => panic!("expected a firmware failure, got {other:?}"),
    }
}

/// The BSP turns the page at `gpa` into a VMSA that starts at `rip` and asks for AP 1 to run
/// it: at once, or (`on_init`) at its next INIT.
fn create_ap_1(gpa: u64, rip: u64, on_init: bool) -> Vec<GuestAction> {
    let mut a = GuestAction::vmsa_setup(0, gpa, rip, 0).to_vec();
    a.push(GuestAction::ap_create(0, 1, gpa, on_init));
    a
}

/// Tear down and destroy; every frame is either back in the allocator or leaked, and the
/// machine's leaked frames are exactly `expected_leaked`.
fn finish(mut g: G, expected_leaked: &[Pfn]) {
    g.vm.teardown();
    drop(g.vm);
    g.p.destroy().unwrap();
    let mut leaked = g.m.leaked_frames();
    leaked.sort();
    let mut want = expected_leaked.to_vec();
    want.sort();
    assert_eq!(leaked, want, "frames the machine lost");
    assert_eq!(g.m.allocated_frames(), 0, "every other frame went back");
    let s = g.m.stats();
    assert_eq!(
        (s.bad_frees, s.freed_while_assigned, s.freed_unflushed),
        (0, 0, 0),
        "{s:?}"
    );
    let _ = g.log;
}

#[test]
fn snp_happy_path_runs_every_transition() {
    let mut g = guest("", VmKind::Snp, 2);
    // The first frame of DRAM is 2 MiB aligned: vmsa-core refused it (erratum 1467).
    assert!(
        g.log
            .snapshot()
            .iter()
            .any(|e| matches!(e, Event::Erratum1467Avoided { refused, .. } if refused.is_2m_aligned()))
    );
    let bsp = host_pfn(&g.vm, 0);
    assert!(!bsp.is_2m_aligned());
    assert_eq!(g.m.page_state(bsp), PageState::Hypervisor);
    g.vm.launch_start(POLICY | SNP_POLICY_DEBUG).unwrap();
    g.vm.launch_update_data(Gpa(0x10_0000), 0x2000, SnpPageType::Normal, Some(&[0x90; 0x2000]))
        .unwrap();
    g.vm.launch_finish([7; 32]).unwrap();
    let e = g.m.rmp_entry(bsp);
    assert!(e.assigned && e.vmsa && e.validated && !e.immutable);
    assert_eq!(
        (e.asid, e.gpa),
        (vmsa_core::Platform::asid(&g.p).0, INITIAL_VMSA_GPA.0)
    );
    assert_eq!(g.m.page_state(bsp), PageState::GuestValid);
    // Host view: ciphertext, and writes fault.
    let raw = g.m.host_read(bsp).unwrap();
    let regs = g.vm.decrypt_vmsa(VcpuId(0)).unwrap();
    assert_eq!(regs.sev_features, 1, "SNP_ACTIVE synced in");
    assert_ne!(&raw[..], regs.as_page(), "the host reads ciphertext");
    let err = g.m.host_write(bsp, &[0; 4096]).unwrap_err();
    assert!(err.is_rmp_fault(), "{err}");
    assert_eq!(g.m.stats().rmp_faults, 1);
    // AP 1 gets a guest-owned VMSA; then its memory is replaced, and the VMSA reloaded.
    let gpa = 0x20_1000;
    let mut actions = create_ap_1(gpa, 0x1000, false);
    actions.push(GuestAction::Hlt { vcpu: 1 });
    let script = GuestScript {
        name: "ap".into(),
        actions,
    };
    let r = run_script(&g.vm, &script);
    assert_eq!(r.failures().count(), 0, "{:?}", r.failures().collect::<Vec<_>>());
    assert_eq!(
        g.vm.vcpu(VcpuId(1)).unwrap().state,
        VmsaState::GuestOwned(Gpa(gpa))
    );
    let decrypted = g.vm.decrypt_vmsa(VcpuId(1)).unwrap();
    assert_eq!(decrypted.rip, 0x1000, "SNP_DBG_DECRYPT of the guest-owned VMSA");
    let (s, e) = g.p.punch_hole(Gpa(gpa), 4096).unwrap();
    assert_eq!(g.vm.gmem_invalidate(s, e), vec![VcpuId(1)]);
    assert_eq!(g.vm.vcpu(VcpuId(1)).unwrap().vmcb_vmsa_pa, None);
    g.vm.set_mp_state(VcpuId(1), MpState::Runnable).unwrap();
    let r = run_script(
        &g.vm,
        &GuestScript {
            name: "rerun".into(),
            actions: vec![GuestAction::Run { vcpu: 1 }],
        },
    );
    let err = r.steps[0].error.clone().unwrap();
    assert!(
        err.contains("VMEXIT_INVALID"),
        "the hole-punched VMSA is gone: {err}"
    );
    g.vm.free_vcpu_vmsa(VcpuId(0)).unwrap();
    assert_eq!(g.m.page_state(bsp), PageState::Hypervisor);
    let seen = ops(&g.log);
    for op in [Op::Alloc, Op::MakePrivate, Op::SetGuestVmsa, Op::Reload, Op::Free] {
        assert!(seen.contains(&op), "{op} not seen in {seen:?}");
    }
    assert!(leaks(&g.log).is_empty());
    finish(g, &[]);
}

#[test]
fn sev_es_launch_debug_and_migration() {
    let mut g = guest("", VmKind::SevEs, 2);
    g.vm.launch_start(0).unwrap();
    g.vm.launch_update_data(Gpa(0x1000), 4096, SnpPageType::Normal, Some(&[3; 4096]))
        .unwrap();
    g.vm.launch_update_vmsas().unwrap();
    g.vm.launch_finish([0; 32]).unwrap();
    assert_eq!(g.p.launch_digest().unwrap().bytes().len(), 32);
    let regs = g.vm.decrypt_vmsa(VcpuId(1)).unwrap();
    assert_eq!(regs.dr7, 0, "DBG_DECRYPT gives back the synced VMSA");
    let pfn = host_pfn(&g.vm, 1);
    assert_ne!(
        &g.m.host_read(pfn).unwrap()[..],
        regs.as_page(),
        "encrypted in memory"
    );
    // Intra-host migration onto a second platform of the same machine.
    let dst_p = g.m.create_guest(VmKind::SevEs).unwrap();
    let mut dst = Vm::migration_target(dst_p.clone(), g.log.clone());
    dst.create_vcpu(VcpuId(0)).unwrap();
    dst.create_vcpu(VcpuId(1)).unwrap();
    dst.migrate_from(&mut g.vm).unwrap();
    assert!(matches!(dst.vcpu(VcpuId(1)).unwrap().state, VmsaState::KvmPrivate(p) if p == pfn));
    assert!(matches!(g.vm.launch_start(0), Err(Error::VmDead)));
    let seen = ops(&g.log);
    assert!(seen.contains(&Op::MigrateOut) && seen.contains(&Op::MigrateIn));
    dst.teardown();
    // After the swap the destination VM holds the source's platform.
    dst.platform().destroy().unwrap();
    drop(dst);
    finish(G { p: dst_p, ..g }, &[]);
}

#[test]
fn allocation_failures() {
    let m = machine("alloc_page:1=ENOMEM");
    let p = m.create_guest(VmKind::Snp).unwrap();
    let mut vm = Vm::without_events(p.clone(), VmConfig::snp(0));
    let e = vm.create_vcpu(VcpuId(0)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Platform {
                op: PlatformOp::AllocPage,
                ..
            }
        ),
        "{e}"
    );
    assert!(vm.vcpu_ids().is_empty());
    // Four 2 MiB-aligned pages in a row: vmsa-core gives up, and frees every refused page.
    let m = machine(
        "alloc_page:1=ALIGNED_2M,alloc_page:2=ALIGNED_2M,alloc_page:3=ALIGNED_2M,alloc_page:4=ALIGNED_2M",
    );
    let p = m.create_guest(VmKind::Snp).unwrap();
    let mut vm = Vm::without_events(p.clone(), VmConfig::snp(0));
    let e = vm.create_vcpu(VcpuId(0)).unwrap_err();
    assert!(matches!(e, Error::NoUnalignedPage { tries: 4, .. }), "{e}");
    assert_eq!(m.allocated_frames(), 0);
    assert_eq!(m.stats().injected, 4);
}

#[test]
fn sync_and_make_private_failures_keep_the_page_shared() {
    for (spec, op) in [
        ("write_frame:1=RMP_FAULT", PlatformOp::WriteFrame),
        ("rmp_make_private:1=FAIL_INUSE", PlatformOp::RmpMakePrivate),
    ] {
        let mut g = guest(spec, VmKind::Snp, 1);
        g.vm.launch_start(POLICY).unwrap();
        let e = g.vm.launch_finish([0; 32]).unwrap_err();
        assert!(
            matches!(e, Error::Platform { op: o, .. } if o == op),
            "{spec}: {e}"
        );
        // Nothing changed (the VMSA is still shared, nothing protected): the launch may retry.
        assert_eq!(g.vm.launch_state(), LaunchState::Started);
        assert_eq!(g.vm.vcpu(VcpuId(0)).unwrap().state.kind(), StateKind::KvmShared);
        assert!(leaks(&g.log).is_empty());
        finish(g, &[]);
    }
}

#[test]
fn vmsa_launch_update_failure_reclaims_or_leaks() {
    // vCPU 2's VMSA is the third VMSA SNP_LAUNCH_UPDATE.
    let cases: [(&str, Option<LeakReason>); 3] = [
        ("snp_launch_update:vmsa:3=INVALID_PAGE_STATE", None),
        (
            "snp_launch_update:vmsa:3=INVALID_PAGE_STATE,page_reclaim:1=INVALID_PAGE_STATE",
            Some(LeakReason::ReclaimFailed),
        ),
        (
            "snp_launch_update:vmsa:3=INVALID_PAGE_STATE,rmp_make_shared:1=FAIL_PERMISSION",
            Some(LeakReason::ReclaimMakeSharedFailed),
        ),
    ];
    for (spec, leak) in cases {
        let mut g = guest(spec, VmKind::Snp, 4);
        let victim = host_pfn(&g.vm, 2);
        g.vm.launch_start(POLICY).unwrap();
        let r = g.vm.launch_finish([0; 32]);
        assert_eq!(
            fw_status(r),
            (PlatformOp::SnpLaunchUpdate, SevStatus::InvalidPageState),
            "{spec}"
        );
        assert_eq!(g.vm.vcpu(VcpuId(2)).unwrap().state, VmsaState::None);
        assert_eq!(g.vm.vcpu(VcpuId(1)).unwrap().state.kind(), StateKind::KvmPrivate);
        assert_eq!(g.vm.vcpu(VcpuId(3)).unwrap().state.kind(), StateKind::KvmShared);
        let got = leaks(&g.log);
        match leak {
            None => {
                assert!(got.is_empty(), "{spec}: {got:?}");
                assert!(!g.vm.is_bugged());
                finish(g, &[]);
            }
            Some(reason) => {
                assert_eq!(got, vec![(Some(VcpuId(2)), victim, reason)], "{spec}");
                assert!(g.vm.is_bugged());
                assert!(matches!(
                    g.vm.prepare_entry(VcpuId(0)),
                    Err(Error::VmBugged { .. })
                ));
                let state = g.m.page_state(victim);
                match reason {
                    LeakReason::ReclaimFailed => assert_eq!(state, PageState::PreGuest),
                    _ => assert_eq!(state, PageState::GuestInvalid),
                }
                finish(g, &[victim]);
            }
        }
    }
}

#[test]
fn data_launch_update_failures() {
    // The firmware refuses a data page: reclaimed and made shared, nothing leaks.
    let mut g = guest("snp_launch_update:normal:2=INVALID_ADDRESS", VmKind::Snp, 1);
    g.vm.launch_start(POLICY).unwrap();
    let r =
        g.vm.launch_update_data(Gpa(0x4000), 0x3000, SnpPageType::Normal, Some(&[1; 0x3000]));
    assert_eq!(
        fw_status(r),
        (PlatformOp::SnpLaunchUpdate, SevStatus::InvalidAddress)
    );
    assert!(leaks(&g.log).is_empty());
    finish(g, &[]);
    // ... and when its reclaim fails too, vmsa-core reports the guest frame leaked (no vCPU)
    // and the machine cannot take it back at destroy (it stays pre-guest).
    let mut g = guest(
        "snp_launch_update:zero:1=INVALID_PAGE_STATE,page_reclaim:1=INVALID_PAGE_STATE",
        VmKind::Snp,
        1,
    );
    g.vm.launch_start(POLICY).unwrap();
    let r =
        g.vm.launch_update_data(Gpa(0x8000), 0x1000, SnpPageType::Zero, None);
    assert_eq!(fw_status(r).1, SevStatus::InvalidPageState);
    let got = leaks(&g.log);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0, got[0].2), (None, LeakReason::ReclaimFailed));
    assert_eq!(g.m.page_state(got[0].1), PageState::PreGuest);
    let frame = got[0].1;
    finish(g, &[frame]);
    // No guest_memfd page behind the GPA.
    let mut g = guest("gmem_pfn:1=UNBACKED", VmKind::Snp, 1);
    g.vm.launch_start(POLICY).unwrap();
    let e =
        g.vm.launch_update_data(Gpa(0x4000), 0x1000, SnpPageType::Normal, Some(&[1; 0x1000]))
            .unwrap_err();
    assert!(matches!(e, Error::NoGuestMemory { gpa: Gpa(0x4000) }), "{e}");
    finish(g, &[]);
    // The data page cannot be made pre-guest (FAIL_INUSE: Linux retries only FAIL_OVERLAP).
    let mut g = guest("rmp_make_private:1=FAIL_INUSE", VmKind::Snp, 1);
    g.vm.launch_start(POLICY).unwrap();
    let e =
        g.vm.launch_update_data(Gpa(0x4000), 0x1000, SnpPageType::Normal, Some(&[1; 0x1000]))
            .unwrap_err();
    assert!(
        matches!(&e, Error::Platform { op: PlatformOp::RmpMakePrivate, source, .. } if source.rmp_code() == Some(RmpRet::FailInuse)),
        "{e}"
    );
    finish(g, &[]);
}

#[test]
fn launch_start_and_finish_failures() {
    for spec in ["launch_start:1=INVALID_PLATFORM_STATE", "activate:1=ASID_OWNED"] {
        let mut g = guest(spec, VmKind::Snp, 1);
        let r = g.vm.launch_start(POLICY);
        assert_eq!(fw_status(r).0, PlatformOp::LaunchStart, "{spec}");
        // snp_launch_start decommissions what it created: a new start may follow.
        assert_eq!(g.vm.launch_state(), LaunchState::NotStarted);
        // The guest context page was decommissioned, reclaimed and freed.
        assert_eq!(g.m.allocated_frames(), 1, "{spec}: only the VMSA page");
        finish(g, &[]);
    }
    let mut g = guest("launch_finish:1=INVALID_GUEST_STATE", VmKind::Snp, 1);
    g.vm.launch_start(POLICY).unwrap();
    let r = g.vm.launch_finish([0; 32]);
    assert_eq!(
        fw_status(r),
        (PlatformOp::LaunchFinish, SevStatus::InvalidGuestState)
    );
    assert!(g.p.launch_digest().is_none());
    finish(g, &[]);
    // A policy without bit 17 never reaches the firmware; one the firmware refuses does.
    let mut g = guest("", VmKind::Snp, 1);
    assert!(matches!(g.vm.launch_start(0), Err(Error::BadPolicy { .. })));
    finish(g, &[]);
}

#[test]
fn free_failures_leak_or_fall_back() {
    // RMPUPDATE to shared fails when the launched VMSA is freed: leaked and reported.
    let g = launched("rmp_make_shared:1=FAIL_INUSE", 2);
    let victim = host_pfn(&g.vm, 0);
    g.vm.free_vcpu_vmsa(VcpuId(0)).unwrap();
    assert_eq!(
        leaks(&g.log),
        vec![(Some(VcpuId(0)), victim, LeakReason::MakeSharedFailed)]
    );
    assert_eq!(g.m.page_state(victim), PageState::GuestValid);
    assert!(g.vm.is_bugged());
    finish(g, &[victim]);
    // VM_PAGE_FLUSH faults: a warning, then WBINVD on all CPUs; nothing leaks.
    let g = launched("flush_encrypted_page:1=GP", 1);
    g.vm.free_vcpu_vmsa(VcpuId(0)).unwrap();
    assert_eq!(g.log.warnings().len(), 1);
    let wb = g.m.cost_report();
    assert_eq!(wb.op(backend_sim::CostOp::WbinvdAll).map(|r| r.count), Some(1));
    assert!(leaks(&g.log).is_empty());
    finish(g, &[]);
}

#[test]
fn sev_es_failures() {
    let mut g = guest("launch_update_vmsa:2=INVALID_GUEST_STATE", VmKind::SevEs, 3);
    g.vm.launch_start(0).unwrap();
    let r = g.vm.launch_update_vmsas();
    assert_eq!(
        fw_status(r),
        (PlatformOp::LaunchUpdateVmsa, SevStatus::InvalidGuestState)
    );
    // __sev_launch_update_vmsa keeps the refused VMSA, shared and unprotected.
    assert_eq!(g.vm.vcpu(VcpuId(1)).unwrap().state.kind(), StateKind::KvmShared);
    assert!(!g.vm.vcpu(VcpuId(1)).unwrap().protected);
    assert_eq!(g.vm.vcpu(VcpuId(0)).unwrap().state.kind(), StateKind::KvmPrivate);
    assert!(leaks(&g.log).is_empty());
    finish(g, &[]);
    for spec in [
        "launch_start:1=INVALID_PLATFORM_STATE",
        "activate:1=DFFLUSH_REQUIRED",
    ] {
        let mut g = guest(spec, VmKind::SevEs, 1);
        assert_eq!(
            fw_status(g.vm.launch_start(0)).0,
            PlatformOp::LaunchStart,
            "{spec}"
        );
        assert_eq!(g.vm.launch_state(), LaunchState::NotStarted);
        finish(g, &[]);
    }
    // Migration refuses a source whose VMSAs were never launched; nothing moves.
    let mut g = guest("", VmKind::SevEs, 1);
    let dst_p = g.m.create_guest(VmKind::SevEs).unwrap();
    let mut dst = Vm::migration_target(dst_p.clone(), g.log.clone());
    dst.create_vcpu(VcpuId(0)).unwrap();
    let e = dst.migrate_from(&mut g.vm).unwrap_err();
    assert!(matches!(e, Error::Migration(_)), "{e}");
    assert_eq!(g.vm.vcpu(VcpuId(0)).unwrap().state.kind(), StateKind::KvmShared);
    dst.teardown();
    drop(dst);
    dst_p.destroy().unwrap();
    finish(g, &[]);
    let mut g = guest("launch_update_data:1=INACTIVE", VmKind::SevEs, 1);
    g.vm.launch_start(0).unwrap();
    let r =
        g.vm.launch_update_data(Gpa(0), 4096, SnpPageType::Normal, Some(&[0; 4096]));
    assert_eq!(fw_status(r), (PlatformOp::LaunchUpdateData, SevStatus::Inactive));
    finish(g, &[]);
    // NODBG forbids debugging in the vmsa-core policy check; the firmware refusal is injected.
    let mut g = guest("dbg_decrypt:1=POLICY_FAILURE", VmKind::SevEs, 1);
    g.vm.launch_start(0).unwrap();
    g.vm.launch_update_vmsas().unwrap();
    g.vm.launch_finish([0; 32]).unwrap();
    assert_eq!(
        fw_status(g.vm.decrypt_vmsa(VcpuId(0))),
        (PlatformOp::DbgDecrypt, SevStatus::PolicyFailure)
    );
    finish(g, &[]);
}

#[test]
fn debug_decrypt_failures() {
    // An unlaunched VMSA is read by the host; that read can fail.
    let g = guest("read_frame:1=RMP_FAULT", VmKind::Snp, 1);
    let e = g.vm.decrypt_vmsa(VcpuId(0)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Platform {
                op: PlatformOp::ReadFrame,
                ..
            }
        ),
        "{e}"
    );
    finish(g, &[]);
    // SNP_DBG_DECRYPT of a launched VMSA: refused by policy, or by the firmware.
    let g = launched("dbg_decrypt:1=INVALID_PAGE_STATE", 1);
    assert!(matches!(
        g.vm.decrypt_vmsa(VcpuId(0)),
        Err(Error::DebugPolicy { .. })
    ));
    finish(g, &[]);
    let mut g = guest("dbg_decrypt:1=INVALID_PAGE_STATE", VmKind::Snp, 1);
    g.vm.launch_start(POLICY | SNP_POLICY_DEBUG).unwrap();
    g.vm.launch_finish([0; 32]).unwrap();
    assert_eq!(
        fw_status(g.vm.decrypt_vmsa(VcpuId(0))),
        (PlatformOp::DbgDecrypt, SevStatus::InvalidPageState)
    );
    assert!(g.vm.decrypt_vmsa(VcpuId(0)).is_ok(), "the next one works");
    finish(g, &[]);
}

#[test]
fn entry_failures_unbacked_vmsa_and_vmrun_checks() {
    let g = launched("vmrun:2=VMEXIT_INVALID", 3);
    let page = |gpa| GuestAction::Pvalidate {
        vcpu: 0,
        gpa,
        pages: 1,
        size: backend_sim::PageSize::Size4K,
        validate: true,
    };
    let script = GuestScript {
        name: "entry".into(),
        actions: vec![
            // AP 1's VMSA lies outside every memslot: it stays halted, with no VMSA address.
            GuestAction::ApCreate {
                vcpu: 0,
                apic_id: 1,
                gpa: 0x8000_1000,
                on_init: false,
                sev_features: None,
            },
            // AP 2's page was never RMPADJUSTed into a VMSA: VMRUN refuses it (the injected
            // failure hits this VMRUN, the 2nd; the real check hits the next one).
            page(0x40_1000),
            GuestAction::ApCreate {
                vcpu: 0,
                apic_id: 2,
                gpa: 0x40_1000,
                on_init: false,
                sev_features: None,
            },
            GuestAction::Run { vcpu: 2 },
            // Refused requests: SEV features, erratum 1467, unknown APIC ID.
            GuestAction::ApCreate {
                vcpu: 0,
                apic_id: 2,
                gpa: 0x40_1000,
                on_init: false,
                sev_features: Some(0x21),
            },
            GuestAction::ApCreate {
                vcpu: 0,
                apic_id: 2,
                gpa: 0x40_0000,
                on_init: false,
                sev_features: None,
            },
            GuestAction::ApDestroy { vcpu: 0, apic_id: 9 },
        ],
    };
    let r = run_script(&g.vm, &script);
    assert_eq!(r.steps[0].detail, "vCPU 1 halted", "{:?}", r.steps[0]);
    assert_eq!(
        g.vm.prepare_entry(VcpuId(1)).unwrap(),
        Entry::Blocked(MpState::Halted)
    );
    assert_eq!(g.vm.vcpu(VcpuId(1)).unwrap().vmcb_vmsa_pa, None);
    assert!(r.steps[2].detail.contains("injected"), "{:?}", r.steps[2]);
    let run = r.steps[3].error.as_deref().unwrap();
    assert!(run.contains("VMSA bit"), "{run}");
    for (i, code) in [(4, "2/5"), (5, "2/5"), (6, "2/5")] {
        let e = r.steps[i].error.as_deref().unwrap();
        assert!(e.contains(code), "{i}: {e}");
    }
    assert_eq!((r.ap_requests, r.ap_refused), (2, 3));
    assert_eq!(g.m.stats().vmrun_failures, 2);
    finish(g, &[]);
}

#[test]
fn create_on_init_waits_for_init_and_destroy_halts() {
    let g = launched("", 2);
    let gpa = 0x60_3000;
    let mut actions = create_ap_1(gpa, 0x2000, true);
    let r = run_script(
        &g.vm,
        &GuestScript {
            name: "a".into(),
            actions: actions.clone(),
        },
    );
    assert_eq!(r.failures().count(), 0, "{:?}", r.failures().collect::<Vec<_>>());
    assert!(r.steps[3].detail.contains("waits for INIT"));
    assert_eq!(g.vm.vcpu(VcpuId(1)).unwrap().pending_gpa, Some(Gpa(gpa)));
    actions.clear();
    actions.push(GuestAction::SendInit { vcpu: 0, apic_id: 1 });
    // Clearing the VMSA bit of a running AP's VMSA faults (Linux commit 309d28576f0a).
    actions.push(GuestAction::MakeVmsa {
        vcpu: 0,
        gpa,
        vmsa: false,
    });
    actions.push(GuestAction::ApDestroy { vcpu: 0, apic_id: 1 });
    actions.push(GuestAction::MakeVmsa {
        vcpu: 0,
        gpa,
        vmsa: false,
    });
    let r = run_script(
        &g.vm,
        &GuestScript {
            name: "b".into(),
            actions,
        },
    );
    assert!(r.steps[0].detail.contains("vCPU 1 entered"), "{:?}", r.steps[0]);
    assert!(
        r.steps[1].error.as_deref().unwrap().contains("in use"),
        "{:?}",
        r.steps[1]
    );
    assert!(r.steps[2].detail.contains("halted"));
    assert_eq!(r.steps[3].error, None);
    assert_eq!(g.vm.vcpu(VcpuId(1)).unwrap().state, VmsaState::None);
    assert!(ops(&g.log).contains(&Op::Destroy));
    finish(g, &[]);
}

#[test]
fn fault_plan_counts_and_reports() {
    let g = guest("snp_launch_update:vmsa:1=INVALID_PAGE_STATE", VmKind::Snp, 1);
    let plan = g.m.fault_plan();
    assert_eq!(plan.pending().len(), 1);
    assert_eq!(
        plan.calls(backend_sim::FaultOp::AllocPage),
        2,
        "one refused (aligned), one kept"
    );
    let vm_host = host_pfn(&g.vm, 0);
    assert!(vm_host.hpa().0 > 4 << 30, "real-looking address above 4 GiB");
    assert!(!vm_host.is_2m_aligned());
    finish(g, &[]);
}
