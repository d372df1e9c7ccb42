//! Sockets this process made with socket(2) and has not shared since: what
//! connect would ask the kernel about them (their family and type, their
//! blocking mode, timeouts and linger) is known without asking.
//!
//! `socket` marks an IPv4 TCP socket it made here; a mark stays only while
//! every change to what it records goes through the library's hooks on that
//! one descriptor. Anything that could change it elsewhere takes the mark
//! away: a close of the number (hooked, as the side table's are), a `dup`
//! of it or onto it (the copy's changes are the socket's), a `setsockopt`
//! of a timeout or of `SO_LINGER`, sending or receiving descriptors, and a
//! fork, a spawn or an exec (the child holds the same sockets: every note
//! goes, by a new epoch). A change of the blocking mode through the hooks
//! (`fcntl(F_SETFL)`, `FIONBIO`: how event loops make their sockets
//! non-blocking) is noted instead, once the kernel made it. A connect on a
//! socket without a note asks the kernel, as before. Not
//! seen: a child made by a raw `clone` or `_Fork`, which runs no fork
//! handler, changing a socket it shares before its parent connects it.
//!
//! A number stays marked only while it names that socket: the library
//! sees every close made through the C library, as its side table of
//! descriptors relies on (a raw close system call defeats both).

use std::sync::atomic::{AtomicU64, Ordering};

/// Descriptors below this are tracked; others always ask the kernel.
const TRACKED: usize = 1 << 16;

/// The epoch in the high bits (a mark of an older epoch is no mark), then
/// what the mark says.
const MADE: u64 = 1;
const NONBLOCK: u64 = 2;
const EPOCH_SHIFT: u32 = 8;

static MARKS: [AtomicU64; TRACKED] = [const { AtomicU64::new(0) }; TRACKED];
/// Starts at 1: a zero slot is never a mark.
static EPOCH: AtomicU64 = AtomicU64::new(1);

/// What a mark says about a socket made here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fresh {
    /// O_NONBLOCK, from `SOCK_NONBLOCK` at creation.
    pub nonblocking: bool,
}

fn slot(fd: i32) -> Option<&'static AtomicU64> {
    usize::try_from(fd).ok().and_then(|i| MARKS.get(i))
}

/// The epoch a socket about to be made is noted in (read before the
/// system call: a fork between the two, in another thread, moves the epoch
/// on in both processes, see `fork.rs`, and the note is none).
pub fn epoch() -> u64 {
    EPOCH.load(Ordering::Relaxed)
}

/// `socket(domain, ty, protocol)`, called in `epoch`, returned `fd` (or
/// failed: `fd` < 0).
pub fn made(epoch: u64, fd: i32, domain: i32, ty: i32, protocol: i32) {
    let Some(slot) = slot(fd) else { return };
    let tcp = domain == libc::AF_INET
        && ty & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) == libc::SOCK_STREAM
        && (protocol == 0 || protocol == libc::IPPROTO_TCP);
    // (A vfork child notes in its parent's memory: its exec, or a spawn,
    // takes every note away.)
    if !tcp {
        slot.store(0, Ordering::Relaxed);
        return;
    }
    let nonblocking = if ty & libc::SOCK_NONBLOCK != 0 { NONBLOCK } else { 0 };
    slot.store(epoch << EPOCH_SHIFT | MADE | nonblocking, Ordering::Relaxed);
}

/// What the mark of `fd` says, if it has one.
pub fn known(fd: i32) -> Option<Fresh> {
    let mark = slot(fd)?.load(Ordering::Relaxed);
    let current = mark >> EPOCH_SHIFT == EPOCH.load(Ordering::Relaxed) && mark & MADE != 0;
    current.then_some(Fresh { nonblocking: mark & NONBLOCK != 0 })
}

/// `fd` may no longer be what its mark says (closed, copied, changed).
pub fn forget(fd: i32) {
    if let Some(slot) = slot(fd) {
        slot.store(0, Ordering::Relaxed);
    }
}

/// The mark of `fd` as it is now (0: none), read before a change of its
/// blocking mode and given to [`blocking_set`] once the change is made.
pub fn mark(fd: i32) -> u64 {
    slot(fd).map_or(0, |slot| slot.load(Ordering::Relaxed))
}

/// The kernel made `fd` non-blocking (or blocking) as asked, and its mark
/// was `before` when the change was asked for: if the mark is still that
/// one, it now says the new mode. If it changed meanwhile (the number was
/// closed and made again in another thread, or forgotten), which socket
/// the change reached is not known, and the mark goes.
pub fn blocking_set(fd: i32, before: u64, nonblocking: bool) {
    let Some(slot) = slot(fd) else { return };
    let after = if before & MADE != 0 { before & !NONBLOCK | if nonblocking { NONBLOCK } else { 0 } } else { before };
    if slot.compare_exchange(before, after, Ordering::Relaxed, Ordering::Relaxed).is_err() {
        slot.store(0, Ordering::Relaxed);
    }
}

/// `setsockopt(level, name)` on `fd`: a timeout or a linger takes the
/// mark away (connect reads those from the kernel again).
pub fn option_set(fd: i32, level: i32, name: i32) {
    if level == libc::SOL_SOCKET
        && matches!(
            name,
            libc::SO_RCVTIMEO | libc::SO_RCVTIMEO_NEW | libc::SO_SNDTIMEO | libc::SO_SNDTIMEO_NEW | libc::SO_LINGER
        )
    {
        forget(fd);
    }
}

/// Every note goes: a fork is being made (the child holds the same
/// sockets; the fork handlers call it before and after, in both
/// processes), a program is spawned or exec'd (a vfork child's notes are
/// its parent's memory; a new program may change the sockets it
/// inherits), or descriptors are sent or received.
pub fn forget_all() {
    EPOCH.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A real socket number, so that no other test's mark is on it.
    fn number() -> std::net::UdpSocket {
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap()
    }

    #[test]
    fn only_an_ipv4_tcp_socket_made_here_is_marked_with_its_blocking_mode() {
        // A fork moves the epoch on, and so do these tests.
        let _epoch = crate::sys::no_fork_meanwhile();
        let held = number();
        let fd = held.as_raw_fd();
        made(epoch(), fd, libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert_eq!(known(fd), Some(Fresh { nonblocking: false }));
        made(epoch(), fd, libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, libc::IPPROTO_TCP);
        assert_eq!(known(fd), Some(Fresh { nonblocking: true }));
        for (domain, ty, protocol) in [
            (libc::AF_INET6, libc::SOCK_STREAM, 0),
            (libc::AF_INET, libc::SOCK_DGRAM, 0),
            (libc::AF_INET, libc::SOCK_STREAM, 262), // MPTCP
            (libc::AF_UNIX, libc::SOCK_STREAM, 0),
        ] {
            made(epoch(), fd, libc::AF_INET, libc::SOCK_STREAM, 0);
            made(epoch(), fd, domain, ty, protocol);
            assert_eq!(known(fd), None, "{domain} {ty} {protocol}");
        }
        made(epoch(), -1, libc::AF_INET, libc::SOCK_STREAM, 0);
        assert_eq!(known(-1), None);
    }

    #[test]
    fn a_timeout_a_linger_a_forget_or_a_new_epoch_takes_the_mark_away() {
        // A fork moves the epoch on, and so do these tests.
        let _epoch = crate::sys::no_fork_meanwhile();
        let held = number();
        let fd = held.as_raw_fd();
        let marked = || {
            made(epoch(), fd, libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(known(fd).is_some());
        };
        marked();
        option_set(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY);
        option_set(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR);
        assert!(known(fd).is_some(), "options connect does not read leave it");
        for name in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO_NEW, libc::SO_LINGER] {
            marked();
            option_set(fd, libc::SOL_SOCKET, name);
            assert_eq!(known(fd), None, "{name}");
        }
        marked();
        forget(fd);
        assert_eq!(known(fd), None);
        marked();
        forget_all();
        assert_eq!(known(fd), None, "an older epoch's mark is none");
        marked();
    }

    #[test]
    fn a_blocking_mode_set_through_the_hooks_is_noted_and_a_mark_changed_meanwhile_goes() {
        // A fork moves the epoch on, and so do these tests.
        let _epoch = crate::sys::no_fork_meanwhile();
        let held = number();
        let fd = held.as_raw_fd();
        made(epoch(), fd, libc::AF_INET, libc::SOCK_STREAM, 0);
        let before = mark(fd);
        blocking_set(fd, before, true);
        assert_eq!(known(fd), Some(Fresh { nonblocking: true }));
        blocking_set(fd, mark(fd), false);
        assert_eq!(known(fd), Some(Fresh { nonblocking: false }), "and back");

        // The number was closed and made again between the read and the
        // change: the change may have reached either socket.
        let before = mark(fd);
        forget(fd);
        made(epoch(), fd, libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
        blocking_set(fd, before, false);
        assert_eq!(known(fd), None);

        // No mark before: none after.
        forget(fd);
        blocking_set(fd, mark(fd), true);
        assert_eq!(known(fd), None);
        assert_eq!(mark(fd), 0);

        // A fork between the read and the change: the mark is of an older
        // epoch, and stays none.
        made(epoch(), fd, libc::AF_INET, libc::SOCK_STREAM, 0);
        let before = mark(fd);
        forget_all();
        blocking_set(fd, before, true);
        assert_eq!(known(fd), None);
    }
}
