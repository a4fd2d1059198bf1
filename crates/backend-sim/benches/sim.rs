//! Wall-time benchmarks of the simulator, each beside a baseline measured in the same run so
//! the ratio (not the absolute time of this machine) is the figure to compare:
//!
//! - `rmpupdate`: one RMPUPDATE (private, then back to shared: two per iteration) through the
//!   machine, against a plain host write of one frame through the same machine (lock, RMP
//!   check, cost ledger).
//! - `vmsa_lifecycle`: one SNP vCPU created, launched, torn down and its guest destroyed on
//!   the simulator, against the same vmsa-core flow on vmsa-core's in-memory `TestPlatform`.
//! - `snp_launch_64vcpu_16g`: an SNP guest with 64 vCPUs and 16 GiB of memory (sparse), a
//!   16-page firmware measured, all VMSAs launched, then torn down; baseline the same flow on
//!   `TestPlatform`. The footprint of the machine after the launch is printed once
//!   (`footprint:` lines) for BENCHMARKS.md.

use std::hint::black_box;
use std::time::Duration;

use backend_sim::{Machine, MachineConfig, RmpState, SimPlatform};
use criterion::{Criterion, criterion_group, criterion_main};
use vmsa_core::testing::TestPlatform;
use vmsa_core::{
    Gfn, Gpa, INITIAL_VMSA_GPA, Platform, SNP_POLICY_RSVD_MBO, SnpPageType, VcpuId, Vm, VmConfig, VmKind,
};

fn quiet() -> MachineConfig {
    MachineConfig {
        trace: false,
        ..MachineConfig::default()
    }
}

fn rmpupdate(c: &mut Criterion) {
    let mut g = c.benchmark_group("rmpupdate");
    let m = Machine::new(quiet());
    let p = m.create_guest(VmKind::Snp).unwrap();
    let page = p.alloc_page().unwrap();
    let pfn = vmsa_core::HostPage::pfn(&page);
    let data = [0x5a; 4096];
    g.bench_function("baseline_host_frame_write", |b| {
        b.iter(|| m.host_write(black_box(pfn), &data).unwrap())
    });
    let private = RmpState {
        gpa: INITIAL_VMSA_GPA,
        assigned: true,
        asid: 1,
        ..RmpState::default()
    };
    g.bench_function("rmpupdate_private_then_shared", |b| {
        b.iter(|| {
            m.rmpupdate(black_box(pfn), private).unwrap();
            m.rmpupdate(black_box(pfn), RmpState::default()).unwrap();
        })
    });
    g.finish();
    p.free_page(page);
}

fn sim_lifecycle(m: &std::sync::Arc<Machine>) {
    let p = m.create_guest(VmKind::Snp).unwrap();
    let mut vm = Vm::without_events(p.clone(), VmConfig::snp(0));
    vm.create_vcpu(VcpuId(0)).unwrap();
    vm.launch_start(SNP_POLICY_RSVD_MBO).unwrap();
    vm.launch_finish([0; 32]).unwrap();
    black_box(vm.teardown());
    drop(vm);
    p.destroy().unwrap();
}

fn lifecycle(c: &mut Criterion) {
    let mut g = c.benchmark_group("vmsa_lifecycle");
    g.bench_function("baseline_test_platform", |b| {
        b.iter(|| {
            let mut vm = Vm::without_events(TestPlatform::default(), VmConfig::snp(0));
            vm.create_vcpu(VcpuId(0)).unwrap();
            vm.launch_start(SNP_POLICY_RSVD_MBO).unwrap();
            vm.launch_finish([0; 32]).unwrap();
            black_box(vm.teardown());
        })
    });
    let m = Machine::new(quiet());
    g.bench_function("sim", |b| b.iter(|| sim_lifecycle(&m)));
    g.finish();
}

const VCPUS: u32 = 64;
const MEMORY: u64 = 16 << 30;
const FW_GPA: u64 = 0xffc0_0000 - 0x1_0000;
const FW_PAGES: u64 = 16;

fn launch_vm<P: Platform>(vm: &mut Vm<P>) {
    for i in 0..VCPUS {
        vm.create_vcpu(VcpuId(i)).unwrap();
    }
    vm.launch_start(SNP_POLICY_RSVD_MBO).unwrap();
    let fw = vec![0xf4; (FW_PAGES * 4096) as usize];
    vm.launch_update_data(Gpa(FW_GPA), FW_PAGES * 4096, SnpPageType::Normal, Some(&fw))
        .unwrap();
    vm.launch_finish([0; 32]).unwrap();
}

fn sim_launch(m: &std::sync::Arc<Machine>) -> SimPlatform {
    let p = m.create_guest(VmKind::Snp).unwrap();
    p.add_private_memslot(Gpa(0), MEMORY).unwrap();
    let mut vm = Vm::without_events(p.clone(), VmConfig::snp(0));
    launch_vm(&mut vm);
    black_box(p.launch_digest());
    vm.teardown();
    p
}

fn launch64(c: &mut Criterion) {
    // Footprint after one launch (before teardown), measured once.
    {
        let m = Machine::new(quiet());
        let p = m.create_guest(VmKind::Snp).unwrap();
        p.add_private_memslot(Gpa(0), MEMORY).unwrap();
        let mut vm = Vm::without_events(p.clone(), VmConfig::snp(0));
        launch_vm(&mut vm);
        let f = m.footprint();
        println!(
            "footprint: guest memory {} GiB = {} frames described; {} frames allocated (peak {}), {} backed, {} RMP entries ({} bytes for {} frames), {} bytes of bookkeeping ({:.1} per tracked (allocated) frame), {} bytes with contents, {:.4} bytes per guest frame",
            MEMORY >> 30,
            f.guest_slot_frames,
            f.allocated_frames,
            f.peak_allocated_frames,
            f.backed_frames,
            f.rmp_entries,
            f.rmp_bytes,
            f.rmp_frames,
            f.bookkeeping_bytes,
            f.bookkeeping_per_frame(),
            f.bytes,
            f.bytes as f64 / f.guest_slot_frames.max(1) as f64,
        );
        vm.teardown();
        drop(vm);
        p.destroy().unwrap();
    }
    let mut g = c.benchmark_group("snp_launch_64vcpu_16g");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("baseline_test_platform", |b| {
        b.iter(|| {
            let tp = TestPlatform::default();
            for i in 0..FW_PAGES {
                tp.map_gmem(Gfn((FW_GPA >> 12) + i));
            }
            let mut vm = Vm::without_events(tp, VmConfig::snp(0));
            launch_vm(&mut vm);
            black_box(vm.teardown());
        })
    });
    let m = Machine::new(quiet());
    g.bench_function("sim", |b| {
        b.iter(|| {
            let p = sim_launch(&m);
            p.destroy().unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, rmpupdate, lifecycle, launch64);
criterion_main!(benches);
