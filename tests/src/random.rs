//! Random event runs (issue 10, item 3): a small seeded generator, a runner that checks
//! invariants after every event, and a shrinker that cuts a failing run down to a minimal event
//! list, printed with its seed so it can be replayed and kept as a regression test.
//!
//! The generator is SplitMix64 (Steele, Lea, Flood, "Fast splittable pseudorandom number
//! generators", OOPSLA 2014; the constants of Java's `SplittableRandom`): a few lines, no
//! dependency, and the same sequence on every host for a seed.

use std::fmt::Debug;

/// SplitMix64: a seeded generator of 64-bit values.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// The generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n` > 0; the bias of the modulo is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// One of `items`, uniformly.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Why a run failed: the event (its index in the list) after which an invariant broke, and
/// which one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Broken {
    /// The index of the event after which the check failed (the list's length: at the end).
    pub at: usize,
    /// What was wrong.
    pub what: String,
}

/// Shrink a failing event list to a 1-minimal one (Zeller's ddmin: no single event can be
/// removed and the run still fail the same way), keeping only events before the failure.
/// `fails` runs a list and answers whether it breaks with the same message kind.
pub fn shrink<E: Clone>(events: &[E], fails: impl Fn(&[E]) -> bool) -> Vec<E> {
    let mut cur = events.to_vec();
    let mut chunks = 2usize;
    while cur.len() >= 2 {
        let size = cur.len().div_ceil(chunks);
        let mut reduced = false;
        for start in (0..cur.len()).step_by(size) {
            let candidate: Vec<E> = cur[..start]
                .iter()
                .chain(cur[(start + size).min(cur.len())..].iter())
                .cloned()
                .collect();
            if fails(&candidate) {
                cur = candidate;
                chunks = (chunks - 1).max(2);
                reduced = true;
                break;
            }
        }
        if !reduced {
            if size == 1 {
                break;
            }
            chunks = (chunks * 2).min(cur.len());
        }
    }
    cur
}

/// Run `count` seeds from `first`, each a list of events from `generate`, through `run` (which
/// answers how many events it ran: a run may end early, e.g. at a teardown); on the first
/// failure, shrink it and panic with the seed, the failure and the minimal list. Returns the
/// number of events run.
pub fn check_seeds<E: Clone + Debug>(
    name: &str,
    first: u64,
    count: u64,
    generate: impl Fn(&mut Rng) -> Vec<E>,
    run: impl Fn(&[E]) -> Result<usize, Broken>,
) -> u64 {
    let mut events_run = 0;
    for seed in first..first + count {
        let events = generate(&mut Rng::new(seed));
        let result = run(&events);
        if let Ok(n) = result {
            events_run += n as u64;
        }
        if let Err(broken) = result {
            let kind = kind_of(&broken.what);
            let minimal = shrink(&events[..(broken.at + 1).min(events.len())], |candidate| {
                run(candidate).is_err_and(|b| kind_of(&b.what) == kind)
            });
            let again = run(&minimal).expect_err("the minimal list fails");
            panic!(
                "{name}: seed {seed} failed after event {} of {}: {}\nminimal event list ({} events), failing with: {}\n{minimal:#?}",
                broken.at,
                events.len(),
                broken.what,
                minimal.len(),
                again.what
            );
        }
    }
    events_run
}

/// The part of a failure message that names the broken invariant (before the first ':'), so
/// shrinking keeps the same failure rather than any failure.
fn kind_of(what: &str) -> &str {
    what.split(':').next().unwrap_or(what)
}

/// Whether `cargo xtask soak` asked for the long runs (`VMSA_SOAK=1`).
pub fn soak() -> bool {
    std::env::var_os("VMSA_SOAK").is_some_and(|v| v == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_splitmix64() {
        // The first outputs for seed 0 of the reference implementation (SplittableRandom).
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn shrinking_keeps_only_the_events_the_failure_needs() {
        // Fails when both 3 and 7 are present, 3 first.
        let fails = |l: &[u32]| {
            let i = l.iter().position(|&x| x == 3);
            let j = l.iter().position(|&x| x == 7);
            matches!((i, j), (Some(i), Some(j)) if i < j)
        };
        let events: Vec<u32> = (0..40).collect();
        assert_eq!(shrink(&events, fails), [3, 7]);
    }
}
