//! Fuzz target `igvm`: see `vmsa_fuzz::igvm`. Built by `cargo xtask fuzz` with `--cfg fuzzing`
//! (libFuzzer); built without it, it replays the files named on its command line.

#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmsa_fuzz::igvm::run(data));

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    vmsa_fuzz::replay_main(vmsa_fuzz::igvm::run)
}
