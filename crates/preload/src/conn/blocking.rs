//! Blocking on a connection: spin briefly (see `spin`), then sleep in the
//! kernel.
//!
//! After the spin the waiter counts itself among the connection's sleepers,
//! arms the ring's `waiting` flag, checks once more, and sleeps in `poll` on
//! the doorbell, so an idle program uses no CPU and signals interrupt it as
//! they would a kernel socket. Other waiters on the same connection (threads,
//! an epoll or poll elsewhere, a forked child) leave the doorbell and the
//! arming to it while it is counted (see `Connection::fall_asleep`). Sleeps
//! are still capped, as a bound should a wake-up be lost anyway.

use super::{Connection, Direction};
use crate::readiness::Interest;
use crate::signals::{self, SocketTimeout};
use crate::sys::{self, Errno, SysResult};
use vsocket_ring::spin::spin_thread;

/// Longest single sleep before shared memory is checked again.
pub const MAX_SLEEP_MS: i32 = 200;

/// Blocks until `conn` satisfies `interest`, or a signal interrupts
/// (EINTR).
pub fn block(conn: &Connection, interest: Interest) -> SysResult<()> {
    block_until(conn, interest, || conn.satisfies(interest))
}

/// Blocks until `ready` holds, sleeping on `conn`'s doorbell armed for
/// `interest` (the events that can change `ready`), or a signal interrupts.
pub fn block_until(conn: &Connection, interest: Interest, mut ready: impl FnMut() -> bool) -> SysResult<()> {
    signals::wait_begins();
    let Some(_sleeping) = spin_thread(&mut ready) else {
        return Ok(());
    };
    sleep(conn, interest, ready)
}

fn sleep(conn: &Connection, interest: Interest, mut ready: impl FnMut() -> bool) -> SysResult<()> {
    // SO_RCVTIMEO / SO_SNDTIMEO: EAGAIN when they run out, as the kernel does.
    let direction = if interest.writes() { Direction::Send } else { Direction::Receive };
    let timeout_ms = conn.timeout_ms(direction);
    let deadline = (timeout_ms > 0).then(|| sys::now_ms() + timeout_ms);
    let timeout = if deadline.is_some() { SocketTimeout::Set } else { SocketTimeout::None };
    loop {
        conn.fall_asleep(interest);
        if ready() {
            conn.wake(interest, false);
            return Ok(());
        }
        // A handler that ran since the wait began (in the spin, or between
        // two sleeps, where the kernel's call would have been asleep) ends
        // it as one that interrupted a sleep would.
        if signals::interrupts(timeout) {
            conn.wake(interest, false);
            return Err(Errno(libc::EINTR));
        }
        let sleep = match deadline {
            None => MAX_SLEEP_MS,
            Some(d) => {
                let left = d - sys::now_ms();
                if left <= 0 {
                    conn.wake(interest, false);
                    return Err(Errno(libc::EAGAIN));
                }
                left.min(MAX_SLEEP_MS as i64) as i32
            }
        };
        let mut pfd = [libc::pollfd { fd: conn.doorbell, events: libc::POLLIN, revents: 0 }];
        let slept = sys::poll(&mut pfd, sleep);
        conn.wake(interest, pfd[0].revents != 0);
        match slept {
            Ok(_) => {}
            // The kernel restarts a socket call whose signal handler asked
            // for it (SA_RESTART), unless the socket has a timeout.
            Err(Errno(libc::EINTR)) if signals::restart_after_interrupt(timeout) => {}
            Err(e) => return Err(e),
        }
        if ready() {
            return Ok(());
        }
    }
}
