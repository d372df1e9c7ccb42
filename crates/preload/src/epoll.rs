//! epoll over a mix of kernel and vSocket descriptors.
//!
//! The program's epoll instance stays a real kernel epoll fd: kernel
//! descriptors are registered in it as the program asked (with the
//! program's own data), so they cost nothing extra. A vSocket connection is
//! represented in the kernel set by its doorbell, tagged with a token the
//! library recognises; its readiness is computed from shared memory, where
//! level- and edge-triggered modes, EPOLLONESHOT and EPOLLRDHUP are
//! implemented. A listener is represented by its kernel socket and its
//! listener channel, both tagged.
//!
//! Every set the program creates is tracked, with what it holds, so that a
//! socket registered before it connects (or listens) is moved to the right
//! representation when it becomes a vSocket.
//!
//! **Hot and cold.** A wait judges only the set's *hot* registrations
//! (their readiness read from shared memory), so that idle connections
//! cost it nothing, however many the set holds. A connection judged not
//! ready for [`COLD_AFTER_NS`] goes *cold*: the set arms it (counted as
//! one of its sleepers, as a waiter about to sleep would, see
//! `Connection::fall_asleep`) and stops judging it; the peer's next write
//! (or read that frees room) then rings its doorbell, which is in the
//! kernel set, and the event makes it hot again. A busy connection stays
//! hot and is found by looking, without a doorbell; an idle one costs
//! nothing until it has something to say. A wait follows the list of hot
//! registrations when few are hot, and goes through all of them otherwise.
//! Everything cold is judged again every [`SWEEP_NS`] all the same, which
//! bounds what a wake-up lost elsewhere (a doorbell drained by another
//! waiter, a readiness this process made itself, like `shutdown(SHUT_RD)`)
//! can delay, as the sleep cap bounds it for a waiter. Only the process
//! that created the set cools connections; one that inherited it over fork
//! judges everything, as the set's registrations there are its creator's
//! too.

use crate::conn::{Connection, Dropped, EdgeSnapshot, MAX_SLEEP_MS};
use crate::fdhash::FdMap;
use crate::forksafe;
use crate::listener::{self, Listener};
use crate::readiness::{Interest, Readiness};
use crate::signals;
use crate::sys::{self, Errno, SysResult};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use vsocket_ring::spin::Spinner;

/// The high bits of tokens: never a user-space pointer (non-canonical on
/// x86-64 and arm64), and salted per process.
fn token_tag() -> u64 {
    static TAG: OnceLock<u64> = OnceLock::new();
    *TAG.get_or_init(|| {
        let salt = (sys::now_ms() as u64 ^ (sys::getpid() as u64).rotate_left(7)) & 0xffff;
        (0xa5a5u64 << 48) | (salt << 32)
    })
}

fn token(fd: RawFd) -> u64 {
    token_tag() | fd as u32 as u64
}

fn token_fd(data: u64) -> Option<RawFd> {
    (data & 0xffff_ffff_0000_0000 == token_tag()).then_some(data as u32 as RawFd)
}

/// What an edge-triggered registration last reported from.
type Snapshot = EdgeSnapshot;

/// A dropped connect has one edge, its failure: a fixed snapshot, so that
/// an edge-triggered registration reports it once.
const DROPPED_EDGE: Snapshot = EdgeSnapshot { produced: 0, consumed: 0, readiness: Readiness::IN };

const IN: u32 = Readiness::IN.epoll();
const OUT: u32 = Readiness::OUT.epoll();
const ERR: u32 = Readiness::ERR.epoll();
const HUP: u32 = Readiness::HUP.epoll();

/// The seam between a set and the descriptors it holds: how a set finds
/// a managed descriptor by number, and what it needs to know of one. The
/// side table implements it; the set knows no table.
pub trait Member: Sized {
    /// The managed descriptor `fd`, if the library manages it.
    fn lookup(fd: RawFd) -> Option<Arc<Self>>;
    /// What can be waited for on it.
    fn waitable(&self) -> Waitable<'_, Self>;
}

/// A managed descriptor as poll, select and epoll see it.
pub enum Waitable<'a, M: Member> {
    /// A connection: readiness from shared memory, sleep on its doorbell.
    Conn(&'a Connection),
    /// A connect that policy drops: writable (and failed) at its deadline.
    Dropped(&'a Dropped),
    /// A listener: its kernel socket and its listener channel.
    Listener(&'a Listener),
    /// Another tracked epoll set.
    Set(&'a EpollSet<M>),
}

impl<M: Member> Waitable<'_, M> {
    /// The readiness poll(2) reports for it (`None`: it is judged by the
    /// kernel).
    pub fn poll_bits(&self) -> Option<Readiness> {
        match self {
            Waitable::Conn(conn) => Some(conn.readiness()),
            Waitable::Dropped(d) => Some(if sys::now_ms() >= d.deadline_ms {
                Readiness::OUT | Readiness::ERR | Readiness::HUP
            } else {
                Readiness::EMPTY
            }),
            _ => None,
        }
    }

    /// Arms a connection for `interest`.
    pub fn arm_for(&self, interest: Interest) {
        if let Waitable::Conn(conn) = self {
            conn.arm(interest);
        }
    }
}

enum Kind<M> {
    /// A kernel descriptor, registered in the kernel with the program's data.
    Kernel,
    /// A vSocket connection or a dropped connect, judged from shared memory.
    /// `cold`: armed by the set and not judged (see the module docs);
    /// `active_ns`: when it was last found ready, or became hot.
    Managed { entry: Arc<M>, last: Option<Snapshot>, cold: bool, active_ns: u64 },
    /// A listener: its socket and its channel are in the kernel set
    /// (`channel`: the channel descriptor registered, if any; it changes
    /// when the listener is detached and attached again).
    Listener { entry: Arc<M>, channel: Option<RawFd> },
    /// Another tracked epoll set: its kernel fd is in the kernel set (so its
    /// kernel descriptors and doorbells wake this one), and whether it has
    /// events is judged by asking it (see `EpollSet::has_events`).
    Nested { entry: Arc<M> },
}

struct Registration<M> {
    events: u32,
    data: u64,
    kind: Kind<M>,
    /// EPOLLONESHOT fired; silent until EPOLL_CTL_MOD.
    disabled: bool,
}

impl<M: Member> Registration<M> {
    /// A registration `collect` may judge: a managed one that is not cold,
    /// or a nested set, while not disabled.
    fn judged(&self) -> bool {
        !self.disabled && matches!(self.kind, Kind::Managed { cold: false, .. } | Kind::Nested { .. })
    }

    /// The entry of a managed registration (a connection or a dropped
    /// connect).
    fn managed(&self) -> Option<&Arc<M>> {
        match &self.kind {
            Kind::Managed { entry, .. } => Some(entry),
            _ => None,
        }
    }

    /// The connection of a managed registration (none for a dropped
    /// connect).
    fn conn(&self) -> Option<&Connection> {
        match self.managed()?.waitable() {
            Waitable::Conn(conn) => Some(conn),
            _ => None,
        }
    }

    /// Ends the set's arming of a cold connection: it is hot again (and
    /// must be listed by the caller). `inherited`: this process did not
    /// make the arming (its creator did, before a fork), so only the mark
    /// goes.
    fn warm(&mut self, now: u64, inherited: bool) {
        let Kind::Managed { entry, cold, active_ns, .. } = &mut self.kind else { return };
        if std::mem::take(cold) && !inherited {
            if let Waitable::Conn(conn) = entry.waitable() {
                conn.wake(Interest::from_epoll(self.events), false);
            }
        }
        *active_ns = now;
    }
}

/// Slots a set has before it lets free ones go (see [`Slots::compact`]).
const COMPACT_FROM: usize = 64;

/// Where [`Slots::compact`] says a free slot went.
const FREED: u32 = u32::MAX;

/// A set's registrations, each in a slot that stays where it is while the
/// registration lives (but for a compaction, see [`Slots::compact`]), found
/// by descriptor number through `index`. A wait
/// reaches the slots the hot list names directly: with thousands of idle
/// registrations beside a few busy ones, two hash lookups per busy one
/// and wait (each a miss in a large table) cost as much as judging them.
/// A freed slot is taken again first (event loops delete
/// and add a descriptor around every request).
struct Slots<M> {
    slots: Vec<Slot<M>>,
    index: FdMap<u32>,
    free: Vec<u32>,
}

struct Slot<M> {
    fd: RawFd,
    reg: Option<Registration<M>>,
    /// The slot is in the hot list (see [`Regs`]); kept while the slot is
    /// free, so that a registration taking it again is listed once.
    listed: bool,
}

impl<M> Slots<M> {
    fn new() -> Slots<M> {
        Slots { slots: Vec::new(), index: FdMap::default(), free: Vec::new() }
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    fn contains_key(&self, fd: &RawFd) -> bool {
        self.index.contains_key(fd)
    }

    /// The slot of `fd`'s registration.
    fn slot_of(&self, fd: RawFd) -> Option<u32> {
        self.index.get(&fd).copied()
    }

    fn get_mut(&mut self, fd: &RawFd) -> Option<&mut Registration<M>> {
        self.at_mut(self.slot_of(*fd)?)
    }

    /// The registration in slot `slot`, if one is.
    fn at(&self, slot: u32) -> Option<&Registration<M>> {
        self.held(slot).map(|(_, reg)| reg)
    }

    /// The registration in slot `slot` and its descriptor, if one is.
    fn held(&self, slot: u32) -> Option<(RawFd, &Registration<M>)> {
        let at = self.slots.get(slot as usize)?;
        Some((at.fd, at.reg.as_ref()?))
    }

    fn at_mut(&mut self, slot: u32) -> Option<&mut Registration<M>> {
        self.slots.get_mut(slot as usize)?.reg.as_mut()
    }

    /// Registers `fd`; one already registered has its registration
    /// replaced in its slot (`EPOLL_CTL_ADD` checks for it first).
    fn insert(&mut self, fd: RawFd, reg: Registration<M>) {
        if let Some(slot) = self.slot_of(fd) {
            self.slots[slot as usize].reg = Some(reg);
            return;
        }
        let slot = match self.free.pop() {
            Some(slot) => {
                let taken = &mut self.slots[slot as usize];
                (taken.fd, taken.reg) = (fd, Some(reg));
                slot
            }
            None => {
                self.slots.push(Slot { fd, reg: Some(reg), listed: false });
                u32::try_from(self.slots.len() - 1).expect("fewer registrations than descriptors")
            }
        };
        self.index.insert(fd, slot);
    }

    fn remove(&mut self, fd: &RawFd) -> Option<Registration<M>> {
        let slot = self.index.remove(fd)?;
        self.free.push(slot);
        self.slots[slot as usize].reg.take()
    }

    /// Slots a wait that goes through all of them goes through.
    fn spread(&self) -> usize {
        self.slots.len()
    }

    /// Once more than three quarters of the slots (and at least
    /// [`COMPACT_FROM`]) are free, moves the registrations into the first
    /// slots in their order and lets the rest go, and returns where each
    /// old slot went ([`FREED`] for a free one; every slot is left
    /// unlisted for the caller to list again): a wait that goes through
    /// every slot (most registrations hot) and the sweep of cold ones
    /// cost what the set holds now, not the most it ever held (a server
    /// that once held 7000 connections and now serves 50 went through 7000
    /// slots at every wait). Each compaction is paid for by the removals
    /// before it.
    fn compact(&mut self) -> Option<Vec<u32>> {
        let spread = self.slots.len();
        if spread < COMPACT_FROM || self.free.len() * 4 <= spread * 3 {
            return None;
        }
        let mut moved = vec![FREED; spread];
        let mut slots = Vec::with_capacity(self.index.len());
        for (at, slot) in std::mem::take(&mut self.slots).into_iter().enumerate() {
            if slot.reg.is_some() {
                moved[at] = u32::try_from(slots.len()).expect("fewer registrations than descriptors");
                slots.push(Slot { listed: false, ..slot });
            }
        }
        for slot in self.index.values_mut() {
            *slot = moved[*slot as usize];
        }
        self.free.clear();
        self.slots = slots;
        Some(moved)
    }

    fn iter(&self) -> impl Iterator<Item = (&RawFd, &Registration<M>)> {
        self.slots.iter().filter_map(|s| Some((&s.fd, s.reg.as_ref()?)))
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (&RawFd, &mut Registration<M>)> {
        self.slots.iter_mut().filter_map(|s| Some((&s.fd, s.reg.as_mut()?)))
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut Registration<M>> {
        self.slots.iter_mut().filter_map(|s| s.reg.as_mut())
    }
}

/// A set's registrations, and which of them a wait judges.
struct Regs<M> {
    map: Slots<M>,
    /// The slots whose registrations waits judge (see
    /// [`Registration::judged`]), each once (its `listed` says so). A slot
    /// stays listed when its registration goes (event loops delete and add
    /// a descriptor around every request, and the descriptor takes its
    /// slot again): it is dropped at the next `prune` unless taken again,
    /// and then it is listed once.
    hot: Vec<u32>,
    /// When every cold connection was last judged (see `EpollSet::sweep`).
    swept_ns: u64,
    /// Which doorbell each parked one is (see `unregister_special`), by
    /// the descriptor it was registered for: registering that descriptor
    /// again for the same connection finds it in the kernel set already,
    /// without asking the kernel.
    parked: FdMap<RawFd>,
}

impl<M: Member> Regs<M> {
    /// Lists `fd` among the hot, if a wait should judge it.
    fn list(&mut self, fd: RawFd) {
        let Some(slot) = self.map.slot_of(fd) else { return };
        let at = &mut self.map.slots[slot as usize];
        if at.reg.as_ref().is_some_and(Registration::judged) && !at.listed {
            at.listed = true;
            self.hot.push(slot);
        }
    }

    /// Takes `fd`'s registration out; once most slots are free, the
    /// registrations move into the first ones (see [`Slots::compact`]) and
    /// the hot list follows them, its freed slots dropped as a prune drops
    /// them.
    fn remove(&mut self, fd: &RawFd) -> Option<Registration<M>> {
        let removed = self.map.remove(fd)?;
        if let Some(moved) = self.map.compact() {
            let slots = &mut self.map.slots;
            self.hot.retain_mut(|slot| match moved[*slot as usize] {
                FREED => false,
                to => {
                    *slot = to;
                    slots[to as usize].listed = true;
                    true
                }
            });
        }
        Some(removed)
    }

    /// Drops from `hot` what is no longer judged.
    fn prune(&mut self) {
        let slots = &mut self.map.slots;
        self.hot.retain(|&slot| {
            let at = &mut slots[slot as usize];
            let keep = at.reg.as_ref().is_some_and(Registration::judged);
            at.listed = keep;
            keep
        });
    }
}

pub struct EpollSet<M: Member> {
    epfd: RawFd,
    regs: forksafe::Mutex<Regs<M>>,
    /// Registrations that are not plain kernel ones (fast path when 0).
    special: AtomicUsize,
    /// When the kernel set was last polled while vSocket events were ready.
    kernel_checked: AtomicU64,
    /// Doorbells left in the kernel set after their registration went (see
    /// `unregister_special`): while there are any, kernel events must be
    /// translated, so the pass-through fast path is off.
    parked: AtomicUsize,
    /// Where the next scan of managed registrations starts.
    rotor: AtomicUsize,
    /// The process that created the set (see `forget`).
    owner: i32,
    /// How long waits on the set spin before sleeping.
    spinner: Spinner,
    /// `listener::channels_changed()` when the set last brought its
    /// listeners' channel registrations up to date.
    listeners_seen: AtomicU64,
}

/// See `EpollSet::add_kernel_ready`.
const KERNEL_CHECK_NS: u64 = 50_000;

/// A connection judged not ready for this long goes cold (see the module
/// docs). A doorbell and its draining cost more than looking at a
/// connection on each wait for a while: a connection that speaks every
/// few milliseconds (a client among thousands) must stay hot; one that
/// says nothing for this long is idle.
pub const COLD_AFTER_NS: u64 = 50_000_000;

/// How many registrations a wait asks the shared lines of before it judges
/// them (see `EpollSet::each_prefetched`).
const PREFETCHED: usize = 8;

/// How often cold connections are all judged again (see the module docs).
pub const SWEEP_NS: u64 = 200_000_000;

thread_local! {
    static KERNEL_EVENTS: std::cell::RefCell<Vec<libc::epoll_event>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl<M: Member> EpollSet<M> {
    /// Tracks the new epoll instance `epfd`.
    pub fn new(epfd: RawFd) -> EpollSet<M> {
        EpollSet {
            epfd,
            regs: forksafe::Mutex::new(Regs {
                map: Slots::new(),
                hot: Vec::new(),
                swept_ns: sys::now_ns(),
                parked: FdMap::default(),
            }),
            special: AtomicUsize::new(0),
            kernel_checked: AtomicU64::new(0),
            parked: AtomicUsize::new(0),
            rotor: AtomicUsize::new(0),
            owner: sys::getpid(),
            spinner: Spinner::new(),
            listeners_seen: AtomicU64::new(listener::channels_changed()),
        }
    }

    /// Brings the listener registrations up to date when a listener of
    /// the process changed channel or waits to attach again: a detached
    /// listener is attached again when a try is due, and a set that
    /// watches no channel (or an old one) of a listener watches its
    /// current one.
    fn sync_listeners(&self, regs: &mut Regs<M>) {
        let changed = listener::channels_changed();
        if !listener::any_detached() && self.listeners_seen.load(Ordering::Relaxed) == changed {
            return;
        }
        self.listeners_seen.store(changed, Ordering::Relaxed);
        for (&fd, reg) in regs.map.iter_mut() {
            let Kind::Listener { entry, channel } = &mut reg.kind else { continue };
            let Waitable::Listener(l) = entry.waitable() else { continue };
            l.reattach_if_due();
            let current = l.channel_fd();
            if current == *channel {
                continue;
            }
            if let Some(old) = channel.take() {
                let _ = sys::epoll_ctl(self.epfd, libc::EPOLL_CTL_DEL, old, 0, 0);
            }
            if let Some(new) = current {
                let ev = channel_events(kernel_events(reg.events));
                if sys::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, new, ev, token(fd)).is_ok() {
                    *channel = Some(new);
                }
            }
        }
    }

    /// `fd` became a vSocket (connect, listen): move its registration here.
    pub fn adopt(&self, fd: RawFd, entry: &Arc<M>) {
        let mut guard = self.regs.lock();
        let regs = &mut *guard;
        if let Some(reg) = regs.map.get_mut(&fd) {
            if matches!(reg.kind, Kind::Kernel) {
                let _ = sys::epoll_ctl(self.epfd, libc::EPOLL_CTL_DEL, fd, 0, 0);
                if let Ok(kind) = self.register_special(&mut regs.parked, fd, entry, reg.events) {
                    reg.kind = kind;
                    self.special.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        regs.list(fd);
    }

    /// `fd` was closed: forget it here.
    ///
    /// A set inherited over fork is the same kernel object as its creator's:
    /// closing a descriptor here must not delete the creator's registrations
    /// (the kernel keeps them while the creator holds the descriptor), so only
    /// the creating process edits the kernel set on close.
    pub fn forget(&self, fd: RawFd) {
        let mut regs = self.regs.lock();
        let removed = regs.remove(&fd);
        if self.inherited() {
            return;
        }
        if let Some(mut reg) = removed {
            reg.warm(0, false);
            self.unregister_special(&mut regs.parked, fd, &reg);
        }
        // A parked doorbell could not be found by its number once the
        // descriptor is gone: remove it now.
        self.remove_parked_doorbell(&mut regs.parked, fd);
    }
}

impl<M: Member> Drop for EpollSet<M> {
    /// The set's last descriptor is closed: the connections it armed as
    /// cold are no longer its to count among their sleepers (in the
    /// creating process; one that inherited the set never counted them).
    ///
    /// The kernel set may outlive it (a child's copy, a `dup` of its
    /// descriptor), with the doorbells registered in it, which no one here
    /// will delete any more: their connections do not keep them for the
    /// next connection in their pieces (see `Connection::close`).
    fn drop(&mut self) {
        if self.inherited() {
            return;
        }
        let regs = self.regs.get_mut();
        for reg in regs.map.values_mut() {
            reg.warm(0, false);
            if let Some(conn) = reg.conn() {
                conn.note_bell_in_inherited_set();
            }
        }
        for &fd in regs.parked.keys() {
            if let Some(entry) = M::lookup(fd) {
                if let Waitable::Conn(conn) = entry.waitable() {
                    conn.note_bell_in_inherited_set();
                }
            }
        }
    }
}

/// What a listener's kernel registrations ask for: the program's flags
/// (EPOLLONESHOT included, so a disabled listener does not keep waking the
/// set), without EPOLLEXCLUSIVE, which the kernel refuses on MOD.
fn kernel_events(events: u32) -> u32 {
    events & !(libc::EPOLLEXCLUSIVE as u32)
}

/// What a listener's channel registration asks for, given the socket's.
fn channel_events(ev: u32) -> u32 {
    libc::EPOLLIN as u32 | (ev & (libc::EPOLLET | libc::EPOLLONESHOT) as u32)
}

impl<M: Member> EpollSet<M> {
    fn register_special(
        &self,
        parked: &mut FdMap<RawFd>,
        fd: RawFd,
        entry: &Arc<M>,
        events: u32,
    ) -> SysResult<Kind<M>> {
        match entry.waitable() {
            Waitable::Conn(conn) => {
                // The doorbell may still be registered from an earlier
                // registration of this descriptor (see unregister_special):
                // event loops delete and add a descriptor around every
                // request, and the add then costs no system call.
                let known = if self.inherited() {
                    conn.note_bell_in_inherited_set();
                    None
                } else {
                    parked.remove(&fd)
                };
                if known == Some(conn.doorbell) {
                    self.parked.fetch_sub(1, Ordering::Relaxed);
                } else {
                    match sys::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, conn.doorbell, libc::EPOLLIN as u32, token(fd))
                    {
                        Ok(()) => {}
                        Err(Errno(libc::EEXIST)) => {
                            self.parked.fetch_sub(1, Ordering::Relaxed);
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(Kind::Managed { entry: entry.clone(), last: None, cold: false, active_ns: sys::now_ns() })
            }
            Waitable::Dropped(_) => {
                Ok(Kind::Managed { entry: entry.clone(), last: None, cold: false, active_ns: sys::now_ns() })
            }
            Waitable::Listener(l) => {
                let ev = kernel_events(events);
                sys::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, ev, token(fd))?;
                let channel = l.channel_fd();
                if let Some(channel) = channel {
                    if let Err(e) =
                        sys::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, channel, channel_events(ev), token(fd))
                    {
                        let _ = sys::epoll_ctl(self.epfd, libc::EPOLL_CTL_DEL, fd, 0, 0);
                        return Err(e);
                    }
                }
                Ok(Kind::Listener { entry: entry.clone(), channel })
            }
            Waitable::Set(_) => {
                // The kernel refuses loops (ELOOP), too deep nesting and a set
                // added to itself, exactly as it would without the library.
                sys::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, events, token(fd))?;
                Ok(Kind::Nested { entry: entry.clone() })
            }
        }
    }

    fn unregister_special(&self, parked: &mut FdMap<RawFd>, fd: RawFd, reg: &Registration<M>) {
        match &reg.kind {
            Kind::Kernel => return,
            // The doorbell stays in the kernel set: programs (ae, libuv)
            // delete and re-add a descriptor around every request, and two
            // epoll_ctl calls per request would cost more than the request.
            // An event for a doorbell nobody registered removes it then.
            Kind::Managed { entry, .. } => {
                if let Waitable::Conn(conn) = entry.waitable() {
                    self.parked.fetch_add(1, Ordering::Relaxed);
                    // A process that inherited the set does not know what its
                    // creator does with the kernel set: it always asks.
                    if !self.inherited() {
                        parked.insert(fd, conn.doorbell);
                    }
                }
            }
            Kind::Listener { channel, .. } => {
                let _ = sys::epoll_ctl(self.epfd, libc::EPOLL_CTL_DEL, fd, 0, 0);
                if let Some(channel) = *channel {
                    let _ = sys::epoll_ctl(self.epfd, libc::EPOLL_CTL_DEL, channel, 0, 0);
                }
            }
            Kind::Nested { .. } => {
                let _ = sys::epoll_ctl(self.epfd, libc::EPOLL_CTL_DEL, fd, 0, 0);
            }
        }
        self.special.fetch_sub(1, Ordering::Relaxed);
    }

    /// epoll_ctl on this set.
    pub fn ctl(&self, op: i32, fd: RawFd, event: Option<libc::epoll_event>) -> SysResult<()> {
        let (events, data) = event.map(|e| (e.events, e.u64)).unwrap_or((0, 0));
        // EPOLLEXCLUSIVE: only on ADD, with only the flags that make sense
        // for it, and a registration made with it cannot be modified.
        const EXCLUSIVE: u32 = libc::EPOLLEXCLUSIVE as u32;
        const EXCLUSIVE_OK: u32 = (libc::EPOLLIN
            | libc::EPOLLOUT
            | libc::EPOLLERR
            | libc::EPOLLHUP
            | libc::EPOLLWAKEUP
            | libc::EPOLLET
            | libc::EPOLLEXCLUSIVE) as u32;
        if events & EXCLUSIVE != 0
            && (op == libc::EPOLL_CTL_MOD || (op == libc::EPOLL_CTL_ADD && events & !EXCLUSIVE_OK != 0))
        {
            return Err(Errno(libc::EINVAL));
        }
        let mut guard = self.regs.lock();
        let regs = &mut *guard;
        match op {
            libc::EPOLL_CTL_ADD => {
                if regs.map.contains_key(&fd) {
                    return Err(Errno(libc::EEXIST));
                }
                // Only an ADD asks what `fd` is: a MOD or DEL finds its
                // registration, which knows.
                let target = M::lookup(fd).filter(|e| !matches!(e.waitable(), Waitable::Set(_)) || fd != self.epfd);
                let kind = match &target {
                    None => {
                        sys::epoll_ctl(self.epfd, op, fd, events, data)?;
                        Kind::Kernel
                    }
                    Some(entry) => {
                        let kind = self.register_special(&mut regs.parked, fd, entry, events)?;
                        self.special.fetch_add(1, Ordering::Relaxed);
                        kind
                    }
                };
                regs.map.insert(fd, Registration { events, data, kind, disabled: false });
                regs.list(fd);
                Ok(())
            }
            libc::EPOLL_CTL_MOD => {
                let Some(reg) = regs.map.get_mut(&fd) else {
                    // Not one we know (registered before tracking): let the kernel judge.
                    return sys::epoll_ctl(self.epfd, op, fd, events, data);
                };
                if reg.events & EXCLUSIVE != 0 && !matches!(reg.kind, Kind::Kernel) {
                    return Err(Errno(libc::EINVAL));
                }
                // A cold connection stays armed by the set, now for the new
                // interest (armed first, so that a waiter asleep on the set
                // meanwhile is still woken), and is judged below.
                let was_cold = matches!(reg.kind, Kind::Managed { cold: true, .. }) && !self.inherited();
                if was_cold {
                    if let Some(conn) = reg.conn() {
                        conn.fall_asleep(Interest::from_epoll(events));
                        conn.wake(Interest::from_epoll(reg.events), false);
                    }
                } else {
                    reg.warm(sys::now_ns(), self.inherited());
                }
                match &mut reg.kind {
                    Kind::Kernel => sys::epoll_ctl(self.epfd, op, fd, events, data)?,
                    Kind::Managed { last, .. } => *last = None,
                    Kind::Nested { .. } => sys::epoll_ctl(self.epfd, op, fd, events, token(fd))?,
                    Kind::Listener { channel, .. } => {
                        let ev = kernel_events(events);
                        sys::epoll_ctl(self.epfd, op, fd, ev, token(fd))?;
                        if let Some(channel) = *channel {
                            sys::epoll_ctl(self.epfd, op, channel, channel_events(ev), token(fd))?;
                        }
                    }
                }
                reg.events = events;
                reg.data = data;
                reg.disabled = false;
                if was_cold && Self::would_report(reg) {
                    reg.warm(sys::now_ns(), false);
                }
                regs.list(fd);
                Ok(())
            }
            libc::EPOLL_CTL_DEL => match regs.remove(&fd) {
                Some(mut reg) => {
                    reg.warm(0, self.inherited());
                    if matches!(reg.kind, Kind::Kernel) {
                        sys::epoll_ctl(self.epfd, op, fd, 0, 0)?;
                    } else {
                        self.unregister_special(&mut regs.parked, fd, &reg);
                    }
                    Ok(())
                }
                None => sys::epoll_ctl(self.epfd, op, fd, 0, 0),
            },
            _ => Err(Errno(libc::EINVAL)),
        }
    }

    /// What a managed registration would report now, and (edge-triggered
    /// only) the snapshot its next edge is measured against.
    fn judge(reg: &Registration<M>) -> (u32, Option<Snapshot>) {
        if let Kind::Nested { entry } = &reg.kind {
            let readable = match entry.waitable() {
                Waitable::Set(inner) => inner.has_events(),
                _ => false,
            };
            let mask = if readable { (libc::EPOLLIN | libc::EPOLLRDNORM) as u32 & reg.events } else { 0 };
            return (mask, None);
        }
        let Kind::Managed { entry, .. } = &reg.kind else {
            return (0, None);
        };
        let interest = reg.events | ERR | HUP;
        match entry.waitable() {
            Waitable::Conn(conn) if reg.events & libc::EPOLLET as u32 != 0 => {
                let snap = conn.edge_snapshot(Interest::from_epoll(reg.events));
                (snap.readiness.epoll() & interest, Some(snap))
            }
            Waitable::Conn(conn) => (conn.readiness_for(Interest::from_epoll(reg.events)).epoll() & interest, None),
            Waitable::Dropped(d) if sys::now_ms() >= d.deadline_ms => {
                ((OUT | ERR | HUP) & interest, Some(DROPPED_EDGE))
            }
            _ => (0, None),
        }
    }

    /// Does this process wait on a set it inherited over fork (see the
    /// module docs)?
    fn inherited(&self) -> bool {
        self.owner != sys::getpid()
    }

    /// What registration `reg` owes the program now, if anything: its
    /// mask, with its edge taken (edge-triggered) and EPOLLONESHOT
    /// applied.
    fn owed(reg: &mut Registration<M>) -> Option<u32> {
        if reg.disabled || matches!(reg.kind, Kind::Kernel | Kind::Listener { .. }) {
            return None;
        }
        let (mask, snapshot) = Self::judge(reg);
        if let Kind::Managed { last, .. } = &mut reg.kind {
            if mask == 0 {
                *last = snapshot;
                return None;
            }
            if snapshot.is_some() {
                if *last == snapshot {
                    return None;
                }
                *last = snapshot;
            }
        } else if mask == 0 {
            return None;
        }
        if reg.events & libc::EPOLLONESHOT as u32 != 0 {
            reg.disabled = true;
        }
        Some(mask)
    }

    /// Would `reg` report something now (without taking its edge)?
    fn would_report(reg: &Registration<M>) -> bool {
        if reg.disabled || !matches!(reg.kind, Kind::Managed { .. } | Kind::Nested { .. }) {
            return false;
        }
        let (mask, snapshot) = Self::judge(reg);
        let Kind::Managed { last, .. } = &reg.kind else {
            return mask != 0;
        };
        mask != 0 && (snapshot.is_none() || *last != snapshot)
    }

    /// Makes connection `reg` cold if it has had nothing to report for
    /// [`COLD_AFTER_NS`] at `now`: the set arms it, then looks once more
    /// (the peer may have written before the arming), and it stays hot
    /// with what it owes if there is something. Returns that.
    fn cool(reg: &mut Registration<M>, now: u64) -> Option<u32> {
        let Kind::Managed { entry, cold, active_ns, .. } = &mut reg.kind else { return None };
        if *cold || now.saturating_sub(*active_ns) < COLD_AFTER_NS {
            return None;
        }
        let Waitable::Conn(conn) = entry.waitable() else { return None };
        conn.fall_asleep(Interest::from_epoll(reg.events));
        *cold = true;
        let owed = Self::owed(reg);
        if owed.is_some() {
            reg.warm(now, false);
        }
        owed
    }

    /// Adds what the judged registrations owe to `out` (from index `n`, up
    /// to `limit`). Returns the new count. Each scan starts one
    /// registration further on, so that when more are ready than fit, none
    /// starves. A connection with nothing to say for long goes cold.
    fn collect(&self, regs: &mut Regs<M>, out: &mut [libc::epoll_event], mut n: usize, limit: usize) -> usize {
        let limit = limit.min(out.len());
        let inherited = self.inherited();
        let now = sys::now_ns();
        let mut left = false;
        let mut visit = |reg: &mut Registration<M>, n: &mut usize| {
            let owed = match Self::owed(reg) {
                Some(mask) => {
                    if let Kind::Managed { active_ns, .. } = &mut reg.kind {
                        *active_ns = now;
                    }
                    Some(mask)
                }
                None if !inherited => Self::cool(reg, now),
                None => None,
            };
            left |= !reg.judged();
            if let Some(mask) = owed {
                out[*n] = libc::epoll_event { events: mask, u64: reg.data };
                *n += 1;
            }
        };
        if Self::by_list(regs, inherited) {
            let len = regs.hot.len();
            let start = if len == 0 { 0 } else { self.rotor.fetch_add(1, Ordering::Relaxed) % len };
            // The list from `start` round to it again (`start` < `len`).
            let nth = |k: usize| regs.hot[if start + k < len { start + k } else { start + k - len }];
            // The ring lines of each block are asked for before it is
            // judged (see `each_prefetched`); the entries are not asked
            // for ahead, as the list is short when it is followed.
            'list: for first in (0..len).step_by(PREFETCHED) {
                let block = first..len.min(first + PREFETCHED);
                block.clone().filter_map(|k| regs.map.at(nth(k))).for_each(Self::prefetch);
                for k in block {
                    if n == limit {
                        break 'list;
                    }
                    if let Some(reg) = regs.map.at_mut(nth(k)).filter(|r| r.judged()) {
                        visit(reg, &mut n);
                    }
                }
            }
        } else {
            let len = regs.map.len().max(1);
            let start = self.rotor.fetch_add(1, Ordering::Relaxed) % len;
            for pass in 0..2 {
                let all = regs.map.values_mut().enumerate();
                let judged = all.filter(|(i, reg)| (pass == 0) == (*i >= start) && Self::judged_here(reg, inherited));
                let finished = Self::each_prefetched(judged.map(|(_, reg)| reg), |reg| {
                    if n == limit {
                        return false;
                    }
                    visit(reg, &mut n);
                    true
                });
                if !finished {
                    break;
                }
            }
        }
        if left && !inherited {
            regs.prune();
        }
        n
    }

    /// Asks for the shared lines judging `reg` will read (see
    /// `Connection::prefetch_readiness`).
    fn prefetch(reg: &Registration<M>) {
        if let Some(conn) = reg.conn() {
            conn.prefetch_readiness();
        }
    }

    /// Calls `visit` on each of `regs` while it returns true, asking for
    /// the lines of the next [`PREFETCHED`] before judging them: a wait
    /// over thousands of busy connections takes a cache miss on each one
    /// whose peer wrote, and misses asked for together overlap. Returns
    /// whether every one was visited.
    fn each_prefetched<'r>(
        mut regs: impl Iterator<Item = &'r mut Registration<M>>,
        mut visit: impl FnMut(&mut Registration<M>) -> bool,
    ) -> bool
    where
        M: 'r,
    {
        // The next batch's entries are asked for one batch ahead, since
        // where a connection's lines are is read from its entry.
        let mut fill = |batch: &mut [Option<&'r mut Registration<M>>; PREFETCHED]| {
            let mut got = 0;
            for (slot, reg) in batch.iter_mut().zip(regs.by_ref()) {
                if let Some(entry) = reg.managed() {
                    vsocket_ring::ring::prefetch_object(&**entry);
                }
                *slot = Some(reg);
                got += 1;
            }
            got
        };
        let mut ahead: [Option<&'r mut Registration<M>>; PREFETCHED] = [const { None }; PREFETCHED];
        let mut ahead_count = fill(&mut ahead);
        loop {
            let mut batch = std::mem::replace(&mut ahead, [const { None }; PREFETCHED]);
            let got = ahead_count;
            if got == 0 {
                return true;
            }
            ahead_count = fill(&mut ahead);
            batch[..got].iter().flatten().for_each(|reg| Self::prefetch(reg));
            for reg in batch[..got].iter_mut().filter_map(Option::take) {
                if !visit(reg) {
                    return false;
                }
            }
        }
    }

    /// Does a wait follow the hot list (few are hot), or go through every
    /// slot (most registrations are hot, and few slots free: the list
    /// would only add a lookup to each)?
    fn by_list(regs: &Regs<M>, inherited: bool) -> bool {
        !inherited && regs.hot.len() * 4 < regs.map.spread()
    }

    /// Is `reg` judged by a wait of this process (`inherited`: one that
    /// inherited the set, where the creator's cold marks mean nothing)?
    fn judged_here(reg: &Registration<M>, inherited: bool) -> bool {
        if inherited {
            !reg.disabled && matches!(reg.kind, Kind::Managed { .. } | Kind::Nested { .. })
        } else {
            reg.judged()
        }
    }

    /// Judges every cold connection if the last time was [`SWEEP_NS`] ago:
    /// one with something to report is hot again.
    fn sweep(&self, regs: &mut Regs<M>) {
        let now = sys::now_ns();
        if self.inherited() || now.saturating_sub(regs.swept_ns) < SWEEP_NS {
            return;
        }
        regs.swept_ns = now;
        let mut warmed = Vec::new();
        for (&fd, reg) in regs.map.iter_mut() {
            if matches!(reg.kind, Kind::Managed { cold: true, .. }) && Self::would_report(reg) {
                reg.warm(now, false);
                warmed.push(fd);
            }
        }
        for fd in warmed {
            regs.list(fd);
        }
    }

    /// How many of `out` vSocket events may take: one slot stays free when
    /// the kernel set is due for a look, so kernel descriptors never starve.
    fn vsocket_room(&self, out: &[libc::epoll_event]) -> usize {
        let due = sys::now_ns().saturating_sub(self.kernel_checked.load(Ordering::Relaxed)) >= KERNEL_CHECK_NS;
        if due && out.len() > 1 {
            out.len() - 1
        } else {
            out.len()
        }
    }

    /// The registrations a wait judges (see `collect`): the hot list's,
    /// or every judged one when most are hot.
    fn judged<'a>(&self, regs: &'a Regs<M>) -> impl Iterator<Item = (RawFd, &'a Registration<M>)> + 'a {
        let inherited = self.inherited();
        let by_list = Self::by_list(regs, inherited);
        let listed = by_list.then(|| regs.hot.iter().filter_map(|&slot| regs.map.held(slot)));
        let all = (!by_list).then(|| regs.map.iter().map(|(fd, reg)| (*fd, reg)));
        let keep = move |(_, reg): &(RawFd, &Registration<M>)| {
            if by_list {
                reg.judged()
            } else {
                Self::judged_here(reg, inherited)
            }
        };
        listed.into_iter().flatten().chain(all.into_iter().flatten()).filter(keep)
    }

    /// Calls `f` on each registration a wait judges.
    fn each_judged(&self, regs: &Regs<M>, mut f: impl FnMut(RawFd, &Registration<M>)) {
        self.judged(regs).for_each(|(fd, reg)| f(fd, reg));
    }

    /// Counts this waiter among the sleepers of every hot connection in the
    /// set it is about to sleep on, arming each (see
    /// `Connection::fall_asleep`; cold ones the set armed already), and
    /// among those of nested sets' hot connections, counted the same way
    /// (an arming made uncounted could be withdrawn under another waiter,
    /// or withdraw another's). Returns what [`EpollSet::wake`] must be
    /// given after the sleep.
    fn fall_asleep(&self, regs: &Regs<M>) -> Vec<(RawFd, Arc<M>, Interest)> {
        let mut asleep = Vec::new();
        self.count_asleep(regs, &mut asleep);
        asleep
    }

    fn count_asleep(&self, regs: &Regs<M>, asleep: &mut Vec<(RawFd, Arc<M>, Interest)>) {
        self.each_judged(regs, |fd, reg| match &reg.kind {
            Kind::Managed { entry, .. } => {
                if let Waitable::Conn(conn) = entry.waitable() {
                    let interest = Interest::from_epoll(reg.events);
                    conn.fall_asleep(interest);
                    asleep.push((fd, entry.clone(), interest));
                }
            }
            Kind::Nested { entry } => {
                if let Waitable::Set(inner) = entry.waitable() {
                    inner.count_asleep(&inner.regs.lock(), asleep);
                }
            }
            _ => {}
        });
    }

    /// The waiter woke: each connection it slept on learns whether its
    /// doorbell fired (a token among `got`); the last sleeper on a
    /// connection drains its doorbell and withdraws the arming (one
    /// doorbell woke the waiter, and the other armed connections need not
    /// ring theirs).
    fn wake(asleep: Vec<(RawFd, Arc<M>, Interest)>, got: &[libc::epoll_event]) {
        let mut fired: Vec<u64> = got.iter().map(|e| e.u64).collect();
        fired.sort_unstable();
        for (fd, entry, interest) in asleep {
            if let Waitable::Conn(conn) = entry.waitable() {
                conn.wake(interest, fired.binary_search(&token(fd)).is_ok());
            }
        }
    }

    /// Would a wait on this set report something now? This is what the
    /// kernel answers when the set's own descriptor is polled (or nested in
    /// another set): vSocket readiness from shared memory, kernel readiness
    /// from the kernel set once the doorbells, which are not events of
    /// their own, are drained (a cold connection's is left: its ring is
    /// this set's event).
    fn has_events(&self) -> bool {
        // A nested set is waited on through its outer set only: its cold
        // connections are judged again here, on the same schedule.
        self.sweep(&mut self.regs.lock());
        if self.any_ready() {
            return true;
        }
        {
            let regs = self.regs.lock();
            self.each_judged(&regs, |_, reg| {
                if let Some(conn) = reg.conn() {
                    conn.drain_unless_watched();
                }
            });
        }
        let mut pfd = [libc::pollfd { fd: self.epfd, events: libc::POLLIN, revents: 0 }];
        sys::poll(&mut pfd, 0).is_ok_and(|n| n > 0) || self.any_ready()
    }

    fn any_ready(&self) -> bool {
        let regs = self.regs.lock();
        let ready = self.judged(&regs).any(|(_, reg)| Self::would_report(reg));
        ready
    }

    /// Turns kernel events into the program's events: kernel descriptors
    /// pass through, tokens are resolved. Returns the count written to `out`.
    fn translate(
        &self,
        regs: &mut Regs<M>,
        got: &[libc::epoll_event],
        out: &mut [libc::epoll_event],
        mut n: usize,
    ) -> usize {
        let (inherited, now) = (self.inherited(), sys::now_ns());
        let mut warmed = Vec::new();
        for ev in got {
            let Some(fd) = token_fd(ev.u64) else {
                if n < out.len() {
                    out[n] = *ev;
                    n += 1;
                }
                continue;
            };
            let Some(reg) = regs.map.get_mut(&fd).filter(|r| !matches!(r.kind, Kind::Kernel)) else {
                self.remove_parked_doorbell(&mut regs.parked, fd);
                continue;
            };
            match &mut reg.kind {
                // A cold connection's peer rang for the set's arming: it
                // is hot again (`collect`, next, judges it), and the set,
                // as its last sleeper, takes the doorbell.
                Kind::Managed { entry, cold: cold @ true, active_ns, .. } if !inherited => {
                    *cold = false;
                    *active_ns = now;
                    if let Waitable::Conn(conn) = entry.waitable() {
                        conn.wake(Interest::from_epoll(reg.events), true);
                    }
                    warmed.push(fd);
                }
                Kind::Managed { entry, .. } => {
                    if let Waitable::Conn(conn) = entry.waitable() {
                        conn.drain_unless_watched();
                    }
                }
                Kind::Listener { entry, channel } => {
                    if let Waitable::Listener(l) = entry.waitable() {
                        if channel.is_some() && *channel != l.channel_fd() {
                            // The channel broke: it only reports end of
                            // stream now (a new one is added by
                            // `sync_listeners` once the listener has it).
                            if let Some(old) = channel.take() {
                                let _ = sys::epoll_ctl(self.epfd, libc::EPOLL_CTL_DEL, old, 0, 0);
                            }
                        }
                    }
                    if reg.disabled || n == out.len() {
                        continue;
                    }
                    let mask = (ev.events | IN) & (reg.events | ERR | HUP) & !OUT;
                    let mask = mask & !(libc::EPOLLET as u32);
                    if let Some(existing) = out[..n].iter_mut().find(|e| e.u64 == reg.data) {
                        existing.events |= mask;
                        continue;
                    }
                    out[n] = libc::epoll_event { events: mask, u64: reg.data };
                    n += 1;
                    if reg.events & libc::EPOLLONESHOT as u32 != 0 {
                        reg.disabled = true;
                    }
                }
                // Judged by `collect`, which runs next.
                Kind::Nested { .. } | Kind::Kernel => {}
            }
        }
        for fd in warmed {
            regs.list(fd);
        }
        n
    }

    /// A doorbell left registered after its descriptor was deleted from
    /// the set (or closed) fired: remove it from the kernel set now.
    fn remove_parked_doorbell(&self, parked: &mut FdMap<RawFd>, fd: RawFd) {
        parked.remove(&fd);
        if let Some(entry) = M::lookup(fd) {
            if let Waitable::Conn(conn) = entry.waitable() {
                if sys::epoll_ctl(self.epfd, libc::EPOLL_CTL_DEL, conn.doorbell, 0, 0).is_ok() {
                    self.parked.fetch_sub(1, Ordering::Relaxed);
                    // The doorbell may have been parked under another
                    // descriptor of the same connection (a dup): that one
                    // must ask the kernel again when it is added.
                    parked.retain(|_, doorbell| *doorbell != conn.doorbell);
                }
            }
        }
    }

    /// epoll_wait/epoll_pwait on this set.
    pub fn wait(
        &self,
        out: &mut [libc::epoll_event],
        timeout_ms: i32,
        sigmask: *const libc::sigset_t,
    ) -> SysResult<usize> {
        if self.special.load(Ordering::Relaxed) == 0 && self.parked.load(Ordering::Relaxed) == 0 {
            return sys::epoll_pwait(self.epfd, out, timeout_ms, sigmask);
        }
        let deadline = (timeout_ms >= 0).then(|| sys::now_ms() + timeout_ms as i64);
        // The kernel's events land in a per-thread buffer, grown once: a
        // program's maxevents can be thousands, too many to allocate per call.
        let mut got = KERNEL_EVENTS.with(|b| std::mem::take(&mut *b.borrow_mut()));
        if got.len() < out.len() {
            got.resize(out.len(), libc::epoll_event { events: 0, u64: 0 });
        }
        let result = self.wait_with(out, timeout_ms, sigmask, deadline, &mut got[..out.len()]);
        KERNEL_EVENTS.with(|b| *b.borrow_mut() = got);
        result
    }

    fn wait_with(
        &self,
        out: &mut [libc::epoll_event],
        timeout_ms: i32,
        sigmask: *const libc::sigset_t,
        deadline: Option<i64>,
        got: &mut [libc::epoll_event],
    ) -> SysResult<usize> {
        let mut spun = false;
        let mut _sleeping = None;
        signals::wait_begins();
        loop {
            {
                let mut regs = self.regs.lock();
                self.sync_listeners(&mut regs);
                self.sweep(&mut regs);
                let n = self.collect(&mut regs, out, 0, self.vsocket_room(out));
                if n > 0 {
                    drop(regs);
                    return self.add_kernel_ready(out, n, got);
                }
            }
            if !spun && timeout_ms != 0 {
                spun = true;
                _sleeping = self.spinner.spin(|| self.any_ready());
                if _sleeping.is_none() {
                    continue;
                }
            }
            let asleep = {
                let mut regs = self.regs.lock();
                let asleep = self.fall_asleep(&regs);
                let n = self.collect(&mut regs, out, 0, self.vsocket_room(out));
                if n > 0 {
                    drop(regs);
                    Self::wake(asleep, &[]);
                    return self.add_kernel_ready(out, n, got);
                }
                asleep
            };
            let sleep = match deadline {
                None => MAX_SLEEP_MS,
                Some(d) => (d - sys::now_ms()).clamp(0, MAX_SLEEP_MS as i64) as i32,
            };
            // A handler that ran since the call began (in the spin, or
            // between two sleeps, where the kernel's epoll_wait would have
            // been asleep) ends it with EINTR, once the kernel's members
            // are seen not ready.
            let interrupted = signals::handler_ran();
            let sleep = if interrupted { 0 } else { sleep };
            let mask = if interrupted { std::ptr::null() } else { sigmask };
            let k = match sys::epoll_pwait(self.epfd, got, sleep, mask) {
                Ok(k) => k,
                Err(e) => {
                    Self::wake(asleep, &[]);
                    return Err(e);
                }
            };
            let mut regs = self.regs.lock();
            // Doorbells of connections slept on are left to `wake`, which
            // comes after: `translate` drains only those nobody sleeps on.
            let n = self.translate(&mut regs, &got[..k], out, 0);
            Self::wake(asleep, &got[..k]);
            let n = self.collect(&mut regs, out, n, out.len());
            if n > 0 || deadline.is_some_and(|d| sys::now_ms() >= d) {
                return Ok(n);
            }
            if interrupted {
                return Err(Errno(libc::EINTR));
            }
        }
    }

    /// Fills the rest of `out` with whatever the kernel has ready now.
    fn add_kernel_ready(
        &self,
        out: &mut [libc::epoll_event],
        n: usize,
        got: &mut [libc::epoll_event],
    ) -> SysResult<usize> {
        // Kernel descriptors are looked at no more often than every
        // KERNEL_CHECK_NS while vSocket descriptors keep the set busy: a
        // system call per wait would cost more than the wait itself.
        let now = sys::now_ns();
        if n == out.len() || now.saturating_sub(self.kernel_checked.load(Ordering::Relaxed)) < KERNEL_CHECK_NS {
            return Ok(n);
        }
        self.kernel_checked.store(now, Ordering::Relaxed);
        let room = out.len() - n;
        let k = sys::epoll_pwait(self.epfd, &mut got[..room], 0, std::ptr::null()).unwrap_or(0);
        let mut regs = self.regs.lock();
        Ok(self.translate(&mut regs, &got[..k], out, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member these tests never ask anything of: they look at where
    /// registrations are kept, not at what they report.
    struct Quiet;

    impl Member for Quiet {
        fn lookup(_: RawFd) -> Option<Arc<Quiet>> {
            None
        }

        fn waitable(&self) -> Waitable<'_, Quiet> {
            unreachable!("not judged here")
        }
    }

    fn kernel() -> Registration<Quiet> {
        Registration { events: libc::EPOLLIN as u32, data: 0, kind: Kind::Kernel, disabled: false }
    }

    /// A registration a wait judges.
    fn hot() -> Registration<Quiet> {
        let kind = Kind::Managed { entry: Arc::new(Quiet), last: None, cold: false, active_ns: 0 };
        Registration { events: libc::EPOLLIN as u32, data: 0, kind, disabled: false }
    }

    fn regs() -> Regs<Quiet> {
        Regs { map: Slots::new(), hot: Vec::new(), swept_ns: 0, parked: FdMap::default() }
    }

    #[test]
    fn a_freed_slot_is_taken_again_first_and_each_descriptor_finds_its_own() {
        let mut slots = Slots::new();
        for (fd, data) in [(10, 1), (11, 2), (12, 3)] {
            slots.insert(fd, Registration { data, ..kernel() });
        }
        let eleven = slots.slot_of(11).unwrap();
        assert_eq!(slots.remove(&11).map(|r| r.data), Some(2));
        assert!(slots.remove(&11).is_none() && slots.get_mut(&11).is_none() && !slots.contains_key(&11));
        slots.insert(20, Registration { data: 4, ..kernel() });
        assert_eq!(slots.slot_of(20), Some(eleven), "the freed slot");
        assert_eq!(slots.len(), 3);
        assert_eq!(slots.get_mut(&20).map(|r| r.data), Some(4));
        assert_eq!(slots.at(slots.slot_of(12).unwrap()).map(|r| r.data), Some(3));
        let mut held: Vec<(RawFd, u64)> = slots.iter().map(|(fd, r)| (*fd, r.data)).collect();
        held.sort();
        assert_eq!(held, [(10, 1), (12, 3), (20, 4)]);
        assert_eq!(slots.values_mut().count(), 3);
        assert_eq!(slots.iter_mut().count(), 3);
        // A fresh slot once none is free.
        slots.insert(21, kernel());
        assert_eq!(slots.slots.len(), 4);
    }

    #[test]
    fn a_slot_is_listed_once_while_registrations_leave_and_take_it() {
        let mut regs = regs();
        regs.map.insert(5, kernel());
        regs.list(5);
        assert!(regs.hot.is_empty(), "a kernel registration is not judged");
        regs.map.insert(7, hot());
        regs.list(7);
        regs.list(7);
        let seven = regs.map.slot_of(7).unwrap();
        assert_eq!(regs.hot, [seven]);
        // Deleted and added again around a request: the same slot, listed
        // once.
        regs.map.remove(&7);
        regs.map.insert(7, hot());
        regs.list(7);
        assert_eq!(regs.hot, [seven]);
        // Another descriptor taking the slot is listed through it.
        regs.map.remove(&7);
        regs.map.insert(8, hot());
        regs.list(8);
        assert_eq!((regs.hot.as_slice(), regs.map.slot_of(8)), ([seven].as_slice(), Some(seven)));
        regs.prune();
        assert_eq!(regs.hot, [seven], "still judged");
        // Gone and not taken again: pruned, and listed anew when it is.
        regs.map.remove(&8);
        regs.prune();
        assert!(regs.hot.is_empty() && !regs.map.slots[seven as usize].listed);
        regs.map.insert(9, hot());
        regs.list(9);
        assert_eq!(regs.hot, [seven]);
    }

    #[test]
    fn a_set_most_of_whose_registrations_left_lets_their_slots_go_and_each_descriptor_keeps_its_own() {
        let mut regs = regs();
        for fd in 0..1000 {
            regs.map.insert(fd, Registration { data: fd as u64, ..hot() });
            regs.list(fd);
        }
        regs.map.insert(5000, kernel());
        // Most leave, the last of them to stay hot in the list while free.
        for fd in (10..1000).rev() {
            assert_eq!(regs.remove(&fd).map(|r| r.data), Some(fd as u64));
        }
        assert!(regs.map.slots.len() < COMPACT_FROM, "{} slots for 11 registrations", regs.map.slots.len());
        assert_eq!(regs.map.len(), 11);
        for fd in (0..10).chain([5000]) {
            let slot = regs.map.slot_of(fd).unwrap();
            assert_eq!(
                regs.map.held(slot).map(|(at, r)| (at, r.data)),
                Some((fd, if fd == 5000 { 0 } else { fd as u64 }))
            );
        }
        // The hot list names each remaining hot registration's slot once
        // (and slots freed since the last compaction, until a prune), and
        // only the slots it names are marked listed.
        let mut named: Vec<RawFd> = regs.hot.iter().filter_map(|&slot| regs.map.held(slot)).map(|(fd, _)| fd).collect();
        named.sort();
        assert_eq!(named, (0..10).collect::<Vec<_>>());
        let listed = regs.map.slots.iter().filter(|s| s.listed).count();
        assert_eq!(listed, regs.hot.len());
        // A new registration after it is listed once.
        regs.prune();
        assert_eq!(regs.hot.len(), 10);
        regs.map.insert(7000, hot());
        regs.list(7000);
        regs.list(7000);
        assert_eq!(regs.hot.len(), 11);
        assert!(regs.hot.contains(&regs.map.slot_of(7000).unwrap()));
        // A few registrations never lose their slots to a compaction.
        let mut few = self::regs();
        for fd in 0..10 {
            few.map.insert(fd, hot());
        }
        let nine = few.map.slot_of(9).unwrap();
        for fd in 0..9 {
            few.remove(&fd);
        }
        assert_eq!(few.map.slot_of(9), Some(nine));
    }
}
