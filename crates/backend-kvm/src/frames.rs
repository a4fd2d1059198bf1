//! The pseudo-physical frame space of VMSA-image mode.
//!
//! vmsa-core names host memory by frame number ([`Pfn`]) and physical address ([`Hpa`]). A
//! KVM process has no access to real host-physical addresses, so VMSA-image mode defines its
//! own frame space, in which every frame is backed by memory of this process:
//!
//! | PFN range | `Hpa` range | backing |
//! |---|---|---|
//! | `0` – `HOST_PFN_BASE - 1` | below 4 GiB | nothing (never handed out) |
//! | [`HOST_PFN_BASE`] + n | from 4 GiB | host page n: a page-aligned 4 KiB heap allocation of this process (VMSA pages vmsa-core allocates) |
//! | [`GMEM_PFN_BASE`] + `slot_base` + i | from 1 TiB | page i of the guest_memfd of a guest RAM region (each region gets its own window of [`GMEM_WINDOW_PFNS`] frames) |
//!
//! Host page numbers count up from [`HOST_PFN_BASE`]` + 1`; freed numbers are reused only once
//! the fresh ones run out, so a frame number is stable for the life of its page and alignment in this space is as arbitrary as a
//! real allocator's: vmsa-core's 2 MiB-alignment rule (AMD erratum 1467) applies to it and
//! occasionally refuses a page, as on real hardware. A guest frame resolves to its PFN only
//! through the guest_memfd-backed regions ([`FrameSpace::gmem_pfn`]), the counterpart of
//! `kvm_gmem_get_pfn`.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use vmsa_core::{Gfn, Hpa, PAGE_SIZE, PageBuf, Pfn};

use crate::gmem::{GmemError, GuestRam};

/// First PFN of the host-page range (`Hpa` 4 GiB).
pub const HOST_PFN_BASE: u64 = 0x10_0000;
/// First PFN of the guest_memfd range (`Hpa` 1 TiB).
pub const GMEM_PFN_BASE: u64 = 0x1000_0000;
/// Frames reserved for each guest RAM region (64 GiB).
pub const GMEM_WINDOW_PFNS: u64 = 1 << 24;
/// How many host pages may be live at once (a VMSA per vCPU, with room to spare).
pub const MAX_HOST_PAGES: u64 = 1 << 20;

/// A page-aligned page of host memory.
#[repr(C, align(4096))]
struct AlignedPage([u8; PAGE_SIZE as usize]);

/// Where a frame of the space lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A host page.
    Host(u64),
    /// Page `page` of guest RAM region `region`.
    Guest {
        /// The region's index.
        region: usize,
        /// The page's index in the region.
        page: u64,
    },
}

/// Why a frame operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize)]
pub enum FrameError {
    /// No memory backs the frame.
    #[error("pfn {pfn} is not backed by any host page or guest memory region of this VM")]
    Unbacked {
        /// The frame.
        pfn: Pfn,
    },
    /// All host page numbers are in use.
    #[error("all {MAX_HOST_PAGES} host page numbers are in use")]
    Exhausted,
    /// Guest memory could not be accessed.
    #[error(transparent)]
    Gmem(#[from] GmemError),
}

struct HostFrames {
    live: HashMap<u64, Box<AlignedPage>>,
    /// Leaked pages stay allocated (and unreachable for reuse) until the space is dropped.
    leaked: HashMap<u64, Box<AlignedPage>>,
    free: BTreeSet<u64>,
    next: u64,
}

/// The frame space of one VM.
pub struct FrameSpace {
    host: Mutex<HostFrames>,
    ram: Vec<Arc<GuestRam>>,
}

impl std::fmt::Debug for FrameSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = self.lock();
        f.debug_struct("FrameSpace")
            .field("host_pages", &h.live.len())
            .field("leaked", &h.leaked.len())
            .field("ram_regions", &self.ram.len())
            .finish()
    }
}

impl FrameSpace {
    /// A space whose guest frames are the given guest RAM regions (at most 64 GiB each).
    pub fn new(ram: Vec<Arc<GuestRam>>) -> Self {
        Self {
            host: Mutex::new(HostFrames {
                live: HashMap::new(),
                leaked: HashMap::new(),
                free: BTreeSet::new(),
                // Number 0 would be frame HOST_PFN_BASE, which is 2 MiB aligned.
                next: 1,
            }),
            ram,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HostFrames> {
        // Every update of HostFrames completes before anything can panic.
        self.host.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The guest RAM regions.
    pub fn ram(&self) -> &[Arc<GuestRam>] {
        &self.ram
    }

    /// Allocate a zeroed host page and return its frame.
    pub fn alloc_host(&self) -> Result<Pfn, FrameError> {
        let mut h = self.lock();
        // Fresh numbers first, like a real allocator's spread: a number vmsa-core refused
        // (2 MiB aligned) is not handed straight back.
        let n = if h.next < MAX_HOST_PAGES {
            h.next += 1;
            h.next - 1
        } else {
            h.free.pop_first().ok_or(FrameError::Exhausted)?
        };
        h.live.insert(n, Box::new(AlignedPage([0; PAGE_SIZE as usize])));
        Ok(Pfn(HOST_PFN_BASE + n))
    }

    /// Return a host page; its number may be reused. Returns false if it was not live.
    pub fn free_host(&self, pfn: Pfn) -> bool {
        let Some(Frame::Host(n)) = self.classify(pfn) else {
            return false;
        };
        let mut h = self.lock();
        if h.live.remove(&n).is_some() {
            h.free.insert(n);
            true
        } else {
            false
        }
    }

    /// Take a host page out of circulation: its number is never reused and its memory is kept
    /// until the space is dropped. Returns false if it was not live.
    pub fn leak_host(&self, pfn: Pfn) -> bool {
        let Some(Frame::Host(n)) = self.classify(pfn) else {
            return false;
        };
        let mut h = self.lock();
        match h.live.remove(&n) {
            Some(page) => {
                h.leaked.insert(n, page);
                true
            }
            None => false,
        }
    }

    /// `(live, leaked)` host pages.
    pub fn host_pages(&self) -> (usize, usize) {
        let h = self.lock();
        (h.live.len(), h.leaked.len())
    }

    /// Which memory a frame number names (without checking that it is live).
    pub fn classify(&self, pfn: Pfn) -> Option<Frame> {
        let p = pfn.0;
        if (HOST_PFN_BASE..HOST_PFN_BASE + MAX_HOST_PAGES).contains(&p) {
            return Some(Frame::Host(p - HOST_PFN_BASE));
        }
        let rel = p.checked_sub(GMEM_PFN_BASE)?;
        let region = usize::try_from(rel / GMEM_WINDOW_PFNS).ok()?;
        let page = rel % GMEM_WINDOW_PFNS;
        let ram = self.ram.get(region)?;
        (page < ram.size() / PAGE_SIZE).then_some(Frame::Guest { region, page })
    }

    /// The frame backing guest frame `gfn` through guest_memfd (`kvm_gmem_get_pfn`), or
    /// `None` if no guest_memfd-backed region holds it.
    pub fn gmem_pfn(&self, gfn: Gfn) -> Option<Pfn> {
        let gpa = gfn.gpa().0;
        self.ram.iter().enumerate().find_map(|(i, r)| {
            let off = r.offset_of(gpa, PAGE_SIZE)?;
            Some(Pfn(GMEM_PFN_BASE + i as u64 * GMEM_WINDOW_PFNS + off / PAGE_SIZE))
        })
    }

    /// Read a whole frame.
    pub fn read(&self, pfn: Pfn, buf: &mut PageBuf) -> Result<(), FrameError> {
        match self.classify(pfn).ok_or(FrameError::Unbacked { pfn })? {
            Frame::Host(n) => {
                let h = self.lock();
                let page = h.live.get(&n).ok_or(FrameError::Unbacked { pfn })?;
                buf.copy_from_slice(&page.0);
                Ok(())
            }
            Frame::Guest { region, page } => {
                let r = &self.ram[region];
                r.read(r.gpa() + page * PAGE_SIZE, buf)?;
                Ok(())
            }
        }
    }

    /// Write a whole frame.
    pub fn write(&self, pfn: Pfn, data: &PageBuf) -> Result<(), FrameError> {
        match self.classify(pfn).ok_or(FrameError::Unbacked { pfn })? {
            Frame::Host(n) => {
                let mut h = self.lock();
                let page = h.live.get_mut(&n).ok_or(FrameError::Unbacked { pfn })?;
                page.0.copy_from_slice(data);
                Ok(())
            }
            Frame::Guest { region, page } => {
                let r = &self.ram[region];
                r.write(r.gpa() + page * PAGE_SIZE, data)?;
                Ok(())
            }
        }
    }

    /// Read the page at a physical address of this space (what the hardware does when a VMCB
    /// points at a VMSA).
    pub fn read_hpa(&self, hpa: Hpa, buf: &mut PageBuf) -> Result<(), FrameError> {
        self.read(hpa.pfn(), buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_pages_are_numbered_reused_and_leaked() {
        let fs = FrameSpace::new(Vec::new());
        let a = fs.alloc_host().unwrap();
        let b = fs.alloc_host().unwrap();
        assert_eq!((a, b), (Pfn(HOST_PFN_BASE + 1), Pfn(HOST_PFN_BASE + 2)));
        let mut page = [7u8; 4096];
        fs.write(b, &page).unwrap();
        page.fill(0);
        fs.read(b, &mut page).unwrap();
        assert_eq!(page[4095], 7);
        assert!(fs.free_host(a));
        assert!(!fs.free_host(a), "double free is refused");
        let c = fs.alloc_host().unwrap();
        assert_eq!(c, Pfn(HOST_PFN_BASE + 3), "fresh numbers come first");
        assert!(fs.leak_host(b));
        assert_eq!(fs.host_pages(), (1, 1));
        assert_eq!(
            fs.read(b, &mut page),
            Err(FrameError::Unbacked { pfn: b }),
            "a leaked page is out of circulation"
        );
        {
            let mut h = fs.lock();
            h.next = MAX_HOST_PAGES;
        }
        assert_eq!(
            fs.alloc_host().unwrap(),
            a,
            "freed numbers are reused when fresh ones run out"
        );
        assert_eq!(
            fs.alloc_host(),
            Err(FrameError::Exhausted),
            "leaked numbers never come back"
        );
        assert_eq!(fs.classify(Pfn(5)), None);
        assert_eq!(fs.gmem_pfn(Gfn(0)), None);
        assert!(fs.read(Pfn(GMEM_PFN_BASE), &mut page).is_err());
    }

    #[test]
    fn host_pages_are_page_aligned() {
        let p = Box::new(AlignedPage([0; 4096]));
        assert_eq!(p.0.as_ptr() as usize % 4096, 0);
    }
}
