//! A VM guest's memory region, as the daemon hands it out: the region is
//! one shared file the VM maps whole (its ivshmem BAR), and each of the
//! VM's connections gets a piece of it for its rings. [`Region`] does the
//! arithmetic only: which byte ranges are free, carving a piece of whole
//! pages out of them (first fit), and giving a piece back (merged with its
//! free neighbours). Pieces never overlap and never leave the region, so
//! no connection's memory is ever another's; what the guest writes in its
//! pieces is the relay's to validate, not this module's.

use std::collections::BTreeMap;
use std::fmt;

/// Pieces are whole pages, and start on a page.
pub const PAGE: u64 = 4096;

/// A piece of a region: `len` bytes from byte `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Piece {
    pub offset: u64,
    pub len: u64,
}

impl Piece {
    fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Why a piece could not be carved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CarveError {
    /// No free run of {0} bytes is left (the region is used up, or cut
    /// into smaller runs).
    Full(u64),
    /// A piece of no bytes was asked for.
    Empty,
}

impl fmt::Display for CarveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CarveError::Full(len) => write!(f, "no free run of {len} bytes left in the region"),
            CarveError::Empty => f.write_str("a piece of no bytes"),
        }
    }
}

impl std::error::Error for CarveError {}

/// The free ranges of one region.
#[derive(Debug)]
pub struct Region {
    size: u64,
    /// Free runs by offset: offset → length. Never two adjacent ones.
    free: BTreeMap<u64, u64>,
}

impl Region {
    /// A region of `size` bytes (rounded down to whole pages), all free.
    pub fn new(size: u64) -> Region {
        let size = size - size % PAGE;
        let mut free = BTreeMap::new();
        if size > 0 {
            free.insert(0, size);
        }
        Region { size, free }
    }

    /// The region's size, bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes not in any piece.
    pub fn free_bytes(&self) -> u64 {
        self.free.values().sum()
    }

    /// Carves a piece of `len` bytes (rounded up to whole pages) out of the
    /// first free run that holds it.
    pub fn carve(&mut self, len: u64) -> Result<Piece, CarveError> {
        if len == 0 {
            return Err(CarveError::Empty);
        }
        let len = len.checked_next_multiple_of(PAGE).ok_or(CarveError::Full(len))?;
        let (&offset, &run) = self.free.iter().find(|(_, &run)| run >= len).ok_or(CarveError::Full(len))?;
        self.free.remove(&offset);
        if run > len {
            self.free.insert(offset + len, run - len);
        }
        Ok(Piece { offset, len })
    }

    /// Gives `piece` back. A piece this region did not carve, or one given
    /// back already, is refused (`false`) and changes nothing.
    pub fn give_back(&mut self, piece: Piece) -> bool {
        let valid = piece.len > 0
            && piece.offset.is_multiple_of(PAGE)
            && piece.len.is_multiple_of(PAGE)
            && piece.end() <= self.size
            && !self.overlaps_free(piece);
        if !valid {
            return false;
        }
        let mut start = piece.offset;
        let mut len = piece.len;
        // Merge with the free run just before it, and the one just after.
        if let Some((&before, &before_len)) = self.free.range(..start).next_back() {
            if before + before_len == start {
                self.free.remove(&before);
                start = before;
                len += before_len;
            }
        }
        if let Some(after_len) = self.free.remove(&piece.end()) {
            len += after_len;
        }
        self.free.insert(start, len);
        true
    }

    /// Does any byte of `piece` lie in a free run?
    fn overlaps_free(&self, piece: Piece) -> bool {
        let before = self.free.range(..piece.end()).next_back();
        before.is_some_and(|(&offset, &len)| offset + len > piece.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_are_whole_pages_carved_first_fit() {
        let mut region = Region::new(10 * PAGE + 100);
        assert_eq!(region.size(), 10 * PAGE);
        let a = region.carve(1).unwrap();
        let b = region.carve(2 * PAGE).unwrap();
        let c = region.carve(PAGE + 1).unwrap();
        assert_eq!(
            (a, b, c),
            (
                Piece { offset: 0, len: PAGE },
                Piece { offset: PAGE, len: 2 * PAGE },
                Piece { offset: 3 * PAGE, len: 2 * PAGE }
            )
        );
        assert_eq!(region.free_bytes(), 5 * PAGE);
        assert_eq!(region.carve(6 * PAGE), Err(CarveError::Full(6 * PAGE)));
        assert_eq!(region.carve(0), Err(CarveError::Empty));
        // A hole is reused by the next piece that fits in it.
        assert!(region.give_back(b));
        assert_eq!(region.carve(PAGE).unwrap(), Piece { offset: PAGE, len: PAGE });
    }

    #[test]
    fn pieces_given_back_merge_with_their_neighbours() {
        let mut region = Region::new(4 * PAGE);
        let pieces: Vec<Piece> = (0..4).map(|_| region.carve(PAGE).unwrap()).collect();
        assert_eq!(region.free_bytes(), 0);
        for i in [0, 2, 1, 3] {
            assert!(region.give_back(pieces[i]));
        }
        // One run again: the whole region fits in one piece.
        assert_eq!(region.carve(4 * PAGE).unwrap(), Piece { offset: 0, len: 4 * PAGE });
    }

    #[test]
    fn a_piece_not_carved_is_refused() {
        let mut region = Region::new(8 * PAGE);
        let a = region.carve(2 * PAGE).unwrap();
        assert!(region.give_back(a));
        assert!(!region.give_back(a), "given back twice");
        let b = region.carve(4 * PAGE).unwrap();
        for bogus in [
            Piece { offset: 1, len: PAGE },
            Piece { offset: 0, len: 100 },
            Piece { offset: 0, len: 0 },
            Piece { offset: 6 * PAGE, len: 4 * PAGE },
            Piece { offset: 3 * PAGE, len: 2 * PAGE },
        ] {
            assert!(!region.give_back(bogus), "{bogus:?}");
        }
        assert_eq!(region.free_bytes(), 4 * PAGE);
        assert!(region.give_back(b));
        assert_eq!(region.free_bytes(), 8 * PAGE);
    }

    #[test]
    fn random_carving_never_overlaps_nor_leaves_the_region() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut region = Region::new(256 * PAGE);
        let mut held: Vec<Piece> = Vec::new();
        for _ in 0..20_000 {
            if next() % 3 != 0 {
                if let Ok(piece) = region.carve(next() % (16 * PAGE) + 1) {
                    assert!(piece.end() <= region.size());
                    assert!(held.iter().all(|h| piece.end() <= h.offset || h.end() <= piece.offset), "{piece:?}");
                    held.push(piece);
                }
            } else if !held.is_empty() {
                let piece = held.swap_remove((next() % held.len() as u64) as usize);
                assert!(region.give_back(piece));
            }
            let used: u64 = held.iter().map(|p| p.len).sum();
            assert_eq!(used + region.free_bytes(), region.size());
        }
        for piece in held.drain(..) {
            assert!(region.give_back(piece));
        }
        assert_eq!(region.carve(256 * PAGE).unwrap(), Piece { offset: 0, len: 256 * PAGE });
    }
}
