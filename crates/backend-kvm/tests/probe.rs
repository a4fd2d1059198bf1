//! The probe on the real host, and SNP mode's refusal where the probe says no.

use std::fs::File;
use std::os::fd::FromRawFd;

use backend_kvm::gmem::RamBacking;
use backend_kvm::host::{HostError, KvmSnpHost};
use backend_kvm::probe::{Missing, Probed};
use backend_kvm::{Mode, probe};
use kvm_ioctls::Kvm;
use vmsa_host::HypervisorError;

/// Whether the host CPU advertises SVM (no SVM, no SEV of any kind).
fn host_has_svm() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "svm"))
        })
        .unwrap_or(false)
}

#[test]
fn the_probe_reports_what_this_host_has() {
    if !backend_kvm::testing::kvm_or_skip("the_probe_reports_what_this_host_has") {
        return;
    }
    let r = probe();
    println!("{r}");
    assert_eq!(r.api_version, Probed::Ok { value: 12 });
    // The report agrees with the device nodes as the file system shows them.
    let sev_present = std::path::Path::new("/dev/sev").exists();
    assert_eq!(matches!(r.sev_device, Probed::Ok { .. }), sev_present);
    // The control attribute proves the system-fd device-attribute ioctl works at all.
    assert!(
        matches!(r.xcomp_guest_supp, Probed::Ok { .. }),
        "{:?}",
        r.xcomp_guest_supp
    );
    // Consistency of the verdict with the raw facts.
    assert_eq!(
        r.supports(Mode::Snp),
        r.caps
            .is_some_and(|c| c.vm_types >= 0 && c.vm_types & (1 << 4) != 0)
            && r.missing(Mode::Snp).is_empty()
    );
    assert!(r.supports(Mode::VmsaImage), "{:?}", r.missing(Mode::VmsaImage));
    assert_eq!(
        r.best_mode(),
        Some(if r.supports(Mode::Snp) {
            Mode::Snp
        } else {
            Mode::VmsaImage
        })
    );

    // /dev/kvm opened (the test skips otherwise): its capabilities were read.
    let caps = r.caps.expect("capabilities read from an open /dev/kvm");
    if !host_has_svm() {
        // A host without SVM: no SEV of any kind, so the exact answer is known.
        assert_eq!(caps.vm_types, 1, "only KVM_X86_DEFAULT_VM");
        assert!(!r.supports(Mode::Snp) && !r.supports(Mode::SevEs));
        let snp = r.missing(Mode::Snp);
        assert!(snp.contains(&Missing::VmType {
            vm_type: 4,
            name: "KVM_X86_SNP_VM",
            bitmask: 1
        }));
        assert!(
            snp.iter().any(
                |m| matches!(m, Missing::Device { path: "/dev/sev", errno } if errno.code == libc::ENOENT)
            )
        );
        assert!(
            snp.iter()
                .any(|m| matches!(m, Missing::SevAttribute { errno } if errno.code == libc::ENXIO))
        );
        // Not tried: KVM_CAP_VM_TYPES lacks the type, so KVM_CREATE_VM would fail for certain
        // (it was, at ~0.25 ms of every run).
        assert_eq!(r.snp_vm_create, Probed::Skipped);
        assert!(!snp.iter().any(|m| matches!(m, Missing::CreateVm { .. })));
        let text = r.to_string();
        assert!(text.contains("KVM_CAP_VM_TYPES = 0x1 (DEFAULT)"), "{text}");
        assert!(text.contains("ENXIO"), "{text}");
        assert!(text.contains("A run uses VMSA-image mode."), "{text}");
    }
    // The RAM a VMSA-image VM gets agrees with what KVM does: a mappable, shared guest_memfd
    // is created where the probe says so, and refused where the probe chose anonymous memory
    // because KVM has no guest_memfd (ENOTTY: the ioctl is not built in).
    let ram = r.image_ram.expect("capabilities read");
    let text = r.to_string();
    assert!(
        text.contains(&format!("VMSA-image: supported, guest RAM in {ram}")),
        "{text}"
    );
    let vm = Kvm::new().unwrap().create_vm().unwrap();
    let created = vm
        .create_guest_memfd(kvm_bindings::kvm_create_guest_memfd {
            size: 1 << 20,
            flags: 3,
            ..Default::default()
        })
        // SAFETY: KVM_CREATE_GUEST_MEMFD returned a new fd that nothing else owns; it is closed.
        .map(|fd| drop(unsafe { File::from_raw_fd(fd) }));
    match ram {
        RamBacking::GuestMemfd => assert!(created.is_ok(), "{created:?}"),
        RamBacking::Anonymous if caps.guest_memfd == 0 => {
            assert_eq!(created.map_err(|e| e.errno()), Err(libc::ENOTTY))
        }
        RamBacking::Anonymous => assert!(created.is_err() || caps.user_memory2 == 0, "{caps:?}"),
    }

    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["api_version"]["value"], 12);
    assert_eq!(json["modes"][0]["mode"], "Snp");
    assert_eq!(json["modes"][2]["mode"], "VmsaImage");
    assert_eq!(json["modes"][2]["supported"], true);
    assert_eq!(json["image_ram"], serde_json::to_value(ram).unwrap());
    if !host_has_svm() {
        assert_eq!(json["sev_vmsa_features"]["errno"]["name"], "ENXIO");
        assert_eq!(json["modes"][0]["missing"][0]["missing"], "vm_type");
        assert_eq!(json["modes"][0]["missing"][0]["bitmask"], 1);
    }
}

#[test]
fn snp_mode_stops_at_the_probe_with_its_reasons() {
    let host = probe();
    if host.supports(Mode::Snp) {
        eprintln!("skipped: this host has SNP; the refusal path does not apply");
        return;
    }
    // The SNP host refuses to exist before any SEV ioctl, with the probe's reasons.
    let err = KvmSnpHost::new(&host).unwrap_err();
    let HypervisorError::Unsupported { reason, .. } = &err else {
        panic!("expected the probe's refusal, got {err}");
    };
    match reason.downcast_ref::<HostError>() {
        Some(HostError::Missing { mode, missing }) => {
            assert_eq!(*mode, Mode::Snp);
            assert_eq!(missing.as_slice(), host.missing(Mode::Snp));
            assert!(!missing.is_empty());
        }
        other => panic!("expected the probe's reasons, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("SEV-SNP mode is not available on this host: "),
        "{text}"
    );
    // The reason is the probe's, with the value seen, never a bare errno from an SEV ioctl.
    for m in host.missing(Mode::Snp) {
        assert!(text.contains(&m.to_string()), "{text}");
    }
}
