//! Guest memory: guest_memfd (`KVM_CREATE_GUEST_MEMFD`, `KVM_SET_USER_MEMORY_REGION2`) and the
//! shared RAM of VMSA-image VMs.
//!
//! [`GuestMemfd`] owns the fd and, when created with `GUEST_MEMFD_FLAG_MMAP`, its shared
//! mapping. [`GuestRam`] is one memslot of shared guest RAM, backed as [`RamBacking`] says:
//! where KVM has a mappable guest_memfd (`KVM_CAP_GUEST_MEMFD_FLAGS` with `MMAP |
//! INIT_SHARED`, Linux 6.18), a guest_memfd whose `userspace_addr` is its own mapping: on the
//! PVM hosts this project runs on, that is the only arrangement in which the guest really runs
//! from guest_memfd memory (`kvm_gmem_mmap` serves the faults of that mapping from the same
//! folios the guest maps); elsewhere (kernels before 6.18, or built without
//! `CONFIG_KVM_GUEST_MEMFD`, where `KVM_CREATE_GUEST_MEMFD` is `ENOTTY`), anonymous memory in
//! an ordinary `KVM_SET_USER_MEMORY_REGION` slot, as every VMM backs a default VM's RAM. The
//! memslot is deleted before the mapping is unmapped and the fd closed, so KVM never holds a
//! dangling `userspace_addr`.
//!
//! Host accesses race with running vCPUs by design (the GHCB and mailboxes are shared
//! memory): the mapping is vm-memory's [`MmapRegion`], whose volatile slices and atomic
//! references make a racing guest store visible whole or not at all, never undefined behaviour
//! of this process.

use std::fmt;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::{
    KVM_MEM_GUEST_MEMFD, kvm_create_guest_memfd, kvm_userspace_memory_region, kvm_userspace_memory_region2,
};
use kvm_ioctls::VmFd;
use serde::Serialize;
use vm_memory::mmap::MmapRegionError;
use vm_memory::{FileOffset, MmapRegion, VolatileMemory, VolatileSlice};
use vmsa_core::PAGE_SIZE;

use crate::error::{Errno, IoctlError};
use crate::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};

/// Why guest memory could not be set up or accessed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
pub enum GmemError {
    /// An ioctl failed.
    #[error(transparent)]
    Ioctl(#[from] IoctlError),
    /// `mmap` of the guest_memfd or of anonymous memory failed.
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

/// A guest_memfd and, if it is mappable, its host mapping (shared, read-write).
#[derive(Debug)]
pub struct GuestMemfd {
    // Field order is drop order: unmap before closing the fd.
    map: Option<MmapRegion>,
    file: Arc<File>,
    size: u64,
    flags: u64,
}

impl GuestMemfd {
    /// `KVM_CREATE_GUEST_MEMFD` of `size` bytes with `flags`; mapped shared when `flags` has
    /// `GUEST_MEMFD_FLAG_MMAP`.
    pub fn create(vm: &VmFd, size: u64, flags: u64) -> Result<Self, GmemError> {
        let len = mapping_len(size)?;
        let raw = vm
            .create_guest_memfd(kvm_create_guest_memfd {
                size,
                flags,
                ..Default::default()
            })
            .map_err(|e| IoctlError::new("KVM_CREATE_GUEST_MEMFD", e))?;
        // SAFETY: KVM_CREATE_GUEST_MEMFD returned a new fd that nothing else owns.
        let file = unsafe { File::from_raw_fd(raw) };
        // __kvm_gmem_create allocates the fd with get_unused_fd_flags(0): without this, a child
        // that forks and execs inherits it, and with it a reference to the VM (kvm_get_kvm).
        set_cloexec(file.as_fd())?;
        let file = Arc::new(file);
        let map = if flags & GUEST_MEMFD_FLAG_MMAP != 0 {
            let region = MmapRegion::from_file(FileOffset::from_arc(file.clone(), 0), len)
                .map_err(|e| mmap_error(size, &e))?;
            Some(region)
        } else {
            None
        };
        Ok(Self {
            map,
            file,
            size,
            flags,
        })
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
        self.file.as_raw_fd()
    }

    /// The host mapping.
    fn mapping(&self) -> Result<&MmapRegion, GmemError> {
        self.map
            .as_ref()
            .ok_or(GmemError::NotMapped { flags: self.flags })
    }

    /// The host address of the mapping.
    pub fn host_addr(&self) -> Result<u64, GmemError> {
        Ok(self.mapping()?.as_ptr() as u64)
    }
}

/// What backs a VMSA-image VM's shared guest RAM ([`GuestRam`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RamBacking {
    /// A guest_memfd created `MMAP | INIT_SHARED`, mapped at its own `userspace_addr`, in a
    /// `KVM_SET_USER_MEMORY_REGION2` slot.
    GuestMemfd,
    /// Anonymous memory in a `KVM_SET_USER_MEMORY_REGION` slot, where KVM has no mappable
    /// guest_memfd.
    Anonymous,
}

impl RamBacking {
    /// The ioctl that registers a memslot of this backing.
    pub fn memslot_call(self) -> &'static str {
        match self {
            Self::GuestMemfd => "KVM_SET_USER_MEMORY_REGION2",
            Self::Anonymous => "KVM_SET_USER_MEMORY_REGION",
        }
    }

    /// How the frames of this backing go back to the host (reports cannot count them).
    pub fn released_by(self) -> &'static str {
        match self {
            Self::GuestMemfd => "guest memory is guest_memfd, released by the kernel when its fd closes",
            Self::Anonymous => {
                "guest memory is anonymous memory of this process, unmapped when the VM is torn down"
            }
        }
    }
}

impl fmt::Display for RamBacking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::GuestMemfd => "guest_memfd (MMAP | INIT_SHARED)",
            Self::Anonymous => "anonymous memory (no mappable guest_memfd here)",
        })
    }
}

/// The memory behind a [`GuestRam`].
#[derive(Debug)]
enum Backing {
    Gmem(GuestMemfd),
    Anonymous(MmapRegion),
}

/// One memslot of shared guest RAM, backed as its [`RamBacking`] says. Deleted from the VM on
/// drop.
#[derive(Debug)]
pub struct GuestRam {
    vm: Arc<VmFd>,
    slot: u32,
    gpa: u64,
    size: u64,
    // Dropped after the memslot is deleted (in `Drop::drop`).
    backing: Backing,
}

impl GuestRam {
    /// Create `size` bytes of memory backed as `backing` says and register it as memslot
    /// `slot` at `gpa`.
    pub fn new(
        vm: Arc<VmFd>,
        slot: u32,
        gpa: u64,
        size: u64,
        backing: RamBacking,
    ) -> Result<Self, GmemError> {
        if !gpa.is_multiple_of(PAGE_SIZE) || gpa.checked_add(size).is_none() {
            return Err(GmemError::BadSize { size });
        }
        let backing = match backing {
            RamBacking::GuestMemfd => {
                let gmem =
                    GuestMemfd::create(&vm, size, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)?;
                let region = kvm_userspace_memory_region2 {
                    slot,
                    flags: KVM_MEM_GUEST_MEMFD,
                    guest_phys_addr: gpa,
                    memory_size: size,
                    userspace_addr: gmem.host_addr()?,
                    guest_memfd_offset: 0,
                    guest_memfd: gmem.raw_fd() as u32,
                    ..Default::default()
                };
                // SAFETY: `userspace_addr` is the guest_memfd's own shared mapping of exactly
                // `size` bytes, owned by the returned `GuestRam`, whose Drop deletes this
                // memslot before the mapping is unmapped; KVM therefore never uses the address
                // after it is released.
                unsafe { vm.set_user_memory_region2(region) }
                    .map_err(|e| IoctlError::new(RamBacking::GuestMemfd.memslot_call(), e))?;
                Backing::Gmem(gmem)
            }
            RamBacking::Anonymous => {
                let map = MmapRegion::new(mapping_len(size)?).map_err(|e| mmap_error(size, &e))?;
                let region = kvm_userspace_memory_region {
                    slot,
                    flags: 0,
                    guest_phys_addr: gpa,
                    memory_size: size,
                    userspace_addr: map.as_ptr() as u64,
                };
                // SAFETY: `userspace_addr` is an anonymous mapping of exactly `size` bytes,
                // owned by the returned `GuestRam`, whose Drop deletes this memslot before the
                // mapping is unmapped; KVM therefore never uses the address after it is
                // released.
                unsafe { vm.set_user_memory_region(region) }
                    .map_err(|e| IoctlError::new(RamBacking::Anonymous.memslot_call(), e))?;
                Backing::Anonymous(map)
            }
        };
        Ok(Self {
            vm,
            slot,
            gpa,
            size,
            backing,
        })
    }

    /// What backs this RAM.
    pub fn backing(&self) -> RamBacking {
        match self.backing {
            Backing::Gmem(_) => RamBacking::GuestMemfd,
            Backing::Anonymous(_) => RamBacking::Anonymous,
        }
    }

    /// The host mapping.
    fn mapping(&self) -> Result<&MmapRegion, GmemError> {
        match &self.backing {
            Backing::Gmem(gmem) => gmem.mapping(),
            Backing::Anonymous(map) => Ok(map),
        }
    }

    /// The first guest-physical address.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memslot number.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The offset of `gpa` in this slot, if the `len` bytes from it are inside.
    pub fn offset_of(&self, gpa: u64, len: u64) -> Option<u64> {
        let off = gpa.checked_sub(self.gpa)?;
        (off.checked_add(len)? <= self.size()).then_some(off)
    }

    /// The `len` bytes at `gpa` as a volatile slice of the mapping.
    fn slice(&self, gpa: u64, len: u64) -> Result<VolatileSlice<'_>, GmemError> {
        let out = GmemError::OutOfRange {
            offset: gpa,
            len,
            size: self.size(),
        };
        let off = self.offset_of(gpa, len).ok_or(out.clone())?;
        self.mapping()?
            .get_slice(off as usize, len as usize)
            .map_err(|_| out)
    }

    /// The u64 at `gpa` as an atomic.
    fn atomic(&self, gpa: u64) -> Result<&AtomicU64, GmemError> {
        if !gpa.is_multiple_of(8) {
            return Err(GmemError::Unaligned { offset: gpa });
        }
        let off = self.offset_of(gpa, 8).ok_or(GmemError::OutOfRange {
            offset: gpa,
            len: 8,
            size: self.size(),
        })?;
        self.mapping()?
            .get_atomic_ref::<AtomicU64>(off as usize)
            .map_err(|_| GmemError::Unaligned { offset: gpa })
    }

    /// Read guest memory at `gpa`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GmemError> {
        self.slice(gpa, buf.len() as u64)?.copy_to(buf);
        Ok(())
    }

    /// Write guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), GmemError> {
        self.slice(gpa, data.len() as u64)?.copy_from(data);
        Ok(())
    }

    /// Atomically read the u64 at `gpa`.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, GmemError> {
        Ok(self.atomic(gpa)?.load(Ordering::SeqCst))
    }

    /// Atomically write the u64 at `gpa`.
    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<(), GmemError> {
        self.atomic(gpa)?.store(value, Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // A failure to delete the slot (only if the VM is already being destroyed) leaves
        // nothing that can use the mapping once the VM fd closes.
        match &self.backing {
            Backing::Gmem(gmem) => {
                let region = kvm_userspace_memory_region2 {
                    slot: self.slot,
                    flags: KVM_MEM_GUEST_MEMFD,
                    guest_phys_addr: self.gpa,
                    guest_memfd: gmem.raw_fd() as u32,
                    ..Default::default()
                };
                // SAFETY: memory_size 0 deletes the slot; KVM is handed no memory.
                let _ = unsafe { self.vm.set_user_memory_region2(region) };
            }
            Backing::Anonymous(_) => {
                let region = kvm_userspace_memory_region {
                    slot: self.slot,
                    guest_phys_addr: self.gpa,
                    ..Default::default()
                };
                // SAFETY: memory_size 0 deletes the slot; KVM is handed no memory.
                let _ = unsafe { self.vm.set_user_memory_region(region) };
            }
        }
    }
}

/// Set `FD_CLOEXEC` on `fd` (`fcntl(F_SETFD)`), so that an `exec` closes it.
pub fn set_cloexec(fd: BorrowedFd<'_>) -> Result<(), IoctlError> {
    let call = "fcntl(F_SETFD, FD_CLOEXEC)";
    // SAFETY: F_GETFD reads the flags of an fd that `fd` borrows, so it is open; no memory is
    // passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    if flags < 0 {
        return Err(IoctlError::new(call, vmm_sys_util::errno::Error::last()));
    }
    // SAFETY: as above; F_SETFD only changes that fd's descriptor flags.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(IoctlError::new(call, vmm_sys_util::errno::Error::last()));
    }
    Ok(())
}

/// `size` as the length of a mapping: non-zero, page aligned, addressable.
fn mapping_len(size: u64) -> Result<usize, GmemError> {
    match usize::try_from(size) {
        Ok(len) if size != 0 && size.is_multiple_of(PAGE_SIZE) => Ok(len),
        _ => Err(GmemError::BadSize { size }),
    }
}

/// [`GmemError::Mmap`] of a failed mapping of `len` bytes.
fn mmap_error(len: u64, e: &MmapRegionError) -> GmemError {
    GmemError::Mmap {
        len,
        errno: match e {
            MmapRegionError::Mmap(io) => Errno::from(io),
            _ => Errno::new(libc::EINVAL),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

    use super::*;

    fn fd_flags(fd: &OwnedFd) -> libc::c_int {
        // SAFETY: F_GETFD of an fd `fd` owns; no memory is passed.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) }
    }

    #[test]
    fn set_cloexec_marks_an_inheritable_fd_close_on_exec() {
        // pipe(2) without O_CLOEXEC: inheritable, as KVM_CREATE_GUEST_MEMFD's fd is
        // (get_unused_fd_flags(0) in __kvm_gmem_create).
        let mut fds = [0; 2];
        // SAFETY: `fds` is an array of two ints for pipe(2) to fill.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: pipe(2) returned two new fds that nothing else owns.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        assert_eq!(fd_flags(&r) & libc::FD_CLOEXEC, 0);
        set_cloexec(r.as_fd()).unwrap();
        assert_eq!(fd_flags(&r) & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        assert_eq!(fd_flags(&w) & libc::FD_CLOEXEC, 0, "only the fd asked for");
        // Idempotent.
        set_cloexec(r.as_fd()).unwrap();
        assert_eq!(fd_flags(&r) & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
    }
}
