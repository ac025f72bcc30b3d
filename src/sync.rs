//! Locks that survive a panic elsewhere.
//!
//! A panic while a lock was held (a user's codec or hook, say) poisons it.
//! Every lock in this crate guards state that stays consistent between
//! statements (no invariant is half-updated across a call that can panic),
//! so a poisoned lock is taken as is rather than turning one panic into a
//! failure of every later request.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, through poisoning.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read-locks `l`, through poisoning.
pub(crate) fn read<T: ?Sized>(l: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-locks `l`, through poisoning.
pub(crate) fn write<T: ?Sized>(l: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}
