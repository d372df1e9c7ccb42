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
        let (sent, failed) = match conn.send(&[&buf[..got]], 0) {
            Ok(n) => (n, None),
            Err(e) => (0, Some(e)),
        };
        total += sent;
        if let Some(p) = pos.as_mut() {
            *p += sent as i64;
        } else if sent < got {
            // Give back what the connection did not take (all of it, if
            // the send failed): the file's offset says what was sent.
            let _ = sys::lseek(in_fd, sent as i64 - got as i64, libc::SEEK_CUR);
        }
        match failed {
            Some(e) if total == 0 => return Err(e),
            _ if sent < got => break,
            _ => {}
        }
    }
    if let (Some(p), Some(offset)) = (pos, offset) {
        *offset = p;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::testing::pair;
    use crate::conn::Blocking;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    fn file_of(len: usize) -> std::fs::File {
        let path = std::env::temp_dir().join(format!("vsocket-sendfile-{}-{len}", std::process::id()));
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&vec![7u8; len]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    fn offset(file: &std::fs::File) -> usize {
        sys::lseek(file.as_raw_fd(), 0, libc::SEEK_CUR).unwrap()
    }

    #[test]
    fn the_file_offset_says_what_was_sent() {
        let (c, _s) = pair(4096);
        c.set_blocking(Blocking::NonBlocking);
        let file = file_of(10_000);
        // The ring takes 4096 bytes: the offset moves by those alone.
        assert_eq!(sendfile(&c, file.as_raw_fd(), None, 10_000), Ok(4096));
        assert_eq!(offset(&file), 4096);
        // A full ring: nothing sent, and the offset does not move.
        assert_eq!(sendfile(&c, file.as_raw_fd(), None, 100), Err(sys::Errno(libc::EAGAIN)));
        assert_eq!(offset(&file), 4096);
        // With an offset of the caller's, the file's own never moves.
        let mut at = 0i64;
        assert_eq!(sendfile(&c, file.as_raw_fd(), Some(&mut at), 100), Err(sys::Errno(libc::EAGAIN)));
        assert_eq!((at, offset(&file)), (0, 4096));
    }
}
