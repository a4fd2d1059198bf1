//! The launch plan: every page a launch of an OVMF image adds, in measurement order, as data.
//!
//! Both `vmm measure` ([`LaunchPlan::measure`]) and a real launch consume the same plan. Order
//! and page types follow sev-snp-measure 0.0.13 (`guest.py`: `snp_calc_launch_digest`,
//! `snp_update_metadata_pages`, `seves_calc_launch_digest`) and QEMU (`target/i386/sev.c`):
//!
//! - SEV-SNP: the firmware image as NORMAL pages at its GPA; the SEV metadata sections
//!   (`SNP_SEC_MEM` ZERO, or UNMEASURED under GCE; `SNP_SECRETS` SECRETS; `CPUID` CPUID, after
//!   all other sections under EC2; `SNP_KERNEL_HASHES` NORMAL with the hash table, or ZERO
//!   without a kernel; `SVSM_CAA` ZERO); then one VMSA per vCPU, BSP first, each measured at
//!   KVM's `INITIAL_VMSA_GPA` (SNP firmware ABI §8.17, `SNP_LAUNCH_UPDATE`).
//! - SEV-ES: `LAUNCH_UPDATE_DATA` of the firmware image and, with a kernel, of the padded hash
//!   table at the hash table GPA; then `LAUNCH_UPDATE_VMSA` per vCPU (SEV API §6.3-6.5).
//!
//! # Feeding a plan to a launch
//!
//! The steps map one to one onto vmsa-core's launch API, so a launch on any backend (the
//! simulator's firmware measures with the same [`SnpLaunchDigest`]) reaches
//! [`LaunchPlan::measure`]'s digest:
//!
//! 1. `Vm::new(platform, plan.vm_config(), events)`; for each [`VmsaUpdate`] in
//!    [`LaunchPlan::vmsas`]: `create_vcpu(v.vcpu)` and `set_registers(v.vcpu, &v.save_area)`
//!    (the images are already what KVM's sync produces, so the sync is the identity);
//! 2. `launch_start(policy)`;
//! 3. for each [`DataUpdate`] in [`LaunchPlan::data_updates`]: back `gpa..gpa+len` with guest
//!    memory and call `launch_update_data(d.gpa, d.len, d.page_type, d.contents.as_deref())`;
//! 4. SEV-ES only: `launch_update_vmsas()`;
//! 5. `launch_finish(host_data)` (SNP measures the VMSAs here, in vCPU order).
//!
//! One SEV-ES step is not page-sized: the kernel hash table (176 bytes, [`DataUpdate::len`]).
//! Like KVM's `sev_launch_update_data`, vmsa-core's SEV-ES `launch_update_data` takes it as it
//! is (any alignment and length).

use core::fmt;
use std::sync::{Arc, OnceLock};

pub use backend_sim::measure::LaunchDigest;
use backend_sim::measure::{SNP_DIGEST_SIZE, SevEsLaunchDigest, SnpLaunchDigest, SnpPage};
use thiserror::Error;
use vmsa_core::layout::SEV_FEAT_SNP_ACTIVE;
use vmsa_core::{Gpa, INITIAL_VMSA_GPA, PAGE_SIZE, SevEsSaveArea, SnpPageType, VcpuId, VmConfig, VmKind};
use vmsa_host::input::FileBytes;

use super::hashes::{PADDED_TABLE_SIZE, SevHashes};
use super::ovmf::{FOUR_GIB, OVMF_SEV_METADATA_GUID, Ovmf, SEV_HASH_TABLE_RV_GUID, SectionType};
use super::reset::{BSP_EIP, reset_vmsa};
use super::vmm_types::VmmType;
use super::{OvmfHash, VcpuCount};

/// What to launch, besides the firmware image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanConfig {
    /// SEV-SNP or SEV-ES.
    pub kind: VmKind,
    /// Number of vCPUs (each gets a launch VMSA).
    pub vcpus: VcpuCount,
    /// The CPUID signature QEMU puts in RDX (ignored under EC2 and GCE).
    pub vcpu_sig: u32,
    /// The VMM whose launch to reproduce.
    pub vmm_type: VmmType,
    /// SEV_FEATURES of the SNP VMSAs (must include `SNP_ACTIVE`); SEV-ES VMSAs carry 0.
    pub guest_features: u64,
}

/// Where a data update comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateSource {
    /// The firmware image itself.
    Firmware,
    /// An SEV metadata section (its index in the metadata and its type).
    Section {
        /// Index in the image's metadata.
        index: usize,
        /// Its type.
        section: SectionType,
    },
    /// The SEV-ES kernel hash table.
    KernelHashTable,
    /// Pages of an IGVM file's directives.
    Igvm,
}

impl fmt::Display for UpdateSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Firmware => f.write_str("firmware"),
            Self::Section { index, section } => write!(f, "{section} (section #{index})"),
            Self::KernelHashTable => f.write_str("kernel hash table"),
            Self::Igvm => f.write_str("IGVM page"),
        }
    }
}

/// A `LAUNCH_UPDATE_DATA` / `SNP_LAUNCH_UPDATE` of a guest-physical range.
#[derive(Clone, PartialEq, Eq)]
pub struct DataUpdate {
    /// First guest-physical address.
    pub gpa: Gpa,
    /// Length in bytes (a multiple of 4096, except the SEV-ES kernel hash table).
    pub len: u64,
    /// The SNP page type (always `Normal` for SEV-ES).
    pub page_type: SnpPageType,
    /// The bytes the host writes before the update: `None` exactly for `Zero` pages. Pages the
    /// firmware does not measure (UNMEASURED, SECRETS, CPUID) are given as zeros; a VMM fills
    /// the CPUID page with its CPUID table, which the measurement does not cover.
    pub contents: Option<Vec<u8>>,
    /// What the range is.
    pub source: UpdateSource,
}

/// The data pages `updates` cover, VMSA pages left out (a supplied VMSA page is counted as a
/// VMSA, with the launch's VMSAs).
pub fn data_pages(updates: &[DataUpdate]) -> u64 {
    updates
        .iter()
        .filter(|d| d.page_type != SnpPageType::Vmsa)
        .map(|d| d.len.div_ceil(PAGE_SIZE))
        .sum()
}

impl fmt::Debug for DataUpdate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataUpdate")
            .field("gpa", &self.gpa)
            .field("len", &format_args!("{:#x}", self.len))
            .field("page_type", &self.page_type)
            .field("contents", &self.contents.as_ref().map(Vec::len))
            .field("source", &self.source)
            .finish()
    }
}

/// A vCPU's launch VMSA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmsaUpdate {
    /// The vCPU (index order; 0 is the BSP).
    pub vcpu: VcpuId,
    /// Its register state, exactly the page measured.
    pub save_area: Box<SevEsSaveArea>,
}

/// One launch step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LaunchStep {
    /// Guest memory added to the launch.
    Data(DataUpdate),
    /// A vCPU's VMSA (all of them follow the data updates).
    Vmsa(VmsaUpdate),
}

/// Why a launch plan cannot be built from a firmware image and configuration.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    /// A metadata section type sev-snp-measure and this tool do not know.
    #[error(
        "SEV metadata section #{index} has unknown type {raw_type:#x} (known: 1 SNP_SEC_MEM, 2 SNP_SECRETS, \
         3 CPUID, 4 SVSM_CAA, 0x10 SNP_KERNEL_HASHES)"
    )]
    UnknownSection {
        /// Index in the metadata.
        index: usize,
        /// The type number.
        raw_type: u32,
    },
    /// A metadata section breaks a rule.
    #[error("SEV metadata section #{index} ({section}, GPA {gpa:#x}, {size:#x} bytes): {rule}")]
    Section {
        /// Index in the metadata.
        index: usize,
        /// Its type.
        section: SectionType,
        /// Its GPA.
        gpa: u32,
        /// Its size.
        size: u32,
        /// The rule broken.
        rule: &'static str,
    },
    /// SNP kernel hashes asked for, no section to hold them.
    #[error(
        "has no SNP_KERNEL_HASHES metadata section, so an SNP launch cannot measure --kernel/--initrd/--append \
         (Debian's OVMF builds lack it; use an AmdSev OVMF build)"
    )]
    NoKernelHashesSection,
    /// Kernel hashes asked for, no hash table block.
    #[error("has no SEV hash table block (GUID {SEV_HASH_TABLE_RV_GUID}), which --kernel needs")]
    NoHashTableBlock,
    /// SEV-ES kernel hashes asked for, the hash table block says unsupported.
    #[error(
        "does not support SEV-ES kernel hashes: its SEV hash table block (GUID {SEV_HASH_TABLE_RV_GUID}) gives \
         GPA 0, so --kernel/--initrd/--append cannot be measured"
    )]
    HashTableUnsupported,
    /// The hash table would cross its page.
    #[error(
        "SEV hash table GPA {gpa:#x} leaves no room for the {PADDED_TABLE_SIZE}-byte table before the end of its page"
    )]
    HashTableOutOfPage {
        /// The hash table GPA.
        gpa: u32,
    },
    /// APs need a start address the image does not give.
    #[error("SEV-ES reset block gives AP start address 0, so APs cannot start: only --vcpus 1 works with it")]
    NoApResetAddress,
    /// SNP VMSAs without SNP_ACTIVE.
    #[error(
        "guest features {value:#x} lack bit 0 (SNP_ACTIVE): every SNP launch VMSA has it (KVM sets it), \
         so such a digest could never be reproduced"
    )]
    GuestFeaturesWithoutSnp {
        /// The features given.
        value: u64,
    },
    /// SEV-ES VMSAs with features.
    #[error(
        "guest features {value:#x} apply to SNP only: SEV-ES launch VMSAs carry SEV_FEATURES 0 \
         (as sev-snp-measure's seves mode measures them)"
    )]
    GuestFeaturesWithSevEs {
        /// The features given.
        value: u64,
    },
}

/// The ordered pages of one launch.
///
/// Kept compact: the firmware image is shared with the [`Ovmf`] it comes from and the VMSAs
/// are two images (the BSP's and the one every AP shares), so planning and measuring copy
/// nothing. [`LaunchPlan::steps`] (and [`LaunchPlan::data_updates`], [`LaunchPlan::vmsas`])
/// build the owned steps a launch feeds to vmsa-core the first time they are asked for.
#[derive(Clone)]
pub struct LaunchPlan {
    kind: VmKind,
    guest_features: u64,
    firmware: Arc<FileBytes>,
    data: Vec<PlannedData>,
    bsp: Box<SevEsSaveArea>,
    ap: Box<SevEsSaveArea>,
    vcpus: u32,
    warnings: Vec<String>,
    steps: OnceLock<Vec<LaunchStep>>,
}

impl PartialEq for LaunchPlan {
    fn eq(&self, other: &Self) -> bool {
        // `steps` is derived from the rest.
        (self.kind, self.guest_features, self.vcpus) == (other.kind, other.guest_features, other.vcpus)
            && self.firmware == other.firmware
            && self.data == other.data
            && (&self.bsp, &self.ap) == (&other.bsp, &other.ap)
            && self.warnings == other.warnings
    }
}

impl Eq for LaunchPlan {}

impl fmt::Debug for LaunchPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LaunchPlan")
            .field("kind", &self.kind)
            .field("guest_features", &format_args!("{:#x}", self.guest_features))
            .field("data", &self.data)
            .field("vcpus", &self.vcpus)
            .field("warnings", &self.warnings)
            .finish_non_exhaustive()
    }
}

/// A data update before its bytes are laid out in a buffer of their own.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PlannedData {
    gpa: Gpa,
    len: u64,
    page_type: SnpPageType,
    contents: Contents,
    source: UpdateSource,
}

/// Where a planned data update's bytes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Contents {
    /// None: a ZERO page range.
    Absent,
    /// `len` zero bytes: the sections the firmware does not measure (UNMEASURED, SECRETS,
    /// CPUID), which the host still writes.
    Zeros,
    /// The firmware image.
    Firmware,
    /// Bytes built for this launch (the kernel hashes page or table).
    Built(Vec<u8>),
}

/// Check a metadata section's GPA and size, returning its length in bytes.
fn section_len(index: usize, section: SectionType, gpa: u32, size: u32) -> Result<u64, PlanError> {
    let fail = |rule| {
        Err(PlanError::Section {
            index,
            section,
            gpa,
            size,
            rule,
        })
    };
    if !u64::from(gpa).is_multiple_of(PAGE_SIZE) {
        return fail("the GPA must be 4 KiB aligned (SNP_LAUNCH_UPDATE adds whole pages)");
    }
    match section {
        SectionType::SnpSecrets | SectionType::Cpuid if size as u64 != PAGE_SIZE => {
            return fail(
                "the section must be exactly one page (4096 bytes); sev-snp-measure measures one page, QEMU size bytes",
            );
        }
        _ if size == 0 || !u64::from(size).is_multiple_of(PAGE_SIZE) => {
            return fail("the size must be a non-zero multiple of 4096");
        }
        _ => {}
    }
    if u64::from(gpa) + u64::from(size) > FOUR_GIB {
        return fail("the section must end at or below 4 GiB");
    }
    Ok(u64::from(size))
}

impl LaunchPlan {
    /// Whether a `kind` launch of `ovmf` can measure a direct kernel boot's hashes. Checked
    /// before the kernel and initrd are read (hashing a large kernel only to refuse it wastes
    /// minutes), and again by [`LaunchPlan::build`].
    pub fn check_kernel_hashes(ovmf: &Ovmf, kind: VmKind) -> Result<(), PlanError> {
        match kind {
            VmKind::Snp if !ovmf.has_section(SectionType::SnpKernelHashes) => {
                Err(PlanError::NoKernelHashesSection)
            }
            VmKind::Snp => Ok(()),
            VmKind::SevEs => match ovmf.sev_hashes_table_gpa() {
                None => Err(PlanError::NoHashTableBlock),
                Some(0) => Err(PlanError::HashTableUnsupported),
                Some(_) => Ok(()),
            },
        }
    }

    /// Plan the launch of `ovmf` with `config`; `hashes` asks for a direct kernel boot's hash
    /// table. Every rule is checked here, before anything is measured or written.
    pub fn build(ovmf: &Ovmf, config: &PlanConfig, hashes: Option<&SevHashes>) -> Result<Self, PlanError> {
        let vcpus = config.vcpus.get();
        let ap_eip = ovmf.sev_es_reset_eip();
        if vcpus > 1 && ap_eip == 0 {
            return Err(PlanError::NoApResetAddress);
        }
        let mut data = Vec::new();
        let mut warnings = Vec::new();
        data.push(PlannedData {
            gpa: Gpa(ovmf.gpa()),
            len: ovmf.data().len() as u64,
            page_type: SnpPageType::Normal,
            contents: Contents::Firmware,
            source: UpdateSource::Firmware,
        });
        let features = match config.kind {
            VmKind::Snp => {
                if config.guest_features & SEV_FEAT_SNP_ACTIVE == 0 {
                    return Err(PlanError::GuestFeaturesWithoutSnp {
                        value: config.guest_features,
                    });
                }
                if !ovmf.has_sev_metadata() {
                    warnings.push(format!(
                        "the firmware has no SEV metadata (GUID {OVMF_SEV_METADATA_GUID}): QEMU refuses to launch \
                         SNP guests with it (no secrets or CPUID page); this is the digest sev-snp-measure computes"
                    ));
                }
                snp_metadata_steps(ovmf, config.vmm_type, hashes, &mut data)?;
                config.guest_features
            }
            VmKind::SevEs => {
                if config.guest_features != 0 {
                    return Err(PlanError::GuestFeaturesWithSevEs {
                        value: config.guest_features,
                    });
                }
                if let Some(h) = hashes {
                    Self::check_kernel_hashes(ovmf, VmKind::SevEs)?;
                    let gpa = ovmf.sev_hashes_table_gpa().ok_or(PlanError::NoHashTableBlock)?;
                    data.push(PlannedData {
                        gpa: Gpa(u64::from(gpa)),
                        len: PADDED_TABLE_SIZE as u64,
                        page_type: SnpPageType::Normal,
                        contents: Contents::Built(h.table().to_vec()),
                        source: UpdateSource::KernelHashTable,
                    });
                }
                0
            }
        };
        Ok(Self {
            kind: config.kind,
            guest_features: features,
            firmware: ovmf.shared_data(),
            data,
            bsp: reset_vmsa(BSP_EIP, features, config.vcpu_sig, config.vmm_type),
            ap: reset_vmsa(ap_eip, features, config.vcpu_sig, config.vmm_type),
            vcpus,
            warnings,
            steps: OnceLock::new(),
        })
    }

    /// SEV-ES or SEV-SNP.
    pub fn kind(&self) -> VmKind {
        self.kind
    }

    /// The configuration a vmsa-core `Vm` needs to launch this plan: its VMSAs carry exactly
    /// `config.vmsa_features()` (for SNP, vmsa-core adds `SNP_ACTIVE` itself, as KVM does).
    pub fn vm_config(&self) -> VmConfig {
        match self.kind {
            VmKind::Snp => VmConfig::snp(self.guest_features & !SEV_FEAT_SNP_ACTIVE),
            VmKind::SevEs => VmConfig::sev_es(self.guest_features),
        }
    }

    /// Every step, in launch order, with its bytes (built on the first call).
    pub fn steps(&self) -> &[LaunchStep] {
        self.steps.get_or_init(|| {
            let data = self.data.iter().map(|d| {
                LaunchStep::Data(DataUpdate {
                    gpa: d.gpa,
                    len: d.len,
                    page_type: d.page_type,
                    contents: self
                        .bytes(d)
                        .map(<[u8]>::to_vec)
                        .or_else(|| (d.contents == Contents::Zeros).then(|| vec![0; d.len as usize])),
                    source: d.source,
                })
            });
            let vmsas = self.vmsa_images().map(|(vcpu, save_area)| {
                LaunchStep::Vmsa(VmsaUpdate {
                    vcpu,
                    save_area: Box::new(save_area.clone()),
                })
            });
            data.chain(vmsas).collect()
        })
    }

    /// The data updates, in order.
    pub fn data_updates(&self) -> impl Iterator<Item = &DataUpdate> {
        self.steps().iter().filter_map(|s| match s {
            LaunchStep::Data(d) => Some(d),
            LaunchStep::Vmsa(_) => None,
        })
    }

    /// The VMSAs, in vCPU order.
    pub fn vmsas(&self) -> impl Iterator<Item = &VmsaUpdate> {
        self.steps().iter().filter_map(|s| match s {
            LaunchStep::Vmsa(v) => Some(v),
            LaunchStep::Data(_) => None,
        })
    }

    /// How many pages of type `ty` the launch adds (VMSAs included); a partial page counts.
    pub fn page_count(&self, ty: SnpPageType) -> u64 {
        let data: u64 = self
            .data
            .iter()
            .filter(|d| d.page_type == ty)
            .map(|d| d.len.div_ceil(PAGE_SIZE))
            .sum();
        data + if ty == SnpPageType::Vmsa {
            u64::from(self.vcpus)
        } else {
            0
        }
    }

    /// Things that do not stop the measurement but that a user should know.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Each vCPU's VMSA image, borrowed: the BSP's, then the one every AP shares.
    fn vmsa_images(&self) -> impl Iterator<Item = (VcpuId, &SevEsSaveArea)> {
        (0..self.vcpus).map(|i| (VcpuId(i), if i == 0 { &*self.bsp } else { &*self.ap }))
    }

    /// The bytes of a planned update the firmware may hash (`None` for zero-filled ranges).
    fn bytes<'a>(&'a self, d: &'a PlannedData) -> Option<&'a [u8]> {
        match &d.contents {
            Contents::Firmware => Some(&self.firmware),
            Contents::Built(b) => Some(b),
            Contents::Absent | Contents::Zeros => None,
        }
    }

    /// The launch digest of this plan, computed with backend-sim's firmware digest code,
    /// from the plan's compact form (nothing is copied): SNP with each distinct page hashed
    /// once, on every core ([`SnpLaunchDigest::update_pages`]); SEV-ES as its one SHA-256
    /// stream.
    pub fn measure(&self) -> LaunchDigest {
        match self.kind {
            VmKind::Snp => LaunchDigest::Snp(self.snp_digest(SnpLaunchDigest::new(), true)),
            VmKind::SevEs => {
                let mut ld = SevEsLaunchDigest::new();
                for d in &self.data {
                    match (self.bytes(d), &d.contents) {
                        (Some(b), _) => ld.update(b),
                        (None, Contents::Zeros) => {
                            let zeros = [0; PAGE_SIZE as usize];
                            let mut left = d.len;
                            while left > 0 {
                                let n = left.min(PAGE_SIZE);
                                ld.update(&zeros[..n as usize]);
                                left -= n;
                            }
                        }
                        (None, _) => {}
                    }
                }
                for (_, v) in self.vmsa_images() {
                    ld.update(v.as_page());
                }
                LaunchDigest::SevEs(ld.digest())
            }
        }
    }

    /// The SEV-SNP launch digest of this plan with the firmware's pages measured elsewhere:
    /// the chain continues from `ovmf_hash` ([`ovmf_hash`] of the firmware, as sev-snp-measure's
    /// `--snp-ovmf-hash` takes it) through the metadata pages and the VMSAs. `None` for an
    /// SEV-ES plan, whose digest is one stream with no such point.
    pub fn measure_after(&self, ovmf_hash: OvmfHash) -> Option<LaunchDigest> {
        (self.kind == VmKind::Snp)
            .then(|| LaunchDigest::Snp(self.snp_digest(SnpLaunchDigest::resume(ovmf_hash.0), false)))
    }

    /// `ld` extended with the plan's pages (the firmware's too if `firmware`) and its VMSAs,
    /// each distinct page hashed once, on every core ([`SnpLaunchDigest::update_pages`]).
    fn snp_digest(&self, mut ld: SnpLaunchDigest, firmware: bool) -> [u8; SNP_DIGEST_SIZE] {
        let data = self
            .data
            .iter()
            .filter(|d| firmware || d.contents != Contents::Firmware);
        let n = data.clone().map(|d| d.len / PAGE_SIZE).sum::<u64>() + u64::from(self.vcpus);
        let mut pages = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
        for d in data {
            match self.bytes(d).filter(|_| d.page_type == SnpPageType::Normal) {
                Some(b) => pages.extend(normal_pages(d.gpa, b)),
                None => pages.extend((0..d.len / PAGE_SIZE).map(|i| SnpPage {
                    gpa: Gpa(d.gpa.0 + i * PAGE_SIZE),
                    page_type: d.page_type,
                    contents: None,
                })),
            }
        }
        pages.extend(self.vmsa_images().map(|(_, v)| SnpPage {
            gpa: INITIAL_VMSA_GPA,
            page_type: SnpPageType::Vmsa,
            contents: Some(v.as_page()),
        }));
        ld.update_pages(&pages);
        ld.digest()
    }
}

/// The OVMF hash of `ovmf`: the SEV-SNP launch digest of its pages alone, from which the rest
/// of a launch's chain continues ([`LaunchPlan::measure_after`]), as sev-snp-measure's
/// `--mode snp:ovmf-hash` prints it. A verifier that trusts this value needs only the
/// firmware's metadata, not its code.
pub fn ovmf_hash(ovmf: &Ovmf) -> OvmfHash {
    let pages: Vec<SnpPage<'_>> = normal_pages(Gpa(ovmf.gpa()), ovmf.data()).collect();
    let mut ld = SnpLaunchDigest::new();
    ld.update_pages(&pages);
    OvmfHash(ld.digest())
}

/// `bytes` as the NORMAL launch pages from `gpa` on (whole pages; the caller's ranges are).
fn normal_pages(gpa: Gpa, bytes: &[u8]) -> impl Iterator<Item = SnpPage<'_>> {
    let (whole, _) = bytes.as_chunks::<{ PAGE_SIZE as usize }>();
    (0..).zip(whole).map(move |(i, c)| SnpPage {
        gpa: Gpa(gpa.0 + i * PAGE_SIZE),
        page_type: SnpPageType::Normal,
        contents: Some(c),
    })
}

/// The SNP metadata sections as launch steps (sev-snp-measure `snp_update_metadata_pages`).
fn snp_metadata_steps(
    ovmf: &Ovmf,
    vmm: VmmType,
    hashes: Option<&SevHashes>,
    data: &mut Vec<PlannedData>,
) -> Result<(), PlanError> {
    if hashes.is_some() {
        LaunchPlan::check_kernel_hashes(ovmf, VmKind::Snp)?;
    }
    let mut cpuid_last = Vec::new();
    // Guest ranges already added (the firmware first): KVM adds each guest page to an SNP
    // launch once (`snp_launch_update` populates only pages still shared).
    let mut taken = vec![(ovmf.gpa(), FOUR_GIB)];
    for (index, s) in ovmf.metadata_sections().iter().enumerate() {
        let section = s.section_type().ok_or(PlanError::UnknownSection {
            index,
            raw_type: s.raw_type,
        })?;
        let len = section_len(index, section, s.gpa, s.size)?;
        let range = (u64::from(s.gpa), u64::from(s.gpa) + len);
        if taken.iter().any(|&(a, b)| range.0 < b && a < range.1) {
            return Err(PlanError::Section {
                index,
                section,
                gpa: s.gpa,
                size: s.size,
                rule: "overlaps the firmware image or an earlier section; a guest page joins an SNP launch once",
            });
        }
        taken.push(range);
        let (page_type, contents) = match section {
            SectionType::SnpSecMem => match vmm.sec_mem_page_type() {
                SnpPageType::Zero => (SnpPageType::Zero, Contents::Absent),
                other => (other, Contents::Zeros),
            },
            SectionType::SnpSecrets => (SnpPageType::Secrets, Contents::Zeros),
            SectionType::Cpuid => (SnpPageType::Cpuid, Contents::Zeros),
            SectionType::SvsmCaa => (SnpPageType::Zero, Contents::Absent),
            SectionType::SnpKernelHashes => match hashes {
                None => (SnpPageType::Zero, Contents::Absent),
                Some(h) => {
                    if len != PAGE_SIZE {
                        return Err(PlanError::Section {
                            index,
                            section,
                            gpa: s.gpa,
                            size: s.size,
                            rule: "with --kernel the section must be exactly one page, the page the hash table is \
                                   built in (sev-snp-measure rule)",
                        });
                    }
                    let gpa = ovmf.sev_hashes_table_gpa().ok_or(PlanError::NoHashTableBlock)?;
                    let page = h
                        .page((gpa & 0xfff) as usize)
                        .ok_or(PlanError::HashTableOutOfPage { gpa })?;
                    (SnpPageType::Normal, Contents::Built(page.to_vec()))
                }
            },
        };
        let step = PlannedData {
            gpa: Gpa(u64::from(s.gpa)),
            len,
            page_type,
            contents,
            source: UpdateSource::Section { index, section },
        };
        if section == SectionType::Cpuid && vmm.cpuid_pages_last() {
            cpuid_last.push(step);
        } else {
            data.push(step);
        }
    }
    data.extend(cpuid_last);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::ovmf::tests::{Image, sev_image};
    use crate::measure::ovmf::{SEV_ES_RESET_BLOCK_GUID, SEV_HASH_TABLE_RV_GUID};
    use sha2::{Digest, Sha256, Sha384};

    fn cfg(kind: VmKind, vcpus: u32, vmm_type: VmmType) -> PlanConfig {
        PlanConfig {
            kind,
            vcpus: VcpuCount::new(vcpus).unwrap(),
            vcpu_sig: 0x0080_0f12,
            vmm_type,
            guest_features: if kind == VmKind::Snp { 1 } else { 0 },
        }
    }

    fn kinds(plan: &LaunchPlan) -> Vec<(u64, SnpPageType, u64)> {
        plan.data_updates()
            .map(|d| (d.gpa.0, d.page_type, d.len))
            .collect()
    }

    #[test]
    fn snp_plan_order_per_vmm_type() {
        let ovmf = Ovmf::parse(sev_image().build()).unwrap();
        let fw = (FOUR_GIB - 0x4000, SnpPageType::Normal, 0x4000);
        // The CPUID page is already last, so EC2's reordering leaves QEMU's order.
        let qemu_and_ec2 = [
            fw,
            (0x80_0000, SnpPageType::Zero, 0x9000),
            (0x80_d000, SnpPageType::Secrets, 0x1000),
            (0x80_e000, SnpPageType::Cpuid, 0x1000),
        ];
        let qemu = LaunchPlan::build(&ovmf, &cfg(VmKind::Snp, 3, VmmType::Qemu), None).unwrap();
        assert_eq!(kinds(&qemu), qemu_and_ec2);
        let ec2 = LaunchPlan::build(&ovmf, &cfg(VmKind::Snp, 3, VmmType::Ec2), None).unwrap();
        assert_eq!(kinds(&ec2), qemu_and_ec2);
        let gce = LaunchPlan::build(&ovmf, &cfg(VmKind::Snp, 3, VmmType::Gce), None).unwrap();
        assert_eq!(kinds(&gce)[1], (0x80_0000, SnpPageType::Unmeasured, 0x9000));
        let vmsas: Vec<_> = qemu.vmsas().collect();
        assert_eq!(vmsas.len(), 3);
        assert_eq!(vmsas[0].save_area.rip, 0xfff0);
        assert_eq!(vmsas[1].save_area.rip, 0xb004);
        assert_eq!(vmsas[2].vcpu, VcpuId(2));
        assert!(matches!(qemu.steps().last(), Some(LaunchStep::Vmsa(_))));
        assert!(qemu.warnings().is_empty());
    }

    /// The owned steps are built on demand from the compact plan, with the bytes a host writes.
    #[test]
    fn steps_are_built_on_demand_with_their_bytes() {
        let ovmf = Ovmf::parse(sev_image().build()).unwrap();
        let plan = LaunchPlan::build(&ovmf, &cfg(VmKind::Snp, 3, VmmType::Gce), None).unwrap();
        let untouched = plan.clone();
        let data: Vec<_> = plan.data_updates().collect();
        assert_eq!(plan, untouched, "building the steps does not change the plan");
        assert_eq!(data[0].contents.as_deref(), Some(ovmf.data()));
        let unmeasured = data[1];
        assert_eq!(unmeasured.page_type, SnpPageType::Unmeasured);
        assert_eq!(unmeasured.contents, Some(vec![0; 0x9000]));
        assert_eq!(plan.page_count(SnpPageType::Normal), 4);
        assert_eq!(plan.page_count(SnpPageType::Unmeasured), 9);
        assert_eq!(plan.page_count(SnpPageType::Vmsa), 3);
        assert_eq!(plan.page_count(SnpPageType::Zero), 0);
        let vmsas: Vec<_> = plan.vmsas().collect();
        assert_eq!(vmsas[1].save_area, vmsas[2].save_area, "the APs share one image");
        assert_ne!(vmsas[0].save_area, vmsas[1].save_area);
    }

    #[test]
    fn ec2_moves_cpuid_after_the_other_sections() {
        let img = Image::new(0x4000)
            .entry(SEV_ES_RESET_BLOCK_GUID, &0x80_b004u32.to_le_bytes())
            .metadata(
                0x800,
                &[(0x1000, 0x1000, 3), (0x2000, 0x1000, 1), (0x3000, 0x1000, 2)],
            )
            .build();
        let ovmf = Ovmf::parse(img).unwrap();
        let order = |vmm| -> Vec<u64> {
            LaunchPlan::build(&ovmf, &cfg(VmKind::Snp, 1, vmm), None)
                .unwrap()
                .data_updates()
                .skip(1)
                .map(|d| d.gpa.0)
                .collect()
        };
        assert_eq!(order(VmmType::Qemu), [0x1000, 0x2000, 0x3000]);
        assert_eq!(order(VmmType::Ec2), [0x2000, 0x3000, 0x1000]);
    }

    /// An independent PAGE_INFO chain written from the SNP ABI table, for one crafted plan.
    #[test]
    fn snp_digest_is_the_page_info_chain() {
        let ovmf = Ovmf::parse(sev_image().build()).unwrap();
        let plan = LaunchPlan::build(&ovmf, &cfg(VmKind::Snp, 2, VmmType::Qemu), None).unwrap();
        let mut ld = [0u8; 48];
        let ext = |ld: &mut [u8; 48], ty: u8, gpa: u64, contents: [u8; 48]| {
            let mut info = Vec::with_capacity(0x70);
            info.extend_from_slice(ld);
            info.extend_from_slice(&contents);
            info.extend_from_slice(&[0x70, 0, ty, 0, 0, 0, 0, 0]);
            info.extend_from_slice(&gpa.to_le_bytes());
            *ld = Sha384::digest(&info).into();
        };
        for (i, page) in ovmf.data().chunks(4096).enumerate() {
            ext(
                &mut ld,
                1,
                ovmf.gpa() + i as u64 * 4096,
                Sha384::digest(page).into(),
            );
        }
        // The OVMF hash is the chain this far, and the rest continues from it.
        assert_eq!(ovmf_hash(&ovmf), OvmfHash(ld));
        let other = OvmfHash([0x5a; 48]);
        let after_other = plan.measure_after(other).unwrap();
        for i in 0..9 {
            ext(&mut ld, 3, 0x80_0000 + i * 4096, [0; 48]);
        }
        ext(&mut ld, 5, 0x80_d000, [0; 48]);
        ext(&mut ld, 6, 0x80_e000, [0; 48]);
        for v in plan.vmsas() {
            ext(
                &mut ld,
                2,
                0xffff_ffff_f000,
                Sha384::digest(v.save_area.as_page()).into(),
            );
        }
        assert_eq!(plan.measure(), LaunchDigest::Snp(ld));
        assert_eq!(plan.measure_after(ovmf_hash(&ovmf)), Some(LaunchDigest::Snp(ld)));
        assert_ne!(after_other, LaunchDigest::Snp(ld));
        let es = LaunchPlan::build(&ovmf, &cfg(VmKind::SevEs, 2, VmmType::Qemu), None).unwrap();
        assert_eq!(
            es.measure_after(OvmfHash(ld)),
            None,
            "SEV-ES has one SHA-256 stream"
        );
    }

    #[test]
    fn sev_es_digest_hashes_firmware_table_and_vmsas() {
        let img = Image::new(0x4000)
            .entry(SEV_ES_RESET_BLOCK_GUID, &0x80_b004u32.to_le_bytes())
            .entry(
                SEV_HASH_TABLE_RV_GUID,
                &[0x00, 0x0c, 0x81, 0x00, 0x00, 0x04, 0, 0],
            )
            .build();
        let ovmf = Ovmf::parse(img.clone()).unwrap();
        let h = SevHashes::new(b"kernel", None, Some("quiet"));
        let plan = LaunchPlan::build(&ovmf, &cfg(VmKind::SevEs, 2, VmmType::Qemu), Some(&h)).unwrap();
        let table = kinds(&plan)[1];
        assert_eq!(table, (0x81_0c00, SnpPageType::Normal, 176));
        let mut s = Sha256::new();
        s.update(&img);
        s.update(h.table());
        for v in plan.vmsas() {
            assert_eq!(v.save_area.sev_features, 0);
            s.update(v.save_area.as_page());
        }
        assert_eq!(plan.measure(), LaunchDigest::SevEs(s.finalize().into()));
        assert_eq!(plan.measure().algorithm(), "sha256");
    }

    #[test]
    fn snp_kernel_hashes_page() {
        let img = Image::new(0x4000)
            .entry(SEV_ES_RESET_BLOCK_GUID, &0x80_b004u32.to_le_bytes())
            .entry(
                SEV_HASH_TABLE_RV_GUID,
                &[0x00, 0x0c, 0x81, 0x00, 0x00, 0x04, 0, 0],
            )
            .metadata(0x800, &[(0x81_0000, 0x1000, 0x10)])
            .build();
        let ovmf = Ovmf::parse(img).unwrap();
        let h = SevHashes::new(b"kernel", Some(b"initrd"), None);
        let c = cfg(VmKind::Snp, 1, VmmType::Qemu);
        let with = LaunchPlan::build(&ovmf, &c, Some(&h)).unwrap();
        let page = with.data_updates().nth(1).unwrap();
        assert_eq!((page.gpa.0, page.page_type), (0x81_0000, SnpPageType::Normal));
        assert_eq!(page.contents.as_deref(), Some(&h.page(0xc00).unwrap()[..]));
        let without = LaunchPlan::build(&ovmf, &c, None).unwrap();
        let zero = without.data_updates().nth(1).unwrap();
        assert_eq!(
            (zero.page_type, zero.contents.is_none()),
            (SnpPageType::Zero, true)
        );
        assert_ne!(with.measure(), without.measure());
    }

    #[test]
    fn refusals_name_the_rule() {
        let ovmf = Ovmf::parse(sev_image().build()).unwrap();
        let h = SevHashes::new(b"k", None, None);
        let snp = cfg(VmKind::Snp, 1, VmmType::Qemu);
        assert_eq!(
            LaunchPlan::build(&ovmf, &snp, Some(&h)),
            Err(PlanError::NoKernelHashesSection)
        );
        assert_eq!(
            LaunchPlan::build(&ovmf, &cfg(VmKind::SevEs, 1, VmmType::Qemu), Some(&h)),
            Err(PlanError::HashTableUnsupported)
        );
        let no_snp = PlanConfig {
            guest_features: 0x20,
            ..snp
        };
        assert_eq!(
            LaunchPlan::build(&ovmf, &no_snp, None),
            Err(PlanError::GuestFeaturesWithoutSnp { value: 0x20 })
        );
        let es_features = PlanConfig {
            guest_features: 1,
            ..cfg(VmKind::SevEs, 1, VmmType::Qemu)
        };
        assert_eq!(
            LaunchPlan::build(&ovmf, &es_features, None),
            Err(PlanError::GuestFeaturesWithSevEs { value: 1 })
        );

        let build = |sections: &[(u32, u32, u32)], eip: u32| {
            let img = Image::new(0x4000)
                .entry(SEV_ES_RESET_BLOCK_GUID, &eip.to_le_bytes())
                .metadata(0x800, sections)
                .build();
            LaunchPlan::build(
                &Ovmf::parse(img).unwrap(),
                &cfg(VmKind::Snp, 2, VmmType::Qemu),
                None,
            )
        };
        assert_eq!(build(&[], 0), Err(PlanError::NoApResetAddress));
        assert_eq!(
            build(&[(0x1000, 0x1000, 7)], 4),
            Err(PlanError::UnknownSection {
                index: 0,
                raw_type: 7
            })
        );
        for (sections, rule) in [
            (&[(0x1800, 0x1000, 1)][..], "aligned"),
            (&[(0x1000, 0x1800, 1)][..], "multiple of 4096"),
            (&[(0x1000, 0, 4)][..], "non-zero"),
            (&[(0x1000, 0x2000, 2)][..], "exactly one page"),
            (&[(0x1000, 0x2000, 3)][..], "exactly one page"),
            (&[(0xffff_f000, 0x2000, 1)][..], "4 GiB"),
            (&[(0xffff_e000, 0x1000, 1)][..], "overlaps the firmware"),
            (&[(0x1000, 0x3000, 1), (0x3000, 0x1000, 3)][..], "overlaps"),
        ] {
            match build(sections, 4) {
                Err(PlanError::Section { rule: r, .. }) => assert!(r.contains(rule), "{r} / {rule}"),
                other => panic!("{sections:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn snp_without_metadata_warns() {
        let img = Image::new(0x2000)
            .entry(SEV_ES_RESET_BLOCK_GUID, &0x80_8004u32.to_le_bytes())
            .build();
        let ovmf = Ovmf::parse(img).unwrap();
        let plan = LaunchPlan::build(&ovmf, &cfg(VmKind::Snp, 1, VmmType::Qemu), None).unwrap();
        assert_eq!(plan.data_updates().count(), 1);
        assert_eq!(plan.warnings().len(), 1);
        assert!(plan.warnings()[0].contains("refuses"));
        let es = LaunchPlan::build(&ovmf, &cfg(VmKind::SevEs, 1, VmmType::Qemu), None).unwrap();
        assert!(es.warnings().is_empty());
    }
}
