//! `vmm run --igvm FILE`: an IGVM file made ready to launch, the same way for every backend.
//! Its pages come from the page walk `vmm measure --igvm` digests
//! ([`crate::measure::igvm::walk`]), in directive order; its parameter areas are filled as this
//! loader can ([`crate::measure::igvm::parameter_areas`]: the VP count); its one SNP VP context
//! is the BSP's VMSA.

use std::path::Path;

use backend_sim::rmp::GPA_LIMIT;
use vmsa_core::{Gpa, PAGE_SIZE, SevEsSaveArea, SnpPageType, VmConfig, is_zero};

use super::RunError;
use crate::measure::igvm::{
    IgvmMeasureOptions, IgvmPage, ParameterAreas, measure_file, parameter_areas, parse_igvm, read_igvm, walk,
};
use crate::measure::plan::{LaunchDigest, UpdateSource};
use crate::measure::{DataUpdate, MeasureError};

/// An IGVM file ready to launch.
#[derive(Debug)]
pub struct IgvmLaunch {
    /// What the report names as the image.
    pub source: String,
    /// Its pages in directive order, consecutive pages of one type merged into one update. In
    /// the supplied-VMSA mode the BSP's VMSA is one of them (page type VMSA, at the VP
    /// context's GPA); in the classic mode it is not.
    pub updates: Vec<DataUpdate>,
    /// The VP context's VMSA: the BSP's.
    pub bsp: Box<SevEsSaveArea>,
    /// The VM's configuration: SEV-SNP with the VP context's SEV_FEATURES (without SNP_ACTIVE,
    /// which KVM adds itself).
    pub config: VmConfig,
    /// The digest the launch must have: `vmm measure --igvm`'s (supplied-VMSA mode), or
    /// `--check-kvm`'s where the classic launch is comparable with it; `None` otherwise.
    pub expected: Option<String>,
    /// Things to know: what the classic launch cannot reproduce, parameters not supplied.
    pub warnings: Vec<String>,
    /// The supplied-VMSA launch mode (else the classic one).
    pub supplied: bool,
    /// Every page the launch puts into guest memory.
    pub pages: Vec<Gpa>,
}

/// Why an IGVM file does not make a launch the simulator can run.
#[derive(Debug, thiserror::Error)]
pub enum LaunchProblem {
    /// There is none.
    #[error("the file has no SNP VP context: a launch needs the BSP's VMSA")]
    NoBsp,
    /// The first is not the BSP's.
    #[error("its first SNP VP context has VP index {vp}: the BSP's (VP index 0) must come first")]
    FirstNotBsp {
        /// Its VP index.
        vp: u16,
    },
    /// The BSP's would be a supplied VMSA on a 2 MiB-aligned page.
    #[error(
        "the BSP's SNP VP context is at GPA {gpa:#x}, which is 2 MiB aligned: a supplied VMSA must not be (erratum \
         1467)"
    )]
    BspAligned {
        /// Its GPA.
        gpa: u64,
    },
    /// A second VP context in a supplied-VMSA launch.
    #[error(
        "SNP VP context of VP index {vp} at GPA {gpa:#x}: the supplied-VMSA launch takes the BSP's VMSA only (the APs \
         get theirs from the guest's AP creation); --igvm-classic sets registers instead"
    )]
    MoreThanBsp {
        /// Its VP index.
        vp: u16,
        /// Its GPA.
        gpa: u64,
    },
    /// A page beyond the RMP's reach.
    #[error(
        "its page at GPA {gpa:#x} lies at or above {GPA_LIMIT:#x}: an SEV-SNP launch page is an RMP entry, whose GPA \
         field ends at bit 50"
    )]
    BeyondRmp {
        /// The page's GPA (at least the limit).
        gpa: u64,
    },
    /// The BSP's VMSA is no SNP VMSA.
    #[error(
        "the BSP's VMSA has SEV_FEATURES {features:#x} without SNP_ACTIVE (bit 0): an SEV-SNP VMSA must set it"
    )]
    NotSnp {
        /// Its SEV_FEATURES.
        features: u64,
    },
}

impl IgvmLaunch {
    /// Read and prepare `path` for a launch of `vcpus` vCPUs. Supplied-VMSA mode: the one SNP
    /// VP context (the BSP's, VP index 0) is a launch page of type VMSA at its GPA, and the
    /// digest must be `vmm measure --igvm`'s whatever the vCPU count. Classic mode
    /// (`classic`): the VP context's registers are every vCPU's initial state and KVM syncs
    /// them into one VMSA per vCPU at launch finish; the digest is comparable with `vmm measure
    /// --igvm --check-kvm`'s only for a file that passes its rules, launched with one vCPU.
    /// `native_zero`: data-less pages are ZERO pages, as `--native-zero` measures them.
    pub fn load(path: &Path, vcpus: u32, native_zero: bool, classic: bool) -> Result<Self, RunError> {
        let shown = path.display();
        let igvm_err = |source| MeasureError::Igvm {
            path: path.to_path_buf(),
            source,
        };
        let data = read_igvm(path)?;
        let file = parse_igvm(&data).map_err(igvm_err)?;
        let opts = IgvmMeasureOptions {
            native_zero,
            check_kvm: false,
        };
        let areas = parameter_areas(&file, vcpus).map_err(igvm_err)?;
        // The VP contexts first: a file the launch must refuse is refused before its pages are
        // copied out (up to MAX_IGVM_LAUNCH_PAGES of them).
        let mut vps: Vec<(u16, u64, Box<SevEsSaveArea>)> = Vec::new();
        walk(&file, opts, &mut |p| {
            if let Some(vp) = p.vp_index {
                vps.push((vp, p.gpa, SevEsSaveArea::from_page(p.contents)));
            }
        })
        .map_err(igvm_err)?;
        let refuse = |problem| RunError::IgvmLaunch {
            path: path.to_path_buf(),
            problem,
        };
        let Some((vp_index, gpa, vmsa)) = vps.first() else {
            return Err(refuse(LaunchProblem::NoBsp));
        };
        if *vp_index != 0 {
            return Err(refuse(LaunchProblem::FirstNotBsp { vp: *vp_index }));
        }
        if !classic && Gpa(*gpa).is_2m_aligned() {
            return Err(refuse(LaunchProblem::BspAligned { gpa: *gpa }));
        }
        if !classic && let Some((vp, gpa, _)) = vps.get(1) {
            return Err(refuse(LaunchProblem::MoreThanBsp { vp: *vp, gpa: *gpa }));
        }
        // The updates first, consecutive pages of one type (but VMSAs) merged into one; their
        // bytes start as fresh zeroed memory, which takes none until written, and a second
        // walk writes only the pages that are not zeros into them: an IGVM file's data-less
        // pages (a gibibyte from a 1.6 MB file) never take memory here.
        let mut updates: Vec<DataUpdate> = Vec::new();
        walk(&file, opts, &mut |p| {
            let Some(contents) = launched(&p, &areas, classic) else {
                return;
            };
            if let Some(last) = updates.last_mut()
                && last.page_type == p.page_type
                && p.page_type != SnpPageType::Vmsa
                && last.gpa.0.checked_add(last.len) == Some(p.gpa)
            {
                last.len += PAGE_SIZE;
                return;
            }
            updates.push(DataUpdate {
                gpa: Gpa(p.gpa),
                len: PAGE_SIZE,
                page_type: p.page_type,
                contents: contents.map(|_| Vec::new()),
                source: UpdateSource::Igvm,
            });
        })
        .map_err(igvm_err)?;
        // An SNP launch page is an RMP entry, whose GPA field ends at bit 50: a page at or above
        // 2^51 (up to the top of the 64-bit space, where the igvm crate allows one) cannot be
        // launched, and guest memory for it could not even be laid out.
        if let Some(d) = updates
            .iter()
            .find(|d| d.gpa.0.checked_add(d.len).is_none_or(|end| end > GPA_LIMIT))
        {
            return Err(refuse(LaunchProblem::BeyondRmp {
                gpa: d.gpa.0.max(GPA_LIMIT),
            }));
        }
        for d in &mut updates {
            if let Some(c) = &mut d.contents {
                *c = vec![0; d.len as usize];
            }
        }
        // The same walk again, page for page: each page is the next of the current update.
        let (mut at, mut offset) = (0, 0);
        walk(&file, opts, &mut |p| {
            let Some(contents) = launched(&p, &areas, classic) else {
                return;
            };
            // Both walks see the same pages; were they to differ, the launch's digest would not
            // be the file's, which the run reports.
            let Some(d) = updates.get_mut(at) else {
                return;
            };
            if let (Some(c), Some(new)) = (&mut d.contents, contents)
                && !is_zero(new)
            {
                c[offset..offset + new.len()].copy_from_slice(new);
            }
            offset += PAGE_SIZE as usize;
            if offset as u64 == d.len {
                (at, offset) = (at + 1, 0);
            }
        })
        .map_err(igvm_err)?;
        let features = vmsa.sev_features;
        if features & vmsa_core::layout::SEV_FEAT_SNP_ACTIVE == 0 {
            return Err(refuse(LaunchProblem::NotSnp { features }));
        }
        let config = VmConfig::snp(features & !vmsa_core::layout::SEV_FEAT_SNP_ACTIVE);
        let mut warnings = Vec::new();
        if !areas.not_supplied.is_empty() {
            warnings.push(format!(
                "--igvm {shown}: this loader supplies the VP count only; these parameters keep the file's initial \
                 data: {}",
                areas.not_supplied.join(", ")
            ));
        }
        let expected = if classic {
            // What KVM's sync writes for the VP context's registers, field by field.
            let synced = vmsa.synced(config.vmsa_features(), true);
            let lost: Vec<&str> = vmsa_core::layout::FIELD_OFFSETS
                .iter()
                .zip(
                    vmsa_core::layout::FIELD_OFFSETS
                        .iter()
                        .skip(1)
                        .map(|f| f.1)
                        .chain([PAGE_SIZE as usize]),
                )
                .filter(|((_, start), end)| vmsa.as_page()[*start..*end] != synced.as_page()[*start..*end])
                .map(|((name, _), _)| *name)
                .collect();
            warnings.push(if lost.is_empty() {
                "--igvm-classic: KVM's VMSA sync reproduces every field of the BSP's VP context".to_owned()
            } else {
                format!(
                    "--igvm-classic: KVM's VMSA sync does not reproduce these fields of the BSP's VP context: {}",
                    lost.join(", ")
                )
            });
            let checked = IgvmMeasureOptions {
                check_kvm: true,
                ..opts
            };
            match measure_file(&file, checked) {
                Err(e) => {
                    warnings.push(format!(
                        "--igvm-classic: no expected digest: the file breaks {}",
                        crate::run::error_chain(&e)
                    ));
                    None
                }
                Ok(_) if vcpus != 1 => {
                    warnings.push(format!(
                        "--igvm-classic: no expected digest: KVM measures one VMSA per vCPU ({vcpus}), the file one"
                    ));
                    None
                }
                Ok(m) => Some(LaunchDigest::Snp(m.digest).hex()),
            }
        } else {
            Some(LaunchDigest::Snp(measure_file(&file, opts).map_err(igvm_err)?.digest).hex())
        };
        let pages = updates
            .iter()
            .flat_map(|d| (0..d.len / PAGE_SIZE).map(move |i| Gpa(d.gpa.0 + i * PAGE_SIZE)))
            .collect();
        Ok(Self {
            source: format!(
                "IGVM {shown} ({} launch)",
                if classic { "classic" } else { "supplied-VMSA" }
            ),
            bsp: vmsa.clone(),
            updates,
            config,
            expected,
            warnings,
            supplied: !classic,
            pages,
        })
    }

    /// Data pages (a supplied VMSA page is counted as a VMSA).
    pub fn data_pages(&self) -> u64 {
        crate::measure::plan::data_pages(&self.updates)
    }
}

/// What a page of the walk puts into guest memory: `None` for a page the launch leaves out
/// (the VP context in the classic mode), else its bytes: the loader's parameters for a
/// parameter area, the page's contents, or none for a ZERO page.
fn launched<'a>(p: &IgvmPage<'a>, areas: &'a ParameterAreas, classic: bool) -> Option<Option<&'a [u8]>> {
    if p.vp_index.is_some() && classic {
        return None;
    }
    Some(match p.parameter_area.and_then(|i| areas.pages.get(&i)) {
        Some(params) => Some(&params[..]),
        None => (p.page_type != SnpPageType::Zero).then_some(&p.contents[..]),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use igvm::IgvmDirectiveHeader;
    use igvm_defs::IGVM_VHS_PARAMETER;

    use super::*;
    use crate::measure::igvm::guest_to_igvm;
    use crate::test_support::resident_bytes;

    /// An IGVM file in the temporary directory, removed when dropped.
    pub(crate) struct ScratchIgvm(PathBuf);

    impl std::ops::Deref for ScratchIgvm {
        type Target = std::path::Path;

        fn deref(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for ScratchIgvm {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// `file` serialised into the temporary directory under a name of this process's.
    pub(crate) fn scratch_igvm(name: &str, file: &igvm::IgvmFile) -> ScratchIgvm {
        let mut bytes = Vec::new();
        file.serialize(&mut bytes).unwrap();
        let path = std::env::temp_dir().join(format!("vmm-lib-test-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        ScratchIgvm(path)
    }

    #[test]
    fn a_supplied_launch_is_the_image_the_filled_parameter_page_and_the_vmsa_in_file_order() {
        let guest = backend_kvm::guest::builtin::ap_creation_igvm(false);
        let path = scratch_igvm("load-boot.igvm", &guest_to_igvm(&guest).unwrap());
        let l = IgvmLaunch::load(&path, 7, false, false).unwrap();
        let shape: Vec<(u64, u64, SnpPageType)> =
            l.updates.iter().map(|d| (d.gpa.0, d.len, d.page_type)).collect();
        assert_eq!(
            shape,
            [
                (0, guest.bytes.len() as u64, SnpPageType::Normal),
                (guest.params_gpa.0, PAGE_SIZE, SnpPageType::Unmeasured),
                (guest.vmsa_gpa.0, PAGE_SIZE, SnpPageType::Vmsa),
            ]
        );
        assert_eq!(l.updates[0].contents.as_deref(), Some(&guest.bytes[..]));
        let params = l.updates[1].contents.as_ref().unwrap();
        assert_eq!(params[..4], 7u32.to_le_bytes());
        assert!(params[4..].iter().all(|b| *b == 0));
        assert_eq!(l.updates[2].contents.as_deref(), Some(&guest.bsp.as_page()[..]));
        assert_eq!(l.bsp.as_page(), guest.bsp.as_page());
        assert!(l.supplied && l.warnings.is_empty());
        assert_eq!(l.config.sev_features, 0, "SNP_ACTIVE is KVM's to add");
        assert_eq!(l.data_pages(), guest.bytes.len() as u64 / PAGE_SIZE + 1);
        assert_eq!(l.pages.len() as u64, l.data_pages() + 1);
        // The digest is the file's, whatever the vCPU count.
        assert_eq!(
            IgvmLaunch::load(&path, 1, false, false).unwrap().expected,
            l.expected
        );
        // Classic: the VP context is no launch page.
        let c = IgvmLaunch::load(&path, 1, false, true).unwrap();
        assert!(!c.supplied);
        assert!(c.updates.iter().all(|d| d.page_type != SnpPageType::Vmsa));
    }

    /// Data-less pages were copied out as zeros: a file of 1.6 MB launching a gibibyte of them
    /// took a gibibyte of resident memory while it loaded. Their bytes are fresh zeroed
    /// memory now, never written; the pages with data around them land where they belong.
    #[test]
    fn data_less_pages_take_no_memory_when_loaded() {
        const ZEROS: u64 = 256 << 20;
        const FIRST: u64 = 0x1000_0000 - PAGE_SIZE;
        let guest = guest_to_igvm(&backend_kvm::guest::builtin::ap_creation_igvm(false)).unwrap();
        let page = |gpa, flags, data| IgvmDirectiveHeader::PageData {
            gpa,
            compatibility_mask: 1,
            flags,
            data_type: igvm_defs::IgvmPageDataType::NORMAL,
            data,
        };
        let two_m = igvm_defs::IgvmPageDataFlags::new().with_is_2mb_page(true);
        let mut directives = vec![page(FIRST, Default::default(), vec![0x5a; 4096])];
        directives.extend((0..ZEROS >> 21).map(|i| page(FIRST + PAGE_SIZE + (i << 21), two_m, Vec::new())));
        directives.push(page(
            FIRST + PAGE_SIZE + ZEROS,
            Default::default(),
            vec![0xa5; 4096],
        ));
        directives.extend(guest.directives().iter().cloned());
        let file = igvm::IgvmFile::new(
            igvm::IgvmRevision::V1,
            guest.platforms().to_vec(),
            guest.initializations().to_vec(),
            directives,
        )
        .unwrap();
        let path = scratch_igvm("data-less.igvm", &file);
        let before = resident_bytes();
        let l = IgvmLaunch::load(&path, 1, false, false).unwrap();
        let grown = resident_bytes().saturating_sub(before);
        assert!(
            grown < 64 << 20,
            "{grown} bytes resident for 256 MiB of data-less pages"
        );
        let d = &l.updates[0];
        assert_eq!((d.gpa.0, d.len), (FIRST, ZEROS + 2 * PAGE_SIZE), "one update");
        let c = d.contents.as_deref().unwrap();
        let page_at = |off: u64| &c[off as usize..(off + PAGE_SIZE) as usize];
        assert_eq!(page_at(0), [0x5a; 4096]);
        assert_eq!(page_at(PAGE_SIZE + ZEROS), [0xa5; 4096]);
        assert!(is_zero(page_at(PAGE_SIZE)) && is_zero(page_at(ZEROS)));
        assert_eq!(
            l.updates.len(),
            4,
            "then the guest's image, its parameters and its VMSA"
        );
    }

    #[test]
    fn parameters_the_loader_does_not_supply_are_named_in_a_warning() {
        let guest = backend_kvm::guest::builtin::ap_creation_igvm(false);
        let mut directives = guest_to_igvm(&guest).unwrap().directives().to_vec();
        // A command line and a memory map in the same area, before its insert.
        let insert = directives
            .iter()
            .position(|d| matches!(d, IgvmDirectiveHeader::ParameterInsert(_)))
            .unwrap();
        let at = |byte_offset| IGVM_VHS_PARAMETER {
            parameter_area_index: 0,
            byte_offset,
        };
        directives.insert(insert, IgvmDirectiveHeader::CommandLine(at(0x100)));
        directives.insert(insert, IgvmDirectiveHeader::MemoryMap(at(0x200)));
        let file = igvm::IgvmFile::new(
            igvm::IgvmRevision::V1,
            guest_to_igvm(&guest).unwrap().platforms().to_vec(),
            guest_to_igvm(&guest).unwrap().initializations().to_vec(),
            directives,
        )
        .unwrap();
        let path = scratch_igvm("load-params.igvm", &file);
        let l = IgvmLaunch::load(&path, 2, false, false).unwrap();
        assert_eq!(
            l.warnings,
            [format!(
                "--igvm {}: this loader supplies the VP count only; these parameters keep the file's initial data: \
                 memory map, command line",
                path.display()
            )]
        );
    }
}
