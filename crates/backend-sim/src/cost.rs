//! The cost model: a virtual clock in cycles, a default cost per operation with its basis and
//! source, overrides from a TOML or JSON file, and the per-operation ledger.
//!
//! Defaults are at a clock of 2.7 GHz (the EPYC 9334 TSC of the published measurements).
//! Basis: `Published` (a public measurement that states the figure), `Derived` (arithmetic on
//! published figures), `Estimate` (nothing public states it). Every row's `source` names the
//! public source and where in it; an estimate's source begins with "estimate" and gives its
//! reasoning (and the public figure that bounds it, if any). `cargo xtask costs` prints the
//! table ([`table`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vmsa_host::input::one_line;

/// The clock the defaults are expressed at: the TSC of TUM-DSE/CVM_eval's EPYC 9334 (Genoa) host
/// (docs/amd-snp.md names the CPU; benchmarks/vmexit/README.md's 10,421 cycles in 3,859 ns is
/// 2.70 GHz).
pub const DEFAULT_CLOCK_HZ: f64 = 2.7e9;

/// Where a default number comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Basis {
    /// A published measurement ("pub").
    Published,
    /// Derived from published figures ("der").
    Derived,
    /// An estimate, nothing published ("est").
    Estimate,
}

macro_rules! cost_ops {
    ($( $(#[$doc:meta])* $v:ident = $name:literal, $cycles:expr, $basis:ident, $src:literal; )*) => {
        /// Every operation the machine charges.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(rename_all = "snake_case")]
        pub enum CostOp { $( $(#[$doc])* $v, )* }

        impl CostOp {
            /// Every operation, in table order.
            pub const ALL: &'static [CostOp] = &[$(CostOp::$v),*];

            /// The name used in reports, traces and override files.
            pub fn name(self) -> &'static str {
                match self { $(CostOp::$v => $name,)* }
            }

            /// The default cost in cycles.
            pub fn default_cycles(self) -> u64 {
                match self { $(CostOp::$v => $cycles,)* }
            }

            /// The basis of the default.
            pub fn basis(self) -> Basis {
                match self { $(CostOp::$v => Basis::$basis,)* }
            }

            /// The source of the default.
            pub fn source(self) -> &'static str {
                match self { $(CostOp::$v => $src,)* }
            }
        }
    };
}

cost_ops! {
    /// VMRUN→#VMEXIT hardware world switch, plain SVM: 1,360 (1,340–1,380), estimate.
    Vmrun = "vmrun", 1_360, Estimate, "estimate: 1,344-1,376 cycles pre-VMRUN to post-VMRUN for a trivial exit are attributed to Michael Roth's KVM_RUN breakdown (LKML, https://lkml.iu.edu/hypermail/linux/kernel/2012.2/00527.html), but that breakdown could not be found in the public text";
    /// SEV-SNP VMGEXIT via GHCB, guest-observed incl. #VC: 10,400 (9,600–10,500), published.
    VmgexitSnp = "vmgexit_snp", 10_400, Published, "TUM-DSE/CVM_eval benchmarks/vmexit/README.md: one SNP VMGEXIT (CPUID) = 10,397 cycles on an EPYC 9334 (data of Misono et al., SIGMETRICS 2025)";
    /// SEV-ES (non-SNP) VMGEXIT: 10,000 (8,000–10,500), estimate.
    VmgexitEs = "vmgexit_es", 10_000, Estimate, "estimate: no SEV-ES (non-SNP) exit measurement found; taken about equal to the SNP VMGEXIT of TUM-DSE/CVM_eval benchmarks/vmexit/README.md";
    /// Exit to userspace and back: 10,000 (5,000–30,000), estimate.
    ExitToUserspace = "exit_to_userspace", 10_000, Estimate, "estimate: no measurement found; a few syscall round trips plus the VMM's dispatch";
    /// RMPUPDATE 4 KiB: 1,500 (500–5,000), estimate.
    Rmpupdate4K = "rmpupdate_4k", 1_500, Estimate, "estimate: no measurement found; a microcoded instruction with one to three RMP entry accesses";
    /// RMPUPDATE 2 MiB: 3,000 (1,000–10,000), estimate.
    Rmpupdate2M = "rmpupdate_2m", 3_000, Estimate, "estimate: no measurement found; twice the 4 KiB RMPUPDATE (the 512-entry overlap check)";
    /// PSMASH: 6,000 (2,000–20,000), estimate.
    Psmash = "psmash", 6_000, Estimate, "estimate: no measurement found; writes 512 RMP entries";
    /// PVALIDATE 4 KiB: 1,500 (500–3,000), estimate.
    Pvalidate4K = "pvalidate_4k", 1_500, Estimate, "estimate: no measurement found; taken as the 4 KiB RMPUPDATE";
    /// PVALIDATE 2 MiB: 2,500 (1,000–6,000), estimate.
    Pvalidate2M = "pvalidate_2m", 2_500, Estimate, "estimate: no measurement found; one 2 MiB entry, somewhat above the 4 KiB PVALIDATE";
    /// RMPADJUST 4 KiB (incl. VMSA bit): 1,500 (500–3,000), estimate.
    Rmpadjust = "rmpadjust", 1_500, Estimate, "estimate: no measurement found; taken as the 4 KiB PVALIDATE";
    /// RMP check of one SNP C=1 guest page access (one TLB fill): 40 (0–400), estimate.
    RmpCheck = "rmp_check", 40, Estimate, "estimate, charged once per SNP C=1 guest page access (one TLB fill): AMDESE/AMDSEV issue #225 (https://github.com/AMDESE/AMDSEV/issues/225) reports MLC idle latency about 40 ns worse on 4 KiB guest_memfd, NPT and RMP walks together, an upper bound";
    /// gmem first private fault (alloc + clear + RMPUPDATE) + NPF: 6,850, estimate.
    GmemFault = "gmem_fault", 6_850, Estimate, "estimate: a plain guest-observed exit (3,350 cycles, TUM-DSE/CVM_eval benchmarks/vmexit/plot.py, EPYC 9334) + clearing 4 KiB (2,000, estimate) + a 4 KiB RMPUPDATE (1,500, estimate)";
    /// CLFLUSH(OPT) of one 4 KiB page + fence: 1,000 (500–3,000), estimate.
    Clflush = "clflush_page", 1_000, Estimate, "estimate: no measurement found; 64 CLFLUSHOPTs and a fence";
    /// VM_PAGE_FLUSH (WRMSR C001_011E) of one 4 KiB page: 2,000 (1,000–10,000), estimate.
    VmPageFlush = "vm_page_flush", 2_000, Estimate, "estimate: no measurement found; an MSR write plus the flush of one page";
    /// wbinvd_on_all_cpus: 2,700,000 (800 k–27 M), estimate.
    WbinvdAll = "wbinvd_all", 2_700_000, Estimate, "estimate: no figure published; 1 ms. The WBNOINVD series (https://lkml.iu.edu/hypermail/linux/kernel/2502.0/03497.html) only calls WBINVD performance-costly";
    /// SNP_INIT_EX: 1,350,000,000 (0.05–2 s), estimate.
    SnpInit = "snp_init", 1_350_000_000, Estimate, "estimate: no measurement found; 0.5 s (RMP initialisation at boot)";
    /// SNP_GCTX_CREATE: 270,000 (135 k–2.7 M), estimate.
    SnpGctxCreate = "snp_gctx_create", 270_000, Estimate, "estimate: no measurement found; a PSP mailbox round trip plus one page write (0.1 ms)";
    /// SNP_LAUNCH_START (key generation): 540,000 (135 k–5.4 M), estimate.
    SnpLaunchStart = "snp_launch_start", 540_000, Estimate, "estimate: no measurement found; key generation in the PSP (0.2 ms)";
    /// SNP_ACTIVATE: 540,000 (135 k–5.4 M), estimate.
    SnpActivate = "snp_activate", 540_000, Estimate, "estimate: no measurement found; programming the key into the memory controllers and an RMP ASID scan (0.2 ms)";
    /// SNP_LAUNCH_UPDATE 4 KiB NORMAL or VMSA, KVM's whole per-page work: 2,578,000
    /// (2,337,000–2,578,000), derived.
    SnpLaunchUpdateMeasured = "snp_launch_update_measured", 2_578_000, Derived, "derived from microsoft/openvmm PR #4321 (https://github.com/microsoft/openvmm/pull/4321, 'KVM SNP launch' table): one Linux kernel and initrd launched on KVM SNP as a dense IGVM image (every RAM page a measured page; 14,307,818 bytes, median 44.77 s) and as a sparse one (launch-critical pages only, the rest PVALIDATEd by a guest bootshim; 13,119,466 bytes, median 9.32 s) differ by 35.46 s; the sparse image leaves out at least 1,188,352 bytes / 32 bytes per data-less IGVM PAGE_DATA header (igvm_defs IGVM_VHS_PAGE_DATA + IGVM_VHS_VARIABLE_HEADER) = 37,136 pages, so one KVM_SEV_SNP_LAUNCH_UPDATE page (guest_memfd allocation, RMPUPDATE, the PSP command) costs at most 35.46 s / 37,136 = 0.955 ms (plus the microseconds the sparse guest may spend validating each left-out page inside the timed span), and at least 0.866 ms if the RAM is the 40,960 pages of openvmm's default snp-linux-direct profile (vm/loader/manifests/README.md); the host is not named, cycles are at 2.7 GHz. TUM-DSE/CVM_eval benchmarks/boottime/README.md's 3.18 s sev_snp_launch_finish on an EPYC 9334 would be about 3 ms per page for a 4 MiB OVMF, but its page count is not published";
    /// SNP_LAUNCH_UPDATE 4 KiB ZERO/UNMEASURED/SECRETS/CPUID: 1,289,000 (135 k–2.6 M), estimate.
    SnpLaunchUpdateOther = "snp_launch_update_other", 1_289_000, Estimate, "estimate: half of the snp_launch_update_measured figure (no SHA-384 of the contents)";
    /// SNP_LAUNCH_FINISH, no ID block: 540,000 (270 k–13.5 M), estimate.
    SnpLaunchFinish = "snp_launch_finish", 540_000, Estimate, "estimate: no measurement found; one digest and a state change (0.2 ms)";
    /// SNP_PAGE_RECLAIM 4 KiB: 270,000 (135 k–2.7 M), estimate.
    SnpPageReclaim = "snp_page_reclaim", 270_000, Estimate, "estimate: no measurement found; a PSP mailbox round trip and one RMP write (0.1 ms)";
    /// SNP_DECOMMISSION: 540,000 (135 k–5.4 M), estimate.
    SnpDecommission = "snp_decommission", 540_000, Estimate, "estimate: no measurement found; deactivation and context clean-up (0.2 ms)";
    /// SNP_DF_FLUSH: 1,350,000 (270 k–27 M), estimate.
    SnpDfFlush = "snp_df_flush", 1_350_000, Estimate, "estimate: no measurement found; a data-fabric flush on every die (0.5 ms)";
    /// SNP_DBG_DECRYPT 4 KiB: 2,700,000 (270 k–8.1 M), estimate.
    SnpDbgDecrypt = "snp_dbg_decrypt", 2_700_000, Estimate, "estimate: no measurement found; one page decrypted by the PSP (1 ms)";
    /// SEV-ES LAUNCH_START: taken as SNP_LAUNCH_START (540,000), estimate.
    SevLaunchStart = "sev_launch_start", 540_000, Estimate, "estimate: no SEV-ES firmware measurement found; the snp_launch_start estimate reused";
    /// SEV-ES ACTIVATE: taken as SNP_ACTIVATE (540,000), estimate.
    SevActivate = "sev_activate", 540_000, Estimate, "estimate: no SEV-ES firmware measurement found; the snp_activate estimate reused";
    /// SEV-ES LAUNCH_UPDATE_DATA / LAUNCH_UPDATE_VMSA 4 KiB: taken as SNP NORMAL (2,578,000), estimate.
    SevLaunchUpdate = "sev_launch_update", 2_578_000, Estimate, "estimate: no SEV-ES firmware measurement found; the snp_launch_update_measured figure reused";
    /// SEV-ES LAUNCH_FINISH (with LAUNCH_MEASURE): taken as SNP_LAUNCH_FINISH (540,000), estimate.
    SevLaunchFinish = "sev_launch_finish", 540_000, Estimate, "estimate: no SEV-ES firmware measurement found; the snp_launch_finish estimate reused";
    /// SEV-ES DEACTIVATE: taken as SNP_DECOMMISSION (540,000), estimate.
    SevDeactivate = "sev_deactivate", 540_000, Estimate, "estimate: no SEV-ES firmware measurement found; the snp_decommission estimate reused";
    /// SEV-ES DECOMMISSION: taken as SNP_DECOMMISSION (540,000), estimate.
    SevDecommission = "sev_decommission", 540_000, Estimate, "estimate: no SEV-ES firmware measurement found; the snp_decommission estimate reused";
    /// SEV-ES DBG_DECRYPT 4 KiB: taken as SNP_DBG_DECRYPT (2,700,000), estimate.
    SevDbgDecrypt = "sev_dbg_decrypt", 2_700_000, Estimate, "estimate: no SEV-ES firmware measurement found; the snp_dbg_decrypt estimate reused";
    /// Host page allocation (zeroing 4 KiB): 1,000, estimate.
    PageAlloc = "page_alloc", 1_000, Estimate, "estimate: a 4 KiB clear at about 16 bytes per cycle plus the buddy allocator";
    /// Host copy of one 4 KiB frame: 500, estimate.
    HostCopy = "host_copy", 500, Estimate, "estimate: a 4 KiB memcpy at about 8 bytes per cycle";
    /// Guest access of one 4 KiB page through the encryption engine: 500, estimate.
    GuestCopy = "guest_copy", 500, Estimate, "estimate: a 4 KiB memcpy, AES in the memory controller inline";
}

impl CostOp {
    /// The operation from its name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|o| o.name() == s)
    }
}

/// The default table, one row per operation: name, cycles, basis and source (what
/// `cargo xtask costs` prints).
pub fn table() -> String {
    let mut out = format!(
        "{:<28} {:>14}  {:<9}  source (clock {} GHz)\n",
        "operation",
        "cycles",
        "basis",
        DEFAULT_CLOCK_HZ / 1e9
    );
    for &op in CostOp::ALL {
        let basis = match op.basis() {
            Basis::Published => "published",
            Basis::Derived => "derived",
            Basis::Estimate => "estimate",
        };
        out += &format!(
            "{:<28} {:>14}  {:<9}  {}\n",
            op.name(),
            op.default_cycles(),
            basis,
            op.source()
        );
    }
    out
}

/// Why a cost file was refused. Every message is one line that starts with the file's name
/// (control characters in the name or in text quoted from the file are shown escaped).
#[derive(Debug, thiserror::Error)]
pub enum CostError {
    /// The file is not valid TOML/JSON of the expected shape.
    #[error("{}: {}", one_line(.path), one_line(.detail))]
    Parse {
        /// How the file is named (`--costs FILE`, a path, or `<string>`).
        path: String,
        /// The parser's message.
        detail: String,
    },
    /// An operation name is unknown.
    #[error("{}: unknown operation `{}` (known: {known})", one_line(.path), one_line(.name))]
    UnknownOp {
        /// How the file is named.
        path: String,
        /// The name.
        name: String,
        /// The known names.
        known: String,
    },
    /// The clock is outside [`CLOCK_HZ_RANGE`].
    #[error("{}: clock_hz {clock_hz:?} must be a clock frequency from 1e6 to 1e11 cycles per second", one_line(.path))]
    BadClock {
        /// How the file is named.
        path: String,
        /// The value.
        clock_hz: f64,
    },
    /// An operation's cost is above [`MAX_OP_CYCLES`].
    #[error(
        "{}: {op} = {cycles} cycles is above the most one operation may cost ({MAX_OP_CYCLES} cycles)",
        one_line(.path)
    )]
    BadCycles {
        /// How the file is named.
        path: String,
        /// The operation.
        op: &'static str,
        /// The value.
        cycles: u64,
    },
    /// The file could not be opened or read, or is not a regular file within
    /// [`COST_FILE_KIND`]'s limit.
    #[error(transparent)]
    Input(#[from] vmsa_host::input::InputError),
}

/// The clock frequencies a cost file may set: 1 MHz to 100 GHz, so that times in microseconds
/// stay finite and meaningful.
pub const CLOCK_HZ_RANGE: std::ops::RangeInclusive<f64> = 1e6..=1e11;

/// The most cycles one operation may cost: 2^40 (about 400 s at 2.7 GHz). This bounds one
/// charge, not a run: 2^24 operations of that cost (a 64 GiB guest validated 4 KiB at a time)
/// reach the machine's 64-bit clock, which then stops at `u64::MAX` and the [`Ledger`] records
/// that it saturated ([`CostReport::saturated`]).
pub const MAX_OP_CYCLES: u64 = 1 << 40;

/// Cost files: at most 1 MiB (a file naming every operation is about 2 KiB).
pub const COST_FILE_KIND: vmsa_host::input::InputKind = vmsa_host::input::InputKind {
    what: "a cost file",
    limit: 1 << 20,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CostFile {
    clock_hz: Option<f64>,
    #[serde(default, deserialize_with = "unique_keys")]
    cycles: BTreeMap<String, u64>,
}

/// A map that refuses a key given twice: JSON parsers keep the last of repeated keys, so the
/// first value would be dropped unchecked (TOML refuses repeated keys itself).
fn unique_keys<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, u64>, D::Error> {
    struct Unique;
    impl<'de> serde::de::Visitor<'de> for Unique {
        type Value = BTreeMap<String, u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map of operation names to cycles")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((key, value)) = map.next_entry::<String, u64>()? {
                if out.contains_key(&key) {
                    return Err(serde::de::Error::custom(format_args!(
                        "duplicate operation `{key}` in cycles"
                    )));
                }
                out.insert(key, value);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Unique)
}

/// Costs in cycles for every operation, and the clock that turns cycles into time.
#[derive(Clone, Debug, PartialEq)]
pub struct CostModel {
    clock_hz: f64,
    cycles: BTreeMap<CostOp, u64>,
}

impl Default for CostModel {
    fn default() -> Self {
        Self {
            clock_hz: DEFAULT_CLOCK_HZ,
            cycles: CostOp::ALL.iter().map(|&o| (o, o.default_cycles())).collect(),
        }
    }
}

impl CostModel {
    /// The cost of `op`.
    pub fn cycles(&self, op: CostOp) -> u64 {
        self.cycles.get(&op).copied().unwrap_or(op.default_cycles())
    }

    /// Override the cost of `op`.
    pub fn set(&mut self, op: CostOp, cycles: u64) {
        self.cycles.insert(op, cycles);
    }

    /// Cycles per second.
    pub fn clock_hz(&self) -> f64 {
        self.clock_hz
    }

    /// Cycles in microseconds at the model's clock.
    pub fn micros(&self, cycles: u64) -> f64 {
        cycles as f64 * 1e6 / self.clock_hz
    }

    /// The defaults with the overrides of a TOML (`clock_hz = 3.0e9` and a `[cycles]` table)
    /// or JSON (`{"clock_hz": ..., "cycles": {...}}`) text; `path` names it in errors and
    /// decides the format (`.json` is JSON, anything else TOML).
    pub fn from_text(path: &str, text: &str) -> Result<Self, CostError> {
        Self::parse(path, path.ends_with(".json"), text)
    }

    fn parse(path: &str, json: bool, text: &str) -> Result<Self, CostError> {
        let parsed: CostFile = if json {
            serde_json::from_str(text).map_err(|e| e.to_string())
        } else {
            toml::from_str(text).map_err(|e| toml_one_line(&e, text))
        }
        .map_err(|detail| CostError::Parse {
            path: path.into(),
            detail,
        })?;
        let mut m = Self::default();
        if let Some(hz) = parsed.clock_hz {
            if !CLOCK_HZ_RANGE.contains(&hz) {
                return Err(CostError::BadClock {
                    path: path.into(),
                    clock_hz: hz,
                });
            }
            m.clock_hz = hz;
        }
        for (name, cycles) in parsed.cycles {
            let op = CostOp::from_name(&name).ok_or_else(|| CostError::UnknownOp {
                path: path.into(),
                name: name.clone(),
                known: CostOp::ALL
                    .iter()
                    .map(|o| o.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
            if cycles > MAX_OP_CYCLES {
                return Err(CostError::BadCycles {
                    path: path.into(),
                    op: op.name(),
                    cycles,
                });
            }
            m.set(op, cycles);
        }
        Ok(m)
    }

    /// [`CostModel::from_text`] of a file, given with `option` (e.g. `--costs`), which errors
    /// name together with the path. The file is read as [`vmsa_host::input`] reads every input
    /// (a regular file, opened without blocking, at most [`COST_FILE_KIND`]'s limit).
    pub fn from_file(option: &str, path: &std::path::Path) -> Result<Self, CostError> {
        let text = vmsa_host::input::read_text(option, path, COST_FILE_KIND)?;
        let name = format!("{option} {}", path.display());
        Self::parse(&name, path.extension().is_some_and(|e| e == "json"), &text)
    }
}

/// A TOML error as one line, `line L, column C: MESSAGE` (its `Display` spans 5-6 lines with
/// a source excerpt).
fn toml_one_line(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {msg}")
        }
        None => msg,
    }
}

/// Count and cycles of one operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OpTotals {
    /// Times charged.
    pub count: u64,
    /// Cycles charged.
    pub cycles: u64,
}

/// The virtual clock and what was charged to it.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    now: u64,
    per_op: BTreeMap<CostOp, OpTotals>,
    saturated: bool,
}

impl Ledger {
    /// The current time in cycles.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Charge `op` `n` times; returns the start time and duration.
    /// A charge past `u64::MAX` cycles stops the clock there and marks the ledger
    /// [`Ledger::saturated`]: its times are no longer times.
    pub fn charge(&mut self, model: &CostModel, op: CostOp, n: u64) -> (u64, u64) {
        let dur = model.cycles(op).checked_mul(n);
        let now = dur.and_then(|d| self.now.checked_add(d));
        let t = self.per_op.entry(op).or_default();
        let count = t.count.checked_add(n);
        let cycles = dur.and_then(|d| t.cycles.checked_add(d));
        if now.is_none() || count.is_none() || cycles.is_none() {
            self.saturated = true;
        }
        let dur = dur.unwrap_or(u64::MAX);
        t.count = count.unwrap_or(u64::MAX);
        t.cycles = cycles.unwrap_or(u64::MAX);
        let start = self.now;
        self.now = now.unwrap_or(u64::MAX);
        (start, dur)
    }

    /// Whether a charge ran past `u64::MAX` cycles: the clock stopped there, so it and every
    /// time measured across the overflow are lower bounds, not times.
    pub fn saturated(&self) -> bool {
        self.saturated
    }

    /// Totals per operation.
    pub fn totals(&self) -> &BTreeMap<CostOp, OpTotals> {
        &self.per_op
    }
}

/// One row of a [`CostReport`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CostRow {
    /// The operation.
    pub op: &'static str,
    /// Times charged.
    pub count: u64,
    /// Cycles charged.
    pub cycles: u64,
    /// Cycles per call in the model.
    pub unit_cycles: u64,
    /// Basis of the default.
    pub basis: Basis,
    /// Source of the default.
    pub source: &'static str,
}

/// Per-operation counts and cycles, and the total.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CostReport {
    /// Cycles per second of the model.
    pub clock_hz: f64,
    /// Every operation charged at least once.
    pub ops: Vec<CostRow>,
    /// Total cycles.
    pub total_cycles: u64,
    /// Total time in microseconds; infinite (`null` in JSON) when [`Self::saturated`].
    pub total_us: f64,
    /// The clock ran past `u64::MAX` cycles and stopped there: `total_cycles` (and any row at
    /// `u64::MAX`) is a lower bound, not a time.
    pub saturated: bool,
}

impl CostReport {
    /// The report of a ledger under a model.
    pub fn new(model: &CostModel, ledger: &Ledger) -> Self {
        let ops = ledger
            .totals()
            .iter()
            .map(|(&op, t)| CostRow {
                op: op.name(),
                count: t.count,
                cycles: t.cycles,
                unit_cycles: model.cycles(op),
                basis: op.basis(),
                source: op.source(),
            })
            .collect();
        Self {
            clock_hz: model.clock_hz(),
            ops,
            total_cycles: ledger.now(),
            total_us: if ledger.saturated() {
                f64::INFINITY
            } else {
                model.micros(ledger.now())
            },
            saturated: ledger.saturated(),
        }
    }

    /// The row of an operation, if it was charged.
    pub fn op(&self, op: CostOp) -> Option<&CostRow> {
        self.ops.iter().find(|r| r.op == op.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_carry_the_reference_numbers_and_names_round_trip() {
        let m = CostModel::default();
        assert_eq!(m.cycles(CostOp::Rmpupdate4K), 1_500);
        assert_eq!(m.cycles(CostOp::SnpLaunchUpdateMeasured), 2_578_000);
        assert_eq!(CostOp::VmgexitSnp.basis(), Basis::Published);
        for &op in CostOp::ALL {
            assert_eq!(CostOp::from_name(op.name()), Some(op));
            assert!(!op.source().is_empty());
        }
    }

    #[test]
    fn every_cost_row_has_a_basis_and_a_public_source() {
        for &op in CostOp::ALL {
            let src = op.source();
            assert!(
                !src.contains("rmp-and-costs") && !src.starts_with("backend-sim"),
                "{}: the source must be public, not a file outside the repository: {src}",
                op.name()
            );
            match op.basis() {
                Basis::Estimate => assert!(
                    src.starts_with("estimate"),
                    "{}: an estimate must say so: {src}",
                    op.name()
                ),
                Basis::Published | Basis::Derived => assert!(
                    src.contains("https://") || src.contains("github") || src.contains("CVM_eval"),
                    "{}: a published or derived figure must name its public source: {src}",
                    op.name()
                ),
            }
            if op.basis() == Basis::Derived {
                assert!(
                    src.starts_with("derived"),
                    "{}: a derived figure must say so: {src}",
                    op.name()
                );
            }
        }
        let t = table();
        assert_eq!(t.lines().count(), CostOp::ALL.len() + 1);
        assert!(t.contains("vmgexit_snp") && t.contains("published"));
    }

    #[test]
    fn launch_update_is_the_openvmm_dense_minus_sparse_time_per_left_out_page() {
        // microsoft/openvmm PR #4321: the dense image (14,307,818 bytes, median 44.77 s) and
        // the sparse one (13,119,466 bytes, median 9.32 s) differ by 35.46 s and by one 32-byte
        // data-less PAGE_DATA header per page the sparse image leaves out.
        let left_out = (14_307_818u64 - 13_119_466) / 32;
        assert_eq!(left_out, 37_136);
        let per_page = 35.46 * DEFAULT_CLOCK_HZ / left_out as f64;
        let op = CostOp::SnpLaunchUpdateMeasured;
        assert!(
            (per_page - op.default_cycles() as f64).abs() < 1_000.0,
            "{per_page}"
        );
        assert_eq!(op.basis(), Basis::Derived);
        for figure in ["44.77 s", "9.32 s", "35.46 s", "1,188,352 bytes", "37,136"] {
            assert!(op.source().contains(figure), "the source must show {figure}");
        }
        // The rows that reuse it.
        assert_eq!(
            CostOp::SnpLaunchUpdateOther.default_cycles(),
            op.default_cycles() / 2
        );
        assert_eq!(CostOp::SevLaunchUpdate.default_cycles(), op.default_cycles());
    }

    #[test]
    fn overrides_from_toml_and_json() {
        let t = CostModel::from_text("c.toml", "clock_hz = 3.0e9\n[cycles]\nrmpupdate_4k = 99\n").unwrap();
        assert_eq!(t.cycles(CostOp::Rmpupdate4K), 99);
        assert_eq!(t.clock_hz(), 3.0e9);
        assert_eq!(t.cycles(CostOp::Psmash), 6_000);
        let j = CostModel::from_text("c.json", r#"{"cycles": {"psmash": 7}}"#).unwrap();
        assert_eq!(j.cycles(CostOp::Psmash), 7);
        assert_eq!(j.clock_hz(), DEFAULT_CLOCK_HZ);
        let e = CostModel::from_text("c.toml", "[cycles]\nrmpupdate = 1\n").unwrap_err();
        assert!(e.to_string().contains("unknown operation `rmpupdate`"), "{e}");
        let e = CostModel::from_text("c.json", r#"{"clock_hz": 0}"#).unwrap_err();
        assert!(matches!(e, CostError::BadClock { .. }), "{e}");
        // A clock that would give infinite or meaningless times, and a cost of one operation
        // above MAX_OP_CYCLES, are refused with the bound (a run may still saturate the clock
        // with many operations: the ledger then says so, see
        // `a_saturated_clock_is_recorded_and_reported_as_no_time`).
        for (text, shown) in [
            ("clock_hz = 1e-300\n", "1e-300"),
            ("clock_hz = 1e300\n", "1e300"),
            ("clock_hz = nan\n", "NaN"),
            ("clock_hz = 2e11\n", "200000000000.0"),
        ] {
            let e = CostModel::from_text("c.toml", text).unwrap_err();
            assert!(matches!(e, CostError::BadClock { .. }), "{text}: {e}");
            // The value as short as it reads (1e300 was shown with its 301 digits).
            assert_eq!(
                e.to_string(),
                format!(
                    "c.toml: clock_hz {shown} must be a clock frequency from 1e6 to 1e11 cycles per second"
                )
            );
        }
        let e = CostModel::from_text("c.toml", "[cycles]\nvmrun = 9223372036854775807\n").unwrap_err();
        assert!(matches!(e, CostError::BadCycles { op: "vmrun", .. }), "{e}");
        assert_eq!(e.to_string().lines().count(), 1, "{e}");
        assert!(CostModel::from_text("c.toml", "[cycles]\nvmrun = 1099511627776\n").is_ok());
        let e = CostModel::from_text("c.toml", "speed = 1").unwrap_err();
        assert!(matches!(e, CostError::Parse { .. }), "{e}");
    }

    /// Regression: JSON kept the last of a repeated operation, so a first value above
    /// MAX_OP_CYCLES was never checked; TOML refused the repeat. Both refuse it now.
    #[test]
    fn a_repeated_operation_is_refused_in_json_as_in_toml() {
        let e = CostModel::from_text("c.json", r#"{"cycles":{"vmrun":1099511627776,"vmrun":5}}"#)
            .unwrap_err()
            .to_string();
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(
            e.starts_with("c.json: duplicate operation `vmrun` in cycles"),
            "{e}"
        );
        let e = CostModel::from_text("c.json", r#"{"cycles":{"psmash":1,"vm\nrun":2,"vm\nrun":3}}"#)
            .unwrap_err()
            .to_string();
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains("duplicate operation `vm\\nrun`"), "{e}");
        let e = CostModel::from_text("c.toml", "[cycles]\nvmrun = 1\nvmrun = 2\n").unwrap_err();
        assert!(matches!(e, CostError::Parse { .. }), "{e}");
        let e = CostModel::from_text("c.json", r#"{"clock_hz":1e9,"clock_hz":2e9}"#).unwrap_err();
        assert!(e.to_string().contains("duplicate field `clock_hz`"), "{e}");
        let ok = CostModel::from_text("c.json", r#"{"cycles":{"vmrun":5,"psmash":6}}"#).unwrap();
        assert_eq!((ok.cycles(CostOp::Vmrun), ok.cycles(CostOp::Psmash)), (5, 6));
    }

    #[test]
    fn toml_errors_are_one_line_with_line_and_column() {
        let e = CostModel::from_text("c.toml", "\nclock_hz = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.starts_with("c.toml: line 2, column 12: "), "{e}");
        assert!(e.contains("invalid type: string \"x\", expected f64"), "{e}");
        let e = CostModel::from_text("c.toml", "[cycles]\npsmash = = 1\n")
            .unwrap_err()
            .to_string();
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.starts_with("c.toml: line 2, column "), "{e}");
    }

    /// Regression (found by the `cost_file` fuzz target): a key holding an escaped newline is
    /// quoted unescaped by the JSON parser and in the unknown-operation refusal, which made
    /// the message two lines.
    #[test]
    fn refusals_quoting_the_file_are_one_line() {
        for (path, text) in [
            ("c.json", r#"{"clock\nhz": 0}"#),
            ("c.toml", "[cycles]\n\"vm\\nrun\" = 1\n"),
            ("c.json", r#"{"cycles": {"vm\nrun": 1}}"#),
        ] {
            let e = CostModel::from_text(path, text).unwrap_err().to_string();
            assert_eq!(e.lines().count(), 1, "{text}: {e}");
            assert!(e.starts_with(&format!("{path}: ")) && e.contains("\\n"), "{e}");
        }
    }

    #[test]
    fn ledger_counts_and_reports() {
        let m = CostModel::default();
        let mut l = Ledger::default();
        assert_eq!(l.charge(&m, CostOp::Rmpupdate4K, 2), (0, 3_000));
        assert_eq!(l.charge(&m, CostOp::Vmrun, 1), (3_000, 1_360));
        let r = CostReport::new(&m, &l);
        assert_eq!(r.total_cycles, 4_360);
        assert_eq!(r.op(CostOp::Rmpupdate4K).unwrap().count, 2);
        assert!((r.total_us - 4_360.0 / 2_700.0).abs() < 1e-9);
        assert!(!l.saturated() && !r.saturated);
    }

    /// Regression: `pvalidate_4k = 2^40` (allowed) over a 64 GiB guest at 4 KiB (2^24
    /// PVALIDATEs) ran the clock past u64::MAX; it stopped there silently and the report showed
    /// 18446744073709551615 cycles as a time.
    #[test]
    fn a_saturated_clock_is_recorded_and_reported_as_no_time() {
        let m = CostModel::from_text("c.toml", "[cycles]\npvalidate_4k = 1099511627776\n").unwrap();
        let mut l = Ledger::default();
        l.charge(&m, CostOp::Pvalidate4K, 1 << 23);
        assert!(!l.saturated(), "2^63 cycles still fit");
        assert!(!CostReport::new(&m, &l).saturated);
        l.charge(&m, CostOp::Pvalidate4K, 1 << 23);
        assert!(l.saturated(), "2^64 cycles do not");
        assert_eq!(l.now(), u64::MAX);
        let r = CostReport::new(&m, &l);
        assert!(r.saturated);
        assert!(r.total_us.is_infinite(), "no time is made of the stopped clock");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["saturated"], true);
        // One overflowing charge (cost times count) saturates too.
        let mut l = Ledger::default();
        l.charge(&m, CostOp::Pvalidate4K, 1 << 24);
        assert!(l.saturated() && CostReport::new(&m, &l).saturated);
    }
}
