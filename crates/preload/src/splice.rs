//! splice(2) between a pipe and a vSocket connection.
//!
//! The kernel cannot move pages into or out of a ring in shared memory, so
//! the bytes pass through the thread's scratch buffer. Neither side may
//! lose any: bytes are copied out of the source without consuming them
//! (`tee` for a pipe, a peek for a connection), offered to the
//! destination, and only as many as it took are then consumed from the
//! source. A private pipe lets the
//! kernel apply the caller's pipe semantics (SPLICE_F_NONBLOCK, a full or
//! widowed pipe) to the caller's pipe exactly.

use crate::conn::Connection;
use crate::scratch;
use crate::sys::{self, Errno, SysResult};
use std::os::fd::RawFd;

/// The most one call moves (all of it passes through the scratch buffer at
/// once).
const CHUNK: usize = scratch::LEN;

/// A private pipe, closed when dropped. It is blocking, so that the kernel
/// judges blocking by the caller's pipe and flags alone (it treats a
/// splice or tee as non-blocking if either pipe is).
struct PrivatePipe {
    read: RawFd,
    write: RawFd,
    /// What it holds: no call stages more, so no write to it waits.
    capacity: usize,
}

impl PrivatePipe {
    fn new() -> SysResult<PrivatePipe> {
        let (read, write) = sys::pipe()?;
        let mut pipe = PrivatePipe { read, write, capacity: 0 };
        pipe.capacity = sys::fcntl(write, libc::F_GETPIPE_SZ, 0)?.min(CHUNK);
        Ok(pipe)
    }

    /// Reads the staged bytes back into `buf`, whole.
    fn take(&self, buf: &mut [u8]) -> SysResult<()> {
        let mut at = 0;
        while at < buf.len() {
            match sys::read(self.read, &mut buf[at..]) {
                Ok(0) => return Err(Errno(libc::EIO)),
                Ok(k) => at += k,
                Err(Errno(libc::EINTR)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Drop for PrivatePipe {
    fn drop(&mut self) {
        let _ = sys::close(self.read);
        let _ = sys::close(self.write);
    }
}

/// The side of a splice opposite a vSocket connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtherSide {
    /// Another vSocket connection.
    Connection,
    /// Any other descriptor (a pipe, if the call is to work).
    Descriptor(RawFd),
}

/// The sides the caller passed an offset for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    pub conn: bool,
    pub other: bool,
}

/// Checks what splice(2) checks before moving anything, for a call with a
/// vSocket connection on one side and `other` on the other.
pub fn check(other: OtherSide, offsets: Offsets, flags: u32) -> SysResult<()> {
    if flags & !(libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MORE | libc::SPLICE_F_GIFT) != 0 {
        return Err(Errno(libc::EINVAL));
    }
    // One side must be a pipe; a pipe takes no offset, a socket none either.
    let is_pipe = match other {
        OtherSide::Connection => false,
        OtherSide::Descriptor(fd) => sys::is_pipe(fd)?,
    };
    if !is_pipe {
        return Err(Errno(libc::EINVAL));
    }
    if offsets.other {
        return Err(Errno(libc::ESPIPE));
    }
    if offsets.conn {
        return Err(Errno(libc::EINVAL));
    }
    Ok(())
}

/// splice(pipe → connection).
pub fn pipe_to_conn(pipe: RawFd, conn: &Connection, len: usize, flags: u32) -> SysResult<usize> {
    let private = PrivatePipe::new()?;
    // Copy without consuming; waits for data unless SPLICE_F_NONBLOCK, and
    // returns 0 when the pipe is empty and has no writers.
    let copied = sys::tee(pipe, private.write, len.min(private.capacity), flags & libc::SPLICE_F_NONBLOCK)?;
    if copied == 0 {
        return Ok(0);
    }
    scratch::with_scratch(copied, |buf| send_staged(&private, buf, pipe, conn, flags))
}

/// Sends the `buf.len()` bytes staged in `private` (a copy of the head of
/// `pipe`) on `conn`, then consumes from `pipe` as many as it took.
fn send_staged(private: &PrivatePipe, buf: &mut [u8], pipe: RawFd, conn: &Connection, flags: u32) -> SysResult<usize> {
    private.take(buf)?;
    let more = if flags & libc::SPLICE_F_MORE != 0 { libc::MSG_MORE } else { 0 };
    let sent = conn.send(&[&*buf], more)?;
    // Consume exactly what the connection took.
    let mut left = sent;
    while left > 0 {
        let n = left.min(buf.len());
        match sys::read(pipe, &mut buf[..n]) {
            Ok(0) => break,
            Ok(k) => left -= k,
            Err(Errno(libc::EINTR)) => continue,
            Err(_) => break,
        }
    }
    Ok(sent)
}

/// splice(connection → pipe). Bytes are taken only as the caller's pipe
/// has room for them. As the kernel does, a call finds the pipe full
/// before it looks at the connection: one that may not wait for room
/// (SPLICE_F_NONBLOCK, or a non-blocking pipe) fails with EAGAIN, one
/// that may waits, never holding the connection's read claim meanwhile,
/// so another process of the same end reading is not held up behind a
/// full pipe.
pub fn conn_to_pipe(conn: &Connection, pipe: RawFd, len: usize, flags: u32) -> SysResult<usize> {
    loop {
        if !wait_for_room(pipe, 0)? {
            let nonblocking = sys::fcntl(pipe, libc::F_GETFL, 0)? & libc::O_NONBLOCK as usize != 0;
            if flags & libc::SPLICE_F_NONBLOCK != 0 || nonblocking {
                return Err(Errno(libc::EAGAIN));
            }
            wait_for_room(pipe, -1)?;
            continue;
        }
        let private = PrivatePipe::new()?;
        let mut full = false;
        let moved = conn.recv_into(len.min(private.capacity), |bytes| {
            let staged = sys::write(private.write, bytes)?;
            // The caller's pipe takes what it has room for; the rest stays
            // in the connection (what it did not take is discarded with
            // the private pipe).
            let more = flags & libc::SPLICE_F_MORE;
            match sys::splice(private.read, pipe, staged, libc::SPLICE_F_NONBLOCK | more) {
                Err(Errno(libc::EAGAIN)) => {
                    full = true;
                    Ok(0)
                }
                other => other,
            }
        });
        // Not when another writer of the caller's pipe filled it meanwhile:
        // that is found above.
        if !(full && moved == Ok(0)) {
            return moved;
        }
    }
}

/// Waits until `pipe` has room (or no reader: the splice then says so),
/// at most `timeout_ms` (negative: for as long as it takes); whether it
/// has.
fn wait_for_room(pipe: RawFd, timeout_ms: i32) -> SysResult<bool> {
    let mut pfd = [libc::pollfd { fd: pipe, events: libc::POLLOUT, revents: 0 }];
    sys::poll(&mut pfd, timeout_ms).map(|n| n > 0)
}
