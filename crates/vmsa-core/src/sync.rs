//! The one lock vmsa-core uses: `std::sync::Mutex` with the `std` feature, a spin lock without
//! it (for `no_std` embedders such as an SVSM, where a vCPU's VMSA lock is held for a few
//! hundred instructions at most).

#[cfg(feature = "std")]
mod imp {
    pub(crate) type Lock<T> = std::sync::Mutex<T>;
    pub(crate) type Guard<'a, T> = std::sync::MutexGuard<'a, T>;

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

#[cfg(not(feature = "std"))]
mod imp {
    pub(crate) type Lock<T> = spin::Mutex<T>;
    pub(crate) type Guard<'a, T> = spin::MutexGuard<'a, T>;

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

pub(crate) use imp::{Guard, Lock, get_mut, into_inner, lock};
