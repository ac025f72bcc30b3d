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
