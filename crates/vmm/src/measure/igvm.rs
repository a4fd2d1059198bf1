//! `vmm measure --igvm FILE`: the SEV-SNP launch digest of an IGVM file, computed as
//! coconut-svsm's `igvmmeasure` computes it, and [`plan_to_igvm`], which wraps an OVMF launch
//! plan into an IGVM file whose digest (measured with `--native-zero`) is sev-snp-measure's.
//!
//! The file is parsed by the `igvm` crate; this module only walks its directives. The rules,
//! taken from `tools/igvmmeasure/src/igvm_measure.rs` in coconut-svsm:
//!
//! - the platform is the `IGVM_VHT_SUPPORTED_PLATFORM` header whose type is SEV-SNP; its
//!   compatibility mask selects the page-data, parameter-insert and ID-block directives that
//!   count (a file without one is refused);
//! - `PAGE_DATA` of type NORMAL with data: one NORMAL page per 4 KiB of data; without data: one
//!   ZERO page with `--native-zero` (what QEMU's loader does), else a NORMAL page of zeros; with
//!   the `unmeasured` flag: UNMEASURED; SECRETS: SECRETS; CPUID_DATA and CPUID_XF: CPUID;
//! - a 2 MiB page (flag `is_2mb_page`) counts as 512 consecutive 4 KiB pages;
//! - each `PARAMETER_INSERT` adds one UNMEASURED page at its GPA;
//! - each SNP `VP_CONTEXT` adds one VMSA page (the VMSA, zero-padded to 4 KiB) at its GPA.
//!   igvmmeasure measures every SNP VP context whatever its compatibility mask; so does this;
//! - the last `SNP_ID_BLOCK` in the platform's mask carries the digest the file expects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use backend_kvm::guest::builtin::IgvmGuest;
use backend_sim::measure::{LastContents, SnpLaunchDigest};
use igvm::snp_defs::SevVmsa;
use igvm::{IgvmDirectiveHeader, IgvmFile, IgvmInitializationHeader, IgvmPlatformHeader, IgvmRevision};
use igvm_defs::{
    IGVM_VHS_PARAMETER, IGVM_VHS_PARAMETER_INSERT, IGVM_VHS_SUPPORTED_PLATFORM, IgvmPageDataFlags,
    IgvmPageDataType, IgvmPlatformType, PAGE_SIZE_4K,
};
use serde_json::json;
use thiserror::Error;
use vmsa_core::{Gpa, INITIAL_VMSA_GPA, PAGE_SIZE, SevEsSaveArea, SnpPageType, VmKind};
use vmsa_host::input::{FileBytes, InputFile, InputKind};
use zerocopy::FromBytes;

use super::MeasureError;
use super::plan::{LaunchDigest, LaunchPlan, LaunchStep};

/// The largest IGVM file `vmm measure --igvm` reads. Firmware-plus-SVSM files are tens of
/// MiB; the `igvm` crate itself limits file data offsets to 32 bits.
pub const MAX_IGVM_SIZE: u64 = 512 << 20;

/// The only GPA at which QEMU/KVM can supply a VMSA (KVM's `INITIAL_VMSA_GPA`).
pub const KVM_VMSA_GPA: u64 = INITIAL_VMSA_GPA.0;

/// A 2 MiB IGVM page.
const PAGE_SIZE_2M: u64 = 2 << 20;

/// The most 4 KiB pages an IGVM file's SEV-SNP launch may have (1 GiB). A data-less 2 MiB page
/// directive takes 32 bytes of the file, so a file within [`MAX_IGVM_SIZE`] could ask for
/// billions of pages: hours of hashing for `vmm measure`, and for `vmm run` a page of memory
/// each. Real launches measure firmware, an SVSM or a kernel: tens of thousands of pages (the
/// largest published, openvmm's dense Linux-direct image of PR #4321, ~40,000). On hardware,
/// at about 1 ms per SNP_LAUNCH_UPDATE page (that PR's dense-minus-sparse time), this limit is
/// already four minutes of launch.
pub const MAX_IGVM_LAUNCH_PAGES: u64 = 1 << 18;

/// The compatibility mask [`plan_to_igvm`] gives its one platform.
pub const WRAPPED_COMPATIBILITY_MASK: u32 = 1;

/// The guest policy [`plan_to_igvm`] records (bit 17, which the SNP ABI requires set, and SMT
/// allowed: QEMU's default `sev-snp-guest` policy).
pub const WRAPPED_GUEST_POLICY: u64 = 0x30000;

/// igvmmeasure's options, under its names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IgvmMeasureOptions {
    /// Measure data-less NORMAL pages as ZERO pages (QEMU's loader does), not as pages of zeros.
    pub native_zero: bool,
    /// Refuse files QEMU/KVM cannot launch with the digest computed here ([`KvmCheckError`]).
    pub check_kvm: bool,
}

/// A QEMU/KVM restriction (`--check-kvm`) the file breaks.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum KvmCheckError {
    /// More than one SNP VP context.
    #[error(
        "VMSA #{index} (vp_index {vp_index}): at most one VMSA is allowed, since QEMU/KVM can supply only the \
         first vCPU's VMSA"
    )]
    SecondVmsa {
        /// Its position among the file's VMSAs (0-based).
        index: usize,
        /// Its VP index.
        vp_index: u16,
    },
    /// A VMSA elsewhere than [`KVM_VMSA_GPA`].
    #[error("VMSA of vp_index {vp_index} at GPA {gpa:#x}: KVM always puts the VMSA at GPA {KVM_VMSA_GPA:#x}")]
    VmsaGpa {
        /// Its VP index.
        vp_index: u16,
        /// Its GPA.
        gpa: u64,
    },
    /// A VMSA whose CR0 KVM would change.
    #[error(
        "VMSA of vp_index {vp_index} has CR0 {cr0:#x}: KVM sets CR0 itself before measuring, so it must be 0x30 \
         (real mode) or 0x31 (protected mode), both with NE"
    )]
    VmsaCr0 {
        /// Its VP index.
        vp_index: u16,
        /// Its CR0.
        cr0: u64,
    },
    /// A parameter insert after the VMSA.
    #[error(
        "parameter insert at GPA {gpa:#x} after the VMSA: QEMU/KVM measures the VMSA when the launch finishes, \
         so no parameter insert may follow it"
    )]
    ParameterInsertAfterVmsa {
        /// The insert's GPA.
        gpa: u64,
    },
}

/// Why an IGVM file cannot be measured.
#[derive(Debug, Error)]
pub enum IgvmError {
    /// Not a valid IGVM file.
    #[error("not a valid IGVM file: {0}")]
    Parse(#[source] igvm::Error),
    /// The `igvm` crate's parser panicked on the file (see [`parse_igvm`]).
    #[error("not a valid IGVM file: the igvm crate's parser panicked on it ({0})")]
    ParserPanic(String),
    /// No SEV-SNP platform header.
    #[error(
        "no SEV-SNP platform header: the launch digest covers the directives in the SEV-SNP platform's \
         compatibility mask"
    )]
    NoSnpPlatform,
    /// A page-data directive whose data is neither empty nor one whole page.
    #[error(
        "page data at GPA {gpa:#x} has {len} bytes: it must have none or exactly one page ({page_len} bytes)"
    )]
    PageDataSize {
        /// The page's GPA.
        gpa: u64,
        /// Its data length.
        len: usize,
        /// The page size its flags give.
        page_len: u64,
    },
    /// A GPA range that wraps past 2^64.
    #[error("page at GPA {gpa:#x} ends past the top of the address space")]
    GpaOverflow {
        /// The page's GPA.
        gpa: u64,
    },
    /// The launch has more pages than [`MAX_IGVM_LAUNCH_PAGES`].
    #[error(
        "its SEV-SNP launch has {pages} pages of 4 KiB: more than the {MAX_IGVM_LAUNCH_PAGES} (1 GiB) a launch may \
         have"
    )]
    TooManyPages {
        /// The pages the file's directives launch.
        pages: u64,
    },
    /// `--check-kvm` refused the file.
    #[error("--check-kvm: {0}")]
    KvmCheck(#[from] KvmCheckError),
    /// A parameter names a parameter area the file does not declare.
    #[error("{parameter} parameter names parameter area {index}, which no parameter area directive declares")]
    UnknownParameterArea {
        /// The parameter's kind.
        parameter: &'static str,
        /// The area's index.
        index: u32,
    },
    /// A parameter the loader writes does not fit where the file puts it (`IGVM_VHS_PARAMETER`:
    /// "a well behaving loader should fail loading the IGVM file" then).
    #[error(
        "{parameter} parameter at byte {offset} of parameter area {index} ({size} bytes): its {len} bytes do \
         not fit the area's first page, the one a parameter insert launches"
    )]
    ParameterOutside {
        /// The parameter's kind.
        parameter: &'static str,
        /// The area's index.
        index: u32,
        /// The parameter's byte offset.
        offset: u32,
        /// The area's size.
        size: u64,
        /// The parameter's size.
        len: u32,
    },
}

/// Pages measured, by SNP page type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageCounts {
    /// NORMAL pages.
    pub normal: u64,
    /// VMSA pages.
    pub vmsa: u64,
    /// ZERO pages.
    pub zero: u64,
    /// UNMEASURED pages.
    pub unmeasured: u64,
    /// SECRETS pages.
    pub secrets: u64,
    /// CPUID pages.
    pub cpuid: u64,
}

impl PageCounts {
    /// The SNP page types, in the order `vmm measure` prints them.
    pub const TYPES: [SnpPageType; 6] = [
        SnpPageType::Normal,
        SnpPageType::Vmsa,
        SnpPageType::Zero,
        SnpPageType::Unmeasured,
        SnpPageType::Secrets,
        SnpPageType::Cpuid,
    ];

    /// The name `vmm measure` gives pages of type `ty` (text and JSON).
    pub fn type_name(ty: SnpPageType) -> &'static str {
        match ty {
            SnpPageType::Normal => "normal",
            SnpPageType::Vmsa => "vmsa",
            SnpPageType::Zero => "zero",
            SnpPageType::Unmeasured => "unmeasured",
            SnpPageType::Secrets => "secrets",
            SnpPageType::Cpuid => "cpuid",
        }
    }

    /// The counts `count` gives for each type.
    pub fn from_fn(mut count: impl FnMut(SnpPageType) -> u64) -> Self {
        let mut c = Self::default();
        for ty in Self::TYPES {
            *c.count_mut(ty) = count(ty);
        }
        c
    }

    fn count_mut(&mut self, ty: SnpPageType) -> &mut u64 {
        match ty {
            SnpPageType::Normal => &mut self.normal,
            SnpPageType::Vmsa => &mut self.vmsa,
            SnpPageType::Zero => &mut self.zero,
            SnpPageType::Unmeasured => &mut self.unmeasured,
            SnpPageType::Secrets => &mut self.secrets,
            SnpPageType::Cpuid => &mut self.cpuid,
        }
    }

    /// Count one page of type `ty`.
    pub fn add(&mut self, ty: SnpPageType) {
        *self.count_mut(ty) += 1;
    }

    /// `(name, count)` for each type, in the order `vmm measure` prints them.
    pub fn named(&self) -> [(&'static str, u64); 6] {
        let mut c = *self;
        Self::TYPES.map(|ty| (Self::type_name(ty), *c.count_mut(ty)))
    }
}

/// A VMSA the file supplies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IgvmVmsa {
    /// Its VP index.
    pub vp_index: u16,
    /// Its GPA.
    pub gpa: u64,
}

/// The measurement of an IGVM file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IgvmMeasurement {
    /// The SEV-SNP platform's compatibility mask.
    pub compatibility_mask: u32,
    /// The launch digest.
    pub digest: [u8; 48],
    /// Pages measured, by type.
    pub pages: PageCounts,
    /// The VMSAs, in file order.
    pub vmsas: Vec<IgvmVmsa>,
    /// The launch digest the file's SNP ID block expects, if it has one.
    pub id_block_digest: Option<[u8; 48]>,
}

impl IgvmMeasurement {
    /// Whether the ID block (if any) expects this digest.
    pub fn id_block_matches(&self) -> Option<bool> {
        self.id_block_digest.map(|ld| ld == self.digest)
    }
}

/// The SEV-SNP platform's compatibility mask (the first SEV-SNP platform header's).
pub fn snp_compatibility_mask(file: &IgvmFile) -> Option<u32> {
    file.platforms().iter().find_map(|p| {
        let IgvmPlatformHeader::SupportedPlatform(sp) = p;
        (sp.platform_type == IgvmPlatformType::SEV_SNP).then_some(sp.compatibility_mask)
    })
}

/// Parse an IGVM file with the `igvm` crate, a panic of which is an error here: it is
/// third-party code fed with outside input, and 0.5.0 subtracts a directive's file offset from
/// the start of the file data without a check (`IgvmDirectiveHeader::new_from_binary_split`),
/// which panics where overflow checks are on, as in the dev profile `cargo run` builds.
pub fn parse_igvm(data: &[u8]) -> Result<IgvmFile, IgvmError> {
    crate::contain::contain(|| IgvmFile::new_from_binary(data, None))
        .map_err(IgvmError::ParserPanic)?
        .map_err(IgvmError::Parse)
}

/// Parse an IGVM file and measure it.
pub fn measure_bytes(data: &[u8], opts: IgvmMeasureOptions) -> Result<IgvmMeasurement, IgvmError> {
    measure_file(&parse_igvm(data)?, opts)
}

/// One 4 KiB page of an IGVM file's SEV-SNP launch, as [`walk`] finds it.
#[derive(Clone, Copy, Debug)]
pub struct IgvmPage<'a> {
    /// Its GPA.
    pub gpa: u64,
    /// The SNP page type it is measured as.
    pub page_type: SnpPageType,
    /// Its contents (zeros for a page without data; the VMSA for a VP context).
    pub contents: &'a [u8; PAGE_SIZE as usize],
    /// The VP context this page is, if it is one.
    pub vp_index: Option<u16>,
    /// The parameter area this page inserts, if it is a parameter insert (its contents are
    /// then zeros: what the loader writes there is [`parameter_areas`]' business).
    pub parameter_area: Option<u32>,
}

/// Walk the SEV-SNP launch of `file` page by page, in directive order, calling `page` for each
/// 4 KiB page the launch digest covers, with the rules in the module's documentation (and
/// `--check-kvm`'s, if asked). Returns the platform's compatibility mask, the VMSAs and the ID
/// block's digest ([`WalkSummary`]). Both `vmm measure --igvm` and `vmm run --igvm` launch through this walk.
pub fn walk(
    file: &IgvmFile,
    opts: IgvmMeasureOptions,
    page: &mut dyn FnMut(IgvmPage<'_>),
) -> Result<WalkSummary, IgvmError> {
    let mask = snp_compatibility_mask(file).ok_or(IgvmError::NoSnpPlatform)?;
    let pages = launch_pages(file, mask);
    if pages > MAX_IGVM_LAUNCH_PAGES {
        return Err(IgvmError::TooManyPages { pages });
    }
    let mut vmsas = Vec::new();
    let mut id_block_digest = None;
    let zero = [0u8; PAGE_SIZE as usize];
    let mut emit =
        |gpa: u64, page_type: SnpPageType, contents: &[u8; PAGE_SIZE as usize], vp_index, parameter_area| {
            page(IgvmPage {
                gpa,
                page_type,
                contents,
                vp_index,
                parameter_area,
            })
        };
    for d in file.directives() {
        match d {
            IgvmDirectiveHeader::PageData {
                gpa,
                compatibility_mask,
                flags,
                data_type,
                data,
            } if compatibility_mask & mask != 0 => {
                let page_len = page_len(*flags);
                if !data.is_empty() && data.len() as u64 != page_len {
                    return Err(IgvmError::PageDataSize {
                        gpa: *gpa,
                        len: data.len(),
                        page_len,
                    });
                }
                gpa.checked_add(page_len - 1)
                    .ok_or(IgvmError::GpaOverflow { gpa: *gpa })?;
                let ty = match *data_type {
                    IgvmPageDataType::NORMAL if flags.unmeasured() => SnpPageType::Unmeasured,
                    IgvmPageDataType::NORMAL if data.is_empty() && opts.native_zero => SnpPageType::Zero,
                    IgvmPageDataType::NORMAL => SnpPageType::Normal,
                    IgvmPageDataType::SECRETS => SnpPageType::Secrets,
                    IgvmPageDataType::CPUID_DATA | IgvmPageDataType::CPUID_XF => SnpPageType::Cpuid,
                    // igvmmeasure skips other types; the igvm crate refuses them when parsing.
                    _ => continue,
                };
                for i in 0..page_len / PAGE_SIZE_4K {
                    let off = (i * PAGE_SIZE_4K) as usize;
                    let contents = match data.get(off..off + PAGE_SIZE_4K as usize) {
                        Some(p) => p.try_into().expect("a 4 KiB slice"),
                        None => &zero,
                    };
                    emit(gpa + i * PAGE_SIZE_4K, ty, contents, None, None);
                }
            }
            IgvmDirectiveHeader::ParameterInsert(p) if p.compatibility_mask & mask != 0 => {
                if opts.check_kvm && !vmsas.is_empty() {
                    return Err(KvmCheckError::ParameterInsertAfterVmsa { gpa: p.gpa }.into());
                }
                emit(
                    p.gpa,
                    SnpPageType::Unmeasured,
                    &zero,
                    None,
                    Some(p.parameter_area_index),
                );
            }
            IgvmDirectiveHeader::SnpVpContext {
                gpa, vp_index, vmsa, ..
            } => {
                if opts.check_kvm {
                    check_kvm_vmsa(vmsas.len(), *vp_index, *gpa, vmsa.cr0)?;
                }
                emit(
                    *gpa,
                    SnpPageType::Vmsa,
                    save_area_from_sev_vmsa(vmsa).as_page(),
                    Some(*vp_index),
                    None,
                );
                vmsas.push(IgvmVmsa {
                    vp_index: *vp_index,
                    gpa: *gpa,
                });
            }
            IgvmDirectiveHeader::SnpIdBlock {
                compatibility_mask,
                ld,
                ..
            } if compatibility_mask & mask != 0 => id_block_digest = Some(*ld),
            _ => {}
        }
    }
    Ok(WalkSummary {
        compatibility_mask: mask,
        vmsas,
        id_block_digest,
    })
}

/// The parameter areas of an IGVM file as this loader fills them: the first page of each area
/// (the one a parameter insert launches, one UNMEASURED page per insert as [`walk`] and
/// igvmmeasure count them), with the parameters this loader supplies written in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParameterAreas {
    /// Each area's first page, by parameter area index.
    pub pages: BTreeMap<u32, Box<[u8; PAGE_SIZE as usize]>>,
    /// The kinds of parameter the file asks for that this loader does not supply (their bytes
    /// stay as the area's initial data), in file order, each once.
    pub not_supplied: Vec<&'static str>,
}

/// Fill `file`'s parameter areas for a launch of `vcpus` vCPUs: each area's initial data
/// (zeros unless the file gives some), and the VP count (`IGVM_VHT_VP_COUNT_PARAMETER`: a u32
/// at the parameter's byte offset). The other parameter kinds (memory map, ACPI tables,
/// command line, device tree, environment) describe a platform this loader does not model:
/// they are left as they are and named in [`ParameterAreas::not_supplied`]. The values are
/// unmeasured, so none of this changes the launch digest.
pub fn parameter_areas(file: &IgvmFile, vcpus: u32) -> Result<ParameterAreas, IgvmError> {
    let mut out = ParameterAreas::default();
    let mut sizes = BTreeMap::new();
    for d in file.directives() {
        let (parameter, p) = match d {
            IgvmDirectiveHeader::ParameterArea {
                number_of_bytes,
                parameter_area_index,
                initial_data,
            } => {
                let mut page = Box::new([0u8; PAGE_SIZE as usize]);
                let n = initial_data.len().min(PAGE_SIZE as usize);
                page[..n].copy_from_slice(&initial_data[..n]);
                out.pages.insert(*parameter_area_index, page);
                sizes.insert(*parameter_area_index, *number_of_bytes);
                continue;
            }
            IgvmDirectiveHeader::VpCount(p) => ("VP count", p),
            IgvmDirectiveHeader::EnvironmentInfo(p) => ("environment info", p),
            IgvmDirectiveHeader::Srat(p) => ("SRAT", p),
            IgvmDirectiveHeader::Madt(p) => ("MADT", p),
            IgvmDirectiveHeader::Slit(p) => ("SLIT", p),
            IgvmDirectiveHeader::Pptt(p) => ("PPTT", p),
            IgvmDirectiveHeader::MmioRanges(p) => ("MMIO ranges", p),
            IgvmDirectiveHeader::MemoryMap(p) => ("memory map", p),
            IgvmDirectiveHeader::CommandLine(p) => ("command line", p),
            IgvmDirectiveHeader::DeviceTree(p) => ("device tree", p),
            _ => continue,
        };
        let index = p.parameter_area_index;
        let (Some(page), Some(&size)) = (out.pages.get_mut(&index), sizes.get(&index)) else {
            return Err(IgvmError::UnknownParameterArea { parameter, index });
        };
        if parameter != "VP count" {
            if !out.not_supplied.contains(&parameter) {
                out.not_supplied.push(parameter);
            }
            continue;
        }
        let value = vcpus.to_le_bytes();
        let start = p.byte_offset as usize;
        let end = start + value.len();
        if end as u64 > size.min(PAGE_SIZE) {
            return Err(IgvmError::ParameterOutside {
                parameter,
                index,
                offset: p.byte_offset,
                size,
                len: value.len() as u32,
            });
        }
        page[start..end].copy_from_slice(&value);
    }
    Ok(out)
}

/// The bytes a page-data directive launches: 2 MiB with `is_2mb_page`, else 4 KiB.
fn page_len(flags: IgvmPageDataFlags) -> u64 {
    if flags.is_2mb_page() {
        PAGE_SIZE_2M
    } else {
        PAGE_SIZE_4K
    }
}

/// How many 4 KiB pages [`walk`] would give for `file` under the platform `mask` (at most one
/// per 32 bytes of directive, times 512: no overflow).
fn launch_pages(file: &IgvmFile, mask: u32) -> u64 {
    file.directives()
        .iter()
        .map(|d| match d {
            IgvmDirectiveHeader::PageData {
                compatibility_mask,
                flags,
                ..
            } if compatibility_mask & mask != 0 => page_len(*flags) / PAGE_SIZE_4K,
            IgvmDirectiveHeader::ParameterInsert(p) if p.compatibility_mask & mask != 0 => 1,
            IgvmDirectiveHeader::SnpVpContext { .. } => 1,
            _ => 0,
        })
        .sum()
}

/// What [`walk`] found besides the pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalkSummary {
    /// The SEV-SNP platform's compatibility mask.
    pub compatibility_mask: u32,
    /// The VMSAs, in file order.
    pub vmsas: Vec<IgvmVmsa>,
    /// The launch digest the file's SNP ID block expects, if it has one.
    pub id_block_digest: Option<[u8; 48]>,
}

/// `--check-kvm`'s rules for the `index`-th VMSA of a file.
fn check_kvm_vmsa(index: usize, vp_index: u16, gpa: u64, cr0: u64) -> Result<(), KvmCheckError> {
    if index > 0 {
        return Err(KvmCheckError::SecondVmsa { index, vp_index });
    }
    if gpa != KVM_VMSA_GPA {
        return Err(KvmCheckError::VmsaGpa { vp_index, gpa });
    }
    if cr0 != 0x30 && cr0 != 0x31 {
        return Err(KvmCheckError::VmsaCr0 { vp_index, cr0 });
    }
    Ok(())
}

/// Measure a parsed IGVM file for SEV-SNP.
///
/// A VP context's VMSA is measured as the firmware measures it, with GUEST_TSC_SCALE and
/// GUEST_TSC_OFFSET (0x2f0..0x300) as zero (amd/AMD-ASPFW `snp_mcmd_launch_update`). Those
/// bytes are reserved, must-be-zero, in IGVM's `SevVmsa`, so for a valid file this is also
/// igvmmeasure's digest, which hashes the page as it is; for a file with bytes there the two
/// differ, and this one is what the hardware reports.
pub fn measure_file(file: &IgvmFile, opts: IgvmMeasureOptions) -> Result<IgvmMeasurement, IgvmError> {
    let mut m = Measurer {
        ld: SnpLaunchDigest::new(),
        pages: PageCounts::default(),
        last: LastContents::default(),
    };
    let WalkSummary {
        compatibility_mask,
        vmsas,
        id_block_digest,
    } = walk(file, opts, &mut |p| m.page(p.gpa, p.page_type, p.contents))?;
    Ok(IgvmMeasurement {
        compatibility_mask,
        digest: m.ld.digest(),
        pages: m.pages,
        vmsas,
        id_block_digest,
    })
}

struct Measurer {
    ld: SnpLaunchDigest,
    pages: PageCounts,
    /// The last page whose contents were hashed, and its hash: runs of equal pages (data-less
    /// pages, erased flash, a 2 MiB page of zeros) are hashed once.
    last: LastContents,
}

impl Measurer {
    fn page(&mut self, gpa: u64, ty: SnpPageType, contents: &[u8; PAGE_SIZE as usize]) {
        let hash = self.last.hash(ty, contents);
        self.ld.update_hashed(Gpa(gpa), ty, &hash);
        self.pages.add(ty);
    }
}

// igvm_defs' VMSA is the whole 4 KiB page, as vmsa-core's is: both follow the APM's VMSA
// layout byte for byte, so converting is copying.
const _: () = assert!(size_of::<SevVmsa>() == PAGE_SIZE as usize);

/// The IGVM form of a VMSA: the same bytes.
pub fn sev_vmsa_from_save_area(area: &SevEsSaveArea) -> Box<SevVmsa> {
    Box::new(SevVmsa::read_from_bytes(area.as_page()).expect("both are one page"))
}

/// The vmsa-core form of an IGVM VP context's VMSA: the same bytes.
pub fn save_area_from_sev_vmsa(vmsa: &SevVmsa) -> Box<SevEsSaveArea> {
    SevEsSaveArea::from_page(zerocopy::transmute_ref!(vmsa))
}

/// Why a launch plan cannot be wrapped into an IGVM file.
#[derive(Debug, Error)]
pub enum WrapError {
    /// IGVM files carry SNP VP contexts; SEV-ES launches have no IGVM form here.
    #[error("an SEV-ES launch cannot be wrapped: IGVM VP contexts are SEV-SNP VMSAs")]
    NotSnp,
    /// More vCPUs than IGVM VP indices.
    #[error("vCPU {vcpu}: IGVM VP indices are 16-bit")]
    VpIndex {
        /// The vCPU.
        vcpu: u32,
    },
    /// The `igvm` crate refused the result.
    #[error("the igvm crate refused the file: {0}")]
    Igvm(#[source] igvm::Error),
    /// The file written does not measure.
    #[error("the file does not measure: {0}")]
    Measure(#[source] IgvmError),
}

/// An IGVM file that launches `plan` (an SEV-SNP OVMF launch): one SEV-SNP platform, the
/// guest policy [`WRAPPED_GUEST_POLICY`], and the plan's steps in order, one directive per
/// 4 KiB page: firmware pages as NORMAL page data, ZERO pages as data-less NORMAL page data,
/// SECRETS, CPUID and UNMEASURED pages with their types, then one SNP VP context per vCPU at
/// KVM's VMSA GPA. Measured with `--native-zero` its digest is the plan's.
pub fn plan_to_igvm(plan: &LaunchPlan) -> Result<IgvmFile, WrapError> {
    if plan.kind() != VmKind::Snp {
        return Err(WrapError::NotSnp);
    }
    let mask = WRAPPED_COMPATIBILITY_MASK;
    let mut directives = Vec::new();
    for step in plan.steps() {
        match step {
            LaunchStep::Data(d) => {
                let (data_type, unmeasured) = match d.page_type {
                    SnpPageType::Normal | SnpPageType::Zero | SnpPageType::Vmsa => {
                        (IgvmPageDataType::NORMAL, false)
                    }
                    SnpPageType::Unmeasured => (IgvmPageDataType::NORMAL, true),
                    SnpPageType::Secrets => (IgvmPageDataType::SECRETS, false),
                    SnpPageType::Cpuid => (IgvmPageDataType::CPUID_DATA, false),
                };
                for i in 0..d.len.div_ceil(PAGE_SIZE) {
                    let data = match (&d.contents, d.page_type) {
                        (Some(c), SnpPageType::Normal) => {
                            let start = (i * PAGE_SIZE) as usize;
                            let mut page = c[start..c.len().min(start + PAGE_SIZE as usize)].to_vec();
                            page.resize(PAGE_SIZE as usize, 0);
                            page
                        }
                        _ => Vec::new(),
                    };
                    directives.push(IgvmDirectiveHeader::PageData {
                        gpa: d.gpa.0 + i * PAGE_SIZE,
                        compatibility_mask: mask,
                        flags: IgvmPageDataFlags::new().with_unmeasured(unmeasured),
                        data_type,
                        data,
                    });
                }
            }
            LaunchStep::Vmsa(v) => {
                let vcpu = v.vcpu.0;
                let vmsa = sev_vmsa_from_save_area(&v.save_area);
                directives.push(IgvmDirectiveHeader::SnpVpContext {
                    gpa: KVM_VMSA_GPA,
                    compatibility_mask: mask,
                    vp_index: u16::try_from(vcpu).map_err(|_| WrapError::VpIndex { vcpu })?,
                    vmsa,
                });
            }
        }
    }
    snp_igvm(directives)
}

/// An IGVM file of `directives` for the one SEV-SNP platform this module writes (compatibility
/// mask [`WRAPPED_COMPATIBILITY_MASK`], guest policy [`WRAPPED_GUEST_POLICY`]).
fn snp_igvm(directives: Vec<IgvmDirectiveHeader>) -> Result<IgvmFile, WrapError> {
    let mask = WRAPPED_COMPATIBILITY_MASK;
    let platform = IgvmPlatformHeader::SupportedPlatform(IGVM_VHS_SUPPORTED_PLATFORM {
        compatibility_mask: mask,
        highest_vtl: 0,
        platform_type: IgvmPlatformType::SEV_SNP,
        platform_version: 1,
        shared_gpa_boundary: 0,
    });
    let init = IgvmInitializationHeader::GuestPolicy {
        policy: WRAPPED_GUEST_POLICY,
        compatibility_mask: mask,
    };
    IgvmFile::new(IgvmRevision::V1, vec![platform], vec![init], directives).map_err(WrapError::Igvm)
}

/// The parameter area index [`guest_to_igvm`] uses.
const GUEST_PARAMETER_AREA: u32 = 0;

/// An IGVM file that launches one of backend-kvm's guest programs in the supplied-VMSA mode
/// ([`IgvmGuest`]): its image as NORMAL page data (every page with its data, so `--native-zero`
/// measures it alike), a one-page parameter area holding the VP count, inserted at the
/// program's parameter page (UNMEASURED), then the BSP's VMSA as the one SNP VP context (VP
/// index 0) at the program's VMSA GPA. Nothing in it depends on the vCPU count, so neither does
/// its digest. `vmm run --backend kvm --igvm` runs such a file on real vCPUs.
pub fn guest_to_igvm(guest: &IgvmGuest) -> Result<IgvmFile, WrapError> {
    let mask = WRAPPED_COMPATIBILITY_MASK;
    let mut directives: Vec<IgvmDirectiveHeader> = guest
        .bytes
        .chunks(PAGE_SIZE as usize)
        .zip((0u64..).map(|i| guest.gpa.0 + i * PAGE_SIZE))
        .map(|(page, gpa)| {
            let mut data = page.to_vec();
            data.resize(PAGE_SIZE as usize, 0);
            IgvmDirectiveHeader::PageData {
                gpa,
                compatibility_mask: mask,
                flags: IgvmPageDataFlags::new(),
                data_type: IgvmPageDataType::NORMAL,
                data,
            }
        })
        .collect();
    directives.extend([
        IgvmDirectiveHeader::ParameterArea {
            number_of_bytes: PAGE_SIZE,
            parameter_area_index: GUEST_PARAMETER_AREA,
            initial_data: Vec::new(),
        },
        IgvmDirectiveHeader::VpCount(IGVM_VHS_PARAMETER {
            parameter_area_index: GUEST_PARAMETER_AREA,
            byte_offset: guest.vp_count_offset,
        }),
        IgvmDirectiveHeader::ParameterInsert(IGVM_VHS_PARAMETER_INSERT {
            gpa: guest.params_gpa.0,
            compatibility_mask: mask,
            parameter_area_index: GUEST_PARAMETER_AREA,
        }),
        IgvmDirectiveHeader::SnpVpContext {
            gpa: guest.vmsa_gpa.0,
            compatibility_mask: mask,
            vp_index: 0,
            vmsa: sev_vmsa_from_save_area(&guest.bsp),
        },
    ]);
    snp_igvm(directives)
}

/// [`guest_to_igvm`]'s file and its measurement under `opts` (what `vmm measure --igvm`
/// prints for it).
pub fn guest_igvm_measured(
    guest: &IgvmGuest,
    opts: IgvmMeasureOptions,
) -> Result<(IgvmFile, IgvmMeasurement), WrapError> {
    let file = guest_to_igvm(guest)?;
    let m = measure_file(&file, opts).map_err(WrapError::Measure)?;
    Ok((file, m))
}

/// The options only `--igvm` takes, under igvmmeasure's names.
#[derive(Clone, Debug, clap::Args)]
pub struct IgvmFlags {
    /// IGVM file to measure (SEV-SNP platform), as coconut-svsm's igvmmeasure does.
    #[arg(long, value_name = "FILE")]
    pub igvm: Option<PathBuf>,
    /// With --igvm: measure data-less pages as ZERO pages (as QEMU's loader does), not as
    /// pages of zeros.
    #[arg(long, requires = "igvm")]
    pub native_zero: bool,
    /// With --igvm: refuse a file QEMU/KVM cannot launch as measured (at most one VMSA, at
    /// 0xfffffffff000, CR0 0x30 or 0x31, no parameter insert after it).
    #[arg(long, requires = "igvm")]
    pub check_kvm: bool,
    /// With --igvm: do not fail (exit 1) when the file's SNP ID block expects another digest.
    #[arg(long, requires = "igvm")]
    pub ignore_idblock: bool,
}

/// `vmm measure --igvm FILE` and its options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IgvmArgs {
    /// The IGVM file.
    pub path: PathBuf,
    /// igvmmeasure's measurement options.
    pub options: IgvmMeasureOptions,
    /// Accept a file whose ID block expects another digest.
    pub ignore_idblock: bool,
    /// Print one JSON document.
    pub json: bool,
}

/// What `vmm measure --igvm` prints, and how it exits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IgvmOutput {
    /// Standard output: text ending with the digest line, or one JSON document.
    pub stdout: String,
    /// A failure to report on stderr after the output (exit status 1): an ID block that
    /// expects another digest.
    pub failure: Option<String>,
    /// The measurement.
    pub measurement: IgvmMeasurement,
}

/// IGVM files: at most [`MAX_IGVM_SIZE`] bytes.
pub const IGVM_FILE_KIND: InputKind = InputKind {
    what: "an IGVM file",
    limit: MAX_IGVM_SIZE,
};

/// Read the IGVM file at `path`, given with `--igvm`: a regular file (opened without blocking)
/// of at most [`MAX_IGVM_SIZE`] bytes.
pub fn read_igvm(path: &Path) -> Result<FileBytes, MeasureError> {
    Ok(InputFile::open("--igvm", path, IGVM_FILE_KIND)?.read_all_huge()?)
}

/// Run `vmm measure --igvm`: read, measure, and render.
pub fn measure(args: &IgvmArgs) -> Result<IgvmOutput, MeasureError> {
    let data = read_igvm(&args.path)?;
    let m = measure_bytes(&data, args.options).map_err(|source| MeasureError::Igvm {
        path: args.path.clone(),
        source,
    })?;
    let digest = LaunchDigest::Snp(m.digest);
    let failure = match (m.id_block_digest, m.id_block_matches()) {
        (Some(ld), Some(false)) if !args.ignore_idblock => Some(format!(
            "--igvm {}: the SNP ID block expects launch digest {} but the file measures {}; \
             --ignore-idblock accepts it",
            args.path.display(),
            LaunchDigest::Snp(ld).hex(),
            digest.hex()
        )),
        _ => None,
    };
    let id_block = match m.id_block_digest {
        None => "none".to_owned(),
        Some(ld) if ld == m.digest => "expects this digest".to_owned(),
        Some(ld) => format!(
            "expects {}{}",
            LaunchDigest::Snp(ld).hex(),
            if args.ignore_idblock { " (ignored)" } else { "" }
        ),
    };
    let stdout = if args.json {
        let pages: serde_json::Map<String, serde_json::Value> = m
            .pages
            .named()
            .iter()
            .map(|(t, n)| ((*t).to_owned(), json!(n)))
            .collect();
        let doc = json!({
            "mode": "snp",
            "algorithm": digest.algorithm(),
            "digest": digest.hex(),
            "inputs": {
                "igvm": args.path.display().to_string(),
                "native_zero": args.options.native_zero,
                "check_kvm": args.options.check_kvm,
                "ignore_idblock": args.ignore_idblock,
            },
            "compatibility_mask": format!("{:#x}", m.compatibility_mask),
            "pages": pages,
            "vmsas": m.vmsas.iter().map(|v| json!({"vp_index": v.vp_index, "gpa": format!("{:#x}", v.gpa)})).collect::<Vec<_>>(),
            "id_block": m.id_block_digest.map(|ld| json!({
                "digest": LaunchDigest::Snp(ld).hex(),
                "matches": ld == m.digest,
                "ignored": args.ignore_idblock,
            })),
        });
        format!("{doc}\n")
    } else {
        let opts: Vec<&str> = [
            (args.options.native_zero, "native-zero"),
            (args.options.check_kvm, "check-kvm"),
            (args.ignore_idblock, "ignore-idblock"),
        ]
        .iter()
        .filter_map(|(on, n)| on.then_some(*n))
        .collect();
        let pages: Vec<String> = m
            .pages
            .named()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(t, n)| format!("{n} {t}"))
            .collect();
        format!(
            "igvm: {} (SEV-SNP compatibility mask {:#x}; options: {})\npages measured: {}\nid block: {id_block}\n\
             launch digest ({}):\n{}\n",
            args.path.display(),
            m.compatibility_mask,
            if opts.is_empty() {
                "none".to_owned()
            } else {
                opts.join(", ")
            },
            pages.join(", "),
            digest.algorithm(),
            digest.hex()
        )
    };
    Ok(IgvmOutput {
        stdout,
        failure,
        measurement: m,
    })
}

#[cfg(test)]
mod tests {
    use zerocopy::IntoBytes;

    use super::*;

    #[test]
    fn a_vmsa_equal_to_the_page_before_it_is_hashed_as_a_vmsa() {
        // The firmware measures a VMSA with GUEST_TSC_SCALE/OFFSET (0x2f0, 0x2f8) as zero, so
        // the same bytes hash differently as a NORMAL page and as a VMSA: the cache of the last
        // page's hash must not hand one's hash to the other.
        let mut page = [0u8; PAGE_SIZE as usize];
        page[0x2f0] = 1;
        page[0x10] = 7;
        let mut m = Measurer {
            ld: SnpLaunchDigest::new(),
            pages: PageCounts::default(),
            last: LastContents::default(),
        };
        m.page(0x1000, SnpPageType::Normal, &page);
        m.page(0x2000, SnpPageType::Vmsa, &page);
        let mut want = SnpLaunchDigest::new();
        for (gpa, ty) in [(0x1000, SnpPageType::Normal), (0x2000, SnpPageType::Vmsa)] {
            let hash = backend_sim::measure::contents_hash(ty, &page);
            want.update_hashed(Gpa(gpa), ty, &hash);
        }
        assert_eq!(m.ld.digest(), want.digest());
    }

    #[test]
    fn sev_vmsa_is_the_head_of_the_vmsa_page() {
        // Fields at their APM offsets in both layouts.
        let mut area = SevEsSaveArea::boxed();
        area.cr0 = 0x31;
        area.rip = 0xfff0;
        area.rdx = 0x00a0_0f11;
        area.sev_features = 0x21;
        area.xcr0 = 1;
        area.cs.selector = 0xf000;
        area.cs.base = 0xffff_0000;
        let vmsa = sev_vmsa_from_save_area(&area);
        assert_eq!(vmsa.cr0, 0x31);
        assert_eq!(vmsa.rip, 0xfff0);
        assert_eq!(vmsa.rdx, 0x00a0_0f11);
        assert_eq!(vmsa.sev_features.into_bits(), 0x21);
        assert_eq!(vmsa.xcr0, 1);
        assert_eq!(vmsa.cs.selector, 0xf000);
        assert_eq!(vmsa.cs.base, 0xffff_0000);
        // And back, byte for byte.
        assert_eq!(save_area_from_sev_vmsa(&vmsa).as_page(), area.as_page());
    }

    /// An IGVM file of one SEV-SNP platform with a one-page parameter area (index 0) holding
    /// `initial`, these parameter directives, and an insert of it at 0x5000.
    fn with_parameters(initial: Vec<u8>, parameters: Vec<IgvmDirectiveHeader>) -> IgvmFile {
        let mut d = vec![IgvmDirectiveHeader::ParameterArea {
            number_of_bytes: PAGE_SIZE,
            parameter_area_index: 0,
            initial_data: initial,
        }];
        d.extend(parameters);
        d.push(IgvmDirectiveHeader::ParameterInsert(IGVM_VHS_PARAMETER_INSERT {
            gpa: 0x5000,
            compatibility_mask: 1,
            parameter_area_index: 0,
        }));
        snp_igvm(d).unwrap()
    }

    fn at(byte_offset: u32) -> IGVM_VHS_PARAMETER {
        IGVM_VHS_PARAMETER {
            parameter_area_index: 0,
            byte_offset,
        }
    }

    #[test]
    fn the_vp_count_is_written_into_its_area_and_other_parameters_are_named() {
        let file = with_parameters(
            vec![0xaa; 16],
            vec![
                IgvmDirectiveHeader::MemoryMap(at(0x100)),
                IgvmDirectiveHeader::VpCount(at(8)),
                IgvmDirectiveHeader::CommandLine(at(0x200)),
                IgvmDirectiveHeader::MemoryMap(at(0x300)),
            ],
        );
        let areas = parameter_areas(&file, 0x0102_0304).unwrap();
        let page = &areas.pages[&0];
        assert_eq!(page[..8], [0xaa; 8], "the initial data stays");
        assert_eq!(page[8..12], [4, 3, 2, 1], "the VP count, a little-endian u32");
        assert_eq!(page[12..16], [0xaa; 4]);
        assert!(page[16..].iter().all(|b| *b == 0));
        assert_eq!(areas.not_supplied, ["memory map", "command line"]);
        // The walk marks the insert's page with its area, measured as UNMEASURED zeros.
        let mut inserts = Vec::new();
        walk(&file, IgvmMeasureOptions::default(), &mut |p| {
            inserts.push((
                p.gpa,
                p.page_type,
                p.parameter_area,
                p.contents.iter().all(|b| *b == 0),
            ))
        })
        .unwrap();
        assert_eq!(inserts, [(0x5000, SnpPageType::Unmeasured, Some(0), true)]);
    }

    #[test]
    fn a_vp_count_outside_the_first_page_of_its_area_is_refused() {
        let file = with_parameters(Vec::new(), vec![IgvmDirectiveHeader::VpCount(at(4094))]);
        let e = parameter_areas(&file, 4).unwrap_err();
        assert!(
            matches!(
                e,
                IgvmError::ParameterOutside {
                    parameter: "VP count",
                    index: 0,
                    offset: 4094,
                    size: 4096,
                    len: 4
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("byte 4094 of parameter area 0"), "{e}");
        // At the last place it fits, it is written.
        let file = with_parameters(Vec::new(), vec![IgvmDirectiveHeader::VpCount(at(4092))]);
        assert_eq!(parameter_areas(&file, 7).unwrap().pages[&0][4092..], [7, 0, 0, 0]);
    }

    #[test]
    fn a_guest_program_file_measures_its_image_one_parameter_page_and_one_vmsa() {
        let guest = backend_kvm::guest::builtin::ap_creation_igvm(false);
        let file = guest_to_igvm(&guest).unwrap();
        // What it serialises to parses back to the same launch.
        let mut bytes = Vec::new();
        file.serialize(&mut bytes).unwrap();
        let m = measure_bytes(&bytes, IgvmMeasureOptions::default()).unwrap();
        assert_eq!(m, measure_file(&file, IgvmMeasureOptions::default()).unwrap());
        let (again, measured) = guest_igvm_measured(&guest, IgvmMeasureOptions::default()).unwrap();
        let mut again_bytes = Vec::new();
        again.serialize(&mut again_bytes).unwrap();
        assert_eq!((again_bytes, measured), (bytes.clone(), m.clone()));
        let image_pages = guest.bytes.len() as u64 / PAGE_SIZE;
        assert_eq!(
            m.pages,
            PageCounts {
                normal: image_pages,
                vmsa: 1,
                unmeasured: 1,
                ..PageCounts::default()
            }
        );
        assert_eq!(
            m.vmsas,
            [IgvmVmsa {
                vp_index: 0,
                gpa: guest.vmsa_gpa.0
            }]
        );
        // Every page carries its data: --native-zero measures it alike.
        let zero = IgvmMeasureOptions {
            native_zero: true,
            ..IgvmMeasureOptions::default()
        };
        assert_eq!(measure_file(&file, zero).unwrap().digest, m.digest);
        // The VP context is the BSP's VMSA, byte for byte; the VP count goes to the program's
        // parameter page.
        let mut vmsa = None;
        walk(&file, IgvmMeasureOptions::default(), &mut |p| {
            if p.vp_index.is_some() {
                vmsa = Some(*p.contents);
            }
        })
        .unwrap();
        assert_eq!(vmsa.as_ref(), Some(guest.bsp.as_page()));
        let areas = parameter_areas(&file, 4).unwrap();
        let off = guest.vp_count_offset as usize;
        assert_eq!(areas.pages[&0][off..off + 4], 4u32.to_le_bytes());
        assert!(areas.not_supplied.is_empty());
        // The re-creating program is another file.
        let recreate = guest_to_igvm(&backend_kvm::guest::builtin::ap_creation_igvm(true)).unwrap();
        assert_ne!(
            measure_file(&recreate, IgvmMeasureOptions::default())
                .unwrap()
                .digest,
            m.digest
        );
    }

    #[test]
    fn every_byte_round_trips() {
        let mut page = [0u8; PAGE_SIZE as usize];
        for (i, b) in page.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let area = SevEsSaveArea::from_page(&page);
        let vmsa = sev_vmsa_from_save_area(&area);
        assert_eq!(vmsa.as_bytes(), &page);
        assert_eq!(save_area_from_sev_vmsa(&vmsa).as_page(), &page);
    }
}
