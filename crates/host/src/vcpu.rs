//! A vCPU: initial state, the run loop's one call, and the kick.

use vmsa_core::SevEsSaveArea;

use crate::errno::Errno;
use crate::exit::VcpuExit;
use crate::refusal::Refusal;

/// A handle that makes a vCPU's current or next [`Vcpu::run`] return
/// [`VcpuExit::Interrupted`] (KVM: a signal to the vCPU thread, repeated until its `KVM_RUN`
/// has returned, so that a signal landing just before the call is not lost).
pub trait Kick: Clone + Send + Sync + 'static {
    /// Interrupt the vCPU.
    fn kick(&self);
}

/// Why a vCPU call failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The call broke one of KVM's rules.
    #[error("vCPU {vcpu}: {refusal}")]
    Refused {
        /// The vCPU.
        vcpu: u32,
        /// The rule.
        #[source]
        refusal: Refusal,
    },
    /// The host's own call failed.
    #[error("vCPU {vcpu}: {call}: {source}")]
    Host {
        /// The vCPU.
        vcpu: u32,
        /// The failing call.
        call: &'static str,
        /// The host's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl VcpuError {
    /// A host failure of `call` on `vcpu`.
    pub fn host(
        vcpu: u32,
        call: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Host {
            vcpu,
            call,
            source: Box::new(source),
        }
    }
}

/// A vCPU, run on its own thread.
pub trait Vcpu: Send {
    /// Its kick handle.
    type Kick: Kick;

    /// Its APIC ID.
    fn id(&self) -> u32;

    /// The initial register state, given as a VMSA image (KVM: `KVM_SET_REGS`, `SREGS`, `XCRS`,
    /// `MSRS`; the host copies it into the VMSA at launch).
    fn set_state(&mut self, vmsa: &SevEsSaveArea) -> Result<(), VcpuError>;

    /// `KVM_RUN` until an exit the VMM must handle. A vCPU with nothing to run (halted, or an AP
    /// no one has created yet) blocks inside, as KVM_RUN does.
    fn run(&mut self) -> Result<VcpuExit, VcpuError>;

    /// Answer the last [`VcpuExit::MapGpaRange`]: `Ok` if the range was converted, else the
    /// errno the guest's hypercall returns.
    fn complete_conversion(&mut self, result: Result<(), Errno>) -> Result<(), VcpuError>;

    /// A kick handle for this vCPU.
    fn kicker(&self) -> Self::Kick;
}
