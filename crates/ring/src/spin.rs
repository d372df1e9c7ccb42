//! Adaptive spinning before a sleep: a waiter first polls shared memory
//! for a bounded time (a reply on a busy connection usually arrives within
//! microseconds, and sleeping would cost two context switches).
//!
//! Spinning is adaptive ([`Spinner`]): each place that waits (in the
//! library a connection, a listener, an epoll set, a thread's poll calls;
//! in the daemon the fabric relay watching for a guest's answer)
//! remembers whether its recent waits ended within the spin budget. Where
//! they do not (a server waiting for its next client, a client waiting
//! while its server works through a deep pipeline), it sleeps at once and
//! leaves the core to the programs doing the work: two programs and the
//! daemon share two cores.

//!
//! The module knows nothing of rings (only the clock and the scheduler),
//! so that it serves any busy-waiting loop, in the library and the daemon.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

/// Longest spin before sleeping, unless a spinner is given its own. It
/// must outlast a wait that includes the peer's own wake-up: on a machine
/// whose system calls and wake-ups are slow, a round trip through a
/// sleeping peer took 38 to 47 µs, and a budget shorter than that makes
/// every wait look long, so both ends sleep for good (BENCHMARKS.md, "The
/// spin budget").
const SPIN_NS: u32 = 100_000;
/// Below this a spin is not worth starting.
const MIN_SPIN_NS: u32 = 1_000;
/// While a place has stopped spinning, every this many waits spin with the
/// full budget anyway, to notice when waits have become short again.
const PROBE_EVERY: u32 = 16;

/// How long one place spins before it sleeps, learned from its waits.
pub struct Spinner {
    /// The longest spin: where a spin pays off, the budget goes back to it.
    full_ns: u32,
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

impl Sleeping<'_> {
    /// The caller will not wait for what it spun for: the spin was wasted,
    /// whenever that comes.
    pub fn give_up(self) {
        match self.spinner {
            Some(s) => s.missed(),
            None => THREAD.with(Spinner::missed),
        }
        // Learned above; dropping would count the wait again.
        std::mem::forget(self);
    }
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
    /// A spinner with the library's budget (100 us).
    pub const fn new() -> Spinner {
        Spinner::with_budget(SPIN_NS)
    }

    /// A spinner whose longest spin is `full_ns`.
    pub const fn with_budget(full_ns: u32) -> Spinner {
        Spinner { full_ns, budget_ns: AtomicU32::new(full_ns), waits: AtomicU32::new(0) }
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
            budget = self.full_ns;
        }
        let start = Instant::now();
        if budget < MIN_SPIN_NS {
            return (!ready()).then_some(start);
        }
        match spin_for(budget as u64, start, ready) {
            Spin::Immediately => None,
            Spin::After => {
                // Spinning paid off: keep spinning here.
                self.budget_ns.store(self.full_ns, Ordering::Relaxed);
                None
            }
            Spin::Missed => Some(start),
        }
    }

    /// A wait that missed its spin has ended, `since` being when it began.
    fn slept(&self, since: Instant) {
        let waited = since.elapsed().as_nanos();
        let budget = self.budget_ns.load(Ordering::Relaxed);
        let next = if waited <= u128::from(self.full_ns) {
            // A longer spin would have caught it (the wait includes the
            // wake-up, so this errs towards sleeping).
            self.full_ns
        } else {
            // Spinning here is wasted: quarter the budget (100 us to
            // nothing in four waits).
            budget / 4
        };
        self.budget_ns.store(next, Ordering::Relaxed);
    }

    /// A miss after which the caller does not wait (it goes on with other
    /// work): spinning here was wasted.
    fn missed(&self) {
        let budget = self.budget_ns.load(Ordering::Relaxed);
        self.budget_ns.store(budget / 4, Ordering::Relaxed);
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

/// Waits a little, longer each time, for a holder that takes microseconds
/// (a process copying into a ring, the daemon returning a ring's pages, a
/// thread leaving a lock a fork waits for), where a futex or a doorbell
/// would cost more than the wait: a few spins, then yields (for a holder
/// that shares this core), then sleeps of [`BACKOFF_SLEEP`] (for one that
/// was descheduled or stopped).
#[derive(Debug, Default)]
pub struct Backoff {
    looks: u32,
    since: Option<Instant>,
}

/// How long a [`Backoff`] sleeps once spinning and yielding did not do.
pub const BACKOFF_SLEEP: std::time::Duration = std::time::Duration::from_micros(50);
/// Looks a [`Backoff`] spins for, then yields for.
const BACKOFF_SPINS: u32 = 64;
const BACKOFF_YIELDS: u32 = 1024;

impl Backoff {
    pub const fn new() -> Backoff {
        Backoff { looks: 0, since: None }
    }

    /// Waits once more; false (without waiting) once `patience` has passed
    /// since the first wait that slept.
    pub fn wait(&mut self, patience: std::time::Duration) -> bool {
        self.looks = self.looks.saturating_add(1);
        if self.looks < BACKOFF_SPINS {
            std::hint::spin_loop();
        } else if self.looks < BACKOFF_YIELDS {
            std::thread::yield_now();
        } else {
            if self.since.get_or_insert_with(Instant::now).elapsed() > patience {
                return false;
            }
            std::thread::sleep(BACKOFF_SLEEP);
        }
        true
    }

    /// How many times it waited.
    pub fn looks(&self) -> u32 {
        self.looks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(s: &Spinner) -> u32 {
        s.budget_ns.load(Ordering::Relaxed)
    }

    #[test]
    fn a_spin_that_pays_off_keeps_the_full_budget_and_a_wasted_one_quarters_it() {
        let s = Spinner::with_budget(8_000);
        assert!(s.spin(|| true).is_none(), "ready at once");
        assert_eq!(budget(&s), 8_000);
        s.spin(|| false).expect("never ready: a miss").give_up();
        assert_eq!(budget(&s), 2_000);
        s.spin(|| false).expect("a miss").give_up();
        assert_eq!(budget(&s), 500, "below the least spin worth starting");
        // Ready on the second look: spinning paid off.
        let mut looks = 0;
        s.waits.store(0, Ordering::Relaxed);
        assert!(s
            .spin(|| {
                looks += 1;
                looks > 1
            })
            .is_none());
        assert_eq!(budget(&s), 8_000, "the probe caught it: full budget again");
    }

    #[test]
    fn a_backoff_spins_then_yields_then_sleeps_until_its_patience_runs_out() {
        let mut b = Backoff::new();
        for _ in 1..BACKOFF_YIELDS {
            assert!(b.wait(std::time::Duration::ZERO), "no sleep yet: patience not looked at");
        }
        let patience = std::time::Duration::from_millis(20);
        let sleeping = Instant::now();
        let mut sleeps = 0;
        while b.wait(patience) {
            sleeps += 1;
        }
        assert!(sleeping.elapsed() >= patience, "{:?}", sleeping.elapsed());
        assert!((1..=20_000 / 50).contains(&sleeps), "{sleeps} sleeps of at least 50 us in 20 ms");
        assert!(!b.wait(patience), "and stays out of patience");
    }
}
