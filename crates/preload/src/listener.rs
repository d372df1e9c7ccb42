//! A listening socket that accepts both kinds of client.
//!
//! The kernel socket keeps listening (kernel clients and programs without
//! the library still connect to it); beside it, a listener channel to the
//! daemon delivers vSocket connections, each a message carrying the
//! segment and the doorbell. `accept` takes from whichever is ready.
//!
//! When the channel breaks (vsocketd restarted, crashed or was upgraded)
//! the listener is detached: a plain kernel listener for the moment. Every
//! wait that involves it (accept, poll, select, epoll) tries to register it
//! again with the daemon when a try is due (after 100 ms, then backing off
//! to [`RETRY_MAX_MS`]), so a running server is back on vSocket soon after
//! a new daemon is up, without its help. A channel that broke stays open
//! (retired) until the listener is closed: epoll sets that still hold it
//! must be able to remove it by its number.

use crate::addr::Family;
use crate::attach::{Channel, ControlChannel, Receive};
use crate::conn::{Blocking, Connection, Direction};
use crate::forksafe;
use crate::kits::{self, ServerKits};
use crate::sys::{self, Errno, SysResult};
use arc_swap::ArcSwapOption;
use std::net::SocketAddrV4;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use vsocket_abi::control::{ConnectionInfo, Message, CONNECTION_FDS};
use vsocket_abi::layout::Endpoint;
use vsocket_ring::spin::Spinner;

/// The longest a detached listener waits between tries to attach again.
pub const RETRY_MAX_MS: i64 = 500;
/// The first wait after a listener is detached.
const RETRY_FIRST_MS: i64 = 100;

/// Listeners of this process that are detached and may attach again: while
/// there are any, waits on them stay short and try.
static DETACHED: AtomicUsize = AtomicUsize::new(0);
/// Counts every change of any listener's channel (detached, attached
/// again): an epoll set whose count differs looks at its listeners.
static CHANNELS_CHANGED: AtomicU64 = AtomicU64::new(0);

/// Are any of this process's listeners detached and waiting to attach?
pub fn any_detached() -> bool {
    DETACHED.load(Ordering::Relaxed) > 0
}

/// The count of listener channel changes, for [`any_detached`]'s users
/// that must also notice a change made by another thread.
pub fn channels_changed() -> u64 {
    CHANNELS_CHANGED.load(Ordering::Acquire)
}

pub struct Listener {
    /// The listener channel (library-internal; closing it, when the
    /// listener goes, unregisters the listener at the daemon), with the
    /// kits that came on it; none while detached.
    channel: ArcSwapOption<Attached>,
    /// What registering again needs, and when to try.
    retry: forksafe::Mutex<Retry>,
    /// The listening socket's family: accepted sockets have it too.
    pub family: Family,
    /// How long a blocking accept spins before sleeping.
    pub spinner: Spinner,
    /// A channel that broke had kits: accepts look at them too.
    retired_kits: AtomicBool,
    /// Accepts that found a kit waiting in memory (see `take_pending`).
    kits_first: AtomicU64,
    /// A program socket made while a blocking accept waited, at a number
    /// of the library's (see [`Listener::make_spare`]); [`NO_SPARE`]: none.
    spare: AtomicI64,
    /// The listening socket's options that accepted sockets inherit, read
    /// from the kernel at the first accept after they may have changed
    /// (`None`: not read yet, or a `setsockopt` on the listener since).
    inherited: forksafe::Mutex<Option<Inherited>>,
}

/// No spare program socket (see [`Listener::make_spare`]).
const NO_SPARE: i64 = -1;

/// A spare program socket: its descriptor, and whether it is non-blocking.
fn spare_of(fd: RawFd, nonblocking: bool) -> i64 {
    i64::from(fd) | i64::from(nonblocking) << 32
}

/// A detached listener's way back to the daemon.
struct Retry {
    /// The address and backlog the listener registered with.
    local: SocketAddrV4,
    backlog: i32,
    /// When the next try is due (`sys::now_ms`), and the wait after it.
    due_ms: i64,
    wait_ms: i64,
    /// The daemon refused the listener: it stays a kernel listener.
    refused: bool,
    /// Channels that broke, kept open until the listener goes.
    retired: Vec<Arc<Attached>>,
}

/// A listener channel, and the kits that come on it (ARCHITECTURE §3b)
/// where the daemon gives the listener some.
pub struct Attached {
    channel: Channel,
    pub kits: Option<ServerKits>,
}

impl std::ops::Deref for Attached {
    type Target = Channel;
    fn deref(&self) -> &Channel {
        &self.channel
    }
}

impl Attached {
    /// Takes no more kits on this channel and, if `tell`, says so.
    fn no_more_kits(&self, tell: bool) {
        if self.kits.as_ref().is_some_and(ServerKits::turn_off) && tell {
            let _ = self.channel.send_only(&Message::NoKits);
        }
    }

    /// What a wait on the listener sleeps on: the channel, or the
    /// descriptor that watches it and the kits' bell.
    pub fn wake_fd(&self) -> RawFd {
        self.kits.as_ref().map_or(self.channel.fd(), ServerKits::wake_fd)
    }
}

/// A vSocket connection taken from the listener channel.
pub struct Accepted {
    /// The program's new descriptor for it.
    pub fd: RawFd,
    /// The client's address.
    pub peer: SocketAddrV4,
    pub conn: Connection,
}

/// Options an accepted socket inherits from its listener, as Linux copies
/// them: the ones set away from their defaults.
#[derive(Clone, Copy, Default)]
struct Inherited {
    keepalive: i32,
    nodelay: i32,
    recv_timeout_ms: i64,
    send_timeout_ms: i64,
    linger: Option<i32>,
}

impl Inherited {
    fn read(listening: RawFd) -> Inherited {
        let int = |level, name| sys::getsockopt_int(listening, level, name).unwrap_or(0);
        let timeout = |name| sys::getsockopt_timeout_ms(listening, name).unwrap_or(0);
        Inherited {
            keepalive: int(libc::SOL_SOCKET, libc::SO_KEEPALIVE),
            nodelay: int(libc::IPPROTO_TCP, libc::TCP_NODELAY),
            recv_timeout_ms: timeout(libc::SO_RCVTIMEO),
            send_timeout_ms: timeout(libc::SO_SNDTIMEO),
            linger: match sys::getsockopt_linger(listening) {
                Ok((true, seconds)) => Some(seconds),
                _ => None,
            },
        }
    }

    /// Sets them on the accepted kernel socket `fd` (which `getsockopt`
    /// reports) and, for those vSocket acts on, in the connection. Options
    /// left at their defaults cost nothing.
    fn apply(&self, fd: RawFd, conn: &Connection) {
        for (level, name, v) in [
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE, self.keepalive),
            (libc::IPPROTO_TCP, libc::TCP_NODELAY, self.nodelay),
        ] {
            if v != 0 {
                let _ = sys::setsockopt_int(fd, level, name, v);
            }
        }
        for (direction, ms) in [(Direction::Receive, self.recv_timeout_ms), (Direction::Send, self.send_timeout_ms)] {
            if ms > 0 {
                let _ = sys::setsockopt_timeout_ms(fd, direction.timeout_option(), ms);
                conn.set_timeout(direction, ms);
            }
        }
        if let Some(seconds) = self.linger {
            let _ = sys::setsockopt_linger(fd, true, seconds);
            conn.set_linger(true, seconds);
        }
    }
}

/// What a receive on the listener channel that brought no connection means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Miss {
    /// Nothing was queued after all: another process sharing the listening
    /// socket (a forked worker) took it. Wait again.
    Empty,
    /// The daemon closed its end (it exited or restarted), or the
    /// descriptor no longer names the channel: only kernel clients remain.
    ChannelGone,
    /// This one delivery was unusable and is lost (its descriptors cut
    /// short, or malformed); the channel still serves. accept fails with
    /// the error, as Linux's may with EMFILE, ENOMEM or EPROTO, and the
    /// program's next accept goes on.
    DeliveryLost(Errno),
}

impl Miss {
    fn of(e: Errno) -> Miss {
        match e.0 {
            libc::EAGAIN => Miss::Empty,
            libc::ECONNABORTED | libc::ECONNRESET | libc::ENOTCONN | libc::EPIPE | libc::EBADF | libc::ENOTSOCK => {
                Miss::ChannelGone
            }
            _ => Miss::DeliveryLost(e),
        }
    }
}

impl Listener {
    /// Registers the kernel listening socket's address with the daemon.
    /// With no daemon to answer (it is restarting) the listener starts
    /// detached and registers when one answers; the daemon's refusal is
    /// the error.
    pub fn register(local: SocketAddrV4, family: Family, backlog: i32) -> SysResult<Listener> {
        let backlog = backlog.max(0);
        let channel = match open_channel(local, backlog) {
            Ok(channel) => Some(Arc::new(channel)),
            Err(NotTaken::Refused(errno)) => return Err(errno),
            Err(NotTaken::NoDaemon) => {
                DETACHED.fetch_add(1, Ordering::Relaxed);
                CHANNELS_CHANGED.fetch_add(1, Ordering::Release);
                None
            }
        };
        Ok(Listener {
            channel: ArcSwapOption::new(channel),
            retry: forksafe::Mutex::new(Retry {
                local,
                backlog,
                due_ms: sys::now_ms() + RETRY_FIRST_MS,
                wait_ms: RETRY_FIRST_MS,
                refused: false,
                retired: Vec::new(),
            }),
            family,
            spinner: Spinner::new(),
            retired_kits: AtomicBool::new(false),
            kits_first: AtomicU64::new(0),
            spare: AtomicI64::new(NO_SPARE),
            inherited: forksafe::Mutex::new(None),
        })
    }

    /// The listener channel, unless the listener is detached.
    pub fn channel(&self) -> Option<Arc<Attached>> {
        self.channel.load_full()
    }

    /// What a wait on the listener sleeps on beside its kernel socket: the
    /// channel's descriptor, or the one that watches the channel and the
    /// kits' bell (see [`Attached::wake_fd`]); none while detached.
    pub fn channel_fd(&self) -> Option<RawFd> {
        self.channel.load().as_ref().map(|c| c.wake_fd())
    }

    /// The library's own descriptors this listener holds: its spare
    /// program socket, the channel's and, with kits, the bell's, the kit
    /// channel's and the watch's.
    pub fn internal_fds(&self, mut f: impl FnMut(RawFd)) {
        let spare = self.spare.load(Ordering::Acquire);
        if spare != NO_SPARE {
            f(spare as i32 as RawFd);
        }
        if let Some(attached) = self.channel.load().as_ref() {
            f(attached.channel.fd());
            for fd in attached.kits.iter().flat_map(ServerKits::fds) {
                f(fd);
            }
        }
    }

    /// The listener's process forked: its channel may now be read by more
    /// than one process, which would split the kits between them. It takes
    /// no more, and (in the process that keeps asking, `tell`) says so.
    pub fn no_more_kits(&self, tell: bool) {
        if let Some(attached) = self.channel.load().as_ref() {
            attached.no_more_kits(tell);
        }
    }

    /// The listener channel `broken` broke: the listener is detached (if
    /// that is still its channel) and tries to attach again soon.
    fn detach(&self, broken: &Arc<Attached>) {
        let mut retry = self.retry.lock();
        let current = self.channel.load();
        if !current.as_ref().is_some_and(|c| Arc::ptr_eq(c, broken)) {
            return;
        }
        drop(current);
        self.channel.store(None);
        retry.retired.push(broken.clone());
        if broken.kits.is_some() {
            self.retired_kits.store(true, Ordering::Release);
        }
        retry.wait_ms = RETRY_FIRST_MS;
        retry.due_ms = sys::now_ms() + RETRY_FIRST_MS;
        DETACHED.fetch_add(1, Ordering::Relaxed);
        CHANNELS_CHANGED.fetch_add(1, Ordering::Release);
    }

    /// A detached listener registers again with the daemon if a try is
    /// due. Returns whether it is attached now (by this call or before).
    pub fn reattach_if_due(&self) -> bool {
        if self.attached() {
            return true;
        }
        let mut retry = self.retry.lock();
        if self.attached() {
            return true;
        }
        let now = sys::now_ms();
        if retry.refused || now < retry.due_ms {
            return false;
        }
        match open_channel(retry.local, retry.backlog) {
            Ok(channel) => {
                self.channel.store(Some(Arc::new(channel)));
                DETACHED.fetch_sub(1, Ordering::Relaxed);
                CHANNELS_CHANGED.fetch_add(1, Ordering::Release);
                true
            }
            Err(NotTaken::Refused(_)) => {
                // The daemon answered, and said no (the address is no
                // longer the guest's, or it is at a quota).
                retry.refused = true;
                DETACHED.fetch_sub(1, Ordering::Relaxed);
                false
            }
            Err(NotTaken::NoDaemon) => {
                // No daemon yet: try again later.
                retry.due_ms = now + retry.wait_ms;
                retry.wait_ms = (retry.wait_ms * 2).min(RETRY_MAX_MS);
                false
            }
        }
    }

    /// Takes one pending vSocket connection, if any, with a new descriptor
    /// for it (a fresh kernel TCP socket, so the program sees a real
    /// socket) that the caller enters in the side table.
    /// `flags` are accept4's (SOCK_NONBLOCK, SOCK_CLOEXEC).
    /// `listening` is the program's listening socket, whose options the
    /// accepted socket inherits (as Linux copies them).
    pub fn take_pending(&self, listening: RawFd, flags: i32) -> SysResult<Option<Accepted>> {
        self.reattach_if_due();
        if self.retired_kits.load(Ordering::Acquire) {
            if let Some(accepted) = self.take_retired_kit(listening, flags)? {
                return Ok(Some(accepted));
            }
        }
        let Some(channel) = self.channel() else {
            return Ok(None);
        };
        // A kit whose slot waits in memory is found without a system call,
        // and taken first; but every eighth accept that finds one looks at
        // the channel first, so that connections the daemon delivers are
        // not kept waiting by a stream of kits.
        if let Some(kits) = &channel.kits {
            if kits.slot_waits() && self.kits_first.fetch_add(1, Ordering::Relaxed) % 8 != 7 {
                if let Some(accepted) = self.take_kit(kits, &channel, listening, flags)? {
                    return Ok(Some(accepted));
                }
            }
        }
        if let Some(accepted) = self.take_delivered(&channel, listening, flags)? {
            return Ok(Some(accepted));
        }
        match &channel.kits {
            Some(kits) => self.take_kit(kits, &channel, listening, flags),
            None => Ok(None),
        }
    }

    /// A kit a client took before the daemon that granted it went away
    /// (its successor knows no grant, and the client takes no more once
    /// it sees its request channel end): the queues of the channels that
    /// broke are read until they are empty.
    fn take_retired_kit(&self, listening: RawFd, flags: i32) -> SysResult<Option<Accepted>> {
        let retired: Vec<Arc<Attached>> = {
            let retry = self.retry.lock();
            retry.retired.iter().filter(|a| a.kits.is_some()).cloned().collect()
        };
        for attached in &retired {
            if let Some(kits) = &attached.kits {
                if let Some(accepted) = self.take_kit(kits, attached, listening, flags)? {
                    return Ok(Some(accepted));
                }
            }
        }
        // Once every kit of the channels that broke is accepted or gone,
        // accepts stop looking at them.
        if retired.iter().filter_map(|a| a.kits.as_ref()).all(ServerKits::spent) {
            let retry = self.retry.lock();
            // (Unless a channel with kits broke meanwhile.)
            if retry.retired.iter().filter(|a| a.kits.is_some()).count() == retired.len() {
                self.retired_kits.store(false, Ordering::Release);
            }
        }
        Ok(None)
    }

    /// Takes a kit one of the grants' clients took, if any, as
    /// [`take_pending`](Self::take_pending) takes a delivered connection.
    fn take_kit(
        &self,
        kits: &ServerKits,
        channel: &Attached,
        listening: RawFd,
        flags: i32,
    ) -> SysResult<Option<Accepted>> {
        if kits.is_off() {
            // Its kits are let go; no program socket is made for them.
            let _ = kits.next();
            return Ok(None);
        }
        while kits.may_have_one() {
            // The program's socket first: short of descriptors (EMFILE),
            // no kit is taken and it waits for a later accept, as in a
            // kernel backlog.
            let fd = self.program_socket(flags)?;
            let incoming = match kits.next() {
                Ok(Some(incoming)) => incoming,
                Ok(None) => {
                    let _ = sys::close(fd);
                    break;
                }
                Err(e) => {
                    let _ = sys::close(fd);
                    if kits.lost_batch() {
                        channel.no_more_kits(true);
                    }
                    return Err(e);
                }
            };
            let kits::Incoming { kit, peer, local } = incoming;
            let info = ConnectionInfo { id: kit.id, local, peer, ring_size: kit.ring_size };
            match Connection::new(info, Endpoint::Server, self.family, kit.delivery, Blocking::from_flags(flags)) {
                // Revoked or delivered by the daemon first: not this one.
                Ok(conn) if !conn.claim_kit() => {
                    let _ = sys::close(fd);
                }
                Ok(conn) => {
                    self.inherit(listening, fd, &conn);
                    return Ok(Some(Accepted { fd, peer, conn }));
                }
                Err(e) => {
                    // A kit its client took and this process cannot map is
                    // one the daemon must end (its client would wait): no
                    // more kits here.
                    let _ = sys::close(fd);
                    channel.no_more_kits(true);
                    return Err(e);
                }
            }
        }
        Ok(None)
    }

    /// The options `listening` gives the accepted socket `fd`.
    fn inherit(&self, listening: RawFd, fd: RawFd, conn: &Connection) {
        let inherited = *self.inherited.lock().get_or_insert_with(|| Inherited::read(listening));
        inherited.apply(fd, conn);
    }

    /// A fresh kernel socket for an accepted connection (accept4's
    /// `SOCK_NONBLOCK`/`SOCK_CLOEXEC` from `flags`): the program's
    /// descriptor, made before a connection is taken, so that short of
    /// descriptors (EMFILE) none is taken, as in a kernel backlog. The
    /// spare one a waiting accept made is moved to the lowest free number
    /// (where `socket` would have put it; EMFILE just the same), which
    /// costs two calls where `socket` costs the kernel a new socket.
    fn program_socket(&self, flags: i32) -> SysResult<RawFd> {
        // No fork between taking the spare and closing its number (the
        // child would keep a copy no one closes), and the program's own
        // limit for the copy (no other thread's raised one).
        let moved = sys::with_fork_held(|| {
            let spare = self.spare.swap(NO_SPARE, Ordering::AcqRel);
            if spare == NO_SPARE {
                return None;
            }
            let (fd, nonblocking) = (spare as i32 as RawFd, spare >> 32 != 0);
            let copy = if flags & libc::SOCK_CLOEXEC != 0 { libc::F_DUPFD_CLOEXEC } else { libc::F_DUPFD };
            match sys::fcntl(fd, copy, 0) {
                Ok(program) => {
                    let _ = sys::close(fd);
                    let program = program as RawFd;
                    let wanted = flags & libc::SOCK_NONBLOCK != 0;
                    if wanted != nonblocking {
                        let status = if wanted { libc::O_NONBLOCK } else { 0 };
                        let _ = sys::fcntl(program, libc::F_SETFL, status as libc::c_long);
                    }
                    Some(Ok(program))
                }
                // Short of descriptors: the spare waits for a later accept,
                // as the connection does.
                Err(Errno(libc::EMFILE)) => {
                    if self.spare.compare_exchange(NO_SPARE, spare, Ordering::AcqRel, Ordering::Acquire).is_err() {
                        let _ = sys::close(fd);
                    }
                    Some(Err(Errno(libc::EMFILE)))
                }
                // Its number is not the spare any more (closed by the
                // program some way): forgotten, not closed.
                Err(_) => None,
            }
        });
        if let Some(result) = moved {
            return result;
        }
        sys::socket(self.family.domain(), libc::SOCK_STREAM | (flags & (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)), 0)
    }

    /// A blocking accept (flags `flags`) found nothing pending and is about
    /// to wait: the program socket for the connection it waits for is
    /// made now, off the path from a client's connect to its accept. It
    /// waits at a number of the library's (close-on-exec, spared by
    /// `close_range`, closed in a forked child, see
    /// [`Listener::forget_spare_in_child`]).
    pub fn make_spare(&self, flags: i32) {
        if self.spare.load(Ordering::Acquire) != NO_SPARE || !self.attached() {
            return;
        }
        let nonblocking = flags & libc::SOCK_NONBLOCK;
        let floor = crate::attach::internal_fd_floor();
        // Made, moved and kept with no fork between (see `program_socket`).
        sys::with_limit_raised(|raised| {
            let ty = libc::SOCK_STREAM | libc::SOCK_CLOEXEC | nonblocking;
            let Ok(fd) = sys::socket(self.family.domain(), ty, 0) else { return };
            let mut moved = [fd];
            sys::relocate_raised(&mut moved, raised, floor);
            // Kept only where the library's own descriptors go: above the
            // program's limit, or where soft and hard are one, in the upper
            // part of its range, as the listener's channel is.
            let above = raised.map_or(floor, |soft| soft.min(RawFd::MAX as u64) as RawFd);
            let spare = spare_of(moved[0], nonblocking != 0);
            if moved[0] < above
                || self.spare.compare_exchange(NO_SPARE, spare, Ordering::AcqRel, Ordering::Acquire).is_err()
            {
                let _ = sys::close(moved[0]);
            }
        });
    }

    /// In a forked child: the spare program socket is the parent's (a
    /// copy here would hand one socket to two processes' programs).
    pub fn forget_spare_in_child(&self) {
        let spare = self.spare.swap(NO_SPARE, Ordering::AcqRel);
        if spare != NO_SPARE {
            let _ = sys::close(spare as i32 as RawFd);
        }
    }

    /// Takes the connection the daemon delivered on the listener channel,
    /// if one waits.
    fn take_delivered(&self, channel: &Arc<Attached>, listening: RawFd, flags: i32) -> SysResult<Option<Accepted>> {
        // The program's socket comes first: if it cannot be had (EMFILE),
        // the connection stays queued for a later accept, as in a backlog.
        let mut pending = [libc::pollfd { fd: channel.fd(), events: libc::POLLIN, revents: 0 }];
        if sys::poll(&mut pending, 0).unwrap_or(0) == 0 {
            return Ok(None);
        }
        let fd = self.program_socket(flags)?;
        // The connection's own descriptors are read with the soft limit
        // raised, above the program's (see `attach::receive_on`). Where it
        // cannot be raised (soft and hard equal), they land in the
        // program's room: without room for all of them the kernel would
        // cut them short and the connection would be lost. Short of room
        // there, accept fails with EMFILE and the connection stays queued,
        // as in a backlog.
        if !sys::limit_rises() {
            if let Err(e) = sys::probe_free_descriptors(fd, CONNECTION_FDS) {
                let _ = sys::close(fd);
                return Err(e);
            }
        }
        let mut reply = match channel.receive(Receive::Shared) {
            Ok(r) => r,
            Err(e) => {
                let _ = sys::close(fd);
                if matches!(Miss::of(e), Miss::DeliveryLost(_)) {
                    // It may have been a batch of kits, whose clients
                    // would wait on this listener in vain: the daemon ends
                    // its grants when told.
                    channel.no_more_kits(true);
                }
                // Only the channel's end detaches the listener. Detaching on
                // any error (a delivery cut short at the descriptor limit
                // was one) left a blocking accept asleep on its kernel
                // socket alone while the daemon, which had not seen the
                // channel end, went on queueing clients on it: PostgreSQL's
                // postmaster, which accepts with its signals blocked, stopped
                // accepting that way. (A channel detached while still open
                // is kept open, retired, so even attaching again would
                // leave the daemon taking turns between it and the new one.)
                return match Miss::of(e) {
                    Miss::Empty => Ok(None),
                    Miss::ChannelGone => {
                        // Kernel clients must still be accepted, and the
                        // next daemon will take it again.
                        self.detach(channel);
                        Ok(None)
                    }
                    Miss::DeliveryLost(e) => Err(e),
                };
            }
        };

        let delivered = crate::attach::delivered(&mut reply, Endpoint::Server).unwrap_or(Err(Errno(libc::EPROTO)));
        let (info, delivery) = match delivered {
            Ok(delivered) => delivered,
            Err(e) => {
                let _ = sys::close(fd);
                return Err(e);
            }
        };
        match Connection::new(info, Endpoint::Server, self.family, delivery, Blocking::from_flags(flags)) {
            Ok(conn) => {
                self.inherit(listening, fd, &conn);
                Ok(Some(Accepted { fd, peer: info.peer, conn }))
            }
            Err(e) => {
                let _ = sys::close(fd);
                Err(e)
            }
        }
    }
}

impl Listener {
    /// The program set an option on the listening socket: read them again
    /// at the next accept.
    pub fn options_changed(&self) {
        *self.inherited.lock() = None;
    }

    /// Does the daemon deliver connections on a channel now?
    pub fn attached(&self) -> bool {
        self.channel.load().is_some()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let spare = *self.spare.get_mut();
        if spare != NO_SPARE {
            let _ = sys::close(spare as i32 as RawFd);
        }
        let retry = self.retry.get_mut();
        if !self.channel.load().is_some() && !retry.refused {
            DETACHED.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Why a listener could not be registered.
enum NotTaken {
    /// The daemon refused it, with this errno.
    Refused(Errno),
    /// No daemon answered (none runs, it went away, it answered nonsense),
    /// or the channel could not be made here.
    NoDaemon,
}

/// A new listener channel with `local` registered on it, taking kits
/// where the daemon gives them.
fn open_channel(local: SocketAddrV4, backlog: i32) -> Result<Attached, NotTaken> {
    let backlog = backlog as u32;
    if kits::wanted() {
        // Dropping the channel on failure closes it.
        let channel = Channel::open().map_err(|_| NotTaken::NoDaemon)?;
        match channel.exchange(&Message::ListenKits { local, backlog }, None) {
            Ok(mut reply) => {
                return match reply.message {
                    Message::ListenOkKits => {
                        let bell = std::mem::replace(&mut reply.fds[0], -1);
                        let kit_channel = std::mem::replace(&mut reply.fds[1], -1);
                        let kits = ServerKits::new(channel.fd(), bell, kit_channel).ok();
                        if kits.is_none() {
                            let _ = channel.send_only(&Message::NoKits);
                        }
                        Ok(Attached { channel, kits })
                    }
                    Message::ListenOk => Ok(Attached { channel, kits: None }),
                    Message::Refused { errno } => Err(NotTaken::Refused(Errno(errno))),
                    _ => Err(NotTaken::NoDaemon),
                };
            }
            // A daemon older than kits closes the channel on `ListenKits`
            // (as one that refuses the attachment does): the listener
            // tries again later, asking as before.
            Err(e) => {
                if e == Errno(libc::ECONNABORTED) {
                    kits::daemon_is_old();
                }
                return Err(NotTaken::NoDaemon);
            }
        }
    }
    let channel = Channel::open().map_err(|_| NotTaken::NoDaemon)?;
    let reply = channel.exchange(&Message::Listen { local, backlog }, None).map_err(|_| NotTaken::NoDaemon)?;
    match reply.message {
        Message::ListenOk => Ok(Attached { channel, kits: None }),
        Message::Refused { errno } => Err(NotTaken::Refused(Errno(errno))),
        _ => Err(NotTaken::NoDaemon),
    }
}

#[cfg(test)]
mod tests {
    //! A listener whose channel's far end plays the daemon, in one process.
    use super::*;
    use crate::accept::{self, Client};
    use crate::table;
    use std::net::TcpListener;
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd};
    use std::sync::mpsc;
    use std::time::Duration;
    use vsocket_abi::control::{ConnectionInfo, MAX_MESSAGE};
    use vsocket_ring::Segment;

    /// A registered listener (as `Listener::register` makes it) and the
    /// daemon's end of its channel.
    fn listener() -> (Listener, OwnedFd) {
        let (ours, daemon) = sys::seqpacket_pair().unwrap();
        let listener = Listener {
            channel: ArcSwapOption::new(Some(Arc::new(Attached {
                channel: Channel::from_connected(ours),
                kits: None,
            }))),
            retry: forksafe::Mutex::new(Retry {
                local: "10.0.0.3:5432".parse().unwrap(),
                backlog: 8,
                due_ms: 0,
                wait_ms: RETRY_FIRST_MS,
                refused: false,
                retired: Vec::new(),
            }),
            family: Family::V4,
            spinner: Spinner::new(),
            retired_kits: AtomicBool::new(false),
            kits_first: AtomicU64::new(0),
            spare: AtomicI64::new(NO_SPARE),
            inherited: forksafe::Mutex::new(None),
        };
        (listener, daemon)
    }

    /// What the daemon sends a listener for one connection: `Incoming` and
    /// its descriptors, of which the first `count` are sent.
    fn send_incoming(daemon: BorrowedFd<'_>, id: u64, count: usize) {
        let ring_size = 4096;
        let (daemon_view, files) = Segment::create(ring_size).unwrap();
        drop(daemon_view);
        let [own, peer] = files.clone_for(Endpoint::Server).unwrap();
        let (bell, far_bell) = std::os::unix::net::UnixStream::pair().unwrap();
        let (holds, _held) = std::os::unix::net::UnixStream::pair().unwrap();
        let info = ConnectionInfo {
            id,
            local: "10.0.0.3:5432".parse().unwrap(),
            peer: "10.0.0.2:40000".parse().unwrap(),
            ring_size,
        };
        let mut buf = [0u8; MAX_MESSAGE];
        let bytes = Message::Incoming(info).encode(&mut buf);
        // In the order of FD_SEGMENT, FD_DOORBELL, FD_LIFELINE, FD_PEER_SEGMENT.
        let fds = [own.as_fd(), bell.as_fd(), holds.as_fd(), peer.as_fd()];
        vsocket_sys::send_with_fds(daemon, bytes, &fds[..count]).unwrap();
        drop(far_bell);
    }

    /// The kernel's listening socket beside the channel (blocking).
    fn kernel_listener() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").unwrap()
    }

    fn forget(accepted: Accepted) {
        let _ = sys::close(accepted.fd);
    }

    #[test]
    fn a_delivery_cut_short_loses_one_connection_not_the_listener() {
        // The kernel cuts SCM_RIGHTS short (MSG_CTRUNC) when the receiving
        // process has no free descriptor for them. That connection is lost,
        // but the channel still works: the listener must keep taking
        // vSocket connections rather than become a kernel listener for
        // good, with the daemon still queueing clients on a channel no one
        // reads.
        let (listener, daemon) = listener();
        let kernel = kernel_listener();
        send_incoming(daemon.as_fd(), 1, 3);
        assert_eq!(listener.take_pending(kernel.as_raw_fd(), 0).err(), Some(Errno(libc::EMFILE)));
        assert!(listener.attached(), "one unusable delivery detached the listener");
        send_incoming(daemon.as_fd(), 2, CONNECTION_FDS);
        let accepted = listener.take_pending(kernel.as_raw_fd(), 0).unwrap().expect("the next connection");
        assert_eq!(accepted.peer, "10.0.0.2:40000".parse().unwrap());
        forget(accepted);
    }

    #[test]
    fn only_the_channel_s_end_detaches() {
        for (errno, miss) in [
            (libc::EAGAIN, Miss::Empty),
            (libc::ECONNABORTED, Miss::ChannelGone),
            (libc::ECONNRESET, Miss::ChannelGone),
            (libc::EBADF, Miss::ChannelGone),
            (libc::EMFILE, Miss::DeliveryLost(Errno(libc::EMFILE))),
            (libc::EPROTO, Miss::DeliveryLost(Errno(libc::EPROTO))),
            (libc::ENOMEM, Miss::DeliveryLost(Errno(libc::ENOMEM))),
        ] {
            assert_eq!(Miss::of(Errno(errno)), miss, "errno {errno}");
        }
    }

    #[test]
    fn the_channel_s_end_makes_a_kernel_listener() {
        let (listener, daemon) = listener();
        let kernel = kernel_listener();
        drop(daemon);
        assert!(listener.take_pending(kernel.as_raw_fd(), 0).unwrap().is_none());
        assert!(!listener.attached(), "vsocketd is gone: only kernel clients remain");
    }

    #[test]
    fn a_spare_program_socket_becomes_the_lowest_free_descriptor_with_the_accepts_flags() {
        let (listener, _daemon) = listener();
        let flags_of = |fd: RawFd| {
            let status = sys::fcntl(fd, libc::F_GETFL, 0).unwrap() as i32 & libc::O_NONBLOCK != 0;
            let cloexec = sys::fcntl(fd, libc::F_GETFD, 0).unwrap() as i32 & libc::FD_CLOEXEC != 0;
            (status, cloexec)
        };
        // A descriptor of the test's own, copied the way the spare is.
        let mine = kernel_listener();
        for (made_for, taken_with) in [
            (0, libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC),
            (libc::SOCK_NONBLOCK, 0),
            (libc::SOCK_NONBLOCK, libc::SOCK_NONBLOCK),
        ] {
            listener.make_spare(made_for);
            let spare = listener.spare.load(Ordering::Acquire);
            assert_ne!(spare, NO_SPARE);
            let spare_fd = spare as i32 as RawFd;
            // Where `socket` would put the program's socket now.
            let lowest = sys::fcntl(mine.as_raw_fd(), libc::F_DUPFD, 0).unwrap() as RawFd;
            sys::close(lowest).unwrap();
            assert!(spare_fd > lowest, "the spare waits out of the program's way");
            let fd = listener.program_socket(taken_with).unwrap();
            assert_eq!(fd, lowest);
            assert_eq!(listener.spare.load(Ordering::Acquire), NO_SPARE, "taken");
            assert_eq!(
                flags_of(fd),
                (taken_with & libc::SOCK_NONBLOCK != 0, taken_with & libc::SOCK_CLOEXEC != 0),
                "made for {made_for:#x}, taken with {taken_with:#x}"
            );
            assert_eq!(sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE), Ok(libc::SOCK_STREAM));
            assert!(sys::fcntl(spare_fd, libc::F_GETFD, 0).is_err(), "the spare's own number is closed");
            sys::close(fd).unwrap();
        }
        // Without one, a socket is made as before; a forked child closes
        // its copy of the parent's.
        let fd = listener.program_socket(0).unwrap();
        assert_eq!(sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE), Ok(libc::SOCK_STREAM));
        sys::close(fd).unwrap();
        listener.make_spare(0);
        let spare_fd = listener.spare.load(Ordering::Acquire) as i32 as RawFd;
        let mut spared = Vec::new();
        listener.internal_fds(|fd| spared.push(fd));
        assert!(spared.contains(&spare_fd), "listed among the library's own (close_range spares them)");
        listener.forget_spare_in_child();
        assert_eq!(listener.spare.load(Ordering::Acquire), NO_SPARE);
        assert!(sys::fcntl(spare_fd, libc::F_GETFD, 0).is_err());
    }

    /// Runs a blocking accept on `listener` and `kernel` in a thread; its
    /// result comes on the returned channel (a hung accept never sends).
    fn accept_in_thread(listener: Arc<Listener>, kernel: Arc<TcpListener>) -> mpsc::Receiver<SysResult<Client>> {
        let (done, result) = mpsc::channel();
        std::thread::spawn(move || {
            let fd = kernel.as_raw_fd();
            let kernel_accept = || {
                kernel.accept().map(|(s, _)| s.into_raw_fd()).map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)))
            };
            let _ = done.send(accept::accept(fd, &listener, 0, kernel_accept));
        });
        result
    }

    #[test]
    fn a_sleeping_blocking_accept_wakes_for_a_vsocket_client() {
        let (listener, daemon) = listener();
        let kernel = Arc::new(kernel_listener());
        let result = accept_in_thread(Arc::new(listener), kernel);
        std::thread::sleep(Duration::from_millis(300));
        send_incoming(daemon.as_fd(), 3, CONNECTION_FDS);
        match result.recv_timeout(Duration::from_secs(10)).expect("accept still asleep") {
            Ok(Client::Vsocket { fd, .. }) => {
                table::release(fd);
                let _ = sys::close(fd);
            }
            Ok(Client::Kernel(_)) => panic!("a kernel client, none connected"),
            Err(e) => panic!("accept failed: {e:?}"),
        }
    }

    #[test]
    fn a_blocking_accept_ends_at_the_listening_socket_s_receive_timeout() {
        // Linux's accept honours SO_RCVTIMEO on the listening socket: EAGAIN.
        let (listener, _daemon) = listener();
        let kernel = Arc::new(kernel_listener());
        sys::setsockopt_timeout_ms(kernel.as_raw_fd(), libc::SO_RCVTIMEO, 200).unwrap();
        let result = accept_in_thread(Arc::new(listener), kernel);
        let outcome = result.recv_timeout(Duration::from_secs(10)).expect("accept slept past its timeout");
        assert!(matches!(outcome, Err(Errno(libc::EAGAIN))), "{:?}", outcome.err());
    }
}
