//! `vmm measure`: the launch digest an SEV-SNP or SEV-ES guest booting an OVMF image will
//! have, computed without running anything, byte for byte as sev-snp-measure 0.0.13 does.
//!
//! - [`ovmf`] reads the image's footer table and SEV metadata;
//! - [`vcpu_types`] and [`vmm_types`] name the vCPU models and VMMs;
//! - [`reset`] builds the launch VMSAs (x86 reset state as the VMM leaves it);
//! - [`hashes`] builds the kernel/initrd/cmdline hash table for direct kernel boots;
//! - [`plan`] turns all of that into a [`LaunchPlan`], the ordered list of pages a launch
//!   adds, which [`LaunchPlan::measure`] digests with backend-sim's firmware digest code and
//!   which a real launch (`vmm run --firmware`) feeds through vmsa-core;
//! - [`command`] is the CLI subcommand: arguments, validation, `--dump-vmsa`, output;
//! - [`igvm`] measures IGVM files (`--igvm`) as coconut-svsm's igvmmeasure does, and wraps a
//!   launch plan into one.

use core::fmt;
use core::str::FromStr;

use thiserror::Error;

pub mod command;
mod dump;
pub mod error;
pub mod hashes;
pub mod igvm;
pub mod ovmf;
pub mod plan;
pub mod reset;
pub mod vcpu_types;
pub mod vmm_types;

pub use command::{MeasureArgs, MeasureCommand, MeasureOutput, OvmfHashArgs, measure, measure_ovmf_hash};
pub use error::MeasureError;
pub use plan::{DataUpdate, LaunchDigest, LaunchPlan, LaunchStep, PlanConfig, PlanError, VmsaUpdate};

/// The most vCPUs a launch may have here. 512 is the bound issue 4 sets and the fixtures check
/// against sev-snp-measure (every count up to it is cheap to measure); it is well below KVM's
/// own limit (`KVM_MAX_VCPUS`, 1024 or more on x86 since Linux 5.15).
pub const MAX_VCPUS: u32 = 512;

/// A number of vCPUs, 1 to [`MAX_VCPUS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VcpuCount(u32);

/// A vCPU count outside 1 to [`MAX_VCPUS`], or not a number.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("'{value}' is not a valid vCPU count: it must be a whole number from 1 to {MAX_VCPUS}")]
pub struct VcpuCountError {
    /// The value given.
    pub value: String,
}

impl VcpuCount {
    /// The count, if it is within 1 to [`MAX_VCPUS`].
    pub fn new(n: u32) -> Result<Self, VcpuCountError> {
        if (1..=MAX_VCPUS).contains(&n) {
            Ok(Self(n))
        } else {
            Err(VcpuCountError { value: n.to_string() })
        }
    }

    /// The count.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for VcpuCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for VcpuCount {
    type Err = VcpuCountError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || VcpuCountError { value: s.to_owned() };
        let n: u32 = s.parse().map_err(|_| err())?;
        Self::new(n).map_err(|_| err())
    }
}

/// The digits after a `0x` or `0X` prefix; `None` without one.
fn strip_0x(s: &str) -> Option<&str> {
    s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))
}

/// A `--vcpu-sig` value that is not a CPUID signature.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error(
    "'{value}' is not a vCPU signature: it must be a 32-bit number (CPUID Fn0000_0001_EAX), 0x-prefixed hex or \
     decimal"
)]
pub struct VcpuSigError {
    /// The value given.
    pub value: String,
}

/// Parse `--vcpu-sig`: a 32-bit number, 0x-prefixed hex or decimal (sev-snp-measure takes
/// Python's `int(x, 0)`; its other bases and underscores are not CPUID signatures anyone
/// writes).
pub fn parse_vcpu_sig(s: &str) -> Result<u32, VcpuSigError> {
    let parsed = match strip_0x(s) {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u32::from_str_radix(hex, 16).ok()
        }
        Some(_) => None,
        None if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok(),
        None => None,
    };
    parsed.ok_or_else(|| VcpuSigError { value: s.to_owned() })
}

/// A `--guest-features` value refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum HexError {
    /// Not hex at all.
    #[error(
        "'{value}' is not a valid guest features value: it must be 1 to 16 hex digits, optionally prefixed 0x"
    )]
    NotHex {
        /// The value given.
        value: String,
    },
    /// A value without `0x` that Python's `int(x, 0)` (how sev-snp-measure parses
    /// `--guest-features`) reads differently: decimal digits (`21` is 21, 0x15, there and 0x21
    /// here) or a `0b` binary literal (`0b1` is 1 there and 0xb1 here). The same command line
    /// would give two digests.
    #[error(
        "'{value}' is ambiguous without 0x: it is {hex:#x} read as hex (this tool) but {other:#x} read as \
         {base} (sev-snp-measure reads it so); write {hex:#x} or {other:#x}"
    )]
    Ambiguous {
        /// The value given.
        value: String,
        /// Its hex reading.
        hex: u64,
        /// Python's reading.
        other: u64,
        /// The base Python reads it in: "decimal" or "binary".
        base: &'static str,
    },
}

/// Parse a 64-bit hex value with an optional `0x`/`0X` prefix (`--guest-features HEX`). An
/// unprefixed value made of decimal digits is refused where its decimal reading differs
/// ([`HexError::Ambiguous`]); `0` to `9` read the same either way.
pub fn parse_hex_u64(s: &str) -> Result<u64, HexError> {
    let not_hex = || HexError::NotHex { value: s.to_owned() };
    let prefixed = strip_0x(s);
    let digits = prefixed.unwrap_or(s);
    if digits.is_empty() || digits.len() > 16 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(not_hex());
    }
    let hex = u64::from_str_radix(digits, 16).map_err(|_| not_hex())?;
    if prefixed.is_some() {
        return Ok(hex);
    }
    // Python's reading where it has one (`int(x, 0)`: a `0b` prefix is binary, other digits
    // decimal); where Python refuses the value, only this reading exists.
    let python = match s.strip_prefix("0b").or_else(|| s.strip_prefix("0B")) {
        Some(bits) => u64::from_str_radix(bits, 2).ok().map(|v| (v, "binary")),
        None => s.parse::<u64>().ok().map(|v| (v, "decimal")),
    };
    match python {
        Some((other, base)) if other != hex => Err(HexError::Ambiguous {
            value: s.to_owned(),
            hex,
            other,
            base,
        }),
        _ => Ok(hex),
    }
}

/// An OVMF hash: the SEV-SNP launch digest of a firmware's pages alone (SHA-384), from which
/// a launch's chain continues (sev-snp-measure's `--mode snp:ovmf-hash` prints one and its
/// `--snp-ovmf-hash` takes one). Shown as 96 lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OvmfHash(pub [u8; backend_sim::measure::SNP_DIGEST_SIZE]);

impl fmt::Display for OvmfHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&backend_sim::measure::hex(&self.0))
    }
}

/// A `--snp-ovmf-hash` value refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error(
    "'{value}' is not an OVMF hash: it must be 96 hex digits (48 bytes of SHA-384, as --ovmf-hash-only prints it)"
)]
pub struct OvmfHashError {
    /// The value given.
    pub value: String,
}

/// Parse `--snp-ovmf-hash`: exactly 96 hex digits, either case, as sev-snp-measure's
/// `bytes.fromhex` reads the digest it prints.
pub fn parse_ovmf_hash(s: &str) -> Result<OvmfHash, OvmfHashError> {
    let mut out = [0u8; backend_sim::measure::SNP_DIGEST_SIZE];
    let refused = || OvmfHashError { value: s.to_owned() };
    if s.len() != 2 * out.len() || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(refused());
    }
    for (byte, pair) in out.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
        let pair = core::str::from_utf8(pair).map_err(|_| refused())?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| refused())?;
    }
    Ok(OvmfHash(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_count_bounds() {
        assert!(VcpuCount::new(0).is_err());
        assert_eq!(VcpuCount::new(1).unwrap().get(), 1);
        assert_eq!(VcpuCount::new(512).unwrap().get(), 512);
        assert!(VcpuCount::new(513).is_err());
        for bad in ["0", "513", "-1", "", "4x", "99999999999", " 4"] {
            let e = bad.parse::<VcpuCount>().unwrap_err();
            assert!(e.to_string().contains(&format!("'{bad}'")), "{e}");
            assert!(e.to_string().contains("1 to 512"), "{e}");
        }
        assert_eq!("64".parse::<VcpuCount>().unwrap().get(), 64);
    }

    #[test]
    fn ovmf_hashes() {
        let hex = "00112233445566778899aabbccddeeff".repeat(3);
        let h = parse_ovmf_hash(&hex).unwrap();
        assert_eq!((h.0[0], h.0[1], h.0[15], h.0[47]), (0x00, 0x11, 0xff, 0xff));
        assert_eq!(h.to_string(), hex, "shown as given");
        assert_eq!(parse_ovmf_hash(&hex.to_uppercase()), Ok(h));
        for bad in [
            "",
            &hex[..94],
            &format!("{hex}00"),
            &format!("0x{}", &hex[2..]),
            &hex.replace('a', "g"),
            &format!(" {}", &hex[1..]),
            &format!("{}é", &hex[..94]),
        ] {
            let e = parse_ovmf_hash(bad).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "'{bad}' is not an OVMF hash: it must be 96 hex digits (48 bytes of SHA-384, as --ovmf-hash-only \
                     prints it)"
                )
            );
        }
    }

    #[test]
    fn hex_values() {
        assert_eq!(parse_hex_u64("0x21"), Ok(0x21));
        assert_eq!(parse_hex_u64("0X21"), Ok(0x21));
        assert_eq!(parse_hex_u64("ffffffffffffffff"), Ok(u64::MAX));
        assert_eq!(parse_hex_u64("1"), Ok(1), "the same in hex and decimal");
        assert_eq!(parse_hex_u64("01"), Ok(1));
        assert_eq!(
            parse_hex_u64("a1"),
            Ok(0xa1),
            "sev-snp-measure refuses it, nothing differs"
        );
        // `21` was taken as 0x21, where sev-snp-measure takes 21 (0x15): the same command
        // line gave two digests.
        assert_eq!(
            parse_hex_u64("21"),
            Err(HexError::Ambiguous {
                value: "21".into(),
                hex: 0x21,
                other: 21,
                base: "decimal"
            })
        );
        // `0b1` is all hex digits (0xb1) and Python's binary 1: it measured 0xb1 where
        // sev-snp-measure measures 1.
        for (bin, value) in [("0b1", 1), ("0B11", 3), ("0b100001", 0x21), ("0b0", 0)] {
            match parse_hex_u64(bin) {
                Err(HexError::Ambiguous { other, base, .. }) => {
                    assert_eq!((other, base), (value, "binary"), "{bin}")
                }
                other => panic!("{bin}: {other:?}"),
            }
        }
        // Python refuses `0b` alone and `0b12`: the hex reading is the only one.
        assert_eq!(parse_hex_u64("0b"), Ok(0xb));
        assert_eq!(parse_hex_u64("0b12"), Ok(0xb12));
        assert!(parse_hex_u64("12345678901234567890").is_err());
        for bad in ["", "0x", "0x1g", "12345678901234567", "+1", "-1", "0x 1", "1_0"] {
            assert!(parse_hex_u64(bad).is_err(), "{bad}");
        }
    }
}
