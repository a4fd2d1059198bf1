//! backend-sim: a cycle-approximate software SEV-SNP machine implementing vmsa-core's
//! [`Platform`](vmsa_core::Platform).
//!
//! - [`Machine`]: host DRAM (sparse, 1 TiB by default), the RMP ([`rmp`]), the host's direct
//!   map whose page size decides how host writes are RMP-checked ([`direct_map`]), the PSP firmware
//!   ([`firmware`]), memory encryption ([`crypto`]), caches, the cost ledger ([`cost`]), the
//!   timeline ([`trace`]) and the fault plan ([`fault`]).
//! - [`SimPlatform`]: one guest on the machine (its ASID and guest_memfd memory), the
//!   `Platform` vmsa-core drives.
//! - [`guest`]: a scripted guest (PVALIDATE, RMPADJUST, VMSA writes, AP creation, page state
//!   changes, HLT), the program the simulated vCPUs run.
//! - [`host`]: the simulator as an SEV-SNP host behind the one host interface
//!   ([`vmsa_host`]): vmsa-core's `Vm<SimPlatform>` plays the KVM kernel over the machine, and
//!   refuses what KVM refuses.
//! - [`measure`]: the launch digests, shared with the VMM's `measure` command.
//!
//! For a VMM:
//! - machine: [`Machine::new`]`(`[`MachineConfig`]`)` (costs from [`CostModel::from_file`],
//!   failures from a [`FaultPlan`] parsed with `"snp_launch_update:vmsa:4=INVALID_PAGE_STATE"
//!   .parse()`, `trace: true` for a timeline);
//! - guest: [`Machine::create_guest`] gives a [`SimPlatform`]; [`SimPlatform::add_memslot`]
//!   gives it memory; drive it with `vmsa_core::Vm::new(platform.clone(), ..)`;
//!   [`SimPlatform::destroy`] after `Vm::teardown`;
//! - as a host: [`host::SimHost::new`]`(machine, script)` with a [`GuestScript`]
//!   ([`GuestScript::from_file`] for JSON, or [`GuestScript::smp_boot`]) is a
//!   [`vmsa_host::Hypervisor`]; a VMM drives its VMs and vCPUs through that interface;
//! - reports: [`Machine::cost_report`], [`Machine::stats`] (RMP faults, leaks, VMRUNs),
//!   [`Machine::footprint`], [`SimPlatform::launch_digest`], [`Machine::write_trace_json`]
//!   (Chrome trace-event JSON for ui.perfetto.dev; `vmm run --trace` writes it whole or not
//!   at all).
//!
//! ```
//! use std::sync::Arc;
//! use backend_sim::{Machine, MachineConfig};
//! use vmsa_core::{EventLog, Vm, VmConfig, VmKind, VcpuId, SNP_POLICY_RSVD_MBO};
//!
//! let machine = Machine::new(MachineConfig::default());
//! let platform = machine.create_guest(VmKind::Snp)?;
//! let events = Arc::new(EventLog::new());
//! let mut vm = Vm::new(platform.clone(), VmConfig::snp(0), events.clone());
//! vm.create_vcpu(VcpuId(0))?;
//! vm.launch_start(SNP_POLICY_RSVD_MBO)?;
//! vm.launch_finish([0; 32])?;
//! assert!(platform.launch_digest().is_some());
//! vm.teardown();
//! platform.destroy()?;
//! assert_eq!(machine.allocated_frames(), 0);
//! assert_eq!(machine.stats().rmp_faults, 0);
//! println!("{} cycles", machine.cost_report().total_cycles);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod cost;
pub mod crypto;
pub mod direct_map;
mod error;
pub mod fault;
pub mod firmware;
pub mod guest;
mod guest_hw;
pub mod host;
pub mod machine;
pub mod measure;
pub mod memory;
mod platform;
mod psp;
pub mod rmp;
pub mod trace;

pub use cost::{CostError, CostModel, CostOp, CostReport};
pub use direct_map::DirectMapPolicy;
pub use fault::{FaultCode, FaultOp, FaultPlan, FaultRule, FaultSpecError};
pub use firmware::PageState;
pub use guest::{GuestAction, GuestScript, ScriptError};
pub use guest_hw::Converted;
pub use measure::LaunchDigest;

pub use machine::{
    DEFAULT_MEMORY_BUDGET, DestroyReport, Footprint, GuestCensus, Machine, MachineConfig, PhaseClock,
    PhaseReport, SimError, Stats,
};
pub use platform::{SimPage, SimPlatform};
pub use rmp::{PageSize, RmpEntry, RmpRet, RmpState};
