//! sendmmsg and recvmmsg on a stream socket, as Linux does them: one
//! sendmsg or recvmsg per message, in order.

use crate::sys::{self, Errno, SysResult};

/// What one sendmsg of a batch did.
pub struct Sent {
    /// Bytes sent.
    pub bytes: usize,
    /// Bytes the message held.
    pub of: usize,
}

/// sendmmsg over `count` messages, `send(i)` sending message `i`: messages
/// go one by one until one fails or is sent only in part. The count sent,
/// or the first message's error.
pub fn send_each(count: usize, mut send: impl FnMut(usize) -> SysResult<Sent>) -> SysResult<usize> {
    let mut sent = 0;
    while sent < count {
        match send(sent) {
            Err(e) if sent == 0 => return Err(e),
            Err(_) => break,
            Ok(Sent { bytes, of }) => {
                sent += 1;
                if bytes < of {
                    break;
                }
            }
        }
    }
    Ok(sent)
}

/// A recvmmsg timeout, as a deadline on the monotonic clock.
pub struct Deadline(u64);

impl Deadline {
    /// The deadline `timeout` from now; EINVAL for a timeout the kernel
    /// refuses.
    pub fn after(timeout: libc::timespec) -> SysResult<Deadline> {
        if timeout.tv_sec < 0 || !(0..1_000_000_000).contains(&timeout.tv_nsec) {
            return Err(Errno(libc::EINVAL));
        }
        let ns = timeout.tv_sec as u64 * 1_000_000_000 + timeout.tv_nsec as u64;
        Ok(Deadline(sys::now_ns().saturating_add(ns)))
    }

    /// The time left, as a timespec.
    fn left(&self) -> libc::timespec {
        let left = self.0.saturating_sub(sys::now_ns());
        libc::timespec {
            tv_sec: (left / 1_000_000_000) as libc::time_t,
            tv_nsec: (left % 1_000_000_000) as libc::c_long,
        }
    }
}

/// recvmmsg over `count` messages, `recv(i, flags)` receiving message `i`:
/// MSG_WAITFORONE makes every message after the first non-blocking; the
/// deadline is checked only after each message (the documented Linux
/// behaviour) and `time_left` told what remains each time. An error after
/// the first message ends the batch; the count received, or the first
/// message's error.
pub fn recv_each(
    count: usize,
    flags: i32,
    deadline: Option<Deadline>,
    mut recv: impl FnMut(usize, i32) -> SysResult<usize>,
    mut time_left: impl FnMut(libc::timespec),
) -> SysResult<usize> {
    let mut flags = flags;
    let mut got = 0;
    while got < count {
        match recv(got, flags & !libc::MSG_WAITFORONE) {
            Err(e) if got == 0 => return Err(e),
            Err(_) => break,
            Ok(_) => got += 1,
        }
        if flags & libc::MSG_WAITFORONE != 0 {
            flags |= libc::MSG_DONTWAIT;
        }
        if let Some(d) = &deadline {
            let left = d.left();
            time_left(left);
            if left.tv_sec == 0 && left.tv_nsec == 0 {
                break;
            }
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_stops_at_a_short_send_and_reports_only_a_first_error() {
        let sizes = [10, 10, 4, 10];
        let sent = send_each(4, |i| Ok(Sent { bytes: sizes[i], of: 10 }));
        assert_eq!(sent, Ok(3));
        assert_eq!(send_each(3, |_| Err(Errno(libc::EPIPE))), Err(Errno(libc::EPIPE)));
        assert_eq!(
            send_each(3, |i| if i == 0 { Ok(Sent { bytes: 1, of: 1 }) } else { Err(Errno(libc::EPIPE)) }),
            Ok(1)
        );
        assert_eq!(send_each(0, |_| Err(Errno(libc::EPIPE))), Ok(0));
    }

    #[test]
    fn waitforone_makes_the_rest_of_the_batch_non_blocking() {
        let mut seen = Vec::new();
        let got = recv_each(
            3,
            libc::MSG_WAITFORONE,
            None,
            |_, f| {
                seen.push(f);
                if seen.len() < 3 {
                    Ok(1)
                } else {
                    Err(Errno(libc::EAGAIN))
                }
            },
            |_| {},
        );
        assert_eq!(got, Ok(2));
        assert_eq!(seen, vec![0, libc::MSG_DONTWAIT, libc::MSG_DONTWAIT]);
    }

    #[test]
    fn an_expired_deadline_ends_the_batch_after_one_message() {
        let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        let mut told = 0;
        let got = recv_each(5, 0, Some(Deadline::after(zero).unwrap()), |_, _| Ok(1), |_| told += 1);
        assert_eq!((got, told), (Ok(1), 1));
        assert!(Deadline::after(libc::timespec { tv_sec: 0, tv_nsec: 1_000_000_000 }).is_err());
        assert!(Deadline::after(libc::timespec { tv_sec: -1, tv_nsec: 0 }).is_err());
    }
}
