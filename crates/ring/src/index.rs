//! Index arithmetic of a ring, free of memory and I/O.
//!
//! Both indices count bytes since the connection began and never wrap in
//! practice (2^64 bytes), but the arithmetic is wrapping so that even a
//! forged value cannot overflow. The producer owns `tail` (bytes written),
//! the consumer owns `head` (bytes consumed); `tail - head` is the number of
//! bytes in the ring and must lie in `0..=size`.

/// An index read from shared memory is impossible: the peer is broken or
/// hostile, and the connection must be torn down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Corrupt;

/// Bytes the consumer may read, given the producer's `tail` and its own `head`.
pub fn readable(tail: u64, head: u64, size: u32) -> Result<u32, Corrupt> {
    let used = tail.wrapping_sub(head);
    if used > u64::from(size) {
        return Err(Corrupt);
    }
    Ok(used as u32)
}

/// Bytes the producer may write, given its own `tail` and the consumer's `head`.
pub fn writable(tail: u64, head: u64, size: u32) -> Result<u32, Corrupt> {
    readable(tail, head, size).map(|used| size - used)
}

/// Splits `len` bytes starting at stream position `pos` into the part before
/// the end of the data area and the part that wraps to its start:
/// `(offset, first_len, second_len)`. `size` is a power of two and
/// `len <= size`, so both parts lie inside `0..size`.
pub fn split(pos: u64, len: u32, size: u32) -> (usize, usize, usize) {
    debug_assert!(size.is_power_of_two() && len <= size);
    let offset = (pos & u64::from(size - 1)) as usize;
    let first = (len as usize).min(size as usize - offset);
    (offset, first, len as usize - first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_accepts_every_fill_level() {
        for used in 0..=16u64 {
            assert_eq!(readable(100 + used, 100, 16), Ok(used as u32));
            assert_eq!(writable(100 + used, 100, 16), Ok(16 - used as u32));
        }
    }

    #[test]
    fn indices_that_imply_overfill_or_underflow_are_corrupt() {
        assert_eq!(readable(117, 100, 16), Err(Corrupt));
        assert_eq!(readable(99, 100, 16), Err(Corrupt));
        assert_eq!(readable(0, u64::MAX, 16), Ok(1));
        assert_eq!(readable(u64::MAX, 0, 16), Err(Corrupt));
        assert_eq!(writable(5, 6, 16), Err(Corrupt));
    }

    #[test]
    fn split_wraps_at_the_end() {
        assert_eq!(split(0, 16, 16), (0, 16, 0));
        assert_eq!(split(10, 4, 16), (10, 4, 0));
        assert_eq!(split(10, 8, 16), (10, 6, 2));
        assert_eq!(split(16 * 1000 + 15, 16, 16), (15, 1, 15));
        assert_eq!(split(u64::MAX, 2, 16), (15, 1, 1));
    }

    proptest::proptest! {
        #[test]
        fn split_stays_inside_the_data_area(pos: u64, len in 0u32..=4096, shift in 0u32..13) {
            let size = 1u32 << shift;
            let len = len.min(size);
            let (offset, first, second) = split(pos, len, size);
            proptest::prop_assert!(offset + first <= size as usize);
            proptest::prop_assert!(second <= offset);
            proptest::prop_assert_eq!(first + second, len as usize);
        }
    }
}
