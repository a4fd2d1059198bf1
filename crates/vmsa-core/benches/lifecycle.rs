//! What vmsa-core's own bookkeeping costs per VMSA ownership transition, on the do-nothing
//! `BarePlatform` (so no platform work hides it), beside the one thing a transition must do
//! that is not bookkeeping: the 4 KiB copy of the register image into the VMSA at launch.
//! Each routine is also run once under a counting allocator, and its allocation count
//! printed: transitions allocate nothing (`tests/no_alloc.rs` asserts it).

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use vmsa_core::testing::BarePlatform;
use vmsa_core::{ApCreationRequest, SNP_POLICY_RSVD_MBO, SevEsSaveArea, VcpuId, Vm, VmConfig, layout};
use zerocopy::IntoBytes;

#[global_allocator]
static ALLOC: counting_alloc::Counting = counting_alloc::Counting;

/// vCPUs per VM in the per-vCPU rows: enough that per-VM costs (creating the VM, the
/// firmware's launch start and finish) divide out.
const VCPUS: u32 = 64;

fn created() -> Vm<BarePlatform> {
    let mut vm = Vm::without_events(BarePlatform::default(), VmConfig::snp(0));
    for id in 0..VCPUS {
        vm.create_vcpu(VcpuId(id)).unwrap();
    }
    vm.launch_start(SNP_POLICY_RSVD_MBO).unwrap();
    vm
}

fn launched() -> Vm<BarePlatform> {
    let mut vm = created();
    vm.launch_finish([0; 32]).unwrap();
    vm
}

fn request(request: u32, gpa: u64) -> ApCreationRequest {
    ApCreationRequest::new(VcpuId(0), request, 1, gpa, Some(layout::SEV_FEAT_SNP_ACTIVE))
}

/// AP_CREATE then AP_DESTROY of vCPU 1, each applied at its next entry: two transitions
/// (`None` → `GuestOwned`, `GuestOwned` → `None`), two request checks, two entries.
fn ap_cycle(vm: &Vm<BarePlatform>) {
    vm.ap_creation(&request(1, 0x20_1000)).unwrap();
    black_box(vm.prepare_entry(VcpuId(1)).unwrap());
    vm.ap_creation(&request(2, 0)).unwrap();
    black_box(vm.prepare_entry(VcpuId(1)).unwrap());
}

fn print_allocations() {
    let mut vm = created();
    let ((), launch) = counting_alloc::counted(|| vm.launch_finish([0; 32]).unwrap());
    let ((), ap) = counting_alloc::counted(|| ap_cycle(&vm));
    let (_, teardown) = counting_alloc::counted(|| vm.teardown());
    eprintln!(
        "heap allocations: launch of {VCPUS} VMSAs {launch}, AP create+destroy {ap}, teardown of {VCPUS} vCPUs {teardown}"
    );
}

fn transitions(c: &mut Criterion) {
    print_allocations();
    let mut g = c.benchmark_group("vmsa_transitions");
    g.throughput(Throughput::Elements(u64::from(VCPUS)));
    // The baseline: what the launch must do per vCPU that is not bookkeeping, copying a
    // register image (freshly made, as the launch's are) into a page.
    g.bench_function("baseline_4k_copy_per_vcpu", |b| {
        let mut page = SevEsSaveArea::boxed();
        b.iter_batched(
            || (0..VCPUS).map(|_| SevEsSaveArea::boxed()).collect::<Vec<_>>(),
            |images| {
                for regs in &images {
                    page.as_mut_bytes().copy_from_slice(regs.as_bytes());
                    black_box(&*page);
                }
                images
            },
            BatchSize::LargeInput,
        )
    });
    // Per vCPU: sync (the 4 KiB copy), KvmShared -> KvmPrivate, SNP_LAUNCH_UPDATE.
    g.bench_function("launch_per_vcpu", |b| {
        b.iter_batched(
            created,
            |mut vm| {
                vm.launch_finish([0; 32]).unwrap();
                vm
            },
            BatchSize::LargeInput,
        )
    });
    // Per vCPU: KvmPrivate -> None (make shared, flush, free, VMCB cleared).
    g.bench_function("free_per_vcpu", |b| {
        b.iter_batched(
            launched,
            |mut vm| {
                black_box(vm.teardown());
                vm
            },
            BatchSize::LargeInput,
        )
    });
    g.throughput(Throughput::Elements(2));
    g.bench_function("ap_create_destroy_per_transition", |b| {
        let vm = launched();
        ap_cycle(&vm);
        b.iter(|| ap_cycle(&vm))
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("resolve_vmsa_pa", |b| {
        let vm = launched();
        b.iter(|| black_box(vm.resolve_vmsa_pa(black_box(VcpuId(7))).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, transitions);
criterion_main!(benches);
