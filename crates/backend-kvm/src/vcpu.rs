//! One step of a VMSA-image vCPU: loading the VMSA the VMCB points at,
//! one `KVM_RUN` with the exits this backend serves itself, and the GHCB doorbell.
//!
//! Before every entry the vCPU asks vmsa-core ([`vmsa_core::Vm::prepare_entry`]), which applies a
//! pending AP-creation update and answers `Run(hpa)` or `Blocked`. On `Run`, after a reset (first
//! entry or an AP-creation wake), `load` reads the VMSA page at `hpa` in the frame space (a
//! host VMSA vmsa-core launched, or a guest-owned page resolved through guest_memfd), loads it
//! into the KVM vCPU ([`crate::vmsa_regs::load`]) and makes it runnable (`KVM_SET_MP_STATE`), as
//! VMRUN would from that page.
//!
//! A doorbell (guest WRMSR of the GHCB MSR) is served on the requester's thread by `doorbell`:
//! the GHCB is read from guest memory, pre-checked as `sev_es_validate_vmgexit` does, handed to
//! [`vmsa_core::Vm::ap_creation`] and answered in `sw_exit_info_1/2`; the caller wakes the target.

use kvm_bindings::{KVM_MP_STATE_RUNNABLE, kvm_mp_state};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::Serialize;
use vmsa_core::ghcb::{AP_CREATE, AP_CREATE_ON_INIT, AP_DESTROY};
use vmsa_core::{ApCreationRequest, Vm};

use crate::error::IoctlError;
use crate::frames::FrameError;
use crate::ghcb::{self, GHCB_MSR, GhcbRequest, ReadGhcb};
use crate::gmem::{GmemError, GuestRam};
use crate::guest::layout::MSR_SEV_STATUS;
use crate::guest::layout::ports;
use crate::platform::KvmPlatform;
use crate::vmsa_regs::{self, RegsError};

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
    /// vmsa-core accepted an AP-creation request for a vCPU this VMM does not run.
    #[error("vmsa-core accepted an AP-creation request for vCPU {target}, which has no KVM vCPU")]
    UnknownTarget {
        /// The target APIC ID.
        target: u32,
    },
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
    /// KVM_RUN returns with EINTR/EAGAIN (kicks).
    pub interrupted: u64,
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
/// itself (SEV_STATUS and GHCB MSR reads) were served.
#[derive(Debug)]
pub(crate) enum Step {
    /// Served; run again.
    Again,
    /// An `OUT` to the YIELD port: the vCPU waits for other vCPUs; let them run.
    Yield,
    /// `KVM_RUN` returned `EINTR` or `EAGAIN` (a kick's signal, see [`crate::kick`]).
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
    /// A triple fault (`KVM_EXIT_SHUTDOWN`).
    Shutdown,
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
                Step::Yield
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
        Ok(VcpuExit::Shutdown) => Step::Shutdown,
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
        Err(e) => Step::Fatal(IoctlError::new("KVM_RUN", e).into()),
    };
    match step {
        Step::Fatal(VcpuError::InternalError { .. }) => Step::Fatal(internal_error(fd)),
        other => other,
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

/// What a served doorbell did, for the requester to act on and record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Answer {
    /// The request as a guest step: `"ap_create"`, `"ap_create_on_init"`, `"ap_destroy"`,
    /// `"ap_creation"` (an unknown request type), or `"ghcb"` for a GHCB refused before its
    /// request was decoded.
    pub action: &'static str,
    /// The request, once decoded.
    pub request: Option<ApCreationRequest>,
    /// What vmsa-core decided.
    pub outcome: Outcome,
}

/// vmsa-core's decision on a doorbell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Refused: the guest has the GHCB error; `why` is the rule with the answer's codes,
    /// `"... (sw_exit_info 2/5)"`.
    Refused {
        /// The rule and the codes.
        why: String,
    },
    /// Accepted for `target`; `wake`: the target applies it at its next entry and must be woken
    /// (false for CREATE_ON_INIT, which waits for the target's INIT).
    Accepted {
        /// The target APIC ID.
        target: u32,
        /// Whether to wake it.
        wake: bool,
    },
}

/// The step name of AP-creation request type `request` (`sw_exit_info_1[31:0]`).
fn action(request: u32) -> &'static str {
    match request {
        AP_CREATE_ON_INIT => "ap_create_on_init",
        AP_CREATE => "ap_create",
        AP_DESTROY => "ap_destroy",
        _ => "ap_creation",
    }
}

/// A refusal as the guest sees it: the rule, then `(sw_exit_info 1/2)`.
fn refused(e: &dyn std::error::Error, (i1, i2): (u64, u64)) -> Outcome {
    Outcome::Refused {
        why: format!("{e} (sw_exit_info {i1}/{i2})"),
    }
}

/// Serve a GHCB MSR write of vCPU `id` (`ram` holds guest memory): read the GHCB, pre-check it
/// as `sev_es_validate_vmgexit` does, hand it to vmsa-core's `ap_creation`, and answer the
/// guest in `sw_exit_info_1/2`.
pub(crate) fn doorbell(
    vm: &Vm<KvmPlatform>,
    ram: &GuestRam,
    id: u32,
    value: u64,
) -> Result<Answer, VcpuError> {
    let info = value & 0xfff;
    if info != 0 {
        return Err(VcpuError::GhcbMsrProtocol { value, info });
    }
    let gpa = value;
    if ram.offset_of(gpa, 4096).is_none() {
        return Err(VcpuError::GhcbOutsideMemory { gpa });
    }
    let ghcb = GhcbRequest::read(ram, gpa)?;
    if let Err(e) = ghcb.check() {
        let codes = e.sw_exit_info();
        ghcb::respond(ram, gpa, codes.0, codes.1)?;
        return Ok(Answer {
            action: "ghcb",
            request: None,
            outcome: refused(&e, codes),
        });
    }
    let req = ghcb.ap_creation_request(vmsa_core::VcpuId(id));
    let outcome = match vm.ap_creation(&req) {
        Err(e) => {
            let codes = e.sw_exit_info();
            ghcb::respond(ram, gpa, codes.0, codes.1)?;
            refused(&e, codes)
        }
        Ok(created) => {
            ghcb::respond(ram, gpa, 0, 0)?;
            Outcome::Accepted {
                target: created.target.0,
                wake: created.kick,
            }
        }
    };
    Ok(Answer {
        action: action(req.request()),
        request: Some(req),
        outcome,
    })
}
