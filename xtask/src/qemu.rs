//! `cargo xtask bench qemu [--runs N] [--accel tcg|kvm|tcg,kvm]`: our VMM against QEMU on real
//! KVM, whole processes, back to back.
//!
//! Both sides are timed the same way: from spawning the process to reaping it (start, VM and
//! vCPU creation, the guest's run, teardown, exit), with stdout and stderr going to files.
//!
//! - **vmm**: the release `vmm run --backend kvm --vcpus N` (its built-in `boot` guest: the BSP
//!   creates every AP through the GHCB doorbell from a VMSA it writes; every AP reports; the
//!   BSP writes the done port). Must exit 0.
//! - **QEMU**: Debian's `qemu-system-x86_64` (`apt-get install -y qemu-system-x86`) with `-smp N`,
//!   SeaBIOS booting a 512-byte boot sector that writes 0 to an `isa-debug-exit` device at port
//!   0xf4, under `-accel tcg` and `-accel kvm`. QEMU then exits with status `(0 << 1) | 1 = 1`
//!   (hw/misc/debugexit.c: `exit((val << 1) | 1)`); any other status, or no exit within the
//!   per-run timeout, is reported as what happened instead of a time.
//!
//! The runs are interleaved (vmm, tcg, kvm, vmm, tcg, kvm, ...) so a change in the machine's
//! load during the bench reaches every column alike; each cell is the median of N runs with the
//! fastest and slowest beside it, and the ratios are of medians measured in this one run. After
//! the timed runs, `vmm run --json` is run N more times (untimed by the table) to show how the
//! VMM's own phases split its time.
//!
//! `--accel tcg` leaves out the QEMU KVM runs (seconds of CPU each on a host whose KVM emulates
//! the guest's instructions), for a run under `chrt -f` that keeps a shared machine's other
//! work from skewing the milliseconds of the other columns.
//!
//! Skips, saying why, where `/dev/kvm` cannot be opened or `qemu-system-x86_64` is not on PATH.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{Failure, release_vmm, root, target_dir};

/// The vCPU counts compared.
const VCPUS: [u32; 2] = [4, 64];
/// Runs per cell unless `--runs` says otherwise.
const DEFAULT_RUNS: usize = 7;
/// How long one QEMU run may take before it is killed and reported as a timeout.
const TIMEOUT: Duration = Duration::from_secs(120);
/// QEMU's guest memory: SeaBIOS needs a few MiB; the boot sector none.
const QEMU_MEMORY: &str = "16M";
/// The isa-debug-exit port the boot sector writes.
const DEBUG_EXIT_PORT: u8 = 0xf4;

/// The boot sector: real-mode code SeaBIOS loads at 0x7c00 and jumps to.
///
/// `B0 00` = `mov al, 0`; `E6 F4` = `out 0xf4, al` (Intel SDM vol. 2: MOV r8, imm8 is `B0+rb
/// ib`; OUT imm8, AL is `E6 ib`), which makes QEMU exit; `F4` `EB FD` = `hlt; jmp $-1` should
/// the write not end it. Bytes 510-511 are the boot signature `55 AA` that the BIOS checks.
fn boot_sector() -> [u8; 512] {
    let code = [0xb0, 0x00, 0xe6, DEBUG_EXIT_PORT, 0xf4, 0xeb, 0xfd];
    let mut s = [0u8; 512];
    s[..code.len()].copy_from_slice(&code);
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

/// One column of the table: a command and the exit status that means it worked.
struct Contender {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    expect: i32,
}

impl Contender {
    fn vmm(binary: &Path, vcpus: u32) -> Self {
        Self {
            name: "vmm run --backend kvm",
            program: binary.to_path_buf(),
            args: ["run", "--backend", "kvm", "--vcpus", &vcpus.to_string()]
                .map(String::from)
                .to_vec(),
            expect: 0,
        }
    }

    fn qemu(qemu: &Path, accel: &'static str, vcpus: u32, boot: &Path) -> Self {
        let mut args: Vec<String> = [
            "-accel",
            accel,
            "-smp",
            &vcpus.to_string(),
            "-m",
            QEMU_MEMORY,
            "-nographic",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "none",
            "-monitor",
            "none",
            "-device",
        ]
        .map(String::from)
        .to_vec();
        args.push(format!("isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=0x04"));
        args.push("-drive".into());
        args.push(format!("if=ide,format=raw,file={}", boot.display()));
        Self {
            name: if accel == "kvm" {
                "QEMU -accel kvm"
            } else {
                "QEMU -accel tcg"
            },
            program: qemu.to_path_buf(),
            args,
            expect: 1,
        }
    }

    /// One timed run: spawn to reap, killed after `timeout`. `Err` says what happened instead.
    fn time(&self, out: &Path, timeout: Duration) -> Result<Duration, String> {
        let log = |suffix: &str| {
            File::create(out.with_extension(suffix)).map_err(|e| format!("{}: {e}", out.display()))
        };
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(log("out")?)
            .stderr(log("err")?);
        // A watchdog thread, started before the clock, kills the child (by its pid) if it
        // outlives the timeout; this thread blocks in wait() so the time is not rounded to a
        // polling interval.
        let (tell, told) = mpsc::channel::<u32>();
        let dog = std::thread::spawn(move || {
            let Ok(pid) = told.recv() else { return false };
            if told.recv_timeout(timeout) == Err(mpsc::RecvTimeoutError::Timeout) {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
                return true;
            }
            false
        });
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.program.display()))?;
        let _ = tell.send(child.id());
        let status = child.wait().map_err(|e| format!("wait: {e}"));
        let elapsed = start.elapsed();
        // Anything ends the watchdog's wait: the child is gone.
        let _ = tell.send(0);
        let killed = dog.join().unwrap_or(false);
        let status = status?;
        if killed {
            return Err(format!("no exit within {} s (killed)", timeout.as_secs()));
        }
        if status.code() == Some(self.expect) {
            return Ok(elapsed);
        }
        let err = std::fs::read_to_string(out.with_extension("err")).unwrap_or_default();
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        Err(format!("exited with {status} (expected {}): {last}", self.expect))
    }
}

/// Median, fastest and slowest of the successful runs; or why none succeeded.
#[derive(Clone, Debug)]
struct Cell {
    times: Vec<Duration>,
    failures: Vec<String>,
}

impl Cell {
    fn median(&self) -> Option<Duration> {
        let mut t = self.times.clone();
        t.sort();
        t.get(t.len() / 2).copied()
    }

    fn render(&self) -> String {
        let Some(m) = self.median() else {
            return format!(
                "failed: {}",
                self.failures.first().map_or("no runs", String::as_str)
            );
        };
        let min = self.times.iter().min().copied().unwrap_or(m);
        let max = self.times.iter().max().copied().unwrap_or(m);
        let mut s = format!("{} [{} {}]", human(m), human(min), human(max));
        if !self.failures.is_empty() {
            s.push_str(&format!(
                " ({} of {} runs failed: {})",
                self.failures.len(),
                self.failures.len() + self.times.len(),
                self.failures[0]
            ));
        }
        s
    }
}

fn human(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1e3)
    } else if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

fn ratio(num: &Cell, den: &Cell) -> String {
    match (num.median(), den.median()) {
        (Some(n), Some(d)) if !d.is_zero() => format!("{:.1}x", n.as_secs_f64() / d.as_secs_f64()),
        _ => "-".into(),
    }
}

/// Where QEMU is, if it is on PATH.
fn find_qemu() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
}

fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// The machine, for the record: CPU model, cores, kernel, load.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split(':').nth(1)))
        .map_or("?", str::trim)
        .to_owned();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{model}, {cpus} CPUs, Linux {}, load {}", kernel.trim(), load())
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// The wall time of each phase a `vmm run --json` report carries (`"name":"create","wall_us":N`).
fn phases(json: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut rest = json;
    while let Some(i) = rest.find("{\"name\":\"") {
        rest = &rest[i + 9..];
        let Some(end) = rest.find('"') else { break };
        let name = rest[..end].to_owned();
        let Some(w) = rest.find("\"wall_us\":") else { break };
        let digits: String = rest[w + 10..].chars().take_while(char::is_ascii_digit).collect();
        if let Ok(us) = digits.parse() {
            out.push((name, us));
        }
    }
    out
}

/// What to run: runs per cell, and the QEMU accelerators.
#[derive(Debug, PartialEq, Eq)]
struct Options {
    runs: usize,
    accels: Vec<&'static str>,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        runs: DEFAULT_RUNS,
        accels: vec!["tcg", "kvm"],
    };
    let mut rest = args;
    while let [flag, value, tail @ ..] = rest {
        match flag.as_str() {
            "--runs" => {
                o.runs = match value.parse::<usize>() {
                    Ok(n) if n >= 1 => n,
                    _ => {
                        return Err(format!(
                            "--runs {value}: expected a whole number of runs, at least 1"
                        ));
                    }
                }
            }
            "--accel" => {
                o.accels = value
                    .split(',')
                    .map(|a| match a {
                        "tcg" => Ok("tcg"),
                        "kvm" => Ok("kvm"),
                        _ => Err(format!("--accel {value}: expected tcg, kvm or tcg,kvm")),
                    })
                    .collect::<Result<_, _>>()?;
            }
            _ => break,
        }
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(format!(
            "bench qemu {}: expected --runs N and --accel tcg|kvm|tcg,kvm",
            args.join(" ")
        ));
    }
    Ok(o)
}

/// `cargo xtask bench qemu [--runs N]`.
pub fn bench(args: &[String]) -> Result<(), Failure> {
    let Options { runs, accels } = parse(args).map_err(Failure::Usage)?;
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        println!("bench qemu: skipped: /dev/kvm is not usable here ({e}); the comparison needs real KVM");
        return Ok(());
    }
    let Some(qemu) = find_qemu() else {
        println!(
            "bench qemu: skipped: qemu-system-x86_64 is not on PATH; install Debian's with \
             `apt-get install -y qemu-system-x86` and run again"
        );
        return Ok(());
    };
    let vmm = release_vmm()?;
    let dir = target_dir().join("qemu-bench");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let boot = dir.join("boot.bin");
    std::fs::write(&boot, boot_sector()).map_err(|e| format!("{}: {e}", boot.display()))?;

    let commit = first_line(
        Command::new("git")
            .current_dir(root())
            .args(["describe", "--always", "--dirty"]),
    );
    let version = first_line(Command::new(&qemu).arg("--version"));
    println!("machine: {}", machine());
    println!("commit: {commit}; {version}; medians of {runs} interleaved runs [fastest slowest]");
    println!("vmm: {} run --backend kvm --vcpus N", vmm.display());
    println!(
        "QEMU: {} -accel tcg|kvm -smp N -m {QEMU_MEMORY} -nographic -nodefaults -no-user-config \
         -display none -serial none -monitor none -device isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=0x04 \
         -drive if=ide,format=raw,file={}",
        qemu.display(),
        boot.display()
    );
    println!();
    let head: String = accels.iter().map(|a| format!(" QEMU -accel {a} |")).collect();
    let ratios: String = accels.iter().map(|a| format!(" {a} / vmm |")).collect();
    println!("| vCPUs | vmm run --backend kvm |{head}{ratios}");
    println!("|---|---|{}", "---|---|".repeat(accels.len()));
    let mut vmm_failed = Vec::new();
    for vcpus in VCPUS {
        let mut contenders = vec![Contender::vmm(&vmm, vcpus)];
        contenders.extend(accels.iter().map(|&a| Contender::qemu(&qemu, a, vcpus, &boot)));
        let mut cells = vec![
            Cell {
                times: Vec::new(),
                failures: Vec::new(),
            };
            contenders.len()
        ];
        for i in 0..runs {
            for (c, cell) in contenders.iter().zip(&mut cells) {
                let out = dir.join(format!("{}-{vcpus}-{i}", c.name.replace([' ', '-'], "_")));
                match c.time(&out, TIMEOUT) {
                    Ok(t) => cell.times.push(t),
                    Err(e) => {
                        eprintln!("bench qemu: {} --vcpus/-smp {vcpus}, run {i}: {e}", c.name);
                        cell.failures.push(e);
                    }
                }
            }
        }
        // QEMU's failures are the table's to show; vmm must run (its exit status 0 is part of
        // what is timed).
        if cells[0].median().is_none() {
            vmm_failed.push(format!("{vcpus} vCPUs: {}", cells[0].render()));
        }
        let times: String = cells.iter().map(|c| format!(" {} |", c.render())).collect();
        let ratios: String = cells[1..]
            .iter()
            .map(|c| format!(" {} |", ratio(c, &cells[0])))
            .collect();
        println!("| {vcpus} |{times}{ratios}");
    }
    println!();
    if !vmm_failed.is_empty() {
        return Err(format!("bench qemu: vmm failed every run at {}", vmm_failed.join("; ")).into());
    }
    println!("vmm's phases (`vmm run --backend kvm --json`, {runs} more runs, medians):");
    for vcpus in VCPUS {
        let mut all: Vec<Vec<(String, u64)>> = Vec::new();
        let mut rest = Vec::new();
        for _ in 0..runs {
            let start = Instant::now();
            let o = Command::new(&vmm)
                .args(["run", "--backend", "kvm", "--vcpus", &vcpus.to_string(), "--json"])
                .output()
                .map_err(|e| format!("{}: {e}", vmm.display()))?;
            let wall = start.elapsed().as_micros() as u64;
            if !o.status.success() {
                return Err(format!(
                    "bench qemu: vmm run --backend kvm --vcpus {vcpus} --json: {}: {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).lines().next().unwrap_or("")
                )
                .into());
            }
            let p = phases(&String::from_utf8_lossy(&o.stdout));
            if p.is_empty() {
                return Err(format!(
                    "bench qemu: vmm run --backend kvm --vcpus {vcpus} --json printed no phases"
                )
                .into());
            }
            rest.push(wall.saturating_sub(p.iter().map(|x| x.1).sum()));
            all.push(p);
        }
        let median = |mut v: Vec<u64>| {
            v.sort_unstable();
            v[v.len() / 2]
        };
        let mut line = format!("  {vcpus} vCPUs:");
        for (k, (name, _)) in all[0].iter().enumerate() {
            let us = median(all.iter().filter_map(|p| p.get(k).map(|x| x.1)).collect());
            line.push_str(&format!(" {name} {:.2} ms,", us as f64 / 1e3));
        }
        println!(
            "{line} the rest of the process (start, probe, guest image, report, exit) {:.2} ms",
            median(rest) as f64 / 1e3
        );
    }
    println!("load at the end: {}", load());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_sector_writes_zero_to_the_exit_port_and_is_bootable() {
        let s = boot_sector();
        assert_eq!(&s[..4], &[0xb0, 0x00, 0xe6, 0xf4]);
        assert_eq!(&s[510..], &[0x55, 0xaa]);
    }

    #[test]
    fn phases_are_read_from_the_run_report() {
        let json = r#"{"phases":[{"name":"create","wall_us":1476,"cycles":null},{"name":"run","wall_us":20,"us":null}]}"#;
        assert_eq!(phases(json), vec![("create".into(), 1476), ("run".into(), 20)]);
        assert!(phases("{}").is_empty());
    }

    #[test]
    fn options_default_and_are_checked() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = parse(&[]).unwrap();
        assert_eq!((o.runs, o.accels), (DEFAULT_RUNS, vec!["tcg", "kvm"]));
        let o = parse(&args(&["--accel", "tcg", "--runs", "3"])).unwrap();
        assert_eq!((o.runs, o.accels), (3, vec!["tcg"]));
        assert!(parse(&args(&["--runs", "0"])).is_err());
        assert!(parse(&args(&["--accel", "hvf"])).is_err());
        assert!(parse(&args(&["--fast"])).is_err());
        assert!(parse(&args(&["--runs"])).is_err());
    }
}
