//! The relay: one thread that carries every cross-host connection of this
//! host between its guests' rings and the fabric links.
//!
//! For a connection whose other end is on another host, the daemon is the
//! other end of the guest's segment: it reads what the guest writes and
//! sends it as `Data` frames, and writes what arrives into the guest's
//! receive ring. Flow control is per connection: the sender may have at
//! most the receiver's window (its ring size) unconsumed, and the receiver
//! gives `Credit` back as its guest reads. A guest that stops reading
//! therefore stops only its own connection; a link's frames are never held
//! up behind it, because the receiver always has room for what it allowed.
//!
//! The thread sleeps in one epoll set holding the links, every relayed
//! connection's doorbell and a command eventfd. Guests ring the doorbell
//! when they write (the relay arms the consumer side) and, when a credit
//! may be due, when they read (the relay arms the producer side).

use super::link::{Due, Handshake, Hosts, Link, Refused};
use super::local::{Heard, LocalEnd};
use super::stream::{CreditDue, Ends, Flow};
use super::table::{Slot, Table};
use super::{
    Command, Events, LinkEvent, LinkFailure, LinkId, NewConn, OpenOutcome, OpenRequest, PeerStatus, Transport,
    Unreachable,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vsocket_abi::fabric::{Frame, Origin, Refusal, MAX_PAYLOAD, VERSION};
use vsocket_admin::LinkState;
use vsocket_policy::FabricKind;

pub use super::link::LINK_TIMEOUT;
use super::link::PING_EVERY;
use vsocket_ring::spin::Spinner;
use vsocket_ring::RxState;
use vsocket_sys::Epoll;

/// How often a host dials a peer that is down.
const DIAL_EVERY: Duration = Duration::from_secs(1);
/// The longest the relay watches a guest's ring for an answer.
const ANSWER_SPIN_NS: u32 = 100_000;
/// Past this many bytes waiting on a link, guests' rings are not read.
const HIGH_WATER: usize = 4 << 20;

const TOKEN_COMMANDS: u64 = 0;
const TOKEN_CONNS: u64 = 1 << 40;

/// A stream's key: the peer (index into `peers`), who opened it, its id.
type Key = (usize, Side, u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Side {
    /// This host opened it (its guest is the client).
    Local,
    /// The peer opened it (this host's guest is the server).
    Remote,
}

fn wire(side: Side) -> Origin {
    match side {
        Side::Local => Origin::Sender,
        Side::Remote => Origin::Receiver,
    }
}

fn side_of(origin: Origin) -> Side {
    match origin {
        Origin::Sender => Side::Remote,
        Origin::Receiver => Side::Local,
    }
}

/// When an aborted connection leaves the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Removal {
    /// At once: its guest will not look at it again.
    Now,
    /// Once its guest lets go of it (it must first read the reset).
    WhenLetGo,
}

/// One relayed connection.
struct Conn {
    key: Key,
    /// The guest's rings and wake-ups.
    end: Box<dyn LocalEnd>,
    /// Flow control: credit, windows, credit owed back.
    flow: Flow,
    /// Bytes taken from and written into the guest's rings (`given` is
    /// what flow control calls delivered).
    meter: Arc<crate::meter::Meter>,
    /// Waiting for the peer's answer to our `Open`.
    opening: Option<mpsc::Sender<OpenOutcome>>,
    /// Which directions have ended (`Fin` or `Reset` sent, or received).
    ends: Ends,
    /// Every process holding the guest's end has let go of it.
    guest_gone: bool,
}

struct Peer {
    /// Its host name (its address is in [`Hosts`], and may change).
    name: String,
    /// This host dials it (the host with the smaller name dials).
    dials: bool,
    link: Option<LinkId>,
    last_dial: Option<Instant>,
    /// A dial has started and not yet ended (up or failed).
    dialing: bool,
    /// Why its link last failed (shown as `status.last_error`).
    failure: Option<Arc<LinkFailure>>,
    status: PeerStatus,
}

impl Peer {
    /// Peer `name` at `address`, as host `this` sees it: no link yet.
    fn new(this: &str, name: String, address: SocketAddr, kind: FabricKind) -> Peer {
        Peer {
            dials: this < name.as_str(),
            status: PeerStatus::new(&name, address, kind),
            name,
            link: None,
            last_dial: None,
            dialing: false,
            failure: None,
        }
    }
}

/// The relay's state, owned by its thread.
pub struct Relay {
    /// Where `Open`s from peers are decided, and where their answers go.
    opens: Arc<dyn super::RemoteOpens>,
    answers: Arc<super::Commands>,
    epoll: Arc<Epoll>,
    /// Taken out while it reports events (see [`Relay::with_transport`]).
    transport: Option<Box<dyn Transport>>,
    /// Frames sent, and links closed, while the transport was out.
    outbox: Vec<(LinkId, Vec<u8>)>,
    closing: Vec<LinkId>,
    kind: FabricKind,
    /// This host, its peers' names and addresses, and the fabric key.
    hosts: Hosts,
    peers: Vec<Peer>,
    /// Every open link's protocol state: handshake, then its peer.
    links: HashMap<LinkId, Link>,
    conns: Table<Key, Conn>,
    commands: mpsc::Receiver<Command>,
    command_bell: OwnedFd,
    dirty: Vec<Slot>,
    blocked: Vec<Slot>,
    /// Connections whose guest was just handed bytes: it may answer soon.
    answered: Vec<Slot>,
    /// How long to watch for a guest's answer (see `await_answers`).
    spin: Spinner,
    status: Arc<Mutex<Vec<PeerStatus>>>,
    /// The time the relay last read the clock: when it woke, and after
    /// each round of work. Link liveness is judged by it.
    now: Instant,
    /// Stream bytes moved (either way) since the last round of work
    /// ended; pings and other link chatter do not count.
    moved: bool,
    /// When the relay last moved stream bytes, and how long after that it
    /// polls rather than sleeps (`[fabric] busy_poll_us`).
    active: Instant,
    poll_for: Duration,
}

impl Relay {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        opens: Arc<dyn super::RemoteOpens>,
        answers: Arc<super::Commands>,
        epoll: Epoll,
        transport: Box<dyn Transport>,
        this: String,
        key: Option<vsocket_policy::FabricKey>,
        poll_for: Duration,
        peers: Vec<(String, SocketAddr)>,
        commands: mpsc::Receiver<Command>,
        command_bell: OwnedFd,
        status: Arc<Mutex<Vec<PeerStatus>>>,
    ) -> std::io::Result<Relay> {
        epoll.add(command_bell.as_fd(), libc::EPOLLIN as u32, TOKEN_COMMANDS)?;
        let kind = transport.describe();
        let hosts = Hosts::new(this.clone(), peers.clone(), key);
        let peers = peers.into_iter().map(|(name, address)| Peer::new(&this, name, address, kind)).collect();
        let mut relay = Relay {
            opens,
            answers,
            epoll: Arc::new(epoll),
            transport: Some(transport),
            outbox: Vec::new(),
            closing: Vec::new(),
            kind,
            hosts,
            peers,
            links: HashMap::new(),
            conns: Table::default(),
            commands,
            command_bell,
            dirty: Vec::new(),
            blocked: Vec::new(),
            answered: Vec::new(),
            spin: Spinner::with_budget(ANSWER_SPIN_NS),
            status,
            now: Instant::now(),
            moved: false,
            active: Instant::now(),
            poll_for,
        };
        // Every configured peer is shown (down) from the start, before the
        // relay's thread runs: a daemon that says it is ready never shows
        // an empty fabric that anyone could take for "every link up".
        relay.publish_status();
        Ok(relay)
    }

    /// Reads the clock, after a round of work or a sleep. A round that
    /// moved stream bytes keeps the relay polling for a while.
    fn clock(&mut self) {
        self.now = Instant::now();
        if std::mem::take(&mut self.moved) {
            self.active = self.now;
        }
    }

    /// Runs the relay forever.
    pub fn run(mut self) {
        let mut events = Vec::with_capacity(64);
        let mut last_tick = self.now - DIAL_EVERY;
        loop {
            self.clock();
            if self.now.duration_since(last_tick) >= PING_EVERY / 2 {
                self.tick();
                last_tick = self.now;
            }
            // A transport that must be polled first (UCX with work pending)
            // is polled a few times here, without a trip through epoll.
            let mut polls = 0;
            let sleep = loop {
                let sleep = self.transport.as_mut().is_none_or(|t| t.before_sleep());
                if sleep || polls == 4 {
                    break sleep;
                }
                polls += 1;
                self.with_transport(|t, epoll, on| t.ready(super::TOKEN_POLL, 0, epoll, on));
                self.pump_dirty();
            };
            // Shortly after traffic the relay polls instead of sleeping: the
            // next frame or guest write (a request's answer, the next
            // request) usually comes within tens of microseconds, and a
            // relay asleep would first have to be woken, on each host and
            // each way. Yielding lets a guest woken on this core run.
            self.clock();
            let polling = sleep && self.now.duration_since(self.active) < self.poll_for;
            let timeout = if sleep && !polling { (PING_EVERY / 2).as_millis() as i32 } else { 0 };
            let waited = self.epoll.wait(timeout, &mut events);
            self.clock();
            if let Err(e) = waited {
                tracing::error!(error = %e, "fabric relay: epoll_wait");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            if events.is_empty() && polling {
                std::thread::yield_now();
            }
            for &(token, ev) in &events {
                if token == TOKEN_COMMANDS {
                    vsocket_sys::drain(self.command_bell.as_fd());
                    while let Ok(command) = self.commands.try_recv() {
                        self.command(command);
                    }
                } else if token >= TOKEN_CONNS {
                    self.doorbell(Slot::from_token(token, TOKEN_CONNS));
                } else {
                    self.with_transport(|t, epoll, on| t.ready(token, ev, epoll, on));
                }
            }
            self.pump_dirty();
            self.await_answers();
        }
    }

    /// A guest that was just handed bytes often answers within
    /// microseconds (a request and its reply): watch its ring for a short,
    /// adaptive while, so the answer needs neither its doorbell nor a
    /// wake-up of this thread. Watching stops at once when answers are
    /// slow or never come (a bulk receiver).
    fn await_answers(&mut self) {
        let mut watched = std::mem::take(&mut self.answered);
        watched.sort_unstable();
        watched.dedup();
        watched.retain(|&i| self.conns.get(i).is_some_and(|c| !c.ends.sent()));
        if watched.is_empty() {
            self.answered = watched;
            return;
        }
        let rx_has = |conn: &Conn| !matches!(conn.end.outbound().state(), Ok(RxState::Empty));
        for &i in &watched {
            if let Some(conn) = self.conns.get(i) {
                conn.end.outbound().disarm();
            }
        }
        let conns = &self.conns;
        if let Some(missed) = self.spin.spin(|| watched.iter().any(|&i| conns.get(i).is_some_and(rx_has))) {
            // The relay does not wait here for the answer: it goes back to
            // its epoll set, where the guest's doorbell will find it.
            missed.give_up();
        }
        // Pumping arms each watched ring again before it sleeps.
        self.dirty.extend_from_slice(&watched);
        watched.clear();
        self.answered = watched;
        self.pump_dirty();
    }

    /// Pumps every connection marked dirty, then pushes the links.
    fn pump_dirty(&mut self) {
        while !self.dirty.is_empty() || !self.blocked.is_empty() {
            let mut dirty = std::mem::take(&mut self.dirty);
            dirty.sort_unstable();
            dirty.dedup();
            for slot in dirty {
                self.pump(slot);
            }
            self.with_transport(|t, epoll, on| t.flush(epoll, on));
            // Connections held back by a full link go again once it drains.
            let blocked = std::mem::take(&mut self.blocked);
            for slot in blocked {
                let link = self.conns.get(slot).and_then(|c| self.peers[c.key.0].link);
                match link {
                    Some(link) if self.backlog(link) < HIGH_WATER / 2 => self.dirty.push(slot),
                    Some(_) => self.blocked.push(slot),
                    None => {}
                }
            }
            if self.dirty.is_empty() {
                break;
            }
        }
    }

    fn tick(&mut self) {
        let now = self.now;
        for i in 0..self.peers.len() {
            let Some((_, address)) = self.hosts.get(i) else { continue };
            match self.peers[i].link {
                Some(link) => match self.links.get(&link).map(|l| l.due(now)) {
                    Some(Due::Dead) => self.link_down(link, LinkFailure::Silent),
                    Some(Due::Ping) => self.send(link, &Frame::Ping),
                    _ => {}
                },
                None => {
                    let peer = &mut self.peers[i];
                    let due = peer.last_dial.is_none_or(|t| now.duration_since(t) >= DIAL_EVERY);
                    let dialing = peer.dialing || self.links.values().any(|l| l.dialed() == Some(i));
                    if peer.dials && due && !dialing {
                        peer.last_dial = Some(now);
                        peer.dialing = true;
                        tracing::debug!(peer = %peer.name, %address, "fabric dial");
                        self.with_transport(|t, epoll, _| t.dial(address, epoll));
                    }
                }
            }
        }
        self.with_transport(|t, epoll, _| t.maintain(epoll));
        let stale: Vec<LinkId> =
            self.links.iter().filter(|(_, l)| l.due(now) == Due::Unidentified).map(|(id, _)| *id).collect();
        for link in stale {
            tracing::debug!(link, "fabric link said no hello in time; closed");
            self.close_link(link);
        }
        self.with_transport(|t, epoll, on| t.flush(epoll, on));
        self.publish_status();
    }

    fn publish_status(&mut self) {
        let mut live = vec![0u64; self.peers.len()];
        for ((p, _, _), _) in self.conns.iter() {
            live[p] += 1;
        }
        let hosts = &self.hosts;
        let statuses = (self.peers.iter_mut().enumerate().zip(live))
            .filter(|((i, _), _)| hosts.get(*i).is_some())
            .map(|((_, p), live)| {
                p.status.connections = live;
                p.status.clone()
            })
            .collect();
        *crate::sync::lock(&self.status) = statuses;
    }

    /// Lends the transport to `f` with a handler for what it reports;
    /// meanwhile frames and closes wait in `outbox` and `closing`, and go
    /// to the transport as soon as it is back.
    fn with_transport(&mut self, f: impl FnOnce(&mut dyn Transport, &Epoll, &mut dyn Events)) {
        let Some(mut transport) = self.transport.take() else { return };
        let epoll = self.epoll.clone();
        f(transport.as_mut(), &epoll, self);
        for (link, bytes) in std::mem::take(&mut self.outbox) {
            transport.send_encoded(link, &bytes);
        }
        for link in std::mem::take(&mut self.closing) {
            transport.close(link, &epoll);
        }
        self.transport = Some(transport);
    }

    fn backlog(&self, link: LinkId) -> usize {
        self.transport.as_ref().map_or(0, |t| t.backlog(link))
    }

    fn close_link(&mut self, link: LinkId) {
        self.links.remove(&link);
        match self.transport.as_mut() {
            Some(t) => t.close(link, &self.epoll),
            None => self.closing.push(link),
        }
    }

    fn send(&mut self, link: LinkId, frame: &Frame<'_>) {
        match self.transport.as_mut() {
            Some(t) => t.send(link, frame),
            None => {
                let mut bytes = Vec::new();
                frame.encode(&mut bytes);
                self.outbox.push((link, bytes));
            }
        }
        let data = if let Frame::Data { bytes, .. } = frame { bytes.len() } else { 0 };
        self.note_sent(link, data);
    }

    /// Counts a frame sent on `link` carrying `data` stream bytes.
    fn note_sent(&mut self, link: LinkId, data: usize) {
        let Some(state) = self.links.get_mut(&link) else { return };
        state.sent(self.now);
        if let Some(p) = state.peer() {
            let s = &mut self.peers[p].status;
            s.frames_sent += 1;
            s.bytes_sent += data as u64;
        }
    }

    /// Sends `frame` on peer `p`'s link, if it is up.
    fn send_to(&mut self, p: usize, frame: &Frame<'_>) {
        if let Some(link) = self.peers[p].link {
            self.send(link, frame);
        }
    }

    fn link_event(&mut self, event: LinkEvent<'_>) {
        match event {
            LinkEvent::Up { link, peer, dialed } => {
                let dialed_peer = if dialed { self.hosts.at(peer) } else { None };
                if let Some(p) = dialed_peer {
                    self.peers[p].dialing = false;
                }
                let nonce = match vsocket_sys::random_bytes() {
                    Ok(nonce) => nonce,
                    Err(e) => {
                        tracing::error!(error = %e, "fabric: no random nonce for a link; closed");
                        self.close_link(link);
                        return;
                    }
                };
                self.links.insert(link, Link::new(self.now, peer, dialed_peer, nonce));
                let this = self.hosts.this.clone();
                self.send(link, &Frame::Hello { version: VERSION, host: &this, nonce });
            }
            LinkEvent::DialFailed { peer, error } => {
                if let Some(p) = self.hosts.at(peer).map(|p| &mut self.peers[p]) {
                    p.dialing = false;
                    let error = error.to_string();
                    if p.status.last_error.as_deref() != Some(error.as_str()) {
                        tracing::debug!(peer = %p.name, %error, "fabric dial failed");
                    }
                    p.status.last_error = Some(error);
                }
            }
            LinkEvent::Down { link, why } => self.link_down(link, why),
            LinkEvent::Frame(link, frame) => self.frame(link, frame),
            LinkEvent::Payload { link, origin, id, bytes } => {
                // The rest of a Data frame already reported (and answered
                // with Reset if its stream is unknown).
                if let Some((p, slot)) = self.stream_of(link, origin, id) {
                    self.peers[p].status.bytes_received += bytes.len() as u64;
                    self.deliver(slot, bytes);
                }
            }
            LinkEvent::Received { link, origin, id, len, wake } => {
                if let Some((p, slot)) = self.stream_of(link, origin, id) {
                    self.peers[p].status.bytes_received += len as u64;
                    self.delivered(slot, len, wake);
                }
            }
        }
    }

    /// The peer behind `link`, and the stream `(origin, id)` on it.
    fn stream_of(&mut self, link: LinkId, origin: Origin, id: u64) -> Option<(usize, Slot)> {
        let state = self.links.get_mut(&link)?;
        let p = state.peer()?;
        state.received(self.now);
        Some((p, self.conns.find(&(p, side_of(origin), id))?))
    }

    /// A link is gone: every connection on it is reset.
    fn link_down(&mut self, link: LinkId, why: LinkFailure) {
        let peer = self.links.get(&link).and_then(Link::peer);
        self.close_link(link);
        let Some(p) = peer else {
            tracing::debug!(link, %why, "fabric link gone before it said hello");
            return;
        };
        if self.peers[p].link != Some(link) {
            return;
        }
        let why = Arc::new(why);
        let peer = &mut self.peers[p];
        peer.link = None;
        peer.failure = Some(why.clone());
        peer.status.state = LinkState::Down;
        peer.status.since = Some(std::time::SystemTime::now());
        peer.status.last_error = Some(why.to_string());
        let slots = self.conns.slots_where(|k| k.0 == p);
        tracing::warn!(peer = %self.peers[p].name, %why, connections = slots.len(), "fabric link down");
        for slot in slots {
            self.abort(slot, Removal::WhenLetGo, OpenOutcome::Unreachable(Unreachable::LinkDown(why.clone())));
        }
    }

    fn frame(&mut self, link: LinkId, frame: Frame<'_>) {
        let Some(state) = self.links.get_mut(&link) else {
            // The rest of what a link sent before this side closed it.
            return;
        };
        state.received(self.now);
        let Some(p) = state.peer() else {
            // Only Hello (and, with a key, Proof) is expected on a link
            // not yet identified.
            let step = match frame {
                Frame::Hello { version, host, nonce } => state.hello(&self.hosts, version, host, nonce),
                Frame::Proof { mac } => state.proof(&self.hosts, &mac),
                _ => state.other().map(|()| Handshake::Nothing),
            };
            self.handshake(link, step);
            return;
        };
        self.peers[p].status.frames_received += 1;
        match frame {
            Frame::Proof { .. } if self.hosts.key.is_none() => {
                // The peer will refuse this side for lacking the key: say so
                // here, where the link would otherwise just come and go.
                tracing::warn!(peer = %self.peers[p].name, "fabric peer proves a fabric key; this host has none (set [fabric] key_file)");
            }
            Frame::Hello { .. } | Frame::Proof { .. } | Frame::Ping => {}
            Frame::Open { origin, id, vpc, guest, client, server, window } => {
                if origin != Origin::Sender || self.conns.contains(&(p, Side::Remote, id)) {
                    self.link_down(link, LinkFailure::BadOpen);
                    return;
                }
                let request = OpenRequest { vpc: vpc.into(), guest: guest.into(), client, server, window };
                super::remote_open(&self.opens, &self.answers, self.peers[p].name.clone(), p, id, request);
            }
            Frame::Accept { origin, id, window } => {
                let key = (p, side_of(origin), id);
                match self.conns.find(&key) {
                    Some(slot) => {
                        if let Some(conn) = self.conns.get_mut(slot) {
                            if let Some(reply) = conn.opening.take() {
                                conn.flow.accepted(window);
                                let _ = reply.send(OpenOutcome::Accepted);
                                self.dirty.push(slot);
                            }
                        }
                    }
                    None => self.send(link, &Frame::Reset { origin: wire(key.1), id }),
                }
            }
            Frame::Refuse { origin, id, refusal } => {
                if let Some(slot) = self.conns.find(&(p, side_of(origin), id)) {
                    if self.conns.get(slot).is_some_and(|c| c.opening.is_some()) {
                        self.abort(slot, Removal::Now, OpenOutcome::Refused(refusal));
                    }
                }
            }
            Frame::Data { origin, id, bytes } => {
                let key = (p, side_of(origin), id);
                self.peers[p].status.bytes_received += bytes.len() as u64;
                match self.conns.find(&key) {
                    Some(slot) => self.deliver(slot, bytes),
                    None => self.send(link, &Frame::Reset { origin: wire(key.1), id }),
                }
            }
            Frame::Credit { origin, id, bytes } => {
                if let Some(slot) = self.conns.find(&(p, side_of(origin), id)) {
                    if let Some(conn) = self.conns.get_mut(slot) {
                        conn.flow.credit(bytes);
                        self.dirty.push(slot);
                    }
                }
            }
            Frame::Fin { origin, id } => {
                if let Some(conn) = self.conns.find(&(p, side_of(origin), id)).and_then(|s| self.conns.get_mut(s)) {
                    conn.ends = conn.ends.got_end();
                    conn.end.wake_if(conn.end.inbound().finish());
                }
            }
            Frame::Reset { origin, id } => {
                if let Some(slot) = self.conns.find(&(p, side_of(origin), id)) {
                    let refused = OpenOutcome::Refused(Refusal::Errno(libc::ECONNREFUSED));
                    self.abort(slot, Removal::WhenLetGo, refused);
                }
            }
        }
    }

    /// Carries out what a handshake frame on `link` led to.
    fn handshake(&mut self, link: LinkId, step: Result<Handshake, Refused>) {
        match step {
            Ok(Handshake::Nothing) => {}
            Ok(Handshake::Prove(mac)) => self.send(link, &Frame::Proof { mac }),
            Ok(Handshake::Up(p)) => self.identify(link, p),
            Err(Refused::SpokeFirst) => {
                tracing::warn!("fabric link spoke before saying hello; closed");
                self.close_link(link);
            }
            Err(why) => {
                let state = self.links.get(&link);
                let claimed = state.and_then(Link::claimed).map(|p| self.peers[p].name.clone());
                let ip = state.map(|l| l.address().ip());
                tracing::warn!(?claimed, ?ip, %why, "fabric link refused");
                self.close_link(link);
            }
        }
    }

    /// `link` is peer `p`'s link from now on.
    fn identify(&mut self, link: LinkId, p: usize) {
        if let Some(old) = self.peers[p].link {
            // The peer came back (restarted) before its old link was found
            // dead: the new link replaces it.
            self.link_down(old, LinkFailure::Replaced);
        }
        let peer = &mut self.peers[p];
        peer.link = Some(link);
        peer.status.state = LinkState::Up;
        peer.status.since = Some(std::time::SystemTime::now());
        peer.status.links_up += 1;
        peer.status.last_error = None;
        tracing::info!(peer = %peer.name, transport = %self.kind, "fabric link up");
    }

    /// The fabric's hosts are now `hosts` (this host's peers, with their
    /// addresses): a host that left, or moved to another address, loses its
    /// link and every connection on it is reset; a host that joined is
    /// dialed (or awaited) like any other. Nothing else changes.
    fn set_hosts(&mut self, hosts: Vec<(String, SocketAddr)>) {
        for p in 0..self.peers.len() {
            let Some((name, address)) = self.hosts.get(p) else { continue };
            let now_at = hosts.iter().find(|(n, _)| n == name).map(|(_, a)| *a);
            if now_at == Some(address) {
                continue;
            }
            self.unlink(p, if now_at.is_some() { LinkFailure::Moved } else { LinkFailure::Left });
            match now_at {
                Some(address) => {
                    tracing::info!(peer = %self.peers[p].name, %address, "fabric host moved");
                    self.hosts.join(&self.peers[p].name.clone(), address);
                    let peer = &mut self.peers[p];
                    peer.status.address = address;
                    // A dial to the old address may still end; the new
                    // address is dialed without waiting for it.
                    peer.dialing = false;
                    peer.last_dial = None;
                }
                None => {
                    tracing::info!(peer = %self.peers[p].name, "fabric host left");
                    self.hosts.leave(p);
                }
            }
        }
        for (name, address) in hosts {
            if self.hosts.find(&name).is_some() || name == self.hosts.this {
                continue;
            }
            let p = self.hosts.join(&name, address);
            tracing::info!(peer = %name, %address, "fabric host joined");
            let peer = Peer::new(&self.hosts.this, name, address, self.kind);
            if p == self.peers.len() {
                self.peers.push(peer);
            } else {
                // It was a peer before: its place (and its counts) start
                // afresh.
                self.peers[p] = peer;
            }
        }
        self.publish_status();
    }

    /// Ends every link of peer `p`, up or still in its handshake, for `why`.
    fn unlink(&mut self, p: usize, why: LinkFailure) {
        let mut why = Some(why);
        if let Some(link) = self.peers[p].link {
            self.link_down(link, why.take().expect("taken once"));
        }
        let pending: Vec<LinkId> = (self.links.iter())
            .filter(|(_, l)| l.claimed() == Some(p) || l.dialed() == Some(p))
            .map(|(id, _)| *id)
            .collect();
        for link in pending {
            self.close_link(link);
        }
        if let Some(why) = why {
            let peer = &mut self.peers[p];
            peer.status.state = LinkState::Down;
            peer.status.last_error = Some(why.to_string());
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Open { peer, id, request, conn, reply } => {
                let Some(p) = self.hosts.find(&peer) else {
                    let _ = reply.send(OpenOutcome::Unreachable(Unreachable::NotAHost(peer)));
                    return;
                };
                let Some(link) = self.peers[p].link else {
                    let why = self.peers[p].failure.clone();
                    let _ = reply.send(OpenOutcome::Unreachable(Unreachable::NoLink(why)));
                    return;
                };
                let window = conn.end.window();
                // This host's connection ids are unique, so the key is free.
                let Ok(_) = self.insert((p, Side::Local, id), conn, 0, Some(reply)) else { return };
                self.peers[p].status.opened += 1;
                let frame = Frame::Open {
                    origin: Origin::Sender,
                    id,
                    vpc: &request.vpc,
                    guest: &request.guest,
                    client: request.client,
                    server: request.server,
                    window,
                };
                self.send(link, &frame);
            }
            Command::Cancel { peer, id } => {
                if let Some(p) = self.hosts.find(&peer) {
                    if let Some(slot) = self.conns.find(&(p, Side::Local, id)) {
                        self.send_to(p, &Frame::Reset { origin: Origin::Sender, id });
                        self.abort(slot, Removal::Now, OpenOutcome::Unreachable(Unreachable::GaveUp));
                    }
                }
            }
            Command::Accepted { peer, id, conn, window } => {
                if self.peers[peer].link.is_none() {
                    // The link went while the listener was being reached:
                    // the guest gets a connection that is reset at once.
                    reset_unrelayed(&conn);
                    return;
                }
                let mine_window = conn.end.window();
                let slot = match self.insert((peer, Side::Remote, id), conn, window, None) {
                    Ok(slot) => slot,
                    Err(conn) => {
                        // The peer opened two streams with one id before
                        // this side answered the first: the second is reset
                        // here, and the first goes on.
                        tracing::warn!(peer = %self.peers[peer].name, id, "fabric peer reused a stream id; reset");
                        reset_unrelayed(&conn);
                        return;
                    }
                };
                self.peers[peer].status.accepted += 1;
                self.send_to(peer, &Frame::Accept { origin: Origin::Receiver, id, window: mine_window });
                self.dirty.push(slot);
            }
            Command::Refused { peer, id, refusal } => {
                self.send_to(peer, &Frame::Refuse { origin: Origin::Receiver, id, refusal });
            }
            Command::Hosts(hosts) => self.set_hosts(hosts),
        }
        self.pump_dirty();
    }

    /// Enters a connection the relay carries from now on, and watches its
    /// bell; a key already in use hands the connection back.
    fn insert(
        &mut self,
        key: Key,
        conn: NewConn,
        peer_window: u32,
        opening: Option<mpsc::Sender<OpenOutcome>>,
    ) -> Result<Slot, NewConn> {
        if self.conns.contains(&key) {
            return Err(conn);
        }
        let NewConn { end, meter } = conn;
        let flow = Flow::new(end.window(), peer_window);
        let conn = Conn { key, end, flow, meter, opening, ends: Ends::Open, guest_gone: false };
        let Some(slot) = self.conns.insert(key, conn) else {
            unreachable!("the key was just found free");
        };
        if let Some(conn) = self.conns.get(slot) {
            if let Err(e) = self.epoll.add(conn.end.bell(), libc::EPOLLIN as u32, slot.token(TOKEN_CONNS)) {
                tracing::error!(error = %e, "fabric relay: cannot watch a doorbell");
            }
        }
        Ok(slot)
    }

    fn remove(&mut self, slot: Slot) {
        if let Some(conn) = self.conns.remove(slot) {
            if !conn.guest_gone {
                let _ = self.epoll.delete(conn.end.bell());
            }
        }
    }

    /// Ends connection `slot`: one still opening gets `outcome` and is
    /// dropped (its guest never had it); an established one is reset.
    fn abort(&mut self, slot: Slot, removal: Removal, outcome: OpenOutcome) {
        let Some(conn) = self.conns.get_mut(slot) else { return };
        if let Some(reply) = conn.opening.take() {
            conn.ends = Ends::Closed;
            let _ = reply.send(outcome);
            self.remove(slot);
            return;
        }
        self.reset(slot, removal);
    }

    /// Resets connection `slot` on the guest's side (it reads ECONNRESET)
    /// and stops relaying it.
    fn reset(&mut self, slot: Slot, removal: Removal) {
        let Some(conn) = self.conns.get_mut(slot) else { return };
        conn.ends = Ends::Closed;
        conn.end.wake_if(conn.end.inbound().reset() | conn.end.outbound().close());
        if removal == Removal::Now || conn.guest_gone {
            self.remove(slot);
        }
    }

    /// The guest rang (or let go of) connection `slot`'s bell.
    fn doorbell(&mut self, slot: Slot) {
        let Some(conn) = self.conns.get_mut(slot) else { return };
        if conn.end.hear() == Heard::LetGo && !conn.guest_gone {
            conn.guest_gone = true;
            let _ = self.epoll.delete(conn.end.bell());
        }
        self.dirty.push(slot);
    }

    /// Writes a `Data` frame's bytes into the guest's ring.
    fn deliver(&mut self, slot: Slot, bytes: &[u8]) {
        let Some(conn) = self.conns.get_mut(slot) else { return };
        if conn.ends.got() || conn.opening.is_some() {
            return;
        }
        let admitted = conn.flow.admits(conn.delivered(), bytes.len());
        let written = if admitted { conn.end.inbound().write(&[bytes]).ok() } else { None };
        match written {
            Some((n, wake)) if n == bytes.len() => self.delivered(slot, n, wake),
            // More than the window allowed (or a guest that forged its
            // ring's indices), or a guest that closed its reading side:
            // this connection is reset, nothing else.
            _ => {
                let (p, side, id) = conn.key;
                self.send_to(p, &Frame::Reset { origin: wire(side), id });
                self.reset(slot, Removal::WhenLetGo);
            }
        }
    }

    /// `n` more bytes are in connection `slot`'s receive ring.
    fn delivered(&mut self, slot: Slot, n: usize, wake: bool) {
        let Some(conn) = self.conns.get_mut(slot) else { return };
        conn.meter.given.fetch_add(n as u64, Ordering::Relaxed);
        self.moved = true;
        conn.end.wake_if(wake);
        self.dirty.push(slot);
        self.answered.push(slot);
    }

    /// Moves what can move for connection `slot`: the guest's bytes out
    /// (within credit and link room), credit back for what it read, its
    /// end of stream; and drops it once both the guest and the relay are
    /// done with it.
    fn pump(&mut self, slot: Slot) {
        let Some(conn) = self.conns.get(slot) else { return };
        if conn.opening.is_some() {
            return;
        }
        let (p, side, id) = conn.key;
        let Some(link) = self.peers[p].link else {
            // Reset with its link; gone once its guest lets go.
            if conn.guest_gone {
                self.remove(slot);
            }
            return;
        };
        let origin = wire(side);
        // Guest to peer.
        loop {
            if self.backlog(link) >= HIGH_WATER {
                self.blocked.push(slot);
                break;
            }
            let Some(conn) = self.conns.get_mut(slot) else { return };
            if conn.ends.sent() {
                break;
            }
            let rx = conn.end.outbound();
            match rx.state() {
                Ok(RxState::Data(n)) => {
                    let take = conn.flow.sendable(n as usize, MAX_PAYLOAD);
                    if take == 0 {
                        break;
                    }
                    let Some(transport) = self.transport.as_mut() else { break };
                    let Ok(wake) = transport.send_ring(link, origin, id, &rx, take) else {
                        self.corrupt(slot);
                        return;
                    };
                    conn.end.wake_if(wake);
                    conn.flow.sent(take);
                    conn.meter.taken.fetch_add(take as u64, Ordering::Relaxed);
                    self.note_sent(link, take);
                    self.moved = true;
                }
                Ok(RxState::Empty) => {
                    if conn.guest_gone {
                        // The process died without closing: as the kernel
                        // does at exit, FIN, or RST with unread data.
                        let unread = conn.delivered() - conn.consumed();
                        conn.ends = conn.ends.send_end();
                        let frame = if unread > 0 { Frame::Reset { origin, id } } else { Frame::Fin { origin, id } };
                        self.send(link, &frame);
                        break;
                    }
                    rx.arm();
                    if matches!(rx.state(), Ok(RxState::Empty)) {
                        break;
                    }
                }
                Ok(RxState::Fin) => {
                    conn.ends = conn.ends.send_end();
                    self.send(link, &Frame::Fin { origin, id });
                    break;
                }
                Ok(RxState::Reset) => {
                    conn.ends = conn.ends.send_end();
                    conn.end.wake_if(conn.end.inbound().reset());
                    self.send(link, &Frame::Reset { origin, id });
                    break;
                }
                Err(_) => {
                    self.corrupt(slot);
                    return;
                }
            }
        }
        // Credit back what the guest read.
        if let Some(bytes) = self.credit_due(slot) {
            self.send(link, &Frame::Credit { origin, id, bytes });
        }
        if self.conns.get(slot).is_some_and(|c| c.guest_gone && c.ends.sent()) {
            self.remove(slot);
        }
    }

    /// The credit connection `slot` owes its peer now (in sixteenths of
    /// the window, so the sender rarely runs dry), if any. Otherwise arms
    /// the guest's ring to hear of reads when they could make one due.
    fn credit_due(&mut self, slot: Slot) -> Option<u32> {
        let conn = self.conns.get_mut(slot)?;
        if conn.ends.got() {
            return None;
        }
        loop {
            let consumed = conn.consumed();
            match conn.flow.credit_due(conn.delivered(), consumed) {
                CreditDue::Send(bytes) => return Some(bytes),
                CreditDue::Nothing => return None,
                CreditDue::Watch => {
                    conn.end.inbound().arm();
                    if conn.consumed() == consumed {
                        return None;
                    }
                }
            }
        }
    }

    /// The guest's ring holds values no ring can: reset its connection.
    fn corrupt(&mut self, slot: Slot) {
        let Some(conn) = self.conns.get(slot) else { return };
        let (p, side, id) = conn.key;
        if !conn.ends.sent() {
            self.send_to(p, &Frame::Reset { origin: wire(side), id });
        }
        self.reset(slot, Removal::WhenLetGo);
        self.peers[p].status.corrupt += 1;
    }
}

/// Resets a connection the relay never took on: its guest reads
/// ECONNRESET at once.
fn reset_unrelayed(conn: &NewConn) {
    conn.end.wake_if(conn.end.inbound().reset() | conn.end.outbound().close());
}

impl Events for Relay {
    fn event(&mut self, event: LinkEvent<'_>) {
        self.link_event(event);
    }

    fn data_ring(&mut self, link: LinkId, origin: Origin, id: u64) -> Option<vsocket_ring::Producer<'_>> {
        let (_, slot) = self.stream_of(link, origin, id)?;
        let conn = self.conns.get(slot)?;
        // As `deliver` checks: bytes are taken only while the stream is open.
        if conn.ends.got() || conn.opening.is_some() {
            return None;
        }
        Some(conn.end.inbound())
    }
}

impl Conn {
    /// Bytes written into the guest's receive ring.
    fn delivered(&self) -> u64 {
        self.meter.given.load(Ordering::Relaxed)
    }

    /// Bytes of `delivered` the guest has read (its ring's head, as far as
    /// the daemon can tell: a guest that forges it fools only itself).
    fn consumed(&self) -> u64 {
        match self.end.inbound().space() {
            Ok(space) => {
                let unread = u64::from(self.end.window()).saturating_sub(u64::from(space));
                self.delivered().saturating_sub(unread)
            }
            // Closed by the guest: everything counts as read.
            Err(_) => self.delivered(),
        }
    }
}
