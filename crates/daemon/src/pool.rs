//! Ready-made connection segments.
//!
//! Creating a segment (memfd_create, ftruncate, seals, mmap, writing the
//! header) costs several system calls and a page fault; a connect should
//! not wait for them. A background thread keeps a few segments ready, and
//! the broker takes one per connection (creating one inline only when the
//! pool has run dry under a burst).
//!
//! Better still is a segment that has served before: when both ends of a
//! connection have closed and released its segment, the segment is reset
//! and kept for the next connection between the same two processes (the
//! client's request channel and the listener: a `Pair`). Its pages are
//! already there, and both processes may still have it mapped
//! (`segcache` in the library), so the new connection costs no mapping and
//! no page faults. It is never handed to any other pair: the processes that
//! may still map it are exactly the new connection's two ends. Nor is it
//! kept once either end of its pair is gone (the request channel or the
//! listener closed): the pool knows which are still there, because a
//! connection is often retired only after its process has exited.

use crate::ids::{ChannelId, ListenerId, Pair};
use crate::sync::lock;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use vsocket_ring::{Segment, SegmentFiles};

/// Released segments kept per pair, and in all.
const KEEP_PER_PAIR: usize = 40;
const KEEP: usize = 1024;

/// Segments kept ready.
const TARGET: usize = 32;
/// The refill thread is woken only when the pool falls to this level, so
/// that it makes segments in batches rather than one wake-up per connect.
const LOW_WATER: usize = TARGET / 2;

pub struct SegmentPool {
    ring_size: u32,
    ready: Mutex<Vec<(Segment, SegmentFiles)>>,
    taken: Condvar,
    released: Mutex<Released>,
    /// Segments made, and connections that got a segment used before.
    pub created: AtomicU64,
    pub reused: AtomicU64,
}

/// Released segments, reset, per pair, and the request channels and
/// listeners a pair may still be made of.
#[derive(Default)]
struct Released {
    by_pair: HashMap<Pair, Vec<(Segment, SegmentFiles)>>,
    channels: HashSet<ChannelId>,
    listeners: HashSet<ListenerId>,
}

impl Released {
    fn pair_is_there(&self, pair: Pair) -> bool {
        self.channels.contains(&pair.channel) && self.listeners.contains(&pair.listener)
    }

    fn take_pairs(&mut self, gone: impl Fn(&Pair) -> bool) -> Vec<Vec<(Segment, SegmentFiles)>> {
        let keys: Vec<Pair> = self.by_pair.keys().copied().filter(|k| gone(k)).collect();
        keys.into_iter().filter_map(|k| self.by_pair.remove(&k)).collect()
    }
}

impl std::fmt::Debug for SegmentPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentPool").field("ring_size", &self.ring_size).finish_non_exhaustive()
    }
}

impl SegmentPool {
    pub fn new(ring_size: u32) -> SegmentPool {
        SegmentPool {
            ring_size,
            ready: Mutex::new(Vec::with_capacity(TARGET)),
            taken: Condvar::new(),
            released: Mutex::default(),
            created: AtomicU64::new(0),
            reused: AtomicU64::new(0),
        }
    }

    /// A segment for a new connection between `pair`: one it used before
    /// if there is one, else a fresh one.
    pub fn take_for(&self, pair: Pair) -> std::io::Result<(Segment, SegmentFiles)> {
        let mut released = lock(&self.released);
        if let Some(list) = released.by_pair.get_mut(&pair) {
            let reused = list.pop();
            if list.is_empty() {
                released.by_pair.remove(&pair);
            }
            if let Some(reused) = reused {
                self.reused.fetch_add(1, Ordering::Relaxed);
                return Ok(reused);
            }
        }
        drop(released);
        self.take()
    }

    /// Keeps a released segment (see `Segment::reusable`) for `pair`, if
    /// both of its ends are still there; else it is unmapped and closed
    /// (once the lock is let go: parameters drop after locals).
    pub fn recycle(&self, pair: Pair, segment: Segment, files: SegmentFiles) {
        segment.reset();
        let mut released = lock(&self.released);
        if !released.pair_is_there(pair) {
            return;
        }
        let total: usize = released.by_pair.values().map(Vec::len).sum();
        let list = released.by_pair.entry(pair).or_default();
        if list.len() < KEEP_PER_PAIR && total < KEEP {
            list.push((segment, files));
        }
    }

    /// Released segments kept for their pairs.
    pub fn kept(&self) -> usize {
        lock(&self.released).by_pair.values().map(Vec::len).sum()
    }

    /// A request channel is served: segments of its pairs may be kept.
    pub fn channel_opened(&self, channel: ChannelId) {
        lock(&self.released).channels.insert(channel);
    }

    /// A listener is registered: segments of its pairs may be kept.
    pub fn listener_opened(&self, listener: ListenerId) {
        lock(&self.released).listeners.insert(listener);
    }

    /// A request channel ended: its pairs will not connect again.
    pub fn channel_closed(&self, channel: ChannelId) {
        let dropped = {
            let mut released = lock(&self.released);
            released.channels.remove(&channel);
            released.take_pairs(|pair| pair.channel == channel)
        };
        // Unmapped outside the lock.
        drop(dropped);
    }

    /// A listener closed: its pairs will not connect again.
    pub fn listener_closed(&self, listener: ListenerId) {
        let dropped = {
            let mut released = lock(&self.released);
            released.listeners.remove(&listener);
            released.take_pairs(|pair| pair.listener == listener)
        };
        drop(dropped);
    }

    /// A fresh segment and its files.
    pub fn take(&self) -> std::io::Result<(Segment, SegmentFiles)> {
        let (pooled, left) = {
            let mut ready = lock(&self.ready);
            let pooled = ready.pop();
            (pooled, ready.len())
        };
        if left <= LOW_WATER {
            self.taken.notify_one();
        }
        match pooled {
            Some(s) => Ok(s),
            None => self.create(),
        }
    }

    fn create(&self) -> std::io::Result<(Segment, SegmentFiles)> {
        let made = Segment::create(self.ring_size)?;
        self.created.fetch_add(1, Ordering::Relaxed);
        Ok(made)
    }

    /// Refills the pool forever (run on its own thread).
    pub fn refill(&self) {
        let mut ready = lock(&self.ready);
        loop {
            while ready.len() < TARGET {
                drop(ready);
                let made = self.create();
                ready = lock(&self.ready);
                match made {
                    Ok(s) => ready.push(s),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot create connection segments");
                        break;
                    }
                }
            }
            ready = self.taken.wait(ready).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RING: u32 = 4096;

    fn pair(channel: u64, listener: u64) -> Pair {
        Pair { channel: ChannelId(channel), listener: ListenerId(listener) }
    }

    fn release(pool: &SegmentPool, pair: Pair) {
        let (segment, files) = Segment::create(RING).unwrap();
        pool.recycle(pair, segment, files);
    }

    #[test]
    fn a_segment_is_kept_only_while_both_ends_of_its_pair_are_there() {
        let pool = SegmentPool::new(RING);
        pool.channel_opened(ChannelId(1));
        pool.listener_opened(ListenerId(10));
        release(&pool, pair(1, 10));
        release(&pool, pair(2, 10));
        assert_eq!(pool.kept(), 1, "channel 2 was never served (a predecessor's, or gone already)");
        pool.channel_closed(ChannelId(1));
        assert_eq!(pool.kept(), 0, "the channel's segments go with it");
        release(&pool, pair(1, 10));
        assert_eq!(pool.kept(), 0, "a connection retired after its process exited keeps nothing");
    }

    #[test]
    fn a_listener_that_closed_takes_its_pairs_segments_and_no_more() {
        let pool = SegmentPool::new(RING);
        for channel in [1, 2] {
            pool.channel_opened(ChannelId(channel));
        }
        pool.listener_opened(ListenerId(10));
        pool.listener_opened(ListenerId(11));
        for p in [pair(1, 10), pair(2, 10), pair(1, 11)] {
            release(&pool, p);
        }
        pool.listener_closed(ListenerId(10));
        assert_eq!(pool.kept(), 1, "only the other listener's pair keeps its segment");
        release(&pool, pair(2, 10));
        assert_eq!(pool.kept(), 1);
        assert!(pool.take_for(pair(1, 11)).is_ok());
        assert_eq!(pool.kept(), 0, "the kept segment was handed out again");
        assert_eq!(pool.reused.load(Ordering::Relaxed), 1);
    }
}
