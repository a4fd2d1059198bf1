//! The GHCB page codec and the AP-creation decoder (`vmsa_core::ghcb`).
//!
//! Input: the 4 KiB GHCB page (zero-padded), then the rules of the guest it came from (SNP or
//! SEV-ES, the VM's SEV_FEATURES, MAXPHYADDR, how many APIC IDs exist), the requesting vCPU,
//! and the answer the hypervisor writes back.
//!
//! Properties: decoding reads the page and nothing else (encoding the decoded request onto the
//! same page changes no byte; onto a blank page it decodes back the same); the GHCB checks and
//! the AP-creation rules accept only what they document (an accepted request has the fields
//! the rules require), refuse with `sw_exit_info_1 = 2` and a GHCB error code of 4, 5 or 6, and
//! say why in one line; the hypervisor's answer lands in the two exit-info fields, marks them
//! valid, and leaves every other byte alone.

use vmsa_core::ghcb::{
    self, ApCreationRules, GHCB_PAGE_SIZE, GhcbError, GhcbPage, GhcbRequest, RAX, SVM_VMGEXIT_AP_CREATION,
    SW_EXIT_CODE, SW_EXIT_INFO_1, SW_EXIT_INFO_2, VALID_BITMAP,
};
use vmsa_core::{ApCreationRequest, ApRequest, Gpa, VcpuId, VmKind};

use crate::input::Input;
use crate::one_line;

/// Run one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let page: GhcbPage = input.array::<GHCB_PAGE_SIZE>();
    let rules = ApCreationRules {
        kind: if input.bool() { VmKind::SevEs } else { VmKind::Snp },
        vmsa_features: input.u64(),
        max_phys_bits: input.u8(),
    };
    let apic_ids = u32::from(input.u8());
    let requester = VcpuId(input.u32());
    let answer = (input.u64(), input.u64());

    let req = GhcbRequest::decode(&page);
    codec(&page, &req);
    if let Err(e) = checks(&req) {
        refused(&e.to_string(), e.sw_exit_info());
    } else {
        ap_creation(&rules, &req.ap_creation_request(requester), apic_ids);
    }
    response(&page, &req, answer);
}

/// Decode and encode are inverse and touch only the fields they name.
fn codec(page: &GhcbPage, req: &GhcbRequest) {
    let mut same = *page;
    req.encode(&mut same);
    assert!(same == *page, "encoding the decoded request changed the page");
    let mut blank = [0u8; GHCB_PAGE_SIZE];
    req.encode(&mut blank);
    assert_eq!(
        GhcbRequest::decode(&blank),
        *req,
        "round trip through a blank page"
    );
    assert_eq!(
        req.rax.is_some(),
        req.is_valid(RAX),
        "RAX is read exactly when marked valid"
    );
}

/// The GHCB checks: an accepted GHCB is an AP-creation event with its three fields valid; a
/// refusal names what the guest gave.
fn checks(req: &GhcbRequest) -> Result<(), GhcbError> {
    let checked = req.check();
    assert_eq!(req.precheck(), checked.err().map(|e| e.sw_exit_info()));
    match checked {
        Ok(()) => {
            assert_eq!((req.usage, req.exit_code), (0, SVM_VMGEXIT_AP_CREATION));
            for field in [SW_EXIT_CODE, SW_EXIT_INFO_1, SW_EXIT_INFO_2] {
                assert!(req.is_valid(field), "accepted without field {field:#x} valid");
            }
        }
        Err(GhcbError::InvalidUsage { usage }) => assert!(usage == req.usage && usage != 0),
        Err(GhcbError::MissingInput { valid }) => assert_eq!(valid, req.valid),
        Err(GhcbError::InvalidEvent { exit_code }) => {
            assert!(exit_code == req.exit_code && exit_code != SVM_VMGEXIT_AP_CREATION)
        }
    }
    checked
}

/// A refusal as the guest sees it.
fn refused(msg: &str, (info_1, info_2): (u64, u64)) {
    one_line(msg);
    assert_eq!(info_1, ghcb::GHCB_HV_RESP_MALFORMED_INPUT, "{msg}");
    assert!(
        [
            ghcb::GHCB_ERR_INVALID_USAGE,
            ghcb::GHCB_ERR_MISSING_INPUT,
            ghcb::GHCB_ERR_INVALID_INPUT,
            ghcb::GHCB_ERR_INVALID_EVENT
        ]
        .contains(&info_2),
        "{msg}: GHCB error {info_2}"
    );
}

/// The AP-creation rules: an accepted request obeys every documented rule.
fn ap_creation(rules: &ApCreationRules, ap: &ApCreationRequest, apic_ids: u32) {
    let rebuilt = ApCreationRequest::new(ap.requester, ap.request(), ap.apic_id(), ap.exit_info_2, ap.rax);
    assert_eq!(rebuilt, *ap, "a request splits into its parts and back");
    match rules.validate(ap, |apic| apic < apic_ids) {
        Ok(valid) => {
            assert_eq!(
                rules.kind,
                VmKind::Snp,
                "AP creation accepted for an SEV-ES guest"
            );
            assert_eq!(valid.request.raw(), ap.request());
            assert_eq!(ApRequest::from_raw(ap.request()), Some(valid.request));
            assert!(valid.apic_id == ap.apic_id() && valid.apic_id < apic_ids);
            match valid.request {
                ApRequest::Destroy => assert_eq!(valid.gpa, None),
                ApRequest::Create | ApRequest::CreateOnInit => {
                    let gpa: Gpa = valid.gpa.expect("a created AP has a VMSA");
                    assert_eq!(gpa, ap.gpa());
                    assert_eq!(ap.rax, Some(rules.vmsa_features), "SEV_FEATURES must be the VM's");
                    assert!(gpa.is_page_aligned() && !gpa.is_2m_aligned(), "{gpa}");
                    assert!(gpa.fits_phys_bits(rules.max_phys_bits), "{gpa}");
                }
            }
        }
        Err(e) => refused(&e.to_string(), e.sw_exit_info()),
    }
}

/// The hypervisor's answer changes the two exit infos and their valid bits, nothing else.
fn response(page: &GhcbPage, req: &GhcbRequest, (info_1, info_2): (u64, u64)) {
    let mut answered = *page;
    ghcb::write_response(&mut answered, info_1, info_2);
    let got = GhcbRequest::decode(&answered);
    assert_eq!((got.exit_info_1, got.exit_info_2), (info_1, info_2));
    assert!(got.is_valid(SW_EXIT_INFO_1) && got.is_valid(SW_EXIT_INFO_2));
    assert_eq!(
        (got.exit_code, got.rax, got.usage),
        (req.exit_code, req.rax, req.usage)
    );
    let (q1, m1) = ghcb::valid_bit(SW_EXIT_INFO_1);
    let (q2, m2) = ghcb::valid_bit(SW_EXIT_INFO_2);
    let mut valid = req.valid;
    valid[q1 as usize] |= m1;
    valid[q2 as usize] |= m2;
    assert_eq!(got.valid, valid, "only the two exit-info bits are added");
    let written = [
        SW_EXIT_INFO_1..SW_EXIT_INFO_2 + 8,
        VALID_BITMAP + q1 * 8..VALID_BITMAP + q1 * 8 + 8,
    ];
    for (at, (a, b)) in page.iter().zip(answered.iter()).enumerate() {
        if !written.iter().any(|r| r.contains(&(at as u64))) {
            assert_eq!(a, b, "byte {at:#x} changed by the answer");
        }
    }
}
