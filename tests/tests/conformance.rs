//! One conformance suite, every backend: the same VMSA lifecycles run on vmsa-core's in-memory
//! `TestPlatform`, on backend-sim's SEV-SNP machine and on backend-kvm's VMSA-image platform over
//! a real `/dev/kvm` VM, and must give the same ownership histories, the same AP-creation
//! answers and a clean teardown on each. Backend-specific set-up (backing a guest page, the
//! guest writing its VMSA) sits behind [`Backend`]; the test bodies are generic.

use std::sync::Arc;

use vmsa_core::ghcb::{AP_CREATE, AP_CREATE_ON_INIT, AP_DESTROY};
use vmsa_core::layout::SEV_FEAT_SNP_ACTIVE;
use vmsa_core::{
    ApCreationRequest, Entry, EventLog, Gfn, Gpa, MpState, PageBuf, Platform, SNP_POLICY_RSVD_MBO,
    SevEsSaveArea, StateKind, VcpuId, Vm, VmConfig, histories,
};

/// Guest memory every backend gives the guest, from GPA 0.
const MEMORY: u64 = 16 << 20;
/// The AP VMSAs: one page above a 2 MiB boundary, one page apart.
const VMSA_GPA: u64 = 0x20_1000;

/// What a test needs from a backend besides `Platform`.
trait Backend {
    /// The platform.
    type P: Platform;
    /// Its name in messages.
    const NAME: &'static str;
    /// A platform for one guest with [`MEMORY`] bytes of guest_memfd-backed memory, or why
    /// this host cannot give one.
    fn platform() -> Result<Self::P, String>;
    /// The guest turns its page at `gpa` into a VMSA holding `image` (on SNP: validate,
    /// write with its key, RMPADJUST).
    fn guest_vmsa(p: &Self::P, gpa: Gpa, image: &PageBuf);
}

struct InMemory;

impl Backend for InMemory {
    type P = vmsa_core::testing::TestPlatform;
    const NAME: &'static str = "TestPlatform";

    fn platform() -> Result<Self::P, String> {
        let p = vmsa_core::testing::TestPlatform::default();
        for gfn in 0..MEMORY >> 12 {
            p.map_gmem(Gfn(gfn));
        }
        Ok(p)
    }

    fn guest_vmsa(p: &Self::P, gpa: Gpa, image: &PageBuf) {
        p.guest_write(gpa, image);
    }
}

struct Simulator;

impl Backend for Simulator {
    type P = backend_sim::SimPlatform;
    const NAME: &'static str = "backend-sim";

    fn platform() -> Result<Self::P, String> {
        let machine = backend_sim::Machine::with_defaults();
        let p = machine
            .create_guest(vmsa_core::VmKind::Snp)
            .map_err(|e| e.to_string())?;
        p.add_private_memslot(Gpa(0), MEMORY).map_err(|e| e.to_string())?;
        Ok(p)
    }

    fn guest_vmsa(p: &Self::P, gpa: Gpa, image: &PageBuf) {
        p.pvalidate(gpa, backend_sim::PageSize::Size4K, true)
            .expect("PVALIDATE of the VMSA page");
        p.guest_write(gpa, image, true).expect("guest write of its VMSA");
        p.rmpadjust(gpa, 1, 0, true).expect("RMPADJUST into a VMSA");
    }
}

struct Kvm;

impl Backend for Kvm {
    type P = backend_kvm::platform::KvmPlatform;
    const NAME: &'static str = "backend-kvm";

    fn platform() -> Result<Self::P, String> {
        // Only a /dev/kvm this process cannot open is a reason to skip: once it opens, a failure
        // to make a VM or its memory is backend-kvm's, and fails the test.
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| format!("/dev/kvm is not usable here ({e})"))?;
        let kvm = kvm_ioctls::Kvm::new().expect("KVM_GET_API_VERSION on an open /dev/kvm");
        let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
        // The guest RAM holds the VM, so the platform keeps both alive.
        let backing = backend_kvm::probe::Capabilities::read(&kvm).image_ram();
        let ram = backend_kvm::gmem::GuestRam::new(vm, 0, 0, MEMORY, backing)
            .expect("the guest RAM of a VMSA-image VM");
        let frames = backend_kvm::frames::FrameSpace::new(vec![Arc::new(ram)]);
        Ok(backend_kvm::platform::KvmPlatform::new(frames))
    }

    fn guest_vmsa(p: &Self::P, gpa: Gpa, image: &PageBuf) {
        p.frames().ram()[0]
            .write(gpa.0, image)
            .expect("guest write of its VMSA");
    }
}

/// A launched 4-vCPU SNP VM on `B`, or why the backend is unavailable.
fn launched<B: Backend>() -> Option<(Vm<B::P>, Arc<EventLog>)> {
    let p = match B::platform() {
        Ok(p) => p,
        Err(why) => {
            println!("skipped on {}: {why}", B::NAME);
            return None;
        }
    };
    let log = Arc::new(EventLog::new());
    let mut vm = Vm::new(p, VmConfig::snp(0), log.clone());
    for i in 0..4 {
        vm.create_vcpu(VcpuId(i)).expect("create vCPU");
    }
    vm.launch_start(SNP_POLICY_RSVD_MBO).expect("launch start");
    vm.launch_finish([0; 32]).expect("launch finish");
    Some((vm, log))
}

fn vmsa_image(rip: u64) -> Box<PageBuf> {
    let mut v = SevEsSaveArea::boxed();
    v.rip = rip;
    v.sev_features = SEV_FEAT_SNP_ACTIVE;
    Box::new(*v.as_page())
}

fn request(requester: u32, request: u32, target: u32, gpa: u64) -> ApCreationRequest {
    ApCreationRequest::new(VcpuId(requester), request, target, gpa, Some(SEV_FEAT_SNP_ACTIVE))
}

/// The guest creates every AP from its own VMSA, one AP is destroyed and created again with
/// CREATE_ON_INIT, then everything is torn down. Returns each vCPU's state path.
fn guest_created_aps<B: Backend>() -> Option<Vec<Vec<StateKind>>> {
    let (mut vm, log) = launched::<B>()?;
    for ap in 1..4u32 {
        let gpa = Gpa(VMSA_GPA + u64::from(ap) * 0x1000);
        B::guest_vmsa(vm.platform(), gpa, &vmsa_image(0x1000 * u64::from(ap)));
        let created = vm
            .ap_creation(&request(0, AP_CREATE, ap, gpa.0))
            .expect("AP_CREATE");
        assert!(created.kick, "{}", B::NAME);
        let want = vm.platform().gmem_pfn(gpa.gfn()).expect("backed").hpa();
        assert_eq!(
            vm.prepare_entry(VcpuId(ap)).unwrap(),
            Entry::Run(want),
            "{}",
            B::NAME
        );
    }
    // AP 1: destroy, then a CREATE_ON_INIT that waits for INIT.
    vm.ap_creation(&ApCreationRequest::new(VcpuId(0), AP_DESTROY, 1, 0, None))
        .unwrap();
    assert_eq!(
        vm.prepare_entry(VcpuId(1)).unwrap(),
        Entry::Blocked(MpState::Halted)
    );
    let again = Gpa(VMSA_GPA + 0x8000);
    B::guest_vmsa(vm.platform(), again, &vmsa_image(0x9000));
    vm.ap_creation(&request(0, AP_CREATE_ON_INIT, 1, again.0))
        .unwrap();
    assert_eq!(
        vm.prepare_entry(VcpuId(1)).unwrap(),
        Entry::Blocked(MpState::Halted)
    );
    vm.init_vcpu(VcpuId(1)).unwrap();
    let want = vm.platform().gmem_pfn(again.gfn()).unwrap().hpa();
    assert_eq!(
        vm.prepare_entry(VcpuId(1)).unwrap(),
        Entry::Run(want),
        "{}",
        B::NAME
    );
    // Refusals are the same everywhere.
    for (bad, code) in [
        (request(0, AP_CREATE, 1, VMSA_GPA + 8), 5),
        (request(0, AP_CREATE, 1, 0x40_0000), 5),
        (request(0, AP_CREATE, 7, VMSA_GPA), 5),
        (ApCreationRequest::new(VcpuId(0), AP_CREATE, 1, VMSA_GPA, None), 4),
        (
            ApCreationRequest::new(VcpuId(0), AP_CREATE, 1, VMSA_GPA, Some(0)),
            5,
        ),
    ] {
        assert_eq!(
            vm.ap_creation(&bad).unwrap_err().sw_exit_info(),
            (2, code),
            "{}",
            B::NAME
        );
    }
    let down = vm.teardown();
    assert_eq!((down.vcpus, down.leaked), (4, 0), "{}", B::NAME);
    assert!(log.leaks().is_empty() && log.warnings().is_empty(), "{}", B::NAME);
    Some(histories(&log.snapshot()).iter().map(|h| h.path()).collect())
}

/// A launch that finished cannot finish twice, and no VMSA is synced (written) again.
fn no_second_launch<B: Backend>() -> Option<()> {
    let (mut vm, log) = launched::<B>()?;
    let err = vm.launch_finish([0; 32]).unwrap_err();
    assert!(
        err.to_string()
            .contains("not allowed while the launch is Finished"),
        "{}: {err}",
        B::NAME
    );
    assert!(vm.vcpus().iter().all(|v| v.protected), "{}", B::NAME);
    vm.teardown();
    assert!(log.leaks().is_empty(), "{}", B::NAME);
    Some(())
}

#[test]
fn every_backend_gives_the_same_histories() {
    let expected_ap = [
        StateKind::None,
        StateKind::KvmShared,
        StateKind::KvmPrivate,
        StateKind::None,
        StateKind::GuestOwned,
    ];
    let reference = guest_created_aps::<InMemory>().expect("the in-memory platform always works");
    assert_eq!(
        reference[0],
        [
            StateKind::None,
            StateKind::KvmShared,
            StateKind::KvmPrivate,
            StateKind::None
        ]
    );
    assert_eq!(reference[2][..5], expected_ap);
    assert_eq!(
        reference[1]
            .iter()
            .filter(|s| **s == StateKind::GuestOwned)
            .count(),
        2
    );
    let sim = guest_created_aps::<Simulator>().expect("the simulator always works");
    assert_eq!(sim, reference, "backend-sim differs from TestPlatform");
    if let Some(kvm) = guest_created_aps::<Kvm>() {
        assert_eq!(kvm, reference, "backend-kvm differs from TestPlatform");
    }
}

#[test]
fn no_backend_finishes_a_launch_twice() {
    no_second_launch::<InMemory>().unwrap();
    no_second_launch::<Simulator>().unwrap();
    no_second_launch::<Kvm>();
}
