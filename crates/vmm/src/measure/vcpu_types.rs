//! The vCPU models whose CPUID signature QEMU puts in a VMSA's RDX at reset.
//!
//! The names are QEMU's `builtin_x86_defs` AMD EPYC models and their versioned aliases
//! (`target/i386/cpu.c`), exactly the set sev-snp-measure 0.0.13 knows (`vcpu_types.py`,
//! `CPU_SIGS`); family/model/stepping are those models' values. The signature encoding is
//! CPUID Fn0000_0001_EAX (AMD CPUID Specification, pub. 25481).

use core::fmt;
use core::str::FromStr;

use thiserror::Error;

/// The CPUID Fn0000_0001_EAX signature of a family/model/stepping (pub. 25481): families
/// above 0xF are stored as BaseFamily 0xF plus ExtFamily (family - 0xF); the model's high
/// nibble goes to ExtModel.
pub const fn cpu_sig(family: u32, model: u32, stepping: u32) -> u32 {
    let (family_low, family_high) = if family > 0xf {
        (0xf, (family - 0xf) & 0xff)
    } else {
        (family, 0)
    };
    (family_high << 20)
        | (((model >> 4) & 0xf) << 16)
        | (family_low << 8)
        | ((model & 0xf) << 4)
        | (stepping & 0xf)
}

/// A named vCPU model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VcpuType {
    /// QEMU's model name (case-sensitive, as `-cpu` takes it).
    pub name: &'static str,
    /// CPU family.
    pub family: u32,
    /// Model.
    pub model: u32,
    /// Stepping.
    pub stepping: u32,
}

impl VcpuType {
    /// The CPUID signature (what QEMU's reset state puts in RDX).
    pub const fn signature(&self) -> u32 {
        cpu_sig(self.family, self.model, self.stepping)
    }

    /// The model with this exact name.
    pub fn lookup(name: &str) -> Option<Self> {
        VCPU_TYPES.iter().copied().find(|t| t.name == name)
    }
}

impl fmt::Display for VcpuType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

const fn t(name: &'static str, family: u32, model: u32, stepping: u32) -> VcpuType {
    VcpuType {
        name,
        family,
        model,
        stepping,
    }
}

/// EPYC-v4, the model `vmm run` and `vmm igvm` give their VMSAs unless told another.
pub const EPYC_V4: VcpuType = t("EPYC-v4", 23, 1, 2);

/// Every model sev-snp-measure 0.0.13 knows, in its order.
pub const VCPU_TYPES: &[VcpuType] = &[
    t("EPYC", 23, 1, 2),
    t("EPYC-v1", 23, 1, 2),
    t("EPYC-v2", 23, 1, 2),
    t("EPYC-IBPB", 23, 1, 2),
    t("EPYC-v3", 23, 1, 2),
    EPYC_V4,
    t("EPYC-Rome", 23, 49, 0),
    t("EPYC-Rome-v1", 23, 49, 0),
    t("EPYC-Rome-v2", 23, 49, 0),
    t("EPYC-Rome-v3", 23, 49, 0),
    t("EPYC-Milan", 25, 1, 1),
    t("EPYC-Milan-v1", 25, 1, 1),
    t("EPYC-Milan-v2", 25, 1, 1),
    t("EPYC-Genoa", 25, 17, 0),
    t("EPYC-Genoa-v1", 25, 17, 0),
    t("EPYC-Turin", 26, 0, 0),
];

/// An unknown vCPU model name.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("unknown vCPU type '{name}' (known, case-sensitive: {})", known_names())]
pub struct UnknownVcpuType {
    /// The name given.
    pub name: String,
}

/// The known names, comma-separated.
pub fn known_names() -> String {
    VCPU_TYPES.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
}

impl FromStr for VcpuType {
    type Err = UnknownVcpuType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::lookup(s).ok_or_else(|| UnknownVcpuType { name: s.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_cpuid_fn1_eax() {
        // Family 17h model 01h stepping 2: ExtFamily 8, BaseFamily F, model 0/1, stepping 2.
        assert_eq!(cpu_sig(23, 1, 2), 0x0080_0f12);
        assert_eq!(cpu_sig(23, 49, 0), 0x0083_0f10);
        assert_eq!(cpu_sig(25, 1, 1), 0x00a0_0f11);
        assert_eq!(cpu_sig(25, 17, 0), 0x00a1_0f10);
        assert_eq!(cpu_sig(26, 0, 0), 0x00b0_0f00);
        // Families up to 0xF have no extended family.
        assert_eq!(cpu_sig(6, 0x55, 4), 0x0005_0654);
    }

    #[test]
    fn table_has_every_model_once_and_aliases_agree() {
        assert_eq!(VCPU_TYPES.len(), 16);
        let mut names: Vec<_> = VCPU_TYPES.iter().map(|t| t.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), VCPU_TYPES.len());
        // Every versioned alias has the signature of its base model.
        for ty in VCPU_TYPES {
            let base = ["EPYC-Rome", "EPYC-Milan", "EPYC-Genoa", "EPYC-Turin"]
                .into_iter()
                .find(|b| ty.name.starts_with(b))
                .unwrap_or("EPYC");
            assert_eq!(
                ty.signature(),
                VcpuType::lookup(base).unwrap().signature(),
                "{ty}"
            );
        }
    }

    #[test]
    fn parsing_is_exact_and_lists_known_names() {
        assert_eq!(
            "EPYC-Milan-v2".parse::<VcpuType>().unwrap().signature(),
            0x00a0_0f11
        );
        let err = "epyc".parse::<VcpuType>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("'epyc'"), "{msg}");
        assert!(msg.contains("EPYC-Turin") && msg.contains("EPYC-IBPB"), "{msg}");
        assert!("".parse::<VcpuType>().is_err());
    }
}
