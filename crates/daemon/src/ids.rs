//! The daemon's identifiers, and the one counter they are drawn from.
//!
//! Connections, listeners, control channels and guest slots are each
//! named by a number unique for the daemon's lifetime. Each kind has its
//! own type, so that a listener's id cannot be passed where a channel's is
//! meant; all are drawn from one [`Ids`] counter, so no two things of any
//! kind share a number (and logs can name any of them without ambiguity).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id!(
    /// A connection, as named in the segment, the flow log and reports.
    ConnectionId
);
id!(
    /// A listening socket a guest registered.
    ListenerId
);
id!(
    /// A process's request channel to the daemon.
    ChannelId
);
id!(
    /// A guest as the daemon tracks it across policy changes (see
    /// [`GuestSlot`](crate::guest::GuestSlot)).
    SlotId
);

/// The two processes a same-host connection joins: the client's request
/// channel and the listener. A released segment is reset and reused only
/// between the same two (see [`pool`](crate::pool)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pair {
    pub channel: ChannelId,
    pub listener: ListenerId,
}

/// The counter every id is drawn from; the first id is 1.
#[derive(Debug)]
pub struct Ids {
    next: AtomicU64,
}

impl Default for Ids {
    fn default() -> Ids {
        Ids { next: AtomicU64::new(1) }
    }
}

impl Ids {
    fn next(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
    pub fn connection(&self) -> ConnectionId {
        ConnectionId(self.next())
    }
    pub fn listener(&self) -> ListenerId {
        ListenerId(self.next())
    }
    pub fn channel(&self) -> ChannelId {
        ChannelId(self.next())
    }
    pub fn slot(&self) -> SlotId {
        SlotId(self.next())
    }
    pub fn grant(&self) -> u64 {
        self.next()
    }
    /// A number that moves on with every id drawn: listeners sharing an
    /// address take turns by it.
    /// Continues the ids another daemon handed out before `next` (a
    /// hand-over), so that none is handed out twice.
    pub fn resume_from(&self, next: u64) {
        self.next.fetch_max(next, Ordering::Relaxed);
    }

    pub fn turn(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_of_every_kind_come_from_one_sequence() {
        let ids = Ids::default();
        assert_eq!(ids.slot(), SlotId(1));
        assert_eq!(ids.channel(), ChannelId(2));
        assert_eq!(ids.listener(), ListenerId(3));
        assert_eq!(ids.connection(), ConnectionId(4));
        assert_eq!(ids.turn(), 5);
    }
}
