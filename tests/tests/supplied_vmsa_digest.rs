//! The supplied-VMSA launch mode (the "Streamline VMSA setting" series' 4/4, "kvm: svm: Support
//! KVM_SEV_SNP_PAGE_TYPE_VMSA at SNP_LAUNCH_UPDATE") on the simulator, through the VMM's one
//! flow: the same guest launched with 1, 4, 64 and 255 vCPUs has one launch digest, because
//! the digest holds the one VMSA page the VMM supplied for the BSP and no per-vCPU VMSA;
//! launched the classic way (KVM measuring one VMSA per vCPU at launch finish) its digest
//! changes with the count.

use std::time::Duration;

use backend_sim::host::SimHost;
use backend_sim::{GuestScript, Machine, MachineConfig};
use scenario_tests::{FIRMWARE_GPA, FIRMWARE_PAGES};
use vmm::run::flow::{self, Launch, RunEnd};
use vmm::run::progress::Progress;
use vmsa_core::{Gpa, SNP_POLICY_RSVD_MBO, layout::SEV_FEAT_SNP_ACTIVE};

/// Where the BSP's VMSA is supplied: below the stand-in firmware's 1 MiB, not 2 MiB aligned.
const SUPPLIED_GPA: Gpa = Gpa(0xf_f000);

/// The launch digest of the stand-in firmware guest with `vcpus` vCPUs, supplied or classic.
fn digest(vcpus: u32, supplied: bool) -> String {
    let machine = Machine::new(MachineConfig::default());
    let host = SimHost::new(machine, GuestScript::default());
    let firmware = vec![0xf4u8; (FIRMWARE_PAGES * vmsa_core::PAGE_SIZE) as usize];
    let vmsas: Vec<_> = (0..vcpus)
        .map(|_| {
            vmm::measure::reset::reset_vmsa(
                vmm::measure::reset::BSP_EIP,
                SEV_FEAT_SNP_ACTIVE,
                vmm::measure::vcpu_types::VcpuType::lookup("EPYC-v4")
                    .expect("a known vCPU type")
                    .signature(),
                vmm::measure::vmm_types::VmmType::Qemu,
            )
        })
        .collect();
    let launch = Launch::snp_image(4 << 20, SNP_POLICY_RSVD_MBO, Gpa(FIRMWARE_GPA), &firmware, &vmsas);
    let launch = if supplied {
        launch.with_supplied_vmsa(SUPPLIED_GPA)
    } else {
        launch
    };
    let report = flow::run(
        &host,
        &launch,
        Duration::from_secs(60),
        &Progress::hidden(),
        &mut |_| {},
    )
    .expect("the simulator creates the VM");
    assert!(report.launch_error.is_none(), "{:?}", report.launch_error);
    assert_eq!(report.run.map(|r| r.end), Some(RunEnd::Done));
    let t = &report.host.teardown;
    assert_eq!(t.vmsas_leaked.seen().copied(), Some(0));
    assert_eq!(t.frames_still_allocated.seen().copied(), Some(0));
    report
        .host
        .launch_digest
        .seen()
        .cloned()
        .flatten()
        .expect("the simulator reports the launch digest")
}

#[test]
fn supplied_vmsa_launch_digest_does_not_depend_on_the_vcpu_count() {
    let counts = [1, 4, 64, 255];
    let supplied: Vec<_> = counts.iter().map(|&n| digest(n, true)).collect();
    for (n, d) in counts.iter().zip(&supplied) {
        println!("supplied VMSA, {n:>3} vCPUs: {d}");
    }
    assert!(
        supplied.iter().all(|d| d == &supplied[0]),
        "one digest for every vCPU count: {supplied:?}"
    );
    let classic: Vec<_> = counts.iter().map(|&n| digest(n, false)).collect();
    for (n, d) in counts.iter().zip(&classic) {
        println!("classic,       {n:>3} vCPUs: {d}");
    }
    for (i, a) in classic.iter().enumerate() {
        for b in &classic[i + 1..] {
            assert_ne!(a, b, "the classic digest changes with the vCPU count");
        }
    }
    // One supplied VMSA measured at its GPA is not the classic 1-vCPU launch (whose VMSA is
    // measured at INITIAL_VMSA_GPA at launch finish, after the image).
    assert_ne!(supplied[0], classic[0]);
}
