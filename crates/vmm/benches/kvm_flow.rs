//! Whole guest runs on real KVM (VMSA-image mode) through the VMM's one flow, as `vmm run
//! --backend kvm` does them: create the VM, add 16 MiB of guest_memfd memory, create every vCPU
//! and set its state, launch (start, one measured image range, finish), run the built-in
//! AP-creation guest (the BSP creates every AP through the GHCB doorbell, destroys and re-creates
//! AP 1) with one thread per vCPU under the flow's watchdog, and tear down.
//!
//! - `kvm_flow/1_vcpu`: the BSP alone (no doorbell): the flow's fixed cost, the baseline;
//! - `kvm_flow/4_vcpus`, `kvm_flow/64_vcpus`: n + 1 doorbells and n + 1 VMSA loads.
//!
//! Skips (printing why) where /dev/kvm is not usable.

#[cfg(target_arch = "x86_64")]
mod kvm {
    use std::time::Duration;

    use backend_kvm::guest::builtin::{GuestImage, GuestProgram};
    use backend_kvm::host::KvmImageHost;
    use criterion::{Criterion, black_box};
    use vmm::run::flow::{self, Launch, RunEnd};
    use vmm::run::progress::Progress;
    use vmsa_core::SNP_POLICY_RSVD_MBO;

    fn launch(image: &GuestImage, vcpus: u32) -> Launch<'_> {
        let memory = GuestProgram::min_memory(vcpus).max(16 << 20);
        Launch::snp_image(memory, SNP_POLICY_RSVD_MBO, image.gpa, &image.bytes, &image.vmsas)
    }

    pub fn bench(c: &mut Criterion, host: &KvmImageHost) {
        let program = GuestProgram::ApCreation { recreate: true };
        let mut g = c.benchmark_group("kvm_flow");
        g.sample_size(10).measurement_time(Duration::from_secs(5));
        for (name, vcpus) in [("1_vcpu", 1), ("4_vcpus", 4), ("64_vcpus", 64)] {
            let image = program.image(vcpus).expect("the built-in guest assembles");
            let launch = launch(&image, vcpus);
            g.bench_function(name, |b| {
                b.iter(|| {
                    let report = flow::run(
                        host,
                        &launch,
                        Duration::from_secs(60),
                        &Progress::hidden(),
                        &mut |_| {},
                    )
                    .expect("KVM creates the VM");
                    let end = &report.run.as_ref().expect("the launch finished").end;
                    assert_eq!(*end, RunEnd::Done);
                    black_box(report)
                })
            });
        }
        g.finish();
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    {
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            eprintln!("skipped: /dev/kvm is not usable here ({e})");
            return;
        }
        let host = match backend_kvm::host::KvmImageHost::new(&backend_kvm::probe(), "the benchmark") {
            Ok(h) => h,
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        };
        let mut c = criterion::Criterion::default().configure_from_args();
        kvm::bench(&mut c, &host);
        c.final_summary();
    }
}
