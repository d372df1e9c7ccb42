//! The namespace attachment: a guest that is a network namespace on this
//! host.
//!
//! Each guest has a unix SOCK_SEQPACKET control socket of its own under
//! the run directory; every process that connects to guest G's socket must
//! live in G's network namespace (the pid from SO_PEERCRED, then the
//! namespace of /proc/PID/ns/net). A connection's memory and wake-ups
//! travel as descriptors (SCM_RIGHTS) with the control messages.

use super::{Attachment, ProcessChannel, RecvError, Refused, Request};
use crate::channel::{Channel, Handover};
use crate::guest::GuestSlot;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;
use vsocket_abi::control::{Message, MAX_MESSAGE};

/// A guest's control socket.
#[derive(Debug)]
pub struct NamespaceAttachment {
    listener: OwnedFd,
}

impl NamespaceAttachment {
    /// Creates guest `slot`'s control socket under `run_dir`.
    pub fn open(run_dir: &Path, slot: &GuestSlot) -> io::Result<NamespaceAttachment> {
        std::fs::create_dir_all(run_dir.join("guests"))?;
        let path = crate::guest_socket_path(run_dir, &slot.name);
        let listener = vsocket_sys::seqpacket_listen(&path, 1024)
            .map_err(|e| io::Error::new(e.kind(), format!("control socket {}: {e}", path.display())))?;
        // Processes inside guests may run as any user; the namespace check
        // is what keeps one guest out of another's socket.
        vsocket_sys::chmod(&path, 0o666)?;
        Ok(NamespaceAttachment { listener })
    }
}

impl NamespaceAttachment {
    /// Serves a control socket a predecessor daemon made (a hand-over).
    pub fn inherit(listener: OwnedFd) -> NamespaceAttachment {
        NamespaceAttachment { listener }
    }
}

impl Attachment for NamespaceAttachment {
    type Channel = SeqpacketChannel;

    fn accept(&self) -> io::Result<SeqpacketChannel> {
        vsocket_sys::accept(self.listener.as_fd()).map(SeqpacketChannel)
    }

    /// Is the process behind `channel` inside the guest's network namespace?
    fn verify(&self, guest: &GuestSlot, channel: &SeqpacketChannel) -> Result<(), Refused> {
        let pid = vsocket_sys::peer_pid(channel.0.as_fd()).map_err(Refused::NoCredentials)?;
        let expected = vsocket_sys::netns_id(&crate::netns_path(&guest.netns))
            .map_err(|error| Refused::NamespaceUnavailable { netns: guest.netns.clone(), error })?;
        let actual = vsocket_sys::process_netns(pid).map_err(|error| Refused::ProcessUnreadable { pid, error })?;
        if actual != expected {
            return Err(Refused::OtherNamespace { pid, netns: guest.netns.clone() });
        }
        Ok(())
    }

    fn handle(&self) -> io::Result<OwnedFd> {
        self.listener.try_clone()
    }
}

/// One process's channel: a connected SOCK_SEQPACKET socket, one message
/// per packet, descriptors by SCM_RIGHTS.
#[derive(Debug)]
pub struct SeqpacketChannel(OwnedFd);

impl Channel for SeqpacketChannel {
    fn send(&self, message: &Message, handover: Option<Handover<'_>>) -> io::Result<()> {
        let mut buf = [0u8; MAX_MESSAGE];
        let bytes = message.encode(&mut buf);
        match handover {
            Some(handover) => vsocket_sys::send_with_fds(self.0.as_fd(), bytes, &handover.fds()),
            None => vsocket_sys::send_with_fds(self.0.as_fd(), bytes, &[]),
        }
    }

    fn send_fds(&self, message: &Message, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let mut buf = [0u8; MAX_MESSAGE];
        vsocket_sys::send_with_fds(self.0.as_fd(), message.encode(&mut buf), fds)
    }
}

impl ProcessChannel for SeqpacketChannel {
    fn next_message(&self) -> Result<Option<Request>, RecvError> {
        let mut buf = [0u8; MAX_MESSAGE];
        let (n, mut fds) = vsocket_sys::recv_with_fds(self.0.as_fd(), &mut buf).map_err(RecvError::Io)?;
        if n == 0 {
            return Ok(None);
        }
        let message = Message::decode(&buf[..n]).map_err(RecvError::Malformed)?;
        if fds.len() != message.fd_count() || fds.len() > 1 {
            return Err(RecvError::Descriptors);
        }
        Ok(Some(Request { message, proof: fds.pop() }))
    }

    fn send_halves(&self, halves: [BorrowedFd<'_>; 2], piece: Option<u8>) -> io::Result<()> {
        let mut buf = [0u8; MAX_MESSAGE];
        let reply = match piece {
            None => Message::Reattached,
            Some(piece) => Message::ReattachedAt { piece },
        };
        vsocket_sys::send_with_fds(self.0.as_fd(), reply.encode(&mut buf), &halves)
    }

    fn handle(&self) -> io::Result<OwnedFd> {
        self.0.try_clone()
    }

    fn set_send_timeout(&self, timeout: Duration) -> io::Result<()> {
        vsocket_sys::set_send_timeout(self.0.as_fd(), timeout)
    }

    fn try_clone(&self) -> io::Result<SeqpacketChannel> {
        self.0.try_clone().map(SeqpacketChannel)
    }
}
