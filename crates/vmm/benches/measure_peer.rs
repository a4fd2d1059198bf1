//! `vmm measure` against sev-snp-measure, the tool the measurement fixtures come from, on the
//! same inputs in one run: Debian's OVMF image, a fixed vCPU model (EPYC-v4), 1 to 512 vCPUs,
//! SEV-SNP and SEV-ES.
//!
//! For every row the two tools run back to back, alternating, as whole processes (what a user
//! waits for); the table gives the median wall time of each, their ratio, the digest check (every
//! run's output is compared, not just the first), and the hashing floor ([`Floor`]) measured in
//! the same run: one core hashing exactly the bytes the digest cannot avoid hashing, with the
//! `sha2` crate alone and with the fastest hashing this workspace has.
//!
//! Run it with `cargo xtask bench measure` (`--quick` for fewer runs). sev-snp-measure comes
//! from the fixture virtualenv that `cargo xtask fixtures` creates; without it the bench says so
//! and fails.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use backend_sim::measure::page_info;
use sha2::{Digest, Sha256, Sha384};
use sha384_pages::{Backend, sha384_pages};
use vmm::measure::ovmf::Ovmf;
use vmm::measure::vcpu_types::VcpuType;
use vmm::measure::vmm_types::VmmType;
use vmm::measure::{LaunchPlan, PlanConfig, VcpuCount};
use vmsa_core::{Gpa, INITIAL_VMSA_GPA, PAGE_SIZE, PageBuf, SnpPageType, VmKind};

const FIRMWARE: &str = "/usr/share/ovmf/OVMF.fd";
const VCPU_TYPE: &str = "EPYC-v4";
const VCPU_COUNTS: [u32; 5] = [1, 4, 64, 256, 512];

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Run a command to completion; its wall time and the last line of its standard output.
fn timed(cmd: &mut Command) -> Result<(Duration, String), String> {
    let t = Instant::now();
    let out = cmd.output().map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let wall = t.elapsed();
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default().trim().to_owned();
    Ok((wall, last))
}

/// The hashing floor of a launch digest: one core hashing exactly the bytes the digest cannot
/// avoid hashing, timed in this process. SNP: each distinct page once, then one `PAGE_INFO`
/// per measured page; SEV-ES: the one SHA-256 stream, which allows no deduplication. Which
/// pages are duplicates is worked out beforehand, untimed: the floor is the hashing the bytes
/// impose, however a tool finds them.
struct Floor {
    /// With the `sha2` crate alone (AVX2 SHA-512, SHA-NI SHA-256 on the development machine):
    /// the floor the issue states ("SHA-384 of the pages on one core").
    sha2: Duration,
    /// With the fastest hashing this workspace has: `sha384_pages` for the SNP page contents
    /// (several pages per pass in AVX-512 or AVX2 registers), `sha2` for the rest.
    fastest: Duration,
    /// The digest, compared with both tools' (so the floor provably hashes the right bytes).
    digest: String,
}

fn floor(plan: &LaunchPlan) -> Floor {
    match plan.kind() {
        VmKind::Snp => {
            let zero = [0u8; PAGE_SIZE as usize];
            let mut pages: Vec<(Gpa, SnpPageType, &PageBuf)> = Vec::new();
            for d in plan.data_updates() {
                for i in 0..d.len / PAGE_SIZE {
                    let contents = match &d.contents {
                        Some(c) => c[(i * PAGE_SIZE) as usize..][..PAGE_SIZE as usize]
                            .try_into()
                            .expect("one page"),
                        None => &zero,
                    };
                    pages.push((Gpa(d.gpa.0 + i * PAGE_SIZE), d.page_type, contents));
                }
            }
            for v in plan.vmsas() {
                pages.push((INITIAL_VMSA_GPA, SnpPageType::Vmsa, v.save_area.as_page()));
            }
            // Each measured page's index into `distinct` (None: measured as zeros).
            let mut distinct: Vec<&PageBuf> = Vec::new();
            let mut index = HashMap::new();
            let slots: Vec<Option<usize>> = pages
                .iter()
                .map(|(_, ty, c)| {
                    matches!(ty, SnpPageType::Normal | SnpPageType::Vmsa).then(|| {
                        *index.entry(*c).or_insert_with(|| {
                            distinct.push(c);
                            distinct.len() - 1
                        })
                    })
                })
                .collect();
            let chain = |hashes: &[[u8; 48]]| {
                let mut ld = [0u8; 48];
                for ((gpa, ty, _), slot) in pages.iter().zip(&slots) {
                    let h = slot.map_or([0; 48], |i| hashes[i]);
                    ld = Sha384::digest(page_info(&ld, &h, *ty, *gpa)).into();
                }
                ld
            };
            let t = Instant::now();
            let hashes: Vec<[u8; 48]> = distinct.iter().map(|c| Sha384::digest(c).into()).collect();
            let ld = chain(&hashes);
            let sha2 = t.elapsed();
            let t = Instant::now();
            let mut hashes = vec![[0u8; 48]; distinct.len()];
            sha384_pages(&distinct, &mut hashes);
            let fast = chain(&hashes);
            let fastest = t.elapsed();
            assert_eq!(ld, fast, "sha384_pages and sha2 agree");
            Floor {
                sha2,
                fastest,
                digest: hex(&ld),
            }
        }
        VmKind::SevEs => {
            let t = Instant::now();
            let mut h = Sha256::new();
            for d in plan.data_updates() {
                h.update(d.contents.as_deref().unwrap_or_default());
            }
            for v in plan.vmsas() {
                h.update(v.save_area.as_page());
            }
            let digest = h.finalize();
            let sha2 = t.elapsed();
            Floor {
                sha2,
                fastest: sha2,
                digest: hex(&digest),
            }
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/vmm is two levels below the workspace root")
        .to_path_buf()
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`, and `cargo xtask bench -- FILTER` criterion's name
    // filters: this bench runs when no filter is given or one is part of its name.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut filters = args.iter().filter(|a| !a.starts_with('-')).peekable();
    if filters.peek().is_some() && !filters.any(|f| "measure_peer".contains(f.as_str())) {
        return ExitCode::SUCCESS;
    }
    let runs = if quick { 3 } else { 21 };
    match bench(runs) {
        Ok(all_match) if all_match => ExitCode::SUCCESS,
        Ok(_) => {
            eprintln!("measure_peer: digests differ (see the table)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("measure_peer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench(runs: usize) -> Result<bool, String> {
    let root = workspace_root();
    let peer = root.join("target/fixtures-venv/bin/sev-snp-measure");
    if !peer.exists() {
        return Err(format!(
            "sev-snp-measure is not installed at {}: run `cargo xtask fixtures` (it creates that virtualenv \
             and installs sev-snp-measure from PyPI), then run this bench again",
            peer.display()
        ));
    }
    if !Path::new(FIRMWARE).exists() {
        return Err(format!(
            "{FIRMWARE} is missing: install Debian's `ovmf` package (apt-get install ovmf)"
        ));
    }
    let vmm = env!("CARGO_BIN_EXE_vmm");
    let image = std::fs::read(FIRMWARE).map_err(|e| format!("{FIRMWARE}: {e}"))?;
    let ovmf = Ovmf::parse(image).map_err(|e| format!("{FIRMWARE}: {e}"))?;
    let sig = VCPU_TYPE
        .parse::<VcpuType>()
        .map_err(|e| e.to_string())?
        .signature();
    println!(
        "vmm measure vs sev-snp-measure: {FIRMWARE} ({} bytes), --vcpu-type {VCPU_TYPE}, median of {runs} runs each",
        ovmf.data().len()
    );
    println!(
        "floor: one core hashing the bytes the digest needs, in this process; sha2: the sha2 crate \
         alone; fastest: sha384-pages ({:?} here) for the SNP page contents",
        Backend::detect()
    );
    println!(
        "{:<6} {:>5} | {:>8} {:>7} {:>6} | {:>10} {:>7} | {:>13} {:>7} | digest",
        "mode", "vcpus", "peer ms", "vmm ms", "ratio", "sha2 floor", "vmm/it", "fastest floor", "vmm/it"
    );
    let mut all_match = true;
    for kind in [VmKind::Snp, VmKind::SevEs] {
        for vcpus in VCPU_COUNTS {
            let (mode, es_flag): (&str, &[&str]) = match kind {
                VmKind::Snp => ("snp", &[]),
                VmKind::SevEs => ("seves", &["--sev-es"]),
            };
            let n = vcpus.to_string();
            let mut peer_cmd = Command::new(&peer);
            peer_cmd.args([
                "--mode",
                mode,
                "--vcpus",
                &n,
                "--vcpu-type",
                VCPU_TYPE,
                "--ovmf",
                FIRMWARE,
            ]);
            let mut vmm_cmd = Command::new(vmm);
            vmm_cmd
                .args([
                    "measure",
                    "--firmware",
                    FIRMWARE,
                    "--vcpus",
                    &n,
                    "--vcpu-type",
                    VCPU_TYPE,
                ])
                .args(es_flag);
            let config = PlanConfig {
                kind,
                vcpus: VcpuCount::new(vcpus).map_err(|e| e.to_string())?,
                vcpu_sig: sig,
                vmm_type: VmmType::Qemu,
                guest_features: if kind == VmKind::Snp { 1 } else { 0 },
            };
            let plan = LaunchPlan::build(&ovmf, &config, None).map_err(|e| e.to_string())?;
            let (mut peer_t, mut vmm_t) = (Vec::new(), Vec::new());
            let (mut sha2_t, mut fastest_t) = (Vec::new(), Vec::new());
            let mut digests = HashSet::new();
            // One untimed run of each first: page cache, Python's bytecode cache.
            for i in 0..=runs {
                let (tp, dp) = timed(&mut peer_cmd)?;
                let (tv, dv) = timed(&mut vmm_cmd)?;
                let f = floor(&plan);
                digests.extend([dp, dv, f.digest]);
                if i > 0 {
                    peer_t.push(tp);
                    vmm_t.push(tv);
                    sha2_t.push(f.sha2);
                    fastest_t.push(f.fastest);
                }
            }
            let (p, v) = (median(peer_t), median(vmm_t));
            let (fs, ff) = (median(sha2_t), median(fastest_t));
            let same = digests.len() == 1;
            all_match &= same;
            let x = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
            println!(
                "{:<6} {:>5} | {:>8.2} {:>7.2} {:>5.1}x | {:>10.2} {:>6.2}x | {:>13.2} {:>6.2}x | {}",
                mode,
                vcpus,
                ms(p),
                ms(v),
                x(p, v),
                ms(fs),
                x(v, fs),
                ms(ff),
                x(v, ff),
                if same { "match" } else { "DIFFER" }
            );
        }
    }
    Ok(all_match)
}
