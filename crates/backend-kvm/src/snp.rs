//! SEV-SNP mode: a `KVM_X86_SNP_VM` launched through the SNP firmware, with guest_memfd
//! private memory, and a vCPU loop that serves private↔shared conversions.
//!
//! **Untested on SNP hardware.** The hosts this project develops on have no SEV (the probe
//! says why: `KVM_CAP_VM_TYPES` lacks `KVM_X86_SNP_VM`, `/dev/sev` is missing and the
//! `KVM_X86_SEV_VMSA_FEATURES` attribute answers `ENXIO`). There, [`run`] stops before any
//! SEV ioctl with [`RunError::Unsupported`] carrying the probe's reasons; that refusal is
//! what the tests exercise, together with the layouts, command ids and exit decoding. The
//! code follows the uapi and KVM's SEV selftests (`kernel.md` §3, §5.1 L4) as closely as it
//! can without the hardware to run it.
//!
//! The flow, as the selftests' `vm_sev_launch` for SNP:
//! 1. `KVM_CREATE_VM(KVM_X86_SNP_VM)`, `KVM_SEV_INIT2` (no extra VMSA features, default GHCB
//!    version), `KVM_CAP_EXIT_HYPERCALL` with `KVM_HC_MAP_GPA_RANGE`;
//! 2. guest memory: a guest_memfd (private, not mappable) bound to a memslot whose
//!    `userspace_addr` is anonymous shared memory, all of it marked private with
//!    `KVM_SET_MEMORY_ATTRIBUTES`;
//! 3. vCPUs with CPUID and long-mode registers (KVM copies them into each VMSA at launch
//!    finish), page tables with the C-bit;
//! 4. `SNP_LAUNCH_START` (the selftests' default policy), `SNP_LAUNCH_UPDATE` (NORMAL) of page tables and code,
//!    `SNP_LAUNCH_FINISH` (which syncs, encrypts and measures every vCPU's VMSA in-kernel);
//! 5. every vCPU runs until the guest's GHCB termination request (`KVM_EXIT_SYSTEM_EVENT`,
//!    `KVM_SYSTEM_EVENT_SEV_TERM`); `KVM_EXIT_MEMORY_FAULT` and `KVM_HC_MAP_GPA_RANGE` exits
//!    convert the range with `KVM_SET_MEMORY_ATTRIBUTES` and resume.
//!
//! In SNP mode KVM owns the VMSA lifecycle (launch VMSAs, AP creation, INIT switching);
//! vmsa-core is not in the loop, so the report carries no ownership history.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use kvm_bindings::{
    KVM_CAP_EXIT_HYPERCALL, KVM_MEM_GUEST_MEMFD, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_EXIT_FLAG_PRIVATE,
    KVM_SYSTEM_EVENT_SEV_TERM, KVM_X86_SNP_VM as VM_TYPE_SNP, kvm_enable_cap, kvm_memory_attributes,
    kvm_userspace_memory_region2,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::Serialize;
use vmsa_core::SNP_POLICY_RSVD_MBO;

use crate::error::{Errno, IoctlError};
use crate::gmem::{GmemError, GuestMemfd, Mapping};
use crate::guest::layout::{self, CODE_GPA, GDT, GDT_GPA};
use crate::probe::{Mode, ProbeReport};
use crate::runner::{RunConfig, RunError, RunReport, Timings};
use crate::sev::{GHCB_MSR_TERM_REQ, MapGpaRange, SevError, SevFirmware, SevVm, SnpLaunchPage};
use crate::uapi::KVM_HC_MAP_GPA_RANGE;
use crate::vmsa_regs::KvmState;
use crate::{cpuid, watchdog};

/// Why the SNP path failed after the probe allowed it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
pub enum SnpError {
    /// A SEV command failed.
    #[error(transparent)]
    Sev(#[from] SevError),
    /// An ioctl failed.
    #[error(transparent)]
    Ioctl(#[from] IoctlError),
    /// Guest memory.
    #[error(transparent)]
    Gmem(#[from] GmemError),
    /// The host's CPUID table has no C-bit position (leaf 0x8000001F `EBX[5:0]`).
    #[error("CPUID 0x8000001F reports no C-bit position (EBX = {ebx:#x})")]
    NoCBit {
        /// EBX of leaf 0x8000001F.
        ebx: u32,
    },
    /// The SNP guest program could not be assembled.
    #[error("assembling the SNP guest: {0}")]
    Assemble(String),
    /// Registers could not be derived.
    #[error("vCPU registers: {0}")]
    Regs(String),
}

/// How one SNP vCPU ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SnpVcpuEnd {
    /// The vCPU.
    pub id: u32,
    /// The GHCB MSR value of its termination request, if it terminated.
    pub term: Option<u64>,
    /// Private↔shared conversions served (memory faults and MAP_GPA_RANGE).
    pub conversions: u64,
    /// An error, if it failed.
    pub error: Option<String>,
}

/// What an SNP run did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SnpRunReport {
    /// Per-vCPU ends.
    pub vcpus: Vec<SnpVcpuEnd>,
    /// The C-bit position used.
    pub c_bit: u32,
}

/// `KVM_SET_MEMORY_ATTRIBUTES` for a conversion.
pub fn convert(vm: &VmFd, gpa: u64, size: u64, private: bool) -> Result<(), IoctlError> {
    vm.set_memory_attributes(kvm_memory_attributes {
        address: gpa,
        size,
        attributes: if private {
            u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE)
        } else {
            0
        },
        flags: 0,
    })
    .map_err(|e| IoctlError::new("KVM_SET_MEMORY_ATTRIBUTES", e))
}

/// Whether a `KVM_EXIT_MEMORY_FAULT` asks for private memory.
pub fn fault_wants_private(flags: u64) -> bool {
    flags & u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE) != 0
}

/// The SNP guest: terminate through the GHCB MSR protocol (`TERM_REQ`, `rep vmmcall`).
pub fn guest_code() -> Result<Vec<u8>, SnpError> {
    use iced_x86::code_asm::{CodeAssembler, eax, ecx, edx};
    let asm = || -> Result<Vec<u8>, iced_x86::IcedError> {
        let mut a = CodeAssembler::new(64)?;
        a.mov(ecx, crate::ghcb::GHCB_MSR)?;
        a.mov(eax, GHCB_MSR_TERM_REQ as u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        // VMGEXIT = rep; vmmcall. Only ever run on SNP hosts (see the module docs).
        a.db(&[0xf3, 0x0f, 0x01, 0xd9])?;
        a.hlt()?;
        a.assemble(CODE_GPA)
    };
    asm().map_err(|e| SnpError::Assemble(e.to_string()))
}

fn c_bit(table: &kvm_bindings::CpuId) -> Result<u32, SnpError> {
    let ebx = table
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_001f)
        .map(|e| e.ebx)
        .unwrap_or(0);
    match ebx & 0x3f {
        0 => Err(SnpError::NoCBit { ebx }),
        b => Ok(b),
    }
}

/// The staging image (GDT, page tables with the C-bit, code) for `SNP_LAUNCH_UPDATE`,
/// covering GPAs `0..CODE_GPA + 4096`.
fn staging(c_bit: u32) -> Result<Mapping, SnpError> {
    let len = CODE_GPA + 4096;
    let m = Mapping::anonymous(len)?;
    let c = 1u64 << c_bit;
    let gdt: Vec<u8> = GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    m.write(GDT_GPA, &gdt)?;
    for (gpa, entries) in layout::page_tables() {
        let bytes: Vec<u8> = entries.iter().flat_map(|e| (e | c).to_le_bytes()).collect();
        m.write(gpa, &bytes)?;
    }
    m.write(CODE_GPA, &guest_code()?)?;
    Ok(m)
}

/// Run `cfg` as an SEV-SNP guest. Refuses, before touching any SEV interface, when the probe
/// says the host cannot.
pub fn run(cfg: &RunConfig, report: &ProbeReport) -> Result<RunReport, RunError> {
    if !report.supports(Mode::Snp) {
        return Err(RunError::Unsupported {
            mode: Mode::Snp,
            missing: report.missing(Mode::Snp).to_vec(),
        });
    }
    crate::runner::check(cfg)?;
    watchdog::install()?;
    let t0 = Instant::now();
    let kvm = Kvm::new().map_err(|e| IoctlError::new("open /dev/kvm", Errno::from(e)))?;
    let vm = kvm
        .create_vm_with_type(u64::from(VM_TYPE_SNP))
        .map_err(|e| IoctlError::new("KVM_CREATE_VM(KVM_X86_SNP_VM)", e))?;
    let fw = SevFirmware::open().map_err(SnpError::from)?;
    let sev = SevVm::new(&vm, &fw);
    sev.init2(0, 0).map_err(SnpError::from)?;
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_EXIT_HYPERCALL,
        ..Default::default()
    };
    cap.args[0] = 1 << KVM_HC_MAP_GPA_RANGE;
    vm.enable_cap(&cap)
        .map_err(|e| IoctlError::new("KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)", e))?;

    let gmem = GuestMemfd::create(&vm, cfg.memory, 0)?;
    let shared = Mapping::anonymous(cfg.memory)?;
    let region = kvm_userspace_memory_region2 {
        slot: 0,
        flags: KVM_MEM_GUEST_MEMFD,
        guest_phys_addr: 0,
        memory_size: cfg.memory,
        userspace_addr: shared.host_addr(),
        guest_memfd_offset: 0,
        guest_memfd: gmem.raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `shared` is an anonymous mapping of exactly `memory_size` bytes that lives until
    // the end of this function, after `vm` (and with it the memslot) is dropped below.
    unsafe { vm.set_user_memory_region2(region) }
        .map_err(|e| IoctlError::new("KVM_SET_USER_MEMORY_REGION2", e))?;
    convert(&vm, 0, cfg.memory, true)?;

    let table = cpuid::supported(&kvm)?;
    let cbit = c_bit(&table)?;
    let image = staging(cbit)?;
    let mut fds = Vec::new();
    for id in 0..cfg.vcpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| IoctlError::new("KVM_CREATE_VCPU", e))?;
        cpuid::set(&fd, &table, id)?;
        let current = fd.get_sregs().map_err(|e| IoctlError::new("KVM_GET_SREGS", e))?;
        let mut img = layout::long_mode_image(CODE_GPA);
        img.cr3 |= 1 << cbit;
        let st = KvmState::from_image(&img, &current).map_err(|e| SnpError::Regs(e.to_string()))?;
        fd.set_sregs(&st.sregs)
            .map_err(|e| IoctlError::new("KVM_SET_SREGS", e))?;
        fd.set_regs(&st.regs)
            .map_err(|e| IoctlError::new("KVM_SET_REGS", e))?;
        fds.push(fd);
    }
    sev.snp_launch_start(default_policy(), [0; 16])
        .map_err(SnpError::from)?;
    // The staging mapping is page aligned, as SNP_LAUNCH_UPDATE requires of its source.
    sev.snp_launch_update(
        0,
        Some(mapping_bytes(&image)),
        image.len() / 4096,
        SnpLaunchPage::Normal,
    )
    .map_err(SnpError::from)?;
    sev.snp_launch_finish([0; 32]).map_err(SnpError::from)?;
    let setup_us = t0.elapsed().as_micros() as u64;

    let t_run = Instant::now();
    let stop = AtomicBool::new(false);
    let targets: Vec<watchdog::SignalTarget> = (0..cfg.vcpus).map(|_| Default::default()).collect();
    let ends: Vec<SnpVcpuEnd> = std::thread::scope(|s| {
        let handles: Vec<_> = fds
            .into_iter()
            .enumerate()
            .map(|(i, fd)| {
                let (vm, stop, target) = (&vm, &stop, &targets[i]);
                s.spawn(move || run_vcpu(vm, i as u32, fd, stop, target))
            })
            .collect();
        let refs: Vec<&watchdog::SignalTarget> = targets.iter().collect();
        watchdog::watch(
            cfg.timeout,
            || handles.iter().all(|h| h.is_finished()),
            || stop.store(true, Ordering::SeqCst),
            &refs,
        );
        handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                h.join().unwrap_or(SnpVcpuEnd {
                    id: i as u32,
                    term: None,
                    conversions: 0,
                    error: Some("the vCPU thread panicked".into()),
                })
            })
            .collect()
    });
    let run_us = t_run.elapsed().as_micros() as u64;
    let t_down = Instant::now();
    drop(vm);
    drop(gmem);
    drop(shared);
    let teardown_us = t_down.elapsed().as_micros() as u64;
    let completed = ends
        .iter()
        .all(|e| e.error.is_none() && e.term == Some(GHCB_MSR_TERM_REQ));
    Ok(RunReport {
        mode: Mode::Snp,
        mode_reason: "the host supports SEV-SNP".into(),
        snp_missing: Vec::new(),
        vcpus: cfg.vcpus,
        memory: cfg.memory,
        completed,
        timed_out: stop.load(Ordering::SeqCst),
        vcpu_records: Vec::new(),
        histories: Vec::new(),
        accepted_requests: Vec::new(),
        mailboxes: Vec::new(),
        request_results: Vec::new(),
        guest_sev_features: 0,
        exits: Default::default(),
        platform: Default::default(),
        teardown: Default::default(),
        timings: Timings {
            setup_us,
            launch_us: 0,
            run_us,
            teardown_us,
        },
        snp: Some(SnpRunReport {
            vcpus: ends,
            c_bit: cbit,
        }),
    })
}

/// `SNP_POLICY_SMT`: SMT may be enabled on the host.
pub const SNP_POLICY_SMT: u64 = 1 << 16;

/// The policy the KVM selftests use (`snp_default_policy`): bit 17, plus SMT when the host
/// has SMT active (the firmware refuses a launch whose policy forbids SMT on such a host).
pub fn default_policy() -> u64 {
    let smt = std::fs::read_to_string("/sys/devices/system/cpu/smt/active")
        .map(|s| s.trim() == "1")
        .unwrap_or(false);
    policy_for(smt)
}

fn policy_for(smt_active: bool) -> u64 {
    SNP_POLICY_RSVD_MBO | if smt_active { SNP_POLICY_SMT } else { 0 }
}

fn mapping_bytes(m: &Mapping) -> &[u8] {
    // SAFETY: the mapping is live for the borrow of `m`, `len` bytes long, and only the kernel
    // reads it (SNP_LAUNCH_UPDATE copies from it) while the slice exists; nothing writes it.
    unsafe { std::slice::from_raw_parts(m.host_addr() as *const u8, m.len() as usize) }
}

fn run_vcpu(
    vm: &VmFd,
    id: u32,
    mut fd: VcpuFd,
    stop: &AtomicBool,
    target: &watchdog::SignalTarget,
) -> SnpVcpuEnd {
    let _attached = target.attach();
    let mut end = SnpVcpuEnd {
        id,
        term: None,
        conversions: 0,
        error: None,
    };
    loop {
        if stop.load(Ordering::SeqCst) {
            end.error = Some("stopped by the watchdog".into());
            return end;
        }
        let mut convert_req: Option<(u64, u64, bool)> = None;
        match fd.run() {
            Ok(VcpuExit::SystemEvent(t, data)) if t == KVM_SYSTEM_EVENT_SEV_TERM => {
                end.term = data.first().copied();
                return end;
            }
            Ok(VcpuExit::MemoryFault { flags, gpa, size }) => {
                convert_req = Some((gpa, size, fault_wants_private(flags)));
            }
            Ok(VcpuExit::Hypercall(h)) if h.nr == u64::from(KVM_HC_MAP_GPA_RANGE) => {
                match MapGpaRange::decode(&h.args) {
                    Ok(r) => match convert(vm, r.gpa, r.size, r.private) {
                        Ok(()) => {
                            *h.ret = 0;
                            end.conversions += 1;
                        }
                        Err(e) => {
                            *h.ret = (-libc::EINVAL) as u64;
                            end.error = Some(e.to_string());
                        }
                    },
                    Err(rule) => {
                        *h.ret = (-libc::EINVAL) as u64;
                        end.error = Some(format!("bad MAP_GPA_RANGE: {rule}"));
                    }
                }
            }
            Ok(VcpuExit::Shutdown) => {
                end.error = Some("guest shutdown".into());
                return end;
            }
            Ok(other) => {
                end.error = Some(format!("unexpected exit {other:?}"));
                return end;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                end.error = Some(IoctlError::new("KVM_RUN", Errno::from(e)).to_string());
                return end;
            }
        }
        if let Some((gpa, size, private)) = convert_req {
            match convert(vm, gpa, size, private) {
                Ok(()) => end.conversions += 1,
                Err(e) => {
                    end.error = Some(e.to_string());
                    return end;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snp_guest_terminates_through_the_ghcb_msr() {
        let code = guest_code().unwrap();
        // mov ecx, 0xC0010130; mov eax, 0x100; xor edx, edx; wrmsr; rep vmmcall; hlt.
        assert_eq!(
            code,
            vec![
                0xb9, 0x30, 0x01, 0x01, 0xc0, 0xb8, 0x00, 0x01, 0x00, 0x00, 0x31, 0xd2, 0x0f, 0x30, 0xf3,
                0x0f, 0x01, 0xd9, 0xf4
            ]
        );
    }

    #[test]
    fn policy_follows_the_selftests() {
        assert_eq!(policy_for(false), 1 << 17);
        assert_eq!(policy_for(true), (1 << 17) | (1 << 16));
        assert_ne!(default_policy() & SNP_POLICY_RSVD_MBO, 0);
    }

    #[test]
    fn memory_fault_flags_and_c_bit() {
        assert!(fault_wants_private(8));
        assert!(!fault_wants_private(0));
        let t = kvm_bindings::CpuId::from_entries(&[kvm_bindings::kvm_cpuid_entry2 {
            function: 0x8000_001f,
            ebx: 0x16f,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(c_bit(&t).unwrap(), 0x2f);
        let t = kvm_bindings::CpuId::from_entries(&[]).unwrap();
        assert_eq!(c_bit(&t), Err(SnpError::NoCBit { ebx: 0 }));
    }

    #[test]
    fn staging_sets_the_c_bit_in_every_table_entry() {
        let m = staging(47).unwrap();
        let pml4 = m.read_u64(layout::PML4_GPA).unwrap();
        assert_eq!(pml4, layout::PDPT_GPA | 3 | (1 << 47));
        let pde = m.read_u64(layout::PD_GPA + 8).unwrap();
        assert_eq!(pde, (1 << 21) | 0x83 | (1 << 47));
        assert_eq!(m.len(), CODE_GPA + 4096);
    }
}
