//! Leaf error types shared by the modules: an errno with its name, and a failed ioctl.

use std::fmt;

use serde::Serialize;

/// An `errno` value with its symbolic name, as seen by a failed system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Errno {
    /// The raw value (`EINVAL` is 22).
    pub code: i32,
    /// The symbolic name (`"EINVAL"`), or `"E?"` for values this crate does not name.
    pub name: &'static str,
}

impl Errno {
    /// The errno `code`.
    pub fn new(code: i32) -> Self {
        Self {
            code,
            name: errno_name(code),
        }
    }

    /// The calling thread's current `errno`.
    pub fn last() -> Self {
        Self::new(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

impl From<vmm_sys_util::errno::Error> for Errno {
    fn from(e: vmm_sys_util::errno::Error) -> Self {
        Self::new(e.errno())
    }
}

impl From<&std::io::Error> for Errno {
    fn from(e: &std::io::Error) -> Self {
        Self::new(e.raw_os_error().unwrap_or(0))
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msg = std::io::Error::from_raw_os_error(self.code);
        // `io::Error`'s Display appends " (os error N)"; keep only the text.
        let text = msg.to_string();
        let text = text.split(" (os error").next().unwrap_or(&text).to_string();
        write!(f, "{} ({}): {}", self.name, self.code, text)
    }
}

/// The names of the errno values KVM and the kernel's SEV code return.
fn errno_name(code: i32) -> &'static str {
    match code {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::ENOTTY => "ENOTTY",
        libc::E2BIG => "E2BIG",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EHWPOISON => "EHWPOISON",
        _ => "E?",
    }
}

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
        let e = Errno::new(libc::ENXIO);
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
