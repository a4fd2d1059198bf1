//! Address newtypes: guest-physical ([`Gpa`], [`Gfn`]) and host-physical ([`Hpa`], [`Pfn`]).
//!
//! A VMSA is named by a guest-physical address when the guest owns it and by a host frame when
//! the host does; mixing the two up is the classic bug the ownership type exists to prevent, so
//! every address kind is its own type and conversions are explicit methods named after the
//! kernel macros they replace (`PHYS_PFN`, `PFN_PHYS`, `gpa_to_gfn`, `gfn_to_gpa`).

use core::fmt;

/// Size of a base page (and of a VMSA) in bytes.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
/// Size of a 2 MiB large page (`PMD_SIZE`).
pub const PMD_SIZE: u64 = 2 << 20;
/// Number of 4 KiB frames in a 2 MiB page (`PTRS_PER_PMD`).
pub const PTRS_PER_PMD: u64 = 512;
/// The GPA every KVM-allocated SNP launch VMSA is assigned to in the RMP
/// (`INITIAL_VMSA_GPA` in `arch/x86/kvm/svm/sev.c`).
pub const INITIAL_VMSA_GPA: Gpa = Gpa(0xFFFF_FFFF_F000);

macro_rules! addr_newtype {
    ($(#[$m:meta])* $name:ident, $fmt:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
        #[cfg_attr(feature = "serde", serde(transparent))]
        pub struct $name(pub u64);

        impl $name {
            /// The raw value.
            pub const fn raw(self) -> u64 {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($fmt, "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl From<u64> for $name {
            fn from(v: u64) -> Self {
                Self(v)
            }
        }
    };
}

addr_newtype!(
    /// A guest-physical address.
    Gpa,
    "Gpa"
);
addr_newtype!(
    /// A guest frame number (a [`Gpa`] shifted right by [`PAGE_SHIFT`]).
    Gfn,
    "Gfn"
);
addr_newtype!(
    /// A host (system) physical address, without any C-bit.
    Hpa,
    "Hpa"
);
addr_newtype!(
    /// A host page frame number (an [`Hpa`] shifted right by [`PAGE_SHIFT`]).
    Pfn,
    "Pfn"
);

impl Gpa {
    /// The frame this address lies in (`gpa_to_gfn`).
    pub const fn gfn(self) -> Gfn {
        Gfn(self.0 >> PAGE_SHIFT)
    }

    /// Whether the address is 4 KiB aligned.
    pub const fn is_page_aligned(self) -> bool {
        self.0.is_multiple_of(PAGE_SIZE)
    }

    /// Whether the address is 2 MiB aligned (`IS_ALIGNED(gpa, PMD_SIZE)`): such a page must never
    /// hold a VMSA because of AMD erratum 1467.
    pub const fn is_2m_aligned(self) -> bool {
        self.0.is_multiple_of(PMD_SIZE)
    }

    /// Whether the address fits below a guest `MAXPHYADDR` of `bits`.
    pub const fn fits_phys_bits(self, bits: u8) -> bool {
        bits >= 64 || self.0 >> bits == 0
    }
}

impl Gfn {
    /// The first address of this frame (`gfn_to_gpa`).
    pub const fn gpa(self) -> Gpa {
        Gpa(self.0 << PAGE_SHIFT)
    }
}

impl Hpa {
    /// The frame this address lies in (`PHYS_PFN`).
    pub const fn pfn(self) -> Pfn {
        Pfn(self.0 >> PAGE_SHIFT)
    }
}

impl Pfn {
    /// The first address of this frame (`PFN_PHYS` / `pfn_to_hpa`).
    pub const fn hpa(self) -> Hpa {
        Hpa(self.0 << PAGE_SHIFT)
    }

    /// Whether the frame starts a 2 MiB region (`IS_ALIGNED(pfn, PTRS_PER_PMD)`), the alignment
    /// AMD erratum 1467 forbids for a VMSA, VMCB or AVIC backing page.
    pub const fn is_2m_aligned(self) -> bool {
        self.0.is_multiple_of(PTRS_PER_PMD)
    }
}

/// The size of an RMP entry or of a page operation (`PG_LEVEL_4K` / `PG_LEVEL_2M`; the RMP's
/// `Page_Size` bit, APM vol. 2 §15.36.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum PageLevel {
    /// A 4 KiB page (RMP page size 0).
    #[default]
    #[cfg_attr(feature = "serde", serde(rename = "4k"))]
    Size4K,
    /// A 2 MiB page (RMP page size 1; the entry at the 2 MiB-aligned frame describes the region).
    #[cfg_attr(feature = "serde", serde(rename = "2m"))]
    Size2M,
}

impl PageLevel {
    /// Number of bytes the level covers.
    pub const fn bytes(self) -> u64 {
        match self {
            PageLevel::Size4K => PAGE_SIZE,
            PageLevel::Size2M => PMD_SIZE,
        }
    }

    /// Number of 4 KiB frames the level covers.
    pub const fn frames(self) -> u64 {
        self.bytes() / PAGE_SIZE
    }
}

/// An address-space identifier: the key slot a SEV guest's memory is encrypted with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(transparent))]
pub struct Asid(pub u32);

impl fmt::Display for Asid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn conversions_round_trip() {
        let gpa = Gpa(0x1234_5000);
        assert_eq!(gpa.gfn(), Gfn(0x12345));
        assert_eq!(gpa.gfn().gpa(), gpa);
        let hpa = Hpa(0xdead_b000);
        assert_eq!(hpa.pfn(), Pfn(0xdeadb));
        assert_eq!(hpa.pfn().hpa(), hpa);
        // PHYS_PFN drops the page offset.
        assert_eq!(Hpa(0x1fff).pfn(), Pfn(1));
    }

    #[test]
    fn alignment_predicates() {
        assert!(Gpa(0x20_0000).is_2m_aligned());
        assert!(!Gpa(0x20_1000).is_2m_aligned());
        assert!(Gpa(0x20_1000).is_page_aligned());
        assert!(!Gpa(0x20_1008).is_page_aligned());
        assert!(Pfn(512).is_2m_aligned());
        assert!(Pfn(0).is_2m_aligned());
        assert!(!Pfn(513).is_2m_aligned());
        assert!(INITIAL_VMSA_GPA.is_page_aligned());
        assert!(!INITIAL_VMSA_GPA.is_2m_aligned());
    }

    #[test]
    fn phys_bits() {
        assert!(Gpa((1 << 48) - 4096).fits_phys_bits(48));
        assert!(!Gpa(1 << 48).fits_phys_bits(48));
        assert!(Gpa(u64::MAX).fits_phys_bits(64));
    }

    #[test]
    fn display_is_hex() {
        assert_eq!(Gpa(0x1000).to_string(), "0x1000");
        assert_eq!(format!("{:?}", Pfn(0x10)), "Pfn(0x10)");
        assert_eq!(PageLevel::Size2M.frames(), 512);
    }
}
