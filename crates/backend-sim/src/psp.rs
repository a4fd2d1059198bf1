//! The firmware commands as the platform issues them: fault plan, cost, the command, and the
//! cleanup the kernel does when one fails (`snp_decommission_context`, reclaim of temporary
//! firmware pages).

use vmsa_core::{DbgDecryptFailure, Gpa, Hpa, PAGE_SIZE, PageBuf, Pfn, SevStatus, SnpPageType, VmKind};

use crate::cost::CostOp;
use crate::error::SimError;
use crate::fault::FaultOp;
use crate::firmware::Handle;
use crate::machine::Hw;

impl Hw {
    /// Firmware command helpers used by the platform.
    pub fn snp_launch_start(&mut self, asid: u32, policy: u64, gosvw: [u8; 16]) -> Result<(), SimError> {
        self.fw_inject(FaultOp::LaunchStart, None, "SNP_LAUNCH_START")?;
        let gctx = self.make_firmware_page()?;
        self.charge(CostOp::SnpGctxCreate, asid, || format!("gctx {gctx}"));
        let r = self.fw.snp_gctx_create(&mut self.rmp, gctx).map(|_| ());
        if let Err(e) = self.fw_result("SNP_GCTX_CREATE", r) {
            self.free_context_page(asid, gctx);
            return Err(e);
        }
        let done = (|| {
            self.charge(CostOp::SnpLaunchStart, asid, || format!("policy {policy:#x}"));
            let r = self.fw.snp_launch_start(&self.rmp, gctx, policy, gosvw);
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
            self.free_context_page(asid, gctx);
            return Err(e);
        }
        let slot = self.slot_mut(asid)?;
        slot.handle = Some(Handle(gctx.0));
        slot.gctx = Some(gctx);
        Ok(())
    }

    /// Free the context page of a launch start that failed; a page the reclaim refuses is
    /// leaked (`snp_free_firmware_page`) and counted as the guest's.
    fn free_context_page(&mut self, asid: u32, gctx: Pfn) {
        if self.free_firmware_page(gctx).is_err()
            && let Ok(slot) = self.slot_mut(asid)
        {
            slot.leaked_firmware_pages += 1;
        }
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
            let r = self.fw.sev_activate(h, asid);
            self.fw_result("ACTIVATE", r)
        })();
        if let Err(e) = done {
            let _ = self.fw.sev_decommission(h);
            return Err(e);
        }
        self.slot_mut(asid)?.handle = Some(h);
        Ok(())
    }

    pub(crate) fn handle(&self, asid: u32, cmd: &'static str) -> Result<Handle, SimError> {
        self.slot(asid)?.handle.ok_or(SimError::Firmware {
            cmd,
            status: SevStatus::InvalidGuest,
            injected: false,
        })
    }

    pub fn sev_launch_update(&mut self, asid: u32, pfn: Pfn, vmsa: bool) -> Result<(), SimError> {
        self.sev_launch_update_range(asid, pfn, 0, PAGE_SIZE as usize, vmsa)
    }

    /// `LAUNCH_UPDATE_DATA` / `LAUNCH_UPDATE_VMSA` of `len` bytes at offset `off` of `pfn`.
    pub fn sev_launch_update_range(
        &mut self,
        asid: u32,
        pfn: Pfn,
        off: usize,
        len: usize,
        vmsa: bool,
    ) -> Result<(), SimError> {
        let (op, cmd) = if vmsa {
            (FaultOp::LaunchUpdateVmsa, "LAUNCH_UPDATE_VMSA")
        } else {
            (FaultOp::LaunchUpdateData, "LAUNCH_UPDATE_DATA")
        };
        self.check_budget(cmd)?;
        self.fw_inject(op, None, cmd)?;
        let h = self.handle(asid, cmd)?;
        self.charge(CostOp::SevLaunchUpdate, asid, || format!("{cmd} pfn {pfn}"));
        let r = self.fw.sev_launch_update_range(&mut self.mem, h, pfn, off, len);
        self.fw_result(cmd, r)?;
        self.dirty.set(pfn.0, &asid);
        Ok(())
    }

    pub fn snp_launch_update(
        &mut self,
        asid: u32,
        pfn: Pfn,
        gpa: Gpa,
        ty: SnpPageType,
    ) -> Result<(), SimError> {
        self.check_budget("SNP_LAUNCH_UPDATE")?;
        self.fw_inject(FaultOp::SnpLaunchUpdate, Some(ty), "SNP_LAUNCH_UPDATE")?;
        let h = self.handle(asid, "SNP_LAUNCH_UPDATE")?;
        let cost = match ty {
            SnpPageType::Normal | SnpPageType::Vmsa => CostOp::SnpLaunchUpdateMeasured,
            _ => CostOp::SnpLaunchUpdateOther,
        };
        self.charge(cost, asid, || format!("{ty:?} pfn {pfn} gpa {gpa}"));
        let Hw { fw, rmp, mem, .. } = self;
        // The GPA is only for the trace: the command measures the RMP entry's GPA.
        let r = fw.snp_launch_update(rmp, mem, Pfn(h.0), pfn, ty);
        self.fw_result("SNP_LAUNCH_UPDATE", r)?;
        self.dirty.set(pfn.0, &asid);
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
    /// reclaimed afterwards, whatever the outcome (leaked, and named in the failure, if that
    /// fails); SEV-ES decrypts directly.
    pub fn dbg_decrypt(
        &mut self,
        asid: u32,
        kind: VmKind,
        pa: Hpa,
        out: &mut PageBuf,
    ) -> Result<(), DbgDecryptFailure<SimError>> {
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
                Ok(self.fw_result(cmd, r)?)
            }
            VmKind::Snp => {
                let dst = self.make_firmware_page()?;
                self.charge(CostOp::SnpDbgDecrypt, asid, || format!("pa {pa}"));
                let Hw { fw, rmp, mem, .. } = self;
                let r = fw.snp_dbg_decrypt(rmp, mem, Pfn(h.0), pa.pfn(), dst);
                let r = self.fw_result(cmd, r);
                let r = match r {
                    Ok(()) => self.mem.read(dst, out).map_err(SimError::from),
                    Err(e) => Err(e),
                };
                // sev_decrypt_vmsa / snp_page_reclaim: the page is reclaimed whatever the
                // decrypt did; a failed reclaim leaks it, and the failure names the step that
                // failed and keeps the decrypt's own error, if it had one.
                if let Err(cleanup) = self.free_firmware_page(dst) {
                    let source = match r {
                        Ok(()) => cleanup,
                        Err(e) => SimError::CleanupFailed {
                            source: Box::new(e),
                            cleanup: Box::new(cleanup),
                        },
                    };
                    return Err(DbgDecryptFailure {
                        source,
                        leaked: Some(dst),
                    });
                }
                Ok(r?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use vmsa_core::{LaunchFinish, LaunchStart, Platform, SevStatus};

    use crate::machine::{Machine, MachineConfig};
    use crate::{PageState, SimError};

    #[test]
    fn snp_launch_start_creates_a_context_and_debug_decrypt_returns_its_page() {
        let m = Machine::new(MachineConfig::default());
        let p = m.create_guest(vmsa_core::VmKind::Snp).unwrap();
        let bad = p.launch_start(&LaunchStart::SevEs { policy: 0 }).unwrap_err();
        assert!(matches!(bad, SimError::WrongKind { .. }), "{bad}");
        p.launch_start(&LaunchStart::Snp {
            policy: (1 << 17) | (1 << 19),
            gosvw: [0; 16],
        })
        .unwrap();
        let gctx = m.hw().slot(p.asid().0).unwrap().gctx.unwrap();
        assert_eq!(m.page_state(gctx), PageState::Context);
        assert_eq!(m.allocated_frames(), 1);
        // Decrypting through a temporary firmware page leaves no frame behind.
        let mut out = [0u8; 4096];
        let e = p.dbg_decrypt_vmsa(gctx.hpa(), &mut out).unwrap_err().source;
        assert_eq!(
            e.firmware_status(),
            Some(SevStatus::InvalidPageState),
            "a context is not a guest page"
        );
        assert_eq!(m.allocated_frames(), 1);
        p.launch_finish(&LaunchFinish::Snp { host_data: [0; 32] })
            .unwrap();
        let e = p
            .launch_finish(&LaunchFinish::Snp { host_data: [0; 32] })
            .unwrap_err();
        assert_eq!(e.firmware_status(), Some(SevStatus::InvalidGuestState));
        p.destroy().unwrap();
        assert_eq!(m.allocated_frames(), 0);
        assert_eq!(m.page_state(gctx), PageState::Hypervisor);
    }
    /// An SNP guest after SNP_LAUNCH_START with `policy`, and a Pre-Guest page of it at `gpa`.
    fn snp_guest_with_pre_guest_page(
        m: &std::sync::Arc<Machine>,
        policy: u64,
        gpa: u64,
    ) -> (crate::SimPlatform, vmsa_core::Pfn) {
        let p = m.create_guest(vmsa_core::VmKind::Snp).unwrap();
        p.launch_start(&LaunchStart::Snp {
            policy,
            gosvw: [0; 16],
        })
        .unwrap();
        let pfn = m.hw().alloc_page().unwrap();
        m.rmpupdate(
            pfn,
            crate::rmp::RmpState {
                gpa: vmsa_core::Gpa(gpa),
                assigned: true,
                immutable: true,
                asid: p.asid().0,
                ..Default::default()
            },
        )
        .unwrap();
        (p, pfn)
    }

    #[test]
    fn snp_launch_update_measures_the_gpa_in_the_rmp_entry_it_has_no_gpa_field() {
        // ASPFW sev_mcmd.c snp_mcmd_launch_update: sha_gpa = RMP_GPA_TO_PADDR(page_rmp_entry.gpa);
        // the command (Linux struct sev_data_snp_launch_update) carries no GPA.
        let m = Machine::new(MachineConfig::default());
        let (p, pfn) = snp_guest_with_pre_guest_page(&m, 1 << 17, 0x3000);
        m.hw().mem.write(pfn, &[9; 4096]).unwrap();
        p.snp_launch_update(pfn, vmsa_core::Gpa(0x5000), vmsa_core::SnpPageType::Normal)
            .unwrap();
        p.launch_finish(&LaunchFinish::Snp { host_data: [0; 32] })
            .unwrap();
        let mut want = crate::measure::SnpLaunchDigest::new();
        want.update(vmsa_core::Gpa(0x3000), vmsa_core::SnpPageType::Normal, &[9; 4096]);
        assert_eq!(
            m.launch_digest(p.asid().0),
            Some(crate::measure::LaunchDigest::Snp(want.digest()))
        );
    }
    /// When the reclaim of SNP_DBG_DECRYPT's temporary page fails, the failure is the reclaim's
    /// real one (here an injected INVALID_ADDRESS, `injected: true`), not a made-up
    /// INVALID_PAGE_STATE; the page is leaked and named. If the decrypt failed too, its error is
    /// kept beside the reclaim's.
    #[test]
    fn a_failed_debug_decrypt_cleanup_reports_the_reclaims_real_error() {
        let m = Machine::new(MachineConfig {
            faults: "page_reclaim:1=INVALID_ADDRESS,page_reclaim:2=INVALID_PARAM"
                .parse()
                .unwrap(),
            ..MachineConfig::default()
        });
        let (p, pfn) = snp_guest_with_pre_guest_page(&m, (1 << 17) | (1 << 19), 0x3000);
        p.snp_launch_update(pfn, vmsa_core::Gpa(0x3000), vmsa_core::SnpPageType::Normal)
            .unwrap();
        let mut out = [0u8; 4096];
        let e = p.dbg_decrypt_vmsa(pfn.hpa(), &mut out).unwrap_err();
        assert_eq!(
            e.source,
            SimError::Firmware {
                cmd: "SNP_PAGE_RECLAIM",
                status: SevStatus::InvalidAddress,
                injected: true,
            }
        );
        let leaked = e.leaked.expect("the temporary page is leaked");
        assert_eq!(m.leaked_frames(), vec![leaked]);
        // A decrypt that fails (a hypervisor page is no guest page) keeps its own error.
        let other = m.hw().alloc_page().unwrap();
        let e = p.dbg_decrypt_vmsa(other.hpa(), &mut out).unwrap_err();
        let SimError::CleanupFailed { source, cleanup } = &e.source else {
            panic!("{}", e.source);
        };
        assert_eq!(
            source.firmware_status(),
            Some(SevStatus::InvalidPageState),
            "{source}"
        );
        assert_eq!(
            **cleanup,
            SimError::Firmware {
                cmd: "SNP_PAGE_RECLAIM",
                status: SevStatus::InvalidParam,
                injected: true,
            }
        );
        assert!(e.leaked.is_some());
    }
    #[test]
    fn vmrun_is_given_only_the_vmsa_address_and_checks_no_gpa() {
        // APM vol. 2 §15.36.12 / table 15-41: VMRUN gets the VMSA's system-physical address
        // (VMCB VMSA pointer); no GPA is passed in, so none is compared.
        let m = Machine::new(MachineConfig::default());
        let (p, pfn) = snp_guest_with_pre_guest_page(&m, 1 << 17, 0x3000);
        assert!(!pfn.is_2m_aligned());
        p.snp_launch_update(pfn, vmsa_core::Gpa(0x3000), vmsa_core::SnpPageType::Vmsa)
            .unwrap();
        p.vmrun(pfn.hpa(), vmsa_core::Gpa(0x9000)).unwrap();
        p.vmexit(pfn.hpa());
    }
    #[test]
    fn secrets_page_is_version_3_with_the_launch_gosvw_and_the_rmp_gpa_field_is_39_bits() {
        // ASPFW sev_mcmd.h SNP_LAUNCH_UPDATE_SECRETS_PAGE_VERSION 3; snp_mcmd_launch_update
        // copies gctx->gosvw (from SNP_LAUNCH_START) to offset 0x10. Linux struct
        // rmpentry_raw: gpa is 39 bits (bits 12-50).
        let m = Machine::new(MachineConfig::default());
        let p = m.create_guest(vmsa_core::VmKind::Snp).unwrap();
        p.launch_start(&LaunchStart::Snp {
            policy: (1 << 17) | (1 << 19),
            gosvw: [0xab; 16],
        })
        .unwrap();
        let pfn = m.hw().alloc_page().unwrap();
        let st = crate::rmp::RmpState {
            gpa: vmsa_core::Gpa(0x5000),
            assigned: true,
            immutable: true,
            asid: p.asid().0,
            ..Default::default()
        };
        m.rmpupdate(pfn, st).unwrap();
        p.snp_launch_update(pfn, vmsa_core::Gpa(0x5000), vmsa_core::SnpPageType::Secrets)
            .unwrap();
        let mut out = [0u8; 4096];
        p.dbg_decrypt_vmsa(pfn.hpa(), &mut out).unwrap();
        assert_eq!(&out[0..4], &3u32.to_le_bytes(), "version");
        assert_eq!(&out[0x10..0x20], &[0xab; 16], "GOSVW");
        let other = m.hw().alloc_page().unwrap();
        let wide = crate::rmp::RmpState {
            gpa: vmsa_core::Gpa(1 << 51),
            ..st
        };
        let e = m.rmpupdate(other, wide).unwrap_err();
        assert!(
            matches!(
                e,
                SimError::Rmp {
                    code: crate::RmpRet::FailInput,
                    ..
                }
            ),
            "{e}"
        );
    }
}
