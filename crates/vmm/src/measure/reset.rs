//! The register state a vCPU's launch VMSA holds: x86 reset state as the VMM and KVM set it.
//!
//! Values from sev-snp-measure 0.0.13 (`vmsa.py`, `VMSA.build_save_area`), which reproduces
//! what QEMU (`target/i386/cpu.c`, `x86_cpu_reset_hold`: real-mode segments with base
//! `eip & 0xffff0000`, RDX = CPUID signature, MXCSR 0x1f80, FCW 0x37f) and KVM
//! (`arch/x86/kvm/svm/svm.c` `init_vmcb`, `sev_es_sync_vmsa`: EFER.SVME, CR4.MCE, DR6/DR7,
//! PAT) put into the VMSA, and the values EC2 and GCE were observed to use. The BSP starts at
//! the reset vector 0xffff_fff0; APs start at the OVMF SEV-ES reset block address. Layout:
//! `vmsa_core::SevEsSaveArea` (APM vol. 2 table B-4).

use vmsa_core::layout::EFER_SVME;
use vmsa_core::{SevEsSaveArea, VmcbSeg};

use super::vmm_types::VmmType;

/// The x86 reset vector, where the BSP starts.
pub const BSP_EIP: u32 = 0xffff_fff0;
/// `CR4.MCE`, which KVM sets at vCPU reset.
pub const CR4_MCE: u64 = 1 << 6;
/// `CR0.ET`, the only CR0 bit set at reset in the VMSA.
pub const CR0_ET: u64 = 1 << 4;
/// DR6 at reset (`DR6_ACTIVE_LOW`).
pub const DR6_RESET: u64 = 0xffff_0ff0;
/// DR7 at reset (`DR7_FIXED_1`).
pub const DR7_RESET: u64 = 0x400;
/// RFLAGS at reset (only the fixed bit 1).
pub const RFLAGS_RESET: u64 = 0x2;
/// XCR0 at reset (x87 state only).
pub const XCR0_RESET: u64 = 0x1;
/// The PAT MSR at reset (APM vol. 2 §A.3).
pub const PAT_RESET: u64 = 0x0007_0406_0007_0406;
/// The PAT GCE's hypervisor puts in the VMSA instead.
pub const PAT_GCE: u64 = 0x0007_0106;
/// MXCSR at reset under QEMU.
pub const MXCSR_RESET: u32 = 0x1f80;
/// The x87 control word at reset under QEMU.
pub const FCW_RESET: u16 = 0x37f;
/// RDX at reset under EC2 and GCE (a fixed signature; the vCPU model does not matter).
pub const RDX_FIXED_EC2_GCE: u64 = 0x600;

/// Segment attributes (the VMCB's packed form) that differ between VMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Profile {
    cs: u16,
    ss: u16,
    tr: u16,
    g_pat: u64,
    rdx: Option<u64>,
    mxcsr: u32,
    fcw: u16,
}

fn profile(vmm: VmmType, eip: u32) -> Profile {
    match vmm {
        // Present, S, code, readable, accessed (0x9b); data read/write accessed (0x93); busy
        // 32-bit TSS (0x8b).
        VmmType::Qemu => Profile {
            cs: 0x9b,
            ss: 0x93,
            tr: 0x8b,
            g_pat: PAT_RESET,
            rdx: None,
            mxcsr: MXCSR_RESET,
            fcw: FCW_RESET,
        },
        // EC2 leaves the accessed bits clear on the BSP's CS, on SS, and uses a 16-bit busy TSS.
        VmmType::Ec2 => Profile {
            cs: if eip == BSP_EIP { 0x9a } else { 0x9b },
            ss: 0x92,
            tr: 0x83,
            g_pat: PAT_RESET,
            rdx: Some(RDX_FIXED_EC2_GCE),
            mxcsr: 0,
            fcw: 0,
        },
        VmmType::Gce => Profile {
            cs: 0x9b,
            ss: 0x93,
            tr: 0x8b,
            g_pat: PAT_GCE,
            rdx: Some(RDX_FIXED_EC2_GCE),
            mxcsr: 0,
            fcw: 0,
        },
    }
}

/// The launch VMSA of a vCPU that starts at `eip`, with `sev_features` in its SEV_FEATURES
/// field and `vcpu_sig` as the CPUID signature (used by QEMU only).
pub fn reset_vmsa(eip: u32, sev_features: u64, vcpu_sig: u32, vmm: VmmType) -> Box<SevEsSaveArea> {
    let p = profile(vmm, eip);
    let mut v = SevEsSaveArea::boxed();
    let data = VmcbSeg::new(0, 0x93, 0xffff, 0);
    v.es = data;
    v.cs = VmcbSeg::new(0xf000, p.cs, 0xffff, u64::from(eip & 0xffff_0000));
    v.ss = VmcbSeg::new(0, p.ss, 0xffff, 0);
    v.ds = data;
    v.fs = data;
    v.gs = data;
    v.gdtr = VmcbSeg::new(0, 0, 0xffff, 0);
    v.idtr = VmcbSeg::new(0, 0, 0xffff, 0);
    v.ldtr = VmcbSeg::new(0, 0x82, 0xffff, 0);
    v.tr = VmcbSeg::new(0, p.tr, 0xffff, 0);
    v.efer = EFER_SVME;
    v.cr4 = CR4_MCE;
    v.cr0 = CR0_ET;
    v.dr7 = DR7_RESET;
    v.dr6 = DR6_RESET;
    v.rflags = RFLAGS_RESET;
    v.rip = u64::from(eip & 0xffff);
    v.g_pat = p.g_pat;
    v.rdx = p.rdx.unwrap_or(u64::from(vcpu_sig));
    v.sev_features = sev_features;
    v.xcr0 = XCR0_RESET;
    v.mxcsr = p.mxcsr;
    v.x87_fcw = p.fcw;
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmsa_core::layout::SEV_FEAT_SNP_ACTIVE;

    fn le64(page: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(page[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn qemu_bsp_matches_the_reset_state_at_its_architectural_offsets() {
        let v = reset_vmsa(BSP_EIP, SEV_FEAT_SNP_ACTIVE, 0x00a0_0f11, VmmType::Qemu);
        let p = v.as_page();
        // CS (0x010): selector f000, attrib 9b, limit ffff, base ffff0000.
        assert_eq!(
            &p[0x10..0x20],
            &[
                0x00, 0xf0, 0x9b, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0
            ]
        );
        // The reset state QEMU gives an SEV-ES/SNP vCPU (EFER.SVME set, as VMRUN requires) at its
        // save-area offsets (AMD APM vol. 2, appendix B): EFER, CR4, CR0, DR7, DR6, RFLAGS, RIP,
        // G_PAT.
        assert_eq!(le64(p, 0x0d0), EFER_SVME);
        assert_eq!(le64(p, 0x148), 0x40);
        assert_eq!(le64(p, 0x158), 0x10);
        assert_eq!(le64(p, 0x160), 0x400);
        assert_eq!(le64(p, 0x168), 0xffff_0ff0);
        assert_eq!(le64(p, 0x170), 2);
        assert_eq!(le64(p, 0x178), 0xfff0);
        assert_eq!(le64(p, 0x268), 0x0007_0406_0007_0406);
        assert_eq!(le64(p, 0x310), 0x00a0_0f11, "RDX holds the CPUID signature");
        assert_eq!(le64(p, 0x3b0), SEV_FEAT_SNP_ACTIVE);
        assert_eq!(le64(p, 0x3e8), 1);
        assert_eq!(&p[0x408..0x40c], &0x1f80u32.to_le_bytes());
        assert_eq!(&p[0x410..0x412], &0x37fu16.to_le_bytes());
        // LDTR at 0x070 and TR at 0x090.
        assert_eq!(&p[0x72..0x74], &0x82u16.to_le_bytes());
        assert_eq!(&p[0x92..0x94], &0x8bu16.to_le_bytes());
        assert_eq!((v.vmpl, v.cpl, v.rsp, v.rax, v.cr3), (0, 0, 0, 0, 0));
        assert!(p[0x670..].iter().all(|&b| b == 0), "the rest of the page is zero");
    }

    #[test]
    fn ap_starts_at_the_reset_block_address() {
        let v = reset_vmsa(0x0080_b004, 1, 0x0080_0f12, VmmType::Qemu);
        assert_eq!(v.cs.base, 0x0080_0000);
        assert_eq!(v.rip, 0xb004);
        assert_eq!(v.cs.attrib, 0x9b);
    }

    #[test]
    fn ec2_and_gce_differ_where_sev_snp_measure_says() {
        let ec2_bsp = reset_vmsa(BSP_EIP, 1, 0x0080_0f12, VmmType::Ec2);
        let ec2_ap = reset_vmsa(0x0080_b004, 1, 0x0080_0f12, VmmType::Ec2);
        assert_eq!((ec2_bsp.cs.attrib, ec2_ap.cs.attrib), (0x9a, 0x9b));
        assert_eq!((ec2_bsp.ss.attrib, ec2_bsp.tr.attrib), (0x92, 0x83));
        assert_eq!((ec2_bsp.rdx, ec2_bsp.mxcsr, ec2_bsp.x87_fcw), (0x600, 0, 0));
        assert_eq!(ec2_bsp.g_pat, PAT_RESET);
        let gce = reset_vmsa(BSP_EIP, 1, 0x0080_0f12, VmmType::Gce);
        assert_eq!((gce.cs.attrib, gce.ss.attrib, gce.tr.attrib), (0x9b, 0x93, 0x8b));
        assert_eq!(
            (gce.g_pat, gce.rdx, gce.mxcsr, gce.x87_fcw),
            (0x0007_0106, 0x600, 0, 0)
        );
        // Under EC2 and GCE the model does not matter.
        assert_eq!(gce, reset_vmsa(BSP_EIP, 1, 0x00b0_0f00, VmmType::Gce));
        assert_ne!(
            reset_vmsa(BSP_EIP, 1, 0x0080_0f12, VmmType::Qemu),
            reset_vmsa(BSP_EIP, 1, 0x00b0_0f00, VmmType::Qemu)
        );
    }

    #[test]
    fn kvm_sync_leaves_the_launch_image_unchanged() {
        // vmsa-core's launch syncs the registers the VMM set into the VMSA (KVM's
        // sev_es_sync_vmsa); for these images that must be the identity, or `vmm run` would
        // measure different bytes than `vmm measure`.
        for vmm in [VmmType::Qemu, VmmType::Ec2, VmmType::Gce] {
            for eip in [BSP_EIP, 0x0080_b004] {
                let v = reset_vmsa(eip, 0x21, 0x0080_0f12, vmm);
                assert_eq!(v.synced(0x21, true), *v, "{vmm} {eip:#x}");
            }
        }
    }
}
