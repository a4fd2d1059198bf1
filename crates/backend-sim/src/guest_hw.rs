//! The guest side of the machine: private and shared guest memory accesses (encrypted with
//! the guest's key, RMP-checked per APM table 15-39), `PVALIDATE`, `RMPADJUST`, page state
//! changes with their guest_memfd effects, and VMRUN's VMSA checks (APM table 15-41).

use vmsa_core::{Gfn, Gpa, Hpa, PAGE_SIZE, PMD_SIZE, PTRS_PER_PMD, PageBuf, Pfn, VmKind};

use crate::cost::CostOp;
use crate::error::SimError;
use crate::fault::{FaultCode, FaultOp};
use crate::machine::Hw;
use crate::memory::Extent;
use crate::rmp::{GuestFault, GuestInstrError, PageSize, RmpState, RunError};

/// What a conversion to shared did to the private frames of the range.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Converted {
    /// How many guest frames had their private frame made shared, flushed and freed.
    pub released: u64,
    /// Guest frames whose private frame could not be made shared (RMPUPDATE refused it, e.g.
    /// FAIL_INUSE for a VMSA a vCPU still runs on): leaked on purpose, never reused.
    pub leaked: Vec<(Gfn, Pfn)>,
}

impl Hw {
    // ---- guest memory ----

    /// guest_memfd's first use of `gfn` (in a memslot, unbacked): a 2 MiB folio when the machine
    /// hands them out and one fits there (2 MiB-aligned guest region wholly in a memslot and
    /// unbacked, and a 2 MiB host block free), else a 4 KiB one, 2 MiB aligned only if `gfn`
    /// is ([`crate::memory::HostMemory::alloc_at`]). Returns the frame for `gfn`.
    fn gmem_back(&mut self, asid: u32, gfn: Gfn) -> Result<Pfn, SimError> {
        let region = Gfn(gfn.0 & !(PTRS_PER_PMD - 1));
        if self.gmem_2m_folios
            && self.slot(asid)?.gmem.folio_fits(region)
            && let Some(pfn) = self.mem.alloc_2m_run()
        {
            self.slot_mut(asid)?.gmem.add_private(Extent {
                gfn: region,
                pfn,
                frames: PTRS_PER_PMD,
                huge: true,
            });
            return Ok(Pfn(pfn.0 + (gfn.0 - region.0)));
        }
        // A 4 KiB folio keeps the guest frame's offset in its 2 MiB region (as memory from a
        // huge-page pool does), as `gmem_back_run` places its runs: a guest page that is not
        // 2 MiB aligned never lands on a 2 MiB-aligned frame, which AMD erratum 1467 forbids
        // for a VMSA (Linux arch/x86/coco/sev/core.c `snp_alloc_vmsa_page` avoids it by GPA).
        let pfn = self.mem.alloc_at(gfn.0)?;
        self.slot_mut(asid)?.gmem.set_private(gfn, pfn);
        Ok(pfn)
    }

    /// The frame guest_memfd already has for private `gfn`, if any: a lookup with no side
    /// effect (no `gmem_pfn` call counted in the fault plan, no cost, no allocation), for the
    /// host kernel's own prechecks, which must not shift the numbering of the platform calls
    /// vmsa-core makes ([`crate::fault`]). A frame with no backing yet is not prepared either.
    pub(crate) fn gmem_backing(&self, asid: u32, gfn: Gfn) -> Option<Pfn> {
        self.guests.get(&asid)?.gmem.private_pfn(gfn)
    }

    /// `kvm_gmem_get_pfn` without preparing: the frame backing `gfn`, allocated on first use.
    /// `None` when guest_memfd has no page for it (outside every memslot, shared, an injected
    /// UNBACKED) and also when backing it failed: `Platform::gmem_pfn` can say nothing else.
    /// A caller that can return an error uses [`Hw::gmem_frame`], which keeps that failure.
    pub fn gmem_pfn(&mut self, asid: u32, gfn: Gfn) -> Option<Pfn> {
        self.gmem_frame(asid, gfn).ok().flatten()
    }

    /// [`Hw::gmem_pfn`] keeping why a frame could not be had: `Ok(None)` when guest_memfd has
    /// no page for `gfn` (outside every memslot, shared, or the fault plan's UNBACKED: a
    /// `gmem_pfn` call of the plan), `Err` when backing it failed (host memory exhausted,
    /// [`SimError::Memory`]) or the guest is gone. `kvm_gmem_get_pfn` (virt/kvm/guest_memfd.c)
    /// likewise returns the folio allocation's `-ENOMEM`, distinct from `-EINVAL`/`-EFAULT`
    /// for a GFN without guest_memfd.
    pub(crate) fn gmem_frame(&mut self, asid: u32, gfn: Gfn) -> Result<Option<Pfn>, SimError> {
        if self.inject(FaultOp::GmemPfn, None).is_some() {
            return Ok(None);
        }
        let g = &self.slot(asid)?.gmem;
        if let Some(p) = g.private_pfn(gfn) {
            return Ok(Some(p));
        }
        if !g.in_slot(gfn) || g.is_shared(gfn) {
            return Ok(None);
        }
        let pfn = self.gmem_back(asid, gfn)?;
        self.charge(CostOp::PageAlloc, asid, || format!("gmem gfn {gfn} -> pfn {pfn}"));
        Ok(Some(pfn))
    }

    /// Resolve a private guest access: the guest_memfd frame, prepared on the first fault as
    /// Linux arch/x86/kvm/svm/sev.c `sev_gmem_prepare` does: RMPUPDATE to Guest-Invalid, as one
    /// 2 MiB entry when the folio is 2 MiB and its whole 2 MiB is still hypervisor-owned
    /// (`is_large_rmp_possible`), else as a 4 KiB entry.
    pub(crate) fn private_frame(&mut self, asid: u32, gpa: Gpa) -> Result<Pfn, SimError> {
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
            None => self.gmem_back(asid, gfn)?,
        };
        // SEV-ES guests have no RMP: their memory is only encrypted.
        if self.slot(asid)?.kind == VmKind::Snp && !self.rmp.entry(pfn).assigned {
            self.stats.npf += 1;
            self.charge(CostOp::GmemFault, asid, || format!("gpa {gpa} -> pfn {pfn}"));
            let huge = self
                .slot(asid)?
                .gmem
                .private_extent(gfn)
                .is_some_and(|(_, e)| e.huge);
            let head = Pfn(pfn.0 & !(PTRS_PER_PMD - 1));
            let large = huge && self.rmp.region_unassigned(head);
            let (at, st) = if large {
                // The rest of the 2 MiB folio is cleared too (`kvm_gmem_prepare_folio`).
                self.charge_n(CostOp::PageAlloc, PTRS_PER_PMD - 1, asid, || {
                    format!("clear the 2 MiB folio at pfn {head}")
                });
                let st = RmpState {
                    gpa: Gpa(gpa.0 & !(PMD_SIZE - 1)),
                    assigned: true,
                    page_size: PageSize::Size2M,
                    asid,
                    ..RmpState::default()
                };
                (head, st)
            } else {
                let st = RmpState {
                    gpa: Gpa(gpa.0 & !(PAGE_SIZE - 1)),
                    assigned: true,
                    asid,
                    ..RmpState::default()
                };
                (pfn, st)
            };
            self.rmp_update(at, st).map_err(|code| SimError::Rmp {
                op: "RMPUPDATE (gmem prepare)",
                pfn: at,
                code,
                injected: false,
            })?;
        }
        Ok(pfn)
    }

    /// Run a guest RMP instruction; on #NPF(SIZEM) (a 4 KiB PVALIDATE/RMPADJUST on a 2 MiB
    /// RMP entry, the only instructions that raise it) do what KVM does and retry once:
    /// Linux arch/x86/kvm/svm/sev.c `sev_handle_rmp_fault` PSMASHes the 2 MiB entry and
    /// resumes the guest, which re-executes the instruction.
    fn with_sizem_retry<T>(
        &mut self,
        pfn: Pfn,
        mut f: impl FnMut(&mut Self) -> Result<T, GuestInstrError>,
    ) -> Result<T, GuestInstrError> {
        match f(self) {
            Err(GuestInstrError::Fault(GuestFault::Npf { sizem: true, .. })) => {
                self.stats.npf += 1;
                self.stats.psmash_on_fault += 1;
                // A failed PSMASH leaves the entry 2 MiB: the retry faults again and the
                // fault reaches the caller.
                let _ = self.psmash(Pfn(pfn.0 & !511));
                f(self)
            }
            r => r,
        }
    }

    pub(crate) fn guest_fault(&mut self, asid: u32, fault: GuestFault) -> SimError {
        match fault {
            GuestFault::Npf { .. } => self.stats.npf += 1,
            GuestFault::NotValidated { .. } => self.stats.vc += 1,
        }
        SimError::GuestFault { asid, fault }
    }

    /// The memory encryption key of guest `asid`. A live guest has none until its launch
    /// start (the firmware generates the VEK at `LAUNCH_START`, SEV API §6.2, or
    /// `SNP_LAUNCH_START`, SNP ABI §8.16, and binds it to the ASID at ACTIVATE): a private
    /// access or VMRUN before then is [`SimError::NoKey`]; an ASID with no guest at all is
    /// [`SimError::UnknownGuest`].
    pub(crate) fn key_for(&self, asid: u32) -> Result<crate::crypto::GuestKey, SimError> {
        if let Some(key) = self.fw.key_for_asid(asid) {
            return Ok(key.clone());
        }
        self.slot(asid)?;
        Err(SimError::NoKey { asid })
    }

    /// The frame a guest `access` ("read" or "write") of the page at `gpa` goes to, charged as
    /// a guest copy: C=1 (`private`) resolves the guest_memfd frame, which for SNP must pass
    /// the RMP checks of table 15-39; C=0 the shared frame. An SEV-ES guest has no private or
    /// shared attribute (KVM's `npf_interception` marks an access private only for SNP): its
    /// C=0 access goes to the same frame as a C=1 one, unencrypted, and never faults.
    fn access_frame(&mut self, asid: u32, gpa: Gpa, private: bool, access: &str) -> Result<Pfn, SimError> {
        let gpa = Gpa(gpa.0 & !(PAGE_SIZE - 1));
        let sev_es = self.slot(asid)?.kind == VmKind::SevEs;
        let pfn = if private || sev_es {
            let pfn = self.private_frame(asid, gpa)?;
            if self.slot(asid)?.kind == VmKind::Snp {
                // One RMP check per page access (the simulator models one TLB fill each).
                self.charge(CostOp::RmpCheck, asid, || format!("gpa {gpa} pfn {pfn}"));
                if let Err(f) = self.rmp.check_guest_private(asid, gpa, pfn) {
                    return Err(self.guest_fault(asid, f));
                }
            }
            pfn
        } else {
            self.shared_frame(asid, gpa)?
        };
        self.charge(CostOp::GuestCopy, asid, || {
            format!("{access} gpa {gpa} c={}", u8::from(private))
        });
        Ok(pfn)
    }

    /// A guest write of one page: C=1 (private, encrypted with the guest's key) or C=0.
    pub fn guest_write(
        &mut self,
        asid: u32,
        gpa: Gpa,
        data: &PageBuf,
        private: bool,
    ) -> Result<(), SimError> {
        self.check_budget("guest write")?;
        let pfn = self.access_frame(asid, gpa, private, "write")?;
        if private {
            let key = self.key_for(asid)?;
            self.mem.write_encrypted(pfn, &key, data)?;
            self.dirty.set(pfn.0, &asid);
        } else {
            self.mem.write(pfn, data)?;
        }
        Ok(())
    }

    /// A guest read of one page (decrypted with the guest's key when C=1).
    pub fn guest_read(&mut self, asid: u32, gpa: Gpa, private: bool) -> Result<Box<PageBuf>, SimError> {
        let pfn = self.access_frame(asid, gpa, private, "read")?;
        let mut page = Box::new([0u8; PAGE_SIZE as usize]);
        if private {
            self.mem.read_decrypted(pfn, &self.key_for(asid)?, &mut page)?;
        } else {
            self.mem.read(pfn, &mut page)?;
        }
        Ok(page)
    }

    pub(crate) fn shared_frame(&mut self, asid: u32, gpa: Gpa) -> Result<Pfn, SimError> {
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
        // The guest's access goes through its nested page table, not the host's direct map;
        // the simulator's shared guest frames are single 4 KiB frames, mapped 4 KiB there.
        if self.rmp.check_hypervisor_owned(pfn, PageSize::Size4K).is_err() {
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

    pub(crate) fn guest_instr_err(
        &mut self,
        asid: u32,
        op: &'static str,
        gpa: Gpa,
        e: GuestInstrError,
    ) -> SimError {
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

    /// SNP-only guest instructions raise #UD in an SEV-ES guest.
    fn need_snp(&self, asid: u32, op: &'static str) -> Result<(), SimError> {
        let kind = self.slot(asid)?.kind;
        if kind != VmKind::Snp {
            return Err(SimError::WrongKind {
                op,
                needed: VmKind::Snp,
                kind,
                asid,
            });
        }
        Ok(())
    }

    /// What a guest RMP instruction `op` does before its RMP rules: #UD outside SNP, a return
    /// code the fault plan injects at `fault`, then the guest_memfd frame of the page at `gpa`.
    fn guest_instr_frame(
        &mut self,
        asid: u32,
        op: &'static str,
        fault: FaultOp,
        gpa: Gpa,
    ) -> Result<Pfn, SimError> {
        self.need_snp(asid, op)?;
        if let Some(FaultCode::Rmp(code)) = self.inject(fault, None) {
            return Err(SimError::GuestInstr {
                asid,
                op,
                gpa,
                code,
                injected: true,
            });
        }
        self.private_frame(asid, gpa)
    }

    /// Guest `PVALIDATE` at VMPL0 of the page at `gpa`; `Ok(false)` is "no update" (CF=1).
    pub fn pvalidate(
        &mut self,
        asid: u32,
        gpa: Gpa,
        size: PageSize,
        validate: bool,
    ) -> Result<bool, SimError> {
        let pfn = self.guest_instr_frame(asid, "PVALIDATE", FaultOp::Pvalidate, gpa)?;
        let cost = match size {
            PageSize::Size4K => CostOp::Pvalidate4K,
            PageSize::Size2M => CostOp::Pvalidate2M,
        };
        self.charge(cost, asid, || format!("gpa {gpa} validate={validate}"));
        self.with_sizem_retry(pfn, |hw| hw.rmp.pvalidate(asid, 0, gpa, pfn, size, validate))
            .map_err(|e| self.guest_instr_err(asid, "PVALIDATE", gpa, e))
    }

    /// Guest `PVALIDATE` at VMPL0 of `pages` pages of `size` from `gpa`, in order, stopping at
    /// the first that fails: exactly what [`Hw::pvalidate`] page by page does (each page one
    /// call for the fault plan, one charge, one first-use preparation of its guest_memfd frame),
    /// but 4 KiB pages go a 2 MiB region at a time through one pass over the RMP when nothing
    /// there needs the page-by-page path (a fault the plan injects, a 2 MiB entry, a 2 MiB
    /// folio still to prepare). Returns how many pages changed and how many were "no update".
    pub fn pvalidate_range(
        &mut self,
        asid: u32,
        gpa: Gpa,
        pages: u64,
        size: PageSize,
        validate: bool,
    ) -> Result<(u64, u64), SimError> {
        let (mut changed, mut same) = (0, 0);
        let mut i = 0;
        while i < pages {
            // A pass does at most one 2 MiB region: the structures grow by at most one
            // region's entries beyond the budget before the range stops.
            self.check_budget("PVALIDATE")?;
            let at = Gpa(gpa.0 + i * size.bytes());
            if size == PageSize::Size4K
                && let Some((done, ch)) = self.pvalidate_4k_fast(asid, at, pages - i, validate)?
            {
                changed += ch;
                same += done - ch;
                i += done;
                continue;
            }
            if self.pvalidate(asid, at, size, validate)? {
                changed += 1;
            } else {
                same += 1;
            }
            i += 1;
        }
        Ok((changed, same))
    }

    /// Up to `max` 4 KiB PVALIDATEs from `gpa` in one pass (see [`Hw::pvalidate_range`]):
    /// `None` when the next page needs the page-by-page path, else how many pages were done
    /// and how many of them changed (an error ends the range, as the page-by-page path would).
    fn pvalidate_4k_fast(
        &mut self,
        asid: u32,
        gpa: Gpa,
        max: u64,
        validate: bool,
    ) -> Result<Option<(u64, u64)>, SimError> {
        let quiet = self.faults.quiet(FaultOp::Pvalidate);
        let gfn = gpa.gfn();
        let to_region_end = PTRS_PER_PMD - (gfn.0 & (PTRS_PER_PMD - 1));
        let mut n = max.min(quiet).min(to_region_end);
        let Some(slot) = self.guests.get(&asid) else {
            return Ok(None);
        };
        let end = Gfn(gfn.0 + n);
        if n == 0
            || slot.kind != VmKind::Snp
            || !slot.gmem.covers(gfn, end)
            || !slot.gmem.is_private_range(gfn, end)
        {
            return Ok(None);
        }
        let (pfn, ext) = match slot.gmem.private_extent(gfn) {
            Some(x) => x,
            None => {
                // Back the unbacked guest frames from `gfn` (up to the next backed one).
                let backed = slot
                    .gmem
                    .private_extents(gfn, end)
                    .next()
                    .map_or(end.0, |e| e.gfn.0);
                n = n.min(backed - gfn.0);
                self.gmem_back_run(asid, gfn, n)?;
                match self.slot(asid)?.gmem.private_extent(gfn) {
                    Some(x) => x,
                    None => return Ok(None),
                }
            }
        };
        n = n
            .min(ext.gfn.0 + ext.frames - gfn.0)
            .min(PTRS_PER_PMD - (pfn.0 & (PTRS_PER_PMD - 1)));
        let head = Pfn(pfn.0 & !(PTRS_PER_PMD - 1));
        if !self.rmp.run_fits(pfn, n) || (ext.huge && self.rmp.region_unassigned(head)) {
            return Ok(None);
        }
        let run = self.rmp.pvalidate_4k_run(asid, gpa, pfn, n, validate);
        if run.prepared > 0 || matches!(run.error, Some(RunError::Prepare(_))) {
            // Linux `rmpupdate()`'s `adjust_direct_map` before the run's first RMPUPDATE.
            self.direct_map.adjust(pfn, PageSize::Size4K);
        }
        let failed = u64::from(run.error.is_some());
        self.faults.skip(FaultOp::Pvalidate, run.done + failed);
        self.stats.npf += run.prepared;
        self.charge_n(CostOp::GmemFault, run.prepared, asid, || {
            format!("{} pages from gpa {gpa}", run.prepared)
        });
        let charged = run.done + u64::from(matches!(run.error, Some(RunError::Pvalidate(_))));
        self.charge_n(CostOp::Pvalidate4K, charged, asid, || {
            format!("{charged} pages from gpa {gpa} validate={validate}")
        });
        let at = Gpa(gpa.0 + run.done * PAGE_SIZE);
        match run.error {
            None => Ok(Some((run.done, run.changed))),
            Some(RunError::Prepare(code)) => Err(SimError::Rmp {
                op: "RMPUPDATE (gmem prepare)",
                pfn: Pfn(pfn.0 + run.done),
                code,
                injected: false,
            }),
            Some(RunError::Pvalidate(e)) => Err(self.guest_instr_err(asid, "PVALIDATE", at, e)),
        }
    }

    /// Back the unbacked guest frames `[gfn, gfn + n)` (all in a memslot, within one 2 MiB
    /// region): a 2 MiB folio where one fits, else (for more than one page) runs of 4 KiB
    /// folios, placed at host frames
    /// with the guest frames' offset in their 2 MiB region (as memory from a huge-page pool
    /// is), so that a guest page which is not 2 MiB aligned is not backed by a 2 MiB-aligned
    /// frame either: the guest's workaround for AMD erratum 1467 (Linux
    /// arch/x86/coco/sev/core.c `snp_alloc_vmsa_page` never uses a 2 MiB-aligned page as a
    /// VMSA) then holds on the host too.
    fn gmem_back_run(&mut self, asid: u32, gfn: Gfn, n: u64) -> Result<(), SimError> {
        let region = Gfn(gfn.0 & !(PTRS_PER_PMD - 1));
        if n == 1 || (self.gmem_2m_folios && self.slot(asid)?.gmem.folio_fits(region)) {
            // One page is backed as a first touch backs it (a folio, or a frame at the page's
            // offset in its 2 MiB region).
            self.gmem_back(asid, gfn)?;
            return Ok(());
        }
        let mut done = 0;
        while done < n {
            let (pfn, got) = self.mem.alloc_run_at(n - done, gfn.0 + done)?;
            self.slot_mut(asid)?.gmem.add_private(Extent {
                gfn: Gfn(gfn.0 + done),
                pfn,
                frames: got,
                huge: false,
            });
            done += got;
        }
        Ok(())
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
        self.check_budget("RMPADJUST")?;
        let pfn = self.guest_instr_frame(asid, "RMPADJUST", FaultOp::Rmpadjust, gpa)?;
        self.charge(CostOp::Rmpadjust, asid, || format!("gpa {gpa} vmsa={vmsa}"));
        self.with_sizem_retry(pfn, |hw| {
            hw.rmp
                .rmpadjust(asid, 0, gpa, pfn, PageSize::Size4K, target_vmpl, perms, vmsa)
        })
        .map_err(|e| self.guest_instr_err(asid, "RMPADJUST", gpa, e))
    }

    /// The guest's guest_memfd, for a page state change of `gfn` (which must be in its memslot).
    /// `KVM_SET_MEMORY_ATTRIBUTES` over guest frames `[start, end)`, and what QEMU does next.
    /// To shared: the attribute flips and every private frame there is punched out of
    /// guest_memfd (`sev_gmem_invalidate`: RMPUPDATE shared, CLFLUSH, free); returns the guest
    /// frames released (the VMM must then call `Vm::gmem_invalidate`). To private: the
    /// attribute flips and the shared copies are discarded; the next private access prepares a
    /// guest_memfd frame. The whole range must lie in memslots; one interval of any size costs
    /// the same.
    pub fn convert(
        &mut self,
        asid: u32,
        start: Gfn,
        end: Gfn,
        to_shared: bool,
    ) -> Result<Converted, SimError> {
        if start > end {
            return Err(SimError::ReversedRange {
                op: "convert",
                asid,
                start,
                end,
            });
        }
        let gmem = &mut self.slot_mut(asid)?.gmem;
        if let Some(outside) = gmem.first_uncovered(start, end) {
            return Err(SimError::NotInSlot {
                gpa: Gpa(outside.0 << 12),
                asid,
            });
        }
        gmem.set_attr(start, end, !to_shared);
        let mut out = Converted::default();
        if to_shared {
            for e in self.slot_mut(asid)?.gmem.punch(start, end) {
                let leaked = self.release_gmem_extent(asid, e);
                out.released += e.frames - leaked.len() as u64;
                out.leaked.extend(leaked);
            }
        } else {
            for e in self.slot_mut(asid)?.gmem.remove_shared(start, end) {
                self.free_frames(e.pfn, e.frames);
            }
        }
        Ok(out)
    }

    /// `sev_gmem_invalidate` for the private frames of extent `e` (Linux
    /// arch/x86/kvm/svm/sev.c): a whole 2 MiB entry is made shared with one 2 MiB RMPUPDATE,
    /// part of one after a PSMASH; every assigned 4 KiB entry with a 4 KiB RMPUPDATE; then the
    /// frames are flushed and freed. A frame whose PSMASH or RMPUPDATE fails is leaked (never
    /// reused), and returned.
    pub(crate) fn release_gmem_extent(&mut self, asid: u32, e: Extent) -> Vec<(Gfn, Pfn)> {
        let mut leaked = Vec::new();
        let end = e.pfn.0 + e.frames;
        let mut p = e.pfn.0;
        while p < end {
            let head = p & !(PTRS_PER_PMD - 1);
            let k = end.min(head + PTRS_PER_PMD) - p;
            let mut refused: Vec<Pfn> = Vec::new();
            let large = self.rmp.entry(Pfn(head));
            if large.page_size == PageSize::Size2M && large.assigned {
                if p == head && k == PTRS_PER_PMD {
                    self.charge(CostOp::Rmpupdate2M, asid, || {
                        format!("gmem pfn {head} shared (2 MiB)")
                    });
                    let st = RmpState {
                        page_size: PageSize::Size2M,
                        ..RmpState::default()
                    };
                    if self.rmp_update(Pfn(head), st).is_err() {
                        refused.extend((p..p + k).map(Pfn));
                    }
                } else if self.psmash(Pfn(head)).is_err() {
                    refused.extend((p..p + k).map(Pfn));
                }
            }
            if refused.is_empty() && self.rmp.run_fits(Pfn(p), k) {
                // Not vmsa-core platform calls, so the fault plan does not count them.
                let (updated, r) = self.rmp.make_shared_4k_run(Pfn(p), k);
                if updated > 0 || !r.is_empty() {
                    // Linux `rmpupdate()`'s `adjust_direct_map` before the run's first RMPUPDATE.
                    self.direct_map.adjust(Pfn(p), PageSize::Size4K);
                }
                self.charge_n(CostOp::Rmpupdate4K, updated, asid, || {
                    format!("{updated} gmem frames from pfn {p} shared")
                });
                refused = r;
            }
            self.charge_n(CostOp::Clflush, k - refused.len() as u64, asid, || {
                format!("{k} frames from pfn {p}")
            });
            // Frames leaked while the guest ran (`snp_leak_pages` holds a reference) stay
            // leaked: never freed, and not leaked twice.
            let earlier = self.mem.leaked_in(Pfn(p), k);
            if !earlier.is_empty() {
                refused.extend(earlier);
                refused.sort_unstable();
                refused.dedup();
            }
            // Free the runs between refused frames; leak the refused ones.
            let mut from = p;
            for &r in &refused {
                self.dirty.remove(from, r.0);
                self.free_frames(Pfn(from), r.0 - from);
                if !self.mem.is_leaked(r) {
                    self.leak_page(r);
                }
                leaked.push((Gfn(e.gfn.0 + (r.0 - e.pfn.0)), r));
                from = r.0 + 1;
            }
            self.dirty.remove(from, p + k);
            self.free_frames(Pfn(from), p + k - from);
            p += k;
        }
        leaked
    }

    /// VMRUN checks of the VMSA page (APM table 15-41): for SNP the page must be covered,
    /// assigned to the ASID, mutable, with the VMSA bit; and not 2 MiB aligned (AMD erratum
    /// 1467: on an SNP-enabled host a 2 MiB-aligned VMSA faults spuriously). VMRUN is given
    /// only the VMSA's system-physical address (the VMCB's VMSA pointer), so the RMP entry's
    /// GPA is not compared with anything. On success the page is marked in use until
    /// [`Hw::vmexit`].
    pub fn vmrun(&mut self, asid: u32, hpa: Hpa) -> Result<(), SimError> {
        let kind = self.slot(asid)?.kind;
        let pfn = hpa.pfn();
        let fail = |check| SimError::VmrunInvalid { asid, hpa, check };
        let injected = self.inject(FaultOp::Vmrun, None).is_some();
        self.charge(CostOp::Vmrun, asid, || format!("vmsa {hpa}"));
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
        let check = match check {
            Some(c) => Some(c),
            None => self.vmsa_state_check(asid, pfn)?,
        };
        if let Some(check) = check {
            self.stats.vmrun_failures += 1;
            return Err(fail(check));
        }
        // The processor sets the VMSA's BUSY bit at VMRUN and clears it at #VMEXIT; a VMRUN
        // that finds it set fails (APM vol. 2 table C-1, VMEXIT_BUSY). On SNP two vCPUs can
        // name one page: AP creation lets a guest give two APs the same VMSA GPA, and KVM
        // (`sev_snp_ap_creation`) does not check that no other vCPU uses it.
        if kind == VmKind::Snp && self.rmp.in_use(pfn) {
            self.stats.vmrun_failures += 1;
            return Err(SimError::VmrunBusy { asid, hpa });
        }
        self.stats.vmruns += 1;
        if kind == VmKind::Snp {
            self.rmp.set_in_use(pfn, true);
        }
        Ok(())
    }

    /// VMRUN's checks of the guest state it loads (AMD APM vol. 2 §15.5.1, the illegal states
    /// that fail VMRUN with VMEXIT_INVALID, which KVM's `__nested_vmcb_check_save` and
    /// `nested_vmcb_valid_sregs` (arch/x86/kvm/svm/nested.c) apply to a nested guest):
    /// CR0[63:32], DR6[63:32], DR7[63:32] and EFER[63:32] must be zero, and CR0.NW without
    /// CR0.CD is illegal. For an encrypted VMSA the processor checks what the page decrypts to
    /// with the guest's key, so a page nobody encrypted with that key (an SEV-ES VMSA before
    /// LAUNCH_UPDATE_VMSA) decrypts to noise and fails: noise has one of those 128 must-be-zero
    /// bits set but with probability 2^-128. Only bits that are reserved on every processor are
    /// checked (EFER's defined bits all sit below bit 32).
    fn vmsa_state_check(&self, asid: u32, pfn: Pfn) -> Result<Option<&'static str>, SimError> {
        let mut page = [0u8; PAGE_SIZE as usize];
        self.mem.read_decrypted(pfn, &self.key_for(asid)?, &mut page)?;
        let s = vmsa_core::SevEsSaveArea::from_page(&page);
        const HIGH: u64 = 0xffff_ffff_0000_0000;
        const CR0_NW: u64 = 1 << 29;
        const CR0_CD: u64 = 1 << 30;
        Ok(if s.cr0 & HIGH != 0 {
            Some("CR0[63:32] are not zero (the VMSA decrypts to an illegal state)")
        } else if s.cr0 & (CR0_NW | CR0_CD) == CR0_NW {
            Some("CR0.NW is set without CR0.CD")
        } else if s.dr6 & HIGH != 0 || s.dr7 & HIGH != 0 {
            Some("DR6[63:32] or DR7[63:32] are not zero (the VMSA decrypts to an illegal state)")
        } else if s.efer & HIGH != 0 {
            Some("an EFER must-be-zero bit is set (the VMSA decrypts to an illegal state)")
        } else {
            None
        })
    }

    /// #VMEXIT: the VMSA is no longer in use.
    pub fn vmexit(&mut self, hpa: Hpa) {
        self.rmp.set_in_use(hpa.pfn(), false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{DEFAULT_MEMORY_BUDGET, Machine, MachineConfig};

    #[test]
    fn a_4k_access_to_a_2m_entry_is_psmashed_by_the_host() {
        let m = Machine::new(MachineConfig::default());
        let p = m.create_guest(VmKind::Snp).unwrap();
        p.add_private_memslot(Gpa(0), 8 << 20).unwrap();
        let asid = vmsa_core::Platform::asid(&p).0;
        let gpa = Gpa(0x40_0000);
        map_2m(&m, asid, gpa);
        assert_eq!(p.pvalidate(gpa, PageSize::Size4K, true), Ok(true));
        let s = m.stats();
        assert_eq!((s.psmash_on_fault, s.npf), (1, 1));
        let pfn = vmsa_core::Platform::gmem_pfn(&p, gpa.gfn()).unwrap();
        assert_eq!(m.rmp_entry(pfn).page_size, PageSize::Size4K);
        // Another guest frame of the same 2 MiB region kept its attributes through PSMASH.
        let next = m.rmp_entry(Pfn(pfn.0 + 1));
        assert_eq!(
            (next.asid, next.gpa, next.validated),
            (asid, gpa.0 + 0x1000, false)
        );
    }

    /// A guest's range operation stops at the machine's memory budget, with an error naming
    /// the operation and the budget, once the structures outgrow it (it went on for as long as
    /// the range lasted: 4 KiB PVALIDATEs of 10^9 pages took 8 GB), and later operations fail
    /// the same way.
    #[test]
    fn a_range_operation_stops_at_the_memory_budget() {
        let guest = |budget| {
            let m = Machine::new(MachineConfig {
                memory_budget: budget,
                ..MachineConfig::default()
            });
            let p = m.create_guest(VmKind::Snp).unwrap();
            p.add_private_memslot(Gpa(0), 64 << 20).unwrap();
            (m, p)
        };
        let base = guest(DEFAULT_MEMORY_BUDGET).0.footprint().bytes as u64;
        // 16,384 4 KiB entries take 128 KiB of RMP alone: 64 KiB over the bare machine is not
        // enough.
        let budget = base + (64 << 10);
        let (m, p) = guest(budget);
        let e = p
            .pvalidate_range(Gpa(0), 16384, PageSize::Size4K, true)
            .unwrap_err();
        assert!(
            matches!(e, SimError::MemoryBudget { op: "PVALIDATE", budget: b, used } if b == budget && used > budget),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains(&format!("memory budget of {budget} bytes")),
            "{e}"
        );
        // One 2 MiB region's pass at most beyond the budget.
        let f = m.footprint();
        assert!(f.bytes as u64 <= budget + 4096 + 64, "{f:?}");
        assert!(f.rmp_frames < 16384, "the range stopped: {f:?}");
        let e = p.guest_write(Gpa(0), &[1; 4096], true).unwrap_err();
        assert!(
            matches!(
                e,
                SimError::MemoryBudget {
                    op: "guest write",
                    ..
                }
            ),
            "{e}"
        );
        // Within the budget nothing changes.
        let (_, p) = guest(DEFAULT_MEMORY_BUDGET);
        assert_eq!(
            p.pvalidate_range(Gpa(0), 16384, PageSize::Size4K, true),
            Ok((16384, 0))
        );
    }

    /// A guest_memfd frame inside a 2 MiB private RMP entry assigned to `asid` at `gpa`.
    fn map_2m(m: &Machine, asid: u32, gpa: Gpa) -> Pfn {
        let mut hw = m.hw();
        let head = hw.mem.alloc_2m_aligned().unwrap();
        for i in 0..512 {
            let gfn = Gfn(gpa.gfn().0 + i);
            hw.slot_mut(asid).unwrap().gmem.set_private(gfn, Pfn(head.0 + i));
        }
        let st = RmpState {
            gpa,
            assigned: true,
            page_size: PageSize::Size2M,
            asid,
            ..RmpState::default()
        };
        hw.rmp.rmpupdate(head, st).unwrap();
        head
    }

    #[test]
    fn every_host_rmpupdate_path_splits_the_direct_map_before_a_region_holds_a_mix() {
        // Linux `rmpupdate()` calls `adjust_direct_map` before each RMPUPDATE: 4 KiB updates
        // split the region's large mapping, 2 MiB ones (and PSMASH) do not.
        let m = Machine::new(MachineConfig::default());
        let p = m.create_guest(VmKind::Snp).unwrap();
        p.add_private_memslot(Gpa(0), 8 << 20).unwrap();
        let asid = vmsa_core::Platform::asid(&p).0;
        let pfn_of = |gpa: u64| vmsa_core::Platform::gmem_pfn(&p, Gpa(gpa).gfn()).unwrap();
        // guest_memfd's first-use RMPUPDATE of one page (`sev_gmem_prepare`)...
        p.pvalidate(Gpa(0x1000), PageSize::Size4K, true).unwrap();
        assert_eq!(m.host_mapping(pfn_of(0x1000)), PageSize::Size4K);
        // ... and of a run of pages in another 2 MiB region.
        p.pvalidate_range(Gpa(0x20_0000), 64, PageSize::Size4K, true)
            .unwrap();
        assert_eq!(m.host_mapping(pfn_of(0x20_0000)), PageSize::Size4K);
        // A 2 MiB private entry, then PSMASH: the region is all private, nothing to split.
        let gpa = Gpa(0x40_0000);
        let head = map_2m(&m, asid, gpa);
        m.psmash(head).unwrap();
        assert_eq!(m.host_mapping(head), PageSize::Size2M);
        // Making one page of it shared (`sev_gmem_invalidate`'s 4 KiB RMPUPDATE) is the first
        // mix of private and shared there: the region is split first.
        let gfn = Gfn(gpa.gfn().0 + 5);
        p.convert(gfn, Gfn(gfn.0 + 1), true).unwrap();
        assert_eq!(m.host_mapping(head), PageSize::Size4K);
        assert_eq!(m.stats().direct_map_splits, 3);
    }

    #[test]
    fn only_pvalidate_and_rmpadjust_raise_sizem_a_2m_pvalidate_on_a_2m_entry_succeeds() {
        // KVM sev_handle_rmp_fault: "Only RMPADJUST/PVALIDATE should cause PFERR_GUEST_SIZEM".
        let m = Machine::new(MachineConfig::default());
        let p = m.create_guest(VmKind::Snp).unwrap();
        p.add_private_memslot(Gpa(0), 8 << 20).unwrap();
        vmsa_core::Platform::launch_start(
            &p,
            &vmsa_core::LaunchStart::Snp {
                policy: 1 << 17,
                gosvw: [0; 16],
            },
        )
        .unwrap();
        let asid = vmsa_core::Platform::asid(&p).0;
        let gpa = Gpa(0x40_0000);
        let head = map_2m(&m, asid, gpa);
        assert_eq!(p.pvalidate(gpa, PageSize::Size2M, true), Ok(true));
        assert_eq!(m.rmp_entry(head).page_size, PageSize::Size2M, "not smashed");
        // Ordinary C=1 accesses through the 2 MiB entry are not size-checked.
        p.guest_write(Gpa(0x40_3000), &[7; 4096], true).unwrap();
        assert_eq!(*p.guest_read(Gpa(0x40_3000), true).unwrap(), [7; 4096]);
        assert_eq!(m.rmp_entry(head).page_size, PageSize::Size2M, "still not smashed");
        let s = m.stats();
        assert_eq!((s.psmash_on_fault, s.npf), (0, 0));
    }

    #[test]
    fn sev_es_guests_have_encrypted_memory_but_no_rmp() {
        let m = Machine::new(MachineConfig::default());
        let p = m.create_guest(VmKind::SevEs).unwrap();
        p.add_memslot(Gpa(0), 1 << 20).unwrap();
        vmsa_core::Platform::launch_start(&p, &vmsa_core::LaunchStart::SevEs { policy: 0 }).unwrap();
        p.guest_write(Gpa(0x2000), &[5; 4096], true).unwrap();
        assert_eq!(*p.guest_read(Gpa(0x2000), true).unwrap(), [5; 4096]);
        let pfn = vmsa_core::Platform::gmem_pfn(&p, Gfn(2)).unwrap();
        assert!(!m.rmp_entry(pfn).assigned, "no RMP for SEV-ES");
        assert_ne!(*m.host_read(pfn).unwrap(), [5; 4096], "but encrypted");
        assert!(matches!(
            p.pvalidate(Gpa(0x2000), PageSize::Size4K, true),
            Err(SimError::WrongKind { op: "PVALIDATE", .. })
        ));
        p.destroy().unwrap();
        assert_eq!(m.allocated_frames(), 0);
    }

    /// An SEV-ES VMSA the firmware never encrypted (no LAUNCH_UPDATE_VMSA) decrypts at VMRUN
    /// to noise, which breaks VMRUN's must-be-zero checks: VMEXIT_INVALID. The same image
    /// encrypted under the guest's key runs. Before, VMRUN looked at nothing in the page.
    #[test]
    fn vmrun_checks_the_state_the_vmsa_decrypts_to() {
        use vmsa_core::Platform as _;
        let m = Machine::new(MachineConfig::default());
        let p = m.create_guest(VmKind::SevEs).unwrap();
        p.launch_start(&vmsa_core::LaunchStart::SevEs { policy: 0 })
            .unwrap();
        // A VMSA page is never 2 MiB aligned (erratum 1467): vmsa-core takes another one.
        let page = || loop {
            let pfn = vmsa_core::HostPage::pfn(&p.alloc_page().unwrap());
            if !pfn.is_2m_aligned() {
                break pfn;
            }
        };
        let pfn = page();
        let mut state = vmsa_core::SevEsSaveArea::boxed();
        state.efer = vmsa_core::layout::EFER_SVME;
        state.cr0 = 0x10;
        p.write_frame(pfn, state.as_page()).unwrap();
        let r = p.vmrun(pfn.hpa(), Gpa(0));
        assert!(
            matches!(&r, Err(SimError::VmrunInvalid { check, .. }) if check.contains("decrypts to an illegal state")),
            "{r:?}"
        );
        p.launch_update_vmsa(pfn).unwrap();
        p.vmrun(pfn.hpa(), Gpa(0)).unwrap();
        p.vmexit(pfn.hpa());
        // A state that is illegal in itself fails however it was encrypted.
        let pfn2 = page();
        state.cr0 = 1 << 29;
        p.write_frame(pfn2, state.as_page()).unwrap();
        p.launch_update_vmsa(pfn2).unwrap();
        assert!(matches!(
            p.vmrun(pfn2.hpa(), Gpa(0)),
            Err(SimError::VmrunInvalid {
                check: "CR0.NW is set without CR0.CD",
                ..
            })
        ));
    }

    #[test]
    fn page_state_changes_move_frames_between_gmem_and_shared_memory() {
        let m = Machine::new(MachineConfig::default());
        let p = m.create_guest(VmKind::Snp).unwrap();
        p.add_memslot(Gpa(0), 1 << 20).unwrap();
        let gfn = Gfn(3);
        let one = |gfn: Gfn| (gfn, Gfn(gfn.0 + 1));
        // KVM's default attribute is shared: a private access needs the range made private.
        assert!(matches!(
            p.guest_write(Gpa(0x3000), &[1; 4096], true),
            Err(SimError::SharedMemory { .. })
        ));
        assert_eq!(p.convert(Gfn(0), Gfn(256), false).unwrap(), Converted::default());
        // Shared accesses need the shared attribute; private ones the private attribute.
        assert!(matches!(
            p.guest_write(Gpa(0x3000), &[1; 4096], false),
            Err(SimError::PrivateMemory { .. })
        ));
        p.pvalidate(Gpa(0x3000), PageSize::Size4K, true).unwrap();
        let before = m.allocated_frames();
        assert_eq!(
            p.convert(one(gfn).0, one(gfn).1, true).unwrap(),
            Converted {
                released: 1,
                leaked: vec![]
            },
            "the private frame is released"
        );
        assert_eq!(m.allocated_frames(), before - 1);
        p.guest_write(Gpa(0x3000), &[1; 4096], false).unwrap();
        assert_eq!(*p.guest_read(Gpa(0x3000), false).unwrap(), [1; 4096]);
        assert!(matches!(
            p.guest_read(Gpa(0x3000), true),
            Err(SimError::SharedMemory { .. })
        ));
        assert_eq!(
            p.convert(one(gfn).0, one(gfn).1, false).unwrap(),
            Converted::default()
        );
        assert_eq!(m.allocated_frames(), before - 1, "the shared copy was discarded");
        assert!(matches!(
            p.convert(Gfn(0xff), Gfn(0x101), true),
            Err(SimError::NotInSlot {
                gpa: Gpa(0x10_0000),
                ..
            })
        ));
    }
}
