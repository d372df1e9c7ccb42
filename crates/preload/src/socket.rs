//! What the program's kernel socket says, and the options vSocket follows.
//!
//! Every vSocket descriptor is a real kernel socket: the program's options
//! stay on it (so `getsockopt` and `fcntl` tell the truth), and the library
//! reads back the few it acts on after the kernel accepted them.

use crate::addr::{self, Family};
use crate::conn::{Blocking, Connection, Direction};
use crate::sys;
use crate::table::{self, Entry};
use std::net::SocketAddrV4;
use std::os::fd::RawFd;

/// The family of a TCP socket that vSocket may carry: AF_INET, or AF_INET6
/// that also speaks IPv4 (IPV6_V6ONLY off).
pub fn tcp_family(fd: RawFd) -> Option<Family> {
    let family = Family::from_domain(sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN).ok()?)?;
    if sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE).ok()? != libc::SOCK_STREAM {
        return None;
    }
    if family == Family::V6 && sys::getsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) != Ok(0) {
        return None;
    }
    Some(family)
}

/// The socket's local address, if it is an IPv4 one (or `::`).
pub fn local_v4(fd: RawFd) -> Option<SocketAddrV4> {
    let mut bytes = [0u8; addr::STORAGE];
    let n = sys::getsockname(fd, &mut bytes).ok()?;
    addr::parse(&bytes[..n]).map(|(a, _)| a)
}

/// The socket's blocking mode (O_NONBLOCK).
pub fn blocking(fd: RawFd) -> sys::SysResult<Blocking> {
    Ok(Blocking::from_flags(sys::fcntl(fd, libc::F_GETFL, 0)? as i32))
}

/// Keeps the connection's close behaviour in step with SO_LINGER on the
/// kernel socket (read back, as the kernel normalised it).
pub fn follow_linger(fd: RawFd, conn: &Connection) {
    if let Ok((on, seconds)) = sys::getsockopt_linger(fd) {
        conn.set_linger(on, seconds);
    }
}

/// Keeps the connection's timeout for `direction` in step with the kernel
/// socket's (which the kernel accepted, so it is a valid timeval; read back
/// normalised).
pub fn follow_timeout(fd: RawFd, conn: &Connection, direction: Direction) {
    if let Ok(ms) = sys::getsockopt_timeout_ms(fd, direction.timeout_option()) {
        conn.set_timeout(direction, ms);
    }
}

/// A `setsockopt(level, name)` on `fd` succeeded: the library's copies
/// follow.
pub fn option_set(fd: RawFd, level: i32, name: i32) {
    let Some(entry) = table::get(fd) else {
        return;
    };
    match &*entry {
        // Accepted sockets inherit the listener's options.
        Entry::Listener(l) => l.options_changed(),
        Entry::Conn(c) if level == libc::SOL_SOCKET => match name {
            libc::SO_RCVTIMEO => follow_timeout(fd, c, Direction::Receive),
            libc::SO_SNDTIMEO => follow_timeout(fd, c, Direction::Send),
            libc::SO_LINGER => follow_linger(fd, c),
            _ => {}
        },
        _ => {}
    }
}

/// An `fcntl(cmd, arg)` on `fd` is about to run: O_NONBLOCK follows.
/// Returns the socket's note (see `fresh`) for [`after_fcntl`].
pub fn before_fcntl(fd: RawFd, cmd: i32, arg: u64) -> u64 {
    if matches!(cmd, libc::F_DUPFD | libc::F_DUPFD_CLOEXEC) {
        crate::fresh::forget(fd);
    }
    if cmd != libc::F_SETFL {
        return 0;
    }
    if let Some(e) = table::get(fd) {
        if let Entry::Conn(c) = &*e {
            c.set_blocking(Blocking::from_flags(arg as i32));
        }
    }
    crate::fresh::mark(fd)
}

/// An `fcntl(cmd, arg)` on `fd` returned `result` (`note`: what
/// [`before_fcntl`] returned): F_SETFL set the blocking mode a fresh
/// socket's note records; F_DUPFD and F_DUPFD_CLOEXEC made a new
/// descriptor for the same socket.
pub fn after_fcntl(fd: RawFd, cmd: i32, arg: u64, note: u64, result: i32) -> i32 {
    if result >= 0 && cmd == libc::F_SETFL {
        crate::fresh::blocking_set(fd, note, arg as i32 & libc::O_NONBLOCK != 0);
    }
    if result >= 0 && (cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC) {
        crate::fresh::forget(result);
        table::share(fd, result);
    }
    result
}
