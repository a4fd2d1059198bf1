//! The fault matrix (issue 10 item 1): every platform and firmware operation the scenarios
//! reach, failed at each of its call numbers, and also a second failure inside the recovery
//! path (the reclaim, make-shared and flush calls that follow the first failure).
//!
//! Every point is a `vmm run` on the simulator: its arguments (a built-in guest, the scenario's
//! options, `--fault` with the rules of the point) run in-process through
//! [`vmm::run::run_on_simulator`], which gives the summary `vmm run --json` prints and the
//! simulated machine, so that the summary can be held against the machine's own frame ledger.
//! For every point: no panic, no hang (the run's watchdog), a typed error or a finished run;
//! every host frame freed or reported leaked with its reason; the counts agreeing between the
//! summary (the JSON document), its text (the `teardown:` and `leaks:` lines) and the machine;
//! no RMP fault (no host write to a private page) unless the injected operation is itself a
//! host access. A sample of the points (all of them in the soak) also runs the `vmm` binary
//! with the same arguments: its exit code must be 1 for a failed run (0 for one that absorbed
//! its failure, 2 for a refused input; never 101, a panic), its JSON must parse and carry the
//! in-process counts.
//!
//! The operations the built-in guests do not reach have scenarios of their own: firmware boot
//! (`--firmware OVMF.fd`, skipped with the reason if Debian's OVMF is absent), intra-host
//! migration (`--sev-es --migrate`), debug decrypt (`--dump-invalid-vmcb --allow-debug`: a failed
//! VMRUN dumps the vCPU's VMSA through `SNP_DBG_DECRYPT` / `DBG_DECRYPT`), and
//! [`read_frame_before_launch`], the only way to a host read of an unencrypted VMSA.
//!
//! `VMSA_MATRIX_VERBOSE=1` prints every point and its outcome. The normal suite runs a cheap
//! slice (call numbers 1, 2 and the last of each operation, a second failure at the last
//! recovery call, the binary on the base runs and the first point of each operation);
//! `VMSA_SOAK=1` (`cargo xtask soak`) runs every call number, a second failure at each of the
//! last four calls of each recovery operation, 4-vCPU runs of the scenarios, and the binary on
//! every point.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use backend_sim::host::SimHost;
use backend_sim::{FaultOp, FaultPlan, FaultRule, GuestAction, GuestScript, Machine, MachineConfig};
use clap::Parser;
use serde_json::Value;
use vmm::run::flow::RunEnd;
use vmm::run::history::LeakRecord;
use vmm::run::report::{Observed, TeardownSummary};
use vmm::run::{RunArgs, RunError, RunSummary, run_on_simulator};
use vmsa_core::{Gpa, SNP_POLICY_DEBUG, SNP_POLICY_RSVD_MBO, SnpPageType};
use vmsa_host::{Conversion, Hypervisor, LaunchUpdate, MemoryRegion, Vcpu, Vm, VmSpec};

/// Debian's OVMF (`apt-get install ovmf`), which the firmware scenarios launch.
const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

/// How long the `vmm` binary may take for one point (its own watchdog ends a run at 60 s).
const BINARY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

/// How one point ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// The rule never fired (the path changed under an earlier failure).
    NotReached,
    /// The flow could not create the VM (`vmm run` fails with the host's error).
    CreateError,
    /// Creating or launching failed (typed `LaunchError`).
    LaunchError,
    /// Moving the launched guest into a second VM failed.
    MigrationError,
    /// The guest ran and its run ended otherwise than done.
    RunEnded,
    /// The guest ran to done, but a step of it failed (the VMM's summary reports it).
    GuestStepFailed,
    /// The guest ran to done (the failure was absorbed, e.g. retried or at teardown).
    Done,
}

/// A scenario of the matrix: the `vmm run` arguments of its base run, the fault rules it
/// needs itself, and how its base run ends.
struct Case {
    label: String,
    args: Vec<String>,
    own_faults: Vec<FaultRule>,
    base: Outcome,
}

fn case(label: &str, args: &[&str], own_faults: &[&str], base: Outcome) -> Case {
    Case {
        label: label.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        own_faults: own_faults
            .iter()
            .map(|r| r.parse().expect("a valid rule"))
            .collect(),
        base,
    }
}

/// `builtin:NAME` with `vcpus` vCPUs, more arguments after, in 8 MiB or the 2 MiB per vCPU
/// (and one more) the built-in guests put their AP VMSAs in.
fn builtin(name: &str, vcpus: u32, more: &[&str], own_faults: &[&str], base: Outcome) -> Case {
    let n = vcpus.to_string();
    let guest = format!("builtin:{name}");
    let memory = format!("{}M", (2 * (vcpus + 1)).max(8));
    let mut args = vec!["--vcpus", &n, "--memory", &memory, "--guest", &guest];
    args.extend_from_slice(more);
    let kind = if more.contains(&"--sev-es") {
        "SEV-ES"
    } else {
        "SNP"
    };
    let extra: Vec<&str> = more.iter().copied().filter(|a| *a != "--sev-es").collect();
    let label = format!("{kind} builtin:{name} x{vcpus} {}", extra.join(" "));
    case(label.trim_end(), &args, own_faults, base)
}

/// The firmware boot: OVMF launched (its metadata sections need 16 MiB), then `builtin:boot`.
fn firmware(vcpus: u32, sev_es: bool) -> Case {
    let n = vcpus.to_string();
    let mut args = vec!["--firmware", OVMF, "--vcpus", &n, "--memory", "16M"];
    if sev_es {
        args.push("--sev-es");
    }
    let label = format!("{} OVMF boot x{vcpus}", if sev_es { "SEV-ES" } else { "SNP" });
    case(&label, &args, &[], Outcome::Done)
}

/// The scenarios: the built-in guests at small vCPU counts (the call numbers grow with the
/// vCPUs, the paths do not), firmware boot, migration and debug decrypt. The soak adds 4-vCPU
/// runs.
fn cases(soak: bool) -> Vec<Case> {
    use Outcome::{Done, LaunchError, RunEnded};
    let debug = ["--dump-invalid-vmcb", "--allow-debug"];
    let mut v = vec![
        builtin("boot", 2, &[], &[], Done),
        builtin("boot", 2, &["--sev-es"], &[], Done),
        builtin("ap-churn", 2, &[], &[], Done),
        builtin("reset", 3, &[], &[], Done),
        builtin("launch-fail", 2, &[], &[], LaunchError),
        builtin("linux-boot-4k", 2, &[], &[], Done),
        builtin("linux-boot", 2, &[], &[], Done),
        // Migration: the SEV-ES guest moves into a second VM after its launch and runs there.
        builtin("boot", 2, &["--sev-es", "--migrate"], &[], Done),
        // Debug decrypt: an AP's VMRUN fails on a page that is no VMSA, and the host's
        // dump_vmcb decrypts it (SNP_DBG_DECRYPT into a firmware page, reclaimed after).
        builtin("vmrun-fail", 2, &debug, &[], RunEnded),
        // SEV-ES has no AP creation: its VMRUN failure is injected, and DBG_DECRYPT dumps the
        // host VMSA; after a migration too, with the policy the context carried over.
        builtin(
            "boot",
            2,
            &["--sev-es", debug[0], debug[1]],
            &["vmrun:1=VMEXIT_INVALID"],
            RunEnded,
        ),
        builtin(
            "boot",
            2,
            &["--sev-es", "--migrate", debug[0], debug[1]],
            &["vmrun:1=VMEXIT_INVALID"],
            RunEnded,
        ),
    ];
    if std::path::Path::new(OVMF).is_file() {
        v.push(firmware(2, false));
        v.push(firmware(2, true));
    } else {
        println!(
            "fault matrix: the firmware boot scenarios are skipped: {OVMF} is absent (apt-get install ovmf)"
        );
    }
    if soak {
        for (name, more, base) in [
            ("boot", &[][..], Done),
            ("boot", &["--sev-es"][..], Done),
            ("ap-churn", &[][..], Done),
            ("reset", &[][..], Done),
            ("launch-fail", &[][..], LaunchError),
            ("boot", &["--sev-es", "--migrate"][..], Done),
            ("vmrun-fail", &debug[..], RunEnded),
        ] {
            v.push(builtin(name, 4, more, &[], base));
        }
    }
    v
}

/// One failure code each operation can return (fault.rs's table).
fn code(op: FaultOp) -> &'static str {
    match op {
        FaultOp::AllocPage => "ENOMEM",
        FaultOp::WriteFrame | FaultOp::ReadFrame => "RMP_FAULT",
        FaultOp::RmpMakePrivate | FaultOp::RmpMakeShared => "FAIL_INUSE",
        FaultOp::Pvalidate | FaultOp::Rmpadjust | FaultOp::Psmash => "FAIL_INPUT",
        FaultOp::FlushEncryptedPage => "GP",
        FaultOp::GmemPfn => "UNBACKED",
        FaultOp::SnpLaunchUpdate | FaultOp::PageReclaim | FaultOp::DbgDecrypt => "INVALID_PAGE_STATE",
        FaultOp::LaunchStart
        | FaultOp::Activate
        | FaultOp::LaunchUpdateData
        | FaultOp::LaunchUpdateVmsa
        | FaultOp::LaunchFinish
        | FaultOp::Decommission => "INVALID_GUEST_STATE",
        FaultOp::Vmrun => "VMEXIT_INVALID",
    }
}

fn rule(op: FaultOp, nth: u64) -> FaultRule {
    format!("{}:{nth}={}", op.name(), code(op))
        .parse()
        .expect("a valid rule")
}

/// Whether a rule of `plan` (a run's, fired or not) already fails the call `r` names: the case's
/// own rules (vmrun-fail's `vmrun:1`) or the first failure of a pair. `vmm run` refuses a
/// second rule for such a call, and the point would be the run that has it once.
fn already_fails(plan: &FaultPlan, r: &FaultRule) -> bool {
    plan.fired().iter().chain(plan.pending()).any(|p| p.same_call(r))
}

/// The operations of the recovery paths (vmsa-core's reclaim, make-shared and flush).
const RECOVERY: [FaultOp; 3] = [
    FaultOp::PageReclaim,
    FaultOp::RmpMakeShared,
    FaultOp::FlushEncryptedPage,
];

/// The `vmm run` arguments of `case` with `extra` rules on top of its own.
fn point_args(case: &Case, extra: &[FaultRule]) -> Vec<String> {
    let mut args = case.args.clone();
    let rules: Vec<String> = case
        .own_faults
        .iter()
        .chain(extra)
        .map(ToString::to_string)
        .collect();
    if !rules.is_empty() {
        args.push("--fault".into());
        args.push(rules.join(","));
    }
    args
}

fn spec(case: &Case, extra: &[FaultRule]) -> String {
    format!("{}: vmm run {}", case.label, point_args(case, extra).join(" "))
}

/// Why a panic payload panicked.
fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// The frame ledger check every point makes: what a host reported (its leaks, its teardown
/// counts, its RMP faults) against the machine's own ledger, with `fired` the operations the
/// fault plan failed.
fn ledger_problems(
    machine: &Machine,
    leaks: &[LeakRecord],
    t: &TeardownSummary,
    rmp_faults: u64,
    fired: &[FaultOp],
) -> Vec<String> {
    let mut p = Vec::new();
    let stats = machine.stats();
    let host_access = fired
        .iter()
        .any(|o| matches!(o, FaultOp::WriteFrame | FaultOp::ReadFrame));
    if stats.rmp_faults != 0 && !host_access {
        p.push(format!(
            "{} RMP faults (a host access to a private page)",
            stats.rmp_faults
        ));
    }
    if rmp_faults != stats.rmp_faults {
        p.push(format!(
            "the report says {rmp_faults} RMP faults, the machine {}",
            stats.rmp_faults
        ));
    }
    if stats.freed_unflushed != 0 || stats.freed_while_assigned != 0 || stats.bad_frees != 0 {
        p.push(format!(
            "frames freed unflushed: {}, freed while guest-assigned: {}, freed twice or never allocated: {}",
            stats.freed_unflushed, stats.freed_while_assigned, stats.bad_frees
        ));
    }
    let allocated = machine.allocated_frames() as u64;
    if allocated != 0 || t.frames_still_allocated != allocated {
        p.push(format!(
            "the machine holds {allocated} frames, the report says {}",
            t.frames_still_allocated
        ));
    }
    let leaked: BTreeSet<_> = machine.leaked_frames().into_iter().collect();
    if t.frames_leaked_on_purpose != leaked.len() as u64 {
        p.push(format!(
            "the machine leaked {} frames, the report says {}",
            leaked.len(),
            t.frames_leaked_on_purpose
        ));
    }
    let mut vcpu_pages = BTreeSet::new();
    for l in leaks {
        if l.detail.is_empty() {
            p.push(format!("frame {} leaked without a detail", l.pfn));
        }
        if !leaked.contains(&l.pfn) {
            p.push(format!(
                "frame {} is reported leaked, the machine does not hold it leaked",
                l.pfn
            ));
        }
        if l.vcpu.is_some() {
            vcpu_pages.insert(l.pfn);
        }
    }
    // Frames leaked with a vCPU named are the vCPUs' host pages (VMSAs, debug-decrypt
    // destinations); every other leaked frame is the guest's, which teardown counts (those a
    // failed launch refused have a Leaked event too, and leak when the guest's memory goes).
    if leaked.len() as u64 != vcpu_pages.len() as u64 + t.guest_frames_leaked {
        p.push(format!(
            "the machine leaked {} frames; {} vCPU pages have a Leaked event and teardown counts {} guest frames leaked",
            leaked.len(),
            vcpu_pages.len(),
            t.guest_frames_leaked
        ));
    }
    if t.vmsas_leaked != vcpu_pages.len() {
        p.push(format!(
            "teardown counts {} VMSAs leaked, the events name {}",
            t.vmsas_leaked,
            vcpu_pages.len()
        ));
    }
    if let Some(e) = &t.error
        && !fired.contains(&FaultOp::Decommission)
    {
        p.push(format!("destroying the guest failed: {e}"));
    }
    p
}

/// The summary's text must carry the summary's counts: the `teardown:` and `leaks:` lines.
fn text_problems(s: &RunSummary) -> Vec<String> {
    let text = s.render_text();
    // `TeardownSummary::line` is the line (its format has a unit test of its own).
    let want = s.teardown.line(&s.hidden);
    let mut p = Vec::new();
    if !text.lines().any(|l| l == want) {
        p.push(format!("the text has no line `{want}`"));
    }
    let leaks = format!("leaks: {}", s.ownership.leaks.len());
    if !text.lines().any(|l| l == leaks) {
        p.push(format!("the text has no line `{leaks}`"));
    }
    p
}

/// How a summary says the run went.
fn outcome_of(s: &RunSummary) -> Outcome {
    if s.launch.error.is_some() {
        Outcome::LaunchError
    } else if s.migration.as_ref().is_some_and(|m| m.error.is_some()) {
        Outcome::MigrationError
    } else {
        match &s.guest_run {
            Some(g) if g.end == RunEnd::Done && g.failed != 0 => Outcome::GuestStepFailed,
            Some(g) if g.end == RunEnd::Done => Outcome::Done,
            _ => Outcome::RunEnded,
        }
    }
}

/// What one point showed.
struct PointResult {
    plan: FaultPlan,
    outcome: Outcome,
    /// Whether the `vmm` binary ran it too.
    binary: bool,
}

/// Run one point of `case` with `extra` rules (through the binary too if `binary`), and say
/// what disagreed.
fn run_point(case: &Case, extra: &[FaultRule], binary: bool) -> Result<PointResult, String> {
    let args = point_args(case, extra);
    let cli = Cli::try_parse_from(std::iter::once("vmm".to_string()).chain(args.iter().cloned()))
        .map_err(|e| format!("the arguments do not parse: {e}"))?;
    let (summary, machine) = catch_unwind(AssertUnwindSafe(|| run_on_simulator(&cli.run)))
        .map_err(|p| format!("panicked: {}", panic_text(p)))?;
    let machine = machine.ok_or_else(|| match &summary {
        Err(e) => format!("refused before the machine was built: {e}"),
        Ok(_) => "no machine".into(),
    })?;
    let plan = machine.fault_plan();
    let fired: Vec<FaultOp> = plan.fired().iter().map(|r| r.op).collect();
    let mut p = Vec::new();
    let outcome = match &summary {
        Err(e) => {
            // No summary: nothing may be left behind, since nothing says so.
            let (allocated, leaked) = (machine.allocated_frames(), machine.leaked_frames().len());
            if allocated != 0 || leaked != 0 {
                p.push(format!(
                    "the run failed ({e}) but {allocated} frames are allocated and {leaked} leaked"
                ));
            }
            if e.to_string().is_empty() || e.exit_code() != 1 {
                p.push(format!("an untyped or input error: {e:?}"));
            }
            Outcome::CreateError
        }
        Ok(s) => {
            p.extend(ledger_problems(
                &machine,
                &s.ownership.leaks,
                &s.teardown,
                s.rmp_faults,
                &fired,
            ));
            p.extend(text_problems(s));
            let injected: Vec<String> = plan.fired().iter().map(ToString::to_string).collect();
            if s.faults_injected != injected {
                p.push(format!(
                    "the summary lists {:?} as injected, the machine fired {injected:?}",
                    s.faults_injected
                ));
            }
            if let Some(e) = &s.launch.error
                && e.is_empty()
            {
                p.push("an empty launch error".into());
            }
            let outcome = outcome_of(s);
            if let Some(g) = &s.guest_run
                && let RunEnd::Watchdog { .. } = g.end
            {
                p.push(format!("hang: {}", g.end));
            }
            outcome
        }
    };
    let reached = extra.iter().all(|r| plan.fired().contains(r));
    let outcome = if reached { outcome } else { Outcome::NotReached };
    if extra.is_empty() && outcome != case.base {
        p.push(format!("the base run ended {outcome:?}, not {:?}", case.base));
    }
    if binary {
        p.extend(binary_problems(&args, &summary));
    }
    if p.is_empty() {
        Ok(PointResult {
            plan,
            outcome,
            binary,
        })
    } else {
        Err(p.join("; "))
    }
}

/// Run the `vmm` binary with `args` (and `--json`) and hold it against the in-process run:
/// the exit code `vmm` documents (0 ok, 1 a failed run, 2 a refused input; never 101, a
/// panic), one JSON document whose frame counts agree with each other as the machine's ledger
/// does in-process and whose leak counts are the in-process run's, or one line on stderr.
/// (How many guest frames a run touched before it ended can differ between two runs of a
/// point whose run ends while other vCPUs are still at work: that is not compared.)
fn binary_problems(args: &[String], expected: &Result<RunSummary, RunError>) -> Vec<String> {
    let mut child = match Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("run")
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return vec![format!("cannot start vmm: {e}")],
    };
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut o = String::new();
        let mut e = String::new();
        let _ = out.read_to_string(&mut o);
        let _ = err.read_to_string(&mut e);
        (o, e)
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() > BINARY_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return vec![format!("the vmm binary hung for {BINARY_TIMEOUT:?}")];
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => return vec![format!("waiting for vmm: {e}")],
        }
    };
    let (stdout, stderr) = reader.join().unwrap_or_default();
    let code = status.code();
    let mut p = Vec::new();
    match expected {
        Err(e) => {
            if code != Some(i32::from(e.exit_code())) {
                p.push(format!("vmm exited {code:?}, not {} ({e})", e.exit_code()));
            }
            if stderr.lines().count() != 1 || !stderr.starts_with("vmm run: ") {
                p.push(format!("vmm's error is not one line: {stderr:?}"));
            }
        }
        Ok(s) => {
            let want = if s.ok { 0 } else { 1 };
            if code != Some(want) {
                p.push(format!(
                    "vmm exited {code:?}, not {want} (ok: {}, problems: {:?}); stderr: {stderr}",
                    s.ok, s.problems
                ));
            }
            match serde_json::from_str::<Value>(&stdout) {
                Err(e) => p.push(format!("vmm's output is not JSON ({e}): {stdout:.200}")),
                Ok(j) => {
                    let t = &j["teardown"];
                    let n = |v: &Value| v.as_u64();
                    let counts = [
                        (
                            "teardown.vmsas_leaked",
                            n(&t["vmsas_leaked"]),
                            s.teardown.vmsas_leaked as u64,
                        ),
                        (
                            "teardown.guest_frames_leaked",
                            n(&t["guest_frames_leaked"]),
                            s.teardown.guest_frames_leaked,
                        ),
                        (
                            "teardown.frames_still_allocated",
                            n(&t["frames_still_allocated"]),
                            s.teardown.frames_still_allocated,
                        ),
                        (
                            "teardown.frames_leaked_on_purpose",
                            n(&t["frames_leaked_on_purpose"]),
                            s.teardown.frames_leaked_on_purpose,
                        ),
                        (
                            "ownership.leaks",
                            j["ownership"]["leaks"].as_array().map(|a| a.len() as u64),
                            s.ownership.leaks.len() as u64,
                        ),
                        ("rmp_faults", n(&j["rmp_faults"]), s.rmp_faults),
                    ];
                    for (what, got, want) in counts {
                        if got != Some(want) {
                            p.push(format!(
                                "vmm's JSON has {what} {got:?}, the in-process run {want}"
                            ));
                        }
                    }
                    // The ledger's rule, in the binary's own counts: every leaked frame is a
                    // vCPU page with a Leaked event or a guest frame the teardown counts.
                    let vcpu_pages: BTreeSet<u64> = j["ownership"]["leaks"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|l| !l["vcpu"].is_null())
                        .filter_map(|l| l["pfn"].as_u64())
                        .collect();
                    let (leaked, guest) = (n(&t["frames_leaked_on_purpose"]), n(&t["guest_frames_leaked"]));
                    if leaked != guest.map(|g| g + vcpu_pages.len() as u64) {
                        p.push(format!(
                            "vmm's JSON: {leaked:?} frames leaked, {} vCPU pages with a Leaked event and {guest:?} guest frames",
                            vcpu_pages.len()
                        ));
                    }
                    if j["ok"].as_bool() != Some(s.ok) {
                        p.push(format!(
                            "vmm's JSON says ok {}, the in-process run {}",
                            j["ok"], s.ok
                        ));
                    }
                    let injected: Option<Vec<&str>> = j["faults_injected"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_str).collect());
                    if injected != Some(s.faults_injected.iter().map(String::as_str).collect()) {
                        p.push(format!(
                            "vmm's JSON lists {:?} as injected, the in-process run {:?}",
                            j["faults_injected"], s.faults_injected
                        ));
                    }
                }
            }
        }
    }
    p
}

/// Run `points` on every core, each through [`run_point`]: the results in order.
fn run_all(points: &[(&Case, Vec<FaultRule>, bool)]) -> Vec<Result<PointResult, String>> {
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<PointResult, String>>>> =
        points.iter().map(|_| Mutex::new(None)).collect();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some((case, extra, binary)) = points.get(i) else {
                        break;
                    };
                    let r = run_point(case, extra, *binary);
                    *results[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .expect("every point ran")
        })
        .collect()
}

/// The call numbers of an operation called `calls` times that the matrix fails.
fn call_numbers(calls: u64, soak: bool) -> Vec<u64> {
    if soak {
        (1..=calls).collect()
    } else {
        let mut v: Vec<u64> = [1, 2, calls]
            .into_iter()
            .filter(|n| (1..=calls).contains(n))
            .collect();
        v.dedup();
        v
    }
}

/// The tallies of a matrix run.
#[derive(Default)]
struct Tally {
    points: u64,
    binary: u64,
    outcomes: BTreeMap<Outcome, u64>,
    failures: Vec<String>,
}

impl Tally {
    fn add(&mut self, what: String, r: Result<PointResult, String>, verbose: bool) -> Option<PointResult> {
        self.points += 1;
        match r {
            Ok(p) => {
                if verbose {
                    println!(
                        "{what} -> {:?}{}",
                        p.outcome,
                        if p.binary { " (binary too)" } else { "" }
                    );
                }
                *self.outcomes.entry(p.outcome).or_default() += 1;
                self.binary += u64::from(p.binary);
                Some(p)
            }
            Err(why) => {
                self.failures.push(format!("{what}\n    {why}"));
                None
            }
        }
    }
}

#[test]
fn every_fault_point_frees_or_reports_every_frame() {
    let soak = std::env::var_os("VMSA_SOAK").is_some_and(|v| v != "0");
    let verbose = std::env::var_os("VMSA_MATRIX_VERBOSE").is_some();
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut reached_ops = BTreeSet::new();
    let cases = cases(soak);
    for case in &cases {
        let case_start = Instant::now();
        let before = tally.points;
        let Some(base) = tally.add(spec(case, &[]), run_point(case, &[], true), verbose) else {
            continue;
        };
        let reached: Vec<_> = FaultOp::ALL
            .iter()
            .map(|&o| (o.name(), base.plan.calls(o)))
            .filter(|(_, n)| *n > 0)
            .collect();
        reached_ops.extend(FaultOp::ALL.iter().filter(|&&o| base.plan.calls(o) > 0).copied());
        // The first failure at every call number; the slice runs the binary on the first
        // call of each operation.
        let firsts: Vec<(&Case, Vec<FaultRule>, bool)> = FaultOp::ALL
            .iter()
            .flat_map(|&op| {
                call_numbers(base.plan.calls(op), soak)
                    .into_iter()
                    .map(move |n| (case, vec![rule(op, n)], soak || n == 1))
                    .filter(|(_, extra, _)| !already_fails(&base.plan, &extra[0]))
            })
            .collect();
        let results = run_all(&firsts);
        // A second failure inside the recovery: at the last calls of each recovery operation
        // in the run that failed first (the ones that follow the first failure).
        let mut seconds = Vec::new();
        for ((_, extra, _), r) in firsts.iter().zip(results) {
            let Some(first) = tally.add(spec(case, extra), r, verbose) else {
                continue;
            };
            if first.outcome == Outcome::NotReached {
                continue;
            }
            for op in RECOVERY {
                let calls = first.plan.calls(op);
                let from = calls.saturating_sub(if soak { 3 } else { 0 }).max(1);
                for m in from..=calls {
                    let second = rule(op, m);
                    if !already_fails(&first.plan, &second) {
                        seconds.push((case, vec![extra[0], second], soak));
                    }
                }
            }
        }
        for ((_, extra, _), r) in seconds.iter().zip(run_all(&seconds)) {
            tally.add(spec(case, extra), r, verbose);
        }
        println!(
            "{}: {} points in {:.1} s; calls {reached:?}",
            case.label,
            tally.points - before,
            case_start.elapsed().as_secs_f64()
        );
    }
    // The operation only a VMM's ordering bug reaches.
    let before = tally.points;
    let base = tally.add(
        "KVM_RUN before launch finish".into(),
        read_frame_point(&[]),
        verbose,
    );
    if let Some(base) = base {
        reached_ops.extend(FaultOp::ALL.iter().filter(|&&o| base.plan.calls(o) > 0).copied());
        for &op in FaultOp::ALL {
            for n in call_numbers(base.plan.calls(op), soak) {
                let extra = [rule(op, n)];
                let Some(first) = tally.add(
                    format!("KVM_RUN before launch finish: --fault {}", extra[0]),
                    read_frame_point(&extra),
                    verbose,
                ) else {
                    continue;
                };
                if first.outcome == Outcome::NotReached {
                    continue;
                }
                for r in RECOVERY {
                    let m = first.plan.calls(r);
                    if m > 0 && rule(r, m) != extra[0] {
                        let both = [extra[0], rule(r, m)];
                        tally.add(
                            format!("KVM_RUN before launch finish: --fault {},{}", both[0], both[1]),
                            read_frame_point(&both),
                            verbose,
                        );
                    }
                }
            }
        }
    }
    println!("KVM_RUN before launch finish: {} points", tally.points - before);
    let unreached: Vec<&str> = FaultOp::ALL
        .iter()
        .filter(|o| !reached_ops.contains(o))
        .map(|o| o.name())
        .collect();
    println!(
        "fault matrix ({}): {} points ({} through the vmm binary too), {} failures, {:.1} s; outcomes {:?}; operations not reached: {unreached:?}",
        if soak { "soak" } else { "slice" },
        tally.points,
        tally.binary,
        tally.failures.len(),
        started.elapsed().as_secs_f64(),
        tally.outcomes
    );
    assert!(
        tally.failures.is_empty(),
        "{} of {} fault points disagree:\n{}",
        tally.failures.len(),
        tally.points,
        tally.failures.join("\n")
    );
    if cases.iter().any(|c| c.args.contains(&OVMF.to_string())) {
        assert!(
            unreached.is_empty(),
            "operations no scenario reaches: {unreached:?}"
        );
    }
}

/// The one path to a host read of a vCPU's VMSA ([`FaultOp::ReadFrame`]): a VMM that runs
/// vCPU 0 after `SNP_LAUNCH_UPDATE` but before `SNP_LAUNCH_FINISH` (an ordering bug the flow
/// never makes; KVM does not refuse it). VMRUN fails, the VMSA not being the guest's yet, and
/// with `dump_invalid_vmcb` KVM's `dump_vmcb` gets the save area from `sev_decrypt_vmsa`, which
/// returns the unencrypted page as it is (`!guest_state_protected`). The VMM then tears the VM
/// down. Driven through the host interface, since `vmm run` cannot express it; the report is
/// held against the machine as every point is.
fn read_frame_point(extra: &[FaultRule]) -> Result<PointResult, String> {
    let mut faults = FaultPlan::default();
    for r in extra {
        faults.add(*r).map_err(|e| e.to_string())?;
    }
    let machine = Machine::new(MachineConfig {
        faults,
        ..MachineConfig::default()
    });
    let script = GuestScript {
        name: "run-before-finish".into(),
        actions: vec![GuestAction::Run { vcpu: 0 }, GuestAction::Hlt { vcpu: 0 }],
    };
    let host = SimHost::new(machine.clone(), script).with_dump_invalid_vmcb(true);
    let memory = 8 << 20;
    let image = [0xf4u8; 0x1_0000];
    let vmsa = vmm::measure::reset::reset_vmsa(
        vmm::measure::reset::BSP_EIP,
        vmsa_core::layout::SEV_FEAT_SNP_ACTIVE,
        vmm::measure::vcpu_types::VcpuType::lookup("EPYC-v4")
            .expect("a known vCPU type")
            .signature(),
        vmm::measure::vmm_types::VmmType::Qemu,
    );
    let ran = catch_unwind(AssertUnwindSafe(
        || -> Result<(vmsa_host::HostReport, Outcome), String> {
            let mut vm = host.create_vm(VmSpec::snp(0)).map_err(|e| e.to_string())?;
            let mut vcpus = Vec::new();
            let steps = (|| -> Result<Option<vmsa_host::VcpuError>, String> {
                let err = |e: &dyn std::error::Error| e.to_string();
                vm.add_memory(MemoryRegion::ram(memory)).map_err(|e| err(&e))?;
                vm.set_memory_attributes(Conversion {
                    gpa: Gpa(0),
                    size: memory,
                    private: true,
                })
                .map_err(|e| err(&e))?;
                for id in 0..2 {
                    let mut v = vm.create_vcpu(id).map_err(|e| err(&e))?;
                    v.set_state(&vmsa).map_err(|e| err(&e))?;
                    vcpus.push(v);
                }
                vm.launch_start(SNP_POLICY_RSVD_MBO | SNP_POLICY_DEBUG)
                    .map_err(|e| err(&e))?;
                vm.launch_update(LaunchUpdate {
                    gpa: Gpa(0x10_0000),
                    len: image.len() as u64,
                    page_type: SnpPageType::Normal,
                    data: Some(&image),
                })
                .map_err(|e| err(&e))?;
                Ok(vcpus[0].run().err())
            })();
            drop(vcpus);
            let report = vm.teardown();
            let outcome = match steps {
                Err(_) => Outcome::LaunchError,
                Ok(Some(_)) => Outcome::RunEnded,
                Ok(None) => Outcome::Done,
            };
            Ok((report, outcome))
        },
    ))
    .map_err(|p| format!("panicked: {}", panic_text(p)))?;
    let plan = machine.fault_plan();
    let fired: Vec<FaultOp> = plan.fired().iter().map(|r| r.op).collect();
    let (outcome, mut p) = match ran {
        Err(e) => {
            let mut p = Vec::new();
            if machine.allocated_frames() != 0 || !machine.leaked_frames().is_empty() {
                p.push(format!("the VM was not created ({e}) but frames are held"));
            }
            (Outcome::CreateError, p)
        }
        Ok((report, outcome)) => {
            let dumps = report
                .guest
                .seen()
                .map(|g| g.vmcb_dumps.clone())
                .unwrap_or_default();
            let seen = Observed::new(report, None);
            let mut p = ledger_problems(
                &machine,
                &seen.ledger.leaks,
                &seen.teardown,
                seen.rmp_faults,
                &fired,
            );
            if extra.is_empty() {
                // The dump read the plain page, which holds nothing yet: KVM writes the
                // registers into the VMSA only when it syncs them at launch finish
                // (sev_es_sync_vmsa).
                let area = dumps.first().and_then(|d| d.save_area);
                if outcome != Outcome::RunEnded || area.map(|a| (a.rip, a.efer)) != Some((0, 0)) {
                    p.push(format!(
                        "the early KVM_RUN ended {outcome:?} with dumps {dumps:?}"
                    ));
                }
            }
            (outcome, p)
        }
    };
    let reached = extra.iter().all(|r| plan.fired().contains(r));
    if extra.is_empty() && plan.calls(FaultOp::ReadFrame) == 0 {
        p.push("no host read of the VMSA".into());
    }
    if p.is_empty() {
        Ok(PointResult {
            plan,
            outcome: if reached { outcome } else { Outcome::NotReached },
            binary: false,
        })
    } else {
        Err(p.join("; "))
    }
}

/// A point of a scenario, and that its rules fired.
fn point(case: &Case, rules: &[&str]) -> PointResult {
    let rules: Vec<FaultRule> = rules.iter().map(|r| r.parse().expect("a valid rule")).collect();
    match run_point(case, &rules, true) {
        Ok(p) => {
            assert_ne!(p.outcome, Outcome::NotReached, "{}", spec(case, &rules));
            p
        }
        Err(why) => panic!("{}: {why}", spec(case, &rules)),
    }
}

/// Regression: a VMSA leaked when the launch failed (its reclaim refused) is counted in the
/// teardown's VMSAs-leaked, as its `Leaked` event says (it counted only teardown-time leaks).
#[test]
fn a_vmsa_leaked_before_teardown_counts_at_teardown() {
    point(
        &builtin("launch-fail", 2, &[], &[], Outcome::LaunchError),
        &["page_reclaim:1=INVALID_PAGE_STATE"],
    );
    point(
        &builtin("reset", 3, &[], &[], Outcome::Done),
        &["rmp_make_shared:1=FAIL_INUSE"],
    );
}

/// Regression: a refused DECOMMISSION leaks the guest's memory; the teardown counts those
/// frames as guest frames leaked, as the machine's ledger holds them (it counted 0: the
/// destroy report was lost with the error).
#[test]
fn a_refused_decommission_counts_the_guest_frames_it_leaks() {
    for c in [
        builtin("ap-churn", 2, &[], &[], Outcome::Done),
        builtin("boot", 2, &["--sev-es"], &[], Outcome::Done),
    ] {
        point(&c, &["decommission:1=INVALID_GUEST_STATE"]);
    }
}

/// Regression: a guest page the firmware refused at launch is reclaimed, its make-shared fails
/// and vmsa-core reports it `Leaked` (KVM's `kvm_rmp_make_shared` leaks it with
/// `snp_leak_pages`, which keeps a reference so guest_memfd never frees it); the machine must
/// hold it leaked too (its guest_memfd released the frame at teardown).
#[test]
fn a_guest_frame_leaked_at_launch_stays_leaked() {
    point(
        &builtin("boot", 2, &[], &[], Outcome::Done),
        &[
            "snp_launch_update:1=INVALID_PAGE_STATE",
            "rmp_make_shared:1=FAIL_INUSE",
        ],
    );
}

/// Regression: an AP whose VMRUN fails when the BSP's AP_CREATE kicks it reports the failure
/// from its own KVM_RUN (KVM's `KVM_EXIT_FAIL_ENTRY`), ending the run; it was only the detail
/// text of the BSP's successful step, and the run ended done.
#[test]
fn a_kicked_ap_whose_vmrun_fails_ends_the_run() {
    let p = point(
        &builtin("boot", 2, &[], &[], Outcome::Done),
        &["vmrun:2=VMEXIT_INVALID"],
    );
    assert_eq!(p.outcome, Outcome::RunEnded);
}

/// Regression: a VM bugged by a leak (here the AP's host VMSA, whose make-shared fails when
/// AP creation frees it) refuses every vCPU's KVM_RUN with EIO (`kvm_vm_bugged`); the BSP,
/// already in the guest, went on running its actions and the run ended done.
#[test]
fn a_bugged_vm_refuses_kvm_run() {
    let p = point(
        &builtin("boot", 2, &[], &[], Outcome::Done),
        &["rmp_make_shared:1=FAIL_INUSE"],
    );
    assert_eq!(p.outcome, Outcome::RunEnded);
}

/// Regression: a VMRUN that fails on a vCPU's own entry (not after a kick) fails that vCPU's
/// KVM_RUN (`KVM_EXIT_FAIL_ENTRY`) and ends the run; it was a failed guest step, and the run
/// went on to done.
#[test]
fn a_vcpu_whose_own_vmrun_fails_ends_the_run() {
    let p = point(
        &builtin("boot", 2, &["--sev-es"], &[], Outcome::Done),
        &["vmrun:1=VMEXIT_INVALID"],
    );
    assert_eq!(p.outcome, Outcome::RunEnded);
}

/// Regression: the debug-decrypt destination page whose reclaim fails after `SNP_DBG_DECRYPT`
/// is leaked (`sev_decrypt_vmsa`: `snp_page_reclaim` leaks it) and must be named to vmsa-core,
/// which reports it `Leaked` for the vCPU; the simulator leaked it silently (the failure lost
/// the page), and its reclaim was no call of the fault plan.
#[test]
fn a_debug_decrypt_page_whose_reclaim_fails_is_reported_leaked() {
    let p = point(
        &builtin(
            "vmrun-fail",
            2,
            &["--dump-invalid-vmcb", "--allow-debug"],
            &[],
            Outcome::RunEnded,
        ),
        &["page_reclaim:1=INVALID_PAGE_STATE"],
    );
    assert_eq!(p.plan.calls(FaultOp::DbgDecrypt), 1);
    assert_eq!(p.outcome, Outcome::RunEnded);
}

/// Regression: the context page of a launch start that failed after `SNP_GCTX_CREATE`, whose
/// reclaim fails too, is leaked (`snp_free_firmware_page`) and counted among the guest's
/// leaked frames at teardown (the machine held it leaked, the teardown counted nothing).
#[test]
fn a_context_page_leaked_by_a_failed_launch_start_counts_as_the_guests() {
    let p = point(
        &builtin("boot", 2, &[], &[], Outcome::Done),
        &[
            "activate:1=INVALID_GUEST_STATE",
            "page_reclaim:1=INVALID_PAGE_STATE",
        ],
    );
    assert_eq!(p.outcome, Outcome::LaunchError);
}
