//! # backend-kvm
//!
//! The `/dev/kvm` backend of vmsa: real vCPUs whose register state comes from AMD SEV-ES /
//! SEV-SNP VMSA pages.
//!
//! Two modes, chosen at run time by [`probe()`] (see [`runner::run`]):
//!
//! - **SEV-SNP** ([`snp`]) on hosts whose KVM has `KVM_X86_SNP_VM`: `KVM_SEV_INIT2`,
//!   guest_memfd private memory, `SNP_LAUNCH_START/UPDATE/FINISH` through typed commands
//!   ([`sev`]), and a vCPU loop serving `KVM_EXIT_MEMORY_FAULT` and `KVM_HC_MAP_GPA_RANGE`.
//!   **Untested on SNP hardware**: the development hosts have no SEV, and there this path
//!   stops at the probe with the probe's reasons, before any SEV ioctl.
//! - **VMSA-image** on any KVM host: a default VM whose vCPUs are started from
//!   [`vmsa_core::SevEsSaveArea`] images ([`vmsa_regs`]). vmsa-core's ownership state machine
//!   runs unchanged over [`platform::KvmPlatform`]; a real guest program ([`guest`]) writes
//!   AP VMSAs into its own guest_memfd-backed memory and asks for them through a GHCB-style
//!   doorbell (a userspace MSR exit, [`ghcb`]), validated by vmsa-core with the same rules
//!   and GHCB error codes as SNP, and the VMM starts real vCPUs from those pages ([`vcpu`]).
//!   **Nothing is encrypted and there is no RMP in this mode**: the RMP is tracked in
//!   software to keep the transitions honest, not to protect anything (see [`platform`]).
//!
//! [`host`] puts both modes behind vmsa-host's interface ([`KvmHost`] probes and picks), the
//! way the VMM drives every backend; [`runner`] is the older orchestrator, still working.
//!
//! ```no_run
//! let report = backend_kvm::probe();
//! println!("{report}");
//! let run = backend_kvm::runner::run(&backend_kvm::runner::RunConfig::ap_creation(4))?;
//! println!("{run}");
//! # Ok::<(), backend_kvm::runner::RunError>(())
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
pub mod runner;
pub mod sev;
pub mod snp;
pub mod uapi;
pub mod vcpu;
pub mod vmsa_regs;
pub mod watchdog;

pub use error::{Errno, IoctlError};
pub use host::{KvmHost, KvmImageHost, KvmSnpHost, KvmVcpu, KvmVm};
pub use probe::{Missing, Mode, ModeSupport, ProbeReport, probe};
pub use runner::{ModeChoice, RunConfig, RunError, RunReport, run};
