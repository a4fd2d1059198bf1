//! The built-in guests of `vmm run --guest builtin:NAME`, and guests loaded from files.
//!
//! A built-in is a scripted guest for the simulator (the guest side of every GHCB path, see
//! `backend_sim::guest`), sometimes with failures to inject, and what its run must show. On the
//! KVM backend the names map to the real guest programs of `backend_kvm` where one exists.

use std::path::{Path, PathBuf};

use backend_sim::FaultPlan;
use backend_sim::guest::{GuestAction, GuestScript, LinuxBootLayout, linux_boot_min_ram, smp_boot_vmsa_gpa};
use vmsa_core::{PAGE_SIZE, VmKind};

/// Where the built-in guests' AP regions are counted from: AP `i` has the 2 MiB region at
/// `i` × 2 MiB (its VMSA one page in), so the first 2 MiB are the BSP's (and the image's) and
/// `n` vCPUs fit in `n` × 2 MiB of guest memory (512 in the default 1 GiB).
const VMSA_BASE: u64 = 0;

/// How many create/destroy rounds `ap-churn` runs per AP.
pub const CHURN_ROUNDS: u32 = 8;

/// The built-in guests, with a line on what each shows.
pub const BUILTINS: &[(&str, &str)] = &[
    (
        "boot",
        "the BSP launches from a host VMSA and creates every AP from a VMSA it builds itself",
    ),
    ("ap-churn", "APs created, destroyed and re-created many times"),
    (
        "reset",
        "AP_CREATE_ON_INIT: the requested VMSA waits until INIT, then replaces the running one",
    ),
    (
        "launch-fail",
        "the firmware refuses the last vCPU's VMSA at launch; the page is reclaimed, nothing leaks",
    ),
    (
        "linux-boot",
        "a Linux guest's way up: PVALIDATE of all RAM (2 MiB pages where aligned, on 2 MiB guest_memfd folios), a 64 MiB bounce buffer made shared, every AP created through the GHCB",
    ),
    (
        "linux-boot-4k",
        "linux-boot with everything at 4 KiB: 4 KiB guest_memfd folios, RMP entries and PVALIDATEs",
    ),
    (
        "vmrun-fail",
        "the BSP creates AP 1 from a page it never made a VMSA (no RMPADJUST): the AP's VMRUN fails and the run ends with KVM_EXIT_FAIL_ENTRY; with --dump-invalid-vmcb --allow-debug the host dumps the page, decrypted",
    ),
];

/// What `--guest` named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestSpec {
    /// `builtin:NAME`.
    Builtin(String),
    /// A JSON guest script.
    File(PathBuf),
}

/// Why `--guest` names no guest.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuestSpecError {
    /// `builtin:NAME` with a name no built-in has.
    #[error("'builtin:{name}' is not a built-in guest (known: {})", names())]
    UnknownBuiltin {
        /// The name given.
        name: String,
    },
    /// An empty file name.
    #[error("the guest file name is empty")]
    Empty,
}

impl std::str::FromStr for GuestSpec {
    type Err = GuestSpecError;

    fn from_str(s: &str) -> Result<Self, GuestSpecError> {
        match s.strip_prefix("builtin:") {
            Some(name) if BUILTINS.iter().any(|(n, _)| *n == name) => Ok(Self::Builtin(name.into())),
            Some(name) => Err(GuestSpecError::UnknownBuiltin { name: name.into() }),
            None if s.is_empty() => Err(GuestSpecError::Empty),
            None => Ok(Self::File(PathBuf::from(s))),
        }
    }
}

impl GuestSpec {
    /// Parse `--guest` from the command line as the OS gave it: a file name need not be UTF-8
    /// (only `builtin:NAME` must be).
    pub fn from_os(s: std::ffi::OsString) -> Result<Self, GuestSpecError> {
        match s.into_string() {
            Ok(text) => text.parse(),
            Err(raw) => Ok(Self::File(PathBuf::from(raw))),
        }
    }
}

impl std::fmt::Display for GuestSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Builtin(n) => write!(f, "builtin:{n}"),
            Self::File(p) => write!(f, "{}", p.display()),
        }
    }
}

fn names() -> String {
    BUILTINS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// A guest ready to run on the simulator.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Its name (the built-in's, or the script's / file's).
    pub name: String,
    /// The guest's actions.
    pub script: GuestScript,
    /// Failures the run injects.
    pub faults: FaultPlan,
    /// Whether the launch is meant to fail (the run then shows the recovery, not the guest).
    pub expect_launch_failure: bool,
    /// Whether the run is meant to end with a vCPU whose VMRUN failed.
    pub expect_entry_failure: bool,
    /// The least guest memory the script needs, in bytes: the end of the highest page its
    /// actions name (a built-in's; 0 for a file, whose actions are checked one by one).
    pub min_memory: u64,
    /// Whether guest_memfd hands out 2 MiB folios (so that KVM can make 2 MiB RMP entries)
    /// rather than 4 KiB ones.
    pub gmem_2m_folios: bool,
}

/// The guest memory a scenario runs in: what it may touch and what the launch already did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestMemory {
    /// RAM, `[start, end)` byte ranges in address order (the first at 0).
    pub ram: Vec<(u64, u64)>,
    /// Ranges the launch measured and so validated, `[start, end)`.
    pub launched: Vec<(u64, u64)>,
}

/// Why a guest cannot run as asked.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The built-in needs more vCPUs.
    #[error("builtin:{name} needs at least {min} vCPUs (got --vcpus {got})")]
    TooFewVcpus {
        /// The built-in.
        name: String,
        /// Its minimum.
        min: u32,
        /// What was asked.
        got: u32,
    },
    /// The built-in needs SEV-SNP.
    #[error(
        "builtin:{name} needs an SEV-SNP guest (AP creation and the RMP are SNP features); drop --sev-es"
    )]
    NeedsSnp {
        /// The built-in.
        name: String,
    },
    /// The built-in needs more low RAM than `--memory` gives.
    #[error(
        "--memory {}: builtin:{name} needs at least {} of guest RAM from address 0",
        crate::size::ByteSize::new(*got),
        crate::size::ByteSize::new(*min)
    )]
    TooLittleMemory {
        /// The built-in.
        name: String,
        /// Its minimum, in bytes.
        min: u64,
        /// The RAM from address 0 the layout has, in bytes.
        got: u64,
    },
    /// Enough RAM, but no room for linux-boot's bounce buffer clear of the pages the launch
    /// measured (a firmware's SEV metadata sections): Linux never converts those to shared.
    #[error(
        "--memory {}: builtin:{name} finds no room for its bounce buffer in guest RAM clear of the pages the launch measured; give more memory",
        crate::size::ByteSize::new(*got)
    )]
    NoBounceBuffer {
        /// The built-in.
        name: String,
        /// The RAM from address 0 the layout has, in bytes.
        got: u64,
    },
    /// The script file could not be used.
    #[error(transparent)]
    Script(#[from] backend_sim::guest::ScriptError),
    /// The script has no actions.
    #[error("--guest {}: the guest script has no actions; it needs at least one", .0.display())]
    NoActions(PathBuf),
    /// `--guest` names no guest (a [`GuestSpec`] built directly, not parsed).
    #[error(transparent)]
    Spec(#[from] GuestSpecError),
    /// A built-in's own fault rule was refused.
    #[error("builtin:{name}'s fault rule: {error}")]
    BuiltinFault {
        /// The built-in.
        name: &'static str,
        /// The refusal.
        error: backend_sim::FaultSpecError,
    },
}

impl Scenario {
    /// The guest `spec` names, for `vcpus` vCPUs of a `kind` guest in `memory`.
    pub fn new(
        spec: &GuestSpec,
        vcpus: u32,
        kind: VmKind,
        memory: &GuestMemory,
    ) -> Result<Self, ScenarioError> {
        match spec {
            GuestSpec::File(path) => Self::from_file(path),
            GuestSpec::Builtin(name) => Self::builtin(name, vcpus, kind, memory),
        }
    }

    fn from_file(path: &Path) -> Result<Self, ScenarioError> {
        let script = GuestScript::from_file("--guest", path)?;
        if script.actions.is_empty() {
            return Err(ScenarioError::NoActions(path.to_path_buf()));
        }
        let name = if script.name.is_empty() {
            path.file_stem()
                .map_or_else(String::new, |s| s.to_string_lossy().into_owned())
        } else {
            script.name.clone()
        };
        Ok(Self {
            name,
            script,
            faults: FaultPlan::default(),
            expect_launch_failure: false,
            expect_entry_failure: false,
            min_memory: 0,
            gmem_2m_folios: false,
        })
    }

    fn builtin(name: &str, vcpus: u32, kind: VmKind, memory: &GuestMemory) -> Result<Self, ScenarioError> {
        let need = |min: u32| {
            if vcpus < min {
                Err(ScenarioError::TooFewVcpus {
                    name: name.into(),
                    min,
                    got: vcpus,
                })
            } else {
                Ok(())
            }
        };
        let snp = || {
            if kind == VmKind::Snp {
                Ok(())
            } else {
                Err(ScenarioError::NeedsSnp { name: name.into() })
            }
        };
        let mut min_memory = None;
        let mut gmem_2m_folios = false;
        let mut faults = FaultPlan::default();
        let (script, expect_launch_failure) = match name {
            // SEV-ES guests have no AP creation: their APs run from launched host VMSAs, so
            // the SEV-ES boot is the BSP's.
            "boot" if kind == VmKind::SevEs => (
                GuestScript {
                    name: "boot".into(),
                    actions: vec![GuestAction::Run { vcpu: 0 }, GuestAction::Hlt { vcpu: 0 }],
                },
                false,
            ),
            "boot" => (named("boot", GuestScript::smp_boot(vcpus, VMSA_BASE)), false),
            "ap-churn" => {
                need(2)?;
                snp()?;
                (ap_churn(vcpus, CHURN_ROUNDS), false)
            }
            "reset" => {
                need(2)?;
                snp()?;
                (reset(vcpus), false)
            }
            "launch-fail" => {
                snp()?;
                let spec = format!("snp_launch_update:vmsa:{vcpus}=INVALID_PAGE_STATE");
                faults = spec.parse().map_err(|error| ScenarioError::BuiltinFault {
                    name: "launch-fail",
                    error,
                })?;
                (
                    named("launch-fail", GuestScript::smp_boot(vcpus, VMSA_BASE)),
                    true,
                )
            }
            "vmrun-fail" => {
                need(2)?;
                snp()?;
                (vmrun_fail(), false)
            }
            "linux-boot" | "linux-boot-4k" => {
                snp()?;
                let got = memory.ram.first().filter(|r| r.0 == 0).map_or(0, |r| r.1);
                let layout = LinuxBootLayout::new(vcpus, memory.ram.clone(), memory.launched.clone())
                    .ok_or_else(|| {
                        let min = linux_boot_min_ram(vcpus);
                        if got < min {
                            ScenarioError::TooLittleMemory {
                                name: name.into(),
                                min,
                                got,
                            }
                        } else {
                            ScenarioError::NoBounceBuffer {
                                name: name.into(),
                                got,
                            }
                        }
                    })?;
                gmem_2m_folios = name == "linux-boot";
                min_memory = Some(linux_boot_min_ram(vcpus));
                (GuestScript::linux_boot(vcpus, &layout, gmem_2m_folios), false)
            }
            other => {
                return Err(GuestSpecError::UnknownBuiltin {
                    name: other.to_owned(),
                }
                .into());
            }
        };
        let min_memory = min_memory.unwrap_or_else(|| touched_end(&script));
        Ok(Self {
            name: name.into(),
            script,
            faults,
            expect_launch_failure,
            expect_entry_failure: name == "vmrun-fail",
            min_memory,
            gmem_2m_folios,
        })
    }
}

/// The end of the highest guest page `script`'s actions name (0 if they name none): the least
/// memory from address 0 it runs in.
fn touched_end(script: &GuestScript) -> u64 {
    script
        .actions
        .iter()
        .map(|a| match *a {
            GuestAction::WriteVmsa { gpa, .. }
            | GuestAction::MakeVmsa { gpa, .. }
            | GuestAction::ApCreate { gpa, .. } => u128::from(gpa) + u128::from(PAGE_SIZE),
            _ => a.span().map_or(0, |(gpa, len)| u128::from(gpa) + len),
        })
        .max()
        .map_or(0, |end| u64::try_from(end).unwrap_or(u64::MAX))
}

fn named(name: &str, mut s: GuestScript) -> GuestScript {
    s.name = name.into();
    s
}

/// The BSP builds a VMSA in its page at `gpa` (validate, write, RMPADJUST).
fn prepare_vmsa(a: &mut Vec<GuestAction>, gpa: u64, rip: u64) {
    a.extend(GuestAction::vmsa_setup(0, gpa, rip, 0x8_0000));
}

/// The BSP asks for `ap` to run from the VMSA at `gpa`, now or (`on_init`) at its next INIT.
fn ap_create(a: &mut Vec<GuestAction>, ap: u32, gpa: u64, on_init: bool) {
    a.push(GuestAction::ap_create(0, ap, gpa, on_init));
}

/// The BSP takes a VMSA page out of service: RMPADJUST clears the VMSA bit, PVALIDATE rescinds.
fn retire_vmsa(a: &mut Vec<GuestAction>, gpa: u64) {
    a.push(GuestAction::MakeVmsa {
        vcpu: 0,
        gpa,
        vmsa: false,
    });
    a.push(GuestAction::pvalidate_4k(0, gpa, false));
}

/// `ap-churn`: every round, each AP gets a fresh VMSA (alternating between two pages of its
/// region), runs, halts and is destroyed; the old page is retired before it is reused.
fn ap_churn(vcpus: u32, rounds: u32) -> GuestScript {
    let mut a = Vec::new();
    for round in 0..rounds {
        for ap in 1..vcpus {
            let gpa = smp_boot_vmsa_gpa(VMSA_BASE, ap) + u64::from(round % 2) * PAGE_SIZE;
            prepare_vmsa(&mut a, gpa, 0x10_0000 + u64::from(round) * 0x10);
            ap_create(&mut a, ap, gpa, false);
            a.push(GuestAction::Run { vcpu: ap });
            a.push(GuestAction::Hlt { vcpu: ap });
            a.push(GuestAction::ApDestroy { vcpu: 0, apic_id: ap });
            retire_vmsa(&mut a, gpa);
        }
    }
    a.push(GuestAction::Hlt { vcpu: 0 });
    GuestScript {
        name: "ap-churn".into(),
        actions: a,
    }
}

/// `reset`: AP 1 is created with CREATE_ON_INIT and starts only at the INIT the BSP sends;
/// then, while it runs, a second CREATE_ON_INIT names another VMSA, which replaces the running
/// one at the next INIT. The other APs boot normally. Finally every AP is destroyed.
fn reset(vcpus: u32) -> GuestScript {
    let mut a = Vec::new();
    let first = smp_boot_vmsa_gpa(VMSA_BASE, 1);
    let second = first + PAGE_SIZE;
    prepare_vmsa(&mut a, first, 0x10_0000);
    ap_create(&mut a, 1, first, true);
    a.push(GuestAction::SendInit { vcpu: 0, apic_id: 1 });
    a.push(GuestAction::Run { vcpu: 1 });
    prepare_vmsa(&mut a, second, 0x20_0000);
    ap_create(&mut a, 1, second, true);
    a.push(GuestAction::Run { vcpu: 1 });
    a.push(GuestAction::SendInit { vcpu: 0, apic_id: 1 });
    a.push(GuestAction::Run { vcpu: 1 });
    a.push(GuestAction::Hlt { vcpu: 1 });
    for ap in 2..vcpus {
        let gpa = smp_boot_vmsa_gpa(VMSA_BASE, ap);
        prepare_vmsa(&mut a, gpa, 0x10_0000);
        ap_create(&mut a, ap, gpa, false);
        a.push(GuestAction::Hlt { vcpu: ap });
    }
    for ap in 1..vcpus {
        a.push(GuestAction::ApDestroy { vcpu: 0, apic_id: ap });
    }
    retire_vmsa(&mut a, first);
    retire_vmsa(&mut a, second);
    a.push(GuestAction::Hlt { vcpu: 0 });
    GuestScript {
        name: "reset".into(),
        actions: a,
    }
}

/// `vmrun-fail`: the BSP validates a page and writes an AP's entry state into it, but leaves
/// out the RMPADJUST that makes it a VMSA; AP_CREATE accepts the GPA (KVM checks no RMP bit
/// there), and the AP's VMRUN fails: the page lacks the RMP's VMSA bit (VMRUN's checks of the
/// VMSA page, APM table 15-41, as backend-sim's `vmrun` applies them). Its next KVM_RUN
/// reports the failed entry.
fn vmrun_fail() -> GuestScript {
    let gpa = smp_boot_vmsa_gpa(VMSA_BASE, 1);
    let [validate, write, _make_vmsa] = GuestAction::vmsa_setup(0, gpa, 0x10_0000, 0x8_0000);
    let a = vec![
        validate,
        write,
        GuestAction::ap_create(0, 1, gpa, false),
        // The AP's own KVM_RUN comes next and reports the failed entry.
        GuestAction::Run { vcpu: 1 },
        GuestAction::Hlt { vcpu: 0 },
    ];
    GuestScript {
        name: "vmrun-fail".into(),
        actions: a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmsa_core::PMD_SIZE;

    #[test]
    fn specs_parse_and_name_the_known_builtins() {
        assert_eq!(
            "builtin:boot".parse::<GuestSpec>(),
            Ok(GuestSpec::Builtin("boot".into()))
        );
        assert_eq!(
            "g.json".parse::<GuestSpec>(),
            Ok(GuestSpec::File("g.json".into()))
        );
        let e = "builtin:doom".parse::<GuestSpec>().unwrap_err().to_string();
        assert!(e.contains("boot, ap-churn, reset, launch-fail"), "{e}");
    }

    #[test]
    fn builtins_check_their_needs() {
        let spec = GuestSpec::Builtin("ap-churn".into());
        assert!(matches!(
            Scenario::new(&spec, 1, VmKind::Snp, &GuestMemory::default()),
            Err(ScenarioError::TooFewVcpus { ref name, min: 2, got: 1 }) if name == "ap-churn"
        ));
        // A name that `GuestSpec::from_str` would refuse, built directly.
        let e = Scenario::new(
            &GuestSpec::Builtin("doom".into()),
            1,
            VmKind::Snp,
            &GuestMemory::default(),
        )
        .unwrap_err();
        assert!(
            matches!(e, ScenarioError::Spec(GuestSpecError::UnknownBuiltin { .. })),
            "{e}"
        );
        assert!(
            e.to_string()
                .starts_with("'builtin:doom' is not a built-in guest (known: boot,"),
            "{e}"
        );
        assert!(matches!(
            Scenario::new(&spec, 4, VmKind::SevEs, &GuestMemory::default()),
            Err(ScenarioError::NeedsSnp { .. })
        ));
        let fail = Scenario::new(
            &GuestSpec::Builtin("launch-fail".into()),
            4,
            VmKind::Snp,
            &GuestMemory::default(),
        )
        .unwrap();
        assert!(fail.expect_launch_failure);
        assert_eq!(fail.faults.pending().len(), 1);
        // Named as every other --memory refusal: the option, its value, the rule.
        let small = GuestMemory {
            ram: vec![(0, 4096)],
            launched: vec![],
        };
        let e = Scenario::new(&GuestSpec::Builtin("linux-boot".into()), 1, VmKind::Snp, &small).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--memory 4KiB: builtin:linux-boot needs at least 8MiB of guest RAM from address 0"
        );
    }

    /// Regression: with 512 vCPUs the AP VMSAs need 4 MiB, so at 8 MiB they ran into the
    /// bounce buffer the guest had made shared (768 failed actions). The minimum now grows with
    /// the vCPU count, and a run at that minimum has no failed action.
    #[test]
    fn linux_boot_of_512_vcpus_at_its_minimum_memory_has_no_failed_action() {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: crate::run::RunArgs,
        }
        use clap::Parser as _;
        let run = |memory: &str| {
            let args = [
                "vmm",
                "--guest",
                "builtin:linux-boot",
                "--vcpus",
                "512",
                "--memory",
                memory,
            ];
            crate::run::run_on_simulator(&Cli::try_parse_from(args).unwrap().run).0
        };
        let e = run("8M").unwrap_err().to_string();
        assert_eq!(
            e,
            "--memory 8MiB: builtin:linux-boot needs at least 12MiB of guest RAM from address 0"
        );
        let s = run("12M").unwrap();
        let g = s.guest_run.expect("the guest ran");
        assert!(g.end == crate::run::flow::RunEnd::Done && g.failed == 0, "{g:?}");
    }

    #[test]
    fn churn_alternates_pages_and_never_uses_a_2m_aligned_vmsa() {
        let s = ap_churn(3, 4);
        let creates: Vec<u64> = s
            .actions
            .iter()
            .filter_map(|a| match a {
                GuestAction::ApCreate { gpa, apic_id: 1, .. } => Some(*gpa),
                _ => None,
            })
            .collect();
        assert_eq!(creates.len(), 4);
        assert_ne!(creates[0], creates[1]);
        assert_eq!(creates[0], creates[2]);
        assert!(creates.iter().all(|g| g % PMD_SIZE != 0));
    }
}
