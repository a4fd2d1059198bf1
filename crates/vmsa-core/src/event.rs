//! Leaks, warnings and transitions as values.
//!
//! The kernel reports a leaked page with `pr_err`/`snp_leak_pages` and an invariant break with
//! `WARN_ON_ONCE`; vmsa-core reports both as [`Event`]s into an [`EventSink`] the embedder
//! chooses, so tests and VMMs can count them instead of scraping logs.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use crate::sync::{Guard, Lock, lock};

use crate::addr::{Gpa, Hpa, Pfn};
use crate::state::{Op, StateKind, VcpuId, VmsaState};

/// Why a page was taken out of circulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum LeakReason {
    /// `RMPUPDATE` back to hypervisor-owned failed while freeing a private VMSA.
    MakeSharedFailed,
    /// `SNP_PAGE_RECLAIM` failed after a failed SNP launch of the VMSA.
    ReclaimFailed,
    /// `SNP_PAGE_RECLAIM` succeeded but the `RMPUPDATE` back to hypervisor-owned failed.
    ReclaimMakeSharedFailed,
}

/// Something vmsa-core did or noticed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(tag = "event"))]
pub enum Event {
    /// A vCPU's VMSA changed owner.
    Transition {
        /// The vCPU.
        vcpu: VcpuId,
        /// What caused it.
        op: Op,
        /// The state before.
        from: VmsaState<Pfn>,
        /// The state after.
        to: VmsaState<Pfn>,
    },
    /// A page was deliberately leaked: its RMP state could not be restored, so it must never be
    /// reused.
    Leaked {
        /// The vCPU whose VMSA it was (`None` for a guest page refused during launch).
        vcpu: Option<VcpuId>,
        /// The frame.
        pfn: Pfn,
        /// The step that failed.
        reason: LeakReason,
        /// The platform's error message.
        detail: String,
    },
    /// An internal invariant broke (the kernel's `WARN_ON_ONCE`); the call returned a typed error.
    Warn {
        /// The vCPU concerned, if any.
        vcpu: Option<VcpuId>,
        /// The operation that was attempted.
        op: Op,
        /// The state it found.
        state: StateKind,
        /// What was wrong.
        message: String,
    },
    /// A 2 MiB-aligned page was refused for a VMSA (AMD erratum 1467) and another one taken.
    Erratum1467Avoided {
        /// The vCPU.
        vcpu: VcpuId,
        /// The refused frame.
        refused: Pfn,
    },
    /// The address the VMCB points at for this vCPU changed (`vmcb->control.vmsa_pa`).
    VmcbVmsaPa {
        /// The vCPU.
        vcpu: VcpuId,
        /// The new address; `None` is `INVALID_PAGE`.
        pa: Option<Hpa>,
    },
    /// An AP-creation request was accepted for a target vCPU.
    ApRequest {
        /// The vCPU that asked.
        requester: VcpuId,
        /// The vCPU it targets.
        target: VcpuId,
        /// The requested VMSA (`None` for AP_DESTROY).
        gpa: Option<Gpa>,
        /// The raw request type (0 CREATE_ON_INIT, 1 CREATE, 2 DESTROY).
        request: u32,
    },
}

/// One change of a vCPU's VMSA owner (a [`Event::Transition`] without the vCPU).
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Transition {
    /// What caused it.
    pub op: Op,
    /// The state before.
    pub from: VmsaState<Pfn>,
    /// The state after.
    pub to: VmsaState<Pfn>,
}

/// The ownership history of one vCPU's VMSA.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct History {
    /// The vCPU.
    pub vcpu: VcpuId,
    /// Its transitions, in order.
    pub transitions: Vec<Transition>,
}

impl History {
    /// The states the VMSA went through, starting where the first transition started
    /// (consecutive repeats, such as a reload, counted once).
    pub fn path(&self) -> Vec<StateKind> {
        let mut path: Vec<StateKind> = self
            .transitions
            .first()
            .map(|t| t.from.kind())
            .into_iter()
            .collect();
        for t in &self.transitions {
            if path.last() != Some(&t.to.kind()) {
                path.push(t.to.kind());
            }
        }
        path
    }
}

/// Every vCPU's ownership history in an event stream, ordered by vCPU id.
pub fn histories(events: &[Event]) -> Vec<History> {
    let mut by_vcpu: BTreeMap<VcpuId, Vec<Transition>> = BTreeMap::new();
    for e in events {
        if let Event::Transition { vcpu, op, from, to } = e {
            by_vcpu.entry(*vcpu).or_default().push(Transition {
                op: *op,
                from: from.clone(),
                to: to.clone(),
            });
        }
    }
    by_vcpu
        .into_iter()
        .map(|(vcpu, transitions)| History { vcpu, transitions })
        .collect()
}

/// Where vmsa-core sends its [`Event`]s. Implementations must be cheap and must not call back
/// into the VM.
pub trait EventSink: Send + Sync {
    /// Record one event.
    fn emit(&self, event: Event);
}

/// A sink that drops everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl EventSink for NullSink {
    fn emit(&self, _event: Event) {}
}

/// A sink that keeps every event in memory, in order.
#[derive(Debug, Default)]
pub struct EventLog {
    events: Lock<Vec<Event>>,
}

impl EventLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of every event so far.
    pub fn snapshot(&self) -> Vec<Event> {
        self.lock().clone()
    }

    /// Remove and return every event so far.
    pub fn drain(&self) -> Vec<Event> {
        core::mem::take(&mut *self.lock())
    }

    /// The `Leaked` events so far.
    pub fn leaks(&self) -> Vec<Event> {
        self.filtered(|e| matches!(e, Event::Leaked { .. }))
    }

    /// The `Warn` events so far.
    pub fn warnings(&self) -> Vec<Event> {
        self.filtered(|e| matches!(e, Event::Warn { .. }))
    }

    fn filtered(&self, keep: impl Fn(&Event) -> bool) -> Vec<Event> {
        self.lock().iter().filter(|e| keep(e)).cloned().collect()
    }

    fn lock(&self) -> Guard<'_, Vec<Event>> {
        lock(&self.events)
    }
}

impl EventSink for EventLog {
    fn emit(&self, event: Event) {
        self.lock().push(event);
    }
}

impl<T: EventSink + ?Sized> EventSink for alloc::sync::Arc<T> {
    fn emit(&self, event: Event) {
        (**self).emit(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::Gpa;
    use std::vec::Vec;

    #[test]
    fn log_keeps_order_and_filters() {
        let log = EventLog::new();
        log.emit(Event::Erratum1467Avoided {
            vcpu: VcpuId(0),
            refused: Pfn(512),
        });
        log.emit(Event::Leaked {
            vcpu: Some(VcpuId(1)),
            pfn: Pfn(3),
            reason: LeakReason::ReclaimFailed,
            detail: "fw 0x1a".into(),
        });
        log.emit(Event::Warn {
            vcpu: None,
            op: Op::Free,
            state: StateKind::None,
            message: "x".into(),
        });
        assert_eq!(log.snapshot().len(), 3);
        assert_eq!(log.leaks().len(), 1);
        assert_eq!(log.warnings().len(), 1);
        assert_eq!(log.drain().len(), 3);
        assert!(log.snapshot().is_empty());
        NullSink.emit(Event::VmcbVmsaPa {
            vcpu: VcpuId(0),
            pa: None,
        });
    }

    #[test]
    fn histories_group_transitions_by_vcpu_in_order() {
        let t = |vcpu, op, from, to| Event::Transition {
            vcpu: VcpuId(vcpu),
            op,
            from,
            to,
        };
        let g = VmsaState::GuestOwned(Gpa(0x3000));
        let events = [
            t(1, Op::Alloc, VmsaState::None, VmsaState::KvmShared(Pfn(5))),
            t(0, Op::Alloc, VmsaState::None, VmsaState::KvmShared(Pfn(4))),
            t(1, Op::SetGuestVmsa, VmsaState::KvmShared(Pfn(5)), VmsaState::None),
            t(1, Op::SetGuestVmsa, VmsaState::None, g.clone()),
            t(1, Op::Reload, g.clone(), g),
        ];
        let h = histories(&events);
        assert_eq!(
            h.iter().map(|h| h.vcpu).collect::<Vec<_>>(),
            [VcpuId(0), VcpuId(1)]
        );
        assert_eq!(h[1].transitions.len(), 4);
        assert_eq!(h[1].transitions[3].op, Op::Reload);
        assert_eq!(
            h[1].path(),
            [
                StateKind::None,
                StateKind::KvmShared,
                StateKind::None,
                StateKind::GuestOwned
            ]
        );
    }
}
