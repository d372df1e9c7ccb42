//! The namespace guest's control socket: a unix SOCK_SEQPACKET socket per
//! guest, one message per packet, descriptors by SCM_RIGHTS.
//!
//! `VSOCKET_CONTROL` names the socket (set by `vsocket run`). Without it the
//! library stays out of the way: every call goes to the kernel. The process
//! keeps one request channel (see `attach::request`); each listening
//! socket opens its own listener channel.

use super::{ControlChannel, Delivery, Receive};
use crate::sys::{self, Errno, SysResult};
use std::os::fd::RawFd;
use std::sync::OnceLock;
use vsocket_abi::control::{
    Message, CONNECTION_FDS, FD_DOORBELL, FD_LIFELINE, FD_PEER_SEGMENT, FD_SEGMENT, MAX_MESSAGE,
};

/// Where the guest's control socket is, if the program runs in a guest.
fn control_path() -> Option<&'static [u8]> {
    static PATH: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    PATH.get_or_init(|| {
        use std::os::unix::ffi::OsStringExt;
        std::env::var_os("VSOCKET_CONTROL").map(|p| p.into_vec()).filter(|p| !p.is_empty())
    })
    .as_deref()
}

/// Is the library attached to a guest at all?
pub fn enabled() -> bool {
    control_path().is_some()
}

/// The longest a request waits for the daemon's reply. Longer than any
/// wait the daemon itself may make for a connect (a full listener backlog,
/// 5 s; another host's answer, 10 s).
const REPLY_TIMEOUT_MS: i64 = 15_000;

/// Lowest descriptor number for the library's own descriptors where there
/// is no room above the program's limit (see `sys::relocate_internal`).
fn internal_fd_floor() -> RawFd {
    static FLOOR: OnceLock<RawFd> = OnceLock::new();
    *FLOOR.get_or_init(|| (sys::getrlimit_nofile() / 2).clamp(64, 1 << 19) as RawFd)
}

/// A reply with the descriptors that came with it.
pub struct Reply {
    pub message: Message,
    pub fds: [RawFd; CONNECTION_FDS],
}

impl Drop for Reply {
    fn drop(&mut self) {
        for fd in self.fds {
            if fd >= 0 {
                let _ = sys::close(fd);
            }
        }
    }
}

impl Reply {
    /// Takes ownership of descriptor `i` out of the reply.
    fn take_fd(&mut self, i: usize) -> RawFd {
        std::mem::replace(&mut self.fds[i], -1)
    }

    /// Takes what came with a `Connected` or `Incoming`.
    pub fn take_delivery(&mut self) -> Delivery {
        Delivery {
            segment: self.take_fd(FD_SEGMENT),
            peer_segment: self.take_fd(FD_PEER_SEGMENT),
            doorbell: self.take_fd(FD_DOORBELL),
            lifeline: self.take_fd(FD_LIFELINE),
        }
    }
}

/// A channel to the guest's control socket (closed when dropped).
pub struct SeqpacketChannel(RawFd);

impl Drop for SeqpacketChannel {
    fn drop(&mut self) {
        let _ = sys::close(self.0);
    }
}

impl SeqpacketChannel {
    /// A channel over `fd`, already connected to a daemon (tests).
    #[cfg(test)]
    pub fn from_connected(fd: RawFd) -> SeqpacketChannel {
        SeqpacketChannel(fd)
    }
}

impl ControlChannel for SeqpacketChannel {
    fn open() -> SysResult<SeqpacketChannel> {
        let path = control_path().ok_or(Errno(libc::ENOENT))?;
        let fd = sys::connect_unix_seqpacket(path)?;
        let mut fd = [fd];
        sys::relocate_internal(&mut fd, internal_fd_floor());
        let channel = SeqpacketChannel(fd[0]);
        // A daemon that stops answering (stopped, wedged) costs a request
        // this long, then the kernel path: never a hang.
        sys::setsockopt_timeout_ms(channel.0, libc::SO_RCVTIMEO, REPLY_TIMEOUT_MS)?;
        Ok(channel)
    }

    fn exchange(&self, msg: &Message) -> SysResult<Reply> {
        send(self.0, msg)?;
        // Sleeping at once, rather than spinning, is what makes this fast:
        // the wake-up is a synchronous one, so the scheduler runs the
        // daemon's channel thread on this core, as soon as this thread
        // sleeps, and its reply wakes this thread the same way. A spinning
        // caller would instead have the daemon woken on the other core
        // (often idle, and leaving the idle state costs more than the whole
        // request).
        self.receive(Receive::Wait)
    }

    fn receive(&self, receive: Receive) -> SysResult<Reply> {
        let flags = match receive {
            Receive::Wait => 0,
            Receive::DontWait => libc::MSG_DONTWAIT,
        };
        self::receive(self.0, flags)
    }

    fn fd(&self) -> RawFd {
        self.0
    }
}

/// Sends `msg` on `channel`.
fn send(channel: RawFd, msg: &Message) -> SysResult<()> {
    let mut buf = [0u8; MAX_MESSAGE];
    let bytes = msg.encode(&mut buf);
    loop {
        match sys::send(channel, bytes, 0) {
            Err(Errno(libc::EINTR)) => continue,
            r => return r.map(|_| ()),
        }
    }
}

/// Receives one message (with its descriptors) from `channel`.
fn receive(channel: RawFd, flags: i32) -> SysResult<Reply> {
    let mut buf = [0u8; MAX_MESSAGE];
    let mut fds = [-1; CONNECTION_FDS];
    let (n, count) = loop {
        match sys::recv_with_fds(channel, &mut buf, &mut fds, flags) {
            Err(Errno(libc::EINTR)) => continue,
            r => break r?,
        }
    };
    let mut reply = Reply { message: Message::Fallback, fds };
    if n == 0 {
        // The daemon went away.
        return Err(Errno(libc::ECONNABORTED));
    }
    reply.message = Message::decode(&buf[..n]).map_err(|_| Errno(libc::EPROTO))?;
    if count < reply.message.fd_count() {
        // The kernel cuts the descriptors short (MSG_CTRUNC) when this
        // process has no free descriptor for them: that is what the
        // program's accept or connect should hear.
        return Err(Errno(libc::EMFILE));
    }
    if count != reply.message.fd_count() {
        return Err(Errno(libc::EPROTO));
    }
    // A connection's descriptors live on, out of the program's range.
    if count == CONNECTION_FDS {
        sys::relocate_internal(&mut reply.fds, internal_fd_floor());
    }
    Ok(reply)
}
