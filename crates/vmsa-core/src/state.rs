//! The ownership state of a vCPU's VMSA and the small value types around it.

use core::fmt;

use crate::addr::{Gpa, Pfn};
use crate::platform::HostPage;

/// Who owns a vCPU's VMSA, with the data each owner needs (the review's `VMSA_NONE`,
/// `VMSA_KVM_SHARED`, `VMSA_KVM_PRIVATE`, `VMSA_GUEST_OWNED`).
///
/// A guest-physical address can never sit beside a host page: each state carries only its own
/// data. `Pg` is the platform's page handle; [`VmsaState<Pfn>`] is the same state as a plain
/// value for reports and events.
#[derive(Debug, Default, PartialEq, Eq, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(tag = "state", content = "at"))]
pub enum VmsaState<Pg> {
    /// No VMSA (a SEV-only vCPU, a migration source, a destroyed AP, or after teardown).
    #[default]
    None,
    /// A host-allocated page, still hypervisor-owned (shared) in the RMP; the host may write it.
    KvmShared(Pg),
    /// A host-allocated page that is guest-private in the RMP (SNP) or encrypted by the firmware
    /// (SEV-ES); the host must not write it.
    KvmPrivate(Pg),
    /// A page the guest created and named through the GHCB AP-creation protocol.
    GuestOwned(Gpa),
}

impl<Pg: HostPage> VmsaState<Pg> {
    /// The state as a plain value (pages replaced by their frame numbers).
    pub fn snapshot(&self) -> VmsaState<Pfn> {
        match self {
            VmsaState::None => VmsaState::None,
            VmsaState::KvmShared(p) => VmsaState::KvmShared(p.pfn()),
            VmsaState::KvmPrivate(p) => VmsaState::KvmPrivate(p.pfn()),
            VmsaState::GuestOwned(g) => VmsaState::GuestOwned(*g),
        }
    }
}

impl<Pg> VmsaState<Pg> {
    /// The state's name without its data.
    pub fn kind(&self) -> StateKind {
        match self {
            VmsaState::None => StateKind::None,
            VmsaState::KvmShared(_) => StateKind::KvmShared,
            VmsaState::KvmPrivate(_) => StateKind::KvmPrivate,
            VmsaState::GuestOwned(_) => StateKind::GuestOwned,
        }
    }
}

impl fmt::Display for VmsaState<Pfn> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmsaState::None => f.write_str("None"),
            VmsaState::KvmShared(p) => write!(f, "KvmShared(pfn {p})"),
            VmsaState::KvmPrivate(p) => write!(f, "KvmPrivate(pfn {p})"),
            VmsaState::GuestOwned(g) => write!(f, "GuestOwned(gpa {g})"),
        }
    }
}

/// The name of a [`VmsaState`], without its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum StateKind {
    /// [`VmsaState::None`].
    None,
    /// [`VmsaState::KvmShared`].
    KvmShared,
    /// [`VmsaState::KvmPrivate`].
    KvmPrivate,
    /// [`VmsaState::GuestOwned`].
    GuestOwned,
}

impl fmt::Display for StateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A vCPU's identifier, which is also its APIC ID (KVM's `kvm_get_vcpu_by_id`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(transparent))]
pub struct VcpuId(pub u32);

impl fmt::Display for VcpuId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The run state of a vCPU as far as its VMSA is concerned (`KVM_MP_STATE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum MpState {
    /// May enter the guest.
    Runnable,
    /// Never started (an AP before its first INIT/SIPI or AP creation).
    Uninitialized,
    /// Waiting for an event (an AP between AP creation requests).
    Halted,
}

/// The kind of confidential guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum VmKind {
    /// SEV-ES: encrypted register state, no RMP.
    SevEs,
    /// SEV-SNP: encrypted register state and memory integrity through the RMP.
    Snp,
}

impl fmt::Display for VmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmKind::SevEs => "SEV-ES",
            VmKind::Snp => "SEV-SNP",
        })
    }
}

/// The transitions and operations vmsa-core performs, as named in events and errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum Op {
    /// Allocate the host VMSA (`sev_es_alloc_kvm_vmsa`).
    Alloc,
    /// Write the register state into the host VMSA (`sev_es_sync_vmsa`).
    Sync,
    /// Make the host VMSA private (`sev_es_make_kvm_vmsa_private`).
    MakePrivate,
    /// Hand the VMSA to the firmware (`LAUNCH_UPDATE_VMSA` / `SNP_LAUNCH_UPDATE`).
    LaunchUpdate,
    /// Free the host VMSA (`sev_es_free_kvm_vmsa`).
    Free,
    /// Reclaim the host VMSA after a failed SNP launch (`sev_snp_reclaim_kvm_vmsa`).
    Reclaim,
    /// Switch to a guest-owned VMSA (`sev_es_set_guest_vmsa`).
    SetGuestVmsa,
    /// Drop the VMSA after an AP destroy took effect.
    Destroy,
    /// Take a VMSA the VMM supplied in guest memory at launch (`SNP_LAUNCH_UPDATE` of page
    /// type VMSA, the series' patch 4/4): `None` → `GuestOwned(gpa)` for the BSP.
    Supply,
    /// Re-resolve the installed guest VMSA after its memory changed (`sev_snp_reload_vmsa`).
    Reload,
    /// Move the VMSA out of this vCPU (intra-host migration source).
    MigrateOut,
    /// Receive the VMSA of a migration source vCPU.
    MigrateIn,
    /// Read the VMSA back for debugging (`sev_decrypt_vmsa`).
    Decrypt,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[derive(Debug)]
    struct P(u64);
    impl HostPage for P {
        fn pfn(&self) -> Pfn {
            Pfn(self.0)
        }
    }

    #[test]
    fn snapshot_keeps_the_data_of_each_state() {
        assert_eq!(VmsaState::<P>::None.snapshot(), VmsaState::None);
        assert_eq!(
            VmsaState::KvmShared(P(7)).snapshot(),
            VmsaState::KvmShared(Pfn(7))
        );
        assert_eq!(
            VmsaState::KvmPrivate(P(9)).snapshot(),
            VmsaState::KvmPrivate(Pfn(9))
        );
        assert_eq!(
            VmsaState::<P>::GuestOwned(Gpa(0x5000)).snapshot(),
            VmsaState::GuestOwned(Gpa(0x5000))
        );
        assert_eq!(VmsaState::KvmPrivate(P(9)).kind(), StateKind::KvmPrivate);
        assert_eq!(
            VmsaState::<Pfn>::KvmShared(Pfn(0x10)).to_string(),
            "KvmShared(pfn 0x10)"
        );
        assert_eq!(VmsaState::<P>::default().kind(), StateKind::None);
    }
}
