//! A bounded fuzz run: the ring's views against arbitrary shared state
//! (the same driver as the cargo-fuzz target in `fuzz/`, fed by a seeded
//! generator instead of libFuzzer).
#![cfg(not(loom))]

use std::sync::atomic::Ordering;
use vsocket_ring::{RingError, RxState, Segment};

#[test]
fn arbitrary_shared_state_never_breaks_the_reader() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..3000 {
        let len = 18 * (1 + (next() % 64) as usize);
        let mut input: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Bias towards plausible indices so both valid and invalid paths run.
        if round % 2 == 0 {
            for chunk in input.chunks_mut(18) {
                chunk[2..10].copy_from_slice(&(next() % 300).to_le_bytes());
            }
        }
        vsocket_ring::hostile::exercise(&input);
    }
}

#[test]
fn a_peer_scribbling_concurrently_only_breaks_its_connection() {
    let (segment, _files) = Segment::create(4096).unwrap();
    let segment = std::sync::Arc::new(segment);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The hostile peer owns ring 0's producer side and writes garbage.
    let hostile = {
        let segment = segment.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let p = segment.producer(0);
            let mut x = 1u64;
            while !stop.load(Ordering::Relaxed) {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let _ = p.write(&[&x.to_le_bytes()]);
                if x.is_multiple_of(7) {
                    // Forge the published index directly.
                    forge_tail(&segment, x % 10_000);
                }
            }
        })
    };
    let c = segment.consumer(0);
    let mut buf = [0u8; 512];
    let (mut ok, mut corrupt) = (0u32, 0u32);
    // Until both outcomes were seen (the scheduler decides when the
    // hostile thread runs), within a generous bound.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut rounds = 0u64;
    while (ok == 0 || corrupt == 0 || rounds < 100_000) && std::time::Instant::now() < deadline {
        rounds += 1;
        match c.read(&mut [&mut buf[..]], false) {
            Ok((n, _)) => {
                assert!(n <= buf.len());
                ok += 1;
            }
            Err(RingError::Corrupt) => corrupt += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
        match c.state() {
            Ok(RxState::Data(n)) => assert!(n <= 4096),
            Ok(_) | Err(RingError::Corrupt) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    hostile.join().unwrap();
    assert!(ok > 0 && corrupt > 0, "both outcomes exercised: ok {ok}, corrupt {corrupt}");
}

fn forge_tail(segment: &Segment, value: u64) {
    // A producer may publish any tail by writing into its own line; model
    // that with the hostile driver's access to the control block.
    segment.forge_for_tests(0, value);
}
