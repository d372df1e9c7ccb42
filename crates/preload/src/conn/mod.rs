//! One end of a connection over vSocket: the ring pair, the doorbell, and
//! the TCP semantics programs expect (blocking and non-blocking I/O, FIN,
//! RST, EPIPE, half-close).
//!
//! Bytes never pass through the kernel. The doorbell (one end of a Unix
//! stream pair whose other end the peer holds) carries only wake-ups, and
//! only when the peer armed its `waiting` flag before sleeping; its end of
//! stream also tells us that every process holding the peer's end is gone.

mod blocking;
mod rung;
mod state;

use crate::attach::{ConnectionMemory, Delivery, Memory, Remap, Wakeups};
use crate::forksafe;
use crate::readiness::{Interest, Readiness};
use crate::scratch;
use crate::sys::{self, Errno, SysResult};
pub use blocking::MAX_SLEEP_MS;
use rung::LeftRung;
pub use state::Blocking;
use state::{Flags, State};
use std::cell::Cell;
use std::net::SocketAddrV4;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};
use vsocket_abi::control::ConnectionInfo;
use vsocket_abi::layout::Endpoint;
use vsocket_ring::{Consumer, Producer, RingError, RxState};

/// What one step of a read came to (see `Connection::recv_step`).
enum Step {
    /// The read is over, with this result.
    Done(SysResult<usize>),
    /// The read must wait for bytes, having taken this many so far.
    Wait(usize),
}

/// The mark, in an end's sleepers word (beside the count), of the last
/// sleeper to wake taking the doorbell and the arming (see
/// [`Connection::wake`]).
const LAST_WAKING: u32 = 1 << 31;

/// How long a waiter waits for the last sleeper to wake to finish before it
/// takes the mark to be stale (see `Connection::wait_for_last_waking`): far
/// longer than a drain and a disarm take, even on a busy machine (in unit
/// tests, longer still: their pauses must not pass for a killed waker).
const LAST_WAKING_WAIT_NS: u64 = if cfg!(test) { 2_000_000_000 } else { 100_000_000 };

pub struct Connection {
    segment: Memory,
    endpoint: Endpoint,
    /// Our end of the doorbell pair (a library-internal descriptor).
    pub doorbell: RawFd,
    /// Our lifeline to the daemon (write end of its pipe; never written):
    /// held while this process holds the connection (a kit's is its
    /// batch's, shared).
    lifeline: Option<std::sync::Arc<crate::attach::Lifeline>>,
    /// A kit's: where its doorbell is parked when this process, its last
    /// holder, closes it (see `bells`); then `bell_parked` is set and the
    /// doorbell is not closed.
    park: Option<crate::bells::ParkAt>,
    bell_parked: AtomicBool,
    /// The doorbell was registered in an epoll set another process made
    /// (inherited over fork), which never deletes it (see
    /// `EpollSet::forget`), or in a set of this process's that was closed
    /// while the kernel's may live on: it is not parked, or the set would
    /// go on watching it for the next connection.
    bell_in_inherited_set: AtomicBool,
    pub info: ConnectionInfo,
    /// The family of the program's socket (addresses are shown in it).
    pub family: crate::addr::Family,
    /// The last fork generation this connection was counted in (see
    /// `note_fork`).
    fork_generation: AtomicU64,
    /// Blocking mode, shutdowns, resets, close (see `state`).
    state: State,
    /// Every process holding the peer's end is gone (its doorbell hung
    /// up): the stream reads as finished and writes fail, as if the peer
    /// had closed. Kept here, since this end cannot write the peer's half.
    peer_gone: AtomicBool,
    /// The ring this process's waiters last left for other sleepers (see
    /// `wake`): one left too long means a sleeper died asleep.
    left_rung: LeftRung,
    /// Pending SO_ERROR.
    so_error: AtomicI32,
    /// SO_RCVTIMEO and SO_SNDTIMEO in milliseconds (0: none), kept in step
    /// with the kernel socket by the setsockopt hook.
    recv_timeout_ms: AtomicI64,
    send_timeout_ms: AtomicI64,
    /// Serialise this process's readers and writers of the stream.
    /// Held while bytes are taken from the receive ring.
    rx_lock: forksafe::Lock,
    /// Held for a whole send, across waits for room (see `lock_sending`).
    tx_lock: forksafe::Lock,
}

/// Which way bytes move: what a timeout applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Receive,
    Send,
}

impl Direction {
    /// The socket option that holds its timeout.
    pub fn timeout_option(self) -> i32 {
        match self {
            Direction::Receive => libc::SO_RCVTIMEO,
            Direction::Send => libc::SO_SNDTIMEO,
        }
    }
}

/// A socket whose connect policy silently dropped: it never completes, as
/// behind a firewall that drops SYNs.
pub struct Dropped {
    /// When the kernel would give up (ETIMEDOUT), monotonic milliseconds.
    pub deadline_ms: i64,
}

/// What edge-triggered epoll compares to see whether a registration owes
/// an event: it changes whenever readiness might.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EdgeSnapshot {
    /// Bytes produced to us.
    pub produced: u64,
    /// Bytes consumed from us.
    pub consumed: u64,
    pub readiness: Readiness,
}

/// What a new program image needs, besides the descriptors, to go on
/// with a connection after exec (see `exec`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resumed {
    pub info: ConnectionInfo,
    pub endpoint: Endpoint,
    pub family: crate::addr::Family,
    /// The state's flags ([`state::Flags::bits`]).
    pub flags: u32,
    pub recv_timeout_ms: i64,
    pub send_timeout_ms: i64,
}

/// A connection's library-internal descriptors, as they cross exec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Internal {
    pub doorbell: RawFd,
    /// -1 where no daemon watches (unit tests).
    pub lifeline: RawFd,
    /// Whether a new image can have the memory again (with the lifeline).
    pub remap: Remap,
}

impl Internal {
    /// The descriptors that are open (the lifeline may not be).
    pub fn open_fds(&self) -> impl Iterator<Item = RawFd> {
        [self.doorbell, self.lifeline].into_iter().filter(|&fd| fd >= 0)
    }
}

impl Connection {
    /// Maps the segment the daemon sent, and takes its wake-ups (see
    /// `attach`).
    pub fn new(
        info: ConnectionInfo,
        endpoint: Endpoint,
        family: crate::addr::Family,
        delivery: Delivery,
        blocking: Blocking,
    ) -> SysResult<Connection> {
        let flags = State::new(blocking).get().bits();
        let fresh = Resumed { info, endpoint, family, flags, recv_timeout_ms: 0, send_timeout_ms: 0 };
        // Made as a taken-up end is, which this process already counts;
        // a new one counts this process now. No read of it can be under
        // way yet (see `add_holder`): nothing else here holds it.
        let conn = Connection::resume(fresh, delivery)?;
        conn.segment.holders(conn.endpoint.index()).fetch_add(1, Ordering::AcqRel);
        Ok(conn)
    }

    /// Takes up again, in a new program image, the connection this process
    /// held before exec: it is already counted among the end's holders.
    pub fn resume(resumed: Resumed, mut delivery: Delivery) -> SysResult<Connection> {
        let segment = Memory::map(&mut delivery, &resumed.info, resumed.endpoint)?;
        let Wakeups { doorbell, lifeline } = delivery.take_wakeups();
        let conn = Connection {
            segment,
            endpoint: resumed.endpoint,
            doorbell,
            lifeline,
            park: delivery.park.take(),
            bell_parked: AtomicBool::new(false),
            bell_in_inherited_set: AtomicBool::new(false),
            info: resumed.info,
            family: resumed.family,
            fork_generation: AtomicU64::new(0),
            left_rung: LeftRung::default(),
            state: State::resumed(resumed.flags),
            peer_gone: AtomicBool::new(false),
            so_error: AtomicI32::new(0),
            recv_timeout_ms: AtomicI64::new(resumed.recv_timeout_ms),
            send_timeout_ms: AtomicI64::new(resumed.send_timeout_ms),
            rx_lock: forksafe::Lock::new(),
            tx_lock: forksafe::Lock::new(),
        };
        conn.forget_earlier_sleepers();
        // A claim naming this process was left by a thread of the image
        // before exec, which ended in the middle of a copy.
        let me = sys::getpid() as u32;
        conn.rx().release_claim(me);
        conn.tx().release_claim(me);
        Ok(conn)
    }

    /// What crosses exec with this connection: its state and its
    /// descriptors.
    pub fn for_exec(&self) -> (Resumed, Internal) {
        let resumed = Resumed {
            info: self.info,
            endpoint: self.endpoint,
            family: self.family,
            flags: self.state.get().bits(),
            recv_timeout_ms: self.recv_timeout_ms.load(Ordering::Relaxed),
            send_timeout_ms: self.send_timeout_ms.load(Ordering::Relaxed),
        };
        (resumed, self.internal())
    }

    /// This end's library-internal descriptors.
    pub fn internal(&self) -> Internal {
        let lifeline = self.lifeline.as_ref().map_or(-1, |l| l.fd());
        Internal { doorbell: self.doorbell, lifeline, remap: self.segment.remap() }
    }

    /// Counts one more process holding this end: this one for a new
    /// connection, a child about to be forked, a vfork child about to exec.
    /// A read of this process that found it the end's only holder, and so
    /// took no read claim (see [`Connection::only_holder`]), finishes
    /// first: the count is raised holding the receive lock, under which
    /// every read looks at it, so every read after it claims. A vfork child
    /// (counted before its exec) takes the lock as its parent, whose memory
    /// it runs on. Not when this thread is itself inside a read (a fork
    /// from a signal handler that interrupted it): it cannot wait for
    /// itself, and that read is not finished first.
    pub fn add_holder(&self) {
        let _reads_done = if READING.with(Cell::get) > 0 {
            None
        } else if sys::memory_is_ours() {
            Some(self.rx_lock.lock())
        } else {
            Some(self.rx_lock.lock_as(sys::memory_owner() as u32))
        };
        self.segment.holders(self.endpoint.index()).fetch_add(1, Ordering::AcqRel);
    }

    /// Takes the receive lock, marking this thread as inside a read (see
    /// [`Connection::add_holder`]).
    fn lock_receiving(&self) -> Receiving<'_> {
        let guard = self.rx_lock.lock();
        READING.with(|r| r.set(r.get() + 1));
        Receiving { _guard: guard }
    }

    /// This process's turn to take bytes from the ring: none needed while
    /// it alone holds the end (see [`Connection::only_holder`]), else the
    /// read claim; `Err` once the connection had to be broken for it (see
    /// [`Connection::claim`]).
    fn read_turn(&self) -> Result<Option<Claim<'_>>, Errno> {
        if self.only_holder() {
            return Ok(None);
        }
        self.claim(Side::Rx).map(Some).ok_or_else(|| self.break_connection())
    }

    /// Is this process the only one holding this end? Then no other
    /// process can read it, and a read needs no read claim. Looked at
    /// under the receive lock: another process is counted (fork, a vfork
    /// child's exec) under it too, before that process exists
    /// (`add_holder`); one that lets go counts itself out after its last
    /// read (Release, here Acquire).
    fn only_holder(&self) -> bool {
        self.segment.holders(self.endpoint.index()).load(Ordering::Acquire) == 1
    }

    /// A kit this client takes, bound to `port` (ARCHITECTURE §3b): its
    /// take word goes from free to taken, unless the daemon ended the kit
    /// first (false: the connect goes another way).
    pub fn take_kit(&self, port: u16) -> bool {
        let take = self.segment.take();
        let taken = vsocket_abi::layout::KIT_TAKEN | u32::from(port);
        take.compare_exchange(vsocket_abi::layout::KIT_FREE, taken, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// A kit this server accepts (ARCHITECTURE §3b): one its client took,
    /// whose claim word goes from waiting to accepted, unless the daemon
    /// delivered or revoked it first (false: it is not this accept's).
    pub fn claim_kit(&self) -> bool {
        let taken = vsocket_abi::layout::taken_port(self.segment.take().load(Ordering::Acquire)).is_some();
        if !taken {
            return false;
        }
        let claim = self.segment.claim();
        claim
            .compare_exchange(
                vsocket_abi::layout::KIT_WAITING,
                vsocket_abi::layout::KIT_ACCEPTED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Takes back [`add_holder`](Self::add_holder) (the exec failed).
    pub fn remove_holder(&self) {
        self.segment.holders(self.endpoint.index()).fetch_sub(1, Ordering::AcqRel);
    }

    fn tx(&self) -> Producer<'_> {
        self.segment.producer(self.endpoint.tx_ring()).or_gone(&self.peer_gone)
    }

    fn rx(&self) -> Consumer<'_> {
        self.segment.consumer(self.endpoint.rx_ring()).or_gone(&self.peer_gone)
    }

    pub fn local(&self) -> SocketAddrV4 {
        self.info.local
    }

    pub fn peer(&self) -> SocketAddrV4 {
        self.info.peer
    }

    pub fn set_blocking(&self, blocking: Blocking) {
        self.state.set_blocking(blocking);
    }

    pub fn is_nonblocking(&self) -> bool {
        self.state.has(Flags::NONBLOCKING)
    }

    /// Notes SO_RCVTIMEO or SO_SNDTIMEO (see [`Direction`]), in milliseconds.
    pub fn set_timeout(&self, direction: Direction, ms: i64) {
        let slot = match direction {
            Direction::Receive => &self.recv_timeout_ms,
            Direction::Send => &self.send_timeout_ms,
        };
        slot.store(ms.max(0), Ordering::Relaxed);
    }

    /// The timeout that applies to a wait in `direction` (0: none).
    pub fn timeout_ms(&self, direction: Direction) -> i64 {
        let slot = match direction {
            Direction::Receive => &self.recv_timeout_ms,
            Direction::Send => &self.send_timeout_ms,
        };
        slot.load(Ordering::Relaxed)
    }

    /// Notes SO_LINGER: `on` with a zero timeout makes close send a reset.
    pub fn set_linger(&self, on: bool, seconds: i32) {
        self.state.set_abort_on_close(on && seconds == 0);
    }

    /// Reads and clears SO_ERROR.
    pub fn take_error(&self) -> i32 {
        self.so_error.swap(0, Ordering::Relaxed)
    }

    fn kick(&self, wake: bool) {
        if wake {
            // A full doorbell already guarantees a wake-up; anything else
            // (the peer is gone) is seen at the next drain.
            let _ = sys::send(self.doorbell, &[1], libc::MSG_DONTWAIT);
        }
    }

    /// The peer broke the protocol: reset both directions.
    fn break_connection(&self) -> Errno {
        if self.state.break_down() {
            self.kick(self.tx().reset());
            self.kick(self.rx().close());
        }
        Errno(libc::ECONNRESET)
    }

    /// Counts the caller among this end's sleepers, then arms for
    /// `interest`: call it before the last look at the rings, and
    /// [`Connection::wake`] once after the sleep (every path).
    ///
    /// Several waiters (threads, or processes sharing the connection after
    /// fork) share one doorbell and one arming. The count, kept in this
    /// end's half so that every process holding the end sees it, lets a
    /// waiter that wakes leave the doorbell rung and the arming in place
    /// while others still sleep on them: taking either would leave those
    /// asleep until their sleep's cap.
    ///
    /// A waiter that counts itself while the last one to wake is still
    /// taking the doorbell and the arming waits for it to finish (see
    /// [`Connection::wake`]): its own arming, and the ring that answers it,
    /// must come after them.
    pub fn fall_asleep(&self, interest: Interest) {
        let before = self.sleepers().fetch_add(1, Ordering::AcqRel);
        if before & LAST_WAKING != 0 {
            self.wait_for_last_waking();
        }
        self.arm(interest);
    }

    /// Waits, briefly, until the last sleeper to wake has taken the doorbell
    /// and the arming. One that never finishes (its process was killed in
    /// between) has its mark cleared here after [`LAST_WAKING_WAIT_NS`]: a
    /// wake-up lost then is bounded by the sleep cap, as any other.
    fn wait_for_last_waking(&self) {
        let began = sys::now_ns();
        while self.sleepers().load(Ordering::Acquire) & LAST_WAKING != 0 {
            if sys::now_ns().saturating_sub(began) > LAST_WAKING_WAIT_NS {
                self.sleepers().fetch_and(!LAST_WAKING, Ordering::AcqRel);
                return;
            }
            std::thread::yield_now();
        }
    }

    /// The caller, counted by [`Connection::fall_asleep`], woke (`rang`:
    /// its doorbell had fired). The last sleeper to wake drains the
    /// doorbell and withdraws the arming for `interest`; one that is not
    /// the last leaves both to the others. Returns whether it was the last.
    ///
    /// The last one marks the count while it takes them ([`LAST_WAKING`]),
    /// so that a waiter counting itself meanwhile arms only afterwards:
    /// otherwise the arming it made could be withdrawn, or the ring that
    /// answered it drained, by the sleeper that had just left, and it
    /// would sleep through the wake-up meant for it.
    pub fn wake(&self, interest: Interest, rang: bool) -> bool {
        let mut last = false;
        let _ = self.sleepers().fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
            // Not counted (a count another process reset) counts as last.
            last = (word & !LAST_WAKING) <= 1;
            Some(if last { LAST_WAKING } else { word - 1 })
        });
        if last {
            self.take_ring(interest, rang);
        } else if rang {
            let ring = self.rx().answered() ^ self.tx().answered().rotate_left(32);
            if self.left_rung.too_long(ring, sys::now_ns()) {
                // A sleeper never woke for this ring: it died asleep and its
                // count stays. Take the doorbell, or every wait on it would
                // spin.
                self.drain_doorbell();
            } else {
                // The ring is the others': let them run to take it.
                std::thread::yield_now();
            }
        }
        last
    }

    /// As the last sleeper to wake, marked ([`LAST_WAKING`]): withdraws the
    /// arming for `interest`, drains the doorbell if it `rang`, and lifts
    /// the mark.
    fn take_ring(&self, interest: Interest, rang: bool) {
        self.left_rung.taken();
        self.disarm(interest);
        if rang {
            self.drain_doorbell();
        }
        self.sleepers().fetch_and(!LAST_WAKING, Ordering::AcqRel);
    }

    /// As this end is taken up (by a new program image after exec): if this
    /// process is the end's only holder, nobody can be asleep on it yet,
    /// and any sleeper still counted was the earlier image's (a thread
    /// exec ended, an epoll set's arming that went with the image). Such
    /// counts would leave every later wake-up to sleepers that never wake.
    /// (A new connection's end has no holder yet: nothing is touched.)
    fn forget_earlier_sleepers(&self) {
        if self.segment.holders(self.endpoint.index()).load(Ordering::Acquire) == 1 {
            self.sleepers().store(0, Ordering::Release);
        }
    }

    /// Drains the doorbell unless a sleeper is counted (its wake-up is
    /// left to it): for a doorbell that fired where nobody here slept on it.
    ///
    /// It drains under the last-waking mark, as the last sleeper does: a
    /// waiter counting itself meanwhile arms after the drain, so the drain
    /// cannot take the ring that answers it.
    pub fn drain_unless_watched(&self) {
        if self.sleepers().compare_exchange(0, LAST_WAKING, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            // Nobody armed: nothing to withdraw.
            self.take_ring(Interest::default(), true);
        }
    }

    fn sleepers(&self) -> &AtomicU32 {
        self.segment.sleepers(self.endpoint.index())
    }

    /// Drains the doorbell; if every holder of the peer's end is gone (the
    /// peer process died without closing), the stream ends on its behalf,
    /// as the kernel ends it for a process that exits.
    pub fn drain_doorbell(&self) {
        if sys::drain(self.doorbell) {
            self.peer_gone.store(true, Ordering::Relaxed);
        }
    }

    /// Current readiness.
    pub fn readiness(&self) -> Readiness {
        self.readiness_for(Interest::ANY)
    }

    /// Asks for the shared lines [`Connection::readiness_for`] reads for a
    /// reader's interest (see `Consumer::prefetch`).
    pub fn prefetch_readiness(&self) {
        self.rx().prefetch();
    }

    /// Readiness as far as `interest` needs it: only the rings' lines that
    /// the interest depends on are read (epoll scans many connections, and
    /// every line the peer writes is a cache miss). Errors and hang-ups that
    /// either direction can report are always included.
    pub fn readiness_for(&self, interest: Interest) -> Readiness {
        if self.state.has(Flags::BROKEN) {
            return Readiness::ALL;
        }
        let mut mask = Readiness::EMPTY;
        if interest.reads() || !interest.writes() {
            let rx = self.rx();
            let mut fin = false;
            if rx.fin_received() {
                mask |= Readiness::RDHUP;
            }
            match rx.state() {
                Ok(RxState::Data(_)) => mask |= Readiness::IN,
                Ok(RxState::Empty) => {}
                Ok(RxState::Fin) => {
                    mask |= Readiness::IN | Readiness::RDHUP;
                    fin = true;
                }
                Ok(RxState::Reset) => {
                    mask |= Readiness::IN | Readiness::RDHUP | Readiness::HUP;
                    if !self.state.has(Flags::RESET_REPORTED) {
                        mask |= Readiness::ERR;
                    }
                    fin = true;
                }
                Err(_) => return Readiness::ALL,
            }
            if self.state.has(Flags::READ_SHUT) {
                mask |= Readiness::IN | Readiness::RDHUP;
            }
            if fin && self.state.has(Flags::WRITE_SHUT) {
                mask |= Readiness::HUP;
            }
        }
        if interest.writes() {
            let wshut = self.state.has(Flags::WRITE_SHUT);
            match self.tx().space() {
                Ok(0) if !wshut => {}
                Ok(_) => mask |= Readiness::OUT,
                // The peer closed: writable (the next write is accepted,
                // then fails), and an error only once a write was refused.
                Err(RingError::PeerClosed) if self.state.has(Flags::RESET_BY_PEER) => {
                    mask |= Readiness::OUT | Readiness::ERR | Readiness::HUP
                }
                Err(RingError::PeerClosed) => mask |= Readiness::OUT,
                Err(RingError::Corrupt) => mask |= Readiness::OUT | Readiness::ERR,
            }
        }
        mask
    }

    /// Arms the wake-up flags for the given interest.
    pub fn arm(&self, interest: Interest) {
        if interest.reads() {
            self.rx().arm();
        }
        if interest.writes() {
            self.tx().arm();
        }
    }

    /// Withdraws `arm`: the caller has woken and will look at the rings
    /// (arming again before it sleeps), so the peer need not ring.
    pub fn disarm(&self, interest: Interest) {
        if interest.reads() {
            self.rx().disarm();
        }
        if interest.writes() {
            self.tx().disarm();
        }
    }

    /// The snapshot edge-triggered epoll compares (see [`EdgeSnapshot`]).
    pub fn edge_snapshot(&self, interest: Interest) -> EdgeSnapshot {
        EdgeSnapshot {
            produced: self.segment.producer(self.endpoint.rx_ring()).total(),
            consumed: self.segment.consumer(self.endpoint.tx_ring()).total(),
            readiness: self.readiness_for(interest),
        }
    }

    /// Bytes waiting to be read (FIONREAD).
    pub fn readable_bytes(&self) -> usize {
        match self.rx().state() {
            Ok(RxState::Data(n)) => n as usize,
            _ => 0,
        }
    }

    /// recv/read/readv/recvmsg.
    pub fn recv(&self, bufs: &mut [&mut [u8]], flags: i32) -> SysResult<usize> {
        if self.state.has(Flags::READ_SHUT) {
            return Ok(0);
        }
        let wanted: usize = bufs.iter().map(|b| b.len()).sum();
        if wanted == 0 {
            return Ok(0);
        }
        let peek = flags & libc::MSG_PEEK != 0;
        if peek && flags & libc::MSG_WAITALL != 0 && !self.dontwait(flags) {
            self.wait_to_peek(wanted)?;
        }
        // The receive lock is held while bytes are taken, never while the
        // reader sleeps: another thread's read (a MSG_DONTWAIT one, or one
        // woken by a signal) is never held up behind a sleeper, as Linux
        // lets go of the socket while a reader waits for data.
        let mut total = 0;
        loop {
            let step = {
                let _receiving = self.lock_receiving();
                self.recv_step(bufs, flags, total, false)
            };
            match step {
                Step::Done(result) => return result,
                Step::Wait(so_far) => {
                    total = so_far;
                    if let Err(e) = blocking::block(self, Interest::READABLE) {
                        return self.finish_read(total, Err(e));
                    }
                }
            }
        }
    }

    /// Does a read with `flags` on this connection return at once rather
    /// than wait?
    fn dontwait(&self, flags: i32) -> bool {
        flags & libc::MSG_DONTWAIT != 0 || self.is_nonblocking()
    }

    /// Offers up to `max` received bytes (at most [`scratch::LEN`]) to
    /// `sink` (waiting for them as a read would) and consumes only as many
    /// as it reports taking, so a sink that takes part of them (a full
    /// pipe, for splice) loses none. Returns what was taken; 0 at end of
    /// stream (or when the sink took nothing). The sink runs holding the
    /// connection's read claim, so it must not wait: another process of
    /// this end reading meanwhile waits for it.
    pub fn recv_into(&self, max: usize, sink: impl FnOnce(&[u8]) -> SysResult<usize>) -> SysResult<usize> {
        if self.state.has(Flags::READ_SHUT) || max == 0 {
            return Ok(0);
        }
        scratch::with_scratch(max, |buf| self.recv_through(buf, sink))
    }

    /// [`Connection::recv_into`], peeking into `buf`.
    fn recv_through(&self, buf: &mut [u8], sink: impl FnOnce(&[u8]) -> SysResult<usize>) -> SysResult<usize> {
        let (_guard, _turn, n) = loop {
            let guard = self.lock_receiving();
            let turn = self.read_turn()?;
            match self.recv_step(&mut [&mut *buf], libc::MSG_PEEK, 0, true) {
                Step::Done(result) => break (guard, turn, result?),
                Step::Wait(_) => {
                    drop(turn);
                    drop(guard);
                    blocking::block(self, Interest::READABLE)?;
                }
            }
        };
        if n == 0 {
            return Ok(0);
        }
        let taken = sink(&buf[..n])?.min(n);
        // With the lock and the read claim held, nobody else (no thread of
        // this process, no other process of this end) consumed the peeked
        // bytes.
        let mut left = taken;
        while left > 0 {
            match self.recv_step(&mut [&mut buf[..left]], libc::MSG_DONTWAIT, 0, true) {
                Step::Done(Ok(0)) => break,
                Step::Done(Ok(k)) => left -= k,
                Step::Done(Err(_)) | Step::Wait(_) => break,
            }
        }
        Ok(taken - left)
    }

    /// Takes what a read with `flags` can take now, `total` bytes already
    /// taken by earlier steps of the same read (`MSG_WAITALL`); the caller
    /// holds the receive lock, and the read claim if `claimed` (else each
    /// copy takes it). Never sleeps: a read that must wait says so.
    fn recv_step(&self, bufs: &mut [&mut [u8]], flags: i32, mut total: usize, claimed: bool) -> Step {
        let wanted: usize = bufs.iter().map(|b| b.len()).sum();
        let peek = flags & libc::MSG_PEEK != 0;
        let waitall = flags & libc::MSG_WAITALL != 0 && !peek;
        let dontwait = self.dontwait(flags);
        Step::Done(loop {
            if self.state.has(Flags::BROKEN) {
                break self.finish_read(total, Err(Errno(libc::ECONNRESET)));
            }
            // Another thread's shutdown(SHUT_RD) ends a blocked read.
            if self.state.has(Flags::READ_SHUT) {
                break Ok(total);
            }
            let rx = self.rx();
            match rx.state() {
                Err(_) => break self.finish_read(total, Err(self.break_connection())),
                Ok(RxState::Data(_)) => {
                    let read = {
                        // Only a read that finds bytes takes its turn (a
                        // poll of an empty ring writes nothing).
                        let _turn = if claimed {
                            None
                        } else {
                            match self.read_turn() {
                                Ok(turn) => turn,
                                Err(e) => break self.finish_read(total, Err(e)),
                            }
                        };
                        advance(bufs, total, |rest| rx.read(rest, peek))
                    };
                    let (n, wake) = match read {
                        Ok(r) => r,
                        Err(_) => break self.finish_read(total, Err(self.break_connection())),
                    };
                    self.kick(wake);
                    if n == 0 {
                        // Another process of this end took the bytes
                        // first: look again.
                        continue;
                    }
                    total += n;
                    if !waitall || total == wanted {
                        break Ok(total);
                    }
                }
                Ok(RxState::Fin) => break Ok(total),
                Ok(RxState::Reset) => {
                    if total > 0 {
                        break Ok(total);
                    }
                    if !self.state.report_reset() {
                        break Ok(0);
                    }
                    break Err(Errno(libc::ECONNRESET));
                }
                Ok(RxState::Empty) => {
                    if total > 0 && !waitall {
                        break Ok(total);
                    }
                    if dontwait {
                        break self.finish_read(total, Err(Errno(libc::EAGAIN)));
                    }
                    return Step::Wait(total);
                }
            }
        })
    }

    /// MSG_PEEK with MSG_WAITALL waits, as Linux does, until `wanted` bytes
    /// (or as many as the ring holds) are there, or the stream ends.
    fn wait_to_peek(&self, wanted: usize) -> SysResult<()> {
        let target = wanted.min(self.rx().capacity() as usize);
        blocking::block_until(self, Interest::READABLE, || {
            if self.state.has(Flags::BROKEN) || self.state.has(Flags::READ_SHUT) {
                return true;
            }
            let rx = self.rx();
            match rx.state() {
                Ok(RxState::Data(n)) => n as usize >= target || rx.fin_received(),
                Ok(RxState::Empty) => false,
                // End of stream, reset or a corrupt ring: the read reports it.
                _ => true,
            }
        })
    }

    fn finish_read(&self, total: usize, err: SysResult<usize>) -> SysResult<usize> {
        if total > 0 {
            Ok(total)
        } else {
            err
        }
    }

    /// send/write/writev/sendmsg. Raises SIGPIPE on EPIPE unless
    /// MSG_NOSIGNAL, as the kernel does.
    pub fn send(&self, bufs: &[&[u8]], flags: i32) -> SysResult<usize> {
        let result = self.send_inner(bufs, flags);
        if result == Err(Errno(libc::EPIPE)) && flags & libc::MSG_NOSIGNAL == 0 {
            sys::raise_sigpipe();
        }
        result
    }

    fn send_inner(&self, bufs: &[&[u8]], flags: i32) -> SysResult<usize> {
        if self.state.has(Flags::WRITE_SHUT) {
            return Err(Errno(libc::EPIPE));
        }
        let wanted: usize = bufs.iter().map(|b| b.len()).sum();
        if wanted == 0 {
            return Ok(0);
        }
        let dontwait = flags & libc::MSG_DONTWAIT != 0 || self.is_nonblocking();
        let _guard = self.lock_sending(dontwait)?;
        let mut total = 0usize;
        loop {
            if self.state.has(Flags::BROKEN) {
                return self.finish_write(total, Errno(libc::ECONNRESET));
            }
            // Another thread shut the writing side while we waited: its
            // FIN goes after the bytes already written, and we stop.
            if self.state.has(Flags::WRITE_SHUT) {
                self.kick(self.tx().finish());
                return self.finish_write(total, Errno(libc::EPIPE));
            }
            let tx = self.tx();
            // Another process holding this end (after fork) shut it: as on
            // Linux, where the socket they share is shut, nothing more is
            // written after its end. (A reset goes by the peer's close.)
            if tx.shut() {
                return self.finish_write(total, Errno(libc::EPIPE));
            }
            let written = {
                let Some(_turn) = self.claim(Side::Tx) else {
                    let e = self.break_connection();
                    return self.finish_write(total, e);
                };
                advance_const(bufs, total, |rest| tx.write(rest))
            };
            match written {
                Ok((n, wake)) => {
                    self.kick(wake);
                    total += n;
                    if total == wanted {
                        return Ok(total);
                    }
                    if n > 0 {
                        continue;
                    }
                }
                Err(RingError::PeerClosed) => {
                    // A reset from the peer is reported once, to whichever
                    // call comes first, as Linux does: a write gives
                    // ECONNRESET, and EPIPE after.
                    if total == 0 && matches!(self.rx().state(), Ok(RxState::Reset)) {
                        let e = if self.state.report_reset() { libc::ECONNRESET } else { libc::EPIPE };
                        return self.finish_write(total, Errno(e));
                    }
                    // As with TCP: the first write after the peer closed is
                    // accepted (the peer answers it with a reset); later
                    // ones fail with EPIPE.
                    if total == 0 && self.state.write_after_peer_closed() {
                        return Ok(wanted);
                    }
                    return self.finish_write(total, Errno(libc::EPIPE));
                }
                Err(RingError::Corrupt) => {
                    let e = self.break_connection();
                    return self.finish_write(total, e);
                }
            }
            // The ring is full.
            if dontwait {
                return self.finish_write(total, Errno(libc::EAGAIN));
            }
            if let Err(e) = blocking::block(self, Interest::WRITABLE) {
                return self.finish_write(total, e);
            }
        }
    }

    /// Takes `side`'s ring claim for this process (see
    /// `Producer::try_claim`, `Consumer::try_claim`) for one copy: another
    /// process holding this end (after fork) and writing (or reading) at
    /// the same moment waits its turn, as the kernel takes a shared
    /// socket's lock for each call, instead of both copying at the same
    /// tail (or from the same head). A holder copies for microseconds; one
    /// that died holding it is found gone and passed over. A claim held
    /// past [`CLAIM_PATIENCE`] is a scribbled word (or a holder stopped in
    /// the middle of a copy): `None`, and the caller breaks the connection
    /// rather than wait for ever or copy beside it.
    fn claim(&self, side: Side) -> Option<Claim<'_>> {
        let me = sys::getpid() as u32;
        let mut backoff = vsocket_ring::spin::Backoff::new();
        loop {
            let holder = match self.take_claim(side, 0, me) {
                Ok(()) => return Some(Claim { conn: self, side, me }),
                Err(holder) => holder,
            };
            // A claim naming this process is one a thread of it left
            // (never while another thread of it copies: the send or receive
            // lock is held), or a dead process's whose id came back: taken.
            // So is one naming no process there could be, or one that is
            // gone.
            let stale = holder == me
                || i32::try_from(holder).is_err()
                || (backoff.looks() % 64 == 63 && sys::process_gone(holder as i32));
            if stale {
                if self.take_claim(side, holder, me).is_ok() {
                    return Some(Claim { conn: self, side, me });
                }
                continue;
            }
            if !backoff.wait(CLAIM_PATIENCE) {
                return None;
            }
        }
    }

    fn take_claim(&self, side: Side, holder: u32, me: u32) -> Result<(), u32> {
        match side {
            Side::Tx => self.tx().take_claim(holder, me),
            Side::Rx => self.rx().take_claim(holder, me),
        }
    }

    /// Takes this process's send lock, which keeps one send's bytes
    /// together. Another writer may hold it while it sleeps for room: then
    /// a non-blocking send fails with EAGAIN (the ring is full, as it would
    /// find), and a blocking one waits as a send waits for room (woken as
    /// the peer consumes, in sleeps of bounded length), so that a signal
    /// interrupts it and SO_SNDTIMEO bounds it, as in Linux, where a
    /// writer waiting for room lets go of the socket.
    /// A child forked while a thread of its parent held it takes it over
    /// (`forksafe::Lock`): that thread never runs in the child.
    fn lock_sending(&self, dontwait: bool) -> SysResult<forksafe::LockGuard<'_>> {
        loop {
            if let Some(guard) = self.tx_lock.try_lock() {
                return Ok(guard);
            }
            if dontwait {
                if !self.satisfies(Interest::WRITABLE) {
                    return Err(Errno(libc::EAGAIN));
                }
                // The holder is copying, not waiting: a moment's turn.
                std::thread::yield_now();
                continue;
            }
            let mut taken = None;
            blocking::block_until(self, Interest::WRITABLE, || {
                taken = self.tx_lock.try_lock();
                taken.is_some()
            })?;
            if let Some(guard) = taken {
                return Ok(guard);
            }
        }
    }

    fn finish_write(&self, total: usize, err: Errno) -> SysResult<usize> {
        if total > 0 {
            Ok(total)
        } else {
            Err(err)
        }
    }

    /// Is the condition a blocked call waits for (`interest`) met, or will
    /// it never be (error, end of stream)?
    pub fn satisfies(&self, interest: Interest) -> bool {
        self.readiness_for(interest).intersects(interest.met_by())
    }

    /// shutdown(2).
    pub fn shutdown(&self, how: i32) -> SysResult<()> {
        match how {
            libc::SHUT_RD | libc::SHUT_WR | libc::SHUT_RDWR => {}
            _ => return Err(Errno(libc::EINVAL)),
        }
        if how != libc::SHUT_WR {
            self.state.shut_read();
        }
        if how != libc::SHUT_RD && self.state.shut_write() {
            // A writer blocked on a full ring holds the lock; it sees
            // `WRITE_SHUT` when it wakes and publishes the FIN itself.
            if let Some(_guard) = self.tx_lock.try_lock() {
                self.kick(self.tx().finish());
            }
        }
        Ok(())
    }

    /// This process is done with the connection: FIN (or RST when unread
    /// data would be lost, or SO_LINGER asks for an abort, as Linux does),
    /// and stop accepting the peer's bytes. Runs once, when the last
    /// reference goes: the last descriptor naming it is closed and no call
    /// on it is still in progress in another thread (as the kernel keeps a
    /// socket open while a call holds its file).
    pub fn close(&self) {
        if !self.state.close() {
            return;
        }
        // Other processes (fork) still hold this end: they go on using it.
        if self.segment.holders(self.endpoint.index()).fetch_sub(1, Ordering::AcqRel) > 1 {
            return;
        }
        let rx = self.rx();
        let unread = matches!(rx.state(), Ok(RxState::Data(_)));
        let abort = unread || self.state.has(Flags::ABORT_ON_CLOSE);
        let tx = self.tx();
        let wake_tx = if abort { tx.reset() } else { tx.finish() };
        let wake_rx = rx.close();
        // A kit's doorbell is kept for the next connection in its piece,
        // parked before the release and rung while parked. `bells::park`
        // refuses one that was in the process at a fork (which a child
        // shared).
        let parked = self
            .park
            .as_ref()
            .filter(|_| !self.bell_in_inherited_set.load(Ordering::Relaxed))
            .and_then(|at| crate::bells::park(at, self.info.id, self.doorbell));
        self.bell_parked.store(parked.is_some(), Ordering::Relaxed);
        // The last write to the segment: from now on the daemon may reset
        // it for another connection (layout::RELEASED).
        self.segment.released(self.endpoint.index()).store(1, Ordering::Release);
        self.kick(wake_tx || wake_rx);
        drop(parked);
    }

    /// The doorbell is registered in an epoll set no one here deletes it
    /// from.
    pub fn note_bell_in_inherited_set(&self) {
        self.bell_in_inherited_set.store(true, Ordering::Relaxed);
    }

    /// Called before fork, once per generation: the child will hold this
    /// end too.
    pub fn note_fork(&self, generation: u64) {
        if self.fork_generation.swap(generation, Ordering::Relaxed) != generation {
            self.add_holder();
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close();
        // The mapping goes with `segment`. Closing our lifeline (the last
        // holder of a shared one closes it) tells the daemon this process
        // no longer holds the connection. A parked doorbell is the
        // table's.
        if !self.bell_parked.load(Ordering::Relaxed) {
            let _ = sys::close(self.doorbell);
        }
    }
}

/// A call that resumes inside its buffers (after a partial transfer) keeps
/// up to this many on the stack, as the C edge does.
const INLINE_BUFFERS: usize = 64;

/// Runs `op` on the part of `bufs` after the first `skip` bytes.
fn advance<R>(bufs: &mut [&mut [u8]], skip: usize, op: impl FnOnce(&mut [&mut [u8]]) -> R) -> R {
    let mut skip = skip;
    let mut first = 0;
    while first < bufs.len() && skip >= bufs[first].len() {
        skip -= bufs[first].len();
        first += 1;
    }
    let rest = &mut bufs[first..];
    if skip == 0 || rest.is_empty() {
        return op(rest);
    }
    let (head, tail) = rest.split_at_mut(1);
    let head: &mut [u8] = &mut head[0][skip..];
    let count = tail.len() + 1;
    if count <= INLINE_BUFFERS {
        let mut inline: [&mut [u8]; INLINE_BUFFERS] = std::array::from_fn(|_| <&mut [u8]>::default());
        inline[0] = head;
        for (slot, b) in inline[1..].iter_mut().zip(tail.iter_mut()) {
            *slot = &mut b[..];
        }
        return op(&mut inline[..count]);
    }
    let mut chunk: Vec<&mut [u8]> = Vec::with_capacity(count);
    chunk.push(head);
    for b in tail.iter_mut() {
        chunk.push(&mut b[..]);
    }
    op(&mut chunk)
}

/// Runs `op` on the part of `bufs` after the first `skip` bytes.
fn advance_const<R>(bufs: &[&[u8]], skip: usize, op: impl FnOnce(&[&[u8]]) -> R) -> R {
    let mut skip = skip;
    let mut first = 0;
    while first < bufs.len() && skip >= bufs[first].len() {
        skip -= bufs[first].len();
        first += 1;
    }
    let rest = &bufs[first..];
    if skip == 0 || rest.is_empty() {
        return op(rest);
    }
    if rest.len() <= INLINE_BUFFERS {
        let mut inline: [&[u8]; INLINE_BUFFERS] = [&[]; INLINE_BUFFERS];
        inline[..rest.len()].copy_from_slice(rest);
        inline[0] = &rest[0][skip..];
        return op(&inline[..rest.len()]);
    }
    let mut chunk: Vec<&[u8]> = Vec::with_capacity(rest.len());
    chunk.push(&rest[0][skip..]);
    chunk.extend_from_slice(&rest[1..]);
    op(&chunk)
}

/// How long a writer waits for another process's write claim on its
/// connection: a copy takes microseconds.
const CLAIM_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

thread_local! {
    /// How many receive locks this thread holds (0 or 1, more only in a
    /// signal handler that reads while the thread it interrupted does).
    static READING: Cell<u32> = const { Cell::new(0) };
}

/// A held receive lock (see `Connection::lock_receiving`).
struct Receiving<'a> {
    _guard: forksafe::LockGuard<'a>,
}

impl Drop for Receiving<'_> {
    fn drop(&mut self) {
        READING.with(|r| r.set(r.get().saturating_sub(1)));
    }
}

/// Which of a connection's rings a claim is on: the one this end writes,
/// or the one it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Tx,
    Rx,
}

/// A connection's write or read claim, held by this process for one copy
/// (see `Connection::claim`).
struct Claim<'a> {
    conn: &'a Connection,
    side: Side,
    me: u32,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        match self.side {
            Side::Tx => self.conn.tx().release_claim(self.me),
            Side::Rx => self.conn.rx().release_claim(self.me),
        }
    }
}

#[cfg(test)]
pub mod testing {
    //! Both ends of a connection in one process, for unit tests.
    use super::*;
    use std::os::fd::IntoRawFd;
    use std::sync::Arc;
    use vsocket_ring::{Segment, SegmentFiles};

    /// A connection's two ends over a segment of rings of `ring_size`
    /// bytes, blocking, with no daemon watching.
    pub fn pair(ring_size: u32) -> (Arc<Connection>, Arc<Connection>) {
        let (client, server, _files) = pair_with_files(ring_size);
        (client, server)
    }

    /// [`pair`], and the segment's files (what the daemon keeps).
    pub fn pair_with_files(ring_size: u32) -> (Arc<Connection>, Arc<Connection>, SegmentFiles) {
        let (daemon_view, files) = Segment::create(ring_size).unwrap();
        drop(daemon_view);
        let [client_own, client_peer] = files.clone_for(Endpoint::Client).unwrap();
        let [server_own, server_peer] = files.clone_for(Endpoint::Server).unwrap();
        let (a, b) = vsocket_sys::raw::stream_pair().unwrap();
        let info = ConnectionInfo {
            id: 1,
            local: "10.0.0.2:1000".parse().unwrap(),
            peer: "10.0.0.3:80".parse().unwrap(),
            ring_size,
        };
        let fds = Delivery::of_segment(client_own.into_raw_fd(), client_peer.into_raw_fd(), a, -1);
        let client = Connection::new(info, Endpoint::Client, crate::addr::Family::V4, fds, Blocking::Blocking).unwrap();
        let fds = Delivery::of_segment(server_own.into_raw_fd(), server_peer.into_raw_fd(), b, -1);
        let server = Connection::new(info, Endpoint::Server, crate::addr::Family::V4, fds, Blocking::Blocking).unwrap();
        (Arc::new(client), Arc::new(server), files)
    }
}

#[cfg(test)]
mod tests {
    //! The connection state machine, both ends in one process.
    use super::testing::{pair, pair_with_files};
    use super::*;

    #[test]
    fn resuming_inside_the_buffers_skips_what_was_moved() {
        let (mut a, mut b, mut c) = ([0u8; 3], [0u8; 4], [0u8; 5]);
        let mut bufs: [&mut [u8]; 3] = [&mut a, &mut b, &mut c];
        let lens = advance(&mut bufs, 5, |rest| rest.iter().map(|r| r.len()).collect::<Vec<_>>());
        assert_eq!(lens, vec![2, 5]);
        let lens = advance(&mut bufs, 0, |rest| rest.iter().map(|r| r.len()).collect::<Vec<_>>());
        assert_eq!(lens, vec![3, 4, 5]);
        let data: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 2]).collect();
        let many: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
        for skip in [1, 3, 150, 199] {
            let rest = advance_const(&many, skip, |rest| rest.concat());
            let whole = many.concat();
            assert_eq!(rest, whole[skip..].to_vec());
        }
        assert!(advance_const(&many, 200, |rest| rest.is_empty()));
    }

    /// Whether `c`'s doorbell has a ring waiting.
    fn rung(c: &Connection) -> bool {
        let mut pfd = [libc::pollfd { fd: c.doorbell, events: libc::POLLIN, revents: 0 }];
        sys::poll(&mut pfd, 0).unwrap() > 0
    }

    #[test]
    fn a_scribbled_write_or_read_claim_is_taken_or_breaks_the_connection_never_hangs() {
        // A claim naming no process there could be is taken at once.
        let (c, s) = pair(4096);
        assert_eq!(c.tx().try_claim(u32::MAX), Ok(()));
        assert_eq!(c.send(&[b"ok"], 0), Ok(2));
        let mut buf = [0u8; 8];
        assert_eq!(s.recv(&mut [&mut buf[..]], 0), Ok(2));
        // One naming a live process (init) that never lets go: after the
        // patience, the connection breaks instead of the send waiting.
        assert_eq!(c.tx().try_claim(1), Ok(()));
        let started = std::time::Instant::now();
        assert_eq!(c.send(&[b"x"], 0), Err(Errno(libc::ECONNRESET)));
        assert!(started.elapsed() < CLAIM_PATIENCE * 3, "{:?}", started.elapsed());
        assert_eq!(s.recv(&mut [&mut buf[..]], 0), Err(Errno(libc::ECONNRESET)));

        // The same for a read claim, which a read takes when another
        // process holds its end too (as if forked).
        let (c, s) = pair(4096);
        s.add_holder();
        assert_eq!(s.rx().try_claim(u32::MAX), Ok(()));
        assert_eq!(c.send(&[b"ok"], 0), Ok(2));
        assert_eq!(s.recv(&mut [&mut buf[..]], 0), Ok(2));
        assert_eq!(c.send(&[b"x"], 0), Ok(1));
        assert_eq!(s.rx().try_claim(1), Ok(()));
        let started = std::time::Instant::now();
        assert_eq!(s.recv(&mut [&mut buf[..]], 0), Err(Errno(libc::ECONNRESET)));
        assert!(started.elapsed() < CLAIM_PATIENCE * 3, "{:?}", started.elapsed());
    }

    #[test]
    fn a_reader_asleep_does_not_hold_up_another_thread_s_read() {
        let (c, s) = pair(4096);
        let sleeper = {
            let c = c.clone();
            std::thread::spawn(move || recv_all(&c, 1))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        // The sleeper is in its wait: a non-blocking read by another
        // thread answers at once instead of queueing behind it.
        let (tx, rx) = std::sync::mpsc::channel();
        let other = {
            let c = c.clone();
            std::thread::spawn(move || {
                let mut b = [0u8; 1];
                let _ = tx.send(c.recv(&mut [&mut b[..]], libc::MSG_DONTWAIT));
            })
        };
        let answer = rx.recv_timeout(std::time::Duration::from_secs(5));
        assert_eq!(answer, Ok(Err(Errno(libc::EAGAIN))), "the MSG_DONTWAIT read waited behind the sleeper");
        other.join().unwrap();
        assert_eq!(s.send(&[b"w"], 0), Ok(1));
        assert_eq!(sleeper.join().unwrap(), b"w");
    }

    #[test]
    fn a_waiter_that_wakes_leaves_the_ring_to_those_still_asleep() {
        let (c, s) = pair(4096);
        // Two waiters on the client's reads: the first to wake must leave
        // the doorbell rung and the arming in place for the second.
        c.fall_asleep(Interest::READABLE);
        c.fall_asleep(Interest::READABLE);
        assert_eq!(s.send(&[b"x"], 0), Ok(1));
        assert!(rung(&c), "the armed reader was rung");
        assert!(!c.wake(Interest::READABLE, true), "one sleeper is left");
        assert!(rung(&c), "the ring is left to the other sleeper");
        assert_eq!(recv_all(&c, 1), b"x");
        // The second waiter's arming still stands: the next write rings.
        assert!(c.wake(Interest::READABLE, true), "the last sleeper");
        assert!(!rung(&c), "the last sleeper takes the ring");
        c.fall_asleep(Interest::READABLE);
        assert_eq!(s.send(&[b"y"], 0), Ok(1));
        assert!(rung(&c));
        assert!(c.wake(Interest::READABLE, true));
        assert!(!rung(&c));
    }

    #[test]
    fn a_waiter_falling_asleep_while_the_last_one_wakes_keeps_its_arming() {
        let (c, s) = pair(4096);
        // The last sleeper to wake is between leaving the count and taking
        // the doorbell and the arming, as `wake` leaves it then.
        c.fall_asleep(Interest::READABLE);
        c.sleepers().store(LAST_WAKING, Ordering::Release);
        let (armed_tx, armed) = std::sync::mpsc::channel();
        let other = {
            let c = c.clone();
            std::thread::spawn(move || {
                c.fall_asleep(Interest::READABLE);
                armed_tx.send(()).unwrap();
            })
        };
        let early = armed.recv_timeout(std::time::Duration::from_millis(20));
        assert!(early.is_err(), "the new waiter armed before the last one had finished");
        // The last one finishes: its disarming and draining come first.
        c.disarm(Interest::READABLE);
        c.drain_doorbell();
        c.sleepers().fetch_and(!LAST_WAKING, Ordering::AcqRel);
        armed.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        other.join().unwrap();
        assert_eq!(s.send(&[b"x"], 0), Ok(1));
        assert!(rung(&c), "the new waiter's arming stood, and its ring came");
        assert!(c.wake(Interest::READABLE, true));
        assert_eq!(c.sleepers().load(Ordering::Acquire), 0, "the mark is gone with the last one");
    }

    #[test]
    fn a_mark_left_by_a_killed_waker_is_cleared() {
        let (c, s) = pair(4096);
        c.sleepers().store(LAST_WAKING, Ordering::Release);
        let began = std::time::Instant::now();
        c.fall_asleep(Interest::READABLE);
        assert!(began.elapsed() >= std::time::Duration::from_nanos(LAST_WAKING_WAIT_NS));
        assert_eq!(c.sleepers().load(Ordering::Acquire), 1);
        assert_eq!(s.send(&[b"x"], 0), Ok(1));
        assert!(rung(&c));
        assert!(c.wake(Interest::READABLE, true));
    }

    /// A pair whose client end has two readers counted asleep, rung by a
    /// byte that was read since: the ring is left for the one that has
    /// not woken.
    fn two_asleep_and_a_ring_left() -> (std::sync::Arc<Connection>, std::sync::Arc<Connection>) {
        let (c, s) = pair(4096);
        c.fall_asleep(Interest::READABLE);
        c.fall_asleep(Interest::READABLE);
        assert_eq!(s.send(&[b"z"], 0), Ok(1));
        assert_eq!(recv_all(&c, 1), b"z");
        assert!(rung(&c));
        (c, s)
    }

    #[test]
    fn a_sleeper_that_never_wakes_does_not_keep_the_doorbell_rung_for_ever() {
        // A sleeper that died asleep: counted, never woken.
        let (c, _s) = two_asleep_and_a_ring_left();
        // Another waiter wakes on the ring again and again, as one whose
        // sleeps end at once on a doorbell left rung.
        let began = std::time::Instant::now();
        let mut wakes = 0;
        while rung(&c) {
            assert!(began.elapsed() < std::time::Duration::from_secs(5), "the ring was never taken");
            if wakes > 0 {
                c.fall_asleep(Interest::READABLE);
            }
            assert!(!c.wake(Interest::READABLE, true));
            wakes += 1;
        }
        let left = began.elapsed();
        assert!(
            left >= std::time::Duration::from_nanos(rung::STALE_AFTER_NS),
            "taken after {left:?} ({wakes} wake-ups)"
        );
    }

    #[test]
    fn a_new_image_forgets_what_the_earlier_one_left_counted() {
        let (c, s) = pair(4096);
        // A thread the exec ended, asleep, and an epoll set's arming: counts
        // and an arming left in the shared words.
        c.fall_asleep(Interest::READABLE);
        c.fall_asleep(Interest::READABLE);
        c.forget_earlier_sleepers();
        assert_eq!(c.sleepers().load(Ordering::Acquire), 0);
        c.fall_asleep(Interest::READABLE);
        assert_eq!(s.send(&[b"z"], 0), Ok(1));
        assert!(c.wake(Interest::READABLE, true), "the new image's one sleeper wakes last");
        assert!(!rung(&c), "and takes its ring");
        // After fork, others may be asleep in the other process: kept.
        c.add_holder();
        c.fall_asleep(Interest::READABLE);
        c.forget_earlier_sleepers();
        assert_eq!(c.sleepers().load(Ordering::Acquire), 1);
    }

    #[test]
    fn a_slow_sleeper_keeps_its_ring_however_often_another_wakes_on_it() {
        let (c, _s) = two_asleep_and_a_ring_left();
        // More than the eight in a row that once counted as a dead sleeper.
        let began = std::time::Instant::now();
        for _ in 0..12 {
            assert!(!c.wake(Interest::READABLE, true));
            c.fall_asleep(Interest::READABLE);
        }
        // (A machine so busy that twelve yields took 50 ms may take it.)
        if began.elapsed() < std::time::Duration::from_nanos(rung::STALE_AFTER_NS) {
            assert!(rung(&c), "quick wake-ups on one ring did not take the other sleeper's ring");
        }
        assert!(!c.wake(Interest::READABLE, true));
        assert!(c.wake(Interest::READABLE, true), "the slow one wakes last");
        assert!(!rung(&c));
    }

    fn recv_all(c: &Connection, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        let got = c.recv(&mut [&mut out[..]], libc::MSG_WAITALL).unwrap();
        out.truncate(got);
        out
    }

    #[test]
    fn bytes_flow_both_ways_in_order() {
        let (c, s) = pair(4096);
        assert_eq!(c.send(&[b"hello ", b"world"], 0), Ok(11));
        assert_eq!(recv_all(&s, 11), b"hello world");
        assert_eq!(s.send(&[b"pong"], 0), Ok(4));
        let mut buf = [0u8; 2];
        assert_eq!(c.recv(&mut [&mut buf[..]], libc::MSG_PEEK), Ok(2));
        assert_eq!(c.readable_bytes(), 4);
        assert_eq!(recv_all(&c, 4), b"pong");
    }

    #[test]
    fn a_sink_that_takes_part_of_what_it_is_offered_loses_none_of_the_rest() {
        let (c, s) = pair(4096);
        assert_eq!(c.send(&[b"0123456789"], 0), Ok(10));
        let taken = s.recv_into(8, |offered| {
            assert_eq!(offered, b"01234567");
            Ok(3)
        });
        assert_eq!(taken, Ok(3));
        let rest = s.recv_into(100, |offered| {
            assert_eq!(offered, b"3456789");
            Ok(offered.len())
        });
        assert_eq!(rest, Ok(7));
        c.close();
        assert_eq!(s.recv_into(100, |_| panic!("nothing is left to offer")), Ok(0));
    }

    #[test]
    fn empty_nonblocking_read_is_eagain() {
        let (c, _s) = pair(4096);
        c.set_blocking(Blocking::NonBlocking);
        let mut buf = [0u8; 8];
        assert_eq!(c.recv(&mut [&mut buf[..]], 0), Err(Errno(libc::EAGAIN)));
        let (c2, _s2) = pair(4096);
        assert_eq!(c2.recv(&mut [&mut buf[..]], libc::MSG_DONTWAIT), Err(Errno(libc::EAGAIN)));
    }

    #[test]
    fn half_close_delivers_eof_after_the_data() {
        let (c, s) = pair(4096);
        c.send(&[b"last words"], 0).unwrap();
        c.shutdown(libc::SHUT_WR).unwrap();
        assert_eq!(c.send(&[b"x"], libc::MSG_NOSIGNAL), Err(Errno(libc::EPIPE)));
        assert_eq!(s.readiness() & (Readiness::IN | Readiness::RDHUP), Readiness::IN | Readiness::RDHUP);
        assert_eq!(recv_all(&s, 64), b"last words");
        let mut buf = [0u8; 8];
        assert_eq!(s.recv(&mut [&mut buf[..]], 0), Ok(0));
        // The other direction still works.
        s.send(&[b"reply"], 0).unwrap();
        assert_eq!(recv_all(&c, 5), b"reply");
        s.shutdown(libc::SHUT_WR).unwrap();
        assert!(c.readiness().intersects(Readiness::HUP), "both directions closed");
    }

    #[test]
    fn close_with_unread_data_resets_the_peer() {
        let (c, s) = pair(4096);
        c.send(&[b"unread"], 0).unwrap();
        s.close();
        let mut buf = [0u8; 8];
        assert_eq!(c.recv(&mut [&mut buf[..]], 0), Err(Errno(libc::ECONNRESET)));
        assert_eq!(c.recv(&mut [&mut buf[..]], 0), Ok(0));
    }

    #[test]
    fn linger_zero_close_resets_the_peer() {
        let (c, s) = pair(4096);
        s.set_linger(true, 0);
        s.close();
        let mut buf = [0u8; 8];
        assert_eq!(c.recv(&mut [&mut buf[..]], 0), Err(Errno(libc::ECONNRESET)));
        // A nonzero linger time closes gracefully.
        let (c, s) = pair(4096);
        s.set_linger(true, 5);
        s.close();
        assert_eq!(c.recv(&mut [&mut buf[..]], 0), Ok(0));
    }

    #[test]
    fn writing_to_a_closed_peer_fails_after_one_write() {
        let (c, s) = pair(4096);
        s.close();
        let mut buf = [0u8; 8];
        assert_eq!(c.recv(&mut [&mut buf[..]], 0), Ok(0));
        assert_eq!(c.send(&[b"first"], libc::MSG_NOSIGNAL), Ok(5));
        assert_eq!(c.send(&[b"second"], libc::MSG_NOSIGNAL), Err(Errno(libc::EPIPE)));
    }

    #[test]
    fn peek_with_waitall_waits_for_every_byte_and_consumes_none() {
        let (c, s) = pair(4096);
        c.send(&[b"abc"], 0).unwrap();
        let peeker = std::thread::spawn(move || {
            let mut buf = [0u8; 6];
            let n = s.recv(&mut [&mut buf[..]], libc::MSG_PEEK | libc::MSG_WAITALL);
            (n, buf, recv_all(&s, 6))
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        c.send(&[b"def"], 0).unwrap();
        let (n, buf, read) = peeker.join().unwrap();
        assert_eq!(n, Ok(6));
        assert_eq!(&buf, b"abcdef");
        assert_eq!(read, b"abcdef");
        // The end of the stream ends the wait with what is there.
        let (c, s) = pair(4096);
        c.send(&[b"xy"], 0).unwrap();
        c.shutdown(libc::SHUT_WR).unwrap();
        let mut buf = [0u8; 6];
        assert_eq!(s.recv(&mut [&mut buf[..]], libc::MSG_PEEK | libc::MSG_WAITALL), Ok(2));
    }

    #[test]
    fn a_handler_that_ran_between_sleeps_ends_a_blocked_read() {
        // The handler runs while the reader looks at shared memory, not
        // while it sleeps in poll: the kernel's read, asleep all along,
        // would have failed with EINTR, so the next sleep must not happen.
        let (c, _s) = pair(4096);
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut ran = false;
            let outcome = blocking::block_until(&c, Interest::READABLE, || {
                if !ran {
                    ran = true;
                    crate::signals::delivered(libc::SIGALRM, 0);
                }
                false
            });
            let _ = done.send(outcome);
        });
        let outcome = result.recv_timeout(std::time::Duration::from_secs(5)).expect("the read slept on");
        assert_eq!(outcome, Err(Errno(libc::EINTR)));
    }

    #[test]
    fn blocking_reader_wakes_when_bytes_arrive() {
        let (c, s) = pair(4096);
        let reader = std::thread::spawn(move || recv_all(&s, 5));
        std::thread::sleep(std::time::Duration::from_millis(100));
        c.send(&[b"wake!"], 0).unwrap();
        assert_eq!(reader.join().unwrap(), b"wake!");
    }

    #[test]
    fn shutdown_from_another_thread_ends_a_blocked_read_and_write() {
        let (c, s) = pair(4096);
        let reader = {
            let c = c.clone();
            std::thread::spawn(move || recv_all(&c, 10))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        c.shutdown(libc::SHUT_RD).unwrap();
        assert_eq!(reader.join().unwrap(), b"", "a blocked read returns end of stream");
        // A writer blocked on a full ring: SHUT_WR ends it with what it wrote.
        let writer = {
            let c = c.clone();
            std::thread::spawn(move || c.send(&[&[7u8; 10_000]], libc::MSG_NOSIGNAL))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        c.shutdown(libc::SHUT_WR).unwrap();
        assert_eq!(writer.join().unwrap(), Ok(4096));
        assert_eq!(recv_all(&s, 10_000).len(), 4096, "the FIN follows the bytes written");
    }

    #[test]
    fn blocking_writer_streams_more_than_the_ring_holds() {
        let (c, s) = pair(4096);
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let expected = data.clone();
        let writer = std::thread::spawn(move || c.send(&[&data], 0));
        let got = recv_all(&s, expected.len());
        assert_eq!(writer.join().unwrap(), Ok(expected.len()));
        assert!(got == expected, "stream corrupted");
    }

    #[test]
    fn a_vanished_peer_reads_as_end_of_stream() {
        let (c, s) = pair(4096);
        let doorbell = s.doorbell;
        // The peer's process died: its descriptors close, nothing else.
        std::mem::forget(s);
        sys::close(doorbell).unwrap();
        c.drain_doorbell();
        let mut buf = [0u8; 8];
        assert_eq!(c.recv(&mut [&mut buf[..]], 0), Ok(0));
        assert_eq!(c.send(&[b"a"], libc::MSG_NOSIGNAL), Ok(1));
        assert_eq!(c.send(&[b"b"], libc::MSG_NOSIGNAL), Err(Errno(libc::EPIPE)));
    }

    #[test]
    fn readiness_follows_the_rings() {
        let (c, s) = pair(4096);
        assert_eq!(c.readiness(), Readiness::OUT);
        c.send(&[&[0u8; 4096]], 0).unwrap();
        assert!(!c.readiness().intersects(Readiness::OUT), "ring full");
        assert_eq!(s.readiness() & Readiness::IN, Readiness::IN);
        recv_all(&s, 100);
        assert_eq!(c.readiness() & Readiness::OUT, Readiness::OUT);
    }

    #[test]
    fn a_new_image_without_its_halves_takes_nothing_up() {
        // The daemon refused (or was not there): no halves, an error, and
        // no abort in the program's constructor.
        let (_c, s) = pair(4096);
        let (resumed, internal) = s.for_exec();
        let dup = |fd: RawFd| sys::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0).unwrap() as RawFd;
        let delivery = Delivery::of_segment(-1, -1, dup(internal.doorbell), -1);
        assert!(matches!(Connection::resume(resumed, delivery), Err(Errno(libc::EBADF))));
    }

    #[test]
    fn a_connection_taken_up_after_exec_goes_on_where_it_was() {
        use std::os::fd::IntoRawFd;
        let (c, s, files) = pair_with_files(4096);
        c.send(&[b"before"], 0).unwrap();
        s.set_timeout(Direction::Receive, 1500);
        s.state.shut_read();
        let holders = s.segment.holders(Endpoint::Server.index()).load(Ordering::Relaxed);
        // Threads of the image before exec were in the middle of copies:
        // their claims name this process, which goes on in the new image.
        let me = sys::getpid() as u32;
        assert_eq!(s.rx().try_claim(me), Ok(()));
        assert_eq!(s.tx().try_claim(me), Ok(()));
        let (resumed, internal) = s.for_exec();
        assert_eq!(resumed.recv_timeout_ms, 1500);
        assert_eq!(internal.remap, Remap::FromDaemon);
        // What the new image has: the same descriptors, duplicated as exec
        // would keep them, and the halves the daemon sends it again.
        let dup = |fd: RawFd| sys::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0).unwrap() as RawFd;
        let delivery = || {
            let [own, peer] = files.clone_for(Endpoint::Server).unwrap();
            Delivery::of_segment(own.into_raw_fd(), peer.into_raw_fd(), dup(internal.doorbell), -1)
        };
        let again = Connection::resume(resumed, delivery()).unwrap();
        assert_eq!(again.segment.holders(Endpoint::Server.index()).load(Ordering::Relaxed), holders);
        assert_eq!(again.rx().try_claim(7), Ok(()), "the read claim was let go");
        again.rx().release_claim(7);
        assert_eq!(again.tx().try_claim(7), Ok(()), "the write claim was let go");
        again.tx().release_claim(7);
        assert_eq!(again.timeout_ms(Direction::Receive), 1500);
        assert!(again.state.has(Flags::READ_SHUT));
        assert_eq!(again.peer(), s.peer());
        // The stream goes on: the client's next bytes reach the new end.
        again.state.set_blocking(Blocking::NonBlocking);
        let resumed = Resumed { flags: 0, ..resumed };
        let reader = Connection::resume(resumed, delivery()).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(reader.recv(&mut [&mut buf[..]], 0), Ok(6));
        assert_eq!(&buf[..6], b"before");
        // A closed state never crosses.
        assert!(!State::resumed(Flags::CLOSED.bits() | Flags::WRITE_SHUT.bits()).has(Flags::CLOSED));
        // Each stands for a process already counted: dropping them must not
        // take the count below the two real ends'.
        again.add_holder();
        reader.add_holder();
        drop((again, reader));
        assert_eq!(s.segment.holders(Endpoint::Server.index()).load(Ordering::Relaxed), holders);
    }

    #[test]
    fn a_writer_behind_one_waiting_for_room_keeps_its_timeout_and_mode() {
        let (c, _s) = pair(4096);
        let c2 = c.clone();
        // One writer fills the ring and waits for room, holding the lock.
        let first = std::thread::spawn(move || c2.send(&[&[1u8; 8192][..]], 0));
        std::thread::sleep(std::time::Duration::from_millis(100));
        // A non-blocking writer is told the ring is full.
        assert_eq!(c.send(&[b"x"], libc::MSG_DONTWAIT), Err(Errno(libc::EAGAIN)));
        // A blocking one with SO_SNDTIMEO gives up when it runs out.
        c.set_timeout(Direction::Send, 150);
        let began = std::time::Instant::now();
        assert_eq!(c.send(&[b"x"], 0), Err(Errno(libc::EAGAIN)));
        assert!(began.elapsed() >= std::time::Duration::from_millis(140), "{:?}", began.elapsed());
        c.break_connection();
        let _ = first.join().unwrap();
    }
}
