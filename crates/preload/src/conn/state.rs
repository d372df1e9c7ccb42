//! The local state of one end of a connection: one word of flags, each
//! changed only by a named transition, so that the combinations readiness
//! and the calls decide on are read in one load.
//!
//! (Whether every process holding the peer's end is gone is kept apart, as
//! an `AtomicBool` the ring views consult themselves.)

use std::sync::atomic::{AtomicU32, Ordering};

/// Blocking or not (O_NONBLOCK, FIONBIO, SOCK_NONBLOCK).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocking {
    Blocking,
    NonBlocking,
}

impl Blocking {
    /// The mode file status flags give (O_NONBLOCK, which is also
    /// SOCK_NONBLOCK).
    pub fn from_flags(flags: i32) -> Blocking {
        if flags & libc::O_NONBLOCK != 0 {
            Blocking::NonBlocking
        } else {
            Blocking::Blocking
        }
    }
}

/// A set of [`State`] flags, as read at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flags(u32);

impl Flags {
    /// Calls on the connection do not wait.
    pub const NONBLOCKING: Flags = Flags(1 << 0);
    /// shutdown(SHUT_RD): reads see end of stream.
    pub const READ_SHUT: Flags = Flags(1 << 1);
    /// shutdown(SHUT_WR): the FIN is (or is about to be) published.
    pub const WRITE_SHUT: Flags = Flags(1 << 2);
    /// ECONNRESET was reported once; later reads see end of stream.
    pub const RESET_REPORTED: Flags = Flags(1 << 3);
    /// A write was discarded because the peer had closed (its "reset").
    pub const RESET_BY_PEER: Flags = Flags(1 << 4);
    /// The peer broke the ring protocol: the connection is reset.
    pub const BROKEN: Flags = Flags(1 << 5);
    /// SO_LINGER with a zero timeout: the last close aborts (RST) instead
    /// of finishing the stream, as Linux does.
    pub const ABORT_ON_CLOSE: Flags = Flags(1 << 6);
    /// This process's end was closed.
    pub const CLOSED: Flags = Flags(1 << 7);

    /// The flags as one word (carried across exec, see `exec`).
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Are all of `flags` set?
    pub fn contains(self, flags: Flags) -> bool {
        self.0 & flags.0 == flags.0
    }
}

/// The flags of one connection end.
pub struct State(AtomicU32);

impl State {
    pub fn new(blocking: Blocking) -> State {
        let initial = match blocking {
            Blocking::Blocking => 0,
            Blocking::NonBlocking => Flags::NONBLOCKING.0,
        };
        State(AtomicU32::new(initial))
    }

    /// The flags a connection had in the program image before exec
    /// (`Flags::bits`); only the known ones, and never `CLOSED`.
    pub fn resumed(bits: u32) -> State {
        State(AtomicU32::new(bits & (Flags::CLOSED.0 - 1)))
    }

    /// The flags now.
    #[inline]
    pub fn get(&self) -> Flags {
        Flags(self.0.load(Ordering::Relaxed))
    }

    /// Is `flag` set now?
    #[inline]
    pub fn has(&self, flag: Flags) -> bool {
        self.get().contains(flag)
    }

    /// Sets `flag`; did this call set it (it was clear)?
    fn raise(&self, flag: Flags, order: Ordering) -> bool {
        self.0.fetch_or(flag.0, order) & flag.0 == 0
    }

    fn put(&self, flag: Flags, on: bool) {
        if on {
            self.0.fetch_or(flag.0, Ordering::Relaxed);
        } else {
            self.0.fetch_and(!flag.0, Ordering::Relaxed);
        }
    }

    pub fn set_blocking(&self, blocking: Blocking) {
        self.put(Flags::NONBLOCKING, blocking == Blocking::NonBlocking);
    }

    /// SO_LINGER changed: abort on close or not.
    pub fn set_abort_on_close(&self, abort: bool) {
        self.put(Flags::ABORT_ON_CLOSE, abort);
    }

    /// shutdown(SHUT_RD).
    pub fn shut_read(&self) {
        self.raise(Flags::READ_SHUT, Ordering::Relaxed);
    }

    /// shutdown(SHUT_WR); true the first time (the FIN is still to send).
    pub fn shut_write(&self) -> bool {
        self.raise(Flags::WRITE_SHUT, Ordering::Relaxed)
    }

    /// The peer broke the protocol; true the first time (the rings are
    /// still to be reset).
    pub fn break_down(&self) -> bool {
        self.raise(Flags::BROKEN, Ordering::SeqCst)
    }

    /// A read is about to report ECONNRESET; false when one already did
    /// (this read sees end of stream).
    pub fn report_reset(&self) -> bool {
        self.raise(Flags::RESET_REPORTED, Ordering::Relaxed)
    }

    /// A write after the peer closed; true for the first, which is taken
    /// (the peer answers it with a reset), false for later ones (EPIPE).
    pub fn write_after_peer_closed(&self) -> bool {
        self.raise(Flags::RESET_BY_PEER, Ordering::Relaxed)
    }

    /// This process closes its end; true the first time.
    pub fn close(&self) -> bool {
        self.raise(Flags::CLOSED, Ordering::AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_report_only_their_first_time() {
        let s = State::new(Blocking::Blocking);
        assert_eq!(s.get(), Flags(0));
        assert!(s.shut_write());
        assert!(!s.shut_write());
        assert!(s.break_down() && !s.break_down());
        assert!(s.report_reset() && !s.report_reset());
        assert!(s.write_after_peer_closed() && !s.write_after_peer_closed());
        assert!(s.close() && !s.close());
        assert!(s.has(Flags::WRITE_SHUT) && s.has(Flags::BROKEN) && s.has(Flags::CLOSED));
        assert!(!s.has(Flags::READ_SHUT));
        s.shut_read();
        assert!(s.has(Flags::READ_SHUT));
    }

    #[test]
    fn settings_come_and_go_without_touching_the_rest() {
        let s = State::new(Blocking::NonBlocking);
        assert!(s.has(Flags::NONBLOCKING));
        s.shut_read();
        s.set_blocking(Blocking::Blocking);
        assert!(!s.has(Flags::NONBLOCKING) && s.has(Flags::READ_SHUT));
        s.set_abort_on_close(true);
        assert!(s.has(Flags::ABORT_ON_CLOSE));
        s.set_abort_on_close(false);
        assert!(!s.has(Flags::ABORT_ON_CLOSE) && s.has(Flags::READ_SHUT));
    }
}
