//! # vmsa-core
//!
//! The life of an AMD SEV-ES / SEV-SNP vCPU's VMSA (VM Save Area, the encrypted page that holds
//! a confidential vCPU's register state), independent of any hypervisor.
//!
//! A VMSA is always in exactly one [`VmsaState`]: `None`, `KvmShared(page)` (host-allocated,
//! still hypervisor-owned in the RMP), `KvmPrivate(page)` (host-allocated, now guest-private or
//! firmware-encrypted) or `GuestOwned(gpa)` (a page the guest created and named through the
//! GHCB AP-creation protocol). A [`Vm`] moves each vCPU's VMSA between those states through the
//! transitions of Linux KVM's "Streamline VMSA setting for VCPUs" design (allocation that avoids
//! AMD erratum 1467, make-private before the launch command, free with make-shared/flush/leak,
//! reclaim after a failed SNP launch, switching to a guest VMSA on INIT), and asks a [`Platform`]
//! for every hardware effect. Leaks and invariant breaks are [`Event`]s, never panics.
//!
//! [`SevEsSaveArea`] is the bit-exact page layout (AMD APM vol. 2 table B-4), with byte views
//! through `zerocopy`.
//!
//! Who uses what: whatever plays the SNP kernel (a simulator, an SVSM, a type-1 hypervisor,
//! backend-kvm's VMSA-image mode) implements [`Platform`] and drives [`Vm`]. A userspace VMM on
//! KVM never sees the VMSA lifecycle; it drives a host through the `vmsa-host` crate, and needs
//! from this crate at most [`ghcb`] (AP-creation validation and the GHCB codec, when its
//! hypervisor forwards AP creation to user space) and [`layout`] (the VMSA page).
//!
//! The crate does no I/O, holds no global state and contains no `unsafe` code. It is
//! `no_std` with `alloc` when built without its default `std` feature (the locks become spin
//! locks), so a firmware or SVSM can embed it.
//!
//! ```
//! use std::sync::Arc;
//! use vmsa_core::{EventLog, Vm, VmConfig, VcpuId, VmsaState};
//! use vmsa_core::testing::TestPlatform;
//!
//! let events = Arc::new(EventLog::new());
//! let mut vm = Vm::new(TestPlatform::default(), VmConfig::snp(0), events.clone());
//! vm.create_vcpu(VcpuId(0))?;
//! vm.launch_start(vmsa_core::SNP_POLICY_RSVD_MBO)?;
//! vm.launch_finish([0; 32])?;
//! assert!(matches!(vm.vcpu(VcpuId(0))?.state, VmsaState::KvmPrivate(_)));
//! let report = vm.teardown();
//! assert_eq!(report.leaked, 0);
//! assert!(events.leaks().is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

extern crate alloc;
#[cfg(all(feature = "std", not(test)))]
extern crate std;
#[cfg(test)]
#[macro_use]
extern crate std;

mod addr;
mod error;
mod event;
pub mod ghcb;
pub mod layout;
mod platform;
mod state;
mod status;
mod sync;
mod vcpu;
mod vm;

#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;

pub use addr::{
    Asid, Gfn, Gpa, Hpa, INITIAL_VMSA_GPA, PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, PTRS_PER_PMD, PageLevel, Pfn,
};
pub use error::{ConfigError, Error, LaunchState, MigrationError, PlatformOp, SuppliedVmsaError};
pub use event::{Event, EventLog, EventSink, History, LeakReason, NullSink, Transition, histories};
pub use ghcb::{ApCreationError, ApCreationRequest, ApCreationRules, ApRequest, ValidApRequest};
pub use layout::{SevEsSaveArea, VmcbSeg};
pub use platform::{
    DbgDecryptFailure, HostPage, LaunchFinish, LaunchStart, PageBuf, Platform, SnpPageType, ZERO_PAGE,
    is_zero,
};
pub use state::{MpState, Op, StateKind, VcpuId, VmKind, VmsaState};
pub use status::SevStatus;
pub use vm::{
    ApCreated, Entry, KVM_SNP_POLICY_MASK_VALID, PreparedEntry, SEV_POLICY_NODBG, SNP_ONLY_VMSA_FEATURES,
    SNP_POLICY_DEBUG, SNP_POLICY_RSVD_MBO, SUPPORTED_VMSA_FEATURES, Teardown, VcpuInfo, Vm, VmConfig,
};

/// The README's embedding example is compiled as a doctest so it cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
