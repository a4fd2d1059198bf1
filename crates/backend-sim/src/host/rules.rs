//! KVM's rules, as the simulated host enforces them: what it refuses, with KVM's errno and the
//! kernel function that refuses it.

use vmsa_core::layout::{SEV_FEAT_SECURE_TSC, SEV_FEAT_SNP_ACTIVE};
use vmsa_core::{PAGE_SIZE, VmKind};
use vmsa_host::{Conversion, Errno, HypervisorError, LaunchUpdate, MemoryRegion, Refusal, VmError, VmSpec};

use crate::platform::SimPlatform;

use crate::error::SimError;

/// `__sev_guest_init`: `vmsa_features` outside the supported set (SNP_ACTIVE is the host's to
/// add; SECURE_TSC is SNP-only) is `-EINVAL`.
pub fn check_init(spec: &VmSpec, supported: u64) -> Result<(), HypervisorError> {
    const CALL: &str = "KVM_SEV_INIT2";
    let f = spec.vmsa_features;
    if f & SEV_FEAT_SNP_ACTIVE != 0 {
        return Err(Refusal::new(
            CALL,
            Errno::EINVAL,
            "vmsa_features may not name SNP_ACTIVE; the kernel adds it for SNP (__sev_guest_init)",
        )
        .into());
    }
    if f & !supported != 0 {
        return Err(Refusal::new(
            CALL,
            Errno::EINVAL,
            "vmsa_features holds a bit outside KVM_X86_SEV_VMSA_FEATURES (__sev_guest_init)",
        )
        .into());
    }
    if spec.kind == VmKind::SevEs && spec.supplied_vmsa {
        return Err(Refusal::new(
            CALL,
            Errno::EINVAL,
            "supplied VMSAs (SNP_LAUNCH_UPDATE page type VMSA, the series' 4/4) are an SEV-SNP launch mode",
        )
        .into());
    }
    if spec.kind == VmKind::SevEs && f & SEV_FEAT_SECURE_TSC != 0 {
        return Err(Refusal::new(
            CALL,
            Errno::EINVAL,
            "SECURE_TSC is an SEV-SNP feature (__sev_guest_init)",
        )
        .into());
    }
    Ok(())
}

/// `kvm_set_memory_region`: a slot must be page aligned, non-empty and not overlap another;
/// and x86's `kvm_arch_prepare_memory_region` (arch/x86/kvm/x86.c) refuses with -EINVAL a slot
/// whose last frame lies above `kvm_mmu_max_gfn()`, the host's physical address width
/// (`max_phys_bits` here: the simulated host gives its VMs its own).
pub fn check_region(
    region: &MemoryRegion,
    existing: &[MemoryRegion],
    max_phys_bits: u8,
) -> Result<(), VmError> {
    const CALL: &str = "KVM_SET_USER_MEMORY_REGION2";
    let end = region.gpa.0.checked_add(region.size);
    if region.size == 0
        || !region.size.is_multiple_of(PAGE_SIZE)
        || !region.gpa.is_page_aligned()
        || end.is_none()
    {
        return Err(Refusal::new(
            CALL,
            Errno::EINVAL,
            "a memory slot must be page aligned, non-empty and inside the address space (kvm_set_memory_region)",
        )
        .into());
    }
    let end = end.unwrap_or(u64::MAX);
    if (end - 1) >> max_phys_bits != 0 {
        return Err(Refusal::new(
            CALL,
            Errno::EINVAL,
            "the slot ends above the host's physical address space (kvm_arch_prepare_memory_region: kvm_mmu_max_gfn)",
        )
        .into());
    }
    for r in existing {
        if r.slot == region.slot {
            return Err(Refusal::new(
                CALL,
                Errno::EEXIST,
                "the slot is in use; this host does not move or resize slots (kvm_set_memory_region)",
            )
            .into());
        }
        if region.gpa.0 < r.gpa.0 + r.size && r.gpa.0 < end {
            return Err(Refusal::new(
                CALL,
                Errno::EEXIST,
                "the range overlaps another memory slot (kvm_set_memory_region)",
            )
            .into());
        }
    }
    Ok(())
}

/// `kvm_vm_ioctl_set_mem_attributes`: only a VM with private memory (SNP) takes the private
/// attribute (`kvm_supported_mem_attributes`), and the range must be page aligned, non-empty,
/// not wrap.
pub fn check_conversion(range: &Conversion, kind: VmKind) -> Result<(), VmError> {
    if kind != VmKind::Snp {
        return Err(Refusal::new(
            "KVM_SET_MEMORY_ATTRIBUTES",
            Errno::EINVAL,
            "an SEV-ES VM has no private memory attribute (kvm_supported_mem_attributes)",
        )
        .into());
    }
    let wraps = range.gpa.0.checked_add(range.size).is_none();
    if range.size == 0 || wraps || !range.gpa.is_page_aligned() || !range.size.is_multiple_of(PAGE_SIZE) {
        return Err(Refusal::new(
            "KVM_SET_MEMORY_ATTRIBUTES",
            Errno::EINVAL,
            "the range must be page aligned, non-empty and not wrap (kvm_vm_ioctl_set_mem_attributes)",
        )
        .into());
    }
    Ok(())
}

/// `kvm_gmem_populate` (virt/kvm/guest_memfd.c): an SNP launch update measures only memory
/// whose attribute is private (`kvm_range_has_memory_attributes(..,
/// KVM_MEMORY_ATTRIBUTE_PRIVATE)`, else `-EINVAL`), and refuses a page guest_memfd has prepared
/// already (launched before, or faulted in private by the guest) with `-EEXIST` before
/// `post_populate` writes anything to it: here, a frame assigned in the RMP, which a host write
/// would fault on.
pub fn check_populate(platform: &SimPlatform, u: &LaunchUpdate<'_>) -> Result<(), VmError> {
    const CALL: &str = "KVM_SEV_SNP_LAUNCH_UPDATE";
    // A range outside guest memory is vmsa-core's to refuse (no guest_memfd slot).
    if u.len == 0 || !u.gpa.is_page_aligned() {
        return Ok(());
    }
    match platform.is_private(u.gpa, u.len) {
        Ok(false) => {
            return Err(Refusal::new(
                CALL,
                Errno::EINVAL,
                "the range is not private: set KVM_MEMORY_ATTRIBUTE_PRIVATE on it first (kvm_gmem_populate)",
            )
            .into());
        }
        Ok(true) => {}
        Err(_) => return Ok(()),
    }
    // A side-effect-free lookup: `Platform::gmem_pfn` here would count as a `gmem_pfn` call of
    // the fault plan (absorbing an injection meant for vmsa-core's call), charge and allocate.
    let first = u.gpa.gfn().0;
    let prepared = (first..first.saturating_add(u.len / PAGE_SIZE)).any(|gfn| {
        platform
            .gmem_backing(vmsa_core::Gfn(gfn))
            .is_some_and(|pfn| platform.machine().rmp_entry(pfn).assigned)
    });
    if prepared {
        return Err(Refusal::new(
            CALL,
            Errno::EEXIST,
            "a page of the range is prepared already (launched before): kvm_gmem_populate refuses it",
        )
        .into());
    }
    Ok(())
}

/// vmsa-core's refusal of `call` as the refusal KVM gives for the same rule
/// ([`Refusal::from_core`]); anything else is the host's own failure.
pub fn from_core(call: &'static str, e: vmsa_core::Error<SimError>) -> VmError {
    match Refusal::from_core(call, &e) {
        Some(r) => r.into(),
        None => VmError::host(call, CoreError(e)),
    }
}

/// vmsa-core's error as a host failure.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct CoreError(pub vmsa_core::Error<SimError>);

#[cfg(test)]
mod tests {
    use super::*;
    use vmsa_core::Gpa;

    #[test]
    fn init_refuses_what_sev_guest_init_refuses() {
        let spec = |kind, vmsa_features| VmSpec {
            kind,
            vmsa_features,
            supplied_vmsa: false,
        };
        let supported = vmsa_core::layout::SEV_FEAT_DEBUG_SWAP | SEV_FEAT_SECURE_TSC;
        assert!(check_init(&spec(VmKind::Snp, SEV_FEAT_SECURE_TSC), supported).is_ok());
        for bad in [
            spec(VmKind::Snp, SEV_FEAT_SNP_ACTIVE),
            spec(VmKind::Snp, 1 << 40),
            spec(VmKind::SevEs, SEV_FEAT_SECURE_TSC),
            spec(VmKind::SevEs, 0).with_supplied_vmsa(),
        ] {
            match check_init(&bad, supported) {
                Err(HypervisorError::Refused(r)) => assert_eq!(r.errno, Errno::EINVAL, "{bad:?}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn slots_must_not_overlap_and_conversions_must_be_aligned() {
        let r = |slot, gpa, size| MemoryRegion {
            slot,
            gpa: Gpa(gpa),
            size,
            guest_memfd: true,
        };
        let have = [r(0, 0, 0x10_0000)];
        assert!(check_region(&r(1, 0x10_0000, 0x1000), &have, 48).is_ok());
        let errno = |e: VmError| e.refusal().map(|r| r.errno);
        assert_eq!(
            errno(check_region(&r(1, 0xf_f000, 0x2000), &have, 48).unwrap_err()),
            Some(Errno::EEXIST)
        );
        assert_eq!(
            errno(check_region(&r(0, 0x20_0000, 0x1000), &have, 48).unwrap_err()),
            Some(Errno::EEXIST)
        );
        assert_eq!(
            errno(check_region(&r(1, 0x20_0000, 0), &have, 48).unwrap_err()),
            Some(Errno::EINVAL)
        );
        // The last frame must lie within the host's physical address width.
        assert!(check_region(&r(1, (1 << 48) - 0x1000, 0x1000), &have, 48).is_ok());
        assert_eq!(
            errno(check_region(&r(1, (1 << 48) - 0x1000, 0x2000), &have, 48).unwrap_err()),
            Some(Errno::EINVAL)
        );
        assert!(check_region(&r(1, 1 << 48, 0x1000), &have, 52).is_ok());
        let c = |gpa, size| Conversion {
            gpa: Gpa(gpa),
            size,
            private: false,
        };
        assert!(check_conversion(&c(0x1000, 0x1000), VmKind::Snp).is_ok());
        assert_eq!(
            errno(check_conversion(&c(0x1000, 0x1000), VmKind::SevEs).unwrap_err()),
            Some(Errno::EINVAL),
            "an SEV-ES VM has no private attribute"
        );
        for bad in [
            c(0x1000, 0),
            c(0x1001, 0x1000),
            c(0x1000, 0x800),
            c(u64::MAX - 0xfff, 0x2000),
        ] {
            assert_eq!(
                errno(check_conversion(&bad, VmKind::Snp).unwrap_err()),
                Some(Errno::EINVAL),
                "{bad:?}"
            );
        }
    }
}
