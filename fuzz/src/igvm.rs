//! IGVM files (`vmm measure --igvm`, `vmm run --igvm`): the `igvm` crate's parser, then this
//! workspace's walk of the SEV-SNP launch and its measurement (`vmm::measure::igvm`).
//!
//! Input: the file's bytes, run as they are and again with the fixed header made consistent
//! (`total_file_size` and the CRC32 of the headers set from the input), so that mutations
//! reach the directives instead of stopping at the checksum.
//!
//! Properties: a refusal is one line; an accepted file launches at most
//! `MAX_IGVM_LAUNCH_PAGES` pages. For files of at most `MEASURE_PAGES` pages (the budget): the
//! pages the walk gives are the pages the measurement counts (type by type), measuring twice
//! gives the same result, `--native-zero` changes data-less NORMAL pages into ZERO pages and
//! nothing else, `--check-kvm` only refuses (a file it accepts has the digest it has without
//! it), and the parameter areas are filled for 1 and 512 vCPUs or refused in one line.

use crate::one_line;
use vmm::measure::igvm::{
    IgvmError, IgvmMeasureOptions, MAX_IGVM_LAUNCH_PAGES, PageCounts, measure_file, parameter_areas,
    parse_igvm, walk,
};

/// Files of at most this many pages are measured, four times (hashing is the slow part, and
/// the same code for every file); larger ones are only parsed and walked.
const MEASURE_PAGES: u64 = 8192;

/// Bytes of the version 1 and version 2 fixed headers (`IGVM_FIXED_HEADER`, `_V2`).
const FIXED_HEADER_V1: usize = 24;
const FIXED_HEADER_V2: usize = 32;

/// Run one input.
pub fn run(data: &[u8]) {
    file(data);
    if let Some(fixed) = consistent(data) {
        file(&fixed);
    }
}

/// `data` with its fixed header's total size and checksum set from the rest of it (the CRC32
/// the `igvm` crate checks: fixed header with the checksum field zero, then the variable
/// headers), if it has the IGVM magic, a known version and its variable headers inside it.
fn consistent(data: &[u8]) -> Option<Vec<u8>> {
    let u32_at = |o: usize| Some(u32::from_le_bytes(data.get(o..o + 4)?.try_into().ok()?));
    let header = match u32_at(4)? {
        1 => FIXED_HEADER_V1,
        2 => FIXED_HEADER_V2,
        _ => return None,
    };
    if data.len() < header || u32_at(0)? != igvm_defs::IGVM_MAGIC_VALUE {
        return None;
    }
    let offset = u32_at(8)? as usize;
    let size = u32_at(12)? as usize;
    let variable = data.get(offset..offset.checked_add(size)?)?;
    let mut out = data.to_vec();
    out[16..20].copy_from_slice(&u32::try_from(data.len()).ok()?.to_le_bytes());
    out[20..24].fill(0);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[..header]);
    crc.update(variable);
    out[20..24].copy_from_slice(&crc.finalize().to_le_bytes());
    Some(out)
}

/// One file's bytes through the parser, the walk and the measurement.
fn file(data: &[u8]) {
    let file = match parse_igvm(data) {
        Ok(f) => f,
        Err(e) => return one_line(&e.to_string()),
    };
    let plain = IgvmMeasureOptions::default();
    // The walk's pages, counted as the measurement counts them.
    let mut walked = PageCounts::default();
    if let Err(e) = walk(&file, plain, &mut |p| walked.add(p.page_type)) {
        return one_line(&e.to_string());
    }
    let total: u64 = walked.named().iter().map(|(_, n)| n).sum();
    assert!(total <= MAX_IGVM_LAUNCH_PAGES);
    if total > MEASURE_PAGES {
        return;
    }
    let m = measure_file(&file, plain).expect("the measurement accepts what the walk accepted");
    assert_eq!(walked, m.pages, "walked vs counted");
    assert_eq!(
        measure_file(&file, plain).expect("accepted again"),
        m,
        "measured twice"
    );

    let native = IgvmMeasureOptions {
        native_zero: true,
        ..plain
    };
    let z = measure_file(&file, native).expect("--native-zero accepts what the plain walk accepted");
    let (zp, p) = (z.pages, m.pages);
    assert_eq!(
        zp.normal + zp.zero,
        p.normal + p.zero,
        "--native-zero moves NORMAL pages to ZERO only"
    );
    assert_eq!(
        (zp.vmsa, zp.unmeasured, zp.secrets, zp.cpuid),
        (p.vmsa, p.unmeasured, p.secrets, p.cpuid)
    );
    assert!(zp.zero >= p.zero);
    assert_eq!(
        (z.vmsas.as_slice(), z.compatibility_mask),
        (m.vmsas.as_slice(), m.compatibility_mask)
    );

    let kvm = IgvmMeasureOptions {
        check_kvm: true,
        ..plain
    };
    match measure_file(&file, kvm) {
        Ok(k) => assert_eq!(k, m, "--check-kvm changed an accepted file's measurement"),
        Err(e @ IgvmError::KvmCheck(_)) => one_line(&e.to_string()),
        Err(e) => panic!("--check-kvm refused a file the plain walk accepts for another reason: {e}"),
    }
    for vcpus in [1, 512] {
        if let Err(e) = parameter_areas(&file, vcpus) {
            one_line(&e.to_string());
        }
    }
}
