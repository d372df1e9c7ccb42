//! Waiting for a connection: spin briefly, then sleep in the kernel.
//!
//! A waiter first polls shared memory for a bounded time (a reply on a
//! busy connection usually arrives within microseconds, and sleeping would
//! cost two context switches). Then it arms the ring's `waiting` flag,
//! checks once more, and sleeps in `poll` on the doorbell, so an idle
//! program uses no CPU and signals interrupt it as they would a kernel
//! socket. Sleeps are capped so that a wake-up lost to another waiter of
//! the same connection in this process (two threads on one socket) costs
//! latency, never a hang.

use crate::conn::Connection;
use crate::sys::{self, Errno, SysResult};

/// How long a waiter spins before sleeping.
const SPIN_NS: u64 = 30_000;
/// Longest single sleep before shared memory is checked again.
pub const MAX_SLEEP_MS: i32 = 200;

/// Spins until `ready()` or the spin budget is spent.
pub fn spin(mut ready: impl FnMut() -> bool) -> bool {
    let start = sys::now_ns();
    let mut i = 0u32;
    loop {
        if ready() {
            return true;
        }
        i = i.wrapping_add(1);
        if i.is_multiple_of(32) {
            if sys::now_ns().saturating_sub(start) > SPIN_NS {
                return false;
            }
            // Two busy programs and the daemon may share fewer cores than
            // they are: let whoever else is runnable here make progress.
            sys::yield_now();
        }
        std::hint::spin_loop();
    }
}

/// Blocks until `conn` satisfies `interest` (epoll bits), or a signal
/// interrupts (EINTR).
pub fn block(conn: &Connection, interest: u32) -> SysResult<()> {
    if spin(|| conn.satisfies(interest)) {
        return Ok(());
    }
    // SO_RCVTIMEO / SO_SNDTIMEO: EAGAIN when they run out, as the kernel does.
    let timeout_ms = conn.timeout_ms(interest);
    let deadline = (timeout_ms > 0).then(|| sys::now_ms() + timeout_ms);
    loop {
        conn.arm(interest);
        if conn.satisfies(interest) {
            return Ok(());
        }
        let sleep = match deadline {
            None => MAX_SLEEP_MS,
            Some(d) => {
                let left = d - sys::now_ms();
                if left <= 0 {
                    return Err(Errno(libc::EAGAIN));
                }
                left.min(MAX_SLEEP_MS as i64) as i32
            }
        };
        let mut pfd = [libc::pollfd { fd: conn.doorbell, events: libc::POLLIN, revents: 0 }];
        match sys::poll(&mut pfd, sleep) {
            Ok(_) => {}
            Err(Errno(libc::EINTR)) => return Err(Errno(libc::EINTR)),
            Err(e) => return Err(e),
        }
        if pfd[0].revents != 0 {
            conn.drain_doorbell();
        }
        if conn.satisfies(interest) {
            return Ok(());
        }
    }
}
