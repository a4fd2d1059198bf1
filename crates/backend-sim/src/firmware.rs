//! The AMD Secure Processor (PSP) firmware: platform state, guest contexts, page states and
//! the SEV-SNP and SEV-ES commands the VMSA lifecycle uses.
//!
//! Sources: SEV-SNP Firmware ABI (pub. 56860) chapter 5 (page states) and chapter 8 (commands),
//! SEV API (pub. 55766) §6 for the SEV-ES launch, and AMD's published PSP firmware source
//! (github.com/amd/AMD-ASPFW, `fw/psp_bl_uapps/sev_uapp/src/sev_mcmd.c` and `sev_rmp.c`),
//! whose functions are cited where a rule follows them. SNP_LAUNCH_UPDATE, SNP_DBG_DECRYPT,
//! SNP_ACTIVATE and SNP_PAGE_RECLAIM check their preconditions in the order of the ASPFW
//! handler and return the status of the first one that fails; a command changes nothing when
//! it fails (except the CPUID page write-back ASPFW does on a failed entry check).

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;
use vmsa_core::{Gpa, PAGE_SIZE, PageBuf, Pfn, SevStatus, SnpPageType, VmKind};

use crate::crypto::{GuestKey, KeySource};
use crate::measure::{LastContents, LaunchDigest, SevEsLaunchDigest, SnpLaunchDigest};
use crate::memory::HostMemory;
use crate::rmp::{PageSize, Rmp, RmpEntry};

/// A frame's state as the firmware sees it (SNP ABI chapter 5; ASPFW `rmp_entry_get_state`,
/// github.com/amd/AMD-ASPFW sev_rmp.h `snp_page_state_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum PageState {
    /// Any combination of fields not listed below.
    Invalid,
    /// Not covered by the RMP: hypervisor-owned for good.
    Default,
    /// Normal host memory.
    Hypervisor,
    /// Host-owned but frozen.
    HvFixed,
    /// Owned by the firmware.
    Firmware,
    /// IOMMU buffers locked by SNP_INIT.
    FirmwareIommu,
    /// Returned by SNP_PAGE_RECLAIM; the host must RMPUPDATE it to reuse it.
    Reclaim,
    /// A guest context page.
    Context,
    /// Page-swap metadata.
    Metadata,
    /// Assigned to a guest, immutable until SNP_LAUNCH_UPDATE (or reclaim).
    PreGuest,
    /// A validated guest page held by the firmware.
    PreSwap,
    /// Guest-owned, not validated.
    GuestInvalid,
    /// Guest-owned and validated.
    GuestValid,
}

/// ASPFW keeps a firmware page's kind in bits 38:36 of the RMP GPA field (`RMP_GPA_STATE_*`,
/// sev_rmp.h), i.e. bits 50:48 of the GPA: Metadata is 1, Firmware-IOMMU 2.
pub const GPA_STATE_SHIFT: u32 = 48;
/// The GPA-state bits of a Metadata page.
pub const GPA_STATE_METADATA: u64 = 1 << GPA_STATE_SHIFT;
/// The GPA-state bits of a Firmware-IOMMU page.
pub const GPA_STATE_FW_IOMMU: u64 = 2 << GPA_STATE_SHIFT;
const GPA_STATE_MASK: u64 = 7 << GPA_STATE_SHIFT;

/// The state of an entry (`covered` false gives `Default`), exactly as ASPFW sev_rmp.c
/// `rmp_entry_get_state` decodes it, first match wins (the simulator has no Lock bit: it
/// reads as 0). VMSA and GPA matter only where the table says so.
pub fn page_state(covered: bool, e: &RmpEntry) -> PageState {
    use PageState::*;
    if !covered {
        return Default;
    }
    let (a, v, asid, imm) = (e.assigned, e.validated, e.asid, e.immutable);
    let gpa = e.gpa & !GPA_STATE_MASK;
    let gpa_state = e.gpa & GPA_STATE_MASK;
    match (a, v, asid > 0, imm) {
        (false, false, false, false) => Hypervisor,
        (false, false, false, true) => HvFixed,
        (true, false, false, true) if e.gpa == 0 && !e.vmsa => Firmware,
        (true, false, false, false) => Reclaim,
        (true, false, false, true) if e.gpa == 0 && e.vmsa => Context,
        (true, false, false, true) if gpa > 0 && gpa_state == GPA_STATE_METADATA => Metadata,
        (true, false, true, true) => PreGuest,
        (true, true, true, true) => PreSwap,
        (true, false, true, false) => GuestInvalid,
        (true, true, true, false) => GuestValid,
        // RMP_GET_GPA(gpa) == 1: GPA field 1, i.e. GPA 0x1000.
        (true, false, false, true) if gpa == PAGE_SIZE && gpa_state == GPA_STATE_FW_IOMMU && !e.vmsa => {
            FirmwareIommu
        }
        _ => Invalid,
    }
}

/// The per-entry check of a CPUID page's `count` entries (ASPFW cpuid_lookup.c
/// `sanitize_cpuid_list`): an entry of the standard (0-0xFFFF) or extended
/// (0x8000_0000-0x8000_FFFF) range fails when its reserved field is not zero. Entries are 48
/// bytes from offset 16: `eax_in, ecx_in: u32; xcr0_in, xss_in: u64; eax, ebx, ecx, edx: u32;
/// reserved: u64`. The leaf values themselves (`sanitize_cpuid_entry` against the platform's
/// CPUID policy, which corrects them) are not modelled: the simulator has no CPUID table.
fn sanitize_cpuid_list(page: &PageBuf, count: u32) -> bool {
    (0..count as usize).all(|i| {
        let e = 16 + i * 48;
        let eax_in = u32::from_le_bytes(page[e..e + 4].try_into().unwrap_or_default());
        let reserved = u64::from_le_bytes(page[e + 40..e + 48].try_into().unwrap_or_default());
        let checked = eax_in <= 0xffff || (0x8000_0000..=0x8000_ffff).contains(&eax_in);
        !checked || reserved == 0
    })
}

/// A guest's lifecycle state in the firmware.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum GuestState {
    /// Context created (SNP `GSTATE_INIT`).
    Init,
    /// Launch in progress (SNP `GSTATE_LAUNCH`, SEV `LUPDATE`).
    Launch,
    /// Launch finished.
    Running,
}

#[derive(Debug, Clone)]
enum Digest {
    /// The digest, and the hash of the page measured last (a run of equal pages is hashed once).
    Snp(SnpLaunchDigest, LastContents),
    SevEs(SevEsLaunchDigest),
}

/// A guest's handle: the guest context page's frame (SNP) or a number (SEV-ES).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Handle(pub u64);

/// What the firmware keeps per guest.
#[derive(Debug, Clone)]
pub struct GuestContext {
    /// SEV-ES or SEV-SNP.
    pub kind: VmKind,
    /// Lifecycle state.
    pub state: GuestState,
    /// Guest policy.
    pub policy: u64,
    /// Bound ASID (after ACTIVATE).
    pub asid: Option<u32>,
    /// `HOST_DATA` of SNP_LAUNCH_FINISH.
    pub host_data: [u8; 32],
    /// Guest OS visible workarounds of SNP_LAUNCH_START (copied into the secrets page).
    pub gosvw: [u8; 16],
    key: Option<GuestKey>,
    digest: Digest,
}

/// Bit 17 of an SNP guest policy must be one (SNP ABI §4.3).
const SNP_POLICY_MBO: u64 = 1 << 17;
/// Bit 19 of an SNP guest policy: debugging allowed.
const SNP_POLICY_DEBUG: u64 = 1 << 19;
/// Bit 0 of an SEV policy: debugging forbidden.
const SEV_POLICY_NODBG: u64 = 1 << 0;
/// The secrets page version ASPFW writes (`SNP_LAUNCH_UPDATE_SECRETS_PAGE_VERSION`).
const SECRETS_PAGE_VERSION: u32 = 3;
/// The most entries an SNP CPUID page holds (`SNP_CPUID_COUNT_MAX`).
pub const CPUID_COUNT_MAX: u32 = 64;

/// The firmware.
#[derive(Debug)]
pub struct Firmware {
    initialized: bool,
    max_asid: u32,
    guests: HashMap<Handle, GuestContext>,
    asid_owner: HashMap<u32, Handle>,
    dirty_asids: BTreeSet<u32>,
    wbinvd_since_deactivate: bool,
    keys: KeySource,
    next_es_handle: u64,
}

type Fw<T> = Result<T, SevStatus>;

impl Firmware {
    /// Firmware of a machine with ASIDs `1..=max_asid`, keys from `seed`; not yet initialised.
    pub fn new(max_asid: u32, seed: u64) -> Self {
        Self {
            initialized: false,
            max_asid,
            guests: HashMap::new(),
            asid_owner: HashMap::new(),
            dirty_asids: BTreeSet::new(),
            wbinvd_since_deactivate: true,
            keys: KeySource::new(seed),
            next_es_handle: 1,
        }
    }

    /// `SNP_INIT`: UNINIT → INIT.
    pub fn snp_init(&mut self) -> Fw<()> {
        if self.initialized {
            return Err(SevStatus::InvalidPlatformState);
        }
        self.initialized = true;
        Ok(())
    }

    /// Whether SNP_INIT was done.
    pub fn initialized(&self) -> bool {
        self.initialized
    }

    fn platform(&self) -> Fw<()> {
        if self.initialized {
            Ok(())
        } else {
            Err(SevStatus::InvalidPlatformState)
        }
    }

    /// The context of a guest.
    pub fn guest(&self, h: Handle) -> Option<&GuestContext> {
        self.guests.get(&h)
    }

    /// The key the memory of `asid` is encrypted with, if a guest with a key is bound to it.
    pub fn key_for_asid(&self, asid: u32) -> Option<&GuestKey> {
        self.asid_owner
            .get(&asid)
            .and_then(|h| self.guests.get(h))
            .and_then(|g| g.key.as_ref())
    }

    /// The digest of a guest whose launch finished.
    pub fn launch_digest(&self, h: Handle) -> Option<LaunchDigest> {
        let g = self.guests.get(&h)?;
        if g.state != GuestState::Running {
            return None;
        }
        Some(match &g.digest {
            Digest::Snp(d, _) => LaunchDigest::Snp(d.digest()),
            Digest::SevEs(d) => LaunchDigest::SevEs(d.digest()),
        })
    }

    fn snp_guest(&mut self, rmp: &Rmp, gctx: Pfn) -> Fw<&mut GuestContext> {
        self.platform()?;
        if page_state(rmp.covered(gctx), &rmp.entry(gctx)) != PageState::Context {
            return Err(SevStatus::InvalidGuest);
        }
        self.guests
            .get_mut(&Handle(gctx.0))
            .filter(|g| g.kind == VmKind::Snp)
            .ok_or(SevStatus::InvalidGuest)
    }

    /// `SNP_GCTX_CREATE`: a Firmware page becomes the guest's context (SNP ABI §8.10).
    pub fn snp_gctx_create(&mut self, rmp: &mut Rmp, gctx: Pfn) -> Fw<Handle> {
        self.platform()?;
        let e = rmp.entry(gctx);
        if page_state(rmp.covered(gctx), &e) != PageState::Firmware {
            return Err(SevStatus::InvalidPageState);
        }
        if e.page_size != PageSize::Size4K {
            return Err(SevStatus::InvalidPageSize);
        }
        rmp.firmware_set(gctx, |e| e.vmsa = true);
        let h = Handle(gctx.0);
        self.guests.insert(
            h,
            GuestContext {
                kind: VmKind::Snp,
                state: GuestState::Init,
                policy: 0,
                asid: None,
                host_data: [0; 32],
                gosvw: [0; 16],
                key: None,
                digest: Digest::Snp(SnpLaunchDigest::new(), LastContents::default()),
            },
        );
        Ok(h)
    }

    /// `SNP_LAUNCH_START` (SNP ABI §8.16): INIT → LAUNCH with a fresh key and an empty digest.
    pub fn snp_launch_start(&mut self, rmp: &Rmp, gctx: Pfn, policy: u64, gosvw: [u8; 16]) -> Fw<()> {
        let key = self.keys.generate();
        let g = self.snp_guest(rmp, gctx)?;
        if g.state != GuestState::Init {
            return Err(SevStatus::InvalidGuestState);
        }
        if policy & SNP_POLICY_MBO == 0 {
            return Err(SevStatus::PolicyFailure);
        }
        g.policy = policy;
        g.gosvw = gosvw;
        g.key = Some(key);
        g.state = GuestState::Launch;
        Ok(())
    }

    /// ASPFW sev_mcmd.c `mcmd_activate_common` + `activate_common`: INVALID_ASID out of range,
    /// ASID_OWNED if any guest (this one included) holds the ASID, ACTIVE if the guest already
    /// has an ASID, DFFLUSH_REQUIRED if the ASID is dirty.
    fn bind_asid(&mut self, h: Handle, asid: u32) -> Fw<()> {
        if asid == 0 || asid > self.max_asid {
            return Err(SevStatus::InvalidAsid);
        }
        if self.asid_owner.contains_key(&asid) {
            return Err(SevStatus::AsidOwned);
        }
        let g = self.guests.get(&h).ok_or(SevStatus::InvalidGuest)?;
        if g.asid.is_some() {
            return Err(SevStatus::Active);
        }
        if self.dirty_asids.contains(&asid) {
            return Err(SevStatus::DfflushRequired);
        }
        if let Some(g) = self.guests.get_mut(&h) {
            g.asid = Some(asid);
        }
        self.asid_owner.insert(asid, h);
        Ok(())
    }

    /// `SNP_ACTIVATE` (SNP ABI §8.9), in ASPFW sev_mcmd.c `snp_mcmd_activate`'s order: the
    /// guest in LAUNCH or RUNNING (INVALID_GUEST_STATE), no RMP entry carrying the ASID
    /// (INVALID_CONFIG, `check_rmp_for_asid`), then `bind_asid`'s rules (an
    /// already active guest gets ACTIVE, whatever the ASID).
    pub fn snp_activate(&mut self, rmp: &Rmp, gctx: Pfn, asid: u32) -> Fw<()> {
        let g = self.snp_guest(rmp, gctx)?;
        if !matches!(g.state, GuestState::Launch | GuestState::Running) {
            return Err(SevStatus::InvalidGuestState);
        }
        if rmp.asid_pages(asid) > 0 {
            return Err(SevStatus::InvalidConfig);
        }
        self.bind_asid(Handle(gctx.0), asid)
    }

    /// `SNP_LAUNCH_UPDATE` of one 4 KiB page (SNP ABI §8.17): the page must be Pre-Guest of the
    /// guest's ASID; it is measured at the GPA its RMP entry holds (the command has no GPA
    /// field: ASPFW sev_mcmd.c `snp_mcmd_launch_update` measures
    /// `RMP_GPA_TO_PADDR(page_rmp_entry.q1.f.gpa)`), encrypted in place and becomes
    /// Guest-Valid (with the VMSA bit for a VMSA page). A CPUID page with non-zero reserved
    /// header fields or more than 64 entries is refused with INVALID_PARAM and not written; one
    /// that fails the per-entry check is written back (plaintext) and refused with
    /// INVALID_PARAM.
    pub fn snp_launch_update(
        &mut self,
        rmp: &mut Rmp,
        mem: &mut HostMemory,
        gctx: Pfn,
        pfn: Pfn,
        page_type: SnpPageType,
    ) -> Fw<()> {
        let secrets = self.keys.bytes(b"backend-sim secrets page");
        // ASPFW sev_mcmd.c snp_mcmd_launch_update, in its order: context page, page state
        // (PRE_GUEST), page size, then guest state, INACTIVE and the page's owner.
        self.snp_guest(rmp, gctx)?;
        if !mem.contains(pfn) || !rmp.covered(pfn) {
            return Err(SevStatus::InvalidAddress);
        }
        let e = rmp.entry(pfn);
        if page_state(true, &e) != PageState::PreGuest {
            return Err(SevStatus::InvalidPageState);
        }
        if e.page_size != PageSize::Size4K {
            return Err(SevStatus::InvalidPageSize);
        }
        let g = self.snp_guest(rmp, gctx)?;
        if g.state != GuestState::Launch {
            return Err(SevStatus::InvalidGuestState);
        }
        let asid = g.asid.ok_or(SevStatus::Inactive)?;
        if e.asid != asid {
            return Err(SevStatus::InvalidPageOwner);
        }
        let mut page = [0u8; PAGE_SIZE as usize];
        mem.read(pfn, &mut page).map_err(|_| SevStatus::InvalidAddress)?;
        match page_type {
            SnpPageType::Zero => page.fill(0),
            SnpPageType::Secrets => {
                // ASPFW sev_mcmd.c snp_mcmd_launch_update / sev_mcmd.h
                // snp_launch_update_secrets_page_t: version 3 (SNP_LAUNCH_UPDATE_SECRETS_PAGE_
                // VERSION), GOSVW from SNP_LAUNCH_START at 0x10, VMPCK0-3 at 0x20..0xa0.
                page.fill(0);
                page[0..4].copy_from_slice(&SECRETS_PAGE_VERSION.to_le_bytes());
                page[0x10..0x20].copy_from_slice(&g.gosvw);
                for (i, chunk) in page[0x20..0xa0].chunks_exact_mut(32).enumerate() {
                    chunk.copy_from_slice(&secrets);
                    chunk[0] ^= i as u8;
                }
            }
            SnpPageType::Cpuid => {
                // ASPFW sev_mcmd.c snp_mcmd_launch_update: reserved header fields or
                // count > SNP_CPUID_COUNT_MAX are INVALID_PARAM with nothing written;
                // sanitize_cpuid_list failing writes the (corrected) table back in plaintext
                // and fails with INVALID_PARAM.
                let u32_at = |o: usize| u32::from_le_bytes(page[o..o + 4].try_into().unwrap_or_default());
                let u64_at = |o: usize| u64::from_le_bytes(page[o..o + 8].try_into().unwrap_or_default());
                let count = u32_at(0);
                if u32_at(4) != 0 || u64_at(8) != 0 || count > CPUID_COUNT_MAX {
                    return Err(SevStatus::InvalidParam);
                }
                if !sanitize_cpuid_list(&page, count) {
                    mem.write(pfn, &page).map_err(|_| SevStatus::InvalidAddress)?;
                    return Err(SevStatus::InvalidParam);
                }
            }
            _ => {}
        }
        let Digest::Snp(d, last) = &mut g.digest else {
            return Err(SevStatus::InvalidGuest);
        };
        d.update_hashed(Gpa(e.gpa), page_type, &last.hash(page_type, &page));
        let key = g.key.as_ref().ok_or(SevStatus::InvalidGuestState)?;
        mem.write_encrypted(pfn, key, &page)
            .map_err(|_| SevStatus::InvalidAddress)?;
        rmp.firmware_set(pfn, |e| {
            e.immutable = false;
            e.validated = true;
            e.vmsa = page_type == SnpPageType::Vmsa;
        });
        Ok(())
    }

    /// `SNP_LAUNCH_FINISH` (SNP ABI §8.18): LAUNCH → RUNNING.
    pub fn snp_launch_finish(&mut self, rmp: &Rmp, gctx: Pfn, host_data: [u8; 32]) -> Fw<()> {
        let g = self.snp_guest(rmp, gctx)?;
        if g.state != GuestState::Launch {
            return Err(SevStatus::InvalidGuestState);
        }
        g.host_data = host_data;
        g.state = GuestState::Running;
        Ok(())
    }

    /// `SNP_PAGE_RECLAIM` (SNP ABI §8.24; ASPFW sev_mcmd.c `snp_mcmd_page_reclaim`): an
    /// address outside the RMP or DRAM is INVALID_ADDRESS, a page size other than 4 KiB
    /// INVALID_PAGE_SIZE; any entry with Immutable = 0 succeeds unchanged; Firmware →
    /// Reclaim, Metadata → Reclaim (GPA-state bits cleared), Pre-Guest → Guest-Invalid,
    /// Pre-Swap → Guest-Valid; any other immutable page (Context, HV-Fixed, ...) is
    /// INVALID_PAGE_STATE.
    pub fn snp_page_reclaim(&mut self, rmp: &mut Rmp, mem: &HostMemory, pfn: Pfn) -> Fw<()> {
        self.platform()?;
        if !mem.contains(pfn) || !rmp.covered(pfn) {
            return Err(SevStatus::InvalidAddress);
        }
        let e = rmp.entry(pfn);
        if e.page_size != PageSize::Size4K {
            return Err(SevStatus::InvalidPageSize);
        }
        if !e.immutable {
            return Ok(());
        }
        match page_state(true, &e) {
            PageState::Metadata => rmp.firmware_set(pfn, |e| {
                e.immutable = false;
                e.gpa &= !GPA_STATE_MASK;
            }),
            PageState::Firmware | PageState::PreGuest | PageState::PreSwap => {
                rmp.firmware_set(pfn, |e| e.immutable = false)
            }
            _ => return Err(SevStatus::InvalidPageState),
        }
        Ok(())
    }

    /// `SNP_DECOMMISSION` (SNP ABI §8.8): the guest is gone, its ASID becomes dirty (WBINVD and
    /// DF_FLUSH before reuse) if the guest ran, and the context page returns to the Firmware
    /// state.
    pub fn snp_decommission(&mut self, rmp: &mut Rmp, gctx: Pfn) -> Fw<()> {
        self.snp_guest(rmp, gctx)?;
        self.remove_guest(Handle(gctx.0));
        rmp.firmware_set(gctx, |e| e.vmsa = false);
        Ok(())
    }

    /// Deactivate (ASPFW `snp_decommission_common` deactivates first: in-use CCXs of a guest
    /// that ran become dirty, allocated ones clean) and forget the guest.
    fn remove_guest(&mut self, h: Handle) {
        self.deactivate(h);
        self.guests.remove(&h);
    }

    /// `SNP_DBG_DECRYPT` (SNP ABI §8.21): decrypt one guest page into a Firmware page. In
    /// ASPFW sev_mcmd.c `snp_mcmd_dbg_decrypt`'s order: the source must be a guest page
    /// (Pre-Guest, Pre-Swap, Guest-Invalid/Valid) and the destination a Firmware page
    /// (INVALID_PAGE_STATE), the source must belong to the guest's ASID (INVALID_PAGE_OWNER),
    /// the policy must allow debugging (POLICY_FAILURE) and the guest be active (INACTIVE).
    pub fn snp_dbg_decrypt(
        &mut self,
        rmp: &Rmp,
        mem: &mut HostMemory,
        gctx: Pfn,
        src: Pfn,
        dst: Pfn,
    ) -> Fw<()> {
        self.snp_guest(rmp, gctx)?;
        for p in [src, dst] {
            if !mem.contains(p) || !rmp.covered(p) {
                return Err(SevStatus::InvalidAddress);
            }
        }
        let se = rmp.entry(src);
        let guest_page = matches!(
            page_state(true, &se),
            PageState::PreGuest | PageState::PreSwap | PageState::GuestInvalid | PageState::GuestValid
        );
        if !guest_page || page_state(true, &rmp.entry(dst)) != PageState::Firmware {
            return Err(SevStatus::InvalidPageState);
        }
        let g = self.snp_guest(rmp, gctx)?;
        // An inactive guest has ASID 0 in ASPFW, which no guest page carries.
        if Some(se.asid) != g.asid {
            return Err(SevStatus::InvalidPageOwner);
        }
        if g.policy & SNP_POLICY_DEBUG == 0 {
            return Err(SevStatus::PolicyFailure);
        }
        let key = g.key.as_ref().ok_or(SevStatus::InvalidGuestState)?;
        let mut page = [0u8; PAGE_SIZE as usize];
        mem.read_decrypted(src, key, &mut page)
            .map_err(|_| SevStatus::InvalidAddress)?;
        mem.write(dst, &page).map_err(|_| SevStatus::InvalidAddress)
    }

    /// Note that every core wrote back its caches (WBINVD/WBNOINVD on all CPUs).
    pub fn note_wbinvd(&mut self) {
        self.wbinvd_since_deactivate = true;
    }

    /// `SNP_DF_FLUSH` (SNP ABI §8.12): dirty ASIDs become reusable; WBINVD_REQUIRED unless
    /// every core wrote back its caches since the last deactivation.
    pub fn snp_df_flush(&mut self) -> Fw<()> {
        self.platform()?;
        if !self.wbinvd_since_deactivate {
            return Err(SevStatus::WbinvdRequired);
        }
        self.dirty_asids.clear();
        Ok(())
    }

    /// ASIDs waiting for WBINVD + DF_FLUSH.
    pub fn dirty_asids(&self) -> Vec<u32> {
        self.dirty_asids.iter().copied().collect()
    }

    fn es_guest(&mut self, h: Handle) -> Fw<&mut GuestContext> {
        self.platform()?;
        self.guests
            .get_mut(&h)
            .filter(|g| g.kind == VmKind::SevEs)
            .ok_or(SevStatus::InvalidGuest)
    }

    /// SEV `LAUNCH_START` (SEV API §6.2): a new guest in LUPDATE with a fresh key.
    pub fn sev_launch_start(&mut self, policy: u32) -> Fw<Handle> {
        self.platform()?;
        let h = Handle((1 << 63) | self.next_es_handle);
        self.next_es_handle += 1;
        let key = self.keys.generate();
        self.guests.insert(
            h,
            GuestContext {
                kind: VmKind::SevEs,
                state: GuestState::Launch,
                policy: u64::from(policy),
                asid: None,
                host_data: [0; 32],
                gosvw: [0; 16],
                key: Some(key),
                digest: Digest::SevEs(SevEsLaunchDigest::new()),
            },
        );
        Ok(h)
    }

    /// SEV `ACTIVATE` (SEV API §6.10; ASPFW sev_mcmd.c `sev_mcmd_activate`): bind an ASID
    /// (`bind_asid`'s rules; no RMP scan).
    pub fn sev_activate(&mut self, h: Handle, asid: u32) -> Fw<()> {
        self.es_guest(h)?;
        self.bind_asid(h, asid)
    }

    /// SEV `LAUNCH_UPDATE_DATA` / `LAUNCH_UPDATE_VMSA` of one page (SEV API §6.3, §6.4):
    /// measure the plaintext, encrypt it in place. INVALID_GUEST_STATE outside LUPDATE,
    /// INACTIVE before ACTIVATE.
    pub fn sev_launch_update(&mut self, mem: &mut HostMemory, h: Handle, pfn: Pfn) -> Fw<()> {
        self.sev_launch_update_range(mem, h, pfn, 0, PAGE_SIZE as usize)
    }

    /// `LAUNCH_UPDATE_DATA` of `len` bytes at offset `off` of frame `pfn` (KVM's
    /// `sev_launch_update_data` passes any address and length): those bytes are measured.
    /// The in-place encryption works on the cipher's 16-byte blocks, so the blocks the range
    /// touches are encrypted whole (an estimate: the simulator does not check the firmware's
    /// alignment rules for the range).
    pub fn sev_launch_update_range(
        &mut self,
        mem: &mut HostMemory,
        h: Handle,
        pfn: Pfn,
        off: usize,
        len: usize,
    ) -> Fw<()> {
        let end = off
            .checked_add(len)
            .filter(|&e| e <= PAGE_SIZE as usize && len > 0);
        let end = end.ok_or(SevStatus::InvalidLen)?;
        let g = self.es_guest(h)?;
        if g.state != GuestState::Launch {
            return Err(SevStatus::InvalidGuestState);
        }
        g.asid.ok_or(SevStatus::Inactive)?;
        if !mem.contains(pfn) {
            return Err(SevStatus::InvalidAddress);
        }
        let mut page = [0u8; PAGE_SIZE as usize];
        mem.read(pfn, &mut page).map_err(|_| SevStatus::InvalidAddress)?;
        if let Digest::SevEs(d) = &mut g.digest {
            d.update(&page[off..end]);
        }
        let key = g.key.as_ref().ok_or(SevStatus::InvalidGuestState)?;
        let mut enc = page;
        key.encrypt(pfn, &mut enc);
        let (first, last) = (off & !15, end.next_multiple_of(16));
        page[first..last].copy_from_slice(&enc[first..last]);
        mem.write(pfn, &page).map_err(|_| SevStatus::InvalidAddress)
    }

    /// SEV `LAUNCH_FINISH` (SEV API §6.7): LUPDATE → RUNNING.
    pub fn sev_launch_finish(&mut self, h: Handle) -> Fw<()> {
        let g = self.es_guest(h)?;
        if g.state != GuestState::Launch {
            return Err(SevStatus::InvalidGuestState);
        }
        g.state = GuestState::Running;
        Ok(())
    }

    /// SEV `DBG_DECRYPT` of one page (SEV API §6.13): POLICY_FAILURE with NODBG.
    pub fn sev_dbg_decrypt(&mut self, mem: &HostMemory, h: Handle, src: Pfn, out: &mut PageBuf) -> Fw<()> {
        let g = self.es_guest(h)?;
        if g.policy & SEV_POLICY_NODBG != 0 {
            return Err(SevStatus::PolicyFailure);
        }
        if !mem.contains(src) {
            return Err(SevStatus::InvalidAddress);
        }
        let key = g.key.as_ref().ok_or(SevStatus::InvalidGuestState)?;
        mem.read_decrypted(src, key, out)
            .map_err(|_| SevStatus::InvalidAddress)
    }

    /// SEV `DEACTIVATE` (SEV API §6.11; ASPFW sev_mcmd.c `sev_mcmd_deactivate`): unbind the
    /// ASID; INACTIVE if the guest has none. The ASID becomes dirty (WBINVD + DF_FLUSH before
    /// reuse) only if the guest ran (its activation reached RUNNING); otherwise it is clean.
    pub fn sev_deactivate(&mut self, h: Handle) -> Fw<()> {
        self.es_guest(h)?;
        self.deactivate(h).ok_or(SevStatus::Inactive)
    }

    /// Unbind a guest's ASID, dirtying it if the guest ran; `None` if it had none.
    fn deactivate(&mut self, h: Handle) -> Option<()> {
        let g = self.guests.get_mut(&h)?;
        let asid = g.asid.take()?;
        let ran = g.state == GuestState::Running;
        self.asid_owner.remove(&asid);
        if ran {
            self.dirty_asids.insert(asid);
            self.wbinvd_since_deactivate = false;
        }
        Some(())
    }

    /// SEV `DECOMMISSION` (ASPFW sev_mcmd.c `mcmd_decommission_common`): ACTIVE while the
    /// guest's ASID is active (a guest that reached RUNNING, until `DEACTIVATE`); the guest
    /// is gone.
    pub fn sev_decommission(&mut self, h: Handle) -> Fw<()> {
        let g = self.es_guest(h)?;
        if g.asid.is_some() && g.state == GuestState::Running {
            return Err(SevStatus::Active);
        }
        self.remove_guest(h);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rmp::RmpState;

    fn setup() -> (Firmware, Rmp, HostMemory) {
        let mem = HostMemory::new(0x10_0000, 64 << 20);
        let rmp = Rmp::new(mem.end_pfn(), 16);
        (Firmware::new(16, 1), rmp, mem)
    }

    /// A guest launched through SNP_LAUNCH_START with `policy` and activated on ASID 2: the
    /// firmware, RMP, memory and the guest context page.
    fn started_guest(policy: u64) -> (Firmware, Rmp, HostMemory, Pfn) {
        let (mut fw, rmp, mem, gctx) = launch_started(policy);
        fw.snp_activate(&rmp, gctx, 2).unwrap();
        (fw, rmp, mem, gctx)
    }

    /// A guest context through SNP_LAUNCH_START with `policy`, not yet activated.
    fn launch_started(policy: u64) -> (Firmware, Rmp, HostMemory, Pfn) {
        let (mut fw, mut rmp, mut mem) = setup();
        fw.snp_init().unwrap();
        let gctx = fw_page(&mut rmp, &mut mem);
        fw.snp_gctx_create(&mut rmp, gctx).unwrap();
        fw.snp_launch_start(&rmp, gctx, policy, [0; 16]).unwrap();
        (fw, rmp, mem, gctx)
    }

    /// A fresh frame in the pre-guest state (assigned to ASID 2 at `gpa`, immutable), as a
    /// launch update expects its page.
    fn pre_guest(rmp: &mut Rmp, mem: &mut HostMemory, gpa: u64) -> Pfn {
        let p = mem.alloc().unwrap();
        rmp.rmpupdate(
            p,
            RmpState {
                gpa: Gpa(gpa),
                assigned: true,
                immutable: true,
                asid: 2,
                ..RmpState::default()
            },
        )
        .unwrap();
        p
    }

    fn fw_page(rmp: &mut Rmp, mem: &mut HostMemory) -> Pfn {
        let p = mem.alloc().unwrap();
        rmp.rmpupdate(
            p,
            RmpState {
                assigned: true,
                immutable: true,
                ..RmpState::default()
            },
        )
        .unwrap();
        p
    }

    /// An RMP entry with these fields (the rest zero).
    fn rmp_entry(
        assigned: bool,
        asid: u32,
        immutable: bool,
        validated: bool,
        vmsa: bool,
        gpa: u64,
    ) -> RmpEntry {
        RmpEntry {
            assigned,
            asid,
            immutable,
            validated,
            vmsa,
            gpa,
            ..RmpEntry::default()
        }
    }

    #[test]
    fn page_states_follow_the_table() {
        let e = rmp_entry;
        use PageState::*;
        assert_eq!(page_state(false, &RmpEntry::default()), Default);
        assert_eq!(page_state(true, &RmpEntry::default()), Hypervisor);
        assert_eq!(page_state(true, &e(false, 0, true, false, false, 0)), HvFixed);
        assert_eq!(page_state(true, &e(true, 0, true, false, false, 0)), Firmware);
        assert_eq!(page_state(true, &e(true, 0, true, false, true, 0)), Context);
        assert_eq!(
            page_state(true, &e(true, 0, true, false, false, 0x1000 | GPA_STATE_METADATA)),
            Metadata
        );
        assert_eq!(page_state(true, &e(true, 0, false, false, false, 0)), Reclaim);
        assert_eq!(
            page_state(true, &e(true, 3, true, false, false, 0x1000)),
            PreGuest
        );
        assert_eq!(page_state(true, &e(true, 3, true, true, false, 0x1000)), PreSwap);
        assert_eq!(
            page_state(true, &e(true, 3, false, false, false, 0x1000)),
            GuestInvalid
        );
        assert_eq!(
            page_state(true, &e(true, 3, false, true, true, 0x1000)),
            GuestValid
        );
        assert_eq!(page_state(true, &e(false, 3, false, false, false, 0)), Invalid);
    }

    #[test]
    fn snp_guest_lifecycle_and_misuse_codes() {
        let (mut fw, mut rmp, mut mem) = setup();
        let gctx = fw_page(&mut rmp, &mut mem);
        assert_eq!(
            fw.snp_gctx_create(&mut rmp, gctx),
            Err(SevStatus::InvalidPlatformState)
        );
        fw.snp_init().unwrap();
        assert_eq!(fw.snp_init(), Err(SevStatus::InvalidPlatformState));
        let hv = mem.alloc().unwrap();
        assert_eq!(fw.snp_gctx_create(&mut rmp, hv), Err(SevStatus::InvalidPageState));
        fw.snp_gctx_create(&mut rmp, gctx).unwrap();
        assert_eq!(page_state(true, &rmp.entry(gctx)), PageState::Context);
        assert_eq!(
            fw.snp_launch_start(&rmp, hv, 1 << 17, [0; 16]),
            Err(SevStatus::InvalidGuest)
        );
        assert_eq!(
            fw.snp_launch_start(&rmp, gctx, 0, [0; 16]),
            Err(SevStatus::PolicyFailure)
        );
        fw.snp_launch_start(&rmp, gctx, 1 << 17, [0; 16]).unwrap();
        assert_eq!(
            fw.snp_launch_start(&rmp, gctx, 1 << 17, [0; 16]),
            Err(SevStatus::InvalidGuestState)
        );
        let page = mem.alloc().unwrap();
        let pre = RmpState {
            gpa: Gpa(0x3000),
            assigned: true,
            immutable: true,
            asid: 5,
            ..RmpState::default()
        };
        rmp.rmpupdate(page, pre).unwrap();
        assert_eq!(
            fw.snp_launch_update(&mut rmp, &mut mem, gctx, page, SnpPageType::Normal),
            Err(SevStatus::Inactive)
        );
        assert_eq!(fw.snp_activate(&rmp, gctx, 0), Err(SevStatus::InvalidAsid));
        assert_eq!(
            fw.snp_activate(&rmp, gctx, 5),
            Err(SevStatus::InvalidConfig),
            "stale RMP entries"
        );
        fw.snp_activate(&rmp, gctx, 6).unwrap();
        assert_eq!(
            fw.snp_launch_update(&mut rmp, &mut mem, gctx, page, SnpPageType::Normal),
            Err(SevStatus::InvalidPageOwner)
        );
        let mine = mem.alloc().unwrap();
        rmp.rmpupdate(mine, RmpState { asid: 6, ..pre }).unwrap();
        assert_eq!(
            fw.snp_launch_update(&mut rmp, &mut mem, gctx, hv, SnpPageType::Normal),
            Err(SevStatus::InvalidPageState)
        );
        mem.write(mine, &[9; 4096]).unwrap();
        fw.snp_launch_update(&mut rmp, &mut mem, gctx, mine, SnpPageType::Vmsa)
            .unwrap();
        let e = rmp.entry(mine);
        assert!(e.vmsa && e.validated && !e.immutable);
        let mut raw = [0; 4096];
        mem.read(mine, &mut raw).unwrap();
        assert_ne!(raw, [9; 4096], "encrypted in place");
        assert_eq!(
            fw.snp_launch_update(&mut rmp, &mut mem, gctx, mine, SnpPageType::Vmsa),
            Err(SevStatus::InvalidPageState),
            "already launched"
        );
        assert_eq!(fw.launch_digest(Handle(gctx.0)), None, "no digest before finish");
        fw.snp_launch_finish(&rmp, gctx, [0; 32]).unwrap();
        assert_eq!(
            fw.snp_launch_finish(&rmp, gctx, [0; 32]),
            Err(SevStatus::InvalidGuestState)
        );
        let mut want = SnpLaunchDigest::new();
        want.update(Gpa(0x3000), SnpPageType::Vmsa, &[9; 4096]);
        assert_eq!(
            fw.launch_digest(Handle(gctx.0)),
            Some(LaunchDigest::Snp(want.digest()))
        );
        // Debug needs the policy bit.
        let dst = fw_page(&mut rmp, &mut mem);
        assert_eq!(
            fw.snp_dbg_decrypt(&rmp, &mut mem, gctx, mine, dst),
            Err(SevStatus::PolicyFailure)
        );
        // The context page cannot be reclaimed before decommission.
        assert_eq!(
            fw.snp_page_reclaim(&mut rmp, &mem, gctx),
            Err(SevStatus::InvalidPageState)
        );
        assert_eq!(
            fw.snp_page_reclaim(&mut rmp, &mem, Pfn(1)),
            Err(SevStatus::InvalidAddress)
        );
        fw.snp_decommission(&mut rmp, gctx).unwrap();
        assert_eq!(fw.snp_decommission(&mut rmp, gctx), Err(SevStatus::InvalidGuest));
        assert_eq!(page_state(true, &rmp.entry(gctx)), PageState::Firmware);
        fw.snp_page_reclaim(&mut rmp, &mem, gctx).unwrap();
        assert_eq!(page_state(true, &rmp.entry(gctx)), PageState::Reclaim);
        assert_eq!(fw.dirty_asids(), vec![6]);
        assert_eq!(fw.snp_df_flush(), Err(SevStatus::WbinvdRequired));
        fw.note_wbinvd();
        fw.snp_df_flush().unwrap();
        assert!(fw.dirty_asids().is_empty());
    }

    /// The launch digest of a guest whose launch adds one Normal page of 0x5a bytes at 0x1000
    /// (so that the firmware's last-contents cache holds a page first), then `vmsa` as a VMSA
    /// at 0x2000, then `vmsa` again as a Normal page at 0x3000.
    fn digest_with_vmsa(vmsa: &PageBuf) -> Option<LaunchDigest> {
        let (mut fw, mut rmp, mut mem, gctx) = started_guest(1 << 17);
        for (gpa, ty, bytes) in [
            (0x1000, SnpPageType::Normal, &[0x5a; 4096]),
            (0x2000, SnpPageType::Vmsa, vmsa),
            (0x3000, SnpPageType::Normal, vmsa),
        ] {
            let p = pre_guest(&mut rmp, &mut mem, gpa);
            mem.write(p, bytes).unwrap();
            fw.snp_launch_update(&mut rmp, &mut mem, gctx, p, ty).unwrap();
        }
        fw.snp_launch_finish(&rmp, gctx, [0; 32]).unwrap();
        fw.launch_digest(Handle(gctx.0))
    }

    /// amd/AMD-ASPFW sev_mcmd.c `snp_mcmd_launch_update` measures a VMSA as if GUEST_TSC_SCALE
    /// (0x2F0) and GUEST_TSC_OFFSET (0x2F8) were zero; a Normal page's bytes all count.
    #[test]
    fn a_vmsa_is_measured_with_its_tsc_scale_and_offset_as_zero() {
        let mut base = [0x11u8; 4096];
        base[0x2F0..0x300].fill(0);
        let mut tsc = base;
        tsc[0x2F0..0x2F8].copy_from_slice(&0x1_0000_0000u64.to_le_bytes());
        tsc[0x2F8..0x300].copy_from_slice(&0xdead_beefu64.to_le_bytes());
        let mut other = base;
        other[0x2E8] ^= 1;
        let mut after = base;
        after[0x300] ^= 1;
        // The Normal copy at 0x3000 measures every byte: make the VMSA the only difference.
        let digest_vmsa_only = |vmsa: &PageBuf| {
            let (mut fw, mut rmp, mut mem, gctx) = started_guest(1 << 17);
            let p = pre_guest(&mut rmp, &mut mem, 0x2000);
            mem.write(p, vmsa).unwrap();
            fw.snp_launch_update(&mut rmp, &mut mem, gctx, p, SnpPageType::Vmsa)
                .unwrap();
            fw.snp_launch_finish(&rmp, gctx, [0; 32]).unwrap();
            fw.launch_digest(Handle(gctx.0))
        };
        assert_eq!(digest_vmsa_only(&base), digest_vmsa_only(&tsc));
        assert_ne!(digest_vmsa_only(&base), digest_vmsa_only(&other));
        assert_ne!(digest_vmsa_only(&base), digest_vmsa_only(&after));
        let mut want = SnpLaunchDigest::new();
        want.update(Gpa(0x2000), SnpPageType::Vmsa, &base);
        assert_eq!(digest_vmsa_only(&tsc), Some(LaunchDigest::Snp(want.digest())));
        // The same bytes as a Normal page right after the VMSA are hashed whole (the cache of
        // the last page's hash does not hand the VMSA's hash on).
        let mut want = SnpLaunchDigest::new();
        want.update(Gpa(0x1000), SnpPageType::Normal, &[0x5a; 4096]);
        want.update(Gpa(0x2000), SnpPageType::Vmsa, &base);
        want.update(Gpa(0x3000), SnpPageType::Normal, &tsc);
        assert_eq!(digest_with_vmsa(&tsc), Some(LaunchDigest::Snp(want.digest())));
        assert_ne!(digest_with_vmsa(&tsc), digest_with_vmsa(&base));
    }

    #[test]
    fn debug_decrypt_returns_the_plaintext_and_cpuid_pages_are_checked() {
        let (mut fw, mut rmp, mut mem, gctx) = started_guest((1 << 17) | (1 << 19));
        let mut pre = |gpa: u64| pre_guest(&mut rmp, &mut mem, gpa);
        let data = pre(0x1000);
        let cpuid = pre(0x2000);
        mem.write(data, &[0x42; 4096]).unwrap();
        let mut bad = [0u8; 4096];
        bad[0..4].copy_from_slice(&65u32.to_le_bytes());
        mem.write(cpuid, &bad).unwrap();
        fw.snp_launch_update(&mut rmp, &mut mem, gctx, data, SnpPageType::Normal)
            .unwrap();
        assert_eq!(
            fw.snp_launch_update(&mut rmp, &mut mem, gctx, cpuid, SnpPageType::Cpuid),
            Err(SevStatus::InvalidParam)
        );
        let mut back = [0u8; 4096];
        mem.read(cpuid, &mut back).unwrap();
        assert_eq!(&back[0..4], &65u32.to_le_bytes(), "refused without a write-back");
        assert_eq!(page_state(true, &rmp.entry(cpuid)), PageState::PreGuest);
        let dst = fw_page(&mut rmp, &mut mem);
        assert_eq!(
            fw.snp_dbg_decrypt(&rmp, &mut mem, gctx, data, data),
            Err(SevStatus::InvalidPageState),
            "destination must be a firmware page"
        );
        fw.snp_dbg_decrypt(&rmp, &mut mem, gctx, data, dst).unwrap();
        mem.read(dst, &mut back).unwrap();
        assert_eq!(back, [0x42; 4096]);
    }

    #[test]
    fn sev_launch_update_data_measures_and_encrypts_exactly_its_range() {
        let (mut fw, _rmp, mut mem) = setup();
        fw.snp_init().unwrap();
        let h = fw.sev_launch_start(0).unwrap();
        fw.sev_activate(h, 3).unwrap();
        let p = mem.alloc().unwrap();
        let mut plain = [1u8; 4096];
        plain[0x10..0xc0].fill(7);
        mem.write(p, &plain).unwrap();
        fw.sev_launch_update_range(&mut mem, h, p, 0x10, 176).unwrap();
        assert_eq!(
            fw.sev_launch_update_range(&mut mem, h, p, 4000, 100),
            Err(SevStatus::InvalidLen)
        );
        fw.sev_launch_finish(h).unwrap();
        let mut want = SevEsLaunchDigest::new();
        want.update(&[7; 176]);
        assert_eq!(fw.launch_digest(h), Some(LaunchDigest::SevEs(want.digest())));
        let mut back = [0; 4096];
        mem.read(p, &mut back).unwrap();
        assert_eq!(back[..0x10], plain[..0x10]);
        assert_ne!(back[0x10..0xc0], plain[0x10..0xc0]);
        assert_eq!(back[0xc0..], plain[0xc0..]);
    }

    #[test]
    fn sev_es_launch() {
        let (mut fw, _rmp, mut mem) = setup();
        fw.snp_init().unwrap();
        let h = fw.sev_launch_start(0).unwrap();
        let p = mem.alloc().unwrap();
        mem.write(p, &[1; 4096]).unwrap();
        assert_eq!(fw.sev_launch_update(&mut mem, h, p), Err(SevStatus::Inactive));
        fw.sev_activate(h, 3).unwrap();
        let other = fw.sev_launch_start(1).unwrap();
        assert_eq!(fw.sev_activate(other, 3), Err(SevStatus::AsidOwned));
        fw.sev_launch_update(&mut mem, h, p).unwrap();
        fw.sev_launch_finish(h).unwrap();
        assert_eq!(
            fw.sev_launch_update(&mut mem, h, p),
            Err(SevStatus::InvalidGuestState)
        );
        let mut want = SevEsLaunchDigest::new();
        want.update(&[1; 4096]);
        assert_eq!(fw.launch_digest(h), Some(LaunchDigest::SevEs(want.digest())));
        let mut out = [0; 4096];
        fw.sev_dbg_decrypt(&mem, h, p, &mut out).unwrap();
        assert_eq!(out, [1; 4096]);
        assert!(fw.key_for_asid(3).is_some());
        fw.sev_deactivate(h).unwrap();
        fw.sev_decommission(h).unwrap();
        assert!(fw.key_for_asid(3).is_none());
        assert_eq!(fw.sev_launch_finish(h), Err(SevStatus::InvalidGuest));
    }
    #[test]
    fn launch_update_and_dbg_decrypt_check_page_states_then_owner_then_guest_as_aspfw() {
        // ASPFW sev_mcmd.c snp_mcmd_launch_update: page state, page size, then guest state,
        // INACTIVE, owner; snp_mcmd_dbg_decrypt: page states, owner, policy, INACTIVE.
        let (mut fw, mut rmp, mut mem, gctx) = launch_started(1 << 17);
        let hv = mem.alloc().unwrap();
        assert_eq!(
            fw.snp_launch_update(&mut rmp, &mut mem, gctx, hv, SnpPageType::Normal),
            Err(SevStatus::InvalidPageState),
            "before ACTIVATE: the page state is checked before INACTIVE"
        );
        fw.snp_activate(&rmp, gctx, 2).unwrap();
        fw.snp_launch_finish(&rmp, gctx, [0; 32]).unwrap();
        assert_eq!(
            fw.snp_launch_update(&mut rmp, &mut mem, gctx, hv, SnpPageType::Normal),
            Err(SevStatus::InvalidPageState),
            "after LAUNCH_FINISH: the page state is checked before the guest state"
        );
        // Another ASID's guest page: INVALID_PAGE_OWNER, before the policy (no DEBUG bit).
        let other = mem.alloc().unwrap();
        rmp.rmpupdate(
            other,
            RmpState {
                gpa: Gpa(0x1000),
                assigned: true,
                asid: 3,
                ..RmpState::default()
            },
        )
        .unwrap();
        let dst = fw_page(&mut rmp, &mut mem);
        assert_eq!(
            fw.snp_dbg_decrypt(&rmp, &mut mem, gctx, other, dst),
            Err(SevStatus::InvalidPageOwner)
        );
        assert_eq!(
            fw.snp_dbg_decrypt(&rmp, &mut mem, gctx, hv, dst),
            Err(SevStatus::InvalidPageState),
            "the page states come before the policy"
        );
    }
    #[test]
    fn snp_activate_of_an_active_guest_is_active_after_the_invalid_config_scan() {
        // ASPFW sev_mcmd.c snp_mcmd_activate: the RMP scan (INVALID_CONFIG) runs first, then
        // mcmd_activate_common: INVALID_ASID, ASID_OWNED, ACTIVE.
        let (mut fw, mut rmp, mut mem, gctx) = launch_started(1 << 17);
        fw.snp_activate(&rmp, gctx, 2).unwrap();
        assert_eq!(fw.snp_activate(&rmp, gctx, 4), Err(SevStatus::Active));
        assert!(fw.key_for_asid(4).is_none(), "the new ASID is not bound");
        assert_eq!(fw.snp_activate(&rmp, gctx, 2), Err(SevStatus::AsidOwned));
        let p = mem.alloc().unwrap();
        rmp.rmpupdate(
            p,
            RmpState {
                assigned: true,
                asid: 4,
                ..RmpState::default()
            },
        )
        .unwrap();
        assert_eq!(
            fw.snp_activate(&rmp, gctx, 4),
            Err(SevStatus::InvalidConfig),
            "the scan comes first"
        );
    }
    #[test]
    fn page_states_follow_aspfw_rmp_entry_get_state_and_reclaim_succeeds_when_mutable() {
        // ASPFW sev_rmp.c rmp_entry_get_state; sev_mcmd.c snp_mcmd_page_reclaim returns
        // SUCCESS for any entry with Immutable = 0 before looking at the state.
        let e = rmp_entry;
        use PageState::*;
        let st = |e: RmpEntry| page_state(true, &e);
        assert_eq!(
            st(e(false, 0, false, false, true, 0x5000)),
            Hypervisor,
            "VMSA/GPA: don't care"
        );
        assert_eq!(
            st(e(true, 3, false, false, true, 0x1000)),
            GuestInvalid,
            "VMSA: don't care"
        );
        assert_eq!(st(e(true, 0, false, false, true, 0x1000)), Reclaim);
        assert_eq!(
            st(e(false, 0, true, true, false, 0)),
            Invalid,
            "HV-Fixed needs Validated 0"
        );
        assert_eq!(
            st(e(true, 0, true, true, true, 0)),
            Invalid,
            "Context needs Validated 0"
        );
        assert_eq!(
            st(e(true, 0, true, false, false, 0x1000)),
            Invalid,
            "no GPA-state bits"
        );
        assert_eq!(
            st(e(true, 0, true, false, false, 0x1000 | GPA_STATE_METADATA)),
            Metadata
        );
        assert_eq!(
            st(e(true, 0, true, false, false, 0x1000 | GPA_STATE_FW_IOMMU)),
            FirmwareIommu
        );
        // make_vmsa + PVALIDATE rescind: Guest-Invalid with the VMSA bit; reclaim succeeds.
        let (mut fw, mut rmp, mut mem) = setup();
        fw.snp_init().unwrap();
        let p = mem.alloc().unwrap();
        rmp.rmpupdate(
            p,
            RmpState {
                gpa: Gpa(0x2000),
                assigned: true,
                asid: 1,
                ..RmpState::default()
            },
        )
        .unwrap();
        rmp.firmware_set(p, |e| e.vmsa = true);
        assert_eq!(fw.snp_page_reclaim(&mut rmp, &mem, p), Ok(()));
        // A Metadata page reclaims to Reclaim, keeping its GPA without the state bits.
        let md = fw_page(&mut rmp, &mut mem);
        rmp.firmware_set(md, |e| e.gpa = 0x7000 | GPA_STATE_METADATA);
        fw.snp_page_reclaim(&mut rmp, &mem, md).unwrap();
        assert_eq!((st(rmp.entry(md)), rmp.entry(md).gpa), (Reclaim, 0x7000));
    }
    #[test]
    fn cpuid_page_over_64_entries_is_refused_unwritten_and_entry_checks_run() {
        // ASPFW sev_mcmd.c snp_mcmd_launch_update: header reserved fields and count > 64 are
        // INVALID_PARAM without a write; sanitize_cpuid_list fails an entry with a non-zero
        // reserved field in the standard or extended range.
        let (mut fw, mut rmp, mut mem, gctx) = started_guest(1 << 17);
        let mut pre = |gpa: u64| pre_guest(&mut rmp, &mut mem, gpa);
        let pages: Vec<Pfn> = (1..=4).map(|i| pre(i << 12)).collect();
        let cpuid = |count: u32, hdr_rsvd: u32, leaf: u32, entry_rsvd: u64| {
            let mut b = [0u8; 4096];
            b[0..4].copy_from_slice(&count.to_le_bytes());
            b[4..8].copy_from_slice(&hdr_rsvd.to_le_bytes());
            b[16..20].copy_from_slice(&leaf.to_le_bytes());
            b[56..64].copy_from_slice(&entry_rsvd.to_le_bytes());
            b
        };
        let cases = [
            (cpuid(65, 0, 0, 0), Err(SevStatus::InvalidParam)),
            (cpuid(1, 1, 0, 0), Err(SevStatus::InvalidParam)),
            (cpuid(1, 0, 0x8000_0001, 5), Err(SevStatus::InvalidParam)),
            (cpuid(1, 0, 0x4000_0000, 5), Ok(())),
        ];
        for (&p, (page, want)) in pages.iter().zip(cases) {
            mem.write(p, &page).unwrap();
            let got = fw.snp_launch_update(&mut rmp, &mut mem, gctx, p, SnpPageType::Cpuid);
            assert_eq!(got, want);
            if want.is_err() {
                let mut back = [0u8; 4096];
                mem.read(p, &mut back).unwrap();
                assert!(back == page, "not corrected, plaintext");
                assert_eq!(page_state(true, &rmp.entry(p)), PageState::PreGuest);
            }
        }
    }
    #[test]
    fn sev_es_decommission_of_an_active_guest_is_active_until_deactivate_and_dirties_only_a_guest_that_ran() {
        // ASPFW sev_mcmd.c mcmd_decommission_common: ACTIVE while the ASID is active;
        // sev_mcmd_deactivate: in-use (Running) CCXs become dirty, allocated ones clean.
        let (mut fw, _rmp, _mem) = setup();
        fw.snp_init().unwrap();
        let h = fw.sev_launch_start(0).unwrap();
        fw.sev_activate(h, 3).unwrap();
        fw.sev_launch_finish(h).unwrap();
        assert_eq!(fw.sev_decommission(h), Err(SevStatus::Active));
        fw.sev_deactivate(h).unwrap();
        assert_eq!(fw.sev_deactivate(h), Err(SevStatus::Inactive));
        fw.sev_decommission(h).unwrap();
        assert_eq!(fw.dirty_asids(), vec![3]);
        // Activated but never running: decommission works and the ASID stays clean.
        let h = fw.sev_launch_start(0).unwrap();
        fw.sev_activate(h, 4).unwrap();
        fw.sev_decommission(h).unwrap();
        assert_eq!(fw.dirty_asids(), vec![3]);
    }
}
