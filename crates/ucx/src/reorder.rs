//! Puts one endpoint's received frames back in send order.
//!
//! The sender numbers its frames on each endpoint 0, 1, 2, ... in the
//! active message's header. UCX does not promise that receive callbacks run
//! in that order: a message split into fragments is handed over when its
//! last fragment arrives, and a rendezvous message only after its data has
//! been fetched, while smaller messages sent later may already be complete.
//! [`Reorder`] holds frames back until every earlier one is complete.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;

/// A sequence number that cannot be placed: the peer broke the numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfSequence {
    /// The number received.
    pub seq: u64,
    /// The next number still to be delivered.
    pub next: u64,
}

/// Frames received out of order, held until they can be delivered.
#[derive(Debug, Default)]
pub struct Reorder {
    next: u64,
    /// `None`: announced (a rendezvous whose data is still being fetched).
    held: BTreeMap<u64, Option<Vec<u8>>>,
}

impl Reorder {
    /// Notes that frame `seq` exists but its bytes are still on the way.
    pub fn announce(&mut self, seq: u64) -> Result<(), OutOfSequence> {
        self.check_new(seq)?;
        self.held.insert(seq, None);
        Ok(())
    }

    /// Stores the bytes of frame `seq`, announced before or not.
    pub fn complete(&mut self, seq: u64, frame: Vec<u8>) -> Result<(), OutOfSequence> {
        match self.held.get_mut(&seq) {
            Some(slot @ None) => {
                *slot = Some(frame);
                Ok(())
            }
            Some(Some(_)) => Err(OutOfSequence { seq, next: self.next }),
            None => {
                self.check_new(seq)?;
                self.held.insert(seq, Some(frame));
                Ok(())
            }
        }
    }

    /// The next frame in send order, if it and all before it are complete.
    pub fn pop_ready(&mut self) -> Option<Vec<u8>> {
        let first = self.held.first_entry()?;
        if *first.key() != self.next || first.get().is_none() {
            return None;
        }
        self.next += 1;
        first.remove()
    }

    /// How many frames are held back or still being fetched.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn check_new(&self, seq: u64) -> Result<(), OutOfSequence> {
        if seq < self.next || self.held.contains_key(&seq) {
            return Err(OutOfSequence { seq, next: self.next });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(r: &mut Reorder) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| r.pop_ready()).collect()
    }

    #[test]
    fn in_order_frames_pass_straight_through() {
        let mut r = Reorder::default();
        for seq in 0..3u8 {
            r.complete(u64::from(seq), vec![seq]).unwrap();
            assert_eq!(drain(&mut r), vec![vec![seq]]);
        }
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn a_later_eager_frame_waits_for_an_earlier_rendezvous() {
        let mut r = Reorder::default();
        r.announce(0).unwrap();
        r.complete(1, vec![1]).unwrap();
        r.complete(2, vec![2]).unwrap();
        assert!(drain(&mut r).is_empty());
        assert_eq!(r.held(), 3);
        r.complete(0, vec![0]).unwrap();
        assert_eq!(drain(&mut r), vec![vec![0], vec![1], vec![2]]);
    }

    #[test]
    fn a_gap_holds_everything_after_it() {
        let mut r = Reorder::default();
        r.complete(1, vec![1]).unwrap();
        assert!(drain(&mut r).is_empty());
        r.complete(0, vec![0]).unwrap();
        assert_eq!(drain(&mut r), vec![vec![0], vec![1]]);
    }

    #[test]
    fn duplicates_and_old_numbers_are_refused() {
        let mut r = Reorder::default();
        r.complete(0, vec![0]).unwrap();
        drain(&mut r);
        assert_eq!(r.complete(0, vec![0]), Err(OutOfSequence { seq: 0, next: 1 }));
        r.announce(1).unwrap();
        assert!(r.announce(1).is_err());
        r.complete(1, vec![1]).unwrap();
        assert!(r.complete(1, vec![1]).is_err());
    }

    #[test]
    fn every_permutation_of_four_comes_out_in_order() {
        let mut perm = [0u64, 1, 2, 3];
        // Heap's algorithm, iteratively.
        let mut c = [0usize; 4];
        let check = |p: &[u64; 4]| {
            let mut r = Reorder::default();
            let mut out = Vec::new();
            for &seq in p {
                r.complete(seq, vec![seq as u8]).unwrap();
                out.extend(drain(&mut r));
            }
            assert_eq!(out, vec![vec![0], vec![1], vec![2], vec![3]], "{p:?}");
        };
        check(&perm);
        let mut i = 0;
        while i < 4 {
            if c[i] < i {
                if i % 2 == 0 {
                    perm.swap(0, i);
                } else {
                    perm.swap(c[i], i);
                }
                check(&perm);
                c[i] += 1;
                i = 0;
            } else {
                c[i] = 0;
                i += 1;
            }
        }
    }
}
