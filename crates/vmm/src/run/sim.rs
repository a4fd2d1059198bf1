//! `vmm run --backend sim`: the whole life of a confidential guest on backend-sim's SEV-SNP
//! host: build the simulated machine and its host from the simulator's options, load the guest
//! image into the VMM's memory, run the one launch-and-run flow ([`super::flow`]) over the host
//! interface, and report.

use std::path::Path;
use std::sync::Arc;

use backend_sim::guest::GuestAction;
use backend_sim::host::SimHost;
use backend_sim::{CostModel, FaultPlan, Machine, MachineConfig, PhaseClock};
use vmsa_core::{
    Gpa, LaunchState, PAGE_SIZE, SEV_POLICY_NODBG, SNP_POLICY_DEBUG, SNP_POLICY_RSVD_MBO, SevEsSaveArea,
    SnpPageType, VmConfig, VmKind,
};
use vmsa_host::{LaunchUpdate, MemoryRegion, VmSpec};

use super::flow::{self, Launch};
use super::igvm::IgvmLaunch;
use super::memory::GuestRam;
use super::phases::Phases;
use super::progress::Progress;
use super::report::{LaunchSummary, MigrationSummary, Observed, RunSummary, UnfiredFault};
use super::scenario::{GuestMemory, GuestSpec, Scenario};
use super::{RunArgs, RunError, WATCHDOG};
use crate::measure::command::{plan_input, read_firmware};
use crate::measure::plan::UpdateSource;
use crate::measure::reset::{BSP_EIP, reset_vmsa};
use crate::measure::vmm_types::VmmType;
use crate::measure::{DataUpdate, LaunchPlan, MeasureError, PlanConfig, VcpuCount};
use crate::output::OutputProblem;

/// Where the stand-in image of a guest without `--firmware` is loaded, and how big it is.
const SYNTHETIC_IMAGE_GPA: u64 = 0x10_0000;
const SYNTHETIC_IMAGE_LEN: u64 = 64 << 10;
/// The byte the stand-in image is made of (`HLT`).
const HLT: u8 = 0xf4;
/// The policies the launches use: QEMU's defaults (SNP: SMT allowed + reserved bit 17;
/// SEV-ES: NODBG + ES).
const SNP_POLICY: u64 = SNP_POLICY_RSVD_MBO | (1 << 16);
const SEV_ES_POLICY: u64 = 0x5;
/// Refuse a script action run by a vCPU the guest does not have, or covering pages past the end
/// of guest memory: the script knows nothing of --vcpus or memory, so the check is here, where
/// both are known. (The page count of one action is otherwise unbounded, and the watchdog only
/// looks between actions.)
fn check_actions(args: &RunArgs, scenario: &Scenario, ram: &GuestRam) -> Result<(), RunError> {
    let top = ram.regions().iter().map(|r| r.gpa.0 + r.len).max().unwrap_or(0);
    let vcpus = args.vcpus.get();
    for (index, a) in scenario.script.actions.iter().enumerate() {
        if a.vcpu() >= vcpus {
            return Err(RunError::ActionOnMissingVcpu {
                guest: args.guest(),
                index,
                action: a.name(),
                vcpu: a.vcpu(),
                vcpus,
            });
        }
        let Some((gpa, len)) = a.span() else { continue };
        if u128::from(gpa) + len > u128::from(top) {
            let pages = match *a {
                GuestAction::Pvalidate { pages, .. }
                | GuestAction::Write { pages, .. }
                | GuestAction::PageState { pages, .. } => pages,
                _ => 1,
            };
            return Err(RunError::ActionBeyondMemory {
                guest: args.guest(),
                index,
                action: a.name(),
                gpa,
                pages,
                top,
                memory: args.memory,
            });
        }
    }
    Ok(())
}

/// The simulated host's DRAM for a guest of `memory` bytes: the default 1 TiB, or twice the
/// guest's memory if that is more (its memory, the VMSAs and firmware pages, and room for the
/// allocator's alignment of 2 MiB folios). Untouched DRAM costs nothing.
fn host_bytes(memory: u64) -> u64 {
    memory.saturating_mul(2).max(backend_sim::memory::TIB)
}

/// What the launch measures: data pages, the VMSA register state per vCPU, and (with a
/// firmware) the digest `vmm measure` predicts for it.
struct Image {
    source: String,
    updates: Vec<DataUpdate>,
    vmsas: Vec<Box<SevEsSaveArea>>,
    config: VmConfig,
    expected: Option<String>,
    warnings: Vec<String>,
    /// The supplied-VMSA launch mode: the BSP's VMSA is one of `updates` (page type VMSA).
    supplied: bool,
    /// Guest memory for the image's pages outside RAM (an IGVM file's).
    image_pages: Option<Vec<Gpa>>,
}

impl Image {
    /// The launch of an OVMF image: the same plan `vmm measure` digests.
    fn firmware(path: &Path, kind: VmKind, vcpus: VcpuCount, args: &RunArgs) -> Result<Self, RunError> {
        let ovmf = read_firmware(path)?;
        let config = PlanConfig {
            kind,
            vcpus,
            vcpu_sig: args.vcpu_type().signature(),
            vmm_type: VmmType::Qemu,
            guest_features: match kind {
                VmKind::Snp => vmsa_core::layout::SEV_FEAT_SNP_ACTIVE,
                VmKind::SevEs => 0,
            },
        };
        let hashes = args.boot.hashes(&ovmf, kind, path)?;
        let plan =
            LaunchPlan::build(&ovmf, &config, hashes.as_ref()).map_err(|source| MeasureError::Plan {
                input: plan_input(&source, path),
                source,
            })?;
        Ok(Self {
            source: path.display().to_string(),
            updates: plan.data_updates().cloned().collect(),
            vmsas: plan.vmsas().map(|v| v.save_area.clone()).collect(),
            config: plan.vm_config(),
            expected: Some(plan.measure().hex()),
            warnings: plan.warnings().to_vec(),
            supplied: false,
            image_pages: None,
        })
    }

    /// The launch of an IGVM file, as every backend launches it ([`IgvmLaunch`]): its pages
    /// in directive order, the VP context's VMSA the BSP's (supplied-VMSA mode) or every
    /// vCPU's registers (classic mode, `--igvm-classic`).
    fn igvm(path: &Path, vcpus: u32, args: &RunArgs) -> Result<Self, RunError> {
        let l = IgvmLaunch::load(path, vcpus, args.native_zero, args.igvm_classic)?;
        Ok(Self {
            source: l.source,
            vmsas: (0..vcpus).map(|_| l.bsp.clone()).collect(),
            updates: l.updates,
            config: l.config,
            expected: l.expected,
            warnings: l.warnings,
            supplied: l.supplied,
            image_pages: Some(l.pages),
        })
    }

    /// A guest without firmware: a 64 KiB stand-in image of HLT instructions at 1 MiB, and the
    /// x86 reset state QEMU gives every vCPU.
    fn synthetic(kind: VmKind, vcpus: u32, args: &RunArgs) -> Self {
        let (config, features) = match kind {
            VmKind::Snp => (VmConfig::snp(0), vmsa_core::layout::SEV_FEAT_SNP_ACTIVE),
            VmKind::SevEs => (VmConfig::sev_es(0), 0),
        };
        let vmsa = reset_vmsa(BSP_EIP, features, args.vcpu_type().signature(), VmmType::Qemu);
        Self {
            source: format!(
                "built-in {} KiB HLT image at {SYNTHETIC_IMAGE_GPA:#x}",
                SYNTHETIC_IMAGE_LEN >> 10
            ),
            updates: vec![DataUpdate {
                gpa: Gpa(SYNTHETIC_IMAGE_GPA),
                len: SYNTHETIC_IMAGE_LEN,
                page_type: SnpPageType::Normal,
                contents: Some(vec![HLT; SYNTHETIC_IMAGE_LEN as usize]),
                source: UpdateSource::Firmware,
            }],
            vmsas: (0..vcpus).map(|_| vmsa.clone()).collect(),
            config,
            expected: None,
            warnings: Vec::new(),
            supplied: false,
            image_pages: None,
        }
    }
}

/// Load the image into guest memory: the launch reads it back from there, as KVM reads
/// `SNP_LAUNCH_UPDATE`'s `uaddr`. Each update's bytes are dropped once in guest memory, so an
/// image is held twice at most while it loads, not for the whole run.
fn load(ram: &GuestRam, image: &mut Image) -> Result<(), RunError> {
    for d in &mut image.updates {
        let what = format!("{} of the launch image", d.source);
        match d.contents.take() {
            Some(bytes) => ram.load(&what, d.gpa, &bytes)?,
            None => ram.require(&what, d.gpa, d.len)?,
        }
    }
    Ok(())
}

/// The guest policy of a `kind` launch: QEMU's default, with debugging allowed if asked.
fn policy(kind: VmKind, allow_debug: bool) -> u64 {
    match (kind, allow_debug) {
        (VmKind::Snp, false) => SNP_POLICY,
        (VmKind::Snp, true) => SNP_POLICY | SNP_POLICY_DEBUG,
        (VmKind::SevEs, false) => SEV_ES_POLICY,
        (VmKind::SevEs, true) => SEV_ES_POLICY & !SEV_POLICY_NODBG,
    }
}

/// Run the guest `args` name on the simulator as `args` ask; `machine` gets the simulated
/// machine once it is built.
pub(super) fn run(
    args: &RunArgs,
    kind: VmKind,
    progress: &Progress,
    machine_out: &mut Option<Arc<Machine>>,
) -> Result<RunSummary, RunError> {
    let vcpus = args.vcpus.get();
    if args.migrate && kind != VmKind::SevEs {
        return Err(RunError::MigrateNeedsSevEs);
    }
    if args.sim_memory_budget.is_some_and(|b| b.bytes() == 0) {
        // It would end every run at its first host write, with exit 1.
        return Err(RunError::ZeroSimMemoryBudget);
    }
    // Every input is checked before anything is created.
    let costs = match &args.costs {
        Some(p) => CostModel::from_file("--costs", p)?,
        None => CostModel::default(),
    };
    let extra: FaultPlan = match &args.fault {
        Some(spec) => {
            let plan: FaultPlan = spec.parse().map_err(RunError::Fault)?;
            if plan.pending().is_empty() {
                // Only commas and spaces: most likely an unset variable; leaving `--fault` out
                // says "no faults".
                return Err(RunError::NoFaultRule { spec: spec.clone() });
            }
            plan
        }
        None => FaultPlan::default(),
    };
    if let Some(trace) = &args.trace {
        let bad = |problem: OutputProblem| RunError::Trace {
            path: trace.clone(),
            problem,
        };
        if let Some(problem) = crate::output::unusable(trace) {
            return Err(bad(problem));
        }
        let target = crate::output::replace_target(trace).map_err(|e| bad(e.into()))?;
        // The trace replaces the file at its path; never one this run reads.
        let guest_file = match &args.guest {
            Some(GuestSpec::File(p)) => Some(p.as_path()),
            Some(GuestSpec::Builtin(_)) | None => None,
        };
        let inputs = [
            ("--firmware", args.firmware.as_deref()),
            ("--igvm", args.igvm.as_deref()),
            ("--costs", args.costs.as_deref()),
            ("--guest", guest_file),
            ("--kernel", args.boot.kernel.as_deref()),
            ("--initrd", args.boot.initrd.as_deref()),
        ];
        if let Some((option, _)) = inputs
            .iter()
            .find(|(_, input)| input.is_some_and(|p| crate::output::same_file(&target, p)))
        {
            return Err(bad(OutputProblem::IsAnInput { option }));
        }
        // Discover an unwritable directory now, not after the run: create (and remove) a file
        // beside the trace, under the temporary name it would take without unnamed files.
        let tmp = crate::output::temp_path(&target);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|_| std::fs::remove_file(&tmp))
            .map_err(|error| {
                bad(OutputProblem::Unwritable {
                    target: target.clone(),
                    error,
                })
            })?;
    }
    let mut image = match (&args.firmware, &args.igvm) {
        (Some(path), _) => Image::firmware(path, kind, args.vcpus, args)?,
        (None, Some(path)) => Image::igvm(path, vcpus, args)?,
        (None, None) => Image::synthetic(kind, vcpus, args),
    };
    let memory = args.memory.bytes();
    let rom = args.firmware.as_ref().map(|_| {
        image
            .updates
            .iter()
            .filter(|d| d.source == UpdateSource::Firmware)
            .map(|d| d.len)
            .sum()
    });
    let ram = match &image.image_pages {
        Some(pages) => GuestRam::with_image_pages(memory, pages)?,
        None => GuestRam::new(memory, rom)?,
    };
    // The guest knows its RAM and what the launch validated, as a real guest learns them from
    // the firmware's memory map.
    let guest_memory = GuestMemory {
        ram: ram
            .regions()
            .iter()
            .filter(|r| !r.rom)
            .map(|r| (r.gpa.0, r.gpa.0 + r.len))
            .collect(),
        launched: image
            .updates
            .iter()
            .map(|d| {
                (
                    d.gpa.0 & !(PAGE_SIZE - 1),
                    (d.gpa.0 + d.len).next_multiple_of(PAGE_SIZE),
                )
            })
            .collect(),
    };
    let guest = args.guest();
    let scenario = &Scenario::new(&guest, vcpus, kind, &guest_memory)?;
    let mut faults = scenario.faults.clone();
    // `extra` parsed as one plan, so a rule can only collide with the scenario's own.
    for rule in extra.pending() {
        faults.add(*rule).map_err(|error| RunError::FaultCollides {
            error,
            guest: guest.clone(),
        })?;
    }
    let injecting = !faults.pending().is_empty();
    // What the script touches, and the stand-in image (a firmware's or an IGVM file's pages
    // are placed, and checked, by the memory layout).
    let image_end = match (&args.firmware, &image.image_pages) {
        (None, None) => image.updates.iter().map(|d| d.gpa.0 + d.len).max().unwrap_or(0),
        _ => 0,
    };
    let need = scenario.min_memory.max(image_end);
    if memory < need {
        return Err(RunError::SimMemory {
            memory: args.memory,
            guest,
            need: crate::size::ByteSize::new(need),
        });
    }
    check_actions(args, scenario, &ram)?;
    load(&ram, &mut image)?;

    // The launch reads the image back from guest memory, as KVM reads `SNP_LAUNCH_UPDATE`'s
    // `uaddr`.
    let contents = image
        .updates
        .iter()
        .map(|d| match d.page_type {
            SnpPageType::Zero => Ok(None),
            _ => ram.read(&d.source.to_string(), d.gpa, d.len).map(Some),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let launch = Launch {
        spec: VmSpec {
            kind,
            vmsa_features: image.config.sev_features,
            supplied_vmsa: image.supplied,
        },
        memory: (0u32..)
            .zip(ram.regions())
            .map(|(slot, r)| MemoryRegion {
                slot,
                gpa: r.gpa,
                size: r.len,
                guest_memfd: true,
            })
            .collect(),
        policy: policy(kind, args.allow_debug),
        updates: image
            .updates
            .iter()
            .zip(&contents)
            .map(|(d, c)| LaunchUpdate {
                gpa: d.gpa,
                len: d.len,
                page_type: d.page_type,
                data: c.as_deref(),
            })
            .collect(),
        vmsas: &image.vmsas,
        supplied_vmsa: None,
        migrate: args.migrate,
    };

    let machine = Machine::new(MachineConfig {
        costs,
        faults,
        trace: args.trace.is_some(),
        gmem_2m_folios: scenario.gmem_2m_folios,
        host_bytes: host_bytes(memory),
        memory_budget: args
            .sim_memory_budget
            .map_or(backend_sim::DEFAULT_MEMORY_BUDGET, |b| b.bytes()),
        ..MachineConfig::default()
    });
    *machine_out = Some(machine.clone());
    let host =
        SimHost::new(machine.clone(), scenario.script.clone()).with_dump_invalid_vmcb(args.dump_invalid_vmcb);
    let mut phases = Phases::simulated(PhaseClock::new(&machine));
    let mut footprint = None;
    let done = flow::run(&host, &launch, WATCHDOG, progress, &mut |name| {
        if name == "run" {
            footprint = Some(machine.footprint());
        }
        phases.end(name)
    })?;

    if let Some(path) = &args.trace {
        crate::output::write_replacing(path, |out| Ok(machine.write_trace_json(out)?)).map_err(|error| {
            RunError::TraceWrite {
                path: path.clone(),
                error,
            }
        })?;
    }

    let launch_error = done.launch_error.as_ref().map(|e| super::error_chain(e));
    let migration = args.migrate.then(|| MigrationSummary {
        error: done.migration_error.as_ref().map(|e| super::error_chain(e)),
    });
    let mut seen = Observed::new(done.host, done.run);
    if let Some(g) = &mut seen.guest_run {
        g.expected_entry_failure = scenario.expect_entry_failure;
    }
    let finished = launch_error.is_none();
    let launch = LaunchSummary {
        state: if finished {
            LaunchState::Finished
        } else {
            LaunchState::Failed
        },
        error: launch_error,
        expected_failure: scenario.expect_launch_failure,
        image: image.source.clone(),
        data_pages: crate::measure::plan::data_pages(&image.updates),
        vmsas: if image.supplied { 1 } else { vcpus },
        // A launch that failed, on purpose or not, has no digest to compare (its failure is
        // the problem to report).
        digest_matches: image
            .expected
            .as_ref()
            .filter(|_| finished)
            .map(|e| seen.digest.as_ref() == Some(e)),
        digest: seen.digest,
        expected_digest: image.expected.clone(),
        policy: policy(kind, args.allow_debug),
    };
    // The plan as the run left it: one copy for the rules that fired and those that did not.
    let plan = machine.fault_plan();
    let mut summary = RunSummary {
        backend: "sim",
        mode: kind.to_string(),
        mode_reason: None,
        vcpus,
        memory,
        memory_layout: ram.describe(),
        guest: guest.to_string(),
        scenario: scenario.name.clone(),
        ok: true,
        problems: Vec::new(),
        warnings: image.warnings.clone(),
        launch,
        migration,
        ownership: seen.ledger,
        guest_run: seen.guest_run,
        rmp_faults: seen.rmp_faults,
        faults_injected: plan.fired().iter().map(|r| r.to_string()).collect(),
        faults_not_fired: plan
            .pending()
            .iter()
            .map(|r| UnfiredFault {
                rule: r.to_string(),
                calls: plan.calls_counted_by(r),
            })
            .collect(),
        phases: phases.into_phases(),
        costs: Some(machine.cost_report()),
        footprint,
        teardown: seen.teardown,
        trace: args.trace.as_ref().map(|p| p.display().to_string()),
        hidden: seen.hidden,
    };
    summary.judge(injecting, matches!(guest, super::GuestSpec::Builtin(_)));
    Ok(summary)
}
