//! Register state through VMSA images on real vCPUs: image → KVM → image is exact for every
//! field KVM holds, and a vCPU that ran can be synced into an image that starts another vCPU
//! in the same state.

use std::sync::Arc;
use std::time::Duration;

use backend_kvm::gmem::GuestRam;
use backend_kvm::guest::layout::{self, MAILBOX_GPA, PARAMS_GPA, params, ports};
use backend_kvm::guest::{self, program};
use backend_kvm::probe::Capabilities;
use backend_kvm::testing::Watchdog;
use backend_kvm::vmsa_regs;
use backend_kvm::{cpuid, vmsa_regs::RegsError};
use kvm_ioctls::{Kvm, VcpuExit};
use vmsa_core::layout::EFER_SVME;
use vmsa_core::{SevEsSaveArea, VmcbSeg};

/// An image with every KVM-held field set to something recognisable.
fn rich_image() -> Box<SevEsSaveArea> {
    let mut v = layout::long_mode_image(0x8000);
    v.set_gprs(&core::array::from_fn(|i| {
        0x1111_0000_0000_0000 | (i as u64 * 0x0101)
    }));
    v.rflags = 0x202;
    v.cr2 = 0xdead_b000;
    v.vintr_ctrl = 0x7; // CR8 / V_TPR
    v.fs.base = 0x7fff_0000_1000;
    v.gs.base = 0x7fff_0000_2000;
    v.idtr = VmcbSeg::new(0, 0, 0xfff, 0x9000);
    v.star = 0x0023_0010_0000_0000;
    v.lstar = 0xffff_ffff_8100_0000;
    v.cstar = 0xffff_ffff_8100_1000;
    v.sfmask = 0x4700;
    v.kernel_gs_base = 0xffff_8880_0000_0000;
    v.sysenter_cs = 0x10;
    v.sysenter_esp = 0xffff_fe00_0000_0000;
    v.sysenter_eip = 0xffff_ffff_8100_2000;
    v.g_pat = 0x0007_0406_0007_0406;
    v.tsc_aux = 0x42;
    v.dr0 = 0x1000;
    v.dr1 = 0x2000;
    v.dr2 = 0x3000;
    v.dr3 = 0x4000;
    v.x87_fcw = 0x27f;
    v.x87_fsw = 0x3800;
    v.x87_ftw = 0x80;
    v.x87_fop = 0x1d9;
    v.x87_rip = 0x8123;
    v.x87_dp = 0x9456;
    v.mxcsr = 0x1fa0;
    for i in 0..80 {
        v.fpreg_x87[i] = i as u8 ^ 0x5a;
    }
    for i in 0..256 {
        v.fpreg_xmm[i] = (i as u8).wrapping_mul(7);
    }
    v
}

#[test]
fn images_round_trip_through_real_vcpus() {
    if !backend_kvm::testing::kvm_or_skip("images_round_trip_through_real_vcpus") {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let table = cpuid::supported(&kvm).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    cpuid::set(&vcpu, &table, 0).unwrap();

    let img = rich_image();
    let report = vmsa_regs::load(&vcpu, &img).unwrap();
    assert!(report.not_loaded.is_empty(), "{:?}", report.not_loaded);
    let back = vmsa_regs::capture(&vcpu, &SevEsSaveArea::boxed()).unwrap();
    let mismatched: Vec<_> = vmsa_core::layout::FIELD_OFFSETS
        .windows(2)
        .filter(|w| {
            let (a, b) = (w[0].1, w[1].1);
            back.as_page()[a..b] != img.as_page()[a..b]
        })
        .map(|w| w[0].0)
        .collect();
    assert!(
        mismatched.is_empty(),
        "fields that did not round-trip: {mismatched:?})"
    );
    assert_eq!(back.efer & EFER_SVME, EFER_SVME);

    // With YMM enabled, the upper YMM halves travel through KVM_SET/GET_XSAVE.
    let mut ymm = rich_image();
    ymm.xcr0 = 0x7;
    ymm.cr4 |= 1 << 18; // OSXSAVE
    for i in 0..256 {
        ymm.fpreg_ymm[i] = 0xff - i as u8;
    }
    match vmsa_regs::load(&vcpu, &ymm) {
        Ok(_) => {
            let back = vmsa_regs::capture(&vcpu, &SevEsSaveArea::boxed()).unwrap();
            assert_eq!(back.xcr0, 0x7);
            assert_eq!(back.fpreg_ymm, ymm.fpreg_ymm);
        }
        Err(RegsError::Ioctl(e)) if e.ioctl == "KVM_SET_XCRS" => {
            eprintln!("this host's CPUID offers no AVX to guests; YMM round trip not possible: {e}");
        }
        Err(e) => panic!("{e}"),
    }

    // Fields without a KVM register are named, not silently dropped.
    let mut odd = rich_image();
    odd.pkru = 0x55;
    odd.vmpl = 1;
    let report = vmsa_regs::load(&vcpu, &odd).unwrap();
    assert_eq!(report.not_loaded, vec!["vmpl", "pkru"]);
}

#[test]
fn a_vcpu_that_ran_syncs_into_an_image_that_starts_another_vcpu() {
    let test = "a_vcpu_that_ran_syncs_into_an_image_that_starts_another_vcpu";
    if !backend_kvm::testing::kvm_or_skip(test) {
        return;
    }
    // Both vCPUs run guest code: a guest-program regression that never exits ends the test.
    let _watchdog = Watchdog::arm(test, Duration::from_secs(60));
    let kvm = Kvm::new().unwrap();
    let vm = Arc::new(kvm.create_vm().unwrap());
    let ram = GuestRam::new(vm.clone(), 0, 0, 4 << 20, Capabilities::read(&kvm).image_ram()).unwrap();
    let prog = program::PROGRAM;
    ram.write(0, &guest::image(&prog, 2, 0)).unwrap();
    let table = cpuid::supported(&kvm).unwrap();

    // vCPU 0 runs the AP program as APIC ID 5, generation 7: it reports and stops at DONE.
    let mut a = vm.create_vcpu(0).unwrap();
    cpuid::set(&a, &table, 0).unwrap();
    let mut img = layout::long_mode_image(prog.entries.ap);
    img.rdi = 5;
    img.rsi = 7;
    vmsa_regs::load(&a, &img).unwrap();
    match a.run().unwrap() {
        VcpuExit::IoOut(port, data) => {
            assert_eq!(port, ports::DONE);
            assert_eq!(data, &5u32.to_le_bytes());
        }
        other => panic!("unexpected exit {other:?}"),
    }
    assert_eq!(ram.read_u64(MAILBOX_GPA + 5 * 8).unwrap(), (7 << 32) | 5);
    assert_eq!(ram.read_u64(PARAMS_GPA + params::COUNTER).unwrap(), 1);

    // Sync it into an image: the registers the guest changed are there.
    let synced = vmsa_regs::capture(&a, &img).unwrap();
    assert_eq!(synced.rax, 5, "eax = edi before OUT");
    assert_eq!(synced.rcx, PARAMS_GPA);
    assert!(synced.rip > prog.entries.ap, "RIP moved past the OUT");
    assert_eq!(
        synced.sev_features, img.sev_features,
        "non-KVM fields kept from the base"
    );

    // Start a second vCPU from the synced image: same state, and it resumes after the OUT.
    let mut b = vm.create_vcpu(1).unwrap();
    cpuid::set(&b, &table, 1).unwrap();
    vmsa_regs::load(&b, &synced).unwrap();
    let again = vmsa_regs::capture(&b, &synced).unwrap();
    assert_eq!(*again, *synced);
    match b.run().unwrap() {
        VcpuExit::Hlt => {}
        other => panic!("the next instruction is HLT, got {other:?}"),
    }
    drop(ram);
}

/// Set in the child process of [`the_watchdog_ends_a_test_whose_vcpu_never_exits`].
const WEDGED_CHILD: &str = "BACKEND_KVM_WEDGED_VCPU_CHILD";

/// Runs only in the child of [`the_watchdog_ends_a_test_whose_vcpu_never_exits`]: a vCPU on the
/// built-in `Spin` program (`jmp $`) under a 1 s watchdog, which must end this process.
#[test]
fn wedged_vcpu_child() {
    if std::env::var_os(WEDGED_CHILD).is_none() {
        return;
    }
    let _watchdog = Watchdog::arm("wedged_vcpu_child", Duration::from_secs(1));
    let kvm = Kvm::new().unwrap();
    let vm = Arc::new(kvm.create_vm().unwrap());
    let ram = GuestRam::new(vm.clone(), 0, 0, 4 << 20, Capabilities::read(&kvm).image_ram()).unwrap();
    let spin = backend_kvm::guest::builtin::GuestProgram::Spin.image(1).unwrap();
    ram.write(spin.gpa.0, &spin.bytes).unwrap();
    let mut v = vm.create_vcpu(0).unwrap();
    cpuid::set(&v, &cpuid::supported(&kvm).unwrap(), 0).unwrap();
    vmsa_regs::load(&v, &spin.vmsas[0]).unwrap();
    let exit = format!("{:?}", v.run());
    panic!("the spinning vCPU exited: {exit}");
}

#[test]
fn the_watchdog_ends_a_test_whose_vcpu_never_exits() {
    let test = "the_watchdog_ends_a_test_whose_vcpu_never_exits";
    if !backend_kvm::testing::kvm_or_skip(test) {
        return;
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["wedged_vcpu_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(WEDGED_CHILD, "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the watchdog did not end the wedged child within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(101), "{stderr}");
    assert!(
        stderr.contains("watchdog: wedged_vcpu_child did not finish within 1s"),
        "{stderr}"
    );
}
