//! Fault specs (`backend_sim::FaultPlan` from text, what `vmm run --fault SPEC` reads), and the
//! plan's call counting.
//!
//! Input: the spec's text (non-UTF-8 input is not a spec: a command-line argument that is not
//! UTF-8 is refused before the parser), then nothing else.
//!
//! Properties: a refusal is one line and names the rule it read (as written); no two rules of
//! a parsed plan fail the same call; every rule of a parsed plan
//! prints in the syntax it parses from, back to the same rule, and the printed plan parses to
//! the same rules; counting calls fires at most one rule per call, with its code, and a rule
//! alone on its operation exactly at its call number (for call numbers small enough to reach).

use backend_sim::fault::{FaultPlan, FaultRule};

use crate::one_line;

/// Rules with call numbers up to this are driven to their firing call.
const DRIVE_CALLS: u64 = 64;

/// Run one input.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let plan: FaultPlan = match text.parse() {
        Ok(p) => p,
        Err(e) => {
            one_line(&e.to_string());
            assert!(
                text.contains(e.input.trim()),
                "the error names `{}`, not in the spec",
                e.input
            );
            return;
        }
    };
    let rules = plan.pending().to_vec();
    for (i, a) in rules.iter().enumerate() {
        assert!(
            !rules[i + 1..].iter().any(|b| a.same_call(b)),
            "two rules fail the call of `{a}`"
        );
    }
    let mut printed = Vec::new();
    for rule in &rules {
        let text = rule.to_string();
        let back: FaultRule = text.parse().expect("a printed rule parses");
        assert_eq!(back, *rule, "`{text}`");
        printed.push(text);
    }
    let again: FaultPlan = printed.join(",").parse().expect("a printed plan parses");
    assert_eq!(again.pending(), &rules[..]);
    // Count calls: a call fires at most one rule, which moves from pending to fired with
    // its code; a rule alone on its operation fires exactly at its call number.
    let mut plan = plan;
    for rule in rules.iter().filter(|r| r.nth <= DRIVE_CALLS) {
        let alone = rules.iter().filter(|r| r.op == rule.op).count() == 1;
        for n in plan.calls(rule.op) + 1..=rule.nth {
            let pending = plan.pending().len();
            match plan.check(rule.op, rule.page_type) {
                Some(code) => {
                    assert_eq!(plan.pending().len() + 1, pending, "one rule fires per call");
                    let fired = plan.fired().last().expect("the rule that fired");
                    assert_eq!((fired.op, fired.code), (rule.op, code));
                    if alone {
                        assert_eq!((fired, n), (rule, rule.nth), "fired at call {n}");
                    }
                }
                None => {
                    assert_eq!(plan.pending().len(), pending, "a rule vanished without firing");
                    assert!(!alone || n < rule.nth, "{rule} did not fire at call {n}");
                }
            }
        }
    }
    assert_eq!(plan.fired().len() + plan.pending().len(), rules.len());
}
