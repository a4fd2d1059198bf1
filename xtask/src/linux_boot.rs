//! `cargo xtask bench linux-boot [--quick]`: the simulator carrying a Linux guest's boot at
//! scale. Each row runs the release `vmm` as a child process (`vmm run --guest
//! builtin:linux-boot[-4k] --json`) and records its wall time, its peak resident set (`wait4`'s
//! `ru_maxrss`), the simulator's bookkeeping per tracked frame (the run report's footprint) and
//! the simulated time; a baseline run (`builtin:boot`, 1 vCPU, 64 MiB: the process and the
//! machine's fixed costs) measured in the same run gives every wall time as a ratio. It prints
//! the table as Markdown, writes it and an SVG plot it draws itself: the full bench to
//! `docs/linux-boot-scaling.{md,svg}` (which BENCHMARKS.md shows), `--quick` (a small subset
//! for CI) to `target/bench/`.

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// One run of the table.
#[derive(Clone, Copy, Debug)]
struct Case {
    guest: &'static str,
    vcpus: u32,
    memory: u64,
}

/// What one case measured (medians of its repetitions for the wall time).
#[derive(Clone, Debug)]
struct Row {
    case: Case,
    wall: Duration,
    peak_rss_kib: u64,
    frames: u64,
    bookkeeping_per_frame: f64,
    rmp_per_frame: f64,
    rmp_entries: u64,
    simulated_s: f64,
    ok: bool,
}

/// The full grid: a memory sweep at 64 vCPUs, a vCPU sweep at 16 GiB, and the corners (1 vCPU /
/// 64 MiB, 256 vCPUs / 1 TiB). The 4 KiB boot stops at 256 GiB: at 1 TiB its 2^28 4 KiB RMP
/// entries alone would take 2 GiB.
fn full_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for guest in ["linux-boot", "linux-boot-4k"] {
        let top = if guest == "linux-boot" { 1024 } else { 256 };
        v.push(Case {
            guest,
            vcpus: 1,
            memory: 64 * MIB,
        });
        for gib in [1, 4, 16, 64, 256, 1024].into_iter().filter(|&g| g <= top) {
            v.push(Case {
                guest,
                vcpus: 64,
                memory: gib * GIB,
            });
        }
        for vcpus in [1, 4, 16, 256] {
            v.push(Case {
                guest,
                vcpus,
                memory: 16 * GIB,
            });
        }
    }
    v.push(Case {
        guest: "linux-boot",
        vcpus: 256,
        memory: 1024 * GIB,
    });
    v
}

/// `--quick`: small runs of both guests, for CI.
fn quick_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for guest in ["linux-boot", "linux-boot-4k"] {
        for (vcpus, memory) in [(1, 64 * MIB), (4, GIB), (64, 4 * GIB)] {
            v.push(Case { guest, vcpus, memory });
        }
    }
    v
}

/// Run the bench with the release binary `vmm`: the six small rows with `quick`.
pub fn run(root: &Path, target: &Path, vmm: &Path, quick: bool) -> Result<(), String> {
    let (cases, reps, out_dir) = if quick {
        (quick_cases(), 1, target.join("bench"))
    } else {
        (full_cases(), 5, root.join("docs"))
    };
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let baseline = measure(
        vmm,
        Case {
            guest: "boot",
            vcpus: 1,
            memory: 64 * MIB,
        },
        reps,
    )?;
    println!(
        "baseline: builtin:boot, 1 vCPU, 64 MiB: {:.1} ms, {} MiB peak RSS",
        baseline.wall.as_secs_f64() * 1e3,
        baseline.peak_rss_kib >> 10
    );
    let mut rows = Vec::new();
    for c in cases {
        let r = measure(vmm, c, reps)?;
        println!(
            "{} x{} {}: {:.3} s, {} MiB, {:.2} B/frame, ok {}",
            c.guest,
            c.vcpus,
            size(c.memory),
            r.wall.as_secs_f64(),
            r.peak_rss_kib >> 10,
            r.bookkeeping_per_frame,
            r.ok
        );
        rows.push(r);
    }
    let table = markdown(&baseline, &rows, reps);
    println!("\n{table}");
    let name = if quick {
        "linux-boot-quick"
    } else {
        "linux-boot-scaling"
    };
    let md = out_dir.join(format!("{name}.md"));
    let svg = out_dir.join(format!("{name}.svg"));
    std::fs::write(&md, &table).map_err(|e| format!("{}: {e}", md.display()))?;
    std::fs::write(&svg, plot(&rows)).map_err(|e| format!("{}: {e}", svg.display()))?;
    println!("wrote {} and {}", md.display(), svg.display());
    if let Some(bad) = rows.iter().find(|r| !r.ok) {
        return Err(format!(
            "builtin:{} x{} {} did not end ok",
            bad.case.guest,
            bad.case.vcpus,
            size(bad.case.memory)
        ));
    }
    Ok(())
}

fn size(bytes: u64) -> String {
    if bytes >= GIB {
        format!("{} GiB", bytes / GIB)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

/// Run `case` `reps` times: the median wall time, the largest peak RSS.
fn measure(vmm: &Path, case: Case, reps: usize) -> Result<Row, String> {
    let mut runs = Vec::new();
    for _ in 0..reps {
        runs.push(once(vmm, case)?);
    }
    runs.sort_by_key(|r| r.wall);
    let mut row = runs[runs.len() / 2].clone();
    row.peak_rss_kib = runs.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0);
    Ok(row)
}

/// One `vmm run` as a child process.
fn once(vmm: &Path, case: Case) -> Result<Row, String> {
    let memory = format!("{}M", case.memory / MIB);
    let mut cmd = Command::new(vmm);
    cmd.args([
        "run",
        "--json",
        "--vcpus",
        &case.vcpus.to_string(),
        "--memory",
        &memory,
    ])
    .args(["--guest", &format!("builtin:{}", case.guest)])
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| {
        format!(
            "cannot start {}: {e} (cargo build --release -p vmm first)",
            vmm.display()
        )
    })?;
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        stdout
            .read_to_string(&mut out)
            .map_err(|e| format!("{}: reading its output: {e}", vmm.display()))?;
    }
    let (status, peak_rss_kib) = wait4(child.id())?;
    let wall = start.elapsed();
    let what = format!(
        "vmm run --guest builtin:{} --vcpus {} --memory {memory}",
        case.guest, case.vcpus
    );
    let doc: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| format!("{what}: exit status {status}, no JSON report: {e}"))?;
    let num = |path: &[&str]| -> f64 {
        path.iter()
            .try_fold(&doc, |v, k| v.get(k))
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(f64::NAN)
    };
    let frames = num(&["footprint", "allocated_frames"]);
    let rmp_frames = num(&["footprint", "rmp_frames"]);
    Ok(Row {
        case,
        wall,
        peak_rss_kib,
        frames: frames as u64,
        bookkeeping_per_frame: num(&["footprint", "bookkeeping_bytes"]) / frames.max(1.0),
        rmp_per_frame: num(&["footprint", "rmp_bytes"]) / rmp_frames.max(1.0),
        rmp_entries: num(&["footprint", "rmp_entries"]) as u64,
        simulated_s: num(&["costs", "total_us"]) / 1e6,
        ok: status == 0 && doc.get("ok").and_then(serde_json::Value::as_bool) == Some(true),
    })
}

/// Reap child `pid`: its exit code (or 128 + the signal) and its peak resident set in KiB.
#[allow(unsafe_code)]
fn wait4(pid: u32) -> Result<(i32, u64), String> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| format!("pid {pid} out of range"))?;
    let mut status: libc::c_int = 0;
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `pid` is our own child, not yet reaped (std's `Child` is never waited on here);
    // `status` and `usage` point to writable memory of the types wait4(2) fills.
    let r = unsafe { libc::wait4(pid, &mut status, 0, usage.as_mut_ptr()) };
    if r != pid {
        return Err(format!("wait4({pid}): {}", std::io::Error::last_os_error()));
    }
    // SAFETY: wait4 returned the child, so it filled `usage` (and it started zeroed anyway).
    let usage = unsafe { usage.assume_init() };
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    // Linux reports ru_maxrss in KiB.
    Ok((code, u64::try_from(usage.ru_maxrss).unwrap_or(0)))
}

fn markdown(baseline: &Row, rows: &[Row], reps: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Wall time: median of {reps}; peak RSS: the largest `ru_maxrss` of them. Baseline (same run): \
         `vmm run --guest builtin:boot --vcpus 1 --memory 64M`, {:.1} ms, {} MiB.\n",
        baseline.wall.as_secs_f64() * 1e3,
        baseline.peak_rss_kib >> 10
    );
    let _ = writeln!(
        s,
        "| guest | vCPUs | memory | wall | × baseline | ns per guest page | peak RSS | frames tracked | bookkeeping B/frame | RMP B/frame | RMP entries | simulated s | ok |"
    );
    let _ = writeln!(
        s,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for r in rows {
        let pages = r.case.memory / 4096;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3} s | {:.1} | {:.1} | {} MiB | {} | {:.2} | {:.2} | {} | {:.2} | {} |",
            r.case.guest,
            r.case.vcpus,
            size(r.case.memory),
            r.wall.as_secs_f64(),
            r.wall.as_secs_f64() / baseline.wall.as_secs_f64(),
            r.wall.as_nanos() as f64 / pages as f64,
            r.peak_rss_kib >> 10,
            r.frames,
            r.bookkeeping_per_frame,
            r.rmp_per_frame,
            r.rmp_entries,
            r.simulated_s,
            if r.ok { "yes" } else { "NO" }
        );
    }
    s
}

/// One line of a panel: a name, a colour and its points.
struct Series {
    name: String,
    color: &'static str,
    points: Vec<(f64, f64)>,
}

const COLORS: [&str; 2] = ["#1f77b4", "#d62728"];

/// The plot: wall time and peak RSS against guest memory (64 vCPUs), and wall time against
/// vCPUs (16 GiB), both guests, log-log.
fn plot(rows: &[Row]) -> String {
    let sweep = |guest: &str, f: &dyn Fn(&Row) -> Option<(f64, f64)>| -> Vec<(f64, f64)> {
        let mut p: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.case.guest == guest)
            .filter_map(f)
            .collect();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        p
    };
    let guests = ["linux-boot", "linux-boot-4k"];
    let by_memory = |y: fn(&Row) -> f64| -> Vec<Series> {
        guests
            .iter()
            .zip(COLORS)
            .map(|(g, color)| Series {
                name: format!("{g}, 64 vCPUs"),
                color,
                points: sweep(g, &|r| {
                    (r.case.vcpus == 64).then(|| ((r.case.memory / GIB) as f64, y(r)))
                }),
            })
            .collect()
    };
    let by_vcpus: Vec<Series> = guests
        .iter()
        .zip(COLORS)
        .map(|(g, color)| Series {
            name: format!("{g}, 16 GiB"),
            color,
            points: sweep(g, &|r| {
                (r.case.memory == 16 * GIB).then(|| (f64::from(r.case.vcpus), r.wall.as_secs_f64()))
            }),
        })
        .collect();
    let (w, h) = (1260.0, 470.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">vmm run --guest builtin:linux-boot[-4k] on the simulator (release build, child process per point)</text>\n",
        w / 2.0
    );
    panel(
        &mut s,
        (20.0, 40.0),
        "wall time vs guest memory",
        "guest memory (GiB)",
        "wall (s)",
        &by_memory(|r| r.wall.as_secs_f64()),
        true,
    );
    panel(
        &mut s,
        (440.0, 40.0),
        "peak RSS vs guest memory",
        "guest memory (GiB)",
        "peak RSS (MiB)",
        &by_memory(|r| (r.peak_rss_kib as f64) / 1024.0),
        true,
    );
    panel(
        &mut s,
        (860.0, 40.0),
        "wall time vs vCPUs",
        "vCPUs",
        "wall (s)",
        &by_vcpus,
        true,
    );
    s.push_str("</svg>\n");
    s
}

/// The ticks of a log axis over `[lo, hi]`: powers of 10, with 2 and 5 between them when the
/// axis spans less than two decades.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let steps: &[f64] = if (hi / lo).log10() < 2.0 {
        &[1.0, 2.0, 5.0]
    } else {
        &[1.0]
    };
    let mut out = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for &m in steps {
            let t = decade * m;
            if (lo..=hi).contains(&t) {
                out.push(t);
            }
        }
        decade *= 10.0;
    }
    out
}

fn label(v: f64) -> String {
    if v >= 1.0 {
        format!("{v}")
    } else {
        format!("{v:.3}").trim_end_matches('0').to_string()
    }
}

/// One log-log panel at `origin` (400 × 370 px): axes, grid, a line and dots per series, and a
/// legend.
fn panel(
    s: &mut String,
    origin: (f64, f64),
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[Series],
    linear_guide: bool,
) {
    let (ox, oy) = origin;
    let (left, top, width, height) = (ox + 60.0, oy + 30.0, 320.0, 270.0);
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.0 > 0.0 && p.1 > 0.0 && p.1.is_finite())
        .collect();
    if all.is_empty() {
        return;
    }
    let bounds = |f: fn(&(f64, f64)) -> f64| {
        let lo = all.iter().map(f).fold(f64::INFINITY, f64::min);
        let hi = all.iter().map(f).fold(0.0, f64::max);
        // A margin of a third of a doubling (and a factor 4 in all, at least) around the data.
        let pad = 1.3f64.max((4.0 / (hi / lo)).sqrt());
        (lo / pad, hi * pad)
    };
    let ((x0, x1), (y0, y1)) = (bounds(|p| p.0), bounds(|p| p.1));
    let px = |x: f64| left + (x.log10() - x0.log10()) / (x1.log10() - x0.log10()) * width;
    let py = |y: f64| top + height - (y.log10() - y0.log10()) / (y1.log10() - y0.log10()) * height;
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"13\">{title}</text>",
        left + width / 2.0,
        oy + 18.0
    );
    let _ = writeln!(
        s,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{width}\" height=\"{height}\" fill=\"none\" stroke=\"#444\"/>"
    );
    for t in ticks(x0, x1) {
        let x = px(t);
        let _ = writeln!(
            s,
            "<line x1=\"{x:.1}\" y1=\"{top}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            top + height,
            top + height + 16.0,
            label(t)
        );
    }
    for t in ticks(y0, y1) {
        let y = py(t);
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left + width,
            left - 6.0,
            y + 4.0,
            label(t)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{xlabel}</text>",
        left + width / 2.0,
        top + height + 34.0
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 {} {})\">{ylabel}</text>",
        ox + 14.0,
        top + height / 2.0,
        ox + 14.0,
        top + height / 2.0
    );
    for (i, ser) in series.iter().enumerate() {
        let pts: Vec<String> = ser
            .points
            .iter()
            .filter(|p| p.0 > 0.0 && p.1 > 0.0 && p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"/>",
            pts.join(" "),
            ser.color
        );
        for p in &pts {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(
                s,
                "<circle cx=\"{x}\" cy=\"{y}\" r=\"3.5\" fill=\"{}\"/>",
                ser.color
            );
        }
        // Linear growth (slope 1) through the series' last point, to read its slope against.
        if let Some(&(gx, gy)) = ser.points.last().filter(|_| linear_guide) {
            let at = |x: f64| (px(x), py(gy * x / gx));
            let ((ax, ay), (bx, by)) = (at(x0.max(gx * y0 / gy)), at(gx));
            let _ = writeln!(
                s,
                "<line x1=\"{ax:.1}\" y1=\"{ay:.1}\" x2=\"{bx:.1}\" y2=\"{by:.1}\" stroke=\"{}\" stroke-opacity=\"0.5\" stroke-dasharray=\"5,4\"/>",
                ser.color
            );
        }
        // The legend, under the panel.
        let ly = top + height + 52.0 + i as f64 * 16.0;
        let _ = writeln!(
            s,
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{}</text>",
            left,
            left + 20.0,
            ser.color,
            left + 24.0,
            ly + 4.0,
            ser.name
        );
    }
    if linear_guide {
        let ly = top + height + 52.0 + series.len() as f64 * 16.0;
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"#888\" stroke-dasharray=\"5,4\"/><text x=\"{}\" y=\"{}\">linear growth through the last point</text>",
            left + 20.0,
            left + 24.0,
            ly + 4.0
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ticks_are_decades_or_1_2_5_steps() {
        assert_eq!(ticks(0.7, 1400.0), vec![1.0, 10.0, 100.0, 1000.0]);
        assert_eq!(ticks(3.0, 40.0), vec![5.0, 10.0, 20.0]);
        assert_eq!(ticks(0.01, 100_000.0).len(), 8);
    }

    #[test]
    fn the_grid_runs_from_the_smallest_to_the_largest_guest() {
        let c = full_cases();
        assert!(c.iter().any(|c| c.vcpus == 1 && c.memory == 64 * MIB));
        assert!(
            c.iter()
                .any(|c| c.vcpus == 256 && c.memory == 1024 * GIB && c.guest == "linux-boot")
        );
        assert!(
            !c.iter()
                .any(|c| c.guest == "linux-boot-4k" && c.memory > 256 * GIB),
            "the 4 KiB boot only where its RMP fits"
        );
        let q = quick_cases();
        assert!(q.len() < c.len() && q.iter().all(|c| c.memory <= 4 * GIB));
    }
}
