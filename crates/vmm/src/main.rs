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
    Measure(vmm::measure::MeasureCommand),
    /// Write the IGVM file that launches an OVMF image (SEV-SNP), as `vmm measure` plans it.
    Igvm(vmm::wrap::IgvmArgs),
    /// Show what this host supports (KVM, VM types, SEV-SNP) and why.
    Probe(vmm::probe::ProbeArgs),
}

/// A line on stderr, in one write (`eprintln!` writes each piece of its format on its own, so
/// lines of processes sharing a stderr could interleave). Not `eprintln!` either because it
/// panics when stderr cannot be written (a full disk), which turned every exit code into 101:
/// a failed write is dropped and the code still says what happened.
macro_rules! say {
    ($($arg:tt)*) => {{
        // Control characters (a newline in a path, say) are shown escaped: one message, one line.
        let mut line = vmsa_host::input::one_line(&format!($($arg)*)).into_owned();
        line.push('\n');
        let _ = std::io::stderr().write_all(line.as_bytes());
    }};
}

/// Exit code for a bad argument or input file.
const EXIT_USAGE: u8 = 2;

/// One line from a clap error: its message lines before the usage block, without tips.
fn clap_message(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let msg: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.starts_with("Usage:"))
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("tip:") && !l.starts_with("For more information"))
        .collect();
    msg.join(" ").trim_start_matches("error: ").to_owned()
}

/// The line for clap's `InvalidUtf8` error, which names no argument: the first option value
/// that is not UTF-8 and whose option does not take bytes (a path or an `OsString` does),
/// given after the option (`--append VALUE`) or in it (`--append=VALUE`). `args` are the
/// arguments after the program's name.
fn not_utf8(cmd: &clap::Command, args: &[std::ffi::OsString]) -> Option<String> {
    use std::any::TypeId;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let sub = cmd.find_subcommand(args.first()?.to_str()?)?;
    let mut previous: Option<&str> = None;
    for arg in &args[1..] {
        if let Some(text) = arg.to_str() {
            previous = Some(text);
            continue;
        }
        let bytes = arg.as_bytes();
        let (option, value) = match bytes.iter().position(|&b| b == b'=') {
            Some(eq) if bytes.starts_with(b"--") => (
                String::from_utf8_lossy(&bytes[..eq]).into_owned(),
                OsStr::from_bytes(&bytes[eq + 1..]),
            ),
            _ => (previous.take()?.to_owned(), arg.as_os_str()),
        };
        let takes_bytes = sub
            .get_arguments()
            .find(|a| match option.strip_prefix("--") {
                Some(long) => a.get_long() == Some(long),
                None => option.strip_prefix('-').and_then(|s| s.chars().next()) == a.get_short(),
            })
            .is_some_and(|a| {
                let parsed = a.get_value_parser().type_id();
                parsed == TypeId::of::<std::path::PathBuf>() || parsed == TypeId::of::<std::ffi::OsString>()
            });
        if !takes_bytes {
            return Some(format!(
                "{option} {value:?}: is not UTF-8: this option takes text"
            ));
        }
    }
    None
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version, whose failed write (a full disk) is said as any output's.
            return written("", e.print().and_then(|()| std::io::stdout().flush()));
        }
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            say!("vmm: a subcommand is required (run, measure, igvm or probe); see 'vmm --help'");
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) if e.kind() == clap::error::ErrorKind::InvalidUtf8 => {
            // clap's message names no argument; find the one that is not text.
            let args: Vec<_> = std::env::args_os().skip(1).collect();
            let line = not_utf8(&<Cli as clap::CommandFactory>::command(), &args)
                .unwrap_or_else(|| clap_message(&e));
            say!("vmm: {line}");
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            say!("vmm: {}", clap_message(&e));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match cli.command {
        Command::Run(args) => run(&args),
        Command::Measure(vmm::measure::MeasureCommand::Igvm(args)) => {
            match vmm::measure::igvm::measure(&args) {
                Ok(out) => {
                    let code = print("measure", &out.stdout);
                    match out.failure {
                        Some(f) => {
                            say!("vmm measure: {f}");
                            ExitCode::FAILURE
                        }
                        None => code,
                    }
                }
                Err(e) => {
                    say!("vmm measure: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Measure(vmm::measure::MeasureCommand::OvmfHash(args)) => {
            match vmm::measure::measure_ovmf_hash(&args) {
                Ok(out) => print("measure", &out),
                Err(e) => {
                    say!("vmm measure: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Measure(vmm::measure::MeasureCommand::Ovmf(args)) => match vmm::measure::measure(&args) {
            Ok(out) => {
                for w in &out.warnings {
                    say!("vmm measure: warning: {w}");
                }
                print("measure", &out.stdout)
            }
            Err(e) => {
                say!("vmm measure: {e}");
                ExitCode::from(e.exit_code())
            }
        },
        Command::Probe(args) => print("probe", &vmm::probe::probe(&args)),
        Command::Igvm(args) => match vmm::wrap::write_igvm(&args) {
            Ok(written) => print("igvm", &written.render(args.json)),
            Err(e) => {
                say!("vmm igvm: {}", vmm::run::error_chain(&e));
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
    written(
        &format!(" {command}"),
        stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()),
    )
}

/// The exit code of a write to stdout by `vmm{command}`, its failure said on stderr.
fn written(command: &str, result: std::io::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::FAILURE,
        Err(e) => {
            say!("vmm{command}: cannot write the output to stdout: {e}");
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
                        say!("vmm run: cannot render the summary as JSON: {e}");
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
            say!("vmm run: {}", vmm::run::error_chain(&e));
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    use clap::CommandFactory;

    use super::{Cli, not_utf8};

    fn line(list: &[&[u8]]) -> Option<String> {
        let args: Vec<_> = list.iter().map(|a| OsString::from_vec(a.to_vec())).collect();
        not_utf8(&Cli::command(), &args)
    }

    #[test]
    fn the_option_whose_value_is_not_text_is_named() {
        assert_eq!(
            line(&[b"measure", b"--append", b"bad\xff"]).unwrap(),
            r#"--append "bad\xFF": is not UTF-8: this option takes text"#
        );
        assert_eq!(
            line(&[b"run", b"--fault=x\xfe"]).unwrap(),
            r#"--fault "x\xFE": is not UTF-8: this option takes text"#
        );
        // A path before it may be any bytes: the text option is the one named.
        assert_eq!(
            line(&[
                b"measure",
                b"--firmware",
                b"f\xff",
                b"--kernel=k\xff",
                b"--append",
                b"a\xff"
            ])
            .unwrap(),
            r#"--append "a\xFF": is not UTF-8: this option takes text"#
        );
        assert_eq!(
            line(&[b"igvm", b"-o", b"o\xff", b"--vcpu-type", b"E\xff"]).unwrap(),
            r#"--vcpu-type "E\xFF": is not UTF-8: this option takes text"#
        );
        assert!(line(&[b"run", b"--vcpus", b"4"]).is_none());
    }
}
