//! Model check of the ring's wake-up protocol: run with
//! `RUSTFLAGS="--cfg loom" cargo test -p vsocket-ring --test loom --release`.
//!
//! A sleeper that found the ring empty (or full) and armed its flag must
//! either see the other side's progress or be woken by it; no interleaving
//! may leave it asleep with work pending.
#![cfg(loom)]

use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;
use vsocket_ring::{Consumer, Producer, RingControl, RxState};

/// A ring in loom-visible memory; the data area is plain heap memory.
struct Model {
    ctl: RingControl,
    data: std::cell::UnsafeCell<[u8; 8]>,
    /// The doorbell: a wake-up count and a condition to sleep on.
    rings: Mutex<usize>,
    rung: Condvar,
}

// SAFETY: the data area is only touched through the ring protocol, which
// gives producer and consumer disjoint bytes.
unsafe impl Sync for Model {}
// SAFETY: as above.
unsafe impl Send for Model {}

impl Model {
    fn new() -> Arc<Model> {
        Arc::new(Model {
            ctl: RingControl::default(),
            data: std::cell::UnsafeCell::new([0; 8]),
            rings: Mutex::new(0),
            rung: Condvar::new(),
        })
    }
    fn producer(&self) -> Producer<'_> {
        // SAFETY: 8 bytes, alive as long as `self`.
        unsafe { Producer::new(&self.ctl.producer, &self.ctl.consumer, self.data.get() as *mut u8, 8) }
    }
    fn consumer(&self) -> Consumer<'_> {
        // SAFETY: as in `producer`.
        unsafe { Consumer::new(&self.ctl.producer, &self.ctl.consumer, self.data.get() as *mut u8, 8) }
    }
    fn ring_doorbell(&self) {
        *self.rings.lock().unwrap() += 1;
        self.rung.notify_all();
    }
    /// Sleeps until the doorbell rings again; loom reports a deadlock if no
    /// interleaving would ring it.
    fn sleep(&self, seen: &mut usize) {
        let mut rings = self.rings.lock().unwrap();
        while *rings == *seen {
            rings = self.rung.wait(rings).unwrap();
        }
        *seen = *rings;
    }
}

#[test]
fn consumer_never_sleeps_through_data() {
    loom::model(|| {
        let m = Model::new();
        let p = m.clone();
        let writer = thread::spawn(move || {
            let (_, wake) = p.producer().write(&[b"hi"]).unwrap();
            if wake {
                p.ring_doorbell();
            }
        });
        let c = m.consumer();
        let mut seen = 0;
        loop {
            if let RxState::Data(n) = c.state().unwrap() {
                assert_eq!(n, 2);
                break;
            }
            c.arm();
            if c.state().unwrap() != RxState::Empty {
                continue;
            }
            m.sleep(&mut seen);
        }
        writer.join().unwrap();
    });
}

#[test]
fn producer_never_sleeps_through_space() {
    loom::model(|| {
        let m = Model::new();
        assert_eq!(m.producer().write(&[&[7u8; 8]]).unwrap().0, 8);
        let c = m.clone();
        let reader = thread::spawn(move || {
            let mut buf = [0u8; 8];
            let (_, wake) = c.consumer().read(&mut [&mut buf[..]], false).unwrap();
            if wake {
                c.ring_doorbell();
            }
        });
        let p = m.producer();
        let mut seen = 0;
        loop {
            if p.space().unwrap() > 0 {
                break;
            }
            p.arm();
            if p.space().unwrap() > 0 {
                continue;
            }
            m.sleep(&mut seen);
        }
        reader.join().unwrap();
    });
}

#[test]
fn consumer_never_sleeps_through_fin() {
    loom::model(|| {
        let m = Model::new();
        let p = m.clone();
        let writer = thread::spawn(move || {
            if p.producer().finish() {
                p.ring_doorbell();
            }
        });
        let c = m.consumer();
        let mut seen = 0;
        loop {
            if c.state().unwrap() == RxState::Fin {
                break;
            }
            c.arm();
            if c.state().unwrap() != RxState::Empty {
                continue;
            }
            m.sleep(&mut seen);
        }
        writer.join().unwrap();
    });
}

/// A consumer woken once, which reads, re-arms and sleeps again, is woken
/// again by the next write: each arming is a value the producer has not
/// answered yet.
#[test]
fn a_consumer_that_arms_again_is_woken_again() {
    loom::model(|| {
        let m = Model::new();
        let p = m.clone();
        let writer = thread::spawn(move || {
            for byte in [1u8, 2] {
                let (_, wake) = p.producer().write(&[&[byte]]).unwrap();
                if wake {
                    p.ring_doorbell();
                }
            }
        });
        let c = m.consumer();
        let mut seen = 0;
        let mut got = Vec::new();
        while got.len() < 2 {
            let mut buf = [0u8; 2];
            let (n, _) = c.read(&mut [&mut buf[..]], false).unwrap();
            got.extend_from_slice(&buf[..n]);
            if n > 0 {
                continue;
            }
            c.arm();
            if c.state().unwrap() != RxState::Empty {
                continue;
            }
            m.sleep(&mut seen);
        }
        assert_eq!(got, [1, 2]);
        writer.join().unwrap();
    });
}

/// The daemon returns an empty ring's pages (here: zeroes its data area)
/// while the producer writes: no interleaving may let the punch land on
/// bytes being written, so the consumer reads exactly what was written.
#[test]
fn trimming_never_discards_a_byte_being_written() {
    loom::model(|| {
        let m = Model::new();
        // A first exchange: the writer keeps the protocol (takes the write
        // claim), the ring is empty.
        m.producer().try_claim(1).unwrap();
        assert_eq!(m.producer().write(&[b"ab"]).unwrap().0, 2);
        m.producer().release_claim(1);
        let mut buf = [0u8; 2];
        assert_eq!(m.consumer().read(&mut [&mut buf[..]], false).unwrap().0, 2);
        let d = m.clone();
        let daemon = thread::spawn(move || {
            vsocket_ring::trim_idle(&d.ctl.producer, &d.ctl.consumer, || {
                // SAFETY: the protocol gives the daemon the data area while
                // it punches (what this test checks).
                unsafe { *d.data.get() = [0; 8] };
            })
        });
        m.producer().try_claim(1).unwrap();
        assert_eq!(m.producer().write(&[b"hi"]).unwrap().0, 2);
        m.producer().release_claim(1);
        daemon.join().unwrap();
        let mut buf = [0u8; 8];
        let (n, _) = m.consumer().read(&mut [&mut buf[..]], false).unwrap();
        assert_eq!(&buf[..n], b"hi");
    });
}
