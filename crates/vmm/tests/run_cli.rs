//! `vmm run` end to end through the real binary: every built-in guest on the simulator (JSON
//! summaries checked: ownership histories, leaks, the reclaim path), firmware launches whose
//! digest must equal sev-snp-measure's and `vmm measure`'s, the KVM backend where /dev/kvm is
//! usable, and bad inputs.

mod measure_support;

use std::process::Command;

use measure_support::{
    DEBIAN_OVMF, Scratch, assert_refused, fixture_cases, fixture_path, fixtures, mkfifo, output_within,
    scratch, stderr, stdout, vmm, vmm_within,
};
use serde_json::Value;

fn run_json(args: &[&str]) -> (Value, i32) {
    let mut a = vec!["run", "--json"];
    a.extend_from_slice(args);
    let o = vmm(&a);
    let text = stdout(&o);
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("vmm {a:?}: not JSON ({e}): {text}\nstderr: {}", stderr(&o)));
    (v, o.status.code().unwrap_or(-1))
}

/// A guest script file `name` holding `json`, in a fresh scratch directory `dir` (which holds
/// it while the directory is kept).
fn guest_script(dir: &str, name: &str, json: &str) -> (Scratch, std::path::PathBuf) {
    let dir = scratch(dir);
    let path = dir.join(name);
    std::fs::write(&path, json).unwrap();
    (dir, path)
}

/// The state names a vCPU's VMSA went through.
fn path(summary: &Value, vcpu: u64) -> Vec<String> {
    let h = summary["ownership"]["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["vcpu"] == vcpu)
        .unwrap_or_else(|| panic!("no history for vCPU {vcpu}"));
    h["path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

fn ops(summary: &Value, vcpu: u64) -> Vec<String> {
    let h = summary["ownership"]["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["vcpu"] == vcpu)
        .unwrap();
    h["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["op"].as_str().unwrap().to_owned())
        .collect()
}

fn count(p: &[String], state: &str) -> usize {
    p.iter().filter(|s| *s == state).count()
}

#[test]
fn boot_launches_the_bsp_from_a_host_vmsa_and_the_aps_from_guest_vmsas() {
    let (s, code) = run_json(&["--vcpus", "4", "--memory", "64M", "--guest", "builtin:boot"]);
    assert_eq!(code, 0, "{s:#}");
    assert_eq!(s["ok"], true);
    assert_eq!(s["backend"], "sim");
    assert_eq!(s["mode"], "SEV-SNP");
    assert_eq!(s["launch"]["state"], "Finished");
    assert_eq!(s["launch"]["digest"].as_str().unwrap().len(), 96);
    assert_eq!(path(&s, 0), ["None", "KvmShared", "KvmPrivate", "None"]);
    for ap in 1..4 {
        assert_eq!(
            path(&s, ap),
            ["None", "KvmShared", "KvmPrivate", "None", "GuestOwned", "None"],
            "vCPU {ap}"
        );
        assert_eq!(ops(&s, ap)[..3], ["Alloc", "MakePrivate", "SetGuestVmsa"]);
    }
    assert_eq!(s["ownership"]["leaks"].as_array().unwrap().len(), 0);
    assert_eq!(s["rmp_faults"], 0);
    assert_eq!(s["guest_run"]["failed"], 0);
    assert_eq!(s["guest_run"]["ap_requests"], 6, "3 creates + 3 destroys");
    assert_eq!(s["teardown"]["frames_still_allocated"], 0);
    let phases: Vec<&str> = s["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["create", "launch", "run", "teardown"]);
    assert!(
        s["phases"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["cycles"].as_u64().unwrap() > 0)
    );
    let costs = s["costs"]["ops"].as_array().unwrap();
    let rmpupdates = costs.iter().find(|r| r["op"] == "rmpupdate_4k").unwrap();
    assert!(
        rmpupdates["count"].as_u64().unwrap() >= 4,
        "one per VMSA at least: {rmpupdates}"
    );
    // Each vCPU ran on its own thread, and vCPU 0 ended the run on the done port.
    assert_eq!(s["guest_run"]["end"]["end"], "done");
    let vcpus = s["guest_run"]["vcpus"].as_array().unwrap();
    assert_eq!(vcpus.len(), 4);
    assert!(vcpus.iter().all(|v| v["runs"].as_u64().unwrap() > 0), "{vcpus:?}");
}

#[test]
fn ap_churn_recreates_every_ap_many_times_without_leaks() {
    let (s, code) = run_json(&["--vcpus", "3", "--memory", "64M", "--guest", "builtin:ap-churn"]);
    assert_eq!(code, 0, "{s:#}");
    for ap in 1..3 {
        let p = path(&s, ap);
        assert_eq!(count(&p, "GuestOwned"), 8, "vCPU {ap}: {p:?}");
        assert_eq!(ops(&s, ap).iter().filter(|o| *o == "Destroy").count(), 8);
    }
    assert_eq!(s["guest_run"]["ap_requests"], 32);
    assert_eq!(s["ownership"]["leaks"].as_array().unwrap().len(), 0);
    assert_eq!(s["teardown"]["frames_still_allocated"], 0);
}

#[test]
fn reset_applies_a_pending_guest_vmsa_at_init() {
    let (s, code) = run_json(&["--vcpus", "3", "--memory", "64M", "--guest", "builtin:reset"]);
    assert_eq!(code, 0, "{s:#}");
    let p = path(&s, 1);
    assert_eq!(count(&p, "GuestOwned"), 2, "two INITs, two guest VMSAs: {p:?}");
    let steps = s["ownership"]["vcpus"][1]["transitions"].as_array().unwrap();
    let owned: Vec<u64> = steps
        .iter()
        .filter(|x| x["to"]["state"] == "GuestOwned")
        .map(|x| x["to"]["at"].as_u64().unwrap())
        .collect();
    assert_eq!(owned, [0x20_1000, 0x20_2000]);
}

/// Every built-in was refused below (vcpus + 1) × 2 MiB of `--memory`, whatever it touched:
/// an SEV-ES boot (vCPU 0 only), `vmrun-fail` (AP 1 only, for any count) and the default 1 GiB
/// for 512 vCPUs were refused. The least is now what the script and the image touch.
#[test]
fn builtins_need_only_the_memory_their_scripts_touch() {
    for args in [
        &["--sev-es", "--vcpus", "4", "--memory", "8M"][..],
        &["--guest", "builtin:vmrun-fail", "--vcpus", "8", "--memory", "8M"],
        &["--vcpus", "512"],
    ] {
        let (s, code) = run_json(args);
        assert_eq!(code, 0, "{args:?}: {s:#}");
        assert_eq!(s["ok"], true, "{args:?}: {s:#}");
        assert_eq!(s["teardown"]["frames_still_allocated"], 0, "{args:?}");
    }
    // What is really too small is still refused, in one line: AP 3's data page ends at
    // 6 MiB + 12 KiB; the image at 1 MiB + 64 KiB.
    for (args, needle) in [
        (
            &["run", "--vcpus", "4", "--memory", "6M"][..],
            "--memory 6MiB: builtin:boot needs at least 6156KiB of guest memory",
        ),
        (
            &["run", "--vcpus", "1", "--memory", "1M"],
            "--memory 1MiB: builtin:boot needs at least 1088KiB of guest memory",
        ),
        (
            &["run", "--vcpus", "512", "--memory", "1022M"],
            "--memory 1022MiB: builtin:boot needs at least 1046540KiB of guest memory",
        ),
    ] {
        assert_refused(&vmm(args), &format!("{args:?}"), needle);
    }
}

/// With `--firmware`, too small a `--memory` was said to leave the image "in a hole of the
/// layout (the PCI hole below 4 GiB), where no --memory puts RAM": the ROM ending at 4 GiB
/// made every range below it look like a hole. 9M covers it.
#[test]
fn too_little_memory_for_a_firmware_is_named_as_memory_not_the_pci_hole() {
    let a = ["run", "--firmware", DEBIAN_OVMF, "--memory", "8M", "--vcpus", "1"];
    let o = vmm(a);
    assert_refused(
        &o,
        &format!("{a:?}"),
        "--memory 8MiB: SNP_SEC_MEM (section #0) of the launch image at GPA 0x800000 (0x9000 bytes) lies \
         beyond the guest memory it gives",
    );
    assert!(!stderr(&o).contains("hole"), "{}", stderr(&o));
    let (s, code) = run_json(&["--firmware", DEBIAN_OVMF, "--memory", "9M", "--vcpus", "1"]);
    assert_eq!(code, 0, "{s:#}");
}

/// `--guest`'s help listed six built-ins and not `builtin:vmrun-fail`, which it accepts: every
/// built-in is named in `vmm run --help` (short and long).
#[test]
fn run_help_names_every_builtin_guest() {
    for flag in ["-h", "--help"] {
        let o = vmm(["run", flag]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let help = stdout(&o);
        let line = help
            .lines()
            .skip_while(|l| !l.contains("--guest <"))
            .take(2)
            .collect::<String>();
        for (name, _) in vmm::run::scenario::BUILTINS {
            // The whole name: builtin:linux-boot is not named by builtin:linux-boot-4k.
            let named = line.match_indices(&format!("builtin:{name}")).any(|(at, m)| {
                !line[at + m.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-')
            });
            assert!(named, "{flag}: builtin:{name} missing: {line}");
        }
    }
}

/// With too few file descriptors for the event loop (`ulimit -n`), the run said `event loop:
/// epoll: Epoll(Error(24))` (event-manager's Debug text) and skipped the VM's teardown. The
/// message now names the OS error; the run still fails (exit 1), in one line.
#[test]
fn an_event_loop_without_file_descriptors_names_the_os_error() {
    let mut saw_epoll = false;
    for n in 3..=12 {
        let o = Command::new("bash")
            .args([
                "-c",
                &format!("ulimit -n {n} && exec \"$0\" run --vcpus 1 --memory 16M"),
                env!("CARGO_BIN_EXE_vmm"),
            ])
            .output()
            .unwrap();
        let e = stderr(&o);
        if o.status.success() {
            continue;
        }
        assert_eq!(e.lines().count(), 1, "ulimit -n {n}: {e}");
        assert!(!e.contains("Error("), "ulimit -n {n}: Debug text: {e}");
        if e.contains("event loop: ") {
            assert_eq!(o.status.code(), Some(1), "ulimit -n {n}: {e}");
            assert!(
                e.trim_end().ends_with("Too many open files (os error 24)"),
                "ulimit -n {n}: {e}"
            );
            saw_epoll |= e.contains("event loop: epoll: ");
        }
    }
    assert!(saw_epoll, "no ulimit -n made epoll_create fail");
}

#[test]
fn launch_fail_shows_the_reclaim_path() {
    let (s, code) = run_json(&[
        "--vcpus",
        "3",
        "--memory",
        "64M",
        "--guest",
        "builtin:launch-fail",
    ]);
    assert_eq!(code, 0, "the failure is the scenario's point: {s:#}");
    assert_eq!(s["launch"]["state"], "Failed");
    assert_eq!(s["launch"]["expected_failure"], true);
    assert!(
        s["launch"]["error"]
            .as_str()
            .unwrap()
            .contains("INVALID_PAGE_STATE")
    );
    assert_eq!(ops(&s, 2), ["Alloc", "MakePrivate", "Reclaim"]);
    assert_eq!(ops(&s, 0).last().unwrap(), "Free");
    assert_eq!(
        s["faults_injected"],
        serde_json::json!(["snp_launch_update:vmsa:3=INVALID_PAGE_STATE"])
    );
    assert_eq!(s["ownership"]["leaks"].as_array().unwrap().len(), 0);
    assert!(s["guest_run"].is_null(), "no guest runs after a failed launch");
    assert_eq!(s["teardown"]["frames_still_allocated"], 0);
}

#[test]
fn a_fault_rule_that_never_fires_is_a_warning_naming_the_calls_it_counted() {
    // 4 vCPUs launch 4 VMSAs: the fifth never comes.
    let rules = "snp_launch_update:vmsa:5=INVALID_PAGE_STATE,snp_launch_update:vmsa:2=INVALID_PAGE_STATE";
    let (s, code) = run_json(&["--fault", rules]);
    assert_eq!(code, 1, "the second rule fails the launch: {s}");
    assert_eq!(
        s["faults_injected"],
        serde_json::json!(["snp_launch_update:vmsa:2=INVALID_PAGE_STATE"])
    );
    assert_eq!(
        s["faults_not_fired"],
        serde_json::json!([{"rule": "snp_launch_update:vmsa:5=INVALID_PAGE_STATE", "calls": 2}])
    );
    let o = vmm(["run", "--fault", "alloc_page:99999=ENOMEM"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    let warning = text
        .lines()
        .find(|l| l.starts_with("warning: fault rule `alloc_page:99999=ENOMEM` never fired"))
        .unwrap_or_else(|| panic!("no warning:\n{text}"));
    assert!(warning.ends_with(" calls"), "{warning}");
}

#[test]
fn a_failed_reclaim_is_leaked_on_purpose_and_reported() {
    let (s, code) = run_json(&[
        "--vcpus",
        "2",
        "--memory",
        "64M",
        "--guest",
        "builtin:launch-fail",
        "--fault",
        "page_reclaim:1=INVALID_PAGE_STATE",
    ]);
    assert_eq!(code, 0, "{s:#}");
    let leaks = s["ownership"]["leaks"].as_array().unwrap();
    assert_eq!(leaks.len(), 1, "{leaks:?}");
    assert_eq!(leaks[0]["reason"], "ReclaimFailed");
    assert_eq!(leaks[0]["vcpu"], 1);
    assert_eq!(s["teardown"]["frames_leaked_on_purpose"], 1);
    assert_eq!(
        s["teardown"]["frames_still_allocated"], 0,
        "every other frame came back"
    );
}

#[test]
fn an_unexpected_leak_fails_the_run() {
    // The fault makes the BSP's VMSA unfreeable; with a built-in that expects a clean run the
    // summary must say so (exit 1) — but the leak itself is reported, not hidden.
    let (s, code) = run_json(&[
        "--vcpus",
        "1",
        "--memory",
        "16M",
        "--guest",
        "builtin:boot",
        "--fault",
        "snp_launch_update:vmsa:1=INVALID_PAGE_STATE",
    ]);
    assert_eq!(code, 1, "{s:#}");
    assert_eq!(s["ok"], false);
    assert!(
        s["problems"][0].as_str().unwrap().contains("the launch failed"),
        "{s:#}"
    );
}

fn fixture_case(mode: &str, vcpus: u64) -> Value {
    fixtures()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["firmware"] == DEBIAN_OVMF
                && c["mode"] == mode
                && c["vcpus"] == vcpus
                && c["vmm_type"] == "qemu"
                && c.get("kernel").is_none()
                && (mode == "sev-es" || c["guest_features"] == "0x1")
        })
        .unwrap_or_else(|| panic!("no {mode} fixture with {vcpus} vCPUs"))
        .clone()
}

#[test]
fn a_firmware_launch_reaches_sev_snp_measures_digest() {
    for (mode, vcpus) in [("snp", 2), ("snp", 64), ("sev-es", 2)] {
        let case = fixture_case(mode, vcpus);
        let n = vcpus.to_string();
        let vcpu_type = case["vcpu_type"].as_str().unwrap();
        let mut args = vec!["--firmware", DEBIAN_OVMF, "--vcpus", &n, "--vcpu-type", vcpu_type];
        if mode == "sev-es" {
            args.push("--sev-es");
        }
        let (s, code) = run_json(&args);
        assert_eq!(code, 0, "{mode} {vcpus}: {s:#}");
        assert_eq!(
            s["launch"]["digest"], case["digest"],
            "{mode} {vcpus} vCPUs ({vcpu_type})"
        );
        assert_eq!(s["launch"]["digest_matches"], true);
        // And `vmm measure` prints the same digest as its last line.
        let mut m = vec![
            "measure",
            "--firmware",
            DEBIAN_OVMF,
            "--vcpus",
            &n,
            "--vcpu-type",
            vcpu_type,
        ];
        if mode == "sev-es" {
            m.push("--sev-es");
        }
        let out = stdout(&vmm(&m));
        assert_eq!(out.lines().last(), case["digest"].as_str());
    }
}

/// A direct kernel boot launched on the simulator (`--firmware` with `--kernel`, `--initrd`,
/// `--append`) puts the hash table into the launch as sev-snp-measure measures it: every
/// QEMU kernel case of the fixtures (SEV-SNP and SEV-ES, the synthetic firmware that has the
/// table) reaches sev-snp-measure's digest. The options need what they apply to, Debian's
/// OVMF (no SNP_KERNEL_HASHES) is refused in one line, and --trace cannot replace the kernel.
#[test]
fn a_direct_kernel_boot_launch_reaches_sev_snp_measures_digest() {
    let cases = fixture_cases(|c| c.get("kernel").is_some() && c["vmm_type"] == "qemu" && c["dump"] == false);
    assert!(cases.len() >= 10, "{} kernel cases", cases.len());
    for case in &cases {
        let path = |k: &str| case.get(k).and_then(Value::as_str).map(fixture_path);
        let (firmware, kernel) = (path("firmware").unwrap(), path("kernel").unwrap());
        let n = case["vcpus"].to_string();
        let mut args = vec![
            "--firmware".to_owned(),
            firmware.display().to_string(),
            "--kernel".to_owned(),
            kernel.display().to_string(),
            "--vcpus".to_owned(),
            n,
            "--vcpu-type".to_owned(),
            case["vcpu_type"].as_str().unwrap().to_owned(),
            "--memory".to_owned(),
            "64M".to_owned(),
        ];
        if let Some(i) = path("initrd") {
            args.extend(["--initrd".to_owned(), i.display().to_string()]);
        }
        if let Some(a) = case.get("append").and_then(Value::as_str) {
            args.extend(["--append".to_owned(), a.to_owned()]);
        }
        if case["mode"] == "sev-es" {
            args.push("--sev-es".to_owned());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (s, code) = run_json(&args);
        assert_eq!(code, 0, "case {}: {s:#}", case["id"]);
        assert_eq!(s["launch"]["digest"], case["digest"], "case {}", case["id"]);
        assert_eq!(s["launch"]["digest_matches"], true);
    }
    let kernel = fixture_path("kernel.bin");
    let kernel = kernel.to_str().unwrap();
    let refused = |args: &[&str], needle: &str| {
        let mut a = vec!["run"];
        a.extend_from_slice(args);
        assert_refused(&vmm(&a), &format!("{a:?}"), needle);
    };
    refused(&["--kernel", kernel], "--firmware");
    refused(&["--firmware", DEBIAN_OVMF, "--initrd", kernel], "--kernel");
    refused(
        &["--firmware", DEBIAN_OVMF, "--kernel", kernel],
        "has no SNP_KERNEL_HASHES metadata section",
    );
    let synthetic = fixture_path("synthetic-hashes.fd");
    refused(
        &[
            "--firmware",
            synthetic.to_str().unwrap(),
            "--kernel",
            kernel,
            "--trace",
            kernel,
        ],
        "is the file given as --kernel",
    );
}

#[test]
fn trace_is_a_perfetto_timeline() {
    let dir = scratch("run-trace");
    let trace = dir.join("run.trace.json");
    let (s, code) = run_json(&[
        "--vcpus",
        "2",
        "--memory",
        "16M",
        "--trace",
        trace.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{s:#}");
    let t: Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let events = t["traceEvents"].as_array().unwrap();
    assert!(events.len() > 10);
    assert!(
        events
            .iter()
            .any(|e| e["ph"] == "X" && e["dur"].as_f64().is_some())
    );
    let phases: Vec<&str> = events
        .iter()
        .filter(|e| e["cat"] == "phase")
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(phases, ["create", "launch", "run", "teardown"]);
}

/// Costs that run the simulated clock past `u64::MAX` (2^24 PVALIDATEs at the largest cost a
/// file may give one, 2^40 cycles) left it stuck there, and the report printed that number as
/// a time. It now says the clock saturated, in the text and in the JSON.
#[test]
fn a_clock_the_costs_overflow_is_reported_as_saturated_not_as_a_time() {
    let dir = scratch("run-costs-saturated");
    let costs = dir.join("costs.toml");
    std::fs::write(&costs, "[cycles]\npvalidate_4k = 1099511627776\n").unwrap();
    let args = [
        "--vcpus",
        "1",
        "--memory",
        "64G",
        "--guest",
        "builtin:linux-boot-4k",
        "--costs",
        costs.to_str().unwrap(),
    ];
    let (s, code) = run_json(&args);
    assert_eq!(code, 0);
    assert_eq!(s["costs"]["saturated"], true, "{}", s["costs"]);
    assert_eq!(s["costs"]["total_us"], Value::Null);
    let mut text = vec!["run"];
    text.extend(args);
    let out = stdout(&vmm(&text));
    let clock = out.lines().find(|l| l.starts_with("machine clock:")).unwrap();
    assert!(
        clock.starts_with("machine clock: saturated at 18446744073709551615 cycles"),
        "{clock}"
    );
    assert!(!clock.contains(" ms "), "{clock}");
}

#[test]
fn costs_file_changes_the_cycles() {
    let dir = scratch("run-costs");
    let costs = dir.join("costs.toml");
    std::fs::write(&costs, "[cycles]\nrmpupdate_4k = 1000000\n").unwrap();
    let (base, _) = run_json(&["--vcpus", "2", "--memory", "16M"]);
    let (slow, code) = run_json(&[
        "--vcpus",
        "2",
        "--memory",
        "16M",
        "--costs",
        costs.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    let unit = |s: &Value| {
        s["costs"]["ops"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["op"] == "rmpupdate_4k")
            .unwrap()["unit_cycles"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(unit(&base), 1500);
    assert_eq!(unit(&slow), 1_000_000);
    assert!(slow["costs"]["total_cycles"].as_u64() > base["costs"]["total_cycles"].as_u64());
}

/// A guest action whose bookkeeping outgrows the simulator's memory budget ends the run there
/// (the vCPU's KVM_RUN fails), with an error naming the operation and the budget; everything
/// is torn down and the run fails with exit code 1. (4 KiB PVALIDATEs of 10^9 pages at
/// `--memory 8T` held 8 GB of RMP entries for 43 s before.)
#[test]
fn a_run_that_outgrows_the_memory_budget_ends_there_naming_it() {
    // 4 GiB of 4 KiB PVALIDATEs above 4 GiB: 8 MiB of RMP entries.
    let (_dir, script) = guest_script(
        "run-budget",
        "pvalidate.json",
        r#"{"name": "big", "actions": [
            {"action": "pvalidate", "vcpu": 0, "gpa": 4294967296, "pages": 1048576},
            {"action": "hlt", "vcpu": 0}
        ]}"#,
    );
    let args = [
        "--vcpus",
        "1",
        "--memory",
        "8G",
        "--guest",
        script.to_str().unwrap(),
    ];
    let mut small = args.to_vec();
    small.extend(["--sim-memory-budget", "4M"]);
    let (s, code) = run_json(&small);
    assert_eq!(code, 1, "{s:#}");
    let end = &s["guest_run"]["end"];
    assert_eq!(
        (&end["end"], &end["vcpu"]),
        (&Value::from("error"), &Value::from(0))
    );
    let error = end["error"].as_str().unwrap();
    assert!(
        error.contains("KVM_RUN: PVALIDATE") && error.contains("memory budget of 4194304 bytes"),
        "{error}"
    );
    assert!(
        s["footprint"]["bytes"].as_u64().unwrap() <= (4 << 20) + 8192,
        "stopped within a region's pass of the budget: {:#}",
        s["footprint"]
    );
    assert_eq!(s["teardown"]["frames_still_allocated"], 0);
    // The default budget (2G) holds the same run.
    let (s, code) = run_json(&args);
    assert_eq!(code, 0, "{s:#}");
}

/// The budget held the guest's operations only: a launch whose pages took more (an OVMF image
/// with a 3 GiB SNP_SEC_MEM section: 3 GiB of encrypted ZERO pages) went past it, and the
/// failed launch was also reported as a digest mismatch. Launch updates and host writes are
/// held to it too, and a failed launch has no digest to compare.
#[test]
fn a_launch_that_outgrows_the_memory_budget_ends_there_naming_it() {
    let (s, code) = run_json(&[
        "--firmware",
        DEBIAN_OVMF,
        "--vcpus",
        "1",
        "--sim-memory-budget",
        "256K",
    ]);
    assert_eq!(code, 1, "{s:#}");
    assert_eq!(s["launch"]["state"], "Failed", "{s:#}");
    let error = s["launch"]["error"].as_str().unwrap();
    assert!(
        error.contains("SNP_LAUNCH_UPDATE: the simulator's own structures take")
            && error.contains("more than its memory budget of 262144 bytes (vmm run --sim-memory-budget)"),
        "{error}"
    );
    assert!(s["launch"]["digest_matches"].is_null(), "{s:#}");
    assert_eq!(s["problems"].as_array().unwrap().len(), 1, "{s:#}");
    assert_eq!(s["teardown"]["frames_still_allocated"], 0);
    assert_eq!(s["ownership"]["leaks"].as_array().unwrap().len(), 0, "{s:#}");
}

#[test]
fn a_guest_script_file_runs() {
    let (_dir, script) = guest_script(
        "run-script",
        "guest.json",
        r#"{"name": "one-ap", "actions": [
            {"action": "pvalidate", "vcpu": 0, "gpa": 2101248},
            {"action": "write_vmsa", "vcpu": 0, "gpa": 2101248, "rip": 4096},
            {"action": "make_vmsa", "vcpu": 0, "gpa": 2101248},
            {"action": "ap_create", "vcpu": 0, "apic_id": 1, "gpa": 2101248},
            {"action": "ap_create", "vcpu": 0, "apic_id": 1, "gpa": 2097152},
            {"action": "hlt", "vcpu": 1},
            {"action": "hlt", "vcpu": 0}
        ]}"#,
    );
    let (s, code) = run_json(&[
        "--vcpus",
        "2",
        "--memory",
        "16M",
        "--guest",
        script.to_str().unwrap(),
    ]);
    assert_eq!(
        code, 0,
        "a guest's refused request is the guest's business: {s:#}"
    );
    assert_eq!(s["scenario"], "one-ap");
    assert_eq!(
        s["guest_run"]["ap_refused"], 1,
        "the 2 MiB-aligned VMSA is refused"
    );
    let failure = &s["guest_run"]["failures"][0];
    assert_eq!(failure["index"], 4);
    assert!(
        failure["error"].as_str().unwrap().contains("erratum 1467"),
        "{failure}"
    );
    assert_eq!(count(&path(&s, 1), "GuestOwned"), 1);
}

#[test]
fn kvm_backend_runs_real_vcpus_where_dev_kvm_is_usable() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        println!("skipped: /dev/kvm is not usable here ({e})");
        return;
    }
    let (s, code) = run_json(&["--backend", "kvm", "--vcpus", "4", "--memory", "64M"]);
    assert_eq!(code, 0, "{s:#}");
    assert_eq!(s["backend"], "kvm");
    assert_eq!(s["mode"], "VMSA-image");
    assert!(
        s["mode_reason"]
            .as_str()
            .unwrap()
            .contains("SEV-SNP is not available")
    );
    for ap in 1..4 {
        assert!(path(&s, ap).contains(&"GuestOwned".to_owned()), "vCPU {ap}");
    }
    // The same flow as the simulator: vCPU 0 ended the run on the done port, every vCPU ran on
    // its own thread, and what image mode cannot see is said, not left out.
    assert_eq!(s["guest_run"]["end"]["end"], "done", "{s:#}");
    assert_eq!(s["guest_run"]["ap_requests"], 3);
    assert_eq!(s["guest_run"]["vcpus"].as_array().unwrap().len(), 4);
    let hidden: Vec<&str> = s["hidden"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["what"].as_str().unwrap())
        .collect();
    assert!(hidden.contains(&"launch_digest"), "{hidden:?}");
    // Guest RAM goes back with the VM (guest_memfd's fd, or this process's mapping): its frames
    // are not counted, and the report says so instead of showing 0 released (it did).
    assert!(hidden.contains(&"guest_frames"), "{hidden:?}");
    // The text names none of them as counted: each has its "not observable" line instead.
    let text = stdout(&vmm(["run", "--backend", "kvm", "--vcpus", "2"]));
    for h in &hidden {
        assert!(
            text.contains(&format!("not observable on this host: {h} (")),
            "{text}"
        );
    }
    assert!(
        !text.contains("RMP faults:") && !text.contains("guest frames"),
        "{text}"
    );
    assert!(
        text.contains("teardown: 2 vCPUs, 0 VMSAs leaked, 0 host frames left"),
        "{text}"
    );
    assert_eq!(s["teardown"]["frames_still_allocated"], 0);
    // The RAM is what the probe says this KVM can back it with (it was always reported as
    // guest_memfd, also on a KVM without guest_memfd, where the run failed before).
    let probe: Value = serde_json::from_str(&stdout(&vmm(["probe", "--json"]))).unwrap();
    let layout = s["memory_layout"].as_str().unwrap();
    match probe["kvm"]["image_ram"].as_str() {
        Some("guest_memfd") => assert!(layout.starts_with("RAM in guest_memfd"), "{layout}"),
        Some("anonymous") => assert!(layout.starts_with("RAM in anonymous memory"), "{layout}"),
        other => panic!("probe image_ram {other:?}"),
    }
}

#[test]
fn probe_reports_the_modes_and_why() {
    let o = vmm(["probe", "--json"]);
    assert!(o.status.success());
    let p: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(p["sim"].as_str().unwrap().starts_with("available"));
    assert!(p["kvm"].is_object());
    let text = stdout(&vmm(["probe"]));
    assert!(text.contains("backend sim: available"), "{text}");
}

/// `vmm probe --json` lacked the verdict the text ends with ("A run uses VMSA-image mode."):
/// `run_mode` is it, named as `kvm.modes[].mode` names modes, `null` when no mode can run.
#[test]
fn probe_json_has_the_run_mode_the_text_names() {
    let o = vmm(["probe", "--json"]);
    assert!(o.status.success());
    let p: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let run_mode = p.get("run_mode").unwrap_or_else(|| panic!("no run_mode: {p:#}"));
    let text = stdout(&vmm(["probe"]));
    let verdict = text.lines().last().unwrap_or_default();
    use backend_kvm::Mode;
    match [Mode::Snp, Mode::SevEs, Mode::VmsaImage]
        .into_iter()
        .find(|m| serde_json::to_value(m).unwrap() == *run_mode)
    {
        Some(mode) => {
            assert_eq!(verdict, format!("A run uses {mode} mode."), "{text}");
            let listed = p["kvm"]["modes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["mode"] == *run_mode);
            assert_eq!(listed.map(|m| &m["supported"]), Some(&Value::Bool(true)), "{p:#}");
        }
        None => {
            assert!(run_mode.is_null(), "{run_mode}");
            assert_eq!(verdict, "No mode of this backend can run on this host.", "{text}");
        }
    }
}

/// `--sev-es --migrate`: the launched guest moves into a second VM
/// (`KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM`) and runs there; each vCPU's history goes through the
/// move, and the teardown covers both VMs.
#[test]
fn an_sev_es_guest_moves_into_a_second_vm_and_runs_there() {
    let (s, code) = run_json(&["--sev-es", "--migrate", "--vcpus", "2", "--memory", "8M"]);
    assert_eq!(code, 0, "{s:#}");
    assert_eq!(s["migration"]["error"], Value::Null);
    for v in 0..2 {
        assert_eq!(
            ops(&s, v),
            ["Alloc", "MakePrivate", "MigrateOut", "MigrateIn", "Free"],
            "vCPU {v}"
        );
    }
    assert_eq!(
        s["teardown"]["vcpus"], 4,
        "the dead source's two vCPUs and the destination's"
    );
    assert_eq!(s["guest_run"]["end"]["end"], "done");
    assert!(
        s["guest_run"]["vmruns"].as_u64() > Some(0),
        "the guest ran in the destination"
    );
}

/// `builtin:vmrun-fail`: the AP's VMRUN fails on a page that is no VMSA; with
/// `--dump-invalid-vmcb` the host dumps the vCPU, its save area decrypted only if the policy
/// allows debugging (`SNP_DBG_DECRYPT`, through a firmware page that is reclaimed after).
#[test]
fn a_failed_vmrun_is_dumped_and_decrypted_when_the_policy_allows_debugging() {
    let base = ["--vcpus", "2", "--memory", "8M", "--guest", "builtin:vmrun-fail"];
    let dumps = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        let (s, code) = run_json(&a);
        assert_eq!(code, 0, "{a:?}: the entry failure is the scenario's: {s:#}");
        assert_eq!(s["guest_run"]["end"]["end"], "error", "{s:#}");
        assert_eq!(s["guest_run"]["end"]["vcpu"], 1);
        assert_eq!(s["teardown"]["frames_still_allocated"], 0);
        s["guest_run"]["vmcb_dumps"].as_array().unwrap().clone()
    };
    assert!(
        dumps(&[]).is_empty(),
        "kvm_amd.dump_invalid_vmcb is off by default"
    );
    let refused = dumps(&["--dump-invalid-vmcb"]);
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["save_area"], Value::Null);
    assert!(
        refused[0]["unavailable"]
            .as_str()
            .unwrap()
            .contains("lacks DEBUG (bit 19)")
    );
    let decrypted = dumps(&["--dump-invalid-vmcb", "--allow-debug"]);
    assert_eq!(decrypted[0]["vcpu"], 1);
    assert_eq!(
        decrypted[0]["save_area"]["rip"], 0x10_0000,
        "the entry state the BSP wrote into the page"
    );
    // With sound VMSAs (builtin:boot) no VMRUN fails and nothing is dumped.
    let (s, code) = run_json(&[
        "--vcpus",
        "2",
        "--memory",
        "8M",
        "--dump-invalid-vmcb",
        "--allow-debug",
    ]);
    assert_eq!(code, 0, "{s:#}");
    assert_eq!(s["guest_run"]["vmcb_dumps"], Value::Array(vec![]));
}

#[test]
fn bad_inputs_are_one_line_with_exit_code_2() {
    let dir = scratch("run-bad");
    let not_json = dir.join("bad.json");
    std::fs::write(&not_json, "{ nope").unwrap();
    let missing_dir_trace = dir.join("no/such/dir/t.json");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--memory".into(), "12X".into()], "'12X' is not a size"),
        (
            vec!["--memory".into(), "-1G".into()],
            "'-1G' is not a size: it must start with a whole number",
        ),
        (
            // 2^60 bytes: more than any x86-64 address space (57 bits with 5-level paging).
            vec!["--memory".into(), "1048576T".into()],
            "--memory 1048576TiB: this host cannot reserve that much guest memory",
        ),
        (vec!["--vcpus".into(), "513".into()], "from 1 to 512"),
        (
            vec!["--guest".into(), "builtin:nope".into()],
            "known: boot, ap-churn, reset, launch-fail",
        ),
        (vec!["--guest".into(), not_json.display().to_string()], "bad.json"),
        (
            vec!["--firmware".into(), "/etc/hostname".into()],
            "--firmware /etc/hostname",
        ),
        (vec!["--memory".into(), "1M".into()], "needs at least"),
        (
            vec!["--fault".into(), "alloc_page:1=BOOM".into()],
            "alloc_page cannot fail with `BOOM`",
        ),
        (
            // An unset variable in `--fault "$FAULTS"`: no faults would be injected.
            vec!["--fault".into(), "".into()],
            "--fault \"\": no rule: give OP[:PAGE_TYPE]:N=CODE rules",
        ),
        (vec!["--fault".into(), " , ".into()], "--fault \" , \": no rule"),
        (
            // The second rule could never fire: the first fails that call.
            vec![
                "--fault".into(),
                "alloc_page:1=ENOMEM,alloc_page:1=ALIGNED_2M".into(),
            ],
            "--fault: fault spec `alloc_page:1=ALIGNED_2M`: that call already fails by `alloc_page:1=ENOMEM`",
        ),
        (
            vec![
                "--guest".into(),
                "builtin:launch-fail".into(),
                "--fault".into(),
                "snp_launch_update:vmsa:4=INVALID_ADDRESS".into(),
            ],
            "already fails by `snp_launch_update:vmsa:4=INVALID_PAGE_STATE`; a call fails only once (a rule of --guest builtin:launch-fail)",
        ),
        (
            vec![
                "--vcpus".into(),
                "1".into(),
                "--guest".into(),
                "builtin:reset".into(),
            ],
            "at least 2 vCPUs",
        ),
        (
            vec!["--sev-es".into(), "--guest".into(), "builtin:ap-churn".into()],
            "needs an SEV-SNP guest",
        ),
        (
            vec!["--backend".into(), "kvm".into(), "--trace".into(), "x".into()],
            "--trace belongs to the simulator",
        ),
        (
            vec!["--backend".into(), "kvm".into(), "--migrate".into()],
            "--migrate belongs to the simulator",
        ),
        // Both ignored it: the kvm backend's programs and an IGVM file carry their own VMSAs.
        (
            vec![
                "--backend".into(),
                "kvm".into(),
                "--vcpu-type".into(),
                "EPYC-Milan".into(),
            ],
            "--vcpu-type belongs to the simulator",
        ),
        (
            vec![
                "--igvm".into(),
                "x.igvm".into(),
                "--vcpu-type".into(),
                "EPYC-Milan".into(),
            ],
            "'--igvm <FILE>' cannot be used with '--vcpu-type <NAME>'",
        ),
        (
            vec![
                "--backend".into(),
                "kvm".into(),
                "--sim-memory-budget".into(),
                "1G".into(),
            ],
            "--sim-memory-budget belongs to the simulator",
        ),
        (
            vec!["--migrate".into()],
            "--migrate: only SEV-ES guests move between VMs",
        ),
        // It was a failed run (exit 1) at the first host write.
        (
            vec!["--sim-memory-budget".into(), "0".into()],
            "--sim-memory-budget 0 bytes: the simulator needs some memory for any run",
        ),
        (vec!["--vcpu-type".into(), "Pentium".into()], "Pentium"),
        (
            vec!["--trace".into(), missing_dir_trace.display().to_string()],
            "--trace",
        ),
        // Even root cannot create files in /proc: found before the run, not after it.
        (
            vec!["--trace".into(), "/proc/t.json".into()],
            "--trace /proc/t.json: cannot create a file beside /proc/t.json",
        ),
    ];
    for (extra, needle) in cases {
        let mut a = vec!["run".to_owned()];
        a.extend(extra.iter().cloned());
        assert_refused(&vmm(&a), &format!("{a:?}"), needle);
    }
    assert!(!missing_dir_trace.exists());
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "nothing but the bad script was created"
    );
}

/// `--trace` renamed its file over whatever was at the path: a FIFO (or, as root, a device
/// node such as `/dev/full`) became a regular JSON file, and a directory ended the run with an
/// OS error after it had run. Now both are refused before the run, exit 2, one line, and left
/// as they are. (Only scratch paths here: the old behaviour would replace a real device.)
#[test]
fn a_trace_path_that_is_not_a_regular_file_is_refused_before_the_run() {
    let dir = scratch("run-trace-node");
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    std::fs::create_dir(dir.join("sub")).unwrap();
    for (path, what) in [(fifo.clone(), "a FIFO"), (dir.join("sub"), "a directory")] {
        let p = path.display().to_string();
        let o = vmm_within(std::time::Duration::from_secs(60), ["run", "--trace", p.as_str()]);
        assert_refused(&o, &p, &format!("--trace {p}: is {what}, not a regular file"));
    }
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(dir.join("sub").is_dir());
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        2,
        "no temporary file left"
    );
}

/// `--trace` replaced whatever regular file was at its path, so `vmm run --firmware fw.fd
/// --trace fw.fd` ran and then put the trace in place of the firmware image. A trace path that
/// names one of the run's inputs (spelled the same, through a symbolic link, a hard link or
/// another spelling) is now refused before the run, and the input is left as it was.
#[test]
fn a_trace_path_naming_an_input_of_the_run_is_refused_and_the_input_kept() {
    let dir = scratch("run-trace-input");
    let firmware = dir.join("fw.fd");
    std::fs::copy(DEBIAN_OVMF, &firmware).unwrap();
    let costs = dir.join("costs.toml");
    std::fs::write(&costs, "[cycles]\nrmpupdate_4k = 1000\n").unwrap();
    let costs_link = dir.join("costs-link.toml");
    std::os::unix::fs::symlink(&costs, &costs_link).unwrap();
    let guest = dir.join("guest.json");
    std::fs::write(&guest, "{}").unwrap();
    let guest_link = dir.join("guest-hard-link.json");
    std::fs::hard_link(&guest, &guest_link).unwrap();
    let igvm = dir.join("guest.igvm");
    std::fs::write(&igvm, b"not read: the trace is refused first").unwrap();
    let igvm_other_spelling = dir.join(".").join("guest.igvm");
    let inputs = [&firmware, &costs, &guest, &igvm].map(|p| std::fs::read(p).unwrap());
    let cases = [
        ("--firmware", &firmware, &firmware),
        ("--costs", &costs, &costs_link),
        ("--guest", &guest, &guest_link),
        ("--igvm", &igvm, &igvm_other_spelling),
    ];
    for (option, input, trace) in cases {
        let (input, trace) = (input.display().to_string(), trace.display().to_string());
        let o = vmm([
            "run",
            "--memory",
            "64M",
            option,
            input.as_str(),
            "--trace",
            trace.as_str(),
        ]);
        assert_refused(
            &o,
            option,
            &format!("--trace {trace}: is the file given as {option}"),
        );
    }
    assert_eq!(
        [&firmware, &costs, &guest, &igvm].map(|p| std::fs::read(p).unwrap()),
        inputs,
        "every input as it was"
    );
    assert!(std::fs::symlink_metadata(&costs_link).unwrap().is_symlink());
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        6,
        "no temporary file left"
    );
}

/// A FIFO blocked `open(2)` forever and `/dev/zero` was read without end: every input file is
/// now opened without blocking and must be a regular file (`vmsa_host::input`).
#[test]
fn fifos_and_devices_as_input_files_are_refused_at_once() {
    let dir = scratch("run-fifo");
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let fifo = fifo.display().to_string();
    let cases = [
        (
            "--firmware",
            fifo.as_str(),
            "is a FIFO, not a regular file: an OVMF image must be",
        ),
        (
            "--guest",
            fifo.as_str(),
            "is a FIFO, not a regular file: a guest script must be",
        ),
        (
            "--costs",
            fifo.as_str(),
            "is a FIFO, not a regular file: a cost file must be",
        ),
        (
            "--igvm",
            fifo.as_str(),
            "is a FIFO, not a regular file: an IGVM file must be",
        ),
        (
            "--guest",
            "/dev/zero",
            "is a character device, not a regular file",
        ),
        (
            "--costs",
            "/dev/zero",
            "is a character device, not a regular file",
        ),
        (
            "--firmware",
            "/dev/zero",
            "is a character device, not a regular file",
        ),
    ];
    for (option, path, rule) in cases {
        let o = vmm_within(std::time::Duration::from_secs(30), ["run", option, path]);
        assert_refused(&o, option, &format!("{option} {path}: {rule}"));
    }
}

/// One page-state action of 2^34 pages ran past the watchdog, which only looks between
/// actions: an action that covers pages past the end of guest memory is refused when the
/// script meets the memory size, before anything runs.
/// A vCPU thread the host will not start ended the process in a panic inside the thread
/// scope, which then waited forever for the vCPUs already started (parked until AP creation):
/// `vmm run` hung. Now the run ends with an error naming the vCPU, the started threads are
/// kicked out, and everything is torn down. The address space is capped (`ulimit -v`) for 64
/// vCPUs, with one malloc arena and 8 MiB thread stacks (`RUST_MIN_STACK`) so that a thread's
/// stack, not a heap allocation, is what no longer fits: with std's 2 MiB stacks the two ran
/// out at about the same point, and in a third of the runs a 4 KiB allocation of a running
/// vCPU failed first and aborted the process.
#[test]
fn a_vcpu_thread_the_host_cannot_start_ends_the_run_instead_of_hanging() {
    let out = output_within(
        std::time::Duration::from_secs(60),
        Command::new("sh")
            .args(["-c", "ulimit -v 200000 && exec \"$0\" \"$@\""])
            .arg(env!("CARGO_BIN_EXE_vmm"))
            .args(["run", "--vcpus", "64", "--memory", "130M", "--json"])
            .env("MALLOC_ARENA_MAX", "1")
            .env("RUST_MIN_STACK", (8u32 << 20).to_string()),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let s: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let end = &s["guest_run"]["end"];
    assert_eq!(end["end"], "error", "{end}");
    // Some vCPU threads did start, and were kicked out of the run.
    assert!(end["vcpu"].as_u64().is_some_and(|v| v >= 1), "{end}");
    let error = end["error"].as_str().unwrap();
    assert!(
        error.starts_with(&format!(
            "vCPU {}: its thread could not be started: ",
            end["vcpu"]
        )),
        "{error}"
    );
    assert_eq!(s["teardown"]["frames_still_allocated"], 0, "{}", s["teardown"]);
    assert_eq!(s["teardown"]["vmsas_leaked"], 0);
}

/// `-`, which other tools take for standard output, was written as a file named `-` in the
/// working directory by `--trace -`, `vmm igvm -o -` and `--dump-vmsa -`. Each is refused in
/// one line (standard output carries the report here), and nothing is created.
#[test]
fn a_dash_output_is_refused_not_written_as_a_file_named_dash() {
    let dir = scratch("dash-output");
    let cases = [
        "run --trace -".to_owned(),
        format!("igvm --firmware {DEBIAN_OVMF} -o -"),
        format!("measure --firmware {DEBIAN_OVMF} --vcpus 1 --vcpu-type EPYC --dump-vmsa -"),
    ];
    for line in cases {
        let args: Vec<&str> = line.split_whitespace().collect();
        let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(&args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert_refused(&out, &format!("{args:?}"), " -: '-' is not standard output here");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "{args:?} created a file"
        );
    }
}

/// A newline in a path split the refusal naming it over two lines (`vmm run --trace`, `vmm
/// igvm -o`, and every error that quotes a path): each stderr line of `vmm` shows control
/// characters escaped.
#[test]
fn control_characters_in_a_path_are_escaped_in_its_one_line_refusal() {
    for args in [
        vec!["run", "--trace", "/no/such/dir/a\nb"],
        vec!["igvm", "--firmware", DEBIAN_OVMF, "-o", "/no/such/dir/a\nb"],
        vec![
            "measure",
            "--firmware",
            "/no/such\tfile\n",
            "--vcpus",
            "1",
            "--vcpu-type",
            "EPYC",
        ],
    ] {
        let out = vmm(&args);
        assert_refused(&out, &format!("{args:?}"), "\\n");
    }
}

#[test]
fn an_action_past_the_end_of_guest_memory_is_refused_before_the_run() {
    let (_dir, script) = guest_script(
        "run-huge-action",
        "huge.json",
        r#"{"actions": [
            {"action":"page_state","vcpu":0,"gpa":4294967296,"pages":17179869184,"to":"shared"},
            {"action":"hlt","vcpu":0}
        ]}"#,
    );
    let script = script.display().to_string();
    for (memory, shown) in [("64M", "64MiB"), ("64T", "64TiB")] {
        let o = vmm_within(
            std::time::Duration::from_secs(30),
            ["run", "--memory", memory, "--guest", &script],
        );
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "--memory {memory}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!(
                "--guest {script}: action 0 (page_state) covers 17179869184 pages from GPA 0x100000000"
            )),
            "{err}"
        );
        assert!(err.contains(&format!("(--memory {shown})")), "{err}");
    }
}

/// A script action on a vCPU past --vcpus used to run as a failed guest step ("no vCPU 9") with
/// `result: ok`: the script and --vcpus disagree, which is the input's fault.
#[test]
fn an_action_on_a_vcpu_the_guest_does_not_have_is_refused_before_the_run() {
    let (_dir, script) = guest_script(
        "run-missing-vcpu",
        "vcpu9.json",
        r#"{"actions": [
            {"action":"hlt","vcpu":0},
            {"action":"pvalidate","vcpu":9,"gpa":0}
        ]}"#,
    );
    let script = script.display().to_string();
    let o = vmm(["run", "--vcpus", "4", "--guest", &script]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "vmm run: --guest {script}: action 1 (pvalidate) runs on vCPU 9, but the guest has 4 vCPUs \
             (--vcpus 4): an action's vcpu must be below --vcpus"
        )
    );
    assert!(stdout(&o).is_empty());
    let o = vmm(["run", "--vcpus", "10", "--guest", &script]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// A report that cannot be written (stdout on a full disk) used to exit 1 without a word, and
/// --help or --version 0.
#[test]
fn an_unwritable_stdout_is_said_on_stderr() {
    // Opened for writing only: /dev/full takes no data and is never replaced.
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        eprintln!("skipped: no /dev/full here");
        return;
    };
    // --help and --version too: they exited 0 with nothing written (as `ls --version >
    // /dev/full` does not).
    for (cmd, args) in [
        ("vmm run", &["run"][..]),
        ("vmm probe", &["probe", "--json"][..]),
        ("vmm", &["--version"][..]),
        ("vmm", &["run", "--help"][..]),
    ] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(args)
            .stdout(full.try_clone().unwrap())
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(
            err.trim_end(),
            format!("{cmd}: cannot write the output to stdout: No space left on device (os error 28)")
        );
    }
}

/// With stderr on a full disk, a refused argument or input exited 101 (`eprintln!` panicked
/// on the failed write) instead of 2; the exit code must still say what happened.
#[test]
fn an_unwritable_stderr_keeps_the_exit_code() {
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        eprintln!("skipped: no /dev/full here");
        return;
    };
    for args in [
        &["run", "--vcpus", "0"][..],
        &["run", "--memory", "64K"][..],
        &["measure", "--firmware", "/nonexistent/OVMF.fd", "--vcpus", "1"][..],
        &[][..],
    ] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(args)
            .stderr(full.try_clone().unwrap())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(stdout(&o).is_empty(), "{args:?}");
    }
}

#[test]
fn an_igvm_launch_option_without_igvm_is_named() {
    // clap's `requires` said only "the following required arguments were not provided: --igvm".
    for option in ["--native-zero", "--igvm-classic"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(["run", option])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim_end(),
            format!("vmm run: {option} needs --igvm: it is an option of the IGVM launch")
        );
    }
}

#[test]
fn a_non_utf8_guest_path_is_a_path_and_errors_name_the_option() {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::OsStr::from_bytes(b"/nonexistent-dir/\xff.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("run")
        .arg("--guest")
        .arg(path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--guest /nonexistent-dir/"), "{err}");
    assert!(!err.contains("invalid UTF-8"), "{err}");
}

#[test]
fn a_text_option_given_bytes_is_named_with_its_value() {
    use std::os::unix::ffi::OsStrExt;
    // clap's own message ("invalid UTF-8 was detected in one or more arguments") named neither.
    for (option, joined) in [("--fault", false), ("--memory", true)] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"));
        cmd.arg("run");
        if joined {
            cmd.arg(std::ffi::OsStr::from_bytes(
                &[option.as_bytes(), b"=1\xffG"].concat(),
            ));
        } else {
            cmd.arg(option).arg(std::ffi::OsStr::from_bytes(b"1\xffG"));
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.trim_end(),
            format!(r#"vmm: {option} "1\xFFG": is not UTF-8: this option takes text"#)
        );
    }
}

#[test]
fn a_firmware_launch_meant_to_fail_is_not_judged_by_its_digest() {
    let (s, code) = run_json(&[
        "--firmware",
        DEBIAN_OVMF,
        "--vcpus",
        "2",
        "--memory",
        "1G",
        "--guest",
        "builtin:launch-fail",
    ]);
    assert_eq!(code, 0, "{s:#}");
    assert_eq!(s["launch"]["state"], "Failed");
    assert_eq!(s["launch"]["expected_failure"], true);
    assert!(s["launch"]["digest_matches"].is_null(), "{s:#}");
    assert_eq!(s["ok"], true, "{:?}", s["problems"]);
}

/// linux-boot's bounce buffer never covers the pages the launch measured (a firmware's SEV
/// metadata sections at 8 MiB): with 16M there is enough RAM but no room clear of them, which
/// was reported as "needs at least 8MiB" of a 16MiB guest. 32M places it below the sections.
#[test]
fn linux_boot_without_room_for_its_bounce_buffer_says_so() {
    if !std::path::Path::new(DEBIAN_OVMF).exists() {
        eprintln!("skipped: {DEBIAN_OVMF} is absent (apt-get install ovmf)");
        return;
    }
    let args = |memory| {
        [
            "run",
            "--firmware",
            DEBIAN_OVMF,
            "--guest",
            "builtin:linux-boot",
            "--vcpus",
            "2",
            "--memory",
            memory,
        ]
    };
    assert_refused(
        &vmm(args("16M")),
        "16M",
        "--memory 16MiB: builtin:linux-boot finds no room for its bounce buffer",
    );
    let o = vmm(args("32M"));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).lines().any(|l| l == "result: ok"), "{}", stdout(&o));
}
