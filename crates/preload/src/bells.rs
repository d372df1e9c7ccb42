//! Doorbells kept with their pieces (ARCHITECTURE §3c, stage 6).
//!
//! A kit connection's memory is a piece of a chunk, and a piece serves
//! only connections between the same two processes, one after another.
//! So when a process closes a kit connection it alone holds, it keeps
//! (*parks*) the connection's doorbell here, keyed by the piece, and says
//! so in its `bell_kept` word (`layout::BELL_KEPT`); when the daemon finds
//! both ends' words naming the connection it retires there, the next kit
//! in the piece comes without a doorbell, and each end takes the one it
//! parked. Neither the daemon's socketpair nor the two closes are paid.
//!
//! What keeps a doorbell's meaning (its end of stream says every process
//! holding the peer's end is gone): only the process the kit was given
//! to parks, only when it is the end's last holder and never forked while
//! holding it; a forked child closes its copies of the parked doorbells
//! (see [`in_child`]); an exec closes them and clears their words (see
//! [`before_exec`]). Parked doorbells are close-on-exec, as every
//! library descriptor.

use crate::sys;
use std::cell::Cell;
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use vsocket_abi::layout::Endpoint;
use vsocket_ring::Chunk;

/// Most doorbells one process keeps parked: the pieces of sixteen chunks.
/// One more lets an old one go (see [`Table::let_go_one`]).
const MOST: usize = 512;
/// How many of the oldest are looked at to make room.
const LOOK: usize = 8;

/// Forks this process made (counted by fork's prepare handler, holding
/// the table). A doorbell this process had before a fork has a copy in
/// the child: it is never parked (see [`ParkAt`]).
static FORKS: AtomicU64 = AtomicU64::new(0);

/// A fork is about to be made (fork's prepare handler, holding the table
/// through [`lock_for_fork`]).
pub fn forking() {
    FORKS.fetch_add(1, Ordering::Relaxed);
}

/// A piece, as this process names it: the nonce of its chunk's file for
/// this end (unique to the file), and the piece's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    nonce: u128,
    piece: u8,
}

/// Where a kit connection's doorbell may be parked when it closes: its
/// piece of `chunk`, the process the kit was given to, and how many forks
/// that process had made then (a doorbell that was there at a fork is
/// never parked: the child has a copy).
#[derive(Debug, Clone)]
pub struct ParkAt {
    chunk: Arc<Chunk>,
    piece: u8,
    end: Endpoint,
    owner: i32,
    forks: u64,
}

impl ParkAt {
    /// Kit piece `piece` of `chunk`, given to this process as end `end`,
    /// whose doorbell was received after [`forks`] said `forks`.
    pub fn new(chunk: Arc<Chunk>, piece: u8, end: Endpoint, forks: u64) -> ParkAt {
        ParkAt { chunk, piece, end, owner: sys::getpid(), forks }
    }

    fn key(&self) -> Key {
        key(&self.chunk, self.piece, self.end)
    }
}

/// The key of piece `piece` of `chunk` for end `end`.
pub fn key(chunk: &Chunk, piece: u8, end: Endpoint) -> Key {
    key_in(chunk.nonce(end.index()), piece)
}

/// The key of piece `piece` of the chunk whose file for this end has
/// nonce `nonce`.
pub fn key_in(nonce: u128, piece: u8) -> Key {
    Key { nonce, piece }
}

/// One parked doorbell: the descriptor, where its word is, the
/// connection it served, and when it was parked (the oldest goes first).
struct Parked {
    fd: RawFd,
    at: ParkAt,
    id: u64,
    order: u64,
    /// Its word was found taken by the daemon: it waits for its kit (only
    /// this library would write the word again).
    taken: bool,
}

impl Parked {
    /// Clears its word if it still names the connection, and says
    /// whether it did. The daemon takes both ends' words the same way
    /// (each swapped for 0) before it resets the piece, so once this
    /// fails, the next kit in the piece may come marked for this doorbell
    /// and it must stay; once this succeeds, no kit will.
    fn clear_word(&self) -> bool {
        let Ok(piece) = self.at.chunk.piece(self.at.piece as usize) else { return true };
        let word = piece.bell_kept(self.at.end.index());
        word.compare_exchange(self.id, 0, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}

/// The parked doorbells of this process.
#[derive(Default)]
pub struct Table {
    parked: HashMap<Key, Parked>,
    next: u64,
}

impl Table {
    /// Parks `fd`, the doorbell of connection `id`, for piece `at`, and
    /// writes `id` in the piece's word. `false` (the caller closes `fd`):
    /// not kept, the piece not checking, or no room (see
    /// [`Table::let_go_one`]).
    ///
    /// Neither here nor at [`Table::take`] is the doorbell drained: a late
    /// ring of the old connection wakes one waiter of the next, who finds
    /// nothing and sleeps again, as a ring that crosses a waiter's own
    /// wake-up does. Nor is its peer's end looked at: one whose peer is
    /// gone serves no other connection (its peer's word is 0 or names
    /// this connection in a process that is gone, so no kit of the pair
    /// comes marked again), and the daemon takes its word, and the next
    /// kit in the piece closes it (see `kits::kits_of`), or a full table
    /// lets it go.
    fn park(&mut self, at: &ParkAt, id: u64, fd: RawFd) -> bool {
        let Ok(piece) = at.chunk.piece(at.piece as usize) else { return false };
        let key = at.key();
        if let Some(old) = self.parked.remove(&key) {
            let _ = sys::close(old.fd);
        }
        if self.parked.len() >= MOST && !self.let_go_one() {
            return false;
        }
        let order = self.next;
        self.next += 1;
        self.parked.insert(key, Parked { fd, at: at.clone(), id, order, taken: false });
        piece.bell_kept(at.end.index()).store(id, Ordering::Release);
        true
    }

    /// Makes room for one: lets the oldest doorbell go (of the [`LOOK`]
    /// oldest whose word was not found taken before) whose word it can
    /// still clear. One whose word the daemon took stays for the kit on its
    /// way, even if its peer's end is gone (the peer may have used that
    /// kit and closed it already): without it, the kit would come marked
    /// for a doorbell this process no longer has. `false`: none could go.
    fn let_go_one(&mut self) -> bool {
        let gone = self.oldest(false).into_iter().find(|key| {
            let parked = self.parked.get_mut(key).expect("listed");
            parked.taken = !parked.clear_word();
            !parked.taken
        });
        // Those found taken before may have had their word given back (a
        // kit not sent, `pool::give_back`).
        let gone = gone.or_else(|| self.oldest(true).into_iter().find(|key| self.parked[key].clear_word()));
        match gone.and_then(|key| self.parked.remove(&key)) {
            Some(old) => {
                let _ = sys::close(old.fd);
                true
            }
            None => false,
        }
    }

    /// The keys of the [`LOOK`] oldest doorbells whose word was found
    /// taken before (`taken`) or not, oldest first.
    fn oldest(&self, taken: bool) -> Vec<Key> {
        let mut oldest: Vec<(u64, Key)> =
            self.parked.iter().filter(|(_, p)| p.taken == taken).map(|(k, p)| (p.order, *k)).collect();
        if oldest.len() > LOOK {
            oldest.select_nth_unstable_by_key(LOOK - 1, |&(order, _)| order);
            oldest.truncate(LOOK);
        }
        oldest.sort_unstable_by_key(|&(order, _)| order);
        oldest.into_iter().map(|(_, key)| key).collect()
    }

    /// The doorbell parked for piece `key`. Its peer's end may be gone
    /// already: the peer took the kit, connected and closed before this
    /// process read its batch (the connection then reads as closed by its
    /// peer, as it would with a doorbell of its own).
    fn take(&mut self, key: Key) -> Option<RawFd> {
        self.parked.remove(&key).map(|parked| parked.fd)
    }

    /// Closes the doorbell parked for piece `key`, if any.
    fn discard(&mut self, key: Key) {
        if let Some(parked) = self.parked.remove(&key) {
            let _ = sys::close(parked.fd);
        }
    }

    /// Closes every parked doorbell (a forked child's copies: the words
    /// are the parent's).
    fn let_go(self) {
        for parked in self.parked.into_values() {
            let _ = sys::close(parked.fd);
        }
    }

    /// Before exec: closes every parked doorbell whose word it clears.
    /// One whose word the daemon took stays: if the exec fails, its kit
    /// may still come marked for it (if it succeeds, close-on-exec closes
    /// it).
    fn let_go_before_exec(&mut self) {
        self.parked.retain(|_, parked| {
            let cleared = parked.clear_word();
            if cleared {
                let _ = sys::close(parked.fd);
            }
            !cleared
        });
    }
}

static TABLE: Mutex<Option<Table>> = Mutex::new(None);

thread_local! {
    /// This thread holds the table, or waits for it: a signal handler
    /// that interrupts it must not wait for the table (see [`held`]).
    static HOLDING: Cell<bool> = const { Cell::new(false) };
}

/// A `close_range` from a signal handler, which interrupted this thread
/// while it held the table, may have closed parked doorbells it could not
/// spare (see [`each_fd`]): the table forgets them all at its next use.
static LOST: AtomicBool = AtomicBool::new(false);

/// The table, locked by this thread.
pub struct Held(Option<MutexGuard<'static, Option<Table>>>);

impl Held {
    fn table(&mut self) -> &mut Option<Table> {
        self.0.as_mut().expect("held until dropped")
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.0.take());
        HOLDING.with(|h| h.set(false));
    }
}

/// The table, locked; `None` in a signal handler that interrupted this
/// thread while it held the table (it would wait for itself).
fn held() -> Option<Held> {
    if HOLDING.with(|h| h.replace(true)) {
        return None;
    }
    let mut held = Held(Some(TABLE.lock().unwrap_or_else(|e| e.into_inner())));
    if LOST.swap(false, Ordering::AcqRel) {
        // Their numbers may be closed, or another file's by now: forgotten
        // without a close (those that were spared leak), words cleared.
        for parked in held.table().take().into_iter().flat_map(|t| t.parked.into_values()) {
            let _ = parked.clear_word();
        }
    }
    Some(held)
}

/// Holds the table across a fork (see `fork.rs`), so that the child never
/// finds it locked by a thread it does not have.
pub fn lock_for_fork() -> impl std::any::Any {
    held()
}

/// How many forks this process has made: what a kit's [`ParkAt`] records,
/// read before its doorbell is received.
pub fn forks() -> u64 {
    FORKS.load(Ordering::Relaxed)
}

/// Parks `fd`, the doorbell of connection `id` whose last holder here is
/// closing it, for the next connection in its piece `at`, and writes `id`
/// in the piece's word; not in a process the kit was not given to (a
/// forked child's copy, a vfork child), nor after a fork since the kit
/// came. Returns the table, locked: the caller releases the connection
/// (its last write to it) and rings the doorbell with it held, so that
/// neither a new kit in the piece looks for the doorbell before it is here
/// nor another thread takes it before that ring. `None`: not parked (the
/// caller closes `fd`).
pub fn park(at: &ParkAt, id: u64, fd: RawFd) -> Option<Held> {
    // A vfork child never gets here: it drops no connection (closing one
    // there leaves the table alone, `table::release`). The cached process
    // id is a forked child's own.
    if id == 0 || sys::getpid() != at.owner {
        return None;
    }
    let mut held = held()?;
    // Under the table's lock, which fork's prepare handler takes before it
    // counts the fork: a fork is either counted here, or made after this
    // doorbell is in the table (and its child closes its copy).
    if FORKS.load(Ordering::Relaxed) != at.forks {
        return None;
    }
    held.table().get_or_insert_with(Table::default).park(at, id, fd).then_some(held)
}

/// Tests: [`park`], for a kit whose batch came just now. Other tests of
/// the process fork at any moment, and a fork since `at` was made would
/// rightly refuse it.
#[cfg(test)]
pub fn park_now(at: &ParkAt, id: u64, fd: RawFd) -> Option<Held> {
    (0..1000).find_map(|_| park(&ParkAt { forks: forks(), ..at.clone() }, id, fd))
}

/// The doorbell parked for piece `key`, for the kit that came without one
/// (`None`: none is; the kit cannot be used).
pub fn take(key: Key) -> Option<RawFd> {
    held()?.table().as_mut()?.take(key)
}

/// A kit came with a doorbell of its own in piece `key`: the one parked
/// there, if any, will never serve (the daemon took its word).
pub fn discard(key: Key) {
    if let Some(table) = held().as_mut().and_then(|h| h.table().as_mut()) {
        table.discard(key);
    }
}

/// Calls `f` with each parked doorbell (a `close_range` spares them).
/// Allocates nothing; only in the process whose memory this is (a vfork
/// child's closes do not touch its parent's descriptors). In a signal
/// handler that interrupted this thread while it held the table, none can
/// be read: the table forgets them all afterwards (see [`LOST`]).
pub fn each_fd(mut f: impl FnMut(RawFd)) {
    if !sys::memory_is_ours() {
        return;
    }
    match held() {
        Some(mut held) => {
            if let Some(table) = held.table().as_ref() {
                table.parked.values().for_each(|parked| f(parked.fd));
            }
        }
        None => LOST.store(true, Ordering::Release),
    }
}

/// In a forked child (the table held since the prepare handler, now let
/// go): its copies of the parent's parked doorbells are closed, so that a
/// later connection's peer still sees the parent's death. The words are
/// the parent's, and stay.
pub fn in_child() {
    if let Some(table) = held().and_then(|mut h| h.table().take()) {
        table.let_go();
    }
}

/// Before exec: the new image will not know the parked doorbells, so
/// their words are cleared and they are closed, but those whose word the
/// daemon took (see [`Table::let_go_before_exec`]). Not in a vfork child,
/// whose memory is its parent's (its copies close at the exec).
pub fn before_exec() {
    if !sys::memory_is_ours() {
        return;
    }
    if let Some(table) = held().as_mut().and_then(|h| h.table().as_mut()) {
        table.let_go_before_exec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd};

    /// A chunk (the daemon's view, both files writable) and piece `piece`
    /// of it, as the client's end parks there.
    fn piece(piece: u8) -> (Arc<Chunk>, ParkAt) {
        let (chunk, _files) = Chunk::create(4096).unwrap();
        let chunk = Arc::new(chunk);
        let at = ParkAt::new(chunk.clone(), piece, Endpoint::Client, forks());
        (chunk, at)
    }

    fn word(chunk: &Chunk, piece: u8, end: Endpoint) -> u64 {
        chunk.piece(piece as usize).unwrap().bell_kept(end.index()).load(Ordering::Acquire)
    }

    /// A doorbell pair: this end's descriptor (to park) and the peer's.
    fn doorbell() -> (RawFd, OwnedFd) {
        let (mine, theirs) = vsocket_sys::stream_pair().unwrap();
        (mine.into_raw_fd(), theirs)
    }

    fn readable(fd: RawFd) -> bool {
        let mut pfd = [libc::pollfd { fd, events: libc::POLLIN, revents: 0 }];
        sys::poll(&mut pfd, 0) == Ok(1)
    }

    #[test]
    fn a_doorbell_parked_serves_the_next_connection_in_its_piece() {
        let _no_fork = sys::no_fork_meanwhile();
        let (chunk, at) = piece(3);
        let mut table = Table::default();
        let (mine, theirs) = doorbell();
        assert!(table.park(&at, 42, mine));
        assert_eq!(word(&chunk, 3, Endpoint::Client), 42, "the word names the connection");
        assert_eq!(word(&chunk, 3, Endpoint::Server), 0, "the peer's is the peer's");
        // The peer's last ring for the old connection comes late.
        assert_eq!(sys::send(theirs.as_raw_fd(), &[1], 0), Ok(1));
        assert_eq!(table.take(key(&chunk, 3, Endpoint::Server)), None, "another end's piece");
        assert_eq!(table.take(key(&chunk, 4, Endpoint::Client)), None, "another piece");
        let fd = table.take(at.key()).expect("parked");
        assert_eq!(fd, mine);
        // The late ring wakes the next connection's first waiter once
        // (who drains it, finds nothing and sleeps again).
        assert!(readable(fd), "the same pair");
        assert!(!sys::drain(fd));
        assert_eq!(sys::send(theirs.as_raw_fd(), &[1], 0), Ok(1));
        assert!(readable(fd), "the same pair rings");
        assert_eq!(table.take(at.key()), None, "taken once");
        sys::close(fd).unwrap();
    }

    #[test]
    fn a_doorbell_parked_whose_peer_is_gone_is_taken_for_its_kit_even_then() {
        let _no_fork = sys::no_fork_meanwhile();
        let (_chunk, at) = piece(0);
        let mut table = Table::default();
        // The peer took the next kit in the piece, connected and closed
        // before this process read its batch: the kit is still this
        // process's to accept, closed by its peer.
        let (mine, theirs) = doorbell();
        assert!(table.park(&at, 7, mine));
        drop(theirs);
        assert_eq!(table.take(at.key()), Some(mine));
        assert!(sys::drain(mine), "its end of stream is there to read");
        sys::close(mine).unwrap();
    }

    #[test]
    fn past_the_most_an_old_one_goes_but_never_one_whose_word_the_daemon_took() {
        let _no_fork = sys::no_fork_meanwhile();
        let (chunk, _) = piece(0);
        let mut table = Table::default();
        let mut peers = Vec::new();
        // Sixteen chunks' pieces, and more.
        let chunks: Vec<Arc<Chunk>> =
            std::iter::once(chunk).chain((0..MOST / 32).map(|_| Arc::new(Chunk::create(4096).unwrap().0))).collect();
        // Parks a doorbell for piece `n` (counting through the chunks).
        let park = |table: &mut Table, peers: &mut Vec<OwnedFd>, n: usize| {
            let at = ParkAt::new(chunks[n / 32].clone(), (n % 32) as u8, Endpoint::Client, forks());
            let (mine, theirs) = doorbell();
            let parked = table.park(&at, 100 + n as u64, mine);
            if !parked {
                sys::close(mine).unwrap();
            }
            peers.push(theirs);
            parked
        };
        for n in 0..MOST {
            assert!(park(&mut table, &mut peers, n));
        }
        let taken = |n: usize| chunks[n / 32].piece(n % 32).unwrap().bell_kept(0).store(0, Ordering::Release);
        // The daemon took the oldest's word (its kit may come marked for
        // the doorbell): that one stays, the next oldest goes.
        taken(0);
        assert!(park(&mut table, &mut peers, MOST));
        assert_eq!(table.parked.len(), MOST);
        assert!(table.parked.contains_key(&key(&chunks[0], 0, Endpoint::Client)), "a word taken stays");
        assert!(!vsocket_sys::hung_up(peers[0].as_fd()));
        assert_eq!(word(&chunks[0], 1, Endpoint::Client), 0, "the next oldest's word is cleared");
        assert!(vsocket_sys::hung_up(peers[1].as_fd()), "and its doorbell closed");
        assert_eq!(word(&chunks[0], 2, Endpoint::Client), 102);
        // The eight oldest not yet found taken are all taken: no room, the
        // new one is not parked (its word is not written).
        (2..LOOK + 2).for_each(taken);
        assert!(!park(&mut table, &mut peers, MOST + 1));
        assert_eq!(word(&chunks[(MOST + 1) / 32], ((MOST + 1) % 32) as u8, Endpoint::Client), 0);
        assert!((2..LOOK + 2).all(|n| !vsocket_sys::hung_up(peers[n].as_fd())));
        // The next looks past those found taken.
        assert!(park(&mut table, &mut peers, MOST + 2));
        assert!(vsocket_sys::hung_up(peers[LOOK + 2].as_fd()));
        // One found taken stays even when its peer's end is gone (its peer
        // may have used its kit and closed it already).
        drop(std::mem::replace(&mut peers[5], doorbell().1));
        (LOOK + 3..2 * LOOK + 3).for_each(taken);
        assert!(!park(&mut table, &mut peers, MOST + 3));
        assert!(table.parked.contains_key(&key(&chunks[0], 5, Endpoint::Client)));
        assert_eq!(table.parked.len(), MOST);
        // A word given back (a kit not sent) is found again once no other
        // can go.
        chunks[0].piece(5).unwrap().bell_kept(0).store(105, Ordering::Release);
        (2 * LOOK + 3..3 * LOOK + 3).for_each(taken);
        assert!(park(&mut table, &mut peers, MOST + 4));
        assert!(!table.parked.contains_key(&key(&chunks[0], 5, Endpoint::Client)));
        table.let_go();
    }

    #[test]
    fn letting_go_before_exec_keeps_only_the_doorbells_whose_word_the_daemon_took() {
        let _no_fork = sys::no_fork_meanwhile();
        let (chunk, _) = piece(0);
        let mut table = Table::default();
        let mut peers = Vec::new();
        for p in 0..3u8 {
            let (mine, theirs) = doorbell();
            assert!(table.park(&ParkAt::new(chunk.clone(), p, Endpoint::Client, forks()), 10 + u64::from(p), mine));
            peers.push(theirs);
        }
        // The daemon took piece 2's word for a kit on its way.
        chunk.piece(2).unwrap().bell_kept(0).store(0, Ordering::Release);
        // A discarded one: closed, its word left to the daemon.
        table.discard(key(&chunk, 0, Endpoint::Client));
        assert!(vsocket_sys::hung_up(peers[0].as_fd()));
        assert_eq!(word(&chunk, 0, Endpoint::Client), 10);
        // A fork child's let go keeps the words (its parent's).
        let mut child = Table::default();
        let (mine, theirs) = doorbell();
        assert!(child.park(&ParkAt::new(chunk.clone(), 5, Endpoint::Client, forks()), 15, mine));
        child.let_go();
        assert!(vsocket_sys::hung_up(theirs.as_fd()));
        assert_eq!(word(&chunk, 5, Endpoint::Client), 15);
        // Before exec: words cleared and doorbells closed, but the one the
        // daemon's kit is owed (if the exec fails, the kit may still come;
        // if it succeeds, close-on-exec closes it).
        table.let_go_before_exec();
        assert!(vsocket_sys::hung_up(peers[1].as_fd()));
        assert_eq!(word(&chunk, 1, Endpoint::Client), 0);
        assert!(!vsocket_sys::hung_up(peers[2].as_fd()));
        assert_eq!(table.parked.len(), 1);
        table.let_go();
    }

    #[test]
    fn only_the_process_the_kit_was_given_to_parks() {
        let _no_fork = sys::no_fork_meanwhile();
        let (chunk, at) = piece(9);
        let (mine, _theirs) = doorbell();
        let other = ParkAt { owner: at.owner + 1, ..at.clone() };
        assert!(park(&other, 5, mine).is_none());
        assert!(park(&at, 0, mine).is_none(), "no connection 0");
        assert_eq!(word(&chunk, 9, Endpoint::Client), 0);
        drop(park_now(&at, 5, mine).expect("parked"));
        assert_eq!(word(&chunk, 9, Endpoint::Client), 5);
        assert_eq!(take(at.key()), Some(mine));
        sys::close(mine).unwrap();
    }

    #[test]
    fn a_forked_child_holds_no_copy_of_its_parents_parked_doorbells() {
        crate::fork::watch();
        let (chunk, at) = piece(4);
        let (mine, theirs) = doorbell();
        drop(park_now(&at, 8, mine).expect("parked"));
        let child = sys::fork_running(|| {
            let closed = sys::fcntl(mine, libc::F_GETFD, 0) == Err(sys::Errno(libc::EBADF));
            // The words are the parent's.
            let word_kept = word(&chunk, 4, Endpoint::Client) == 8;
            if closed && word_kept && take(at.key()).is_none() {
                0
            } else {
                1
            }
        })
        .unwrap();
        assert_eq!(sys::wait_exit(child, 5_000), Some(0));
        assert!(!vsocket_sys::hung_up(theirs.as_fd()), "the parent's is open");
        assert_eq!(take(at.key()), Some(mine));
        // A doorbell this process had at the fork (the child has a copy
        // of it) is never parked; one that came after may be.
        assert!(park(&at, 9, mine).is_none(), "there at the fork");
        let after = ParkAt::new(chunk.clone(), 5, Endpoint::Client, forks());
        drop(park_now(&after, 9, mine).expect("came after the fork"));
        assert_eq!(take(after.key()), Some(mine));
        sys::close(mine).unwrap();
    }

    #[test]
    fn a_signal_handler_interrupting_the_tables_holder_neither_waits_nor_trusts_it() {
        crate::fork::watch();
        // In a child, whose table is its own: what a handler on the
        // holding thread would call, called while this thread holds it.
        let child = sys::fork_running(|| {
            let (chunk, at) = piece(6);
            let (mine, theirs) = doorbell();
            drop(park(&at, 3, mine).expect("parked"));
            let held = held().expect("not held yet");
            let (other, _theirs) = doorbell();
            let waits = park(&ParkAt::new(chunk.clone(), 7, Endpoint::Client, forks()), 4, other).is_some()
                || take(at.key()).is_some();
            // A close_range here could not spare what it cannot read.
            let mut seen = 0;
            each_fd(|_| seen += 1);
            drop(held);
            // Afterwards the table has forgotten them, the doorbells
            // unclosed (their numbers may be another file's by now), the
            // words cleared.
            let forgotten = take(at.key()).is_none() && !vsocket_sys::hung_up(theirs.as_fd());
            let cleared = word(&chunk, 6, Endpoint::Client) == 0;
            match (waits, seen, forgotten, cleared) {
                (false, 0, true, true) => 0,
                _ => 1,
            }
        })
        .unwrap();
        assert_eq!(sys::wait_exit(child, 5_000), Some(0), "Some(1): a check failed; None: it waited for itself");
    }
}
