//! An end's segment halves, sent again to a process that proves it holds
//! that end.
//!
//! A process keeps no descriptor of a connection's memory once it has
//! mapped it (the library closes both halves: a connection costs the
//! program's process its socket, its doorbell and its lifeline, no more).
//! exec keeps descriptors and drops mappings, so a new program image that
//! inherits a connection has the doorbell and lifeline but not the memory:
//! it sends `Reattach{id, end}` with the write end of that end's lifeline,
//! and gets the halves back.
//!
//! The lifeline is the proof. The daemon made it for this connection and
//! gave its write end only to the processes at its two ends; a process
//! holds it only if it (or an ancestor that passed it on) was given it,
//! and it is the same pipe as the read end the record keeps (same file).
//! The end asked for must be the requesting guest's, so between two
//! guests each gets only its own end's halves, which let it do no more
//! than the mapping it had. A guest that asks for another connection's
//! halves, or for another guest's end, or without a lifeline, or with
//! another pipe, is refused and gets nothing.

use crate::daemon::Daemon;
use crate::guest::GuestSlot;
use crate::ids::ConnectionId;
use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use vsocket_abi::layout::Endpoint;
use vsocket_ring::Segment;

/// Why the halves are not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// no such connection
    Unknown,
    /// the request came without the end's lifeline, or with another file
    NoProof,
    /// the end belongs to another guest
    OtherGuest,
    /// the connection's memory is a piece of a VM's region, which has no descriptors
    Placed,
    /// the halves cannot be duplicated: {0}
    Io(i32),
}

impl Refusal {
    /// What the library's request fails with.
    pub fn errno(&self) -> i32 {
        match self {
            Refusal::Unknown => libc::ENOENT,
            Refusal::NoProof | Refusal::OtherGuest => libc::EPERM,
            Refusal::Placed => libc::EOPNOTSUPP,
            Refusal::Io(errno) => *errno,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Unknown => f.write_str("no such connection"),
            Refusal::NoProof => f.write_str("the request came without the end's lifeline, or with another file"),
            Refusal::OtherGuest => f.write_str("the end belongs to another guest"),
            Refusal::Placed => f.write_str("the connection's memory is a piece of a VM's region"),
            Refusal::Io(errno) => write!(f, "the halves cannot be duplicated: errno {errno}"),
        }
    }
}

/// End `end` of connection `id`'s halves (its own, then its peer's), for a
/// process of `guest` that sent `proof` with its request; for a kit's
/// piece of a chunk, the chunk's files and which piece.
pub fn halves(
    daemon: &Daemon,
    guest: &Arc<GuestSlot>,
    id: ConnectionId,
    end: Endpoint,
    proof: Option<OwnedFd>,
) -> Result<([OwnedFd; 2], Option<u8>), Refusal> {
    let proof = proof.ok_or(Refusal::NoProof)?;
    let shown = Segment::identity(proof.as_fd()).map_err(|_| Refusal::NoProof)?;
    daemon
        .connections
        .with(id, |record| {
            let owner = match end {
                Endpoint::Client => &record.client,
                Endpoint::Server => &record.server,
            };
            if !Arc::ptr_eq(owner, guest) {
                return Err(Refusal::OtherGuest);
            }
            // One lifeline serves both ends (a record handed over by an
            // older daemon has one per end): a process that holds one end
            // may be sent the other's halves only where both ends are the
            // same guest's (checked above), whose processes vSocket does
            // not keep from each other.
            let held = record.lifelines.iter().any(|l| Segment::identity(l.as_fd()).is_ok_and(|id| id == shown));
            if !held {
                return Err(Refusal::NoProof);
            }
            let io = |e: std::io::Error| Refusal::Io(e.raw_os_error().unwrap_or(libc::EIO));
            match &record.memory {
                crate::connections::Memory::Files { files, .. } => Ok((files.clone_for(end).map_err(io)?, None)),
                crate::connections::Memory::Piece { piece, .. } => {
                    Ok((piece.chunk.files().clone_for(end).map_err(io)?, Some(piece.index)))
                }
                crate::connections::Memory::Placed(_) => Err(Refusal::Placed),
            }
        })
        .unwrap_or(Err(Refusal::Unknown))
}
