//! `vmm run --igvm` on the simulator and `vmm igvm`: Debian's OVMF wrapped into an IGVM file
//! (`plan_to_igvm`) launches with its VP context as the supplied BSP VMSA and its digest is
//! `vmm measure --igvm`'s, with 1 and 4 vCPUs alike; the classic launch (`--igvm-classic`)
//! is compared with `--check-kvm` only where the file passes its rules, and names the VMSA fields
//! KVM's sync cannot reproduce; the kvm backend refuses wrapped OVMF and `--igvm-classic` before
//! opening /dev/kvm; `vmm igvm` writes the same file as `plan_to_igvm` (`--firmware`) or
//! `guest_to_igvm` (`--guest`), never overwriting; every bad input is one line, exit 2. (The
//! kvm backend running `vmm igvm --guest`'s files: tests/tests/kvm_igvm.rs.)

mod measure_support;

use std::path::{Path, PathBuf};

use backend_kvm::guest::builtin::ap_creation_igvm;
use igvm::snp_defs::SevVmsa;
use igvm::{IgvmDirectiveHeader, IgvmFile, IgvmInitializationHeader, IgvmPlatformHeader, IgvmRevision};
use igvm_defs::{IGVM_VHS_SUPPORTED_PLATFORM, IgvmPageDataFlags, IgvmPageDataType, IgvmPlatformType};
use measure_support::{DEBIAN_OVMF, fixture_cases, fixture_path, refused_with, scratch, stderr, stdout, vmm};
use serde_json::Value;
use vmm::measure::igvm::{KVM_VMSA_GPA, guest_to_igvm, plan_to_igvm};
use vmm::measure::ovmf::Ovmf;
use vmm::measure::vcpu_types::VcpuType;
use vmm::measure::{LaunchPlan, PlanConfig, VcpuCount};
use vmsa_core::VmKind;
use zerocopy::FromZeros;

fn serialize(file: &IgvmFile) -> Vec<u8> {
    let mut bytes = Vec::new();
    file.serialize(&mut bytes).expect("serializable");
    bytes
}

fn write(dir: &Path, name: &str, file: &IgvmFile) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serialize(file)).unwrap();
    p
}

/// Debian's OVMF, SEV-SNP, EPYC-v4, QEMU, as `vmm measure --firmware` plans it.
fn ovmf_igvm(vcpus: u32) -> IgvmFile {
    let ovmf = Ovmf::parse(std::fs::read(DEBIAN_OVMF).unwrap()).unwrap();
    let config = PlanConfig {
        kind: VmKind::Snp,
        vcpus: VcpuCount::new(vcpus).unwrap(),
        vcpu_sig: "EPYC-v4".parse::<VcpuType>().unwrap().signature(),
        vmm_type: "qemu".parse().unwrap(),
        guest_features: 1,
    };
    plan_to_igvm(&LaunchPlan::build(&ovmf, &config, None).unwrap()).unwrap()
}

fn measured(path: &Path, extra: &[&str]) -> String {
    let mut a = vec!["measure", "--json", "--igvm", path.to_str().unwrap()];
    a.extend_from_slice(extra);
    let o = vmm(&a);
    assert_eq!(o.status.code(), Some(0), "{a:?}: {}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    v["digest"].as_str().unwrap().to_owned()
}

fn run(path: &Path, extra: &[&str]) -> Value {
    run_exit(path, extra, 0)
}

fn run_exit(path: &Path, extra: &[&str], code: i32) -> Value {
    let mut a = vec!["run", "--json", "--igvm", path.to_str().unwrap()];
    a.extend_from_slice(extra);
    let o = vmm(&a);
    assert_eq!(o.status.code(), Some(code), "{a:?}: {}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

/// An IGVM file with one SEV-SNP platform (mask 1) and these directives.
fn snp_file(directives: Vec<IgvmDirectiveHeader>) -> IgvmFile {
    IgvmFile::new(
        IgvmRevision::V1,
        vec![IgvmPlatformHeader::SupportedPlatform(
            IGVM_VHS_SUPPORTED_PLATFORM {
                compatibility_mask: 1,
                highest_vtl: 0,
                platform_type: IgvmPlatformType::SEV_SNP,
                platform_version: 1,
                shared_gpa_boundary: 0,
            },
        )],
        vec![IgvmInitializationHeader::GuestPolicy {
            policy: 0x30000,
            compatibility_mask: 1,
        }],
        directives,
    )
    .unwrap()
}

#[test]
fn supplied_vmsa_launch_of_wrapped_ovmf_has_measure_igvm_digest_for_any_vcpu_count() {
    let dir = scratch("run-igvm-supplied");
    let path = write(&dir, "ovmf.igvm", &ovmf_igvm(1));
    for native_zero in [false, true] {
        let extra: &[&str] = if native_zero { &["--native-zero"] } else { &[] };
        let expected = measured(&path, extra);
        let mut digests = Vec::new();
        for vcpus in ["1", "4"] {
            let mut args = vec!["--vcpus", vcpus];
            args.extend_from_slice(extra);
            let s = run(&path, &args);
            assert_eq!(s["ok"], true, "{s}");
            assert_eq!(
                s["launch"]["digest"],
                expected.as_str(),
                "--vcpus {vcpus} {extra:?}"
            );
            assert_eq!(s["launch"]["digest_matches"], true);
            assert_eq!(s["launch"]["vmsas"], 1, "one VMSA measured, the BSP's");
            // The BSP's VMSA is the supplied page; the APs have none until AP creation.
            let bsp = &s["ownership"]["vcpus"][0]["path"];
            assert_eq!(bsp[1], "GuestOwned", "{bsp}");
            digests.push(s["launch"]["digest"].as_str().unwrap().to_owned());
        }
        assert_eq!(digests[0], digests[1], "the digest depends on the vCPU count");
    }
}

/// A launched page of zeros takes no storage in the simulator: the PSP's ciphertext of zeros is
/// computed when read, not kept (an IGVM file may launch a gibibyte of data-less pages). 16 MiB
/// of data-less pages added to the wrapped OVMF launch 4096 more pages, measured as
/// `vmm measure --igvm` measures them, and add no frame with stored contents.
#[test]
fn launched_pages_of_zeros_take_no_simulator_storage() {
    let dir = scratch("run-igvm-zeros");
    let ovmf = ovmf_igvm(1);
    let base = run(&write(&dir, "ovmf.igvm", &ovmf), &[]);
    let two_m = IgvmPageDataFlags::new().with_is_2mb_page(true);
    let zeros = (0..8u64).map(|i| IgvmDirectiveHeader::PageData {
        gpa: 0x1000_0000 + (i << 21),
        compatibility_mask: 1,
        flags: two_m,
        data_type: IgvmPageDataType::NORMAL,
        data: Vec::new(),
    });
    let with_zeros = IgvmFile::new(
        IgvmRevision::V1,
        ovmf.platforms().to_vec(),
        ovmf.initializations().to_vec(),
        zeros.chain(ovmf.directives().iter().cloned()).collect(),
    )
    .unwrap();
    let path = write(&dir, "zeros.igvm", &with_zeros);
    let s = run(&path, &[]);
    assert_eq!(s["ok"], true, "{s}");
    assert_eq!(s["launch"]["digest"], measured(&path, &[]).as_str());
    assert_ne!(s["launch"]["digest"], base["launch"]["digest"]);
    let count = |v: &Value, what: &str| v["launch"][what].as_u64().unwrap();
    assert_eq!(
        count(&s, "data_pages"),
        count(&base, "data_pages") + 4096,
        "{}",
        s["launch"]
    );
    let backed = |v: &Value| v["footprint"]["peak_backed_frames"].as_u64().unwrap();
    assert_eq!(backed(&s), backed(&base), "{}", s["footprint"]);
}

#[test]
fn classic_launch_compares_only_where_check_kvm_passes() {
    let dir = scratch("run-igvm-classic");
    // Wrapped OVMF: its reset VMSA has CR0 0x10, which --check-kvm refuses: no expected digest,
    // and the report says why.
    let path = write(&dir, "ovmf.igvm", &ovmf_igvm(1));
    let s = run(&path, &["--igvm-classic", "--vcpus", "1"]);
    assert_eq!(s["launch"]["expected_digest"], Value::Null, "{s}");
    let warnings = s["warnings"].to_string();
    assert!(warnings.contains("CR0 0x10"), "{warnings}");
    assert!(warnings.contains("reproduces every field"), "{warnings}");

    // A file that passes --check-kvm: one VMSA at KVM's GPA, CR0 0x31.
    let vmsa = |x87_ds: u16| {
        let mut v = SevVmsa::new_box_zeroed().unwrap();
        v.cr0 = 0x31;
        v.rip = 0x10_0000;
        v.sev_features = igvm::snp_defs::SevFeatures::new().with_snp(true);
        v.x87_ds = x87_ds;
        v
    };
    let kvm_file = |x87_ds| {
        snp_file(vec![
            IgvmDirectiveHeader::PageData {
                gpa: 0x10_0000,
                compatibility_mask: 1,
                flags: IgvmPageDataFlags::new(),
                data_type: IgvmPageDataType::NORMAL,
                data: vec![0xf4; 4096],
            },
            IgvmDirectiveHeader::SnpVpContext {
                gpa: KVM_VMSA_GPA,
                compatibility_mask: 1,
                vp_index: 0,
                vmsa: vmsa(x87_ds),
            },
        ])
    };
    let good = write(&dir, "kvm.igvm", &kvm_file(0));
    let expected = measured(&good, &["--check-kvm"]);
    let s = run(&good, &["--igvm-classic", "--vcpus", "1"]);
    assert_eq!(s["launch"]["expected_digest"], expected.as_str(), "{s}");
    assert_eq!(s["launch"]["digest_matches"], true, "{s}");
    // The same file in the supplied-VMSA mode: the same digest.
    assert_eq!(
        run(&good, &["--vcpus", "4"])["launch"]["digest"],
        expected.as_str()
    );
    // Classic with 4 vCPUs: KVM measures four VMSAs, so nothing to compare.
    let s = run(&good, &["--igvm-classic", "--vcpus", "4"]);
    assert_eq!(s["launch"]["expected_digest"], Value::Null, "{s}");
    assert_ne!(s["launch"]["digest"], expected.as_str());
    // A field KVM's sync zeroes: named, and the digest differs from the one the file passes
    // --check-kvm with, so the run fails (exit 1).
    let lossy = write(&dir, "lossy.igvm", &kvm_file(0x2b));
    let s = run_exit(&lossy, &["--igvm-classic", "--vcpus", "1"], 1);
    let warnings = s["warnings"].to_string();
    assert!(
        warnings.contains("does not reproduce") && warnings.contains("x87_ds"),
        "{warnings}"
    );
    assert_eq!(s["launch"]["digest_matches"], false, "{s}");
}

/// `vmm igvm --firmware F --kernel K [--initrd I] [--append CMDLINE]` wraps a direct boot's
/// launch: the file measures (`--native-zero`, as for any wrapped firmware) to sev-snp-measure's
/// digest of the same direct boot, for every QEMU SEV-SNP kernel case of the fixtures, and says
/// what it boots; --initrd without --kernel and a firmware without the table are refused.
#[test]
fn vmm_igvm_wraps_a_direct_kernel_boot_to_sev_snp_measures_digest() {
    let dir = scratch("igvm-kernel");
    let cases = fixture_cases(|c| c.get("kernel").is_some() && c["vmm_type"] == "qemu" && c["mode"] == "snp");
    assert!(cases.len() >= 5, "{} kernel cases", cases.len());
    for case in cases {
        let id = case["id"].as_str().unwrap();
        let out = dir.join(format!("{id}.igvm"));
        let path = |k: &str| case.get(k).and_then(Value::as_str).map(fixture_path);
        let mut args: Vec<String> = ["igvm", "--json", "-o", out.to_str().unwrap()]
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
        for (opt, p) in [
            ("--firmware", path("firmware")),
            ("--kernel", path("kernel")),
            ("--initrd", path("initrd")),
        ] {
            if let Some(p) = p {
                args.extend([opt.to_owned(), p.display().to_string()]);
            }
        }
        if let Some(a) = case.get("append").and_then(Value::as_str) {
            args.extend(["--append".to_owned(), a.to_owned()]);
        }
        args.extend(["--vcpus".to_owned(), case["vcpus"].to_string()]);
        args.extend([
            "--vcpu-type".to_owned(),
            case["vcpu_type"].as_str().unwrap().to_owned(),
        ]);
        let o = vmm(&args);
        assert_eq!(o.status.code(), Some(0), "case {id}: {}", stderr(&o));
        let written: Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(written["digest"], case["digest"], "case {id}");
        assert_eq!(written["kernel"], path("kernel").unwrap().display().to_string());
        assert_eq!(
            measured(&out, &["--native-zero"]),
            case["digest"].as_str().unwrap(),
            "case {id}"
        );
    }
    let o = dir.join("refused.igvm");
    let o = o.to_str().unwrap();
    refused_with(
        &["igvm", "--guest", "builtin:boot", "--initrd", "x", "-o", o],
        "--initrd",
        "needs --kernel",
    );
    let kernel = fixture_path("kernel.bin");
    let kernel = kernel.to_str().unwrap();
    // --kernel with --guest (whose launch has no hash table) was written without it.
    refused_with(
        &["igvm", "--guest", "builtin:boot", "--kernel", kernel, "-o", o],
        "--kernel",
        "needs --firmware",
    );
    let boot = dir.join("boot.igvm");
    std::fs::write(&boot, b"").unwrap();
    refused_with(
        &["run", "--igvm", boot.to_str().unwrap(), "--kernel", kernel],
        "--kernel",
        "needs --firmware",
    );
    refused_with(
        &["igvm", "--firmware", DEBIAN_OVMF, "--kernel", kernel, "-o", o],
        "--firmware",
        "has no SNP_KERNEL_HASHES metadata section",
    );
    assert!(!Path::new(o).exists());
}

/// A failed write said only "cannot write it: <errno>", not which call failed: here the
/// temporary file's creation (`/proc` has no unnamed files and takes no new ones).
#[test]
fn vmm_igvm_names_the_call_that_failed_to_write_the_output() {
    refused_with(
        &["igvm", "--firmware", DEBIAN_OVMF, "-o", "/proc/x.igvm"],
        "--output /proc/x.igvm",
        "cannot write it: creating the temporary file /proc/.x.igvm.tmp-",
    );
    assert!(!Path::new("/proc/x.igvm").exists());
}

#[test]
fn vmm_igvm_writes_plan_to_igvm_and_never_overwrites() {
    let dir = scratch("vmm-igvm");
    let out = dir.join("ovmf.igvm");
    let o = vmm([
        "igvm",
        "--firmware",
        DEBIAN_OVMF,
        "-o",
        out.to_str().unwrap(),
        "--vcpus",
        "2",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap(), serialize(&ovmf_igvm(2)));
    // Its digest (--native-zero) is the one it printed.
    assert!(
        stdout(&o).contains(&measured(&out, &["--native-zero"])),
        "{}",
        stdout(&o)
    );
    // No temporary file left behind.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    let o_str = out.to_str().unwrap();
    refused_with(
        &["igvm", "--firmware", DEBIAN_OVMF, "-o", o_str],
        &format!("--output {o_str}"),
        "it exists (a regular file); vmm igvm never overwrites anything",
    );
    let dangling = dir.join("dangling.igvm");
    std::os::unix::fs::symlink("nowhere", &dangling).unwrap();
    let d_str = dangling.to_str().unwrap();
    refused_with(
        &["igvm", "--firmware", DEBIAN_OVMF, "-o", d_str],
        &format!("--output {d_str}"),
        "it exists (a symbolic link)",
    );
    refused_with(
        &["igvm", "--firmware", DEBIAN_OVMF, "-o", "/proc/x.igvm"],
        "--output /proc/x.igvm",
        "cannot write it: ",
    );
    refused_with(
        &["igvm", "--firmware", DEBIAN_OVMF, "-o", "/nonexistent-dir/x.igvm"],
        "--output /nonexistent-dir/x.igvm",
        "does not exist",
    );
    let new = dir.join("new.igvm");
    let new = new.to_str().unwrap();
    refused_with(
        &["igvm", "--firmware", "/nonexistent.fd", "-o", new],
        "--firmware /nonexistent.fd",
        "cannot read it: No such file or directory",
    );
    refused_with(
        &["igvm", "--firmware", DEBIAN_OVMF, "-o", new, "--vcpus", "0"],
        "--vcpus",
        "0",
    );
    refused_with(
        &[
            "igvm",
            "--firmware",
            DEBIAN_OVMF,
            "-o",
            new,
            "--vcpu-type",
            "nope",
        ],
        "--vcpu-type",
        "nope",
    );
    // Not an OVMF image.
    refused_with(
        &["igvm", "--firmware", o_str, "-o", new],
        &format!("--firmware {o_str}"),
        "an OVMF image must be a non-zero multiple of 4096 bytes",
    );
    assert!(!Path::new(new).exists());
}

#[test]
fn bad_run_igvm_inputs_are_refused_in_one_line() {
    let dir = scratch("run-igvm-bad");
    let four = write(&dir, "ovmf4.igvm", &ovmf_igvm(4));
    let four = four.to_str().unwrap();
    refused_with(&["run", "--igvm", four], &format!("--igvm {four}"), "VP index 1");
    refused_with(
        &["run", "--igvm", "/nonexistent.igvm"],
        "--igvm /nonexistent.igvm",
        "cannot read it: No such file or directory",
    );
    let junk = dir.join("junk.igvm");
    std::fs::write(&junk, b"not igvm").unwrap();
    refused_with(
        &["run", "--igvm", junk.to_str().unwrap()],
        "junk.igvm",
        "not a valid IGVM file",
    );
    refused_with(
        &["run", "--igvm", four, "--firmware", DEBIAN_OVMF],
        "--firmware",
        "'--igvm <FILE>' cannot be used with '--firmware <OVMF.fd>'",
    );
    refused_with(
        &["run", "--igvm", four, "--sev-es"],
        "--sev-es",
        "'--igvm <FILE>' cannot be used with '--sev-es'",
    );
    refused_with(
        &["run", "--igvm-classic"],
        "--igvm-classic",
        "needs --igvm: it is an option of the IGVM launch",
    );
    refused_with(
        &["run", "--native-zero"],
        "--native-zero",
        "needs --igvm: it is an option of the IGVM launch",
    );
    // The kvm backend: wrapped OVMF is not one of its programs; the classic launch is not its.
    let one = write(&dir, "ovmf1.igvm", &ovmf_igvm(1));
    let one = one.to_str().unwrap();
    refused_with(
        &["run", "--backend", "kvm", "--igvm", one],
        &format!("--igvm {one}"),
        "the kvm backend runs only its own guest programs",
    );
    refused_with(
        &["run", "--backend", "kvm", "--igvm", one],
        "its BSP starts in real mode at CS base 0xffff0000 + IP 0xfff0 (CR0 0x10)",
        "--backend sim",
    );
    refused_with(
        &["run", "--backend", "kvm", "--igvm", four],
        &format!("--igvm {four}"),
        "VP index 1",
    );
    // --guest was ignored there: the file's program ran.
    refused_with(
        &[
            "run",
            "--backend",
            "kvm",
            "--igvm",
            one,
            "--guest",
            "builtin:ap-churn",
        ],
        "--guest builtin:ap-churn",
        "the file's own program runs",
    );
    refused_with(
        &["run", "--backend", "kvm", "--igvm", one, "--igvm-classic"],
        "--igvm-classic",
        "supplied-VMSA mode only",
    );
}

/// `vmm igvm` had no `--json` while `run`, `measure` and `probe` do: a script had to cut the
/// digest out of a sentence. One document: the file, its size, what it launches and the
/// digest `vmm measure --igvm` gives it (with `--native-zero` for a wrapped firmware).
#[test]
fn vmm_igvm_json_is_one_document_with_the_digest_measure_gives() {
    let dir = scratch("vmm-igvm-json");
    let cases: [(&str, &[&str], &[&str]); 2] = [
        (
            "ovmf.igvm",
            &["--firmware", DEBIAN_OVMF, "--vcpus", "3"],
            &["--native-zero"],
        ),
        ("boot.igvm", &["--guest", "builtin:boot"], &[]),
    ];
    for (name, input, measure_with) in cases {
        let out = dir.join(name);
        let o_str = out.to_str().unwrap();
        let mut args = vec!["igvm", "-o", o_str, "--json"];
        args.extend_from_slice(input);
        let o = vmm(&args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        let text = stdout(&o);
        assert_eq!(text.lines().count(), 1, "{text}");
        let doc: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(doc["output"], o_str);
        assert_eq!(doc["bytes"], std::fs::metadata(&out).unwrap().len());
        assert_eq!(doc["algorithm"], "sha384");
        assert_eq!(doc["digest"], measured(&out, measure_with).as_str(), "{doc}");
        assert_eq!(doc["digest_with_native_zero"], !measure_with.is_empty());
        if input[0] == "--firmware" {
            assert_eq!(
                (&doc["firmware"], &doc["vcpus"]),
                (&Value::from(DEBIAN_OVMF), &Value::from(3))
            );
            assert!(doc["guest"].is_null());
        } else {
            assert_eq!(doc["guest"], "builtin:boot");
            assert!(doc["firmware"].is_null() && doc["vcpus"].is_null(), "{doc}");
        }
    }
}

#[test]
fn vmm_igvm_guest_writes_guest_to_igvm_whose_digest_is_the_same_on_the_simulator_for_any_vcpu_count() {
    let dir = scratch("vmm-igvm-guest");
    for (name, recreate) in [("boot", false), ("ap-churn", true)] {
        let out = dir.join(format!("{name}.igvm"));
        let o_str = out.to_str().unwrap();
        let o = vmm(["igvm", "--guest", &format!("builtin:{name}"), "-o", o_str]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let file = guest_to_igvm(&ap_creation_igvm(recreate)).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), serialize(&file));
        // The digest it prints is `vmm measure --igvm`'s, and the simulator launches the file
        // to that digest, the BSP from the supplied VMSA, with 1 and 4 vCPUs.
        let expected = measured(&out, &[]);
        assert!(
            stdout(&o).ends_with(&format!("launch digest (SHA-384):\n{expected}\n")),
            "{}",
            stdout(&o)
        );
        for vcpus in ["1", "4"] {
            let s = run(&out, &["--vcpus", vcpus, "--guest", "builtin:boot"]);
            assert_eq!(s["ok"], true, "{s}");
            assert_eq!(s["launch"]["digest"], expected.as_str(), "--vcpus {vcpus}");
            assert_eq!(s["launch"]["digest_matches"], true);
            assert_eq!(s["ownership"]["vcpus"][0]["path"][1], "GuestOwned", "{s}");
        }
        refused_with(
            &["igvm", "--guest", &format!("builtin:{name}"), "-o", o_str],
            &format!("--output {o_str}"),
            "never overwrites",
        );
    }
    let new = dir.join("new.igvm");
    let new = new.to_str().unwrap();
    refused_with(
        &["igvm", "--guest", "builtin:linux-boot", "-o", new],
        "--guest builtin:linux-boot",
        "vmm igvm writes the kvm backend's guest programs (builtin:boot, builtin:ap-churn)",
    );
    refused_with(
        &["igvm", "--guest", "script.json", "-o", new],
        "--guest script.json",
        "the kvm backend's guest programs",
    );
    refused_with(
        &["igvm", "--guest", "builtin:nope", "-o", new],
        "builtin:nope",
        "is not a built-in guest (known: boot,",
    );
    refused_with(
        &["igvm", "--guest", "builtin:boot", "--vcpus", "4", "-o", new],
        "--vcpus",
        "cannot be used with",
    );
    refused_with(
        &[
            "igvm",
            "--guest",
            "builtin:boot",
            "--firmware",
            DEBIAN_OVMF,
            "-o",
            new,
        ],
        "--firmware",
        "cannot be used with",
    );
    refused_with(&["igvm", "-o", new], "--guest", "required");
    assert!(!Path::new(new).exists());
}

/// A page at the top of the 64-bit space was taken for guest memory the host could not lay
/// out ("--memory 1GiB: this host cannot reserve that much guest memory", the wrong input), one
/// at 2^51 or above failed the launch at RMPUPDATE: the RMP entry's GPA field ends at bit 50,
/// so such a file is refused in one line naming the page. One below 2^51 but above the
/// simulated host's 48-bit physical space is the host's refusal of its memory slot, as KVM's
/// `kvm_arch_prepare_memory_region` refuses it (exit 1, the launch failed).
#[test]
fn pages_beyond_what_an_snp_launch_can_address_are_refused() {
    let dir = scratch("run-igvm-gpa");
    let ovmf = ovmf_igvm(1);
    let with_page_at = |gpa: u64| {
        let page = IgvmDirectiveHeader::PageData {
            gpa,
            compatibility_mask: 1,
            flags: IgvmPageDataFlags::new(),
            data_type: IgvmPageDataType::NORMAL,
            data: vec![7; 4096],
        };
        let file = IgvmFile::new(
            IgvmRevision::V1,
            ovmf.platforms().to_vec(),
            ovmf.initializations().to_vec(),
            std::iter::once(page)
                .chain(ovmf.directives().iter().cloned())
                .collect(),
        )
        .unwrap();
        write(&dir, &format!("{gpa:x}.igvm"), &file)
    };
    for gpa in [1u64 << 51, 0xffff_ffff_ffff_f000] {
        let p = with_page_at(gpa);
        let p = p.to_str().unwrap();
        refused_with(
            &["run", "--igvm", p],
            &format!("--igvm {p}: its page at GPA {gpa:#x} lies at or above 0x8000000000000"),
            "GPA field ends at bit 50",
        );
    }
    let p = with_page_at(1 << 48);
    let s = run_exit(&p, &[], 1);
    let problems = s["problems"].to_string();
    assert!(
        problems.contains("KVM_SET_USER_MEMORY_REGION2") && problems.contains("kvm_mmu_max_gfn"),
        "{problems}"
    );
    assert_eq!(s["teardown"]["frames_still_allocated"], 0);
    // (The wrapped OVMF's VMSA is the last page below 2^48.)
    assert_eq!(run(&with_page_at((1 << 48) - 0x2000), &[])["ok"], true);
}
