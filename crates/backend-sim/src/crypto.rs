//! Memory encryption with a per-guest key and a physical-address tweak.
//!
//! SEV encrypts each 16-byte block with the guest's AES key and a tweak derived from the
//! block's system-physical address, so the same plaintext at two addresses (or under two keys)
//! gives different ciphertext, and moved ciphertext no longer decrypts. This module uses
//! AES-128 in XEX mode: `C = E_k1(P ^ T) ^ T` with `T = E_k2(SPA)`. Keys come from the
//! firmware's generator at launch start.

use aes::Aes128;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use vmsa_core::{PAGE_SIZE, PageBuf, Pfn};

type Block = GenericArray<u8, aes::cipher::consts::U16>;

/// A guest's memory encryption key (VEK): a shared handle, so the frames a key encrypted can
/// name it (see `HostMemory::write_encrypted`) and cloning it copies no key schedule.
#[derive(Clone)]
pub struct GuestKey(Arc<Schedules>);

/// The expanded AES keys of a [`GuestKey`] and a short id that tells keys apart in logs.
struct Schedules {
    data: Aes128,
    tweak: Aes128,
    id: [u8; 8],
}

/// Keys are equal when they are one key: handles to the same schedules (the firmware generates
/// each guest's key once and hands out clones of it).
impl PartialEq for GuestKey {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for GuestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material; the id tells keys apart in logs.
        write!(f, "GuestKey({:02x?})", self.0.id)
    }
}

/// The firmware's key generator: deterministic for a machine seed, so runs are reproducible.
#[derive(Debug, Clone)]
pub struct KeySource {
    seed: u64,
    counter: u64,
}

impl KeySource {
    /// A generator for a machine seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { seed, counter: 0 }
    }

    /// The next fresh key.
    pub fn generate(&mut self) -> GuestKey {
        self.counter += 1;
        let mut h = Sha256::new();
        h.update(b"backend-sim VEK");
        h.update(self.seed.to_le_bytes());
        h.update(self.counter.to_le_bytes());
        let k: [u8; 32] = h.finalize().into();
        GuestKey::from_bytes(&k)
    }

    /// 32 pseudo-random bytes (secrets page contents, for example).
    pub fn bytes(&mut self, label: &[u8]) -> [u8; 32] {
        self.counter += 1;
        let mut h = Sha256::new();
        h.update(label);
        h.update(self.seed.to_le_bytes());
        h.update(self.counter.to_le_bytes());
        h.finalize().into()
    }
}

impl GuestKey {
    /// A key from 32 bytes: the data key, then the tweak key.
    pub fn from_bytes(k: &[u8; 32]) -> Self {
        let mut id = [0u8; 8];
        id.copy_from_slice(&Sha256::digest(k)[..8]);
        Self(Arc::new(Schedules {
            data: Aes128::new(GenericArray::from_slice(&k[..16])),
            tweak: Aes128::new(GenericArray::from_slice(&k[16..])),
            id,
        }))
    }

    fn tweaks(&self, pfn: Pfn) -> Vec<Block> {
        let base = pfn.0 * PAGE_SIZE;
        let mut t: Vec<Block> = (0..PAGE_SIZE / 16)
            .map(|i| {
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&(base + i * 16).to_le_bytes());
                Block::from(b)
            })
            .collect();
        self.0.tweak.encrypt_blocks(&mut t);
        t
    }

    fn xor(blocks: &mut [Block], t: &[Block]) {
        for (b, t) in blocks.iter_mut().zip(t) {
            for (x, y) in b.iter_mut().zip(t.iter()) {
                *x ^= y;
            }
        }
    }

    fn blocks(page: &PageBuf) -> Vec<Block> {
        page.chunks_exact(16).map(|c| *Block::from_slice(c)).collect()
    }

    fn store(blocks: &[Block], page: &mut PageBuf) {
        for (c, b) in page.chunks_exact_mut(16).zip(blocks) {
            c.copy_from_slice(b);
        }
    }

    /// XEX over the page in frame `pfn`: tweak, `cipher` with the data key, tweak again.
    fn xex(&self, pfn: Pfn, page: &mut PageBuf, cipher: impl FnOnce(&Aes128, &mut [Block])) {
        let t = self.tweaks(pfn);
        let mut b = Self::blocks(page);
        Self::xor(&mut b, &t);
        cipher(&self.0.data, &mut b);
        Self::xor(&mut b, &t);
        Self::store(&b, page);
    }

    /// Encrypt a page that will sit in frame `pfn`.
    pub fn encrypt(&self, pfn: Pfn, page: &mut PageBuf) {
        self.xex(pfn, page, |k, b| k.encrypt_blocks(b));
    }

    /// Decrypt the contents of frame `pfn`.
    pub fn decrypt(&self, pfn: Pfn, page: &mut PageBuf) {
        self.xex(pfn, page, |k, b| k.decrypt_blocks(b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ciphertext_depends_on_key_and_address() {
        let mut ks = KeySource::new(7);
        let (k1, k2) = (ks.generate(), ks.generate());
        let plain = [0x5a; 4096];
        let enc = |k: &GuestKey, pfn| {
            let mut p = plain;
            k.encrypt(Pfn(pfn), &mut p);
            p
        };
        let c = enc(&k1, 0x100);
        assert_ne!(c, plain);
        assert_ne!(c, enc(&k2, 0x100), "another key");
        assert_ne!(c, enc(&k1, 0x101), "another address");
        assert_ne!(c[..16], c[16..32], "identical blocks encrypt differently (tweak)");
        let mut back = c;
        k1.decrypt(Pfn(0x100), &mut back);
        assert_eq!(back, plain);
        let mut wrong = c;
        k2.decrypt(Pfn(0x100), &mut wrong);
        assert_ne!(wrong, plain);
        assert_eq!(
            KeySource::new(7).generate().0.id,
            k1.0.id,
            "deterministic per seed"
        );
    }
}
