//! The OVMF image: its GUIDed footer table and its SEV metadata.
//!
//! Facts from edk2 (`OvmfPkg/ResetVector/Ia16/ResetVectorVtf0.asm`: the table of GUIDed
//! structures that ends 32 bytes before the end of the image, each entry followed by its
//! 2-byte size and GUID; `OvmfPkg/ResetVector/X64/OvmfSevMetadata.asm`: the `ASEV` header and
//! its section descriptors), QEMU (`hw/i386/pc_sysfw_ovmf.c` `pc_system_parse_ovmf_flash`,
//! `hw/i386/pc_sysfw.c`, `hw/i386/pc.c`) and sev-snp-measure 0.0.13 (`ovmf.py`), whose
//! reading of the table this module reproduces. Where sev-snp-measure would crash or read
//! past a structure, this module refuses the image with the rule it breaks.

use core::fmt;
use std::sync::Arc;

use thiserror::Error;
use vmsa_host::input::FileBytes;

/// A GUID as EFI stores it: `Data1..Data3` little-endian, `Data4` as bytes (Python's
/// `uuid.UUID.bytes_le`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The GUID `d1-d2-d3-d4[0..2]-d4[2..8]` in its canonical text form.
    pub const fn new(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Self {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Self([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5], d4[6],
            d4[7],
        ])
    }

    /// The GUID from its canonical text form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (as edk2,
    /// QEMU and sev-snp-measure write it); in a constant, malformed text fails the build.
    pub const fn parse(text: &str) -> Self {
        const fn nibble(c: u8) -> u8 {
            match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => panic!("a GUID has hex digits between its dashes"),
            }
        }
        let s = text.as_bytes();
        assert!(
            s.len() == 36 && s[8] == b'-' && s[13] == b'-' && s[18] == b'-' && s[23] == b'-',
            "a GUID is 8-4-4-4-12 hex digits"
        );
        // The 16 bytes in text order (the dashes never split a byte).
        let mut t = [0u8; 16];
        let (mut i, mut n) = (0, 0);
        while i < s.len() {
            if matches!(i, 8 | 13 | 18 | 23) {
                i += 1;
            } else {
                t[n] = nibble(s[i]) << 4 | nibble(s[i + 1]);
                n += 1;
                i += 2;
            }
        }
        Self::new(
            u32::from_be_bytes([t[0], t[1], t[2], t[3]]),
            u16::from_be_bytes([t[4], t[5]]),
            u16::from_be_bytes([t[6], t[7]]),
            [t[8], t[9], t[10], t[11], t[12], t[13], t[14], t[15]],
        )
    }

    /// The stored bytes.
    pub const fn bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        let d1 = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let d2 = u16::from_le_bytes([b[4], b[5]]);
        let d3 = u16::from_le_bytes([b[6], b[7]]);
        write!(f, "{d1:08x}-{d2:04x}-{d3:04x}-{:02x}{:02x}-", b[8], b[9])?;
        b[10..].iter().try_for_each(|x| write!(f, "{x:02x}"))
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

/// The footer GUID that marks the table (`OVMF_TABLE_FOOTER_GUID` in QEMU and sev-snp-measure).
pub const OVMF_TABLE_FOOTER_GUID: Guid = Guid::parse("96b582de-1fb2-45f7-baea-a366c55a082d");
/// The SEV hash table block (`SEV_HASH_TABLE_RV_GUID`): `u32` GPA and `u32` size of the area
/// QEMU writes the kernel/initrd/cmdline hashes into.
pub const SEV_HASH_TABLE_RV_GUID: Guid = Guid::parse("7255371f-3a3b-4b04-927b-1da6efa8d454");
/// The SEV-ES reset block (`SEV_ES_RESET_BLOCK_GUID`, QEMU's `SEV_INFO_BLOCK_GUID`): `u32`
/// address the APs start at.
pub const SEV_ES_RESET_BLOCK_GUID: Guid = Guid::parse("00f771de-1a7e-4fcb-890e-68c77e2fb44e");
/// The SEV metadata pointer (`OVMF_SEV_META_DATA_GUID`): `u32` offset of the `ASEV` header
/// from the end of the image.
pub const OVMF_SEV_METADATA_GUID: Guid = Guid::parse("dc886566-984a-4798-a75e-5585a7bf67cc");

/// Size of a footer table entry's trailer: `u16` size then the GUID.
pub const TABLE_ENTRY_HEADER_SIZE: usize = 18;
/// The footer table ends this many bytes before the end of the image (the reset vector and
/// its padding follow it; `ResetVectorVtf0.asm`).
pub const TABLE_END_FROM_IMAGE_END: usize = 32;
/// Size of the `ASEV` header: signature, size, version, number of descriptors (`u32` each
/// after the 4-byte signature).
pub const METADATA_HEADER_SIZE: usize = 16;
/// Size of one metadata section descriptor: `u32` base, `u32` size, `u32` type.
pub const METADATA_DESC_SIZE: usize = 12;
/// The only metadata version there is (`OvmfSevMetadata.asm`; sev-snp-measure rejects others).
pub const METADATA_VERSION: u32 = 1;
/// Largest image accepted: QEMU's pc machines cap the firmware at `max-fw-size`, which may be
/// at most 16 MiB (`hw/i386/pc.c`, `pc_machine_set_max_fw_size`; 8 MiB by default).
pub const MAX_IMAGE_SIZE: u64 = 16 << 20;
/// The image must be a whole number of these (QEMU's pflash sector size, `hw/i386/pc_sysfw.c`).
pub const IMAGE_GRANULE: u64 = 4096;
/// The image is mapped so that it ends here.
pub const FOUR_GIB: u64 = 1 << 32;

/// The type of an SEV metadata section (`OvmfSevMetadata.asm`; QEMU `SEV_DESC_TYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SectionType {
    /// Memory OVMF's SEC phase expects pre-validated (`SNP_SEC_MEM`, 1).
    SnpSecMem,
    /// The SNP secrets page (`SNP_SECRETS`, 2).
    SnpSecrets,
    /// The CPUID page (`CPUID`, 3).
    Cpuid,
    /// The SVSM calling area (`SVSM_CAA`, 4).
    SvsmCaa,
    /// Where QEMU puts the kernel/initrd/cmdline hash table (`SNP_KERNEL_HASHES`, 0x10).
    SnpKernelHashes,
}

impl SectionType {
    /// The type from its metadata number.
    pub fn from_raw(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::SnpSecMem,
            2 => Self::SnpSecrets,
            3 => Self::Cpuid,
            4 => Self::SvsmCaa,
            0x10 => Self::SnpKernelHashes,
            _ => return None,
        })
    }

    /// The metadata number.
    pub fn raw(self) -> u32 {
        match self {
            Self::SnpSecMem => 1,
            Self::SnpSecrets => 2,
            Self::Cpuid => 3,
            Self::SvsmCaa => 4,
            Self::SnpKernelHashes => 0x10,
        }
    }

    /// The name edk2 and sev-snp-measure use.
    pub fn name(self) -> &'static str {
        match self {
            Self::SnpSecMem => "SNP_SEC_MEM",
            Self::SnpSecrets => "SNP_SECRETS",
            Self::Cpuid => "CPUID",
            Self::SvsmCaa => "SVSM_CAA",
            Self::SnpKernelHashes => "SNP_KERNEL_HASHES",
        }
    }
}

impl fmt::Display for SectionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One SEV metadata section descriptor, as stored (the type is checked when a launch plan
/// uses it, as sev-snp-measure does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetadataSection {
    /// Guest-physical base.
    pub gpa: u32,
    /// Size in bytes.
    pub size: u32,
    /// The raw type number.
    pub raw_type: u32,
}

impl MetadataSection {
    /// The section type, if it is one this module knows.
    pub fn section_type(&self) -> Option<SectionType> {
        SectionType::from_raw(self.raw_type)
    }
}

/// Why an image is not an SEV-capable OVMF build. Each message states the rule broken.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum OvmfError {
    /// The size rule.
    #[error(
        "is {len} bytes; an OVMF image must be a non-zero multiple of 4096 bytes and at most 16 MiB \
         (QEMU pflash and max-fw-size rules)"
    )]
    Size {
        /// The image size.
        len: u64,
    },
    /// No footer table.
    #[error(
        "has no OVMF footer table (GUID {OVMF_TABLE_FOOTER_GUID} expected {} bytes before the end), \
         so it carries no SEV metadata",
        TABLE_END_FROM_IMAGE_END + 16
    )]
    NoFooterTable,
    /// The footer's size is impossible.
    #[error(
        "OVMF footer table size {size} is corrupt: it must be at least {TABLE_ENTRY_HEADER_SIZE} \
         and fit in the image"
    )]
    FooterTableSize {
        /// The size the footer states.
        size: u16,
    },
    /// An entry's size is impossible.
    #[error(
        "OVMF footer table entry {guid} has size {size}: an entry must be at least \
         {TABLE_ENTRY_HEADER_SIZE} bytes and fit in the table ({room} bytes left)"
    )]
    EntrySize {
        /// The entry's GUID.
        guid: Guid,
        /// The size it states.
        size: u16,
        /// Table bytes left for it.
        room: usize,
    },
    /// A GUID appears twice (QEMU takes the last one, sev-snp-measure the first: ambiguous).
    #[error("OVMF footer table lists {guid} twice; an image must name each structure once")]
    DuplicateEntry {
        /// The repeated GUID.
        guid: Guid,
    },
    /// An entry is too short for the value read from it.
    #[error("OVMF footer table entry {guid} holds {len} bytes; it must hold at least {need}")]
    ShortEntry {
        /// The entry's GUID.
        guid: Guid,
        /// Its data length.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// No SEV-ES reset block: the image was not built for SEV-ES or SEV-SNP guests.
    #[error(
        "has no SEV-ES reset block (GUID {SEV_ES_RESET_BLOCK_GUID}) in its footer table: \
         not an SEV-capable OVMF build"
    )]
    NoResetBlock,
    /// The metadata pointer points outside the image.
    #[error(
        "SEV metadata offset {offset:#x} (from the end of the image) puts the {METADATA_HEADER_SIZE}-byte \
         ASEV header outside the {len}-byte image"
    )]
    MetadataOffset {
        /// The offset from the end.
        offset: u32,
        /// The image size.
        len: usize,
    },
    /// Wrong signature.
    #[error("SEV metadata header signature is {found:02x?}; it must be \"ASEV\"")]
    MetadataSignature {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// Wrong version.
    #[error("SEV metadata version is {version}; only version {METADATA_VERSION} exists")]
    MetadataVersion {
        /// The version found.
        version: u32,
    },
    /// The header's size or descriptor count does not fit.
    #[error(
        "SEV metadata header says {size} bytes with {items} sections: it must hold the {METADATA_HEADER_SIZE}-byte \
         header plus {METADATA_DESC_SIZE} bytes per section and fit in the image ({room} bytes from the header on)"
    )]
    MetadataSize {
        /// The size the header states.
        size: u32,
        /// Its descriptor count.
        items: u32,
        /// Image bytes from the header to the end.
        room: usize,
    },
}

/// A parsed OVMF image.
#[derive(Clone, PartialEq, Eq)]
pub struct Ovmf {
    /// Shared, not copied, with the launch plans built from the image.
    data: Arc<FileBytes>,
    table: Vec<(Guid, Vec<u8>)>,
    reset_eip: u32,
    metadata: Option<Vec<MetadataSection>>,
}

impl fmt::Debug for Ovmf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ovmf")
            .field("len", &self.data.len())
            .field("table", &self.table.iter().map(|(g, _)| g).collect::<Vec<_>>())
            .field("reset_eip", &format_args!("{:#x}", self.reset_eip))
            .field("metadata", &self.metadata)
            .finish()
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// Check the size rule before reading a whole file (see [`MAX_IMAGE_SIZE`], [`IMAGE_GRANULE`]).
pub fn check_image_size(len: u64) -> Result<(), OvmfError> {
    if len == 0 || len > MAX_IMAGE_SIZE || !len.is_multiple_of(IMAGE_GRANULE) {
        return Err(OvmfError::Size { len });
    }
    Ok(())
}

/// Read the footer table: entries from the last one backwards, as QEMU and sev-snp-measure do.
fn parse_table(data: &[u8]) -> Result<Vec<(Guid, Vec<u8>)>, OvmfError> {
    let Some(footer_at) = data
        .len()
        .checked_sub(TABLE_END_FROM_IMAGE_END + TABLE_ENTRY_HEADER_SIZE)
    else {
        return Err(OvmfError::NoFooterTable);
    };
    let footer = &data[footer_at..footer_at + TABLE_ENTRY_HEADER_SIZE];
    if footer[2..] != OVMF_TABLE_FOOTER_GUID.0 {
        return Err(OvmfError::NoFooterTable);
    }
    let size = u16_at(footer, 0).ok_or(OvmfError::NoFooterTable)?;
    let body_len = usize::from(size)
        .checked_sub(TABLE_ENTRY_HEADER_SIZE)
        .filter(|&n| n <= footer_at)
        .ok_or(OvmfError::FooterTableSize { size })?;
    let mut rest = &data[footer_at - body_len..footer_at];
    let mut table: Vec<(Guid, Vec<u8>)> = Vec::new();
    while rest.len() >= TABLE_ENTRY_HEADER_SIZE {
        let hdr = &rest[rest.len() - TABLE_ENTRY_HEADER_SIZE..];
        let mut g = [0u8; 16];
        g.copy_from_slice(&hdr[2..]);
        let guid = Guid(g);
        let size = u16_at(hdr, 0).unwrap_or(0);
        let len = usize::from(size);
        if len < TABLE_ENTRY_HEADER_SIZE || len > rest.len() {
            return Err(OvmfError::EntrySize {
                guid,
                size,
                room: rest.len(),
            });
        }
        if table.iter().any(|(g, _)| *g == guid) {
            return Err(OvmfError::DuplicateEntry { guid });
        }
        let start = rest.len() - len;
        table.push((guid, rest[start..rest.len() - TABLE_ENTRY_HEADER_SIZE].to_vec()));
        rest = &rest[..start];
    }
    Ok(table)
}

fn entry_u32(table: &[(Guid, Vec<u8>)], guid: Guid) -> Result<Option<u32>, OvmfError> {
    match table.iter().find(|(g, _)| *g == guid) {
        None => Ok(None),
        Some((_, d)) => u32_at(d, 0).map(Some).ok_or(OvmfError::ShortEntry {
            guid,
            len: d.len(),
            need: 4,
        }),
    }
}

/// Read the `ASEV` header the metadata entry points at, and its descriptors.
fn parse_metadata(data: &[u8], offset: u32) -> Result<Vec<MetadataSection>, OvmfError> {
    let len = data.len();
    let bad_offset = OvmfError::MetadataOffset { offset, len };
    let start = len.checked_sub(offset as usize).ok_or(bad_offset.clone())?;
    let room = len - start;
    if room < METADATA_HEADER_SIZE {
        return Err(bad_offset);
    }
    let hdr = &data[start..start + METADATA_HEADER_SIZE];
    let mut sig = [0u8; 4];
    sig.copy_from_slice(&hdr[..4]);
    if &sig != b"ASEV" {
        return Err(OvmfError::MetadataSignature { found: sig });
    }
    let size = u32_at(hdr, 4).unwrap_or(0);
    let version = u32_at(hdr, 8).unwrap_or(0);
    let items = u32_at(hdr, 12).unwrap_or(0);
    if version != METADATA_VERSION {
        return Err(OvmfError::MetadataVersion { version });
    }
    let need = (items as usize)
        .checked_mul(METADATA_DESC_SIZE)
        .and_then(|n| n.checked_add(METADATA_HEADER_SIZE));
    if need.is_none_or(|n| n > size as usize) || size as usize > room {
        return Err(OvmfError::MetadataSize { size, items, room });
    }
    let descs = &data[start + METADATA_HEADER_SIZE..start + size as usize];
    Ok(descs
        .chunks_exact(METADATA_DESC_SIZE)
        .take(items as usize)
        .map(|d| MetadataSection {
            gpa: u32_at(d, 0).unwrap_or(0),
            size: u32_at(d, 4).unwrap_or(0),
            raw_type: u32_at(d, 8).unwrap_or(0),
        })
        .collect())
}

impl Ovmf {
    /// Parse an image: the size rule, the footer table, the SEV-ES reset block (required: an
    /// image without it has no SEV metadata at all) and, when present, the SEV metadata.
    pub fn parse(data: impl Into<FileBytes>) -> Result<Self, OvmfError> {
        let data = data.into();
        check_image_size(data.len() as u64)?;
        let table = parse_table(&data)?;
        let reset_eip = entry_u32(&table, SEV_ES_RESET_BLOCK_GUID)?.ok_or(OvmfError::NoResetBlock)?;
        let metadata = match entry_u32(&table, OVMF_SEV_METADATA_GUID)? {
            Some(offset) => Some(parse_metadata(&data, offset)?),
            None => None,
        };
        // The hash table block is read on demand, but a short entry is a corrupt image.
        entry_u32(&table, SEV_HASH_TABLE_RV_GUID)?;
        Ok(Self {
            data: Arc::new(data),
            table,
            reset_eip,
            metadata,
        })
    }

    /// The image bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The image bytes, shared: a launch plan keeps them without copying 2 MiB or more.
    pub(crate) fn shared_data(&self) -> Arc<FileBytes> {
        Arc::clone(&self.data)
    }

    /// The guest-physical address of the image's first byte: it is mapped to end at 4 GiB.
    pub fn gpa(&self) -> u64 {
        FOUR_GIB - self.data.len() as u64
    }

    /// The footer table entries, from the one nearest the footer backwards.
    pub fn table(&self) -> impl Iterator<Item = (Guid, &[u8])> {
        self.table.iter().map(|(g, d)| (*g, d.as_slice()))
    }

    /// The data of one footer table entry.
    pub fn table_entry(&self, guid: Guid) -> Option<&[u8]> {
        self.table
            .iter()
            .find(|(g, _)| *g == guid)
            .map(|(_, d)| d.as_slice())
    }

    /// The address APs start at under SEV-ES/SNP (the reset block's `u32`).
    pub fn sev_es_reset_eip(&self) -> u32 {
        self.reset_eip
    }

    /// Whether the image has an SEV metadata (`ASEV`) header; QEMU refuses to launch an SNP
    /// guest without one (`sev_snp_launch_finish`: "Failed to locate SEV metadata header").
    pub fn has_sev_metadata(&self) -> bool {
        self.metadata.is_some()
    }

    /// The SEV metadata sections in image order (empty without a header).
    pub fn metadata_sections(&self) -> &[MetadataSection] {
        self.metadata.as_deref().unwrap_or(&[])
    }

    /// Whether a section of this type exists.
    pub fn has_section(&self, ty: SectionType) -> bool {
        self.metadata_sections()
            .iter()
            .any(|s| s.section_type() == Some(ty))
    }

    /// The SEV hash table GPA from [`SEV_HASH_TABLE_RV_GUID`], if the entry exists (may be 0:
    /// builds without kernel-hash support carry the entry with a zero address).
    pub fn sev_hashes_table_gpa(&self) -> Option<u32> {
        self.table_entry(SEV_HASH_TABLE_RV_GUID)
            .and_then(|d| u32_at(d, 0))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A footer table image builder for crafted inputs.
    pub(crate) struct Image {
        pub len: usize,
        pub entries: Vec<(Guid, Vec<u8>)>,
        pub metadata: Option<(usize, Vec<u8>)>,
    }

    impl Image {
        pub(crate) fn new(len: usize) -> Self {
            Self {
                len,
                entries: Vec::new(),
                metadata: None,
            }
        }

        pub(crate) fn entry(mut self, guid: Guid, data: &[u8]) -> Self {
            self.entries.push((guid, data.to_vec()));
            self
        }

        /// An `ASEV` header with these (gpa, size, type) sections at `at` bytes from the end.
        pub(crate) fn metadata(mut self, at: usize, sections: &[(u32, u32, u32)]) -> Self {
            let mut m = b"ASEV".to_vec();
            m.extend_from_slice(&((16 + 12 * sections.len()) as u32).to_le_bytes());
            m.extend_from_slice(&1u32.to_le_bytes());
            m.extend_from_slice(&(sections.len() as u32).to_le_bytes());
            for (g, s, t) in sections {
                for v in [g, s, t] {
                    m.extend_from_slice(&v.to_le_bytes());
                }
            }
            self.metadata = Some((at, m));
            self.entry(OVMF_SEV_METADATA_GUID, &(at as u32).to_le_bytes())
        }

        pub(crate) fn build(&self) -> Vec<u8> {
            let mut data: Vec<u8> = (0..self.len).map(|i| (i * 7 % 251) as u8).collect();
            // Entries are laid out first to last; the reader walks them backwards.
            let mut table = Vec::new();
            for (g, d) in &self.entries {
                table.extend_from_slice(d);
                table.extend_from_slice(&((d.len() + 18) as u16).to_le_bytes());
                table.extend_from_slice(&g.0);
            }
            table.extend_from_slice(&((table.len() + 18) as u16).to_le_bytes());
            table.extend_from_slice(&OVMF_TABLE_FOOTER_GUID.0);
            let end = self.len - 32;
            data[end - table.len()..end].copy_from_slice(&table);
            if let Some((at, m)) = &self.metadata {
                let start = self.len - at;
                data[start..start + m.len()].copy_from_slice(m);
            }
            data
        }
    }

    pub(crate) fn sev_image() -> Image {
        Image::new(0x4000)
            .entry(SEV_ES_RESET_BLOCK_GUID, &0x80_b004u32.to_le_bytes())
            .entry(SEV_HASH_TABLE_RV_GUID, &[0; 8])
            .metadata(
                0x800,
                &[
                    (0x80_0000, 0x9000, 1),
                    (0x80_d000, 0x1000, 2),
                    (0x80_e000, 0x1000, 3),
                ],
            )
    }

    #[test]
    fn guid_text_and_bytes_follow_efi_order() {
        assert_eq!(
            OVMF_TABLE_FOOTER_GUID.to_string(),
            "96b582de-1fb2-45f7-baea-a366c55a082d"
        );
        assert_eq!(&OVMF_TABLE_FOOTER_GUID.0[..4], &[0xde, 0x82, 0xb5, 0x96]);
        assert_eq!(&OVMF_TABLE_FOOTER_GUID.0[4..8], &[0xb2, 0x1f, 0xf7, 0x45]);
        assert_eq!(
            &OVMF_TABLE_FOOTER_GUID.0[8..],
            &[0xba, 0xea, 0xa3, 0x66, 0xc5, 0x5a, 0x08, 0x2d]
        );
        assert_eq!(
            SEV_ES_RESET_BLOCK_GUID.to_string(),
            "00f771de-1a7e-4fcb-890e-68c77e2fb44e"
        );
        assert_eq!(
            OVMF_SEV_METADATA_GUID.to_string(),
            "dc886566-984a-4798-a75e-5585a7bf67cc"
        );
        assert_eq!(
            SEV_HASH_TABLE_RV_GUID.to_string(),
            "7255371f-3a3b-4b04-927b-1da6efa8d454"
        );
    }

    #[test]
    fn guid_parse_reads_the_text_form() {
        let want = Guid::new(
            0x96b5_82de,
            0x1fb2,
            0x45f7,
            [0xba, 0xea, 0xa3, 0x66, 0xc5, 0x5a, 0x08, 0x2d],
        );
        assert_eq!(Guid::parse("96b582de-1fb2-45f7-baea-a366c55a082d"), want);
        assert_eq!(Guid::parse("96B582DE-1FB2-45F7-BAEA-A366C55A082D"), want);
        for bad in [
            "96b582de1fb245f7baeaa366c55a082d",
            "96b582de-1fb2-45f7-baea-a366c55a082",
            "96b582de-1fb2-45f7-baea-a366c55a082g",
            "96b582de-1fb2-45f7-baea-a366c55a08-d",
        ] {
            assert!(std::panic::catch_unwind(|| Guid::parse(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_a_crafted_image() {
        let img = sev_image().build();
        let o = Ovmf::parse(img.clone()).unwrap();
        assert_eq!(o.sev_es_reset_eip(), 0x80_b004);
        assert_eq!(o.gpa(), FOUR_GIB - 0x4000);
        assert_eq!(o.data(), &img[..]);
        assert!(o.has_sev_metadata());
        let kinds: Vec<_> = o.metadata_sections().iter().map(|s| s.section_type()).collect();
        assert_eq!(
            kinds,
            [
                Some(SectionType::SnpSecMem),
                Some(SectionType::SnpSecrets),
                Some(SectionType::Cpuid)
            ]
        );
        assert_eq!(o.metadata_sections()[0].gpa, 0x80_0000);
        assert_eq!(o.metadata_sections()[0].size, 0x9000);
        assert_eq!(o.sev_hashes_table_gpa(), Some(0));
        assert!(!o.has_section(SectionType::SnpKernelHashes));
        // The reader walks backwards from the footer: last entry written comes first.
        let order: Vec<_> = o.table().map(|(g, _)| g).collect();
        assert_eq!(
            order,
            [
                OVMF_SEV_METADATA_GUID,
                SEV_HASH_TABLE_RV_GUID,
                SEV_ES_RESET_BLOCK_GUID
            ]
        );
    }

    #[test]
    fn without_metadata_only_the_reset_block_is_needed() {
        let img = Image::new(0x2000)
            .entry(SEV_ES_RESET_BLOCK_GUID, &0x80_8004u32.to_le_bytes())
            .build();
        let o = Ovmf::parse(img).unwrap();
        assert!(!o.has_sev_metadata());
        assert!(o.metadata_sections().is_empty());
        assert_eq!(o.sev_hashes_table_gpa(), None);
    }

    #[test]
    fn size_rules() {
        for len in [0u64, 4095, 4097, (16 << 20) + 4096] {
            assert_eq!(check_image_size(len), Err(OvmfError::Size { len }), "{len}");
        }
        check_image_size(4096).unwrap();
        check_image_size(16 << 20).unwrap();
        assert_eq!(Ovmf::parse(vec![0; 100]), Err(OvmfError::Size { len: 100 }));
    }

    #[test]
    fn refuses_images_without_sev_structures() {
        assert_eq!(Ovmf::parse(vec![0; 4096]), Err(OvmfError::NoFooterTable));
        let no_reset = Image::new(0x2000).entry(SEV_HASH_TABLE_RV_GUID, &[0; 8]).build();
        assert_eq!(Ovmf::parse(no_reset), Err(OvmfError::NoResetBlock));
    }

    #[test]
    fn refuses_corrupt_tables() {
        let good = sev_image().build();
        let footer = good.len() - 32 - 18;

        let mut small = good.clone();
        small[footer..footer + 2].copy_from_slice(&17u16.to_le_bytes());
        assert_eq!(Ovmf::parse(small), Err(OvmfError::FooterTableSize { size: 17 }));

        let mut huge = good.clone();
        huge[footer..footer + 2].copy_from_slice(&u16::MAX.to_le_bytes());
        let short = Image::new(0x1000).entry(SEV_ES_RESET_BLOCK_GUID, &[0; 4]).build();
        let mut short_huge = short.clone();
        let f = short.len() - 50;
        short_huge[f..f + 2].copy_from_slice(&0x1000u16.to_le_bytes());
        assert_eq!(
            Ovmf::parse(short_huge),
            Err(OvmfError::FooterTableSize { size: 0x1000 })
        );
        // A table reaching into other code just reads garbage entries and fails on one.
        assert!(Ovmf::parse(huge).is_err());

        // The last entry (metadata pointer) claims more than the table holds.
        let mut bad_entry = good.clone();
        let e = footer - 18;
        bad_entry[e..e + 2].copy_from_slice(&500u16.to_le_bytes());
        assert!(matches!(
            Ovmf::parse(bad_entry),
            Err(OvmfError::EntrySize { size: 500, .. })
        ));
        let mut tiny_entry = good.clone();
        tiny_entry[e..e + 2].copy_from_slice(&3u16.to_le_bytes());
        assert!(matches!(
            Ovmf::parse(tiny_entry),
            Err(OvmfError::EntrySize { size: 3, .. })
        ));

        let dup = Image::new(0x2000)
            .entry(SEV_ES_RESET_BLOCK_GUID, &[0; 4])
            .entry(SEV_ES_RESET_BLOCK_GUID, &[0; 4])
            .build();
        assert_eq!(
            Ovmf::parse(dup),
            Err(OvmfError::DuplicateEntry {
                guid: SEV_ES_RESET_BLOCK_GUID
            })
        );
        let short_reset = Image::new(0x2000).entry(SEV_ES_RESET_BLOCK_GUID, &[1, 2]).build();
        assert_eq!(
            Ovmf::parse(short_reset),
            Err(OvmfError::ShortEntry {
                guid: SEV_ES_RESET_BLOCK_GUID,
                len: 2,
                need: 4
            })
        );
    }

    #[test]
    fn refuses_corrupt_metadata() {
        let base = || Image::new(0x4000).entry(SEV_ES_RESET_BLOCK_GUID, &[4, 0, 0x80, 0]);
        let out_of_image = base()
            .entry(OVMF_SEV_METADATA_GUID, &0x5000u32.to_le_bytes())
            .build();
        assert!(matches!(
            Ovmf::parse(out_of_image),
            Err(OvmfError::MetadataOffset { offset: 0x5000, .. })
        ));
        let header_cut = base().entry(OVMF_SEV_METADATA_GUID, &8u32.to_le_bytes()).build();
        assert!(matches!(
            Ovmf::parse(header_cut),
            Err(OvmfError::MetadataOffset { offset: 8, .. })
        ));

        let img = base().metadata(0x800, &[(0x80_0000, 0x1000, 1)]);
        let start = 0x4000 - 0x800;
        let mut sig = img.build();
        sig[start] = b'B';
        assert!(matches!(
            Ovmf::parse(sig),
            Err(OvmfError::MetadataSignature { .. })
        ));
        let mut ver = img.build();
        ver[start + 8] = 2;
        assert_eq!(Ovmf::parse(ver), Err(OvmfError::MetadataVersion { version: 2 }));
        let mut count = img.build();
        count[start + 12] = 2;
        assert!(matches!(
            Ovmf::parse(count),
            Err(OvmfError::MetadataSize { items: 2, .. })
        ));
        let mut count_overflow = img.build();
        count_overflow[start + 12..start + 16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Ovmf::parse(count_overflow),
            Err(OvmfError::MetadataSize { .. })
        ));
        let mut size_past_end = img.build();
        size_past_end[start + 4..start + 8].copy_from_slice(&0x900u32.to_le_bytes());
        assert!(matches!(
            Ovmf::parse(size_past_end),
            Err(OvmfError::MetadataSize { size: 0x900, .. })
        ));
    }

    #[test]
    fn never_panics_on_truncations_or_bit_flips() {
        let good = sev_image().build();
        for cut in (0..good.len()).step_by(509) {
            let _ = Ovmf::parse(good[..cut].to_vec());
        }
        // Flip each byte of the table, footer and metadata region.
        for i in good.len() - 0x800..good.len() {
            let mut b = good.clone();
            b[i] ^= 0xff;
            let _ = Ovmf::parse(b);
        }
    }
}
