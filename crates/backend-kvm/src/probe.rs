//! What this host's KVM can run: API version, `KVM_CAP_VM_TYPES`, guest_memfd, `/dev/sev`
//! and the `KVM_X86_SEV_VMSA_FEATURES` attribute, folded into a verdict per [`Mode`].
//!
//! Every unsupported mode carries the exact reasons ([`Missing`]): which capability, VM type,
//! device or attribute is missing, and the value or errno that was seen. [`ProbeReport`]
//! prints as a human report (`Display`) and serializes to JSON (`serde::Serialize`) for
//! `vmm probe` and `vmm probe --json`.
//!
//! The checks follow the KVM API documentation (`Documentation/virt/kvm/api.rst`,
//! `KVM_CAP_VM_TYPES`, `KVM_CREATE_GUEST_MEMFD`, `KVM_GET_DEVICE_ATTR`): the `KVM_CAP_VM_TYPES` bitmask
//! is the primary test (kvm-ioctls has no `Cap` for it, so it is read with
//! `check_extension_raw(235)`), corroborated by the SEV device attribute on the system fd
//! (`KVM_GET_DEVICE_ATTR`, which kvm-ioctls does not wrap for `Kvm`) and by actually creating
//! a `KVM_X86_SNP_VM`.

use std::fmt;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use kvm_bindings::{
    KVM_API_VERSION, KVM_CAP_EXIT_HYPERCALL, KVM_CAP_GUEST_MEMFD, KVM_CAP_SPLIT_IRQCHIP,
    KVM_CAP_USER_MEMORY2, KVM_CAP_VM_TYPES, KVM_CAP_X86_USER_SPACE_MSR, KVM_X86_DEFAULT_VM, KVM_X86_GRP_SEV,
    KVM_X86_GRP_SYSTEM, KVM_X86_SEV_ES_VM, KVM_X86_SEV_VMSA_FEATURES, KVM_X86_SNP_VM,
    KVM_X86_XCOMP_GUEST_SUPP, kvm_device_attr,
};
use kvm_ioctls::{Cap, Kvm};
use serde::Serialize;
use vmm_sys_util::ioctl::ioctl_with_ref;

use crate::error::Errno;
use crate::gmem::RamBacking;
use crate::uapi::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_CAP_GUEST_MEMFD_FLAGS, KVM_DEVICE,
    KVM_GET_DEVICE_ATTR, KVM_HC_MAP_GPA_RANGE, SEV_DEVICE,
};

/// A way of running vCPUs from VMSAs on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Mode {
    /// SEV-SNP: KVM_X86_SNP_VM, firmware launch, guest_memfd private memory.
    Snp,
    /// SEV-ES: KVM_X86_SEV_ES_VM. Reported for completeness; this backend runs SNP and
    /// VMSA-image VMs only.
    SevEs,
    /// A default KVM VM whose vCPUs are loaded from and saved to VMSA images, with no
    /// encryption and no RMP (see the crate documentation).
    VmsaImage,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Snp => "SEV-SNP",
            Mode::SevEs => "SEV-ES",
            Mode::VmsaImage => "VMSA-image",
        })
    }
}

/// One reason a mode is unavailable, with the value that was seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "missing", rename_all = "snake_case")]
pub enum Missing {
    /// `/dev/kvm` could not be opened.
    Kvm {
        /// The device path.
        path: &'static str,
        /// Why.
        errno: Errno,
    },
    /// `KVM_GET_API_VERSION` returned something else than 12.
    ApiVersion {
        /// The version seen.
        seen: i32,
        /// The version required.
        required: i32,
    },
    /// `KVM_CAP_VM_TYPES` lacks the VM type.
    VmType {
        /// The VM type (`KVM_X86_*_VM`).
        vm_type: u32,
        /// Its uapi name.
        name: &'static str,
        /// The bitmask `KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES)` returned.
        bitmask: i32,
    },
    /// A capability is absent or lacks required bits.
    Capability {
        /// Its number.
        cap: u32,
        /// Its uapi name.
        name: &'static str,
        /// The value `KVM_CHECK_EXTENSION` returned.
        seen: i32,
        /// What is needed, in words.
        required: &'static str,
    },
    /// A device node is missing or cannot be opened.
    Device {
        /// The path.
        path: &'static str,
        /// Why.
        errno: Errno,
    },
    /// `KVM_GET_DEVICE_ATTR(KVM_X86_GRP_SEV, KVM_X86_SEV_VMSA_FEATURES)` on the system fd failed
    /// (ENXIO: KVM has no SEV support).
    SevAttribute {
        /// Why.
        errno: Errno,
    },
    /// `KVM_CREATE_VM` with the VM type failed.
    CreateVm {
        /// The VM type.
        vm_type: u32,
        /// Why.
        errno: Errno,
    },
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::Kvm { path, errno } => {
                write!(f, "{path} cannot be opened: {errno}")?;
                match errno.code {
                    libc::EACCES | libc::EPERM => write!(
                        f,
                        " (this user may not read and write it: `ls -l {path}` shows who may; \
                         distributions give it to the kvm group)"
                    ),
                    libc::ENOENT => write!(
                        f,
                        " (no KVM here: the kvm module is not loaded, or this is a guest without nested virtualization)"
                    ),
                    _ => Ok(()),
                }
            }
            Missing::ApiVersion { seen, required } => {
                write!(f, "KVM API version is {seen}, {required} is required")
            }
            Missing::VmType {
                vm_type,
                name,
                bitmask,
            } => write!(
                f,
                "VM type {name} ({vm_type}) is not supported: KVM_CAP_VM_TYPES = {bitmask:#x} ({})",
                vm_type_names(*bitmask)
            ),
            Missing::Capability {
                cap,
                name,
                seen,
                required,
            } => write!(f, "{name} ({cap}) = {seen}, but {required} is required"),
            Missing::Device { path, errno } => write!(f, "{path} is not usable: {errno}"),
            Missing::SevAttribute { errno } => write!(
                f,
                "KVM_GET_DEVICE_ATTR(KVM_X86_GRP_SEV, KVM_X86_SEV_VMSA_FEATURES) on {KVM_DEVICE}: {errno} (KVM has no SEV support)"
            ),
            Missing::CreateVm { vm_type, errno } => {
                write!(f, "KVM_CREATE_VM(type {vm_type}) failed: {errno}")
            }
        }
    }
}

/// The names of the VM types in a `KVM_CAP_VM_TYPES` bitmask.
pub fn vm_type_names(bitmask: i32) -> String {
    const NAMES: [&str; 6] = ["DEFAULT", "SW_PROTECTED", "SEV", "SEV_ES", "SNP", "TDX"];
    let names: Vec<String> = (0..32)
        .filter(|b| bitmask >= 0 && (bitmask >> b) & 1 == 1)
        .map(|b| {
            NAMES
                .get(b as usize)
                .map(|n| n.to_string())
                .unwrap_or_else(|| format!("type {b}"))
        })
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// The verdict for one mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModeSupport {
    /// The mode.
    pub mode: Mode,
    /// Whether this host can run it.
    pub supported: bool,
    /// Why not (empty when supported).
    pub missing: Vec<Missing>,
}

/// The capability values read from the system fd (`KVM_CHECK_EXTENSION` on `/dev/kvm`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// `KVM_CAP_VM_TYPES` (235): bitmask of `1 << type`; 0 on kernels without it.
    pub vm_types: i32,
    /// `KVM_CAP_GUEST_MEMFD` (234).
    pub guest_memfd: i32,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS` (244): supported guest_memfd flags.
    pub guest_memfd_flags: i32,
    /// `KVM_CAP_USER_MEMORY2` (231).
    pub user_memory2: i32,
    /// `KVM_CAP_MEMORY_ATTRIBUTES` (233): supported memory attributes for a default VM.
    pub memory_attributes: i32,
    /// `KVM_CAP_X86_USER_SPACE_MSR` (188).
    pub user_space_msr: i32,
    /// `KVM_CAP_EXIT_HYPERCALL` (201): bitmask of hypercalls that can exit to userspace.
    pub exit_hypercall: i32,
    /// `KVM_CAP_SPLIT_IRQCHIP` (121): an in-kernel local APIC without the PIC and IOAPIC.
    pub split_irqchip: i32,
    /// `KVM_CAP_MAX_VCPUS` (66).
    pub max_vcpus: i32,
}

impl Capabilities {
    /// The values of an open `/dev/kvm`.
    pub fn read(kvm: &Kvm) -> Self {
        // kvm-ioctls has no `Cap` for these two.
        let raw = |c: u32| kvm.check_extension_raw(c as libc::c_ulong);
        Self {
            vm_types: raw(KVM_CAP_VM_TYPES),
            guest_memfd: kvm.check_extension_int(Cap::GuestMemfd),
            guest_memfd_flags: raw(KVM_CAP_GUEST_MEMFD_FLAGS),
            user_memory2: kvm.check_extension_int(Cap::UserMemory2),
            memory_attributes: kvm.check_extension_int(Cap::MemoryAttributes),
            user_space_msr: kvm.check_extension_int(Cap::X86UserSpaceMsr),
            exit_hypercall: kvm.check_extension_int(Cap::ExitHypercall),
            split_irqchip: kvm.check_extension_int(Cap::SplitIrqchip),
            max_vcpus: kvm.check_extension_int(Cap::MaxVcpus),
        }
    }

    /// What a VMSA-image VM's RAM is on this host: guest_memfd where it can be created mappable
    /// and shared (`GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED`, Linux 6.18) and put in
    /// a `KVM_SET_USER_MEMORY_REGION2` slot, anonymous memory elsewhere.
    pub fn image_ram(&self) -> RamBacking {
        let flags = (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED) as i32;
        let mappable =
            self.guest_memfd > 0 && self.guest_memfd_flags >= 0 && self.guest_memfd_flags & flags == flags;
        if mappable && self.user_memory2 > 0 {
            RamBacking::GuestMemfd
        } else {
            RamBacking::Anonymous
        }
    }
}

/// The outcome of one probe step that can fail with an errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Probed<T> {
    /// It worked and returned this.
    Ok {
        /// The value.
        value: T,
    },
    /// It failed.
    Err {
        /// Why.
        errno: Errno,
    },
    /// Not attempted (a prerequisite was missing).
    Skipped,
}

impl<T: fmt::Display> fmt::Display for Probed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probed::Ok { value } => write!(f, "{value}"),
            Probed::Err { errno } => write!(f, "error {errno}"),
            Probed::Skipped => f.write_str("not attempted"),
        }
    }
}

impl<T> Probed<T> {
    fn from_result(r: Result<T, Errno>) -> Self {
        match r {
            Ok(value) => Probed::Ok { value },
            Err(errno) => Probed::Err { errno },
        }
    }
}

/// Everything the probe saw and its verdict per mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeReport {
    /// `KVM_GET_API_VERSION`, or the errno of opening `/dev/kvm`.
    pub api_version: Probed<i32>,
    /// Capability values from the system fd; `None` (JSON `null`) when `/dev/kvm` cannot be
    /// opened, so that nothing could be read (zeros would read as "not supported").
    pub caps: Option<Capabilities>,
    /// Opening `/dev/sev` read-write.
    pub sev_device: Probed<&'static str>,
    /// `KVM_X86_SEV_VMSA_FEATURES`: the SEV_FEATURES KVM supports.
    pub sev_vmsa_features: Probed<u64>,
    /// The control attribute `KVM_X86_XCOMP_GUEST_SUPP`, read the same way: if this works and
    /// the SEV attribute does not, the SEV attribute's errno is KVM's answer, not a broken
    /// ioctl.
    pub xcomp_guest_supp: Probed<u64>,
    /// Creating (and dropping) a `KVM_X86_SNP_VM`.
    pub snp_vm_create: Probed<&'static str>,
    /// The verdict per mode: SNP, SEV-ES, VMSA-image.
    pub modes: Vec<ModeSupport>,
    /// What a VMSA-image VM's RAM would be here ([`Capabilities::image_ram`]); `None` when
    /// the capabilities could not be read.
    pub image_ram: Option<RamBacking>,
    /// Whether this kernel takes supplied VMSAs (see [`SuppliedVmsaProbe`]).
    pub supplied_vmsa: SuppliedVmsaProbe,
}

/// Whether this kernel takes a VMSA supplied by user space at launch (`SNP_LAUNCH_UPDATE` of
/// page type 2, `KVM_SEV_SNP_PAGE_TYPE_VMSA`, the "Streamline VMSA setting" series' 4/4 "kvm:
/// svm: Support KVM_SEV_SNP_PAGE_TYPE_VMSA at SNP_LAUNCH_UPDATE").
///
/// How the probe decides: the kernel must say so, and no kernel does. Mainline's uapi has no
/// `KVM_SEV_SNP_PAGE_TYPE_VMSA` and no capability for it, and `snp_launch_update` refuses type
/// 2 with `EINVAL`; the series is not merged and names no capability the probe could read. The
/// probe does not try an `SNP_LAUNCH_UPDATE` of type 2 to find out: that needs a started SNP
/// launch (an ASID and a firmware context) only to read an `EINVAL`. So the answer is no,
/// with the reason (no SEV-SNP at all here, or a kernel without the series).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SuppliedVmsaProbe {
    /// Whether SNP mode may send page type VMSA.
    pub supported: bool,
    /// Why (or why not).
    pub reason: &'static str,
}

impl SuppliedVmsaProbe {
    /// The verdict, from whether SEV-SNP runs here at all.
    pub fn decide(snp_supported: bool) -> Self {
        let reason = if snp_supported {
            "no: this kernel advertises no KVM_SEV_SNP_PAGE_TYPE_VMSA (mainline has none: snp_launch_update refuses page type 2 with EINVAL; the series' 4/4 is not merged)"
        } else {
            "no: SEV-SNP is not available here (see the SNP mode's reasons), so no SNP_LAUNCH_UPDATE at all"
        };
        Self {
            supported: false,
            reason,
        }
    }
}

impl ProbeReport {
    /// The verdict for `mode`.
    pub fn mode(&self, mode: Mode) -> Option<&ModeSupport> {
        self.modes.iter().find(|m| m.mode == mode)
    }

    /// Whether `mode` can run here.
    pub fn supports(&self, mode: Mode) -> bool {
        self.mode(mode).is_some_and(|m| m.supported)
    }

    /// Why `mode` cannot run here (empty if it can).
    pub fn missing(&self, mode: Mode) -> &[Missing] {
        self.mode(mode).map(|m| m.missing.as_slice()).unwrap_or(&[])
    }

    /// The mode a run should use: SNP where the host has it, else VMSA-image; `None` if
    /// neither works.
    pub fn best_mode(&self) -> Option<Mode> {
        [Mode::Snp, Mode::VmsaImage]
            .into_iter()
            .find(|m| self.supports(*m))
    }
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "KVM host probe")?;
        match self.api_version {
            Probed::Err { errno } => writeln!(f, "  {KVM_DEVICE}: cannot be opened: {errno}")?,
            other => writeln!(f, "  {KVM_DEVICE}: API version {other}")?,
        }
        match &self.caps {
            None => writeln!(f, "  KVM capabilities: not read ({KVM_DEVICE} cannot be opened)")?,
            Some(c) => {
                writeln!(
                    f,
                    "  KVM_CAP_VM_TYPES = {:#x} ({})",
                    c.vm_types,
                    vm_type_names(c.vm_types)
                )?;
                writeln!(
                    f,
                    "  KVM_CAP_GUEST_MEMFD = {}, KVM_CAP_GUEST_MEMFD_FLAGS = {:#x}, KVM_CAP_USER_MEMORY2 = {}, KVM_CAP_MEMORY_ATTRIBUTES = {:#x}",
                    c.guest_memfd, c.guest_memfd_flags, c.user_memory2, c.memory_attributes
                )?;
                writeln!(
                    f,
                    "  KVM_CAP_X86_USER_SPACE_MSR = {}, KVM_CAP_EXIT_HYPERCALL = {:#x}, KVM_CAP_SPLIT_IRQCHIP = {}, KVM_CAP_MAX_VCPUS = {}",
                    c.user_space_msr, c.exit_hypercall, c.split_irqchip, c.max_vcpus
                )?;
            }
        }
        writeln!(f, "  {SEV_DEVICE}: {}", self.sev_device)?;
        match self.sev_vmsa_features {
            Probed::Ok { value } => writeln!(f, "  KVM_X86_SEV_VMSA_FEATURES = {value:#x}")?,
            other => writeln!(f, "  KVM_X86_SEV_VMSA_FEATURES: {other}")?,
        }
        match self.xcomp_guest_supp {
            Probed::Ok { value } => writeln!(f, "  KVM_X86_XCOMP_GUEST_SUPP (control) = {value:#x}")?,
            other => writeln!(f, "  KVM_X86_XCOMP_GUEST_SUPP (control): {other}")?,
        }
        writeln!(f, "  KVM_CREATE_VM(KVM_X86_SNP_VM): {}", self.snp_vm_create)?;
        writeln!(
            f,
            "  supplied VMSAs (SNP_LAUNCH_UPDATE page type VMSA): {}",
            self.supplied_vmsa.reason
        )?;
        writeln!(f, "Modes")?;
        for m in &self.modes {
            if m.supported {
                match (m.mode, self.image_ram) {
                    (Mode::VmsaImage, Some(ram)) => {
                        writeln!(f, "  {}: supported, guest RAM in {ram}", m.mode)?
                    }
                    _ => writeln!(f, "  {}: supported", m.mode)?,
                }
            } else {
                writeln!(f, "  {}: not supported", m.mode)?;
                for why in &m.missing {
                    writeln!(f, "    - {why}")?;
                }
            }
        }
        match self.best_mode() {
            Some(mode) => write!(f, "A run uses {mode} mode."),
            None => write!(f, "No mode of this backend can run on this host."),
        }
    }
}

/// Whether the `KVM_CAP_VM_TYPES` bitmask `vm_types` (negative: the ioctl failed) lists
/// `vm_type`.
fn vm_type_listed(vm_types: i32, vm_type: u32) -> bool {
    vm_types >= 0 && vm_type < 32 && vm_types & (1 << vm_type) != 0
}

/// Probe the host's KVM. Never fails: an unusable `/dev/kvm` is itself a reason in the
/// report.
pub fn probe() -> ProbeReport {
    match Kvm::new() {
        Ok(kvm) => probe_with(&kvm),
        Err(e) => unusable(Errno::from(e), probe_sev_device()),
    }
}

/// The report where opening `/dev/kvm` failed with `errno`: nothing of KVM could be read, and
/// every mode misses it.
fn unusable(errno: Errno, sev_device: Probed<&'static str>) -> ProbeReport {
    let missing = vec![Missing::Kvm {
        path: KVM_DEVICE,
        errno,
    }];
    ProbeReport {
        api_version: Probed::Err { errno },
        caps: None,
        sev_device,
        sev_vmsa_features: Probed::Skipped,
        xcomp_guest_supp: Probed::Skipped,
        snp_vm_create: Probed::Skipped,
        modes: [Mode::Snp, Mode::SevEs, Mode::VmsaImage]
            .into_iter()
            .map(|mode| ModeSupport {
                mode,
                supported: false,
                missing: missing.clone(),
            })
            .collect(),
        image_ram: None,
        supplied_vmsa: SuppliedVmsaProbe::decide(false),
    }
}

/// Read a `u64` system attribute through `KVM_GET_DEVICE_ATTR` on the `/dev/kvm` fd.
pub fn system_attr(kvm: &Kvm, group: u32, attr: u64) -> Result<u64, Errno> {
    let mut value: u64 = 0;
    let dev_attr = kvm_device_attr {
        flags: 0,
        group,
        attr,
        addr: &mut value as *mut u64 as u64,
    };
    // SAFETY: `kvm` is an open /dev/kvm fd; KVM_GET_DEVICE_ATTR reads the 24-byte
    // `kvm_device_attr` we pass by reference and writes at most 8 bytes (a u64 attribute) to
    // `addr`, which points at `value`, a live local that outlives the call.
    let ret = unsafe { ioctl_with_ref(kvm, KVM_GET_DEVICE_ATTR(), &dev_attr) };
    if ret < 0 {
        return Err(Errno::last());
    }
    Ok(value)
}

fn probe_sev_device() -> Probed<&'static str> {
    match OpenOptions::new().read(true).write(true).open(SEV_DEVICE) {
        Ok(file) => {
            // Only the ability to open it matters here.
            let _ = file.as_raw_fd();
            Probed::Ok { value: "present" }
        }
        Err(e) => Probed::Err {
            errno: Errno::from(&e),
        },
    }
}

/// Probe through an already open `Kvm`.
pub fn probe_with(kvm: &Kvm) -> ProbeReport {
    let api = kvm.get_api_version();
    let caps = Capabilities::read(kvm);
    let sev_device = probe_sev_device();
    let sev_vmsa_features = Probed::from_result(system_attr(
        kvm,
        KVM_X86_GRP_SEV,
        u64::from(KVM_X86_SEV_VMSA_FEATURES),
    ));
    let xcomp_guest_supp = Probed::from_result(system_attr(
        kvm,
        KVM_X86_GRP_SYSTEM,
        u64::from(KVM_X86_XCOMP_GUEST_SUPP),
    ));
    // Creating an SNP VM tells more than the capabilities only where they list the type
    // (firmware not initialized, SNP off in the BIOS, no ASID left). Where KVM_CAP_VM_TYPES
    // lacks it, kvm_arch_init_vm refuses it with EINVAL for certain (`kvm_is_vm_type_supported`,
    // arch/x86/kvm/x86.c): the trial would only add 30-50 µs to every `vmm run` there.
    let snp_vm_create = if vm_type_listed(caps.vm_types, KVM_X86_SNP_VM) {
        Probed::from_result(
            kvm.create_vm_with_type(u64::from(KVM_X86_SNP_VM))
                .map(|vm| {
                    drop(vm);
                    "created"
                })
                .map_err(Errno::from),
        )
    } else {
        Probed::Skipped
    };
    let facts = Facts {
        api,
        caps,
        sev_device,
        sev_vmsa_features,
        snp_vm_create,
    };
    let modes = facts.verdicts();
    let snp = modes.iter().any(|m| m.mode == Mode::Snp && m.supported);
    ProbeReport {
        api_version: Probed::Ok { value: api },
        caps: Some(caps),
        sev_device,
        sev_vmsa_features,
        xcomp_guest_supp,
        snp_vm_create,
        modes,
        image_ram: Some(caps.image_ram()),
        supplied_vmsa: SuppliedVmsaProbe::decide(snp),
    }
}

/// The facts the verdicts are computed from (separate, so the rules are unit-testable).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Facts {
    pub api: i32,
    pub caps: Capabilities,
    pub sev_device: Probed<&'static str>,
    pub sev_vmsa_features: Probed<u64>,
    pub snp_vm_create: Probed<&'static str>,
}

impl Facts {
    pub fn verdicts(&self) -> Vec<ModeSupport> {
        [Mode::Snp, Mode::SevEs, Mode::VmsaImage]
            .into_iter()
            .map(|mode| {
                let missing = self.missing(mode);
                ModeSupport {
                    mode,
                    supported: missing.is_empty(),
                    missing,
                }
            })
            .collect()
    }

    fn missing(&self, mode: Mode) -> Vec<Missing> {
        let mut out = Vec::new();
        let c = &self.caps;
        // KVM_API_VERSION is 12 and has never changed.
        let required = KVM_API_VERSION as i32;
        if self.api != required {
            out.push(Missing::ApiVersion {
                seen: self.api,
                required,
            });
        }
        let vm_type = |out: &mut Vec<Missing>, vm_type: u32, name| {
            if !vm_type_listed(c.vm_types, vm_type) {
                out.push(Missing::VmType {
                    vm_type,
                    name,
                    bitmask: c.vm_types,
                });
            }
        };
        let need = |out: &mut Vec<Missing>, cap, name, seen: i32, ok: bool, required| {
            if !ok {
                out.push(Missing::Capability {
                    cap,
                    name,
                    seen,
                    required,
                });
            }
        };
        let nonzero = |out: &mut Vec<Missing>, cap, name, seen: i32| {
            need(out, cap, name, seen, seen > 0, "a non-zero value");
        };
        let sev = |out: &mut Vec<Missing>| {
            if let Probed::Err { errno } = self.sev_device {
                out.push(Missing::Device {
                    path: SEV_DEVICE,
                    errno,
                });
            }
            if let Probed::Err { errno } = self.sev_vmsa_features {
                out.push(Missing::SevAttribute { errno });
            }
        };
        match mode {
            Mode::Snp => {
                vm_type(&mut out, KVM_X86_SNP_VM, "KVM_X86_SNP_VM");
                sev(&mut out);
                nonzero(
                    &mut out,
                    KVM_CAP_GUEST_MEMFD,
                    "KVM_CAP_GUEST_MEMFD",
                    c.guest_memfd,
                );
                nonzero(
                    &mut out,
                    KVM_CAP_USER_MEMORY2,
                    "KVM_CAP_USER_MEMORY2",
                    c.user_memory2,
                );
                need(
                    &mut out,
                    KVM_CAP_EXIT_HYPERCALL,
                    "KVM_CAP_EXIT_HYPERCALL",
                    c.exit_hypercall,
                    c.exit_hypercall > 0 && (c.exit_hypercall >> KVM_HC_MAP_GPA_RANGE) & 1 == 1,
                    "bit 12 (KVM_HC_MAP_GPA_RANGE)",
                );
                if let Probed::Err { errno } = self.snp_vm_create {
                    out.push(Missing::CreateVm {
                        vm_type: KVM_X86_SNP_VM,
                        errno,
                    });
                }
            }
            Mode::SevEs => {
                vm_type(&mut out, KVM_X86_SEV_ES_VM, "KVM_X86_SEV_ES_VM");
                sev(&mut out);
            }
            Mode::VmsaImage => {
                // Kernels without KVM_CAP_VM_TYPES still have the default type. Its RAM needs
                // no capability: guest_memfd where mappable, anonymous memory elsewhere
                // (`Capabilities::image_ram`).
                if c.vm_types > 0 {
                    vm_type(&mut out, KVM_X86_DEFAULT_VM, "KVM_X86_DEFAULT_VM");
                }
                need(
                    &mut out,
                    KVM_CAP_X86_USER_SPACE_MSR,
                    "KVM_CAP_X86_USER_SPACE_MSR",
                    c.user_space_msr,
                    c.user_space_msr > 0,
                    "a non-zero value (the GHCB doorbell is a userspace MSR exit)",
                );
                need(
                    &mut out,
                    KVM_CAP_SPLIT_IRQCHIP,
                    "KVM_CAP_SPLIT_IRQCHIP",
                    c.split_irqchip,
                    c.split_irqchip > 0,
                    "a non-zero value (each vCPU has an in-kernel local APIC, as an SNP guest's has)",
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_like() -> Facts {
        Facts {
            api: 12,
            caps: Capabilities {
                vm_types: 1,
                guest_memfd: 1,
                guest_memfd_flags: 3,
                user_memory2: 1,
                memory_attributes: 0,
                user_space_msr: 1,
                exit_hypercall: 4096,
                split_irqchip: 1,
                max_vcpus: 1024,
            },
            sev_device: Probed::Err {
                errno: Errno::new(libc::ENOENT),
            },
            sev_vmsa_features: Probed::Err {
                errno: Errno::new(libc::ENXIO),
            },
            snp_vm_create: Probed::Err {
                errno: Errno::new(libc::EINVAL),
            },
        }
    }

    /// A /dev/kvm this user may not open was reported as "API version error EACCES" followed
    /// by every capability as 0 ("KVM_CAP_VM_TYPES = 0x0 (none)", `"vm_types": 0` in JSON):
    /// values never read, shown as a host without them.
    #[test]
    fn capabilities_of_a_kvm_that_cannot_be_opened_are_unknown_not_zero() {
        let r = unusable(
            Errno::new(libc::EACCES),
            Probed::Err {
                errno: Errno::new(libc::ENOENT),
            },
        );
        let text = r.to_string();
        assert!(
            text.contains("  /dev/kvm: cannot be opened: EACCES (13): Permission denied\n"),
            "{text}"
        );
        assert!(
            text.contains("  KVM capabilities: not read (/dev/kvm cannot be opened)\n"),
            "{text}"
        );
        assert!(!text.contains("KVM_CAP_"), "{text}");
        // Every mode says why, and what to look at.
        assert!(
            text.contains(
                "    - /dev/kvm cannot be opened: EACCES (13): Permission denied (this user may not read and write \
                 it: `ls -l /dev/kvm` shows who may; distributions give it to the kvm group)\n"
            ),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert!(json["caps"].is_null() && json["image_ram"].is_null(), "{json}");
        assert!(!text.contains("guest RAM"), "{text}");
        assert!(r.modes.iter().all(|m| !m.supported));
        assert_eq!(r.best_mode(), None);
    }

    #[test]
    fn no_kernel_is_probed_as_taking_supplied_vmsas() {
        for snp in [false, true] {
            let v = SuppliedVmsaProbe::decide(snp);
            assert!(!v.supported);
            assert!(v.reason.starts_with("no: "), "{}", v.reason);
        }
        assert!(
            SuppliedVmsaProbe::decide(true)
                .reason
                .contains("snp_launch_update")
        );
    }

    #[test]
    fn a_host_without_sev_gets_every_reason() {
        let modes = host_like().verdicts();
        let snp = &modes[0];
        assert_eq!(snp.mode, Mode::Snp);
        assert!(!snp.supported);
        assert_eq!(
            snp.missing,
            vec![
                Missing::VmType {
                    vm_type: 4,
                    name: "KVM_X86_SNP_VM",
                    bitmask: 1
                },
                Missing::Device {
                    path: "/dev/sev",
                    errno: Errno::new(libc::ENOENT)
                },
                Missing::SevAttribute {
                    errno: Errno::new(libc::ENXIO)
                },
                Missing::CreateVm {
                    vm_type: 4,
                    errno: Errno::new(libc::EINVAL)
                },
            ]
        );
        assert!(!modes[1].supported);
        assert!(modes[2].supported, "{:?}", modes[2]);
        let text = snp.missing[0].to_string();
        assert_eq!(
            text,
            "VM type KVM_X86_SNP_VM (4) is not supported: KVM_CAP_VM_TYPES = 0x1 (DEFAULT)"
        );
    }

    #[test]
    fn snp_host_is_supported_and_vmsa_image_runs_without_a_mappable_guest_memfd() {
        let mut f = host_like();
        f.caps.vm_types = 0b11101;
        f.sev_device = Probed::Ok { value: "present" };
        f.sev_vmsa_features = Probed::Ok { value: 0x20 };
        f.snp_vm_create = Probed::Ok { value: "created" };
        f.caps.guest_memfd_flags = 0;
        let modes = f.verdicts();
        assert!(modes[0].supported, "{:?}", modes[0]);
        assert!(modes[1].supported);
        assert!(modes[2].supported, "{:?}", modes[2]);
        assert_eq!(f.caps.image_ram(), RamBacking::Anonymous);
    }

    /// VMSA-image VMs get a split irqchip; a KVM without one (before 4.5) cannot run them, and
    /// says so.
    #[test]
    fn vmsa_image_needs_a_split_irqchip() {
        let mut f = host_like();
        f.caps.split_irqchip = 0;
        let image = &f.verdicts()[2];
        assert!(!image.supported);
        assert_eq!(
            image.missing,
            vec![Missing::Capability {
                cap: KVM_CAP_SPLIT_IRQCHIP,
                name: "KVM_CAP_SPLIT_IRQCHIP",
                seen: 0,
                required: "a non-zero value (each vCPU has an in-kernel local APIC, as an SNP guest's has)",
            }]
        );
    }

    /// A kernel without guest_memfd (before 6.8, or built without CONFIG_KVM_GUEST_MEMFD, where
    /// KVM_CREATE_GUEST_MEMFD is ENOTTY) or without both of its flags (before 6.18) still runs
    /// VMSA-image VMs, from anonymous memory; only a mappable, shared guest_memfd in a
    /// KVM_SET_USER_MEMORY_REGION2 slot is used as guest_memfd.
    #[test]
    fn vmsa_image_ram_is_guest_memfd_only_where_it_can_be_mapped_shared() {
        let full = host_like().caps;
        assert_eq!(full.image_ram(), RamBacking::GuestMemfd);
        let without = |change: fn(&mut Capabilities)| {
            let mut f = host_like();
            change(&mut f.caps);
            assert!(f.verdicts()[2].supported, "{:?}", f.caps);
            f.caps.image_ram()
        };
        assert_eq!(without(|c| c.guest_memfd = 0), RamBacking::Anonymous);
        assert_eq!(without(|c| c.guest_memfd_flags = 1), RamBacking::Anonymous);
        assert_eq!(without(|c| c.guest_memfd_flags = 2), RamBacking::Anonymous);
        assert_eq!(without(|c| c.guest_memfd_flags = -22), RamBacking::Anonymous);
        assert_eq!(without(|c| c.user_memory2 = 0), RamBacking::Anonymous);
        assert_eq!(
            without(|c| {
                c.guest_memfd = 0;
                c.guest_memfd_flags = 0;
                c.user_memory2 = 0;
            }),
            RamBacking::Anonymous
        );
    }

    #[test]
    fn vm_type_names_decode_the_bitmask() {
        assert_eq!(vm_type_names(1), "DEFAULT");
        assert_eq!(vm_type_names(0b11101), "DEFAULT, SEV, SEV_ES, SNP");
        assert_eq!(vm_type_names(0), "none");
        assert_eq!(vm_type_names(-22), "none");
        assert_eq!(vm_type_names(1 << 7), "type 7");
    }
}
