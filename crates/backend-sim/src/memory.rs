//! Host physical memory and guest memory.
//!
//! [`HostMemory`] is the machine's DRAM: 4 KiB frames at real-looking physical addresses
//! (starting above the 4 GiB hole), allocated by a page allocator that keeps runs of frames, and
//! backed by storage only while a frame holds bytes that cannot be computed: zeros take none,
//! and neither does a page of one repeated byte, in the clear or encrypted with a guest's key
//! (its ciphertext is computed when read). A 1 TiB host costs a few words until used, and a
//! guest of any size a few entries per run of frames it holds.
//!
//! [`GuestMemfd`] is one guest's memory as KVM's guest_memfd gives it: memslots of guest frames,
//! each backed by a host frame allocated on first use (`kvm_gmem_get_pfn`; 4 KiB folios, or
//! 2 MiB folios where the machine hands them out), which a hole punch (`fallocate(PUNCH_HOLE)`)
//! removes again. The backing is kept in extents ([`ExtentMap`]). Frames the guest converted to
//! shared live in a separate map, as the VMM's ordinary (userspace) memory does.

use std::collections::{BTreeMap, HashMap};

use vmsa_core::{Gfn, PAGE_SIZE, PTRS_PER_PMD, PageBuf, Pfn};

use crate::crypto::GuestKey;

/// The first frame of simulated DRAM: 4 GiB, the usual start of high memory on an EPYC host
/// (legacy memory and the PCI hole sit below).
pub const DEFAULT_FIRST_PFN: u64 = 0x10_0000;
/// One tebibyte, the default size of the simulated host.
pub const TIB: u64 = 1 << 40;

/// Errors of the host page allocator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// Every frame is allocated or leaked.
    #[error("out of host memory: all {frames} frames are allocated or leaked")]
    OutOfMemory {
        /// Frames the host has.
        frames: u64,
    },
    /// A frame went back to the allocator that it had not handed out.
    #[error("pfn {pfn} released but not allocated (double free, or a frame never handed out)")]
    NotAllocated {
        /// The frame.
        pfn: Pfn,
    },
    /// A frame number outside the host's DRAM.
    #[error("pfn {pfn} is outside host memory [{first}, {end})")]
    OutOfRange {
        /// The frame.
        pfn: Pfn,
        /// First frame of DRAM.
        first: Pfn,
        /// One past the last frame.
        end: Pfn,
    },
}

/// How many of the most recently freed runs [`HostMemory::alloc_2m_run`] looks through for a
/// 2 MiB block (a bound, so that many small freed runs do not make every folio slow).
pub const FOLIO_SEARCH: usize = 16;

/// The host's DRAM and its page allocator.
///
/// Everything is kept as runs of frames, so a guest of any size costs a few entries: the
/// allocated and leaked frames are interval sets, the frames given back are a stack of runs
/// (the most recently freed frame is handed out first, as a per-CPU page list does), and frames
/// never handed out are the range from `next` to `aligned_top`.
#[derive(Debug)]
pub struct HostMemory {
    first: u64,
    end: u64,
    next: u64,
    aligned_top: u64,
    free: Vec<(u64, u64)>,
    allocated: RangeSet,
    allocated_frames: u64,
    leaked: RangeSet,
    data: HashMap<u64, Box<PageBuf>>,
    /// The frames that hold one byte repeated over the page, in the clear or encrypted with a
    /// key at the frame's address, labelled with both ([`Fill`]). Launched pages of zeros are
    /// common (an IGVM file's data-less pages: up to a gibibyte of them; OVMF's erased flash of
    /// 0xff), a guest clears the pages it owns, and a guest script fills pages with a byte;
    /// their ciphertext is the same whenever it is computed, so a run of them costs one
    /// interval, not 4 KiB a frame. A frame here is never also in `data`; a frame of zeros in
    /// the clear is in neither.
    fills: LabelledFrames<Fill>,
    peak_allocated: u64,
    peak_data: usize,
}

impl HostMemory {
    /// DRAM of `bytes` (rounded down to whole frames) starting at frame `first_pfn`.
    pub fn new(first_pfn: u64, bytes: u64) -> Self {
        let end = first_pfn.saturating_add(bytes / PAGE_SIZE);
        Self {
            first: first_pfn,
            end,
            next: first_pfn,
            aligned_top: end,
            free: Vec::new(),
            allocated: RangeSet::default(),
            allocated_frames: 0,
            leaked: RangeSet::default(),
            data: HashMap::new(),
            fills: LabelledFrames::default(),
            peak_allocated: 0,
            peak_data: 0,
        }
    }

    /// One past the last frame of DRAM.
    pub fn end_pfn(&self) -> Pfn {
        Pfn(self.end)
    }

    /// The first frame of DRAM.
    pub fn first_pfn(&self) -> Pfn {
        Pfn(self.first)
    }

    /// Whether `pfn` is a frame of DRAM.
    pub fn contains(&self, pfn: Pfn) -> bool {
        (self.first..self.end).contains(&pfn.0)
    }

    fn check(&self, pfn: Pfn) -> Result<(), MemError> {
        if self.contains(pfn) {
            Ok(())
        } else {
            Err(MemError::OutOfRange {
                pfn,
                first: Pfn(self.first),
                end: Pfn(self.end),
            })
        }
    }

    fn out_of_memory(&self) -> MemError {
        MemError::OutOfMemory {
            frames: self.end - self.first,
        }
    }

    /// Record `[start, start + n)` as handed out: zeroed (their old contents dropped) and
    /// counted.
    fn hand_out(&mut self, start: u64, n: u64) {
        self.drop_data(start, n);
        self.allocated.insert(start, start + n);
        self.allocated_frames += n;
        self.peak_allocated = self.peak_allocated.max(self.allocated_frames);
    }

    /// Forget the contents of `[start, start + n)`.
    fn drop_data(&mut self, start: u64, n: u64) {
        self.fills.remove(start, start + n);
        if self.data.is_empty() {
            return;
        }
        if (n as usize) < self.data.len() {
            for p in start..start + n {
                self.data.remove(&p);
            }
        } else {
            self.data.retain(|&p, _| !(start..start + n).contains(&p));
        }
    }

    /// Allocate one zeroed frame: the most recently freed one, else the next never-used one
    /// (which may be 2 MiB aligned, like any buddy-allocator page).
    pub fn alloc(&mut self) -> Result<Pfn, MemError> {
        let (pfn, n) = self.alloc_run(1)?;
        debug_assert_eq!(n, 1);
        Ok(pfn)
    }

    /// Allocate up to `max` (at least 1) contiguous zeroed frames: the end of the most recently
    /// freed run, else never-used frames. Returns the first frame and how many it got.
    pub fn alloc_run(&mut self, max: u64) -> Result<(Pfn, u64), MemError> {
        let max = max.max(1);
        let (start, n) = match self.free.last_mut() {
            Some(top) => {
                let n = top.1.min(max);
                top.1 -= n;
                let start = top.0 + top.1;
                if top.1 == 0 {
                    self.free.pop();
                }
                (start, n)
            }
            None if self.next < self.aligned_top => {
                let n = (self.aligned_top - self.next).min(max);
                self.next += n;
                (self.next - n, n)
            }
            None => return Err(self.out_of_memory()),
        };
        self.hand_out(start, n);
        Ok((Pfn(start), n))
    }

    /// Allocate up to `max` contiguous zeroed never-used frames, the first at `offset` within
    /// its 2 MiB region (the frames skipped to get there join the freed runs, at the bottom of
    /// the stack); when no never-used frames are left, [`HostMemory::alloc_run`]'s.
    pub fn alloc_run_at(&mut self, max: u64, offset: u64) -> Result<(Pfn, u64), MemError> {
        let offset = offset % PTRS_PER_PMD;
        let skip = (offset + PTRS_PER_PMD - self.next % PTRS_PER_PMD) % PTRS_PER_PMD;
        let start = self.next + skip;
        if start >= self.aligned_top {
            return self.alloc_run(max);
        }
        if skip > 0 {
            self.free.insert(0, (self.next, skip));
        }
        let n = (self.aligned_top - start).min(max.max(1));
        self.next = start + n;
        self.hand_out(start, n);
        Ok((Pfn(start), n))
    }

    /// Allocate one zeroed frame for a guest frame at `offset` within its 2 MiB region, as
    /// [`HostMemory::alloc`] does except that the frame is 2 MiB aligned only if `offset` is
    /// (a guest page that is not 2 MiB aligned is never backed by a 2 MiB-aligned frame: AMD
    /// erratum 1467 forbids a 2 MiB-aligned VMSA, and the guest avoids one by its GPA alone,
    /// Linux arch/x86/coco/sev/core.c `snp_alloc_vmsa_page`). For such a page: the most
    /// recently freed frame that is not 2 MiB aligned among the [`FOLIO_SEARCH`] most recent
    /// runs (a run's last frame, or the one before it), else the next never-used frame (at
    /// `offset` in its region if the next is 2 MiB aligned: [`HostMemory::alloc_run_at`]);
    /// only when neither is left, any frame.
    pub fn alloc_at(&mut self, offset: u64) -> Result<Pfn, MemError> {
        let offset = offset % PTRS_PER_PMD;
        if offset == 0 {
            return self.alloc();
        }
        let found = self
            .free
            .iter()
            .enumerate()
            .rev()
            .take(FOLIO_SEARCH)
            .find_map(|(i, &(s, n))| {
                let last = s + n - 1;
                if !last.is_multiple_of(PTRS_PER_PMD) {
                    Some((i, last))
                } else {
                    (n >= 2).then_some((i, last - 1))
                }
            });
        let Some((i, at)) = found else {
            // The next never-used frame, or if it is 2 MiB aligned one at `offset`.
            let at = if self.next.is_multiple_of(PTRS_PER_PMD) {
                offset
            } else {
                self.next
            };
            return self.alloc_run_at(1, at).map(|(p, _)| p);
        };
        let (s, n) = self.free.remove(i);
        for (j, run) in [(s, at - s), (at + 1, s + n - at - 1)]
            .into_iter()
            .filter(|r| r.1 > 0)
            .enumerate()
        {
            self.free.insert(i + j, run);
        }
        self.hand_out(at, 1);
        Ok(Pfn(at))
    }

    /// Allocate 512 contiguous zeroed frames starting 2 MiB aligned (a 2 MiB folio): from the
    /// [`FOLIO_SEARCH`] most recently freed runs, else from never-used frames (the frames skipped to reach
    /// the alignment join the freed runs, at the bottom of the stack). `None` when DRAM has no
    /// such block left.
    pub fn alloc_2m_run(&mut self) -> Option<Pfn> {
        let fits = |&(s, n): &(u64, u64)| {
            let a = s.next_multiple_of(PTRS_PER_PMD);
            (a + PTRS_PER_PMD <= s + n).then_some(a)
        };
        let mut recent = self.free.iter().enumerate().rev().take(FOLIO_SEARCH);
        if let Some((i, a)) = recent.find_map(|(i, r)| fits(r).map(|a| (i, a))) {
            let (s, n) = self.free.remove(i);
            let after = (a + PTRS_PER_PMD, s + n - a - PTRS_PER_PMD);
            for (j, run) in [(s, a - s), after].into_iter().filter(|r| r.1 > 0).enumerate() {
                self.free.insert(i + j, run);
            }
            self.hand_out(a, PTRS_PER_PMD);
            return Some(Pfn(a));
        }
        let start = self.next.next_multiple_of(PTRS_PER_PMD);
        if start.checked_add(PTRS_PER_PMD)? > self.aligned_top {
            return None;
        }
        if start > self.next {
            self.free.insert(0, (self.next, start - self.next));
        }
        self.next = start + PTRS_PER_PMD;
        self.hand_out(start, PTRS_PER_PMD);
        Some(Pfn(start))
    }

    /// Allocate a 2 MiB-aligned frame (what a buddy allocator returns when it splits a fresh
    /// 2 MiB block), taken from the top of DRAM downwards.
    pub fn alloc_2m_aligned(&mut self) -> Result<Pfn, MemError> {
        let top = self.aligned_top & !(PTRS_PER_PMD - 1);
        let pfn = top
            .checked_sub(PTRS_PER_PMD)
            .filter(|&p| p >= self.next.max(self.first));
        let Some(pfn) = pfn.filter(|&p| !self.allocated.contains(p) && !self.leaked.contains(p)) else {
            return Err(self.out_of_memory());
        };
        // The rest of the block below the old top is never handed out again: as before, the
        // allocator only moves its top down.
        self.aligned_top = pfn;
        self.hand_out(pfn, 1);
        Ok(Pfn(pfn))
    }

    /// Give a frame back to the allocator.
    pub fn free(&mut self, pfn: Pfn) -> Result<(), MemError> {
        self.free_run(pfn, 1)
    }

    /// Give `n` contiguous frames back to the allocator. All of them must be allocated. Their
    /// contents go (a frame is handed out zeroed again), so freed memory costs no storage.
    pub fn free_run(&mut self, pfn: Pfn, n: u64) -> Result<(), MemError> {
        self.take_allocated(pfn, n)?;
        self.drop_data(pfn.0, n);
        match self.free.last_mut() {
            // Extend the top run only at its end, so the last frame freed is the next handed out.
            Some(top) if top.0 + top.1 == pfn.0 => top.1 += n,
            _ => self.free.push((pfn.0, n)),
        }
        Ok(())
    }

    fn take_allocated(&mut self, pfn: Pfn, n: u64) -> Result<(), MemError> {
        if n == 0 {
            return Ok(());
        }
        if !self.allocated.covers(pfn.0, pfn.0 + n) {
            let missing = (pfn.0..pfn.0 + n)
                .find(|&p| !self.allocated.contains(p))
                .unwrap_or(pfn.0);
            return Err(MemError::NotAllocated { pfn: Pfn(missing) });
        }
        self.allocated.remove(pfn.0, pfn.0 + n);
        self.allocated_frames -= n;
        Ok(())
    }

    /// Take a frame out of circulation for good (`snp_leak_pages`).
    pub fn leak(&mut self, pfn: Pfn) -> Result<(), MemError> {
        self.leak_run(pfn, 1)
    }

    /// Take `n` contiguous allocated frames out of circulation for good.
    pub fn leak_run(&mut self, pfn: Pfn, n: u64) -> Result<(), MemError> {
        self.take_allocated(pfn, n)?;
        self.leaked.insert(pfn.0, pfn.0 + n);
        Ok(())
    }

    /// Whether the frame is currently handed out.
    pub fn is_allocated(&self, pfn: Pfn) -> bool {
        self.allocated.contains(pfn.0)
    }

    /// Whether the frame was leaked.
    pub fn is_leaked(&self, pfn: Pfn) -> bool {
        self.leaked.contains(pfn.0)
    }

    /// The leaked frames among the `n` frames from `pfn`.
    pub fn leaked_in(&self, pfn: Pfn, n: u64) -> Vec<Pfn> {
        let end = pfn.0 + n;
        self.leaked
            .iter()
            .filter(|&(s, e)| s < end && e > pfn.0)
            .flat_map(|(s, e)| s.max(pfn.0)..e.min(end))
            .map(Pfn)
            .collect()
    }

    /// Frames currently handed out.
    pub fn allocated(&self) -> usize {
        self.allocated_frames as usize
    }

    /// Frames leaked so far.
    pub fn leaked(&self) -> Vec<Pfn> {
        self.leaked.iter().flat_map(|(s, e)| (s..e).map(Pfn)).collect()
    }

    /// How many frames were leaked so far.
    pub fn leaked_count(&self) -> u64 {
        self.leaked.iter().map(|(s, e)| e - s).sum()
    }

    /// The raw bytes of a frame as they sit in DRAM (ciphertext for encrypted frames).
    pub fn read(&self, pfn: Pfn, out: &mut PageBuf) -> Result<(), MemError> {
        self.check(pfn)?;
        if let Some(d) = self.data.get(&pfn.0) {
            out.copy_from_slice(&d[..]);
        } else if let Some(fill) = self.fills.label(pfn.0) {
            out.fill(fill.byte);
            if let Some(key) = &fill.key {
                key.encrypt(pfn, out);
            }
        } else {
            out.fill(0);
        }
        Ok(())
    }

    /// A frame's bytes decrypted with `key` (what a C=1 read with that key sees). A page of one
    /// byte this very key encrypted reads back as that byte without computing its ciphertext.
    pub fn read_decrypted(&self, pfn: Pfn, key: &GuestKey, out: &mut PageBuf) -> Result<(), MemError> {
        self.check(pfn)?;
        if let Some(Fill { key: Some(k), byte }) = self.fills.label(pfn.0)
            && k == key
        {
            out.fill(*byte);
            return Ok(());
        }
        self.read(pfn, out)?;
        key.decrypt(pfn, out);
        Ok(())
    }

    /// Store raw bytes into a frame. A frame of one repeated byte gives its storage back.
    pub fn write(&mut self, pfn: Pfn, data: &PageBuf) -> Result<(), MemError> {
        self.check(pfn)?;
        self.fills.remove(pfn.0, pfn.0 + 1);
        if let Some(byte) = fill_byte(data) {
            self.data.remove(&pfn.0);
            if byte != 0 {
                self.fills.set(pfn.0, &Fill { key: None, byte });
            }
        } else {
            match self.data.get_mut(&pfn.0) {
                Some(d) => d.copy_from_slice(data),
                None => {
                    self.data.insert(pfn.0, Box::new(*data));
                    self.peak_data = self.peak_data.max(self.data.len());
                }
            }
        }
        Ok(())
    }

    /// Store `plain` encrypted with `key` at the frame's address (what a C=1 write, or the
    /// firmware's encryption of a launch page, leaves in DRAM). A page of one repeated byte
    /// keeps only the byte and the key.
    pub fn write_encrypted(&mut self, pfn: Pfn, key: &GuestKey, plain: &PageBuf) -> Result<(), MemError> {
        self.check(pfn)?;
        if let Some(byte) = fill_byte(plain) {
            self.data.remove(&pfn.0);
            let fill = Fill {
                key: Some(key.clone()),
                byte,
            };
            self.fills.set(pfn.0, &fill);
            return Ok(());
        }
        let mut page = *plain;
        key.encrypt(pfn, &mut page);
        self.write(pfn, &page)
    }

    /// Frames whose contents take storage (4 KiB each): not one repeated byte, in the clear or
    /// encrypted.
    pub fn backed_frames(&self) -> usize {
        self.data.len()
    }

    /// Bytes of the allocator's own bookkeeping (the interval sets, the free runs and the map
    /// of frame contents, not the contents themselves).
    pub fn bookkeeping_bytes(&self) -> usize {
        self.data.capacity() * (8 + 8 + 8)
            + self.fills.bytes()
            + self.allocated.bytes()
            + self.leaked.bytes()
            + self.free.capacity() * 16
    }

    /// Bytes the frame contents take: 4 KiB per [backed](Self::backed_frames) frame.
    pub fn contents_bytes(&self) -> usize {
        self.data.len() * PAGE_SIZE as usize
    }

    /// The most frames ever allocated at once, and the most ever backed by storage at once.
    pub fn peaks(&self) -> (usize, usize) {
        (self.peak_allocated as usize, self.peak_data)
    }
}

/// What a frame of one repeated byte holds: the byte, in the clear (`key` `None`) or encrypted
/// with `key` at the frame's address.
#[derive(Clone, Debug, PartialEq)]
struct Fill {
    key: Option<GuestKey>,
    byte: u8,
}

/// The byte `page` repeats, if it is one byte over the whole page.
fn fill_byte(page: &PageBuf) -> Option<u8> {
    let byte = page[0];
    // No early exit: the compiler compares 32 bytes a step, faster than stopping at the first
    // difference byte by byte.
    (page.iter().fold(0, |acc, &x| acc | (x ^ byte)) == 0).then_some(byte)
}

/// A set of `u64`s kept as disjoint, non-adjacent half-open intervals, so a range of any size
/// costs one entry (a 1 TiB guest marked private is one interval, not 2^28 entries).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end.
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// Whether `x` is in the set.
    pub fn contains(&self, x: u64) -> bool {
        self.map.range(..=x).next_back().is_some_and(|(_, &e)| x < e)
    }

    /// Whether every value of `[start, end)` is in the set.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        start >= end
            || self
                .map
                .range(..=start)
                .next_back()
                .is_some_and(|(_, &e)| end <= e)
    }

    /// Add `[start, end)`.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        // Every interval that overlaps or touches [start, end] merges into it.
        while let Some((&is, &ie)) = self.map.range(..=e).next_back() {
            if ie < s {
                break;
            }
            self.map.remove(&is);
            s = s.min(is);
            e = e.max(ie);
        }
        self.map.insert(s, e);
    }

    /// Remove `[start, end)`.
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        while let Some((&is, &ie)) = self.map.range(..end).next_back() {
            if ie <= start {
                break;
            }
            self.map.remove(&is);
            if end < ie {
                self.map.insert(end, ie);
            }
            if is < start {
                self.map.insert(is, start);
                break;
            }
        }
    }

    /// How many values of `[start, end)` are in the set (none when `start >= end`).
    pub fn count(&self, start: u64, end: u64) -> u64 {
        if start >= end {
            // `BTreeMap::range` panics on a range whose start is above its end.
            return 0;
        }
        let first = self.map.range(..=start).next_back().map_or(start, |(&s, _)| s);
        self.map
            .range(first..end)
            .map(|(&s, &e)| e.min(end).saturating_sub(s.max(start)))
            .sum()
    }

    /// The number of intervals.
    pub fn intervals(&self) -> usize {
        self.map.len()
    }

    /// The intervals, `(start, end)`, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(&s, &e)| (s, e))
    }

    /// Approximate bytes of the set (a B-tree entry of two `u64`s and its share of a node).
    pub fn bytes(&self) -> usize {
        self.map.len() * 24
    }
}

/// Frames each labelled with at most one `K` (a key and byte, an ASID), kept as runs of
/// consecutive frames of one label, so a label shared by a million consecutive frames costs one
/// entry, and finding a frame's label costs a logarithm of the runs whatever the number of
/// labels (a guest script may fill pages with 256 bytes, each its own label).
#[derive(Clone, Debug)]
pub struct LabelledFrames<K> {
    /// First frame -> (one past the last frame, label): disjoint runs; touching runs of the
    /// same label are one.
    runs: BTreeMap<u64, (u64, K)>,
}

impl<K> Default for LabelledFrames<K> {
    fn default() -> Self {
        Self {
            runs: BTreeMap::new(),
        }
    }
}

impl<K: Clone + PartialEq> LabelledFrames<K> {
    /// The run that holds frame `p`: its first frame.
    fn run_of(&self, p: u64) -> Option<u64> {
        let (&start, (end, _)) = self.runs.range(..=p).next_back()?;
        (p < *end).then_some(start)
    }

    /// Frame `p`'s label, if it has one.
    pub fn label(&self, p: u64) -> Option<&K> {
        self.run_of(p).map(|start| &self.runs[&start].1)
    }

    /// Label frame `p` with `k` (in place of any label it had).
    pub fn set(&mut self, p: u64, k: &K) {
        if self.label(p) == Some(k) {
            return;
        }
        self.remove(p, p + 1);
        let (mut start, mut end) = (p, p + 1);
        if let Some((&s, (e, l))) = self.runs.range(..p).next_back()
            && *e == p
            && l == k
        {
            start = s;
        }
        if let Some((e, l)) = self.runs.get(&(p + 1))
            && l == k
        {
            end = *e;
            self.runs.remove(&(p + 1));
        }
        self.runs.insert(start, (end, k.clone()));
    }

    /// Take the labels of frames `[start, end)`; returns how many frames had one.
    pub fn remove(&mut self, start: u64, end: u64) -> u64 {
        self.remove_where(start, end, |_| true)
    }

    /// Take the label of those frames of `[start, end)` labelled `k`; returns how many were.
    pub fn remove_label(&mut self, start: u64, end: u64, k: &K) -> u64 {
        self.remove_where(start, end, |l| l == k)
    }

    fn remove_where(&mut self, start: u64, end: u64, which: impl Fn(&K) -> bool) -> u64 {
        let mut removed = 0;
        let mut from = start;
        while from < end {
            // The run holding `from`, else the first run starting inside the range.
            let next = self
                .run_of(from)
                .or_else(|| self.runs.range(from..end).next().map(|(&s, _)| s));
            let Some(s) = next else { break };
            let (e, label) = self.runs[&s].clone();
            let (lo, hi) = (s.max(start), e.min(end));
            if which(&label) {
                self.runs.remove(&s);
                if s < lo {
                    self.runs.insert(s, (lo, label.clone()));
                }
                if hi < e {
                    self.runs.insert(hi, (e, label));
                }
                removed += hi - lo;
            }
            from = hi;
        }
        removed
    }

    /// Take every label.
    pub fn clear(&mut self) {
        self.runs.clear();
    }

    /// How many frames have a label.
    pub fn frames(&self) -> u64 {
        self.runs.iter().map(|(s, (e, _))| e - s).sum()
    }

    /// Approximate bytes: a B-tree entry per run (its first frame, end and label) and its share
    /// of a node.
    pub fn bytes(&self) -> usize {
        self.runs.len() * (size_of::<(u64, (u64, K))>() + 8)
    }
}

/// A run of guest frames backed by a run of host frames: guest frames
/// `[gfn, gfn + frames)` are host frames `[pfn, pfn + frames)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// The first guest frame.
    pub gfn: Gfn,
    /// The host frame backing it.
    pub pfn: Pfn,
    /// How many frames.
    pub frames: u64,
    /// Whether the run is made of 2 MiB folios (`gfn`, `pfn` and `frames` are then multiples of
    /// 512): KVM may back each with one 2 MiB RMP entry.
    pub huge: bool,
}

impl Extent {
    fn end(&self) -> u64 {
        self.gfn.0 + self.frames
    }

    /// The part of the extent within guest frames `[start, end)`, keeping `huge` only for
    /// whole 2 MiB folios (a cut folio is no longer one).
    fn clip(self, start: u64, end: u64) -> impl Iterator<Item = Extent> {
        let (s, e) = (self.gfn.0.max(start), self.end().min(end));
        let piece = |from: u64, to: u64, huge: bool| {
            (from < to).then(|| Extent {
                gfn: Gfn(from),
                pfn: Pfn(self.pfn.0 + (from - self.gfn.0)),
                frames: to - from,
                huge,
            })
        };
        let (up, down) = if self.huge {
            (s.next_multiple_of(PTRS_PER_PMD), e & !(PTRS_PER_PMD - 1))
        } else {
            (e, e)
        };
        let parts = if up < down {
            [piece(s, up, false), piece(up, down, true), piece(down, e, false)]
        } else {
            [piece(s, e, false), None, None]
        };
        parts.into_iter().flatten()
    }
}

/// Guest frames mapped to host frames in extents (runs), keyed by their first guest frame.
#[derive(Clone, Debug, Default)]
pub struct ExtentMap {
    /// gfn -> (frames, pfn, huge).
    map: BTreeMap<u64, (u64, u64, bool)>,
    frames: u64,
}

impl ExtentMap {
    fn at(&self, gfn: u64) -> Option<Extent> {
        let (&g, &(frames, pfn, huge)) = self.map.range(..=gfn).next_back()?;
        (gfn < g + frames).then_some(Extent {
            gfn: Gfn(g),
            pfn: Pfn(pfn),
            frames,
            huge,
        })
    }

    /// The host frame backing `gfn` and the extent it lies in.
    pub fn get(&self, gfn: Gfn) -> Option<(Pfn, Extent)> {
        self.at(gfn.0).map(|e| (Pfn(e.pfn.0 + (gfn.0 - e.gfn.0)), e))
    }

    /// Add an extent over guest frames that have no backing, merged with its neighbours when
    /// it continues them in both address spaces.
    pub fn insert(&mut self, e: Extent) {
        if e.frames == 0 {
            return;
        }
        debug_assert!(
            self.iter_range(e.gfn.0, e.end()).next().is_none(),
            "overlapping extent {e:?}"
        );
        self.frames += e.frames;
        let mut e = e;
        if let Some(prev) = e.gfn.0.checked_sub(1).and_then(|g| self.at(g))
            && prev.huge == e.huge
            && prev.pfn.0 + prev.frames == e.pfn.0
        {
            self.map.remove(&prev.gfn.0);
            e = Extent {
                gfn: prev.gfn,
                pfn: prev.pfn,
                frames: prev.frames + e.frames,
                huge: e.huge,
            };
        }
        if let Some(next) = self.at(e.end())
            && next.huge == e.huge
            && e.pfn.0 + e.frames == next.pfn.0
        {
            self.map.remove(&next.gfn.0);
            e.frames += next.frames;
        }
        self.map.insert(e.gfn.0, (e.frames, e.pfn.0, e.huge));
    }

    /// The extents over guest frames `[start, end)`, clipped to it, in order.
    pub fn iter_range(&self, start: u64, end: u64) -> impl Iterator<Item = Extent> + '_ {
        self.touching(start, end).flat_map(move |e| e.clip(start, end))
    }

    /// The whole extents that reach into guest frames `[start, end)`, in order, unclipped
    /// (none when `start >= end`).
    fn touching(&self, start: u64, end: u64) -> impl Iterator<Item = Extent> + '_ {
        let first = self.at(start).map_or(start, |e| e.gfn.0);
        // `BTreeMap::range` panics on a range whose start is above its end: an empty range
        // (`end <= start`) looks up nothing.
        let range = if start < end { first..end } else { 0..0 };
        self.map
            .range(range)
            .map(|(&g, &(frames, pfn, huge))| Extent {
                gfn: Gfn(g),
                pfn: Pfn(pfn),
                frames,
                huge,
            })
            .filter(move |e| e.end() > start)
    }

    /// Remove the backing of guest frames `[start, end)` and return what it was, in order.
    pub fn remove(&mut self, start: u64, end: u64) -> Vec<Extent> {
        let hit: Vec<Extent> = self.touching(start, end).collect();
        let mut out = Vec::new();
        for e in hit {
            self.map.remove(&e.gfn.0);
            self.frames -= e.frames;
            for keep in e.clip(e.gfn.0, start).chain(e.clip(end, e.end())) {
                self.frames += keep.frames;
                self.map.insert(keep.gfn.0, (keep.frames, keep.pfn.0, keep.huge));
            }
            out.extend(e.clip(start, end));
        }
        out
    }

    /// Remove everything and return it, in order.
    pub fn take(&mut self) -> Vec<Extent> {
        self.frames = 0;
        std::mem::take(&mut self.map)
            .into_iter()
            .map(|(g, (frames, pfn, huge))| Extent {
                gfn: Gfn(g),
                pfn: Pfn(pfn),
                frames,
                huge,
            })
            .collect()
    }

    /// Frames mapped.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Approximate bytes of the map.
    pub fn bytes(&self) -> usize {
        self.map.len() * 40
    }
}

/// One guest's memory: guest_memfd-backed private frames, the VMM's shared frames, and the
/// memory attributes (`KVM_SET_MEMORY_ATTRIBUTES`) that say which side a guest frame is on.
/// Backing is kept in extents, so a guest costs a few entries per run of frames it touched.
#[derive(Debug, Default)]
pub struct GuestMemfd {
    /// The memslots' guest frame intervals `[start, end)`, in address order.
    slots: Vec<(u64, u64)>,
    private: ExtentMap,
    shared: ExtentMap,
    private_attr: RangeSet,
}

impl GuestMemfd {
    /// Add a memslot of guest frames `[start, start + frames)` backed by guest_memfd; its
    /// attribute starts private if `private`, else shared (KVM's default). A slot that
    /// overlaps one already there is refused, and that slot's `(start, end)` returned: KVM's
    /// `__kvm_set_memory_region` (virt/kvm/kvm_main.c) refuses a new slot for which
    /// `kvm_check_memslot_overlap` finds another with `-EEXIST`.
    pub fn add_slot(&mut self, start: Gfn, frames: u64, private: bool) -> Result<(), (Gfn, Gfn)> {
        let end = start.0.saturating_add(frames);
        // Kept in address order (disjoint, so sorted by end too), for `first_uncovered`.
        let at = self.slots.partition_point(|&(s, _)| s < start.0);
        let before = at.checked_sub(1).and_then(|i| self.slots.get(i));
        let overlap = before
            .filter(|&&(_, e)| e > start.0)
            .or_else(|| self.slots.get(at).filter(|&&(s, _)| s < end));
        if let Some(&(s, e)) = overlap {
            return Err((Gfn(s), Gfn(e)));
        }
        self.slots.insert(at, (start.0, end));
        if private {
            self.private_attr.insert(start.0, end);
        }
        Ok(())
    }

    /// Whether the memslots cover every frame of `[start, end)`.
    pub fn covers(&self, start: Gfn, end: Gfn) -> bool {
        self.first_uncovered(start, end).is_none()
    }

    /// The first frame of `[start, end)` no memslot covers, if any: a walk over the slots in
    /// address order, so its cost is in the number of slots, never in the range's size (a
    /// range one page past a 2^40-byte slot is answered at once).
    pub fn first_uncovered(&self, start: Gfn, end: Gfn) -> Option<Gfn> {
        let mut at = start.0;
        for &(s, e) in &self.slots {
            if at >= end.0 || s > at {
                break;
            }
            at = at.max(e);
        }
        (at < end.0).then_some(Gfn(at))
    }

    /// Whether a memslot covers `gfn`.
    pub fn in_slot(&self, gfn: Gfn) -> bool {
        self.slots.iter().any(|&(s, e)| (s..e).contains(&gfn.0))
    }

    /// Frames of guest memory the memslots describe.
    pub fn slot_frames(&self) -> u64 {
        self.slots.iter().map(|&(s, e)| e - s).sum()
    }

    /// The private (guest_memfd) frame backing `gfn`, if one is allocated.
    pub fn private_pfn(&self, gfn: Gfn) -> Option<Pfn> {
        self.private.get(gfn).map(|(p, _)| p)
    }

    /// The private frame backing `gfn` and the extent it lies in.
    pub fn private_extent(&self, gfn: Gfn) -> Option<(Pfn, Extent)> {
        self.private.get(gfn)
    }

    /// Record that `pfn` now backs `gfn` privately (a 4 KiB folio).
    pub fn set_private(&mut self, gfn: Gfn, pfn: Pfn) {
        self.add_private(Extent {
            gfn,
            pfn,
            frames: 1,
            huge: false,
        });
    }

    /// Record a run of private backing over guest frames that have none.
    pub fn add_private(&mut self, e: Extent) {
        self.private.insert(e);
    }

    /// The private backing over `[start, end)`, in order.
    pub fn private_extents(&self, start: Gfn, end: Gfn) -> impl Iterator<Item = Extent> + '_ {
        self.private.iter_range(start.0, end.0)
    }

    /// Remove the private backing of `[start, end)` (a hole punch) and return it.
    pub fn punch(&mut self, start: Gfn, end: Gfn) -> Vec<Extent> {
        self.private.remove(start.0, end.0)
    }

    /// Remove every private frame and return them.
    pub fn take_private(&mut self) -> Vec<Extent> {
        self.private.take()
    }

    /// The shared (VMM memory) frame backing `gfn`, if one is allocated.
    pub fn shared_pfn(&self, gfn: Gfn) -> Option<Pfn> {
        self.shared.get(gfn).map(|(p, _)| p)
    }

    /// Record that `pfn` backs `gfn` in shared memory.
    pub fn set_shared(&mut self, gfn: Gfn, pfn: Pfn) {
        self.shared.insert(Extent {
            gfn,
            pfn,
            frames: 1,
            huge: false,
        });
    }

    /// Remove the shared frames of `[start, end)` and return them.
    pub fn remove_shared(&mut self, start: Gfn, end: Gfn) -> Vec<Extent> {
        self.shared.remove(start.0, end.0)
    }

    /// Drop every shared frame and return them.
    pub fn take_shared(&mut self) -> Vec<Extent> {
        self.shared.take()
    }

    /// Whether `gfn`'s attribute is shared (not `KVM_MEMORY_ATTRIBUTE_PRIVATE`).
    pub fn is_shared(&self, gfn: Gfn) -> bool {
        !self.private_attr.contains(gfn.0)
    }

    /// Whether every frame of `[start, end)` is private.
    pub fn is_private_range(&self, start: Gfn, end: Gfn) -> bool {
        self.private_attr.covers(start.0, end.0)
    }

    /// How many frames of `[start, end)` have the private attribute.
    pub fn private_attr_frames(&self, start: Gfn, end: Gfn) -> u64 {
        self.private_attr.count(start.0, end.0)
    }

    /// Set the attribute of `[start, end)` (`KVM_SET_MEMORY_ATTRIBUTES`).
    pub fn set_attr(&mut self, start: Gfn, end: Gfn, private: bool) {
        if private {
            self.private_attr.insert(start.0, end.0);
        } else {
            self.private_attr.remove(start.0, end.0);
        }
    }

    /// Whether a memslot covers all of 2 MiB-aligned guest region `[start, start + 512)` and
    /// none of it has private backing: a 2 MiB folio can back it.
    pub fn folio_fits(&self, start: Gfn) -> bool {
        let end = Gfn(start.0 + PTRS_PER_PMD);
        self.covers(start, end) && self.private.iter_range(start.0, end.0).next().is_none()
    }

    /// Approximate bytes of the maps.
    pub fn footprint_bytes(&self) -> usize {
        self.private.bytes() + self.shared.bytes() + self.private_attr.bytes() + self.slots.len() * 16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `BTreeMap::range(a..b)` panics when `a > b`: a reversed range is empty, not a panic.
    #[test]
    fn reversed_ranges_hold_nothing_and_do_not_panic() {
        // Entries above the range (the lookup starts at `start`, above `end`) and over it
        // (the lookup starts below `end`).
        let mut set = RangeSet::default();
        set.insert(100, 200);
        assert_eq!(set.count(10, 5), 0);
        set.insert(0, 20);
        assert_eq!(set.count(10, 5), 0);
        assert_eq!(set.count(5, 10), 5);
        let mut map = ExtentMap::default();
        let extent = |gfn, pfn| Extent {
            gfn: Gfn(gfn),
            pfn: Pfn(pfn),
            frames: 20,
            huge: false,
        };
        map.insert(extent(100, 0x1000));
        assert_eq!(map.iter_range(10, 5).count(), 0);
        assert!(map.remove(10, 5).is_empty());
        map.insert(extent(0, 0x2000));
        assert_eq!(map.iter_range(10, 5).count(), 0);
        assert!(map.remove(10, 5).is_empty());
        assert_eq!(map.frames(), 40, "a reversed remove keeps every frame once");
        let mut g = GuestMemfd::default();
        g.add_slot(Gfn(100), 20, true).unwrap();
        assert_eq!(g.private_attr_frames(Gfn(10), Gfn(5)), 0);
        assert_eq!(g.private_extents(Gfn(10), Gfn(5)).count(), 0);
    }

    #[test]
    fn a_tebibyte_host_is_free_until_touched() {
        let mut m = HostMemory::new(DEFAULT_FIRST_PFN, TIB);
        assert_eq!(m.end_pfn().0 - m.first_pfn().0, 1 << 28);
        assert!(m.bookkeeping_bytes() < 1024);
        let p = m.alloc().unwrap();
        assert_eq!(p, Pfn(DEFAULT_FIRST_PFN), "real-looking address above 4 GiB");
        assert!(
            p.is_2m_aligned(),
            "the allocator hands out 2 MiB-aligned frames too"
        );
        let mut buf = [0xaa; 4096];
        m.read(p, &mut buf).unwrap();
        assert_eq!(buf, [0; 4096], "allocated frames read as zero");
        let mut varied = [7; 4096];
        varied[9] = 8;
        m.write(p, &varied).unwrap();
        assert_eq!(m.backed_frames(), 1);
        m.write(p, &[0; 4096]).unwrap();
        assert_eq!(m.backed_frames(), 0, "zero frames give their storage back");
    }

    #[test]
    fn pages_of_one_byte_take_no_storage_and_read_as_their_ciphertext() {
        let mut keys = crate::crypto::KeySource::new(3);
        let (key, other) = (keys.generate(), keys.generate());
        let mut m = HostMemory::new(DEFAULT_FIRST_PFN, 8 * PAGE_SIZE);
        let (p, q, r) = (m.alloc().unwrap(), m.alloc().unwrap(), m.alloc().unwrap());
        let ramp: PageBuf = std::array::from_fn(|i| (i % 251) as u8);
        m.write_encrypted(p, &key, &[0; 4096]).unwrap();
        m.write_encrypted(q, &key, &[5; 4096]).unwrap();
        m.write_encrypted(r, &key, &ramp).unwrap();
        assert_eq!(
            m.backed_frames(),
            1,
            "only the page of varied bytes takes storage"
        );
        assert_eq!(m.contents_bytes(), 4096);
        let mut raw = [0; 4096];
        for (pfn, plain) in [(p, [0; 4096]), (q, [5; 4096]), (r, ramp)] {
            m.read(pfn, &mut raw).unwrap();
            let mut want = plain;
            key.encrypt(pfn, &mut want);
            assert_eq!(raw, want, "DRAM holds the ciphertext at {pfn}");
            m.read_decrypted(pfn, &key, &mut raw).unwrap();
            assert_eq!(raw, plain);
            m.read_decrypted(pfn, &key.clone(), &mut raw).unwrap();
            assert_eq!(raw, plain, "a handle to the same key");
            m.read_decrypted(pfn, &other, &mut raw).unwrap();
            want = plain;
            key.encrypt(pfn, &mut want);
            other.decrypt(pfn, &mut want);
            assert_eq!(raw, want, "another key reads noise");
            assert_ne!(raw, plain);
        }
        // In the clear: a page of one byte takes no storage either, and reads back as written.
        m.write(p, &[1; 4096]).unwrap();
        m.write(q, &ramp).unwrap();
        assert_eq!(m.backed_frames(), 2, "the two pages of varied bytes");
        m.read(p, &mut raw).unwrap();
        assert_eq!(raw, [1; 4096]);
        // One byte off is a page of varied bytes.
        let mut almost = [7; 4096];
        almost[4095] = 8;
        m.write_encrypted(p, &key, &almost).unwrap();
        assert_eq!(m.backed_frames(), 3);
        m.read_decrypted(p, &key, &mut raw).unwrap();
        assert_eq!(raw, almost);
        // Overwritten, freed and reallocated like any contents.
        m.write_encrypted(p, &other, &[0; 4096]).unwrap();
        m.write(q, &[0; 4096]).unwrap();
        m.write_encrypted(r, &other, &[0xff; 4096]).unwrap();
        assert_eq!((m.backed_frames(), m.peaks().1), (0, 3));
        m.free(p).unwrap();
        assert_eq!(m.alloc().unwrap(), p);
        m.read(p, &mut raw).unwrap();
        assert_eq!(raw, [0; 4096], "reallocated frames are zeroed");
        m.read_decrypted(r, &other, &mut raw).unwrap();
        assert_eq!(raw, [0xff; 4096]);
        m.write(p, &[1; 4096]).unwrap();
        m.write(q, &ramp).unwrap();
        m.free(q).unwrap();
        m.free(p).unwrap();
        assert_eq!(m.backed_frames(), 0, "freed frames drop their contents");
        let again = m.alloc().unwrap();
        m.read(again, &mut raw).unwrap();
        assert_eq!(raw, [0; 4096], "and their byte");
        // A run of them costs one interval, whatever its length.
        let mut big = HostMemory::new(DEFAULT_FIRST_PFN, 1 << 30);
        let (first, n) = big.alloc_run(1 << 18).unwrap();
        let before = big.bookkeeping_bytes();
        for i in 0..n {
            big.write_encrypted(Pfn(first.0 + i), &key, &[0xff; 4096])
                .unwrap();
        }
        let mut one = LabelledFrames::default();
        one.set(
            0,
            &Fill {
                key: Some(key.clone()),
                byte: 0xff,
            },
        );
        assert_eq!(
            big.bookkeeping_bytes() - before,
            one.bytes(),
            "one label, one run"
        );
        big.free_run(first, n).unwrap();
        let again = big.alloc().unwrap();
        big.read(again, &mut raw).unwrap();
        assert!(
            again.0 < first.0 + n && raw == [0; 4096],
            "freed frames forget their key"
        );
    }

    #[test]
    fn fill_byte_finds_a_page_of_one_byte_and_nothing_else() {
        assert_eq!(fill_byte(&[0; 4096]), Some(0));
        assert_eq!(fill_byte(&[0xa5; 4096]), Some(0xa5));
        for at in [0, 1, 31, 32, 2048, 4095] {
            let mut page = [0xa5; 4096];
            page[at] ^= 1;
            assert_eq!(fill_byte(&page), None, "byte {at} differs");
        }
    }

    /// What the dirty-line tracking and the pages of one byte rely on: one label per frame, the
    /// counts a free reports as unflushed, and a run costing one interval.
    #[test]
    fn labelled_frames_hold_one_label_per_frame_as_runs() {
        let mut l = LabelledFrames::<u32>::default();
        for p in 100..200 {
            l.set(p, &1);
        }
        assert_eq!((l.frames(), l.bytes()), (100, size_of::<(u64, (u64, u32))>() + 8));
        l.set(150, &2);
        assert_eq!(
            (l.label(149), l.label(150), l.label(200)),
            (Some(&1), Some(&2), None)
        );
        assert_eq!(l.frames(), 100, "relabelled, not added");
        l.set(150, &1);
        assert_eq!(l.bytes(), size_of::<(u64, (u64, u32))>() + 8, "one run again");
        l.set(150, &2);
        assert_eq!(l.remove_label(140, 160, &1), 19, "only label 1's frames");
        assert_eq!(l.label(150), Some(&2));
        assert_eq!(
            (l.label(139), l.label(140), l.label(160)),
            (Some(&1), None, Some(&1))
        );
        assert_eq!(l.remove(0, 1000), 81);
        assert_eq!((l.frames(), l.bytes()), (0, 0), "an emptied label goes");
        // Many labels, interleaved: each frame keeps its own, and runs merge as they touch.
        for p in 0..512 {
            l.set(p, &((p % 256) as u32));
        }
        assert_eq!((l.frames(), l.label(300), l.label(512)), (512, Some(&44), None));
        for p in 0..512 {
            l.set(p, &9);
        }
        assert_eq!(
            l.bytes(),
            size_of::<(u64, (u64, u32))>() + 8,
            "one run of label 9"
        );
        assert_eq!(l.remove(100, 101) + l.remove(100, 101), 1);
        assert_eq!(
            (l.label(99), l.label(100), l.label(101)),
            (Some(&9), None, Some(&9))
        );
        l.set(7, &3);
        l.clear();
        assert_eq!(l.label(7), None);
    }

    /// Random sets and removals against a model of one optional label per frame: every frame's
    /// label, the counts returned and kept, and the runs in their one canonical form (disjoint,
    /// non-empty, touching runs of different labels), so that bytes are the fewest runs.
    #[test]
    fn labelled_frames_agree_with_a_label_per_frame() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut l = LabelledFrames::<u32>::default();
        let mut model = [None; 300];
        for step in 0..5_000 {
            let (a, b) = (next(300), next(300));
            let (start, end) = (a.min(b), a.max(b) + 1);
            let k = next(5) as u32;
            let range = start as usize..end as usize;
            match next(4) {
                0 | 1 => {
                    l.set(a, &k);
                    model[a as usize] = Some(k);
                }
                2 => {
                    let want = model[range.clone()].iter().filter(|m| m.is_some()).count() as u64;
                    assert_eq!(l.remove(start, end), want, "step {step}");
                    model[range].fill(None);
                }
                _ => {
                    let hit = |m: &Option<u32>| *m == Some(k);
                    let want = model[range.clone()].iter().filter(|m| hit(m)).count() as u64;
                    assert_eq!(l.remove_label(start, end, &k), want, "step {step}");
                    model[range].iter_mut().filter(|m| hit(m)).for_each(|m| *m = None);
                }
            }
            for (p, m) in model.iter().enumerate() {
                assert_eq!(l.label(p as u64), m.as_ref(), "step {step}, frame {p}");
            }
            assert_eq!(l.frames(), model.iter().filter(|m| m.is_some()).count() as u64);
            let runs = model
                .iter()
                .enumerate()
                .filter(|&(p, m)| m.is_some() && (p == 0 || model[p - 1] != *m))
                .count();
            assert_eq!(
                l.bytes(),
                runs * (size_of::<(u64, (u64, u32))>() + 8),
                "step {step}"
            );
        }
    }

    #[test]
    fn free_list_reuses_and_rejects_double_free() {
        let mut m = HostMemory::new(DEFAULT_FIRST_PFN, 4 * PAGE_SIZE);
        let a = m.alloc().unwrap();
        let b = m.alloc().unwrap();
        m.write(a, &[1; 4096]).unwrap();
        m.free(a).unwrap();
        assert_eq!(m.free(a), Err(MemError::NotAllocated { pfn: a }));
        let c = m.alloc().unwrap();
        assert_eq!(c, a, "LIFO free list");
        let mut buf = [1; 4096];
        m.read(c, &mut buf).unwrap();
        assert_eq!(buf, [0; 4096], "reallocated frames are zeroed");
        m.leak(b).unwrap();
        assert_eq!(m.leaked(), vec![b]);
        m.alloc().unwrap();
        m.alloc().unwrap();
        assert!(matches!(m.alloc(), Err(MemError::OutOfMemory { frames: 4 })));
        let mut big = HostMemory::new(DEFAULT_FIRST_PFN, 8 << 20);
        let a = big.alloc_2m_aligned().unwrap();
        let b = big.alloc_2m_aligned().unwrap();
        assert!(a.is_2m_aligned() && b.is_2m_aligned() && a != b);
        assert_eq!(a.0, DEFAULT_FIRST_PFN + 3 * 512);
        assert!(matches!(
            m.write(Pfn(1), &[0; 4096]),
            Err(MemError::OutOfRange { .. })
        ));
    }

    /// The first frame no memslot covers comes from the slots' intervals, whatever their
    /// order of addition and however large the range.
    #[test]
    fn the_first_uncovered_frame_is_found_from_the_slot_intervals() {
        let mut g = GuestMemfd::default();
        assert_eq!(g.first_uncovered(Gfn(3), Gfn(4)), Some(Gfn(3)));
        assert_eq!(
            g.first_uncovered(Gfn(3), Gfn(3)),
            None,
            "an empty range is covered"
        );
        g.add_slot(Gfn(1 << 39), 16, false).unwrap();
        g.add_slot(Gfn(0), 1 << 39, false).unwrap();
        g.add_slot(Gfn((1 << 39) + 32), 16, false).unwrap();
        assert_eq!(g.first_uncovered(Gfn(0), Gfn((1 << 39) + 16)), None);
        assert_eq!(
            g.first_uncovered(Gfn(0), Gfn((1 << 39) + 17)),
            Some(Gfn((1 << 39) + 16))
        );
        assert_eq!(
            g.first_uncovered(Gfn(5), Gfn(u64::MAX)),
            Some(Gfn((1 << 39) + 16))
        );
        assert_eq!(
            g.first_uncovered(Gfn((1 << 39) + 20), Gfn((1 << 39) + 40)),
            Some(Gfn((1 << 39) + 20))
        );
        assert_eq!(
            g.first_uncovered(Gfn((1 << 39) + 32), Gfn((1 << 39) + 49)),
            Some(Gfn((1 << 39) + 48))
        );
        assert!(g.covers(Gfn((1 << 39) + 32), Gfn((1 << 39) + 48)));
    }

    /// KVM's `__kvm_set_memory_region` refuses a slot overlapping another (-EEXIST): every
    /// way of overlapping is refused, naming the slot overlapped; touching is fine.
    #[test]
    fn an_overlapping_memslot_is_refused() {
        let mut g = GuestMemfd::default();
        g.add_slot(Gfn(0x100), 0x100, false).unwrap();
        let taken = Err((Gfn(0x100), Gfn(0x200)));
        for (start, frames) in [(0x100, 0x100), (0xff, 2), (0x1ff, 5), (0x120, 1), (0, 0x1000)] {
            assert_eq!(
                g.add_slot(Gfn(start), frames, true),
                taken,
                "{start:#x}+{frames:#x}"
            );
        }
        g.add_slot(Gfn(0x200), 0x10, false).unwrap();
        g.add_slot(Gfn(0x80), 0x80, false).unwrap();
        assert_eq!(g.add_slot(Gfn(0x20f), 1, false), Err((Gfn(0x200), Gfn(0x210))));
        assert_eq!(g.slot_frames(), 0x190, "refused slots count nothing");
        assert!(g.covers(Gfn(0x80), Gfn(0x210)) && !g.covers(Gfn(0x80), Gfn(0x211)));
        assert_eq!(
            g.private_attr_frames(Gfn(0), Gfn(0x1000)),
            0,
            "nor set an attribute"
        );
    }

    /// `alloc_at` of a frame for a guest page at an offset other than 0 in its 2 MiB region
    /// never returns a 2 MiB-aligned frame, from never-used or freed frames (AMD erratum 1467
    /// for a VMSA); offset 0 takes what `alloc` takes.
    #[test]
    fn alloc_at_an_unaligned_offset_never_returns_a_2m_aligned_frame() {
        let mut m = HostMemory::new(DEFAULT_FIRST_PFN, 16 << 20);
        assert!(Pfn(DEFAULT_FIRST_PFN).is_2m_aligned());
        let mut got = Vec::new();
        for i in 0..1500u64 {
            let offset = if i % 5 == 0 { 0 } else { i % 512 };
            let p = m.alloc_at(offset).unwrap();
            assert!(offset == 0 || !p.is_2m_aligned(), "offset {offset}: {p}");
            got.push(p);
        }
        // Freed singly and in runs, 2 MiB-aligned frames on top of the stack.
        for p in got.iter().filter(|p| !p.is_2m_aligned()) {
            m.free(*p).unwrap();
        }
        for p in got.iter().filter(|p| p.is_2m_aligned()) {
            m.free(*p).unwrap();
        }
        for i in 1..3000u64 {
            let offset = i % 512;
            let p = m.alloc_at(offset).unwrap();
            assert!(
                offset == 0 || !p.is_2m_aligned(),
                "recycled, offset {offset}: {p}"
            );
        }
    }

    #[test]
    fn gmem_slots_and_holes() {
        let mut g = GuestMemfd::default();
        g.add_slot(Gfn(0x100), 16, true).unwrap();
        assert!(g.in_slot(Gfn(0x10f)) && !g.in_slot(Gfn(0x110)));
        assert!(g.covers(Gfn(0x100), Gfn(0x110)) && !g.covers(Gfn(0x100), Gfn(0x111)));
        g.set_private(Gfn(0x101), Pfn(9));
        assert_eq!(g.private_pfn(Gfn(0x101)), Some(Pfn(9)));
        let backed: Vec<Gfn> = g.private_extents(Gfn(0x100), Gfn(0x110)).map(|e| e.gfn).collect();
        assert_eq!(backed, vec![Gfn(0x101)]);
        let punched = g.punch(Gfn(0x101), Gfn(0x102));
        assert_eq!(
            punched,
            vec![Extent {
                gfn: Gfn(0x101),
                pfn: Pfn(9),
                frames: 1,
                huge: false
            }]
        );
        assert_eq!(g.private_pfn(Gfn(0x101)), None);
        assert!(!g.is_shared(Gfn(0x102)), "the slot was added private");
        g.set_attr(Gfn(0x102), Gfn(0x103), false);
        assert!(g.is_shared(Gfn(0x102)));
        assert!(!g.is_private_range(Gfn(0x100), Gfn(0x110)));
        g.set_attr(Gfn(0x102), Gfn(0x103), true);
        assert!(g.is_private_range(Gfn(0x100), Gfn(0x110)));
        let mut kvm_default = GuestMemfd::default();
        kvm_default.add_slot(Gfn(0), 8, false).unwrap();
        assert!(kvm_default.is_shared(Gfn(3)), "KVM's default attribute is shared");
    }

    #[test]
    fn range_sets_merge_split_and_answer_coverage() {
        let mut r = RangeSet::default();
        r.insert(10, 20);
        r.insert(20, 30);
        r.insert(40, 50);
        assert_eq!(r.intervals(), 2, "adjacent ranges merge");
        assert!(r.covers(10, 30) && !r.covers(10, 41) && r.covers(5, 5));
        r.insert(25, 45);
        assert_eq!(r.intervals(), 1);
        r.remove(15, 16);
        assert_eq!(r.intervals(), 2);
        assert!(r.contains(14) && !r.contains(15) && r.contains(16) && !r.contains(50));
        r.remove(0, 100);
        assert_eq!(r.intervals(), 0);
        // A tebibyte of 4 KiB frames is one interval.
        r.insert(0, 1 << 28);
        assert!(r.covers(0, 1 << 28) && r.intervals() == 1);
    }

    #[test]
    fn runs_come_from_the_most_recent_free_run_and_count_once() {
        let mut m = HostMemory::new(DEFAULT_FIRST_PFN, 64 << 20);
        let (a, n) = m.alloc_run(100).unwrap();
        assert_eq!((a, n), (Pfn(DEFAULT_FIRST_PFN), 100));
        assert_eq!(m.allocated(), 100);
        m.free_run(Pfn(a.0 + 10), 20).unwrap();
        assert_eq!(
            m.free_run(Pfn(a.0 + 15), 1),
            Err(MemError::NotAllocated { pfn: Pfn(a.0 + 15) })
        );
        assert_eq!(m.allocated(), 80);
        // The last frame freed is the first handed out again.
        assert_eq!(m.alloc().unwrap(), Pfn(a.0 + 29));
        assert_eq!(
            m.alloc_run(100).unwrap(),
            (Pfn(a.0 + 10), 19),
            "the rest of that run"
        );
        let folio = m.alloc_2m_run().unwrap();
        assert!(folio.is_2m_aligned() && folio.0 > a.0);
        m.leak_run(Pfn(a.0 + 50), 10).unwrap();
        assert_eq!(m.leaked_count(), 10);
        assert_eq!(m.allocated(), 100 - 10 + 512);
        assert!(m.bookkeeping_bytes() < 1024, "runs, not frames");
    }

    #[test]
    fn extents_merge_split_and_keep_folios_whole() {
        let mut x = ExtentMap::default();
        let e = |gfn, pfn, frames, huge| Extent {
            gfn: Gfn(gfn),
            pfn: Pfn(pfn),
            frames,
            huge,
        };
        x.insert(e(0, 1024, 512, true));
        x.insert(e(512, 1536, 512, true));
        x.insert(e(1024, 5000, 3, false));
        assert_eq!(
            x.map.len(),
            2,
            "contiguous folios merge; a 4 KiB run elsewhere does not"
        );
        assert_eq!(x.get(Gfn(700)), Some((Pfn(1724), e(0, 1024, 1024, true))));
        assert_eq!(x.frames(), 1027);
        // Punching a page out of a folio leaves the rest as 4 KiB folios around it.
        let out = x.remove(600, 601);
        assert_eq!(out, vec![e(600, 1624, 1, false)]);
        assert_eq!(x.get(Gfn(599)).unwrap().1, e(512, 1536, 88, false));
        assert_eq!(x.get(Gfn(10)).unwrap().1, e(0, 1024, 512, true));
        let clipped: Vec<Extent> = x.iter_range(500, 1026).collect();
        assert_eq!(
            clipped,
            vec![
                e(500, 1524, 12, false),
                e(512, 1536, 88, false),
                e(601, 1625, 423, false),
                e(1024, 5000, 2, false)
            ]
        );
        assert_eq!(x.frames(), 1026);
        assert_eq!(x.take().len(), 4);
        assert_eq!(x.frames(), 0);
    }
}
