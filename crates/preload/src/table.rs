//! The side table: which file descriptors the library manages, and how.
//!
//! Indexed by descriptor number in two levels (chunks of 1024 slots,
//! allocated on first use), each slot an `ArcSwapOption`: a lookup, which
//! every intercepted call makes, takes no lock and allocates nothing, and a
//! descriptor the library does not manage costs one atomic load.
//!
//! The table also knows every epoll set the program created, so that a
//! descriptor that becomes a vSocket (or is closed) is moved (or forgotten)
//! in each; the sets find their members through [`epoll::Member`].
//!
//! The table lives in the process's memory: a vfork child, which shares it
//! with its parent until it execs, changes nothing in it (see
//! `sys::memory_is_ours`); the descriptors it closes or duplicates are its
//! own.

use crate::conn::Connection;
pub use crate::conn::Dropped;
use crate::epoll::{self, Waitable};
use crate::forksafe;
use crate::listener::Listener;
use crate::sys;
use arc_swap::ArcSwapOption;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};

/// What the library knows about a managed descriptor.
pub enum Entry {
    /// A connection over vSocket.
    Conn(Connection),
    /// A listening socket that also accepts vSocket connections.
    Listener(Listener),
    /// A connect that policy drops: it never completes, as behind a
    /// firewall that silently drops SYNs.
    Dropped(Dropped),
    /// An epoll instance that may hold managed descriptors.
    Epoll(EpollSet),
}

/// An epoll set whose members are the table's entries.
pub type EpollSet = epoll::EpollSet<Entry>;

impl epoll::Member for Entry {
    fn lookup(fd: RawFd) -> Option<Arc<Entry>> {
        get(fd)
    }

    fn waitable(&self) -> Waitable<'_, Entry> {
        match self {
            Entry::Conn(conn) => Waitable::Conn(conn),
            Entry::Dropped(dropped) => Waitable::Dropped(dropped),
            Entry::Listener(listener) => Waitable::Listener(listener),
            Entry::Epoll(set) => Waitable::Set(set),
        }
    }
}

const CHUNK: usize = 1024;
const CHUNKS: usize = 1024;

struct Table {
    chunks: [OnceLock<Box<[ArcSwapOption<Entry>]>>; CHUNKS],
}

static TABLE: Table = Table { chunks: [const { OnceLock::new() }; CHUNKS] };

fn slot(fd: RawFd, create: bool) -> Option<&'static ArcSwapOption<Entry>> {
    let fd = usize::try_from(fd).ok()?;
    let chunk = TABLE.chunks.get(fd / CHUNK)?;
    let slots = if create {
        chunk.get_or_init(|| (0..CHUNK).map(|_| ArcSwapOption::empty()).collect())
    } else {
        chunk.get()?
    };
    Some(&slots[fd % CHUNK])
}

/// The entry for `fd`, if the library manages it.
pub fn get(fd: RawFd) -> Option<Arc<Entry>> {
    slot(fd, false)?.load_full()
}

/// Records `entry` for `fd`; returns what was there.
pub fn set(fd: RawFd, entry: Arc<Entry>) -> Option<Arc<Entry>> {
    match slot(fd, true) {
        Some(s) => s.swap(Some(entry)),
        // Beyond the table (fd >= 1M): leave it to the kernel.
        None => None,
    }
}

/// Forgets `fd`; returns what was there.
pub fn remove(fd: RawFd) -> Option<Arc<Entry>> {
    slot(fd, false)?.swap(None)
}

/// Calls `f` for every managed entry.
pub fn for_each(mut f: impl FnMut(&Entry)) {
    managed_in(0, RawFd::MAX, |_, entry| f(entry));
}

/// Calls `f` with every managed descriptor in `first..=last` and its entry.
pub fn managed_in(first: RawFd, last: RawFd, mut f: impl FnMut(RawFd, &Entry)) {
    for (c, chunk) in TABLE.chunks.iter().enumerate() {
        let base = (c * CHUNK) as RawFd;
        if base > last || base.saturating_add(CHUNK as RawFd) <= first {
            continue;
        }
        if let Some(slots) = chunk.get() {
            for (i, slot) in slots.iter().enumerate() {
                let fd = base + i as RawFd;
                if (first..=last).contains(&fd) {
                    if let Some(entry) = slot.load_full() {
                        f(fd, &entry);
                    }
                }
            }
        }
    }
}

static SETS: forksafe::Mutex<Vec<Weak<Entry>>> = forksafe::Mutex::new(Vec::new());
/// Whether the program ever made an epoll set (the sets need telling of
/// every close only then).
static SETS_MADE: AtomicBool = AtomicBool::new(false);

/// Starts tracking a new epoll instance.
pub fn track_epoll(epfd: RawFd) {
    let entry = Arc::new(Entry::Epoll(EpollSet::new(epfd)));
    let weak = Arc::downgrade(&entry);
    set(epfd, entry);
    SETS_MADE.store(true, Ordering::Relaxed);
    let mut sets = SETS.lock();
    sets.retain(|w| w.strong_count() > 0);
    sets.push(weak);
}

/// How many epoll sets `each_set` takes without allocating: programs
/// rarely have more, and a close runs it whenever any set exists.
const FEW_SETS: usize = 8;

/// Calls `f` on every live epoll set, outside the list's lock (`f` takes
/// the set's own lock).
fn each_set(mut f: impl FnMut(&EpollSet)) {
    let mut few: [Option<Arc<Entry>>; FEW_SETS] = Default::default();
    let mut many = Vec::new();
    {
        let sets = SETS.lock();
        let live = sets.iter().filter_map(Weak::upgrade);
        if sets.len() <= FEW_SETS {
            for (slot, set) in few.iter_mut().zip(live) {
                *slot = Some(set);
            }
        } else {
            many.extend(live);
        }
    }
    for s in few.iter().flatten().chain(&many) {
        if let Entry::Epoll(set) = &**s {
            f(set);
        }
    }
}

/// Manages `fd` as `entry` from now on (connect, listen), moving its
/// registrations in every epoll set.
pub fn adopt(fd: RawFd, entry: Entry) {
    let entry = Arc::new(entry);
    set(fd, entry.clone());
    each_set(|s| s.adopt(fd, &entry));
}

/// `fd` is being closed or replaced: forget it everywhere. A connection
/// closes when its last reference goes (Connection's Drop): other
/// descriptors (dup) and calls in progress in other threads hold it open,
/// as their files hold a kernel socket open.
pub fn release(fd: RawFd) {
    // Nothing to forget (the common close): no system call, no lock. Else
    // the memory must be ours (not a vfork child's), a system call that
    // only closes that change something pay.
    if get(fd).is_none() && !SETS_MADE.load(Ordering::Relaxed) {
        return;
    }
    if sys::memory_is_ours() {
        forget(fd);
    }
}

/// Every managed descriptor in `first..=last` is being closed.
pub fn release_range(first: RawFd, last: RawFd) {
    if !sys::memory_is_ours() {
        return;
    }
    let mut managed = Vec::new();
    managed_in(first, last, |fd, _| managed.push(fd));
    for fd in managed {
        forget(fd);
    }
}

/// Forgets `fd` in every epoll set, then in the table.
fn forget(fd: RawFd) {
    // The epoll registrations first, while the entry still tells which
    // doorbell belongs to the descriptor.
    each_set(|s| s.forget(fd));
    drop(remove(fd));
}

/// Calls `f` with each of the library's own descriptors that the table's
/// entries hold (connections' doorbells and lifelines;
/// listeners' channels). Takes no lock and allocates nothing.
pub fn internal_fds(mut f: impl FnMut(RawFd)) {
    managed_in(0, RawFd::MAX, |_, entry| match entry {
        Entry::Conn(conn) => conn.internal().open_fds().for_each(&mut f),
        Entry::Listener(listener) => listener.internal_fds(&mut f),
        Entry::Dropped(_) | Entry::Epoll(_) => {}
    });
}

/// The ranges of `first..=last` left once the descriptors in `spared`
/// (sorted) are taken out of it.
pub fn ranges_around(first: u32, last: u32, spared: &[u32]) -> impl Iterator<Item = (u32, u32)> + '_ {
    let mut next = Some(first);
    let mut spared = spared.iter().copied().filter(move |&fd| (first..=last).contains(&fd));
    std::iter::from_fn(move || loop {
        let from = next?;
        match spared.next() {
            Some(fd) if fd == from => next = fd.checked_add(1).filter(|&n| n <= last),
            Some(fd) if fd < from => continue,
            Some(fd) => {
                next = fd.checked_add(1).filter(|&n| n <= last);
                return Some((from, fd - 1));
            }
            None => {
                next = None;
                return Some((from, last));
            }
        }
    })
}

/// `newfd` now names what `oldfd` names (dup and its kin).
pub fn share(oldfd: RawFd, newfd: RawFd) {
    if let Some(entry) = get(oldfd).filter(|_| sys::memory_is_ours()) {
        if !matches!(*entry, Entry::Epoll(_)) {
            set(newfd, entry);
        }
    }
}

impl Entry {
    /// What poll, select and epoll see of it.
    pub fn waitable(&self) -> Waitable<'_, Entry> {
        epoll::Member::waitable(self)
    }

    /// The connection, if the entry is one.
    pub fn connection(&self) -> Option<&Connection> {
        match self {
            Entry::Conn(c) => Some(c),
            _ => None,
        }
    }

    /// Reads and clears SO_ERROR: a dropped connect fails with ETIMEDOUT
    /// at its deadline.
    pub fn take_error(&self) -> i32 {
        match self {
            Entry::Conn(c) => c.take_error(),
            Entry::Dropped(d) if crate::sys::now_ms() >= d.deadline_ms => libc::ETIMEDOUT,
            _ => 0,
        }
    }

    /// Is it a connection, or a connect that policy dropped (which answers
    /// the calls of a connecting socket)?
    pub fn is_connection(&self) -> bool {
        matches!(self, Entry::Conn(_) | Entry::Dropped(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::Dropped;

    fn entry(tag: i64) -> Arc<Entry> {
        Arc::new(Entry::Dropped(Dropped { deadline_ms: tag }))
    }

    fn tag(e: Option<Arc<Entry>>) -> Option<i64> {
        e.map(|e| match &*e {
            Entry::Dropped(d) => d.deadline_ms,
            _ => -1,
        })
    }

    #[test]
    fn a_dropped_connect_fails_at_its_deadline_and_not_before() {
        use crate::readiness::Readiness;
        let failed = Entry::Dropped(Dropped { deadline_ms: 0 });
        assert_eq!(failed.waitable().poll_bits(), Some(Readiness::OUT | Readiness::ERR | Readiness::HUP));
        assert_eq!(failed.take_error(), libc::ETIMEDOUT);
        assert!(failed.is_connection() && failed.connection().is_none());
        let pending = Entry::Dropped(Dropped { deadline_ms: i64::MAX });
        assert_eq!(pending.waitable().poll_bits(), Some(Readiness::EMPTY));
        assert_eq!(pending.take_error(), 0);
    }

    #[test]
    fn descriptors_far_above_65535_are_managed() {
        // What `calls:high_fd_*` checks end to end where RLIMIT_NOFILE can
        // be raised: every descriptor number the kernel can hand out
        // (fs.nr_open is at most 2^20 by default) has a slot.
        for fd in [65_535, 65_536, 70_000, 150_000, (CHUNK * CHUNKS - 1) as RawFd] {
            assert!(tag(set(fd, entry(fd as i64))).is_none());
            assert_eq!(tag(get(fd)), Some(fd as i64));
            let mut seen = Vec::new();
            managed_in(fd - 1, fd + 1, |f, _| seen.push(f));
            assert_eq!(seen, vec![fd]);
            assert_eq!(tag(remove(fd)), Some(fd as i64));
            assert!(get(fd).is_none());
        }
        assert!(get((CHUNK * CHUNKS) as RawFd).is_none());
        assert!(get(-1).is_none());
    }

    fn around(first: u32, last: u32, spared: &[u32]) -> Vec<(u32, u32)> {
        ranges_around(first, last, spared).collect()
    }

    #[test]
    fn ranges_around_the_spared_descriptors() {
        assert_eq!(around(3, 100, &[]), vec![(3, 100)]);
        assert_eq!(around(3, 100, &[50]), vec![(3, 49), (51, 100)]);
        assert_eq!(around(3, 100, &[3, 4, 100]), vec![(5, 99)]);
        assert_eq!(around(3, 100, &[1, 2, 60, 61, 200]), vec![(3, 59), (62, 100)]);
        assert_eq!(around(3, 3, &[3]), vec![]);
        assert_eq!(around(0, u32::MAX, &[u32::MAX]), vec![(0, u32::MAX - 1)]);
        assert_eq!(around(0, u32::MAX, &[0, 1024]), vec![(1, 1023), (1025, u32::MAX)]);
        assert_eq!(around(10, 20, &[5, 10, 10, 15, 15]), vec![(11, 14), (16, 20)]);
    }
}
