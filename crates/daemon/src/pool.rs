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
//! may still map it are exactly the new connection's two ends.

use crate::ids::Pair;
use crate::sync::lock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use vsocket_ring::{Segment, SegmentFiles};

/// Released segments kept per pair, and in all.
const KEEP_PER_PAIR: usize = 8;
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
    /// Released segments, reset, per pair.
    released: Mutex<HashMap<Pair, Vec<(Segment, SegmentFiles)>>>,
    /// Segments made, and connections that got a segment used before.
    pub created: AtomicU64,
    pub reused: AtomicU64,
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
        if let Some(list) = released.get_mut(&pair) {
            let reused = list.pop();
            if list.is_empty() {
                released.remove(&pair);
            }
            if let Some(reused) = reused {
                self.reused.fetch_add(1, Ordering::Relaxed);
                return Ok(reused);
            }
        }
        drop(released);
        self.take()
    }

    /// Keeps a released segment (see `Segment::reusable`) for `pair`.
    pub fn recycle(&self, pair: Pair, segment: Segment, files: SegmentFiles) {
        segment.reset();
        let mut released = lock(&self.released);
        let total: usize = released.values().map(Vec::len).sum();
        let list = released.entry(pair).or_default();
        if list.len() < KEEP_PER_PAIR && total < KEEP {
            list.push((segment, files));
        }
    }

    /// Released segments kept for their pairs.
    pub fn kept(&self) -> usize {
        lock(&self.released).values().map(Vec::len).sum()
    }

    /// Drops the segments of pairs that will not connect again.
    pub fn forget(&self, gone: &dyn Fn(Pair) -> bool) {
        let dropped: Vec<_> = {
            let mut released = lock(&self.released);
            let keys: Vec<Pair> = released.keys().copied().filter(|k| gone(*k)).collect();
            keys.into_iter().filter_map(|k| released.remove(&k)).collect()
        };
        // Unmapped outside the lock.
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
