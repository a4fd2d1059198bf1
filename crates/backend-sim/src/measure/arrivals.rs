//! Pages measured while they arrive: an SEV-SNP launch's contents hashes on every core and its
//! `PAGE_INFO` chain in order, computed while the pages are still being produced (an image read
//! from its file piece by piece) or over pages that are all there (a launch plan).
//!
//! The calling thread produces the pages, then hashes what is left beside its helpers and ends
//! the chain. Helper threads are started before the first page arrives, so that their start
//! (tens of microseconds, more on a busy host) overlaps the production instead of delaying the
//! hashing. A helper that dies (a panic) never leaves the calling thread waiting: the hashing
//! ends and the panic is raised again when the helpers are joined.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};
use std::thread::{self, Scope, Thread};
use std::time::Duration;

use sha2::{Digest, Sha384};
use vmsa_core::{PageBuf, SnpPageType, ZERO_PAGE};

use super::{SNP_DIGEST_SIZE, SnpPage, contents_hash, page_info};

/// Pages one thread takes at a time: small enough that the threads finish together when a core
/// is busy with something else, large enough to fill [`sha384_pages`]' passes (eight pages each
/// with AVX-512, four with AVX2).
///
/// [`sha384_pages`]: sha384_pages::sha384_pages
const CHUNK_PAGES: usize = 16;

/// Pages a thread must have to hash for it to be worth starting: a thread costs some tens of
/// microseconds to start, about what hashing this many pages costs.
const PARALLEL_MIN_PAGES: usize = 64;

/// How long a thread waiting for a page or a chunk sleeps before it looks again without being
/// woken: only a helper's death can end a wait without a wake-up.
const RECHECK: Duration = Duration::from_millis(1);

type Hash = [u8; SNP_DIGEST_SIZE];

/// The hashing function: [`sha384_pages::sha384_pages`], a parameter so that tests can make a
/// helper fail.
pub(super) type Hasher = fn(&[&PageBuf], &mut [Hash]);

/// Hands pages to the measurement, in order, on the thread that produces them.
pub(super) struct Producer<'s, T> {
    arrivals: &'s Arrivals<T>,
}

impl<T> Producer<'_, T> {
    /// These pages are in memory now: the next ones in measurement order. Pages beyond the
    /// number announced are not measured.
    pub(super) fn arrive(&self, pages: impl IntoIterator<Item = T>) {
        let a = self.arrivals;
        let mut n = a.arrived.load(Ordering::Relaxed);
        for p in pages {
            let Some(slot) = a.items.get(n) else { break };
            let _ = slot.set(p);
            n += 1;
        }
        a.arrived.store(n, Ordering::Release);
        a.wake_all();
    }
}

/// Items that arrive in order, and the threads that wait for them or for each other.
struct Arrivals<T> {
    items: Box<[OnceLock<T>]>,
    /// `items[..arrived]` are set.
    arrived: AtomicUsize,
    /// No more items will arrive.
    ended: AtomicBool,
    /// Every thread taking part, woken after every event (an unpark costs an atomic operation
    /// unless the thread sleeps).
    threads: Mutex<Vec<Thread>>,
    /// Helpers started and not yet ended.
    helpers: AtomicUsize,
}

impl<T> Arrivals<T> {
    fn new(n: usize) -> Self {
        Self {
            items: (0..n).map(|_| OnceLock::new()).collect(),
            arrived: AtomicUsize::new(0),
            ended: AtomicBool::new(false),
            threads: Mutex::new(vec![thread::current()]),
            helpers: AtomicUsize::new(0),
        }
    }

    fn wake_all(&self) {
        for t in lock(&self.threads).iter() {
            t.unpark();
        }
    }

    fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.wake_all();
    }

    /// How many items arrived, once `want` did or no more will (`None`: neither yet).
    fn arrived_up_to(&self, want: usize) -> Option<usize> {
        let ended = self.ended.load(Ordering::Acquire);
        let n = self.arrived.load(Ordering::Acquire);
        (n >= want || ended).then_some(n.min(want))
    }

    /// Items `from..` up to `want`, once they arrived or no more will.
    fn wait_for(&self, from: usize, want: usize) -> impl Iterator<Item = &T> {
        let n = loop {
            if let Some(n) = self.arrived_up_to(want) {
                break n;
            }
            thread::park_timeout(RECHECK);
        };
        self.items[from.min(n)..n].iter().filter_map(OnceLock::get)
    }

    /// Start helpers on `scope`, up to `most`: one now, which starts the others the machine
    /// has cores for (asking how many costs 50 to 150 us on the development host, so the helper
    /// asks, not the producer) unless `idle` says there is nothing left to do by then. Each
    /// runs `work`.
    fn start_helpers<'s, 'e>(
        &'s self,
        scope: &'s Scope<'s, 'e>,
        most: usize,
        work: &'s (dyn Fn() + Sync),
        idle: &'s (dyn Fn() -> bool + Sync),
    ) where
        T: Sync + Send,
    {
        if most == 0 {
            return;
        }
        self.spawn(scope, move || {
            if idle() {
                return;
            }
            if most > 1 {
                let cores = thread::available_parallelism().map_or(1, NonZeroUsize::get);
                for _ in 1..(cores - 1).min(most) {
                    self.spawn(scope, work);
                }
            }
            work();
        });
    }

    fn spawn<'s, 'e>(&'s self, scope: &'s Scope<'s, 'e>, body: impl FnOnce() + Send + 's)
    where
        T: Sync + Send,
    {
        self.helpers.fetch_add(1, Ordering::AcqRel);
        let started = thread::Builder::new().spawn_scoped(scope, move || {
            // Counted out and the others woken when the helper ends, even by a panic, so that
            // nobody waits for a chunk it will not hash.
            struct Ended<'h, T>(&'h Arrivals<T>);
            impl<T> Drop for Ended<'_, T> {
                fn drop(&mut self) {
                    self.0.helpers.fetch_sub(1, Ordering::AcqRel);
                    self.0.wake_all();
                }
            }
            let _ended = Ended(self);
            lock(&self.threads).push(thread::current());
            body();
        });
        if started.is_err() {
            self.helpers.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether a page's contents enter its `PAGE_INFO` (other types measure as zeros).
fn hashes_contents(t: SnpPageType) -> bool {
    matches!(t, SnpPageType::Normal | SnpPageType::Vmsa)
}

fn contents<'a>(p: &SnpPage<'a>) -> &'a PageBuf {
    p.contents.unwrap_or(&ZERO_PAGE)
}

/// The contents hashes of one chunk of pages.
struct Hashed {
    /// By page within the chunk; zero where `same` or where the type measures as zeros.
    hashes: [Hash; CHUNK_PAGES],
    /// Pages whose bytes equal the page before theirs (whose hash they take in the chain).
    same: u32,
    /// Pages of the chunk that arrived (fewer than the chunk's own only if production ended
    /// early).
    len: usize,
}

/// Where the `PAGE_INFO` chain stands.
struct Chain {
    /// The next chunk to chain.
    at: usize,
    ld: Hash,
    /// The contents hash of the last page chained that had one.
    last: Hash,
}

/// An SEV-SNP chain over pages that arrive.
struct Snp<'a> {
    pages: Arrivals<SnpPage<'a>>,
    chunks: usize,
    /// The next chunk to hash.
    next: AtomicUsize,
    done: Box<[OnceLock<Hashed>]>,
    chain: Mutex<Chain>,
    hasher: Hasher,
}

impl Snp<'_> {
    fn hash(&self, c: usize) -> Hashed {
        let start = c * CHUNK_PAGES;
        let end = (start + CHUNK_PAGES).min(self.pages.items.len());
        let from = start.saturating_sub(1);
        let mut prev: Option<&SnpPage<'_>> = None;
        let mut todo: [(usize, &PageBuf); CHUNK_PAGES] = [(0, &ZERO_PAGE); CHUNK_PAGES];
        let mut hashes = [[0; SNP_DIGEST_SIZE]; CHUNK_PAGES];
        let (mut n, mut same, mut len) = (0, 0, 0);
        for (i, p) in (from..).zip(self.pages.wait_for(from, end)) {
            let prev = prev.replace(p);
            if i < start {
                continue;
            }
            len += 1;
            if !hashes_contents(p.page_type) {
                continue;
            }
            let page = contents(p);
            let vmsa = p.page_type == SnpPageType::Vmsa;
            // The same bytes hash differently as a VMSA (its TSC fields measure as zero).
            let repeat = prev.is_some_and(|q| {
                hashes_contents(q.page_type)
                    && (q.page_type == SnpPageType::Vmsa) == vmsa
                    && (core::ptr::eq(contents(q), page) || contents(q) == page)
            });
            if repeat {
                same |= 1 << (i - start);
            } else if vmsa {
                hashes[i - start] = contents_hash(SnpPageType::Vmsa, page);
            } else {
                todo[n] = (i - start, page);
                n += 1;
            }
        }
        let mut out = [[0; SNP_DIGEST_SIZE]; CHUNK_PAGES];
        let refs: [&PageBuf; CHUNK_PAGES] = core::array::from_fn(|k| todo[k].1);
        (self.hasher)(&refs[..n], &mut out[..n]);
        for (k, &(at, _)) in todo[..n].iter().enumerate() {
            hashes[at] = out[k];
        }
        Hashed { hashes, same, len }
    }

    /// Chain chunk `chain.at` if it is hashed; whether it was.
    fn chain_next(&self, chain: &mut Chain) -> bool {
        let Some(h) = self.done.get(chain.at).and_then(OnceLock::get) else {
            return false;
        };
        let start = chain.at * CHUNK_PAGES;
        for (k, slot) in self.pages.items[start..start + h.len].iter().enumerate() {
            let Some(p) = slot.get() else { break };
            let contents = if !hashes_contents(p.page_type) {
                [0; SNP_DIGEST_SIZE]
            } else {
                if h.same & (1 << k) == 0 {
                    chain.last = h.hashes[k];
                }
                chain.last
            };
            chain.ld = Sha384::digest(page_info(&chain.ld, &contents, p.page_type, p.gpa)).into();
        }
        chain.at += 1;
        true
    }

    /// Take chunks and hash them until none is left to take, chaining what is in order
    /// whenever no other thread is.
    fn work(&self) {
        loop {
            let c = self.next.fetch_add(1, Ordering::Relaxed);
            if c >= self.chunks {
                return;
            }
            let _ = self.done[c].set(self.hash(c));
            self.pages.wake_all();
            let mut chain = match self.chain.try_lock() {
                Ok(g) => g,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => continue,
            };
            while self.chain_next(&mut chain) {}
        }
    }
}

/// How many helpers hashing about `pages` pages is worth (the calling thread hashes too).
pub(super) fn helpers_for(pages: usize) -> usize {
    (pages / PARALLEL_MIN_PAGES).saturating_sub(1)
}

/// Extend the SEV-SNP digest `ld` with `n` pages, which `produce` hands over in order (all at
/// once, or as they come into memory) on the calling thread: the contents of each page whose
/// bytes differ from the page before it are hashed once, on up to `helpers` more threads while
/// the rest are produced. Pages `produce` does not hand over are not measured.
pub(super) fn snp<'a, R>(
    ld: Hash,
    n: usize,
    helpers: usize,
    hasher: Hasher,
    produce: impl FnOnce(&Producer<'_, SnpPage<'a>>) -> R,
) -> (R, Hash) {
    let chunks = n.div_ceil(CHUNK_PAGES);
    let snp = Snp {
        pages: Arrivals::new(n),
        chunks,
        next: AtomicUsize::new(0),
        done: (0..chunks).map(|_| OnceLock::new()).collect(),
        chain: Mutex::new(Chain {
            at: 0,
            ld,
            last: [0; SNP_DIGEST_SIZE],
        }),
        hasher,
    };
    let work = || snp.work();
    let idle = || snp.next.load(Ordering::Relaxed) >= chunks;
    let r = thread::scope(|s| {
        snp.pages.start_helpers(s, helpers, &work, &idle);
        let r = produce(&Producer { arrivals: &snp.pages });
        snp.pages.end();
        snp.work();
        let mut chain = lock(&snp.chain);
        while chain.at < chunks {
            if snp.chain_next(&mut chain) {
                continue;
            }
            if snp.pages.helpers.load(Ordering::Acquire) == 0 && snp.done[chain.at].get().is_none() {
                // A helper died with the chunk it took; the scope raises its panic again.
                break;
            }
            thread::park_timeout(RECHECK);
        }
        r
    });
    let ld = lock(&snp.chain).ld;
    (r, ld)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::time::Duration;

    use sha384_pages::sha384_pages;
    use vmsa_core::Gpa;

    use super::*;
    use crate::measure::SnpLaunchDigest;

    /// An image of `n` pages with runs of equal pages across chunk boundaries.
    fn image(n: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; n * 4096];
        for (i, page) in bytes.chunks_mut(4096).enumerate() {
            // Pages 10..50 and 60..61 are erased flash; the rest differ from each other.
            let fill = if (10..50).contains(&i) || i == 60 || i == 61 {
                0xff
            } else {
                0
            };
            page.fill(fill);
            if fill == 0 {
                page[..8].copy_from_slice(&(i as u64 * 0x9e37_79b9).to_le_bytes());
            }
        }
        bytes
    }

    fn one_by_one(gpa: u64, bytes: &[u8]) -> SnpLaunchDigest {
        let mut ld = SnpLaunchDigest::new();
        for (i, page) in bytes.as_chunks::<4096>().0.iter().enumerate() {
            ld.update(Gpa(gpa + i as u64 * 4096), SnpPageType::Normal, page);
        }
        ld
    }

    /// An image read in pieces of any size, slowly or at once, measures as each of its pages
    /// one by one; a read that stops early measures the pages it handed over.
    #[test]
    fn a_read_image_measures_as_its_pages_one_by_one() {
        let bytes = image(300);
        let gpa = 0xffe0_0000;
        for (piece_pages, pause) in [(1, 0), (7, 0), (16, 1), (300, 0), (5, 2)] {
            let mut ld = SnpLaunchDigest::new();
            let handed = ld.update_read(Gpa(gpa), bytes.len(), |arrive| {
                let mut handed = 0;
                for piece in bytes.chunks(piece_pages * 4096) {
                    if pause > 0 {
                        std::thread::sleep(Duration::from_millis(pause));
                    }
                    arrive(piece);
                    handed += 1;
                }
                handed
            });
            assert_eq!(handed, 300usize.div_ceil(piece_pages));
            assert_eq!(ld, one_by_one(gpa, &bytes), "pieces of {piece_pages} pages");
        }
        // A file that ends early: the pages read, no more, and no hang.
        for read in [0, 1, 45, 299] {
            let mut ld = SnpLaunchDigest::new();
            ld.update_read(Gpa(gpa), bytes.len(), |arrive| arrive(&bytes[..read * 4096]));
            assert_eq!(ld, one_by_one(gpa, &bytes[..read * 4096]), "{read} pages read");
        }
        // More than announced: the rest is not measured.
        let mut ld = SnpLaunchDigest::new();
        ld.update_read(Gpa(gpa), 100 * 4096, |arrive| arrive(&bytes));
        assert_eq!(ld, one_by_one(gpa, &bytes[..100 * 4096]));
    }

    thread_local! {
        static PRODUCER: Cell<bool> = const { Cell::new(false) };
    }

    /// Whether a helper has taken a chunk to hash (and died with it).
    static HELPER_HASHED: AtomicBool = AtomicBool::new(false);

    /// Dies on a helper; on the producing thread, hashes once a helper has died, so that the
    /// producer cannot hash every chunk before a late helper takes one.
    fn only_on_the_producer(pages: &[&PageBuf], out: &mut [Hash]) {
        if !PRODUCER.with(Cell::get) {
            HELPER_HASHED.store(true, Ordering::SeqCst);
            panic!("a helper dies");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !HELPER_HASHED.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "no helper ever hashed");
            std::thread::sleep(Duration::from_millis(1));
        }
        sha384_pages(pages, out);
    }

    /// A helper that dies with a chunk it took must not leave the calling thread waiting for
    /// that chunk: the hashing ends, with the helper's panic.
    #[test]
    fn a_helper_that_dies_mid_chunk_ends_the_hashing_with_its_panic_not_a_hang() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            PRODUCER.with(|p| p.set(true));
            let bytes = image(8 * CHUNK_PAGES);
            let pages: Vec<SnpPage<'_>> = (0u64..)
                .zip(bytes.as_chunks::<4096>().0)
                .map(|(i, c)| SnpPage {
                    gpa: Gpa(i * 4096),
                    page_type: SnpPageType::Normal,
                    contents: Some(c),
                })
                .collect();
            let r = std::panic::catch_unwind(|| {
                snp([0; 48], pages.len(), 1, only_on_the_producer, |p| {
                    p.arrive(pages.iter().copied())
                })
            });
            let _ = tx.send(r.is_err());
        });
        let panicked = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the calling thread hung after a helper died");
        assert!(panicked, "the helper's panic is raised again");
    }
}
