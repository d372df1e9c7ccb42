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

/// Two doorbells, as a set of two connections has: each side of the
/// model sleeps until the ones it watches ring.
struct Bells {
    rung: Mutex<[usize; 2]>,
    changed: Condvar,
}

impl Bells {
    fn new() -> Arc<Bells> {
        Arc::new(Bells { rung: Mutex::new([0; 2]), changed: Condvar::new() })
    }
    fn ring(&self, bell: usize) {
        self.rung.lock().unwrap()[bell] += 1;
        self.changed.notify_all();
    }
    /// Sleeps until one of `watched` rings again (loom reports a deadlock
    /// if no interleaving would ring it).
    fn sleep(&self, watched: &[usize], seen: &mut [usize; 2]) {
        let mut rung = self.rung.lock().unwrap();
        while watched.iter().all(|&b| rung[b] == seen[b]) {
            rung = self.changed.wait(rung).unwrap();
        }
        *seen = *rung;
    }
}

/// The writer's side of one wake-up per sleep, as the library keeps it: a
/// wake-up due on a ring whose reader's arming names the sleep last
/// woken is not rung again, if that reader is the ring's only sleeper.
struct Kicker {
    last: u64,
}

impl Kicker {
    fn write(
        &mut self,
        p: Producer<'_>,
        byte: u8,
        sleepers: &loom::sync::atomic::AtomicU32,
        bells: &Bells,
        bell: usize,
    ) {
        let (_, wake) = p.write(&[&[byte]]).unwrap();
        if !wake {
            return;
        }
        let sleep = p.reader_sleep();
        if sleep != 0 && sleep == self.last && sleepers.load(loom::sync::atomic::Ordering::Acquire) == 1 {
            return;
        }
        bells.ring(bell);
        self.last = sleep;
    }
}

/// A set sleeping on two rings arms both with one sleep; the writer,
/// writing both, rings only the first: the set, woken by it, looks at
/// both rings again, so no interleaving leaves it asleep with a byte
/// waiting.
#[test]
fn a_set_woken_once_for_two_rings_misses_neither() {
    loom::model(|| {
        let rings = [Model::new(), Model::new()];
        let bells = Bells::new();
        let sleepers = Arc::new([loom::sync::atomic::AtomicU32::new(1), loom::sync::atomic::AtomicU32::new(1)]);
        let (w, b, s) = (rings.clone(), bells.clone(), sleepers.clone());
        let writer = thread::spawn(move || {
            let mut kicker = Kicker { last: 0 };
            for i in 0..2 {
                kicker.write(w[i].producer(), i as u8, &s[i], &b, i);
            }
        });
        let mut seen = [0; 2];
        let mut sleep = 1u64;
        loop {
            let has = |i: usize| matches!(rings[i].consumer().state().unwrap(), RxState::Data(_));
            if has(0) && has(1) {
                break;
            }
            sleep += 2;
            rings.iter().for_each(|r| r.consumer().arm_for(sleep));
            if has(0) && has(1) {
                continue;
            }
            bells.sleep(&[0, 1], &mut seen);
            rings.iter().for_each(|r| r.consumer().disarm());
        }
        writer.join().unwrap();
    });
}

/// A second sleeper on the second ring (a thread blocked reading it, whose
/// arming names no sleep) is counted there: the writer rings its bell even
/// when the ring's latest arming is the set's, already woken.
#[test]
fn a_second_sleeper_on_a_ring_is_woken_though_the_set_was() {
    // Four threads: every interleaving with up to three preemptions (all
    // of them takes hours).
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(|| {
        let rings = [Model::new(), Model::new()];
        let bells = Bells::new();
        // The set counts itself on both rings; the reader counts itself on
        // the second before it arms.
        let sleepers = Arc::new([loom::sync::atomic::AtomicU32::new(1), loom::sync::atomic::AtomicU32::new(1)]);
        let (w, b, s) = (rings.clone(), bells.clone(), sleepers.clone());
        let (r, rb, rs) = (rings.clone(), bells.clone(), sleepers.clone());
        let reader = thread::spawn(move || {
            let mut seen = [0; 2];
            rs[1].fetch_add(1, loom::sync::atomic::Ordering::AcqRel);
            loop {
                if matches!(r[1].consumer().state().unwrap(), RxState::Data(_)) {
                    break;
                }
                r[1].consumer().arm();
                if matches!(r[1].consumer().state().unwrap(), RxState::Data(_)) {
                    break;
                }
                rb.sleep(&[1], &mut seen);
            }
        });
        // The set armed both rings with sleep 3 before the writer wrote.
        rings.iter().for_each(|r| r.consumer().arm_for(3));
        let writer = thread::spawn(move || {
            let mut kicker = Kicker { last: 0 };
            for i in 0..2 {
                kicker.write(w[i].producer(), i as u8, &s[i], &b, i);
            }
        });
        let mut seen = [0; 2];
        bells.sleep(&[0, 1], &mut seen);
        writer.join().unwrap();
        reader.join().unwrap();
    });
}
