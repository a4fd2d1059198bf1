//! Cost files (`backend_sim::CostModel::from_text`, what `vmm run --costs FILE` reads), TOML or
//! JSON.
//!
//! Input: a flags byte (bit 0: the file is named `.json`, else `.toml`), then the file's text
//! (non-UTF-8 input is not a cost file: the file reader refuses it before the parser).
//!
//! Properties: a refusal is one line that starts with the file's name; an accepted model has
//! its clock within `CLOCK_HZ_RANGE` and every cost at most `MAX_OP_CYCLES`, prints to TOML and
//! to JSON that parse back to the same model, and a ledger charged with it reports finite
//! times, with the virtual clock saturating rather than wrapping.

use backend_sim::cost::{CLOCK_HZ_RANGE, CostModel, CostOp, CostReport, Ledger, MAX_OP_CYCLES};

use crate::input::Input;
use crate::one_line;

/// Run one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let json = input.bool();
    let Ok(text) = std::str::from_utf8(input.rest()) else {
        return;
    };
    let path = if json { "fuzz.json" } else { "fuzz.toml" };
    let model = match CostModel::from_text(path, text) {
        Ok(m) => m,
        Err(e) => {
            let msg = e.to_string();
            one_line(&msg);
            assert!(msg.starts_with(&format!("{path}: ")), "{msg}");
            return;
        }
    };
    assert!(
        CLOCK_HZ_RANGE.contains(&model.clock_hz()),
        "clock {}",
        model.clock_hz()
    );
    for &op in CostOp::ALL {
        assert!(
            model.cycles(op) <= MAX_OP_CYCLES,
            "{} = {}",
            op.name(),
            model.cycles(op)
        );
    }
    let (toml, json) = print(&model);
    assert_eq!(
        CostModel::from_text("printed.toml", &toml).expect("printed TOML parses"),
        model,
        "{toml}"
    );
    assert_eq!(
        CostModel::from_text("printed.json", &json).expect("printed JSON parses"),
        model,
        "{json}"
    );
    let mut ledger = Ledger::default();
    let mut last = 0;
    for &op in CostOp::ALL {
        ledger.charge(&model, op, 1 << 20);
        assert!(ledger.now() >= last, "the clock went back");
        last = ledger.now();
    }
    let report = CostReport::new(&model, &ledger);
    assert!(
        report.total_us.is_finite() && report.total_us >= 0.0,
        "{}",
        report.total_us
    );
    let mut huge = Ledger::default();
    for _ in 0..2 {
        let before = huge.now();
        huge.charge(&model, CostOp::Vmrun, u64::MAX / 2);
        assert!(huge.now() >= before, "the clock wrapped");
    }
}

/// The model as a TOML and a JSON cost file naming every operation.
fn print(model: &CostModel) -> (String, String) {
    let mut toml = format!("clock_hz = {:?}\n[cycles]\n", model.clock_hz());
    let mut cycles = Vec::new();
    for &op in CostOp::ALL {
        toml += &format!("{} = {}\n", op.name(), model.cycles(op));
        cycles.push(format!("\"{}\": {}", op.name(), model.cycles(op)));
    }
    let json = format!(
        "{{\"clock_hz\": {:?}, \"cycles\": {{{}}}}}",
        model.clock_hz(),
        cycles.join(", ")
    );
    (toml, json)
}
