//! Locking that survives a panicked holder.
//!
//! The daemon is built with `panic = "abort"`, so a poisoned mutex can only
//! be met in tests; where it is, the data is still the last consistent
//! state its holder left, and serving on is better than failing every
//! later caller.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking it over if a holder panicked.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
