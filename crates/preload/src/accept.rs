//! listen(2) and accept(2) on a socket that takes vSocket clients beside
//! kernel ones.

use crate::attach::ControlChannel;
use crate::conn::{Blocking, MAX_SLEEP_MS};
use crate::listener::Listener;
use crate::signals::SocketTimeout;
use crate::sys::{self, Errno, SysResult};
use crate::table::{self, Entry};
use crate::{attach, fork, signals, socket};
use std::net::SocketAddrV4;
use std::os::fd::RawFd;
use std::sync::Arc;

/// The kernel's listen(2) on `fd` succeeded: an IPv4 listener, or an IPv6
/// one that takes IPv4 clients (bound to `::` or to a mapped address), also
/// takes vSocket connections. If the daemon will not take the listener, it
/// stays a kernel listener.
pub fn listen(fd: RawFd, backlog: i32) {
    if !attach::enabled() || table::get(fd).is_some() {
        return;
    }
    let Some(family) = socket::tcp_family(fd) else {
        return;
    };
    let Some(local) = socket::local_v4(fd) else {
        return;
    };
    if let Ok(listener) = Listener::register(local, family, backlog) {
        table::adopt(fd, Entry::Listener(listener));
    }
}

/// A client taken by accept.
pub enum Client {
    /// A vSocket connection, now managed as `fd`; the program is told
    /// `peer` as its address.
    Vsocket { fd: RawFd, peer: SocketAddrV4 },
    /// A kernel client: `kernel_accept` gave it, address and all.
    Kernel(RawFd),
}

/// accept4 on the listening socket `fd`: the first client of either kind.
/// `kernel_accept` is the kernel's accept4 with the program's arguments.
pub fn accept(
    fd: RawFd,
    listener: &Listener,
    flags: i32,
    mut kernel_accept: impl FnMut() -> SysResult<RawFd>,
) -> SysResult<Client> {
    let blocking = socket::blocking(fd)? == Blocking::Blocking;
    loop {
        fork::watch();
        if let Some(accepted) = listener.take_pending(fd, flags)? {
            table::set(accepted.fd, Arc::new(Entry::Conn(accepted.conn)));
            return Ok(Client::Vsocket { fd: accepted.fd, peer: accepted.peer });
        }
        if !blocking {
            return kernel_accept().map(Client::Kernel);
        }
        // The channel is held for the wait, even if another thread finds
        // it broken meanwhile.
        let channel = listener.channel();
        let mut pfds = [
            libc::pollfd { fd, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: channel.as_ref().map_or(-1, |c| c.fd()), events: libc::POLLIN, revents: 0 },
        ];
        let watched = if channel.is_some() { 2 } else { 1 };
        // A detached listener wakes to try to attach again.
        let sleep_ms = if channel.is_some() { -1 } else { MAX_SLEEP_MS };
        // Connections tend to come in bursts: look again for a while
        // before sleeping.
        if let Some(_sleeping) = listener.spinner.spin(|| sys::poll(&mut pfds[..watched], 0).is_ok_and(|n| n > 0)) {
            loop {
                signals::before_sleep();
                match sys::poll(&mut pfds[..watched], sleep_ms) {
                    // A handler with SA_RESTART ran: accept goes on waiting.
                    Err(Errno(libc::EINTR)) if signals::restart_after_interrupt(SocketTimeout::None) => continue,
                    r => {
                        r?;
                        break;
                    }
                };
            }
        }
        if pfds[1].revents != 0 {
            continue;
        }
        if pfds[0].revents != 0 {
            return kernel_accept().map(Client::Kernel);
        }
    }
}
