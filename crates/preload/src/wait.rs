//! Waiting for a connection: spin briefly, then sleep in the kernel.
//!
//! A waiter first polls shared memory for a bounded time (a reply on a
//! busy connection usually arrives within microseconds, and sleeping would
//! cost two context switches). Then it arms the ring's `waiting` flag,
//! checks once more, and sleeps in `poll` on the doorbell, so an idle
//! program uses no CPU and signals interrupt it as they would a kernel
//! socket. Sleeps are capped so that a wake-up lost to another waiter of
//! the same connection in this process (two threads on one socket) costs
//! latency, never a hang.
//!
//! Spinning is adaptive ([`Spinner`]): each place that waits (a connection,
//! a listener, an epoll set, a thread's poll calls) remembers whether its
//! recent waits ended within the spin budget. Where they do not (a server
//! waiting for its next client, a client waiting while its server works
//! through a deep pipeline), it sleeps at once and leaves the core to the
//! programs doing the work: two programs and the daemon share two cores.

use crate::conn::Connection;
use crate::sys::{self, Errno, SysResult};
use std::sync::atomic::{AtomicU32, Ordering};

/// Longest spin before sleeping.
const SPIN_NS: u32 = 30_000;
/// Below this a spin is not worth starting.
const MIN_SPIN_NS: u32 = 1_000;
/// While a place has stopped spinning, every this many waits spin with the
/// full budget anyway, to notice when waits have become short again.
const PROBE_EVERY: u32 = 16;
/// Longest single sleep before shared memory is checked again.
pub const MAX_SLEEP_MS: i32 = 200;

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
    since: u64,
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
    fn spin_inner(&self, mut ready: impl FnMut() -> bool) -> Option<u64> {
        let mut budget = self.budget_ns.load(Ordering::Relaxed);
        if budget < MIN_SPIN_NS && self.waits.fetch_add(1, Ordering::Relaxed).is_multiple_of(PROBE_EVERY) {
            budget = SPIN_NS;
        }
        let start = sys::now_ns();
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
    fn slept(&self, since: u64) {
        let waited = sys::now_ns().saturating_sub(since);
        let budget = self.budget_ns.load(Ordering::Relaxed);
        let next = if waited <= SPIN_NS as u64 {
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

fn spin_for(budget_ns: u64, start: u64, mut ready: impl FnMut() -> bool) -> Spin {
    if ready() {
        return Spin::Immediately;
    }
    let mut i = 0u32;
    loop {
        i = i.wrapping_add(1);
        if i.is_multiple_of(32) {
            if sys::now_ns().saturating_sub(start) > budget_ns {
                return Spin::Missed;
            }
            // Two busy programs and the daemon may share fewer cores than
            // they are: let whoever else is runnable here make progress.
            sys::yield_now();
        }
        std::hint::spin_loop();
        if ready() {
            return Spin::After;
        }
    }
}

/// Blocks until `conn` satisfies `interest` (epoll bits), or a signal
/// interrupts (EINTR).
pub fn block(conn: &Connection, interest: u32) -> SysResult<()> {
    block_until(conn, interest, || conn.satisfies(interest))
}

/// Blocks until `ready` holds, sleeping on `conn`'s doorbell armed for
/// `interest` (the events that can change `ready`), or a signal interrupts.
pub fn block_until(conn: &Connection, interest: u32, mut ready: impl FnMut() -> bool) -> SysResult<()> {
    let Some(_sleeping) = spin_thread(&mut ready) else {
        return Ok(());
    };
    sleep(conn, interest, ready)
}

fn sleep(conn: &Connection, interest: u32, mut ready: impl FnMut() -> bool) -> SysResult<()> {
    // SO_RCVTIMEO / SO_SNDTIMEO: EAGAIN when they run out, as the kernel does.
    let timeout_ms = conn.timeout_ms(interest);
    let deadline = (timeout_ms > 0).then(|| sys::now_ms() + timeout_ms);
    loop {
        conn.arm(interest);
        if ready() {
            return Ok(());
        }
        let sleep = match deadline {
            None => MAX_SLEEP_MS,
            Some(d) => {
                let left = d - sys::now_ms();
                if left <= 0 {
                    return Err(Errno(libc::EAGAIN));
                }
                left.min(MAX_SLEEP_MS as i64) as i32
            }
        };
        let mut pfd = [libc::pollfd { fd: conn.doorbell, events: libc::POLLIN, revents: 0 }];
        crate::signals::before_sleep();
        match sys::poll(&mut pfd, sleep) {
            Ok(_) => {}
            // The kernel restarts a socket call whose signal handler asked
            // for it (SA_RESTART), unless the socket has a timeout.
            Err(Errno(libc::EINTR)) if crate::signals::restart_after_interrupt(deadline.is_some()) => {}
            Err(e) => return Err(e),
        }
        if pfd[0].revents != 0 {
            conn.drain_doorbell();
        }
        if ready() {
            return Ok(());
        }
    }
}
