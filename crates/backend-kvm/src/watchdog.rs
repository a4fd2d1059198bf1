//! Getting a vCPU thread out of `KVM_RUN`: a no-op `SIGRTMIN` handler, and per-thread signal
//! targets that are only signalled while their thread is alive.
//!
//! A guest that livelocks (VMMCALL on PVM hosts), halts with an in-kernel irqchip, or simply
//! runs too long keeps `KVM_RUN` busy forever. Sending the thread `SIGRTMIN` (installed
//! without `SA_RESTART`) makes `KVM_RUN` return `EINTR`; the run loop then sees why it was
//! interrupted (a kick, a stop, the deadline). [`watch`] is the deadline: it stops every
//! vCPU and keeps signalling until each thread has left its loop, so a stuck test fails
//! instead of hanging.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::error::{Errno, IoctlError};

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that interrupts `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Install the no-op handler for [`kick_signal`] (once per process).
pub fn install() -> Result<(), IoctlError> {
    static INSTALLED: OnceLock<Result<(), IoctlError>> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
            .map_err(|e| IoctlError::new("sigaction(SIGRTMIN)", Errno::from(e)))
    })
}

/// A thread that may be signalled; empty when no thread is attached.
#[derive(Debug, Default)]
pub struct SignalTarget {
    thread: Mutex<Option<libc::pthread_t>>,
}

/// While alive, the attached thread can be signalled. Dropping it detaches the thread (under
/// the same lock `signal` holds), so a signal never goes to a thread that has exited.
#[derive(Debug)]
pub struct Attached<'a>(&'a SignalTarget);

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        *self.0.lock() = None;
    }
}

impl SignalTarget {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<libc::pthread_t>> {
        self.thread.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attach the calling thread until the guard drops.
    pub fn attach(&self) -> Attached<'_> {
        // SAFETY: pthread_self has no preconditions.
        *self.lock() = Some(unsafe { libc::pthread_self() });
        Attached(self)
    }

    /// Whether a thread is attached.
    pub fn attached(&self) -> bool {
        self.lock().is_some()
    }

    /// Signal the attached thread, if any. Returns whether a signal was sent.
    pub fn signal(&self) -> bool {
        let guard = self.lock();
        match *guard {
            Some(t) => {
                // SAFETY: `t` is the pthread_t of a thread that is still running: it detaches
                // itself (through `Attached::drop`, under this lock) before it exits, and we
                // hold the lock for the duration of the call.
                unsafe { libc::pthread_kill(t, kick_signal()) == 0 }
            }
            None => false,
        }
    }
}

/// What the deadline did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watch {
    /// `done` became true before the deadline.
    Finished,
    /// The deadline passed; `expire` was called and every target signalled until detached.
    Expired,
}

/// Wait until `done()` or until `timeout` passes. On expiry call `expire()` (which must make
/// every vCPU loop leave), then signal every target every millisecond until none is attached
/// (or a further `timeout` passes).
pub fn watch(
    timeout: Duration,
    done: impl Fn() -> bool,
    expire: impl FnOnce(),
    targets: &[&SignalTarget],
) -> Watch {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return Watch::Finished;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    if done() {
        return Watch::Finished;
    }
    expire();
    let give_up = Instant::now() + timeout;
    while targets.iter().any(|t| t.attached()) && Instant::now() < give_up {
        for t in targets {
            t.signal();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Watch::Expired
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[test]
    fn a_blocked_syscall_returns_eintr_and_detached_threads_are_not_signalled() {
        install().unwrap();
        let target = SignalTarget::default();
        let stop = AtomicBool::new(false);
        let interrupted = std::thread::scope(|s| {
            let h = s.spawn(|| {
                let _a = target.attach();
                let mut eintr = 0;
                while !stop.load(Ordering::SeqCst) {
                    // A blocking read that only a signal ends.
                    let mut fds = [0; 2];
                    // SAFETY: `fds` is a valid array of two ints for pipe(2) to fill.
                    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
                    let mut b = 0u8;
                    // SAFETY: fds[0] is the read end just created; `b` is a valid 1-byte buffer.
                    let r = unsafe { libc::read(fds[0], (&mut b as *mut u8).cast(), 1) };
                    if r < 0 && Errno::last().code == libc::EINTR {
                        eintr += 1;
                    }
                    // SAFETY: both fds were created above and are closed exactly once.
                    unsafe {
                        libc::close(fds[0]);
                        libc::close(fds[1]);
                    }
                }
                eintr
            });
            let w = watch(
                Duration::from_millis(20),
                || false,
                || stop.store(true, Ordering::SeqCst),
                &[&target],
            );
            assert_eq!(w, Watch::Expired);
            h.join().unwrap()
        });
        assert!(interrupted >= 1);
        assert!(!target.attached());
        assert!(!target.signal(), "no thread, no signal");
    }
}
