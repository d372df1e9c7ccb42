//! A bounded fuzz run of the fabric frame decoder (the property of the
//! cargo-fuzz target `fuzz/fuzz_targets/fabric_decode.rs`, fed by a seeded
//! generator): whatever another host sends, `decode` returns a frame, "need
//! more" or an error, and any frame it accepts encodes back to exactly the
//! bytes it took. `DataStart::parse`, which reads a `Data` header before
//! its payload arrives, agrees with `decode` on every input.

use vsocket_abi::fabric::{DataStart, Frame, HEADER, MAX_PAYLOAD};

mod common;

use common::XorShift;

#[test]
fn decoded_frames_re_encode_to_the_bytes_taken() {
    let mut rng = XorShift(0xfab_1c5e_ed00_d00d);
    let (mut accepted, mut rejected, mut partial) = (0u32, 0u32, 0u32);
    for round in 0..200_000 {
        let payload = (rng.next() % 64) as usize;
        let mut bytes: Vec<u8> = (0..HEADER + payload).map(|_| rng.next() as u8).collect();
        // Mostly plausible headers, so the payload checks are reached.
        if round % 4 != 3 {
            let len = if round % 3 == 0 { payload as u32 } else { (rng.next() % 80) as u32 };
            bytes[0..4].copy_from_slice(&len.to_le_bytes());
            bytes[4] = (rng.next() % 11) as u8;
            bytes[5] = (rng.next() % 3) as u8;
            bytes[6] = 0;
            bytes[7] = if round % 16 == 0 { 1 } else { 0 };
        }
        let start = DataStart::parse(&bytes);
        match (&start, Frame::decode(&bytes)) {
            (Err(a), Err(b)) => assert_eq!(*a, b),
            (Err(e), decoded) => panic!("parse says {e:?}, decode {decoded:?}"),
            (Ok(Some(s)), Ok(Some((Frame::Data { origin, id, bytes }, _)))) => {
                assert_eq!((s.origin, s.id, s.len), (origin, id, bytes.len()));
            }
            (Ok(Some(s)), decoded) => assert!(matches!(decoded, Ok(None)), "parse {s:?}, decode {decoded:?}"),
            (Ok(None), Ok(Some((frame, _)))) => assert!(!matches!(frame, Frame::Data { .. }), "{frame:?}"),
            (Ok(None), _) => {}
        }
        match Frame::decode(&bytes) {
            Ok(Some((frame, used))) => {
                let mut again = Vec::new();
                frame.encode(&mut again);
                assert_eq!(again, bytes[..used], "{frame:?} does not re-encode to what was decoded");
                accepted += 1;
            }
            Ok(None) => partial += 1,
            Err(_) => rejected += 1,
        }
    }
    assert!(accepted > 5_000 && rejected > 5_000 && partial > 5_000, "{accepted} {rejected} {partial}");
}

#[test]
fn a_data_header_is_read_before_its_payload_and_checked_like_a_frame() {
    let header = Frame::data_header(vsocket_abi::fabric::Origin::Receiver, 42, MAX_PAYLOAD);
    let start = DataStart::parse(&header).unwrap().unwrap();
    assert_eq!((start.origin, start.id, start.len), (vsocket_abi::fabric::Origin::Receiver, 42, MAX_PAYLOAD));
    assert_eq!(DataStart::parse(&header[..HEADER - 1]), Ok(None));
    let mut long = header;
    long[0..4].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
    assert!(DataStart::parse(&long).is_err());
    assert!(Frame::decode(&long).is_err());
    let mut ping = Vec::new();
    Frame::Ping.encode(&mut ping);
    assert_eq!(DataStart::parse(&ping), Ok(None));
}
