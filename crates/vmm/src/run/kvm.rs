//! `vmm run --backend kvm`: the same flow ([`super::flow`]) on `/dev/kvm`. backend-kvm picks
//! SEV-SNP where the host has it (a thin ioctl layer; the kernel owns the VMSAs) and VMSA-image
//! mode elsewhere (vmsa-core plays the SNP kernel over plain KVM), and says which and why. The
//! built-in guests are real programs here: on VMSA-image mode the BSP creates its APs from
//! VMSAs it writes; on SNP every vCPU terminates through the GHCB protocol.

use std::time::Duration;

use backend_kvm::guest::builtin::GuestProgram;
use backend_kvm::host::KvmHost;
use vmsa_core::{LaunchState, SNP_POLICY_RSVD_MBO};
use vmsa_host::Hypervisor;

use super::flow::{self, Launch};
use super::phases::Phases;
use super::progress::Progress;
use super::report::{LaunchSummary, Observed, RunSummary};
use super::scenario::GuestSpec;
use super::{RunArgs, RunError};

/// How long the guest may run before the watchdog kicks every vCPU out.
const WATCHDOG: Duration = Duration::from_secs(60);
/// The most guest memory this backend maps (the guest program's map is in the first 4 MiB).
const MAX_MEMORY: u64 = 64 << 30;
/// `--memory` when not given: what the guest program needs on the most vCPUs `--vcpus` allows.
/// KVM's memslot bookkeeping grows with the slot (rmap and page-tracking arrays, allocated and
/// zeroed at `KVM_SET_USER_MEMORY_REGION2` and freed at teardown), so the simulator's 1G would
/// cost every run ~0.7 ms for memory the guest never touches.
pub(super) const DEFAULT_MEMORY: &str = "4M";

/// The KVM guest program a built-in name runs.
fn program(spec: &GuestSpec) -> Result<(String, GuestProgram), RunError> {
    let name = match spec {
        GuestSpec::Builtin(n) => n.as_str(),
        GuestSpec::File(p) => {
            return Err(RunError::Input(format!(
                "--guest {}: scripted guests run on the simulator; the kvm backend runs its own guest programs (builtin:boot, builtin:ap-churn)",
                p.display()
            )));
        }
    };
    let recreate = match name {
        "boot" => false,
        "ap-churn" => true,
        other => {
            return Err(RunError::Input(format!(
                "--guest builtin:{other} needs the simulator (--backend sim); the kvm backend runs builtin:boot and builtin:ap-churn"
            )));
        }
    };
    Ok((name.to_owned(), GuestProgram::ApCreation { recreate }))
}

/// Refuse what the simulator alone has, and sizes the guest program cannot use.
fn check(args: &RunArgs) -> Result<(), RunError> {
    if args.sev_es {
        return Err(RunError::Input(
            "--sev-es: the kvm backend runs SEV-SNP where the host has it, else VMSA-image mode; it has no SEV-ES path".into(),
        ));
    }
    if let Some(path) = &args.igvm {
        return Err(RunError::Input(format!(
            "--igvm {}: the kvm backend cannot launch an IGVM file: in VMSA-image mode it runs only its own \
             integer-only guest programs, and the firmware an IGVM file carries (OVMF) needs a real SEV-SNP host \
             that takes supplied VMSAs; use --backend sim",
            path.display()
        )));
    }
    for (flag, given) in [
        ("--firmware", args.firmware.is_some()),
        ("--trace", args.trace.is_some()),
        ("--costs", args.costs.is_some()),
        ("--fault", args.fault.is_some()),
        ("--migrate", args.migrate),
        ("--dump-invalid-vmcb", args.dump_invalid_vmcb),
        ("--allow-debug", args.allow_debug),
        ("--sim-memory-budget", args.sim_memory_budget.is_some()),
    ] {
        if given {
            return Err(RunError::Input(format!(
                "{flag} belongs to the simulator (--backend sim); the kvm backend has no simulated firmware, costs, fault plan, migration, VMCB dumps or bookkeeping budget"
            )));
        }
    }
    let memory = args.memory.bytes();
    let need = GuestProgram::min_memory(args.vcpus.get());
    if memory < need || memory > MAX_MEMORY {
        return Err(RunError::Input(format!(
            "--memory {}: the kvm backend's guest program needs {} to {} for {} vCPUs",
            args.memory,
            crate::size::ByteSize::new(need),
            crate::size::ByteSize::new(MAX_MEMORY),
            args.vcpus.get()
        )));
    }
    Ok(())
}

/// Run the guest on KVM as `args` ask.
pub(super) fn run(args: &RunArgs, progress: &Progress) -> Result<RunSummary, RunError> {
    check(args)?;
    let (name, guest) = program(&args.guest)?;
    let vcpus = args.vcpus.get();
    let memory = args.memory.bytes();
    let host = KvmHost::new()?;
    let image = host.builtin_guest(&guest, vcpus)?;
    let policy = match &host {
        KvmHost::Snp(_) => backend_kvm::host::snp::default_policy(),
        KvmHost::Image(_) => SNP_POLICY_RSVD_MBO,
    };
    let launch = Launch::snp_image(memory, policy, image.gpa, &image.bytes, &image.vmsas);
    progress.message(format!("{vcpus} vCPUs running {name} on {}", host.name()));
    let mut phases = Phases::wall();
    let done = flow::run(&host, &launch, WATCHDOG, progress, &mut |p| phases.end(p))?;
    let launch_error = done.launch_error.as_ref().map(|e| super::error_chain(e));
    let seen = Observed::new(done.host, done.run);
    let mut summary = RunSummary {
        backend: "kvm",
        mode: host.mode().to_string(),
        mode_reason: Some(host.reason().to_owned()),
        vcpus,
        memory,
        memory_layout: "guest_memfd-backed RAM from GPA 0".into(),
        guest: args.guest.to_string(),
        scenario: name,
        ok: true,
        problems: Vec::new(),
        warnings: Vec::new(),
        launch: LaunchSummary {
            state: if launch_error.is_none() {
                LaunchState::Finished
            } else {
                LaunchState::Failed
            },
            error: launch_error,
            expected_failure: false,
            image: format!("backend-kvm guest program ({} KiB)", image.bytes.len() >> 10),
            data_pages: image.bytes.len().div_ceil(vmsa_core::PAGE_SIZE as usize) as u64,
            vmsas: vcpus,
            digest: seen.digest,
            expected_digest: None,
            digest_matches: None,
            policy,
        },
        migration: None,
        ownership: seen.ledger,
        guest_run: seen.guest_run,
        rmp_faults: seen.rmp_faults,
        faults_injected: Vec::new(),
        phases: phases.into_phases(),
        costs: None,
        teardown: seen.teardown,
        trace: None,
        footprint: None,
        hidden: seen.hidden,
    };
    summary.judge(false, true);
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::measure::MAX_VCPUS;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    #[test]
    fn the_default_memory_is_what_the_guest_program_needs_on_the_most_vcpus() {
        let default: crate::size::ByteSize = DEFAULT_MEMORY.parse().unwrap();
        assert_eq!(default.bytes(), GuestProgram::min_memory(MAX_VCPUS));
        let kvm = Cli::parse_from(["vmm", "--backend", "kvm"]).run;
        assert_eq!(kvm.memory.bytes(), 4 << 20);
        let sim = Cli::parse_from(["vmm"]).run;
        assert_eq!(sim.memory.bytes(), 1 << 30);
        let given = Cli::parse_from(["vmm", "--backend", "kvm", "--memory", "16M"]).run;
        assert_eq!(given.memory.bytes(), 16 << 20);
    }
}
