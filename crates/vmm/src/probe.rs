//! `vmm probe`: what this host supports — KVM, its VM types, SEV-SNP or not and exactly why —
//! and which backend `vmm run` would use.

use serde::Serialize;

/// The arguments of `vmm probe`.
#[derive(Clone, Debug, clap::Args)]
pub struct ProbeArgs {
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `vmm probe` reports.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeOutput {
    /// The simulator is always available.
    pub sim: &'static str,
    /// What the KVM probe found.
    pub kvm: backend_kvm::ProbeReport,
    /// The mode a `--backend kvm` run uses here (the text's "A run uses ... mode."), as
    /// `kvm.modes[].mode` names it; `null` when no mode can run.
    pub run_mode: Option<backend_kvm::Mode>,
}

/// Probe the host and render the answer.
pub fn probe(args: &ProbeArgs) -> String {
    let kvm = backend_kvm::probe();
    let out = ProbeOutput {
        sim: "available (software SEV-SNP machine; the default backend)",
        run_mode: kvm.best_mode(),
        kvm,
    };
    if args.json {
        let mut s = serde_json::to_string_pretty(&out)
            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string());
        s.push('\n');
        s
    } else {
        format!("backend sim: {}\nbackend kvm:\n{}\n", out.sim, out.kvm)
    }
}
