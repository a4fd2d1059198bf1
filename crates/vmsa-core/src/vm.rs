//! A confidential VM's vCPUs and the whole-VM flows: creation, SEV-ES and SNP launch, AP
//! creation, INIT, entry checks, guest_memfd invalidation, debug decrypt, intra-host migration
//! and teardown.
//!
//! Locking follows KVM: VM-wide commands take `&mut self` (KVM holds `kvm->lock` and every vCPU
//! mutex); per-vCPU events take `&self` and lock only the vCPU they change (KVM's
//! `snp_vmsa_mutex`), so an AP-creation request from one vCPU thread can target another while
//! both run.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::ToString;
use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::sync::{Guard, Lock, get_mut, into_inner, lock};

use crate::addr::{Gfn, Gpa, Hpa, PAGE_SIZE, PageLevel, Pfn};
use crate::error::{ConfigError, Error, LaunchState, MigrationError, PlatformOp};
use crate::event::{Event, EventSink, LeakReason, NullSink};
use crate::ghcb::{ApCreationError, ApCreationRequest, ApCreationRules, ApRequest};
use crate::layout::{SEV_FEAT_DEBUG_SWAP, SEV_FEAT_SECURE_TSC, SEV_FEAT_SNP_ACTIVE, SevEsSaveArea};
use crate::platform::{LaunchFinish, LaunchStart, PageBuf, Platform, SnpPageType};
use crate::state::{MpState, Op, StateKind, VcpuId, VmKind, VmsaState};
use crate::vcpu::{Cx, Leak, Vcpu, snp_page_reclaim};

/// SEV policy bit 0 (`NODBG`): debugging is forbidden.
pub const SEV_POLICY_NODBG: u64 = 1 << 0;
/// SNP policy bit 19 (`DEBUG`): debugging is allowed.
pub const SNP_POLICY_DEBUG: u64 = 1 << 19;
/// SNP policy bit 17: reserved, must be one.
pub const SNP_POLICY_RSVD_MBO: u64 = 1 << 17;
/// The SNP policy bits KVM accepts (`KVM_SNP_POLICY_MASK_VALID`): ABI minor and major (bits
/// 0-15), SMT (16), reserved-MBO (17), DEBUG (19), SINGLE_SOCKET (20), CXL_ALLOW (21),
/// MEM_AES_256_XTS (22), RAPL_DIS (23), CIPHERTEXT_HIDING_DRAM (24), PAGE_SWAP_DISABLE (25).
/// Bit 18 (MIGRATE_MA) and bits 26 and up are refused; `sev_hardware_setup` further limits
/// them to what the firmware reports ([`Platform::snp_policy_bits`]).
pub const KVM_SNP_POLICY_MASK_VALID: u64 = 0xffff | (1 << 16) | (1 << 17) | (0x7f << 19);

/// The SEV features KVM can support (`sev_supported_vmsa_features`, filled by
/// `sev_hardware_setup`): DebugSwap, and Secure TSC for SNP guests. `SNP_ACTIVE` is accepted
/// for SNP guests (KVM adds it itself).
pub const SUPPORTED_VMSA_FEATURES: u64 = SEV_FEAT_DEBUG_SWAP | SEV_FEAT_SECURE_TSC;

/// The SEV features only an SNP guest may have (`SVM_SEV_FEAT_SNP_ONLY_MASK`).
pub const SNP_ONLY_VMSA_FEATURES: u64 = SEV_FEAT_SNP_ACTIVE | SEV_FEAT_SECURE_TSC;

/// How a VM is configured, fixed at creation (KVM's `KVM_SEV_INIT2` parameters).
///
/// # Launch modes
///
/// `supplied_vmsa` selects between the two SNP launch modes, and is fixed when the VM is created
/// because vCPU creation must already know whether to allocate a host VMSA:
///
/// * classic (`false`, what mainline KVM does): every vCPU gets a host VMSA at creation, and
///   launch finish syncs, makes private and measures one VMSA per vCPU in index order, so the
///   launch digest depends on the vCPU count.
/// * supplied (`true`, the "Streamline VMSA setting" series' patch 4/4 "kvm: svm: Support
///   KVM_SEV_SNP_PAGE_TYPE_VMSA at SNP_LAUNCH_UPDATE", gated by a flag at init): no vCPU gets a
///   host VMSA. The VMM puts one VMSA, the BSP's, into guest memory with a launch update of page
///   type [`SnpPageType::Vmsa`]; the BSP (the first vCPU created, which is the runnable one)
///   becomes `GuestOwned(gpa)`, the APs stay `None` (no VMCB address, not runnable) until the
///   guest's AP creation names them, and launch finish measures no per-vCPU VMSA, so the
///   digest does not depend on the vCPU count. SNP only.
///
/// [`VmConfig::new`] validates a configuration as `__sev_guest_init` does; a configuration
/// built otherwise is validated when the VM first uses it ([`Vm::create_vcpu`],
/// [`Vm::launch_start`]), which then fail with [`Error::Config`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// SEV-ES or SEV-SNP.
    pub kind: VmKind,
    /// SEV_FEATURES every VMSA of the VM carries (`vmsa_features`); for SNP guests vmsa-core
    /// adds `SNP_ACTIVE` itself, as KVM does.
    pub sev_features: u64,
    /// Whether launch VMSAs carry the x87/SSE/AVX state (VMs created with `KVM_SEV_INIT2`);
    /// `false` reproduces legacy `KVM_SEV_ES_INIT` measurements.
    pub sync_fpu: bool,
    /// The guest's MAXPHYADDR, which bounds AP-creation VMSA addresses.
    pub max_phys_bits: u8,
    /// The supplied-VMSA launch mode (see "Launch modes" above); `false` is KVM's classic mode.
    pub supplied_vmsa: bool,
}

impl VmConfig {
    /// A validated configuration (`__sev_guest_init`); see [`VmConfig::validate`].
    pub fn new(
        kind: VmKind,
        sev_features: u64,
        sync_fpu: bool,
        max_phys_bits: u8,
    ) -> Result<Self, ConfigError> {
        let config = Self {
            kind,
            sev_features,
            sync_fpu,
            max_phys_bits,
            supplied_vmsa: false,
        };
        config.validate()?;
        Ok(config)
    }

    /// The checks of `__sev_guest_init` (and `sev_guest_init` for legacy VMs), each -EINVAL in
    /// KVM: features outside the supported set; `SNP_ACTIVE` or `SECURE_TSC` on an SEV-ES VM
    /// (SNP-only); a legacy `KVM_SEV_ES_INIT` VM (no FPU sync) with any feature, since
    /// `sev_guest_init` passes `vmsa_features = 0`; an SNP VM without FPU sync, since SNP VMs
    /// exist only through `KVM_SEV_INIT2`, whose VMSAs carry the FPU state.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let rule = if self.sev_features & !(SUPPORTED_VMSA_FEATURES | SEV_FEAT_SNP_ACTIVE) != 0 {
            Some("a feature is outside the supported set (DebugSwap, Secure TSC)")
        } else if self.kind == VmKind::SevEs && self.sev_features & SNP_ONLY_VMSA_FEATURES != 0 {
            Some("SNP_ACTIVE and SECURE_TSC are SEV-SNP features")
        } else if !self.sync_fpu && self.kind == VmKind::Snp {
            Some("SNP VMs are created with KVM_SEV_INIT2, whose VMSAs carry the FPU state")
        } else if !self.sync_fpu && self.sev_features != 0 {
            Some("a legacy KVM_SEV_ES_INIT VM (no FPU sync) has no SEV features")
        } else if self.supplied_vmsa && self.kind != VmKind::Snp {
            Some("supplied VMSAs are an SEV-SNP launch mode (SNP_LAUNCH_UPDATE page type VMSA)")
        } else {
            None
        };
        match rule {
            Some(rule) => Err(ConfigError {
                kind: self.kind,
                sev_features: self.sev_features,
                sync_fpu: self.sync_fpu,
                rule,
            }),
            None => Ok(()),
        }
    }

    /// An SEV-SNP VM with the given extra SEV features and a 48-bit guest physical space.
    pub fn snp(sev_features: u64) -> Self {
        Self {
            kind: VmKind::Snp,
            sev_features,
            sync_fpu: true,
            max_phys_bits: 48,
            supplied_vmsa: false,
        }
    }

    /// This configuration in the supplied-VMSA launch mode (see "Launch modes").
    pub fn with_supplied_vmsa(self) -> Self {
        Self {
            supplied_vmsa: true,
            ..self
        }
    }

    /// An SEV-ES VM with the given SEV features and a 48-bit guest physical space.
    pub fn sev_es(sev_features: u64) -> Self {
        Self {
            kind: VmKind::SevEs,
            ..Self::snp(sev_features)
        }
    }

    /// The SEV_FEATURES value the VMSAs carry (`kvm_sev_info.vmsa_features`).
    pub fn vmsa_features(&self) -> u64 {
        match self.kind {
            VmKind::Snp => self.sev_features | SEV_FEAT_SNP_ACTIVE,
            VmKind::SevEs => self.sev_features,
        }
    }
}

/// What a vCPU looks like from outside, at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct VcpuInfo {
    /// The vCPU (and its APIC ID).
    pub id: VcpuId,
    /// Who owns its VMSA.
    pub state: VmsaState<Pfn>,
    /// Whether its register state is protected (launched).
    pub protected: bool,
    /// The address the VMCB points at; `None` is `INVALID_PAGE`.
    pub vmcb_vmsa_pa: Option<Hpa>,
    /// A VMSA requested by AP creation and not yet installed.
    pub pending_gpa: Option<Gpa>,
    /// Its run state.
    pub mp_state: MpState,
}

/// What an accepted AP-creation request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApCreated {
    /// The vCPU the request targets.
    pub target: VcpuId,
    /// The request.
    pub request: ApRequest,
    /// Whether the target must be kicked to apply it now (false for CREATE_ON_INIT, which
    /// waits for the target's INIT).
    pub kick: bool,
}

/// What a vCPU may do at guest entry ([`Vm::prepare_entry`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Run the guest with the VMSA at this address.
    Run(Hpa),
    /// Do not run: the vCPU is halted or was never started.
    Blocked(MpState),
}

/// One guest entry as [`Vm::prepare_entry_noting_switch`] prepared it.
#[derive(Debug)]
pub struct PreparedEntry<E: core::error::Error + Send + Sync + 'static> {
    /// What the vCPU may do ([`Vm::prepare_entry`]'s answer).
    pub entry: Result<Entry, Error<E>>,
    /// This entry applied a pending AP-creation update or guest-VMSA reload (even if the
    /// entry is then refused).
    pub switched: bool,
}

/// What tearing a VM down did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Teardown {
    /// vCPUs torn down.
    pub vcpus: usize,
    /// Host pages of vCPUs leaked on purpose over the VM's life, at teardown or before (their
    /// VMSAs, a debug-decrypt destination): one per `Leaked` event that names a vCPU.
    pub leaked: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A confidential VM.
    Confidential,
    /// A VM created only to receive another VM's encryption context (no VMSAs of its own).
    MigrationTarget,
    /// A VM whose encryption context moved away.
    Dead,
}

/// A confidential VM's VMSAs, driven through a [`Platform`].
pub struct Vm<P: Platform> {
    platform: P,
    config: VmConfig,
    role: Role,
    policy: u64,
    launch: LaunchState,
    events: Arc<dyn EventSink>,
    vcpus: Vec<Lock<Vcpu<P::Page>>>,
    /// The vCPUs' ids in creation (index) order.
    ids: Vec<VcpuId>,
    /// Each vCPU's index, for ids that are not their own index (see [`Vm::idx`]).
    index: BTreeMap<VcpuId, usize>,
    bugged: Lock<Option<Leak>>,
    /// Host pages of vCPUs leaked so far (before teardown).
    vcpu_leaks: Lock<usize>,
}

impl<P: Platform> core::fmt::Debug for Vm<P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .field("role", &self.role)
            .field("launch", &self.launch)
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

type Res<T, P> = Result<T, Error<<P as Platform>::Error>>;

impl<P: Platform> Vm<P> {
    /// A confidential VM without vCPUs. Events go to `events`.
    pub fn new(platform: P, config: VmConfig, events: Arc<dyn EventSink>) -> Self {
        Self {
            platform,
            config,
            role: Role::Confidential,
            policy: 0,
            launch: LaunchState::NotStarted,
            events,
            vcpus: Vec::new(),
            ids: Vec::new(),
            index: BTreeMap::new(),
            bugged: Lock::new(None),
            vcpu_leaks: Lock::new(0),
        }
    }

    /// A VM that will receive another VM's encryption context through [`Vm::migrate_from`]:
    /// its vCPUs get no VMSA of their own (KVM: a non-SEV destination VM).
    pub fn migration_target(platform: P, events: Arc<dyn EventSink>) -> Self {
        let mut vm = Self::new(platform, VmConfig::sev_es(0), events);
        vm.role = Role::MigrationTarget;
        vm
    }

    /// The platform.
    pub fn platform(&self) -> &P {
        &self.platform
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The launch phase.
    pub fn launch_state(&self) -> LaunchState {
        self.launch
    }

    /// The guest policy given at launch start (0 before).
    pub fn policy(&self) -> u64 {
        self.policy
    }

    fn cx(&self) -> Cx<'_, P> {
        Cx {
            p: &self.platform,
            kind: self.config.kind,
            events: &*self.events,
        }
    }

    fn lock(&self, i: usize) -> Guard<'_, Vcpu<P::Page>> {
        lock(&self.vcpus[i])
    }

    /// The index of vCPU `id`. As in KVM's `kvm_get_vcpu_by_id`, an id equal to its vCPU's
    /// index (a VMM that numbers its vCPUs 0, 1, ... in creation order, as nearly all do) is
    /// found without a search; this is on every entry and AP-creation request.
    fn idx(&self, id: VcpuId) -> Res<usize, P> {
        let at = id.0 as usize;
        if self.ids.get(at) == Some(&id) {
            return Ok(at);
        }
        self.index.get(&id).copied().ok_or(Error::UnknownVcpu(id))
    }

    fn note_leak(&self, leak: Option<Leak>) {
        if let Some(leak) = leak {
            if leak.vcpu.is_some() {
                *lock(&self.vcpu_leaks) += 1;
            }
            lock(&self.bugged).get_or_insert(leak);
        }
    }

    fn check_usable(&self) -> Res<(), P> {
        if self.role == Role::Dead {
            return Err(Error::VmDead);
        }
        match *lock(&self.bugged) {
            Some(Leak { vcpu, pfn }) => Err(Error::VmBugged { vcpu, pfn }),
            None => Ok(()),
        }
    }

    /// Whether a page was leaked (the VM is then "bugged" and refuses everything but teardown).
    pub fn is_bugged(&self) -> bool {
        lock(&self.bugged).is_some()
    }

    /// Create a vCPU and its host VMSA (`sev_vcpu_create` + `sev_es_init_vmcb`). The first vCPU
    /// is runnable, the others start uninitialized (they are APs). In the supplied-VMSA mode no
    /// host VMSA is allocated: the BSP gets the VMSA supplied at launch, the APs theirs from
    /// AP creation, and until then the VMCB holds no VMSA address.
    pub fn create_vcpu(&mut self, id: VcpuId) -> Res<VcpuInfo, P> {
        self.check_usable()?;
        // __sev_guest_init runs before any vCPU exists.
        self.config.validate()?;
        if self.index.contains_key(&id) {
            return Err(Error::VcpuExists(id));
        }
        let mp = if self.vcpus.is_empty() {
            MpState::Runnable
        } else {
            MpState::Uninitialized
        };
        let mut v = Vcpu::new(id, mp);
        if self.role == Role::Confidential && !self.config.supplied_vmsa {
            let cx = self.cx();
            cx.alloc(&mut v)?;
            let pa = cx.resolve_pa(&v);
            cx.set_vmcb_pa(&mut v, pa);
        }
        let info = info(&v);
        self.index.insert(id, self.vcpus.len());
        self.ids.push(id);
        self.vcpus.push(Lock::new(v));
        Ok(info)
    }

    /// The vCPUs in creation (index) order.
    pub fn vcpu_ids(&self) -> Vec<VcpuId> {
        self.ids.clone()
    }

    /// A snapshot of one vCPU.
    pub fn vcpu(&self, id: VcpuId) -> Res<VcpuInfo, P> {
        Ok(info(&self.lock(self.idx(id)?)))
    }

    /// Snapshots of every vCPU, in index order.
    pub fn vcpus(&self) -> Vec<VcpuInfo> {
        (0..self.vcpus.len()).map(|i| info(&self.lock(i))).collect()
    }

    /// Set the register state that a launch will sync into the vCPU's VMSA (KVM_SET_REGS and
    /// friends). Refused once the guest state is protected.
    pub fn set_registers(&self, id: VcpuId, regs: &SevEsSaveArea) -> Res<(), P> {
        let mut v = self.lock(self.idx(id)?);
        if v.protected {
            return Err(Error::AlreadyProtected {
                vcpu: id,
                op: Op::Sync,
            });
        }
        *v.regs = regs.clone();
        Ok(())
    }

    /// The register state the VMM set (not the encrypted VMSA; see [`Vm::decrypt_vmsa`]).
    pub fn registers(&self, id: VcpuId) -> Res<Box<SevEsSaveArea>, P> {
        Ok(self.lock(self.idx(id)?).regs.clone())
    }

    /// Enable or disable guest debugging (KVM_SET_GUEST_DEBUG); a launch refuses debugged vCPUs.
    pub fn set_guest_debug(&self, id: VcpuId, enabled: bool) -> Res<(), P> {
        self.lock(self.idx(id)?).guest_debug = enabled;
        Ok(())
    }

    /// Force a vCPU's run state (KVM_SET_MP_STATE).
    pub fn set_mp_state(&self, id: VcpuId, mp: MpState) -> Res<(), P> {
        self.lock(self.idx(id)?).mp_state = mp;
        Ok(())
    }

    /// The address the VMCB must point at for the vCPU's current state (`sev_es_vmsa_pa`):
    /// `None` for no VMSA, the page's address for a host VMSA, the guest_memfd frame for a
    /// guest-owned one (`None` if nothing backs it).
    pub fn resolve_vmsa_pa(&self, id: VcpuId) -> Res<Option<Hpa>, P> {
        let v = self.lock(self.idx(id)?);
        Ok(self.cx().resolve_pa(&v))
    }

    fn require(&self, op: &'static str, needed: VmKind) -> Res<(), P> {
        if self.config.kind != needed {
            return Err(Error::WrongKind {
                op,
                needed,
                kind: self.config.kind,
            });
        }
        Ok(())
    }

    fn require_launch(&self, op: &'static str, want: LaunchState) -> Res<(), P> {
        self.check_usable()?;
        if self.role != Role::Confidential || self.launch != want {
            return Err(Error::Launch {
                op,
                state: self.launch,
            });
        }
        Ok(())
    }

    /// Run one launch step. A failure makes the launch fail for good only once it cannot be
    /// retried: a vCPU is protected (`sev_es_sync_vmsa` refuses it again) or a VMSA was freed
    /// or leaked. Otherwise the launch stays where it was, as in KVM, where `snp_launch_start`,
    /// `sev_gmem_post_populate` and `snp_launch_update_vmsa` return an error that changed
    /// nothing (a DR7/debug refusal, an RMPUPDATE that left the page shared, a reclaimed page)
    /// and the same command can be issued again.
    fn launch_step<T>(&mut self, step: impl FnOnce(&mut Self) -> Res<T, P>) -> Res<T, P> {
        let r = step(self);
        if r.is_err() && !self.launch_retryable() {
            self.launch = LaunchState::Failed;
        }
        r
    }

    /// Whether no launch step has left a mark that makes a retry impossible.
    fn launch_retryable(&self) -> bool {
        // In the supplied-VMSA mode launch finish syncs no vCPU, so a protected BSP (its VMSA
        // supplied) or VMSA-less APs do not stand in the way of a retry.
        !self.is_bugged()
            && (self.config.supplied_vmsa
                || (0..self.vcpus.len()).all(|i| {
                    let v = self.lock(i);
                    !v.protected && !matches!(v.state, VmsaState::None)
                }))
    }

    /// Start the launch: `LAUNCH_START` (SEV-ES) or `SNP_GCTX_CREATE` + `SNP_LAUNCH_START` +
    /// `SNP_ACTIVATE` (SEV-SNP). An SNP policy must have bit 17 set (SNP ABI §4.3).
    pub fn launch_start(&mut self, policy: u64) -> Res<(), P> {
        self.require_launch("launch start", LaunchState::NotStarted)?;
        self.config.validate()?;
        let start = match self.config.kind {
            VmKind::Snp => {
                // snp_launch_start: -EINVAL for `policy & ~snp_supported_policy_bits`, where
                // sev_hardware_setup sets snp_supported_policy_bits =
                // sev_get_snp_policy_bits() & KVM_SNP_POLICY_MASK_VALID.
                let supported = KVM_SNP_POLICY_MASK_VALID & self.platform.snp_policy_bits();
                if policy & !supported != 0 {
                    return Err(Error::BadPolicy {
                        policy,
                        rule: "an SNP policy bit is outside the supported mask (KVM_SNP_POLICY_MASK_VALID and the firmware's)",
                    });
                }
                if policy & SNP_POLICY_RSVD_MBO == 0 {
                    return Err(Error::BadPolicy {
                        policy,
                        rule: "an SNP policy must have bit 17 (reserved, must be one) set",
                    });
                }
                LaunchStart::Snp {
                    policy,
                    gosvw: [0; 16],
                }
            }
            VmKind::SevEs => LaunchStart::SevEs {
                policy: u32::try_from(policy).map_err(|_| Error::BadPolicy {
                    policy,
                    rule: "an SEV-ES policy is 32 bits wide",
                })?,
            },
        };
        self.launch_step(|vm| {
            vm.platform
                .launch_start(&start)
                .map_err(|source| Error::Platform {
                    vcpu: None,
                    op: PlatformOp::LaunchStart,
                    source,
                })
        })?;
        self.policy = policy;
        self.launch = LaunchState::Started;
        Ok(())
    }

    /// Add guest memory to the launch: `LAUNCH_UPDATE_DATA` (SEV-ES, `Normal` only; KVM's
    /// `sev_launch_update_data`: any alignment and length, handed to the platform whole, since
    /// SEV-ES VMs have no guest_memfd) or `SNP_LAUNCH_UPDATE` of the given type (SEV-SNP,
    /// 4 KiB pages; KVM's `sev_gmem_post_populate`: each guest_memfd page is filled, made
    /// pre-guest with `RMPUPDATE`, then measured; a page the firmware refuses is reclaimed, or
    /// leaked if that fails).
    ///
    /// `data` holds the contents (`len` bytes), except for `Zero` pages, which take none. An
    /// SEV-ES update may also omit it, to measure the guest memory as it is.
    ///
    /// A page of type [`SnpPageType::Vmsa`] is the BSP's VMSA in the supplied-VMSA launch mode
    /// ([`VmConfig::supplied_vmsa`]): exactly one page, once, before launch finish, at a GPA
    /// inside MAXPHYADDR and not 2 MiB aligned, with the VM's SEV_FEATURES; the BSP (the first
    /// vCPU created) then owns it as `GuestOwned(gpa)`. Anything else is a
    /// [`SuppliedVmsaError`](crate::SuppliedVmsaError).
    pub fn launch_update_data(
        &mut self,
        gpa: Gpa,
        len: u64,
        page_type: SnpPageType,
        data: Option<&[u8]>,
    ) -> Res<(), P> {
        if page_type == SnpPageType::Vmsa {
            return self.supply_vmsa(gpa, len, data);
        }
        self.require_launch("launch update", LaunchState::Started)?;
        if self.config.kind == VmKind::SevEs {
            return self.launch_update_es_data(gpa, len, page_type, data);
        }
        let bad = |rule| Err(Error::BadLaunchUpdate { gpa, len, rule });
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return bad("the length must be a non-zero multiple of 4096");
        }
        if !gpa.is_page_aligned() {
            return bad("the GPA must be 4 KiB aligned");
        }
        // sev_gmem_post_populate walks GFNs that exist (kvm_gmem_populate finds each in a
        // memslot): a range past the top of the guest physical address space has no last page.
        if gpa.0.checked_add(len - 1).is_none() {
            return bad("the range runs past the top of the guest physical address space");
        }
        // snp_launch_update passes no source for a ZERO page whatever uaddr holds
        // (`src = params.type == KVM_SEV_SNP_PAGE_TYPE_ZERO ? NULL : ...`): contents given for
        // one are ignored, not refused.
        let data = if page_type == SnpPageType::Zero {
            None
        } else {
            data
        };
        match (page_type, data) {
            (SnpPageType::Zero, _) => {}
            (_, None) => return bad("contents are required for all but ZERO pages"),
            (_, Some(d)) if d.len() as u64 != len => return bad("the contents must be exactly len bytes"),
            _ => {}
        }
        let pages = (len / PAGE_SIZE) as usize;
        let contents: Box<dyn Iterator<Item = Option<&PageBuf>>> = match data {
            Some(d) => Box::new(d.as_chunks().0.iter().map(Some)),
            None => Box::new(core::iter::repeat_n(None, pages)),
        };
        self.launch_step(|vm| {
            for (i, page) in (0u64..).zip(contents) {
                // Checked above: every page of the range lies below 2^64.
                let at = i
                    .checked_mul(PAGE_SIZE)
                    .and_then(|off| gpa.0.checked_add(off))
                    .ok_or(Error::BadLaunchUpdate {
                        gpa,
                        len,
                        rule: "the range runs past the top of the guest physical address space",
                    })?;
                vm.launch_update_page(Gpa(at), page_type, page)?;
            }
            Ok(())
        })
    }

    /// The VMM supplies the BSP's VMSA in guest memory (`SNP_LAUNCH_UPDATE` of page type VMSA,
    /// the series' patch 4/4 "kvm: svm: Support KVM_SEV_SNP_PAGE_TYPE_VMSA at
    /// SNP_LAUNCH_UPDATE"). The page goes through `sev_gmem_post_populate` like a data page
    /// (written into its guest_memfd frame, made private at `gpa`, measured as a VMSA page at
    /// `gpa`), and the BSP, which has no host VMSA in this mode, becomes `GuestOwned(gpa)`,
    /// protected, its VMCB pointing at the guest_memfd frame.
    ///
    /// The BSP is the first vCPU created (index 0): the page names no vCPU (a VMSA holds no
    /// APIC ID), and the first vCPU is the one vmsa-core makes runnable, as KVM's reset BSP is
    /// vCPU id 0 (`kvm_vcpu_is_reset_bsp`) by default.
    ///
    /// Refused, each with a [`SuppliedVmsaError`] and nothing measured: an SEV-ES VM, a VM in
    /// the classic mode, after launch finish, not exactly one page, a GPA beyond MAXPHYADDR or
    /// 2 MiB aligned (erratum 1467, the rules `sev_snp_ap_creation` applies to guest VMSAs), a
    /// page whose SEV_FEATURES are not the VM's, no vCPU yet, or a BSP that has its VMSA already.
    fn supply_vmsa(&mut self, gpa: Gpa, len: u64, data: Option<&[u8]>) -> Res<(), P> {
        use crate::error::SuppliedVmsaError as S;
        self.check_usable()?;
        if self.config.kind == VmKind::SevEs {
            return Err(S::SevEs { gpa }.into());
        }
        if self.launch == LaunchState::Finished {
            return Err(S::AfterLaunchFinish { gpa }.into());
        }
        self.require_launch("launch update", LaunchState::Started)?;
        if !self.config.supplied_vmsa {
            return Err(S::NotEnabled { gpa }.into());
        }
        if len != PAGE_SIZE {
            return Err(S::NotOnePage { gpa, len }.into());
        }
        let bad = |rule| Err(Error::BadLaunchUpdate { gpa, len, rule });
        if !gpa.is_page_aligned() {
            return bad("the GPA must be 4 KiB aligned");
        }
        if !gpa.fits_phys_bits(self.config.max_phys_bits) {
            return Err(S::BeyondMaxPhys {
                gpa,
                max_phys_bits: self.config.max_phys_bits,
            }
            .into());
        }
        if gpa.is_2m_aligned() {
            return Err(S::Erratum1467 { gpa }.into());
        }
        let page: &PageBuf = match data.map(<&PageBuf>::try_from) {
            None => return bad("contents are required for all but ZERO pages"),
            Some(Err(_)) => return bad("the contents must be exactly len bytes"),
            Some(Ok(page)) => page,
        };
        let found = SevEsSaveArea::from_page(page).sev_features;
        let expected = self.config.vmsa_features();
        if found != expected {
            return Err(S::FeatureMismatch { gpa, found, expected }.into());
        }
        if self.vcpus.is_empty() {
            return Err(S::NoBsp { gpa }.into());
        }
        {
            let v = self.lock(0);
            match v.state {
                VmsaState::None => {}
                VmsaState::GuestOwned(existing) => {
                    return Err(S::Duplicate {
                        vcpu: v.id,
                        existing,
                        gpa,
                    }
                    .into());
                }
                _ => return Err(self.cx().invalid(&v, Op::Supply)),
            }
        }
        self.launch_step(|vm| vm.launch_update_page(gpa, SnpPageType::Vmsa, Some(page)))?;
        let mut v = self.lock(0);
        self.cx().supply(&mut v, gpa)
    }

    /// SEV-ES `LAUNCH_UPDATE_DATA` (KVM's `sev_launch_update_data`): KVM pins the VMM's memory
    /// (`sev_pin_memory`, which refuses only `ulen == 0 || uaddr + ulen < uaddr`), of any
    /// alignment and length, flushes it and has the firmware encrypt it in place. There is no
    /// guest_memfd to look the range up in: the platform finds the memory that backs it.
    fn launch_update_es_data(
        &mut self,
        gpa: Gpa,
        len: u64,
        page_type: SnpPageType,
        data: Option<&[u8]>,
    ) -> Res<(), P> {
        let bad = |rule| Err(Error::BadLaunchUpdate { gpa, len, rule });
        if len == 0 {
            return bad("the length must not be zero");
        }
        if gpa.0.checked_add(len - 1).is_none() {
            return bad("the range runs past the top of the guest physical address space");
        }
        if page_type != SnpPageType::Normal {
            return bad("SEV-ES launches only measure normal pages");
        }
        if data.is_some_and(|d| d.len() as u64 != len) {
            return bad("the contents must be exactly len bytes");
        }
        self.launch_step(|vm| {
            vm.platform
                .launch_update_data(gpa, len, data)
                .map_err(|source| Error::Platform {
                    vcpu: None,
                    op: PlatformOp::LaunchUpdateData,
                    source,
                })
        })
    }

    fn launch_update_page(&self, gpa: Gpa, page_type: SnpPageType, data: Option<&PageBuf>) -> Res<(), P> {
        let pfn = self
            .platform
            .gmem_pfn(gpa.gfn())
            .ok_or(Error::NoGuestMemory { gpa })?;
        let plat = |op, source| Error::Platform {
            vcpu: None,
            op,
            source,
        };
        if let Some(page) = data {
            self.platform
                .write_frame(pfn, page)
                .map_err(|e| plat(PlatformOp::WriteFrame, e))?;
        }
        self.platform
            .rmp_make_private(pfn, gpa, PageLevel::Size4K, self.platform.asid(), true)
            .map_err(|e| plat(PlatformOp::RmpMakePrivate, e))?;
        self.platform.snp_launch_update(pfn, gpa, page_type).map_err(|e| {
            self.reclaim_guest_frame(pfn);
            plat(PlatformOp::SnpLaunchUpdate, e)
        })
    }

    /// `snp_page_reclaim` for a guest_memfd frame the firmware refused: reclaim and make shared,
    /// or report the frame leaked.
    fn reclaim_guest_frame(&self, pfn: Pfn) {
        if let Err((reason, detail)) = snp_page_reclaim(&self.platform, pfn) {
            self.platform.leak_guest_frame(pfn);
            self.events.emit(Event::Leaked {
                vcpu: None,
                pfn,
                reason,
                detail,
            });
            self.note_leak(Some(Leak { vcpu: None, pfn }));
        }
    }

    /// SEV-ES `LAUNCH_UPDATE_VMSA` for every vCPU in index order (KVM's
    /// `sev_launch_update_vmsa`): sync, make private, then encrypt (make-private before the
    /// firmware call, as the review asks). Stops at the first failure, which leaves the
    /// refused vCPU's VMSA shared and unprotected (`__sev_launch_update_vmsa` returns the
    /// firmware error with the page kept), so the command can be retried while no vCPU is
    /// protected.
    pub fn launch_update_vmsas(&mut self) -> Res<(), P> {
        self.require("LAUNCH_UPDATE_VMSA", VmKind::SevEs)?;
        self.require_launch("LAUNCH_UPDATE_VMSA", LaunchState::Started)?;
        self.launch_step(|vm| {
            for i in 0..vm.vcpus.len() {
                vm.launch_vmsa(i)?;
            }
            Ok(())
        })
    }

    /// Launch one vCPU's VMSA (`__sev_launch_update_vmsa` / the body of
    /// `snp_launch_update_vmsa`, which the review asks to split out).
    fn launch_vmsa(&self, i: usize) -> Res<(), P> {
        let cx = self.cx();
        let mut v = self.lock(i);
        cx.sync(&mut v, self.config.vmsa_features(), self.config.sync_fpu)?;
        let pfn = cx.make_private(&mut v)?;
        let (fw, op) = match self.config.kind {
            VmKind::SevEs => {
                // __sev_launch_update_vmsa: LAUNCH_UPDATE_VMSA encrypts the page in place, so
                // the synced plaintext is flushed from the cache first (clflush_cache_range).
                self.platform.clflush_page(pfn);
                (
                    self.platform.launch_update_vmsa(pfn),
                    PlatformOp::LaunchUpdateVmsa,
                )
            }
            VmKind::Snp => (
                self.platform
                    .snp_launch_update(pfn, crate::addr::INITIAL_VMSA_GPA, SnpPageType::Vmsa),
                PlatformOp::SnpLaunchUpdate,
            ),
        };
        match fw {
            Ok(()) => {
                v.protected = true;
                Ok(())
            }
            Err(source) => {
                let leak = match self.config.kind {
                    // __sev_launch_update_vmsa: a firmware error is returned as is; the VMSA
                    // stays allocated and the vCPU unprotected (SEV-ES has no RMP to undo).
                    VmKind::SevEs => {
                        cx.refused(&mut v);
                        None
                    }
                    VmKind::Snp => cx.reclaim(&mut v)?,
                };
                self.note_leak(leak);
                Err(Error::Platform {
                    vcpu: Some(v.id),
                    op,
                    source,
                })
            }
        }
    }

    /// Finish the launch. SEV-ES: `LAUNCH_FINISH` (after [`Vm::launch_update_vmsas`]). SEV-SNP
    /// (KVM's `snp_launch_finish`): first every vCPU's VMSA in index order (sync, `RMPUPDATE` to
    /// a firmware VMSA page at `INITIAL_VMSA_GPA`, `SNP_LAUNCH_UPDATE` type VMSA, reclaim on
    /// failure), then `SNP_LAUNCH_FINISH`. In the supplied-VMSA mode no vCPU VMSA is measured
    /// here; the BSP must have its supplied VMSA ([`SuppliedVmsaError::MissingBspVmsa`]).
    ///
    /// [`SuppliedVmsaError::MissingBspVmsa`]: crate::SuppliedVmsaError::MissingBspVmsa
    pub fn launch_finish(&mut self, host_data: [u8; 32]) -> Res<(), P> {
        self.require_launch("launch finish", LaunchState::Started)?;
        let finish = match self.config.kind {
            VmKind::SevEs => LaunchFinish::SevEs,
            VmKind::Snp => LaunchFinish::Snp { host_data },
        };
        if self.config.supplied_vmsa && !self.vcpus.is_empty() {
            let bsp = self.lock(0);
            if !matches!(bsp.state, VmsaState::GuestOwned(_)) {
                return Err(crate::error::SuppliedVmsaError::MissingBspVmsa { vcpu: bsp.id }.into());
            }
        }
        self.launch_step(|vm| {
            // Supplied-VMSA mode: no vCPU has a host VMSA, so none is synced or measured here
            // (the series' 4/4); the digest holds the one VMSA page the VMM supplied.
            if vm.config.kind == VmKind::Snp && !vm.config.supplied_vmsa {
                for i in 0..vm.vcpus.len() {
                    vm.launch_vmsa(i)?;
                }
            }
            vm.platform
                .launch_finish(&finish)
                .map_err(|source| Error::Platform {
                    vcpu: None,
                    op: PlatformOp::LaunchFinish,
                    source,
                })
        })?;
        self.launch = LaunchState::Finished;
        Ok(())
    }

    /// Handle a GHCB AP-creation request from `req.requester` (KVM's `sev_snp_ap_creation`).
    ///
    /// On success the target records the requested VMSA (kept apart from the one it runs) and
    /// waits for reset; unless the request is CREATE_ON_INIT the caller must kick the target,
    /// whose next [`Vm::prepare_entry`] applies it. On error nothing changed; answer the guest
    /// with [`ApCreationError::sw_exit_info`].
    pub fn ap_creation(&self, req: &ApCreationRequest) -> Result<ApCreated, ApCreationError> {
        // sev_snp_ap_creation runs from sev_handle_vmgexit, i.e. from a guest that KVM_RUN
        // entered: never before the launch finished, nor in a bugged (KVM_BUG) or dead VM.
        let why = if self.role == Role::Dead {
            Some("the VM is dead")
        } else if self.is_bugged() {
            Some("the VM is bugged")
        } else if self.launch != LaunchState::Finished {
            Some("the launch has not finished")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(ApCreationError::NotRunning { why });
        }
        let rules = ApCreationRules {
            kind: self.config.kind,
            vmsa_features: self.config.vmsa_features(),
            max_phys_bits: self.config.max_phys_bits,
        };
        let valid = rules.validate(req, |apic| self.idx(VcpuId(apic)).is_ok())?;
        let target = VcpuId(valid.apic_id);
        let at = self
            .idx(target)
            .map_err(|_| ApCreationError::UnknownApicId { apic_id: target.0 })?;
        let mut v = self.lock(at);
        v.pending_gpa = valid.gpa;
        v.waiting_for_reset = true;
        let kick = valid.request != ApRequest::CreateOnInit;
        if kick {
            v.update_requested = true;
        }
        self.events.emit(Event::ApRequest {
            requester: req.requester,
            target,
            gpa: valid.gpa,
            request: valid.request.raw(),
        });
        Ok(ApCreated {
            target,
            request: valid.request,
            kick,
        })
    }

    /// Deliver INIT (or a reset) to a vCPU (`sev_init_vmcb` with `init_event`): an SNP vCPU with
    /// an AP-creation request waiting switches VMSA; then the VMCB is pointed at whatever the
    /// state resolves to (`sev_es_init_vmcb`).
    pub fn init_vcpu(&self, id: VcpuId) -> Res<VcpuInfo, P> {
        let i = self.idx(id)?;
        let cx = self.cx();
        let mut v = self.lock(i);
        v.update_requested = false;
        self.reset(&cx, &mut v);
        Ok(info(&v))
    }

    fn reset(&self, cx: &Cx<'_, P>, v: &mut Vcpu<P::Page>) {
        if self.config.kind == VmKind::Snp {
            let leak = cx.init_protected_guest_state(v);
            self.note_leak(leak);
        }
        let pa = cx.resolve_pa(v);
        cx.set_vmcb_pa(v, pa);
        v.reload_requested = false;
    }

    /// What the vCPU may do at guest entry: apply a pending AP-creation update (the kernel's
    /// `KVM_REQ_UPDATE_PROTECTED_GUEST_STATE`) or guest VMSA reload, then check the VMSA
    /// (`pre_sev_run`): a runnable vCPU without a valid VMSA is refused.
    pub fn prepare_entry(&self, id: VcpuId) -> Res<Entry, P> {
        self.prepare_entry_noting_switch(id).entry
    }

    /// [`Vm::prepare_entry`], also saying whether this entry applied a pending AP-creation
    /// update or guest-VMSA reload. Only the entry that applied it can tell (a request is
    /// consumed once, by whichever thread enters for the vCPU first), and after one the VMSA
    /// must be loaded again even at an unchanged address (KVM marks the VMCB dirty).
    pub fn prepare_entry_noting_switch(&self, id: VcpuId) -> PreparedEntry<P::Error> {
        let mut switched = false;
        let entry = (|| {
            self.check_usable()?;
            let i = self.idx(id)?;
            let cx = self.cx();
            let mut v = self.lock(i);
            switched = v.update_requested || v.reload_requested;
            if v.update_requested {
                v.update_requested = false;
                self.reset(&cx, &mut v);
            }
            if v.reload_requested {
                cx.reload(&mut v);
            }
            // A page leaked by the switch just made bugs the VM (KVM_BUG), and KVM checks
            // KVM_REQ_VM_DEAD again before VMRUN (vcpu_enter_guest, arch/x86/kvm/x86.c: a
            // request pending at kvm_vcpu_exit_request cancels the entry): the vCPU leaves
            // with EIO.
            self.check_usable()?;
            match v.mp_state {
                MpState::Runnable => v
                    .vmcb_vmsa_pa
                    .map(Entry::Run)
                    .ok_or(Error::InvalidVmsa { vcpu: id }),
                other => Ok(Entry::Blocked(other)),
            }
        })();
        PreparedEntry { entry, switched }
    }

    /// The guest memory in `[start, end)` is being replaced (guest_memfd hole punch or
    /// conversion; upstream's `sev_gmem_invalidate_range`): every vCPU whose installed guest
    /// VMSA lies there stops pointing at it now and re-resolves it at its next entry.
    ///
    /// Order, when vCPUs run concurrently: first make the range unresolvable
    /// ([`Platform::gmem_pfn`] answers `None` for it), then call this, then free the frames. A
    /// vCPU that switches to a guest VMSA there after this call passed it but before the range
    /// stopped resolving would keep a VMCB address of a freed frame (found by the model check
    /// `invalidating_before_unmapping_is_caught` in `crates/model-check/tests/model_check.rs`).
    pub fn gmem_invalidate(&self, start: Gfn, end: Gfn) -> Vec<VcpuId> {
        let cx = self.cx();
        let mut hit = Vec::new();
        for i in 0..self.vcpus.len() {
            let mut v = self.lock(i);
            if let VmsaState::GuestOwned(gpa) = v.state
                && (start..end).contains(&gpa.gfn())
            {
                cx.set_vmcb_pa(&mut v, None);
                v.reload_requested = true;
                hit.push(v.id);
            }
        }
        hit
    }

    /// Read a vCPU's VMSA for debugging (`sev_decrypt_vmsa`): an unlaunched host VMSA is read
    /// as is; a protected or guest-owned one goes through the firmware, if the guest policy
    /// allows debugging (SNP: policy bit 19; SEV-ES: policy bit 0 clear).
    pub fn decrypt_vmsa(&self, id: VcpuId) -> Res<Box<SevEsSaveArea>, P> {
        let i = self.idx(id)?;
        let v = self.lock(i);
        let mut page = Box::new([0u8; PAGE_SIZE as usize]);
        let plat = |op, source| Error::Platform {
            vcpu: Some(id),
            op,
            source,
        };
        match (&v.state, v.protected) {
            (VmsaState::None, _) => return Err(self.cx().invalid(&v, Op::Decrypt)),
            (VmsaState::KvmShared(p), false) => {
                self.platform
                    .read_frame(crate::platform::HostPage::pfn(p), &mut page)
                    .map_err(|e| plat(PlatformOp::ReadFrame, e))?;
            }
            _ => {
                let refused = match self.config.kind {
                    VmKind::Snp if self.policy & SNP_POLICY_DEBUG == 0 => Some("lacks DEBUG (bit 19)"),
                    VmKind::SevEs if self.policy & SEV_POLICY_NODBG != 0 => Some("has NODBG (bit 0)"),
                    _ => None,
                };
                if let Some(rule) = refused {
                    return Err(Error::DebugPolicy {
                        vcpu: id,
                        policy: self.policy,
                        rule,
                    });
                }
                let pa = v.vmcb_vmsa_pa.ok_or(Error::InvalidVmsa { vcpu: id })?;
                if let Err(f) = self.platform.dbg_decrypt_vmsa(pa, &mut page) {
                    // sev_decrypt_vmsa: a destination page snp_page_reclaim could not return
                    // is leaked, and KVM_BUG marks the VM bugged.
                    if let Some(pfn) = f.leaked {
                        self.events.emit(Event::Leaked {
                            vcpu: Some(id),
                            pfn,
                            reason: LeakReason::ReclaimFailed,
                            detail: f.source.to_string(),
                        });
                        self.note_leak(Some(Leak { vcpu: Some(id), pfn }));
                    }
                    return Err(plat(PlatformOp::DbgDecrypt, f.source));
                }
            }
        }
        Ok(SevEsSaveArea::from_page(&page))
    }

    /// Intra-host migration (`KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM`): move the encryption context
    /// (the platform, with its ASID and pages) and every vCPU's VMSA from `src` into `self`,
    /// which must come from [`Vm::migration_target`] and have as many vCPUs. Only launched
    /// SEV-ES VMs move. Afterwards `src` is dead; nothing moves if a check fails. Unlike KVM,
    /// which leaves the destination's `sev->policy` at 0, the guest policy moves too (see
    /// [`Vm::policy`]); the VMCB addresses that change are reported as `VmcbVmsaPa` events.
    pub fn migrate_from(&mut self, src: &mut Vm<P>) -> Res<(), P> {
        self.check_usable()?;
        if self.role != Role::MigrationTarget {
            return Err(MigrationError::DestinationIsConfidential {
                kind: self.config.kind,
            }
            .into());
        }
        // sev_vm_move_enc_context_from: -EINVAL when the source is not an SEV guest, which
        // includes a source moved away before (sev_migrate_from leaves it inactive; the move
        // ioctl runs on the destination, so the source being dead gives no EIO).
        if src.role != Role::Confidential {
            return Err(MigrationError::SourceNotConfidential.into());
        }
        // A bugged source (KVM_BUG) is refused as every call on a bugged VM is; KVM's move
        // does not look at the source's vm_dead, a deliberate difference: its state is not
        // to be trusted.
        src.check_usable()?;
        if src.config.kind == VmKind::Snp {
            return Err(MigrationError::SourceIsSnp.into());
        }
        if src.vcpus.len() != self.vcpus.len() {
            return Err(MigrationError::VcpuCountMismatch {
                source_vcpus: src.vcpus.len(),
                destination_vcpus: self.vcpus.len(),
            }
            .into());
        }
        if let Some(v) = src.vcpus().into_iter().find(|v| !v.protected) {
            return Err(MigrationError::SourceNotLaunched { vcpu: v.id }.into());
        }
        core::mem::swap(&mut self.platform, &mut src.platform);
        self.config = src.config;
        // A deliberate difference: sev_migrate_from does not copy `sev->policy`, so KVM's
        // destination keeps policy 0 (and its sev_decrypt_vmsa checks 0, e.g. no NODBG). The
        // firmware context, and the policy it enforces, moves with the handle, so the
        // destination reports the source's policy here.
        self.policy = src.policy;
        self.launch = src.launch;
        self.role = Role::Confidential;
        src.role = Role::Dead;
        src.launch = LaunchState::NotStarted;
        for (d, s) in self.vcpus.iter_mut().zip(src.vcpus.iter_mut()) {
            let d = get_mut(d);
            let s = get_mut(s);
            let moved = s.state.snapshot();
            d.state = core::mem::take(&mut s.state);
            d.protected = true;
            // sev_migrate_from copies the VMCB's vmsa_pa and sets the source's to INVALID_PAGE.
            let pa = s.vmcb_vmsa_pa.take();
            if pa.is_some() {
                self.events.emit(Event::VmcbVmsaPa { vcpu: s.id, pa: None });
            }
            if d.vmcb_vmsa_pa != pa {
                d.vmcb_vmsa_pa = pa;
                self.events.emit(Event::VmcbVmsaPa { vcpu: d.id, pa });
            }
            d.pending_gpa = s.pending_gpa.take();
            d.waiting_for_reset = core::mem::take(&mut s.waiting_for_reset);
            s.protected = false;
            for (vcpu, op, from, to) in [
                (s.id, Op::MigrateOut, moved.clone(), VmsaState::None),
                (d.id, Op::MigrateIn, VmsaState::None, moved),
            ] {
                self.events.emit(Event::Transition { vcpu, op, from, to });
            }
        }
        Ok(())
    }

    /// Free one vCPU's VMSA (`sev_free_vcpu`): private pages are made shared and flushed
    /// first; a page that cannot be made shared is leaked and reported. The vCPU stays, with
    /// no VMSA.
    pub fn free_vcpu_vmsa(&self, id: VcpuId) -> Res<VcpuInfo, P> {
        let i = self.idx(id)?;
        let mut v = self.lock(i);
        let leak = self.cx().free(&mut v, Op::Free);
        self.note_leak(leak);
        Ok(info(&v))
    }

    /// Tear every vCPU down (in index order), freeing or leaking each host VMSA. Also done on
    /// drop; calling it twice is harmless.
    pub fn teardown(&mut self) -> Teardown {
        // The pages leaked before teardown (a failed launch, AP creation, decrypt) count too:
        // the report and the `Leaked` events must agree.
        let mut report = Teardown {
            leaked: core::mem::take(&mut *lock(&self.vcpu_leaks)),
            ..Teardown::default()
        };
        let cx = Cx {
            p: &self.platform,
            kind: self.config.kind,
            events: &*self.events,
        };
        for v in self.vcpus.drain(..) {
            let mut v = into_inner(v);
            report.vcpus += 1;
            if cx.free(&mut v, Op::Free).is_some() {
                report.leaked += 1;
            }
        }
        self.index.clear();
        self.ids.clear();
        report
    }

    /// The host pages the vCPUs hold, by state (for accounting in tests and reports).
    pub fn host_pages(&self) -> Vec<(VcpuId, StateKind, Pfn)> {
        self.vcpus()
            .into_iter()
            .filter_map(|v| match v.state {
                VmsaState::KvmShared(p) => Some((v.id, StateKind::KvmShared, p)),
                VmsaState::KvmPrivate(p) => Some((v.id, StateKind::KvmPrivate, p)),
                _ => None,
            })
            .collect()
    }
}

impl<P: Platform> Vm<P> {
    /// A VM whose events are dropped.
    pub fn without_events(platform: P, config: VmConfig) -> Self {
        Self::new(platform, config, Arc::new(NullSink))
    }
}

impl<P: Platform> Drop for Vm<P> {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn info<Pg: crate::platform::HostPage>(v: &Vcpu<Pg>) -> VcpuInfo {
    VcpuInfo {
        id: v.id,
        state: v.state.snapshot(),
        protected: v.protected,
        vmcb_vmsa_pa: v.vmcb_vmsa_pa,
        pending_gpa: v.pending_gpa,
        mp_state: v.mp_state,
    }
}
