//! A call the host refused because it breaks one of KVM's rules.

use serde::Serialize;
use vmsa_core::VmKind;

use crate::errno::Errno;

/// A call refused the way KVM refuses it: the call, the rule, and KVM's errno, as one line
/// ("KVM_SEV_SNP_LAUNCH_UPDATE: a supplied VMSA is exactly one 4 KiB page (snp_launch_update)
/// (EINVAL (22): Invalid argument)").
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

/// The rule a refused supplied VMSA broke, with the function that enforces it (the series' 4/4
/// "kvm: svm: Support KVM_SEV_SNP_PAGE_TYPE_VMSA at SNP_LAUNCH_UPDATE" extends
/// `snp_launch_update`; the address and SEV_FEATURES rules are `sev_snp_ap_creation`'s).
pub fn supplied_vmsa_rule(e: &vmsa_core::SuppliedVmsaError) -> &'static str {
    use vmsa_core::SuppliedVmsaError as S;
    match e {
        S::NotEnabled { .. } => {
            "type 2 (VMSA) is rejected: this VM was created without supplied VMSAs, KVM launches the VMSAs itself at launch finish (snp_launch_update)"
        }
        S::SevEs { .. } => "an SEV-ES VM has no SNP page types; its VMSAs are KVM's (sev_launch_update_data)",
        S::NotOnePage { .. } => "a supplied VMSA is exactly one 4 KiB page (snp_launch_update)",
        S::Erratum1467 { .. } => {
            "a VMSA may not sit on a 2 MiB-aligned GPA (AMD erratum 1467; sev_snp_ap_creation's rule)"
        }
        S::BeyondMaxPhys { .. } => {
            "the VMSA GPA lies beyond the guest's MAXPHYADDR (page_address_valid, as in sev_snp_ap_creation)"
        }
        S::FeatureMismatch { .. } => {
            "the VMSA's SEV_FEATURES differ from the VM's vmsa_features (sev_snp_ap_creation's rule)"
        }
        S::NoBsp { .. } => "no vCPU exists yet: the BSP (first vCPU) owns the supplied VMSA",
        S::Duplicate { .. } => "the BSP has its supplied VMSA already; one VMSA is supplied per launch",
        S::AfterLaunchFinish { .. } => {
            "the launch is finished: no VMSA page after SNP_LAUNCH_FINISH (snp_launch_update)"
        }
        S::MissingBspVmsa { .. } => {
            "launch finish without the BSP's supplied VMSA: the BSP would have nothing to run (snp_launch_finish)"
        }
    }
}

/// The rule a refused intra-host migration (`KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM`) broke, with
/// the function that enforces it (arch/x86/kvm/svm/sev.c).
fn migration_rule(e: &vmsa_core::MigrationError) -> &'static str {
    use vmsa_core::MigrationError as M;
    match e {
        M::DestinationIsConfidential { .. } => {
            "the destination is an SEV guest already: it must be created without KVM_SEV_INIT2 (sev_vm_move_enc_context_from)"
        }
        M::SourceNotConfidential => "the source is not an SEV guest (sev_vm_move_enc_context_from)",
        M::SourceIsSnp => "an SEV-SNP source cannot move its context (sev_vm_move_enc_context_from)",
        M::VcpuCountMismatch { .. } => {
            "the destination must have as many vCPUs as the source (sev_check_source_vcpus)"
        }
        M::SourceNotLaunched { .. } => {
            "every source vCPU's VMSA must be encrypted (guest_state_protected, sev_check_source_vcpus)"
        }
    }
}

impl Refusal {
    /// `call` refused with `errno` because it broke `rule`.
    pub const fn new(call: &'static str, errno: Errno, rule: &'static str) -> Self {
        Self { call, errno, rule }
    }

    /// KVM's refusal of `call` for a vmsa-core error, when the error is one of KVM's rules
    /// (a host that runs vmsa-core as its kernel answers the VMM as KVM would); `None` when the
    /// error is the host's own failure.
    pub fn from_core<E: std::error::Error + Send + Sync + 'static>(
        call: &'static str,
        e: &vmsa_core::Error<E>,
    ) -> Option<Self> {
        use vmsa_core::{Error as E2, LaunchState as L};
        let r = |errno, rule| Some(Self::new(call, errno, rule));
        let snp_call = call.starts_with("KVM_SEV_SNP_");
        match e {
            // sev_launch_update_data, sev_launch_update_vmsa, sev_launch_finish check nothing
            // and hand the firmware the VM's handle, 0 before LAUNCH_START: the firmware knows
            // no such guest, and KVM returns its error as EIO.
            E2::Launch {
                state: L::NotStarted, ..
            } if !snp_call => r(
                Errno::EIO,
                "the launch has not started: the firmware knows no guest by the VM's handle before LAUNCH_START (sev_launch_update_data, sev_launch_update_vmsa, sev_launch_finish)",
            ),
            // sev_launch_start checks nothing either: the firmware makes a second guest context,
            // whose ACTIVATE of the VM's ASID it refuses (ASID_OWNED: the first context holds
            // it; amd/AMD-ASPFW mcmd_activate_common), and KVM returns that as EIO.
            E2::Launch { .. } if call == "KVM_SEV_LAUNCH_START" => r(
                Errno::EIO,
                "the launch was already started: the firmware refuses to ACTIVATE the VM's ASID for a second guest context (ASID_OWNED; sev_launch_start, sev_bind_asid)",
            ),
            // snp_launch_update / snp_launch_finish: no snp_context before SNP_LAUNCH_START.
            E2::Launch {
                state: L::NotStarted, ..
            } => r(
                Errno::EINVAL,
                "the launch has not started: no SNP context before SNP_LAUNCH_START (snp_launch_update, snp_launch_finish)",
            ),
            // snp_launch_start: the SNP context exists already.
            E2::Launch { .. } if call == "KVM_SEV_SNP_LAUNCH_START" => r(
                Errno::EINVAL,
                "the launch was already started: the SNP context exists (snp_launch_start)",
            ),
            E2::Launch {
                state: L::Finished, ..
            } => r(
                Errno::EINVAL,
                "the launch is finished: every VMSA is protected (sev_es_sync_vmsa, snp_launch_update)",
            ),
            E2::Launch { .. } => r(Errno::EINVAL, "an earlier launch step failed"),
            E2::BadPolicy { rule, .. } => r(Errno::EINVAL, rule),
            E2::BadLaunchUpdate { rule, .. } => r(Errno::EINVAL, rule),
            E2::NoGuestMemory { .. } => r(
                Errno::EINVAL,
                "the GFN is not in a memslot with guest_memfd (snp_launch_update)",
            ),
            // sev_mem_enc_ioctl: an SNP VM refuses every id below KVM_SEV_SNP_LAUNCH_START.
            E2::WrongKind {
                needed: VmKind::SevEs,
                kind: VmKind::Snp,
                ..
            } => r(
                Errno::EPERM,
                "an SNP VM refuses SEV commands below KVM_SEV_SNP_LAUNCH_START (sev_mem_enc_ioctl)",
            ),
            E2::WrongKind { .. } => r(Errno::ENOTTY, "the command is not for this kind of VM"),
            // kvm_arch_vcpu_ioctl_set_regs: protected guest state cannot be written.
            E2::AlreadyProtected { .. } => r(
                Errno::EINVAL,
                "the vCPU's guest state is protected (kvm_arch_vcpu_ioctl_set_regs)",
            ),
            E2::GuestDebug { .. } | E2::Dr7 { .. } => r(
                Errno::EINVAL,
                "a VMSA cannot be launched with guest debugging or DR7 breakpoints (sev_es_sync_vmsa)",
            ),
            // kvm_vm_ioctl_create_vcpu: the id is taken.
            E2::VcpuExists(_) => r(
                Errno::EEXIST,
                "a vCPU with this id exists (kvm_vm_ioctl_create_vcpu)",
            ),
            E2::SuppliedVmsa(s) => r(Errno::EINVAL, supplied_vmsa_rule(s)),
            E2::VmBugged { .. } | E2::VmDead => r(Errno::EIO, "the VM is bugged or dead (KVM_BUG_ON)"),
            // sev_vm_move_enc_context_from: every rule it checks answers -EINVAL.
            E2::Migration(m) => r(Errno::EINVAL, migration_rule(m)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sev_es_launch_calls_out_of_order_are_the_firmwares_refusals() {
        use vmsa_core::{Error, LaunchState};
        let launch = |state| Error::<std::io::Error>::Launch {
            op: "launch start",
            state,
        };
        let again = Refusal::from_core("KVM_SEV_LAUNCH_START", &launch(LaunchState::Started)).unwrap();
        assert_eq!(again.errno, Errno::EIO);
        assert!(again.rule.contains("ASID_OWNED"), "{again}");
        let early =
            Refusal::from_core("KVM_SEV_LAUNCH_UPDATE_DATA", &launch(LaunchState::NotStarted)).unwrap();
        assert_eq!(early.errno, Errno::EIO);
        assert!(!early.rule.contains("SNP"), "{early}");
        // SNP keeps KVM's own checks: snp_launch_start and snp_launch_update answer EINVAL.
        for (call, state) in [
            ("KVM_SEV_SNP_LAUNCH_START", LaunchState::Started),
            ("KVM_SEV_SNP_LAUNCH_UPDATE", LaunchState::NotStarted),
        ] {
            let r = Refusal::from_core(call, &launch(state)).unwrap();
            assert_eq!(r.errno, Errno::EINVAL, "{r}");
        }
    }

    #[test]
    fn a_refusal_reads_as_its_doc_says() {
        let r = Refusal {
            call: "KVM_SEV_SNP_LAUNCH_UPDATE",
            errno: Errno::EINVAL,
            rule: "a supplied VMSA is exactly one 4 KiB page (snp_launch_update)",
        };
        assert_eq!(
            r.to_string(),
            "KVM_SEV_SNP_LAUNCH_UPDATE: a supplied VMSA is exactly one 4 KiB page (snp_launch_update) (EINVAL (22): Invalid argument)"
        );
    }
}
