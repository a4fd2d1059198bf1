//! The GHCB "SNP AP Creation" NAE event (GHCB spec pub. 56421, §4.1.9, exit code 0x8000_0013)
//! and its validation, with the rules and error codes of KVM's `sev_snp_ap_creation`.

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
    /// AP creation exists only for SEV-SNP guests.
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
            Self::NotSnp { .. } => GHCB_ERR_INVALID_EVENT,
            Self::MissingRax { .. } => GHCB_ERR_MISSING_INPUT,
            _ => GHCB_ERR_INVALID_INPUT,
        }
    }

    /// `(sw_exit_info_1, sw_exit_info_2)` for the guest.
    pub fn sw_exit_info(&self) -> (u64, u64) {
        (GHCB_HV_RESP_MALFORMED_INPUT, self.ghcb_error())
    }
}

/// What the VM must know to validate a request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ApRules {
    pub kind: VmKind,
    pub vmsa_features: u64,
    pub max_phys_bits: u8,
}

/// A request that passed every check, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ValidRequest {
    pub request: ApRequest,
    pub apic_id: u32,
    /// `None` for DESTROY.
    pub gpa: Option<Gpa>,
}

impl ApRules {
    /// The checks of KVM's `sev_es_validate_vmgexit` and `sev_snp_ap_creation`, in their order.
    /// `target_exists` answers whether a vCPU has the APIC ID.
    pub fn validate(
        &self,
        req: &ApCreationRequest,
        target_exists: impl FnOnce(u32) -> bool,
    ) -> Result<ValidRequest, ApCreationError> {
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
            return Ok(ValidRequest {
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
        Ok(ValidRequest {
            request,
            apic_id,
            gpa: Some(gpa),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::SEV_FEAT_SNP_ACTIVE;
    use std::string::ToString;

    const RULES: ApRules = ApRules {
        kind: VmKind::Snp,
        vmsa_features: SEV_FEAT_SNP_ACTIVE,
        max_phys_bits: 48,
    };

    fn req(request: u32, apic: u32, gpa: u64, rax: Option<u64>) -> ApCreationRequest {
        ApCreationRequest::new(VcpuId(0), request, apic, gpa, rax)
    }

    fn check(r: ApCreationRequest) -> Result<ValidRequest, ApCreationError> {
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
    fn sev_es_guests_get_invalid_event() {
        let rules = ApRules {
            kind: VmKind::SevEs,
            ..RULES
        };
        let err = rules
            .validate(&req(AP_CREATE, 1, 0x5000, Some(1)), |_| true)
            .unwrap_err();
        assert_eq!(err, ApCreationError::NotSnp { kind: VmKind::SevEs });
        assert_eq!(err.ghcb_error(), 6);
        assert_eq!(
            err.to_string(),
            "AP creation is an SEV-SNP event; this is an SEV-ES guest"
        );
    }
}
