//! A call the host refused because it breaks one of KVM's rules.

use serde::Serialize;

use crate::errno::Errno;

/// A call refused the way KVM refuses it: the call, KVM's errno, and the rule, as one line
/// ("SNP_LAUNCH_UPDATE: EINVAL (22): ...: launch update before launch start").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{call}: {rule} ({errno})")]
pub struct Refusal {
    /// The call, by its KVM name (`"KVM_SEV_SNP_LAUNCH_UPDATE"`).
    pub call: &'static str,
    /// The errno KVM answers with.
    pub errno: Errno,
    /// The rule the call broke, and the kernel function that enforces it.
    pub rule: &'static str,
}

impl Refusal {
    /// `call` refused with `errno` because it broke `rule`.
    pub const fn new(call: &'static str, errno: Errno, rule: &'static str) -> Self {
        Self { call, errno, rule }
    }
}
