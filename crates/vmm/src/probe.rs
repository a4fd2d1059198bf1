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
}

/// Probe the host and render the answer.
pub fn probe(args: &ProbeArgs) -> String {
    let out = ProbeOutput {
        sim: "available (software SEV-SNP machine; the default backend)",
        kvm: backend_kvm::probe(),
    };
    if args.json {
        let mut s = serde_json::to_string_pretty(&out).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        s.push('\n');
        s
    } else {
        format!("backend sim: {}\nbackend kvm:\n{}\n", out.sim, out.kvm)
    }
}
