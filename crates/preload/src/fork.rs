//! fork: a child inherits every vSocket connection and may use it, as with
//! kernel sockets. Each end of a connection counts the processes that hold
//! it (in the segment's endpoint line); the parent adds the child for every
//! connection just before fork (the child may not run before the parent
//! closes its copies), and only the close that takes the count to zero
//! ends the connection (FIN, or RST over unread data). A holder that exits
//! without closing is covered by the doorbell: when the last process
//! holding an end is gone, the peer sees end of stream.

use crate::attach::segcache;
use crate::forksafe;
use crate::sys;
use crate::table::{self, Entry};
use std::any::Any;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

static GENERATION: AtomicU64 = AtomicU64::new(0);
static WATCH: Once = Once::new();

thread_local! {
    /// The locks a child's first call may take, held by the thread that
    /// forks from the prepare handler until after the fork, in both
    /// processes: a child never finds one locked by a thread it does not
    /// have (a parent's thread waiting for the daemon's reply as another
    /// forked left the child's first connect waiting for ever).
    static HELD: RefCell<Vec<Box<dyn Any>>> = const { RefCell::new(Vec::new()) };
}

fn let_go() {
    HELD.with(|held| held.borrow_mut().clear());
}

/// Installs the fork handlers (once; called before a connection is made,
/// the first thing a fork would need to account for).
pub fn watch() {
    WATCH.call_once(|| sys::on_fork(prepare, parent, child));
}

extern "C" fn prepare() {
    // First: a listener's lock holder may take any of those below.
    forksafe::close_before_fork();
    segcache::before_fork();
    // In the order every other path takes them: the grants, then the
    // request channel, then the parked doorbells, then the descriptor
    // limit's.
    let held: Vec<Box<dyn Any>> = vec![
        Box::new(crate::kits::lock_for_fork()),
        Box::new(crate::attach::lock_for_fork()),
        Box::new(crate::bells::lock_for_fork()),
    ];
    crate::bells::forking();
    crate::fresh::forget_all();
    HELD.with(|slot| *slot.borrow_mut() = held);
    sys::limit_before_fork();
    let generation = GENERATION.fetch_add(1, Ordering::Relaxed) + 1;
    table::for_each(|entry| {
        if let Entry::Conn(conn) = entry {
            conn.note_fork(generation);
        }
    });
}

extern "C" fn parent() {
    crate::fresh::forget_all();
    sys::limit_after_fork();
    segcache::after_fork_parent();
    let_go();
    forksafe::open_after_fork();
    // Both processes may now read a listener's channel: kits sent on it
    // would be split between them (see `Listener::no_more_kits`).
    table::for_each(|entry| {
        if let Entry::Listener(listener) = entry {
            listener.no_more_kits(true);
        }
    });
}

extern "C" fn child() {
    crate::fresh::forget_all();
    sys::limit_after_fork();
    sys::forget_pid();
    segcache::after_fork_child();
    let_go();
    crate::kits::in_child();
    crate::bells::in_child();
    forksafe::open_after_fork();
    table::for_each(|entry| {
        if let Entry::Listener(listener) = entry {
            listener.no_more_kits(false);
            listener.forget_spare_in_child();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_child_forked_while_another_thread_waits_to_send_can_send_and_shut_down() {
        // A writer asleep on a full ring holds its connection's send lock
        // for as long as the peer takes; a child forked then must not find
        // it held for ever (a send or a shutdown of its own would wait for
        // a thread it does not have).
        watch();
        let (client, server) = crate::conn::testing::pair(4096);
        assert_eq!(client.send(&[&[1u8; 4096]], 0), Ok(4096));
        let writer = {
            let client = client.clone();
            std::thread::spawn(move || client.send(&[b"after"], 0))
        };
        // Asleep for room, holding the lock.
        std::thread::sleep(Duration::from_millis(100));
        assert!(!writer.is_finished());
        let child = sys::fork_running(|| {
            // The peer, in this process too, makes room.
            let mut buf = [0u8; 4096];
            if server.recv(&mut [&mut buf[..]], libc::MSG_DONTWAIT) != Ok(4096) {
                return 2;
            }
            if client.send(&[b"x"], 0) != Ok(1) || client.shutdown(libc::SHUT_WR).is_err() {
                return 3;
            }
            0
        })
        .unwrap();
        assert_eq!(sys::wait_exit(child, 5_000), Some(0), "the child sent and shut down (None: it hung)");
        // The parent's writer goes on once there is room.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 64];
        while !writer.is_finished() && std::time::Instant::now() < deadline {
            let _ = server.recv(&mut [&mut buf[..]], libc::MSG_DONTWAIT);
            std::thread::sleep(Duration::from_millis(1));
        }
        // It wrote, or (woken after the child's end of stream) found the
        // stream ended, as Linux would find the socket they share shut.
        let wrote = writer.join().unwrap();
        assert!(matches!(wrote, Ok(5) | Err(sys::Errno(libc::EPIPE))), "{wrote:?}");
    }

    #[test]
    fn two_processes_writing_one_connection_at_once_overwrite_and_lose_nothing() {
        // A parent and its child write the same end at the same moments,
        // as the kernel lets them on a socket they share: each byte must
        // arrive once (their records may interleave).
        watch();
        const RECORDS: usize = 3000;
        const LEN: usize = 97;
        let (client, server) = crate::conn::testing::pair(4096);
        let child = sys::fork_running(|| {
            let record = [b'c'; LEN];
            let sent = (0..RECORDS).all(|_| client.send(&[&record], 0) == Ok(LEN));
            if sent {
                0
            } else {
                2
            }
        })
        .unwrap();
        let writer = {
            let client = client.clone();
            std::thread::spawn(move || (0..RECORDS).all(|_| client.send(&[&[b'p'; LEN]], 0) == Ok(LEN)))
        };
        let mut counts = [0usize; 256];
        let mut total = 0;
        let mut buf = [0u8; 4096];
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while total < 2 * RECORDS * LEN && std::time::Instant::now() < deadline {
            match server.recv(&mut [&mut buf[..]], libc::MSG_DONTWAIT) {
                Ok(n) => {
                    buf[..n].iter().for_each(|&b| counts[b as usize] += 1);
                    total += n;
                }
                Err(sys::Errno(libc::EAGAIN)) => std::thread::yield_now(),
                Err(e) => panic!("{e:?}"),
            }
        }
        assert!(writer.join().unwrap(), "the parent's writes");
        assert_eq!(sys::wait_exit(child, 10_000), Some(0), "the child's writes");
        assert_eq!((counts[b'p' as usize], counts[b'c' as usize]), (RECORDS * LEN, RECORDS * LEN));
        assert_eq!(total, 2 * RECORDS * LEN, "nothing else arrived");
    }

    #[test]
    fn two_processes_reading_one_connection_at_once_each_take_different_bytes() {
        // A parent and its child read the same end at the same moments, as
        // the kernel lets them on a socket they share: each byte must go to
        // exactly one of them. The child reads as splice does (peek, offer,
        // consume what was taken), the parent as recv does.
        watch();
        const TOTAL: usize = 1 << 21;
        let byte = |i: usize| (i % 251) as u8;
        let (client, server) = crate::conn::testing::pair(4096);
        server.set_blocking(crate::conn::Blocking::NonBlocking);
        // As fork's handler counts the connections of the table (this pair
        // is not in it): the child will hold the end too.
        server.note_fork(u64::MAX);
        let (reported, report) = sys::pipe().unwrap();
        let child = sys::fork_running(|| {
            let (mut count, mut sum) = (0u64, 0u64);
            // A quarter of the stream, then it exits: the parent reads the
            // rest, however the two are scheduled.
            while count < TOTAL as u64 / 4 {
                let mut offered = 0;
                let taken = server.recv_into(61, |bytes| {
                    // Takes part of what is offered now and then: the rest
                    // stays in the connection.
                    offered = bytes.len().min(if count % 3 == 0 { 17 } else { 61 });
                    sum += bytes[..offered].iter().map(|&b| u64::from(b)).sum::<u64>();
                    Ok(offered)
                });
                match taken {
                    Ok(0) => break,
                    Ok(n) if n == offered => count += n as u64,
                    Ok(_) => return 2,
                    Err(sys::Errno(libc::EAGAIN)) => std::thread::yield_now(),
                    Err(_) => return 3,
                }
            }
            let mut line = [0u8; 16];
            line[..8].copy_from_slice(&count.to_le_bytes());
            line[8..].copy_from_slice(&sum.to_le_bytes());
            if sys::write(report, &line) == Ok(16) {
                0
            } else {
                4
            }
        })
        .unwrap();
        let _ = sys::close(report);
        let writer = std::thread::spawn(move || {
            let stream: Vec<u8> = (0..TOTAL).map(byte).collect();
            let sent = stream.chunks(1000).all(|chunk| client.send(&[chunk], 0) == Ok(chunk.len()));
            client.shutdown(libc::SHUT_WR).unwrap();
            sent
        });
        let (mut count, mut sum) = (0u64, 0u64);
        let mut buf = [0u8; 64];
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut child_done = None;
        loop {
            // Half the stream at most while the child reads: what is left
            // is more than the child's quarter, so both read, however the
            // two are scheduled.
            if count >= TOTAL as u64 / 2 && child_done.is_none() {
                child_done = Some(sys::wait_exit(child, 30_000));
            }
            match server.recv(&mut [&mut buf[..]], 0) {
                Ok(0) => break,
                Ok(n) => {
                    count += n as u64;
                    sum += buf[..n].iter().map(|&b| u64::from(b)).sum::<u64>();
                }
                Err(sys::Errno(libc::EAGAIN)) => std::thread::yield_now(),
                Err(e) => panic!("{e:?}"),
            }
            assert!(std::time::Instant::now() < deadline, "the stream did not end");
        }
        // (A read that said end of stream too early leaves the writer
        // waiting for room for ever.)
        while !writer.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(writer.is_finished(), "the stream ended for the parent before the writer finished");
        assert!(writer.join().unwrap(), "every byte sent");
        let child_done = child_done.unwrap_or_else(|| sys::wait_exit(child, 30_000));
        assert_eq!(child_done, Some(0), "the child's reads");
        let mut line = [0u8; 16];
        assert_eq!(sys::read(reported, &mut line), Ok(16));
        let _ = sys::close(reported);
        let child_count = u64::from_le_bytes(line[..8].try_into().unwrap());
        let child_sum = u64::from_le_bytes(line[8..].try_into().unwrap());
        assert!(count > 0 && child_count > 0, "both read: {count} and {child_count}");
        assert_eq!(count + child_count, TOTAL as u64, "every byte once (parent {count}, child {child_count})");
        let expected: u64 = (0..TOTAL).map(|i| u64::from(byte(i))).sum();
        assert_eq!(sum + child_sum, expected, "the bytes themselves");
    }

    #[test]
    fn a_child_forked_while_another_thread_holds_a_listeners_lock_can_take_it() {
        // A listener's locks (its kit state, its retry state, its channel's
        // reader) are held for moments by the thread accepting on it; a
        // child forked in such a moment must not find one held for ever.
        watch();
        let lock = Arc::new(forksafe::Mutex::new(0u32));
        let (held, holding) = std::sync::mpsc::channel();
        let holder = {
            let lock = lock.clone();
            std::thread::spawn(move || {
                let mut state = lock.lock();
                held.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(100));
                *state += 1;
            })
        };
        holding.recv().unwrap();
        let child = sys::fork_running(|| {
            let state = lock.lock();
            // The fork waited for the holder: the child has its write.
            if *state == 1 {
                0
            } else {
                2
            }
        })
        .unwrap();
        assert_eq!(sys::wait_exit(child, 5_000), Some(0), "the child took the lock (None: it hung)");
        holder.join().unwrap();
    }
}
