//! Getting a vCPU out of `KVM_RUN`, or out of a wait inside its run: one mechanism for both
//! modes and both run loops.
//!
//! Each vCPU has one [`KickState`]. Two kinds of request reach it:
//!
//! - a **kick** ([`KvmKick`], vmsa-host's [`Kick`]): the vCPU's current or next run returns
//!   `Interrupted`;
//! - a **wake**: an AP-creation request for it was accepted, so it must go back to vmsa-core
//!   (`prepare_entry`) before it enters the guest again. The requester does not continue before
//!   the request is applied, which keeps ownership histories deterministic: if the target is
//!   *parked* (asleep in [`KickState::wait`], or not running yet) the requester applies it on
//!   the target's behalf while the target stays parked ([`KickState::wake_parked`]), since
//!   applying it is the first thing the target would do on waking; otherwise it waits until the
//!   target has acknowledged it ([`KickState::wait_for_ack`]). A requester's own kicks and wakes
//!   end that wait: it serves them (a wake for itself through its own entry, which
//!   acknowledges it) and waits again before it enters its guest, so two vCPUs whose requests
//!   target each other do not wait for each other.
//!
//! Both wake the condition variable a parked vCPU sleeps on. A vCPU in the guest (between
//! [`KickState::enter_guest`] and the end of its `KVM_RUN`) is also made to leave it: its
//! thread ([`SignalTarget`]) is sent [`kick_signal`], whose handler ([`install`]) does nothing
//! and is installed without `SA_RESTART`, so a `KVM_RUN` running or blocked (a halted vCPU in
//! `kvm_vcpu_block`) returns `EINTR` (`kvm_handle_signal_exit`). A signal that lands just before
//! the thread enters `KVM_RUN` is spent on the handler, so the kicker signals again, every
//! [`SIGNAL_RETRY`], until the thread has left that entry into the guest. A vCPU outside the
//! guest gets no signal: it sees the new kick or wake counts before it enters again, because it
//! checks them under the same lock that marks it in the guest.
//!
//! Nothing here touches the vCPU's `kvm_run` (its `immediate_exit` byte would also close that
//! window): kvm-ioctls' `VcpuFd::run` turns the mapping into a `&mut kvm_run` after each
//! `KVM_RUN`, and the exit it returns borrows from it, so a store from a kicker thread could
//! race with a live unique reference, undefined behaviour in Rust. Only the vCPU's own thread
//! uses its `kvm_run`, through kvm-ioctls.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use vmsa_host::Kick;

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

/// How long a kicker waits for a signalled vCPU to leave the guest before it signals again
/// (the signal may have come just before the vCPU's thread entered `KVM_RUN`).
pub const SIGNAL_RETRY: Duration = Duration::from_millis(1);

/// Where the vCPU's thread is, and the wakes it acknowledged, under the lock the condition
/// variable uses.
#[derive(Debug, Default)]
struct Acks {
    acked: u64,
    /// In `KVM_RUN` or about to enter it: kicks and wakes must get it out.
    in_guest: bool,
    /// Entries into the guest so far ([`KickState::enter_guest`]): a kicker stops signalling
    /// once the entry it saw has ended, not at a later one.
    entries: u64,
    /// Asleep in [`KickState::wait`], or not running yet: it changes nothing until woken.
    parked: bool,
}

/// While alive, the vCPU counts as in the guest (see [`KickState::enter_guest`]).
#[derive(Debug)]
pub struct InGuest<'a>(&'a KickState);

impl Drop for InGuest<'_> {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.in_guest = false;
        // Whatever asked the vCPU out is in the kick and wake counts, which it reads before it
        // enters again; a kicker still signalling stops now.
        self.0.cv.notify_all();
    }
}

/// What interrupts one vCPU: kicks, wakes and their acknowledgements, and its thread.
#[derive(Debug, Default)]
pub struct KickState {
    kicks: AtomicU64,
    wakes: AtomicU64,
    acks: Mutex<Acks>,
    cv: Condvar,
    signal: SignalTarget,
}

impl KickState {
    /// The state of a vCPU whose thread has not started running it: parked.
    pub fn parked() -> Self {
        Self {
            acks: Mutex::new(Acks {
                parked: true,
                ..Acks::default()
            }),
            ..Self::default()
        }
    }

    fn lock(&self) -> MutexGuard<'_, Acks> {
        self.acks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The thread signalled by kicks and wakes (attach it while it may sit in `KVM_RUN`).
    pub fn signal(&self) -> &SignalTarget {
        &self.signal
    }

    /// Kicks so far.
    pub fn kicks(&self) -> u64 {
        self.kicks.load(Ordering::SeqCst)
    }

    /// Wakes so far.
    pub fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::SeqCst)
    }

    /// Get the vCPU out of `KVM_RUN` if it is in the guest, and out of [`KickState::wait`]. The
    /// caller has counted the kick or wake already.
    ///
    /// A vCPU in the guest is signalled until the entry it was in has ended: the first signal
    /// may be spent before its thread enters `KVM_RUN` (see the module docs). That takes as
    /// long as the thread needs to leave `KVM_RUN` after a signal; a vCPU without an attached
    /// thread is not waited for.
    fn interrupt(&self) {
        let mut g = self.lock();
        self.cv.notify_all();
        let entry = g.entries;
        while g.in_guest && g.entries == entry {
            if !self.signal.signal() {
                break;
            }
            g = self
                .cv
                .wait_timeout(g, SIGNAL_RETRY)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Mark the vCPU in the guest for one `KVM_RUN`, unless a kick newer than `kicks` or a wake
    /// newer than `wakes` has come (then `None`: serve it first). Checked under the lock kicks
    /// and wakes take, so each of them either is seen here or sees the vCPU in the guest.
    pub fn enter_guest(&self, kicks: u64, wakes: u64) -> Option<InGuest<'_>> {
        let mut g = self.lock();
        if self.kicks() != kicks || self.wakes() != wakes {
            return None;
        }
        g.in_guest = true;
        g.entries += 1;
        Some(InGuest(self))
    }

    /// The vCPU's thread starts running it: it is no longer parked.
    pub fn unpark(&self) {
        self.lock().parked = false;
    }

    /// If the vCPU is parked, `apply` its accepted AP-creation request on its behalf, keeping it
    /// parked until `apply` returns, then wake it (acknowledged already: nobody waits). `None`
    /// if it is not parked (use [`KickState::wake`] and [`KickState::wait_for_ack`]).
    pub fn wake_parked<T>(&self, apply: impl FnOnce() -> T) -> Option<T> {
        let mut g = self.lock();
        if !g.parked {
            return None;
        }
        let done = apply();
        g.acked = self.wakes.fetch_add(1, Ordering::SeqCst) + 1;
        self.cv.notify_all();
        Some(done)
    }

    /// Kick: the current or next run returns `Interrupted`.
    pub fn kick(&self) {
        self.kicks.fetch_add(1, Ordering::SeqCst);
        self.interrupt();
    }

    /// Wake for an accepted AP-creation request; returns the wake's sequence number.
    pub fn wake(&self) -> u64 {
        let seq = self.wakes.fetch_add(1, Ordering::SeqCst) + 1;
        self.interrupt();
        seq
    }

    /// The vCPU went back to vmsa-core after wake `seq`.
    pub fn ack(&self, seq: u64) {
        let mut g = self.lock();
        g.acked = g.acked.max(seq);
        self.cv.notify_all();
    }

    /// Wait until the vCPU acknowledges wake `want` (from [`KickState::wake`]), `abort()` says
    /// to stop waiting, or `timeout` passes, looking at `abort` at least every millisecond.
    ///
    /// The waiter's own kicks and wakes reach it only through `abort`: a requester must abort
    /// on both. Two vCPUs that each wait for the other's acknowledgement would otherwise wait
    /// until the timeout, since a vCPU acknowledges only at its own entry; aborting on its own
    /// wake lets each serve the other's request (its entry acknowledges it) and wait again.
    pub fn wait_for_ack(&self, want: u64, timeout: Duration, abort: &dyn Fn() -> bool) -> Waited {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        loop {
            if g.acked >= want {
                return Waited::Acked;
            }
            if abort() {
                return Waited::Aborted;
            }
            let now = Instant::now();
            if now >= deadline {
                return Waited::TimedOut;
            }
            let wait = (deadline - now).min(Duration::from_millis(1));
            g = self.cv.wait_timeout(g, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Sleep, parked, until a kick newer than `kicks` or a wake newer than `wakes`.
    pub fn wait(&self, kicks: u64, wakes: u64) {
        let mut g = self.lock();
        g.parked = true;
        while self.kicks() == kicks && self.wakes() == wakes {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.parked = false;
    }
}

/// How [`KickState::wait_for_ack`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waited {
    /// The vCPU acknowledged the wake.
    Acked,
    /// `abort()` said to stop first (the waiter has a kick or a wake of its own to serve).
    Aborted,
    /// The timeout passed first.
    TimedOut,
}

/// The exits of every vCPU of a VM, for a vCPU that waits for the others (the guest program's
/// YIELD port, written by a BSP that spins on guest memory until its APs report).
///
/// Serving YIELD with `sched_yield` kept the spinning BSP on a CPU, each loop a round of
/// emulated guest instructions and an exit, while its APs waited for that CPU (two here, shared
/// with other work); a wait here costs no CPU. It ends when another vCPU exits after the
/// waiter last looked (an AP of the built-in programs reports in memory and then exits, so the
/// BSP finds the report when it looks again), when `abort()` says so, or after a timeout (for
/// progress a guest makes in memory alone, and for kicks, which reach the waiter through
/// `abort`).
#[derive(Debug, Default)]
pub struct Progress {
    exits: AtomicU64,
    waiters: AtomicU64,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Progress {
    /// A vCPU exited `KVM_RUN` (other than to wait here).
    pub fn exited(&self) {
        self.exits.fetch_add(1, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) != 0 {
            drop(self.lock.lock().unwrap_or_else(|p| p.into_inner()));
            self.cv.notify_all();
        }
    }

    /// Wait until an exit newer than `seen` (then `seen` is updated to it), `abort()`, or
    /// `timeout`, looking at `abort` at least every millisecond.
    pub fn wait(&self, seen: &mut u64, timeout: Duration, abort: &dyn Fn() -> bool) {
        // Counted as a waiter before looking: an exit either is seen here or notifies.
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.exits.load(Ordering::SeqCst) == *seen && !abort() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let wait = (deadline - now).min(Duration::from_millis(1));
            g = self.cv.wait_timeout(g, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
        drop(g);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        *seen = self.exits.load(Ordering::SeqCst);
    }
}

/// vmsa-host's kick for a KVM vCPU of either mode.
#[derive(Debug, Clone, Default)]
pub struct KvmKick {
    state: Arc<KickState>,
}

impl KvmKick {
    /// A kick handle for a new vCPU.
    pub fn new() -> Self {
        Self::default()
    }

    /// A kick handle for a new vCPU that counts as parked until its thread starts running it
    /// ([`KickState::unpark`]).
    pub fn parked() -> Self {
        Self {
            state: Arc::new(KickState::parked()),
        }
    }

    /// The vCPU's kick state.
    pub fn state(&self) -> &Arc<KickState> {
        &self.state
    }
}

impl Kick for KvmKick {
    fn kick(&self) {
        self.state.kick();
    }
}

/// Kicks a vCPU has consumed, and the return of `Interrupted` for a new one.
#[derive(Debug, Default)]
pub(crate) struct Consumed {
    kicks: u64,
}

impl Consumed {
    /// Whether a kick arrived since the last call (and consume it).
    pub(crate) fn take(&mut self, state: &KickState) -> bool {
        let now = state.kicks();
        if now == self.kicks {
            return false;
        }
        self.kicks = now;
        true
    }

    /// The kicks consumed so far.
    pub(crate) fn seen(&self) -> u64 {
        self.kicks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kick_wakes_a_waiting_thread() {
        install().unwrap();
        let k = KvmKick::new();
        let st = k.state().clone();
        let h = std::thread::spawn(move || {
            let _a = st.signal().attach();
            st.wait(0, 0);
            st.kicks()
        });
        std::thread::sleep(Duration::from_millis(5));
        k.kick();
        assert_eq!(h.join().unwrap(), 1);
        let mut c = Consumed::default();
        assert!(c.take(k.state()));
        assert!(!c.take(k.state()));
    }

    #[test]
    fn a_vcpu_in_the_guest_sees_kicks_and_wakes_before_its_next_entry() {
        let k = KvmKick::new();
        let st = k.state();
        let guest = st.enter_guest(0, 0).expect("nothing pending");
        // No thread is attached: nothing to signal, and the kick does not wait.
        k.kick();
        drop(guest);
        assert!(st.enter_guest(0, 0).is_none(), "a kick newer than the one seen");
        st.wake();
        assert!(st.enter_guest(1, 0).is_none(), "a wake newer than the one seen");
        assert!(st.enter_guest(1, 1).is_some());
    }

    /// A kick that lands after the vCPU was marked in the guest but before its thread blocks in
    /// the call that stands for `KVM_RUN` (the handler spends that signal) still gets it out:
    /// the kicker signals again until that entry has ended. (Before, it signalled once and
    /// relied on `immediate_exit`, written from the kicker's thread into a `kvm_run` that
    /// kvm-ioctls holds as `&mut`.)
    #[test]
    fn a_kick_just_before_the_blocking_call_is_signalled_again() {
        install().unwrap();
        let _watchdog = crate::testing::Watchdog::arm(
            "a_kick_just_before_the_blocking_call_is_signalled_again",
            Duration::from_secs(60),
        );
        let k = KvmKick::new();
        let st = k.state().clone();
        let entered = Arc::new(std::sync::Barrier::new(2));
        let gate = entered.clone();
        let h = std::thread::spawn(move || {
            let _a = st.signal().attach();
            let guest = st.enter_guest(0, 0).expect("nothing pending");
            gate.wait();
            // The window: the kicker signals now, while this thread makes no blocking call.
            let until = Instant::now() + Duration::from_millis(50);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
            // Block as KVM_RUN would, until a signal ends the call with EINTR.
            let mut fds = [0; 2];
            // SAFETY: `fds` is a valid array of two ints for pipe(2) to fill.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            let mut b = 0u8;
            // SAFETY: fds[0] is the read end just created; `b` is a valid 1-byte buffer.
            let r = unsafe { libc::read(fds[0], (&mut b as *mut u8).cast(), 1) };
            let errno = Errno::last().code;
            // SAFETY: both fds were created above and are closed exactly once.
            unsafe {
                libc::close(fds[0]);
                libc::close(fds[1]);
            }
            drop(guest);
            (r, errno)
        });
        entered.wait();
        k.kick();
        let (r, errno) = h.join().unwrap();
        assert_eq!((r, errno), (-1, libc::EINTR));
    }

    #[test]
    fn a_progress_wait_ends_at_the_next_exit_or_the_timeout() {
        let p = Arc::new(Progress::default());
        let mut seen = 0;
        p.exited();
        // An exit since the last look: no wait at all, however long the timeout.
        p.wait(&mut seen, Duration::from_secs(3600), &|| false);
        assert_eq!(seen, 1);
        p.wait(&mut seen, Duration::from_millis(5), &|| false);
        assert_eq!(seen, 1, "nothing exited: the timeout ended it");
        p.wait(&mut seen, Duration::from_secs(3600), &|| true);
        assert_eq!(seen, 1, "aborted");
        let q = p.clone();
        let h = std::thread::spawn(move || {
            while q.waiters.load(Ordering::SeqCst) == 0 {
                std::thread::yield_now();
            }
            q.exited();
        });
        p.wait(&mut seen, Duration::from_secs(3600), &|| false);
        h.join().unwrap();
        assert_eq!(seen, 2, "woken by the other vCPU's exit");
    }

    #[test]
    fn a_parked_vcpu_has_its_request_applied_by_the_requester() {
        let st = Arc::new(KickState::parked());
        assert_eq!(st.wake_parked(|| 7), Some(7), "not started: parked");
        assert_eq!((st.wakes(), st.lock().acked), (1, 1), "woken and acknowledged");
        st.unpark();
        assert_eq!(st.wake_parked(|| 7), None, "running: the requester must wait");
        let t = st.clone();
        let h = std::thread::spawn(move || t.wait(0, 1));
        while !st.lock().parked {
            std::thread::yield_now();
        }
        // The sleeper cannot leave the wait while the request is applied.
        let seen = st.wake_parked(|| st.acks.try_lock().is_err());
        h.join().unwrap();
        assert_eq!(seen, Some(true));
        assert!(!st.lock().parked, "awake again");
    }

    #[test]
    fn wait_for_ack_returns_on_ack_abort_or_timeout() {
        let st = Arc::new(KickState::default());
        let want = st.wake();
        assert_eq!(
            st.wait_for_ack(want, Duration::from_millis(5), &|| false),
            Waited::TimedOut
        );
        assert_eq!(
            st.wait_for_ack(want, Duration::from_secs(3600), &|| true),
            Waited::Aborted
        );
        let want = st.wake();
        let t = st.clone();
        let h = std::thread::spawn(move || {
            t.wait(0, 0);
            t.ack(t.wakes());
        });
        assert_eq!(
            st.wait_for_ack(want, Duration::from_secs(3600), &|| false),
            Waited::Acked
        );
        h.join().unwrap();
        // Acknowledged already: no wait, even when an abort is pending.
        assert_eq!(st.wait_for_ack(want, Duration::ZERO, &|| true), Waited::Acked);
    }

    /// Two vCPUs that wait for each other's acknowledgement, each aborting on a wake of its own
    /// and serving it (its entry acknowledges it) before it waits again, as the VMSA-image
    /// requesters do: both get their acknowledgement.
    #[test]
    fn mutual_waits_end_by_serving_the_own_wake() {
        let a = Arc::new(KickState::default());
        let b = Arc::new(KickState::default());
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let requester = |own: Arc<KickState>, target: Arc<KickState>, barrier: Arc<std::sync::Barrier>| {
            std::thread::spawn(move || {
                // Fresh states: no wake served yet.
                let mut served = 0;
                let want = target.wake();
                // Both requests are made before either waits.
                barrier.wait();
                let serve = |served: &mut u64| {
                    if own.wakes() != *served {
                        *served = own.wakes();
                        own.ack(*served);
                    }
                };
                loop {
                    serve(&mut served);
                    let seen = served;
                    match target.wait_for_ack(want, Duration::from_secs(30), &|| own.wakes() != seen) {
                        Waited::Acked => break,
                        Waited::Aborted => {}
                        Waited::TimedOut => return Waited::TimedOut,
                    }
                }
                // As the vCPU's next entry would.
                serve(&mut served);
                Waited::Acked
            })
        };
        let ha = requester(a.clone(), b.clone(), barrier.clone());
        let hb = requester(b.clone(), a.clone(), barrier);
        assert_eq!(
            (ha.join().unwrap(), hb.join().unwrap()),
            (Waited::Acked, Waited::Acked)
        );
    }

    #[test]
    fn a_signal_ends_a_blocked_syscall_with_eintr_and_detached_threads_are_not_signalled() {
        install().unwrap();
        let target = SignalTarget::default();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let interrupted = std::thread::scope(|s| {
            let h = s.spawn(|| {
                let _a = target.attach();
                let mut eintr = 0;
                // Until stopped, and until one read was interrupted: a thread that reached its
                // loop only after the stop (a loaded machine) still blocks once.
                while !stop.load(Ordering::SeqCst) || eintr == 0 {
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
            while !target.attached() {
                std::thread::yield_now();
            }
            std::thread::sleep(Duration::from_millis(20));
            stop.store(true, Ordering::SeqCst);
            // Signal until the thread has left its loop (and detached).
            while target.attached() {
                target.signal();
                std::thread::sleep(Duration::from_millis(1));
            }
            h.join().unwrap()
        });
        assert!(interrupted >= 1);
        assert!(!target.attached());
        assert!(!target.signal(), "no thread, no signal");
    }
}
