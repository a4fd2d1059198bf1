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
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use sha2::{Digest, Sha256, Sha384};
use sha384_pages::sha384_pages;
use vmsa_core::{Gpa, PageBuf, SnpPageType, ZERO_PAGE};

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

    /// A digest that continues from `ld`: a launch whose first pages were measured elsewhere
    /// (sev-snp-measure's `--snp-ovmf-hash`, a verifier given the firmware's part of the chain
    /// instead of the firmware).
    pub fn resume(ld: [u8; SNP_DIGEST_SIZE]) -> Self {
        Self { ld }
    }

    /// Extend the digest with one 4 KiB page. `contents` is needed for `Normal` and `Vmsa`
    /// pages (their SHA-384 enters `PAGE_INFO.CONTENTS`); other types measure as zeros.
    /// VMPL1-3 permissions are zero and IMI is off, as in every launch this crate performs.
    pub fn update(&mut self, gpa: Gpa, page_type: SnpPageType, contents: &PageBuf) {
        self.update_hashed(gpa, page_type, &contents_hash(page_type, contents));
    }

    /// [`SnpLaunchDigest::update`] with `PAGE_INFO.CONTENTS` already computed
    /// ([`contents_hash`]), for a caller that hashes a repeated page once.
    pub fn update_hashed(&mut self, gpa: Gpa, page_type: SnpPageType, contents: &[u8; SNP_DIGEST_SIZE]) {
        self.ld = Sha384::digest(page_info(&self.ld, contents, page_type, gpa)).into();
    }

    /// Extend the digest with `pages` in order: the same digest as [`SnpLaunchDigest::update`]
    /// on each, faster. A page equal to the last page whose contents were hashed (a run of
    /// identical AP VMSAs, of erased flash) reuses that hash; the remaining contents hashes are
    /// spread over the available cores, and the calling thread runs the `PAGE_INFO` chain over
    /// each chunk of them as soon as it and every chunk before it are hashed (hashing chunks
    /// itself while it waits). Three allocations, whatever the number of pages.
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
        // Slots never decrease along `pages`, so the chain can run up to the first page whose
        // hash is not in yet.
        let mut at = 0;
        let mut chain =
            |ld: &mut [u8; SNP_DIGEST_SIZE], hashed: usize, hash: &dyn Fn(usize) -> [u8; SNP_DIGEST_SIZE]| {
                while let Some(p) = pages.get(at) {
                    let contents = match slots[at] {
                        Some(i) if i >= hashed => break,
                        Some(i) => hash(i),
                        None => [0; SNP_DIGEST_SIZE],
                    };
                    *ld = Sha384::digest(page_info(ld, &contents, p.page_type, p.gpa)).into();
                    at += 1;
                }
            };
        hash_pages_in_order(
            &distinct,
            hash_threads(distinct.len()),
            sha384_pages,
            |first, digests| {
                chain(&mut self.ld, first + digests.len(), &|i| digests[i - first]);
            },
        );
        // The pages after the last one with contents (or all of them, if none has any): each
        // measures as zeros, so none needs a hash.
        chain(&mut self.ld, 0, &|_| [0; SNP_DIGEST_SIZE]);
        debug_assert_eq!(at, pages.len(), "every page extends the digest");
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

/// `PAGE_INFO.CONTENTS` of a page: the SHA-384 of `contents` for `Normal` and `Vmsa` pages,
/// zeros for every other type.
pub fn contents_hash(page_type: SnpPageType, contents: &PageBuf) -> [u8; SNP_DIGEST_SIZE] {
    match page_type {
        SnpPageType::Normal | SnpPageType::Vmsa => Sha384::digest(contents).into(),
        _ => [0; SNP_DIGEST_SIZE],
    }
}

/// The contents hash of the last page measured one at a time, as the firmware measures
/// (one `SNP_LAUNCH_UPDATE` page per command), so that a run of equal pages is hashed once, as
/// [`SnpLaunchDigest::update_pages`] does within a batch: a launch of erased flash, or of the
/// gigabyte of zero pages an IGVM file's data-less directives may ask for, costs the
/// simulator one SHA-384 of a page instead of one per page. The digest is the same.
#[derive(Clone, Debug, Default)]
pub struct LastContents(Option<Box<(PageBuf, [u8; SNP_DIGEST_SIZE])>>);

impl LastContents {
    /// [`contents_hash`] of `contents` as a page of `page_type`: the last page's hash when
    /// the bytes are the same.
    pub fn hash(&mut self, page_type: SnpPageType, contents: &PageBuf) -> [u8; SNP_DIGEST_SIZE] {
        if !matches!(page_type, SnpPageType::Normal | SnpPageType::Vmsa) {
            return contents_hash(page_type, contents);
        }
        match &mut self.0 {
            Some(last) if last.0 == *contents => last.1,
            Some(last) => {
                *last.as_mut() = (*contents, contents_hash(page_type, contents));
                last.1
            }
            None => {
                let hash = contents_hash(page_type, contents);
                self.0 = Some(Box::new((*contents, hash)));
                hash
            }
        }
    }
}

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
/// [`sha384_pages`]' passes (eight pages each with AVX-512, four with AVX2).
const CHUNK_PAGES: usize = 16;

/// How many threads hash `pages` distinct pages: all the machine offers, but none that would
/// get fewer than [`PARALLEL_MIN_PAGES`].
fn hash_threads(pages: usize) -> usize {
    if pages < 2 * PARALLEL_MIN_PAGES {
        1
    } else {
        thread::available_parallelism()
            .map_or(1, NonZeroUsize::get)
            .min(pages / PARALLEL_MIN_PAGES)
    }
}

/// SHA-384 of each page ([`sha384_pages`]: several pages per pass in vector registers),
/// given to `consume` on the calling thread chunk by chunk, in page order: `consume(first,
/// digests)` gets the digests of pages `first..first + digests.len()`. The hashing runs on as
/// many threads as the machine offers, the calling thread included, which take chunks from a
/// shared counter; the calling thread consumes each chunk as soon as it and those before it
/// are done, and hashes a chunk itself whenever the next one to consume is not done yet. It
/// stays alone with `threads` 1, or when no thread can be started. `hasher` is
/// [`sha384_pages`] (a parameter so that tests can make a helper fail).
fn hash_pages_in_order(
    pages: &[&PageBuf],
    threads: usize,
    hasher: impl Fn(&[&PageBuf], &mut [[u8; SNP_DIGEST_SIZE]]) + Sync,
    mut consume: impl FnMut(usize, &[[u8; SNP_DIGEST_SIZE]]),
) {
    let chunks = pages.len().div_ceil(CHUNK_PAGES);
    let range = |c: usize| c * CHUNK_PAGES..pages.len().min((c + 1) * CHUNK_PAGES);
    let hash = |c: usize| {
        let mut digests = [[0; SNP_DIGEST_SIZE]; CHUNK_PAGES];
        let chunk = &pages[range(c)];
        hasher(chunk, &mut digests[..chunk.len()]);
        digests
    };
    if threads == 1 {
        for c in 0..chunks {
            consume(range(c).start, &hash(c)[..range(c).len()]);
        }
        return;
    }
    let next = AtomicUsize::new(0);
    // Allocated here, so that the helpers allocate nothing (a first allocation on a new thread
    // sets up a malloc arena).
    let done: Vec<OnceLock<[[u8; SNP_DIGEST_SIZE]; CHUNK_PAGES]>> =
        (0..chunks).map(|_| OnceLock::new()).collect();
    let caller = thread::current();
    thread::scope(|s| {
        let helper = || {
            // Wakes the calling thread after every chunk, and once more when the helper ends,
            // even by a panic, so that it never waits for a chunk nobody will hash.
            struct WakeOnExit<'a>(&'a thread::Thread);
            impl Drop for WakeOnExit<'_> {
                fn drop(&mut self) {
                    self.0.unpark();
                }
            }
            let _wake = WakeOnExit(&caller);
            loop {
                let c = next.fetch_add(1, Ordering::Relaxed);
                if c >= chunks {
                    break;
                }
                let _ = done[c].set(hash(c));
                caller.unpark();
            }
        };
        let helpers: Vec<_> = (1..threads)
            .filter_map(|_| thread::Builder::new().spawn_scoped(s, helper).ok())
            .collect();
        let mut want = 0;
        while want < chunks {
            if let Some(digests) = done[want].get() {
                consume(range(want).start, &digests[..range(want).len()]);
                want += 1;
                continue;
            }
            let c = next.fetch_add(1, Ordering::Relaxed);
            if c < chunks {
                let _ = done[c].set(hash(c));
            } else if helpers.iter().all(|h| h.is_finished()) && done[want].get().is_none() {
                // A helper died before hashing a chunk it took; the scope re-raises its panic.
                break;
            } else {
                // A helper is hashing `want`; it unparks this thread when it is done. The
                // timeout only matters if a helper panicked: its last unpark can come just
                // before `is_finished` holds.
                thread::park_timeout(Duration::from_millis(1));
            }
        }
    });
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
    fn the_last_contents_hash_is_reused_only_for_the_same_bytes() {
        let (a, b) = ([1u8; 4096], [2u8; 4096]);
        let mut last = LastContents::default();
        for (ty, page) in [
            (SnpPageType::Normal, &a),
            (SnpPageType::Normal, &a),
            (SnpPageType::Vmsa, &a),
            (SnpPageType::Zero, &a),
            (SnpPageType::Normal, &b),
            (SnpPageType::Secrets, &b),
            (SnpPageType::Normal, &a),
        ] {
            assert_eq!(last.hash(ty, page), contents_hash(ty, page), "{ty:?}");
        }
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
        // Pages measured as zeros after the last hashed one.
        kinds.extend([(SnpPageType::Zero, None), (SnpPageType::Secrets, None)]);
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
        // Only pages measured as zeros: nothing to hash, the chain alone.
        let zeros: Vec<SnpPage<'_>> = batch
            .iter()
            .filter(|p| p.page_type == SnpPageType::Zero)
            .copied()
            .collect();
        let mut chain_only = SnpLaunchDigest::new();
        chain_only.update_pages(&zeros);
        let mut one_by_one = SnpLaunchDigest::new();
        for p in &zeros {
            one_by_one.update(p.gpa, p.page_type, &[0; 4096]);
        }
        assert_eq!(chain_only, one_by_one);
    }

    /// A helper thread that dies with a chunk it took must not leave the calling thread
    /// waiting for that chunk: the hashing ends, with the helper's panic.
    #[test]
    fn a_helper_that_dies_mid_chunk_ends_the_hashing_with_its_panic_not_a_hang() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pages: Vec<Box<PageBuf>> = (0..8 * CHUNK_PAGES).map(|i| Box::new([i as u8; 4096])).collect();
            let refs: Vec<&PageBuf> = pages.iter().map(|p| &**p).collect();
            let caller = thread::current().id();
            let hasher = |chunk: &[&PageBuf], out: &mut [[u8; SNP_DIGEST_SIZE]]| {
                assert_eq!(thread::current().id(), caller, "a helper dies");
                sha384_pages(chunk, out);
            };
            let mut consumed = 0;
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                hash_pages_in_order(&refs, 2, hasher, |_, d| consumed += d.len())
            }));
            let _ = tx.send((r.is_err(), consumed));
        });
        let (panicked, consumed) = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the calling thread hung after a helper died");
        // The helper may not have started before the caller took every chunk; then all pages
        // were hashed and nothing panicked.
        assert!(panicked || consumed == 8 * CHUNK_PAGES, "{panicked} {consumed}");
    }

    #[test]
    fn threads_share_the_hashing_and_the_chain_sees_every_chunk_in_order() {
        let pages: Vec<Box<PageBuf>> = (0..300).map(|i| Box::new([(i * 7) as u8; 4096])).collect();
        let refs: Vec<&PageBuf> = pages.iter().map(|p| &**p).collect();
        let mut alone = Vec::new();
        hash_pages_in_order(&refs, 1, sha384_pages, |first, d| alone.push((first, d.to_vec())));
        for threads in [2, 3, 8] {
            let mut shared = Vec::new();
            hash_pages_in_order(&refs, threads, sha384_pages, |first, d| {
                shared.push((first, d.to_vec()))
            });
            assert_eq!(shared, alone, "{threads} threads");
        }
        let firsts: Vec<usize> = alone.iter().map(|(f, _)| *f).collect();
        assert_eq!(firsts, (0..300).step_by(CHUNK_PAGES).collect::<Vec<_>>());
        assert_eq!(alone.iter().map(|(_, d)| d.len()).sum::<usize>(), 300);
        assert_eq!(
            alone[1].1[0],
            <[u8; 48]>::from(Sha384::digest(*pages[CHUNK_PAGES]))
        );
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
