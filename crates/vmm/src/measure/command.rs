//! The `vmm measure` subcommand: its arguments, their validation, and its output.
//!
//! Validation happens before anything is written: option combinations, then the `--dump-vmsa`
//! directory, then the firmware, kernel and initrd files, then the launch plan. Only then is
//! the digest computed and the dump written (atomically).

use std::path::{Path, PathBuf};

use backend_sim::measure::SnpLaunchDigest;
use base64::Engine;
use clap::{ArgMatches, Args, FromArgMatches, ValueEnum};
use serde_json::json;
use vmsa_core::{Gpa, VmKind};
use vmsa_host::input::{InputFile, InputKind};

use super::error::MeasureError;
use super::hashes::SevHashes;
use super::igvm::{IgvmArgs, IgvmFlags, IgvmMeasureOptions, PageCounts};
use super::ovmf::{FOUR_GIB, MAX_IMAGE_SIZE, Ovmf, check_image_size};
use super::plan::{LaunchDigest, LaunchPlan, PlanConfig, PlanError, ovmf_hash};
use super::vcpu_types::VcpuType;
use super::vmm_types::VmmType;
use super::{OvmfHash, VcpuCount, dump, parse_hex_u64, parse_ovmf_hash, parse_vcpu_sig};

/// SEV_FEATURES of SNP VMSAs when `--guest-features` is not given: SNP_ACTIVE only (as
/// sev-snp-measure defaults).
pub const DEFAULT_SNP_GUEST_FEATURES: u64 = 0x1;

/// `vmm measure`: the launch digest of an OVMF guest, without running it.
#[derive(Clone, Debug, clap::Args)]
pub struct MeasureArgs {
    /// OVMF image with SEV metadata (e.g. /usr/share/ovmf/OVMF.fd).
    #[arg(long, value_name = "OVMF.fd")]
    pub firmware: PathBuf,
    /// Number of vCPUs (1 to 512); each adds a launch VMSA.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub vcpus: VcpuCount,
    /// QEMU vCPU model (EPYC, EPYC-v1..v4, EPYC-IBPB, EPYC-Rome[-v1..v3], EPYC-Milan[-v1,v2],
    /// EPYC-Genoa[-v1], EPYC-Turin); with --vmm-type qemu it, --vcpu-sig or --vcpu-family is
    /// required.
    #[arg(long, value_name = "NAME")]
    pub vcpu_type: Option<VcpuType>,
    /// Instead of --vcpu-type: the vCPU's CPUID signature (Fn0000_0001_EAX), 0x-prefixed hex
    /// or decimal, as sev-snp-measure's --vcpu-sig.
    #[arg(
        long,
        value_name = "VALUE",
        value_parser = parse_vcpu_sig,
        conflicts_with = "vcpu_type",
        allow_negative_numbers = true
    )]
    pub vcpu_sig: Option<u32>,
    /// Instead of --vcpu-type: the vCPU's family (decimal), with --vcpu-model and
    /// --vcpu-stepping, whose signature they make, as sev-snp-measure's --vcpu-family.
    #[arg(
        long,
        value_name = "FAMILY",
        value_parser = clap::value_parser!(u32).range(0..=MAX_FAMILY),
        requires_all = ["vcpu_model", "vcpu_stepping"],
        conflicts_with_all = ["vcpu_type", "vcpu_sig"],
        allow_negative_numbers = true
    )]
    pub vcpu_family: Option<u32>,
    /// The vCPU's model (decimal, 0 to 255), with --vcpu-family.
    #[arg(
        long,
        value_name = "MODEL",
        value_parser = clap::value_parser!(u32).range(0..=0xff),
        allow_negative_numbers = true
    )]
    pub vcpu_model: Option<u32>,
    /// The vCPU's stepping (decimal, 0 to 15), with --vcpu-family.
    #[arg(
        long,
        value_name = "STEPPING",
        value_parser = clap::value_parser!(u32).range(0..=0xf),
        allow_negative_numbers = true
    )]
    pub vcpu_stepping: Option<u32>,
    /// The VMM whose launch to reproduce: qemu, ec2 or gce.
    #[arg(long, value_name = "qemu|ec2|gce", default_value = "qemu")]
    pub vmm_type: VmmType,
    /// SEV_FEATURES of the SNP VMSAs, in hex (default 0x1, SNP_ACTIVE; `21` is refused as
    /// ambiguous: sev-snp-measure reads it as decimal). SNP only.
    #[arg(long, value_name = "HEX", value_parser = parse_hex_u64)]
    pub guest_features: Option<u64>,
    /// A precalculated OVMF hash (96 hex digits, as --ovmf-hash-only prints it): the launch
    /// digest continues from it instead of hashing the firmware's pages (--firmware still gives
    /// the metadata and reset vector), as sev-snp-measure's --snp-ovmf-hash. SNP only.
    #[arg(long, value_name = "HASH", value_parser = parse_ovmf_hash)]
    pub snp_ovmf_hash: Option<OvmfHash>,
    /// Measure an SEV-ES launch (SHA-256) instead of SEV-SNP (SHA-384).
    #[arg(long)]
    pub sev_es: bool,
    /// A direct kernel boot: --kernel, --initrd, --append.
    #[command(flatten)]
    pub boot: DirectBoot,
    /// Write the launch VMSAs as DIR/vmsa0.bin, vmsa1.bin, ... (DIR must not exist or be empty).
    #[arg(long, value_name = "DIR")]
    pub dump_vmsa: Option<PathBuf>,
    /// How to write the launch digest: hex (the default) or base64, as sev-snp-measure's
    /// --output-format.
    #[arg(long, value_name = "hex|base64", default_value = "hex")]
    pub output_format: DigestFormat,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// How `vmm measure` writes a launch digest (sev-snp-measure's `--output-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DigestFormat {
    /// Lowercase hex digits.
    #[default]
    Hex,
    /// Standard base64 with padding (RFC 4648 §4), as Python's `base64.b64encode`.
    Base64,
}

impl DigestFormat {
    /// `digest` written in this format.
    pub fn write(self, digest: &LaunchDigest) -> String {
        match self {
            Self::Hex => digest.hex(),
            Self::Base64 => base64::engine::general_purpose::STANDARD.encode(digest.bytes()),
        }
    }
}

/// A direct kernel boot (QEMU's `-kernel`, `-initrd`, `-append` with `kernel-hashes=on`): the
/// files whose hashes the launch puts into the firmware's SEV hash table. The same options for
/// `vmm measure`, `vmm run --firmware` and `vmm igvm --firmware`, so that the three plan one
/// launch.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct DirectBoot {
    /// Kernel for a direct boot: its hash goes into the firmware's SEV hash table (the firmware
    /// must have the table: SNP_KERNEL_HASHES for SEV-SNP, as AmdSev OVMF builds do).
    #[arg(long, value_name = "K")]
    pub kernel: Option<PathBuf>,
    /// Initrd for a direct boot (needs --kernel).
    #[arg(long, value_name = "I")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for a direct boot (needs --kernel).
    #[arg(long, value_name = "CMDLINE")]
    pub append: Option<String>,
}

impl DirectBoot {
    /// Refuse --initrd or --append without --kernel, and --kernel without a firmware to hold
    /// its hashes (`firmware`: whether one is given), before any file is read. (clap's
    /// `requires` does not fire where --firmware conflicts with an option given instead, such
    /// as --igvm or --guest: --kernel was ignored there.)
    pub fn check(&self, firmware: bool) -> Result<(), MeasureError> {
        if self.kernel.is_some() && !firmware {
            return Err(MeasureError::NeedsFirmware);
        }
        if self.kernel.is_none() {
            if self.initrd.is_some() {
                return Err(MeasureError::NeedsKernel { option: "initrd" });
            }
            if self.append.is_some() {
                return Err(MeasureError::NeedsKernel { option: "append" });
            }
        }
        Ok(())
    }

    /// The hash table's hashes for a `kind` launch of `ovmf` (read from `firmware`), or `None`
    /// without --kernel. The firmware must have the table; the files are hashed as they are
    /// read.
    pub fn hashes(
        &self,
        ovmf: &Ovmf,
        kind: VmKind,
        firmware: &Path,
    ) -> Result<Option<SevHashes>, MeasureError> {
        self.check(true)?;
        let Some(kernel) = &self.kernel else {
            return Ok(None);
        };
        LaunchPlan::check_kernel_hashes(ovmf, kind).map_err(|source| MeasureError::Plan {
            input: plan_input(&source, firmware),
            source,
        })?;
        Ok(Some(SevHashes::from_files(
            kernel,
            self.initrd.as_deref(),
            self.append.as_deref(),
        )?))
    }
}

/// The largest family a signature holds: BaseFamily 0xF plus an 8-bit ExtFamily.
const MAX_FAMILY: i64 = 0xf + 0xff;

impl MeasureArgs {
    /// The vCPU model the VMSAs' RDX carries, as given (`--vcpu-type`, `--vcpu-sig` or
    /// `--vcpu-family/-model/-stepping`): how to name it, and its signature.
    pub fn vcpu_model(&self) -> Option<(String, u32)> {
        match (self.vcpu_type, self.vcpu_sig, self.vcpu_family) {
            (Some(t), _, _) => Some((format!("--vcpu-type {}", t.name), t.signature())),
            (_, Some(sig), _) => Some((format!("--vcpu-sig {sig:#x}"), sig)),
            (_, _, Some(family)) => {
                let (model, stepping) = (self.vcpu_model.unwrap_or(0), self.vcpu_stepping.unwrap_or(0));
                Some((
                    format!("--vcpu-family {family} --vcpu-model {model} --vcpu-stepping {stepping}"),
                    super::vcpu_types::cpu_sig(family, model, stepping),
                ))
            }
            (None, None, None) => None,
        }
    }
}

/// `vmm measure`'s arguments: the OVMF form ([`MeasureArgs`]), the OVMF hash of a firmware
/// (`--ovmf-hash-only`), or the IGVM form (`--igvm FILE`). Parsed as one command line:
/// `--firmware` and `--vcpus` are required unless `--igvm` is given (`--vcpus` also unless
/// `--ovmf-hash-only` is), and every other option of the OVMF form conflicts with either.
#[derive(Clone, Debug)]
pub enum MeasureCommand {
    /// `vmm measure --firmware ...` (boxed: it is by far the largest form).
    Ovmf(Box<MeasureArgs>),
    /// `vmm measure --firmware FILE --ovmf-hash-only`.
    OvmfHash(OvmfHashArgs),
    /// `vmm measure --igvm ...`.
    Igvm(IgvmArgs),
}

/// The flag that asks for a firmware's OVMF hash instead of a launch digest.
#[derive(Clone, Debug, clap::Args)]
struct OvmfHashFlag {
    /// Print the OVMF hash of --firmware instead of a launch digest: the SEV-SNP digest of the
    /// firmware's pages alone, which --snp-ovmf-hash takes (sev-snp-measure's --mode
    /// snp:ovmf-hash). Only --json goes with it (the hash as a JSON document).
    #[arg(long)]
    ovmf_hash_only: bool,
}

/// `vmm measure --firmware FILE --ovmf-hash-only`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OvmfHashArgs {
    /// The firmware.
    pub firmware: PathBuf,
    /// Print one JSON document.
    pub json: bool,
}

impl FromArgMatches for MeasureCommand {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let flags = IgvmFlags::from_arg_matches(m)?;
        let ovmf_hash_only = OvmfHashFlag::from_arg_matches(m)?.ovmf_hash_only;
        match flags.igvm {
            Some(path) => Ok(Self::Igvm(IgvmArgs {
                path,
                options: IgvmMeasureOptions {
                    native_zero: flags.native_zero,
                    check_kvm: flags.check_kvm,
                },
                ignore_idblock: flags.ignore_idblock,
                json: m.get_flag("json"),
            })),
            None => {
                // clap's `requires` does not fire once the OVMF form's own arguments are all
                // there, so the rule is checked here.
                let igvm_only = [
                    (flags.native_zero, "native-zero"),
                    (flags.check_kvm, "check-kvm"),
                    (flags.ignore_idblock, "ignore-idblock"),
                ];
                if let Some((_, name)) = igvm_only.iter().find(|(on, _)| *on) {
                    return Err(clap::Error::raw(
                        clap::error::ErrorKind::MissingRequiredArgument,
                        format!("--{name} needs --igvm: it is an option of the IGVM measurement\n"),
                    ));
                }
                if ovmf_hash_only {
                    return Ok(Self::OvmfHash(OvmfHashArgs {
                        firmware: m.get_one::<PathBuf>("firmware").cloned().unwrap_or_default(),
                        json: m.get_flag("json"),
                    }));
                }
                Ok(Self::Ovmf(Box::new(MeasureArgs::from_arg_matches(m)?)))
            }
        }
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for MeasureCommand {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        // Every option of the OVMF form but --json conflicts with --igvm, and all but --firmware
        // too with --ovmf-hash-only: taken from `MeasureArgs` itself, so that an option added
        // there cannot be silently ignored by the other forms.
        let ovmf_only: Vec<clap::Id> = MeasureArgs::augment_args(clap::Command::new("measure"))
            .get_arguments()
            .map(|a| a.get_id().clone())
            .filter(|id| id != "json")
            .collect();
        let mut cmd = OvmfHashFlag::augment_args(IgvmFlags::augment_args(MeasureArgs::augment_args(cmd)))
            .mut_arg("firmware", |a| a.required(false).required_unless_present("igvm"))
            .mut_arg("vcpus", |a| {
                a.required(false)
                    .required_unless_present_any(["igvm", "ovmf_hash_only"])
            })
            .mut_arg("ovmf_hash_only", |a| a.conflicts_with("igvm"));
        for id in ovmf_only {
            cmd = cmd.mut_arg(id.clone(), |a| a.conflicts_with("igvm"));
            if id != "firmware" {
                cmd = cmd.mut_arg(id, |a| a.conflicts_with("ovmf_hash_only"));
            }
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// What `vmm measure` prints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeasureOutput {
    /// Standard output: text ending with the digest line, or one JSON document.
    pub stdout: String,
    /// Warnings for standard error, one line each.
    pub warnings: Vec<String>,
    /// The digest.
    pub digest: LaunchDigest,
}

/// Firmware images: at most [`MAX_IMAGE_SIZE`] bytes.
pub const FIRMWARE_FILE_KIND: InputKind = InputKind {
    what: "an OVMF image",
    limit: MAX_IMAGE_SIZE,
};

/// Read and parse the OVMF image at `path`, given with `--firmware`: a regular file (opened
/// without blocking) of at most [`MAX_IMAGE_SIZE`] bytes.
pub(crate) fn read_firmware(path: &Path) -> Result<Ovmf, MeasureError> {
    Ok(read_and_measure_firmware(path, false)?.0)
}

/// The pieces a firmware image is read in while it is measured: 16 pages, what one hashing
/// thread takes at a time, so that hashing starts after the first 64 KiB are in memory.
const MEASURED_PIECE: usize = 64 << 10;

/// [`read_firmware`], and if `ovmf_hash` its OVMF hash, the SEV-SNP chain over its pages
/// ([`ovmf_hash`]; every SNP launch adds the firmware first), computed while the image is read:
/// the pages read so far are hashed on the other cores while the rest is read. `None` for the
/// hash if the file changed size while it was read (then the plan measures the bytes read).
/// (SEV-ES measures the image as one SHA-256 stream, which no other core can share: its image
/// is read whole first.)
pub(crate) fn read_and_measure_firmware(
    path: &Path,
    ovmf_hash: bool,
) -> Result<(Ovmf, Option<OvmfHash>), MeasureError> {
    let fw_err = |source| MeasureError::Firmware {
        path: path.to_path_buf(),
        source,
    };
    let file = InputFile::open("--firmware", path, FIRMWARE_FILE_KIND)?;
    check_image_size(file.len()).map_err(fw_err)?;
    // Checked above: at most MAX_IMAGE_SIZE.
    let len = file.len() as usize;
    let mut buf = file.buffer();
    let into: &mut [u8] = &mut buf;
    let (filled, hash) = if ovmf_hash {
        let mut ld = SnpLaunchDigest::new();
        let gpa = Gpa(FOUR_GIB - file.len());
        let filled = ld.update_read(gpa, len, |arrived| file.read_into(into, MEASURED_PIECE, arrived));
        (filled, Some(OvmfHash(ld.digest())))
    } else {
        (file.read_into(into, usize::MAX, &mut |_| {}), None)
    };
    let bytes = file.finish_read(buf, filled?)?;
    let hash = hash.filter(|_| bytes.len() == len);
    Ok((Ovmf::parse(bytes).map_err(fw_err)?, hash))
}

pub(crate) fn plan_input(e: &PlanError, firmware: &Path) -> String {
    match e {
        PlanError::GuestFeaturesWithoutSnp { .. } | PlanError::GuestFeaturesWithSevEs { .. } => {
            "--guest-features".to_owned()
        }
        _ => format!("--firmware {}", firmware.display()),
    }
}

/// Run `vmm measure`: validate, plan, measure, dump, and render the output.
pub fn measure(args: &MeasureArgs) -> Result<MeasureOutput, MeasureError> {
    args.boot.check(true)?;
    if args.vcpu_family.is_none() {
        if args.vcpu_model.is_some() {
            return Err(MeasureError::NeedsFamily { option: "vcpu-model" });
        }
        if args.vcpu_stepping.is_some() {
            return Err(MeasureError::NeedsFamily {
                option: "vcpu-stepping",
            });
        }
    }
    let kind = if args.sev_es { VmKind::SevEs } else { VmKind::Snp };
    let guest_features = match (kind, args.guest_features) {
        (VmKind::SevEs, Some(v)) => {
            return Err(MeasureError::SnpOnly {
                option: "guest-features",
                value: format!("{v:#x}"),
            });
        }
        (VmKind::SevEs, None) => 0,
        (VmKind::Snp, v) => v.unwrap_or(DEFAULT_SNP_GUEST_FEATURES),
    };
    if let (VmKind::SevEs, Some(h)) = (kind, args.snp_ovmf_hash) {
        return Err(MeasureError::SnpOnly {
            option: "snp-ovmf-hash",
            value: h.to_string(),
        });
    }
    let vcpu_model = args.vcpu_model();
    if args.vmm_type.uses_vcpu_signature() {
        if vcpu_model.is_none() {
            return Err(MeasureError::MissingVcpuType);
        }
        for (option, value) in [("vcpu-sig", args.vcpu_sig), ("vcpu-family", args.vcpu_family)] {
            if value == Some(0) {
                return Err(MeasureError::ZeroVcpuModel { option });
            }
        }
    }
    if let Some(dir) = &args.dump_vmsa {
        dump::check_dir(dir)?;
    }
    // SNP measures the firmware while it is read, unless its OVMF hash is given.
    let (ovmf, read_hash) = read_and_measure_firmware(
        &args.firmware,
        kind == VmKind::Snp && args.snp_ovmf_hash.is_none(),
    )?;
    let hashes = args.boot.hashes(&ovmf, kind, &args.firmware)?;
    let config = PlanConfig {
        kind,
        vcpus: args.vcpus,
        vcpu_sig: vcpu_model.as_ref().map_or(0, |(_, sig)| *sig),
        vmm_type: args.vmm_type,
        guest_features,
    };
    let plan = LaunchPlan::build(&ovmf, &config, hashes.as_ref()).map_err(|source| MeasureError::Plan {
        input: plan_input(&source, &args.firmware),
        source,
    })?;
    // SEV-ES with a given OVMF hash was refused above.
    let digest = match args
        .snp_ovmf_hash
        .or(read_hash)
        .and_then(|h| plan.measure_after(h))
    {
        Some(d) => d,
        None => plan.measure(),
    };
    let dumped = match &args.dump_vmsa {
        Some(dir) => Some(dump::write(dir, plan.vmsas())?),
        None => None,
    };
    let mut warnings = plan.warnings().to_vec();
    if let Some((given, _)) = vcpu_model
        .as_ref()
        .filter(|_| !args.vmm_type.uses_vcpu_signature())
    {
        // sev-snp-measure accepts the option here and ignores it (RDX = 0x600, EC2's and GCE's
        // reset value); say so rather than ignore it silently.
        warnings.push(format!(
            "{given}: ignored with --vmm-type {}, whose VMSAs carry no vCPU model signature (RDX = 0x600)",
            args.vmm_type
        ));
    }
    let stdout = if args.json {
        render_json(args, &ovmf, &plan, &config, digest, dumped, &warnings)
    } else {
        render_text(args, &ovmf, &plan, &config, digest, dumped)
    };
    Ok(MeasureOutput {
        stdout,
        warnings,
        digest,
    })
}

/// Run `vmm measure --ovmf-hash-only`: the firmware's OVMF hash, as text or one JSON document.
pub fn measure_ovmf_hash(args: &OvmfHashArgs) -> Result<String, MeasureError> {
    let (ovmf, read_hash) = read_and_measure_firmware(&args.firmware, true)?;
    let hash = read_hash.unwrap_or_else(|| ovmf_hash(&ovmf));
    Ok(if args.json {
        let doc = json!({
            "mode": "snp:ovmf-hash",
            "algorithm": "sha384",
            "ovmf_hash": hash.to_string(),
            "inputs": firmware_inputs(&args.firmware, &ovmf),
        });
        format!("{doc}\n")
    } else {
        format!(
            "{}ovmf hash (sha384):\n{hash}\n",
            firmware_line(&args.firmware, &ovmf)
        )
    })
}

/// The JSON `inputs` that name the firmware: its path, size and load address.
fn firmware_inputs(path: &Path, ovmf: &Ovmf) -> serde_json::Map<String, serde_json::Value> {
    let mut inputs = serde_json::Map::new();
    inputs.insert("firmware".into(), json!(path.display().to_string()));
    inputs.insert("firmware_size".into(), json!(ovmf.data().len()));
    inputs.insert("firmware_gpa".into(), json!(format!("{:#x}", ovmf.gpa())));
    inputs
}

/// The text output's first line: the firmware, its size and place, its metadata.
fn firmware_line(path: &Path, ovmf: &Ovmf) -> String {
    format!(
        "firmware: {} ({} bytes at {:#x}, {} SEV metadata sections)\n",
        path.display(),
        ovmf.data().len(),
        ovmf.gpa(),
        ovmf.metadata_sections().len()
    )
}

fn mode_name(kind: VmKind) -> &'static str {
    match kind {
        VmKind::Snp => "snp",
        VmKind::SevEs => "sev-es",
    }
}

/// `(name, count)` of the pages of each type the plan adds (VMSAs included).
fn page_counts(plan: &LaunchPlan) -> [(&'static str, u64); 6] {
    PageCounts::from_fn(|ty| plan.page_count(ty)).named()
}

fn render_text(
    args: &MeasureArgs,
    ovmf: &Ovmf,
    plan: &LaunchPlan,
    config: &PlanConfig,
    digest: LaunchDigest,
    dumped: Option<usize>,
) -> String {
    let mut out = firmware_line(&args.firmware, ovmf);
    let named = |sig: u32| match args.vcpu_type {
        Some(t) => format!("{t} (signature {sig:#010x})"),
        None => format!("of signature {sig:#010x}"),
    };
    let cpu = match args.vcpu_model() {
        Some((_, sig)) if config.vmm_type.uses_vcpu_signature() => format!(" {}", named(sig)),
        Some((given, _)) => format!(
            " ({given} ignored: {} VMSAs carry no model signature)",
            config.vmm_type
        ),
        None => String::new(),
    };
    out += &format!(
        "launch: {}, {} vCPUs{cpu}, vmm {}, guest features {:#x}\n",
        plan.kind(),
        config.vcpus,
        config.vmm_type,
        config.guest_features
    );
    if let Some(k) = &args.boot.kernel {
        out += &format!("kernel hashes: kernel {}", k.display());
        if let Some(i) = &args.boot.initrd {
            out += &format!(", initrd {}", i.display());
        }
        if let Some(a) = &args.boot.append {
            out += &format!(", cmdline {a:?}");
        }
        out += "\n";
    }
    let pages: Vec<String> = page_counts(plan)
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(t, n)| format!("{n} {t}"))
        .collect();
    out += &format!("pages measured: {}\n", pages.join(", "));
    if let Some(h) = args.snp_ovmf_hash {
        out += &format!("ovmf hash: given (--snp-ovmf-hash {h}): the firmware's pages were not hashed\n");
    }
    if let (Some(dir), Some(n)) = (&args.dump_vmsa, dumped) {
        out += &format!("vmsa dump: {n} files in {}\n", dir.display());
    }
    out += &format!(
        "launch digest ({}):\n{}\n",
        digest.algorithm(),
        args.output_format.write(&digest)
    );
    out
}

fn render_json(
    args: &MeasureArgs,
    ovmf: &Ovmf,
    plan: &LaunchPlan,
    config: &PlanConfig,
    digest: LaunchDigest,
    dumped: Option<usize>,
    warnings: &[String],
) -> String {
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let pages: serde_json::Map<String, serde_json::Value> = page_counts(plan)
        .iter()
        .map(|(t, n)| ((*t).to_owned(), json!(n)))
        .collect();
    let mut inputs = firmware_inputs(&args.firmware, ovmf);
    if let serde_json::Value::Object(launch) = json!({
        "vcpus": config.vcpus.get(),
        "vcpu_type": args.vcpu_type.map(|t| t.name),
        "vcpu_signature": args.vcpu_model().map(|(_, sig)| format!("{sig:#x}")),
        "vmm_type": config.vmm_type.name(),
        "guest_features": format!("{:#x}", config.guest_features),
        "kernel": path(&args.boot.kernel),
        "initrd": path(&args.boot.initrd),
        "append": args.boot.append,
        "snp_ovmf_hash": args.snp_ovmf_hash.map(|h| h.to_string()),
    }) {
        inputs.extend(launch);
    }
    let doc = json!({
        "mode": mode_name(plan.kind()),
        "algorithm": digest.algorithm(),
        "digest": args.output_format.write(&digest),
        // Named as the option takes it (clap's name of the value).
        "digest_format": args.output_format.to_possible_value().map(|v| v.get_name().to_owned()),
        "inputs": inputs,
        "pages": pages,
        "vmsa_dump": path(&args.dump_vmsa).map(|d| json!({"dir": d, "files": dumped})),
        "warnings": warnings,
    });
    format!("{doc}\n")
}
