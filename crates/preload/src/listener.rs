//! A listening socket that accepts both kinds of client.
//!
//! The kernel socket keeps listening (kernel clients and programs without
//! the library still connect to it); beside it, a listener channel to the
//! daemon delivers vSocket connections, each a message carrying the
//! segment and the doorbell. `accept` takes from whichever is ready.

use crate::addr::Family;
use crate::attach::{Channel, ControlChannel, Receive};
use crate::conn::{Blocking, Connection, Direction};
use crate::sys::{self, Errno, SysResult};
use std::net::SocketAddrV4;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use vsocket_abi::control::Message;
use vsocket_abi::layout::Endpoint;
use vsocket_ring::spin::Spinner;

pub struct Listener {
    /// The listener channel (library-internal; closing it, when the
    /// listener goes, unregisters the listener at the daemon).
    pub channel: Channel,
    /// The channel broke (vsocketd restarted or went away): from then on
    /// this is a plain kernel listener.
    detached: AtomicBool,
    /// The listening socket's family: accepted sockets have it too.
    pub family: Family,
    /// How long a blocking accept spins before sleeping.
    pub spinner: Spinner,
    /// The listening socket's options that accepted sockets inherit, read
    /// from the kernel at the first accept after they may have changed
    /// (`None`: not read yet, or a `setsockopt` on the listener since).
    inherited: Mutex<Option<Inherited>>,
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

impl Listener {
    /// Registers the kernel listening socket's address with the daemon.
    pub fn register(local: SocketAddrV4, family: Family, backlog: i32) -> SysResult<Listener> {
        // Dropping the channel on failure closes it.
        let channel = Channel::open()?;
        match channel.exchange(&Message::Listen { local, backlog: backlog.max(0) as u32 }) {
            Ok(reply) if reply.message == Message::ListenOk => Ok(Listener {
                channel,
                detached: AtomicBool::new(false),
                family,
                spinner: Spinner::new(),
                inherited: Mutex::new(None),
            }),
            Ok(reply) => Err(match reply.message {
                Message::Refused { errno } => Errno(errno),
                _ => Errno(libc::EPROTO),
            }),
            Err(e) => Err(e),
        }
    }

    /// Takes one pending vSocket connection, if any, with a new descriptor
    /// for it (a fresh kernel TCP socket, so the program sees a real
    /// socket) that the caller enters in the side table.
    /// `flags` are accept4's (SOCK_NONBLOCK, SOCK_CLOEXEC).
    /// `listening` is the program's listening socket, whose options the
    /// accepted socket inherits (as Linux copies them).
    pub fn take_pending(&self, listening: RawFd, flags: i32) -> SysResult<Option<Accepted>> {
        if !self.attached() {
            return Ok(None);
        }
        // The program's socket comes first: if it cannot be had (EMFILE),
        // the connection stays queued for a later accept, as in a backlog.
        let mut pending = [libc::pollfd { fd: self.channel.fd(), events: libc::POLLIN, revents: 0 }];
        if sys::poll(&mut pending, 0).unwrap_or(0) == 0 {
            return Ok(None);
        }
        let fd = sys::socket(
            self.family.domain(),
            libc::SOCK_STREAM | (flags & (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)),
            0,
        )?;
        let mut reply = match self.channel.receive(Receive::DontWait) {
            Ok(r) => r,
            Err(e) => {
                let _ = sys::close(fd);
                if e != Errno(libc::EAGAIN) {
                    // The daemon is gone; kernel clients must still be accepted.
                    self.detached.store(true, Ordering::Relaxed);
                }
                return Ok(None);
            }
        };
        let Message::Incoming(info) = reply.message else {
            let _ = sys::close(fd);
            return Err(Errno(libc::EPROTO));
        };
        let delivery = reply.take_delivery();
        match Connection::new(info, Endpoint::Server, self.family, delivery, Blocking::from_flags(flags)) {
            Ok(conn) => {
                let inherited = *self
                    .inherited
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert_with(|| Inherited::read(listening));
                inherited.apply(fd, &conn);
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
        *self.inherited.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Does the daemon still deliver connections on the channel?
    pub fn attached(&self) -> bool {
        !self.detached.load(Ordering::Relaxed)
    }
}
