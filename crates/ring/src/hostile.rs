//! Exercises both views of a ring against arbitrary shared state: the
//! driver behind the cargo-fuzz target (`fuzz/`) and the bounded fuzz run
//! in the tests. Whatever the other side writes, a view must answer with a
//! value or [`RingError`], never read or write outside the data area, and
//! never report more bytes than the ring or the buffer holds.

use crate::ring::{Consumer, Producer, RingControl, RingError, RxState};
use crate::sync::Ordering;

/// Interprets `input` as a sequence of shared-memory states and operations
/// and checks the invariants above (panics on a violation).
pub fn exercise(input: &[u8]) {
    const SIZE: u32 = 64;
    let ctl = RingControl::default();
    let mut data = vec![0u8; SIZE as usize + 16];
    // Guard bytes after the data area must never change.
    data[SIZE as usize..].fill(0xEE);
    let area = data.as_mut_ptr();
    // SAFETY: `data` has SIZE bytes of data area (plus guards) and outlives
    // the views; nothing else touches it while they live.
    let (p, c) = unsafe {
        (
            Producer::new(&ctl.producer, &ctl.consumer, area, SIZE),
            Consumer::new(&ctl.producer, &ctl.consumer, area, SIZE),
        )
    };
    let mut chunks = input.chunks(18);
    for op in chunks.by_ref() {
        if op.len() < 18 {
            break;
        }
        let word = u64::from_le_bytes(op[2..10].try_into().expect("8 bytes"));
        let small = u32::from_le_bytes(op[10..14].try_into().expect("4 bytes"));
        let len = (u16::from_le_bytes([op[14], op[15]]) % 200) as usize;
        match op[0] % 10 {
            // The hostile side scribbles on the control lines.
            0 => ctl.producer.tail.store(word, Ordering::Relaxed),
            1 => ctl.consumer.head.store(word, Ordering::Relaxed),
            2 => ctl.producer.flags.store(small, Ordering::Relaxed),
            3 => ctl.consumer.flags.store(small, Ordering::Relaxed),
            4 => ctl.consumer.waiting.store(u64::from(small), Ordering::Relaxed),
            // The honest side operates.
            5 => {
                let payload = vec![op[1]; len];
                match p.write(&[&payload]) {
                    Ok((n, _)) => assert!(n <= len && n <= SIZE as usize),
                    Err(RingError::Corrupt | RingError::PeerClosed) => {}
                }
            }
            6 => {
                let mut a = vec![0u8; len / 2];
                let mut b = vec![0u8; len - len / 2];
                match c.read(&mut [&mut a[..], &mut b[..]], op[1] & 1 == 1) {
                    Ok((n, _)) => assert!(n <= len && n <= SIZE as usize),
                    Err(e) => assert_eq!(e, RingError::Corrupt),
                }
            }
            7 => match c.state() {
                Ok(RxState::Data(n)) => assert!(n <= SIZE),
                Ok(_) | Err(RingError::Corrupt) => {}
                Err(e) => panic!("consumer state cannot be {e:?}"),
            },
            8 => {
                if let Ok(n) = p.space() {
                    assert!(n <= SIZE)
                }
            }
            _ => {
                let _ = c.discard(len);
                let _ = p.finish();
            }
        }
        assert!(data[SIZE as usize..].iter().all(|&b| b == 0xEE), "wrote past the data area");
    }
    let _ = chunks;
}
