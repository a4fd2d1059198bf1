//! The status codes the AMD Secure Processor firmware returns from SEV and SEV-SNP commands:
//! what a backend reports when a launch, page or VMSA command fails (the simulator's firmware
//! returns them; KVM passes them back in `kvm_sev_cmd.error`).

use core::fmt;

macro_rules! statuses {
    ($( $(#[$doc:meta])* $v:ident = $code:literal, $name:literal; )*) => {
        /// Firmware status codes (`SEV_RET_*`, Linux `include/uapi/linux/psp-sev.h`; SEV-SNP
        /// firmware ABI pub. 56860, table "Status Codes"). Success (0) is not an error code and
        /// has no variant.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[cfg_attr(feature = "serde", derive(serde::Serialize))]
        #[repr(u32)]
        pub enum SevStatus { $( $(#[$doc])* $v = $code, )* }

        impl SevStatus {
            /// Every code.
            pub const ALL: &'static [SevStatus] = &[$(SevStatus::$v),*];

            /// The name without the `SEV_RET_` prefix.
            pub fn name(self) -> &'static str {
                match self { $(SevStatus::$v => $name,)* }
            }

            /// The status with this numeric code, if it is one (0, success, is not).
            pub fn from_code(code: u32) -> Option<Self> {
                match code { $($code => Some(SevStatus::$v),)* _ => None }
            }
        }
    };
}

statuses! {
    /// Command before SNP_INIT or after shutdown.
    InvalidPlatformState = 0x01, "INVALID_PLATFORM_STATE";
    /// The guest is in the wrong state for the command.
    InvalidGuestState = 0x02, "INVALID_GUEST_STATE";
    /// A configuration check failed (e.g. an ASID still owns RMP entries).
    InvalidConfig = 0x03, "INVALID_CONFIG";
    /// A length is invalid.
    InvalidLen = 0x04, "INVALID_LEN";
    /// Already owned.
    AlreadyOwned = 0x05, "ALREADY_OWNED";
    /// A certificate is invalid.
    InvalidCertificate = 0x06, "INVALID_CERTIFICATE";
    /// The guest policy forbids the command.
    PolicyFailure = 0x07, "POLICY_FAILURE";
    /// The guest has no active ASID.
    Inactive = 0x08, "INACTIVE";
    /// An address is invalid (misaligned, not covered, not DRAM).
    InvalidAddress = 0x09, "INVALID_ADDRESS";
    /// A signature does not verify.
    BadSignature = 0x0a, "BAD_SIGNATURE";
    /// A measurement does not match.
    BadMeasurement = 0x0b, "BAD_MEASUREMENT";
    /// The ASID is bound to another guest.
    AsidOwned = 0x0c, "ASID_OWNED";
    /// The ASID is 0 or out of range.
    InvalidAsid = 0x0d, "INVALID_ASID";
    /// DF_FLUSH without WBINVD on all cores.
    WbinvdRequired = 0x0e, "WBINVD_REQUIRED";
    /// The ASID is dirty: WBINVD + DF_FLUSH first.
    DfflushRequired = 0x0f, "DFFLUSH_REQUIRED";
    /// The guest context page is not a guest context.
    InvalidGuest = 0x10, "INVALID_GUEST";
    /// Unknown command.
    InvalidCommand = 0x11, "INVALID_COMMAND";
    /// Active.
    Active = 0x12, "ACTIVE";
    /// Hardware platform error.
    HwsevRetPlatform = 0x13, "HWSEV_RET_PLATFORM";
    /// Unsafe to continue.
    HwsevRetUnsafe = 0x14, "HWSEV_RET_UNSAFE";
    /// Unsupported.
    Unsupported = 0x15, "UNSUPPORTED";
    /// A parameter is invalid (e.g. a rejected CPUID page).
    InvalidParam = 0x16, "INVALID_PARAM";
    /// Out of a resource.
    ResourceLimit = 0x17, "RESOURCE_LIMIT";
    /// Secure data invalid.
    SecureDataInvalid = 0x18, "SECURE_DATA_INVALID";
    /// The page size does not match the RMP entry.
    InvalidPageSize = 0x19, "INVALID_PAGE_SIZE";
    /// The page is not in the state the command needs.
    InvalidPageState = 0x1a, "INVALID_PAGE_STATE";
    /// Invalid metadata entry.
    InvalidMdataEntry = 0x1b, "INVALID_MDATA_ENTRY";
    /// The page belongs to another ASID.
    InvalidPageOwner = 0x1c, "INVALID_PAGE_OWNER";
    /// AEAD overflow.
    AeadOflow = 0x1d, "AEAD_OFLOW";
    /// Exit ring buffer.
    ExitRingBuffer = 0x1f, "EXIT_RING_BUFFER";
    /// The RMP must be initialised first.
    RmpInitRequired = 0x20, "RMP_INIT_REQUIRED";
    /// Bad SVN.
    BadSvn = 0x21, "BAD_SVN";
    /// Bad version.
    BadVersion = 0x22, "BAD_VERSION";
    /// Shutdown required.
    ShutdownRequired = 0x23, "SHUTDOWN_REQUIRED";
    /// Firmware update failed.
    UpdateFailed = 0x24, "UPDATE_FAILED";
    /// Restore required.
    RestoreRequired = 0x25, "RESTORE_REQUIRED";
    /// RMP initialisation failed.
    RmpInitializationFailed = 0x26, "RMP_INITIALIZATION_FAILED";
    /// Invalid key.
    InvalidKey = 0x27, "INVALID_KEY";
}

impl SevStatus {
    /// The code from its name (with or without the `SEV_RET_` prefix).
    pub fn from_name(s: &str) -> Option<Self> {
        let s = s.strip_prefix("SEV_RET_").unwrap_or(s);
        Self::ALL.iter().copied().find(|c| c.name() == s)
    }

    /// The numeric code.
    pub fn code(self) -> u32 {
        self as u32
    }
}

impl fmt::Display for SevStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:#04x})", self.name(), self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn status_names_round_trip() {
        for &s in SevStatus::ALL {
            assert_eq!(SevStatus::from_name(s.name()), Some(s));
        }
        assert_eq!(
            SevStatus::from_name("SEV_RET_INVALID_PAGE_STATE"),
            Some(SevStatus::InvalidPageState)
        );
        assert_eq!(SevStatus::InvalidPageState.code(), 0x1a);
    }

    #[test]
    fn status_codes_round_trip() {
        for &s in SevStatus::ALL {
            assert_eq!(SevStatus::from_code(s.code()), Some(s));
        }
        // 0 is SEV_RET_SUCCESS and 0x1e is unassigned in psp-sev.h.
        assert_eq!(SevStatus::from_code(0), None);
        assert_eq!(SevStatus::from_code(0x1e), None);
        assert_eq!(SevStatus::from_code(0x28), None);
        assert_eq!(
            SevStatus::InvalidPageState.to_string(),
            "INVALID_PAGE_STATE (0x1a)"
        );
    }
}
