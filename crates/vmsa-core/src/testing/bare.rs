//! A platform that does nothing: every call succeeds at once and pages are frame numbers
//! counted up from a start, never memory.
//!
//! It exists to measure vmsa-core alone. [`super::TestPlatform`] checks RMP rules and keeps
//! frame contents in maps, so its own cost (and its allocations) hide vmsa-core's; with
//! [`BarePlatform`] what a benchmark or an allocation count sees is the state machine.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{Asid, Gfn, Gpa, Hpa, PageLevel, Pfn};
use crate::platform::{
    DbgDecryptFailure, HostPage, LaunchFinish, LaunchStart, PageBuf, Platform, SnpPageType,
};

/// Guest frames resolve far above the pages [`BarePlatform`] hands out.
const GMEM_BASE_PFN: u64 = 0x4000_0000;

/// A page handed out by [`BarePlatform`]: only its frame number.
#[derive(Debug, PartialEq, Eq)]
pub struct BarePage(Pfn);

impl HostPage for BarePage {
    fn pfn(&self) -> Pfn {
        self.0
    }
}

/// The do-nothing platform; see the module documentation. It counts pages handed out, freed
/// and leaked, so a caller can check the books balance.
#[derive(Debug)]
pub struct BarePlatform {
    next: AtomicU64,
    allocated: AtomicU64,
    freed: AtomicU64,
    leaked: AtomicU64,
}

impl Default for BarePlatform {
    fn default() -> Self {
        Self::new(Pfn(0x1001))
    }
}

impl BarePlatform {
    /// A platform whose allocator hands out `first`, `first + 1`, ... (2 MiB-aligned frames
    /// included, which vmsa-core must refuse for VMSAs).
    pub fn new(first: Pfn) -> Self {
        Self {
            next: AtomicU64::new(first.0),
            allocated: AtomicU64::new(0),
            freed: AtomicU64::new(0),
            leaked: AtomicU64::new(0),
        }
    }

    /// Pages handed out so far.
    pub fn allocated(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    /// Pages given back so far.
    pub fn freed(&self) -> u64 {
        self.freed.load(Ordering::Relaxed)
    }

    /// Pages leaked so far.
    pub fn leaked(&self) -> u64 {
        self.leaked.load(Ordering::Relaxed)
    }
}

/// [`BarePlatform`] never fails, so its error type has no values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BareError {}

impl Platform for BarePlatform {
    type Page = BarePage;
    type Error = BareError;

    fn asid(&self) -> Asid {
        Asid(1)
    }

    fn alloc_page(&self) -> Result<BarePage, BareError> {
        self.allocated.fetch_add(1, Ordering::Relaxed);
        Ok(BarePage(Pfn(self.next.fetch_add(1, Ordering::Relaxed))))
    }

    fn free_page(&self, _page: BarePage) {
        self.freed.fetch_add(1, Ordering::Relaxed);
    }

    fn leak_page(&self, _page: BarePage) {
        self.leaked.fetch_add(1, Ordering::Relaxed);
    }

    fn leak_guest_frame(&self, _pfn: Pfn) {
        self.leaked.fetch_add(1, Ordering::Relaxed);
    }

    fn write_frame(&self, _pfn: Pfn, data: &PageBuf) -> Result<(), BareError> {
        // A real platform reads the image; make the compiler build it as if one did.
        core::hint::black_box(data);
        Ok(())
    }

    fn read_frame(&self, _pfn: Pfn, buf: &mut PageBuf) -> Result<(), BareError> {
        buf.fill(0);
        Ok(())
    }

    fn rmp_make_private(
        &self,
        _pfn: Pfn,
        _gpa: Gpa,
        _level: PageLevel,
        _asid: Asid,
        _immutable: bool,
    ) -> Result<(), BareError> {
        Ok(())
    }

    fn rmp_make_shared(&self, _pfn: Pfn, _level: PageLevel) -> Result<(), BareError> {
        Ok(())
    }

    fn flush_encrypted_page(&self, _pfn: Pfn, _asid: Asid) -> Result<(), BareError> {
        Ok(())
    }

    fn writeback_caches(&self) {}

    fn gmem_pfn(&self, gfn: Gfn) -> Option<Pfn> {
        Some(Pfn(GMEM_BASE_PFN + gfn.0))
    }

    fn launch_start(&self, _start: &LaunchStart) -> Result<(), BareError> {
        Ok(())
    }

    fn launch_update_data(&self, _gpa: Gpa, _len: u64, _data: Option<&[u8]>) -> Result<(), BareError> {
        Ok(())
    }

    fn launch_update_vmsa(&self, _pfn: Pfn) -> Result<(), BareError> {
        Ok(())
    }

    fn snp_launch_update(&self, _pfn: Pfn, _gpa: Gpa, _page_type: SnpPageType) -> Result<(), BareError> {
        Ok(())
    }

    fn launch_finish(&self, _finish: &LaunchFinish) -> Result<(), BareError> {
        Ok(())
    }

    fn page_reclaim(&self, _pfn: Pfn) -> Result<(), BareError> {
        Ok(())
    }

    fn dbg_decrypt_vmsa(&self, _pa: Hpa, out: &mut PageBuf) -> Result<(), DbgDecryptFailure<BareError>> {
        out.fill(0);
        Ok(())
    }
}
