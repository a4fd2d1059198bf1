//! The fault matrix (issue 10 item 1): every platform and firmware operation the built-in
//! scenarios reach, failed at each of its call numbers, and also a second failure inside the
//! recovery path (the reclaim, make-shared and flush calls that follow the first failure).
//! For every point the flow must return without a panic and every host frame must be freed or
//! reported leaked with its reason, the counts agreeing between the host's report (teardown
//! counts, `Leaked` events) and the machine's own frame ledger; no RMP fault (unless the
//! injected operation is itself a host access); no hang; a typed error.
//!
//! `VMSA_MATRIX_VERBOSE=1` prints every point and its outcome.
//!
//! The normal suite runs a cheap slice (call numbers 1, 2 and the last of each operation, a
//! second failure at the last recovery call). `VMSA_SOAK=1` (`cargo xtask soak`) runs every
//! call number, a second failure at each of the last four calls of each recovery operation,
//! and 4-vCPU runs of every scenario too.

use std::collections::BTreeSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use backend_sim::{FaultOp, FaultPlan, FaultRule, MachineConfig};
use scenario_tests::{FIRMWARE_GPA, FIRMWARE_PAGES, sim_try_boot};
use vmm::run::flow::RunEnd;
use vmm::run::scenario::{GuestMemory, GuestSpec, Scenario};
use vmsa_core::{Event, PAGE_SIZE, SNP_POLICY_RSVD_MBO, VmKind};
use vmsa_host::VmSpec;

/// A scenario of the matrix.
struct Case {
    label: String,
    kind: VmKind,
    vcpus: u32,
    scenario: Scenario,
}

/// The guest memory [`run_point`] gives a guest of `memory` bytes: RAM from 0, the harness's
/// firmware image launched.
fn guest_memory(memory: u64) -> GuestMemory {
    GuestMemory {
        ram: vec![(0, memory)],
        launched: vec![(FIRMWARE_GPA, FIRMWARE_GPA + FIRMWARE_PAGES * PAGE_SIZE)],
    }
}

/// `builtin:NAME` as a `kind` guest of `vcpus` vCPUs.
fn case(name: &str, kind: VmKind, vcpus: u32) -> Case {
    // The layout matters to the linux-boot guests only, whose minimum is the harness's 8 MiB.
    let mut scenario = Scenario::new(
        &GuestSpec::Builtin(name.into()),
        vcpus,
        kind,
        &guest_memory(8 << 20),
    )
    .unwrap_or_else(|e| panic!("builtin:{name}: {e}"));
    if name == "ap-churn" {
        // Two rounds reach every path of the eight the CLI runs.
        let per_round = scenario.script.actions.len() / 8;
        let hlt = scenario.script.actions.pop().expect("the final HLT");
        scenario.script.actions.truncate(2 * per_round);
        scenario.script.actions.push(hlt);
    }
    Case {
        label: format!("{kind} builtin:{name} x{vcpus}"),
        kind,
        vcpus,
        scenario,
    }
}

/// The built-in guests, small vCPU counts (the call numbers grow with the vCPUs, the paths
/// do not).
/// The soak adds 4-vCPU runs of each.
fn cases(soak: bool) -> Vec<Case> {
    let mut v = vec![
        case("boot", VmKind::Snp, 2),
        case("boot", VmKind::SevEs, 2),
        case("ap-churn", VmKind::Snp, 2),
        case("reset", VmKind::Snp, 3),
        case("launch-fail", VmKind::Snp, 2),
        case("linux-boot-4k", VmKind::Snp, 2),
        case("linux-boot", VmKind::Snp, 2),
    ];
    if soak {
        for (name, kind) in [
            ("boot", VmKind::Snp),
            ("boot", VmKind::SevEs),
            ("ap-churn", VmKind::Snp),
            ("reset", VmKind::Snp),
            ("launch-fail", VmKind::Snp),
        ] {
            v.push(case(name, kind, 4));
        }
    }
    v
}

/// Run one matrix point given as fault rules, and require that it was reached and agreed.
fn point(case: &Case, rules: &[&str]) {
    let rules: Vec<FaultRule> = rules.iter().map(|r| r.parse().expect("a valid rule")).collect();
    match run_point(case, &rules) {
        Ok((_, o)) => assert_ne!(o, Outcome::NotReached, "{}", spec(case, &rules)),
        Err(why) => panic!("{}: {why}", spec(case, &rules)),
    }
}

/// Regression: a VMSA leaked when the launch failed (its reclaim refused) is counted in the
/// teardown's VMSAs-leaked, as its `Leaked` event says (it counted only teardown-time leaks).
#[test]
fn a_vmsa_leaked_before_teardown_counts_at_teardown() {
    point(
        &case("launch-fail", VmKind::Snp, 2),
        &["page_reclaim:1=INVALID_PAGE_STATE"],
    );
    point(&case("reset", VmKind::Snp, 3), &["rmp_make_shared:1=FAIL_INUSE"]);
}

/// Regression: a refused DECOMMISSION leaks the guest's memory; the teardown counts those
/// frames as guest frames leaked, as the machine's ledger holds them (it counted 0: the
/// destroy report was lost with the error).
#[test]
fn a_refused_decommission_counts_the_guest_frames_it_leaks() {
    for c in [case("ap-churn", VmKind::Snp, 2), case("boot", VmKind::SevEs, 2)] {
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
        &case("boot", VmKind::Snp, 2),
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
    let rule: FaultRule = "vmrun:2=VMEXIT_INVALID".parse().unwrap();
    let (plan, outcome) = run_point(&case("boot", VmKind::Snp, 2), &[rule]).unwrap();
    assert!(plan.fired().contains(&rule));
    assert_eq!(outcome, Outcome::RunEnded);
}

/// Regression: a VM bugged by a leak (here the AP's host VMSA, whose make-shared fails when
/// AP creation frees it) refuses every vCPU's KVM_RUN with EIO (`kvm_vm_bugged`); the BSP,
/// already in the guest, went on running its actions and the run ended done.
#[test]
fn a_bugged_vm_refuses_kvm_run() {
    let rule: FaultRule = "rmp_make_shared:1=FAIL_INUSE".parse().unwrap();
    let (plan, outcome) = run_point(&case("boot", VmKind::Snp, 2), &[rule]).unwrap();
    assert!(plan.fired().contains(&rule));
    assert_eq!(outcome, Outcome::RunEnded);
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

/// The operations of the recovery paths (vmsa-core's reclaim, make-shared and flush).
const RECOVERY: [FaultOp; 3] = [
    FaultOp::PageReclaim,
    FaultOp::RmpMakeShared,
    FaultOp::FlushEncryptedPage,
];

/// How one point ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// The rule never fired (the path changed under an earlier failure).
    NotReached,
    /// The flow could not create the VM.
    CreateError,
    /// Creating or launching failed (typed `LaunchError`).
    LaunchError,
    /// The guest ran and its run ended otherwise than done.
    RunEnded,
    /// The guest ran to done, but a step of it failed (the VMM's summary reports it).
    GuestStepFailed,
    /// The guest ran to done (the failure was absorbed, e.g. retried or at teardown).
    Done,
}

/// Run `case` with `extra` rules on top of its own; the plan after the run (its call counts)
/// and the outcome, or what disagreed.
fn run_point(case: &Case, extra: &[FaultRule]) -> Result<(FaultPlan, Outcome), String> {
    let mut plan = case.scenario.faults.clone();
    for r in extra {
        plan.add(*r);
    }
    let config = MachineConfig {
        faults: plan,
        gmem_2m_folios: case.scenario.gmem_2m_folios,
        ..MachineConfig::default()
    };
    let (spec, policy) = match case.kind {
        VmKind::Snp => (VmSpec::snp(0), SNP_POLICY_RSVD_MBO),
        VmKind::SevEs => (VmSpec::sev_es(0), 0x5),
    };
    let script = case.scenario.script.clone();
    let memory = case.scenario.min_memory.max(8 << 20);
    let vcpus = case.vcpus;
    let (machine, result) = catch_unwind(AssertUnwindSafe(|| {
        sim_try_boot(
            config,
            spec,
            policy,
            vcpus,
            memory,
            script,
            Duration::from_secs(20),
        )
    }))
    .map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("panicked: {msg}")
    })?;
    let after = machine.fault_plan();
    let fired: Vec<FaultOp> = after.fired().iter().map(|r| r.op).collect();
    let extra_fired = extra.iter().any(|r| after.fired().contains(r));
    let mut p = Vec::new();
    let stats = machine.stats();
    let host_access = fired
        .iter()
        .any(|o| matches!(o, FaultOp::WriteFrame | FaultOp::ReadFrame));
    if stats.rmp_faults != 0 && !host_access {
        p.push(format!("{} RMP faults", stats.rmp_faults));
    }
    if stats.freed_unflushed != 0 || stats.freed_while_assigned != 0 {
        p.push(format!(
            "frames freed unflushed: {}, freed while guest-assigned: {}",
            stats.freed_unflushed, stats.freed_while_assigned
        ));
    }
    let allocated = machine.allocated_frames() as u64;
    let leaked: BTreeSet<_> = machine.leaked_frames().into_iter().collect();
    let outcome = match result {
        Err(e) => {
            // No report: nothing may be left behind, since nothing says so.
            if allocated != 0 || !leaked.is_empty() {
                p.push(format!(
                    "the VM was not created ({e}) but {allocated} frames are allocated and {} leaked",
                    leaked.len()
                ));
            }
            if e.to_string().is_empty() {
                p.push("an empty create error".into());
            }
            Outcome::CreateError
        }
        Ok((report, _)) => {
            let t = &report.host.teardown;
            if t.frames_still_allocated.seen() != Some(&allocated) || allocated != 0 {
                p.push(format!(
                    "the machine holds {allocated} frames, the report says {:?}",
                    t.frames_still_allocated
                ));
            }
            if t.frames_leaked_on_purpose.seen() != Some(&(leaked.len() as u64)) {
                p.push(format!(
                    "the machine leaked {} frames, the report says {:?}",
                    leaked.len(),
                    t.frames_leaked_on_purpose
                ));
            }
            let events = report.host.events.seen().expect("the simulator shows events");
            let mut vmsa_leaks = BTreeSet::new();
            for e in events {
                if let Event::Leaked {
                    vcpu, pfn, detail, ..
                } = e
                {
                    if detail.is_empty() {
                        p.push(format!("frame {pfn:?} leaked without a detail"));
                    }
                    if !leaked.contains(pfn) {
                        p.push(format!(
                            "frame {pfn:?} is reported leaked, the machine does not hold it leaked"
                        ));
                    }
                    if vcpu.is_some() {
                        vmsa_leaks.insert(*pfn);
                    }
                }
            }
            // Frames leaked with a vCPU named are the vCPUs' host pages; every other leaked
            // frame is guest memory, which teardown counts (those a failed launch refused have
            // a `Leaked` event too, and leak when the guest's memory is released).
            let guest_leaked = t.guest_frames_leaked.seen().copied().unwrap_or(0);
            if leaked.len() as u64 != vmsa_leaks.len() as u64 + guest_leaked {
                p.push(format!(
                    "the machine leaked {} frames; {} vCPU pages have a Leaked event and teardown counts {guest_leaked} guest frames leaked",
                    leaked.len(),
                    vmsa_leaks.len()
                ));
            }
            if t.vmsas_leaked.seen() != Some(&vmsa_leaks.len()) {
                p.push(format!(
                    "teardown counts {:?} VMSAs leaked, the events name {}",
                    t.vmsas_leaked,
                    vmsa_leaks.len()
                ));
            }
            if report.host.rmp_faults.seen() != Some(&stats.rmp_faults) {
                p.push(format!(
                    "the report says {:?} RMP faults, the machine {}",
                    report.host.rmp_faults, stats.rmp_faults
                ));
            }
            if let Some(e) = &t.error
                && !fired.contains(&FaultOp::Decommission)
            {
                p.push(format!("destroying the guest failed: {e}"));
            }
            match (&report.launch_error, &report.run) {
                (Some(e), None) => {
                    if e.to_string().is_empty() {
                        p.push("an empty launch error".into());
                    }
                    Outcome::LaunchError
                }
                (None, Some(run)) => match &run.end {
                    RunEnd::Done
                        if report
                            .host
                            .guest
                            .seen()
                            .is_some_and(|g| g.failures().next().is_some()) =>
                    {
                        Outcome::GuestStepFailed
                    }
                    RunEnd::Done => Outcome::Done,
                    RunEnd::Watchdog { .. } => {
                        p.push(format!("hang: {}", run.end));
                        Outcome::RunEnded
                    }
                    _ => Outcome::RunEnded,
                },
                (e, r) => {
                    p.push(format!("launch error {e:?} with run {r:?}"));
                    Outcome::LaunchError
                }
            }
        }
    };
    if !extra.is_empty() && !extra_fired {
        // Reported but not a failure: the same point runs unfaulted elsewhere.
        if p.is_empty() {
            return Ok((after, Outcome::NotReached));
        }
    }
    if case.scenario.expect_launch_failure
        && outcome != Outcome::LaunchError
        && outcome != Outcome::CreateError
    {
        p.push(format!("the launch was meant to fail, it ended {outcome:?}"));
    }
    if extra.is_empty() && !case.scenario.expect_launch_failure && outcome != Outcome::Done {
        p.push(format!("without injected faults the run ended {outcome:?}"));
    }
    if p.is_empty() {
        Ok((after, outcome))
    } else {
        Err(p.join("; "))
    }
}

fn spec(case: &Case, extra: &[FaultRule]) -> String {
    let rules: Vec<String> = case
        .scenario
        .faults
        .pending()
        .iter()
        .chain(extra)
        .map(ToString::to_string)
        .collect();
    format!("{}: --fault {}", case.label, rules.join(","))
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

#[test]
fn every_fault_point_frees_or_reports_every_frame() {
    let soak = std::env::var_os("VMSA_SOAK").is_some_and(|v| v != "0");
    let verbose = std::env::var_os("VMSA_MATRIX_VERBOSE").is_some();
    let mut points = 0u64;
    let mut outcomes = std::collections::BTreeMap::<Outcome, u64>::new();
    let mut failures = Vec::new();
    let mut record = |case: &Case, extra: &[FaultRule]| -> Option<FaultPlan> {
        points += 1;
        match run_point(case, extra) {
            Ok((plan, o)) => {
                if verbose {
                    println!("{} -> {o:?}", spec(case, extra));
                }
                *outcomes.entry(o).or_default() += 1;
                Some(plan)
            }
            Err(why) => {
                failures.push(format!("{}\n    {why}", spec(case, extra)));
                None
            }
        }
    };
    for case in cases(soak) {
        let Some(base) = record(&case, &[]) else { continue };
        let reached: Vec<_> = FaultOp::ALL
            .iter()
            .map(|&o| (o.name(), base.calls(o)))
            .filter(|(_, n)| *n > 0)
            .collect();
        println!("{}: calls {reached:?}", case.label);
        for &op in FaultOp::ALL {
            for n in call_numbers(base.calls(op), soak) {
                let first = rule(op, n);
                let Some(after) = record(&case, &[first]) else {
                    continue;
                };
                if !after.fired().contains(&first) {
                    continue;
                }
                // A second failure inside the recovery: at the last calls of each recovery
                // operation in this run (the ones that follow the first failure).
                for r in RECOVERY {
                    let calls = after.calls(r);
                    let from = calls.saturating_sub(if soak { 3 } else { 0 }).max(1);
                    for m in from..=calls {
                        if r == op && m == n {
                            continue;
                        }
                        record(&case, &[first, rule(r, m)]);
                    }
                }
            }
        }
    }
    println!(
        "fault matrix ({}): {points} points, {} failures; outcomes {outcomes:?}",
        if soak { "soak" } else { "slice" },
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {points} fault points disagree:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
