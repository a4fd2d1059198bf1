//! The SEV kernel hashes table QEMU builds for `-kernel`/`-initrd`/`-append` launches, which
//! OVMF checks the loaded kernel, initrd and command line against.
//!
//! Layout from QEMU `target/i386/sev.c` (`SevHashTable`, `PaddedSevHashTable`,
//! `sev_add_kernel_loader_hashes`) and sev-snp-measure 0.0.13 (`sev_hashes.py`), packed
//! little-endian: header GUID, `u16` length, then three entries (GUID, `u16` length, SHA-256)
//! in the order cmdline, initrd, kernel; the whole padded with zeros to a multiple of 16. The
//! command line is hashed with its terminating NUL; a missing initrd hashes as empty data.

use std::path::Path;

use sha2::{Digest, Sha256};
use vmsa_core::PageBuf;
use vmsa_host::input::{InputError, InputFile, InputKind};

use super::ovmf::Guid;

/// The table's header GUID.
pub const SEV_HASH_TABLE_HEADER_GUID: Guid = Guid::parse("9438d606-4f22-4cc9-b479-a793d411fd21");
/// The kernel entry's GUID.
pub const SEV_KERNEL_ENTRY_GUID: Guid = Guid::parse("4de79437-abd2-427f-b835-d5b172d2045b");
/// The initrd entry's GUID.
pub const SEV_INITRD_ENTRY_GUID: Guid = Guid::parse("44baf731-3a2f-4bd7-9af1-41e29169781d");
/// The command-line entry's GUID.
pub const SEV_CMDLINE_ENTRY_GUID: Guid = Guid::parse("97d02dd8-bd20-4c94-aa78-e7714d36ab2a");

/// Size of one entry: GUID, `u16` length, SHA-256.
pub const ENTRY_SIZE: usize = 16 + 2 + 32;
/// Size of the table without padding (the value of its length field).
pub const TABLE_SIZE: usize = 16 + 2 + 3 * ENTRY_SIZE;
/// Size of the table padded to a multiple of 16, as QEMU writes and measures it.
pub const PADDED_TABLE_SIZE: usize = TABLE_SIZE.next_multiple_of(16);

/// The three hashes of a direct kernel boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SevHashes {
    /// SHA-256 of the kernel image.
    pub kernel: [u8; 32],
    /// SHA-256 of the initrd (of no bytes without one).
    pub initrd: [u8; 32],
    /// SHA-256 of the command line with its terminating NUL.
    pub cmdline: [u8; 32],
}

/// Kernels: at most 1 GiB (a bzImage is tens of MiB); hashed as they are read, never loaded
/// whole.
pub const KERNEL_FILE_KIND: InputKind = InputKind {
    what: "a kernel",
    limit: 1 << 30,
};

/// Initrds: at most 4 GiB (QEMU loads the initrd below 4 GiB of guest memory); hashed as they
/// are read, never loaded whole.
pub const INITRD_FILE_KIND: InputKind = InputKind {
    what: "an initrd",
    limit: 4 << 30,
};

fn sha256_file(option: &str, path: &Path, kind: InputKind) -> Result<[u8; 32], InputError> {
    let mut h = Sha256::new();
    InputFile::open(option, path, kind)?.copy_to(&mut h)?;
    Ok(h.finalize().into())
}

impl SevHashes {
    /// The hashes of in-memory inputs.
    pub fn new(kernel: &[u8], initrd: Option<&[u8]>, cmdline: Option<&str>) -> Self {
        Self {
            kernel: Sha256::digest(kernel).into(),
            initrd: Sha256::digest(initrd.unwrap_or_default()).into(),
            cmdline: Self::cmdline_hash(cmdline),
        }
    }

    /// The hashes of a kernel and optional initrd read from files given as `--kernel` and
    /// `--initrd` (regular files within [`KERNEL_FILE_KIND`]'s and [`INITRD_FILE_KIND`]'s
    /// limits, streamed, not loaded whole).
    pub fn from_files(
        kernel: &Path,
        initrd: Option<&Path>,
        cmdline: Option<&str>,
    ) -> Result<Self, InputError> {
        let kernel = sha256_file("--kernel", kernel, KERNEL_FILE_KIND)?;
        let initrd = match initrd {
            Some(p) => sha256_file("--initrd", p, INITRD_FILE_KIND)?,
            None => Sha256::digest(b"").into(),
        };
        Ok(Self {
            kernel,
            initrd,
            cmdline: Self::cmdline_hash(cmdline),
        })
    }

    fn cmdline_hash(cmdline: Option<&str>) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(cmdline.unwrap_or_default().as_bytes());
        h.update([0u8]);
        h.finalize().into()
    }

    /// The padded table as QEMU writes it.
    pub fn table(&self) -> [u8; PADDED_TABLE_SIZE] {
        let mut t = [0u8; PADDED_TABLE_SIZE];
        t[..16].copy_from_slice(SEV_HASH_TABLE_HEADER_GUID.bytes());
        t[16..18].copy_from_slice(&(TABLE_SIZE as u16).to_le_bytes());
        let entries = [
            (SEV_CMDLINE_ENTRY_GUID, &self.cmdline),
            (SEV_INITRD_ENTRY_GUID, &self.initrd),
            (SEV_KERNEL_ENTRY_GUID, &self.kernel),
        ];
        for (i, (guid, hash)) in entries.into_iter().enumerate() {
            let e = &mut t[18 + i * ENTRY_SIZE..18 + (i + 1) * ENTRY_SIZE];
            e[..16].copy_from_slice(guid.bytes());
            e[16..18].copy_from_slice(&(ENTRY_SIZE as u16).to_le_bytes());
            e[18..].copy_from_slice(hash);
        }
        t
    }

    /// The SNP kernel-hashes page: zeros with the padded table at `offset` (the hash table
    /// GPA's offset in its page). `None` when the table would not fit in the page.
    pub fn page(&self, offset: usize) -> Option<Box<PageBuf>> {
        let end = offset.checked_add(PADDED_TABLE_SIZE)?;
        let mut page = Box::new([0u8; 4096]);
        page.get_mut(offset..end)?.copy_from_slice(&self.table());
        Some(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_qemus_structs() {
        assert_eq!(ENTRY_SIZE, 50);
        assert_eq!(TABLE_SIZE, 168);
        assert_eq!(PADDED_TABLE_SIZE, 176);
    }

    #[test]
    fn table_layout() {
        let h = SevHashes::new(b"kernel", Some(b"initrd"), Some("console=ttyS0"));
        let t = h.table();
        assert_eq!(&t[..16], SEV_HASH_TABLE_HEADER_GUID.bytes());
        assert_eq!(&t[..4], &[0x06, 0xd6, 0x38, 0x94]);
        assert_eq!(&t[16..18], &[168, 0]);
        assert_eq!(&t[18..34], SEV_CMDLINE_ENTRY_GUID.bytes());
        assert_eq!(&t[34..36], &[50, 0]);
        assert_eq!(&t[36..68], &Sha256::digest(b"console=ttyS0\0")[..]);
        assert_eq!(&t[68..84], SEV_INITRD_ENTRY_GUID.bytes());
        assert_eq!(&t[86..118], &Sha256::digest(b"initrd")[..]);
        assert_eq!(&t[118..134], SEV_KERNEL_ENTRY_GUID.bytes());
        assert_eq!(&t[136..168], &Sha256::digest(b"kernel")[..]);
        assert_eq!(&t[168..], &[0; 8]);
    }

    #[test]
    fn defaults_hash_empty_initrd_and_bare_nul() {
        let h = SevHashes::new(b"k", None, None);
        assert_eq!(h.initrd, <[u8; 32]>::from(Sha256::digest(b"")));
        assert_eq!(h.cmdline, <[u8; 32]>::from(Sha256::digest(b"\0")));
        assert_eq!(h.cmdline, SevHashes::new(b"k", None, Some("")).cmdline);
    }

    #[test]
    fn page_places_the_table_and_refuses_overflow() {
        let h = SevHashes::new(b"k", None, None);
        let p = h.page(0xc00).unwrap();
        assert!(p[..0xc00].iter().all(|&b| b == 0));
        assert_eq!(&p[0xc00..0xc00 + 176], &h.table());
        assert!(p[0xc00 + 176..].iter().all(|&b| b == 0));
        assert!(h.page(4096 - 176).is_some());
        assert!(h.page(4096 - 175).is_none());
        assert!(h.page(usize::MAX).is_none());
    }
}
