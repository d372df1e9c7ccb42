//! A bounded fuzz run of the control-message decoder (the property of the
//! cargo-fuzz target `fuzz/fuzz_targets/control_decode.rs`, fed by a seeded
//! generator instead of libFuzzer): whatever a guest sends, `decode` returns
//! a message or an error, and anything it accepts encodes back to exactly
//! the bytes received (no field is silently dropped or normalised).

use vsocket_abi::control::{Message, MAX_MESSAGE};

mod common;

use common::XorShift;

fn check(bytes: &[u8]) -> bool {
    match Message::decode(bytes) {
        Ok(message) => {
            let mut buf = [0u8; MAX_MESSAGE];
            assert_eq!(message.encode(&mut buf), bytes, "{message:?} does not re-encode to what was decoded");
            true
        }
        Err(_) => false,
    }
}

#[test]
fn decoded_messages_re_encode_to_the_bytes_received() {
    // Exact lengths per kind (1 kind byte + body), so that the generator
    // reaches the field checks and the accept path, not only length errors.
    const LENGTHS: [usize; 9] = [0, 13, 25, 1, 5, 1, 11, 1, 25];
    let mut rng = XorShift(0x5eed_c0de_d00d_f00d);
    let (mut accepted, mut total) = (0u32, 0u32);
    for round in 0..300_000 {
        let kind = (rng.next() % 11) as u8; // 0, the eight kinds, and two unknown ones
        let len = match round % 4 {
            // The kind's exact length, one short, one long, or anything.
            0 | 1 => LENGTHS.get(kind as usize).copied().unwrap_or(1).max(1),
            2 => (LENGTHS.get(kind as usize).copied().unwrap_or(1) + 1).min(MAX_MESSAGE),
            _ => (rng.next() % (MAX_MESSAGE as u64 + 1)) as usize,
        };
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if let Some(first) = bytes.first_mut() {
            *first = if round % 8 == 7 { rng.next() as u8 } else { kind };
        }
        if round % 3 == 0 && len >= 25 {
            // A plausible ring size, so Connected and Incoming are accepted too.
            let shift = 12 + rng.next() % 16;
            bytes[21..25].copy_from_slice(&(1u32 << shift).to_le_bytes());
        }
        total += 1;
        accepted += u32::from(check(&bytes));
    }
    // Both paths ran, many times.
    assert!(accepted > 10_000 && total - accepted > 10_000, "accepted {accepted} of {total}");
}

#[test]
fn flipping_any_bit_of_a_valid_message_is_caught_or_round_trips() {
    let a = |s: &str| s.parse().unwrap();
    let info = vsocket_abi::control::ConnectionInfo {
        id: 9,
        local: a("10.0.0.2:80"),
        peer: a("10.0.0.3:4000"),
        ring_size: 1 << 18,
    };
    let messages = [
        Message::Connect { local: a("10.0.0.3:40000"), remote: a("10.0.0.2:6379") },
        Message::Connected(info),
        Message::Refused { errno: 111 },
        Message::Listen { local: a("0.0.0.0:80"), backlog: 511 },
        Message::Incoming(info),
    ];
    for m in messages {
        let mut buf = [0u8; MAX_MESSAGE];
        let bytes = m.encode(&mut buf).to_vec();
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            check(&flipped);
        }
    }
}
