//! `vmm igvm --firmware OVMF.fd -o FILE`: write the IGVM file that launches an OVMF image as
//! `vmm measure --firmware` plans it ([`crate::measure::igvm::plan_to_igvm`]), so the firmware
//! a user has becomes the format Cloud Hypervisor, OpenVMM and coconut-svsm load. Measured with
//! `vmm measure --igvm FILE --native-zero`, the file has the firmware's sev-snp-measure digest.

use std::path::{Path, PathBuf};

use vmsa_core::VmKind;

use crate::measure::command::{DEFAULT_SNP_GUEST_FEATURES, plan_input, read_firmware};
use crate::measure::igvm::plan_to_igvm;
use crate::measure::parse_hex_u64;
use crate::measure::vcpu_types::VcpuType;
use crate::measure::vmm_types::VmmType;
use crate::measure::{LaunchPlan, MeasureError, PlanConfig, VcpuCount};

/// The arguments of `vmm igvm`.
#[derive(Clone, Debug, clap::Args)]
pub struct IgvmArgs {
    /// The OVMF image to wrap (an SEV-capable build with SEV metadata).
    #[arg(long, value_name = "OVMF.fd")]
    pub firmware: PathBuf,
    /// The IGVM file to write (it must not exist yet).
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: PathBuf,
    /// Number of vCPUs: one SNP VP context each (the supplied-VMSA launch of `vmm run --igvm`
    /// takes one, the BSP's).
    #[arg(long, value_name = "N", default_value = "1", allow_negative_numbers = true)]
    pub vcpus: VcpuCount,
    /// The vCPU model whose CPUID signature the VMSAs carry.
    #[arg(long, value_name = "NAME", default_value = "EPYC-v4")]
    pub vcpu_type: VcpuType,
    /// The VMM whose reset state the VMSAs follow.
    #[arg(long, value_name = "qemu|ec2|gce", default_value = "qemu")]
    pub vmm_type: VmmType,
    /// The guest's SEV features (hex, SNP_ACTIVE included), 0x1 by default.
    #[arg(long, value_name = "HEX", value_parser = parse_hex_u64)]
    pub guest_features: Option<u64>,
}

/// Why `vmm igvm` wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum WrapCommandError {
    /// The firmware or the options were refused.
    #[error(transparent)]
    Measure(#[from] MeasureError),
    /// The plan has no IGVM form.
    #[error("--firmware {path}: {source}")]
    Wrap {
        /// The firmware.
        path: String,
        /// The rule.
        source: crate::measure::igvm::WrapError,
    },
    /// The output exists, or its directory is not writable.
    #[error("--output {path}: {rule}")]
    Output {
        /// The output path.
        path: String,
        /// Why it cannot be written.
        rule: String,
    },
    /// The igvm crate could not serialise the file.
    #[error("--output {path}: the igvm crate cannot serialise the file: {source}")]
    Serialize {
        /// The output path.
        path: String,
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

/// Write the IGVM file and return the line to print (its path and digest).
pub fn write_igvm(args: &IgvmArgs) -> Result<String, WrapCommandError> {
    let out = args.output.display().to_string();
    let output_err = |rule: String| WrapCommandError::Output {
        path: out.clone(),
        rule,
    };
    if args.output.symlink_metadata().is_ok() {
        return Err(output_err(
            "the file exists; vmm igvm never overwrites a file".into(),
        ));
    }
    let dir = args
        .output
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(output_err(format!(
            "the directory {} does not exist",
            dir.display()
        )));
    }
    let ovmf = read_firmware(&args.firmware)?;
    let config = PlanConfig {
        kind: VmKind::Snp,
        vcpus: args.vcpus,
        vcpu_sig: args.vcpu_type.signature(),
        vmm_type: args.vmm_type,
        guest_features: args.guest_features.unwrap_or(DEFAULT_SNP_GUEST_FEATURES),
    };
    let plan = LaunchPlan::build(&ovmf, &config, None).map_err(|source| MeasureError::Plan {
        input: plan_input(&source, &args.firmware),
        source,
    })?;
    let file = plan_to_igvm(&plan).map_err(|source| WrapCommandError::Wrap {
        path: args.firmware.display().to_string(),
        source,
    })?;
    let mut bytes = Vec::new();
    file.serialize(&mut bytes)
        .map_err(|source| WrapCommandError::Serialize {
            path: out.clone(),
            source,
        })?;
    crate::output::write_new(&args.output, &bytes).map_err(|e| output_err(e.to_string()))?;
    Ok(format!(
        "wrote {out}: {} vCPU(s), {} bytes; launch digest with --native-zero (SHA-384):\n{}\n",
        args.vcpus.get(),
        bytes.len(),
        plan.measure().hex()
    ))
}
