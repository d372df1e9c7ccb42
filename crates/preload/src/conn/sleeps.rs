//! One wake-up per sleep. A waiter that sleeps on many connections at
//! once (an epoll set) arms them all naming one *sleep*; a peer that
//! writes to several of them in a row (a server answering a pipelined
//! client's connections in one pass) needs to ring only the first
//! doorbell: the set wakes on it and looks at every connection it armed
//! before it sleeps again. Each further ring would cost the writer a
//! system call and the sleeper a spurious wake-up.
//!
//! A writer skips a ring only when all of these hold (`Connection::kick_for`):
//! - the arming it answers names a sleep (0 names none: a blocking call's,
//!   a cold connection's, a nested set's);
//! - this thread rang a doorbell for that same sleep, on a connection whose
//!   peer half is in the same mapping (a chunk is shared only by one pair
//!   of processes, so a peer that forges names reaches only its own
//!   connections);
//! - the peer's end counts exactly one sleeper (another waiter on the
//!   connection, a thread blocked in `recv`, is woken by this doorbell
//!   only).
//!
//! Names are unique among the processes that may share a connection's end:
//! the process id in the top bits, below it a count that starts, in each
//! program image, from the monotonic clock (so a new image after exec does
//! not name its sleeps as the old one did).

use crate::sys;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bits of a name below the process id (Linux's pid_max is at most 2^22).
const COUNT_BITS: u32 = 42;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
/// How many recent (mapping, sleep) pairs a thread remembers ringing.
const REMEMBERED: usize = 4;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A fresh name for a sleep about to be armed.
pub fn fresh() -> u64 {
    if NEXT.load(Ordering::Relaxed) == 0 {
        // The first sleep of this image. A race here only picks one of
        // two clock readings.
        let _ = NEXT.compare_exchange(0, sys::now_ns().max(1), Ordering::Relaxed, Ordering::Relaxed);
    }
    name(sys::getpid() as u32, NEXT.fetch_add(1, Ordering::Relaxed))
}

fn name(pid: u32, count: u64) -> u64 {
    (u64::from(pid) << COUNT_BITS) | (count & COUNT_MASK)
}

/// The sleeps a thread rang for last, by the mapping of the connections
/// rung (see the module docs).
#[derive(Clone, Copy, Default)]
pub struct Rung {
    recent: [(usize, u64); REMEMBERED],
    next: usize,
}

impl Rung {
    /// Was sleep `sleep` of the peer in `mapping` rung already?
    pub fn covers(&self, mapping: usize, sleep: u64) -> bool {
        sleep != 0 && self.recent.contains(&(mapping, sleep))
    }

    /// A doorbell of a connection in `mapping` was rung for `sleep`.
    pub fn note(&mut self, mapping: usize, sleep: u64) {
        if sleep == 0 || self.covers(mapping, sleep) {
            return;
        }
        self.recent[self.next] = (mapping, sleep);
        self.next = (self.next + 1) % REMEMBERED;
    }
}

thread_local! {
    static RUNG: Cell<Rung> = const { Cell::new(Rung { recent: [(0, 0); REMEMBERED], next: 0 }) };
}

/// [`Rung::covers`] for the calling thread.
pub fn covered(mapping: usize, sleep: u64) -> bool {
    RUNG.with(|r| r.get().covers(mapping, sleep))
}

/// [`Rung::note`] for the calling thread.
pub fn note(mapping: usize, sleep: u64) {
    RUNG.with(|r| {
        let mut rung = r.get();
        rung.note(mapping, sleep);
        r.set(rung);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sleep_rung_once_is_covered_in_its_mapping_only() {
        let mut rung = Rung::default();
        assert!(!rung.covers(10, 7));
        rung.note(10, 7);
        assert!(rung.covers(10, 7));
        assert!(!rung.covers(11, 7), "another mapping: another pair of processes");
        assert!(!rung.covers(10, 9), "another sleep");
    }

    #[test]
    fn an_arming_that_names_no_sleep_is_never_covered() {
        let mut rung = Rung::default();
        rung.note(10, 0);
        assert!(!rung.covers(10, 0));
        assert!(!Rung::default().covers(0, 0), "the empty slots match nothing");
    }

    #[test]
    fn the_oldest_of_more_sleeps_than_are_remembered_is_forgotten() {
        let mut rung = Rung::default();
        for sleep in 1..=REMEMBERED as u64 + 1 {
            rung.note(10, sleep);
        }
        assert!(!rung.covers(10, 1));
        assert!((2..=REMEMBERED as u64 + 1).all(|s| rung.covers(10, s)));
        // Noting one remembered again does not push another out.
        rung.note(10, 2);
        assert!((2..=REMEMBERED as u64 + 1).all(|s| rung.covers(10, s)));
    }

    #[test]
    fn names_are_fresh_and_carry_the_process_id() {
        let a = fresh();
        let b = fresh();
        assert_ne!(a, b);
        assert_ne!(a, 0);
        assert_eq!(a >> COUNT_BITS, u64::from(sys::getpid() as u32));
        assert_ne!(name(1, 5), name(2, 5), "two processes never share a name");
        assert_eq!(name(1, (1 << COUNT_BITS) + 5), name(1, 5), "the count stays below the process id");
    }
}
