//! Why `vmm measure` refused its inputs. Every message is one line that starts with the input
//! (option and value) and states the rule broken.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use super::igvm::IgvmError;
use super::ovmf::OvmfError;
use super::plan::PlanError;

/// A refused `vmm measure` invocation.
#[derive(Debug, Error)]
pub enum MeasureError {
    /// An input file (firmware, kernel, initrd) cannot be opened or read, is not a regular
    /// file, or is larger than its kind's limit.
    #[error(transparent)]
    Input(#[from] vmsa_host::input::InputError),
    /// The firmware image is not an SEV-capable OVMF build.
    #[error("--firmware {}: {source}", path.display())]
    Firmware {
        /// The path given.
        path: PathBuf,
        /// The rule it breaks.
        source: OvmfError,
    },
    /// The launch cannot be planned (the firmware or the options break a rule).
    #[error("{input}: {source}")]
    Plan {
        /// The input at fault (option and value).
        input: String,
        /// The rule broken.
        source: PlanError,
    },
    /// `--initrd` or `--append` without `--kernel`.
    #[error(
        "--{option} needs --kernel: the hash table QEMU measures covers kernel, initrd and command line together"
    )]
    NeedsKernel {
        /// `initrd` or `append`.
        option: &'static str,
    },
    /// `--kernel` without `--firmware` (with `--igvm` or `--guest`, whose launch has no hash
    /// table to put it in).
    #[error("--kernel needs --firmware: the hashes go into the firmware's SEV hash table")]
    NeedsFirmware,
    /// `--vcpu-model` or `--vcpu-stepping` without `--vcpu-family` (beside `--vcpu-type` or
    /// `--vcpu-sig` they were accepted and ignored).
    #[error(
        "--{option} needs --vcpu-family: family, model and stepping make one signature (--vcpu-type and \
         --vcpu-sig give the model instead)"
    )]
    NeedsFamily {
        /// `vcpu-model` or `vcpu-stepping`.
        option: &'static str,
    },
    /// An SNP-only option with `--sev-es`.
    #[error("--{option} {value}: this option applies to SEV-SNP launches only, not with --sev-es")]
    SnpOnly {
        /// The option.
        option: &'static str,
        /// Its value.
        value: String,
    },
    /// No vCPU model where the model matters.
    #[error(
        "--vcpu-type is required with --vmm-type qemu (or --vcpu-sig, or --vcpu-family with --vcpu-model and \
         --vcpu-stepping): QEMU puts the vCPU model's CPUID signature in RDX of every launch VMSA"
    )]
    MissingVcpuType,
    /// `--vcpu-sig 0` or `--vcpu-family 0` for a QEMU launch: sev-snp-measure tests these with
    /// Python's truthiness (`elif args.vcpu_sig:`), so it reads 0 as not given and refuses the
    /// launch, where this tool would measure it.
    #[error(
        "--{option} 0: sev-snp-measure reads 0 as no vCPU model and refuses a QEMU launch without one; give the \
         vCPU's real model (--vcpu-type, or its CPUID Fn0000_0001_EAX signature)"
    )]
    ZeroVcpuModel {
        /// `vcpu-sig` or `vcpu-family`.
        option: &'static str,
    },
    /// The dump directory cannot be used.
    #[error("--dump-vmsa {}: {problem}", path.display())]
    DumpDir {
        /// The directory given.
        path: PathBuf,
        /// The rule it breaks.
        #[source]
        problem: DumpDirProblem,
    },
    /// Writing the dump failed (nothing is left behind).
    #[error("--dump-vmsa {}: cannot write the VMSA files: {source}", path.display())]
    DumpWrite {
        /// The directory given.
        path: PathBuf,
        /// The failed call.
        source: crate::output::WriteError,
    },
    /// The IGVM file cannot be measured.
    #[error("--igvm {}: {source}", path.display())]
    Igvm {
        /// The path given.
        path: PathBuf,
        /// The rule it breaks.
        source: IgvmError,
    },
}

/// Why `--dump-vmsa DIR` names no directory the VMSA files can be put in.
#[derive(Debug, Error)]
pub enum DumpDirProblem {
    /// `/`, `.`, `..` or a path ending in one of them.
    #[error("must name a directory (not '/', '.' or '..')")]
    NoName,
    /// `-`, or a directory that is not there.
    #[error(transparent)]
    Unusable(#[from] crate::output::OutputProblem),
    /// A symbolic link to nothing, which renaming the new directory into place would replace.
    #[error("is a symbolic link to nothing (refusing to replace it)")]
    DanglingLink,
    /// `stat(2)` failed.
    #[error("cannot inspect it (stat): {0}")]
    Inspect(#[source] io::Error),
    /// Something other than a directory is there.
    #[error("exists and is {0}, not a directory (refusing to overwrite)")]
    NotADirectory(&'static str),
    /// Listing the directory (`opendir(3)`) failed.
    #[error("cannot list it (opendir): {0}")]
    List(#[source] io::Error),
    /// The directory has entries.
    #[error("exists and is not empty (refusing to overwrite)")]
    NotEmpty,
}

impl MeasureError {
    /// The process exit code for this error: 2, a bad argument or input file.
    pub fn exit_code(&self) -> u8 {
        2
    }
}
