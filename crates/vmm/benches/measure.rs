//! `vmm measure`'s digest in this process (no process start, no file read): the launch plan
//! of Debian's OVMF image built and measured, against SHA-384 of the image's pages on one
//! core with the `sha2` crate (`floor/sha2_pages`, the baseline: what hashing the firmware
//! costs without deduplication, threads or multi-page vector passes).
//!
//! `measure_peer` compares whole processes with sev-snp-measure; this bench shows what is left
//! of a run once the process and the file read are taken away.

use std::path::Path;

use criterion::{Criterion, black_box};
use sha2::{Digest, Sha384};
use vmm::measure::ovmf::Ovmf;
use vmm::measure::vcpu_types::VcpuType;
use vmm::measure::vmm_types::VmmType;
use vmm::measure::{LaunchPlan, PlanConfig, VcpuCount};
use vmsa_core::VmKind;

const FIRMWARE: &str = "/usr/share/ovmf/OVMF.fd";

fn main() {
    if !Path::new(FIRMWARE).exists() {
        eprintln!("skipped: {FIRMWARE} is missing (apt-get install ovmf)");
        return;
    }
    let image = std::fs::read(FIRMWARE).expect("the firmware is readable");
    let ovmf = Ovmf::parse(image).expect("Debian's OVMF has SEV metadata");
    // The model the peer bench uses.
    let sig = "EPYC-v4".parse::<VcpuType>().expect("a known model").signature();
    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("measure");
    g.bench_function("floor/sha2_pages", |b| {
        b.iter(|| {
            for page in ovmf.data().chunks(4096) {
                black_box(Sha384::digest(page));
            }
        })
    });
    for (kind, vcpus) in [
        (VmKind::Snp, 1),
        (VmKind::Snp, 64),
        (VmKind::Snp, 512),
        (VmKind::SevEs, 1),
        (VmKind::SevEs, 512),
    ] {
        let config = PlanConfig {
            kind,
            vcpus: VcpuCount::new(vcpus).expect("a valid count"),
            vcpu_sig: sig,
            vmm_type: VmmType::Qemu,
            guest_features: if kind == VmKind::Snp { 1 } else { 0 },
        };
        let name = match kind {
            VmKind::Snp => format!("snp/{vcpus}_vcpus"),
            VmKind::SevEs => format!("sev_es/{vcpus}_vcpus"),
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                let plan = LaunchPlan::build(&ovmf, &config, None).expect("the plan builds");
                black_box(plan.measure())
            })
        });
    }
    g.finish();
    c.final_summary();
}
