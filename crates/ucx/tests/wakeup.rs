//! The event fd lets a caller sleep in its own poll(2) until a frame comes.

mod util;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};
use util::connected_pair;
use vsocket_ucx::Event;

#[test]
fn a_thread_asleep_in_poll_on_the_event_fd_wakes_for_a_frame() {
    let (mut server, _server_ep, mut client, client_ep) = connected_pair();
    let (asleep_tx, asleep_rx) = mpsc::channel();
    let receiver = thread::spawn(move || {
        // Let connection setup traffic settle, then sleep only in poll(2).
        while server.wait_event(Some(Duration::from_millis(200))).unwrap().is_some() {}
        let mut told = false;
        let mut wakeups = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "no frame within 10 s");
            server.progress();
            if let Some(event) = server.poll_event() {
                match event {
                    Event::Frame { frame, .. } => return (server, frame, wakeups),
                    other => panic!("unexpected {other:?}"),
                }
            }
            if !server.arm().unwrap() {
                continue;
            }
            if !told {
                asleep_tx.send(Instant::now()).unwrap();
                told = true;
            }
            let mut pfd = libc::pollfd { fd: server.event_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, 5000) };
            assert_eq!(ready, 1, "poll on the event fd timed out instead of waking for the frame");
            wakeups += 1;
        }
    });
    let asleep_at = asleep_rx.recv().unwrap();
    let received = Arc::new(AtomicBool::new(false));
    let client_received = Arc::clone(&received);
    let sender = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        client.send(client_ep, b"wake up").unwrap();
        // The frame may still need this worker's progress to leave.
        while !client_received.load(Ordering::SeqCst) {
            client.wait_event(Some(Duration::from_millis(10))).unwrap();
        }
        client
    });
    let (server, frame, wakeups) = receiver.join().unwrap();
    received.store(true, Ordering::SeqCst);
    let slept = asleep_at.elapsed();
    assert_eq!(frame, b"wake up");
    assert!(slept >= Duration::from_millis(250), "the receiver did not sleep ({slept:?})");
    eprintln!("woke {wakeups} time(s); frame arrived {slept:?} after the receiver went to sleep");
    drop(sender.join().unwrap());
    drop(server);
}
