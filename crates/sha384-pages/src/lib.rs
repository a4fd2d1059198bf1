//! SHA-384 of many 4 KiB pages at once.
//!
//! An SEV-SNP launch digest hashes every measured page's contents with SHA-384 (SNP firmware
//! ABI §8.17.2, `PAGE_INFO.CONTENTS`): 512 pages for a 2 MiB OVMF image. The hashes are
//! independent, so on CPUs with AVX-512 this crate hashes eight pages in one pass, one page per
//! 64-bit lane of the 512-bit registers (FIPS 180-4 §6.4 run lane-wise, with AVX-512's rotate
//! and three-input logic instructions), about four times the throughput of the `sha2` crate's
//! single-message AVX2 code on the same core. Elsewhere, and for a lone page, it uses `sha2`.
//!
//! Every message here is exactly one page, so all lanes run the same number of blocks and the
//! padding block (FIPS 180-4 §5.1.2) is the same constant for all of them.
//!
//! The only unsafe code is the call into the AVX-512 function after the CPU was found to have
//! AVX-512F at run time; the hashing itself is safe Rust on `core::arch` values.

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
    /// One page at a time with the `sha2` crate (its own best code for the CPU).
    Sha2,
}

// AVX-512F in CPUID and its register state enabled by the OS (XCR0), asked once per process.
// `cpufeatures` rather than `std::is_x86_feature_detected!`: it asks two CPUID leaves where std
// asks ten, and in a VM each CPUID traps to the hypervisor (~12 µs on the development machine,
// so std's detection alone cost as much as hashing 50 pages in the first call of a process).
#[cfg(target_arch = "x86_64")]
cpufeatures::new!(avx512f, "avx512f");

impl Backend {
    /// The backend [`sha384_pages`] uses on this CPU.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if avx512f::get() {
            return Self::Avx512x8;
        }
        Self::Sha2
    }
}

/// The SHA-384 digest of each page of `pages`, in order, into `out`.
///
/// # Panics
///
/// If `out` and `pages` differ in length.
pub fn sha384_pages(pages: &[&Page], out: &mut [[u8; DIGEST_SIZE]]) {
    hash_with(Backend::detect(), pages, out);
}

/// [`sha384_pages`] with a given backend (which the CPU must support: [`Backend::detect`]).
fn hash_with(backend: Backend, pages: &[&Page], out: &mut [[u8; DIGEST_SIZE]]) {
    assert_eq!(pages.len(), out.len(), "one digest per page");
    match backend {
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512x8 => {
            for (group, digests) in pages.chunks(x8::LANES).zip(out.chunks_mut(x8::LANES)) {
                // A pass costs the same for one lane as for eight; one page alone is cheaper in
                // sha2.
                if group.len() == 1 {
                    sha2_pages(group, digests);
                    continue;
                }
                // Idle lanes hash the group's last page again; their digests are dropped.
                let lanes = std::array::from_fn(|i| group[i.min(group.len() - 1)]);
                #[allow(unsafe_code)]
                // SAFETY: `sha384_x8` needs AVX-512F and nothing else; `Backend::Avx512x8` is
                // only chosen (by `Backend::detect`, or by the tests after it) where the CPU
                // reports AVX-512F at run time.
                let all = unsafe { x8::sha384_x8(lanes) };
                digests.copy_from_slice(&all[..group.len()]);
            }
        }
        _ => sha2_pages(pages, out),
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

#[cfg(target_arch = "x86_64")]
mod x8 {
    use core::arch::x86_64::{
        __m512i, _mm256_extract_epi64, _mm512_add_epi64, _mm512_extracti64x4_epi64, _mm512_ror_epi64,
        _mm512_set_epi64, _mm512_set1_epi64, _mm512_srli_epi64, _mm512_ternarylogic_epi64,
    };

    use super::{BLOCK, DIGEST_SIZE, IV, K, PAD_BLOCK, PAGE_SIZE, Page};

    /// Pages per pass: one per 64-bit lane of a 512-bit register.
    pub(super) const LANES: usize = 8;

    /// `vpternlogq` truth tables: `a ^ b ^ c`, `a ? b : c` (Ch), majority (Maj).
    const XOR3: i32 = 0x96;
    const CH: i32 = 0xca;
    const MAJ: i32 = 0xe8;

    /// One 64-bit word from each lane.
    #[target_feature(enable = "avx512f")]
    fn gather(words: &[u64; LANES]) -> __m512i {
        let w = words.map(|x| x as i64);
        _mm512_set_epi64(w[7], w[6], w[5], w[4], w[3], w[2], w[1], w[0])
    }

    /// FIPS 180-4 §6.4.2 on eight independent states, one block each.
    #[target_feature(enable = "avx512f")]
    fn compress(state: &mut [__m512i; 8], block: &[[u64; LANES]; 16]) {
        let mut w: [__m512i; 16] = [_mm512_set1_epi64(0); 16];
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
                let s0 = _mm512_ternarylogic_epi64::<XOR3>(
                    _mm512_ror_epi64::<1>(w15),
                    _mm512_ror_epi64::<8>(w15),
                    _mm512_srli_epi64::<7>(w15),
                );
                let s1 = _mm512_ternarylogic_epi64::<XOR3>(
                    _mm512_ror_epi64::<19>(w2),
                    _mm512_ror_epi64::<61>(w2),
                    _mm512_srli_epi64::<6>(w2),
                );
                let next = _mm512_add_epi64(
                    _mm512_add_epi64(w[t % 16], s0),
                    _mm512_add_epi64(w[(t - 7) % 16], s1),
                );
                w[t % 16] = next;
                next
            };
            let s1 = _mm512_ternarylogic_epi64::<XOR3>(
                _mm512_ror_epi64::<14>(e),
                _mm512_ror_epi64::<18>(e),
                _mm512_ror_epi64::<41>(e),
            );
            let ch = _mm512_ternarylogic_epi64::<CH>(e, f, g);
            let t1 = _mm512_add_epi64(
                _mm512_add_epi64(
                    _mm512_add_epi64(h, s1),
                    _mm512_add_epi64(ch, _mm512_set1_epi64(*k as i64)),
                ),
                wt,
            );
            let s0 = _mm512_ternarylogic_epi64::<XOR3>(
                _mm512_ror_epi64::<28>(a),
                _mm512_ror_epi64::<34>(a),
                _mm512_ror_epi64::<39>(a),
            );
            let t2 = _mm512_add_epi64(s0, _mm512_ternarylogic_epi64::<MAJ>(a, b, c));
            h = g;
            g = f;
            f = e;
            e = _mm512_add_epi64(d, t1);
            d = c;
            c = b;
            b = a;
            a = _mm512_add_epi64(t1, t2);
        }
        for (s, v) in state.iter_mut().zip([a, b, c, d, e, f, g, h]) {
            *s = _mm512_add_epi64(*s, v);
        }
    }

    /// The eight 64-bit lanes of a register, lane 0 first.
    #[target_feature(enable = "avx512f")]
    fn lanes(v: __m512i) -> [u64; LANES] {
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

    /// SHA-384 of eight pages.
    #[target_feature(enable = "avx512f")]
    pub(super) fn sha384_x8(pages: [&Page; LANES]) -> [[u8; DIGEST_SIZE]; LANES] {
        let mut state = IV.map(|x| _mm512_set1_epi64(x as i64));
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
        let mut words = [[0u64; LANES]; 8];
        for (w, v) in words.iter_mut().zip(state) {
            *w = lanes(v);
        }
        std::array::from_fn(|lane| {
            let mut digest = [0u8; DIGEST_SIZE];
            for (out, word) in digest.chunks_exact_mut(8).zip(&words) {
                out.copy_from_slice(&word[lane].to_be_bytes());
            }
            digest
        })
    }
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
        let backends = [Backend::Sha2, Backend::detect()];
        eprintln!("backend here: {:?}", Backend::detect());
        for n in 0..=all.len() {
            let refs: Vec<&Page> = all[..n].iter().map(|p| &**p).collect();
            let want: Vec<[u8; DIGEST_SIZE]> = refs.iter().map(|p| Sha384::digest(p).into()).collect();
            for backend in backends {
                let mut got = vec![[0; DIGEST_SIZE]; n];
                hash_with(backend, &refs, &mut got);
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
