//! Coverage-guided fuzz targets for every parser and decoder that takes outside input, and the
//! replay of their committed corpora as plain tests.
//!
//! Each target is one function from any bytes to `()` that panics only when a property broke:
//! it feeds the bytes to the parser, requires an error or a value (never a panic, never an
//! unbounded loop: inputs whose work would be unbounded are cut to a documented budget), and
//! checks what holds for the result beyond "no panic" (round trips, rules the value must obey,
//! one-line error messages, and, for guest scripts, the simulated host's frame ledger).
//!
//! - `cargo xtask fuzz --time N [TARGET]` builds the `fuzz_targets/` binaries with libFuzzer
//!   and rustc's SanitizerCoverage instrumentation on the stable toolchain (see TESTING.md) and
//!   runs each for N seconds, seeded from `fuzz/corpus/TARGET/`.
//! - `cargo test -p vmsa-fuzz` (part of `cargo xtask test`) runs every committed corpus file
//!   through its target without instrumentation ([`TARGETS`]).
//! - Built without `--cfg fuzzing`, a target binary replays the files it is given
//!   (`cargo run -p vmsa-fuzz --bin ghcb -- crash-file`), to reproduce a crash in a debugger.

use std::path::Path;
use std::process::ExitCode;

pub mod cost_file;
pub mod fault_spec;
pub mod ghcb;
pub mod guest_script;
pub mod igvm;
mod input;
pub mod ovmf;
pub mod seeds;
mod sim;
pub mod vmsa_image;

/// A fuzz target: any bytes in; a panic means a property broke.
pub type Target = fn(&[u8]);

/// Every target by name: the name of its binary in `fuzz_targets/`, of its corpus directory
/// under `fuzz/corpus/` and of its optional dictionary `fuzz/dict/NAME.dict`.
pub const TARGETS: &[(&str, Target)] = &[
    ("ghcb", ghcb::run),
    ("vmsa_image", vmsa_image::run),
    ("ovmf", ovmf::run),
    ("guest_script", guest_script::run),
    ("fault_spec", fault_spec::run),
    ("cost_file", cost_file::run),
    ("igvm", igvm::run),
];

/// The `main` of a target binary built without `--cfg fuzzing`: run every file named on the
/// command line through `target`, saying which one is running (a panic names the culprit).
pub fn replay_main(target: Target) -> ExitCode {
    let files: Vec<String> = std::env::args().skip(1).collect();
    if files.is_empty() {
        eprintln!("usage: TARGET FILE... (runs each file through the fuzz target)");
        return ExitCode::from(2);
    }
    for file in files {
        match std::fs::read(Path::new(&file)) {
            Ok(data) => {
                eprintln!("{file}: {} bytes", data.len());
                target(&data);
            }
            Err(e) => {
                eprintln!("{file}: cannot read: {e}");
                return ExitCode::from(2);
            }
        }
    }
    ExitCode::SUCCESS
}

/// Require a message to be one line: every error this workspace prints is (`vmm` prints it
/// after the input's name, with exit code 2).
#[track_caller]
pub(crate) fn one_line(msg: &str) {
    assert!(!msg.is_empty() && !msg.contains('\n'), "not one line: {msg:?}");
}
