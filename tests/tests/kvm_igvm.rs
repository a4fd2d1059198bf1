//! An IGVM file on real KVM (VMSA-image mode), end to end through the VMM's library entry points
//! (what `vmm igvm`, `vmm measure` and `vmm run` call): `vmm igvm --guest builtin:NAME` writes
//! backend-kvm's AP-creation program as an IGVM file; `vmm run --backend kvm --igvm` launches it
//! in the supplied-VMSA mode with 1 and 4 vCPUs. The BSP runs from the file's VP context (its
//! only VMSA is the supplied page, `GuestOwned` from the launch, no host VMSA), the APs have
//! none until the BSP's AP creation names them, and the prediction is `vmm measure --igvm`'s
//! digest whatever the vCPU count; VMSA-image mode itself measures nothing and says so. The same
//! file on the simulator reaches that digest. Wrapped OVMF (Debian's, as the `vmm measure` tests
//! use) is refused in one line, and runs on the simulator.

#![cfg(target_arch = "x86_64")]

use std::path::{Path, PathBuf};

use backend_kvm::guest::layout;
use backend_kvm::{Mode, probe};
use scenario_tests::kvm;
use vmm::measure::LaunchDigest;
use vmm::measure::igvm::IgvmMeasureOptions;
use vmm::run::flow::RunEnd;
use vmm::run::{BackendKind, KvmIgvmError, RunArgs, RunError, RunSummary};
use vmm::wrap::{IgvmArgs, write_igvm};
use vmm_sys_util::tempdir::TempDir;
use vmsa_core::{Gpa, Op, StateKind, VmsaState};

/// A fresh scratch directory for `test`, removed when dropped (also when the test fails).
fn scratch(test: &str) -> TempDir {
    let prefix = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("igvm-scenario-{test}-"));
    TempDir::new_with_prefix(&prefix)
        .unwrap_or_else(|e| panic!("scratch directory {}: {e}", prefix.display()))
}

/// `vmm igvm ARGS -o dir/name` (`--guest` or `--firmware`): the file written.
fn write(dir: &Path, name: &str, guest: Option<&str>, firmware: Option<&str>) -> PathBuf {
    let output = dir.join(name);
    write_igvm(&IgvmArgs {
        firmware: firmware.map(PathBuf::from),
        guest: guest.map(|g| g.parse().unwrap()),
        output: output.clone(),
        vcpus: "1".parse().unwrap(),
        vcpu_type: "EPYC-v4".parse().unwrap(),
        vmm_type: "qemu".parse().unwrap(),
        guest_features: None,
        boot: Default::default(),
        json: false,
    })
    .unwrap_or_else(|e| panic!("vmm igvm: {e}"));
    output
}

/// `vmm measure --igvm FILE`'s digest.
fn measured(path: &Path) -> String {
    let out = vmm::measure::igvm::measure(&vmm::measure::igvm::IgvmArgs {
        path: path.to_path_buf(),
        options: IgvmMeasureOptions::default(),
        ignore_idblock: false,
        json: false,
    })
    .unwrap();
    assert_eq!(out.failure, None);
    LaunchDigest::Snp(out.measurement.digest).hex()
}

/// `vmm run --backend BACKEND --vcpus N --igvm FILE --json`.
fn run(backend: BackendKind, vcpus: u32, igvm: &Path) -> Result<RunSummary, RunError> {
    let (backend, memory) = match backend {
        BackendKind::Kvm => ("kvm", "4M"),
        BackendKind::Sim => ("sim", "1G"),
    };
    let vcpus = vcpus.to_string();
    let igvm = igvm.to_str().expect("a UTF-8 scratch path");
    let args = [
        "--backend",
        backend,
        "--vcpus",
        &vcpus,
        "--memory",
        memory,
        "--igvm",
        igvm,
        "--json",
    ];
    vmm::run::run(&RunArgs::from_args(args).unwrap())
}

/// Whether this test can run VMSA-image mode on /dev/kvm; prints why not when it cannot.
fn image_mode_or_skip(test: &str) -> bool {
    if !kvm::kvm_or_skip(test) {
        return false;
    }
    // The probe opens KVM fds: in turn with the tests that count them.
    let p = {
        let _turn = kvm::turn();
        probe()
    };
    if p.supports(Mode::Snp) {
        // There `vmm run --backend kvm` picks SNP, whose layer refuses supplied VMSAs before any
        // ioctl (a mainline kernel has no KVM_SEV_SNP_PAGE_TYPE_VMSA).
        eprintln!("skipped {test}: this host has SEV-SNP, and the test runs VMSA-image mode");
        return false;
    }
    if !p.supports(Mode::VmsaImage) {
        eprintln!("skipped {test}: VMSA-image mode does not run here");
        return false;
    }
    true
}

/// vCPU `vcpu`'s ownership transitions as (operation, state reached).
fn ops(s: &RunSummary, vcpu: usize) -> Vec<(Op, StateKind)> {
    s.ownership.vcpus[vcpu]
        .history
        .transitions
        .iter()
        .map(|t| (t.op, t.to.kind()))
        .collect()
}

/// The run of `builtin:NAME`'s IGVM file on KVM with `n` vCPUs did what the program does, the
/// BSP from the supplied VMSA and every AP from None.
fn check_kvm_run(s: &RunSummary, n: u32, recreate: bool, expected: &str) {
    use Op::*;
    use StateKind as S;
    assert!(s.ok, "{:?}", s.problems);
    assert_eq!((s.backend, s.mode.as_str()), ("kvm", "VMSA-image"));
    let l = &s.launch;
    assert_eq!(l.vmsas, 1, "one VMSA launched, the BSP's");
    assert_eq!(l.expected_digest.as_deref(), Some(expected));
    // VMSA-image mode has no firmware to measure: no digest, nothing compared, and the report
    // says so.
    assert_eq!((l.digest.as_deref(), l.digest_matches), (None, None));
    let hidden = s.hidden.iter().find(|h| h.what == "launch_digest");
    assert!(
        hidden.is_some_and(|h| h.why.contains("measures nothing")),
        "{:?}",
        s.hidden
    );
    let g = s.guest_run.as_ref().expect("the guest ran");
    assert_eq!(g.end, RunEnd::Done);
    let extra = if recreate && n >= 2 { 2 } else { 0 };
    assert_eq!(
        (g.ap_requests, g.ap_refused, g.failed),
        (u64::from(n) - 1 + extra, 0, 0)
    );
    // One VMSA load per vCPU (AP 1 twice when re-created), the BSP's from the supplied page:
    // a load follows only the entry that applied an AP-creation switch, whatever the
    // scheduling (backend-kvm `KvmImageVcpu::enter`).
    assert_eq!(g.vmruns, u64::from(n) + extra / 2, "{g:#?}");
    // The BSP: GuestOwned at the file's VP context GPA from the launch on, never a host VMSA.
    assert_eq!(s.ownership.vcpus.len(), n as usize);
    let bsp = &s.ownership.vcpus[0].history.transitions;
    assert_eq!(
        bsp[0].from,
        VmsaState::None,
        "the BSP has no VMSA before the launch"
    );
    assert_eq!(bsp[0].op, Supply);
    assert_eq!(bsp[0].to, VmsaState::GuestOwned(Gpa(layout::IGVM_VMSA_GPA)));
    assert_eq!(ops(s, 0), [(Supply, S::GuestOwned), (Free, S::None)]);
    // Each AP: None until the BSP's AP_CREATE names the VMSA it wrote; never a host VMSA.
    for apic in 1..n as usize {
        let h = &s.ownership.vcpus[apic].history.transitions;
        assert_eq!(h[0].from, VmsaState::None, "AP {apic}");
        assert_eq!(
            h[0].to,
            VmsaState::GuestOwned(Gpa(layout::ap_vmsa_gpa(apic as u32))),
            "AP {apic}"
        );
        let want: &[(Op, StateKind)] = if recreate && apic == 1 {
            &[
                (SetGuestVmsa, S::GuestOwned),
                (Destroy, S::None),
                (SetGuestVmsa, S::GuestOwned),
                (Free, S::None),
            ]
        } else {
            &[(SetGuestVmsa, S::GuestOwned), (Free, S::None)]
        };
        assert_eq!(ops(s, apic), want, "AP {apic}");
    }
    for v in &s.ownership.vcpus {
        assert!(
            v.path.iter().all(|k| !matches!(k, S::KvmShared | S::KvmPrivate)),
            "vCPU {}: {:?}",
            v.history.vcpu.0,
            v.path
        );
    }
    assert!(s.ownership.leaks.is_empty() && s.ownership.warnings.is_empty());
    assert_eq!(
        (
            s.teardown.vcpus,
            s.teardown.vmsas_leaked,
            s.teardown.frames_still_allocated
        ),
        (n as usize, 0, 0)
    );
}

#[test]
fn igvm_guest_runs_from_its_vmsa_on_kvm_with_one_digest_for_any_vcpu_count() {
    let dir = scratch("runs");
    let dir = dir.as_path();
    for (name, recreate) in [("boot", false), ("ap-churn", true)] {
        let path = write(
            dir,
            &format!("{name}.igvm"),
            Some(&format!("builtin:{name}")),
            None,
        );
        let expected = measured(&path);
        println!("builtin:{name}: vmm measure --igvm: {expected}");
        // The simulator launches the same file to that digest, with 1 and 4 vCPUs.
        for n in [1, 4] {
            let s = run(BackendKind::Sim, n, &path).unwrap();
            assert!(s.ok, "{:?}", s.problems);
            assert_eq!(
                s.launch.digest.as_deref(),
                Some(expected.as_str()),
                "sim, {n} vCPUs"
            );
            assert_eq!(s.launch.digest_matches, Some(true));
            assert_eq!(
                ops(&s, 0)[0],
                (Op::Supply, StateKind::GuestOwned),
                "sim, {n} vCPUs"
            );
        }
        if !image_mode_or_skip("igvm_guest_runs_from_its_vmsa_on_kvm_with_one_digest_for_any_vcpu_count") {
            continue;
        }
        let _turn = kvm::turn();
        let mut predicted = Vec::new();
        // ap-churn needs an AP to churn: with one vCPU it is refused, as on the simulator.
        let counts = if recreate { [2, 4] } else { [1, 4] };
        if recreate {
            let e = run(BackendKind::Kvm, 1, &path).expect_err("ap-churn with no AP");
            assert_eq!(
                e.to_string(),
                "builtin:ap-churn needs at least 2 vCPUs (got --vcpus 1)"
            );
        }
        for n in counts {
            let s = run(BackendKind::Kvm, n, &path).unwrap_or_else(|e| panic!("{name}, {n} vCPUs: {e}"));
            println!(
                "builtin:{name} on KVM, {n} vCPUs: {:?}, phases {:?}",
                s.guest_run.as_ref().map(|g| &g.end),
                s.phases.iter().map(ToString::to_string).collect::<Vec<_>>()
            );
            check_kvm_run(&s, n, recreate, &expected);
            assert_eq!(kvm::kvm_fds(), 0, "every KVM fd is closed after teardown");
            predicted.push(s.launch.expected_digest.clone());
        }
        assert_eq!(
            predicted[0], predicted[1],
            "the prediction depends on the vCPU count"
        );
    }
}

#[test]
fn wrapped_ovmf_is_refused_by_the_kvm_backend_in_one_line() {
    const OVMF: &str = "/usr/share/ovmf/OVMF.fd";
    if !std::path::Path::new(OVMF).exists() {
        eprintln!(
            "skipped wrapped_ovmf_is_refused_by_the_kvm_backend_in_one_line: {OVMF} is absent (apt-get install ovmf)"
        );
        return;
    }
    let dir = scratch("ovmf");
    let dir = dir.as_path();
    let ovmf = write(dir, "ovmf.igvm", None, Some(OVMF));
    let e = run(BackendKind::Kvm, 1, &ovmf).expect_err("wrapped OVMF is not a kvm guest program");
    assert!(
        matches!(e, RunError::KvmIgvm(KvmIgvmError::NotAGuestProgram { .. })),
        "{e:?}"
    );
    assert_eq!(e.exit_code(), 2);
    let line = vmm::run::error_chain(&e);
    assert_eq!(line.lines().count(), 1, "{line}");
    for part in [
        format!(
            "--igvm {}: the kvm backend runs only its own guest programs",
            ovmf.display()
        ),
        format!("launch digest {}", measured(&ovmf)),
        "its BSP starts in real mode at CS base 0xffff0000 + IP 0xfff0 (CR0 0x10)".to_owned(),
        "launch it with --backend sim".to_owned(),
    ] {
        assert!(line.contains(&part), "{part:?} in {line}");
    }
    // The simulator launches it.
    let s = run(BackendKind::Sim, 1, &ovmf).unwrap();
    assert_eq!(s.launch.digest_matches, Some(true), "{:?}", s.problems);
}
