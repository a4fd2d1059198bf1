//! SHA-384 of 512 distinct pages (a 2 MiB firmware image's worth) on one core: every backend
//! this CPU runs, against `Backend::Sha2` (the `sha2` crate one page at a time) as the baseline
//! measured in the same run.

use criterion::{Criterion, Throughput, black_box};
use sha384_pages::{Backend, DIGEST_SIZE, PAGE_SIZE, Page};

const PAGES: usize = 512;

fn main() {
    // Distinct pages of varied bytes (a fixed xorshift sequence).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let pages: Vec<Page> = (0..PAGES)
        .map(|_| {
            let mut p = [0u8; PAGE_SIZE];
            for chunk in p.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            p
        })
        .collect();
    let refs: Vec<&Page> = pages.iter().collect();
    let mut out = vec![[0u8; DIGEST_SIZE]; PAGES];
    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("sha384_pages");
    g.throughput(Throughput::Bytes((PAGES * PAGE_SIZE) as u64));
    for backend in [Backend::Sha2, Backend::Avx2x4, Backend::Avx512x8] {
        if !backend.supported() {
            eprintln!("skipped {backend:?}: this CPU lacks its instructions");
            continue;
        }
        g.bench_function(format!("{backend:?}/{PAGES}_pages"), |b| {
            b.iter(|| {
                backend.hash(black_box(&refs), &mut out);
                black_box(&out);
            })
        });
    }
    g.finish();
    c.final_summary();
}
