//! The machine: host memory, RMP, firmware, caches, the cost ledger, the trace and the fault
//! plan behind one lock, and every hardware effect as a method that checks the rules, charges
//! its cost and records it.
//!
//! Host-side effects are reached through [`crate::SimPlatform`] (vmsa-core's `Platform`) and
//! guest-side ones (guest memory accesses, PVALIDATE, RMPADJUST, page state changes, VMRUN)
//! through the same handle, which the scripted guest of [`crate::guest`] drives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use vmsa_core::{Gfn, Gpa, Hpa, PAGE_SIZE, PageBuf, Pfn, SnpPageType, VmKind};

use crate::cost::{CostModel, CostOp, CostReport, Ledger};
use crate::fault::{FaultCode, FaultOp, FaultPlan};
use crate::firmware::{Firmware, Handle, LaunchDigest, PageState, SevStatus, page_state};
use crate::memory::{DEFAULT_FIRST_PFN, GuestMemfd, HostMemory, MemError, TIB};
use crate::rmp::{GuestFault, GuestInstrError, PageSize, Rmp, RmpEntry, RmpRet, RmpState};
use crate::trace::{Trace, TraceEvent};

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
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            host_bytes: TIB,
            first_pfn: DEFAULT_FIRST_PFN,
            max_asid: 509,
            seed: 0x5eed,
            costs: CostModel::default(),
            trace: true,
            trace_cap: 1 << 20,
            faults: FaultPlan::default(),
        }
    }
}

/// Errors of the machine (the `Platform::Error` of [`crate::SimPlatform`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// An RMP instruction returned a failure code.
    #[error("{op} of pfn {pfn} returned {code}{}", inj(*injected))]
    Rmp {
        /// The instruction.
        op: &'static str,
        /// The frame.
        pfn: Pfn,
        /// The return code.
        code: RmpRet,
        /// Whether the fault plan made it fail.
        injected: bool,
    },
    /// A host access broke the RMP rules: an RMP #PF (APM §15.36.10), counted in the stats.
    #[error("RMP fault: host {access} of pfn {pfn}, which is {state:?} (assigned to ASID {asid}){}", inj(*injected))]
    RmpFault {
        /// `write` or `read`.
        access: &'static str,
        /// The frame.
        pfn: Pfn,
        /// Its firmware page state.
        state: PageState,
        /// Its owner.
        asid: u32,
        /// Whether the fault plan made it fail.
        injected: bool,
    },
    /// A firmware command returned a status.
    #[error("firmware {cmd} failed with {status}{}", inj(*injected))]
    Firmware {
        /// The command.
        cmd: &'static str,
        /// The status code.
        status: SevStatus,
        /// Whether the fault plan made it fail.
        injected: bool,
    },
    /// The page allocator failed.
    #[error("host memory: {0}")]
    Memory(#[from] MemError),
    /// The allocator was told to fail.
    #[error("page allocation failed (ENOMEM, injected)")]
    InjectedNoMemory,
    /// The VM_PAGE_FLUSH MSR write raised #GP.
    #[error("VM_PAGE_FLUSH of pfn {pfn} for ASID {asid} raised #GP: {rule}")]
    FlushFault {
        /// The frame.
        pfn: Pfn,
        /// The ASID.
        asid: u32,
        /// Why.
        rule: &'static str,
    },
    /// Every ASID is in use.
    #[error("no free ASID: all {max} SEV-ES/SNP ASIDs are in use")]
    NoAsid {
        /// The highest ASID.
        max: u32,
    },
    /// No guest has this ASID on the machine.
    #[error("no live guest with ASID {asid} on this machine")]
    UnknownGuest {
        /// The ASID.
        asid: u32,
    },
    /// The operation is for the other kind of guest.
    #[error("{op} is for {needed} guests; ASID {asid} is an {kind} guest")]
    WrongKind {
        /// The operation.
        op: &'static str,
        /// The kind it needs.
        needed: VmKind,
        /// The guest's kind.
        kind: VmKind,
        /// The guest.
        asid: u32,
    },
    /// A guest address outside every memslot.
    #[error("GPA {gpa} of guest ASID {asid} is not in any memslot")]
    NotInSlot {
        /// The address.
        gpa: Gpa,
        /// The guest.
        asid: u32,
    },
    /// A guest access or instruction faulted.
    #[error("guest ASID {asid}: {fault}")]
    GuestFault {
        /// The guest.
        asid: u32,
        /// The fault.
        fault: GuestFault,
    },
    /// A guest RMP instruction returned a failure code.
    #[error("guest ASID {asid}: {op} at GPA {gpa} returned {code}{}", inj(*injected))]
    GuestInstr {
        /// The guest.
        asid: u32,
        /// The instruction.
        op: &'static str,
        /// The address.
        gpa: Gpa,
        /// The return code.
        code: RmpRet,
        /// Whether the fault plan made it fail.
        injected: bool,
    },
    /// VMRUN refused the VMSA (`VMEXIT_INVALID`, APM table 15-41).
    #[error("VMRUN of ASID {asid} with VMSA {hpa} failed with VMEXIT_INVALID: {check}")]
    VmrunInvalid {
        /// The guest.
        asid: u32,
        /// The VMSA address.
        hpa: Hpa,
        /// The check that failed.
        check: &'static str,
    },
    /// A shared (C=0) access to a frame whose attribute is private (KVM exits with
    /// `KVM_EXIT_MEMORY_FAULT` for an implicit conversion, which this machine refuses).
    #[error("guest ASID {asid}: shared access to GPA {gpa}, which is private")]
    PrivateMemory {
        /// The guest.
        asid: u32,
        /// The address.
        gpa: Gpa,
    },
    /// A private access to a frame the guest made shared (KVM exits with
    /// `KVM_EXIT_MEMORY_FAULT`).
    #[error("guest ASID {asid}: private access to GPA {gpa}, which is shared")]
    SharedMemory {
        /// The guest.
        asid: u32,
        /// The address.
        gpa: Gpa,
    },
}

fn inj(injected: bool) -> &'static str {
    if injected { " (injected)" } else { "" }
}

impl SimError {
    /// The firmware status, if this is a firmware failure.
    pub fn firmware_status(&self) -> Option<SevStatus> {
        match self {
            Self::Firmware { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The RMP return code, if this is an RMP instruction failure.
    pub fn rmp_code(&self) -> Option<RmpRet> {
        match self {
            Self::Rmp { code, .. } | Self::GuestInstr { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether this is an RMP #PF of a host access.
    pub fn is_rmp_fault(&self) -> bool {
        matches!(self, Self::RmpFault { .. })
    }
}

/// One recorded RMP fault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RmpFaultRecord {
    /// The frame.
    pub pfn: Pfn,
    /// `write` or `read`.
    pub access: &'static str,
    /// The frame's state then.
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
}

/// Sizes of the sparse structures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Footprint {
    /// Frames allocated now.
    pub allocated_frames: usize,
    /// Most frames allocated at once.
    pub peak_allocated_frames: usize,
    /// Frames with non-zero contents now.
    pub backed_frames: usize,
    /// Most frames backed at once.
    pub peak_backed_frames: usize,
    /// RMP entries stored.
    pub rmp_entries: usize,
    /// Guest frames the memslots describe (the guests' configured memory).
    pub guest_slot_frames: u64,
    /// Approximate bytes of all sparse structures, frame contents included.
    pub bytes: usize,
}

#[derive(Debug)]
pub(crate) struct GuestSlot {
    pub kind: VmKind,
    pub handle: Option<Handle>,
    pub gctx: Option<Pfn>,
    pub gmem: GuestMemfd,
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
    /// Frames with lines cached dirty under an ASID's key.
    pub dirty: HashMap<u64, u32>,
    max_asid: u32,
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
    /// Frames leaked because their RMP state could not be restored.
    pub frames_leaked: u64,
}

fn cat(op: CostOp) -> &'static str {
    use CostOp::*;
    match op {
        Rmpupdate4K | Rmpupdate2M | Psmash | RmpCheck => "rmp",
        Pvalidate4K | Pvalidate2M | Rmpadjust | GuestCopy | VmgexitSnp | VmgexitEs => "guest",
        Vmrun | EsWorldSwitchExtra | ExitToUserspace | GmemFault => "vcpu",
        Clflush | VmPageFlush | WbinvdAll | PageAlloc | HostCopy => "host",
        _ => "firmware",
    }
}

impl Hw {
    /// Charge `op` and record it on the timeline (track `tid`).
    pub fn charge(&mut self, op: CostOp, tid: u32, detail: impl FnOnce() -> String) {
        let (start, dur) = self.ledger.charge(&self.model, op, 1);
        self.trace.record_with(|| TraceEvent {
            name: op.name().to_string(),
            cat: cat(op),
            start,
            dur,
            tid,
            detail: Some(detail()),
        });
    }

    fn inject(&mut self, op: FaultOp, ty: Option<SnpPageType>) -> Option<FaultCode> {
        let c = self.faults.check(op, ty);
        if c.is_some() {
            self.stats.injected += 1;
        }
        c
    }

    fn fw_err(&mut self, cmd: &'static str, status: SevStatus, injected: bool) -> SimError {
        self.stats.firmware_errors += 1;
        SimError::Firmware {
            cmd,
            status,
            injected,
        }
    }

    /// Check the fault plan for a firmware command.
    fn fw_inject(&mut self, op: FaultOp, ty: Option<SnpPageType>, cmd: &'static str) -> Result<(), SimError> {
        match self.inject(op, ty) {
            Some(FaultCode::Firmware(s)) => Err(self.fw_err(cmd, s, true)),
            _ => Ok(()),
        }
    }

    fn fw_result(&mut self, cmd: &'static str, r: Result<(), SevStatus>) -> Result<(), SimError> {
        r.map_err(|s| self.fw_err(cmd, s, false))
    }

    pub fn slot(&self, asid: u32) -> Result<&GuestSlot, SimError> {
        self.guests.get(&asid).ok_or(SimError::UnknownGuest { asid })
    }

    pub fn slot_mut(&mut self, asid: u32) -> Result<&mut GuestSlot, SimError> {
        self.guests.get_mut(&asid).ok_or(SimError::UnknownGuest { asid })
    }

    fn rmp_fault(&mut self, pfn: Pfn, access: &'static str, injected: bool) -> SimError {
        let e = self.rmp.entry(pfn);
        let state = page_state(self.rmp.covered(pfn), &e);
        self.stats.rmp_faults += 1;
        if self.stats.rmp_fault_log.len() < 64 {
            self.stats.rmp_fault_log.push(RmpFaultRecord {
                pfn,
                access,
                state,
                at_cycle: self.ledger.now(),
            });
        }
        SimError::RmpFault {
            access,
            pfn,
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
        if self.dirty.remove(&pfn.0).is_some() {
            self.stats.freed_unflushed += 1;
        }
        if self.mem.free(pfn).is_err() {
            self.stats.bad_frees += 1;
        }
    }

    pub fn leak_page(&mut self, pfn: Pfn) {
        if self.mem.leak(pfn).is_err() {
            self.stats.bad_frees += 1;
        } else {
            self.stats.leaked_pages += 1;
        }
    }

    /// A host write of a whole frame: RMP-checked (Hypervisor-Owned, APM table 15-39).
    pub fn host_write(&mut self, pfn: Pfn, data: &PageBuf) -> Result<(), SimError> {
        if self.inject(FaultOp::WriteFrame, None).is_some() {
            return Err(self.rmp_fault(pfn, "write", true));
        }
        if self.rmp.check_hypervisor_owned(pfn).is_err() {
            return Err(self.rmp_fault(pfn, "write", false));
        }
        self.charge(CostOp::HostCopy, 0, || format!("write pfn {pfn}"));
        self.mem.write(pfn, data)?;
        Ok(())
    }

    /// A host read: not RMP-checked; private frames read back as ciphertext.
    pub fn host_read(&mut self, pfn: Pfn, out: &mut PageBuf) -> Result<(), SimError> {
        if self.inject(FaultOp::ReadFrame, None).is_some() {
            return Err(self.rmp_fault(pfn, "read", true));
        }
        self.charge(CostOp::HostCopy, 0, || format!("read pfn {pfn}"));
        self.mem.read(pfn, out)?;
        Ok(())
    }

    // ---- RMP (host) ----

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
        self.rmp.rmpupdate(pfn, st).map_err(|code| SimError::Rmp {
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

    fn make_firmware_page(&mut self) -> Result<Pfn, SimError> {
        let pfn = self.alloc_page()?;
        let st = RmpState {
            assigned: true,
            immutable: true,
            ..RmpState::default()
        };
        if let Err(e) = self.rmp.rmpupdate(pfn, st) {
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

    /// `snp_free_firmware_page`: reclaim, make shared, free; leak if either step fails.
    fn free_firmware_page(&mut self, pfn: Pfn) -> bool {
        self.charge(CostOp::SnpPageReclaim, 0, || format!("pfn {pfn}"));
        let ok = self.fw.snp_page_reclaim(&mut self.rmp, &self.mem, pfn).is_ok()
            && self.rmp.rmpupdate(pfn, RmpState::default()).is_ok();
        if ok {
            self.charge(CostOp::Rmpupdate4K, 0, || format!("pfn {pfn} shared"));
            self.free_page(pfn);
        } else {
            self.leak_page(pfn);
        }
        ok
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
        if self.dirty.get(&pfn.0) == Some(&asid) {
            self.dirty.remove(&pfn.0);
        }
        Ok(())
    }

    pub fn writeback_caches(&mut self) {
        self.charge(CostOp::WbinvdAll, 0, || "all CPUs".into());
        self.dirty.clear();
        self.fw.note_wbinvd();
    }

    // ---- guest memory ----

    /// `kvm_gmem_get_pfn` without preparing: the frame backing `gfn`, allocated on first use.
    pub fn gmem_pfn(&mut self, asid: u32, gfn: Gfn) -> Option<Pfn> {
        if self.inject(FaultOp::GmemPfn, None).is_some() {
            return None;
        }
        let g = &self.guests.get(&asid)?.gmem;
        if let Some(p) = g.private_pfn(gfn) {
            return Some(p);
        }
        if !g.in_slot(gfn) || g.is_shared(gfn) {
            return None;
        }
        let pfn = self.mem.alloc().ok()?;
        self.charge(CostOp::PageAlloc, asid, || format!("gmem gfn {gfn} -> pfn {pfn}"));
        self.guests.get_mut(&asid)?.gmem.set_private(gfn, pfn);
        Some(pfn)
    }

    /// Resolve a private guest access: the guest_memfd frame, prepared (`sev_gmem_prepare`:
    /// RMPUPDATE to Guest-Invalid) on the first fault, with KVM's PSMASH on a SIZEM fault.
    fn private_frame(&mut self, asid: u32, gpa: Gpa) -> Result<Pfn, SimError> {
        let gfn = gpa.gfn();
        let g = &self.slot(asid)?.gmem;
        if !g.in_slot(gfn) {
            return Err(SimError::NotInSlot { gpa, asid });
        }
        if g.is_shared(gfn) {
            return Err(SimError::SharedMemory { asid, gpa });
        }
        let pfn = match g.private_pfn(gfn) {
            Some(p) => p,
            None => {
                let pfn = self.mem.alloc()?;
                self.slot_mut(asid)?.gmem.set_private(gfn, pfn);
                pfn
            }
        };
        if !self.rmp.entry(pfn).assigned {
            self.stats.npf += 1;
            self.charge(CostOp::GmemFault, asid, || format!("gpa {gpa} -> pfn {pfn}"));
            let st = RmpState {
                gpa: Gpa(gpa.0 & !(PAGE_SIZE - 1)),
                assigned: true,
                asid,
                ..RmpState::default()
            };
            self.rmp.rmpupdate(pfn, st).map_err(|code| SimError::Rmp {
                op: "RMPUPDATE (gmem prepare)",
                pfn,
                code,
                injected: false,
            })?;
        }
        if self.rmp.entry(pfn).page_size == PageSize::Size2M {
            // sev_handle_rmp_fault: a 4 KiB mapping of a 2 MiB entry faults with SIZEM.
            self.stats.npf += 1;
            self.stats.psmash_on_fault += 1;
            self.psmash(Pfn(pfn.0 & !511))?;
        }
        Ok(pfn)
    }

    fn guest_fault(&mut self, asid: u32, fault: GuestFault) -> SimError {
        match fault {
            GuestFault::Npf { .. } => self.stats.npf += 1,
            GuestFault::NotValidated { .. } => self.stats.vc += 1,
        }
        SimError::GuestFault { asid, fault }
    }

    fn key_for(&self, asid: u32) -> Result<crate::crypto::GuestKey, SimError> {
        self.fw
            .key_for_asid(asid)
            .cloned()
            .ok_or(SimError::UnknownGuest { asid })
    }

    /// A guest write of one page: C=1 (private, encrypted with the guest's key) or C=0.
    pub fn guest_write(
        &mut self,
        asid: u32,
        gpa: Gpa,
        data: &PageBuf,
        private: bool,
    ) -> Result<(), SimError> {
        let gpa = Gpa(gpa.0 & !(PAGE_SIZE - 1));
        let pfn = if private {
            let pfn = self.private_frame(asid, gpa)?;
            if let Err(f) = self.rmp.check_guest_private(asid, gpa, pfn) {
                return Err(self.guest_fault(asid, f));
            }
            pfn
        } else {
            self.shared_frame(asid, gpa)?
        };
        self.charge(CostOp::GuestCopy, asid, || {
            format!("write gpa {gpa} c={}", u8::from(private))
        });
        let mut page = *data;
        if private {
            self.key_for(asid)?.encrypt(pfn, &mut page);
            self.dirty.insert(pfn.0, asid);
        }
        self.mem.write(pfn, &page)?;
        Ok(())
    }

    /// A guest read of one page (decrypted with the guest's key when C=1).
    pub fn guest_read(&mut self, asid: u32, gpa: Gpa, private: bool) -> Result<Box<PageBuf>, SimError> {
        let gpa = Gpa(gpa.0 & !(PAGE_SIZE - 1));
        let pfn = if private {
            let pfn = self.private_frame(asid, gpa)?;
            if let Err(f) = self.rmp.check_guest_private(asid, gpa, pfn) {
                return Err(self.guest_fault(asid, f));
            }
            pfn
        } else {
            self.shared_frame(asid, gpa)?
        };
        self.charge(CostOp::GuestCopy, asid, || {
            format!("read gpa {gpa} c={}", u8::from(private))
        });
        let mut page = Box::new([0u8; PAGE_SIZE as usize]);
        self.mem.read(pfn, &mut page)?;
        if private {
            self.key_for(asid)?.decrypt(pfn, &mut page);
        }
        Ok(page)
    }

    fn shared_frame(&mut self, asid: u32, gpa: Gpa) -> Result<Pfn, SimError> {
        let gfn = gpa.gfn();
        let g = &self.slot(asid)?.gmem;
        if !g.in_slot(gfn) {
            return Err(SimError::NotInSlot { gpa, asid });
        }
        if !g.is_shared(gfn) {
            return Err(SimError::PrivateMemory { asid, gpa });
        }
        let pfn = match g.shared_pfn(gfn) {
            Some(p) => p,
            None => {
                let p = self.mem.alloc()?;
                self.slot_mut(asid)?.gmem.set_shared(gfn, p);
                p
            }
        };
        if let Err(e) = self.rmp.check_hypervisor_owned(pfn) {
            let _ = e;
            return Err(self.guest_fault(
                asid,
                GuestFault::Npf {
                    gpa: gpa.0,
                    sizem: false,
                    check: "Hypervisor-Owned: a C=0 access to an assigned page",
                },
            ));
        }
        Ok(pfn)
    }

    fn guest_instr_err(&mut self, asid: u32, op: &'static str, gpa: Gpa, e: GuestInstrError) -> SimError {
        match e {
            GuestInstrError::Ret(code) => SimError::GuestInstr {
                asid,
                op,
                gpa,
                code,
                injected: false,
            },
            GuestInstrError::Fault(f) => self.guest_fault(asid, f),
        }
    }

    /// Guest `PVALIDATE` at VMPL0 of the page at `gpa`; `Ok(false)` is "no update" (CF=1).
    pub fn pvalidate(
        &mut self,
        asid: u32,
        gpa: Gpa,
        size: PageSize,
        validate: bool,
    ) -> Result<bool, SimError> {
        if let Some(FaultCode::Rmp(code)) = self.inject(FaultOp::Pvalidate, None) {
            return Err(SimError::GuestInstr {
                asid,
                op: "PVALIDATE",
                gpa,
                code,
                injected: true,
            });
        }
        let pfn = self.private_frame(asid, gpa)?;
        let cost = match size {
            PageSize::Size4K => CostOp::Pvalidate4K,
            PageSize::Size2M => CostOp::Pvalidate2M,
        };
        self.charge(cost, asid, || format!("gpa {gpa} validate={validate}"));
        self.rmp
            .pvalidate(asid, 0, gpa, pfn, size, validate)
            .map_err(|e| self.guest_instr_err(asid, "PVALIDATE", gpa, e))
    }

    /// Guest `RMPADJUST` at VMPL0 of the 4 KiB page at `gpa`.
    pub fn rmpadjust(
        &mut self,
        asid: u32,
        gpa: Gpa,
        target_vmpl: u8,
        perms: u8,
        vmsa: bool,
    ) -> Result<(), SimError> {
        if let Some(FaultCode::Rmp(code)) = self.inject(FaultOp::Rmpadjust, None) {
            return Err(SimError::GuestInstr {
                asid,
                op: "RMPADJUST",
                gpa,
                code,
                injected: true,
            });
        }
        let pfn = self.private_frame(asid, gpa)?;
        self.charge(CostOp::Rmpadjust, asid, || format!("gpa {gpa} vmsa={vmsa}"));
        self.rmp
            .rmpadjust(asid, 0, gpa, pfn, PageSize::Size4K, target_vmpl, perms, vmsa)
            .map_err(|e| self.guest_instr_err(asid, "RMPADJUST", gpa, e))
    }

    /// The host side of a page state change to shared (GHCB PSC → `KVM_SET_MEMORY_ATTRIBUTES`
    /// → guest_memfd hole punch → `sev_gmem_invalidate`: RMPUPDATE shared, CLFLUSH, free).
    /// Returns whether a private frame was released (the VMM must then call
    /// `Vm::gmem_invalidate`).
    pub fn convert_to_shared(&mut self, asid: u32, gfn: Gfn) -> Result<bool, SimError> {
        let slot = self.slot_mut(asid)?;
        if !slot.gmem.in_slot(gfn) {
            return Err(SimError::NotInSlot {
                gpa: Gpa(gfn.0 << 12),
                asid,
            });
        }
        slot.gmem.set_attr_shared(gfn, true);
        let Some(pfn) = slot.gmem.punch(gfn) else {
            return Ok(false);
        };
        self.release_gmem_frame(asid, pfn);
        Ok(true)
    }

    /// The host side of a page state change to private: the attribute flips and the shared
    /// copy is discarded; the next private access prepares a guest_memfd frame.
    pub fn convert_to_private(&mut self, asid: u32, gfn: Gfn) -> Result<(), SimError> {
        let slot = self.slot_mut(asid)?;
        if !slot.gmem.in_slot(gfn) {
            return Err(SimError::NotInSlot {
                gpa: Gpa(gfn.0 << 12),
                asid,
            });
        }
        slot.gmem.set_attr_shared(gfn, false);
        if let Some(p) = slot.gmem.remove_shared(gfn) {
            self.free_page(p);
        }
        Ok(())
    }

    /// `sev_gmem_invalidate` for one frame: PSMASH if inside a 2 MiB entry, RMPUPDATE shared
    /// (leak on failure), CLFLUSH, free. Returns whether it was freed.
    pub(crate) fn release_gmem_frame(&mut self, asid: u32, pfn: Pfn) -> bool {
        let e = self.rmp.entry(pfn);
        if e.assigned {
            if e.page_size == PageSize::Size2M && self.psmash(Pfn(pfn.0 & !511)).is_err() {
                self.leak_page(pfn);
                return false;
            }
            // Not a vmsa-core platform call, so the fault plan does not count it.
            self.charge(CostOp::Rmpupdate4K, asid, || format!("gmem pfn {pfn} shared"));
            if self.rmp.rmpupdate(pfn, RmpState::default()).is_err() {
                self.leak_page(pfn);
                return false;
            }
        }
        self.charge(CostOp::Clflush, asid, || format!("pfn {pfn}"));
        self.dirty.remove(&pfn.0);
        self.free_page(pfn);
        true
    }

    /// VMRUN checks of the VMSA page (APM table 15-41): for SNP the page must be covered,
    /// assigned to the ASID at the expected GPA, mutable, with the VMSA bit; and not 2 MiB
    /// aligned (AMD erratum 1467: a 2 MiB-aligned VMSA faults spuriously). On success the page
    /// is marked in use until [`Hw::vmexit`].
    pub fn vmrun(&mut self, asid: u32, hpa: Hpa, expected_gpa: Gpa) -> Result<(), SimError> {
        let kind = self.slot(asid)?.kind;
        let pfn = hpa.pfn();
        let fail = |check| SimError::VmrunInvalid { asid, hpa, check };
        let injected = self.inject(FaultOp::Vmrun, None).is_some();
        self.charge(CostOp::Vmrun, asid, || format!("vmsa {hpa}"));
        self.charge(CostOp::EsWorldSwitchExtra, asid, || format!("vmsa {hpa}"));
        let check = if injected {
            Some("injected")
        } else if !self.mem.contains(pfn) {
            Some("the VMSA is not in DRAM")
        } else if pfn.is_2m_aligned() {
            Some("the VMSA is 2 MiB aligned (AMD erratum 1467)")
        } else if kind == VmKind::Snp {
            let e = self.rmp.entry(pfn);
            if !self.rmp.covered(pfn) {
                Some("Covered: the VMSA is beyond the RMP")
            } else if !e.assigned || e.asid != asid {
                Some("Guest-Owned: the VMSA is not assigned to the guest's ASID")
            } else if e.gpa != expected_gpa.0 {
                Some("Reverse-Map: the VMSA's RMP GPA differs from the vCPU's")
            } else if e.immutable {
                Some("Mutable: the VMSA is immutable")
            } else if !e.vmsa {
                Some("the RMP entry does not have the VMSA bit")
            } else {
                None
            }
        } else {
            None
        };
        if let Some(check) = check {
            self.stats.vmrun_failures += 1;
            return Err(fail(check));
        }
        self.stats.vmruns += 1;
        if kind == VmKind::Snp {
            self.rmp.set_in_use(pfn, true);
        }
        Ok(())
    }

    /// #VMEXIT: the VMSA is no longer in use.
    pub fn vmexit(&mut self, hpa: Hpa) {
        self.rmp.set_in_use(hpa.pfn(), false);
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
            dirty: HashMap::new(),
            max_asid: config.max_asid,
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
    /// some are dirty, write back all caches and `SNP_DF_FLUSH` first). Give it memory with
    /// [`crate::SimPlatform::add_memslot`].
    pub fn create_guest(self: &Arc<Self>, kind: VmKind) -> Result<crate::SimPlatform, SimError> {
        let mut hw = self.hw();
        let free = |hw: &Hw| {
            let dirty = hw.fw.dirty_asids();
            (1..=hw.max_asid).find(|a| !hw.guests.contains_key(a) && !dirty.contains(a))
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

    /// The timeline as Chrome trace-event JSON (opens in ui.perfetto.dev).
    pub fn trace_json(&self) -> serde_json::Value {
        let hw = self.hw();
        hw.trace.to_chrome_json(hw.model.clock_hz())
    }

    /// Write the timeline to a file.
    pub fn write_trace(&self, path: &std::path::Path) -> std::io::Result<()> {
        let v = self.trace_json();
        std::fs::write(path, serde_json::to_vec(&v).map_err(std::io::Error::other)?)
    }

    /// Add a span of the caller's (a phase of a run) to the timeline.
    pub fn mark_phase(&self, name: &str, start: u64, end: u64) {
        self.hw().trace.record(TraceEvent {
            name: name.to_string(),
            cat: "phase",
            start,
            dur: end.saturating_sub(start),
            tid: 0,
            detail: None,
        });
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        self.hw().stats.clone()
    }

    /// Sizes of the sparse structures.
    pub fn footprint(&self) -> Footprint {
        let hw = self.hw();
        let (peak_alloc, peak_data) = hw.mem.peaks();
        let gmem: usize = hw.guests.values().map(|g| g.gmem.footprint_bytes()).sum();
        Footprint {
            allocated_frames: hw.mem.allocated(),
            peak_allocated_frames: peak_alloc,
            backed_frames: hw.mem.backed_frames(),
            peak_backed_frames: peak_data,
            rmp_entries: hw.rmp.stored_entries(),
            guest_slot_frames: hw.guests.values().map(|g| g.gmem.slot_frames()).sum(),
            bytes: hw.mem.footprint_bytes() + hw.rmp.footprint_bytes() + gmem + hw.dirty.capacity() * 24,
        }
    }

    /// The RMP entry governing a frame.
    pub fn rmp_entry(&self, pfn: Pfn) -> RmpEntry {
        self.hw().rmp.entry(pfn)
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

    /// Frames leaked so far.
    pub fn leaked_frames(&self) -> Vec<Pfn> {
        self.hw().mem.leaked()
    }

    /// Frames whose cache lines are dirty under a guest key.
    pub fn dirty_frames(&self) -> usize {
        self.hw().dirty.len()
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
                        hw.charge(CostOp::SnpDecommission, asid, || format!("handle {:#x}", h.0));
                        hw.fw.sev_decommission(h)
                    }
                };
                hw.fw_result("DECOMMISSION", r)
            });
            if let Err(e) = r {
                // sev_vm_destroy returns early: the context page and the ASID are leaked, and
                // so is the guest's memory (still assigned to a live firmware guest).
                if let Some(g) = slot.gctx {
                    hw.leak_page(g);
                }
                for (_, pfn) in slot.gmem.private_frames() {
                    hw.leak_page(pfn);
                }
                for pfn in slot.gmem.take_shared() {
                    hw.free_page(pfn);
                }
                return Err(e);
            }
        }
        if let Some(g) = slot.gctx {
            hw.free_firmware_page(g);
        }
        for (_, pfn) in slot.gmem.private_frames() {
            if hw.release_gmem_frame(asid, pfn) {
                report.frames_released += 1;
            }
        }
        for pfn in slot.gmem.take_shared() {
            hw.free_page(pfn);
            report.frames_released += 1;
        }
        report.frames_leaked = hw.stats.leaked_pages - leaked_before;
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

impl Hw {
    /// Firmware command helpers used by the platform.
    pub fn snp_launch_start(&mut self, asid: u32, policy: u64) -> Result<(), SimError> {
        self.fw_inject(FaultOp::LaunchStart, None, "SNP_LAUNCH_START")?;
        let gctx = self.make_firmware_page()?;
        self.charge(CostOp::SnpGctxCreate, asid, || format!("gctx {gctx}"));
        let r = self.fw.snp_gctx_create(&mut self.rmp, gctx).map(|_| ());
        if let Err(e) = self.fw_result("SNP_GCTX_CREATE", r) {
            self.free_firmware_page(gctx);
            return Err(e);
        }
        let done = (|| {
            self.charge(CostOp::SnpLaunchStart, asid, || format!("policy {policy:#x}"));
            let r = self.fw.snp_launch_start(&self.rmp, gctx, policy);
            self.fw_result("SNP_LAUNCH_START", r)?;
            self.fw_inject(FaultOp::Activate, None, "SNP_ACTIVATE")?;
            self.charge(CostOp::SnpActivate, asid, || format!("asid {asid}"));
            let r = self.fw.snp_activate(&self.rmp, gctx, asid);
            self.fw_result("SNP_ACTIVATE", r)
        })();
        if let Err(e) = done {
            // snp_decommission_context: DECOMMISSION, then reclaim and free the page.
            self.charge(CostOp::SnpDecommission, asid, || format!("gctx {gctx}"));
            let _ = self.fw.snp_decommission(&mut self.rmp, gctx);
            self.free_firmware_page(gctx);
            return Err(e);
        }
        let slot = self.slot_mut(asid)?;
        slot.handle = Some(Handle(gctx.0));
        slot.gctx = Some(gctx);
        Ok(())
    }

    pub fn sev_launch_start(&mut self, asid: u32, policy: u32) -> Result<(), SimError> {
        self.fw_inject(FaultOp::LaunchStart, None, "LAUNCH_START")?;
        self.charge(CostOp::SevLaunchStart, asid, || format!("policy {policy:#x}"));
        let h = match self.fw.sev_launch_start(policy) {
            Ok(h) => h,
            Err(s) => return Err(self.fw_err("LAUNCH_START", s, false)),
        };
        let done = (|| {
            self.fw_inject(FaultOp::Activate, None, "ACTIVATE")?;
            self.charge(CostOp::SevActivate, asid, || format!("asid {asid}"));
            let r = self.fw.sev_activate(&self.rmp, h, asid);
            self.fw_result("ACTIVATE", r)
        })();
        if let Err(e) = done {
            let _ = self.fw.sev_decommission(h);
            return Err(e);
        }
        self.slot_mut(asid)?.handle = Some(h);
        Ok(())
    }

    fn handle(&self, asid: u32, cmd: &'static str) -> Result<Handle, SimError> {
        self.slot(asid)?.handle.ok_or(SimError::Firmware {
            cmd,
            status: SevStatus::InvalidGuest,
            injected: false,
        })
    }

    pub fn sev_launch_update(&mut self, asid: u32, pfn: Pfn, vmsa: bool) -> Result<(), SimError> {
        let (op, cmd) = if vmsa {
            (FaultOp::LaunchUpdateVmsa, "LAUNCH_UPDATE_VMSA")
        } else {
            (FaultOp::LaunchUpdateData, "LAUNCH_UPDATE_DATA")
        };
        self.fw_inject(op, None, cmd)?;
        let h = self.handle(asid, cmd)?;
        self.charge(CostOp::SevLaunchUpdate, asid, || format!("{cmd} pfn {pfn}"));
        let r = self.fw.sev_launch_update(&mut self.mem, h, pfn);
        self.fw_result(cmd, r)?;
        self.dirty.insert(pfn.0, asid);
        Ok(())
    }

    pub fn snp_launch_update(
        &mut self,
        asid: u32,
        pfn: Pfn,
        gpa: Gpa,
        ty: SnpPageType,
    ) -> Result<(), SimError> {
        self.fw_inject(FaultOp::SnpLaunchUpdate, Some(ty), "SNP_LAUNCH_UPDATE")?;
        let h = self.handle(asid, "SNP_LAUNCH_UPDATE")?;
        let cost = match ty {
            SnpPageType::Normal | SnpPageType::Vmsa => CostOp::SnpLaunchUpdateMeasured,
            _ => CostOp::SnpLaunchUpdateOther,
        };
        self.charge(cost, asid, || format!("{ty:?} pfn {pfn} gpa {gpa}"));
        let Hw { fw, rmp, mem, .. } = self;
        let r = fw.snp_launch_update(rmp, mem, Pfn(h.0), pfn, gpa, ty);
        self.fw_result("SNP_LAUNCH_UPDATE", r)?;
        self.dirty.insert(pfn.0, asid);
        Ok(())
    }

    pub fn launch_finish(&mut self, asid: u32, host_data: Option<[u8; 32]>) -> Result<(), SimError> {
        let cmd = if host_data.is_some() {
            "SNP_LAUNCH_FINISH"
        } else {
            "LAUNCH_FINISH"
        };
        self.fw_inject(FaultOp::LaunchFinish, None, cmd)?;
        let h = self.handle(asid, cmd)?;
        let r = match host_data {
            Some(d) => {
                self.charge(CostOp::SnpLaunchFinish, asid, || "finish".into());
                self.fw.snp_launch_finish(&self.rmp, Pfn(h.0), d)
            }
            None => {
                self.charge(CostOp::SevLaunchFinish, asid, || "finish".into());
                self.fw.sev_launch_finish(h)
            }
        };
        self.fw_result(cmd, r)
    }

    pub fn page_reclaim(&mut self, pfn: Pfn) -> Result<(), SimError> {
        self.fw_inject(FaultOp::PageReclaim, None, "SNP_PAGE_RECLAIM")?;
        self.charge(CostOp::SnpPageReclaim, 0, || format!("pfn {pfn}"));
        let r = self.fw.snp_page_reclaim(&mut self.rmp, &self.mem, pfn);
        self.fw_result("SNP_PAGE_RECLAIM", r)
    }

    /// `sev_decrypt_vmsa`'s firmware part: SNP decrypts into a temporary firmware page that is
    /// reclaimed afterwards (leaked if that fails); SEV-ES decrypts directly.
    pub fn dbg_decrypt(
        &mut self,
        asid: u32,
        kind: VmKind,
        pa: Hpa,
        out: &mut PageBuf,
    ) -> Result<(), SimError> {
        let cmd = match kind {
            VmKind::Snp => "SNP_DBG_DECRYPT",
            VmKind::SevEs => "DBG_DECRYPT",
        };
        self.fw_inject(FaultOp::DbgDecrypt, None, cmd)?;
        let h = self.handle(asid, cmd)?;
        match kind {
            VmKind::SevEs => {
                self.charge(CostOp::SevDbgDecrypt, asid, || format!("pa {pa}"));
                let r = self.fw.sev_dbg_decrypt(&self.mem, h, pa.pfn(), out);
                self.fw_result(cmd, r)
            }
            VmKind::Snp => {
                let dst = self.make_firmware_page()?;
                self.charge(CostOp::SnpDbgDecrypt, asid, || format!("pa {pa}"));
                let Hw { fw, rmp, mem, .. } = self;
                let r = fw.snp_dbg_decrypt(rmp, mem, Pfn(h.0), pa.pfn(), dst);
                let r = self.fw_result(cmd, r);
                if r.is_ok() {
                    self.mem.read(dst, out)?;
                }
                if !self.free_firmware_page(dst) {
                    return Err(SimError::Firmware {
                        cmd: "SNP_PAGE_RECLAIM",
                        status: SevStatus::InvalidPageState,
                        injected: false,
                    });
                }
                r
            }
        }
    }
}
