//! What a host reports when its VM is torn down: the same shape from every host, with what a
//! host cannot observe marked as such.

use serde::Serialize;
use vmsa_core::Event;

/// A value the host observed, or why it cannot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Observed<T> {
    /// What the host saw.
    Seen(T),
    /// The host cannot see this, and why.
    Hidden {
        /// Why (e.g. "the SNP kernel owns the VMSAs").
        hidden: &'static str,
    },
}

impl<T> Observed<T> {
    /// Hidden, because `why`.
    pub const fn hidden(why: &'static str) -> Self {
        Self::Hidden { hidden: why }
    }

    /// The value, if seen.
    pub fn seen(&self) -> Option<&T> {
        match self {
            Self::Seen(v) => Some(v),
            Self::Hidden { .. } => None,
        }
    }

    /// Why the host cannot see it, if hidden.
    pub fn why_hidden(&self) -> Option<&'static str> {
        match self {
            Self::Seen(_) => None,
            Self::Hidden { hidden } => Some(hidden),
        }
    }

    /// The value, if seen.
    pub fn into_seen(self) -> Option<T> {
        match self {
            Self::Seen(v) => Some(v),
            Self::Hidden { .. } => None,
        }
    }

    /// Map the seen value.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Observed<U> {
        match self {
            Self::Seen(v) => Observed::Seen(f(v)),
            Self::Hidden { hidden } => Observed::Hidden { hidden },
        }
    }
}

/// One guest step the host saw end (an action of a scripted guest, a request of a real one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GuestStep {
    /// Its index, in the order the guest made them.
    pub index: usize,
    /// What it was.
    pub action: String,
    /// The vCPU that made it.
    pub vcpu: u32,
    /// What the guest saw go wrong, if anything.
    pub error: Option<String>,
    /// What happened.
    pub detail: String,
}

/// What the guest did, as the host saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GuestActivity {
    /// Every guest step that ended, in order.
    pub steps: Vec<GuestStep>,
    /// VM entries from a VMSA (VMRUNs, VMSA loads).
    pub vmruns: u64,
    /// AP-creation requests the host kernel accepted.
    pub ap_requests: u64,
    /// AP-creation requests it refused (a GHCB error to the guest).
    pub ap_refused: u64,
}

impl GuestActivity {
    /// The steps that failed (the guest saw an error).
    pub fn failures(&self) -> impl Iterator<Item = &GuestStep> {
        self.steps.iter().filter(|s| s.error.is_some())
    }
}

/// What tearing the VM down did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TeardownCounts {
    /// vCPUs torn down.
    pub vcpus: usize,
    /// Host VMSA pages leaked on purpose.
    pub vmsas_leaked: Observed<usize>,
    /// Guest memory frames returned to the host.
    pub guest_frames_released: Observed<u64>,
    /// Guest memory frames that could not be returned.
    pub guest_frames_leaked: Observed<u64>,
    /// Host frames still allocated after teardown (not counting those leaked on purpose).
    pub frames_still_allocated: Observed<u64>,
    /// Host frames kept out of circulation on purpose.
    pub frames_leaked_on_purpose: Observed<u64>,
    /// Why destroying the guest failed.
    pub error: Option<String>,
}

/// A host's account of one VM, from creation to teardown.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HostReport {
    /// vmsa-core's events: every VMSA ownership transition, leak and warning.
    pub events: Observed<Vec<Event>>,
    /// The launch digest the firmware computed (hex), if the launch got that far.
    pub launch_digest: Observed<Option<String>>,
    /// Host accesses the RMP refused.
    pub rmp_faults: Observed<u64>,
    /// What the guest did.
    pub guest: Observed<GuestActivity>,
    /// What teardown did and left.
    pub teardown: TeardownCounts,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_values_say_why_in_json() {
        let v: Observed<u64> = Observed::hidden("the SNP kernel owns the VMSAs");
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"hidden":"the SNP kernel owns the VMSAs"}"#
        );
        assert_eq!(serde_json::to_string(&Observed::Seen(3u64)).unwrap(), "3");
        assert_eq!(Observed::Seen(2).map(|x| x * 2).seen(), Some(&4));
    }
}
