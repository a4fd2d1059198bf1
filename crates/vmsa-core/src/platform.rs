//! The [`Platform`] trait: every hardware effect vmsa-core needs, one method per effect.
//!
//! A backend implements it once per VM (a platform value is the machine *as seen by one guest*:
//! it knows the guest's ASID and firmware context). vmsa-core decides *when* each effect happens;
//! the backend decides *how* (software RMP in `backend-sim`, ioctls in `backend-kvm`).

use core::fmt;

use crate::addr::{Asid, Gfn, Gpa, Hpa, PAGE_SIZE, PageLevel, Pfn};

/// One 4 KiB page of host memory.
pub type PageBuf = [u8; PAGE_SIZE as usize];

/// A page of zeros: what a page without contents stands for, and what pages are compared with
/// to skip storing or copying zeros.
pub static ZERO_PAGE: PageBuf = [0; PAGE_SIZE as usize];

/// Whether `bytes` (of any length) are all zeros, compared a page at a time.
pub fn is_zero(bytes: &[u8]) -> bool {
    bytes.chunks(ZERO_PAGE.len()).all(|c| c == &ZERO_PAGE[..c.len()])
}

/// A 4 KiB host page handed out by [`Platform::alloc_page`].
///
/// The handle is the page's ownership: vmsa-core gives it back exactly once, through
/// [`Platform::free_page`] or [`Platform::leak_page`].
pub trait HostPage: fmt::Debug + Send {
    /// The frame the page occupies.
    fn pfn(&self) -> Pfn;
}

/// `SNP_LAUNCH_UPDATE` page types (SNP firmware ABI, pub. 56860, §8.17 `PAGE_TYPE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[repr(u8)]
pub enum SnpPageType {
    /// Measured and encrypted data.
    Normal = 1,
    /// A VMSA page: measured, encrypted, and marked VMSA in the RMP.
    Vmsa = 2,
    /// A page the firmware zeroes; measured by type only.
    Zero = 3,
    /// Encrypted but not measured data.
    Unmeasured = 4,
    /// The secrets page the firmware fills.
    Secrets = 5,
    /// The CPUID page the firmware validates.
    Cpuid = 6,
}

impl SnpPageType {
    /// The type from its ABI number.
    pub fn from_raw(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Normal,
            2 => Self::Vmsa,
            3 => Self::Zero,
            4 => Self::Unmeasured,
            5 => Self::Secrets,
            6 => Self::Cpuid,
            _ => return None,
        })
    }
}

/// The parameters of a launch start (`LAUNCH_START` for SEV-ES; `SNP_GCTX_CREATE`,
/// `SNP_LAUNCH_START` and `SNP_ACTIVATE` for SEV-SNP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaunchStart {
    /// SEV-ES: the guest policy (SEV API spec §6.2, `POLICY`).
    SevEs {
        /// Policy bits (bit 0 NODBG, bit 2 ES, ...).
        policy: u32,
    },
    /// SEV-SNP: the guest policy (SNP ABI §4.3) and the guest OS-visible workarounds.
    Snp {
        /// Policy bits (bit 17 must be one, bit 19 DEBUG, ...).
        policy: u64,
        /// `GOSVW`.
        gosvw: [u8; 16],
    },
}

/// The parameters of a launch finish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaunchFinish {
    /// SEV-ES `LAUNCH_FINISH` (after `LAUNCH_MEASURE`).
    SevEs,
    /// `SNP_LAUNCH_FINISH` without an ID block; `host_data` is bound into attestation reports.
    Snp {
        /// `HOST_DATA`.
        host_data: [u8; 32],
    },
}

/// A failed debug decrypt ([`Platform::dbg_decrypt_vmsa`]).
///
/// SNP's `sev_decrypt_vmsa` has the firmware write into a firmware-owned destination page and
/// reclaims that page whatever the outcome; if the reclaim fails (`snp_page_reclaim`), the page
/// is leaked and the VM is bugged (`KVM_BUG`). `leaked` names that page.
#[derive(Debug)]
pub struct DbgDecryptFailure<E> {
    /// The error.
    pub source: E,
    /// The destination page the backend had to leak, if any.
    pub leaked: Option<Pfn>,
}

impl<E> From<E> for DbgDecryptFailure<E> {
    fn from(source: E) -> Self {
        Self { source, leaked: None }
    }
}

/// What a backend supplies to vmsa-core: page allocation, host access to frames, RMP updates,
/// SEV firmware commands, cache flushes and the guest_memfd lookup.
///
/// Every method is one hardware effect. A method a backend cannot perform on its host returns
/// its error (with the reason) rather than pretending success.
pub trait Platform {
    /// The handle of a host page.
    type Page: HostPage;
    /// The backend's error; for firmware commands it should carry the firmware status code.
    type Error: core::error::Error + Send + Sync + 'static;

    /// The ASID the guest's memory and VMSAs are encrypted with.
    fn asid(&self) -> Asid;

    /// Allocate one zeroed 4 KiB host page. May return a 2 MiB-aligned page; vmsa-core refuses
    /// those for VMSAs (erratum 1467) and asks again.
    fn alloc_page(&self) -> Result<Self::Page, Self::Error>;
    /// Return a page to the allocator. Only called for pages that are hypervisor-owned again.
    fn free_page(&self, page: Self::Page);
    /// Take a page out of circulation for good (`snp_leak_pages`): its RMP state could not be
    /// restored, so reusing it would fault the host.
    fn leak_page(&self, page: Self::Page);
    /// Take a guest_memfd frame out of circulation for good: `snp_leak_pages` on a guest page
    /// the firmware refused at launch whose reclaim or make-shared failed (KVM's
    /// `snp_page_reclaim` / `kvm_rmp_make_shared`). It keeps a reference, so releasing the
    /// guest's memory must not free this frame.
    fn leak_guest_frame(&self, pfn: Pfn);

    /// Host write of a whole frame (RMP-checked on SNP: a write to an assigned frame faults).
    fn write_frame(&self, pfn: Pfn, data: &PageBuf) -> Result<(), Self::Error>;
    /// Host read of a whole frame (a private frame reads back as ciphertext).
    fn read_frame(&self, pfn: Pfn, buf: &mut PageBuf) -> Result<(), Self::Error>;

    /// `RMPUPDATE` to an assigned state (Linux `rmp_make_private`).
    fn rmp_make_private(
        &self,
        pfn: Pfn,
        gpa: Gpa,
        level: PageLevel,
        asid: Asid,
        immutable: bool,
    ) -> Result<(), Self::Error>;
    /// `RMPUPDATE` back to hypervisor-owned (Linux `rmp_make_shared`).
    fn rmp_make_shared(&self, pfn: Pfn, level: PageLevel) -> Result<(), Self::Error>;

    /// Flush the cache lines of a page cached under `asid`'s key (`VM_PAGE_FLUSH`, or CLFLUSH on
    /// SME-coherent parts) before the page changes hands.
    fn flush_encrypted_page(&self, pfn: Pfn, asid: Asid) -> Result<(), Self::Error>;
    /// Flush a host page's cache lines (`clflush_cache_range`) before the firmware encrypts it
    /// in place (SEV-ES `LAUNCH_UPDATE_VMSA`): lines written through the host mapping must not
    /// be written back over the ciphertext. The default does nothing, which is right only on a
    /// host whose caches are coherent across keys.
    fn clflush_page(&self, pfn: Pfn) {
        let _ = pfn;
    }
    /// Write back and invalidate all caches (`WBNOINVD`/`WBINVD`): the fallback when a page flush
    /// fails.
    fn writeback_caches(&self);

    /// The host frame backing a guest frame through guest_memfd (`kvm_gmem_get_pfn`), or `None`
    /// when no memslot or no guest_memfd backs it.
    fn gmem_pfn(&self, gfn: Gfn) -> Option<Pfn>;

    /// The SNP guest policy bits the firmware supports (`sev_get_snp_policy_bits`, from
    /// SNP_PLATFORM_STATUS). vmsa-core accepts a policy bit only if both KVM
    /// ([`KVM_SNP_POLICY_MASK_VALID`](crate::KVM_SNP_POLICY_MASK_VALID)) and this allow it.
    /// The default claims every bit, leaving KVM's mask alone.
    fn snp_policy_bits(&self) -> u64 {
        u64::MAX
    }

    /// Start the guest's launch.
    fn launch_start(&self, start: &LaunchStart) -> Result<(), Self::Error>;
    /// SEV-ES `LAUNCH_UPDATE_DATA` of the guest memory `[gpa, gpa + len)` (KVM's
    /// `sev_launch_update_data`). SEV-ES VMs have no guest_memfd: the backend finds the memory
    /// that backs the range (KVM pins the VMM's memory, of any alignment and length), writes
    /// `data` there if given, flushes it and has the firmware measure and encrypt it in place.
    /// vmsa-core has checked that `len` is not zero, that the range stays below 2^64 and that
    /// `data`, if given, holds `len` bytes.
    fn launch_update_data(&self, gpa: Gpa, len: u64, data: Option<&[u8]>) -> Result<(), Self::Error>;
    /// SEV-ES `LAUNCH_UPDATE_VMSA` of one page: measure and encrypt it in place.
    fn launch_update_vmsa(&self, pfn: Pfn) -> Result<(), Self::Error>;
    /// `SNP_LAUNCH_UPDATE` of one 4 KiB page that is already in the pre-guest RMP state.
    fn snp_launch_update(&self, pfn: Pfn, gpa: Gpa, page_type: SnpPageType) -> Result<(), Self::Error>;
    /// Finish the launch.
    fn launch_finish(&self, finish: &LaunchFinish) -> Result<(), Self::Error>;
    /// `SNP_PAGE_RECLAIM`: return a firmware-held (immutable) page to a state the hypervisor can
    /// `RMPUPDATE` again.
    fn page_reclaim(&self, pfn: Pfn) -> Result<(), Self::Error>;
    /// Decrypt a protected VMSA for debugging (`SNP_DBG_DECRYPT` / `DBG_DECRYPT`). For SNP the
    /// firmware's destination page is reclaimed afterwards; a backend that cannot reclaim it
    /// leaks it and reports it in [`DbgDecryptFailure::leaked`] (vmsa-core then bugs the VM).
    fn dbg_decrypt_vmsa(&self, pa: Hpa, out: &mut PageBuf) -> Result<(), DbgDecryptFailure<Self::Error>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_takes_any_length() {
        let mut two = [0u8; 2 * PAGE_SIZE as usize + 3];
        assert!(is_zero(&two) && is_zero(&[]) && is_zero(&two[..5]));
        two[PAGE_SIZE as usize + 7] = 1;
        assert!(!is_zero(&two) && is_zero(&two[..PAGE_SIZE as usize]));
        two[PAGE_SIZE as usize + 7] = 0;
        two[2 * PAGE_SIZE as usize + 2] = 9;
        assert!(!is_zero(&two));
    }

    #[test]
    fn page_types_round_trip_their_abi_numbers() {
        for v in 0..=8u8 {
            match SnpPageType::from_raw(v) {
                Some(t) => assert_eq!(t as u8, v),
                None => assert!(v == 0 || v > 6),
            }
        }
    }
}
