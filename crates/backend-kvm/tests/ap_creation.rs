//! The guest-driven AP-creation scenario on real KVM (VMSA-image mode): the BSP writes a
//! VMSA for every AP into its guest_memfd memory, asks for AP_CREATE through the GHCB
//! doorbell, waits for every AP's mailbox report, then destroys AP 1 and creates it again.

mod common;

use backend_kvm::runner::{self, GuestProgram, RunConfig, RunReport};
use backend_kvm::{Mode, probe};
use vmsa_core::{Gpa, Op, StateKind};

fn ops(r: &RunReport, vcpu: usize) -> Vec<(Op, StateKind)> {
    r.histories[vcpu]
        .transitions
        .iter()
        .map(|t| (t.op, t.to.kind()))
        .collect()
}

fn check_scenario(r: &RunReport, n: u32) {
    assert!(r.completed, "{r}");
    assert!(!r.timed_out);
    assert_eq!(r.mode, Mode::VmsaImage);
    assert_eq!(r.guest_sev_features, 1, "SEV_STATUS >> 2 = SNP_ACTIVE");
    // Each AP ran from the VMSA the guest wrote: RDI (APIC ID) and RSI (generation) came
    // from that page and ended up in its mailbox.
    for apic in 2..n {
        assert_eq!(
            r.mailboxes[apic as usize],
            (1 << 32) | u64::from(apic),
            "AP {apic}"
        );
    }
    assert_eq!(r.mailboxes[1], (2 << 32) | 1, "AP 1 re-created with generation 2");
    // Ownership: BSP keeps its launched host VMSA; every AP moves from its host VMSA to
    // the guest page at 0x200000 + apic * 4096; AP 1 is destroyed and re-created.
    use Op::*;
    use StateKind as S;
    assert_eq!(
        ops(r, 0),
        vec![
            (Alloc, S::KvmShared),
            (MakePrivate, S::KvmPrivate),
            (Free, S::None)
        ]
    );
    assert_eq!(
        ops(r, 1),
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
    for apic in 2..n as usize {
        assert_eq!(
            ops(r, apic),
            vec![
                (Alloc, S::KvmShared),
                (MakePrivate, S::KvmPrivate),
                (SetGuestVmsa, S::None),
                (SetGuestVmsa, S::GuestOwned),
                (Free, S::None),
            ],
            "AP {apic}"
        );
        let owned = &r.histories[apic].transitions[3].to;
        assert_eq!(
            *owned,
            vmsa_core::VmsaState::GuestOwned(Gpa(0x20_0000 + apic as u64 * 0x1000))
        );
    }
    // n - 1 creates, one destroy, one re-create; each AP loaded once (AP 1 twice).
    assert_eq!(r.accepted_requests.len(), n as usize + 1);
    assert_eq!(r.exits.doorbells, u64::from(n) + 1);
    assert_eq!(r.vcpu_records[1].vmsa_loads, 2);
    assert!(r.vcpu_records[2..].iter().all(|v| v.vmsa_loads == 1));
    assert_eq!(r.vcpu_records[0].done, vec![0]);
    // Teardown released everything vmsa-core allocated.
    assert_eq!(r.teardown.vcpus, n as usize);
    assert_eq!(r.teardown.leaked, 0);
    assert_eq!(r.teardown.host_pages_live, 0);
    assert_eq!(r.platform.pages_allocated, r.platform.pages_freed);
}

#[test]
fn four_vcpus_in_automatic_mode() {
    if !common::kvm_or_skip("four_vcpus_in_automatic_mode") {
        return;
    }
    let host = probe();
    if host.supports(Mode::Snp) {
        eprintln!("skipped: this host has SNP, so automatic mode would not use VMSA-image mode");
        return;
    }
    let r = runner::run_with_probe(&RunConfig::ap_creation(4), &host).unwrap();
    println!("{r}");
    check_scenario(&r, 4);
    assert!(
        r.mode_reason.contains("SEV-SNP is not available") && r.mode_reason.contains("VMSA-image"),
        "{}",
        r.mode_reason
    );
    assert_eq!(r.snp_missing, host.missing(Mode::Snp));
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["mode"], "VmsaImage");
    assert_eq!(
        json["histories"][1]["transitions"][3]["to"]["state"],
        "GuestOwned"
    );
}

#[test]
fn sixty_four_vcpus() {
    if !common::kvm_or_skip("sixty_four_vcpus") {
        return;
    }
    let cfg = common::vmsa_image(64);
    let r = runner::run(&cfg).unwrap();
    println!("{r}");
    check_scenario(&r, 64);
}

#[test]
fn without_recreation_ap_1_reports_once() {
    if !common::kvm_or_skip("without_recreation_ap_1_reports_once") {
        return;
    }
    let cfg = RunConfig {
        guest: GuestProgram::ApCreation { recreate: false },
        ..common::vmsa_image(3)
    };
    let r = runner::run(&cfg).unwrap();
    assert!(r.completed, "{r}");
    assert_eq!(r.mailboxes[1..], [(1 << 32) | 1, (1 << 32) | 2]);
    assert_eq!(r.accepted_requests.len(), 2);
    assert!(!ops(&r, 1).iter().any(|(op, _)| *op == Op::Destroy));
}

#[test]
fn a_single_vcpu_runs_the_bsp_alone() {
    if !common::kvm_or_skip("a_single_vcpu_runs_the_bsp_alone") {
        return;
    }
    let cfg = common::vmsa_image(1);
    let r = runner::run(&cfg).unwrap();
    assert!(r.completed, "{r}");
    assert_eq!(r.exits.doorbells, 0);
    assert_eq!(r.teardown.host_pages_live, 0);
}

#[test]
fn bad_configurations_are_refused_before_any_vm_exists() {
    let too_small = RunConfig {
        memory: 1 << 20,
        ..common::vmsa_image(4)
    };
    let host = probe();
    if !host.supports(Mode::VmsaImage) {
        eprintln!("skipped: VMSA-image mode is not available here");
        return;
    }
    let e = runner::run_with_probe(&too_small, &host).unwrap_err();
    assert!(
        matches!(e, runner::RunError::Config { value: 0x10_0000, .. }),
        "{e}"
    );
    let zero = RunConfig {
        vcpus: 0,
        ..too_small.clone()
    };
    assert!(matches!(
        runner::run_with_probe(&zero, &host),
        Err(runner::RunError::Config { value: 0, .. })
    ));
}

#[test]
fn a_vcpu_stuck_in_kvm_run_is_ended_by_the_watchdog() {
    if !common::kvm_or_skip("a_vcpu_stuck_in_kvm_run_is_ended_by_the_watchdog") {
        return;
    }
    let cfg = RunConfig {
        guest: GuestProgram::Spin,
        timeout: std::time::Duration::from_millis(300),
        ..common::vmsa_image(2)
    };
    let t0 = std::time::Instant::now();
    let r = runner::run(&cfg).unwrap();
    assert!(t0.elapsed() < std::time::Duration::from_secs(10));
    assert!(r.timed_out);
    assert!(!r.completed);
    assert!(
        r.vcpu_records[0]
            .errors
            .contains(&backend_kvm::vcpu::VcpuError::TimedOut),
        "{:?}",
        r.vcpu_records[0].errors
    );
    assert!(r.vcpu_records[0].exits.interrupted >= 1, "KVM_RUN returned EINTR");
    assert!(r.vcpu_records[0].done.is_empty());
    assert_eq!(r.teardown.host_pages_live, 0);
}

#[test]
fn builtin_names_map_to_programs() {
    for (name, what) in GuestProgram::BUILTIN {
        assert!(GuestProgram::builtin(name).is_some(), "{name}: {what}");
    }
    assert_eq!(
        GuestProgram::builtin("ap-creation"),
        Some(GuestProgram::ApCreation { recreate: true })
    );
    assert_eq!(GuestProgram::builtin("nope"), None);
}
