//! Hashing of descriptor numbers for the epoll sets' maps.
//!
//! A set looks its registrations up by descriptor number on every
//! `epoll_ctl` (event loops change a descriptor's interest around every
//! request) and on every event it translates, so the hash is on the path
//! of each request. The standard hasher (SipHash) guards a map against
//! keys chosen to collide; descriptor numbers are not chosen by anyone who
//! could want that (the kernel hands out the lowest free number, in the
//! program's own process, and no peer names them), so one multiplication
//! does. Numbers that differ only above a table's mask (1024 apart in a
//! table of 1024 buckets) start at the same bucket; their high bits,
//! which hashbrown compares first, still tell them apart.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::fd::RawFd;

/// A map keyed by descriptor number.
pub type FdMap<V> = HashMap<RawFd, V, BuildHasherDefault<FdHasher>>;

/// Fibonacci hashing: the product's low bits (the table's bucket) differ
/// for numbers that differ in their low bits (the multiplier is odd), and
/// its high bits (the control byte hashbrown compares first) are mixed
/// from all of the key.
const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

/// See the module docs.
#[derive(Default)]
pub struct FdHasher(u64);

impl Hasher for FdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(MULTIPLIER);
        }
    }

    fn write_i32(&mut self, n: i32) {
        self.0 = (self.0 ^ u64::from(n as u32)).wrapping_mul(MULTIPLIER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::hash::BuildHasher;

    fn hash(fd: RawFd) -> u64 {
        BuildHasherDefault::<FdHasher>::default().hash_one(fd)
    }

    #[test]
    fn a_descriptor_is_hashed_by_one_multiplication() {
        assert_eq!(hash(7), 7u64.wrapping_mul(MULTIPLIER));
        assert_eq!(hash(-1), u64::from(u32::MAX).wrapping_mul(MULTIPLIER));
    }

    #[test]
    fn consecutive_descriptors_fall_in_distinct_buckets_and_spread_their_high_bits() {
        // A table of 8192 buckets, holding descriptors 3 to 8194 (a program
        // with 8000 connections): no two share a bucket.
        let buckets: HashSet<u64> = (3..8195).map(|fd| hash(fd) & 8191).collect();
        assert_eq!(buckets.len(), 8192);
        // The seven high bits hashbrown compares in a group take every
        // value among the first thousand descriptors.
        let tags: HashSet<u64> = (0..1000).map(|fd| hash(fd) >> 57).collect();
        assert_eq!(tags.len(), 128);
    }

    #[test]
    fn a_map_keyed_by_descriptor_finds_what_it_holds() {
        let mut map = FdMap::default();
        for fd in (0..20_000).step_by(3) {
            map.insert(fd, fd * 2);
        }
        assert!((0..20_000).all(|fd| map.get(&fd).copied() == (fd % 3 == 0).then_some(fd * 2)));
        map.insert(-1, 1);
        map.insert(RawFd::MAX, 2);
        assert!(map.contains_key(&-1) && map.contains_key(&RawFd::MAX) && !map.contains_key(&2));
    }
}
