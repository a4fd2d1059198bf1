//! SHA-384 of many 4 KiB pages at once.
//!
//! An SEV-SNP launch digest hashes every measured page's contents with SHA-384 (SNP firmware
//! ABI §8.17.2, `PAGE_INFO.CONTENTS`): 512 pages for a 2 MiB OVMF image. The hashes are
//! independent, so this crate hashes several pages in one pass, one page per 64-bit lane of a
//! vector register (FIPS 180-4 §6.4 run lane-wise): eight per pass with AVX-512's rotate and
//! three-input logic instructions, four per pass with AVX2 elsewhere, each several times the
//! throughput of the `sha2` crate's single-message code on the same core. Without either, and
//! for a lone page, it uses `sha2`.
//!
//! Every message here is exactly one page, so all lanes run the same number of blocks and the
//! padding block (FIPS 180-4 §5.1.2) is the same constant for all of them.
//!
//! The only unsafe code is the call into a vector function after the CPU was found to have its
//! instructions at run time; the hashing itself is safe Rust on `core::arch` values.

#![deny(unsafe_code)]
#![deny(missing_docs)]

use sha2::{Digest, Sha384};

/// The size of a page.
pub const PAGE_SIZE: usize = 4096;
/// A page.
pub type Page = [u8; PAGE_SIZE];
/// The size of a SHA-384 digest.
pub const DIGEST_SIZE: usize = 48;

/// How [`sha384_pages`] hashes on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Eight pages per pass in AVX-512 registers.
    Avx512x8,
    /// Four pages per pass in AVX2 registers.
    Avx2x4,
    /// One page at a time with the `sha2` crate (its own best code for the CPU).
    Sha2,
}

// AVX-512F and AVX2 in CPUID and their register state enabled by the OS (XCR0), each asked once
// per process. `cpufeatures` rather than `std::is_x86_feature_detected!`: it asks two CPUID
// leaves where std asks ten, and in a VM each CPUID traps to the hypervisor (~12 µs on the
// development machine, so std's detection alone cost as much as hashing 50 pages in the first
// call of a process).
#[cfg(target_arch = "x86_64")]
cpufeatures::new!(avx512f, "avx512f");
#[cfg(target_arch = "x86_64")]
cpufeatures::new!(avx2, "avx2");

impl Backend {
    /// The backend [`sha384_pages`] uses on this CPU: the widest this CPU has.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if avx512f::get() {
                return Self::Avx512x8;
            }
            if avx2::get() {
                return Self::Avx2x4;
            }
        }
        Self::Sha2
    }

    /// Whether this CPU can run this backend.
    pub fn supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512x8 => avx512f::get(),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2x4 => avx2::get(),
            #[cfg(not(target_arch = "x86_64"))]
            Self::Avx512x8 | Self::Avx2x4 => false,
            Self::Sha2 => true,
        }
    }
}

/// The SHA-384 digest of each page of `pages`, in order, into `out`.
///
/// # Panics
///
/// If `out` and `pages` differ in length.
pub fn sha384_pages(pages: &[&Page], out: &mut [[u8; DIGEST_SIZE]]) {
    Backend::detect().hash(pages, out);
}

impl Backend {
    /// [`sha384_pages`] with this backend, for benchmarks and tests that compare backends.
    ///
    /// # Panics
    ///
    /// If `out` and `pages` differ in length, or if this CPU lacks the backend's instructions
    /// ([`Backend::supported`]).
    pub fn hash(self, pages: &[&Page], out: &mut [[u8; DIGEST_SIZE]]) {
        assert_eq!(pages.len(), out.len(), "one digest per page");
        assert!(self.supported(), "{self:?} needs instructions this CPU lacks");
        match self {
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512x8 => in_passes(pages, out, |lanes| {
                #[allow(unsafe_code)]
                // SAFETY: `x8::sha384` needs AVX-512F and nothing else, and the assertion above
                // found that the CPU reports it (`Backend::supported`).
                unsafe {
                    x8::sha384(lanes)
                }
            }),
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2x4 => in_passes(pages, out, |lanes| {
                #[allow(unsafe_code)]
                // SAFETY: `x4::sha384` needs AVX2 and nothing else, and the assertion above found
                // that the CPU reports it (`Backend::supported`).
                unsafe {
                    x4::sha384(lanes)
                }
            }),
            _ => sha2_pages(pages, out),
        }
    }
}

/// `pages` hashed `N` at a time by `pass`, which hashes one page per lane.
fn in_passes<const N: usize>(
    pages: &[&Page],
    out: &mut [[u8; DIGEST_SIZE]],
    pass: impl Fn([&Page; N]) -> [[u8; DIGEST_SIZE]; N],
) {
    for (group, digests) in pages.chunks(N).zip(out.chunks_mut(N)) {
        // A pass costs the same for one lane as for all; one page alone is cheaper in sha2.
        if group.len() == 1 {
            sha2_pages(group, digests);
            continue;
        }
        // Idle lanes hash the group's last page again; their digests are dropped.
        let lanes = std::array::from_fn(|i| group[i.min(group.len() - 1)]);
        digests.copy_from_slice(&pass(lanes)[..group.len()]);
    }
}

fn sha2_pages(pages: &[&Page], out: &mut [[u8; DIGEST_SIZE]]) {
    for (page, digest) in pages.iter().zip(out) {
        *digest = Sha384::digest(page).into();
    }
}

/// FIPS 180-4 §4.2.3: the SHA-384/512 round constants.
const K: [u64; 80] = [
    0x428a2f98d728ae22,
    0x7137449123ef65cd,
    0xb5c0fbcfec4d3b2f,
    0xe9b5dba58189dbbc,
    0x3956c25bf348b538,
    0x59f111f1b605d019,
    0x923f82a4af194f9b,
    0xab1c5ed5da6d8118,
    0xd807aa98a3030242,
    0x12835b0145706fbe,
    0x243185be4ee4b28c,
    0x550c7dc3d5ffb4e2,
    0x72be5d74f27b896f,
    0x80deb1fe3b1696b1,
    0x9bdc06a725c71235,
    0xc19bf174cf692694,
    0xe49b69c19ef14ad2,
    0xefbe4786384f25e3,
    0x0fc19dc68b8cd5b5,
    0x240ca1cc77ac9c65,
    0x2de92c6f592b0275,
    0x4a7484aa6ea6e483,
    0x5cb0a9dcbd41fbd4,
    0x76f988da831153b5,
    0x983e5152ee66dfab,
    0xa831c66d2db43210,
    0xb00327c898fb213f,
    0xbf597fc7beef0ee4,
    0xc6e00bf33da88fc2,
    0xd5a79147930aa725,
    0x06ca6351e003826f,
    0x142929670a0e6e70,
    0x27b70a8546d22ffc,
    0x2e1b21385c26c926,
    0x4d2c6dfc5ac42aed,
    0x53380d139d95b3df,
    0x650a73548baf63de,
    0x766a0abb3c77b2a8,
    0x81c2c92e47edaee6,
    0x92722c851482353b,
    0xa2bfe8a14cf10364,
    0xa81a664bbc423001,
    0xc24b8b70d0f89791,
    0xc76c51a30654be30,
    0xd192e819d6ef5218,
    0xd69906245565a910,
    0xf40e35855771202a,
    0x106aa07032bbd1b8,
    0x19a4c116b8d2d0c8,
    0x1e376c085141ab53,
    0x2748774cdf8eeb99,
    0x34b0bcb5e19b48a8,
    0x391c0cb3c5c95a63,
    0x4ed8aa4ae3418acb,
    0x5b9cca4f7763e373,
    0x682e6ff3d6b2b8a3,
    0x748f82ee5defb2fc,
    0x78a5636f43172f60,
    0x84c87814a1f0ab72,
    0x8cc702081a6439ec,
    0x90befffa23631e28,
    0xa4506cebde82bde9,
    0xbef9a3f7b2c67915,
    0xc67178f2e372532b,
    0xca273eceea26619c,
    0xd186b8c721c0c207,
    0xeada7dd6cde0eb1e,
    0xf57d4f7fee6ed178,
    0x06f067aa72176fba,
    0x0a637dc5a2c898a6,
    0x113f9804bef90dae,
    0x1b710b35131c471b,
    0x28db77f523047d84,
    0x32caab7b40c72493,
    0x3c9ebe0a15c9bebc,
    0x431d67c49c100d4c,
    0x4cc5d4becb3e42b6,
    0x597f299cfc657e2a,
    0x5fcb6fab3ad6faec,
    0x6c44198c4a475817,
];

/// FIPS 180-4 §5.3.4: SHA-384's initial hash value.
const IV: [u64; 8] = [
    0xcbbb9d5dc1059ed8,
    0x629a292a367cd507,
    0x9159015a3070dd17,
    0x152fecd8f70e5939,
    0x67332667ffc00b31,
    0x8eb44a8768581511,
    0xdb0c2e0d64f98fa7,
    0x47b5481dbefa4fa4,
];

/// The size of a SHA-512 message block.
const BLOCK: usize = 128;

/// The message schedule's first 16 words of a page's padding block (FIPS 180-4 §5.1.2): the
/// 0x80 byte, zeros, and the message length in bits as a 128-bit big-endian number.
const PAD_BLOCK: [u64; 16] = {
    let mut w = [0; 16];
    w[0] = 1 << 63;
    w[15] = (PAGE_SIZE * 8) as u64;
    w
};

/// FIPS 180-4 §6.4.2 run lane-wise: one page per 64-bit lane of a vector register, the same
/// algorithm for every register width. The module that invokes it supplies, compiled for
/// `$feature`: the register type `Vector`, its lane count `LANES`, and the primitives `splat`
/// (one word in every lane), `gather` (one word from each lane), `lanes` (the inverse), `add`,
/// `xor3`, `ch` and `maj` (FIPS 180-4 §4.1.3's Ch and Maj), `ror::<R>` and `shr::<R>`.
macro_rules! sha384_lanes {
    ($feature:literal) => {
        /// FIPS 180-4 §6.4.2 on `LANES` independent states, one block each.
        #[target_feature(enable = $feature)]
        fn compress(state: &mut [Vector; 8], block: &[[u64; LANES]; 16]) {
            let mut w = [splat(0); 16];
            for (v, words) in w.iter_mut().zip(block) {
                *v = gather(words);
            }
            let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = *state;
            for (t, k) in K.iter().enumerate() {
                let wt = if t < 16 {
                    w[t]
                } else {
                    let w15 = w[(t - 15) % 16];
                    let w2 = w[(t - 2) % 16];
                    let s0 = xor3(ror::<1>(w15), ror::<8>(w15), shr::<7>(w15));
                    let s1 = xor3(ror::<19>(w2), ror::<61>(w2), shr::<6>(w2));
                    let next = add(add(w[t % 16], s0), add(w[(t - 7) % 16], s1));
                    w[t % 16] = next;
                    next
                };
                let s1 = xor3(ror::<14>(e), ror::<18>(e), ror::<41>(e));
                let t1 = add(add(add(h, s1), add(ch(e, f, g), splat(*k))), wt);
                let s0 = xor3(ror::<28>(a), ror::<34>(a), ror::<39>(a));
                let t2 = add(s0, maj(a, b, c));
                h = g;
                g = f;
                f = e;
                e = add(d, t1);
                d = c;
                c = b;
                b = a;
                a = add(t1, t2);
            }
            for (s, v) in state.iter_mut().zip([a, b, c, d, e, f, g, h]) {
                *s = add(*s, v);
            }
        }

        /// SHA-384 of `LANES` pages.
        #[target_feature(enable = $feature)]
        pub(super) fn sha384(pages: [&Page; LANES]) -> [[u8; DIGEST_SIZE]; LANES] {
            let mut state = IV.map(|x| splat(x));
            let mut block = [[0u64; LANES]; 16];
            for offset in (0..PAGE_SIZE).step_by(BLOCK) {
                for (lane, page) in pages.iter().enumerate() {
                    let (words, _) = page[offset..offset + BLOCK].as_chunks::<8>();
                    for (t, word) in words.iter().enumerate() {
                        block[t][lane] = u64::from_be_bytes(*word);
                    }
                }
                compress(&mut state, &block);
            }
            compress(&mut state, &PAD_BLOCK.map(|w| [w; LANES]));
            let words = state.map(|v| lanes(v));
            std::array::from_fn(|lane| {
                let mut digest = [0u8; DIGEST_SIZE];
                for (out, word) in digest.chunks_exact_mut(8).zip(&words) {
                    out.copy_from_slice(&word[lane].to_be_bytes());
                }
                digest
            })
        }
    };
}

/// Eight pages per pass in AVX-512 registers, with its rotate and three-input logic
/// instructions.
#[cfg(target_arch = "x86_64")]
mod x8 {
    use core::arch::x86_64::{
        __m512i, _mm256_extract_epi64, _mm512_add_epi64, _mm512_extracti64x4_epi64, _mm512_ror_epi64,
        _mm512_set_epi64, _mm512_set1_epi64, _mm512_srli_epi64, _mm512_ternarylogic_epi64,
    };

    use super::{BLOCK, DIGEST_SIZE, IV, K, PAD_BLOCK, PAGE_SIZE, Page};

    /// Pages per pass: one per 64-bit lane of a 512-bit register.
    pub(super) const LANES: usize = 8;

    type Vector = __m512i;

    /// `vpternlogq` truth tables: `a ^ b ^ c`, `a ? b : c` (Ch), majority (Maj).
    const XOR3: i32 = 0x96;
    const CH: i32 = 0xca;
    const MAJ: i32 = 0xe8;

    #[target_feature(enable = "avx512f")]
    fn splat(x: u64) -> Vector {
        _mm512_set1_epi64(x as i64)
    }

    #[target_feature(enable = "avx512f")]
    fn gather(words: &[u64; LANES]) -> Vector {
        let w = words.map(|x| x as i64);
        _mm512_set_epi64(w[7], w[6], w[5], w[4], w[3], w[2], w[1], w[0])
    }

    #[target_feature(enable = "avx512f")]
    fn lanes(v: Vector) -> [u64; LANES] {
        let lo = _mm512_extracti64x4_epi64::<0>(v);
        let hi = _mm512_extracti64x4_epi64::<1>(v);
        [
            _mm256_extract_epi64::<0>(lo),
            _mm256_extract_epi64::<1>(lo),
            _mm256_extract_epi64::<2>(lo),
            _mm256_extract_epi64::<3>(lo),
            _mm256_extract_epi64::<0>(hi),
            _mm256_extract_epi64::<1>(hi),
            _mm256_extract_epi64::<2>(hi),
            _mm256_extract_epi64::<3>(hi),
        ]
        .map(|x| x as u64)
    }

    #[target_feature(enable = "avx512f")]
    fn add(a: Vector, b: Vector) -> Vector {
        _mm512_add_epi64(a, b)
    }

    #[target_feature(enable = "avx512f")]
    fn xor3(a: Vector, b: Vector, c: Vector) -> Vector {
        _mm512_ternarylogic_epi64::<XOR3>(a, b, c)
    }

    #[target_feature(enable = "avx512f")]
    fn ch(e: Vector, f: Vector, g: Vector) -> Vector {
        _mm512_ternarylogic_epi64::<CH>(e, f, g)
    }

    #[target_feature(enable = "avx512f")]
    fn maj(a: Vector, b: Vector, c: Vector) -> Vector {
        _mm512_ternarylogic_epi64::<MAJ>(a, b, c)
    }

    #[target_feature(enable = "avx512f")]
    fn ror<const R: i32>(x: Vector) -> Vector {
        _mm512_ror_epi64::<R>(x)
    }

    #[target_feature(enable = "avx512f")]
    fn shr<const R: u32>(x: Vector) -> Vector {
        _mm512_srli_epi64::<R>(x)
    }

    sha384_lanes!("avx512f");
}

/// Four pages per pass in AVX2 registers, for CPUs (or VMs that hide AVX-512): AVX2 has no
/// 64-bit rotate or three-input logic, so each costs two or three instructions, and a pass
/// still hashes about 2.4 times the bytes per second of `sha2`'s single-message AVX2 code
/// (`cargo bench -p sha384-pages`, BENCHMARKS.md).
#[cfg(target_arch = "x86_64")]
mod x4 {
    use core::arch::x86_64::{
        __m256i, _mm_cvtsi64_si128, _mm256_add_epi64, _mm256_and_si256, _mm256_extract_epi64,
        _mm256_or_si256, _mm256_set_epi64x, _mm256_set1_epi64x, _mm256_sll_epi64, _mm256_srl_epi64,
        _mm256_xor_si256,
    };

    use super::{BLOCK, DIGEST_SIZE, IV, K, PAD_BLOCK, PAGE_SIZE, Page};

    /// Pages per pass: one per 64-bit lane of a 256-bit register.
    pub(super) const LANES: usize = 4;

    type Vector = __m256i;

    #[target_feature(enable = "avx2")]
    fn splat(x: u64) -> Vector {
        _mm256_set1_epi64x(x as i64)
    }

    #[target_feature(enable = "avx2")]
    fn gather(words: &[u64; LANES]) -> Vector {
        let w = words.map(|x| x as i64);
        _mm256_set_epi64x(w[3], w[2], w[1], w[0])
    }

    #[target_feature(enable = "avx2")]
    fn lanes(v: Vector) -> [u64; LANES] {
        [
            _mm256_extract_epi64::<0>(v),
            _mm256_extract_epi64::<1>(v),
            _mm256_extract_epi64::<2>(v),
            _mm256_extract_epi64::<3>(v),
        ]
        .map(|x| x as u64)
    }

    #[target_feature(enable = "avx2")]
    fn add(a: Vector, b: Vector) -> Vector {
        _mm256_add_epi64(a, b)
    }

    #[target_feature(enable = "avx2")]
    fn xor3(a: Vector, b: Vector, c: Vector) -> Vector {
        _mm256_xor_si256(_mm256_xor_si256(a, b), c)
    }

    /// `(e & f) ^ (!e & g)`, as `((f ^ g) & e) ^ g`.
    #[target_feature(enable = "avx2")]
    fn ch(e: Vector, f: Vector, g: Vector) -> Vector {
        _mm256_xor_si256(_mm256_and_si256(_mm256_xor_si256(f, g), e), g)
    }

    /// `(a & b) ^ (a & c) ^ (b & c)`, as `((a ^ b) & c) ^ (a & b)`.
    #[target_feature(enable = "avx2")]
    fn maj(a: Vector, b: Vector, c: Vector) -> Vector {
        _mm256_xor_si256(
            _mm256_and_si256(_mm256_xor_si256(a, b), c),
            _mm256_and_si256(a, b),
        )
    }

    /// A rotate as two shifts by counts in a register (`64 - R` cannot be an immediate of a
    /// const generic on stable Rust); the counts are constants, so the compiler folds them.
    #[target_feature(enable = "avx2")]
    fn ror<const R: i64>(x: Vector) -> Vector {
        _mm256_or_si256(
            _mm256_srl_epi64(x, _mm_cvtsi64_si128(R)),
            _mm256_sll_epi64(x, _mm_cvtsi64_si128(64 - R)),
        )
    }

    #[target_feature(enable = "avx2")]
    fn shr<const R: i64>(x: Vector) -> Vector {
        _mm256_srl_epi64(x, _mm_cvtsi64_si128(R))
    }

    sha384_lanes!("avx2");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of varied bytes from a fixed xorshift sequence.
    fn pages(n: usize) -> Vec<Box<Page>> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                let mut p = Box::new([0u8; PAGE_SIZE]);
                for chunk in p.chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    chunk.copy_from_slice(&x.to_le_bytes());
                }
                p
            })
            .collect()
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn known_answers() {
        // Python's hashlib.sha384 of the same pages.
        let zero = [0u8; PAGE_SIZE];
        let ramp: Page = std::array::from_fn(|i| (i * 7 % 251) as u8);
        let mut out = [[0; DIGEST_SIZE]; 2];
        sha384_pages(&[&zero, &ramp], &mut out);
        assert_eq!(
            hex(&out[0]),
            "c0e59a3e3ffbd3b5c75428fb36432facabc745944296ff515f737c4fef4efc64586809f7a16f56354a1eaecf2aa8d774"
        );
        assert_eq!(
            hex(&out[1]),
            "4000421ff6a54e884cafa8dab1fc1b4fb94851f931c2836f445c211fcf8bad9f86b0794eeefb81f0c52971ecc2cbbd58"
        );
    }

    /// Every backend this CPU has gives sha2's digests, for every group size and remainder.
    #[test]
    fn backends_agree_with_sha2() {
        let all = pages(27);
        let backends: Vec<Backend> = [Backend::Avx512x8, Backend::Avx2x4, Backend::Sha2]
            .into_iter()
            .filter(|b| {
                let here = b.supported();
                if !here {
                    eprintln!("skipping {b:?}: this CPU lacks its instructions");
                }
                here
            })
            .collect();
        for n in 0..=all.len() {
            let refs: Vec<&Page> = all[..n].iter().map(|p| &**p).collect();
            let want: Vec<[u8; DIGEST_SIZE]> = refs.iter().map(|p| Sha384::digest(p).into()).collect();
            for &backend in &backends {
                let mut got = vec![[0; DIGEST_SIZE]; n];
                backend.hash(&refs, &mut got);
                assert_eq!(got, want, "{backend:?}, {n} pages");
            }
        }
    }

    #[test]
    fn one_bit_changes_only_its_page() {
        let mut all = pages(8);
        let before: Vec<[u8; DIGEST_SIZE]> = {
            let refs: Vec<&Page> = all.iter().map(|p| &**p).collect();
            let mut out = vec![[0; DIGEST_SIZE]; 8];
            sha384_pages(&refs, &mut out);
            out
        };
        all[5][4095] ^= 1;
        let refs: Vec<&Page> = all.iter().map(|p| &**p).collect();
        let mut after = vec![[0; DIGEST_SIZE]; 8];
        sha384_pages(&refs, &mut after);
        for i in 0..8 {
            assert_eq!(before[i] == after[i], i != 5, "page {i}");
        }
    }

    #[test]
    #[should_panic(expected = "one digest per page")]
    fn lengths_must_match() {
        sha384_pages(&[&[0; PAGE_SIZE]], &mut []);
    }
}
