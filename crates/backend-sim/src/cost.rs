//! The cost model: a virtual clock in cycles, a default cost per operation with its basis and
//! source, overrides from a TOML or JSON file, and the per-operation ledger.
//!
//! Defaults are rmp-and-costs.md §2.3 ("Default cost table for the simulator"), at its clock of
//! 2.7 GHz (Genoa EPYC 9334 TSC). Basis: `Published` (a measurement), `Derived` (arithmetic on
//! published figures), `Estimate` (nothing published; the reference's reasoning in §2.2). Rows
//! the table does not have (host copies, page allocation, the SEV-ES firmware commands) are
//! marked as this crate's estimates and say what they were derived from.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The clock the defaults are expressed at (Genoa EPYC 9334 TSC, §2.3).
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
    /// VMRUN→#VMEXIT hardware world switch, plain SVM: 1,360 (1,340–1,380), pub P5.
    Vmrun = "vmrun", 1_360, Published, "rmp-and-costs.md 2.3: P5 (Roth, LKML 2020), pre-VMRUN to post-VMRUN";
    /// SEV-SNP VMGEXIT via GHCB, guest-observed incl. #VC: 10,400 (9,600–10,500), pub P2/P4.
    VmgexitSnp = "vmgexit_snp", 10_400, Published, "rmp-and-costs.md 2.3: P2/P4 (CVM_eval, Genoa)";
    /// SEV-ES (non-SNP) VMGEXIT: 10,000 (8,000–10,500), est (assume ≈ SNP).
    VmgexitEs = "vmgexit_es", 10_000, Estimate, "rmp-and-costs.md 2.3: assumed equal to SNP";
    /// Extra SEV-ES/SNP world switch cost vs plain: 6,600 (6,100–7,100), der P2−P1.
    EsWorldSwitchExtra = "es_world_switch_extra", 6_600, Derived, "rmp-and-costs.md 2.3: P2-P1";
    /// Exit to userspace and back: 10,000 (5,000–30,000), est.
    ExitToUserspace = "exit_to_userspace", 10_000, Estimate, "rmp-and-costs.md 2.3";
    /// RMPUPDATE 4 KiB: 1,500 (500–5,000), est.
    Rmpupdate4K = "rmpupdate_4k", 1_500, Estimate, "rmp-and-costs.md 2.3 (2.2: microcoded, 1-3 RMP accesses)";
    /// RMPUPDATE 2 MiB: 3,000 (1,000–10,000), est.
    Rmpupdate2M = "rmpupdate_2m", 3_000, Estimate, "rmp-and-costs.md 2.3";
    /// PSMASH: 6,000 (2,000–20,000), est.
    Psmash = "psmash", 6_000, Estimate, "rmp-and-costs.md 2.3 (writes 512 entries)";
    /// PVALIDATE 4 KiB: 1,500 (500–3,000), est.
    Pvalidate4K = "pvalidate_4k", 1_500, Estimate, "rmp-and-costs.md 2.3";
    /// PVALIDATE 2 MiB: 2,500 (1,000–6,000), est.
    Pvalidate2M = "pvalidate_2m", 2_500, Estimate, "rmp-and-costs.md 2.3";
    /// RMPADJUST 4 KiB (incl. VMSA bit): 1,500 (500–3,000), est.
    Rmpadjust = "rmpadjust", 1_500, Estimate, "rmp-and-costs.md 2.3";
    /// RMP check per TLB fill, RMP line cached: 40 (0–400), est bounded by P8.
    RmpCheck = "rmp_check", 40, Estimate, "rmp-and-costs.md 2.3 (bounded by P8 +40 ns)";
    /// gmem first private fault (alloc + clear + RMPUPDATE) + NPF: 3,350 + 2,000 + 1,500, est.
    GmemFault = "gmem_fault", 6_850, Estimate, "rmp-and-costs.md 2.3 (3,350 + 2,000 + 1,500)";
    /// CLFLUSH(OPT) of one 4 KiB page + fence: 1,000 (500–3,000), est.
    Clflush = "clflush_page", 1_000, Estimate, "rmp-and-costs.md 2.3";
    /// VM_PAGE_FLUSH (WRMSR C001_011E) of one 4 KiB page: 2,000 (1,000–10,000), est.
    VmPageFlush = "vm_page_flush", 2_000, Estimate, "rmp-and-costs.md 2.3";
    /// wbinvd_on_all_cpus: 2,700,000 (800 k–27 M), est.
    WbinvdAll = "wbinvd_all", 2_700_000, Estimate, "rmp-and-costs.md 2.3";
    /// SNP_INIT_EX: 1,350,000,000 (0.05–2 s), est.
    SnpInit = "snp_init", 1_350_000_000, Estimate, "rmp-and-costs.md 2.3";
    /// SNP_GCTX_CREATE: 270,000 (135 k–2.7 M), est.
    SnpGctxCreate = "snp_gctx_create", 270_000, Estimate, "rmp-and-costs.md 2.3";
    /// SNP_LAUNCH_START (key generation): 540,000 (135 k–5.4 M), est.
    SnpLaunchStart = "snp_launch_start", 540_000, Estimate, "rmp-and-costs.md 2.3";
    /// SNP_ACTIVATE: 540,000 (135 k–5.4 M), est.
    SnpActivate = "snp_activate", 540_000, Estimate, "rmp-and-costs.md 2.3";
    /// SNP_LAUNCH_UPDATE 4 KiB NORMAL or VMSA: 8,100,000 (270 k–16 M), der P6.
    SnpLaunchUpdateMeasured = "snp_launch_update_measured", 8_100_000, Derived, "rmp-and-costs.md 2.3: P6 (3.18 s QEMU launch / ~1,060 pages)";
    /// SNP_LAUNCH_UPDATE 4 KiB ZERO/UNMEASURED/SECRETS/CPUID: 4,000,000 (135 k–16 M), est.
    SnpLaunchUpdateOther = "snp_launch_update_other", 4_000_000, Estimate, "rmp-and-costs.md 2.3 (half of NORMAL)";
    /// SNP_LAUNCH_FINISH, no ID block: 540,000 (270 k–13.5 M), est.
    SnpLaunchFinish = "snp_launch_finish", 540_000, Estimate, "rmp-and-costs.md 2.3";
    /// SNP_PAGE_RECLAIM 4 KiB: 270,000 (135 k–2.7 M), est.
    SnpPageReclaim = "snp_page_reclaim", 270_000, Estimate, "rmp-and-costs.md 2.3";
    /// SNP_DECOMMISSION: 540,000 (135 k–5.4 M), est.
    SnpDecommission = "snp_decommission", 540_000, Estimate, "rmp-and-costs.md 2.3";
    /// SNP_DF_FLUSH: 1,350,000 (270 k–27 M), est.
    SnpDfFlush = "snp_df_flush", 1_350_000, Estimate, "rmp-and-costs.md 2.3";
    /// SNP_DBG_DECRYPT 4 KiB: 2,700,000 (270 k–8.1 M), est.
    SnpDbgDecrypt = "snp_dbg_decrypt", 2_700_000, Estimate, "rmp-and-costs.md 2.3";
    /// SEV-ES LAUNCH_START: taken as SNP_LAUNCH_START (540,000), est.
    SevLaunchStart = "sev_launch_start", 540_000, Estimate, "backend-sim: SNP_LAUNCH_START row of 2.3 reused";
    /// SEV-ES ACTIVATE: taken as SNP_ACTIVATE (540,000), est.
    SevActivate = "sev_activate", 540_000, Estimate, "backend-sim: SNP_ACTIVATE row of 2.3 reused";
    /// SEV-ES LAUNCH_UPDATE_DATA / LAUNCH_UPDATE_VMSA 4 KiB: taken as SNP NORMAL (8,100,000), est.
    SevLaunchUpdate = "sev_launch_update", 8_100_000, Estimate, "backend-sim: SNP_LAUNCH_UPDATE NORMAL row of 2.3 reused";
    /// SEV-ES LAUNCH_FINISH (with LAUNCH_MEASURE): taken as SNP_LAUNCH_FINISH (540,000), est.
    SevLaunchFinish = "sev_launch_finish", 540_000, Estimate, "backend-sim: SNP_LAUNCH_FINISH row of 2.3 reused";
    /// SEV-ES DEACTIVATE: taken as SNP_DECOMMISSION (540,000), est.
    SevDeactivate = "sev_deactivate", 540_000, Estimate, "backend-sim: SNP_DECOMMISSION row of 2.3 reused";
    /// SEV-ES DECOMMISSION: taken as SNP_DECOMMISSION (540,000), est.
    SevDecommission = "sev_decommission", 540_000, Estimate, "backend-sim: SNP_DECOMMISSION row of 2.3 reused";
    /// SEV-ES DBG_DECRYPT 4 KiB: taken as SNP_DBG_DECRYPT (2,700,000), est.
    SevDbgDecrypt = "sev_dbg_decrypt", 2_700_000, Estimate, "backend-sim: SNP_DBG_DECRYPT row of 2.3 reused";
    /// Host page allocation (zeroing 4 KiB): 1,000, est (not in 2.3; a 4 KiB clear at ~16 B/cycle plus allocator).
    PageAlloc = "page_alloc", 1_000, Estimate, "backend-sim estimate: 4 KiB clear + buddy allocator";
    /// Host copy of one 4 KiB frame: 500, est (not in 2.3; 4 KiB at ~8 B/cycle from L2).
    HostCopy = "host_copy", 500, Estimate, "backend-sim estimate: 4 KiB memcpy";
    /// Guest access of one 4 KiB page through the encryption engine: 500, est (as host copy).
    GuestCopy = "guest_copy", 500, Estimate, "backend-sim estimate: 4 KiB memcpy, AES inline";
}

impl CostOp {
    /// The operation from its name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|o| o.name() == s)
    }
}

/// Why a cost file was refused.
#[derive(Debug, thiserror::Error)]
pub enum CostError {
    /// The file is not valid TOML/JSON of the expected shape.
    #[error("cost file {path}: {detail}")]
    Parse {
        /// The file (or `<string>`).
        path: String,
        /// The parser's message.
        detail: String,
    },
    /// An operation name is unknown.
    #[error("cost file {path}: unknown operation `{name}` (known: {known})")]
    UnknownOp {
        /// The file.
        path: String,
        /// The name.
        name: String,
        /// The known names.
        known: String,
    },
    /// The clock is not a positive finite frequency.
    #[error("cost file {path}: clock_hz {clock_hz} must be a positive number of cycles per second")]
    BadClock {
        /// The file.
        path: String,
        /// The value.
        clock_hz: f64,
    },
    /// The file could not be read.
    #[error("cannot read cost file {path}: {detail}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        detail: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CostFile {
    clock_hz: Option<f64>,
    #[serde(default)]
    cycles: BTreeMap<String, u64>,
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
        let parsed: CostFile = if path.ends_with(".json") {
            serde_json::from_str(text).map_err(|e| e.to_string())
        } else {
            toml::from_str(text).map_err(|e| e.to_string())
        }
        .map_err(|detail| CostError::Parse {
            path: path.into(),
            detail,
        })?;
        let mut m = Self::default();
        if let Some(hz) = parsed.clock_hz {
            if !(hz.is_finite() && hz > 0.0) {
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
            m.set(op, cycles);
        }
        Ok(m)
    }

    /// [`CostModel::from_text`] of a file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, CostError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| CostError::Io {
            path: name.clone(),
            detail: e.to_string(),
        })?;
        Self::from_text(&name, &text)
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
}

impl Ledger {
    /// The current time in cycles.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Charge `op` `n` times; returns the start time and duration.
    pub fn charge(&mut self, model: &CostModel, op: CostOp, n: u64) -> (u64, u64) {
        let dur = model.cycles(op).saturating_mul(n);
        let start = self.now;
        self.now = self.now.saturating_add(dur);
        let t = self.per_op.entry(op).or_default();
        t.count += n;
        t.cycles = t.cycles.saturating_add(dur);
        (start, dur)
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
    /// Total time in microseconds.
    pub total_us: f64,
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
            total_us: model.micros(ledger.now()),
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
        assert_eq!(m.cycles(CostOp::SnpLaunchUpdateMeasured), 8_100_000);
        assert_eq!(CostOp::VmgexitSnp.basis(), Basis::Published);
        for &op in CostOp::ALL {
            assert_eq!(CostOp::from_name(op.name()), Some(op));
            assert!(!op.source().is_empty());
        }
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
        let e = CostModel::from_text("c.toml", "speed = 1").unwrap_err();
        assert!(matches!(e, CostError::Parse { .. }), "{e}");
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
    }
}
