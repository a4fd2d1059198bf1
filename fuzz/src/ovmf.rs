//! The OVMF footer table and SEV metadata parser (`vmm::measure::ovmf::Ovmf::parse`) and the
//! launch plan built from what it parsed (`vmm::measure::plan::LaunchPlan::build`).
//!
//! Input: a flags byte (SNP or SEV-ES, VMM type, vCPU count), the image size in 4 KiB pages
//! less one (1 to 256 pages, within the parser's size rule), then the image's tail: the bytes
//! are placed at the end of a zeroed image, where the footer table and usually the SEV
//! metadata are, so that every input reaches the table parser. (The size rule itself is a
//! comparison, checked separately on the input's length.)
//!
//! Properties: a parsed image yields the table it was read from (the entries, re-serialised
//! in the firmware's layout, are the table's bytes; each GUID once; the reset block's address
//! and the hash-table GPA are the entries' first `u32`), the metadata sections are the
//! descriptors' bytes under a version-1 `ASEV` header, and the image maps to end at 4 GiB; a
//! refusal is one line. A plan built from it has the image first, one VMSA per vCPU, and
//! every data range 4 KiB aligned (but the SEV-ES hash table) and below 4 GiB without
//! overlaps; small plans are measured too, and an SNP plan's digest continued from the
//! image's OVMF hash (`--snp-ovmf-hash`) is its digest.

use vmm::measure::VcpuCount;
use vmm::measure::ovmf::{
    FOUR_GIB, IMAGE_GRANULE, MAX_IMAGE_SIZE, METADATA_DESC_SIZE, METADATA_HEADER_SIZE, METADATA_VERSION,
    OVMF_SEV_METADATA_GUID, OVMF_TABLE_FOOTER_GUID, Ovmf, SEV_ES_RESET_BLOCK_GUID, SEV_HASH_TABLE_RV_GUID,
    TABLE_END_FROM_IMAGE_END, TABLE_ENTRY_HEADER_SIZE, check_image_size,
};
use vmm::measure::plan::{LaunchPlan, PlanConfig, ovmf_hash};
use vmm::measure::vmm_types::VMM_TYPES;
use vmsa_core::layout::SEV_FEAT_SNP_ACTIVE;
use vmsa_core::{PAGE_SIZE, VmKind};

use crate::input::Input;
use crate::one_line;

/// Plans of at most this many pages are measured (hashing is the slow part, and the same code
/// for every plan).
const MEASURE_PAGES: u64 = 1024;

/// Run one input.
pub fn run(data: &[u8]) {
    let len = data.len() as u64;
    assert_eq!(
        check_image_size(len).is_ok(),
        len != 0 && len <= MAX_IMAGE_SIZE && len.is_multiple_of(IMAGE_GRANULE),
        "the size rule for {len} bytes"
    );
    let mut input = Input::new(data);
    let flags = input.u8();
    let pages = usize::from(input.u8()) + 1;
    let tail = input.rest();
    let mut image = vec![0u8; pages * PAGE_SIZE as usize];
    let n = tail.len().min(image.len());
    let at = image.len() - n;
    image[at..].copy_from_slice(&tail[tail.len() - n..]);

    match Ovmf::parse(image.clone()) {
        Ok(ovmf) => {
            parsed(&ovmf, &image);
            plan(&ovmf, flags);
        }
        Err(e) => one_line(&e.to_string()),
    }
}

fn u32_le(b: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(..4)?.try_into().ok()?))
}

/// What the parser returned is what the image holds.
fn parsed(ovmf: &Ovmf, image: &[u8]) {
    assert_eq!(ovmf.data(), image);
    assert_eq!(
        ovmf.gpa() + image.len() as u64,
        FOUR_GIB,
        "the image ends at 4 GiB"
    );
    // The table, re-serialised: entries in image order, each `data, size, GUID`.
    let entries: Vec<_> = ovmf.table().collect();
    let mut table = Vec::new();
    for (guid, data) in entries.iter().rev() {
        table.extend_from_slice(data);
        let size = u16::try_from(data.len() + TABLE_ENTRY_HEADER_SIZE).expect("an entry fits its u16 size");
        table.extend_from_slice(&size.to_le_bytes());
        table.extend_from_slice(guid.bytes());
    }
    let footer_at = image.len() - TABLE_END_FROM_IMAGE_END - TABLE_ENTRY_HEADER_SIZE;
    assert_eq!(
        &image[footer_at + 2..footer_at + TABLE_ENTRY_HEADER_SIZE],
        OVMF_TABLE_FOOTER_GUID.bytes()
    );
    let body =
        usize::from(u16::from_le_bytes([image[footer_at], image[footer_at + 1]])) - TABLE_ENTRY_HEADER_SIZE;
    assert!(
        table.len() <= body && body - table.len() < TABLE_ENTRY_HEADER_SIZE,
        "the entries fill the table"
    );
    assert!(
        image[footer_at - table.len()..footer_at] == table[..],
        "the entries are the table's bytes"
    );
    for (i, (guid, _)) in entries.iter().enumerate() {
        assert!(
            !entries[..i].iter().any(|(g, _)| g == guid),
            "{guid} listed twice"
        );
        assert_eq!(ovmf.table_entry(*guid), Some(entries[i].1));
    }
    let reset = ovmf.table_entry(SEV_ES_RESET_BLOCK_GUID).and_then(u32_le);
    assert_eq!(reset, Some(ovmf.sev_es_reset_eip()));
    assert_eq!(
        ovmf.sev_hashes_table_gpa(),
        ovmf.table_entry(SEV_HASH_TABLE_RV_GUID).and_then(u32_le)
    );
    let metadata = ovmf.table_entry(OVMF_SEV_METADATA_GUID).and_then(u32_le);
    assert_eq!(ovmf.has_sev_metadata(), metadata.is_some());
    if let Some(offset) = metadata {
        let start = image.len() - offset as usize;
        let header = &image[start..start + METADATA_HEADER_SIZE];
        assert_eq!(&header[..4], b"ASEV");
        assert_eq!(u32_le(&header[8..]), Some(METADATA_VERSION));
        let sections = ovmf.metadata_sections();
        assert_eq!(u32_le(&header[12..]), Some(sections.len() as u32));
        let descs = &image[start + METADATA_HEADER_SIZE..];
        for (s, d) in sections.iter().zip(descs.chunks_exact(METADATA_DESC_SIZE)) {
            assert_eq!(
                [u32_le(d), u32_le(&d[4..]), u32_le(&d[8..])],
                [Some(s.gpa), Some(s.size), Some(s.raw_type)]
            );
        }
    } else {
        assert!(ovmf.metadata_sections().is_empty());
    }
}

/// A launch plan from the image obeys the rules its steps are checked against.
fn plan(ovmf: &Ovmf, flags: u8) {
    let kind = if flags & 1 == 0 {
        VmKind::Snp
    } else {
        VmKind::SevEs
    };
    let config = PlanConfig {
        kind,
        vcpus: VcpuCount::new(u32::from(flags >> 4) + 1).expect("1 to 16 vCPUs"),
        vcpu_sig: 0x00a1_0f10,
        vmm_type: VMM_TYPES[usize::from(flags >> 1 & 3) % VMM_TYPES.len()],
        guest_features: if kind == VmKind::Snp {
            SEV_FEAT_SNP_ACTIVE
        } else {
            0
        },
    };
    let plan = match LaunchPlan::build(ovmf, &config, None) {
        Ok(p) => p,
        Err(e) => return one_line(&e.to_string()),
    };
    assert_eq!(plan.vmsas().count() as u32, config.vcpus.get());
    let data: Vec<_> = plan.data_updates().collect();
    assert_eq!(data[0].gpa.0, ovmf.gpa(), "the firmware comes first");
    let mut pages = 0;
    for (i, d) in data.iter().enumerate() {
        assert!(
            d.len != 0 && d.gpa.is_page_aligned() && d.len.is_multiple_of(PAGE_SIZE),
            "{d:?}"
        );
        assert!(d.gpa.0 + d.len <= FOUR_GIB, "{d:?} ends above 4 GiB");
        for e in &data[..i] {
            assert!(
                d.gpa.0 + d.len <= e.gpa.0 || e.gpa.0 + e.len <= d.gpa.0,
                "{d:?} overlaps {e:?}"
            );
        }
        if let Some(c) = &d.contents {
            assert_eq!(c.len() as u64, d.len, "{d:?}");
        }
        pages += d.len / PAGE_SIZE;
    }
    for w in plan.warnings() {
        one_line(w);
    }
    if pages <= MEASURE_PAGES {
        let digest = plan.measure();
        // The chain continued from the firmware's OVMF hash is the whole launch's (SNP);
        // SEV-ES has no such point.
        match kind {
            VmKind::Snp => assert_eq!(plan.measure_after(ovmf_hash(ovmf)), Some(digest)),
            VmKind::SevEs => assert_eq!(plan.measure_after(ovmf_hash(ovmf)), None),
        }
    }
}
