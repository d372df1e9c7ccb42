//! A buffer per thread for the calls whose bytes must pass through the
//! library (sendfile, splice): the kernel cannot move pages into or out of
//! a ring in shared memory. A buffer of their size per call would be a heap
//! allocation per call, and 64 KiB is too much for the stack of a thread
//! the library does not own; so each thread allocates one on its first such
//! call and keeps it (as `epoll` keeps its buffer of kernel events).

use std::cell::Cell;

/// The most one call borrows.
pub const LEN: usize = 1 << 16;

thread_local! {
    static SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on `len` bytes (at most [`LEN`]) of this thread's scratch
/// buffer, whose contents are whatever an earlier call left there. A call
/// made while the buffer is lent out (from a signal handler that
/// interrupted one) or while the thread exits gets a buffer of its own.
pub fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    let mut buf = SCRATCH.try_with(Cell::take).unwrap_or_default();
    if buf.len() < LEN {
        buf.resize(LEN, 0);
    }
    let result = f(&mut buf[..len.min(LEN)]);
    let _ = SCRATCH.try_with(|kept| kept.set(buf));
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_reuses_its_buffer_and_a_nested_call_gets_another() {
        let first = with_scratch(10, |buf| {
            assert_eq!(buf.len(), 10);
            buf.as_ptr()
        });
        let again = with_scratch(LEN + 1, |buf| {
            assert_eq!(buf.len(), LEN);
            let nested = with_scratch(5, |inner| inner.as_ptr());
            assert_ne!(nested, buf.as_ptr());
            buf.as_ptr()
        });
        assert_eq!(first, again);
    }
}
