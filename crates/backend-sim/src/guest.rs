//! A scripted guest and the runner that executes it on a `Vm<SimPlatform>`.
//!
//! The guest is a list of [`GuestAction`]s, each executed by one vCPU: before its action the
//! vCPU enters the guest (`Vm::prepare_entry`, then VMRUN on the simulator, which checks the
//! VMSA page per APM table 15-41 and marks it in use) unless it is still running. GHCB
//! requests (AP creation, page state changes, GHCB spec pub. 56421 §4.1.9 and §4.1.6) exit to
//! the host, which handles them through vmsa-core exactly as KVM would: an accepted
//! AP_CREATE/AP_DESTROY kicks the target, which processes the request at once and enters its
//! new VMSA if it has one. Scripts are JSON (`serde`), so a VMM can load `--guest FILE`.
//!
//! [`run_guest`] is the whole life of a guest on a machine: create the vCPUs, launch (data
//! pages, then the VMSAs), run a script, tear down and destroy, with the cycles of each phase.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmsa_core::ghcb::{AP_CREATE, AP_CREATE_ON_INIT, AP_DESTROY};
use vmsa_core::{
    ApCreationRequest, Entry, EventSink, Gfn, Gpa, Hpa, INITIAL_VMSA_GPA, LaunchState, MpState, PAGE_SIZE,
    SevEsSaveArea, SnpPageType, Teardown, VcpuId, Vm, VmConfig, VmKind, VmcbSeg, VmsaState,
};

use crate::cost::{CostOp, CostReport};
use crate::machine::{DestroyReport, Machine, PhaseClock, PhaseReport, SimError, Stats};
use crate::platform::SimPlatform;
use crate::rmp::PageSize;

fn one() -> u64 {
    1
}

fn yes() -> bool {
    true
}

/// What a page state change converts to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PscTarget {
    /// Guest-private (guest_memfd, encrypted).
    Private,
    /// Shared with the host.
    Shared,
}

/// One step of a scripted guest, executed by `vcpu`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestAction {
    /// `PVALIDATE` `pages` pages of `size` from `gpa` (validate, or rescind).
    Pvalidate {
        /// The executing vCPU.
        vcpu: u32,
        /// First page.
        gpa: u64,
        /// Page count.
        #[serde(default = "one")]
        pages: u64,
        /// Page size.
        #[serde(default)]
        size: PageSize,
        /// Validate (true) or rescind (false).
        #[serde(default = "yes")]
        validate: bool,
    },
    /// Fill `pages` pages from `gpa` with `byte` (C=1 private unless `private` is false).
    Write {
        /// The executing vCPU.
        vcpu: u32,
        /// First page.
        gpa: u64,
        /// Page count.
        #[serde(default = "one")]
        pages: u64,
        /// The fill byte.
        byte: u8,
        /// C-bit.
        #[serde(default = "yes")]
        private: bool,
    },
    /// Write an AP's VMSA image into the private page at `gpa` (a guest write, encrypted with
    /// the guest's key). `sev_features` defaults to the VM's.
    WriteVmsa {
        /// The executing vCPU.
        vcpu: u32,
        /// The page.
        gpa: u64,
        /// Entry RIP of the AP.
        #[serde(default)]
        rip: u64,
        /// Entry RSP of the AP.
        #[serde(default)]
        rsp: u64,
        /// SEV_FEATURES of the image.
        #[serde(default)]
        sev_features: Option<u64>,
    },
    /// `RMPADJUST` the page at `gpa` into a VMSA (or back), as Linux `snp_set_vmsa` does
    /// (target VMPL1, no permissions, VMSA bit).
    MakeVmsa {
        /// The executing vCPU.
        vcpu: u32,
        /// The page.
        gpa: u64,
        /// Set (true) or clear (false) the VMSA bit.
        #[serde(default = "yes")]
        vmsa: bool,
    },
    /// GHCB AP creation: AP_CREATE (or AP_CREATE_ON_INIT) for `apic_id` with the VMSA at `gpa`.
    ApCreate {
        /// The executing vCPU.
        vcpu: u32,
        /// The target.
        apic_id: u32,
        /// The VMSA.
        gpa: u64,
        /// CREATE_ON_INIT instead of CREATE.
        #[serde(default)]
        on_init: bool,
        /// RAX (SEV_FEATURES); defaults to the VM's.
        #[serde(default)]
        sev_features: Option<u64>,
    },
    /// GHCB AP creation: AP_DESTROY of `apic_id`.
    ApDestroy {
        /// The executing vCPU.
        vcpu: u32,
        /// The target.
        apic_id: u32,
    },
    /// An INIT IPI to `apic_id` (applies a CREATE_ON_INIT).
    SendInit {
        /// The executing vCPU.
        vcpu: u32,
        /// The target.
        apic_id: u32,
    },
    /// A GHCB page state change of `pages` pages from `gpa`.
    PageState {
        /// The executing vCPU.
        vcpu: u32,
        /// First page.
        gpa: u64,
        /// Page count.
        #[serde(default = "one")]
        pages: u64,
        /// The new state.
        to: PscTarget,
    },
    /// Enter the vCPU (VMRUN) and do nothing else.
    Run {
        /// The vCPU.
        vcpu: u32,
    },
    /// `HLT`: the vCPU exits and halts.
    Hlt {
        /// The vCPU.
        vcpu: u32,
    },
}

impl GuestAction {
    /// The executing vCPU.
    pub fn vcpu(&self) -> u32 {
        match *self {
            Self::Pvalidate { vcpu, .. }
            | Self::Write { vcpu, .. }
            | Self::WriteVmsa { vcpu, .. }
            | Self::MakeVmsa { vcpu, .. }
            | Self::ApCreate { vcpu, .. }
            | Self::ApDestroy { vcpu, .. }
            | Self::SendInit { vcpu, .. }
            | Self::PageState { vcpu, .. }
            | Self::Run { vcpu }
            | Self::Hlt { vcpu } => vcpu,
        }
    }

    /// `PVALIDATE` of one 4 KiB page (validate, or rescind).
    pub fn pvalidate_4k(vcpu: u32, gpa: u64, validate: bool) -> Self {
        Self::Pvalidate {
            vcpu,
            gpa,
            pages: 1,
            size: PageSize::Size4K,
            validate,
        }
    }

    /// What a guest does to turn one of its pages into an AP's VMSA (Linux
    /// `wakeup_cpu_via_vmgexit`): `vcpu` validates the page at `gpa`, writes a 64-bit entry
    /// state (`rip`, `rsp`) there, and RMPADJUSTs it into a VMSA.
    pub fn vmsa_setup(vcpu: u32, gpa: u64, rip: u64, rsp: u64) -> [Self; 3] {
        [
            Self::pvalidate_4k(vcpu, gpa, true),
            Self::WriteVmsa {
                vcpu,
                gpa,
                rip,
                rsp,
                sev_features: None,
            },
            Self::MakeVmsa {
                vcpu,
                gpa,
                vmsa: true,
            },
        ]
    }

    /// The action's name (its JSON tag).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pvalidate { .. } => "pvalidate",
            Self::Write { .. } => "write",
            Self::WriteVmsa { .. } => "write_vmsa",
            Self::MakeVmsa { .. } => "make_vmsa",
            Self::ApCreate { .. } => "ap_create",
            Self::ApDestroy { .. } => "ap_destroy",
            Self::SendInit { .. } => "send_init",
            Self::PageState { .. } => "page_state",
            Self::Run { .. } => "run",
            Self::Hlt { .. } => "hlt",
        }
    }
}

/// A scripted guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestScript {
    /// A name for reports.
    #[serde(default)]
    pub name: String,
    /// The steps, in order.
    pub actions: Vec<GuestAction>,
}

/// Why a script could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// The JSON did not parse.
    #[error("guest script {source_name}: {detail}")]
    Parse {
        /// The file name (or `<string>`).
        source_name: String,
        /// The parser's message (with line and column).
        detail: String,
    },
    /// The file could not be read.
    #[error("cannot read guest script {path}: {detail}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        detail: String,
    },
    /// A step of the guest's life before or after the script failed.
    #[error("{phase}: {detail}")]
    Phase {
        /// The phase.
        phase: &'static str,
        /// What failed.
        detail: String,
    },
}

/// The VMSA GPA of AP `i` in [`GuestScript::smp_boot`]: one page above a 2 MiB boundary,
/// in its own 2 MiB region (never 2 MiB aligned, erratum 1467).
pub fn smp_boot_vmsa_gpa(base: u64, i: u32) -> u64 {
    base + u64::from(i) * 0x20_0000 + PAGE_SIZE
}

impl GuestScript {
    /// Parse a script from JSON; `source_name` names it in errors.
    pub fn from_json(source_name: &str, text: &str) -> Result<Self, ScriptError> {
        serde_json::from_str(text).map_err(|e| ScriptError::Parse {
            source_name: source_name.into(),
            detail: e.to_string(),
        })
    }

    /// Load a script from a JSON file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ScriptError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ScriptError::Io {
            path: name.clone(),
            detail: e.to_string(),
        })?;
        Self::from_json(&name, &text)
    }

    /// The script as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The built-in SMP boot: the BSP (vCPU 0) validates a page per AP at
    /// [`smp_boot_vmsa_gpa`]`(base, i)`, writes the AP's VMSA there, RMPADJUSTs it into a
    /// VMSA and starts the AP with AP_CREATE; each AP then shares and re-privatises a page of
    /// its own (page state changes both ways) and halts. Finally the BSP destroys every AP,
    /// clears the VMSA bits and halts. `base` must be 2 MiB aligned and the guest must have
    /// `vcpus * 2 MiB` of memory from it.
    pub fn smp_boot(vcpus: u32, base: u64) -> Self {
        let mut a = Vec::new();
        for i in 1..vcpus {
            let gpa = smp_boot_vmsa_gpa(base, i);
            a.extend(GuestAction::vmsa_setup(
                0,
                gpa,
                0x10_0000 + u64::from(i) * 0x100,
                0x8_0000 + u64::from(i) * 0x1000,
            ));
            a.push(GuestAction::ApCreate {
                vcpu: 0,
                apic_id: i,
                gpa,
                on_init: false,
                sev_features: None,
            });
        }
        for i in 1..vcpus {
            let data = smp_boot_vmsa_gpa(base, i) + PAGE_SIZE;
            a.push(GuestAction::pvalidate_4k(i, data, true));
            a.push(GuestAction::Write {
                vcpu: i,
                gpa: data,
                pages: 1,
                byte: i as u8,
                private: true,
            });
            a.push(GuestAction::pvalidate_4k(i, data, false));
            a.push(GuestAction::PageState {
                vcpu: i,
                gpa: data,
                pages: 1,
                to: PscTarget::Shared,
            });
            a.push(GuestAction::Write {
                vcpu: i,
                gpa: data,
                pages: 1,
                byte: 0x80 | i as u8,
                private: false,
            });
            a.push(GuestAction::PageState {
                vcpu: i,
                gpa: data,
                pages: 1,
                to: PscTarget::Private,
            });
            a.push(GuestAction::pvalidate_4k(i, data, true));
            a.push(GuestAction::Hlt { vcpu: i });
        }
        for i in 1..vcpus {
            a.push(GuestAction::ApDestroy { vcpu: 0, apic_id: i });
            a.push(GuestAction::MakeVmsa {
                vcpu: 0,
                gpa: smp_boot_vmsa_gpa(base, i),
                vmsa: false,
            });
        }
        a.push(GuestAction::Hlt { vcpu: 0 });
        Self {
            name: format!("smp-boot-{vcpus}"),
            actions: a,
        }
    }
}

/// How one action ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ActionOutcome {
    /// Its index in the script.
    pub index: usize,
    /// The action's name.
    pub action: &'static str,
    /// The executing vCPU.
    pub vcpu: u32,
    /// `None` on success, else what the guest (or the runner) saw.
    pub error: Option<String>,
    /// What happened (e.g. which vCPUs started).
    pub detail: String,
}

/// What running a script did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ScriptReport {
    /// The script's name.
    pub name: String,
    /// One outcome per action.
    pub outcomes: Vec<ActionOutcome>,
    /// Actions that failed.
    pub failed: usize,
    /// Cycles the script took.
    pub cycles: u64,
    /// VMRUNs done.
    pub vmruns: u64,
    /// RMP faults of host accesses during the script.
    pub rmp_faults: u64,
    /// AP-creation requests accepted.
    pub ap_requests: u64,
    /// AP-creation requests refused (GHCB error to the guest).
    pub ap_refused: u64,
}

impl ScriptReport {
    /// The outcomes that failed.
    pub fn failures(&self) -> Vec<&ActionOutcome> {
        self.outcomes.iter().filter(|o| o.error.is_some()).collect()
    }
}

/// Executes scripts on one VM, remembering which vCPUs are inside the guest.
#[derive(Debug)]
pub struct Runner<'a> {
    vm: &'a Vm<SimPlatform>,
    running: HashMap<u32, Hpa>,
    report: ScriptReport,
    start_cycles: u64,
    start_faults: u64,
}

fn vmsa_image(rip: u64, rsp: u64, sev_features: u64) -> Box<SevEsSaveArea> {
    // A 64-bit AP entry state (long mode, paging, protected mode), as Linux's
    // wakeup_cpu_via_vmgexit builds it.
    let mut v = SevEsSaveArea::boxed();
    v.cs = VmcbSeg::new(0x10, 0x29b, 0xffff_ffff, 0);
    for s in [&mut v.ds, &mut v.es, &mut v.ss, &mut v.fs, &mut v.gs] {
        *s = VmcbSeg::new(0x18, 0xc93, 0xffff_ffff, 0);
    }
    v.efer = 0x1d00; // SVME | LMA | LME | NXE
    v.cr0 = 0x8000_0031;
    v.cr4 = 0x20;
    v.rip = rip;
    v.rsp = rsp;
    v.rflags = 2;
    v.dr7 = 0x400;
    v.dr6 = 0xffff_0ff0;
    v.g_pat = 0x0007_0406_0007_0406;
    v.xcr0 = 1;
    v.sev_features = sev_features;
    v
}

impl<'a> Runner<'a> {
    /// A runner for `vm` (whose launch should be finished).
    pub fn new(vm: &'a Vm<SimPlatform>) -> Self {
        let machine = vm.platform().machine();
        Self {
            vm,
            running: HashMap::new(),
            report: ScriptReport::default(),
            start_cycles: machine.now(),
            start_faults: machine.stats().rmp_faults,
        }
    }

    /// Name the report after `name`.
    pub fn named(mut self, name: &str) -> Self {
        self.report.name = name.to_owned();
        self
    }

    fn platform(&self) -> &SimPlatform {
        self.vm.platform()
    }

    /// The VMSA GPA the RMP must record for a vCPU's current VMSA.
    fn expected_gpa(&self, id: VcpuId) -> Gpa {
        match self.vm.vcpu(id).map(|v| v.state) {
            Ok(VmsaState::GuestOwned(g)) => g,
            _ => INITIAL_VMSA_GPA,
        }
    }

    /// Bring a vCPU into the guest: vmsa-core's entry checks, then VMRUN. Returns whether it
    /// now runs.
    fn enter(&mut self, vcpu: u32) -> Result<bool, String> {
        if self.running.contains_key(&vcpu) {
            return Ok(true);
        }
        let id = VcpuId(vcpu);
        match self.vm.prepare_entry(id).map_err(|e| e.to_string())? {
            Entry::Blocked(_) => Ok(false),
            Entry::Run(hpa) => {
                let gpa = self.expected_gpa(id);
                self.platform().vmrun(hpa, gpa).map_err(|e| e.to_string())?;
                self.report.vmruns += 1;
                self.running.insert(vcpu, hpa);
                Ok(true)
            }
        }
    }

    fn exit(&mut self, vcpu: u32) {
        if let Some(hpa) = self.running.remove(&vcpu) {
            self.platform().vmexit(hpa);
        }
    }

    /// KVM's kick: the target leaves the guest, processes its pending request and, if it is
    /// runnable, enters again on its (new) VMSA.
    fn kick(&mut self, target: u32) -> String {
        self.exit(target);
        match self.enter(target) {
            Ok(true) => format!("vCPU {target} entered"),
            Ok(false) => format!("vCPU {target} halted"),
            Err(e) => format!("vCPU {target} cannot run: {e}"),
        }
    }

    fn exit_cost(&self) -> CostOp {
        match self.vm.config().kind {
            VmKind::Snp => CostOp::VmgexitSnp,
            VmKind::SevEs => CostOp::VmgexitEs,
        }
    }

    fn ap_request(&mut self, vcpu: u32, req: ApCreationRequest) -> Result<String, String> {
        self.platform().charge(self.exit_cost(), "AP creation");
        match self.vm.ap_creation(&req) {
            Ok(done) => {
                self.report.ap_requests += 1;
                let d = if done.kick {
                    self.kick(done.target.0)
                } else {
                    format!("vCPU {} waits for INIT", done.target)
                };
                let _ = vcpu;
                Ok(d)
            }
            Err(e) => {
                self.report.ap_refused += 1;
                let (i1, i2) = e.sw_exit_info();
                Err(format!("{e} (sw_exit_info {i1}/{i2})"))
            }
        }
    }

    fn each_page(
        gpa: u64,
        pages: u64,
        step: u64,
        mut f: impl FnMut(Gpa) -> Result<String, SimError>,
    ) -> Result<String, String> {
        let mut out = Vec::new();
        for i in 0..pages {
            out.push(f(Gpa(gpa + i * step)).map_err(|e| e.to_string())?);
        }
        Ok(out.join(", "))
    }

    fn act(&mut self, a: &GuestAction) -> Result<String, String> {
        let vcpu = a.vcpu();
        if !self.vm.vcpu_ids().contains(&VcpuId(vcpu)) {
            return Err(format!("no vCPU {vcpu}"));
        }
        if !self.enter(vcpu)? {
            let mp = self.vm.vcpu(VcpuId(vcpu)).map(|v| v.mp_state).ok();
            return Err(format!("vCPU {vcpu} is not runnable ({mp:?})"));
        }
        let p = self.platform().clone();
        match *a {
            GuestAction::Pvalidate {
                gpa,
                pages,
                size,
                validate,
                ..
            } => Self::each_page(gpa, pages, size.bytes(), |g| {
                p.pvalidate(g, size, validate)
                    .map(|changed| if changed { "ok" } else { "no update" }.to_string())
            }),
            GuestAction::Write {
                gpa,
                pages,
                byte,
                private,
                ..
            } => Self::each_page(gpa, pages, PAGE_SIZE, |g| {
                p.guest_write(g, &[byte; PAGE_SIZE as usize], private)
                    .map(|()| "ok".into())
            }),
            GuestAction::WriteVmsa {
                gpa,
                rip,
                rsp,
                sev_features,
                ..
            } => {
                let f = sev_features.unwrap_or(self.vm.config().vmsa_features());
                let img = vmsa_image(rip, rsp, f);
                p.guest_write(Gpa(gpa), img.as_page(), true)
                    .map(|()| format!("VMSA rip {rip:#x}"))
                    .map_err(|e| e.to_string())
            }
            GuestAction::MakeVmsa { gpa, vmsa, .. } => p
                .rmpadjust(Gpa(gpa), 1, 0, vmsa)
                .map(|()| "ok".into())
                .map_err(|e| e.to_string()),
            GuestAction::ApCreate {
                apic_id,
                gpa,
                on_init,
                sev_features,
                ..
            } => {
                let req = if on_init { AP_CREATE_ON_INIT } else { AP_CREATE };
                let f = sev_features.unwrap_or(self.vm.config().vmsa_features());
                self.ap_request(
                    vcpu,
                    ApCreationRequest::new(VcpuId(vcpu), req, apic_id, gpa, Some(f)),
                )
            }
            GuestAction::ApDestroy { apic_id, .. } => self.ap_request(
                vcpu,
                ApCreationRequest::new(VcpuId(vcpu), AP_DESTROY, apic_id, 0, None),
            ),
            GuestAction::SendInit { apic_id, .. } => {
                self.exit(apic_id);
                self.vm.init_vcpu(VcpuId(apic_id)).map_err(|e| e.to_string())?;
                Ok(self.kick(apic_id))
            }
            GuestAction::PageState { gpa, pages, to, .. } => {
                p.charge(self.exit_cost(), "page state change");
                p.charge(CostOp::ExitToUserspace, "KVM_HC_MAP_GPA_RANGE");
                let vm = self.vm;
                Self::each_page(gpa, pages, PAGE_SIZE, |g| {
                    let gfn = g.gfn();
                    let released = p.page_state_change(gfn, to == PscTarget::Shared)?;
                    if released {
                        let hit = vm.gmem_invalidate(gfn, Gfn(gfn.0 + 1));
                        Ok(format!("released, vCPUs reloading: {hit:?}"))
                    } else {
                        Ok("ok".into())
                    }
                })
            }
            GuestAction::Run { .. } => Ok("running".into()),
            GuestAction::Hlt { .. } => {
                self.exit(vcpu);
                self.vm
                    .set_mp_state(VcpuId(vcpu), MpState::Halted)
                    .map_err(|e| e.to_string())?;
                Ok("halted".into())
            }
        }
    }

    /// Execute one action (number `index` of its script) as the guest would, and record how
    /// it ended. A failure is recorded (the guest sees it) rather than returned.
    pub fn step(&mut self, index: usize, a: &GuestAction) -> &ActionOutcome {
        let (error, detail) = match self.act(a) {
            Ok(d) => (None, d),
            Err(e) => (Some(e), String::new()),
        };
        if error.is_some() {
            self.report.failed += 1;
        }
        self.report.outcomes.push(ActionOutcome {
            index,
            action: a.name(),
            vcpu: a.vcpu(),
            error,
            detail,
        });
        self.report.outcomes.last().expect("just pushed")
    }

    /// Take every vCPU out of the guest and return what the steps did.
    pub fn finish(mut self) -> ScriptReport {
        let ids: Vec<u32> = self.running.keys().copied().collect();
        for v in ids {
            self.exit(v);
        }
        let machine = self.platform().machine().clone();
        self.report.cycles = machine.now() - self.start_cycles;
        self.report.rmp_faults = machine.stats().rmp_faults - self.start_faults;
        self.report
    }

    /// Execute every action in order and return what happened. Failures are recorded per
    /// action (the guest sees them); the script goes on.
    pub fn run(mut self, script: &GuestScript) -> ScriptReport {
        self.report.name = script.name.clone();
        for (index, a) in script.actions.iter().enumerate() {
            self.step(index, a);
        }
        self.finish()
    }
}

/// Run `script` on `vm` (see [`Runner`]).
pub fn run_script(vm: &Vm<SimPlatform>, script: &GuestScript) -> ScriptReport {
    Runner::new(vm).run(script)
}

/// A range of pages the launch adds (`SNP_LAUNCH_UPDATE` / `LAUNCH_UPDATE_DATA`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchRegion {
    /// First page.
    pub gpa: u64,
    /// Page count.
    pub pages: u64,
    /// Page type (SEV-ES takes only `Normal`).
    pub page_type: SnpPageType,
    /// Contents: every byte of the region is this value (ignored for ZERO pages).
    pub fill: u8,
}

/// The guest to run with [`run_guest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestConfig {
    /// SEV-ES or SEV-SNP.
    pub kind: VmKind,
    /// vCPUs (APIC IDs 0..n).
    pub vcpus: u32,
    /// Guest memory in bytes, from GPA 0 (sparse: costs nothing until touched).
    pub memory: u64,
    /// Launch policy (SNP: bit 17 is added).
    pub policy: u64,
    /// Extra SEV features.
    pub sev_features: u64,
    /// Pages the launch measures.
    pub launch: Vec<LaunchRegion>,
}

impl GuestConfig {
    /// An SNP guest with `vcpus` vCPUs and `memory` bytes and a 16-page firmware at 1 MiB.
    pub fn snp(vcpus: u32, memory: u64) -> Self {
        Self {
            kind: VmKind::Snp,
            vcpus,
            memory,
            policy: vmsa_core::SNP_POLICY_RSVD_MBO,
            sev_features: 0,
            launch: vec![LaunchRegion {
                gpa: 0x10_0000,
                pages: 16,
                page_type: SnpPageType::Normal,
                fill: 0xf4,
            }],
        }
    }
}

/// What [`run_guest`] did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunReport {
    /// Per-phase cycles.
    pub phases: Vec<PhaseReport>,
    /// The script's outcome.
    pub script: ScriptReport,
    /// The launch digest (hex).
    pub launch_digest: Option<String>,
    /// vCPUs torn down and host VMSAs leaked.
    pub teardown: Teardown,
    /// Guest memory released and leaked.
    pub destroy: DestroyReport,
    /// `Leaked` events vmsa-core reported.
    pub leak_events: usize,
    /// Frames the machine holds as leaked.
    pub leaked_frames: usize,
    /// Machine counters.
    pub stats: Stats,
    /// Per-operation costs (of the whole machine).
    pub costs: CostReport,
}

/// The whole life of a guest on `machine`: create the vCPUs, launch, run `script`, tear down
/// and destroy. Events go to `events`; `leak_events` counts the `Leaked` ones.
pub fn run_guest(
    machine: &Arc<Machine>,
    cfg: &GuestConfig,
    script: &GuestScript,
    events: Arc<vmsa_core::EventLog>,
) -> Result<RunReport, ScriptError> {
    let phase = |p: &'static str| {
        move |e: &dyn std::fmt::Display| ScriptError::Phase {
            phase: p,
            detail: e.to_string(),
        }
    };
    let mut clock = PhaseClock::new(machine);
    let platform = machine.create_guest(cfg.kind).map_err(|e| phase("create")(&e))?;
    platform
        .add_memslot(Gpa(0), cfg.memory)
        .map_err(|e| phase("create")(&e))?;
    let config = match cfg.kind {
        VmKind::Snp => VmConfig::snp(cfg.sev_features),
        VmKind::SevEs => VmConfig::sev_es(cfg.sev_features),
    };
    let sink: Arc<dyn EventSink> = events.clone();
    let mut vm = Vm::new(platform.clone(), config, sink);
    for i in 0..cfg.vcpus {
        vm.create_vcpu(VcpuId(i)).map_err(|e| phase("create")(&e))?;
    }
    clock.end("create");
    let policy = match cfg.kind {
        VmKind::Snp => cfg.policy | vmsa_core::SNP_POLICY_RSVD_MBO,
        VmKind::SevEs => cfg.policy,
    };
    let launched = (|| {
        vm.launch_start(policy)?;
        for r in &cfg.launch {
            let len = r.pages * PAGE_SIZE;
            let data = vec![r.fill; len as usize];
            let data = (r.page_type != SnpPageType::Zero).then_some(&data[..]);
            vm.launch_update_data(Gpa(r.gpa), len, r.page_type, data)?;
        }
        if cfg.kind == VmKind::SevEs {
            vm.launch_update_vmsas()?;
        }
        vm.launch_finish([0; 32])
    })();
    let launch_err = launched.err().map(|e| e.to_string());
    clock.end("launch");
    let report = if launch_err.is_none() && vm.launch_state() == LaunchState::Finished {
        run_script(&vm, script)
    } else {
        ScriptReport {
            name: script.name.clone(),
            ..ScriptReport::default()
        }
    };
    clock.end("run");
    let digest = platform.launch_digest().map(|d| d.hex());
    let teardown = vm.teardown();
    drop(vm);
    let destroy = platform.destroy().map_err(|e| phase("teardown")(&e))?;
    clock.end("teardown");
    if let Some(e) = launch_err {
        return Err(ScriptError::Phase {
            phase: "launch",
            detail: e,
        });
    }
    Ok(RunReport {
        phases: clock.into_phases(),
        script: report,
        launch_digest: digest,
        teardown,
        destroy,
        leak_events: events.leaks().len(),
        leaked_frames: machine.leaked_frames().len(),
        stats: machine.stats(),
        costs: machine.cost_report(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_round_trip_through_json_and_reject_typos() {
        let s = GuestScript::smp_boot(3, 0x20_0000);
        let back = GuestScript::from_json("x", &s.to_json()).unwrap();
        assert_eq!(back, s);
        let text = r#"{"actions":[{"action":"pvalidate","vcpu":0,"gpa":4096},
            {"action":"page_state","vcpu":0,"gpa":4096,"to":"shared"},{"action":"hlt","vcpu":0}]}"#;
        let s = GuestScript::from_json("t.json", text).unwrap();
        assert_eq!(
            s.actions[0],
            GuestAction::Pvalidate {
                vcpu: 0,
                gpa: 4096,
                pages: 1,
                size: PageSize::Size4K,
                validate: true
            }
        );
        let e = GuestScript::from_json("t.json", r#"{"actions":[{"action":"fly","vcpu":0}]}"#).unwrap_err();
        assert!(e.to_string().starts_with("guest script t.json:"), "{e}");
        let e =
            GuestScript::from_json("t.json", r#"{"actions":[{"action":"hlt","vcpu":0,"x":1}]}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn smp_boot_vmsas_are_never_2m_aligned() {
        for i in 1..64 {
            assert!(!Gpa(smp_boot_vmsa_gpa(0x20_0000, i)).is_2m_aligned());
        }
    }

    #[test]
    fn run_guest_boots_and_tears_down_cleanly() {
        let m = Machine::with_defaults();
        let log = Arc::new(vmsa_core::EventLog::new());
        let cfg = GuestConfig::snp(3, 64 << 20);
        let r = run_guest(&m, &cfg, &GuestScript::smp_boot(3, 0x20_0000), log).unwrap();
        assert_eq!(r.script.failures(), Vec::<&ActionOutcome>::new());
        assert_eq!(r.phases.len(), 4);
        assert!(r.phases.iter().all(|p| p.cycles > 0), "{:?}", r.phases);
        assert_eq!((r.leak_events, r.leaked_frames, r.stats.rmp_faults), (0, 0, 0));
        assert_eq!(m.allocated_frames(), 0);
        assert!(r.launch_digest.is_some());
    }
}
