//! The vCPU threads of a VMSA-image VM: entry through vmsa-core, loading the VMSA the VMCB
//! points at, the exit loop, and the GHCB doorbell.
//!
//! Each vCPU has its own thread and [`VcpuControl`]. Before every entry the thread asks
//! vmsa-core ([`vmsa_core::Vm::prepare_entry`]), which applies a pending AP-creation update
//! and answers `Run(hpa)` or `Blocked`. On `Run`, after a reset (first entry or an
//! AP-creation kick), the thread reads the VMSA page at `hpa` in the frame space — a host
//! VMSA vmsa-core launched, or a guest-owned page resolved through guest_memfd — loads it into
//! the KVM vCPU ([`crate::vmsa_regs::load`]) and makes it runnable (`KVM_SET_MP_STATE`), as
//! the hardware would VMRUN from that page. `Blocked` threads sleep until kicked.
//!
//! A doorbell (guest WRMSR of the GHCB MSR) is handled on the requester's thread: the GHCB is
//! read from guest memory, pre-checked, handed to [`vmsa_core::Vm::ap_creation`], answered in
//! `sw_exit_info_1/2`, and the target is kicked; the requester waits until the target has
//! applied the request, so ownership histories are deterministic (KVM itself does not wait;
//! the guest cannot tell the difference). Two vCPUs that target each other at the same
//! moment would each wait for the other until the kick timeout, which is then reported as
//! [`VcpuError::KickTimeout`]; the built-in guest only creates APs from the BSP.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MP_STATE_RUNNABLE, kvm_mp_state};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::Serialize;
use vmsa_core::{ApCreationRequest, Entry, MpState, VcpuId, Vm};

use crate::error::{IoctlError, errno_of};
use crate::frames::FrameError;
use crate::ghcb::{self, GHCB_MSR, GhcbRequest, ReadGhcb};
use crate::gmem::{GmemError, GuestRam};
use crate::guest::layout::{PARAMS_GPA, params, ports};
use crate::guest::program::MSR_SEV_STATUS;
use crate::kick::KickState;
use crate::platform::KvmPlatform;
use crate::vmsa_regs::{self, RegsError};
use crate::watchdog::SignalTarget;

/// Why a vCPU stopped or an entry failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum VcpuError {
    /// An ioctl failed.
    #[error(transparent)]
    Ioctl(#[from] IoctlError),
    /// The VMSA could not be loaded into the vCPU.
    #[error("loading the VMSA: {0}")]
    Regs(#[from] RegsError),
    /// The VMSA page could not be read.
    #[error("reading the VMSA page: {0}")]
    Frame(#[from] FrameError),
    /// Guest memory could not be accessed.
    #[error("guest memory: {0}")]
    Gmem(#[from] GmemError),
    /// vmsa-core refused the entry (e.g. a runnable vCPU with no valid VMSA, which makes
    /// KVM_RUN fail with EINVAL on SNP).
    #[error("vmsa-core refused entry: {message}")]
    Entry {
        /// vmsa-core's error message.
        message: String,
    },
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`).
    #[error("guest shutdown (triple fault) at rip {rip:#x}")]
    Shutdown {
        /// RIP after the exit.
        rip: u64,
    },
    /// `KVM_EXIT_INTERNAL_ERROR`, usually an instruction the host's emulator does not know.
    #[error("KVM internal error, suberror {suberror}, data {data:x?}")]
    InternalError {
        /// `internal.suberror` (1 = emulation failure).
        suberror: u32,
        /// `internal.data[..ndata]`.
        data: Vec<u64>,
    },
    /// `KVM_EXIT_FAIL_ENTRY`.
    #[error("VM entry failed: hardware reason {reason:#x} on cpu {cpu}")]
    FailEntry {
        /// `hardware_entry_failure_reason`.
        reason: u64,
        /// The CPU.
        cpu: u32,
    },
    /// An exit this VMM does not handle.
    #[error("unexpected exit: {exit}")]
    UnexpectedExit {
        /// The exit, as kvm-ioctls names it.
        exit: String,
    },
    /// The guest reported a failed step through the FAIL port.
    #[error("the guest reported failure {code} (GHCB answer {resp1:#x}/{resp2:#x})")]
    GuestFailed {
        /// The step code.
        code: u32,
        /// sw_exit_info_1 the guest saw.
        resp1: u64,
        /// sw_exit_info_2 the guest saw.
        resp2: u64,
    },
    /// The GHCB MSR was written with a GPA that is not in guest memory.
    #[error("GHCB doorbell with GPA {gpa:#x}, which is not page-aligned guest memory")]
    GhcbOutsideMemory {
        /// The value written.
        gpa: u64,
    },
    /// The GHCB MSR was written with a GHCB MSR-protocol request this VMM does not serve.
    #[error("unsupported GHCB MSR protocol request {value:#x} (info {info:#x})")]
    GhcbMsrProtocol {
        /// The value written.
        value: u64,
        /// Its low 12 bits.
        info: u64,
    },
    /// A kicked vCPU did not apply its AP-creation request in time.
    #[error("vCPU {target} did not apply its AP-creation request within {ms} ms")]
    KickTimeout {
        /// The target.
        target: u32,
        /// The wait.
        ms: u64,
    },
    /// The watchdog stopped the run.
    #[error("stopped by the watchdog")]
    TimedOut,
}

/// Exit counts of one vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExitCounts {
    /// Every exit of KVM_RUN (including EINTR returns).
    pub total: u64,
    /// Port I/O exits.
    pub io: u64,
    /// Userspace RDMSR exits.
    pub rdmsr: u64,
    /// Userspace WRMSR exits (doorbells included).
    pub wrmsr: u64,
    /// GHCB doorbells (AP-creation requests).
    pub doorbells: u64,
    /// HLT exits.
    pub hlt: u64,
    /// KVM_RUN returns with EINTR/EAGAIN (kicks and the watchdog).
    pub interrupted: u64,
}

/// What one vCPU thread did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VcpuRecord {
    /// The vCPU (and APIC ID).
    pub id: u32,
    /// Exit counts.
    pub exits: ExitCounts,
    /// How many times a VMSA was loaded into the vCPU (starts and AP re-creations).
    pub vmsa_loads: u32,
    /// Values the vCPU wrote to the DONE port, in order.
    pub done: Vec<u32>,
    /// VMSA fields that were non-zero but have no KVM register (see `vmsa_regs`).
    pub not_loaded: Vec<&'static str>,
    /// Errors, in order; the last one may have ended the vCPU.
    pub errors: Vec<VcpuError>,
    /// RIP when the thread ended.
    pub final_rip: Option<u64>,
    /// Time spent in KVM_RUN, in microseconds.
    pub run_us: u64,
}

/// Wakes, acknowledgements and stop for one vCPU thread of [`run`] (a [`KickState`] plus a
/// sticky stop flag).
#[derive(Debug, Default)]
pub struct VcpuControl {
    kick: KickState,
    stop: AtomicBool,
}

impl VcpuControl {
    /// The thread, for signals.
    pub fn signal(&self) -> &SignalTarget {
        self.kick.signal()
    }

    /// Ask the thread to apply a pending request, and wait until it has (or `timeout`).
    pub fn kick_and_wait(&self, timeout: Duration) -> bool {
        self.kick.wake_and_wait(timeout, &|| self.stopped())
    }

    /// Make the thread leave its loop.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick.kick();
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn kicks(&self) -> u64 {
        self.kick.wakes()
    }

    fn ack(&self, seq: u64) {
        self.kick.ack(seq);
    }

    /// Sleep until a wake newer than `seen` or a stop.
    fn wait(&self, seen: u64) {
        // Read the kick count first: a stop after this read makes the wait return at once.
        let kicks = self.kick.kicks();
        if !self.stopped() {
            self.kick.wait(kicks, seen);
        }
    }
}

/// Everything the vCPU threads share.
pub struct Shared<'a> {
    /// vmsa-core's VM.
    pub vm: &'a Vm<KvmPlatform>,
    /// Guest RAM.
    pub ram: &'a GuestRam,
    /// One control per vCPU, indexed by APIC ID.
    pub controls: &'a [VcpuControl],
    /// SEV_STATUS as the guest reads it.
    pub sev_status: u64,
    /// How long a doorbell waits for its target.
    pub kick_timeout: Duration,
    /// Set by the watchdog.
    pub timed_out: &'a AtomicBool,
}

impl std::fmt::Debug for Shared<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("vcpus", &self.controls.len())
            .field("sev_status", &self.sev_status)
            .finish_non_exhaustive()
    }
}

/// Why the exit loop returned.
enum Stop {
    /// The vCPU is done (DONE port or HLT): it halts.
    Halted,
    /// A kick (or its own AP request targeting itself): go back to vmsa-core.
    Kicked,
    /// The vCPU cannot continue.
    Fatal(VcpuError),
    /// Stop requested.
    Stopped,
}

/// Run vCPU `id` until it is stopped, fails, or (for the BSP, `id` 0) reports DONE.
pub fn run(shared: &Shared<'_>, id: u32, mut fd: VcpuFd) -> VcpuRecord {
    let ctl = &shared.controls[id as usize];
    let _attached = ctl.signal().attach();
    let mut rec = VcpuRecord {
        id,
        ..Default::default()
    };
    let mut seen = 0u64;
    let mut need_load = true;
    let mut ghcb_msr = 0u64;
    loop {
        if ctl.stopped() {
            if shared.timed_out.load(Ordering::SeqCst) {
                rec.errors.push(VcpuError::TimedOut);
            }
            break;
        }
        let now = ctl.kicks();
        if now != seen {
            seen = now;
            need_load = true;
        }
        let entry = shared.vm.prepare_entry(VcpuId(id));
        ctl.ack(seen);
        let hpa = match entry {
            Err(e) => {
                rec.errors.push(VcpuError::Entry {
                    message: e.to_string(),
                });
                ctl.wait(seen);
                continue;
            }
            Ok(Entry::Blocked(_)) => {
                ctl.wait(seen);
                continue;
            }
            Ok(Entry::Run(hpa)) => hpa,
        };
        if need_load {
            match load(shared.vm, &fd, hpa) {
                Ok(not_loaded) => {
                    rec.vmsa_loads += 1;
                    rec.not_loaded = not_loaded;
                    need_load = false;
                }
                Err(e) => {
                    rec.errors.push(e);
                    // Like a failed VMRUN: the vCPU stays as it is until the next request.
                    let _ = shared.vm.set_mp_state(VcpuId(id), MpState::Halted);
                    continue;
                }
            }
        }
        let t0 = Instant::now();
        let stop = exit_loop(shared, id, &mut fd, &mut rec, &mut ghcb_msr, seen);
        rec.run_us += t0.elapsed().as_micros() as u64;
        match stop {
            Stop::Halted => {
                let _ = shared.vm.set_mp_state(VcpuId(id), MpState::Halted);
                if id == 0 {
                    break;
                }
            }
            Stop::Kicked => {}
            Stop::Stopped => {}
            Stop::Fatal(e) => {
                rec.errors.push(e);
                break;
            }
        }
    }
    rec.final_rip = fd.get_regs().ok().map(|r| r.rip);
    rec
}

/// Read the VMSA at `hpa` (the page the VMCB points at) and start the vCPU from it, as VMRUN
/// would. Returns the VMSA fields that have no KVM register.
pub(crate) fn load(
    vm: &Vm<KvmPlatform>,
    fd: &VcpuFd,
    hpa: vmsa_core::Hpa,
) -> Result<Vec<&'static str>, VcpuError> {
    let vmsa = vm.platform().vmsa_at(hpa)?;
    let report = vmsa_regs::load(fd, &vmsa)?;
    fd.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(|e| IoctlError::new("KVM_SET_MP_STATE", e))?;
    Ok(report.not_loaded)
}

/// What one `KVM_RUN` of a VMSA-image vCPU came back with, after the exits this backend serves
/// itself (SEV_STATUS and GHCB MSR reads, YIELD) were served.
#[derive(Debug)]
pub(crate) enum Step {
    /// Served; run again.
    Again,
    /// `KVM_RUN` returned `EINTR` or `EAGAIN` (a signal or `immediate_exit`).
    Interrupted,
    /// The guest wrote this value to the GHCB MSR: a doorbell for [`doorbell`].
    Doorbell(u64),
    /// An `OUT` the backend does not serve.
    Out {
        /// The port.
        port: u16,
        /// The value (zero-extended).
        value: u32,
        /// The access size in bytes.
        size: u8,
    },
    /// `HLT`.
    Hlt,
    /// A triple fault (`KVM_EXIT_SHUTDOWN`), with RIP after it.
    Shutdown {
        /// RIP.
        rip: u64,
    },
    /// The vCPU cannot continue.
    Fatal(VcpuError),
}

/// One `KVM_RUN` of a VMSA-image vCPU, counting the exit in `exits`. `sev_status` is what the
/// guest reads from SEV_STATUS; `ghcb_msr` is the vCPU's GHCB MSR.
pub(crate) fn run_once(fd: &mut VcpuFd, sev_status: u64, ghcb_msr: &mut u64, exits: &mut ExitCounts) -> Step {
    exits.total += 1;
    // Decide inside the match; act on the vCPU fd only after the exit's borrow ends.
    let step = match fd.run() {
        Ok(VcpuExit::IoOut(port, data)) => {
            exits.io += 1;
            let mut v = [0u8; 4];
            let n = data.len().min(4);
            v[..n].copy_from_slice(&data[..n]);
            let value = u32::from_le_bytes(v);
            if port == ports::YIELD {
                std::thread::yield_now();
                Step::Again
            } else {
                Step::Out {
                    port,
                    value,
                    size: n as u8,
                }
            }
        }
        Ok(VcpuExit::X86Rdmsr(msr)) => {
            exits.rdmsr += 1;
            match msr.index {
                MSR_SEV_STATUS => *msr.data = sev_status,
                GHCB_MSR => *msr.data = *ghcb_msr,
                // Any other MSR KVM did not handle: #GP, as KVM would inject.
                _ => *msr.error = 1,
            }
            Step::Again
        }
        Ok(VcpuExit::X86Wrmsr(msr)) => {
            exits.wrmsr += 1;
            if msr.index == GHCB_MSR {
                *ghcb_msr = msr.data;
                exits.doorbells += 1;
                Step::Doorbell(msr.data)
            } else {
                *msr.error = 1;
                Step::Again
            }
        }
        Ok(VcpuExit::Hlt) => {
            exits.hlt += 1;
            Step::Hlt
        }
        Ok(VcpuExit::Shutdown) => Step::Shutdown { rip: 0 },
        Ok(VcpuExit::InternalError) => Step::Fatal(VcpuError::InternalError {
            suberror: 0,
            data: Vec::new(),
        }),
        Ok(VcpuExit::FailEntry(reason, cpu)) => Step::Fatal(VcpuError::FailEntry { reason, cpu }),
        Ok(other) => Step::Fatal(VcpuError::UnexpectedExit {
            exit: format!("{other:?}"),
        }),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            exits.interrupted += 1;
            Step::Interrupted
        }
        Err(e) => Step::Fatal(IoctlError::new("KVM_RUN", errno_of(e)).into()),
    };
    match step {
        Step::Fatal(VcpuError::InternalError { .. }) => Step::Fatal(internal_error(fd)),
        Step::Shutdown { .. } => Step::Shutdown {
            rip: fd.get_regs().map(|r| r.rip).unwrap_or(0),
        },
        other => other,
    }
}

/// `KVM_RUN` until something needs the loop above.
fn exit_loop(
    shared: &Shared<'_>,
    id: u32,
    fd: &mut VcpuFd,
    rec: &mut VcpuRecord,
    ghcb_msr: &mut u64,
    seen: u64,
) -> Stop {
    let ctl = &shared.controls[id as usize];
    loop {
        if ctl.stopped() {
            return Stop::Stopped;
        }
        if ctl.kicks() != seen {
            return Stop::Kicked;
        }
        match run_once(fd, shared.sev_status, ghcb_msr, &mut rec.exits) {
            Step::Again | Step::Interrupted => {}
            Step::Out {
                port: ports::DONE,
                value,
                ..
            } => {
                rec.done.push(value);
                return Stop::Halted;
            }
            Step::Out {
                port: ports::FAIL,
                value,
                ..
            } => return Stop::Fatal(guest_failed(shared.ram, value)),
            Step::Out { port, value, .. } => {
                return Stop::Fatal(VcpuError::UnexpectedExit {
                    exit: format!("OUT to port {port:#x} ({value:#x})"),
                });
            }
            Step::Hlt => return Stop::Halted,
            Step::Shutdown { rip } => return Stop::Fatal(VcpuError::Shutdown { rip }),
            Step::Fatal(e) => return Stop::Fatal(e),
            Step::Doorbell(value) => match doorbell(shared.vm, shared.ram, id, value) {
                Ok(Doorbell::Answered | Doorbell::Refused) => {}
                Ok(Doorbell::Wake(target)) if target == id => {
                    // A request for itself: apply it (and reload) at the next entry.
                    ctl.kick.wake();
                    return Stop::Kicked;
                }
                Ok(Doorbell::Wake(target)) => {
                    let Some(t) = shared.controls.get(target as usize) else {
                        return Stop::Fatal(unknown_target(target));
                    };
                    if !t.kick_and_wait(shared.kick_timeout) {
                        return Stop::Fatal(VcpuError::KickTimeout {
                            target,
                            ms: shared.kick_timeout.as_millis() as u64,
                        });
                    }
                }
                Err(e) => return Stop::Fatal(e),
            },
        }
    }
}

/// The guest's FAIL report, with the GHCB answer it saw (from the parameter page).
pub(crate) fn guest_failed(ram: &GuestRam, code: u32) -> VcpuError {
    let read = |off| ram.read_u64(PARAMS_GPA + off).unwrap_or(0);
    VcpuError::GuestFailed {
        code,
        resp1: read(params::RESP1),
        resp2: read(params::RESP2),
    }
}

/// vmsa-core accepted a request for a vCPU this VMM does not run.
pub(crate) fn unknown_target(target: u32) -> VcpuError {
    VcpuError::Entry {
        message: format!("vmsa-core accepted unknown target {target}"),
    }
}

fn internal_error(fd: &mut VcpuFd) -> VcpuError {
    let run = fd.get_kvm_run();
    // SAFETY: the last exit reason was KVM_EXIT_INTERNAL_ERROR, so the kernel filled the
    // `internal` member of the exit union; it is plain data (u32, u32, [u64; 16]).
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    VcpuError::InternalError {
        suberror: internal.suberror,
        data: internal.data[..n].to_vec(),
    }
}

/// What a served doorbell asks of the requester.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Doorbell {
    /// The guest has its answer; nothing else to do.
    Answered,
    /// vmsa-core refused the request; the guest has the GHCB error.
    Refused,
    /// vmsa-core accepted an AP-creation request for this vCPU: wake it (it applies the
    /// request at its next entry) and wait until it has.
    Wake(u32),
}

/// Serve a GHCB MSR write of vCPU `id` (`ram` holds guest memory): read the GHCB, pre-check it
/// as `sev_es_validate_vmgexit` does, hand it to vmsa-core's `ap_creation`, and answer the
/// guest in `sw_exit_info_1/2`.
pub(crate) fn doorbell(
    vm: &Vm<KvmPlatform>,
    ram: &GuestRam,
    id: u32,
    value: u64,
) -> Result<Doorbell, VcpuError> {
    let info = value & 0xfff;
    if info != 0 {
        return Err(VcpuError::GhcbMsrProtocol { value, info });
    }
    let gpa = value;
    if ram.offset_of(gpa, 4096).is_none() {
        return Err(VcpuError::GhcbOutsideMemory { gpa });
    }
    let req = GhcbRequest::read(ram, gpa)?;
    if let Some((i1, i2)) = req.precheck() {
        ghcb::respond(ram, gpa, i1, i2)?;
        return Ok(Doorbell::Answered);
    }
    let ap = ApCreationRequest {
        requester: VcpuId(id),
        exit_info_1: req.exit_info_1,
        exit_info_2: req.exit_info_2,
        rax: req.rax,
    };
    match vm.ap_creation(&ap) {
        Err(e) => {
            let (i1, i2) = e.sw_exit_info();
            ghcb::respond(ram, gpa, i1, i2)?;
            Ok(Doorbell::Refused)
        }
        Ok(created) => {
            ghcb::respond(ram, gpa, 0, 0)?;
            Ok(if created.kick {
                Doorbell::Wake(created.target.0)
            } else {
                Doorbell::Answered
            })
        }
    }
}

/// Exit counts summed over vCPUs.
pub fn total_exits(records: &[VcpuRecord]) -> ExitCounts {
    records.iter().fold(ExitCounts::default(), |mut t, r| {
        let e = &r.exits;
        t.total += e.total;
        t.io += e.io;
        t.rdmsr += e.rdmsr;
        t.wrmsr += e.wrmsr;
        t.doorbells += e.doorbells;
        t.hlt += e.hlt;
        t.interrupted += e.interrupted;
        t
    })
}

/// Errors by kind name, for summaries.
pub fn error_kinds(records: &[VcpuRecord]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in records {
        for e in &r.errors {
            let name = serde_json_kind(e);
            *m.entry(name).or_default() += 1;
        }
    }
    m
}

fn serde_json_kind(e: &VcpuError) -> String {
    match e {
        VcpuError::Ioctl(_) => "ioctl",
        VcpuError::Regs(_) => "regs",
        VcpuError::Frame(_) => "frame",
        VcpuError::Gmem(_) => "gmem",
        VcpuError::Entry { .. } => "entry",
        VcpuError::Shutdown { .. } => "shutdown",
        VcpuError::InternalError { .. } => "internal_error",
        VcpuError::FailEntry { .. } => "fail_entry",
        VcpuError::UnexpectedExit { .. } => "unexpected_exit",
        VcpuError::GuestFailed { .. } => "guest_failed",
        VcpuError::GhcbOutsideMemory { .. } => "ghcb_outside_memory",
        VcpuError::GhcbMsrProtocol { .. } => "ghcb_msr_protocol",
        VcpuError::KickTimeout { .. } => "kick_timeout",
        VcpuError::TimedOut => "timed_out",
    }
    .to_string()
}
