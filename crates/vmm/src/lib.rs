//! # vmm
//!
//! The program users run: a thin VMM and CLI for confidential guests on vmsa-core backends.
//! The binary (`src/main.rs`) only parses arguments, calls a subcommand here, prints and sets
//! the exit code; each subcommand lives in its own module:
//!
//! - [`run`]: `vmm run`, a confidential guest's whole life on the simulator or on KVM, with
//!   every vCPU's VMSA ownership history;
//! - [`measure`]: `vmm measure`, the expected SEV-SNP / SEV-ES launch digest of an OVMF guest,
//!   and the [`measure::LaunchPlan`] a real launch of that firmware follows;
//! - [`probe`]: `vmm probe`, what the host supports and why;
//! - [`output`]: output files written whole or not at all;
//! - [`contain`]: a panic of third-party code fed with outside input, as an error;
//! - [`size`]: byte sizes on the command line;
//! - [`wrap`]: `vmm igvm`, an OVMF image wrapped into an IGVM file.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod contain;
pub mod measure;
pub mod output;
pub mod probe;
pub mod run;
pub mod size;
pub mod wrap;

#[cfg(test)]
mod test_support;
