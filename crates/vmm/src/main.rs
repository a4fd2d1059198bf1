//! `vmm`: parse the command line, run the subcommand, print, exit.
//!
//! Exit codes: 0 success; 1 a run that failed (its summary says why); 2 a bad argument or input
//! file, reported as one line on stderr.

#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A thin VMM and CLI for AMD SEV-ES / SEV-SNP guests.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a confidential guest (simulator by default, or /dev/kvm) and report every vCPU's
    /// VMSA ownership history, leaks, RMP faults, costs and the launch digest.
    Run(vmm::run::RunArgs),
    /// Compute the launch digest of an OVMF guest without running it (as sev-snp-measure), or
    /// of an IGVM file (--igvm, as igvmmeasure).
    Measure(vmm::measure::igvm::MeasureCommand),
    /// Write the IGVM file that launches an OVMF image (SEV-SNP), as `vmm measure` plans it.
    Igvm(vmm::wrap::IgvmArgs),
    /// Show what this host supports (KVM, VM types, SEV-SNP) and why.
    Probe(vmm::probe::ProbeArgs),
}

/// Exit code for a bad argument or input file.
const EXIT_USAGE: u8 = 2;

/// One line from a clap error: its message lines before the usage block, without tips.
fn one_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let msg: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.starts_with("Usage:"))
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("tip:") && !l.starts_with("For more information"))
        .collect();
    msg.join(" ").trim_start_matches("error: ").to_owned()
}

/// The line for clap's `InvalidUtf8` error, which names no argument: the first argument that
/// is not UTF-8, as the value of the option before it (`--append VALUE`) or in it
/// (`--append=VALUE`). clap raises that error only for an option whose value must be text (paths
/// may be any bytes).
fn not_utf8(args: impl Iterator<Item = std::ffi::OsString>) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let mut previous: Option<String> = None;
    for arg in args {
        let Some(text) = arg.to_str() else {
            let bytes = arg.as_bytes();
            let (option, value) = match bytes.iter().position(|&b| b == b'=') {
                Some(eq) if bytes.starts_with(b"--") => (
                    Some(String::from_utf8_lossy(&bytes[..eq]).into_owned()),
                    std::ffi::OsStr::from_bytes(&bytes[eq + 1..]),
                ),
                _ => (
                    previous.filter(|p| p.starts_with('-') && p != "--"),
                    arg.as_os_str(),
                ),
            };
            let option = option.unwrap_or_else(|| "an argument".to_owned());
            return Some(format!(
                "{option} {value:?}: is not UTF-8: this option takes text"
            ));
        };
        previous = Some(text.to_owned());
    }
    None
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprintln!("vmm: a subcommand is required (run, measure, igvm or probe); see 'vmm --help'");
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) if e.kind() == clap::error::ErrorKind::InvalidUtf8 => {
            // clap's message names no argument; find the one that is not text.
            let line = not_utf8(std::env::args_os().skip(1)).unwrap_or_else(|| one_line(&e));
            eprintln!("vmm: {line}");
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            eprintln!("vmm: {}", one_line(&e));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match cli.command {
        Command::Run(args) => run(&args),
        Command::Measure(vmm::measure::igvm::MeasureCommand::Igvm(args)) => {
            match vmm::measure::igvm::measure(&args) {
                Ok(out) => {
                    let code = print("measure", &out.stdout);
                    match out.failure {
                        Some(f) => {
                            eprintln!("vmm measure: {f}");
                            ExitCode::FAILURE
                        }
                        None => code,
                    }
                }
                Err(e) => {
                    eprintln!("vmm measure: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Measure(vmm::measure::igvm::MeasureCommand::Ovmf(args)) => {
            match vmm::measure::measure(&args) {
                Ok(out) => {
                    for w in &out.warnings {
                        eprintln!("vmm measure: warning: {w}");
                    }
                    print("measure", &out.stdout)
                }
                Err(e) => {
                    eprintln!("vmm measure: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Probe(args) => print("probe", &vmm::probe::probe(&args)),
        Command::Igvm(args) => match vmm::wrap::write_igvm(&args) {
            Ok(line) => print("igvm", &line),
            Err(e) => {
                eprintln!("vmm igvm: {}", vmm::run::error_chain(&e));
                ExitCode::from(e.exit_code())
            }
        },
    }
}

/// Write `vmm COMMAND`'s output to stdout. A failed write is a failure, not a panic, and is
/// said on stderr (a full disk must not pass for a short report), except for a reader that
/// went away (a closed pipe), which has nothing left to tell.
fn print(command: &str, text: &str) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vmm {command}: cannot write the output to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &vmm::run::RunArgs) -> ExitCode {
    match vmm::run::run(args) {
        Ok(summary) => {
            let text = if args.json {
                match serde_json::to_string(&summary) {
                    Ok(mut j) => {
                        j.push('\n');
                        j
                    }
                    Err(e) => {
                        eprintln!("vmm run: cannot render the summary as JSON: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                summary.render_text()
            };
            let printed = print("run", &text);
            if !summary.ok {
                return ExitCode::FAILURE;
            }
            printed
        }
        Err(e) => {
            eprintln!("vmm run: {}", vmm::run::error_chain(&e));
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    use super::not_utf8;

    fn args(list: &[&[u8]]) -> impl Iterator<Item = OsString> {
        list.iter()
            .map(|a| OsString::from_vec(a.to_vec()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn the_option_whose_value_is_not_text_is_named() {
        assert_eq!(
            not_utf8(args(&[b"measure", b"--append", b"bad\xff"])).unwrap(),
            r#"--append "bad\xFF": is not UTF-8: this option takes text"#
        );
        assert_eq!(
            not_utf8(args(&[b"run", b"--fault=x\xfe"])).unwrap(),
            r#"--fault "x\xFE": is not UTF-8: this option takes text"#
        );
        assert!(not_utf8(args(&[b"run", b"--vcpus", b"4"])).is_none());
    }
}
