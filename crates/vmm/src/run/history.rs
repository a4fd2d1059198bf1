//! Per-vCPU VMSA ownership histories, leaks and warnings, read from vmsa-core's event stream.

use serde::Serialize;
use vmsa_core::{Event, History, LeakReason, Op, Pfn, StateKind, VcpuId};

/// A page leaked on purpose, with why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LeakRecord {
    /// The vCPU whose VMSA it was (none for a guest page refused during launch).
    pub vcpu: Option<VcpuId>,
    /// The frame.
    pub pfn: Pfn,
    /// The step that failed.
    pub reason: LeakReason,
    /// The platform's message.
    pub detail: String,
}

/// A warning (an invariant break vmsa-core refused, the kernel's `WARN_ON_ONCE`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WarnRecord {
    /// The vCPU concerned.
    pub vcpu: Option<VcpuId>,
    /// The operation.
    pub op: Op,
    /// What was wrong.
    pub message: String,
}

/// A vCPU's history as reported: vmsa-core's transitions and the states they went through.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VcpuHistory {
    /// The vCPU and its transitions.
    #[serde(flatten)]
    pub history: History,
    /// The states its VMSA went through.
    pub path: Vec<StateKind>,
}

/// Everything the VMM reports from the event stream.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Ledger {
    /// One history per vCPU that had any transition, by vCPU id.
    pub vcpus: Vec<VcpuHistory>,
    /// Pages leaked on purpose.
    pub leaks: Vec<LeakRecord>,
    /// Warnings.
    pub warnings: Vec<WarnRecord>,
    /// 2 MiB-aligned pages refused for a VMSA (AMD erratum 1467).
    pub erratum_1467_refusals: usize,
    /// AP-creation requests accepted.
    pub ap_requests: usize,
}

impl Ledger {
    /// Fold an event stream into histories and counts.
    pub fn from_events(events: &[Event]) -> Self {
        let mut out = Self::with_histories(vmsa_core::histories(events));
        for e in events {
            match e {
                Event::Leaked {
                    vcpu,
                    pfn,
                    reason,
                    detail,
                } => out.leaks.push(LeakRecord {
                    vcpu: *vcpu,
                    pfn: *pfn,
                    reason: *reason,
                    detail: detail.clone(),
                }),
                Event::Warn {
                    vcpu, op, message, ..
                } => out.warnings.push(WarnRecord {
                    vcpu: *vcpu,
                    op: *op,
                    message: message.clone(),
                }),
                Event::Erratum1467Avoided { .. } => out.erratum_1467_refusals += 1,
                Event::ApRequest { .. } => out.ap_requests += 1,
                Event::Transition { .. } | Event::VmcbVmsaPa { .. } => {}
            }
        }
        out
    }

    /// A ledger of histories only (a backend that reports them already folded).
    pub fn with_histories(histories: Vec<History>) -> Self {
        Self {
            vcpus: histories
                .into_iter()
                .map(|history| VcpuHistory {
                    path: history.path(),
                    history,
                })
                .collect(),
            ..Self::default()
        }
    }

    /// The history of one vCPU.
    pub fn vcpu(&self, id: VcpuId) -> Option<&VcpuHistory> {
        self.vcpus.iter().find(|h| h.history.vcpu == id)
    }
}

/// A history with the cause of every change, e.g.
/// `None -Alloc-> KvmShared -MakePrivate-> KvmPrivate -Reclaim-> None`.
pub fn render(h: &History) -> String {
    let mut out = String::new();
    for (i, t) in h.transitions.iter().enumerate() {
        if i == 0 {
            out.push_str(&t.from.kind().to_string());
        }
        out.push_str(&format!(" -{}-> {}", t.op, t.to.kind()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmsa_core::{Gpa, VmsaState};

    #[test]
    fn folds_transitions_leaks_and_counts() {
        let v = VcpuId(1);
        let events = vec![
            Event::Transition {
                vcpu: v,
                op: Op::Alloc,
                from: VmsaState::None,
                to: VmsaState::KvmShared(Pfn(5)),
            },
            Event::Transition {
                vcpu: v,
                op: Op::SetGuestVmsa,
                from: VmsaState::KvmShared(Pfn(5)),
                to: VmsaState::None,
            },
            Event::Transition {
                vcpu: v,
                op: Op::SetGuestVmsa,
                from: VmsaState::None,
                to: VmsaState::GuestOwned(Gpa(0x3000)),
            },
            Event::Leaked {
                vcpu: Some(v),
                pfn: Pfn(9),
                reason: LeakReason::ReclaimFailed,
                detail: "x".into(),
            },
            Event::Erratum1467Avoided {
                vcpu: v,
                refused: Pfn(512),
            },
        ];
        let l = Ledger::from_events(&events);
        let h = l.vcpu(v).unwrap();
        assert_eq!(h.history.transitions.len(), 3);
        assert_eq!(
            h.path,
            [
                StateKind::None,
                StateKind::KvmShared,
                StateKind::None,
                StateKind::GuestOwned
            ]
        );
        assert_eq!(
            render(&h.history),
            "None -Alloc-> KvmShared -SetGuestVmsa-> None -SetGuestVmsa-> GuestOwned"
        );
        assert_eq!((l.leaks.len(), l.erratum_1467_refusals), (1, 1));
        assert!(l.vcpu(VcpuId(0)).is_none());
    }
}
