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
//! A forked child drops every kept mapping (see `fork.rs`), and does not
//! keep the mappings of connections it inherited when it closes them
//! (`conn::Mapped`): its parent's next connections may get those segments,
//! and a child may not be trusted as much as its parent (it may drop
//! privileges).

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use vsocket_ring::{FileIdentity, Segment};

/// Mappings kept at most.
const KEEP: usize = 16;

/// A segment's file, and the mapping.
type Kept = (FileIdentity, Segment);

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

/// The kept mapping of the segment behind `fd` (file `id`), if the daemon
/// handed it to connection `connection` (anything else stays kept). The
/// nonce in the file's header must match the mapping's: an inode number
/// may have come back for another file.
pub fn take(fd: BorrowedFd<'_>, id: FileIdentity, ring_size: u32, connection: u64) -> Option<Segment> {
    let found = with_cache(|kept| {
        let at = kept.iter().position(|(k, s)| {
            *k == id && s.ring_size() == ring_size && s.connection_id().load(Ordering::Acquire) == connection
        })?;
        Some(kept.swap_remove(at).1)
    })?;
    if Segment::read_nonce(fd).ok() == Some(found.nonce()) {
        Some(found)
    } else {
        // Another file under a reused inode number: forget the old one.
        None
    }
}

/// Keeps the mapping of a closed connection's segment.
pub fn put(id: FileIdentity, segment: Segment) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_kept_mapping_is_given_back_only_for_its_file_and_connection() {
        let (daemon, fd) = Segment::create(4096).unwrap();
        let id = Segment::identity(fd.as_fd()).unwrap();
        let (_other, other_fd) = Segment::create(4096).unwrap();
        let other_id = Segment::identity(other_fd.as_fd()).unwrap();
        assert_ne!(id, other_id);
        daemon.connection_id().store(41, Ordering::Release);
        put(id, Segment::map(fd.as_fd(), 4096).unwrap());
        assert!(take(other_fd.as_fd(), other_id, 4096, 41).is_none(), "another file");
        assert!(take(fd.as_fd(), id, 8192, 41).is_none(), "another size");
        // The daemon handed the segment to connection 42: the header says so.
        assert!(take(fd.as_fd(), id, 4096, 42).is_none(), "still named for connection 41");
        daemon.connection_id().store(42, Ordering::Release);
        let kept = take(fd.as_fd(), id, 4096, 42).expect("kept");
        kept.producer(0).write(&[b"same memory"]).unwrap();
        assert_eq!(daemon.producer(0).total(), 11);
        assert!(take(fd.as_fd(), id, 4096, 42).is_none(), "given back once");
        // Another file that got the same inode number: its nonce differs.
        put(id, kept);
        assert!(take(other_fd.as_fd(), id, 4096, 42).is_none(), "the nonce tells them apart");
        // A forked child keeps nothing of its parent's.
        put(id, Segment::map(fd.as_fd(), 4096).unwrap());
        before_fork();
        after_fork_child();
        assert!(take(fd.as_fd(), id, 4096, 42).is_none());
    }
}
