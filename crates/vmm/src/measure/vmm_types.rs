//! The VMMs whose launches sev-snp-measure 0.0.13 models (`vmm_types.py`: QEMU, ec2, gce)
//! and how their launches differ outside the VMSA (the VMSA differences are in
//! [`super::reset`]). Facts from sev-snp-measure's `guest.py` (`snp_update_section`,
//! `snp_update_metadata_pages`), which follow each VMM's observed launch.

use core::fmt;
use core::str::FromStr;

use thiserror::Error;
use vmsa_core::SnpPageType;

/// A VMM whose launch flow the measurement reproduces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum VmmType {
    /// QEMU with KVM.
    #[default]
    Qemu,
    /// Amazon EC2 (its Nitro hypervisor).
    Ec2,
    /// Google Compute Engine.
    Gce,
}

/// Every VMM type, in sev-snp-measure's order.
pub const VMM_TYPES: [VmmType; 3] = [VmmType::Qemu, VmmType::Ec2, VmmType::Gce];

impl VmmType {
    /// The lowercase name the CLI takes and prints.
    pub fn name(self) -> &'static str {
        match self {
            Self::Qemu => "qemu",
            Self::Ec2 => "ec2",
            Self::Gce => "gce",
        }
    }

    /// The page type the `SNP_SEC_MEM` sections are launched as: GCE adds them UNMEASURED,
    /// QEMU (`snp_metadata_desc_to_page_type`) and EC2 as ZERO.
    pub fn sec_mem_page_type(self) -> SnpPageType {
        match self {
            Self::Gce => SnpPageType::Unmeasured,
            Self::Qemu | Self::Ec2 => SnpPageType::Zero,
        }
    }

    /// Whether the CPUID sections are launched after every other metadata section (EC2) rather
    /// than in metadata order (QEMU, GCE).
    pub fn cpuid_pages_last(self) -> bool {
        self == Self::Ec2
    }

    /// Whether RDX at reset holds the vCPU model's signature (QEMU) rather than a fixed value,
    /// in which case the model does not affect the measurement.
    pub fn uses_vcpu_signature(self) -> bool {
        self == Self::Qemu
    }
}

impl fmt::Display for VmmType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown VMM type name.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("unknown VMM type '{name}' (known: qemu, ec2, gce)")]
pub struct UnknownVmmType {
    /// The name given.
    pub name: String,
}

impl FromStr for VmmType {
    type Err = UnknownVmmType;

    /// Case-insensitive (sev-snp-measure spells them `QEMU`, `ec2`, `gce`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VMM_TYPES
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownVmmType { name: s.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_case_insensitively() {
        for t in VMM_TYPES {
            assert_eq!(t.name().parse::<VmmType>().unwrap(), t);
            assert_eq!(t.name().to_uppercase().parse::<VmmType>().unwrap(), t);
        }
        assert_eq!("QEMU".parse::<VmmType>().unwrap(), VmmType::Qemu);
        let e = "kvmtool".parse::<VmmType>().unwrap_err().to_string();
        assert!(e.contains("'kvmtool'") && e.contains("qemu, ec2, gce"), "{e}");
    }

    #[test]
    fn launch_differences() {
        assert_eq!(VmmType::Qemu.sec_mem_page_type(), SnpPageType::Zero);
        assert_eq!(VmmType::Ec2.sec_mem_page_type(), SnpPageType::Zero);
        assert_eq!(VmmType::Gce.sec_mem_page_type(), SnpPageType::Unmeasured);
        assert!(VmmType::Ec2.cpuid_pages_last());
        assert!(!VmmType::Qemu.cpuid_pages_last() && !VmmType::Gce.cpuid_pages_last());
        assert!(VmmType::Qemu.uses_vcpu_signature());
        assert!(!VmmType::Ec2.uses_vcpu_signature() && !VmmType::Gce.uses_vcpu_signature());
    }
}
