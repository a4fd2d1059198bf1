//! A scripted guest: the program the simulated host's vCPUs run instead of x86 code.
//!
//! The guest is a list of [`GuestAction`]s, each executed by one vCPU in script order (see
//! the simulated host, which executes them: guest instructions on the machine, GHCB requests
//! through the host kernel, page state changes as exits to the VMM). Scripts are JSON
//! (`serde`), so a VMM can load `--guest FILE`.

use serde::{Deserialize, Serialize};
use vmsa_core::{PAGE_SIZE, PMD_SIZE};
use vmsa_host::input::one_line;

use crate::rmp::PageSize;

fn one() -> u64 {
    1
}

fn yes() -> bool {
    true
}

/// What a page state change converts to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PscTarget {
    /// Guest-private (guest_memfd, encrypted).
    Private,
    /// Shared with the host.
    Shared,
}

/// One step of a scripted guest, executed by `vcpu`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestAction {
    /// `PVALIDATE` `pages` pages of `size` from `gpa` (validate, or rescind).
    Pvalidate {
        /// The executing vCPU.
        vcpu: u32,
        /// First page.
        gpa: u64,
        /// Page count.
        #[serde(default = "one")]
        pages: u64,
        /// Page size.
        #[serde(default)]
        size: PageSize,
        /// Validate (true) or rescind (false).
        #[serde(default = "yes")]
        validate: bool,
    },
    /// Fill `pages` pages from `gpa` with `byte` (C=1 private unless `private` is false). An
    /// access whose C-bit differs from the page's memory attribute exits to the VMM as a memory
    /// fault (KVM's implicit conversion) and resumes at that page once it converted it (as a
    /// `rep stos` restarts at its current iteration: each page is written once); each page of a
    /// multi-page write whose attribute differs faults once, as KVM exits once per faulting
    /// access, and a second fault at the same page is the guest's error.
    Write {
        /// The executing vCPU.
        vcpu: u32,
        /// First page.
        gpa: u64,
        /// Page count.
        #[serde(default = "one")]
        pages: u64,
        /// The fill byte.
        byte: u8,
        /// C-bit.
        #[serde(default = "yes")]
        private: bool,
    },
    /// Write an AP's VMSA image into the private page at `gpa` (a guest write, encrypted with
    /// the guest's key). `sev_features` defaults to the VM's.
    WriteVmsa {
        /// The executing vCPU.
        vcpu: u32,
        /// The page.
        gpa: u64,
        /// Entry RIP of the AP.
        #[serde(default)]
        rip: u64,
        /// Entry RSP of the AP.
        #[serde(default)]
        rsp: u64,
        /// SEV_FEATURES of the image.
        #[serde(default)]
        sev_features: Option<u64>,
    },
    /// `RMPADJUST` the page at `gpa` into a VMSA (or back), as Linux `snp_set_vmsa` does
    /// (target VMPL1, no permissions, VMSA bit).
    MakeVmsa {
        /// The executing vCPU.
        vcpu: u32,
        /// The page.
        gpa: u64,
        /// Set (true) or clear (false) the VMSA bit.
        #[serde(default = "yes")]
        vmsa: bool,
    },
    /// GHCB AP creation: AP_CREATE (or AP_CREATE_ON_INIT) for `apic_id` with the VMSA at `gpa`.
    ApCreate {
        /// The executing vCPU.
        vcpu: u32,
        /// The target.
        apic_id: u32,
        /// The VMSA.
        gpa: u64,
        /// CREATE_ON_INIT instead of CREATE.
        #[serde(default)]
        on_init: bool,
        /// RAX (SEV_FEATURES); defaults to the VM's.
        #[serde(default)]
        sev_features: Option<u64>,
    },
    /// GHCB AP creation: AP_DESTROY of `apic_id`.
    ApDestroy {
        /// The executing vCPU.
        vcpu: u32,
        /// The target.
        apic_id: u32,
    },
    /// An INIT IPI to `apic_id` (applies a CREATE_ON_INIT).
    SendInit {
        /// The executing vCPU.
        vcpu: u32,
        /// The target.
        apic_id: u32,
    },
    /// A GHCB page state change of `pages` pages from `gpa`.
    PageState {
        /// The executing vCPU.
        vcpu: u32,
        /// First page.
        gpa: u64,
        /// Page count.
        #[serde(default = "one")]
        pages: u64,
        /// The new state.
        to: PscTarget,
    },
    /// Enter the vCPU (VMRUN) and do nothing else.
    Run {
        /// The vCPU.
        vcpu: u32,
    },
    /// `HLT`: the vCPU exits and halts.
    Hlt {
        /// The vCPU.
        vcpu: u32,
    },
    /// A triple fault (e.g. `ud2` with an all-zero IDT): the vCPU shuts down, which KVM reports
    /// as `KVM_EXIT_SHUTDOWN`; an SEV-ES/SNP guest's state cannot be reset by the host.
    TripleFault {
        /// The vCPU.
        vcpu: u32,
    },
    /// The GHCB termination request (MSR protocol `GHCB_MSR_TERM_REQ`): the guest asks the host
    /// to end it, giving a reason (GHCB spec pub. 56421 §2.3.6).
    Terminate {
        /// The vCPU.
        vcpu: u32,
        /// The reason code set (0: general, 1: GHCB protocol).
        #[serde(default)]
        reason_set: u8,
        /// The reason code.
        #[serde(default)]
        reason_code: u8,
    },
}

impl GuestAction {
    /// The executing vCPU.
    pub fn vcpu(&self) -> u32 {
        match *self {
            Self::Pvalidate { vcpu, .. }
            | Self::Write { vcpu, .. }
            | Self::WriteVmsa { vcpu, .. }
            | Self::MakeVmsa { vcpu, .. }
            | Self::ApCreate { vcpu, .. }
            | Self::ApDestroy { vcpu, .. }
            | Self::SendInit { vcpu, .. }
            | Self::PageState { vcpu, .. }
            | Self::Run { vcpu }
            | Self::Hlt { vcpu }
            | Self::TripleFault { vcpu }
            | Self::Terminate { vcpu, .. } => vcpu,
        }
    }

    /// `PVALIDATE` of one 4 KiB page (validate, or rescind).
    pub fn pvalidate_4k(vcpu: u32, gpa: u64, validate: bool) -> Self {
        Self::Pvalidate {
            vcpu,
            gpa,
            pages: 1,
            size: PageSize::Size4K,
            validate,
        }
    }

    /// What a guest does to turn one of its pages into an AP's VMSA (Linux
    /// `wakeup_cpu_via_vmgexit`): `vcpu` validates the page at `gpa`, writes a 64-bit entry
    /// state (`rip`, `rsp`) there, and RMPADJUSTs it into a VMSA.
    pub fn vmsa_setup(vcpu: u32, gpa: u64, rip: u64, rsp: u64) -> [Self; 3] {
        let [write, make] = Self::ap_vmsa(vcpu, gpa, rip, rsp);
        [Self::pvalidate_4k(vcpu, gpa, true), write, make]
    }

    /// [`Self::vmsa_setup`] on a page the guest has validated already: write the entry state
    /// and RMPADJUST the page into a VMSA.
    pub fn ap_vmsa(vcpu: u32, gpa: u64, rip: u64, rsp: u64) -> [Self; 2] {
        [
            Self::WriteVmsa {
                vcpu,
                gpa,
                rip,
                rsp,
                sev_features: None,
            },
            Self::MakeVmsa {
                vcpu,
                gpa,
                vmsa: true,
            },
        ]
    }

    /// `vcpu` asks the host to start vCPU `apic_id` from the VMSA at `gpa` (AP_CREATE, or
    /// AP_CREATE_ON_INIT when `on_init`), with the VM's SEV features.
    pub fn ap_create(vcpu: u32, apic_id: u32, gpa: u64, on_init: bool) -> Self {
        Self::ApCreate {
            vcpu,
            apic_id,
            gpa,
            on_init,
            sev_features: None,
        }
    }

    /// The pages a multi-page action covers: its first GPA and its length in bytes (a `u128`,
    /// which no page count overflows). `None` for actions on one page or none.
    pub fn span(&self) -> Option<(u64, u128)> {
        match *self {
            Self::Pvalidate { gpa, pages, size, .. } => {
                Some((gpa, u128::from(pages) * u128::from(size.bytes())))
            }
            Self::Write { gpa, pages, .. } | Self::PageState { gpa, pages, .. } => {
                Some((gpa, u128::from(pages) * u128::from(PAGE_SIZE)))
            }
            _ => None,
        }
    }

    /// The action's name (its JSON tag).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pvalidate { .. } => "pvalidate",
            Self::Write { .. } => "write",
            Self::WriteVmsa { .. } => "write_vmsa",
            Self::MakeVmsa { .. } => "make_vmsa",
            Self::ApCreate { .. } => "ap_create",
            Self::ApDestroy { .. } => "ap_destroy",
            Self::SendInit { .. } => "send_init",
            Self::PageState { .. } => "page_state",
            Self::Run { .. } => "run",
            Self::Hlt { .. } => "hlt",
            Self::TripleFault { .. } => "triple_fault",
            Self::Terminate { .. } => "terminate",
        }
    }
}

/// A scripted guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestScript {
    /// A name for reports.
    #[serde(default)]
    pub name: String,
    /// The steps, in order.
    pub actions: Vec<GuestAction>,
}

/// Why a script could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// The JSON did not parse (one line: control characters the parser quotes from the file
    /// are shown escaped).
    #[error("{}: not a guest script: {}", one_line(.source_name), one_line(.detail))]
    Parse {
        /// The file name (or `<string>`).
        source_name: String,
        /// The parser's message (with line and column).
        detail: String,
    },
    /// The file could not be opened or read, or is not a regular file within
    /// [`SCRIPT_FILE_KIND`]'s limit.
    #[error(transparent)]
    Input(#[from] vmsa_host::input::InputError),
}

/// Guest script files: at most 16 MiB (the built-in SMP boot of 512 vCPUs is about 1 MiB of
/// JSON).
pub const SCRIPT_FILE_KIND: vmsa_host::input::InputKind = vmsa_host::input::InputKind {
    what: "a guest script",
    limit: 16 << 20,
};

/// The VMSA GPA of AP `i` in [`GuestScript::smp_boot`]: one page above a 2 MiB boundary,
/// in its own 2 MiB region (never 2 MiB aligned, erratum 1467).
pub fn smp_boot_vmsa_gpa(base: u64, i: u32) -> u64 {
    base + u64::from(i) * 0x20_0000 + PAGE_SIZE
}

/// The bounce buffer of [`GuestScript::linux_boot`]: Linux's default swiotlb size,
/// `IO_TLB_DEFAULT_SIZE` (include/linux/swiotlb.h, 64 MiB), which a guest converts to shared
/// memory for its devices' DMA.
pub const LINUX_BOUNCE_SIZE: u64 = 64 << 20;

/// Where the AP VMSAs of [`GuestScript::linux_boot`] start: 2 MiB up.
const LINUX_VMSA_BASE: u64 = PMD_SIZE;

/// The end of the AP VMSA block of [`GuestScript::linux_boot`] with `vcpus` vCPUs: 8 KiB per
/// vCPU from 2 MiB up (see [`linux_boot_vmsa_gpa`]), rounded up to 2 MiB (at least
/// 2 MiB, as before any AP).
pub fn linux_boot_vmsa_end(vcpus: u32) -> u64 {
    let block = (u64::from(vcpus.max(1)) * 2 * PAGE_SIZE).next_multiple_of(PMD_SIZE);
    LINUX_VMSA_BASE + block
}

/// The least low RAM [`LinuxBootLayout::new`] takes for `vcpus` vCPUs: 2 MiB below the AP
/// VMSAs, their block ([`linux_boot_vmsa_end`]), and a bounce buffer of half of low RAM
/// (at least 2 MiB) above them, so twice the end of the VMSA block: 8 MiB up to 256 vCPUs,
/// 12 MiB for 512.
pub fn linux_boot_min_ram(vcpus: u32) -> u64 {
    2 * linux_boot_vmsa_end(vcpus)
}

/// Where [`GuestScript::linux_boot`] puts things in guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxBootLayout {
    /// Guest RAM, `[start, end)` byte ranges, page aligned, in address order; the first one
    /// starts at 0 (low memory).
    pub ram: Vec<(u64, u64)>,
    /// Ranges the launch already validated (the pages measured by `SNP_LAUNCH_UPDATE`): the
    /// guest does not validate them again.
    pub prevalidated: Vec<(u64, u64)>,
    /// The AP VMSA pages, `[start, end)`: from 2 MiB, 8 KiB per vCPU rounded up to 2 MiB
    /// ([`linux_boot_vmsa_end`]). Private memory the guest writes.
    pub vmsas: (u64, u64),
    /// The bounce buffer (swiotlb) the guest makes shared, `[start, end)`: as high in low RAM
    /// as it fits, as Linux allocates it from low memory top down (`swiotlb_init_remap` uses
    /// `memblock_alloc_low`), [`LINUX_BOUNCE_SIZE`] or half of low RAM, whichever is less;
    /// 2 MiB aligned, always above [`Self::vmsas`], and clear of every [`Self::prevalidated`]
    /// range (memblock reserves what the firmware measured, e.g. the secrets and CPUID pages,
    /// which Linux never makes shared).
    pub bounce: (u64, u64),
}

impl LinuxBootLayout {
    /// The layout over `ram` for `vcpus` vCPUs (see the fields), or `None` when the first
    /// range (low RAM) is not at 0 or is smaller than [`linux_boot_min_ram`]`(vcpus)`, or when
    /// no 2 MiB-aligned stretch of low RAM above the VMSAs of the bounce buffer's size is clear
    /// of the prevalidated ranges.
    pub fn new(vcpus: u32, ram: Vec<(u64, u64)>, prevalidated: Vec<(u64, u64)>) -> Option<Self> {
        let &(start, low_end) = ram.first()?;
        if start != 0 || low_end < linux_boot_min_ram(vcpus) {
            return None;
        }
        let vmsas = (LINUX_VMSA_BASE, linux_boot_vmsa_end(vcpus));
        let top = low_end & !(PMD_SIZE - 1);
        // Half of low RAM (2 MiB multiple) never reaches below `top / 2 >= vmsas.1`; the clamp
        // to the room above the VMSAs only states it.
        let size = LINUX_BOUNCE_SIZE
            .min((low_end / 2) & !(PMD_SIZE - 1))
            .min(top.checked_sub(vmsas.1)?);
        if size == 0 {
            return None;
        }
        // Top down, as memblock allocates: below the lowest prevalidated range the candidate
        // meets, until one meets none (each step moves down, so this ends).
        let mut end = top;
        let bounce = loop {
            let begin = end.checked_sub(size).filter(|&b| b >= vmsas.1)?;
            match prevalidated
                .iter()
                .filter(|&&(s, e)| s < e && s < end && e > begin)
                .map(|&(s, _)| s)
                .min()
            {
                None => break (begin, end),
                Some(s) => end = s & !(PMD_SIZE - 1),
            }
        };
        Some(Self {
            ram,
            prevalidated,
            vmsas,
            bounce,
        })
    }
}

/// The VMSA GPA of AP `i` in [`GuestScript::linux_boot`]: the second page of the `i`th 8 KiB
/// block from 2 MiB, as Linux's `snp_alloc_vmsa_page` takes the second page of an 8 KiB-aligned
/// pair so that it is never 2 MiB aligned (arch/x86/coco/sev/core.c).
pub fn linux_boot_vmsa_gpa(i: u32) -> u64 {
    LINUX_VMSA_BASE + u64::from(i) * 2 * PAGE_SIZE + PAGE_SIZE
}

/// PVALIDATE (or rescind) `[start, end)`: with `large`, 2 MiB pages over its 2 MiB-aligned part
/// and 4 KiB pages at either end, as Linux's `__set_pages_state` builds its page state entries
/// (2 MiB where `IS_ALIGNED(vaddr, PMD_SIZE)` and a whole 2 MiB remains); else all 4 KiB. One
/// action per run of pages of one size.
fn pvalidate_range(a: &mut Vec<GuestAction>, start: u64, end: u64, large: bool, validate: bool) {
    let mut run = |from: u64, to: u64, size: PageSize| {
        if from < to {
            a.push(GuestAction::Pvalidate {
                vcpu: 0,
                gpa: from,
                pages: (to - from) / size.bytes(),
                size,
                validate,
            });
        }
    };
    let (up, down) = (start.next_multiple_of(PMD_SIZE), end & !(PMD_SIZE - 1));
    if large && up < down {
        run(start, up, PageSize::Size4K);
        run(up, down, PageSize::Size2M);
        run(down, end, PageSize::Size4K);
    } else {
        run(start, end, PageSize::Size4K);
    }
}

/// [`pvalidate_range`] over `[start, end)` minus the `skip` ranges (what the launch validated),
/// in address order. Splitting at the skipped ranges gives 2 MiB pages only to 2 MiB regions
/// that hold no skipped page; a region that holds one gets 4 KiB pages for the rest of its
/// pages. This stands for the fallback of Linux's `pval_pages` (arch/x86/coco/sev/core.c):
/// such a region's RMP entries are 4 KiB (the launch assigned its measured pages one by one),
/// so a 2 MiB `PVALIDATE` of it fails with `FAIL_SIZEMISMATCH` and Linux retries it page by
/// page at 4 KiB. The script issues those 4 KiB `PVALIDATE`s at once, and none for the
/// measured pages, which are validated already (Linux does not accept them again).
fn pvalidate_except(
    a: &mut Vec<GuestAction>,
    start: u64,
    end: u64,
    skip: &[(u64, u64)],
    large: bool,
    validate: bool,
) {
    let mut at = start;
    let mut skip: Vec<(u64, u64)> = skip
        .iter()
        .map(|&(s, e)| (s.max(start), e.min(end)))
        .filter(|(s, e)| s < e)
        .collect();
    skip.sort_unstable();
    for (s, e) in skip {
        pvalidate_range(a, at, s.max(at), large, validate);
        at = at.max(e);
    }
    pvalidate_range(a, at, end, large, validate);
}

impl GuestScript {
    /// What a Linux SEV-SNP guest does on its way up, with one action per range of pages:
    ///
    /// 1. The BSP (vCPU 0) validates all of its RAM but what the launch validated, 2 MiB pages
    ///    where 2 MiB aligned and 4 KiB elsewhere (`large`), or everything at 4 KiB: Linux
    ///    validates memory with `PVALIDATE` after the firmware has assigned it
    ///    (arch/x86/coco/sev/core.c `snp_accept_memory` -> `set_pages_state` ->
    ///    `pvalidate_pages`).
    /// 2. It makes the bounce buffer shared as `set_memory_decrypted` does for SNP
    ///    (`snp_set_memory_shared` -> `__set_pages_state`): first it rescinds the validation
    ///    ("Page validation must be rescinded before changing to shared"), then it asks the
    ///    host for the page state change through the GHCB (`vmgexit_psc`), which KVM forwards
    ///    to the VMM as `KVM_HC_MAP_GPA_RANGE`.
    /// 3. It starts every AP as `wakeup_cpu_via_vmgexit` does: a fresh VMSA page at
    ///    [`linux_boot_vmsa_gpa`] (already validated RAM), its initial state written, made a
    ///    VMSA with `RMPADJUST` (`snp_set_vmsa`), and `AP_CREATE` through the GHCB
    ///    (`vmgexit_ap_control`). Each AP then runs.
    ///
    /// The script ends with every vCPU in the guest; the VMM tears the VM down.
    ///
    /// `layout` must be [`LinuxBootLayout::new`]'s for at least `vcpus` vCPUs (else the VMSAs
    /// of the last APs could fall in the bounce buffer).
    pub fn linux_boot(vcpus: u32, layout: &LinuxBootLayout, large: bool) -> Self {
        debug_assert!(
            linux_boot_vmsa_end(vcpus) <= layout.vmsas.1,
            "layout for fewer vCPUs"
        );
        let mut a = Vec::new();
        for &(start, end) in &layout.ram {
            pvalidate_except(&mut a, start, end, &layout.prevalidated, large, true);
        }
        let (b0, b1) = layout.bounce;
        // The layout keeps the bounce buffer clear of the prevalidated ranges; skipping them
        // here too keeps a layout built by hand from rescinding a measured page at 2 MiB.
        pvalidate_except(&mut a, b0, b1, &layout.prevalidated, large, false);
        a.push(GuestAction::PageState {
            vcpu: 0,
            gpa: b0,
            pages: (b1 - b0) / PAGE_SIZE,
            to: PscTarget::Shared,
        });
        for i in 1..vcpus {
            let gpa = linux_boot_vmsa_gpa(i);
            a.extend(GuestAction::ap_vmsa(
                0,
                gpa,
                0x10_0000 + u64::from(i) * 0x100,
                0x8_0000 + u64::from(i) * 0x1000,
            ));
            a.push(GuestAction::ap_create(0, i, gpa, false));
            a.push(GuestAction::Run { vcpu: i });
        }
        Self {
            name: if large { "linux-boot" } else { "linux-boot-4k" }.into(),
            actions: a,
        }
    }

    /// Parse a script from JSON; `source_name` names it in errors.
    pub fn from_json(source_name: &str, text: &str) -> Result<Self, ScriptError> {
        serde_json::from_str(text).map_err(|e| ScriptError::Parse {
            source_name: source_name.into(),
            detail: e.to_string(),
        })
    }

    /// Load a script from a JSON file given with `option` (e.g. `--guest`), which errors name
    /// together with the path. The file is read as [`vmsa_host::input`] reads every input (a
    /// regular file, opened without blocking, at most [`SCRIPT_FILE_KIND`]'s limit).
    pub fn from_file(option: &str, path: &std::path::Path) -> Result<Self, ScriptError> {
        let text = vmsa_host::input::read_text(option, path, SCRIPT_FILE_KIND)?;
        Self::from_json(&format!("{option} {}", path.display()), &text)
    }

    /// The script as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The built-in SMP boot: the BSP (vCPU 0) validates a page per AP at
    /// [`smp_boot_vmsa_gpa`]`(base, i)`, writes the AP's VMSA there, RMPADJUSTs it into a
    /// VMSA and starts the AP with AP_CREATE; each AP then shares and re-privatises a page of
    /// its own (page state changes both ways) and halts. Finally the BSP destroys every AP,
    /// clears the VMSA bits and halts. `base` must be 2 MiB aligned and the guest must have
    /// `vcpus * 2 MiB` of memory from it.
    pub fn smp_boot(vcpus: u32, base: u64) -> Self {
        let mut a = Vec::new();
        for i in 1..vcpus {
            let gpa = smp_boot_vmsa_gpa(base, i);
            a.extend(GuestAction::vmsa_setup(
                0,
                gpa,
                0x10_0000 + u64::from(i) * 0x100,
                0x8_0000 + u64::from(i) * 0x1000,
            ));
            a.push(GuestAction::ap_create(0, i, gpa, false));
        }
        for i in 1..vcpus {
            let data = smp_boot_vmsa_gpa(base, i) + PAGE_SIZE;
            a.push(GuestAction::pvalidate_4k(i, data, true));
            a.push(GuestAction::Write {
                vcpu: i,
                gpa: data,
                pages: 1,
                byte: i as u8,
                private: true,
            });
            a.push(GuestAction::pvalidate_4k(i, data, false));
            a.push(GuestAction::PageState {
                vcpu: i,
                gpa: data,
                pages: 1,
                to: PscTarget::Shared,
            });
            a.push(GuestAction::Write {
                vcpu: i,
                gpa: data,
                pages: 1,
                byte: 0x80 | i as u8,
                private: false,
            });
            a.push(GuestAction::PageState {
                vcpu: i,
                gpa: data,
                pages: 1,
                to: PscTarget::Private,
            });
            a.push(GuestAction::pvalidate_4k(i, data, true));
            a.push(GuestAction::Hlt { vcpu: i });
        }
        for i in 1..vcpus {
            a.push(GuestAction::ApDestroy { vcpu: 0, apic_id: i });
            a.push(GuestAction::MakeVmsa {
                vcpu: 0,
                gpa: smp_boot_vmsa_gpa(base, i),
                vmsa: false,
            });
        }
        a.push(GuestAction::Hlt { vcpu: 0 });
        Self {
            name: format!("smp-boot-{vcpus}"),
            actions: a,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_round_trip_through_json_and_reject_typos() {
        let s = GuestScript::smp_boot(3, 0x20_0000);
        let back = GuestScript::from_json("x", &s.to_json()).unwrap();
        assert_eq!(back, s);
        let text = r#"{"actions":[{"action":"pvalidate","vcpu":0,"gpa":4096},
            {"action":"page_state","vcpu":0,"gpa":4096,"to":"shared"},{"action":"hlt","vcpu":0}]}"#;
        let s = GuestScript::from_json("t.json", text).unwrap();
        assert_eq!(
            s.actions[0],
            GuestAction::Pvalidate {
                vcpu: 0,
                gpa: 4096,
                pages: 1,
                size: PageSize::Size4K,
                validate: true
            }
        );
        let e = GuestScript::from_json("t.json", r#"{"actions":[{"action":"fly","vcpu":0}]}"#).unwrap_err();
        assert!(e.to_string().starts_with("t.json: not a guest script:"), "{e}");
        let e =
            GuestScript::from_json("t.json", r#"{"actions":[{"action":"hlt","vcpu":0,"x":1}]}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    /// Regression (found by the `guest_script` fuzz target): serde quotes an unknown field or
    /// action as the file spells it once unescaped, so `"a\\nb"` made the refusal two lines.
    #[test]
    fn a_refused_script_is_one_line_whatever_it_quotes() {
        for text in [
            r#"{"a\nb": 1, "actions": []}"#,
            r#"{"actions":[{"action":"hlt\r\n","vcpu":0}]}"#,
        ] {
            let e = GuestScript::from_json("t.json", text).unwrap_err().to_string();
            assert_eq!(e.lines().count(), 1, "{e}");
            assert!(e.starts_with("t.json: not a guest script: unknown "), "{e}");
            assert!(e.contains("\\n"), "the newline is shown escaped: {e}");
        }
    }

    /// Regression: the AP VMSAs of 512 vCPUs (4 MiB) ran into the bounce buffer at [4M, 8M) of
    /// an 8 MiB guest, which the guest made shared before writing them. The VMSA block now
    /// grows with the vCPU count, the bounce buffer lies above it, and the minimum grows too.
    #[test]
    fn linux_boot_layout_regions_never_overlap_and_fit() {
        for vcpus in [1, 2, 255, 256, 257, 511, 512] {
            let min = linux_boot_min_ram(vcpus);
            assert!(
                LinuxBootLayout::new(vcpus, vec![(0, min - PAGE_SIZE)], vec![]).is_none(),
                "{vcpus} vCPUs"
            );
            for low in [
                min,
                min + PAGE_SIZE,
                min + PMD_SIZE + 3 * PAGE_SIZE,
                2 * min,
                1 << 30,
            ] {
                let l = LinuxBootLayout::new(vcpus, vec![(0, low)], vec![]).expect("fits");
                let (v0, v1) = l.vmsas;
                let (b0, b1) = l.bounce;
                assert!(
                    v0 >= PMD_SIZE && v0 < v1 && v1 <= b0 && b0 < b1 && b1 <= low,
                    "{vcpus} {low:#x} {l:?}"
                );
                assert!(b1 - b0 >= PMD_SIZE, "{l:?}");
                // Every AP's VMSA page lies in the VMSA block, none 2 MiB aligned.
                for i in 1..vcpus {
                    let g = linux_boot_vmsa_gpa(i);
                    assert!(g >= v0 && g + PAGE_SIZE <= v1, "AP {i} at {g:#x}, {l:?}");
                    assert!(!vmsa_core::Gpa(g).is_2m_aligned());
                }
                // And the script writes no VMSA in the buffer it made shared.
                let s = GuestScript::linux_boot(vcpus, &l, true);
                assert!(s.actions.iter().all(|a| match *a {
                    GuestAction::WriteVmsa { gpa, .. } => gpa < b0 || gpa >= b1,
                    _ => true,
                }));
            }
        }
        assert_eq!(linux_boot_min_ram(1), 8 << 20);
        assert_eq!(linux_boot_min_ram(256), 8 << 20);
        assert_eq!(linux_boot_min_ram(512), 12 << 20);
        assert!(LinuxBootLayout::new(512, vec![(0, 8 << 20)], vec![]).is_none());
    }

    /// Regression: the bounce buffer went to the top of low RAM whatever the launch had
    /// measured there, so the guest rescinded (at 2 MiB, over 4 KiB RMP entries) and made
    /// shared the secrets and CPUID pages. It now lies clear of every prevalidated range, the
    /// layout is refused when no room is left, and no 2 MiB PVALIDATE covers a measured page.
    #[test]
    fn linux_boot_bounce_buffer_avoids_prevalidated_ranges() {
        let mib = 1u64 << 20;
        // An OVMF's SEV metadata sections: the secrets and CPUID pages at the end.
        let sections = |base: u64| vec![(base, base + 0xf000)];
        let overlaps = |(a, b): (u64, u64), r: &[(u64, u64)]| r.iter().any(|&(s, e)| s < b && a < e);
        for (vcpus, low, pre) in [
            (4, 32 * mib, sections(24 * mib)),
            (4, 32 * mib, sections(31 * mib)),
            (4, 256 * mib, sections(200 * mib)),
            (
                4,
                256 * mib,
                vec![(250 * mib, 251 * mib), (190 * mib + 0x3000, 190 * mib + 0x5000)],
            ),
            (512, 64 * mib, sections(40 * mib)),
        ] {
            let l = LinuxBootLayout::new(vcpus, vec![(0, low)], pre.clone()).expect("room below");
            let (b0, b1) = l.bounce;
            let size = LINUX_BOUNCE_SIZE.min(low / 2);
            assert_eq!(b1 - b0, size, "{l:?}");
            assert!(b0 >= l.vmsas.1 && b1 <= low && b0 % PMD_SIZE == 0, "{l:?}");
            assert!(!overlaps(l.bounce, &pre), "{l:?}");
            for large in [true, false] {
                let s = GuestScript::linux_boot(vcpus, &l, large);
                for a in &s.actions {
                    match *a {
                        GuestAction::Pvalidate { gpa, pages, size, .. } => {
                            let r = (gpa, gpa + pages * size.bytes());
                            assert!(!overlaps(r, &pre), "{a:?} touches a measured page, {l:?}");
                            if size == PageSize::Size2M {
                                assert_eq!(gpa % PMD_SIZE, 0, "{a:?}");
                            }
                        }
                        GuestAction::PageState { gpa, pages, .. } => {
                            assert!(!overlaps((gpa, gpa + pages * PAGE_SIZE), &pre), "{a:?}");
                        }
                        _ => {}
                    }
                }
            }
        }
        // Where the top of a 32 MiB guest is measured the buffer moves down below it, highest
        // first.
        let l = LinuxBootLayout::new(4, vec![(0, 32 * mib)], sections(24 * mib)).unwrap();
        assert_eq!(l.bounce, (8 * mib, 24 * mib));
        // 16 MiB with OVMF's sections at 8 MiB: no 8 MiB above the VMSAs is clear of them.
        assert!(LinuxBootLayout::new(4, vec![(0, 16 * mib)], sections(8 * mib)).is_none());
        assert!(LinuxBootLayout::new(4, vec![(0, 16 * mib)], sections(mib)).is_some());
    }

    #[test]
    fn smp_boot_vmsas_are_never_2m_aligned() {
        for i in 1..64 {
            assert!(!vmsa_core::Gpa(smp_boot_vmsa_gpa(0x20_0000, i)).is_2m_aligned());
        }
    }
}
