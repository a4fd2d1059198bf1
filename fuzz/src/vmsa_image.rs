//! The VMSA image parser: `vmsa_core::layout::SevEsSaveArea` from a page's bytes, KVM's
//! register state from an image (backend-kvm's `KvmState`), and the supplied-VMSA launch
//! checks (`Vm::launch_update_data` of page type VMSA) on the simulated machine.
//!
//! Input: the 4 KiB image (zero-padded), then the VM configuration (SNP or SEV-ES, supplied
//! mode, FPU sync, SEV features, MAXPHYADDR), the vCPU count, and the launch update (GPA,
//! length) plus a second GPA for a second supply.
//!
//! Properties: the image parses from and prints to the same bytes, with every field where the
//! layout says; the KVM translation refuses with a one-line reason or accepts, and after one
//! load-and-capture the image is a fixed point (loading and capturing it again changes
//! nothing, and the fields KVM does not hold are never touched but for `x87_ds`/`x87_cs`,
//! which KVM writes as zero); the supplied-VMSA checks
//! accept only an image that obeys every documented rule, make the BSP own it and let the
//! launch finish, refuse everything else with a one-line reason and no change to the BSP,
//! refuse a second VMSA, and leave the machine's frame ledger clean.

use backend_kvm::vmsa_regs::{KvmState, unloadable_fields};
use kvm_bindings::kvm_sregs;
use vmsa_core::layout::{FIELD_OFFSETS, SEV_ES_SAVE_AREA_SIZE};
use vmsa_core::{
    Entry, Gpa, PAGE_SIZE, SNP_POLICY_RSVD_MBO, SevEsSaveArea, SnpPageType, VcpuId, VmConfig, VmKind,
    VmsaState,
};
use zerocopy::{FromBytes, IntoBytes};

use crate::input::Input;
use crate::one_line;
use crate::sim::{MEMORY, SimGuest};

/// Run one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let page = input.array::<{ PAGE_SIZE as usize }>();
    let img = layout(&page);
    kvm_translation(&img);
    supplied(&mut input, &page, &img);
}

/// The page parses into fields at their offsets and prints back to the same bytes.
fn layout(page: &[u8; PAGE_SIZE as usize]) -> Box<SevEsSaveArea> {
    let img = SevEsSaveArea::from_page(page);
    assert!(img.as_page() == page, "parse then print changed the page");
    let read = SevEsSaveArea::read_from_bytes(page).expect("a page is one VMSA");
    assert!(read == *img, "zerocopy's reading and from_page disagree");
    assert_eq!(
        img.rip.to_le_bytes()[..],
        page[offset("rip")..offset("rip") + 8],
        "RIP sits where the layout table says"
    );
    assert_eq!(
        img.sev_features.to_le_bytes()[..],
        page[offset("sev_features")..offset("sev_features") + 8]
    );
    let mut regs = img.clone();
    regs.set_gprs(&img.gprs());
    assert!(regs == img, "storing the GPRs read from an image changes it");
    for with_fpu in [false, true] {
        let synced = img.synced(img.sev_features ^ 1, with_fpu);
        assert_eq!(synced.sev_features, img.sev_features ^ 1);
        assert_eq!((synced.x87_ds, synced.x87_cs), (0, 0));
        let fpu = offset("x87_dp")..SEV_ES_SAVE_AREA_SIZE;
        let features = offset("sev_features")..offset("sev_features") + 8;
        let ds_cs = offset("x87_ds")..offset("x87_ds") + 4;
        for (at, (a, b)) in img.as_bytes().iter().zip(synced.as_bytes()).enumerate() {
            if fpu.contains(&at) && !with_fpu {
                assert_eq!(*b, 0, "byte {at:#x} of the FPU area survives a legacy sync");
            } else if !features.contains(&at) && !ds_cs.contains(&at) {
                assert_eq!(a, b, "byte {at:#x} changed by the sync");
            }
        }
    }
    img
}

fn offset(field: &str) -> usize {
    FIELD_OFFSETS
        .iter()
        .find(|(name, _)| *name == field)
        .map(|(_, at)| *at)
        .expect("a field of the layout table")
}

/// backend-kvm's image ↔ KVM state translation.
fn kvm_translation(img: &SevEsSaveArea) {
    let current = kvm_sregs {
        apic_base: 0xfee0_0900,
        ..Default::default()
    };
    let state = match KvmState::from_image(img, &current) {
        Ok(s) => s,
        Err(e) => return one_line(&e.to_string()),
    };
    assert_eq!(
        state.sregs.apic_base, current.apic_base,
        "the APIC base comes from the vCPU"
    );
    let mut once = Box::new(img.clone());
    state.store(&mut once);
    // Capture writes x87_ds/x87_cs as zero, as KVM does; it touches no other field KVM lacks.
    let mut kept = unloadable_fields(img);
    kept.retain(|f| *f != "x87_ds/x87_cs");
    assert_eq!(
        unloadable_fields(&once),
        kept,
        "capture touched a field KVM does not hold"
    );
    let again = KvmState::from_image(&once, &current).expect("a captured image loads");
    let mut twice = once.clone();
    again.store(&mut twice);
    assert!(twice == once, "load and capture of a captured image changed it");
}

/// The supplied-VMSA launch checks.
fn supplied(input: &mut Input<'_>, page: &[u8; PAGE_SIZE as usize], img: &SevEsSaveArea) {
    let flags = input.u8();
    let config = VmConfig {
        kind: if flags & 1 != 0 {
            VmKind::SevEs
        } else {
            VmKind::Snp
        },
        supplied_vmsa: flags & 2 == 0,
        sync_fpu: flags & 4 == 0,
        sev_features: u64::from(input.u8()) | u64::from(input.u8()) << 8,
        max_phys_bits: input.u8(),
    };
    let vcpus = u32::from(input.u8() % 4);
    let gpa = |input: &mut Input<'_>| {
        let raw = input.u64();
        // Half the time inside guest memory, where the page can be backed.
        Gpa(if raw & 1 == 0 { raw % MEMORY } else { raw })
    };
    let first = gpa(input);
    let len = if flags & 8 == 0 { PAGE_SIZE } else { input.u64() };
    let second = gpa(input);

    let mut g = SimGuest::new(config, vcpus);
    let started = g.vm.launch_start(SNP_POLICY_RSVD_MBO).is_ok();
    let bsp = |g: &SimGuest| g.vm.vcpu(VcpuId(0)).map(|v| v.state).ok();
    let before = bsp(&g);
    match g.vm.launch_update_data(first, len, SnpPageType::Vmsa, Some(page)) {
        Ok(()) => {
            assert!(started && config.kind == VmKind::Snp && config.supplied_vmsa);
            assert_eq!(len, PAGE_SIZE);
            assert!(first.is_page_aligned() && !first.is_2m_aligned(), "{first}");
            assert!(first.fits_phys_bits(config.max_phys_bits), "{first}");
            assert_eq!(
                img.sev_features,
                config.vmsa_features(),
                "SEV_FEATURES must be the VM's"
            );
            assert_eq!(bsp(&g), Some(VmsaState::GuestOwned(first)));
            let again =
                g.vm.launch_update_data(second, PAGE_SIZE, SnpPageType::Vmsa, Some(page));
            assert!(again.is_err(), "a second VMSA at {second} was accepted");
            assert_eq!(bsp(&g), Some(VmsaState::GuestOwned(first)));
            g.vm.launch_finish([0; 32])
                .expect("launch finish with the BSP's VMSA");
            assert!(matches!(g.vm.prepare_entry(VcpuId(0)), Ok(Entry::Run(_))));
        }
        Err(e) => {
            one_line(&e.to_string());
            assert_eq!(bsp(&g), before, "a refused VMSA changed the BSP");
        }
    }
    g.finish();
}
