//! Project tasks, run as `cargo xtask <task>`:
//!
//! - `test`: formatting, clippy (warnings are errors), the independent test fixtures, then the
//!   whole test suite (simulator always; real-KVM tests run where `/dev/kvm` is usable and
//!   print why they skip elsewhere).
//! - `soak`: the long runs: the whole fault matrix (`VMSA_SOAK=1`: every call number of every
//!   operation the scenarios reach, and a second failure at each of the last four calls of
//!   each recovery operation), its size and outcomes printed; then the model checks of
//!   vmsa-core's locking at wider bounds and the random event runs (millions of events), their
//!   interleaving and event counts printed.
//! - `bench`: the benchmarks (`-- <filter>` narrows the criterion ones; `--quick` is the short
//!   CI form); `bench measure`: only `vmm measure` against sev-snp-measure; `bench linux-boot`:
//!   only the simulator's linux-boot scaling runs ([`linux_boot`]: the release `vmm` as a child
//!   per row, the table and an SVG plot); `bench qemu [--runs N] [--accel tcg|kvm]`: the release
//!   `vmm run --backend kvm` against QEMU, whole processes, 4 and 64 vCPUs ([`qemu`]).
//! - `fuzz --time N [TARGET]`: build the fuzz targets (`fuzz/`) with libFuzzer on the stable
//!   toolchain and run each (or TARGET) for N seconds, printing executions and coverage.
//! - `lint`: formatting and clippy only.
//! - `fixtures`: (re)generate the test vectors from independent tools (sev-snp-measure).
//! - `costs`: print the simulator's cost table, with the basis and public source of each row.

// One `unsafe` call, wait4(2) for a child's peak resident set, allowed where it is made.
#![deny(unsafe_code)]

mod linux_boot;

mod fuzz;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

mod qemu;

/// The sev-snp-measure release the fixtures are generated with.
const SEV_SNP_MEASURE: &str = "sev-snp-measure==0.0.13";

/// Why a task did not succeed.
#[derive(Debug)]
enum Failure {
    /// The command line asked for something that is not a task or an option of it: nothing
    /// ran (exit 2).
    Usage(String),
    /// A step of the task failed (exit 1).
    Failed(String),
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Self::Failed(e)
    }
}

/// A task that takes no arguments, refusing any.
fn no_arguments(rest: &[String], task: fn() -> Result<(), String>) -> Result<(), Failure> {
    match rest.first() {
        Some(a) => Err(Failure::Usage(format!(
            "unexpected argument `{a}`: this task takes none"
        ))),
        None => Ok(task()?),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = match args.split_first() {
        Some((t, r)) => (t.as_str(), r),
        None => ("help", &[][..]),
    };
    let result = match task {
        "test" => no_arguments(rest, test),
        "soak" => no_arguments(rest, soak),
        "bench" => bench(rest),
        "fuzz" => fuzz::fuzz(rest),
        "lint" => no_arguments(rest, lint),
        "fixtures" => no_arguments(rest, fixtures),
        "costs" => no_arguments(rest, costs),
        "help" | "-h" | "--help" => {
            println!(
                "usage: cargo xtask <test | soak | bench [--quick] [measure | linux-boot] [-- FILTER] | bench qemu [--runs N] [--accel tcg|kvm] | fuzz --time N [TARGET] | lint | fixtures | costs>"
            );
            Ok(())
        }
        other => Err(Failure::Usage(format!(
            "unknown task `{other}` (expected test, soak, bench, fuzz, lint, fixtures or costs)"
        ))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("xtask {task}: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(e)) => {
            eprintln!("xtask {task}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Run a command, echoing it and timing it, on our stdin, stdout and stderr; fail with its
/// status.
fn run(step: &str, mut cmd: Command) -> Result<(), String> {
    cmd.stdin(Stdio::inherit()).stdout(Stdio::inherit());
    run_capturing(step, cmd).map(drop)
}

/// [`run`], returning what the command wrote to stdout (unless the caller routed it elsewhere);
/// its stderr goes to ours.
fn run_capturing(step: &str, mut cmd: Command) -> Result<Vec<u8>, String> {
    println!("==> {step}: {cmd:?}");
    let t = Instant::now();
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{step}: cannot start {cmd:?}: {e}"))?;
    println!("<== {step}: {} in {:.1}s", out.status, t.elapsed().as_secs_f64());
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!("{step} failed ({})", out.status))
    }
}

/// The simulator's cost table (backend-sim's `costs` example prints `cost::table()`).
fn costs() -> Result<(), String> {
    let mut c = cargo();
    c.args(["run", "--quiet", "-p", "backend-sim", "--example", "costs"]);
    let status = c.status().map_err(|e| format!("cannot start {c:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("printing the cost table failed ({status})"))
    }
}

fn lint() -> Result<(), String> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--check"]);
    run("rustfmt", fmt)?;
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]);
    run("clippy", clippy)?;
    // vmsa-core must stay embeddable without the standard library.
    let mut no_std = cargo();
    no_std.args([
        "clippy",
        "--package",
        "vmsa-core",
        "--no-default-features",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]);
    run("clippy (vmsa-core, no_std)", no_std)
}

fn has_nextest() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn test() -> Result<(), String> {
    lint()?;
    fixtures()?;
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => println!("==> /dev/kvm is usable: the real-KVM tests run"),
        Err(e) => println!("==> /dev/kvm is not usable ({e}): the real-KVM tests will print why they skip"),
    }
    if has_nextest() {
        let mut t = cargo();
        t.args(["nextest", "run", "--workspace", "--locked", "--no-fail-fast"]);
        run("tests (nextest)", t)?;
    } else {
        let mut t = cargo();
        t.args(["test", "--workspace", "--locked", "--no-fail-fast"]);
        run("tests", t)?;
    }
    let mut doc = cargo();
    doc.args(["test", "--workspace", "--locked", "--doc"]);
    run("doctests", doc)?;
    let mut docs = cargo();
    docs.env("RUSTDOCFLAGS", "-D warnings")
        .args(["doc", "--workspace", "--no-deps", "--locked"]);
    run("rustdoc", docs)
}

/// The whole fault matrix (crates/vmm/tests/fault_matrix.rs widened by `VMSA_SOAK=1`), release
/// build, its summary line shown; then the model checks and random runs at their soak bounds.
fn soak() -> Result<(), String> {
    soak_tests("fault matrix (soak)", "vmm", &["fault_matrix"], &[])?;
    soak_concurrency_and_random_runs()
}

/// Issue 10 items 2 and 3 at their soak bounds (`VMSA_SOAK=1`), release builds, counts printed:
/// the model checks of vmsa-core's locking (wider scenarios, every interleaving) and the random
/// event runs on the test platform (millions of events) and on the simulated machine.
fn soak_concurrency_and_random_runs() -> Result<(), String> {
    soak_tests(
        "model checks (soak)",
        "vmsa-model-check",
        &["model_check"],
        &["--test-threads", "1"],
    )?;
    soak_tests(
        "random event runs (soak)",
        "scenario-tests",
        &["random_core", "random_sim"],
        &[],
    )
}

/// `VMSA_SOAK=1 cargo test --release` of `tests` in `package`, their output shown, `harness`
/// passed to the test harness.
fn soak_tests(label: &str, package: &str, tests: &[&str], harness: &[&str]) -> Result<(), String> {
    let mut t = cargo();
    t.env("VMSA_SOAK", "1")
        .args(["test", "--release", "--locked", "-p", package]);
    for test in tests {
        t.args(["--test", test]);
    }
    t.args(["--", "--nocapture"]).args(harness);
    run(label, t)
}

/// `bench [--quick] [measure | linux-boot] [-- FILTER...]` or `bench qemu ...`: every bench, or only one of the
/// whole-process comparisons: `measure` (`vmm measure` against sev-snp-measure,
/// `crates/vmm/benches/measure_peer.rs`) or `linux-boot` (the simulator's scaling runs,
/// [`linux_boot`]), or `qemu` ([`qemu`]). `--quick` (CI smoke) is passed on: criterion's short mode, fewer runs in
/// measure_peer, the small linux-boot rows.
fn bench(rest: &[String]) -> Result<(), Failure> {
    if let Some(("qemu", args)) = rest.split_first().map(|(a, r)| (a.as_str(), r)) {
        return qemu::bench(args);
    }
    let (ours, passed) = match rest.iter().position(|a| a == "--") {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let mut quick = false;
    let mut only = None;
    for a in ours {
        match a.as_str() {
            "--quick" => quick = true,
            "measure" | "linux-boot" if only.is_none() => only = Some(a.as_str()),
            other => {
                return Err(Failure::Usage(format!(
                    "unknown bench argument `{other}` (expected --quick, one of measure or linux-boot, or -- FILTER)"
                )));
            }
        }
    }
    let quick_arg = if quick {
        vec!["--quick".to_owned()]
    } else {
        Vec::new()
    };
    if only == Some("linux-boot") {
        return Ok(linux_boot_bench(quick)?);
    }
    let mut b = cargo();
    if only == Some("measure") {
        b.args(["bench", "-p", "vmm", "--bench", "measure_peer", "--locked"]);
    } else {
        // Only the bench targets: `--benches` would also run every library's test harness in
        // bench mode, which rejects criterion's options.
        // The model checks' crate is left out: it enables vmsa-core's `shuttle` feature, which
        // would otherwise be unified into every benchmark's build.
        b.args([
            "bench",
            "--workspace",
            "--exclude",
            "vmsa-model-check",
            "--bench",
            "*",
            "--locked",
        ]);
    }
    b.arg("--").args(passed).args(&quick_arg);
    run("benchmarks", b)?;
    if only.is_none() && passed.is_empty() {
        linux_boot_bench(quick)?;
    }
    Ok(())
}

/// The linux-boot scaling bench on a fresh release build of `vmm`.
fn linux_boot_bench(quick: bool) -> Result<(), String> {
    let vmm = release_vmm()?;
    let root = root();
    linux_boot::run(&root, &target_dir(), &vmm, quick)
}

/// Where cargo puts build outputs: `CARGO_TARGET_DIR`, else `<root>/target`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// Build the release `vmm` binary and return its path, as cargo reports it: the path depends
/// on `.cargo/config.toml`'s build target (the static build lives under the target triple).
fn release_vmm() -> Result<PathBuf, String> {
    let step = "build vmm (release)";
    let mut build = cargo();
    build
        .args(["build", "--release", "--locked", "-p", "vmm", "--bin", "vmm"])
        .arg("--message-format=json-render-diagnostics");
    String::from_utf8_lossy(&run_capturing(step, build)?)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "vmm")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| format!("{step}: cargo named no `vmm` executable"))
}

/// Generate the test vectors under `target/fixtures` with independent tools, installed into a
/// virtualenv of their own so the host Python stays untouched.
fn fixtures() -> Result<(), String> {
    let root = root();
    let script = root.join("tests/fixtures/generate.py");
    if !script.exists() {
        println!("==> fixtures: no generator yet ({})", script.display());
        return Ok(());
    }
    let venv = root.join("target/fixtures-venv");
    let python = venv.join("bin/python3");
    if !python.exists() {
        let mut mk = Command::new("python3");
        mk.args(["-m", "venv"]).arg(&venv);
        run("fixture venv", mk)?;
    }
    // The pinned release, not merely some sev-snp-measure: a venv kept from another pin would
    // generate fixtures the README attributes to this one.
    let (name, version) = SEV_SNP_MEASURE.split_once("==").expect("a name==version pin");
    let have = Command::new(&python)
        .args([
            "-c",
            &format!("import importlib.metadata as m, sys; sys.exit(m.version('{name}') != '{version}')"),
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        let mut pip = Command::new(&python);
        pip.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            SEV_SNP_MEASURE,
        ]);
        run("install sev-snp-measure", pip)?;
    }
    let mut generate = Command::new(&python);
    generate
        .arg(&script)
        .arg(root.join("target/fixtures"))
        .current_dir(&root);
    run("generate fixtures", generate)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cargo xtask soak --bogus` ran the soak, `lint extra` the lint: a task without options
    /// now refuses any, as a usage error (exit 2), without running.
    #[test]
    fn a_task_without_options_refuses_an_argument_without_running() {
        fn must_not_run() -> Result<(), String> {
            panic!("the task ran");
        }
        match no_arguments(&["--bogus".to_owned()], must_not_run) {
            Err(Failure::Usage(e)) => assert_eq!(e, "unexpected argument `--bogus`: this task takes none"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(no_arguments(&[], || Ok(())), Ok(())));
        assert!(matches!(
            no_arguments(&[], || Err("step failed".to_owned())),
            Err(Failure::Failed(e)) if e == "step failed"
        ));
    }

    #[test]
    fn bench_arguments_it_does_not_know_are_usage_errors() {
        for args in [
            &["--bogus"][..],
            &["measure", "linux-boot"][..],
            &["qemu", "--runs", "0"][..],
        ] {
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            assert!(matches!(bench(&args), Err(Failure::Usage(_))), "{args:?}");
        }
    }
}
