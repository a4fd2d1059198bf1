//! guest_memfd-backed guest memory (`KVM_CREATE_GUEST_MEMFD`, `KVM_SET_USER_MEMORY_REGION2`).
//!
//! [`GuestMemfd`] owns the fd and, when created with `GUEST_MEMFD_FLAG_MMAP`, its shared
//! mapping. [`GuestRam`] is one memslot backed by a guest_memfd with `MMAP | INIT_SHARED`
//! whose `userspace_addr` is the guest_memfd's own mapping: on the PVM hosts this project runs
//! on, that is the only arrangement in which the guest really runs from guest_memfd memory
//! (`kvm_gmem_mmap` serves the faults of that mapping from the same folios the guest maps). The
//! memslot is deleted before the mapping is unmapped and the fd closed, so KVM never holds a
//! dangling `userspace_addr`.
//!
//! Host accesses race with running vCPUs by design (the GHCB and mailboxes are shared
//! memory): bulk copies are volatile and 64-bit fields are accessed atomically, so a racing
//! guest store is seen whole or not at all, never as undefined behaviour of this process.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::{KVM_MEM_GUEST_MEMFD, kvm_create_guest_memfd, kvm_userspace_memory_region2};
use kvm_ioctls::VmFd;
use serde::Serialize;
use vmsa_core::PAGE_SIZE;

use crate::error::{Errno, IoctlError};
use crate::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};

/// Why guest memory could not be set up or accessed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
pub enum GmemError {
    /// An ioctl failed.
    #[error(transparent)]
    Ioctl(#[from] IoctlError),
    /// `mmap` of the guest_memfd (or of anonymous memory) failed.
    #[error("mmap of {len:#x} bytes failed with {errno}")]
    Mmap {
        /// The length asked for.
        len: u64,
        /// Why.
        errno: Errno,
    },
    /// The size is zero, not page aligned or too large for this host.
    #[error("guest memory size {size:#x} must be a non-zero multiple of 4096 that fits the address space")]
    BadSize {
        /// The size asked for.
        size: u64,
    },
    /// An access fell outside the memory.
    #[error("access of {len:#x} bytes at offset {offset:#x} is outside the {size:#x}-byte guest memory")]
    OutOfRange {
        /// Where the access started.
        offset: u64,
        /// Its length.
        len: u64,
        /// The memory's size.
        size: u64,
    },
    /// A 64-bit access was not 8-byte aligned.
    #[error("64-bit access at offset {offset:#x} is not 8-byte aligned")]
    Unaligned {
        /// The offset.
        offset: u64,
    },
    /// The guest_memfd was created without `GUEST_MEMFD_FLAG_MMAP`, so the host cannot touch it.
    #[error("the guest_memfd has no host mapping (created with flags {flags:#x})")]
    NotMapped {
        /// Its creation flags.
        flags: u64,
    },
}

/// A shared memory mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `Mapping` is a plain address range of a MAP_SHARED / anonymous mapping that lives as
// long as the value; every access through it is bounds-checked and volatile or atomic, so
// sharing it across threads introduces no unsynchronized Rust references.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only permits volatile/atomic accesses.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map `len` bytes of `fd` shared, read-write.
    fn shared(fd: RawFd, len: u64) -> Result<Self, GmemError> {
        Self::map(len, libc::MAP_SHARED, fd)
    }

    /// Map `len` bytes of zeroed anonymous private memory (the unit tests' scratch memory).
    #[cfg(test)]
    pub fn anonymous(len: u64) -> Result<Self, GmemError> {
        Self::map(
            len,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
        )
    }

    fn map(len: u64, flags: libc::c_int, fd: RawFd) -> Result<Self, GmemError> {
        let size = usize::try_from(len).map_err(|_| GmemError::BadSize { size: len })?;
        if size == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return Err(GmemError::BadSize { size: len });
        }
        // SAFETY: a fresh mapping at an address the kernel chooses (NULL hint), so no existing
        // Rust object is affected; `fd` is either -1 (anonymous) or an fd the caller owns for
        // the duration of the call. The result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(GmemError::Mmap {
                len,
                errno: Errno::last(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(GmemError::Mmap {
            len,
            errno: Errno::new(libc::EFAULT),
        })?;
        Ok(Self { ptr, len: size })
    }

    /// The host virtual address of the first byte.
    pub fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The length in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Whether the mapping is empty (never: mappings are at least a page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: u64, len: u64) -> Result<usize, GmemError> {
        let size = self.len as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize),
            _ => Err(GmemError::OutOfRange { offset, len, size }),
        }
    }

    /// Copy `buf.len()` bytes from `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), GmemError> {
        let start = self.check(offset, buf.len() as u64)?;
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `start + i < self.len` (checked above) and the mapping is live while
            // `self` is; a volatile read of a byte of shared memory cannot observe a torn value.
            *b = unsafe { self.ptr.as_ptr().add(start + i).read_volatile() };
        }
        Ok(())
    }

    /// Copy `data` to `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), GmemError> {
        let start = self.check(offset, data.len() as u64)?;
        for (i, b) in data.iter().enumerate() {
            // SAFETY: `start + i < self.len` (checked above), the mapping is live and writable
            // while `self` is, and no Rust reference into it exists.
            unsafe { self.ptr.as_ptr().add(start + i).write_volatile(*b) };
        }
        Ok(())
    }

    fn atomic(&self, offset: u64) -> Result<&AtomicU64, GmemError> {
        let start = self.check(offset, 8)?;
        if !offset.is_multiple_of(8) {
            return Err(GmemError::Unaligned { offset });
        }
        // SAFETY: the 8 bytes at `start` are inside the live mapping (checked), 8-byte aligned
        // (the mapping is page aligned and the offset is a multiple of 8), and only ever
        // accessed atomically or volatilely by this process; the returned reference borrows
        // `self`, so it cannot outlive the mapping.
        Ok(unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(start).cast::<u64>()) })
    }

    /// Atomically read the little-endian u64 at `offset` (8-byte aligned).
    pub fn read_u64(&self, offset: u64) -> Result<u64, GmemError> {
        Ok(self.atomic(offset)?.load(Ordering::SeqCst))
    }

    /// Atomically write the little-endian u64 at `offset` (8-byte aligned).
    pub fn write_u64(&self, offset: u64, value: u64) -> Result<(), GmemError> {
        self.atomic(offset)?.store(value, Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe exactly the mapping created in `map`, which nothing else
        // unmaps; after this no access through `self` is possible.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A guest_memfd and, if it is mappable, its host mapping.
#[derive(Debug)]
pub struct GuestMemfd {
    // Field order is drop order: unmap before closing the fd.
    map: Option<Mapping>,
    fd: OwnedFd,
    size: u64,
    flags: u64,
}

impl GuestMemfd {
    /// `KVM_CREATE_GUEST_MEMFD` of `size` bytes with `flags`; mapped shared when `flags` has
    /// `GUEST_MEMFD_FLAG_MMAP`.
    pub fn create(vm: &VmFd, size: u64, flags: u64) -> Result<Self, GmemError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) || usize::try_from(size).is_err() {
            return Err(GmemError::BadSize { size });
        }
        let raw = vm
            .create_guest_memfd(kvm_create_guest_memfd {
                size,
                flags,
                ..Default::default()
            })
            .map_err(|e| IoctlError::new("KVM_CREATE_GUEST_MEMFD", e))?;
        // SAFETY: KVM_CREATE_GUEST_MEMFD returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let map = if flags & GUEST_MEMFD_FLAG_MMAP != 0 {
            Some(Mapping::shared(fd.as_raw_fd(), size)?)
        } else {
            None
        };
        Ok(Self { map, fd, size, flags })
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The creation flags.
    pub fn flags(&self) -> u64 {
        self.flags
    }

    /// The raw fd (for memslots).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The host mapping.
    pub fn mapping(&self) -> Result<&Mapping, GmemError> {
        self.map
            .as_ref()
            .ok_or(GmemError::NotMapped { flags: self.flags })
    }
}

/// One memslot of shared guest RAM backed by a guest_memfd (`MMAP | INIT_SHARED`), mapped at
/// its own `userspace_addr`. Deleted from the VM on drop.
#[derive(Debug)]
pub struct GuestRam {
    vm: Arc<VmFd>,
    slot: u32,
    gpa: u64,
    // Dropped after the memslot is deleted (in `Drop::drop`).
    gmem: GuestMemfd,
}

impl GuestRam {
    /// Create a guest_memfd of `size` bytes and register it as memslot `slot` at `gpa`.
    pub fn new(vm: Arc<VmFd>, slot: u32, gpa: u64, size: u64) -> Result<Self, GmemError> {
        if !gpa.is_multiple_of(PAGE_SIZE) || gpa.checked_add(size).is_none() {
            return Err(GmemError::BadSize { size });
        }
        let gmem = GuestMemfd::create(&vm, size, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)?;
        let userspace_addr = gmem.mapping()?.host_addr();
        let region = kvm_userspace_memory_region2 {
            slot,
            flags: KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr,
            guest_memfd_offset: 0,
            guest_memfd: gmem.raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `userspace_addr` is the guest_memfd's own shared mapping of exactly `size`
        // bytes, owned by the returned `GuestRam`, whose Drop deletes this memslot before the
        // mapping is unmapped; KVM therefore never uses the address after it is released.
        unsafe { vm.set_user_memory_region2(region) }
            .map_err(|e| IoctlError::new("KVM_SET_USER_MEMORY_REGION2", e))?;
        Ok(Self { vm, slot, gpa, gmem })
    }

    /// The first guest-physical address.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.gmem.size()
    }

    /// The memslot number.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The backing guest_memfd.
    pub fn gmem(&self) -> &GuestMemfd {
        &self.gmem
    }

    /// The offset of `gpa` in this slot, if the `len` bytes from it are inside.
    pub fn offset_of(&self, gpa: u64, len: u64) -> Option<u64> {
        let off = gpa.checked_sub(self.gpa)?;
        (off.checked_add(len)? <= self.size()).then_some(off)
    }

    fn at(&self, gpa: u64, len: u64) -> Result<(&Mapping, u64), GmemError> {
        let map = self.gmem.mapping()?;
        let off = self.offset_of(gpa, len).ok_or(GmemError::OutOfRange {
            offset: gpa,
            len,
            size: self.size(),
        })?;
        Ok((map, off))
    }

    /// Read guest memory at `gpa`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GmemError> {
        let (map, off) = self.at(gpa, buf.len() as u64)?;
        map.read(off, buf)
    }

    /// Write guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), GmemError> {
        let (map, off) = self.at(gpa, data.len() as u64)?;
        map.write(off, data)
    }

    /// Atomically read the u64 at `gpa`.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, GmemError> {
        let (map, off) = self.at(gpa, 8)?;
        map.read_u64(off)
    }

    /// Atomically write the u64 at `gpa`.
    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<(), GmemError> {
        let (map, off) = self.at(gpa, 8)?;
        map.write_u64(off, value)
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        let region = kvm_userspace_memory_region2 {
            slot: self.slot,
            flags: KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: self.gpa,
            memory_size: 0,
            userspace_addr: 0,
            guest_memfd_offset: 0,
            guest_memfd: self.gmem.raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: memory_size 0 deletes the slot; no host memory is handed to KVM. A failure
        // (only if the VM is already being destroyed) leaves nothing that can use the mapping
        // once the VM fd closes.
        let _ = unsafe { self.vm.set_user_memory_region2(region) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_mapping_bounds_and_atomics() {
        let m = Mapping::anonymous(8192).unwrap();
        assert_eq!(m.len(), 8192);
        m.write(4090, &[1, 2, 3, 4, 5, 6]).unwrap();
        let mut b = [0u8; 6];
        m.read(4090, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4, 5, 6]);
        assert_eq!(
            m.read(8190, &mut [0u8; 4]),
            Err(GmemError::OutOfRange {
                offset: 8190,
                len: 4,
                size: 8192
            })
        );
        assert!(m.write(u64::MAX, &[0]).is_err());
        m.write_u64(16, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(m.read_u64(16).unwrap(), 0x1122_3344_5566_7788);
        let mut b = [0u8; 8];
        m.read(16, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0x1122_3344_5566_7788);
        assert_eq!(m.read_u64(17), Err(GmemError::Unaligned { offset: 17 }));
        assert_eq!(
            Mapping::anonymous(100).unwrap_err(),
            GmemError::BadSize { size: 100 }
        );
    }
}
