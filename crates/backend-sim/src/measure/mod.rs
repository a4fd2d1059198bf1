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
//! and of the chain, so [`SnpLaunchDigest::update_pages`] hashes each page whose bytes differ
//! from the page before it once, on every core, while the chain follows (what `vmm measure`
//! needs for hundreds of identical AP VMSAs and a 2 MiB firmware image); and
//! [`SnpLaunchDigest::update_read`] measures an image while it is read.

mod arrivals;

use core::mem::offset_of;

use sha2::{Digest, Sha256, Sha384};
use sha384_pages::sha384_pages;
use vmsa_core::{Gpa, PAGE_SIZE, PageBuf, SevEsSaveArea, SnpPageType, ZERO_PAGE};

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
    /// on each, faster. A page whose bytes equal the page's before it (a run of identical AP
    /// VMSAs, of erased flash) reuses that page's contents hash; the other contents hashes are
    /// spread over the available cores, and the chain runs over them in order as they are
    /// done. No allocation per page.
    pub fn update_pages(&mut self, pages: &[SnpPage<'_>]) {
        // Helpers for the pages with contents, not counting a page that is the one before it
        // (hundreds of AP VMSAs are one image): a helper that finds nothing to hash still
        // costs its start and its join.
        let mut previous = None;
        let to_hash = pages
            .iter()
            .filter(|p| matches!(p.page_type, SnpPageType::Normal | SnpPageType::Vmsa))
            .filter(|p| {
                let c = p.contents.unwrap_or(&ZERO_PAGE);
                !previous.replace(c).is_some_and(|q| core::ptr::eq(q, c))
            })
            .count();
        let helpers = arrivals::helpers_for(to_hash);
        let ((), ld) = arrivals::snp(self.ld, pages.len(), helpers, sha384_pages, |p| {
            p.arrive(pages.iter().copied())
        });
        self.ld = ld;
    }

    /// Extend the digest with the `Normal` pages of an image of `len` bytes loaded from `gpa`
    /// on, while `read` brings them into memory: `read` runs on this thread and hands each
    /// piece it has read (whole pages, in order) to the function it is given, and the pages are
    /// hashed on the other cores as they come, as [`SnpLaunchDigest::update_pages`] hashes
    /// them. Returns what `read` returns. Pages that `read` does not hand over (a file that
    /// turned out shorter) are not measured: the caller that gets fewer than `len` bytes has
    /// the digest of fewer pages.
    pub fn update_read<'a, R>(
        &mut self,
        gpa: Gpa,
        len: usize,
        read: impl FnOnce(&mut dyn FnMut(&'a [u8])) -> R,
    ) -> R {
        let n = len / PAGE_SIZE as usize;
        let (r, ld) = arrivals::snp(self.ld, n, arrivals::helpers_for(n), sha384_pages, |p| {
            let mut next = gpa;
            read(&mut |piece: &'a [u8]| {
                let (whole, _) = piece.as_chunks::<{ PAGE_SIZE as usize }>();
                p.arrive(whole.iter().map(|page| {
                    let at = next;
                    next = Gpa(next.0 + PAGE_SIZE);
                    SnpPage {
                        gpa: at,
                        page_type: SnpPageType::Normal,
                        contents: Some(page),
                    }
                }));
            })
        });
        self.ld = ld;
        r
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

/// `PAGE_INFO.CONTENTS` of a page: the SHA-384 of `contents` for `Normal` pages, of `contents`
/// with `GUEST_TSC_SCALE` and `GUEST_TSC_OFFSET` read as zero for `Vmsa` pages, zeros for
/// every other type.
pub fn contents_hash(page_type: SnpPageType, contents: &PageBuf) -> [u8; SNP_DIGEST_SIZE] {
    match page_type {
        SnpPageType::Normal => Sha384::digest(contents).into(),
        SnpPageType::Vmsa => vmsa_contents_hash(contents),
        _ => [0; SNP_DIGEST_SIZE],
    }
}

/// The SHA-384 the firmware measures for a VMSA page: the page as if its `GUEST_TSC_SCALE`
/// and `GUEST_TSC_OFFSET` (16 bytes at 0x2F0) were zero, so that the hypervisor's TSC settings
/// do not change the launch digest. Hashed in three pieces, without a copy of the page.
fn vmsa_contents_hash(contents: &PageBuf) -> [u8; SNP_DIGEST_SIZE] {
    // amd/AMD-ASPFW fw/psp_bl_uapps/sev_uapp/src/sev_mcmd.c, snp_mcmd_launch_update: "If VMSA
    // page, ignore the values of GUEST_TSC_SCALE and GUEST_TSC_OFFSET and measure the VMSA as
    // if those fields contained zero" (both set to 0 in the scratch copy before digest_sha).
    // The fields' offsets are vmsa-core's layout (0x2F0 and 0x2F8, as the firmware's sev_es.h).
    const START: usize = offset_of!(SevEsSaveArea, tsc_scale);
    const END: usize = offset_of!(SevEsSaveArea, tsc_offset) + 8;
    let mut h = Sha384::new();
    h.update(&contents[..START]);
    h.update([0u8; END - START]);
    h.update(&contents[END..]);
    h.finalize().into()
}

/// The contents hash of the last page measured one at a time, as the firmware measures
/// (one `SNP_LAUNCH_UPDATE` page per command), so that a run of equal pages is hashed once, as
/// [`SnpLaunchDigest::update_pages`] does within a batch: a launch of erased flash, or of the
/// gigabyte of zero pages an IGVM file's data-less directives may ask for, costs the
/// simulator one SHA-384 of a page instead of one per page. The digest is the same.
/// The page is kept with whether it was a VMSA: the same bytes hash differently as a VMSA.
#[derive(Clone, Debug, Default)]
pub struct LastContents(Option<Box<(bool, PageBuf, [u8; SNP_DIGEST_SIZE])>>);

impl LastContents {
    /// [`contents_hash`] of `contents` as a page of `page_type`: the last page's hash when
    /// the bytes are the same.
    pub fn hash(&mut self, page_type: SnpPageType, contents: &PageBuf) -> [u8; SNP_DIGEST_SIZE] {
        if !matches!(page_type, SnpPageType::Normal | SnpPageType::Vmsa) {
            return contents_hash(page_type, contents);
        }
        let vmsa = page_type == SnpPageType::Vmsa;
        match &mut self.0 {
            Some(last) if last.0 == vmsa && last.1 == *contents => last.2,
            Some(last) => {
                *last.as_mut() = (vmsa, *contents, contents_hash(page_type, contents));
                last.2
            }
            None => {
                let hash = contents_hash(page_type, contents);
                self.0 = Some(Box::new((vmsa, *contents, hash)));
                hash
            }
        }
    }
}

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

    /// amd/AMD-ASPFW sev_mcmd.c `snp_mcmd_launch_update`: a VMSA measures as if
    /// GUEST_TSC_SCALE and GUEST_TSC_OFFSET were zero, one page at a time, through the
    /// last-contents cache and in a batch; a Normal page with the same bytes measures them all.
    #[test]
    fn a_vmsa_measures_its_tsc_fields_as_zero_on_every_path() {
        let mut zeroed = [0x33u8; 4096];
        zeroed[0x2F0..0x300].fill(0);
        let mut tsc = zeroed;
        tsc[0x2F0..0x300].fill(0x77);
        let mut elsewhere = zeroed;
        elsewhere[0x2EF] = 0;
        let hash = |ty, p: &PageBuf| contents_hash(ty, p);
        assert_eq!(hash(SnpPageType::Vmsa, &tsc), hash(SnpPageType::Vmsa, &zeroed));
        assert_eq!(
            hash(SnpPageType::Vmsa, &zeroed),
            hash(SnpPageType::Normal, &zeroed)
        );
        assert_ne!(
            hash(SnpPageType::Vmsa, &elsewhere),
            hash(SnpPageType::Vmsa, &zeroed)
        );
        assert_ne!(
            hash(SnpPageType::Normal, &tsc),
            hash(SnpPageType::Normal, &zeroed)
        );
        let mut last = LastContents::default();
        for (ty, page) in [
            (SnpPageType::Normal, &tsc),
            (SnpPageType::Vmsa, &tsc),
            (SnpPageType::Normal, &tsc),
            (SnpPageType::Vmsa, &elsewhere),
        ] {
            assert_eq!(last.hash(ty, page), contents_hash(ty, page), "{ty:?}");
        }
        let launch = |pages: &[(SnpPageType, &PageBuf)]| {
            let mut one = SnpLaunchDigest::new();
            let batch: Vec<SnpPage<'_>> = (0u64..)
                .zip(pages)
                .map(|(i, &(page_type, contents))| {
                    one.update(Gpa(i << 12), page_type, contents);
                    SnpPage {
                        gpa: Gpa(i << 12),
                        page_type,
                        contents: Some(contents),
                    }
                })
                .collect();
            let mut all = SnpLaunchDigest::new();
            all.update_pages(&batch);
            assert_eq!(all, one, "batch and one by one");
            one
        };
        use SnpPageType::{Normal, Vmsa};
        assert_eq!(launch(&[(Vmsa, &tsc)]), launch(&[(Vmsa, &zeroed)]));
        assert_ne!(launch(&[(Vmsa, &elsewhere)]), launch(&[(Vmsa, &zeroed)]));
        // A run of equal bytes that changes type mid-run: each type hashes its own way.
        let mixed = launch(&[(Normal, &tsc), (Vmsa, &tsc), (Vmsa, &tsc), (Normal, &tsc)]);
        let mut want = SnpLaunchDigest::new();
        for (i, (ty, p)) in [(Normal, &tsc), (Vmsa, &zeroed), (Vmsa, &zeroed), (Normal, &tsc)]
            .into_iter()
            .enumerate()
        {
            want.update_hashed(Gpa((i as u64) << 12), ty, &Sha384::digest(p).into());
        }
        assert_eq!(mixed, want);
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
