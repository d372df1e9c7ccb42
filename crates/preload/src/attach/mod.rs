//! Attachments: how this process reaches vsocketd and proves who it is,
//! and how a connection's memory and wake-ups reach it.
//!
//! Two seams, each with today's one implementation, chosen here:
//! - [`ControlChannel`]: a channel to vsocketd that carries control
//!   messages and whatever comes with them. Today a unix SOCK_SEQPACKET
//!   socket per guest ([`seqpacket`]): the daemon knows the guest by the
//!   socket and the process by SO_PEERCRED, and descriptors travel with the
//!   messages (SCM_RIGHTS).
//! - [`ConnectionMemory`]: a connection's segment, mapped from what came
//!   with `Connected` or `Incoming`. Today two sealed memfds ([`memfd`]),
//!   whose mappings this process keeps for reuse ([`segcache`]).
//!
//! Wake-ups reach a connection as [`Wakeups`]: a doorbell that polls
//! readable when the peer rings, and a lifeline whose closing tells the
//! daemon that this process let go.
//!
//! A VM guest (a byte stream over vsock, no descriptors passed, memory
//! carved from one region per guest at offsets the messages carry) is
//! another implementation of each seam, not a branch in their users.

mod memfd;
pub mod region;
pub mod segcache;
mod seqpacket;

use crate::sys::{Errno, SysResult};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use vsocket_abi::control::{ConnectionInfo, Message};
use vsocket_abi::layout::Endpoint;
use vsocket_ring::Segment;

pub use memfd::{Delivery, Given, MemfdSegment, Remap};
pub use seqpacket::{control, enabled, Control, ControlSocket, Reply};
pub(crate) use seqpacket::{internal_fd_floor, receive as receive_on};

/// The control channel of this attachment.
pub type Channel = ControlSocket;
/// The connection memory of this attachment.
pub type Memory = MemfdSegment;

/// How a channel is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Receive {
    /// Waiting for the one reply to this thread's request (its channel is
    /// this process's own, and requests take turns).
    Wait,
    /// Without waiting, a channel other threads and forked processes read
    /// too: a listener's, which each accept reads.
    Shared,
}

/// A channel to vsocketd.
pub trait ControlChannel: Sized {
    /// Opens a new channel to the guest's vsocketd.
    fn open() -> SysResult<Self>;
    /// Sends `msg`, with the descriptor `proof` if it takes one (a
    /// `Reattach`'s lifeline), and waits for the one reply.
    fn exchange(&self, msg: &Message, proof: Option<RawFd>) -> SysResult<Reply>;
    /// Sends `msg` without waiting for room or for a reply (a listener's
    /// `NoKits`).
    fn send_only(&self, msg: &Message) -> SysResult<()>;
    /// Receives one message (an `Incoming`, on a listener channel).
    fn receive(&self, receive: Receive) -> SysResult<Reply>;
    /// A descriptor that polls readable when a message (or the end of the
    /// channel) waits: a listener sleeps on it beside its kernel socket.
    fn fd(&self) -> RawFd;
}

/// A connection's segment, mapped in this process.
pub trait ConnectionMemory: std::ops::Deref<Target = Segment> + Sized {
    /// Maps end `end` of connection `info`'s segment from what came with
    /// it, taking the parts of `delivery` that carry memory.
    fn map(delivery: &mut Delivery, info: &ConnectionInfo, end: Endpoint) -> SysResult<Self>;
}

/// A connection's wake-ups (library-internal descriptors).
pub struct Wakeups {
    /// Our end of the doorbell pair: readable when the peer rang, end of
    /// stream when every process holding the peer's end is gone.
    pub doorbell: RawFd,
    /// Held while this process holds the connection (none where no daemon
    /// watches, in tests). A kit's connections share their batch's.
    pub lifeline: Option<Arc<Lifeline>>,
}

/// A write end of a lifeline pipe (never written), closed when the last
/// holder in this process lets it go: a connection's own, or a kits'
/// batch's, shared by its kits and the connections made from them.
#[derive(Debug)]
pub struct Lifeline(RawFd);

impl Lifeline {
    /// Takes `fd` (-1: none).
    pub fn take(fd: RawFd) -> Option<Arc<Lifeline>> {
        (fd >= 0).then(|| Arc::new(Lifeline(fd)))
    }

    pub fn fd(&self) -> RawFd {
        self.0
    }
}

impl Drop for Lifeline {
    fn drop(&mut self) {
        let _ = crate::sys::close(self.0);
    }
}

/// The process's request channel, and the process that opened it.
struct RequestChannel {
    channel: Channel,
    pid: i32,
}

static REQUESTS: Mutex<Option<RequestChannel>> = Mutex::new(None);

/// The request channel, locked: fork's prepare handler holds it across
/// the fork (see `fork.rs`). A fork so waits for a request under way (at
/// most the reply timeout).
pub fn lock_for_fork() -> impl std::any::Any {
    REQUESTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Is the daemon that answered this process's last request still there?
/// Its request channel shows nothing readable between requests unless the
/// daemon went away (end of stream). A grant's kits are that daemon's: a
/// successor after a crash knows none of them (see `kits::take`).
pub fn daemon_still_there() -> bool {
    // Another thread's request holds the channel: it will find out.
    let guard = match REQUESTS.try_lock() {
        Ok(guard) => guard,
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return true,
    };
    let Some(requests) = guard.as_ref().filter(|r| r.pid == crate::sys::getpid()) else {
        return false;
    };
    let mut pfd = [libc::pollfd { fd: requests.channel.fd(), events: libc::POLLIN, revents: 0 }];
    crate::sys::poll(&mut pfd, 0) == Ok(0)
}

/// Sends a request on the process's request channel and returns the reply.
/// The channel is opened on first use and re-opened after fork (a shared
/// one would interleave two processes' replies). A channel that served
/// requests before and broke since (vsocketd restarted, or handed over to
/// its successor while the request waited) is opened again and the
/// request sent once more, so a connect made across a restart is not lost
/// to the kernel path. A new channel that breaks is an answer (the daemon
/// refused the attachment): the request is not sent again.
pub fn request(msg: &Message) -> SysResult<Reply> {
    request_proving(msg, None)
}

/// End `end` of connection `id`'s segment halves (this end's, the peer's),
/// sent again by the daemon to a process that shows it holds the end by
/// sending the end's `lifeline` (a new program image after exec, see
/// `exec`); for a kit's end, its chunk's files and which piece.
pub fn reattach(id: u64, end: Endpoint, lifeline: RawFd) -> SysResult<([RawFd; 2], Option<u8>)> {
    if lifeline < 0 {
        return Err(Errno(libc::EBADF));
    }
    let mut reply = request_proving(&Message::Reattach { id, end }, Some(lifeline))?;
    match reply.message {
        Message::Reattached => Ok((reply.take_halves(), None)),
        Message::ReattachedAt { piece } => Ok((reply.take_halves(), Some(piece))),
        Message::Refused { errno } => Err(Errno(errno)),
        _ => Err(Errno(libc::EPROTO)),
    }
}

fn request_proving(msg: &Message, proof: Option<RawFd>) -> SysResult<Reply> {
    let mut guard = REQUESTS.lock().unwrap_or_else(|e| e.into_inner());
    let pid = crate::sys::getpid();
    if guard.as_ref().is_some_and(|c| c.pid != pid) {
        // Inherited from our parent: its replies are not ours to read. Our
        // copy of the descriptor is closed; the parent keeps its own.
        drop(guard.take());
    }
    let reused = guard.is_some();
    for attempt in 0..2 {
        if guard.is_none() {
            *guard = Some(RequestChannel { channel: Channel::open()?, pid });
        }
        let Some(requests) = guard.as_ref() else {
            return Err(Errno(libc::EBADF));
        };
        let result = requests.channel.exchange(msg, proof);
        match result {
            Ok(reply) => return Ok(reply),
            Err(e) => {
                *guard = None;
                if !(reused && attempt == 0 && channel_broke(e)) {
                    return Err(e);
                }
            }
        }
    }
    Err(Errno(libc::ECONNABORTED))
}

/// The connection `reply` brings for end `end` (`Connected` for a client,
/// `Incoming` for a server, with its descriptors; or a VM guest's
/// `ConnectedAt`/`IncomingAt`, placed in its region, whose bell stream is
/// opened here). `None` for any other message.
pub fn delivered(reply: &mut Reply, end: Endpoint) -> Option<SysResult<(ConnectionInfo, Delivery)>> {
    match (reply.message, end) {
        (Message::Connected(info) | Message::ConnectedKits { info, .. }, Endpoint::Client)
        | (Message::Incoming(info), Endpoint::Server) => Some(Ok((info, reply.take_delivery()))),
        (Message::ConnectedAt { info, offset }, Endpoint::Client)
        | (Message::IncomingAt { info, offset }, Endpoint::Server) => {
            Some(region::delivery(info.id, end, offset).map(|delivery| (info, delivery)))
        }
        _ => None,
    }
}

/// Does `e` say the channel's daemon went away (rather than refusing)?
fn channel_broke(e: Errno) -> bool {
    matches!(e, Errno(libc::ECONNABORTED | libc::ECONNRESET | libc::EPIPE | libc::ENOTCONN))
}
