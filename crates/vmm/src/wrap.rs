//! `vmm igvm --firmware OVMF.fd -o FILE`: write the IGVM file that launches an OVMF image as
//! `vmm measure --firmware` plans it ([`crate::measure::igvm::plan_to_igvm`]), so the firmware
//! a user has becomes the format Cloud Hypervisor, OpenVMM and coconut-svsm load. Measured with
//! `vmm measure --igvm FILE --native-zero`, the file has the firmware's sev-snp-measure digest.
//!
//! `vmm igvm --guest builtin:NAME -o FILE`: write one of backend-kvm's guest programs as an
//! IGVM file ([`crate::measure::igvm::guest_to_igvm`]), the file `vmm run --backend kvm --igvm`
//! runs on real vCPUs, its VP context the BSP's VMSA, with one digest for every vCPU count.

use std::path::PathBuf;

use backend_kvm::guest::builtin::ap_creation_igvm;
use vmsa_core::VmKind;

use crate::measure::command::{DEFAULT_SNP_GUEST_FEATURES, DirectBoot, plan_input, read_firmware};
use crate::measure::igvm::{IgvmMeasureOptions, guest_igvm_measured, plan_to_igvm};
use crate::measure::parse_hex_u64;
use crate::measure::plan::LaunchDigest;
use crate::measure::vcpu_types::VcpuType;
use crate::measure::vmm_types::VmmType;
use crate::measure::{LaunchPlan, MeasureError, PlanConfig, VcpuCount};
use crate::run::GuestSpec;

/// The arguments of `vmm igvm`.
#[derive(Clone, Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["firmware", "guest"])))]
pub struct IgvmArgs {
    /// The OVMF image to wrap (an SEV-capable build with SEV metadata).
    #[arg(long, value_name = "OVMF.fd")]
    pub firmware: Option<PathBuf>,
    /// Instead of a firmware: the kvm backend's guest program (builtin:boot, builtin:ap-churn),
    /// for `vmm run --backend kvm --igvm FILE` (its image, a VP-count parameter page and the
    /// BSP's VMSA; nothing depends on the vCPU count).
    #[arg(
        long,
        value_name = "builtin:NAME",
        value_parser = clap::builder::TypedValueParser::try_map(clap::builder::OsStringValueParser::new(), GuestSpec::from_os)
    )]
    pub guest: Option<GuestSpec>,
    /// The IGVM file to write (it must not exist yet).
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: PathBuf,
    /// Number of vCPUs: one SNP VP context each (the supplied-VMSA launch of `vmm run --igvm`
    /// takes one, the BSP's).
    #[arg(
        long,
        value_name = "N",
        default_value = "1",
        allow_negative_numbers = true,
        conflicts_with = "guest"
    )]
    pub vcpus: VcpuCount,
    /// The vCPU model whose CPUID signature the VMSAs carry.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "EPYC-v4",
        conflicts_with = "guest"
    )]
    pub vcpu_type: VcpuType,
    /// The VMM whose reset state the VMSAs follow.
    #[arg(
        long,
        value_name = "qemu|ec2|gce",
        default_value = "qemu",
        conflicts_with = "guest"
    )]
    pub vmm_type: VmmType,
    /// The guest's SEV features (hex, SNP_ACTIVE included), 0x1 by default (`21` is refused
    /// as ambiguous: sev-snp-measure reads it as decimal).
    #[arg(long, value_name = "HEX", value_parser = parse_hex_u64, conflicts_with = "guest")]
    pub guest_features: Option<u64>,
    /// With --firmware: a direct kernel boot (--kernel, --initrd, --append), whose hash table
    /// the file's pages carry as `vmm measure` plans it.
    #[command(flatten)]
    pub boot: DirectBoot,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What an IGVM file written by `vmm igvm` launches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Launches {
    /// An OVMF image, with one SNP VP context per vCPU.
    Firmware {
        /// `--firmware`.
        path: PathBuf,
        /// `--vcpus`.
        vcpus: u32,
        /// `--kernel`, whose hashes (with `--initrd`'s and `--append`'s) the file carries.
        kernel: Option<PathBuf>,
    },
    /// One of backend-kvm's guest programs, for any vCPU count.
    Guest {
        /// Its name (`boot`, `ap-churn`).
        name: &'static str,
    },
}

/// The IGVM file `vmm igvm` wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// `--output`.
    pub output: PathBuf,
    /// Its size in bytes.
    pub bytes: usize,
    /// What it launches.
    pub launches: Launches,
    /// Its SEV-SNP launch digest as `vmm measure --igvm` computes it: with `--native-zero`
    /// for a wrapped firmware (the firmware's sev-snp-measure digest), as is for a guest
    /// program (which has no data-less pages).
    pub digest: LaunchDigest,
}

impl Written {
    /// The output of `vmm igvm`: a line naming the file and its digest, or (`json`) one JSON
    /// document.
    pub fn render(&self, json: bool) -> String {
        let out = self.output.display();
        let native_zero = matches!(self.launches, Launches::Firmware { .. });
        if json {
            let (firmware, guest, vcpus, kernel) = match &self.launches {
                Launches::Firmware { path, vcpus, kernel } => (
                    Some(path.display().to_string()),
                    None,
                    Some(*vcpus),
                    kernel.as_ref().map(|k| k.display().to_string()),
                ),
                Launches::Guest { name } => (None, Some(format!("builtin:{name}")), None, None),
            };
            let doc = serde_json::json!({
                "output": out.to_string(),
                "bytes": self.bytes,
                "firmware": firmware,
                "guest": guest,
                "vcpus": vcpus,
                "kernel": kernel,
                "algorithm": self.digest.algorithm(),
                "digest": self.digest.hex(),
                "digest_with_native_zero": native_zero,
            });
            return format!("{doc}\n");
        }
        let what = match &self.launches {
            Launches::Firmware { vcpus, kernel, .. } => match kernel {
                None => format!("{vcpus} vCPU(s)"),
                Some(k) => format!("{vcpus} vCPU(s), direct boot of {}", k.display()),
            },
            Launches::Guest { name } => format!("backend-kvm guest program builtin:{name}, any vCPU count"),
        };
        let with = if native_zero { " with --native-zero" } else { "" };
        format!(
            "wrote {out}: {what}, {} bytes; launch digest{with} (SHA-384):\n{}\n",
            self.bytes,
            self.digest.hex()
        )
    }
}

/// Why `vmm igvm` wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum WrapCommandError {
    /// The firmware or the options were refused.
    #[error(transparent)]
    Measure(#[from] MeasureError),
    /// The plan (or the guest program) has no IGVM form.
    #[error("{input}: {source}")]
    Wrap {
        /// `--firmware PATH` or `--guest builtin:NAME`.
        input: String,
        /// The rule.
        source: crate::measure::igvm::WrapError,
    },
    /// Neither `--firmware` nor `--guest` was given.
    #[error("vmm igvm needs --firmware OVMF.fd or --guest builtin:NAME: the file has to launch something")]
    NoInput,
    /// `--guest` names no guest program of the kvm backend.
    #[error(
        "--guest {guest}: vmm igvm writes the kvm backend's guest programs ({names}); other guests run on the \
         simulator, and a firmware is wrapped with --firmware"
    )]
    Guest {
        /// `--guest` as given.
        guest: GuestSpec,
        /// The programs it may name.
        names: String,
    },
    /// The output cannot be written where it is named: `-`, or no such directory.
    #[error("--output {}: {problem}", .path.display())]
    Output {
        /// The output path.
        path: PathBuf,
        /// Why it cannot be written there.
        #[source]
        problem: crate::output::OutputProblem,
    },
    /// Something is already at the output's path.
    #[error("--output {}: it exists ({file_type}); vmm igvm never overwrites anything", .path.display())]
    Exists {
        /// The output path.
        path: PathBuf,
        /// What is there ("a regular file", "a directory", ...).
        file_type: &'static str,
    },
    /// Writing the output failed (nothing is left behind).
    #[error("--output {}: cannot write it: {source}", .path.display())]
    Write {
        /// The output path.
        path: PathBuf,
        /// The failed call.
        source: crate::output::WriteError,
    },
    /// The igvm crate could not serialise the file.
    #[error("--output {}: the igvm crate cannot serialise the file: {source}", .path.display())]
    Serialize {
        /// The output path.
        path: PathBuf,
        /// Its error.
        source: igvm::Error,
    },
}

impl WrapCommandError {
    /// 2 for a bad input or output, 1 for a failure to serialise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Serialize { .. } => 1,
            _ => 2,
        }
    }
}

/// Write the IGVM file; what was written, with its digest.
pub fn write_igvm(args: &IgvmArgs) -> Result<Written, WrapCommandError> {
    args.boot.check(args.firmware.is_some())?;
    if let Some(problem) = crate::output::unusable(&args.output) {
        return Err(WrapCommandError::Output {
            path: args.output.clone(),
            problem,
        });
    }
    if let Ok(m) = args.output.symlink_metadata() {
        return Err(WrapCommandError::Exists {
            path: args.output.clone(),
            file_type: vmsa_host::input::file_type_name(m.file_type()),
        });
    }
    let (file, launches, digest) = match (&args.firmware, &args.guest) {
        (Some(firmware), _) => {
            let ovmf = read_firmware(firmware)?;
            let config = PlanConfig {
                kind: VmKind::Snp,
                vcpus: args.vcpus,
                vcpu_sig: args.vcpu_type.signature(),
                vmm_type: args.vmm_type,
                guest_features: args.guest_features.unwrap_or(DEFAULT_SNP_GUEST_FEATURES),
            };
            let hashes = args.boot.hashes(&ovmf, VmKind::Snp, firmware)?;
            let plan =
                LaunchPlan::build(&ovmf, &config, hashes.as_ref()).map_err(|source| MeasureError::Plan {
                    input: plan_input(&source, firmware),
                    source,
                })?;
            let file = plan_to_igvm(&plan).map_err(|source| WrapCommandError::Wrap {
                input: format!("--firmware {}", firmware.display()),
                source,
            })?;
            (
                file,
                Launches::Firmware {
                    path: firmware.clone(),
                    vcpus: args.vcpus.get(),
                    kernel: args.boot.kernel.clone(),
                },
                plan.measure(),
            )
        }
        (None, Some(guest)) => {
            let (name, recreate) =
                crate::run::ap_creation_program(guest).ok_or_else(|| WrapCommandError::Guest {
                    guest: guest.clone(),
                    names: crate::run::program_names(),
                })?;
            let (file, m) = guest_igvm_measured(&ap_creation_igvm(recreate), IgvmMeasureOptions::default())
                .map_err(|source| WrapCommandError::Wrap {
                input: format!("--guest {guest}"),
                source,
            })?;
            (file, Launches::Guest { name }, LaunchDigest::Snp(m.digest))
        }
        (None, None) => return Err(WrapCommandError::NoInput),
    };
    let mut bytes = Vec::new();
    file.serialize(&mut bytes)
        .map_err(|source| WrapCommandError::Serialize {
            path: args.output.clone(),
            source,
        })?;
    crate::output::write_new(&args.output, &bytes).map_err(|source| WrapCommandError::Write {
        path: args.output.clone(),
        source,
    })?;
    Ok(Written {
        output: args.output.clone(),
        bytes: bytes.len(),
        launches,
        digest,
    })
}
