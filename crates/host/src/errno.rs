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

/// The symbolic name of every errno value Linux returns to user space (1 to 133 but 41 and 58:
/// the uapi headers asm-generic/errno-base.h and asm-generic/errno.h), the aliases
/// (`EWOULDBLOCK`, `EDEADLOCK`, `ENOTSUP`) under the name they alias.
fn name_of(code: i32) -> &'static str {
    match code {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::E2BIG => "E2BIG",
        libc::ENOEXEC => "ENOEXEC",
        libc::EBADF => "EBADF",
        libc::ECHILD => "ECHILD",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::ENOTBLK => "ENOTBLK",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::ENOTTY => "ENOTTY",
        libc::ETXTBSY => "ETXTBSY",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::EPIPE => "EPIPE",
        libc::EDOM => "EDOM",
        libc::ERANGE => "ERANGE",
        libc::EDEADLK => "EDEADLK",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOLCK => "ENOLCK",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENOMSG => "ENOMSG",
        libc::EIDRM => "EIDRM",
        libc::ECHRNG => "ECHRNG",
        libc::EL2NSYNC => "EL2NSYNC",
        libc::EL3HLT => "EL3HLT",
        libc::EL3RST => "EL3RST",
        libc::ELNRNG => "ELNRNG",
        libc::EUNATCH => "EUNATCH",
        libc::ENOCSI => "ENOCSI",
        libc::EL2HLT => "EL2HLT",
        libc::EBADE => "EBADE",
        libc::EBADR => "EBADR",
        libc::EXFULL => "EXFULL",
        libc::ENOANO => "ENOANO",
        libc::EBADRQC => "EBADRQC",
        libc::EBADSLT => "EBADSLT",
        libc::EBFONT => "EBFONT",
        libc::ENOSTR => "ENOSTR",
        libc::ENODATA => "ENODATA",
        libc::ETIME => "ETIME",
        libc::ENOSR => "ENOSR",
        libc::ENONET => "ENONET",
        libc::ENOPKG => "ENOPKG",
        libc::EREMOTE => "EREMOTE",
        libc::ENOLINK => "ENOLINK",
        libc::EADV => "EADV",
        libc::ESRMNT => "ESRMNT",
        libc::ECOMM => "ECOMM",
        libc::EPROTO => "EPROTO",
        libc::EMULTIHOP => "EMULTIHOP",
        libc::EDOTDOT => "EDOTDOT",
        libc::EBADMSG => "EBADMSG",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::ENOTUNIQ => "ENOTUNIQ",
        libc::EBADFD => "EBADFD",
        libc::EREMCHG => "EREMCHG",
        libc::ELIBACC => "ELIBACC",
        libc::ELIBBAD => "ELIBBAD",
        libc::ELIBSCN => "ELIBSCN",
        libc::ELIBMAX => "ELIBMAX",
        libc::ELIBEXEC => "ELIBEXEC",
        libc::EILSEQ => "EILSEQ",
        libc::ERESTART => "ERESTART",
        libc::ESTRPIPE => "ESTRPIPE",
        libc::EUSERS => "EUSERS",
        libc::ENOTSOCK => "ENOTSOCK",
        libc::EDESTADDRREQ => "EDESTADDRREQ",
        libc::EMSGSIZE => "EMSGSIZE",
        libc::EPROTOTYPE => "EPROTOTYPE",
        libc::ENOPROTOOPT => "ENOPROTOOPT",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::ESOCKTNOSUPPORT => "ESOCKTNOSUPPORT",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EPFNOSUPPORT => "EPFNOSUPPORT",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENETDOWN => "ENETDOWN",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ENETRESET => "ENETRESET",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ENOBUFS => "ENOBUFS",
        libc::EISCONN => "EISCONN",
        libc::ENOTCONN => "ENOTCONN",
        libc::ESHUTDOWN => "ESHUTDOWN",
        libc::ETOOMANYREFS => "ETOOMANYREFS",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EHOSTDOWN => "EHOSTDOWN",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EALREADY => "EALREADY",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::ESTALE => "ESTALE",
        libc::EUCLEAN => "EUCLEAN",
        libc::ENOTNAM => "ENOTNAM",
        libc::ENAVAIL => "ENAVAIL",
        libc::EISNAM => "EISNAM",
        libc::EREMOTEIO => "EREMOTEIO",
        libc::EDQUOT => "EDQUOT",
        libc::ENOMEDIUM => "ENOMEDIUM",
        libc::EMEDIUMTYPE => "EMEDIUMTYPE",
        libc::ECANCELED => "ECANCELED",
        libc::ENOKEY => "ENOKEY",
        libc::EKEYEXPIRED => "EKEYEXPIRED",
        libc::EKEYREVOKED => "EKEYREVOKED",
        libc::EKEYREJECTED => "EKEYREJECTED",
        libc::EOWNERDEAD => "EOWNERDEAD",
        libc::ENOTRECOVERABLE => "ENOTRECOVERABLE",
        libc::ERFKILL => "ERFKILL",
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
        // Running out of file descriptors was "E? (24)".
        assert_eq!(
            Errno::new(libc::EMFILE).to_string(),
            "EMFILE (24): Too many open files"
        );
    }

    #[test]
    fn every_errno_linux_returns_has_its_name() {
        // 41 and 58 are no errno: the headers give those places to the aliases EWOULDBLOCK
        // and EDEADLOCK, whose values are EAGAIN's and EDEADLK's.
        for code in (1..=133).filter(|c| ![41, 58].contains(c)) {
            let name = Errno::new(code).name;
            assert!(name.starts_with('E') && name != "E?", "{code}: {name}");
        }
        assert_eq!(Errno::new(libc::EWOULDBLOCK).name, "EAGAIN");
        assert_eq!(Errno::new(libc::ENOTSUP).name, "EOPNOTSUPP");
        assert_eq!(Errno::new(133).name, "EHWPOISON");
    }
}
