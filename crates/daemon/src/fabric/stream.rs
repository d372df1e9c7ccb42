//! A relayed stream's protocol, without I/O: where its ends are, and its
//! flow control. The relay asks it how much it may send, tells it what it
//! sent and what credit came, and asks it when credit is owed back.
//!
//! Flow control: the sender may have at most the receiver's window (its
//! ring size, given in `Open` and `Accept`) unconsumed. The receiver gives
//! `Credit` back as its guest reads, in steps of a sixteenth of the window
//! (both hosts' windows are the fabric's ring size), so the sender rarely
//! runs dry and credit frames stay few. A peer that sends more than its
//! window and the credit given back breaks its stream, nothing else.

/// Which ends of the stream are over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ends {
    /// Bytes may go both ways.
    Open,
    /// This side sent `Fin` or `Reset`: nothing more goes out.
    Sent,
    /// The peer sent `Fin` or `Reset`: nothing more comes in.
    Got,
    /// Both.
    Closed,
}

impl Ends {
    /// This side has ended its direction.
    #[must_use]
    pub fn send_end(self) -> Ends {
        match self {
            Ends::Open | Ends::Sent => Ends::Sent,
            Ends::Got | Ends::Closed => Ends::Closed,
        }
    }
    /// The peer has ended its direction.
    #[must_use]
    pub fn got_end(self) -> Ends {
        match self {
            Ends::Open | Ends::Got => Ends::Got,
            Ends::Sent | Ends::Closed => Ends::Closed,
        }
    }
    pub fn sent(self) -> bool {
        matches!(self, Ends::Sent | Ends::Closed)
    }
    pub fn got(self) -> bool {
        matches!(self, Ends::Got | Ends::Closed)
    }
}

/// What credit a stream owes its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreditDue {
    /// Send `Credit` for this many bytes.
    Send(u32),
    /// Nothing yet, and nothing soon enough to wait for.
    Nothing,
    /// Nothing yet, but reads by the guest could make it due: arm the
    /// guest's ring (to hear of them) and ask again.
    Watch,
}

/// One stream's flow control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// Bytes this side may still send.
    credit: u64,
    /// The peer's window: what it allowed at the start, and the most
    /// credit can ever be.
    peer_window: u32,
    /// This side's window: the most the peer may have unconsumed here.
    window: u32,
    /// Of the bytes the guest consumed, those credited back.
    credited: u64,
}

impl Flow {
    /// A stream whose receive window here is `window` and whose peer
    /// allows `peer_window` (0 until its `Accept` says).
    pub fn new(window: u32, peer_window: u32) -> Flow {
        Flow { credit: u64::from(peer_window), peer_window, window, credited: 0 }
    }

    /// The peer accepted the stream with its window.
    pub fn accepted(&mut self, peer_window: u32) {
        self.peer_window = peer_window;
        self.credit = u64::from(peer_window);
    }

    /// The peer gave `bytes` of credit back; never more than its window.
    pub fn credit(&mut self, bytes: u32) {
        self.credit = (self.credit + u64::from(bytes)).min(u64::from(self.peer_window));
    }

    /// Of `available` bytes, how many may go in one frame of at most
    /// `max_payload`.
    pub fn sendable(&self, available: usize, max_payload: usize) -> usize {
        (available as u64).min(self.credit).min(max_payload as u64) as usize
    }

    /// `n` bytes went out.
    pub fn sent(&mut self, n: usize) {
        debug_assert!(n as u64 <= self.credit, "sent beyond credit");
        self.credit = self.credit.saturating_sub(n as u64);
    }

    /// Would `len` more bytes from the peer, after the `delivered` it
    /// sent so far, stay within what it was allowed: this side's window
    /// and the credit given back since?
    pub fn admits(&self, delivered: u64, len: usize) -> bool {
        delivered.saturating_add(len as u64) <= u64::from(self.window) + self.credited
    }

    /// The credit owed now that the guest has consumed `consumed` of the
    /// `delivered` bytes written into its ring.
    pub fn credit_due(&mut self, delivered: u64, consumed: u64) -> CreditDue {
        let step = u64::from(self.peer_window.max(16)) / 16;
        let owed = consumed.saturating_sub(self.credited);
        if owed >= step {
            self.credited = consumed;
            return CreditDue::Send(owed.min(u64::from(u32::MAX)) as u32);
        }
        let unread = delivered.saturating_sub(consumed);
        if unread + owed < step {
            return CreditDue::Nothing;
        }
        CreditDue::Watch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_close_one_way_at_a_time() {
        assert_eq!(Ends::Open.send_end(), Ends::Sent);
        assert_eq!(Ends::Open.got_end(), Ends::Got);
        assert_eq!(Ends::Sent.got_end(), Ends::Closed);
        assert_eq!(Ends::Got.send_end(), Ends::Closed);
        assert_eq!(Ends::Sent.send_end(), Ends::Sent, "ending twice changes nothing");
        assert!(Ends::Closed.sent() && Ends::Closed.got());
        assert!(!Ends::Open.sent() && !Ends::Open.got());
    }

    /// A sender and a receiver, with a guest reading on the receiver's
    /// side: every byte in flight is within the window, and credit brings
    /// the sender back to a full window once everything is read.
    #[test]
    fn credit_keeps_the_sender_within_the_window() {
        const WINDOW: u32 = 1600;
        let mut sender = Flow::new(4096, 0);
        let mut receiver = Flow::new(WINDOW, WINDOW);
        assert_eq!(sender.sendable(100, 64), 0, "nothing before the Accept");
        sender.accepted(WINDOW);
        let (mut delivered, mut consumed) = (0u64, 0u64);
        let mut credited_total = 0u64;
        for round in 0..200u64 {
            // The sender has plenty to send, in frames of at most 300.
            let n = sender.sendable(10_000, 300);
            assert!(receiver.admits(delivered, n), "round {round}: within the window");
            sender.sent(n);
            delivered += n as u64;
            // The guest reads a varying amount.
            consumed += (delivered - consumed).min(37 * (round % 5));
            while let CreditDue::Send(bytes) = receiver.credit_due(delivered, consumed) {
                credited_total += u64::from(bytes);
                sender.credit(bytes);
            }
            assert!(delivered - consumed <= u64::from(WINDOW));
            assert_eq!(sender.credit + (delivered - credited_total), u64::from(WINDOW), "round {round}");
        }
        consumed = delivered;
        if let CreditDue::Send(bytes) = receiver.credit_due(delivered, consumed) {
            sender.credit(bytes);
        }
        assert_eq!(sender.sendable(10_000, 100_000), WINDOW as usize, "all read: a full window again");
    }

    #[test]
    fn credit_is_owed_in_steps_and_watched_for_when_reads_could_make_it_due() {
        let mut flow = Flow::new(1600, 1600);
        // A step is 100 bytes.
        assert_eq!(flow.credit_due(50, 20), CreditDue::Nothing, "too little read or readable");
        assert_eq!(flow.credit_due(150, 20), CreditDue::Watch, "reading what is there would make it due");
        assert_eq!(flow.credit_due(150, 120), CreditDue::Send(120));
        assert_eq!(flow.credit_due(150, 150), CreditDue::Nothing, "30 more read, 0 unread");
        assert_eq!(flow.credit_due(300, 221), CreditDue::Send(101));
    }

    #[test]
    fn data_beyond_the_window_and_the_credit_given_is_not_admitted() {
        let mut flow = Flow::new(1600, 1600);
        assert!(flow.admits(0, 1600));
        assert!(flow.admits(600, 1000));
        assert!(!flow.admits(600, 1001), "one byte past the window");
        assert!(!flow.admits(u64::MAX, 1), "no overflow");
        // The guest read 500 of the first 1600: credit for them goes back,
        // and the peer may send 500 more.
        assert_eq!(flow.credit_due(1600, 500), CreditDue::Send(500));
        assert!(flow.admits(1600, 500));
        assert!(!flow.admits(1600, 501), "read but not credited is not allowed");
    }

    #[test]
    fn credit_never_exceeds_the_peers_window() {
        let mut flow = Flow::new(1000, 500);
        flow.sent(200);
        flow.credit(150);
        assert_eq!(flow.sendable(usize::MAX, usize::MAX), 450);
        flow.credit(u32::MAX);
        assert_eq!(flow.sendable(usize::MAX, usize::MAX), 500, "a peer crediting too much gets its window");
    }
}
