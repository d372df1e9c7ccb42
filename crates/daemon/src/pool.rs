//! Ready-made connection segments.
//!
//! Creating a segment (memfd_create, ftruncate, seals, mmap, writing the
//! header) costs several system calls and a page fault; a connect should
//! not wait for them. A background thread keeps a few segments ready, and
//! the broker takes one per connection (creating one inline only when the
//! pool has run dry under a burst).

use std::os::fd::OwnedFd;
use std::sync::{Condvar, Mutex};
use vsocket_ring::Segment;

/// Segments kept ready.
const TARGET: usize = 32;
/// The refill thread is woken only when the pool falls to this level, so
/// that it makes segments in batches rather than one wake-up per connect.
const LOW_WATER: usize = TARGET / 2;

pub struct SegmentPool {
    ring_size: u32,
    ready: Mutex<Vec<(Segment, OwnedFd)>>,
    taken: Condvar,
}

impl std::fmt::Debug for SegmentPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentPool").field("ring_size", &self.ring_size).finish_non_exhaustive()
    }
}

impl SegmentPool {
    pub fn new(ring_size: u32) -> SegmentPool {
        SegmentPool { ring_size, ready: Mutex::new(Vec::with_capacity(TARGET)), taken: Condvar::new() }
    }

    /// A fresh segment and its memfd.
    pub fn take(&self) -> std::io::Result<(Segment, OwnedFd)> {
        let (pooled, left) = {
            let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
            let pooled = ready.pop();
            (pooled, ready.len())
        };
        if left <= LOW_WATER {
            self.taken.notify_one();
        }
        match pooled {
            Some(s) => Ok(s),
            None => Segment::create(self.ring_size),
        }
    }

    /// Refills the pool forever (run on its own thread).
    pub fn refill(&self) {
        let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            while ready.len() < TARGET {
                drop(ready);
                let made = Segment::create(self.ring_size);
                ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
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
