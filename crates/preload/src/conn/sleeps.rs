//! One doorbell per sleep (ARCHITECTURE §4, "One doorbell per sleep").
//!
//! A waiter on many connections at once (an epoll set) names each of its
//! sleeps, and arms the connections it is their only waiter on with the
//! name (`Consumer::arm_in_sleep`). A process that writes to them learns
//! the name of the arming it answers (`Producer::answered_sleep`) and
//! rings a doorbell only for a sleep it has not rung one for: that one
//! wakes the waiter, which then looks at every connection it armed.
//!
//! Names are unique to a sleep: a random start for each process (drawn
//! again in a forked child, which has its own process id) and a counter.
//! A record says only "a byte went on a doorbell of this sleep", which
//! stays true, so the records are a small ring of the latest, with
//! nothing to expire; a name the ring has forgotten is rung again.

use crate::sys;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};

/// The latest sleeps this process has rung a doorbell for.
const RECORDS: usize = 16;

static RUNG: [AtomicU64; RECORDS] = [const { AtomicU64::new(0) }; RECORDS];
static NEXT_RECORD: AtomicUsize = AtomicUsize::new(0);

/// The process whose names [`NEXT_NAME`] counts (0: none drawn yet).
static NAMES_OF: AtomicI32 = AtomicI32::new(0);
static NEXT_NAME: AtomicU64 = AtomicU64::new(0);

/// A name for a sleep of this process, never given before (odd: 0 is no
/// name).
pub fn name() -> u64 {
    let pid = sys::getpid();
    if NAMES_OF.load(Ordering::Acquire) != pid {
        // First use in this process (or in a child after fork). Two
        // threads drawing at once each draw at random: a name is still
        // new but for the odds of two random 64-bit starts meeting.
        let start = vsocket_sys::random_bytes::<8>()
            .map(u64::from_ne_bytes)
            .unwrap_or_else(|_| sys::now_ns() ^ (pid as u64).rotate_left(40));
        NEXT_NAME.store(start | 1, Ordering::Relaxed);
        NAMES_OF.store(pid, Ordering::Release);
    }
    NEXT_NAME.fetch_add(2, Ordering::Relaxed)
}

/// Has this process rung a doorbell for sleep `name`?
pub fn rung(name: u64) -> bool {
    name != 0 && RUNG.iter().any(|r| r.load(Ordering::Acquire) == name)
}

/// This process has rung a doorbell for sleep `name` (call it after the
/// byte is sent: another thread that reads the record may skip its own).
pub fn record(name: u64) {
    if name == 0 || rung(name) {
        return;
    }
    let slot = NEXT_RECORD.fetch_add(1, Ordering::Relaxed) % RECORDS;
    RUNG[slot].store(name, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_new_and_records_are_of_the_latest() {
        let first = name();
        let names: Vec<u64> = (0..100).map(|_| name()).collect();
        assert!(names.iter().all(|&n| n != first && n & 1 == 1));
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());

        assert!(!rung(first));
        record(first);
        assert!(rung(first));
        // Recording again takes no slot; the oldest go once RECORDS more
        // are recorded.
        record(first);
        for &n in &names[..RECORDS] {
            record(n);
        }
        assert!(!rung(first));
        assert!(rung(names[RECORDS - 1]));
        assert!(!rung(0));
    }
}
