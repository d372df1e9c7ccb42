//! Helpers shared by the integration tests: a connected pair of workers and
//! deterministic frames that carry their own sequence number and checksum.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use vsocket_ucx::{Config, EpId, Event, Worker};

/// Per-test UCX settings: `VSOCKET_UCX_TEST_TLS`, when set, picks the
/// transports (e.g. `tcp`); otherwise UCX's default selection is used.
pub fn config() -> Config {
    match std::env::var("VSOCKET_UCX_TEST_TLS") {
        Ok(tls) => Config::new().set("TLS", &tls),
        Err(_) => Config::new(),
    }
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A listening worker and a worker connected to it, with the endpoint each
/// has for the other, once the listener has accepted.
pub fn connected_pair() -> (Worker, EpId, Worker, EpId) {
    let mut server = Worker::with_config(&config()).unwrap();
    server.listen(loopback()).unwrap();
    let addr = server.listen_address().unwrap();
    let mut client = Worker::with_config(&config()).unwrap();
    let client_ep = client.connect(addr).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "the listener accepted nothing in 10 s");
        client.progress();
        if let Some(event) = client.poll_event() {
            panic!("client: unexpected {event:?}");
        }
        server.progress();
        match server.poll_event() {
            Some(Event::Accepted { ep, peer }) => {
                assert_eq!(peer.map(|p| p.ip()), Some(addr.ip()));
                return (server, ep, client, client_ep);
            }
            Some(event) => panic!("server: unexpected {event:?}"),
            None => {}
        }
    }
}

/// xorshift64*: deterministic, seedable, fast enough in debug builds.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Half the frames small (1..=512 B, eager), half up to 256 KiB
    /// (fragmented eager or rendezvous).
    pub fn frame_len(&mut self) -> usize {
        if self.next() & 1 == 0 {
            1 + (self.next() % 512) as usize
        } else {
            1 + (self.next() % (256 << 10)) as usize
        }
    }
}

fn checksum(bytes: &[u8]) -> u64 {
    let mut sum = 0xcbf2_9ce4_8422_2325u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        sum = (sum ^ u64::from_le_bytes(w.try_into().unwrap())).rotate_left(23).wrapping_mul(0x100_0000_01b3);
    }
    for &b in words.remainder() {
        sum = (sum ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    sum
}

/// Frame `seq` of a stream: `len` pseudo-random bytes from (stream, seq);
/// from 16 bytes on it starts with its sequence number and the checksum of
/// the rest, so a misplaced or damaged frame also shows on its own.
pub fn make_frame(stream: u64, seq: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(stream << 40 ^ seq);
    let mut frame = Vec::with_capacity(len + 8);
    while frame.len() < len {
        frame.extend_from_slice(&rng.next().to_le_bytes());
    }
    frame.truncate(len);
    if len >= 16 {
        let sum = checksum(&frame[16..]);
        frame[..8].copy_from_slice(&seq.to_le_bytes());
        frame[8..16].copy_from_slice(&sum.to_le_bytes());
    }
    frame
}

/// Checks a received frame against the sequence number it must carry.
pub fn check_frame(stream: u64, seq: u64, len: usize, frame: &[u8]) {
    assert_eq!(frame.len(), len, "stream {stream} frame {seq}: length");
    if len >= 16 {
        assert_eq!(u64::from_le_bytes(frame[..8].try_into().unwrap()), seq, "stream {stream}: sequence number");
        let sum = u64::from_le_bytes(frame[8..16].try_into().unwrap());
        assert_eq!(checksum(&frame[16..]), sum, "stream {stream} frame {seq}: checksum");
    }
    assert!(frame == make_frame(stream, seq, len), "stream {stream} frame {seq}: content");
}
