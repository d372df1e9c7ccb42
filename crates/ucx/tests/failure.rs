//! A dead peer, a dropped worker or a refused connect is reported within a
//! bounded time, never a hang.

mod util;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};
use util::{config, connected_pair, loopback, make_frame};
use vsocket_ucx::{CloseMode, EpId, Event, Worker};

const BOUND: Duration = Duration::from_secs(10);

/// Sends frames on `ep` until the endpoint is reported failed, by a
/// `Failed` event or a send error; returns how long after `since` that was.
fn send_until_failure(worker: &mut Worker, ep: EpId, since: Instant) -> Duration {
    let frame = make_frame(7, 0, 64 << 10);
    loop {
        assert!(since.elapsed() < BOUND, "the failure was not reported within {BOUND:?}");
        if let Err(e) = worker.send(ep, &frame) {
            eprintln!("send failed: {e}");
            return since.elapsed();
        }
        while let Some(event) = worker.wait_event(Some(Duration::from_millis(1))).unwrap() {
            match event {
                Event::Failed { ep: failed, error } => {
                    assert_eq!(failed, ep);
                    eprintln!("failed: {error}");
                    return since.elapsed();
                }
                Event::Frame { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

#[test]
fn dropping_the_peer_worker_mid_stream_fails_the_endpoint() {
    let (mut server, _server_ep, mut client, client_ep) = connected_pair();
    let receiver = thread::spawn(move || {
        let mut frames = 0;
        while frames < 50 {
            if let Some(Event::Frame { .. }) = server.wait_event(Some(BOUND)).unwrap() {
                frames += 1;
            }
        }
        drop(server);
        Instant::now()
    });
    let frame = make_frame(7, 0, 64 << 10);
    let mut send_failed_at = None;
    while !receiver.is_finished() && send_failed_at.is_none() {
        match client.send(client_ep, &frame) {
            Ok(()) => {
                client.progress();
            }
            Err(e) => {
                eprintln!("send failed: {e}");
                send_failed_at = Some(Instant::now());
            }
        }
    }
    let dropped_at = receiver.join().unwrap();
    let took = match send_failed_at {
        Some(at) => at.saturating_duration_since(dropped_at),
        None => send_until_failure(&mut client, client_ep, dropped_at),
    };
    eprintln!("peer worker dropped: failure reported after {took:?}");
    client.close(client_ep, CloseMode::Force).unwrap();
    assert!(client.endpoints().is_empty());
}

/// When run as the child of `killing_the_peer_process_fails_the_endpoint`:
/// listens, prints its address, and receives until killed.
#[test]
fn child_peer_process() {
    if std::env::var_os("VSOCKET_UCX_CHILD").is_none() {
        return;
    }
    let mut worker = Worker::with_config(&config()).unwrap();
    worker.listen(loopback()).unwrap();
    println!("ADDR {}", worker.listen_address().unwrap());
    loop {
        worker.wait_event(None).unwrap();
    }
}

#[test]
fn killing_the_peer_process_fails_the_endpoint() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_peer_process", "--nocapture", "--test-threads", "1"])
        .env("VSOCKET_UCX_CHILD", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr: SocketAddr = loop {
        let line = lines.next().expect("the child exited before listening").unwrap();
        // libtest may print the test's name on the same line first.
        if let Some(at) = line.find("ADDR ") {
            break line[at + 5..].trim().parse().unwrap();
        }
    };
    let mut client = Worker::with_config(&config()).unwrap();
    let ep = client.connect(addr).unwrap();
    let frame = make_frame(7, 0, 64 << 10);
    for _ in 0..200 {
        client.send(ep, &frame).unwrap();
        client.progress();
    }
    client.flush(ep).unwrap();
    child.kill().unwrap();
    let killed_at = Instant::now();
    child.wait().unwrap();
    let took = send_until_failure(&mut client, ep, killed_at);
    eprintln!("peer process killed: failure reported after {took:?}");
}

#[test]
fn connecting_to_a_port_nobody_listens_on_fails() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut client = Worker::with_config(&config()).unwrap();
    let start = Instant::now();
    let ep = match client.connect(SocketAddr::from(([127, 0, 0, 1], port))) {
        Ok(ep) => ep,
        Err(e) => {
            eprintln!("connect failed at once: {e}");
            return;
        }
    };
    let took = send_until_failure(&mut client, ep, start);
    eprintln!("refused connect reported after {took:?}");
}

#[test]
fn a_closed_endpoint_is_reported_to_its_peer() {
    let (mut server, server_ep, mut client, client_ep) = connected_pair();
    // A flush close needs the peer's progress, so it runs in its own thread.
    let closer = thread::spawn(move || {
        client.send(client_ep, b"last words").unwrap();
        client.close(client_ep, CloseMode::Flush).unwrap();
        client
    });
    let deadline = Instant::now() + BOUND;
    let mut got_frame = false;
    loop {
        assert!(Instant::now() < deadline, "the peer's close was not reported");
        match server.wait_event(Some(Duration::from_millis(10))).unwrap() {
            Some(Event::Frame { frame, .. }) => {
                assert_eq!(frame, b"last words");
                got_frame = true;
            }
            Some(Event::Failed { ep, error }) => {
                assert_eq!(ep, server_ep);
                eprintln!("peer closed: {error}");
                break;
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => {}
        }
    }
    while !closer.is_finished() {
        server.wait_event(Some(Duration::from_millis(10))).unwrap();
    }
    drop(closer.join().unwrap());
    assert!(got_frame, "the frame sent before a flush close was lost");
    assert!(server.send(server_ep, b"anyone?").is_err());
}
