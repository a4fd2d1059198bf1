//! The GHCB (Guest-Hypervisor Communication Block, GHCB spec AMD pub. 56421) as a hypervisor
//! reads it, and the "SNP AP Creation" NAE event (§4.1.9, exit code 0x8000_0013) with its
//! validation, following the rules and error codes of Linux `arch/x86/kvm/svm/sev.c`
//! (`sev_es_validate_vmgexit`, `sev_snp_ap_creation`).
//!
//! Everything here is a pure function of values or of the 4 KiB GHCB page's bytes
//! ([`GhcbPage`]), so a userspace VMM that handles AP creation itself (as Cloud Hypervisor's
//! MSHV path does) can copy the page out of guest memory, decode it, check it, validate the
//! request, and copy the page back with the answer:
//!
//! ```
//! use vmsa_core::ghcb::{self, ApCreationRules, GhcbPage, GhcbRequest};
//! use vmsa_core::layout::SEV_FEAT_SNP_ACTIVE;
//! use vmsa_core::{ApRequest, VcpuId, VmKind};
//!
//! // What the VMM knows about its guest.
//! let rules = ApCreationRules {
//!     kind: VmKind::Snp,
//!     vmsa_features: SEV_FEAT_SNP_ACTIVE,
//!     max_phys_bits: 48,
//! };
//! let apic_ids = [0, 1, 2, 3];
//!
//! // vCPU 0 asked for AP 2 to start from the VMSA at 0x10_3000 (here the guest's side is
//! // written with `encode`; a VMM copies the page out of guest memory at the GHCB GPA).
//! let mut page: GhcbPage = [0; ghcb::GHCB_PAGE_SIZE];
//! GhcbRequest::new_ap_creation(ghcb::AP_CREATE, 2, 0x10_3000, Some(SEV_FEAT_SNP_ACTIVE))
//!     .encode(&mut page);
//!
//! // The VMM's side of the VMGEXIT.
//! let req = GhcbRequest::decode(&page);
//! let (info1, info2) = match req.check() {
//!     Err(refused) => refused.sw_exit_info(),
//!     Ok(()) => match rules.validate(&req.ap_creation_request(VcpuId(0)), |apic| {
//!         apic_ids.contains(&apic)
//!     }) {
//!         Ok(valid) => {
//!             assert_eq!(valid.request, ApRequest::Create);
//!             assert_eq!((valid.apic_id, valid.gpa.map(|g| g.raw())), (2, Some(0x10_3000)));
//!             // ... point vCPU 2 at the VMSA at `valid.gpa` and kick it ...
//!             (0, 0)
//!         }
//!         Err(refused) => refused.sw_exit_info(),
//!     },
//! };
//! ghcb::write_response(&mut page, info1, info2);
//! // ... copy `page` back to guest memory and resume vCPU 0 ...
//!
//! let answered = GhcbRequest::decode(&page);
//! assert_eq!((answered.exit_info_1, answered.exit_info_2), (0, 0));
//! ```

use crate::addr::Gpa;
use crate::state::{VcpuId, VmKind};

/// `SVM_VMGEXIT_AP_CREATION`: the NAE exit code of an AP-creation request.
pub const SVM_VMGEXIT_AP_CREATION: u64 = 0x8000_0013;
/// `SVM_VMGEXIT_AP_CREATE_ON_INIT`: install the VMSA at the target's next INIT.
pub const AP_CREATE_ON_INIT: u32 = 0;
/// `SVM_VMGEXIT_AP_CREATE`: install the VMSA now and make the target runnable.
pub const AP_CREATE: u32 = 1;
/// `SVM_VMGEXIT_AP_DESTROY`: remove the target's VMSA and halt it.
pub const AP_DESTROY: u32 = 2;

/// `GHCB_HV_RESP_MALFORMED_INPUT`: the `sw_exit_info_1` a refused request gets back.
pub const GHCB_HV_RESP_MALFORMED_INPUT: u64 = 2;
/// `GHCB_ERR_MISSING_INPUT`: a required GHCB field was not marked valid.
pub const GHCB_ERR_MISSING_INPUT: u64 = 4;
/// `GHCB_ERR_INVALID_INPUT`: a field held a value the hypervisor refuses.
pub const GHCB_ERR_INVALID_INPUT: u64 = 5;
/// `GHCB_ERR_INVALID_EVENT`: the event is not supported for this guest.
pub const GHCB_ERR_INVALID_EVENT: u64 = 6;

/// The three AP-creation requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum ApRequest {
    /// Record the VMSA; install it when the target receives INIT.
    CreateOnInit,
    /// Record the VMSA and make the target apply it now.
    Create,
    /// Forget the target's VMSA and halt it.
    Destroy,
}

impl ApRequest {
    /// The request from the low 32 bits of `exit_info_1`.
    pub fn from_raw(v: u32) -> Option<Self> {
        match v {
            AP_CREATE_ON_INIT => Some(Self::CreateOnInit),
            AP_CREATE => Some(Self::Create),
            AP_DESTROY => Some(Self::Destroy),
            _ => None,
        }
    }

    /// The request's ABI number.
    pub fn raw(self) -> u32 {
        match self {
            Self::CreateOnInit => AP_CREATE_ON_INIT,
            Self::Create => AP_CREATE,
            Self::Destroy => AP_DESTROY,
        }
    }
}

/// An AP-creation request exactly as the guest put it in its GHCB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApCreationRequest {
    /// The vCPU that made the VMGEXIT.
    pub requester: VcpuId,
    /// `sw_exit_info_1`: request type in bits 31:0, target APIC ID in bits 63:32.
    pub exit_info_1: u64,
    /// `sw_exit_info_2`: the guest-physical address of the new VMSA.
    pub exit_info_2: u64,
    /// RAX, if the guest marked it valid: the SEV_FEATURES the new VMSA runs with.
    pub rax: Option<u64>,
}

impl ApCreationRequest {
    /// A request from its parts.
    pub fn new(requester: VcpuId, request: u32, apic_id: u32, gpa: u64, sev_features: Option<u64>) -> Self {
        Self {
            requester,
            exit_info_1: (u64::from(apic_id) << 32) | u64::from(request),
            exit_info_2: gpa,
            rax: sev_features,
        }
    }

    /// The raw request type (`lower_32_bits(exit_info_1)`).
    pub fn request(&self) -> u32 {
        self.exit_info_1 as u32
    }

    /// The target APIC ID (`upper_32_bits(exit_info_1)`).
    pub fn apic_id(&self) -> u32 {
        (self.exit_info_1 >> 32) as u32
    }

    /// The requested VMSA address.
    pub fn gpa(&self) -> Gpa {
        Gpa(self.exit_info_2)
    }
}

/// Why an AP-creation request was refused. The guest sees `sw_exit_info_1 = 2` and
/// `sw_exit_info_2 =` [`ApCreationError::ghcb_error`]; the target vCPU is left unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApCreationError {
    /// The VM runs no guest: its launch has not finished, or it is bugged or dead. A VMGEXIT
    /// only comes from a launched, running guest (KVM reaches `sev_snp_ap_creation` from
    /// `sev_handle_vmgexit` inside KVM_RUN, which a bugged or dead VM refuses).
    #[error("no guest runs in this VM ({why}), so no vCPU can ask for AP creation")]
    NotRunning {
        /// Why nothing runs.
        why: &'static str,
    },
    /// AP creation exists only for SEV-SNP guests. KVM's `sev_es_validate_vmgexit` refuses it
    /// for any other guest after setting `reason = GHCB_ERR_MISSING_INPUT` (the exit code is one
    /// it knows, so not `GHCB_ERR_INVALID_EVENT`): the guest gets `(2, 4)`.
    #[error("AP creation is an SEV-SNP event; this is an {kind} guest")]
    NotSnp {
        /// The guest's kind.
        kind: VmKind,
    },
    /// CREATE and CREATE_ON_INIT need RAX (the AP's SEV_FEATURES) marked valid.
    #[error("AP creation request {request} needs RAX (the AP's SEV_FEATURES) marked valid in the GHCB")]
    MissingRax {
        /// The raw request type.
        request: u32,
    },
    /// No vCPU has the target APIC ID.
    #[error("unknown APIC ID {apic_id}: no vCPU has it")]
    UnknownApicId {
        /// The APIC ID asked for.
        apic_id: u32,
    },
    /// The request type is not 0, 1 or 2.
    #[error("unknown AP creation request {request} (0 CREATE_ON_INIT, 1 CREATE, 2 DESTROY)")]
    UnknownRequest {
        /// The raw request type.
        request: u32,
    },
    /// The AP would run with other SEV features than the VM was launched with.
    #[error("AP SEV_FEATURES {requested:#x} differ from the VM's {vm:#x}")]
    SevFeaturesMismatch {
        /// RAX from the GHCB.
        requested: u64,
        /// The VM's `vmsa_features`.
        vm: u64,
    },
    /// The VMSA GPA is not 4 KiB aligned.
    #[error("VMSA GPA {gpa} is not 4 KiB aligned")]
    Unaligned {
        /// The address.
        gpa: Gpa,
    },
    /// The VMSA GPA lies beyond the guest's physical address width.
    #[error("VMSA GPA {gpa} is beyond the guest MAXPHYADDR of {bits} bits")]
    BeyondMaxPhysAddr {
        /// The address.
        gpa: Gpa,
        /// The guest MAXPHYADDR.
        bits: u8,
    },
    /// The VMSA GPA is 2 MiB aligned, which AMD erratum 1467 forbids.
    #[error("VMSA GPA {gpa} is 2 MiB aligned (AMD erratum 1467 forbids a VMSA there)")]
    Erratum1467 {
        /// The address.
        gpa: Gpa,
    },
}

impl ApCreationError {
    /// The GHCB error code the guest receives in `sw_exit_info_2`.
    pub fn ghcb_error(&self) -> u64 {
        match self {
            Self::NotSnp { .. } | Self::MissingRax { .. } => GHCB_ERR_MISSING_INPUT,
            _ => GHCB_ERR_INVALID_INPUT,
        }
    }

    /// `(sw_exit_info_1, sw_exit_info_2)` for the guest.
    pub fn sw_exit_info(&self) -> (u64, u64) {
        (GHCB_HV_RESP_MALFORMED_INPUT, self.ghcb_error())
    }
}

/// What a hypervisor must know about its guest to validate an AP-creation request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApCreationRules {
    /// The guest's kind: only SEV-SNP guests may create APs.
    pub kind: VmKind,
    /// The SEV_FEATURES the VM was launched with; every AP must run with exactly these.
    pub vmsa_features: u64,
    /// The guest MAXPHYADDR: a VMSA GPA must fit in this many bits.
    pub max_phys_bits: u8,
}

/// A request that passed every check of [`ApCreationRules::validate`], decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValidApRequest {
    /// What to do with the target.
    pub request: ApRequest,
    /// The target vCPU's APIC ID (one `target_exists` accepted).
    pub apic_id: u32,
    /// The page-aligned VMSA address the target must run from: `Some` for CREATE and
    /// CREATE_ON_INIT, `None` for DESTROY.
    pub gpa: Option<Gpa>,
}

impl ApCreationRules {
    /// The checks of KVM's `sev_es_validate_vmgexit` and `sev_snp_ap_creation`, in their order.
    /// `target_exists` answers whether a vCPU has the APIC ID. On error answer the guest with
    /// [`ApCreationError::sw_exit_info`]; the request must change nothing.
    pub fn validate(
        &self,
        req: &ApCreationRequest,
        target_exists: impl FnOnce(u32) -> bool,
    ) -> Result<ValidApRequest, ApCreationError> {
        if self.kind != VmKind::Snp {
            return Err(ApCreationError::NotSnp { kind: self.kind });
        }
        let raw = req.request();
        if raw != AP_DESTROY && req.rax.is_none() {
            return Err(ApCreationError::MissingRax { request: raw });
        }
        let apic_id = req.apic_id();
        if !target_exists(apic_id) {
            return Err(ApCreationError::UnknownApicId { apic_id });
        }
        let request = ApRequest::from_raw(raw).ok_or(ApCreationError::UnknownRequest { request: raw })?;
        if request == ApRequest::Destroy {
            return Ok(ValidApRequest {
                request,
                apic_id,
                gpa: None,
            });
        }
        let requested = req.rax.unwrap_or_default();
        if requested != self.vmsa_features {
            return Err(ApCreationError::SevFeaturesMismatch {
                requested,
                vm: self.vmsa_features,
            });
        }
        let gpa = req.gpa();
        if !gpa.is_page_aligned() {
            return Err(ApCreationError::Unaligned { gpa });
        }
        if !gpa.fits_phys_bits(self.max_phys_bits) {
            return Err(ApCreationError::BeyondMaxPhysAddr {
                gpa,
                bits: self.max_phys_bits,
            });
        }
        if gpa.is_2m_aligned() {
            return Err(ApCreationError::Erratum1467 { gpa });
        }
        Ok(ValidApRequest {
            request,
            apic_id,
            gpa: Some(gpa),
        })
    }
}

/// `MSR_AMD64_SEV_ES_GHCB`: the GHCB MSR, holding the GHCB's GPA (GHCB spec §2.3.1).
pub const GHCB_MSR: u32 = 0xc001_0130;
/// The size of the GHCB page (`struct ghcb` is one 4 KiB page).
pub const GHCB_PAGE_SIZE: usize = 4096;
/// The bytes of a GHCB page, as a hypervisor copies them out of (and back into) guest memory.
pub type GhcbPage = [u8; GHCB_PAGE_SIZE];

/// Offset of RAX in the GHCB save area (Linux `struct ghcb_save_area`, GHCB spec table 3).
pub const RAX: u64 = 0x1f8;
/// Offset of `sw_exit_code`.
pub const SW_EXIT_CODE: u64 = 0x390;
/// Offset of `sw_exit_info_1`.
pub const SW_EXIT_INFO_1: u64 = 0x398;
/// Offset of `sw_exit_info_2`.
pub const SW_EXIT_INFO_2: u64 = 0x3a0;
/// Offset of the 16-byte valid bitmap (`valid_bitmap`).
pub const VALID_BITMAP: u64 = 0x3f0;
/// Offset of `protocol_version` (u16).
pub const PROTOCOL_VERSION: u64 = 0xffa;
/// Offset of `ghcb_usage` (u32).
pub const USAGE: u64 = 0xffc;
/// `GHCB_ERR_INVALID_USAGE`: `ghcb_usage` is not 0 (the standard format).
pub const GHCB_ERR_INVALID_USAGE: u64 = 2;

/// `(qword of the valid bitmap, bit mask)` that marks the save-area field at `offset` valid:
/// its bit is the offset divided by 8 (`GHCB_BITMAP_IDX` in Linux `arch/x86/include/asm/svm.h`).
pub const fn valid_bit(offset: u64) -> (u64, u64) {
    let idx = offset / 8;
    (idx / 64, 1 << (idx % 64))
}

fn get_u64(page: &GhcbPage, offset: u64) -> u64 {
    let at = offset as usize;
    let mut b = [0; 8];
    b.copy_from_slice(&page[at..at + 8]);
    u64::from_le_bytes(b)
}

fn put_u64(page: &mut GhcbPage, offset: u64, value: u64) {
    let at = offset as usize;
    page[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

/// A GHCB the guest handed over with a VMGEXIT: the fields this hypervisor reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct GhcbRequest {
    /// `sw_exit_code`: the NAE event.
    pub exit_code: u64,
    /// `sw_exit_info_1`.
    pub exit_info_1: u64,
    /// `sw_exit_info_2`.
    pub exit_info_2: u64,
    /// RAX, if marked valid.
    pub rax: Option<u64>,
    /// `ghcb_usage`.
    pub usage: u32,
    /// The valid bitmap, as two little-endian qwords.
    pub valid: [u64; 2],
}

impl GhcbRequest {
    /// An AP-creation request as a guest fills it in: `sw_exit_code`, both exit infos (request
    /// type and APIC ID, VMSA GPA) and, if given, RAX (the AP's SEV_FEATURES) marked valid,
    /// usage 0.
    pub fn new_ap_creation(request: u32, apic_id: u32, gpa: u64, sev_features: Option<u64>) -> Self {
        let (_, rax) = valid_bit(RAX);
        Self {
            exit_code: SVM_VMGEXIT_AP_CREATION,
            exit_info_1: (u64::from(apic_id) << 32) | u64::from(request),
            exit_info_2: gpa,
            rax: sev_features,
            usage: 0,
            valid: [
                if sev_features.is_some() { rax } else { 0 },
                valid_bit(SW_EXIT_CODE).1 | valid_bit(SW_EXIT_INFO_1).1 | valid_bit(SW_EXIT_INFO_2).1,
            ],
        }
    }

    /// Decode the request from the GHCB page's bytes.
    pub fn decode(page: &GhcbPage) -> Self {
        let valid = [get_u64(page, VALID_BITMAP), get_u64(page, VALID_BITMAP + 8)];
        let at = USAGE as usize;
        let usage = u32::from_le_bytes([page[at], page[at + 1], page[at + 2], page[at + 3]]);
        let mut req = Self {
            exit_code: get_u64(page, SW_EXIT_CODE),
            exit_info_1: get_u64(page, SW_EXIT_INFO_1),
            exit_info_2: get_u64(page, SW_EXIT_INFO_2),
            rax: None,
            usage,
            valid,
        };
        if req.is_valid(RAX) {
            req.rax = Some(get_u64(page, RAX));
        }
        req
    }

    /// Write the request into a GHCB page as the guest would: the fields, `ghcb_usage`, and
    /// the valid bitmap as given (with RAX's bit set if `rax` is `Some`). Other bytes are kept.
    pub fn encode(&self, page: &mut GhcbPage) {
        let mut valid = self.valid;
        if let Some(rax) = self.rax {
            put_u64(page, RAX, rax);
            let (q, m) = valid_bit(RAX);
            valid[q as usize] |= m;
        }
        put_u64(page, SW_EXIT_CODE, self.exit_code);
        put_u64(page, SW_EXIT_INFO_1, self.exit_info_1);
        put_u64(page, SW_EXIT_INFO_2, self.exit_info_2);
        put_u64(page, VALID_BITMAP, valid[0]);
        put_u64(page, VALID_BITMAP + 8, valid[1]);
        let at = USAGE as usize;
        page[at..at + 4].copy_from_slice(&self.usage.to_le_bytes());
    }

    /// Whether the save-area field at `offset` is marked valid. The bitmap covers the save
    /// area (offsets below 0x400); a field past it is never valid.
    pub fn is_valid(&self, offset: u64) -> bool {
        let (q, m) = valid_bit(offset);
        usize::try_from(q)
            .ok()
            .and_then(|q| self.valid.get(q))
            .is_some_and(|w| w & m != 0)
    }

    /// The protocol-level checks of KVM's `sev_es_validate_vmgexit`, in its order: usage 0,
    /// then `sw_exit_code` and both exit infos valid, then an exit code this hypervisor
    /// handles (AP creation only). The AP-creation rules proper are
    /// [`ApCreationRules::validate`].
    pub fn check(&self) -> Result<(), GhcbError> {
        if self.usage != 0 {
            return Err(GhcbError::InvalidUsage { usage: self.usage });
        }
        if !(self.is_valid(SW_EXIT_CODE) && self.is_valid(SW_EXIT_INFO_1) && self.is_valid(SW_EXIT_INFO_2)) {
            return Err(GhcbError::MissingInput { valid: self.valid });
        }
        if self.exit_code != SVM_VMGEXIT_AP_CREATION {
            return Err(GhcbError::InvalidEvent {
                exit_code: self.exit_code,
            });
        }
        Ok(())
    }

    /// [`GhcbRequest::check`] as the guest sees a refusal: `(sw_exit_info_1, sw_exit_info_2)`,
    /// or `None` if the request may go on to the AP-creation rules.
    pub fn precheck(&self) -> Option<(u64, u64)> {
        self.check().err().map(|e| e.sw_exit_info())
    }

    /// The AP-creation request this GHCB carries, made by the vCPU `requester`.
    pub fn ap_creation_request(&self, requester: VcpuId) -> ApCreationRequest {
        ApCreationRequest {
            requester,
            exit_info_1: self.exit_info_1,
            exit_info_2: self.exit_info_2,
            rax: self.rax,
        }
    }
}

/// Why a GHCB was refused before its event was looked at ([`GhcbRequest::check`]). The guest
/// sees `sw_exit_info_1 = 2` and `sw_exit_info_2 =` [`GhcbError::ghcb_error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GhcbError {
    /// `ghcb_usage` is not 0.
    #[error("GHCB usage {usage:#x} is not 0 (the only supported format)")]
    InvalidUsage {
        /// The usage the guest gave.
        usage: u32,
    },
    /// `sw_exit_code`, `sw_exit_info_1` or `sw_exit_info_2` is not marked valid.
    #[error(
        "GHCB sw_exit_code, sw_exit_info_1 and sw_exit_info_2 must be marked valid (bitmap {:#x}_{:016x})",
        valid[1],
        valid[0]
    )]
    MissingInput {
        /// The valid bitmap the guest gave.
        valid: [u64; 2],
    },
    /// The exit code is not one this hypervisor handles.
    #[error("GHCB exit code {exit_code:#x} is not AP creation (0x80000013)")]
    InvalidEvent {
        /// The exit code the guest gave.
        exit_code: u64,
    },
}

impl GhcbError {
    /// The GHCB error code the guest receives in `sw_exit_info_2`.
    pub fn ghcb_error(&self) -> u64 {
        match self {
            Self::InvalidUsage { .. } => GHCB_ERR_INVALID_USAGE,
            Self::MissingInput { .. } => GHCB_ERR_MISSING_INPUT,
            Self::InvalidEvent { .. } => GHCB_ERR_INVALID_EVENT,
        }
    }

    /// `(sw_exit_info_1, sw_exit_info_2)` for the guest.
    pub fn sw_exit_info(&self) -> (u64, u64) {
        (GHCB_HV_RESP_MALFORMED_INPUT, self.ghcb_error())
    }
}

/// Write the hypervisor's answer into a GHCB page: `sw_exit_info_1` and `sw_exit_info_2`, both
/// marked valid (the other valid bits are kept), as KVM's `ghcb_set_sw_exit_info_1/2` do.
pub fn write_response(page: &mut GhcbPage, info_1: u64, info_2: u64) {
    put_u64(page, SW_EXIT_INFO_1, info_1);
    put_u64(page, SW_EXIT_INFO_2, info_2);
    let (q, m1) = valid_bit(SW_EXIT_INFO_1);
    let (_, m2) = valid_bit(SW_EXIT_INFO_2);
    let at = VALID_BITMAP + q * 8;
    put_u64(page, at, get_u64(page, at) | m1 | m2);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::SEV_FEAT_SNP_ACTIVE;
    use std::string::ToString;

    const RULES: ApCreationRules = ApCreationRules {
        kind: VmKind::Snp,
        vmsa_features: SEV_FEAT_SNP_ACTIVE,
        max_phys_bits: 48,
    };

    fn req(request: u32, apic: u32, gpa: u64, rax: Option<u64>) -> ApCreationRequest {
        ApCreationRequest::new(VcpuId(0), request, apic, gpa, rax)
    }

    fn check(r: ApCreationRequest) -> Result<ValidApRequest, ApCreationError> {
        RULES.validate(&r, |id| id < 4)
    }

    #[test]
    fn encodes_exit_info_like_the_guest() {
        let r = req(AP_CREATE, 3, 0x1000, Some(1));
        assert_eq!(r.exit_info_1, 0x0000_0003_0000_0001);
        assert_eq!((r.request(), r.apic_id(), r.gpa()), (1, 3, Gpa(0x1000)));
    }

    #[test]
    fn accepts_valid_requests() {
        let ok = check(req(AP_CREATE, 2, 0x10_3000, Some(SEV_FEAT_SNP_ACTIVE))).unwrap();
        assert_eq!(ok.request, ApRequest::Create);
        assert_eq!(ok.gpa, Some(Gpa(0x10_3000)));
        let ok = check(req(AP_CREATE_ON_INIT, 0, 0x5000, Some(SEV_FEAT_SNP_ACTIVE))).unwrap();
        assert_eq!(ok.request, ApRequest::CreateOnInit);
        // DESTROY needs neither RAX nor a sensible GPA.
        let ok = check(req(AP_DESTROY, 1, 0x20_0000, None)).unwrap();
        assert_eq!((ok.request, ok.gpa), (ApRequest::Destroy, None));
    }

    #[test]
    fn refuses_each_rule_with_the_kernel_code() {
        let f = Some(SEV_FEAT_SNP_ACTIVE);
        let cases = [
            (
                req(AP_CREATE, 1, 0x5000, None),
                ApCreationError::MissingRax { request: 1 },
                4,
            ),
            (
                req(7, 1, 0x5000, None),
                ApCreationError::MissingRax { request: 7 },
                4,
            ),
            (
                req(AP_CREATE, 9, 0x5000, f),
                ApCreationError::UnknownApicId { apic_id: 9 },
                5,
            ),
            (
                req(3, 1, 0x5000, f),
                ApCreationError::UnknownRequest { request: 3 },
                5,
            ),
            (
                req(AP_CREATE, 1, 0x5000, Some(SEV_FEAT_SNP_ACTIVE | 0x20)),
                ApCreationError::SevFeaturesMismatch {
                    requested: 0x21,
                    vm: 1,
                },
                5,
            ),
            (
                req(AP_CREATE, 1, 0x5008, f),
                ApCreationError::Unaligned { gpa: Gpa(0x5008) },
                5,
            ),
            (
                req(AP_CREATE, 1, 1 << 48, f),
                ApCreationError::BeyondMaxPhysAddr {
                    gpa: Gpa(1 << 48),
                    bits: 48,
                },
                5,
            ),
            (
                req(AP_CREATE_ON_INIT, 1, 0x40_0000, f),
                ApCreationError::Erratum1467 { gpa: Gpa(0x40_0000) },
                5,
            ),
        ];
        for (r, want, code) in cases {
            let got = check(r).unwrap_err();
            assert_eq!(got, want);
            assert_eq!(got.sw_exit_info(), (2, code), "{got}");
        }
    }

    #[test]
    fn sev_es_guests_get_missing_input_as_from_kvm() {
        let rules = ApCreationRules {
            kind: VmKind::SevEs,
            ..RULES
        };
        let err = rules
            .validate(&req(AP_CREATE, 1, 0x5000, Some(1)), |_| true)
            .unwrap_err();
        assert_eq!(err, ApCreationError::NotSnp { kind: VmKind::SevEs });
        // GHCB_ERR_MISSING_INPUT, the reason sev_es_validate_vmgexit holds when its
        // SVM_VMGEXIT_AP_CREATION case finds a guest that is not SNP.
        assert_eq!(err.sw_exit_info(), (2, 4));
        assert_eq!(
            err.to_string(),
            "AP creation is an SEV-SNP event; this is an SEV-ES guest"
        );
    }
    #[test]
    fn a_field_past_the_valid_bitmap_is_never_valid() {
        let r = GhcbRequest::new_ap_creation(AP_CREATE, 1, 0x5000, Some(1));
        assert!(r.is_valid(RAX) && r.is_valid(SW_EXIT_INFO_2));
        for offset in [0x400, SW_EXIT_CODE + 0x400, USAGE, u64::MAX] {
            assert!(!r.is_valid(offset), "{offset:#x}");
        }
    }

    #[test]
    fn valid_bits_are_the_kernels_bitmap_indices() {
        // GHCB_BITMAP_IDX(rax) = 0x1f8 / 8 = 63; sw_exit_code = 114, info_1 = 115, info_2 = 116.
        assert_eq!(valid_bit(RAX), (0, 1 << 63));
        assert_eq!(valid_bit(SW_EXIT_CODE), (1, 1 << 50));
        assert_eq!(valid_bit(SW_EXIT_INFO_1), (1, 1 << 51));
        assert_eq!(valid_bit(SW_EXIT_INFO_2), (1, 1 << 52));
    }

    #[test]
    fn precheck_follows_sev_es_validate_vmgexit() {
        let ok = GhcbRequest {
            exit_code: 0x8000_0013,
            exit_info_1: 1,
            exit_info_2: 0x1000,
            rax: Some(1),
            usage: 0,
            valid: [1 << 63, 7 << 50],
        };
        assert_eq!(ok, GhcbRequest::new_ap_creation(AP_CREATE, 0, 0x1000, Some(1)));
        assert_eq!(ok.precheck(), None);
        assert_eq!(GhcbRequest { usage: 1, ..ok }.precheck(), Some((2, 2)));
        assert_eq!(
            GhcbRequest {
                valid: [1 << 63, 3 << 50],
                ..ok
            }
            .precheck(),
            Some((2, 4))
        );
        assert_eq!(
            GhcbRequest {
                exit_code: 0x8000_0001,
                ..ok
            }
            .precheck(),
            Some((2, 6))
        );
        // Usage is checked before validity, validity before the exit code.
        let all_wrong = GhcbRequest {
            usage: 3,
            valid: [0, 0],
            exit_code: 0,
            ..ok
        };
        assert_eq!(all_wrong.check(), Err(GhcbError::InvalidUsage { usage: 3 }));
        assert_eq!(
            GhcbRequest {
                usage: 0,
                ..all_wrong
            }
            .check(),
            Err(GhcbError::MissingInput { valid: [0, 0] })
        );
    }

    #[test]
    fn decode_reads_the_kernels_offsets() {
        let mut page = [0u8; GHCB_PAGE_SIZE];
        page[0x1f8..0x200].copy_from_slice(&0x21u64.to_le_bytes());
        page[0x390..0x398].copy_from_slice(&SVM_VMGEXIT_AP_CREATION.to_le_bytes());
        page[0x398..0x3a0].copy_from_slice(&0x0000_0002_0000_0001u64.to_le_bytes());
        page[0x3a0..0x3a8].copy_from_slice(&0x10_3000u64.to_le_bytes());
        page[0x3f8..0x400].copy_from_slice(&(7u64 << 50).to_le_bytes());
        page[0xffc..0x1000].copy_from_slice(&0u32.to_le_bytes());
        // RAX is written but not marked valid: it is not read.
        let req = GhcbRequest::decode(&page);
        assert_eq!(req, GhcbRequest::new_ap_creation(AP_CREATE, 2, 0x10_3000, None));
        page[0x3f0..0x3f8].copy_from_slice(&(1u64 << 63).to_le_bytes());
        page[0xffc..0x1000].copy_from_slice(&5u32.to_le_bytes());
        let req = GhcbRequest::decode(&page);
        assert_eq!((req.rax, req.usage), (Some(0x21), 5));
        assert_eq!(req.check(), Err(GhcbError::InvalidUsage { usage: 5 }));
    }

    #[test]
    fn encode_then_decode_round_trips() {
        let reqs = [
            GhcbRequest::new_ap_creation(AP_CREATE, 3, 0x10_3000, Some(SEV_FEAT_SNP_ACTIVE)),
            GhcbRequest::new_ap_creation(AP_DESTROY, u32::MAX, 0, None),
            GhcbRequest {
                exit_code: 0x7b,
                exit_info_1: u64::MAX,
                exit_info_2: 0x1234_5678_9abc_def0,
                rax: Some(u64::MAX),
                usage: u32::MAX,
                valid: [u64::MAX, u64::MAX],
            },
        ];
        for r in reqs {
            let mut page = [0xa5u8; GHCB_PAGE_SIZE];
            r.encode(&mut page);
            assert_eq!(GhcbRequest::decode(&page), r);
            // The guest's request converts field for field.
            let ap = r.ap_creation_request(VcpuId(7));
            assert_eq!(
                (ap.requester, ap.exit_info_1, ap.exit_info_2, ap.rax),
                (VcpuId(7), r.exit_info_1, r.exit_info_2, r.rax)
            );
        }
    }

    #[test]
    fn write_response_sets_both_infos_valid_and_keeps_the_rest() {
        let req = GhcbRequest::new_ap_creation(AP_CREATE, 1, 0x5000, Some(1));
        let mut page = [0u8; GHCB_PAGE_SIZE];
        page[0x800] = 0x5a;
        req.encode(&mut page);
        write_response(&mut page, 2, GHCB_ERR_INVALID_INPUT);
        let got = GhcbRequest::decode(&page);
        assert_eq!((got.exit_info_1, got.exit_info_2), (2, GHCB_ERR_INVALID_INPUT));
        assert_eq!(got.valid, req.valid);
        assert_eq!((got.exit_code, got.rax, got.usage), (req.exit_code, req.rax, 0));
        assert_eq!(page[0x800], 0x5a);

        // An answer into a page whose infos were not marked valid marks them (and only them).
        let mut page = [0u8; GHCB_PAGE_SIZE];
        write_response(&mut page, 0, 0);
        let got = GhcbRequest::decode(&page);
        assert_eq!(got.valid, [0, 3 << 51]);
        assert!(got.is_valid(SW_EXIT_INFO_1) && got.is_valid(SW_EXIT_INFO_2));
        assert!(!got.is_valid(SW_EXIT_CODE));
    }

    #[test]
    fn ghcb_errors_answer_malformed_input_with_the_kernel_code() {
        assert_eq!(GhcbError::InvalidUsage { usage: 1 }.sw_exit_info(), (2, 2));
        assert_eq!(GhcbError::MissingInput { valid: [0, 0] }.sw_exit_info(), (2, 4));
        let e = GhcbError::InvalidEvent { exit_code: 0x7b };
        assert_eq!(e.sw_exit_info(), (2, 6));
        assert_eq!(
            e.to_string(),
            "GHCB exit code 0x7b is not AP creation (0x80000013)"
        );
    }
}
