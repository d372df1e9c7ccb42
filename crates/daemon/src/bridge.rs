//! The bridge: one thread that carries VM guests' connections on this
//! host, ring to ring.
//!
//! A VM's end of a connection is a piece of its region, which the VM can
//! write whole, so it is never shared with another guest: the daemon holds
//! the far end of the VM's piece and of the other guest's segment, and the
//! bridge copies between the two, as the fabric relay copies between a
//! ring and a link. What it copies is the connection's metering (the
//! other end's [`Meter`]). Every index it reads from either end goes
//! through the ring crate's checks: an end whose rings hold impossible
//! values has its connection reset, both ways, and nothing else is
//! touched.
//!
//! A connection reaches the bridge twice: when it is made (its VM end
//! waits for the VM's bell stream), and when the VM's library opens that
//! bell stream. A client's library opens it as its connect returns, so a
//! client end waits at most [`BELL_TIMEOUT`]; a listener's end waits in
//! its backlog, as long as a kernel connection would, until a program
//! accepts it (the library opens the bell then) or the listener closes
//! (then [`BELL_TIMEOUT`] more, for an accept that raced the close). A
//! connection whose bell does not come is reset. The thread sleeps in one
//! epoll set holding every bell and a command eventfd.

use crate::fabric::local::{Heard, LocalEnd};
use crate::ids::ListenerId;
use crate::meter::Meter;
use crate::placed::{Placed, RegionEnd, VmMemory};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use vsocket_abi::layout::Endpoint;
use vsocket_ring::RxState;
use vsocket_sys::Epoll;

/// How long a client's connection, or a connection left in a closed
/// listener's backlog, waits for its VM's bell stream.
pub const BELL_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes copied at a time.
const CHUNK: usize = 256 << 10;

/// Steps (a copy of at most [`CHUNK`], or a look after arming) one
/// direction of a connection may take per round: a guest that keeps its
/// ring full, or rewrites its indices so it seems to, has its turn end
/// there, and the bridge serves every other connection before its next.
const STEPS_PER_ROUND: u32 = 16;

const TOKEN_COMMANDS: u64 = u64::MAX;

/// The bridge's command queue, and the eventfd that wakes it.
pub struct Bridge {
    commands: Mutex<mpsc::Sender<Command>>,
    bell: OwnedFd,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bridge")
    }
}

/// One end of a connection the bridge is given.
pub enum BridgeEnd {
    /// The daemon's end of a segment, ready now.
    Ready(Box<dyn LocalEnd>),
    /// The daemon's end `mine` of a piece of VM `vm`'s region, waiting
    /// for that VM's bell stream; `holds` is the write end of the
    /// record's lifeline for it, if the record has one; `backlog` the
    /// listener whose backlog it waits in, if it is a server's end.
    Awaiting {
        vm: Arc<VmMemory>,
        placed: Arc<Placed>,
        mine: Endpoint,
        holds: Option<OwnedFd>,
        backlog: Option<ListenerId>,
    },
}

impl BridgeEnd {
    /// Resets this end: its guest reads ECONNRESET, and its writes fail.
    fn reset(&self) {
        match self {
            BridgeEnd::Ready(end) => reset(end.as_ref()),
            // Its VM has no bell to be woken by: the flags are what it
            // finds when it looks.
            BridgeEnd::Awaiting { placed, mine, .. } => {
                placed.segment().producer(mine.tx_ring()).reset();
                placed.segment().consumer(mine.rx_ring()).close();
            }
        }
    }
}

enum Command {
    /// Connection `id` is made; its VM ends wait for their bell streams.
    /// `meter` counts what goes into and out of end 1.
    Await { id: u64, ends: [BridgeEnd; 2], meter: Arc<Meter> },
    /// VM `vm`'s bell stream for end `end` of connection `id`.
    Bell { id: u64, end: Endpoint, vm: Arc<VmMemory>, stream: OwnedFd },
    /// Connection `id` was not made after all: forget it.
    Cancel { id: u64 },
    /// A VM's listener closed: what waits in its backlog waits
    /// [`BELL_TIMEOUT`] more.
    ListenerClosed { listener: ListenerId },
    /// Connection `id` is reset (a policy change): both ends hear it now.
    Reset { id: u64 },
}

impl Bridge {
    /// Starts the bridge's thread.
    pub fn start() -> io::Result<Bridge> {
        let epoll = Epoll::new()?;
        let bell = vsocket_sys::eventfd()?;
        epoll.add(bell.as_fd(), libc::EPOLLIN as u32, TOKEN_COMMANDS)?;
        let (commands, queue) = mpsc::channel();
        let thread_bell = bell.try_clone()?;
        std::thread::Builder::new().name("bridge".into()).spawn(move || {
            Pump { epoll, bell: thread_bell, queue, waiting: HashMap::new(), next_expiry: None, pairs: HashMap::new() }
                .run()
        })?;
        Ok(Bridge { commands: Mutex::new(commands), bell })
    }

    fn send(&self, command: Command) {
        // The thread lives as long as the daemon: a send cannot fail.
        let _ = crate::sync::lock(&self.commands).send(command);
        vsocket_sys::eventfd_signal(self.bell.as_fd());
    }

    /// Connection `id` is made between `ends` (at least one a VM's
    /// piece); the bridge carries it once every VM end's bell stream has
    /// arrived, and counts in `meter` what it moves into (`given`) and out
    /// of (`taken`) end 1.
    pub fn carry(&self, id: u64, ends: [BridgeEnd; 2], meter: Arc<Meter>) {
        self.send(Command::Await { id, ends, meter });
    }

    /// A bell stream from VM `vm`, for end `end` of its connection `id`
    /// (as the VM says: an end of another VM's connection, or of none, is
    /// not found and the stream is closed).
    pub fn bell(&self, id: u64, end: Endpoint, vm: Arc<VmMemory>, stream: OwnedFd) {
        self.send(Command::Bell { id, end, vm, stream });
    }

    /// Forgets connection `id`, given to [`carry`](Self::carry) but not
    /// made after all (its VM end is never told of it).
    pub fn cancel(&self, id: u64) {
        self.send(Command::Cancel { id });
    }

    /// VM listener `listener` closed: connections still in its backlog
    /// are reset unless accepted within [`BELL_TIMEOUT`].
    pub fn listener_closed(&self, listener: ListenerId) {
        self.send(Command::ListenerClosed { listener });
    }

    /// Resets connection `id` at both ends and wakes them (a connection
    /// the bridge does not carry is ignored).
    pub fn reset(&self, id: u64) {
        self.send(Command::Reset { id });
    }
}

/// A connection waiting for its VMs' bell streams.
struct Waiting {
    ends: [BridgeEnd; 2],
    meter: Arc<Meter>,
    /// When end `i`, if it still waits, has waited too long (none while
    /// it is in an open listener's backlog).
    deadlines: [Option<Instant>; 2],
    /// Which ends are VMs' pieces (see [`Pair::pinned`]).
    pinned: [bool; 2],
}

impl Waiting {
    /// Resets both ends (the VM's finds the flags when it looks).
    fn reset(&self) {
        for end in &self.ends {
            end.reset();
        }
    }

    fn new(ends: [BridgeEnd; 2], meter: Arc<Meter>, now: Instant) -> Waiting {
        let pinned = [0, 1].map(|i| matches!(ends[i], BridgeEnd::Awaiting { .. }));
        let deadlines = [0, 1].map(|i| match &ends[i] {
            BridgeEnd::Awaiting { backlog: None, .. } => Some(now + BELL_TIMEOUT),
            BridgeEnd::Awaiting { backlog: Some(_), .. } | BridgeEnd::Ready(_) => None,
        });
        Waiting { ends, meter, deadlines, pinned }
    }

    /// When the first end that still waits for its bell will have waited
    /// too long, if any has a deadline.
    fn earliest(&self) -> Option<Instant> {
        (0..2).filter(|&i| matches!(self.ends[i], BridgeEnd::Awaiting { .. })).filter_map(|i| self.deadlines[i]).min()
    }

    /// Has an end that still waits for its bell waited too long?
    fn expired(&self, now: Instant) -> bool {
        (0..2)
            .any(|i| matches!(self.ends[i], BridgeEnd::Awaiting { .. }) && self.deadlines[i].is_some_and(|d| now >= d))
    }

    /// Listener `listener` closed: an end in its backlog waits at most
    /// [`BELL_TIMEOUT`] from `now`.
    fn listener_closed(&mut self, listener: ListenerId, now: Instant) {
        for i in 0..2 {
            if let BridgeEnd::Awaiting { backlog: Some(l), .. } = &self.ends[i] {
                if *l == listener && self.deadlines[i].is_none() {
                    self.deadlines[i] = Some(now + BELL_TIMEOUT);
                }
            }
        }
    }
}

/// One carried connection.
struct Pair {
    ends: [Box<dyn LocalEnd>; 2],
    /// The connection's metering: `taken` from end 1's ring, `given`
    /// into it.
    meter: Arc<Meter>,
    /// Every process holding end `i` let go of it.
    gone: [bool; 2],
    /// Nothing more goes from end `i` to the other (FIN or RST passed).
    ended: [bool; 2],
    /// End `i` is a piece of a VM's region: it is kept until that VM lets
    /// go of it, so the piece is never placed again while the VM may still
    /// write it.
    pinned: [bool; 2],
    /// One end is done (let go, all it sent passed on): the other's writes
    /// have no reader.
    finished: bool,
}

/// What pumping one direction found.
enum Pumped {
    /// Moved what it could; the rings are armed to hear of more.
    Idle,
    /// Its turn ended with more to move: it goes again next round.
    More,
    /// A ring holds impossible values: the connection is reset.
    Corrupt,
}

struct Pump {
    epoll: Epoll,
    bell: OwnedFd,
    queue: mpsc::Receiver<Command>,
    waiting: HashMap<u64, Waiting>,
    /// No waiting connection expires before this (none: none has a
    /// deadline), so a round looks at them only when one may be due.
    next_expiry: Option<Instant>,
    pairs: HashMap<u64, Pair>,
}

impl Pump {
    fn run(mut self) {
        let mut events = Vec::new();
        let mut buf = vec![0u8; CHUNK];
        // Connections whose turn ended with more to move.
        let mut again: Vec<u64> = Vec::new();
        loop {
            let timeout = match (again.is_empty(), self.next_expiry) {
                (false, _) => 0,
                (true, None) => -1,
                (true, Some(due)) => {
                    let left = due.saturating_duration_since(Instant::now()).as_millis();
                    // Rounded up: waking a millisecond early would spin.
                    i32::try_from(left + 1).unwrap_or(i32::MAX)
                }
            };
            if let Err(e) = self.epoll.wait(timeout, &mut events) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "bridge: epoll failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            let mut dirty = std::mem::take(&mut again);
            for &(token, _) in &events {
                if token == TOKEN_COMMANDS {
                    vsocket_sys::drain(self.bell.as_fd());
                    while let Ok(command) = self.queue.try_recv() {
                        if let Some(id) = self.command(command) {
                            dirty.push(id);
                        }
                    }
                    continue;
                }
                let (id, end) = (token >> 1, (token & 1) as usize);
                let Some(pair) = self.pairs.get_mut(&id) else { continue };
                if !pair.gone[end] && pair.ends[end].hear() == Heard::LetGo {
                    pair.gone[end] = true;
                    let _ = self.epoll.delete(pair.ends[end].bell());
                    if pair.pinned[end] {
                        // A VM's bell stream also ends when its attachment
                        // does (its vsock backend gone) while its programs
                        // live on: they find the reset at their next look
                        // (every wait is bounded), rather than wait for a
                        // wake-up that cannot come. A VM that let go never
                        // looks again.
                        reset(pair.ends[end].as_ref());
                    }
                }
                dirty.push(id);
            }
            dirty.sort_unstable();
            dirty.dedup();
            for id in dirty {
                if self.pump(id, &mut buf) {
                    again.push(id);
                }
            }
            self.expire();
        }
    }

    /// Takes a command; returns a connection to pump.
    fn command(&mut self, command: Command) -> Option<u64> {
        match command {
            Command::Await { id, ends, meter } => {
                let waiting = Waiting::new(ends, meter, Instant::now());
                self.expect(waiting.earliest());
                self.waiting.insert(id, waiting);
                None
            }
            Command::Cancel { id } => {
                self.waiting.remove(&id);
                None
            }
            Command::ListenerClosed { listener } => {
                let now = Instant::now();
                for waiting in self.waiting.values_mut() {
                    waiting.listener_closed(listener, now);
                }
                let earliest = self.waiting.values().filter_map(Waiting::earliest).min();
                self.expect(earliest);
                None
            }
            Command::Reset { id } => {
                if let Some(w) = self.waiting.remove(&id) {
                    w.reset();
                }
                self.pairs.get_mut(&id)?.reset();
                Some(id)
            }
            Command::Bell { id, end, vm, stream } => {
                // The VM's process holds the end the daemon is not.
                let awaited = |e: &BridgeEnd| {
                    matches!(e, BridgeEnd::Awaiting { vm: v, placed, mine, .. }
                        if Arc::ptr_eq(v, &vm) && placed.is_of(&vm) && *mine == end.peer())
                };
                if !self.waiting.get(&id).is_some_and(|w| w.ends.iter().any(awaited)) {
                    tracing::warn!(connection = id, "bridge: a bell stream for no connection of that VM; closed");
                    return None;
                }
                let Waiting { ends, meter, deadlines, pinned } = self.waiting.remove(&id)?;
                let mut stream = Some(stream);
                let ends = ends.map(|e| {
                    if !awaited(&e) {
                        return e;
                    }
                    match (e, stream.take()) {
                        (BridgeEnd::Awaiting { placed, mine, holds, .. }, Some(bell)) => {
                            BridgeEnd::Ready(Box::new(RegionEnd::with(placed, mine, bell, holds)))
                        }
                        (e, _) => e,
                    }
                });
                let [BridgeEnd::Ready(first), BridgeEnd::Ready(second)] = ends else {
                    // Another VM end still waits for its bell.
                    self.waiting.insert(id, Waiting { ends, meter, deadlines, pinned });
                    return None;
                };
                let mut pair =
                    Pair { ends: [first, second], meter, gone: [false; 2], ended: [false; 2], pinned, finished: false };
                for (i, end) in pair.ends.iter().enumerate() {
                    if let Err(e) = self.epoll.add(end.bell(), libc::EPOLLIN as u32, id << 1 | i as u64) {
                        // Unwatched, it would never move: reset it now. Its
                        // pieces stay pinned (kept until the daemon ends),
                        // as nothing can tell when its VM lets go of them.
                        tracing::error!(connection = id, error = %e, "bridge: cannot watch a bell; connection reset");
                        pair.reset();
                        pair.pinned = [true; 2];
                        break;
                    }
                }
                tracing::debug!(connection = id, "bridge: carrying");
                self.pairs.insert(id, pair);
                Some(id)
            }
        }
    }

    /// Resets connections whose VM never opened their bell stream.
    /// Only when one may be due: a round does not look at every waiting
    /// connection (a VM listener's backlog may hold many).
    fn expire(&mut self) {
        let now = Instant::now();
        if !matches!(self.next_expiry, Some(due) if now >= due) {
            return;
        }
        let late: Vec<u64> = self.waiting.iter().filter(|(_, w)| w.expired(now)).map(|(&id, _)| id).collect();
        for id in late {
            if let Some(w) = self.waiting.remove(&id) {
                tracing::warn!(connection = id, "bridge: a VM opened no bell stream; connection reset");
                w.reset();
            }
        }
        self.next_expiry = self.waiting.values().filter_map(Waiting::earliest).min();
    }

    /// A waiting connection may expire at `due`.
    fn expect(&mut self, due: Option<Instant>) {
        if let Some(due) = due {
            self.next_expiry = Some(self.next_expiry.map_or(due, |next| next.min(due)));
        }
    }

    /// Moves what can move on connection `id`, both ways, within a
    /// round's steps, and drops it once both ends let go. Returns whether
    /// it has more to move.
    fn pump(&mut self, id: u64, buf: &mut [u8]) -> bool {
        let Some(pair) = self.pairs.get_mut(&id) else { return false };
        let mut more = false;
        for from in 0..2 {
            if pair.ended[from] {
                continue;
            }
            match pair.pump(from, buf) {
                Pumped::Idle => {}
                Pumped::More => more = true,
                Pumped::Corrupt => {
                    tracing::warn!(
                        connection = id,
                        end = from,
                        "bridge: a ring holds impossible values; connection reset"
                    );
                    pair.reset();
                    more = false;
                    break;
                }
            }
        }
        // An end whose holders let go, once all it sent has passed on, is
        // done: the other end's further writes have no reader (they fail,
        // as to a socket whose peer closed). The pair then goes as soon as
        // every VM's piece in it is let go of by its VM, letting go of a
        // segment's end too (which is how the relay, holding a segment
        // whose other end is the bridge's, learns the stream is over).
        if !pair.finished {
            if let Some(done) = (0..2).find(|&i| pair.gone[i] && pair.ended[i]) {
                pair.finished = true;
                let other = pair.ends[1 - done].as_ref();
                other.wake_if(other.outbound().close());
            }
        }
        if pair.finished && (0..2).all(|i| pair.gone[i] || !pair.pinned[i]) {
            tracing::debug!(connection = id, gone = ?pair.gone, ended = ?pair.ended, "bridge: connection over");
            self.pairs.remove(&id);
            return false;
        }
        more
    }
}

/// Resets `end`: its guest reads ECONNRESET, and its writes fail.
fn reset(end: &dyn LocalEnd) {
    end.wake_if(end.inbound().reset() | end.outbound().close());
}

impl Pair {
    /// Resets both ends and wakes them; nothing more passes either way.
    fn reset(&mut self) {
        for end in &self.ends {
            reset(end.as_ref());
        }
        self.ended = [true; 2];
    }

    /// Copies from end `from`'s outbound ring into the other's inbound one,
    /// and passes on its end of stream.
    fn pump(&mut self, from: usize, buf: &mut [u8]) -> Pumped {
        let to = 1 - from;
        let Pair { ends, meter, gone, ended, .. } = self;
        let (source, sink) = (ends[from].as_ref(), ends[to].as_ref());
        for _ in 0..STEPS_PER_ROUND {
            let rx = source.outbound();
            match rx.state() {
                Ok(RxState::Data(n)) => {
                    let tx = sink.inbound();
                    let space = match tx.space() {
                        // Nobody holds the other end to read it.
                        _ if gone[to] => {
                            ended[from] = true;
                            source.wake_if(source.inbound().reset() | rx.close());
                            return Pumped::Idle;
                        }
                        Ok(0) => {
                            // Hear of the other guest's reads.
                            tx.arm();
                            match tx.space() {
                                Ok(0) => return Pumped::Idle,
                                Ok(_) => continue,
                                // Closed meanwhile: the next step says so.
                                Err(vsocket_ring::RingError::PeerClosed) => continue,
                                Err(_) => return Pumped::Corrupt,
                            }
                        }
                        Ok(space) => space as usize,
                        // The other guest closed its reading side: what
                        // comes is for nobody, as a kernel socket's RST.
                        Err(vsocket_ring::RingError::PeerClosed) => {
                            ended[from] = true;
                            source.wake_if(source.inbound().reset() | rx.close());
                            return Pumped::Idle;
                        }
                        Err(_) => return Pumped::Corrupt,
                    };
                    let take = (n as usize).min(space).min(buf.len());
                    let Ok((got, wake_source)) = rx.read(&mut [&mut buf[..take]], false) else {
                        return Pumped::Corrupt;
                    };
                    source.wake_if(wake_source);
                    match tx.write(&[&buf[..got]]) {
                        Ok((put, wake_sink)) if put == got => sink.wake_if(wake_sink),
                        _ => return Pumped::Corrupt,
                    }
                    let counter = if to == 1 { &meter.given } else { &meter.taken };
                    counter.fetch_add(got as u64, Ordering::Relaxed);
                }
                Ok(RxState::Empty) => {
                    if gone[from] {
                        // Its processes died without closing: as the
                        // kernel does at exit, FIN, or RST with bytes
                        // they never read.
                        ended[from] = true;
                        let unread = source.inbound().space().is_ok_and(|s| s < source.window());
                        sink.wake_if(if unread { sink.inbound().reset() } else { sink.inbound().finish() });
                        return Pumped::Idle;
                    }
                    rx.arm();
                    if matches!(rx.state(), Ok(RxState::Empty)) {
                        return Pumped::Idle;
                    }
                }
                Ok(RxState::Fin) => {
                    ended[from] = true;
                    sink.wake_if(sink.inbound().finish());
                    return Pumped::Idle;
                }
                Ok(RxState::Reset) => {
                    *ended = [true; 2];
                    sink.wake_if(sink.inbound().reset() | sink.outbound().close());
                    source.wake_if(source.inbound().reset());
                    return Pumped::Idle;
                }
                Err(_) => return Pumped::Corrupt,
            }
        }
        Pumped::More
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fabric::local::SegmentEnd;
    use vsocket_ring::Segment;

    /// A pair as the bridge holds it, and each guest's own view: the VM's
    /// (the client, in a piece of a region) and the other guest's (the
    /// server, a segment whose client end is the daemon).
    struct Rig {
        pair: Pair,
        vm: Segment,
        other: Segment,
        _vm_memory: Arc<VmMemory>,
        _bells: [OwnedFd; 2],
        _dir: std::path::PathBuf,
    }

    fn rig(name: &str) -> Rig {
        let ring = 4096;
        let dir = std::env::temp_dir().join(format!("vsocket-bridge-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("region");
        let vm_memory = Arc::new(VmMemory::create(&path, 1 << 20).unwrap());
        let placed = vm_memory.place(ring).unwrap();
        let region = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let vm = Segment::map_placed(region.as_fd(), placed.offset(), ring, Endpoint::Client).unwrap();
        let (vm_bell, vm_guest_bell) = vsocket_sys::stream_pair().unwrap();
        let vm_end = RegionEnd::with(Arc::new(placed), Endpoint::Server, vm_bell, None);
        let (daemon_view, files) = Segment::create(ring).unwrap();
        let [own, peer] = files.clone_for(Endpoint::Client).unwrap();
        let relay_view = Segment::map(own.as_fd(), peer.as_fd(), ring, Endpoint::Client).unwrap();
        let [own, peer] = files.clone_for(Endpoint::Server).unwrap();
        let other = Segment::map(own.as_fd(), peer.as_fd(), ring, Endpoint::Server).unwrap();
        drop(daemon_view);
        let (bell, other_guest_bell) = vsocket_sys::stream_pair().unwrap();
        let (_lifeline, holds) = vsocket_sys::pipe().unwrap();
        let other_end = SegmentEnd::new(relay_view, Endpoint::Client, bell, holds);
        let pair = Pair {
            ends: [Box::new(vm_end), Box::new(other_end)],
            meter: Arc::new(Meter::default()),
            gone: [false; 2],
            ended: [false; 2],
            pinned: [true, false],
            finished: false,
        };
        Rig { pair, vm, other, _vm_memory: vm_memory, _bells: [vm_guest_bell, other_guest_bell], _dir: dir }
    }

    fn read_all(segment: &Segment, ring: usize) -> Vec<u8> {
        let mut buf = vec![0u8; 1 << 16];
        let (n, _) = segment.consumer(ring).read(&mut [&mut buf[..]], false).unwrap();
        buf.truncate(n);
        buf
    }

    fn pump(rig: &mut Rig) {
        let mut buf = vec![0u8; 1000];
        for from in 0..2 {
            assert!(matches!(rig.pair.pump(from, &mut buf), Pumped::Idle));
        }
    }

    #[test]
    fn a_client_waits_for_its_bell_briefly_and_a_backlog_while_its_listener_lives() {
        let dir = std::env::temp_dir().join(format!("vsocket-bridge-waits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let vm = Arc::new(VmMemory::create(&dir.join("region"), 1 << 20).unwrap());
        let awaiting = |mine, backlog| BridgeEnd::Awaiting {
            vm: vm.clone(),
            placed: Arc::new(vm.place(4096).unwrap()),
            mine,
            holds: None,
            backlog,
        };
        let (listener, other) = (ListenerId(3), ListenerId(4));
        let start = Instant::now();
        let meter = Arc::new(Meter::default());
        // VM to VM: the client's end has BELL_TIMEOUT, the server's is in
        // listener 3's backlog.
        let mut waiting =
            Waiting::new([awaiting(Endpoint::Client, Some(listener)), awaiting(Endpoint::Server, None)], meter, start);
        assert!(!waiting.expired(start + BELL_TIMEOUT - Duration::from_millis(1)));
        assert!(waiting.expired(start + BELL_TIMEOUT));
        assert_eq!(waiting.earliest(), Some(start + BELL_TIMEOUT));
        // Once the client's bell came, the server's waits on, however long.
        let BridgeEnd::Awaiting { placed, .. } = &waiting.ends[1] else { unreachable!() };
        let (bell, _guest) = vsocket_sys::stream_pair().unwrap();
        waiting.ends[1] = BridgeEnd::Ready(Box::new(RegionEnd::with(placed.clone(), Endpoint::Server, bell, None)));
        let late = start + Duration::from_secs(3600);
        assert!(!waiting.expired(late));
        assert_eq!(waiting.earliest(), None, "nothing for the bridge to look at");
        // Another listener's close changes nothing; its own gives an
        // accept that raced it BELL_TIMEOUT more.
        waiting.listener_closed(other, late);
        assert!(!waiting.expired(late + Duration::from_secs(3600)));
        waiting.listener_closed(listener, late);
        assert_eq!(waiting.earliest(), Some(late + BELL_TIMEOUT));
        assert!(!waiting.expired(late + BELL_TIMEOUT - Duration::from_millis(1)));
        assert!(waiting.expired(late + BELL_TIMEOUT));
        // A second close does not put the deadline off.
        waiting.listener_closed(listener, late + Duration::from_secs(4));
        assert!(waiting.expired(late + BELL_TIMEOUT));
        drop(waiting);
        assert_eq!(vm.usage().0, 0, "the pieces are given back once the bridge lets go");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn bytes_cross_both_ways_in_order_and_are_metered() {
        let mut rig = rig("bytes");
        // More than a ring holds, in pieces smaller than the copy buffer.
        let sent: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut got = Vec::new();
        let mut at = 0;
        while got.len() < sent.len() {
            let (n, _) = rig.vm.producer(0).write(&[&sent[at..]]).unwrap();
            at += n;
            pump(&mut rig);
            got.extend(read_all(&rig.other, 0));
        }
        assert_eq!(got, sent);
        rig.other.producer(1).write(&[b"reply"]).unwrap();
        pump(&mut rig);
        assert_eq!(read_all(&rig.vm, 1), b"reply");
        assert_eq!(rig.pair.meter.given.load(Ordering::Relaxed), 10_000);
        assert_eq!(rig.pair.meter.taken.load(Ordering::Relaxed), 5);
        // A FIN passes too, and only after the bytes before it.
        rig.vm.producer(0).write(&[b"last"]).unwrap();
        rig.vm.producer(0).finish();
        pump(&mut rig);
        assert_eq!(read_all(&rig.other, 0), b"last");
        assert_eq!(rig.other.consumer(0).state().unwrap(), RxState::Fin);
        assert!(rig.pair.ended[0] && !rig.pair.ended[1]);
    }

    #[test]
    fn a_piece_is_kept_until_its_vm_lets_go() {
        let rig = rig("kept");
        let Rig { pair, vm, other, _vm_memory: vm_memory, _bells: bells, _dir } = rig;
        let (_queue_in, queue) = mpsc::channel();
        let mut pump = Pump {
            epoll: Epoll::new().unwrap(),
            bell: vsocket_sys::eventfd().unwrap(),
            queue,
            waiting: HashMap::new(),
            next_expiry: None,
            pairs: HashMap::new(),
        };
        pump.pairs.insert(7, pair);
        let mut buf = vec![0u8; 1000];
        // The other guest closes and lets go: its FIN reaches the VM, and
        // the VM's further writes have no reader.
        other.producer(1).finish();
        pump.pairs.get_mut(&7).unwrap().gone[1] = true;
        pump.pump(7, &mut buf);
        assert_eq!(vm.consumer(1).state().unwrap(), RxState::Fin);
        assert!(vm.producer(0).space().is_err(), "the VM's writes must fail");
        // The VM has not let go: its piece is still its own.
        assert!(pump.pairs.contains_key(&7));
        assert_ne!(vm_memory.usage().0, 0);
        pump.pairs.get_mut(&7).unwrap().gone[0] = true;
        pump.pump(7, &mut buf);
        assert!(!pump.pairs.contains_key(&7));
        assert_eq!(vm_memory.usage().0, 0, "the piece goes back once the VM let go");
        drop(bells);
    }

    #[test]
    fn a_connection_that_never_runs_dry_yields_its_turn() {
        let mut rig = rig("turn");
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            // The VM keeps its ring full and its peer keeps reading: a turn
            // without a bound would never end.
            scope.spawn(|| {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let _ = rig.vm.producer(0).write(&[&buf[..]]);
                    let _ = rig.other.consumer(0).read(&mut [&mut buf[..]], false);
                }
            });
            let mut buf = vec![0u8; 1000];
            // Every pump returns (a round is bounded); while the flow keeps
            // up, a round ends with more to move.
            let began = Instant::now();
            let mut more = 0;
            while more < 10 && began.elapsed() < Duration::from_secs(10) {
                if let Pumped::More = rig.pair.pump(0, &mut buf) {
                    more += 1;
                }
            }
            stop.store(true, Ordering::Relaxed);
            assert_eq!(more, 10, "the busy direction never had more than a round's worth");
        });
    }

    #[test]
    fn a_vm_that_forges_its_indices_breaks_its_own_connection_only() {
        let mut rig = rig("forged");
        rig.vm.forge_for_tests(0, 1 << 40);
        let mut buf = vec![0u8; 1000];
        assert!(matches!(rig.pair.pump(0, &mut buf), Pumped::Corrupt));
    }
}
