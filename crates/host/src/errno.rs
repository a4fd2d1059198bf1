//! An errno with its symbolic name: how KVM answers a refused call.

use std::fmt;

use serde::Serialize;

/// An `errno` value with its symbolic name, as a failed system call (or a host that refuses
/// what KVM would refuse) reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Errno {
    /// The raw value (`EINVAL` is 22).
    pub code: i32,
    /// The symbolic name (`"EINVAL"`), or `"E?"` for values this crate does not name.
    pub name: &'static str,
}

impl Errno {
    /// `EPERM`: the call is not allowed for this VM type.
    pub const EPERM: Self = Self::named(libc::EPERM, "EPERM");
    /// `EIO`: the VM is dead or bugged, or the firmware failed.
    pub const EIO: Self = Self::named(libc::EIO, "EIO");
    /// `EBUSY`: something else is in progress.
    pub const EBUSY: Self = Self::named(libc::EBUSY, "EBUSY");
    /// `EEXIST`: the object already exists.
    pub const EEXIST: Self = Self::named(libc::EEXIST, "EEXIST");
    /// `EINVAL`: an argument or the ordering of calls breaks a rule.
    pub const EINVAL: Self = Self::named(libc::EINVAL, "EINVAL");
    /// `ENOTTY`: the call does not exist for this kind of VM.
    pub const ENOTTY: Self = Self::named(libc::ENOTTY, "ENOTTY");
    /// `EFAULT`: an address the call was given is not mapped.
    pub const EFAULT: Self = Self::named(libc::EFAULT, "EFAULT");
    /// `ENOMEM`: the host is out of memory.
    pub const ENOMEM: Self = Self::named(libc::ENOMEM, "ENOMEM");

    const fn named(code: i32, name: &'static str) -> Self {
        Self { code, name }
    }

    /// The errno `code`, named.
    pub fn new(code: i32) -> Self {
        Self {
            code,
            name: name_of(code),
        }
    }

    /// The calling thread's current `errno`.
    pub fn last() -> Self {
        Self::new(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

impl From<&std::io::Error> for Errno {
    fn from(e: &std::io::Error) -> Self {
        Self::new(e.raw_os_error().unwrap_or(0))
    }
}

#[cfg(feature = "vmm-sys-util")]
impl From<vmm_sys_util::errno::Error> for Errno {
    fn from(e: vmm_sys_util::errno::Error) -> Self {
        Self::new(e.errno())
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = std::io::Error::from_raw_os_error(self.code).to_string();
        // `io::Error`'s Display appends " (os error N)"; keep only the text.
        let text = text.split(" (os error").next().unwrap_or(&text);
        write!(f, "{} ({}): {}", self.name, self.code, text)
    }
}

/// The names of the errno values KVM and the kernel's SEV code return.
fn name_of(code: i32) -> &'static str {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_text() {
        assert_eq!(Errno::new(22), Errno::EINVAL);
        assert_eq!(Errno::EINVAL.to_string(), "EINVAL (22): Invalid argument");
        assert_eq!(Errno::new(9999).name, "E?");
    }
}
