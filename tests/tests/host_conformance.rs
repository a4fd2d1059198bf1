//! One conformance suite through the host interface (`vmsa-host`), on every host this machine
//! has: the simulator (`SimHost`), KVM's VMSA-image mode (`KvmImageHost`, real vCPUs on
//! `/dev/kvm`) and a real SEV-SNP KVM (`KvmSnpHost`, skipped with the probe's reason where the
//! host has no SNP). The scenario code is written once, generic over `H: Hypervisor`; the hosts
//! are listed once, in [`on_every_host`].
//!
//! - Launch, run and teardown through the VMM's one flow (`vmm::run::flow::run`) on 1, 4 and 64
//!   vCPUs, the guest creating every AP from a guest-owned VMSA, and once with an AP destroyed
//!   and created again: every host must end `Done` with the same per-vCPU ownership histories
//!   (operation and state kinds; frames and GPAs differ between hosts), no leak, the same
//!   teardown counts and no frame left allocated where the host can see its frames.
//! - KVM's refused orderings, one table run on every host: the same errno, naming the call.
//!
//! The guest is the same on every host as far as a host lets it be: every host gets the same
//! `Launch` (the memory, the built-in guest image of backend-kvm measured at GPA 0, one
//! long-mode VMSA per vCPU); KVM runs the program in that image, the simulator runs a script
//! doing the same steps ([`sim_script`]).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use backend_kvm::guest::builtin::GuestProgram;
use backend_kvm::guest::layout;
use backend_kvm::guest::program;
use backend_kvm::{KvmImageHost, KvmSnpHost, Mode};
use backend_sim::host::SimHost;
use backend_sim::{GuestAction, GuestScript, Machine, MachineConfig};
use scenario_tests::{OwnershipStep, ownership_histories};
use vmm::run::flow::{self, FlowReport, Launch, RunEnd};
use vmm::run::progress::Progress;
use vmsa_core::layout::SEV_FEAT_SNP_ACTIVE;
use vmsa_core::{Event, Gpa, SNP_POLICY_RSVD_MBO, SnpPageType, VmKind};
use vmsa_host::{
    Conversion, Errno, HostReport, Hypervisor, HypervisorError, MemoryRegion, Observed, TeardownCounts, Vcpu,
    VcpuError, Vm, VmError, VmSpec,
};

/// The tests take turns: KVM's vCPU threads on a 2-core machine, and timings worth printing.
static TURN: Mutex<()> = Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the guest does: create every AP (APIC IDs `1..vcpus`) from a guest-owned VMSA and,
/// with `recreate`, then destroy AP 1 and create it again from a new VMSA.
#[derive(Clone, Copy, Debug)]
struct Guest {
    vcpus: u32,
    recreate: bool,
    /// Launched in the supplied-VMSA mode: the BSP's VMSA at [`SUPPLIED_GPA`], no VMSA for the
    /// APs until the guest creates them.
    supplied: bool,
}

impl Guest {
    /// No guest at all (the refusal table never runs a vCPU).
    const NONE: Self = Self {
        vcpus: 1,
        recreate: false,
        supplied: false,
    };
}

/// Where a supplied BSP VMSA goes: a free page of the guest program's layout (below the AP
/// VMSAs at 2 MiB, above the program's pages), 4 KiB but not 2 MiB aligned.
const SUPPLIED_GPA: Gpa = Gpa(0x1f_f000);

/// Something to do on one host, whatever its type.
trait OnHost {
    type Out;
    fn on<H: Hypervisor>(&self, host: &H) -> Self::Out;
}

/// How one host took part.
struct HostRun<T> {
    label: &'static str,
    /// What the scenario returned, or why the host is not on this machine.
    out: Result<T, String>,
}

fn run_on<H: Hypervisor, F: OnHost>(
    label: &'static str,
    make: impl FnOnce() -> Result<H, String>,
    f: &F,
) -> HostRun<F::Out> {
    HostRun {
        label,
        out: make().map(|h| f.on(&h)),
    }
}

/// Every host this machine may have, in one place: a new backend is one line here. `guest` is
/// what the hosts whose guest is not in the image (the simulator) are to run.
fn on_every_host<F: OnHost>(guest: Guest, f: &F) -> Vec<HostRun<F::Out>> {
    let runs = vec![
        run_on("sim", || Ok(sim_host(guest)), f),
        run_on("kvm-image", kvm_image_host, f),
        run_on("kvm-snp", kvm_snp_host, f),
    ];
    let ran: Vec<_> = runs.iter().filter(|r| r.out.is_ok()).map(|r| r.label).collect();
    let skipped: Vec<_> = runs
        .iter()
        .filter_map(|r| {
            r.out
                .as_ref()
                .err()
                .map(|why| format!("{} skipped: {why}", r.label))
        })
        .collect();
    println!("conformance: {} ({})", ran.join(", "), skipped.join("; "));
    assert!(ran.contains(&"sim"), "the simulator runs everywhere");
    runs
}

/// The simulator on a fresh default machine, its guest running [`sim_script`].
fn sim_host(guest: Guest) -> SimHost {
    SimHost::new(Machine::new(MachineConfig::default()), sim_script(guest))
}

/// Why `/dev/kvm` cannot be used here, if it cannot.
fn kvm_unusable() -> Option<String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .err()
        .map(|e| format!("/dev/kvm is not usable here ({e})"))
}

fn kvm_image_host() -> Result<KvmImageHost, String> {
    if let Some(why) = kvm_unusable() {
        return Err(why);
    }
    KvmImageHost::new(&backend_kvm::probe(), "the conformance suite asks for it").map_err(|e| e.to_string())
}

fn kvm_snp_host() -> Result<KvmSnpHost, String> {
    if let Some(why) = kvm_unusable() {
        return Err(why);
    }
    let probe = backend_kvm::probe();
    if !probe.supports(Mode::Snp) {
        let why: Vec<_> = probe.missing(Mode::Snp).iter().map(ToString::to_string).collect();
        return Err(format!("no SEV-SNP here: {}", why.join("; ")));
    }
    KvmSnpHost::new(&probe).map_err(|e| e.to_string())
}

/// The simulator's stand-in for backend-kvm's guest program (`guest/program.rs`, the scenario
/// entry), step by step. The program's BSP, for each AP: copies the VMSA template to
/// `ap_vmsa_gpa(apic)`, patches it and asks for AP_CREATE (on SNP the guest must also validate
/// the page and RMPADJUST it into a VMSA: the simulator checks the RMP, KVM's VMSA-image mode
/// has none; neither step changes the VMSA's owner). Each AP reports through its mailbox, writes
/// DONE and halts. With re-creation the BSP then asks AP_DESTROY for AP 1, rewrites its VMSA
/// (generation 2) and asks AP_CREATE again; AP 1 reports and halts again. The BSP writes DONE
/// (the simulator does when the script is exhausted). The program never destroys the APs at the
/// end: teardown frees what is left, on every host.
fn sim_script(g: Guest) -> GuestScript {
    let ap_entry = program::PROGRAM.entries.ap;
    let mut actions = Vec::new();
    for apic in 1..g.vcpus {
        let gpa = layout::ap_vmsa_gpa(apic);
        actions.extend(GuestAction::vmsa_setup(0, gpa, ap_entry, 0));
        actions.push(GuestAction::ap_create(0, apic, gpa, false));
    }
    // Each AP's report (mailbox write, DONE) ends in HLT.
    actions.extend((1..g.vcpus).map(|vcpu| GuestAction::Hlt { vcpu }));
    if g.recreate && g.vcpus >= 2 {
        let gpa = layout::ap_vmsa_gpa(1);
        actions.push(GuestAction::ApDestroy { vcpu: 0, apic_id: 1 });
        // Rewriting the page: a VMSA page is not writable by the guest, so it clears the VMSA
        // bit first (Linux's snp_cleanup_vmsa) and sets it again after.
        actions.push(GuestAction::MakeVmsa {
            vcpu: 0,
            gpa,
            vmsa: false,
        });
        actions.extend(GuestAction::ap_vmsa(0, gpa, ap_entry, 0));
        actions.push(GuestAction::ap_create(0, 1, gpa, false));
        actions.push(GuestAction::Hlt { vcpu: 1 });
    }
    GuestScript {
        name: format!(
            "kvm-program-{}{}",
            g.vcpus,
            if g.recreate { "-recreate" } else { "" }
        ),
        actions,
    }
}

/// The guest's memory: what the program needs for `vcpus` VMSAs, at least 16 MiB.
fn memory(vcpus: u32) -> u64 {
    layout::min_memory(vcpus).max(16 << 20)
}

/// A whole guest life through the VMM's flow.
struct Boot(Guest);

/// What a host's run showed, reduced to what every host can be compared on.
#[derive(Debug)]
struct Seen {
    end: Option<RunEnd>,
    launch_error: Option<String>,
    histories: Option<Vec<(u32, Vec<OwnershipStep>)>>,
    report: HostReport,
    took: Duration,
}

impl OnHost for Boot {
    type Out = Option<Seen>;

    fn on<H: Hypervisor>(&self, host: &H) -> Option<Seen> {
        let g = self.0;
        if g.supplied && !host.capabilities().supplied_vmsa {
            return None;
        }
        let image = GuestProgram::ApCreation { recreate: g.recreate }
            .image(g.vcpus)
            .expect("the guest program assembles");
        let launch = Launch::snp_image(
            memory(g.vcpus),
            SNP_POLICY_RSVD_MBO,
            image.gpa,
            &image.bytes,
            &image.vmsas,
        );
        let launch = if g.supplied {
            launch.with_supplied_vmsa(SUPPLIED_GPA)
        } else {
            launch
        };
        let t0 = Instant::now();
        let FlowReport {
            launch_error,
            run,
            host: report,
            ..
        } = flow::run(
            host,
            &launch,
            Duration::from_secs(60),
            &Progress::hidden(),
            &mut |_| {},
        )
        .unwrap_or_else(|e| panic!("{}: the flow could not create the VM: {e}", host.name()));
        let took = t0.elapsed();
        Some(Seen {
            end: run.map(|r| r.end),
            launch_error: launch_error.map(|e| e.to_string()),
            histories: report.events.seen().map(|e| ownership_histories(e)),
            report,
            took,
        })
    }
}

/// The teardown counts two hosts can be compared on: what both see.
fn comparable(a: &TeardownCounts, b: &TeardownCounts) -> Vec<(&'static str, u64, u64)> {
    let both = |x: &Observed<u64>, y: &Observed<u64>| x.seen().copied().zip(y.seen().copied());
    let leaked = |t: &TeardownCounts| t.vmsas_leaked.clone().map(|n| n as u64);
    [
        ("vcpus", Some((a.vcpus as u64, b.vcpus as u64))),
        ("vmsas_leaked", both(&leaked(a), &leaked(b))),
        (
            "guest_frames_released",
            both(&a.guest_frames_released, &b.guest_frames_released),
        ),
        (
            "guest_frames_leaked",
            both(&a.guest_frames_leaked, &b.guest_frames_leaked),
        ),
        (
            "frames_still_allocated",
            both(&a.frames_still_allocated, &b.frames_still_allocated),
        ),
        (
            "frames_leaked_on_purpose",
            both(&a.frames_leaked_on_purpose, &b.frames_leaked_on_purpose),
        ),
    ]
    .into_iter()
    .filter_map(|(name, v)| v.map(|(x, y)| (name, x, y)))
    .collect()
}

/// Run `g` on every host and assert the same outcome on each.
fn boots_alike(g: Guest) {
    let _turn = turn();
    let runs = on_every_host(g, &Boot(g));
    let runs: Vec<_> = runs
        .into_iter()
        .map(|r| match r.out {
            // A host without supplied VMSAs (a mainline SNP kernel) is skipped, with why.
            Ok(None) => HostRun {
                label: r.label,
                out: Err("it takes no supplied VMSAs (its capabilities say so)".into()),
            },
            Ok(Some(s)) => HostRun {
                label: r.label,
                out: Ok(s),
            },
            Err(why) => HostRun {
                label: r.label,
                out: Err(why),
            },
        })
        .collect();
    let n = g.vcpus as usize;
    let mut reference: Option<(&str, &Seen)> = None;
    for r in &runs {
        let Ok(s) = &r.out else { continue };
        let who = r.label;
        println!(
            "conformance: {who}: {} vCPUs{}: {:?} in {} ms",
            g.vcpus,
            if g.recreate { " with re-creation" } else { "" },
            s.end,
            s.took.as_millis()
        );
        assert_eq!(s.launch_error, None, "{who}: the launch fails");
        assert_eq!(
            s.end,
            Some(RunEnd::Done),
            "{who}: the run ends with vCPU 0's DONE"
        );
        let t = &s.report.teardown;
        assert_eq!(t.vcpus, n, "{who}: every vCPU is torn down");
        assert_eq!(t.error, None, "{who}: teardown fails");
        assert_eq!(
            t.vmsas_leaked.seen().copied().unwrap_or(0),
            0,
            "{who}: VMSAs leaked"
        );
        // No frame left allocated where the host can see its frames.
        assert!(
            matches!(
                t.frames_still_allocated,
                Observed::Seen(0) | Observed::Hidden { .. }
            ),
            "{who}: frames left allocated: {:?}",
            t.frames_still_allocated
        );
        if let Some(events) = s.report.events.seen() {
            let leaks: Vec<_> = events
                .iter()
                .filter(|e| matches!(e, Event::Leaked { .. }))
                .collect();
            assert!(leaks.is_empty(), "{who}: leaked {leaks:?}");
        }
        if let Some(guest) = s.report.guest.seen() {
            // n - 1 creates, and a destroy and a re-create with at least two vCPUs.
            let want = (g.vcpus as u64 - 1) + if g.recreate && n >= 2 { 2 } else { 0 };
            assert_eq!(
                (guest.ap_requests, guest.ap_refused),
                (want, 0),
                "{who}: AP requests"
            );
        }
        // A host that cannot see ownership (a real SNP kernel) takes part in everything else.
        let Some(h) = &s.histories else { continue };
        assert_eq!(h.len(), n, "{who}: one history per vCPU");
        match reference {
            None => reference = Some((who, s)),
            Some((first, f)) => {
                assert_eq!(
                    f.histories.as_ref(),
                    Some(h),
                    "{first} and {who}: the same ownership histories"
                );
                for (field, x, y) in comparable(&f.report.teardown, t) {
                    assert_eq!(x, y, "{first} and {who}: teardown {field}");
                }
            }
        }
    }
}

/// The supplied-VMSA mode through the VMM's one flow: the BSP runs from the VMSA page supplied
/// in guest memory (GuestOwned from the launch), the guest creates every AP from None.
#[test]
fn supplied_vmsa_boots_alike_on_4_vcpus() {
    boots_alike(Guest {
        vcpus: 4,
        recreate: false,
        supplied: true,
    });
}

#[test]
fn supplied_vmsa_with_ap_re_creation_boots_alike() {
    boots_alike(Guest {
        vcpus: 4,
        recreate: true,
        supplied: true,
    });
}

#[test]
fn ap_creation_on_1_vcpu() {
    boots_alike(Guest {
        vcpus: 1,
        recreate: false,
        supplied: false,
    });
}

#[test]
fn ap_creation_on_4_vcpus() {
    boots_alike(Guest {
        vcpus: 4,
        recreate: false,
        supplied: false,
    });
}

#[test]
fn ap_creation_on_64_vcpus() {
    boots_alike(Guest {
        vcpus: 64,
        recreate: false,
        supplied: false,
    });
}

#[test]
fn ap_destroy_and_re_create_on_4_vcpus() {
    boots_alike(Guest {
        vcpus: 4,
        recreate: true,
        supplied: false,
    });
}

// ---- Refused orderings.

/// One call of the VMM through the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    /// `create_vm` of this kind with these `vmsa_features`.
    CreateVm(VmKind, u64),
    /// `create_vm` of this kind in the supplied-VMSA mode.
    CreateSuppliedVm(VmKind),
    /// A launch update of page type VMSA: the BSP's VMSA at this GPA with these SEV_FEATURES.
    SupplyVmsa(u64, u64),
    /// 4 MiB of guest_memfd memory from GPA 0, slot 0, made private where the host has private
    /// memory (what the VMM's flow does for an SNP guest's RAM).
    AddMemory,
    /// The same memory, left with KVM's default attribute (shared).
    AddSharedMemory,
    CreateVcpu(u32),
    /// A long-mode state for this vCPU.
    SetState(u32),
    LaunchStart,
    /// One page at 32 KiB of this type.
    LaunchUpdate(SnpPageType),
    LaunchUpdateVmsas,
    LaunchFinish,
    /// `set_memory_attributes` of the page at 32 KiB, to private (true) or shared.
    SetMemoryAttributes(bool),
}

use Call::*;

/// How a host answered a call.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer {
    Ok,
    /// Refused by one of KVM's rules: the call it names and the errno.
    Refused(&'static str, Errno),
    /// `create_vm` of a kind the host does not run.
    Unsupported(VmKind),
    /// The host's own failure (not a rule).
    Failed(String),
}

impl From<&HypervisorError> for Answer {
    fn from(e: &HypervisorError) -> Self {
        match e {
            HypervisorError::Refused(r) => Self::Refused(r.call, r.errno),
            HypervisorError::Unsupported { kind, .. } => Self::Unsupported(*kind),
            e => Self::Failed(e.to_string()),
        }
    }
}

impl From<&VmError> for Answer {
    fn from(e: &VmError) -> Self {
        match e.refusal() {
            Some(r) => Self::Refused(r.call, r.errno),
            None => Self::Failed(e.to_string()),
        }
    }
}

impl From<&VcpuError> for Answer {
    fn from(e: &VcpuError) -> Self {
        match e {
            VcpuError::Refused { refusal: r, .. } => Self::Refused(r.call, r.errno),
            e => Self::Failed(e.to_string()),
        }
    }
}

/// A VM created, with memory, vCPU 0 created and given its state: where most rows start.
const READY: [Call; 4] = [CreateVm(VmKind::Snp, 0), AddMemory, CreateVcpu(0), SetState(0)];

/// One ordering: its calls, of which every one but the last must succeed, and KVM's answer to
/// the last (a refusal: the call it names, the errno), unless a host's documented answer
/// legitimately differs (`except`, each with its reason).
struct Row {
    name: &'static str,
    calls: Vec<Call>,
    want: Answer,
    except: Vec<(&'static str, Answer)>,
}

impl Row {
    /// Whether the row needs a host that takes supplied VMSAs (it starts with a supplied VM).
    fn supplied(&self) -> bool {
        matches!(self.calls.first(), Some(CreateSuppliedVm(VmKind::Snp)))
    }
}

impl Row {
    /// What `host` must answer to the last call.
    fn want(&self, host: &str) -> &Answer {
        self.except
            .iter()
            .find(|(h, _)| *h == host)
            .map_or(&self.want, |(_, a)| a)
    }
}

fn row(name: &'static str, after: &[Call], last: &[Call], call: &'static str, errno: Errno) -> Row {
    Row {
        name,
        calls: after.iter().chain(last).copied().collect(),
        want: Answer::Refused(call, errno),
        except: Vec::new(),
    }
}

/// KVM's refused orderings, each named with the kernel function that refuses it.
fn refusals() -> Vec<Row> {
    const UPDATE: &str = "KVM_SEV_SNP_LAUNCH_UPDATE";
    const START: &str = "KVM_SEV_SNP_LAUNCH_START";
    const FINISH: &str = "KVM_SEV_SNP_LAUNCH_FINISH";
    let normal = LaunchUpdate(SnpPageType::Normal);
    let launched = [LaunchStart, normal, LaunchFinish];
    let launched: Vec<Call> = READY.iter().chain(&launched).copied().collect();
    // A supplied-VMSA VM (the series' 4/4) with memory, the BSP and the launch started.
    const SUPPLIED: [Call; 4] = [
        CreateSuppliedVm(VmKind::Snp),
        AddMemory,
        CreateVcpu(0),
        LaunchStart,
    ];
    const ACTIVE: u64 = SEV_FEAT_SNP_ACTIVE;
    let supplied_finished: Vec<Call> = SUPPLIED
        .iter()
        .chain(&[SupplyVmsa(0x9000, ACTIVE), LaunchFinish])
        .copied()
        .collect();
    vec![
        row(
            "a page launched twice (kvm_gmem_populate: -EEXIST for a prepared page, before any write to it)",
            &[READY.as_slice(), &[LaunchStart, normal]].concat(),
            &[normal],
            UPDATE,
            Errno::EEXIST,
        ),
        row(
            "a second VMSA page for the BSP (snp_launch_update, series 4/4)",
            &SUPPLIED,
            &[SupplyVmsa(0x9000, ACTIVE), SupplyVmsa(0xa000, ACTIVE)],
            UPDATE,
            Errno::EINVAL,
        ),
        row(
            "a VMSA page whose SEV_FEATURES differ from the VM's (sev_snp_ap_creation's rule)",
            &SUPPLIED,
            &[SupplyVmsa(0x9000, 0)],
            UPDATE,
            Errno::EINVAL,
        ),
        row(
            "a VMSA page at a 2 MiB-aligned GPA (erratum 1467)",
            &SUPPLIED,
            &[SupplyVmsa(0x20_0000, ACTIVE)],
            UPDATE,
            Errno::EINVAL,
        ),
        row(
            "a VMSA page after launch_finish (snp_launch_update)",
            &supplied_finished,
            &[SupplyVmsa(0xa000, ACTIVE)],
            UPDATE,
            Errno::EINVAL,
        ),
        row(
            "launch_finish without the BSP's supplied VMSA (snp_launch_finish)",
            &SUPPLIED,
            &[LaunchFinish],
            FINISH,
            Errno::EINVAL,
        ),
        Row {
            name: "an SEV-ES VM with supplied VMSAs (__sev_guest_init)",
            calls: vec![CreateSuppliedVm(VmKind::SevEs)],
            want: Answer::Refused("KVM_SEV_INIT2", Errno::EINVAL),
            // VMSA-image mode runs SNP guests only (its capabilities say so).
            except: vec![("kvm-image", Answer::Unsupported(VmKind::SevEs))],
        },
        row(
            "launch_update before launch_start (snp_launch_update)",
            &READY,
            &[normal],
            UPDATE,
            Errno::EINVAL,
        ),
        row(
            "launch_finish before launch_start (snp_launch_finish)",
            &READY,
            &[LaunchFinish],
            FINISH,
            Errno::EINVAL,
        ),
        row(
            "a second launch_start (snp_launch_start)",
            &READY,
            &[LaunchStart, LaunchStart],
            START,
            Errno::EINVAL,
        ),
        row(
            "a second launch_finish (snp_launch_finish)",
            &launched,
            &[LaunchFinish],
            FINISH,
            Errno::EINVAL,
        ),
        row(
            "launch_update_vmsas on an SNP VM (sev_mem_enc_ioctl)",
            &READY,
            &[LaunchUpdateVmsas],
            "KVM_SEV_LAUNCH_UPDATE_VMSA",
            Errno::EPERM,
        ),
        row(
            "a launch_update of page type VMSA (snp_launch_update)",
            &READY,
            &[LaunchStart, LaunchUpdate(SnpPageType::Vmsa)],
            UPDATE,
            Errno::EINVAL,
        ),
        row(
            "set_state after launch_finish (kvm_arch_vcpu_ioctl_set_regs)",
            &launched,
            &[SetState(0)],
            "KVM_SET_REGS",
            Errno::EINVAL,
        ),
        row(
            "create_vcpu with an id that exists (kvm_vm_ioctl_create_vcpu)",
            &READY,
            &[CreateVcpu(0)],
            "KVM_CREATE_VCPU",
            Errno::EEXIST,
        ),
        // Beyond every host's maximum (KVM_MAX_VCPU_IDS, the simulator's 512).
        row(
            "create_vcpu with an id beyond the host's maximum (kvm_vm_ioctl_create_vcpu)",
            &READY,
            &[CreateVcpu(u32::MAX)],
            "KVM_CREATE_VCPU",
            Errno::EINVAL,
        ),
        row(
            "SNP_ACTIVE in vmsa_features at create_vm (__sev_guest_init)",
            &[],
            &[CreateVm(VmKind::Snp, SEV_FEAT_SNP_ACTIVE)],
            "KVM_SEV_INIT2",
            Errno::EINVAL,
        ),
        // Where the hosts legitimately differ: what KVM itself allows, a host without the
        // capability refuses, as it documents.
        Row {
            name: "an SEV-ES VM",
            calls: vec![CreateVm(VmKind::SevEs, 0)],
            want: Answer::Ok,
            // VMSA-image mode runs SNP guests only (its capabilities say so): its guest program
            // and GHCB doorbell speak the SNP AP-creation protocol, which SEV-ES lacks.
            except: vec![("kvm-image", Answer::Unsupported(VmKind::SevEs))],
        },
        Row {
            name: "a launch_update of memory not made private (kvm_gmem_populate)",
            calls: [
                CreateVm(VmKind::Snp, 0),
                AddSharedMemory,
                CreateVcpu(0),
                SetState(0),
            ]
            .into_iter()
            .chain([LaunchStart, normal])
            .collect(),
            want: Answer::Refused(UPDATE, Errno::EINVAL),
            // VMSA-image mode has no private memory (its capabilities say so): there is no
            // attribute to check, and its launch update only copies the page.
            except: vec![("kvm-image", Answer::Ok)],
        },
        Row {
            name: "a conversion to shared (KVM_SET_MEMORY_ATTRIBUTES)",
            calls: vec![CreateVm(VmKind::Snp, 0), AddMemory, SetMemoryAttributes(false)],
            want: Answer::Ok,
            // VMSA-image mode's VM is a default KVM VM, which has no private memory
            // (KVM_CAP_MEMORY_ATTRIBUTES is 0): the ioctl does not exist for it.
            except: vec![(
                "kvm-image",
                Answer::Refused("KVM_SET_MEMORY_ATTRIBUTES", Errno::ENOTTY),
            )],
        },
    ]
}

/// Run every row of the table on one host: each row's answers, in order.
struct Refusals<'a>(&'a [Row]);

impl OnHost for Refusals<'_> {
    type Out = Vec<Vec<Answer>>;

    fn on<H: Hypervisor>(&self, host: &H) -> Vec<Vec<Answer>> {
        self.0
            .iter()
            .map(|r| {
                if r.supplied() && !host.capabilities().supplied_vmsa {
                    // A host without supplied VMSAs refuses the VM up front (SNP mode on a
                    // mainline kernel: before any ioctl, with the probe's reason).
                    let e = host.create_vm(VmSpec::snp(0).with_supplied_vmsa()).err();
                    return vec![e.map_or(Answer::Ok, |e| Answer::from(&e))];
                }
                calls(host, &r.calls)
            })
            .collect()
    }
}

/// Make `calls` on `host` until one does not succeed; the answers so far. Then tear down and
/// check that nothing the host can see was left allocated.
fn calls<H: Hypervisor>(host: &H, calls: &[Call]) -> Vec<Answer> {
    let page = vec![0u8; 4096];
    let mut vm: Option<H::Vm> = None;
    let mut vcpus: Vec<<H::Vm as Vm>::Vcpu> = Vec::new();
    let mut answers = Vec::new();
    for &c in calls {
        let answer = match (c, vm.as_mut()) {
            (CreateVm(kind, vmsa_features), _) => match host.create_vm(VmSpec {
                kind,
                vmsa_features,
                supplied_vmsa: false,
            }) {
                Ok(v) => {
                    vm = Some(v);
                    Answer::Ok
                }
                Err(e) => Answer::from(&e),
            },
            (CreateSuppliedVm(kind), _) => match host.create_vm(VmSpec {
                kind,
                vmsa_features: 0,
                supplied_vmsa: true,
            }) {
                Ok(v) => {
                    vm = Some(v);
                    Answer::Ok
                }
                Err(e) => Answer::from(&e),
            },
            (_, None) => panic!("{c:?} before create_vm"),
            (AddMemory | AddSharedMemory, Some(vm)) => {
                let region = MemoryRegion::ram(4 << 20);
                let private = c == AddMemory && host.capabilities().private_memory;
                answer(vm.add_memory(region).and_then(|()| {
                    if private {
                        vm.set_memory_attributes(Conversion {
                            gpa: region.gpa,
                            size: region.size,
                            private: true,
                        })
                    } else {
                        Ok(())
                    }
                }))
            }
            (CreateVcpu(id), Some(vm)) => match vm.create_vcpu(id) {
                Ok(v) => {
                    vcpus.push(v);
                    Answer::Ok
                }
                Err(e) => Answer::from(&e),
            },
            (SetState(id), Some(_)) => {
                let v = vcpus.iter_mut().find(|v| v.id() == id).expect("a created vCPU");
                match v.set_state(&layout::long_mode_image(0x8000)) {
                    Ok(()) => Answer::Ok,
                    Err(e) => Answer::from(&e),
                }
            }
            (LaunchStart, Some(vm)) => answer(vm.launch_start(SNP_POLICY_RSVD_MBO)),
            (LaunchUpdate(page_type), Some(vm)) => answer(vm.launch_update(vmsa_host::LaunchUpdate {
                gpa: Gpa(0x8000),
                len: 4096,
                page_type,
                data: Some(&page),
            })),
            (SupplyVmsa(gpa, sev_features), Some(vm)) => {
                let mut vmsa = layout::long_mode_image(0x8000);
                vmsa.sev_features = sev_features;
                answer(vm.launch_update(vmsa_host::LaunchUpdate {
                    gpa: Gpa(gpa),
                    len: 4096,
                    page_type: SnpPageType::Vmsa,
                    data: Some(vmsa.as_page()),
                }))
            }
            (LaunchUpdateVmsas, Some(vm)) => answer(vm.launch_update_vmsas()),
            (LaunchFinish, Some(vm)) => answer(vm.launch_finish()),
            (SetMemoryAttributes(private), Some(vm)) => answer(vm.set_memory_attributes(Conversion {
                gpa: Gpa(0x8000),
                size: 4096,
                private,
            })),
        };
        // A host says up front which kinds it runs, and answers create_vm accordingly.
        if let CreateVm(kind, _) = c {
            let runs = host.capabilities().kinds.contains(&kind);
            assert_eq!(
                matches!(answer, Answer::Unsupported(_)),
                !runs,
                "{}: create_vm({kind}) answers {answer:?} with kinds {:?}",
                host.name(),
                host.capabilities().kinds
            );
        }
        let go_on = answer == Answer::Ok;
        answers.push(answer);
        if !go_on {
            break;
        }
    }
    drop(vcpus);
    if let Some(vm) = vm {
        let t = vm.teardown().teardown;
        assert!(
            matches!(
                t.frames_still_allocated,
                Observed::Seen(0) | Observed::Hidden { .. }
            ),
            "{}: {calls:?} left frames allocated: {t:?}",
            host.name()
        );
    }
    answers
}

fn answer(r: Result<(), VmError>) -> Answer {
    match r {
        Ok(()) => Answer::Ok,
        Err(e) => Answer::from(&e),
    }
}

#[test]
fn kvms_refused_orderings_on_every_host() {
    let _turn = turn();
    let table = refusals();
    let t0 = Instant::now();
    let runs = on_every_host(Guest::NONE, &Refusals(&table));
    for r in &runs {
        let Ok(answers) = &r.out else { continue };
        for (row, got) in table.iter().zip(answers) {
            if row.supplied() && got.len() == 1 && matches!(got[0], Answer::Unsupported(VmKind::Snp)) {
                println!("conformance: {}: {}: no supplied VMSAs here", r.label, row.name);
                continue;
            }
            let mut want = vec![Answer::Ok; row.calls.len() - 1];
            want.push(row.want(r.label).clone());
            assert_eq!(got, &want, "{}: {}: {:?}", r.label, row.name, row.calls);
        }
        println!(
            "conformance: {}: {} orderings answered as expected",
            r.label,
            table.len()
        );
    }
    println!("conformance: refusals in {} ms", t0.elapsed().as_millis());
}
