//! The entry point `vmm run --backend kvm` uses: build a VM for N vCPUs and a memory size,
//! run the built-in guest to completion, tear everything down, and report.
//!
//! [`run`] probes the host and picks the mode: SEV-SNP where the host has it, VMSA-image mode
//! otherwise, and says why in [`RunReport::mode_reason`]. Asking for SNP explicitly on a host
//! without it fails with [`RunError::Unsupported`], carrying the probe's reasons.
//!
//! A VMSA-image run: a default KVM VM; one guest_memfd memslot (`MMAP | INIT_SHARED`) of the
//! requested size holding the guest image; vmsa-core's [`Vm`] over a [`KvmPlatform`],
//! configured as an SNP VM without extra SEV features; every vCPU created in KVM and in
//! vmsa-core; the BSP's VMSA image set and launched (`launch_start`, `launch_finish`: each
//! vCPU's host VMSA synced, made private in the tracked RMP and committed); then one thread
//! per vCPU ([`crate::vcpu`]) under a signal watchdog until the BSP reports DONE; finally
//! vmsa-core's teardown, the memslot deleted, guest memory unmapped and every fd closed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_INVAL, KVM_MSR_EXIT_REASON_UNKNOWN, kvm_enable_cap,
};
use kvm_ioctls::Kvm;
use serde::Serialize;
use vmsa_core::{Event, EventLog, Gpa, VcpuId, Vm, VmConfig};

use crate::cpuid;
use crate::error::{Errno, IoctlError};
use crate::frames::FrameSpace;
use crate::gmem::{GmemError, GuestRam};
pub use crate::guest::builtin::{GuestProgram, GuestRequest};
use crate::guest::layout::{
    self, MAILBOX_GPA, MAX_REQUESTS, MAX_VCPUS, PARAMS_GPA, REQUESTS_GPA, RESULTS_GPA, STACK_TOP, params,
};
use crate::guest::program::{self, AssembleError};
use crate::platform::{KvmPlatform, PlatformStats};
use crate::probe::{self, Missing, Mode, ProbeReport};
use crate::vcpu::{self, ExitCounts, Shared, VcpuControl, VcpuRecord};
use crate::watchdog;

/// Which mode to run in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum ModeChoice {
    /// SNP where the host has it, else VMSA-image.
    #[default]
    Auto,
    /// SEV-SNP or nothing.
    Snp,
    /// VMSA-image mode.
    VmsaImage,
}

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunConfig {
    /// vCPUs (APIC IDs 0..vcpus; 0 is the BSP).
    pub vcpus: u32,
    /// Guest memory in bytes (at least [`layout::min_memory`]).
    pub memory: u64,
    /// The guest program.
    pub guest: GuestProgram,
    /// The mode.
    pub mode: ModeChoice,
    /// The watchdog: the whole run must finish within this.
    pub timeout: Duration,
}

impl RunConfig {
    /// The AP-creation scenario with `vcpus` vCPUs, 16 MiB (or the minimum), destroy and
    /// re-create on, automatic mode, a 60 s watchdog.
    pub fn ap_creation(vcpus: u32) -> Self {
        Self {
            vcpus,
            memory: layout::min_memory(vcpus).max(16 << 20),
            guest: GuestProgram::ApCreation { recreate: true },
            mode: ModeChoice::Auto,
            timeout: Duration::from_secs(60),
        }
    }
}

/// Why a run could not happen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
pub enum RunError {
    /// The mode cannot run on this host.
    #[error("{mode} mode is not available on this host: {}", join(missing))]
    Unsupported {
        /// The mode.
        mode: Mode,
        /// Why, from the probe.
        missing: Vec<Missing>,
    },
    /// The configuration breaks a rule.
    #[error("bad run configuration: {rule} (got {value})")]
    Config {
        /// The rule.
        rule: &'static str,
        /// The value.
        value: u64,
    },
    /// An ioctl failed while building the VM.
    #[error(transparent)]
    Ioctl(#[from] IoctlError),
    /// Guest memory.
    #[error(transparent)]
    Gmem(#[from] GmemError),
    /// The guest program.
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    /// vmsa-core refused a step of the launch.
    #[error("vmsa-core: {0}")]
    Core(String),
    /// The SNP path failed.
    #[error(transparent)]
    Snp(#[from] crate::snp::SnpError),
}

fn join(m: &[Missing]) -> String {
    m.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("; ")
}

/// An accepted AP-creation request (from vmsa-core's events).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct AcceptedRequest {
    /// Who asked.
    pub requester: u32,
    /// For whom.
    pub target: u32,
    /// The VMSA (none for AP_DESTROY).
    pub gpa: Option<Gpa>,
    /// 0 CREATE_ON_INIT, 1 CREATE, 2 DESTROY.
    pub request: u32,
}

/// How long each phase took, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Timings {
    /// VM, memory, vCPUs, guest image.
    pub setup_us: u64,
    /// vmsa-core launch (sync, make private, commit every VMSA).
    pub launch_us: u64,
    /// From starting the threads to the BSP's DONE and all threads joined.
    pub run_us: u64,
    /// vmsa-core teardown and releasing KVM objects and memory.
    pub teardown_us: u64,
}

/// What tearing down left behind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TeardownReport {
    /// vCPUs vmsa-core tore down.
    pub vcpus: usize,
    /// Host VMSA pages vmsa-core leaked on purpose.
    pub leaked: usize,
    /// Host pages still allocated in the frame space after teardown (must be 0).
    pub host_pages_live: usize,
}

/// The report of a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunReport {
    /// The mode used.
    pub mode: Mode,
    /// Why this mode (e.g. "SEV-SNP is not available: ...; using VMSA-image mode").
    pub mode_reason: String,
    /// The probe's reasons SNP is unavailable (empty on SNP hosts).
    pub snp_missing: Vec<Missing>,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory in bytes.
    pub memory: u64,
    /// The BSP reported DONE and no vCPU recorded an error.
    pub completed: bool,
    /// The watchdog stopped the run.
    pub timed_out: bool,
    /// Per-vCPU records (exits, loads, errors), by APIC ID.
    pub vcpu_records: Vec<VcpuRecord>,
    /// Per-vCPU VMSA ownership histories, by vCPU id.
    pub histories: Vec<vmsa_core::History>,
    /// Accepted AP-creation requests, in order.
    pub accepted_requests: Vec<AcceptedRequest>,
    /// The mailboxes after the run (`generation << 32 | apic_id` for each AP that reported).
    pub mailboxes: Vec<u64>,
    /// For the request-table guest: each request's `(sw_exit_info_1, sw_exit_info_2)`.
    pub request_results: Vec<(u64, u64)>,
    /// SEV_FEATURES the guest derived from SEV_STATUS.
    pub guest_sev_features: u64,
    /// Exits summed over vCPUs.
    pub exits: ExitCounts,
    /// What the platform did.
    pub platform: PlatformStats,
    /// What teardown did.
    pub teardown: TeardownReport,
    /// Phase timings.
    pub timings: Timings,
    /// SNP runs only: what the SNP path did.
    pub snp: Option<crate::snp::SnpRunReport>,
}

impl std::fmt::Display for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "backend kvm, {} mode: {}", self.mode, self.mode_reason)?;
        writeln!(
            f,
            "{} vCPUs, {} MiB guest memory: {}{}",
            self.vcpus,
            self.memory >> 20,
            if self.completed {
                "completed"
            } else {
                "NOT completed"
            },
            if self.timed_out { " (watchdog expired)" } else { "" }
        )?;
        let e = &self.exits;
        writeln!(
            f,
            "exits: {} total, {} I/O, {} RDMSR, {} WRMSR ({} GHCB doorbells), {} HLT, {} interrupted",
            e.total, e.io, e.rdmsr, e.wrmsr, e.doorbells, e.hlt, e.interrupted
        )?;
        writeln!(
            f,
            "accepted AP requests: {}; VMSA loads: {}; guest SEV_FEATURES {:#x}",
            self.accepted_requests.len(),
            self.vcpu_records.iter().map(|r| r.vmsa_loads).sum::<u32>(),
            self.guest_sev_features
        )?;
        let t = &self.timings;
        writeln!(
            f,
            "timings: setup {} µs, launch {} µs, run {} µs, teardown {} µs",
            t.setup_us, t.launch_us, t.run_us, t.teardown_us
        )?;
        writeln!(
            f,
            "teardown: {} vCPUs, {} leaked, {} host pages still live",
            self.teardown.vcpus, self.teardown.leaked, self.teardown.host_pages_live
        )?;
        for r in &self.vcpu_records {
            for err in &r.errors {
                writeln!(f, "vCPU {}: {err}", r.id)?;
            }
        }
        for h in self.histories.iter().take(4) {
            let steps: Vec<String> = h
                .transitions
                .iter()
                .map(|t| format!("{}→{}", t.op, t.to))
                .collect();
            writeln!(f, "vCPU {} ownership: {}", h.vcpu, steps.join(", "))?;
        }
        if self.histories.len() > 4 {
            writeln!(f, "({} more vCPUs)", self.histories.len() - 4)?;
        }
        Ok(())
    }
}

/// Probe the host, then run `cfg`.
pub fn run(cfg: &RunConfig) -> Result<RunReport, RunError> {
    run_with_probe(cfg, &probe::probe())
}

/// Run `cfg` on a host described by `report`.
pub fn run_with_probe(cfg: &RunConfig, report: &ProbeReport) -> Result<RunReport, RunError> {
    let snp_missing = report.missing(Mode::Snp).to_vec();
    match cfg.mode {
        ModeChoice::Snp | ModeChoice::Auto if report.supports(Mode::Snp) => crate::snp::run(cfg, report),
        ModeChoice::Snp => Err(RunError::Unsupported {
            mode: Mode::Snp,
            missing: snp_missing,
        }),
        ModeChoice::Auto | ModeChoice::VmsaImage => {
            if !report.supports(Mode::VmsaImage) {
                return Err(RunError::Unsupported {
                    mode: Mode::VmsaImage,
                    missing: report.missing(Mode::VmsaImage).to_vec(),
                });
            }
            let reason = if cfg.mode == ModeChoice::VmsaImage {
                "VMSA-image mode was asked for".to_string()
            } else {
                format!(
                    "SEV-SNP is not available ({}); using VMSA-image mode: real vCPUs started from VMSA images, without encryption or RMP",
                    join(&snp_missing)
                )
            };
            run_image(cfg, reason, snp_missing)
        }
    }
}

/// Refuse a configuration the guest map or this backend cannot hold.
pub(crate) fn check(cfg: &RunConfig) -> Result<(), RunError> {
    let bad = |rule, value| Err(RunError::Config { rule, value });
    if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
        return bad("vCPUs must be 1..=512", u64::from(cfg.vcpus));
    }
    if cfg.memory < layout::min_memory(cfg.vcpus) {
        return bad(
            "guest memory must hold the guest's map (4 MiB for up to 512 vCPUs)",
            cfg.memory,
        );
    }
    if !cfg.memory.is_multiple_of(4096) || cfg.memory > (64 << 30) {
        return bad(
            "guest memory must be a multiple of 4 KiB, at most 64 GiB",
            cfg.memory,
        );
    }
    if let GuestProgram::Requests { requests, .. } = &cfg.guest
        && requests.len() > MAX_REQUESTS
    {
        return bad("at most 64 table requests", requests.len() as u64);
    }
    Ok(())
}

/// Guest MAXPHYADDR from CPUID 0x8000_0008 `EAX[7:0]` (48 if absent).
pub(crate) fn max_phys_bits(table: &kvm_bindings::CpuId) -> u8 {
    table
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map(|e| (e.eax & 0xff) as u8)
        .filter(|b| *b > 0)
        .unwrap_or(48)
}

fn core_err(e: impl std::fmt::Display) -> RunError {
    RunError::Core(e.to_string())
}

/// A VMSA-image run.
fn run_image(cfg: &RunConfig, mode_reason: String, snp_missing: Vec<Missing>) -> Result<RunReport, RunError> {
    check(cfg)?;
    watchdog::install()?;
    let n = cfg.vcpus;
    let t_setup = Instant::now();
    let kvm = Kvm::new().map_err(|e| IoctlError::new("open /dev/kvm", Errno::from(e)))?;
    let vm_fd = Arc::new(kvm.create_vm().map_err(|e| IoctlError::new("KVM_CREATE_VM", e))?);
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        ..Default::default()
    };
    cap.args[0] = u64::from(KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_INVAL);
    vm_fd
        .enable_cap(&cap)
        .map_err(|e| IoctlError::new("KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)", e))?;
    let ram = Arc::new(GuestRam::new(vm_fd.clone(), 0, 0, cfg.memory)?);
    let prog = program::assemble()?;
    let (flags, entry, bsp_rdi) = match &cfg.guest {
        GuestProgram::ApCreation { recreate } => (
            if *recreate { params::FLAG_RECREATE } else { 0 },
            prog.entries.scenario,
            u64::from(n),
        ),
        GuestProgram::Requests {
            requests,
            expect_reports,
        } => {
            for (i, r) in requests.iter().enumerate() {
                let at = REQUESTS_GPA + i as u64 * 32;
                ram.write_u64(at, r.exit_info_1)?;
                ram.write_u64(at + 8, r.exit_info_2)?;
                ram.write_u64(at + 16, r.rax.unwrap_or(0))?;
                ram.write_u64(
                    at + 24,
                    u64::from(r.rax.is_some()) | (u64::from(r.write_vmsa) << 1),
                )?;
            }
            ram.write_u64(PARAMS_GPA + params::N_REQUESTS, requests.len() as u64)?;
            ram.write_u64(PARAMS_GPA + params::EXPECT_REPORTS, *expect_reports)?;
            (0, prog.entries.requests, requests.len() as u64)
        }
        GuestProgram::Spin => (0, prog.entries.spin, 0),
    };
    crate::guest::load(&ram, &prog, n, flags)?;
    let table = cpuid::supported(&kvm)?;
    let events = Arc::new(EventLog::new());
    let platform = KvmPlatform::new(FrameSpace::new(vec![ram.clone()]));
    let config = VmConfig {
        max_phys_bits: max_phys_bits(&table),
        ..VmConfig::snp(0)
    };
    let mut vm = Vm::new(platform, config, events.clone());
    let mut fds = Vec::with_capacity(n as usize);
    for id in 0..n {
        let fd = vm_fd
            .create_vcpu(u64::from(id))
            .map_err(|e| IoctlError::new("KVM_CREATE_VCPU", e))?;
        cpuid::set(&fd, &table, id)?;
        vm.create_vcpu(VcpuId(id)).map_err(core_err)?;
        fds.push(fd);
    }
    let mut bsp = layout::long_mode_image(entry);
    bsp.rdi = bsp_rdi;
    bsp.rsp = STACK_TOP;
    vm.set_registers(VcpuId(0), &bsp).map_err(core_err)?;
    let setup_us = t_setup.elapsed().as_micros() as u64;

    let t_launch = Instant::now();
    vm.launch_start(vmsa_core::SNP_POLICY_RSVD_MBO)
        .map_err(core_err)?;
    vm.launch_finish([0; 32]).map_err(core_err)?;
    let launch_us = t_launch.elapsed().as_micros() as u64;

    let t_run = Instant::now();
    let controls: Vec<VcpuControl> = (0..n).map(|_| VcpuControl::default()).collect();
    let timed_out = AtomicBool::new(false);
    let shared = Shared {
        vm: &vm,
        ram: &ram,
        controls: &controls,
        sev_status: (vm.config().vmsa_features() << 2) | 0b11,
        kick_timeout: cfg.timeout.min(Duration::from_secs(10)),
        timed_out: &timed_out,
    };
    let records: Vec<VcpuRecord> = std::thread::scope(|s| {
        let shared = &shared;
        let handles: Vec<_> = fds
            .into_iter()
            .enumerate()
            .map(|(i, fd)| s.spawn(move || vcpu::run(shared, i as u32, fd)))
            .collect();
        let targets: Vec<&watchdog::SignalTarget> = controls.iter().map(VcpuControl::signal).collect();
        watchdog::watch(
            cfg.timeout,
            || handles[0].is_finished(),
            || {
                timed_out.store(true, Ordering::SeqCst);
                controls.iter().for_each(VcpuControl::stop);
            },
            &targets,
        );
        // The BSP is done (or the watchdog fired): stop every AP and make sure each one
        // leaves KVM_RUN.
        controls.iter().for_each(VcpuControl::stop);
        let give_up = Instant::now() + cfg.timeout;
        while targets.iter().any(|t| t.attached()) && Instant::now() < give_up {
            targets.iter().for_each(|t| {
                t.signal();
            });
            std::thread::sleep(Duration::from_micros(200));
        }
        handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                h.join().unwrap_or_else(|_| VcpuRecord {
                    id: i as u32,
                    errors: vec![vcpu::VcpuError::UnexpectedExit {
                        exit: "the vCPU thread panicked".into(),
                    }],
                    ..Default::default()
                })
            })
            .collect()
    });
    let run_us = t_run.elapsed().as_micros() as u64;

    let mailboxes = (0..u64::from(n))
        .map(|i| ram.read_u64(MAILBOX_GPA + i * 8))
        .collect::<Result<Vec<_>, _>>()?;
    let request_results = match &cfg.guest {
        GuestProgram::Requests { requests, .. } => (0..requests.len() as u64)
            .map(|i| {
                Ok((
                    ram.read_u64(RESULTS_GPA + i * 16)?,
                    ram.read_u64(RESULTS_GPA + i * 16 + 8)?,
                ))
            })
            .collect::<Result<Vec<_>, GmemError>>()?,
        GuestProgram::ApCreation { .. } | GuestProgram::Spin => Vec::new(),
    };
    let guest_sev_features = ram.read_u64(PARAMS_GPA + params::SEV_FEATURES)?;

    let t_down = Instant::now();
    let down = vm.teardown();
    let platform = vm.platform().stats();
    let host_pages_live = vm.platform().frames().host_pages().0;
    drop(vm);
    drop(ram);
    drop(vm_fd);
    let teardown_us = t_down.elapsed().as_micros() as u64;

    let all = events.snapshot();
    let histories = vmsa_core::histories(&all);
    let accepted_requests = all
        .iter()
        .filter_map(|e| match *e {
            Event::ApRequest {
                requester,
                target,
                gpa,
                request,
            } => Some(AcceptedRequest {
                requester: requester.0,
                target: target.0,
                gpa,
                request,
            }),
            _ => None,
        })
        .collect();
    let bsp_done = records.first().is_some_and(|r| r.done.first() == Some(&0));
    let clean = records.iter().all(|r| r.errors.is_empty());
    Ok(RunReport {
        mode: Mode::VmsaImage,
        mode_reason,
        snp_missing,
        vcpus: n,
        memory: cfg.memory,
        completed: bsp_done && clean && !timed_out.load(Ordering::SeqCst),
        timed_out: timed_out.load(Ordering::SeqCst),
        exits: vcpu::total_exits(&records),
        vcpu_records: records,
        histories,
        accepted_requests,
        mailboxes,
        request_results,
        guest_sev_features,
        platform,
        teardown: TeardownReport {
            vcpus: down.vcpus,
            leaked: down.leaked,
            host_pages_live,
        },
        timings: Timings {
            setup_us,
            launch_us,
            run_us,
            teardown_us,
        },
        snp: None,
    })
}
