//! Launch measurements, exactly as the firmware computes them.
//!
//! SEV-SNP: SNP firmware ABI (pub. 56860) §8.17.2, `SNP_LAUNCH_UPDATE`: every page the launch
//! adds extends the launch digest with `LD' = SHA-384(PAGE_INFO)`, where `PAGE_INFO` (table 67,
//! 0x70 bytes) holds the current digest, the page's contents hash (zero for ZERO, UNMEASURED,
//! SECRETS and CPUID pages), its length, type, IMI flag, VMPL1-3 permissions and GPA. The first
//! digest is 48 zero bytes.
//!
//! SEV-ES: SEV API (pub. 55766) §6.3-6.5: `LAUNCH_UPDATE_DATA` and `LAUNCH_UPDATE_VMSA` feed
//! the plaintext into one SHA-256 stream whose result is the launch digest.

use sha2::{Digest, Sha256, Sha384};
use vmsa_core::{Gpa, PageBuf, SnpPageType};

/// Size of a SEV-SNP launch digest (SHA-384).
pub const SNP_DIGEST_SIZE: usize = 48;
/// Size of the `PAGE_INFO` structure (SNP ABI table 67).
pub const PAGE_INFO_SIZE: usize = 0x70;

/// The running SEV-SNP launch digest of one guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnpLaunchDigest {
    ld: [u8; SNP_DIGEST_SIZE],
}

impl Default for SnpLaunchDigest {
    fn default() -> Self {
        Self::new()
    }
}

impl SnpLaunchDigest {
    /// The digest before any page: 48 zero bytes.
    pub fn new() -> Self {
        Self {
            ld: [0; SNP_DIGEST_SIZE],
        }
    }

    /// Extend the digest with one 4 KiB page. `contents` is needed for `Normal` and `Vmsa`
    /// pages (their SHA-384 enters `PAGE_INFO.CONTENTS`); other types measure as zeros.
    /// VMPL1-3 permissions are zero and IMI is off, as in every launch this crate performs.
    pub fn update(&mut self, gpa: Gpa, page_type: SnpPageType, contents: &PageBuf) {
        let hash: [u8; SNP_DIGEST_SIZE] = match page_type {
            SnpPageType::Normal | SnpPageType::Vmsa => Sha384::digest(contents).into(),
            _ => [0; SNP_DIGEST_SIZE],
        };
        self.ld = Sha384::digest(page_info(&self.ld, &hash, page_type, gpa)).into();
    }

    /// The digest so far.
    pub fn digest(&self) -> [u8; SNP_DIGEST_SIZE] {
        self.ld
    }

    /// The digest so far, in lowercase hex.
    pub fn hex(&self) -> String {
        hex(&self.ld)
    }
}

/// Lay out `PAGE_INFO` (SNP ABI §8.17.2 table 67): DIGEST_CUR @0x00, CONTENTS @0x30,
/// LENGTH @0x60, PAGE_TYPE @0x62, IMI_PAGE @0x63, VMPL3/2/1_PERMS @0x64..0x66, reserved @0x67,
/// GPA @0x68.
pub fn page_info(
    digest_cur: &[u8; SNP_DIGEST_SIZE],
    contents: &[u8; SNP_DIGEST_SIZE],
    page_type: SnpPageType,
    gpa: Gpa,
) -> [u8; PAGE_INFO_SIZE] {
    let mut info = [0u8; PAGE_INFO_SIZE];
    info[0x00..0x30].copy_from_slice(digest_cur);
    info[0x30..0x60].copy_from_slice(contents);
    info[0x60..0x62].copy_from_slice(&(PAGE_INFO_SIZE as u16).to_le_bytes());
    info[0x62] = page_type as u8;
    info[0x68..0x70].copy_from_slice(&gpa.raw().to_le_bytes());
    info
}

/// The running SEV-ES launch digest (SHA-256 over everything measured, in order).
#[derive(Clone, Debug, Default)]
pub struct SevEsLaunchDigest {
    hasher: Sha256,
}

impl SevEsLaunchDigest {
    /// An empty digest.
    pub fn new() -> Self {
        Self::default()
    }

    /// Measure more plaintext (`LAUNCH_UPDATE_DATA` / `LAUNCH_UPDATE_VMSA`).
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
    }

    /// The digest of everything measured so far.
    pub fn digest(&self) -> [u8; 32] {
        self.hasher.clone().finalize().into()
    }
}

/// A launch digest, as the firmware reports it once the launch finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaunchDigest {
    /// SEV-SNP: SHA-384 over the `PAGE_INFO` chain.
    Snp([u8; SNP_DIGEST_SIZE]),
    /// SEV-ES: SHA-256 over everything measured.
    SevEs([u8; 32]),
}

impl LaunchDigest {
    /// The digest bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Self::Snp(d) => d,
            Self::SevEs(d) => d,
        }
    }

    /// Lowercase hex.
    pub fn hex(&self) -> String {
        hex(self.bytes())
    }

    /// The hash algorithm's name.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Self::Snp(_) => "sha384",
            Self::SevEs(_) => "sha256",
        }
    }
}

/// Lowercase hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_info_layout_matches_table_67() {
        let cur = [0x11; 48];
        let contents = [0x22; 48];
        let info = page_info(&cur, &contents, SnpPageType::Vmsa, Gpa(0xFFFF_FFFF_F000));
        assert_eq!(&info[..48], &cur);
        assert_eq!(&info[48..96], &contents);
        assert_eq!(&info[0x60..0x64], &[0x70, 0x00, 0x02, 0x00]);
        assert_eq!(&info[0x64..0x68], &[0; 4]);
        assert_eq!(&info[0x68..], &0xFFFF_FFFF_F000u64.to_le_bytes());
    }

    #[test]
    fn zero_like_pages_ignore_their_contents() {
        let mut a = SnpLaunchDigest::new();
        let mut b = SnpLaunchDigest::new();
        a.update(Gpa(0x1000), SnpPageType::Zero, &[0xff; 4096]);
        b.update(Gpa(0x1000), SnpPageType::Zero, &[0; 4096]);
        assert_eq!(a, b);
        let mut c = SnpLaunchDigest::new();
        c.update(Gpa(0x1000), SnpPageType::Unmeasured, &[0; 4096]);
        assert_ne!(a, c, "the page type is measured");
        let mut d = SnpLaunchDigest::new();
        d.update(Gpa(0x1000), SnpPageType::Normal, &[0; 4096]);
        let mut e = SnpLaunchDigest::new();
        e.update(Gpa(0x1000), SnpPageType::Normal, &[1; 4096]);
        assert_ne!(d, e, "normal contents are measured");
        assert_eq!(SnpLaunchDigest::new().hex(), "0".repeat(96));
    }
}
