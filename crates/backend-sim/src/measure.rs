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
//!
//! Only the `PAGE_INFO` chain is sequential: the contents hashes are independent of each other
//! and of the chain, so [`SnpLaunchDigest::update_pages`] hashes each distinct page once, on
//! every core, before it runs the chain (what `vmm measure` needs for hundreds of identical AP
//! VMSAs and a 2 MiB firmware image).

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use sha2::{Digest, Sha256, Sha384};
use sha384_pages::sha384_pages;
use vmsa_core::{Gpa, PAGE_SIZE, PageBuf, SnpPageType};

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

    /// Extend the digest with `pages` in order: the same digest as [`SnpLaunchDigest::update`]
    /// on each, faster. A page equal to the last page whose contents were hashed (a run of
    /// identical AP VMSAs, of erased flash) reuses that hash; the remaining contents hashes are
    /// spread over the available cores; then the `PAGE_INFO` chain runs. Two allocations,
    /// whatever the number of pages.
    pub fn update_pages(&mut self, pages: &[SnpPage<'_>]) {
        // Index into `distinct` of each page's contents hash; None where it measures as zeros.
        let mut distinct: Vec<&PageBuf> = Vec::new();
        let mut slots: Vec<Option<usize>> = Vec::with_capacity(pages.len());
        for p in pages {
            slots.push(match p.page_type {
                SnpPageType::Normal | SnpPageType::Vmsa => {
                    let c = p.contents.unwrap_or(&ZERO_PAGE);
                    match distinct.last() {
                        Some(last) if core::ptr::eq(*last, c) || *last == c => {}
                        _ => distinct.push(c),
                    }
                    Some(distinct.len() - 1)
                }
                _ => None,
            });
        }
        let hashes = hash_pages(&distinct);
        for (p, slot) in pages.iter().zip(slots) {
            let hash = slot.map_or([0; SNP_DIGEST_SIZE], |i| hashes[i]);
            self.ld = Sha384::digest(page_info(&self.ld, &hash, p.page_type, p.gpa)).into();
        }
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

/// A page of zeros: what a page without contents measures as.
static ZERO_PAGE: PageBuf = [0; PAGE_SIZE as usize];

/// Pages a thread must have to hash for it to be worth starting: a thread costs some tens of
/// microseconds to start, about what hashing this many pages costs.
const PARALLEL_MIN_PAGES: usize = 64;

/// One page for [`SnpLaunchDigest::update_pages`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnpPage<'a> {
    /// Its guest-physical address.
    pub gpa: Gpa,
    /// Its type.
    pub page_type: SnpPageType,
    /// Its bytes, needed for `Normal` and `Vmsa` pages only (other types measure as zeros);
    /// `None` is a page of zeros.
    pub contents: Option<&'a PageBuf>,
}

/// Pages one thread takes from the shared counter at a time: small enough that the threads
/// finish together when a core is busy with something else, large enough to fill
/// [`sha384_pages`]' eight-page passes.
const CHUNK_PAGES: usize = 16;

/// SHA-384 of each page, in order ([`sha384_pages`]: eight pages per pass where the CPU has
/// AVX-512), on as many threads as the machine offers (the calling thread included), which
/// take chunks of pages from a shared counter. Hashing stays on the calling thread for few
/// pages, or when no thread can be started.
fn hash_pages(pages: &[&PageBuf]) -> Vec<[u8; SNP_DIGEST_SIZE]> {
    let threads = if pages.len() < 2 * PARALLEL_MIN_PAGES {
        1
    } else {
        thread::available_parallelism()
            .map_or(1, NonZeroUsize::get)
            .min(pages.len() / PARALLEL_MIN_PAGES)
    };
    let next = AtomicUsize::new(0);
    // Each thread's chunks: (first page index, digests). Allocated here, so that the threads
    // allocate nothing (a first allocation on a new thread sets up a malloc arena).
    let work = |mut done: Vec<(usize, [[u8; SNP_DIGEST_SIZE]; CHUNK_PAGES])>| loop {
        let start = next.fetch_add(CHUNK_PAGES, Ordering::Relaxed);
        let Some(chunk) = pages.get(start..pages.len().min(start + CHUNK_PAGES)) else {
            break done;
        };
        if chunk.is_empty() {
            break done;
        }
        let mut digests = [[0; SNP_DIGEST_SIZE]; CHUNK_PAGES];
        sha384_pages(chunk, &mut digests[..chunk.len()]);
        done.push((start, digests));
    };
    let chunks = pages.len().div_ceil(CHUNK_PAGES);
    let mut out = vec![[0; SNP_DIGEST_SIZE]; pages.len()];
    thread::scope(|s| {
        let helpers: Vec<_> = (1..threads)
            .filter_map(|_| {
                let done = Vec::with_capacity(chunks);
                thread::Builder::new().spawn_scoped(s, || work(done)).ok()
            })
            .collect();
        let mut place = |done: Vec<(usize, [[u8; SNP_DIGEST_SIZE]; CHUNK_PAGES])>| {
            for (start, digests) in done {
                let n = CHUNK_PAGES.min(pages.len() - start);
                out[start..start + n].copy_from_slice(&digests[..n]);
            }
        };
        place(work(Vec::with_capacity(chunks)));
        for h in helpers {
            place(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
    });
    out
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

    /// `update_pages` is `update` page by page, for runs of equal pages, pages without
    /// contents, every page type, and enough distinct pages to use every core.
    #[test]
    fn update_pages_is_update_in_order() {
        let distinct: Vec<Box<PageBuf>> = (0..300u32)
            .map(|i| Box::new(core::array::from_fn(|j| (i as usize * 31 + j * 7) as u8)))
            .collect();
        let ff = [0xffu8; 4096];
        let ff_copy = ff;
        let mut kinds: Vec<(SnpPageType, Option<&PageBuf>)> = Vec::new();
        for (i, p) in distinct.iter().enumerate() {
            kinds.push((SnpPageType::Normal, Some(p)));
            if i % 50 == 0 {
                // A run of equal pages, by address and by value, split by pages measured as zeros.
                kinds.extend([
                    (SnpPageType::Normal, Some(&ff)),
                    (SnpPageType::Zero, None),
                    (SnpPageType::Normal, Some(&ff)),
                    (SnpPageType::Normal, Some(&ff_copy)),
                    (SnpPageType::Secrets, Some(p)),
                    (SnpPageType::Normal, None),
                    (SnpPageType::Cpuid, None),
                    (SnpPageType::Unmeasured, None),
                ]);
            }
        }
        kinds.extend([(SnpPageType::Vmsa, Some(&*distinct[0])); 5]);
        let pages: Vec<(Gpa, SnpPageType, Option<&PageBuf>)> = (0u64..)
            .zip(kinds)
            .map(|(i, (ty, contents))| (Gpa(i * 0x1000), ty, contents))
            .collect();
        let mut one_by_one = SnpLaunchDigest::new();
        for &(gpa, ty, contents) in &pages {
            one_by_one.update(gpa, ty, contents.unwrap_or(&[0; 4096]));
        }
        let batch: Vec<SnpPage<'_>> = pages
            .iter()
            .map(|&(gpa, page_type, contents)| SnpPage {
                gpa,
                page_type,
                contents,
            })
            .collect();
        let mut all = SnpLaunchDigest::new();
        all.update_pages(&batch);
        assert_eq!(all, one_by_one);
        // In two calls, split anywhere, the same.
        let mut split = SnpLaunchDigest::new();
        split.update_pages(&batch[..123]);
        split.update_pages(&batch[123..]);
        assert_eq!(split, one_by_one);
        assert_ne!(one_by_one, SnpLaunchDigest::new());
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
