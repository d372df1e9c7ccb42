//! Readiness (what a descriptor can do now) and interest (what a waiter
//! waits for), in epoll's encoding; poll's bits are derived from it.

use std::ops::{BitAnd, BitOr, BitOrAssign};

/// Events a descriptor reports, as epoll_wait gives them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readiness(u32);

impl Readiness {
    pub const EMPTY: Readiness = Readiness(0);
    /// Bytes to read, or end of stream.
    pub const IN: Readiness = Readiness(libc::EPOLLIN as u32);
    /// Room to write, or a write would fail at once.
    pub const OUT: Readiness = Readiness(libc::EPOLLOUT as u32);
    /// An error is pending.
    pub const ERR: Readiness = Readiness(libc::EPOLLERR as u32);
    /// Both directions are finished.
    pub const HUP: Readiness = Readiness(libc::EPOLLHUP as u32);
    /// The peer finished its direction (FIN).
    pub const RDHUP: Readiness = Readiness(libc::EPOLLRDHUP as u32);
    /// Everything at once: what a broken connection reports.
    pub const ALL: Readiness = Readiness(Self::IN.0 | Self::OUT.0 | Self::ERR.0 | Self::HUP.0 | Self::RDHUP.0);

    /// The epoll event bits.
    #[inline]
    pub const fn epoll(self) -> u32 {
        self.0
    }

    /// Is any of `other` set?
    #[inline]
    pub fn intersects(self, other: Readiness) -> bool {
        self.0 & other.0 != 0
    }
}

impl BitOr for Readiness {
    type Output = Readiness;
    #[inline]
    fn bitor(self, other: Readiness) -> Readiness {
        Readiness(self.0 | other.0)
    }
}

impl BitOrAssign for Readiness {
    #[inline]
    fn bitor_assign(&mut self, other: Readiness) {
        self.0 |= other.0;
    }
}

impl BitAnd for Readiness {
    type Output = Readiness;
    #[inline]
    fn bitand(self, other: Readiness) -> Readiness {
        Readiness(self.0 & other.0)
    }
}

/// What a waiter waits for: readable, writable, the peer's FIN, or a mix.
/// Errors and hang-ups are always of interest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interest(u32);

impl Interest {
    pub const READABLE: Interest = Interest(libc::EPOLLIN as u32);
    pub const WRITABLE: Interest = Interest(libc::EPOLLOUT as u32);
    pub const RDHUP: Interest = Interest(libc::EPOLLRDHUP as u32);
    /// Everything a connection can report.
    pub const ANY: Interest = Interest(Self::READABLE.0 | Self::WRITABLE.0 | Self::RDHUP.0);

    /// The interest an epoll registration's events express (flags such as
    /// EPOLLET are not interest).
    #[inline]
    pub fn from_epoll(events: u32) -> Interest {
        Interest(events & Self::ANY.0)
    }

    /// Does it need the receiving side's state (bytes, FIN)?
    #[inline]
    pub fn reads(self) -> bool {
        self.0 & (Self::READABLE.0 | Self::RDHUP.0) != 0
    }

    /// Does it need the sending side's state (room)?
    #[inline]
    pub fn writes(self) -> bool {
        self.0 & Self::WRITABLE.0 != 0
    }

    /// The readiness that meets it, errors and hang-ups included.
    #[inline]
    pub fn met_by(self) -> Readiness {
        Readiness(self.0) | Readiness::ERR | Readiness::HUP
    }
}

impl BitOr for Interest {
    type Output = Interest;
    #[inline]
    fn bitor(self, other: Interest) -> Interest {
        Interest(self.0 | other.0)
    }
}

impl BitOrAssign for Interest {
    #[inline]
    fn bitor_assign(&mut self, other: Interest) {
        self.0 |= other.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interest_keeps_only_what_can_be_waited_for() {
        let events = (libc::EPOLLIN | libc::EPOLLET | libc::EPOLLONESHOT) as u32;
        assert_eq!(Interest::from_epoll(events), Interest::READABLE);
        assert!(Interest::RDHUP.reads() && !Interest::RDHUP.writes());
        assert!(Interest::WRITABLE.writes() && !Interest::WRITABLE.reads());
        assert!(!Interest::default().reads() && !Interest::default().writes());
    }

    #[test]
    fn errors_and_hang_ups_always_meet_an_interest() {
        let met = Interest::WRITABLE.met_by();
        assert!(met.intersects(Readiness::ERR) && met.intersects(Readiness::HUP) && met.intersects(Readiness::OUT));
        assert!(!met.intersects(Readiness::IN));
        assert_eq!((Readiness::IN | Readiness::OUT) & Readiness::OUT, Readiness::OUT);
        assert_eq!(
            Readiness::ALL.epoll(),
            (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP | libc::EPOLLRDHUP) as u32
        );
    }
}
