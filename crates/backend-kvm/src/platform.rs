//! vmsa-core's [`Platform`] for a default-type KVM VM (VMSA-image mode).
//!
//! What each effect means here, honestly (there is no SEV hardware behind this platform):
//!
//! - **Pages**: host pages are page-aligned allocations of this process, numbered in the
//!   pseudo-physical space of [`crate::frames`]; guest frames resolve through the
//!   guest_memfd-backed memslots ([`Platform::gmem_pfn`]).
//! - **RMP**: there is no RMP. `rmp_make_private` / `rmp_make_shared` / `page_reclaim`
//!   update a *tracked* entry per frame (assigned, immutable, GPA, VMSA) with the SNP rules
//!   the firmware and the RMP would enforce: a host write to an assigned frame is refused
//!   ([`PlatformError::HostWriteToAssigned`]), `SNP_LAUNCH_UPDATE` needs a pre-guest
//!   (assigned + immutable, same GPA) frame, an immutable frame cannot be made shared before it
//!   is reclaimed. Nothing is encrypted or integrity-protected by this: the tracking keeps
//!   vmsa-core's transitions honest, it does not protect the guest.
//! - **ASID**: none; the platform reports ASID 0 (the host's).
//! - **Firmware**: `launch_start` / `launch_finish` only record the launch phase.
//!   `launch_update_vmsa` and `snp_launch_update` of a VMSA page mean "commit this VMSA image
//!   to the vCPU": the page is checked to be a loadable image and becomes the state the vCPU is
//!   started from when the VMCB (vmsa-core's `Entry::Run`) points at it. No measurement and no
//!   encryption happen. Data pages are recorded the same way.
//! - **Reads** (`read_frame`, `dbg_decrypt_vmsa`) return the bytes as they are: nothing here
//!   is ciphertext.
//! - **Cache flushes**: there are no encryption keys whose cache lines could be stale; the
//!   calls are counted and do nothing.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;
use vmsa_core::{
    Asid, DbgDecryptFailure, Gfn, Gpa, HostPage, Hpa, LaunchFinish, LaunchStart, PAGE_SIZE, PageBuf,
    PageLevel, Pfn, Platform, SevEsSaveArea, SnpPageType,
};

use crate::frames::{FrameError, FrameSpace};

/// A host page handed to vmsa-core.
#[derive(Debug, PartialEq, Eq)]
pub struct KvmPage(Pfn);

impl HostPage for KvmPage {
    fn pfn(&self) -> Pfn {
        self.0
    }
}

/// The tracked RMP entry of a frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TrackedRmp {
    /// Assigned to the guest (private).
    pub assigned: bool,
    /// Firmware-owned until reclaimed or launched.
    pub immutable: bool,
    /// The GPA it is assigned at.
    pub gpa: u64,
    /// Committed as a VMSA.
    pub vmsa: bool,
}

/// Why a platform operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
pub enum PlatformError {
    /// The frame space refused.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A host write to a frame the tracked RMP has assigned to the guest (an RMP #PF on SNP).
    #[error("host write to pfn {pfn}, which is assigned to the guest in the tracked RMP")]
    HostWriteToAssigned {
        /// The frame.
        pfn: Pfn,
    },
    /// An RMP or firmware rule was broken.
    #[error("{op} of pfn {pfn}: {rule}")]
    Rule {
        /// The operation.
        op: &'static str,
        /// The frame.
        pfn: Pfn,
        /// The rule.
        rule: &'static str,
    },
    /// A launch command came in the wrong phase.
    #[error("{op}: {rule}")]
    Launch {
        /// The command.
        op: &'static str,
        /// The rule.
        rule: &'static str,
    },
}

/// Counts of what the platform did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PlatformStats {
    /// Host pages allocated.
    pub pages_allocated: u64,
    /// Host pages freed.
    pub pages_freed: u64,
    /// Host pages and guest frames leaked.
    pub pages_leaked: u64,
    /// Tracked RMP updates to assigned.
    pub rmp_make_private: u64,
    /// Tracked RMP updates to shared.
    pub rmp_make_shared: u64,
    /// VMSA images committed (`launch_update_vmsa` / `snp_launch_update` of a VMSA).
    pub vmsa_commits: u64,
    /// Data pages added to the launch.
    pub data_pages: u64,
    /// Page reclaims.
    pub reclaims: u64,
    /// Page flushes (no-ops).
    pub flushes: u64,
    /// Full cache write-backs (no-ops).
    pub writebacks: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Phase {
    #[default]
    NotStarted,
    Started,
    Finished,
}

#[derive(Default)]
struct State {
    rmp: HashMap<Pfn, TrackedRmp>,
    phase: Phase,
    stats: PlatformStats,
}

/// vmsa-core's platform for a VMSA-image VM.
pub struct KvmPlatform {
    frames: FrameSpace,
    state: Mutex<State>,
}

impl std::fmt::Debug for KvmPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmPlatform")
            .field("frames", &self.frames)
            .field("stats", &self.stats())
            .finish()
    }
}

impl KvmPlatform {
    /// A platform over `frames`.
    pub fn new(frames: FrameSpace) -> Self {
        Self {
            frames,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update completes before anything can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The frame space.
    pub fn frames(&self) -> &FrameSpace {
        &self.frames
    }

    /// What the platform did so far.
    pub fn stats(&self) -> PlatformStats {
        self.lock().stats
    }

    /// The tracked RMP entry of `pfn`.
    pub fn rmp(&self, pfn: Pfn) -> TrackedRmp {
        self.lock().rmp.get(&pfn).copied().unwrap_or_default()
    }

    /// The VMSA image at `hpa`: what the vCPU runs from when its VMCB points there (the
    /// hardware's read, which the tracked RMP does not restrict).
    pub fn vmsa_at(&self, hpa: Hpa) -> Result<Box<SevEsSaveArea>, FrameError> {
        let mut page = Box::new([0u8; 4096]);
        self.frames.read_hpa(hpa, &mut page)?;
        Ok(SevEsSaveArea::from_page(&page))
    }

    fn commit(&self, pfn: Pfn, op: &'static str) -> Result<(), PlatformError> {
        // The image must be readable; that it is loadable is checked when the vCPU starts.
        let mut page = Box::new([0u8; 4096]);
        self.frames.read(pfn, &mut page)?;
        self.launching(op)?.stats.vmsa_commits += 1;
        Ok(())
    }

    /// The locked state, while the launch is started and not finished; otherwise `op` fails.
    fn launching(&self, op: &'static str) -> Result<MutexGuard<'_, State>, PlatformError> {
        let s = self.lock();
        if s.phase != Phase::Started {
            return Err(PlatformError::Launch {
                op,
                rule: "the launch has not started or is finished",
            });
        }
        Ok(s)
    }
}

impl Platform for KvmPlatform {
    type Page = KvmPage;
    type Error = PlatformError;

    fn asid(&self) -> Asid {
        Asid(0)
    }

    fn alloc_page(&self) -> Result<KvmPage, PlatformError> {
        let pfn = self.frames.alloc_host()?;
        let mut s = self.lock();
        s.stats.pages_allocated += 1;
        s.rmp.remove(&pfn);
        Ok(KvmPage(pfn))
    }

    fn free_page(&self, page: KvmPage) {
        if self.frames.free_host(page.0) {
            let mut s = self.lock();
            s.stats.pages_freed += 1;
            s.rmp.remove(&page.0);
        }
    }

    fn leak_page(&self, page: KvmPage) {
        if self.frames.leak_host(page.0) {
            self.lock().stats.pages_leaked += 1;
        }
    }

    fn leak_guest_frame(&self, _pfn: Pfn) {
        // Guest RAM is the VMM's mapping, unmapped whole with the VM; the frame's leak is
        // only counted (its tracked RMP entry stays as the failure left it).
        self.lock().stats.pages_leaked += 1;
    }

    fn write_frame(&self, pfn: Pfn, data: &PageBuf) -> Result<(), PlatformError> {
        if self.rmp(pfn).assigned {
            return Err(PlatformError::HostWriteToAssigned { pfn });
        }
        Ok(self.frames.write(pfn, data)?)
    }

    fn read_frame(&self, pfn: Pfn, buf: &mut PageBuf) -> Result<(), PlatformError> {
        Ok(self.frames.read(pfn, buf)?)
    }

    fn rmp_make_private(
        &self,
        pfn: Pfn,
        gpa: Gpa,
        level: PageLevel,
        _asid: Asid,
        immutable: bool,
    ) -> Result<(), PlatformError> {
        let op = "RMPUPDATE (assigned)";
        if level != PageLevel::Size4K {
            return Err(PlatformError::Rule {
                op,
                pfn,
                rule: "only 4 KiB entries are tracked",
            });
        }
        if self.frames.classify(pfn).is_none() {
            return Err(FrameError::Unbacked { pfn }.into());
        }
        let mut s = self.lock();
        let e = s.rmp.entry(pfn).or_default();
        if e.immutable {
            return Err(PlatformError::Rule {
                op,
                pfn,
                rule: "FAIL_PERMISSION: the entry is immutable",
            });
        }
        *e = TrackedRmp {
            assigned: true,
            immutable,
            gpa: gpa.0,
            vmsa: false,
        };
        s.stats.rmp_make_private += 1;
        Ok(())
    }

    fn rmp_make_shared(&self, pfn: Pfn, _level: PageLevel) -> Result<(), PlatformError> {
        let mut s = self.lock();
        if s.rmp.get(&pfn).is_some_and(|e| e.immutable) {
            return Err(PlatformError::Rule {
                op: "RMPUPDATE (shared)",
                pfn,
                rule: "FAIL_PERMISSION: the entry is immutable (reclaim it first)",
            });
        }
        s.rmp.remove(&pfn);
        s.stats.rmp_make_shared += 1;
        Ok(())
    }

    fn flush_encrypted_page(&self, _pfn: Pfn, _asid: Asid) -> Result<(), PlatformError> {
        self.lock().stats.flushes += 1;
        Ok(())
    }

    fn writeback_caches(&self) {
        self.lock().stats.writebacks += 1;
    }

    fn gmem_pfn(&self, gfn: Gfn) -> Option<Pfn> {
        self.frames.gmem_pfn(gfn)
    }

    fn launch_start(&self, _start: &LaunchStart) -> Result<(), PlatformError> {
        let mut s = self.lock();
        if s.phase != Phase::NotStarted {
            return Err(PlatformError::Launch {
                op: "launch start",
                rule: "the launch was already started",
            });
        }
        s.phase = Phase::Started;
        Ok(())
    }

    /// KVM's `sev_launch_update_data` pins the VMM's memory of any alignment and length:
    /// the range must lie in one guest memory region, which gets `data` if given.
    fn launch_update_data(&self, gpa: Gpa, len: u64, data: Option<&[u8]>) -> Result<(), PlatformError> {
        let op = "LAUNCH_UPDATE_DATA";
        let mut s = self.launching(op)?;
        let ram = self
            .frames
            .ram()
            .iter()
            .find(|r| r.offset_of(gpa.0, len).is_some())
            .ok_or(PlatformError::Launch {
                op,
                rule: "no guest memory region holds the whole range",
            })?;
        if let Some(d) = data {
            ram.write(gpa.0, d).map_err(FrameError::from)?;
        }
        s.stats.data_pages += (gpa.0 + (len - 1)) / PAGE_SIZE - gpa.0 / PAGE_SIZE + 1;
        Ok(())
    }

    fn launch_update_vmsa(&self, pfn: Pfn) -> Result<(), PlatformError> {
        self.commit(pfn, "LAUNCH_UPDATE_VMSA")
    }

    fn snp_launch_update(&self, pfn: Pfn, gpa: Gpa, page_type: SnpPageType) -> Result<(), PlatformError> {
        let op = "SNP_LAUNCH_UPDATE";
        let e = self.rmp(pfn);
        if !(e.assigned && e.immutable && e.gpa == gpa.0) {
            return Err(PlatformError::Rule {
                op,
                pfn,
                rule: "INVALID_PAGE_STATE: the page is not pre-guest at this GPA in the tracked RMP",
            });
        }
        if page_type == SnpPageType::Vmsa {
            self.commit(pfn, op)?;
        } else {
            self.launching(op)?.stats.data_pages += 1;
        }
        let mut s = self.lock();
        if let Some(e) = s.rmp.get_mut(&pfn) {
            e.immutable = false;
            e.vmsa = page_type == SnpPageType::Vmsa;
        }
        Ok(())
    }

    fn launch_finish(&self, _finish: &LaunchFinish) -> Result<(), PlatformError> {
        self.launching("launch finish")?.phase = Phase::Finished;
        Ok(())
    }

    fn page_reclaim(&self, pfn: Pfn) -> Result<(), PlatformError> {
        let mut s = self.lock();
        let Some(e) = s.rmp.get_mut(&pfn).filter(|e| e.assigned) else {
            return Err(PlatformError::Rule {
                op: "SNP_PAGE_RECLAIM",
                pfn,
                rule: "INVALID_PAGE_STATE: the page is hypervisor-owned",
            });
        };
        e.immutable = false;
        s.stats.reclaims += 1;
        Ok(())
    }

    fn dbg_decrypt_vmsa(&self, pa: Hpa, out: &mut PageBuf) -> Result<(), DbgDecryptFailure<PlatformError>> {
        Ok(self.frames.read_hpa(pa, out).map_err(PlatformError::from)?)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vmsa_core::{EventLog, StateKind, VcpuId, Vm, VmConfig, VmsaState};

    use super::*;

    #[test]
    fn vmsa_core_launches_and_tears_down_on_this_platform() {
        let events = Arc::new(EventLog::new());
        let mut vm = Vm::new(
            KvmPlatform::new(FrameSpace::new(Vec::new())),
            VmConfig::snp(0),
            events.clone(),
        );
        vm.create_vcpu(VcpuId(0)).unwrap();
        vm.create_vcpu(VcpuId(1)).unwrap();
        let mut regs = SevEsSaveArea::boxed();
        regs.rip = 0x8000;
        vm.set_registers(VcpuId(0), &regs).unwrap();
        vm.launch_start(vmsa_core::SNP_POLICY_RSVD_MBO).unwrap();
        vm.launch_finish([0; 32]).unwrap();
        let pages = vm.host_pages();
        assert_eq!(pages.len(), 2);
        assert!(pages.iter().all(|(_, k, _)| *k == StateKind::KvmPrivate));
        let p = vm.platform();
        let (_, _, pfn0) = pages[0];
        assert_eq!(
            p.rmp(pfn0),
            TrackedRmp {
                assigned: true,
                immutable: false,
                gpa: vmsa_core::INITIAL_VMSA_GPA.0,
                vmsa: true
            }
        );
        // The committed image is the synced register state with the VM's SEV_FEATURES.
        let img = p.vmsa_at(pfn0.hpa()).unwrap();
        assert_eq!((img.rip, img.sev_features), (0x8000, 1));
        // A host write to the private page is refused, as an RMP #PF would.
        assert_eq!(
            p.write_frame(pfn0, &[0; 4096]),
            Err(PlatformError::HostWriteToAssigned { pfn: pfn0 })
        );
        assert_eq!(p.stats().vmsa_commits, 2);
        let VmsaState::KvmPrivate(_) = vm.vcpu(VcpuId(0)).unwrap().state else {
            panic!("launched VMSA must be private");
        };
        let t = vm.teardown();
        assert_eq!((t.vcpus, t.leaked), (2, 0));
        let p = vm.platform();
        assert_eq!(p.frames().host_pages(), (0, 0));
        assert_eq!(p.stats().pages_freed, 2);
        assert!(events.leaks().is_empty());
    }

    #[test]
    fn firmware_rules_are_enforced() {
        let p = KvmPlatform::new(FrameSpace::new(Vec::new()));
        let page = p.alloc_page().unwrap();
        let pfn = page.pfn();
        assert!(matches!(
            p.snp_launch_update(pfn, Gpa(0x1000), SnpPageType::Normal),
            Err(PlatformError::Rule { .. })
        ));
        p.rmp_make_private(pfn, Gpa(0x1000), PageLevel::Size4K, Asid(0), true)
            .unwrap();
        assert!(matches!(
            p.rmp_make_shared(pfn, PageLevel::Size4K),
            Err(PlatformError::Rule { .. })
        ));
        assert!(matches!(
            p.snp_launch_update(pfn, Gpa(0x1000), SnpPageType::Vmsa),
            Err(PlatformError::Launch { .. })
        ));
        p.page_reclaim(pfn).unwrap();
        p.rmp_make_shared(pfn, PageLevel::Size4K).unwrap();
        p.write_frame(pfn, &[1; 4096]).unwrap();
        p.free_page(page);
        assert_eq!(p.stats().pages_freed, 1);
        assert!(
            p.read_frame(pfn, &mut [0; 4096]).is_err(),
            "freed frames are unbacked"
        );
    }
}
