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

/// Empties a doorbell (a socket, a pipe or an eventfd) without waiting.
/// Returns whether its other end is gone (end of stream, or a reset):
/// every holder of the peer's end let go. Reads at most 4 KiB: a doorbell
/// still readable after that reports again.
pub fn drain(fd: RawFd) -> bool {
    let mut buf = [0u8; 1024];
    for _ in 0..4 {
        let got = match raw!(libc::SYS_recvfrom, fd, buf.as_mut_ptr(), buf.len(), libc::MSG_DONTWAIT, 0usize, 0usize) {
            // An eventfd or a pipe.
            Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => raw!(libc::SYS_read, fd, buf.as_mut_ptr(), buf.len()),
            other => other,
        };
        match got {
            Ok(0) => return true,
            // A short read emptied it (for now): spare the call that would
            // say so.
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
/// owns it from then on. Room for up to 16 descriptors.
pub fn recv_with_fds(fd: RawFd, buf: &mut [u8], flags: i32, mut each: impl FnMut(RawFd)) -> io::Result<Received> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let mut control = [0u64; 16];
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
