//! A process's channel to the daemon, as the rest of the daemon sees it.
//!
//! How a guest's processes reach vsocketd and prove who they are is an
//! attachment's business ([`crate::attach`]); once a process is attached,
//! the broker only asks its [`Channel`] to carry a control message and, with
//! a connection, the [`Handover`] of that connection's end.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use vsocket_abi::control::Message;

/// What a process needs to use one end of a connection, in the order the
/// descriptors travel with `Connected` and `Incoming` (the library's
/// `control` reads them in this order): its own half of the connection's
/// memory (read-write), the doorbell its peer rings, the write end of its
/// lifeline (held while any process holds this end), and the peer's half
/// (read-only).
#[derive(Debug, Clone, Copy)]
pub struct Handover<'a> {
    pub own_half: BorrowedFd<'a>,
    pub bell: BorrowedFd<'a>,
    pub holds: BorrowedFd<'a>,
    pub peer_half: BorrowedFd<'a>,
}

impl Handover<'_> {
    /// The descriptors in the order they travel.
    pub fn fds(&self) -> [BorrowedFd<'_>; 4] {
        [self.own_half, self.bell, self.holds, self.peer_half]
    }
}

/// A [`Handover`]'s descriptors, owned (a reply sent after the connection
/// is recorded).
#[derive(Debug)]
pub struct EndFiles {
    pub own_half: OwnedFd,
    pub bell: OwnedFd,
    pub holds: OwnedFd,
    pub peer_half: OwnedFd,
}

impl EndFiles {
    /// The descriptors in the order they travel.
    pub fn fds(&self) -> [BorrowedFd<'_>; 4] {
        [self.own_half.as_fd(), self.bell.as_fd(), self.holds.as_fd(), self.peer_half.as_fd()]
    }

    pub fn handover(&self) -> Handover<'_> {
        Handover {
            own_half: self.own_half.as_fd(),
            bell: self.bell.as_fd(),
            holds: self.holds.as_fd(),
            peer_half: self.peer_half.as_fd(),
        }
    }
}

/// One end's descriptors of a kit: its doorbell (its memory is its
/// chunk's, its lifeline its batch's), none when the kit uses the one its
/// piece's ends kept (ARCHITECTURE §3c, stage 6).
pub struct KitEnds {
    pub bell: Option<OwnedFd>,
}

impl KitEnds {
    pub fn fds(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.bell.as_ref().map(AsFd::as_fd)
    }
}

/// A channel to one process of a guest.
pub trait Channel: Send + Sync + std::fmt::Debug {
    /// Sends `message`, with `handover` if it carries a connection. Waits
    /// at most the channel's send timeout for room (`WouldBlock` then).
    fn send(&self, message: &Message, handover: Option<Handover<'_>>) -> io::Result<()>;

    /// Sends `message` with the descriptors `fds` (a batch of kits, or a
    /// bell), as [`send`](Self::send) waits. Only a channel that carries
    /// descriptors can.
    fn send_fds(&self, _message: &Message, _fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "this channel carries no descriptors"))
    }
}
