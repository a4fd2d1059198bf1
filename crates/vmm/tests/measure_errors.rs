//! `vmm measure` refusals through the real binary: every bad argument or input file ends with
//! exit code 2, nothing on stdout, one line on stderr that names the input and the rule, and
//! nothing left behind on disk.

mod measure_support;

use std::path::{Path, PathBuf};

use measure_support::*;

/// Run `vmm measure ARGS` and check the refusal shape; return the stderr line.
#[track_caller]
fn refused(args: &[&str], must_contain: &[&str]) -> String {
    let mut full = vec!["measure"];
    full.extend_from_slice(args);
    let out = vmm(&full);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{args:?}: exit {:?}, stderr {err}",
        out.status.code()
    );
    assert!(out.stdout.is_empty(), "{args:?}: stdout {:?}", stdout(&out));
    assert_eq!(
        err.lines().count(),
        1,
        "{args:?}: stderr must be one line: {err:?}"
    );
    assert!(err.ends_with('\n'));
    for s in must_contain {
        assert!(err.contains(s), "{args:?}: {err:?} lacks {s:?}");
    }
    err
}

/// `--firmware FIRMWARE --vcpus VCPUS --vcpu-type VCPU_TYPE`, then `extra`.
fn cli<'a>(firmware: &'a str, vcpus: &'a str, vcpu_type: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["--firmware", firmware, "--vcpus", vcpus, "--vcpu-type", vcpu_type];
    a.extend_from_slice(extra);
    a
}

/// A good invocation (Debian's OVMF, 2 EPYC-v4 vCPUs), then `extra`.
fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    cli(DEBIAN_OVMF, "2", "EPYC-v4", extra)
}

fn ls(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn the_good_base_invocation_works() {
    let out = vmm(["measure"].into_iter().chain(with(&[])));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// `--snp-ovmf-hash` takes exactly a SHA-384 in hex and SEV-SNP only; `--ovmf-hash-only`
/// takes the firmware and nothing that would change a launch (it prints no launch's digest).
#[test]
fn ovmf_hash_options_refuse_what_they_cannot_use() {
    let hash = "ab".repeat(48);
    for v in [
        "",
        "ab",
        &format!("{hash}ab"),
        &format!("0x{}", &hash[2..]),
        &hash.replace('b', "z"),
    ] {
        refused(
            &with(&["--snp-ovmf-hash", v]),
            &[
                "--snp-ovmf-hash",
                &format!("'{v}' is not an OVMF hash"),
                "96 hex digits",
            ],
        );
    }
    refused(
        &with(&["--snp-ovmf-hash", &hash, "--sev-es"]),
        &[&format!("--snp-ovmf-hash {hash}"), "SEV-SNP launches only"],
    );
    let hash_only = ["--firmware", DEBIAN_OVMF, "--ovmf-hash-only"];
    for extra in [
        &["--vcpus", "2"][..],
        &["--vcpu-type", "EPYC"],
        &["--snp-ovmf-hash", &hash],
        &["--sev-es"],
        &["--kernel", "k"],
        &["--dump-vmsa", "d"],
        &["--guest-features", "0x1"],
    ] {
        let args: Vec<&str> = hash_only.iter().copied().chain(extra.iter().copied()).collect();
        refused(&args, &["--ovmf-hash-only", extra[0], "cannot be used with"]);
    }
    refused(&["--ovmf-hash-only"], &["--firmware", "required"]);
    refused(
        &["--igvm", "f.igvm", "--ovmf-hash-only"],
        &["--igvm", "--ovmf-hash-only", "cannot be used with"],
    );
}

/// `--ovmf-hash-only`'s help said "No other option applies", yet `--json` is taken and used:
/// the help names it, and the pair gives one JSON document.
#[test]
fn ovmf_hash_only_help_names_the_json_it_takes() {
    let help = stdout(&vmm(["measure", "--help"]));
    let text: String = help
        .lines()
        .skip_while(|l| l.trim() != "--ovmf-hash-only")
        .take(2)
        .collect();
    assert!(!text.contains("No other option applies"), "{text}");
    assert!(text.contains("Only --json goes with it"), "{text}");
    let out = vmm(["measure", "--firmware", DEBIAN_OVMF, "--ovmf-hash-only", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["mode"], "snp:ovmf-hash");
}

#[test]
fn bad_vcpu_types_list_the_known_ones() {
    let e = refused(
        &cli(DEBIAN_OVMF, "2", "EPYC-Foo", &[]),
        &["--vcpu-type", "EPYC-Foo", "unknown vCPU type"],
    );
    for t in vmm::measure::vcpu_types::VCPU_TYPES {
        assert!(e.contains(t.name), "{e} lacks {}", t.name);
    }
    refused(&cli(DEBIAN_OVMF, "2", "epyc", &[]), &["'epyc'", "case-sensitive"]);
    refused(
        &["--firmware", DEBIAN_OVMF, "--vcpus", "2"],
        &["--vcpu-type is required with --vmm-type qemu", "RDX"],
    );
}

/// `--vcpu-sig` and `--vcpu-family/--vcpu-model/--vcpu-stepping` (sev-snp-measure's other ways
/// to name the model) refuse what is not a 32-bit signature or an encodable family, model or
/// stepping, and go with no other way of naming it.
#[test]
fn vcpu_signatures_and_families_outside_what_cpuid_encodes() {
    let base = ["--firmware", DEBIAN_OVMF, "--vcpus", "2"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> { base.iter().chain(extra).copied().collect() };
    for v in ["0x100000000", "-1", "0o17", "0x", "4294967296", "1_0"] {
        refused(
            &with(&["--vcpu-sig", v]),
            &["--vcpu-sig", &format!("'{v}' is not a vCPU signature")],
        );
    }
    refused(
        &with(&[
            "--vcpu-family",
            "271",
            "--vcpu-model",
            "0",
            "--vcpu-stepping",
            "0",
        ]),
        &["--vcpu-family", "'271'", "0..=270"],
    );
    refused(
        &with(&[
            "--vcpu-family",
            "25",
            "--vcpu-model",
            "256",
            "--vcpu-stepping",
            "0",
        ]),
        &["--vcpu-model", "0..=255"],
    );
    refused(
        &with(&[
            "--vcpu-family",
            "25",
            "--vcpu-model",
            "1",
            "--vcpu-stepping",
            "16",
        ]),
        &["--vcpu-stepping", "0..=15"],
    );
    refused(
        &with(&["--vcpu-family", "25"]),
        &["--vcpu-model", "--vcpu-stepping"],
    );
    // sev-snp-measure reads a 0 signature or family as not given (Python truthiness) and
    // refuses the QEMU launch; both were measured here.
    refused(
        &with(&["--vcpu-sig", "0"]),
        &["--vcpu-sig 0", "sev-snp-measure reads 0 as no vCPU model"],
    );
    refused(
        &with(&["--vcpu-family", "0", "--vcpu-model", "1", "--vcpu-stepping", "2"]),
        &["--vcpu-family 0", "sev-snp-measure reads 0 as no vCPU model"],
    );
    // Beside a type or a signature, a model and stepping were accepted and ignored.
    refused(
        &with(&["--vcpu-type", "EPYC", "--vcpu-model", "5", "--vcpu-stepping", "1"]),
        &["--vcpu-model needs --vcpu-family"],
    );
    refused(
        &[
            "--firmware",
            DEBIAN_OVMF,
            "--vcpus",
            "2",
            "--vcpu-sig",
            "0xa10f11",
            "--vcpu-model",
            "5",
            "--vcpu-stepping",
            "1",
        ],
        &["--vcpu-model needs --vcpu-family"],
    );
    refused(
        &with(&["--vcpu-sig", "0xa10f11", "--vcpu-type", "EPYC"]),
        &["--vcpu-sig", "--vcpu-type", "cannot be used with"],
    );
    refused(
        &with(&[
            "--vcpu-sig",
            "0xa10f11",
            "--vcpu-family",
            "25",
            "--vcpu-model",
            "1",
            "--vcpu-stepping",
            "1",
        ]),
        &["--vcpu-sig", "--vcpu-family", "cannot be used with"],
    );
    refused(
        &base,
        &[
            "--vcpu-type is required with --vmm-type qemu",
            "--vcpu-sig",
            "--vcpu-family",
        ],
    );
}

#[test]
fn vcpu_counts_outside_1_to_512() {
    for n in ["0", "513", "4096", "-1", "two", ""] {
        refused(
            &cli(DEBIAN_OVMF, n, "EPYC", &[]),
            &["--vcpus", &format!("'{n}'"), "from 1 to 512"],
        );
    }
    refused(&["--firmware", DEBIAN_OVMF, "--vcpu-type", "EPYC"], &["--vcpus"]);
}

#[test]
fn bad_hex_and_impossible_features() {
    for v in ["zz", "0x", "0x1_0", "12345678901234567"] {
        refused(
            &with(&["--guest-features", v]),
            &["--guest-features", &format!("'{v}'"), "hex"],
        );
    }
    // `21` was measured as 0x21; sev-snp-measure reads it as 21 (0x15): one command line, two
    // digests. Refused, both readings named.
    refused(
        &with(&["--guest-features", "21"]),
        &[
            "--guest-features",
            "'21' is ambiguous without 0x",
            "write 0x21 or 0x15",
        ],
    );
    measure_support::refused_with(
        &[
            "igvm",
            "--firmware",
            DEBIAN_OVMF,
            "-o",
            "/nonexistent/x.igvm",
            "--guest-features",
            "21",
        ],
        "--guest-features",
        "'21' is ambiguous without 0x",
    );
    refused(
        &with(&["--guest-features", "0x20"]),
        &["--guest-features", "0x20", "SNP_ACTIVE"],
    );
    refused(
        &with(&["--vmm-type", "xen"]),
        &["--vmm-type", "'xen'", "qemu, ec2, gce"],
    );
    refused(&with(&["--bogus"]), &["--bogus"]);
}

#[test]
fn snp_only_options_with_sev_es() {
    refused(
        &with(&["--sev-es", "--guest-features", "0x21"]),
        &["--guest-features 0x21", "SEV-SNP launches only", "--sev-es"],
    );
}

#[test]
fn unreadable_missing_and_non_sev_firmware() {
    let dir = scratch("fw");
    let missing = dir.join("nope.fd");
    refused(
        &cli(&s(&missing), "1", "EPYC", &[]),
        &["--firmware", &s(&missing), "cannot read"],
    );
    refused(
        &cli(&s(&dir), "1", "EPYC", &[]),
        &["--firmware", &s(&dir), "not a regular file"],
    );
    // A firmware-sized file without the OVMF footer table: no SEV metadata at all.
    let zeros = dir.join("zeros.fd");
    std::fs::write(&zeros, vec![0u8; 64 * 4096]).unwrap();
    refused(
        &cli(&s(&zeros), "1", "EPYC", &[]),
        &[
            "--firmware",
            &s(&zeros),
            "no OVMF footer table",
            "no SEV metadata",
        ],
    );
    // Debian's variable store is an OVMF file without any of it too.
    let vars = "/usr/share/OVMF/OVMF_VARS.fd";
    if Path::new(vars).exists() {
        refused(&cli(vars, "1", "EPYC", &[]), &[vars, "no OVMF footer table"]);
    }
}

#[test]
fn truncated_and_corrupt_firmware() {
    let dir = scratch("corrupt");
    let good = std::fs::read(DEBIAN_OVMF).unwrap();
    let write = |name: &str, data: &[u8]| -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    };
    let cases: Vec<(PathBuf, Vec<&str>)> = vec![
        (
            write("cut-odd.fd", &good[..good.len() - 100]),
            vec!["multiple of 4096"],
        ),
        (
            write("cut-half.fd", &good[..good.len() / 2]),
            vec!["no OVMF footer table"],
        ),
        (write("empty.fd", &[]), vec!["is 0 bytes", "non-zero"]),
        (write("huge.fd", &vec![0; 17 << 20]), vec!["at most 16 MiB"]),
        (
            {
                // The ASEV header's signature, found through the metadata pointer.
                let mut b = good.clone();
                let at = b.windows(4).rposition(|w| w == b"ASEV").unwrap();
                b[at] = b'X';
                write("bad-sig.fd", &b)
            },
            vec!["signature", "ASEV"],
        ),
        (
            {
                let mut b = good.clone();
                let at = b.windows(4).rposition(|w| w == b"ASEV").unwrap();
                b[at + 12..at + 16].copy_from_slice(&1000u32.to_le_bytes());
                write("bad-count.fd", &b)
            },
            vec!["SEV metadata header", "1000 sections"],
        ),
        (
            {
                // The footer table's size field (48 bytes before the end).
                let mut b = good.clone();
                let at = b.len() - 50;
                b[at..at + 2].copy_from_slice(&5u16.to_le_bytes());
                write("bad-footer.fd", &b)
            },
            vec!["footer table size 5"],
        ),
    ];
    for (path, rules) in &cases {
        let mut want = vec!["--firmware", path.to_str().unwrap()];
        want.extend(rules);
        refused(&cli(path.to_str().unwrap(), "2", "EPYC", &[]), &want);
    }
}

#[test]
fn kernel_hashes_need_a_firmware_with_a_place_for_them() {
    // sev-snp-measure refuses these too (recorded with its message in the fixtures).
    let refusals = fixtures()["refusals"].as_array().unwrap();
    assert_eq!(refusals.len(), 4);
    for c in refusals {
        assert!(c["tool_error"].as_str().unwrap().contains("Kernel specified"));
        let args = measure_args(c);
        let args: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
        let rule = if c["mode"] == "snp" {
            "SNP_KERNEL_HASHES"
        } else {
            "kernel hashes"
        };
        refused(&args, &["--firmware", c["firmware"].as_str().unwrap(), rule]);
    }
    refused(
        &with(&["--initrd", "/etc/hostname"]),
        &["--initrd needs --kernel"],
    );
    refused(&with(&["--append", "quiet"]), &["--append needs --kernel"]);
    let synthetic = fixture_dir().join("synthetic-hashes.fd");
    let k = fixture_dir().join("kernel.bin");
    refused(
        &cli(&s(&synthetic), "1", "EPYC", &["--kernel", "/nonexistent/bzImage"]),
        &["--kernel /nonexistent/bzImage", "cannot read"],
    );
    refused(
        &cli(
            &s(&synthetic),
            "1",
            "EPYC",
            &["--kernel", &s(&k), "--initrd", "/nonexistent/initrd"],
        ),
        &["--initrd /nonexistent/initrd", "cannot read"],
    );
}

#[test]
fn dump_vmsa_refuses_to_overwrite_and_leaves_nothing_behind() {
    let root = scratch("dumpdir");
    let full = root.join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("vmsa0.bin"), b"mine").unwrap();
    let file = root.join("file");
    std::fs::write(&file, b"mine").unwrap();
    refused(
        &with(&["--dump-vmsa", &s(&full)]),
        &["--dump-vmsa", &s(&full), "not empty"],
    );
    refused(
        &with(&["--dump-vmsa", &s(&file)]),
        &["--dump-vmsa", "not a directory"],
    );
    let orphan = root.join("no/such/dir");
    refused(
        &with(&["--dump-vmsa", &s(&orphan)]),
        &["--dump-vmsa", "does not exist"],
    );
    // A bad input with a valid dump directory: the directory is not created.
    let fresh = root.join("fresh");
    refused(
        &cli(DEBIAN_OVMF, "2", "EPYC-Foo", &["--dump-vmsa", &s(&fresh)]),
        &["EPYC-Foo"],
    );
    let zeros = root.join("zeros.fd");
    std::fs::write(&zeros, vec![0u8; 4096]).unwrap();
    refused(
        &cli(&s(&zeros), "2", "EPYC", &["--dump-vmsa", &s(&fresh)]),
        &["no OVMF footer table"],
    );
    refused(
        &cli(
            DEBIAN_OVMF,
            "2",
            "EPYC",
            &["--kernel", "/etc/hostname", "--dump-vmsa", &s(&fresh)],
        ),
        &["SNP_KERNEL_HASHES"],
    );
    assert_eq!(ls(&root), ["file", "full", "zeros.fd"]);
    assert_eq!(ls(&full), ["vmsa0.bin"]);
    assert_eq!(std::fs::read(full.join("vmsa0.bin")).unwrap(), b"mine");
    // An empty existing directory is fine.
    let empty = root.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = vmm(["measure"].into_iter().chain(with(&["--dump-vmsa", &s(&empty)])));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(ls(&empty), ["vmsa0.bin", "vmsa1.bin"]);
    assert_eq!(ls(&root), ["empty", "file", "full", "zeros.fd"]);
}

/// Filling an existing empty directory kept every VMSA file open until all were written (an
/// unnamed `O_TMPFILE` file stays open until it is linked), so `--vcpus 512` under
/// `ulimit -n 512` failed with `EMFILE`; now one file at a time is open.
#[test]
fn dump_vmsa_into_an_existing_directory_keeps_one_file_open_at_a_time() {
    if !Path::new(DEBIAN_OVMF).exists() {
        eprintln!("skipped: {DEBIAN_OVMF} is missing (apt-get install ovmf)");
        return;
    }
    let root = scratch("dump-fds");
    let empty = root.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = output_within(
        std::time::Duration::from_secs(120),
        std::process::Command::new("bash")
            .args([
                "-c",
                r#"ulimit -n 64 && exec "$0" "$@""#,
                env!("CARGO_BIN_EXE_vmm"),
                "measure",
            ])
            .args(cli(DEBIAN_OVMF, "512", "EPYC-v4", &["--dump-vmsa", &s(&empty)])),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("vmsa dump: 512 files in {}", empty.display())),
        "{}",
        stdout(&out)
    );
    let mut want: Vec<String> = (0..512).map(|i| format!("vmsa{i}.bin")).collect();
    want.sort();
    assert_eq!(ls(&empty), want);
    assert_eq!(std::fs::metadata(empty.join("vmsa511.bin")).unwrap().len(), 4096);
    assert_eq!(ls(&root), ["empty"]);
}

#[test]
fn usage_errors_are_one_line_too() {
    for args in [&[][..], &["frobnicate"][..]] {
        let out = vmm(args);
        assert_eq!(out.status.code(), Some(2));
        assert_eq!(stderr(&out).lines().count(), 1, "{args:?}: {}", stderr(&out));
    }
    let help = vmm(["measure", "--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(stdout(&help).contains("--dump-vmsa"));
}

/// A FIFO as `--firmware` (and, until it read through `vmsa_host::input` too, as `--igvm`)
/// blocked `open(2)` forever; `--sev-es --kernel /dev/zero` hashed
/// without end before the check that this firmware cannot take kernel hashes.
#[test]
fn fifos_devices_and_unmeasurable_kernels_are_refused_at_once() {
    let dir = scratch("measure-fifo");
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let limit = std::time::Duration::from_secs(30);
    let check = |args: Vec<&str>, needle: &str| {
        let mut full = vec!["measure"];
        full.extend(args.iter().copied());
        let o = vmm_within(limit, &full);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{full:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{full:?}: {err}");
        assert!(err.contains(needle), "{full:?}: {err:?} lacks {needle:?}");
    };
    let f = s(&fifo);
    check(
        cli(&f, "1", "EPYC-v4", &[]),
        &format!("--firmware {f}: is a FIFO, not a regular file"),
    );
    // `--igvm` was opened by a path of its own that blocked on a FIFO too.
    check(
        vec!["--igvm", &f],
        &format!("--igvm {f}: is a FIFO, not a regular file: an IGVM file must be"),
    );
    check(
        vec!["--igvm", "/dev/zero"],
        "--igvm /dev/zero: is a character device, not a regular file: an IGVM file must be",
    );
    let synthetic = s(&fixture_dir().join("synthetic-hashes.fd"));
    check(
        cli(&synthetic, "1", "EPYC", &["--kernel", &f]),
        &format!("--kernel {f}: is a FIFO, not a regular file: a kernel must be"),
    );
    check(
        cli(
            &synthetic,
            "1",
            "EPYC",
            &["--kernel", "/etc/hostname", "--initrd", "/dev/zero"],
        ),
        "--initrd /dev/zero: is a character device, not a regular file: an initrd must be",
    );
    check(
        with(&["--sev-es", "--kernel", "/dev/zero"]),
        "does not support SEV-ES kernel hashes",
    );
    check(
        with(&["--kernel", "/dev/zero"]),
        "has no SNP_KERNEL_HASHES metadata section",
    );
}

#[test]
fn a_vcpu_type_that_ec2_and_gce_ignore_is_said_to_be_ignored() {
    for vmm_type in ["ec2", "gce"] {
        let out = vmm(["measure"].into_iter().chain(cli(
            DEBIAN_OVMF,
            "2",
            "EPYC-Turin",
            &["--vmm-type", vmm_type],
        )));
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("--vcpu-type EPYC-Turin: ignored with --vmm-type"),
            "{vmm_type}: {err}"
        );
        assert!(stdout(&out).contains("EPYC-Turin ignored"), "{}", stdout(&out));
    }
    // QEMU uses the model: no warning.
    let out = vmm(["measure"].into_iter().chain(with(&[])));
    assert!(!stderr(&out).contains("ignored"), "{}", stderr(&out));
}
