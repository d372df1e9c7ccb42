//! Mappings of segments whose connections this process has closed, kept
//! for the next connection that gets the same segment.
//!
//! vsocketd resets a released segment and hands it to the next connection
//! between the same two processes (a client opening connection after
//! connection to one server). Mapping a segment, faulting its first pages
//! in and unmapping it again cost more than the rest of opening a
//! connection, so the process keeps the mapping: a connection whose segment
//! is one of these (same file, and the header names this connection, as the
//! daemon writes it before handing the segment over) takes it back instead
//! of mapping anew.
//!
//! A forked child drops every kept mapping (see `fork.rs`): its parent's
//! next connections may get those segments, and a child may not be trusted
//! as much as its parent (it may drop privileges).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use vsocket_ring::Segment;

/// Mappings kept at most.
const KEEP: usize = 16;

/// (device, inode) of a segment's file, and the mapping.
type Kept = ((u64, u64), Segment);

static CACHE: Mutex<Vec<Kept>> = Mutex::new(Vec::new());
/// Held by whoever uses the cache, and by fork (from prepare to the child
/// and parent handlers), so that a child never inherits the cache half
/// changed; the mutex inside is then never contended.
static GATE: AtomicBool = AtomicBool::new(false);

fn enter() {
    while GATE.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        std::thread::yield_now();
    }
}

fn leave() {
    GATE.store(false, Ordering::Release);
}

fn with_cache<R>(f: impl FnOnce(&mut Vec<Kept>) -> R) -> R {
    enter();
    let r = f(&mut CACHE.lock().unwrap_or_else(|e| e.into_inner()));
    leave();
    r
}

/// The kept mapping of file `id`, if the daemon handed it to connection
/// `connection` (anything else stays kept).
pub fn take(id: (u64, u64), ring_size: u32, connection: u64) -> Option<Segment> {
    with_cache(|kept| {
        let at = kept.iter().position(|(k, s)| {
            *k == id && s.ring_size() == ring_size && s.connection_id().load(Ordering::Acquire) == connection
        })?;
        Some(kept.swap_remove(at).1)
    })
}

/// Keeps the mapping of a closed connection's segment.
pub fn put(id: (u64, u64), segment: Segment) {
    let evicted = with_cache(|kept| {
        let evicted = (kept.len() >= KEEP).then(|| kept.remove(0));
        kept.push((id, segment));
        evicted
    });
    // Unmapped outside the gate.
    drop(evicted);
}

/// fork's prepare handler: nobody may be inside the cache across fork.
pub fn before_fork() {
    enter();
}

/// fork's parent handler.
pub fn after_fork_parent() {
    leave();
}

/// fork's child handler: the child keeps none of its parent's mappings.
pub fn after_fork_child() {
    let all = std::mem::take(&mut *CACHE.lock().unwrap_or_else(|e| e.into_inner()));
    leave();
    drop(all);
}
