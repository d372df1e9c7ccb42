//! The connect queue of a grant (ARCHITECTURE §3b): one page the daemon
//! creates, the client's library maps read-write and the server's library
//! and the daemon map read-only.
//!
//! ```text
//!  0x000  magic u64, version u32                 written by the daemon
//!  0x010  grant id u64                           written by the daemon
//!  0x080  produced u64                           the client: slots written
//!  0x100  slot[0..SLOTS], each a u64:            the client
//!         sequence (low 32 bits) | port << 32 | WRITTEN
//! ```
//!
//! The client writes the slot `produced % SLOTS` and then raises
//! `produced` (release). A reader keeps its own cursor (the count of slots
//! it has read) and reads slots up to `produced` (acquire). Everything a
//! reader reads here is the client's word: [`Cursor::next_slots`] bounds
//! the work whatever `produced` says, and a slot is only a claim to a kit
//! that the reader still checks against the kits it holds.

use crate::layout::PAGE;

/// The size of the queue's page.
pub const QUEUE_SIZE: usize = PAGE;
/// `b"vSockGnt"` as a little-endian u64.
pub const QUEUE_MAGIC: u64 = u64::from_le_bytes(*b"vSockGnt");
/// Layout version.
pub const QUEUE_VERSION: u32 = 1;
/// Offset of the magic, the version (at 8) and the grant's id (at 16).
pub const HEADER: usize = 0;
pub const HEADER_VERSION: usize = 8;
pub const HEADER_GRANT: usize = 16;
/// Offset of the `produced` count.
pub const PRODUCED: usize = 128;
/// Offset of the first slot.
pub const SLOTS_AT: usize = 256;
/// Slots in the queue.
pub const SLOTS: usize = 64;
const _: () = assert!(SLOTS_AT + 8 * SLOTS <= QUEUE_SIZE);

/// Set in every slot the client wrote, so an unwritten (zero) slot never
/// reads as kit 0.
const WRITTEN: u64 = 1 << 63;

/// What a slot says: the client took kit `sequence` for a socket bound to
/// `port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub sequence: u32,
    pub port: u16,
}

impl Slot {
    /// The slot as the client writes it.
    pub fn encode(self) -> u64 {
        WRITTEN | (self.port as u64) << 32 | self.sequence as u64
    }

    /// A slot's word as a reader finds it: `None` for one never written
    /// (or scribbled over without the mark).
    pub fn decode(word: u64) -> Option<Slot> {
        (word & WRITTEN != 0).then_some(Slot { sequence: word as u32, port: (word >> 32) as u16 })
    }
}

/// Where slot number `n` (counting every slot ever written) lives.
pub fn slot_offset(n: u64) -> usize {
    SLOTS_AT + 8 * (n % SLOTS as u64) as usize
}

/// A reader's place in a queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Slots read so far.
    pub read: u64,
}

/// The slots a reader is to read now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// Slot numbers `first .. end`, at most [`SLOTS`] of them.
    pub first: u64,
    pub end: u64,
    /// Slots written over before they were read: an honest client never
    /// has more than its kits outstanding (fewer than [`SLOTS`]), so these
    /// are its own loss.
    pub skipped: u64,
}

impl Cursor {
    /// The slots to read, given the `produced` count the client shows;
    /// the cursor moves past them. A count that went backwards (written
    /// by a hostile client) yields nothing and leaves the cursor where it
    /// is, so slots already read are never read again as new.
    pub fn next_slots(&mut self, produced: u64) -> Due {
        if produced <= self.read {
            return Due { first: self.read, end: self.read, skipped: 0 };
        }
        let first = self.read.max(produced.saturating_sub(SLOTS as u64));
        let due = Due { first, end: produced, skipped: first - self.read };
        self.read = produced;
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_round_trips_and_an_unwritten_one_is_none() {
        for slot in [Slot { sequence: 0, port: 0 }, Slot { sequence: u32::MAX, port: u16::MAX }] {
            assert_eq!(Slot::decode(slot.encode()), Some(slot));
        }
        assert_eq!(Slot::decode(0), None);
        assert_eq!(Slot::decode(u64::MAX >> 1), None);
    }

    #[test]
    fn slots_wrap_within_the_page() {
        assert_eq!(slot_offset(0), SLOTS_AT);
        assert_eq!(slot_offset(SLOTS as u64), SLOTS_AT);
        assert_eq!(slot_offset(SLOTS as u64 - 1), SLOTS_AT + 8 * (SLOTS - 1));
        assert_eq!(slot_offset(u64::MAX), SLOTS_AT + 8 * (u64::MAX % SLOTS as u64) as usize);
        assert!(slot_offset(u64::MAX) + 8 <= QUEUE_SIZE);
    }

    #[test]
    fn a_reader_takes_each_slot_once() {
        let mut cursor = Cursor::default();
        assert_eq!(cursor.next_slots(0), Due { first: 0, end: 0, skipped: 0 });
        assert_eq!(cursor.next_slots(3), Due { first: 0, end: 3, skipped: 0 });
        assert_eq!(cursor.next_slots(3), Due { first: 3, end: 3, skipped: 0 });
        assert_eq!(cursor.next_slots(5), Due { first: 3, end: 5, skipped: 0 });
        assert_eq!(cursor.read, 5);
    }

    #[test]
    fn a_hostile_count_bounds_the_work_and_never_replays() {
        let mut cursor = Cursor { read: 10 };
        // Backwards: nothing, and the cursor stays.
        assert_eq!(cursor.next_slots(4), Due { first: 10, end: 10, skipped: 0 });
        assert_eq!(cursor.read, 10);
        // Far ahead: only the last SLOTS are read, the rest counted lost.
        let due = cursor.next_slots(u64::MAX);
        assert_eq!(due.end - due.first, SLOTS as u64);
        assert_eq!(due.skipped, u64::MAX - SLOTS as u64 - 10);
        assert_eq!(cursor.read, u64::MAX);
        assert_eq!(cursor.next_slots(u64::MAX).end - cursor.next_slots(u64::MAX).first, 0);
    }
}
