//! The local end of a relayed connection: the guest's rings as the relay
//! sees them, and how the two wake each other.
//!
//! The relay copies between a guest's rings and a transport; it does not
//! care how those rings reach the guest. [`LocalEnd`] is that seam. A
//! namespace guest's connection ([`SegmentEnd`]) is a sealed memfd
//! segment mapped by the daemon and the guest, with a doorbell socket pair
//! and a lifeline pipe; a VM guest's connection would carve its rings out
//! of the VM's memory region and carry its wake-ups over the VM's
//! attachment, behind the same trait.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use vsocket_abi::layout::Endpoint;
use vsocket_ring::{Consumer, Producer, Segment};

/// What the relay heard from the guest when its bell went off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// The guest wrote or read: look at its rings.
    Rang,
    /// Every process holding the guest's end has let go of it (closed it,
    /// or died): nothing more will come from that side.
    LetGo,
}

impl Heard {
    /// Takes what came on a doorbell socket `bell`: wake-up bytes (a
    /// bounded amount: a guest cannot keep the caller here), or its end
    /// (every holder of the other end gone).
    pub fn from_bell(bell: BorrowedFd<'_>) -> Heard {
        if vsocket_sys::drain_bell(bell) {
            Heard::LetGo
        } else {
            Heard::Rang
        }
    }
}

/// The relay's end of one guest connection on this host.
///
/// Everything behind the rings is the guest's memory: every index read
/// from them is hostile input, checked by the ring crate.
pub trait LocalEnd: Send {
    /// The ring the guest writes and the relay reads.
    fn outbound(&self) -> Consumer<'_>;
    /// The ring the relay writes and the guest reads.
    fn inbound(&self) -> Producer<'_>;
    /// The size of each ring: the window this side offers its peer.
    fn window(&self) -> u32;
    /// Wakes the guest (waiting on either ring, or to learn of an end).
    fn wake(&self);
    /// Wakes the guest if a ring operation said it must.
    fn wake_if(&self, needed: bool) {
        if needed {
            self.wake();
        }
    }
    /// What the relay watches in its epoll set (for reading) to hear the
    /// guest.
    fn bell(&self) -> BorrowedFd<'_>;
    /// Takes what the guest signalled since the last call.
    fn hear(&self) -> Heard;
}

/// What holds a connection's rings for the daemon: a segment of its own,
/// or (a VM's) a piece of a region.
pub trait Rings: Send {
    fn segment(&self) -> &Segment;
}

impl Rings for Segment {
    fn segment(&self) -> &Segment {
        self
    }
}

/// The daemon's end of a guest's connection: its rings (`S`: a namespace
/// guest's segment both map, or a piece of a VM's region), a doorbell (a
/// socket pair's end, or a VM's bell stream) and the daemon's lifeline.
pub struct SegmentEnd<S = Segment> {
    rings: S,
    /// The relay's endpoint of the segment: the one its guest is not.
    mine: Endpoint,
    /// The relay's end of the doorbell; it reads as closed once every
    /// process holding the guest's end is gone.
    bell: OwnedFd,
    /// Write end of the daemon's lifeline, where the connection's record
    /// has one for this end: dropping it (with this end) tells the reaper
    /// the daemon's end is done.
    _holds: Option<OwnedFd>,
}

impl SegmentEnd {
    /// The relay's end `mine` of `segment`, with its doorbell end `bell`
    /// and lifeline write end `holds`.
    pub fn new(segment: Segment, mine: Endpoint, bell: OwnedFd, holds: OwnedFd) -> SegmentEnd {
        SegmentEnd::with(segment, mine, bell, Some(holds))
    }
}

impl<S: Rings> SegmentEnd<S> {
    /// The daemon's end `mine` of `rings`, with its doorbell `bell` and
    /// lifeline write end `holds`, if any.
    pub fn with(rings: S, mine: Endpoint, bell: OwnedFd, holds: Option<OwnedFd>) -> SegmentEnd<S> {
        SegmentEnd { rings, mine, bell, _holds: holds }
    }
}

impl<S: Rings> LocalEnd for SegmentEnd<S> {
    fn outbound(&self) -> Consumer<'_> {
        self.rings.segment().consumer(self.mine.rx_ring())
    }

    fn inbound(&self) -> Producer<'_> {
        self.rings.segment().producer(self.mine.tx_ring())
    }

    fn window(&self) -> u32 {
        self.rings.segment().ring_size()
    }

    fn wake(&self) {
        vsocket_sys::ring(self.bell.as_fd());
    }

    fn bell(&self) -> BorrowedFd<'_> {
        self.bell.as_fd()
    }

    fn hear(&self) -> Heard {
        Heard::from_bell(self.bell.as_fd())
    }
}
