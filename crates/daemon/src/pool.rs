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
//!
//! Kits (ARCHITECTURE §3b) take their memory from *chunks* instead (§3c):
//! the halves of 32 connections in one file per end, which each of the
//! pair's processes maps once. A chunk is made for a pair when it has no
//! free piece, and each kit connection's piece comes back to the pair
//! when it is retired, reset, for the pair's next kit; a chunk goes when
//! its last piece does (every record and free entry holds it). A free
//! piece remembers the connection retired there: when the pair's next kit
//! is made in it, both ends' `bell_kept` words are taken, and if both
//! name that connection the kit is made without a doorbell (stage 6, see
//! [`take_bells`]).

use crate::ids::{ChannelId, ConnectionId, ListenerId, Pair};
use crate::sync::lock;
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use vsocket_abi::layout::{Endpoint, CHUNK_PIECES};
use vsocket_ring::{Chunk, ReadOnly, Segment, SegmentFiles};

/// Released segments kept per pair, and in all.
const KEEP_PER_PAIR: usize = 40;
const KEEP: usize = 1024;
/// Free kit pieces kept per pair (two chunks' worth); a piece past them is
/// let go (its chunk goes with its last piece).
const KEEP_PIECES_PER_PAIR: usize = 2 * CHUNK_PIECES;

/// A chunk's files, and the daemon's mapping of it (none for a chunk
/// handed over by another daemon, whose pieces are mapped one by one and
/// never given out again).
#[derive(Debug)]
pub struct KitChunk {
    map: Option<Chunk>,
    files: SegmentFiles,
    ring_size: u32,
}

impl KitChunk {
    /// The chunk's files as end `end` is sent them: its own read-write,
    /// its peer's read-only (a chunk this daemon made keeps both files'
    /// read-only descriptors for as long as it lives).
    pub fn files_for(&self, end: Endpoint) -> std::io::Result<[BorrowedFd<'_>; 2]> {
        match self.files.read_only(end.peer())? {
            ReadOnly::Kept(peer) => Ok([self.files.rw[end.index()].as_fd(), peer]),
            ReadOnly::Opened(_) => Err(std::io::Error::other("a chunk without its read-only files")),
        }
    }

    /// The files (a hand-over sends them).
    pub fn files(&self) -> &SegmentFiles {
        &self.files
    }

    /// A chunk another daemon made, whose pieces this one maps one by one.
    pub fn handed(files: SegmentFiles, ring_size: u32) -> KitChunk {
        KitChunk { map: None, files, ring_size }
    }
}

/// One kit connection's memory: piece `index` of `chunk`.
#[derive(Debug, Clone)]
pub struct Piece {
    pub chunk: Arc<KitChunk>,
    pub index: u8,
}

/// A kit piece free for its pair's next kit, reset, and the connection
/// retired there (none in a fresh chunk).
#[derive(Debug)]
pub struct FreePiece {
    pub piece: Piece,
    pub retired: Option<ConnectionId>,
}

/// Both ends' `bell_kept` words of a piece, as [`take_bells`] took them.
#[derive(Debug, Clone, Copy)]
pub struct TakenBells {
    words: [u64; 2],
    /// Both named the connection retired there.
    pub kept: bool,
}

/// Takes both ends' `bell_kept` words of a piece (each swapped for 0), for
/// the kit about to be made in it, and says whether both named `retired`,
/// the connection retired there: then both ends kept its doorbell for
/// this kit, which is made without one (ARCHITECTURE §3c, stage 6). Done
/// only when the kit is made (a free piece keeps its words, which each
/// library may clear to let its doorbell go): a library clears its word by
/// compare-and-swap, so either it sees the word taken and keeps the
/// doorbell for the kit, or this sees 0. A library can write anything in
/// its own word: a lie costs only its own kit in the piece, which it then
/// cannot use.
pub fn take_bells(segment: &Segment, retired: Option<ConnectionId>) -> TakenBells {
    let words = [0, 1].map(|end| segment.bell_kept(end).swap(0, Ordering::AcqRel));
    TakenBells { words, kept: retired.is_some_and(|id| id.0 != 0 && words == [id.0; 2]) }
}

/// Puts back the words [`take_bells`] took for a kit that is not made, or
/// not sent: each library may then let its doorbell go again (and the
/// next kit in the piece, naming another connection, takes them for
/// nothing). A word written since is left alone.
pub fn give_back(segment: &Segment, taken: TakenBells) {
    for (end, word) in taken.words.into_iter().enumerate() {
        let _ = segment.bell_kept(end).compare_exchange(0, word, Ordering::AcqRel, Ordering::Relaxed);
    }
}

impl Piece {
    /// The daemon's view of the piece: the chunk's, or (a chunk handed
    /// over) the chunk mapped for this piece alone.
    pub fn segment(&self) -> std::io::Result<Segment> {
        match &self.chunk.map {
            Some(map) => map.piece(self.index as usize),
            None => Segment::adopt_piece(&self.chunk.files, self.index as usize, self.chunk.ring_size),
        }
    }

    /// Is this the same chunk as `other`'s?
    pub fn same_chunk(&self, other: &Piece) -> bool {
        Arc::ptr_eq(&self.chunk, &other.chunk)
    }
}

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
    /// Segments made, and connections (or kits) that got a segment (or a
    /// piece) used before.
    pub created: AtomicU64,
    pub reused: AtomicU64,
    /// Kits' chunks made.
    pub chunks: AtomicU64,
    /// Kits made with the doorbell their piece's ends kept.
    pub bells_reused: AtomicU64,
}

/// A released segment, reset, and its files.
type Kept = (Segment, SegmentFiles);

/// Released segments, reset, per pair, and the request channels and
/// listeners a pair may still be made of.
#[derive(Default)]
struct Released {
    by_pair: HashMap<Pair, Vec<(Segment, SegmentFiles)>>,
    channels: HashSet<ChannelId>,
    listeners: HashSet<ListenerId>,
    /// Free kit pieces, per pair.
    pieces: HashMap<Pair, Vec<FreePiece>>,
}

impl Released {
    fn pair_is_there(&self, pair: Pair) -> bool {
        self.channels.contains(&pair.channel) && self.listeners.contains(&pair.listener)
    }

    fn take_pairs(&mut self, gone: impl Fn(&Pair) -> bool) -> (Vec<Vec<Kept>>, Vec<Vec<FreePiece>>) {
        let keys: Vec<Pair> = self.by_pair.keys().copied().filter(|k| gone(k)).collect();
        let segments = keys.into_iter().filter_map(|k| self.by_pair.remove(&k)).collect();
        let keys: Vec<Pair> = self.pieces.keys().copied().filter(|k| gone(k)).collect();
        let pieces = keys.into_iter().filter_map(|k| self.pieces.remove(&k)).collect();
        (segments, pieces)
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
            chunks: AtomicU64::new(0),
            bells_reused: AtomicU64::new(0),
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

    /// A free kit piece for `pair`: one of its chunks', or the first of a
    /// new chunk (whose others are kept for the pair's next kits).
    pub fn take_piece(&self, pair: Pair) -> std::io::Result<FreePiece> {
        if let Some(free) = lock(&self.released).pieces.get_mut(&pair).and_then(Vec::pop) {
            self.reused.fetch_add(1, Ordering::Relaxed);
            return Ok(free);
        }
        let (map, files) = Chunk::create(self.ring_size)?;
        self.chunks.fetch_add(1, Ordering::Relaxed);
        let chunk = Arc::new(KitChunk { map: Some(map), files, ring_size: self.ring_size });
        let mut released = lock(&self.released);
        if released.pair_is_there(pair) {
            // Taken from the end, lowest first.
            let rest = (1..CHUNK_PIECES as u8)
                .rev()
                .map(|index| FreePiece { piece: Piece { chunk: chunk.clone(), index }, retired: None });
            released.pieces.entry(pair).or_default().extend(rest);
        }
        Ok(FreePiece { piece: Piece { chunk, index: 0 }, retired: None })
    }

    /// Keeps the piece of `retired`, a kit connection between `pair`, for
    /// the pair's next kit (reset here, its `bell_kept` words left for
    /// [`take_bells`]), if both ends of the pair are still there and it is
    /// one of this daemon's chunks.
    pub fn recycle_piece(&self, pair: Pair, retired: ConnectionId, segment: Segment, piece: Piece) {
        if piece.chunk.map.is_none() {
            return;
        }
        segment.reset();
        let mut released = lock(&self.released);
        if !released.pair_is_there(pair) {
            return;
        }
        let list = released.pieces.entry(pair).or_default();
        if list.len() < KEEP_PIECES_PER_PAIR {
            list.push(FreePiece { piece, retired: Some(retired) });
        }
    }

    /// Free kit pieces kept for their pairs.
    pub fn kept_pieces(&self) -> usize {
        lock(&self.released).pieces.values().map(Vec::len).sum()
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

    /// A pool whose pair (channel 1, listener 10) is there.
    fn pool_with_pair() -> (SegmentPool, Pair) {
        let pool = SegmentPool::new(RING);
        pool.channel_opened(ChannelId(1));
        pool.listener_opened(ListenerId(10));
        (pool, pair(1, 10))
    }

    #[test]
    fn a_pairs_kits_take_the_pieces_of_its_chunks_and_give_them_back() {
        let (pool, p) = pool_with_pair();
        let take = |p| pool.take_piece(p).unwrap().piece;
        // A chunk's 32 pieces, in order, before another chunk is made.
        let pieces: Vec<Piece> = (0..CHUNK_PIECES).map(|_| take(p)).collect();
        assert_eq!(pool.chunks.load(Ordering::Relaxed), 1);
        assert!(pieces.iter().enumerate().all(|(i, piece)| piece.index as usize == i && piece.same_chunk(&pieces[0])));
        let next = take(p);
        assert!(!next.same_chunk(&pieces[0]));
        assert_eq!(pool.chunks.load(Ordering::Relaxed), 2);
        assert_eq!(pool.kept_pieces(), CHUNK_PIECES - 1);
        // A piece given back is reset and is the next one taken.
        let segment = pieces[5].segment().unwrap();
        segment.producer(0).write(&[b"old"]).unwrap();
        pool.recycle_piece(p, ConnectionId(9), segment, pieces[5].clone());
        let again = take(p);
        assert!(again.same_chunk(&pieces[0]) && again.index == 5);
        assert_eq!(again.segment().unwrap().producer(0).total(), 0, "reset");
        // Another pair never gets them; a pair gone keeps none.
        pool.channel_opened(ChannelId(2));
        assert!(!take(pair(2, 10)).same_chunk(&pieces[0]));
        pool.channel_closed(ChannelId(1));
        assert_eq!(pool.kept_pieces(), CHUNK_PIECES - 1, "only pair (2, 10)'s");
        let segment = pieces[6].segment().unwrap();
        pool.recycle_piece(p, ConnectionId(9), segment, pieces[6].clone());
        assert_eq!(pool.kept_pieces(), CHUNK_PIECES - 1);
    }

    #[test]
    fn a_piece_comes_back_with_its_doorbells_only_when_both_ends_kept_the_retired_ones() {
        let (pool, p) = pool_with_pair();
        let fresh = pool.take_piece(p).unwrap();
        assert_eq!(fresh.retired, None, "a fresh chunk's piece had no connection");
        assert!(!take_bells(&fresh.piece.segment().unwrap(), fresh.retired).kept);
        let piece = fresh.piece;
        // Both words, one word, a word naming another connection, none.
        for (words, kept) in [([9, 9], true), ([9, 0], false), ([0, 9], false), ([9, 8], false), ([0, 0], false)] {
            let segment = piece.segment().unwrap();
            for (end, word) in words.into_iter().enumerate() {
                segment.bell_kept(end).store(word, Ordering::Release);
            }
            pool.recycle_piece(p, ConnectionId(9), segment, piece.clone());
            let again = pool.take_piece(p).unwrap();
            assert_eq!((again.piece.index, again.retired), (piece.index, Some(ConnectionId(9))));
            let segment = again.piece.segment().unwrap();
            // A free piece keeps its words: a library may still clear its own.
            let read = |segment: &Segment| [0, 1].map(|end| segment.bell_kept(end).load(Ordering::Acquire));
            assert_eq!(read(&segment), words);
            let taken = take_bells(&segment, again.retired);
            assert_eq!(taken.kept, kept, "{words:?}");
            assert_eq!(read(&segment), [0, 0], "taken");
            // A kit not made, or not sent, gives them back.
            give_back(&segment, taken);
            assert_eq!(read(&segment), words);
            take_bells(&segment, again.retired);
        }
        // A connection id 0 is no connection's.
        assert!(!take_bells(&piece.segment().unwrap(), Some(ConnectionId(0))).kept);
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
