//! Fuzz target `fault_spec`: see `vmsa_fuzz::fault_spec`. Built by `cargo xtask fuzz` with `--cfg fuzzing`
//! (libFuzzer); built without it, it replays the files named on its command line.

#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmsa_fuzz::fault_spec::run(data));

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    vmsa_fuzz::replay_main(vmsa_fuzz::fault_spec::run)
}
