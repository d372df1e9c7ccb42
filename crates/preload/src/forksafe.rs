//! Mutexes a forked child never finds held by a thread it does not have.
//!
//! fork copies memory, locks included, but only the thread that forks: a
//! lock another thread held at that moment stays locked in the child with
//! no owner, and the child's first call that takes it waits for ever. The
//! process-wide locks are held by fork's prepare handler one by one (see
//! `fork.rs`); a listener's locks, one set per listener, go through the
//! gate here instead. Taking one of these mutexes passes the gate (an
//! atomic count); fork's prepare handler closes the gate and waits until
//! no thread holds one, and both processes open it again after the fork.
//!
//! Only locks held for a bounded time pass the gate (the prepare handler
//! waits for them). A lock that may be held across a wait for the
//! program's peer (a writer asleep until its peer makes room) is a
//! [`Lock`] instead: fork does not wait for it, and a child takes over one
//! a thread of its parent held.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use vsocket_ring::spin::Backoff;

/// Set from the prepare handler until after the fork.
static CLOSED: AtomicBool = AtomicBool::new(false);
/// Threads inside (holding at least one of these mutexes).
static INSIDE: AtomicU32 = AtomicU32::new(0);

thread_local! {
    /// How many of these mutexes this thread holds: only its first one
    /// passes the gate (a thread holding one may take another while the
    /// gate closes, and must not wait for itself).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// A mutex whose holders fork waits for.
#[derive(Default)]
pub struct Mutex<T> {
    inner: std::sync::Mutex<T>,
}

/// A held [`Mutex`]; the gate is left when the last one a thread holds is
/// let go.
pub struct Guard<'a, T> {
    // Dropped first: the mutex, then the pass.
    inner: std::sync::MutexGuard<'a, T>,
    _pass: Pass,
}

struct Pass;

impl<T> Mutex<T> {
    pub const fn new(value: T) -> Mutex<T> {
        Mutex { inner: std::sync::Mutex::new(value) }
    }

    /// The value, held alone (no lock, no gate).
    pub fn get_mut(&mut self) -> &mut T {
        self.inner.get_mut().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks, after the gate (a poisoned lock is taken as it is: the state
    /// inside is kept consistent by each holder's own code).
    pub fn lock(&self) -> Guard<'_, T> {
        let pass = enter();
        Guard { inner: self.inner.lock().unwrap_or_else(|e| e.into_inner()), _pass: pass }
    }
}

impl<T> std::ops::Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T> std::ops::DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

fn enter() -> Pass {
    if DEPTH.with(|d| d.replace(d.get() + 1)) > 0 {
        return Pass;
    }
    let mut backoff = Backoff::new();
    loop {
        if !CLOSED.load(Ordering::SeqCst) {
            INSIDE.fetch_add(1, Ordering::SeqCst);
            // Either the forking thread sees this thread inside, or this
            // thread sees the gate closed (both sides are SeqCst).
            if !CLOSED.load(Ordering::SeqCst) {
                return Pass;
            }
            INSIDE.fetch_sub(1, Ordering::SeqCst);
        }
        // A fork is under way: it waits at most for the request channel's
        // reply timeout.
        backoff.wait(std::time::Duration::MAX);
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        if DEPTH.with(|d| d.replace(d.get() - 1)) == 1 {
            INSIDE.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A lock (of a connection's sending or receiving side) that a forked
/// child never finds held for ever, without fork waiting for its holder:
/// its word is 0 while free, else the id of the process whose thread
/// holds it (`sys::getpid`, which a forked child learns afresh; with
/// [`CONTENDED`] while others sleep for it). In a child, a word held by a
/// parent's thread (which the child does not have, and which will never
/// let it go there) names another process, and the next taker takes it
/// over. What the lock kept together is then the parent's business: in the
/// child, the parent's thread never runs again.
#[derive(Debug, Default)]
pub struct Lock {
    word: AtomicU32,
}

/// Set in a held [`Lock`]'s word while a thread may sleep for it: the
/// holder wakes one when it lets go (as a futex mutex does). Process ids
/// stay below it (Linux's `pid_max` is at most 2^22).
const CONTENDED: u32 = 1 << 31;

/// A held [`Lock`], let go when dropped.
pub struct LockGuard<'a>(&'a AtomicU32);

impl Lock {
    pub const fn new() -> Lock {
        Lock { word: AtomicU32::new(0) }
    }

    /// Takes the lock if it is free, or held by a thread of a process this
    /// one was forked from.
    pub fn try_lock(&self) -> Option<LockGuard<'_>> {
        self.try_lock_in(me())
    }

    /// [`try_lock`](Self::try_lock) by process `mine`.
    fn try_lock_in(&self, mine: u32) -> Option<LockGuard<'_>> {
        let held = match self.word.compare_exchange(0, mine, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => return Some(LockGuard(&self.word)),
            Err(held) => held,
        };
        if held & !CONTENDED == mine {
            return None;
        }
        // Stale: taken over (another taker in this process may win it).
        self.word.compare_exchange(held, mine, Ordering::Acquire, Ordering::Relaxed).ok().map(|_| LockGuard(&self.word))
    }

    /// Takes the lock, waiting for a holder of this process: a few turns
    /// of yielding, then asleep on the word (a holder may take long: a
    /// writer waiting for room holds the sending side's).
    pub fn lock(&self) -> LockGuard<'_> {
        self.lock_as(me())
    }

    /// [`lock`](Self::lock) by process `mine` (a vfork child takes it as
    /// its parent, whose memory it runs on, without learning its own id
    /// into that memory's cache).
    pub fn lock_as(&self, mine: u32) -> LockGuard<'_> {
        let mine = mine & !CONTENDED;
        for _ in 0..16 {
            if let Some(guard) = self.try_lock_in(mine) {
                return guard;
            }
            std::thread::yield_now();
        }
        // From now on this thread takes it marked contended: another may
        // sleep for it too, and must be woken when it is let go.
        let claim = mine | CONTENDED;
        loop {
            let held = self.word.load(Ordering::Relaxed);
            if held == 0 || held & !CONTENDED != mine {
                // Free, or held by a thread of a parent: taken.
                if self.word.compare_exchange(held, claim, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                    return LockGuard(&self.word);
                }
                continue;
            }
            if held != claim && self.word.compare_exchange(held, claim, Ordering::Relaxed, Ordering::Relaxed).is_err() {
                continue;
            }
            // Woken when it is let go; the timeout is only a backstop.
            crate::sys::futex_wait(&self.word, claim, 100);
        }
    }
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        if self.0.swap(0, Ordering::Release) & CONTENDED != 0 {
            crate::sys::futex_wake(self.0, 1);
        }
    }
}

/// This process, as a [`Lock`]'s word names it.
fn me() -> u32 {
    crate::sys::getpid() as u32 & !CONTENDED
}

/// fork's prepare handler: closes the gate and waits until no other
/// thread holds one of these mutexes. A thread that forks while holding
/// one itself (a handler that forks) cannot wait for itself; the child
/// then finds that one held.
pub fn close_before_fork() {
    CLOSED.store(true, Ordering::SeqCst);
    let mine = u32::from(DEPTH.with(Cell::get) > 0);
    let mut backoff = Backoff::new();
    while INSIDE.load(Ordering::SeqCst) > mine {
        backoff.wait(std::time::Duration::MAX);
    }
}

/// fork's parent and child handlers.
pub fn open_after_fork() {
    CLOSED.store(false, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_lock_held_in_the_parent_is_taken_over_in_a_child_and_only_there() {
        let lock = Lock::new();
        let parent = me();
        let held = lock.try_lock_in(parent).expect("free");
        assert!(lock.try_lock_in(parent).is_none(), "held by this process");
        // In a child forked meanwhile, the parent's holder is not there.
        let child = parent + 1;
        let taken = lock.try_lock_in(child).expect("held by the parent's thread: taken over");
        assert!(lock.try_lock_in(child).is_none(), "held by the child now");
        drop(taken);
        assert!(lock.try_lock_in(child).is_some(), "free again");
        std::mem::forget(held);
    }

    #[test]
    fn a_thread_waiting_for_a_long_hold_sleeps_until_it_is_let_go() {
        let lock = Arc::new(Lock::new());
        let held = lock.lock();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let lock = lock.clone();
            std::thread::spawn(move || {
                let _mine = lock.lock();
                tx.send(()).unwrap();
            })
        };
        // Asleep on the word (marked contended), not taking it.
        let marked = || lock.word.load(Ordering::Relaxed) & CONTENDED != 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !marked() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(marked(), "the waiter marked the lock");
        assert!(rx.try_recv().is_err());
        drop(held);
        rx.recv_timeout(Duration::from_secs(5)).expect("woken when let go");
        waiter.join().unwrap();
        assert_eq!(lock.word.load(Ordering::Relaxed), 0, "let go again");
    }

    // One test: the gate is process-wide.
    #[test]
    fn a_closing_gate_waits_for_holders_and_keeps_new_ones_out_until_opened() {
        let _alone = crate::sys::no_fork_meanwhile();
        let lock = Arc::new(Mutex::new(0u32));
        // Nested locks on one thread pass the gate once.
        {
            let other = Mutex::new(());
            let _a = lock.lock();
            let _b = other.lock();
            assert_eq!(DEPTH.with(Cell::get), 2);
        }
        assert_eq!(DEPTH.with(Cell::get), 0);
        // A holder on another thread: closing waits for it to let go.
        let released = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let holder = {
            let (lock, released) = (lock.clone(), released.clone());
            std::thread::spawn(move || {
                let mut g = lock.lock();
                *g += 1;
                tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(50));
                released.store(true, Ordering::SeqCst);
                drop(g);
            })
        };
        rx.recv().unwrap();
        close_before_fork();
        assert!(released.load(Ordering::SeqCst), "waited for the holder");
        holder.join().unwrap();
        // Closed: a new holder waits until the gate opens.
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let lock = lock.clone();
            std::thread::spawn(move || {
                let mut g = lock.lock();
                *g += 1;
                tx.send(()).unwrap();
            })
        };
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err(), "kept out while closed");
        open_after_fork();
        rx.recv_timeout(Duration::from_secs(5)).expect("let in once open");
        waiter.join().unwrap();
        assert_eq!(*lock.lock(), 2);
        // The forking thread holding one itself does not wait for itself.
        let _mine = lock.lock();
        close_before_fork();
        open_after_fork();
    }
}
