//! # vmsa-host
//!
//! The one interface a VMM drives to run an AMD SEV-ES / SEV-SNP guest, whatever plays the host
//! kernel beneath it: a software SNP host (backend-sim), a real SNP KVM (backend-kvm's SNP mode,
//! a thin layer of ioctls), or plain KVM with vmsa-core playing the SNP kernel in user space
//! (backend-kvm's VMSA-image mode).
//!
//! The shape is Cloud Hypervisor's `hypervisor` crate, with associated types instead of trait
//! objects: a [`Hypervisor`] creates a [`Vm`] of a confidential kind; the `Vm` takes guest memory,
//! converts ranges between private and shared, runs the launch (start, update per page type,
//! finish) and creates [`Vcpu`]s; a `Vcpu` takes its initial register state and runs until a
//! [`VcpuExit`] the VMM must handle. AP creation, INIT switching and the VMSA lifecycle are the
//! host kernel's job, as on KVM: they never surface as exits.
//!
//! The rules are KVM's. Every implementation refuses what KVM refuses, with KVM's errno and the
//! rule it broke ([`Refusal`]), so a VMM's ordering mistake shows up on the simulator first. What a
//! host cannot observe (a real SNP kernel keeps the VMSA ownership to itself) is reported as
//! [`Observed::Hidden`] with the reason, never left out.
//!
//! Which layer to use: a kernel, SVSM or simulator that owns VMSAs implements
//! `vmsa_core::Platform` and drives `vmsa_core::Vm`; a userspace VMM uses this crate, or only
//! `vmsa_core::ghcb` (AP-creation validation and codec) and `vmsa_core::layout` (the VMSA page).

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod errno;
mod exit;
mod file_bytes;
mod hypervisor;
pub mod input;
pub mod ports;
mod refusal;
mod report;
mod vcpu;
mod vm;

pub use errno::Errno;
pub use exit::{Conversion, GHCB_MSR_TERM_REQ, TermReason, VcpuExit};
pub use hypervisor::{Capabilities, Hypervisor, HypervisorError};
pub use refusal::{Refusal, supplied_vmsa_rule};
pub use report::{DumpedSaveArea, GuestActivity, GuestStep, HostReport, Observed, TeardownCounts, VmcbDump};
pub use vcpu::{Kick, Vcpu, VcpuError};
pub use vm::{LaunchUpdate, MemoryRegion, Vm, VmError, VmSpec};
