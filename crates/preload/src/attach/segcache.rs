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
//! Kits' chunks (ARCHITECTURE §3c) are kept the same way: a batch names
//! the chunks its kits are in, and the daemon gives a pair's next kits the
//! pieces its last ones freed, so the chunk a batch comes in is usually
//! one this process maps already (still used by kits and connections, or
//! one of the last few, kept). [`chunk`] finds it by its files.
//!
//! A forked child drops every kept mapping (see `fork.rs`), and does not
//! keep the mappings of connections it inherited when it closes them
//! (`conn::Mapped`): its parent's next connections may get those segments,
//! and a child may not be trusted as much as its parent (it may drop
//! privileges).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vsocket_abi::control::ConnectionInfo;
use vsocket_abi::layout::Endpoint;
use vsocket_ring::{Chunk, FileIdentity, Segment};

/// Mappings kept at most.
const KEEP: usize = 64;
/// Chunks kept mapped at most, beside those the process's kits and
/// connections hold.
const KEEP_CHUNKS: usize = 4;

/// A segment's files: the process's own half and its peer's.
pub type Files = (FileIdentity, FileIdentity);

/// A segment's files, and the mapping.
type Kept = (Files, Segment);

static CACHE: Mutex<Vec<Kept>> = Mutex::new(Vec::new());
/// Chunks mapped lately, the last used last.
static CHUNKS: Mutex<Vec<(Files, Arc<Chunk>)>> = Mutex::new(Vec::new());
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

/// Runs `f` on one of the caches, inside the gate.
fn with<T, R>(cache: &Mutex<T>, f: impl FnOnce(&mut T) -> R) -> R {
    enter();
    let r = f(&mut cache.lock().unwrap_or_else(|e| e.into_inner()));
    leave();
    r
}

fn with_cache<R>(f: impl FnOnce(&mut Vec<Kept>) -> R) -> R {
    with(&CACHE, f)
}

/// The kept mapping of the segment whose halves are `own` and `peer`
/// (files `id`), if the daemon handed it to end `end` of connection `info`
/// (anything else stays kept). The nonces in both files' headers must
/// match the mapping's: an inode number may have come back for another
/// file.
pub fn take(
    own: BorrowedFd<'_>,
    peer: BorrowedFd<'_>,
    id: Files,
    info: &ConnectionInfo,
    end: Endpoint,
) -> Option<Segment> {
    let found = with_cache(|kept| {
        let at = kept.iter().position(|(k, s)| {
            *k == id && s.ring_size() == info.ring_size && s.connection_id(end.index()) == info.id
        })?;
        Some(kept.swap_remove(at).1)
    })?;
    let same = |fd, end: Endpoint| Segment::read_nonce(fd).ok() == Some(found.nonce(end.index()));
    if same(own, end) && same(peer, end.peer()) {
        Some(found)
    } else {
        // Another file under a reused inode number: forget the old one.
        None
    }
}

/// The chunk whose files the daemon sent as `own` (this end's) and `peer`,
/// for end `end`: the mapping this process has of it, or a new one.
pub fn chunk(own: BorrowedFd<'_>, peer: BorrowedFd<'_>, end: Endpoint) -> std::io::Result<Arc<Chunk>> {
    let id = (Segment::identity(own)?, Segment::identity(peer)?);
    let found = with(&CHUNKS, |kept| {
        kept.iter().position(|(k, _)| *k == id).map(|at| {
            let hit = kept.remove(at);
            let chunk = hit.1.clone();
            kept.push(hit);
            chunk
        })
    });
    // Inode numbers come back: the nonces tell the files apart.
    let same = |c: &Chunk| {
        Segment::read_nonce(own).ok() == Some(c.nonce(end.index()))
            && Segment::read_nonce(peer).ok() == Some(c.nonce(end.peer().index()))
    };
    if let Some(chunk) = found.filter(|c| same(c)) {
        return Ok(chunk);
    }
    // The ring size, from the first piece's header (after the magic and
    // the version).
    let mut word = [0u8; 4];
    if crate::sys::pread(own.as_raw_fd(), &mut word, 12) != Ok(4) {
        return Err(std::io::Error::from_raw_os_error(libc::EPROTO));
    }
    let chunk = Arc::new(Chunk::map(own, peer, u32::from_le_bytes(word), end)?);
    let evicted = with(&CHUNKS, |kept| {
        kept.retain(|(k, _)| *k != id);
        kept.push((id, chunk.clone()));
        (kept.len() > KEEP_CHUNKS).then(|| kept.remove(0))
    });
    // Unmapped (if no kit holds it) outside the gate.
    drop(evicted);
    Ok(chunk)
}

/// Keeps the mapping of a closed connection's segment.
pub fn put(id: Files, segment: Segment) {
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
    let chunks = std::mem::take(&mut *CHUNKS.lock().unwrap_or_else(|e| e.into_inner()));
    leave();
    drop((all, chunks));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: u64, ring_size: u32) -> ConnectionInfo {
        ConnectionInfo { id, local: "10.0.0.2:1".parse().unwrap(), peer: "10.0.0.3:2".parse().unwrap(), ring_size }
    }

    #[test]
    fn a_kept_mapping_is_given_back_only_for_its_files_and_connection() {
        use std::os::fd::AsFd;
        let end = Endpoint::Client;
        let (daemon, files) = Segment::create(4096).unwrap();
        let copies = files.clone_for(end).unwrap();
        let [own, peer] = [copies[0].as_fd(), copies[1].as_fd()];
        let id = (Segment::identity(own).unwrap(), Segment::identity(peer).unwrap());
        let (_other, other_files) = Segment::create(4096).unwrap();
        let other_copies = other_files.clone_for(end).unwrap();
        let [other_own, other_peer] = [other_copies[0].as_fd(), other_copies[1].as_fd()];
        let other_id = (Segment::identity(other_own).unwrap(), Segment::identity(other_peer).unwrap());
        assert_ne!(id, other_id);
        let map = || Segment::map(own, peer, 4096, end).unwrap();
        daemon.set_connection_id(41);
        put(id, map());
        assert!(take(other_own, other_peer, other_id, &info(41, 4096), end).is_none(), "another file");
        assert!(take(own, peer, id, &info(41, 8192), end).is_none(), "another size");
        // The daemon handed the segment to connection 42: the header says so.
        assert!(take(own, peer, id, &info(42, 4096), end).is_none(), "still named for connection 41");
        daemon.set_connection_id(42);
        let kept = take(own, peer, id, &info(42, 4096), end).expect("kept");
        kept.producer(0).write(&[b"same memory"]).unwrap();
        assert_eq!(daemon.producer(0).total(), 11);
        assert!(take(own, peer, id, &info(42, 4096), end).is_none(), "given back once");
        // Another file that got the same inode number: its nonce differs.
        put(id, kept);
        assert!(take(other_own, peer, id, &info(42, 4096), end).is_none(), "the nonce tells them apart");
        // The same own half with a peer half of another segment.
        put(id, map());
        assert!(take(own, other_peer, (id.0, other_id.1), &info(42, 4096), end).is_none(), "the peer's file too");
        assert!(take(own, other_peer, id, &info(42, 4096), end).is_none(), "and its nonce");
        // A forked child keeps nothing of its parent's.
        put(id, map());
        before_fork();
        after_fork_child();
        assert!(take(own, peer, id, &info(42, 4096), end).is_none());
    }
}
