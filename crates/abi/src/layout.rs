//! Shared-memory layout of one connection.
//!
//! A connection's memory is two sealed memfds, one per end, created by
//! `vsocketd`. Each end's *half* holds everything that end writes: the data
//! of the ring it produces and the control words it owns. An end maps its
//! own half read-write and its peer's half read-only (the daemon hands the
//! peer's half over through a read-only descriptor), so neither end can
//! change a word the other owns, in particular the indices the daemon meters
//! each direction by.
//!
//! ```text
//!  offset 0                                          PAGE               PAGE+ring_size
//!  ┌───────────────────────────────────────────────┬──────────────────┐
//!  │ header page                                   │ data of the ring │
//!  │  0x000 SegmentHeader (magic, version,         │ this end produces│
//!  │        ring_size, connection id, nonce, end)  │                  │
//!  │        written by the daemon                  │                  │
//!  │  0x080 producer line of the ring this end     │                  │
//!  │        produces (tail, flags, waiting, woken) │                  │
//!  │  0x100 consumer line of the ring this end     │                  │
//!  │        consumes (head, flags, waiting, woken) │                  │
//!  │  0x180 endpoint line (holders, released,      │                  │
//!  │        sleepers)                              │                  │
//!  └───────────────────────────────────────────────┴──────────────────┘
//! ```
//!
//! The client (the end that called `connect`) is [`Endpoint::Client`]: its
//! half is half 0; it produces ring 0 and consumes ring 1. The server (the
//! end returned by `accept`) owns half 1, produces ring 1 and consumes
//! ring 0. So ring `r`'s producer line and data live in half `r` and its
//! consumer line in half `1 - r`.
//!
//! **Placed in a region.** A VM guest's connection is not two memfds: the
//! daemon places both halves in a piece of the VM's region (one shared
//! file, the VM's ivshmem device), the client's half at the piece's
//! offset and the server's right after it, each laid out as above. The VM
//! maps the whole region, so it can write both halves; the daemon, the
//! VM's only peer on such a connection, reads every word as hostile input
//! and never shares a piece with another guest.
//!
//! Each control line is 128 bytes (two cache lines, so the adjacent-line
//! prefetcher cannot make producer and consumer share one). An end may
//! scribble anywhere in its own half: every value read from shared memory
//! is validated by the reader (see `vsocket-ring`).

/// Size of the header page, and alignment of the data area.
pub const PAGE: usize = 4096;
/// Spacing of the control lines within the header page.
pub const LINE: usize = 128;
/// Offset, in an end's half, of the producer line of the ring it produces.
pub const PRODUCER_LINE: usize = LINE;
/// Offset, in an end's half, of the consumer line of the ring it consumes.
pub const CONSUMER_LINE: usize = 2 * LINE;
/// Offset of the endpoint line: a `u32` counting the processes that hold
/// this end (fork adds holders), then at [`RELEASED`] a `u32` set to 1 by
/// its last holder as its very last write to the connection.
pub const ENDPOINT_LINE: usize = 3 * LINE;
/// Offset, within the endpoint line, of the "released" word: once both
/// ends' are set (and both directions are closed), no process touches the
/// connection's memory any more and the daemon may reset it for another
/// connection between the same two processes.
pub const RELEASED: usize = 4;
/// Offset, within the endpoint line, of the "sleepers" word: threads of
/// the processes holding this end that are asleep on its doorbell (or
/// about to be). A waiter that wakes leaves the doorbell rung, and the
/// rings armed, while others still sleep: it is theirs too. Its top bit
/// marks the last sleeper to wake while it takes the doorbell and the
/// arming; a waiter counting itself meanwhile arms only after that. Only
/// the processes holding this end use it; old libraries that do not are
/// unaffected by it.
pub const SLEEPERS: usize = 8;
/// Offset, within the endpoint line of the server's half, of a kit's
/// claim word (ARCHITECTURE §3b): [`KIT_WAITING`] until the server's
/// library accepts the kit ([`KIT_ACCEPTED`]) or the daemon delivers it
/// ([`KIT_DELIVERED`]) or revokes it ([`KIT_REVOKED`]), each by one
/// compare-and-swap from waiting. Zero, and unused, in a connection that
/// was never a kit.
pub const CLAIM: usize = 12;
/// A kit's claim word: no one has taken it yet.
pub const KIT_WAITING: u32 = 0;
/// A kit's claim word: the server's library accepted it.
pub const KIT_ACCEPTED: u32 = 1;
/// A kit's claim word: the daemon sent it to the listener as `Incoming`.
pub const KIT_DELIVERED: u32 = 2;
/// A kit's claim word: the daemon revoked it; no end may take it.
pub const KIT_REVOKED: u32 = 3;
/// Offset, within the endpoint line of the client's half, of a kit's
/// take word (ARCHITECTURE §3b): [`KIT_FREE`] until the client's library
/// takes the kit (to [`KIT_TAKEN`] with its port) or the daemon ends it
/// ([`KIT_GONE`]), each by one compare-and-swap from free. It decides,
/// once, whether a client took a kit: a server accepts only a taken
/// kit, and no client takes one the daemon ended. (A kit taken may still
/// be revoked through its claim word, and reset, as any connection may
/// be.) Zero, and unused, in a connection that was never a kit.
pub const TAKE: usize = 12;
/// A kit's take word: no client has taken it.
pub const KIT_FREE: u32 = 0;
/// A kit's take word: the daemon ended it before any client took it.
pub const KIT_GONE: u32 = 1;
/// A kit's take word, taken: this bit with the client's port below it.
pub const KIT_TAKEN: u32 = 1 << 16;

/// The port a take word names, if a client took its kit: what the word
/// holds, unless it is free or gone (a client may write anything in its
/// own half: then its low 16 bits).
pub fn taken_port(take: u32) -> Option<u16> {
    (take != KIT_FREE && take != KIT_GONE).then_some(take as u16)
}
/// Offset, within an endpoint line, of the `bell_kept` word (a `u64`,
/// ARCHITECTURE §3c stage 6): the id of the kit connection whose doorbell
/// this end's process kept (parked) when it closed it alone, for the next
/// connection in the same piece; 0 when it kept none. Written by the
/// library before its `released` word, read by the daemon before it
/// resets the piece: when both ends' words name the connection it
/// retires, the next kit there comes without a doorbell and each end
/// takes the one it kept. Zero, and unused, outside kits' pieces.
pub const BELL_KEPT: usize = 16;

/// Offset of the data area within a half.
pub const DATA: usize = PAGE;

/// Size of one end's half whose ring holds `ring_size` bytes.
pub const fn half_size(ring_size: u32) -> usize {
    PAGE + ring_size as usize
}
/// Shared memory a connection with rings of `ring_size` bytes takes: both
/// halves.
pub const fn segment_size(ring_size: u32) -> usize {
    2 * half_size(ring_size)
}

/// Kits' connections in one *chunk* (ARCHITECTURE §3c, stages 1 and 2): a
/// chunk is two files, one per end, each holding this many pieces' halves:
/// first every piece's control lines ([`PIECE_LINES`] bytes each, eight
/// pieces to a page), then every piece's ring data (`ring_size` bytes each,
/// page aligned).
pub const CHUNK_PIECES: usize = 32;
/// A piece's control lines in a chunk: the header and the three lines a
/// half's header page holds (everything before byte 0x200).
pub const PIECE_LINES: usize = 4 * LINE;
/// The lines of every piece of a chunk file, before the data.
pub const CHUNK_LINES: usize = CHUNK_PIECES * PIECE_LINES;

/// Size of one end's file of a chunk whose rings hold `ring_size` bytes.
pub const fn chunk_size(ring_size: u32) -> usize {
    CHUNK_LINES + CHUNK_PIECES * ring_size as usize
}

/// Where piece `piece`'s lines are in a chunk file.
pub const fn piece_lines(piece: usize) -> usize {
    piece * PIECE_LINES
}

/// Where piece `piece`'s ring data is in a chunk file.
pub const fn piece_data(ring_size: u32, piece: usize) -> usize {
    CHUNK_LINES + piece * ring_size as usize
}

/// `b"vSockSeg"` as a little-endian u64.
pub const SEGMENT_MAGIC: u64 = u64::from_le_bytes(*b"vSockSeg");
/// Offset of the header's connection id (`u64`): the daemon writes the id
/// of the connection it hands the half to, so that a process holding an
/// old mapping of the same file knows whether it is this connection's.
pub const HEADER_CONNECTION_ID: usize = 16;
/// Offset of the header's nonce (16 random bytes written by the daemon when
/// it creates the half, never changed): with the file's device and inode
/// it tells a kept mapping's file from a later file that got the same inode
/// number.
pub const HEADER_NONCE: usize = 24;
/// Offset of the header's end (`u32`: 0 client, 1 server): whose half it is.
pub const HEADER_END: usize = 40;
/// Layout version; bumped on any incompatible change.
pub const SEGMENT_VERSION: u32 = 2;
/// Smallest ring the daemon will create.
pub const MIN_RING_SIZE: u32 = 4096;
/// Largest ring the daemon will create.
pub const MAX_RING_SIZE: u32 = 64 << 20;

/// Is `ring_size` acceptable for a segment?
pub fn ring_size_valid(ring_size: u32) -> bool {
    ring_size.is_power_of_two() && (MIN_RING_SIZE..=MAX_RING_SIZE).contains(&ring_size)
}

/// Producer flag: the producer will write no more (shutdown(SHUT_WR) or close).
pub const PRODUCER_FIN: u32 = 1 << 0;
/// Producer flag: the producer aborted the connection (close with unread
/// data, SO_LINGER 0, or corruption detected); the consumer sees ECONNRESET.
pub const PRODUCER_RST: u32 = 1 << 1;
/// Consumer flag: the consumer is gone (closed); writes fail with EPIPE.
pub const CONSUMER_CLOSED: u32 = 1 << 0;

/// A producer line's `writing` word (ARCHITECTURE §3c, stage 5): set by a
/// writer that takes the ring's write claim (the producer line's `claim`
/// word, held for each copy); the daemon returns the data pages only of
/// rings whose writers do, and only while the claim is free (a library
/// from before the claim leaves the word zero).
pub const WRITER_AWARE: u32 = 1 << 0;

/// Which end of a connection a process holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The end that called `connect`.
    Client,
    /// The end returned by `accept`.
    Server,
}

impl Endpoint {
    /// The ring this end writes into.
    pub const fn tx_ring(self) -> usize {
        match self {
            Endpoint::Client => 0,
            Endpoint::Server => 1,
        }
    }
    /// This end's index: its half is half `index`.
    pub const fn index(self) -> usize {
        self.tx_ring()
    }

    /// The ring this end reads from.
    pub const fn rx_ring(self) -> usize {
        1 - self.tx_ring()
    }

    /// The other end.
    pub const fn peer(self) -> Endpoint {
        match self {
            Endpoint::Client => Endpoint::Server,
            Endpoint::Server => Endpoint::Client,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_fit_in_the_header_page_without_overlap() {
        const { assert!(HEADER_END + 4 <= PRODUCER_LINE) };
        assert_eq!(CONSUMER_LINE - PRODUCER_LINE, LINE);
        assert_eq!(ENDPOINT_LINE - CONSUMER_LINE, LINE);
        const { assert!(ENDPOINT_LINE + LINE <= DATA) };
        const { assert!(ENDPOINT_LINE + LINE <= PIECE_LINES) };
        const { assert!(CHUNK_LINES.is_multiple_of(PAGE)) };
        // The endpoint line's words, four bytes each, apart (the claim
        // word is in the server's half, the take word in the client's, at
        // the same place).
        let words = [0, RELEASED, SLEEPERS, CLAIM];
        assert!(words.windows(2).all(|w| w[0] + 4 <= w[1]));
        assert_eq!(TAKE, CLAIM);
        const { assert!(CLAIM + 4 <= LINE) };
    }

    #[test]
    fn a_connection_is_two_halves_of_a_page_and_a_ring() {
        assert_eq!(half_size(8192), PAGE + 8192);
        assert_eq!(segment_size(8192), 2 * (PAGE + 8192));
    }

    #[test]
    fn ring_sizes() {
        assert!(ring_size_valid(4096));
        assert!(ring_size_valid(1 << 18));
        assert!(!ring_size_valid(4095));
        assert!(!ring_size_valid(6000));
        assert!(!ring_size_valid(128 << 20));
    }

    #[test]
    fn a_take_word_names_a_port_only_once_taken() {
        assert_eq!(taken_port(KIT_FREE), None);
        assert_eq!(taken_port(KIT_GONE), None);
        assert_eq!(taken_port(KIT_TAKEN | 40_000), Some(40_000));
        // A client writes what it likes in its own half: still taken.
        assert_eq!(taken_port(0xdead_beef), Some(0xbeef));
    }

    #[test]
    fn endpoints_use_opposite_rings() {
        assert_eq!(Endpoint::Client.tx_ring(), Endpoint::Server.rx_ring());
        assert_eq!(Endpoint::Server.tx_ring(), Endpoint::Client.rx_ring());
        assert_eq!(Endpoint::Client.index(), 0);
        assert_eq!(Endpoint::Server.index(), 1);
    }
}
