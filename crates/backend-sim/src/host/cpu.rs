//! The scripted guest's processors: which vCPUs are inside the guest, what each action does to
//! the machine, and what the steps did.
//!
//! Before its action a vCPU enters the guest (`Vm::prepare_entry`, then VMRUN on the machine,
//! which checks the VMSA page per APM table 15-41 and marks it in use) unless it is already
//! inside. GHCB AP-creation requests (GHCB spec pub. 56421 §4.1.9) are handled here by the host
//! kernel (vmsa-core), as KVM's `sev_snp_ap_creation` handles them: an accepted AP_CREATE or
//! AP_DESTROY kicks the target, which leaves the guest, applies the request at once and enters
//! its new VMSA if it has one. A GHCB page state change (§4.1.6) of an SNP guest is the one
//! request that reaches the VMM: KVM forwards it as `KVM_HC_MAP_GPA_RANGE`, so the step returns
//! [`Acted::Convert`] and ends when the VMM answers (an SEV-ES guest's is refused with a GHCB
//! error, as `sev_es_validate_vmgexit` refuses it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use vmsa_core::ghcb::{AP_CREATE, AP_CREATE_ON_INIT, AP_DESTROY};
use vmsa_core::{
    ApCreationRequest, Entry, Gfn, Gpa, Hpa, INITIAL_VMSA_GPA, MpState, PAGE_SIZE, SevEsSaveArea, VcpuId, Vm,
    VmKind, VmcbSeg, VmsaState,
};
use vmsa_host::{Conversion, DumpedSaveArea, GuestActivity, GuestStep, VmcbDump};

use crate::cost::CostOp;
use crate::error::SimError;
use crate::guest::{GuestAction, PscTarget};
use crate::platform::SimPlatform;

/// How an action ended on the vCPU.
#[derive(Debug)]
pub(crate) enum Acted {
    /// It is done; the outcome is recorded.
    Done,
    /// It asks the VMM to convert a range (a GHCB page state change); it ends when the VMM
    /// answers.
    Convert(Conversion),
    /// A guest access hit a page whose attribute differs from its C-bit: `KVM_EXIT_MEMORY_FAULT`
    /// (`kvm_mmu_prepare_memory_fault_exit`). The action resumes at the faulting page after the
    /// VMM converts it.
    Fault(Conversion),
    /// A kick interrupted a long access between two of its pages: the vCPU returns to user
    /// space (`KVM_EXIT_INTR`) and the action resumes at the page it stopped at on the next run.
    Interrupted,
    /// The vCPU triple-faulted: it shuts down (`KVM_EXIT_SHUTDOWN`).
    Shutdown,
    /// The guest asked to be terminated (a GHCB termination request).
    Terminate {
        /// The reason code set.
        reason_set: u8,
        /// The reason code.
        reason_code: u8,
    },
}

/// Why a vCPU could not enter the guest: KVM_RUN's `pre_sev_run` refused its VMSA, or VMRUN
/// failed its checks (a `KVM_EXIT_FAIL_ENTRY` on KVM).
#[derive(Debug, thiserror::Error)]
pub(crate) enum EntryError {
    /// vmsa-core refused the entry (no valid VMSA, a bugged VM, ...).
    #[error("entry refused: {0}")]
    Prepare(#[from] vmsa_core::Error<SimError>),
    /// VMRUN failed (`VMEXIT_INVALID`).
    #[error("{0}")]
    Vmrun(#[from] SimError),
}

/// Why a vCPU's next `KVM_RUN` fails.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RunFailure {
    /// Its entry failed: `KVM_EXIT_FAIL_ENTRY`, or `KVM_RUN`'s refusal (an entry after a kick
    /// too: the kicker's request itself succeeded).
    #[error(transparent)]
    Entry(#[from] EntryError),
    /// The host failed while the vCPU ran the guest: the simulated machine outgrew its memory
    /// budget (as a KVM host out of memory fails the vCPU's `KVM_RUN`). The guest's operation
    /// is not the guest's failure, and the run cannot go on.
    #[error(transparent)]
    Host(SimError),
}

/// The processors of one scripted guest.
#[derive(Debug)]
pub(super) struct Cpus {
    running: HashMap<u32, Hpa>,
    /// vCPUs whose next `KVM_RUN` fails, and why.
    failed: HashMap<u32, RunFailure>,
    /// `kvm_amd.dump_invalid_vmcb`: dump a vCPU whose VMRUN failed.
    dump_invalid_vmcb: bool,
    /// The action (by index) a kick interrupted, and the page at which it resumes.
    interrupted: Option<(usize, u64)>,
    report: GuestActivity,
}

/// A 64-bit AP entry state (long mode, paging, protected mode), as Linux's
/// `wakeup_cpu_via_vmgexit` builds it.
fn vmsa_image(rip: u64, rsp: u64, sev_features: u64) -> Box<SevEsSaveArea> {
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

/// How often (in pages) a long access looks for a pending kick.
pub(crate) const KICK_CHECK_PAGES: u64 = 4096;

/// How [`each_page`] ended without an error.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Paged {
    /// Every page is done; the detail says how many.
    Done(String),
    /// `stop` said to stop before this page (none from it on is done yet).
    Stopped(u64),
}

/// Run `f` on each of `pages` pages from `gpa`, `step` bytes apart, starting at page `first`
/// (the pages before it were done by an earlier run of the same access, which a fault or a
/// kick interrupted) and stopping at the first error; says how many the whole access did as
/// `pvalidate_range`'s detail does ("ok" for one page, "{n} pages ok" otherwise). Only a count
/// is kept: a script may name 2^28 pages (a 1 TiB guest), and a word per page would take
/// gigabytes outside the machine's memory budget. Every [`KICK_CHECK_PAGES`] pages done in
/// this run it asks `stop` whether a kick is pending, and if so stops there
/// ([`Paged::Stopped`]), so a long access cannot keep its vCPU from the kick (each run makes
/// progress: it does at least that many pages before it can stop).
pub(crate) fn each_page(
    gpa: u64,
    pages: u64,
    step: u64,
    first: u64,
    stop: impl Fn() -> bool,
    mut f: impl FnMut(Gpa) -> Result<(), SimError>,
) -> Result<Paged, SimError> {
    for i in first..pages {
        if i != first && (i - first).is_multiple_of(KICK_CHECK_PAGES) && stop() {
            return Ok(Paged::Stopped(i));
        }
        f(Gpa(gpa + i * step))?;
    }
    Ok(Paged::Done(pages_ok(pages)))
}

/// The page of a `pages`-page access from `gpa` at which its run resumes after a memory fault
/// at `faulted` (the VMM has since converted it): the faulting page itself, as a `rep stos`
/// restarts at its current iteration, so no page before it is accessed again. The first page
/// when the access has not faulted (or `faulted` lies outside it).
fn resume_page(gpa: u64, pages: u64, faulted: Option<Gpa>) -> u64 {
    faulted
        .and_then(|f| f.gfn().0.checked_sub(Gpa(gpa).gfn().0))
        .filter(|&i| i < pages)
        .unwrap_or(0)
}

/// The detail of `n` pages done without a complaint.
fn pages_ok(n: u64) -> String {
    if n == 1 {
        "ok".into()
    } else {
        format!("{n} pages ok")
    }
}

/// Convert `range` as KVM_SET_MEMORY_ATTRIBUTES and the guest_memfd hole punch QEMU does for a
/// conversion to shared would, in KVM's order: first the kernel drops every guest VMSA in the
/// range (`sev_gmem_invalidate_range`: those vCPUs re-resolve it at their next entry) and the
/// vCPUs running on one leave the guest (the invalidation kicks them), then the private frames
/// are made shared, flushed and freed (`sev_gmem_invalidate`); a frame RMPUPDATE still refuses
/// is leaked on purpose and said so. Says what it did.
pub(crate) fn convert(vm: &Vm<SimPlatform>, cpus: &mut Cpus, range: Conversion) -> Result<String, SimError> {
    let start = range.gpa.gfn();
    let end = Gfn(start.0 + range.size / PAGE_SIZE);
    let to = if range.private { "private" } else { "shared" };
    let mut hit = Vec::new();
    if !range.private {
        hit = vm.gmem_invalidate(start, end);
        for v in &hit {
            cpus.exit(vm, v.0);
        }
    }
    let done = vm.platform().convert(start, end, !range.private)?;
    let mut out = format!("{} pages to {to}", end.0 - start.0);
    if done.released != 0 {
        out += &format!("; {} private frames released", done.released);
    }
    if !hit.is_empty() {
        out += &format!(", vCPUs reloading: {hit:?}");
    }
    if !done.leaked.is_empty() {
        let pfns: Vec<String> = done.leaked.iter().map(|(_, p)| p.to_string()).collect();
        out += &format!("; LEAKED (RMPUPDATE refused): pfn {}", pfns.join(", "));
    }
    Ok(out)
}

/// Run `script` on `vm` (launched) on the caller's thread, every action in order, answering the
/// guest's page state changes and memory faults at once, as the VMM would. For tests of the host
/// kernel that inspect `vm` between scripts; a VMM runs guests through [`super::SimHost`].
pub fn run_script(vm: &Vm<SimPlatform>, script: &crate::guest::GuestScript) -> GuestActivity {
    let mut cpus = Cpus::new(false);
    for (index, a) in script.actions.iter().enumerate() {
        match cpus.step(vm, index, a, None, None) {
            Acted::Convert(range) => {
                let done = convert(vm, &mut cpus, range).map_err(|e| e.to_string());
                cpus.record(index, a, done);
            }
            Acted::Fault(mut range) => {
                // One conversion per faulting access, as KVM exits once per fault: a multi-page
                // action may fault once on each of its pages, each answered by a conversion.
                loop {
                    if let Err(e) = convert(vm, &mut cpus, range) {
                        cpus.record(index, a, Err(e.to_string()));
                        break;
                    }
                    match cpus.step(vm, index, a, Some(range.gpa), None) {
                        Acted::Fault(next) => range = next,
                        Acted::Convert(r) => {
                            let done = convert(vm, &mut cpus, r).map_err(|e| e.to_string());
                            cpus.record(index, a, done);
                            break;
                        }
                        Acted::Done | Acted::Interrupted | Acted::Terminate { .. } | Acted::Shutdown => {
                            break;
                        }
                    }
                }
            }
            // No kick reaches this caller's run: nothing interrupts it.
            Acted::Done | Acted::Interrupted | Acted::Terminate { .. } | Acted::Shutdown => {}
        }
    }
    cpus.finish(vm)
}

impl Cpus {
    /// No vCPU inside the guest yet; `dump_invalid_vmcb` as the kvm_amd parameter.
    pub(super) fn new(dump_invalid_vmcb: bool) -> Self {
        Self {
            running: HashMap::new(),
            failed: HashMap::new(),
            dump_invalid_vmcb,
            interrupted: None,
            report: GuestActivity::default(),
        }
    }

    /// The VMSA GPA the RMP must record for a vCPU's current VMSA.
    fn expected_gpa(vm: &Vm<SimPlatform>, id: VcpuId) -> Gpa {
        match vm.vcpu(id).map(|v| v.state) {
            Ok(VmsaState::GuestOwned(g)) => g,
            _ => INITIAL_VMSA_GPA,
        }
    }

    /// Bring a vCPU into the guest: vmsa-core's entry checks, then VMRUN. Returns whether it
    /// now runs.
    fn enter(&mut self, vm: &Vm<SimPlatform>, vcpu: u32) -> Result<bool, EntryError> {
        if self.running.contains_key(&vcpu) {
            return Ok(true);
        }
        let id = VcpuId(vcpu);
        match vm.prepare_entry(id)? {
            Entry::Blocked(_) => Ok(false),
            Entry::Run(hpa) => {
                let gpa = Self::expected_gpa(vm, id);
                if let Err(e) = vm.platform().vmrun(hpa, gpa) {
                    // svm_handle_exit: SVM_EXIT_ERR is KVM_EXIT_FAIL_ENTRY, after dump_vmcb.
                    if self.dump_invalid_vmcb {
                        self.dump_vmcb(vm, id);
                    }
                    return Err(e.into());
                }
                self.report.vmruns += 1;
                self.running.insert(vcpu, hpa);
                Ok(true)
            }
        }
    }

    /// KVM's `dump_vmcb` of a vCPU whose VMRUN failed, for an SEV-ES or SNP guest: the save
    /// area `sev_decrypt_vmsa` gives (the page itself before the VMSA is encrypted, else
    /// `SNP_DBG_DECRYPT` / `DBG_DECRYPT` of it if the policy allows debugging), or why none.
    fn dump_vmcb(&mut self, vm: &Vm<SimPlatform>, id: VcpuId) {
        let dump = match vm.decrypt_vmsa(id) {
            Ok(s) => VmcbDump {
                vcpu: id.0,
                save_area: Some(DumpedSaveArea {
                    rip: s.rip,
                    rsp: s.rsp,
                    efer: s.efer,
                    sev_features: s.sev_features,
                }),
                unavailable: None,
            },
            Err(e) => VmcbDump {
                vcpu: id.0,
                save_area: None,
                unavailable: Some(e.to_string()),
            },
        };
        self.report.vmcb_dumps.push(dump);
    }

    pub(super) fn exit(&mut self, vm: &Vm<SimPlatform>, vcpu: u32) {
        if let Some(hpa) = self.running.remove(&vcpu) {
            vm.platform().vmexit(hpa);
        }
    }

    /// KVM's kick: the target leaves the guest, processes its pending request and, if it is
    /// runnable, enters again on its (new) VMSA.
    fn kick(&mut self, vm: &Vm<SimPlatform>, target: u32) -> String {
        self.exit(vm, target);
        match self.enter(vm, target) {
            Ok(true) => format!("vCPU {target} entered"),
            Ok(false) => format!("vCPU {target} halted"),
            Err(e) => {
                let text = format!("vCPU {target} cannot run: {e}");
                self.failed.insert(target, e.into());
                text
            }
        }
    }

    /// Why `vcpu`'s next `KVM_RUN` fails, if it does, taken (its `KVM_RUN` reports it once).
    pub(super) fn take_failure(&mut self, vcpu: u32) -> Option<RunFailure> {
        self.failed.remove(&vcpu)
    }

    /// What the guest sees of a failed operation of `vcpu`'s; a failure of the host beneath
    /// (the machine's memory budget) also fails the vCPU's `KVM_RUN`.
    fn guest_error(&mut self, vcpu: u32, e: SimError) -> String {
        let text = e.to_string();
        if matches!(e, SimError::MemoryBudget { .. }) {
            self.failed.insert(vcpu, RunFailure::Host(e));
        }
        text
    }

    fn exit_cost(vm: &Vm<SimPlatform>) -> CostOp {
        match vm.config().kind {
            VmKind::Snp => CostOp::VmgexitSnp,
            VmKind::SevEs => CostOp::VmgexitEs,
        }
    }

    fn ap_request(&mut self, vm: &Vm<SimPlatform>, req: ApCreationRequest) -> Result<String, String> {
        vm.platform().charge(Self::exit_cost(vm), "AP creation");
        match vm.ap_creation(&req) {
            Ok(done) => {
                self.report.ap_requests += 1;
                Ok(if done.kick {
                    self.kick(vm, done.target.0)
                } else {
                    format!("vCPU {} waits for INIT", done.target)
                })
            }
            Err(e) => {
                self.report.ap_refused += 1;
                let (i1, i2) = e.sw_exit_info();
                Err(format!("{e} (sw_exit_info {i1}/{i2})"))
            }
        }
    }

    /// Run action `index`, `a`, on its vCPU; `faulted` is the page at which its last run took
    /// a memory fault, if it did, where a multi-page access resumes (or at the page a kick
    /// stopped it at, if that is later); `kick` is set when a kick is pending.
    fn act(
        &mut self,
        vm: &Vm<SimPlatform>,
        index: usize,
        a: &GuestAction,
        faulted: Option<Gpa>,
        kick: Option<&AtomicBool>,
    ) -> Result<(Acted, String), String> {
        let interrupted = self
            .interrupted
            .take()
            .and_then(|(i, page)| (i == index).then_some(page));
        let vcpu = a.vcpu();
        if !vm.vcpu_ids().contains(&VcpuId(vcpu)) {
            return Err(format!("no vCPU {vcpu}"));
        }
        let entered = match self.enter(vm, vcpu) {
            Ok(entered) => entered,
            Err(e) => {
                // The action never runs; the vCPU's KVM_RUN fails with the entry's error, as
                // after a kick.
                let text = format!("vCPU {vcpu} cannot run: {e}");
                self.failed.insert(vcpu, e.into());
                return Err(text);
            }
        };
        if !entered {
            let mp = vm.vcpu(VcpuId(vcpu)).map(|v| v.mp_state).ok();
            return Err(format!("vCPU {vcpu} is not runnable ({mp:?})"));
        }
        let p = vm.platform();
        let done = |detail: String| (Acted::Done, detail);
        match *a {
            GuestAction::Pvalidate {
                gpa,
                pages,
                size,
                validate,
                ..
            } => p
                .pvalidate_range(Gpa(gpa), pages, size, validate)
                .map(|(changed, same)| {
                    done(match (changed, same) {
                        (1, 0) => "ok".into(),
                        (0, 1) => "no update".into(),
                        _ => format!("{changed} pages ok, {same} no update"),
                    })
                })
                .map_err(|e| self.guest_error(vcpu, e)),
            GuestAction::Write {
                gpa,
                pages,
                byte,
                private,
                ..
            } => {
                let first = resume_page(gpa, pages, faulted).max(interrupted.unwrap_or(0));
                let stop = || kick.is_some_and(|k| k.load(Ordering::SeqCst));
                match each_page(gpa, pages, PAGE_SIZE, first, stop, |g| {
                    p.guest_write(g, &[byte; PAGE_SIZE as usize], private)
                }) {
                    Ok(Paged::Done(d)) => Ok(done(d)),
                    Ok(Paged::Stopped(at)) => {
                        self.interrupted = Some((index, at));
                        Ok((Acted::Interrupted, String::new()))
                    }
                    Err(SimError::SharedMemory { gpa, .. } | SimError::PrivateMemory { gpa, .. }) => Ok((
                        Acted::Fault(Conversion {
                            gpa: Gpa(gpa.0 & !(PAGE_SIZE - 1)),
                            size: PAGE_SIZE,
                            private,
                        }),
                        String::new(),
                    )),
                    Err(e) => Err(self.guest_error(vcpu, e)),
                }
            }
            GuestAction::WriteVmsa {
                gpa,
                rip,
                rsp,
                sev_features,
                ..
            } => {
                let f = sev_features.unwrap_or(vm.config().vmsa_features());
                let img = vmsa_image(rip, rsp, f);
                p.guest_write(Gpa(gpa), img.as_page(), true)
                    .map(|()| done(format!("VMSA rip {rip:#x}")))
                    .map_err(|e| self.guest_error(vcpu, e))
            }
            GuestAction::MakeVmsa { gpa, vmsa, .. } => p
                .rmpadjust(Gpa(gpa), 1, 0, vmsa)
                .map(|()| done("ok".into()))
                .map_err(|e| self.guest_error(vcpu, e)),
            GuestAction::ApCreate {
                apic_id,
                gpa,
                on_init,
                sev_features,
                ..
            } => {
                let req = if on_init { AP_CREATE_ON_INIT } else { AP_CREATE };
                let f = sev_features.unwrap_or(vm.config().vmsa_features());
                self.ap_request(
                    vm,
                    ApCreationRequest::new(VcpuId(vcpu), req, apic_id, gpa, Some(f)),
                )
                .map(done)
            }
            GuestAction::ApDestroy { apic_id, .. } => self
                .ap_request(
                    vm,
                    ApCreationRequest::new(VcpuId(vcpu), AP_DESTROY, apic_id, 0, None),
                )
                .map(done),
            GuestAction::SendInit { apic_id, .. } => {
                self.exit(vm, apic_id);
                vm.init_vcpu(VcpuId(apic_id)).map_err(|e| e.to_string())?;
                Ok(done(self.kick(vm, apic_id)))
            }
            GuestAction::PageState { gpa, pages, to, .. } => {
                p.charge(Self::exit_cost(vm), "page state change");
                if vm.config().kind != VmKind::Snp {
                    // sev_es_validate_vmgexit: `case SVM_VMGEXIT_PSC: if (!sev_snp_guest(..))
                    // goto vmgexit_err`, which sets GHCB_ERR_MISSING_INPUT (the exit code is a
                    // known one) and resumes the guest: no exit to user space.
                    return Err(format!(
                        "GHCB page state change refused: not an SNP guest (sw_exit_info 2/{})",
                        vmsa_core::ghcb::GHCB_ERR_MISSING_INPUT
                    ));
                }
                p.charge(CostOp::ExitToUserspace, "KVM_HC_MAP_GPA_RANGE");
                let size = pages
                    .checked_mul(PAGE_SIZE)
                    .ok_or_else(|| format!("{pages} pages overflow the address space"))?;
                Ok((
                    Acted::Convert(Conversion {
                        gpa: Gpa(gpa),
                        size,
                        private: to == PscTarget::Private,
                    }),
                    String::new(),
                ))
            }
            GuestAction::Run { .. } => Ok(done("running".into())),
            GuestAction::TripleFault { .. } => {
                self.exit(vm, vcpu);
                Ok((Acted::Shutdown, "shut down (triple fault)".into()))
            }
            GuestAction::Terminate {
                reason_set,
                reason_code,
                ..
            } => {
                p.charge(Self::exit_cost(vm), "termination request");
                Ok((
                    Acted::Terminate {
                        reason_set,
                        reason_code,
                    },
                    format!("terminated (reason set {reason_set}, code {reason_code})"),
                ))
            }
            GuestAction::Hlt { .. } => {
                self.exit(vm, vcpu);
                vm.set_mp_state(VcpuId(vcpu), MpState::Halted)
                    .map_err(|e| e.to_string())?;
                Ok(done("halted".into()))
            }
        }
    }

    /// Execute action `index` of the script as the guest would. A failure is recorded (the
    /// guest sees it) rather than returned; a conversion request is recorded when the VMM
    /// answers it ([`Cpus::record`]); a memory fault records nothing (the action runs again).
    /// `faulted` is the page at which this action last took a memory fault (the VMM has since
    /// answered it): the action resumes there, as a `rep stos` restarts at its current
    /// iteration, so each page of it is accessed once; a fault at that same page again is the
    /// guest's error, as the VMM did not
    /// convert what the fault asked for; a fault at another page (the next page of a
    /// multi-page access) is a new exit, as KVM's `kvm_mmu_prepare_memory_fault_exit` exits
    /// once per faulting access. `kick` is the vCPU's pending-kick flag, if a kick can reach
    /// it: a long access that finds it set stops between pages ([`Acted::Interrupted`],
    /// nothing recorded) and its next step resumes at the page it stopped at.
    pub fn step(
        &mut self,
        vm: &Vm<SimPlatform>,
        index: usize,
        a: &GuestAction,
        faulted: Option<Gpa>,
        kick: Option<&AtomicBool>,
    ) -> Acted {
        match self.act(vm, index, a, faulted, kick) {
            Ok((Acted::Done, detail)) => {
                self.record(index, a, Ok(detail));
                Acted::Done
            }
            Ok((Acted::Fault(range), _)) if faulted == Some(range.gpa) => {
                let to = if range.private { "private" } else { "shared" };
                self.record(
                    index,
                    a,
                    Err(format!(
                        "memory fault at {} again: the VMM did not make it {to}",
                        range.gpa
                    )),
                );
                Acted::Done
            }
            Ok((end @ (Acted::Terminate { .. } | Acted::Shutdown), detail)) => {
                self.record(index, a, Ok(detail));
                end
            }
            Ok((exit, _)) => exit,
            Err(e) => {
                self.record(index, a, Err(e));
                Acted::Done
            }
        }
    }

    /// Record how action `index` ended.
    pub fn record(&mut self, index: usize, a: &GuestAction, result: Result<String, String>) {
        let (error, detail) = match result {
            Ok(d) => (None, d),
            Err(e) => (Some(e), String::new()),
        };
        self.report.steps.push(GuestStep {
            index,
            action: a.name().to_owned(),
            vcpu: a.vcpu(),
            error,
            detail,
        });
    }

    /// Take every vCPU out of the guest and return what the steps did.
    pub fn finish(&mut self, vm: &Vm<SimPlatform>) -> GuestActivity {
        let ids: Vec<u32> = self.running.keys().copied().collect();
        for v in ids {
            self.exit(vm, v);
        }
        std::mem::take(&mut self.report)
    }
}
