//! The Linux userspace ABI this backend needs and kvm-bindings 0.14 does not bind: newer KVM
//! capabilities and guest_memfd flags, the `KVM_HC_MAP_GPA_RANGE` hypercall, the
//! `KVM_GET_DEVICE_ATTR` request number on the system fd, and the device nodes.
//!
//! Everything kvm-bindings or kvm-ioctls already has (`KVM_CAP_*`, `KVM_X86_*_VM`,
//! `KVM_X86_GRP_*`, [`kvm_ioctls::Cap`]) is used from there, not redefined here. This module
//! imports nothing from the crate, so every other module can depend on it.

/// `KVM_CAP_GUEST_MEMFD_FLAGS` (Linux 6.18 `include/uapi/linux/kvm.h`): the supported
/// `KVM_CREATE_GUEST_MEMFD` flags.
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;

/// `GUEST_MEMFD_FLAG_MMAP` (`include/uapi/linux/kvm.h`): the guest_memfd can be mmapped.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// `GUEST_MEMFD_FLAG_INIT_SHARED` (`include/uapi/linux/kvm.h`): its pages start shared.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;

/// `KVM_HC_MAP_GPA_RANGE` (`include/uapi/linux/kvm_para.h`): a guest's page-state change.
pub const KVM_HC_MAP_GPA_RANGE: u32 = 12;
/// `KVM_MAP_GPA_RANGE_PAGE_SZ_2M` (`include/uapi/linux/kvm_para.h`).
pub const KVM_MAP_GPA_RANGE_PAGE_SZ_2M: u64 = 1 << 0;
/// `KVM_MAP_GPA_RANGE_PAGE_SZ_1G`.
pub const KVM_MAP_GPA_RANGE_PAGE_SZ_1G: u64 = 1 << 1;
/// `KVM_MAP_GPA_RANGE_ENCRYPTED`: convert to private (else to shared).
pub const KVM_MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;

/// The SEV firmware device (the ccp driver's `/dev/sev`) KVM needs for every SEV launch
/// command (`kvm_sev_cmd.sev_fd`).
pub const SEV_DEVICE: &str = "/dev/sev";
/// The KVM device.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Request numbers kvm-ioctls does not export.
mod nr {
    use kvm_bindings::kvm_device_attr;
    use vmm_sys_util::ioctl_iow_nr;

    // `_IOW(KVMIO, 0xe2, struct kvm_device_attr)` (`include/uapi/linux/kvm.h`).
    ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, kvm_bindings::KVMIO, 0xe2, kvm_device_attr);
}
pub(crate) use nr::KVM_GET_DEVICE_ATTR;

/// `KVM_SEV_SNP_PAGE_TYPE_VMSA`: the `SNP_LAUNCH_UPDATE` page type of a VMSA supplied by user
/// space (the "Streamline VMSA setting" series' 4/4, "kvm: svm: Support
/// KVM_SEV_SNP_PAGE_TYPE_VMSA at SNP_LAUNCH_UPDATE"). Not in mainline's uapi (which skips 2);
/// the pre-merge SNP uapi reserved 2, the firmware's `SNP_PAGE_TYPE_VMSA`.
pub const KVM_SEV_SNP_PAGE_TYPE_VMSA: u32 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_attr_request_number_matches_the_uapi() {
        // KVM_GET_DEVICE_ATTR = _IOW(KVMIO, 0xe2, struct kvm_device_attr), 24 bytes.
        assert_eq!(KVM_GET_DEVICE_ATTR(), 0x4018_AEE2);
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_device_attr>(), 24);
    }
}
