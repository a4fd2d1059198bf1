//! Host physical memory and guest memory.
//!
//! [`HostMemory`] is the machine's DRAM: 4 KiB frames at real-looking physical addresses
//! (starting above the 4 GiB hole), allocated by a page allocator with a free list, and backed
//! by storage only once a frame holds non-zero bytes. A 1 TiB host costs a few words until used.
//!
//! [`GuestMemfd`] is one guest's memory as KVM's guest_memfd gives it: memslots of guest frames,
//! each backed by a host frame allocated on first use (`kvm_gmem_get_pfn`), which a hole punch
//! (`fallocate(PUNCH_HOLE)`) removes again. Frames the guest converted to shared live in a
//! separate map, as the VMM's ordinary (userspace) memory does.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use vmsa_core::{Gfn, PAGE_SIZE, PageBuf, Pfn};

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

/// The host's DRAM and its page allocator.
#[derive(Debug)]
pub struct HostMemory {
    first: u64,
    end: u64,
    next: u64,
    free: Vec<u64>,
    allocated: HashSet<u64>,
    leaked: BTreeSet<u64>,
    data: HashMap<u64, Box<PageBuf>>,
    peak_allocated: usize,
    peak_data: usize,
    aligned_top: Option<u64>,
}

impl HostMemory {
    /// DRAM of `bytes` (rounded down to whole frames) starting at frame `first_pfn`.
    pub fn new(first_pfn: u64, bytes: u64) -> Self {
        Self {
            first: first_pfn,
            end: first_pfn.saturating_add(bytes / PAGE_SIZE),
            next: first_pfn,
            free: Vec::new(),
            allocated: HashSet::new(),
            leaked: BTreeSet::new(),
            data: HashMap::new(),
            peak_allocated: 0,
            peak_data: 0,
            aligned_top: None,
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

    /// Allocate one zeroed frame: the most recently freed one, else the next never-used one
    /// (which may be 2 MiB aligned, like any buddy-allocator page).
    pub fn alloc(&mut self) -> Result<Pfn, MemError> {
        let pfn = match self.free.pop() {
            Some(p) => p,
            None if self.next < self.aligned_top.unwrap_or(self.end) => {
                self.next += 1;
                self.next - 1
            }
            None => {
                return Err(MemError::OutOfMemory {
                    frames: self.end - self.first,
                });
            }
        };
        self.data.remove(&pfn);
        self.allocated.insert(pfn);
        self.peak_allocated = self.peak_allocated.max(self.allocated.len());
        Ok(Pfn(pfn))
    }

    /// Allocate a 2 MiB-aligned frame (what a buddy allocator returns when it splits a fresh
    /// 2 MiB block), taken from the top of DRAM downwards.
    pub fn alloc_2m_aligned(&mut self) -> Result<Pfn, MemError> {
        let top = self.aligned_top.unwrap_or(self.end) & !511;
        let pfn = top.checked_sub(512).filter(|&p| p >= self.next.max(self.first));
        let Some(pfn) = pfn.filter(|p| !self.allocated.contains(p) && !self.leaked.contains(p)) else {
            return Err(MemError::OutOfMemory {
                frames: self.end - self.first,
            });
        };
        self.aligned_top = Some(pfn);
        self.data.remove(&pfn);
        self.allocated.insert(pfn);
        self.peak_allocated = self.peak_allocated.max(self.allocated.len());
        Ok(Pfn(pfn))
    }

    /// Give a frame back to the allocator.
    pub fn free(&mut self, pfn: Pfn) -> Result<(), MemError> {
        if !self.allocated.remove(&pfn.0) {
            return Err(MemError::NotAllocated { pfn });
        }
        self.free.push(pfn.0);
        Ok(())
    }

    /// Take a frame out of circulation for good (`snp_leak_pages`).
    pub fn leak(&mut self, pfn: Pfn) -> Result<(), MemError> {
        if !self.allocated.remove(&pfn.0) {
            return Err(MemError::NotAllocated { pfn });
        }
        self.leaked.insert(pfn.0);
        Ok(())
    }

    /// Whether the frame is currently handed out.
    pub fn is_allocated(&self, pfn: Pfn) -> bool {
        self.allocated.contains(&pfn.0)
    }

    /// Whether the frame was leaked.
    pub fn is_leaked(&self, pfn: Pfn) -> bool {
        self.leaked.contains(&pfn.0)
    }

    /// Frames currently handed out.
    pub fn allocated(&self) -> usize {
        self.allocated.len()
    }

    /// Frames leaked so far.
    pub fn leaked(&self) -> Vec<Pfn> {
        self.leaked.iter().map(|&p| Pfn(p)).collect()
    }

    /// The raw bytes of a frame as they sit in DRAM (ciphertext for encrypted frames).
    pub fn read(&self, pfn: Pfn, out: &mut PageBuf) -> Result<(), MemError> {
        self.check(pfn)?;
        match self.data.get(&pfn.0) {
            Some(d) => out.copy_from_slice(&d[..]),
            None => out.fill(0),
        }
        Ok(())
    }

    /// Store raw bytes into a frame. An all-zero frame gives its storage back.
    pub fn write(&mut self, pfn: Pfn, data: &PageBuf) -> Result<(), MemError> {
        self.check(pfn)?;
        if data.iter().all(|&b| b == 0) {
            self.data.remove(&pfn.0);
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

    /// Frames that hold non-zero bytes (and so take storage).
    pub fn backed_frames(&self) -> usize {
        self.data.len()
    }

    /// Bytes the sparse structures take now (approximate: entry sizes times capacities, plus
    /// 4 KiB per backed frame).
    pub fn footprint_bytes(&self) -> usize {
        self.data.capacity() * (8 + 8 + 8)
            + self.data.len() * PAGE_SIZE as usize
            + self.allocated.capacity() * (8 + 8)
            + self.free.capacity() * 8
            + self.leaked.len() * 16
    }

    /// The most frames ever allocated at once, and the most ever backed by storage at once.
    pub fn peaks(&self) -> (usize, usize) {
        (self.peak_allocated, self.peak_data)
    }
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
        let touching: Vec<(u64, u64)> = self
            .map
            .range(..=end)
            .rev()
            .take_while(|&(_, &ie)| ie >= start)
            .map(|(&is, &ie)| (is, ie))
            .collect();
        for (is, ie) in touching {
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
        let overlapping: Vec<(u64, u64)> = self
            .map
            .range(..end)
            .rev()
            .take_while(|&(_, &ie)| ie > start)
            .map(|(&is, &ie)| (is, ie))
            .collect();
        for (is, ie) in overlapping {
            self.map.remove(&is);
            if is < start {
                self.map.insert(is, start);
            }
            if end < ie {
                self.map.insert(end, ie);
            }
        }
    }

    /// The number of intervals.
    pub fn intervals(&self) -> usize {
        self.map.len()
    }
}

/// One guest's memory: guest_memfd-backed private frames, the VMM's shared frames, and the
/// memory attributes (`KVM_SET_MEMORY_ATTRIBUTES`) that say which side a guest frame is on.
#[derive(Debug, Default)]
pub struct GuestMemfd {
    slots: Vec<(u64, u64)>,
    private: BTreeMap<u64, Pfn>,
    shared: BTreeMap<u64, Pfn>,
    private_attr: RangeSet,
}

impl GuestMemfd {
    /// Add a memslot of guest frames `[start, start + frames)` backed by guest_memfd; its
    /// attribute starts private if `private`, else shared (KVM's default).
    pub fn add_slot(&mut self, start: Gfn, frames: u64, private: bool) {
        let end = start.0.saturating_add(frames);
        self.slots.push((start.0, end));
        if private {
            self.private_attr.insert(start.0, end);
        }
    }

    /// Whether the memslots cover every frame of `[start, end)`.
    pub fn covers(&self, start: Gfn, end: Gfn) -> bool {
        let covered: u64 = self
            .slots
            .iter()
            .map(|&(s, e)| e.min(end.0).saturating_sub(s.max(start.0)))
            .sum();
        covered == end.0.saturating_sub(start.0)
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
        self.private.get(&gfn.0).copied()
    }

    /// Record that `pfn` now backs `gfn` privately.
    pub fn set_private(&mut self, gfn: Gfn, pfn: Pfn) {
        self.private.insert(gfn.0, pfn);
    }

    /// Remove the private backing of `gfn` (hole punch) and return the frame it had.
    pub fn punch(&mut self, gfn: Gfn) -> Option<Pfn> {
        self.private.remove(&gfn.0)
    }

    /// Every private frame, by guest frame.
    pub fn private_frames(&self) -> Vec<(Gfn, Pfn)> {
        self.private.iter().map(|(&g, &p)| (Gfn(g), p)).collect()
    }

    /// The shared (VMM memory) frame backing `gfn`, if one is allocated.
    pub fn shared_pfn(&self, gfn: Gfn) -> Option<Pfn> {
        self.shared.get(&gfn.0).copied()
    }

    /// Record that `pfn` backs `gfn` in shared memory.
    pub fn set_shared(&mut self, gfn: Gfn, pfn: Pfn) {
        self.shared.insert(gfn.0, pfn);
    }

    /// Remove the shared frame of `gfn` and return it.
    pub fn remove_shared(&mut self, gfn: Gfn) -> Option<Pfn> {
        self.shared.remove(&gfn.0)
    }

    /// Drop every shared frame and return them.
    pub fn take_shared(&mut self) -> Vec<Pfn> {
        std::mem::take(&mut self.shared).into_values().collect()
    }

    /// Whether `gfn`'s attribute is shared (not `KVM_MEMORY_ATTRIBUTE_PRIVATE`).
    pub fn is_shared(&self, gfn: Gfn) -> bool {
        !self.private_attr.contains(gfn.0)
    }

    /// Whether every frame of `[start, end)` is private.
    pub fn is_private_range(&self, start: Gfn, end: Gfn) -> bool {
        self.private_attr.covers(start.0, end.0)
    }

    /// Set the attribute of `[start, end)` (`KVM_SET_MEMORY_ATTRIBUTES`).
    pub fn set_attr(&mut self, start: Gfn, end: Gfn, private: bool) {
        if private {
            self.private_attr.insert(start.0, end.0);
        } else {
            self.private_attr.remove(start.0, end.0);
        }
    }

    /// The guest frames of `[start, end)` with a private frame allocated.
    pub fn private_in(&self, start: Gfn, end: Gfn) -> Vec<Gfn> {
        self.private.range(start.0..end.0).map(|(&g, _)| Gfn(g)).collect()
    }

    /// The guest frames of `[start, end)` with a shared frame allocated.
    pub fn shared_in(&self, start: Gfn, end: Gfn) -> Vec<Gfn> {
        self.shared.range(start.0..end.0).map(|(&g, _)| Gfn(g)).collect()
    }

    /// Approximate bytes of the maps.
    pub fn footprint_bytes(&self) -> usize {
        (self.private.len() + self.shared.len() + self.private_attr.intervals()) * 32 + self.slots.len() * 16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tebibyte_host_is_free_until_touched() {
        let mut m = HostMemory::new(DEFAULT_FIRST_PFN, TIB);
        assert_eq!(m.end_pfn().0 - m.first_pfn().0, 1 << 28);
        assert!(m.footprint_bytes() < 1024);
        let p = m.alloc().unwrap();
        assert_eq!(p, Pfn(DEFAULT_FIRST_PFN), "real-looking address above 4 GiB");
        assert!(
            p.is_2m_aligned(),
            "the allocator hands out 2 MiB-aligned frames too"
        );
        let mut buf = [0xaa; 4096];
        m.read(p, &mut buf).unwrap();
        assert_eq!(buf, [0; 4096], "allocated frames read as zero");
        m.write(p, &[7; 4096]).unwrap();
        assert_eq!(m.backed_frames(), 1);
        m.write(p, &[0; 4096]).unwrap();
        assert_eq!(m.backed_frames(), 0, "zero frames give their storage back");
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

    #[test]
    fn gmem_slots_and_holes() {
        let mut g = GuestMemfd::default();
        g.add_slot(Gfn(0x100), 16, true);
        assert!(g.in_slot(Gfn(0x10f)) && !g.in_slot(Gfn(0x110)));
        assert!(g.covers(Gfn(0x100), Gfn(0x110)) && !g.covers(Gfn(0x100), Gfn(0x111)));
        g.set_private(Gfn(0x101), Pfn(9));
        assert_eq!(g.private_pfn(Gfn(0x101)), Some(Pfn(9)));
        assert_eq!(g.private_in(Gfn(0x100), Gfn(0x110)), vec![Gfn(0x101)]);
        assert_eq!(g.punch(Gfn(0x101)), Some(Pfn(9)));
        assert_eq!(g.private_pfn(Gfn(0x101)), None);
        assert!(!g.is_shared(Gfn(0x102)), "the slot was added private");
        g.set_attr(Gfn(0x102), Gfn(0x103), false);
        assert!(g.is_shared(Gfn(0x102)));
        assert!(!g.is_private_range(Gfn(0x100), Gfn(0x110)));
        g.set_attr(Gfn(0x102), Gfn(0x103), true);
        assert!(g.is_private_range(Gfn(0x100), Gfn(0x110)));
        let mut kvm_default = GuestMemfd::default();
        kvm_default.add_slot(Gfn(0), 8, false);
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
}
