//! [`SimVcpu`]: one vCPU of a [`super::SimVm`], run on the VMM's thread for it.
//!
//! The scripted guest is one program for all vCPUs: each action names the vCPU that executes
//! it, and actions run one at a time in script order (the hand-over of a real SMP guest, made
//! deterministic). A vCPU's `run` executes its own actions as they come up and blocks while
//! another vCPU's action is next, as `KVM_RUN` blocks a vCPU that has nothing to do. Actions
//! for a vCPU that was never created are executed (and refused) by whichever vCPU finds them,
//! so a script cannot stall on them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use vmsa_core::{SevEsSaveArea, VcpuId};
use vmsa_host::{Errno, Kick, Refusal, VcpuError, VcpuExit};

use super::cpu::Acted;
use super::vm::{Pending, Shared};
use crate::guest::GuestAction;

/// One vCPU of a simulated VM.
#[derive(Debug)]
pub struct SimVcpu {
    id: u32,
    shared: Arc<Shared>,
    /// Set by a kick before it takes the guest lock, which a running action holds: a long
    /// action looks at it between pages and stops, as KVM's kick IPI makes the vCPU exit.
    kick_pending: Arc<AtomicBool>,
}

/// Interrupts a [`SimVcpu`]'s run.
#[derive(Clone, Debug)]
pub struct SimKick {
    id: u32,
    shared: Arc<Shared>,
    kick_pending: Arc<AtomicBool>,
}

impl Kick for SimKick {
    fn kick(&self) {
        self.kick_pending.store(true, Ordering::SeqCst);
        let mut g = self.shared.guest();
        // A run that stopped its action for this kick while the lock was held has taken the
        // kick already (and cleared the flag): it is not taken twice.
        if self.kick_pending.load(Ordering::SeqCst) {
            g.kicked.insert(self.id);
        }
        drop(g);
        self.shared.wake(self.id);
    }
}

impl SimVcpu {
    pub(super) fn new(id: u32, shared: Arc<Shared>) -> Self {
        Self {
            id,
            shared,
            kick_pending: Arc::new(AtomicBool::new(false)),
        }
    }

    fn refused(&self, call: &'static str, errno: Errno, rule: &'static str) -> VcpuError {
        VcpuError::Refused {
            vcpu: self.id,
            refusal: Refusal::new(call, errno, rule),
        }
    }
}

impl vmsa_host::Vcpu for SimVcpu {
    type Kick = SimKick;

    fn id(&self) -> u32 {
        self.id
    }

    fn set_state(&mut self, vmsa: &SevEsSaveArea) -> Result<(), VcpuError> {
        self.shared
            .kernel()
            .set_registers(VcpuId(self.id), vmsa)
            .map_err(|e| match super::rules::from_core("KVM_SET_REGS", e) {
                vmsa_host::VmError::Refused(refusal) => VcpuError::Refused {
                    vcpu: self.id,
                    refusal,
                },
                vmsa_host::VmError::Host { call, source } => VcpuError::Host {
                    vcpu: self.id,
                    call,
                    source,
                },
            })
    }

    fn run(&mut self) -> Result<VcpuExit, VcpuError> {
        let shared = &self.shared;
        let mut g = shared.guest();
        loop {
            if let Some(e) = g.cpus.take_failure(self.id) {
                // KVM_RUN of a vCPU whose VMRUN failed (KVM_EXIT_FAIL_ENTRY), or whose host did.
                return Err(VcpuError::host(self.id, "KVM_RUN", e));
            }
            if shared.kernel().is_bugged() {
                // kvm_vm_bugged: every vCPU gets KVM_REQ_VM_DEAD, and KVM_RUN fails with EIO.
                return Err(self.refused(
                    "KVM_RUN",
                    Errno::EIO,
                    "the VM is bugged (a page was leaked): only teardown is allowed",
                ));
            }
            if g.kicked.remove(&self.id) {
                self.kick_pending.store(false, Ordering::SeqCst);
                return Ok(VcpuExit::Interrupted);
            }
            if g.pending.as_ref().is_some_and(|p| p.vcpu == self.id) {
                return Err(self.refused(
                    "KVM_RUN",
                    Errno::EINVAL,
                    "the last exit was KVM_HC_MAP_GPA_RANGE; answer it with complete_conversion first",
                ));
            }
            let action = if g.pending.is_some() {
                None
            } else {
                g.script.actions.get(g.next).cloned().map(|a| (g.next, a))
            };
            match action {
                Some((index, a)) if a.vcpu() == self.id || !g.vcpus.contains(&a.vcpu()) => {
                    // The page this action last faulted at, if it did: only a fault there
                    // again is the guest's error (each page of a multi-page access exits once).
                    let faulted = g.faulted.and_then(|(i, gpa)| (i == index).then_some(gpa));
                    let acted = {
                        let kernel = shared.kernel();
                        g.cpus.step(&kernel, index, &a, faulted, Some(&self.kick_pending))
                    };
                    if let Acted::Interrupted = acted {
                        // The kick is taken (under the guest lock, so its kicker, waiting for
                        // it, adds nothing); the action resumes where it stopped.
                        self.kick_pending.store(false, Ordering::SeqCst);
                        g.kicked.remove(&self.id);
                        return Ok(VcpuExit::Interrupted);
                    }
                    if let Acted::Fault(range) = acted {
                        // The action resumes at this page once the VMM has converted it.
                        g.faulted = Some((index, range.gpa));
                        return Ok(VcpuExit::MemoryFault(range));
                    }
                    g.next += 1;
                    g.faulted = None;
                    shared.wake_next(&g);
                    match acted {
                        Acted::Convert(range) => {
                            g.pending = Some(Pending {
                                vcpu: self.id,
                                index,
                                action: a,
                                range,
                                result: None,
                            });
                            return Ok(VcpuExit::MapGpaRange(range));
                        }
                        Acted::Terminate {
                            reason_set,
                            reason_code,
                        } => {
                            return Ok(VcpuExit::Terminate {
                                reason: Some(vmsa_host::TermReason {
                                    set: reason_set,
                                    code: reason_code,
                                }),
                            });
                        }
                        Acted::Shutdown => return Ok(VcpuExit::Shutdown),
                        Acted::Done if matches!(a, GuestAction::Hlt { vcpu } if vcpu == self.id) => {
                            return Ok(VcpuExit::Halt);
                        }
                        Acted::Done | Acted::Fault(_) | Acted::Interrupted => {}
                    }
                }
                // The script is exhausted: the BSP says so on the done port.
                None if g.pending.is_none() && self.id == 0 && !g.done_reported => {
                    g.done_reported = true;
                    return Ok(VcpuExit::IoOut {
                        port: vmsa_host::ports::DONE,
                        data: 0,
                        size: 1,
                    });
                }
                _ => {
                    g = shared.wakes[self.id as usize]
                        .wait(g)
                        .unwrap_or_else(|p| p.into_inner())
                }
            }
        }
    }

    fn complete_conversion(&mut self, answer: Result<(), Errno>) -> Result<(), VcpuError> {
        let mut g = self.shared.guest();
        let Some(pending) = g.pending.take_if(|p| p.vcpu == self.id) else {
            return Err(self.refused(
                "KVM_RUN",
                Errno::EINVAL,
                "no KVM_HC_MAP_GPA_RANGE exit is waiting for an answer on this vCPU",
            ));
        };
        let (index, action) = (pending.index, pending.action.clone());
        let outcome = pending.outcome(answer);
        g.cpus.record(index, &action, outcome);
        self.shared.wake_next(&g);
        Ok(())
    }

    fn kicker(&self) -> SimKick {
        SimKick {
            id: self.id,
            shared: self.shared.clone(),
            kick_pending: self.kick_pending.clone(),
        }
    }
}
