//! One vCPU's VMSA record and the transitions of its ownership state.
//!
//! The functions here are the Rust form of the helpers in Joerg Roedel's "kvm: svm: Streamline
//! VMSA setting for VCPUs" with Tom Lendacky's review applied (`sev_es_alloc_kvm_vmsa`,
//! `sev_es_make_kvm_vmsa_private`, `sev_es_free_kvm_vmsa`, `sev_snp_reclaim_kvm_vmsa`,
//! `sev_es_set_guest_vmsa`, `sev_es_vmsa_pa`), plus the fixes the review missed: every path
//! that frees or leaks the page clears the VMCB's VMSA address in the same step, and a write to
//! the page is only reachable in [`VmsaState::KvmShared`].

use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::addr::{Gpa, Hpa, INITIAL_VMSA_GPA, PageLevel, Pfn};
use crate::error::{Error, PlatformOp};
use crate::event::{Event, EventSink, LeakReason};
use crate::layout::{DR7_FIXED_1, SevEsSaveArea};
use crate::platform::{HostPage, Platform};
use crate::state::{MpState, Op, VcpuId, VmKind, VmsaState};

/// How many allocations [`Cx::alloc`] tries before giving up on finding a page that is not
/// 2 MiB aligned. Two suffice with any sane allocator (the kernel allocates an order-1 pair).
const ALLOC_TRIES: usize = 4;

/// A vCPU's VMSA bookkeeping (the kernel's `vcpu_sev_es_state` VMSA members plus the VMCB's
/// `vmsa_pa` and the vCPU's mp_state).
#[derive(Debug)]
pub(crate) struct Vcpu<Pg> {
    pub id: VcpuId,
    pub state: VmsaState<Pg>,
    /// The plaintext register state KVM would sync into the VMSA (`vcpu->arch` + VMCB save).
    pub regs: Box<SevEsSaveArea>,
    pub guest_debug: bool,
    /// `vcpu->arch.guest_state_protected`.
    pub protected: bool,
    /// `vmcb->control.vmsa_pa`; `None` is `INVALID_PAGE`.
    pub vmcb_vmsa_pa: Option<Hpa>,
    /// The VMSA the guest asked for through AP creation (`snp_pending_vmsa_gpa`).
    pub pending_gpa: Option<Gpa>,
    /// `snp_ap_waiting_for_reset`.
    pub waiting_for_reset: bool,
    /// `KVM_REQ_UPDATE_PROTECTED_GUEST_STATE` is pending.
    pub update_requested: bool,
    /// `KVM_REQ_VMSA_PAGE_RELOAD` is pending.
    pub reload_requested: bool,
    pub mp_state: MpState,
}

impl<Pg: HostPage> Vcpu<Pg> {
    pub fn new(id: VcpuId, mp_state: MpState) -> Self {
        Self {
            id,
            state: VmsaState::None,
            regs: SevEsSaveArea::boxed(),
            guest_debug: false,
            protected: false,
            vmcb_vmsa_pa: None,
            pending_gpa: None,
            waiting_for_reset: false,
            update_requested: false,
            reload_requested: false,
            mp_state,
        }
    }
}

/// A page that was leaked, as the VM must remember it (the kernel marks the VM bugged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Leak {
    pub vcpu: Option<VcpuId>,
    pub pfn: Pfn,
}

/// Everything a transition needs besides the vCPU: the platform, the VM's kind, the sink.
pub(crate) struct Cx<'a, P: Platform> {
    pub p: &'a P,
    pub kind: VmKind,
    pub events: &'a dyn EventSink,
}

type Res<T, P> = Result<T, Error<<P as Platform>::Error>>;

impl<P: Platform> Cx<'_, P> {
    fn set_state(&self, v: &mut Vcpu<P::Page>, op: Op, new: VmsaState<P::Page>) {
        let from = v.state.snapshot();
        v.state = new;
        self.transition(v, op, from);
    }

    /// Report that `v` went from `from` to its current state.
    fn transition(&self, v: &Vcpu<P::Page>, op: Op, from: VmsaState<Pfn>) {
        self.events.emit(Event::Transition {
            vcpu: v.id,
            op,
            from,
            to: v.state.snapshot(),
        });
    }

    /// Point the VMCB at `pa` (or at nothing).
    pub fn set_vmcb_pa(&self, v: &mut Vcpu<P::Page>, pa: Option<Hpa>) {
        if v.vmcb_vmsa_pa != pa {
            v.vmcb_vmsa_pa = pa;
            self.events.emit(Event::VmcbVmsaPa { vcpu: v.id, pa });
        }
    }

    /// Report a transition called from the wrong state: a `Warn` event and a typed error.
    pub fn invalid(&self, v: &Vcpu<P::Page>, op: Op) -> Error<P::Error> {
        let state = v.state.kind();
        self.events.emit(Event::Warn {
            vcpu: Some(v.id),
            op,
            state,
            message: format!("{op} called on a VMSA in state {state}"),
        });
        Error::InvalidState {
            vcpu: v.id,
            op,
            state,
        }
    }

    fn leak(&self, v: &Vcpu<P::Page>, page: P::Page, reason: LeakReason, detail: String) -> Leak {
        let pfn = page.pfn();
        self.p.leak_page(page);
        self.events.emit(Event::Leaked {
            vcpu: Some(v.id),
            pfn,
            reason,
            detail,
        });
        Leak {
            vcpu: Some(v.id),
            pfn,
        }
    }

    /// `sev_es_alloc_kvm_vmsa`: `None` → `KvmShared(page)`, never on a 2 MiB-aligned frame
    /// (AMD erratum 1467; the kernel's `snp_safe_alloc_page`).
    pub fn alloc(&self, v: &mut Vcpu<P::Page>) -> Res<(), P> {
        if !matches!(v.state, VmsaState::None) {
            return Err(self.invalid(v, Op::Alloc));
        }
        let mut refused = Vec::new();
        let result = loop {
            if refused.len() == ALLOC_TRIES {
                break Err(Error::NoUnalignedPage {
                    vcpu: v.id,
                    tries: ALLOC_TRIES,
                });
            }
            match self.p.alloc_page() {
                Ok(page) if page.pfn().is_2m_aligned() => {
                    self.events.emit(Event::Erratum1467Avoided {
                        vcpu: v.id,
                        refused: page.pfn(),
                    });
                    refused.push(page);
                }
                Ok(page) => break Ok(page),
                Err(source) => {
                    break Err(Error::Platform {
                        vcpu: Some(v.id),
                        op: PlatformOp::AllocPage,
                        source,
                    });
                }
            }
        };
        for page in refused {
            self.p.free_page(page);
        }
        self.set_state(v, Op::Alloc, VmsaState::KvmShared(result?));
        Ok(())
    }

    /// `sev_es_sync_vmsa`: write the register state into the host VMSA. Only a
    /// [`VmsaState::KvmShared`] page can be written, so a retried launch after a failure gets a
    /// typed error instead of a write through a freed page.
    pub fn sync(&self, v: &mut Vcpu<P::Page>, sev_features: u64, with_fpu: bool) -> Res<(), P> {
        if v.protected {
            return Err(Error::AlreadyProtected {
                vcpu: v.id,
                op: Op::Sync,
            });
        }
        if v.guest_debug {
            return Err(Error::GuestDebug { vcpu: v.id });
        }
        if v.regs.dr7 & !DR7_FIXED_1 != 0 {
            return Err(Error::Dr7 {
                vcpu: v.id,
                dr7: v.regs.dr7,
            });
        }
        let VmsaState::KvmShared(page) = &v.state else {
            return Err(self.invalid(v, Op::Sync));
        };
        // The one copy of the image, patched in place (`synced` would copy it twice).
        let mut image = *v.regs.as_page();
        SevEsSaveArea::sync_page(&mut image, sev_features, with_fpu);
        self.p
            .write_frame(page.pfn(), &image)
            .map_err(|source| Error::Platform {
                vcpu: Some(v.id),
                op: PlatformOp::WriteFrame,
                source,
            })
    }

    /// `sev_es_make_kvm_vmsa_private`: `KvmShared` → `KvmPrivate`, returning the page's frame.
    /// On SNP the page first becomes a firmware-owned VMSA page at `INITIAL_VMSA_GPA`
    /// (`RMPUPDATE`, APM vol. 2 §15.36.5); on failure the state is unchanged.
    pub fn make_private(&self, v: &mut Vcpu<P::Page>) -> Res<Pfn, P> {
        let pfn = match &v.state {
            VmsaState::KvmShared(page) => page.pfn(),
            _ => return Err(self.invalid(v, Op::MakePrivate)),
        };
        if self.kind == VmKind::Snp {
            self.p
                .rmp_make_private(pfn, INITIAL_VMSA_GPA, PageLevel::Size4K, self.p.asid(), true)
                .map_err(|source| Error::Platform {
                    vcpu: Some(v.id),
                    op: PlatformOp::RmpMakePrivate,
                    source,
                })?;
        }
        let from = v.state.snapshot();
        v.state = match core::mem::take(&mut v.state) {
            VmsaState::KvmShared(page) => VmsaState::KvmPrivate(page),
            other => other,
        };
        self.transition(v, Op::MakePrivate, from);
        Ok(pfn)
    }

    /// The firmware refused an SEV-ES `LAUNCH_UPDATE_VMSA`: `KvmPrivate` → `KvmShared`, a
    /// state change only (SEV-ES has no RMP). As in `__sev_launch_update_vmsa`, the page stays
    /// the vCPU's VMSA and a retried launch syncs it again.
    pub fn refused(&self, v: &mut Vcpu<P::Page>) {
        if self.kind != VmKind::SevEs {
            return;
        }
        let from = v.state.snapshot();
        v.state = match core::mem::take(&mut v.state) {
            VmsaState::KvmPrivate(page) => VmsaState::KvmShared(page),
            other => other,
        };
        self.transition(v, Op::LaunchUpdate, from);
    }

    /// `sev_es_free_kvm_vmsa`: release the host VMSA, whatever the state, ending in `None` with
    /// the VMCB cleared. A private page is made shared (SNP), flushed if the guest state was
    /// protected, then freed; if making it shared fails it is leaked on purpose and reported.
    pub fn free(&self, v: &mut Vcpu<P::Page>, op: Op) -> Option<Leak> {
        let from = v.state.snapshot();
        let mut leak = None;
        match core::mem::take(&mut v.state) {
            VmsaState::None => return None,
            // A guest-owned page belongs to guest_memfd; only forget it.
            VmsaState::GuestOwned(_) => {}
            VmsaState::KvmShared(page) => self.p.free_page(page),
            VmsaState::KvmPrivate(page) => {
                let pfn = page.pfn();
                let shared = match self.kind {
                    VmKind::Snp => self.p.rmp_make_shared(pfn, PageLevel::Size4K),
                    VmKind::SevEs => Ok(()),
                };
                match shared {
                    Err(e) => leak = Some(self.leak(v, page, LeakReason::MakeSharedFailed, e.to_string())),
                    Ok(()) => {
                        if v.protected {
                            self.flush(v, pfn);
                        }
                        self.p.free_page(page);
                    }
                }
            }
        }
        self.released(v, op, from);
        leak
    }

    /// Finish a release: the VMCB forgets the page in the same step, and the transition is
    /// reported.
    fn released(&self, v: &mut Vcpu<P::Page>, op: Op, from: VmsaState<Pfn>) {
        self.set_vmcb_pa(v, None);
        self.transition(v, op, from);
    }

    /// `sev_flush_encrypted_page`, falling back to a full cache write-back when the page flush
    /// faults (the kernel's `WARN_ON_ONCE` + `sev_writeback_caches`).
    fn flush(&self, v: &Vcpu<P::Page>, pfn: Pfn) {
        if let Err(e) = self.p.flush_encrypted_page(pfn, self.p.asid()) {
            self.events.emit(Event::Warn {
                vcpu: Some(v.id),
                op: Op::Free,
                state: v.state.kind(),
                message: format!("VM_PAGE_FLUSH of pfn {pfn} failed ({e}); writing back all caches"),
            });
            self.p.writeback_caches();
        }
    }

    /// `sev_snp_reclaim_kvm_vmsa`: after a failed `SNP_LAUNCH_UPDATE` of the VMSA, give the
    /// immutable page back to the hypervisor (`SNP_PAGE_RECLAIM`, then `RMPUPDATE` shared) and
    /// free it; if either step fails the page is leaked and reported. Ends in `None`.
    pub fn reclaim(&self, v: &mut Vcpu<P::Page>) -> Res<Option<Leak>, P> {
        let from = v.state.snapshot();
        let page = match core::mem::take(&mut v.state) {
            VmsaState::KvmPrivate(page) if self.kind == VmKind::Snp => page,
            other => {
                v.state = other;
                return Err(self.invalid(v, Op::Reclaim));
            }
        };
        let leak = match snp_page_reclaim(self.p, page.pfn()) {
            Err((reason, detail)) => Some(self.leak(v, page, reason, detail)),
            Ok(()) => {
                self.p.free_page(page);
                None
            }
        };
        self.released(v, Op::Reclaim, from);
        Ok(leak)
    }

    /// `sev_es_set_guest_vmsa`: release any host VMSA, then own `gpa`.
    pub fn set_guest_vmsa(&self, v: &mut Vcpu<P::Page>, gpa: Gpa) -> Option<Leak> {
        let leak = self.free(v, Op::SetGuestVmsa);
        self.set_state(v, Op::SetGuestVmsa, VmsaState::GuestOwned(gpa));
        leak
    }

    /// The VMM supplied this vCPU's VMSA in guest memory at launch (the series' 4/4): `None` →
    /// `GuestOwned(gpa)`, the VMCB pointed at the guest_memfd frame, the register state
    /// protected (it lives in the encrypted page now, not in anything KVM could sync).
    pub fn supply(&self, v: &mut Vcpu<P::Page>, gpa: Gpa) -> Res<(), P> {
        if !matches!(v.state, VmsaState::None) {
            return Err(self.invalid(v, Op::Supply));
        }
        self.set_state(v, Op::Supply, VmsaState::GuestOwned(gpa));
        let pa = self.resolve_pa(v);
        self.set_vmcb_pa(v, pa);
        v.protected = true;
        Ok(())
    }

    /// `sev_es_vmsa_pa`: the address the VMCB must point at for the current state; `None` is
    /// `INVALID_PAGE` (no VMSA, or a guest VMSA no guest_memfd page backs).
    pub fn resolve_pa(&self, v: &Vcpu<P::Page>) -> Option<Hpa> {
        match &v.state {
            VmsaState::None => None,
            VmsaState::KvmShared(p) | VmsaState::KvmPrivate(p) => Some(p.pfn().hpa()),
            VmsaState::GuestOwned(gpa) => self.p.gmem_pfn(gpa.gfn()).map(Pfn::hpa),
        }
    }

    /// `sev_snp_init_protected_guest_state`: on INIT of an SNP vCPU that has an AP-creation
    /// request waiting, switch to the requested guest VMSA (or, after AP_DESTROY, to none).
    /// As `__sev_snp_update_protected_guest_state`, the vCPU is halted first and made runnable
    /// only once a guest_memfd page backs the requested GPA: a request for an unbacked GPA
    /// leaves it halted with no VMSA address (`INVALID_PAGE`), never running.
    pub fn init_protected_guest_state(&self, v: &mut Vcpu<P::Page>) -> Option<Leak> {
        if !v.waiting_for_reset {
            return None;
        }
        v.waiting_for_reset = false;
        v.mp_state = MpState::Halted;
        self.set_vmcb_pa(v, None);
        // Consume the request (upstream resets it; the posted patch forgot to).
        match v.pending_gpa.take() {
            None => self.free(v, Op::Destroy),
            Some(gpa) => {
                let leak = self.set_guest_vmsa(v, gpa);
                let pa = self.resolve_pa(v);
                self.set_vmcb_pa(v, pa);
                if pa.is_some() {
                    v.mp_state = MpState::Runnable;
                }
                leak
            }
        }
    }

    /// `sev_snp_reload_vmsa`: re-resolve an installed guest VMSA after its guest_memfd backing
    /// changed. As `__sev_snp_reload_vmsa`, the guest VMSA GPA is dropped (INVALID_PAGE) and
    /// only restored once `kvm_gmem_get_pfn` finds a page: if none backs it, the vCPU is left
    /// with no VMSA, so a later invalidation of that range does not revive it.
    pub fn reload(&self, v: &mut Vcpu<P::Page>) {
        v.reload_requested = false;
        if let VmsaState::GuestOwned(gpa) = v.state {
            let pa = self.resolve_pa(v);
            self.set_vmcb_pa(v, pa);
            if pa.is_none() {
                v.state = VmsaState::None;
            }
            self.transition(v, Op::Reload, VmsaState::GuestOwned(gpa));
        }
    }
}

/// The kernel's `snp_page_reclaim`: give a page the firmware holds back to the hypervisor
/// (`SNP_PAGE_RECLAIM`, then `RMPUPDATE` shared). On failure, why the page must now be leaked
/// and the platform's message; the caller leaks it and reports it.
pub(crate) fn snp_page_reclaim<P: Platform>(p: &P, pfn: Pfn) -> Result<(), (LeakReason, String)> {
    p.page_reclaim(pfn)
        .map_err(|e| (LeakReason::ReclaimFailed, e.to_string()))?;
    p.rmp_make_shared(pfn, PageLevel::Size4K)
        .map_err(|e| (LeakReason::ReclaimMakeSharedFailed, e.to_string()))
}
