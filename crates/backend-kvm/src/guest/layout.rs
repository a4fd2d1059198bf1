//! The guest's physical memory map and the long-mode VMSA images that start its vCPUs.
//!
//! | GPA | what |
//! |---|---|
//! | `0x0500` | GDT: null, 64-bit code (selector 0x08), data (0x10) |
//! | `0x1000` | PML4 → PDPT `0x2000` → four PDs `0x3000`–`0x6fff`: 0–4 GiB identity-mapped with 2 MiB pages |
//! | `0x8000` | the guest program ([`super::program`]) |
//! | `0x1_0000` | parameters and results ([`params`]) |
//! | `0x1_1000` | the BSP's GHCB page |
//! | `0x1_2000` | mailboxes: one u64 per APIC ID, written by the APs |
//! | `0x1_3000` | AP-creation request table (32 bytes each) and, at `+0x800`, its results (16 bytes each) |
//! | `0x1_4000` | the AP VMSA template (part of the guest image; the guest copies and patches it; [`template_stretches`]) |
//! | `0x1_5000`–`0x1_7fff` | the BSP's stack |
//! | `0x1_8000` | an IGVM launch's parameter page ([`IGVM_PARAMS_GPA`]: the VP count the loader writes; unmeasured) |
//! | `0x1_9000` | an IGVM launch's BSP VMSA ([`IGVM_VMSA_GPA`]: the file's SNP VP context, supplied at launch) |
//! | `0x20_0000` + `i * 0x1000` | the VMSA the guest writes for the AP with APIC ID `i` (never 2 MiB aligned for `1 <= i < 512`) |

use vmsa_core::layout::EFER_SVME;
use vmsa_core::{SevEsSaveArea, VmcbSeg};

/// The GDT.
pub const GDT_GPA: u64 = 0x500;
/// The PML4.
pub const PML4_GPA: u64 = 0x1000;
/// The PDPT.
pub const PDPT_GPA: u64 = 0x2000;
/// The first of four page directories.
pub const PD_GPA: u64 = 0x3000;
/// The guest program.
pub const CODE_GPA: u64 = 0x8000;
/// Room for the program.
pub const CODE_MAX: u64 = 0x8000;
/// Parameters and results.
pub const PARAMS_GPA: u64 = 0x1_0000;
/// The BSP's GHCB.
pub const GHCB_GPA: u64 = 0x1_1000;
/// Per-APIC-ID mailboxes.
pub const MAILBOX_GPA: u64 = 0x1_2000;
/// The AP-creation request table.
pub const REQUESTS_GPA: u64 = 0x1_3000;
/// The request results.
pub const RESULTS_GPA: u64 = 0x1_3800;
/// At most this many table requests.
pub const MAX_REQUESTS: usize = 64;
/// The AP VMSA template.
pub const TEMPLATE_GPA: u64 = 0x1_4000;
/// The top of the BSP's stack.
pub const STACK_TOP: u64 = 0x1_8000;
/// The page an IGVM file of the program inserts its parameter area at (IGVM's
/// `IGVM_VHT_PARAMETER_INSERT`: launched as an UNMEASURED page, so what the loader writes there
/// does not enter the launch digest). The loader writes the VP count there.
pub const IGVM_PARAMS_GPA: u64 = 0x1_8000;
/// Where in [`IGVM_PARAMS_GPA`] the VP count (`IGVM_VHT_VP_COUNT_PARAMETER`, a u32) goes.
pub const IGVM_VP_COUNT_OFFSET: u32 = 0;
/// Where an IGVM file of the program supplies the BSP's VMSA (its SNP VP context): a free page
/// of this map, 4 KiB but not 2 MiB aligned.
pub const IGVM_VMSA_GPA: u64 = 0x1_9000;
/// Where the guest writes AP VMSAs.
pub const VMSA_BASE: u64 = 0x20_0000;
/// At most this many vCPUs fit the map (APIC IDs 0..512).
pub const MAX_VCPUS: u32 = 512;
/// Guest memory needed for `vcpus` vCPUs.
pub const fn min_memory(vcpus: u32) -> u64 {
    let need = VMSA_BASE + vcpus as u64 * 0x1000;
    // Round up to 2 MiB.
    need.div_ceil(0x20_0000) * 0x20_0000
}

/// The GPA of the VMSA for the AP with APIC ID `apic`.
pub const fn ap_vmsa_gpa(apic: u32) -> u64 {
    VMSA_BASE + apic as u64 * 0x1000
}

/// Offsets in the parameter page.
pub mod params {
    /// Number of vCPUs (u64).
    pub const N_VCPUS: u64 = 0x00;
    /// Flags (bit 0: destroy and re-create AP 1).
    pub const FLAGS: u64 = 0x08;
    /// Number of AP reports so far (APs increment it with `lock inc`).
    pub const COUNTER: u64 = 0x10;
    /// The GHCB response of a failed step: sw_exit_info_1.
    pub const RESP1: u64 = 0x18;
    /// ... and sw_exit_info_2.
    pub const RESP2: u64 = 0x20;
    /// Number of table requests.
    pub const N_REQUESTS: u64 = 0x28;
    /// The SEV_FEATURES the guest derived from SEV_STATUS.
    pub const SEV_FEATURES: u64 = 0x30;
    /// AP reports the request program waits for.
    pub const EXPECT_REPORTS: u64 = 0x38;
    /// Flag: destroy and re-create AP 1.
    pub const FLAG_RECREATE: u64 = 1;
}

/// The SEV_STATUS MSR, which the guest reads to derive SEV_FEATURES (`>> 2`, as Linux does).
pub const MSR_SEV_STATUS: u32 = 0xc001_0131;

/// Failure codes the guest reports through [`ports::FAIL`].
pub mod fail {
    /// An AP_CREATE of the first round was refused.
    pub const CREATE: u32 = 1;
    /// The AP_DESTROY of AP 1 was refused.
    pub const DESTROY: u32 = 2;
    /// The re-creation of AP 1 was refused.
    pub const RECREATE: u32 = 3;
    /// The IGVM VP-count parameter is 0 or above [`MAX_VCPUS`](super::MAX_VCPUS) (the
    /// parameter is the loader's, unmeasured: the guest checks it; the value is in RESP1).
    pub const VP_COUNT: u32 = 4;
}

/// I/O ports the guest uses to talk to the VMM.
pub mod ports {
    /// "This vCPU is done" (value: 0 for the BSP, the APIC ID for an AP).
    pub const DONE: u16 = 0x10;
    /// "Nothing to do until another vCPU does something" (the BSP's wait loops): the VMM
    /// blocks the vCPU until another vCPU's next exit (see `kick::Progress`).
    pub const YIELD: u16 = 0x11;
    /// "A step failed" (value: the step code; the GHCB response is in the parameter page).
    pub const FAIL: u16 = 0x12;
}

// The regions of the map do not overlap.
const _: () = assert!(PD_GPA + 4 * 0x1000 <= CODE_GPA);
const _: () = assert!(CODE_GPA + CODE_MAX <= PARAMS_GPA);
const _: () = assert!(MAILBOX_GPA + MAX_VCPUS as u64 * 8 <= REQUESTS_GPA);
const _: () = assert!(REQUESTS_GPA + MAX_REQUESTS as u64 * 32 <= RESULTS_GPA);
const _: () = assert!(RESULTS_GPA + MAX_REQUESTS as u64 * 16 <= TEMPLATE_GPA);
const _: () = assert!(TEMPLATE_GPA + 0x1000 < STACK_TOP);
const _: () = assert!(STACK_TOP <= IGVM_PARAMS_GPA && IGVM_PARAMS_GPA + 0x1000 <= IGVM_VMSA_GPA);
const _: () = assert!(IGVM_VMSA_GPA + 0x1000 <= VMSA_BASE && !IGVM_VMSA_GPA.is_multiple_of(0x20_0000));

/// The GDT entries: null, 64-bit code, data.
pub const GDT: [u64; 3] = [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff];

/// The page tables: `(gpa, entries)` for the PML4, the PDPT and the four PDs.
pub fn page_tables() -> Vec<(u64, Vec<u64>)> {
    let mut out = vec![
        (PML4_GPA, vec![PDPT_GPA | 3]),
        (PDPT_GPA, (0..4).map(|i| (PD_GPA + i * 0x1000) | 3).collect()),
    ];
    for i in 0..4u64 {
        let pd = (0..512u64).map(|j| (i << 30) | (j << 21) | 0x83).collect();
        out.push((PD_GPA + i * 0x1000, pd));
    }
    out
}

/// A 64-bit code segment (type 0xb, S, P, L, G) in VMCB attribute form.
pub const CODE64_ATTRIB: u16 = 0xa9b;
/// A data segment (type 3, S, P, D/B, G).
pub const DATA_ATTRIB: u16 = 0xc93;

/// The VMSA image of a CPL0 long-mode vCPU at `rip` with this map's GDT and page tables.
pub fn long_mode_image(rip: u64) -> Box<SevEsSaveArea> {
    let mut v = SevEsSaveArea::boxed();
    v.cs = VmcbSeg::new(0x08, CODE64_ATTRIB, 0xffff_ffff, 0);
    let data = VmcbSeg::new(0x10, DATA_ATTRIB, 0xffff_ffff, 0);
    v.ds = data;
    v.es = data;
    v.ss = data;
    v.fs = data;
    v.gs = data;
    v.gdtr = VmcbSeg::new(0, 0, (GDT.len() * 8 - 1) as u32, GDT_GPA);
    v.idtr = VmcbSeg::new(0, 0, 0, 0);
    // The reset values of LDTR and TR (a present LDT and a busy 32/64-bit TSS at 0).
    v.ldtr = VmcbSeg::new(0, 0x82, 0xffff, 0);
    v.tr = VmcbSeg::new(0, 0x8b, 0xffff, 0);
    v.cr0 = 0x8005_0033;
    v.cr3 = PML4_GPA;
    v.cr4 = 0x620;
    v.efer = 0x500 | EFER_SVME;
    v.rip = rip;
    v.rflags = 2;
    v.xcr0 = 1;
    v.x87_fcw = 0x37f;
    v.mxcsr = 0x1f80;
    v.g_pat = 0x0007_0406_0007_0406;
    v.dr6 = 0xffff_0ff0;
    v.dr7 = 0x400;
    v
}

/// A stretch of the AP VMSA template: its byte offset and length in qwords.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stretch {
    /// Offset from the start of the template, a multiple of 8.
    pub offset: u32,
    /// Length in qwords.
    pub qwords: u32,
}

/// Zero qwords between two non-zero ones that [`template_stretches`] copies rather than start a
/// new stretch: on the PVM hosts of this project a `rep movsq` iteration costs the emulator
/// ~1.4 µs, a separate instruction more (each is an exit and a decode).
const STRETCH_GAP: usize = 2;

/// The stretches of the AP VMSA template that hold its non-zero qwords (the defined part of the
/// save area, 0x670 bytes): written into a zeroed page they give the whole template. The
/// BSP writes a fresh AP page this way, as a Linux guest fills a zeroed page field by field
/// (`wakeup_cpu_via_vmgexit`): the page holds 206 qwords, the template 22 non-zero ones, and
/// every store is emulated. Which qwords are non-zero does not depend on the entry point.
pub fn template_stretches() -> Vec<Stretch> {
    let image = long_mode_image(CODE_GPA);
    let page = image.as_page();
    let nonzero = (0..TEMPLATE_BYTES / 8).filter(|q| page[q * 8..q * 8 + 8] != [0; 8]);
    let mut out: Vec<Stretch> = Vec::new();
    for q in nonzero {
        let q = q as u32;
        match out.last_mut() {
            Some(s) if (q - (s.offset / 8 + s.qwords)) as usize <= STRETCH_GAP => {
                s.qwords = q - s.offset / 8 + 1;
            }
            _ => out.push(Stretch {
                offset: q * 8,
                qwords: 1,
            }),
        }
    }
    out
}

/// The bytes of the template the guest copies: the defined part of the save area (its fields
/// end at 0x670; the rest of the page is reserved).
pub const TEMPLATE_BYTES: usize = 0x670;

#[cfg(test)]
mod tests {
    use super::*;

    /// Writing the stretches of the template into a zeroed page gives the template's defined
    /// part, and what lies outside them is zero: the BSP's write of a fresh AP page is the
    /// whole copy.
    #[test]
    fn the_template_stretches_hold_every_non_zero_qword() {
        let template = long_mode_image(0x8123);
        let t = template.as_page();
        let mut page = [0u8; 4096];
        let stretches = template_stretches();
        for s in &stretches {
            let (a, b) = (s.offset as usize, (s.offset + s.qwords * 8) as usize);
            assert!(b <= TEMPLATE_BYTES, "{s:?}");
            page[a..b].copy_from_slice(&t[a..b]);
        }
        assert_eq!(page[..], t[..], "{stretches:?}");
        // Fewer qwords than the whole copy, in order, not overlapping.
        let copied: u32 = stretches.iter().map(|s| s.qwords).sum();
        assert!(copied * 4 < (TEMPLATE_BYTES / 8) as u32, "{copied} qwords");
        assert!(
            stretches
                .windows(2)
                .all(|w| w[0].offset + w[0].qwords * 8 < w[1].offset)
        );
    }

    #[test]
    fn ap_vmsas_avoid_2m_alignment() {
        for apic in 1..MAX_VCPUS {
            assert_ne!(ap_vmsa_gpa(apic) % 0x20_0000, 0, "apic {apic}");
        }
        assert_eq!(min_memory(4), 0x40_0000);
        assert_eq!(min_memory(64), 0x40_0000);
        assert_eq!(min_memory(512), 0x40_0000);
        assert_eq!(min_memory(513), 0x60_0000);
    }

    #[test]
    fn page_tables_identity_map_4_gib() {
        let t = page_tables();
        assert_eq!(t.len(), 6);
        assert_eq!(t[0], (PML4_GPA, vec![PDPT_GPA | 3]));
        let last_pd = &t[5].1;
        assert_eq!(last_pd[511], (3 << 30) | (511 << 21) | 0x83);
    }
}
