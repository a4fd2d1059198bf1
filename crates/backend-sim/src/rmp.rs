//! The Reverse Map Table and the instructions that change it (AMD APM vol. 2, pub. 24593,
//! §15.36; entry fields per Linux arch/x86/virt/svm/sev.c `struct rmpentry_raw` and AMD-ASPFW
//! sev_rmp.h `rmp_fields_t`).
//!
//! One entry per 4 KiB system-physical frame, stored sparsely: a frame without a stored entry
//! is hypervisor-owned (all fields zero). A 2 MiB entry is stored once, at its 2 MiB-aligned
//! frame, and describes the whole region (its 511 other frames read as that entry with
//! consecutive GPAs). A per-region count of assigned 4 KiB entries (the firmware's "subpage
//! count") makes the 2 MiB overlap check O(1), and a per-ASID count tells the firmware whether
//! an ASID still owns pages (`SNP_ACTIVATE`'s INVALID_CONFIG rule).

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use vmsa_core::{Gpa, PAGE_SIZE, PTRS_PER_PMD, Pfn};

/// RMP page size (`Page_Size`, qword 0 bit 1): vmsa-core's page level.
pub type PageSize = vmsa_core::PageLevel;

/// VMPL permission bits (qword 1, one byte per VMPL): read, write, execute-user,
/// execute-supervisor, supervisor shadow stack.
pub mod perm {
    /// Read.
    pub const READ: u8 = 1 << 0;
    /// Write.
    pub const WRITE: u8 = 1 << 1;
    /// Execute, user mode.
    pub const EXEC_USER: u8 = 1 << 2;
    /// Execute, supervisor mode.
    pub const EXEC_SUPERVISOR: u8 = 1 << 3;
    /// Supervisor shadow stack.
    pub const SUPERVISOR_SHADOW_STACK: u8 = 1 << 4;
    /// Every permission (what VMPL0 always has on a validated page).
    pub const ALL: u8 = 0x1f;
}

/// One RMP entry, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RmpEntry {
    /// Owned by a guest or the firmware.
    pub assigned: bool,
    /// Page size of the entry.
    pub page_size: PageSize,
    /// Only the firmware may change it.
    pub immutable: bool,
    /// Set by PVALIDATE (or the firmware).
    pub validated: bool,
    /// The page is a VMSA.
    pub vmsa: bool,
    /// Owning ASID (0: hypervisor or firmware).
    pub asid: u32,
    /// The guest-physical address the page is mapped at (page aligned).
    pub gpa: u64,
    /// Permission bytes of VMPL0..3.
    pub vmpl_perms: [u8; 4],
}

impl RmpEntry {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// The input of `RMPUPDATE` (Linux `struct rmp_state`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RmpState {
    /// GPA to record (page aligned; 2 MiB aligned for a 2 MiB update).
    pub gpa: Gpa,
    /// Assigned.
    pub assigned: bool,
    /// Page size.
    pub page_size: PageSize,
    /// Immutable.
    pub immutable: bool,
    /// ASID.
    pub asid: u32,
}

/// The RMP instructions' failure return codes in RAX (APM §15.36; Linux `asm/sev.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[repr(u8)]
pub enum RmpRet {
    /// Bad alignment, reserved bits, size, or an address the RMP does not cover.
    FailInput = 1,
    /// Immutable entry, caller not allowed, or permissions not a subset.
    FailPermission = 2,
    /// Entry or region in use (a running VMSA, or locked).
    FailInuse = 3,
    /// A 2 MiB entry over assigned 4 KiB entries or the reverse.
    FailOverlap = 4,
    /// A 2 MiB request on a 4 KiB entry.
    FailSizeMismatch = 6,
    /// PSMASH of an entry that is not 2 MiB.
    FailBadAddr = 7,
}

impl RmpRet {
    /// Every code, for parsing.
    pub const ALL: [RmpRet; 6] = [
        Self::FailInput,
        Self::FailPermission,
        Self::FailInuse,
        Self::FailOverlap,
        Self::FailSizeMismatch,
        Self::FailBadAddr,
    ];

    /// The name as in Linux (`FAIL_INPUT`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::FailInput => "FAIL_INPUT",
            Self::FailPermission => "FAIL_PERMISSION",
            Self::FailInuse => "FAIL_INUSE",
            Self::FailOverlap => "FAIL_OVERLAP",
            Self::FailSizeMismatch => "FAIL_SIZEMISMATCH",
            Self::FailBadAddr => "FAIL_BADADDR",
        }
    }

    /// The code from its name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == s)
    }
}

impl std::fmt::Display for RmpRet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), *self as u8)
    }
}

/// What a guest instruction or access ran into besides a return code (APM §15.36.10 and
/// table 15-39): a nested page fault to the hypervisor or a #VC to the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum GuestFault {
    /// `#VMEXIT(NPF)` with the RMP bit (and SIZEM for a page-size mismatch).
    Npf {
        /// The guest address.
        gpa: u64,
        /// EXITINFO1 SIZEM bit: the access size does not match the RMP page size.
        sizem: bool,
        /// The check that failed.
        check: &'static str,
    },
    /// `#VC` with error code 0x404 (PAGE_NOT_VALIDATED) to the guest.
    NotValidated {
        /// The guest address.
        gpa: u64,
    },
}

impl std::fmt::Display for GuestFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Npf { gpa, sizem, check } => write!(
                f,
                "#NPF (RMP{}) at GPA {gpa:#x}: {check}",
                if *sizem { ", SIZEM" } else { "" }
            ),
            Self::NotValidated { gpa } => write!(f, "#VC 0x404 (page not validated) at GPA {gpa:#x}"),
        }
    }
}

/// How a guest RMP instruction ended when it did not succeed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum GuestInstrError {
    /// A failure code in RAX.
    Ret(RmpRet),
    /// An exception or exit instead of a return.
    Fault(GuestFault),
}

impl std::fmt::Display for GuestInstrError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ret(r) => write!(f, "returned {r}"),
            Self::Fault(x) => x.fmt(f),
        }
    }
}

impl From<RmpRet> for GuestInstrError {
    fn from(r: RmpRet) -> Self {
        Self::Ret(r)
    }
}

impl From<GuestFault> for GuestInstrError {
    fn from(f: GuestFault) -> Self {
        Self::Fault(f)
    }
}

/// The RMP entry's GPA field is 39 bits, bits 12-50 (Linux arch/x86/virt/svm/sev.c
/// `struct rmpentry_raw`; ASPFW sev_rmp.h `rmp_fields_t`): a GPA at or above 2^51 does not
/// fit. RMPUPDATE refuses it with FAIL_INPUT (an estimate: the code for a GPA that does not
/// fit is not documented; FAIL_INPUT is the one for bad input fields).
pub const GPA_LIMIT: u64 = 1 << 51;

/// The RMP of one machine.
#[derive(Debug)]
pub struct Rmp {
    covered_end: u64,
    max_asid: u32,
    entries: HashMap<u64, RmpEntry>,
    subpages: HashMap<u64, u16>,
    asid_pages: HashMap<u32, u64>,
    in_use: HashSet<u64>,
}

fn head(pfn: u64) -> u64 {
    pfn & !(PTRS_PER_PMD - 1)
}

impl Rmp {
    /// An RMP covering frames `[0, covered_end)`, for ASIDs up to `max_asid`.
    pub fn new(covered_end: Pfn, max_asid: u32) -> Self {
        Self {
            covered_end: covered_end.0,
            max_asid,
            entries: HashMap::new(),
            subpages: HashMap::new(),
            asid_pages: HashMap::new(),
            in_use: HashSet::new(),
        }
    }

    /// Whether the RMP covers the frame (else it is in the "Default" state: hypervisor-owned
    /// for good).
    pub fn covered(&self, pfn: Pfn) -> bool {
        pfn.0 < self.covered_end
    }

    /// Entries stored (4 KiB entries plus 2 MiB heads).
    pub fn stored_entries(&self) -> usize {
        self.entries.len()
    }

    /// Approximate bytes of the sparse maps.
    pub fn footprint_bytes(&self) -> usize {
        self.entries.capacity() * (8 + std::mem::size_of::<RmpEntry>() + 8)
            + self.subpages.capacity() * 24
            + self.asid_pages.capacity() * 24
            + self.in_use.capacity() * 16
    }

    fn large_head(&self, pfn: u64) -> Option<(u64, &RmpEntry)> {
        let h = head(pfn);
        self.entries
            .get(&h)
            .filter(|e| e.page_size == PageSize::Size2M)
            .map(|e| (h, e))
    }

    /// The entry that governs `pfn` (for a frame inside a 2 MiB entry: that entry, with the
    /// frame's GPA).
    pub fn entry(&self, pfn: Pfn) -> RmpEntry {
        if let Some((h, e)) = self.large_head(pfn.0) {
            let mut e = *e;
            if e.assigned {
                e.gpa += (pfn.0 - h) * PAGE_SIZE;
            }
            return e;
        }
        self.entries.get(&pfn.0).copied().unwrap_or_default()
    }

    /// Pages (4 KiB units) assigned to `asid`.
    pub fn asid_pages(&self, asid: u32) -> u64 {
        self.asid_pages.get(&asid).copied().unwrap_or(0)
    }

    /// Mark a frame as in use by a running vCPU (VMRUN marks its VMSA, APM §15.36.12).
    pub fn set_in_use(&mut self, pfn: Pfn, in_use: bool) {
        if in_use {
            self.in_use.insert(pfn.0);
        } else {
            self.in_use.remove(&pfn.0);
        }
    }

    /// Whether a running vCPU uses the frame.
    pub fn in_use(&self, pfn: Pfn) -> bool {
        self.in_use.contains(&pfn.0)
    }

    fn account(&mut self, pfn: u64, e: &RmpEntry, add: bool) {
        if !e.assigned {
            return;
        }
        let pages = e.page_size.frames();
        if e.asid != 0 {
            let n = self.asid_pages.entry(e.asid).or_insert(0);
            *n = if add { *n + pages } else { n.saturating_sub(pages) };
            if *n == 0 {
                self.asid_pages.remove(&e.asid);
            }
        }
        if e.page_size == PageSize::Size4K {
            let n = self.subpages.entry(head(pfn)).or_insert(0);
            *n = if add { *n + 1 } else { n.saturating_sub(1) };
            if *n == 0 {
                self.subpages.remove(&head(pfn));
            }
        }
    }

    /// Store an entry at exactly `pfn`, keeping the counters right.
    fn store(&mut self, pfn: u64, e: RmpEntry) {
        if let Some(old) = self.entries.remove(&pfn) {
            self.account(pfn, &old, false);
        }
        if !e.is_default() {
            self.account(pfn, &e, true);
            self.entries.insert(pfn, e);
        }
    }

    /// Change the stored entry governing `pfn` with `f` (for a frame inside a 2 MiB entry,
    /// the 2 MiB entry).
    fn modify(&mut self, pfn: Pfn, f: impl FnOnce(&mut RmpEntry)) {
        let at = match self.large_head(pfn.0) {
            Some((h, _)) => h,
            None => pfn.0,
        };
        let mut e = self.entries.get(&at).copied().unwrap_or_default();
        f(&mut e);
        self.store(at, e);
    }

    /// `RMPUPDATE` (host, APM §15.36.5): write a new state for the frame (or the 2 MiB region
    /// at it). Validated and VMSA are cleared and VMPL1-3 permissions reset. Rules: the frame
    /// must be covered and aligned to the size (FAIL_INPUT), the entry must not be immutable
    /// (FAIL_PERMISSION) nor in use (FAIL_INUSE); a 4 KiB update inside an assigned 2 MiB entry
    /// and a 2 MiB update over assigned 4 KiB entries both fail with FAIL_OVERLAP.
    pub fn rmpupdate(&mut self, pfn: Pfn, new: RmpState) -> Result<(), RmpRet> {
        let large = new.page_size == PageSize::Size2M;
        let span = new.page_size.frames();
        // Checked: a region running past the top of the address space is not covered.
        let last = pfn.0.checked_add(span - 1);
        if !last.is_some_and(|l| self.covered(Pfn(l)))
            || (large && !pfn.is_2m_aligned())
            || !new.gpa.0.is_multiple_of(new.page_size.bytes())
            || new.gpa.0 >= GPA_LIMIT
            || new.asid > self.max_asid
            || (!new.assigned && new.asid != 0)
        {
            return Err(RmpRet::FailInput);
        }
        if let Some((h, e)) = self.large_head(pfn.0) {
            if e.immutable {
                return Err(RmpRet::FailPermission);
            }
            if self.in_use.iter().any(|&p| head(p) == h) {
                return Err(RmpRet::FailInuse);
            }
            if !large {
                if e.assigned {
                    return Err(RmpRet::FailOverlap);
                }
                // An unassigned 2 MiB entry simply becomes 512 hypervisor 4 KiB entries.
                self.store(h, RmpEntry::default());
            }
        } else if large {
            let h = pfn.0;
            if (h..h + PTRS_PER_PMD).any(|p| self.entries.get(&p).is_some_and(|e| e.immutable)) {
                return Err(RmpRet::FailPermission);
            }
            if self.in_use.iter().any(|&p| head(p) == h) {
                return Err(RmpRet::FailInuse);
            }
            if self.subpages.get(&h).copied().unwrap_or(0) > 0 {
                return Err(RmpRet::FailOverlap);
            }
            for p in h..h + PTRS_PER_PMD {
                self.store(p, RmpEntry::default());
            }
        } else {
            let e = self.entry(pfn);
            if e.immutable {
                return Err(RmpRet::FailPermission);
            }
            if self.in_use(pfn) {
                return Err(RmpRet::FailInuse);
            }
        }
        let e = RmpEntry {
            assigned: new.assigned,
            page_size: new.page_size,
            immutable: new.immutable,
            validated: false,
            vmsa: false,
            asid: new.asid,
            gpa: new.gpa.0,
            vmpl_perms: [if new.assigned { perm::ALL } else { 0 }, 0, 0, 0],
        };
        self.store(pfn.0, e);
        Ok(())
    }

    /// `PSMASH` (host): split the 2 MiB entry at `pfn` into 512 4 KiB entries with the same
    /// attributes and consecutive GPAs. FAIL_INPUT unless 2 MiB aligned and covered,
    /// FAIL_BADADDR unless a 2 MiB entry, FAIL_PERMISSION if immutable (an estimate: see
    /// below), FAIL_INUSE if in use.
    pub fn psmash(&mut self, pfn: Pfn) -> Result<(), RmpRet> {
        let last = pfn.0.checked_add(PTRS_PER_PMD - 1);
        if !pfn.is_2m_aligned() || !last.is_some_and(|l| self.covered(Pfn(l))) {
            return Err(RmpRet::FailInput);
        }
        let Some((h, e)) = self.large_head(pfn.0).map(|(h, e)| (h, *e)) else {
            return Err(RmpRet::FailBadAddr);
        };
        // ESTIMATE, no source: PSMASH's documented FAIL_PERMISSION (2) means the current
        // ASID is not zero (a guest executed it); nothing says what PSMASH does with an
        // immutable (firmware-held) 2 MiB entry. The simulator refuses it with code 2.
        if e.immutable {
            return Err(RmpRet::FailPermission);
        }
        if self.in_use.iter().any(|&p| head(p) == h) {
            return Err(RmpRet::FailInuse);
        }
        self.store(h, RmpEntry::default());
        for i in 0..PTRS_PER_PMD {
            let sub = RmpEntry {
                page_size: PageSize::Size4K,
                vmsa: false,
                gpa: if e.assigned { e.gpa + i * PAGE_SIZE } else { 0 },
                ..e
            };
            self.store(h + i, sub);
        }
        Ok(())
    }

    /// The checks of an SNP guest's C=1 access to `gpa` through frame `pfn` (APM table
    /// 15-39): Covered, Guest-Owned, Reverse-Map and Mutable give a #NPF, then Validated a
    /// #VC. VMPL0 (the only level modelled for data accesses) has every permission on a
    /// validated page. Data accesses are not size-checked against the RMP: KVM keeps its NPT
    /// mappings at or below the RMP level, and "Only RMPADJUST/PVALIDATE should cause
    /// PFERR_GUEST_SIZEM" (Linux arch/x86/kvm/svm/sev.c `sev_handle_rmp_fault`).
    pub fn check_guest_private(&self, asid: u32, gpa: Gpa, pfn: Pfn) -> Result<(), GuestFault> {
        self.owned_by(asid, gpa, pfn)?;
        if !self.entry(pfn).validated {
            return Err(GuestFault::NotValidated { gpa: gpa.0 });
        }
        Ok(())
    }

    /// The check of a C=0 (shared) guest access or any host write: Hypervisor-Owned.
    pub fn check_hypervisor_owned(&self, pfn: Pfn) -> Result<(), RmpEntry> {
        let e = self.entry(pfn);
        if self.covered(pfn) && e.assigned {
            return Err(e);
        }
        Ok(())
    }

    fn owned_by(&self, asid: u32, gpa: Gpa, pfn: Pfn) -> Result<RmpEntry, GuestFault> {
        let npf = |check| GuestFault::Npf {
            gpa: gpa.0,
            sizem: false,
            check,
        };
        if !self.covered(pfn) {
            return Err(npf("Covered: the frame is beyond the RMP"));
        }
        let e = self.entry(pfn);
        if !e.assigned || e.asid != asid {
            return Err(npf("Guest-Owned: the page is not assigned to this ASID"));
        }
        if e.gpa != gpa.0 & !(PAGE_SIZE - 1) {
            return Err(npf("Reverse-Map: the RMP GPA differs from the accessed GPA"));
        }
        if e.immutable {
            return Err(npf("Mutable: the page is immutable (firmware-held)"));
        }
        Ok(e)
    }

    fn size_rules(&self, gpa: Gpa, pfn: Pfn, size: PageSize) -> Result<(), GuestInstrError> {
        let large_entry = self.large_head(pfn.0).is_some();
        match size {
            PageSize::Size2M if !large_entry => Err(RmpRet::FailSizeMismatch.into()),
            PageSize::Size4K if large_entry => Err(GuestFault::Npf {
                gpa: gpa.0,
                sizem: true,
                check: "Page-Size: 4 KiB request on a 2 MiB RMP entry",
            }
            .into()),
            _ => Ok(()),
        }
    }

    /// `PVALIDATE` (guest at `vmpl`, APM §15.36.6): set or clear Validated. Returns whether the
    /// bit changed (CF=0); an unchanged bit is Linux's `PVALIDATE_FAIL_NOUPDATE`. Rules: VMPL0
    /// only (FAIL_PERMISSION, an estimate: see below), 2 MiB requests aligned (FAIL_INPUT), ownership/GPA/mutable
    /// (#NPF), 2 MiB on a 4 KiB entry FAIL_SIZEMISMATCH, 4 KiB on a 2 MiB entry #NPF(SIZEM).
    pub fn pvalidate(
        &mut self,
        asid: u32,
        vmpl: u8,
        gpa: Gpa,
        pfn: Pfn,
        size: PageSize,
        validate: bool,
    ) -> Result<bool, GuestInstrError> {
        // ESTIMATE, no source: PVALIDATE's documented return codes are 0, FAIL_INPUT (1) and
        // FAIL_SIZEMISMATCH (6); what it does below VMPL0 is not stated. The simulator
        // returns FAIL_PERMISSION (its scripted guests run at VMPL0 only, so this path is
        // reached only by direct calls).
        if vmpl != 0 {
            return Err(RmpRet::FailPermission.into());
        }
        if size == PageSize::Size2M && !gpa.is_2m_aligned() {
            return Err(RmpRet::FailInput.into());
        }
        let e = self.owned_by(asid, gpa, pfn)?;
        self.size_rules(gpa, pfn, size)?;
        let changed = e.validated != validate;
        self.modify(pfn, |e| e.validated = validate);
        Ok(changed)
    }

    /// `RMPADJUST` (guest at `vmpl`, APM §15.36.7): give `target_vmpl` the permissions
    /// `perms` and, only when executed at VMPL0, set or clear the VMSA bit. Rules: target VMPL
    /// above the current one and perms within the current VMPL's (FAIL_PERMISSION), target
    /// VMPL ≤ 3 and a VMSA only as 4 KiB (FAIL_INPUT), ownership (#NPF), validated (#VC),
    /// sizes as PVALIDATE, and a VMSA bit change on a VMSA in use by a running vCPU is a
    /// #NPF (Linux commit 309d28576f0a).
    #[allow(clippy::too_many_arguments)]
    pub fn rmpadjust(
        &mut self,
        asid: u32,
        vmpl: u8,
        gpa: Gpa,
        pfn: Pfn,
        size: PageSize,
        target_vmpl: u8,
        perms: u8,
        vmsa: bool,
    ) -> Result<(), GuestInstrError> {
        if target_vmpl > 3 || perms & !perm::ALL != 0 || (vmsa && size == PageSize::Size2M) {
            return Err(RmpRet::FailInput.into());
        }
        if target_vmpl <= vmpl {
            return Err(RmpRet::FailPermission.into());
        }
        if size == PageSize::Size2M && !gpa.is_2m_aligned() {
            return Err(RmpRet::FailInput.into());
        }
        let e = self.owned_by(asid, gpa, pfn)?;
        if !e.validated {
            return Err(GuestFault::NotValidated { gpa: gpa.0 }.into());
        }
        self.size_rules(gpa, pfn, size)?;
        if perms & !e.vmpl_perms[usize::from(vmpl)] != 0 {
            return Err(RmpRet::FailPermission.into());
        }
        let set_vmsa = vmpl == 0;
        if set_vmsa && e.vmsa != vmsa && self.in_use(pfn) {
            return Err(GuestFault::Npf {
                gpa: gpa.0,
                sizem: false,
                check: "the VMSA is in use by a running vCPU",
            }
            .into());
        }
        self.modify(pfn, |e| {
            e.vmpl_perms[usize::from(target_vmpl)] = perms;
            if set_vmsa {
                e.vmsa = vmsa;
            }
        });
        Ok(())
    }

    /// Firmware-only change of an entry (the PSP writes the RMP directly, bypassing the x86
    /// rules).
    pub(crate) fn firmware_set(&mut self, pfn: Pfn, f: impl FnOnce(&mut RmpEntry)) {
        self.modify(pfn, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const END: Pfn = Pfn(0x20_0000);

    fn private(gpa: u64, asid: u32, imm: bool, size: PageSize) -> RmpState {
        RmpState {
            gpa: Gpa(gpa),
            assigned: true,
            page_size: size,
            immutable: imm,
            asid,
        }
    }

    const SHARED: RmpState = RmpState {
        gpa: Gpa(0),
        assigned: false,
        page_size: PageSize::Size4K,
        immutable: false,
        asid: 0,
    };

    #[test]
    fn rmpupdate_input_rules() {
        let mut r = Rmp::new(END, 16);
        let p = Pfn(0x10_0001);
        assert_eq!(
            r.rmpupdate(END, private(0, 1, false, PageSize::Size4K)),
            Err(RmpRet::FailInput)
        );
        assert_eq!(
            r.rmpupdate(p, private(0x20_0000, 1, false, PageSize::Size2M)),
            Err(RmpRet::FailInput),
            "2 MiB update of an unaligned frame"
        );
        assert_eq!(
            r.rmpupdate(Pfn(0x10_0000), private(0x1000, 1, false, PageSize::Size2M)),
            Err(RmpRet::FailInput),
            "2 MiB update with an unaligned GPA"
        );
        assert_eq!(
            r.rmpupdate(p, private(0, 17, false, PageSize::Size4K)),
            Err(RmpRet::FailInput)
        );
        r.rmpupdate(p, private(0x5000, 1, false, PageSize::Size4K))
            .unwrap();
        let e = r.entry(p);
        assert!(e.assigned && !e.validated && !e.vmsa && e.asid == 1 && e.gpa == 0x5000);
        assert_eq!(r.asid_pages(1), 1);
        r.rmpupdate(p, SHARED).unwrap();
        assert_eq!(r.entry(p), RmpEntry::default());
        assert_eq!(r.stored_entries(), 0, "hypervisor entries are not stored");
        assert_eq!(r.asid_pages(1), 0);
    }

    #[test]
    fn immutable_entries_refuse_rmpupdate() {
        let mut r = Rmp::new(END, 16);
        let p = Pfn(0x10_0003);
        r.rmpupdate(p, private(0x3000, 2, true, PageSize::Size4K))
            .unwrap();
        assert_eq!(r.rmpupdate(p, SHARED), Err(RmpRet::FailPermission));
        assert_eq!(
            r.rmpupdate(Pfn(0x10_0000), private(0, 2, false, PageSize::Size2M)),
            Err(RmpRet::FailPermission),
            "a 2 MiB update over an immutable 4 KiB entry"
        );
        r.firmware_set(p, |e| e.immutable = false);
        r.rmpupdate(p, SHARED).unwrap();
    }

    #[test]
    fn overlap_rules_between_2m_and_4k() {
        let mut r = Rmp::new(END, 16);
        let h = Pfn(0x10_0000);
        r.rmpupdate(Pfn(h.0 + 7), private(0x7000, 1, false, PageSize::Size4K))
            .unwrap();
        assert_eq!(
            r.rmpupdate(h, private(0x20_0000, 1, false, PageSize::Size2M)),
            Err(RmpRet::FailOverlap)
        );
        r.rmpupdate(Pfn(h.0 + 7), SHARED).unwrap();
        r.rmpupdate(h, private(0x20_0000, 1, false, PageSize::Size2M))
            .unwrap();
        assert_eq!(r.asid_pages(1), 512);
        let e = r.entry(Pfn(h.0 + 5));
        assert_eq!((e.page_size, e.gpa), (PageSize::Size2M, 0x20_5000));
        assert_eq!(
            r.rmpupdate(Pfn(h.0 + 5), SHARED),
            Err(RmpRet::FailOverlap),
            "4 KiB update inside an assigned 2 MiB entry: PSMASH first"
        );
        r.psmash(h).unwrap();
        assert_eq!(r.entry(Pfn(h.0 + 5)).page_size, PageSize::Size4K);
        assert_eq!(r.entry(Pfn(h.0 + 5)).gpa, 0x20_5000);
        assert_eq!(r.asid_pages(1), 512);
        r.rmpupdate(Pfn(h.0 + 5), SHARED).unwrap();
        assert_eq!(r.asid_pages(1), 511);
    }

    #[test]
    fn psmash_rules() {
        let mut r = Rmp::new(END, 16);
        let h = Pfn(0x10_0000);
        assert_eq!(r.psmash(Pfn(h.0 + 1)), Err(RmpRet::FailInput));
        assert_eq!(r.psmash(h), Err(RmpRet::FailBadAddr), "not a 2 MiB entry");
        r.rmpupdate(h, private(0x40_0000, 3, true, PageSize::Size2M))
            .unwrap();
        assert_eq!(r.psmash(h), Err(RmpRet::FailPermission));
        r.firmware_set(h, |e| e.immutable = false);
        r.set_in_use(Pfn(h.0 + 9), true);
        assert_eq!(r.psmash(h), Err(RmpRet::FailInuse));
        r.set_in_use(Pfn(h.0 + 9), false);
        r.pvalidate(3, 0, Gpa(0x40_0000), h, PageSize::Size2M, true)
            .unwrap();
        r.psmash(h).unwrap();
        let e = r.entry(Pfn(h.0 + 511));
        assert!(e.validated && e.page_size == PageSize::Size4K && e.gpa == 0x5f_f000);
    }

    #[test]
    fn pvalidate_rules_and_codes() {
        let mut r = Rmp::new(END, 16);
        let p = Pfn(0x10_0010);
        let gpa = Gpa(0x8000);
        assert!(matches!(
            r.pvalidate(1, 0, gpa, p, PageSize::Size4K, true),
            Err(GuestInstrError::Fault(GuestFault::Npf { sizem: false, .. }))
        ));
        r.rmpupdate(p, private(gpa.0, 1, false, PageSize::Size4K))
            .unwrap();
        assert_eq!(
            r.pvalidate(1, 1, gpa, p, PageSize::Size4K, true),
            Err(RmpRet::FailPermission.into())
        );
        assert!(matches!(
            r.pvalidate(2, 0, gpa, p, PageSize::Size4K, true),
            Err(GuestInstrError::Fault(GuestFault::Npf { .. })),
        ));
        assert!(matches!(
            r.pvalidate(1, 0, Gpa(0x9000), p, PageSize::Size4K, true),
            Err(GuestInstrError::Fault(GuestFault::Npf { .. })),
        ));
        assert_eq!(
            r.check_guest_private(1, gpa, p),
            Err(GuestFault::NotValidated { gpa: 0x8000 })
        );
        assert_eq!(r.pvalidate(1, 0, gpa, p, PageSize::Size4K, true), Ok(true));
        assert_eq!(
            r.pvalidate(1, 0, gpa, p, PageSize::Size4K, true),
            Ok(false),
            "no update"
        );
        r.check_guest_private(1, gpa, p).unwrap();
        // Size mismatches both ways.
        let h = Pfn(0x10_0200);
        r.rmpupdate(h, private(0x20_0000, 1, false, PageSize::Size2M))
            .unwrap();
        assert!(matches!(
            r.pvalidate(1, 0, Gpa(0x20_1000), Pfn(h.0 + 1), PageSize::Size4K, true),
            Err(GuestInstrError::Fault(GuestFault::Npf { sizem: true, .. }))
        ));
        let small = Pfn(0x10_0400);
        r.rmpupdate(small, private(0x60_0000, 1, false, PageSize::Size4K))
            .unwrap();
        assert_eq!(
            r.pvalidate(1, 0, Gpa(0x60_0000), small, PageSize::Size2M, true),
            Err(RmpRet::FailSizeMismatch.into())
        );
        assert_eq!(
            r.pvalidate(1, 0, Gpa(0x60_1000), Pfn(small.0 + 1), PageSize::Size2M, true),
            Err(RmpRet::FailInput.into()),
            "a 2 MiB request needs a 2 MiB-aligned address"
        );
    }

    #[test]
    fn rmpadjust_sets_the_vmsa_bit_only_at_vmpl0() {
        let mut r = Rmp::new(END, 16);
        let p = Pfn(0x10_0021);
        let gpa = Gpa(0x21000);
        r.rmpupdate(p, private(gpa.0, 1, false, PageSize::Size4K))
            .unwrap();
        assert_eq!(
            r.rmpadjust(1, 0, gpa, p, PageSize::Size4K, 1, 0, true),
            Err(GuestInstrError::Fault(GuestFault::NotValidated { gpa: gpa.0 }))
        );
        r.pvalidate(1, 0, gpa, p, PageSize::Size4K, true).unwrap();
        assert_eq!(
            r.rmpadjust(1, 0, gpa, p, PageSize::Size4K, 0, 0, true),
            Err(RmpRet::FailPermission.into()),
            "target VMPL must be above the current one"
        );
        assert_eq!(
            r.rmpadjust(1, 0, gpa, p, PageSize::Size4K, 4, 0, true),
            Err(RmpRet::FailInput.into())
        );
        // At VMPL1 (after VMPL0 granted read only) the VMSA bit is ignored and write cannot be
        // granted onwards.
        r.rmpadjust(1, 0, gpa, p, PageSize::Size4K, 1, perm::READ, false)
            .unwrap();
        r.rmpadjust(1, 1, gpa, p, PageSize::Size4K, 2, perm::READ, true)
            .unwrap();
        assert!(!r.entry(p).vmsa, "the VMSA bit is honoured only at VMPL0");
        assert_eq!(
            r.rmpadjust(1, 1, gpa, p, PageSize::Size4K, 2, perm::WRITE, false),
            Err(RmpRet::FailPermission.into())
        );
        r.rmpadjust(1, 0, gpa, p, PageSize::Size4K, 1, 0, true).unwrap();
        assert!(r.entry(p).vmsa);
        assert_eq!(
            r.rmpadjust(1, 0, gpa, p, PageSize::Size2M, 1, 0, true),
            Err(RmpRet::FailInput.into()),
            "a VMSA is a 4 KiB page"
        );
        r.set_in_use(p, true);
        assert!(matches!(
            r.rmpadjust(1, 0, gpa, p, PageSize::Size4K, 1, 0, false),
            Err(GuestInstrError::Fault(GuestFault::Npf { .. }))
        ));
        assert_eq!(r.rmpupdate(p, SHARED), Err(RmpRet::FailInuse));
        r.set_in_use(p, false);
        r.rmpadjust(1, 0, gpa, p, PageSize::Size4K, 1, 0, false).unwrap();
        assert!(!r.entry(p).vmsa);
    }

    #[test]
    fn host_and_shared_accesses_need_hypervisor_ownership() {
        let mut r = Rmp::new(END, 16);
        let p = Pfn(0x10_0030);
        r.check_hypervisor_owned(p).unwrap();
        r.rmpupdate(p, private(0x1000, 1, false, PageSize::Size4K))
            .unwrap();
        assert!(r.check_hypervisor_owned(p).is_err());
        r.check_hypervisor_owned(END).unwrap();
    }
    #[test]
    fn rmpupdate_and_psmash_of_a_frame_at_the_top_of_the_address_space_are_fail_input() {
        // The covered check must not overflow `pfn + span - 1`: FAIL_INPUT, not a panic.
        let mut r = Rmp::new(END, 16);
        let top = Pfn(u64::MAX);
        assert_eq!(
            r.rmpupdate(top, private(0, 1, false, PageSize::Size2M)),
            Err(RmpRet::FailInput)
        );
        assert_eq!(r.psmash(Pfn(!511)), Err(RmpRet::FailInput));
    }
}
