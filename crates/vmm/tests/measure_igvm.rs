//! `vmm measure --igvm` (coconut-svsm igvmmeasure's rules): Debian's OVMF wrapped into an IGVM
//! file measures, with `--native-zero`, to sev-snp-measure's digest for every SEV-SNP fixture
//! case (`cargo xtask fixtures`); each page type counts as igvmmeasure counts it; every
//! `--check-kvm` rule, the ID block check and every bad input is refused as documented.

mod measure_support;

use std::path::{Path, PathBuf};

use backend_sim::measure::{SnpLaunchDigest, SnpPage};
use igvm::snp_defs::SevVmsa;
use igvm::{IgvmDirectiveHeader, IgvmFile, IgvmInitializationHeader, IgvmPlatformHeader, IgvmRevision};
use igvm_defs::{
    IGVM_VHS_PARAMETER_INSERT, IGVM_VHS_SNP_ID_BLOCK_PUBLIC_KEY, IGVM_VHS_SNP_ID_BLOCK_SIGNATURE,
    IGVM_VHS_SUPPORTED_PLATFORM, IgvmPageDataFlags, IgvmPageDataType, IgvmPlatformType,
    IgvmVariableHeaderType,
};
use measure_support::*;
use serde_json::Value;
use vmm::measure::hashes::SevHashes;
use vmm::measure::igvm::{KVM_VMSA_GPA, MAX_IGVM_LAUNCH_PAGES, plan_to_igvm, save_area_from_sev_vmsa};
use vmm::measure::ovmf::Ovmf;
use vmm::measure::{LaunchPlan, PlanConfig, VcpuCount, parse_hex_u64};
use vmsa_core::{Gpa, SnpPageType, VmKind};
use zerocopy::FromZeros;

fn write(dir: &Path, name: &str, file: &IgvmFile) -> PathBuf {
    let mut bytes = Vec::new();
    file.serialize(&mut bytes).expect("serializable");
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The launch plan `vmm measure --firmware` builds for a fixture case.
fn plan(case: &Value) -> LaunchPlan {
    let fw = fixture_path(case["firmware"].as_str().unwrap());
    let ovmf = Ovmf::parse(std::fs::read(&fw).unwrap()).unwrap();
    let config = PlanConfig {
        kind: VmKind::Snp,
        vcpus: VcpuCount::new(case["vcpus"].as_u64().unwrap() as u32).unwrap(),
        vcpu_sig: case_vcpu_sig(case),
        vmm_type: case["vmm_type"].as_str().unwrap().parse().unwrap(),
        guest_features: parse_hex_u64(case["guest_features"].as_str().unwrap()).unwrap(),
    };
    let hashes = case.get("kernel").and_then(Value::as_str).map(|k| {
        let initrd = case.get("initrd").and_then(Value::as_str).map(fixture_path);
        SevHashes::from_files(
            &fixture_path(k),
            initrd.as_deref(),
            case.get("append").and_then(Value::as_str),
        )
        .unwrap()
    });
    LaunchPlan::build(&ovmf, &config, hashes.as_ref()).unwrap()
}

fn json_out(args: &[&str]) -> Value {
    let o = vmm(args);
    assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

#[test]
fn wrapped_ovmf_measures_as_sev_snp_measure_with_native_zero() {
    let dir = scratch("igvm-wrap");
    let cases = fixture_cases(|c| c["mode"] == "snp" && c["vcpus"].as_u64().unwrap() <= 64);
    assert!(cases.len() >= 20, "{} SEV-SNP cases", cases.len());
    let mut debian_qemu = 0;
    for case in cases {
        let id = case["id"].as_str().unwrap();
        let plan = plan(case);
        let file = plan_to_igvm(&plan).unwrap();
        let path = write(&dir, &format!("{id}.igvm"), &file);
        let p = path.to_str().unwrap();
        let doc = json_out(&["measure", "--igvm", p, "--native-zero", "--json"]);
        assert_eq!(doc["digest"], case["digest"], "case {id}: {case}");
        assert_eq!(
            doc["digest"].as_str(),
            Some(plan.measure().hex().as_str()),
            "case {id}"
        );
        assert_eq!(doc["pages"]["vmsa"], case["vcpus"], "case {id}");
        // Without --native-zero the data-less pages measure as NORMAL pages of zeros.
        if doc["pages"]["zero"].as_u64().unwrap() > 0 {
            let plain = json_out(&["measure", "--igvm", p, "--json"]);
            assert_ne!(plain["digest"], case["digest"], "case {id}");
            assert_eq!(plain["pages"]["zero"], 0);
        }
        // The file carries the plan's VMSAs byte for byte.
        let back = IgvmFile::new_from_binary(&std::fs::read(&path).unwrap(), None).unwrap();
        let vmsas: Vec<_> = back
            .directives()
            .iter()
            .filter_map(|d| match d {
                IgvmDirectiveHeader::SnpVpContext { vmsa, gpa, .. } => {
                    Some((*gpa, save_area_from_sev_vmsa(vmsa)))
                }
                _ => None,
            })
            .collect();
        assert_eq!(vmsas.len(), plan.vmsas().count());
        for ((gpa, v), want) in vmsas.iter().zip(plan.vmsas()) {
            assert_eq!(*gpa, KVM_VMSA_GPA);
            assert_eq!(v.as_page(), want.save_area.as_page(), "case {id}");
        }
        if case["firmware"] == DEBIAN_OVMF && case["vmm_type"] == "qemu" {
            debian_qemu += 1;
        }
    }
    assert!(debian_qemu >= 10, "{debian_qemu} Debian OVMF / QEMU cases");
}

const MASK: u32 = 1;

fn snp_platform(mask: u32) -> IgvmPlatformHeader {
    IgvmPlatformHeader::SupportedPlatform(IGVM_VHS_SUPPORTED_PLATFORM {
        compatibility_mask: mask,
        highest_vtl: 0,
        platform_type: IgvmPlatformType::SEV_SNP,
        platform_version: 1,
        shared_gpa_boundary: 0,
    })
}

fn page(
    gpa: u64,
    mask: u32,
    flags: IgvmPageDataFlags,
    ty: IgvmPageDataType,
    data: Vec<u8>,
) -> IgvmDirectiveHeader {
    IgvmDirectiveHeader::PageData {
        gpa,
        compatibility_mask: mask,
        flags,
        data_type: ty,
        data,
    }
}

fn vp(gpa: u64, vp_index: u16, cr0: u64) -> IgvmDirectiveHeader {
    let mut vmsa = SevVmsa::new_box_zeroed().unwrap();
    vmsa.cr0 = cr0;
    vmsa.rip = 0xfff0;
    IgvmDirectiveHeader::SnpVpContext {
        gpa,
        compatibility_mask: MASK,
        vp_index,
        vmsa,
    }
}

fn param_insert(gpa: u64) -> [IgvmDirectiveHeader; 2] {
    [
        IgvmDirectiveHeader::ParameterArea {
            number_of_bytes: 4096,
            parameter_area_index: 0,
            initial_data: Vec::new(),
        },
        IgvmDirectiveHeader::ParameterInsert(IGVM_VHS_PARAMETER_INSERT {
            gpa,
            compatibility_mask: MASK,
            parameter_area_index: 0,
        }),
    ]
}

fn file(directives: Vec<IgvmDirectiveHeader>) -> IgvmFile {
    // A second platform (TDX, mask 2) whose directives must not count.
    let tdx = IgvmPlatformHeader::SupportedPlatform(IGVM_VHS_SUPPORTED_PLATFORM {
        compatibility_mask: 2,
        highest_vtl: 0,
        platform_type: IgvmPlatformType::TDX,
        platform_version: 1,
        shared_gpa_boundary: 0,
    });
    IgvmFile::new(
        IgvmRevision::V1,
        vec![snp_platform(MASK), tdx],
        vec![IgvmInitializationHeader::GuestPolicy {
            policy: 0x30000,
            compatibility_mask: MASK,
        }],
        directives,
    )
    .unwrap()
}

#[test]
fn every_page_type_counts_as_igvmmeasure_counts_it() {
    let dir = scratch("igvm-types");
    let none = IgvmPageDataFlags::new();
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let mut d = vec![
        page(0x1000, MASK, none, IgvmPageDataType::NORMAL, data.clone()),
        page(0x2000, MASK, none, IgvmPageDataType::NORMAL, Vec::new()),
        page(
            0x3000,
            MASK,
            none.with_unmeasured(true),
            IgvmPageDataType::NORMAL,
            Vec::new(),
        ),
        page(0x4000, MASK, none, IgvmPageDataType::SECRETS, Vec::new()),
        page(0x5000, MASK, none, IgvmPageDataType::CPUID_DATA, Vec::new()),
        page(0x6000, MASK, none, IgvmPageDataType::CPUID_XF, Vec::new()),
        page(
            0x20_0000,
            MASK,
            none.with_is_2mb_page(true),
            IgvmPageDataType::NORMAL,
            Vec::new(),
        ),
        // Another platform's page: not measured.
        page(0x7000, 2, none, IgvmPageDataType::NORMAL, data.clone()),
    ];
    d.extend(param_insert(0x8000));
    d.push(vp(KVM_VMSA_GPA, 0, 0x31));
    let path = write(&dir, "types.igvm", &file(d));
    let p = path.to_str().unwrap();

    let expect = |native_zero: bool| {
        let mut ld = SnpLaunchDigest::new();
        let zero = [0u8; 4096];
        let empty = if native_zero {
            SnpPageType::Zero
        } else {
            SnpPageType::Normal
        };
        ld.update(
            Gpa(0x1000),
            SnpPageType::Normal,
            data.as_slice().try_into().unwrap(),
        );
        ld.update(Gpa(0x2000), empty, &zero);
        ld.update(Gpa(0x3000), SnpPageType::Unmeasured, &zero);
        ld.update(Gpa(0x4000), SnpPageType::Secrets, &zero);
        ld.update(Gpa(0x5000), SnpPageType::Cpuid, &zero);
        ld.update(Gpa(0x6000), SnpPageType::Cpuid, &zero);
        for i in 0..512 {
            ld.update(Gpa(0x20_0000 + i * 4096), empty, &zero);
        }
        ld.update(Gpa(0x8000), SnpPageType::Unmeasured, &zero);
        let mut vmsa = SevVmsa::new_box_zeroed().unwrap();
        vmsa.cr0 = 0x31;
        vmsa.rip = 0xfff0;
        ld.update(
            Gpa(KVM_VMSA_GPA),
            SnpPageType::Vmsa,
            save_area_from_sev_vmsa(&vmsa).as_page(),
        );
        backend_sim::measure::hex(&ld.digest())
    };
    let doc = json_out(&["measure", "--igvm", p, "--native-zero", "--check-kvm", "--json"]);
    assert_eq!(doc["digest"], expect(true));
    assert_eq!(doc["compatibility_mask"], "0x1");
    let pages = &doc["pages"];
    let counts: Vec<u64> = ["normal", "vmsa", "zero", "unmeasured", "secrets", "cpuid"]
        .iter()
        .map(|t| pages[t].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [1, 1, 513, 2, 1, 2]);
    assert_eq!(doc["vmsas"][0]["gpa"], "0xfffffffff000");
    let doc = json_out(&["measure", "--igvm", p, "--json"]);
    assert_eq!(doc["digest"], expect(false));
    assert_eq!(doc["pages"]["normal"], 514);

    let text = stdout(&vmm(["measure", "--igvm", p]));
    assert!(
        text.ends_with(&format!("launch digest (sha384):\n{}\n", expect(false))),
        "{text}"
    );
}

#[test]
fn check_kvm_refuses_each_rule() {
    let dir = scratch("igvm-kvm");
    let cases: [(&str, Vec<IgvmDirectiveHeader>, &str); 4] = [
        (
            "two",
            vec![vp(KVM_VMSA_GPA, 0, 0x31), vp(KVM_VMSA_GPA, 1, 0x31)],
            "VMSA #1 (vp_index 1): at most one VMSA",
        ),
        (
            "gpa",
            vec![vp(0x10_0000, 0, 0x31)],
            "GPA 0x100000: KVM always puts the VMSA at GPA 0xfffffffff000",
        ),
        (
            "cr0",
            vec![vp(KVM_VMSA_GPA, 0, 0x10)],
            "has CR0 0x10: KVM sets CR0 itself",
        ),
        (
            "order",
            {
                let mut d = vec![vp(KVM_VMSA_GPA, 0, 0x30)];
                d.extend(param_insert(0x8000));
                d
            },
            "parameter insert at GPA 0x8000 after the VMSA",
        ),
    ];
    for (name, d, rule) in cases {
        let path = write(&dir, &format!("{name}.igvm"), &file(d));
        let p = path.to_str().unwrap();
        refused_with(
            &["measure", "--igvm", p, "--check-kvm"],
            &format!("--igvm {p}: --check-kvm: "),
            rule,
        );
        // Without --check-kvm the same file measures.
        json_out(&["measure", "--igvm", p, "--json"]);
    }
    // Wrapped OVMF: its reset VMSA has CR0 0x10, and several vCPUs mean several VMSAs.
    let case = fixtures()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["mode"] == "snp" && c["firmware"] == DEBIAN_OVMF && c["vcpus"] == 2)
        .unwrap();
    let path = write(&dir, "ovmf.igvm", &plan_to_igvm(&plan(case)).unwrap());
    let p = path.to_str().unwrap();
    refused_with(&["measure", "--igvm", p, "--check-kvm"], p, "CR0 0x10");
}

fn id_block(ld: [u8; 48], mask: u32) -> IgvmDirectiveHeader {
    IgvmDirectiveHeader::SnpIdBlock {
        compatibility_mask: mask,
        author_key_enabled: 0,
        reserved: [0; 3],
        ld,
        family_id: [0; 16],
        image_id: [0; 16],
        version: 1,
        guest_svn: 0,
        id_key_algorithm: 1,
        author_key_algorithm: 1,
        id_key_signature: IGVM_VHS_SNP_ID_BLOCK_SIGNATURE::new_box_zeroed().unwrap(),
        id_public_key: IGVM_VHS_SNP_ID_BLOCK_PUBLIC_KEY::new_box_zeroed().unwrap(),
        author_key_signature: IGVM_VHS_SNP_ID_BLOCK_SIGNATURE::new_box_zeroed().unwrap(),
        author_public_key: IGVM_VHS_SNP_ID_BLOCK_PUBLIC_KEY::new_box_zeroed().unwrap(),
    }
}

#[test]
fn an_id_block_with_another_digest_fails_unless_ignored() {
    let dir = scratch("igvm-idblock");
    let base = vec![vp(KVM_VMSA_GPA, 0, 0x31)];
    let path = write(&dir, "plain.igvm", &file(base.clone()));
    let digest = json_out(&["measure", "--igvm", path.to_str().unwrap(), "--json"])["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut ld = [0u8; 48];
    for (i, b) in ld.iter_mut().enumerate() {
        *b = u8::from_str_radix(&digest[2 * i..2 * i + 2], 16).unwrap();
    }

    // Matching ID block: success.
    let mut d = base.clone();
    d.push(id_block(ld, MASK));
    let good = write(&dir, "good.igvm", &file(d));
    let doc = json_out(&["measure", "--igvm", good.to_str().unwrap(), "--json"]);
    assert_eq!(doc["id_block"]["matches"], true);
    assert_eq!(doc["digest"], digest.as_str());

    // Another digest: the digest is still printed, the mismatch reported, exit 1.
    let mut d = base.clone();
    d.push(id_block([0xab; 48], MASK));
    // Another platform's ID block does not count.
    d.push(id_block(ld, 2));
    let bad = write(&dir, "bad.igvm", &file(d));
    let b = bad.to_str().unwrap();
    let o = vmm(["measure", "--igvm", b]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stdout(&o).ends_with(&format!("{digest}\n")));
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains(&format!(
            "--igvm {b}: the SNP ID block expects launch digest {}",
            "ab".repeat(48)
        )),
        "{e}"
    );
    assert!(e.contains(&digest), "{e}");
    let o = vmm(["measure", "--igvm", b, "--ignore-idblock", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let doc: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(doc["id_block"]["matches"], false);
    assert_eq!(doc["id_block"]["ignored"], true);
}

#[test]
fn bad_inputs_are_refused_in_one_line() {
    let dir = scratch("igvm-bad");
    let missing = dir.join("missing.igvm");
    let m = missing.to_str().unwrap();
    refused_with(
        &["measure", "--igvm", m],
        &format!("--igvm {m}"),
        "cannot read it",
    );
    let d = dir.to_str().unwrap();
    refused_with(
        &["measure", "--igvm", d],
        &format!("--igvm {d}"),
        "not a regular file",
    );
    let junk = dir.join("junk.igvm");
    std::fs::write(&junk, b"not an IGVM file at all").unwrap();
    let j = junk.to_str().unwrap();
    refused_with(
        &["measure", "--igvm", j],
        &format!("--igvm {j}"),
        "not a valid IGVM file",
    );
    // A valid file without an SEV-SNP platform.
    let tdx_only = IgvmFile::new(
        IgvmRevision::V1,
        vec![IgvmPlatformHeader::SupportedPlatform(
            IGVM_VHS_SUPPORTED_PLATFORM {
                compatibility_mask: 1,
                highest_vtl: 0,
                platform_type: IgvmPlatformType::VSM_ISOLATION,
                platform_version: 1,
                shared_gpa_boundary: 0,
            },
        )],
        vec![],
        vec![page(
            0x1000,
            1,
            IgvmPageDataFlags::new(),
            IgvmPageDataType::NORMAL,
            vec![1; 4096],
        )],
    )
    .unwrap();
    let t = write(&dir, "tdx.igvm", &tdx_only);
    let t = t.to_str().unwrap();
    refused_with(
        &["measure", "--igvm", t],
        &format!("--igvm {t}"),
        "no SEV-SNP platform header",
    );
    // Options of the other form.
    refused_with(
        &["measure", "--igvm", t, "--vcpus", "2"],
        "--vcpus",
        "cannot be used with",
    );
    refused_with(
        &["measure", "--igvm", t, "--firmware", DEBIAN_OVMF],
        "--firmware",
        "cannot be used with",
    );
    refused_with(
        &["measure", "--igvm", t, "--sev-es"],
        "--sev-es",
        "cannot be used with",
    );
    // Every option of the OVMF form, not only those that existed when the rule was written:
    // --vcpu-sig and --vcpu-family were accepted and ignored (the file's VMSAs decide).
    for (opt, value) in [
        ("--vcpu-sig", Some("0x800f12")),
        ("--vcpu-family", Some("23")),
        ("--vcpu-model", Some("1")),
        ("--vcpu-stepping", Some("2")),
        ("--vcpu-type", Some("EPYC")),
        ("--vmm-type", Some("ec2")),
        ("--guest-features", Some("0x1")),
        ("--kernel", Some("k")),
        ("--initrd", Some("i")),
        ("--append", Some("a")),
        ("--dump-vmsa", Some("d")),
    ] {
        let mut a = vec!["measure", "--igvm", t, opt];
        a.extend(value);
        refused_with(&a, opt, "cannot be used with");
    }
    for opt in ["--native-zero", "--check-kvm", "--ignore-idblock"] {
        refused_with(
            &[
                "measure",
                "--firmware",
                DEBIAN_OVMF,
                "--vcpus",
                "1",
                "--vcpu-type",
                "EPYC",
                opt,
            ],
            opt,
            "needs --igvm",
        );
    }
    refused_with(&["measure", "--vcpus", "1"], "--firmware", "required");
}

/// The igvm crate 0.5.0 subtracts a page-data directive's file offset from the start of the
/// file data without a check: an offset below it (with the header CRC fixed up, as the `igvm`
/// fuzz target makes it) panicked `vmm measure --igvm` and `vmm run --igvm` in the dev profile,
/// exit code 101. The parser runs inside `vmm::contain` now: one line, exit code 2.
#[test]
fn a_file_the_igvm_parser_panics_on_is_refused_in_one_line() {
    let dir = scratch("igvm-parser-panic");
    let data = vec![0x5a; 4096];
    let good = file(vec![
        page(
            0x1000,
            MASK,
            IgvmPageDataFlags::new(),
            IgvmPageDataType::NORMAL,
            data,
        ),
        vp(KVM_VMSA_GPA, 0, 0x31),
    ]);
    let mut bytes = Vec::new();
    good.serialize(&mut bytes).unwrap();
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let (offset, size) = (u32_at(&bytes, 8) as usize, u32_at(&bytes, 12) as usize);
    // The variable headers: (type, length) then the body, each padded to 8 bytes. The page
    // data body (IGVM_VHS_PAGE_DATA) holds its file offset at byte 12.
    let mut at = offset;
    while u32_at(&bytes, at) != IgvmVariableHeaderType::IGVM_VHT_PAGE_DATA.0 {
        at += 8 + (u32_at(&bytes, at + 4) as usize).next_multiple_of(8);
        assert!(at < offset + size, "no page data directive");
    }
    let file_offset = at + 8 + 12;
    assert!(u32_at(&bytes, file_offset) >= (offset + size) as u32);
    bytes[file_offset..file_offset + 4].copy_from_slice(&1u32.to_le_bytes());
    bytes[20..24].fill(0);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&bytes[..24]);
    crc.update(&bytes[offset..offset + size]);
    bytes[20..24].copy_from_slice(&crc.finalize().to_le_bytes());
    let path = dir.join("offset-below-data.igvm");
    std::fs::write(&path, &bytes).unwrap();
    let p = path.to_str().unwrap();
    for cmd in ["measure", "run"] {
        refused_with(
            &[cmd, "--igvm", p],
            &format!("--igvm {p}"),
            // igvm 0.5.0: "... the igvm crate's parser panicked on it (attempt to subtract with
            // overflow at igvm-0.5.0/src/lib.rs:2060)"; a fixed release refuses it as it should.
            "not a valid IGVM file: ",
        );
    }
}

/// A data-less 2 MiB page directive takes 32 bytes of the file and launches 512 pages: a 266 KB
/// file took 46 s to measure, and one within the 512 MiB file limit would have taken days. A
/// launch of more than `MAX_IGVM_LAUNCH_PAGES` pages is refused before any page is hashed;
/// one at the limit measures, each run of equal pages hashed once, to the digest of the pages
/// one by one.
#[test]
fn a_launch_of_more_pages_than_the_limit_is_refused_before_any_hashing() {
    let dir = scratch("igvm-page-limit");
    let two_m = IgvmPageDataFlags::new().with_is_2mb_page(true);
    let data = vec![0x5a; 4096];
    // The igvm crate refuses a file without a data section: one page with data comes last.
    let with_2m_pages = |n: u64| {
        let mut d: Vec<_> = (0..n)
            .map(|i| page(i << 21, MASK, two_m, IgvmPageDataType::NORMAL, Vec::new()))
            .collect();
        d.push(page(
            1 << 40,
            MASK,
            IgvmPageDataFlags::new(),
            IgvmPageDataType::NORMAL,
            data.clone(),
        ));
        file(d)
    };
    let per = 512;
    let under = MAX_IGVM_LAUNCH_PAGES / per - 1;
    let over = write(&dir, "over.igvm", &with_2m_pages(under + 1));
    let pages = (under + 1) * per + 1;
    for cmd in ["measure", "run"] {
        let o = vmm_within(
            std::time::Duration::from_secs(30),
            [cmd, "--igvm", over.to_str().unwrap()],
        );
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "vmm {cmd}: {err}");
        assert_eq!(
            err.trim_end(),
            format!(
                "vmm {cmd}: --igvm {}: its SEV-SNP launch has {pages} pages of 4 KiB: more than the \
                 {MAX_IGVM_LAUNCH_PAGES} (1 GiB) a launch may have",
                over.display()
            )
        );
    }
    let at = write(&dir, "at.igvm", &with_2m_pages(under));
    let doc = json_out(&["measure", "--igvm", at.to_str().unwrap(), "--json"]);
    let zero = [0u8; 4096];
    let mut expected: Vec<SnpPage<'_>> = (0..under * per)
        .map(|i| SnpPage {
            gpa: Gpa(i << 12),
            page_type: SnpPageType::Normal,
            contents: Some(&zero),
        })
        .collect();
    expected.push(SnpPage {
        gpa: Gpa(1 << 40),
        page_type: SnpPageType::Normal,
        contents: Some(data.as_slice().try_into().unwrap()),
    });
    let mut ld = SnpLaunchDigest::new();
    ld.update_pages(&expected);
    assert_eq!(doc["digest"], ld.hex(), "{doc}");
    assert_eq!(doc["pages"]["normal"], under * per + 1, "{doc}");
}
