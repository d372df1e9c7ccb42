//! listen(2) and accept(2) on a socket that takes vSocket clients beside
//! kernel ones.

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
    // A fork must be seen from now on: a listener's kits are for one
    // process (see `Listener::no_more_kits`).
    fork::watch();
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
    let started_ms = sys::now_ms();
    // Asked of the kernel only once nothing was pending: whether the
    // socket blocks, and when SO_RCVTIMEO on it ends a blocking accept
    // (EAGAIN), as in Linux.
    let mut wait: Option<(Option<i64>, SocketTimeout)> = None;
    signals::wait_begins();
    loop {
        fork::watch();
        if let Some(accepted) = listener.take_pending(fd, flags)? {
            table::set(accepted.fd, Arc::new(Entry::Conn(accepted.conn)));
            return Ok(Client::Vsocket { fd: accepted.fd, peer: accepted.peer });
        }
        let (deadline, timeout) = match wait {
            Some(w) => w,
            None => {
                if socket::blocking(fd)? == Blocking::NonBlocking {
                    return kernel_accept().map(Client::Kernel);
                }
                let timeout_ms = sys::getsockopt_timeout_ms(fd, libc::SO_RCVTIMEO).unwrap_or(0);
                let deadline = (timeout_ms > 0).then(|| started_ms + timeout_ms);
                let w = (deadline, if deadline.is_some() { SocketTimeout::Set } else { SocketTimeout::None });
                // The next connection's program socket, made while waiting.
                listener.make_spare(flags);
                *wait.insert(w)
            }
        };
        // The channel is held for the wait, even if another thread finds
        // it broken meanwhile.
        let channel = listener.channel();
        let mut pfds = [
            libc::pollfd { fd, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: channel.as_ref().map_or(-1, |c| c.wake_fd()), events: libc::POLLIN, revents: 0 },
        ];
        // The sleep watches every source that can end it: the kernel socket
        // and, while the daemon serves it, the channel (whose end, too,
        // wakes it); a signal interrupts it. Only the channel's end detaches
        // the listener (see `Listener::take_pending`), and a detached
        // listener wakes to try to attach again.
        let watched = if channel.is_some() { 2 } else { 1 };
        let retry_ms = if channel.is_some() { None } else { Some(MAX_SLEEP_MS) };
        // Connections tend to come in bursts: look again for a while
        // before sleeping.
        if let Some(_sleeping) = listener.spinner.spin(|| sys::poll(&mut pfds[..watched], 0).is_ok_and(|n| n > 0)) {
            loop {
                let left_ms = match deadline {
                    None => None,
                    Some(d) => {
                        let left = d - sys::now_ms();
                        if left <= 0 {
                            return Err(Errno(libc::EAGAIN));
                        }
                        Some(left.min(i32::MAX as i64) as i32)
                    }
                };
                // A sleep that ends with nothing ready goes round again: the
                // deadline is checked, a detached listener tries to attach.
                let wait_ms = match (left_ms, retry_ms) {
                    (Some(a), Some(b)) => a.min(b),
                    (Some(t), None) | (None, Some(t)) => t,
                    (None, None) => -1,
                };
                // A handler that ran since accept began (in the spin, or
                // while it took a delivery) ends it as one that interrupted
                // the sleep would: the kernel's accept would have slept.
                if signals::interrupts(timeout) {
                    return Err(Errno(libc::EINTR));
                }
                match sys::poll(&mut pfds[..watched], wait_ms) {
                    // A handler with SA_RESTART ran: accept goes on waiting
                    // (unless the socket has a timeout: EINTR, as in Linux).
                    Err(Errno(libc::EINTR)) if signals::restart_after_interrupt(timeout) => continue,
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
