//! Getting a vCPU out of `KVM_RUN`, or out of a wait inside its run: one mechanism for both
//! modes and both run loops.
//!
//! Each vCPU has one [`KickState`]. Two kinds of request reach it:
//!
//! - a **kick** ([`KvmKick`], vmsa-host's [`Kick`]): the vCPU's current or next run returns
//!   `Interrupted`;
//! - a **wake**: an AP-creation request for it was accepted, so it must go back to vmsa-core
//!   (`prepare_entry`) before it enters the guest again. The requester waits until the target
//!   has acknowledged it ([`KickState::wake_and_wait`]), which keeps ownership histories
//!   deterministic.
//!
//! Both set `immediate_exit` in the vCPU's `kvm_run` (so a `KVM_RUN` about to start returns
//! `EINTR` at once), signal the vCPU thread with the no-op `SIGRTMIN` handler of
//! [`crate::watchdog`] (so a `KVM_RUN` already running returns `EINTR`), and wake the condition
//! variable a vCPU blocked inside its run (halted, or an AP not created yet) sleeps on.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmsa_host::Kick;

use crate::watchdog::SignalTarget;

/// The `immediate_exit` byte of a live `kvm_run` mapping.
#[derive(Debug, Clone, Copy)]
struct ImmediateExit(NonNull<u8>);

// SAFETY: the pointer is only dereferenced (atomically) while the owning vCPU registered it and
// has not yet unregistered it (under `KickState::immediate_exit`'s lock), i.e. while the
// `kvm_run` mapping is alive; which thread does the atomic store does not matter.
unsafe impl Send for ImmediateExit {}

/// Acknowledged wakes, under the lock the condition variable uses.
#[derive(Debug, Default)]
struct Acks {
    acked: u64,
}

/// What interrupts one vCPU: kicks, wakes and their acknowledgements, its thread and its
/// `kvm_run`.
#[derive(Debug, Default)]
pub struct KickState {
    kicks: AtomicU64,
    wakes: AtomicU64,
    acks: Mutex<Acks>,
    cv: Condvar,
    signal: SignalTarget,
    immediate_exit: Mutex<Option<ImmediateExit>>,
}

impl KickState {
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

    /// Let kicks set `immediate_exit` in `kvm_run` (the vCPU's mapping, which must stay mapped
    /// until [`KickState::unregister_run`]).
    ///
    /// # Safety
    ///
    /// `run` must point into the vCPU's live `kvm_run` mapping, and the caller must call
    /// [`KickState::unregister_run`] before that mapping goes away.
    pub unsafe fn register_run(&self, run: *mut kvm_bindings::kvm_run) {
        // SAFETY: the caller guarantees `run` points at a live kvm_run; taking the address of a
        // field does not read it.
        let byte = unsafe { std::ptr::addr_of_mut!((*run).immediate_exit) };
        *self.immediate_exit.lock().unwrap_or_else(|p| p.into_inner()) =
            NonNull::new(byte).map(ImmediateExit);
    }

    /// Stop touching `kvm_run` (its vCPU is going away).
    pub fn unregister_run(&self) {
        *self.immediate_exit.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn set_immediate_exit(&self, value: u8) {
        let guard = self.immediate_exit.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ImmediateExit(p)) = *guard {
            // SAFETY: registered pointers are live (see `register_run`), the byte is only ever
            // accessed atomically by this process, and a u8 is always aligned.
            unsafe { AtomicU8::from_ptr(p.as_ptr()) }.store(value, Ordering::SeqCst);
        }
    }

    /// Clear `immediate_exit` after `KVM_RUN` returned `EINTR`.
    pub fn clear_immediate_exit(&self) {
        self.set_immediate_exit(0);
    }

    /// Get the vCPU out of `KVM_RUN` and out of [`KickState::wait`].
    fn interrupt(&self) {
        self.set_immediate_exit(1);
        drop(self.lock());
        self.cv.notify_all();
        self.signal.signal();
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

    /// Wake the vCPU and wait until it acknowledges, `abort()` says to stop waiting, or `timeout`
    /// passes. Returns whether it acknowledged (or the wait was aborted).
    pub fn wake_and_wait(&self, timeout: Duration, abort: &dyn Fn() -> bool) -> bool {
        let want = self.wake();
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        while g.acked < want && !abort() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            drop(g);
            // Out of KVM_RUN if it is in there (re-sent in case it raced the entry).
            self.signal.signal();
            g = self.lock();
            let wait = (deadline - now).min(Duration::from_millis(1));
            g = self.cv.wait_timeout(g, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }

    /// Sleep until a kick newer than `kicks` or a wake newer than `wakes`.
    pub fn wait(&self, kicks: u64, wakes: u64) {
        let mut g = self.lock();
        while self.kicks() == kicks && self.wakes() == wakes {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
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
    /// Whether a kick arrived since the last call (and consume it, clearing `immediate_exit`).
    pub(crate) fn take(&mut self, state: &KickState) -> bool {
        let now = state.kicks();
        if now == self.kicks {
            return false;
        }
        self.kicks = now;
        state.clear_immediate_exit();
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
    fn a_kick_wakes_a_waiting_thread_and_sets_immediate_exit() {
        crate::watchdog::install().unwrap();
        let k = KvmKick::new();
        let mut run: kvm_bindings::kvm_run = Default::default();
        // SAFETY: `run` outlives the registration, which is removed below.
        unsafe { k.state().register_run(&mut run) };
        let st = k.state().clone();
        let h = std::thread::spawn(move || {
            let _a = st.signal().attach();
            st.wait(0, 0);
            st.kicks()
        });
        std::thread::sleep(Duration::from_millis(5));
        k.kick();
        assert_eq!(h.join().unwrap(), 1);
        k.state().unregister_run();
        assert_eq!(run.immediate_exit, 1);
        let mut c = Consumed::default();
        assert!(c.take(k.state()));
        assert!(!c.take(k.state()));
    }

    #[test]
    fn wake_and_wait_returns_on_ack_or_timeout() {
        let st = Arc::new(KickState::default());
        assert!(!st.wake_and_wait(Duration::from_millis(5), &|| false));
        let t = st.clone();
        let h = std::thread::spawn(move || {
            t.wait(0, 1);
            t.ack(t.wakes());
        });
        assert!(st.wake_and_wait(Duration::from_secs(10), &|| false));
        h.join().unwrap();
        assert!(st.wake_and_wait(Duration::from_secs(10), &|| true), "aborted");
    }
}
