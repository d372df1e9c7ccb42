//! Connection memory as sealed memfds: the daemon sends each end the
//! segment's two halves (its own read-write, the peer's read-only), mapped
//! here; the mapping is kept for reuse when the connection goes (see
//! `segcache`). The halves' descriptors are closed once mapped: a
//! connection costs the process three descriptors (the program's socket,
//! the doorbell, the lifeline), so ten thousand connections fit in a
//! process's limit. A new program image after exec, which inherits the
//! connection's descriptors but not its mapping, asks the daemon for the
//! halves again (`attach::reattach`, see `exec`).
//!
//! In a VM guest the memory is instead a piece of the VM's region, placed
//! by the daemon at the offset its message gives ([`Given::Placed`]),
//! mapped from the region's device file (see `attach::region`); such a
//! mapping has no descriptors and is not kept.

use super::{segcache, ConnectionMemory, Wakeups};
use crate::sys::{self, SysResult};
use std::os::fd::RawFd;
use vsocket_abi::control::ConnectionInfo;
use vsocket_abi::layout::Endpoint;
use vsocket_ring::Segment;

/// Where a delivered connection's memory is, before it is mapped.
pub enum Given {
    /// The segment's halves: this end's (read-write) and the peer's
    /// (read-only), closed once mapped.
    Halves { own: RawFd, peer: RawFd },
    /// A kit's end after exec: its chunk's files (this end's, the
    /// peer's), of which its memory is piece `piece`.
    ChunkFiles { own: RawFd, peer: RawFd, piece: u8 },
    /// A kit: its piece of a chunk this process maps (see `kits`).
    Piece(Segment),
    /// In a VM guest: the offset of the connection's piece of the region.
    Placed(u64),
    /// Mapped already (or nothing).
    Taken,
}

/// What comes with `Connected` or `Incoming` (or a kit, or after exec):
/// the connection's memory and wake-up descriptors; those not taken are
/// closed when it goes.
pub struct Delivery {
    pub memory: Given,
    pub doorbell: RawFd,
    /// The connection's own lifeline, or a share of one (a kit's batch's,
    /// or one that crossed exec with several connections).
    pub lifeline: Option<std::sync::Arc<super::Lifeline>>,
    /// A kit's: where its doorbell may be parked when the connection made
    /// from it closes (see `bells`).
    pub park: Option<crate::bells::ParkAt>,
}

impl Delivery {
    /// What came with a `Connected` or `Incoming`: the segment's halves,
    /// the doorbell and the lifeline.
    pub fn of_segment(own: RawFd, peer: RawFd, doorbell: RawFd, lifeline: RawFd) -> Delivery {
        Delivery {
            memory: Given::Halves { own, peer },
            doorbell,
            lifeline: super::Lifeline::take(lifeline),
            park: None,
        }
    }

    /// A connection whose memory is `memory`, with its doorbell and a
    /// share of a lifeline.
    pub fn of(memory: Given, doorbell: RawFd, lifeline: Option<std::sync::Arc<super::Lifeline>>) -> Delivery {
        Delivery { memory, doorbell, lifeline, park: None }
    }

    /// A kit's, whose doorbell may be parked in piece `at` (see `bells`).
    pub fn parked_at(mut self, at: crate::bells::ParkAt) -> Delivery {
        self.park = Some(at);
        self
    }

    /// Takes the wake-up descriptors.
    pub fn take_wakeups(&mut self) -> Wakeups {
        Wakeups { doorbell: std::mem::replace(&mut self.doorbell, -1), lifeline: self.lifeline.take() }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        // (The lifeline goes with its last share.)
        let halves = match self.memory {
            Given::Halves { own, peer } | Given::ChunkFiles { own, peer, .. } => [own, peer],
            Given::Piece(_) | Given::Placed(_) | Given::Taken => [-1, -1],
        };
        for fd in halves.into_iter().chain([self.doorbell]) {
            if fd >= 0 {
                let _ = sys::close(fd);
            }
        }
    }
}

/// A connection's mapping of its segment, kept for reuse when the
/// connection goes (see `segcache`).
pub struct MemfdSegment {
    segment: Option<Segment>,
    /// The segment's files (this end's half and the peer's), if the
    /// mapping is kept for reuse when the connection goes: not a kit's
    /// piece of a chunk (the chunk's mapping is shared by its kits).
    files: Option<segcache::Files>,
    /// The process that mapped it: a forked child, which inherits the
    /// mapping of a connection its parent goes on using, must not keep it
    /// (the parent's later connections may get the segment). 0 for a piece
    /// of a VM's region, which the daemon cannot send again after exec.
    owner: i32,
}

impl MemfdSegment {
    /// Can a new program image map this memory again after exec?
    pub fn remap(&self) -> Remap {
        if self.owner == 0 {
            Remap::Never
        } else {
            Remap::FromDaemon
        }
    }
}

/// Whether a new program image can map a connection's memory again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remap {
    /// The daemon sends its halves again (see `attach::reattach`).
    FromDaemon,
    /// A piece of a VM's region, which no descriptor carries: the
    /// connection ends at the exec.
    Never,
}

impl std::ops::Deref for MemfdSegment {
    type Target = Segment;
    fn deref(&self) -> &Segment {
        self.segment.as_ref().expect("mapped until dropped")
    }
}

impl Drop for MemfdSegment {
    fn drop(&mut self) {
        if let (Some(segment), Some(files)) = (self.segment.take(), self.files) {
            if sys::getpid() == self.owner {
                segcache::put(files, segment);
            }
        }
    }
}

impl ConnectionMemory for MemfdSegment {
    fn map(delivery: &mut Delivery, info: &ConnectionInfo, end: Endpoint) -> SysResult<MemfdSegment> {
        let (own_fd, peer_fd, piece) = match std::mem::replace(&mut delivery.memory, Given::Taken) {
            Given::Placed(offset) => {
                let segment = super::region::map(offset, info, end)?;
                return Ok(MemfdSegment { segment: Some(segment), files: None, owner: 0 });
            }
            Given::Piece(segment) => {
                // A kit: its piece was viewed (and its headers checked)
                // when its batch came; the header names the connection.
                if segment.ring_size() != info.ring_size || segment.connection_id(end.index()) != info.id {
                    return Err(sys::Errno(libc::EPROTO));
                }
                return Ok(MemfdSegment { segment: Some(segment), files: None, owner: sys::getpid() });
            }
            Given::Halves { own, peer } => (own, peer, None),
            Given::ChunkFiles { own, peer, piece } => (own, peer, Some(piece)),
            Given::Taken => (-1, -1, None),
        };
        if own_fd < 0 || peer_fd < 0 {
            for fd in [own_fd, peer_fd].into_iter().filter(|&fd| fd >= 0) {
                let _ = sys::close(fd);
            }
            return Err(sys::Errno(libc::EBADF));
        }
        let mapped = sys::with_borrowed(own_fd, |own| {
            sys::with_borrowed(peer_fd, |peer| match piece {
                // A kit's end after exec: its piece alone, not kept.
                Some(piece) => Segment::map_piece(own, peer, piece as usize, info.ring_size, end).map(|s| (s, None)),
                None => map_halves(own, peer, info, end).map(|(s, files)| (s, Some(files))),
            })
        });
        let _ = sys::close(own_fd);
        let _ = sys::close(peer_fd);
        match mapped {
            Ok((segment, files)) => Ok(MemfdSegment { segment: Some(segment), files, owner: sys::getpid() }),
            Err(_) => Err(sys::Errno(libc::EPROTO)),
        }
    }
}

/// Maps the halves the daemon sent to end `end` of connection `info`
/// (`own` read-write, `peer` read-only), or takes back a mapping of the
/// same segment this process kept.
fn map_halves(
    own: std::os::fd::BorrowedFd<'_>,
    peer: std::os::fd::BorrowedFd<'_>,
    info: &ConnectionInfo,
    end: Endpoint,
) -> std::io::Result<(Segment, segcache::Files)> {
    let files = (Segment::identity(own)?, Segment::identity(peer)?);
    let segment = match segcache::take(own, peer, files, info, end) {
        Some(kept) => kept,
        None => Segment::map(own, peer, info.ring_size, end)?,
    };
    Ok((segment, files))
}
