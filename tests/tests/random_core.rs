//! Random long runs of vmsa-core on its test platform (issue 10, item 3): seeded random
//! sequences of events (vCPU creation, launch steps, AP creation requests of every kind with
//! valid and invalid arguments, INIT, entry, page state changes of VMSA pages, vCPU destroy,
//! debug decrypt, intra-host migration, injected platform failures, teardown), with every
//! invariant checked after every event:
//!
//! - no RMP or allocator rule broken (the platform's `Violation`s);
//! - one owner per VMSA page: the platform's live pages are exactly the host VMSAs the vCPUs
//!   hold, each once; a VM migrated away holds none;
//! - every VMCB address is the vCPU's own host VMSA or the guest_memfd frame of its guest VMSA;
//!   an entry that may run names such a page and leaves the VM usable;
//! - every leaked page has a `Leaked` event with a reason, and only those; the VM is bugged iff
//!   it leaked; teardown counts every vCPU page leaked;
//! - no lost request: an accepted request is what the target holds after its next INIT (or its
//!   next entry, for a kicked request), the last accepted one winning; a refused request
//!   changes nothing.
//!
//! On a failure the run is shrunk to a minimal event list, printed with its seed; it becomes a
//! regression test below. The normal suite runs a fixed set of seeds; `VMSA_SOAK=1`
//! (`cargo xtask soak`) runs more than a million events and prints the count.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use scenario_tests::random::{Broken, Rng, check_seeds, soak};
use vmsa_core::ghcb::{AP_CREATE, AP_CREATE_ON_INIT};
use vmsa_core::layout::SEV_FEAT_SNP_ACTIVE;
use vmsa_core::testing::{Call, TestPlatform};
use vmsa_core::{
    ApCreationRequest, ApRequest, Asid, Entry, Error, Event, EventLog, Gfn, Gpa, LaunchState, MpState, Pfn,
    Platform, SNP_POLICY_DEBUG, SNP_POLICY_RSVD_MBO, SnpPageType, VcpuId, Vm, VmConfig, VmKind, VmsaState,
};

/// Outcome counters over every run of the process, printed with the event count to show what
/// the runs reached: accepted and refused AP requests, requests applied at INIT or entry,
/// entries that ran, leaks, migrations.
static STATS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];
const ACCEPTED: usize = 0;
const REFUSED: usize = 1;
const APPLIED: usize = 2;
const RAN: usize = 3;
const LEAKS: usize = 4;
const MIGRATIONS: usize = 5;

fn count(what: usize) {
    STATS[what].fetch_add(1, Ordering::Relaxed);
}

/// vCPU ids the events use (one more than may exist, for unknown targets).
const VCPUS: u32 = 3;
/// Guest frames that may hold guest VMSAs (mapped at the start).
const GFNS: [u64; 3] = [0x81, 0x82, 0x83];

/// The GPA argument of an AP-creation request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GpaArg {
    /// The page of `GFNS[i]`.
    Gfn(usize),
    /// Not 4 KiB aligned.
    Unaligned,
    /// 2 MiB aligned (erratum 1467).
    TwoMeg,
    /// Beyond the guest MAXPHYADDR.
    Beyond,
}

/// The SEV_FEATURES (RAX) of an AP-creation request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Features {
    /// The VM's.
    Vm,
    /// RAX not marked valid.
    Missing,
    /// Other features.
    Wrong,
}

/// One event of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ev {
    CreateVcpu(u32),
    LaunchStart {
        debug: bool,
        bad: bool,
    },
    LaunchData(usize),
    LaunchVmsas,
    LaunchFinish,
    Ap {
        requester: u32,
        request: u32,
        target: u32,
        gpa: GpaArg,
        features: Features,
    },
    Init(u32),
    Entry(u32),
    SetMpState(u32, MpState),
    /// A page state change of `GFNS[i]` to shared: the range stops resolving, then the VM
    /// invalidates it (the order `Vm::gmem_invalidate` asks for).
    ToShared(usize),
    /// Back to private: a fresh guest_memfd page, then the VM invalidates the range.
    ToPrivate(usize),
    Free(u32),
    Decrypt(u32),
    /// Migrate into a fresh destination with as many vCPUs as the source, or one fewer.
    Migrate {
        fewer: bool,
    },
    Fail(Call),
    Teardown,
}

const CALLS: [Call; 14] = [
    Call::AllocPage,
    Call::WriteFrame,
    Call::ReadFrame,
    Call::RmpMakePrivate,
    Call::RmpMakeShared,
    Call::FlushEncryptedPage,
    Call::LaunchStart,
    Call::LaunchUpdateData,
    Call::LaunchUpdateVmsa,
    Call::SnpLaunchUpdate,
    Call::LaunchFinish,
    Call::PageReclaim,
    Call::DbgDecrypt,
    Call::DbgDecryptReclaim,
];

fn vcpu(r: &mut Rng) -> u32 {
    // Mostly existing vCPUs, now and then one that does not exist.
    if r.chance(90) {
        r.below(u64::from(VCPUS)) as u32
    } else {
        VCPUS
    }
}

fn random_event(r: &mut Rng) -> Ev {
    match r.below(100) {
        0..=2 => Ev::CreateVcpu(vcpu(r)),
        3..=4 => Ev::LaunchStart {
            debug: r.chance(50),
            bad: r.chance(20),
        },
        5..=6 => Ev::LaunchData(r.below(GFNS.len() as u64) as usize),
        7 => Ev::LaunchVmsas,
        8..=9 => Ev::LaunchFinish,
        10..=37 => Ev::Ap {
            requester: vcpu(r),
            request: if r.chance(95) {
                r.below(3) as u32
            } else {
                3 + r.below(4) as u32
            },
            target: vcpu(r),
            gpa: match r.below(20) {
                0 => GpaArg::Unaligned,
                1 => GpaArg::TwoMeg,
                2 => GpaArg::Beyond,
                _ => GpaArg::Gfn(r.below(GFNS.len() as u64) as usize),
            },
            features: match r.below(20) {
                0 => Features::Missing,
                1 => Features::Wrong,
                _ => Features::Vm,
            },
        },
        38..=49 => Ev::Init(vcpu(r)),
        50..=67 => Ev::Entry(vcpu(r)),
        68..=69 => Ev::SetMpState(vcpu(r), r.pick(&[MpState::Runnable, MpState::Halted])),
        70..=74 => Ev::ToShared(r.below(GFNS.len() as u64) as usize),
        75..=79 => Ev::ToPrivate(r.below(GFNS.len() as u64) as usize),
        80..=82 => Ev::Free(vcpu(r)),
        83..=85 => Ev::Decrypt(vcpu(r)),
        86..=87 => Ev::Migrate { fewer: r.chance(20) },
        // A teardown ends the run: rare, so that runs are long.
        _ if r.chance(2) => Ev::Teardown,
        _ => Ev::Fail(r.pick(&CALLS)),
    }
}

/// A run: whether it is SEV-ES (the first event says so), most often a launch prologue (with
/// failures injected now and then), then random events.
fn generate(r: &mut Rng, len: usize) -> Vec<Ev> {
    let mut v = Vec::with_capacity(len);
    let es = r.chance(25);
    // The kind is encoded as the first event: LaunchVmsas first means SEV-ES.
    v.push(if es { Ev::LaunchVmsas } else { Ev::LaunchFinish });
    if r.chance(90) {
        for id in 0..VCPUS {
            v.push(Ev::CreateVcpu(id));
        }
        v.push(Ev::LaunchStart {
            debug: r.chance(50),
            bad: false,
        });
        if r.chance(30) {
            v.push(Ev::Fail(r.pick(&CALLS)));
        }
        v.push(Ev::LaunchData(0));
        if es {
            v.push(Ev::LaunchVmsas);
        }
        v.push(Ev::LaunchFinish);
    }
    while v.len() < len {
        v.push(random_event(r));
    }
    v
}

/// A request accepted and not applied yet, as the harness expects it.
#[derive(Clone, Copy, Debug)]
struct Expect {
    request: ApRequest,
    gpa: Option<Gpa>,
    /// The target was kicked (CREATE or DESTROY since its last INIT): its next entry applies it.
    kick: bool,
}

struct World {
    kind: VmKind,
    vm: Vm<TestPlatform>,
    log: Arc<EventLog>,
    /// VMs migrated away (dead), kept to check they hold nothing.
    dead: Vec<Vm<TestPlatform>>,
    expect: BTreeMap<VcpuId, Expect>,
    /// Frames named by `Leaked` events of vCPU pages, over every VM of the run.
    vcpu_leaks: BTreeSet<Pfn>,
    /// Every frame a `Leaked` event named: the vCPUs' host pages and the guest frames a
    /// failed launch page left leaked (`Platform::leak_guest_frame`).
    leaks: BTreeSet<Pfn>,
    /// `Leaked` events of this VM (any page), and of its vCPU pages.
    leaks_here: usize,
    vcpu_leaks_here: usize,
    torn_down: bool,
}

type R = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

impl World {
    fn new(kind: VmKind) -> Self {
        let log = Arc::new(EventLog::new());
        let config = match kind {
            VmKind::Snp => VmConfig::snp(0),
            VmKind::SevEs => VmConfig::sev_es(0),
        };
        // Start just below a 2 MiB boundary so erratum 1467 refusals happen too.
        let vm = Vm::new(TestPlatform::new(Asid(3), Pfn(0x11fe)), config, log.clone());
        for g in GFNS {
            vm.platform().map_gmem(Gfn(g));
        }
        Self {
            kind,
            vm,
            log,
            dead: Vec::new(),
            expect: BTreeMap::new(),
            vcpu_leaks: BTreeSet::new(),
            leaks: BTreeSet::new(),
            leaks_here: 0,
            vcpu_leaks_here: 0,
            torn_down: false,
        }
    }

    fn request(
        &self,
        requester: u32,
        request: u32,
        target: u32,
        gpa: GpaArg,
        features: Features,
    ) -> ApCreationRequest {
        let at = match gpa {
            GpaArg::Gfn(i) => GFNS[i] << 12,
            GpaArg::Unaligned => (GFNS[0] << 12) + 8,
            GpaArg::TwoMeg => 0x20_0000,
            GpaArg::Beyond => 1 << 52,
        };
        let rax = match features {
            Features::Vm => Some(self.vm.config().vmsa_features()),
            Features::Missing => None,
            Features::Wrong => Some(SEV_FEAT_SNP_ACTIVE | 1 << 7),
        };
        ApCreationRequest::new(VcpuId(requester), request, target, at, rax)
    }

    /// The target must now hold what `e` asked for.
    fn applied(&self, id: VcpuId, e: Expect) -> R {
        let v = self
            .vm
            .vcpu(id)
            .map_err(|err| format!("applied: vCPU {id}: {err}"))?;
        let ok = match (e.request, e.gpa) {
            (ApRequest::Destroy, _) => v.state == VmsaState::None && v.mp_state == MpState::Halted,
            (_, Some(g)) => {
                let backed = self.vm.platform().gmem_pfn(g.gfn()).is_some();
                match v.mp_state {
                    // A guest VMSA whose page is gone is dropped again at the reload that follows.
                    MpState::Runnable => {
                        v.state == VmsaState::GuestOwned(g) || (!backed && v.state == VmsaState::None)
                    }
                    // No page backed it when it was applied: the vCPU stays halted
                    // (__sev_snp_update_protected_guest_state).
                    MpState::Halted => {
                        !backed && matches!(v.state, VmsaState::GuestOwned(_) | VmsaState::None)
                    }
                    _ => false,
                }
            }
            _ => false,
        };
        ensure!(
            ok,
            "lost request: vCPU {id} holds {:?} ({:?}) after {e:?} was due",
            v.state,
            v.mp_state
        );
        ensure!(
            v.pending_gpa.is_none(),
            "lost request: vCPU {id} still has {:?} pending after applying {e:?}",
            v.pending_gpa
        );
        count(APPLIED);
        Ok(())
    }

    fn step(&mut self, ev: &Ev) -> R {
        let vm = &mut self.vm;
        match *ev {
            Ev::CreateVcpu(id) => drop(vm.create_vcpu(VcpuId(id))),
            Ev::LaunchStart { debug, bad } => {
                let policy = match self.kind {
                    VmKind::Snp => {
                        SNP_POLICY_RSVD_MBO
                            | if debug { SNP_POLICY_DEBUG } else { 0 }
                            | if bad { 1 << 18 } else { 0 }
                    }
                    VmKind::SevEs => u64::from(!debug) | if bad { 1 << 40 } else { 0 },
                };
                drop(vm.launch_start(policy));
            }
            Ev::LaunchData(i) => {
                // The embedder's guest_memfd refuses a page it prepared already (-EEXIST from
                // kvm_gmem_populate, before anything is written): vmsa-core never sees it.
                let prepared = vm
                    .platform()
                    .gmem_pfn(Gfn(GFNS[i]))
                    .is_some_and(|p| vm.platform().is_assigned(p));
                if !prepared {
                    let page = [0xa5u8; 4096];
                    drop(vm.launch_update_data(Gpa(GFNS[i] << 12), 4096, SnpPageType::Normal, Some(&page)));
                }
            }
            Ev::LaunchVmsas => drop(vm.launch_update_vmsas()),
            Ev::LaunchFinish => drop(vm.launch_finish([0; 32])),
            Ev::Ap {
                requester,
                request,
                target,
                gpa,
                features,
            } => {
                let req = self.request(requester, request, target, gpa, features);
                let before = self.vm.vcpu(VcpuId(target)).ok();
                match self.vm.ap_creation(&req) {
                    Ok(created) => {
                        count(ACCEPTED);
                        let v = self
                            .vm
                            .vcpu(created.target)
                            .expect("accepted for a vCPU that exists");
                        let prev_kick = self.expect.get(&created.target).is_some_and(|e| e.kick);
                        let gpa = (created.request != ApRequest::Destroy).then(|| req.gpa());
                        ensure!(
                            v.pending_gpa == gpa,
                            "accepted request not recorded: {:?} pending, {gpa:?} asked",
                            v.pending_gpa
                        );
                        self.expect.insert(
                            created.target,
                            Expect {
                                request: created.request,
                                gpa,
                                kick: prev_kick || created.kick,
                            },
                        );
                    }
                    Err(_) => {
                        count(REFUSED);
                        let after = self.vm.vcpu(VcpuId(target)).ok();
                        ensure!(
                            before == after,
                            "a refused request changed the target: {before:?} -> {after:?}"
                        );
                    }
                }
            }
            Ev::Init(id) => {
                let id = VcpuId(id);
                if self.vm.init_vcpu(id).is_ok()
                    && let Some(e) = self.expect.remove(&id)
                {
                    self.applied(id, e)?;
                }
            }
            Ev::Entry(id) => {
                let id = VcpuId(id);
                let was_bugged = self.vm.is_bugged();
                let r = self.vm.prepare_entry(id);
                if let Ok(Entry::Run(hpa)) = r {
                    count(RAN);
                    ensure!(
                        !self.vm.is_bugged(),
                        "entry into a bugged VM: vCPU {id} may run on {hpa} although the VM is bugged"
                    );
                    let v = self.vm.vcpu(id).expect("it entered");
                    let own = match v.state {
                        VmsaState::KvmShared(p) | VmsaState::KvmPrivate(p) => {
                            p.hpa() == hpa && self.vm.platform().live_pages().contains(&p)
                        }
                        VmsaState::GuestOwned(g) => {
                            self.vm.platform().gmem_pfn(g.gfn()).map(Pfn::hpa) == Some(hpa)
                        }
                        VmsaState::None => false,
                    };
                    ensure!(
                        own,
                        "entry on a page not the vCPU's: vCPU {id} in {:?} runs on {hpa}",
                        v.state
                    );
                }
                // An entry applies a kicked request unless the VM was unusable already (a
                // switch that leaks bugs the VM, and the entry then refuses to run).
                let applies = match r {
                    Ok(_) | Err(Error::InvalidVmsa { .. }) => true,
                    Err(Error::VmBugged { .. }) => !was_bugged,
                    Err(_) => false,
                };
                if applies
                    && self.expect.get(&id).is_some_and(|e| e.kick)
                    && let Some(e) = self.expect.remove(&id)
                {
                    self.applied(id, e)?;
                }
            }
            Ev::SetMpState(id, mp) => drop(vm.set_mp_state(VcpuId(id), mp)),
            Ev::ToShared(i) => {
                let gfn = Gfn(GFNS[i]);
                vm.platform().unmap_gmem(gfn);
                vm.gmem_invalidate(gfn, Gfn(gfn.0 + 1));
            }
            Ev::ToPrivate(i) => {
                let gfn = Gfn(GFNS[i]);
                vm.platform().map_gmem(gfn);
                vm.gmem_invalidate(gfn, Gfn(gfn.0 + 1));
            }
            Ev::Free(id) => {
                if let Ok(v) = vm.free_vcpu_vmsa(VcpuId(id)) {
                    ensure!(
                        v.state == VmsaState::None && v.vmcb_vmsa_pa.is_none(),
                        "destroy left {v:?}"
                    );
                }
            }
            Ev::Decrypt(id) => drop(vm.decrypt_vmsa(VcpuId(id))),
            Ev::Migrate { fewer } => {
                let log = Arc::new(EventLog::new());
                let mut dst = Vm::migration_target(TestPlatform::new(Asid(7), Pfn(0x8_0001)), log.clone());
                let n = vm.vcpu_ids().len();
                for id in vm
                    .vcpu_ids()
                    .into_iter()
                    .take(if fewer { n.saturating_sub(1) } else { n })
                {
                    dst.create_vcpu(id).expect("a destination vCPU");
                }
                if dst.migrate_from(vm).is_ok() {
                    ensure!(self.leaks_here == 0, "a bugged VM migrated");
                    count(MIGRATIONS);
                    let src = std::mem::replace(&mut self.vm, dst);
                    self.drain(&self.log.clone())?;
                    self.dead.push(src);
                    self.log = log;
                    self.leaks_here = 0;
                    self.vcpu_leaks_here = 0;
                }
            }
            Ev::Fail(call) => vm.platform().fail_next(call),
            Ev::Teardown => {
                let down = vm.teardown();
                self.drain(&self.log.clone())?;
                ensure!(
                    down.leaked == self.vcpu_leaks_here,
                    "teardown count: {} vCPU pages leaked, {} Leaked events name a vCPU",
                    down.leaked,
                    self.vcpu_leaks_here
                );
                self.torn_down = true;
            }
        }
        Ok(())
    }

    /// Take the new events of `log` into the leak bookkeeping.
    fn drain(&mut self, log: &EventLog) -> R {
        for e in log.drain() {
            if let Event::Leaked {
                vcpu, pfn, detail, ..
            } = e
            {
                ensure!(!detail.is_empty(), "leak without a reason: pfn {pfn}");
                count(LEAKS);
                self.leaks_here += 1;
                ensure!(self.leaks.insert(pfn), "frame leaked twice: pfn {pfn}");
                if vcpu.is_some() {
                    self.vcpu_leaks_here += 1;
                    ensure!(self.vcpu_leaks.insert(pfn), "leak reported twice: pfn {pfn}");
                }
            }
        }
        Ok(())
    }

    fn check(&mut self) -> R {
        self.drain(&self.log.clone())?;
        let p = self.vm.platform();
        ensure!(
            p.violations().is_empty(),
            "platform rule broken: {:?}",
            p.violations()
        );
        let leaked: BTreeSet<Pfn> = p.leaked_pages().into_iter().collect();
        ensure!(
            leaked == self.leaks,
            "leak accounting: the platform leaked {leaked:?}, the events name {:?}",
            self.leaks
        );
        // Teardown leaks without bugging: the VM is gone then.
        ensure!(
            self.torn_down || self.vm.is_bugged() == (self.leaks_here > 0),
            "bugged flag: bugged {} with {} leaks",
            self.vm.is_bugged(),
            self.leaks_here
        );
        let mut held = Vec::new();
        for v in self.vm.vcpus() {
            match v.state {
                VmsaState::None => ensure!(
                    v.vmcb_vmsa_pa.is_none(),
                    "VMCB without VMSA: vCPU {} points at {:?}",
                    v.id,
                    v.vmcb_vmsa_pa
                ),
                VmsaState::KvmShared(pfn) | VmsaState::KvmPrivate(pfn) => {
                    ensure!(
                        v.vmcb_vmsa_pa == Some(pfn.hpa()),
                        "VMCB not the host VMSA: vCPU {} {:?} vs {pfn}",
                        v.id,
                        v.vmcb_vmsa_pa
                    );
                    // SEV-ES has no RMP: its private VMSAs are encrypted, not assigned.
                    let private = matches!(v.state, VmsaState::KvmPrivate(_)) && self.kind == VmKind::Snp;
                    ensure!(
                        private == p.is_assigned(pfn),
                        "RMP state: vCPU {} holds {:?}, assigned {}",
                        v.id,
                        v.state,
                        p.is_assigned(pfn)
                    );
                    held.push(pfn);
                }
                VmsaState::GuestOwned(g) => {
                    if let Some(pa) = v.vmcb_vmsa_pa {
                        ensure!(
                            p.gmem_pfn(g.gfn()).map(Pfn::hpa) == Some(pa),
                            "VMCB of a freed guest page: vCPU {} points at {pa}, {g} is backed by {:?}",
                            v.id,
                            p.gmem_pfn(g.gfn())
                        );
                    }
                }
            }
        }
        held.sort();
        let n = held.len();
        held.dedup();
        ensure!(n == held.len(), "one owner: a host VMSA is held by two vCPUs");
        let live = p.live_pages();
        ensure!(
            live == held,
            "one owner: live pages {live:?}, held VMSAs {held:?}"
        );
        for d in &self.dead {
            ensure!(
                d.host_pages().is_empty(),
                "a VM migrated away still holds {:?}",
                d.host_pages()
            );
            ensure!(
                d.platform().live_pages().is_empty(),
                "a VM migrated away has live pages"
            );
        }
        Ok(())
    }
}

/// Run `events` (the first names the VM kind, see [`generate`]) and answer how many ran (a
/// teardown ends the run).
fn run(events: &[Ev]) -> Result<usize, Broken> {
    let kind = match events.first() {
        Some(Ev::LaunchVmsas) => VmKind::SevEs,
        _ => VmKind::Snp,
    };
    let mut w = World::new(kind);
    let mut ran = 0;
    for (at, ev) in events.iter().enumerate() {
        let r = w.step(ev).and_then(|()| w.check());
        r.map_err(|what| Broken { at, what })?;
        ran += 1;
        if w.torn_down {
            break;
        }
    }
    let at = events.len();
    let end = (|| {
        if !w.torn_down {
            w.step(&Ev::Teardown)?;
        }
        w.check()?;
        let p = w.vm.platform();
        ensure!(
            p.live_pages().is_empty(),
            "teardown left pages: {:?}",
            p.live_pages()
        );
        ensure!(
            w.vm.launch_state() != LaunchState::Started || w.vm.vcpus().is_empty(),
            "teardown left vCPUs"
        );
        Ok(())
    })();
    end.map_err(|what| Broken { at, what })?;
    Ok(ran)
}

#[test]
fn random_event_runs_keep_every_invariant() {
    let (seeds, len) = if soak() { (100_000, 260) } else { (1_000, 120) };
    let t = std::time::Instant::now();
    let events = check_seeds("random_core", 0, seeds, |r| generate(r, len), run);
    println!(
        "random_core: {seeds} seeds, {events} events run, every invariant held after every event ({:.1} s)",
        t.elapsed().as_secs_f64()
    );
    assert!(
        events >= seeds * len as u64 / 2,
        "runs end too early: {events} events"
    );
    let [accepted, refused, applied, ran, leaks, migrations] =
        STATS.each_ref().map(|c| c.load(Ordering::Relaxed));
    println!(
        "random_core: AP requests accepted {accepted}, refused {refused}; applied at INIT/entry {applied}; entries that ran {ran}; pages leaked {leaks}; migrations {migrations}"
    );
    assert!(
        accepted > 0 && refused > 0 && applied > 0 && ran > 0 && leaks > 0,
        "the runs reach every path"
    );
}

/// Launched SNP VM with 3 vCPUs, as [`generate`]'s prologue makes it.
fn snp_prologue() -> Vec<Ev> {
    vec![
        Ev::LaunchFinish,
        Ev::CreateVcpu(0),
        Ev::CreateVcpu(1),
        Ev::CreateVcpu(2),
        Ev::LaunchStart {
            debug: false,
            bad: false,
        },
        Ev::LaunchFinish,
    ]
}

// ---- regressions: minimal event lists the runs found ------------------------------------------

fn ap(requester: u32, request: u32, target: u32, gfn: usize) -> Ev {
    Ev::Ap {
        requester,
        request,
        target,
        gpa: GpaArg::Gfn(gfn),
        features: Features::Vm,
    }
}

/// Found by seed 53: an entry that applies an AP_CREATE switches away from the host VMSA; when
/// making that page shared fails, it is leaked and the VM bugged, yet the entry still let the
/// vCPU run on the new VMSA. KVM checks `KVM_REQ_VM_DEAD` again before VMRUN
/// (`vcpu_enter_guest`, arch/x86/kvm/x86.c), so the vCPU leaves with EIO instead.
#[test]
fn regression_an_entry_whose_switch_leaks_does_not_run() {
    let events = [
        Ev::CreateVcpu(0),
        Ev::LaunchStart {
            debug: true,
            bad: false,
        },
        Ev::LaunchFinish,
        ap(1, AP_CREATE, 0, 2),
        Ev::Fail(Call::RmpMakeShared),
        Ev::Entry(0),
    ];
    assert!(run(&events).is_ok(), "{:?}", run(&events));
}

/// The runner is not vacuous: it reports a broken invariant with the event after which it broke,
/// and shrinks a long failing run to the events the failure needs.
#[test]
fn the_runner_catches_and_shrinks_a_broken_invariant() {
    // A run in which an accepted request is overwritten by an identical one is fine ...
    let mut events = snp_prologue();
    events.extend([
        ap(0, AP_CREATE, 1, 0),
        ap(0, AP_CREATE, 1, 0),
        Ev::Entry(1),
        Ev::Entry(0),
    ]);
    assert!(run(&events).is_ok());
    // ... and a check that disagrees with one event is caught there, and the run shrunk to it:
    // here the checker is told the platform leaked nothing while a refused RMPUPDATE at
    // teardown leaks the BSP's VMSA.
    let strict = |events: &[Ev]| -> Result<(), Broken> {
        run(events)?;
        let mut w = World::new(VmKind::Snp);
        for (at, ev) in events.iter().enumerate() {
            w.step(ev).map_err(|what| Broken { at, what })?;
            w.drain(&w.log.clone()).map_err(|what| Broken { at, what })?;
            if w.leaks_here > 0 {
                return Err(Broken {
                    at,
                    what: "leaked: a page".into(),
                });
            }
        }
        Ok(())
    };
    let mut long = snp_prologue();
    long.extend([
        Ev::Entry(0),
        ap(0, AP_CREATE_ON_INIT, 2, 1),
        Ev::Init(2),
        Ev::Fail(Call::RmpMakeShared),
    ]);
    long.extend([Ev::Entry(2), Ev::Decrypt(1), Ev::Teardown]);
    let broken = strict(&long).expect_err("the teardown leaks");
    assert_eq!(broken.at, long.len() - 1);
    let minimal = scenario_tests::random::shrink(&long, |c| strict(c).is_err());
    assert!(minimal.len() < long.len(), "{minimal:?}");
    assert!(minimal.contains(&Ev::Fail(Call::RmpMakeShared)), "{minimal:?}");
}
