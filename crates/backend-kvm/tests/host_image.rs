//! VMSA-image mode driven only through vmsa-host's traits, on real /dev/kvm: the built-in
//! AP-creation guest on 1, 4 and 64 vCPUs, one thread per vCPU and a watchdog, the way the VMM
//! drives every backend; its ownership histories must equal the old runner's. Plus KVM's
//! refusals through the interface. (The tests take turns: they count the process's KVM fds.)

mod common;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use backend_kvm::guest::layout::{self, STACK_TOP, params, ports};
use backend_kvm::guest::{self, program};
use backend_kvm::host::{KvmImageHost, KvmImageVcpu, KvmImageVm};
use backend_kvm::runner;
use vmsa_core::{Event, Gpa, SNP_POLICY_RSVD_MBO, SnpPageType, VmKind};
use vmsa_host::{
    Errno, HostReport, Hypervisor, HypervisorError, Kick, LaunchUpdate, MemoryRegion, Observed, Vcpu,
    VcpuError, VcpuExit, Vm, VmError, VmSpec,
};

static TURN: Mutex<()> = Mutex::new(());

fn host(test: &str) -> Option<KvmImageHost> {
    if !common::kvm_or_skip(test) {
        return None;
    }
    match KvmImageHost::new(&backend_kvm::probe(), "asked for by the test") {
        Ok(h) => Some(h),
        Err(e) => {
            eprintln!("skipped {test}: {e}");
            None
        }
    }
}

fn kvm_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|p| p.to_string_lossy().contains("kvm"))
                .count()
        })
        .unwrap_or(0)
}

const SPEC: VmSpec = VmSpec {
    kind: VmKind::Snp,
    vmsa_features: 0,
};

/// A launched VM running `entry` on the BSP (with `rdi`), every vCPU created and given state.
fn launched(
    h: &KvmImageHost,
    n: u32,
    entry: impl Fn(&program::Entries) -> u64,
) -> (KvmImageVm, Vec<KvmImageVcpu>) {
    let prog = program::assemble().unwrap();
    let memory = layout::min_memory(n).max(16 << 20);
    let mut vm = h.create_vm(SPEC).unwrap();
    vm.add_memory(MemoryRegion {
        slot: 0,
        gpa: Gpa(0),
        size: memory,
        guest_memfd: true,
    })
    .unwrap();
    let mut vcpus = Vec::new();
    for id in 0..n {
        let mut v = vm.create_vcpu(id).unwrap();
        let mut img = layout::long_mode_image(if id == 0 {
            entry(&prog.entries)
        } else {
            prog.entries.ap
        });
        if id == 0 {
            img.rdi = u64::from(n);
            img.rsp = STACK_TOP;
        }
        v.set_state(&img).unwrap();
        vcpus.push(v);
    }
    vm.launch_start(SNP_POLICY_RSVD_MBO).unwrap();
    let image = guest::image(&prog, n, params::FLAG_RECREATE);
    vm.launch_update(LaunchUpdate {
        gpa: Gpa(0),
        len: image.len() as u64,
        page_type: SnpPageType::Normal,
        data: Some(&image),
    })
    .unwrap();
    vm.launch_finish().unwrap();
    (vm, vcpus)
}

/// How the run ended.
#[derive(Debug)]
struct Outcome {
    /// The exit (or error) that stopped the VM, by vCPU.
    stopped_by: Option<(u32, Result<VcpuExit, String>)>,
    timed_out: bool,
    run: Duration,
    report: HostReport,
}

/// The VMM's loop: one thread per vCPU, a watchdog, then teardown.
fn drive<V: Vm>(vm: V, vcpus: Vec<V::Vcpu>, timeout: Duration) -> Outcome
where
    V::Vcpu: Send,
{
    let kicks: Vec<_> = vcpus.iter().map(|v| v.kicker()).collect();
    let stop = AtomicBool::new(false);
    let first: Mutex<Option<(u32, Result<VcpuExit, String>)>> = Mutex::new(None);
    let t0 = Instant::now();
    let mut timed_out = false;
    let stop_all = |who: u32, why: Result<VcpuExit, String>| {
        first.lock().unwrap().get_or_insert((who, why));
        stop.store(true, Ordering::SeqCst);
        kicks.iter().for_each(Kick::kick);
    };
    let vcpus: Vec<V::Vcpu> = std::thread::scope(|s| {
        let (vm, stop, stop_all) = (&vm, &stop, &stop_all);
        let handles: Vec<_> = vcpus
            .into_iter()
            .map(|mut v| {
                s.spawn(move || {
                    loop {
                        match v.run() {
                            Ok(VcpuExit::MapGpaRange(c)) => {
                                let r = vm.set_memory_attributes(c).map_err(|_| Errno::EINVAL);
                                v.complete_conversion(r).unwrap();
                            }
                            Ok(VcpuExit::MemoryFault(c)) => vm.set_memory_attributes(c).unwrap(),
                            Ok(VcpuExit::Halt) => {}
                            Ok(VcpuExit::Interrupted) => {
                                if stop.load(Ordering::SeqCst) {
                                    break;
                                }
                            }
                            Ok(e) => {
                                stop_all(v.id(), Ok(e));
                                break;
                            }
                            Err(e) => {
                                stop_all(v.id(), Err(e.to_string()));
                                break;
                            }
                        }
                    }
                    v
                })
            })
            .collect();
        // The watchdog.
        let deadline = t0 + timeout;
        while !handles.iter().all(|h| h.is_finished()) {
            if Instant::now() >= deadline && !timed_out {
                timed_out = true;
                stop.store(true, Ordering::SeqCst);
            }
            if stop.load(Ordering::SeqCst) {
                kicks.iter().for_each(Kick::kick);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let run = t0.elapsed();
    drop(vcpus);
    Outcome {
        stopped_by: first.into_inner().unwrap(),
        timed_out,
        run,
        report: vm.teardown(),
    }
}

fn ap_creation_matches_the_old_runner(n: u32) {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let Some(h) = host(&format!("ap_creation_on_{n}_vcpus")) else {
        return;
    };
    let t0 = Instant::now();
    let (vm, vcpus) = launched(&h, n, |e| e.scenario);
    let setup = t0.elapsed();
    let out = drive(vm, vcpus, Duration::from_secs(60));
    println!(
        "{n} vCPUs through vmsa-host: setup + launch {} µs, run {} µs",
        setup.as_micros(),
        out.run.as_micros()
    );
    assert!(!out.timed_out, "{out:?}");
    assert_eq!(
        out.stopped_by,
        Some((
            0,
            Ok(VcpuExit::IoOut {
                port: ports::DONE,
                data: 0,
                size: 4
            })
        )),
        "the BSP's DONE stops the VM"
    );
    let events = out.report.events.seen().expect("VMSA-image mode shows ownership");
    let histories = vmsa_core::histories(events);
    assert_eq!(histories.len(), n as usize);
    assert!(!events.iter().any(|e| matches!(e, Event::Leaked { .. })));

    let old = runner::run(&common::vmsa_image(n)).unwrap();
    assert!(old.completed, "{old}");
    assert_eq!(
        histories, old.histories,
        "the same ownership histories as the old runner"
    );

    let t = &out.report.teardown;
    assert_eq!(t.vcpus, n as usize);
    assert_eq!(t.vmsas_leaked, Observed::Seen(0));
    assert_eq!(t.frames_still_allocated, Observed::Seen(0));
    assert_eq!(t.frames_leaked_on_purpose, Observed::Seen(0));
    let guest = out.report.guest.seen().unwrap();
    // n - 1 creates, one destroy, one re-create (with at least two APs).
    let want = if n >= 2 { u64::from(n) + 1 } else { 0 };
    assert_eq!((guest.ap_requests, guest.ap_refused), (want, 0));
    assert!(guest.vmruns >= u64::from(n));
    assert!(out.report.launch_digest.seen().is_none());
    assert_eq!(kvm_fds(), 0, "every KVM fd is closed after teardown");
}

#[test]
fn ap_creation_on_1_vcpu() {
    ap_creation_matches_the_old_runner(1);
}

#[test]
fn ap_creation_on_4_vcpus() {
    ap_creation_matches_the_old_runner(4);
}

#[test]
fn ap_creation_on_64_vcpus() {
    ap_creation_matches_the_old_runner(64);
}

#[test]
fn a_kick_ends_a_spinning_vcpus_run() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let Some(h) = host("a_kick_ends_a_spinning_vcpus_run") else {
        return;
    };
    let (vm, vcpus) = launched(&h, 2, |e| e.spin);
    let t0 = Instant::now();
    let out = drive(vm, vcpus, Duration::from_millis(200));
    assert!(out.timed_out);
    assert_eq!(out.stopped_by, None, "nothing but the watchdog stopped it");
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(out.report.teardown.frames_still_allocated, Observed::Seen(0));
}

fn refusal(e: VmError) -> vmsa_host::Refusal {
    *e.refusal().unwrap_or_else(|| panic!("not a refusal: {e}"))
}

#[test]
fn kvms_rules_are_refused_through_the_interface() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let Some(h) = host("kvms_rules_are_refused_through_the_interface") else {
        return;
    };
    assert!(h.capabilities().ownership_visible);
    assert!(!h.capabilities().launch_digest_visible);
    // SEV-ES: refused at creation, with the reason.
    let e = h
        .create_vm(VmSpec {
            kind: VmKind::SevEs,
            vmsa_features: 0,
        })
        .unwrap_err();
    assert!(
        matches!(
            e,
            HypervisorError::Unsupported {
                kind: VmKind::SevEs,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("SNP AP-creation protocol"), "{e}");

    let mut vm = h.create_vm(SPEC).unwrap();
    vm.add_memory(MemoryRegion {
        slot: 0,
        gpa: Gpa(0),
        size: 4 << 20,
        guest_memfd: true,
    })
    .unwrap();
    let mut v = vm.create_vcpu(0).unwrap();
    let page = vec![0u8; 4096];
    let update = LaunchUpdate {
        gpa: Gpa(0x8000),
        len: 4096,
        page_type: SnpPageType::Normal,
        data: Some(&page),
    };
    // snp_launch_update / snp_launch_finish: no SNP context before launch start.
    let r = refusal(vm.launch_update(update).unwrap_err());
    assert_eq!((r.call, r.errno), ("KVM_SEV_SNP_LAUNCH_UPDATE", Errno::EINVAL));
    assert!(r.rule.contains("snp_launch_update"), "{r}");
    let r = refusal(vm.launch_finish().unwrap_err());
    assert_eq!((r.call, r.errno), ("KVM_SEV_SNP_LAUNCH_FINISH", Errno::EINVAL));
    // sev_mem_enc_ioctl: an SNP VM refuses LAUNCH_UPDATE_VMSA (id 4 < 100).
    let r = refusal(vm.launch_update_vmsas().unwrap_err());
    assert_eq!((r.call, r.errno), ("KVM_SEV_LAUNCH_UPDATE_VMSA", Errno::EPERM));
    assert!(r.rule.contains("sev_mem_enc_ioctl"), "{r}");
    // A default VM has no private memory.
    let r = refusal(
        vm.set_memory_attributes(vmsa_host::Conversion {
            gpa: Gpa(0),
            size: 4096,
            private: true,
        })
        .unwrap_err(),
    );
    assert_eq!(r.errno, Errno::ENOTTY);
    // kvm_vm_ioctl_create_vcpu: a taken id is KVM's refusal (EEXIST), not a host failure.
    let r = refusal(vm.create_vcpu(0).unwrap_err());
    assert_eq!((r.call, r.errno), ("KVM_CREATE_VCPU", Errno::EEXIST));
    assert!(r.rule.contains("kvm_vm_ioctl_create_vcpu"), "{r}");
    // ... and so is an id beyond KVM_MAX_VCPU_IDS (EINVAL).
    let r = refusal(vm.create_vcpu(u32::MAX).unwrap_err());
    assert_eq!((r.call, r.errno), ("KVM_CREATE_VCPU", Errno::EINVAL));

    v.set_state(&layout::long_mode_image(0x8000)).unwrap();
    vm.launch_start(SNP_POLICY_RSVD_MBO).unwrap();
    // snp_launch_start: the SNP context exists already.
    let r = refusal(vm.launch_start(SNP_POLICY_RSVD_MBO).unwrap_err());
    assert_eq!((r.call, r.errno), ("KVM_SEV_SNP_LAUNCH_START", Errno::EINVAL));
    // snp_launch_update: VMSA pages are not userspace's to add.
    let r = refusal(
        vm.launch_update(LaunchUpdate {
            page_type: SnpPageType::Vmsa,
            ..update
        })
        .unwrap_err(),
    );
    assert_eq!(r.errno, Errno::EINVAL);
    vm.launch_update(update).unwrap();
    vm.launch_finish().unwrap();
    // kvm_arch_vcpu_ioctl_set_regs: protected guest state cannot be written.
    let e = v.set_state(&layout::long_mode_image(0x8000)).unwrap_err();
    let VcpuError::Refused { vcpu: 0, refusal: r } = e else {
        panic!("not a refusal: {e}");
    };
    assert_eq!((r.call, r.errno), ("KVM_SET_REGS", Errno::EINVAL));
    assert!(r.rule.contains("kvm_arch_vcpu_ioctl_set_regs"), "{r}");
    // A second launch finish (sev_es_sync_vmsa of a protected vCPU).
    assert_eq!(refusal(vm.launch_finish().unwrap_err()).errno, Errno::EINVAL);
    drop(v);
    let report = vm.teardown();
    assert_eq!(report.teardown.frames_still_allocated, Observed::Seen(0));
    assert_eq!(kvm_fds(), 0);
}

#[test]
fn kvm_host_picks_the_mode_the_probe_allows_and_says_why() {
    let probe = backend_kvm::probe();
    let Ok(h) = backend_kvm::KvmHost::from_probe(&probe) else {
        eprintln!("skipped: neither mode runs here");
        return;
    };
    if probe.supports(backend_kvm::Mode::Snp) {
        assert_eq!(h.mode(), backend_kvm::Mode::Snp);
        assert!(!h.capabilities().ownership_visible);
    } else {
        assert_eq!(h.mode(), backend_kvm::Mode::VmsaImage);
        assert_eq!(h.name(), "kvm VMSA-image");
        assert!(h.reason().contains("SEV-SNP is not available"), "{}", h.reason());
        assert!(h.capabilities().ownership_visible);
    }
    assert!(!h.capabilities().launch_digest_visible);
}
