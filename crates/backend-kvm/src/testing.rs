//! What tests on real `/dev/kvm` share (feature `testing`): the check that skips a test, with
//! its reason, where KVM cannot be used, a count of the KVM objects a process holds open, and a
//! [`Watchdog`] that bounds a test running real vCPUs.

use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

/// Ends the whole process (exit status 101, as a failed test) if it is not dropped within its
/// limit: a vCPU wedged in `KVM_RUN` (a guest-program regression looping without an exit) then
/// fails its test instead of hanging the test binary. On hosts whose KVM emulates guest code
/// a kick may not reach a wedged vCPU in time, so the bound does not rely on one.
#[derive(Debug)]
#[must_use = "the watchdog is disarmed when dropped"]
pub struct Watchdog {
    _disarm: mpsc::Sender<()>,
}

impl Watchdog {
    /// Arm a watchdog for `test`: unless dropped within `limit`, it prints why and exits.
    pub fn arm(test: &'static str, limit: Duration) -> Self {
        let (tx, rx) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                // Dropping the sender disconnects: the test finished (or unwound) in time.
                if rx.recv_timeout(limit) == Err(RecvTimeoutError::Timeout) {
                    eprintln!("watchdog: {test} did not finish within {limit:?}; exiting the test process");
                    std::process::exit(101);
                }
            })
            .unwrap_or_else(|e| panic!("cannot start the watchdog of {test}: {e}"));
        Self { _disarm: tx }
    }
}

/// Whether /dev/kvm can be used; prints why not when it cannot (the only reason a real-KVM
/// test skips).
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped {test}: /dev/kvm is not usable here ({e})");
            false
        }
    }
}

/// `/dev/kvm` and KVM's objects (`anon_inode:kvm-vm`, `anon_inode:kvm-vcpu:N`,
/// `anon_inode:[kvm-gmem]`) among the process's open fds. Counts the whole process: tests that
/// use it must not run beside others that open KVM fds.
pub fn kvm_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|p| is_kvm_object(p))
                .count()
        })
        .unwrap_or(0)
}

/// An fd's link names `/dev/kvm` or an object KVM made, and never a file that merely has "kvm"
/// in its path (a checkout under `~/kvm/`, a scratch file's random name).
fn is_kvm_object(link: &Path) -> bool {
    let link = link.to_string_lossy();
    link == "/dev/kvm" || (link.starts_with("anon_inode:") && link.contains("kvm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_objects_are_known_by_their_links() {
        for kvm in [
            "/dev/kvm",
            "anon_inode:kvm-vm",
            "anon_inode:kvm-vcpu:3",
            "anon_inode:[kvm-gmem]",
        ] {
            assert!(is_kvm_object(Path::new(kvm)), "{kvm}");
        }
        for other in [
            "/home/kvm/x",
            "/tmp/kvm-vm",
            "anon_inode:[eventfd]",
            "/dev/kvm2",
            "socket:[1]",
        ] {
            assert!(!is_kvm_object(Path::new(other)), "{other}");
        }
    }
}
