//! # backend-kvm
//!
//! The `/dev/kvm` backend of vmsa: real vCPUs whose register state comes from AMD SEV-ES /
//! SEV-SNP VMSA pages.
//!
//! Two modes, chosen at run time by [`probe()`] (see [`KvmHost`]):
//!
//! - **SEV-SNP** ([`host::snp`]) on hosts whose KVM has `KVM_X86_SNP_VM`: `KVM_SEV_INIT2`,
//!   guest_memfd private memory, `SNP_LAUNCH_START/UPDATE/FINISH` through typed commands
//!   ([`sev`]), and a vCPU loop serving `KVM_EXIT_MEMORY_FAULT` and `KVM_HC_MAP_GPA_RANGE`.
//!   **Untested on SNP hardware**: the development hosts have no SEV, and there this path
//!   stops at the probe with the probe's reasons, before any SEV ioctl.
//! - **VMSA-image** on any KVM host: a default VM whose vCPUs are started from
//!   [`vmsa_core::SevEsSaveArea`] images ([`vmsa_regs`]). vmsa-core's ownership state machine
//!   runs unchanged over [`platform::KvmPlatform`]; a real guest program ([`guest`]) writes
//!   AP VMSAs into its own memory (guest_memfd where KVM can map it, anonymous memory
//!   elsewhere: [`gmem::RamBacking`]) and asks for them through a GHCB-style
//!   doorbell (a userspace MSR exit, [`ghcb`]), validated by vmsa-core with the same rules
//!   and GHCB error codes as SNP, and the VMM starts real vCPUs from those pages ([`vcpu`]).
//!   **Nothing is encrypted and there is no RMP in this mode**: the RMP is tracked in
//!   software to keep the transitions honest, not to protect anything (see [`platform`]).
//!
//! [`host`] puts both modes behind vmsa-host's interface: [`KvmHost`] probes and picks, and a
//! VMM drives it as it drives every backend (the `vmm` crate's one launch-and-run flow does).
//!
//! ```no_run
//! use backend_kvm::KvmHost;
//! use backend_kvm::guest::builtin::GuestProgram;
//! use vmsa_core::{Gpa, SnpPageType, VmKind};
//! use vmsa_host::{Hypervisor, LaunchUpdate, MemoryRegion, Vcpu, Vm, VmSpec};
//!
//! let host = KvmHost::new()?;
//! println!("{}: {}", host.name(), host.reason());
//! let guest = host.builtin_guest(&GuestProgram::ApCreation { recreate: true }, 1)?;
//! let mut vm = host.create_vm(VmSpec::snp(0))?;
//! vm.add_memory(MemoryRegion { slot: 0, gpa: Gpa(0), size: 16 << 20, guest_memfd: true })?;
//! let mut bsp = vm.create_vcpu(0)?;
//! bsp.set_state(&guest.vmsas[0])?;
//! vm.launch_start(vmsa_core::SNP_POLICY_RSVD_MBO)?;
//! vm.launch_update(LaunchUpdate {
//!     gpa: guest.gpa,
//!     len: guest.bytes.len() as u64,
//!     page_type: SnpPageType::Normal,
//!     data: Some(&guest.bytes),
//! })?;
//! vm.launch_finish()?;
//! // The BSP's `OUT` to the done port (on SEV-SNP: its termination request) ends the guest.
//! println!("{:?}", bsp.run()?);
//! drop(bsp);
//! let report = vm.teardown();
//! println!("{:?}", report.guest);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]
#![cfg(target_arch = "x86_64")]

pub mod cpuid;
pub mod error;
pub mod frames;
pub mod ghcb;
pub mod gmem;
pub mod guest;
pub mod host;
pub mod kick;
pub mod platform;
pub mod probe;
pub mod sev;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod uapi;
pub mod vcpu;
pub mod vmsa_regs;

pub use error::{Errno, IoctlError};
pub use host::{KvmHost, KvmImageHost, KvmSnpHost, KvmVcpu, KvmVm};
pub use probe::{Missing, Mode, ModeSupport, ProbeReport, probe};
