//! When a doorbell left rung for other sleepers has been left too long.
//!
//! A waiter that wakes while others on the same connection are still
//! counted leaves the doorbell rung for them (see `Connection::wake`). If
//! it finds nothing for itself and sleeps again, its sleep ends at once, on
//! the same ring, until the last of the others has woken and taken it. A
//! sleeper that died asleep (its process killed) never does: its count
//! stays, and every waiter on the connection would spin on the ring for
//! ever. So one ring left for others longer than [`STALE_AFTER_NS`] is
//! taken anyway.
//!
//! "The same ring" is told by what the peer answered: every ring answers a
//! new arming and records it (see `vsocket_ring`), so the pair of
//! answered armings changes with each ring and only then. Counting
//! wake-ups instead would take a ring from a sleeper that is alive but
//! slow to run (a forked child on a busy machine), which then sleeps
//! through it.

use std::sync::atomic::{AtomicU64, Ordering};

/// How long one ring may be left for other sleepers before it is taken
/// (a quarter of the sleep cap): a sleeper that has not woken for it by
/// then is taken to be dead.
pub const STALE_AFTER_NS: u64 = 50_000_000;

/// The ring this process last found left for others, and since when
/// (0: none). Threads of the process share it; a race between two of them
/// only restarts the wait.
#[derive(Debug, Default)]
pub struct LeftRung {
    ring: AtomicU64,
    since_ns: AtomicU64,
}

impl LeftRung {
    /// A waiter woke on ring `ring` (the answered armings) at `now_ns`,
    /// with others still counted. Returns whether the ring has been left
    /// for them too long, and must be taken.
    pub fn too_long(&self, ring: u64, now_ns: u64) -> bool {
        let since = self.since_ns.load(Ordering::Relaxed);
        let before = self.ring.swap(ring, Ordering::Relaxed);
        if since == 0 || before != ring {
            self.since_ns.store(now_ns.max(1), Ordering::Relaxed);
            return false;
        }
        if now_ns.saturating_sub(since) < STALE_AFTER_NS {
            return false;
        }
        self.since_ns.store(0, Ordering::Relaxed);
        true
    }

    /// The doorbell was taken (by this process's last sleeper, or as too
    /// old): the next ring left for others starts afresh.
    pub fn taken(&self) {
        self.since_ns.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn one_ring_left_for_others_is_taken_only_after_a_while() {
        let left = LeftRung::default();
        assert!(!left.too_long(7, 1_000 * MS), "first seen");
        assert!(!left.too_long(7, 1_010 * MS));
        assert!(!left.too_long(7, 1_049 * MS));
        assert!(left.too_long(7, 1_050 * MS), "50 ms on the same ring");
        assert!(!left.too_long(7, 1_051 * MS), "taken: the next one starts afresh");
    }

    #[test]
    fn a_new_ring_starts_the_wait_again() {
        let left = LeftRung::default();
        assert!(!left.too_long(7, 1_000 * MS));
        assert!(!left.too_long(9, 1_040 * MS), "a new ring, not the same one left");
        assert!(!left.too_long(9, 1_080 * MS));
        assert!(left.too_long(9, 1_090 * MS));
    }

    #[test]
    fn a_taken_doorbell_forgets_the_ring() {
        let left = LeftRung::default();
        assert!(!left.too_long(7, 1_000 * MS));
        left.taken();
        // The same answered armings later: the doorbell was rung again by
        // someone other than the peer (the daemon, say). A new wait.
        assert!(!left.too_long(7, 2_000 * MS));
        assert!(left.too_long(7, 2_050 * MS));
    }

    #[test]
    fn a_clock_at_zero_still_starts_a_wait() {
        let left = LeftRung::default();
        assert!(!left.too_long(3, 0));
        assert!(left.too_long(3, STALE_AFTER_NS + 1));
    }
}
