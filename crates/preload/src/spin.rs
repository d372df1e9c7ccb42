//! Adaptive spinning before a sleep: a waiter first polls shared memory
//! for a bounded time (a reply on a busy connection usually arrives within
//! microseconds, and sleeping would cost two context switches).
//!
//! Spinning is adaptive ([`Spinner`]): each place that waits (a connection,
//! a listener, an epoll set, a thread's poll calls) remembers whether its
//! recent waits ended within the spin budget. Where they do not (a server
//! waiting for its next client, a client waiting while its server works
//! through a deep pipeline), it sleeps at once and leaves the core to the
//! programs doing the work: two programs and the daemon share two cores.

//!
//! The module knows nothing of the library (only the clock and the
//! scheduler), so that it can serve any busy-waiting loop.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

/// Longest spin before sleeping.
const SPIN_NS: u32 = 30_000;
/// Below this a spin is not worth starting.
const MIN_SPIN_NS: u32 = 1_000;
/// While a place has stopped spinning, every this many waits spin with the
/// full budget anyway, to notice when waits have become short again.
const PROBE_EVERY: u32 = 16;

/// How long one place spins before it sleeps, learned from its waits.
pub struct Spinner {
    budget_ns: AtomicU32,
    waits: AtomicU32,
}

thread_local! {
    /// The spinner of blocking calls on connections: connections come and
    /// go (a client opening one per request), the thread's pattern stays.
    static THREAD: Spinner = const { Spinner::new() };
}

/// A wait that has missed its spin and will sleep; when dropped (the wait
/// is over) its length teaches the spinner.
#[must_use]
pub struct Sleeping<'a> {
    /// `None`: the thread's spinner.
    spinner: Option<&'a Spinner>,
    since: Instant,
}

impl Drop for Sleeping<'_> {
    fn drop(&mut self) {
        match self.spinner {
            Some(s) => s.slept(self.since),
            None => THREAD.with(|s| s.slept(self.since)),
        }
    }
}

impl Default for Spinner {
    fn default() -> Self {
        Spinner::new()
    }
}

impl Spinner {
    pub const fn new() -> Spinner {
        Spinner { budget_ns: AtomicU32::new(SPIN_NS), waits: AtomicU32::new(0) }
    }

    /// Spins until `ready()` (`None`) or this place's budget is spent.
    pub fn spin(&self, ready: impl FnMut() -> bool) -> Option<Sleeping<'_>> {
        let since = self.spin_inner(ready)?;
        Some(Sleeping { spinner: Some(self), since })
    }

    /// Spins; on a miss returns when the spin began.
    fn spin_inner(&self, mut ready: impl FnMut() -> bool) -> Option<Instant> {
        let mut budget = self.budget_ns.load(Ordering::Relaxed);
        if budget < MIN_SPIN_NS && self.waits.fetch_add(1, Ordering::Relaxed).is_multiple_of(PROBE_EVERY) {
            budget = SPIN_NS;
        }
        let start = Instant::now();
        if budget < MIN_SPIN_NS {
            return (!ready()).then_some(start);
        }
        match spin_for(budget as u64, start, ready) {
            Spin::Immediately => None,
            Spin::After => {
                // Spinning paid off: keep spinning here.
                self.budget_ns.store(SPIN_NS, Ordering::Relaxed);
                None
            }
            Spin::Missed => Some(start),
        }
    }

    /// A wait that missed its spin has ended, `since` being when it began.
    fn slept(&self, since: Instant) {
        let waited = since.elapsed().as_nanos();
        let budget = self.budget_ns.load(Ordering::Relaxed);
        let next = if waited <= SPIN_NS as u128 {
            // A longer spin would have caught it (the wait includes the
            // wake-up, so this errs towards sleeping).
            SPIN_NS
        } else {
            // Spinning here is wasted: quarter the budget (30 us to nothing
            // in three waits).
            budget / 4
        };
        self.budget_ns.store(next, Ordering::Relaxed);
    }
}

/// Spins with the calling thread's spinner.
pub fn spin_thread(ready: impl FnMut() -> bool) -> Option<Sleeping<'static>> {
    let since = THREAD.with(|s| s.spin_inner(ready))?;
    Some(Sleeping { spinner: None, since })
}

enum Spin {
    Immediately,
    After,
    Missed,
}

fn spin_for(budget_ns: u64, start: Instant, mut ready: impl FnMut() -> bool) -> Spin {
    if ready() {
        return Spin::Immediately;
    }
    let mut i = 0u32;
    loop {
        i = i.wrapping_add(1);
        if i.is_multiple_of(32) {
            if start.elapsed().as_nanos() > budget_ns as u128 {
                return Spin::Missed;
            }
            // Two busy programs and the daemon may share fewer cores than
            // they are: let whoever else is runnable here make progress.
            std::thread::yield_now();
        }
        std::hint::spin_loop();
        if ready() {
            return Spin::After;
        }
    }
}
