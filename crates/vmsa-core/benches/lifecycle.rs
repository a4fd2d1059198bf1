//! The cost of vmsa-core's own bookkeeping for one VMSA's life (alloc → private → free) on the
//! in-memory test platform, against a baseline that only allocates and frees the page through
//! the same platform, so the ratio isolates what the state machine adds.

use criterion::{Criterion, criterion_group, criterion_main};
use vmsa_core::testing::TestPlatform;
use vmsa_core::{HostPage, Platform, SNP_POLICY_RSVD_MBO, VcpuId, Vm, VmConfig};

fn lifecycle(c: &mut Criterion) {
    let mut g = c.benchmark_group("vmsa_lifecycle");
    g.bench_function("baseline_alloc_free_page", |b| {
        let p = TestPlatform::default();
        b.iter(|| {
            let page = p.alloc_page().unwrap();
            std::hint::black_box(page.pfn());
            p.free_page(page);
        })
    });
    g.bench_function("alloc_private_free_snp", |b| {
        b.iter(|| {
            let mut vm = Vm::without_events(TestPlatform::default(), VmConfig::snp(0));
            vm.create_vcpu(VcpuId(0)).unwrap();
            vm.launch_start(SNP_POLICY_RSVD_MBO).unwrap();
            vm.launch_finish([0; 32]).unwrap();
            std::hint::black_box(vm.teardown());
        })
    });
    g.finish();
}

criterion_group!(benches, lifecycle);
criterion_main!(benches);
