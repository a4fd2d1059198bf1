//! Per-vCPU VMSA ownership histories, leaks and warnings, read from vmsa-core's event stream.

use std::collections::BTreeMap;

use serde::Serialize;
use vmsa_core::{Event, LeakReason, Op, Pfn, StateKind, VcpuId};

/// One change of a vCPU's VMSA owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    /// What caused it.
    pub op: Op,
    /// The state before.
    pub from: String,
    /// The state after.
    pub to: String,
}

/// The ownership history of one vCPU's VMSA.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VcpuHistory {
    /// The vCPU.
    pub vcpu: VcpuId,
    /// Every change, in order.
    pub steps: Vec<Step>,
    /// The state names it went through, starting at `None` (for quick reading and tests).
    pub path: Vec<StateKind>,
}

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
    /// Fold an event stream into histories.
    pub fn from_events(events: &[Event]) -> Self {
        let mut by_vcpu: BTreeMap<VcpuId, VcpuHistory> = BTreeMap::new();
        let mut out = Ledger::default();
        for e in events {
            match e {
                Event::Transition { vcpu, op, from, to } => {
                    let h = by_vcpu.entry(*vcpu).or_insert_with(|| VcpuHistory {
                        vcpu: *vcpu,
                        steps: Vec::new(),
                        path: vec![from.kind()],
                    });
                    h.steps.push(Step {
                        op: *op,
                        from: from.to_string(),
                        to: to.to_string(),
                    });
                    if h.path.last() != Some(&to.kind()) {
                        h.path.push(to.kind());
                    }
                }
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
                Event::VmcbVmsaPa { .. } => {}
            }
        }
        out.vcpus = by_vcpu.into_values().collect();
        out
    }

    /// The history of one vCPU.
    pub fn vcpu(&self, id: VcpuId) -> Option<&VcpuHistory> {
        self.vcpus.iter().find(|h| h.vcpu == id)
    }
}

/// A short rendering of a state path, e.g. `None → KvmShared → KvmPrivate → GuestOwned → None`.
pub fn render_path(path: &[StateKind]) -> String {
    path.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" → ")
}

/// A history with the cause of every change, e.g.
/// `None -Alloc-> KvmShared -MakePrivate-> KvmPrivate -Reclaim-> None`.
pub fn render_steps(steps: &[Step]) -> String {
    let mut out = String::new();
    for (i, s) in steps.iter().enumerate() {
        if i == 0 {
            out.push_str(short(&s.from));
        }
        out.push_str(&format!(" -{}-> {}", s.op, short(&s.to)));
    }
    out
}

/// The state's name without its address.
fn short(state: &str) -> &str {
    state.split('(').next().unwrap_or(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmsa_core::{Gpa, VmsaState};

    #[test]
    fn folds_transitions_into_paths() {
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
            Event::Transition {
                vcpu: v,
                op: Op::Reload,
                from: VmsaState::GuestOwned(Gpa(0x3000)),
                to: VmsaState::GuestOwned(Gpa(0x3000)),
            },
            Event::Leaked {
                vcpu: Some(v),
                pfn: Pfn(9),
                reason: LeakReason::ReclaimFailed,
                detail: "x".into(),
            },
        ];
        let l = Ledger::from_events(&events);
        let h = l.vcpu(v).unwrap();
        assert_eq!(h.steps.len(), 4);
        assert_eq!(h.steps[2].to, "GuestOwned(gpa 0x3000)");
        assert_eq!(
            h.path,
            vec![
                StateKind::None,
                StateKind::KvmShared,
                StateKind::None,
                StateKind::GuestOwned
            ]
        );
        assert_eq!(render_path(&h.path), "None → KvmShared → None → GuestOwned");
        assert_eq!(
            render_steps(&h.steps),
            "None -Alloc-> KvmShared -SetGuestVmsa-> None -SetGuestVmsa-> GuestOwned -Reload-> GuestOwned"
        );
        assert_eq!(l.leaks.len(), 1);
        assert!(l.vcpu(VcpuId(0)).is_none());
    }
}
