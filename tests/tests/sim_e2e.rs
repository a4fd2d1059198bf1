//! End-to-end SNP guests on the simulated machine: a 4-vCPU launch where the BSP runs the
//! host-launched VMSA and the APs are created by the guest from guest-owned VMSAs, torn down
//! without leaks or RMP faults; the host cannot write a launched VMSA; memory encryption as
//! the host and another guest see it; the cost report and the Perfetto trace.

use backend_sim::guest::{GuestScript, PscTarget, smp_boot_vmsa_gpa};
use backend_sim::{
    CostOp, DirectMapPolicy, GuestAction, Machine, MachineConfig, PageSize, PageState, RmpState, SimError,
};
use scenario_tests::{FIRMWARE_PAGES, SimRun, sim_boot};
use vmm::run::flow::RunEnd;
use vmsa_core::{Gpa, HostPage, Pfn, Platform, SNP_POLICY_RSVD_MBO, VcpuId, Vm, VmConfig, VmKind, VmsaState};

/// The built-in SMP boot of a 2-vCPU, 16 MiB SNP guest on a machine configured with `config`.
fn smp_boot_2(config: MachineConfig) -> SimRun {
    sim_boot(config, 2, 16 << 20, GuestScript::smp_boot(2, 0x20_0000))
}

#[test]
fn four_vcpu_guest_boots_aps_from_guest_owned_vmsas_and_tears_down_cleanly() {
    let base = 0x20_0000;
    let r = sim_boot(
        MachineConfig::default(),
        4,
        1 << 30,
        GuestScript::smp_boot(4, base),
    );
    let m = &r.machine;
    let g = r.guest();
    assert_eq!(g.failures().count(), 0, "{:?}", g.failures().collect::<Vec<_>>());
    let run = r.report.run.as_ref().expect("the guest ran");
    assert_eq!(run.end, RunEnd::Done);
    assert!(
        run.vcpus.iter().all(|v| v.runs > 0),
        "every vCPU thread ran: {:?}",
        run.vcpus
    );
    // Each AP started on its own guest VMSA: one AP_CREATE and one AP_DESTROY per AP, and the
    // BSP plus three APs entered the guest.
    assert_eq!((g.ap_requests, g.ap_refused), (6, 0));
    for i in 1..4u32 {
        let gpa = Gpa(smp_boot_vmsa_gpa(base, i));
        assert!(
            r.events().iter().any(|e| matches!(e,
                vmsa_core::Event::Transition { vcpu, to: VmsaState::GuestOwned(g), .. } if *vcpu == VcpuId(i) && *g == gpa)),
            "AP {i} owns the VMSA at {gpa}"
        );
    }
    assert!(g.vmruns >= 4);
    let stats = m.stats();
    assert_eq!(stats.vmrun_failures, 0);
    // Torn down: no leaks, no RMP faults, every frame back.
    let t = &r.report.host.teardown;
    assert_eq!((t.vcpus, t.vmsas_leaked.seen()), (4, Some(&0)));
    assert!(
        !r.events()
            .iter()
            .any(|e| matches!(e, vmsa_core::Event::Leaked { .. }))
    );
    assert!(m.leaked_frames().is_empty());
    assert_eq!(stats.rmp_faults, 0);
    assert_eq!((stats.freed_unflushed, stats.freed_while_assigned), (0, 0));
    assert_eq!(m.allocated_frames(), 0);
    assert!(t.guest_frames_released.seen().is_some_and(|n| *n > 0));
    assert_eq!(t.guest_frames_leaked.seen(), Some(&0));
    // Phases and costs.
    let names: Vec<_> = r.phases.iter().map(|p| p.name).collect();
    assert_eq!(names, ["create", "launch", "run", "teardown"]);
    let launch = &r.phases[1];
    let costs = m.cost_report();
    let lu = costs.op(CostOp::SnpLaunchUpdateMeasured).unwrap();
    assert_eq!(
        lu.count,
        FIRMWARE_PAGES + 4,
        "16 firmware pages and 4 VMSAs measured"
    );
    assert!(launch.cycles >= lu.cycles);
    assert!(costs.op(CostOp::VmgexitSnp).unwrap().count >= 6);
    assert_eq!(
        costs.total_cycles,
        costs.ops.iter().map(|o| o.cycles).sum::<u64>()
    );
}

#[test]
fn host_write_into_a_launched_vmsa_is_an_rmp_fault() {
    let m = Machine::new(MachineConfig::default());
    let p = m.create_guest(VmKind::Snp).unwrap();
    let mut vm = Vm::without_events(p.clone(), VmConfig::snp(0));
    vm.create_vcpu(VcpuId(0)).unwrap();
    let pfn = vm.host_pages()[0].2;
    m.host_write(pfn, &[1; 4096]).unwrap();
    vm.launch_start(SNP_POLICY_RSVD_MBO).unwrap();
    vm.launch_finish([0; 32]).unwrap();
    let before = m.host_read(pfn).unwrap();
    let e = m.host_write(pfn, &[0xcc; 4096]).unwrap_err();
    assert!(
        matches!(
            e,
            SimError::RmpFault {
                access: "write",
                state: PageState::GuestValid,
                injected: false,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(m.stats().rmp_faults, 1);
    assert_eq!(m.stats().rmp_fault_log[0].pfn, pfn);
    assert_eq!(*m.host_read(pfn).unwrap(), *before, "the write did not land");
    // vmsa-core itself can never reach that write: a second launch is refused before it.
    assert!(vm.launch_finish([0; 32]).is_err());
    vm.teardown();
    p.destroy().unwrap();
    assert_eq!(m.stats().rmp_faults, 1);
}

/// Two hypervisor-owned frames of one 2 MiB region from `p`'s machine, the first made private
/// to `p` at GPA 0x1000 with a 4 KiB host RMPUPDATE (Linux `rmp_make_private(.., PG_LEVEL_4K,
/// ..)`): the private frame and its still hypervisor-owned neighbour.
fn private_frame_and_neighbour(m: &Machine, p: &backend_sim::SimPlatform) -> (Pfn, Pfn) {
    let (a, b) = (p.alloc_page().unwrap().pfn(), p.alloc_page().unwrap().pfn());
    assert_eq!(a.0 / 512, b.0 / 512, "the allocator hands out neighbours");
    let st = RmpState {
        gpa: Gpa(0x1000),
        assigned: true,
        asid: p.asid().0,
        ..RmpState::default()
    };
    m.rmpupdate(a, st).unwrap();
    (a, b)
}

#[test]
fn a_host_write_through_a_2m_mapping_faults_if_any_4k_page_in_it_is_guest_owned() {
    // Linux arch/x86/virt/svm/sev.c `adjust_direct_map`: a write through a 2 MiB or larger
    // mapping "that contains any 4KB pages that are set to private in the RMP table" takes an
    // RMP #PF. A host that keeps its large direct-map pages meets the rule.
    let m = Machine::new(MachineConfig {
        direct_map: DirectMapPolicy::KeepLarge,
        ..MachineConfig::default()
    });
    let p = m.create_guest(VmKind::Snp).unwrap();
    let (private, neighbour) = private_frame_and_neighbour(&m, &p);
    assert_eq!(m.host_mapping(neighbour), PageSize::Size2M);
    let e = m.host_write(neighbour, &[0xcc; 4096]).unwrap_err();
    assert_eq!(
        e,
        SimError::RmpFault {
            access: "write",
            pfn: neighbour,
            mapping: PageSize::Size2M,
            checked: private,
            state: PageState::GuestInvalid,
            asid: p.asid().0,
            injected: false,
        }
    );
    let s = m.stats();
    assert_eq!((s.rmp_faults, s.direct_map_splits), (1, 0));
    let log = &s.rmp_fault_log[0];
    assert_eq!(
        (log.pfn, log.mapping, log.checked),
        (neighbour, PageSize::Size2M, private)
    );
    assert_eq!(
        *m.host_read(neighbour).unwrap(),
        [0; 4096],
        "the write did not land"
    );
    // Once the region holds no assigned frame, the same write goes through.
    m.rmpupdate(private, RmpState::default()).unwrap();
    m.host_write(neighbour, &[0xcc; 4096]).unwrap();
    assert_eq!(m.stats().rmp_faults, 1);
}

#[test]
fn linux_splits_the_direct_map_before_a_4k_rmpupdate_so_the_neighbours_host_write_passes() {
    // The default host is Linux: `rmpupdate()` calls `adjust_direct_map`, whose
    // `set_memory_4k` maps the region with 4 KiB pages before the page turns private.
    let m = Machine::with_defaults();
    let p = m.create_guest(VmKind::Snp).unwrap();
    let (private, neighbour) = private_frame_and_neighbour(&m, &p);
    assert_eq!(m.host_mapping(neighbour), PageSize::Size4K);
    m.host_write(neighbour, &[0xcc; 4096]).unwrap();
    // The private frame itself is still refused, now through a 4 KiB mapping.
    let e = m.host_write(private, &[0xcc; 4096]).unwrap_err();
    assert!(
        matches!(e, SimError::RmpFault { mapping: PageSize::Size4K, checked, .. } if checked == private),
        "{e}"
    );
    // The split stays when the page is shared again (Linux never merges it back).
    m.rmpupdate(private, RmpState::default()).unwrap();
    assert_eq!(m.host_mapping(private), PageSize::Size4K);
    let s = m.stats();
    assert_eq!((s.rmp_faults, s.direct_map_splits), (1, 1));
}

#[test]
fn without_the_direct_map_split_an_snp_launch_faults_writing_a_vmsa_beside_the_context_page() {
    // The guest context page (made firmware-owned with a 4 KiB RMPUPDATE) lands in the 2 MiB
    // region of the vCPU's VMSA page, so the VMSA sync at launch finish writes through a 2 MiB
    // mapping over an assigned page: what `adjust_direct_map` exists to prevent.
    let launch = |direct_map| {
        let m = Machine::new(MachineConfig {
            direct_map,
            ..MachineConfig::default()
        });
        let p = m.create_guest(VmKind::Snp).unwrap();
        let mut vm = Vm::without_events(p.clone(), VmConfig::snp(0));
        vm.create_vcpu(VcpuId(0)).unwrap();
        vm.launch_start(SNP_POLICY_RSVD_MBO).unwrap();
        // The machine's error is the source of vmsa-core's.
        let r = vm.launch_finish([0; 32]).map_err(|e| {
            let source = std::error::Error::source(&e).map(ToString::to_string);
            format!("{e}: {}", source.unwrap_or_default())
        });
        vm.teardown();
        p.destroy().unwrap();
        (r, m.stats())
    };
    let (r, s) = launch(DirectMapPolicy::SplitBefore4kRmpupdate);
    assert_eq!((r, s.rmp_faults), (Ok(()), 0));
    assert!(s.direct_map_splits > 0);
    let (r, s) = launch(DirectMapPolicy::KeepLarge);
    let e = r.unwrap_err();
    assert!(e.contains("RMP fault"), "{e}");
    assert_eq!(s.rmp_faults, 1);
    let log = &s.rmp_fault_log[0];
    assert_eq!(
        (log.access, log.mapping, log.state),
        ("write", PageSize::Size2M, PageState::Context)
    );
}

#[test]
fn private_memory_is_ciphertext_to_the_host_and_to_other_guests() {
    let m = Machine::new(MachineConfig::default());
    let mut guests = Vec::new();
    for _ in 0..2 {
        let p = m.create_guest(VmKind::Snp).unwrap();
        p.add_private_memslot(Gpa(0), 16 << 20).unwrap();
        let mut vm = Vm::without_events(p.clone(), VmConfig::snp(0));
        vm.create_vcpu(VcpuId(0)).unwrap();
        vm.launch_start(SNP_POLICY_RSVD_MBO).unwrap();
        vm.launch_finish([0; 32]).unwrap();
        guests.push((p, vm));
    }
    let (a, b) = (&guests[0].0, &guests[1].0);
    let gpa = Gpa(0x5000);
    let secret = [0x42u8; 4096];
    for p in [a, b] {
        p.pvalidate(gpa, PageSize::Size4K, true).unwrap();
        p.guest_write(gpa, &secret, true).unwrap();
        assert_eq!(
            *p.guest_read(gpa, true).unwrap(),
            secret,
            "the guest reads its plaintext"
        );
    }
    let fa = vmsa_core::Platform::gmem_pfn(a, gpa.gfn()).unwrap();
    let fb = vmsa_core::Platform::gmem_pfn(b, gpa.gfn()).unwrap();
    let (ca, cb) = (m.host_read(fa).unwrap(), m.host_read(fb).unwrap());
    assert_ne!(*ca, secret, "the host reads ciphertext");
    assert_ne!(*ca, *cb, "another key gives another ciphertext");
    assert_ne!(ca[..16], ca[16..32], "the address tweak changes every block");
    // The host cannot write it either: the RMP says it belongs to A's ASID.
    let e = m.host_write(fa, &[0; 4096]).unwrap_err();
    assert!(e.is_rmp_fault());
    // A page the guest never validated raises #VC; a shared access to a private page #NPF.
    let e = a.guest_read(Gpa(0x9000), true).unwrap_err();
    assert!(e.to_string().contains("#VC 0x404"), "{e}");
    let e = a.guest_write(gpa, &secret, false).unwrap_err();
    assert!(
        matches!(e, SimError::PrivateMemory { .. }),
        "C=0 access to a private GPA: {e}"
    );
    for (p, mut vm) in guests {
        vm.teardown();
        p.destroy().unwrap();
    }
    assert_eq!(m.allocated_frames(), 0);
    assert_eq!(m.stats().rmp_faults, 1);
}

#[test]
fn page_state_changes_move_memory_between_gmem_and_shared() {
    let gpa = 0x40_0000;
    let pvalidate = |pages, size, validate| GuestAction::Pvalidate {
        vcpu: 0,
        gpa,
        pages,
        size,
        validate,
    };
    let write = |pages, byte, private| GuestAction::Write {
        vcpu: 0,
        gpa,
        pages,
        byte,
        private,
    };
    let page_state = |to| GuestAction::PageState {
        vcpu: 0,
        gpa,
        pages: 4,
        to,
    };
    let script = GuestScript {
        name: "psc".into(),
        actions: vec![
            pvalidate(4, PageSize::Size4K, true),
            pvalidate(1, PageSize::Size2M, true),
            write(4, 9, true),
            pvalidate(4, PageSize::Size4K, false),
            page_state(PscTarget::Shared),
            write(4, 7, false),
            write(1, 7, true),
            page_state(PscTarget::Private),
            write(1, 7, true),
            pvalidate(4, PageSize::Size4K, true),
            GuestAction::Hlt { vcpu: 0 },
        ],
    };
    let r = sim_boot(MachineConfig::default(), 1, 16 << 20, script);
    let m = &r.machine;
    let o = &r.guest().steps;
    assert_eq!(o[0].error, None);
    assert!(
        o[1].error.as_deref().unwrap().contains("FAIL_SIZEMISMATCH"),
        "{:?}",
        o[1]
    );
    assert_eq!(o[4].error, None);
    assert!(o[4].detail.contains("released"));
    assert_eq!(o[5].error, None, "shared writes go to VMM memory");
    // A private write to a shared page exits to the VMM as a memory fault (KVM's implicit
    // conversion); the VMM makes the page private and the write runs again, and then faults in
    // the guest: the page is not validated.
    assert!(o[6].error.as_deref().unwrap().contains("#VC"), "{:?}", o[6]);
    let run = r.report.run.as_ref().unwrap();
    assert_eq!(
        run.vcpus[0].conversions, 3,
        "two page state changes and one memory fault"
    );
    assert!(o[8].error.as_deref().unwrap().contains("#VC"), "{:?}", o[8]);
    assert_eq!(o[9].error, None);
    assert_eq!(r.guest().failures().count(), 3);
    assert_eq!((m.leaked_frames().len(), m.stats().rmp_faults), (0, 0));
    assert_eq!(m.allocated_frames(), 0);
}

#[test]
fn converting_a_running_aps_vmsa_to_shared_kicks_it_out_before_the_page_is_freed() {
    // The BSP creates AP 1 from a VMSA at GPA, AP 1 runs on it, and then the BSP converts that
    // page to shared. KVM drops the VMSA and kicks AP 1 out of the guest before it frees the
    // page, so RMPUPDATE never meets a VMSA in use (FAIL_INUSE) and nothing leaks.
    let gpa = smp_boot_vmsa_gpa(0x20_0000, 1);
    let mut actions = GuestAction::vmsa_setup(0, gpa, 0x10_0000, 0x8_0000).to_vec();
    actions.extend([
        GuestAction::ap_create(0, 1, gpa, false),
        GuestAction::Run { vcpu: 1 },
        GuestAction::PageState {
            vcpu: 0,
            gpa,
            pages: 1,
            to: PscTarget::Shared,
        },
        GuestAction::Hlt { vcpu: 0 },
    ]);
    let r = sim_boot(
        MachineConfig::default(),
        2,
        16 << 20,
        GuestScript {
            name: "psc-vmsa".into(),
            actions,
        },
    );
    let steps = &r.guest().steps;
    let psc = &steps[5];
    assert_eq!(psc.error, None, "{psc:?}");
    assert!(psc.detail.contains("1 private frames released"), "{psc:?}");
    assert!(psc.detail.contains("vCPUs reloading: [VcpuId(1)]"), "{psc:?}");
    assert!(!psc.detail.contains("LEAKED"), "{psc:?}");
    assert!(r.machine.leaked_frames().is_empty());
    assert_eq!(r.machine.stats().rmp_faults, 0);
    assert_eq!(r.machine.allocated_frames(), 0);
}

#[test]
fn an_action_for_a_vcpu_that_does_not_exist_is_refused_at_once_not_waited_for() {
    // No thread runs vCPU 9, so whichever vCPU reaches the action executes (and refuses) it:
    // the run ends at once instead of idling until the watchdog.
    let script = GuestScript {
        name: "ghost".into(),
        actions: vec![
            GuestAction::Run { vcpu: 0 },
            GuestAction::Hlt { vcpu: 9 },
            GuestAction::Hlt { vcpu: 0 },
        ],
    };
    let t0 = std::time::Instant::now();
    let r = sim_boot(MachineConfig::default(), 2, 16 << 20, script);
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(r.report.run.as_ref().unwrap().end, RunEnd::Done);
    let steps = &r.guest().steps;
    assert_eq!(steps.len(), 3);
    assert_eq!(steps[1].error.as_deref(), Some("no vCPU 9"));
}

#[test]
fn a_guest_termination_request_ends_the_run_with_its_reason() {
    let script = GuestScript {
        name: "term".into(),
        actions: vec![
            GuestAction::Run { vcpu: 0 },
            GuestAction::Terminate {
                vcpu: 0,
                reason_set: 1,
                reason_code: 2,
            },
            GuestAction::Hlt { vcpu: 0 },
        ],
    };
    let r = sim_boot(MachineConfig::default(), 2, 16 << 20, script);
    let run = r.report.run.as_ref().unwrap();
    assert_eq!(
        run.end,
        RunEnd::Terminated {
            vcpu: 0,
            reason: Some(vmsa_host::TermReason { set: 1, code: 2 })
        }
    );
    // The run stopped there: the BSP's HLT never ran, and nothing leaked.
    assert_eq!(r.guest().steps.len(), 2);
    assert_eq!(r.machine.allocated_frames(), 0);
}

#[test]
fn cost_overrides_and_perfetto_trace() {
    let costs =
        backend_sim::CostModel::from_text("c.toml", "[cycles]\nvmrun = 1\nrmpupdate_4k = 10\n").unwrap();
    let r = smp_boot_2(MachineConfig {
        costs,
        ..MachineConfig::default()
    });
    let m = &r.machine;
    let costs = m.cost_report();
    let up = costs.op(CostOp::Rmpupdate4K).unwrap();
    assert_eq!(up.unit_cycles, 10);
    assert_eq!(up.cycles, up.count * 10);
    assert_eq!(costs.op(CostOp::Vmrun).unwrap().unit_cycles, 1);
    let mut bytes = Vec::new();
    m.write_trace_json(&mut bytes).unwrap();
    let trace: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    let x: Vec<_> = events.iter().filter(|e| e["ph"] == "X").collect();
    assert!(x.iter().any(|e| e["name"] == "snp_launch_update_measured"));
    assert!(x.iter().any(|e| e["cat"] == "phase" && e["name"] == "launch"));
    let last = x
        .iter()
        .map(|e| e["ts"].as_f64().unwrap() + e["dur"].as_f64().unwrap())
        .fold(0.0, f64::max);
    let total_us = costs.total_us;
    assert!(
        (last - total_us).abs() < 1e-6 * total_us.max(1.0),
        "{last} vs {total_us}"
    );
}

#[test]
fn guest_instructions_fail_on_demand() {
    let r = smp_boot_2(MachineConfig {
        faults: "pvalidate:2=FAIL_INUSE,rmpadjust:1=FAIL_PERMISSION"
            .parse()
            .unwrap(),
        ..MachineConfig::default()
    });
    let m = &r.machine;
    let steps = &r.guest().steps;
    let errs: Vec<_> = r
        .guest()
        .failures()
        .map(|o| (o.index, o.error.clone().unwrap()))
        .collect();
    // The RMPADJUST of the AP's VMSA fails, so the AP's VMRUN is refused (no VMSA bit), and the
    // AP's first PVALIDATE (the 2nd overall) returns the injected code.
    assert!(
        errs.iter()
            .any(|(i, e)| *i == 2 && e.contains("FAIL_PERMISSION") && e.contains("injected")),
        "{errs:?}"
    );
    assert!(steps[3].detail.contains("cannot run"), "{:?}", steps[3]);
    // VMRUN is refused at the kick and again before each of the AP's own actions.
    let ap_actions = steps.iter().filter(|o| o.vcpu == 1).count() as u64;
    assert_eq!(m.stats().vmrun_failures, 1 + ap_actions);
    assert!(m.leaked_frames().is_empty());
    assert!(
        !r.events()
            .iter()
            .any(|e| matches!(e, vmsa_core::Event::Leaked { .. }))
    );
    assert_eq!(m.allocated_frames(), 0);
}

#[test]
fn a_vmsa_another_vcpu_runs_fails_vmrun_with_vmexit_busy() {
    // The guest gives two APs the same VMSA GPA; KVM (`sev_snp_ap_creation`) accepts both, so
    // both vCPUs point their VMCB at one page. The processor sets the VMSA's BUSY bit at VMRUN
    // and clears it at #VMEXIT, and a VMRUN that finds it set fails with VMEXIT_BUSY (AMD APM
    // vol. 2 table C-1): AP 1 runs on the page, AP 2's VMRUN fails, and since KVM has no
    // handler for that exit code (svm_invoke_exit_handler: an unexpected exit reason) AP 2's
    // KVM_RUN ends the run. Before, both VMRUNs succeeded on one VMSA.
    let gpa = smp_boot_vmsa_gpa(0x20_0000, 1);
    let mut actions = GuestAction::vmsa_setup(0, gpa, 0x10_0000, 0x8_0000).to_vec();
    actions.extend([
        GuestAction::ap_create(0, 1, gpa, false),
        GuestAction::Run { vcpu: 1 },
        GuestAction::ap_create(0, 2, gpa, false),
        GuestAction::Run { vcpu: 2 },
        GuestAction::Hlt { vcpu: 0 },
    ]);
    let r = sim_boot(
        MachineConfig::default(),
        3,
        16 << 20,
        GuestScript {
            name: "two-aps-one-vmsa".into(),
            actions,
        },
    );
    let run = r.report.run.as_ref().expect("the guest ran");
    match &run.end {
        RunEnd::Error { vcpu, error } => {
            assert_eq!(*vcpu, 2, "{error}");
            assert!(error.contains("VMEXIT_BUSY"), "{error}");
        }
        other => panic!("the run must end at AP 2's VMRUN, ended: {other:?}"),
    }
    assert_eq!(r.machine.stats().vmrun_failures, 1);
    // Nothing is lost on the way out: the shared page is freed once, nothing leaks.
    assert!(r.machine.leaked_frames().is_empty());
    assert_eq!(r.machine.stats().rmp_faults, 0);
    assert_eq!(r.machine.allocated_frames(), 0);
}
