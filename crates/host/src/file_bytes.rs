//! An input file's bytes in memory, on transparent huge pages where the kernel offers them.
//!
//! Reading a firmware image into a fresh heap buffer costs one page fault per 4 KiB of it when
//! the copy first touches the buffer. Measured on the development machine (a PVM guest, where
//! every fault also updates a shadow page table): 1.1 to 1.9 ms to read Debian's 2 MiB
//! `OVMF.fd` into a new `Vec`, against 0.3 to 0.5 ms into anonymous memory advised
//! `MADV_HUGEPAGE` and populated with `MADV_POPULATE_WRITE` (one 2 MiB page, one fault) — more
//! than the hashing of the image that follows. Mapping the file itself would avoid the copy
//! too, but a file truncated meanwhile would then end the VMM with `SIGBUS` instead of an error,
//! and a file written meanwhile would change bytes Rust assumes immutable; the copy into private
//! memory costs ~0.15 ms and keeps both out.

use std::fmt;
use std::ops::{Deref, DerefMut};

use memmap2::{Advice, MmapMut};

/// The size of a transparent huge page on x86-64.
const HUGE_PAGE: usize = 2 << 20;

/// Files at least this large are read into huge-page memory: one 2 MiB page costs less to
/// allocate and zero than the 256 faults of a heap buffer half its size.
pub(crate) const HUGE_MIN: u64 = (HUGE_PAGE / 2) as u64;

/// An input file's bytes, in memory: on the heap, or in anonymous memory backed by transparent
/// huge pages where the kernel offers them. Either way a plain byte slice.
pub struct FileBytes(Repr);

enum Repr {
    Heap(Vec<u8>),
    /// `len` bytes from `start` in `map`; `start` is 2 MiB-aligned in memory.
    Mapped {
        map: MmapMut,
        start: usize,
        len: usize,
    },
}

impl FileBytes {
    /// A zeroed buffer of `len` bytes in anonymous memory advised for transparent huge pages
    /// and populated at once; `None` if the mapping cannot be made. The advice is only advice:
    /// where the kernel has no huge pages (or no `MADV_POPULATE_WRITE`, before Linux 5.14) the
    /// buffer is ordinary memory, faulted in as it is written.
    pub(crate) fn huge_zeroed(len: usize) -> Option<Self> {
        let span = len.checked_next_multiple_of(HUGE_PAGE)?;
        // One huge page more than needed, so that a 2 MiB-aligned span fits inside.
        let map = MmapMut::map_anon(span.checked_add(HUGE_PAGE)?).ok()?;
        let addr = map.as_ptr() as usize;
        let start = addr.next_multiple_of(HUGE_PAGE) - addr;
        // Both are best effort (see above); a failure leaves ordinary anonymous memory.
        let _ = map.advise_range(Advice::HugePage, start, span);
        let _ = map.advise_range(Advice::PopulateWrite, start, len.next_multiple_of(4096));
        Some(Self(Repr::Mapped { map, start, len }))
    }

    /// Keep only the first `len` bytes (a file that shrank while it was read).
    pub(crate) fn truncate(&mut self, new_len: usize) {
        match &mut self.0 {
            Repr::Heap(v) => v.truncate(new_len),
            Repr::Mapped { len, .. } => *len = new_len.min(*len),
        }
    }
}

impl Deref for FileBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            Repr::Heap(v) => v,
            Repr::Mapped { map, start, len } => &map[*start..*start + *len],
        }
    }
}

impl DerefMut for FileBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.0 {
            Repr::Heap(v) => v,
            Repr::Mapped { map, start, len } => &mut map[*start..*start + *len],
        }
    }
}

impl From<Vec<u8>> for FileBytes {
    fn from(v: Vec<u8>) -> Self {
        Self(Repr::Heap(v))
    }
}

impl PartialEq for FileBytes {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for FileBytes {}

impl fmt::Debug for FileBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let place = match self.0 {
            Repr::Heap(_) => "heap",
            Repr::Mapped { .. } => "huge-page memory",
        };
        write!(f, "FileBytes({} bytes in {place})", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_buffer_is_zeroed_writable_and_2m_aligned() {
        let mut b = FileBytes::huge_zeroed(HUGE_PAGE + 5).unwrap();
        assert_eq!(b.len(), HUGE_PAGE + 5);
        assert_eq!(b.as_ptr() as usize % HUGE_PAGE, 0);
        assert!(b.iter().all(|&x| x == 0));
        b[HUGE_PAGE + 4] = 7;
        b.truncate(HUGE_PAGE + 5 + 1);
        assert_eq!(b.len(), HUGE_PAGE + 5, "truncate never grows");
        b.truncate(HUGE_PAGE + 5);
        assert_eq!(b[HUGE_PAGE + 4], 7);
        assert_eq!(b, FileBytes::from(b.to_vec()));
        assert!(format!("{b:?}").contains("huge-page memory"));
    }
}
