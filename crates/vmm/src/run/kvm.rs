//! `vmm run --backend kvm`: the same flow ([`super::flow`]) on `/dev/kvm`. backend-kvm picks
//! SEV-SNP where the host has it (a thin ioctl layer; the kernel owns the VMSAs) and VMSA-image
//! mode elsewhere (vmsa-core plays the SNP kernel over plain KVM), and says which and why. The
//! built-in guests are real programs here: on VMSA-image mode the BSP creates its APs from
//! VMSAs it writes; on SNP every vCPU terminates through the GHCB protocol.
//!
//! `--igvm FILE` launches an IGVM file of one of those programs (`vmm igvm --guest`) in the
//! supplied-VMSA mode, through the loader every backend uses ([`super::igvm`]): the BSP starts
//! from the file's VP context, put into guest memory as a launch page of type VMSA; the APs
//! have no VMSA until the BSP creates them. Any other IGVM file is refused before `/dev/kvm` is
//! opened ([`KvmIgvmError`]).

use std::path::{Path, PathBuf};

use backend_kvm::guest::builtin::{GuestImage, GuestProgram, ap_creation_igvm};
use backend_kvm::host::KvmHost;
use vmsa_core::{LaunchState, SNP_POLICY_RSVD_MBO, SevEsSaveArea};
use vmsa_host::{Hypervisor, LaunchUpdate, MemoryRegion, VmSpec};

use super::flow::{self, Launch};
use super::igvm::IgvmLaunch;
use super::phases::Phases;
use super::progress::Progress;
use super::report::{LaunchSummary, Observed, RunSummary};
use super::scenario::{GuestSpec, ScenarioError};
use super::{RunArgs, RunError, WATCHDOG};
use crate::measure::LaunchDigest;
use crate::measure::igvm::{IgvmMeasureOptions, WrapError, guest_igvm_measured};

/// The most guest memory this backend maps (the guest program's map is in the first 4 MiB).
const MAX_MEMORY: u64 = 64 << 30;
/// `--memory` when not given: what the guest program needs on the most vCPUs `--vcpus` allows.
/// KVM's memslot bookkeeping grows with the slot (rmap and page-tracking arrays, allocated and
/// zeroed at `KVM_SET_USER_MEMORY_REGION2` and freed at teardown), so the simulator's 1G would
/// cost every run ~0.7 ms for memory the guest never touches.
pub(super) const DEFAULT_MEMORY: &str = "4M";

/// The kvm backend's guest programs, by built-in name: backend-kvm's AP-creation program, with
/// AP 1 destroyed and created again after the first round (`true`) or not.
const PROGRAMS: [(&str, bool); 2] = [("boot", false), ("ap-churn", true)];

/// The kvm backend's guest program `--guest` names (`vmm run --backend kvm`, `vmm igvm
/// --guest`): its name and re-creation flag, or `None` for any other guest.
pub(crate) fn ap_creation_program(spec: &GuestSpec) -> Option<(&'static str, bool)> {
    match spec {
        GuestSpec::Builtin(name) => PROGRAMS.iter().find(|(n, _)| n == name).copied(),
        GuestSpec::File(_) => None,
    }
}

/// The names of the kvm backend's guest programs, for refusals: `builtin:boot, ...`.
pub(crate) fn program_names() -> String {
    PROGRAMS
        .iter()
        .map(|(n, _)| format!("builtin:{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The KVM guest program a built-in name runs.
fn program(spec: &GuestSpec) -> Result<(String, GuestProgram), RunError> {
    let Some((name, recreate)) = ap_creation_program(spec) else {
        return Err(match spec {
            GuestSpec::File(script) => RunError::KvmScript {
                script: script.clone(),
            },
            GuestSpec::Builtin(name) => RunError::SimulatorBuiltin { name: name.clone() },
        });
    };
    Ok((name.to_owned(), GuestProgram::ApCreation { recreate }))
}

/// Refuse what the simulator alone has, and sizes the guest program cannot use.
fn check(args: &RunArgs) -> Result<(), RunError> {
    if args.sev_es {
        return Err(RunError::KvmSevEs);
    }
    if args.igvm_classic {
        return Err(KvmIgvmError::Classic.into());
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
        ("--vcpu-type", args.vcpu_type.is_some()),
    ] {
        if given {
            return Err(RunError::SimulatorOnly { option: flag });
        }
    }
    let memory = args.memory.bytes();
    super::memory::check_size(memory)?;
    let need = GuestProgram::min_memory(args.vcpus.get());
    if memory < need || memory > MAX_MEMORY {
        return Err(RunError::KvmMemory {
            memory: args.memory,
            need: crate::size::ByteSize::new(need),
            max: crate::size::ByteSize::new(MAX_MEMORY),
            vcpus: args.vcpus.get(),
        });
    }
    Ok(())
}

/// Why the kvm backend does not launch an IGVM file (refused before `/dev/kvm` is opened).
#[derive(Debug, thiserror::Error)]
pub enum KvmIgvmError {
    /// The file does not carry one of the kvm backend's guest programs.
    #[error(
        "--igvm {path}: the kvm backend runs only its own guest programs, as `vmm igvm --guest` writes them \
         ({names}), and this file is none of them (launch digest {digest}); its BSP starts {entry}, and \
         VMSA-image mode serves only those programs' exits (their debug ports and GHCB doorbell), with guest \
         memory from GPA 0 and no firmware interface or device model; launch it with --backend sim"
    )]
    NotAGuestProgram {
        /// The file.
        path: PathBuf,
        /// Its launch digest (`vmm measure --igvm`).
        digest: String,
        /// Where and in which mode its BSP starts (64-bit, protected or real mode).
        entry: String,
        /// The programs it could have been.
        names: String,
    },
    /// `--guest` beside `--igvm`: the file's own program runs.
    #[error(
        "--guest {guest}: with --backend kvm --igvm the file's own program runs (--guest is what runs in the \
         simulator's --igvm launch)"
    )]
    Guest {
        /// `--guest`.
        guest: GuestSpec,
    },
    /// The classic launch is not the kvm backend's.
    #[error(
        "--igvm-classic: the kvm backend launches an IGVM file in the supplied-VMSA mode only: its guest \
         program's APs start from the VMSAs the BSP writes, not from the VP context's registers"
    )]
    Classic,
    /// The host is SEV-SNP and takes supplied VMSAs, but the file's program is VMSA-image
    /// mode's (its AP creation is a doorbell only that mode serves, its page tables have no
    /// C-bit). A host without supplied VMSAs refuses the launch itself, with the probe's reason.
    #[error(
        "--igvm {path}: this host runs SEV-SNP, and the file's program is a VMSA-image mode program (its \
         doorbell and page tables are not SNP's); the kvm backend's SNP guest is built for the host's C-bit, \
         without --igvm"
    )]
    SnpHost {
        /// The file.
        path: PathBuf,
    },
    /// The IGVM form of one of the kvm backend's own programs, which the file is compared
    /// with, could not be built or measured (a defect of this program, not of the file).
    #[error("the IGVM form of builtin:{name} to compare the file with: {source}")]
    ProgramForm {
        /// The program.
        name: &'static str,
        /// What failed.
        #[source]
        source: WrapError,
    },
}

impl KvmIgvmError {
    /// 2 for a file or option the kvm backend does not take, 1 for its own failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::ProgramForm { .. } => 1,
            _ => 2,
        }
    }
}

/// Where and in which mode a VMSA starts its vCPU, for refusals: 64-bit mode (EFER.LMA and a
/// 64-bit code segment), else real mode (CR0.PE clear, CS base + IP), else protected mode.
fn describe_entry(v: &SevEsSaveArea) -> String {
    const CR0_PE: u64 = 1;
    const EFER_LMA: u64 = 1 << 10;
    const CS_L: u16 = 1 << 9;
    if v.efer & EFER_LMA != 0 && v.cs.attrib & CS_L != 0 {
        format!("in 64-bit mode at RIP {:#x}", v.rip)
    } else if v.cr0 & CR0_PE == 0 {
        format!(
            "in real mode at CS base {:#x} + IP {:#x} (CR0 {:#x})",
            v.cs.base, v.rip, v.cr0
        )
    } else {
        format!(
            "in protected mode at CS base {:#x} + EIP {:#x} (CR0 {:#x})",
            v.cs.base, v.rip, v.cr0
        )
    }
}

/// Load the IGVM file `path` for the kvm backend, which runs it only if it is one of its guest
/// programs: the file's launch digest (what `vmm measure --igvm` prints, covering every page's
/// address, type and measured contents and the VP context) must be that of `vmm igvm --guest
/// builtin:NAME`'s file for one of them. The pages then run from the file's own copy.
fn load_igvm(path: &Path, args: &RunArgs) -> Result<(IgvmLaunch, &'static str), RunError> {
    let launch = IgvmLaunch::load(path, args.vcpus.get(), args.native_zero, false)?;
    let opts = IgvmMeasureOptions {
        native_zero: args.native_zero,
        check_kvm: false,
    };
    for (name, recreate) in PROGRAMS {
        let (_, m) = guest_igvm_measured(&ap_creation_igvm(recreate), opts)
            .map_err(|source| KvmIgvmError::ProgramForm { name, source })?;
        if launch.expected.as_deref() == Some(LaunchDigest::Snp(m.digest).hex().as_str()) {
            return Ok((launch, name));
        }
    }
    Err(KvmIgvmError::NotAGuestProgram {
        path: path.to_path_buf(),
        digest: launch.expected.clone().unwrap_or_default(),
        entry: describe_entry(&launch.bsp),
        names: program_names(),
    }
    .into())
}

/// `ap-churn` destroys and re-creates AP 1: with no AP it would run as `boot` and report
/// `ok`. Refused as the simulator refuses it.
fn churn_has_an_ap(chosen: &Chosen, vcpus: u32) -> Result<(), RunError> {
    let churns = match chosen {
        Chosen::Program((_, GuestProgram::ApCreation { recreate })) => *recreate,
        Chosen::Program(_) => false,
        Chosen::Igvm((_, name)) => PROGRAMS.iter().any(|(n, recreate)| n == name && *recreate),
    };
    if churns && vcpus < 2 {
        return Err(ScenarioError::TooFewVcpus {
            name: "ap-churn".into(),
            min: 2,
            got: vcpus,
        }
        .into());
    }
    Ok(())
}

/// What `--guest` or `--igvm` chose, before the host (whose mode a built-in image depends on)
/// is known.
enum Chosen {
    /// A built-in program: its name and the program.
    Program((String, GuestProgram)),
    /// An IGVM file of one: the file, ready to launch, and the program's name.
    Igvm((IgvmLaunch, &'static str)),
}

/// What the kvm backend launches: a built-in program as this host's mode runs it, or an IGVM
/// file of one.
enum Guest {
    /// `--guest builtin:NAME`.
    Builtin {
        /// The program's name.
        name: String,
        /// Its image and every vCPU's initial state.
        image: GuestImage,
    },
    /// `--igvm FILE`.
    Igvm {
        /// The program's name.
        name: &'static str,
        /// The file, ready to launch.
        launch: IgvmLaunch,
        /// One initial state per vCPU (the supplied-VMSA launch sets none of them: the flow
        /// takes the vCPU count from it).
        vmsas: Vec<Box<SevEsSaveArea>>,
    },
}

impl Guest {
    /// The flow's launch of this guest in `memory` bytes from GPA 0, with `policy`.
    fn launch(&self, memory: u64, policy: u64) -> Launch<'_> {
        match self {
            Self::Builtin { image, .. } => {
                Launch::snp_image(memory, policy, image.gpa, &image.bytes, &image.vmsas)
            }
            Self::Igvm { launch, vmsas, .. } => Launch {
                spec: VmSpec::snp(launch.config.sev_features).with_supplied_vmsa(),
                memory: vec![MemoryRegion::ram(memory)],
                policy,
                updates: launch
                    .updates
                    .iter()
                    .map(|d| LaunchUpdate {
                        gpa: d.gpa,
                        len: d.len,
                        page_type: d.page_type,
                        data: d.contents.as_deref(),
                    })
                    .collect(),
                vmsas,
                supplied_vmsa: None,
                migrate: false,
            },
        }
    }

    /// The program's name.
    fn name(&self) -> &str {
        match self {
            Self::Builtin { name, .. } => name,
            Self::Igvm { name, .. } => name,
        }
    }
}

/// Run the guest on KVM as `args` ask.
pub(super) fn run(args: &RunArgs, progress: &Progress) -> Result<RunSummary, RunError> {
    check(args)?;
    let vcpus = args.vcpus.get();
    let memory = args.memory.bytes();
    // Every input is read and checked before /dev/kvm is opened.
    let chosen = match (&args.igvm, &args.guest) {
        (Some(path), None) => Chosen::Igvm(load_igvm(path, args)?),
        (Some(_), Some(guest)) => {
            return Err(KvmIgvmError::Guest { guest: guest.clone() }.into());
        }
        (None, _) => Chosen::Program(program(&args.guest())?),
    };
    churn_has_an_ap(&chosen, vcpus)?;
    let host = KvmHost::new()?;
    // The built-in program's image depends on the host's mode; an IGVM file's does not.
    let guest = match chosen {
        Chosen::Program((name, program)) => Guest::Builtin {
            name,
            image: host.builtin_guest(&program, vcpus)?,
        },
        Chosen::Igvm((launch, name)) => Guest::Igvm {
            name,
            vmsas: (0..vcpus).map(|_| launch.bsp.clone()).collect(),
            launch,
        },
    };
    if let (KvmHost::Snp(_), Some(path)) = (&host, &args.igvm)
        && host.capabilities().supplied_vmsa
    {
        return Err(KvmIgvmError::SnpHost { path: path.clone() }.into());
    }
    let policy = match &host {
        KvmHost::Snp(_) => backend_kvm::host::snp::default_policy(),
        KvmHost::Image(_) => SNP_POLICY_RSVD_MBO,
    };
    let launch = guest.launch(memory, policy);
    progress.message(format!(
        "{vcpus} vCPUs running {} on {}",
        guest.name(),
        host.name()
    ));
    let mut phases = Phases::wall();
    let done = flow::run(&host, &launch, WATCHDOG, progress, &mut |p| phases.end(p))?;
    let launch_error = done.launch_error.as_ref().map(|e| super::error_chain(e));
    let seen = Observed::new(done.host, done.run);
    let (image, data_pages, vmsas, expected, warnings, guest_name) = match &guest {
        Guest::Builtin { image, .. } => (
            format!("backend-kvm guest program ({} KiB)", image.bytes.len() >> 10),
            image.bytes.len().div_ceil(vmsa_core::PAGE_SIZE as usize) as u64,
            vcpus,
            None,
            Vec::new(),
            args.guest().to_string(),
        ),
        Guest::Igvm { name, launch, .. } => (
            launch.source.clone(),
            launch.data_pages(),
            1,
            launch.expected.clone(),
            launch.warnings.clone(),
            format!("builtin:{name} (from the IGVM file)"),
        ),
    };
    let mut summary = RunSummary {
        backend: "kvm",
        mode: host.mode().to_string(),
        mode_reason: Some(host.reason().to_owned()),
        vcpus,
        memory,
        memory_layout: host.memory_layout(),
        guest: guest_name,
        scenario: guest.name().to_owned(),
        ok: true,
        problems: Vec::new(),
        warnings,
        launch: LaunchSummary {
            state: if launch_error.is_none() {
                LaunchState::Finished
            } else {
                LaunchState::Failed
            },
            error: launch_error,
            expected_failure: false,
            image,
            data_pages,
            vmsas,
            // Where the host measures (SNP), the digest is compared; VMSA-image mode measures
            // nothing (its report says so under `hidden`).
            digest_matches: seen.digest.as_ref().zip(expected.as_ref()).map(|(d, e)| d == e),
            digest: seen.digest,
            expected_digest: expected,
            policy,
        },
        migration: None,
        ownership: seen.ledger,
        guest_run: seen.guest_run,
        rmp_faults: seen.rmp_faults,
        faults_injected: Vec::new(),
        faults_not_fired: Vec::new(),
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
    use crate::measure::igvm::{guest_to_igvm, measure_file};
    use crate::run::igvm::tests::scratch_igvm;

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

    #[test]
    fn entries_are_described_by_their_mode() {
        let long = backend_kvm::guest::layout::long_mode_image(0x8000);
        assert_eq!(describe_entry(&long), "in 64-bit mode at RIP 0x8000");
        let mut real = SevEsSaveArea::boxed();
        real.cr0 = 0x10;
        real.cs.base = 0xffff_0000;
        real.rip = 0xfff0;
        assert_eq!(
            describe_entry(&real),
            "in real mode at CS base 0xffff0000 + IP 0xfff0 (CR0 0x10)"
        );
        let mut protected = real.clone();
        protected.cr0 = 0x11;
        assert!(describe_entry(&protected).starts_with("in protected mode"));
        // Long mode active but a 32-bit code segment (compatibility mode) is not 64-bit mode.
        let mut compat = long.clone();
        compat.cs.attrib &= !(1 << 9);
        assert!(describe_entry(&compat).starts_with("in protected mode"));
    }

    #[test]
    fn the_kvm_programs_are_named_once() {
        let spec = |s: &str| s.parse::<GuestSpec>().unwrap();
        assert_eq!(ap_creation_program(&spec("builtin:boot")), Some(("boot", false)));
        assert_eq!(
            ap_creation_program(&spec("builtin:ap-churn")),
            Some(("ap-churn", true))
        );
        assert_eq!(ap_creation_program(&spec("builtin:reset")), None);
        assert_eq!(ap_creation_program(&spec("guest.json")), None);
        assert_eq!(program_names(), "builtin:boot, builtin:ap-churn");
        assert!(matches!(
            program(&spec("builtin:ap-churn")),
            Ok((n, GuestProgram::ApCreation { recreate: true })) if n == "ap-churn"
        ));
        let e = program(&spec("builtin:linux-boot")).unwrap_err().to_string();
        assert!(
            e.starts_with("--guest builtin:linux-boot needs the simulator"),
            "{e}"
        );
    }

    #[test]
    fn igvm_files_of_the_kvm_programs_load_and_others_are_refused_in_one_line() {
        for (name, recreate) in PROGRAMS {
            let file = guest_to_igvm(&ap_creation_igvm(recreate)).unwrap();
            let path = scratch_igvm(&format!("kvm-{name}.igvm"), &file);
            for vcpus in ["1", "4"] {
                let args = Cli::parse_from([
                    "vmm",
                    "--backend",
                    "kvm",
                    "--vcpus",
                    vcpus,
                    "--igvm",
                    path.to_str().unwrap(),
                ])
                .run;
                let (launch, found) = load_igvm(&path, &args).unwrap();
                assert_eq!(found, name);
                assert!(launch.supplied);
                // The VP count the BSP reads is the run's.
                let params = launch
                    .updates
                    .iter()
                    .find(|d| d.gpa.0 == backend_kvm::guest::layout::IGVM_PARAMS_GPA)
                    .unwrap();
                let count = u32::from_le_bytes(params.contents.as_ref().unwrap()[..4].try_into().unwrap());
                assert_eq!(count.to_string(), vcpus);
            }
        }
        // A file whose BSP starts in real mode, like wrapped OVMF: refused with the rule, the
        // digest and where the BSP starts.
        let mut vmsa = SevEsSaveArea::boxed();
        vmsa.cr0 = 0x10;
        vmsa.cs.base = 0xffff_0000;
        vmsa.rip = 0xfff0;
        vmsa.sev_features = vmsa_core::layout::SEV_FEAT_SNP_ACTIVE;
        let other = backend_kvm::guest::builtin::IgvmGuest {
            bsp: vmsa,
            ..ap_creation_igvm(false)
        };
        let file = guest_to_igvm(&other).unwrap();
        let path = scratch_igvm("kvm-real-mode.igvm", &file);
        let args = Cli::parse_from(["vmm", "--backend", "kvm", "--igvm", path.to_str().unwrap()]).run;
        let e = load_igvm(&path, &args).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let line = e.to_string();
        assert!(!line.contains('\n'), "{line}");
        let digest = LaunchDigest::Snp(measure_file(&file, Default::default()).unwrap().digest).hex();
        for part in [
            format!(
                "--igvm {}: the kvm backend runs only its own guest programs",
                path.display()
            ),
            format!("launch digest {digest}"),
            "in real mode at CS base 0xffff0000 + IP 0xfff0 (CR0 0x10)".to_owned(),
            "--backend sim".to_owned(),
        ] {
            assert!(line.contains(&part), "{part:?} in {line}");
        }
    }

    #[test]
    fn the_classic_igvm_launch_is_refused() {
        let args = Cli::parse_from(["vmm", "--backend", "kvm", "--igvm", "x.igvm", "--igvm-classic"]).run;
        let e = check(&args).unwrap_err();
        assert!(matches!(e, RunError::KvmIgvm(KvmIgvmError::Classic)), "{e:?}");
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn ap_churn_without_an_ap_is_refused_as_on_the_simulator() {
        // It ran as `boot` and reported ok.
        let chosen = Chosen::Program(program(&GuestSpec::Builtin("ap-churn".into())).unwrap());
        let e = churn_has_an_ap(&chosen, 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "builtin:ap-churn needs at least 2 vCPUs (got --vcpus 1)"
        );
        assert_eq!(e.exit_code(), 2);
        assert!(churn_has_an_ap(&chosen, 2).is_ok());
        let boot = Chosen::Program(program(&GuestSpec::Builtin("boot".into())).unwrap());
        assert!(churn_has_an_ap(&boot, 1).is_ok());
    }

    #[test]
    fn memory_that_is_not_whole_pages_is_refused_before_kvm_is_opened() {
        // It was a failed launch (exit 1, from KVM_SET_USER_MEMORY_REGION2), where the
        // simulator refuses it as input.
        let args = Cli::parse_from(["vmm", "--backend", "kvm", "--memory", "4097K"]).run;
        let e = check(&args).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--memory 4097KiB: guest memory must be a non-zero multiple of 4 KiB"
        );
        assert_eq!(e.exit_code(), 2);
    }
}
