//! Shared-memory layout of one connection.
//!
//! A connection is one sealed memfd segment, created by `vsocketd` and mapped
//! by both ends (and read-only by the daemon, for metering):
//!
//! ```text
//!  offset 0                                   PAGE          PAGE+ring_size      PAGE+2*ring_size
//!  ┌────────────────────────────────────────┬──────────────┬───────────────────┐
//!  │ header page                            │ ring 0 data  │ ring 1 data       │
//!  │  0x000 SegmentHeader (magic, version,  │ client→server│ server→client     │
//!  │        ring_size, connection id, nonce)│              │                   │
//!  │        written by the daemon           │              │                   │
//!  │  0x080 ring 0 producer line (tail,...) │              │                   │
//!  │  0x100 ring 0 consumer line (head,...) │              │                   │
//!  │  0x180 ring 1 producer line            │              │                   │
//!  │  0x200 ring 1 consumer line            │              │                   │
//!  │  0x280 endpoint line (holders per end) │              │                   │
//!  └────────────────────────────────────────┴──────────────┴───────────────────┘
//! ```
//!
//! Each control line is 128 bytes (two cache lines, so the adjacent-line
//! prefetcher cannot make producer and consumer share one). A producer line
//! is written only by the ring's producer and a consumer line only by its
//! consumer, but either side may scribble anywhere: every value read from
//! the segment is validated by the reader (see `vsocket-ring`).
//!
//! The client (the end that called `connect`) is [`Endpoint::Client`]: it
//! produces ring 0 and consumes ring 1. The server (the end returned by
//! `accept`) produces ring 1 and consumes ring 0.

/// Size of the header page, and alignment of both data areas.
pub const PAGE: usize = 4096;
/// Spacing of the control lines within the header page.
pub const LINE: usize = 128;
/// Offset of ring `r`'s producer line (`r` is 0 or 1).
pub const fn producer_line(r: usize) -> usize {
    LINE + r * 2 * LINE
}
/// Offset of ring `r`'s consumer line.
pub const fn consumer_line(r: usize) -> usize {
    producer_line(r) + LINE
}
/// Offset of the endpoint line: one `u32` per endpoint (client, server)
/// counting the processes that hold it (fork adds holders), then one `u32`
/// per endpoint set to 1 by its last holder as its very last write to the
/// segment (see [`RELEASED`]).
pub const ENDPOINT_LINE: usize = consumer_line(1) + LINE;
/// Offset, within the endpoint line, of the two "released" words: once both
/// are set (and both directions are closed), no process touches the segment
/// any more and the daemon may reset it for another connection between the
/// same two processes.
pub const RELEASED: usize = 8;

/// Offset of ring `r`'s data area.
pub const fn ring_data(r: usize, ring_size: u32) -> usize {
    PAGE + r * ring_size as usize
}
/// Total size of a segment whose rings hold `ring_size` bytes each.
pub const fn segment_size(ring_size: u32) -> usize {
    PAGE + 2 * ring_size as usize
}

/// `b"vSockSeg"` as a little-endian u64.
pub const SEGMENT_MAGIC: u64 = u64::from_le_bytes(*b"vSockSeg");
/// Offset of the header's connection id (`u64`): the daemon writes the id
/// of the connection it hands the segment to, so that a process holding an
/// old mapping of the same file knows whether it is this connection's.
pub const HEADER_CONNECTION_ID: usize = 16;
/// Offset of the header's nonce (16 random bytes written by the daemon when
/// it creates the segment, never changed): with the file's device and inode
/// it tells a kept mapping's file from a later file that got the same inode
/// number.
pub const HEADER_NONCE: usize = 24;
/// Layout version; bumped on any incompatible change.
pub const SEGMENT_VERSION: u32 = 1;
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
    /// This end's index in the endpoint line.
    pub const fn index(self) -> usize {
        self.tx_ring()
    }

    /// The ring this end reads from.
    pub const fn rx_ring(self) -> usize {
        1 - self.tx_ring()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_fit_in_the_header_page_without_overlap() {
        let mut offsets = vec![0];
        for r in 0..2 {
            offsets.push(producer_line(r));
            offsets.push(consumer_line(r));
        }
        for w in offsets.windows(2) {
            assert_eq!(w[1] - w[0], LINE);
        }
        assert_eq!(ENDPOINT_LINE, consumer_line(1) + LINE);
        const { assert!(ENDPOINT_LINE + LINE <= PAGE) };
    }

    #[test]
    fn data_areas_follow_the_header() {
        assert_eq!(ring_data(0, 8192), PAGE);
        assert_eq!(ring_data(1, 8192), PAGE + 8192);
        assert_eq!(segment_size(8192), PAGE + 2 * 8192);
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
    fn endpoints_use_opposite_rings() {
        assert_eq!(Endpoint::Client.tx_ring(), Endpoint::Server.rx_ring());
        assert_eq!(Endpoint::Server.tx_ring(), Endpoint::Client.rx_ring());
    }
}
