//! poll, ppoll, select and pselect over a mix of kernel and vSocket
//! descriptors.
//!
//! A call that names no managed descriptor goes straight to the kernel.
//! Otherwise the managed ones are judged from shared memory and, when
//! nothing is ready yet, replaced in a kernel `ppoll` by their doorbells
//! (connections) or by their socket plus listener channel (listeners), so
//! the thread sleeps in one real system call that signals interrupt.

use crate::conn::MAX_SLEEP_MS;
use crate::epoll::Waitable;
use crate::listener;
use crate::readiness::{Interest, Readiness};
use crate::signals;
use crate::sys::{self, Errno, SysResult};
use crate::table::{self, Entry};
use std::sync::Arc;
use vsocket_ring::spin::Spinner;

const POLL_IN: i16 = libc::POLLIN | libc::POLLRDNORM;
const POLL_OUT: i16 = libc::POLLOUT | libc::POLLWRNORM;

/// Epoll-style readiness to poll(2) bits, filtered by what was asked
/// (errors and hang-ups are always reported).
fn to_revents(mask: Readiness, events: i16) -> i16 {
    let mut r = 0i16;
    if mask.intersects(Readiness::IN) {
        r |= POLL_IN;
    }
    if mask.intersects(Readiness::OUT) {
        r |= POLL_OUT;
    }
    if mask.intersects(Readiness::RDHUP) {
        r |= libc::POLLRDHUP;
    }
    r &= events;
    if mask.intersects(Readiness::ERR) {
        r |= libc::POLLERR;
    }
    if mask.intersects(Readiness::HUP) {
        r |= libc::POLLHUP;
    }
    r
}

fn interest(events: i16) -> Interest {
    let mut m = Interest::default();
    if events & POLL_IN != 0 {
        m |= Interest::READABLE;
    }
    if events & POLL_OUT != 0 {
        m |= Interest::WRITABLE;
    }
    if events & libc::POLLRDHUP != 0 {
        m |= Interest::RDHUP;
    }
    m
}

/// Which program entry each kernel pollfd stands for.
#[derive(Clone, Copy)]
enum Slot {
    Plain(usize),
    Doorbell(usize),
    Listener(usize),
}

/// How long poll and select spin before sleeping (one for the process:
/// programs that use them for their hot path are rare).
static POLL_SPINNER: Spinner = Spinner::new();

/// poll/ppoll. `fds` is the program's array.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32, sigmask: *const libc::sigset_t) -> SysResult<usize> {
    let entries: Vec<Option<Arc<Entry>>> =
        fds.iter().map(|p| table::get(p.fd).filter(|e| !matches!(e.waitable(), Waitable::Set(_)))).collect();
    if entries.iter().all(Option::is_none) {
        return sys::ppoll(fds, timeout_ms, sigmask);
    }
    let deadline = (timeout_ms >= 0).then(|| sys::now_ms() + timeout_ms as i64);
    let managed_ready = |fds: &mut [libc::pollfd]| -> usize {
        let mut count = 0;
        for (p, e) in fds.iter_mut().zip(&entries) {
            if let Some(bits) = e.as_deref().and_then(|e| e.waitable().poll_bits()) {
                p.revents = to_revents(bits, p.events);
                count += (p.revents != 0) as usize;
            }
        }
        count
    };
    let (mut kernel, mut slots) = kernel_fds(fds, &entries);
    signals::wait_begins();
    let mut spun = false;
    let mut _sleeping = None;
    loop {
        if listener::any_detached() && reattach(&entries) {
            // A listener has a channel again: watch it too.
            (kernel, slots) = kernel_fds(fds, &entries);
        }
        let ready_now = managed_ready(fds) > 0;
        let mut sleep = 0;
        // The connections this call counts itself asleep on (see
        // `Connection::fall_asleep`), by index into `fds`.
        let mut asleep: Vec<usize> = Vec::new();
        if !ready_now {
            if !spun && timeout_ms != 0 {
                spun = true;
                _sleeping = POLL_SPINNER.spin(|| {
                    entries.iter().zip(fds.iter()).any(|(e, p)| {
                        e.as_deref()
                            .and_then(|e| e.waitable().poll_bits())
                            .is_some_and(|b| to_revents(b, p.events) != 0)
                    })
                });
                if _sleeping.is_none() {
                    continue;
                }
            }
            for (i, (p, e)) in fds.iter().zip(&entries).enumerate() {
                match e.as_deref().map(Entry::waitable) {
                    Some(Waitable::Conn(c)) => {
                        c.fall_asleep(interest(p.events));
                        asleep.push(i);
                    }
                    Some(w) => w.arm_for(interest(p.events)),
                    None => {}
                }
            }
            if managed_ready(fds) == 0 {
                sleep = match deadline {
                    None => MAX_SLEEP_MS,
                    Some(d) => (d - sys::now_ms()).clamp(0, MAX_SLEEP_MS as i64) as i32,
                };
            }
        }
        for k in kernel.iter_mut() {
            k.revents = 0;
        }
        // A handler that ran since the call began (in the spin, or between
        // two sleeps, where the kernel's poll would have been asleep) ends
        // it with EINTR, once the kernel descriptors are seen not ready.
        let interrupted = sleep > 0 && signals::handler_ran();
        let r =
            if sleep == 0 || interrupted { sys::poll(&mut kernel, 0) } else { sys::ppoll(&mut kernel, sleep, sigmask) };
        // Each connection slept on has one doorbell slot: it wakes there.
        for (k, slot) in kernel.iter().zip(&slots) {
            if let Slot::Doorbell(i) = *slot {
                if asleep.binary_search(&i).is_ok() {
                    if let Some(Waitable::Conn(c)) = entries[i].as_deref().map(Entry::waitable) {
                        c.wake(interest(fds[i].events), k.revents != 0);
                    }
                }
            }
        }
        match r {
            Ok(_) => {}
            Err(Errno(libc::EINTR)) if sleep == 0 => {}
            Err(e) => return Err(e),
        }
        for p in fds.iter_mut() {
            p.revents = 0;
        }
        for (k, slot) in kernel.iter().zip(&slots) {
            match *slot {
                Slot::Plain(i) => fds[i].revents = k.revents,
                Slot::Doorbell(i) => {
                    // (A doorbell this call slept on was handled by `wake`.)
                    if k.revents != 0 && asleep.binary_search(&i).is_err() {
                        if let Some(Waitable::Conn(c)) = entries[i].as_deref().map(Entry::waitable) {
                            c.drain_unless_watched();
                        }
                    }
                }
                Slot::Listener(i) => {
                    if k.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0 {
                        let r = if k.fd == fds[i].fd { k.revents } else { libc::POLLIN };
                        fds[i].revents |= r & (fds[i].events | libc::POLLERR | libc::POLLHUP);
                    }
                }
            }
        }
        managed_ready(fds);
        let count = fds.iter().filter(|p| p.revents != 0).count();
        if count > 0 || deadline.is_some_and(|d| sys::now_ms() >= d) || timeout_ms == 0 {
            return Ok(count);
        }
        if interrupted {
            return Err(Errno(libc::EINTR));
        }
    }
}

/// The kernel's pollfd array for `fds`: kernel descriptors as they are,
/// each connection's doorbell, each listener's socket and channel; and
/// which of the program's entries each stands for.
fn kernel_fds(fds: &[libc::pollfd], entries: &[Option<Arc<Entry>>]) -> (Vec<libc::pollfd>, Vec<Slot>) {
    let mut kernel: Vec<libc::pollfd> = Vec::with_capacity(fds.len() + 2);
    let mut slots: Vec<Slot> = Vec::with_capacity(fds.len() + 2);
    for (i, (p, e)) in fds.iter().zip(entries).enumerate() {
        match e.as_deref().map(Entry::waitable) {
            None => {
                kernel.push(*p);
                slots.push(Slot::Plain(i));
            }
            Some(Waitable::Conn(c)) => {
                kernel.push(libc::pollfd { fd: c.doorbell, events: libc::POLLIN, revents: 0 });
                slots.push(Slot::Doorbell(i));
            }
            Some(Waitable::Listener(l)) => {
                kernel.push(libc::pollfd { fd: p.fd, events: p.events, revents: 0 });
                slots.push(Slot::Listener(i));
                if let Some(channel) = l.channel_fd() {
                    kernel.push(libc::pollfd { fd: channel, events: libc::POLLIN, revents: 0 });
                    slots.push(Slot::Listener(i));
                }
            }
            Some(_) => {}
        }
    }
    (kernel, slots)
}

/// Tries to attach the detached listeners among `entries` again (when a
/// try is due); whether any now has a channel.
fn reattach(entries: &[Option<Arc<Entry>>]) -> bool {
    let mut any = false;
    for e in entries.iter().flatten() {
        if let Waitable::Listener(l) = e.waitable() {
            if !l.attached() && l.reattach_if_due() {
                any = true;
            }
        }
    }
    any
}

/// select/pselect: the three sets become a pollfd array and back.
///
/// # Safety contract (upheld by the hook)
/// The sets, when present, hold at least `nfds` bits.
pub fn select(
    nfds: i32,
    mut sets: [Option<&mut libc::fd_set>; 3],
    timeout_ms: i32,
    sigmask: *const libc::sigset_t,
) -> SysResult<usize> {
    let nfds = nfds.clamp(0, libc::FD_SETSIZE as i32);
    let mut pfds = Vec::new();
    for fd in 0..nfds {
        let mut events = 0i16;
        for (k, bits) in [POLL_IN, POLL_OUT, libc::POLLPRI].into_iter().enumerate() {
            if sets[k].as_deref().is_some_and(|s| fd_isset(fd, s)) {
                events |= bits;
            }
        }
        if events != 0 {
            pfds.push(libc::pollfd { fd, events, revents: 0 });
        }
    }
    poll(&mut pfds, timeout_ms, sigmask)?;
    let mut count = 0;
    for s in sets.iter_mut().flatten() {
        fd_zero(s);
    }
    for p in &pfds {
        if p.revents & libc::POLLNVAL != 0 {
            return Err(Errno(libc::EBADF));
        }
        let hits = [
            p.revents & (POLL_IN | libc::POLLHUP | libc::POLLERR) != 0 && p.events & POLL_IN != 0,
            p.revents & (POLL_OUT | libc::POLLERR) != 0 && p.events & POLL_OUT != 0,
            p.revents & libc::POLLPRI != 0 && p.events & libc::POLLPRI != 0,
        ];
        for (k, hit) in hits.into_iter().enumerate() {
            if hit {
                if let Some(s) = sets[k].as_deref_mut() {
                    fd_set(p.fd, s);
                    count += 1;
                }
            }
        }
    }
    Ok(count)
}

/// Does any of the first `nfds` bits of the sets name a managed descriptor?
pub fn select_touches_managed(nfds: i32, sets: &[Option<&mut libc::fd_set>; 3]) -> bool {
    (0..nfds.clamp(0, libc::FD_SETSIZE as i32)).any(|fd| {
        sets.iter().flatten().any(|s| fd_isset(fd, s))
            && table::get(fd).is_some_and(|e| !matches!(e.waitable(), Waitable::Set(_)))
    })
}

use crate::sys::{fd_set_words as words, fd_set_words_mut as words_mut, FD_WORD_BITS as WORD_BITS};

fn fd_isset(fd: i32, set: &libc::fd_set) -> bool {
    let fd = fd as usize;
    words(set)[fd / WORD_BITS] & (1 << (fd % WORD_BITS)) != 0
}

fn fd_set(fd: i32, set: &mut libc::fd_set) {
    let fd = fd as usize;
    words_mut(set)[fd / WORD_BITS] |= 1 << (fd % WORD_BITS);
}

fn fd_zero(set: &mut libc::fd_set) {
    words_mut(set).fill(0);
}
