//! Every VMSA ownership transition runs without a heap allocation: only creating a VM or a
//! vCPU record allocates (the record and its 4 KiB register image), as KVM allocates its vCPU
//! structures once. Counted with a global counting allocator on the do-nothing
//! `BarePlatform`, events dropped (a sink that stores events allocates for itself).

#[path = "../benches/support/counting_alloc.rs"]
mod counting_alloc;

use counting_alloc::counted;
use vmsa_core::testing::BarePlatform;
use vmsa_core::{ApCreationRequest, Entry, SNP_POLICY_RSVD_MBO, StateKind, VcpuId, Vm, VmConfig, layout};

#[global_allocator]
static ALLOC: counting_alloc::Counting = counting_alloc::Counting;

const VCPUS: u32 = 8;

fn request(request: u32, target: u32, gpa: u64) -> ApCreationRequest {
    ApCreationRequest::new(VcpuId(0), request, target, gpa, Some(layout::SEV_FEAT_SNP_ACTIVE))
}

fn launched_vm() -> Vm<BarePlatform> {
    let mut vm = Vm::without_events(BarePlatform::default(), VmConfig::snp(0));
    for id in 0..VCPUS {
        vm.create_vcpu(VcpuId(id)).unwrap();
    }
    vm.launch_start(SNP_POLICY_RSVD_MBO).unwrap();
    vm.launch_finish([0; 32]).unwrap();
    vm
}

#[test]
fn launch_transitions_allocate_nothing() {
    let mut vm = Vm::without_events(BarePlatform::default(), VmConfig::snp(0));
    for id in 0..VCPUS {
        vm.create_vcpu(VcpuId(id)).unwrap();
    }
    let ((), n) = counted(|| vm.launch_start(SNP_POLICY_RSVD_MBO).unwrap());
    assert_eq!(n, 0, "launch start allocated");
    // Per vCPU: sync (the 4 KiB register image into the page), KvmShared -> KvmPrivate,
    // SNP_LAUNCH_UPDATE.
    let ((), n) = counted(|| vm.launch_finish([0; 32]).unwrap());
    assert_eq!(n, 0, "launch finish of {VCPUS} VMSAs allocated {n} times");
    assert!(
        vm.vcpus()
            .iter()
            .all(|v| v.state.kind() == StateKind::KvmPrivate && v.protected)
    );
}

#[test]
fn guest_owned_transitions_allocate_nothing() {
    let vm = launched_vm();
    let target = 1;
    let gpa = 0x10_0000 + 0x1000;
    let (pa, n) = counted(|| {
        // AP_CREATE: KvmPrivate -> None (free) -> GuestOwned(gpa), applied at entry.
        vm.ap_creation(&request(1, target, gpa)).unwrap();
        let created = vm.prepare_entry(VcpuId(target)).unwrap();
        // AP_DESTROY: GuestOwned -> None.
        vm.ap_creation(&request(2, target, 0)).unwrap();
        let destroyed = vm.prepare_entry(VcpuId(target)).unwrap();
        // AP_CREATE again from None, and resolving the VMCB's address.
        vm.ap_creation(&request(1, target, gpa)).unwrap();
        vm.prepare_entry(VcpuId(target)).unwrap();
        (created, destroyed, vm.resolve_vmsa_pa(VcpuId(target)).unwrap())
    });
    assert_eq!(n, 0, "AP creation transitions allocated {n} times");
    assert!(matches!(pa.0, Entry::Run(_)), "{:?}", pa.0);
    assert!(matches!(pa.1, Entry::Blocked(_)), "{:?}", pa.1);
    assert_eq!(pa.2.map(|hpa| hpa.0 >> 12), Some(0x4000_0000 + (gpa >> 12)));
    assert_eq!(
        vm.vcpu(VcpuId(target)).unwrap().state.kind(),
        StateKind::GuestOwned
    );
}

#[test]
fn free_transitions_allocate_nothing() {
    let mut vm = launched_vm();
    let (info, n) = counted(|| vm.free_vcpu_vmsa(VcpuId(VCPUS - 1)).unwrap());
    assert_eq!(n, 0, "freeing one private VMSA allocated {n} times");
    assert_eq!(info.state.kind(), StateKind::None);
    let (report, n) = counted(|| vm.teardown());
    assert_eq!(n, 0, "tearing down {VCPUS} vCPUs allocated {n} times");
    assert_eq!((report.vcpus, report.leaked), (VCPUS as usize, 0));
    assert_eq!(vm.platform().freed(), vm.platform().allocated());
}
