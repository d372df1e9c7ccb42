//! System calls made directly (`syscall(2)`), not through libc's wrappers,
//! for the helpers both the daemon and the preloaded library need: inside
//! libvsocket.so a call to libc's `recv`, `read`, `pipe2` or `socketpair`
//! would land in the library's own hooks. Descriptors are returned raw;
//! the daemon's callers wrap them in `OwnedFd` (see the crate root).

use std::io;
use std::os::fd::RawFd;

/// `syscall(nr, args...)` as an `io::Result`.
macro_rules! raw {
    ($nr:expr $(, $arg:expr)*) => {{
        // SAFETY: every caller passes arguments valid for this system
        // call (live buffers of the stated lengths, descriptors it holds).
        let ret = unsafe { libc::syscall($nr $(, $arg)*) };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret as usize)
        }
    }};
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> io::Result<(RawFd, RawFd)> {
    let mut fds = [0 as RawFd; 2];
    raw!(libc::SYS_pipe2, fds.as_mut_ptr(), libc::O_CLOEXEC)?;
    Ok((fds[0], fds[1]))
}

/// A close-on-exec connected pair of unix seqpacket sockets, the first
/// non-blocking.
pub fn seqpacket_pair_nonblocking_first() -> io::Result<(RawFd, RawFd)> {
    let mut fds = [0 as RawFd; 2];
    raw!(libc::SYS_socketpair, libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())?;
    if let Err(e) = raw!(libc::SYS_fcntl, fds[0], libc::F_SETFL, libc::O_NONBLOCK | libc::O_RDWR) {
        close(fds[0]);
        close(fds[1]);
        return Err(e);
    }
    Ok((fds[0], fds[1]))
}

/// A close-on-exec connected pair of unix stream sockets.
pub fn stream_pair() -> io::Result<(RawFd, RawFd)> {
    let mut fds = [0 as RawFd; 2];
    raw!(libc::SYS_socketpair, libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())?;
    Ok((fds[0], fds[1]))
}

/// Closes `fd`.
pub fn close(fd: RawFd) {
    let _ = raw!(libc::SYS_close, fd);
}

/// Reads a doorbell, eventfd or pipe until it is empty, without blocking:
/// for a thread whose own event loop watches it (the daemon's). Returns
/// true if its other end has hung up (end of file); a hang-up right behind
/// a short read, or a reset, shows at the next call (epoll reports it
/// again).
pub fn drain_until_empty(fd: RawFd) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match raw!(libc::SYS_recvfrom, fd, buf.as_mut_ptr(), buf.len(), libc::MSG_DONTWAIT, 0usize, 0usize) {
            Ok(0) => return true,
            // A short read emptied it (for now): spare the call that would
            // say so.
            Ok(n) if n < buf.len() => return false,
            Ok(_) => continue,
            // An eventfd or a pipe.
            Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => {
                match raw!(libc::SYS_read, fd, buf.as_mut_ptr(), buf.len()) {
                    Ok(0) => return true,
                    Ok(_) => continue,
                    Err(_) => return false,
                }
            }
            Err(_) => return false,
        }
    }
}

/// Reads and discards what is queued on a doorbell socket, without
/// blocking and at most 4 KiB: the preloaded library drains on an
/// application's thread, and a peer that floods its doorbell must not keep
/// that thread here (a doorbell still readable after this reports again).
/// Returns true if the other end is gone (end of stream, or a reset).
pub fn drain_bounded(fd: RawFd) -> bool {
    let mut buf = [0u8; 1024];
    for _ in 0..4 {
        match raw!(libc::SYS_recvfrom, fd, buf.as_mut_ptr(), buf.len(), libc::MSG_DONTWAIT, 0usize, 0usize) {
            Ok(0) => return true,
            Ok(n) if n < buf.len() => return false,
            Ok(_) => continue,
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ECONNRESET) => return true,
                _ => return false,
            },
        }
    }
    false
}

/// What [`recv_with_fds`] received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes of the message.
    pub len: usize,
    /// The kernel dropped descriptors that did not fit (`MSG_CTRUNC`): the
    /// receiver had no room for them, or sent more than fit the buffer.
    pub truncated: bool,
}

/// Receives one message on `fd` with `flags` (`MSG_CMSG_CLOEXEC` added),
/// handing each descriptor that came with it (SCM_RIGHTS) to `each`, which
/// owns it from then on. The control buffer has room for
/// [`MAX_SEND_FDS`] descriptors, as many as one message can carry; the
/// kernel closes any beyond and sets `MSG_CTRUNC`.
pub fn recv_with_fds(fd: RawFd, buf: &mut [u8], flags: i32, mut each: impl FnMut(RawFd)) -> io::Result<Received> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let mut control = [0u64; CONTROL_WORDS];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&control);
    let len = raw!(libc::SYS_recvmsg, fd, &mut msg as *mut libc::msghdr, flags | libc::MSG_CMSG_CLOEXEC)?;
    // SAFETY: the kernel filled the live `control` with well-formed messages
    // within msg_controllen; CMSG_* walk only those, and each SCM_RIGHTS
    // payload holds (cmsg_len - CMSG_LEN(0)) / 4 descriptors, read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                let count = ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    each(data.add(i).read_unaligned());
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received { len, truncated: msg.msg_flags & libc::MSG_CTRUNC != 0 })
}

/// The most descriptors one [`send_with_fds`] carries: Linux's
/// `SCM_MAX_FD` (a batch of kits takes up to 134).
pub const MAX_SEND_FDS: usize = 253;
/// A control buffer for one SCM_RIGHTS header (16 bytes) and
/// [`MAX_SEND_FDS`] descriptors, in u64 words.
const CONTROL_WORDS: usize = (16 + 4 * MAX_SEND_FDS).div_ceil(8);

/// Sends one datagram with up to [`MAX_SEND_FDS`] descriptors (SCM_RIGHTS)
/// on `fd`, whole or not at all.
pub fn send_with_fds(fd: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_SEND_FDS {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let mut control = [0u64; CONTROL_WORDS];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let data_len = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space;
        // SAFETY: `control` (CONTROL_WORDS) fits one header and MAX_SEND_FDS
        // descriptors, which CMSG_SPACE rounds as CONTROL_WORDS does;
        // CMSG_FIRSTHDR and CMSG_DATA stay inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(data_len) as usize;
            let data = libc::CMSG_DATA(cmsg) as *mut RawFd;
            for (i, &one) in fds.iter().enumerate() {
                data.add(i).write_unaligned(one);
            }
        }
    }
    loop {
        match raw!(libc::SYS_sendmsg, fd, &msg as *const libc::msghdr, libc::MSG_NOSIGNAL) {
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(_) => return Err(io::Error::new(io::ErrorKind::WriteZero, "short datagram send")),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The two drains differ on purpose; these pin where.
    use super::*;

    fn write_all(fd: RawFd, bytes: &[u8]) {
        let mut at = 0;
        while at < bytes.len() {
            at += raw!(libc::SYS_write, fd, bytes[at..].as_ptr(), bytes.len() - at).unwrap();
        }
    }

    fn queued(fd: RawFd) -> usize {
        let mut n: libc::c_int = 0;
        raw!(libc::SYS_ioctl, fd, libc::FIONREAD, &mut n as *mut libc::c_int).unwrap();
        n as usize
    }

    #[test]
    fn a_flooded_doorbell_is_emptied_by_the_daemon_and_read_4_kib_at_a_time_by_the_library() {
        let (bell, peer) = stream_pair().unwrap();
        write_all(peer, &[1; 10_000]);
        assert!(!drain_bounded(bell));
        assert_eq!(queued(bell), 10_000 - 4096);
        assert!(!drain_until_empty(bell));
        assert_eq!(queued(bell), 0);
        close(peer);
        assert!(drain_bounded(bell));
        assert!(drain_until_empty(bell));
        close(bell);
    }

    /// A doorbell whose peer closed with a byte it never read: the next
    /// read of it reports a reset, the one after end of stream.
    fn reset_bell() -> RawFd {
        let (bell, peer) = stream_pair().unwrap();
        write_all(bell, b"x");
        close(peer);
        bell
    }

    #[test]
    fn a_reset_is_the_end_to_the_library_at_once_and_to_the_daemon_at_the_next_call() {
        let bell = reset_bell();
        assert!(drain_bounded(bell));
        close(bell);
        let bell = reset_bell();
        assert!(!drain_until_empty(bell));
        assert!(drain_until_empty(bell));
        close(bell);
    }

    #[test]
    fn the_daemon_drains_pipes_and_eventfds_too() {
        let (read, write) = pipe().unwrap();
        write_all(write, &[2; 1000]);
        close(write);
        assert!(drain_until_empty(read));
        close(read);
        let event = raw!(libc::SYS_eventfd2, 0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap() as RawFd;
        write_all(event, &1u64.to_ne_bytes());
        assert!(!drain_until_empty(event));
        let mut count = [0u8; 8];
        assert!(raw!(libc::SYS_read, event, count.as_mut_ptr(), count.len()).is_err(), "the eventfd was emptied");
        close(event);
    }
}
