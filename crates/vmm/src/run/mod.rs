//! `vmm run`: create a confidential VM on a backend chosen at run time, load and launch its
//! guest, run it to completion, tear it down, and report what happened to every vCPU's VMSA.
//!
//! - [`scenario`]: the built-in guests and guest files;
//! - [`memory`]: the VMM's guest memory (vm-memory) the image is loaded into;
//! - [`flow`]: the one launch-and-run flow over the host interface, for every backend;
//! - [`igvm`]: an IGVM file made ready to launch (`--igvm`), for every backend;
//! - `sim` / `kvm`: the two backends;
//! - [`history`], [`phases`] and [`report`]: the summary, for people or as JSON;
//! - [`progress`]: the progress bar of long runs.

use std::path::PathBuf;
use std::sync::Arc;

use vmsa_core::VmKind;

use crate::measure::command::DirectBoot;
use crate::measure::vcpu_types::VcpuType;
use crate::measure::{MeasureError, VcpuCount};
use crate::size::ByteSize;

pub mod flow;
pub mod history;
pub mod igvm;
mod kvm;
pub mod memory;
pub mod phases;
pub mod progress;
pub mod report;
pub mod scenario;
mod sim;

pub use kvm::KvmIgvmError;
pub(crate) use kvm::{ap_creation_program, program_names};
pub use report::RunSummary;
pub use scenario::GuestSpec;

/// How long (wall clock) a guest may run on either backend before the watchdog of
/// [`flow::run`] kicks every vCPU out.
const WATCHDOG: std::time::Duration = std::time::Duration::from_secs(60);

/// Which backend runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// backend-sim's software SEV-SNP machine (runs anywhere).
    Sim,
    /// `/dev/kvm` (SEV-SNP where the host has it, else VMSA-image mode).
    Kvm,
}

/// `--guest`'s help: every built-in of [`scenario::BUILTINS`], from that list.
fn guest_help() -> String {
    let names: Vec<String> = scenario::BUILTINS
        .iter()
        .map(|(name, _)| match *name {
            "boot" => "builtin:boot (when not given)".to_owned(),
            name => format!("builtin:{name}"),
        })
        .collect();
    format!(
        "The guest: {}, or a JSON guest script (simulator). On the simulator it is what runs in an \
         --igvm launch too; with --backend kvm --igvm the file's program runs, and --guest is refused",
        names.join(", ")
    )
}

/// The arguments of `vmm run`.
#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// The backend: the simulator (default) or /dev/kvm.
    #[arg(long, value_enum, default_value = "sim")]
    pub backend: BackendKind,
    /// Number of vCPUs (1 to 512).
    #[arg(long, value_name = "N", default_value = "4", allow_negative_numbers = true)]
    pub vcpus: VcpuCount,
    /// Guest memory, e.g. 512M, 16G (powers of 1024); 1G by default, 4M with --backend kvm
    /// (what its guest program needs).
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "1G",
        default_value_if("backend", "kvm", kvm::DEFAULT_MEMORY),
        allow_hyphen_values = true
    )]
    pub memory: ByteSize,
    /// The guest: a built-in (`builtin:NAME`, every name of [`scenario::BUILTINS`], boot when
    /// not given) or a JSON guest script; the help text lists every built-in.
    #[arg(
        long,
        help = guest_help(),
        value_name = "builtin:NAME|FILE",
        value_parser = clap::builder::TypedValueParser::try_map(clap::builder::OsStringValueParser::new(), GuestSpec::from_os)
    )]
    pub guest: Option<GuestSpec>,
    /// Launch this OVMF image (its pages and SEV metadata are measured; the digest must equal
    /// `vmm measure`'s). Simulator only.
    #[arg(long, value_name = "OVMF.fd")]
    pub firmware: Option<PathBuf>,
    /// Launch this IGVM file (SEV-SNP platform): its directives are loaded into guest memory
    /// and launched in order, its SNP VP context supplied as the BSP's VMSA (a launch page of
    /// type VMSA): the digest must equal `vmm measure --igvm`'s, whatever --vcpus. With
    /// --backend kvm, only a file of the kvm backend's own guest programs (`vmm igvm --guest`),
    /// whose program then runs on real vCPUs instead of --guest's.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["firmware", "sev_es"])]
    pub igvm: Option<PathBuf>,
    /// With --firmware: a direct kernel boot (--kernel, --initrd, --append), whose hash table
    /// the launch measures as `vmm measure` does. Simulator only.
    #[command(flatten)]
    pub boot: DirectBoot,
    /// With --igvm: launch the classic KVM way instead: the VP context's registers set on every
    /// vCPU, KVM syncing each vCPU's VMSA at launch finish (the digest can equal `vmm measure
    /// --igvm --check-kvm`'s only for a file that passes its rules, with one vCPU).
    #[arg(long)]
    pub igvm_classic: bool,
    /// With --igvm: load data-less pages as ZERO pages (as QEMU's loader does), as `vmm measure
    /// --igvm --native-zero` measures them.
    #[arg(long)]
    pub native_zero: bool,
    /// The vCPU model whose CPUID signature the reset VMSAs carry (EPYC-v4 when not given).
    /// Simulator only, and not with --igvm, whose VP context carries its own.
    #[arg(long, value_name = "NAME", conflicts_with = "igvm")]
    pub vcpu_type: Option<VcpuType>,
    /// An SEV-ES guest instead of SEV-SNP.
    #[arg(long, conflicts_with = "snp")]
    pub sev_es: bool,
    /// An SEV-SNP guest (the default).
    #[arg(long)]
    pub snp: bool,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
    /// Write the simulator's timeline as Chrome trace-event JSON (opens in ui.perfetto.dev).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Override the simulator's cycle costs from a TOML or JSON file.
    #[arg(long, value_name = "FILE")]
    pub costs: Option<PathBuf>,
    /// Inject failures into the simulator: `OP[:PAGE_TYPE]:N=CODE[,...]`, e.g.
    /// snp_launch_update:vmsa:2=INVALID_PAGE_STATE.
    #[arg(long, value_name = "SPEC")]
    pub fault: Option<String>,
    /// SEV-ES: after the launch, move the guest into a second VM and run it there (intra-host
    /// migration, KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM, as a VMM's live update does). Simulator
    /// only.
    #[arg(long)]
    pub migrate: bool,
    /// Set the simulated host's kvm_amd.dump_invalid_vmcb: a vCPU whose VMRUN fails has its
    /// VMCB and save area dumped into the report (its VMSA decrypted if the guest policy allows
    /// debugging, see --allow-debug). Simulator only.
    #[arg(long)]
    pub dump_invalid_vmcb: bool,
    /// Launch with a guest policy that allows the host to debug the guest (SEV-SNP: DEBUG,
    /// bit 19; SEV-ES: without NODBG, bit 0), so that its VMSAs can be decrypted
    /// (SNP_DBG_DECRYPT / DBG_DECRYPT). Simulator only.
    #[arg(long)]
    pub allow_debug: bool,
    /// The most memory the simulator's own structures (RMP, allocator, guest memory maps,
    /// page contents) may take, e.g. 512M, 8G (default 2G); a run that needs more ends at once
    /// with an error naming the budget and the operation. Simulator only.
    #[arg(long, value_name = "SIZE")]
    pub sim_memory_budget: Option<ByteSize>,
}

impl RunArgs {
    /// The guest: --guest, or builtin:boot.
    pub fn guest(&self) -> GuestSpec {
        self.guest
            .clone()
            .unwrap_or_else(|| GuestSpec::Builtin("boot".into()))
    }

    /// The vCPU model of the reset VMSAs: --vcpu-type, or EPYC-v4.
    pub fn vcpu_type(&self) -> VcpuType {
        self.vcpu_type.unwrap_or(crate::measure::vcpu_types::EPYC_V4)
    }

    /// The arguments of `vmm run ARGS` as the command line parses them, defaults included, for
    /// a caller of [`run`] that has no command line (a test, an embedder).
    pub fn from_args<'a>(args: impl IntoIterator<Item = &'a str>) -> Result<Self, clap::Error> {
        use clap::{Args, FromArgMatches};
        let command = Self::augment_args(clap::Command::new("run").no_binary_name(true));
        Self::from_arg_matches(&command.try_get_matches_from(args)?)
    }
}

/// Why `vmm run` stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// `--igvm-classic` or `--native-zero` without `--igvm`.
    #[error("--{option} needs --igvm: it is an option of the IGVM launch")]
    IgvmOnly {
        /// The option, without its dashes.
        option: &'static str,
    },
    /// An option that only the simulator has, given with `--backend kvm`.
    #[error(
        "{option} belongs to the simulator (--backend sim); the kvm backend has no simulated firmware, costs, fault \
         plan, migration, VMCB dumps or bookkeeping budget, and its guest programs carry their own VMSAs"
    )]
    SimulatorOnly {
        /// The option.
        option: &'static str,
    },
    /// `--sev-es` with `--backend kvm`.
    #[error(
        "--sev-es: the kvm backend runs SEV-SNP where the host has it, else VMSA-image mode; it has no SEV-ES path"
    )]
    KvmSevEs,
    /// A guest script given to the kvm backend, which runs its own guest programs.
    #[error(
        "--guest {}: scripted guests run on the simulator; the kvm backend runs its own guest programs ({})",
        .script.display(),
        kvm::program_names()
    )]
    KvmScript {
        /// The script.
        script: PathBuf,
    },
    /// A built-in guest that only the simulator runs, given to the kvm backend.
    #[error(
        "--guest builtin:{name} needs the simulator (--backend sim); the kvm backend runs {}",
        kvm::program_names()
    )]
    SimulatorBuiltin {
        /// The built-in's name.
        name: String,
    },
    /// `--memory` outside what the kvm backend's guest program can use.
    #[error("--memory {memory}: the kvm backend's guest program needs {need} to {max} for {vcpus} vCPUs")]
    KvmMemory {
        /// `--memory`.
        memory: ByteSize,
        /// The least the program needs for `vcpus`.
        need: ByteSize,
        /// The most it can address.
        max: ByteSize,
        /// `--vcpus`.
        vcpus: u32,
    },
    /// `--memory` below what the simulated guest needs.
    #[error("--memory {memory}: {guest} needs at least {need} of guest memory for its VMSA and data pages")]
    SimMemory {
        /// `--memory`.
        memory: ByteSize,
        /// The guest.
        guest: GuestSpec,
        /// The least it needs.
        need: ByteSize,
    },
    /// `--migrate` without `--sev-es`.
    #[error(
        "--migrate: only SEV-ES guests move between VMs (sev_vm_move_enc_context_from refuses an SEV-SNP source); add \
         --sev-es"
    )]
    MigrateNeedsSevEs,
    /// `--sim-memory-budget 0`, which would end every run at its first host write.
    #[error(
        "--sim-memory-budget 0 bytes: the simulator needs some memory for any run; give a size (the default is 2G)"
    )]
    ZeroSimMemoryBudget,
    /// `--fault` could not be parsed.
    #[error("--fault: {0}")]
    Fault(backend_sim::FaultSpecError),
    /// `--fault` holds no rule (only commas or spaces).
    #[error(
        "--fault {spec:?}: no rule: give OP[:PAGE_TYPE]:N=CODE rules, comma-separated, or leave --fault out"
    )]
    NoFaultRule {
        /// `--fault`.
        spec: String,
    },
    /// A `--fault` rule collides with one of the guest's own.
    #[error("--fault: {error} (a rule of --guest {guest})")]
    FaultCollides {
        /// The collision.
        error: backend_sim::FaultSpecError,
        /// The guest whose rule it collides with.
        guest: GuestSpec,
    },
    /// `--trace` cannot be written where it names.
    #[error("--trace {}: {problem}", .path.display())]
    Trace {
        /// `--trace`.
        path: PathBuf,
        /// Why not.
        problem: crate::output::OutputProblem,
    },
    /// The trace could not be written after the run.
    #[error("--trace {}: {error}", .path.display())]
    TraceWrite {
        /// `--trace`.
        path: PathBuf,
        /// The failed call.
        #[source]
        error: crate::output::ReplaceError,
    },
    /// An IGVM file does not make a launch the simulator can run.
    #[error("--igvm {}: {problem}", .path.display())]
    IgvmLaunch {
        /// `--igvm`.
        path: PathBuf,
        /// What is wrong with it.
        problem: igvm::LaunchProblem,
    },
    /// The firmware could not be used.
    #[error(transparent)]
    Measure(#[from] MeasureError),
    /// Guest memory could not be set up or does not hold the image.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// A guest script action covers pages past the end of guest memory (its page count would
    /// keep the run busy far beyond the watchdog, which only looks between actions).
    #[error(
        "--guest {guest}: action {index} ({action}) covers {pages} pages from GPA {gpa:#x}, past the end of guest \
         memory at {top:#x} (--memory {memory}): an action may only cover guest memory"
    )]
    ActionBeyondMemory {
        /// The script.
        guest: GuestSpec,
        /// The action's index in the script (from 0).
        index: usize,
        /// The action's name.
        action: &'static str,
        /// Its first GPA.
        gpa: u64,
        /// Its page count.
        pages: u64,
        /// The end of the highest guest memory region.
        top: u64,
        /// `--memory`.
        memory: ByteSize,
    },
    /// A guest script action is executed by a vCPU the guest does not have.
    #[error(
        "--guest {guest}: action {index} ({action}) runs on vCPU {vcpu}, but the guest has {vcpus} vCPUs \
         (--vcpus {vcpus}): an action's vcpu must be below --vcpus"
    )]
    ActionOnMissingVcpu {
        /// The script.
        guest: GuestSpec,
        /// The action's index in the script (from 0).
        index: usize,
        /// The action's name.
        action: &'static str,
        /// The vCPU it names.
        vcpu: u32,
        /// `--vcpus`.
        vcpus: u32,
    },
    /// The cost file was refused.
    #[error(transparent)]
    Costs(#[from] backend_sim::CostError),
    /// The guest could not be prepared.
    #[error(transparent)]
    Scenario(#[from] scenario::ScenarioError),
    /// The host could not create the VM.
    #[error("host: {0}")]
    Host(#[from] vmsa_host::HypervisorError),
    /// The KVM backend's guest program could not be built.
    #[error("kvm guest: {0}")]
    KvmGuest(#[from] backend_kvm::guest::builtin::GuestImageError),
    /// The kvm backend does not launch this IGVM file.
    #[error(transparent)]
    KvmIgvm(#[from] kvm::KvmIgvmError),
    /// The run's event loop failed.
    #[error(transparent)]
    Flow(#[from] flow::FlowError),
}

impl RunError {
    /// 2 for bad arguments or inputs, 1 for failures of the run itself.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::IgvmOnly { .. }
            | Self::SimulatorOnly { .. }
            | Self::KvmSevEs
            | Self::KvmScript { .. }
            | Self::SimulatorBuiltin { .. }
            | Self::KvmMemory { .. }
            | Self::SimMemory { .. }
            | Self::MigrateNeedsSevEs
            | Self::ZeroSimMemoryBudget
            | Self::Fault(_)
            | Self::NoFaultRule { .. }
            | Self::FaultCollides { .. }
            | Self::Trace { .. }
            | Self::IgvmLaunch { .. }
            | Self::Measure(_)
            | Self::Memory(_)
            | Self::Costs(_)
            | Self::ActionBeyondMemory { .. }
            | Self::ActionOnMissingVcpu { .. }
            | Self::Scenario(_) => 2,
            Self::KvmIgvm(e) => e.exit_code(),
            _ => 1,
        }
    }
}

/// An error with its causes, `outer: inner: innermost` (thiserror messages do not repeat their
/// source, so a one-line report must walk the chain).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = c.source();
    }
    out
}

/// Refuse an option of the IGVM launch without `--igvm`, naming it (clap's `requires` named
/// only the missing `--igvm`), and --initrd or --append without --kernel.
fn check_options(args: &RunArgs) -> Result<(), RunError> {
    args.boot.check(args.firmware.is_some())?;
    let igvm_only = [
        (args.igvm_classic, "igvm-classic"),
        (args.native_zero, "native-zero"),
    ];
    match igvm_only.iter().find(|(on, _)| *on) {
        Some((_, name)) if args.igvm.is_none() => Err(RunError::IgvmOnly { option: name }),
        _ => Ok(()),
    }
}

/// Run a guest as `args` ask and summarise it.
pub fn run(args: &RunArgs) -> Result<RunSummary, RunError> {
    check_options(args)?;
    let progress = progress::Progress::new(!args.json);
    match args.backend {
        BackendKind::Sim => sim::run(args, kind(args), &progress, &mut None),
        BackendKind::Kvm => kvm::run(args, &progress),
    }
}

/// `vmm run` on the simulator (whatever `args.backend` says), without a progress bar: the
/// summary `vmm run --json` prints, or why there is none, and the simulated machine the guest
/// ran on, once one was built (so that a test can hold the summary against the machine's own
/// frame ledger).
pub fn run_on_simulator(args: &RunArgs) -> (Result<RunSummary, RunError>, Option<Arc<backend_sim::Machine>>) {
    if let Err(e) = check_options(args) {
        return (Err(e), None);
    }
    let mut machine = None;
    let summary = sim::run(args, kind(args), &progress::Progress::hidden(), &mut machine);
    (summary, machine)
}

/// The kind of guest `args` ask for.
fn kind(args: &RunArgs) -> VmKind {
    if args.sev_es { VmKind::SevEs } else { VmKind::Snp }
}
