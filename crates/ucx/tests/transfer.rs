//! Frames between two workers in two threads over loopback: bulk in both
//! directions at once, in order and intact, and one-frame round trips.

mod util;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use util::{check_frame, connected_pair, make_frame, Rng};
use vsocket_ucx::{EpId, Event, Worker};

/// Bytes each side sends; `VSOCKET_UCX_TEST_MIB` overrides (in MiB).
fn bytes_per_direction() -> u64 {
    let mib: u64 = std::env::var("VSOCKET_UCX_TEST_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(512);
    mib << 20
}

/// Sends stream `tx_stream` of `total` bytes on `ep` while receiving the
/// peer's stream `rx_stream` of the same size, checking every frame; then
/// flushes, and keeps progressing until the peer is done too (its last
/// frames and its flush need this side's progress).
fn run_side(
    mut worker: Worker,
    ep: EpId,
    tx_stream: u64,
    rx_stream: u64,
    total: u64,
    done: Arc<[AtomicBool; 2]>,
) -> (Worker, u64) {
    let mut tx_sizes = Rng::new(tx_stream);
    let mut rx_sizes = Rng::new(rx_stream);
    let (mut sent, mut tx_seq) = (0u64, 0u64);
    let (mut received, mut rx_seq) = (0u64, 0u64);
    let mut next_rx_len = rx_sizes.frame_len();
    let deadline = Instant::now() + Duration::from_secs(600);
    while sent < total || received < total {
        assert!(Instant::now() < deadline, "stream {tx_stream}: stuck at {sent}/{received} bytes");
        if sent < total {
            let len = tx_sizes.frame_len().min((total - sent) as usize);
            worker.send(ep, &make_frame(tx_stream, tx_seq, len)).unwrap();
            sent += len as u64;
            tx_seq += 1;
            worker.progress();
        }
        // While sending, only look at what has arrived; once done, sleep.
        let wait = if sent < total { Duration::ZERO } else { Duration::from_secs(5) };
        while let Some(event) = worker.wait_event(Some(wait)).unwrap() {
            match event {
                Event::Frame { ep: from, frame } => {
                    assert_eq!(from, ep);
                    let len = next_rx_len.min((total - received) as usize);
                    check_frame(rx_stream, rx_seq, len, &frame);
                    received += len as u64;
                    rx_seq += 1;
                    next_rx_len = rx_sizes.frame_len();
                }
                other => panic!("stream {tx_stream}: unexpected {other:?}"),
            }
            if received >= total {
                break;
            }
        }
    }
    worker.flush(ep).unwrap();
    let me = (tx_stream - 1) as usize;
    done[me].store(true, Ordering::SeqCst);
    while !done[1 - me].load(Ordering::SeqCst) {
        if let Some(event) = worker.wait_event(Some(Duration::from_millis(1))).unwrap() {
            panic!("stream {tx_stream}: unexpected {event:?}");
        }
    }
    (worker, tx_seq)
}

#[test]
fn bulk_both_directions_at_once_arrives_in_order_byte_for_byte() {
    let total = bytes_per_direction();
    let (server, server_ep, client, client_ep) = connected_pair();
    let start = Instant::now();
    let done = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
    let server_done = Arc::clone(&done);
    let server = thread::spawn(move || run_side(server, server_ep, 2, 1, total, server_done));
    let client = thread::spawn(move || run_side(client, client_ep, 1, 2, total, done));
    let (client, client_frames) = client.join().unwrap();
    let (server, server_frames) = server.join().unwrap();
    let elapsed = start.elapsed();
    let mb = (2 * total) as f64 / 1e6;
    eprintln!(
        "{} MiB each way ({client_frames} + {server_frames} frames) in {elapsed:.2?}: {:.0} MB/s total, {:.0} MB/s per direction",
        total >> 20,
        mb / elapsed.as_secs_f64(),
        mb / 2.0 / elapsed.as_secs_f64()
    );
    drop(client);
    drop(server);
}

#[test]
fn one_frame_round_trips() {
    let (mut server, server_ep, mut client, client_ep) = connected_pair();
    const ROUNDS: u32 = 2000;
    let echo = thread::spawn(move || {
        for _ in 0..=ROUNDS {
            loop {
                server.progress();
                if let Some(event) = server.poll_event() {
                    match event {
                        Event::Frame { frame, .. } => {
                            server.send(server_ep, &frame).unwrap();
                            break;
                        }
                        other => panic!("echo: unexpected {other:?}"),
                    }
                }
            }
        }
        server
    });
    let frame = make_frame(9, 0, 64);
    let mut start = Instant::now();
    for round in 0..=ROUNDS {
        if round == 1 {
            // The first round trip also finishes connection setup.
            start = Instant::now();
        }
        client.send(client_ep, &frame).unwrap();
        loop {
            client.progress();
            if let Some(event) = client.poll_event() {
                match event {
                    Event::Frame { frame: back, .. } => {
                        assert_eq!(back, frame);
                        break;
                    }
                    other => panic!("client: unexpected {other:?}"),
                }
            }
        }
    }
    let rtt = start.elapsed() / ROUNDS;
    eprintln!("64 B frame round trip, busy-polling: {rtt:.2?}");
    drop(echo.join().unwrap());
}
