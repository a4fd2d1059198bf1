//! The host kernel's direct map, as far as the RMP sees it: the page size of the mapping a host
//! write goes through, per 2 MiB region of DRAM.
//!
//! Why it matters. The RMP check of a hypervisor write depends on the size of the host's own
//! mapping: "If the kernel uses a 2MB or larger directmap mapping to write to an address, and
//! that mapping contains any 4KB pages that are set to private in the RMP table, an RMP #PF
//! will trigger and cause a host crash" (Linux arch/x86/virt/svm/sev.c, the comment above
//! `adjust_direct_map`, which refers to AMD APM vol. 2 §15.36.10 "RMP and VMPL Access
//! Checks"), and "even accesses from 1GB mappings will be treated as 2MB accesses as far as RMP
//! table checks are concerned" (same function). So a write through a 2 MiB or 1 GiB mapping is
//! checked against every RMP entry of the 2 MiB region around the written address, a write
//! through a 4 KiB mapping against the written frame's entry only. Two more public sources say
//! the same: AMD's explanation of a kexec RMP #PF (Ashish Kalra, "Re: \[REGRESSION\] kexec does
//! firmware reboot in kernel v6.7.6", stable@vger.kernel.org, 2024-10-24, citing APM §15.36.10:
//! kexec's identity map covered the end of the RMP table and usable RAM with one 2 MiB page,
//! and a write to the usable part faulted "because the mappings don't match"; Linux now
//! reserves the whole 2 MiB, `__snp_fixup_e820_tables`), and the RMPREAD output's "2MB region
//! status" bit, set when any other page of the 2 MiB region is assigned (Linux commit 3e43c60eb3e3
//! "x86/sev: Prepare for using the RMPREAD instruction to access the RMP", `struct rmpentry`
//! `hpage_region_status`). The APM's own text was not at hand: the rule is taken from these.
//!
//! What Linux does about it. Linux maps DRAM with the largest pages it can (2 MiB or 1 GiB).
//! Its `rmpupdate()` calls `adjust_direct_map(pfn, level)` before every RMPUPDATE instruction:
//! for a 4 KiB RMPUPDATE whose page the direct map covers with a 2 MiB or larger page,
//! `set_memory_4k` splits that mapping (a 1 GiB page into 2 MiB pages, then the 2 MiB page
//! around the frame into 4 KiB pages: arch/x86/mm/pat/set_memory.c `__split_large_page`); a
//! 2 MiB RMPUPDATE splits nothing, since the whole region changes state at once. A split is
//! never undone ("there isn't currently a mechanism in place to restore 2MB+ mappings"). So
//! every region with a mix of private and shared 4 KiB pages is mapped with 4 KiB pages by the
//! time the mix exists, and no host write through the direct map meets the large-mapping rule.
//! [`DirectMap`] keeps exactly that state; [`DirectMapPolicy::KeepLarge`] models a host that
//! does not split (a kernel without `adjust_direct_map`, or any 2 MiB host mapping outside the
//! direct map), where the rule fires.
//!
//! Not charged on the clock: neither a split (`set_memory_4k`: a page-table page, a TLB
//! flush) nor the RMP check of a write through a large mapping has a cost that a public
//! source states.

use serde::Serialize;
use vmsa_core::{PTRS_PER_PMD, PageLevel as PageSize, Pfn};

use crate::memory::RangeSet;

/// Whether the host splits its large direct-map mappings before an RMPUPDATE.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum DirectMapPolicy {
    /// Linux's `rmpupdate()`: `adjust_direct_map` splits the 2 MiB (or 1 GiB) mapping over the
    /// frame of every 4 KiB RMPUPDATE into 4 KiB pages first, for good.
    #[default]
    SplitBefore4kRmpupdate,
    /// The direct map keeps its large pages whatever the RMP holds: a host write into a 2 MiB
    /// region with any assigned frame takes an RMP #PF, even where the written frame is
    /// hypervisor-owned.
    KeepLarge,
}

/// The page size of the host's direct map per 2 MiB region of DRAM: 2 MiB (a 1 GiB page is
/// checked as a 2 MiB one) until split to 4 KiB.
///
/// Split regions are kept as runs of region numbers, so a guest of any size whose memory runs
/// contiguously costs a few entries, and a region never split costs nothing.
#[derive(Debug)]
pub struct DirectMap {
    policy: DirectMapPolicy,
    /// 2 MiB region numbers (frame / 512) mapped with 4 KiB pages.
    split: RangeSet,
    /// How many regions were split.
    splits: u64,
}

impl DirectMap {
    /// The direct map at boot: every region mapped with large pages.
    pub fn new(policy: DirectMapPolicy) -> Self {
        Self {
            policy,
            split: RangeSet::default(),
            splits: 0,
        }
    }

    /// The page size of the mapping a host write of `pfn` goes through, as the RMP check sees
    /// it: 4 KiB once the region is split, else 2 MiB.
    pub fn mapping(&self, pfn: Pfn) -> PageSize {
        if self.split.contains(pfn.0 / PTRS_PER_PMD) {
            PageSize::Size4K
        } else {
            PageSize::Size2M
        }
    }

    /// Linux `adjust_direct_map(pfn, rmp_level)`, before an RMPUPDATE of `level` at `pfn`:
    /// a 4 KiB update splits the large mapping over `pfn` (under
    /// [`DirectMapPolicy::SplitBefore4kRmpupdate`]); a 2 MiB update leaves the map alone.
    /// Returns whether it split a mapping now.
    pub fn adjust(&mut self, pfn: Pfn, level: PageSize) -> bool {
        if self.policy != DirectMapPolicy::SplitBefore4kRmpupdate
            || level != PageSize::Size4K
            || self.mapping(pfn) == PageSize::Size4K
        {
            return false;
        }
        let region = pfn.0 / PTRS_PER_PMD;
        self.split.insert(region, region + 1);
        self.splits += 1;
        true
    }

    /// How many 2 MiB regions were split so far (each adds 2 MiB to Linux's `DirectMap4k` in
    /// /proc/meminfo).
    pub fn splits(&self) -> u64 {
        self.splits
    }

    /// Approximate bytes of the map.
    pub fn bytes(&self) -> usize {
        self.split.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_4k_rmpupdate_splits_its_region_for_good_and_a_2m_one_splits_nothing() {
        let mut d = DirectMap::new(DirectMapPolicy::default());
        let p = Pfn(0x10_0000 + 700);
        assert_eq!(
            d.mapping(p),
            PageSize::Size2M,
            "DRAM starts mapped with large pages"
        );
        assert!(!d.adjust(Pfn(0x10_0000), PageSize::Size2M));
        assert_eq!(d.mapping(Pfn(0x10_0000)), PageSize::Size2M);
        assert!(d.adjust(p, PageSize::Size4K));
        // The whole 2 MiB region around the frame is 4 KiB now, its neighbours are not.
        assert_eq!(d.mapping(Pfn(0x10_0000 + 512)), PageSize::Size4K);
        assert_eq!(d.mapping(Pfn(0x10_0000 + 1023)), PageSize::Size4K);
        assert_eq!(d.mapping(Pfn(0x10_0000 + 511)), PageSize::Size2M);
        assert_eq!(d.mapping(Pfn(0x10_0000 + 1024)), PageSize::Size2M);
        // Splitting again is a no-op, and nothing merges the region back.
        assert!(!d.adjust(Pfn(0x10_0000 + 600), PageSize::Size4K));
        assert!(!d.adjust(Pfn(0x10_0000 + 512), PageSize::Size2M));
        assert_eq!(d.mapping(p), PageSize::Size4K);
        assert_eq!(d.splits(), 1);
    }

    #[test]
    fn a_host_that_keeps_large_pages_never_splits() {
        let mut d = DirectMap::new(DirectMapPolicy::KeepLarge);
        assert!(!d.adjust(Pfn(0x10_0007), PageSize::Size4K));
        assert_eq!(d.mapping(Pfn(0x10_0007)), PageSize::Size2M);
        assert_eq!(d.splits(), 0);
    }
}
