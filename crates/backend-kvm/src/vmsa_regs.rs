//! A VMSA image ([`SevEsSaveArea`]) ↔ a KVM vCPU's register state.
//!
//! [`load`] starts a vCPU from an image with `KVM_SET_SREGS`, `KVM_SET_REGS`, `KVM_SET_XCRS`,
//! `KVM_SET_XSAVE` (the FPU state: x87, SSE, MXCSR and the upper YMM halves — not
//! `KVM_SET_FPU`, which ignores MXCSR and leaves XSTATE_BV unchanged, so the state would not
//! survive a later XSAVE), `KVM_SET_MSRS` and `KVM_SET_DEBUGREGS`;
//! [`capture`] is the reverse (the `sev_es_sync_vmsa` of this backend), overwriting only the
//! fields KVM holds and keeping the others from a base image. The translation itself is pure
//! ([`KvmState::from_image`], [`KvmState::store`]) and unit-tested; the round trip through real
//! vCPUs is in `tests/vmsa_regs.rs`.
//!
//! Conventions (each one is what KVM's SVM code does with a VMCB/VMSA):
//! - segment attributes are the VMCB's packed 12-bit form (type 3:0, S 4, DPL 6:5, P 7,
//!   AVL 8, L 9, D/B 10, G 11); a non-present segment has attributes 0 and is "unusable" in
//!   KVM terms; limits are byte-granular in both;
//! - `CPL` is `SS.DPL` (KVM sets the VMCB's CPL from SS); an image whose `cpl` is above 3, or
//!   disagrees with a present SS, is refused; with SS not present KVM gets the image's `cpl`
//!   as SS's DPL;
//! - `EFER.SVME` (bit 12) is set in every VMSA of a running guest but is not guest-visible: it
//!   is cleared on load and set on capture;
//! - `CR8` is `V_TPR`, bits 3:0 of `VINTR_CTRL`;
//! - x87 registers use the VMSA's split layout (bytes 0–7 of ST(i) at `[i*8]`, bytes 8–9 at
//!   `[64 + i*2]`); `x87_ftw` is the abridged (FXSAVE) tag word; `x87_ds`/`x87_cs` are zero,
//!   as KVM writes them;
//! - an `XCR0` of 0 (not a valid XCR0) loads as the reset value 1 (x87 only).
//!
//! Fields KVM has no counterpart for — `vmpl`, `sev_features`, CET/shadow-stack state, `xss`,
//! `pkru`, the DR address masks, LBR records, TSC scale/offset, the `guest_exit_*` and
//! `event_inj` fields, `virtual_tom`, `tlb_id`, `pcpu_id` and `VINTR_CTRL` beyond V_TPR — are
//! not loaded; [`load`] names every one of them that is non-zero in a [`LoadReport`] instead
//! of silently dropping it.

use kvm_bindings::{
    Msrs, kvm_debugregs, kvm_dtable, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_xcrs,
};
use kvm_ioctls::VcpuFd;
use serde::Serialize;
use vmsa_core::layout::EFER_SVME;
use vmsa_core::{SevEsSaveArea, VmcbSeg};
use zerocopy::IntoBytes;

use crate::error::{IoctlContext, IoctlError};

/// `V_TPR` in `VINTR_CTRL`.
pub const V_TPR_MASK: u64 = 0x0f;
/// `XFEATURE_MASK_YMM`.
const XCR0_YMM: u64 = 1 << 2;
/// Offset of MXCSR in the XSAVE legacy region.
const XSAVE_MXCSR: usize = 24;
/// XSTATE_BV bits of the legacy region (x87 and SSE, which covers MXCSR).
const XSTATE_FP_SSE: u8 = 0b11;
/// Offset of XSTATE_BV in the (standard-format) XSAVE area.
const XSAVE_XSTATE_BV: usize = 512;
/// Offset of the YMM_Hi128 component in the standard-format XSAVE area (CPUID 0xD.2 EBX).
const XSAVE_YMM_HI: usize = 576;

/// The MSRs a VMSA holds outside its segment and control-register slots.
pub const VMSA_MSRS: [(u32, &str); 11] = [
    (0xc000_0081, "STAR"),
    (0xc000_0082, "LSTAR"),
    (0xc000_0083, "CSTAR"),
    (0xc000_0084, "SFMASK"),
    (0xc000_0102, "KERNEL_GS_BASE"),
    (0x174, "SYSENTER_CS"),
    (0x175, "SYSENTER_ESP"),
    (0x176, "SYSENTER_EIP"),
    (0x277, "PAT"),
    (0xc000_0103, "TSC_AUX"),
    (0x1d9, "DEBUGCTL"),
];

/// Why an image could not be loaded or captured.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
pub enum RegsError {
    /// An ioctl failed.
    #[error(transparent)]
    Ioctl(#[from] IoctlError),
    /// A field holds a value KVM cannot take.
    #[error("VMSA field {field} = {value:#x}: {rule}")]
    Field {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The rule.
        rule: &'static str,
    },
    /// `KVM_SET_MSRS` / `KVM_GET_MSRS` stopped early.
    #[error("{ioctl} processed {done} of {total} MSRs; MSR {name} ({index:#x}) was refused")]
    Msr {
        /// The ioctl.
        ioctl: &'static str,
        /// How many were processed.
        done: usize,
        /// How many were asked for.
        total: usize,
        /// The first MSR not processed.
        index: u32,
        /// Its name.
        name: &'static str,
    },
}

/// Non-zero VMSA fields that [`load`] did not give to KVM, because KVM has no counterpart.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LoadReport {
    /// The names of those fields.
    pub not_loaded: Vec<&'static str>,
}

/// A vCPU's register state in KVM's structures.
#[derive(Clone, Debug, PartialEq)]
pub struct KvmState {
    /// `KVM_{GET,SET}_REGS`.
    pub regs: kvm_regs,
    /// `KVM_{GET,SET}_SREGS`.
    pub sregs: kvm_sregs,
    /// The x87/SSE state in `kvm_fpu` form (moved through the XSAVE legacy region).
    pub fpu: kvm_fpu,
    /// XCR0.
    pub xcr0: u64,
    /// Upper halves of YMM0–15 (through `KVM_{GET,SET}_XSAVE`).
    pub ymm_hi: [u8; 256],
    /// The values of [`VMSA_MSRS`], in that order.
    pub msrs: [u64; 11],
    /// `KVM_{GET,SET}_DEBUGREGS`.
    pub debugregs: kvm_debugregs,
}

/// A VMCB segment as a KVM segment.
pub fn seg_to_kvm(s: &VmcbSeg) -> kvm_segment {
    let a = s.attrib;
    let bit = |n: u16| ((a >> n) & 1) as u8;
    let present = bit(7);
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: (a & 0xf) as u8,
        s: bit(4),
        dpl: ((a >> 5) & 3) as u8,
        present,
        avl: bit(8),
        l: bit(9),
        db: bit(10),
        g: bit(11),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// A KVM segment as a VMCB segment (attributes 0 when unusable, as `svm_set_segment`).
pub fn seg_from_kvm(k: &kvm_segment) -> VmcbSeg {
    let attrib = if k.unusable != 0 || k.present == 0 {
        0
    } else {
        (u16::from(k.type_) & 0xf)
            | (u16::from(k.s & 1) << 4)
            | (u16::from(k.dpl & 3) << 5)
            | (u16::from(k.present & 1) << 7)
            | (u16::from(k.avl & 1) << 8)
            | (u16::from(k.l & 1) << 9)
            | (u16::from(k.db & 1) << 10)
            | (u16::from(k.g & 1) << 11)
    };
    VmcbSeg::new(k.selector, attrib, k.limit, k.base)
}

fn dtable_to_kvm(field: &'static str, s: &VmcbSeg) -> Result<kvm_dtable, RegsError> {
    let limit = u16::try_from(s.limit).map_err(|_| RegsError::Field {
        field,
        value: u64::from(s.limit),
        rule: "a descriptor-table limit is 16 bits wide",
    })?;
    Ok(kvm_dtable {
        base: s.base,
        limit,
        padding: [0; 3],
    })
}

fn dtable_from_kvm(d: &kvm_dtable) -> VmcbSeg {
    VmcbSeg::new(0, 0, u32::from(d.limit), d.base)
}

impl KvmState {
    /// The KVM state for `img`. `current` supplies what a VMSA does not hold (the APIC base).
    pub fn from_image(img: &SevEsSaveArea, current: &kvm_sregs) -> Result<Self, RegsError> {
        let ss_dpl = (img.ss.attrib >> 5) & 3;
        if img.cpl > 3 || (img.ss.attrib & 0x80 != 0 && u16::from(img.cpl) != ss_dpl) {
            return Err(RegsError::Field {
                field: "cpl",
                value: u64::from(img.cpl),
                rule: "the CPL must be 0 to 3 and equal SS.DPL if SS is present (KVM derives the CPL from SS)",
            });
        }
        if img.x87_ftw > 0xff {
            return Err(RegsError::Field {
                field: "x87_ftw",
                value: u64::from(img.x87_ftw),
                rule: "the tag word is the abridged (FXSAVE) form, 8 bits",
            });
        }
        let regs = kvm_regs {
            rax: img.rax,
            rbx: img.rbx,
            rcx: img.rcx,
            rdx: img.rdx,
            rsi: img.rsi,
            rdi: img.rdi,
            rsp: img.rsp,
            rbp: img.rbp,
            r8: img.r8,
            r9: img.r9,
            r10: img.r10,
            r11: img.r11,
            r12: img.r12,
            r13: img.r13,
            r14: img.r14,
            r15: img.r15,
            rip: img.rip,
            rflags: img.rflags,
        };
        let sregs = kvm_sregs {
            cs: seg_to_kvm(&img.cs),
            ds: seg_to_kvm(&img.ds),
            es: seg_to_kvm(&img.es),
            fs: seg_to_kvm(&img.fs),
            gs: seg_to_kvm(&img.gs),
            // KVM keeps the CPL as SS's DPL: `svm_set_segment` sets `save.cpl` from SS's `dpl`
            // and `svm_get_segment` returns `save.cpl` as SS's `dpl` (arch/x86/kvm/svm/svm.c),
            // also for an unusable SS, whose attributes the VMSA holds as 0: give KVM the CPL.
            ss: kvm_segment {
                dpl: img.cpl,
                ..seg_to_kvm(&img.ss)
            },
            tr: seg_to_kvm(&img.tr),
            ldt: seg_to_kvm(&img.ldtr),
            gdt: dtable_to_kvm("gdtr", &img.gdtr)?,
            idt: dtable_to_kvm("idtr", &img.idtr)?,
            cr0: img.cr0,
            cr2: img.cr2,
            cr3: img.cr3,
            cr4: img.cr4,
            cr8: img.vintr_ctrl & V_TPR_MASK,
            efer: img.efer & !EFER_SVME,
            apic_base: current.apic_base,
            interrupt_bitmap: [0; 4],
        };
        let mut fpu = kvm_fpu {
            fcw: img.x87_fcw,
            fsw: img.x87_fsw,
            ftwx: img.x87_ftw as u8,
            last_opcode: img.x87_fop,
            last_ip: img.x87_rip,
            last_dp: img.x87_dp,
            mxcsr: img.mxcsr,
            ..Default::default()
        };
        for (i, st) in fpu.fpr.iter_mut().enumerate() {
            st[..8].copy_from_slice(&img.fpreg_x87[i * 8..i * 8 + 8]);
            st[8..10].copy_from_slice(&img.fpreg_x87[64 + i * 2..64 + i * 2 + 2]);
        }
        for (i, x) in fpu.xmm.iter_mut().enumerate() {
            x.copy_from_slice(&img.fpreg_xmm[i * 16..i * 16 + 16]);
        }
        let xcr0 = if img.xcr0 == 0 { 1 } else { img.xcr0 };
        if xcr0 & XCR0_YMM == 0 && img.fpreg_ymm.iter().any(|b| *b != 0) {
            return Err(RegsError::Field {
                field: "fpreg_ymm",
                value: 0,
                rule: "YMM state needs XCR0.YMM (bit 2)",
            });
        }
        let msrs = [
            img.star,
            img.lstar,
            img.cstar,
            img.sfmask,
            img.kernel_gs_base,
            img.sysenter_cs,
            img.sysenter_esp,
            img.sysenter_eip,
            img.g_pat,
            u64::from(img.tsc_aux),
            img.dbgctl,
        ];
        let debugregs = kvm_debugregs {
            db: [img.dr0, img.dr1, img.dr2, img.dr3],
            dr6: img.dr6,
            dr7: img.dr7,
            ..Default::default()
        };
        Ok(Self {
            regs,
            sregs,
            fpu,
            xcr0,
            ymm_hi: img.fpreg_ymm,
            msrs,
            debugregs,
        })
    }

    /// Write this state into the fields of `img` that KVM holds; the others stay.
    pub fn store(&self, img: &mut SevEsSaveArea) {
        let r = &self.regs;
        img.rax = r.rax;
        img.rbx = r.rbx;
        img.rcx = r.rcx;
        img.rdx = r.rdx;
        img.rsi = r.rsi;
        img.rdi = r.rdi;
        img.rsp = r.rsp;
        img.rbp = r.rbp;
        img.r8 = r.r8;
        img.r9 = r.r9;
        img.r10 = r.r10;
        img.r11 = r.r11;
        img.r12 = r.r12;
        img.r13 = r.r13;
        img.r14 = r.r14;
        img.r15 = r.r15;
        img.rip = r.rip;
        img.rflags = r.rflags;
        let s = &self.sregs;
        img.cs = seg_from_kvm(&s.cs);
        img.ds = seg_from_kvm(&s.ds);
        img.es = seg_from_kvm(&s.es);
        img.fs = seg_from_kvm(&s.fs);
        img.gs = seg_from_kvm(&s.gs);
        img.ss = seg_from_kvm(&s.ss);
        img.tr = seg_from_kvm(&s.tr);
        img.ldtr = seg_from_kvm(&s.ldt);
        img.gdtr = dtable_from_kvm(&s.gdt);
        img.idtr = dtable_from_kvm(&s.idt);
        img.cpl = s.ss.dpl & 3;
        img.cr0 = s.cr0;
        img.cr2 = s.cr2;
        img.cr3 = s.cr3;
        img.cr4 = s.cr4;
        img.vintr_ctrl = (img.vintr_ctrl & !V_TPR_MASK) | (s.cr8 & V_TPR_MASK);
        img.efer = s.efer | EFER_SVME;
        let f = &self.fpu;
        img.x87_fcw = f.fcw;
        img.x87_fsw = f.fsw;
        img.x87_ftw = u16::from(f.ftwx);
        img.x87_fop = f.last_opcode;
        img.x87_rip = f.last_ip;
        img.x87_dp = f.last_dp;
        img.x87_ds = 0;
        img.x87_cs = 0;
        img.mxcsr = f.mxcsr;
        for (i, st) in f.fpr.iter().enumerate() {
            img.fpreg_x87[i * 8..i * 8 + 8].copy_from_slice(&st[..8]);
            img.fpreg_x87[64 + i * 2..64 + i * 2 + 2].copy_from_slice(&st[8..10]);
        }
        for (i, x) in f.xmm.iter().enumerate() {
            img.fpreg_xmm[i * 16..i * 16 + 16].copy_from_slice(x);
        }
        img.fpreg_ymm = self.ymm_hi;
        img.xcr0 = self.xcr0;
        let m = &self.msrs;
        img.star = m[0];
        img.lstar = m[1];
        img.cstar = m[2];
        img.sfmask = m[3];
        img.kernel_gs_base = m[4];
        img.sysenter_cs = m[5];
        img.sysenter_esp = m[6];
        img.sysenter_eip = m[7];
        img.g_pat = m[8];
        img.tsc_aux = m[9] as u32;
        img.dbgctl = m[10];
        let d = &self.debugregs;
        [img.dr0, img.dr1, img.dr2, img.dr3] = d.db;
        img.dr6 = d.dr6;
        img.dr7 = d.dr7;
    }
}

/// The non-zero fields of `img` that have no KVM counterpart.
pub fn unloadable_fields(img: &SevEsSaveArea) -> Vec<&'static str> {
    let u64s: [(&'static str, u64); 27] = [
        ("pl0_ssp", img.pl0_ssp),
        ("pl1_ssp", img.pl1_ssp),
        ("pl2_ssp", img.pl2_ssp),
        ("pl3_ssp", img.pl3_ssp),
        ("u_cet", img.u_cet),
        ("vmpl", u64::from(img.vmpl)),
        ("xss", img.xss),
        ("dr0_addr_mask", img.dr0_addr_mask),
        ("dr1_addr_mask", img.dr1_addr_mask),
        ("dr2_addr_mask", img.dr2_addr_mask),
        ("dr3_addr_mask", img.dr3_addr_mask),
        ("s_cet", img.s_cet),
        ("ssp", img.ssp),
        ("isst_addr", img.isst_addr),
        ("br_from", img.br_from),
        ("br_to", img.br_to),
        ("last_excp_from", img.last_excp_from),
        ("last_excp_to", img.last_excp_to),
        ("pkru", u64::from(img.pkru)),
        ("tsc_scale", img.tsc_scale),
        ("tsc_offset", img.tsc_offset),
        ("vintr_ctrl (beyond V_TPR)", img.vintr_ctrl & !V_TPR_MASK),
        ("virtual_tom", img.virtual_tom),
        ("tlb_id", img.tlb_id),
        ("pcpu_id", img.pcpu_id),
        ("event_inj", img.event_inj),
        ("x87_ds/x87_cs", u64::from(img.x87_ds) | u64::from(img.x87_cs)),
    ];
    u64s.into_iter()
        .filter(|(_, v)| *v != 0)
        .map(|(n, _)| n)
        .collect()
}

fn set_xcr0(vcpu: &VcpuFd, xcr0: u64) -> Result<(), RegsError> {
    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = xcr0;
    vcpu.set_xcrs(&xcrs).ioctl("KVM_SET_XCRS")?;
    Ok(())
}

fn get_xcr0(vcpu: &VcpuFd) -> Result<u64, RegsError> {
    let xcrs = vcpu.get_xcrs().ioctl("KVM_GET_XCRS")?;
    let n = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
    Ok(xcrs.xcrs[..n]
        .iter()
        .find(|x| x.xcr == 0)
        .map(|x| x.value)
        .unwrap_or(1))
}

fn msr_list(values: Option<&[u64; 11]>) -> Result<Msrs, RegsError> {
    let entries: Vec<kvm_msr_entry> = VMSA_MSRS
        .iter()
        .enumerate()
        .map(|(i, (index, _))| kvm_msr_entry {
            index: *index,
            data: values.map(|v| v[i]).unwrap_or(0),
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|_| RegsError::Field {
        field: "msrs",
        value: entries.len() as u64,
        rule: "too many MSRs for one KVM_SET_MSRS",
    })
}

fn msr_short(ioctl: &'static str, done: usize) -> RegsError {
    let (index, name) = VMSA_MSRS.get(done).copied().unwrap_or((0, "?"));
    RegsError::Msr {
        ioctl,
        done,
        total: VMSA_MSRS.len(),
        index,
        name,
    }
}

/// Start `vcpu` from `img`: set every register KVM holds. Set CPUID before calling this
/// (long-mode sregs and XCR0 are checked against it).
pub fn load(vcpu: &VcpuFd, img: &SevEsSaveArea) -> Result<LoadReport, RegsError> {
    let current = vcpu.get_sregs().ioctl("KVM_GET_SREGS")?;
    let st = KvmState::from_image(img, &current)?;
    vcpu.set_sregs(&st.sregs).ioctl("KVM_SET_SREGS")?;
    vcpu.set_regs(&st.regs).ioctl("KVM_SET_REGS")?;
    set_xcr0(vcpu, st.xcr0)?;
    // x87/SSE state goes through the XSAVE image, not KVM_SET_FPU: KVM_SET_FPU ignores MXCSR
    // and leaves XSTATE_BV alone, so KVM_GET_XSAVE would later report the init state.
    let mut xsave = vcpu.get_xsave().ioctl("KVM_GET_XSAVE")?;
    let bytes = xsave_bytes_mut(&mut xsave.region);
    write_legacy(&st.fpu, bytes);
    bytes[XSAVE_XSTATE_BV] |= XSTATE_FP_SSE;
    if st.xcr0 & XCR0_YMM != 0 {
        bytes[XSAVE_YMM_HI..XSAVE_YMM_HI + 256].copy_from_slice(&st.ymm_hi);
        bytes[XSAVE_XSTATE_BV] |= XCR0_YMM as u8;
    }
    // SAFETY: `xsave` is the 4096-byte legacy `kvm_xsave` just read from this vCPU; the
    // kernel reads exactly that struct (no trailing FAM data is used by KVM_SET_XSAVE).
    unsafe { vcpu.set_xsave(&xsave) }.ioctl("KVM_SET_XSAVE")?;
    let msrs = msr_list(Some(&st.msrs))?;
    let done = vcpu.set_msrs(&msrs).ioctl("KVM_SET_MSRS")?;
    if done != VMSA_MSRS.len() {
        return Err(msr_short("KVM_SET_MSRS", done));
    }
    vcpu.set_debug_regs(&st.debugregs).ioctl("KVM_SET_DEBUGREGS")?;
    Ok(LoadReport {
        not_loaded: unloadable_fields(img),
    })
}

/// Store `fpu` in the legacy (FXSAVE) region of an XSAVE image, keeping MXCSR_MASK.
fn write_legacy(fpu: &kvm_fpu, b: &mut [u8]) {
    b[0..2].copy_from_slice(&fpu.fcw.to_le_bytes());
    b[2..4].copy_from_slice(&fpu.fsw.to_le_bytes());
    b[4] = fpu.ftwx;
    b[5] = 0;
    b[6..8].copy_from_slice(&fpu.last_opcode.to_le_bytes());
    b[8..16].copy_from_slice(&fpu.last_ip.to_le_bytes());
    b[16..24].copy_from_slice(&fpu.last_dp.to_le_bytes());
    b[XSAVE_MXCSR..XSAVE_MXCSR + 4].copy_from_slice(&fpu.mxcsr.to_le_bytes());
    for (i, st) in fpu.fpr.iter().enumerate() {
        b[32 + i * 16..48 + i * 16].copy_from_slice(st);
    }
    for (i, x) in fpu.xmm.iter().enumerate() {
        b[160 + i * 16..176 + i * 16].copy_from_slice(x);
    }
}

/// The x87/SSE state in the legacy region of an XSAVE image.
fn read_legacy(b: &[u8]) -> kvm_fpu {
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |o: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(v)
    };
    let mut fpu = kvm_fpu {
        fcw: u16_at(0),
        fsw: u16_at(2),
        ftwx: b[4],
        last_opcode: u16_at(6),
        last_ip: u64_at(8),
        last_dp: u64_at(16),
        mxcsr: u32::from_le_bytes([b[24], b[25], b[26], b[27]]),
        ..Default::default()
    };
    for (i, st) in fpu.fpr.iter_mut().enumerate() {
        st.copy_from_slice(&b[32 + i * 16..48 + i * 16]);
    }
    for (i, x) in fpu.xmm.iter_mut().enumerate() {
        x.copy_from_slice(&b[160 + i * 16..176 + i * 16]);
    }
    fpu
}

/// A `kvm_xsave` region viewed as its 4096 bytes (zerocopy: `[u32; 1024]` has no padding and
/// every byte pattern is valid).
fn xsave_bytes_mut(region: &mut [u32; 1024]) -> &mut [u8] {
    region.as_mut_bytes()
}

/// The register state of `vcpu` as a KVM state.
pub fn read_state(vcpu: &VcpuFd) -> Result<KvmState, RegsError> {
    let regs = vcpu.get_regs().ioctl("KVM_GET_REGS")?;
    let sregs = vcpu.get_sregs().ioctl("KVM_GET_SREGS")?;
    let xcr0 = get_xcr0(vcpu)?;
    let mut ymm_hi = [0u8; 256];
    let mut xsave = vcpu.get_xsave().ioctl("KVM_GET_XSAVE")?;
    let bytes = xsave_bytes_mut(&mut xsave.region);
    // KVM expands components in their init state, so the legacy region is always meaningful.
    let fpu = read_legacy(bytes);
    if xcr0 & XCR0_YMM != 0 && bytes[XSAVE_XSTATE_BV] & XCR0_YMM as u8 != 0 {
        ymm_hi.copy_from_slice(&bytes[XSAVE_YMM_HI..XSAVE_YMM_HI + 256]);
    }
    let mut msrs = msr_list(None)?;
    let done = vcpu.get_msrs(&mut msrs).ioctl("KVM_GET_MSRS")?;
    if done != VMSA_MSRS.len() {
        return Err(msr_short("KVM_GET_MSRS", done));
    }
    let mut values = [0u64; 11];
    for (v, e) in values.iter_mut().zip(msrs.as_slice()) {
        *v = e.data;
    }
    let debugregs = vcpu.get_debug_regs().ioctl("KVM_GET_DEBUGREGS")?;
    Ok(KvmState {
        regs,
        sregs,
        fpu,
        xcr0,
        ymm_hi,
        msrs: values,
        debugregs,
    })
}

/// Sync `vcpu` into a VMSA image: `base` with every field KVM holds replaced by the vCPU's
/// current value (the backend's `sev_es_sync_vmsa`).
pub fn capture(vcpu: &VcpuFd, base: &SevEsSaveArea) -> Result<Box<SevEsSaveArea>, RegsError> {
    let st = read_state(vcpu)?;
    let mut img = Box::new(base.clone());
    st.store(&mut img);
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_round_trip_through_kvm_form() {
        // 64-bit code: type 0xb, S, P, L, G.
        let cs = VmcbSeg::new(0x08, 0xa9b, 0xffff_ffff, 0);
        let k = seg_to_kvm(&cs);
        assert_eq!(
            (k.type_, k.s, k.dpl, k.present, k.l, k.db, k.g, k.unusable),
            (0xb, 1, 0, 1, 1, 0, 1, 0)
        );
        assert_eq!(seg_from_kvm(&k), cs);
        // User data, DPL 3, D/B.
        let ds = VmcbSeg::new(0x2b, 0xcf3, 0xffff_ffff, 0x1000);
        let k = seg_to_kvm(&ds);
        assert_eq!((k.dpl, k.db, k.type_), (3, 1, 3));
        assert_eq!(seg_from_kvm(&k), ds);
        // A null segment is unusable and comes back with attributes 0.
        let null = VmcbSeg::new(0, 0, 0, 0);
        assert_eq!(seg_to_kvm(&null).unusable, 1);
        let mut k = seg_to_kvm(&VmcbSeg::new(0x10, 0xc93, 0xffff_ffff, 0));
        k.unusable = 1;
        assert_eq!(seg_from_kvm(&k).attrib, 0);
    }

    fn image() -> Box<SevEsSaveArea> {
        let mut v = SevEsSaveArea::boxed();
        v.cs = VmcbSeg::new(0x08, 0xa9b, 0xffff_ffff, 0);
        v.ss = VmcbSeg::new(0x10, 0xc93, 0xffff_ffff, 0);
        v.ds = v.ss;
        v.gdtr = VmcbSeg::new(0, 0, 0x17, 0x500);
        v.efer = 0x500 | EFER_SVME;
        v.cr0 = 0x8005_0033;
        v.cr4 = 0x620;
        v.cr3 = 0x1000;
        v.vintr_ctrl = 0x5;
        v.rip = 0x8000;
        v.rflags = 2;
        v.set_gprs(&core::array::from_fn(|i| 0x1000 + i as u64));
        v.x87_fcw = 0x37f;
        v.x87_ftw = 0x81;
        v.mxcsr = 0x1f80;
        v.fpreg_x87[0] = 0x11;
        v.fpreg_x87[64] = 0x22;
        v.fpreg_xmm[17] = 0x33;
        v.xcr0 = 1;
        v.star = 7;
        v.tsc_aux = 9;
        v.g_pat = 0x0007_0406_0007_0406;
        v.dr7 = 0x400;
        v.dr6 = 0xffff_0ff0;
        v
    }

    #[test]
    fn image_round_trips_through_kvm_structs() {
        let img = image();
        let current = kvm_sregs {
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        let st = KvmState::from_image(&img, &current).unwrap();
        assert_eq!(st.sregs.efer, 0x500, "SVME is not guest-visible");
        assert_eq!(st.sregs.cr8, 5);
        assert_eq!(st.sregs.apic_base, 0xfee0_0900);
        assert_eq!(st.regs.rsp, 0x1004);
        assert_eq!(st.fpu.fpr[0][0], 0x11);
        assert_eq!(st.fpu.fpr[0][8], 0x22);
        assert_eq!(st.fpu.xmm[1][1], 0x33);
        assert_eq!(st.msrs[0], 7);
        let mut back = SevEsSaveArea::boxed();
        st.store(&mut back);
        assert_eq!(*back, *img);
    }

    #[test]
    fn refuses_what_kvm_cannot_hold() {
        let current = kvm_sregs::default();
        let mut img = image();
        img.cpl = 3;
        assert!(matches!(
            KvmState::from_image(&img, &current),
            Err(RegsError::Field { field: "cpl", .. })
        ));
        let mut img = image();
        img.gdtr.limit = 0x1_0000;
        assert!(matches!(
            KvmState::from_image(&img, &current),
            Err(RegsError::Field { field: "gdtr", .. })
        ));
        let mut img = image();
        img.fpreg_ymm[0] = 1;
        assert!(matches!(
            KvmState::from_image(&img, &current),
            Err(RegsError::Field {
                field: "fpreg_ymm",
                ..
            })
        ));
        let mut img = image();
        img.xcr0 = 0;
        assert_eq!(KvmState::from_image(&img, &current).unwrap().xcr0, 1);
    }

    /// Regression (found by the `vmsa_image` fuzz target): with SS not present, the image's
    /// CPL was not checked and KVM got SS's attribute DPL bits instead, which KVM takes as the
    /// CPL (`svm_set_segment`), so the vCPU ran at another CPL than the image's and the capture
    /// of the capture changed the CPL again.
    #[test]
    fn the_cpl_survives_an_unusable_ss() {
        let current = kvm_sregs::default();
        let mut img = image();
        img.ss = VmcbSeg::new(0, 0x20, 0, 0); // not present, attribute DPL bits 1
        img.cpl = 0;
        let st = KvmState::from_image(&img, &current).unwrap();
        assert_eq!(
            (st.sregs.ss.unusable, st.sregs.ss.dpl),
            (1, 0),
            "KVM's CPL is the image's"
        );
        let mut once = img.clone();
        st.store(&mut once);
        assert_eq!((once.cpl, once.ss.attrib), (0, 0));
        let mut twice = once.clone();
        KvmState::from_image(&once, &current).unwrap().store(&mut twice);
        assert_eq!(
            twice, once,
            "load and capture of a captured image is a fixed point"
        );
        img.cpl = 4;
        assert!(matches!(
            KvmState::from_image(&img, &current),
            Err(RegsError::Field {
                field: "cpl",
                value: 4,
                ..
            })
        ));
    }

    #[test]
    fn the_xsave_legacy_region_round_trips_and_sits_where_fxsave_puts_it() {
        let st = KvmState::from_image(&image(), &kvm_sregs::default()).unwrap();
        let mut buf = [0u8; 4096];
        buf[28..32].copy_from_slice(&0xffffu32.to_le_bytes()); // MXCSR_MASK is kept
        write_legacy(&st.fpu, &mut buf);
        assert_eq!(&buf[0..2], &0x37fu16.to_le_bytes(), "FCW at 0");
        assert_eq!(buf[4], 0x81, "abridged FTW at 4");
        assert_eq!(&buf[24..28], &0x1f80u32.to_le_bytes(), "MXCSR at 24");
        assert_eq!(&buf[28..32], &0xffffu32.to_le_bytes());
        assert_eq!(buf[32], 0x11, "ST0 at 32");
        assert_eq!(buf[40], 0x22, "ST0 bytes 8-9 follow");
        assert_eq!(buf[160 + 17], 0x33, "XMM1 byte 1");
        assert_eq!(read_legacy(&buf), st.fpu);
    }

    #[test]
    fn names_fields_kvm_cannot_take() {
        let mut img = image();
        assert!(unloadable_fields(&img).is_empty());
        img.sev_features = 1; // carried by the image, checked by vmsa-core, not a register
        img.pkru = 0x55;
        img.vmpl = 1;
        img.vintr_ctrl |= 0x100;
        assert_eq!(
            unloadable_fields(&img),
            vec!["vmpl", "pkru", "vintr_ctrl (beyond V_TPR)"]
        );
    }
}
