//! VMSA-image mode through vmsa-host's traits on real /dev/kvm: KVM's refusals, and the mode
//! KvmHost picks. (Guests run through the VMM's flow in the scenario tests, tests/tests/kvm_*.rs.)
//! Every test that opens KVM takes its turn ([`TURN`]): one counts the process's KVM fds.

use std::sync::Mutex;

use backend_kvm::guest::layout;
use backend_kvm::host::KvmImageHost;
use vmsa_core::{Gpa, SNP_POLICY_RSVD_MBO, SnpPageType, VmKind};
use vmsa_host::{
    Errno, Hypervisor, HypervisorError, LaunchUpdate, MemoryRegion, Observed, Vcpu, VcpuError, Vm, VmError,
    VmSpec,
};

static TURN: Mutex<()> = Mutex::new(());

fn host(test: &str) -> Option<KvmImageHost> {
    if !backend_kvm::testing::kvm_or_skip(test) {
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

const SPEC: VmSpec = VmSpec::snp(0);

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
    let e = h.create_vm(VmSpec::sev_es(0)).unwrap_err();
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
    vm.add_memory(MemoryRegion::ram(4 << 20)).unwrap();
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
    assert_eq!(backend_kvm::testing::kvm_fds(), 0);
}

#[test]
fn kvm_host_picks_the_mode_the_probe_allows_and_says_why() {
    // The probe and the host open KVM fds, which the other test counts.
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    check_mode();
    // The host's CPUID helper thread may still hold its /dev/kvm fd: wait for it to close
    // before another test counts fds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while backend_kvm::testing::kvm_fds() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "KVM fds still open 10 s after the host was dropped"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn check_mode() {
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
