//! vmsa-core's `SevEsSaveArea` layout read against VMSA pages written by an independent tool:
//! sev-snp-measure's `--dump-vmsa` (fixture case 022: OVMF.fd, 3 vCPUs, EPYC-Genoa, QEMU).
//! Every field that tool sets must decode, at vmsa-core's offsets, to the value QEMU's reset
//! state gives it; every other byte must be zero.

use std::path::Path;

use vmsa_core::{SevEsSaveArea, VmcbSeg};
use zerocopy::IntoBytes;

fn dump(file: &str) -> Box<SevEsSaveArea> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/fixtures/measure/dumps/022")
        .join(file);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: generate the sev-snp-measure fixtures with `cargo xtask fixtures`",
            path.display()
        )
    });
    let page: &[u8; 4096] = bytes.as_slice().try_into().expect("a VMSA dump is one page");
    SevEsSaveArea::from_page(page)
}

/// The fields QEMU's reset state sets (sev-snp-measure `VMSA.build_save_area`, QEMU flavour),
/// everything else zero.
fn expected(rip: u64, cs_base: u64) -> Box<SevEsSaveArea> {
    let mut v = SevEsSaveArea::boxed();
    for seg in [&mut v.es, &mut v.ss, &mut v.ds, &mut v.fs, &mut v.gs] {
        *seg = VmcbSeg::new(0, 0x93, 0xffff, 0);
    }
    v.cs = VmcbSeg::new(0xf000, 0x9b, 0xffff, cs_base);
    v.gdtr = VmcbSeg::new(0, 0, 0xffff, 0);
    v.idtr = VmcbSeg::new(0, 0, 0xffff, 0);
    v.ldtr = VmcbSeg::new(0, 0x82, 0xffff, 0);
    v.tr = VmcbSeg::new(0, 0x8b, 0xffff, 0);
    v.efer = 0x1000;
    v.cr4 = 0x40;
    v.cr0 = 0x10;
    v.dr7 = 0x400;
    v.dr6 = 0xffff_0ff0;
    v.rflags = 0x2;
    v.rip = rip;
    v.g_pat = 0x0007_0406_0007_0406;
    v.rdx = 0x00a1_0f10; // EPYC-Genoa: family 0x19, model 0x11, stepping 0
    v.sev_features = 0x1;
    v.xcr0 = 0x1;
    v.mxcsr = 0x1f80;
    v.x87_fcw = 0x37f;
    v
}

#[test]
fn the_bsp_dump_decodes_field_by_field() {
    let bsp = dump("vmsa0.bin");
    assert_eq!(bsp.rip, 0xfff0, "rip at 0x178");
    assert_eq!(bsp.cs.base, 0xffff_0000, "cs.base at 0x18");
    assert_eq!(bsp.rdx, 0x00a1_0f10, "rdx at 0x310");
    assert_eq!(bsp.sev_features, 1, "sev_features at 0x3b0");
    assert_eq!(bsp.x87_fcw, 0x37f, "x87_fcw at 0x410");
    assert_eq!(*bsp, *expected(0xfff0, 0xffff_0000));
}

#[test]
fn the_ap_dumps_start_at_the_firmware_reset_vector() {
    let ap = dump("vmsa1.bin");
    assert_eq!(
        ap.as_bytes(),
        dump("vmsa2.bin").as_bytes(),
        "every AP starts alike"
    );
    // The AP's entry comes from OVMF's SEV-ES reset block: CS base is its upper bits, RIP
    // the low 16.
    let eip = ap.cs.base | ap.rip;
    assert_ne!(eip, 0xffff_fff0, "APs do not start at the BSP's reset vector");
    assert_eq!(ap.rip, eip & 0xffff);
    assert_eq!(*ap, *expected(ap.rip, ap.cs.base));
}
