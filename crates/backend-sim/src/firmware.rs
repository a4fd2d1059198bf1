//! The AMD Secure Processor (PSP) firmware: platform state, guest contexts, page states and
//! the SEV-SNP and SEV-ES commands the VMSA lifecycle uses.
//!
//! Sources: SEV-SNP Firmware ABI (pub. 56860) chapter 5 (page states) and chapter 8 (commands),
//! as summarised in rmp-and-costs.md §1.3 (page states), §1.6 (command preconditions and
//! transitions) and §1.7 (status codes); SEV API (pub. 55766) §6 for the SEV-ES launch. Every
//! command checks its preconditions in the order the table gives and returns the ABI status
//! code of the first one that fails; it changes nothing when it fails.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;
use vmsa_core::{Gpa, PAGE_SIZE, PageBuf, Pfn, SevStatus, SnpPageType, VmKind};

use crate::crypto::{GuestKey, KeySource};
use crate::measure::{LaunchDigest, SevEsLaunchDigest, SnpLaunchDigest};
use crate::memory::HostMemory;
use crate::rmp::{PageSize, Rmp, RmpEntry};

/// A frame's state as the firmware sees it (SNP ABI chapter 5; ASPFW `rmp_entry_get_state`,
/// rmp-and-costs.md §1.3).
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

/// The state of an entry (`covered` false gives `Default`).
pub fn page_state(covered: bool, e: &RmpEntry) -> PageState {
    use PageState::*;
    if !covered {
        return Default;
    }
    match (e.assigned, e.asid, e.immutable) {
        (false, 0, false) if !e.validated && !e.vmsa => Hypervisor,
        (false, 0, true) => HvFixed,
        (false, _, _) => Invalid,
        (true, 0, true) if e.gpa == 0 && e.vmsa => Context,
        (true, 0, true) if e.gpa == 0 && !e.validated => Firmware,
        (true, 0, true) if e.gpa != 0 => Metadata,
        (true, 0, false) if !e.validated && !e.vmsa => Reclaim,
        (true, 0, _) => Invalid,
        (true, _, true) if e.validated => PreSwap,
        (true, _, true) => PreGuest,
        (true, _, false) if e.validated => GuestValid,
        (true, _, false) if !e.vmsa => GuestInvalid,
        (true, _, false) => Invalid,
    }
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
    Snp(SnpLaunchDigest),
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
    key: Option<GuestKey>,
    digest: Digest,
}

/// Bit 17 of an SNP guest policy must be one (SNP ABI §4.3).
const SNP_POLICY_MBO: u64 = 1 << 17;
/// Bit 19 of an SNP guest policy: debugging allowed.
const SNP_POLICY_DEBUG: u64 = 1 << 19;
/// Bit 0 of an SEV policy: debugging forbidden.
const SEV_POLICY_NODBG: u64 = 1 << 0;
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
            Digest::Snp(d) => LaunchDigest::Snp(d.digest()),
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
                key: None,
                digest: Digest::Snp(SnpLaunchDigest::new()),
            },
        );
        Ok(h)
    }

    /// `SNP_LAUNCH_START` (SNP ABI §8.16): INIT → LAUNCH with a fresh key and an empty digest.
    pub fn snp_launch_start(&mut self, rmp: &Rmp, gctx: Pfn, policy: u64) -> Fw<()> {
        let key = self.keys.generate();
        let g = self.snp_guest(rmp, gctx)?;
        if g.state != GuestState::Init {
            return Err(SevStatus::InvalidGuestState);
        }
        if policy & SNP_POLICY_MBO == 0 {
            return Err(SevStatus::PolicyFailure);
        }
        g.policy = policy;
        g.key = Some(key);
        g.state = GuestState::Launch;
        Ok(())
    }

    fn bind_asid(&mut self, h: Handle, asid: u32, rmp: &Rmp) -> Fw<()> {
        if asid == 0 || asid > self.max_asid {
            return Err(SevStatus::InvalidAsid);
        }
        match self.asid_owner.get(&asid) {
            Some(o) if *o != h => return Err(SevStatus::AsidOwned),
            _ => {}
        }
        if self.dirty_asids.contains(&asid) {
            return Err(SevStatus::DfflushRequired);
        }
        let g = self.guests.get_mut(&h).ok_or(SevStatus::InvalidGuest)?;
        if g.asid.is_none() && g.kind == VmKind::Snp && rmp.asid_pages(asid) > 0 {
            return Err(SevStatus::InvalidConfig);
        }
        g.asid = Some(asid);
        self.asid_owner.insert(asid, h);
        Ok(())
    }

    /// `SNP_ACTIVATE` (SNP ABI §8.9): bind an ASID. INVALID_ASID out of range, ASID_OWNED if
    /// another guest has it, DFFLUSH_REQUIRED if it is dirty, INVALID_CONFIG if RMP entries
    /// still carry it.
    pub fn snp_activate(&mut self, rmp: &Rmp, gctx: Pfn, asid: u32) -> Fw<()> {
        let g = self.snp_guest(rmp, gctx)?;
        if !matches!(g.state, GuestState::Launch | GuestState::Running) {
            return Err(SevStatus::InvalidGuestState);
        }
        self.bind_asid(Handle(gctx.0), asid, rmp)
    }

    /// `SNP_LAUNCH_UPDATE` of one 4 KiB page (SNP ABI §8.17): the page must be Pre-Guest of the
    /// guest's ASID at `gpa`; it is measured (through [`SnpLaunchDigest`]), encrypted in place
    /// and becomes Guest-Valid (with the VMSA bit for a VMSA page). A CPUID page with more
    /// than 64 entries is refused with INVALID_PARAM and written back corrected, in plaintext.
    pub fn snp_launch_update(
        &mut self,
        rmp: &mut Rmp,
        mem: &mut HostMemory,
        gctx: Pfn,
        pfn: Pfn,
        gpa: Gpa,
        page_type: SnpPageType,
    ) -> Fw<()> {
        let secrets = self.keys.bytes(b"backend-sim secrets page");
        let g = self.snp_guest(rmp, gctx)?;
        if g.state != GuestState::Launch {
            return Err(SevStatus::InvalidGuestState);
        }
        let asid = g.asid.ok_or(SevStatus::Inactive)?;
        if !mem.contains(pfn) || !rmp.covered(pfn) || !gpa.is_page_aligned() {
            return Err(SevStatus::InvalidAddress);
        }
        let e = rmp.entry(pfn);
        if page_state(true, &e) != PageState::PreGuest {
            return Err(SevStatus::InvalidPageState);
        }
        if e.asid != asid {
            return Err(SevStatus::InvalidPageOwner);
        }
        if e.page_size != PageSize::Size4K {
            return Err(SevStatus::InvalidPageSize);
        }
        if e.gpa != gpa.0 {
            return Err(SevStatus::InvalidParam);
        }
        let mut page = [0u8; PAGE_SIZE as usize];
        mem.read(pfn, &mut page).map_err(|_| SevStatus::InvalidAddress)?;
        match page_type {
            SnpPageType::Zero => page.fill(0),
            SnpPageType::Secrets => {
                // SNP ABI §8.17.2.5: the firmware fills the secrets page (version, VMPCKs, ...).
                page.fill(0);
                page[0..4].copy_from_slice(&2u32.to_le_bytes());
                for (i, chunk) in page[0x20..0xa0].chunks_exact_mut(32).enumerate() {
                    chunk.copy_from_slice(&secrets);
                    chunk[0] ^= i as u8;
                }
            }
            SnpPageType::Cpuid => {
                let count = u32::from_le_bytes([page[0], page[1], page[2], page[3]]);
                if count > CPUID_COUNT_MAX {
                    page[0..4].copy_from_slice(&CPUID_COUNT_MAX.to_le_bytes());
                    mem.write(pfn, &page).map_err(|_| SevStatus::InvalidAddress)?;
                    return Err(SevStatus::InvalidParam);
                }
            }
            _ => {}
        }
        let Digest::Snp(d) = &mut g.digest else {
            return Err(SevStatus::InvalidGuest);
        };
        d.update(gpa, page_type, &page);
        let key = g.key.as_ref().ok_or(SevStatus::InvalidGuestState)?;
        key.encrypt(pfn, &mut page);
        mem.write(pfn, &page).map_err(|_| SevStatus::InvalidAddress)?;
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

    /// `SNP_PAGE_RECLAIM` (SNP ABI §8.24): Firmware/Metadata → Reclaim, Pre-Guest →
    /// Guest-Invalid, Pre-Swap → Guest-Valid; pages that are already mutable succeed without
    /// change; a Context or HV-Fixed page is INVALID_PAGE_STATE; an address outside the RMP or
    /// DRAM is INVALID_ADDRESS.
    pub fn snp_page_reclaim(&mut self, rmp: &mut Rmp, mem: &HostMemory, pfn: Pfn) -> Fw<()> {
        self.platform()?;
        if !mem.contains(pfn) || !rmp.covered(pfn) {
            return Err(SevStatus::InvalidAddress);
        }
        let e = rmp.entry(pfn);
        if e.page_size != PageSize::Size4K {
            return Err(SevStatus::InvalidPageSize);
        }
        match page_state(true, &e) {
            PageState::Firmware | PageState::Metadata => rmp.firmware_set(pfn, |e| {
                e.immutable = false;
                e.gpa = 0;
                e.vmsa = false;
            }),
            PageState::PreGuest | PageState::PreSwap => rmp.firmware_set(pfn, |e| e.immutable = false),
            PageState::Hypervisor | PageState::Reclaim | PageState::GuestInvalid | PageState::GuestValid => {}
            _ => return Err(SevStatus::InvalidPageState),
        }
        Ok(())
    }

    /// `SNP_DECOMMISSION` (SNP ABI §8.8): the guest is gone, its ASID becomes dirty (WBINVD and
    /// DF_FLUSH before reuse) and the context page returns to the Firmware state.
    pub fn snp_decommission(&mut self, rmp: &mut Rmp, gctx: Pfn) -> Fw<()> {
        self.snp_guest(rmp, gctx)?;
        self.remove_guest(Handle(gctx.0));
        rmp.firmware_set(gctx, |e| e.vmsa = false);
        Ok(())
    }

    fn remove_guest(&mut self, h: Handle) {
        if let Some(g) = self.guests.remove(&h)
            && let Some(asid) = g.asid
        {
            self.asid_owner.remove(&asid);
            self.dirty_asids.insert(asid);
            self.wbinvd_since_deactivate = false;
        }
    }

    /// `SNP_DBG_DECRYPT` (SNP ABI §8.21): decrypt one guest page into a Firmware page. Needs
    /// the DEBUG policy bit (POLICY_FAILURE); the source must be a page of the guest
    /// (Pre-Guest, Pre-Swap, Guest-Invalid/Valid of its ASID) and the destination a Firmware
    /// page (INVALID_PAGE_STATE).
    pub fn snp_dbg_decrypt(
        &mut self,
        rmp: &Rmp,
        mem: &mut HostMemory,
        gctx: Pfn,
        src: Pfn,
        dst: Pfn,
    ) -> Fw<()> {
        let g = self.snp_guest(rmp, gctx)?;
        if g.policy & SNP_POLICY_DEBUG == 0 {
            return Err(SevStatus::PolicyFailure);
        }
        let asid = g.asid.ok_or(SevStatus::Inactive)?;
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
        if !guest_page || se.asid != asid {
            return Err(SevStatus::InvalidPageState);
        }
        if page_state(true, &rmp.entry(dst)) != PageState::Firmware {
            return Err(SevStatus::InvalidPageState);
        }
        let key = g.key.as_ref().ok_or(SevStatus::InvalidGuestState)?;
        let mut page = [0u8; PAGE_SIZE as usize];
        mem.read(src, &mut page).map_err(|_| SevStatus::InvalidAddress)?;
        key.decrypt(src, &mut page);
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
                key: Some(key),
                digest: Digest::SevEs(SevEsLaunchDigest::new()),
            },
        );
        Ok(h)
    }

    /// SEV `ACTIVATE` (SEV API §6.10): bind an ASID (same rules as SNP_ACTIVATE).
    pub fn sev_activate(&mut self, rmp: &Rmp, h: Handle, asid: u32) -> Fw<()> {
        self.es_guest(h)?;
        self.bind_asid(h, asid, rmp)
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
        mem.read(src, out).map_err(|_| SevStatus::InvalidAddress)?;
        key.decrypt(src, out);
        Ok(())
    }

    /// SEV `DECOMMISSION` (after `DEACTIVATE`): the guest is gone and its ASID dirty.
    pub fn sev_decommission(&mut self, h: Handle) -> Fw<()> {
        self.es_guest(h)?;
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

    #[test]
    fn page_states_follow_the_table() {
        let e = |assigned, asid, immutable, validated, vmsa, gpa| RmpEntry {
            assigned,
            asid,
            immutable,
            validated,
            vmsa,
            gpa,
            ..RmpEntry::default()
        };
        use PageState::*;
        assert_eq!(page_state(false, &RmpEntry::default()), Default);
        assert_eq!(page_state(true, &RmpEntry::default()), Hypervisor);
        assert_eq!(page_state(true, &e(false, 0, true, false, false, 0)), HvFixed);
        assert_eq!(page_state(true, &e(true, 0, true, false, false, 0)), Firmware);
        assert_eq!(page_state(true, &e(true, 0, true, false, true, 0)), Context);
        assert_eq!(
            page_state(true, &e(true, 0, true, false, false, 0x1000)),
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
            fw.snp_launch_start(&rmp, hv, 1 << 17),
            Err(SevStatus::InvalidGuest)
        );
        assert_eq!(fw.snp_launch_start(&rmp, gctx, 0), Err(SevStatus::PolicyFailure));
        fw.snp_launch_start(&rmp, gctx, 1 << 17).unwrap();
        assert_eq!(
            fw.snp_launch_start(&rmp, gctx, 1 << 17),
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
            fw.snp_launch_update(&mut rmp, &mut mem, gctx, page, Gpa(0x3000), SnpPageType::Normal),
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
            fw.snp_launch_update(&mut rmp, &mut mem, gctx, page, Gpa(0x3000), SnpPageType::Normal),
            Err(SevStatus::InvalidPageOwner)
        );
        let mine = mem.alloc().unwrap();
        rmp.rmpupdate(mine, RmpState { asid: 6, ..pre }).unwrap();
        assert_eq!(
            fw.snp_launch_update(&mut rmp, &mut mem, gctx, mine, Gpa(0x4000), SnpPageType::Normal),
            Err(SevStatus::InvalidParam)
        );
        assert_eq!(
            fw.snp_launch_update(&mut rmp, &mut mem, gctx, hv, Gpa(0x3000), SnpPageType::Normal),
            Err(SevStatus::InvalidPageState)
        );
        mem.write(mine, &[9; 4096]).unwrap();
        fw.snp_launch_update(&mut rmp, &mut mem, gctx, mine, Gpa(0x3000), SnpPageType::Vmsa)
            .unwrap();
        let e = rmp.entry(mine);
        assert!(e.vmsa && e.validated && !e.immutable);
        let mut raw = [0; 4096];
        mem.read(mine, &mut raw).unwrap();
        assert_ne!(raw, [9; 4096], "encrypted in place");
        assert_eq!(
            fw.snp_launch_update(&mut rmp, &mut mem, gctx, mine, Gpa(0x3000), SnpPageType::Vmsa),
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

    #[test]
    fn debug_decrypt_returns_the_plaintext_and_cpuid_pages_are_checked() {
        let (mut fw, mut rmp, mut mem) = setup();
        fw.snp_init().unwrap();
        let gctx = fw_page(&mut rmp, &mut mem);
        fw.snp_gctx_create(&mut rmp, gctx).unwrap();
        fw.snp_launch_start(&rmp, gctx, (1 << 17) | (1 << 19)).unwrap();
        fw.snp_activate(&rmp, gctx, 2).unwrap();
        let mut pre = |gpa: u64| {
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
        };
        let data = pre(0x1000);
        let cpuid = pre(0x2000);
        mem.write(data, &[0x42; 4096]).unwrap();
        let mut bad = [0u8; 4096];
        bad[0..4].copy_from_slice(&65u32.to_le_bytes());
        mem.write(cpuid, &bad).unwrap();
        fw.snp_launch_update(&mut rmp, &mut mem, gctx, data, Gpa(0x1000), SnpPageType::Normal)
            .unwrap();
        assert_eq!(
            fw.snp_launch_update(&mut rmp, &mut mem, gctx, cpuid, Gpa(0x2000), SnpPageType::Cpuid),
            Err(SevStatus::InvalidParam)
        );
        let mut back = [0u8; 4096];
        mem.read(cpuid, &mut back).unwrap();
        assert_eq!(&back[0..4], &64u32.to_le_bytes(), "corrected in plaintext");
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
        let (mut fw, rmp, mut mem) = setup();
        fw.snp_init().unwrap();
        let h = fw.sev_launch_start(0).unwrap();
        fw.sev_activate(&rmp, h, 3).unwrap();
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
        let (mut fw, rmp, mut mem) = setup();
        fw.snp_init().unwrap();
        let h = fw.sev_launch_start(0).unwrap();
        let p = mem.alloc().unwrap();
        mem.write(p, &[1; 4096]).unwrap();
        assert_eq!(fw.sev_launch_update(&mut mem, h, p), Err(SevStatus::Inactive));
        fw.sev_activate(&rmp, h, 3).unwrap();
        let other = fw.sev_launch_start(1).unwrap();
        assert_eq!(fw.sev_activate(&rmp, other, 3), Err(SevStatus::AsidOwned));
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
        fw.sev_decommission(h).unwrap();
        assert!(fw.key_for_asid(3).is_none());
        assert_eq!(fw.sev_launch_finish(h), Err(SevStatus::InvalidGuest));
    }
}
