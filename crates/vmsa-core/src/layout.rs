//! The bit-exact VMSA page: `struct sev_es_save_area`.
//!
//! Layout from AMD APM vol. 2 (pub. 24593) appendix B, table B-4 "VMSA Layout, State Save Area
//! for SEV-ES", and Linux `arch/x86/include/asm/svm.h` (`struct sev_es_save_area`, 1648 bytes),
//! extended with the rest of the 4 KiB page because the firmware measures and encrypts the
//! whole page. Every field offset is asserted at compile time below; the byte views come from
//! `zerocopy`, so there is no hand-written transmute.

use alloc::boxed::Box;

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use crate::addr::PAGE_SIZE;
use crate::platform::PageBuf;

#[cfg(target_endian = "big")]
compile_error!("the VMSA layout is little-endian; vmsa-core supports little-endian hosts only");

/// `SEV_FEATURES` bit 0: the guest runs with SEV-SNP (`SVM_SEV_FEAT_SNP_ACTIVE`).
pub const SEV_FEAT_SNP_ACTIVE: u64 = 1 << 0;
/// `SEV_FEATURES` bit 3: restricted injection (`SVM_SEV_FEAT_RESTRICTED_INJECTION`).
pub const SEV_FEAT_RESTRICTED_INJECTION: u64 = 1 << 3;
/// `SEV_FEATURES` bit 4: alternate injection (`SVM_SEV_FEAT_ALTERNATE_INJECTION`).
pub const SEV_FEAT_ALTERNATE_INJECTION: u64 = 1 << 4;
/// `SEV_FEATURES` bit 5: debug-register swap (`SVM_SEV_FEAT_DEBUG_SWAP`).
pub const SEV_FEAT_DEBUG_SWAP: u64 = 1 << 5;
/// `SEV_FEATURES` bit 9: secure TSC (`SVM_SEV_FEAT_SECURE_TSC`).
pub const SEV_FEAT_SECURE_TSC: u64 = 1 << 9;

/// `EFER.SVME` (bit 12, AMD APM vol. 2 §3.1.7): KVM sets it in every SEV-ES/SNP VMSA
/// (`sev_es_sync_vmsa` in `arch/x86/kvm/svm/sev.c`, from `init_vmcb`'s `svm_set_efer`).
pub const EFER_SVME: u64 = 1 << 12;

/// The architectural value of DR7 with no breakpoint enabled (`DR7_FIXED_1`).
pub const DR7_FIXED_1: u64 = 0x400;

/// A segment register as the VMCB and VMSA store it (`struct vmcb_seg`, 16 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct VmcbSeg {
    /// Selector.
    pub selector: u16,
    /// Attributes in the VMCB's packed 12-bit form (type, S, DPL, P, AVL, L, D/B, G).
    pub attrib: u16,
    /// Limit.
    pub limit: u32,
    /// Base address.
    pub base: u64,
}

impl VmcbSeg {
    /// A segment from its four parts.
    pub const fn new(selector: u16, attrib: u16, limit: u32, base: u64) -> Self {
        Self {
            selector,
            attrib,
            limit,
            base,
        }
    }
}

/// The VMSA page of an SEV-ES / SEV-SNP vCPU (APM vol. 2 table B-4; Linux `struct
/// sev_es_save_area` followed by the unused rest of the 4 KiB page).
///
/// Field names follow Linux. All fields are little-endian; use [`IntoBytes::as_bytes`] and
/// [`FromBytes::read_from_bytes`] for the page image.
#[derive(Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
#[allow(missing_docs)] // field names are the architectural register names
pub struct SevEsSaveArea {
    pub es: VmcbSeg,
    pub cs: VmcbSeg,
    pub ss: VmcbSeg,
    pub ds: VmcbSeg,
    pub fs: VmcbSeg,
    pub gs: VmcbSeg,
    pub gdtr: VmcbSeg,
    pub ldtr: VmcbSeg,
    pub idtr: VmcbSeg,
    pub tr: VmcbSeg,
    pub pl0_ssp: u64,
    pub pl1_ssp: u64,
    pub pl2_ssp: u64,
    pub pl3_ssp: u64,
    pub u_cet: u64,
    pub reserved_0xc8: [u8; 2],
    pub vmpl: u8,
    pub cpl: u8,
    pub reserved_0xcc: [u8; 4],
    pub efer: u64,
    pub reserved_0xd8: [u8; 104],
    pub xss: u64,
    pub cr4: u64,
    pub cr3: u64,
    pub cr0: u64,
    pub dr7: u64,
    pub dr6: u64,
    pub rflags: u64,
    pub rip: u64,
    pub dr0: u64,
    pub dr1: u64,
    pub dr2: u64,
    pub dr3: u64,
    pub dr0_addr_mask: u64,
    pub dr1_addr_mask: u64,
    pub dr2_addr_mask: u64,
    pub dr3_addr_mask: u64,
    pub reserved_0x1c0: [u8; 24],
    pub rsp: u64,
    pub s_cet: u64,
    pub ssp: u64,
    pub isst_addr: u64,
    pub rax: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub cr2: u64,
    pub reserved_0x248: [u8; 32],
    pub g_pat: u64,
    pub dbgctl: u64,
    pub br_from: u64,
    pub br_to: u64,
    pub last_excp_from: u64,
    pub last_excp_to: u64,
    pub reserved_0x298: [u8; 80],
    pub pkru: u32,
    pub tsc_aux: u32,
    pub tsc_scale: u64,
    pub tsc_offset: u64,
    pub reserved_0x300: [u8; 8],
    pub rcx: u64,
    pub rdx: u64,
    pub rbx: u64,
    /// RSP is at 0x1d8; this slot of the GPR array is unused.
    pub reserved_0x320: u64,
    pub rbp: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub reserved_0x380: [u8; 16],
    pub guest_exit_info_1: u64,
    pub guest_exit_info_2: u64,
    pub guest_exit_int_info: u64,
    pub guest_nrip: u64,
    pub sev_features: u64,
    pub vintr_ctrl: u64,
    pub guest_exit_code: u64,
    pub virtual_tom: u64,
    pub tlb_id: u64,
    pub pcpu_id: u64,
    pub event_inj: u64,
    pub xcr0: u64,
    pub reserved_0x3f0: [u8; 16],
    // x87 / SSE / AVX area.
    pub x87_dp: u64,
    pub mxcsr: u32,
    pub x87_ftw: u16,
    pub x87_fsw: u16,
    pub x87_fcw: u16,
    pub x87_fop: u16,
    pub x87_ds: u16,
    pub x87_cs: u16,
    pub x87_rip: u64,
    /// ST0..ST7: bytes 0-7 of ST(i) at `[i * 8]`, bytes 8-9 at `[64 + i * 2]`.
    pub fpreg_x87: [u8; 80],
    /// XMM0..XMM15, 16 bytes each.
    pub fpreg_xmm: [u8; 256],
    /// Upper halves of YMM0..YMM15, 16 bytes each.
    pub fpreg_ymm: [u8; 256],
    /// The rest of the page, not part of `struct sev_es_save_area` but measured and encrypted.
    pub reserved_0x670: [u8; 2448],
}

/// Size of Linux `struct sev_es_save_area` (`EXPECTED_SEV_ES_SAVE_AREA_SIZE`).
pub const SEV_ES_SAVE_AREA_SIZE: usize = 0x670;

const _: () = assert!(core::mem::size_of::<VmcbSeg>() == 16);
const _: () = assert!(core::mem::size_of::<SevEsSaveArea>() == PAGE_SIZE as usize);
const _: () = assert!(core::mem::offset_of!(SevEsSaveArea, reserved_0x670) == SEV_ES_SAVE_AREA_SIZE);

/// Compile-time offset checks against APM table B-4 / Linux `struct sev_es_save_area`.
macro_rules! assert_offsets {
    ($($field:ident = $off:expr),* $(,)?) => {
        $(const _: () = assert!(core::mem::offset_of!(SevEsSaveArea, $field) == $off);)*
        /// Every field name with its architectural offset, for tests and tools.
        pub const FIELD_OFFSETS: &[(&str, usize)] = &[$((stringify!($field), $off)),*];
    };
}

assert_offsets! {
    es = 0x000, cs = 0x010, ss = 0x020, ds = 0x030, fs = 0x040, gs = 0x050,
    gdtr = 0x060, ldtr = 0x070, idtr = 0x080, tr = 0x090,
    pl0_ssp = 0x0a0, pl1_ssp = 0x0a8, pl2_ssp = 0x0b0, pl3_ssp = 0x0b8, u_cet = 0x0c0,
    reserved_0xc8 = 0x0c8, vmpl = 0x0ca, cpl = 0x0cb, reserved_0xcc = 0x0cc, efer = 0x0d0,
    reserved_0xd8 = 0x0d8, xss = 0x140, cr4 = 0x148, cr3 = 0x150, cr0 = 0x158, dr7 = 0x160,
    dr6 = 0x168, rflags = 0x170, rip = 0x178, dr0 = 0x180, dr1 = 0x188, dr2 = 0x190, dr3 = 0x198,
    dr0_addr_mask = 0x1a0, dr1_addr_mask = 0x1a8, dr2_addr_mask = 0x1b0, dr3_addr_mask = 0x1b8,
    reserved_0x1c0 = 0x1c0, rsp = 0x1d8, s_cet = 0x1e0, ssp = 0x1e8, isst_addr = 0x1f0,
    rax = 0x1f8, star = 0x200, lstar = 0x208, cstar = 0x210, sfmask = 0x218,
    kernel_gs_base = 0x220, sysenter_cs = 0x228, sysenter_esp = 0x230, sysenter_eip = 0x238,
    cr2 = 0x240, reserved_0x248 = 0x248, g_pat = 0x268, dbgctl = 0x270, br_from = 0x278,
    br_to = 0x280, last_excp_from = 0x288, last_excp_to = 0x290, reserved_0x298 = 0x298,
    pkru = 0x2e8, tsc_aux = 0x2ec, tsc_scale = 0x2f0, tsc_offset = 0x2f8, reserved_0x300 = 0x300,
    rcx = 0x308, rdx = 0x310, rbx = 0x318, reserved_0x320 = 0x320, rbp = 0x328, rsi = 0x330,
    rdi = 0x338, r8 = 0x340, r9 = 0x348, r10 = 0x350, r11 = 0x358, r12 = 0x360, r13 = 0x368,
    r14 = 0x370, r15 = 0x378, reserved_0x380 = 0x380, guest_exit_info_1 = 0x390,
    guest_exit_info_2 = 0x398, guest_exit_int_info = 0x3a0, guest_nrip = 0x3a8,
    sev_features = 0x3b0, vintr_ctrl = 0x3b8, guest_exit_code = 0x3c0, virtual_tom = 0x3c8,
    tlb_id = 0x3d0, pcpu_id = 0x3d8, event_inj = 0x3e0, xcr0 = 0x3e8, reserved_0x3f0 = 0x3f0,
    x87_dp = 0x400, mxcsr = 0x408, x87_ftw = 0x40c, x87_fsw = 0x40e, x87_fcw = 0x410,
    x87_fop = 0x412, x87_ds = 0x414, x87_cs = 0x416, x87_rip = 0x418, fpreg_x87 = 0x420,
    fpreg_xmm = 0x470, fpreg_ymm = 0x570, reserved_0x670 = 0x670,
}

impl Default for SevEsSaveArea {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

/// A copy of the 4 KiB image as one block move (a derived `Clone` copies the ~100 fields one by
/// one, several times slower; the copy is on the launch path of every VMSA).
impl Clone for SevEsSaveArea {
    fn clone(&self) -> Self {
        zerocopy::transmute!(*self.as_page())
    }
}

impl SevEsSaveArea {
    /// A zeroed VMSA on the heap (the struct is a full page; keep it off small stacks).
    pub fn boxed() -> Box<Self> {
        Self::new_box_zeroed().expect("allocating a 4 KiB VMSA image")
    }

    /// The page image.
    pub fn as_page(&self) -> &[u8; PAGE_SIZE as usize] {
        zerocopy::transmute_ref!(self)
    }

    /// A VMSA parsed from a page image.
    pub fn from_page(page: &[u8; PAGE_SIZE as usize]) -> Box<Self> {
        let mut vmsa = Self::boxed();
        vmsa.as_mut_bytes().copy_from_slice(page);
        vmsa
    }

    /// The general-purpose registers in x86 encoding order (RAX, RCX, RDX, RBX, RSP, RBP, RSI,
    /// RDI, R8..R15), gathered from their scattered VMSA slots.
    pub fn gprs(&self) -> [u64; 16] {
        [
            self.rax, self.rcx, self.rdx, self.rbx, self.rsp, self.rbp, self.rsi, self.rdi, self.r8, self.r9,
            self.r10, self.r11, self.r12, self.r13, self.r14, self.r15,
        ]
    }

    /// Store the general-purpose registers given in x86 encoding order (see [`Self::gprs`]).
    pub fn set_gprs(&mut self, g: &[u64; 16]) {
        [
            self.rax, self.rcx, self.rdx, self.rbx, self.rsp, self.rbp, self.rsi, self.rdi, self.r8, self.r9,
            self.r10, self.r11, self.r12, self.r13, self.r14, self.r15,
        ] = *g;
    }

    /// The image KVM's `sev_es_sync_vmsa` would write for this register state (see
    /// [`Self::sync_page`]). Returned by value, so it allocates nothing.
    pub fn synced(&self, sev_features: u64, with_fpu: bool) -> Self {
        let mut out = self.clone();
        Self::sync_page(zerocopy::transmute_mut!(&mut out), sev_features, with_fpu);
        out
    }

    /// Turn `page`, a copy of a register image, into the image KVM's `sev_es_sync_vmsa`
    /// writes: `sev_features` forced to the VM's value, and the x87/SSE/AVX area kept only when
    /// `with_fpu` (VMs created with `KVM_SEV_INIT2`; legacy `KVM_SEV_ES_INIT` VMs keep it zero
    /// to preserve their old measurements). `x87_ds`/`x87_cs` are always zero, as in KVM.
    ///
    /// In place on bytes, so that a launch copies the register image once, into the buffer it
    /// writes to the VMSA page, and patches it there.
    pub fn sync_page(page: &mut PageBuf, sev_features: u64, with_fpu: bool) {
        use core::mem::{offset_of, size_of};
        let at = offset_of!(SevEsSaveArea, sev_features);
        page[at..at + size_of::<u64>()].copy_from_slice(&sev_features.to_ne_bytes());
        let at = offset_of!(SevEsSaveArea, x87_ds);
        page[at..at + size_of::<u16>()].fill(0);
        let at = offset_of!(SevEsSaveArea, x87_cs);
        page[at..at + size_of::<u16>()].fill(0);
        if !with_fpu {
            page[offset_of!(SevEsSaveArea, x87_dp)..SEV_ES_SAVE_AREA_SIZE].fill(0);
        }
    }

    /// The ten segment registers in VMSA order (ES, CS, SS, DS, FS, GS, GDTR, LDTR, IDTR, TR).
    pub fn segments_mut(&mut self) -> [&mut VmcbSeg; 10] {
        [
            &mut self.es,
            &mut self.cs,
            &mut self.ss,
            &mut self.ds,
            &mut self.fs,
            &mut self.gs,
            &mut self.gdtr,
            &mut self.ldtr,
            &mut self.idtr,
            &mut self.tr,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_table_is_sorted_and_covers_the_page() {
        // Every field follows the previous one, so no field was forgotten between two anchors.
        for pair in FIELD_OFFSETS.windows(2) {
            assert!(pair[0].1 < pair[1].1, "{:?} before {:?}", pair[0], pair[1]);
        }
        assert_eq!(FIELD_OFFSETS.len(), 107);
    }

    #[test]
    fn byte_view_places_fields_at_their_offsets() {
        let mut v = SevEsSaveArea::boxed();
        v.rip = 0x1122_3344_5566_7788;
        v.sev_features = SEV_FEAT_SNP_ACTIVE | SEV_FEAT_DEBUG_SWAP;
        v.cs = VmcbSeg::new(0xf000, 0x9b, 0xffff, 0xffff_0000);
        v.x87_fcw = 0x37f;
        v.fpreg_ymm[255] = 0xab;
        let page = v.as_page();
        assert_eq!(&page[0x178..0x180], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(page[0x3b0], 0x21);
        assert_eq!(&page[0x10..0x12], &0xf000u16.to_le_bytes());
        assert_eq!(&page[0x12..0x14], &0x9bu16.to_le_bytes());
        assert_eq!(&page[0x18..0x20], &0xffff_0000u64.to_le_bytes());
        assert_eq!(&page[0x410..0x412], &0x37fu16.to_le_bytes());
        assert_eq!(page[0x66f], 0xab);
        let back = SevEsSaveArea::from_page(page);
        assert_eq!(*back, *v);
    }

    #[test]
    fn sync_forces_features_and_drops_fpu_for_legacy_vms() {
        let mut regs = SevEsSaveArea::boxed();
        regs.sev_features = 0xdead;
        regs.mxcsr = 0x1f80;
        regs.x87_cs = 7;
        regs.fpreg_xmm[0] = 1;
        regs.rip = 0xfff0;
        let full = regs.synced(SEV_FEAT_SNP_ACTIVE, true);
        assert_eq!(full.sev_features, SEV_FEAT_SNP_ACTIVE);
        assert_eq!((full.mxcsr, full.x87_cs, full.fpreg_xmm[0]), (0x1f80, 0, 1));
        let legacy = regs.synced(0, false);
        assert_eq!((legacy.mxcsr, legacy.fpreg_xmm[0], legacy.rip), (0, 0, 0xfff0));
    }

    #[test]
    fn gprs_round_trip_in_encoding_order() {
        let mut v = SevEsSaveArea::boxed();
        let regs: [u64; 16] = core::array::from_fn(|i| 0x100 + i as u64);
        v.set_gprs(&regs);
        assert_eq!(v.gprs(), regs);
        assert_eq!(v.rax, 0x100);
        assert_eq!(v.rsp, 0x104);
        assert_eq!(v.r15, 0x10f);
        assert_eq!(v.reserved_0x320, 0, "the unused GPR slot stays zero");
    }
}
