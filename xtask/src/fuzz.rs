//! `cargo xtask fuzz --time N [TARGET]`: build the fuzz targets of `fuzz/` (package
//! `vmsa-fuzz`) with libFuzzer and run each for N seconds, one after the other.
//!
//! The build is the one cargo-fuzz makes with `--sanitizer none`, on the stable toolchain: a
//! release build with debug assertions and overflow checks, `--cfg fuzzing` (which links
//! libFuzzer, compiled from the C++ sources libfuzzer-sys ships), and LLVM's SanitizerCoverage
//! pass run through rustc's stable `-C passes` / `-C llvm-args` options (inline 8-bit edge
//! counters, the PC table, and comparison tracing). `--target` is given explicitly so the
//! flags reach the target's code but not build scripts and proc-macros; the instrumented
//! artifacts live under `target/fuzz-build/<host triple>/release/`, apart from the normal builds
//! (which are built for the same triple, `.cargo/config.toml`, with other flags).
//!
//! Each target starts from its committed seeds (`fuzz/corpus/TARGET/`, read only) and the
//! corpus earlier runs grew (`target/fuzz/corpus/TARGET/`, where new inputs go), with its
//! dictionary (`fuzz/dict/TARGET.dict`) if it has one. Its log is `target/fuzz/logs/TARGET.log`
//! and a crashing, leaking or timing-out input is written to `target/fuzz/artifacts/TARGET/`.
//! An input that runs longer than [`TIMEOUT_S`] seconds counts as a failure (nothing may hang).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::{Failure, cargo, root, run, target_dir};

/// The SanitizerCoverage instrumentation cargo-fuzz passes, plus `--cfg fuzzing` and the
/// checks a fuzzing build keeps on.
const RUSTFLAGS: &[&str] = &[
    "--cfg",
    "fuzzing",
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "-Cdebug-assertions",
    "-Coverflow-checks",
];

/// Seconds one input may run before libFuzzer reports it as a hang.
const TIMEOUT_S: u32 = 10;

/// What one target's run showed.
struct Outcome {
    target: String,
    seconds: f64,
    executions: Option<u64>,
    coverage: Option<String>,
    ok: bool,
    artifacts: Vec<PathBuf>,
    log: PathBuf,
}

/// Run the task with its command-line arguments.
pub fn fuzz(args: &[String]) -> Result<(), Failure> {
    let usage = "usage: cargo xtask fuzz --time SECONDS [TARGET]";
    let mut time = None;
    let mut only = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--time" => {
                let v = it
                    .next()
                    .ok_or_else(|| Failure::Usage(format!("--time needs a value; {usage}")))?;
                time = Some(v.parse::<u32>().ok().filter(|&n| n > 0).ok_or_else(|| {
                    Failure::Usage(format!(
                        "--time {v}: the seconds per target must be a whole number >= 1"
                    ))
                })?);
            }
            t if !t.starts_with('-') && only.is_none() => only = Some(t.to_string()),
            other => return Err(Failure::Usage(format!("unexpected argument `{other}`; {usage}"))),
        }
    }
    let time = time.ok_or_else(|| Failure::Usage(format!("--time is required; {usage}")))?;
    let fuzz_dir = root().join("fuzz");
    let all = targets(&fuzz_dir)?;
    let chosen: Vec<String> = match only {
        Some(t) if all.contains(&t) => vec![t],
        Some(t) => {
            return Err(Failure::Usage(format!(
                "unknown fuzz target `{t}` (known: {})",
                all.join(", ")
            )));
        }
        None => all,
    };
    let triple = host_triple()?;
    let target_dir = target_dir();
    // A directory of its own: the instrumented build's flags differ from the normal build's,
    // and sharing one directory would rebuild each in turn.
    let build_dir = target_dir.join("fuzz-build");
    let mut build = cargo();
    let mut flags = std::env::var("RUSTFLAGS").unwrap_or_default();
    for f in RUSTFLAGS {
        flags.push(' ');
        flags.push_str(f);
    }
    build
        .env("RUSTFLAGS", flags.trim())
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "vmsa-fuzz",
            "--bins",
            "--target",
        ])
        .arg(&triple)
        .arg("--target-dir")
        .arg(&build_dir);
    run("build the fuzz targets (libFuzzer, SanitizerCoverage)", build)?;
    let bin_dir = build_dir.join(&triple).join("release");
    let work = target_dir.join("fuzz");
    let mut outcomes = Vec::new();
    for t in &chosen {
        outcomes.push(run_target(t, time, &fuzz_dir, &bin_dir, &work)?);
    }
    println!("==> fuzz summary ({time} s per target)");
    for o in &outcomes {
        println!(
            "{:<14} {:>12} executions in {:>6.0} s ({:>7} exec/s), {}, {}",
            o.target,
            o.executions.map_or_else(|| "?".into(), |n| n.to_string()),
            o.seconds,
            o.executions
                .map_or_else(|| "?".into(), |n| format!("{:.0}", n as f64 / o.seconds.max(1.0))),
            o.coverage.as_deref().unwrap_or("coverage unknown"),
            if o.ok {
                "no failure".to_string()
            } else {
                format!("FAILED, log {}", o.log.display())
            },
        );
    }
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.ok)
        .map(|o| {
            let files: Vec<String> = o.artifacts.iter().map(|p| p.display().to_string()).collect();
            format!(
                "{} ({}; replay: cargo run -p vmsa-fuzz --bin {} -- FILE)",
                o.target,
                if files.is_empty() {
                    "no artifact".into()
                } else {
                    files.join(", ")
                },
                o.target
            )
        })
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::Failed(format!(
            "fuzz targets failed: {}",
            failed.join("; ")
        )))
    }
}

/// The targets: the binaries in `fuzz/fuzz_targets/`.
fn targets(fuzz_dir: &Path) -> Result<Vec<String>, String> {
    let dir = fuzz_dir.join("fuzz_targets");
    let mut out: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| {
            let p = e.ok()?.path();
            (p.extension()? == "rs").then(|| p.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    out.sort();
    Ok(out)
}

fn host_triple() -> Result<String, String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .arg("-vV")
        .output()
        .map_err(|e| format!("cannot run {rustc} -vV: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .ok_or_else(|| format!("{rustc} -vV names no host triple"))
}

fn run_target(
    target: &str,
    time: u32,
    fuzz_dir: &Path,
    bin_dir: &Path,
    work: &Path,
) -> Result<Outcome, String> {
    let corpus = work.join("corpus").join(target);
    let artifacts = work.join("artifacts").join(target);
    let logs = work.join("logs");
    for d in [&corpus, &artifacts, &logs] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let log = logs.join(format!("{target}.log"));
    let log_file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let before = files(&artifacts);
    let mut cmd = Command::new(bin_dir.join(target));
    cmd.arg(format!("-max_total_time={time}"))
        .arg(format!("-timeout={TIMEOUT_S}"))
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()));
    let dict = fuzz_dir.join("dict").join(format!("{target}.dict"));
    if dict.exists() {
        cmd.arg(format!("-dict={}", dict.display()));
    }
    cmd.arg(&corpus)
        .arg(fuzz_dir.join("corpus").join(target))
        .stdout(Stdio::null())
        .stderr(log_file);
    println!("==> fuzz {target} for {time} s: {cmd:?}");
    let t = Instant::now();
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start the fuzz target {target}: {e}"))?;
    let seconds = t.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let executions = text
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|v| v.trim().parse().ok());
    // The last status line: `#N DONE cov: C ft: F corp: K/S ...`.
    let coverage = text.lines().rev().find(|l| l.contains(" cov: ")).map(|l| {
        let field = |key: &str| {
            l.split_whitespace()
                .skip_while(|w| *w != key)
                .nth(1)
                .unwrap_or("?")
                .to_string()
        };
        format!(
            "coverage {} edges, {} features, corpus {} inputs",
            field("cov:"),
            field("ft:"),
            field("corp:")
        )
    });
    let new: Vec<PathBuf> = files(&artifacts)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    let outcome = Outcome {
        target: target.to_string(),
        seconds,
        executions,
        coverage,
        ok: status.success() && new.is_empty(),
        artifacts: new,
        log,
    };
    println!(
        "<== {target}: {status}, {} executions, {}",
        outcome.executions.map_or_else(|| "?".into(), |n| n.to_string()),
        outcome.coverage.as_deref().unwrap_or("coverage unknown")
    );
    Ok(outcome)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default()
}
