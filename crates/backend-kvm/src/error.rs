//! Leaf error types shared by the modules: the errno type (vmsa-host's, so a refusal reads the
//! same from every host) and a failed ioctl.

use serde::Serialize;

pub use vmsa_host::Errno;

/// An ioctl (or other system call) that failed, with its name and errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{ioctl} failed with {errno}")]
pub struct IoctlError {
    /// The call, by its uapi name (`"KVM_SET_SREGS"`).
    pub ioctl: &'static str,
    /// What the kernel answered.
    pub errno: Errno,
}

impl IoctlError {
    /// A failure of `ioctl` with `errno`.
    pub fn new(ioctl: &'static str, errno: impl Into<Errno>) -> Self {
        Self {
            ioctl,
            errno: errno.into(),
        }
    }
}

/// Attach the ioctl name to a kvm-ioctls / vmm-sys-util result.
pub(crate) trait IoctlContext<T> {
    /// Name the failed call.
    fn ioctl(self, name: &'static str) -> Result<T, IoctlError>;
}

impl<T> IoctlContext<T> for Result<T, vmm_sys_util::errno::Error> {
    fn ioctl(self, name: &'static str) -> Result<T, IoctlError> {
        self.map_err(|e| IoctlError::new(name, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_names_and_text() {
        let e = Errno::from(vmm_sys_util::errno::Error::new(libc::ENXIO));
        assert_eq!(e.name, "ENXIO");
        assert_eq!(e.code, 6);
        assert!(e.to_string().starts_with("ENXIO (6): "), "{e}");
        assert!(!e.to_string().contains("os error"), "{e}");
        assert_eq!(Errno::new(4095).name, "E?");
        let io = IoctlError::new("KVM_RUN", vmm_sys_util::errno::Error::new(libc::EINTR));
        assert!(
            io.to_string().starts_with("KVM_RUN failed with EINTR (4)"),
            "{io}"
        );
    }
}
