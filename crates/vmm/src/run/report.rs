//! What `vmm run` reports: one summary, printed for people or as one JSON document.

use std::fmt::Write as _;

use backend_sim::{CostReport, Footprint};
use serde::Serialize;
use vmsa_core::LaunchState;
use vmsa_host::{GuestActivity, GuestStep, VmcbDump};

use super::flow::{RunEnd, RunOutcome, VcpuExits};
use super::history::{Ledger, render};
use super::phases::PhaseSummary;

/// A `--fault` rule (or a scenario's) that never fired: the run ended, or took another path,
/// before the call it names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UnfiredFault {
    /// The rule, as written.
    pub rule: String,
    /// The calls it counted (of its operation, and page type if it names one).
    pub calls: u64,
}

/// How the launch went.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LaunchSummary {
    /// `Finished` or `Failed`.
    pub state: LaunchState,
    /// Why it failed.
    pub error: Option<String>,
    /// Whether the scenario makes it fail on purpose.
    pub expected_failure: bool,
    /// What was launched.
    pub image: String,
    /// Data pages measured.
    pub data_pages: u64,
    /// VMSAs measured: one per vCPU in the classic mode, the BSP's alone when supplied.
    pub vmsas: u32,
    /// The launch digest the firmware computed (hex), if the launch got that far.
    pub digest: Option<String>,
    /// The digest `vmm measure` predicts for this firmware (with `--firmware`) or IGVM file
    /// (with `--igvm`).
    pub expected_digest: Option<String>,
    /// Whether they agree (`None` where there is nothing to compare: no prediction, or a host
    /// that reports no digest).
    pub digest_matches: Option<bool>,
    /// The guest policy.
    pub policy: u64,
}

/// What the guest did: how its run ended, each vCPU thread's exits, and what the host saw of it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GuestRunSummary {
    /// How the run ended.
    pub end: RunEnd,
    /// Guest steps (script actions, or requests of a real guest) the host saw end.
    pub actions: usize,
    /// Steps that failed (the guest saw an error).
    pub failed: usize,
    /// The failures.
    pub failures: Vec<GuestStep>,
    /// VM entries from a VMSA.
    pub vmruns: u64,
    /// AP-creation requests accepted.
    pub ap_requests: u64,
    /// AP-creation requests refused (GHCB error to the guest).
    pub ap_refused: u64,
    /// Each vCPU thread's exits, by APIC ID.
    pub vcpus: Vec<VcpuExits>,
    /// What the host dumped of vCPUs whose VMRUN failed (`--dump-invalid-vmcb`).
    pub vmcb_dumps: Vec<VmcbDump>,
    /// Whether the scenario means the run to end with a failed VMRUN.
    pub expected_entry_failure: bool,
}

impl GuestRunSummary {
    /// From the flow's run and what the host saw of the guest (if it could).
    pub fn new(run: RunOutcome, seen: Option<GuestActivity>) -> Self {
        let g = seen.unwrap_or_default();
        let failures: Vec<GuestStep> = g.failures().cloned().collect();
        Self {
            end: run.end,
            actions: g.steps.len(),
            failed: failures.len(),
            failures,
            vmruns: g.vmruns,
            ap_requests: g.ap_requests,
            ap_refused: g.ap_refused,
            vcpus: run.vcpus,
            vmcb_dumps: g.vmcb_dumps,
            expected_entry_failure: false,
        }
    }
}

/// The intra-host migration `--migrate` asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MigrationSummary {
    /// Why moving the guest failed (it then did not run).
    pub error: Option<String>,
}

/// What tearing down left behind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TeardownSummary {
    /// vCPUs torn down.
    pub vcpus: usize,
    /// Host VMSA pages leaked on purpose.
    pub vmsas_leaked: usize,
    /// Guest memory frames returned to the host.
    pub guest_frames_released: u64,
    /// Guest memory frames that could not be returned.
    pub guest_frames_leaked: u64,
    /// Host frames still allocated after teardown (not counting those leaked on purpose).
    pub frames_still_allocated: u64,
    /// Host frames kept out of circulation on purpose.
    pub frames_leaked_on_purpose: u64,
    /// Why destroying the guest failed.
    pub error: Option<String>,
}

impl TeardownSummary {
    /// The text report's `teardown:` line (without its error, which has a line of its own),
    /// naming only the counts the host could see: those in `hidden` have their own "not
    /// observable" line, and a 0 here would read as counted.
    pub fn line(&self, hidden: &[Hidden]) -> String {
        let seen = |what| Hidden::seen(hidden, what);
        let mut parts = vec![format!("{} vCPUs", self.vcpus)];
        if seen("vmsas_leaked") {
            parts.push(format!("{} VMSAs leaked", self.vmsas_leaked));
        }
        if seen("guest_frames") {
            parts.push(format!("{} guest frames released", self.guest_frames_released));
            parts.push(format!("{} guest frames leaked", self.guest_frames_leaked));
        }
        if seen("frames") {
            parts.push(format!(
                "{} host frames left ({} leaked on purpose)",
                self.frames_still_allocated, self.frames_leaked_on_purpose
            ));
        }
        format!("teardown: {}", parts.join(", "))
    }
}

/// What the host reported at teardown, in the summary's terms (hidden items listed, not
/// guessed).
#[derive(Debug)]
pub struct Observed {
    /// Ownership histories, leaks and warnings (empty where hidden).
    pub ledger: Ledger,
    /// The launch digest the firmware computed.
    pub digest: Option<String>,
    /// What the guest did, if it ran.
    pub guest_run: Option<GuestRunSummary>,
    /// RMP faults of host accesses.
    pub rmp_faults: u64,
    /// Teardown.
    pub teardown: TeardownSummary,
    /// What the host could not see.
    pub hidden: Vec<Hidden>,
}

impl Observed {
    /// From the host's report and the flow's run.
    pub fn new(host: vmsa_host::HostReport, run: Option<RunOutcome>) -> Self {
        let hidden = Hidden::of(&host);
        let seen = |o: vmsa_host::Observed<u64>| o.into_seen().unwrap_or(0);
        let t = host.teardown;
        Self {
            ledger: Ledger::from_events(&host.events.into_seen().unwrap_or_default()),
            digest: host.launch_digest.into_seen().flatten(),
            guest_run: run.map(|run| GuestRunSummary::new(run, host.guest.into_seen())),
            rmp_faults: seen(host.rmp_faults),
            teardown: TeardownSummary {
                vcpus: t.vcpus,
                vmsas_leaked: t.vmsas_leaked.into_seen().unwrap_or(0),
                guest_frames_released: seen(t.guest_frames_released),
                guest_frames_leaked: seen(t.guest_frames_leaked),
                frames_still_allocated: seen(t.frames_still_allocated),
                frames_leaked_on_purpose: seen(t.frames_leaked_on_purpose),
                error: t.error,
            },
            hidden,
        }
    }
}

/// Something the host cannot observe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Hidden {
    /// What (`"ownership"`, `"launch_digest"`, ...).
    pub what: &'static str,
    /// Why the host cannot see it.
    pub why: &'static str,
}

impl Hidden {
    /// Whether `what` is none of `hidden`: the host saw it.
    pub fn seen(hidden: &[Hidden], what: &str) -> bool {
        !hidden.iter().any(|h| h.what == what)
    }

    /// The items of `report` the host marked hidden.
    pub fn of(report: &vmsa_host::HostReport) -> Vec<Self> {
        let mut out = Vec::new();
        let mut note = |what, why: Option<&'static str>| {
            if let Some(why) = why {
                out.push(Self { what, why });
            }
        };
        note("ownership", report.events.why_hidden());
        note("launch_digest", report.launch_digest.why_hidden());
        note("rmp_faults", report.rmp_faults.why_hidden());
        note("guest", report.guest.why_hidden());
        let t = &report.teardown;
        note("vmsas_leaked", t.vmsas_leaked.why_hidden());
        note(
            "guest_frames",
            t.guest_frames_released
                .why_hidden()
                .or(t.guest_frames_leaked.why_hidden()),
        );
        note(
            "frames",
            t.frames_still_allocated
                .why_hidden()
                .or(t.frames_leaked_on_purpose.why_hidden()),
        );
        out
    }
}

/// The summary of one `vmm run`.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    /// `sim` or `kvm`.
    pub backend: &'static str,
    /// `SEV-SNP`, `SEV-ES` or `VMSA-image`.
    pub mode: String,
    /// Why this mode (KVM: what the host lacks for SNP).
    pub mode_reason: Option<String>,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Where guest memory and the firmware ROM sit.
    pub memory_layout: String,
    /// `--guest` as given.
    pub guest: String,
    /// The guest's name.
    pub scenario: String,
    /// Whether the run did what it should (see `problems`).
    pub ok: bool,
    /// Why not.
    pub problems: Vec<String>,
    /// Things to know that are not failures.
    pub warnings: Vec<String>,
    /// The launch.
    pub launch: LaunchSummary,
    /// The migration after the launch, if one was asked for (the teardown and ownership then
    /// cover both VMs).
    pub migration: Option<MigrationSummary>,
    /// Per-vCPU VMSA ownership histories, leaks and warnings.
    pub ownership: Ledger,
    /// What the guest did (absent if the launch failed).
    pub guest_run: Option<GuestRunSummary>,
    /// Host accesses refused with an RMP fault.
    pub rmp_faults: u64,
    /// Failures injected (rules that fired).
    pub faults_injected: Vec<String>,
    /// Rules that never fired (a warning: what they were to test did not happen).
    pub faults_not_fired: Vec<UnfiredFault>,
    /// The phases (create, launch, run, teardown): wall clock, and simulated cycles on the
    /// simulator.
    pub phases: Vec<PhaseSummary>,
    /// Per-operation counts and cycles.
    pub costs: Option<CostReport>,
    /// The simulator's own structures at the end of the guest's run, before teardown: the
    /// frames it tracks and the bytes its bookkeeping takes (none on other backends).
    pub footprint: Option<Footprint>,
    /// Teardown.
    pub teardown: TeardownSummary,
    /// The Perfetto timeline written, if any.
    pub trace: Option<String>,
    /// What this host cannot observe, and why (e.g. a real SNP kernel keeps the VMSA ownership
    /// to itself): reported instead of left out.
    pub hidden: Vec<Hidden>,
}

impl RunSummary {
    /// Decide `ok`: the launch ended as the scenario meant, nothing leaked and no RMP fault
    /// happened unless failures were injected, a firmware launch reproduced the predicted
    /// digest, every host frame came back, and a built-in guest saw no error.
    pub fn judge(&mut self, injected: bool, builtin: bool) {
        let mut p = std::mem::take(&mut self.problems);
        match (self.launch.state, self.launch.expected_failure) {
            (LaunchState::Finished, true) => p.push("the launch was meant to fail but finished".into()),
            (LaunchState::Finished, false) => {}
            (_, true) => {}
            (_, false) => p.push(format!(
                "the launch failed: {}",
                self.launch.error.as_deref().unwrap_or("unknown error")
            )),
        }
        if self.launch.digest_matches == Some(false) {
            p.push(format!(
                "launch digest {} differs from the predicted {}",
                self.launch.digest.as_deref().unwrap_or("(none)"),
                self.launch.expected_digest.as_deref().unwrap_or("(none)")
            ));
        }
        if !injected {
            if !self.ownership.leaks.is_empty() {
                p.push(format!(
                    "{} pages leaked without any injected fault",
                    self.ownership.leaks.len()
                ));
            }
            if self.rmp_faults != 0 {
                p.push(format!(
                    "{} RMP faults without any injected fault",
                    self.rmp_faults
                ));
            }
        }
        if !self.ownership.warnings.is_empty() {
            p.push(format!("{} vmsa-core warnings", self.ownership.warnings.len()));
        }
        let unreturned = self.teardown.frames_still_allocated;
        if unreturned != 0 {
            p.push(format!(
                "{unreturned} host frames neither freed nor reported leaked"
            ));
        }
        if let Some(e) = &self.teardown.error {
            p.push(format!("destroying the guest failed: {e}"));
        }
        if let Some(e) = self.migration.as_ref().and_then(|m| m.error.as_ref()) {
            p.push(format!("the migration failed: {e}"));
        }
        if let Some(g) = &self.guest_run {
            match (&g.end, g.expected_entry_failure) {
                (RunEnd::Done, false) | (RunEnd::Error { .. }, true) => {}
                (RunEnd::Done, true) => {
                    p.push("the run was meant to end with a failed VMRUN but finished".into())
                }
                (end, _) => p.push(format!("the guest's run ended: {end}")),
            }
            if builtin && g.failed != 0 {
                p.push(format!("{} guest actions failed", g.failed));
            }
        }
        self.ok = p.is_empty();
        self.problems = p;
    }

    /// The summary for people.
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        let _ = self.write_text(&mut s);
        s
    }

    fn write_text(&self, s: &mut String) -> std::fmt::Result {
        writeln!(
            s,
            "vmm run: {} guest '{}' on the {} backend: {} vCPU{}, {} of memory",
            self.mode,
            self.scenario,
            self.backend,
            self.vcpus,
            if self.vcpus == 1 { "" } else { "s" },
            crate::size::ByteSize::new(self.memory)
        )?;
        if let Some(r) = &self.mode_reason {
            writeln!(s, "  mode: {r}")?;
        }
        let l = &self.launch;
        writeln!(
            s,
            "launch: {}{} ({} data pages + {} VMSAs from {})",
            l.state,
            if l.expected_failure {
                " (failure injected on purpose)"
            } else {
                ""
            },
            l.data_pages,
            l.vmsas,
            l.image
        )?;
        if let Some(e) = &l.error {
            writeln!(s, "  error: {e}")?;
        }
        if let Some(d) = &l.digest {
            writeln!(s, "  launch digest: {d}")?;
        }
        if let Some(e) = &l.expected_digest {
            let verdict = match l.digest_matches {
                Some(true) => "matches",
                Some(false) => "DIFFERS",
                None if l.expected_failure => "not compared: the launch fails on purpose",
                None => "not compared: this host reports no launch digest",
            };
            writeln!(s, "  predicted:     {e} ({verdict})")?;
        }
        if let Some(m) = &self.migration {
            match &m.error {
                None => writeln!(s, "migration: the guest moved into a second VM after its launch")?,
                Some(e) => writeln!(s, "migration: FAILED: {e}")?,
            }
        }
        writeln!(s, "VMSA ownership:")?;
        for h in &self.ownership.vcpus {
            writeln!(s, "  vCPU {:>3}: {}", h.history.vcpu, render(&h.history))?;
        }
        writeln!(
            s,
            "  {} AP-creation requests accepted, {} 2 MiB-aligned pages refused (erratum 1467)",
            self.ownership.ap_requests, self.ownership.erratum_1467_refusals
        )?;
        if let Some(g) = &self.guest_run {
            writeln!(
                s,
                "guest: {} actions, {} failed, {} VMRUNs, {} AP requests accepted / {} refused",
                g.actions, g.failed, g.vmruns, g.ap_requests, g.ap_refused
            )?;
            for f in &g.failures {
                writeln!(
                    s,
                    "  action #{} {} on vCPU {}: {}",
                    f.index,
                    f.action,
                    f.vcpu,
                    f.error.as_deref().unwrap_or("")
                )?;
            }
            for d in &g.vmcb_dumps {
                match (&d.save_area, &d.unavailable) {
                    (Some(a), _) => writeln!(
                        s,
                        "  VMCB dump of vCPU {}: save area rip {:#x} rsp {:#x} efer {:#x} sev_features {:#x}",
                        d.vcpu, a.rip, a.rsp, a.efer, a.sev_features
                    )?,
                    (None, why) => writeln!(
                        s,
                        "  VMCB dump of vCPU {}: no save area: {}",
                        d.vcpu,
                        why.as_deref().unwrap_or("")
                    )?,
                }
            }
        }
        // A count the host could not see has its "not observable" line instead of a 0.
        let seen = |what| Hidden::seen(&self.hidden, what);
        if seen("ownership") {
            writeln!(s, "leaks: {}", self.ownership.leaks.len())?;
            for leak in &self.ownership.leaks {
                writeln!(s, "  pfn {} ({:?}): {}", leak.pfn, leak.reason, leak.detail)?;
            }
        }
        if seen("rmp_faults") {
            writeln!(s, "RMP faults: {}", self.rmp_faults)?;
        }
        if !self.faults_injected.is_empty() {
            writeln!(s, "faults injected: {}", self.faults_injected.join(", "))?;
        }
        if !self.phases.is_empty() {
            let phases: Vec<String> = self.phases.iter().map(ToString::to_string).collect();
            writeln!(s, "phases: {}", phases.join(", "))?;
        }
        if let Some(c) = &self.costs {
            if c.saturated {
                // The phases above read the same clock: they are no times either.
                writeln!(
                    s,
                    "machine clock: saturated at {} cycles: the cost file's costs overflowed the simulated clock, so no simulated time of this run is valid",
                    c.total_cycles
                )?;
            } else {
                writeln!(
                    s,
                    "machine clock: {} cycles ({:.3} ms at {:.1} GHz) since power-on, SNP_INIT included",
                    c.total_cycles,
                    c.total_us / 1000.0,
                    c.clock_hz / 1e9
                )?;
            }
        }
        if let Some(f) = &self.footprint {
            writeln!(
                s,
                "simulator: {} frames tracked, {} bytes of bookkeeping ({:.2} per frame); RMP {} bytes for {} frames ({:.2} per frame); {} frames with contents",
                f.allocated_frames,
                f.bookkeeping_bytes,
                f.bookkeeping_per_frame(),
                f.rmp_bytes,
                f.rmp_frames,
                f.rmp_bytes_per_frame(),
                f.backed_frames
            )?;
        }
        writeln!(s, "{}", self.teardown.line(&self.hidden))?;
        for h in &self.hidden {
            writeln!(s, "not observable on this host: {} ({})", h.what, h.why)?;
        }
        if let Some(t) = &self.trace {
            writeln!(s, "trace: {t} (open in ui.perfetto.dev)")?;
        }
        for w in &self.warnings {
            writeln!(s, "warning: {w}")?;
        }
        for f in &self.faults_not_fired {
            writeln!(
                s,
                "warning: fault rule `{}` never fired: it counted {} calls",
                f.rule, f.calls
            )?;
        }
        if self.ok {
            writeln!(s, "result: ok")
        } else {
            writeln!(s, "result: FAILED: {}", self.problems.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_teardown_line_names_every_count_in_order() {
        let t = TeardownSummary {
            vcpus: 4,
            vmsas_leaked: 1,
            guest_frames_released: 300,
            guest_frames_leaked: 2,
            frames_still_allocated: 0,
            frames_leaked_on_purpose: 3,
            error: Some("not on the line".into()),
        };
        assert_eq!(
            t.line(&[]),
            "teardown: 4 vCPUs, 1 VMSAs leaked, 300 guest frames released, 2 guest frames leaked, 0 host frames left (3 leaked on purpose)"
        );
        let hidden = |what| Hidden {
            what,
            why: "the kernel's",
        };
        assert_eq!(
            t.line(&[hidden("guest_frames")]),
            "teardown: 4 vCPUs, 1 VMSAs leaked, 0 host frames left (3 leaked on purpose)"
        );
        assert_eq!(
            t.line(&[hidden("vmsas_leaked"), hidden("frames"), hidden("launch_digest")]),
            "teardown: 4 vCPUs, 300 guest frames released, 2 guest frames leaked"
        );
    }
}
