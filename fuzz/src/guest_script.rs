//! Guest scripts (`backend_sim::GuestScript::from_json`, what `vmm run --guest FILE` reads),
//! and the host rules they reach: a script that parsed runs on a small simulated VM
//! (`backend_sim::host::run_script`: vmsa-core's host kernel on the simulated machine), within
//! a step budget.
//!
//! Input: the script's JSON text (non-UTF-8 input is not a script: the file reader refuses it
//! before the parser). A script whose `name` starts with `sev-es` runs on an SEV-ES VM, any
//! other on an SEV-SNP VM; both have 4 vCPUs and 64 MiB of guest memory from GPA 0.
//!
//! Budget: scripts of more than [`MAX_ACTIONS`] actions, or whose multi-page actions cover
//! more than [`MAX_PAGES`] 4 KiB pages in all, are parsed but not run (the simulator does every
//! page's work; the VMM bounds a run with its watchdog, which this target has no use for).
//!
//! Properties: a parsed script prints to JSON that parses back to the same script; a refusal is
//! one line; a run records one step per action, each failure with a non-empty one-line reason;
//! and afterwards the machine's frame ledger is clean (every frame freed or reported leaked, no
//! frame freed while assigned or unflushed, no RMP fault of the host).

use backend_sim::GuestScript;
use backend_sim::host::run_script;
use vmsa_core::{PAGE_SIZE, SNP_POLICY_RSVD_MBO, VmConfig};

use crate::one_line;
use crate::sim::SimGuest;

/// The most actions a script that runs may have.
pub const MAX_ACTIONS: usize = 128;
/// The most 4 KiB pages the multi-page actions of a script that runs may cover in all.
pub const MAX_PAGES: u128 = 2048;

/// Run one input.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let script = match GuestScript::from_json("fuzz.json", text) {
        Ok(s) => s,
        Err(e) => return one_line(&e.to_string()),
    };
    let printed = script.to_json();
    let back = GuestScript::from_json("printed", &printed).expect("a printed script parses");
    assert_eq!(back, script, "parse, print, parse changed the script");
    let pages: u128 = script
        .actions
        .iter()
        .filter_map(|a| a.span())
        .map(|(_, bytes)| bytes.div_ceil(u128::from(PAGE_SIZE)))
        .sum();
    if script.actions.len() > MAX_ACTIONS || pages > MAX_PAGES {
        return;
    }
    let config = if script.name.starts_with("sev-es") {
        VmConfig::sev_es(0)
    } else {
        VmConfig::snp(0)
    };
    let mut g = SimGuest::new(config, 4);
    g.vm.launch_start(SNP_POLICY_RSVD_MBO)
        .expect("launch start of a fresh VM");
    g.vm.launch_finish([0; 32]).expect("launch finish of a fresh VM");
    let activity = run_script(&g.vm, &script);
    assert_eq!(
        activity.steps.len(),
        script.actions.len(),
        "one step per action: {:?}",
        activity.steps
    );
    for (i, (step, action)) in activity.steps.iter().zip(&script.actions).enumerate() {
        assert_eq!(
            (step.index, step.action.as_str(), step.vcpu),
            (i, action.name(), action.vcpu())
        );
        if let Some(e) = &step.error {
            one_line(e);
        }
    }
    g.finish();
}
