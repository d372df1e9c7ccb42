//! Model check of the ring's wake-up protocol: run with
//! `RUSTFLAGS="--cfg loom" cargo test -p vsocket-ring --test loom --release`.
//!
//! A sleeper that found the ring empty (or full) and armed its flag must
//! either see the other side's progress or be woken by it; no interleaving
//! may leave it asleep with work pending.
#![cfg(loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use vsocket_ring::{Consumer, Producer, RingControl, RxState};

/// A ring in loom-visible memory; the data area is plain heap memory.
struct Model {
    ctl: RingControl,
    data: std::cell::UnsafeCell<[u8; 8]>,
    doorbell: AtomicUsize,
}

// SAFETY: the data area is only touched through the ring protocol, which
// gives producer and consumer disjoint bytes.
unsafe impl Sync for Model {}
// SAFETY: as above.
unsafe impl Send for Model {}

impl Model {
    fn new() -> Arc<Model> {
        Arc::new(Model { ctl: RingControl::default(), data: std::cell::UnsafeCell::new([0; 8]), doorbell: AtomicUsize::new(0) })
    }
    fn producer(&self) -> Producer<'_> {
        // SAFETY: 8 bytes, alive as long as `self`.
        unsafe { Producer::new(&self.ctl, self.data.get() as *mut u8, 8) }
    }
    fn consumer(&self) -> Consumer<'_> {
        // SAFETY: as in `producer`.
        unsafe { Consumer::new(&self.ctl, self.data.get() as *mut u8, 8) }
    }
    fn ring_doorbell(&self) {
        self.doorbell.fetch_add(1, Ordering::SeqCst);
    }
    /// Sleeps until the doorbell rings (loom explores every interleaving, and
    /// reports a deadlock if it never does).
    fn sleep(&self, seen: &mut usize) {
        while self.doorbell.load(Ordering::SeqCst) == *seen {
            thread::yield_now();
        }
        *seen = self.doorbell.load(Ordering::SeqCst);
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
