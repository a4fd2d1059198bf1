//! The Reverse Map Table and the instructions that change it (AMD APM vol. 2, pub. 24593,
//! §15.36; entry fields per Linux arch/x86/virt/svm/sev.c `struct rmpentry_raw` and AMD-ASPFW
//! sev_rmp.h `rmp_fields_t`).
//!
//! One entry per 4 KiB system-physical frame, stored sparsely and packed as the hardware's
//! qword 0: a frame without a stored entry is hypervisor-owned (all fields zero). A 2 MiB entry
//! is stored once, for its 2 MiB region, and describes the whole region (its 512 frames read as
//! that entry with consecutive GPAs). A region's 4 KiB entries take 16 bytes each while few, 8
//! once many ([`Rmp`]), so the table stays under the hardware's 16 bytes per frame it describes.
//! A per-region count of assigned 4 KiB entries (the firmware's "subpage count") makes the
//! 2 MiB overlap check O(1), and a per-ASID count tells the firmware whether an ASID still owns
//! pages (`SNP_ACTIVATE`'s INVALID_CONFIG rule). Runs of 4 KiB PVALIDATEs and of RMPUPDATEs to
//! shared over one region go in one pass ([`Rmp::pvalidate_4k_run`],
//! [`Rmp::make_shared_4k_run`]) with the per-page rules, so a guest's memory of any size is
//! validated and released in time linear in its pages.

use std::collections::{BTreeSet, HashMap};

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

/// The RMP entry's ASID field is 10 bits (bits 51-60 of qword 0, Linux `struct rmpentry_raw`):
/// the highest ASID an entry can hold.
pub const ASID_FIELD_MAX: u32 = (1 << 10) - 1;

/// Qword 0 of an RMP entry, laid out as the hardware's (Linux arch/x86/virt/svm/sev.c
/// `struct rmpentry_raw`: assigned bit 0, page size bit 1, immutable bit 2, GPA bits 12-50,
/// ASID bits 51-60, VMSA bit 61, validated bit 62). The simulator keeps only this qword per
/// entry; qword 1 (the VMPL1-3 permissions, almost always zero) lives in a side table, flagged
/// by reserved bit 3.
mod qw {
    pub const ASSIGNED: u64 = 1 << 0;
    pub const SIZE_2M: u64 = 1 << 1;
    pub const IMMUTABLE: u64 = 1 << 2;
    /// Simulator use of a reserved bit: the VMPL1-3 permissions are not all zero.
    pub const PERMS: u64 = 1 << 3;
    pub const GPA: u64 = ((1 << 51) - 1) & !0xfff;
    pub const ASID_SHIFT: u32 = 51;
    pub const ASID: u64 = 0x3ff << ASID_SHIFT;
    pub const VMSA: u64 = 1 << 61;
    pub const VALIDATED: u64 = 1 << 62;
}

fn pack(e: &RmpEntry) -> u64 {
    let bit = |b: bool, v: u64| if b { v } else { 0 };
    bit(e.assigned, qw::ASSIGNED)
        | bit(e.page_size == PageSize::Size2M, qw::SIZE_2M)
        | bit(e.immutable, qw::IMMUTABLE)
        | (e.gpa & qw::GPA)
        | ((u64::from(e.asid) << qw::ASID_SHIFT) & qw::ASID)
        | bit(e.vmsa, qw::VMSA)
        | bit(e.validated, qw::VALIDATED)
}

fn asid_of(q: u64) -> u32 {
    ((q & qw::ASID) >> qw::ASID_SHIFT) as u32
}

/// The frames of one 2 MiB region.
const REGION: usize = PTRS_PER_PMD as usize;
/// The most 4 KiB entries a region keeps as a sorted list (16 bytes each) before it takes a
/// dense chunk (4 KiB): half the break-even count, so that an insertion moves at most 2 KiB.
const SPARSE_MAX: usize = 128;

/// The 4 KiB entries of a region that are not all zero: a short sorted list while there are
/// few (a VMSA page here and there costs 16 bytes, not a 4 KiB chunk), all 512 qwords once
/// there are more.
#[derive(Debug)]
enum Small {
    /// `(index in the region, qword)`, sorted, at most [`SPARSE_MAX`].
    Sparse(Vec<(u16, u64)>),
    /// Every entry of the region.
    Dense(Box<[u64; REGION]>),
}

impl Small {
    fn get(&self, i: usize) -> u64 {
        match self {
            Self::Sparse(v) => v.binary_search_by_key(&(i as u16), |e| e.0).map_or(0, |k| v[k].1),
            Self::Dense(d) => d[i],
        }
    }

    /// Set entry `i` to `q` (0 clears it).
    fn set(&mut self, i: usize, q: u64) {
        match self {
            Self::Dense(d) => d[i] = q,
            Self::Sparse(v) => match v.binary_search_by_key(&(i as u16), |e| e.0) {
                Ok(k) if q == 0 => {
                    v.remove(k);
                }
                Ok(k) => v[k].1 = q,
                Err(_) if q == 0 => {}
                Err(k) if v.len() < SPARSE_MAX => v.insert(k, (i as u16, q)),
                Err(_) => {
                    self.densify();
                    self.set(i, q);
                }
            },
        }
    }

    /// Take the dense form (before a run writes many entries).
    fn densify(&mut self) {
        if let Self::Sparse(v) = self {
            let mut d = Box::new([0; REGION]);
            for &(j, x) in v.iter() {
                d[usize::from(j)] = x;
            }
            *self = Self::Dense(d);
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Sparse(v) => v.len(),
            Self::Dense(_) => REGION,
        }
    }

    /// Whether any stored entry has all of `bits`.
    fn any(&self, bits: u64) -> bool {
        self.first(bits).is_some()
    }

    /// The index of the first stored entry with all of `bits`.
    fn first(&self, bits: u64) -> Option<usize> {
        match self {
            Self::Sparse(v) => v.iter().find(|e| e.1 & bits == bits).map(|e| usize::from(e.0)),
            Self::Dense(d) => d.iter().position(|&q| q & bits == bits),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Self::Sparse(v) => v.capacity() * 16,
            Self::Dense(_) => REGION * 8,
        }
    }
}

/// Bytes a region's 4 KiB entries take (the box and what it holds).
fn small_bytes(s: &Option<Box<Small>>) -> usize {
    s.as_deref()
        .map_or(0, |s| s.bytes() + std::mem::size_of::<Small>())
}

/// The RMP entries of one 2 MiB region: one 2 MiB entry, or 4 KiB entries.
#[derive(Debug, Default)]
struct Region {
    /// Qword 0 of the region's 2 MiB entry (its page-size bit set), or 0.
    large: u64,
    /// Boxed, so that a region with a 2 MiB entry (or none) stays small in the map.
    small: Option<Box<Small>>,
    /// Non-zero 4 KiB entries.
    stored_4k: u16,
    /// Assigned 4 KiB entries (the firmware's "subpage count").
    assigned_4k: u16,
}

impl Region {
    fn is_empty(&self) -> bool {
        self.large == 0 && self.small.is_none()
    }

    fn get(&self, i: usize) -> u64 {
        self.small.as_ref().map_or(0, |s| s.get(i))
    }
}

/// The RMP of one machine.
///
/// Storage: a map from 2 MiB region to its entries, holding only regions with an entry that is
/// not all zero. A region holds its 2 MiB entry in one qword, or its 4 KiB entries as packed
/// qwords (a short list, then a chunk of 512). So a 2 MiB entry costs one entry, a 4 KiB entry
/// 8 bytes once its region is full (half the hardware's 16), and memory the RMP never describes
/// costs nothing. A per-region count of assigned 4 KiB entries (the firmware's "subpage count")
/// makes the 2 MiB overlap check O(1), and a per-ASID count tells the firmware whether an ASID
/// still owns pages (`SNP_ACTIVATE`'s INVALID_CONFIG rule).
#[derive(Debug)]
pub struct Rmp {
    covered_end: u64,
    max_asid: u32,
    regions: HashMap<u64, Region>,
    /// VMPL1-3 permissions of the entries flagged [`qw::PERMS`], by the frame the entry is
    /// stored at (a 2 MiB entry's first frame).
    perms: HashMap<u64, [u8; 3]>,
    /// Pages assigned per ASID, for the ASIDs that have any (a few guests at a time).
    asid_pages: Vec<(u32, u64)>,
    in_use: BTreeSet<u64>,
    stored_4k: u64,
    stored_2m: u64,
    /// Bytes every region's 4 KiB entries take ([`small_bytes`] summed), kept up to date where
    /// they change so that [`Rmp::footprint_bytes`] costs nothing to ask inside a long range
    /// operation.
    small_bytes: usize,
}

fn head(pfn: u64) -> u64 {
    pfn & !(PTRS_PER_PMD - 1)
}

/// The ownership checks of a guest access or instruction at `gpa` on a covered frame with
/// entry `e` (APM table 15-39): Guest-Owned, Reverse-Map, Mutable; the failed one's name.
fn ownership(e: &RmpEntry, asid: u32, gpa: Gpa) -> Result<(), &'static str> {
    if !e.assigned || e.asid != asid {
        return Err("Guest-Owned: the page is not assigned to this ASID");
    }
    if e.gpa != gpa.0 & !(PAGE_SIZE - 1) {
        return Err("Reverse-Map: the RMP GPA differs from the accessed GPA");
    }
    if e.immutable {
        return Err("Mutable: the page is immutable (firmware-held)");
    }
    Ok(())
}

/// How a run of 4 KiB `PVALIDATE`s ([`Rmp::pvalidate_4k_run`]) ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PvalidateRun {
    /// Pages done (validated or rescinded, or already so).
    pub done: u64,
    /// Of those, pages whose Validated bit changed (the rest were "no update").
    pub changed: u64,
    /// Frames the run first made guest-owned (guest_memfd's first-use RMPUPDATE).
    pub prepared: u64,
    /// Why the page after the last done one failed: its RMPUPDATE when it was prepared, or
    /// the PVALIDATE itself.
    pub error: Option<RunError>,
}

/// Why one page of a run failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunError {
    /// guest_memfd's first-use RMPUPDATE refused the frame.
    Prepare(RmpRet),
    /// PVALIDATE failed.
    Pvalidate(GuestInstrError),
}

impl Rmp {
    /// An RMP covering frames `[0, covered_end)`, for ASIDs up to `max_asid` (at most
    /// [`ASID_FIELD_MAX`], what the entry's ASID field holds).
    pub fn new(covered_end: Pfn, max_asid: u32) -> Self {
        let max_asid = max_asid.min(ASID_FIELD_MAX);
        Self {
            covered_end: covered_end.0,
            max_asid,
            regions: HashMap::new(),
            perms: HashMap::new(),
            asid_pages: Vec::new(),
            in_use: BTreeSet::new(),
            stored_4k: 0,
            stored_2m: 0,
            small_bytes: 0,
        }
    }

    /// Whether the RMP covers the frame (else it is in the "Default" state: hypervisor-owned
    /// for good).
    pub fn covered(&self, pfn: Pfn) -> bool {
        pfn.0 < self.covered_end
    }

    /// Entries stored (4 KiB entries plus 2 MiB entries).
    pub fn stored_entries(&self) -> usize {
        (self.stored_4k + self.stored_2m) as usize
    }

    /// Frames the stored entries describe (a 2 MiB entry describes 512).
    pub fn tracked_frames(&self) -> u64 {
        self.stored_4k + self.stored_2m * PTRS_PER_PMD
    }

    /// Bytes of the table: the region map, the 4 KiB entries and the side tables.
    pub fn footprint_bytes(&self) -> usize {
        let slot = std::mem::size_of::<(u64, Region)>() + 1;
        self.regions.capacity() * slot
            + self.small_bytes
            + self.perms.capacity() * (8 + 3 + 8)
            + self.asid_pages.capacity() * 16
            + self.in_use.len() * 24
    }

    /// Account for a region's 4 KiB entries going from `before` bytes to `after`.
    fn resized(&mut self, before: usize, after: usize) {
        self.small_bytes = self.small_bytes + after - before;
    }

    fn region(&self, pfn: u64) -> Option<&Region> {
        self.regions.get(&(pfn / PTRS_PER_PMD))
    }

    fn region_mut(&mut self, pfn: u64) -> &mut Region {
        self.regions.entry(pfn / PTRS_PER_PMD).or_default()
    }

    /// Forget the region of `pfn` if nothing is stored there any more.
    fn prune(&mut self, pfn: u64) {
        let key = pfn / PTRS_PER_PMD;
        if self.regions.get(&key).is_some_and(Region::is_empty) {
            self.regions.remove(&key);
        }
    }

    fn decode(&self, q: u64, at: u64) -> RmpEntry {
        let assigned = q & qw::ASSIGNED != 0;
        let [p1, p2, p3] = if q & qw::PERMS != 0 {
            self.perms.get(&at).copied().unwrap_or_default()
        } else {
            [0; 3]
        };
        RmpEntry {
            assigned,
            page_size: if q & qw::SIZE_2M != 0 {
                PageSize::Size2M
            } else {
                PageSize::Size4K
            },
            immutable: q & qw::IMMUTABLE != 0,
            validated: q & qw::VALIDATED != 0,
            vmsa: q & qw::VMSA != 0,
            asid: asid_of(q),
            gpa: q & qw::GPA,
            // VMPL0 has every permission on an assigned page: RMPUPDATE grants them and no
            // instruction takes them away (RMPADJUST only targets a higher VMPL).
            vmpl_perms: [if assigned { perm::ALL } else { 0 }, p1, p2, p3],
        }
    }

    fn large_head(&self, pfn: u64) -> Option<(u64, RmpEntry)> {
        let h = head(pfn);
        let r = self.region(pfn)?;
        (r.large != 0).then(|| (h, self.decode(r.large, h)))
    }

    /// The entry that governs `pfn` (for a frame inside a 2 MiB entry: that entry, with the
    /// frame's GPA).
    pub fn entry(&self, pfn: Pfn) -> RmpEntry {
        let Some(r) = self.region(pfn.0) else {
            return RmpEntry::default();
        };
        if r.large != 0 {
            let h = head(pfn.0);
            let mut e = self.decode(r.large, h);
            if e.assigned {
                e.gpa += (pfn.0 - h) * PAGE_SIZE;
            }
            return e;
        }
        match r.get((pfn.0 - head(pfn.0)) as usize) {
            0 => RmpEntry::default(),
            q => self.decode(q, pfn.0),
        }
    }

    /// Pages (4 KiB units) assigned to `asid`.
    pub fn asid_pages(&self, asid: u32) -> u64 {
        self.asid_pages.iter().find(|e| e.0 == asid).map_or(0, |e| e.1)
    }

    /// Add `add` pages to ASID `asid`'s count and take `sub` away (ASID 0 is not counted).
    fn count_asid(&mut self, asid: u32, add: u64, sub: u64) {
        if asid == 0 {
            return;
        }
        let i = match self.asid_pages.iter().position(|e| e.0 == asid) {
            Some(i) => i,
            None => {
                self.asid_pages.push((asid, 0));
                self.asid_pages.len() - 1
            }
        };
        let n = &mut self.asid_pages[i].1;
        *n = (*n + add).saturating_sub(sub);
        if *n == 0 {
            self.asid_pages.swap_remove(i);
        }
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

    /// Whether a running vCPU uses a frame of the 2 MiB region at `h`.
    fn region_in_use(&self, h: u64) -> bool {
        self.in_use.range(h..h + PTRS_PER_PMD).next().is_some()
    }

    /// Count the pages of qword `q` (stored at `pfn`) in or out of the per-ASID and per-region
    /// counters.
    fn account(&mut self, pfn: u64, q: u64, add: bool) {
        if q & qw::ASSIGNED == 0 {
            return;
        }
        let large = q & qw::SIZE_2M != 0;
        let pages = if large { PTRS_PER_PMD } else { 1 };
        if add {
            self.count_asid(asid_of(q), pages, 0);
        } else {
            self.count_asid(asid_of(q), 0, pages);
        }
        if !large {
            let r = self.region_mut(pfn);
            r.assigned_4k = if add {
                r.assigned_4k + 1
            } else {
                r.assigned_4k.saturating_sub(1)
            };
        }
    }

    /// Take the entry stored exactly at `pfn` out (a 2 MiB entry if `pfn` is the head of one,
    /// else the 4 KiB entry), keeping the counters right.
    fn take_at(&mut self, pfn: u64) -> u64 {
        let is_head = pfn == head(pfn);
        let idx = (pfn - head(pfn)) as usize;
        let Some(r) = self.region(pfn) else {
            return 0;
        };
        let large = is_head && r.large != 0;
        let q = if large { r.large } else { r.get(idx) };
        if q == 0 {
            return 0;
        }
        self.account(pfn, q, false);
        if q & qw::PERMS != 0 {
            self.perms.remove(&pfn);
        }
        let r = self.region_mut(pfn);
        if large {
            r.large = 0;
            self.stored_2m -= 1;
        } else {
            let before = small_bytes(&r.small);
            if let Some(s) = r.small.as_mut() {
                s.set(idx, 0);
            }
            r.stored_4k -= 1;
            if r.stored_4k == 0 {
                r.small = None;
            }
            let after = small_bytes(&r.small);
            self.resized(before, after);
            self.stored_4k -= 1;
        }
        self.prune(pfn);
        q
    }

    /// Store an entry at exactly `pfn`, keeping the counters right.
    fn store(&mut self, pfn: u64, e: RmpEntry) {
        self.take_at(pfn);
        if e.is_default() {
            return;
        }
        let mut q = pack(&e);
        let [_, p1, p2, p3] = e.vmpl_perms;
        if [p1, p2, p3] != [0; 3] {
            self.perms.insert(pfn, [p1, p2, p3]);
            q |= qw::PERMS;
        }
        self.put(pfn, q);
    }

    /// Put qword `q` at `pfn`, where nothing is stored, and count it.
    fn put(&mut self, pfn: u64, q: u64) {
        let r = self.region_mut(pfn);
        if q & qw::SIZE_2M != 0 {
            debug_assert!(r.small.is_none(), "a 2 MiB entry over stored 4 KiB entries");
            r.large = q;
            self.stored_2m += 1;
        } else {
            let before = small_bytes(&r.small);
            r.small
                .get_or_insert_with(|| Box::new(Small::Sparse(Vec::new())))
                .set((pfn - head(pfn)) as usize, q);
            r.stored_4k += 1;
            let after = small_bytes(&r.small);
            self.resized(before, after);
            self.stored_4k += 1;
        }
        self.account(pfn, q, true);
    }

    /// Change the stored entry governing `pfn` with `f` (for a frame inside a 2 MiB entry,
    /// the 2 MiB entry).
    fn modify(&mut self, pfn: Pfn, f: impl FnOnce(&mut RmpEntry)) {
        let (at, mut e) = match self.large_head(pfn.0) {
            Some(large) => large,
            None => (pfn.0, self.entry(pfn)),
        };
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
            if self.region_in_use(h) {
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
            let region = self.region(h);
            let small = region.and_then(|r| r.small.as_deref());
            if small.is_some_and(|s| s.any(qw::IMMUTABLE)) {
                return Err(RmpRet::FailPermission);
            }
            if self.region_in_use(h) {
                return Err(RmpRet::FailInuse);
            }
            if region.is_some_and(|r| r.assigned_4k > 0) {
                return Err(RmpRet::FailOverlap);
            }
            // What is left are unassigned, mutable 4 KiB entries: all become the 2 MiB entry.
            if small.is_some() {
                for p in h..h + PTRS_PER_PMD {
                    self.take_at(p);
                }
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
        let Some((h, e)) = self.large_head(pfn.0) else {
            return Err(RmpRet::FailBadAddr);
        };
        // ESTIMATE, no source: PSMASH's documented FAIL_PERMISSION (2) means the current
        // ASID is not zero (a guest executed it); nothing says what PSMASH does with an
        // immutable (firmware-held) 2 MiB entry. The simulator refuses it with code 2.
        if e.immutable {
            return Err(RmpRet::FailPermission);
        }
        if self.region_in_use(h) {
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

    /// The Hypervisor-Owned check (APM table 15-39) of a host write, or of a C=0 (shared)
    /// guest access, to `pfn` through a mapping of `mapping` size. Through 4 KiB the frame must
    /// not be assigned; through 2 MiB (a 1 GiB mapping is checked as 2 MiB) no frame of its
    /// 2 MiB region may be (Linux arch/x86/virt/svm/sev.c `adjust_direct_map`: a write through
    /// a 2 MiB or larger mapping "that contains any 4KB pages that are set to private in the
    /// RMP table" takes an RMP #PF; see [`crate::direct_map`]). The error is the frame whose
    /// entry failed the check: `pfn` itself if it is assigned, else the region's first assigned
    /// frame (for an unassigned PFN Linux's `dump_rmpentry` dumps the region's non-zero entries,
    /// "such as when the PFN is being accessed via a 2MB mapping"). O(1) when the check passes,
    /// from the region's count of assigned 4 KiB entries.
    pub fn check_hypervisor_owned(&self, pfn: Pfn, mapping: PageSize) -> Result<(), Pfn> {
        if !self.covered(pfn) {
            return Ok(());
        }
        if self.entry(pfn).assigned {
            return Err(pfn);
        }
        if mapping == PageSize::Size4K {
            return Ok(());
        }
        // The written frame is not assigned, so the region has no assigned 2 MiB entry.
        let Some(r) = self.region(pfn.0).filter(|r| r.assigned_4k > 0) else {
            return Ok(());
        };
        let first = r.small.as_deref().and_then(|s| s.first(qw::ASSIGNED));
        Err(Pfn(head(pfn.0) + first.unwrap_or(0) as u64))
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
        ownership(&e, asid, gpa).map_err(npf)?;
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

    /// Whether no frame of the 2 MiB region at `head` is assigned (KVM's `is_pfn_range_shared`
    /// over it), from the region's counters.
    pub fn region_unassigned(&self, head: Pfn) -> bool {
        self.region(head.0)
            .is_none_or(|r| r.large & qw::ASSIGNED == 0 && r.assigned_4k == 0)
    }

    /// How many frames of `[pfn, pfn + n)` are assigned.
    pub fn assigned_frames(&self, pfn: Pfn, n: u64) -> u64 {
        let (mut p, end) = (pfn.0, pfn.0.saturating_add(n));
        let mut count = 0;
        while p < end {
            let h = head(p);
            let to = end.min(h + PTRS_PER_PMD);
            if let Some(r) = self.region(p) {
                if r.large & qw::ASSIGNED != 0 {
                    count += to - p;
                } else if r.assigned_4k > 0 {
                    let (a, b) = ((p - h) as usize, (to - h) as usize);
                    count += (a..b).filter(|&i| r.get(i) & qw::ASSIGNED != 0).count() as u64;
                }
            }
            p = to;
        }
        count
    }

    /// How many frames of `[pfn, pfn + n)` a guest with `asid` can use privately at GPAs from
    /// `gpa`: assigned to it at that GPA, mutable and validated (what a C=1 access checks).
    pub fn validated_frames(&self, asid: u32, gpa: Gpa, pfn: Pfn, n: u64) -> u64 {
        let (mut p, end) = (pfn.0, pfn.0.saturating_add(n));
        let mut count = 0;
        while p < end {
            let h = head(p);
            let to = end.min(h + PTRS_PER_PMD);
            let at = |x: u64| Gpa(gpa.0 + (x - pfn.0) * PAGE_SIZE);
            let usable = |e: &RmpEntry, g: Gpa| ownership(e, asid, g).is_ok() && e.validated;
            if self.large_head(p).is_some() {
                // One entry: usable for every frame or none (its GPAs are consecutive).
                if usable(&self.entry(Pfn(p)), at(p)) {
                    count += to - p;
                }
            } else {
                count += (p..to).filter(|&x| usable(&self.entry(Pfn(x)), at(x))).count() as u64;
            }
            p = to;
        }
        count
    }

    /// Whether [`Rmp::pvalidate_4k_run`] and [`Rmp::make_shared_4k_run`] take frames
    /// `[pfn, pfn + n)`: covered, inside one 2 MiB region, and that region has no 2 MiB entry.
    pub fn run_fits(&self, pfn: Pfn, n: u64) -> bool {
        n > 0
            && head(pfn.0) == head(pfn.0 + n - 1)
            && self.covered(Pfn(pfn.0 + n - 1))
            && self.region(pfn.0).is_none_or(|r| r.large == 0)
    }

    /// `PVALIDATE` at VMPL0 of `n` consecutive 4 KiB pages from `gpa`, backed by frames from
    /// `pfn` (a run [`Rmp::run_fits`] takes), each frame first made guest-owned by `asid` if it
    /// is not assigned (the 4 KiB RMPUPDATE of guest_memfd's first use, `sev_gmem_prepare`).
    /// Page by page it does what [`Rmp::rmpupdate`] then [`Rmp::pvalidate`] do, with the same
    /// rules, and stops at the first page that fails; but in one pass over the region's packed
    /// entries.
    pub fn pvalidate_4k_run(
        &mut self,
        asid: u32,
        gpa: Gpa,
        pfn: Pfn,
        n: u64,
        validate: bool,
    ) -> PvalidateRun {
        debug_assert!(self.run_fits(pfn, n));
        let h = head(pfn.0);
        let busy: Vec<u64> = self.in_use.range(h..h + PTRS_PER_PMD).copied().collect();
        let max_asid = self.max_asid;
        let mut out = PvalidateRun::default();
        let (mut new_stored, mut new_assigned) = (0u16, 0u16);
        let mut fail = None;
        let region = self.regions.entry(h / PTRS_PER_PMD).or_default();
        let before = small_bytes(&region.small);
        let chunk = region
            .small
            .get_or_insert_with(|| Box::new(Small::Sparse(Vec::new())));
        if chunk.len() + n as usize > SPARSE_MAX {
            chunk.densify();
        }
        for i in 0..n {
            let idx = (pfn.0 - h + i) as usize;
            let g = gpa.0 + i * PAGE_SIZE;
            let mut q = chunk.get(idx);
            if q & qw::ASSIGNED == 0 {
                // RMPUPDATE's rules, in its order (see `rmpupdate`).
                let refused = if g >= GPA_LIMIT || asid > max_asid {
                    Some(RmpRet::FailInput)
                } else if q & qw::IMMUTABLE != 0 {
                    Some(RmpRet::FailPermission)
                } else if busy.contains(&(pfn.0 + i)) {
                    Some(RmpRet::FailInuse)
                } else {
                    None
                };
                if let Some(code) = refused {
                    out.error = Some(RunError::Prepare(code));
                    break;
                }
                if q == 0 {
                    new_stored += 1;
                } else if q & qw::PERMS != 0 {
                    self.perms.remove(&(pfn.0 + i));
                }
                q = qw::ASSIGNED | (g & qw::GPA) | (u64::from(asid) << qw::ASID_SHIFT);
                chunk.set(idx, q);
                new_assigned += 1;
                out.prepared += 1;
            }
            if asid_of(q) != asid || q & qw::GPA != g & qw::GPA || q & qw::IMMUTABLE != 0 {
                fail = Some((i, g));
                break;
            }
            if (q & qw::VALIDATED != 0) != validate {
                q ^= qw::VALIDATED;
                out.changed += 1;
                chunk.set(idx, q);
            }
            out.done += 1;
        }
        region.stored_4k += new_stored;
        region.assigned_4k += new_assigned;
        if region.stored_4k == 0 {
            region.small = None;
        }
        let after = small_bytes(&region.small);
        self.resized(before, after);
        self.prune(h);
        self.stored_4k += u64::from(new_stored);
        self.count_asid(asid, u64::from(new_assigned), 0);
        if let Some((i, g)) = fail {
            let e = self.entry(Pfn(pfn.0 + i));
            let check = ownership(&e, asid, Gpa(g)).err().unwrap_or("Guest-Owned");
            out.error = Some(RunError::Pvalidate(GuestInstrError::Fault(GuestFault::Npf {
                gpa: g,
                sizem: false,
                check,
            })));
        }
        out
    }

    /// `RMPUPDATE` to shared (hypervisor-owned, 4 KiB) of every assigned frame of
    /// `[pfn, pfn + n)` (a run [`Rmp::run_fits`] takes), page by page as [`Rmp::rmpupdate`]
    /// would, in one pass. Returns how many frames it updated and the ones it refused
    /// (immutable: FAIL_PERMISSION; in use by a running vCPU: FAIL_INUSE).
    pub fn make_shared_4k_run(&mut self, pfn: Pfn, n: u64) -> (u64, Vec<Pfn>) {
        debug_assert!(self.run_fits(pfn, n));
        let h = head(pfn.0);
        let busy: Vec<u64> = self.in_use.range(h..h + PTRS_PER_PMD).copied().collect();
        let Some(r) = self.region(h) else {
            return (0, Vec::new());
        };
        if r.assigned_4k == 0 {
            return (0, Vec::new());
        }
        let (mut updated, mut refused) = (0u64, Vec::new());
        let mut per_asid: Vec<(u32, u64)> = Vec::new();
        let Some(region) = self.regions.get_mut(&(h / PTRS_PER_PMD)) else {
            return (0, Vec::new());
        };
        let before = small_bytes(&region.small);
        let Some(chunk) = region.small.as_mut() else {
            return (0, Vec::new());
        };
        for i in 0..n {
            let idx = (pfn.0 - h + i) as usize;
            let q = chunk.get(idx);
            if q & qw::ASSIGNED == 0 {
                continue;
            }
            if q & qw::IMMUTABLE != 0 || busy.contains(&(pfn.0 + i)) {
                refused.push(Pfn(pfn.0 + i));
                continue;
            }
            if q & qw::PERMS != 0 {
                self.perms.remove(&(pfn.0 + i));
            }
            chunk.set(idx, 0);
            updated += 1;
            match per_asid.iter_mut().find(|(a, _)| *a == asid_of(q)) {
                Some((_, c)) => *c += 1,
                None => per_asid.push((asid_of(q), 1)),
            }
        }
        region.stored_4k -= updated as u16;
        region.assigned_4k -= updated as u16;
        if region.stored_4k == 0 {
            region.small = None;
        }
        let after = small_bytes(&region.small);
        self.resized(before, after);
        self.prune(h);
        self.stored_4k -= updated;
        for (asid, c) in per_asid {
            self.count_asid(asid, 0, c);
        }
        (updated, refused)
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
    use vmsa_core::PMD_SIZE;

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
        r.check_hypervisor_owned(p, PageSize::Size4K).unwrap();
        r.rmpupdate(p, private(0x1000, 1, false, PageSize::Size4K))
            .unwrap();
        assert_eq!(r.check_hypervisor_owned(p, PageSize::Size4K), Err(p));
        r.check_hypervisor_owned(END, PageSize::Size4K).unwrap();
        r.check_hypervisor_owned(END, PageSize::Size2M).unwrap();
    }

    #[test]
    fn the_hypervisor_owned_check_through_a_2m_mapping_covers_its_whole_2m_region() {
        // Linux arch/x86/virt/svm/sev.c `adjust_direct_map`: a write through a 2 MiB or larger
        // mapping that "contains any 4KB pages that are set to private in the RMP table" takes
        // an RMP #PF; 1 GiB mappings are checked as 2 MiB ones.
        let mut r = Rmp::new(END, 16);
        let h = Pfn(0x10_0200);
        let (guest, neighbour, next_region) = (Pfn(h.0 + 300), Pfn(h.0 + 7), Pfn(h.0 + 512));
        r.check_hypervisor_owned(neighbour, PageSize::Size2M).unwrap();
        r.rmpupdate(guest, private(0x5000, 1, false, PageSize::Size4K))
            .unwrap();
        // The neighbour is hypervisor-owned: through 4 KiB it may be written, through 2 MiB
        // not, and the check names the guest's frame.
        r.check_hypervisor_owned(neighbour, PageSize::Size4K).unwrap();
        assert_eq!(r.check_hypervisor_owned(neighbour, PageSize::Size2M), Err(guest));
        assert_eq!(r.check_hypervisor_owned(guest, PageSize::Size2M), Err(guest));
        // Only the 2 MiB region around the write counts.
        r.check_hypervisor_owned(next_region, PageSize::Size2M).unwrap();
        r.rmpupdate(guest, SHARED).unwrap();
        r.check_hypervisor_owned(neighbour, PageSize::Size2M).unwrap();
        // A 2 MiB private entry: every frame of the region fails, through either size.
        r.rmpupdate(h, private(0x20_0000, 1, false, PageSize::Size2M))
            .unwrap();
        assert_eq!(
            r.check_hypervisor_owned(neighbour, PageSize::Size4K),
            Err(neighbour)
        );
        assert_eq!(
            r.check_hypervisor_owned(neighbour, PageSize::Size2M),
            Err(neighbour)
        );
        // A firmware page (assigned, ASID 0) counts as much as a guest's.
        r.rmpupdate(next_region, private(0, 0, true, PageSize::Size4K))
            .unwrap();
        assert_eq!(
            r.check_hypervisor_owned(Pfn(next_region.0 + 9), PageSize::Size2M),
            Err(next_region)
        );
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

    /// A small deterministic generator (64-bit LCG, Knuth's MMIX constants).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, below: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % below
        }
    }

    /// Two RMPs with the same random region: each frame unassigned, hypervisor-fixed, a
    /// firmware page, assigned to ASID 1 at its GPA (validated or not, a VMSA in use or not),
    /// at another GPA, or to ASID 2. Frames `base..base + 512`, GPA of frame i `gpa + i * 4K`.
    fn twin_region(rng: &mut Lcg, base: u64, gpa: u64) -> (Rmp, Rmp) {
        let mut a = Rmp::new(END, 16);
        let mut b = Rmp::new(END, 16);
        // Some regions stay sparse, some become dense.
        let density = rng.next(4);
        for i in 0..PTRS_PER_PMD {
            if density == 0 && rng.next(8) != 0 {
                continue;
            }
            let p = Pfn(base + i);
            let g = gpa + i * PAGE_SIZE;
            let kind = rng.next(9);
            for r in [&mut a, &mut b] {
                match kind {
                    0 => {}
                    1 => r
                        .rmpupdate(
                            p,
                            RmpState {
                                immutable: true,
                                ..SHARED
                            },
                        )
                        .unwrap(),
                    2 => r.rmpupdate(p, private(0, 0, true, PageSize::Size4K)).unwrap(),
                    3 | 4 => r.rmpupdate(p, private(g, 1, false, PageSize::Size4K)).unwrap(),
                    5 => {
                        r.rmpupdate(p, private(g, 1, false, PageSize::Size4K)).unwrap();
                        r.pvalidate(1, 0, Gpa(g), p, PageSize::Size4K, true).unwrap();
                    }
                    6 => {
                        r.rmpupdate(p, private(g, 1, false, PageSize::Size4K)).unwrap();
                        r.pvalidate(1, 0, Gpa(g), p, PageSize::Size4K, true).unwrap();
                        r.rmpadjust(1, 0, Gpa(g), p, PageSize::Size4K, 1, perm::READ, true)
                            .unwrap();
                        r.set_in_use(p, true);
                    }
                    7 => r
                        .rmpupdate(p, private(g + 0x1000, 1, false, PageSize::Size4K))
                        .unwrap(),
                    _ => r.rmpupdate(p, private(g, 2, false, PageSize::Size4K)).unwrap(),
                }
            }
        }
        (a, b)
    }

    /// The 4 KiB entries' bytes counted region by region, which the kept count must equal.
    #[track_caller]
    fn assert_small_bytes_kept(r: &Rmp) {
        let walked: usize = r.regions.values().map(|x| small_bytes(&x.small)).sum();
        assert_eq!(
            r.small_bytes, walked,
            "the kept count of the 4 KiB entries' bytes"
        );
    }

    fn region_entries(r: &Rmp, base: u64) -> Vec<RmpEntry> {
        (base..base + PTRS_PER_PMD).map(|p| r.entry(Pfn(p))).collect()
    }

    #[test]
    fn runs_do_what_the_instructions_do_page_by_page() {
        let mut rng = Lcg(0x5eed);
        let base = 0x10_0400;
        let gpa = 0x40_0000;
        for _ in 0..300 {
            let (mut fast, mut slow) = twin_region(&mut rng, base, gpa);
            let from = rng.next(PTRS_PER_PMD);
            let n = 1 + rng.next(PTRS_PER_PMD - from);
            let validate = rng.next(2) == 0;
            let (p, g) = (Pfn(base + from), Gpa(gpa + from * PAGE_SIZE));
            assert!(fast.run_fits(p, n));
            let run = fast.pvalidate_4k_run(1, g, p, n, validate);
            // The same, an instruction at a time: RMPUPDATE of an unassigned frame, PVALIDATE.
            let mut want = PvalidateRun::default();
            for i in 0..n {
                let (pi, gi) = (Pfn(p.0 + i), Gpa(g.0 + i * PAGE_SIZE));
                if !slow.entry(pi).assigned {
                    if let Err(code) = slow.rmpupdate(pi, private(gi.0, 1, false, PageSize::Size4K)) {
                        want.error = Some(RunError::Prepare(code));
                        break;
                    }
                    want.prepared += 1;
                }
                match slow.pvalidate(1, 0, gi, pi, PageSize::Size4K, validate) {
                    Ok(changed) => {
                        want.done += 1;
                        want.changed += u64::from(changed);
                    }
                    Err(e) => {
                        want.error = Some(RunError::Pvalidate(e));
                        break;
                    }
                }
            }
            assert_eq!(run, want);
            assert_small_bytes_kept(&fast);
            assert_small_bytes_kept(&slow);
            assert_eq!(region_entries(&fast, base), region_entries(&slow, base));
            assert_eq!(fast.asid_pages(1), slow.asid_pages(1));
            assert_eq!(fast.stored_entries(), slow.stored_entries());

            // Making the run's frames shared, in one pass and page by page.
            let (updated, refused) = fast.make_shared_4k_run(p, n);
            let (mut want_updated, mut want_refused) = (0, Vec::new());
            for i in 0..n {
                let pi = Pfn(p.0 + i);
                if slow.entry(pi).assigned {
                    match slow.rmpupdate(pi, SHARED) {
                        Ok(()) => want_updated += 1,
                        Err(_) => want_refused.push(pi),
                    }
                }
            }
            assert_eq!((updated, refused), (want_updated, want_refused));
            assert_eq!(region_entries(&fast, base), region_entries(&slow, base));
            assert_eq!(
                (fast.asid_pages(1), fast.asid_pages(2)),
                (slow.asid_pages(1), slow.asid_pages(2))
            );
            assert_eq!(fast.stored_entries(), slow.stored_entries());
            assert_eq!(fast.tracked_frames(), slow.tracked_frames());
            assert_small_bytes_kept(&fast);
            assert_small_bytes_kept(&slow);
        }
    }

    #[test]
    fn a_2m_entry_is_one_entry_and_4k_entries_cost_at_most_8_bytes_each_once_dense() {
        let mut r = Rmp::new(Pfn(1 << 30), 16);
        let empty = r.footprint_bytes();
        // 1,024 regions of 2 MiB entries: 512 Ki frames described.
        for i in 0..1024u64 {
            let h = Pfn(0x10_0000 + i * PTRS_PER_PMD);
            r.rmpupdate(h, private(i * PMD_SIZE, 1, false, PageSize::Size2M))
                .unwrap();
        }
        assert_eq!(
            (r.stored_entries(), r.tracked_frames()),
            (1024, 1024 * PTRS_PER_PMD)
        );
        let large = r.footprint_bytes() - empty;
        // One map slot each (with the map's spare capacity), against the hardware's 512 × 16 bytes.
        assert!(large <= 1024 * 80, "{large} bytes for 1,024 2 MiB entries");
        // The same frames as 4 KiB entries, validated as a guest would.
        let mut s = Rmp::new(Pfn(1 << 30), 16);
        for i in 0..1024u64 {
            let p = Pfn(0x10_0000 + i * PTRS_PER_PMD);
            let run = s.pvalidate_4k_run(1, Gpa(i * PMD_SIZE), p, PTRS_PER_PMD, true);
            assert_eq!(
                (run.done, run.prepared, run.error),
                (PTRS_PER_PMD, PTRS_PER_PMD, None)
            );
        }
        let per_frame = (s.footprint_bytes() - empty) as f64 / s.tracked_frames() as f64;
        assert!(per_frame <= 8.2, "{per_frame} bytes per 4 KiB entry");
        assert!(per_frame < 16.0, "the hardware's RMP takes 16");
        // Giving them back frees the storage.
        for i in 0..1024u64 {
            let p = Pfn(0x10_0000 + i * PTRS_PER_PMD);
            assert_eq!(s.make_shared_4k_run(p, PTRS_PER_PMD), (PTRS_PER_PMD, Vec::new()));
        }
        assert_eq!((s.stored_entries(), s.asid_pages(1)), (0, 0));
        assert!(s.regions.is_empty());
        assert_eq!(s.small_bytes, 0);
    }
}
