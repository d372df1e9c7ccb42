//! connect(2) over vSocket: vsocketd decides, and the socket becomes a
//! connection, a connect that policy drops, a refusal, or stays a kernel
//! socket (fallback: no vSocket listener there, or no daemon to ask).

use crate::addr::{self, Family};
use crate::attach;
use crate::conn::{Blocking, Connection, Direction, Dropped};
use crate::signals::{self, SocketTimeout};
use crate::sys::{self, Errno, SysResult};
use crate::table::{self, Entry};
use crate::{fork, kits, socket};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;
use vsocket_abi::control::{ConnectionInfo, Message};
use vsocket_abi::layout::Endpoint;

/// How long the kernel would retry a dropped SYN before ETIMEDOUT
/// (tcp_syn_retries = 6: about 127 s).
const SYN_TIMEOUT_MS: i64 = 127_000;

/// What connect answers on a socket the library already carries: EISCONN
/// once connected, EALREADY while a dropped connect is pending.
pub fn already(fd: RawFd) -> Option<Errno> {
    match table::get(fd).as_deref() {
        Some(Entry::Conn(_) | Entry::Listener(_)) => Some(Errno(libc::EISCONN)),
        Some(Entry::Dropped(_)) => Some(Errno(libc::EALREADY)),
        _ => None,
    }
}

/// Tries to connect `fd` over vSocket. `None`: use the kernel.
pub fn connect(fd: RawFd, remote: SocketAddrV4, family: Family) -> Option<SysResult<()>> {
    if !attach::enabled() || remote.ip().is_unspecified() {
        return None;
    }
    // A socket made here and not shared since is an IPv4 TCP one with
    // its blocking mode known and its options at their defaults: nothing
    // to ask the kernel (see `fresh`).
    let fresh = crate::fresh::known(fd);
    let socket_family = match fresh {
        Some(_) => Family::V4,
        None => socket::tcp_family(fd)?,
    };
    if socket_family != family {
        return None;
    }
    // A real local port, from the kernel, so getsockname tells the truth and
    // two connections never share one.
    // Binding first costs one call less than asking first; EINVAL means the
    // program bound the socket itself. EADDRINUSE: no port is free of every
    // other use (TIME_WAIT holds them all); the kernel's own connect needs
    // only a unique address pair and may still find one, or fails as it
    // would without the library.
    let (any, len) = addr::render(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0), family);
    match sys::bind(fd, &any[..len]) {
        Ok(()) | Err(Errno(libc::EINVAL)) => {}
        Err(Errno(libc::EADDRINUSE)) => return None,
        Err(e) => return Some(Err(e)),
    }
    let local = socket::local_v4(fd)?;
    let blocking = match fresh {
        Some(f) if f.nonblocking => Blocking::NonBlocking,
        Some(_) => Blocking::Blocking,
        None => socket::blocking(fd).ok()?,
    };
    let options = if fresh.is_some() { Options::Defaults } else { Options::OfTheSocket };
    if let Some(done) = connect_with_kit(fd, local, remote, family, blocking, options) {
        return Some(done);
    }
    // The daemon unreachable: the kernel path still works. A daemon older
    // than kits closes the channel on a request for them (as one that
    // refuses the attachment does): this connect takes the kernel path,
    // and the process asks as before from then on.
    let request = match kits::wanted() {
        true => Message::ConnectKits { local, remote },
        false => Message::Connect { local, remote },
    };
    // From now on a fork accounts for the connection this may make, and
    // holds the request channel across it (a child forked during this
    // request would find it locked for ever).
    fork::watch();
    // A fork from here on has copies of the kits' doorbells this brings.
    let forks = crate::bells::forks();
    let mut reply = match attach::request(&request) {
        Ok(reply) => reply,
        Err(e) => {
            if matches!(request, Message::ConnectKits { .. }) && e == Errno(libc::ECONNABORTED) {
                kits::daemon_is_old();
            }
            return None;
        }
    };
    if let Some(delivered) = attach::delivered(&mut reply, Endpoint::Client) {
        let conn =
            delivered.and_then(|(info, delivery)| Connection::new(info, Endpoint::Client, family, delivery, blocking));
        let conn = match conn {
            Ok(c) => c,
            Err(e) => return Some(Err(e)),
        };
        if let Message::ConnectedKits { info, grant } = reply.message {
            kits::keep_client(grant, *local.ip(), remote, *info.local.ip(), reply.take_extra(), forks);
        }
        return Some(adopt(fd, conn, blocking, options));
    }
    match reply.message {
        Message::Fallback => None,
        Message::Refused { errno } => Some(Err(Errno(errno))),
        Message::Dropped => {
            let deadline_ms = sys::now_ms() + SYN_TIMEOUT_MS;
            table::adopt(fd, Entry::Dropped(Dropped { deadline_ms }));
            if blocking == Blocking::NonBlocking {
                return Some(Err(Errno(libc::EINPROGRESS)));
            }
            Some(wait_dropped(fd, deadline_ms))
        }
        _ => Some(Err(Errno(libc::EPROTO))),
    }
}

/// Where a new connection's timeouts and linger come from.
#[derive(Clone, Copy)]
enum Options {
    /// A fresh socket's: the defaults, which a connection starts with.
    Defaults,
    /// Whatever the program set on the socket before connect.
    OfTheSocket,
}

/// Makes `conn` the connection of the program's socket `fd`: what connect
/// returns.
fn adopt(fd: RawFd, conn: Connection, blocking: Blocking, options: Options) -> SysResult<()> {
    // Timeouts set before connect apply to the connection.
    if let Options::OfTheSocket = options {
        socket::follow_timeout(fd, &conn, Direction::Receive);
        socket::follow_timeout(fd, &conn, Direction::Send);
        socket::follow_linger(fd, &conn);
    }
    table::adopt(fd, Entry::Conn(conn));
    match blocking {
        Blocking::NonBlocking => Err(Errno(libc::EINPROGRESS)),
        Blocking::Blocking => Ok(()),
    }
}

/// Connects `fd` (bound to `local`) to `remote` with a kit of a grant this
/// process holds, without asking the daemon (ARCHITECTURE §3b). `None`:
/// no kit (or a revoked one: the grant is let go), ask the daemon.
fn connect_with_kit(
    fd: RawFd,
    local: SocketAddrV4,
    remote: SocketAddrV4,
    family: Family,
    blocking: Blocking,
    options: Options,
) -> Option<SysResult<()>> {
    let kits::Taken { grant, ends, client, kit } = kits::take(*local.ip(), remote)?;
    fork::watch();
    let sequence = kit.sequence;
    let info = ConnectionInfo {
        id: kit.id,
        local: SocketAddrV4::new(client, local.port()),
        peer: remote,
        ring_size: kit.ring_size,
    };
    let conn = match Connection::new(info, Endpoint::Client, family, kit.delivery, blocking) {
        Ok(conn) if conn.take_kit(local.port()) => conn,
        _ => {
            kits::forget(grant);
            return None;
        }
    };
    ends.publish(sequence, local.port());
    Some(adopt(fd, conn, blocking, options))
}

/// Waits as a blocked connect on `fd` whose SYNs are dropped would:
/// ETIMEDOUT at the deadline; EINPROGRESS when the socket's SO_SNDTIMEO
/// runs out first (the connect goes on); EINTR when a handler without
/// SA_RESTART runs (with SA_RESTART, Linux restarts the connect, which goes
/// on waiting, unless the socket has that timeout).
fn wait_dropped(fd: RawFd, deadline_ms: i64) -> SysResult<()> {
    let send_timeout_ms = sys::getsockopt_timeout_ms(fd, libc::SO_SNDTIMEO).unwrap_or(0);
    let give_up_ms = (send_timeout_ms > 0).then(|| sys::now_ms() + send_timeout_ms);
    let timeout = if give_up_ms.is_some() { SocketTimeout::Set } else { SocketTimeout::None };
    signals::wait_begins();
    loop {
        let now = sys::now_ms();
        if now >= deadline_ms {
            return Err(Errno(libc::ETIMEDOUT));
        }
        if give_up_ms.is_some_and(|g| now >= g) {
            return Err(Errno(libc::EINPROGRESS));
        }
        if signals::interrupts(timeout) {
            return Err(Errno(libc::EINTR));
        }
        let until = give_up_ms.map_or(deadline_ms, |g| g.min(deadline_ms));
        match sys::poll(&mut [], (until - now).min(i32::MAX as i64) as i32) {
            Ok(_) => {}
            Err(Errno(libc::EINTR)) if signals::restart_after_interrupt(timeout) => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_dropped_blocking_connect_ends_at_its_deadline_or_the_send_timeout() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let fd = socket.as_raw_fd();
        let started = sys::now_ms();
        assert_eq!(wait_dropped(fd, started + 100), Err(Errno(libc::ETIMEDOUT)));
        assert!(sys::now_ms() - started >= 100);
        // SO_SNDTIMEO before the deadline: EINPROGRESS, as Linux's connect.
        sys::setsockopt_timeout_ms(fd, libc::SO_SNDTIMEO, 100).unwrap();
        let started = sys::now_ms();
        assert_eq!(wait_dropped(fd, started + 60_000), Err(Errno(libc::EINPROGRESS)));
        assert!(sys::now_ms() - started < 5_000);
    }
}
