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
use super::stream::{CreditDue, Ends, Flow};
use super::{Command, Events, LinkEvent, LinkId, NewConn, OpenOutcome, OpenRequest, PeerStatus, Transport};
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
use vsocket_ring::{RxState, Segment};
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

/// One relayed connection.
struct Conn {
    key: Key,
    segment: Segment,
    /// The daemon's end of the segment (the other end from its guest's).
    mine: vsocket_abi::layout::Endpoint,
    bell: OwnedFd,
    /// Write end of the daemon's lifeline: dropping it tells the reaper
    /// the daemon's end is done.
    _holds: OwnedFd,
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
    name: String,
    address: SocketAddr,
    /// This host dials it (the host with the smaller name dials).
    dials: bool,
    link: Option<LinkId>,
    last_dial: Option<Instant>,
    /// A dial has started and not yet ended (up or failed).
    dialing: bool,
    status: PeerStatus,
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
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    keys: HashMap<Key, usize>,
    commands: mpsc::Receiver<Command>,
    command_bell: OwnedFd,
    dirty: Vec<usize>,
    blocked: Vec<usize>,
    /// Connections whose guest was just handed bytes: it may answer soon.
    answered: Vec<usize>,
    /// How long to watch for a guest's answer (see `await_answers`).
    spin: Spinner,
    status: Arc<Mutex<Vec<PeerStatus>>>,
    /// When the relay last moved stream bytes (either way), and how long
    /// after that it polls rather than sleeps (`[fabric] busy_poll_us`):
    /// pings and other link chatter do not count.
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
        let hosts = Hosts { this: this.clone(), peers: peers.clone(), key };
        let peers = peers
            .into_iter()
            .map(|(name, address)| Peer {
                dials: this < name,
                status: PeerStatus::new(&name, address, kind),
                name,
                address,
                link: None,
                last_dial: None,
                dialing: false,
            })
            .collect();
        Ok(Relay {
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
            conns: Vec::new(),
            free: Vec::new(),
            keys: HashMap::new(),
            commands,
            command_bell,
            dirty: Vec::new(),
            blocked: Vec::new(),
            answered: Vec::new(),
            spin: Spinner::with_budget(ANSWER_SPIN_NS),
            status,
            active: Instant::now(),
            poll_for,
        })
    }

    /// Runs the relay forever.
    pub fn run(mut self) {
        let mut events = Vec::with_capacity(64);
        let mut last_tick = Instant::now() - DIAL_EVERY;
        loop {
            if last_tick.elapsed() >= PING_EVERY / 2 {
                self.tick();
                last_tick = Instant::now();
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
            let polling = sleep && self.active.elapsed() < self.poll_for;
            let timeout = if sleep && !polling { (PING_EVERY / 2).as_millis() as i32 } else { 0 };
            if let Err(e) = self.epoll.wait(timeout, &mut events) {
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
                    self.doorbell((token - TOKEN_CONNS) as usize);
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
        watched.retain(|&i| self.conns.get(i).and_then(Option::as_ref).is_some_and(|c| !c.ends.sent()));
        if watched.is_empty() {
            self.answered = watched;
            return;
        }
        let rx_has = |conn: &Conn| !matches!(conn.segment.consumer(conn.mine.rx_ring()).state(), Ok(RxState::Empty));
        for &i in &watched {
            if let Some(conn) = self.conns[i].as_ref() {
                conn.segment.consumer(conn.mine.rx_ring()).disarm();
            }
        }
        let conns = &self.conns;
        if let Some(missed) = self.spin.spin(|| watched.iter().any(|&i| conns[i].as_ref().is_some_and(rx_has))) {
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
            for index in dirty {
                self.pump(index);
            }
            self.with_transport(|t, epoll, on| t.flush(epoll, on));
            // Connections held back by a full link go again once it drains.
            let blocked = std::mem::take(&mut self.blocked);
            for index in blocked {
                let link = self.conns.get(index).and_then(Option::as_ref).and_then(|c| self.peers[c.key.0].link);
                match link {
                    Some(link) if self.backlog(link) < HIGH_WATER / 2 => self.dirty.push(index),
                    Some(_) => self.blocked.push(index),
                    None => {}
                }
            }
            if self.dirty.is_empty() {
                break;
            }
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        for i in 0..self.peers.len() {
            match self.peers[i].link {
                Some(link) => match self.links.get(&link).map(|l| l.due(now)) {
                    Some(Due::Dead) => {
                        self.link_down(link, format!("nothing heard for {} s", LINK_TIMEOUT.as_secs()));
                    }
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
                        let address = peer.address;
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
        for conn in self.conns.iter().flatten() {
            live[conn.key.0] += 1;
        }
        let statuses = self
            .peers
            .iter_mut()
            .zip(live)
            .map(|(p, live)| {
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
        state.sent(Instant::now());
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
                let dialed_peer = if dialed { self.peers.iter().position(|p| p.address == peer) } else { None };
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
                self.links.insert(link, Link::new(Instant::now(), peer, dialed_peer, nonce));
                let this = self.hosts.this.clone();
                self.send(link, &Frame::Hello { version: VERSION, host: &this, nonce });
            }
            LinkEvent::DialFailed { peer, error } => {
                if let Some(p) = self.peers.iter_mut().find(|p| p.address == peer) {
                    p.dialing = false;
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
                if let Some((p, index)) = self.stream_of(link, origin, id) {
                    self.peers[p].status.bytes_received += bytes.len() as u64;
                    self.deliver(index, bytes);
                }
            }
            LinkEvent::Received { link, origin, id, len, wake } => {
                if let Some((p, index)) = self.stream_of(link, origin, id) {
                    self.peers[p].status.bytes_received += len as u64;
                    self.delivered(index, len, wake);
                }
            }
        }
    }

    /// The peer behind `link`, and the stream `(origin, id)` on it.
    fn stream_of(&mut self, link: LinkId, origin: Origin, id: u64) -> Option<(usize, usize)> {
        let state = self.links.get_mut(&link)?;
        let p = state.peer()?;
        state.received(Instant::now());
        Some((p, *self.keys.get(&(p, side_of(origin), id))?))
    }

    /// A link is gone: every connection on it is reset.
    fn link_down(&mut self, link: LinkId, why: String) {
        let peer = self.links.get(&link).and_then(Link::peer);
        self.close_link(link);
        let Some(p) = peer else {
            tracing::debug!(link, %why, "fabric link gone before it said hello");
            return;
        };
        if self.peers[p].link != Some(link) {
            return;
        }
        self.peers[p].link = None;
        let status = &mut self.peers[p].status;
        status.state = LinkState::Down;
        status.since = Some(std::time::SystemTime::now());
        status.last_error = Some(why.clone());
        let indices: Vec<usize> = self.keys.iter().filter(|(k, _)| k.0 == p).map(|(_, i)| *i).collect();
        tracing::warn!(peer = %self.peers[p].name, %why, connections = indices.len(), "fabric link down");
        for index in indices {
            self.abort(index, false, OpenOutcome::Unreachable(why.clone()));
        }
    }

    fn frame(&mut self, link: LinkId, frame: Frame<'_>) {
        let Some(state) = self.links.get_mut(&link) else {
            // The rest of what a link sent before this side closed it.
            return;
        };
        state.received(Instant::now());
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
                if origin != Origin::Sender || self.keys.contains_key(&(p, Side::Remote, id)) {
                    self.link_down(link, "peer broke the protocol: bad Open".into());
                    return;
                }
                let request = OpenRequest { vpc: vpc.into(), guest: guest.into(), client, server, window };
                super::remote_open(&self.opens, &self.answers, self.peers[p].name.clone(), p, id, request);
            }
            Frame::Accept { origin, id, window } => {
                let key = (p, side_of(origin), id);
                match self.keys.get(&key).copied() {
                    Some(index) => {
                        let conn = self.conns[index].as_mut().expect("keyed connection exists");
                        if let Some(reply) = conn.opening.take() {
                            conn.flow.accepted(window);
                            let _ = reply.send(OpenOutcome::Accepted);
                            self.dirty.push(index);
                        }
                    }
                    None => self.send(link, &Frame::Reset { origin: wire(key.1), id }),
                }
            }
            Frame::Refuse { origin, id, refusal } => {
                if let Some(index) = self.keys.get(&(p, side_of(origin), id)).copied() {
                    if self.conns[index].as_ref().is_some_and(|c| c.opening.is_some()) {
                        self.abort(index, true, OpenOutcome::Refused(refusal));
                    }
                }
            }
            Frame::Data { origin, id, bytes } => {
                let key = (p, side_of(origin), id);
                self.peers[p].status.bytes_received += bytes.len() as u64;
                match self.keys.get(&key).copied() {
                    Some(index) => self.deliver(index, bytes),
                    None => self.send(link, &Frame::Reset { origin: wire(key.1), id }),
                }
            }
            Frame::Credit { origin, id, bytes } => {
                if let Some(index) = self.keys.get(&(p, side_of(origin), id)).copied() {
                    if let Some(conn) = self.conns[index].as_mut() {
                        conn.flow.credit(bytes);
                        self.dirty.push(index);
                    }
                }
            }
            Frame::Fin { origin, id } => {
                if let Some(index) = self.keys.get(&(p, side_of(origin), id)).copied() {
                    if let Some(conn) = self.conns[index].as_mut() {
                        conn.ends = conn.ends.got_end();
                        let wake = conn.segment.producer(conn.mine.tx_ring()).finish();
                        if wake {
                            vsocket_sys::ring(conn.bell.as_fd());
                        }
                    }
                }
            }
            Frame::Reset { origin, id } => {
                if let Some(index) = self.keys.get(&(p, side_of(origin), id)).copied() {
                    self.abort(index, false, OpenOutcome::Refused(Refusal::Errno(libc::ECONNREFUSED)));
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
            self.link_down(old, "replaced by a new link".into());
        }
        let peer = &mut self.peers[p];
        peer.link = Some(link);
        peer.status.state = LinkState::Up;
        peer.status.since = Some(std::time::SystemTime::now());
        peer.status.links_up += 1;
        peer.status.last_error = None;
        tracing::info!(peer = %peer.name, transport = %self.kind, "fabric link up");
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Open { peer, id, request, conn, reply } => {
                let Some(p) = self.peers.iter().position(|x| x.name == peer) else {
                    let _ = reply.send(OpenOutcome::Unreachable(format!("{peer} is not a fabric host")));
                    return;
                };
                let Some(link) = self.peers[p].link else {
                    let why = self.peers[p].status.last_error.clone().unwrap_or_else(|| "link down".into());
                    let _ = reply.send(OpenOutcome::Unreachable(why));
                    return;
                };
                let window = conn.segment.ring_size();
                self.insert((p, Side::Local, id), conn, 0, Some(reply));
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
                if let Some(p) = self.peers.iter().position(|x| x.name == peer) {
                    if let Some(index) = self.keys.get(&(p, Side::Local, id)).copied() {
                        self.send_to(p, &Frame::Reset { origin: Origin::Sender, id });
                        self.abort(index, true, OpenOutcome::Unreachable("timed out".into()));
                    }
                }
            }
            Command::Accepted { peer, id, conn, window } => {
                if self.peers[peer].link.is_none() {
                    // The link went while the listener was being reached:
                    // the guest gets a connection that is reset at once.
                    let (segment, mine, bell) = (&conn.segment, conn.mine, &conn.bell);
                    let w = segment.producer(mine.tx_ring()).reset() | segment.consumer(mine.rx_ring()).close();
                    if w {
                        vsocket_sys::ring(bell.as_fd());
                    }
                    return;
                }
                let mine_window = conn.segment.ring_size();
                let index = self.insert((peer, Side::Remote, id), conn, window, None);
                self.peers[peer].status.accepted += 1;
                self.send_to(peer, &Frame::Accept { origin: Origin::Receiver, id, window: mine_window });
                self.dirty.push(index);
            }
            Command::Refused { peer, id, refusal } => {
                self.send_to(peer, &Frame::Refuse { origin: Origin::Receiver, id, refusal });
            }
        }
        self.pump_dirty();
    }

    fn insert(
        &mut self,
        key: Key,
        conn: NewConn,
        peer_window: u32,
        opening: Option<mpsc::Sender<OpenOutcome>>,
    ) -> usize {
        let index = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let NewConn { segment, mine, bell, holds, meter } = conn;
        if let Err(e) = self.epoll.add(bell.as_fd(), libc::EPOLLIN as u32, TOKEN_CONNS + index as u64) {
            tracing::error!(error = %e, "fabric relay: cannot watch a doorbell");
        }
        let flow = Flow::new(segment.ring_size(), peer_window);
        self.conns[index] = Some(Conn {
            key,
            segment,
            mine,
            bell,
            _holds: holds,
            flow,
            meter,
            opening,
            ends: Ends::Open,
            guest_gone: false,
        });
        self.keys.insert(key, index);
        index
    }

    fn remove(&mut self, index: usize) {
        if let Some(conn) = self.conns[index].take() {
            let _ = self.epoll.delete(conn.bell.as_fd());
            self.keys.remove(&conn.key);
            self.free.push(index);
        }
    }

    /// Resets connection `index` on the guest's side (it reads ECONNRESET)
    /// and stops relaying it; one still opening gets `outcome` (and is
    /// dropped, its guest never had it). `remove_now` drops it at once.
    fn abort(&mut self, index: usize, remove_now: bool, outcome: OpenOutcome) {
        let Some(conn) = self.conns[index].as_mut() else { return };
        conn.ends = Ends::Closed;
        if let Some(reply) = conn.opening.take() {
            let _ = reply.send(outcome);
            self.remove(index);
            return;
        }
        let wake =
            conn.segment.producer(conn.mine.tx_ring()).reset() | conn.segment.consumer(conn.mine.rx_ring()).close();
        if wake {
            vsocket_sys::ring(conn.bell.as_fd());
        }
        if remove_now || conn.guest_gone {
            self.remove(index);
        }
    }

    /// The guest rang (or hung up) connection `index`'s doorbell.
    fn doorbell(&mut self, index: usize) {
        let Some(conn) = self.conns.get_mut(index).and_then(Option::as_mut) else { return };
        if vsocket_sys::drain(conn.bell.as_fd()) && !conn.guest_gone {
            conn.guest_gone = true;
            let _ = self.epoll.delete(conn.bell.as_fd());
        }
        self.dirty.push(index);
    }

    /// Writes a `Data` frame's bytes into the guest's ring.
    fn deliver(&mut self, index: usize, bytes: &[u8]) {
        let Some(conn) = self.conns[index].as_mut() else { return };
        if conn.ends.got() || conn.opening.is_some() {
            return;
        }
        let tx = conn.segment.producer(conn.mine.tx_ring());
        let written = if conn.flow.admits(conn.delivered(), bytes.len()) { tx.write(&[bytes]).ok() } else { None };
        match written {
            Some((n, wake)) if n == bytes.len() => self.delivered(index, n, wake),
            // More than the window allowed (or a guest that forged its
            // ring's indices), or a guest that closed its reading side:
            // this connection is reset, nothing else.
            _ => {
                let (p, side, id) = conn.key;
                self.send_to(p, &Frame::Reset { origin: wire(side), id });
                self.abort(index, false, OpenOutcome::Unreachable("reset".into()));
            }
        }
    }

    /// `n` more bytes are in connection `index`'s receive ring.
    fn delivered(&mut self, index: usize, n: usize, wake: bool) {
        let Some(conn) = self.conns[index].as_mut() else { return };
        conn.meter.given.fetch_add(n as u64, Ordering::Relaxed);
        self.active = Instant::now();
        if wake {
            vsocket_sys::ring(conn.bell.as_fd());
        }
        self.dirty.push(index);
        self.answered.push(index);
    }

    /// Moves what can move for connection `index`: the guest's bytes out
    /// (within credit and link room), credit back for what it read, its
    /// end of stream; and drops it once both the guest and the relay are
    /// done with it.
    fn pump(&mut self, index: usize) {
        let Some(conn) = self.conns.get(index).and_then(Option::as_ref) else { return };
        if conn.opening.is_some() {
            return;
        }
        let (p, side, id) = conn.key;
        let Some(link) = self.peers[p].link else {
            // Reset with its link; gone once its guest lets go.
            if conn.guest_gone {
                self.remove(index);
            }
            return;
        };
        let origin = wire(side);
        // Guest to peer.
        loop {
            if self.backlog(link) >= HIGH_WATER {
                self.blocked.push(index);
                break;
            }
            let conn = self.conns[index].as_mut().expect("pumped connection exists");
            if conn.ends.sent() {
                break;
            }
            let rx = conn.segment.consumer(conn.mine.rx_ring());
            match rx.state() {
                Ok(RxState::Data(n)) => {
                    let take = conn.flow.sendable(n as usize, MAX_PAYLOAD);
                    if take == 0 {
                        break;
                    }
                    let Some(transport) = self.transport.as_mut() else { break };
                    let Ok(wake) = transport.send_ring(link, origin, id, &rx, take) else {
                        self.corrupt(index);
                        return;
                    };
                    if wake {
                        vsocket_sys::ring(conn.bell.as_fd());
                    }
                    conn.flow.sent(take);
                    conn.meter.taken.fetch_add(take as u64, Ordering::Relaxed);
                    self.note_sent(link, take);
                    self.active = Instant::now();
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
                    let wake = conn.segment.producer(conn.mine.tx_ring()).reset();
                    if wake {
                        vsocket_sys::ring(conn.bell.as_fd());
                    }
                    self.send(link, &Frame::Reset { origin, id });
                    break;
                }
                Err(_) => {
                    self.corrupt(index);
                    return;
                }
            }
        }
        // Credit back what the guest read.
        if let Some(bytes) = self.credit_due(index) {
            self.send(link, &Frame::Credit { origin, id, bytes });
        }
        let conn = self.conns[index].as_ref().expect("pumped connection exists");
        if conn.guest_gone && conn.ends.sent() {
            self.remove(index);
        }
    }

    /// The credit connection `index` owes its peer now (in sixteenths of
    /// the window, so the sender rarely runs dry), if any. Otherwise arms
    /// the guest's ring to hear of reads when they could make one due.
    fn credit_due(&mut self, index: usize) -> Option<u32> {
        let conn = self.conns[index].as_mut()?;
        if conn.ends.got() {
            return None;
        }
        loop {
            let consumed = conn.consumed();
            match conn.flow.credit_due(conn.delivered(), consumed) {
                CreditDue::Send(bytes) => return Some(bytes),
                CreditDue::Nothing => return None,
                CreditDue::Watch => {
                    conn.segment.producer(conn.mine.tx_ring()).arm();
                    if conn.consumed() == consumed {
                        return None;
                    }
                }
            }
        }
    }

    /// The guest's ring holds values no ring can: reset its connection.
    fn corrupt(&mut self, index: usize) {
        let Some(conn) = self.conns[index].as_ref() else { return };
        let (p, side, id) = conn.key;
        let already = conn.ends.sent();
        if !already {
            self.send_to(p, &Frame::Reset { origin: wire(side), id });
        }
        self.abort(index, false, OpenOutcome::Unreachable("corrupt ring".into()));
        self.peers[p].status.corrupt += 1;
    }
}

impl Events for Relay {
    fn event(&mut self, event: LinkEvent<'_>) {
        self.link_event(event);
    }

    fn data_ring(&mut self, link: LinkId, origin: Origin, id: u64) -> Option<vsocket_ring::Producer<'_>> {
        let (_, index) = self.stream_of(link, origin, id)?;
        let conn = self.conns[index].as_ref()?;
        // As `deliver` checks: bytes are taken only while the stream is open.
        if conn.ends.got() || conn.opening.is_some() {
            return None;
        }
        Some(conn.segment.producer(conn.mine.tx_ring()))
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
        let tx = self.segment.producer(self.mine.tx_ring());
        match tx.space() {
            Ok(space) => {
                let unread = u64::from(self.segment.ring_size()).saturating_sub(u64::from(space));
                self.delivered().saturating_sub(unread)
            }
            // Closed by the guest: everything counts as read.
            Err(_) => self.delivered(),
        }
    }
}
