//! The built-in guest programs, ready to launch on either mode: the image bytes a VMM hands to
//! launch update and every vCPU's initial state.

use serde::Serialize;
use vmsa_core::{Gpa, SevEsSaveArea};

use super::layout::{
    self, CODE_GPA, GDT, GDT_GPA, IGVM_PARAMS_GPA, IGVM_VMSA_GPA, IGVM_VP_COUNT_OFFSET, MAX_REQUESTS,
    PARAMS_GPA, REQUESTS_GPA, STACK_TOP, params,
};
use super::program::PROGRAM;
use super::{IMAGE_END, image};

/// One AP-creation request the request-table guest issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GuestRequest {
    /// `sw_exit_info_1`: request type (31:0) and APIC ID (63:32).
    pub exit_info_1: u64,
    /// `sw_exit_info_2`: the VMSA GPA.
    pub exit_info_2: u64,
    /// RAX (SEV_FEATURES), if marked valid; `None` leaves it invalid.
    pub rax: Option<u64>,
    /// Write an AP VMSA at `exit_info_2` before asking (only for in-memory GPAs).
    pub write_vmsa: bool,
    /// After the answer, wait until this many AP reports came in all before the next request
    /// (0: go on at once). An AP's report comes after its VMSA was loaded and it ran, so a
    /// later request cannot end the run before it.
    pub then_wait_for_reports: u64,
}

impl GuestRequest {
    /// A raw request.
    pub fn new(request: u32, apic_id: u32, gpa: u64, rax: Option<u64>) -> Self {
        Self {
            exit_info_1: (u64::from(apic_id) << 32) | u64::from(request),
            exit_info_2: gpa,
            rax,
            write_vmsa: false,
            then_wait_for_reports: 0,
        }
    }

    /// `AP_CREATE` of `apic_id` from a VMSA the guest writes at `gpa` first.
    pub fn create_with_vmsa(apic_id: u32, gpa: u64, sev_features: u64) -> Self {
        Self {
            write_vmsa: true,
            ..Self::new(vmsa_core::ghcb::AP_CREATE, apic_id, gpa, Some(sev_features))
        }
    }

    /// This request, after whose answer the guest waits until `reports` AP reports came in all.
    pub fn then_wait_for_reports(self, reports: u64) -> Self {
        Self {
            then_wait_for_reports: reports,
            ..self
        }
    }
}

/// The built-in guest programs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum GuestProgram {
    /// The BSP creates every AP from a VMSA it writes, waits for their reports and, if
    /// `recreate`, destroys AP 1 and creates it again.
    ApCreation {
        /// Destroy and re-create AP 1 after the first round.
        recreate: bool,
    },
    /// The BSP issues the given requests and records the answers, then waits for
    /// `expect_reports` AP reports.
    Requests {
        /// The requests, in order (at most 64).
        requests: Vec<GuestRequest>,
        /// AP reports to wait for.
        expect_reports: u64,
    },
    /// The BSP loops forever without an exit (`jmp $`): the run ends only by the watchdog,
    /// with `timed_out` set. For checking that a stuck vCPU cannot hang the VMM.
    Spin,
    /// The BSP halts (`hlt`) with nothing to wake it: KVM keeps it halted inside `KVM_RUN` (its
    /// local APIC is in the kernel) until the watchdog's kick. For checking that a halted vCPU
    /// cannot hang the VMM either.
    Halt,
}

/// A built-in guest ready to launch: its image (guest-physical bytes `gpa..gpa + bytes.len()`)
/// and the initial state of every vCPU, by APIC ID.
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// Where the image starts.
    pub gpa: Gpa,
    /// The image, whole pages.
    pub bytes: Vec<u8>,
    /// Each vCPU's initial state (the BSP's entry and arguments; the APs' entry).
    pub vmsas: Vec<Box<SevEsSaveArea>>,
}

/// The AP-creation program as an IGVM file carries it, for the supplied-VMSA launch: its image
/// and the BSP's VMSA are the same whatever the vCPU count, so its launch digest is too. The
/// count reaches the guest as the IGVM VP-count parameter, which the loader writes into a
/// parameter page inserted at launch as UNMEASURED (the BSP starts at [`Entries::igvm`], which
/// reads and checks it).
///
/// [`Entries::igvm`]: super::program::Entries::igvm
#[derive(Clone, Debug)]
pub struct IgvmGuest {
    /// Where the image starts.
    pub gpa: Gpa,
    /// The image, whole pages (its `params::N_VCPUS` is 0: the count is the loader's).
    pub bytes: Vec<u8>,
    /// The page the IGVM parameter area is inserted at.
    pub params_gpa: Gpa,
    /// Where the VP count (a u32) goes in that page.
    pub vp_count_offset: u32,
    /// The BSP's VMSA: the IGVM file's SNP VP context (SEV_FEATURES: SNP_ACTIVE alone).
    pub bsp: Box<SevEsSaveArea>,
    /// Where the BSP's VMSA is supplied.
    pub vmsa_gpa: Gpa,
}

/// The AP-creation program (`recreate`: destroy and re-create AP 1 after the first round) as
/// an IGVM file carries it (see [`IgvmGuest`]).
pub fn ap_creation_igvm(recreate: bool) -> IgvmGuest {
    let flags = if recreate { params::FLAG_RECREATE } else { 0 };
    let mut bsp = layout::long_mode_image(PROGRAM.entries.igvm);
    bsp.rsp = STACK_TOP;
    bsp.sev_features = vmsa_core::layout::SEV_FEAT_SNP_ACTIVE;
    IgvmGuest {
        gpa: Gpa(0),
        bytes: image(&PROGRAM, 0, flags),
        params_gpa: Gpa(IGVM_PARAMS_GPA),
        vp_count_offset: IGVM_VP_COUNT_OFFSET,
        bsp,
        vmsa_gpa: Gpa(IGVM_VMSA_GPA),
    }
}

/// Why a built-in guest cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum GuestImageError {
    /// The SNP mode's guest code did not assemble.
    #[error("assembling the SNP guest's code failed: {0}")]
    Assemble(#[from] iced_x86::IcedError),
    /// The host's CPUID has no C-bit position (leaf 0x8000001F `EBX[5:0]` is 0).
    #[error("CPUID 0x8000001F reports no C-bit position (EBX = {ebx:#x})")]
    NoCBit {
        /// EBX of leaf 0x8000001F.
        ebx: u32,
    },
    /// Reading the host's CPUID failed.
    #[error(transparent)]
    Ioctl(#[from] crate::error::IoctlError),
    /// The request table is full.
    #[error("the request-table guest takes at most {MAX_REQUESTS} requests, got {0}")]
    TooManyRequests(usize),
}

impl GuestProgram {
    /// The image and initial states of this program on `vcpus` vCPUs (VMSA-image mode: the
    /// guest creates its APs through the GHCB doorbell).
    pub fn image(&self, vcpus: u32) -> Result<GuestImage, GuestImageError> {
        let (flags, entry, bsp_rdi) = match self {
            Self::ApCreation { recreate } => (
                if *recreate { params::FLAG_RECREATE } else { 0 },
                PROGRAM.entries.scenario,
                u64::from(vcpus),
            ),
            Self::Requests { requests, .. } => {
                if requests.len() > MAX_REQUESTS {
                    return Err(GuestImageError::TooManyRequests(requests.len()));
                }
                (0, PROGRAM.entries.requests, requests.len() as u64)
            }
            Self::Spin => (0, PROGRAM.entries.spin, 0),
            Self::Halt => (0, PROGRAM.entries.halt, 0),
        };
        let mut bytes = image(&PROGRAM, vcpus, flags);
        if let Self::Requests {
            requests,
            expect_reports,
        } = self
        {
            let mut put = |gpa: u64, v: u64| {
                bytes[gpa as usize..gpa as usize + 8].copy_from_slice(&v.to_le_bytes());
            };
            for (i, r) in requests.iter().enumerate() {
                let at = REQUESTS_GPA + i as u64 * 32;
                put(at, r.exit_info_1);
                put(at + 8, r.exit_info_2);
                put(at + 16, r.rax.unwrap_or(0));
                put(
                    at + 24,
                    u64::from(r.rax.is_some())
                        | (u64::from(r.write_vmsa) << 1)
                        | (r.then_wait_for_reports << 8),
                );
            }
            put(PARAMS_GPA + params::N_REQUESTS, requests.len() as u64);
            put(PARAMS_GPA + params::EXPECT_REPORTS, *expect_reports);
        }
        let vmsas = (0..vcpus)
            .map(|id| {
                if id == 0 {
                    let mut bsp = layout::long_mode_image(entry);
                    bsp.rdi = bsp_rdi;
                    bsp.rsp = STACK_TOP;
                    bsp
                } else {
                    layout::long_mode_image(PROGRAM.entries.ap)
                }
            })
            .collect();
        Ok(GuestImage {
            gpa: Gpa(0),
            bytes,
            vmsas,
        })
    }

    /// The guest memory the program needs on `vcpus` vCPUs.
    pub fn min_memory(vcpus: u32) -> u64 {
        layout::min_memory(vcpus).max(IMAGE_END)
    }
}

/// The SEV-SNP guest's code (SNP mode): terminate through the GHCB MSR protocol
/// (`GHCB_MSR_TERM_REQ` written to the GHCB MSR, then VMGEXIT = `rep; vmmcall`), as the KVM
/// selftests' SNP guests end.
pub fn snp_terminate_code() -> Result<Vec<u8>, iced_x86::IcedError> {
    use iced_x86::code_asm::{CodeAssembler, eax, ecx, edx};
    let mut a = CodeAssembler::new(64)?;
    a.mov(ecx, vmsa_core::ghcb::GHCB_MSR)?;
    a.mov(eax, vmsa_host::GHCB_MSR_TERM_REQ as u32)?;
    a.xor(edx, edx)?;
    a.wrmsr()?;
    a.db(&[0xf3, 0x0f, 0x01, 0xd9])?;
    a.hlt()?;
    a.assemble(CODE_GPA)
}

/// The SEV-SNP guest (SNP mode) on `vcpus` vCPUs: the GDT, page tables with the C-bit at bit
/// `c_bit` of every entry, and [`snp_terminate_code`]; every vCPU starts in long mode there.
pub fn snp_terminate(c_bit: u32, vcpus: u32) -> Result<GuestImage, GuestImageError> {
    let c = 1u64 << c_bit;
    let mut bytes = vec![0u8; (CODE_GPA + 4096) as usize];
    let mut put =
        |gpa: u64, data: &[u8]| bytes[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
    put(
        GDT_GPA,
        &GDT.iter().flat_map(|e| e.to_le_bytes()).collect::<Vec<u8>>(),
    );
    for (gpa, entries) in layout::page_tables() {
        put(
            gpa,
            &entries
                .iter()
                .flat_map(|e| (e | c).to_le_bytes())
                .collect::<Vec<u8>>(),
        );
    }
    put(CODE_GPA, &snp_terminate_code()?);
    let vmsas = (0..vcpus)
        .map(|_| {
            let mut img = layout::long_mode_image(CODE_GPA);
            img.cr3 |= c;
            img
        })
        .collect();
    Ok(GuestImage {
        gpa: Gpa(0),
        bytes,
        vmsas,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snp_guest_terminates_through_the_ghcb_msr() {
        // mov ecx, 0xC0010130; mov eax, 0x100; xor edx, edx; wrmsr; rep vmmcall; hlt.
        assert_eq!(
            snp_terminate_code().unwrap(),
            vec![
                0xb9, 0x30, 0x01, 0x01, 0xc0, 0xb8, 0x00, 0x01, 0x00, 0x00, 0x31, 0xd2, 0x0f, 0x30, 0xf3,
                0x0f, 0x01, 0xd9, 0xf4
            ]
        );
    }

    #[test]
    fn snp_image_sets_the_c_bit_in_every_table_entry_and_cr3() {
        let g = snp_terminate(47, 2).unwrap();
        let at = |gpa: u64| u64::from_le_bytes(g.bytes[gpa as usize..gpa as usize + 8].try_into().unwrap());
        assert_eq!(at(layout::PML4_GPA), layout::PDPT_GPA | 3 | (1 << 47));
        assert_eq!(at(layout::PD_GPA + 8), (1 << 21) | 0x83 | (1 << 47));
        assert_eq!(g.bytes.len() as u64, CODE_GPA + 4096);
        assert!(
            g.vmsas
                .iter()
                .all(|v| v.cr3 & (1 << 47) != 0 && v.rip == CODE_GPA)
        );
    }

    #[test]
    fn the_igvm_form_does_not_depend_on_the_vcpu_count() {
        for recreate in [false, true] {
            let g = ap_creation_igvm(recreate);
            let classic = GuestProgram::ApCreation { recreate }.image(4).unwrap();
            // The same program, parameters and template; only the vCPU count differs (0: the
            // loader's parameter carries it).
            let n = (PARAMS_GPA + params::N_VCPUS) as usize;
            assert_eq!(g.bytes[..n], classic.bytes[..n]);
            assert_eq!(g.bytes[n..n + 8], [0; 8]);
            assert_eq!(classic.bytes[n..n + 8], 4u64.to_le_bytes());
            assert_eq!(g.bytes[n + 8..], classic.bytes[n + 8..]);
            // The BSP enters the IGVM entry with the scenario's stack, an SNP VMSA.
            assert_eq!(g.bsp.rip, PROGRAM.entries.igvm);
            assert_ne!(g.bsp.rip, classic.vmsas[0].rip);
            assert_eq!((g.bsp.rsp, g.bsp.rdi), (STACK_TOP, 0));
            assert_eq!(g.bsp.sev_features, vmsa_core::layout::SEV_FEAT_SNP_ACTIVE);
            // The parameter page and the VMSA lie outside the image, inside the program's map.
            let end = g.gpa.0 + g.bytes.len() as u64;
            for at in [g.params_gpa.0, g.vmsa_gpa.0] {
                assert!(at >= end && at + 0x1000 <= layout::VMSA_BASE, "{at:#x}");
            }
            assert!(!g.vmsa_gpa.is_2m_aligned());
        }
    }

    #[test]
    fn request_tables_are_bounded_and_written_into_the_image() {
        let too_many = GuestProgram::Requests {
            requests: vec![GuestRequest::new(1, 1, 0x1000, None); MAX_REQUESTS + 1],
            expect_reports: 0,
        };
        assert!(matches!(
            too_many.image(2),
            Err(GuestImageError::TooManyRequests(65))
        ));
        let one = GuestProgram::Requests {
            requests: vec![
                GuestRequest::new(1, 3, 0x5000, Some(1)),
                GuestRequest::create_with_vmsa(2, 0x6000, 1).then_wait_for_reports(1),
            ],
            expect_reports: 0,
        };
        let g = one.image(4).unwrap();
        let at = |gpa: u64| u64::from_le_bytes(g.bytes[gpa as usize..gpa as usize + 8].try_into().unwrap());
        assert_eq!(at(REQUESTS_GPA), (3 << 32) | 1);
        assert_eq!(at(REQUESTS_GPA + 8), 0x5000);
        assert_eq!(at(REQUESTS_GPA + 24), 1, "RAX valid, no VMSA write");
        assert_eq!(
            at(REQUESTS_GPA + 32 + 24),
            (1 << 8) | 0b11,
            "RAX valid, VMSA written, then wait for one report"
        );
        assert_eq!(at(PARAMS_GPA + params::N_REQUESTS), 2);
        assert_eq!(g.vmsas[0].rdi, 2);
        assert_eq!(g.vmsas.len(), 4);
    }
}
