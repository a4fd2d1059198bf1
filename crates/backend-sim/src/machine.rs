//! The machine: host memory, RMP, firmware, caches, the cost ledger, the trace and the fault
//! plan behind one lock, and every hardware effect as a method that checks the rules, charges
//! its cost and records it.
//!
//! Host-side effects are reached through [`crate::SimPlatform`] (vmsa-core's `Platform`) and
//! guest-side ones (guest memory accesses, PVALIDATE, RMPADJUST, page state changes, VMRUN)
//! through the same handle, which the scripted guest drives.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use vmsa_core::{Gfn, Gpa, PAGE_SIZE, PageBuf, Pfn, SevStatus, SnpPageType, VmKind};

use crate::cost::{CostModel, CostOp, CostReport, Ledger};
use crate::direct_map::{DirectMap, DirectMapPolicy};
pub use crate::error::SimError;
use crate::fault::{FaultCode, FaultOp, FaultPlan};
use crate::firmware::{Firmware, Handle, PageState, page_state};
use crate::measure::LaunchDigest;
use crate::memory::{DEFAULT_FIRST_PFN, GuestMemfd, HostMemory, LabelledFrames, TIB};
use crate::rmp::{PageSize, Rmp, RmpEntry, RmpRet, RmpState};
use crate::trace::{Trace, TraceEvent};

/// One phase of a run (create, launch, run, teardown), on the machine's clock.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PhaseReport {
    /// The phase.
    pub name: &'static str,
    /// The cycle it began at.
    pub start: u64,
    /// Its length in cycles.
    pub cycles: u64,
    /// Its length in microseconds at the model's clock.
    pub us: f64,
}

/// Consecutive phases of a run: each [`PhaseClock::end`] closes the phase that began where the
/// previous one ended, puts it on the machine's timeline and keeps its report.
#[derive(Debug)]
pub struct PhaseClock<'m> {
    machine: &'m Machine,
    start: u64,
    phases: Vec<PhaseReport>,
}

impl<'m> PhaseClock<'m> {
    /// A clock whose first phase begins now.
    pub fn new(machine: &'m Machine) -> Self {
        Self {
            machine,
            start: machine.now(),
            phases: Vec::new(),
        }
    }

    /// Close the current phase as `name`; the next one begins now.
    pub fn end(&mut self, name: &'static str) {
        let p = self.machine.end_phase(name, self.start);
        self.start += p.cycles;
        self.phases.push(p);
    }

    /// The phases closed so far.
    pub fn into_phases(self) -> Vec<PhaseReport> {
        self.phases
    }
}

/// How to build a [`Machine`].
#[derive(Clone, Debug)]
pub struct MachineConfig {
    /// Bytes of host DRAM (default 1 TiB; costs nothing until used).
    pub host_bytes: u64,
    /// The first frame of DRAM (default 4 GiB, which is 2 MiB aligned, so the very first page
    /// the allocator hands out is one vmsa-core must refuse for a VMSA).
    pub first_pfn: u64,
    /// The highest SEV-ES/SNP ASID (CPUID 8000_001F EDX - 1).
    pub max_asid: u32,
    /// Seed of the firmware's key generator (runs are reproducible per seed).
    pub seed: u64,
    /// Costs and clock.
    pub costs: CostModel,
    /// Record a trace timeline.
    pub trace: bool,
    /// At most this many trace events are kept.
    pub trace_cap: usize,
    /// Failures to inject.
    pub faults: FaultPlan,
    /// guest_memfd hands out 2 MiB folios where a 2 MiB-aligned guest region lies wholly in a
    /// memslot (as a huge-page-backed guest_memfd does), so KVM's first-use preparation can
    /// make one 2 MiB RMP entry for it (`sev_gmem_prepare`'s `is_large_rmp_possible`); else
    /// 4 KiB folios, what upstream guest_memfd allocates, and 4 KiB RMP entries.
    pub gmem_2m_folios: bool,
    /// Whether the host splits its direct map before 4 KiB RMPUPDATEs (Linux's
    /// `adjust_direct_map`, the default), which decides how host writes are RMP-checked (see
    /// [`crate::direct_map`]).
    pub direct_map: DirectMapPolicy,
    /// The most bytes the machine's own structures may take ([`Footprint::bytes`]: the RMP,
    /// the allocator, the guest memory maps and frame contents). A guest operation, a host
    /// write or a launch update made once they take more fails with
    /// [`SimError::MemoryBudget`] at once, instead of holding the host's memory until a
    /// watchdog (4 KiB PVALIDATEs of 10^9 pages take 8 GB of RMP entries; a launch of 3 GiB of
    /// ZERO pages, 3 GiB of encrypted frames).
    pub memory_budget: u64,
}

/// The default [`MachineConfig::memory_budget`]: 2 GiB, four times what the largest run of the
/// linux-boot bench takes (`builtin:linux-boot-4k` of 256 GiB, 533 MiB) and a fixed figure,
/// so that a run ends the same way on every host.
pub const DEFAULT_MEMORY_BUDGET: u64 = 2 << 30;

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            host_bytes: TIB,
            first_pfn: DEFAULT_FIRST_PFN,
            max_asid: 509,
            seed: 0x5eed,
            costs: CostModel::default(),
            trace: true,
            trace_cap: 1 << 18,
            faults: FaultPlan::default(),
            gmem_2m_folios: false,
            direct_map: DirectMapPolicy::default(),
            memory_budget: DEFAULT_MEMORY_BUDGET,
        }
    }
}

/// One recorded RMP fault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RmpFaultRecord {
    /// The frame accessed.
    pub pfn: Pfn,
    /// `write` or `read`.
    pub access: &'static str,
    /// The page size of the host mapping the access went through.
    pub mapping: PageSize,
    /// The frame whose RMP entry failed the check: `pfn`, or through a 2 MiB mapping an
    /// assigned frame of its 2 MiB region.
    pub checked: Pfn,
    /// The state of `checked` then.
    pub state: PageState,
    /// The cycle it happened at.
    pub at_cycle: u64,
}

/// Counters of things worth checking after a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Host accesses refused with an RMP #PF (injected ones included).
    pub rmp_faults: u64,
    /// The first 64 of them.
    pub rmp_fault_log: Vec<RmpFaultRecord>,
    /// Firmware commands that failed (injected ones included).
    pub firmware_errors: u64,
    /// Failures the fault plan injected.
    pub injected: u64,
    /// Frames leaked on purpose (`Platform::leak_page` and the machine's own leaks).
    pub leaked_pages: u64,
    /// Frames freed while still assigned in the RMP (a host bug: the next host write faults).
    pub freed_while_assigned: u64,
    /// Frames freed with cache lines still dirty under a guest key (no VM_PAGE_FLUSH).
    pub freed_unflushed: u64,
    /// Frees of frames the allocator had not handed out.
    pub bad_frees: u64,
    /// Successful VMRUNs.
    pub vmruns: u64,
    /// VMRUNs refused with VMEXIT_INVALID.
    pub vmrun_failures: u64,
    /// Nested page faults (RMP) taken by guests.
    pub npf: u64,
    /// #VC exceptions (page not validated) taken by guests.
    pub vc: u64,
    /// PSMASHes the host did to resolve SIZEM faults.
    pub psmash_on_fault: u64,
    /// 2 MiB regions of the host's direct map split to 4 KiB pages before an RMPUPDATE (Linux
    /// `adjust_direct_map`; see [`crate::direct_map`]).
    pub direct_map_splits: u64,
    /// ASIDs leaked because the firmware refused to decommission their guest (it may still
    /// bind them): never handed to another guest. Ascending.
    pub leaked_asids: Vec<u32>,
}

/// Sizes of the machine's structures: what it tracks and what that costs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Footprint {
    /// Frames allocated now (tracked: each has allocator and RMP state).
    pub allocated_frames: usize,
    /// Most frames allocated at once.
    pub peak_allocated_frames: usize,
    /// Frames whose contents take storage now (not one byte repeated over the page, in the
    /// clear or encrypted with a guest's key, whose ciphertext is computed when read).
    pub backed_frames: usize,
    /// Most frames backed at once.
    pub peak_backed_frames: usize,
    /// RMP entries stored (a 2 MiB entry is one).
    pub rmp_entries: usize,
    /// Frames the stored RMP entries describe (a 2 MiB entry describes 512).
    pub rmp_frames: u64,
    /// Bytes of the RMP.
    pub rmp_bytes: usize,
    /// Guest frames the memslots describe (the guests' configured memory).
    pub guest_slot_frames: u64,
    /// Bytes of every structure but frame contents: RMP, allocator, guest memory maps, dirty
    /// lines, the direct map's split regions.
    pub bookkeeping_bytes: usize,
    /// Bookkeeping plus 4 KiB per frame with contents.
    pub bytes: usize,
}

impl Footprint {
    /// Bytes of RMP per frame it describes (the hardware's RMP takes 16 per 4 KiB frame).
    pub fn rmp_bytes_per_frame(&self) -> f64 {
        self.rmp_bytes as f64 / self.rmp_frames.max(1) as f64
    }

    /// Bytes of bookkeeping per tracked (allocated) frame.
    pub fn bookkeeping_per_frame(&self) -> f64 {
        self.bookkeeping_bytes as f64 / self.allocated_frames.max(1) as f64
    }
}

/// What a range of a guest's frames is now ([`Machine::guest_census`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GuestCensus {
    /// Frames in the range.
    pub frames: u64,
    /// Frames with the private memory attribute.
    pub private: u64,
    /// Frames backed by a private (guest_memfd) frame.
    pub backed: u64,
    /// Backed frames the guest can use: assigned to it at their GPA, mutable, validated.
    pub validated: u64,
}

#[derive(Debug)]
pub(crate) struct GuestSlot {
    pub kind: VmKind,
    pub handle: Option<Handle>,
    pub gctx: Option<Pfn>,
    pub gmem: GuestMemfd,
    /// Firmware pages of this guest leaked before it was destroyed (a context page whose
    /// reclaim failed after a failed launch start).
    pub leaked_firmware_pages: u64,
}

#[derive(Debug)]
pub(crate) struct Hw {
    pub mem: HostMemory,
    pub rmp: Rmp,
    pub fw: Firmware,
    pub model: CostModel,
    pub ledger: Ledger,
    pub trace: Trace,
    pub faults: FaultPlan,
    pub stats: Stats,
    pub guests: HashMap<u32, GuestSlot>,
    /// Frames with lines cached dirty under an ASID's key, labelled with the ASID (runs of
    /// frames: a launch or a guest writing its memory dirties long runs).
    pub dirty: LabelledFrames<u32>,
    /// See [`MachineConfig::gmem_2m_folios`].
    pub gmem_2m_folios: bool,
    /// The host's direct map, which host writes go through.
    pub direct_map: DirectMap,
    /// See [`MachineConfig::memory_budget`].
    memory_budget: u64,
    max_asid: u32,
    /// ASIDs of guests whose decommission failed: still bound in the firmware, so never reused
    /// (see [`Machine::destroy_guest`]).
    leaked_asids: BTreeSet<u32>,
}

/// The simulated SEV-SNP host. Share it (`Arc`) between the guests it runs.
#[derive(Debug)]
pub struct Machine {
    hw: Mutex<Hw>,
}

/// What destroying a guest did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DestroyReport {
    /// Guest memory frames given back to the allocator.
    pub frames_released: u64,
    /// Guest frames leaked because their RMP state could not be restored: at destroy, or
    /// earlier while the guest ran (a refused launch page whose reclaim failed).
    pub frames_leaked: u64,
}

fn cat(op: CostOp) -> &'static str {
    use CostOp::*;
    match op {
        Rmpupdate4K | Rmpupdate2M | Psmash | RmpCheck => "rmp",
        Pvalidate4K | Pvalidate2M | Rmpadjust | GuestCopy | VmgexitSnp | VmgexitEs => "guest",
        Vmrun | ExitToUserspace | GmemFault => "vcpu",
        Clflush | VmPageFlush | WbinvdAll | PageAlloc | HostCopy => "host",
        _ => "firmware",
    }
}

impl Hw {
    /// Charge `op` and record it on the timeline (track `tid`).
    pub fn charge(&mut self, op: CostOp, tid: u32, detail: impl FnOnce() -> String) {
        self.charge_n(op, 1, tid, detail);
    }

    /// Charge `op` `n` times (nothing if `n` is 0), as one span on the timeline.
    pub fn charge_n(&mut self, op: CostOp, n: u64, tid: u32, detail: impl FnOnce() -> String) {
        if n == 0 {
            return;
        }
        let (start, dur) = self.ledger.charge(&self.model, op, n);
        self.trace.record_with(|| TraceEvent {
            name: op.name().to_string(),
            cat: cat(op),
            start,
            dur,
            tid,
            detail: Some(detail()),
        });
    }

    pub(crate) fn inject(&mut self, op: FaultOp, ty: Option<SnpPageType>) -> Option<FaultCode> {
        let c = self.faults.check(op, ty);
        if c.is_some() {
            self.stats.injected += 1;
        }
        c
    }

    pub(crate) fn fw_err(&mut self, cmd: &'static str, status: SevStatus, injected: bool) -> SimError {
        self.stats.firmware_errors += 1;
        SimError::Firmware {
            cmd,
            status,
            injected,
        }
    }

    /// Check the fault plan for a firmware command.
    pub(crate) fn fw_inject(
        &mut self,
        op: FaultOp,
        ty: Option<SnpPageType>,
        cmd: &'static str,
    ) -> Result<(), SimError> {
        match self.inject(op, ty) {
            Some(FaultCode::Firmware(s)) => Err(self.fw_err(cmd, s, true)),
            _ => Ok(()),
        }
    }

    pub(crate) fn fw_result(&mut self, cmd: &'static str, r: Result<(), SevStatus>) -> Result<(), SimError> {
        r.map_err(|s| self.fw_err(cmd, s, false))
    }

    /// Bytes of the machine's bookkeeping and of frame contents ([`Footprint`]'s two totals),
    /// each part a count kept up to date, so asking costs nothing.
    fn bytes(&self) -> (usize, usize) {
        let gmem: usize = self.guests.values().map(|g| g.gmem.footprint_bytes()).sum();
        let bookkeeping = self.mem.bookkeeping_bytes()
            + self.rmp.footprint_bytes()
            + gmem
            + self.dirty.bytes()
            + self.direct_map.bytes();
        (bookkeeping, bookkeeping + self.mem.contents_bytes())
    }

    /// Fail `op` if the machine's structures take more than its memory budget.
    pub(crate) fn check_budget(&self, op: &'static str) -> Result<(), SimError> {
        let used = self.bytes().1 as u64;
        if used > self.memory_budget {
            return Err(SimError::MemoryBudget {
                op,
                used,
                budget: self.memory_budget,
            });
        }
        Ok(())
    }

    pub fn slot(&self, asid: u32) -> Result<&GuestSlot, SimError> {
        self.guests.get(&asid).ok_or(SimError::UnknownGuest { asid })
    }

    pub fn slot_mut(&mut self, asid: u32) -> Result<&mut GuestSlot, SimError> {
        self.guests.get_mut(&asid).ok_or(SimError::UnknownGuest { asid })
    }

    /// Record an RMP #PF of a host `access` to `pfn`, whose check failed on the entry of frame
    /// `checked` (see [`Rmp::check_hypervisor_owned`]), and return its error.
    pub(crate) fn rmp_fault(
        &mut self,
        pfn: Pfn,
        access: &'static str,
        checked: Pfn,
        injected: bool,
    ) -> SimError {
        let mapping = self.direct_map.mapping(pfn);
        let e = self.rmp.entry(checked);
        let state = page_state(self.rmp.covered(checked), &e);
        self.stats.rmp_faults += 1;
        if self.stats.rmp_fault_log.len() < 64 {
            self.stats.rmp_fault_log.push(RmpFaultRecord {
                pfn,
                access,
                mapping,
                checked,
                state,
                at_cycle: self.ledger.now(),
            });
        }
        SimError::RmpFault {
            access,
            pfn,
            mapping,
            checked,
            state,
            asid: e.asid,
            injected,
        }
    }

    // ---- host memory ----

    pub fn alloc_page(&mut self) -> Result<Pfn, SimError> {
        let pfn = match self.inject(FaultOp::AllocPage, None) {
            Some(FaultCode::Aligned2M) => self.mem.alloc_2m_aligned()?,
            Some(_) => return Err(SimError::InjectedNoMemory),
            None => self.mem.alloc()?,
        };
        self.charge(CostOp::PageAlloc, 0, || format!("pfn {pfn}"));
        Ok(pfn)
    }

    pub fn free_page(&mut self, pfn: Pfn) {
        if self.rmp.entry(pfn).assigned {
            self.stats.freed_while_assigned += 1;
        }
        self.stats.freed_unflushed += self.dirty.remove(pfn.0, pfn.0 + 1);
        if self.mem.free(pfn).is_err() {
            self.stats.bad_frees += 1;
        }
    }

    /// Give `n` frames from `pfn` back, as [`Hw::free_page`] gives back each (with its
    /// checks), in one step.
    pub fn free_frames(&mut self, pfn: Pfn, n: u64) {
        if n == 0 {
            return;
        }
        self.stats.freed_while_assigned += self.rmp.assigned_frames(pfn, n);
        self.stats.freed_unflushed += self.dirty.remove(pfn.0, pfn.0 + n);
        if self.mem.free_run(pfn, n).is_err() {
            for p in pfn.0..pfn.0 + n {
                if self.mem.free(Pfn(p)).is_err() {
                    self.stats.bad_frees += 1;
                }
            }
        }
    }

    /// Leak `n` frames from `pfn`, as [`Hw::leak_page`] leaks each.
    pub fn leak_frames(&mut self, pfn: Pfn, n: u64) {
        if self.mem.leak_run(pfn, n).is_ok() {
            self.stats.leaked_pages += n;
        } else {
            // Some are leaked already (while the guest ran): leak the rest.
            for p in (pfn.0..pfn.0 + n).map(Pfn) {
                if !self.mem.is_leaked(p) {
                    self.leak_page(p);
                }
            }
        }
    }

    pub fn leak_page(&mut self, pfn: Pfn) {
        if self.mem.leak(pfn).is_err() {
            self.stats.bad_frees += 1;
        } else {
            self.stats.leaked_pages += 1;
        }
    }

    /// A host write of a whole frame, through the direct map (the kernel's copies do: e.g.
    /// Linux arch/x86/kvm/svm/sev.c `sev_gmem_post_populate` copies a launch page through
    /// `kmap_local_pfn`, which on x86-64 is the direct-map address):
    /// RMP-checked (Hypervisor-Owned, APM table 15-39) at the size of the direct map's mapping
    /// there, so through a 2 MiB mapping every frame of the region must be hypervisor-owned.
    pub fn host_write(&mut self, pfn: Pfn, data: &PageBuf) -> Result<(), SimError> {
        self.check_budget("host write")?;
        if self.inject(FaultOp::WriteFrame, None).is_some() {
            return Err(self.rmp_fault(pfn, "write", pfn, true));
        }
        let mapping = self.direct_map.mapping(pfn);
        if let Err(checked) = self.rmp.check_hypervisor_owned(pfn, mapping) {
            return Err(self.rmp_fault(pfn, "write", checked, false));
        }
        self.charge(CostOp::HostCopy, 0, || format!("write pfn {pfn}"));
        self.mem.write(pfn, data)?;
        Ok(())
    }

    /// A host read: not RMP-checked; private frames read back as ciphertext.
    pub fn host_read(&mut self, pfn: Pfn, out: &mut PageBuf) -> Result<(), SimError> {
        if self.inject(FaultOp::ReadFrame, None).is_some() {
            return Err(self.rmp_fault(pfn, "read", pfn, true));
        }
        self.charge(CostOp::HostCopy, 0, || format!("read pfn {pfn}"));
        self.mem.read(pfn, out)?;
        Ok(())
    }

    // ---- RMP (host) ----

    /// Linux `rmpupdate()` (arch/x86/virt/svm/sev.c) without the fault plan and the charge:
    /// `adjust_direct_map` (which splits the direct map's large mapping over a 4 KiB update's
    /// frame), then the RMPUPDATE instruction. Every host RMPUPDATE of the machine goes through
    /// here or, for a run of 4 KiB updates in one 2 MiB region, through [`Rmp`]'s run methods
    /// after one `adjust_direct_map` of the region.
    pub(crate) fn rmp_update(&mut self, pfn: Pfn, st: RmpState) -> Result<(), RmpRet> {
        self.direct_map.adjust(pfn, st.page_size);
        self.rmp.rmpupdate(pfn, st)
    }

    pub fn rmpupdate(&mut self, op: FaultOp, pfn: Pfn, st: RmpState) -> Result<(), SimError> {
        let name = if st.assigned {
            "RMPUPDATE (private)"
        } else {
            "RMPUPDATE (shared)"
        };
        if let Some(FaultCode::Rmp(code)) = self.inject(op, None) {
            return Err(SimError::Rmp {
                op: name,
                pfn,
                code,
                injected: true,
            });
        }
        let cost = match st.page_size {
            PageSize::Size4K => CostOp::Rmpupdate4K,
            PageSize::Size2M => CostOp::Rmpupdate2M,
        };
        self.charge(cost, 0, || {
            format!("pfn {pfn} assigned={} asid={}", st.assigned, st.asid)
        });
        self.rmp_update(pfn, st).map_err(|code| SimError::Rmp {
            op: name,
            pfn,
            code,
            injected: false,
        })
    }

    pub fn psmash(&mut self, pfn: Pfn) -> Result<(), SimError> {
        if let Some(FaultCode::Rmp(code)) = self.inject(FaultOp::Psmash, None) {
            return Err(SimError::Rmp {
                op: "PSMASH",
                pfn,
                code,
                injected: true,
            });
        }
        self.charge(CostOp::Psmash, 0, || format!("pfn {pfn}"));
        self.rmp.psmash(pfn).map_err(|code| SimError::Rmp {
            op: "PSMASH",
            pfn,
            code,
            injected: false,
        })
    }

    pub(crate) fn make_firmware_page(&mut self) -> Result<Pfn, SimError> {
        let pfn = self.alloc_page()?;
        let st = RmpState {
            assigned: true,
            immutable: true,
            ..RmpState::default()
        };
        if let Err(e) = self.rmp_update(pfn, st) {
            self.free_page(pfn);
            return Err(SimError::Rmp {
                op: "RMPUPDATE (firmware)",
                pfn,
                code: e,
                injected: false,
            });
        }
        self.charge(CostOp::Rmpupdate4K, 0, || format!("firmware page {pfn}"));
        Ok(pfn)
    }

    /// `snp_free_firmware_page` (Linux arch/x86/virt/svm/sev.c): reclaim, make shared, free;
    /// leak the page if either step fails. The reclaim is `SNP_PAGE_RECLAIM`
    /// (`snp_reclaim_pages`), a `page_reclaim` call of the fault plan like every other. The
    /// error is the step that failed as it failed: the reclaim's firmware status (`injected`
    /// when the fault plan made it fail) or RMPUPDATE's return code, so a caller reports the
    /// real cause rather than a guess.
    pub(crate) fn free_firmware_page(&mut self, pfn: Pfn) -> Result<(), SimError> {
        self.charge(CostOp::SnpPageReclaim, 0, || format!("pfn {pfn}"));
        let done = (|| {
            self.fw_inject(FaultOp::PageReclaim, None, "SNP_PAGE_RECLAIM")?;
            let r = self.fw.snp_page_reclaim(&mut self.rmp, &self.mem, pfn);
            self.fw_result("SNP_PAGE_RECLAIM", r)?;
            // rmp_make_shared (Linux arch/x86/virt/svm/sev.c): RMPUPDATE to hypervisor-owned.
            self.rmp_update(pfn, RmpState::default())
                .map_err(|code| SimError::Rmp {
                    op: "RMPUPDATE (firmware page to shared)",
                    pfn,
                    code,
                    injected: false,
                })
        })();
        match done {
            Ok(()) => {
                self.charge(CostOp::Rmpupdate4K, 0, || format!("pfn {pfn} shared"));
                self.free_page(pfn);
            }
            Err(_) => self.leak_page(pfn),
        }
        done
    }

    pub fn flush_page(&mut self, pfn: Pfn, asid: u32) -> Result<(), SimError> {
        if self.inject(FaultOp::FlushEncryptedPage, None).is_some() {
            return Err(SimError::FlushFault {
                pfn,
                asid,
                rule: "injected",
            });
        }
        if asid == 0 {
            return Err(SimError::FlushFault {
                pfn,
                asid,
                rule: "the ASID must not be 0",
            });
        }
        if !self.mem.contains(pfn) {
            return Err(SimError::FlushFault {
                pfn,
                asid,
                rule: "the page is not mapped",
            });
        }
        self.charge(CostOp::VmPageFlush, 0, || format!("pfn {pfn} asid {asid}"));
        self.dirty.remove_label(pfn.0, pfn.0 + 1, &asid);
        Ok(())
    }

    pub fn writeback_caches(&mut self) {
        self.charge(CostOp::WbinvdAll, 0, || "all CPUs".into());
        self.dirty.clear();
        self.fw.note_wbinvd();
    }
}

impl Machine {
    /// A machine after `SNP_INIT` (charged to the clock).
    pub fn new(config: MachineConfig) -> Arc<Self> {
        let mem = HostMemory::new(config.first_pfn, config.host_bytes);
        let rmp = Rmp::new(mem.end_pfn(), config.max_asid);
        let mut hw = Hw {
            mem,
            rmp,
            fw: Firmware::new(config.max_asid, config.seed),
            model: config.costs,
            ledger: Ledger::default(),
            trace: Trace::new(config.trace, config.trace_cap),
            faults: config.faults,
            stats: Stats::default(),
            guests: HashMap::new(),
            dirty: LabelledFrames::default(),
            gmem_2m_folios: config.gmem_2m_folios,
            direct_map: DirectMap::new(config.direct_map),
            memory_budget: config.memory_budget,
            max_asid: config.max_asid,
            leaked_asids: BTreeSet::new(),
        };
        // SNP_INIT cannot fail on a fresh firmware.
        let _ = hw.fw.snp_init();
        hw.charge(CostOp::SnpInit, 0, || "platform".into());
        Arc::new(Self { hw: Mutex::new(hw) })
    }

    /// A machine with the default configuration.
    pub fn with_defaults() -> Arc<Self> {
        Self::new(MachineConfig::default())
    }

    pub(crate) fn hw(&self) -> MutexGuard<'_, Hw> {
        // Every Hw method leaves it consistent before anything that can panic.
        self.hw.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new guest of `kind` with a fresh ASID (KVM's `sev_asid_new`: when none is free but
    /// some are dirty, write back all caches and `SNP_DF_FLUSH` first; an ASID leaked by a
    /// failed decommission is never free). Give it memory with
    /// [`crate::SimPlatform::add_memslot`].
    pub fn create_guest(self: &Arc<Self>, kind: VmKind) -> Result<crate::SimPlatform, SimError> {
        let mut hw = self.hw();
        let free = |hw: &Hw| {
            let dirty = hw.fw.dirty_asids();
            (1..=hw.max_asid)
                .find(|a| !hw.guests.contains_key(a) && !dirty.contains(a) && !hw.leaked_asids.contains(a))
        };
        let asid = match free(&hw) {
            Some(a) => a,
            None => {
                hw.writeback_caches();
                hw.charge(CostOp::SnpDfFlush, 0, || "recycle ASIDs".into());
                let r = hw.fw.snp_df_flush();
                hw.fw_result("SNP_DF_FLUSH", r)?;
                free(&hw).ok_or(SimError::NoAsid { max: hw.max_asid })?
            }
        };
        hw.guests.insert(
            asid,
            GuestSlot {
                kind,
                handle: None,
                gctx: None,
                gmem: GuestMemfd::default(),
                leaked_firmware_pages: 0,
            },
        );
        Ok(crate::SimPlatform::new(self.clone(), asid, kind))
    }

    /// Per-operation counts and cycles, and the total.
    pub fn cost_report(&self) -> CostReport {
        let hw = self.hw();
        CostReport::new(&hw.model, &hw.ledger)
    }

    /// The virtual clock, in cycles.
    pub fn now(&self) -> u64 {
        self.hw().ledger.now()
    }

    /// The cost model in force.
    pub fn cost_model(&self) -> CostModel {
        self.hw().model.clone()
    }

    /// Write the timeline as Chrome trace-event JSON (opens in ui.perfetto.dev) to `out`.
    pub fn write_trace_json(&self, out: impl std::io::Write) -> serde_json::Result<()> {
        let hw = self.hw();
        hw.trace.write_chrome_json(hw.model.clock_hz(), out)
    }

    /// Close a phase of the caller's run that began at cycle `start`: put it on the timeline
    /// and report how long it took.
    pub fn end_phase(&self, name: &'static str, start: u64) -> PhaseReport {
        let end = self.now();
        let cycles = end.saturating_sub(start);
        self.hw().trace.record(TraceEvent {
            name: name.to_string(),
            cat: "phase",
            start,
            dur: cycles,
            tid: 0,
            detail: None,
        });
        PhaseReport {
            name,
            start,
            cycles,
            us: self.cost_model().micros(cycles),
        }
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        let hw = self.hw();
        Stats {
            direct_map_splits: hw.direct_map.splits(),
            leaked_asids: hw.leaked_asids.iter().copied().collect(),
            ..hw.stats.clone()
        }
    }

    /// Sizes of the machine's structures now.
    pub fn footprint(&self) -> Footprint {
        let hw = self.hw();
        let (peak_alloc, peak_data) = hw.mem.peaks();
        let rmp_bytes = hw.rmp.footprint_bytes();
        let (bookkeeping, bytes) = hw.bytes();
        Footprint {
            allocated_frames: hw.mem.allocated(),
            peak_allocated_frames: peak_alloc,
            backed_frames: hw.mem.backed_frames(),
            peak_backed_frames: peak_data,
            rmp_entries: hw.rmp.stored_entries(),
            rmp_frames: hw.rmp.tracked_frames(),
            rmp_bytes,
            guest_slot_frames: hw.guests.values().map(|g| g.gmem.slot_frames()).sum(),
            bookkeeping_bytes: bookkeeping,
            bytes,
        }
    }

    /// The ASIDs of the guests the machine holds now.
    pub fn guests(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.hw().guests.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// What guest frames `[start, end)` of the guest with `asid` are now (for tests and
    /// reports; it walks the guest's backing, so it costs time in the size of the range).
    /// A range with `start > end` is refused ([`SimError::ReversedRange`]).
    pub fn guest_census(&self, asid: u32, start: Gfn, end: Gfn) -> Result<GuestCensus, SimError> {
        if start > end {
            return Err(SimError::ReversedRange {
                op: "guest_census",
                asid,
                start,
                end,
            });
        }
        let hw = self.hw();
        let g = &hw.slot(asid)?.gmem;
        let mut census = GuestCensus {
            frames: end.0.saturating_sub(start.0),
            ..GuestCensus::default()
        };
        census.private = g.private_attr_frames(start, end);
        for e in g.private_extents(start, end) {
            census.backed += e.frames;
            census.validated += hw.rmp.validated_frames(asid, Gpa(e.gfn.0 << 12), e.pfn, e.frames);
        }
        Ok(census)
    }

    /// The RMP entry governing a frame.
    pub fn rmp_entry(&self, pfn: Pfn) -> RmpEntry {
        self.hw().rmp.entry(pfn)
    }

    /// The page size of the host's direct-map mapping a host write of `pfn` goes through
    /// (2 MiB until a 4 KiB RMPUPDATE in its region split it; see [`crate::direct_map`]).
    pub fn host_mapping(&self, pfn: Pfn) -> PageSize {
        self.hw().direct_map.mapping(pfn)
    }

    /// The firmware page state of a frame.
    pub fn page_state(&self, pfn: Pfn) -> PageState {
        let hw = self.hw();
        page_state(hw.rmp.covered(pfn), &hw.rmp.entry(pfn))
    }

    /// A host write outside vmsa-core (the VMM touching a frame): RMP-checked.
    pub fn host_write(&self, pfn: Pfn, data: &PageBuf) -> Result<(), SimError> {
        self.hw().host_write(pfn, data)
    }

    /// A host read of a frame's raw contents (ciphertext for encrypted frames).
    pub fn host_read(&self, pfn: Pfn) -> Result<Box<PageBuf>, SimError> {
        let mut b = Box::new([0u8; PAGE_SIZE as usize]);
        self.hw().host_read(pfn, &mut b)?;
        Ok(b)
    }

    /// Host `RMPUPDATE` (for tests and tools; vmsa-core goes through the platform).
    pub fn rmpupdate(&self, pfn: Pfn, st: RmpState) -> Result<(), SimError> {
        let op = if st.assigned {
            FaultOp::RmpMakePrivate
        } else {
            FaultOp::RmpMakeShared
        };
        self.hw().rmpupdate(op, pfn, st)
    }

    /// Host `PSMASH`.
    pub fn psmash(&self, pfn: Pfn) -> Result<(), SimError> {
        self.hw().psmash(pfn)
    }

    /// Replace the fault plan (call counters restart).
    pub fn set_fault_plan(&self, plan: FaultPlan) {
        self.hw().faults = plan;
    }

    /// The fault plan with its counters and fired rules.
    pub fn fault_plan(&self) -> FaultPlan {
        self.hw().faults.clone()
    }

    /// Frames allocated now (VMSA pages, guest memory, firmware pages).
    pub fn allocated_frames(&self) -> usize {
        self.hw().mem.allocated()
    }

    /// ASIDs leaked so far (a guest whose decommission failed), ascending: never reused.
    pub fn leaked_asids(&self) -> Vec<u32> {
        self.hw().leaked_asids.iter().copied().collect()
    }

    /// Frames leaked so far.
    pub fn leaked_frames(&self) -> Vec<Pfn> {
        self.hw().mem.leaked()
    }

    /// How many frames were leaked so far.
    pub fn leaked_frame_count(&self) -> u64 {
        self.hw().mem.leaked_count()
    }

    /// Frames whose cache lines are dirty under a guest key.
    pub fn dirty_frames(&self) -> usize {
        self.hw().dirty.frames() as usize
    }

    /// The launch digest of the guest with `asid`, once its launch finished.
    pub fn launch_digest(&self, asid: u32) -> Option<LaunchDigest> {
        let hw = self.hw();
        let h = hw.guests.get(&asid)?.handle?;
        hw.fw.launch_digest(h)
    }

    /// Destroy a guest (`sev_vm_destroy` + guest_memfd release): write back caches,
    /// DECOMMISSION, reclaim and free the context page (leak on failure), and give back every
    /// guest memory frame (made shared and flushed first; leaked if that fails). Call it after
    /// `Vm::teardown`.
    pub fn destroy_guest(&self, asid: u32) -> Result<DestroyReport, SimError> {
        let mut hw = self.hw();
        let mut slot = hw.guests.remove(&asid).ok_or(SimError::UnknownGuest { asid })?;
        let mut report = DestroyReport::default();
        let leaked_before = hw.stats.leaked_pages;
        if let Some(h) = slot.handle {
            hw.writeback_caches();
            let injected = hw.fw_inject(FaultOp::Decommission, None, "DECOMMISSION");
            let r = injected.and_then(|()| {
                let r = match slot.kind {
                    VmKind::Snp => {
                        hw.charge(CostOp::SnpDecommission, asid, || format!("gctx {}", h.0));
                        let Hw { fw, rmp, .. } = &mut *hw;
                        fw.snp_decommission(rmp, Pfn(h.0))
                    }
                    VmKind::SevEs => {
                        // sev_unbind_asid: DEACTIVATE, then DECOMMISSION (which ASPFW refuses
                        // with ACTIVE while the ASID is active).
                        hw.charge(CostOp::SevDeactivate, asid, || format!("handle {:#x}", h.0));
                        let r = hw.fw.sev_deactivate(h);
                        hw.fw_result("DEACTIVATE", r)?;
                        hw.charge(CostOp::SevDecommission, asid, || format!("handle {:#x}", h.0));
                        hw.fw.sev_decommission(h)
                    }
                };
                hw.fw_result("DECOMMISSION", r)
            });
            if let Err(e) = r {
                // sev_vm_destroy returns early: the context page and the ASID are leaked, and
                // so is the guest's memory (still assigned to a live firmware guest).
                // Linux arch/x86/kvm/svm/sev.c sev_vm_destroy: "Decomission handles unbinding
                // of the ASID. If it fails for some unexpected reason, just leak the ASID."
                hw.leaked_asids.insert(asid);
                if let Some(g) = slot.gctx {
                    hw.leak_page(g);
                }
                for x in slot.gmem.take_private() {
                    hw.leak_frames(x.pfn, x.frames);
                }
                for x in slot.gmem.take_shared() {
                    hw.free_frames(x.pfn, x.frames);
                }
                return Err(e);
            }
        }
        if let Some(g) = slot.gctx {
            // A context page the reclaim refuses is leaked (`snp_free_firmware_page`) and
            // counted in `leaked_pages`, hence in the report's leaks below; the destroy goes on,
            // as `sev_vm_destroy` does.
            let _ = hw.free_firmware_page(g);
        }
        // Frames leaked while the guest ran (a launch page whose reclaim failed) are the
        // guest's leaks too; release_gmem_extent leaves them leaked.
        let mut leaked_earlier = 0;
        for x in slot.gmem.take_private() {
            leaked_earlier += hw.mem.leaked_in(x.pfn, x.frames).len() as u64;
            let leaked = hw.release_gmem_extent(asid, x);
            report.frames_released += x.frames - leaked.len() as u64;
        }
        for x in slot.gmem.take_shared() {
            hw.free_frames(x.pfn, x.frames);
            report.frames_released += x.frames;
        }
        report.frames_leaked =
            hw.stats.leaked_pages - leaked_before + leaked_earlier + slot.leaked_firmware_pages;
        Ok(report)
    }

    /// WBINVD on all CPUs then `SNP_DF_FLUSH`: every dirty ASID becomes reusable.
    pub fn flush_asids(&self) -> Result<(), SimError> {
        let mut hw = self.hw();
        hw.writeback_caches();
        hw.charge(CostOp::SnpDfFlush, 0, || "all".into());
        let r = hw.fw.snp_df_flush();
        hw.fw_result("SNP_DF_FLUSH", r)
    }
}
