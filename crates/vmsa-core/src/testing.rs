//! An in-memory [`Platform`] that records what vmsa-core asks of it, checks the RMP rules a
//! real host would enforce, and fails on demand.
//!
//! It is a model small enough to read in one sitting, meant for unit tests of code that embeds
//! vmsa-core (and for vmsa-core's own tests and examples). `backend-sim` is the faithful
//! machine; this is its pocket version: RMP assigned/immutable/ASID/GPA per frame, host writes
//! refused on assigned frames, pages freed while private, leaked or double-freed recorded as
//! [`Violation`]s rather than panics, so property tests can assert none happened.
//!
//! Only built with the crate's `testing` feature (off by default): enable it in the
//! dev-dependencies of the crate whose tests use it.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use crate::sync::{Guard, Lock, leaf, lock};

mod bare;
pub use bare::{BareError, BarePage, BarePlatform};

use crate::addr::{Asid, Gfn, Gpa, Hpa, PAGE_SIZE, PageLevel, Pfn};
use crate::platform::{
    DbgDecryptFailure, HostPage, LaunchFinish, LaunchStart, PageBuf, Platform, SnpPageType,
};

/// A page handed out by [`TestPlatform`].
#[derive(Debug, PartialEq, Eq)]
pub struct TestPage(Pfn);

impl HostPage for TestPage {
    fn pfn(&self) -> Pfn {
        self.0
    }
}

/// The platform calls [`TestPlatform`] can be told to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Call {
    /// `alloc_page`.
    AllocPage,
    /// `write_frame`.
    WriteFrame,
    /// `read_frame`.
    ReadFrame,
    /// `rmp_make_private`.
    RmpMakePrivate,
    /// `rmp_make_shared`.
    RmpMakeShared,
    /// `flush_encrypted_page`.
    FlushEncryptedPage,
    /// `clflush_page`.
    ClflushPage,
    /// `launch_start`.
    LaunchStart,
    /// `launch_update_data`.
    LaunchUpdateData,
    /// `launch_update_vmsa`.
    LaunchUpdateVmsa,
    /// `snp_launch_update`.
    SnpLaunchUpdate,
    /// `launch_finish`.
    LaunchFinish,
    /// `page_reclaim`.
    PageReclaim,
    /// `dbg_decrypt_vmsa`.
    DbgDecrypt,
    /// The reclaim of the firmware destination page after `dbg_decrypt_vmsa` (SNP's
    /// `snp_page_reclaim` in `sev_decrypt_vmsa`); a failure leaks that page.
    DbgDecryptReclaim,
}

/// An error of [`TestPlatform`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TestError {
    /// A failure planned with [`TestPlatform::fail_nth`].
    #[error("injected failure of {call:?} (call #{nth})")]
    Injected {
        /// The call.
        call: Call,
        /// Its 1-based number.
        nth: u64,
    },
    /// The call broke an RMP or firmware rule.
    #[error("{call:?} on pfn {pfn}: {rule}")]
    Rule {
        /// The call.
        call: Call,
        /// The frame.
        pfn: Pfn,
        /// The rule.
        rule: &'static str,
    },
}

/// Something vmsa-core did that a real host would punish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A page went back to the allocator while still assigned in the RMP.
    FreedWhilePrivate(Pfn),
    /// A page went back to the allocator (or was leaked) twice.
    ReleasedTwice(Pfn),
    /// The host wrote a frame that is assigned in the RMP (an RMP #PF on real hardware).
    HostWriteToAssigned(Pfn),
    /// The firmware encrypted a page in place while the host's writes to it may still sit in
    /// the cache (no `clflush_page` since the last host write).
    UnflushedInPlaceEncryption(Pfn),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Rmp {
    assigned: bool,
    immutable: bool,
    asid: u32,
    gpa: u64,
    vmsa: bool,
}

#[derive(Debug, Default)]
struct Inner {
    next_pfn: u64,
    free_list: Vec<Pfn>,
    live: BTreeSet<Pfn>,
    released: Vec<Pfn>,
    leaked: Vec<Pfn>,
    frames: BTreeMap<Pfn, Box<PageBuf>>,
    rmp: BTreeMap<Pfn, Rmp>,
    gmem: BTreeMap<Gfn, Pfn>,
    calls: BTreeMap<Call, u64>,
    plan: BTreeMap<Call, BTreeSet<u64>>,
    violations: Vec<Violation>,
    measured: Vec<(Pfn, u8)>,
    encrypted: BTreeSet<Pfn>,
    clflushed: BTreeSet<Pfn>,
    flushes: u64,
    writebacks: u64,
    started: bool,
    finished: bool,
}

/// The in-memory platform; see the module documentation.
#[derive(Debug)]
pub struct TestPlatform {
    asid: Asid,
    inner: Lock<Inner>,
}

/// Guest frames live far above the pages `alloc_page` hands out.
const GMEM_BASE_PFN: u64 = 0x4000_0000;

impl Default for TestPlatform {
    fn default() -> Self {
        Self::new(Asid(1), Pfn(0x1001))
    }
}

impl TestPlatform {
    /// A platform for a guest with `asid` whose allocator starts at `first_pfn` and counts up
    /// (start it just below a multiple of 512 to exercise the erratum-1467 rule).
    pub fn new(asid: Asid, first_pfn: Pfn) -> Self {
        Self {
            asid,
            inner: leaf(Inner {
                next_pfn: first_pfn.0,
                ..Inner::default()
            }),
        }
    }

    fn lock(&self) -> Guard<'_, Inner> {
        lock(&self.inner)
    }

    /// Make the `nth` (1-based, counting from the platform's creation) call of `call` fail.
    pub fn fail_nth(&self, call: Call, nth: u64) {
        self.lock().plan.entry(call).or_default().insert(nth);
    }

    /// Make the next call of `call` fail.
    pub fn fail_next(&self, call: Call) {
        let mut g = self.lock();
        let nth = g.calls.get(&call).copied().unwrap_or(0) + 1;
        g.plan.entry(call).or_default().insert(nth);
    }

    /// How many times `call` was made.
    pub fn calls(&self, call: Call) -> u64 {
        self.lock().calls.get(&call).copied().unwrap_or(0)
    }

    /// Back guest frame `gfn` with a fresh guest_memfd frame and return it.
    pub fn map_gmem(&self, gfn: Gfn) -> Pfn {
        let pfn = Pfn(GMEM_BASE_PFN + gfn.0);
        self.lock().gmem.insert(gfn, pfn);
        pfn
    }

    /// A guest write of a whole page at `gpa` (guest accesses are not RMP-checked here).
    pub fn guest_write(&self, gpa: Gpa, data: &PageBuf) {
        let mut g = self.lock();
        if let Some(pfn) = g.gmem.get(&gpa.gfn()).copied() {
            g.frames.insert(pfn, Box::new(*data));
        }
    }

    /// Remove the guest_memfd backing of `gfn` (a hole punch).
    pub fn unmap_gmem(&self, gfn: Gfn) {
        self.lock().gmem.remove(&gfn);
    }

    /// Frames currently allocated and not yet freed or leaked.
    pub fn live_pages(&self) -> Vec<Pfn> {
        self.lock().live.iter().copied().collect()
    }

    /// Frames leaked so far.
    pub fn leaked_pages(&self) -> Vec<Pfn> {
        self.lock().leaked.clone()
    }

    /// Frames freed so far (a frame reused and freed again appears twice).
    pub fn freed_pages(&self) -> Vec<Pfn> {
        self.lock().released.clone()
    }

    /// Rule breaks observed so far.
    pub fn violations(&self) -> Vec<Violation> {
        self.lock().violations.clone()
    }

    /// Whether `pfn` is assigned in the RMP.
    pub fn is_assigned(&self, pfn: Pfn) -> bool {
        self.lock().rmp.get(&pfn).is_some_and(|r| r.assigned)
    }

    /// The pages the firmware measured, in order, with their page type.
    pub fn measured(&self) -> Vec<(Pfn, u8)> {
        self.lock().measured.clone()
    }

    /// The contents of a frame as the host last wrote it.
    pub fn frame(&self, pfn: Pfn) -> Box<PageBuf> {
        self.lock()
            .frames
            .get(&pfn)
            .cloned()
            .unwrap_or_else(|| Box::new([0; PAGE_SIZE as usize]))
    }

    /// `(page flushes, full cache write-backs)` so far.
    pub fn flushes(&self) -> (u64, u64) {
        let g = self.lock();
        (g.flushes, g.writebacks)
    }

    fn enter(&self, call: Call) -> Result<Guard<'_, Inner>, TestError> {
        let mut g = self.lock();
        let n = g.calls.entry(call).or_insert(0);
        *n += 1;
        let nth = *n;
        if g.plan.get_mut(&call).is_some_and(|s| s.remove(&nth)) {
            return Err(TestError::Injected { call, nth });
        }
        Ok(g)
    }

    fn release(g: &mut Inner, pfn: Pfn) -> bool {
        if !g.live.remove(&pfn) {
            g.violations.push(Violation::ReleasedTwice(pfn));
            return false;
        }
        true
    }
}

impl Platform for TestPlatform {
    type Page = TestPage;
    type Error = TestError;

    fn asid(&self) -> Asid {
        self.asid
    }

    fn alloc_page(&self) -> Result<TestPage, TestError> {
        let mut g = self.enter(Call::AllocPage)?;
        let pfn = match g.free_list.pop() {
            Some(p) => p,
            None => {
                g.next_pfn += 1;
                Pfn(g.next_pfn - 1)
            }
        };
        g.live.insert(pfn);
        g.frames.remove(&pfn);
        Ok(TestPage(pfn))
    }

    fn free_page(&self, page: TestPage) {
        let mut g = self.lock();
        let pfn = page.0;
        if g.rmp.get(&pfn).is_some_and(|r| r.assigned) {
            g.violations.push(Violation::FreedWhilePrivate(pfn));
        }
        if Self::release(&mut g, pfn) {
            g.released.push(pfn);
            g.free_list.push(pfn);
            g.encrypted.remove(&pfn);
        }
    }

    fn leak_page(&self, page: TestPage) {
        let mut g = self.lock();
        if Self::release(&mut g, page.0) {
            g.leaked.push(page.0);
        }
    }

    fn leak_guest_frame(&self, pfn: Pfn) {
        let mut g = self.lock();
        if g.leaked.contains(&pfn) {
            g.violations.push(Violation::ReleasedTwice(pfn));
        } else {
            g.leaked.push(pfn);
        }
    }

    fn write_frame(&self, pfn: Pfn, data: &PageBuf) -> Result<(), TestError> {
        let mut g = self.enter(Call::WriteFrame)?;
        if g.rmp.get(&pfn).is_some_and(|r| r.assigned) {
            g.violations.push(Violation::HostWriteToAssigned(pfn));
            return Err(TestError::Rule {
                call: Call::WriteFrame,
                pfn,
                rule: "host write to an RMP-assigned frame (RMP #PF)",
            });
        }
        g.frames.insert(pfn, Box::new(*data));
        g.clflushed.remove(&pfn);
        Ok(())
    }

    fn read_frame(&self, pfn: Pfn, buf: &mut PageBuf) -> Result<(), TestError> {
        let g = self.enter(Call::ReadFrame)?;
        match g.frames.get(&pfn) {
            Some(f) if !g.encrypted.contains(&pfn) => buf.copy_from_slice(&f[..]),
            // Ciphertext: not the plaintext, and not zero.
            Some(_) => buf.fill(0xc1),
            None => buf.fill(0),
        }
        Ok(())
    }

    fn rmp_make_private(
        &self,
        pfn: Pfn,
        gpa: Gpa,
        level: PageLevel,
        asid: Asid,
        immutable: bool,
    ) -> Result<(), TestError> {
        let mut g = self.enter(Call::RmpMakePrivate)?;
        let rule = |rule| TestError::Rule {
            call: Call::RmpMakePrivate,
            pfn,
            rule,
        };
        if level != PageLevel::Size4K {
            return Err(rule("only 4 KiB pages are modelled"));
        }
        let e = g.rmp.entry(pfn).or_default();
        if e.immutable {
            return Err(rule("FAIL_PERMISSION: entry is immutable"));
        }
        *e = Rmp {
            assigned: true,
            immutable,
            asid: asid.0,
            gpa: gpa.0,
            vmsa: false,
        };
        Ok(())
    }

    fn rmp_make_shared(&self, pfn: Pfn, _level: PageLevel) -> Result<(), TestError> {
        let mut g = self.enter(Call::RmpMakeShared)?;
        let e = g.rmp.entry(pfn).or_default();
        if e.immutable {
            return Err(TestError::Rule {
                call: Call::RmpMakeShared,
                pfn,
                rule: "FAIL_PERMISSION: entry is immutable (reclaim it first)",
            });
        }
        *e = Rmp::default();
        Ok(())
    }

    fn flush_encrypted_page(&self, _pfn: Pfn, _asid: Asid) -> Result<(), TestError> {
        let mut g = self.enter(Call::FlushEncryptedPage)?;
        g.flushes += 1;
        Ok(())
    }

    fn clflush_page(&self, pfn: Pfn) {
        let mut g = self.lock();
        *g.calls.entry(Call::ClflushPage).or_insert(0) += 1;
        g.clflushed.insert(pfn);
    }

    fn writeback_caches(&self) {
        self.lock().writebacks += 1;
    }

    fn gmem_pfn(&self, gfn: Gfn) -> Option<Pfn> {
        self.lock().gmem.get(&gfn).copied()
    }

    fn launch_start(&self, _start: &LaunchStart) -> Result<(), TestError> {
        let mut g = self.enter(Call::LaunchStart)?;
        g.started = true;
        Ok(())
    }

    /// Guest memory is what [`TestPlatform::map_gmem`] backs (for SEV-ES it stands for the
    /// VMM's memory); each page the range touches is written and measured.
    fn launch_update_data(&self, gpa: Gpa, len: u64, data: Option<&[u8]>) -> Result<(), TestError> {
        let mut g = self.enter(Call::LaunchUpdateData)?;
        let mut done = 0;
        while done < len {
            let at = Gpa(gpa.0 + done);
            let off = at.0 % PAGE_SIZE;
            let n = (PAGE_SIZE - off).min(len - done);
            let Some(pfn) = g.gmem.get(&at.gfn()).copied() else {
                return Err(TestError::Rule {
                    call: Call::LaunchUpdateData,
                    pfn: Pfn(at.gfn().0),
                    rule: "no guest memory backs the range",
                });
            };
            if let Some(d) = data {
                let frame = g
                    .frames
                    .entry(pfn)
                    .or_insert_with(|| Box::new([0; PAGE_SIZE as usize]));
                frame[off as usize..(off + n) as usize]
                    .copy_from_slice(&d[done as usize..(done + n) as usize]);
            }
            g.measured.push((pfn, SnpPageType::Normal as u8));
            g.encrypted.insert(pfn);
            done += n;
        }
        Ok(())
    }

    fn launch_update_vmsa(&self, pfn: Pfn) -> Result<(), TestError> {
        let mut g = self.enter(Call::LaunchUpdateVmsa)?;
        if !g.clflushed.contains(&pfn) {
            g.violations.push(Violation::UnflushedInPlaceEncryption(pfn));
        }
        g.measured.push((pfn, SnpPageType::Vmsa as u8));
        g.encrypted.insert(pfn);
        Ok(())
    }

    fn snp_launch_update(&self, pfn: Pfn, gpa: Gpa, page_type: SnpPageType) -> Result<(), TestError> {
        let mut g = self.enter(Call::SnpLaunchUpdate)?;
        let asid = self.asid.0;
        let e = g.rmp.entry(pfn).or_default();
        if !(e.assigned && e.immutable && e.asid == asid && e.gpa == gpa.0) {
            return Err(TestError::Rule {
                call: Call::SnpLaunchUpdate,
                pfn,
                rule: "INVALID_PAGE_STATE: page is not pre-guest for this guest at this GPA",
            });
        }
        e.immutable = false;
        e.vmsa = page_type == SnpPageType::Vmsa;
        g.measured.push((pfn, page_type as u8));
        g.encrypted.insert(pfn);
        Ok(())
    }

    fn launch_finish(&self, _finish: &LaunchFinish) -> Result<(), TestError> {
        let mut g = self.enter(Call::LaunchFinish)?;
        g.finished = true;
        Ok(())
    }

    fn page_reclaim(&self, pfn: Pfn) -> Result<(), TestError> {
        let mut g = self.enter(Call::PageReclaim)?;
        let e = g.rmp.entry(pfn).or_default();
        if !e.assigned {
            return Err(TestError::Rule {
                call: Call::PageReclaim,
                pfn,
                rule: "INVALID_PAGE_STATE: page is hypervisor-owned",
            });
        }
        e.immutable = false;
        Ok(())
    }

    fn dbg_decrypt_vmsa(&self, pa: Hpa, out: &mut PageBuf) -> Result<(), DbgDecryptFailure<TestError>> {
        let g = self.enter(Call::DbgDecrypt)?;
        match g.frames.get(&pa.pfn()) {
            Some(f) => out.copy_from_slice(&f[..]),
            None => out.fill(0),
        }
        drop(g);
        if let Err(source) = self.enter(Call::DbgDecryptReclaim) {
            // The destination page stays firmware-owned: out of circulation for good.
            let mut g = self.lock();
            g.next_pfn += 1;
            let pfn = Pfn(g.next_pfn - 1);
            g.leaked.push(pfn);
            out.fill(0);
            return Err(DbgDecryptFailure {
                source,
                leaked: Some(pfn),
            });
        }
        Ok(())
    }
}
