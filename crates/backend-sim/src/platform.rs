//! [`SimPlatform`]: the machine as one guest sees it, implementing vmsa-core's `Platform`,
//! plus the guest's memory (memslots, hole punches) and the guest-side hardware effects the
//! scripted guest uses.

use std::sync::Arc;

use vmsa_core::{
    Asid, DbgDecryptFailure, Gfn, Gpa, HostPage, Hpa, LaunchFinish, LaunchStart, PAGE_SIZE, PageBuf,
    PageLevel, Pfn, Platform, SnpPageType, VmKind,
};

use crate::fault::FaultOp;
use crate::machine::{DestroyReport, Machine, SimError};
use crate::measure::LaunchDigest;
use crate::rmp::{PageSize, RmpState};

/// A host page handed out by [`SimPlatform::alloc_page`](Platform::alloc_page).
#[derive(Debug, PartialEq, Eq)]
pub struct SimPage {
    pfn: Pfn,
}

impl HostPage for SimPage {
    fn pfn(&self) -> Pfn {
        self.pfn
    }
}

/// One guest on a [`Machine`]: its ASID, kind and memory. Create it with
/// [`Machine::create_guest`].
#[derive(Debug, Clone)]
pub struct SimPlatform {
    machine: Arc<Machine>,
    asid: u32,
    kind: VmKind,
}

impl SimPlatform {
    pub(crate) fn new(machine: Arc<Machine>, asid: u32, kind: VmKind) -> Self {
        Self { machine, asid, kind }
    }

    /// The machine.
    pub fn machine(&self) -> &Arc<Machine> {
        &self.machine
    }

    /// SEV-ES or SEV-SNP.
    pub fn kind(&self) -> VmKind {
        self.kind
    }

    /// Give the guest `len` bytes of guest_memfd-backed memory at `gpa` (a memslot; frames are
    /// allocated on first use, so 16 GiB costs nothing until touched). An SNP guest's memory
    /// starts shared, as KVM's memory attributes do, until [`SimPlatform::convert`] makes it
    /// private; an SEV-ES guest has no memory attributes (its C-bit alone decides). A slot
    /// that overlaps one the guest has is refused ([`SimError::SlotOverlap`], KVM's `EEXIST`).
    pub fn add_memslot(&self, gpa: Gpa, len: u64) -> Result<(), SimError> {
        let mut hw = self.machine.hw();
        let slot = hw.slot_mut(self.asid)?;
        let private = slot.kind == VmKind::SevEs;
        // virt/kvm/kvm_main.c __kvm_set_memory_region: a new slot that overlaps another
        // (kvm_check_memslot_overlap) is refused with -EEXIST.
        slot.gmem
            .add_slot(gpa.gfn(), len.div_ceil(PAGE_SIZE), private)
            .map_err(|(other_start, other_end)| SimError::SlotOverlap {
                asid: self.asid,
                gpa,
                len,
                other_start,
                other_end,
                errno: vmsa_host::Errno::EEXIST,
            })
    }

    /// Give the guest `len` bytes of private memory at `gpa`: a memslot made private at once
    /// (what a VMM does for a confidential guest's RAM before the launch).
    pub fn add_private_memslot(&self, gpa: Gpa, len: u64) -> Result<(), SimError> {
        self.add_memslot(gpa, len)?;
        let start = gpa.gfn();
        self.convert(start, Gfn(start.0 + len.div_ceil(PAGE_SIZE)), false)
            .map(drop)
    }

    /// Whether every frame of `[gpa, gpa + len)` has the private attribute.
    pub fn is_private(&self, gpa: Gpa, len: u64) -> Result<bool, SimError> {
        let hw = self.machine.hw();
        let start = gpa.gfn();
        Ok(hw
            .slot(self.asid)?
            .gmem
            .is_private_range(start, Gfn(start.0 + len.div_ceil(PAGE_SIZE))))
    }

    /// Punch a hole in guest_memfd over `[gpa, gpa + len)` (or replace its backing): every
    /// private frame there is made shared, flushed and freed (`sev_gmem_invalidate`). Returns
    /// the guest frames range; the VMM must then call `Vm::gmem_invalidate(start, end)`.
    pub fn punch_hole(&self, gpa: Gpa, len: u64) -> Result<(Gfn, Gfn), SimError> {
        let start = gpa.gfn();
        let end = Gfn(start.0 + len.div_ceil(PAGE_SIZE));
        let mut hw = self.machine.hw();
        for e in hw.slot_mut(self.asid)?.gmem.punch(start, end) {
            hw.release_gmem_extent(self.asid, e);
        }
        Ok((start, end))
    }

    /// The frame guest_memfd already has behind private `gfn`, looked up without side effects:
    /// unlike [`Platform::gmem_pfn`] it is not a call of the fault plan, charges nothing and
    /// allocates nothing (`None` for a frame not backed yet). For the host kernel's prechecks
    /// (`kvm_gmem_populate`'s `-EEXIST` test), which run before vmsa-core's own calls.
    pub fn gmem_backing(&self, gfn: Gfn) -> Option<Pfn> {
        self.machine.hw().gmem_backing(self.asid, gfn)
    }

    /// The launch digest, once the launch finished.
    pub fn launch_digest(&self) -> Option<LaunchDigest> {
        self.machine.launch_digest(self.asid)
    }

    /// Destroy the guest on the machine (see [`Machine::destroy_guest`]). Call after
    /// `Vm::teardown`.
    pub fn destroy(&self) -> Result<DestroyReport, SimError> {
        self.machine.destroy_guest(self.asid)
    }

    /// Guest write of one page at `gpa` (C=1: encrypted with the guest's key; C=0: shared).
    pub fn guest_write(&self, gpa: Gpa, data: &PageBuf, private: bool) -> Result<(), SimError> {
        self.machine.hw().guest_write(self.asid, gpa, data, private)
    }

    /// Guest read of one page at `gpa`.
    pub fn guest_read(&self, gpa: Gpa, private: bool) -> Result<Box<PageBuf>, SimError> {
        self.machine.hw().guest_read(self.asid, gpa, private)
    }

    /// Guest `PVALIDATE` (VMPL0); `Ok(false)` when the bit did not change.
    pub fn pvalidate(&self, gpa: Gpa, size: PageSize, validate: bool) -> Result<bool, SimError> {
        self.machine.hw().pvalidate(self.asid, gpa, size, validate)
    }

    /// Guest `PVALIDATE` (VMPL0) of `pages` pages of `size` from `gpa`, in order, stopping at
    /// the first failure, as that many [`SimPlatform::pvalidate`] calls would; returns how
    /// many pages changed and how many did not ("no update").
    pub fn pvalidate_range(
        &self,
        gpa: Gpa,
        pages: u64,
        size: PageSize,
        validate: bool,
    ) -> Result<(u64, u64), SimError> {
        self.machine
            .hw()
            .pvalidate_range(self.asid, gpa, pages, size, validate)
    }

    /// Guest `RMPADJUST` (VMPL0, 4 KiB) of the page at `gpa`.
    pub fn rmpadjust(&self, gpa: Gpa, target_vmpl: u8, perms: u8, vmsa: bool) -> Result<(), SimError> {
        self.machine
            .hw()
            .rmpadjust(self.asid, gpa, target_vmpl, perms, vmsa)
    }

    /// Convert guest frames `[start, end)` to shared or private (`KVM_SET_MEMORY_ATTRIBUTES`
    /// plus the guest_memfd hole punch of a conversion to shared); says which private frames
    /// were released and which leaked. Call `Vm::gmem_invalidate` for the range first, and take
    /// any vCPU running on a guest VMSA there out of the guest, as KVM does before it frees.
    /// A range with `start > end` is refused ([`SimError::ReversedRange`]).
    pub fn convert(
        &self,
        start: Gfn,
        end: Gfn,
        to_shared: bool,
    ) -> Result<crate::guest_hw::Converted, SimError> {
        self.machine.hw().convert(self.asid, start, end, to_shared)
    }

    /// VMRUN with the VMSA at `hpa`. `vcpu_gpa` (the vCPU's guest VMSA GPA) is not used:
    /// hardware is given only the VMSA's physical address, so there is no GPA to check.
    pub fn vmrun(&self, hpa: Hpa, vcpu_gpa: Gpa) -> Result<(), SimError> {
        let _ = vcpu_gpa;
        self.machine.hw().vmrun(self.asid, hpa)
    }

    /// #VMEXIT of a vCPU running on the VMSA at `hpa`.
    pub fn vmexit(&self, hpa: Hpa) {
        self.machine.hw().vmexit(hpa)
    }

    /// Charge a cost to the guest's track of the timeline.
    pub fn charge(&self, op: crate::cost::CostOp, detail: &str) {
        self.machine.hw().charge(op, self.asid, || detail.to_string())
    }

    fn page(&self, pfn: Pfn) -> SimPage {
        SimPage { pfn }
    }

    fn need(&self, op: &'static str, needed: VmKind) -> Result<(), SimError> {
        if self.kind != needed {
            return Err(SimError::WrongKind {
                op,
                needed,
                kind: self.kind,
                asid: self.asid,
            });
        }
        Ok(())
    }
}

impl Platform for SimPlatform {
    type Page = SimPage;
    type Error = SimError;

    fn asid(&self) -> Asid {
        Asid(self.asid)
    }

    fn alloc_page(&self) -> Result<SimPage, SimError> {
        self.machine.hw().alloc_page().map(|p| self.page(p))
    }

    fn free_page(&self, page: SimPage) {
        self.machine.hw().free_page(page.pfn)
    }

    fn leak_page(&self, page: SimPage) {
        self.machine.hw().leak_page(page.pfn)
    }

    fn leak_guest_frame(&self, pfn: Pfn) {
        self.machine.hw().leak_page(pfn)
    }

    fn write_frame(&self, pfn: Pfn, data: &PageBuf) -> Result<(), SimError> {
        self.machine.hw().host_write(pfn, data)
    }

    fn read_frame(&self, pfn: Pfn, buf: &mut PageBuf) -> Result<(), SimError> {
        self.machine.hw().host_read(pfn, buf)
    }

    fn rmp_make_private(
        &self,
        pfn: Pfn,
        gpa: Gpa,
        level: PageLevel,
        asid: Asid,
        immutable: bool,
    ) -> Result<(), SimError> {
        let st = RmpState {
            gpa,
            assigned: true,
            page_size: level,
            immutable,
            asid: asid.0,
        };
        self.machine.hw().rmpupdate(FaultOp::RmpMakePrivate, pfn, st)
    }

    fn rmp_make_shared(&self, pfn: Pfn, level: PageLevel) -> Result<(), SimError> {
        let st = RmpState {
            page_size: level,
            ..RmpState::default()
        };
        self.machine.hw().rmpupdate(FaultOp::RmpMakeShared, pfn, st)
    }

    fn flush_encrypted_page(&self, pfn: Pfn, asid: Asid) -> Result<(), SimError> {
        self.machine.hw().flush_page(pfn, asid.0)
    }

    fn writeback_caches(&self) {
        self.machine.hw().writeback_caches()
    }

    fn gmem_pfn(&self, gfn: Gfn) -> Option<Pfn> {
        self.machine.hw().gmem_pfn(self.asid, gfn)
    }

    fn launch_start(&self, start: &LaunchStart) -> Result<(), SimError> {
        let mut hw = self.machine.hw();
        match *start {
            LaunchStart::Snp { policy, gosvw } => {
                self.need("SNP_LAUNCH_START", VmKind::Snp)?;
                hw.snp_launch_start(self.asid, policy, gosvw)
            }
            LaunchStart::SevEs { policy } => {
                self.need("LAUNCH_START", VmKind::SevEs)?;
                hw.sev_launch_start(self.asid, policy)
            }
        }
    }

    /// KVM's `sev_launch_update_data`: the range, of any alignment and length, is written
    /// (if `data` is given) and measured piece by piece, one command per page it touches. The
    /// simulator keeps an SEV-ES guest's memory in the same per-guest map as SNP guest
    /// memory; KVM would pin the VMM's memory instead.
    ///
    /// `data`, when given, must hold at least `len` bytes (KVM copies `len` bytes from the
    /// VMM's buffer, `sev_launch_update_data` in Linux arch/x86/kvm/svm/sev.c); a shorter one is
    /// refused ([`SimError::DataTooShort`]) before anything is written or measured.
    fn launch_update_data(&self, gpa: Gpa, len: u64, data: Option<&[u8]>) -> Result<(), SimError> {
        self.need("LAUNCH_UPDATE_DATA", VmKind::SevEs)?;
        if let Some(data) = data
            && (data.len() as u64) < len
        {
            return Err(SimError::DataTooShort {
                op: "LAUNCH_UPDATE_DATA",
                asid: self.asid,
                gpa,
                len,
                data_len: data.len() as u64,
            });
        }
        let mut hw = self.machine.hw();
        let mut done = 0;
        while done < len {
            let at = Gpa(gpa.0 + done);
            let off = at.0 % PAGE_SIZE;
            let n = (PAGE_SIZE - off).min(len - done);
            // A failure to back the frame (host memory exhausted) is reported as itself, not
            // as a GPA outside every memslot.
            let pfn = hw.gmem_frame(self.asid, at.gfn())?.ok_or(SimError::NotInSlot {
                gpa: at,
                asid: self.asid,
            })?;
            let (o, n_, d) = (off as usize, n as usize, done as usize);
            if let Some(data) = data {
                let mut page = [0u8; PAGE_SIZE as usize];
                hw.host_read(pfn, &mut page)?;
                page[o..o + n_].copy_from_slice(&data[d..d + n_]);
                hw.host_write(pfn, &page)?;
            }
            hw.sev_launch_update_range(self.asid, pfn, o, n_, false)?;
            done += n;
        }
        Ok(())
    }

    fn launch_update_vmsa(&self, pfn: Pfn) -> Result<(), SimError> {
        self.need("LAUNCH_UPDATE_VMSA", VmKind::SevEs)?;
        self.machine.hw().sev_launch_update(self.asid, pfn, true)
    }

    fn snp_launch_update(&self, pfn: Pfn, gpa: Gpa, page_type: SnpPageType) -> Result<(), SimError> {
        self.need("SNP_LAUNCH_UPDATE", VmKind::Snp)?;
        self.machine
            .hw()
            .snp_launch_update(self.asid, pfn, gpa, page_type)
    }

    fn launch_finish(&self, finish: &LaunchFinish) -> Result<(), SimError> {
        let data = match *finish {
            LaunchFinish::Snp { host_data } => {
                self.need("SNP_LAUNCH_FINISH", VmKind::Snp)?;
                Some(host_data)
            }
            LaunchFinish::SevEs => {
                self.need("LAUNCH_FINISH", VmKind::SevEs)?;
                None
            }
        };
        self.machine.hw().launch_finish(self.asid, data)
    }

    fn page_reclaim(&self, pfn: Pfn) -> Result<(), SimError> {
        self.machine.hw().page_reclaim(pfn)
    }

    fn dbg_decrypt_vmsa(&self, pa: Hpa, out: &mut PageBuf) -> Result<(), DbgDecryptFailure<SimError>> {
        self.machine.hw().dbg_decrypt(self.asid, self.kind, pa, out)
    }
}
