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

    /// Both values combined with `f` if both were seen, else the first reason either is hidden.
    pub fn zip_with<U>(self, other: Self, f: impl FnOnce(T, T) -> U) -> Observed<U> {
        match (self, other) {
            (Self::Seen(a), Self::Seen(b)) => Observed::Seen(f(a, b)),
            (Self::Hidden { hidden }, _) | (_, Self::Hidden { hidden }) => Observed::Hidden { hidden },
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
    /// What the host kernel dumped of vCPUs whose VMRUN failed.
    pub vmcb_dumps: Vec<VmcbDump>,
}

/// What KVM's `dump_vmcb` (arch/x86/kvm/svm/svm.c) logs for a vCPU whose VMRUN failed
/// (`SVM_EXIT_ERR`, reported as `KVM_EXIT_FAIL_ENTRY`) when `kvm_amd.dump_invalid_vmcb` is set:
/// for an SEV-ES or SNP guest the save area comes from `sev_decrypt_vmsa`, which reads a VMSA
/// not yet encrypted as it is, decrypts an encrypted one with `SNP_DBG_DECRYPT` /
/// `DBG_DECRYPT` if the guest policy allows debugging, and gives none otherwise.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VmcbDump {
    /// The vCPU.
    pub vcpu: u32,
    /// The save area's registers that say where the vCPU was (`dump_vmcb` prints them all).
    pub save_area: Option<DumpedSaveArea>,
    /// Why there is no save area (`sev_decrypt_vmsa` returned none).
    pub unavailable: Option<String>,
}

/// A few registers of a dumped save area.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DumpedSaveArea {
    /// RIP.
    pub rip: u64,
    /// RSP.
    pub rsp: u64,
    /// EFER.
    pub efer: u64,
    /// SEV_FEATURES.
    pub sev_features: u64,
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

impl HostReport {
    /// The account of two VMs one guest lived in (an intra-host migration): `first` torn down
    /// before `last`. Events follow each other, per-VM counts add up, and what describes the
    /// host as a whole (RMP faults, frames still allocated or leaked) is `last`'s, taken after
    /// both teardowns. The launch digest is the first one either reports (the context that
    /// moved holds it); the guest's activity is `last`'s, where it ran.
    pub fn merged(first: HostReport, last: HostReport) -> HostReport {
        let (f, l) = (first.teardown, last.teardown);
        let launch_digest = match (first.launch_digest, last.launch_digest) {
            (Observed::Seen(Some(d)), _) | (_, Observed::Seen(Some(d))) => Observed::Seen(Some(d)),
            (_, l) => l,
        };
        HostReport {
            events: first.events.zip_with(last.events, |mut a, b| {
                a.extend(b);
                a
            }),
            launch_digest,
            rmp_faults: last.rmp_faults,
            guest: last.guest,
            teardown: TeardownCounts {
                vcpus: f.vcpus + l.vcpus,
                vmsas_leaked: f.vmsas_leaked.zip_with(l.vmsas_leaked, |a, b| a + b),
                guest_frames_released: f
                    .guest_frames_released
                    .zip_with(l.guest_frames_released, |a, b| a + b),
                guest_frames_leaked: f
                    .guest_frames_leaked
                    .zip_with(l.guest_frames_leaked, |a, b| a + b),
                frames_still_allocated: l.frames_still_allocated,
                frames_leaked_on_purpose: l.frames_leaked_on_purpose,
                error: match (f.error, l.error) {
                    (Some(a), Some(b)) => Some(format!("{a}; {b}")),
                    (a, b) => a.or(b),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_migrated_guests_reports_add_up_and_the_host_is_the_last_ones() {
        let counts = |vcpus, leaked: u64, left: u64| TeardownCounts {
            vcpus,
            vmsas_leaked: Observed::Seen(leaked as usize),
            guest_frames_released: Observed::Seen(10),
            guest_frames_leaked: Observed::Seen(leaked),
            frames_still_allocated: Observed::Seen(left),
            frames_leaked_on_purpose: Observed::Seen(leaked * 5),
            error: None,
        };
        let report = |digest: Option<&str>, t| HostReport {
            events: Observed::Seen(Vec::new()),
            launch_digest: Observed::Seen(digest.map(str::to_owned)),
            rmp_faults: Observed::Seen(t),
            guest: Observed::Seen(GuestActivity::default()),
            teardown: counts(2, t, t),
        };
        let m = HostReport::merged(report(None, 1), report(Some("ab"), 2));
        assert_eq!(m.launch_digest, Observed::Seen(Some("ab".into())));
        assert_eq!(
            m.rmp_faults,
            Observed::Seen(2),
            "the host's count is the last report's"
        );
        let t = m.teardown;
        assert_eq!(
            (t.vcpus, t.vmsas_leaked, t.guest_frames_leaked),
            (4, Observed::Seen(3), Observed::Seen(3))
        );
        assert_eq!(t.guest_frames_released, Observed::Seen(20));
        assert_eq!(
            (t.frames_still_allocated, t.frames_leaked_on_purpose),
            (Observed::Seen(2), Observed::Seen(10))
        );
        let hidden: Observed<u64> = Observed::hidden("no");
        assert_eq!(
            hidden.zip_with(Observed::Seen(1), |a, b| a + b),
            Observed::hidden("no")
        );
    }

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
