//! backend-kvm benchmarks on real KVM, each against a baseline measured in the same run:
//!
//! - `create/to_first_exit`: KVM VM, RAM (guest_memfd where mappable) with the guest image, one vCPU with
//!   CPUID, started from a VMSA image, `KVM_RUN` to its first exit (the AP program's DONE),
//!   and teardown — against `create/bare_vm` (`KVM_CREATE_VM` + close).
//! - `exit/*`: one guest exit round trip on a running vCPU: `out_port` (the baseline, an OUT
//!   exit), `wrmsr` (the GHCB MSR write alone), and `doorbell` (the GHCB MSR write plus
//!   reading the GHCB, vmsa-core's AP-creation validation and the answer written back).
//! - `vcpu/*`: what one more vCPU costs the kernel before it runs, each on a fresh VM (whose
//!   creation and teardown are not timed): `create` (the baseline, `KVM_CREATE_VCPU` and the
//!   `kvm_run` mapping, on a VM with the split irqchip), `cpuid` (and `KVM_SET_CPUID2` with the
//!   supported table), and `load` (and the VMSA image's registers, as a VMSA-image AP gets
//!   them).
//! - `ioctl/*`: one ioctl that does nothing much: `vm_check_extension` (the baseline, on the VM
//!   fd) and `vcpu_get_mp_state` (on a vCPU fd, which loads and puts the vCPU around it).
//!
//! After criterion's summary the ratios to the baselines are printed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backend_kvm::frames::FrameSpace;
use backend_kvm::ghcb::{self, ReadGhcb};
use backend_kvm::gmem::GuestRam;
use backend_kvm::guest::layout::{self, CODE_GPA, GHCB_GPA};
use backend_kvm::guest::{self, program};
use backend_kvm::platform::KvmPlatform;
use backend_kvm::probe::Capabilities;
use backend_kvm::{cpuid, vmsa_regs};
use criterion::{Criterion, black_box};
use iced_x86::code_asm::*;
use kvm_bindings::{KVM_MSR_EXIT_REASON_INVAL, KVM_MSR_EXIT_REASON_UNKNOWN, kvm_enable_cap};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vmsa_core::ghcb::{
    GhcbRequest, RAX, SVM_VMGEXIT_AP_CREATION, SW_EXIT_CODE, SW_EXIT_INFO_1, SW_EXIT_INFO_2, VALID_BITMAP,
    valid_bit,
};
use vmsa_core::{VcpuId, Vm, VmConfig};

fn create_to_first_exit(kvm: &Kvm, prog: &program::Program, table: &kvm_bindings::CpuId) {
    let vm = Arc::new(kvm.create_vm().unwrap());
    let ram = GuestRam::new(vm.clone(), 0, 0, 4 << 20, Capabilities::read(kvm).image_ram()).unwrap();
    ram.write(0, &guest::image(prog, 1, 0)).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    cpuid::set(&vcpu, table, 0).unwrap();
    let mut img = layout::long_mode_image(prog.entries.ap);
    img.rdi = 1;
    vmsa_regs::load(&vcpu, &img).unwrap();
    match vcpu.run().unwrap() {
        VcpuExit::IoOut(port, _) => assert_eq!(port, layout::ports::DONE),
        other => panic!("unexpected first exit {other:?}"),
    }
}

fn bench_create(c: &mut Criterion) {
    let kvm = Kvm::new().unwrap();
    let prog = program::PROGRAM;
    let table = cpuid::supported(&kvm).unwrap();
    let mut g = c.benchmark_group("create");
    g.sample_size(30).measurement_time(Duration::from_secs(4));
    g.bench_function("bare_vm", |b| b.iter(|| black_box(kvm.create_vm().unwrap())));
    g.bench_function("to_first_exit", |b| {
        b.iter(|| create_to_first_exit(&kvm, &prog, &table))
    });
    g.finish();
}

/// What a `vcpu/*` bench does to a fresh vCPU.
type VcpuStep<'a> = dyn Fn(&VcpuFd) + 'a;

fn bench_vcpu(c: &mut Criterion) {
    let kvm = Kvm::new().unwrap();
    let table = cpuid::supported(&kvm).unwrap();
    let img = layout::long_mode_image(CODE_GPA);
    let mut g = c.benchmark_group("vcpu");
    g.sample_size(30).measurement_time(Duration::from_secs(4));
    // With the split irqchip a VMSA-image VM has: a first vCPU without an in-kernel APIC would
    // also pay for patching the kernel's `kvm_has_noapic_vcpu` branches.
    let fresh_vm = || {
        let vm = kvm.create_vm().unwrap();
        vm.enable_cap(&backend_kvm::host::image::split_irqchip_cap())
            .unwrap();
        vm
    };
    // Each step one more than the one before: vCPU 0 of a fresh VM, then `steps` on it; both are
    // returned so that they are dropped outside the timing.
    let steps: [(&str, &VcpuStep<'_>); 3] = [
        ("create", &|_| ()),
        ("cpuid", &|v| cpuid::set(v, &table, 0).unwrap()),
        ("load", &|v| {
            cpuid::set(v, &table, 0).unwrap();
            vmsa_regs::load(v, &img).unwrap();
        }),
    ];
    for (name, step) in steps {
        g.bench_function(name, |b| {
            b.iter_batched(
                fresh_vm,
                |vm| {
                    let vcpu = vm.create_vcpu(0).unwrap();
                    step(&vcpu);
                    (vm, vcpu)
                },
                criterion::BatchSize::PerIteration,
            )
        });
    }
    g.finish();

    let vm = kvm.create_vm().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let mut g = c.benchmark_group("ioctl");
    g.sample_size(30).measurement_time(Duration::from_secs(3));
    g.bench_function("vm_check_extension", |b| {
        b.iter(|| black_box(vm.check_extension(kvm_ioctls::Cap::Irqchip)))
    });
    g.bench_function("vcpu_get_mp_state", |b| {
        b.iter(|| black_box(vcpu.get_mp_state().unwrap()))
    });
    g.finish();
}

/// A vCPU looping over one exiting instruction, and the VM around it.
struct Looper {
    vcpu: VcpuFd,
    ram: GuestRam,
}

fn looper(kvm: &Kvm, body: impl FnOnce(&mut CodeAssembler)) -> Looper {
    let vm = Arc::new(kvm.create_vm().unwrap());
    let mut cap = kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
        ..Default::default()
    };
    cap.args[0] = u64::from(KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_INVAL);
    vm.enable_cap(&cap).unwrap();
    let ram = GuestRam::new(vm.clone(), 0, 0, 4 << 20, Capabilities::read(kvm).image_ram()).unwrap();
    ram.write(0, &guest::image(&program::PROGRAM, 1, 0)).unwrap();
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    a.mov(ecx, ghcb::GHCB_MSR).unwrap();
    a.mov(eax, GHCB_GPA as u32).unwrap();
    a.xor(edx, edx).unwrap();
    a.set_label(&mut top).unwrap();
    body(&mut a);
    a.jmp(top).unwrap();
    ram.write(CODE_GPA, &a.assemble(CODE_GPA).unwrap()).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    cpuid::set(&vcpu, &cpuid::supported(kvm).unwrap(), 0).unwrap();
    vmsa_regs::load(&vcpu, &layout::long_mode_image(CODE_GPA)).unwrap();
    Looper { vcpu, ram }
}

fn bench_exits(c: &mut Criterion) {
    let kvm = Kvm::new().unwrap();
    let mut g = c.benchmark_group("exit");
    g.sample_size(50).measurement_time(Duration::from_secs(3));

    let mut out = looper(&kvm, |a| a.out(layout::ports::YIELD as u32, al).unwrap());
    g.bench_function("out_port", |b| {
        b.iter(|| match out.vcpu.run().unwrap() {
            VcpuExit::IoOut(p, _) => black_box(p),
            other => panic!("{other:?}"),
        })
    });

    let mut msr = looper(&kvm, |a| a.wrmsr().unwrap());
    g.bench_function("wrmsr", |b| {
        b.iter(|| match msr.vcpu.run().unwrap() {
            VcpuExit::X86Wrmsr(w) => black_box(w.data),
            other => panic!("{other:?}"),
        })
    });

    // The full doorbell: a GHCB asking AP_CREATE for an APIC ID the VM does not have, so
    // every round is refused by vmsa-core (2, 5) and nothing changes between rounds.
    let mut bell = looper(&kvm, |a| a.wrmsr().unwrap());
    let platform = KvmPlatform::new(FrameSpace::new(Vec::new()));
    let mut core = Vm::without_events(platform, VmConfig::snp(0));
    core.create_vcpu(VcpuId(0)).unwrap();
    // Requests come from a launched guest: vmsa-core refuses them before the launch finished.
    core.launch_start(vmsa_core::SNP_POLICY_RSVD_MBO).unwrap();
    core.launch_finish([0; 32]).unwrap();
    let r = &bell.ram;
    r.write_u64(GHCB_GPA + SW_EXIT_CODE, SVM_VMGEXIT_AP_CREATION)
        .unwrap();
    let rax_valid = valid_bit(RAX).1;
    let info_valid = valid_bit(SW_EXIT_CODE).1 | valid_bit(SW_EXIT_INFO_1).1 | valid_bit(SW_EXIT_INFO_2).1;
    r.write_u64(GHCB_GPA + RAX, 1).unwrap();
    r.write_u64(GHCB_GPA + VALID_BITMAP, rax_valid).unwrap();
    g.bench_function("doorbell", |b| {
        b.iter(|| {
            let gpa = match bell.vcpu.run().unwrap() {
                VcpuExit::X86Wrmsr(w) => w.data,
                other => panic!("{other:?}"),
            };
            let ram = &bell.ram;
            // What the guest would have written for this round.
            ram.write_u64(gpa + SW_EXIT_INFO_1, (7 << 32) | 1).unwrap();
            ram.write_u64(gpa + SW_EXIT_INFO_2, 0x20_7000).unwrap();
            ram.write_u64(gpa + VALID_BITMAP + 8, info_valid).unwrap();
            let req = GhcbRequest::read(ram, gpa).unwrap();
            assert_eq!(req.precheck(), None);
            let answer = core
                .ap_creation(&req.ap_creation_request(VcpuId(0)))
                .unwrap_err()
                .sw_exit_info();
            ghcb::respond(ram, gpa, answer.0, answer.1).unwrap();
            black_box(answer)
        })
    });
    g.finish();
}

fn criterion_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("criterion")
}

fn median_ns(dir: &std::path::Path, id: &str) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join(id).join("new/estimates.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["median"]["point_estimate"].as_f64()
}

fn main() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("skipped: /dev/kvm is not usable here");
        return;
    }
    let dir = criterion_dir();
    let mut c = Criterion::default().output_directory(&dir).configure_from_args();
    bench_create(&mut c);
    bench_exits(&mut c);
    bench_vcpu(&mut c);
    c.final_summary();
    let ratio = |a: &str, base: &str| match (median_ns(&dir, a), median_ns(&dir, base)) {
        (Some(x), Some(y)) if y > 0.0 => {
            println!(
                "ratio {a} / {base}: {:.2} ({:.1} µs / {:.1} µs, medians)",
                x / y,
                x / 1e3,
                y / 1e3
            )
        }
        _ => println!("ratio {a} / {base}: not measured in this run"),
    };
    ratio("create/to_first_exit", "create/bare_vm");
    ratio("exit/wrmsr", "exit/out_port");
    ratio("exit/doorbell", "exit/out_port");
    for step in ["cpuid", "load"] {
        ratio(&format!("vcpu/{step}"), "vcpu/create");
    }
    ratio("ioctl/vcpu_get_mp_state", "ioctl/vm_check_extension");
}
