//! The one lock vmsa-core uses: `std::sync::Mutex` with the `std` feature, a spin lock without
//! it (for `no_std` embedders such as an SVSM, where a vCPU's VMSA lock is held for a few
//! hundred instructions at most).
//!
//! With the `shuttle` feature (model checking; tests only), a lock created inside a
//! [shuttle](https://docs.rs/shuttle) execution is a model-checked mutex, so that every acquire
//! of a vmsa-core lock is a point where shuttle's scheduler may switch threads, and a lock
//! created anywhere else stays a `std::sync::Mutex`. The choice is made once per lock, at
//! creation: the test suite builds vmsa-core with this feature (a dev-dependency), and every
//! ordinary test in that build must keep working on real threads.

#[cfg(all(feature = "std", not(feature = "shuttle")))]
mod imp {
    pub(crate) type Lock<T> = std::sync::Mutex<T>;
    pub(crate) type Guard<'a, T> = std::sync::MutexGuard<'a, T>;

    /// A lock around hardware-model state (see the `shuttle` version); here a plain lock.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn leaf<T>(value: T) -> Lock<T> {
        Lock::new(value)
    }

    /// Lock `m`. Every update under a vmsa-core lock completes before any call that can
    /// panic, so a poisoned lock still guards a consistent value.
    pub(crate) fn lock<T>(m: &Lock<T>) -> Guard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value of a lock the caller owns.
    pub(crate) fn get_mut<T>(m: &mut Lock<T>) -> &mut T {
        m.get_mut().unwrap_or_else(|p| p.into_inner())
    }

    /// The value of a lock, consumed.
    pub(crate) fn into_inner<T>(m: Lock<T>) -> T {
        m.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(feature = "shuttle")]
mod imp {
    use core::fmt;
    use core::ops::{Deref, DerefMut};

    use shuttle::future::batch_semaphore::{BatchSemaphore, Fairness};

    /// A `std` mutex, or a model-checked one when created inside a shuttle execution.
    pub(crate) enum Lock<T> {
        /// Created outside any shuttle execution: a real lock for real threads.
        Std(std::sync::Mutex<T>),
        /// Created inside a shuttle execution.
        Model(ModelMutex<T>),
    }

    /// A mutex whose acquire is a shuttle scheduling point and whose release is not.
    ///
    /// It is shuttle's own `Mutex` (a one-permit `BatchSemaphore` in front of a `std` mutex)
    /// less the scheduling point shuttle puts before every release. That point adds no
    /// behaviour: a release only ever lets other threads proceed, so any schedule that switches
    /// just before it equals one that switches at the releasing thread's next scheduling point
    /// (a release is a left mover, in Lipton's reduction), and vmsa-core touches no shared
    /// state between a release and its next acquire. Dropping it halves the scheduling points
    /// per critical section and so shrinks the exhaustive search by orders of magnitude.
    pub(crate) struct ModelMutex<T> {
        turn: BatchSemaphore,
        value: std::sync::Mutex<T>,
    }

    /// A held [`Lock`].
    pub(crate) enum Guard<'a, T> {
        /// A held `std` mutex.
        Std(std::sync::MutexGuard<'a, T>),
        /// A held model mutex; the permit is returned when it drops.
        Model(ModelGuard<'a, T>),
    }

    /// A held [`ModelMutex`].
    pub(crate) struct ModelGuard<'a, T> {
        value: Option<std::sync::MutexGuard<'a, T>>,
        turn: &'a BatchSemaphore,
    }

    impl<T> Drop for ModelGuard<'_, T> {
        fn drop(&mut self) {
            self.value = None;
            self.turn.release_no_scheduling_point(1);
        }
    }

    impl<T> Lock<T> {
        /// A lock around `value`, a model one when a shuttle execution is running here.
        pub(crate) fn new(value: T) -> Self {
            if shuttle::current::try_get_current_task().is_some() {
                Self::Model(ModelMutex {
                    turn: BatchSemaphore::new(1, Fairness::Unfair),
                    value: std::sync::Mutex::new(value),
                })
            } else {
                Self::Std(std::sync::Mutex::new(value))
            }
        }
    }

    /// A lock that is never a scheduling point, even inside a shuttle execution: for the state
    /// of a model of the hardware (the test platform), which is only ever locked innermost and
    /// for one platform call, so the model checks treat each platform call as one atomic
    /// hardware step. No interleaving is lost by that: a platform call concerns a page the
    /// caller's vCPU lock or `&mut Vm` already owns, or a guest frame, and the only call whose
    /// order between threads could matter, allocation, happens under `&mut Vm` alone.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn leaf<T>(value: T) -> Lock<T> {
        Lock::Std(std::sync::Mutex::new(value))
    }

    impl<T: Default> Default for Lock<T> {
        fn default() -> Self {
            Self::new(T::default())
        }
    }

    impl<T: fmt::Debug> fmt::Debug for Lock<T> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                Self::Std(m) => m.fmt(f),
                Self::Model(m) => m.value.fmt(f),
            }
        }
    }

    impl<T> Deref for Guard<'_, T> {
        type Target = T;

        fn deref(&self) -> &T {
            match self {
                Self::Std(g) => g,
                Self::Model(g) => g.value.as_ref().expect("held until dropped"),
            }
        }
    }

    impl<T> DerefMut for Guard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            match self {
                Self::Std(g) => g,
                Self::Model(g) => g.value.as_mut().expect("held until dropped"),
            }
        }
    }

    /// Lock `m` (see the `std` version for why poisoning is ignored).
    pub(crate) fn lock<T>(m: &Lock<T>) -> Guard<'_, T> {
        match m {
            Lock::Std(m) => Guard::Std(m.lock().unwrap_or_else(|p| p.into_inner())),
            Lock::Model(m) => {
                // The scheduling point. It fails only once the execution has stopped (its
                // teardown unwinds the threads); the lock is then taken as if it were free.
                let _ = m.turn.acquire_blocking(1);
                let value = m.value.lock().unwrap_or_else(|p| p.into_inner());
                Guard::Model(ModelGuard {
                    value: Some(value),
                    turn: &m.turn,
                })
            }
        }
    }

    /// The value of a lock the caller owns.
    pub(crate) fn get_mut<T>(m: &mut Lock<T>) -> &mut T {
        match m {
            Lock::Std(m) => m.get_mut().unwrap_or_else(|p| p.into_inner()),
            Lock::Model(m) => m.value.get_mut().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// The value of a lock, consumed.
    pub(crate) fn into_inner<T>(m: Lock<T>) -> T {
        match m {
            Lock::Std(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
            Lock::Model(m) => m.value.into_inner().unwrap_or_else(|p| p.into_inner()),
        }
    }
}

#[cfg(not(feature = "std"))]
mod imp {
    pub(crate) type Lock<T> = spin::Mutex<T>;
    pub(crate) type Guard<'a, T> = spin::MutexGuard<'a, T>;

    /// A lock around hardware-model state (see the `shuttle` version); here a plain lock.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn leaf<T>(value: T) -> Lock<T> {
        Lock::new(value)
    }

    /// Lock `m`.
    pub(crate) fn lock<T>(m: &Lock<T>) -> Guard<'_, T> {
        m.lock()
    }

    /// The value of a lock the caller owns.
    pub(crate) fn get_mut<T>(m: &mut Lock<T>) -> &mut T {
        m.get_mut()
    }

    /// The value of a lock, consumed.
    pub(crate) fn into_inner<T>(m: Lock<T>) -> T {
        m.into_inner()
    }
}

#[cfg(any(test, feature = "testing"))]
pub(crate) use imp::leaf;
pub(crate) use imp::{Guard, Lock, get_mut, into_inner, lock};
