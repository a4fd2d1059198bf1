//! The one launch-and-run flow, generic over the host interface: the same code drives the
//! simulator, KVM's VMSA-image mode and a real SEV-SNP KVM.
//!
//! In KVM's order: create the VM, add its memory (guest_memfd-backed), create
//! every vCPU and set its initial state, start the launch, measure every image range, (SEV-ES)
//! encrypt the VMSAs, finish. Then ([`run_vcpus`]) one thread per vCPU loops on
//! [`Vcpu::run`] and handles the exits a VMM must handle: conversions between private and
//! shared memory, the built-in guests' debug ports, HLT, the guest's termination request,
//! shutdown. The main thread waits on an event loop (event-manager) for the vCPU threads and
//! one watchdog timer (vmm-sys-util's `TimerFd`); whoever ends the run kicks every vCPU out of
//! `run`. Finally the vCPUs are dropped and the VM torn down, whatever happened before: nothing
//! the host allocated outlives the run.

use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use serde::Serialize;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::timerfd::TimerFd;
use vmsa_core::{Gpa, SevEsSaveArea, SnpPageType, VmKind};
use vmsa_host::{
    Capabilities, Conversion, Errno, HostReport, Hypervisor, HypervisorError, Kick, LaunchUpdate,
    MemoryRegion, TermReason, Vcpu, VcpuError, VcpuExit, Vm, VmError, VmSpec, ports,
};

use super::progress::Progress;

/// What the flow creates and launches.
#[derive(Debug)]
pub struct Launch<'a> {
    /// The VM to create.
    pub spec: VmSpec,
    /// Its memory slots.
    pub memory: Vec<MemoryRegion>,
    /// The guest policy.
    pub policy: u64,
    /// The image ranges to measure, in order, with their contents.
    pub updates: Vec<LaunchUpdate<'a>>,
    /// Each vCPU's initial state, by APIC ID (0 is the BSP).
    pub vmsas: &'a [Box<SevEsSaveArea>],
    /// The supplied-VMSA launch mode (`spec.supplied_vmsa`): the GPA where the BSP's VMSA
    /// (`vmsas[0]`) is put into guest memory by a launch update of page type VMSA, after the
    /// image ranges. No vCPU gets its state through `set_state` then: the BSP's is the page,
    /// the APs' come from the guest's AP creation. `None`: KVM's classic mode, or (with
    /// `spec.supplied_vmsa`) a launch whose `updates` carry the BSP's VMSA page themselves, in
    /// the order its image gives (an IGVM file's VP context).
    pub supplied_vmsa: Option<Gpa>,
    /// After the launch, move the guest into a second VM and run it there (intra-host
    /// migration, `KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM`, as a VMM's live update does; SEV-ES
    /// only): the destination gets the same memory slots and as many vCPUs, then the
    /// context.
    pub migrate: bool,
}

impl<'a> Launch<'a> {
    /// An SEV-SNP guest without extra SEV features: `memory` bytes of guest_memfd-backed RAM
    /// from GPA 0 (slot 0), one NORMAL image at `gpa`, launched with `policy`.
    pub fn snp_image(
        memory: u64,
        policy: u64,
        gpa: Gpa,
        image: &'a [u8],
        vmsas: &'a [Box<SevEsSaveArea>],
    ) -> Self {
        Self {
            spec: VmSpec::snp(0),
            memory: vec![MemoryRegion::ram(memory)],
            policy,
            updates: vec![LaunchUpdate {
                gpa,
                len: image.len() as u64,
                page_type: SnpPageType::Normal,
                data: Some(image),
            }],
            vmsas,
            supplied_vmsa: None,
            migrate: false,
        }
    }

    /// This launch in the supplied-VMSA mode, the BSP's VMSA at `gpa` (4 KiB but not 2 MiB
    /// aligned, inside guest memory, outside the image): the launch digest then holds that one
    /// VMSA page and no other, whatever the vCPU count.
    pub fn with_supplied_vmsa(self, gpa: Gpa) -> Self {
        Self {
            spec: self.spec.with_supplied_vmsa(),
            supplied_vmsa: Some(gpa),
            ..self
        }
    }

    /// The page the VMM supplies for the BSP: `vmsas[0]` as KVM's `sev_es_sync_vmsa` would
    /// write it (the VM's SEV_FEATURES with SNP_ACTIVE, the FPU state), so a supplied launch
    /// measures the very page the classic mode measures for the BSP.
    pub fn bsp_vmsa_page(&self) -> Option<Box<SevEsSaveArea>> {
        let features = self.spec.vmsa_features | vmsa_core::layout::SEV_FEAT_SNP_ACTIVE;
        self.vmsas.first().map(|v| Box::new(v.synced(features, true)))
    }
}

/// Why the flow could not create the VM, or its event loop failed (the VM is then torn down
/// first); everything else ends in a report.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// The host refused to create the VM.
    #[error(transparent)]
    Create(#[from] HypervisorError),
    /// An eventfd, timerfd or epoll call of the event loop failed.
    #[error("event loop: {what}: {source}")]
    EventLoop {
        /// The call.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A step of creating or launching the VM that failed (the VM is still torn down).
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A VM call failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A vCPU call failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

/// Why moving the launched guest into a second VM failed (the guest then does not run; both
/// VMs are still torn down).
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The host could not create the destination.
    #[error("creating the migration target: {0}")]
    Create(#[from] HypervisorError),
    /// A call on the destination failed: its memory, its vCPUs, or the move itself.
    #[error("migration target: {0}")]
    Vm(#[from] VmError),
}

/// How the guest's run ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "end", rename_all = "snake_case")]
pub enum RunEnd {
    /// vCPU 0 wrote the done port.
    Done,
    /// A vCPU asked to terminate (the GHCB termination request). JSON: `reason_set` and
    /// `reason_code` beside `vcpu` when the reason is known, neither when it is not.
    Terminated {
        /// The vCPU.
        vcpu: u32,
        /// The guest's reason; `None` for a request through the GHCB page, whose reason KVM
        /// does not report ([`VcpuExit::Terminate`]).
        #[serde(flatten)]
        reason: Option<TermReason>,
    },
    /// A vCPU triple-faulted.
    Shutdown {
        /// The vCPU.
        vcpu: u32,
    },
    /// The guest reported a failed step on the fail port.
    GuestFailed {
        /// The vCPU.
        vcpu: u32,
        /// The step code.
        code: u32,
    },
    /// A vCPU call failed (or the VMM's own loop did, reported as vCPU 0's).
    Error {
        /// The vCPU.
        vcpu: u32,
        /// What failed, with its causes; a vCPU's error names the vCPU itself
        /// ([`VcpuError`]'s message starts with it).
        error: String,
    },
    /// The watchdog fired first.
    Watchdog {
        /// Its timeout.
        after_ms: u64,
    },
}

impl std::fmt::Display for RunEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Done => write!(f, "vCPU 0 reported done"),
            Self::Terminated {
                vcpu,
                reason: Some(reason),
            } => write!(f, "vCPU {vcpu} asked to terminate ({reason})"),
            Self::Terminated { vcpu, reason: None } => write!(
                f,
                "vCPU {vcpu} asked to terminate (through its GHCB page; KVM does not report the reason)"
            ),
            Self::Shutdown { vcpu } => write!(f, "vCPU {vcpu} shut down (triple fault)"),
            Self::GuestFailed { vcpu, code } => write!(f, "vCPU {vcpu} reported failed step {code}"),
            // The error names its vCPU already ("vCPU 2: KVM_RUN: ...").
            Self::Error { error, .. } => f.write_str(error),
            Self::Watchdog { after_ms } => write!(
                f,
                "the guest did not finish within {after_ms} ms (watchdog); every vCPU was kicked out"
            ),
        }
    }
}

/// What one vCPU's thread saw.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VcpuExits {
    /// The vCPU.
    pub vcpu: u32,
    /// Times `run` returned.
    pub runs: u64,
    /// Conversions the guest asked for (MAP_GPA_RANGE) and memory faults served.
    pub conversions: u64,
    /// Conversions the host refused (the guest got an error).
    pub conversions_refused: u64,
    /// Debug-port writes.
    pub io: u64,
    /// HLT exits.
    pub halts: u64,
    /// Kicks that interrupted a run.
    pub interrupted: u64,
}

/// What the run did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunOutcome {
    /// How it ended.
    pub end: RunEnd,
    /// Per-vCPU exit counts, by APIC ID.
    pub vcpus: Vec<VcpuExits>,
}

/// What the whole flow did.
#[derive(Debug)]
pub struct FlowReport {
    /// Why creating or launching failed, if it did (the guest then did not run).
    pub launch_error: Option<LaunchError>,
    /// With [`Launch::migrate`]: why moving the guest failed, if it did (the guest then did
    /// not run).
    pub migration_error: Option<MigrationError>,
    /// The run, if the launch finished.
    pub run: Option<RunOutcome>,
    /// The host's report at teardown (with [`Launch::migrate`], of both VMs:
    /// [`HostReport::merged`]).
    pub host: HostReport,
}

/// Run `launch` on `host` to the end: create, launch, run every vCPU under `watchdog`, tear
/// down. `phase` is called as each phase (create, launch, run, teardown) ends.
pub fn run<H: Hypervisor>(
    host: &H,
    launch: &Launch<'_>,
    watchdog: Duration,
    progress: &Progress,
    phase: &mut dyn FnMut(&'static str),
) -> Result<FlowReport, FlowError> {
    let mut vm = host.create_vm(launch.spec)?;
    let mut vcpus = Vec::with_capacity(launch.vmsas.len());
    let created = create(&mut vm, launch, host.capabilities(), &mut vcpus);
    phase("create");
    progress.phase("launch", launch.updates.len() as u64 + 1);
    let launched = created.and_then(|()| self::launch(&mut vm, launch, progress));
    phase("launch");
    // The VM torn down first, with migration: the dead source after a move, or the unused
    // destination after a failed one.
    let mut first = None;
    let mut migration_error = None;
    if launched.is_ok() && launch.migrate {
        progress.message("migration");
        match migrate(host, &mut vm, launch) {
            Ok((target, target_vcpus)) => {
                drop(std::mem::replace(&mut vcpus, target_vcpus));
                first = Some(std::mem::replace(&mut vm, target).teardown());
            }
            Err(FailedMigration { error, target }) => {
                migration_error = Some(error);
                if let Some((target, target_vcpus)) = target {
                    drop(target_vcpus);
                    first = Some(target.teardown());
                }
            }
        }
        phase("migrate");
    }
    // An event loop that fails is the run's error, but only once the VM is torn down.
    let (run, run_error) = match &launched {
        Ok(()) if migration_error.is_none() => {
            progress.counted_phase("guest", "vCPU exits");
            match run_vcpus(&vm, vcpus, watchdog, progress) {
                Ok(outcome) => (Some(outcome), None),
                Err(e) => (None, Some(e)),
            }
        }
        _ => {
            drop(vcpus);
            (None, None)
        }
    };
    phase("run");
    progress.message("teardown");
    let last = vm.teardown();
    let report = match first {
        Some(first) => HostReport::merged(first, last),
        None => last,
    };
    phase("teardown");
    progress.finish();
    if let Some(e) = run_error {
        return Err(e);
    }
    Ok(FlowReport {
        launch_error: launched.err(),
        migration_error,
        run,
        host: report,
    })
}

/// A VM and its vCPUs.
type WithVcpus<V> = (V, Vec<<V as Vm>::Vcpu>);

/// Why a migration failed, and the destination as far as it got (to be torn down).
struct FailedMigration<V: Vm> {
    error: MigrationError,
    target: Option<WithVcpus<V>>,
}

/// Intra-host migration of the launched `source` (KVM's order, as `sev_migrate_tests.c` does
/// it): create the destination without an encryption context, give it the same memory slots
/// and as many vCPUs, then move the context (`KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM`). The
/// destination and its vCPUs, or why not and what of the destination exists (for teardown).
fn migrate<H: Hypervisor>(
    host: &H,
    source: &mut H::Vm,
    launch: &Launch<'_>,
) -> Result<WithVcpus<H::Vm>, FailedMigration<H::Vm>> {
    let mut target = host
        .create_migration_target(launch.spec.kind)
        .map_err(|e| FailedMigration {
            error: e.into(),
            target: None,
        })?;
    let mut vcpus = Vec::with_capacity(launch.vmsas.len());
    let set_up = (|| {
        for r in &launch.memory {
            target.add_memory(*r)?;
        }
        for id in (0u32..).take(launch.vmsas.len()) {
            vcpus.push(target.create_vcpu(id)?);
        }
        target.move_enc_context_from(source)
    })();
    match set_up {
        Ok(()) => Ok((target, vcpus)),
        Err(e) => Err(FailedMigration {
            error: e.into(),
            target: Some((target, vcpus)),
        }),
    }
}

/// The first part of [`run`], for a caller that drives the VM itself: `launch`'s memory (made
/// private where the host, whose capabilities are `caps`, has private memory: an SNP guest's
/// RAM is private from the start, and launch updates need it so), then every vCPU with its
/// initial state, pushed onto `vcpus`.
pub fn create<V: Vm>(
    vm: &mut V,
    launch: &Launch<'_>,
    caps: &Capabilities,
    vcpus: &mut Vec<V::Vcpu>,
) -> Result<(), LaunchError> {
    let private = launch.spec.kind == VmKind::Snp && caps.private_memory;
    for r in &launch.memory {
        vm.add_memory(*r)?;
        if private && r.guest_memfd {
            vm.set_memory_attributes(Conversion {
                gpa: r.gpa,
                size: r.size,
                private: true,
            })?;
        }
    }
    for (id, state) in (0u32..).zip(launch.vmsas) {
        let mut vcpu = vm.create_vcpu(id)?;
        if !launch.spec.supplied_vmsa {
            vcpu.set_state(state)?;
        }
        vcpus.push(vcpu);
    }
    Ok(())
}

/// The second part of [`run`], after [`create`]: start, every image range, (SEV-ES) the
/// VMSAs, finish.
pub fn launch<V: Vm>(vm: &mut V, launch: &Launch<'_>, progress: &Progress) -> Result<(), LaunchError> {
    vm.launch_start(launch.policy)?;
    for u in &launch.updates {
        progress.message(format!("{:?} pages at {}", u.page_type, u.gpa));
        vm.launch_update(*u)?;
        progress.inc(1);
    }
    if let (Some(gpa), Some(page)) = (launch.supplied_vmsa, launch.bsp_vmsa_page()) {
        progress.message(format!("the BSP's VMSA at {gpa}"));
        vm.launch_update(LaunchUpdate {
            gpa,
            len: vmsa_core::PAGE_SIZE,
            page_type: SnpPageType::Vmsa,
            data: Some(page.as_page()),
        })?;
    }
    progress.message("VMSAs");
    if launch.spec.kind == VmKind::SevEs {
        vm.launch_update_vmsas()?;
    }
    vm.launch_finish()?;
    progress.inc(1);
    Ok(())
}

/// The state the vCPU threads and the control loop share.
struct Control {
    stop: AtomicBool,
    /// vCPU threads that have left their loop.
    left: AtomicUsize,
    end: Mutex<Option<RunEnd>>,
    /// Written by a vCPU thread when it ends the run or leaves.
    wake: EventFd,
}

impl Control {
    /// End the run for `why` (the first reason wins) and wake the control loop.
    fn end(&self, why: RunEnd) {
        let mut end = self.end.lock().unwrap_or_else(|p| p.into_inner());
        end.get_or_insert(why);
        self.stop.store(true, Ordering::SeqCst);
        // An eventfd counter only overflows after 2^64 - 2 writes.
        let _ = self.wake.write(1);
    }
}

/// Counts a vCPU thread out when it leaves its loop, panicking or not, and wakes the control
/// loop (counted before the wake, so the loop that wakes sees it).
struct Leave<'a>(&'a Control);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.left.fetch_add(1, Ordering::SeqCst);
        let _ = self.0.wake.write(1);
    }
}

/// One vCPU's loop: run, handle the exit, until the run ends.
fn vcpu_loop<V: Vm>(vm: &V, vcpu: &mut V::Vcpu, control: &Control, progress: &Progress) -> VcpuExits {
    let _leave = Leave(control);
    let id = vcpu.id();
    let mut n = VcpuExits {
        vcpu: id,
        ..VcpuExits::default()
    };
    while !control.stop.load(Ordering::SeqCst) {
        let exit = vcpu.run();
        n.runs += 1;
        progress.inc(1);
        match exit {
            Ok(VcpuExit::MapGpaRange(range)) => {
                n.conversions += 1;
                let answer = vm.set_memory_attributes(range).map_err(|e| {
                    n.conversions_refused += 1;
                    e.refusal().map_or(Errno::EIO, |r| r.errno)
                });
                if let Err(e) = vcpu.complete_conversion(answer) {
                    control.end(error_end(id, &e));
                }
            }
            Ok(VcpuExit::MemoryFault(range)) => {
                n.conversions += 1;
                if let Err(e) = vm.set_memory_attributes(range) {
                    control.end(error_end(id, &e));
                }
            }
            Ok(VcpuExit::IoOut { port, data, .. }) => {
                n.io += 1;
                match port {
                    ports::DONE if id == 0 => control.end(RunEnd::Done),
                    ports::FAIL => control.end(RunEnd::GuestFailed { vcpu: id, code: data }),
                    _ => {}
                }
            }
            Ok(VcpuExit::Halt) => n.halts += 1,
            Ok(VcpuExit::Terminate { reason }) => control.end(RunEnd::Terminated { vcpu: id, reason }),
            Ok(VcpuExit::Shutdown) => control.end(RunEnd::Shutdown { vcpu: id }),
            Ok(VcpuExit::Interrupted) => n.interrupted += 1,
            Err(e) => control.end(error_end(id, &e)),
        }
    }
    n
}

fn error_end(vcpu: u32, e: &dyn std::error::Error) -> RunEnd {
    RunEnd::Error {
        vcpu,
        error: super::error_chain(e),
    }
}

/// The control loop's subscriber: the vCPU threads' eventfd and the watchdog.
struct Waiter {
    wake: EventFd,
    watchdog: TimerFd,
    woke: std::rc::Rc<std::cell::Cell<(bool, bool)>>,
}

impl MutEventSubscriber for Waiter {
    fn process(&mut self, events: Events, _ops: &mut EventOps<'_>) {
        let (mut wake, mut dog) = self.woke.get();
        if events.fd() == self.wake.as_raw_fd() {
            let _ = self.wake.read();
            wake = true;
        } else if events.fd() == self.watchdog.as_raw_fd() {
            let _ = self.watchdog.wait();
            dog = true;
        }
        self.woke.set((wake, dog));
    }

    fn init(&mut self, ops: &mut EventOps<'_>) {
        // Registration fails only if epoll itself is broken; `run` then reports it.
        let _ = ops.add(Events::new(&self.wake, EventSet::IN));
        let _ = ops.add(Events::new(&self.watchdog, EventSet::IN));
    }
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> FlowError {
    move |source| FlowError::EventLoop { what, source }
}

pub(super) fn errno(e: vmm_sys_util::errno::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

/// An event-manager error as the OS error it carries (its other errors, which this loop's one
/// subscriber cannot cause, as their own text).
fn event_manager_error(e: event_manager::Error) -> std::io::Error {
    match e {
        event_manager::Error::Epoll(e) => errno(e),
        other => std::io::Error::other(other.to_string()),
    }
}

/// Run every vCPU on its own thread until the run ends, under one watchdog.
pub fn run_vcpus<V: Vm>(
    vm: &V,
    vcpus: Vec<V::Vcpu>,
    watchdog: Duration,
    progress: &Progress,
) -> Result<RunOutcome, FlowError> {
    let wake = EventFd::new(EFD_NONBLOCK).map_err(os("eventfd"))?;
    let control = Control {
        stop: AtomicBool::new(false),
        left: AtomicUsize::new(0),
        end: Mutex::new(None),
        wake: wake.try_clone().map_err(os("eventfd clone"))?,
    };
    let mut timer = TimerFd::new().map_err(|e| os("timerfd")(errno(e)))?;
    timer
        .reset(watchdog, None)
        .map_err(|e| os("timerfd arm")(errno(e)))?;
    let woke = std::rc::Rc::new(std::cell::Cell::new((false, false)));
    let mut em: EventManager<Waiter> =
        EventManager::new().map_err(|e| os("epoll")(event_manager_error(e)))?;
    em.add_subscriber(Waiter {
        wake,
        watchdog: timer,
        woke: woke.clone(),
    });
    let kicks: Vec<<V::Vcpu as Vcpu>::Kick> = vcpus.iter().map(Vcpu::kicker).collect();
    let kick_all = || kicks.iter().for_each(Kick::kick);
    let n = vcpus.len();
    let (polled, mut counts) = std::thread::scope(|s| {
        let control = &control;
        let mut handles = Vec::with_capacity(n);
        for (i, mut vcpu) in vcpus.into_iter().enumerate() {
            // A thread the host will not start (out of threads or address space) ends the
            // run; the threads already started are kicked out below. (`Scope::spawn` would
            // panic, and the scope then waited forever for vCPUs parked until AP creation.)
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn_scoped(s, move || vcpu_loop(vm, &mut vcpu, control, progress));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    control.end(RunEnd::Error {
                        vcpu: u32::try_from(i).unwrap_or(u32::MAX),
                        error: format!("vCPU {i}: its thread could not be started: {e}"),
                    });
                    break;
                }
            }
        }
        let mut polled = Ok(());
        let mut kicked = false;
        while control.left.load(Ordering::SeqCst) < handles.len() {
            if let Err(e) = em.run() {
                polled = Err(os("epoll_wait")(event_manager_error(e)));
                control.end(RunEnd::Error {
                    vcpu: 0,
                    error: "the VMM's event loop failed".into(),
                });
            }
            let (_, dog) = woke.replace((false, false));
            if dog {
                control.end(RunEnd::Watchdog {
                    after_ms: watchdog.as_millis() as u64,
                });
            }
            if control.stop.load(Ordering::SeqCst) && !kicked {
                kick_all();
                kicked = true;
            }
        }
        let counts: Vec<VcpuExits> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect();
        (polled, counts)
    });
    // vCPUs whose thread never started made no exits.
    counts.resize_with(n, VcpuExits::default);
    polled?;
    let end = control
        .end
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .unwrap_or(RunEnd::Error {
            vcpu: 0,
            error: "every vCPU thread left without ending the run".into(),
        });
    Ok(RunOutcome { end, vcpus: counts })
}

#[cfg(test)]
mod tests {
    use backend_sim::host::SimHost;
    use backend_sim::{GuestScript, Machine, MachineConfig};
    use vmsa_core::{SNP_POLICY_RSVD_MBO, SevEsSaveArea};

    use super::*;

    #[test]
    fn a_vcpus_error_end_names_the_vcpu_once() {
        let e = VcpuError::host(2, "KVM_RUN", std::io::Error::other("entry failed"));
        let end = error_end(2, &e);
        assert_eq!(end.to_string(), "vCPU 2: KVM_RUN: entry failed");
        assert!(matches!(end, RunEnd::Error { vcpu: 2, .. }));
    }

    /// A termination's text and JSON: the known reason as before, and an unknown one (a request
    /// through the GHCB page) said so, without made-up reason fields.
    #[test]
    fn a_termination_end_says_whether_its_reason_is_known() {
        let known = RunEnd::Terminated {
            vcpu: 1,
            reason: Some(TermReason { set: 1, code: 2 }),
        };
        assert_eq!(
            known.to_string(),
            "vCPU 1 asked to terminate (GHCB reason set 1, code 2)"
        );
        assert_eq!(
            serde_json::to_value(&known).unwrap(),
            serde_json::json!({"end": "terminated", "vcpu": 1, "reason_set": 1, "reason_code": 2})
        );
        let unknown = RunEnd::Terminated {
            vcpu: 1,
            reason: None,
        };
        assert_eq!(
            unknown.to_string(),
            "vCPU 1 asked to terminate (through its GHCB page; KVM does not report the reason)"
        );
        assert_eq!(
            serde_json::to_value(&unknown).unwrap(),
            serde_json::json!({"end": "terminated", "vcpu": 1})
        );
    }

    /// A move the host refuses (an SNP source: `sev_vm_move_enc_context_from`'s EINVAL)
    /// leaves the guest unrun and both VMs torn down, their reports merged: nothing is left on
    /// the machine.
    #[test]
    fn a_refused_migration_tears_both_vms_down() {
        let machine = Machine::new(MachineConfig::default());
        let host = SimHost::new(machine.clone(), GuestScript::default());
        let vmsas = vec![SevEsSaveArea::boxed(), SevEsSaveArea::boxed()];
        let image = [0xf4u8; 4096];
        let launch = Launch {
            migrate: true,
            ..Launch::snp_image(1 << 20, SNP_POLICY_RSVD_MBO, Gpa(0x1000), &image, &vmsas)
        };
        let report = run(
            &host,
            &launch,
            Duration::from_secs(60),
            &Progress::hidden(),
            &mut |_| {},
        )
        .unwrap();
        assert!(report.launch_error.is_none());
        let e = report.migration_error.expect("an SNP context does not move");
        let refusal = match &e {
            MigrationError::Vm(v) => v.refusal(),
            MigrationError::Create(_) => None,
        };
        assert_eq!(refusal.map(|r| r.errno), Some(Errno::EINVAL), "{e}");
        assert!(report.run.is_none(), "the guest does not run");
        let t = report.host.teardown;
        assert_eq!(t.vcpus, 4, "the source's and the destination's vCPUs");
        assert_eq!(t.frames_still_allocated.seen(), Some(&0));
        assert!(machine.guests().is_empty());
        assert_eq!(machine.allocated_frames(), 0);
    }
}
