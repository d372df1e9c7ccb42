//! sendfile(2) into a vSocket connection: the file's bytes are read here
//! and written to the ring (the kernel cannot splice into shared memory),
//! through the thread's scratch buffer.

use crate::conn::Connection;
use crate::scratch;
use crate::sys::{self, SysResult};
use std::os::fd::RawFd;

/// Largest read from the file per round.
const CHUNK: usize = scratch::LEN;

/// Sends up to `count` bytes of `in_fd` on `conn`: from `offset` (which
/// then moves past what was sent) when given, else from the file's own
/// offset (which is given back what the connection did not take). The
/// bytes sent; an error only if none were.
pub fn sendfile(conn: &Connection, in_fd: RawFd, offset: Option<&mut i64>, count: usize) -> SysResult<usize> {
    scratch::with_scratch(count.min(CHUNK), |buf| send_through(buf, conn, in_fd, offset, count))
}

/// [`sendfile`], the bytes passing through `buf`.
fn send_through(
    buf: &mut [u8],
    conn: &Connection,
    in_fd: RawFd,
    offset: Option<&mut i64>,
    count: usize,
) -> SysResult<usize> {
    let mut total = 0usize;
    let mut pos = offset.as_deref().copied();
    while total < count {
        let want = (count - total).min(buf.len());
        let got = match pos {
            Some(p) => sys::pread(in_fd, &mut buf[..want], p),
            None => sys::read(in_fd, &mut buf[..want]),
        };
        let got = match got {
            Ok(0) => break,
            Ok(n) => n,
            Err(_) if total > 0 => break,
            Err(e) => return Err(e),
        };
        let sent = match conn.send(&[&buf[..got]], 0) {
            Ok(n) => n,
            Err(e) if total == 0 => return Err(e),
            Err(_) => 0,
        };
        total += sent;
        if let Some(p) = pos.as_mut() {
            *p += sent as i64;
        } else if sent < got {
            // Give back what the connection did not take.
            let _ = sys::lseek(in_fd, sent as i64 - got as i64, libc::SEEK_CUR);
        }
        if sent < got {
            break;
        }
    }
    if let (Some(p), Some(offset)) = (pos, offset) {
        *offset = p;
    }
    Ok(total)
}
