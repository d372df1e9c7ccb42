//! Per-guest quotas: live connections, their shared memory, and control
//! channels.
//!
//! Every guest has its own [`QuotaUsage`], in the counters of its
//! [`GuestSlot`](crate::guest::GuestSlot) (which outlives policy changes), and its own limits
//! (`Guest::quotas` in the policy in force, read at each take, so a change
//! of limits applies to the next connect or channel), so a guest that
//! reaches a limit is refused on its own account and never takes from
//! another's share. What is held is taken before the thing exists and
//! given back exactly once, to the slots it was taken from (never looked up
//! again by `GuestId`, which a policy change may move or end):
//!
//! - a connection takes one connection and one segment's bytes from each
//!   guest it joins (once when both ends are in one guest), as a
//!   [`Charge`](crate::charge::Charge)
//!   (holding those guests' slots) stored in its `ConnectionRecord`; the
//!   charge is given back when the record is retired (`Daemon::reap` or
//!   `Daemon::reclaim`) or, failing that, when it is dropped, so whatever
//!   policy changes, resets or guest removals happen meanwhile; a charge
//!   never stored (the connection never came to be) is given back when
//!   dropped;
//! - a control channel takes one channel for as long as its thread runs
//!   (`attach::ChannelSlot`, holding the slot).
//!
//! Segments the pool keeps for reuse between two processes are not live
//! connections and are not counted (see docs/ARCHITECTURE.md §3, *Quotas*).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::sync::lock;
use vsocket_policy::Quotas;

/// The quotas a guest can exceed, as named in metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    Connections,
    SharedMemory,
    Channels,
}

impl Quota {
    pub const ALL: [Quota; 3] = [Quota::Connections, Quota::SharedMemory, Quota::Channels];

    /// The name in metrics labels, reports and logs.
    pub fn name(self) -> &'static str {
        match self {
            Quota::Connections => "connections",
            Quota::SharedMemory => "shared_memory",
            Quota::Channels => "channels",
        }
    }

    /// The limit of this kind in `quotas`.
    pub fn limit(self, quotas: &Quotas) -> u64 {
        match self {
            Quota::Connections => quotas.max_connections,
            Quota::SharedMemory => quotas.max_shared_memory,
            Quota::Channels => quotas.max_channels,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How often at most a guest's refusals of one kind are logged: a program
/// retrying a refused connect in a loop must not flood the log.
pub const WARN_INTERVAL: Duration = Duration::from_secs(1);

/// How often at most a guest at a connection quota makes the daemon look
/// for closed connections to retire before refusing it (each look scans
/// every connection on the host, under the lock other guests' connects
/// take).
pub const REAP_INTERVAL: Duration = Duration::from_millis(10);

/// What one guest holds now, and how often it was refused.
#[derive(Debug, Default)]
pub struct QuotaUsage {
    /// Connections and their segment bytes, changed together.
    held: Mutex<Held>,
    channels: AtomicU64,
    exceeded: [AtomicU64; 3],
    /// When a refusal of each kind was last logged (ms since the daemon's
    /// start, 0 = never), and refusals since then not logged.
    last_warned_ms: [AtomicU64; 3],
    unlogged: [AtomicU64; 3],
    /// When this guest last had the daemon reap on its behalf (as above).
    last_reap_ms: AtomicU64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Held {
    connections: u64,
    shared_memory: u64,
}

impl QuotaUsage {
    /// Takes one connection with a segment of `bytes`, if both fit.
    pub fn take_connection(&self, limits: &Quotas, bytes: u64) -> Result<(), Quota> {
        let mut held = lock(&self.held);
        if held.connections >= limits.max_connections {
            return Err(Quota::Connections);
        }
        if held.shared_memory.saturating_add(bytes) > limits.max_shared_memory {
            return Err(Quota::SharedMemory);
        }
        held.connections += 1;
        held.shared_memory += bytes;
        Ok(())
    }

    /// Gives back what [`take_connection`](Self::take_connection) took.
    pub fn give_back_connection(&self, bytes: u64) {
        let mut held = lock(&self.held);
        debug_assert!(held.connections >= 1 && held.shared_memory >= bytes, "quota given back twice");
        held.connections = held.connections.saturating_sub(1);
        held.shared_memory = held.shared_memory.saturating_sub(bytes);
    }

    /// Takes one control channel, if it fits.
    pub fn take_channel(&self, limits: &Quotas) -> Result<(), Quota> {
        self.channels
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limits.max_channels).then_some(n + 1))
            .map(|_| ())
            .map_err(|_| Quota::Channels)
    }

    pub fn give_back_channel(&self) {
        let _ = self.channels.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Live connections held now.
    pub fn connections(&self) -> u64 {
        lock(&self.held).connections
    }

    /// Segment bytes of live connections held now.
    pub fn shared_memory(&self) -> u64 {
        lock(&self.held).shared_memory
    }

    /// Control channels open now.
    pub fn channels(&self) -> u64 {
        self.channels.load(Ordering::Relaxed)
    }

    /// Refusals of this kind so far.
    pub fn exceeded(&self, quota: Quota) -> u64 {
        self.exceeded[quota.index()].load(Ordering::Relaxed)
    }

    /// May this guest, at a limit at `now_ms`, have the daemon reap now?
    /// At most once per [`REAP_INTERVAL`].
    pub fn reap_due(&self, now_ms: u64) -> bool {
        let now = now_ms.max(1);
        let last = self.last_reap_ms.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= REAP_INTERVAL.as_millis() as u64)
            && self.last_reap_ms.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_ok()
    }

    /// Counts a refusal at `now_ms` (ms since the daemon started). Returns
    /// `Some(unlogged)` when this refusal should be logged, `unlogged` being
    /// how many before it were not (at most one log line per
    /// [`WARN_INTERVAL`] per guest and kind).
    pub fn note_exceeded(&self, quota: Quota, now_ms: u64) -> Option<u64> {
        let i = quota.index();
        self.exceeded[i].fetch_add(1, Ordering::Relaxed);
        // 0 means never: a refusal in the daemon's first millisecond still logs.
        let now = now_ms.max(1);
        let last = self.last_warned_ms[i].load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= WARN_INTERVAL.as_millis() as u64;
        if due && self.last_warned_ms[i].compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            Some(self.unlogged[i].swap(0, Ordering::Relaxed))
        } else {
            self.unlogged[i].fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Milliseconds since the daemon first asked (its start, in practice).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(connections: u64, shared_memory: u64) -> Quotas {
        Quotas { max_connections: connections, max_shared_memory: shared_memory, max_channels: 2 }
    }

    #[test]
    fn channels_are_limited_and_given_back() {
        let usage = QuotaUsage::default();
        let lim = limits(1, 1);
        usage.take_channel(&lim).unwrap();
        usage.take_channel(&lim).unwrap();
        assert_eq!(usage.take_channel(&lim), Err(Quota::Channels));
        assert_eq!(usage.channels(), 2);
        usage.give_back_channel();
        assert_eq!(usage.channels(), 1);
        usage.take_channel(&lim).unwrap();
        usage.give_back_channel();
        usage.give_back_channel();
        assert_eq!(usage.channels(), 0);
        usage.give_back_channel();
        assert_eq!(usage.channels(), 0, "never below zero");
    }

    #[test]
    fn refusals_are_all_counted_but_logged_once_a_second() {
        let usage = QuotaUsage::default();
        assert_eq!(usage.note_exceeded(Quota::Connections, 0), Some(0), "the first is logged");
        assert_eq!(usage.note_exceeded(Quota::Connections, 10), None);
        assert_eq!(usage.note_exceeded(Quota::Connections, 999), None);
        assert_eq!(usage.note_exceeded(Quota::Channels, 999), Some(0), "each kind on its own");
        assert_eq!(usage.note_exceeded(Quota::Connections, 1001), Some(2), "two went unlogged");
        assert_eq!(usage.note_exceeded(Quota::Connections, 1500), None);
        assert_eq!(usage.exceeded(Quota::Connections), 5);
        assert_eq!(usage.exceeded(Quota::Channels), 1);
        assert_eq!(usage.exceeded(Quota::SharedMemory), 0);
    }

    #[test]
    fn reaping_on_a_guests_behalf_is_throttled() {
        let usage = QuotaUsage::default();
        assert!(usage.reap_due(0));
        assert!(!usage.reap_due(5));
        assert!(usage.reap_due(11));
        assert!(!usage.reap_due(20));
        assert!(usage.reap_due(21));
    }
}
