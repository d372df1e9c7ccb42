//! Kits: connections vsocketd made ahead for a pair of processes that
//! connect again and again (ARCHITECTURE §3b).
//!
//! A client process keeps, per grant (a destination it connects to, bound
//! the same way), the client's ends of a batch of kits and the grant's
//! connect queue. A connect takes the next kit, writes its sequence number
//! and the socket's port to the queue and a byte to the listener's bell:
//! no message to the daemon, no descriptor received.
//!
//! A listener keeps the server's ends of the kits of its grants, which come
//! on its channel (`Kits`), and reads each grant's queue for the kits its
//! clients took; it accepts one by moving its claim word from waiting to
//! accepted, which the daemon's revocation also races for. The channel and
//! the bell are watched through one epoll descriptor (`wake_fd`), so every
//! wait on a listener (accept, poll, select, epoll) sleeps on both.

use crate::attach::{Delivery, Given};
use crate::bells;
use crate::forksafe;
use crate::sys::{self, Errno, SysResult};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vsocket_abi::control::{Grant, Message, KIT_FDS};
use vsocket_abi::grant::{Cursor, Slot};
use vsocket_abi::layout::Endpoint;
use vsocket_ring::{Chunk, ConnectQueue};

/// Most grants a client process keeps (the daemon gives at most 64).
const CLIENT_GRANTS: usize = 64;

/// Set once a daemon closed a channel on a request for kits: it is older
/// than kits, and the process asks as before from then on.
static OLD_DAEMON: AtomicBool = AtomicBool::new(false);

/// Descriptors the library must have to itself for a process to take
/// kits (four per kit until it is taken): above the soft `RLIMIT_NOFILE`,
/// or, where the soft limit is the hard one, in the upper half of the
/// range (see `sys::relocate_internal`). A process with less (a soft and
/// hard limit of 1024) connects through the daemon, so that it runs out of
/// descriptors where it would without the library.
const ROOM_FOR_KITS: u64 = 8192;

/// Are kits asked for at all? Yes, unless the program runs with
/// `VSOCKET_KITS=0` (every connect then goes through the daemon).
fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| !matches!(std::env::var_os("VSOCKET_KITS"), Some(v) if v == "0"))
}

/// Should requests ask for kits?
pub fn wanted() -> bool {
    if !enabled() {
        return false;
    }
    let room = |rl: libc::rlimit| match rl.rlim_max.saturating_sub(rl.rlim_cur) {
        0 => rl.rlim_cur / 2,
        above => above,
    };
    !OLD_DAEMON.load(Ordering::Relaxed) && sys::nofile().is_ok_and(|rl| room(rl) >= ROOM_FOR_KITS)
}

/// The daemon does not know the kit requests.
pub fn daemon_is_old() {
    OLD_DAEMON.store(true, Ordering::Relaxed);
}

/// A connection made ahead, not yet taken.
pub struct Kit {
    pub sequence: u32,
    /// The connection's id and ring size, from the header the daemon wrote
    /// in this end's half.
    pub id: u64,
    pub ring_size: u32,
    pub delivery: Delivery,
}

/// The kits of batch `grant` for end `end`, from the descriptors that
/// came with it: the batch's lifeline, each chunk's files (this end's,
/// then the peer's), then [`KIT_FDS`] per kit (its doorbell) but for the
/// kits in `grant.kept`, whose doorbell is the one this process parked
/// for their piece (see `bells`). Each kit's memory is its piece of a
/// chunk, viewed now (its headers checked, its connection id read), and
/// its lifeline the batch's, which it shares with its batch's other kits
/// and the connections made from them; a kit whose chunk cannot be
/// mapped, or whose piece's headers do not check, is let go (its
/// descriptors closed), and so is one whose kept doorbell this process
/// does not have (see [`without_doorbell`]). `forks` is what
/// `bells::forks` said before the descriptors were received.
fn kits_of(grant: &Grant, fds: &[RawFd], end: Endpoint, forks: u64) -> Vec<Kit> {
    let (lifeline, fds) = fds.split_at(1);
    let lifeline = crate::attach::Lifeline::take(lifeline[0]);
    let (files, doorbells) = fds.split_at(2 * grant.chunks as usize);
    let chunks: Vec<Option<Arc<Chunk>>> = files
        .chunks_exact(2)
        .map(|two| {
            let chunk = sys::with_borrowed(two[0], |own| {
                sys::with_borrowed(two[1], |peer| crate::attach::segcache::chunk(own, peer, end))
            });
            close_all(two);
            chunk.ok()
        })
        .collect();
    let mut doorbells = doorbells.chunks_exact(KIT_FDS).map(|one| one[0]);
    let mut kits = Vec::with_capacity(grant.count as usize);
    for (i, place) in grant.kit_places().iter().enumerate() {
        let chunk = chunks.get(place.chunk as usize).and_then(Option::as_ref);
        let key = chunk.map(|c| bells::key(c, place.piece, end));
        let doorbell = if grant.uses_kept_bell(i) {
            key.and_then(bells::take)
        } else {
            // One parked for the piece will not serve: the daemon reset
            // its word.
            if let Some(key) = key {
                bells::discard(key);
            }
            doorbells.next()
        };
        let Some((chunk, segment)) = chunk.and_then(|c| Some((c, c.piece(place.piece as usize).ok()?))) else {
            close_all(&[doorbell.unwrap_or(-1)]);
            continue;
        };
        let Some(doorbell) = doorbell else {
            without_doorbell(&segment, end);
            continue;
        };
        let (id, ring_size) = (segment.connection_id(end.index()), segment.ring_size());
        let park = bells::ParkAt::new(chunk.clone(), place.piece, end, forks);
        let delivery = Delivery::of(Given::Piece(segment), doorbell, lifeline.clone()).parked_at(park);
        kits.push(Kit { sequence: grant.first.wrapping_add(i as u32), id, ring_size, delivery });
    }
    kits
}

/// A kit marked for a doorbell this process did not park (its word was
/// forged, or the doorbell was let go meanwhile: ARCHITECTURE §3c, stage
/// 6) is not used. A client leaves it (its connects go through the
/// daemon, and the kit ends with its grant); a server resets its side,
/// so that a client that takes it sees `ECONNRESET` at its first call
/// rather than wait for an accept that never comes.
fn without_doorbell(piece: &vsocket_ring::Segment, end: Endpoint) {
    if end == Endpoint::Server {
        piece.producer(end.index()).reset();
        piece.consumer(end.peer().index()).close();
    }
}

/// A batch not taken (its listener takes no more kits): the doorbells
/// parked for its kits' pieces will serve no kit (the daemon took their
/// words for these), so they go. `fds` as [`kits_of`] takes them (a
/// piece's key names this end's file, the first of each chunk's two);
/// the caller closes them.
fn let_go_batch(grant: &Grant, fds: &[RawFd]) {
    let files = &fds[1..1 + 2 * grant.chunks as usize];
    let nonces: Vec<Option<u128>> =
        files.chunks_exact(2).map(|two| sys::with_borrowed(two[0], vsocket_ring::Segment::read_nonce).ok()).collect();
    for place in grant.kit_places() {
        if let Some(&Some(nonce)) = nonces.get(place.chunk as usize) {
            bells::discard(bells::key_in(nonce, place.piece));
        }
    }
}

/// Closes every descriptor in `fds`.
fn close_all(fds: &[RawFd]) {
    for &fd in fds.iter().filter(|&&fd| fd >= 0) {
        let _ = sys::close(fd);
    }
}

/// One grant, as its client process holds it.
struct ClientGrant {
    id: u64,
    /// The address the program's socket was bound to when it connected
    /// (0.0.0.0 if it was not), and where: what the grant is for.
    bound: Ipv4Addr,
    remote: SocketAddrV4,
    /// The client's address, as the daemon decided it.
    client: Ipv4Addr,
    ends: Arc<GrantEnds>,
    kits: VecDeque<Kit>,
}

/// What a client writes to tell the server it took a kit: the queue, and
/// a write end of the listener's bell (a Unix stream socket: a send to a
/// server that is gone fails, it raises no SIGPIPE).
pub struct GrantEnds {
    queue: ConnectQueue,
    bell: RawFd,
    /// The queue's one writer at a time (the process's threads).
    writing: Mutex<()>,
}

impl Drop for GrantEnds {
    fn drop(&mut self) {
        let _ = sys::close(self.bell);
    }
}

impl GrantEnds {
    /// Kit `sequence` is taken, for a socket bound to `port`: the slot,
    /// then the byte. One writer at a time (the lock inside).
    pub fn publish(&self, sequence: u32, port: u16) {
        let _one = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        self.queue.publish(Slot { sequence, port });
        // A full socket already wakes the server.
        let _ = sys::send(self.bell, &[1], libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
    }
}

/// The process's grants, and the process they belong to (a forked child
/// holds copies of its parent's descriptors, not its grants).
struct Clients {
    pid: i32,
    grants: Vec<ClientGrant>,
}

static CLIENTS: Mutex<Clients> = Mutex::new(Clients { pid: 0, grants: Vec::new() });

/// The grants, locked: fork's prepare handler holds them across the fork
/// (see `fork.rs`).
pub fn lock_for_fork() -> impl std::any::Any {
    CLIENTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// In a forked child (the grants held since the prepare handler, now let
/// go): the parent's kits are the parent's, and the child's copies of
/// their doorbells go now, not at its first connect. A child that never
/// connects would hold them for ever, and a connection its parent makes
/// from one of them would not end for its peer when the parent dies.
pub fn in_child() {
    drop(clients());
}

fn clients() -> std::sync::MutexGuard<'static, Clients> {
    let mut clients = CLIENTS.lock().unwrap_or_else(|e| e.into_inner());
    let pid = sys::getpid();
    if clients.pid != pid {
        // Inherited: the parent's kits are the parent's.
        clients.grants.clear();
        clients.pid = pid;
    }
    clients
}

/// Keeps the batch of kits `grant` that came with a connect from a socket
/// bound to `bound` to `remote` (the client's address `client`), from its
/// descriptors `fds`: the queue, the bell, then the batch's own (see
/// [`kits_of`]), received after `bells::forks` said `forks`.
pub fn keep_client(grant: Grant, bound: Ipv4Addr, remote: SocketAddrV4, client: Ipv4Addr, fds: Vec<RawFd>, forks: u64) {
    if fds.len() != 2 + grant.fds() {
        close_all(&fds);
        return;
    }
    let (page, bell) = (fds[0], fds[1]);
    let kits = kits_of(&grant, &fds[2..], Endpoint::Client, forks);
    // A grant this process holds already has its queue mapped and its
    // bell: the batch's copies are not needed.
    if let Some(known) = clients().grants.iter_mut().find(|g| g.id == grant.id) {
        known.kits.extend(kits);
        close_all(&[page, bell]);
        return;
    }
    let queue = sys::with_borrowed(page, |page| ConnectQueue::map(page, grant.id, true));
    let _ = sys::close(page);
    let Ok(queue) = queue else {
        let _ = sys::close(bell);
        return;
    };
    let ends = Arc::new(GrantEnds { queue, bell, writing: Mutex::new(()) });
    let mut clients = clients();
    if let Some(known) = clients.grants.iter_mut().find(|g| g.id == grant.id) {
        // (Kept by another thread meanwhile.)
        known.kits.extend(kits);
        return;
    }
    // A new grant for the same destination: the daemon ended the one
    // before.
    clients.grants.retain(|g| !(g.bound == bound && g.remote == remote));
    if clients.grants.len() >= CLIENT_GRANTS {
        clients.grants.remove(0);
    }
    clients.grants.push(ClientGrant { id: grant.id, bound, remote, client, ends, kits: kits.into() });
}

/// A kit taken for a connect.
pub struct Taken {
    pub grant: u64,
    /// Where to say it is taken (see [`GrantEnds::publish`]).
    pub ends: Arc<GrantEnds>,
    /// The client's address, as the daemon decided it for the grant.
    pub client: Ipv4Addr,
    pub kit: Kit,
}

/// The next kit for a connect from a socket bound to `bound` to `remote`.
pub fn take(bound: Ipv4Addr, remote: SocketAddrV4) -> Option<Taken> {
    let mut clients = clients();
    if clients.grants.is_empty() {
        return None;
    }
    // A daemon that crashed took its grants with it: the listener that
    // would have read this queue reads its successor's now.
    if !crate::attach::daemon_still_there() {
        clients.grants.clear();
        return None;
    }
    let grant = clients.grants.iter_mut().find(|g| g.bound == bound && g.remote == remote)?;
    let kit = grant.kits.pop_front()?;
    Some(Taken { grant: grant.id, ends: grant.ends.clone(), client: grant.client, kit })
}

/// Lets grant `grant` go (revoked): its kits are not to be taken.
pub fn forget(grant: u64) {
    clients().grants.retain(|g| g.id != grant);
}

/// A listener's kits.
pub struct ServerKits {
    /// The listener's bell (read end), and the epoll descriptor that
    /// watches it and the channel.
    bell: RawFd,
    /// Where the daemon sends `Kits` and `Revoke` (no wait watches it:
    /// they never make the listener look readable). A client takes a kit
    /// only after its batch is here, so it is read before the queues.
    kit_channel: RawFd,
    watch: RawFd,
    state: forksafe::Mutex<ServerState>,
    /// The listener takes no more kits (its process forked).
    off: AtomicBool,
    /// A batch was lost (see [`ServerKits::lost_batch`]).
    lost: AtomicBool,
}

#[derive(Default)]
struct ServerState {
    grants: HashMap<u64, ServerGrant>,
    /// Slots read from the queues and not yet looked at.
    pending: VecDeque<(u64, Slot)>,
}

struct ServerGrant {
    queue: ConnectQueue,
    cursor: Cursor,
    client: Ipv4Addr,
    server: SocketAddrV4,
    kits: HashMap<u32, Kit>,
    /// The daemon ended the grant: only the kits its slots named then
    /// are left, to accept; no slot is read from it any more.
    ended: bool,
}

impl ServerState {
    /// Grant `id` ended (`Revoke`). The daemon decided every kit of it
    /// first: a kit no client took is gone, and one a client took has its
    /// slot in the queue by now (the daemon waits for it before a
    /// hand-over, and resets it otherwise). Those slots are read now and
    /// their kits kept to accept; the rest go.
    fn revoke(&mut self, id: u64) {
        let Some(grant) = self.grants.get_mut(&id).filter(|g| !g.ended) else { return };
        let slots: Vec<Slot> = grant.queue.read_new(&mut grant.cursor).collect();
        let named: HashSet<u32> = self
            .pending
            .iter()
            .filter(|(g, _)| *g == id)
            .map(|(_, slot)| slot.sequence)
            .chain(slots.iter().map(|slot| slot.sequence))
            .collect();
        grant.kits.retain(|sequence, _| named.contains(sequence));
        grant.ended = true;
        if grant.kits.is_empty() {
            self.grants.remove(&id);
        }
        self.pending.extend(slots.into_iter().map(|slot| (id, slot)));
    }

    /// The daemon that granted these kits is gone (its kit channel ended):
    /// its clients take no more (they drop their grants when they see
    /// their request channel end), so every grant ends as at a `Revoke`.
    fn daemon_gone(&mut self) {
        let ids: Vec<u64> = self.grants.iter().filter(|(_, g)| !g.ended).map(|(&id, _)| id).collect();
        for id in ids {
            self.revoke(id);
        }
    }

    /// Nothing is left to accept: no grant, nothing pending.
    fn spent(&self) -> bool {
        self.grants.is_empty() && self.pending.is_empty()
    }

    /// Does a slot wait in memory: one read and not yet looked at, or one
    /// a client published since?
    fn slot_waits(&self) -> bool {
        !self.pending.is_empty() || self.grants.values().any(|g| !g.ended && g.queue.produced() != g.cursor.read)
    }
}

/// A kit a client took, for the server to accept.
pub struct Incoming {
    pub kit: Kit,
    /// The client's address (with the port it wrote) and the one it dialed.
    pub peer: SocketAddrV4,
    pub local: SocketAddrV4,
}

impl ServerKits {
    /// Kits for a listener whose channel is `channel`, with the bell's read
    /// end `bell` and the kit channel `kit_channel` (taken: closed on
    /// failure).
    pub fn new(channel: RawFd, bell: RawFd, kit_channel: RawFd) -> SysResult<ServerKits> {
        let mut watch = match sys::epoll_create() {
            Ok(watch) => [watch],
            Err(e) => {
                close_all(&[bell, kit_channel]);
                return Err(e);
            }
        };
        sys::relocate_internal(&mut watch, crate::attach::internal_fd_floor());
        let kits = ServerKits {
            bell,
            kit_channel,
            watch: watch[0],
            state: forksafe::Mutex::new(ServerState::default()),
            off: AtomicBool::new(false),
            lost: AtomicBool::new(false),
        };
        for fd in [channel, bell] {
            sys::epoll_ctl(kits.watch, libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32, fd as u64)?;
        }
        Ok(kits)
    }

    /// What a wait on the listener sleeps on: readable when the channel
    /// or the bell is.
    pub fn wake_fd(&self) -> RawFd {
        self.watch
    }

    fn state(&self) -> forksafe::Guard<'_, ServerState> {
        self.state.lock()
    }

    /// Keeps the server's ends of batch `grant` (clients at `client`,
    /// dialing `server`) from `fds`: the queue, then the batch's own (see
    /// [`kits_of`]).
    fn keep(
        &self,
        state: &mut ServerState,
        grant: Grant,
        client: Ipv4Addr,
        server: SocketAddrV4,
        fds: Vec<RawFd>,
        forks: u64,
    ) {
        if fds.len() != 1 + grant.fds() {
            close_all(&fds);
            return;
        }
        // (The daemon sends none after a grant's `Revoke`.)
        if self.off.load(Ordering::Acquire) || state.grants.get(&grant.id).is_some_and(|g| g.ended) {
            let_go_batch(&grant, &fds[1..]);
            close_all(&fds);
            return;
        }
        let kits = kits_of(&grant, &fds[1..], Endpoint::Server, forks);
        if let Some(known) = state.grants.get_mut(&grant.id) {
            let _ = sys::close(fds[0]);
            known.kits.extend(kits.into_iter().map(|k| (k.sequence, k)));
            return;
        }
        let queue = sys::with_borrowed(fds[0], |page| ConnectQueue::map(page, grant.id, false));
        let _ = sys::close(fds[0]);
        let Ok(queue) = queue else { return };
        let kits = kits.into_iter().map(|k| (k.sequence, k)).collect();
        state
            .grants
            .insert(grant.id, ServerGrant { queue, cursor: Cursor::default(), client, server, kits, ended: false });
    }

    /// Takes what waits on the kit channel: batches to keep, grants to let
    /// go (whose kits not yet taken go).
    ///
    /// A batch's descriptors are the library's: they are read with the
    /// soft limit raised (`attach::receive_on`), and land above the program's
    /// limit however full its own range is. The kernel drops those of a
    /// message it cannot install, so a batch that comes at the hard limit
    /// (or at a limit that cannot be raised) is lost: then
    /// [`lost_batch`](Self::lost_batch) says so, for the daemon to end the
    /// grants (the clients that took its kits see them reset).
    fn take_batches(&self, state: &mut ServerState) -> SysResult<()> {
        loop {
            let mut waiting = [libc::pollfd { fd: self.kit_channel, events: libc::POLLIN, revents: 0 }];
            if sys::poll(&mut waiting, 0).unwrap_or(0) == 0 {
                return Ok(());
            }
            let forks = bells::forks();
            match crate::attach::receive_on(self.kit_channel, libc::MSG_DONTWAIT) {
                Ok(mut reply) => match reply.message {
                    Message::Kits { grant, client, server } => {
                        self.keep(state, grant, client, server, reply.take_all(), forks)
                    }
                    Message::Revoke { grant } => state.revoke(grant),
                    _ => {}
                },
                Err(e) if e.0 == libc::EMFILE => {
                    self.lost.store(true, Ordering::Release);
                    return Err(e);
                }
                // The daemon's end closed: it is gone.
                Err(Errno(libc::ECONNABORTED | libc::ECONNRESET | libc::ENOTCONN | libc::EPIPE | libc::EBADF)) => {
                    state.daemon_gone();
                    return Ok(());
                }
                // Nothing after all; or one message unusable (passed by:
                // the channel still serves), looked at again next time.
                Err(_) => return Ok(()),
            }
        }
    }

    /// Might [`next`](Self::next) return a kit? A slot waits in memory, or
    /// the bell rings (a new grant's first slot, or a stray byte), or the
    /// listener has just been turned off (`next` then lets its kits go).
    /// An accept asks first, so that only then does it make the program's
    /// socket ahead of taking a kit: a kit is taken only once its socket
    /// is had (short of descriptors, the accept fails with EMFILE and the
    /// kit waits, with its byte in the bell).
    pub fn may_have_one(&self) -> bool {
        if self.off.load(Ordering::Acquire) || self.state().slot_waits() {
            return true;
        }
        let mut ringing = [libc::pollfd { fd: self.bell, events: libc::POLLIN, revents: 0 }];
        sys::poll(&mut ringing, 0).unwrap_or(0) > 0
    }

    /// Does this listener take no more kits (its process forked)?
    pub fn is_off(&self) -> bool {
        self.off.load(Ordering::Acquire)
    }

    /// Does a slot wait in memory? No system call (see
    /// [`may_have_one`](Self::may_have_one)).
    pub fn slot_waits(&self) -> bool {
        !self.off.load(Ordering::Acquire) && self.state().slot_waits()
    }

    /// Is every kit this listener channel had accepted or gone, with its
    /// daemon gone (or done with all its grants)? A channel that broke is
    /// then no longer read at each accept.
    pub fn spent(&self) -> bool {
        let mut state = self.state();
        if !state.spent() {
            // A `Revoke`, or the channel's end, may wait unread.
            let _ = self.take_batches(&mut state);
        }
        state.spent()
    }

    /// Was a batch lost since last asked (its descriptors cut short)?
    pub fn lost_batch(&self) -> bool {
        self.lost.swap(false, Ordering::AcqRel)
    }

    /// No more kits for this listener; whether it took them until now.
    /// Takes no lock (a fork handler calls it): the kits go at the next
    /// accept.
    pub fn turn_off(&self) -> bool {
        !self.off.swap(true, Ordering::AcqRel)
    }

    /// The next kit a client took, if any.
    ///
    /// The bell holds one byte per slot not yet looked at: a client writes
    /// its slot, then its byte, and each slot looked at here takes one. So
    /// the bell stays readable (and a program's poll or epoll wakes) while
    /// slots wait, and a byte read is never one whose slot is not yet
    /// visible. Finding no slot, one byte is taken all the same (a stray
    /// one a client wrote would keep the bell readable for ever), and the
    /// queues are read again: a slot published meanwhile, whose byte that
    /// was, is taken with it. The kit channel is read only when a slot
    /// names a kit not known yet, or no slot is found (a new grant's queue
    /// is known only from its first batch): a client takes a kit only after
    /// its batch was sent there. A slot that names no kit of this
    /// process's is passed by.
    /// Fails (EMFILE) when a batch came that not even the hard limit had
    /// room for: the accept fails so, and the batch is lost (see
    /// [`lost_batch`](Self::lost_batch)).
    ///
    /// An accept makes the program's socket first (see
    /// [`may_have_one`](Self::may_have_one)): a kit once returned here is
    /// the caller's.
    pub fn next(&self) -> SysResult<Option<Incoming>> {
        if self.off.load(Ordering::Acquire) {
            // (A forked child's kits are let go here, not in its fork
            // handler, where another thread of the parent may have held
            // this lock.)
            let mut state = self.state();
            state.grants.clear();
            state.pending.clear();
            return Ok(None);
        }
        let mut state = self.state();
        let mut byte = [0u8; 1];
        // A byte taken ahead of its slot; the kit channel read.
        let mut credit = false;
        let mut batches_read = false;
        loop {
            if state.pending.is_empty() {
                let ServerState { grants, pending, .. } = &mut *state;
                for (&id, grant) in grants.iter_mut().filter(|(_, g)| !g.ended) {
                    pending.extend(grant.queue.read_new(&mut grant.cursor).map(|slot| (id, slot)));
                }
            }
            while let Some(&(id, slot)) = state.pending.front() {
                let known =
                    |state: &ServerState| state.grants.get(&id).is_some_and(|g| g.kits.contains_key(&slot.sequence));
                if !known(&state) {
                    // Its batch may have come since the kit channel was
                    // last read.
                    self.take_batches(&mut state)?;
                    batches_read = true;
                }
                state.pending.pop_front();
                if !std::mem::take(&mut credit) {
                    let _ = sys::recv(self.bell, &mut byte, libc::MSG_DONTWAIT);
                }
                let Some(grant) = state.grants.get_mut(&id) else { continue };
                let Some(kit) = grant.kits.remove(&slot.sequence) else { continue };
                let incoming = Incoming { kit, peer: SocketAddrV4::new(grant.client, slot.port), local: grant.server };
                if grant.ended && grant.kits.is_empty() {
                    state.grants.remove(&id);
                }
                return Ok(Some(incoming));
            }
            if !batches_read {
                self.take_batches(&mut state)?;
                batches_read = true;
                continue;
            }
            if credit || sys::recv(self.bell, &mut byte, libc::MSG_DONTWAIT) != Ok(1) {
                return Ok(None);
            }
            credit = true;
        }
    }

    /// The library's own descriptors here: the bell, the kit channel and
    /// the watch.
    pub fn fds(&self) -> [RawFd; 3] {
        [self.bell, self.kit_channel, self.watch]
    }
}

impl Drop for ServerKits {
    fn drop(&mut self) {
        close_all(&[self.watch, self.bell, self.kit_channel]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, AsRawFd, IntoRawFd};
    use vsocket_ring::RxState;

    fn kit(sequence: u32) -> Kit {
        let delivery = Delivery::of(Given::Taken, -1, None);
        Kit { sequence, id: u64::from(sequence), ring_size: 4096, delivery }
    }

    /// A server's state holding grant 7, kits 0 to 4, and the client's
    /// (here the daemon's, writable) view of its queue.
    fn holding_five() -> (ServerState, ConnectQueue) {
        let (client_view, _rw, read_only) = ConnectQueue::create(7).unwrap();
        let queue = ConnectQueue::map(read_only.as_fd(), 7, false).unwrap();
        let mut state = ServerState::default();
        let grant = ServerGrant {
            queue,
            cursor: Cursor::default(),
            client: Ipv4Addr::new(10, 10, 0, 2),
            server: SocketAddrV4::new(Ipv4Addr::new(10, 10, 0, 3), 7000),
            kits: (0..5).map(|s| (s, kit(s))).collect(),
            ended: false,
        };
        state.grants.insert(7, grant);
        (state, client_view)
    }

    #[test]
    fn a_revoked_grant_keeps_only_the_kits_its_slots_name_until_they_are_accepted() {
        let (mut state, client) = holding_five();
        // Kit 1 was looked at before (pending), kit 3 is in the queue only.
        client.publish(Slot { sequence: 1, port: 40_001 });
        let grant = state.grants.get_mut(&7).unwrap();
        state.pending.extend(grant.queue.read_new(&mut grant.cursor).map(|s| (7, s)));
        client.publish(Slot { sequence: 3, port: 40_003 });
        state.revoke(7);
        let grant = &state.grants[&7];
        assert!(grant.ended);
        let mut left: Vec<u32> = grant.kits.keys().copied().collect();
        left.sort_unstable();
        assert_eq!(left, [1, 3]);
        assert_eq!(state.pending.iter().map(|(_, s)| s.sequence).collect::<Vec<_>>(), [1, 3]);
        assert!(!state.spent());
        // Slots written after the end are not read.
        client.publish(Slot { sequence: 4, port: 40_004 });
        state.revoke(7);
        assert_eq!(state.grants[&7].kits.len(), 2);
        assert_eq!(state.pending.len(), 2);
    }

    #[test]
    fn a_revoked_grant_whose_kits_no_client_took_goes_at_once() {
        let (mut state, _client) = holding_five();
        state.revoke(7);
        assert!(state.grants.is_empty());
        assert!(state.spent());
        // A `Revoke` for a grant not known is nothing.
        state.revoke(8);
        assert!(state.spent());
    }

    /// A batch of `count` kits from 10 for grant 9 in one chunk, as the
    /// daemon sends it to end `end` (its lifeline, the chunk's two files,
    /// a doorbell per kit), with the daemon's view of the chunk and the
    /// lifeline's read end.
    fn batch(
        count: u8,
        end: Endpoint,
    ) -> (Grant, Vec<RawFd>, vsocket_ring::Chunk, std::os::fd::OwnedFd, Vec<std::os::fd::OwnedFd>) {
        let (daemon, files) = Chunk::create(4096).unwrap();
        let mut grant = Grant::in_one_chunk(9, 10, count);
        // Pieces out of order, as a pair's free pieces come back.
        for (i, place) in grant.places.iter_mut().take(count as usize).enumerate() {
            place.piece = 31 - i as u8;
            daemon.piece(place.piece as usize).unwrap().set_connection_id(100 + i as u64);
        }
        let (fds, lifeline, peers) = batch_fds(&grant, &files, end);
        (grant, fds, daemon, lifeline, peers)
    }

    /// The descriptors of batch `grant` in the chunk of `files` for end
    /// `end`: its lifeline, the chunk's files, a doorbell for each kit not
    /// in `grant.kept`; with the lifeline's read end and the doorbells'
    /// other ends.
    fn batch_fds(
        grant: &Grant,
        files: &vsocket_ring::SegmentFiles,
        end: Endpoint,
    ) -> (Vec<RawFd>, std::os::fd::OwnedFd, Vec<std::os::fd::OwnedFd>) {
        let (read, holds) = vsocket_sys::pipe().unwrap();
        let [own, peer] = files.clone_for(end).unwrap();
        let mut fds = vec![holds.into_raw_fd(), own.into_raw_fd(), peer.into_raw_fd()];
        let mut peers = Vec::new();
        for _ in 0..grant.count - grant.kept.count_ones() as u8 {
            let (mine, theirs) = vsocket_sys::stream_pair().unwrap();
            fds.push(mine.into_raw_fd());
            peers.push(theirs);
        }
        (fds, read, peers)
    }

    #[test]
    fn a_batchs_kits_are_pieces_of_its_chunk_and_share_its_lifeline() {
        let _no_fork = sys::no_fork_meanwhile();
        let (grant, fds, daemon, lifeline, _bells) = batch(3, Endpoint::Server);
        let kits = kits_of(&grant, &fds, Endpoint::Server, bells::forks());
        assert_eq!(kits.iter().map(|k| (k.sequence, k.id)).collect::<Vec<_>>(), [(10, 100), (11, 101), (12, 102)]);
        // The kit's memory is its piece: what the daemon's view of piece
        // 30 holds, kit 11 sees.
        daemon.piece(30).unwrap().producer(0).write(&[b"hi"]).unwrap();
        let Given::Piece(piece) = &kits[1].delivery.memory else { panic!("a kit's memory is its piece") };
        assert_eq!(piece.producer(0).total(), 2);
        // The lifeline is held while any kit (or connection made from one)
        // is.
        let mut kits = kits;
        let last = kits.pop().unwrap();
        drop(kits);
        assert!(!vsocket_sys::hung_up(lifeline.as_fd()), "a kit still holds it");
        drop(last);
        assert!(vsocket_sys::hung_up(lifeline.as_fd()), "the last share closed it");
    }

    #[test]
    fn a_kit_whose_piece_does_not_check_is_let_go_with_its_doorbell() {
        let _no_fork = sys::no_fork_meanwhile();
        // The client's file given where the server's is due: each piece's
        // header names the other end.
        let (grant, fds, _daemon, _lifeline, bells) = batch(2, Endpoint::Client);
        assert!(kits_of(&grant, &fds, Endpoint::Server, bells::forks()).is_empty());
        for bell in &bells {
            assert!(vsocket_sys::hung_up(bell.as_fd()), "its doorbell was closed");
        }
        // A place past the chunks that came: that kit alone is let go.
        let (mut grant, fds, _daemon, _lifeline, _bells) = batch(2, Endpoint::Client);
        grant.places[0].chunk = 5;
        let kits = kits_of(&grant, &fds, Endpoint::Client, bells::forks());
        assert_eq!(kits.iter().map(|k| k.sequence).collect::<Vec<_>>(), [11]);
    }

    #[test]
    fn a_doorbell_left_in_an_epoll_set_whose_owner_closed_it_is_not_parked() {
        use crate::conn::{Blocking, Connection};
        use crate::table::{self, Entry};
        use vsocket_abi::control::ConnectionInfo;
        let _no_fork = sys::no_fork_meanwhile();
        let (grant, fds, daemon, _lifeline, _peers) = batch(2, Endpoint::Client);
        let kits = kits_of(&grant, &fds, Endpoint::Client, bells::forks());
        // Each kit connection at a descriptor number of its own.
        let numbers =
            [std::net::UdpSocket::bind("127.0.0.1:0").unwrap(), std::net::UdpSocket::bind("127.0.0.1:0").unwrap()];
        let mut pieces = Vec::new();
        for ((kit, number), place) in kits.into_iter().zip(&numbers).zip(&grant.places) {
            assert!(kit.delivery.park.is_some(), "a kit's doorbell may be parked");
            pieces.push((kit.id, place.piece, daemon.piece(place.piece as usize).unwrap()));
            let info = ConnectionInfo {
                id: kit.id,
                local: "10.0.0.2:4000".parse().unwrap(),
                peer: "10.0.0.3:80".parse().unwrap(),
                ring_size: kit.ring_size,
            };
            let conn =
                Connection::new(info, Endpoint::Client, crate::addr::Family::V4, kit.delivery, Blocking::Blocking);
            table::set(number.as_raw_fd(), Arc::new(Entry::Conn(conn.unwrap())));
        }
        let word = |i: usize| pieces[i].2.bell_kept(Endpoint::Client.index()).load(Ordering::Acquire);
        // Both connections in a set of this process's.
        let epfd = sys::epoll_create().unwrap();
        table::track_epoll(epfd);
        {
            let entry = table::get(epfd).unwrap();
            let Entry::Epoll(set) = &*entry else { panic!("a set") };
            for number in &numbers {
                let fd = number.as_raw_fd();
                let event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: fd as u64 };
                set.ctl(libc::EPOLL_CTL_ADD, fd, Some(event)).unwrap();
            }
        }
        // The first closes while its set is open: the set deletes its
        // doorbell, which is parked.
        table::release(numbers[0].as_raw_fd());
        assert_eq!(word(0), pieces[0].0, "parked");
        // The set's owner closes it while a copy keeps the kernel's set,
        // with the second's doorbell in it, alive: nothing here will
        // delete it, so it is not kept for another connection.
        let copy = sys::fcntl(epfd, libc::F_DUPFD_CLOEXEC, 0).unwrap() as RawFd;
        table::release(epfd);
        let _ = sys::close(epfd);
        table::release(numbers[1].as_raw_fd());
        assert_eq!(word(1), 0, "not parked");
        let _ = sys::close(copy);
        bells::discard(bells::key(&daemon, pieces[0].1, Endpoint::Client));
    }

    #[test]
    fn a_kit_whose_doorbell_was_kept_takes_the_one_parked_for_its_piece_and_without_it_is_not_used() {
        let _no_fork = sys::no_fork_meanwhile();
        for end in [Endpoint::Client, Endpoint::Server] {
            let (daemon, files) = Chunk::create(4096).unwrap();
            let mut grant = Grant::in_one_chunk(9, 10, 2);
            grant.places[1].piece = 7;
            for (i, piece) in [0, 7].into_iter().enumerate() {
                daemon.piece(piece).unwrap().set_connection_id(100 + i as u64);
            }
            let (fds, _lifeline, peers) = batch_fds(&grant, &files, end);
            let mut kits = kits_of(&grant, &fds, end, bells::forks());
            // Kit 10's connection closed here, alone: its doorbell parked.
            let mut first = kits.remove(0);
            let at = first.delivery.park.clone().expect("a kit's doorbell may be parked");
            let parked = first.delivery.take_wakeups().doorbell;
            drop(bells::park_now(&at, first.id, parked).expect("parked"));
            assert_eq!(daemon.piece(0).unwrap().bell_kept(end.index()).load(Ordering::Acquire), 100);
            // The daemon retired it, and gives the next kits in pieces 0
            // (its doorbell kept) and 7 (kit 11's piece: never used, so
            // with a doorbell of its own).
            for (piece, id) in [(0, 200), (7, 201)] {
                let segment = daemon.piece(piece).unwrap();
                segment.reset();
                segment.set_connection_id(id);
            }
            let mut next = Grant::in_one_chunk(9, 12, 2);
            next.places[1].piece = 7;
            next.kept = 0b01;
            let (fds, _lifeline, new_peers) = batch_fds(&next, &files, end);
            assert_eq!(fds.len(), next.fds());
            let kits = kits_of(&next, &fds, end, bells::forks());
            assert_eq!(kits.iter().map(|k| (k.sequence, k.id)).collect::<Vec<_>>(), [(12, 200), (13, 201)]);
            assert_eq!(kits[0].delivery.doorbell, parked, "{end:?}: the parked doorbell");
            assert_eq!(sys::send(peers[0].as_raw_fd(), &[1], 0), Ok(1));
            let mut ringing = [libc::pollfd { fd: parked, events: libc::POLLIN, revents: 0 }];
            assert_eq!(sys::poll(&mut ringing, 0), Ok(1), "rung by the same peer");
            assert_eq!(kits[1].delivery.doorbell, fds[3]);
            drop(kits);
            assert!(vsocket_sys::hung_up(peers[0].as_fd()) && vsocket_sys::hung_up(new_peers[0].as_fd()));
            // A kit marked kept in a piece where nothing is parked.
            let segment = daemon.piece(0).unwrap();
            segment.reset();
            segment.set_connection_id(300);
            let mut forged = Grant::in_one_chunk(9, 14, 1);
            forged.kept = 1;
            let (fds, _lifeline, _) = batch_fds(&forged, &files, end);
            assert!(kits_of(&forged, &fds, end, bells::forks()).is_empty(), "{end:?}: not used");
            let client_reads = segment.consumer(Endpoint::Server.index()).state();
            if end == Endpoint::Server {
                // A client that takes it is reset at once.
                assert_eq!(client_reads, Ok(RxState::Reset));
            } else {
                assert_eq!(client_reads, Ok(RxState::Empty));
            }
        }
    }

    /// A listener's kits with grant 7 (kits 0 to 4), the client's view of
    /// the queue, the bell's client end and the daemon's end of the kit
    /// channel.
    fn listener_with_five() -> (ServerKits, ConnectQueue, std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
        let (channel, _daemon_channel) = vsocket_sys::seqpacket_pair_nonblocking_first().unwrap();
        let (bell, ringer) = vsocket_sys::stream_pair().unwrap();
        let (kit_channel, daemon_kits) = vsocket_sys::seqpacket_pair_nonblocking_first().unwrap();
        let kits = ServerKits::new(channel.into_raw_fd(), bell.into_raw_fd(), kit_channel.into_raw_fd()).unwrap();
        let (mut state, client) = holding_five();
        std::mem::swap(&mut *kits.state(), &mut state);
        (kits, client, ringer, daemon_kits)
    }

    #[test]
    fn a_batch_a_listener_no_longer_takes_lets_go_the_doorbells_parked_for_its_pieces() {
        let _no_fork = sys::no_fork_meanwhile();
        let (kits, _client, _ringer, _daemon) = listener_with_five();
        let (daemon, files) = Chunk::create(4096).unwrap();
        let grant = Grant::in_one_chunk(9, 10, 2);
        for piece in 0..2 {
            daemon.piece(piece).unwrap().set_connection_id(100 + piece as u64);
        }
        let (fds, _lifeline, _peers) = batch_fds(&grant, &files, Endpoint::Server);
        let mut first = kits_of(&grant, &fds, Endpoint::Server, bells::forks()).remove(0);
        // Kit 10's connection closed here: its doorbell parked, its word
        // then taken by the daemon for the next kit in piece 0.
        let at = first.delivery.park.clone().unwrap();
        let parked = first.delivery.take_wakeups().doorbell;
        let doorbell = sys::socket_of_fd(parked).expect("a socket");
        drop(bells::park_now(&at, first.id, parked).expect("parked"));
        daemon.piece(0).unwrap().bell_kept(Endpoint::Server.index()).store(0, Ordering::Release);
        // That kit comes in a batch the listener no longer takes (it forked).
        kits.turn_off();
        let mut next = Grant::in_one_chunk(9, 12, 1);
        next.kept = 1;
        let (fds, _lifeline, _) = batch_fds(&next, &files, Endpoint::Server);
        let mut all = vec![-1];
        all.extend(fds);
        kits.keep(&mut kits.state(), next, Ipv4Addr::LOCALHOST, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 7000), all, 0);
        // Closed: its number names nothing, or (tests run in parallel)
        // another test's new descriptor.
        assert_ne!(sys::socket_of_fd(parked), Some(doorbell), "let go");
        assert_eq!(bells::take(bells::key(&daemon, 0, Endpoint::Server)), None);
    }

    #[test]
    fn a_forked_child_holds_no_copy_of_its_parents_unused_kits_doorbells() {
        crate::fork::watch();
        let (daemon, files) = Chunk::create(4096).unwrap();
        let grant = Grant::in_one_chunk(77, 0, 1);
        daemon.piece(0).unwrap().set_connection_id(500);
        let (_queue, page, _read_only) = ConnectQueue::create(77).unwrap();
        let (bell, _ringer) = vsocket_sys::stream_pair().unwrap();
        let (batch, _lifeline, peers) = batch_fds(&grant, &files, Endpoint::Client);
        let doorbell = batch[3];
        let mut fds = vec![page.into_raw_fd(), bell.into_raw_fd()];
        fds.extend(batch);
        let remote = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 3), 7000);
        keep_client(grant, Ipv4Addr::UNSPECIFIED, remote, Ipv4Addr::new(10, 77, 0, 2), fds, bells::forks());
        let child = sys::fork_running(|| {
            if sys::fcntl(doorbell, libc::F_GETFD, 0) == Err(sys::Errno(libc::EBADF)) {
                0
            } else {
                1
            }
        })
        .unwrap();
        assert_eq!(sys::wait_exit(child, 5_000), Some(0), "the child closed its copy at once");
        assert!(!vsocket_sys::hung_up(peers[0].as_fd()), "the parent's kit keeps its doorbell");
        forget(77);
        assert!(vsocket_sys::hung_up(peers[0].as_fd()));
    }

    /// What a client does to connect with kit `sequence`: its slot, then
    /// its byte.
    fn ring(client: &ConnectQueue, ringer: &std::os::fd::OwnedFd, sequence: u32) {
        client.publish(Slot { sequence, port: 40_000 + sequence as u16 });
        assert_eq!(sys::send(ringer.as_raw_fd(), &[1], libc::MSG_DONTWAIT), Ok(1));
    }

    #[test]
    fn the_bell_holds_a_byte_for_each_slot_not_yet_looked_at() {
        let (kits, client, ringer, _daemon) = listener_with_five();
        assert!(!kits.may_have_one(), "nothing written, nothing rung");
        ring(&client, &ringer, 2);
        ring(&client, &ringer, 0);
        assert!(kits.may_have_one());
        let first = kits.next().unwrap().unwrap();
        assert_eq!((first.kit.sequence, first.peer.port()), (2, 40_002));
        // One slot left, and its byte.
        assert!(kits.may_have_one());
        let mut ringing = [libc::pollfd { fd: kits.bell, events: libc::POLLIN, revents: 0 }];
        assert_eq!(sys::poll(&mut ringing, 0), Ok(1));
        assert_eq!(kits.next().unwrap().unwrap().kit.sequence, 0);
        assert_eq!(sys::poll(&mut ringing, 0), Ok(0), "every byte taken with its slot");
        assert!(!kits.may_have_one());
        assert!(kits.next().unwrap().is_none());
    }

    #[test]
    fn a_stray_byte_is_taken_once_and_a_slot_naming_no_kit_is_passed_by() {
        let (kits, client, ringer, _daemon) = listener_with_five();
        assert_eq!(sys::send(ringer.as_raw_fd(), &[1], libc::MSG_DONTWAIT), Ok(1));
        assert!(kits.may_have_one(), "the bell rings");
        assert!(kits.next().unwrap().is_none());
        assert!(!kits.may_have_one(), "the stray byte is gone");
        ring(&client, &ringer, 9);
        assert!(kits.next().unwrap().is_none(), "no kit 9 here");
        assert!(!kits.may_have_one());
    }

    #[test]
    fn the_daemon_gone_ends_every_grant_as_a_revoke() {
        let (mut state, client) = holding_five();
        client.publish(Slot { sequence: 0, port: 40_000 });
        state.daemon_gone();
        assert_eq!(state.grants[&7].kits.keys().copied().collect::<Vec<_>>(), [0]);
        assert!(state.grants[&7].ended);
    }
}
