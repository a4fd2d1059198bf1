//! The guest's memory as the VMM holds it (vm-memory's `GuestMemoryMmap`): the shared,
//! host-visible copy the guest image is loaded into before the launch copies it into the
//! guest's private (guest_memfd) pages, as KVM's `SNP_LAUNCH_UPDATE` does from `uaddr`.
//!
//! Layout (as QEMU's q35 machine): RAM from 0 up to the 3 GiB PCI hole, the rest from 4 GiB; a
//! firmware image, if any, as a ROM region that ends at 4 GiB.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use vmsa_core::{Gpa, PAGE_SIZE, is_zero};

use crate::size::ByteSize;

/// Where the PCI hole starts: RAM above this is placed from 4 GiB on.
pub const LOW_RAM_END: u64 = 0xC000_0000;
/// 4 GiB: the reset vector's region ends here (where the firmware image ends).
pub use crate::measure::ovmf::FOUR_GIB;
/// The largest firmware image the ROM region takes (it must stay inside the PCI hole).
pub const MAX_ROM: u64 = FOUR_GIB - LOW_RAM_END;

/// One guest-physical range of the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Region {
    /// First address.
    pub gpa: Gpa,
    /// Length in bytes.
    pub len: u64,
    /// Whether this is the firmware ROM.
    pub rom: bool,
}

impl Region {
    /// Whether `[gpa, gpa + len)` lies inside this region.
    pub fn contains(&self, gpa: Gpa, len: u64) -> bool {
        gpa.0 >= self.gpa.0 && gpa.0.saturating_add(len) <= self.gpa.0 + self.len
    }
}

/// Why guest memory could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size breaks a rule.
    #[error("--memory {}: {rule}", ByteSize::new(*size))]
    BadSize {
        /// The size.
        size: u64,
        /// The rule.
        rule: &'static str,
    },
    /// The firmware is larger than the ROM window below 4 GiB.
    #[error("firmware of {size:#x} bytes does not fit below 4 GiB (at most {MAX_ROM:#x})")]
    RomTooLarge {
        /// Its size.
        size: u64,
    },
    /// A range the launch needs lies past the RAM `--memory` gives: more memory would cover it.
    #[error(
        "--memory {}: {what} at GPA {gpa} ({len:#x} bytes) lies beyond the guest memory it gives ({layout}); raise --memory",
        ByteSize::new(*memory)
    )]
    BeyondMemory {
        /// `--memory`, in bytes.
        memory: u64,
        /// What needed it.
        what: String,
        /// Start.
        gpa: Gpa,
        /// Length.
        len: u64,
        /// The layout, for the message.
        layout: String,
    },
    /// A range the launch needs overlaps the PCI hole, where no `--memory` puts RAM.
    #[error(
        "{what} at GPA {gpa} ({len:#x} bytes) is outside guest memory ({layout}); it lies in the PCI hole ({LOW_RAM_END:#x}..{FOUR_GIB:#x}), where no --memory puts RAM"
    )]
    InHole {
        /// What needed it.
        what: String,
        /// Start.
        gpa: Gpa,
        /// Length.
        len: u64,
        /// The layout, for the message.
        layout: String,
    },
    /// The host could not reserve the guest memory asked for.
    #[error("--memory {}: this host cannot reserve that much guest memory: {source}", ByteSize::new(*size))]
    Reserve {
        /// The size asked for.
        size: u64,
        /// vm-memory's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// vm-memory refused an access it had no reason to refuse (the range was checked).
    #[error("guest memory access at GPA {gpa}: {source}")]
    Access {
        /// Where.
        gpa: Gpa,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// `--memory` on every backend: a non-zero multiple of 4 KiB (KVM's memslots and the
/// simulator's RAM are both made of 4 KiB pages).
pub fn check_size(memory: u64) -> Result<(), MemoryError> {
    if memory == 0 || !memory.is_multiple_of(PAGE_SIZE) {
        return Err(MemoryError::BadSize {
            size: memory,
            rule: "guest memory must be a non-zero multiple of 4 KiB",
        });
    }
    Ok(())
}

/// How much [`GuestRam::load`] and [`GuestRam::read`] copy at a time: a page, so that they can
/// skip pages of zeros ([`is_zero`]). Fresh guest memory and a large fresh buffer (`vec![0;
/// n]`, which the allocator then maps zeroed from the kernel) cost no memory until written: an
/// image of data-less pages (an IGVM file's, up to a gigabyte from a 1.6 MB file) written into
/// guest memory and read back for the launch took a gigabyte of resident memory for each copy,
/// where skipping its pages of zeros takes none.
const PAGE: usize = PAGE_SIZE as usize;

/// The VMM's copy of guest memory.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    regions: Vec<Region>,
    /// `--memory`, in bytes.
    memory: u64,
}

impl GuestRam {
    /// `memory` bytes of RAM (a non-zero multiple of 4 KiB) and, if `rom` is given, a ROM
    /// region of that many bytes ending at 4 GiB. The mappings are reserved lazily: untouched
    /// memory costs nothing.
    pub fn new(memory: u64, rom: Option<u64>) -> Result<Self, MemoryError> {
        check_size(memory)?;
        let mut regions = vec![Region {
            gpa: Gpa(0),
            len: memory.min(LOW_RAM_END),
            rom: false,
        }];
        if memory > LOW_RAM_END {
            regions.push(Region {
                gpa: Gpa(FOUR_GIB),
                len: memory - LOW_RAM_END,
                rom: false,
            });
        }
        if let Some(size) = rom {
            if size == 0 || size > MAX_ROM || !size.is_multiple_of(PAGE_SIZE) {
                return Err(MemoryError::RomTooLarge { size });
            }
            regions.push(Region {
                gpa: Gpa(FOUR_GIB - size),
                len: size,
                rom: true,
            });
        }
        regions.sort_by_key(|r| r.gpa);
        Self::from_regions(memory, regions)
    }

    /// [`GuestRam::new`]'s layout (without a ROM) plus image-only regions, marked as ROM, for
    /// the pages of `pages` (4 KiB each) that its RAM does not cover, contiguous pages merged:
    /// an IGVM file places pages anywhere (OVMF below 4 GiB, its VMSA near the top of the
    /// guest physical space).
    pub fn with_image_pages(memory: u64, pages: &[Gpa]) -> Result<Self, MemoryError> {
        let ram = Self::new(memory, None)?;
        let mut missing: Vec<u64> = pages
            .iter()
            .filter(|g| !ram.regions.iter().any(|r| r.contains(**g, PAGE_SIZE)))
            .map(|g| g.0)
            .collect();
        if missing.is_empty() {
            return Ok(ram);
        }
        missing.sort_unstable();
        missing.dedup();
        let mut regions = ram.regions;
        for gpa in missing {
            match regions.last_mut() {
                Some(last) if last.rom && last.gpa.0 + last.len == gpa => last.len += PAGE_SIZE,
                _ => regions.push(Region {
                    gpa: Gpa(gpa),
                    len: PAGE_SIZE,
                    rom: true,
                }),
            }
        }
        regions.sort_by_key(|r| r.gpa);
        Self::from_regions(memory, regions)
    }

    fn from_regions(memory: u64, regions: Vec<Region>) -> Result<Self, MemoryError> {
        let ranges: Vec<(GuestAddress, usize)> = regions
            .iter()
            .map(|r| {
                usize::try_from(r.len)
                    .map(|len| (GuestAddress(r.gpa.0), len))
                    .map_err(|_| MemoryError::BadSize {
                        size: memory,
                        rule: "guest memory must fit in the host's address space",
                    })
            })
            .collect::<Result<_, _>>()?;
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Reserve {
            size: memory,
            source: Box::new(e),
        })?;
        Ok(Self { mem, regions, memory })
    }

    /// The regions, in address order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// A one-line description of the layout.
    pub fn describe(&self) -> String {
        self.regions
            .iter()
            .map(|r| {
                format!(
                    "{}{:#x}..{:#x}",
                    if r.rom { "ROM " } else { "" },
                    r.gpa.0,
                    r.gpa.0 + r.len
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn check(&self, what: &str, gpa: Gpa, len: u64) -> Result<(), MemoryError> {
        if self.regions.iter().any(|r| r.contains(gpa, len)) {
            Ok(())
        } else {
            // Only RAM is missing unless the range reaches into the PCI hole (a ROM region
            // there ends at 4 GiB, so the top of the layout says nothing about the RAM).
            let in_hole = gpa.0 < FOUR_GIB && gpa.0.saturating_add(len) > LOW_RAM_END;
            let (what, layout) = (what.into(), self.describe());
            Err(if in_hole {
                MemoryError::InHole {
                    what,
                    gpa,
                    len,
                    layout,
                }
            } else {
                MemoryError::BeyondMemory {
                    memory: self.memory,
                    what,
                    gpa,
                    len,
                    layout,
                }
            })
        }
    }

    /// Load `bytes` at `gpa` (`what` names it in errors). A page of zeros is not written where
    /// guest memory holds zeros already: untouched guest memory costs nothing.
    pub fn load(&self, what: &str, gpa: Gpa, bytes: &[u8]) -> Result<(), MemoryError> {
        self.check(what, gpa, bytes.len() as u64)?;
        let err = |source| MemoryError::Access { gpa, source };
        let mut there = [0u8; PAGE];
        for (at, chunk) in (gpa.0..).step_by(PAGE).zip(bytes.chunks(PAGE)) {
            let at = GuestAddress(at);
            if is_zero(chunk) {
                let there = &mut there[..chunk.len()];
                self.mem.read_slice(there, at).map_err(err)?;
                if is_zero(there) {
                    continue;
                }
            }
            self.mem.write_slice(chunk, at).map_err(err)?;
        }
        Ok(())
    }

    /// Read `len` bytes at `gpa`. Pages of zeros are not copied: the buffer starts as zeros,
    /// which cost nothing until written.
    pub fn read(&self, what: &str, gpa: Gpa, len: u64) -> Result<Vec<u8>, MemoryError> {
        self.check(what, gpa, len)?;
        let mut buf = vec![0u8; len as usize];
        let mut page = [0u8; PAGE];
        for (at, out) in (gpa.0..).step_by(PAGE).zip(buf.chunks_mut(PAGE)) {
            let page = &mut page[..out.len()];
            self.mem
                .read_slice(page, GuestAddress(at))
                .map_err(|source| MemoryError::Access { gpa, source })?;
            if !is_zero(page) {
                out.copy_from_slice(page);
            }
        }
        Ok(buf)
    }

    /// Ensure `[gpa, gpa + len)` is guest memory.
    pub fn require(&self, what: &str, gpa: Gpa, len: u64) -> Result<(), MemoryError> {
        self.check(what, gpa, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::resident_bytes;

    /// Loading 512 MiB of zeros into guest memory and reading them back for the launch took
    /// a gigabyte of resident memory (both copies written); pages of zeros are now skipped,
    /// and pages with data still land and come back where they belong.
    #[test]
    fn pages_of_zeros_cost_no_memory_to_load_or_read_back() {
        const LEN: usize = 512 << 20;
        let ram = GuestRam::new(1 << 30, None).unwrap();
        let mut image = vec![0u8; LEN];
        let before = resident_bytes();
        image[5] = 1;
        image[LEN - 1] = 2;
        ram.load("test", Gpa(0x10_0000), &image).unwrap();
        let back = ram.read("test", Gpa(0x10_0000), LEN as u64).unwrap();
        let grown = resident_bytes().saturating_sub(before);
        assert!(
            grown < 64 << 20,
            "{grown} bytes resident for 512 MiB of zeros loaded and read back"
        );
        assert_eq!((back[5], back[LEN - 1]), (1, 2));
        assert!(back == image, "what was loaded comes back");
        // A page of zeros over data is written: skipping is only for memory that is zero.
        ram.load("test", Gpa(0x10_0000), &[0; 16]).unwrap();
        assert_eq!(ram.read("test", Gpa(0x10_0000), 16).unwrap(), [0; 16]);
    }

    #[test]
    fn splits_around_the_pci_hole_and_places_the_rom_below_4g() {
        let ram = GuestRam::new(4 << 30, Some(2 << 20)).unwrap();
        assert_eq!(
            ram.regions(),
            &[
                Region {
                    gpa: Gpa(0),
                    len: LOW_RAM_END,
                    rom: false
                },
                Region {
                    gpa: Gpa(FOUR_GIB - (2 << 20)),
                    len: 2 << 20,
                    rom: true
                },
                Region {
                    gpa: Gpa(FOUR_GIB),
                    len: (4 << 30) - LOW_RAM_END,
                    rom: false
                },
            ]
        );
    }

    #[test]
    fn loads_and_reads_back_and_refuses_out_of_range() {
        let ram = GuestRam::new(16 << 20, None).unwrap();
        ram.load("image", Gpa(0x10_0000), &[0xf4; 8192]).unwrap();
        assert_eq!(ram.read("image", Gpa(0x10_1000), 4096).unwrap(), vec![0xf4; 4096]);
        let e = ram.load("firmware", Gpa(16 << 20), &[0; 4096]).unwrap_err();
        assert!(
            e.to_string()
                .contains("--memory 16MiB: firmware at GPA 0x1000000 (0x1000 bytes) lies beyond the guest memory it gives (0x0..0x1000000)"),
            "{e}"
        );
        assert!(e.to_string().ends_with("raise --memory"), "{e}");
        // A range in the PCI hole: more memory would not cover it, so the message says why.
        let big = GuestRam::new(4 << 30, Some(2 << 20)).unwrap();
        let e = big
            .require("metadata", Gpa(LOW_RAM_END + 0x1000), 0x1000)
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("PCI hole") && !text.contains("raise --memory"),
            "{text}"
        );
    }

    /// With a firmware ROM ending at 4 GiB, a range past too small a `--memory` was said to lie
    /// "in a hole of the layout (the PCI hole below 4 GiB)", as if no --memory could cover it.
    #[test]
    fn a_range_past_ram_below_a_rom_is_beyond_memory_not_in_the_hole() {
        let ram = GuestRam::new(8 << 20, Some(2 << 20)).unwrap();
        let e = ram.require("SNP_SEC_MEM", Gpa(0x80_0000), 0x9000).unwrap_err();
        assert!(matches!(e, MemoryError::BeyondMemory { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.starts_with("--memory 8MiB: SNP_SEC_MEM at GPA "), "{text}");
        assert!(
            text.ends_with("raise --memory") && !text.contains("hole"),
            "{text}"
        );
        // Just below the hole with more memory: still beyond, not in the hole.
        let ram = GuestRam::new(1 << 30, Some(2 << 20)).unwrap();
        let e = ram.require("x", Gpa(LOW_RAM_END - 0x1000), 0x1000).unwrap_err();
        assert!(matches!(e, MemoryError::BeyondMemory { .. }), "{e:?}");
    }

    #[test]
    fn image_pages_outside_ram_get_their_own_regions() {
        let vmsa = Gpa(0xffff_ffff_f000);
        let pages = [Gpa(0x1000), Gpa(FOUR_GIB - 0x2000), Gpa(FOUR_GIB - 0x1000), vmsa];
        let ram = GuestRam::with_image_pages(16 << 20, &pages).unwrap();
        assert_eq!(
            ram.describe(),
            "0x0..0x1000000, ROM 0xffffe000..0x100000000, ROM 0xfffffffff000..0x1000000000000"
        );
        ram.load("vmsa", vmsa, &[1; 4096]).unwrap();
        assert_eq!(ram.read("vmsa", vmsa, 4096).unwrap(), vec![1; 4096]);
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(GuestRam::new(0, None), Err(MemoryError::BadSize { .. })));
        assert!(matches!(
            GuestRam::new(4097, None),
            Err(MemoryError::BadSize { .. })
        ));
        assert!(matches!(
            GuestRam::new(1 << 20, Some(2 << 30)),
            Err(MemoryError::RomTooLarge { .. })
        ));
    }
}
