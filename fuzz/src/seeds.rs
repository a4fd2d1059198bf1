//! The seed corpora: each target's first inputs, made from the inputs the workspace's own tests
//! and built-in scenarios use (the GHCB requests of vmsa-core's tests, the reset VMSAs the VMM
//! measures, the footer table layout of vmm's OVMF tests and of Debian's OVMF, the built-in
//! guests, the fault specs and cost files of backend-sim's tests). They are committed under
//! `fuzz/corpus/TARGET/seed-NAME`; the corpus test checks that the committed files are these
//! bytes, and `VMSA_FUZZ_WRITE_SEEDS=1 cargo test -p vmsa-fuzz --test corpus` rewrites them.

use backend_sim::GuestScript;
use backend_sim::guest::GuestAction;
use vmm::measure::ovmf::{
    Guid, OVMF_SEV_METADATA_GUID, OVMF_TABLE_FOOTER_GUID, SEV_ES_RESET_BLOCK_GUID, SEV_HASH_TABLE_RV_GUID,
};
use vmm::measure::reset::{BSP_EIP, reset_vmsa};
use vmm::measure::vmm_types::VmmType;
use vmm::run::scenario::{GuestMemory, GuestSpec, Scenario};
use vmsa_core::VmKind;
use vmsa_core::ghcb::{AP_CREATE, AP_CREATE_ON_INIT, AP_DESTROY, GHCB_PAGE_SIZE, GhcbRequest};
use vmsa_core::layout::SEV_FEAT_SNP_ACTIVE;

/// One seed input.
#[derive(Debug)]
pub struct Seed {
    /// The target it is for.
    pub target: &'static str,
    /// Its file name under `fuzz/corpus/TARGET/`.
    pub name: String,
    /// Its bytes.
    pub data: Vec<u8>,
}

/// Debian's OVMF build (package `ovmf`), whose footer table and SEV metadata seed the `ovmf`
/// target when it is installed, as vmm's `parsers_never_panic` test uses it.
pub const DEBIAN_OVMF: &str = "/usr/share/ovmf/OVMF.fd";

/// CRC-32 of the last 4 KiB of the `OVMF.fd` the committed `debian-tail` seed was cut from
/// (Debian 12's `ovmf` 2022.11-6+deb12u2): another build's tail is another seed, so the seed is
/// made only from this one, and the corpus check does not depend on the host's firmware.
const DEBIAN_OVMF_TAIL_CRC32: u32 = 0x3e71_3736;

/// Every seed of every target.
pub fn seeds() -> Vec<Seed> {
    let mut out = Vec::new();
    let mut add = |target, name: &str, data: Vec<u8>| {
        out.push(Seed {
            target,
            name: format!("seed-{name}"),
            data,
        })
    };
    for (name, data) in ghcb() {
        add("ghcb", name, data);
    }
    for (name, data) in vmsa_image() {
        add("vmsa_image", name, data);
    }
    for (name, data) in ovmf() {
        add("ovmf", name, data);
    }
    for (name, data) in guest_script() {
        add("guest_script", &name, data);
    }
    for (i, spec) in FAULT_SPECS.iter().enumerate() {
        add("fault_spec", &format!("{i:02}"), spec.as_bytes().to_vec());
    }
    for (i, (json, text)) in COST_FILES.iter().enumerate() {
        let mut data = vec![u8::from(*json)];
        data.extend_from_slice(text.as_bytes());
        add("cost_file", &format!("{i:02}"), data);
    }
    for (name, data) in igvm() {
        add("igvm", name, data);
    }
    out
}

/// IGVM files: the kvm backend's guest program as `vmm igvm --guest builtin:boot` writes it,
/// and a small file with every directive kind the walk reads (each page-data type, a data-less
/// 2 MiB page, an unmeasured page, a parameter area with its insert and VP-count parameter,
/// another platform's page, the BSP's VP context).
fn igvm() -> Vec<(&'static str, Vec<u8>)> {
    use igvm::{IgvmDirectiveHeader, IgvmFile, IgvmInitializationHeader, IgvmPlatformHeader, IgvmRevision};
    use igvm_defs::{
        IGVM_VHS_PARAMETER, IGVM_VHS_PARAMETER_INSERT, IGVM_VHS_SUPPORTED_PLATFORM, IgvmPageDataFlags,
        IgvmPageDataType, IgvmPlatformType,
    };
    use vmm::measure::igvm::{KVM_VMSA_GPA, guest_to_igvm, sev_vmsa_from_save_area};

    let serialize = |file: IgvmFile| {
        let mut bytes = Vec::new();
        file.serialize(&mut bytes).expect("a serializable IGVM file");
        bytes
    };
    let boot = guest_to_igvm(&backend_kvm::guest::builtin::ap_creation_igvm(false)).expect("the guest wraps");
    let none = IgvmPageDataFlags::new();
    let page = |gpa, mask, flags, data_type, data| IgvmDirectiveHeader::PageData {
        gpa,
        compatibility_mask: mask,
        flags,
        data_type,
        data,
    };
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let bsp = reset_vmsa(BSP_EIP, SEV_FEAT_SNP_ACTIVE, 0x00a0_0f11, VmmType::Qemu);
    let directives = vec![
        page(0x1000, 1, none, IgvmPageDataType::NORMAL, data.clone()),
        page(0x2000, 1, none, IgvmPageDataType::NORMAL, Vec::new()),
        page(
            0x3000,
            1,
            none.with_unmeasured(true),
            IgvmPageDataType::NORMAL,
            Vec::new(),
        ),
        page(0x4000, 1, none, IgvmPageDataType::SECRETS, Vec::new()),
        page(0x5000, 1, none, IgvmPageDataType::CPUID_DATA, Vec::new()),
        page(0x6000, 1, none, IgvmPageDataType::CPUID_XF, Vec::new()),
        page(
            0x20_0000,
            1,
            none.with_is_2mb_page(true),
            IgvmPageDataType::NORMAL,
            Vec::new(),
        ),
        page(0x7000, 2, none, IgvmPageDataType::NORMAL, data),
        IgvmDirectiveHeader::ParameterArea {
            number_of_bytes: 4096,
            parameter_area_index: 0,
            initial_data: Vec::new(),
        },
        IgvmDirectiveHeader::VpCount(IGVM_VHS_PARAMETER {
            parameter_area_index: 0,
            byte_offset: 8,
        }),
        IgvmDirectiveHeader::ParameterInsert(IGVM_VHS_PARAMETER_INSERT {
            gpa: 0x8000,
            compatibility_mask: 1,
            parameter_area_index: 0,
        }),
        IgvmDirectiveHeader::SnpVpContext {
            gpa: KVM_VMSA_GPA,
            compatibility_mask: 1,
            vp_index: 0,
            vmsa: sev_vmsa_from_save_area(&bsp),
        },
    ];
    let platform = |mask, platform_type| {
        IgvmPlatformHeader::SupportedPlatform(IGVM_VHS_SUPPORTED_PLATFORM {
            compatibility_mask: mask,
            highest_vtl: 0,
            platform_type,
            platform_version: 1,
            shared_gpa_boundary: 0,
        })
    };
    let kinds = IgvmFile::new(
        IgvmRevision::V1,
        vec![
            platform(1, IgvmPlatformType::SEV_SNP),
            platform(2, IgvmPlatformType::TDX),
        ],
        vec![IgvmInitializationHeader::GuestPolicy {
            policy: 0x30000,
            compatibility_mask: 1,
        }],
        directives,
    )
    .expect("a valid IGVM file");
    vec![("guest-boot", serialize(boot)), ("every-kind", serialize(kinds))]
}

/// GHCB pages with AP-creation requests (vmsa-core's ghcb tests), each followed by the rules of
/// an SNP guest with SEV_FEATURES `SNP_ACTIVE`, 48 address bits and 4 APIC IDs.
fn ghcb() -> Vec<(&'static str, Vec<u8>)> {
    let f = Some(SEV_FEAT_SNP_ACTIVE);
    let requests = [
        ("create", GhcbRequest::new_ap_creation(AP_CREATE, 2, 0x10_3000, f)),
        (
            "create-on-init",
            GhcbRequest::new_ap_creation(AP_CREATE_ON_INIT, 1, 0x5000, f),
        ),
        ("destroy", GhcbRequest::new_ap_creation(AP_DESTROY, 1, 0, None)),
        ("unaligned", GhcbRequest::new_ap_creation(AP_CREATE, 1, 0x5008, f)),
        (
            "erratum-1467",
            GhcbRequest::new_ap_creation(AP_CREATE, 1, 0x40_0000, f),
        ),
        (
            "usage-1",
            GhcbRequest {
                usage: 1,
                ..GhcbRequest::new_ap_creation(AP_CREATE, 1, 0x5000, f)
            },
        ),
    ];
    requests
        .into_iter()
        .map(|(name, req)| {
            let mut page = [0u8; GHCB_PAGE_SIZE];
            req.encode(&mut page);
            let mut data = page.to_vec();
            data.push(0); // SNP
            data.extend_from_slice(&SEV_FEAT_SNP_ACTIVE.to_le_bytes());
            data.extend_from_slice(&[48, 4]);
            data.extend_from_slice(&0u32.to_le_bytes()); // requester
            data.extend_from_slice(&[0; 16]); // the answer
            (name, data)
        })
        .collect()
}

/// The reset VMSAs the VMM measures (QEMU's BSP and an AP, SNP and SEV-ES), each followed by a
/// supplied-VMSA launch update at a page that is 4 KiB but not 2 MiB aligned.
fn vmsa_image() -> Vec<(&'static str, Vec<u8>)> {
    let sig = 0x00a0_0f11;
    let cases = [
        ("snp-bsp-supplied", BSP_EIP, SEV_FEAT_SNP_ACTIVE, 0u8),
        ("snp-bsp-classic", BSP_EIP, SEV_FEAT_SNP_ACTIVE, 2),
        ("sev-es-ap", 0x80_b004, 0, 1),
    ];
    cases
        .into_iter()
        .map(|(name, eip, features, flags)| {
            let mut data = reset_vmsa(eip, features, sig, VmmType::Qemu).as_page().to_vec();
            data.extend_from_slice(&[flags, 0, 0, 48, 2]);
            data.extend_from_slice(&0x7000u64.to_le_bytes());
            data.extend_from_slice(&0x9000u64.to_le_bytes());
            (name, data)
        })
        .collect()
}

/// A footer table with the given entries (first to last) ending 32 bytes before the end of a
/// `len`-byte tail, as OVMF lays it out (the layout vmm's OVMF tests build).
fn footer_table(len: usize, entries: &[(Guid, Vec<u8>)]) -> Vec<u8> {
    let mut table = Vec::new();
    for (guid, data) in entries {
        table.extend_from_slice(data);
        table.extend_from_slice(&((data.len() + 18) as u16).to_le_bytes());
        table.extend_from_slice(guid.bytes());
    }
    table.extend_from_slice(&((table.len() + 18) as u16).to_le_bytes());
    table.extend_from_slice(OVMF_TABLE_FOOTER_GUID.bytes());
    let mut tail = vec![0u8; len];
    tail[len - 32 - table.len()..len - 32].copy_from_slice(&table);
    tail
}

/// OVMF image tails: the crafted SEV image of vmm's OVMF tests (16 KiB, three metadata
/// sections), planned for SNP and for SEV-ES, and the last 4 KiB of Debian's OVMF (its footer
/// table and SEV metadata) at the end of a 1 MiB image, when the package is installed.
fn ovmf() -> Vec<(&'static str, Vec<u8>)> {
    let at = 0x800;
    let mut metadata = b"ASEV".to_vec();
    let sections: [(u32, u32, u32); 3] = [
        (0x80_0000, 0x9000, 1),
        (0x80_d000, 0x1000, 2),
        (0x80_e000, 0x1000, 3),
    ];
    for v in [16 + 12 * sections.len() as u32, 1, sections.len() as u32] {
        metadata.extend_from_slice(&v.to_le_bytes());
    }
    for (g, s, t) in sections {
        for v in [g, s, t] {
            metadata.extend_from_slice(&v.to_le_bytes());
        }
    }
    let mut tail = footer_table(
        at,
        &[
            (SEV_ES_RESET_BLOCK_GUID, 0x80_b004u32.to_le_bytes().to_vec()),
            (SEV_HASH_TABLE_RV_GUID, vec![0; 8]),
            (OVMF_SEV_METADATA_GUID, (at as u32).to_le_bytes().to_vec()),
        ],
    );
    tail[..metadata.len()].copy_from_slice(&metadata);
    let with = |flags: u8, pages: u8, tail: &[u8]| {
        let mut data = vec![flags, pages - 1];
        data.extend_from_slice(tail);
        data
    };
    let mut out = vec![
        ("crafted-snp", with(0, 4, &tail)),
        ("crafted-sev-es-4-vcpus", with(0x31, 4, &tail)),
    ];
    if let Ok(image) = std::fs::read(DEBIAN_OVMF)
        && let Some(tail) = image.len().checked_sub(4096).map(|at| &image[at..])
        && crc32fast::hash(tail) == DEBIAN_OVMF_TAIL_CRC32
    {
        out.push(("debian-tail-snp-ec2", with(0x12, 255, tail)));
    }
    out
}

/// The VMM's built-in guests for 2 vCPUs, the SMP boot of backend-sim's tests, and the guests
/// the KVM selftest mirrors run (termination and shutdown, SNP and SEV-ES).
fn guest_script() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for name in ["boot", "ap-churn", "reset", "launch-fail"] {
        // 16 MiB of RAM from 0, nothing launched: the layout matters to the linux-boot guests only.
        let memory = GuestMemory {
            ram: vec![(0, 16 << 20)],
            launched: Vec::new(),
        };
        let s = Scenario::new(&GuestSpec::Builtin(name.into()), 2, VmKind::Snp, &memory)
            .expect("a built-in guest");
        out.push((format!("builtin-{name}"), s.script));
    }
    out.push(("smp-boot-3".into(), GuestScript::smp_boot(3, 0x20_0000)));
    let term = GuestAction::Terminate {
        vcpu: 0,
        reason_set: 0,
        reason_code: 0,
    };
    let shutdown = GuestAction::TripleFault { vcpu: 0 };
    for (name, action) in [("terminate", term), ("triple-fault", shutdown)] {
        for prefix in ["snp", "sev-es"] {
            let name = format!("{prefix}-{name}");
            out.push((
                name.clone(),
                GuestScript {
                    name,
                    actions: vec![action.clone()],
                },
            ));
        }
    }
    out.into_iter()
        .map(|(name, s)| (name, s.to_json().into_bytes()))
        .collect()
}

/// Fault specs of backend-sim's fault tests and the fault matrix, accepted and refused.
const FAULT_SPECS: &[&str] = &[
    "snp_launch_update:vmsa:4=INVALID_PAGE_STATE, rmp_make_shared:1=FAIL_INUSE",
    "alloc_page:2=ENOMEM",
    "alloc_page:1=ALIGNED_2M",
    "page_reclaim:1=SEV_RET_INVALID_PAGE_STATE",
    "snp_launch_update:vmsa:2=INVALID_PAGE_STATE,snp_launch_update:3=INVALID_ADDRESS",
    "decommission:1=INVALID_GUEST_STATE",
    "vmrun:2=VMEXIT_INVALID",
    "rmp_make_shared:1=FAIL_INUSE, psmash:1=FAIL_PERMISSION",
    "write_frame:1=RMP_FAULT",
    "flush_encrypted_page:1=GP",
    "alloc_page:99999999999999999999=ENOMEM",
    "rmp_make_private:1=FAIL_OVERLAP",
    "a:b:c:d=e",
];

/// Cost files of backend-sim's cost tests, TOML (`false`) and JSON (`true`).
const COST_FILES: &[(bool, &str)] = &[
    (false, "clock_hz = 3.0e9\n[cycles]\nrmpupdate_4k = 99\n"),
    (true, r#"{"cycles": {"psmash": 7}}"#),
    (true, r#"{"clock_hz": 0}"#),
    (false, "clock_hz = 1e-300\n"),
    (false, "[cycles]\nvmrun = 9223372036854775807\n"),
    (false, "\nclock_hz = \"x\"\n"),
    (false, "[cycles]\npsmash = = 1\n"),
];
