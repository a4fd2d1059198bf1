//! VMSA-image mode behind vmsa-host's interface: plain KVM, with vmsa-core in user space playing
//! the SNP kernel.
//!
//! Who owns what:
//!
//! - [`KvmImageHost`] owns the probe's verdict and nothing else; every VM opens `/dev/kvm` itself.
//! - [`KvmImageVm`] owns (through an `Arc` its vCPUs share) the default-type KVM VM fd with
//!   `KVM_CAP_X86_USER_SPACE_MSR` and a split irqchip ([`split_irqchip_cap`]), the memslots of
//!   shared RAM ([`GuestRam`]: guest_memfd `MMAP | INIT_SHARED` where KVM has it, anonymous
//!   memory elsewhere), the CPUID table, and vmsa-core's [`vmsa_core::Vm`] over a
//!   [`KvmPlatform`]: the "kernel", which owns every host VMSA page and the tracked RMP.
//!   vmsa-core's VM is created when the first vCPU is (memory must be in place by then: its
//!   frame space is fixed).
//! - [`KvmImageVcpu`] owns the KVM vCPU fd (created by its first run, on its own thread), its
//!   GHCB MSR and its [`KvmKick`]. Its [`Vcpu::run`] loops over [`crate::vcpu`]'s steps:
//!   `prepare_entry`, load the VMSA the VMCB points at when an AP-creation request switched it,
//!   `KVM_RUN`, the GHCB doorbell (AP creation through vmsa-core, the target's request applied
//!   before the requester goes on) served inside; only vmsa-host's exits come out.
//!
//! Every GHCB request the guest makes is recorded as a [`GuestStep`] of the report's
//! [`GuestActivity`], in order: its action (`ap_create`, `ap_create_on_init`, `ap_destroy`, or
//! `ghcb` for a GHCB refused before its request was decoded), the requesting vCPU, the refusal
//! with the `sw_exit_info` codes the guest got, and what happened to the target. The requester
//! does not return to its guest before an accepted request is applied (KVM itself does not wait;
//! the guest cannot tell the difference), which keeps ownership histories and steps
//! deterministic: to a parked target (halted, an AP nobody created yet, or a vCPU whose thread
//! has not started) it applies the request itself while the target stays parked, because that
//! is the first thing the target would do on waking (KVM's
//! `KVM_REQ_UPDATE_PROTECTED_GUEST_STATE` is served before anything else at its next entry);
//! otherwise it waits until the target has applied it (see [`crate::kick`]). Either way the
//! same `prepare_entry` runs under the target's vCPU lock, and the requester never waits for
//! another thread to be scheduled while its target sleeps. Nor does it wait while a request
//! for itself is pending: a target acknowledges only at its own entry, so two vCPUs whose
//! requests target each other would wait for each other. Its own wake (or kick) ends the wait;
//! it serves it first and waits again before it enters its guest
//! (`KvmImageVcpu::wait_for_target`).
//!
//! Exits of the built-in guest program: the BSP's (vCPU 0) `OUT` to the DONE port is
//! [`VcpuExit::IoOut`]; an AP's DONE (`out DONE; hlt`) parks it, reported as the
//! [`VcpuExit::Halt`] it leads to; YIELD is served inside, by waiting for another vCPU's exit
//! ([`Progress`]); any
//! other port (FAIL included) is `IoOut`. A triple fault is `Shutdown`; `EINTR` after a kick is
//! `Interrupted`. A guest `HLT` halts the vCPU inside KVM (its local APIC is in the kernel)
//! until a kick brings it out as `Interrupted`. A vCPU vmsa-core reports Blocked (halted, or an
//! AP nobody created yet) waits inside `run()` until kicked or woken by an AP-creation request.
//!
//! Nothing is encrypted and there is no RMP here (see [`crate::platform`]). SEV-ES guests are
//! refused at `create_vm`: the guest program and the doorbell speak the SNP AP-creation
//! protocol, which an SEV-ES guest does not have.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use kvm_bindings::{KVM_MSR_EXIT_REASON_INVAL, KVM_MSR_EXIT_REASON_UNKNOWN, kvm_enable_cap};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmsa_core::{Entry, Event, EventLog, MpState, PreparedEntry, SevEsSaveArea, VcpuId, VmConfig, VmKind};
use vmsa_host::{
    Capabilities, Conversion, Errno, GuestActivity, GuestStep, HostReport, Hypervisor, HypervisorError, Kick,
    LaunchUpdate, MemoryRegion, Observed, Refusal, TeardownCounts, Vcpu, VcpuError, VcpuExit, Vm, VmError,
    VmSpec,
};

use super::HostError;
use crate::error::IoctlError;
use crate::frames::FrameSpace;
use crate::gmem::{GmemError, GuestRam, RamBacking};
use crate::guest::layout::ports;
use crate::kick::{self, Consumed, KickState, KvmKick, Progress};
use crate::platform::KvmPlatform;
use kvm_bindings::{KVM_CAP_SPLIT_IRQCHIP, KVM_CAP_X86_USER_SPACE_MSR};

use crate::cpuid;
use crate::probe::{Mode, ProbeReport};
use crate::vcpu::{self, ExitCounts, Outcome, Step};

type CoreVm = vmsa_core::Vm<KvmPlatform>;

/// How long a YIELD waits for another vCPU's exit before the vCPU looks at guest memory again
/// (for progress other vCPUs make in memory alone).
const YIELD_TIMEOUT: Duration = Duration::from_millis(1);

/// What a VMSA-image host says in reports and refusals.
const NO_SEV_ES: &str = "VMSA-image mode runs SEV-SNP guests only: its guest program and GHCB doorbell speak the SNP AP-creation protocol, which SEV-ES guests do not have";

/// The host of VMSA-image mode (see the module docs).
#[derive(Debug)]
pub struct KvmImageHost {
    caps: Capabilities,
    /// What its VMs' RAM is (the probe's [`crate::probe::Capabilities::image_ram`]).
    ram: RamBacking,
    reason: String,
    kick_timeout: Duration,
    /// KVM's supported CPUID table, read from the host's creation on (its VMs share it): the
    /// read then overlaps `KVM_CREATE_VM` and the guest's setup.
    cpuid: Arc<cpuid::SupportedLater>,
}

impl KvmImageHost {
    /// The host, if the probe says VMSA-image mode runs here; `reason` says why this mode was
    /// chosen (for reports).
    pub fn new(probe: &ProbeReport, reason: impl Into<String>) -> Result<Self, HypervisorError> {
        if !probe.supports(Mode::VmsaImage) {
            return Err(HypervisorError::Unsupported {
                kind: VmKind::Snp,
                reason: Box::new(HostError::Missing {
                    mode: Mode::VmsaImage,
                    missing: probe.missing(Mode::VmsaImage).to_vec(),
                }),
            });
        }
        let kvm = Kvm::new().map_err(|e| HypervisorError::Host {
            call: "open /dev/kvm",
            source: Box::new(IoctlError::new("open /dev/kvm", e)),
        })?;
        Ok(Self {
            cpuid: cpuid::SupportedLater::start(kvm),
            ram: probe.image_ram.unwrap_or(RamBacking::Anonymous),
            caps: Capabilities {
                kinds: vec![VmKind::Snp],
                // SEV_FEATURES beyond SNP_ACTIVE are copied into the VMSAs and checked on AP
                // creation; nothing else depends on them here.
                vmsa_features: !vmsa_core::layout::SEV_FEAT_SNP_ACTIVE,
                max_vcpus: probe.caps.map_or(0, |c| u32::try_from(c.max_vcpus).unwrap_or(0)),
                ownership_visible: true,
                launch_digest_visible: false,
                private_memory: false,
                // vmsa-core plays the kernel, with its supplied-VMSA mode: the BSP starts from
                // the VMSA page the VMM put into guest memory.
                supplied_vmsa: true,
                // It creates SNP VMs only, and KVM moves no SNP context
                // (sev_vm_move_enc_context_from refuses an SNP source).
                intra_host_migration: false,
            },
            reason: reason.into(),
            kick_timeout: Duration::from_secs(10),
        })
    }

    /// Why this mode was chosen.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// What its VMs' guest RAM is.
    pub fn ram_backing(&self) -> RamBacking {
        self.ram
    }

    /// How long a doorbell waits for its target vCPU to apply an AP-creation request (10 s).
    pub fn with_kick_timeout(mut self, timeout: Duration) -> Self {
        self.kick_timeout = timeout;
        self
    }
}

impl Hypervisor for KvmImageHost {
    type Vm = KvmImageVm;

    fn name(&self) -> &str {
        "kvm VMSA-image"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn create_vm(&self, spec: VmSpec) -> Result<KvmImageVm, HypervisorError> {
        if spec.kind != VmKind::Snp {
            return Err(HypervisorError::Unsupported {
                kind: spec.kind,
                reason: NO_SEV_ES.into(),
            });
        }
        if spec.vmsa_features & vmsa_core::layout::SEV_FEAT_SNP_ACTIVE != 0 {
            // __sev_guest_init: vmsa_features outside the supported set; SNP_ACTIVE is KVM's.
            return Err(Refusal::new(
                "KVM_SEV_INIT2",
                Errno::EINVAL,
                "vmsa_features must not hold SNP_ACTIVE, which KVM adds itself (__sev_guest_init)",
            )
            .into());
        }
        let host = |call, e: IoctlError| HypervisorError::Host {
            call,
            source: Box::new(e),
        };
        kick::install().map_err(|e| host("sigaction(SIGRTMIN)", e))?;
        let kvm = Kvm::new().map_err(|e| host("open /dev/kvm", IoctlError::new("open /dev/kvm", e)))?;
        let vm_fd = kvm
            .create_vm()
            .map_err(|e| host("KVM_CREATE_VM", IoctlError::new("KVM_CREATE_VM", e)))?;
        let call = "KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)";
        vm_fd
            .enable_cap(&user_space_msr_cap())
            .map_err(|e| host(call, IoctlError::new(call, e)))?;
        let call = "KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)";
        vm_fd
            .enable_cap(&split_irqchip_cap())
            .map_err(|e| host(call, IoctlError::new(call, e)))?;
        let limit = |cap| u64::try_from(kvm.check_extension_int(cap)).unwrap_or(0);
        let (max_vcpu_ids, max_vcpus) = (
            limit(kvm_ioctls::Cap::MaxVcpuId),
            limit(kvm_ioctls::Cap::MaxVcpus),
        );
        Ok(KvmImageVm {
            spec,
            created: 0,
            shared: Arc::new(Shared {
                vm_fd: Arc::new(vm_fd),
                max_vcpu_ids,
                max_vcpus,
                cpuid: self.cpuid.clone(),
                ram_backing: self.ram,
                rams: RwLock::new(Vec::new()),
                core: RwLock::new(None),
                events: Arc::new(EventLog::new()),
                kicks: RwLock::new(BTreeMap::new()),
                progress: Progress::default(),
                kick_timeout: self.kick_timeout,
                vmruns: AtomicU64::new(0),
                ap_refused: AtomicU64::new(0),
                steps: Mutex::new(Vec::new()),
                applied: Mutex::new(BTreeMap::new()),
                switched_for: Mutex::new(BTreeSet::new()),
            }),
        })
    }
}

/// `KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)` for unknown and invalid MSRs: the SEV_STATUS
/// read and the GHCB MSR doorbell exit to user space.
pub fn user_space_msr_cap() -> kvm_enable_cap {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        ..Default::default()
    };
    cap.args[0] = u64::from(KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_INVAL);
    cap
}

/// `KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)`: each vCPU gets an in-kernel local APIC (no PIC or
/// IOAPIC), as an SNP VM has (QEMU's `kernel-irqchip=split`). A guest HLT then halts its vCPU
/// inside KVM until it is kicked, as on an SNP host. Without any in-kernel APIC, KVM counts the
/// VM's vCPUs in its `kvm_has_noapic_vcpu` static key (`kvm_create_lapic`, `kvm_free_lapic`):
/// a process's first vCPU and its last one's destruction each patch kernel text on every CPU,
/// ~0.8 ms together on the PVM development hosts.
pub fn split_irqchip_cap() -> kvm_enable_cap {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_SPLIT_IRQCHIP,
        ..Default::default()
    };
    // Routes reserved for a user-space IOAPIC's pins (QEMU's 24); none is ever used here.
    cap.args[0] = 24;
    cap
}

/// What the VM and its vCPU threads share.
struct Shared {
    vm_fd: Arc<VmFd>,
    /// `KVM_CAP_MAX_VCPU_ID`: vCPU ids must be below it.
    max_vcpu_ids: u64,
    /// `KVM_CAP_MAX_VCPUS`: how many vCPUs a VM may have.
    max_vcpus: u64,
    /// KVM's supported CPUID table, read while the VM is set up.
    cpuid: Arc<cpuid::SupportedLater>,
    /// What `add_memory` backs guest RAM with.
    ram_backing: RamBacking,
    rams: RwLock<Vec<Arc<GuestRam>>>,
    /// vmsa-core's VM (the SNP "kernel"): VM-wide commands take it for writing; vCPU threads
    /// read it around `prepare_entry` and doorbells, never across `KVM_RUN`.
    core: RwLock<Option<CoreVm>>,
    events: Arc<EventLog>,
    /// Each vCPU's kick state, by APIC ID: doorbells wake their targets through it.
    kicks: RwLock<BTreeMap<u32, Arc<KickState>>>,
    /// Every vCPU's exits, for a vCPU on the YIELD port.
    progress: Progress,
    kick_timeout: Duration,
    vmruns: AtomicU64,
    ap_refused: AtomicU64,
    /// Every GHCB request so far, in order.
    steps: Mutex<Vec<GuestStep>>,
    /// By APIC ID: what applying an AP-creation request led to, written by the vCPU's own entry
    /// that applied it (before it acknowledges a wake), for the requester's step.
    applied: Mutex<BTreeMap<u32, String>>,
    /// APIC IDs of parked vCPUs whose requester applied their AP-creation request on their
    /// behalf: their next entry must load the VMSA, although it applies nothing itself.
    switched_for: Mutex<BTreeSet<u32>>,
}

impl Shared {
    /// The memory slot holding `len` bytes at `gpa`, else the first slot (whose accesses then
    /// report the range error); `None` before any memory was added.
    fn ram_for(&self, gpa: u64, len: u64) -> Option<Arc<GuestRam>> {
        let rams = read(&self.rams);
        rams.iter()
            .find(|r| r.offset_of(gpa, len).is_some())
            .or(rams.first())
            .cloned()
    }

    /// Record a GHCB request of `vcpu` as the next guest step.
    fn record(&self, action: &str, vcpu: u32, error: Option<String>, detail: String) {
        let mut steps = self.steps.lock().unwrap_or_else(|p| p.into_inner());
        let index = steps.len();
        steps.push(GuestStep {
            index,
            action: action.to_owned(),
            vcpu,
            error,
            detail,
        });
    }

    /// What vCPU `target`'s entry made of the request it applied (the simulator's words:
    /// entered, halted, cannot run).
    fn take_applied(&self, target: u32) -> Option<String> {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&target)
    }

    /// Whether a requester applied `id`'s AP-creation request on its behalf since it last
    /// looked (and forget it).
    fn take_switched_for(&self, id: u32) -> bool {
        self.switched_for
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
    }
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write_map(l: &Mutex<BTreeMap<u32, String>>) -> std::sync::MutexGuard<'_, BTreeMap<u32, String>> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

/// What an entry made of the AP-creation request it applied, in the simulator's words (the
/// guest step's detail).
fn applied(id: u32, entry: &Result<Entry, vmsa_core::Error<crate::platform::PlatformError>>) -> String {
    match entry {
        Ok(Entry::Run(_)) => format!("vCPU {id} entered"),
        Ok(Entry::Blocked(_)) => format!("vCPU {id} halted"),
        Err(e) => format!("vCPU {id} cannot run: {e}"),
    }
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// A VMSA-image VM (see the module docs for what it owns).
pub struct KvmImageVm {
    spec: VmSpec,
    shared: Arc<Shared>,
    /// vCPUs created (KVM's `created_vcpus`).
    created: u64,
}

impl std::fmt::Debug for KvmImageVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmImageVm")
            .field("spec", &self.spec)
            .field("slots", &read(&self.shared.rams).len())
            .finish_non_exhaustive()
    }
}

impl KvmImageVm {
    /// Read guest memory at `gpa`: what the guest wrote (a VMSA-image guest is not encrypted),
    /// for tests and debugging.
    pub fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GmemError> {
        let len = buf.len() as u64;
        let ram = self.shared.ram_for(gpa, len).ok_or(GmemError::OutOfRange {
            offset: gpa,
            len,
            size: 0,
        })?;
        ram.read(gpa, buf)
    }

    /// vmsa-core's VM, created on first use over the memory added so far.
    fn core_mut(&self) -> RwLockWriteGuard<'_, Option<CoreVm>> {
        let mut core = write(&self.shared.core);
        if core.is_none() {
            let frames = FrameSpace::new(read(&self.shared.rams).clone());
            // In the supplied-VMSA mode vmsa-core allocates no VMSA at vCPU creation; the BSP's
            // VMCB points at the supplied page's guest_memfd frame once the launch update took
            // it, and `KvmImageVcpu::enter` loads the BSP's registers from there.
            let config = VmConfig {
                // Without a table (KVM_GET_SUPPORTED_CPUID failed), each vCPU's first run
                // reports that failure; the default bound only stands until then.
                max_phys_bits: self.shared.cpuid.get().map_or(48, cpuid::max_phys_bits),
                supplied_vmsa: self.spec.supplied_vmsa,
                ..VmConfig::snp(self.spec.vmsa_features)
            };
            *core = Some(vmsa_core::Vm::new(
                KvmPlatform::new(frames),
                config,
                self.shared.events.clone(),
            ));
        }
        core
    }

    /// Run a VM-wide vmsa-core command named `call`, mapping KVM's refusals.
    fn command(&self, call: &'static str, f: impl FnOnce(&mut CoreVm) -> CoreResult) -> Result<(), VmError> {
        let mut guard = self.core_mut();
        let Some(core) = guard.as_mut() else {
            unreachable!("core_mut creates the VM");
        };
        f(core).map_err(|e| core_error(call, e))
    }
}

type CoreResult = Result<(), vmsa_core::Error<crate::platform::PlatformError>>;

fn core_error(call: &'static str, e: vmsa_core::Error<crate::platform::PlatformError>) -> VmError {
    match Refusal::from_core(call, &e) {
        Some(r) => VmError::Refused(r),
        None => VmError::host(call, e),
    }
}

impl Vm for KvmImageVm {
    type Vcpu = KvmImageVcpu;

    fn spec(&self) -> VmSpec {
        self.spec
    }

    fn add_memory(&mut self, region: MemoryRegion) -> Result<(), VmError> {
        // guest_memfd-backed (MMAP | INIT_SHARED, mapped at its own userspace_addr: the only
        // arrangement in which a guest runs from guest_memfd memory on PVM hosts) where KVM has
        // it, anonymous memory elsewhere; vmsa-core's guest-owned VMSAs resolve through either.
        let backing = self.shared.ram_backing;
        let call = backing.memslot_call();
        if read(&self.shared.core).is_some() {
            return Err(VmError::host(call, HostError::MemoryAfterVcpus));
        }
        let ram = GuestRam::new(
            self.shared.vm_fd.clone(),
            region.slot,
            region.gpa.0,
            region.size,
            backing,
        )
        .map_err(|e| VmError::host(call, e))?;
        write(&self.shared.rams).push(Arc::new(ram));
        Ok(())
    }

    fn set_memory_attributes(&self, _range: Conversion) -> Result<(), VmError> {
        // kvm_vm_ioctl_set_mem_attributes does not exist for a default VM here
        // (KVM_CAP_MEMORY_ATTRIBUTES is 0), so the ioctl is not even dispatched.
        Err(Refusal::new(
            "KVM_SET_MEMORY_ATTRIBUTES",
            Errno::ENOTTY,
            "a default KVM VM has no private memory (KVM_CAP_MEMORY_ATTRIBUTES is 0); VMSA-image guests never convert",
        )
        .into())
    }

    fn launch_start(&mut self, policy: u64) -> Result<(), VmError> {
        self.command("KVM_SEV_SNP_LAUNCH_START", |vm| vm.launch_start(policy))
    }

    fn launch_update(&mut self, u: LaunchUpdate<'_>) -> Result<(), VmError> {
        // The contents go into guest memory through vmsa-core (SNP_LAUNCH_UPDATE of the tracked
        // RMP: written, made pre-guest, "measured"); no vCPU's VMSA changes owner, except for a
        // supplied VMSA page, which becomes the BSP's (GuestOwned) in the supplied mode.
        let mut guard = self.core_mut();
        let Some(core) = guard.as_mut() else {
            unreachable!("core_mut creates the VM");
        };
        // kvm_gmem_populate (virt/kvm/guest_memfd.c) refuses a page guest_memfd prepared
        // already with -EEXIST before post_populate writes to it: here, a frame the tracked RMP
        // has assigned (a write to it would be an RMP #PF).
        if self.spec.kind == VmKind::Snp && u.gpa.is_page_aligned() {
            let first = u.gpa.gfn().0;
            let p = core.platform();
            let prepared = (first..first.saturating_add(u.len / vmsa_core::PAGE_SIZE)).any(|gfn| {
                vmsa_core::Platform::gmem_pfn(p, vmsa_core::Gfn(gfn)).is_some_and(|pfn| p.rmp(pfn).assigned)
            });
            if prepared {
                return Err(Refusal::new(
                    "KVM_SEV_SNP_LAUNCH_UPDATE",
                    Errno::EEXIST,
                    "a page of the range is prepared already (launched before): kvm_gmem_populate refuses it",
                )
                .into());
            }
        }
        core.launch_update_data(u.gpa, u.len, u.page_type, u.data)
            .map_err(|e| core_error("KVM_SEV_SNP_LAUNCH_UPDATE", e))
    }

    fn launch_update_vmsas(&mut self) -> Result<(), VmError> {
        self.command("KVM_SEV_LAUNCH_UPDATE_VMSA", |vm| vm.launch_update_vmsas())
    }

    fn launch_finish(&mut self) -> Result<(), VmError> {
        self.command("KVM_SEV_SNP_LAUNCH_FINISH", |vm| vm.launch_finish([0; 32]))
    }

    /// vmsa-core's vCPU now; the KVM vCPU (`KVM_CREATE_VCPU`, `KVM_SET_CPUID2`) is created by
    /// the vCPU's first [`Vcpu::run`], on the thread that runs it: vCPUs then come up in
    /// parallel, and an AP's KVM vCPU is made while its thread waits for the guest to create it,
    /// off the VMM's and the BSP's way. KVM's refusals of `kvm_vm_ioctl_create_vcpu` are
    /// answered here, at creation: a taken id (vmsa-core's same rule), an id of
    /// `KVM_MAX_VCPU_IDS` or more, a VM that has `KVM_MAX_VCPUS` vCPUs.
    fn create_vcpu(&mut self, id: u32) -> Result<KvmImageVcpu, VmError> {
        let call = "KVM_CREATE_VCPU";
        if u64::from(id) >= self.shared.max_vcpu_ids || self.created >= self.shared.max_vcpus {
            return Err(Refusal::new(
                call,
                Errno::EINVAL,
                "the vCPU id is beyond KVM_MAX_VCPU_IDS or the VM has KVM_MAX_VCPUS vCPUs (kvm_vm_ioctl_create_vcpu)",
            )
            .into());
        }
        let sev_status = {
            let mut guard = self.core_mut();
            let Some(core) = guard.as_mut() else {
                unreachable!("core_mut creates the VM");
            };
            core.create_vcpu(VcpuId(id)).map_err(|e| core_error(call, e))?;
            (core.config().vmsa_features() << 2) | 0b11
        };
        self.created += 1;
        let kick = KvmKick::parked();
        write(&self.shared.kicks).insert(id, kick.state().clone());
        Ok(KvmImageVcpu {
            id,
            shared: self.shared.clone(),
            kick,
            consumed: Consumed::default(),
            wakes_seen: 0,
            entered: false,
            need_load: true,
            ghcb_msr: 0,
            sev_status,
            exits: ExitCounts::default(),
            progress_seen: 0,
            fd: None,
            cpuid_set: false,
            awaiting: None,
        })
    }

    fn cycles(&self) -> Observed<u64> {
        Observed::hidden("real vCPUs have no simulated clock")
    }

    fn teardown(self) -> HostReport {
        let core = write(&self.shared.core).take();
        let (down, pages) = match core {
            Some(mut core) => {
                let down = core.teardown();
                let pages = core.platform().frames().host_pages();
                (down, pages)
            }
            None => (Default::default(), (0, 0)),
        };
        let events = self.shared.events.snapshot();
        let ap_requests = events
            .iter()
            .filter(|e| matches!(e, Event::ApRequest { .. }))
            .count() as u64;
        write(&self.shared.rams).clear();
        HostReport {
            events: Observed::Seen(events),
            launch_digest: Observed::hidden("VMSA-image mode measures nothing: there is no SEV firmware"),
            rmp_faults: Observed::hidden(
                "there is no RMP in VMSA-image mode: the tracked RMP refuses host writes, it does not fault",
            ),
            guest: Observed::Seen(GuestActivity {
                vmruns: self.shared.vmruns.load(Ordering::SeqCst),
                ap_requests,
                ap_refused: self.shared.ap_refused.load(Ordering::SeqCst),
                steps: std::mem::take(&mut *self.shared.steps.lock().unwrap_or_else(|p| p.into_inner())),
                // The kernel's dump_vmcb goes to its log, which this host does not read.
                vmcb_dumps: Vec::new(),
            }),
            teardown: TeardownCounts {
                vcpus: down.vcpus,
                vmsas_leaked: Observed::Seen(down.leaked),
                guest_frames_released: Observed::hidden(self.shared.ram_backing.released_by()),
                guest_frames_leaked: Observed::hidden(self.shared.ram_backing.released_by()),
                frames_still_allocated: Observed::Seen(pages.0 as u64),
                frames_leaked_on_purpose: Observed::Seen(pages.1 as u64),
                error: None,
            },
        }
    }
}

/// A VMSA-image vCPU (see the module docs).
pub struct KvmImageVcpu {
    id: u32,
    shared: Arc<Shared>,
    kick: KvmKick,
    consumed: Consumed,
    /// Wakes applied (AP-creation requests for this vCPU that vmsa-core saw at entry).
    wakes_seen: u64,
    /// vmsa-core said Run and the VMSA is loaded: `KVM_RUN` may go on.
    entered: bool,
    need_load: bool,
    ghcb_msr: u64,
    sev_status: u64,
    exits: ExitCounts,
    /// The VM's exit count this vCPU last saw on the YIELD port.
    progress_seen: u64,
    /// The KVM vCPU, from the first `run` on (see [`KvmImageVm::create_vcpu`]).
    fd: Option<VcpuFd>,
    /// `KVM_SET_CPUID2` succeeded on `fd` (no `KVM_RUN` before it).
    cpuid_set: bool,
    /// A request of this vCPU's whose target has not acknowledged it yet: the wait for it was
    /// cut short by this vCPU's own kick or wake, and goes on before it enters its guest.
    awaiting: Option<Awaited>,
}

/// The acknowledgement a requester still waits for (see [`KvmImageVcpu::wait_for_target`]).
#[derive(Debug)]
struct Awaited {
    /// The target's APIC ID.
    target: u32,
    /// Its kick state.
    state: Arc<KickState>,
    /// The wake sent for the request.
    seq: u64,
}

impl std::fmt::Debug for KvmImageVcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmImageVcpu")
            .field("id", &self.id)
            .field("exits", &self.exits)
            .finish_non_exhaustive()
    }
}

impl KvmImageVcpu {
    /// The exits so far.
    pub fn exits(&self) -> ExitCounts {
        self.exits
    }

    fn host(&self, call: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> VcpuError {
        VcpuError::host(self.id, call, e)
    }

    /// Create the KVM vCPU, then set its CPUID table, unless an earlier run did.
    ///
    /// The fd is kept as soon as `KVM_CREATE_VCPU` succeeds: closing a vCPU fd does not destroy
    /// the vCPU (it lives until the VM does, `kvm_destroy_vcpus`), so a retry after a failed
    /// CPUID step must not create it again (`kvm_vm_ioctl_create_vcpu` would answer `EEXIST`,
    /// hiding the first error); it retries the CPUID step alone.
    fn create_kvm_vcpu(&mut self) -> Result<(), VcpuError> {
        if self.fd.is_none() {
            let call = "KVM_CREATE_VCPU";
            let fd = self
                .shared
                .vm_fd
                .create_vcpu(u64::from(self.id))
                .map_err(|e| self.host(call, IoctlError::new(call, e)))?;
            self.fd = Some(fd);
        }
        if !self.cpuid_set {
            let Some(fd) = &self.fd else {
                unreachable!("created above");
            };
            let table = self
                .shared
                .cpuid
                .get()
                .map_err(|e| self.host("KVM_GET_SUPPORTED_CPUID", e))?;
            cpuid::set(fd, table, self.id).map_err(|e| self.host("KVM_SET_CPUID2", e))?;
            self.cpuid_set = true;
        }
        Ok(())
    }

    /// vmsa-core's entry for this vCPU; loads the VMSA if an AP-creation request switched it
    /// (applied here or, while this vCPU was parked, by its requester). `Ok(false)`: Blocked.
    ///
    /// A wake alone does not reload: the request it was sent for may have been applied by an
    /// earlier entry of this vCPU, between the request's acceptance and the wake.
    fn enter(&mut self) -> Result<bool, VcpuError> {
        let st = self.kick.state().clone();
        let wakes = st.wakes();
        if wakes != self.wakes_seen {
            self.wakes_seen = wakes;
            if self.shared.take_switched_for(self.id) {
                self.need_load = true;
            }
        }
        let core = read(&self.shared.core);
        let Some(core) = core.as_ref() else {
            return Err(self.host("prepare_entry", HostError::NoVm));
        };
        let PreparedEntry { entry, switched } = core.prepare_entry_noting_switch(VcpuId(self.id));
        if switched {
            self.need_load = true;
            // For the requester's step: what its request led to.
            write_map(&self.shared.applied).insert(self.id, applied(self.id, &entry));
        }
        st.ack(self.wakes_seen);
        match entry {
            Err(vmsa_core::Error::InvalidVmsa { .. }) => Err(VcpuError::Refused {
                vcpu: self.id,
                // pre_sev_run: a runnable SNP vCPU without a valid VMSA cannot be entered.
                refusal: Refusal::new(
                    "KVM_RUN",
                    Errno::EINVAL,
                    "the vCPU is runnable but its VMCB holds no valid VMSA (pre_sev_run)",
                ),
            }),
            Err(e) => Err(self.host("prepare_entry", e)),
            Ok(Entry::Blocked(_)) => Ok(false),
            Ok(Entry::Run(hpa)) => {
                if self.need_load {
                    let Some(fd) = &self.fd else {
                        unreachable!("run creates the KVM vCPU before its first entry");
                    };
                    if let Err(e) = vcpu::load(core, fd, hpa) {
                        // Like a failed VMRUN: the vCPU stays as it is until the next request.
                        let _ = core.set_mp_state(VcpuId(self.id), MpState::Halted);
                        return Err(self.host("loading the VMSA", e));
                    }
                    self.need_load = false;
                    self.shared.vmruns.fetch_add(1, Ordering::SeqCst);
                }
                Ok(true)
            }
        }
    }

    /// The vCPU halts: vmsa-core blocks it until a request (or a kick) comes.
    fn halt(&mut self) -> VcpuExit {
        if let Some(core) = read(&self.shared.core).as_ref() {
            let _ = core.set_mp_state(VcpuId(self.id), MpState::Halted);
        }
        self.entered = false;
        VcpuExit::Halt
    }

    /// Serve a doorbell and record it as a guest step; wakes and waits for the target of an
    /// accepted request.
    fn doorbell(&mut self, value: u64) -> Result<(), VcpuError> {
        let answer = {
            let ram = self.shared.ram_for(value & !0xfff, 4096).ok_or_else(|| {
                self.host("GHCB doorbell", vcpu::VcpuError::GhcbOutsideMemory { gpa: value })
            })?;
            let core = read(&self.shared.core);
            let core = core
                .as_ref()
                .ok_or_else(|| self.host("GHCB doorbell", HostError::NoVm))?;
            vcpu::doorbell(core, &ram, self.id, value).map_err(|e| self.host("GHCB doorbell", e))?
        };
        let (target, wake) = match answer.outcome {
            Outcome::Refused { why } => {
                self.shared.ap_refused.fetch_add(1, Ordering::SeqCst);
                self.shared
                    .record(answer.action, self.id, Some(why), String::new());
                return Ok(());
            }
            Outcome::Accepted { target, wake } => (target, wake),
        };
        let applied = if !wake {
            Ok(format!("vCPU {target} waits for INIT"))
        } else if target == self.id {
            // A request for itself: applied at the next entry.
            self.kick.state().wake();
            Ok(format!("vCPU {target} applies it at its next entry"))
        } else {
            self.wake(target)
        };
        let from = answer
            .request
            .filter(|r| r.request() != vmsa_core::ghcb::AP_DESTROY)
            .map(|r| {
                format!(
                    " (VMSA at {:#x}, SEV_FEATURES {:#x})",
                    r.exit_info_2,
                    r.rax.unwrap_or(0)
                )
            })
            .unwrap_or_default();
        let detail = match &applied {
            Ok(state) => format!("{state}{from}"),
            Err(e) => format!("{e}{from}"),
        };
        self.shared.record(answer.action, self.id, None, detail);
        applied.map(drop)
    }

    /// Wake `target` (another vCPU) for the request just accepted once the request is applied:
    /// by this thread if the target is parked (it would do nothing else first), else by the
    /// target, waited for. Returns what applying it led to.
    fn wake(&mut self, target: u32) -> Result<String, VcpuError> {
        let Some(t) = read(&self.shared.kicks).get(&target).cloned() else {
            return Err(self.host("GHCB doorbell", vcpu::VcpuError::UnknownTarget { target }));
        };
        {
            // Lock order: vmsa-core's VM, then the target's kick state (as the target's entry).
            let core = read(&self.shared.core);
            let core = core
                .as_ref()
                .ok_or_else(|| self.host("GHCB doorbell", HostError::NoVm))?;
            let apply = || {
                let p = core.prepare_entry_noting_switch(VcpuId(target));
                if p.switched {
                    self.shared
                        .switched_for
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(target);
                    Some(applied(target, &p.entry))
                } else {
                    // The target's own entry applied it before it parked.
                    None
                }
            };
            if let Some(what) = t.wake_parked(apply) {
                return Ok(what
                    .or_else(|| self.shared.take_applied(target))
                    .unwrap_or_else(|| {
                        format!("vCPU {target} applied it before this request was answered")
                    }));
            }
        }
        let seq = t.wake();
        self.awaiting = Some(Awaited {
            target,
            state: t,
            seq,
        });
        if self.wait_for_target()? {
            Ok(self
                .shared
                .take_applied(target)
                .unwrap_or_else(|| format!("vCPU {target} has not applied it yet")))
        } else {
            Ok(format!(
                "vCPU {target} applies it at its next entry (this vCPU serves its own kick or request first)"
            ))
        }
    }

    /// Wait for the target of this vCPU's last accepted request ([`KvmImageVcpu::awaiting`]) to
    /// acknowledge it. `Ok(true)`: acknowledged (or nothing awaited); `Ok(false)`: this vCPU's
    /// own kick or wake came first, and the wait goes on after this vCPU has served it.
    ///
    /// Real KVM never blocks the requester (`sev_snp_ap_creation` makes the request and kicks
    /// the target, which applies it at its next entry). This host keeps the requester out of
    /// its guest until the request is applied (see the module docs), but never by blocking its
    /// own requests: if two vCPUs' requests target each other, each acknowledges only at its
    /// own entry, so each must serve its own wake before it can wait for the other's
    /// acknowledgement.
    fn wait_for_target(&mut self) -> Result<bool, VcpuError> {
        let Some(a) = &self.awaiting else {
            return Ok(true);
        };
        let own = self.kick.state().clone();
        let (kicks, wakes) = (self.consumed.seen(), self.wakes_seen);
        let abort = || own.kicks() != kicks || own.wakes() != wakes;
        match a.state.wait_for_ack(a.seq, self.shared.kick_timeout, &abort) {
            kick::Waited::Acked => {
                self.awaiting = None;
                Ok(true)
            }
            kick::Waited::Aborted => Ok(false),
            kick::Waited::TimedOut => {
                let target = a.target;
                self.awaiting = None;
                Err(self.host(
                    "GHCB doorbell",
                    vcpu::VcpuError::KickTimeout {
                        target,
                        ms: self.shared.kick_timeout.as_millis() as u64,
                    },
                ))
            }
        }
    }
}

impl Vcpu for KvmImageVcpu {
    type Kick = KvmKick;

    fn id(&self) -> u32 {
        self.id
    }

    fn set_state(&mut self, vmsa: &SevEsSaveArea) -> Result<(), VcpuError> {
        let core = read(&self.shared.core);
        let Some(core) = core.as_ref() else {
            return Err(self.host("KVM_SET_REGS", HostError::NoVm));
        };
        core.set_registers(VcpuId(self.id), vmsa)
            .map_err(|e| match Refusal::from_core("KVM_SET_REGS", &e) {
                Some(refusal) => VcpuError::Refused {
                    vcpu: self.id,
                    refusal,
                },
                None => self.host("KVM_SET_REGS", e),
            })
    }

    fn run(&mut self) -> Result<VcpuExit, VcpuError> {
        let st = self.kick.state().clone();
        let _attached = st.signal().attach();
        // Still parked: making the KVM vCPU changes nothing vmsa-core knows.
        self.create_kvm_vcpu()?;
        st.unpark();
        loop {
            if self.consumed.take(&st) {
                return Ok(VcpuExit::Interrupted);
            }
            if !self.entered || st.wakes() != self.wakes_seen {
                // Not entered until `enter` says so: if it fails (a VMSA reload refused halfway,
                // the vCPU then halted), the next run must go through it again, not into
                // KVM_RUN with half-loaded registers.
                self.entered = false;
                self.entered = self.enter()?;
                if !self.entered {
                    st.wait(self.consumed.seen(), self.wakes_seen);
                    continue;
                }
            }
            // A request of this vCPU's whose wait its own kick or wake cut short: applied
            // before this vCPU's guest goes on (else serve the kick or wake first).
            if let Some(target) = self.awaiting.as_ref().map(|a| a.target) {
                if !self.wait_for_target()? {
                    continue;
                }
                // Its step was recorded already: what the target's entry noted is not for a
                // later request's step.
                let _ = self.shared.take_applied(target);
            }
            let Some(guest) = st.enter_guest(self.consumed.seen(), self.wakes_seen) else {
                continue;
            };
            let Some(fd) = &mut self.fd else {
                unreachable!("run creates the KVM vCPU first");
            };
            let step = vcpu::run_once(fd, self.sev_status, &mut self.ghcb_msr, &mut self.exits);
            drop(guest);
            if !matches!(step, Step::Yield) {
                self.shared.progress.exited();
            }
            match step {
                Step::Again | Step::Interrupted => {}
                Step::Yield => {
                    let (kicks, wakes) = (self.consumed.seen(), self.wakes_seen);
                    let called = || st.kicks() != kicks || st.wakes() != wakes;
                    self.shared
                        .progress
                        .wait(&mut self.progress_seen, YIELD_TIMEOUT, &called);
                }
                Step::Doorbell(value) => self.doorbell(value)?,
                Step::Out {
                    port: ports::DONE, ..
                } if self.id != 0 => return Ok(self.halt()),
                Step::Out { port, value, size } => {
                    return Ok(VcpuExit::IoOut {
                        port,
                        data: value,
                        size,
                    });
                }
                Step::Shutdown => return Ok(VcpuExit::Shutdown),
                Step::Fatal(e) => return Err(self.host("KVM_RUN", e)),
            }
        }
    }

    fn complete_conversion(&mut self, _result: Result<(), Errno>) -> Result<(), VcpuError> {
        Err(VcpuError::Refused {
            vcpu: self.id,
            refusal: Refusal::new(
                "KVM_RUN",
                Errno::EINVAL,
                "no KVM_HC_MAP_GPA_RANGE exit is pending: VMSA-image guests never convert memory",
            ),
        })
    }

    fn kicker(&self) -> KvmKick {
        self.kick.clone()
    }
}

// The kick handle is vmsa-host's.
const _: fn() = || {
    fn is_kick<K: Kick>() {}
    is_kick::<KvmKick>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Watchdog, kvm_or_skip};

    /// This machine's VMSA-image host, or `None` (said why) where KVM cannot run one.
    fn image_host(test: &str) -> Option<KvmImageHost> {
        if !kvm_or_skip(test) {
            return None;
        }
        KvmImageHost::new(&crate::probe::probe(), "asked for by the test")
            .inspect_err(|e| eprintln!("skipped {test}: {e}"))
            .ok()
    }

    /// A host whose VMs cannot read KVM's CPUID table (it fails with `E2BIG`).
    fn host_without_cpuid(test: &str) -> Option<KvmImageHost> {
        let mut host = image_host(test)?;
        host.cpuid = cpuid::SupportedLater::failed(IoctlError::new(
            "KVM_GET_SUPPORTED_CPUID",
            Errno::new(libc::E2BIG),
        ));
        Some(host)
    }

    /// An SNP VM with 4 MiB of RAM on `host`, and the watchdog that ends `test` if a vCPU of it
    /// never comes back.
    fn small_vm(host: &KvmImageHost, test: &'static str) -> (KvmImageVm, Watchdog) {
        let watchdog = Watchdog::arm(test, Duration::from_secs(60));
        let mut vm = host.create_vm(VmSpec::snp(0)).unwrap();
        vm.add_memory(MemoryRegion::ram(4 << 20)).unwrap();
        (vm, watchdog)
    }

    #[test]
    fn a_vcpu_whose_vmsa_reload_failed_does_not_run_half_loaded() {
        use vmsa_core::{Gpa, SnpPageType};

        use crate::guest::{self, layout, program};

        let test = "a_vcpu_whose_vmsa_reload_failed_does_not_run_half_loaded";
        let Some(host) = image_host(test) else {
            return;
        };
        let (mut vm, _watchdog) = small_vm(&host, test);
        let mut v = vm.create_vcpu(0).unwrap();
        v.set_state(&layout::long_mode_image(layout::CODE_GPA)).unwrap();
        vm.launch_start(vmsa_core::SNP_POLICY_RSVD_MBO).unwrap();
        // The program's page tables and GDT, with this code: out 0x80, al; out 0x81, al; jmp $.
        let mut img = guest::image(&program::PROGRAM, 1, 0);
        let code = layout::CODE_GPA as usize;
        img[code..code + 6].copy_from_slice(&[0xe6, 0x80, 0xe6, 0x81, 0xeb, 0xfe]);
        vm.launch_update(LaunchUpdate {
            gpa: Gpa(0),
            len: img.len() as u64,
            page_type: SnpPageType::Normal,
            data: Some(&img),
        })
        .unwrap();
        vm.launch_finish().unwrap();
        assert!(
            matches!(v.run().unwrap(), VcpuExit::IoOut { port: 0x80, .. }),
            "the first OUT"
        );

        // Its VMSA becomes one KVM refuses (CR0.PG without CR0.PE), and a wake makes the vCPU
        // reload it, as an AP-creation request for itself does.
        {
            let core = read(&v.shared.core);
            let core = core.as_ref().unwrap();
            let Ok(Entry::Run(hpa)) = core.prepare_entry_noting_switch(VcpuId(0)).entry else {
                panic!("vCPU 0 is not runnable");
            };
            let mut bad = core.platform().vmsa_at(hpa).unwrap();
            bad.cr0 = 0x8000_0000;
            core.platform().frames().write(hpa.pfn(), bad.as_page()).unwrap();
        }
        v.need_load = true;
        v.kick.state().wake();
        let e = v.run().unwrap_err();
        assert!(
            matches!(
                &e,
                VcpuError::Host {
                    call: "loading the VMSA",
                    ..
                }
            ),
            "{e}"
        );

        // The failed entry halted the vCPU: the next run waits (until the kick below) instead of
        // running the guest on to its second OUT with the registers of before.
        let kick = v.kicker();
        let kicker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            kick.kick();
        });
        let exit = v.run().unwrap();
        kicker.join().unwrap();
        assert_eq!(exit, VcpuExit::Interrupted);
        assert_eq!(v.exits().io, 1, "no KVM_RUN after the failed reload");
    }

    /// Two running APs whose AP_CREATE requests target each other, both answered before either
    /// target applied them: each requester serves the other's request at its own entry instead
    /// of waiting for an acknowledgement the other, waiting too, cannot give (before, both
    /// doorbells failed with `KickTimeout` after the kick timeout). The doorbells are served
    /// directly, so both requests are always in flight at once.
    #[test]
    fn aps_creating_each_other_at_once_do_not_wait_for_each_other() {
        use vmsa_core::{Gpa, SnpPageType};

        use crate::guest::{self, layout, program};

        let test = "aps_creating_each_other_at_once_do_not_wait_for_each_other";
        let Some(host) = image_host(test) else {
            return;
        };
        let (mut vm, _watchdog) = small_vm(&host, test);
        // vCPU `id`'s GHCB page (2: the BSP's first request).
        let ghcb = |id: u32| layout::VMSA_BASE + 0x1_0000 + u64::from(id) * 0x1000;
        // First code: out 0x81, al; jmp $. The VMSAs the mutual requests name: out 0x80, al; jmp $.
        let first = layout::CODE_GPA;
        let created = layout::CODE_GPA + 0x10;
        let mut img = guest::image(&program::PROGRAM, 2, 0);
        img.resize(ghcb(3) as usize, 0);
        let mut put =
            |gpa: u64, data: &[u8]| img[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
        put(first, &[0xe6, 0x81, 0xeb, 0xfe]);
        put(created, &[0xe6, 0x80, 0xeb, 0xfe]);
        let features = vmsa_core::layout::SEV_FEAT_SNP_ACTIVE;
        let mut request = |at: u32, target: u32, vmsa_gpa: u64, rip: u64| {
            let mut vmsa = layout::long_mode_image(rip);
            vmsa.sev_features = features;
            put(vmsa_gpa, vmsa.as_page());
            let mut page = [0u8; 4096];
            vmsa_core::ghcb::GhcbRequest::new_ap_creation(
                vmsa_core::ghcb::AP_CREATE,
                target,
                vmsa_gpa,
                Some(features),
            )
            .encode(&mut page);
            put(ghcb(at), &page);
        };
        // The BSP first creates AP 1 (at the first code); then each asks to create the other.
        request(2, 1, layout::ap_vmsa_gpa(2), first);
        request(0, 1, layout::ap_vmsa_gpa(1), created);
        // (Not at ap_vmsa_gpa(0): a 2 MiB-aligned VMSA is refused, AMD erratum 1467.)
        request(1, 0, layout::ap_vmsa_gpa(3), created);
        let mut vcpus = [vm.create_vcpu(0).unwrap(), vm.create_vcpu(1).unwrap()];
        vcpus[0].set_state(&layout::long_mode_image(first)).unwrap();
        vm.launch_start(vmsa_core::SNP_POLICY_RSVD_MBO).unwrap();
        vm.launch_update(LaunchUpdate {
            gpa: Gpa(0),
            len: img.len() as u64,
            page_type: SnpPageType::Normal,
            data: Some(&img),
        })
        .unwrap();
        vm.launch_finish().unwrap();
        assert!(matches!(
            vcpus[0].run().unwrap(),
            VcpuExit::IoOut { port: 0x81, .. }
        ));
        // AP 1 is parked (its thread has not run it): the BSP applies this one itself.
        vcpus[0].doorbell(ghcb(2)).unwrap();
        assert!(matches!(
            vcpus[1].run().unwrap(),
            VcpuExit::IoOut { port: 0x81, .. }
        ));
        // Now both run (neither is parked, so neither request below is applied by its
        // requester).
        let ends: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = vcpus
                .iter_mut()
                .map(|v| {
                    s.spawn(move || {
                        let answered = v.doorbell(ghcb(v.id));
                        (answered, v.run())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (id, (answered, ran)) in ends.into_iter().enumerate() {
            assert!(answered.is_ok(), "vCPU {id}'s doorbell: {answered:?}");
            // Each runs the VMSA the other's request gave it.
            assert!(
                matches!(ran, Ok(VcpuExit::IoOut { port: 0x80, .. })),
                "vCPU {id}: {ran:?}"
            );
        }
        let steps = vcpus[0].shared.steps.lock().unwrap().clone();
        assert_eq!(steps.len(), 3, "{steps:?}");
        assert!(
            steps.iter().all(|s| s.action == "ap_create" && s.error.is_none()),
            "{steps:?}"
        );
    }

    #[test]
    fn a_failed_cpuid_step_is_reported_again_not_hidden_by_eexist() {
        let test = "a_failed_cpuid_step_is_reported_again_not_hidden_by_eexist";
        let Some(host) = host_without_cpuid(test) else {
            return;
        };
        let (mut vm, _watchdog) = small_vm(&host, test);
        let mut v = vm.create_vcpu(0).unwrap();
        // KVM_CREATE_VCPU succeeds, the CPUID step fails; the retry must not create the vCPU
        // again (kvm_vm_ioctl_create_vcpu: EEXIST) but fail the same way.
        for attempt in 0..2 {
            let e = v.run().unwrap_err();
            let VcpuError::Host { vcpu: 0, call, .. } = &e else {
                panic!("attempt {attempt}: not a host error: {e}");
            };
            assert_eq!(*call, "KVM_GET_SUPPORTED_CPUID", "attempt {attempt}: {e}");
            assert!(e.to_string().contains("E2BIG"), "attempt {attempt}: {e}");
        }
        assert!(v.fd.is_some() && !v.cpuid_set);
    }
}
