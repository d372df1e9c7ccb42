//! The control socket. A namespace guest's is a unix SOCK_SEQPACKET socket
//! per guest, one message per packet, descriptors by SCM_RIGHTS. A VM
//! guest's is a vsock stream to the host, messages framed on it
//! (`vsocket_abi::stream`), no descriptors: its connections are placed in
//! the VM's region, at offsets the messages carry.
//!
//! `VSOCKET_CONTROL` names the socket (set by `vsocket run`): a path, or
//! `vsock` (the host's control port) or `vsock:CID:PORT`. Without it, the
//! file [`ATTACHMENT_FILE`] may name it the same way: a VM guest's agent
//! writes it at boot in the VM's own `/run`, so every program there that
//! loads the library attaches. Without either the library stays out of the
//! way: every call goes to the kernel. The
//! process keeps one request channel (see `attach::request`); each
//! listening socket opens its own listener channel.

use super::{ControlChannel, Delivery, Receive};
use crate::forksafe;
use crate::sys::{self, Errno, SysResult};
use std::os::fd::RawFd;
use std::sync::OnceLock;
use vsocket_abi::control::{
    Message, CONNECTION_FDS, FD_DOORBELL, FD_LIFELINE, FD_PEER_SEGMENT, FD_SEGMENT, MAX_MESSAGE,
};
use vsocket_abi::stream::{ATTACHMENT_FILE, CONTROL_PORT, MAX_FRAME};

/// Where the guest's vsocketd is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// A namespace guest's control socket, by path.
    Unix(Vec<u8>),
    /// A VM guest's: vsock `port` of context `cid` (the host, 2).
    Vsock { cid: u32, port: u32 },
}

impl Control {
    /// Reads `VSOCKET_CONTROL`'s value: `vsock`, `vsock:CID:PORT`, or a
    /// path. `None` for an empty or malformed value (the library then stays
    /// out of the way).
    pub fn parse(value: &[u8]) -> Option<Control> {
        if value.is_empty() {
            return None;
        }
        if value == b"vsock" {
            return Some(Control::Vsock { cid: libc::VMADDR_CID_HOST, port: CONTROL_PORT });
        }
        let Some(rest) = value.strip_prefix(b"vsock:") else {
            return Some(Control::Unix(value.to_vec()));
        };
        let rest = std::str::from_utf8(rest).ok()?;
        let (cid, port) = rest.split_once(':')?;
        Some(Control::Vsock { cid: cid.parse().ok()?, port: port.parse().ok()? })
    }
}

/// Where the guest's control socket is, if the program runs in a guest.
pub fn control() -> Option<&'static Control> {
    static CONTROL: OnceLock<Option<Control>> = OnceLock::new();
    CONTROL
        .get_or_init(|| {
            use std::os::unix::ffi::OsStrExt;
            match std::env::var_os("VSOCKET_CONTROL") {
                Some(value) => Control::parse(value.as_bytes()),
                None => Control::parse(std::fs::read(ATTACHMENT_FILE).ok()?.trim_ascii()),
            }
        })
        .as_ref()
}

/// Is the library attached to a guest at all?
pub fn enabled() -> bool {
    control().is_some()
}

/// The longest a request waits for the daemon's reply. Longer than any
/// wait the daemon itself may make for a connect (a full listener backlog,
/// 5 s; another host's answer, 10 s).
const REPLY_TIMEOUT_MS: i64 = 15_000;

/// Lowest descriptor number for the library's own descriptors where there
/// is no room above the program's limit (see `sys::relocate_internal`).
pub(crate) fn internal_fd_floor() -> RawFd {
    static FLOOR: OnceLock<RawFd> = OnceLock::new();
    *FLOOR.get_or_init(|| (sys::getrlimit_nofile() / 2).clamp(64, 1 << 19) as RawFd)
}

/// A reply with the descriptors that came with it.
pub struct Reply {
    pub message: Message,
    pub fds: [RawFd; CONNECTION_FDS],
    /// Those after the first [`CONNECTION_FDS`] (a batch of kits).
    pub extra: Vec<RawFd>,
}

impl Drop for Reply {
    fn drop(&mut self) {
        for &fd in self.fds.iter().chain(&self.extra) {
            if fd >= 0 {
                let _ = sys::close(fd);
            }
        }
    }
}

impl Reply {
    /// Takes every descriptor that came, in order.
    pub fn take_all(&mut self) -> Vec<RawFd> {
        let mut all: Vec<RawFd> =
            self.fds.iter_mut().map(|fd| std::mem::replace(fd, -1)).filter(|&fd| fd >= 0).collect();
        all.append(&mut self.extra);
        all
    }

    /// Takes the descriptors after a connection's (a batch of kits after
    /// the connection of a `ConnectedKits`).
    pub fn take_extra(&mut self) -> Vec<RawFd> {
        std::mem::take(&mut self.extra)
    }

    /// Takes ownership of descriptor `i` out of the reply.
    fn take_fd(&mut self, i: usize) -> RawFd {
        std::mem::replace(&mut self.fds[i], -1)
    }

    /// Takes what came with a `Reattached`: this end's half, the peer's.
    pub fn take_halves(&mut self) -> [RawFd; 2] {
        [self.take_fd(0), self.take_fd(1)]
    }

    /// Takes what came with a `Connected` or `Incoming`.
    pub fn take_delivery(&mut self) -> Delivery {
        Delivery::of_segment(
            self.take_fd(FD_SEGMENT),
            self.take_fd(FD_PEER_SEGMENT),
            self.take_fd(FD_DOORBELL),
            self.take_fd(FD_LIFELINE),
        )
    }
}

/// A channel to the guest's control socket (closed when dropped).
pub struct ControlSocket {
    fd: RawFd,
    /// A VM's stream: messages are framed, no descriptors travel.
    framed: bool,
    /// Held by the thread reading a shared channel's frame (see
    /// [`ControlSocket::receive`]).
    reading: forksafe::Mutex<()>,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = sys::close(self.fd);
    }
}

impl ControlSocket {
    /// A channel over `fd`, already connected to a daemon (tests).
    #[cfg(test)]
    pub fn from_connected(fd: RawFd) -> ControlSocket {
        ControlSocket { fd, framed: false, reading: forksafe::Mutex::new(()) }
    }
}

impl ControlChannel for ControlSocket {
    fn open() -> SysResult<ControlSocket> {
        let (fd, framed) = match control().ok_or(Errno(libc::ENOENT))? {
            Control::Unix(path) => (sys::connect_unix_seqpacket(path)?, false),
            Control::Vsock { cid, port } => (sys::connect_vsock(*cid, *port)?, true),
        };
        let mut fd = [fd];
        sys::relocate_internal(&mut fd, internal_fd_floor());
        let channel = ControlSocket { fd: fd[0], framed, reading: forksafe::Mutex::new(()) };
        // A daemon that stops answering (stopped, wedged) costs a request
        // this long, then the kernel path: never a hang.
        sys::setsockopt_timeout_ms(channel.fd, libc::SO_RCVTIMEO, REPLY_TIMEOUT_MS)?;
        Ok(channel)
    }

    fn exchange(&self, msg: &Message, proof: Option<RawFd>) -> SysResult<Reply> {
        match (self.framed, proof) {
            (true, None) => send_frame(self.fd, msg)?,
            // A VM's stream carries no descriptors (nor has any to ask for).
            (true, Some(_)) => return Err(Errno(libc::EOPNOTSUPP)),
            (false, proof) => send(self.fd, msg, proof)?,
        }
        // Sleeping at once, rather than spinning, is what makes this fast:
        // the wake-up is a synchronous one, so the scheduler runs the
        // daemon's channel thread on this core, as soon as this thread
        // sleeps, and its reply wakes this thread the same way. A spinning
        // caller would instead have the daemon woken on the other core
        // (often idle, and leaving the idle state costs more than the whole
        // request).
        self.receive(Receive::Wait)
    }

    fn send_only(&self, msg: &Message) -> SysResult<()> {
        if self.framed {
            return send_frame(self.fd, msg);
        }
        let mut buf = [0u8; MAX_MESSAGE];
        sys::send(self.fd, msg.encode(&mut buf), libc::MSG_DONTWAIT).map(drop)
    }

    fn receive(&self, receive: Receive) -> SysResult<Reply> {
        match (self.framed, receive) {
            // A reply on this process's own request channel (requests take
            // turns): nobody else reads it.
            (true, Receive::Wait) => receive_frame(self.fd, 0),
            // A listener's stream is shared by the threads that accept on
            // it and by the processes forked with it (prefork servers,
            // nginx's workers): a frame is read whole by one of them, or
            // two would each take part of it and both lose their place.
            // The mutex orders this process's threads, the record lock on
            // the socket the processes. The read does not wait, so they
            // are held only while a frame that has begun to arrive is read
            // (bounded by the channel's receive timeout); a process that
            // dies holding the lock gives it back.
            (true, Receive::Shared) => {
                let _thread = self.reading.lock();
                sys::record_lock(self.fd, true)?;
                let frame = receive_frame(self.fd, libc::MSG_DONTWAIT);
                let _ = sys::record_lock(self.fd, false);
                frame
            }
            // Datagrams come whole to whoever reads them.
            (false, Receive::Wait) => self::receive(self.fd, 0),
            (false, Receive::Shared) => self::receive(self.fd, libc::MSG_DONTWAIT),
        }
    }

    fn fd(&self) -> RawFd {
        self.fd
    }
}

/// Sends `msg` as one frame on the stream `channel`.
fn send_frame(channel: RawFd, msg: &Message) -> SysResult<()> {
    let mut buf = [0u8; MAX_FRAME];
    sys::send_all(channel, vsocket_abi::stream::frame(msg, &mut buf))
}

/// Fills `buf` from the stream `channel`; end of stream is the daemon gone.
fn receive_exact(channel: RawFd, buf: &mut [u8], mut flags: i32) -> SysResult<()> {
    let mut at = 0;
    while at < buf.len() {
        match sys::recv(channel, &mut buf[at..], flags) {
            Ok(0) => return Err(Errno(libc::ECONNABORTED)),
            Ok(n) => at += n,
            Err(Errno(libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
        // A frame begun is read whole.
        flags &= !libc::MSG_DONTWAIT;
    }
    Ok(())
}

/// Receives one framed message from the stream `channel`.
fn receive_frame(channel: RawFd, flags: i32) -> SysResult<Reply> {
    let mut len = [0u8; 1];
    receive_exact(channel, &mut len, flags)?;
    let len = usize::from(len[0]);
    if len == 0 || len > MAX_MESSAGE {
        return Err(Errno(libc::EPROTO));
    }
    let mut buf = [0u8; MAX_MESSAGE];
    receive_exact(channel, &mut buf[..len], 0)?;
    let message = Message::decode(&buf[..len]).map_err(|_| Errno(libc::EPROTO))?;
    if message.fd_count() != 0 {
        // Descriptors cannot come over a stream.
        return Err(Errno(libc::EPROTO));
    }
    Ok(Reply { message, fds: [-1; CONNECTION_FDS], extra: Vec::new() })
}

/// Sends `msg` on `channel`, with `proof` attached if there is one.
fn send(channel: RawFd, msg: &Message, proof: Option<RawFd>) -> SysResult<()> {
    let mut buf = [0u8; MAX_MESSAGE];
    let bytes = msg.encode(&mut buf);
    if let Some(fd) = proof {
        return vsocket_sys::raw::send_with_fds(channel, bytes, &[fd])
            .map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)));
    }
    loop {
        match sys::send(channel, bytes, 0) {
            Err(Errno(libc::EINTR)) => continue,
            r => return r.map(|_| ()),
        }
    }
}

/// Receives one message (with its descriptors) from `channel`, waiting for
/// one unless `flags` has `MSG_DONTWAIT`.
///
/// The descriptors a message brings (a connection's, a batch of kits, a
/// listener's bell) are the library's own, which live above the program's
/// limit; the program's own range may be full. So the message is read
/// with the soft limit raised (`sys::with_limit_raised`; a wait for one,
/// peeking, comes first), and the kernel cuts none short unless the hard limit is
/// reached. (Read within the program's limit, it cut them short near it:
/// the connection the daemon had made, and told the server of, was lost
/// to the client, which connected again over the kernel, and the server
/// accepted both; a listener lost a batch, and with it the kits its
/// clients had taken.)
pub(crate) fn receive(channel: RawFd, flags: i32) -> SysResult<Reply> {
    let mut buf = [0u8; MAX_MESSAGE];
    let mut all = [-1; vsocket_sys::raw::MAX_SEND_FDS];
    let wait = flags & libc::MSG_DONTWAIT == 0;
    let (n, count) = loop {
        if wait {
            // The wait is a peek at the message, without its descriptors:
            // it keeps the channel's receive timeout (a wedged daemon costs
            // a request that long, and no more).
            match sys::recv(channel, &mut [0u8; 1], libc::MSG_PEEK) {
                Err(Errno(libc::EINTR)) => continue,
                Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
        // Whatever descriptors it brings are moved out of the program's
        // range in the same window: the doorbell and lifeline live there,
        // and the halves, though closed as soon as they are mapped, must
        // not hold a number of the program's meanwhile (a thread's dup2
        // onto it would have its descriptor closed by us).
        let got = sys::with_limit_raised(|raised| {
            let got = sys::recv_with_fds(channel, &mut buf, &mut all, flags | libc::MSG_DONTWAIT);
            if let Ok((_, count)) = got {
                sys::relocate_raised(&mut all[..count], raised, internal_fd_floor());
            }
            got
        });
        match got {
            Err(Errno(libc::EINTR)) => continue,
            // Taken by another thread between the wait and the read.
            Err(Errno(libc::EAGAIN)) if wait => continue,
            r => break r?,
        }
    };
    let mut fds = [-1; CONNECTION_FDS];
    fds.copy_from_slice(&all[..CONNECTION_FDS]);
    let extra = all[CONNECTION_FDS..count.max(CONNECTION_FDS)].to_vec();
    let mut reply = Reply { message: Message::Fallback, fds, extra };
    if n == 0 {
        // The daemon went away.
        return Err(Errno(libc::ECONNABORTED));
    }
    reply.message = Message::decode(&buf[..n]).map_err(|_| Errno(libc::EPROTO))?;
    if count < reply.message.fd_count() {
        // The kernel cuts the descriptors short (MSG_CTRUNC) when this
        // process has no free descriptor for them (read as it is, none
        // below its hard limit): that is what the program's accept
        // or connect should hear.
        return Err(Errno(libc::EMFILE));
    }
    if count != reply.message.fd_count() {
        return Err(Errno(libc::EPROTO));
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attachment_is_a_path_or_a_vsock_port() {
        assert_eq!(
            Control::parse(b"/run/vsocket/guests/a.sock"),
            Some(Control::Unix(b"/run/vsocket/guests/a.sock".to_vec()))
        );
        assert_eq!(Control::parse(b"vsock"), Some(Control::Vsock { cid: 2, port: CONTROL_PORT }));
        assert_eq!(Control::parse(b"vsock:3:9000"), Some(Control::Vsock { cid: 3, port: 9000 }));
        for bad in [&b""[..], b"vsock:", b"vsock:2", b"vsock:x:1", b"vsock:2:99999999999"] {
            assert_eq!(Control::parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
