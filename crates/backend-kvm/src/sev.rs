//! Typed `KVM_MEMORY_ENCRYPT_OP` commands for SEV-SNP (and SEV-ES's `LAUNCH_UPDATE_VMSA`).
//!
//! kvm-ioctls' `VmFd::encrypt_op_sev` takes a raw `kvm_sev_cmd` whose `data` is a user pointer
//! the kernel reads and writes back. Nothing outside this module ever builds a `kvm_sev_cmd`:
//! each command is a method of [`SevVm`] that borrows its sub-struct for exactly the duration
//! of the ioctl, and every failure becomes a [`SevError`] naming the command, the errno and
//! the firmware status (`kvm_sev_cmd.error`).
//!
//! Layouts and numbers: Linux uapi `include/uapi/linux/kvm.h` and
//! `arch/x86/include/uapi/asm/kvm.h`; the structs come from kvm-bindings 0.14 and their sizes and offsets are
//! checked by the tests below. **Untested on SNP hardware here**: the development hosts have
//! no SEV (see the probe); only the layouts, the command mapping and the refusal path run.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;

use kvm_bindings::{
    KVM_SEV_SNP_PAGE_TYPE_CPUID, KVM_SEV_SNP_PAGE_TYPE_NORMAL, KVM_SEV_SNP_PAGE_TYPE_SECRETS,
    KVM_SEV_SNP_PAGE_TYPE_UNMEASURED, KVM_SEV_SNP_PAGE_TYPE_ZERO, kvm_sev_cmd, kvm_sev_init,
    kvm_sev_snp_launch_finish, kvm_sev_snp_launch_start, kvm_sev_snp_launch_update, sev_cmd_id_KVM_SEV_INIT2,
    sev_cmd_id_KVM_SEV_LAUNCH_UPDATE_VMSA, sev_cmd_id_KVM_SEV_SNP_LAUNCH_FINISH,
    sev_cmd_id_KVM_SEV_SNP_LAUNCH_START, sev_cmd_id_KVM_SEV_SNP_LAUNCH_UPDATE,
};
use kvm_ioctls::VmFd;
use serde::Serialize;
use vmsa_core::{SNP_POLICY_RSVD_MBO, SevStatus};

use crate::error::Errno;
use crate::uapi::{
    KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MAP_GPA_RANGE_PAGE_SZ_1G, KVM_MAP_GPA_RANGE_PAGE_SZ_2M, SEV_DEVICE,
};

/// The `KVM_MEMORY_ENCRYPT_OP` commands this backend issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum SevCommand {
    /// `KVM_SEV_LAUNCH_UPDATE_VMSA` (4): SEV-ES only; refused (`EPERM`) on SNP VMs.
    LaunchUpdateVmsa,
    /// `KVM_SEV_INIT2` (22).
    Init2,
    /// `KVM_SEV_SNP_LAUNCH_START` (100).
    SnpLaunchStart,
    /// `KVM_SEV_SNP_LAUNCH_UPDATE` (101).
    SnpLaunchUpdate,
    /// `KVM_SEV_SNP_LAUNCH_FINISH` (102): also syncs, encrypts and measures every vCPU's VMSA.
    SnpLaunchFinish,
}

impl SevCommand {
    /// Every command, in id order.
    pub const ALL: [SevCommand; 5] = [
        SevCommand::LaunchUpdateVmsa,
        SevCommand::Init2,
        SevCommand::SnpLaunchStart,
        SevCommand::SnpLaunchUpdate,
        SevCommand::SnpLaunchFinish,
    ];

    /// The `sev_cmd_id` value.
    pub const fn id(self) -> u32 {
        match self {
            SevCommand::LaunchUpdateVmsa => sev_cmd_id_KVM_SEV_LAUNCH_UPDATE_VMSA,
            SevCommand::Init2 => sev_cmd_id_KVM_SEV_INIT2,
            SevCommand::SnpLaunchStart => sev_cmd_id_KVM_SEV_SNP_LAUNCH_START,
            SevCommand::SnpLaunchUpdate => sev_cmd_id_KVM_SEV_SNP_LAUNCH_UPDATE,
            SevCommand::SnpLaunchFinish => sev_cmd_id_KVM_SEV_SNP_LAUNCH_FINISH,
        }
    }

    /// The uapi name.
    pub const fn name(self) -> &'static str {
        match self {
            SevCommand::LaunchUpdateVmsa => "KVM_SEV_LAUNCH_UPDATE_VMSA",
            SevCommand::Init2 => "KVM_SEV_INIT2",
            SevCommand::SnpLaunchStart => "KVM_SEV_SNP_LAUNCH_START",
            SevCommand::SnpLaunchUpdate => "KVM_SEV_SNP_LAUNCH_UPDATE",
            SevCommand::SnpLaunchFinish => "KVM_SEV_SNP_LAUNCH_FINISH",
        }
    }

    /// The command with this id, if this backend issues it.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.id() == id)
    }
}

impl fmt::Display for SevCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.id())
    }
}

/// `SNP_LAUNCH_UPDATE` page types KVM accepts from userspace (`KVM_SEV_SNP_PAGE_TYPE_*`).
/// There is no VMSA type: KVM launches the VMSAs itself in `SNP_LAUNCH_FINISH`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum SnpLaunchPage {
    /// Measured and encrypted data.
    Normal,
    /// Zeroed by the firmware; takes no contents.
    Zero,
    /// Encrypted, not measured.
    Unmeasured,
    /// The secrets page.
    Secrets,
    /// The CPUID page.
    Cpuid,
    /// The BSP's VMSA, supplied by user space ([`crate::uapi::KVM_SEV_SNP_PAGE_TYPE_VMSA`]); only
    /// a kernel with the series' 4/4 takes it.
    Vmsa,
}

impl SnpLaunchPage {
    /// The uapi value.
    pub const fn raw(self) -> u8 {
        (match self {
            SnpLaunchPage::Normal => KVM_SEV_SNP_PAGE_TYPE_NORMAL,
            SnpLaunchPage::Zero => KVM_SEV_SNP_PAGE_TYPE_ZERO,
            SnpLaunchPage::Unmeasured => KVM_SEV_SNP_PAGE_TYPE_UNMEASURED,
            SnpLaunchPage::Secrets => KVM_SEV_SNP_PAGE_TYPE_SECRETS,
            SnpLaunchPage::Cpuid => KVM_SEV_SNP_PAGE_TYPE_CPUID,
            SnpLaunchPage::Vmsa => crate::uapi::KVM_SEV_SNP_PAGE_TYPE_VMSA,
        }) as u8
    }

    /// The KVM page type for a vmsa-core page type (the same numbers). Whether the kernel
    /// takes [`SnpLaunchPage::Vmsa`] is the SNP host layer's question (it asks the probe).
    pub fn from_core(t: vmsa_core::SnpPageType) -> Option<Self> {
        use vmsa_core::SnpPageType as T;
        Some(match t {
            T::Normal => SnpLaunchPage::Normal,
            T::Vmsa => SnpLaunchPage::Vmsa,
            T::Zero => SnpLaunchPage::Zero,
            T::Unmeasured => SnpLaunchPage::Unmeasured,
            T::Secrets => SnpLaunchPage::Secrets,
            T::Cpuid => SnpLaunchPage::Cpuid,
        })
    }
}

/// A failed SEV command or a refused argument.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
pub enum SevError {
    /// `/dev/sev` could not be opened.
    #[error("cannot open {SEV_DEVICE}: {errno}")]
    Device {
        /// Why.
        errno: Errno,
    },
    /// The ioctl failed.
    #[error("KVM_MEMORY_ENCRYPT_OP {cmd} failed with {errno}, {}", describe_fw_error(*.fw_error))]
    Command {
        /// The command.
        cmd: SevCommand,
        /// The ioctl's errno.
        errno: Errno,
        /// `kvm_sev_cmd.error`: the SEV firmware status (0 if the firmware was not reached or
        /// succeeded); [`SevError::firmware_status`] names it.
        fw_error: u32,
    },
    /// An argument broke a rule before anything was sent.
    #[error("{cmd}: {rule}")]
    Argument {
        /// The command.
        cmd: SevCommand,
        /// The rule.
        rule: &'static str,
    },
    /// `SNP_LAUNCH_UPDATE` stopped making progress.
    #[error("{cmd}: no progress at gfn {gfn:#x} with {left:#x} bytes left")]
    Stalled {
        /// The command.
        cmd: SevCommand,
        /// Where it stopped.
        gfn: u64,
        /// Bytes not yet added.
        left: u64,
    },
}

impl SevError {
    /// The firmware status, if the command reached the firmware and it refused.
    pub fn firmware_status(&self) -> Option<SevStatus> {
        match self {
            Self::Command { fw_error, .. } => SevStatus::from_code(*fw_error),
            _ => None,
        }
    }
}

/// `kvm_sev_cmd.error` in words: the `SEV_RET_*` name when the code is one.
fn describe_fw_error(code: u32) -> String {
    match SevStatus::from_code(code) {
        Some(status) => format!("firmware {status}"),
        None if code == 0 => "no firmware status (0)".to_string(),
        None => format!("unknown firmware status {code:#x}"),
    }
}

/// The SEV firmware device (`/dev/sev`), whose fd every command carries.
#[derive(Debug)]
pub struct SevFirmware {
    file: File,
}

impl SevFirmware {
    /// Open `/dev/sev` read-write.
    pub fn open() -> Result<Self, SevError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(SEV_DEVICE)
            .map(|file| Self { file })
            .map_err(|e| SevError::Device {
                errno: Errno::from(&e),
            })
    }
}

/// A VM fd together with the firmware device: the receiver of every typed SEV command.
#[derive(Debug, Clone, Copy)]
pub struct SevVm<'a> {
    vm: &'a VmFd,
    fw: &'a SevFirmware,
}

impl<'a> SevVm<'a> {
    /// Commands for `vm` through `fw`.
    pub fn new(vm: &'a VmFd, fw: &'a SevFirmware) -> Self {
        Self { vm, fw }
    }

    /// Issue `cmd` with `data` (borrowed mutably for the call; the kernel may write it back).
    fn issue<T>(&self, cmd: SevCommand, data: Option<&mut T>) -> Result<(), SevError> {
        let mut sev_cmd = sev_command(cmd, data, self.fw.file.as_raw_fd() as u32);
        self.vm
            .encrypt_op_sev(&mut sev_cmd)
            .map_err(|e| SevError::Command {
                cmd,
                errno: Errno::from(e),
                fw_error: sev_cmd.error,
            })
    }

    /// `KVM_SEV_INIT2`: initialise the SEV context of a `KVM_X86_SNP_VM` (or SEV/SEV-ES VM)
    /// with the SEV_FEATURES every VMSA carries (`SNP_ACTIVE` is added by KVM and refused
    /// here) and a GHCB version (0 = KVM's default, 2).
    pub fn init2(&self, vmsa_features: u64, ghcb_version: u16) -> Result<(), SevError> {
        if vmsa_features & vmsa_core::layout::SEV_FEAT_SNP_ACTIVE != 0 {
            return Err(SevError::Argument {
                cmd: SevCommand::Init2,
                rule: "SNP_ACTIVE is set by KVM; userspace must not pass it in vmsa_features",
            });
        }
        let mut init = kvm_sev_init {
            vmsa_features,
            ghcb_version,
            ..Default::default()
        };
        self.issue(SevCommand::Init2, Some(&mut init))
    }

    /// `KVM_SEV_SNP_LAUNCH_START` with `policy` (bit 17 must be set) and `gosvw`.
    pub fn snp_launch_start(&self, policy: u64, gosvw: [u8; 16]) -> Result<(), SevError> {
        if policy & SNP_POLICY_RSVD_MBO == 0 {
            return Err(SevError::Argument {
                cmd: SevCommand::SnpLaunchStart,
                rule: "the SNP policy must have bit 17 (reserved, must be one) set",
            });
        }
        let mut start = kvm_sev_snp_launch_start {
            policy,
            gosvw,
            ..Default::default()
        };
        self.issue(SevCommand::SnpLaunchStart, Some(&mut start))
    }

    /// `KVM_SEV_SNP_LAUNCH_UPDATE` of the guest frames from `gfn_start` on: copy `src` into
    /// their guest_memfd pages, make them private and measure them as `page_type`. `src` is
    /// `None` exactly for ZERO pages, which take `pages` frames of nothing. Partial progress
    /// reported by KVM is continued until the whole range is in.
    pub fn snp_launch_update(
        &self,
        gfn_start: u64,
        src: Option<&[u8]>,
        pages: u64,
        page_type: SnpLaunchPage,
    ) -> Result<(), SevError> {
        let cmd = SevCommand::SnpLaunchUpdate;
        let arg = |rule| Err(SevError::Argument { cmd, rule });
        if pages == 0 {
            return arg("the range must not be empty");
        }
        let len = pages.checked_mul(4096).ok_or(SevError::Argument {
            cmd,
            rule: "the range overflows",
        })?;
        let uaddr = match (page_type, src) {
            (SnpLaunchPage::Zero, None) => 0,
            (SnpLaunchPage::Zero, Some(_)) => return arg("ZERO pages take no contents"),
            (_, None) => return arg("contents are required for all but ZERO pages"),
            (_, Some(s)) if s.len() as u64 != len => {
                return arg("the contents must be exactly pages * 4096 bytes");
            }
            (_, Some(s)) if !(s.as_ptr() as u64).is_multiple_of(4096) => {
                return arg("the contents must be page aligned in host memory");
            }
            (_, Some(s)) => s.as_ptr() as u64,
        };
        let mut update = kvm_sev_snp_launch_update {
            gfn_start,
            uaddr,
            len,
            type_: page_type.raw(),
            ..Default::default()
        };
        while update.len > 0 {
            let before = update.len;
            // The kernel reads `uaddr` (only during the ioctl) and writes the remaining range
            // back into `update`; `src` outlives the loop.
            self.issue(cmd, Some(&mut update))?;
            if update.len >= before {
                return Err(SevError::Stalled {
                    cmd,
                    gfn: update.gfn_start,
                    left: update.len,
                });
            }
        }
        Ok(())
    }

    /// `KVM_SEV_SNP_LAUNCH_FINISH` without an ID block: KVM syncs, makes private and launches
    /// every vCPU's VMSA (in index order), then finishes the launch with `host_data`.
    pub fn snp_launch_finish(&self, host_data: [u8; 32]) -> Result<(), SevError> {
        let mut finish = kvm_sev_snp_launch_finish {
            host_data,
            ..Default::default()
        };
        self.issue(SevCommand::SnpLaunchFinish, Some(&mut finish))
    }

    /// `KVM_SEV_LAUNCH_UPDATE_VMSA` (SEV-ES): encrypt every vCPU's VMSA. Takes no data.
    pub fn launch_update_vmsa(&self) -> Result<(), SevError> {
        self.issue::<u8>(SevCommand::LaunchUpdateVmsa, None)
    }
}

/// The raw command for `cmd` pointing at `data` (or NULL).
fn sev_command<T>(cmd: SevCommand, data: Option<&mut T>, sev_fd: u32) -> kvm_sev_cmd {
    kvm_sev_cmd {
        id: cmd.id(),
        data: data.map(|d| d as *mut T as u64).unwrap_or(0),
        sev_fd,
        ..Default::default()
    }
}

/// A decoded `KVM_HC_MAP_GPA_RANGE` hypercall (an SNP guest's page-state change, forwarded by
/// KVM when `KVM_CAP_EXIT_HYPERCALL` has bit 12).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MapGpaRange {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Convert to private (`KVM_MAP_GPA_RANGE_ENCRYPTED`) or to shared.
    pub private: bool,
}

impl MapGpaRange {
    /// Decode the hypercall arguments: `args[0]` GPA, `args[1]` number of 4 KiB pages,
    /// `args[2]` attributes (page size bits and ENCRYPTED).
    pub fn decode(args: &[u64; 6]) -> Result<Self, &'static str> {
        let [gpa, npages, attrs, ..] = *args;
        if !gpa.is_multiple_of(4096) {
            return Err("the GPA is not 4 KiB aligned");
        }
        if npages == 0 {
            return Err("the range is empty");
        }
        let known = KVM_MAP_GPA_RANGE_PAGE_SZ_2M | KVM_MAP_GPA_RANGE_PAGE_SZ_1G | KVM_MAP_GPA_RANGE_ENCRYPTED;
        if attrs & !known != 0 {
            return Err("unknown attribute bits");
        }
        let size = npages.checked_mul(4096).ok_or("the range overflows")?;
        gpa.checked_add(size).ok_or("the range overflows")?;
        Ok(Self {
            gpa,
            size,
            private: attrs & KVM_MAP_GPA_RANGE_ENCRYPTED != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn struct_layouts_match_the_uapi() {
        // include/uapi/linux/kvm.h: struct kvm_sev_cmd.
        assert_eq!(size_of::<kvm_sev_cmd>(), 24);
        assert_eq!(offset_of!(kvm_sev_cmd, data), 8);
        assert_eq!(offset_of!(kvm_sev_cmd, error), 16);
        assert_eq!(offset_of!(kvm_sev_cmd, sev_fd), 20);

        assert_eq!(size_of::<kvm_sev_init>(), 48);
        assert_eq!(offset_of!(kvm_sev_init, flags), 8);
        assert_eq!(offset_of!(kvm_sev_init, ghcb_version), 12);
        assert_eq!(offset_of!(kvm_sev_init, pad2), 16);

        assert_eq!(size_of::<kvm_sev_snp_launch_start>(), 64);
        assert_eq!(offset_of!(kvm_sev_snp_launch_start, gosvw), 8);
        assert_eq!(offset_of!(kvm_sev_snp_launch_start, flags), 24);
        assert_eq!(offset_of!(kvm_sev_snp_launch_start, pad1), 32);

        assert_eq!(size_of::<kvm_sev_snp_launch_update>(), 64);
        assert_eq!(offset_of!(kvm_sev_snp_launch_update, uaddr), 8);
        assert_eq!(offset_of!(kvm_sev_snp_launch_update, len), 16);
        assert_eq!(offset_of!(kvm_sev_snp_launch_update, type_), 24);
        assert_eq!(offset_of!(kvm_sev_snp_launch_update, flags), 26);
        assert_eq!(offset_of!(kvm_sev_snp_launch_update, pad2), 32);

        assert_eq!(size_of::<kvm_sev_snp_launch_finish>(), 88);
        assert_eq!(offset_of!(kvm_sev_snp_launch_finish, id_auth_uaddr), 8);
        assert_eq!(offset_of!(kvm_sev_snp_launch_finish, id_block_en), 16);
        assert_eq!(offset_of!(kvm_sev_snp_launch_finish, host_data), 19);
        assert_eq!(offset_of!(kvm_sev_snp_launch_finish, flags), 54);
        assert_eq!(offset_of!(kvm_sev_snp_launch_finish, pad1), 56);
    }

    #[test]
    fn command_ids_match_the_uapi() {
        let want = [
            (SevCommand::LaunchUpdateVmsa, 4),
            (SevCommand::Init2, 22),
            (SevCommand::SnpLaunchStart, 100),
            (SevCommand::SnpLaunchUpdate, 101),
            (SevCommand::SnpLaunchFinish, 102),
        ];
        for (cmd, id) in want {
            assert_eq!(cmd.id(), id, "{cmd}");
            assert_eq!(SevCommand::from_id(id), Some(cmd));
        }
        assert_eq!(SevCommand::from_id(10), None, "SEND_UPDATE_VMSA is not issued");
        assert_eq!(
            SevCommand::SnpLaunchUpdate.to_string(),
            "KVM_SEV_SNP_LAUNCH_UPDATE (101)"
        );
    }

    #[test]
    fn command_errors_name_the_firmware_status() {
        let err = |fw_error| SevError::Command {
            cmd: SevCommand::SnpLaunchUpdate,
            errno: Errno::new(libc::EIO),
            fw_error,
        };
        let e = err(0x1a);
        assert_eq!(e.firmware_status(), Some(SevStatus::InvalidPageState));
        assert_eq!(
            e.to_string(),
            format!(
                "KVM_MEMORY_ENCRYPT_OP KVM_SEV_SNP_LAUNCH_UPDATE (101) failed with {}, firmware \
                 INVALID_PAGE_STATE (0x1a)",
                Errno::new(libc::EIO)
            )
        );
        assert_eq!(err(0).firmware_status(), None);
        assert!(err(0).to_string().ends_with(", no firmware status (0)"));
        assert!(err(0x1e).to_string().ends_with(", unknown firmware status 0x1e"));
    }

    #[test]
    fn page_types_match_the_uapi_and_refuse_vmsa() {
        use vmsa_core::SnpPageType as T;
        for (t, raw) in [
            (T::Normal, 1),
            (T::Zero, 3),
            (T::Unmeasured, 4),
            (T::Secrets, 5),
            (T::Cpuid, 6),
            (T::Vmsa, 2),
        ] {
            let p = SnpLaunchPage::from_core(t).unwrap();
            assert_eq!(p.raw(), raw);
            assert_eq!(p.raw(), t as u8, "KVM and firmware numbers agree");
        }
    }

    #[test]
    fn the_raw_command_borrows_its_data() {
        let mut start = kvm_sev_snp_launch_start {
            policy: SNP_POLICY_RSVD_MBO,
            ..Default::default()
        };
        let ptr = &mut start as *mut _ as u64;
        let cmd = sev_command(SevCommand::SnpLaunchStart, Some(&mut start), 7);
        assert_eq!((cmd.id, cmd.data, cmd.sev_fd, cmd.error), (100, ptr, 7, 0));
        let cmd = sev_command::<u8>(SevCommand::LaunchUpdateVmsa, None, 7);
        assert_eq!((cmd.id, cmd.data), (4, 0));
    }

    #[test]
    fn map_gpa_range_decodes_and_refuses() {
        let r = MapGpaRange::decode(&[0x10_0000, 16, KVM_MAP_GPA_RANGE_ENCRYPTED, 0, 0, 0]).unwrap();
        assert_eq!(
            r,
            MapGpaRange {
                gpa: 0x10_0000,
                size: 0x1_0000,
                private: true
            }
        );
        let r = MapGpaRange::decode(&[0x20_0000, 512, KVM_MAP_GPA_RANGE_PAGE_SZ_2M, 0, 0, 0]).unwrap();
        assert!(!r.private);
        assert!(MapGpaRange::decode(&[0x1001, 1, 0, 0, 0, 0]).is_err());
        assert!(MapGpaRange::decode(&[0x1000, 0, 0, 0, 0, 0]).is_err());
        assert!(MapGpaRange::decode(&[0x1000, 1, 1 << 7, 0, 0, 0]).is_err());
        assert!(MapGpaRange::decode(&[u64::MAX - 4095, 2, 0, 0, 0, 0]).is_err());
    }
}
