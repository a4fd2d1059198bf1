//! SEV-SNP mode behind vmsa-host's interface: a thin layer of ioctls over a real SNP KVM, and
//! nothing more. The SNP kernel owns the VMSAs, AP creation and INIT; this layer only forwards.
//!
//! Who owns what: [`KvmSnpHost`] owns the probe's verdict; [`KvmSnpVm`] owns the
//! `KVM_X86_SNP_VM` fd, the `/dev/sev` fd every SEV command carries, and each memslot's
//! guest_memfd plus its anonymous shared mapping (vm-memory's [`MmapRegion`]);
//! [`KvmSnpVcpu`] owns its vCPU fd and [`KvmKick`].
//!
//! **Untested on SNP hardware**: the hosts this project develops on have no SEV, and there the
//! probe stops this mode before any SEV ioctl, with its reasons (`KVM_CAP_VM_TYPES` lacks
//! `KVM_X86_SNP_VM`, `/dev/sev` is missing, the `KVM_X86_SEV_VMSA_FEATURES` attribute answers
//! `ENXIO`). The flow follows the uapi and KVM's SEV selftests (`vm_sev_launch` for SNP). Every
//! ioctl argument is built by a small pure function whose struct the unit tests check against
//! kvm-bindings, as [`crate::sev`]'s tests do.

use std::sync::Arc;

use kvm_bindings::{
    KVM_MEM_GUEST_MEMFD, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_SYSTEM_EVENT_SEV_TERM, kvm_enable_cap,
    kvm_memory_attributes, kvm_userspace_memory_region2,
};
use kvm_ioctls::{Kvm, VcpuExit as KvmExit, VcpuFd, VmFd};
use vm_memory::MmapRegion;
use vmsa_core::{Gpa, SevEsSaveArea, VmKind};
use vmsa_host::{
    Capabilities, Conversion, Errno, HostReport, Hypervisor, HypervisorError, LaunchUpdate, MemoryRegion,
    Observed, Refusal, TeardownCounts, Vcpu, VcpuError, VcpuExit, Vm, VmError, VmSpec,
};

use super::HostError;
use crate::error::IoctlError;
use crate::gmem::GuestMemfd;
use crate::kick::{Consumed, KvmKick};
use kvm_bindings::{KVM_CAP_EXIT_HYPERCALL, KVM_MEMORY_EXIT_FLAG_PRIVATE, KVM_X86_SNP_VM as VM_TYPE_SNP};

use crate::probe::{Mode, ProbeReport, Probed};
use crate::sev::{MapGpaRange, SevFirmware, SevVm, SnpLaunchPage};
use crate::uapi::KVM_HC_MAP_GPA_RANGE;
use crate::vmsa_regs::KvmState;
use crate::{cpuid, kick};

/// Why the host hides the VMSA ownership history.
pub const OWNERSHIP_HIDDEN: &str = "the SNP kernel owns the VMSAs";

/// The host of SEV-SNP mode.
#[derive(Debug)]
pub struct KvmSnpHost {
    caps: Capabilities,
    supplied_vmsa: crate::probe::SuppliedVmsaProbe,
}

impl KvmSnpHost {
    /// The host, if the probe says SEV-SNP runs here.
    pub fn new(probe: &ProbeReport) -> Result<Self, HypervisorError> {
        if !probe.supports(Mode::Snp) {
            return Err(HypervisorError::Unsupported {
                kind: VmKind::Snp,
                reason: Box::new(HostError::Missing {
                    mode: Mode::Snp,
                    missing: probe.missing(Mode::Snp).to_vec(),
                }),
            });
        }
        let vmsa_features = match probe.sev_vmsa_features {
            Probed::Ok { value } => value,
            Probed::Err { .. } | Probed::Skipped => 0,
        };
        Ok(Self {
            caps: Capabilities {
                kinds: vec![VmKind::Snp],
                vmsa_features,
                max_vcpus: probe.caps.map_or(0, |c| u32::try_from(c.max_vcpus).unwrap_or(0)),
                ownership_visible: false,
                launch_digest_visible: false,
                private_memory: true,
                supplied_vmsa: probe.supplied_vmsa.supported,
                // It creates SNP VMs only, and KVM moves no SNP context
                // (sev_vm_move_enc_context_from refuses an SNP source).
                intra_host_migration: false,
            },
            supplied_vmsa: probe.supplied_vmsa.clone(),
        })
    }

    /// Why this mode was chosen.
    pub fn reason(&self) -> &str {
        "the host supports SEV-SNP"
    }
}

fn hv_host(call: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> HypervisorError {
    HypervisorError::Host {
        call,
        source: Box::new(e),
    }
}

impl Hypervisor for KvmSnpHost {
    type Vm = KvmSnpVm;

    fn name(&self) -> &str {
        "kvm SEV-SNP"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn create_vm(&self, spec: VmSpec) -> Result<KvmSnpVm, HypervisorError> {
        if spec.kind != VmKind::Snp {
            return Err(HypervisorError::Unsupported {
                kind: spec.kind,
                reason: "backend-kvm's SNP mode creates KVM_X86_SNP_VM guests only".into(),
            });
        }
        if spec.supplied_vmsa && !self.supplied_vmsa.supported {
            // Before any ioctl: the probe found no kernel support for the series' 4/4.
            return Err(HypervisorError::Unsupported {
                kind: spec.kind,
                reason: format!("supplied VMSAs: {}", self.supplied_vmsa.reason).into(),
            });
        }
        let vmsa_pages = match (self.supplied_vmsa.supported, spec.supplied_vmsa) {
            (false, _) => VmsaPages::KernelLacks(self.supplied_vmsa.reason),
            (true, false) => VmsaPages::ClassicVm,
            (true, true) => VmsaPages::Taken,
        };
        kick::install().map_err(|e| hv_host("sigaction(SIGRTMIN)", e))?;
        let kvm = Kvm::new().map_err(|e| hv_host("open /dev/kvm", IoctlError::new("open /dev/kvm", e)))?;
        let call = "KVM_CREATE_VM(KVM_X86_SNP_VM)";
        let vm = kvm
            .create_vm_with_type(u64::from(VM_TYPE_SNP))
            .map_err(|e| hv_host(call, IoctlError::new(call, e)))?;
        let fw = SevFirmware::open().map_err(|e| hv_host("open /dev/sev", e))?;
        SevVm::new(&vm, &fw)
            .init2(spec.vmsa_features, 0)
            .map_err(|e| hv_host("KVM_SEV_INIT2", e))?;
        let call = "KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)";
        vm.enable_cap(&exit_hypercall_cap())
            .map_err(|e| hv_host(call, IoctlError::new(call, e)))?;
        let cpuid = cpuid::supported(&kvm).map_err(|e| hv_host("KVM_GET_SUPPORTED_CPUID", e))?;
        Ok(KvmSnpVm {
            spec,
            vm: Arc::new(vm),
            fw,
            cpuid,
            vcpus: 0,
            memory: Vec::new(),
            vmsa_pages,
        })
    }
}

/// `KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)` with `KVM_HC_MAP_GPA_RANGE`: the guest's page-state
/// changes reach user space as hypercall exits.
pub fn exit_hypercall_cap() -> kvm_enable_cap {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_EXIT_HYPERCALL,
        ..Default::default()
    };
    cap.args[0] = 1 << KVM_HC_MAP_GPA_RANGE;
    cap
}

/// `KVM_SET_USER_MEMORY_REGION2` of `region`: the private side is the guest_memfd `gmem_fd`
/// from offset 0, the shared side the mapping at `userspace_addr`.
pub fn memory_region(
    region: &MemoryRegion,
    userspace_addr: u64,
    gmem_fd: u32,
) -> kvm_userspace_memory_region2 {
    kvm_userspace_memory_region2 {
        slot: region.slot,
        flags: if region.guest_memfd {
            KVM_MEM_GUEST_MEMFD
        } else {
            0
        },
        guest_phys_addr: region.gpa.0,
        memory_size: region.size,
        userspace_addr,
        guest_memfd_offset: 0,
        guest_memfd: if region.guest_memfd { gmem_fd } else { 0 },
        ..Default::default()
    }
}

/// `KVM_SET_MEMORY_ATTRIBUTES` for a conversion.
pub fn memory_attributes(range: Conversion) -> kvm_memory_attributes {
    kvm_memory_attributes {
        address: range.gpa.0,
        size: range.size,
        attributes: if range.private {
            u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE)
        } else {
            0
        },
        flags: 0,
    }
}

/// What `hypercall.ret` tells the guest: 0, or the negative errno.
pub fn hypercall_ret(result: Result<(), Errno>) -> u64 {
    match result {
        Ok(()) => 0,
        Err(e) => (-i64::from(e.code)) as u64,
    }
}

/// `KVM_SEV_SNP_LAUNCH_UPDATE`'s `(gfn_start, pages, type)` for an update, or KVM's refusal
/// (`snp_launch_update`: `len` zero or not page aligned, type VMSA (2) rejected).
pub fn launch_update_args(
    u: &LaunchUpdate<'_>,
    vmsa: VmsaPages,
) -> Result<(u64, u64, SnpLaunchPage), Refusal> {
    let call = "KVM_SEV_SNP_LAUNCH_UPDATE";
    if u.page_type == vmsa_core::SnpPageType::Vmsa {
        match vmsa {
            // The probe's reason, before any ioctl: mainline's snp_launch_update would answer
            // EINVAL ("type not in {NORMAL, ZERO, UNMEASURED, SECRETS, CPUID}").
            VmsaPages::KernelLacks(reason) => return Err(Refusal::new(call, Errno::EINVAL, reason)),
            VmsaPages::ClassicVm => {
                return Err(Refusal::new(
                    call,
                    Errno::EINVAL,
                    "type 2 (VMSA) is rejected: KVM launches the VMSAs itself at launch finish (snp_launch_update)",
                ));
            }
            VmsaPages::Taken if u.len != 4096 => {
                return Err(Refusal::new(
                    call,
                    Errno::EINVAL,
                    "a supplied VMSA is exactly one 4 KiB page (snp_launch_update)",
                ));
            }
            VmsaPages::Taken => {}
        }
    }
    if u.len == 0 || !u.len.is_multiple_of(4096) {
        return Err(Refusal::new(
            call,
            Errno::EINVAL,
            "len must be a non-zero multiple of 4096 (snp_launch_update)",
        ));
    }
    if !u.gpa.is_page_aligned() {
        return Err(Refusal::new(call, Errno::EINVAL, "the GPA must be 4 KiB aligned"));
    }
    let Some(t) = SnpLaunchPage::from_core(u.page_type) else {
        return Err(Refusal::new(
            call,
            Errno::EINVAL,
            "type 2 (VMSA) is rejected: KVM launches the VMSAs itself at launch finish (snp_launch_update)",
        ));
    };
    Ok((u.gpa.0 >> 12, u.len / 4096, t))
}

/// What this SNP layer does with a launch update of page type VMSA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmsaPages {
    /// The kernel takes supplied VMSAs and the VM was created for them: send type 2.
    Taken,
    /// The kernel takes them, but this VM is in the classic mode: KVM refuses type 2.
    ClassicVm,
    /// The kernel does not take them: refuse before any ioctl, with the probe's reason.
    KernelLacks(&'static str),
}

/// The exit for a `KVM_EXIT_MEMORY_FAULT`.
pub fn memory_fault(flags: u64, gpa: u64, size: u64) -> VcpuExit {
    VcpuExit::MemoryFault(Conversion {
        gpa: Gpa(gpa),
        size,
        private: fault_wants_private(flags),
    })
}

/// The exit for a `KVM_EXIT_HYPERCALL(KVM_HC_MAP_GPA_RANGE)`, or why its arguments are bad.
pub fn map_gpa_range(args: &[u64; 6]) -> Result<VcpuExit, &'static str> {
    let r = MapGpaRange::decode(args)?;
    Ok(VcpuExit::MapGpaRange(Conversion {
        gpa: Gpa(r.gpa),
        size: r.size,
        private: r.private,
    }))
}

/// The exit for a `KVM_EXIT_SYSTEM_EVENT`: `None` if it is not the guest's termination request
/// (`KVM_SYSTEM_EVENT_SEV_TERM`). A termination request is always the guest's `Terminate`
/// exit, with its reason when KVM reports one ([`VcpuExit::from_sev_term`]: only the MSR
/// protocol does; a request through the GHCB page has none).
pub fn system_event(kind: u32, data: &[u64]) -> Option<VcpuExit> {
    (kind == KVM_SYSTEM_EVENT_SEV_TERM).then(|| VcpuExit::from_sev_term(data))
}

/// The length of a region's shared mapping: its size, if it fits this host's address space.
fn shared_len(size: u64) -> Result<usize, HostError> {
    usize::try_from(size).map_err(|_| HostError::RegionTooLarge { size })
}

/// `region` (as registered) with `memory_size` 0: `KVM_SET_USER_MEMORY_REGION2` then deletes
/// the slot (`kvm_set_memory_region`: `!mem->memory_size` is `KVM_MR_DELETE`).
fn deleting(region: &kvm_userspace_memory_region2) -> kvm_userspace_memory_region2 {
    kvm_userspace_memory_region2 {
        memory_size: 0,
        ..*region
    }
}

/// A memslot of an SNP VM: the guest_memfd (private side) and the shared mapping. Deleted from
/// the VM on drop, before the guest_memfd closes and the mapping goes: the VM can outlive
/// [`KvmSnpVm`], since every vCPU fd (`kvm_vm_ioctl_create_vcpu`) and guest_memfd file
/// (`__kvm_gmem_create`) holds a reference to it (`kvm_get_kvm`).
struct Slot {
    vm: Arc<VmFd>,
    /// The region as registered.
    region: kvm_userspace_memory_region2,
    // Dropped after the memslot is deleted (in `Drop::drop`).
    _gmem: Option<GuestMemfd>,
    _shared: MmapRegion<()>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // kvm_set_memory_region refuses a deletion only if it is malformed or the slot is absent,
        // neither of which can be true of the request registered; a drop could not recover.
        // SAFETY: memory_size 0 deletes the slot; KVM is handed no memory, and after it returns
        // no vCPU can reach the mapping through this slot.
        let _ = unsafe { self.vm.set_user_memory_region2(deleting(&self.region)) };
    }
}

/// An SEV-SNP VM (see the module docs).
pub struct KvmSnpVm {
    spec: VmSpec,
    // Each slot deletes its memslot when dropped, before its memory goes (the VM itself may
    // live on in vCPU fds and guest_memfd files).
    vm: Arc<VmFd>,
    fw: SevFirmware,
    cpuid: kvm_bindings::CpuId,
    vcpus: usize,
    memory: Vec<Slot>,
    vmsa_pages: VmsaPages,
}

impl std::fmt::Debug for KvmSnpVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmSnpVm")
            .field("spec", &self.spec)
            .field("vcpus", &self.vcpus)
            .field("slots", &self.memory.len())
            .finish_non_exhaustive()
    }
}

impl KvmSnpVm {
    fn sev(&self) -> SevVm<'_> {
        SevVm::new(&self.vm, &self.fw)
    }
}

impl Vm for KvmSnpVm {
    type Vcpu = KvmSnpVcpu;

    fn spec(&self) -> VmSpec {
        self.spec
    }

    fn add_memory(&mut self, region: MemoryRegion) -> Result<(), VmError> {
        let call = "KVM_SET_USER_MEMORY_REGION2";
        let size = shared_len(region.size).map_err(|e| VmError::host("mmap", e))?;
        let gmem = region
            .guest_memfd
            .then(|| GuestMemfd::create(&self.vm, region.size, 0))
            .transpose()
            .map_err(|e| VmError::host("KVM_CREATE_GUEST_MEMFD", e))?;
        let shared = MmapRegion::<()>::build(
            None,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        )
        .map_err(|e| VmError::host("mmap", e))?;
        let gmem_fd = gmem.as_ref().map(|g| g.raw_fd() as u32).unwrap_or(0);
        let r = memory_region(&region, shared.as_ptr() as u64, gmem_fd);
        // SAFETY: `shared` is a mapping of exactly `memory_size` bytes, owned by the `Slot`
        // pushed below, whose Drop deletes this memslot before the mapping is unmapped (and
        // before the guest_memfd closes); KVM therefore never uses the address after it is
        // released. If the ioctl fails, no slot refers to the mapping.
        unsafe { self.vm.set_user_memory_region2(r) }
            .map_err(|e| VmError::host(call, IoctlError::new(call, e)))?;
        self.memory.push(Slot {
            vm: self.vm.clone(),
            region: r,
            _gmem: gmem,
            _shared: shared,
        });
        Ok(())
    }

    fn set_memory_attributes(&self, range: Conversion) -> Result<(), VmError> {
        let call = "KVM_SET_MEMORY_ATTRIBUTES";
        self.vm
            .set_memory_attributes(memory_attributes(range))
            .map_err(|e| VmError::host(call, IoctlError::new(call, e)))
    }

    fn launch_start(&mut self, policy: u64) -> Result<(), VmError> {
        self.sev()
            .snp_launch_start(policy, [0; 16])
            .map_err(|e| VmError::host("KVM_SEV_SNP_LAUNCH_START", e))
    }

    fn launch_update(&mut self, u: LaunchUpdate<'_>) -> Result<(), VmError> {
        let (gfn, pages, page_type) = launch_update_args(&u, self.vmsa_pages)?;
        let call = "KVM_SEV_SNP_LAUNCH_UPDATE";
        // SNP_LAUNCH_UPDATE needs its source page aligned: stage it in an anonymous mapping.
        let staged = match u.data {
            None => None,
            Some(d) => {
                let m = MmapRegion::<()>::new(d.len().max(4096)).map_err(|e| VmError::host("mmap", e))?;
                // SAFETY: `m` is a fresh private mapping of at least `d.len()` bytes that nothing
                // else references; `d` cannot overlap it.
                unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), m.as_ptr(), d.len()) };
                Some(m)
            }
        };
        let src = match (&staged, u.data) {
            (Some(m), Some(d)) => {
                // SAFETY: the mapping lives until the end of this function and holds `len`
                // bytes just written; only the kernel reads it while the slice exists.
                Some(unsafe { std::slice::from_raw_parts(m.as_ptr().cast_const(), d.len()) })
            }
            _ => None,
        };
        self.sev()
            .snp_launch_update(gfn, src, pages, page_type)
            .map_err(|e| VmError::host(call, e))
    }

    fn launch_update_vmsas(&mut self) -> Result<(), VmError> {
        // sev_mem_enc_ioctl: an SNP VM refuses every id below KVM_SEV_SNP_LAUNCH_START.
        Err(Refusal::new(
            "KVM_SEV_LAUNCH_UPDATE_VMSA",
            Errno::EPERM,
            "an SNP VM refuses SEV commands below KVM_SEV_SNP_LAUNCH_START; SNP_LAUNCH_FINISH launches the VMSAs (sev_mem_enc_ioctl)",
        )
        .into())
    }

    fn launch_finish(&mut self) -> Result<(), VmError> {
        self.sev()
            .snp_launch_finish([0; 32])
            .map_err(|e| VmError::host("KVM_SEV_SNP_LAUNCH_FINISH", e))
    }

    fn create_vcpu(&mut self, id: u32) -> Result<KvmSnpVcpu, VmError> {
        let call = "KVM_CREATE_VCPU";
        let fd = self
            .vm
            .create_vcpu(u64::from(id))
            .map_err(|e| VmError::host(call, IoctlError::new(call, e)))?;
        cpuid::set(&fd, &self.cpuid, id).map_err(|e| VmError::host("KVM_SET_CPUID2", e))?;
        let kick = KvmKick::new();
        self.vcpus += 1;
        Ok(KvmSnpVcpu {
            id,
            kick,
            consumed: Consumed::default(),
            conversion_pending: false,
            fd,
        })
    }

    fn cycles(&self) -> Observed<u64> {
        Observed::hidden("real vCPUs have no simulated clock")
    }

    fn teardown(self) -> HostReport {
        let vcpus = self.vcpus;
        drop(self);
        let kernel = "the SNP kernel frees, reclaims and leaks pages itself";
        HostReport {
            events: Observed::hidden(OWNERSHIP_HIDDEN),
            launch_digest: Observed::hidden(
                "KVM does not return the launch digest; it is in the attestation report the guest requests",
            ),
            rmp_faults: Observed::hidden("the RMP belongs to the host kernel and the firmware"),
            guest: Observed::hidden("the guest's memory and registers are encrypted"),
            teardown: TeardownCounts {
                vcpus,
                vmsas_leaked: Observed::hidden(OWNERSHIP_HIDDEN),
                guest_frames_released: Observed::hidden(kernel),
                guest_frames_leaked: Observed::hidden(kernel),
                frames_still_allocated: Observed::hidden(kernel),
                frames_leaked_on_purpose: Observed::hidden(kernel),
                error: None,
            },
        }
    }
}

/// An SEV-SNP vCPU (see the module docs).
pub struct KvmSnpVcpu {
    id: u32,
    kick: KvmKick,
    consumed: Consumed,
    /// A `KVM_HC_MAP_GPA_RANGE` exit waits for [`Vcpu::complete_conversion`].
    conversion_pending: bool,
    fd: VcpuFd,
}

impl std::fmt::Debug for KvmSnpVcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmSnpVcpu")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl KvmSnpVcpu {
    fn host(&self, call: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> VcpuError {
        VcpuError::host(self.id, call, e)
    }

    fn set_hypercall_ret(&mut self, ret: u64) {
        // The last exit was KVM_EXIT_HYPERCALL, so `hypercall` is the live member of the exit
        // union; KVM reads `ret` at the next KVM_RUN (writing a union field needs no unsafe).
        self.fd.get_kvm_run().__bindgen_anon_1.hypercall.ret = ret;
    }
}

impl Vcpu for KvmSnpVcpu {
    type Kick = KvmKick;

    fn id(&self) -> u32 {
        self.id
    }

    fn set_state(&mut self, vmsa: &SevEsSaveArea) -> Result<(), VcpuError> {
        let current = self
            .fd
            .get_sregs()
            .map_err(|e| self.host("KVM_GET_SREGS", IoctlError::new("KVM_GET_SREGS", e)))?;
        let st = KvmState::from_image(vmsa, &current).map_err(|e| self.host("KVM_SET_SREGS", e))?;
        self.fd
            .set_sregs(&st.sregs)
            .map_err(|e| self.host("KVM_SET_SREGS", IoctlError::new("KVM_SET_SREGS", e)))?;
        self.fd
            .set_regs(&st.regs)
            .map_err(|e| self.host("KVM_SET_REGS", IoctlError::new("KVM_SET_REGS", e)))
    }

    fn run(&mut self) -> Result<VcpuExit, VcpuError> {
        let st = self.kick.state().clone();
        let _attached = st.signal().attach();
        self.conversion_pending = false;
        loop {
            if self.consumed.take(&st) {
                return Ok(VcpuExit::Interrupted);
            }
            let mut bad_hypercall = false;
            let Some(guest) = st.enter_guest(self.consumed.seen(), st.wakes()) else {
                continue;
            };
            let ran = self.fd.run();
            drop(guest);
            let exit = match ran {
                Ok(KvmExit::SystemEvent(kind, data)) => match system_event(kind, data) {
                    Some(e) => e,
                    None => {
                        let exit = format!("system event {kind} {data:x?}");
                        return Err(self.host("KVM_RUN", vmsa_exit(exit)));
                    }
                },
                Ok(KvmExit::MemoryFault { flags, gpa, size }) => memory_fault(flags, gpa, size),
                Ok(KvmExit::Hypercall(h)) if h.nr == u64::from(KVM_HC_MAP_GPA_RANGE) => {
                    match map_gpa_range(&h.args) {
                        Ok(e) => {
                            self.conversion_pending = true;
                            e
                        }
                        Err(_) => {
                            // A malformed request fails back to the guest.
                            *h.ret = hypercall_ret(Err(Errno::EINVAL));
                            bad_hypercall = true;
                            VcpuExit::Interrupted
                        }
                    }
                }
                Ok(KvmExit::IoOut(port, data)) => {
                    let mut v = [0u8; 4];
                    let n = data.len().min(4);
                    v[..n].copy_from_slice(&data[..n]);
                    VcpuExit::IoOut {
                        port,
                        data: u32::from_le_bytes(v),
                        size: n as u8,
                    }
                }
                Ok(KvmExit::Hlt) => VcpuExit::Halt,
                Ok(KvmExit::Shutdown) => VcpuExit::Shutdown,
                Ok(other) => {
                    let exit = format!("{other:?}");
                    return Err(self.host("KVM_RUN", vmsa_exit(exit)));
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return Err(self.host("KVM_RUN", IoctlError::new("KVM_RUN", e))),
            };
            if !bad_hypercall {
                return Ok(exit);
            }
        }
    }

    fn complete_conversion(&mut self, result: Result<(), Errno>) -> Result<(), VcpuError> {
        if !self.conversion_pending {
            return Err(VcpuError::Refused {
                vcpu: self.id,
                refusal: Refusal::new(
                    "KVM_RUN",
                    Errno::EINVAL,
                    "no KVM_HC_MAP_GPA_RANGE exit is waiting for its answer",
                ),
            });
        }
        self.set_hypercall_ret(hypercall_ret(result));
        self.conversion_pending = false;
        Ok(())
    }

    fn kicker(&self) -> KvmKick {
        self.kick.clone()
    }
}

/// An exit the interface has no place for.
fn vmsa_exit(exit: String) -> crate::vcpu::VcpuError {
    crate::vcpu::VcpuError::UnexpectedExit { exit }
}

/// `SNP_POLICY_SMT`: SMT may be enabled on the host (SNP ABI, guest policy bit 16).
pub const SNP_POLICY_SMT: u64 = 1 << 16;

/// The policy the KVM selftests use (`snp_default_policy`): bit 17, plus SMT when the host
/// has SMT active (the firmware refuses a launch whose policy forbids SMT on such a host).
pub fn default_policy() -> u64 {
    let smt = std::fs::read_to_string("/sys/devices/system/cpu/smt/active")
        .map(|s| s.trim() == "1")
        .unwrap_or(false);
    policy_for(smt)
}

fn policy_for(smt_active: bool) -> u64 {
    vmsa_core::SNP_POLICY_RSVD_MBO | if smt_active { SNP_POLICY_SMT } else { 0 }
}

/// Whether a `KVM_EXIT_MEMORY_FAULT` asks for private memory.
pub fn fault_wants_private(flags: u64) -> bool {
    flags & u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE) != 0
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use vmsa_core::SnpPageType;
    use vmsa_host::TermReason;

    use super::*;

    #[test]
    fn memory_regions_fill_the_uapi_struct_and_delete_with_size_zero() {
        assert_eq!(size_of::<kvm_userspace_memory_region2>(), 160);
        assert_eq!(offset_of!(kvm_userspace_memory_region2, guest_memfd_offset), 32);
        assert_eq!(offset_of!(kvm_userspace_memory_region2, guest_memfd), 40);
        let region = MemoryRegion {
            slot: 3,
            gpa: Gpa(0x10_0000),
            size: 0x20_0000,
            guest_memfd: true,
        };
        let r = memory_region(&region, 0x7f00_0000_0000, 9);
        assert_eq!(
            (
                r.slot,
                r.flags,
                r.guest_phys_addr,
                r.memory_size,
                r.userspace_addr
            ),
            (3, 1 << 2, 0x10_0000, 0x20_0000, 0x7f00_0000_0000)
        );
        assert_eq!((r.guest_memfd, r.guest_memfd_offset, r.pad1), (9, 0, 0));
        assert!(r.pad2.iter().all(|p| *p == 0));
        let plain = memory_region(
            &MemoryRegion {
                guest_memfd: false,
                ..region
            },
            0x1000,
            9,
        );
        assert_eq!((plain.flags, plain.guest_memfd), (0, 0));
        // The same region with memory_size 0 deletes the slot (kvm_set_memory_region).
        let d = deleting(&r);
        assert_eq!(
            (d.slot, d.memory_size, d.flags, d.guest_phys_addr, d.guest_memfd),
            (3, 0, 1 << 2, 0x10_0000, 9)
        );
    }

    #[test]
    fn an_unmappable_region_size_is_named() {
        assert_eq!(shared_len(0x20_0000), Ok(0x20_0000));
        let e = HostError::RegionTooLarge { size: 1 << 63 };
        assert_eq!(
            e.to_string(),
            "memory region size 0x8000000000000000 does not fit this host's address space"
        );
    }

    #[test]
    fn memory_attributes_fill_the_uapi_struct() {
        assert_eq!(size_of::<kvm_memory_attributes>(), 32);
        assert_eq!(offset_of!(kvm_memory_attributes, attributes), 16);
        let c = Conversion {
            gpa: Gpa(0x20_0000),
            size: 0x1000,
            private: true,
        };
        let a = memory_attributes(c);
        assert_eq!(
            (a.address, a.size, a.attributes, a.flags),
            (0x20_0000, 0x1000, 1 << 3, 0)
        );
        let a = memory_attributes(Conversion { private: false, ..c });
        assert_eq!(a.attributes, 0);
    }

    #[test]
    fn the_hypercall_cap_asks_for_map_gpa_range_only() {
        let c = exit_hypercall_cap();
        assert_eq!((c.cap, c.args[0], c.flags), (201, 1 << 12, 0));
        assert_eq!(c.args[1..], [0; 3]);
    }

    #[test]
    fn hypercall_answers_are_zero_or_negative_errnos() {
        assert_eq!(hypercall_ret(Ok(())), 0);
        assert_eq!(hypercall_ret(Err(Errno::EINVAL)) as i64, -22);
    }

    #[test]
    fn exits_decode_into_the_interfaces() {
        assert_eq!(
            memory_fault(1 << 3, 0x3000, 0x1000),
            VcpuExit::MemoryFault(Conversion {
                gpa: Gpa(0x3000),
                size: 0x1000,
                private: true
            })
        );
        assert_eq!(
            map_gpa_range(&[0x4000, 2, 0, 0, 0, 0]),
            Ok(VcpuExit::MapGpaRange(Conversion {
                gpa: Gpa(0x4000),
                size: 0x2000,
                private: false
            }))
        );
        assert!(map_gpa_range(&[0x4001, 1, 0, 0, 0, 0]).is_err());
        assert_eq!(
            system_event(KVM_SYSTEM_EVENT_SEV_TERM, &[0x100 | (1 << 12) | (2 << 16)]),
            Some(VcpuExit::Terminate {
                reason: Some(TermReason { set: 1, code: 2 })
            })
        );
        assert_eq!(system_event(1, &[]), None);
    }

    /// A termination request through the GHCB page (`sev_handle_vmgexit`,
    /// `SVM_VMGEXIT_TERM_REQUEST`: `data[0]` is the GHCB's GPA) is the guest's `Terminate` exit
    /// with no reason, not a host error.
    #[test]
    fn a_ghcb_page_termination_request_is_a_terminate_exit() {
        assert_eq!(
            system_event(KVM_SYSTEM_EVENT_SEV_TERM, &[0x12_3000]),
            Some(VcpuExit::Terminate { reason: None })
        );
        assert_eq!(
            system_event(KVM_SYSTEM_EVENT_SEV_TERM, &[]),
            Some(VcpuExit::Terminate { reason: None })
        );
    }

    #[test]
    fn launch_updates_follow_snp_launch_update() {
        let page = [0u8; 8192];
        let u = LaunchUpdate {
            gpa: Gpa(0x8000),
            len: 8192,
            page_type: SnpPageType::Normal,
            data: Some(&page),
        };
        let lacks = VmsaPages::KernelLacks(crate::probe::SuppliedVmsaProbe::decide(true).reason);
        assert_eq!(launch_update_args(&u, lacks), Ok((8, 2, SnpLaunchPage::Normal)));
        let vmsa = LaunchUpdate {
            page_type: SnpPageType::Vmsa,
            len: 4096,
            ..u
        };
        // A mainline kernel: refused before any ioctl, with the probe's reason.
        let refused = launch_update_args(&vmsa, lacks).unwrap_err();
        assert_eq!(
            (refused.errno, refused.call),
            (Errno::EINVAL, "KVM_SEV_SNP_LAUNCH_UPDATE")
        );
        assert!(
            refused.rule.contains("KVM_SEV_SNP_PAGE_TYPE_VMSA"),
            "{}",
            refused.rule
        );
        assert!(launch_update_args(&vmsa, VmsaPages::ClassicVm).is_err());
        // A kernel with the series' 4/4 and a VM created for it: sent as type 2, one page.
        assert_eq!(
            launch_update_args(&vmsa, VmsaPages::Taken),
            Ok((8, 1, SnpLaunchPage::Vmsa))
        );
        assert_eq!(SnpLaunchPage::Vmsa.raw(), 2);
        assert!(launch_update_args(&LaunchUpdate { len: 8192, ..vmsa }, VmsaPages::Taken).is_err());
        assert!(launch_update_args(&LaunchUpdate { len: 100, ..u }, lacks).is_err());
        assert!(launch_update_args(&LaunchUpdate { len: 0, ..u }, lacks).is_err());
        assert!(
            launch_update_args(
                &LaunchUpdate {
                    gpa: Gpa(0x8008),
                    ..u
                },
                lacks
            )
            .is_err()
        );
    }

    #[test]
    fn policy_follows_the_selftests() {
        assert_eq!(policy_for(false), 1 << 17);
        assert_eq!(policy_for(true), (1 << 17) | (1 << 16));
        assert_ne!(default_policy() & vmsa_core::SNP_POLICY_RSVD_MBO, 0);
    }

    #[test]
    fn memory_fault_flags() {
        assert!(fault_wants_private(8));
        assert!(!fault_wants_private(0));
    }
}
