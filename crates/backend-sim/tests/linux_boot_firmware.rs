//! `builtin:linux-boot` over a launch that measured pages where the bounce buffer used to go
//! (the top of low RAM): an OVMF's SEV metadata sections, the secrets and CPUID pages last.
//! The guest must neither rescind them at 2 MiB (their RMP entries are 4 KiB: the launch
//! assigned them one by one) nor make them shared, as Linux never does.

use std::sync::Arc;

use backend_sim::guest::{GuestScript, LinuxBootLayout};
use backend_sim::host::run_script;
use backend_sim::{Machine, MachineConfig};
use vmsa_core::{
    EventLog, Gfn, Gpa, PAGE_SIZE, Platform, SNP_POLICY_RSVD_MBO, SnpPageType, VcpuId, Vm, VmConfig, VmKind,
};

const MIB: u64 = 1 << 20;

fn boot_over_measured_sections(large: bool) {
    let (vcpus, memory) = (4u32, 32 * MIB);
    // 13 measured pages, then the secrets and CPUID pages: 24 MiB up, inside [16M, 32M), where
    // the 16 MiB bounce buffer of a 32 MiB guest used to go.
    let base = 24 * MIB;
    let (secrets, cpuid, end) = (base + 0xd000, base + 0xe000, base + 0xf000);
    let layout = LinuxBootLayout::new(vcpus, vec![(0, memory)], vec![(base, end)]).expect("room below");
    let script = GuestScript::linux_boot(vcpus, &layout, large);

    let m = Machine::new(MachineConfig {
        gmem_2m_folios: large,
        ..MachineConfig::default()
    });
    let p = m.create_guest(VmKind::Snp).unwrap();
    p.add_private_memslot(Gpa(0), memory).unwrap();
    let mut vm = Vm::new(p.clone(), VmConfig::snp(0), Arc::new(EventLog::new()));
    for i in 0..vcpus {
        vm.create_vcpu(VcpuId(i)).unwrap();
    }
    vm.launch_start(SNP_POLICY_RSVD_MBO).unwrap();
    vm.launch_update_data(
        Gpa(base),
        secrets - base,
        SnpPageType::Normal,
        Some(&vec![0xf4; (secrets - base) as usize]),
    )
    .unwrap();
    vm.launch_update_data(Gpa(secrets), PAGE_SIZE, SnpPageType::Secrets, Some(&[0; 4096]))
        .unwrap();
    vm.launch_update_data(Gpa(cpuid), PAGE_SIZE, SnpPageType::Cpuid, Some(&[0; 4096]))
        .unwrap();
    vm.launch_finish([0; 32]).unwrap();

    let r = run_script(&vm, &script);
    let failed: Vec<_> = r.failures().collect();
    assert!(failed.is_empty(), "large {large}: {failed:?}");

    let asid = p.asid().0;
    let census = |a: u64, b: u64| {
        m.guest_census(asid, Gfn(a / PAGE_SIZE), Gfn(b / PAGE_SIZE))
            .unwrap()
    };
    let measured = census(base, end);
    let n = (end - base) / PAGE_SIZE;
    assert_eq!(
        (measured.private, measured.backed, measured.validated),
        (n, n, n),
        "large {large}: the measured pages stay private and validated: {measured:?}"
    );
    let (b0, b1) = layout.bounce;
    assert!(end <= b0 || b1 <= base, "{layout:?}");
    assert_eq!(census(b0, b1).private, 0, "the bounce buffer is shared");
    vm.teardown();
}

#[test]
fn linux_boot_leaves_measured_firmware_pages_private_2m() {
    boot_over_measured_sections(true);
}

#[test]
fn linux_boot_leaves_measured_firmware_pages_private_4k() {
    boot_over_measured_sections(false);
}
