//! # backend-kvm
//!
//! The `/dev/kvm` backend of vmsa: real vCPUs whose register state comes from AMD SEV-ES /
//! SEV-SNP VMSA pages.

#![deny(missing_docs)]
#![cfg(target_arch = "x86_64")]

pub mod error;
pub mod probe;
pub mod sev;

pub use error::{Errno, IoctlError};
pub use probe::{Missing, Mode, ModeSupport, ProbeReport, probe};
pub mod cpuid;
pub mod frames;
pub mod gmem;
pub mod platform;
pub mod vmsa_regs;
